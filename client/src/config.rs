//! The agent's configuration: one struct, filled from defaults, an optional TOML file,
//! `SYNCHUB_*` environment variables and command-line flags (the binary does the layering;
//! the library takes the finished struct). `Display` masks the token so it can be logged.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What to do with files found in the local tree that the held manifest does not list
/// (someone put them there by hand) when a new version is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtraFiles {
    /// Drop them with the old tree.
    #[default]
    Remove,
    /// Copy them to `DIR/.synchub/kept/<timestamp>/...` first.
    Keep,
}

/// What local programs may do after a failed sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Keep blocking until a sync succeeds (system 1's behaviour).
    #[default]
    StayBlocked,
    /// Allow use of the old data while retrying.
    UnblockStale,
}

/// Most last-good trees kept (each is a full tree of hard links, or copies without them).
pub(crate) const MAX_KEEP_TREES: usize = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Hub base URLs (`http://host:port`); reconnects rotate through them.
    pub hubs: Vec<String>,
    pub token: String,
    /// Spaces to hold. With one space its tree is `dir/current`; with several, each space
    /// lives in `dir/<space>/current`.
    pub spaces: Vec<String>,
    pub dir: PathBuf,
    /// Local API (status, events, block page); `None` turns it off. Loopback only.
    pub status_listen: Option<SocketAddr>,
    pub extra_files: ExtraFiles,
    pub on_failure: OnFailure,
    /// Last-good trees: how many previous trees stay beside the live one after a switch, so
    /// a program still reading an older one is not cut off (0: only the live tree). They are
    /// also what `synchub-agent restore` goes back to first.
    pub keep_trees: usize,
    /// Path of the WebSocket route on the hub.
    pub ws_path: String,
    /// Never open the WebSocket: rely on the HTTP head check alone (tests, hostile proxies).
    pub disable_websocket: bool,
    /// Interval of the HTTP head check while the WebSocket is down.
    pub fallback_interval_ms: u64,
    /// Most blob downloads in flight at once.
    pub parallel_downloads: usize,
    /// Blobs up to this size are fetched in packs.
    pub pack_blob_max: u64,
    /// A pack request asks for at most this many bytes.
    pub pack_batch_bytes: u64,
    /// Longest wait between reconnect attempts and between failed sync retries.
    pub max_backoff_ms: u64,
    /// Random delay before a non-forced download, spreading load after a broadcast; the
    /// hub's spread hint in `sync_required` is used instead when it is longer.
    pub download_jitter_ms: u64,
    /// The person at this PC, copied into reports (`sync_log.discord_id`).
    pub user: Option<String>,
    /// Stable id of this agent; generated and kept in `dir/.synchub/client_id` when unset.
    pub client_id: Option<String>,
    /// Selective sync: hold only the paths these globs or prefixes match (every space);
    /// empty: everything. See `selection.rs`.
    pub include: Vec<String>,
    /// While the WebSocket is up, the head is still checked over HTTP (with `If-None-Match`)
    /// this often, so a replica that missed a bump is noticed.
    pub head_check_interval_ms: u64,
    /// An HTTP answer that stays silent this long is abandoned (and the next hub tried).
    pub read_timeout_ms: u64,
    /// At start, how long to wait for a first head before the space goes to `failed` (and
    /// the last good tree may be used under `on_failure = "unblock_stale"`).
    pub boot_wait_ms: u64,
    /// What the block page calls each space (`global_version = "Date elevi"`); a space
    /// without one is called "the shared data".
    pub display_names: std::collections::BTreeMap<String, String>,
    /// PEM file of a private certificate authority that signed the hub's certificate, trusted
    /// besides the system's roots (`https://` and `wss://`).
    pub ca_cert: Option<PathBuf>,
    /// Two-way folder mode (`[two_way]`, `--two-way`): DIR is the app's own folder.
    pub two_way: crate::twoway::TwoWayConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            hubs: Vec::new(),
            token: String::new(),
            spaces: vec![synchub_protocol::DEFAULT_SPACE.to_owned()],
            dir: PathBuf::from("synchub-data"),
            status_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7071))),
            extra_files: ExtraFiles::default(),
            on_failure: OnFailure::default(),
            keep_trees: 1,
            ws_path: "/api/v1/ws".to_owned(),
            disable_websocket: false,
            fallback_interval_ms: 1000,
            parallel_downloads: 4,
            pack_blob_max: 256 * 1024,
            pack_batch_bytes: 8 * 1024 * 1024,
            max_backoff_ms: 30_000,
            download_jitter_ms: 0,
            user: None,
            client_id: None,
            include: Vec::new(),
            head_check_interval_ms: 60_000,
            read_timeout_ms: 30_000,
            boot_wait_ms: 30_000,
            display_names: std::collections::BTreeMap::new(),
            ca_cert: None,
            two_way: crate::twoway::TwoWayConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_toml_file(path: &Path) -> Result<Self, crate::ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::ClientError::io(format!("reading {}", path.display()), e))?;
        toml::from_str(&text)
            .map_err(|e| crate::ClientError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks what can be checked before starting.
    pub fn validate(&self) -> Result<(), crate::ClientError> {
        let bad = |m: String| Err(crate::ClientError::Config(m));
        if self.hubs.is_empty() {
            return bad("no hub URL (--hub)".into());
        }
        for h in &self.hubs {
            let u = url::Url::parse(h)
                .map_err(|e| crate::ClientError::Config(format!("hub {h:?}: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return bad(format!("hub {h:?}: use http:// or https://"));
            }
        }
        if self.spaces.is_empty() {
            return bad("no space (--space)".into());
        }
        for s in &self.spaces {
            synchub_protocol::validate_space(s)?;
        }
        if let Some(addr) = self.status_listen
            && !addr.ip().is_loopback()
        {
            return bad(format!("status_listen {addr} is not a loopback address"));
        }
        if self.keep_trees > MAX_KEEP_TREES {
            return bad(format!(
                "keep_trees {} is over {MAX_KEEP_TREES}",
                self.keep_trees
            ));
        }
        if self.parallel_downloads == 0 {
            return bad("parallel_downloads must be at least 1".into());
        }
        crate::selection::Selection::new(&self.include)?;
        self.two_way.validate()?;
        if self.two_way.enabled && !self.include.is_empty() {
            return bad("--two-way keeps the whole space in the folder: drop --include".into());
        }
        Ok(())
    }

    /// The folder holding one space's `current` link and `.synchub/`.
    pub fn space_dir(&self, space: &str) -> PathBuf {
        if self.spaces.len() <= 1 {
            self.dir.clone()
        } else {
            self.dir.join(space)
        }
    }
}

/// Shows the token as its first 4 characters and a mask.
pub(crate) fn mask_secret(s: &str) -> String {
    if s.is_empty() {
        return "(none)".into();
    }
    let head: String = s.chars().take(4).collect();
    format!("{head}****")
}

impl fmt::Display for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.clone();
        shown.token = mask_secret(&self.token);
        match toml::to_string(&shown) {
            Ok(t) => f.write_str(t.trim_end()),
            Err(_) => write!(f, "{shown:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_display_masks_token() {
        let cfg: AgentConfig = toml::from_str(
            r#"
            hubs = ["http://127.0.0.1:1"]
            token = "secret-token-value"
            spaces = ["qr"]
            dir = "/tmp/x"
            extra_files = "keep"
            on_failure = "unblock_stale"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.extra_files, ExtraFiles::Keep);
        assert_eq!(cfg.on_failure, OnFailure::UnblockStale);
        assert_eq!(cfg.fallback_interval_ms, 1000);
        cfg.validate().unwrap();
        let shown = cfg.to_string();
        assert!(!shown.contains("secret-token-value"), "{shown}");
        assert!(shown.contains("secr****"));
    }

    #[test]
    fn example_config_parses() {
        let cfg: AgentConfig =
            toml::from_str(include_str!("../../deploy/agent.example.toml")).unwrap();
        assert_eq!(cfg.hubs.len(), 2);
        cfg.validate().unwrap();
    }

    #[test]
    fn rejects_non_loopback_listen_and_unknown_keys() {
        let mut cfg = AgentConfig {
            hubs: vec!["http://h".into()],
            ..Default::default()
        };
        cfg.status_listen = Some("0.0.0.0:7071".parse().unwrap());
        assert!(cfg.validate().is_err());
        assert!(toml::from_str::<AgentConfig>("nope = 1").is_err());
    }
}
