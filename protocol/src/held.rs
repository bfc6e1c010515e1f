//! A held change: a burst of local edits in an agent's two-way folder that would delete or
//! replace more of the space than the agent's mass-change guard allows. The agent does not
//! publish it; it tells the hub, and an admin approves (the agent publishes it) or rejects it
//! (the agent puts the folder back as the hub has it).

use serde::{Deserialize, Serialize};

/// Most paths of each kind an agent lists in a held change; the counts say the rest.
pub const HELD_SAMPLE_MAX: usize = 20;

/// What an agent holds back, as it reports it (`PUT /spaces/{space}/held/{client_id}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldChange {
    /// Files the burst deletes.
    pub deletes: u64,
    /// Files the burst replaces with other content.
    pub replaces: u64,
    /// Files in the folder before the burst.
    pub total: u64,
    /// Up to [`HELD_SAMPLE_MAX`] of the deleted paths.
    #[serde(default)]
    pub sample_deletes: Vec<String>,
    /// Up to [`HELD_SAMPLE_MAX`] of the replaced paths.
    #[serde(default)]
    pub sample_replaces: Vec<String>,
    /// When the agent held it (RFC 3339).
    pub held_at: String,
}

impl HeldChange {
    /// Checks the bounds a hub enforces on what an agent sends.
    pub fn validate(&self) -> Result<(), String> {
        if self.sample_deletes.len() > HELD_SAMPLE_MAX
            || self.sample_replaces.len() > HELD_SAMPLE_MAX
        {
            return Err(format!(
                "at most {HELD_SAMPLE_MAX} sample paths of each kind"
            ));
        }
        for p in self.sample_deletes.iter().chain(&self.sample_replaces) {
            crate::validate_path(p).map_err(|e| e.to_string())?;
        }
        if self.held_at.len() > 64 {
            return Err("held_at is over 64 bytes".into());
        }
        Ok(())
    }
}

/// What an admin decided about a held change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeldDecision {
    Pending,
    Approved,
    Rejected,
}

impl HeldDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            HeldDecision::Pending => "pending",
            HeldDecision::Approved => "approved",
            HeldDecision::Rejected => "rejected",
        }
    }
}

impl std::str::FromStr for HeldDecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(HeldDecision::Pending),
            "approved" => Ok(HeldDecision::Approved),
            "rejected" => Ok(HeldDecision::Rejected),
            other => Err(format!("unknown decision {other:?}")),
        }
    }
}

/// A held change as the hub keeps it (the answer to the agent's `PUT`, and the admin list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRecord {
    pub space: String,
    pub client_id: String,
    pub change: HeldChange,
    pub decision: HeldDecision,
    /// The admin token that decided, once one did.
    #[serde(default)]
    pub decided_by: Option<String>,
    /// When the hub last heard of it or it was decided (RFC 3339).
    pub updated_at: String,
}
