//! SQLite backend of [`super::Store`]: the embedded default, one file in the data folder, so
//! `synchub serve` needs no other service.
//!
//! The file is opened in WAL mode (readers never wait for the writer) with a busy timeout, so
//! other processes (`synchub token revoke`, a `sqlite3` shell, system 1 tooling) may write it
//! while the hub runs. SQLite has no LISTEN/NOTIFY, so [`Store::watch`] polls: one query per
//! interval reads every `sync_key, version` and the token change counter, whatever the number of
//! agents; the hub's own writes wake the poller at once.

use super::rows::{
    HeadPlan, HeadRow, PendingVersion, decode_spaces, encode_spaces, from_db, list_limit,
    parse_hash, parse_role, parse_timestamp, plan_fed_bump, plan_head, rfc3339, to_db,
};
use super::*;
use chrono::Utc;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use std::collections::HashMap;
use std::str::FromStr;
use tokio::sync::Notify;

/// Columns of a version record, in the order [`version_from_row`] reads them.
const VERSION_COLUMNS: &str =
    "space, version, data_hash, forced, reason, created_by, created_at, entries, bytes";

/// A `sync_metadata` row with the newest version record of its space (NULLs when none).
const HEAD_QUERY: &str = "
SELECT m.sync_key, CAST(m.version AS INTEGER) AS row_version,
       CAST(m.last_modified_by AS TEXT) AS row_by,
       CAST(COALESCE(m.last_modified_at, m.updated_at) AS TEXT) AS row_at,
       v.space, v.version, v.data_hash, v.forced, v.reason, v.created_by, v.created_at,
       v.entries, v.bytes
FROM sync_metadata m
LEFT JOIN synchub_versions v
       ON v.space = m.sync_key
      AND v.version = (SELECT MAX(w.version) FROM synchub_versions w WHERE w.space = m.sync_key)";

pub struct SqliteStore {
    pool: SqlitePool,
    /// Poked after the hub's own writes so that the poller reads at once instead of waiting
    /// for the next interval.
    wake: Notify,
    /// Spaces fed by sources (see [`Store::set_fed_spaces`]).
    fed: std::sync::RwLock<std::collections::HashSet<String>>,
}

impl SqliteStore {
    /// Opens (creating when missing) the database `url` names: `sqlite://PATH`, `sqlite:PATH`
    /// or a bare path; runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore {
            pool,
            wake: Notify::new(),
            fed: Default::default(),
        })
    }

    fn is_fed(&self, space: &str) -> bool {
        self.fed.read().expect("fed lock").contains(space)
    }

    async fn head_rows(&self, space: Option<&str>) -> Result<Vec<HeadRow>, StoreError> {
        let rows = match space {
            Some(space) => {
                sqlx::query(&format!("{HEAD_QUERY} WHERE m.sync_key = ?1"))
                    .bind(space)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("{HEAD_QUERY} ORDER BY m.sync_key"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(head_row).collect()
    }

    /// Resolves one head row, recording a version first when [`plan_head`] asks for it. Another
    /// replica or process may record the same version at the same time: the insert does
    /// nothing then and the re-read serves whichever record won.
    async fn resolve(&self, mut row: HeadRow) -> Result<Head, StoreError> {
        for _ in 0..3 {
            let fed = self.is_fed(&row.space);
            match plan_head(row, fed)? {
                HeadPlan::Serve(head) => return Ok(head),
                HeadPlan::Record(pending) => {
                    let space = pending.space.clone();
                    self.record(&pending).await?;
                    row = self.head_rows(Some(&space)).await?.pop().ok_or_else(|| {
                        StoreError::Corrupt(format!("sync_metadata row of {space:?} vanished"))
                    })?;
                }
            }
        }
        Err(StoreError::Corrupt(
            "head kept moving while it was being recorded".into(),
        ))
    }

    async fn record(&self, p: &PendingVersion) -> Result<(), StoreError> {
        insert_version(&self.pool, p).await?;
        Ok(())
    }

    /// The poller's one query: every space's version and the token change counter.
    async fn poll(&self) -> Result<(HashMap<String, i64>, i64), StoreError> {
        let rows = sqlx::query(
            "SELECT 0 AS kind, sync_key AS key, CAST(version AS INTEGER) AS value FROM sync_metadata
             UNION ALL
             SELECT 1, name, value FROM synchub_counters WHERE name = 'tokens'",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut versions = HashMap::with_capacity(rows.len());
        let mut tokens = 0;
        for row in &rows {
            let kind: i64 = row.try_get(0)?;
            let value: i64 = row.try_get(2)?;
            if kind == 0 {
                versions.insert(row.try_get(1)?, value);
            } else {
                tokens = value;
            }
        }
        Ok((versions, tokens))
    }
}

fn head_row(row: &SqliteRow) -> Result<HeadRow, StoreError> {
    let newest = match row.try_get::<Option<i64>, _>(5)? {
        Some(_) => Some(version_from_row(row, 4)?),
        None => None,
    };
    let row_at: Option<String> = row.try_get("row_at")?;
    Ok(HeadRow {
        space: row.try_get("sync_key")?,
        row_version: row.try_get("row_version")?,
        row_by: row.try_get("row_by")?,
        row_at: row_at.as_deref().and_then(parse_timestamp),
        newest,
    })
}

/// Reads [`VERSION_COLUMNS`] starting at column `first`.
fn version_from_row(row: &SqliteRow, first: usize) -> Result<VersionInfo, StoreError> {
    let at = |i: usize| first + i;
    let created_at: String = row.try_get(at(6))?;
    Ok(VersionInfo {
        head: Head {
            space: row.try_get(at(0))?,
            version: from_db(row.try_get(at(1))?, "version")?,
            data_hash: parse_hash(row.try_get(at(2))?)?,
            forced: row.try_get(at(3))?,
            reason: row.try_get(at(4))?,
            by: row.try_get(at(5))?,
            at: parse_timestamp(&created_at).map_or(created_at, rfc3339),
            epoch: 0,
            forced_version: 0,
        },
        entries: from_db(row.try_get(at(7))?, "entries")?,
        bytes: from_db(row.try_get(at(8))?, "bytes")?,
    })
}

fn token_from_row(row: &SqliteRow) -> Result<TokenRecord, StoreError> {
    let revoked_at: Option<String> = row.try_get("revoked_at")?;
    Ok(TokenRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: parse_role(row.try_get("role")?)?,
        spaces: decode_spaces(row.try_get("spaces")?)?,
        token_hash: row.try_get("token_hash")?,
        created_at: row.try_get("created_at")?,
        revoked: revoked_at.is_some(),
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Records a version once (a second insert of the same number does nothing); returns the rows
/// inserted, 0 or 1.
async fn insert_version<'e, E>(executor: E, p: &PendingVersion) -> Result<u64, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    Ok(sqlx::query(
        "INSERT INTO synchub_versions
             (space, version, data_hash, forced, reason, created_by, created_at, entries, bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (space, version) DO NOTHING",
    )
    .bind(&p.space)
    .bind(to_db(p.version))
    .bind(p.data_hash.as_str())
    .bind(p.forced)
    .bind(&p.reason)
    .bind(&p.by)
    .bind(rfc3339(p.at))
    .bind(to_db(p.entries))
    .bind(to_db(p.bytes))
    .execute(executor)
    .await?
    .rows_affected())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn set_fed_spaces(&self, spaces: &[String]) {
        *self.fed.write().expect("fed lock") = spaces.iter().cloned().collect();
    }

    async fn record_outside_bump(
        &self,
        space: &str,
        content: &NewVersion,
    ) -> Result<Option<Head>, StoreError> {
        let Some(row) = self.head_rows(Some(space)).await?.pop() else {
            return Err(StoreError::NoSuchSpace(space.to_owned()));
        };
        let Some(p) = plan_fed_bump(row, content)? else {
            return Ok(None);
        };
        let mut tx = self.pool.begin().await?;
        let inserted = insert_version(&mut *tx, &p).await?;
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        sqlx::query("UPDATE sync_metadata SET data_hash = ?1 WHERE sync_key = ?2 AND version = ?3")
            .bind(p.data_hash.as_str())
            .bind(space)
            .bind(to_db(p.version))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.wake.notify_one();
        Ok(Some(p.into_head()))
    }

    async fn ensure_space(&self, space: &str) -> Result<Head, StoreError> {
        let now = rfc3339(Utc::now());
        // The row and its first (empty) version in one transaction: a new space is empty
        // data, not a row adopted without data.
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_at, updated_at)
             VALUES (?1, 1, ?2, ?3, ?3)
             ON CONFLICT (sync_key) DO NOTHING",
        )
        .bind(space)
        .bind(Sha256Hex::empty().as_str())
        .bind(&now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted > 0 {
            sqlx::query(
                "INSERT INTO synchub_versions
                     (space, version, data_hash, forced, created_at, entries, bytes)
                 VALUES (?1, 1, ?2, 0, ?3, 0, 0)
                 ON CONFLICT (space, version) DO NOTHING",
            )
            .bind(space)
            .bind(Sha256Hex::empty().as_str())
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let head = self
            .head(space)
            .await?
            .ok_or_else(|| StoreError::NoSuchSpace(space.to_owned()))?;
        if inserted > 0 {
            self.wake.notify_one();
        }
        Ok(head)
    }

    async fn head(&self, space: &str) -> Result<Option<Head>, StoreError> {
        match self.head_rows(Some(space)).await?.pop() {
            Some(row) => Ok(Some(self.resolve(row).await?)),
            None => Ok(None),
        }
    }

    async fn heads(&self) -> Result<Vec<Head>, StoreError> {
        let mut heads = Vec::new();
        for row in self.head_rows(None).await? {
            heads.push(self.resolve(row).await?);
        }
        Ok(heads)
    }

    async fn create_version(
        &self,
        space: &str,
        expected: u64,
        new: NewVersion,
    ) -> Result<Head, StoreError> {
        let version = expected + 1;
        let now = rfc3339(Utc::now());
        let mut tx = self.pool.begin().await?;
        // The first statement writes, so SQLite takes the write lock (waiting up to the busy
        // timeout) before reading: the condition is checked against the latest commit. The
        // second alternative lets the hub move on after someone lowered the row below the
        // newest record (the head it serves then is that record).
        let moved = sqlx::query(
            "UPDATE sync_metadata
                SET version = ?1, data_hash = ?2, last_modified_by = ?3,
                    last_modified_at = ?4, updated_at = ?4
              WHERE sync_key = ?5
                AND (version = ?6
                     OR (version < ?6 AND ?6 = (SELECT MAX(version) FROM synchub_versions
                                                 WHERE space = ?5)))
                AND NOT EXISTS (SELECT 1 FROM synchub_versions
                                 WHERE space = ?5 AND version > ?6)",
        )
        .bind(to_db(version))
        .bind(new.data_hash.as_str())
        .bind(&new.by)
        .bind(&now)
        .bind(space)
        .bind(to_db(expected))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 1 {
            let inserted = sqlx::query(
                "INSERT INTO synchub_versions
                     (space, version, data_hash, forced, reason, created_by, created_at,
                      entries, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .bind(space)
            .bind(to_db(version))
            .bind(new.data_hash.as_str())
            .bind(new.forced)
            .bind(&new.reason)
            .bind(&new.by)
            .bind(&now)
            .bind(to_db(new.entries))
            .bind(to_db(new.bytes))
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {
                    tx.commit().await?;
                    self.wake.notify_one();
                    return Ok(Head {
                        space: space.to_owned(),
                        version,
                        data_hash: new.data_hash,
                        forced: new.forced,
                        reason: new.reason,
                        by: new.by,
                        at: now,
                        epoch: 0,
                        forced_version: 0,
                    });
                }
                // A record of that number exists already: the head moved after all.
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        tx.rollback().await?;
        match self.head(space).await? {
            Some(head) => Err(StoreError::HeadMoved {
                space: space.to_owned(),
                expected,
                current: head.version,
            }),
            None => Err(StoreError::NoSuchSpace(space.to_owned())),
        }
    }

    async fn version(&self, space: &str, version: u64) -> Result<Option<Head>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM synchub_versions WHERE space = ?1 AND version = ?2"
        ))
        .bind(space)
        .bind(to_db(version))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| version_from_row(&r, 0).map(|v| v.head))
            .transpose()
    }

    async fn versions(&self, space: &str, limit: u32) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM synchub_versions WHERE space = ?1
             ORDER BY version DESC LIMIT ?2"
        ))
        .bind(space)
        .bind(list_limit(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| version_from_row(r, 0)).collect()
    }

    async fn insert_report(&self, report: &SyncReport) -> Result<bool, StoreError> {
        let now = Utc::now();
        let synced_at = report
            .synced_at
            .as_deref()
            .and_then(parse_timestamp)
            .unwrap_or(now);
        let inserted = sqlx::query(
            "INSERT INTO sync_log
                 (report_id, client_id, space, sync_type, status, version, items_synced, bytes,
                  duration_ms, error_message, discord_id, synced_at, created_at, items_total)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (report_id) DO NOTHING",
        )
        .bind(&report.report_id)
        .bind(&report.client_id)
        .bind(&report.space)
        .bind(report.sync_type.as_str())
        .bind(report.status.as_str())
        .bind(report.version.map(to_db))
        .bind(to_db(report.items_synced))
        .bind(to_db(report.bytes))
        .bind(to_db(report.duration_ms))
        .bind(&report.error_message)
        .bind(&report.user)
        .bind(rfc3339(synced_at))
        .bind(rfc3339(now))
        .bind(report.items_total.map(to_db))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn sync_log(&self, filter: &SyncLogFilter) -> Result<Vec<SyncLogEntry>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT id, report_id, client_id, space, COALESCE(sync_type, '') AS sync_type,
                    COALESCE(status, '') AS status, version, items_synced, items_total, bytes, duration_ms,
                    error_message, CAST(discord_id AS TEXT) AS discord_id,
                    CAST(COALESCE(synced_at, created_at) AS TEXT) AS synced_at
             FROM sync_log WHERE 1 = 1",
        );
        // Rows the old app wrote have no space: they belong to every space's log.
        if let Some(space) = &filter.space {
            q.push(" AND (space = ")
                .push_bind(space.clone())
                .push(" OR space IS NULL)");
        }
        for (column, value) in [("client_id", &filter.client_id), ("status", &filter.status)] {
            if let Some(value) = value {
                q.push(format!(" AND {column} = ")).push_bind(value.clone());
            }
        }
        q.push(" ORDER BY synced_at DESC, id DESC LIMIT ")
            .push_bind(list_limit(filter.limit));
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let synced_at: Option<String> = row.try_get("synced_at")?;
                let synced_at = synced_at.unwrap_or_default();
                Ok(SyncLogEntry {
                    id: row.try_get("id")?,
                    report_id: row.try_get("report_id")?,
                    client_id: row.try_get("client_id")?,
                    space: row.try_get("space")?,
                    sync_type: row.try_get("sync_type")?,
                    status: row.try_get("status")?,
                    version: row.try_get("version")?,
                    items_synced: row.try_get("items_synced")?,
                    items_total: row.try_get("items_total")?,
                    bytes: row.try_get("bytes")?,
                    duration_ms: row.try_get("duration_ms")?,
                    error_message: row.try_get("error_message")?,
                    user: row.try_get("discord_id")?,
                    synced_at: parse_timestamp(&synced_at).map_or(synced_at, rfc3339),
                })
            })
            .collect()
    }

    async fn create_token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<&[String]>,
        token_hash: &str,
    ) -> Result<TokenRecord, StoreError> {
        let result = sqlx::query(
            "INSERT INTO synchub_tokens (name, role, spaces, token_hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             RETURNING id, name, role, spaces, token_hash, created_at, revoked_at",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(encode_spaces(spaces))
        .bind(token_hash)
        .bind(rfc3339(Utc::now()))
        .fetch_one(&self.pool)
        .await;
        match result {
            Ok(row) => {
                self.wake.notify_one();
                token_from_row(&row)
            }
            Err(e) if is_unique_violation(&e) => {
                let taken: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM synchub_tokens WHERE name = ?1")
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await?;
                match taken {
                    Some(_) => Err(StoreError::DuplicateToken(name.to_owned())),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, spaces, token_hash, created_at, revoked_at
             FROM synchub_tokens ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn put_held(
        &self,
        space: &str,
        client_id: &str,
        change: &synchub_protocol::HeldChange,
    ) -> Result<synchub_protocol::HeldRecord, StoreError> {
        super::held::sqlite::put(&self.pool, space, client_id, change).await
    }

    async fn held_changes(&self) -> Result<Vec<synchub_protocol::HeldRecord>, StoreError> {
        super::held::sqlite::list(&self.pool).await
    }

    async fn decide_held(
        &self,
        space: &str,
        client_id: &str,
        decision: synchub_protocol::HeldDecision,
        by: &str,
    ) -> Result<bool, StoreError> {
        super::held::sqlite::decide(&self.pool, space, client_id, decision, by).await
    }

    async fn delete_held(&self, space: &str, client_id: &str) -> Result<(), StoreError> {
        super::held::sqlite::delete(&self.pool, space, client_id).await
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let revoked = sqlx::query(
            "UPDATE synchub_tokens SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
        )
        .bind(rfc3339(Utc::now()))
        .bind(name)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if revoked > 0 {
            self.wake.notify_one();
        }
        Ok(revoked > 0)
    }

    /// Polls every `poll_interval` (and at once after the hub's own writes). The first poll
    /// sends `Change::All` and `Change::Tokens`, so a change between the hub's start-up read
    /// and the poller's first look is not lost.
    async fn watch(
        self: Arc<Self>,
        poll_interval: Duration,
        changes: mpsc::UnboundedSender<Change>,
        shutdown: CancellationToken,
    ) {
        let mut known: Option<(HashMap<String, i64>, i64)> = None;
        let mut failing = false;
        loop {
            match self.poll().await {
                Ok((versions, tokens)) => {
                    if failing {
                        tracing::info!("sqlite poll works again");
                        failing = false;
                    }
                    let mut sent = Vec::new();
                    match &known {
                        None => sent.extend([Change::All, Change::Tokens]),
                        Some((old_versions, old_tokens)) => {
                            for (space, version) in &versions {
                                if old_versions.get(space) != Some(version) {
                                    sent.push(Change::Space(space.clone()));
                                }
                            }
                            for space in old_versions.keys() {
                                if !versions.contains_key(space) {
                                    sent.push(Change::Space(space.clone()));
                                }
                            }
                            if *old_tokens != tokens {
                                sent.push(Change::Tokens);
                            }
                        }
                    }
                    for change in sent {
                        if changes.send(change).is_err() {
                            return;
                        }
                    }
                    known = Some((versions, tokens));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "sqlite poll failed; retrying every interval");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.closed() => return,
                _ = tokio::time::sleep(poll_interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}
