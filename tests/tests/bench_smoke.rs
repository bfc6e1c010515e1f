//! Every benchmark scenario of `synchub-load` at a small size, through the library functions,
//! so the benchmarks keep compiling and working in CI. The full runs (scripts/bench/) stay out
//! of CI; these only check that the figures are complete and sane.
//!
//! The hub runs as a real process: cargo builds `synchub-load` for this test, and
//! `synchub-load hub ...` is the hub's own command line.

use std::time::Duration;
use synchub_protocol::DEFAULT_SPACE;
use synchub_tests::load::{self, BumpKind, DataSet, Hub, HubCommand, SpawnOptions};

fn spawn_options(postgres: bool) -> SpawnOptions {
    SpawnOptions {
        command: HubCommand {
            program: env!("CARGO_BIN_EXE_synchub-load").into(),
            leading_args: vec!["hub".into()],
        },
        postgres,
        poll_interval_ms: Some(50),
        extra_config: None,
    }
}

async fn fanout_smoke(postgres: bool) -> anyhow::Result<()> {
    let hub = Hub::spawn(&spawn_options(postgres)).await?;
    let opts = load::FanoutOptions {
        connections: 50,
        rounds: 2,
        connect_concurrency: 20,
        ..Default::default()
    };
    let report = load::fanout(&hub, &opts).await;
    let tail = hub.log_tail();
    hub.stop().await;
    let report = report.map_err(|e| e.context(format!("hub log: {tail}")))?;
    println!("{report}");
    assert_eq!(report.welcomed, 50);
    let rss = report.kib_per_connection.expect("the hub's pid is known");
    assert!(rss.is_finite(), "{rss}");
    assert!(report.hub_rss_after_kib.unwrap() > 0);
    assert_eq!(report.bumps.len(), 3, "force, commit and sql bumps");
    for (b, kind) in report.bumps.iter().zip(BumpKind::ALL) {
        assert_eq!(b.kind, kind);
        assert_eq!(b.expected, 100);
        assert_eq!(b.delivered, 100, "{kind:?}: every socket gets every bump");
        assert_eq!(b.missing, 0);
        assert!(b.p50_ms > 0.0, "{b:?}");
        assert!(
            b.p50_ms <= b.p90_ms && b.p90_ms <= b.p99_ms && b.p99_ms <= b.max_ms,
            "{b:?}"
        );
        assert!(
            b.last_ms_median <= b.max_ms && b.last_ms_median > 0.0,
            "{b:?}"
        );
    }
    let figures = report.figures();
    assert!(figures["force.p99_ms"] > 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_sqlite() {
    fanout_smoke(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_postgres() {
    fanout_smoke(true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_head_checks() {
    let hub = Hub::spawn(&spawn_options(false)).await.unwrap();
    for not_modified in [true, false] {
        let r = load::fallback_builtin(
            &hub,
            DEFAULT_SPACE,
            not_modified,
            4,
            Duration::from_millis(500),
        )
        .await
        .unwrap();
        println!("{r}");
        assert!(r.requests > 0 && r.requests_per_sec > 0.0, "{r:?}");
        assert_eq!(
            r.errors,
            0,
            "every answer is {}",
            if not_modified { 304 } else { 200 }
        );
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_and_publish() {
    let hub = Hub::spawn(&spawn_options(false)).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let set = DataSet::QrLike {
        folders: 4,
        files: 20,
    };
    let r = load::download(&hub, set, work.path()).await.unwrap();
    println!("{r}");
    assert_eq!(r.files, 20);
    assert!(r.bytes > 20 * 4000);
    assert!(
        r.publish_secs > 0.0 && r.cold_secs > 0.0 && r.warm_secs > 0.0,
        "{r:?}"
    );
    assert!(r.cold_mb_per_sec > 0.0);

    let src = work.path().join("again");
    load::generate_set(DataSet::SmallFiles { files: 20 }, &src, 5).unwrap();
    let p = load::publish_set(&hub, DEFAULT_SPACE, &src, DataSet::SmallFiles { files: 20 })
        .await
        .unwrap();
    println!("{p}");
    assert_eq!(p.files, 20);
    assert!(p.secs > 0.0 && p.version > 0);

    let large = tempfile::tempdir().unwrap();
    let r = load::download(&hub, DataSet::Large { bytes: 3 << 20 }, large.path())
        .await
        .unwrap();
    println!("{r}");
    assert_eq!(r.files, 2);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_postgres() {
    let hub = Hub::spawn(&spawn_options(true)).await.unwrap();
    let r = load::idle_pg(
        &hub,
        20,
        Duration::from_millis(500),
        Duration::from_secs(1),
        2,
    )
    .await
    .unwrap();
    println!("{r}");
    hub.stop().await;
    assert_eq!(r.windows.len(), 2);
    // Idle agents cost the database nothing per agent: a hub that touched it for each socket
    // (per ping, per status) would show at least one transaction per agent per second.
    for w in &r.windows {
        assert!(w.secs >= 1.0, "{w:?}");
        assert!(
            w.transactions_per_sec < r.agents as f64,
            "{} idle agents made {w:?}",
            r.agents
        );
    }
}

/// The herd at a small size: every simulated agent holds every new version (manifest hash
/// and every blob's hash checked), its report is stored, and nothing failed for good; a 1-file
/// bump and a force-sync fetch nothing over HTTP (the delta and the one new blob ride in the
/// frame), a 50-file bump the blobs the frame has no room for.
async fn herd_smoke(
    postgres: bool,
    s3: bool,
    agents: usize,
    case_timeout: Duration,
) -> anyhow::Result<()> {
    synchub_hub::server::raise_open_file_limit();
    let mut spawn = spawn_options(postgres);
    if s3 {
        let bucket = synchub_tests::s3::test_bucket().await?;
        spawn.extra_config = Some(load::s3_blob_store_config(&bucket));
    }
    let hub = Hub::spawn(&spawn).await?;
    let work = tempfile::tempdir()?;
    let opts = load::HerdOptions {
        agents,
        connect_concurrency: 25,
        case_timeout,
        ..Default::default()
    };
    let report = load::herd(&hub, &opts, work.path()).await;
    let tail = hub.log_tail();
    let logged = sync_log_client_ids(&hub).await;
    hub.stop().await;
    let report = report.map_err(|e| e.context(format!("hub log: {tail}")))?;
    // Each agent reports under the id its socket said `hello` with, as the agent does (a
    // report under an id the hub has not bound costs it a database lookup in the rush).
    let hello: std::collections::BTreeSet<String> = (0..agents).map(load::client_id).collect();
    let logged = logged?;
    assert!(
        !logged.is_empty() && logged.is_subset(&hello),
        "reports under ids no socket said hello with: {:?}",
        logged.difference(&hello).take(3).collect::<Vec<_>>()
    );
    println!("{report}");
    assert_eq!(report.set_files, 508, "the QR set");
    assert_eq!(report.cases.len(), 3);
    for (c, case) in report.cases.iter().zip(load::HerdCase::ALL) {
        assert_eq!(c.case, case);
        assert_eq!(
            c.converged, agents,
            "{case:?}: every agent holds the new version"
        );
        assert_eq!(c.reports, agents as u64, "{case:?}: every report is stored");
        assert_eq!(c.failed, 0, "{case:?}: {c:?}");
        assert!(
            c.p50_ms > 0.0 && c.p50_ms <= c.p99_ms && c.p99_ms <= c.last_ms,
            "{c:?}"
        );
        assert!(
            c.hub_cpu_secs.is_some() && c.hub_peak_rss_kib.is_some(),
            "{c:?}"
        );
    }
    let (one, fifty, force) = (&report.cases[0], &report.cases[1], &report.cases[2]);
    // The manifest delta rides in the frame, and so does a 1-file change's new blob (4-6 KB):
    // a small change or a force-sync fetches nothing over HTTP.
    assert_eq!(one.bytes, 0, "the one new blob rode in the frame: {one:?}");
    assert_eq!(force.bytes, 0, "a force-sync fetches nothing: {force:?}");
    // 50 new blobs of 4-6 KB: the frame carries at most 32 KiB of them, the pack the rest.
    assert!(
        fifty.bytes >= agents as u64 * 40 * 4000 && fifty.bytes < agents as u64 * 50 * 8000,
        "50 changed files: {fifty:?}"
    );
    Ok(())
}

/// The client ids of the hub's `sync_log` rows.
async fn sync_log_client_ids(hub: &Hub) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let rows: Vec<synchub_protocol::SyncLogEntry> = hub.admin_get("/sync-log?limit=1000").await?;
    Ok(rows
        .into_iter()
        .map(|r| r.client_id.unwrap_or_default())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_sqlite_fs() {
    herd_smoke(false, false, 50, Duration::from_secs(60))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_postgres_s3() {
    // Few agents: the hub reads a pack's blobs from S3 one after the other, and moto answers
    // a few dozen reads per second, so 50 changed files cost each agent seconds.
    herd_smoke(true, true, 5, Duration::from_secs(180))
        .await
        .unwrap();
}

/// A herd held back by a tight download bound: agents are answered `503 busy` and all still
/// converge, and the hub does not log those answers as errors (a rush is routine; thousands
/// of ERROR lines would bury a real one and cost the hub CPU in the rush).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_put_off_by_admission_is_not_logged_as_errors() {
    let mut spawn = spawn_options(false);
    spawn.extra_config =
        Some("[limits]\nmax_concurrent_downloads = 1\ndownload_queue_ms = 0".into());
    let hub = Hub::spawn(&spawn).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let opts = load::HerdOptions {
        agents: 30,
        connect_concurrency: 25,
        case_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let report = load::herd(&hub, &opts, work.path()).await;
    let log = hub.log_text();
    hub.stop().await;
    let report = report.unwrap();
    let throttled: u64 = report.cases.iter().map(|c| c.throttled).sum();
    assert!(
        throttled > 0,
        "one slot for 30 agents refuses some: {report}"
    );
    for c in &report.cases {
        assert_eq!(c.converged, 30, "{c:?}");
        assert_eq!(c.failed, 0, "{c:?}");
    }
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "{throttled} busy answers logged {} ERROR lines, e.g. {:?}",
        errors.len(),
        errors.first()
    );
}

/// The fan-out's peer at a small size: nginx with the nchan module is started on loopback,
/// every subscriber gets every publish, and nginx's CPU per frame is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nchan_peer() {
    let opts = load::NchanOptions {
        subscribers: 50,
        rounds: 2,
        workers: 1,
    };
    let r = load::nchan_fanout(&opts).await.unwrap();
    println!("{r}");
    assert_eq!(r.delivered, 100, "{r}");
    assert_eq!(r.missing, 0, "{r}");
    assert!(r.p50_ms > 0.0 && r.p50_ms <= r.p99_ms, "{r}");
    assert!(r.server_cpu_us_per_frame.is_some(), "{r}");
}

/// The write-loop floor at a small size: every connection gets every frame, and the server's
/// CPU per frame is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_loop_floor() {
    let r = load::write_loop_floor(env!("CARGO_BIN_EXE_synchub-load").into(), 50, 2)
        .await
        .unwrap();
    println!("{r}");
    assert!(r.p50_ms > 0.0 && r.p50_ms <= r.p99_ms, "{r:?}");
    assert!(r.last_ms_median >= r.p50_ms, "{r:?}");
    assert!(r.server_cpu_us_per_frame.is_some(), "{r:?}");
    assert!(r.frame_bytes > 100, "{r:?}");
}

/// The interleaved comparison at a small size: the three servers one after the other in the
/// order of the run's turn, every socket of each getting every frame, and the ratios of the
/// hub's times to the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_interleaved() {
    let opts = load::PeersOptions {
        fanout: load::FanoutOptions {
            connections: 50,
            rounds: 2,
            connect_concurrency: 20,
            kinds: vec![BumpKind::Force],
            ..Default::default()
        },
        nchan_workers: 1,
        me: env!("CARGO_BIN_EXE_synchub-load").into(),
        turn: 2,
    };
    let r = load::peers(&spawn_options(false), &opts).await.unwrap();
    println!("{r}");
    assert_eq!(
        r.order,
        ["floor", "hub", "nchan"],
        "the third run starts with the floor"
    );
    assert_eq!(r.hub.bumps.len(), 1, "force-syncs only");
    assert_eq!(r.hub.bumps[0].delivered, 100, "{r}");
    assert_eq!(r.nchan.missing, 0, "{r}");
    assert_eq!(r.floor.connections, 50, "{r}");
    let f = r.figures();
    let hub_last = f["hub.force.last_ms"];
    for peer in ["nchan", "floor"] {
        let ratio = f[&format!("ratio.hub_last_over_{peer}")];
        let expected = hub_last / f[&format!("{peer}.last_ms")];
        assert!(
            (ratio - expected).abs() < 1e-9,
            "{peer}: {ratio} against {expected}"
        );
    }
}

/// The old way at a small size: every client reads every file of the QR set from PostgreSQL,
/// each file's hash checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_way_postgres() {
    let cluster = tokio::task::spawn_blocking(synchub_tests::postgres::PgCluster::start)
        .await
        .unwrap()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let r = load::old_way(&cluster, 5, work.path()).await.unwrap();
    println!("{r}");
    assert_eq!(r.files, 508);
    assert_eq!(r.failed, 0, "{r:?}");
    assert!(
        r.bytes >= 5 * 2_400_000,
        "every client read the whole set: {r:?}"
    );
    assert!(r.p50_ms > 0.0 && r.p50_ms <= r.last_ms, "{r:?}");
}
