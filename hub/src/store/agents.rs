//! The agents the hub has heard from (`synchub_agents`), one row per space and agent, written
//! in batches by the hub's fleet task (`fleet.rs`) and read for `GET /fleet`. The SQL is the
//! same for both backends except for the parameter marks, so it is written once here and
//! instantiated for each pool.

use super::StoreError;
use synchub_protocol::{AgentState, FleetAgent};

/// Most rows one read returns; a space with more agents than this is listed in part.
pub const MAX_AGENTS: u32 = 10_000;

/// The row's columns, as read.
type Row = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    bool,
    String,
);

fn agent(row: Row) -> Result<FleetAgent, StoreError> {
    let (space, client_id, token_name, hostname, agent_version, state, connected, last_seen) = row;
    let state: AgentState = serde_json::from_str(&state)
        .map_err(|e| StoreError::Corrupt(format!("state of agent {client_id}: {e}")))?;
    Ok(FleetAgent {
        space,
        client_id,
        token_name,
        hostname,
        agent_version,
        state,
        last_seen,
        online: connected,
    })
}

const COLUMNS: &str =
    "space, client_id, token_name, hostname, agent_version, state, connected, last_seen";

/// `?1` marks for SQLite, `$1` for PostgreSQL.
fn sql(text: &str, dollar: bool) -> String {
    if dollar {
        text.replace('?', "$")
    } else {
        text.to_owned()
    }
}

macro_rules! agent_queries {
    ($name:ident, $pool:ty, $dollar:expr) => {
        pub(super) mod $name {
            use super::*;

            /// Inserts or replaces each agent's row (`online` is stored as `connected`), in
            /// one transaction.
            pub async fn put(pool: &$pool, agents: &[FleetAgent]) -> Result<(), StoreError> {
                let text = sql(
                    &format!(
                        "INSERT INTO synchub_agents ({COLUMNS}, version) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                         ON CONFLICT (space, client_id) DO UPDATE SET \
                         token_name = excluded.token_name, hostname = excluded.hostname, \
                         agent_version = excluded.agent_version, state = excluded.state, \
                         connected = excluded.connected, last_seen = excluded.last_seen, \
                         version = excluded.version"
                    ),
                    $dollar,
                );
                let mut tx = pool.begin().await?;
                for a in agents {
                    let state = serde_json::to_string(&a.state)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    sqlx::query(&text)
                        .bind(&a.space)
                        .bind(&a.client_id)
                        .bind(&a.token_name)
                        .bind(&a.hostname)
                        .bind(&a.agent_version)
                        .bind(state)
                        .bind(a.online)
                        .bind(&a.last_seen)
                        .bind(i64::try_from(a.state.version()).unwrap_or(i64::MAX))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            /// The agents of `space`, last seen newest first.
            pub async fn list(pool: &$pool, space: &str) -> Result<Vec<FleetAgent>, StoreError> {
                let rows: Vec<Row> = sqlx::query_as(&sql(
                    &format!(
                        "SELECT {COLUMNS} FROM synchub_agents WHERE space = ?1 \
                         ORDER BY last_seen DESC, client_id LIMIT {MAX_AGENTS}"
                    ),
                    $dollar,
                ))
                .bind(space)
                .fetch_all(pool)
                .await?;
                rows.into_iter().map(agent).collect()
            }
        }
    };
}

agent_queries!(sqlite, sqlx::SqlitePool, false);
agent_queries!(postgres, sqlx::PgPool, true);
