//! The store itself, written once for both SQL backends over a [`Dialect`]: the [`Store`]
//! impl of every dialect, resolving head reads (recording an outside bump first when the row is
//! ahead), creating a version with compare-and-swap, recording a fed space's outside bump,
//! creating a space, telling a duplicate token name from other failures, and reading rows into
//! API types. The backend files keep only their pools, SQL casts and change watchers.

use super::dialect::{
    Conn, Dialect, HEAD_NEWEST, INSERT_REPORTS, INSERT_SPACE_ROW, INSERT_TOKEN, INSERT_VERSION,
    MOVE_HEAD, Param, REPORT_COLUMNS, REPORT_ROWS, REVOKE_TOKEN, Row, Run, SET_DATA_HASH,
    TOKEN_NAMED, TOKENS, VERSION, VERSIONS,
};
use super::rows::{
    HeadPlan, HeadRow, PendingVersion, decode_spaces, encode_spaces, from_db, list_limit,
    parse_hash, parse_role, parse_timestamp, plan_fed_bump, plan_head, to_db,
};
use super::{
    Change, NewVersion, Store, StoreError, SyncLogFilter, TokenRecord, agents, audit, blob_index,
    held,
};
use async_trait::async_trait;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::{
    Head, HeldChange, HeldDecision, HeldRecord, Role, Sha256Hex, SyncLogEntry, SyncReport,
    VersionInfo,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[async_trait]
impl<D: Run> Store for D {
    fn backend(&self) -> &'static str {
        D::NAME
    }

    fn set_fed_spaces(&self, spaces: &[String]) {
        self.fed().set(spaces);
    }

    async fn record_outside_bump(
        &self,
        space: &str,
        content: &NewVersion,
        read_at: u64,
    ) -> Result<Option<Head>, StoreError> {
        record_outside_bump(self, space, content, read_at).await
    }

    async fn ensure_space(&self, space: &str) -> Result<Head, StoreError> {
        ensure_space(self, space).await
    }

    async fn head(&self, space: &str) -> Result<Option<Head>, StoreError> {
        head(self, space).await
    }

    async fn heads(&self) -> Result<Vec<Head>, StoreError> {
        let mut heads = Vec::new();
        for row in head_rows(self, None).await? {
            heads.push(resolve(self, row).await?);
        }
        Ok(heads)
    }

    async fn create_version(
        &self,
        space: &str,
        expected: u64,
        new: NewVersion,
    ) -> Result<Head, StoreError> {
        create_version(self, space, expected, new).await
    }

    async fn version(&self, space: &str, version: u64) -> Result<Option<Head>, StoreError> {
        let params = [Param::Text(space), Param::Int(to_db(version))];
        let rows = self.fetch(VERSION, &params).await?;
        rows.first()
            .map(|row| version_info::<D>(row).map(|v| v.head))
            .transpose()
    }

    async fn versions(&self, space: &str, limit: u32) -> Result<Vec<VersionInfo>, StoreError> {
        let params = [Param::Text(space), Param::Int(list_limit(limit))];
        let rows = self.fetch(VERSIONS, &params).await?;
        rows.iter().map(version_info::<D>).collect()
    }

    async fn insert_reports(&self, reports: &[SyncReport]) -> Result<Vec<bool>, StoreError> {
        // One transaction: a batch costs one commit (one fsync) however many rows it has; and
        // a statement per [`REPORT_ROWS`] rows, not per row (on SQLite each statement is a
        // round trip to the database's thread).
        let now = Utc::now();
        let synced: Vec<_> = reports
            .iter()
            .map(|r| {
                r.synced_at
                    .as_deref()
                    .and_then(parse_timestamp)
                    .unwrap_or(now)
            })
            .collect();
        let mut tx = self.pool().begin().await?;
        let mut inserted = std::collections::HashSet::new();
        for (chunk, synced) in reports.chunks(REPORT_ROWS).zip(synced.chunks(REPORT_ROWS)) {
            let mut params = Vec::with_capacity(chunk.len() * REPORT_COLUMNS);
            for (report, synced_at) in chunk.iter().zip(synced) {
                params.extend([
                    Param::Text(&report.report_id),
                    Param::Text(&report.client_id),
                    Param::Text(&report.space),
                    Param::Text(report.sync_type.as_str()),
                    Param::Text(report.status.as_str()),
                    Param::MaybeInt(report.version.map(to_db)),
                    Param::Int(to_db(report.items_synced)),
                    Param::Int(to_db(report.bytes)),
                    Param::Int(to_db(report.duration_ms)),
                    Param::MaybeText(report.error_message.as_deref()),
                    Param::MaybeText(report.user.as_deref()),
                    Param::Time(*synced_at),
                    Param::Time(now),
                    Param::MaybeInt(report.items_total.map(to_db)),
                ]);
            }
            let rows = blob_index::value_rows(chunk.len(), REPORT_COLUMNS);
            let sql = format!(
                "{INSERT_REPORTS} {rows} ON CONFLICT (report_id) DO NOTHING RETURNING report_id"
            );
            for row in D::fetch_on(&mut *tx, &sql, &params).await? {
                inserted.insert(D::text(&row, "report_id")?);
            }
        }
        tx.commit().await?;
        // Stored now: inserted by this batch, and the first of the batch with its id (a report
        // sent twice in one batch is a duplicate the second time).
        Ok(reports
            .iter()
            .map(|r| inserted.remove(&r.report_id))
            .collect())
    }

    async fn sync_log(&self, filter: &SyncLogFilter) -> Result<Vec<SyncLogEntry>, StoreError> {
        let mut sql = self.sync_log_select();
        let mut params = Vec::new();
        // Rows the old app wrote have no space: they belong to every space's log.
        if let Some(space) = &filter.space {
            params.push(Param::Text(space));
            sql += &format!(" AND (space = ${} OR space IS NULL)", params.len());
        }
        for (column, value) in [("client_id", &filter.client_id), ("status", &filter.status)] {
            if let Some(value) = value {
                params.push(Param::Text(value));
                sql += &format!(" AND {column} = ${}", params.len());
            }
        }
        params.push(Param::Int(list_limit(filter.limit)));
        // The select list's `synced_at` and `id` (not the table's columns), newest first.
        sql += &format!(" ORDER BY synced_at DESC, id DESC LIMIT ${}", params.len());
        let rows = self.fetch(&sql, &params).await?;
        rows.iter().map(log_entry::<D>).collect()
    }

    async fn create_token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<&[String]>,
        token_hash: &str,
    ) -> Result<TokenRecord, StoreError> {
        let spaces = encode_spaces(spaces);
        let params = [
            Param::Text(name),
            Param::Text(role.as_str()),
            Param::MaybeText(spaces.as_deref()),
            Param::Text(token_hash),
            Param::Time(Utc::now()),
        ];
        match self.fetch(INSERT_TOKEN, &params).await {
            Ok(rows) => {
                self.wrote();
                let row = rows.first().ok_or_else(|| {
                    StoreError::Corrupt(format!("token {name:?} was not returned by its insert"))
                })?;
                token::<D>(row)
            }
            Err(e) if is_unique_violation(&e) => {
                if self
                    .fetch(TOKEN_NAMED, &[Param::Text(name)])
                    .await?
                    .is_empty()
                {
                    Err(e.into())
                } else {
                    Err(StoreError::DuplicateToken(name.to_owned()))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self.fetch(TOKENS, &[]).await?;
        rows.iter().map(token::<D>).collect()
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let params = [Param::Time(Utc::now()), Param::Text(name)];
        let revoked = self.execute(REVOKE_TOKEN, &params).await?;
        if revoked > 0 {
            self.wrote();
        }
        Ok(revoked > 0)
    }

    async fn put_held(
        &self,
        space: &str,
        client_id: &str,
        change: &HeldChange,
    ) -> Result<HeldRecord, StoreError> {
        held::put(self, space, client_id, change).await
    }

    async fn held_changes(&self) -> Result<Vec<HeldRecord>, StoreError> {
        held::list(self).await
    }

    async fn decide_held(
        &self,
        space: &str,
        client_id: &str,
        decision: HeldDecision,
        by: &str,
    ) -> Result<bool, StoreError> {
        held::decide(self, space, client_id, decision, by).await
    }

    async fn delete_held(&self, space: &str, client_id: &str) -> Result<(), StoreError> {
        held::delete(self, space, client_id).await
    }

    async fn put_agents(&self, rows: &[synchub_protocol::FleetAgent]) -> Result<(), StoreError> {
        agents::put(self, rows).await
    }

    async fn agents(&self, space: &str) -> Result<Vec<synchub_protocol::FleetAgent>, StoreError> {
        agents::list(self, space).await
    }

    async fn record_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        from: Option<&str>,
    ) -> Result<(), StoreError> {
        audit::record(self, who, action, target, from).await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<synchub_protocol::AuditEntry>, StoreError> {
        audit::list(self, limit).await
    }

    async fn index_blobs(&self, space: &str, hashes: &[Sha256Hex]) -> Result<(), StoreError> {
        blob_index::index(self, space, hashes).await
    }

    async fn readable_blobs(
        &self,
        hashes: &[Sha256Hex],
        spaces: Option<&[String]>,
        token_id: i64,
    ) -> Result<std::collections::HashSet<Sha256Hex>, StoreError> {
        blob_index::readable(self, hashes, spaces, token_id).await
    }

    async fn note_upload(&self, hash: &Sha256Hex, token_id: i64) -> Result<(), StoreError> {
        blob_index::note_upload(self, hash, token_id).await
    }

    async fn bind_client(&self, client_id: &str, token_id: i64) -> Result<i64, StoreError> {
        blob_index::bind_client(self, client_id, token_id).await
    }

    async fn watch(
        self: Arc<Self>,
        poll_interval: Duration,
        changes: mpsc::UnboundedSender<Change>,
        shutdown: CancellationToken,
    ) {
        Dialect::watch(self, poll_interval, changes, shutdown).await;
    }
}

/// `sync_metadata` rows joined with their newest version record: `space`'s, or every row
/// ordered by space when `None`.
async fn head_rows<D: Run>(d: &D, space: Option<&str>) -> Result<Vec<HeadRow>, StoreError> {
    let sql = format!("{}{HEAD_NEWEST}", D::HEAD_SELECT);
    let rows = d.fetch(&sql, &[Param::MaybeText(space)]).await?;
    rows.iter().map(head_row::<D>).collect()
}

fn head_row<D: Run>(row: &Row<D>) -> Result<HeadRow, StoreError> {
    let newest = match D::maybe_int(row, "version")? {
        Some(_) => Some(version_info::<D>(row)?),
        None => None,
    };
    Ok(HeadRow {
        space: D::text(row, "sync_key")?,
        row_version: D::int(row, "row_version")?,
        row_by: D::maybe_text(row, "row_by")?,
        row_at: D::time(row, "row_at")?.and_then(|at| at.at()),
        newest,
    })
}

/// Reads a version record's columns (by name: also from a head read's row).
fn version_info<D: Run>(row: &Row<D>) -> Result<VersionInfo, StoreError> {
    let created_at = D::time(row, "created_at")?
        .ok_or_else(|| StoreError::Corrupt("a version record without created_at".into()))?;
    Ok(VersionInfo {
        head: Head {
            space: D::text(row, "space")?,
            version: from_db(D::int(row, "version")?, "version")?,
            data_hash: parse_hash(D::text(row, "data_hash")?)?,
            forced: D::flag(row, "forced")?,
            reason: D::maybe_text(row, "reason")?,
            by: D::maybe_text(row, "created_by")?,
            at: created_at.shown(),
            epoch: 0,
            forced_version: 0,
        },
        entries: from_db(D::int(row, "entries")?, "entries")?,
        bytes: from_db(D::int(row, "bytes")?, "bytes")?,
    })
}

fn token<D: Run>(row: &Row<D>) -> Result<TokenRecord, StoreError> {
    let created_at = D::time(row, "created_at")?
        .ok_or_else(|| StoreError::Corrupt("a token without created_at".into()))?;
    Ok(TokenRecord {
        id: D::int(row, "id")?,
        name: D::text(row, "name")?,
        role: parse_role(&D::text(row, "role")?)?,
        spaces: decode_spaces(D::maybe_text(row, "spaces")?)?,
        token_hash: D::text(row, "token_hash")?,
        created_at: created_at.shown(),
        revoked: D::time(row, "revoked_at")?.is_some(),
    })
}

fn log_entry<D: Run>(row: &Row<D>) -> Result<SyncLogEntry, StoreError> {
    Ok(SyncLogEntry {
        id: D::int(row, "id")?,
        report_id: D::maybe_text(row, "report_id")?,
        client_id: D::maybe_text(row, "client_id")?,
        space: D::maybe_text(row, "space")?,
        sync_type: D::text(row, "sync_type")?,
        status: D::text(row, "status")?,
        version: D::maybe_int(row, "version")?,
        items_synced: D::maybe_int(row, "items_synced")?,
        items_total: D::maybe_int(row, "items_total")?,
        bytes: D::maybe_int(row, "bytes")?,
        duration_ms: D::maybe_int(row, "duration_ms")?,
        error_message: D::maybe_text(row, "error_message")?,
        user: D::maybe_text(row, "discord_id")?,
        synced_at: D::time(row, "synced_at")?
            .map(|at| at.shown())
            .unwrap_or_default(),
    })
}

/// Records a version once: 1 when inserted, 0 when a record of that number exists.
async fn insert_version<D: Run>(
    conn: &mut Conn<D>,
    p: &PendingVersion,
) -> Result<u64, sqlx::Error> {
    let params = [
        Param::Text(&p.space),
        Param::Int(to_db(p.version)),
        Param::Text(p.data_hash.as_str()),
        Param::Flag(p.forced),
        Param::MaybeText(p.reason.as_deref()),
        Param::MaybeText(p.by.as_deref()),
        Param::Time(p.at),
        Param::Int(to_db(p.entries)),
        Param::Int(to_db(p.bytes)),
    ];
    D::execute_on(conn, INSERT_VERSION, &params).await
}

/// Moves `p.space`'s row to `p` if its head is still `expected` (see [`MOVE_HEAD`]); the rows
/// moved, 0 or 1.
async fn move_head<D: Run>(
    conn: &mut Conn<D>,
    p: &PendingVersion,
    expected: u64,
) -> Result<u64, sqlx::Error> {
    let params = [
        Param::Int(to_db(p.version)),
        Param::Text(p.data_hash.as_str()),
        Param::MaybeText(p.by.as_deref()),
        Param::Time(p.at),
        Param::Text(&p.space),
        Param::Int(to_db(expected)),
    ];
    D::execute_on(conn, MOVE_HEAD, &params).await
}

/// The current head of `space`, or `None` when it has no `sync_metadata` row.
async fn head<D: Run>(d: &D, space: &str) -> Result<Option<Head>, StoreError> {
    match head_rows(d, Some(space)).await?.pop() {
        Some(row) => Ok(Some(resolve(d, row).await?)),
        None => Ok(None),
    }
}

/// Resolves one head row, recording a version first when [`plan_head`] asks for it. Another
/// replica or process may record the same version at the same time: the insert does nothing
/// then and the re-read serves whichever record won.
async fn resolve<D: Run>(d: &D, mut row: HeadRow) -> Result<Head, StoreError> {
    for _ in 0..3 {
        let fed = d.fed().contains(&row.space);
        match plan_head(row, fed)? {
            HeadPlan::Serve(head) => return Ok(head),
            HeadPlan::Record(pending) => {
                // The connection goes back to the pool before the re-read takes one.
                insert_version::<D>(&mut *d.pool().acquire().await?, &pending).await?;
                row = head_rows(d, Some(&pending.space))
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
async fn create_version<D: Run>(
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
    if move_head::<D>(&mut *tx, &p, expected).await? == 1
        && insert_version::<D>(&mut *tx, &p).await? == 1
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
async fn record_outside_bump<D: Run>(
    d: &D,
    space: &str,
    content: &NewVersion,
    read_at: u64,
) -> Result<Option<Head>, StoreError> {
    let Some(row) = head_rows(d, Some(space)).await?.pop() else {
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
    if insert_version::<D>(&mut *tx, &p).await? == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    let params = [
        Param::Text(p.data_hash.as_str()),
        Param::Text(&p.space),
        Param::Int(to_db(p.version)),
    ];
    D::execute_on(&mut *tx, SET_DATA_HASH, &params).await?;
    tx.commit().await?;
    d.wrote();
    Ok(Some(p.into_head()))
}

/// See [`super::Store::ensure_space`]. The row and its first (empty) version in one
/// transaction: a new space is empty data, not a row adopted without data.
async fn ensure_space<D: Run>(d: &D, space: &str) -> Result<Head, StoreError> {
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
    let params = [
        Param::Text(space),
        Param::Text(first.data_hash.as_str()),
        Param::Time(first.at),
    ];
    let created = D::execute_on(&mut *tx, INSERT_SPACE_ROW, &params).await?;
    if created > 0 {
        insert_version::<D>(&mut *tx, &first).await?;
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

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}
