//! The audit log (`synchub_audit`): one row per admin action, appended and never changed.
//! Written once for both backends over [`Run`].

use super::StoreError;
use super::dialect::{Param, Row, Run};
use synchub_protocol::AuditEntry;

const RECORD: &str =
    "INSERT INTO synchub_audit (at, who, action, target, peer) VALUES ($1, $2, $3, $4, $5)";

const LIST: &str =
    "SELECT id, at, who, action, target, peer FROM synchub_audit ORDER BY id DESC LIMIT $1";

fn entry<D: Run>(row: &Row<D>) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        id: D::int(row, "id")?,
        at: D::text(row, "at")?,
        who: D::text(row, "who")?,
        action: D::text(row, "action")?,
        target: D::text(row, "target")?,
        from: D::maybe_text(row, "peer")?,
    })
}

/// Appends one action, stamped with the hub's clock now.
pub(super) async fn record<D: Run>(
    d: &D,
    who: &str,
    action: &str,
    target: &str,
    from: Option<&str>,
) -> Result<(), StoreError> {
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let params = [
        Param::Text(&at),
        Param::Text(who),
        Param::Text(action),
        Param::Text(target),
        Param::MaybeText(from),
    ];
    d.execute(RECORD, &params).await?;
    Ok(())
}

/// The newest `limit` entries, newest first.
pub(super) async fn list<D: Run>(d: &D, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
    let rows = d.fetch(LIST, &[Param::Int(i64::from(limit))]).await?;
    rows.iter().map(entry::<D>).collect()
}
