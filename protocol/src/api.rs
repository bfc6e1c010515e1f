//! HTTP API bodies under `/api/v1`. See docs/PROTOCOL.md for every route with examples.

use crate::frames::AgentState;
use crate::hash::Sha256Hex;
use crate::manifest::ManifestEntry;
use serde::{Deserialize, Serialize};

/// The current version of a space: what `GET /spaces/{space}/head` returns and what
/// `welcome` and `sync_required` carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub space: String,
    pub version: u64,
    /// sha256 of the version's canonical manifest.
    pub data_hash: Sha256Hex,
    /// True for an admin's force-sync and for a bump made outside the hub: agents re-verify
    /// every local file, not only the changed ones.
    pub forced: bool,
    #[serde(default)]
    pub reason: Option<String>,
    /// Who made this version (token name, or what an outside writer put in
    /// `sync_metadata.last_modified_by`).
    #[serde(default)]
    pub by: Option<String>,
    /// When the version was made, RFC 3339.
    pub at: String,
    /// Which history the version belongs to. It changes only when the hub finds the database
    /// rewritten (a restore, a failover to a standby that lacks the newest versions): within one
    /// epoch heads only move forward, and an agent follows a head of a newer epoch even when its
    /// version is lower.
    #[serde(default)]
    pub epoch: u64,
    /// The newest forced version at or below `version` that the hub knows of (0: none), so an
    /// agent that skips versions still re-verifies after a force-sync it did not see.
    #[serde(default)]
    pub forced_version: u64,
}

/// `POST /spaces/{space}/commits`: the next version, from `base_version` plus changes.
/// Blobs named by `puts` must have been uploaded first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    pub base_version: u64,
    #[serde(default)]
    pub puts: Vec<ManifestEntry>,
    #[serde(default)]
    pub deletes: Vec<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// Successful commit: the new head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitResponse {
    pub head: Head,
}

/// `POST /spaces/{space}/force-sync`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForceSyncRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// A list of blobs: the body of `POST /blobs/pack` (stream these back in one response, see
/// [`crate::pack`]) and of `POST /blobs/missing` and its answer (which of these the hub lacks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobList {
    pub sha256: Vec<Sha256Hex>,
}

/// Kinds of sync in `sync_log.sync_type`, as system 1 wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncType {
    Download,
    Upload,
    ForceSync,
}

impl SyncType {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncType::Download => "download",
            SyncType::Upload => "upload",
            SyncType::ForceSync => "force_sync",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    Success,
    Failed,
}

impl SyncStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Success => "success",
            SyncStatus::Failed => "failed",
        }
    }
}

/// One sync an agent made, sent as `POST /sync-log` or a `report` frame. `report_id` makes
/// the report idempotent: sending it twice stores it once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub report_id: String,
    pub client_id: String,
    pub space: String,
    pub sync_type: SyncType,
    pub status: SyncStatus,
    #[serde(default)]
    pub version: Option<u64>,
    /// Files this sync changed: added, changed or removed (for a publish, committed).
    #[serde(default)]
    pub items_synced: u64,
    /// Files in the version after the sync, when known.
    #[serde(default)]
    pub items_total: Option<u64>,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub error_message: Option<String>,
    /// The person at the PC, where the app knows one (`sync_log.discord_id` in system 1).
    #[serde(default)]
    pub user: Option<String>,
    /// When the sync happened (RFC 3339); the hub's clock when absent.
    #[serde(default)]
    pub synced_at: Option<String>,
}

/// A `sync_log` row as `GET /sync-log` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncLogEntry {
    pub id: i64,
    pub report_id: Option<String>,
    pub client_id: Option<String>,
    pub space: Option<String>,
    pub sync_type: String,
    pub status: String,
    pub version: Option<i64>,
    pub items_synced: Option<i64>,
    /// Files in the version after the sync; absent on rows older than this column.
    #[serde(default)]
    pub items_total: Option<i64>,
    pub bytes: Option<i64>,
    pub duration_ms: Option<i64>,
    pub error_message: Option<String>,
    pub user: Option<String>,
    pub synced_at: String,
}

/// A version of a space as `GET /spaces/{space}/versions` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    #[serde(flatten)]
    pub head: Head,
    pub entries: u64,
    pub bytes: u64,
}

/// A connected (or recently seen) agent as `GET /clients` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub client_id: String,
    pub token_name: String,
    pub hostname: Option<String>,
    pub agent_version: Option<String>,
    pub connected_at: String,
    /// Last reported state per space.
    pub spaces: Vec<ClientSpace>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSpace {
    pub space: String,
    #[serde(flatten)]
    pub state: AgentState,
}

/// What a token may do (its capability), on the spaces it is limited to:
/// `read` syncs a space, `publish` also commits to it, `admin` does everything on every space.
/// `agent`, the word before capabilities existed, is read as `publish` (what it allowed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Read,
    #[serde(alias = "agent")]
    Publish,
    Admin,
}

impl Role {
    /// The role agent tokens had before capabilities: read and commit, now `Publish`. Kept so
    /// code written against the old name reads the same.
    #[allow(non_upper_case_globals)]
    pub const Agent: Role = Role::Publish;

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Publish => "publish",
            Role::Admin => "admin",
        }
    }

    /// True when a token of this role may commit (new versions by publishing).
    pub fn may_publish(self) -> bool {
        self >= Role::Publish
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Role::Read),
            "publish" | "agent" => Ok(Role::Publish),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown capability {other:?}: use read, publish or admin"
            )),
        }
    }
}

/// A token as `GET /tokens` lists it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    /// `None`: every space.
    pub spaces: Option<Vec<String>>,
    pub created_at: String,
    pub revoked: bool,
}

/// `POST /tokens`: a new token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTokenRequest {
    pub name: String,
    /// What the token may do; `read` when absent. `can` is accepted for it too.
    #[serde(default, alias = "can")]
    pub role: Role,
    /// Limit the token to these spaces; absent or empty: every space.
    #[serde(default)]
    pub spaces: Option<Vec<String>>,
}

/// One admin action as `GET /audit` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    /// When, RFC 3339 UTC.
    pub at: String,
    /// The name of the token that did it (or `cli` for `synchub` on the server).
    pub who: String,
    /// What: `force_sync`, `rollback`, `token_create`, `token_revoke`, `held_approve`,
    /// `held_reject`.
    pub action: String,
    /// What it was done to: a space, a token name, or `space/client`.
    pub target: String,
    /// The peer address the request came from; `None` for the command line.
    pub from: Option<String>,
}

/// The answer to `POST /tokens`: the only time the secret is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub name: String,
    pub role: Role,
    pub secret: String,
}

/// Every error body: a stable machine-readable `code` and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    /// For `conflict`: the paths the newer head touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// For `conflict`: the head the commit lost against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<Head>,
}

/// The stable error codes.
pub mod codes {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const INVALID_PATH: &str = "invalid_path";
    /// Two paths of the version would be one file on Windows or macOS (case or Unicode
    /// normalization, or a file against a folder).
    pub const PATH_COLLISION: &str = "path_collision";
    pub const INVALID_MANIFEST: &str = "invalid_manifest";
    pub const INVALID_HASH: &str = "invalid_hash";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_FOUND: &str = "not_found";
    pub const CONFLICT: &str = "conflict";
    pub const TOO_LARGE: &str = "too_large";
    pub const HASH_MISMATCH: &str = "hash_mismatch";
    pub const MISSING_BLOBS: &str = "missing_blobs";
    pub const RANGE_NOT_SATISFIABLE: &str = "range_not_satisfiable";
    pub const FRAME_TOO_LARGE: &str = "frame_too_large";
    pub const MALFORMED_FRAME: &str = "malformed_frame";
    pub const UNAVAILABLE: &str = "unavailable";
    /// 429: too many wrong tokens from this address (try again after a minute), too many
    /// sockets of one token, or its upload quota spent.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// 408: the request body stopped arriving (`limits.body_idle_timeout_ms`).
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// 507: the hub's disk (or database) is full; nothing was stored.
    pub const STORAGE_FULL: &str = "storage_full";
    /// A stored blob or manifest does not hash to its name (see `synchub fsck`).
    pub const CORRUPT_DATA: &str = "corrupt_data";
    /// The hub serves the space but holds no data for it yet.
    pub const NO_DATA: &str = "no_data";
    /// 503 with `Retry-After`: the hub serves as many downloads as it may at once; ask again
    /// after that many seconds (not a failure).
    pub const BUSY: &str = "busy";
    pub const INTERNAL: &str = "internal";
}
