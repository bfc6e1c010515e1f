//! System 1's real data reaching the PCs: a PostgreSQL with the old app's schema and rows
//! (`sync_metadata` at version 7, cities/institutions/employees, legacy `sync_log` rows) and a
//! moto bucket with its `arhiva/` JSON files. The hub starts on them with a table source and a
//! bucket source; agents end with the tables as JSON byte-identical to a dump this test makes
//! itself and with the archive files; the old app's `UPDATE employees` + version bump makes one
//! version; a new archive object arrives; an agent with `--include 'arhiva/Cluj/**'` holds
//! exactly that part. Also: only configured spaces are served, a space adopted without data is
//! not announced as data, outside bumps are recorded truthfully, legacy log rows are listed.

use anyhow::{Context, bail, ensure};
use sqlx::Connection;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use synchub_client::SyncClient;
use synchub_hub::config::TableSource;
use synchub_protocol::{DEFAULT_SPACE, Head, Manifest, Role, SyncLogEntry, VersionInfo};
use synchub_tests::fixtures::{agent_config, read_tree, wait_ready};
use synchub_tests::hub::TestHub;
use synchub_tests::postgres::{SYSTEM1_DATA_TABLES, SYSTEM1_TABLES, test_database};
use synchub_tests::requests::in_default_space;
use synchub_tests::s3::{moto_server, put_object, test_bucket};

const WAIT: Duration = Duration::from_secs(20);
const TABLES: [&str; 3] = ["cities", "institutions", "employees"];

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    synchub_hub::server::raise_open_file_limit();
    synchub_hub::blobs::s3::install_crypto_provider();
    synchub_client::install_crypto_provider();
}

/// The old app's rows: 10 cities, 50 institutions, 300 employees, its version row at 7, a row
/// of a space the hub is not configured for, a row of a configured space without any data, and
/// two legacy `sync_log` rows (no space).
fn old_rows() -> String {
    let cities = [
        "Cluj",
        "Iași",
        "Brașov",
        "Timișoara",
        "Constanța",
        "Sibiu",
        "Oradea",
        "Arad",
        "Bacău",
        "Suceava",
    ];
    let mut sql = String::new();
    for (i, c) in cities.iter().enumerate() {
        sql += &format!("INSERT INTO cities (id, name) VALUES ({}, '{c}');\n", i + 1);
    }
    for i in 1..=50 {
        let city = (i - 1) % 10 + 1;
        sql += &format!(
            "INSERT INTO institutions (id, city_id, name) VALUES ({i}, {city}, 'Liceul \"Nr. {i}\"');\n"
        );
    }
    for i in 1..=300 {
        let inst = (i - 1) % 50 + 1;
        let score = if i % 37 == 0 {
            "NULL".to_owned()
        } else {
            format!("{}.{:02}", i % 10, i % 100)
        };
        sql += &format!(
            "INSERT INTO employees (id, institution_id, name, score, active)
             VALUES ({i}, {inst}, 'Ștefan O''Neil {i}', {score}, {});\n",
            i % 7 != 0
        );
    }
    sql += "
SELECT setval('cities_id_seq', 10); SELECT setval('institutions_id_seq', 50);
SELECT setval('employees_id_seq', 300);
INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_by, last_modified_at)
VALUES ('global_version', 7, 'legacy-md5', 'desktop-admin', '2026-03-04T05:06:07Z'),
       ('old_experiment', 3, NULL, 'someone', '2026-01-01T00:00:00Z'),
       ('qr', 5, NULL, 'desktop-admin', '2026-01-01T00:00:00Z');
INSERT INTO sync_log (discord_id, sync_type, status, items_synced, synced_at)
VALUES ('111', 'download', 'success', 508, '2026-03-04T05:06:08Z'),
       ('222', 'force_sync', 'failed', 0, '2026-03-04T05:07:00Z');
";
    sql
}

/// The tables as the hub must write them, made here from typed columns: rows by primary key,
/// keys in column order, one row per line.
async fn dump(conn: &mut sqlx::PgConnection, table: &str) -> anyhow::Result<Vec<u8>> {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let rows: Vec<String> = match table {
        "cities" => sqlx::query_as::<_, (i32, String)>("SELECT id, name FROM cities ORDER BY id")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|(id, name)| format!("{{\"id\":{id},\"name\":{}}}", q(&name)))
            .collect(),
        "institutions" => sqlx::query_as::<_, (i32, i32, String)>(
            "SELECT id, city_id, name FROM institutions ORDER BY id",
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(id, city, name)| {
            format!("{{\"id\":{id},\"city_id\":{city},\"name\":{}}}", q(&name))
        })
        .collect(),
        "employees" => sqlx::query_as::<_, (i32, i32, String, Option<String>, bool)>(
            "SELECT id, institution_id, name, score::TEXT, active FROM employees ORDER BY id",
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(id, inst, name, score, active)| {
            format!(
                "{{\"id\":{id},\"institution_id\":{inst},\"name\":{},\"score\":{},\"active\":{active}}}",
                q(&name),
                score.as_deref().unwrap_or("null")
            )
        })
        .collect(),
        other => bail!("no dump for {other}"),
    };
    Ok(format!("[\n{}\n]\n", rows.join(",\n")).into_bytes())
}

async fn manifest(hub: &TestHub, token: &str, version: u64) -> anyhow::Result<Manifest> {
    let path = in_default_space(&format!("/versions/{version}/manifest"));
    let bytes = hub.get_bytes(&path, token).await?;
    Ok(Manifest::from_canonical(&bytes, 100_000)?)
}

/// Waits until `f` holds, checking every 5 ms; returns when it first held.
async fn until(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        if f() {
            return Ok(Instant::now());
        }
        ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn file(dir: &Path, path: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join("current").join(path)).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_old_apps_tables_and_bucket_reach_every_pc() -> anyhow::Result<()> {
    init();
    let url = test_database().await?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::raw_sql(&format!(
        "{SYSTEM1_TABLES}{SYSTEM1_DATA_TABLES}{}",
        old_rows()
    ))
    .execute(&mut conn)
    .await?;
    let bucket = test_bucket().await?;
    let mut archives: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (key, body) in [
        (
            "arhiva/Cluj/Liceul_1_2026-01-05_10-00-00.json",
            "{\"scores\":[1,2]}",
        ),
        (
            "arhiva/Cluj/Liceul_11_2026-01-06_11-30-00.json",
            "{\"scores\":[3]}",
        ),
        (
            "arhiva/Iași/Liceul_2_2026-01-05_09-00-00.json",
            "{\"scores\":[4]}",
        ),
        (
            "arhiva/Brașov/Liceul_3_2026-01-07_08-15-00.json",
            "{\"scores\":[]}",
        ),
    ] {
        put_object(&bucket.bucket, key, body.as_bytes()).await?;
        archives.insert(key.to_owned(), body.as_bytes().to_vec());
    }

    let moto = moto_server()?;
    let hub = TestHub::start_with(|c| {
        c.database_url = Some(url.clone());
        c.spaces = vec![DEFAULT_SPACE.to_owned(), "qr".to_owned()];
        c.table_source = vec![TableSource {
            space: DEFAULT_SPACE.to_owned(),
            tables: TABLES.iter().map(|t| t.to_string()).collect(),
            queries: BTreeMap::new(),
            debounce_ms: 300,
        }];
        c.bucket_source = vec![moto.bucket_source(&bucket.bucket, "arhiva", "arhiva/", 1)];
    })
    .await?;
    let token = hub.token("pcs", Role::Agent, None).await?;

    // Three PCs: two hold everything, one only Cluj's archives.
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut agents = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let mut config = agent_config(&hub, &token, d.path());
        if i == 2 {
            config.include = vec!["arhiva/Cluj/**".to_owned()];
        }
        agents.push(SyncClient::start(config).await?);
    }
    for a in &agents {
        wait_ready(a, 8, WAIT).await?;
    }

    // The full PCs hold the three tables exactly as the database dumps them, and the archives.
    let mut expected = archives.clone();
    for t in TABLES {
        expected.insert(format!("tables/{t}.json"), dump(&mut conn, t).await?);
    }
    for d in &dirs[..2] {
        assert_eq!(read_tree(&d.path().join("current")), expected);
    }
    let cluj: BTreeMap<_, _> = archives
        .iter()
        .filter(|(k, _)| k.starts_with("arhiva/Cluj/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(cluj.len(), 2);
    assert_eq!(read_tree(&dirs[2].path().join("current")), cluj);
    let verified = synchub_client::audit_tree(dirs[2].path(), |_, _| {})?;
    ensure!(verified.is_clean(), "{verified:?}");
    assert_eq!(
        verified.folders["arhiva"].expected_files, 2,
        "verify counts the part"
    );

    // Adoption did not announce version 7 as an empty dataset: the first served version is the
    // sources' content, and the history says so.
    let head: Head = hub.get_json(&in_default_space("/head"), &token).await?;
    assert_eq!(head.version, 8);
    let history: Vec<VersionInfo> = hub
        .get_json(&in_default_space("/versions"), &hub.admin_token)
        .await?;
    assert_eq!(history[0].head.version, 8);
    assert_eq!(history[0].entries, 7, "3 tables and 4 archives");

    // Only configured spaces are served; a configured space with no data is not ready data.
    let spaces: Vec<Head> = hub.get_json("/spaces", &token).await?;
    let names: Vec<_> = spaces.iter().map(|h| h.space.as_str()).collect();
    assert_eq!(
        names,
        [DEFAULT_SPACE],
        "no unconfigured or empty adopted space"
    );
    let r = hub
        .get("/spaces/old_experiment/head", &token)
        .send()
        .await?;
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    let r = hub.get("/spaces/qr/head", &token).send().await?;
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let message = r.text().await?;
    ensure!(message.contains("no data"), "{message}");
    // A PC following that space stays blocked and says why.
    let qr_dir = tempfile::tempdir()?;
    let mut qr_config = agent_config(&hub, &token, qr_dir.path());
    qr_config.spaces = vec!["qr".to_owned()];
    let qr_agent = SyncClient::start(qr_config).await?;
    until("the qr agent says the hub has no data", || {
        let s = qr_agent.status();
        s.hub
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no data"))
    })
    .await
    .with_context(|| format!("{:?}", qr_agent.status()))?;
    let qr_status = qr_agent.status();
    ensure!(
        !qr_status.spaces[0].allows_use,
        "blocked while the hub has no data: {qr_status:?}"
    );
    qr_agent.shutdown().await;

    // The old app changes a table and bumps its version row, as it always did: one new
    // version in which only tables/employees.json changed reaches every PC.
    let started = Instant::now();
    sqlx::query("UPDATE employees SET score = score + 1 WHERE id <= 5")
        .execute(&mut conn)
        .await?;
    sqlx::query("UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 'global_version'")
        .execute(&mut conn)
        .await?;
    let new_employees = dump(&mut conn, "employees").await?;
    let mut held_at = Vec::new();
    for d in &dirs[..2] {
        let at = until("the new employees.json on a PC", || {
            file(d.path(), "tables/employees.json").as_deref() == Some(&new_employees[..])
        })
        .await?;
        held_at.push(at);
    }
    let every_pc = held_at
        .iter()
        .max()
        .expect("two agents")
        .duration_since(started);
    eprintln!(
        "SQL UPDATE -> every agent holds the new tables/employees.json: {} ms",
        every_pc.as_millis()
    );
    for a in &agents {
        wait_ready(a, 9, WAIT).await?;
    }
    // Let the table trigger's debounce and a bucket listing pass: no second version.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let history: Vec<VersionInfo> = hub
        .get_json(&in_default_space("/versions"), &hub.admin_token)
        .await?;
    let versions: Vec<u64> = history.iter().map(|v| v.head.version).collect();
    assert_eq!(
        versions,
        [9, 8, 7],
        "one version for one bump: {history:#?}"
    );
    let changed = manifest(&hub, &token, 8)
        .await?
        .changed_paths(&manifest(&hub, &token, 9).await?);
    assert_eq!(changed, ["tables/employees.json"]);
    // Recorded truthfully: not the previous writer's name, the served manifest's size.
    let bump = &history[0];
    assert_eq!(
        bump.head.by, None,
        "a plain SQL bump names nobody: {bump:?}"
    );
    assert_eq!(bump.entries, 7);
    assert_eq!(bump.bytes, manifest(&hub, &token, 9).await?.total_size());
    ensure!(bump.head.at > history[1].head.at, "{bump:?}");

    // An archive uploaded the old way reaches the PCs, the Cluj one included.
    let key = "arhiva/Cluj/Liceul_21_2026-02-01_09-00-00.json";
    put_object(&bucket.bucket, key, b"{\"scores\":[9]}").await?;
    for d in &dirs {
        until("a new archive on a PC", || {
            file(d.path(), key).as_deref() == Some(&b"{\"scores\":[9]}"[..])
        })
        .await?;
    }
    for a in &agents {
        wait_ready(a, 10, WAIT).await?;
    }
    let part = read_tree(&dirs[2].path().join("current"));
    let paths: Vec<_> = part.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "arhiva/Cluj/Liceul_11_2026-01-06_11-30-00.json",
            "arhiva/Cluj/Liceul_1_2026-01-05_10-00-00.json",
            key,
        ]
    );

    // The log lists the old app's rows beside the agents' reports, which count what each PC
    // holds (the Cluj PC: its 3 files, not the space's 8) and what changed.
    let cluj_id = agents[2].status().client_id.clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let log: Vec<SyncLogEntry> = hub
            .get_json(
                &format!("/sync-log?space={DEFAULT_SPACE}&limit=1000"),
                &hub.admin_token,
            )
            .await?;
        let legacy = log.iter().filter(|e| e.space.is_none()).count();
        let cluj_report = log
            .iter()
            .find(|e| e.client_id.as_deref() == Some(cluj_id.as_str()) && e.version == Some(10));
        if legacy == 2
            && let Some(report) = cluj_report
        {
            // The part holds 3 files; version 10 brought one of them (the new archive).
            assert_eq!(report.items_total, Some(3), "{report:?}");
            assert_eq!(report.items_synced, Some(1), "{report:?}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "legacy rows {legacy}, Cluj report {cluj_report:?}: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for a in agents {
        a.shutdown().await;
    }
    hub.stop().await;
    conn.close().await?;
    Ok(())
}
