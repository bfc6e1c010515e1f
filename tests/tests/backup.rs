//! Backups and restores on SQLite + filesystem blobs (backing up into a folder) and on
//! PostgreSQL + S3 (moto; backing up into another bucket), through the real `synchub` program:
//! a hub wiped and restored keeps its heads, so a running `synchub-agent` that held the head
//! reconnects and stays ready without downloading anything; a second backup copies only the
//! new blobs; a backup that fails half-way is not listed and a restore takes the previous one;
//! a restore into a hub holding data (or into a blob store holding another hub's blobs) is
//! refused and changes nothing; the hub's schedule makes backups and prunes them (and blobs
//! only pruned backups named) to `keep`.

use anyhow::{Context, bail, ensure};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use synchub_hub::backup::target::{Target, TargetSpec};
use synchub_hub::config::{BlobStoreConfig, Config};
use synchub_hub::store::SyncLogFilter;
use synchub_protocol::{DEFAULT_SPACE, Role, Sha256Hex};
use synchub_tests::backend_matrix;
use synchub_tests::fixtures::{self, commit, http, workspace_binary};
use synchub_tests::hub::{TestHub, fs_blob_path};

/// The database, blob store and backup place of a suite run.
#[derive(Clone, Copy, Debug)]
enum Stack {
    /// SQLite, filesystem blobs, backups in a folder.
    SqliteFs,
    /// PostgreSQL, S3 blobs, backups in another bucket of the same S3 server.
    PostgresS3,
}

/// A hub of `stack` and a place for its backups (kept as long as the folder guard lives).
struct Setup {
    hub: TestHub,
    place: String,
    folders: tempfile::TempDir,
}

/// A fresh empty database and blob store of `stack` for `config` (a new data folder for
/// SQLite and filesystem blobs).
async fn empty_storage(stack: Stack, config: &mut Config, folder: &Path) -> anyhow::Result<()> {
    config.data_dir = folder.join(format!("data-{}", uuid::Uuid::new_v4().simple()));
    if let Stack::PostgresS3 = stack {
        config.database_url = Some(synchub_tests::postgres::test_database().await?);
        config.blob_store = BlobStoreConfig::S3(synchub_tests::s3::test_bucket().await?);
    }
    Ok(())
}

async fn start(stack: Stack, configure: impl FnOnce(&mut Config)) -> anyhow::Result<Setup> {
    let folders = tempfile::tempdir()?;
    let place = match stack {
        Stack::SqliteFs => folders.path().join("backups").display().to_string(),
        Stack::PostgresS3 => format!(
            "s3://{}/hub/backups",
            synchub_tests::s3::test_bucket().await?.bucket
        ),
    };
    let mut config = Config::for_data_dir(folders.path());
    empty_storage(stack, &mut config, folders.path()).await?;
    config.listen = "127.0.0.1:0".parse()?;
    config.poll_interval_ms = 50;
    configure(&mut config);
    let hub = TestHub::start_config(config).await?;
    Ok(Setup {
        hub,
        place,
        folders,
    })
}

/// Runs `synchub ARGS` on `config` (written to a file beside its data folder); the output.
fn synchub(config: &Config, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let file = config
        .data_dir
        .with_extension(format!("{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, toml::to_string(config)?)?;
    let output = std::process::Command::new(workspace_binary("synchub")?)
        .arg("--config")
        .arg(&file)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .context("running synchub")?;
    Ok(output)
}

/// `synchub ARGS --json` that must succeed: its JSON.
fn synchub_json(config: &Config, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut args = args.to_vec();
    args.push("--json");
    let out = synchub(config, &args)?;
    ensure!(
        out.status.success(),
        "synchub {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("synchub {args:?} printed {:?}", out.stdout))
}

fn backup(setup: &Setup) -> anyhow::Result<serde_json::Value> {
    synchub_json(&setup.hub.config, &["backup", "--to", &setup.place])
}

/// Ids of the complete backups `synchub backup --list` shows, newest first.
fn listed(setup: &Setup) -> anyhow::Result<Vec<String>> {
    let list = synchub_json(
        &setup.hub.config,
        &["backup", "--list", "--to", &setup.place],
    )?;
    Ok(list
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|b| b["id"].as_str().map(str::to_owned))
        .collect())
}

/// Commits `files` on `base` in the default space, expecting a new version.
async fn new_version(
    hub: &TestHub,
    token: &str,
    base: u64,
    files: &[(&str, &[u8])],
) -> anyhow::Result<()> {
    let (status, body) = commit(hub, token, base, files, &[]).await?;
    ensure!(status.is_success(), "commit on {base}: {status} {body}");
    Ok(())
}

/// A `synchub-agent run` process of the default space, its local API on a port of its own;
/// killed when dropped.
struct AgentProcess {
    _child: tokio::process::Child,
    status_url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl AgentProcess {
    fn start(hub: &TestHub, token: &str) -> anyhow::Result<AgentProcess> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = dir.path().join("agent.log");
        let child = tokio::process::Command::new(workspace_binary("synchub-agent")?)
            .args(["run", "--hub", &hub.url, "--space", DEFAULT_SPACE])
            .arg("--dir")
            .arg(dir.path().join("data"))
            .args(["--status-listen", &format!("127.0.0.1:{port}")])
            .env("SYNCHUB_TOKEN", token)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("agent.err"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting synchub-agent")?;
        Ok(AgentProcess {
            _child: child,
            status_url: format!("http://127.0.0.1:{port}/status"),
            log,
            dir,
        })
    }

    async fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(http()
            .get(&self.status_url)
            .timeout(Duration::from_secs(2))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Waits until the agent's status satisfies `wanted`; the error shows the last status and
    /// the agent's log.
    async fn wait_for(
        &self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok(status) = self.status().await {
                if wanted(&status) {
                    return Ok(status);
                }
                last = Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let err = std::fs::read_to_string(self.dir.path().join("agent.err")).unwrap_or_default();
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail = |s: &str| s.lines().rev().take(30).collect::<Vec<_>>().join("\n");
        bail!(
            "agent never {what}; last status {last:?}\nstderr (newest first):\n{}\nstdout:\n{}",
            tail(&err),
            tail(&out)
        )
    }

    fn tree(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        fixtures::read_tree(&self.dir.path().join("data").join("current"))
    }
}

fn space_status(status: &serde_json::Value) -> &serde_json::Value {
    &status["spaces"][0]
}

fn ready_at(status: &serde_json::Value, version: u64) -> bool {
    let space = space_status(status);
    status["hub"]["connected"] == true
        && space["state"] == "ready"
        && space["version"] == version
        && space["hub_version"] == version
}

/// Downloads (sync_log rows with bytes) the agent `client_id` reported.
async fn downloads(hub: &TestHub, client_id: &str) -> anyhow::Result<usize> {
    let filter = SyncLogFilter {
        client_id: Some(client_id.to_owned()),
        limit: 1000,
        ..SyncLogFilter::default()
    };
    let rows = hub.state().store.sync_log(&filter).await?;
    Ok(rows.iter().filter(|r| r.bytes.unwrap_or(0) > 0).count())
}

async fn a_restored_hub_keeps_its_heads_and_agents_download_nothing(
    stack: Stack,
) -> anyhow::Result<()> {
    let mut setup = start(stack, |_| {}).await?;
    let hub = &setup.hub;
    let pc = hub.token("publisher", Role::Publish, None).await?;
    let office = hub.token("office-pc", Role::Read, None).await?;
    new_version(hub, &pc, 1, &[("a.txt", b"alpha"), ("dir/b.txt", b"beta")]).await?;
    new_version(
        hub,
        &pc,
        2,
        &[("a.txt", b"alpha two"), ("c.bin", &[7; 5000])],
    )
    .await?;

    let agent = AgentProcess::start(hub, &office)?;
    let before = agent.wait_for("ready at v3", |s| ready_at(s, 3)).await?;
    let client_id = before["client_id"]
        .as_str()
        .context("client id")?
        .to_owned();
    let applied_at = space_status(&before)["applied_at"].clone();
    let tree = agent.tree();
    assert_eq!(tree["a.txt"], b"alpha two");
    // The agent's download report is in before the backup reads the database.
    let deadline = Instant::now() + Duration::from_secs(10);
    while downloads(hub, &client_id).await? == 0 {
        ensure!(
            Instant::now() < deadline,
            "the agent never reported its download"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reported = downloads(hub, &client_id).await?;

    let made = backup(&setup)?;
    let place = setup.place.clone();
    let hub = &mut setup.hub;
    assert_eq!(made["versions"], 3, "{made}");
    assert_eq!(made["spaces"][0]["version"], 3, "{made}");

    // The hub is lost: stopped, its database and blobs gone (a new, empty database and bucket
    // for PostgreSQL + S3).
    hub.stop_keep().await;
    agent
        .wait_for("noticed the hub is gone", |s| {
            s["hub"]["connected"] == false
        })
        .await?;
    match stack {
        Stack::SqliteFs => std::fs::remove_dir_all(hub.data_dir())?,
        Stack::PostgresS3 => {
            let folder = hub.data_dir().parent().context("folder")?.to_path_buf();
            empty_storage(stack, &mut hub.config, &folder).await?;
        }
    }
    let restored = synchub_json(&hub.config, &["restore", "--from", &place])?;
    assert_eq!(restored["backup"], made["id"], "{restored}");
    assert_eq!(
        restored["blobs"]["copied"], made["blob_count"],
        "{restored}"
    );
    hub.restart().await?;

    let after = agent
        .wait_for("reconnected, ready at v3", |s| ready_at(s, 3))
        .await?;
    let hub = &setup.hub;
    // Give a download that should not happen its chance to start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_wait = agent.status().await?;
    assert!(ready_at(&after_wait, 3), "{after_wait}");
    assert_eq!(
        space_status(&after_wait)["applied_at"],
        applied_at,
        "the agent applied nothing new: {after}"
    );
    assert_eq!(agent.tree(), tree, "the agent's files are as they were");
    assert_eq!(
        downloads(hub, &client_id).await?,
        reported,
        "no download after the restore (the report of the one before came back with the log)"
    );

    // The restored blobs serve a PC that holds nothing yet, with the same tokens as before.
    let fresh_dir = tempfile::tempdir()?;
    let fresh =
        synchub_client::SyncClient::start(fixtures::agent_config(hub, &office, fresh_dir.path()))
            .await?;
    fixtures::wait_ready(&fresh, 3, Duration::from_secs(30)).await?;
    assert_eq!(fixtures::read_tree(&fresh_dir.path().join("current")), tree);
    fresh.shutdown().await;
    drop(agent);
    setup.hub.stop().await;
    Ok(())
}

async fn a_second_backup_copies_only_new_blobs(stack: Stack) -> anyhow::Result<()> {
    let setup = start(stack, |_| {}).await?;
    let pc = setup.hub.token("pc", Role::Publish, None).await?;
    new_version(
        &setup.hub,
        &pc,
        1,
        &[
            ("x/1.png", b"one"),
            ("x/2.png", b"two"),
            ("y/3.png", b"three"),
        ],
    )
    .await?;
    let first = backup(&setup)?;
    let count = first["blob_count"].as_u64().context("blob_count")?;
    // Three files and version 2's manifest, at least (version 1's empty manifest too).
    assert!(count >= 4, "{first}");
    assert_eq!(first["copied"], count, "{first}");
    assert_eq!(first["skipped"], 0, "{first}");

    new_version(&setup.hub, &pc, 2, &[("y/4.png", b"four")]).await?;
    let second = backup(&setup)?;
    assert_eq!(second["blob_count"], count + 2, "{second}");
    assert_eq!(
        second["copied"], 2,
        "the new file and the new manifest: {second}"
    );
    assert_eq!(second["skipped"], count, "{second}");
    assert_eq!(
        second["copied_bytes"].as_u64().context("bytes")?,
        second["blob_bytes"].as_u64().context("bytes")?
            - first["blob_bytes"].as_u64().context("bytes")?,
        "the new blobs' bytes only: {second}"
    );

    let ids = listed(&setup)?;
    assert_eq!(
        ids,
        vec![
            second["id"].as_str().context("id")?.to_owned(),
            first["id"].as_str().context("id")?.to_owned()
        ],
        "both listed, newest first"
    );
    setup.hub.stop().await;
    Ok(())
}

/// Overwrites the stored blob of `body` with other bytes (a disk or bucket going bad).
async fn damage_blob(hub: &TestHub, body: &[u8]) -> anyhow::Result<()> {
    let hash = Sha256Hex::of(body);
    match &hub.config.blob_store {
        BlobStoreConfig::Fs { .. } => std::fs::write(
            fs_blob_path(hub.data_dir(), hash.as_str()),
            b"not those bytes",
        )?,
        BlobStoreConfig::S3(s3) => {
            let key = format!("{}/{hash}", s3.prefix.trim_matches('/'));
            synchub_tests::s3::put_object(&s3.bucket, &key, b"not those bytes").await?
        }
    }
    Ok(())
}

async fn a_failed_backup_is_not_listed_and_restore_takes_the_previous(
    stack: Stack,
) -> anyhow::Result<()> {
    let setup = start(stack, |_| {}).await?;
    let pc = setup.hub.token("pc", Role::Publish, None).await?;
    new_version(&setup.hub, &pc, 1, &[("a.png", b"first")]).await?;
    let first = backup(&setup)?;

    new_version(&setup.hub, &pc, 2, &[("b.png", b"second, soon damaged")]).await?;
    damage_blob(&setup.hub, b"second, soon damaged").await?;
    let failed = synchub(&setup.hub.config, &["backup", "--to", &setup.place])?;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    ensure!(
        !failed.status.success(),
        "a backup of a damaged blob succeeded"
    );
    assert!(
        stderr.contains(Sha256Hex::of(b"second, soon damaged").as_str()),
        "the error names the blob: {stderr}"
    );
    assert_eq!(
        listed(&setup)?,
        vec![first["id"].as_str().context("id")?.to_owned()],
        "only the complete backup is listed"
    );

    // A new, empty hub restored from that place gets the complete backup: version 2.
    let folder = setup.folders.path().to_path_buf();
    let mut fresh = setup.hub.config.clone();
    empty_storage(stack, &mut fresh, &folder).await?;
    let restored = synchub_json(&fresh, &["restore", "--from", &setup.place])?;
    assert_eq!(restored["backup"], first["id"], "{restored}");
    fresh.listen = "127.0.0.1:0".parse()?;
    let again = TestHub::start_config(fresh).await?;
    let head = fixtures::head(&again, &again.admin_token).await?;
    assert_eq!(head.version, 2);
    assert_eq!(
        head.data_hash.as_str(),
        first["spaces"][0]["data_hash"].as_str().context("hash")?
    );
    again.stop().await;
    setup.hub.stop().await;
    Ok(())
}

async fn a_restore_into_a_hub_with_data_is_refused_and_changes_nothing(
    stack: Stack,
) -> anyhow::Result<()> {
    let setup = start(stack, |_| {}).await?;
    let pc = setup.hub.token("pc", Role::Publish, None).await?;
    new_version(&setup.hub, &pc, 1, &[("a.png", b"a")]).await?;
    backup(&setup)?;
    new_version(&setup.hub, &pc, 2, &[("b.png", b"b")]).await?;
    let state = setup.hub.state();
    let versions = |v: Vec<synchub_protocol::VersionInfo>| -> Vec<u64> {
        v.iter().map(|v| v.head.version).collect()
    };
    let versions_before = versions(state.store.versions(DEFAULT_SPACE, 100).await?);
    let blobs_before: BTreeSet<Sha256Hex> = state.blobs.list().await?.into_iter().collect();

    let refused = synchub(&setup.hub.config, &["restore", "--from", &setup.place])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "a restore over data succeeded");
    assert!(
        stderr.contains("not empty") && stderr.contains("synchub_versions: 3 row(s)"),
        "the refusal says what is there: {stderr}"
    );
    assert_eq!(
        versions(state.store.versions(DEFAULT_SPACE, 100).await?),
        versions_before
    );
    let blobs_after: BTreeSet<Sha256Hex> = state.blobs.list().await?.into_iter().collect();
    assert_eq!(blobs_after, blobs_before);
    assert_eq!(fixtures::head(&setup.hub, &pc).await?.version, 3);

    // An empty database beside a blob store holding a blob the backup does not name.
    let mut other = setup.hub.config.clone();
    empty_storage(stack, &mut other, setup.folders.path()).await?;
    let stray = Sha256Hex::of(b"a blob of another hub");
    match &other.blob_store {
        BlobStoreConfig::Fs { .. } => {
            let path = fs_blob_path(&other.data_dir, stray.as_str());
            std::fs::create_dir_all(path.parent().context("folder")?)?;
            std::fs::write(path, b"a blob of another hub")?;
        }
        BlobStoreConfig::S3(s3) => {
            let key = format!("{}/{stray}", s3.prefix.trim_matches('/'));
            synchub_tests::s3::put_object(&s3.bucket, &key, b"a blob of another hub").await?;
        }
    }
    let refused = synchub(&other, &["restore", "--from", &setup.place])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success(),
        "a restore over a used blob store succeeded"
    );
    assert!(
        stderr.contains("blob store") && stderr.contains(stray.as_str()),
        "the refusal names the blob: {stderr}"
    );
    setup.hub.stop().await;
    Ok(())
}

async fn the_schedule_makes_backups_and_prunes_to_keep(stack: Stack) -> anyhow::Result<()> {
    let started = chrono::Utc::now().timestamp();
    let folders = tempfile::tempdir()?;
    let place = match stack {
        Stack::SqliteFs => folders.path().join("scheduled").display().to_string(),
        Stack::PostgresS3 => format!(
            "s3://{}/scheduled",
            synchub_tests::s3::test_bucket().await?.bucket
        ),
    };
    let setup = {
        let place = place.clone();
        start(stack, move |c| {
            c.backup.to = Some(place);
            c.backup.every = Some(Duration::from_secs(1));
            c.backup.keep = 2;
        })
        .await?
    };
    let hub = &setup.hub;
    let pc = hub.token("pc", Role::Publish, None).await?;
    new_version(hub, &pc, 1, &[("a.png", b"only version 2 names this")]).await?;
    new_version(hub, &pc, 2, &[("a.png", b"version 3 names this")]).await?;
    let spec = TargetSpec::parse(&place).map_err(anyhow::Error::msg)?;
    let old_blob = Sha256Hex::of(b"only version 2 names this");

    // Wait for a backup that holds version 2's blob, then expire version 2 (as retention
    // would): later backups no longer name that blob.
    let deadline = Instant::now() + Duration::from_secs(30);
    let target = loop {
        // Opened as a reader (a writer would clear the hub's uploads in flight), once the
        // hub's first run has made the place.
        let Ok(target) = Target::open(&spec, &hub.config, false) else {
            ensure!(Instant::now() < deadline, "no scheduled backup within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let complete = synchub_hub::backup::list(&target).await?;
        if complete
            .iter()
            .any(|b| b.blobs.iter().any(|r| r.sha256 == old_blob))
        {
            break target;
        }
        ensure!(Instant::now() < deadline, "no scheduled backup within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    hub.state()
        .store
        .delete_versions(DEFAULT_SPACE, &[2])
        .await?;
    let expired_at = chrono::Utc::now();

    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let complete = synchub_hub::backup::list(&target).await?;
        seen.extend(complete.iter().map(|b| b.id.clone()));
        let all_after_expiry = complete.len() == 2
            && complete.iter().all(|b| {
                chrono::DateTime::parse_from_rfc3339(&b.taken_at).is_ok_and(|t| t > expired_at)
            });
        let stored: BTreeSet<Sha256Hex> = target.blobs.list().await?.into_iter().collect();
        let named: BTreeSet<Sha256Hex> = complete
            .iter()
            .flat_map(|b| b.blobs.iter().map(|r| r.sha256.clone()))
            .collect();
        // The place holds exactly the kept backups' blobs: the expired version's went.
        if all_after_expiry && stored == named && !named.contains(&old_blob) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not pruned to 2 backups holding exactly their blobs within 30 s: {} listed, {} \
             blobs stored, {} named, the expired blob stored: {}",
            complete.len(),
            stored.len(),
            named.len(),
            stored.contains(&old_blob)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen.len() >= 3, "backups kept coming: {seen:?}");
    let last_success =
        fixtures::metric(hub, "synchub_backup_last_success_timestamp_seconds").await?;
    assert!(last_success >= started as f64, "{last_success} < {started}");
    setup.hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_scheduled_backup_is_alerted_and_counted() -> anyhow::Result<()> {
    use synchub_hub::alerts::{AlertsConfig, WebhookConfig, WebhookFormat};
    let hooks = synchub_tests::sinks::WebhookReceiver::start().await?;
    let folders = tempfile::tempdir()?;
    // A file where the backup folder should be: every run fails.
    let place = folders.path().join("not-a-folder");
    std::fs::write(&place, b"in the way")?;
    let hub = TestHub::start_with(|c| {
        c.backup.to = Some(place.display().to_string());
        c.backup.every = Some(Duration::from_secs(1));
        c.alerts = AlertsConfig {
            webhook: vec![WebhookConfig {
                url: hooks.url("json"),
                format: WebhookFormat::Json,
            }],
            check_interval_ms: 100,
            ..AlertsConfig::default()
        };
    })
    .await?;
    let (_, (_, body)) = hooks
        .inbox
        .wait_for(Duration::from_secs(20), |(_, b)| {
            b["kind"] == "backup_failed"
        })
        .await?;
    let text = body["text"].as_str().context("text")?;
    assert!(text.contains("not-a-folder"), "{body}");
    assert!(
        fixtures::metric(&hub, "synchub_backup_failures_total").await? >= 1.0,
        "the failure is counted"
    );
    hub.stop().await;
    Ok(())
}

backend_matrix!(
    [sqlite_fs => Stack::SqliteFs, postgres_s3 => Stack::PostgresS3]
    a_restored_hub_keeps_its_heads_and_agents_download_nothing,
    a_second_backup_copies_only_new_blobs,
    a_failed_backup_is_not_listed_and_restore_takes_the_previous,
    a_restore_into_a_hub_with_data_is_refused_and_changes_nothing,
    the_schedule_makes_backups_and_prunes_to_keep,
);
