//! WebSocket frames between agent and hub at `GET /api/v1/ws`: JSON text messages, each with a
//! `type` tag. The hub opens with `welcome` (every current head), so a (re)connecting agent
//! never misses a bump; afterwards it sends `sync_required` whenever a head moves.

use crate::api::{Head, SyncReport};
use crate::hash::Sha256Hex;
use serde::{Deserialize, Serialize};

/// What an agent holds of one space when it says `hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSpace {
    pub space: String,
    /// 0 when the agent holds nothing yet.
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub data_hash: Option<Sha256Hex>,
}

/// An agent's state, as shown to admins and to local programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AgentState {
    /// Started, has not compared its data with the hub yet.
    Starting {
        version: u64,
    },
    /// Holds `version` and it is current: local use is allowed.
    Ready {
        version: u64,
    },
    /// A newer version exists; local use is blocked until it is applied.
    SyncRequired {
        version: u64,
        target: u64,
        forced: bool,
        /// Set while the agent waits out the hub's spread hint: when its download starts
        /// (RFC 3339).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        starts_at: Option<String>,
    },
    Downloading {
        version: u64,
        target: u64,
        files_done: u64,
        files_total: u64,
        bytes_done: u64,
        bytes_total: u64,
        /// Average download rate since the download started.
        #[serde(default)]
        bytes_per_sec: u64,
    },
    Verifying {
        version: u64,
        target: u64,
    },
    Applying {
        version: u64,
        target: u64,
    },
    /// The last attempt failed; another starts at `retry_at` (RFC 3339).
    Failed {
        version: u64,
        target: u64,
        error: String,
        retry_at: Option<String>,
        /// True when local use is allowed on the old data (`on_failure = "unblock_stale"`).
        #[serde(default)]
        stale_allowed: bool,
    },
}

impl AgentState {
    /// Whether programs on the PC may read the data now.
    pub fn allows_use(&self) -> bool {
        match self {
            AgentState::Ready { .. } => true,
            AgentState::Failed { stale_allowed, .. } => *stale_allowed,
            _ => false,
        }
    }

    /// The version the agent's local tree holds.
    pub fn version(&self) -> u64 {
        match self {
            AgentState::Starting { version }
            | AgentState::Ready { version }
            | AgentState::SyncRequired { version, .. }
            | AgentState::Downloading { version, .. }
            | AgentState::Verifying { version, .. }
            | AgentState::Applying { version, .. }
            | AgentState::Failed { version, .. } => *version,
        }
    }

    /// Short name: `ready`, `downloading`, ...
    pub fn name(&self) -> &'static str {
        match self {
            AgentState::Starting { .. } => "starting",
            AgentState::Ready { .. } => "ready",
            AgentState::SyncRequired { .. } => "sync_required",
            AgentState::Downloading { .. } => "downloading",
            AgentState::Verifying { .. } => "verifying",
            AgentState::Applying { .. } => "applying",
            AgentState::Failed { .. } => "failed",
        }
    }
}

/// Frames an agent sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentFrame {
    Hello {
        protocol: u32,
        client_id: String,
        spaces: Vec<HeldSpace>,
        #[serde(default)]
        agent_version: Option<String>,
        #[serde(default)]
        hostname: Option<String>,
    },
    Status {
        space: String,
        #[serde(flatten)]
        state: AgentState,
    },
    Report(SyncReport),
    /// Answer to the hub's `ping`.
    Pong,
}

/// Frames the hub sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubFrame {
    Welcome {
        protocol: u32,
        hub_id: String,
        /// Current head of every space the agent asked for (and its token may read).
        heads: Vec<Head>,
        /// The hub pings this often; an agent that hears nothing for three intervals should
        /// treat the socket as dead.
        ping_interval_ms: u64,
    },
    SyncRequired(Head),
    Ping,
    /// The report with this id is stored (or was already).
    ReportAck {
        report_id: String,
    },
    Error {
        code: String,
        message: String,
    },
}

/// The spread hint a `sync_required` frame may carry beside the head's fields: an agent starts
/// a non-forced download after a uniformly random delay within `spread_ms`, so a large fleet
/// does not ask for a new version all at once. Optional on the wire (absent means 0), so an
/// agent that does not know it parses the frame as before and ignores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spread {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spread_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Spread {
    /// The hint in a frame's text (0 when absent or when the text is not a frame).
    pub fn of_frame(text: &str) -> Spread {
        serde_json::from_str(text).unwrap_or_default()
    }
}

/// The manifest delta a `sync_required` frame may carry beside the head's fields: the changes
/// from the version before the announced one (the version most agents hold), so those agents
/// learn the new manifest without asking for it. It is encoded as the answer to
/// `GET .../manifest?from=V` is (see [`crate::delta`]) and trusted no more than that answer:
/// the agent applies it only to the version it names, and uses the result only when it hashes
/// to the announced `data_hash`; otherwise it asks as before. The hub sends one only when its
/// text is at most [`MAX_FRAME_DELTA_LEN`] bytes (the frame goes to every socket), and an agent
/// ignores a longer one. Optional on the wire, like the spread hint.
///
/// A small change's new files may ride along in `blobs`, so that the agents need no request
/// at all for it: each is a blob the delta adds (named by its sha256, its bytes in standard
/// base64), at most [`MAX_FRAME_BLOBS_LEN`] bytes together. The agent checks each blob's
/// hash as it checks a downloaded one, and fetches whatever the frame does not carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameDelta {
    /// The version the delta starts from.
    pub from_version: u64,
    /// The encoded delta.
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<FrameBlob>,
}

/// A blob carried in a `sync_required` frame (see [`FrameDelta`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameBlob {
    pub sha256: Sha256Hex,
    /// The bytes, standard base64.
    pub data: String,
}

impl FrameBlob {
    pub fn new(sha256: Sha256Hex, bytes: &[u8]) -> Self {
        use base64::Engine;
        FrameBlob {
            sha256,
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    /// How many bytes `data` decodes to (padded base64), without decoding it.
    fn decoded_len(&self) -> usize {
        let padding = self.data.bytes().rev().take_while(|&b| b == b'=').count();
        (self.data.len() / 4 * 3).saturating_sub(padding)
    }

    /// The bytes, when they decode and hash to `sha256`.
    pub fn checked_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .ok()?;
        (Sha256Hex::of(&bytes) == self.sha256).then_some(bytes)
    }
}

/// Longest delta text a `sync_required` frame carries, in bytes: about 150 changed files.
pub const MAX_FRAME_DELTA_LEN: usize = 16 * 1024;

/// Most blob bytes a `sync_required` frame carries (before base64): a few small files, such as
/// the one or two QR images an ordinary change makes. The frame goes to every socket at once,
/// so this bounds what a bump queues in the kernel per socket.
pub const MAX_FRAME_BLOBS_LEN: usize = 32 * 1024;

impl FrameDelta {
    /// The delta in a frame's text, when it has one within [`MAX_FRAME_DELTA_LEN`] (its blobs
    /// are dropped when they are over [`MAX_FRAME_BLOBS_LEN`]).
    pub fn of_frame(text: &str) -> Option<FrameDelta> {
        #[derive(Deserialize)]
        struct Beside {
            #[serde(default)]
            delta: Option<FrameDelta>,
        }
        let mut delta = serde_json::from_str::<Beside>(text)
            .ok()?
            .delta
            .filter(|d| d.text.len() <= MAX_FRAME_DELTA_LEN)?;
        let bytes: usize = delta.blobs.iter().map(FrameBlob::decoded_len).sum();
        if bytes > MAX_FRAME_BLOBS_LEN {
            delta.blobs.clear();
        }
        Some(delta)
    }
}

/// Encodes the `sync_required` frame of `head` with `spread` and `delta` beside it: the JSON of
/// [`HubFrame::SyncRequired`] plus `spread_ms` when it is not 0 and `delta` when there is one.
pub fn sync_required_frame(
    head: &Head,
    spread: Spread,
    delta: Option<&FrameDelta>,
) -> serde_json::Result<String> {
    #[derive(Serialize)]
    #[serde(tag = "type", rename = "sync_required")]
    struct Frame<'a> {
        #[serde(flatten)]
        head: &'a Head,
        #[serde(flatten)]
        spread: Spread,
        #[serde(skip_serializing_if = "Option::is_none")]
        delta: Option<&'a FrameDelta>,
    }
    serde_json::to_string(&Frame {
        head,
        spread,
        delta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(version: u64, forced: bool) -> Head {
        Head {
            space: "s".into(),
            version,
            data_hash: Sha256Hex::empty(),
            forced,
            reason: None,
            by: None,
            at: "2026-11-25T00:00:00Z".into(),
            epoch: 0,
            forced_version: 0,
        }
    }

    #[test]
    fn frames_have_type_tags() {
        let json = serde_json::to_value(AgentFrame::Status {
            space: "s".into(),
            state: AgentState::Ready { version: 3 },
        })
        .unwrap();
        assert_eq!(json["type"], "status");
        assert_eq!(json["state"], "ready");
        assert_eq!(json["version"], 3);
        let back: AgentFrame = serde_json::from_value(json).unwrap();
        assert!(matches!(back, AgentFrame::Status { .. }));

        let head = Head {
            space: "s".into(),
            version: 7,
            data_hash: Sha256Hex::empty(),
            forced: true,
            reason: Some("fix".into()),
            by: Some("admin".into()),
            at: "2026-11-25T00:00:00Z".into(),
            epoch: 0,
            forced_version: 0,
        };
        let json = serde_json::to_value(HubFrame::SyncRequired(head.clone())).unwrap();
        assert_eq!(json["type"], "sync_required");
        assert_eq!(json["version"], 7);
        assert_eq!(json["forced"], true);
        assert_eq!(
            serde_json::from_value::<HubFrame>(json).unwrap(),
            HubFrame::SyncRequired(head)
        );
    }

    #[test]
    fn the_spread_hint_rides_beside_the_head_and_old_parsers_ignore_it() {
        let head = head(8, false);
        let text = sync_required_frame(&head, Spread { spread_ms: 1500 }, None).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["type"], "sync_required");
        assert_eq!(json["spread_ms"], 1500);
        assert_eq!(
            serde_json::from_str::<HubFrame>(&text).unwrap(),
            HubFrame::SyncRequired(head.clone())
        );
        assert_eq!(Spread::of_frame(&text).spread_ms, 1500);

        let plain = sync_required_frame(&head, Spread::default(), None).unwrap();
        assert_eq!(
            plain,
            serde_json::to_string(&HubFrame::SyncRequired(head)).unwrap(),
            "no hint: the frame is byte for byte what it was"
        );
        assert_eq!(Spread::of_frame(&plain), Spread::default());
    }

    #[test]
    fn a_delta_rides_beside_the_head_and_a_long_one_is_ignored() {
        let head = head(9, false);
        let delta = FrameDelta {
            from_version: 8,
            text: "synchub-manifest-delta 1\nfrom a\nto b\n".into(),
            blobs: vec![FrameBlob::new(Sha256Hex::of(b"qr"), b"qr")],
        };
        let text = sync_required_frame(&head, Spread::default(), Some(&delta)).unwrap();
        assert_eq!(
            serde_json::from_str::<HubFrame>(&text).unwrap(),
            HubFrame::SyncRequired(head.clone()),
            "an agent that does not know the delta reads the frame as before"
        );
        assert_eq!(FrameDelta::of_frame(&text), Some(delta));
        let plain = sync_required_frame(&head, Spread::default(), None).unwrap();
        assert_eq!(FrameDelta::of_frame(&plain), None);

        let long = FrameDelta {
            from_version: 8,
            text: "x".repeat(MAX_FRAME_DELTA_LEN + 1),
            blobs: Vec::new(),
        };
        let text = sync_required_frame(&head, Spread::default(), Some(&long)).unwrap();
        assert_eq!(FrameDelta::of_frame(&text), None);
    }

    #[test]
    fn a_frame_blob_is_used_only_when_it_hashes_right_and_too_many_are_dropped() {
        let blob = FrameBlob::new(Sha256Hex::of(b"png bytes"), b"png bytes");
        assert_eq!(blob.checked_bytes().as_deref(), Some(&b"png bytes"[..]));
        let lying = FrameBlob::new(Sha256Hex::of(b"png bytes"), b"other bytes");
        assert_eq!(lying.checked_bytes(), None);
        let garbage = FrameBlob {
            sha256: Sha256Hex::of(b""),
            data: "not base64!".into(),
        };
        assert_eq!(garbage.checked_bytes(), None);

        let head = head(9, false);
        let big = vec![7u8; MAX_FRAME_BLOBS_LEN + 1];
        let over = FrameDelta {
            from_version: 8,
            text: "t".into(),
            blobs: vec![FrameBlob::new(Sha256Hex::of(&big), &big)],
        };
        let text = sync_required_frame(&head, Spread::default(), Some(&over)).unwrap();
        let read = FrameDelta::of_frame(&text).expect("the delta itself is kept");
        assert!(read.blobs.is_empty(), "blobs over the bound are dropped");
        let fits = vec![7u8; MAX_FRAME_BLOBS_LEN];
        let within = FrameDelta {
            blobs: vec![FrameBlob::new(Sha256Hex::of(&fits), &fits)],
            ..over
        };
        let text = sync_required_frame(&head, Spread::default(), Some(&within)).unwrap();
        assert_eq!(FrameDelta::of_frame(&text), Some(within));
    }

    #[test]
    fn unknown_frame_type_is_an_error() {
        assert!(serde_json::from_str::<AgentFrame>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<AgentFrame>(r#"{"type":"hello"}"#).is_err());
    }
}
