//! The fleet as the hub records it (`GET /api/v1/fleet`, table `synchub_agents`), on both
//! backends: a PC that disconnects stays listed with when it was last seen and the version it
//! held, also after the hub restarts; a burst of status frames is written once, not once per
//! frame; the summary counts known, online, on the head, behind, downloading, failed and not
//! seen for longer than the threshold. And in headless Chromium: the dashboard's summary counts
//! a PC that went offline, and lists it with its last seen.

use anyhow::{Context, ensure};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentFrame, AgentState, DEFAULT_SPACE, FleetView, Role};
use synchub_tests::backend_matrix;
use synchub_tests::browser::Browser;
use synchub_tests::fixtures::{self, commit};
use synchub_tests::hub::{Backend, TestHub, WsAgent};

const WAIT: Duration = Duration::from_secs(15);

/// A hub that writes the fleet every 200 ms and calls a PC offline for 2 s "not seen".
async fn hub(backend: Backend) -> anyhow::Result<TestHub> {
    let hub = TestHub::start_with_backend_and(backend, |c| {
        c.fleet.write_interval_ms = 200;
        c.fleet.not_seen_after_secs = 2;
    })
    .await?;
    let (status, body) = commit(&hub, &hub.admin_token, 1, &[("a.txt", b"a")], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    Ok(hub)
}

/// A bare agent named `name` that reports `state`; its client id.
async fn agent(hub: &TestHub, name: &str, state: AgentState) -> anyhow::Result<(WsAgent, String)> {
    let token = hub.token(name, Role::Agent, None).await?;
    let before: Vec<String> = ids(hub);
    let mut a = WsAgent::connect(hub, &token, &[DEFAULT_SPACE]).await?;
    let id = ids(hub)
        .into_iter()
        .find(|id| !before.contains(id))
        .context("the new agent is not listed")?;
    status(&mut a, state).await?;
    Ok((a, id))
}

fn ids(hub: &TestHub) -> Vec<String> {
    hub.state()
        .clients
        .list()
        .into_iter()
        .map(|c| c.client_id)
        .collect()
}

async fn status(a: &mut WsAgent, state: AgentState) -> anyhow::Result<()> {
    let frame = AgentFrame::Status {
        space: DEFAULT_SPACE.into(),
        state,
    };
    a.send_text(serde_json::to_string(&frame)?).await
}

async fn fleet(hub: &TestHub) -> anyhow::Result<FleetView> {
    hub.admin_get(&format!("/fleet?space={DEFAULT_SPACE}"))
        .await
}

/// Waits until `done` holds for the fleet view; the last view otherwise.
async fn wait_fleet(
    hub: &TestHub,
    what: &str,
    done: impl Fn(&FleetView) -> bool,
) -> anyhow::Result<FleetView> {
    let deadline = Instant::now() + WAIT;
    loop {
        let view = fleet(hub).await?;
        if done(&view) {
            return Ok(view);
        }
        ensure!(Instant::now() < deadline, "{what}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_pc_that_disconnects_stays_listed(backend: Backend) -> anyhow::Result<()> {
    let mut hub = hub(backend).await?;
    let (a, id) = agent(&hub, "pc-cluj-07", AgentState::Ready { version: 2 }).await?;
    let connected_at = chrono::Utc::now();
    drop(a);
    let gone = |v: &FleetView| v.agents.iter().any(|a| a.client_id == id && !a.online);
    wait_fleet(&hub, "the PC listed offline", gone).await?;
    // Written to the database (not only kept in memory): listed after a restart too.
    let deadline = Instant::now() + WAIT;
    while !hub
        .state()
        .store
        .agents(DEFAULT_SPACE)
        .await?
        .iter()
        .any(|a| a.client_id == id && !a.online)
    {
        ensure!(Instant::now() < deadline, "the offline PC was not written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hub.stop_keep().await;
    hub.restart().await?;
    let view = fleet(&hub).await?;
    let pc = view
        .agents
        .iter()
        .find(|a| a.client_id == id)
        .with_context(|| format!("the PC is gone after a restart: {view:#?}"))?;
    ensure!(!pc.online && pc.token_name == "pc-cluj-07", "{pc:?}");
    ensure!(pc.state == AgentState::Ready { version: 2 }, "{pc:?}");
    ensure!(pc.agent_version.as_deref() == Some("test"), "{pc:?}");
    let last_seen = chrono::DateTime::parse_from_rfc3339(&pc.last_seen)?;
    let off = (last_seen.with_timezone(&chrono::Utc) - connected_at)
        .num_seconds()
        .abs();
    ensure!(
        off <= 5,
        "last seen {} is {off} s from when it left",
        pc.last_seen
    );
    ensure!(
        view.counts.known == 1 && view.counts.online == 0,
        "{:?}",
        view.counts
    );
    hub.stop().await;
    Ok(())
}

async fn a_burst_of_status_frames_is_one_write(backend: Backend) -> anyhow::Result<()> {
    let hub =
        TestHub::start_with_backend_and(backend, |c| c.fleet.write_interval_ms = 1000).await?;
    let (mut a, id) = agent(&hub, "pc-busy", AgentState::Ready { version: 1 }).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = fixtures::metric(&hub, "synchub_fleet_writes_total").await?;
    for i in 0..40u64 {
        let state = AgentState::Downloading {
            version: 1,
            target: 2,
            files_done: i,
            files_total: 40,
            bytes_done: i * 1000,
            bytes_total: 40_000,
            bytes_per_sec: 1000,
        };
        status(&mut a, state).await?;
    }
    let last = AgentState::Downloading {
        version: 1,
        target: 2,
        files_done: 39,
        files_total: 40,
        bytes_done: 39_000,
        bytes_total: 40_000,
        bytes_per_sec: 1000,
    };
    let deadline = Instant::now() + WAIT;
    while !hub
        .state()
        .store
        .agents(DEFAULT_SPACE)
        .await?
        .iter()
        .any(|r| r.client_id == id && r.state == last)
    {
        ensure!(Instant::now() < deadline, "the last state was not written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writes = fixtures::metric(&hub, "synchub_fleet_writes_total").await? - before;
    // The recorder is shared by the hubs of this test process: the bound leaves room for the
    // other test's writes, and is still far below one write per frame.
    ensure!(writes <= 12.0, "{writes} fleet writes for 40 status frames");
    drop(a);
    hub.stop().await;
    Ok(())
}

async fn the_summary_counts(backend: Backend) -> anyhow::Result<()> {
    let hub = hub(backend).await?;
    // Offline for longer than the threshold (2 s).
    let (gone, _) = agent(&hub, "pc-gone", AgentState::Ready { version: 2 }).await?;
    drop(gone);
    let _head = agent(&hub, "pc-head", AgentState::Ready { version: 2 }).await?;
    let _behind = agent(&hub, "pc-behind", AgentState::Ready { version: 1 }).await?;
    let downloading = AgentState::Downloading {
        version: 1,
        target: 2,
        files_done: 0,
        files_total: 1,
        bytes_done: 0,
        bytes_total: 1,
        bytes_per_sec: 0,
    };
    let _downloading = agent(&hub, "pc-downloading", downloading).await?;
    let failed = AgentState::Failed {
        version: 1,
        target: 2,
        error: "disk full".into(),
        retry_at: None,
        stale_allowed: false,
    };
    let _failed = agent(&hub, "pc-failed", failed).await?;
    let view = wait_fleet(&hub, "the counts", |v| v.counts.not_seen == 1).await?;
    let c = &view.counts;
    ensure!(
        (
            c.known,
            c.online,
            c.on_head,
            c.behind,
            c.downloading,
            c.failed
        ) == (5, 4, 2, 1, 1, 1),
        "{c:?}"
    );
    ensure!(c.not_seen_after_secs == 2 && view.head == 2, "{view:?}");
    ensure!(
        view.agents.iter().take(4).all(|a| a.online) && !view.agents[4].online,
        "online first: {view:#?}"
    );
    hub.stop().await;
    Ok(())
}

backend_matrix!(
    [sqlite => Backend::Sqlite, postgres => Backend::Postgres]
    a_pc_that_disconnects_stays_listed,
    a_burst_of_status_frames_is_one_write,
    the_summary_counts,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_counts_a_pc_that_went_offline() -> anyhow::Result<()> {
    let hub = hub(Backend::Sqlite).await?;
    let (pc, _) = agent(&hub, "pc-sala-12", AgentState::Ready { version: 2 }).await?;
    let browser = Browser::start(1280, 1000).await?;
    browser
        .client
        .goto(&format!("{}/#token={}", hub.url, hub.admin_token))
        .await?;
    let card = |id: &str| {
        format!("const c = document.getElementById('sum-{id}'); return c ? c.textContent : ''")
    };
    let text = browser
        .wait_text(WAIT, "the PC connected", |t| t.contains("1 connected"))
        .await?;
    ensure!(
        text.contains("1 known") && text.contains("1 on the head"),
        "{text}"
    );
    ensure!(!text.contains("Offline PCs"), "{text}");
    drop(pc);
    // Pushed to the page: the PC is offline at once, and "not seen" after the 2 s threshold.
    let text = browser
        .wait_text(WAIT, "the PC offline", |t| {
            t.contains("0 connected") && t.contains("Offline PCs (1)")
        })
        .await?;
    ensure!(text.contains("1 known"), "{text}");
    ensure!(text.contains("pc-sala-12"), "{text}");
    let deadline = Instant::now() + WAIT;
    loop {
        let n = browser.client.execute(&card("not-seen"), vec![]).await?;
        if n.as_str()
            .is_some_and(|t| t.starts_with("1not seen for over 2.0 s"))
        {
            break;
        }
        ensure!(Instant::now() < deadline, "not-seen card: {n}");
        // The page looks again every 30 s by itself; a person would reload.
        tokio::time::sleep(Duration::from_millis(500)).await;
        browser.client.refresh().await?;
    }
    browser
        .screenshot(
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-fleet.png"),
        )
        .await?;
    browser.close().await?;
    hub.stop().await;
    Ok(())
}
