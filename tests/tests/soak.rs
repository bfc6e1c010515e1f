//! The soak: two hub replicas on one PostgreSQL, 20 agents spread over them through
//! fault-injecting proxies, commits and force-syncs all along while faults are injected at
//! random (an agent's proxy frozen, cut or reset; PostgreSQL restarted; a replica stopped and
//! restarted; one replica's database connections reset). At the end, with every fault lifted:
//! every agent reaches the final head within 5 s, no agent ever went back to a lower version, no
//! agent stayed `starting` or `downloading` past its deadline, and `sync_log` holds every
//! report exactly once (every outbox is empty, no report_id twice).
//!
//! `SYNCHUB_SOAK_SECS` sets how long faults are injected (default 40 s; `scripts/bench/soak`
//! runs it longer).

use anyhow::{Context, ensure};
use rand::Rng;
use reqwest::StatusCode;
use sqlx::Connection;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_client::SyncClient;
use synchub_hub::config::BlobStoreConfig;
use synchub_protocol::{AgentState, DEFAULT_SPACE, Head};
use synchub_tests::fixtures::{agent_config, commit, http};
use synchub_tests::hub::TestHub;
use synchub_tests::postgres::PgCluster;
use synchub_tests::proxy::{Fault, FaultProxy};

const AGENTS: usize = 20;
/// Longest an agent may stay `starting` or `downloading` (its deadlines: 2 s idle read, 1 s
/// backoff cap, 2 s boot wait, plus the time to download while other faults go on).
const STATE_DEADLINE: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(5);

/// What an agent was seen doing, checked at the end.
#[derive(Default)]
struct Watch {
    /// Versions seen `ready` that were lower than an earlier `ready`.
    went_back: Vec<(u64, u64)>,
    /// Longest time spent in `starting` or `downloading` at a stretch.
    longest_stuck: Duration,
}

fn watch_agent(agent: &SyncClient) -> anyhow::Result<Arc<Mutex<Watch>>> {
    let seen = Arc::new(Mutex::new(Watch::default()));
    let mut rx = agent.subscribe(None)?;
    let out = seen.clone();
    tokio::spawn(async move {
        let mut best = 0u64;
        let mut stuck_since: Option<Instant> = None;
        loop {
            let state = rx.borrow_and_update().clone();
            let stuck = matches!(
                state,
                AgentState::Starting { .. } | AgentState::Downloading { .. }
            );
            {
                let mut w = out.lock().expect("watch lock");
                match (stuck, stuck_since) {
                    (true, None) => stuck_since = Some(Instant::now()),
                    (false, Some(t)) => {
                        w.longest_stuck = w.longest_stuck.max(t.elapsed());
                        stuck_since = None;
                    }
                    _ => {}
                }
                if let Some(t) = stuck_since {
                    w.longest_stuck = w.longest_stuck.max(t.elapsed());
                }
                if let AgentState::Ready { version } = state {
                    if version < best {
                        w.went_back.push((best, version));
                    }
                    best = best.max(version);
                }
            }
            let tick = tokio::time::sleep(Duration::from_millis(500));
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tick => {}
            }
        }
    });
    Ok(seen)
}

async fn try_commit(hub: &TestHub, base: u64, n: u64) -> Option<Head> {
    let body = format!("change {n}");
    let (status, body) = commit(
        hub,
        &hub.admin_token,
        base,
        &[(&format!("f{}.txt", n % 7), body.as_bytes())],
        &[],
    )
    .await
    .ok()?;
    (status == StatusCode::CREATED)
        .then(|| serde_json::from_value(body["head"].clone()).ok())
        .flatten()
}

async fn try_force(hub: &TestHub) -> Option<Head> {
    let r = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/force-sync")))
        .bearer_auth(&hub.admin_token)
        .json(&serde_json::json!({"reason": "soak"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if r.status() != StatusCode::CREATED {
        return None;
    }
    let body: serde_json::Value = r.json().await.ok()?;
    serde_json::from_value(body["head"].clone()).ok()
}

async fn newest_head(url: &str) -> anyhow::Result<u64> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    let (v,): (i64,) =
        sqlx::query_as("SELECT version FROM sync_metadata WHERE sync_key = 'global_version'")
            .fetch_one(&mut c)
            .await?;
    c.close().await?;
    Ok(v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_random_faults_converges() -> anyhow::Result<()> {
    synchub_hub::server::raise_open_file_limit();
    let secs: u64 = std::env::var("SYNCHUB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let cluster = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await??);
    let url = cluster.create_database().await?;
    let pg_addr: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.port()).parse()?;
    // Replica 1 reaches PostgreSQL through a proxy, to cut its connections alone.
    let db_proxy = FaultProxy::start(pg_addr).await?;
    let url_via_proxy = url.replace(
        &format!(":{}/", cluster.port()),
        &format!(":{}/", db_proxy.addr.port()),
    );
    let blobs = tempfile::tempdir()?;
    let mut hubs = Vec::new();
    for (i, db) in [url.clone(), url_via_proxy].into_iter().enumerate() {
        let blobs = blobs.path().to_path_buf();
        hubs.push(
            TestHub::start_with(move |c| {
                c.database_url = Some(db);
                c.blob_store = BlobStoreConfig::Fs { path: Some(blobs) };
                c.hub_id = Some(format!("replica-{i}"));
                c.ping_interval_ms = 500;
                c.reread_interval_ms = 2000;
            })
            .await?,
        );
    }
    let token = hubs[0].admin_token.clone();

    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    let mut watches = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..AGENTS {
        let hub = &hubs[i % 2];
        let proxy = FaultProxy::start(hub.config.listen).await?;
        let dir = tempfile::tempdir()?;
        let mut config = agent_config(hub, &token, dir.path());
        config.hubs = vec![proxy.url()];
        config.read_timeout_ms = 2000;
        config.max_backoff_ms = 1000;
        config.boot_wait_ms = 2000;
        config.head_check_interval_ms = 2000;
        config.status_listen = None;
        let agent = SyncClient::start(config).await?;
        watches.push(watch_agent(&agent)?);
        agents.push(agent);
        proxies.push(proxy);
        dirs.push(dir);
    }

    // Faults and writes, for `secs`.
    let until = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    let mut faults = 0u32;
    // freeze, cut, reset (an agent's proxy), PostgreSQL restart, replica restart, DB reset.
    let mut kinds = [0u32; 6];
    let mut last_fault = Instant::now();
    while Instant::now() < until {
        n += 1;
        let hub = &hubs[(n % 2) as usize];
        if n.is_multiple_of(5) {
            let _ = try_force(hub).await;
        } else if let Ok(base) = newest_head(&url).await {
            let _ = try_commit(hub, base, n).await;
        }
        if n.is_multiple_of(3) {
            faults += 1;
            last_fault = Instant::now();
            // Every kind in turn (so a short run has each at least once), the target at random.
            let pick = faults as usize % 6;
            kinds[pick] += 1;
            match pick {
                0..=2 => {
                    let p = &proxies[rand::rng().random_range(0..AGENTS)];
                    let fault = [Fault::Freeze, Fault::Cut, Fault::Reset][pick];
                    p.set(fault);
                    let hold = rand::rng().random_range(300..2500);
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    p.set(Fault::Pass);
                }
                3 => {
                    let c = cluster.clone();
                    tokio::task::spawn_blocking(move || c.restart()).await??;
                }
                4 => {
                    let i = rand::rng().random_range(0..2);
                    hubs[i].stop_keep().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    hubs[i].restart().await?;
                }
                _ => {
                    db_proxy.set(Fault::Reset);
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    db_proxy.set(Fault::Pass);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let since_fault = last_fault.elapsed();

    // Every fault lifted: one last commit, and everyone must get it.
    let final_head = loop {
        let base = newest_head(&url).await?;
        if let Some(h) = try_commit(&hubs[0], base, n + 1).await {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let committed = Instant::now();
    for (i, agent) in agents.iter().enumerate() {
        let left = CONVERGE.saturating_sub(committed.elapsed());
        agent
            .wait_ready(None, final_head.version, left)
            .await
            .with_context(|| {
                format!(
                    "agent {i} did not reach v{} within {CONVERGE:?}",
                    final_head.version
                )
            })?;
    }
    let converged = committed.elapsed();
    ensure!(
        since_fault + converged <= CONVERGE,
        "the final head reached every agent {:?} after the last fault",
        since_fault + converged
    );
    eprintln!(
        "soak: {secs} s, {faults} faults (freeze/cut/reset/pg-restart/replica-restart/db-reset: \
         {kinds:?}), {n} writes; final head v{} reached by all {AGENTS} agents \
         {converged:?} after its commit ({:?} after the last fault)",
        final_head.version,
        since_fault + converged
    );

    for (i, w) in watches.iter().enumerate() {
        let w = w.lock().expect("watch lock");
        ensure!(
            w.went_back.is_empty(),
            "agent {i} went back: {:?}",
            w.went_back
        );
        ensure!(
            w.longest_stuck <= STATE_DEADLINE,
            "agent {i} stayed starting/downloading {:?}",
            w.longest_stuck
        );
    }
    let worst = watches
        .iter()
        .map(|w| w.lock().expect("watch lock").longest_stuck)
        .max()
        .unwrap_or_default();
    eprintln!("soak: longest stretch in starting/downloading: {worst:?}");

    // Every report reaches sync_log once.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pending: usize = dirs
            .iter()
            .map(|d| {
                std::fs::read_dir(d.path().join(".synchub/outbox"))
                    .map(|r| {
                        r.flatten()
                            .filter(|e| e.path().extension().is_some_and(|x| x != "tmp"))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum();
        if pending == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{pending} report(s) still in outboxes (or set aside)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = sqlx::PgConnection::connect(&url).await?;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT report_id) FROM sync_log")
            .fetch_one(&mut c)
            .await?;
    c.close().await?;
    ensure!(
        rows == distinct,
        "{rows} sync_log rows for {distinct} reports"
    );
    ensure!(rows > AGENTS as i64, "only {rows} reports");

    for agent in agents {
        agent.shutdown().await;
    }
    for hub in hubs {
        hub.stop().await;
    }
    drop(proxies);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
