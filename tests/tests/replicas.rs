//! Several hub replicas on one PostgreSQL database and one S3 blob store, as production runs
//! them behind a load balancer: a commit on one replica reaches agents on the other (and the
//! other serves its manifest and blobs), a plain SQL bump reaches every replica, a PostgreSQL
//! restart loses nothing, idle agents and the 1-second fallback cost the database nothing, and
//! a whole hub adopts system 1's existing database.
//!
//! Every replica is a real in-process hub ([`TestHub`]) on its own port; PostgreSQL and the S3
//! server (moto) are real servers started by the harness.

use anyhow::{Context, bail, ensure};
use futures::future::join_all;
use reqwest::StatusCode;
use sqlx::Connection;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use synchub_client::{HubApi, SyncClient};
use synchub_hub::config::BlobStoreConfig;
use synchub_protocol::{
    CommitRequest, CommitResponse, DEFAULT_SPACE, Head, Manifest, ManifestEntry, Role, Sha256Hex,
    SyncLogEntry,
};
use synchub_tests::fixtures::{self, agent_config, commit, http, read_tree};
use synchub_tests::hub::{TestHub, WsAgent};
use synchub_tests::postgres::{PgCluster, test_database};
use synchub_tests::requests::in_default_space;
use synchub_tests::s3::test_bucket;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn init() {
    synchub_hub::server::raise_open_file_limit();
    synchub_hub::blobs::s3::install_crypto_provider();
    synchub_client::install_crypto_provider();
}

/// `n` replicas on the database at `url`, sharing one fresh S3 bucket.
async fn replicas(url: &str, n: usize) -> anyhow::Result<Vec<TestHub>> {
    let s3 = test_bucket().await?;
    let mut hubs = Vec::new();
    for i in 0..n {
        let hub = TestHub::start_with(|c| {
            c.database_url = Some(url.to_owned());
            c.blob_store = BlobStoreConfig::S3(s3.clone());
            c.hub_id = Some(format!("replica-{i}"));
            // Many bare agents share one token here.
            c.limits.max_sockets_per_token = 0;
            // Bare `WsAgent`s do not answer pings; the idle test outlasts three default
            // intervals.
            c.ping_interval_ms = 60_000;
            // The timer re-read is the hub's one deliberate query at idle (two statements per
            // interval, see docs/SCALING.md); the idle test measures everything else.
            c.reread_interval_ms = 600_000;
        })
        .await
        .with_context(|| format!("starting replica {i}"))?;
        hubs.push(hub);
    }
    Ok(hubs)
}

/// Connects a bare agent to `hub`, retrying while the replica has not yet learned of a token
/// made on another replica (the token table's NOTIFY is on its way).
async fn connect(hub: &TestHub, token: &str) -> anyhow::Result<WsAgent> {
    let deadline = Instant::now() + WAIT;
    loop {
        match WsAgent::connect(hub, token, &[DEFAULT_SPACE]).await {
            Ok(agent) => return Ok(agent),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context(format!("connecting an agent to {}", hub.url)),
        }
    }
}

/// Commits and expects success; returns the new head.
async fn commit_ok(
    hub: &TestHub,
    token: &str,
    base: u64,
    files: &[(&str, &[u8])],
) -> anyhow::Result<Head> {
    let (status, body) = commit(hub, token, base, files, &[]).await?;
    ensure!(
        status == StatusCode::CREATED,
        "commit on {}: {status} {body}",
        hub.url
    );
    Ok(serde_json::from_value::<CommitResponse>(body)?.head)
}

/// Waits until `hub` serves `version` (a change made through another replica arrives by
/// NOTIFY, within milliseconds).
async fn wait_head(hub: &TestHub, token: &str, version: u64) -> anyhow::Result<Head> {
    let deadline = Instant::now() + WAIT;
    loop {
        let head = fixtures::head(hub, token).await?;
        if head.version >= version {
            return Ok(head);
        }
        ensure!(
            Instant::now() < deadline,
            "{} still serves version {} after {WAIT:?}, expected {version}",
            hub.url,
            head.version
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A plain SQL bump of the version row on a connection of its own, as psql would make it.
async fn sql_bump(url: &str) -> anyhow::Result<()> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query(
        "UPDATE sync_metadata SET version = version + 1, last_modified_by = 'psql' \
         WHERE sync_key = 'global_version'",
    )
    .execute(&mut c)
    .await?;
    c.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_on_one_replica_reaches_agents_on_another() -> anyhow::Result<()> {
    init();
    let url = test_database().await?;
    let mut hubs = replicas(&url, 2).await?;
    let (b, a) = (hubs.pop().unwrap(), hubs.pop().unwrap());
    // Made through A; B learns of it through the token table's NOTIFY.
    let token = a.token("pc", Role::Agent, None).await?;
    let mut on_b = connect(&b, &token).await?;
    assert_eq!(on_b.welcome_heads[0].version, 1);

    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            (
                format!("Cluj/Liceul_{i}.json"),
                format!("{{\"n\":{i}}}").into_bytes(),
            )
        })
        .chain([("arhiva/big.bin".to_string(), vec![42u8; 200_000])])
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let new = commit_ok(&a, &token, 1, &refs).await?;
    let committed = Instant::now();
    let announced = on_b.next_sync_required(WAIT).await?;
    eprintln!(
        "commit on A reached an agent on B {:?} after A answered the commit",
        committed.elapsed()
    );
    assert_eq!(announced, new);
    assert_eq!(fixtures::head(&b, &token).await?, new);

    // B serves that version: its manifest, and every blob A stored, byte for byte.
    let manifest_path = in_default_space(&format!("/versions/{}/manifest", new.version));
    let manifest_bytes = b.get_bytes(&manifest_path, &token).await?;
    assert_eq!(Sha256Hex::of(&manifest_bytes), new.data_hash);
    let manifest = Manifest::from_canonical(&manifest_bytes, 1000)?;
    assert_eq!(manifest.len(), files.len());
    for (path, body) in &files {
        let entry = manifest
            .get(path)
            .context("path missing from the manifest")?;
        let got = b
            .get(&format!("/blobs/{}", entry.sha256), &token)
            .send()
            .await?;
        assert_eq!(got.status(), StatusCode::OK, "blob of {path} on B");
        assert_eq!(&got.bytes().await?[..], &body[..], "blob of {path} on B");
    }

    // A real agent on B converges to what is published through A.
    let dir = tempfile::tempdir()?;
    let client = SyncClient::start(agent_config(&b, &token, dir.path())).await?;
    client
        .wait_ready(None, new.version, WAIT)
        .await
        .with_context(|| format!("agent on B: {:?}", client.status()))?;
    let src = tempfile::tempdir()?;
    for folder in ["04313-11100-F", "Y129120-01780"] {
        std::fs::create_dir_all(src.path().join(folder))?;
        for i in 0..20 {
            let body: Vec<u8> = format!("{folder}:{i}:")
                .bytes()
                .cycle()
                .take(4000 + i * 13)
                .collect();
            std::fs::write(src.path().join(folder).join(format!("qr_{i:04}.png")), body)?;
        }
    }
    let api_a = HubApi::new(vec![a.url.clone()], &token)?;
    let published = synchub_client::publish(
        &api_a,
        DEFAULT_SPACE,
        Some("qr"),
        &[src.path().to_path_buf()],
        Some("from A".into()),
    )
    .await?;
    assert_eq!(published.files, 40);
    client
        .wait_ready(None, published.head.version, WAIT)
        .await
        .with_context(|| format!("agent on B: {:?}", client.status()))?;
    let mut expected: BTreeMap<String, Vec<u8>> = files.into_iter().collect();
    for (p, bytes) in read_tree(src.path()) {
        expected.insert(format!("qr/{p}"), bytes);
    }
    assert_eq!(read_tree(&dir.path().join("current")), expected);
    assert_eq!(on_b.next_sync_required(WAIT).await?, published.head);

    client.shutdown().await;
    a.stop().await;
    b.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_bump_reaches_agents_on_every_replica_as_forced() -> anyhow::Result<()> {
    init();
    let url = test_database().await?;
    let hubs = replicas(&url, 2).await?;
    let token = hubs[0].token("pc", Role::Agent, None).await?;
    // Replica 1 learns of the token by NOTIFY: an agent it accepts shows it has.
    drop(connect(&hubs[1], &token).await?);
    let before = commit_ok(&hubs[1], &token, 1, &[("a.json", b"{}")]).await?;
    // Replica 0 learns of the commit by NOTIFY, a moment later.
    wait_head(&hubs[0], &token, before.version).await?;
    let mut agents = Vec::new();
    for hub in &hubs {
        for _ in 0..3 {
            let agent = connect(hub, &token).await?;
            assert_eq!(agent.welcome_heads[0], before);
            agents.push(agent);
        }
    }
    sql_bump(&url).await?;
    let mut seen = Vec::new();
    for agent in &mut agents {
        let h = agent.next_sync_required(WAIT).await?;
        assert_eq!(h.version, before.version + 1);
        assert!(h.forced, "an outside bump is forced: {h:?}");
        assert_eq!(h.data_hash, before.data_hash, "same data, announced again");
        assert_eq!(h.by.as_deref(), Some("psql"));
        seen.push(h);
    }
    // Both replicas announce the very same version record (one of them recorded it).
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:#?}");
    for hub in hubs {
        hub.stop().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_loses_no_bump() -> anyhow::Result<()> {
    init();
    // A private cluster: stopping the shared one would disturb the tests beside this one.
    let cluster = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await??);
    let url = cluster.create_database().await?;
    let hubs = replicas(&url, 2).await?;
    let token = hubs[0].token("pc", Role::Agent, None).await?;
    let mut agents = Vec::new();
    for hub in &hubs {
        agents.push(connect(hub, &token).await?);
    }
    let v1 = fixtures::head(&hubs[0], &token).await?;
    // Uploaded while the database is up (an upload records who sent it there); the commit
    // below names it while the database is down.
    let down_blob = fixtures::put_blob(&hubs[0], &token, b"x").await?;

    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop()).await??;
    let stopped_at = Instant::now();
    // Down for a few seconds: the listeners back off to retries seconds apart, so the bump
    // made right after the restart lands before they are back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for hub in &hubs {
        // Heads are served from memory and the process is alive.
        assert_eq!(fixtures::head(hub, &token).await?, v1);
        let health = http().get(format!("{}/healthz", hub.url)).send().await?;
        assert_eq!(health.status(), StatusCode::OK);
    }
    // What needs the database says it is unavailable (once the pool gives up waiting).
    let asked = Instant::now();
    let (ready, (status, body)) = tokio::join!(
        join_all(
            hubs.iter()
                .map(|hub| http().get(format!("{}/readyz", hub.url)).send())
        ),
        async {
            let request = CommitRequest {
                base_version: v1.version,
                puts: vec![ManifestEntry {
                    path: "down.txt".to_owned(),
                    size: 1,
                    sha256: down_blob.clone(),
                }],
                deletes: Vec::new(),
                message: None,
            };
            let r = http()
                .post(hubs[0].api(&in_default_space("/commits")))
                .bearer_auth(&token)
                .json(&request)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .expect("the commit request is answered");
            (
                r.status(),
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    );
    for r in ready {
        assert_eq!(r?.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")),
        "commit with the database down: {body}"
    );
    eprintln!(
        "with PostgreSQL down, /readyz and a commit answered {status} within {:?}",
        asked.elapsed()
    );

    let starting = cluster.clone();
    tokio::task::spawn_blocking(move || starting.start_again()).await??;
    let down = stopped_at.elapsed();
    // At once, before the listeners reconnected: only the re-read after a reconnect finds it.
    let bumped_at = Instant::now();
    sql_bump(&url).await?;
    for agent in &mut agents {
        let h = agent
            .next_sync_required(Duration::from_secs(20))
            .await
            .context("the bump made during the reconnect")?;
        assert_eq!(h.version, v1.version + 1);
        assert!(h.forced);
    }
    eprintln!(
        "PostgreSQL was down {down:?}; a bump made right after the restart was delivered in {:?}",
        bumped_at.elapsed()
    );

    // Commits work again, and their NOTIFY reaches the other replica.
    let next = commit_ok(&hubs[1], &token, v1.version + 1, &[("up.txt", b"y")]).await?;
    for agent in &mut agents {
        assert_eq!(agent.next_sync_required(WAIT).await?, next);
    }
    for hub in &hubs {
        let ready = http().get(format!("{}/readyz", hub.url)).send().await?;
        assert_eq!(ready.status(), StatusCode::OK);
    }
    for hub in hubs {
        hub.stop().await;
    }
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}

/// `xact_commit + xact_rollback` of the current database, after flushing this session's own
/// counters and dropping any cached stats snapshot.
async fn transactions(conn: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::BIGINT FROM pg_stat_database
          WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// Lines of the server log after byte `from` that record a statement by the hub
/// (`application_name` synchub).
fn hub_statements(log: &Path, from: u64) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read(log)?;
    let tail = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    Ok(tail
        .lines()
        .filter(|l| {
            l.contains("app=synchub ") && (l.contains("statement:") || l.contains("execute"))
        })
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_agents_and_fallback_checks_cost_no_database_work() -> anyhow::Result<()> {
    init();
    const AGENTS: usize = 300;
    const FALLBACK: usize = 100;
    const WINDOW: Duration = Duration::from_secs(10);
    // pg_stat counters of other sessions reach shared memory up to 10 s late
    // (PGSTAT_IDLE_INTERVAL).
    const STATS_DELAY: Duration = Duration::from_secs(11);

    let cluster = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await??);
    let url = cluster.create_database().await?;
    let mut probe = sqlx::PgConnection::connect(&url).await?;
    // Every statement logged with its application name, so any the hub makes can be named.
    // Autovacuum is not the hub's work; off, it cannot add noise to the count.
    for setting in [
        "ALTER SYSTEM SET log_statement = 'all'",
        "ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a '",
        "ALTER SYSTEM SET autovacuum = off",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(setting).execute(&mut probe).await?;
    }
    // Prepare this session's statements now (a first use costs one more transaction each), so
    // that every later reading is exactly three transactions.
    transactions(&mut probe).await?;
    let data_dir: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(&mut probe)
        .await?;
    let log = Path::new(&data_dir)
        .parent()
        .context("data directory has a parent")?
        .join("server.log");

    let hubs = replicas(&url, 2).await?;
    let token = hubs[0].token("pc", Role::Agent, None).await?;
    // The other replica has learned of the token (by NOTIFY) once it accepts an agent.
    drop(connect(&hubs[1], &token).await?);
    // Each hello's client id is bound by a background task, so set-up's writes can end after
    // the sockets are up: on a loaded machine their counters reached the window. Held back
    // here by a lock until after the connects, they must not count as idle work.
    let mut holder = sqlx::PgConnection::connect(&url).await?;
    for statement in [
        "BEGIN",
        "LOCK TABLE synchub_client_tokens IN EXCLUSIVE MODE",
    ] {
        sqlx::query(statement).execute(&mut holder).await?;
    }
    let agents = join_all((0..AGENTS).map(|i| connect(&hubs[i % 2], &token)))
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let held = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1800)).await;
        sqlx::query("COMMIT").execute(&mut holder).await?;
        holder.close().await
    });

    // The 1-second fallback of simulated agents: each its own HTTP client (connection), each
    // sending If-None-Match with the ETag it got last.
    let stop = CancellationToken::new();
    let requests = Arc::new(AtomicU64::new(0));
    let not_modified = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for i in 0..FALLBACK {
        let head_url = hubs[i % 2].api(&format!("/spaces/{DEFAULT_SPACE}/head"));
        let (token, stop) = (token.clone(), stop.clone());
        let (requests, not_modified, failures) =
            (requests.clone(), not_modified.clone(), failures.clone());
        loops.push(tokio::spawn(async move {
            let client = http();
            let mut etag: Option<String> = None;
            // Spread over the second, as real agents would be.
            tokio::time::sleep(Duration::from_millis((i as u64 * 10) % 1000)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let mut req = client.get(&head_url).bearer_auth(&token);
                if let Some(e) = &etag {
                    req = req.header("if-none-match", e);
                }
                requests.fetch_add(1, Ordering::Relaxed);
                match req.send().await {
                    Ok(r) if r.status() == StatusCode::NOT_MODIFIED => {
                        not_modified.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) if r.status().is_success() => {
                        etag = r
                            .headers()
                            .get("etag")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Set-up's own work reaches the counters late: the window starts once a whole STATS_DELAY
    // passed with no transaction but this test's readings.
    let mut start = transactions(&mut probe).await?;
    let mut settling = Vec::new();
    loop {
        tokio::time::sleep(STATS_DELAY).await;
        let now = transactions(&mut probe).await?;
        let period = now - start;
        settling.push(period);
        start = now;
        if period <= 3 {
            break;
        }
        ensure!(
            settling.len() < 4,
            "PostgreSQL never went quiet after set-up: {settling:?} transactions in successive \
             {STATS_DELAY:?} periods (3 are this test's readings)"
        );
    }
    held.await??;
    let log_from = std::fs::metadata(&log)?.len();
    let requests_before = requests.load(Ordering::Relaxed);
    tokio::time::sleep(WINDOW).await;
    let after_window = transactions(&mut probe).await?;
    let requests_in_window = requests.load(Ordering::Relaxed) - requests_before;
    // Counters the hub's sessions might still hold back arrive within STATS_DELAY.
    tokio::time::sleep(STATS_DELAY).await;
    let late = transactions(&mut probe).await?;
    stop.cancel();
    for l in loops {
        l.await?;
    }
    let statements = hub_statements(&log, log_from)?;
    let own_logged = std::fs::read_to_string(&log)?
        .get(log_from as usize..)
        .unwrap_or_default()
        .matches("pg_stat_clear_snapshot")
        .count();
    ensure!(
        own_logged >= 2,
        "log_statement=all is not in effect: this test's own readings are missing from {}",
        log.display()
    );

    // A reading counts the transactions before its own flush: the start reading's last two,
    // the end reading's first, so 3 per window, and 3 more per later reading.
    let in_window = after_window - start;
    let with_late = late - start;
    eprintln!(
        "idle PostgreSQL work: {in_window} transactions in {WINDOW:?}, of which 3 are this \
         test's readings ({with_late} counting counters flushed up to {STATS_DELAY:?} later, \
         of which 6 are the readings; set-up settled after {settling:?}) \
         with {AGENTS} WebSocket agents on 2 replicas and {FALLBACK} fallback checks/s \
         ({requests_in_window} head requests in the window, {} answered 304 overall, {} failed); \
         hub statements logged: {}",
        not_modified.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
        statements.len()
    );
    ensure!(
        statements.is_empty(),
        "the hub queried PostgreSQL at idle:\n{}",
        statements.join("\n")
    );
    ensure!(
        in_window <= 5,
        "{in_window} transactions in {WINDOW:?} at idle"
    );
    ensure!(
        with_late <= 8,
        "{with_late} transactions at idle, late counters included"
    );
    ensure!(
        failures.load(Ordering::Relaxed) == 0,
        "fallback head checks failed"
    );
    ensure!(
        requests_in_window >= (FALLBACK as u64) * 9,
        "the fallback loop ran only {requests_in_window} checks in {WINDOW:?}"
    );

    // Still connected, and still live: a bump reaches them all.
    let mut agents = agents;
    sql_bump(&url).await?;
    let results = join_all(agents.iter_mut().map(|a| a.next_sync_required(WAIT))).await;
    for r in results {
        ensure!(r?.forced, "an outside bump is forced");
    }
    drop(agents);
    probe.close().await?;
    for hub in hubs {
        hub.stop().await;
    }
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}

/// Rows system 1 wrote into its tables before any hub ran.
const OLD_ROWS: &str = "
INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_by, last_modified_at)
VALUES ('global_version', 41, 'legacy-md5-of-data', 'desktop-admin', '2026-03-04T05:06:07Z');
INSERT INTO sync_log (discord_id, sync_type, status, items_synced, error_message, synced_at)
VALUES ('111', 'download', 'success', 508, NULL, '2026-03-04T05:06:08Z'),
       ('222', 'force_sync', 'failed', 0, 'network down', '2026-03-04T05:07:00Z');
";

/// System 1's tables with those rows.
fn old_schema() -> String {
    format!("{}{OLD_ROWS}", synchub_tests::postgres::SYSTEM1_TABLES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_adopts_an_existing_system1_database() -> anyhow::Result<()> {
    init();
    let url = test_database().await?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::raw_sql(&old_schema()).execute(&mut conn).await?;
    let hubs = replicas(&url, 1)
        .await
        .context("a hub on system 1's database")?;
    let hub = &hubs[0];
    let token = hub.token("pc", Role::Agent, None).await?;

    // The hub knows the row's version but none of its data: it must not announce an empty
    // tree as version 41 (agents would apply it and allow use); the head says why instead.
    let r = hub.get(&in_default_space("/head"), &token).send().await?;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = r.text().await?;
    ensure!(body.contains("no data"), "{body}");
    let refused = WsAgent::connect(hub, &token, &[DEFAULT_SPACE]).await;
    let refused = format!(
        "{:#}",
        refused.err().context("a socket for a space without data")?
    );
    ensure!(refused.contains("no_data"), "{refused}");

    let log: Vec<SyncLogEntry> = hub
        .get_json("/sync-log?limit=100", &hub.admin_token)
        .await?;
    assert_eq!(log.len(), 2, "{log:#?}");
    // Newest first.
    assert_eq!(log[0].user.as_deref(), Some("222"));
    assert_eq!(log[0].sync_type, "force_sync");
    assert_eq!(log[0].status, "failed");
    assert_eq!(log[0].error_message.as_deref(), Some("network down"));
    assert_eq!(log[1].user.as_deref(), Some("111"));
    assert_eq!(log[1].items_synced, Some(508));
    assert_eq!(log[1].synced_at, "2026-03-04T05:06:08.000Z");

    let new = commit_ok(
        hub,
        &token,
        41,
        &[("arhiva/Cluj/Liceul_1.json", b"{\"a\":1}")],
    )
    .await?;
    assert_eq!(new.version, 42);
    let mut agent = connect(hub, &token).await?;
    assert_eq!(agent.welcome_heads, vec![new.clone()]);
    // The old app still reads its row where it expects it.
    let (version, by): (i32, Option<String>) = sqlx::query_as(
        "SELECT version, last_modified_by FROM sync_metadata WHERE sync_key = 'global_version'",
    )
    .fetch_one(&mut conn)
    .await?;
    assert_eq!(version, 42);
    ensure!(by.is_some(), "last_modified_by is set by a hub commit");
    // And a bump by the old app still reaches the hub's agents.
    sqlx::query("UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 'global_version'")
        .execute(&mut conn)
        .await?;
    let bumped = agent.next_sync_required(WAIT).await?;
    if bumped.version != 43 || !bumped.forced {
        bail!("old app's bump: {bumped:?}");
    }
    conn.close().await?;
    for hub in hubs {
        hub.stop().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_started_together_on_an_empty_database_all_come_up() -> anyhow::Result<()> {
    init();
    // A fresh deployment: every replica starts at once on a database none has migrated yet.
    for _ in 0..3 {
        let url = test_database().await?;
        let s3 = test_bucket().await?;
        let started = join_all((0..3).map(|i| {
            let (url, s3) = (url.clone(), s3.clone());
            TestHub::start_with(move |c| {
                c.database_url = Some(url);
                c.blob_store = BlobStoreConfig::S3(s3);
                c.hub_id = Some(format!("replica-{i}"));
            })
        }))
        .await;
        let mut hubs = Vec::new();
        for (i, hub) in started.into_iter().enumerate() {
            hubs.push(hub.with_context(|| format!("replica {i} of 3 started together"))?);
        }
        let token = hubs[0].token("pc", Role::Agent, None).await?;
        for hub in &hubs {
            assert_eq!(wait_head(hub, &token, 1).await?.version, 1);
        }
        for hub in hubs {
            hub.stop().await;
        }
    }
    Ok(())
}
