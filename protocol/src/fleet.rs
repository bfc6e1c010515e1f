//! The fleet as the hub records it (`GET /api/v1/fleet`): every agent it has heard from, per
//! space, with when it was last seen, so a PC that went offline stays listed, and the counts
//! the dashboard's summary shows.

use crate::AgentState;
use serde::{Deserialize, Serialize};

/// One agent in one space, as last heard of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetAgent {
    pub space: String,
    pub client_id: String,
    pub token_name: String,
    pub hostname: Option<String>,
    pub agent_version: Option<String>,
    /// The state it last reported (with the version it holds).
    pub state: AgentState,
    /// When a hub last heard from it (RFC 3339).
    pub last_seen: String,
    /// Connected now (to this replica, or to another one that recorded it moments ago).
    pub online: bool,
}

/// How many agents of a space are where: every known agent counts once in `on_head`,
/// `behind`, `downloading` or `failed` by its last reported state (an offline agent that was
/// downloading counts as behind).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCounts {
    pub known: u64,
    pub online: u64,
    pub on_head: u64,
    pub behind: u64,
    pub downloading: u64,
    pub failed: u64,
    /// Offline and not seen for longer than `not_seen_after_secs`.
    pub not_seen: u64,
    pub not_seen_after_secs: u64,
}

/// The answer to `GET /api/v1/fleet?space=`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    pub space: String,
    /// The space's head version, which `on_head` is counted against.
    pub head: u64,
    pub counts: FleetCounts,
    /// Online agents first, then by when they were last seen, newest first.
    pub agents: Vec<FleetAgent>,
}
