//! What the SQLite and PostgreSQL stores do the same way, written once over a [`Dialect`]:
//! resolving head reads (recording an outside bump first when the row is ahead), creating a
//! version with compare-and-swap, recording a fed space's outside bump, creating a space, and
//! telling a duplicate token name from other failures, and writing a batch of sync reports in
//! one transaction. Each backend's `Store` impl calls these.

use super::dialect::Dialect;
use super::rows::{HeadPlan, HeadRow, PendingVersion, plan_fed_bump, plan_head};
use super::{NewVersion, StoreError, TokenRecord};
use chrono::Utc;
use synchub_protocol::{Head, Role, Sha256Hex, SyncReport};

/// The current head of `space`, or `None` when it has no `sync_metadata` row.
pub(super) async fn head<D: Dialect>(d: &D, space: &str) -> Result<Option<Head>, StoreError> {
    match d.head_rows(Some(space)).await?.pop() {
        Some(row) => Ok(Some(resolve(d, row).await?)),
        None => Ok(None),
    }
}

/// Heads of every space with a `sync_metadata` row.
pub(super) async fn heads<D: Dialect>(d: &D) -> Result<Vec<Head>, StoreError> {
    let mut heads = Vec::new();
    for row in d.head_rows(None).await? {
        heads.push(resolve(d, row).await?);
    }
    Ok(heads)
}

/// Resolves one head row, recording a version first when [`plan_head`] asks for it. Another
/// replica or process may record the same version at the same time: the insert does nothing
/// then and the re-read serves whichever record won.
async fn resolve<D: Dialect>(d: &D, mut row: HeadRow) -> Result<Head, StoreError> {
    for _ in 0..3 {
        let fed = d.fed().contains(&row.space);
        match plan_head(row, fed)? {
            HeadPlan::Serve(head) => return Ok(head),
            HeadPlan::Record(pending) => {
                // The connection goes back to the pool before the re-read takes one.
                D::insert_version(&mut *d.pool().acquire().await?, &pending).await?;
                row = d
                    .head_rows(Some(&pending.space))
                    .await?
                    .pop()
                    .ok_or_else(|| {
                        let space = &pending.space;
                        StoreError::Corrupt(format!("sync_metadata row of {space:?} vanished"))
                    })?;
            }
        }
    }
    Err(StoreError::Corrupt(
        "head kept moving while it was being recorded".into(),
    ))
}

/// Records version `expected + 1` and moves the row to it in one transaction, only if the head
/// is still `expected`; otherwise `HeadMoved` with the head found.
pub(super) async fn create_version<D: Dialect>(
    d: &D,
    space: &str,
    expected: u64,
    new: NewVersion,
) -> Result<Head, StoreError> {
    let p = PendingVersion {
        space: space.to_owned(),
        version: expected + 1,
        data_hash: new.data_hash,
        forced: new.forced,
        reason: new.reason,
        by: new.by,
        at: Utc::now(),
        entries: new.entries,
        bytes: new.bytes,
    };
    let mut tx = d.pool().begin().await?;
    // A record of that number existing already means the head moved after all.
    if D::move_head(&mut *tx, &p, expected).await? == 1
        && D::insert_version(&mut *tx, &p).await? == 1
    {
        tx.commit().await?;
        d.wrote();
        return Ok(p.into_head());
    }
    tx.rollback().await?;
    match head(d, space).await? {
        Some(head) => Err(StoreError::HeadMoved {
            space: space.to_owned(),
            expected,
            current: head.version,
        }),
        None => Err(StoreError::NoSuchSpace(space.to_owned())),
    }
}

/// See [`super::Store::record_outside_bump`]: the record and the row's data hash in one
/// transaction; `None` when there was nothing to record or another replica recorded it first.
pub(super) async fn record_outside_bump<D: Dialect>(
    d: &D,
    space: &str,
    content: &NewVersion,
    read_at: u64,
) -> Result<Option<Head>, StoreError> {
    let Some(row) = d.head_rows(Some(space)).await?.pop() else {
        return Err(StoreError::NoSuchSpace(space.to_owned()));
    };
    let row_version = u64::try_from(row.row_version).unwrap_or(0);
    if row_version > read_at {
        return Err(StoreError::HeadMoved {
            space: space.to_owned(),
            expected: read_at,
            current: row_version,
        });
    }
    let Some(p) = plan_fed_bump(row, content)? else {
        return Ok(None);
    };
    let mut tx = d.pool().begin().await?;
    if D::insert_version(&mut *tx, &p).await? == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    D::set_data_hash(&mut *tx, &p).await?;
    tx.commit().await?;
    d.wrote();
    Ok(Some(p.into_head()))
}

/// See [`super::Store::ensure_space`]. The row and its first (empty) version in one
/// transaction: a new space is empty data, not a row adopted without data.
pub(super) async fn ensure_space<D: Dialect>(d: &D, space: &str) -> Result<Head, StoreError> {
    let first = PendingVersion {
        space: space.to_owned(),
        version: 1,
        data_hash: Sha256Hex::empty(),
        forced: false,
        reason: None,
        by: None,
        at: Utc::now(),
        entries: 0,
        bytes: 0,
    };
    let mut tx = d.pool().begin().await?;
    let created = D::insert_space_row(&mut *tx, space, first.data_hash.as_str(), first.at).await?;
    if created > 0 {
        D::insert_version(&mut *tx, &first).await?;
    }
    tx.commit().await?;
    let head = head(d, space)
        .await?
        .ok_or_else(|| StoreError::NoSuchSpace(space.to_owned()))?;
    if created > 0 {
        d.wrote();
    }
    Ok(head)
}

/// Stores a token; `DuplicateToken` when the insert failed because the name is taken.
pub(super) async fn create_token<D: Dialect>(
    d: &D,
    name: &str,
    role: Role,
    spaces: Option<String>,
    token_hash: &str,
) -> Result<TokenRecord, StoreError> {
    match d.insert_token(name, role, spaces, token_hash).await {
        Ok(token) => {
            d.wrote();
            Ok(token)
        }
        Err(StoreError::Database(e)) if is_unique_violation(&e) => {
            if d.token_named(name).await? {
                Err(StoreError::DuplicateToken(name.to_owned()))
            } else {
                Err(e.into())
            }
        }
        Err(e) => Err(e),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// See [`super::Store::insert_reports`]: every report in one transaction, so a batch costs one
/// commit (one fsync) however many rows it has.
pub(super) async fn insert_reports<D: Dialect>(
    d: &D,
    reports: &[SyncReport],
) -> Result<Vec<bool>, StoreError> {
    let now = Utc::now();
    let mut tx = d.pool().begin().await?;
    let mut stored = Vec::with_capacity(reports.len());
    for report in reports {
        stored.push(D::insert_report(&mut *tx, report, now).await?);
    }
    tx.commit().await?;
    Ok(stored)
}
