//! End-to-end tests of the agent (`synchub_client::SyncClient`) against a real in-process hub:
//! a publish reaching other agents byte for byte, the 1-second fallback without WebSocket, a
//! forced sync repairing a corrupted file, corrupted and truncated blobs never applied,
//! reports made offline delivered once, and local use blocked during a sync.

use anyhow::{Context, ensure};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use synchub_client::{HubApi, SyncClient};
use synchub_protocol::{AgentState, ForceSyncRequest, Role, Sha256Hex, SyncLogEntry};
use synchub_tests::fixtures::{agent_config, read_tree, wait_ready};
use synchub_tests::hub::{TestHub, fs_blob_path};

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;

/// The QR-like set of system 2: 54 range folders, 508 PNG-sized files of ~5 KB.
fn write_qr_set(root: &Path, seed: &str) -> anyhow::Result<()> {
    let mut n = 0;
    for folder in 0..54 {
        let name = format!("{:05}-{:05}-F", 4313 + folder, 11100 + folder * 7);
        std::fs::create_dir_all(root.join(&name))?;
        let count = if folder < 22 { 10 } else { 9 }; // 22*10 + 32*9 = 508
        for i in 0..count {
            let body: Vec<u8> = format!("{seed}:{name}:{i}:")
                .bytes()
                .cycle()
                .take(4800 + (n * 37) % 600)
                .collect();
            std::fs::write(root.join(&name).join(format!("qr_{i:04}.png")), body)?;
            n += 1;
        }
    }
    assert_eq!(n, 508);
    Ok(())
}

async fn sync_log(hub: &TestHub, client_id: &str) -> anyhow::Result<Vec<SyncLogEntry>> {
    hub.sync_log(&format!("client_id={client_id}&limit=1000"))
        .await
}

fn init() {
    synchub_client::install_crypto_provider();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_reaches_every_agent_byte_identical() -> anyhow::Result<()> {
    init();
    let hub = TestHub::start().await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = Vec::new();
    for d in &dirs {
        agents.push(SyncClient::start(agent_config(&hub, &token, d.path())).await?);
    }
    for a in &agents {
        wait_ready(a, 0, Duration::from_secs(10)).await?;
    }
    let src = tempfile::tempdir()?;
    write_qr_set(src.path(), "v1")?;
    let outcome = agents[0]
        .publish(
            None,
            Some("qr"),
            &[src.path().to_path_buf()],
            Some("QR set".into()),
        )
        .await?;
    assert_eq!(outcome.files, 508);
    let v = outcome.head.version;
    let started = Instant::now();
    for a in &agents {
        wait_ready(a, v, Duration::from_secs(15)).await?;
    }
    eprintln!("508 files reached 3 agents in {:?}", started.elapsed());
    let expected: BTreeMap<String, Vec<u8>> = read_tree(src.path())
        .into_iter()
        .map(|(p, b)| (format!("qr/{p}"), b))
        .collect();
    for d in &dirs {
        assert_eq!(read_tree(&d.path().join("current")), expected);
    }

    // An incremental publish: only the changed file is uploaded and the others converge.
    std::fs::write(src.path().join("00004313-11100-F.txt"), b"not a folder")?;
    let changed = src.path().join("04313-11100-F/qr_0000.png");
    std::fs::write(&changed, b"new bytes")?;
    let outcome = agents[1]
        .publish(None, Some("qr"), &[src.path().to_path_buf()], None)
        .await?;
    assert_eq!(outcome.files, 2, "{outcome:?}");
    assert_eq!(outcome.uploaded, 2);
    for a in &agents {
        wait_ready(a, outcome.head.version, Duration::from_secs(10)).await?;
    }
    for d in &dirs {
        assert_eq!(
            std::fs::read(d.path().join("current/qr/04313-11100-F/qr_0000.png"))?,
            b"new bytes"
        );
        // The live tree and one last-good tree (the default `keep_trees`); older ones went.
        let trees: Vec<_> = std::fs::read_dir(d.path().join(".synchub/trees"))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .collect();
        assert_eq!(trees.len(), 2);
    }
    // Every agent reported its downloads.
    for a in &agents {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = sync_log(&hub, a.client_id()).await?;
            if log
                .iter()
                .filter(|e| e.sync_type == "download" && e.status == "success")
                .count()
                >= 3
            {
                break;
            }
            ensure!(Instant::now() < deadline, "reports missing: {log:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A report counts the files that changed, and the version's total beside it.
        let log = sync_log(&hub, a.client_id()).await?;
        let download = |version: u64| {
            log.iter()
                .find(|e| e.sync_type == "download" && e.version == Some(version as i64))
                .map(|e| (e.items_synced, e.items_total))
        };
        ensure!(download(v) == Some((Some(508), Some(508))), "{log:#?}");
        ensure!(
            download(outcome.head.version) == Some((Some(2), Some(509))),
            "a 2-file change: {log:#?}"
        );
    }
    for a in agents {
        a.shutdown().await;
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fallback_delivers_within_two_seconds_without_websocket() -> anyhow::Result<()> {
    init();
    let hub = TestHub::start().await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let d1 = tempfile::tempdir()?;
    let d2 = tempfile::tempdir()?;
    let mut c1 = agent_config(&hub, &token, d1.path());
    c1.disable_websocket = true;
    let mut c2 = agent_config(&hub, &token, d2.path());
    c2.ws_path = "/api/v1/no-such-ws".into();
    let a1 = SyncClient::start(c1).await?;
    let a2 = SyncClient::start(c2).await?;
    wait_ready(&a1, 0, Duration::from_secs(5)).await?;
    wait_ready(&a2, 0, Duration::from_secs(5)).await?;
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("a.json"), b"{\"x\":1}")?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let started = Instant::now();
    let outcome =
        synchub_client::publish(&api, SPACE, None, &[src.path().join("a.json")], None).await?;
    wait_ready(&a1, outcome.head.version, Duration::from_millis(2500)).await?;
    wait_ready(&a2, outcome.head.version, Duration::from_millis(2500)).await?;
    let took = started.elapsed();
    eprintln!("fallback delivered in {took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(a1.status().hub.mode, "fallback");
    assert_eq!(
        std::fs::read(d2.path().join("current/a.json"))?,
        b"{\"x\":1}"
    );
    a1.shutdown().await;
    a2.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forced_sync_repairs_a_corrupted_file() -> anyhow::Result<()> {
    init();
    let hub = TestHub::start().await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let d = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &token, d.path())).await?;
    let src = tempfile::tempdir()?;
    write_qr_set(src.path(), "force")?;
    let v = agent
        .publish(None, None, &[src.path().to_path_buf()], None)
        .await?
        .head
        .version;
    wait_ready(&agent, v, Duration::from_secs(10)).await?;

    // Someone edits a file in place (through the hard link, so the cache entry changes too).
    let victim = d.path().join("current/04320-11149-F/qr_0003.png");
    let good = std::fs::read(&victim)?;
    let mut perms = std::fs::metadata(&victim)?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&victim, perms)?;
    let mut bad = good.clone();
    bad[10] ^= 0xff;
    std::fs::write(&victim, &bad)?;
    let report = synchub_client::audit_tree(d.path(), |_, _| {})?;
    assert_eq!(report.corrupted, vec!["04320-11149-F/qr_0003.png"]);

    let resp = reqwest::Client::new()
        .post(hub.api(&format!("/spaces/{SPACE}/force-sync")))
        .bearer_auth(&hub.admin_token)
        .json(&ForceSyncRequest {
            reason: Some("repair".into()),
        })
        .send()
        .await?;
    ensure!(resp.status().is_success(), "force-sync: {}", resp.status());
    let forced = resp.json::<synchub_protocol::CommitResponse>().await?.head;
    assert!(forced.forced);
    wait_ready(&agent, forced.version, Duration::from_secs(10)).await?;
    assert_eq!(
        std::fs::read(d.path().join("current/04320-11149-F/qr_0003.png"))?,
        good
    );
    assert!(synchub_client::audit_tree(d.path(), |_, _| {})?.is_clean());
    // The forced sync is reported as such.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sync_log(&hub, agent.client_id())
        .await?
        .iter()
        .any(|e| e.sync_type == "force_sync" && e.status == "success")
    {
        ensure!(Instant::now() < deadline, "no force_sync report");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

/// Corrupts (same size, other bytes) or truncates a blob in the hub's filesystem store.
fn damage_blob(hub: &TestHub, sha: &Sha256Hex, truncate: bool) -> anyhow::Result<Vec<u8>> {
    let path = fs_blob_path(hub.data_dir(), sha.as_str());
    let good = std::fs::read(&path).with_context(|| format!("blob at {}", path.display()))?;
    let mut perms = std::fs::metadata(&path)?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms)?;
    if truncate {
        std::fs::write(&path, &good[..good.len() / 2])?;
    } else {
        let mut bad = good.clone();
        bad[0] ^= 0xff;
        std::fs::write(&path, &bad)?;
    }
    Ok(good)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_or_truncated_blobs_are_never_applied() -> anyhow::Result<()> {
    init();
    let hub = TestHub::start().await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("small.json"), b"{\"v\":1}")?;
    let v1 = synchub_client::publish(&api, SPACE, None, &[src.path().join("small.json")], None)
        .await?
        .head
        .version;
    let d = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &token, d.path())).await?;
    wait_ready(&agent, v1, Duration::from_secs(10)).await?;

    // v2: a changed small file (fetched in a pack) and a large one (fetched alone).
    std::fs::write(src.path().join("small.json"), b"{\"v\":2}")?;
    let large: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.path().join("large.bin"), &large)?;
    // Publish with the agent stopped and damage the blobs in the hub before it starts again,
    // so its first fetch meets them.
    agent.shutdown().await;
    let v2 = synchub_client::publish(
        &api,
        SPACE,
        None,
        &[src.path().join("small.json"), src.path().join("large.bin")],
        None,
    )
    .await?
    .head
    .version;
    let small_sha = Sha256Hex::of(b"{\"v\":2}");
    let large_sha = Sha256Hex::of(&large);
    let small_good = damage_blob(&hub, &small_sha, false)?;
    let large_good = damage_blob(&hub, &large_sha, true)?;

    let mut cfg = agent_config(&hub, &token, d.path());
    cfg.client_id = Some(format!("test-agent-{}", uuid::Uuid::new_v4()));
    let agent = SyncClient::start(cfg).await?;
    let mut rx = agent.subscribe(None)?;
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| matches!(s, AgentState::Failed { .. })),
    )
    .await
    .context("agent never failed")??
    .clone();
    eprintln!("failed as expected: {failed:?}");
    assert!(!failed.allows_use(), "stay_blocked is the default");
    // Nothing of v2 was applied: the old tree is intact.
    assert_eq!(
        std::fs::read(d.path().join("current/small.json"))?,
        b"{\"v\":1}"
    );
    assert!(!d.path().join("current/large.bin").exists());
    assert_eq!(agent.state(None)?.version(), v1);
    let status: serde_json::Value =
        reqwest::get(format!("http://{}/status", agent.local_api_addr().unwrap()))
            .await?
            .json()
            .await?;
    assert_eq!(status["spaces"][0]["state"], "failed");
    assert!(status["spaces"][0]["last_error"].as_str().is_some());

    // The hub is repaired: the retry (with backoff) applies v2.
    std::fs::write(
        fs_blob_path(hub.data_dir(), small_sha.as_str()),
        &small_good,
    )?;
    std::fs::write(
        fs_blob_path(hub.data_dir(), large_sha.as_str()),
        &large_good,
    )?;
    agent.sync_now(None)?;
    wait_ready(&agent, v2, Duration::from_secs(15)).await?;
    assert_eq!(std::fs::read(d.path().join("current/large.bin"))?, large);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = sync_log(&hub, agent.client_id()).await?;
        if log
            .iter()
            .any(|e| e.status == "failed" && e.error_message.is_some())
            && log.iter().any(|e| e.status == "success")
        {
            break;
        }
        ensure!(Instant::now() < deadline, "reports: {log:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_made_offline_reach_sync_log_once_each() -> anyhow::Result<()> {
    init();
    let mut hub = TestHub::start().await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let d = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &token, d.path())).await?;
    wait_ready(&agent, 0, Duration::from_secs(10)).await?;
    let outbox = d.path().join(".synchub/outbox");

    hub.stop_keep().await;
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("offline.json"), b"{}")?;
    for _ in 0..3 {
        let err = agent
            .publish(
                None,
                Some("arhiva"),
                &[src.path().join("offline.json")],
                None,
            )
            .await;
        assert!(err.is_err());
    }
    let pending: Vec<String> = std::fs::read_dir(&outbox)?
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_owned()
        })
        .collect();
    assert!(pending.len() >= 3, "{pending:?}");

    hub.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::read_dir(&outbox)?.flatten().count() > 0 {
        ensure!(Instant::now() < deadline, "outbox not drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = sync_log(&hub, agent.client_id()).await?;
    for id in &pending {
        let n = log
            .iter()
            .filter(|e| e.report_id.as_deref() == Some(id.as_str()))
            .count();
        assert_eq!(n, 1, "report {id} stored {n} times");
    }
    assert!(
        log.iter()
            .any(|e| e.sync_type == "upload" && e.status == "failed")
    );
    // The agent is back on the push channel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.status().hub.mode != "websocket" {
        ensure!(
            Instant::now() < deadline,
            "no reconnect: {:?}",
            agent.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_guard_and_status_block_during_a_sync() -> anyhow::Result<()> {
    init();
    let hub = TestHub::start().await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let d = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &token, d.path())).await?;
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("data.json"), b"one")?;
    let v1 = agent
        .publish(None, None, &[src.path().join("data.json")], None)
        .await?
        .head
        .version;
    wait_ready(&agent, v1, Duration::from_secs(10)).await?;
    let addr = agent.local_api_addr().context("local api")?;

    let guard = agent.access().await?;
    assert_eq!(guard.version(), v1);
    std::fs::write(src.path().join("data.json"), b"two")?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let v2 = synchub_client::publish(&api, SPACE, None, &[src.path().join("data.json")], None)
        .await?
        .head
        .version;
    // The agent blocks new use at once, downloads, then waits for our guard before switching.
    let mut rx = agent.subscribe(None)?;
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| matches!(s, AgentState::Applying { .. })),
    )
    .await
    .context("never reached applying")??;
    let status: serde_json::Value = reqwest::get(format!("http://{addr}/status"))
        .await?
        .json()
        .await?;
    assert_eq!(status["spaces"][0]["allows_use"], false, "{status}");
    assert!(agent.try_access(None)?.is_none());
    let state_file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join(".synchub/state.json"))?)?;
    assert_eq!(state_file["allows_use"], false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still the old data while the guard lives.
    assert_eq!(std::fs::read(guard.path().join("data.json"))?, b"one");
    drop(guard);
    wait_ready(&agent, v2, Duration::from_secs(5)).await?;
    let guard = agent.access().await?;
    assert_eq!(guard.version(), v2);
    assert_eq!(std::fs::read(guard.path().join("data.json"))?, b"two");
    drop(guard);
    let status: serde_json::Value = reqwest::get(format!("http://{addr}/status"))
        .await?
        .json()
        .await?;
    assert_eq!(status["spaces"][0]["state"], "ready");
    assert_eq!(status["spaces"][0]["allows_use"], true);
    assert_eq!(status["hub"]["mode"], "websocket");
    let page = reqwest::get(format!("http://{addr}/"))
        .await?
        .text()
        .await?;
    // The block page carries the status it was served with (rendered in tests/block_page.rs).
    assert!(page.contains(r#""state":"ready""#), "{page}");
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
