//! The held changes of agents in two-way mode (`synchub_held_changes`), one row per space and
//! agent: the agent upserts it while it waits, an admin decides, the agent deletes it once it
//! has acted. Every column is TEXT in both backends, so the SQL is written once over [`Run`].

use super::StoreError;
use super::dialect::{Param, Row, Run};
use synchub_protocol::{HeldChange, HeldDecision, HeldRecord};

const PUT: &str = "
INSERT INTO synchub_held_changes (space, client_id, change, decision, updated_at)
VALUES ($1, $2, $3, 'pending', $4)
ON CONFLICT (space, client_id) DO UPDATE SET updated_at = excluded.updated_at";

const ONE: &str = "
SELECT space, client_id, change, decision, decided_by, updated_at
  FROM synchub_held_changes WHERE space = $1 AND client_id = $2";

const LIST: &str = "
SELECT space, client_id, change, decision, decided_by, updated_at
  FROM synchub_held_changes ORDER BY updated_at, space, client_id LIMIT 1000";

const DECIDE: &str = "
UPDATE synchub_held_changes SET decision = $1, decided_by = $2, updated_at = $3
 WHERE space = $4 AND client_id = $5 AND decision = 'pending'";

const DELETE: &str = "DELETE FROM synchub_held_changes WHERE space = $1 AND client_id = $2";

fn record<D: Run>(row: &Row<D>) -> Result<HeldRecord, StoreError> {
    let client_id = D::text(row, "client_id")?;
    let change: HeldChange = serde_json::from_str(&D::text(row, "change")?)
        .map_err(|e| StoreError::Corrupt(format!("held change of {client_id}: {e}")))?;
    let decision = D::text(row, "decision")?
        .parse()
        .map_err(StoreError::Corrupt)?;
    Ok(HeldRecord {
        space: D::text(row, "space")?,
        client_id,
        change,
        decision,
        decided_by: D::maybe_text(row, "decided_by")?,
        updated_at: D::text(row, "updated_at")?,
    })
}

/// Inserts the change, or refreshes `updated_at` of the one already there (its decision
/// stays); returns the row.
pub(super) async fn put<D: Run>(
    d: &D,
    space: &str,
    client_id: &str,
    change: &HeldChange,
) -> Result<HeldRecord, StoreError> {
    let change = serde_json::to_string(change).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let now = chrono::Utc::now().to_rfc3339();
    let params = [
        Param::Text(space),
        Param::Text(client_id),
        Param::Text(&change),
        Param::Text(&now),
    ];
    d.execute(PUT, &params).await?;
    let rows = d
        .fetch(ONE, &[Param::Text(space), Param::Text(client_id)])
        .await?;
    match rows.first() {
        Some(row) => record::<D>(row),
        None => Err(sqlx::Error::RowNotFound.into()),
    }
}

/// Every held change, oldest first (at most 1000).
pub(super) async fn list<D: Run>(d: &D) -> Result<Vec<HeldRecord>, StoreError> {
    let rows = d.fetch(LIST, &[]).await?;
    rows.iter().map(record::<D>).collect()
}

/// Decides a pending change; false when there is none.
pub(super) async fn decide<D: Run>(
    d: &D,
    space: &str,
    client_id: &str,
    decision: HeldDecision,
    by: &str,
) -> Result<bool, StoreError> {
    let now = chrono::Utc::now().to_rfc3339();
    let params = [
        Param::Text(decision.as_str()),
        Param::Text(by),
        Param::Text(&now),
        Param::Text(space),
        Param::Text(client_id),
    ];
    let done = d.execute(DECIDE, &params).await?;
    Ok(done > 0)
}

pub(super) async fn delete<D: Run>(d: &D, space: &str, client_id: &str) -> Result<(), StoreError> {
    let params = [Param::Text(space), Param::Text(client_id)];
    d.execute(DELETE, &params).await?;
    Ok(())
}
