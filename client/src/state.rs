//! The agent's state machine for one space: every state change goes through [`transition`],
//! so the rules (when local use is blocked, which target a download is for, what a failure
//! keeps) live in one place. The states themselves are the wire type
//! [`synchub_protocol::AgentState`], sent to the hub as `status` frames and shown locally.
//!
//! ```text
//! starting(v) -> ready(v) -> sync_required(v, t) -> downloading -> verifying -> applying -> ready(t)
//!                     any of these -> failed(error, retry_at) -> sync_required ...
//! ```

use synchub_protocol::AgentState;

/// What happened, as the space worker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The hub's head equals what the agent holds.
    UpToDate,
    /// The hub has `target`, which differs from what the agent holds.
    HeadChanged {
        target: u64,
        forced: bool,
    },
    /// The download of `target` (not forced) waits until `starts_at` (RFC 3339), spreading
    /// the fleet's downloads as the hub asked.
    Spreading {
        target: u64,
        starts_at: String,
    },
    /// Download progress (also the start of the download, with zeros done).
    Progress {
        files_done: u64,
        files_total: u64,
        bytes_done: u64,
        bytes_total: u64,
        bytes_per_sec: u64,
    },
    Verifying,
    Applying,
    /// The new tree is in place.
    Applied {
        version: u64,
    },
    Failed {
        error: String,
        retry_at: Option<String>,
        stale_allowed: bool,
    },
}

/// The target version a state is working towards, if any.
pub fn target_of(state: &AgentState) -> Option<u64> {
    match state {
        AgentState::SyncRequired { target, .. }
        | AgentState::Downloading { target, .. }
        | AgentState::Verifying { target, .. }
        | AgentState::Applying { target, .. }
        | AgentState::Failed { target, .. } => Some(*target),
        AgentState::Starting { .. } | AgentState::Ready { .. } => None,
    }
}

/// The next state after `event`.
pub(crate) fn transition(state: &AgentState, event: Event) -> AgentState {
    let version = state.version();
    // A progress event before any head change still needs a target; the held version is the
    // only honest answer then.
    let target = target_of(state).unwrap_or(version);
    match event {
        Event::UpToDate => AgentState::Ready { version },
        Event::HeadChanged { target, forced } => AgentState::SyncRequired {
            version,
            target,
            forced,
            starts_at: None,
        },
        Event::Spreading { target, starts_at } => AgentState::SyncRequired {
            version,
            target,
            forced: false,
            starts_at: Some(starts_at),
        },
        Event::Progress {
            files_done,
            files_total,
            bytes_done,
            bytes_total,
            bytes_per_sec,
        } => AgentState::Downloading {
            version,
            target,
            files_done,
            files_total,
            bytes_done,
            bytes_total,
            bytes_per_sec,
        },
        Event::Verifying => AgentState::Verifying { version, target },
        Event::Applying => AgentState::Applying { version, target },
        Event::Applied { version } => AgentState::Ready { version },
        Event::Failed {
            error,
            retry_at,
            stale_allowed,
        } => AgentState::Failed {
            version,
            target,
            error,
            retry_at,
            stale_allowed,
        },
    }
}

/// Whether a change from `old` to `new` is only download progress (throttled when sent).
pub(crate) fn is_progress_only(old: &AgentState, new: &AgentState) -> bool {
    matches!(
        (old, new),
        (
            AgentState::Downloading { .. },
            AgentState::Downloading { .. }
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_cycle_blocks_from_sync_required_until_ready() {
        let s = AgentState::Starting { version: 3 };
        assert!(!s.allows_use());
        let s = transition(&s, Event::UpToDate);
        assert_eq!(s, AgentState::Ready { version: 3 });
        assert!(s.allows_use());
        let s = transition(
            &s,
            Event::HeadChanged {
                target: 5,
                forced: true,
            },
        );
        assert!(!s.allows_use());
        assert_eq!(target_of(&s), Some(5));
        let s = transition(
            &s,
            Event::Progress {
                files_done: 1,
                files_total: 2,
                bytes_done: 10,
                bytes_total: 20,
                bytes_per_sec: 40,
            },
        );
        assert!(matches!(
            s,
            AgentState::Downloading {
                version: 3,
                target: 5,
                files_done: 1,
                ..
            }
        ));
        assert!(!s.allows_use());
        let s = transition(&s, Event::Verifying);
        assert_eq!(
            s,
            AgentState::Verifying {
                version: 3,
                target: 5
            }
        );
        let s = transition(&s, Event::Applying);
        assert!(!s.allows_use());
        let s = transition(&s, Event::Applied { version: 5 });
        assert_eq!(s, AgentState::Ready { version: 5 });
        assert!(s.allows_use());
    }

    #[test]
    fn failure_keeps_versions_and_stale_flag_decides_use() {
        let s = AgentState::Downloading {
            version: 1,
            target: 2,
            files_done: 0,
            files_total: 1,
            bytes_done: 0,
            bytes_total: 1,
            bytes_per_sec: 0,
        };
        let blocked = transition(
            &s,
            Event::Failed {
                error: "hash".into(),
                retry_at: None,
                stale_allowed: false,
            },
        );
        assert_eq!(blocked.version(), 1);
        assert_eq!(target_of(&blocked), Some(2));
        assert!(!blocked.allows_use());
        let stale = transition(
            &s,
            Event::Failed {
                error: "hash".into(),
                retry_at: None,
                stale_allowed: true,
            },
        );
        assert!(stale.allows_use());
        // A retry goes back to sync_required for the newest target.
        let again = transition(
            &stale,
            Event::HeadChanged {
                target: 4,
                forced: false,
            },
        );
        assert_eq!(
            again,
            AgentState::SyncRequired {
                version: 1,
                target: 4,
                forced: false,
                starts_at: None,
            }
        );
    }

    #[test]
    fn progress_only_detection() {
        let a = AgentState::Downloading {
            version: 1,
            target: 2,
            files_done: 0,
            files_total: 1,
            bytes_done: 0,
            bytes_total: 1,
            bytes_per_sec: 0,
        };
        assert!(is_progress_only(&a, &a));
        assert!(!is_progress_only(&a, &AgentState::Ready { version: 2 }));
    }
}
