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
    /// How often every head and token is read again from the database, whatever the watcher
    /// reported: a lost notification or a failed read costs at most this long.
    pub reread_interval_ms: u64,
    /// How often the hub pings each WebSocket; a socket silent for three intervals is closed.
    pub ping_interval_ms: u64,
    /// After a non-forced bump, agents are asked to spread their downloads over this many
    /// microseconds per connected agent of the space (`spread_ms` in `sync_required`), so the
    /// fleet does not ask all at once. 0: no spread.
    pub download_spread_per_agent_us: u64,
    /// The longest spread agents are asked for. 0: no spread.
    pub download_spread_max_ms: u64,
    /// Name of this replica in `welcome` and logs; default the host name, the port and a random
    /// part (see [`crate::server::default_hub_id`]).
    pub hub_id: Option<String>,
    /// PEM certificate chain: with `tls_key`, the hub serves `https://` and `wss://` itself.
    /// Both files are read again on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (keep it readable by the hub's account only).
    pub tls_key: Option<PathBuf>,
    /// Serve `/metrics` without a token (a scraper on a private network); default: admin
    /// tokens only.
    pub metrics_public: bool,
    pub limits: Limits,
    /// `[[table_source]]`: spaces fed from PostgreSQL tables and queries (see `sources/`).
    pub table_source: Vec<TableSource>,
    /// `[[bucket_source]]`: spaces that mirror a folder of an existing bucket.
    pub bucket_source: Vec<BucketSource>,
    /// `[alerts]`: webhooks and email when PCs fail or fall behind, the database is lost, and
    /// a daily summary (see `alerts.rs`).
    pub alerts: crate::alerts::AlertsConfig,
    /// `[fleet]`: how agents are recorded for the dashboard (see `fleet.rs`).
    pub fleet: crate::fleet::FleetConfig,
    /// `[retention]`: versions each space keeps and `sync_log` history (see `gc.rs`).
    pub retention: crate::gc::RetentionConfig,
    /// `[gc]`: the garbage collector's schedule and safety margins.
    pub gc: crate::gc::GcConfig,
    /// `[backup]`: where backups go, how often the hub makes one and how many it keeps.
    pub backup: crate::backup::BackupConfig,
}

/// A space fed from tables of the hub's PostgreSQL database: each table (or named query) is
/// written as `tables/<name>.json`, and a new version is made when they change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSource {
    pub space: String,
    /// Table names, optionally `schema.table`; each needs a primary key (rows are sorted by it).
    #[serde(default)]
    pub tables: Vec<String>,
    /// `name = "SELECT ..."`: written as `tables/<name>.json` in the order the query gives
    /// (end it with ORDER BY); re-run on every bump and whenever a listed table changes.
    #[serde(default)]
    pub queries: std::collections::BTreeMap<String, String>,
    /// How long table changes are collected before one snapshot (a burst of statements makes
    /// one version).
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
}

fn default_debounce_ms() -> u64 {
    300
}

/// A space whose folder `into` follows an existing bucket folder (Supabase Storage, B2, ...):
/// listed on a timer and on every bump, copied incrementally (by ETag and size).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSource {
    pub space: String,
    /// `s3://bucket/prefix`.
    pub url: String,
    /// Folder of the space the objects land in, e.g. `arhiva/`; empty: the top.
    #[serde(default)]
    pub into: String,
    /// Endpoint URL for non-AWS services; `None` for AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Empty: `SYNCHUB_BUCKET_ACCESS_KEY_ID` (or `AWS_ACCESS_KEY_ID`) from the environment.
    #[serde(default)]
    pub access_key_id: String,
    #[serde(default)]
    pub secret_access_key: String,
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Allows a plain `http://` endpoint (local test servers only).
    #[serde(default)]
    pub allow_http: bool,
    /// Seconds between listings (besides the listing on every bump).
    #[serde(default = "default_interval_secs")]
    pub interval_secs: u64,
}

impl std::fmt::Debug for BucketSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketSource")
            .field("space", &self.space)
            .field("url", &self.url)
            .field("into", &self.into)
            .field("endpoint", &self.endpoint)
            .field("secret_access_key", &"***")
            .finish_non_exhaustive()
    }
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_interval_secs() -> u64 {
    60
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
    /// A connection that has not sent a whole request head within this long is closed (a
    /// silent socket, an idle keep-alive one, or headers sent a byte at a time).
    pub header_read_timeout_ms: u64,
    /// Connections from one address that have not made an authenticated request yet; more
    /// are closed at once. 0: no cap.
    pub max_unauthenticated_per_address: usize,
    /// Memory for canonical manifests served from memory (deltas get a quarter more).
    pub manifest_cache_bytes: u64,
    /// Memory for small blobs kept to serve packs from, once read or as uploaded (0: none).
    pub hot_blob_cache_bytes: u64,
    /// Largest blob kept there.
    pub hot_blob_max_bytes: u64,
    /// Manifest, pack and blob downloads served at once; more are answered 503 `busy` with
    /// `Retry-After` (see `admission.rs`). 0: no bound.
    pub max_concurrent_downloads: usize,
    /// Downloads that may wait for a slot when all are taken; more are answered 503 at once.
    pub max_queued_downloads: usize,
    /// How long a download waits for a slot before it is answered 503 (0: no queue).
    pub download_queue_ms: u64,
    /// Sync reports waiting to be written; more are answered 503 `busy` with `Retry-After`
    /// (the agent's outbox sends them again).
    pub max_queued_reports: usize,
    /// WebSockets one token may hold open at once (on this replica); one more is refused with
    /// 429. A token per PC needs one; 0: no cap.
    pub max_sockets_per_token: usize,
    /// A request body that sends nothing for this long is cut off with 408 (a body sent a
    /// byte now and then to hold a connection and a task).
    pub body_idle_timeout_ms: u64,
    /// A connection whose client takes nothing of what the hub sends for this long is closed
    /// (a download it stopped reading, a socket that never drains), so it gives back its
    /// download slot instead of holding it until TCP gives up.
    pub send_idle_timeout_ms: u64,
    /// Blob bytes one token may upload per hour (on this replica); past it uploads get 429
    /// until the hour is over. 0: no quota.
    pub upload_bytes_per_token_per_hour: u64,
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
            header_read_timeout_ms: 10_000,
            max_unauthenticated_per_address: 256,
            manifest_cache_bytes: 64 << 20,
            hot_blob_cache_bytes: 64 << 20,
            hot_blob_max_bytes: 64 << 10,
            max_concurrent_downloads: 64,
            max_queued_downloads: 10_000,
            download_queue_ms: 2_000,
            max_queued_reports: 10_000,
            max_sockets_per_token: 4,
            body_idle_timeout_ms: 30_000,
            send_idle_timeout_ms: 30_000,
            upload_bytes_per_token_per_hour: 50 << 30,
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
            reread_interval_ms: 30_000,
            ping_interval_ms: 15_000,
            download_spread_per_agent_us: 200,
            download_spread_max_ms: 5_000,
            hub_id: None,
            tls_cert: None,
            tls_key: None,
            metrics_public: false,
            limits: Limits::default(),
            table_source: Vec::new(),
            bucket_source: Vec::new(),
            alerts: crate::alerts::AlertsConfig::default(),
            fleet: crate::fleet::FleetConfig::default(),
            retention: crate::gc::RetentionConfig::default(),
            gc: crate::gc::GcConfig::default(),
            backup: crate::backup::BackupConfig::default(),
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
        for b in &mut self.bucket_source {
            if b.access_key_id.is_empty()
                && let Some(v) =
                    var("SYNCHUB_BUCKET_ACCESS_KEY_ID").or_else(|| var("AWS_ACCESS_KEY_ID"))
            {
                b.access_key_id = v;
            }
            if b.secret_access_key.is_empty()
                && let Some(v) =
                    var("SYNCHUB_BUCKET_SECRET_ACCESS_KEY").or_else(|| var("AWS_SECRET_ACCESS_KEY"))
            {
                b.secret_access_key = v;
            }
        }
        self.alerts.apply_env();
        if self.backup.access_key_id.is_none() {
            self.backup.access_key_id = var("SYNCHUB_BACKUP_ACCESS_KEY_ID");
        }
        if self.backup.secret_access_key.is_none() {
            self.backup.secret_access_key = var("SYNCHUB_BACKUP_SECRET_ACCESS_KEY");
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

    /// The certificate and key files when TLS is configured.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }

    /// Checks values that cannot work, before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together: set both (https) or neither (http)".into(),
            ));
        }
        for space in &self.spaces {
            synchub_protocol::validate_space(space)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if self.poll_interval_ms == 0 || self.ping_interval_ms == 0 || self.reread_interval_ms == 0
        {
            return Err(ConfigError::Invalid(
                "poll_interval_ms, reread_interval_ms and ping_interval_ms must be above 0".into(),
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
        self.validate_sources()?;
        self.alerts.validate()?;
        self.fleet.validate()?;
        self.retention.validate().map_err(ConfigError::Invalid)?;
        self.gc.validate().map_err(ConfigError::Invalid)?;
        self.backup.validate().map_err(ConfigError::Invalid)?;
        if self.limits.send_idle_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "limits.send_idle_timeout_ms must be above 0".into(),
            ));
        }
        if self.limits.header_read_timeout_ms == 0 || self.limits.body_idle_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "limits.header_read_timeout_ms and limits.body_idle_timeout_ms must be above 0"
                    .into(),
            ));
        }
        if self.limits.download_queue_ms > 30_000 {
            return Err(ConfigError::Invalid(
                "limits.download_queue_ms is at most 30000: an agent's request would time out \
                 waiting in the queue"
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

    /// Sources name configured spaces, valid tables, file names and bucket URLs; table sources
    /// need the PostgreSQL database that holds the tables.
    fn validate_sources(&self) -> Result<(), ConfigError> {
        let url = self.database_url();
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let mut fed = std::collections::HashSet::new();
        for t in &self.table_source {
            if !fed.insert(t.space.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two table_source entries for space {:?}",
                    t.space
                )));
            }
            self.validate_table_source(t, postgres)?;
        }
        for b in &self.bucket_source {
            self.validate_bucket_source(b, postgres)?;
        }
        Ok(())
    }

    /// One `[[table_source]]` entry (duplicates are checked by the caller).
    fn validate_table_source(&self, t: &TableSource, postgres: bool) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.spaces.contains(&t.space) {
            return invalid(format!(
                "table_source space {:?} is not in spaces {:?}",
                t.space, self.spaces
            ));
        }
        if !postgres {
            return invalid(format!(
                "table_source for {:?} reads tables of the hub's PostgreSQL database: set \
                 database_url to postgres://...",
                t.space
            ));
        }
        if t.tables.is_empty() && t.queries.is_empty() {
            return invalid(format!("table_source for {:?} names no tables", t.space));
        }
        for table in &t.tables {
            crate::sources::tables::check_table_name(table).map_err(ConfigError::Invalid)?;
        }
        for (name, query) in &t.queries {
            crate::sources::tables::check_file_name(name).map_err(ConfigError::Invalid)?;
            if query.trim().is_empty() {
                return invalid(format!("table_source query {name:?} is empty"));
            }
        }
        if t.debounce_ms > 60_000 {
            return invalid("table_source debounce_ms is at most 60000".into());
        }
        Ok(())
    }

    /// One `[[bucket_source]]` entry.
    fn validate_bucket_source(&self, b: &BucketSource, postgres: bool) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.spaces.contains(&b.space) {
            return invalid(format!(
                "bucket_source space {:?} is not in spaces {:?}",
                b.space, self.spaces
            ));
        }
        if !postgres {
            return invalid(format!(
                "bucket_source for {:?} needs a PostgreSQL database_url (it follows bumps \
                 through LISTEN); `synchub import` copies a bucket into any hub",
                b.space
            ));
        }
        crate::sources::bucket::BucketUrl::parse(&b.url).map_err(ConfigError::Invalid)?;
        crate::sources::bucket::check_into(&b.into).map_err(ConfigError::Invalid)?;
        if b.interval_secs == 0 {
            return invalid("bucket_source interval_secs must be above 0".into());
        }
        if b.access_key_id.is_empty() || b.secret_access_key.is_empty() {
            return invalid(format!(
                "bucket_source {} needs access_key_id and secret_access_key (in the file, \
                 or SYNCHUB_BUCKET_ACCESS_KEY_ID / SYNCHUB_BUCKET_SECRET_ACCESS_KEY)",
                b.url
            ));
        }
        Ok(())
    }

    /// Spaces fed by a table or bucket source.
    pub fn fed_spaces(&self) -> Vec<String> {
        let mut spaces: Vec<String> = (self.table_source.iter().map(|t| t.space.clone()))
            .chain(self.bucket_source.iter().map(|b| b.space.clone()))
            .collect();
        spaces.sort();
        spaces.dedup();
        spaces
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
        for b in &mut shown.bucket_source {
            b.secret_access_key = "***".into();
        }
        shown.alerts = self.alerts.masked();
        shown.backup = self.backup.masked();
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
    fn sources_take_the_documented_shape_and_are_checked() {
        let text = r#"
database_url = "postgres://hub@db/scores"
[[table_source]]
space = "global_version"
tables = ["cities", "institutions", "employees"]
queries = { active = "SELECT id FROM employees ORDER BY id" }
[[bucket_source]]
space = "global_version"
url = "s3://scores/arhiva"
into = "arhiva/"
access_key_id = "a"
secret_access_key = "s"
"#;
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.table_source[0].tables.len(), 3);
        assert_eq!(c.fed_spaces(), ["global_version"]);
        assert!(!c.masked().contains("secret_access_key = \"s\""));
        let mut sqlite = c.clone();
        sqlite.database_url = None;
        let err = sqlite.validate().unwrap_err().to_string();
        assert!(err.contains("PostgreSQL"), "{err}");
        let mut other = c.clone();
        other.table_source[0].space = "nope".into();
        assert!(other.validate().is_err(), "a source of a space not served");
        let mut bad = c;
        bad.table_source[0].tables.push("x; drop table y".into());
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
