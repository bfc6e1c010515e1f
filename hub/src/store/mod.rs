//! The hub's database behind one trait, with a SQLite backend (embedded default) and a
//! PostgreSQL backend (production, several replicas).
//!
//! Tables keep system 1's names and columns (`sync_metadata`, `sync_log`) so the hub can run
//! against that app's database; the hub's own tables are prefixed `synchub_`. A space's head is
//! its `sync_metadata` row (`sync_key` = space); every version the hub knows has a row in
//! `synchub_versions` naming the data hash of its manifest (the manifest bytes live in the blob
//! store under that hash).

mod agents;
mod audit;
mod backup;
mod blob_index;
mod dialect;
mod gc;
mod held;
pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;

pub use agents::MAX_AGENTS;
pub use backup::{BackupStore, RECORDS_FORMAT, Record, RecordSink, RecordSource, RecordsError};
pub use gc::{DoomedBlob, GcStore};
pub use rows::ADOPTED_WITHOUT_DATA_REASON;

use async_trait::async_trait;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::{
    AuditEntry, Head, HeldChange, HeldDecision, HeldRecord, Role, Sha256Hex, SyncLogEntry,
    SyncReport, VersionInfo,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Compare-and-swap lost: the head is no longer `expected`.
    #[error("head of {space} moved: expected version {expected}, found {current}")]
    HeadMoved {
        space: String,
        expected: u64,
        current: u64,
    },
    #[error("no space named {0:?}")]
    NoSuchSpace(String),
    #[error("a token named {0:?} already exists")]
    DuplicateToken(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database holds an unexpected value: {0}")]
    Corrupt(String),
}

/// What a new version records besides its number (which the store assigns: head + 1).
#[derive(Clone, Debug)]
pub struct NewVersion {
    pub data_hash: Sha256Hex,
    pub forced: bool,
    pub reason: Option<String>,
    pub by: Option<String>,
    /// Number of manifest entries and their total size, for listings.
    pub entries: u64,
    pub bytes: u64,
}

/// A bearer token as stored: only the sha256 of the secret is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// `None`: every space.
    pub spaces: Option<Vec<String>>,
    pub token_hash: String,
    pub created_at: String,
    pub revoked: bool,
}

/// Filter for `GET /sync-log`; `None` fields do not filter.
#[derive(Clone, Debug, Default)]
pub struct SyncLogFilter {
    /// The space's rows and the rows with no space (written by the old app before the hub).
    pub space: Option<String>,
    pub client_id: Option<String>,
    pub status: Option<String>,
    pub limit: u32,
}

/// What a watcher tells the hub: the named space's row changed (or, `All`, every head must be
/// re-read, e.g. after the listener reconnected), or the token table changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Space(String),
    All,
    Tokens,
}

/// True for the head of a space the hub adopted from an existing row without any content it
/// knows: it must not be announced as data (agents would apply an empty tree and allow use).
pub fn has_no_data(head: &Head) -> bool {
    head.data_hash == Sha256Hex::empty()
        && head.reason.as_deref() == Some(ADOPTED_WITHOUT_DATA_REASON)
}

#[async_trait]
pub trait Store: GcStore + BackupStore + Send + Sync + 'static {
    /// Short name for logs: "sqlite" or "postgres".
    fn backend(&self) -> &'static str;

    /// Names the spaces fed by sources (`sources/`): an outside bump of one of them is not
    /// recorded with the previous content by a head read; the sources re-read their data and
    /// record it with [`Store::record_outside_bump`], so one bump makes one version.
    fn set_fed_spaces(&self, spaces: &[String]);

    /// When `space`'s row is above its newest version record (a bump made outside the hub),
    /// records the row's version with `content` and writes its data hash into the row (which
    /// also wakes every replica's watcher). `None` when there was nothing to record (or another
    /// replica recorded it first). `read_at` is the row's version seen before `content` was
    /// read: a row above it now may have been bumped for data `content` does not hold yet, so
    /// nothing is recorded and the answer is `HeadMoved` (read the sources again).
    async fn record_outside_bump(
        &self,
        space: &str,
        content: &NewVersion,
        read_at: u64,
    ) -> Result<Option<Head>, StoreError>;

    /// Makes sure `space` has a `sync_metadata` row and a version record, creating version 1
    /// with the empty manifest for a new space. For a row written by system 1 (no version
    /// record yet) it records the row's version with the empty manifest. Returns the head.
    async fn ensure_space(&self, space: &str) -> Result<Head, StoreError>;

    /// The current head of `space`, or `None` when it has no `sync_metadata` row. When the row's
    /// version is above the newest version record (a bump by another program), records that
    /// version first, forced, with the previous manifest and `by` = `last_modified_by`.
    async fn head(&self, space: &str) -> Result<Option<Head>, StoreError>;

    /// Heads of every space with a `sync_metadata` row, as [`Store::head`] reads them.
    async fn heads(&self) -> Result<Vec<Head>, StoreError>;

    /// Records version `expected + 1` and moves `sync_metadata` to it (version, data_hash,
    /// last_modified_by, last_modified_at, updated_at) in one transaction, only if the head is
    /// still `expected`; otherwise `HeadMoved`.
    async fn create_version(
        &self,
        space: &str,
        expected: u64,
        new: NewVersion,
    ) -> Result<Head, StoreError>;

    /// One recorded version of `space`.
    async fn version(&self, space: &str, version: u64) -> Result<Option<Head>, StoreError>;

    /// Recorded versions, newest first.
    async fn versions(&self, space: &str, limit: u32) -> Result<Vec<VersionInfo>, StoreError>;

    /// Stores a report in `sync_log` unless one with its `report_id` exists; true when stored.
    async fn insert_report(&self, report: &SyncReport) -> Result<bool, StoreError> {
        let stored = self.insert_reports(std::slice::from_ref(report)).await?;
        Ok(stored.first().copied().unwrap_or(false))
    }

    /// [`Store::insert_report`] for each of `reports`, all in one transaction (nothing stored
    /// when it fails); whether each was stored, in order.
    async fn insert_reports(&self, reports: &[SyncReport]) -> Result<Vec<bool>, StoreError>;

    /// `sync_log` rows, newest first.
    async fn sync_log(&self, filter: &SyncLogFilter) -> Result<Vec<SyncLogEntry>, StoreError>;

    /// Stores a token; `DuplicateToken` if the name is taken (by a live or revoked token).
    async fn create_token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<&[String]>,
        token_hash: &str,
    ) -> Result<TokenRecord, StoreError>;

    /// Every token, revoked ones included, oldest first.
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Marks the token named `name` revoked; false when there is no live token of that name.
    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError>;

    /// Records an agent's held change (see `store/held.rs`), keeping the decision of one
    /// already recorded; returns it as stored.
    async fn put_held(
        &self,
        space: &str,
        client_id: &str,
        change: &HeldChange,
    ) -> Result<HeldRecord, StoreError>;

    /// Every held change, oldest first (at most 1000).
    async fn held_changes(&self) -> Result<Vec<HeldRecord>, StoreError>;

    /// Approves or rejects a pending held change; false when there is none.
    async fn decide_held(
        &self,
        space: &str,
        client_id: &str,
        decision: HeldDecision,
        by: &str,
    ) -> Result<bool, StoreError>;

    /// Forgets a held change (the agent has acted on it).
    async fn delete_held(&self, space: &str, client_id: &str) -> Result<(), StoreError>;

    /// Records agents as last heard of, one row per space and client id (inserted or
    /// replaced; `online` is kept as whether the agent was connected then). See `fleet.rs`.
    async fn put_agents(&self, agents: &[synchub_protocol::FleetAgent]) -> Result<(), StoreError>;

    /// The recorded agents of `space`, last seen newest first (at most [`MAX_AGENTS`]).
    async fn agents(&self, space: &str) -> Result<Vec<synchub_protocol::FleetAgent>, StoreError>;
    /// Appends an admin action to the audit log (see `store/audit.rs`).
    async fn record_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        from: Option<&str>,
    ) -> Result<(), StoreError>;

    /// The newest `limit` audit entries, newest first.
    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;

    /// Records that `space` references the blobs `hashes` (see `store/blob_index.rs`).
    async fn index_blobs(&self, space: &str, hashes: &[Sha256Hex]) -> Result<(), StoreError>;

    /// Those of `hashes` that one of `spaces` references (`None`: any space) or that the token
    /// `token_id` uploaded itself.
    async fn readable_blobs(
        &self,
        hashes: &[Sha256Hex],
        spaces: Option<&[String]>,
        token_id: i64,
    ) -> Result<HashSet<Sha256Hex>, StoreError>;

    /// Records that the token `token_id` uploaded the blob `hash`.
    async fn note_upload(&self, hash: &Sha256Hex, token_id: i64) -> Result<(), StoreError>;

    /// Binds `client_id` to the token `token_id` unless it is bound already; returns the
    /// token it is bound to.
    async fn bind_client(&self, client_id: &str, token_id: i64) -> Result<i64, StoreError>;

    /// Runs until `shutdown`, sending a [`Change`] whenever a `sync_metadata` row or the token
    /// table changes, whoever changed it. SQLite polls every `poll_interval` (one query per
    /// interval); PostgreSQL LISTENs, reconnects by itself and sends `Change::All` and
    /// `Change::Tokens` after every reconnect so that no change made meanwhile is lost. Both
    /// also send those two once when they start (the first poll, the first LISTEN), closing the
    /// gap between the hub's start-up read and the watch.
    async fn watch(
        self: Arc<Self>,
        poll_interval: Duration,
        changes: mpsc::UnboundedSender<Change>,
        shutdown: CancellationToken,
    );
}

/// Opens the store a database URL names: `sqlite://PATH` (created when missing) or
/// `postgres://...`, and runs its migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::open(url).await?))
    } else {
        Ok(Arc::new(sqlite::SqliteStore::open(url).await?))
    }
}
