//! The held changes of agents in two-way mode (`synchub_held_changes`), one row per space and
//! agent: the agent upserts it while it waits, an admin decides, the agent deletes it once it
//! has acted. The SQL is the same for both backends except for the parameter marks, so it is
//! written once here and instantiated for each pool.

use super::StoreError;
use synchub_protocol::{HeldChange, HeldDecision, HeldRecord};

/// The row's text columns, as read.
type Row = (String, String, String, String, Option<String>, String);

fn record(row: Row) -> Result<HeldRecord, StoreError> {
    let (space, client_id, change, decision, decided_by, updated_at) = row;
    let change: HeldChange = serde_json::from_str(&change)
        .map_err(|e| StoreError::Corrupt(format!("held change of {client_id}: {e}")))?;
    let decision = decision.parse().map_err(StoreError::Corrupt)?;
    Ok(HeldRecord {
        space,
        client_id,
        change,
        decision,
        decided_by,
        updated_at,
    })
}

fn encode(change: &HeldChange) -> Result<String, StoreError> {
    serde_json::to_string(change).map_err(|e| StoreError::Corrupt(e.to_string()))
}

const COLUMNS: &str = "space, client_id, change, decision, decided_by, updated_at";

/// `?1` marks for SQLite, `$1` for PostgreSQL.
fn sql(text: &str, dollar: bool) -> String {
    if dollar {
        text.replace('?', "$")
    } else {
        text.to_owned()
    }
}

macro_rules! held_queries {
    ($name:ident, $pool:ty, $dollar:expr) => {
        pub(super) mod $name {
            use super::*;

            /// Inserts the change, or refreshes `updated_at` of the one already there (its
            /// decision stays); returns the row.
            pub async fn put(
                pool: &$pool,
                space: &str,
                client_id: &str,
                change: &HeldChange,
            ) -> Result<HeldRecord, StoreError> {
                let now = chrono::Utc::now().to_rfc3339();
                sqlx::query(&sql(
                    "INSERT INTO synchub_held_changes (space, client_id, change, decision, updated_at) \
                     VALUES (?1, ?2, ?3, 'pending', ?4) \
                     ON CONFLICT (space, client_id) DO UPDATE SET updated_at = excluded.updated_at",
                    $dollar,
                ))
                .bind(space)
                .bind(client_id)
                .bind(encode(change)?)
                .bind(&now)
                .execute(pool)
                .await?;
                let row: Row = sqlx::query_as(&sql(
                    &format!(
                        "SELECT {COLUMNS} FROM synchub_held_changes WHERE space = ?1 AND client_id = ?2"
                    ),
                    $dollar,
                ))
                .bind(space)
                .bind(client_id)
                .fetch_one(pool)
                .await?;
                record(row)
            }

            pub async fn list(pool: &$pool) -> Result<Vec<HeldRecord>, StoreError> {
                let rows: Vec<Row> = sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM synchub_held_changes ORDER BY updated_at, space, client_id LIMIT 1000"
                ))
                .fetch_all(pool)
                .await?;
                rows.into_iter().map(record).collect()
            }

            /// Decides a pending change; false when there is none.
            pub async fn decide(
                pool: &$pool,
                space: &str,
                client_id: &str,
                decision: HeldDecision,
                by: &str,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(&sql(
                    "UPDATE synchub_held_changes SET decision = ?1, decided_by = ?2, updated_at = ?3 \
                     WHERE space = ?4 AND client_id = ?5 AND decision = 'pending'",
                    $dollar,
                ))
                .bind(decision.as_str())
                .bind(by)
                .bind(chrono::Utc::now().to_rfc3339())
                .bind(space)
                .bind(client_id)
                .execute(pool)
                .await?
                .rows_affected();
                Ok(done > 0)
            }

            pub async fn delete(pool: &$pool, space: &str, client_id: &str) -> Result<(), StoreError> {
                sqlx::query(&sql(
                    "DELETE FROM synchub_held_changes WHERE space = ?1 AND client_id = ?2",
                    $dollar,
                ))
                .bind(space)
                .bind(client_id)
                .execute(pool)
                .await?;
                Ok(())
            }
        }
    };
}

held_queries!(sqlite, sqlx::SqlitePool, false);
held_queries!(postgres, sqlx::PgPool, true);
