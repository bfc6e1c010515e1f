//! The `Store` contract, one suite run against both backends: every test in `backend_matrix!`
//! runs once on a fresh SQLite file in a temporary folder and once on a fresh database of a
//! real PostgreSQL cluster (see `synchub_tests::postgres`). "Outside" writes go through a
//! separate connection, as system 1, a `sqlite3` shell or `synchub token revoke` would make
//! them. PostgreSQL-only tests at the end: adopting an existing system 1 database, and the
//! listener surviving a server restart.

use anyhow::{Context, Result, bail, ensure};
use futures::future::join_all;
use sqlx::Connection;
use std::sync::Arc;
use std::time::Duration;
use synchub_hub::store::{self, Change, NewVersion, Store, StoreError, SyncLogFilter};
use synchub_protocol::{Role, Sha256Hex, SyncReport, SyncStatus, SyncType};
use synchub_tests::postgres::{PgCluster, test_database};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const OUTSIDE_BUMP_REASON: &str = "version bumped outside the hub";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A freshly migrated store of one backend, and the means to write to its database from
/// outside.
struct Fixture {
    store: Arc<dyn Store>,
    url: String,
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn new(backend: Backend) -> Result<Fixture> {
        let (url, dir) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("hub.db").display());
                (url, Some(dir))
            }
            Backend::Postgres => (test_database().await?, None),
        };
        let store = store::open(&url)
            .await
            .with_context(|| format!("opening {url}"))?;
        assert_eq!(
            store.backend(),
            match backend {
                Backend::Sqlite => "sqlite",
                Backend::Postgres => "postgres",
            }
        );
        Ok(Fixture {
            store,
            url,
            backend,
            _dir: dir,
        })
    }

    /// Runs `sql` on a connection of its own, as another program would.
    async fn outside(&self, sql: &str) -> Result<()> {
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await?;
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url).await?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await?;
            }
        }
        Ok(())
    }

    /// Starts `watch` (50 ms polls on SQLite) and waits for the `Change::All` and
    /// `Change::Tokens` it starts with.
    async fn watch(&self) -> Result<Watcher> {
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.store.clone().watch(
            Duration::from_millis(50),
            tx,
            shutdown.clone(),
        ));
        let mut watcher = Watcher {
            rx,
            shutdown,
            task: Some(task),
        };
        watcher
            .expect(Duration::from_secs(5), |c| *c == Change::All)
            .await
            .context("watch did not start with Change::All")?;
        watcher
            .expect(Duration::from_secs(1), |c| *c == Change::Tokens)
            .await
            .context("watch did not start with Change::Tokens")?;
        Ok(watcher)
    }
}

/// A running `Store::watch` task; stopped on drop.
struct Watcher {
    rx: mpsc::UnboundedReceiver<Change>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Watcher {
    /// Waits up to `within` for a change matching `wanted`, skipping others.
    async fn expect(&mut self, within: Duration, wanted: impl Fn(&Change) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(change)) if wanted(&change) => return Ok(()),
                Ok(Some(change)) => seen.push(change),
                Ok(None) => bail!("watch ended; saw {seen:?}"),
                Err(_) => bail!("no expected change within {within:?}; saw {seen:?}"),
            }
        }
    }

    async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .context("watch did not stop on shutdown")??;
        }
        Ok(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn new_version(content: &[u8], by: &str) -> NewVersion {
    NewVersion {
        data_hash: Sha256Hex::of(content),
        forced: false,
        reason: None,
        by: Some(by.to_owned()),
        entries: content.len() as u64,
        bytes: 100 * content.len() as u64,
    }
}

fn report(id: &str, client: &str, space: &str, status: SyncStatus, at: &str) -> SyncReport {
    SyncReport {
        report_id: id.to_owned(),
        client_id: client.to_owned(),
        space: space.to_owned(),
        sync_type: SyncType::Download,
        status,
        version: Some(3),
        items_synced: 4,
        items_total: Some(508),
        bytes: 2_500_000,
        duration_ms: 420,
        error_message: (status == SyncStatus::Failed).then(|| "disk full".to_owned()),
        user: Some("4242".to_owned()),
        synced_at: Some(at.to_owned()),
    }
}

/// `2026-11-24T10:00:00.123Z`: the form every timestamp of the API takes.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && s.ends_with('Z')
        && s[..4].parse::<u32>().is_ok()
}

synchub_tests::backend_matrix!(
    [
        sqlite => Fixture::new(Backend::Sqlite).await?,
        postgres => Fixture::new(Backend::Postgres).await?,
    ]
    ensure_space_creates_version_one,
    sync_log_is_newest_first_whoever_reported,
    ensure_space_adopts_an_existing_row,
    create_version_is_compare_and_swap,
    concurrent_creators_exactly_one_wins,
    outside_bump_is_a_forced_version,
    plain_sql_bump_is_recorded_truthfully,
    fed_space_bump_is_recorded_with_the_sources_content,
    lowered_row_keeps_serving_the_newest_version,
    watch_sees_outside_and_own_changes,
    tokens_create_list_revoke,
    reports_are_idempotent_and_filtered,
    a_batch_of_reports_tells_each_whether_it_was_new,
    agent_rows_are_written_in_batches_last_row_winning,
    versions_are_listed_newest_first,
);

async fn ensure_space_creates_version_one(f: Fixture) -> Result<()> {
    let head = f.store.ensure_space("qr").await?;
    assert_eq!(head.space, "qr");
    assert_eq!(head.version, 1);
    assert_eq!(head.data_hash, Sha256Hex::empty());
    assert!(!head.forced);
    assert!(is_rfc3339_utc(&head.at), "{}", head.at);
    assert_eq!(
        f.store.ensure_space("qr").await?,
        head,
        "ensure_space is idempotent"
    );
    assert_eq!(f.store.head("qr").await?, Some(head.clone()));
    assert_eq!(f.store.head("nope").await?, None);
    assert_eq!(f.store.version("qr", 1).await?, Some(head.clone()));
    assert_eq!(f.store.version("qr", 2).await?, None);
    f.store.ensure_space("archive").await?;
    let spaces: Vec<String> = f
        .store
        .heads()
        .await?
        .into_iter()
        .map(|h| h.space)
        .collect();
    assert_eq!(spaces, ["archive", "qr"]);
    Ok(())
}

async fn ensure_space_adopts_an_existing_row(f: Fixture) -> Result<()> {
    // As system 1 left it: a row and no version record.
    f.outside(
        "INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_by)
         VALUES ('global_version', 42, 'legacy-hash', 'desktop-admin')",
    )
    .await?;
    let head = f.store.ensure_space("global_version").await?;
    assert_eq!(head.version, 42);
    assert_eq!(head.data_hash, Sha256Hex::empty());
    assert_eq!(head.by.as_deref(), Some("desktop-admin"));
    assert!(!head.forced);
    let next = f
        .store
        .create_version("global_version", 42, new_version(b"a", "hub"))
        .await?;
    assert_eq!(next.version, 43);
    Ok(())
}

async fn create_version_is_compare_and_swap(f: Fixture) -> Result<()> {
    f.store.ensure_space("s").await?;
    let v2 = f
        .store
        .create_version("s", 1, new_version(b"two", "alice"))
        .await?;
    assert_eq!(v2.version, 2);
    assert_eq!(v2.data_hash, Sha256Hex::of(b"two"));
    assert_eq!(v2.by.as_deref(), Some("alice"));
    assert_eq!(f.store.head("s").await?, Some(v2.clone()));

    match f
        .store
        .create_version("s", 1, new_version(b"stale", "bob"))
        .await
    {
        Err(StoreError::HeadMoved {
            expected: 1,
            current: 2,
            ..
        }) => {}
        other => bail!("stale create_version: {other:?}"),
    }
    assert_eq!(f.store.head("s").await?, Some(v2), "nothing written");
    assert_eq!(f.store.versions("s", 10).await?.len(), 2);
    assert_eq!(f.store.version("s", 3).await?, None);

    match f
        .store
        .create_version("none", 1, new_version(b"x", "bob"))
        .await
    {
        Err(StoreError::NoSuchSpace(space)) => assert_eq!(space, "none"),
        other => bail!("create_version on a missing space: {other:?}"),
    }
    Ok(())
}

async fn concurrent_creators_exactly_one_wins(f: Fixture) -> Result<()> {
    f.store.ensure_space("race").await?;
    let attempts = (0..8).map(|i| {
        let store = f.store.clone();
        tokio::spawn(async move {
            let content = format!("writer {i}");
            store
                .create_version("race", 1, new_version(content.as_bytes(), "racer"))
                .await
        })
    });
    let results: Vec<_> = join_all(attempts)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in &results {
        match r {
            Ok(head) => assert_eq!(head.version, 2),
            Err(StoreError::HeadMoved { current: 2, .. }) => {}
            Err(e) => bail!("a losing creator got {e}"),
        }
    }
    assert_eq!(f.store.head("race").await?.as_ref(), Some(winners[0]));
    assert_eq!(f.store.versions("race", 10).await?.len(), 2);
    Ok(())
}

async fn outside_bump_is_a_forced_version(f: Fixture) -> Result<()> {
    f.store.ensure_space("s").await?;
    f.store
        .create_version("s", 1, new_version(b"content", "hub-user"))
        .await?;
    f.outside(
        "UPDATE sync_metadata SET version = version + 1, last_modified_by = 'desktop-admin'
         WHERE sync_key = 's'",
    )
    .await?;
    let head = f.store.head("s").await?.context("head")?;
    assert_eq!(head.version, 3);
    assert!(head.forced);
    assert_eq!(
        head.data_hash,
        Sha256Hex::of(b"content"),
        "previous content"
    );
    assert_eq!(head.by.as_deref(), Some("desktop-admin"));
    assert_eq!(head.reason.as_deref(), Some(OUTSIDE_BUMP_REASON));
    assert_eq!(f.store.version("s", 3).await?, Some(head.clone()));
    assert_eq!(f.store.heads().await?, vec![head.clone()]);
    // The hub carries on from the observed version.
    let v4 = f
        .store
        .create_version("s", 3, new_version(b"four", "hub-user"))
        .await?;
    assert_eq!(v4.version, 4);
    Ok(())
}

async fn plain_sql_bump_is_recorded_truthfully(f: Fixture) -> Result<()> {
    f.store.ensure_space("s").await?;
    let v2 = f
        .store
        .create_version("s", 1, new_version(b"content", "hub-user"))
        .await?;
    // Only the number moves: name and time are still those of the hub's last write.
    f.outside("UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 's'")
        .await?;
    let head = f.store.head("s").await?.context("head")?;
    assert_eq!(head.version, 3);
    assert_eq!(head.by, None, "not the previous publisher");
    assert!(
        head.at > v2.at,
        "noticed after v2: {} vs {}",
        head.at,
        v2.at
    );
    let listed = &f.store.versions("s", 10).await?[0];
    assert_eq!(
        (listed.entries, listed.bytes),
        (7, 700),
        "the size of the manifest served"
    );
    Ok(())
}

async fn fed_space_bump_is_recorded_with_the_sources_content(f: Fixture) -> Result<()> {
    f.store.ensure_space("s").await?;
    f.store
        .create_version("s", 1, new_version(b"content", "sources"))
        .await?;
    f.store.set_fed_spaces(&["s".to_owned()]);
    f.outside("UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 's'")
        .await?;
    let waiting = f.store.head("s").await?.context("head")?;
    assert_eq!(
        waiting.version, 2,
        "held back until the sources read the data"
    );
    let fresh = new_version(b"fresh", "sources");
    // Data read before the row reached 3 may not hold what the app wrote for 3.
    match f.store.record_outside_bump("s", &fresh, 2).await {
        Err(StoreError::HeadMoved { current: 3, .. }) => {}
        other => anyhow::bail!("content read before the bump was recorded: {other:?}"),
    }
    let recorded = f
        .store
        .record_outside_bump("s", &fresh, 3)
        .await?
        .context("the bump is recorded")?;
    assert_eq!(recorded.version, 3);
    assert_eq!(recorded.data_hash, fresh.data_hash);
    assert!(!recorded.forced, "new content");
    assert_eq!(f.store.head("s").await?, Some(recorded.clone()));
    assert_eq!(f.store.versions("s", 10).await?[0].entries, 5);
    assert!(
        f.store.record_outside_bump("s", &fresh, 3).await?.is_none(),
        "nothing left to record"
    );
    Ok(())
}

async fn lowered_row_keeps_serving_the_newest_version(f: Fixture) -> Result<()> {
    f.store.ensure_space("s").await?;
    let v2 = f
        .store
        .create_version("s", 1, new_version(b"2", "a"))
        .await?;
    let v3 = f
        .store
        .create_version("s", 2, new_version(b"3", "a"))
        .await?;
    f.outside("UPDATE sync_metadata SET version = 1 WHERE sync_key = 's'")
        .await?;
    assert_eq!(f.store.head("s").await?, Some(v3.clone()));
    assert!(matches!(
        f.store.create_version("s", 1, new_version(b"x", "a")).await,
        Err(StoreError::HeadMoved { current: 3, .. })
    ));
    let v4 = f
        .store
        .create_version("s", 3, new_version(b"4", "a"))
        .await?;
    assert_eq!(v4.version, 4);
    assert_eq!(f.store.head("s").await?, Some(v4));
    assert_eq!(f.store.version("s", 2).await?, Some(v2));
    Ok(())
}

async fn watch_sees_outside_and_own_changes(f: Fixture) -> Result<()> {
    f.store.ensure_space("s").await?;
    let mut watcher = f.watch().await?;
    let space = |c: &Change| *c == Change::Space("s".into());
    let second = Duration::from_secs(1);

    f.outside("UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 's'")
        .await?;
    watcher
        .expect(second, space)
        .await
        .context("outside bump")?;
    assert!(f.store.head("s").await?.context("head")?.forced);

    f.store
        .create_version("s", 2, new_version(b"mine", "hub"))
        .await?;
    watcher.expect(second, space).await.context("own commit")?;

    f.store.ensure_space("new-space").await?;
    watcher
        .expect(second, |c| *c == Change::Space("new-space".into()))
        .await
        .context("new space")?;

    f.store
        .create_token("agent-1", Role::Agent, None, "hash-1")
        .await?;
    watcher
        .expect(second, |c| *c == Change::Tokens)
        .await
        .context("own token")?;
    // `synchub token revoke` run by another process.
    f.outside("UPDATE synchub_tokens SET revoked_at = created_at WHERE name = 'agent-1'")
        .await?;
    watcher
        .expect(second, |c| *c == Change::Tokens)
        .await
        .context("outside revoke")?;
    assert!(f.store.tokens().await?[0].revoked);
    watcher.stop().await
}

async fn tokens_create_list_revoke(f: Fixture) -> Result<()> {
    let spaces = vec!["qr".to_owned(), "archive".to_owned()];
    let agent = f
        .store
        .create_token("pc-1", Role::Agent, Some(&spaces), "aaaa")
        .await?;
    assert_eq!(agent.name, "pc-1");
    assert_eq!(agent.role, Role::Agent);
    assert_eq!(agent.spaces, Some(spaces));
    assert_eq!(agent.token_hash, "aaaa");
    assert!(!agent.revoked);
    assert!(is_rfc3339_utc(&agent.created_at), "{}", agent.created_at);
    let admin = f
        .store
        .create_token("admin", Role::Admin, None, "bbbb")
        .await?;
    assert_eq!(admin.spaces, None);
    assert_eq!(f.store.tokens().await?, vec![agent.clone(), admin.clone()]);

    match f
        .store
        .create_token("pc-1", Role::Admin, None, "cccc")
        .await
    {
        Err(StoreError::DuplicateToken(name)) => assert_eq!(name, "pc-1"),
        other => bail!("duplicate name: {other:?}"),
    }

    assert!(f.store.revoke_token("pc-1").await?);
    assert!(!f.store.revoke_token("pc-1").await?, "already revoked");
    assert!(!f.store.revoke_token("nobody").await?);
    let listed = f.store.tokens().await?;
    assert_eq!(listed.len(), 2);
    assert!(listed[0].revoked && !listed[1].revoked);
    assert!(
        matches!(
            f.store
                .create_token("pc-1", Role::Agent, None, "dddd")
                .await,
            Err(StoreError::DuplicateToken(_))
        ),
        "a revoked token's name stays taken"
    );
    Ok(())
}

/// The order of the log is the time of the syncs, not who made them: a late report of an
/// early sync by a user sorting last is listed last.
async fn sync_log_is_newest_first_whoever_reported(f: Fixture) -> Result<()> {
    for (id, user, at) in [
        ("noon", "4242", "2026-11-24T12:00:00Z"),
        ("one", "1000", "2026-11-24T13:00:00Z"),
        ("morning", "9999", "2026-11-24T08:00:00Z"),
    ] {
        let mut r = report(id, "pc-1", "qr", SyncStatus::Success, at);
        r.user = Some(user.to_owned());
        assert!(f.store.insert_report(&r).await?);
    }
    let log = f.store.sync_log(&SyncLogFilter::default()).await?;
    let ids: Vec<_> = log.iter().filter_map(|e| e.report_id.as_deref()).collect();
    assert_eq!(ids, ["one", "noon", "morning"]);
    Ok(())
}

async fn reports_are_idempotent_and_filtered(f: Fixture) -> Result<()> {
    let r1 = report(
        "r1",
        "pc-1",
        "qr",
        SyncStatus::Success,
        "2026-11-24T10:00:00Z",
    );
    assert!(f.store.insert_report(&r1).await?);
    assert!(!f.store.insert_report(&r1).await?, "same report_id twice");
    let r2 = report(
        "r2",
        "pc-2",
        "qr",
        SyncStatus::Failed,
        "2026-11-24T11:15:00+01:00",
    );
    let r3 = report(
        "r3",
        "pc-1",
        "archive",
        SyncStatus::Failed,
        "2026-11-24T10:30:00Z",
    );
    f.store.insert_report(&r2).await?;
    f.store.insert_report(&r3).await?;

    let all = f.store.sync_log(&SyncLogFilter::default()).await?;
    let ids: Vec<_> = all.iter().map(|e| e.report_id.clone().unwrap()).collect();
    assert_eq!(ids, ["r3", "r2", "r1"], "newest first (r2 is 10:15Z)");
    let first = all
        .iter()
        .find(|e| e.report_id.as_deref() == Some("r1"))
        .unwrap();
    assert_eq!(first.client_id.as_deref(), Some("pc-1"));
    assert_eq!(first.space.as_deref(), Some("qr"));
    assert_eq!(first.sync_type, "download");
    assert_eq!(first.status, "success");
    assert_eq!(first.version, Some(3));
    assert_eq!(first.items_synced, Some(4), "files changed");
    assert_eq!(first.items_total, Some(508), "files in the version");
    assert_eq!(first.bytes, Some(2_500_000));
    assert_eq!(first.duration_ms, Some(420));
    assert_eq!(first.user.as_deref(), Some("4242"));
    assert_eq!(first.error_message, None);
    assert_eq!(first.synced_at, "2026-11-24T10:00:00.000Z");

    let filter =
        |space: Option<&str>, client: Option<&str>, status: Option<&str>, limit| SyncLogFilter {
            space: space.map(str::to_owned),
            client_id: client.map(str::to_owned),
            status: status.map(str::to_owned),
            limit,
        };
    let ids = |entries: Vec<synchub_protocol::SyncLogEntry>| -> Vec<String> {
        entries.into_iter().filter_map(|e| e.report_id).collect()
    };
    assert_eq!(
        ids(f.store.sync_log(&filter(Some("qr"), None, None, 0)).await?),
        ["r2", "r1"]
    );
    assert_eq!(
        ids(f
            .store
            .sync_log(&filter(None, Some("pc-1"), None, 0))
            .await?),
        ["r3", "r1"]
    );
    assert_eq!(
        ids(f
            .store
            .sync_log(&filter(None, None, Some("failed"), 0))
            .await?),
        ["r3", "r2"]
    );
    assert_eq!(
        ids(f
            .store
            .sync_log(&filter(Some("qr"), Some("pc-1"), Some("success"), 0))
            .await?),
        ["r1"]
    );
    assert_eq!(
        ids(f.store.sync_log(&filter(None, None, None, 1)).await?),
        ["r3"]
    );
    assert!(
        f.store
            .sync_log(&filter(Some("zzz"), None, None, 5))
            .await?
            .is_empty()
    );
    Ok(())
}

/// A batch as the report writer sends it after a bump: hundreds of rows (more than one
/// statement's worth), one already stored and one sent twice in the batch; each is told
/// whether it was stored now, and every row is there once.
async fn a_batch_of_reports_tells_each_whether_it_was_new(f: Fixture) -> Result<()> {
    let at = "2026-11-24T10:00:00Z";
    let earlier = report("r-7", "pc-7", "qr", SyncStatus::Success, at);
    assert!(f.store.insert_report(&earlier).await?);
    let mut batch: Vec<SyncReport> = (0..250)
        .map(|i| {
            report(
                &format!("r-{i}"),
                &format!("pc-{i}"),
                "qr",
                SyncStatus::Success,
                at,
            )
        })
        .collect();
    batch.push(report("r-120", "pc-120", "qr", SyncStatus::Success, at));
    let stored = f.store.insert_reports(&batch).await?;
    assert_eq!(stored.len(), batch.len());
    for (i, (r, new)) in batch.iter().zip(&stored).enumerate() {
        let want = r.report_id != "r-7" && i != 250;
        assert_eq!(*new, want, "report {} (#{i})", r.report_id);
    }
    let log = f
        .store
        .sync_log(&SyncLogFilter {
            limit: 1000,
            ..Default::default()
        })
        .await?;
    assert_eq!(log.len(), 250, "each report once");
    Ok(())
}

/// The fleet task's write after a herd: dozens of agents' rows (more than one statement's
/// worth), one agent listed twice (its last row wins), then an update of rows already there.
async fn agent_rows_are_written_in_batches_last_row_winning(f: Fixture) -> Result<()> {
    use synchub_protocol::{AgentState, FleetAgent};
    let row = |i: usize, version: u64| FleetAgent {
        space: "qr".into(),
        client_id: format!("pc-{i:02}"),
        token_name: "office".into(),
        hostname: Some(format!("PC{i}")),
        agent_version: Some("1.0".into()),
        state: AgentState::Ready { version },
        last_seen: "2026-11-24T10:00:00Z".into(),
        online: true,
    };
    let mut rows: Vec<FleetAgent> = (0..45).map(|i| row(i, 3)).collect();
    rows.push(row(7, 4));
    f.store.put_agents(&rows).await?;
    let listed = f.store.agents("qr").await?;
    assert_eq!(listed.len(), 45);
    let version_of = |listed: &[FleetAgent], id: &str| {
        listed
            .iter()
            .find(|a| a.client_id == id)
            .map(|a| a.state.version())
    };
    assert_eq!(version_of(&listed, "pc-07"), Some(4), "the last row wins");
    assert_eq!(version_of(&listed, "pc-08"), Some(3));

    let later: Vec<FleetAgent> = (0..45).map(|i| row(i, 5)).collect();
    f.store.put_agents(&later).await?;
    let listed = f.store.agents("qr").await?;
    assert_eq!(listed.len(), 45);
    assert!(
        listed.iter().all(|a| a.state.version() == 5),
        "every row updated"
    );
    Ok(())
}

async fn versions_are_listed_newest_first(f: Fixture) -> Result<()> {
    f.store.ensure_space("s").await?;
    for v in 1..5u64 {
        f.store
            .create_version("s", v, new_version(format!("c{v}").as_bytes(), "hub"))
            .await?;
    }
    let listed = f.store.versions("s", 2).await?;
    let numbers: Vec<u64> = listed.iter().map(|v| v.head.version).collect();
    assert_eq!(numbers, [5, 4]);
    assert_eq!(listed[0].head.data_hash, Sha256Hex::of(b"c4"));
    assert_eq!(listed[0].entries, 2);
    assert_eq!(listed[0].bytes, 200);
    assert_eq!(f.store.version("s", 5).await?, Some(listed[0].head.clone()));
    let all = f.store.versions("s", 0).await?;
    assert_eq!(all.len(), 5);
    assert_eq!(all[4].head.data_hash, Sha256Hex::empty());
    assert!(f.store.versions("other", 10).await?.is_empty());
    Ok(())
}

// ---- PostgreSQL only ----

/// Rows system 1 wrote into its tables before the hub ever ran.
const OLD_ROWS: &str = "
INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_by, last_modified_at)
VALUES ('global_version', 17, 'legacy', 'desktop-admin', '2026-01-02T03:04:05Z');
INSERT INTO sync_log (discord_id, sync_type, status, items_synced, synced_at)
VALUES ('1234', 'download', 'success', 508, '2026-01-02T03:04:06Z');
";

/// System 1's tables with those rows.
fn old_schema() -> String {
    format!("{}{OLD_ROWS}", synchub_tests::postgres::SYSTEM1_TABLES)
}

async fn open_old_database(old_schema: &str) -> Result<(String, Arc<dyn Store>)> {
    let url = test_database().await?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::raw_sql(old_schema).execute(&mut conn).await?;
    conn.close().await?;
    let store = store::open(&url)
        .await
        .context("adopting the old database")?;
    Ok((url, store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_adopts_an_existing_system1_database() -> Result<()> {
    let (url, store) = open_old_database(&old_schema()).await?;

    let head = store.head("global_version").await?.context("head")?;
    assert_eq!(head.version, 17);
    assert_eq!(head.data_hash, Sha256Hex::empty());
    assert_eq!(head.by.as_deref(), Some("desktop-admin"));

    let log = store.sync_log(&SyncLogFilter::default()).await?;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].id, 1);
    assert_eq!(log[0].user.as_deref(), Some("1234"));
    assert_eq!(log[0].items_synced, Some(508));
    assert_eq!(log[0].items_total, None, "system 1 rows have no total");
    assert_eq!(log[0].report_id, None);
    assert_eq!(log[0].synced_at, "2026-01-02T03:04:06.000Z");

    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let (key, version, hash, by): (String, i32, String, String) =
        sqlx::query_as("SELECT sync_key, version, data_hash, last_modified_by FROM sync_metadata")
            .fetch_one(&mut conn)
            .await?;
    assert_eq!(
        (key.as_str(), version, hash.as_str(), by.as_str()),
        ("global_version", 17, "legacy", "desktop-admin"),
        "the existing row is intact"
    );
    let added: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::TEXT FROM information_schema.columns
         WHERE table_name = 'sync_log' AND column_name IN
               ('report_id', 'client_id', 'space', 'version', 'bytes', 'duration_ms')
         ORDER BY column_name",
    )
    .fetch_all(&mut conn)
    .await?;
    assert_eq!(
        added,
        [
            "bytes",
            "client_id",
            "duration_ms",
            "report_id",
            "space",
            "version"
        ]
    );

    // The hub and the old app keep working side by side.
    assert!(
        store
            .insert_report(&report(
                "r1",
                "pc-1",
                "global_version",
                SyncStatus::Success,
                "2026-11-24T10:00:00Z"
            ))
            .await?
    );
    assert_eq!(store.sync_log(&SyncLogFilter::default()).await?.len(), 2);
    let v18 = store
        .create_version("global_version", 17, new_version(b"x", "hub"))
        .await?;
    assert_eq!(v18.version, 18);
    sqlx::query("UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 'global_version'")
        .execute(&mut conn)
        .await?;
    let v19 = store.head("global_version").await?.context("head")?;
    assert_eq!((v19.version, v19.forced), (19, true));
    assert_eq!(v19.data_hash, Sha256Hex::of(b"x"));
    conn.close().await?;

    // Opening again (another replica, a restart) changes nothing.
    let again = store::open(&url).await?;
    assert_eq!(again.head("global_version").await?, Some(v19));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_adopts_tables_with_uuid_ids() -> Result<()> {
    let schema = old_schema().replace(
        "id SERIAL PRIMARY KEY",
        "id UUID PRIMARY KEY DEFAULT gen_random_uuid()",
    );
    let (_url, store) = open_old_database(&schema).await?;
    assert_eq!(
        store.head("global_version").await?.context("head")?.version,
        17
    );
    store
        .insert_report(&report(
            "r1",
            "pc-1",
            "global_version",
            SyncStatus::Success,
            "2026-11-24T10:00:00Z",
        ))
        .await?;
    let log = store.sync_log(&SyncLogFilter::default()).await?;
    assert_eq!(log.len(), 2);
    assert_ne!(log[0].id, log[1].id, "rows get distinct numbers");
    assert_eq!(log[1].user.as_deref(), Some("1234"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listener_survives_a_server_restart() -> Result<()> {
    // A private cluster: restarting the shared one would disturb tests running beside this one.
    let cluster = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await??);
    let url = cluster.create_database().await?;
    let f = Fixture {
        store: store::open(&url).await?,
        url,
        backend: Backend::Postgres,
        _dir: None,
    };
    f.store.ensure_space("s").await?;
    let mut watcher = f.watch().await?;
    let bump = "UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 's'";
    f.outside(bump).await?;
    watcher
        .expect(Duration::from_secs(1), |c| *c == Change::Space("s".into()))
        .await?;

    let restarting = cluster.clone();
    tokio::task::spawn_blocking(move || restarting.restart()).await??;
    // Bump at once, before the listener is back (its first reconnect waits ~100 ms).
    f.outside(bump).await?;
    watcher
        .expect(Duration::from_secs(10), |c| *c == Change::All)
        .await
        .context("no Change::All after the restart")?;
    watcher
        .expect(Duration::from_secs(1), |c| *c == Change::Tokens)
        .await
        .context("no Change::Tokens after the restart")?;
    let head = f.store.head("s").await?.context("head")?;
    assert_eq!(
        head.version, 3,
        "the bump made during the reconnect is seen"
    );
    assert!(head.forced);

    // And the listener is live again.
    f.outside(bump).await?;
    watcher
        .expect(Duration::from_secs(1), |c| *c == Change::Space("s".into()))
        .await
        .context("notification after the reconnect")?;
    ensure!(f.store.head("s").await?.context("head")?.version == 4);
    watcher.stop().await
}
