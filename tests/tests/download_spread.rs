//! The spread hint: after a non-forced bump the hub asks agents, in the `sync_required` frame,
//! to spread their downloads over a time in proportion to the sockets following the space (none
//! for a forced sync, nor when the frame carries the whole change), and a real agent waits a
//! random part of it, says so in its status, does not wait twice when another bump arrives
//! meanwhile, and starts a forced sync at once.
//!
//! The files committed here are larger than a frame carries (20 KB), so that the agents have
//! something to fetch and the hub a reason to spread them.

use anyhow::{Context, bail, ensure};
use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::{AgentState, DEFAULT_SPACE, ForceSyncRequest, Head, Role};
use synchub_tests::fixtures::{agent_config, commit, http, wait_ready};
use synchub_tests::hub::{TestHub, WsAgent};
use tokio::sync::watch;

/// A file too large to ride in a bump's frame, different for each `tag`.
fn large(tag: u8) -> Vec<u8> {
    vec![tag; 20_000]
}

/// Force-syncs the default space; returns the new head.
async fn force_sync(hub: &TestHub) -> anyhow::Result<Head> {
    let resp = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/force-sync")))
        .bearer_auth(&hub.admin_token)
        .json(&ForceSyncRequest {
            reason: Some("spread test".into()),
        })
        .send()
        .await?;
    ensure!(resp.status().is_success(), "force-sync: {}", resp.status());
    Ok(resp.json::<synchub_protocol::CommitResponse>().await?.head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frame_carries_a_spread_in_proportion_to_the_sockets_and_none_when_forced()
-> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| {
        c.download_spread_per_agent_us = 100_000;
        c.download_spread_max_ms = 250;
        c.limits.max_sockets_per_token = 0;
    })
    .await?;
    let mut sockets = Vec::new();
    for _ in 0..2 {
        sockets.push(WsAgent::connect(&hub, &hub.admin_token, &[DEFAULT_SPACE]).await?);
    }
    let (status, body) =
        commit(&hub, &hub.admin_token, 1, &[("a.json", &large(b'a'))], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    for socket in &mut sockets {
        let frame: serde_json::Value =
            serde_json::from_str(&socket.next_text(Duration::from_secs(5)).await?)?;
        assert_eq!(frame["type"], "sync_required");
        assert_eq!(frame["version"], 2);
        assert_eq!(frame["spread_ms"], 200, "2 sockets x 100 ms: {frame}");
    }

    // A third socket: the cap (250 ms) bounds the hint.
    sockets.push(WsAgent::connect(&hub, &hub.admin_token, &[DEFAULT_SPACE]).await?);
    let (status, body) =
        commit(&hub, &hub.admin_token, 2, &[("b.json", &large(b'b'))], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    for socket in &mut sockets {
        let frame: serde_json::Value =
            serde_json::from_str(&socket.next_text(Duration::from_secs(5)).await?)?;
        assert_eq!(frame["version"], 3);
        assert_eq!(frame["spread_ms"], 250, "capped: {frame}");
    }

    let forced = force_sync(&hub).await?;
    for socket in &mut sockets {
        let frame: serde_json::Value =
            serde_json::from_str(&socket.next_text(Duration::from_secs(5)).await?)?;
        assert_eq!(frame["version"], forced.version);
        assert_eq!(frame["forced"], true);
        assert!(
            frame.get("spread_ms").is_none(),
            "a forced sync starts everywhere at once: {frame}"
        );
    }

    // Sockets that leave stop counting: one left, 100 ms is above the floor (50 ms).
    sockets.truncate(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        forced.version,
        &[("c.json", &large(b'c'))],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let frame: serde_json::Value =
        serde_json::from_str(&sockets[0].next_text(Duration::from_secs(5)).await?)?;
    assert_eq!(frame["spread_ms"], 100, "one socket left: {frame}");

    // A small change rides whole in the frame (its delta and its new file): the agents need
    // nothing from the hub, so nothing is spread.
    let version = frame["version"].as_u64().context("version")?;
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        version,
        &[("d.json", b"{\"d\":4}")],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let frame: serde_json::Value =
        serde_json::from_str(&sockets[0].next_text(Duration::from_secs(5)).await?)?;
    assert_eq!(
        frame["delta"]["blobs"].as_array().map(Vec::len),
        Some(1),
        "{frame}"
    );
    assert!(
        frame.get("spread_ms").is_none(),
        "a change the frame carries whole is not spread: {frame}"
    );
    hub.stop().await;
    Ok(())
}

/// Waits until the agent's state satisfies `f`; returns that state.
async fn wait_state(
    rx: &mut watch::Receiver<AgentState>,
    timeout: Duration,
    f: impl Fn(&AgentState) -> bool,
) -> anyhow::Result<AgentState> {
    let found = tokio::time::timeout(timeout, async {
        rx.wait_for(|s| f(s)).await.map(|s| s.clone())
    })
    .await;
    match found {
        Ok(state) => Ok(state?),
        Err(_) => bail!("state still {:?} after {timeout:?}", *rx.borrow()),
    }
}

fn starts_at(state: &AgentState) -> Option<chrono::DateTime<chrono::Utc>> {
    match state {
        AgentState::SyncRequired {
            starts_at: Some(at),
            ..
        } => chrono::DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_waits_within_the_spread_once_and_not_for_a_forced_sync() -> anyhow::Result<()> {
    // One socket, 3 s per agent: a 3 s spread.
    let hub = TestHub::start_with(|c| {
        c.download_spread_per_agent_us = 3_000_000;
        c.download_spread_max_ms = 3_000;
    })
    .await?;
    let (status, body) =
        commit(&hub, &hub.admin_token, 1, &[("a.json", &large(b'a'))], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let token = hub.token("pc", Role::Agent, None).await?;
    let dir = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &token, dir.path())).await?;
    wait_ready(&agent, 2, Duration::from_secs(10)).await?;
    let mut states = agent.subscribe(None)?;

    let bumped = chrono::Utc::now();
    let (status, body) =
        commit(&hub, &hub.admin_token, 2, &[("b.json", &large(b'b'))], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let waiting = wait_state(&mut states, Duration::from_secs(5), |s| {
        starts_at(s).is_some()
    })
    .await?;
    let start = starts_at(&waiting).context("starts_at")?;
    let slack = chrono::Duration::milliseconds(500);
    ensure!(
        start >= bumped && start <= bumped + chrono::Duration::milliseconds(3_000) + slack,
        "the start {start} is outside the 3 s spread after the bump at {bumped}"
    );
    assert!(
        !waiting.allows_use(),
        "local use stays blocked while waiting"
    );

    // A second bump during the wait takes over the target but not the wait.
    let (status, body) =
        commit(&hub, &hub.admin_token, 3, &[("c.json", &large(b'c'))], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    if chrono::Utc::now() + chrono::Duration::milliseconds(200) < start {
        let again = wait_state(&mut states, Duration::from_secs(5), |s| {
            matches!(s, AgentState::SyncRequired { target: 4, .. })
        })
        .await?;
        assert_eq!(
            starts_at(&again),
            Some(start),
            "the newer head keeps the same start"
        );
    }
    wait_ready(&agent, 4, Duration::from_secs(10)).await?;
    let ready_at = chrono::Utc::now();
    ensure!(
        ready_at + chrono::Duration::milliseconds(50) >= start,
        "ready at {ready_at}, before the announced start {start}"
    );
    ensure!(
        ready_at <= bumped + chrono::Duration::milliseconds(3_000) + chrono::Duration::seconds(3),
        "ready at {ready_at}: waited longer than one spread after the bump at {bumped}"
    );

    // An agent configured with a long jitter of its own: "Update now" ends its wait, and a
    // forced sync goes at once, with no waiting state on the way to ready.
    let dir_b = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &token, dir_b.path());
    config.download_jitter_ms = 60_000;
    config.client_id = Some("spread-b".into());
    let b = SyncClient::start(config).await?;
    let mut b_states = b.subscribe(None)?;
    let b_wait = wait_state(&mut b_states, Duration::from_secs(10), |s| {
        starts_at(s).is_some()
    })
    .await?;
    ensure!(
        starts_at(&b_wait).is_some_and(|t| t <= chrono::Utc::now() + chrono::Duration::seconds(61)),
        "{b_wait:?}"
    );
    b.sync_now(None)?;
    wait_ready(&b, 4, Duration::from_secs(5)).await?;

    let mut b_states = b.subscribe(None)?;
    b_states.mark_unchanged();
    let forced = force_sync(&hub).await?.version;
    let seen = tokio::spawn(async move {
        let mut waited = false;
        while b_states.changed().await.is_ok() {
            let s = b_states.borrow_and_update().clone();
            waited |= starts_at(&s).is_some();
            if matches!(s, AgentState::Ready { version } if version >= forced) {
                break;
            }
        }
        waited
    });
    let started = std::time::Instant::now();
    wait_ready(&b, forced, Duration::from_secs(10)).await?;
    let waited = tokio::time::timeout(Duration::from_secs(2), seen).await??;
    assert!(!waited, "the forced sync waited for a spread");
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "forced sync took {:?}",
        started.elapsed()
    );
    wait_ready(&agent, forced, Duration::from_secs(10)).await?;
    b.shutdown().await;
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
