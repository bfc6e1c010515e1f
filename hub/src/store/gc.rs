//! What the garbage collector (`crate::gc`) needs from the database: dropping expired version
//! records and old `sync_log` rows, and the list of doomed blobs (table `synchub_gc_doomed`)
//! through which a commit and a sweep running at the same time agree on who wins a blob.
//!
//! The statements are the same text in both dialects (`$N` parameters, Unix milliseconds as
//! BIGINT; the `sync_log` cut-off is a [`Param::Time`], bound as each backend stores time), so
//! they are written once over [`Run`].

use super::StoreError;
use super::dialect::{Param, Row, Run};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashSet;
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

/// Every row not among the newest `$1` (by time): the (`$1` + 1)th newest and older. Rows
/// written at the same instant as that one go too, so at most `$1` stay.
const PRUNE_LOG_ROWS: &str = "
DELETE FROM sync_log
 WHERE synced_at <= (SELECT synced_at FROM sync_log
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

fn doomed_from_row<D: Run>(row: &Row<D>) -> Result<DoomedBlob, StoreError> {
    let sha256 = D::text(row, "sha256")?;
    let hash = sha256
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("synchub_gc_doomed holds {sha256:?}")))?;
    Ok(DoomedBlob {
        hash,
        doomed_at: D::int(row, "doomed_at")?,
        deleting: D::flag(row, "deleting")?,
    })
}

#[async_trait]
impl<D: Run> GcStore for D {
    async fn delete_versions(&self, space: &str, versions: &[u64]) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let mut deleted = 0;
        for v in versions {
            let params = [Param::Text(space), Param::Int(super::rows::to_db(*v))];
            deleted += D::execute_on(&mut *tx, DELETE_VERSION, &params).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn prune_sync_log(
        &self,
        before: DateTime<Utc>,
        keep_rows: u64,
    ) -> Result<u64, StoreError> {
        let by_age = self.execute(PRUNE_LOG_AGE, &[Param::Time(before)]).await?;
        let keep = Param::Int(super::rows::to_db(keep_rows));
        let by_count = self.execute(PRUNE_LOG_ROWS, &[keep]).await?;
        Ok(by_age + by_count)
    }

    async fn doom_blobs(&self, hashes: &[Sha256Hex], at_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        for hash in hashes {
            let params = [Param::Text(hash.as_str()), Param::Int(at_ms)];
            D::execute_on(&mut *tx, DOOM, &params).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn doomed_blobs(&self) -> Result<Vec<DoomedBlob>, StoreError> {
        let rows = self.fetch(DOOMED, &[]).await?;
        rows.iter().map(doomed_from_row::<D>).collect()
    }

    async fn spare_blobs(&self, hashes: &[Sha256Hex]) -> Result<Vec<Sha256Hex>, StoreError> {
        // The list is empty but between a sweep's listing and its end: read it whole and
        // write only for the blobs on it.
        let doomed = self.doomed_blobs().await?;
        let wanted: HashSet<&Sha256Hex> = hashes.iter().collect();
        let on_list: Vec<&DoomedBlob> =
            doomed.iter().filter(|d| wanted.contains(&d.hash)).collect();
        if on_list.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool().begin().await?;
        for d in &on_list {
            D::execute_on(&mut *tx, SPARE, &[Param::Text(d.hash.as_str())]).await?;
        }
        tx.commit().await?;
        // Read after the deletes: a row marked `deleting` meanwhile is seen (and refused).
        Ok(self
            .doomed_blobs()
            .await?
            .into_iter()
            .filter(|d| d.deleting && wanted.contains(&d.hash))
            .map(|d| d.hash)
            .collect())
    }

    async fn start_deleting(
        &self,
        hash: &Sha256Hex,
        doomed_by_ms: i64,
    ) -> Result<bool, StoreError> {
        let params = [Param::Text(hash.as_str()), Param::Int(doomed_by_ms)];
        Ok(self.execute(START_DELETING, &params).await? == 1)
    }

    async fn forget_doomed(&self, hash: &Sha256Hex) -> Result<(), StoreError> {
        self.execute(FORGET, &[Param::Text(hash.as_str())]).await?;
        Ok(())
    }
}
