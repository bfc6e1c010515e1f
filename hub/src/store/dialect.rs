//! The narrow layer where the two SQL backends differ, and the one place that runs statements
//! for both. Each backend implements [`Dialect`]: its pool, how it stores a timestamp
//! (`timestamptz`, or RFC 3339 TEXT), the `SELECT` lists whose casts are its own, and how it
//! watches for changes. [`Run`] binds [`Param`]s, runs statements and reads columns for every
//! dialect, written once; `sql.rs` writes the store itself over it.
//!
//! Statement text both backends accept (`$N` parameters work in SQLite too) lives here once.

use super::Change;
use super::rows::Stamp;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::query::Query;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row as _, Type};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A database connection of the dialect's backend (a transaction derefs to one).
pub(super) type Conn<D> = <<D as Dialect>::Db as Database>::Connection;
/// A result row of the dialect's backend.
pub(super) type Row<D> = <<D as Dialect>::Db as Database>::Row;
type Statement<'q, D> =
    Query<'q, <D as Dialect>::Db, <<D as Dialect>::Db as Database>::Arguments<'q>>;

/// What each backend does its own way; everything else is in `sql.rs`.
#[async_trait]
pub(super) trait Dialect: Send + Sync + 'static {
    type Db: Database;

    /// How the backend stores a timestamp.
    type Time: for<'q> Encode<'q, Self::Db>
        + for<'r> Decode<'r, Self::Db>
        + Type<Self::Db>
        + Send
        + 'static;

    /// Short name for logs: "sqlite" or "postgres".
    const NAME: &'static str;

    /// The start of a head read's `SELECT` list (see [`HEAD_NEWEST`]): the row's `sync_key`,
    /// `row_version`, `row_by` and `row_at`.
    const HEAD_SELECT: &'static str;

    fn pool(&self) -> &Pool<Self::Db>;

    fn fed(&self) -> &FedSpaces;

    /// Called after the hub's own committed write: a backend that polls looks at once.
    fn wrote(&self) {}

    /// A timestamp as the backend stores it.
    fn store_time(at: DateTime<Utc>) -> Self::Time;

    /// A stored timestamp as read back.
    fn read_time(stored: Self::Time) -> Stamp;

    /// The number of rows a statement changed.
    fn rows_changed(done: <Self::Db as Database>::QueryResult) -> u64;

    /// Run first in a transaction that reads a backup (see `backup.rs`): every later read of the
    /// transaction sees the database as it was at one point.
    const SNAPSHOT: &'static str;

    /// Run at the end of a restore's transaction: what the backend needs after rows were
    /// inserted with their own ids (PostgreSQL moves the token id sequence past them).
    const AFTER_RESTORE: &'static [&'static str];

    /// `SELECT ... FROM sync_log WHERE 1 = 1` with the columns `sql.rs` reads from a
    /// `sync_log` row, cast as the backend's (possibly adopted) table needs.
    fn sync_log_select(&self) -> String;

    /// See [`super::Store::watch`].
    async fn watch(
        self: Arc<Self>,
        poll_interval: Duration,
        changes: mpsc::UnboundedSender<Change>,
        shutdown: CancellationToken,
    );
}

/// A value bound to a statement parameter; a [`Param::Time`] is bound as the dialect stores
/// timestamps.
#[derive(Clone, Copy, Debug)]
pub(super) enum Param<'q> {
    Text(&'q str),
    MaybeText(Option<&'q str>),
    Int(i64),
    MaybeInt(Option<i64>),
    Flag(bool),
    Time(DateTime<Utc>),
}

/// Runs statements and reads columns for any [`Dialect`] whose database binds and reads the
/// value types of [`Param`]; implemented once, for every such dialect, below.
#[async_trait]
pub(super) trait Run: Dialect {
    /// The rows `sql` returns, run on the pool.
    async fn fetch(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row<Self>>, sqlx::Error>;

    /// Runs `sql` on the pool: the number of rows it changed.
    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, sqlx::Error>;

    /// Runs `sql` on `conn` (a transaction's): the number of rows it changed.
    async fn execute_on(
        conn: &mut Conn<Self>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<u64, sqlx::Error>;

    /// The rows `sql` returns, run on `conn` (a transaction's).
    async fn fetch_on(
        conn: &mut Conn<Self>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row<Self>>, sqlx::Error>;

    fn text(row: &Row<Self>, column: &str) -> Result<String, sqlx::Error>;
    fn maybe_text(row: &Row<Self>, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(row: &Row<Self>, column: &str) -> Result<i64, sqlx::Error>;
    fn maybe_int(row: &Row<Self>, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn flag(row: &Row<Self>, column: &str) -> Result<bool, sqlx::Error>;
    fn time(row: &Row<Self>, column: &str) -> Result<Option<Stamp>, sqlx::Error>;
}

#[async_trait]
impl<D: Dialect> Run for D
where
    for<'c> &'c mut Conn<D>: Executor<'c, Database = D::Db>,
    for<'c> &'c Pool<D::Db>: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    for<'q> &'q str: Encode<'q, D::Db> + Type<D::Db> + ColumnIndex<Row<D>>,
    for<'q> Option<&'q str>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> i64: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<i64>: Encode<'q, D::Db>,
    for<'q> bool: Encode<'q, D::Db> + Decode<'q, D::Db> + Type<D::Db>,
    for<'r> String: Decode<'r, D::Db> + Type<D::Db>,
{
    async fn fetch(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row<Self>>, sqlx::Error> {
        statement::<D>(sql, params).fetch_all(self.pool()).await
    }

    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, sqlx::Error> {
        let done = statement::<D>(sql, params).execute(self.pool()).await?;
        Ok(D::rows_changed(done))
    }

    async fn execute_on(
        conn: &mut Conn<Self>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<u64, sqlx::Error> {
        let done = statement::<D>(sql, params).execute(conn).await?;
        Ok(D::rows_changed(done))
    }

    async fn fetch_on(
        conn: &mut Conn<Self>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row<Self>>, sqlx::Error> {
        statement::<D>(sql, params).fetch_all(conn).await
    }

    fn text(row: &Row<Self>, column: &str) -> Result<String, sqlx::Error> {
        row.try_get(column)
    }

    fn maybe_text(row: &Row<Self>, column: &str) -> Result<Option<String>, sqlx::Error> {
        row.try_get(column)
    }

    fn int(row: &Row<Self>, column: &str) -> Result<i64, sqlx::Error> {
        row.try_get(column)
    }

    fn maybe_int(row: &Row<Self>, column: &str) -> Result<Option<i64>, sqlx::Error> {
        row.try_get(column)
    }

    fn flag(row: &Row<Self>, column: &str) -> Result<bool, sqlx::Error> {
        row.try_get(column)
    }

    fn time(row: &Row<Self>, column: &str) -> Result<Option<Stamp>, sqlx::Error> {
        let stored: Option<D::Time> = row.try_get(column)?;
        Ok(stored.map(D::read_time))
    }
}

/// `sql` with `params` bound in order.
fn statement<'q, D>(sql: &'q str, params: &[Param<'q>]) -> Statement<'q, D>
where
    D: Dialect,
    for<'a> &'a str: Encode<'a, D::Db> + Type<D::Db>,
    for<'a> Option<&'a str>: Encode<'a, D::Db> + Type<D::Db>,
    for<'a> i64: Encode<'a, D::Db> + Type<D::Db>,
    for<'a> Option<i64>: Encode<'a, D::Db>,
    for<'a> bool: Encode<'a, D::Db> + Type<D::Db>,
{
    params
        .iter()
        .fold(sqlx::query(sql), |query, param| match *param {
            Param::Text(v) => query.bind(v),
            Param::MaybeText(v) => query.bind(v),
            Param::Int(v) => query.bind(v),
            Param::MaybeInt(v) => query.bind(v),
            Param::Flag(v) => query.bind(v),
            Param::Time(v) => query.bind(D::store_time(v)),
        })
}

/// Spaces fed by sources (see [`super::Store::set_fed_spaces`]).
#[derive(Default)]
pub(super) struct FedSpaces(RwLock<HashSet<String>>);

impl FedSpaces {
    pub fn set(&self, spaces: &[String]) {
        let mut fed = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *fed = spaces.iter().cloned().collect();
    }

    pub fn contains(&self, space: &str) -> bool {
        let fed = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        fed.contains(space)
    }
}

/// After the dialect's [`Dialect::HEAD_SELECT`]: the newest version record of the row's space
/// (NULLs when none) and the join. `$1` NULL: every row.
pub(super) const HEAD_NEWEST: &str = ",
       v.space, v.version, v.data_hash, v.forced, v.reason, v.created_by, v.created_at,
       v.entries, v.bytes
FROM sync_metadata m
LEFT JOIN synchub_versions v
       ON v.space = m.sync_key
      AND v.version = (SELECT MAX(w.version) FROM synchub_versions w WHERE w.space = m.sync_key)
WHERE CAST($1 AS TEXT) IS NULL OR m.sync_key = $1
ORDER BY m.sync_key";

pub(super) const INSERT_VERSION: &str = "
INSERT INTO synchub_versions
     (space, version, data_hash, forced, reason, created_by, created_at, entries, bytes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (space, version) DO NOTHING";

/// Only if the head is still `$6`; the second alternative lets the hub move on after someone
/// lowered the row below the newest record (the head it serves then is that record). On
/// PostgreSQL the UPDATE locks the row, so a concurrent creator waits and then matches
/// nothing; on SQLite the first statement of the transaction writes, so the write lock is
/// taken before the condition is read against the latest commit.
pub(super) const MOVE_HEAD: &str = "
UPDATE sync_metadata
   SET version = $1, data_hash = $2, last_modified_by = $3,
       last_modified_at = $4, updated_at = $4
 WHERE sync_key = $5
   AND (version = $6
        OR (version < $6 AND $6 = (SELECT MAX(version) FROM synchub_versions
                                    WHERE space = $5)))
   AND NOT EXISTS (SELECT 1 FROM synchub_versions
                    WHERE space = $5 AND version > $6)";

pub(super) const SET_DATA_HASH: &str =
    "UPDATE sync_metadata SET data_hash = $1 WHERE sync_key = $2 AND version = $3";

pub(super) const INSERT_SPACE_ROW: &str = "
INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_at, updated_at)
VALUES ($1, 1, $2, $3, $3)
ON CONFLICT (sync_key) DO NOTHING";

pub(super) const VERSION: &str = "
SELECT space, version, data_hash, forced, reason, created_by, created_at, entries, bytes
  FROM synchub_versions WHERE space = $1 AND version = $2";

pub(super) const VERSIONS: &str = "
SELECT space, version, data_hash, forced, reason, created_by, created_at, entries, bytes
  FROM synchub_versions WHERE space = $1
 ORDER BY version DESC LIMIT $2";

/// The start of an insert into `sync_log`: [`REPORT_COLUMNS`] values per row follow.
pub(super) const INSERT_REPORTS: &str = "
INSERT INTO sync_log
     (report_id, client_id, space, sync_type, status, version, items_synced, bytes,
      duration_ms, error_message, discord_id, synced_at, created_at, items_total)
VALUES";

/// Values per row of [`INSERT_REPORTS`].
pub(super) const REPORT_COLUMNS: usize = 14;

/// Rows per statement of a batch of reports: 280 parameters. Binding looks each parameter's
/// name up in a list on SQLite, so a statement of thousands costs more than several small ones.
pub(super) const REPORT_ROWS: usize = 20;

pub(super) const INSERT_TOKEN: &str = "
INSERT INTO synchub_tokens (name, role, spaces, token_hash, created_at)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, name, role, spaces, token_hash, created_at, revoked_at";

pub(super) const TOKENS: &str = "
SELECT id, name, role, spaces, token_hash, created_at, revoked_at
  FROM synchub_tokens ORDER BY id";

pub(super) const TOKEN_NAMED: &str = "SELECT id FROM synchub_tokens WHERE name = $1";

pub(super) const REVOKE_TOKEN: &str =
    "UPDATE synchub_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL";
