//! SQLite backend of [`super::Store`]: the embedded default, one file in the data folder, so
//! `synchub serve` needs no other service.
//!
//! The file is opened in WAL mode (readers never wait for the writer) with a busy timeout, so
//! other processes (`synchub token revoke`, a `sqlite3` shell, system 1 tooling) may write it
//! while the hub runs. SQLite has no LISTEN/NOTIFY, so [`super::Store::watch`] polls: one
//! query per interval reads every `sync_key, version` and the token change counter, whatever
//! the number of agents; the hub's own writes wake the poller at once. Everything else the
//! store does is in `sql.rs`, shared with PostgreSQL.

use super::dialect::{Dialect, FedSpaces};
use super::rows::{Stamp, rfc3339};
use super::{Change, StoreError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

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

#[async_trait]
impl Dialect for SqliteStore {
    type Db = Sqlite;
    type Time = String;

    const NAME: &'static str = "sqlite";

    const HEAD_SELECT: &'static str = "
SELECT m.sync_key, CAST(m.version AS INTEGER) AS row_version,
       CAST(m.last_modified_by AS TEXT) AS row_by,
       CAST(COALESCE(m.last_modified_at, m.updated_at) AS TEXT) AS row_at";

    /// A deferred transaction's snapshot starts at its first read (WAL mode): this one.
    const SNAPSHOT: &'static str = "SELECT COUNT(*) FROM sync_metadata";

    /// AUTOINCREMENT already counts past ids inserted explicitly.
    const AFTER_RESTORE: &'static [&'static str] = &[];

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn fed(&self) -> &FedSpaces {
        &self.fed
    }

    fn wrote(&self) {
        self.wake.notify_one();
    }

    /// Fixed-width RFC 3339 TEXT, which sorts in time order.
    fn store_time(at: DateTime<Utc>) -> String {
        rfc3339(at)
    }

    fn read_time(stored: String) -> Stamp {
        Stamp::parse(stored)
    }

    fn rows_changed(done: sqlx::sqlite::SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn sync_log_select(&self) -> String {
        "SELECT id, report_id, client_id, space, COALESCE(sync_type, '') AS sync_type,
                COALESCE(status, '') AS status, version, items_synced, items_total, bytes,
                duration_ms, error_message, CAST(discord_id AS TEXT) AS discord_id,
                CAST(COALESCE(synced_at, created_at) AS TEXT) AS synced_at
         FROM sync_log WHERE 1 = 1"
            .to_owned()
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
