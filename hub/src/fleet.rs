//! The fleet as recorded: every agent the hub has heard from, per space, with its last seen,
//! version, state, agent version and host, so a PC that went offline stays listed (table
//! `synchub_agents`). Agents' status frames do not each write to the database: a connection
//! whose state changed is queued ([`crate::clients::Clients`]), and one supervised task
//! writes the queue in one transaction every `write_interval_ms` (a connected agent whose state
//! did not change is written once per `heartbeat_secs`, so other replicas see it online).
//! [`view`] answers `GET /api/v1/fleet`: the recorded rows with this replica's live agents
//! and the unwritten queue laid over them, and the counts of the dashboard's summary.

use crate::config::ConfigError;
use crate::error::HubError;
use crate::state::AppState;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use synchub_protocol::{AgentState, FleetAgent, FleetCounts, FleetView};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `[fleet]` in the hub's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// An offline agent not seen for longer than this is counted as "not seen" (default a day).
    pub not_seen_after_secs: u64,
    /// How often the queued agent rows are written (at most one write per agent per interval).
    pub write_interval_ms: u64,
    /// A connected agent whose state does not change is written this often.
    pub heartbeat_secs: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            not_seen_after_secs: 24 * 3600,
            write_interval_ms: 5000,
            heartbeat_secs: 60,
        }
    }
}

impl FleetConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.write_interval_ms == 0 || self.heartbeat_secs == 0 {
            return Err(ConfigError::Invalid(
                "fleet: write_interval_ms and heartbeat_secs must be above 0".into(),
            ));
        }
        Ok(())
    }

    /// How long after its last recorded sign of life a row marked connected still counts as
    /// online (connected to another replica): two heartbeats and a write.
    fn online_window(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs * 2) + Duration::from_millis(self.write_interval_ms)
    }
}

/// Starts the task that writes the fleet rows; it writes what is queued once more and stops
/// on `shutdown`, and is restarted if it panics.
pub fn spawn(state: AppState, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let run = std::panic::AssertUnwindSafe(write_rows(&state, &shutdown));
            let ended = futures::FutureExt::catch_unwind(run).await;
            if shutdown.is_cancelled() {
                return;
            }
            if ended.is_err() {
                tracing::error!(task = "fleet writer", "panicked; restarting");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

async fn write_rows(state: &AppState, shutdown: &CancellationToken) {
    let config = &state.config.fleet;
    let mut tick = tokio::time::interval(Duration::from_millis(config.write_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        state
            .clients
            .queue_changed(Duration::from_secs(config.heartbeat_secs));
        let rows = state.clients.unwritten_rows();
        if !rows.is_empty() {
            let write = state.store.put_agents(&rows);
            match tokio::time::timeout(Duration::from_secs(10), write).await {
                Ok(Ok(())) => {
                    state.clients.mark_written(&rows);
                    metrics::counter!("synchub_fleet_writes_total").increment(1);
                }
                // Kept queued: the next round tries again.
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, rows = rows.len(), "fleet rows not written")
                }
                Err(_) => tracing::warn!(rows = rows.len(), "fleet rows not written within 10 s"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// `GET /fleet?space=`: the recorded agents of `space` with this replica's live ones laid
/// over them, and the counts.
pub async fn view(state: &AppState, space: &str) -> Result<FleetView, HubError> {
    let recorded = state.store.agents(space).await?;
    let mut agents: BTreeMap<String, FleetAgent> = BTreeMap::new();
    let now = Utc::now();
    let window = chrono::Duration::from_std(state.config.fleet.online_window())
        .unwrap_or(chrono::Duration::MAX);
    for mut a in recorded {
        // Marked connected, but by a replica that has not refreshed it: gone.
        a.online = a.online && age(&a.last_seen, now).is_some_and(|d| d <= window);
        agents.insert(a.client_id.clone(), a);
    }
    let unwritten = state.clients.unwritten_rows();
    for a in unwritten.into_iter().filter(|a| a.space == space) {
        agents.insert(a.client_id.clone(), a);
    }
    let seen = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for c in state.clients.list() {
        for s in c.spaces.into_iter().filter(|s| s.space == space) {
            let a = FleetAgent {
                space: s.space,
                client_id: c.client_id.clone(),
                token_name: c.token_name.clone(),
                hostname: c.hostname.clone(),
                agent_version: c.agent_version.clone(),
                state: s.state,
                last_seen: seen.clone(),
                online: true,
            };
            agents.insert(a.client_id.clone(), a);
        }
    }
    let head = state.heads.get(space).map_or(0, |p| p.head.version);
    let not_seen_after = state.config.fleet.not_seen_after_secs;
    let mut agents: Vec<FleetAgent> = agents.into_values().collect();
    agents.sort_by(|a, b| b.online.cmp(&a.online).then(b.last_seen.cmp(&a.last_seen)));
    Ok(FleetView {
        space: space.to_owned(),
        head,
        counts: counts(&agents, head, not_seen_after, now),
        agents,
    })
}

/// How long ago `at` (RFC 3339) was; `None` when it does not parse.
fn age(at: &str, now: DateTime<Utc>) -> Option<chrono::Duration> {
    DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|t| now - t.with_timezone(&Utc))
}

/// Where an agent stands against the head.
#[derive(Debug, PartialEq, Eq)]
enum Bucket {
    OnHead,
    Behind,
    Downloading,
    Failed,
}

fn bucket(a: &FleetAgent, head: u64) -> Bucket {
    match &a.state {
        AgentState::Failed { .. } => Bucket::Failed,
        AgentState::SyncRequired { .. }
        | AgentState::Downloading { .. }
        | AgentState::Verifying { .. }
        | AgentState::Applying { .. }
            if a.online =>
        {
            Bucket::Downloading
        }
        AgentState::Ready { version } | AgentState::Starting { version } if *version >= head => {
            Bucket::OnHead
        }
        _ => Bucket::Behind,
    }
}

/// The summary's counts (pure; unit-tested below).
fn counts(
    agents: &[FleetAgent],
    head: u64,
    not_seen_after_secs: u64,
    now: DateTime<Utc>,
) -> FleetCounts {
    let threshold =
        chrono::Duration::seconds(i64::try_from(not_seen_after_secs).unwrap_or(i64::MAX));
    let mut c = FleetCounts {
        not_seen_after_secs,
        ..FleetCounts::default()
    };
    for a in agents {
        c.known += 1;
        if a.online {
            c.online += 1;
        } else if age(&a.last_seen, now).is_none_or(|d| d > threshold) {
            c.not_seen += 1;
        }
        match bucket(a, head) {
            Bucket::OnHead => c.on_head += 1,
            Bucket::Behind => c.behind += 1,
            Bucket::Downloading => c.downloading += 1,
            Bucket::Failed => c.failed += 1,
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, state: AgentState, online: bool, last_seen: &str) -> FleetAgent {
        FleetAgent {
            space: "s".into(),
            client_id: id.into(),
            token_name: id.into(),
            hostname: None,
            agent_version: None,
            state,
            last_seen: last_seen.into(),
            online,
        }
    }

    #[test]
    fn every_known_agent_counts_once_and_offline_for_long_is_not_seen() {
        let now = DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let downloading = AgentState::Downloading {
            version: 2,
            target: 3,
            files_done: 0,
            files_total: 1,
            bytes_done: 0,
            bytes_total: 1,
            bytes_per_sec: 0,
        };
        let failed = AgentState::Failed {
            version: 2,
            target: 3,
            error: "disk full".into(),
            retry_at: None,
            stale_allowed: false,
        };
        let agents = [
            agent(
                "a",
                AgentState::Ready { version: 3 },
                true,
                "2026-11-26T12:00:00Z",
            ),
            agent("b", downloading.clone(), true, "2026-11-26T12:00:00Z"),
            agent("c", failed, true, "2026-11-26T12:00:00Z"),
            // Offline since an hour: still counted where it stood, not "not seen".
            agent(
                "d",
                AgentState::Ready { version: 3 },
                false,
                "2026-11-26T11:00:00Z",
            ),
            // Offline for two days while downloading: behind, and not seen.
            agent("e", downloading, false, "2026-11-24T12:00:00Z"),
            agent("f", AgentState::Ready { version: 1 }, false, "garbage"),
        ];
        let c = counts(&agents, 3, 24 * 3600, now);
        assert_eq!(
            c,
            FleetCounts {
                known: 6,
                online: 3,
                on_head: 2,
                behind: 2,
                downloading: 1,
                failed: 1,
                not_seen: 2,
                not_seen_after_secs: 24 * 3600,
            }
        );
    }
}
