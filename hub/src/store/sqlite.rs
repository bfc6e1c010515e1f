//! SQLite backend of [`super::Store`]: the embedded default, one file in the data folder, so
//! `synchub serve` needs no other service.
//!
//! The file is opened in WAL mode (readers never wait for the writer) with a busy timeout, so
//! other processes (`synchub token revoke`, a `sqlite3` shell, system 1 tooling) may write it
//! while the hub runs. SQLite has no LISTEN/NOTIFY, so [`Store::watch`] polls: one query per
//! interval reads every `sync_key, version` and the token change counter, whatever the number of
//! agents; the hub's own writes wake the poller at once.

use super::dialect::{
    Conn, Dialect, FedSpaces, HEAD_FROM, INSERT_VERSION, MOVE_HEAD, SET_DATA_HASH, TOKEN_NAMED,
    bind_data_hash, bind_move, bind_version,
};
use super::rows::{
    HeadRow, PendingVersion, decode_spaces, encode_spaces, from_db, list_limit, parse_hash,
    parse_role, parse_timestamp, rfc3339, to_db,
};
use super::*;
use chrono::DateTime;
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

/// The `SELECT` list of a head read (see [`HEAD_FROM`]).
const HEAD_SELECT: &str = "
SELECT m.sync_key, CAST(m.version AS INTEGER) AS row_version,
       CAST(m.last_modified_by AS TEXT) AS row_by,
       CAST(COALESCE(m.last_modified_at, m.updated_at) AS TEXT) AS row_at,
       v.space, v.version, v.data_hash, v.forced, v.reason, v.created_by, v.created_at,
       v.entries, v.bytes";

pub struct SqliteStore {
    pool: SqlitePool,
    /// Poked after the hub's own writes so that the poller reads at once instead of waiting
    /// for the next interval.
    wake: Notify,
    fed: FedSpaces,
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

#[async_trait]
impl Dialect for SqliteStore {
    type Db = Sqlite;

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn fed(&self) -> &FedSpaces {
        &self.fed
    }

    fn wrote(&self) {
        self.wake.notify_one();
    }

    async fn head_rows(&self, space: Option<&str>) -> Result<Vec<HeadRow>, StoreError> {
        let rows = sqlx::query(&format!("{HEAD_SELECT}{HEAD_FROM}"))
            .bind(space)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(head_row).collect()
    }

    async fn insert_version(conn: &mut Conn<Self>, p: &PendingVersion) -> Result<u64, sqlx::Error> {
        let query = bind_version(sqlx::query(INSERT_VERSION), p, rfc3339(p.at));
        Ok(query.execute(conn).await?.rows_affected())
    }

    async fn move_head(
        conn: &mut Conn<Self>,
        p: &PendingVersion,
        expected: u64,
    ) -> Result<u64, sqlx::Error> {
        let query = bind_move(sqlx::query(MOVE_HEAD), p, expected, rfc3339(p.at));
        Ok(query.execute(conn).await?.rows_affected())
    }

    async fn set_data_hash(conn: &mut Conn<Self>, p: &PendingVersion) -> Result<(), sqlx::Error> {
        bind_data_hash(sqlx::query(SET_DATA_HASH), p)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn insert_space_row(
        conn: &mut Conn<Self>,
        space: &str,
        data_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error> {
        let inserted = sqlx::query(
            "INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_at, updated_at)
             VALUES (?1, 1, ?2, ?3, ?3)
             ON CONFLICT (sync_key) DO NOTHING",
        )
        .bind(space)
        .bind(data_hash)
        .bind(rfc3339(at))
        .execute(conn)
        .await?;
        Ok(inserted.rows_affected())
    }

    async fn insert_token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<String>,
        token_hash: &str,
    ) -> Result<TokenRecord, StoreError> {
        let row = sqlx::query(
            "INSERT INTO synchub_tokens (name, role, spaces, token_hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             RETURNING id, name, role, spaces, token_hash, created_at, revoked_at",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(spaces)
        .bind(token_hash)
        .bind(rfc3339(Utc::now()))
        .fetch_one(&self.pool)
        .await?;
        token_from_row(&row)
    }

    async fn token_named(&self, name: &str) -> Result<bool, sqlx::Error> {
        let taken: Option<i64> = sqlx::query_scalar(TOKEN_NAMED)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(taken.is_some())
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn set_fed_spaces(&self, spaces: &[String]) {
        self.fed.set(spaces);
    }

    async fn record_outside_bump(
        &self,
        space: &str,
        content: &NewVersion,
        read_at: u64,
    ) -> Result<Option<Head>, StoreError> {
        sql::record_outside_bump(self, space, content, read_at).await
    }

    async fn ensure_space(&self, space: &str) -> Result<Head, StoreError> {
        sql::ensure_space(self, space).await
    }

    async fn head(&self, space: &str) -> Result<Option<Head>, StoreError> {
        sql::head(self, space).await
    }

    async fn heads(&self) -> Result<Vec<Head>, StoreError> {
        sql::heads(self).await
    }

    async fn create_version(
        &self,
        space: &str,
        expected: u64,
        new: NewVersion,
    ) -> Result<Head, StoreError> {
        sql::create_version(self, space, expected, new).await
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
        sql::create_token(self, name, role, encode_spaces(spaces), token_hash).await
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

    async fn record_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        from: Option<&str>,
    ) -> Result<(), StoreError> {
        super::audit::sqlite::record(&self.pool, who, action, target, from).await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<synchub_protocol::AuditEntry>, StoreError> {
        super::audit::sqlite::list(&self.pool, limit).await
    }

    async fn index_blobs(&self, space: &str, hashes: &[Sha256Hex]) -> Result<(), StoreError> {
        super::blob_index::sqlite::index(&self.pool, space, hashes).await
    }

    async fn readable_blobs(
        &self,
        hashes: &[Sha256Hex],
        spaces: Option<&[String]>,
        token_id: i64,
    ) -> Result<std::collections::HashSet<Sha256Hex>, StoreError> {
        super::blob_index::sqlite::readable(&self.pool, hashes, spaces, token_id).await
    }

    async fn note_upload(&self, hash: &Sha256Hex, token_id: i64) -> Result<(), StoreError> {
        super::blob_index::sqlite::note_upload(&self.pool, hash, token_id).await
    }

    async fn bind_client(&self, client_id: &str, token_id: i64) -> Result<i64, StoreError> {
        super::blob_index::sqlite::bind_client(&self.pool, client_id, token_id).await
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
