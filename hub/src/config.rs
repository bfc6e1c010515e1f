//! The hub's configuration: one struct filled from defaults, a TOML file, environment variables
//! and command-line flags (in that order, later wins), printed at start-up with secrets masked.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use synchub_protocol::DEFAULT_SPACE;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Folder for the SQLite database and the filesystem blob store.
    pub data_dir: PathBuf,
    /// Address the HTTP and WebSocket server listens on.
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://...`; default `sqlite://<data_dir>/hub.db`.
    pub database_url: Option<String>,
    /// Spaces created at start when missing.
    pub spaces: Vec<String>,
    /// Where blob bytes live.
    pub blob_store: BlobStoreConfig,
    /// With an S3 blob store: answer blob downloads with a redirect to a short-lived presigned
    /// URL, so the bytes go from the object store to the agent directly.
    pub presign_downloads: bool,
    /// SQLite only: how often the version rows are read to notice bumps made by other programs.
    pub poll_interval_ms: u64,
    /// How often the hub pings each WebSocket; a socket silent for three intervals is closed.
    pub ping_interval_ms: u64,
    /// Name of this replica in `welcome` and logs; default the host name and port.
    pub hub_id: Option<String>,
    pub limits: Limits,
}

/// Where blob bytes live: `kind = "fs"` (default, under the data folder) or `kind = "s3"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BlobStoreConfig {
    Fs {
        /// Default `<data_dir>/blobs`.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    S3(crate::blobs::s3::S3Config),
}

impl Default for BlobStoreConfig {
    fn default() -> Self {
        BlobStoreConfig::Fs { path: None }
    }
}

/// Sizes the hub refuses to go beyond, each answered with 413 `too_large` (or, on the
/// WebSocket, an `error` frame and close code 1009).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_blob_bytes: u64,
    pub max_manifest_entries: usize,
    /// Largest JSON request body (commits, reports, blob lists).
    pub max_request_bytes: usize,
    /// Largest WebSocket message an agent may send.
    pub max_frame_bytes: usize,
    /// WebSocket read and write buffer per connection: small keeps idle sockets cheap (the
    /// read buffer is allocated and touched up front; it grows for a larger frame). 1 KiB
    /// instead of 4 KiB saves 3 KiB of hub memory per idle agent (BENCHMARKS.md).
    pub ws_buffer_bytes: usize,
    pub max_pack_blobs: usize,
    pub max_pack_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_blob_bytes: 8 << 30,
            max_manifest_entries: 1_000_000,
            max_request_bytes: 64 << 20,
            max_frame_bytes: 64 << 10,
            ws_buffer_bytes: 1 << 10,
            max_pack_blobs: 10_000,
            max_pack_bytes: 256 << 20,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: "127.0.0.1:7070".parse().expect("valid default address"),
            database_url: None,
            spaces: vec![DEFAULT_SPACE.to_owned()],
            blob_store: BlobStoreConfig::default(),
            presign_downloads: false,
            poll_interval_ms: 250,
            ping_interval_ms: 15_000,
            hub_id: None,
            limits: Limits::default(),
        }
    }
}

/// The hub's data folder when none is configured. Not the agent's default folder name
/// (`synchub-data`), so an agent started in the hub's folder cannot mix its files in.
pub const DEFAULT_DATA_DIR: &str = "./synchub-hub-data";

/// S3's limit for one CopyObject, which moves a verified upload under its content address.
pub const S3_MAX_COPY_BYTES: u64 = 5 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid value {value:?} in environment variable {var}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// A default configuration rooted at `data_dir`.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }

    /// Defaults, then the TOML file at `path` when given.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Applies `SYNCHUB_*` environment variables over the current values.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        fn var(name: &'static str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        }
        if let Some(v) = var("SYNCHUB_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = var("SYNCHUB_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                    var: "SYNCHUB_LISTEN",
                    value: v.clone(),
                    reason: e.to_string(),
                })?;
        }
        if let Some(v) = var("SYNCHUB_DATABASE_URL") {
            self.database_url = Some(v);
        }
        if let BlobStoreConfig::S3(s3) = &mut self.blob_store {
            if let Some(v) = var("SYNCHUB_S3_ACCESS_KEY_ID").or_else(|| var("AWS_ACCESS_KEY_ID")) {
                s3.access_key_id = v;
            }
            if let Some(v) =
                var("SYNCHUB_S3_SECRET_ACCESS_KEY").or_else(|| var("AWS_SECRET_ACCESS_KEY"))
            {
                s3.secret_access_key = v;
            }
        }
        Ok(())
    }

    /// Checks values that cannot work, before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for space in &self.spaces {
            synchub_protocol::validate_space(space)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if self.poll_interval_ms == 0 || self.ping_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "poll_interval_ms and ping_interval_ms must be above 0".into(),
            ));
        }
        if let BlobStoreConfig::S3(s3) = &self.blob_store
            && (s3.access_key_id.is_empty() || s3.secret_access_key.is_empty())
        {
            return Err(ConfigError::Invalid(
                "the S3 blob store needs access_key_id and secret_access_key (in the file, or \
                 SYNCHUB_S3_ACCESS_KEY_ID / SYNCHUB_S3_SECRET_ACCESS_KEY in the environment)"
                    .into(),
            ));
        }
        if self.limits.ws_buffer_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.ws_buffer_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
    }

    /// The largest blob accepted: `limits.max_blob_bytes`, and never above 5 GiB on S3, where a
    /// verified upload is copied into place with one CopyObject (limited to 5 GiB).
    pub fn max_blob_bytes(&self) -> u64 {
        match &self.blob_store {
            BlobStoreConfig::S3(_) => self.limits.max_blob_bytes.min(S3_MAX_COPY_BYTES),
            BlobStoreConfig::Fs { .. } => self.limits.max_blob_bytes,
        }
    }

    /// How long a presigned blob URL stays valid.
    pub fn presign_ttl(&self) -> std::time::Duration {
        match &self.blob_store {
            BlobStoreConfig::S3(s3) => s3.presign_ttl(),
            BlobStoreConfig::Fs { .. } => std::time::Duration::from_secs(300),
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("hub.db").display()))
    }

    /// The SQLite file the database URL names; `None` for PostgreSQL.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let url = self.database_url();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return None;
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(&url);
        let path = path.split('?').next().unwrap_or(path);
        (!path.is_empty() && !path.starts_with(":memory:")).then(|| PathBuf::from(path))
    }

    /// The configuration as TOML with secrets masked, for the start-up log; the database URL
    /// is shown even when it is the default one under the data folder.
    pub fn masked(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = Some(mask_url_password(&self.database_url()));
        if let BlobStoreConfig::S3(s3) = &mut shown.blob_store {
            s3.secret_access_key = "***".into();
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("(unprintable config: {e})"))
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url_password("postgres://hub:s3cret@db:5432/x"),
            "postgres://hub:***@db:5432/x"
        );
        assert_eq!(mask_url_password("sqlite://a/b"), "sqlite://a/b");
        let c = Config {
            database_url: Some("postgres://u:pw@h/d".into()),
            ..Config::default()
        };
        assert!(!c.masked().contains("pw@"));
    }

    #[test]
    fn printout_shows_the_default_database_url() {
        let shown = Config::for_data_dir("/srv/hub").masked();
        assert!(
            shown.contains("database_url = \"sqlite:///srv/hub/hub.db\""),
            "{shown}"
        );
    }

    #[test]
    fn sqlite_paths_from_urls() {
        let mut c = Config::for_data_dir("/d");
        assert_eq!(c.sqlite_path(), Some(PathBuf::from("/d/hub.db")));
        c.database_url = Some("sqlite:rel/x.db?mode=rwc".into());
        assert_eq!(c.sqlite_path(), Some(PathBuf::from("rel/x.db")));
        c.database_url = Some("postgres://u@h/d".into());
        assert_eq!(c.sqlite_path(), None);
    }

    #[test]
    fn s3_caps_the_blob_size_at_what_one_copy_can_move() {
        let mut c = Config::default();
        assert_eq!(c.max_blob_bytes(), 8 << 30);
        c.blob_store = toml::from_str("kind = \"s3\"\nbucket = \"b\"").unwrap();
        assert_eq!(c.max_blob_bytes(), S3_MAX_COPY_BYTES);
        c.limits.max_blob_bytes = 1000;
        assert_eq!(c.max_blob_bytes(), 1000);
    }

    #[test]
    fn example_config_parses() {
        let c: Config = toml::from_str(include_str!("../../deploy/hub.example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.ws_buffer_bytes, Limits::default().ws_buffer_bytes);
    }

    #[test]
    fn parses_toml_and_rejects_unknown_keys() {
        let c: Config = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nspaces = [\"a\", \"b\"]\n[limits]\nmax_frame_bytes = 1000\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_frame_bytes, 1000);
        assert_eq!(c.limits.max_pack_blobs, Limits::default().max_pack_blobs);
        assert!(toml::from_str::<Config>("lisen = \"x\"").is_err());
        let bad = Config {
            spaces: vec!["../x".into()],
            ..Config::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn s3_keys_may_come_from_the_environment_but_must_be_set() {
        let mut c: Config = toml::from_str(
            "[blob_store]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"https://s3.example\"\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("SYNCHUB_S3_ACCESS_KEY_ID"), "{err}");
        if let BlobStoreConfig::S3(s3) = &mut c.blob_store {
            s3.access_key_id = "a".into();
            s3.secret_access_key = "s".into();
        }
        c.validate().unwrap();
    }
}
