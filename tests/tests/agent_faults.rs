//! An agent is never stuck: a hub that keeps TCP open but stops answering in the middle of a
//! download is abandoned for the next configured hub, and a PC started while no hub answers
//! goes from `starting` to `failed` (with stale use of its last good tree when so configured)
//! after a bounded wait.
//!
//! Real in-process hubs on real PostgreSQL, real agents ([`SyncClient`]), and the
//! fault-injecting TCP proxy of `synchub_tests::proxy` between them.

use anyhow::{Context, ensure};
use reqwest::StatusCode;
use sqlx::Connection;
use std::time::{Duration, Instant};
use synchub_client::{OnFailure, SyncClient};
use synchub_hub::config::{BlobStoreConfig, Config};
use synchub_protocol::{AgentState, Head};
use synchub_tests::fixtures::{agent_config, commit, read_tree, wait_ready};
use synchub_tests::hub::TestHub;
use synchub_tests::postgres::test_database;
use synchub_tests::proxy::{Fault, FaultProxy, Splitter};

/// Replicas "a" and "b" on one fresh PostgreSQL database and one blob folder, each configured
/// further by `tweak`; the database URL and the folder (kept while it lives) come back too.
async fn two_replicas(
    tweak: fn(&mut Config),
) -> anyhow::Result<(TestHub, TestHub, (String, tempfile::TempDir))> {
    let url = test_database().await?;
    let blobs = tempfile::tempdir()?;
    let start = |id: &'static str| {
        let (url, blobs) = (url.clone(), blobs.path().to_path_buf());
        TestHub::start_with(move |c| {
            c.database_url = Some(url);
            c.blob_store = BlobStoreConfig::Fs { path: Some(blobs) };
            c.hub_id = Some(id.into());
            tweak(c);
        })
    };
    let a = start("a").await?;
    let b = start("b").await?;
    Ok((a, b, (url, blobs)))
}

async fn commit_ok(hub: &TestHub, base: u64, files: &[(&str, &[u8])]) -> anyhow::Result<Head> {
    let (status, body) = commit(hub, &hub.admin_token, base, files, &[]).await?;
    ensure!(status == StatusCode::CREATED, "commit: {status} {body}");
    Ok(serde_json::from_value(body["head"].clone())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_frozen_mid_download_is_left_for_the_next_url() -> anyhow::Result<()> {
    let (a, b, _db) = two_replicas(|c| c.ping_interval_ms = 500).await?;
    let proxy = FaultProxy::start(a.config.listen).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&a, &a.admin_token, dir.path());
    config.hubs = vec![proxy.url(), b.url.clone()];
    config.read_timeout_ms = 2000;
    config.max_backoff_ms = 1000;
    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, 1, Duration::from_secs(10)).await?;

    // About 5 MiB in 16 files too big for packs: the proxy freezes after the first MiB.
    let files: Vec<(String, Vec<u8>)> = (0..16u8)
        .map(|i| (format!("f{i:02}.bin"), vec![i; 300 * 1024]))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    proxy.freeze_after(1 << 20);
    let v2 = commit_ok(&a, 1, &refs).await?;
    let bumped = Instant::now();
    wait_ready(&agent, v2.version, Duration::from_secs(30))
        .await
        .context("the agent must finish on the second hub while the first is frozen")?;
    ensure!(
        proxy.fault() == Fault::Freeze,
        "the proxy froze during the download"
    );
    let took = bumped.elapsed();
    eprintln!("first hub frozen mid-download; finished on the second in {took:?}");
    let tree = read_tree(&dir.path().join("current"));
    assert_eq!(tree.len(), files.len());
    assert!(files.iter().all(|(p, b)| tree.get(p) == Some(b)));
    agent.shutdown().await;
    a.stop().await;
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pc_started_while_no_hub_answers_may_use_its_last_tree() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let proxy = FaultProxy::start(hub.config.listen).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &hub.admin_token, dir.path());
    config.hubs = vec![proxy.url()];
    config.on_failure = OnFailure::UnblockStale;
    config.boot_wait_ms = 1500;
    let v2 = commit_ok(&hub, 1, &[("a.txt", b"hello")]).await?;
    let agent = SyncClient::start(config.clone()).await?;
    wait_ready(&agent, v2.version, Duration::from_secs(10)).await?;
    agent.shutdown().await;

    // The PC reboots during a hub outage that answers nothing at all.
    proxy.set(Fault::Freeze);
    let started = Instant::now();
    let agent = SyncClient::start(config).await?;
    let mut states = agent.subscribe(None)?;
    let state = tokio::time::timeout(
        Duration::from_secs(10),
        states.wait_for(|s| !matches!(s, AgentState::Starting { .. })),
    )
    .await
    .context("the agent stayed `starting` with no hub")??
    .clone();
    assert!(
        matches!(
            state,
            AgentState::Failed {
                stale_allowed: true,
                ..
            }
        ),
        "{state:?}"
    );
    eprintln!("left `starting` after {:?}", started.elapsed());
    let access = agent.try_access(None)?.context("stale use is allowed")?;
    assert_eq!(access.version(), v2.version);
    assert_eq!(std::fs::read(access.path().join("a.txt"))?, b"hello");
    drop(access);

    // The hub answers again: the agent is ready without a restart.
    proxy.set(Fault::Pass);
    wait_ready(&agent, v2.version, Duration::from_secs(20)).await?;
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_socket_is_dropped_even_while_the_agent_downloads() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| c.ping_interval_ms = 500).await?;
    let ws = FaultProxy::start(hub.config.listen).await?;
    let web = FaultProxy::start(hub.config.listen).await?;
    let front = Splitter::start(ws.addr, web.addr).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &hub.admin_token, dir.path());
    config.hubs = vec![front.url()];
    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, 1, Duration::from_secs(10)).await?;
    ensure!(agent.status().hub.connected);

    // The download stalls after 1 MiB (the hub keeps TCP open), so the agent stays
    // `downloading`, sending status frames, while its socket goes silent.
    let files: Vec<(String, Vec<u8>)> = (0..16u8)
        .map(|i| (format!("f{i:02}.bin"), vec![i; 300 * 1024]))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    web.freeze_after(1 << 20);
    let v2 = commit_ok(&hub, 1, &refs).await?;
    let mut states = agent.subscribe(None)?;
    tokio::time::timeout(
        Duration::from_secs(10),
        states.wait_for(|s| matches!(s, AgentState::Downloading { .. })),
    )
    .await
    .context("the agent never started downloading")??;
    ws.set(Fault::Freeze);
    let frozen = Instant::now();
    while agent.status().hub.connected {
        ensure!(
            frozen.elapsed() < Duration::from_secs(5),
            "a socket silent for 3 ping intervals (1.5 s) was still up after 5 s of download: {:?}",
            agent.state(None)?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "silent socket dropped {:?} after the freeze, while {:?}",
        frozen.elapsed(),
        agent.state(None)?
    );
    ws.set(Fault::Pass);
    web.set(Fault::Pass);
    wait_ready(&agent, v2.version, Duration::from_secs(60)).await?;
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_agent_notices_a_bump_its_replica_missed() -> anyhow::Result<()> {
    // No timer re-read within the test: replica A stays behind.
    let (a, b, (url, _blobs)) = two_replicas(|c| c.reread_interval_ms = 600_000).await?;
    // A balancer that happens to put the socket on A and the HTTP calls on B.
    let front = Splitter::start(a.config.listen, b.config.listen).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&a, &a.admin_token, dir.path());
    config.hubs = vec![front.url()];
    config.head_check_interval_ms = 1000;
    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, 1, Duration::from_secs(10)).await?;

    // A misses the bump made on B: its notification is lost.
    let mut c = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("ALTER TABLE sync_metadata DISABLE TRIGGER synchub_notify_head")
        .execute(&mut c)
        .await?;
    c.close().await?;
    let v2 = commit_ok(&b, 1, &[("missed.txt", b"on b")]).await?;
    ensure!(a.state().heads.get("global_version").unwrap().head.version == 1);
    ensure!(agent.status().hub.connected);
    wait_ready(&agent, v2.version, Duration::from_secs(10))
        .await
        .context("a connected agent must notice a bump its replica missed")?;
    assert!(agent.status().hub.last_head_check.is_some());
    agent.shutdown().await;
    a.stop().await;
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_skipped_a_force_sync_still_reverifies() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let dir = tempfile::tempdir()?;
    let config = agent_config(&hub, &hub.admin_token, dir.path());
    let v2 = commit_ok(&hub, 1, &[("a.txt", b"hello world")]).await?;
    let agent = SyncClient::start(config.clone()).await?;
    wait_ready(&agent, v2.version, Duration::from_secs(10)).await?;
    agent.shutdown().await;

    // Damaged while the PC was off (same size, so only a hash check can tell).
    let file = dir.path().join("current/a.txt");
    let mut perms = std::fs::metadata(&file)?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms)?;
    std::fs::write(&file, b"HELLO WORLD")?;
    // An admin force-syncs, then someone publishes: the agent only ever sees the publish.
    let forced = synchub_tests::fixtures::http()
        .post(hub.api("/spaces/global_version/force-sync"))
        .bearer_auth(&hub.admin_token)
        .json(&serde_json::json!({"reason": "repair"}))
        .send()
        .await?;
    ensure!(
        forced.status() == StatusCode::CREATED,
        "force-sync: {}",
        forced.status()
    );
    let v4 = commit_ok(&hub, v2.version + 1, &[("b.txt", b"later")]).await?;
    assert!(!v4.forced);
    assert_eq!(v4.forced_version, v2.version + 1);

    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, v4.version, Duration::from_secs(10)).await?;
    assert_eq!(
        std::fs::read(dir.path().join("current/a.txt"))?,
        b"hello world",
        "the skipped force-sync must still re-verify every file"
    );
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_head_cancels_a_stalled_sync() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let ws = FaultProxy::start(hub.config.listen).await?;
    let web = FaultProxy::start(hub.config.listen).await?;
    let front = Splitter::start(ws.addr, web.addr).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &hub.admin_token, dir.path());
    config.hubs = vec![front.url()];
    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, 1, Duration::from_secs(10)).await?;

    let files: Vec<(String, Vec<u8>)> = (0..16u8)
        .map(|i| (format!("f{i:02}.bin"), vec![i; 300 * 1024]))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    web.freeze_after(1 << 20);
    let v2 = commit_ok(&hub, 1, &refs).await?;
    let mut states = agent.subscribe(None)?;
    tokio::time::timeout(
        Duration::from_secs(10),
        states.wait_for(
            |s| matches!(s, AgentState::Downloading { target, .. } if *target == v2.version),
        ),
    )
    .await
    .context("the agent never started downloading v2")??;

    // The download of v2 hangs (idle-read deadline 30 s); v3 is announced meanwhile.
    let v3 = commit_ok(&hub, v2.version, &[("small.txt", b"newer")]).await?;
    let announced = Instant::now();
    let state = tokio::time::timeout(
        Duration::from_secs(3),
        states.wait_for(|s| synchub_client::target_of(s) == Some(v3.version)),
    )
    .await
    .context("a newer head must cancel the sync in progress at once")??
    .clone();
    eprintln!(
        "sync for v{} started {:?} after it was announced: {state:?}",
        v3.version,
        announced.elapsed()
    );
    web.set(Fault::Pass);
    wait_ready(&agent, v3.version, Duration::from_secs(30)).await?;
    assert_eq!(
        std::fs::read(dir.path().join("current/small.txt"))?,
        b"newer"
    );
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
