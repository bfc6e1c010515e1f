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
