//! What the garbage collector (`crate::gc`) needs from the database: dropping expired version
//! records and old `sync_log` rows, and the list of doomed blobs (table `synchub_gc_doomed`)
//! through which a commit and a sweep running at the same time agree on who wins a blob.
//!
//! The statements are the same text in both dialects (`$N` parameters, Unix milliseconds as
//! BIGINT), so one implementation is written once and stamped on each backend by a macro; only
//! the `sync_log` age cut-off differs (TEXT timestamps in SQLite, `timestamptz` in PostgreSQL).

use super::StoreError;
use super::dialect::Dialect;
use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use synchub_protocol::Sha256Hex;

/// A blob on the doomed list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoomedBlob {
    pub hash: Sha256Hex,
    /// Unix milliseconds when the collector listed it.
    pub doomed_at: i64,
    /// The collector has started deleting it: commits naming it are refused.
    pub deleting: bool,
}

#[async_trait]
pub trait GcStore: Send + Sync {
    /// Deletes the records of `versions` of `space`, never the newest one (the head); returns
    /// how many went.
    async fn delete_versions(&self, space: &str, versions: &[u64]) -> Result<u64, StoreError>;

    /// Deletes `sync_log` rows written before `before`, and the oldest rows beyond the newest
    /// `keep_rows`; returns how many went.
    async fn prune_sync_log(
        &self,
        before: DateTime<Utc>,
        keep_rows: u64,
    ) -> Result<u64, StoreError>;

    /// Puts `hashes` on the doomed list at `at_ms`; a blob listed already keeps its time.
    async fn doom_blobs(&self, hashes: &[Sha256Hex], at_ms: i64) -> Result<(), StoreError>;

    /// The whole doomed list.
    async fn doomed_blobs(&self) -> Result<Vec<DoomedBlob>, StoreError>;

    /// Takes `hashes` off the doomed list in one transaction, except those being deleted,
    /// which it returns: a version naming one of those must not be recorded.
    async fn spare_blobs(&self, hashes: &[Sha256Hex]) -> Result<Vec<Sha256Hex>, StoreError>;

    /// Marks `hash` as being deleted if it is still doomed (nobody spared it) and was doomed
    /// at or before `doomed_by_ms`; true when marked (the caller may delete the blob).
    async fn start_deleting(&self, hash: &Sha256Hex, doomed_by_ms: i64)
    -> Result<bool, StoreError>;

    /// Forgets `hash` (its blob is deleted, or it is referenced again).
    async fn forget_doomed(&self, hash: &Sha256Hex) -> Result<(), StoreError>;
}

const DELETE_VERSION: &str = "
DELETE FROM synchub_versions
 WHERE space = $1 AND version = $2
   AND version < (SELECT MAX(version) FROM synchub_versions WHERE space = $1)";

/// Rows older than the newest `$1` rows' oldest (by time).
const PRUNE_LOG_ROWS: &str = "
DELETE FROM sync_log
 WHERE synced_at < (SELECT synced_at FROM sync_log
                     WHERE synced_at IS NOT NULL
                     ORDER BY synced_at DESC LIMIT 1 OFFSET $1)";

const PRUNE_LOG_AGE: &str = "DELETE FROM sync_log WHERE synced_at < $1";

const DOOM: &str = "
INSERT INTO synchub_gc_doomed (sha256, doomed_at, deleting) VALUES ($1, $2, FALSE)
ON CONFLICT (sha256) DO NOTHING";

const DOOMED: &str = "SELECT sha256, doomed_at, deleting FROM synchub_gc_doomed";

const SPARE: &str = "DELETE FROM synchub_gc_doomed WHERE sha256 = $1 AND NOT deleting";

const START_DELETING: &str = "
UPDATE synchub_gc_doomed SET deleting = TRUE
 WHERE sha256 = $1 AND NOT deleting AND doomed_at <= $2";

const FORGET: &str = "DELETE FROM synchub_gc_doomed WHERE sha256 = $1";

fn parse_doomed(sha256: String, doomed_at: i64, deleting: bool) -> Result<DoomedBlob, StoreError> {
    let hash = sha256
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("synchub_gc_doomed holds {sha256:?}")))?;
    Ok(DoomedBlob {
        hash,
        doomed_at,
        deleting,
    })
}

/// Implements [`GcStore`] for a backend; `$cutoff` turns the `sync_log` age cut-off into the
/// backend's timestamp value.
macro_rules! gc_store {
    ($store:ty, $cutoff:expr) => {
        #[async_trait]
        impl GcStore for $store {
            async fn delete_versions(
                &self,
                space: &str,
                versions: &[u64],
            ) -> Result<u64, StoreError> {
                let mut tx = Dialect::pool(self).begin().await?;
                let mut deleted = 0;
                for v in versions {
                    deleted += sqlx::query(DELETE_VERSION)
                        .bind(space)
                        .bind(super::rows::to_db(*v))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                Ok(deleted)
            }

            async fn prune_sync_log(
                &self,
                before: DateTime<Utc>,
                keep_rows: u64,
            ) -> Result<u64, StoreError> {
                let by_age = sqlx::query(PRUNE_LOG_AGE)
                    .bind($cutoff(before))
                    .execute(Dialect::pool(self))
                    .await?
                    .rows_affected();
                let by_count = sqlx::query(PRUNE_LOG_ROWS)
                    .bind(super::rows::to_db(keep_rows))
                    .execute(Dialect::pool(self))
                    .await?
                    .rows_affected();
                Ok(by_age + by_count)
            }

            async fn doom_blobs(&self, hashes: &[Sha256Hex], at_ms: i64) -> Result<(), StoreError> {
                let mut tx = Dialect::pool(self).begin().await?;
                for hash in hashes {
                    sqlx::query(DOOM)
                        .bind(hash.as_str())
                        .bind(at_ms)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn doomed_blobs(&self) -> Result<Vec<DoomedBlob>, StoreError> {
                let rows: Vec<(String, i64, bool)> = sqlx::query_as(DOOMED)
                    .fetch_all(Dialect::pool(self))
                    .await?;
                rows.into_iter()
                    .map(|(h, at, deleting)| parse_doomed(h, at, deleting))
                    .collect()
            }

            async fn spare_blobs(
                &self,
                hashes: &[Sha256Hex],
            ) -> Result<Vec<Sha256Hex>, StoreError> {
                // The list is empty but between a sweep's listing and its end: read it whole
                // and write only for the blobs on it.
                let doomed = self.doomed_blobs().await?;
                if doomed.is_empty() {
                    return Ok(Vec::new());
                }
                let wanted: std::collections::HashSet<&Sha256Hex> = hashes.iter().collect();
                let mut tx = Dialect::pool(self).begin().await?;
                for d in doomed.iter().filter(|d| wanted.contains(&d.hash)) {
                    sqlx::query(SPARE)
                        .bind(d.hash.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                let deleting: Vec<(String,)> =
                    sqlx::query_as("SELECT sha256 FROM synchub_gc_doomed WHERE deleting")
                        .fetch_all(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(deleting
                    .into_iter()
                    .filter_map(|(h,)| h.parse::<Sha256Hex>().ok())
                    .filter(|h| wanted.contains(h))
                    .collect())
            }

            async fn start_deleting(
                &self,
                hash: &Sha256Hex,
                doomed_by_ms: i64,
            ) -> Result<bool, StoreError> {
                let marked = sqlx::query(START_DELETING)
                    .bind(hash.as_str())
                    .bind(doomed_by_ms)
                    .execute(Dialect::pool(self))
                    .await?
                    .rows_affected();
                Ok(marked == 1)
            }

            async fn forget_doomed(&self, hash: &Sha256Hex) -> Result<(), StoreError> {
                sqlx::query(FORGET)
                    .bind(hash.as_str())
                    .execute(Dialect::pool(self))
                    .await?;
                Ok(())
            }
        }
    };
}

gc_store!(SqliteStore, super::rows::rfc3339);
gc_store!(PostgresStore, std::convert::identity::<DateTime<Utc>>);
