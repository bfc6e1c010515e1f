//! Size limits on every string and list a client sends, checked by the hub before anything is
//! stored or broadcast, and respected by the agent before it sends.
//!
//! A commit message becomes the head's `reason`, which every `welcome` and `sync_required`
//! frame and every version listing carries: unbounded, one client could make frames no agent
//! can read. These bounds keep every frame the hub builds from client input small.

use crate::api::{CommitRequest, ForceSyncRequest, SyncReport};
use crate::frames::{AgentFrame, AgentState};

/// Longest commit `message` / force-sync `reason`, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1000;
/// Longest `client_id` and `report_id`, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest `error_message` of a report or `error` of a status, in bytes; longer ones are cut.
pub const MAX_ERROR_TEXT_LEN: usize = 4000;
/// Longest `user` of a report, and `hostname` and `agent_version` of a `hello`, in bytes.
pub const MAX_LABEL_LEN: usize = 256;
/// Most hashes one `POST /blobs/missing` may ask about (an agent asks in batches).
pub const MAX_BLOBS_PER_QUERY: usize = 10_000;
/// How far a report's `synced_at` may be ahead of the hub's clock; later times are replaced
/// by the hub's clock, so a PC with a wrong clock cannot pin the top of `sync_log`.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// A field over its bound.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BoundError {
    #[error("{field} is {len} bytes; the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
}

/// `value` is at most `max` bytes.
pub fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), BoundError> {
    if value.len() > max {
        Err(BoundError::TooLong {
            field,
            len: value.len(),
            max,
        })
    } else {
        Ok(())
    }
}

/// `value` is 1 to `max` bytes.
pub fn check_id(field: &'static str, value: &str, max: usize) -> Result<(), BoundError> {
    if value.is_empty() {
        return Err(BoundError::Empty { field });
    }
    check_len(field, value, max)
}

/// Cuts `text` to at most `max` bytes on a character boundary (for free error texts, where
/// keeping the start is better than refusing the whole report).
pub fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
}

fn check_opt(field: &'static str, value: &Option<String>, max: usize) -> Result<(), BoundError> {
    value
        .as_deref()
        .map_or(Ok(()), |v| check_len(field, v, max))
}

impl CommitRequest {
    /// The message fits every frame and listing it ends up in.
    pub fn check_bounds(&self) -> Result<(), BoundError> {
        check_opt("message", &self.message, MAX_MESSAGE_LEN)
    }
}

impl ForceSyncRequest {
    pub fn check_bounds(&self) -> Result<(), BoundError> {
        check_opt("reason", &self.reason, MAX_MESSAGE_LEN)
    }
}

impl SyncReport {
    /// Refuses ids and labels over their bounds and cuts an over-long error text.
    pub fn check_bounds(&mut self) -> Result<(), BoundError> {
        check_id("report_id", &self.report_id, MAX_ID_LEN)?;
        check_id("client_id", &self.client_id, MAX_ID_LEN)?;
        check_opt("user", &self.user, MAX_LABEL_LEN)?;
        check_opt("synced_at", &self.synced_at, MAX_LABEL_LEN)?;
        if let Some(text) = &mut self.error_message {
            truncate_utf8(text, MAX_ERROR_TEXT_LEN);
        }
        Ok(())
    }
}

impl AgentFrame {
    /// Refuses ids and labels over their bounds and cuts over-long error texts.
    pub fn check_bounds(&mut self) -> Result<(), BoundError> {
        match self {
            AgentFrame::Hello {
                client_id,
                agent_version,
                hostname,
                ..
            } => {
                check_id("client_id", client_id, MAX_ID_LEN)?;
                check_opt("agent_version", agent_version, MAX_LABEL_LEN)?;
                check_opt("hostname", hostname, MAX_LABEL_LEN)
            }
            AgentFrame::Status { state, .. } => {
                if let AgentState::Failed {
                    error, retry_at, ..
                } = state
                {
                    truncate_utf8(error, MAX_ERROR_TEXT_LEN);
                    check_opt("retry_at", retry_at, MAX_LABEL_LEN)?;
                }
                Ok(())
            }
            AgentFrame::Report(report) => report.check_bounds(),
            AgentFrame::Pong => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        let mut s = "ș".repeat(10);
        truncate_utf8(&mut s, 5);
        assert_eq!(s, "șș");
        let mut short = "abc".to_owned();
        truncate_utf8(&mut short, 5);
        assert_eq!(short, "abc");
    }

    #[test]
    fn commit_message_bound() {
        let mut req = CommitRequest {
            base_version: 1,
            puts: vec![],
            deletes: vec![],
            message: Some("x".repeat(MAX_MESSAGE_LEN)),
        };
        assert_eq!(req.check_bounds(), Ok(()));
        req.message = Some("x".repeat(MAX_MESSAGE_LEN + 1));
        assert!(matches!(
            req.check_bounds(),
            Err(BoundError::TooLong {
                field: "message",
                ..
            })
        ));
    }
}
