//! The narrow layer where the two SQL backends differ: each implements [`Dialect`] with the
//! statements whose text or value types are its own (casts, timestamps as TEXT or
//! `timestamptz`, `now()`), and `sql.rs` writes the orchestration (head reads, version
//! creation, outside bumps, token names) once over it.
//!
//! Statement text both backends accept (`$N` parameters work in SQLite too) lives here once,
//! with generic binders for its parameters; the timestamp is the one value whose type differs.

use super::rows::{HeadRow, PendingVersion, to_db};
use super::{StoreError, TokenRecord};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::query::Query;
use sqlx::{Database, Encode, Pool, Type};
use std::collections::HashSet;
use std::sync::RwLock;
use synchub_protocol::{Role, SyncReport};

/// A database connection of the dialect's backend (a transaction derefs to one).
pub(super) type Conn<D> = <<D as Dialect>::Db as Database>::Connection;

/// The statements each backend writes in its own SQL; everything else is in `sql.rs`.
#[async_trait]
pub(super) trait Dialect: Send + Sync + 'static {
    type Db: Database;

    fn pool(&self) -> &Pool<Self::Db>;

    fn fed(&self) -> &FedSpaces;

    /// Called after the hub's own committed write: a backend that polls looks at once.
    fn wrote(&self) {}

    /// `sync_metadata` rows joined with their newest version record: `space`'s, or every row
    /// ordered by space when `None`.
    async fn head_rows(&self, space: Option<&str>) -> Result<Vec<HeadRow>, StoreError>;

    /// Records a version once: 1 when inserted, 0 when a record of that number exists.
    async fn insert_version(conn: &mut Conn<Self>, p: &PendingVersion) -> Result<u64, sqlx::Error>;

    /// Moves `p.space`'s row to `p` if its head is still `expected` (see [`MOVE_HEAD`]); the
    /// rows moved, 0 or 1.
    async fn move_head(
        conn: &mut Conn<Self>,
        p: &PendingVersion,
        expected: u64,
    ) -> Result<u64, sqlx::Error>;

    /// Writes `p`'s data hash into its space's row if the row is still at `p`'s version.
    async fn set_data_hash(conn: &mut Conn<Self>, p: &PendingVersion) -> Result<(), sqlx::Error>;

    /// Inserts a new space's row at version 1 with `data_hash`; 0 when the row exists.
    async fn insert_space_row(
        conn: &mut Conn<Self>,
        space: &str,
        data_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error>;

    /// Inserts a token row and returns it as stored.
    async fn insert_token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<String>,
        token_hash: &str,
    ) -> Result<TokenRecord, StoreError>;

    /// True when a token (live or revoked) is named `name`.
    async fn token_named(&self, name: &str) -> Result<bool, sqlx::Error>;

    /// Inserts a `sync_log` row unless one with its `report_id` exists; true when inserted.
    async fn insert_report(
        conn: &mut Conn<Self>,
        report: &SyncReport,
        now: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error>;
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

/// A `sync_metadata` row joined with the newest version record of its space (NULLs when
/// none); each backend prepends its own `SELECT` list (`HEAD_QUERY` there). `$1` NULL: every
/// row.
pub(super) const HEAD_FROM: &str = "
FROM sync_metadata m
LEFT JOIN synchub_versions v
       ON v.space = m.sync_key
      AND v.version = (SELECT MAX(w.version) FROM synchub_versions w WHERE w.space = m.sync_key)
WHERE CAST($1 AS TEXT) IS NULL OR m.sync_key = $1
ORDER BY m.sync_key";

/// Bound by [`bind_version`].
pub(super) const INSERT_VERSION: &str = "
INSERT INTO synchub_versions
     (space, version, data_hash, forced, reason, created_by, created_at, entries, bytes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (space, version) DO NOTHING";

/// Bound by [`bind_move`]. Only if the head is still `$6`; the second alternative lets the hub
/// move on after someone lowered the row below the newest record (the head it serves then is
/// that record). On PostgreSQL the UPDATE locks the row, so a concurrent creator waits and then
/// matches nothing; on SQLite the first statement of the transaction writes, so the write lock
/// is taken before the condition is read against the latest commit.
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

pub(super) const TOKEN_NAMED: &str = "SELECT id FROM synchub_tokens WHERE name = $1";

/// Binds [`INSERT_VERSION`]'s parameters; `at` is `p.at` in the backend's timestamp type.
pub(super) fn bind_version<'q, DB, T>(
    query: Query<'q, DB, DB::Arguments<'q>>,
    p: &'q PendingVersion,
    at: T,
) -> Query<'q, DB, DB::Arguments<'q>>
where
    DB: Database,
    T: 'q + Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
    bool: Encode<'q, DB> + Type<DB>,
{
    query
        .bind(p.space.as_str())
        .bind(to_db(p.version))
        .bind(p.data_hash.as_str())
        .bind(p.forced)
        .bind(p.reason.as_deref())
        .bind(p.by.as_deref())
        .bind(at)
        .bind(to_db(p.entries))
        .bind(to_db(p.bytes))
}

/// Binds [`MOVE_HEAD`]'s parameters; `at` is `p.at` in the backend's timestamp type.
pub(super) fn bind_move<'q, DB, T>(
    query: Query<'q, DB, DB::Arguments<'q>>,
    p: &'q PendingVersion,
    expected: u64,
    at: T,
) -> Query<'q, DB, DB::Arguments<'q>>
where
    DB: Database,
    T: 'q + Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    query
        .bind(to_db(p.version))
        .bind(p.data_hash.as_str())
        .bind(p.by.as_deref())
        .bind(at)
        .bind(p.space.as_str())
        .bind(to_db(expected))
}

/// Binds [`SET_DATA_HASH`]'s parameters.
pub(super) fn bind_data_hash<'q, DB>(
    query: Query<'q, DB, DB::Arguments<'q>>,
    p: &'q PendingVersion,
) -> Query<'q, DB, DB::Arguments<'q>>
where
    DB: Database,
    &'q str: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    query
        .bind(p.data_hash.as_str())
        .bind(p.space.as_str())
        .bind(to_db(p.version))
}
