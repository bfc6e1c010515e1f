//! What a backup holds of the database and how it goes back in (see `crate::backup` for the
//! blobs, the files and the schedule). [`Record`] is one line of a backup's records file: the
//! format is documented in docs/OPERATIONS.md and versioned by [`RECORDS_FORMAT`].
//!
//! [`BackupStore::export`] reads every table a restored hub needs inside one read transaction
//! (PostgreSQL: REPEATABLE READ; SQLite: one deferred transaction, whose snapshot is fixed at
//! its first read), so the records are one consistent point however long the reading takes.
//! [`BackupStore::import`] writes them into an empty database in one transaction: a restore
//! that fails leaves no row behind. Written once for both backends over [`Run`].

use super::StoreError;
use super::dialect::{Conn, Param, Row, Run};
use super::rows::parse_timestamp;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The version of the records file's format; a restore refuses another.
pub const RECORDS_FORMAT: u32 = 1;

/// Rows read per statement from the tables that may be long (`sync_log`, the audit log, the
/// blob index), so memory stays bounded.
const PAGE: i64 = 5_000;

/// One line of a backup's records file (JSON, tagged by `kind`). Times are RFC 3339 as the
/// hub shows them (or the stored text, for a row another program wrote in its own form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The first line.
    Header {
        format: u32,
        /// The backend it was read from: "sqlite" or "postgres".
        backend: String,
        taken_at: String,
    },
    /// A space's `sync_metadata` row: its head as agents see it.
    Space {
        space: String,
        version: i64,
        data_hash: Option<String>,
        last_modified_by: Option<String>,
        last_modified_at: Option<String>,
    },
    /// A version record (`synchub_versions`).
    Version {
        space: String,
        version: i64,
        data_hash: String,
        forced: bool,
        reason: Option<String>,
        created_by: Option<String>,
        created_at: String,
        entries: i64,
        bytes: i64,
    },
    /// A bearer token as stored: the sha256 of its secret, never the secret.
    Token {
        id: i64,
        name: String,
        role: String,
        spaces: Option<String>,
        token_hash: String,
        created_at: String,
        revoked_at: Option<String>,
    },
    /// The token a client id reports under.
    ClientToken { client_id: String, token_id: i64 },
    /// A space references a blob (what blob reads are authorized through).
    BlobSpace { sha256: String, space: String },
    /// An agent's held mass change.
    Held {
        space: String,
        client_id: String,
        change: String,
        decision: String,
        decided_by: Option<String>,
        updated_at: String,
    },
    /// A `sync_log` row (renumbered on restore, in the same order).
    SyncLog {
        report_id: Option<String>,
        client_id: Option<String>,
        space: Option<String>,
        sync_type: String,
        status: String,
        version: Option<i64>,
        items_synced: Option<i64>,
        items_total: Option<i64>,
        bytes: Option<i64>,
        duration_ms: Option<i64>,
        error_message: Option<String>,
        discord_id: Option<String>,
        synced_at: String,
    },
    /// An audit log entry (renumbered on restore, in the same order).
    Audit {
        at: String,
        who: String,
        action: String,
        target: String,
        peer: Option<String>,
    },
}

/// Why an export or import stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the records (export) or reading them (import) failed.
    #[error("backup records: {0}")]
    Io(#[from] std::io::Error),
}

impl From<sqlx::Error> for RecordsError {
    fn from(e: sqlx::Error) -> Self {
        RecordsError::Store(e.into())
    }
}

/// Where [`BackupStore::export`] puts each record, in order.
pub type RecordSink<'a> = dyn FnMut(Record) -> std::io::Result<()> + Send + 'a;

/// The records [`BackupStore::import`] writes, in order (a parse error is an `InvalidData`).
pub type RecordSource<'a> = dyn Iterator<Item = std::io::Result<Record>> + Send + 'a;

#[async_trait]
pub trait BackupStore: Send + Sync {
    /// Hands every record of the database to `sink`, all read at one consistent point: the
    /// header first, then spaces, versions, tokens, client bindings, the blob index, held
    /// changes, `sync_log` and the audit log.
    async fn export(&self, sink: &mut RecordSink<'_>) -> Result<(), RecordsError>;

    /// The tables a restore must find empty that hold rows: (table, rows).
    async fn occupied_tables(&self) -> Result<Vec<(&'static str, u64)>, StoreError>;

    /// Writes `records` (as [`BackupStore::export`] gave them) into this database, all in one
    /// transaction; returns how many were written. The caller checks first that the database
    /// is empty ([`BackupStore::occupied_tables`]).
    async fn import(&self, records: &mut RecordSource<'_>) -> Result<u64, RecordsError>;
}

/// The tables a restore refuses to write into unless they are empty.
const CHECKED_TABLES: [&str; 6] = [
    "sync_metadata",
    "synchub_versions",
    "synchub_tokens",
    "synchub_held_changes",
    "sync_log",
    "synchub_audit",
];

const VERSIONS: &str = "
SELECT space, version, data_hash, forced, reason, created_by, created_at, entries, bytes
  FROM synchub_versions ORDER BY space, version";

const TOKENS: &str = "
SELECT id, name, role, spaces, token_hash, created_at, revoked_at
  FROM synchub_tokens ORDER BY id";

const CLIENT_TOKENS: &str =
    "SELECT client_id, token_id FROM synchub_client_tokens ORDER BY client_id";

const BLOB_SPACES: &str = "
SELECT sha256, space FROM synchub_blob_spaces
 WHERE sha256 > $1 OR (sha256 = $1 AND space > $2)
 ORDER BY sha256, space LIMIT $3";

const HELD: &str = "
SELECT space, client_id, change, decision, decided_by, updated_at
  FROM synchub_held_changes ORDER BY space, client_id";

const AUDIT: &str = "
SELECT id, at, who, action, target, peer FROM synchub_audit
 WHERE id > $1 ORDER BY id LIMIT $2";

const INSERT_SPACE: &str = "
INSERT INTO sync_metadata
     (sync_key, version, data_hash, last_modified_by, last_modified_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $5)";

const INSERT_VERSION: &str = "
INSERT INTO synchub_versions
     (space, version, data_hash, forced, reason, created_by, created_at, entries, bytes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

const INSERT_TOKEN: &str = "
INSERT INTO synchub_tokens (id, name, role, spaces, token_hash, created_at)
VALUES ($1, $2, $3, $4, $5, $6)";

const REVOKE_TOKEN: &str = "UPDATE synchub_tokens SET revoked_at = $1 WHERE id = $2";

const INSERT_CLIENT_TOKEN: &str =
    "INSERT INTO synchub_client_tokens (client_id, token_id) VALUES ($1, $2)";

const INSERT_BLOB_SPACE: &str = "
INSERT INTO synchub_blob_spaces (sha256, space) VALUES ($1, $2) ON CONFLICT DO NOTHING";

const INSERT_HELD: &str = "
INSERT INTO synchub_held_changes (space, client_id, change, decision, decided_by, updated_at)
VALUES ($1, $2, $3, $4, $5, $6)";

const INSERT_LOG: &str = "
INSERT INTO sync_log
     (report_id, client_id, space, sync_type, status, version, items_synced, items_total,
      bytes, duration_ms, error_message, discord_id, synced_at, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)";

const INSERT_AUDIT: &str =
    "INSERT INTO synchub_audit (at, who, action, target, peer) VALUES ($1, $2, $3, $4, $5)";

/// A stored time as a record carries it.
fn shown_time<D: Run>(row: &Row<D>, column: &str) -> Result<Option<String>, sqlx::Error> {
    Ok(D::time(row, column)?.map(|at| at.shown()))
}

/// A record's time, to be stored as the backend stores times. A text that is no time (another
/// program's odd value, kept as text by the export) is refused with what held it.
fn stored_time(text: &str, what: &str) -> Result<DateTime<Utc>, StoreError> {
    parse_timestamp(text)
        .ok_or_else(|| StoreError::Corrupt(format!("{what} holds an unreadable time {text:?}")))
}

#[async_trait]
impl<D: Run> BackupStore for D {
    async fn export(&self, sink: &mut RecordSink<'_>) -> Result<(), RecordsError> {
        let mut tx = self.pool().begin().await?;
        D::execute_on(&mut *tx, D::SNAPSHOT, &[]).await?;
        let taken_at = super::rows::rfc3339(Utc::now());
        sink(Record::Header {
            format: RECORDS_FORMAT,
            backend: D::NAME.to_owned(),
            taken_at,
        })?;
        export_spaces::<D>(&mut *tx, sink).await?;
        for row in D::fetch_on(&mut *tx, VERSIONS, &[]).await? {
            sink(Record::Version {
                space: D::text(&row, "space")?,
                version: D::int(&row, "version")?,
                data_hash: D::text(&row, "data_hash")?,
                forced: D::flag(&row, "forced")?,
                reason: D::maybe_text(&row, "reason")?,
                created_by: D::maybe_text(&row, "created_by")?,
                created_at: shown_time::<D>(&row, "created_at")?.unwrap_or_default(),
                entries: D::int(&row, "entries")?,
                bytes: D::int(&row, "bytes")?,
            })?;
        }
        for row in D::fetch_on(&mut *tx, TOKENS, &[]).await? {
            sink(Record::Token {
                id: D::int(&row, "id")?,
                name: D::text(&row, "name")?,
                role: D::text(&row, "role")?,
                spaces: D::maybe_text(&row, "spaces")?,
                token_hash: D::text(&row, "token_hash")?,
                created_at: shown_time::<D>(&row, "created_at")?.unwrap_or_default(),
                revoked_at: shown_time::<D>(&row, "revoked_at")?,
            })?;
        }
        for row in D::fetch_on(&mut *tx, CLIENT_TOKENS, &[]).await? {
            sink(Record::ClientToken {
                client_id: D::text(&row, "client_id")?,
                token_id: D::int(&row, "token_id")?,
            })?;
        }
        export_blob_spaces::<D>(&mut *tx, sink).await?;
        for row in D::fetch_on(&mut *tx, HELD, &[]).await? {
            sink(Record::Held {
                space: D::text(&row, "space")?,
                client_id: D::text(&row, "client_id")?,
                change: D::text(&row, "change")?,
                decision: D::text(&row, "decision")?,
                decided_by: D::maybe_text(&row, "decided_by")?,
                updated_at: D::text(&row, "updated_at")?,
            })?;
        }
        export_sync_log(self, &mut *tx, sink).await?;
        export_audit::<D>(&mut *tx, sink).await?;
        tx.rollback().await?;
        Ok(())
    }

    async fn occupied_tables(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut occupied = Vec::new();
        for table in CHECKED_TABLES {
            let sql = format!("SELECT COUNT(*) AS n FROM {table}");
            let rows = self.fetch(&sql, &[]).await?;
            let n = rows.first().map(|r| D::int(r, "n")).transpose()?;
            let n = u64::try_from(n.unwrap_or(0)).unwrap_or(0);
            if n > 0 {
                occupied.push((table, n));
            }
        }
        Ok(occupied)
    }

    async fn import(&self, records: &mut RecordSource<'_>) -> Result<u64, RecordsError> {
        let mut tx = self.pool().begin().await?;
        let mut written = 0;
        for record in records {
            import_one::<D>(&mut *tx, &record?).await?;
            written += 1;
        }
        for statement in D::AFTER_RESTORE {
            D::fetch_on(&mut *tx, statement, &[]).await?;
        }
        tx.commit().await?;
        self.wrote();
        Ok(written)
    }
}

async fn export_spaces<D: Run>(
    conn: &mut Conn<D>,
    sink: &mut RecordSink<'_>,
) -> Result<(), RecordsError> {
    // The dialect's head columns (cast as its possibly adopted table needs) and the hash.
    let sql = format!(
        "{}, CAST(m.data_hash AS TEXT) AS data_hash FROM sync_metadata m ORDER BY m.sync_key",
        D::HEAD_SELECT
    );
    for row in D::fetch_on(conn, &sql, &[]).await? {
        sink(Record::Space {
            space: D::text(&row, "sync_key")?,
            version: D::int(&row, "row_version")?,
            data_hash: D::maybe_text(&row, "data_hash")?,
            last_modified_by: D::maybe_text(&row, "row_by")?,
            last_modified_at: shown_time::<D>(&row, "row_at")?,
        })?;
    }
    Ok(())
}

async fn export_blob_spaces<D: Run>(
    conn: &mut Conn<D>,
    sink: &mut RecordSink<'_>,
) -> Result<(), RecordsError> {
    let (mut after_hash, mut after_space) = (String::new(), String::new());
    loop {
        let params = [
            Param::Text(&after_hash),
            Param::Text(&after_space),
            Param::Int(PAGE),
        ];
        let rows = D::fetch_on(conn, BLOB_SPACES, &params).await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        let next = (D::text(last, "sha256")?, D::text(last, "space")?);
        for row in &rows {
            sink(Record::BlobSpace {
                sha256: D::text(row, "sha256")?,
                space: D::text(row, "space")?,
            })?;
        }
        (after_hash, after_space) = next;
    }
}

async fn export_sync_log<D: Run>(
    d: &D,
    conn: &mut Conn<D>,
    sink: &mut RecordSink<'_>,
) -> Result<(), RecordsError> {
    // The dialect's select (its casts and row numbering), paged by that number.
    let sql = format!(
        "SELECT * FROM ({}) AS l WHERE l.id > $1 ORDER BY l.id LIMIT $2",
        d.sync_log_select()
    );
    let mut after = i64::MIN;
    loop {
        let rows = D::fetch_on(conn, &sql, &[Param::Int(after), Param::Int(PAGE)]).await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = D::int(last, "id")?;
        for row in &rows {
            sink(Record::SyncLog {
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
                discord_id: D::maybe_text(row, "discord_id")?,
                synced_at: shown_time::<D>(row, "synced_at")?.unwrap_or_default(),
            })?;
        }
    }
}

async fn export_audit<D: Run>(
    conn: &mut Conn<D>,
    sink: &mut RecordSink<'_>,
) -> Result<(), RecordsError> {
    let mut after = i64::MIN;
    loop {
        let rows = D::fetch_on(conn, AUDIT, &[Param::Int(after), Param::Int(PAGE)]).await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = D::int(last, "id")?;
        for row in &rows {
            sink(Record::Audit {
                at: D::text(row, "at")?,
                who: D::text(row, "who")?,
                action: D::text(row, "action")?,
                target: D::text(row, "target")?,
                peer: D::maybe_text(row, "peer")?,
            })?;
        }
    }
}

/// Writes one record on the restore's transaction.
async fn import_one<D: Run>(conn: &mut Conn<D>, record: &Record) -> Result<(), RecordsError> {
    match record {
        Record::Header { format, .. } => {
            if *format != RECORDS_FORMAT {
                return Err(StoreError::Corrupt(format!(
                    "the backup's records are format {format}; this hub reads format \
                     {RECORDS_FORMAT}"
                ))
                .into());
            }
        }
        Record::Space {
            space,
            version,
            data_hash,
            last_modified_by,
            last_modified_at,
        } => {
            let at = match last_modified_at {
                Some(at) => stored_time(at, "a space's last_modified_at")?,
                None => Utc::now(),
            };
            let params = [
                Param::Text(space),
                Param::Int(*version),
                Param::MaybeText(data_hash.as_deref()),
                Param::MaybeText(last_modified_by.as_deref()),
                Param::Time(at),
            ];
            D::execute_on(conn, INSERT_SPACE, &params).await?;
        }
        Record::Version {
            space,
            version,
            data_hash,
            forced,
            reason,
            created_by,
            created_at,
            entries,
            bytes,
        } => {
            let params = [
                Param::Text(space),
                Param::Int(*version),
                Param::Text(data_hash),
                Param::Flag(*forced),
                Param::MaybeText(reason.as_deref()),
                Param::MaybeText(created_by.as_deref()),
                Param::Time(stored_time(created_at, "a version's created_at")?),
                Param::Int(*entries),
                Param::Int(*bytes),
            ];
            D::execute_on(conn, INSERT_VERSION, &params).await?;
        }
        Record::Token {
            id,
            name,
            role,
            spaces,
            token_hash,
            created_at,
            revoked_at,
        } => {
            let params = [
                Param::Int(*id),
                Param::Text(name),
                Param::Text(role),
                Param::MaybeText(spaces.as_deref()),
                Param::Text(token_hash),
                Param::Time(stored_time(created_at, "a token's created_at")?),
            ];
            D::execute_on(conn, INSERT_TOKEN, &params).await?;
            if let Some(revoked_at) = revoked_at {
                let at = stored_time(revoked_at, "a token's revoked_at")?;
                D::execute_on(conn, REVOKE_TOKEN, &[Param::Time(at), Param::Int(*id)]).await?;
            }
        }
        Record::ClientToken {
            client_id,
            token_id,
        } => {
            let params = [Param::Text(client_id), Param::Int(*token_id)];
            D::execute_on(conn, INSERT_CLIENT_TOKEN, &params).await?;
        }
        Record::BlobSpace { sha256, space } => {
            let params = [Param::Text(sha256), Param::Text(space)];
            D::execute_on(conn, INSERT_BLOB_SPACE, &params).await?;
        }
        Record::Held {
            space,
            client_id,
            change,
            decision,
            decided_by,
            updated_at,
        } => {
            let params = [
                Param::Text(space),
                Param::Text(client_id),
                Param::Text(change),
                Param::Text(decision),
                Param::MaybeText(decided_by.as_deref()),
                Param::Text(updated_at),
            ];
            D::execute_on(conn, INSERT_HELD, &params).await?;
        }
        Record::SyncLog {
            report_id,
            client_id,
            space,
            sync_type,
            status,
            version,
            items_synced,
            items_total,
            bytes,
            duration_ms,
            error_message,
            discord_id,
            synced_at,
        } => {
            // A row another program wrote with an unreadable time keeps the restore's time
            // rather than stopping it: the log is history, not state.
            let at = parse_timestamp(synced_at).unwrap_or_else(Utc::now);
            let params = [
                Param::MaybeText(report_id.as_deref()),
                Param::MaybeText(client_id.as_deref()),
                Param::MaybeText(space.as_deref()),
                Param::Text(sync_type),
                Param::Text(status),
                Param::MaybeInt(*version),
                Param::MaybeInt(*items_synced),
                Param::MaybeInt(*items_total),
                Param::MaybeInt(*bytes),
                Param::MaybeInt(*duration_ms),
                Param::MaybeText(error_message.as_deref()),
                Param::MaybeText(discord_id.as_deref()),
                Param::Time(at),
            ];
            D::execute_on(conn, INSERT_LOG, &params).await?;
        }
        Record::Audit {
            at,
            who,
            action,
            target,
            peer,
        } => {
            let params = [
                Param::Text(at),
                Param::Text(who),
                Param::Text(action),
                Param::Text(target),
                Param::MaybeText(peer.as_deref()),
            ];
            D::execute_on(conn, INSERT_AUDIT, &params).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_tagged_json_lines_that_read_back() {
        let record = Record::Version {
            space: "s".into(),
            version: 3,
            data_hash: "ab".into(),
            forced: false,
            reason: None,
            created_by: Some("pc".into()),
            created_at: "2026-11-26T10:00:00.000Z".into(),
            entries: 2,
            bytes: 10,
        };
        let line = serde_json::to_string(&record).unwrap();
        assert!(
            line.starts_with(r#"{"kind":"version","space":"s""#),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), record);
        assert!(serde_json::from_str::<Record>(r#"{"kind":"nope"}"#).is_err());
    }
}
