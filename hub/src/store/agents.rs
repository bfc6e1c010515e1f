//! The agents the hub has heard from (`synchub_agents`), one row per space and agent, written
//! in batches by the hub's fleet task (`fleet.rs`) and read for `GET /fleet`. Written once for
//! both backends over [`Run`].

use super::StoreError;
use super::dialect::{Param, Row, Run};
use synchub_protocol::{AgentState, FleetAgent};

/// Most rows one read returns; a space with more agents than this is listed in part.
pub const MAX_AGENTS: u32 = 10_000;

const PUT: &str = "
INSERT INTO synchub_agents
       (space, client_id, token_name, hostname, agent_version, state, connected, last_seen, version)
VALUES";

/// After the rows of [`PUT`].
const PUT_CONFLICT: &str = "
ON CONFLICT (space, client_id) DO UPDATE SET
       token_name = excluded.token_name, hostname = excluded.hostname,
       agent_version = excluded.agent_version, state = excluded.state,
       connected = excluded.connected, last_seen = excluded.last_seen, version = excluded.version";

const LIST: &str = "
SELECT space, client_id, token_name, hostname, agent_version, state, connected, last_seen
  FROM synchub_agents WHERE space = $1
 ORDER BY last_seen DESC, client_id LIMIT 10000";

fn agent<D: Run>(row: &Row<D>) -> Result<FleetAgent, StoreError> {
    let client_id = D::text(row, "client_id")?;
    let state: AgentState = serde_json::from_str(&D::text(row, "state")?)
        .map_err(|e| StoreError::Corrupt(format!("state of agent {client_id}: {e}")))?;
    Ok(FleetAgent {
        space: D::text(row, "space")?,
        client_id,
        token_name: D::text(row, "token_name")?,
        hostname: D::maybe_text(row, "hostname")?,
        agent_version: D::maybe_text(row, "agent_version")?,
        state,
        last_seen: D::text(row, "last_seen")?,
        online: D::flag(row, "connected")?,
    })
}

/// Values per row of [`PUT`].
const COLUMNS: usize = 9;

/// Rows per statement: a herd changes thousands of rows at once, and on SQLite each statement
/// is a round trip to the database's thread.
const ROWS: usize = 20;

/// Inserts or replaces each agent's row (`online` is stored as `connected`), in one
/// transaction. When an agent is listed twice, its last row is kept.
pub(super) async fn put<D: Run>(d: &D, agents: &[FleetAgent]) -> Result<(), StoreError> {
    // One row per agent in a statement (PostgreSQL refuses to update a row twice in one).
    let mut last = std::collections::HashMap::new();
    for a in agents {
        last.insert((&a.space, &a.client_id), a);
    }
    let agents: Vec<&FleetAgent> = agents
        .iter()
        .filter(|a| std::ptr::eq(last[&(&a.space, &a.client_id)], *a))
        .collect();
    let states = agents
        .iter()
        .map(|a| serde_json::to_string(&a.state))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let versions: Vec<i64> = agents
        .iter()
        .map(|a| i64::try_from(a.state.version()).unwrap_or(i64::MAX))
        .collect();
    let mut tx = d.pool().begin().await?;
    for ((chunk, states), versions) in agents
        .chunks(ROWS)
        .zip(states.chunks(ROWS))
        .zip(versions.chunks(ROWS))
    {
        let mut params = Vec::with_capacity(chunk.len() * COLUMNS);
        for ((a, state), version) in chunk.iter().zip(states).zip(versions) {
            params.extend([
                Param::Text(&a.space),
                Param::Text(&a.client_id),
                Param::Text(&a.token_name),
                Param::MaybeText(a.hostname.as_deref()),
                Param::MaybeText(a.agent_version.as_deref()),
                Param::Text(state),
                Param::Flag(a.online),
                Param::Text(&a.last_seen),
                Param::Int(*version),
            ]);
        }
        let rows = super::blob_index::value_rows(chunk.len(), COLUMNS);
        let sql = format!("{PUT} {rows} {PUT_CONFLICT}");
        D::execute_on(&mut *tx, &sql, &params).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The agents of `space`, last seen newest first (at most [`MAX_AGENTS`]).
pub(super) async fn list<D: Run>(d: &D, space: &str) -> Result<Vec<FleetAgent>, StoreError> {
    let rows = d.fetch(LIST, &[Param::Text(space)]).await?;
    rows.iter().map(agent::<D>).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_limit_is_max_agents() {
        assert!(super::LIST.ends_with(&format!("LIMIT {}", super::MAX_AGENTS)));
    }
}
