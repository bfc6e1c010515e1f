//! Sources: spaces whose content the hub reads from elsewhere instead of (or besides) agents'
//! publishes. `[[table_source]]` writes PostgreSQL tables as `tables/<name>.json`;
//! `[[bucket_source]]` mirrors a bucket folder into a folder of the space.
//!
//! One supervised task LISTENs for table triggers (debounced) and for `sync_metadata` bumps,
//! lists buckets on a timer, and refreshes a space by reading all its sources and making at
//! most one version: when the old app bumped the row itself, that bump is recorded with the
//! freshly read content (the store holds such bumps back for fed spaces); otherwise a changed
//! content becomes the next version like a commit. A table source owns `tables/`, a bucket
//! source its `into` folder: files there that the source no longer has are removed.

pub mod bucket;
pub mod tables;

use crate::blobs::{self, BlobError};
use crate::config::{BucketSource, TableSource};
use crate::domain::Domain;
use crate::error::HubError;
use crate::state::AppState;
use crate::store::{NewVersion, StoreError};
use crate::versions::Step;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use std::collections::BTreeMap;
use std::time::Duration;
use synchub_protocol::{Head, Manifest, ManifestEntry};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// NOTIFY channel of `sync_metadata` changes (installed by the store's migration).
const HEADS_CHANNEL: &str = "synchub_heads";
/// Name recorded as the author of versions made from sources.
pub const SOURCES_AUTHOR: &str = "sources";
/// Longest one refresh of a space may take (snapshot, bucket listing and copies).
const REFRESH_DEADLINE: Duration = Duration::from_secs(300);
/// How often a refresh is retried when the head moves under it.
const MAX_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("table {table}: {message}")]
    Table { table: String, message: String },
    #[error("bucket error: {0}")]
    Bucket(#[from] object_store::Error),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("the sources of {0} took longer than {1:?}")]
    Timeout(String, Duration),
}

/// Everything that feeds one space.
struct Feed {
    space: String,
    tables: Option<TableSource>,
    mirror: Option<(bucket::Mirror, Duration)>,
    /// When the next refresh is due; `None`: nothing pending.
    due: Option<Instant>,
    next_listing: Option<Instant>,
}

impl Feed {
    fn watches_table(&self, name: &str) -> bool {
        self.tables.as_ref().is_some_and(|t| {
            !t.queries.is_empty() || t.tables.iter().any(|x| tables::file_name(x) == name)
        })
    }

    fn schedule(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }
}

/// Starts the supervised sources task when the configuration names any source.
pub fn spawn(state: AppState, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    if state.config.fed_spaces().is_empty() {
        return None;
    }
    Some(tokio::spawn(supervise(state, shutdown)))
}

/// Runs the sources until shutdown; a failure (database gone, listener lost, a panic) is
/// logged and the task starts again after a pause, re-reading every source.
async fn supervise(state: AppState, shutdown: CancellationToken) {
    let mut pause = Duration::from_millis(500);
    loop {
        let run = tokio::spawn(run(state.clone(), shutdown.clone()));
        match run.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, retry_in = ?pause, "sources stopped; restarting")
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?pause, "sources task panicked; restarting")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

async fn run(state: AppState, shutdown: CancellationToken) -> Result<(), SourceError> {
    let config = &state.config;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&config.database_url())
        .await?;
    let mut feeds = feeds(config)?;
    for feed in &feeds {
        if let Some(t) = &feed.tables {
            tables::install_triggers(&pool, &t.tables).await?;
        }
    }
    let mut listener = PgListener::connect_with(&pool).await?;
    listener
        .listen_all([tables::TABLES_CHANNEL, HEADS_CHANNEL])
        .await?;
    tracing::info!(spaces = ?config.fed_spaces(), "sources listening");
    loop {
        let next = feeds
            .iter()
            .flat_map(|f| [f.due, f.next_listing])
            .flatten()
            .min();
        let wait = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            received = listener.try_recv() => {
                let Some(n) = received? else {
                    return Err(SourceError::Invalid("the LISTEN connection was lost".into()));
                };
                schedule_notified(&mut feeds, &n);
            }
            _ = wait => refresh_due(&state, &pool, &mut feeds).await,
        }
    }
}

/// Schedules the feeds a notification concerns: at once for a head change of its space,
/// after the debounce for a change in one of its tables.
fn schedule_notified(feeds: &mut [Feed], n: &sqlx::postgres::PgNotification) {
    let now = Instant::now();
    for feed in feeds {
        if n.channel() == HEADS_CHANNEL && n.payload() == feed.space {
            feed.schedule(now);
        } else if n.channel() == tables::TABLES_CHANNEL && feed.watches_table(n.payload()) {
            let debounce = feed.tables.as_ref().map_or(0, |t| t.debounce_ms);
            feed.schedule(now + Duration::from_millis(debounce));
        }
    }
}

/// Refreshes every feed that is due (a bucket listing falls due on its interval); a failed
/// refresh is scheduled again in 2 s.
async fn refresh_due(state: &AppState, pool: &PgPool, feeds: &mut [Feed]) {
    let now = Instant::now();
    for feed in feeds {
        if let Some((_, interval)) = &feed.mirror
            && feed.next_listing.is_none_or(|t| t <= now)
        {
            feed.next_listing = Some(now + *interval);
            feed.schedule(now);
        }
        if feed.due.is_some_and(|d| d <= now) {
            feed.due = None;
            let refreshed = tokio::time::timeout(REFRESH_DEADLINE, refresh(state, pool, feed))
                .await
                .unwrap_or_else(|_| {
                    Err(SourceError::Timeout(feed.space.clone(), REFRESH_DEADLINE))
                });
            if let Err(e) = refreshed {
                tracing::warn!(space = feed.space, error = %e, "could not read the sources; retrying in 2 s");
                feed.schedule(Instant::now() + Duration::from_secs(2));
            }
        }
    }
}

/// One feed per fed space, each due at once (the first refresh fills the space).
fn feeds(config: &crate::config::Config) -> Result<Vec<Feed>, SourceError> {
    let now = Instant::now();
    let mut feeds = Vec::new();
    for space in config.fed_spaces() {
        let tables = config
            .table_source
            .iter()
            .find(|t| t.space == space)
            .cloned();
        let mirror = match config.bucket_source.iter().find(|b| b.space == space) {
            Some(b) => Some((
                bucket::Mirror::new(b)?,
                Duration::from_secs(b.interval_secs),
            )),
            None => None,
        };
        feeds.push(Feed {
            space,
            tables,
            mirror,
            due: Some(now),
            next_listing: None,
        });
    }
    Ok(feeds)
}

/// The space's manifest with the folders its sources own replaced by what the sources hold now.
async fn read_sources(
    state: &AppState,
    pool: &PgPool,
    feed: &mut Feed,
    base: &Manifest,
) -> Result<Manifest, SourceError> {
    let mut owned = Vec::new();
    let mut files = BTreeMap::new();
    if let Some(t) = &feed.tables {
        owned.push("tables/".to_owned());
        files.extend(read_tables(state, pool, t).await?);
    }
    if let Some((mirror, _)) = &mut feed.mirror {
        owned.push(mirror.folder().to_owned());
        files.extend(
            mirror
                .sync(state.blobs.as_ref(), state.config.max_blob_bytes())
                .await?,
        );
    }
    let limit = state.config.limits.max_manifest_entries;
    replace_owned(base, &owned, files, limit)
}

/// Reads every source of the space and makes at most one version of what changed.
async fn refresh(state: &AppState, pool: &PgPool, feed: &mut Feed) -> Result<(), SourceError> {
    for _ in 0..MAX_ATTEMPTS {
        let head = state
            .store
            .head(&feed.space)
            .await?
            .ok_or_else(|| StoreError::NoSuchSpace(feed.space.clone()))?;
        // The app writes its data before it bumps the row: data read after seeing the row at
        // `read_at` holds every change up to that bump, and no later one.
        let read_at = row_version(pool, &feed.space).await?;
        let base = state
            .manifest(&head.data_hash)
            .await
            .map_err(|e| SourceError::Invalid(format!("reading the current manifest: {e}")))?;
        let next = read_sources(state, pool, feed, &base).await?;
        let content = NewVersion {
            data_hash: next.data_hash(),
            forced: false,
            reason: Some("read from its sources".into()),
            by: Some(SOURCES_AUTHOR.to_owned()),
            entries: next.len() as u64,
            bytes: next.total_size(),
        };
        blobs::put_bytes(state.blobs.as_ref(), next.canonical_bytes().into()).await?;
        // Like a commit: the blobs it names come off the collector's doomed list first.
        let spared_at = match crate::versions::spare_new_blobs(state, &base, &next).await {
            Ok(at) => at,
            Err(e) => {
                // A blob the mirror remembers may be gone: copy every object again next time.
                if let Some((mirror, _)) = &mut feed.mirror {
                    mirror.forget();
                }
                return Err(SourceError::Invalid(e.to_string()));
            }
        };
        let in_window = || {
            crate::gc::check_window(state, spared_at)
                .map_err(|e| SourceError::Invalid(e.to_string()))
        };
        in_window()?;
        match state
            .store
            .record_outside_bump(&feed.space, &content, read_at)
            .await
        {
            Ok(Some(h)) => {
                announce(state, h).await;
                return Ok(());
            }
            Ok(None) => {}
            // Bumped while the sources were read: what was read may predate that bump.
            Err(StoreError::HeadMoved { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
        if content.data_hash == head.data_hash {
            return Ok(());
        }
        in_window()?;
        match state
            .store
            .create_version(&feed.space, head.version, content)
            .await
        {
            Ok(h) => {
                announce(state, h).await;
                return Ok(());
            }
            Err(StoreError::HeadMoved { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SourceError::Invalid(format!(
        "the head of {} kept moving while its sources were read",
        feed.space
    )))
}

/// The version the app last wrote into `space`'s `sync_metadata` row (0 without a row).
async fn row_version(pool: &PgPool, space: &str) -> Result<u64, SourceError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version::BIGINT FROM sync_metadata WHERE sync_key = $1")
            .bind(space)
            .fetch_optional(pool)
            .await?;
    Ok(version.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
}

async fn announce(state: &AppState, head: Head) {
    tracing::info!(
        space = head.space,
        version = head.version,
        forced = head.forced,
        "new version from sources"
    );
    state.publish(head).await;
}

/// The tables and queries of one source as blobs, by path.
async fn read_tables(
    state: &AppState,
    pool: &PgPool,
    source: &TableSource,
) -> Result<BTreeMap<String, ManifestEntry>, SourceError> {
    let mut snapshot = tables::Snapshot::begin(pool).await?;
    let mut files = Vec::new();
    for table in &source.tables {
        files.push((
            tables::file_name(table).to_owned(),
            snapshot.table(table).await?,
        ));
    }
    for (name, sql) in &source.queries {
        files.push((name.clone(), snapshot.query(name, sql).await?));
    }
    snapshot.finish().await?;
    let mut out = BTreeMap::new();
    for (name, bytes) in files {
        let path = tables::path_of(&name);
        let size = bytes.len() as u64;
        if size > state.config.max_blob_bytes() {
            return Err(SourceError::Invalid(format!(
                "{path} would be {size} bytes, above the blob limit"
            )));
        }
        let sha256 = blobs::put_bytes(state.blobs.as_ref(), bytes.into()).await?;
        out.insert(path.clone(), ManifestEntry { path, size, sha256 });
    }
    Ok(out)
}

/// `base` with every file under the `owned` folders replaced by `files`.
fn replace_owned(
    base: &Manifest,
    owned: &[String],
    files: BTreeMap<String, ManifestEntry>,
    max_entries: usize,
) -> Result<Manifest, SourceError> {
    let deletes: Vec<String> = base
        .entries()
        .iter()
        .filter(|e| owned.iter().any(|o| e.path.starts_with(o.as_str())))
        .filter(|e| !files.contains_key(&e.path))
        .map(|e| e.path.clone())
        .collect();
    let puts: Vec<ManifestEntry> = files.into_values().collect();
    let next = base
        .with_changes(&puts, &deletes)
        .map_err(|e| SourceError::Invalid(e.to_string()))?;
    if next.len() > max_entries {
        return Err(SourceError::Invalid(format!(
            "the space would have {} entries; the limit is {max_entries}",
            next.len()
        )));
    }
    Ok(next)
}

/// `synchub import s3://bucket/prefix --space S [--into arhiva/]`; keys from
/// `SYNCHUB_BUCKET_ACCESS_KEY_ID` / `SYNCHUB_BUCKET_SECRET_ACCESS_KEY` (or `AWS_*`).
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The bucket folder, s3://bucket/prefix.
    pub url: String,
    #[arg(long, default_value = synchub_protocol::DEFAULT_SPACE)]
    pub space: String,
    /// Folder of the space the objects land in (ends with /).
    #[arg(long, default_value = "")]
    pub into: String,
    /// Endpoint URL of a non-AWS service (Supabase Storage, B2, ...).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// Virtual-hosted-style requests (bucket.endpoint) instead of path style.
    #[arg(long)]
    pub virtual_hosted: bool,
    /// Allow a plain http:// endpoint.
    #[arg(long)]
    pub allow_http: bool,
}

impl ImportArgs {
    /// The bucket as a source, keys from the environment.
    pub fn source(&self) -> Result<BucketSource, SourceError> {
        let var = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
                .unwrap_or_default()
        };
        synchub_protocol::validate_space(&self.space)
            .map_err(|e| SourceError::Invalid(e.to_string()))?;
        let source = BucketSource {
            space: self.space.clone(),
            url: self.url.clone(),
            into: self.into.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key_id: var(["SYNCHUB_BUCKET_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"]),
            secret_access_key: var(["SYNCHUB_BUCKET_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"]),
            path_style: !self.virtual_hosted,
            allow_http: self.allow_http,
            interval_secs: 60,
        };
        bucket::BucketUrl::parse(&source.url).map_err(SourceError::Invalid)?;
        bucket::check_into(&source.into).map_err(SourceError::Invalid)?;
        if source.access_key_id.is_empty() || source.secret_access_key.is_empty() {
            return Err(SourceError::Invalid(
                "set SYNCHUB_BUCKET_ACCESS_KEY_ID and SYNCHUB_BUCKET_SECRET_ACCESS_KEY (or \
                 AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) to the bucket's keys"
                    .into(),
            ));
        }
        Ok(source)
    }
}

/// `synchub import`: copies a bucket folder into `space` (under `source.into`) as one new
/// version; files of the space that the bucket lacks are kept. Returns the new head, or the
/// current one when nothing changed.
pub async fn import(state: &Domain, source: &BucketSource) -> Result<Head, SourceError> {
    let mut mirror = bucket::Mirror::new(source)?;
    let files = mirror
        .sync(state.blobs.as_ref(), state.config.max_blob_bytes())
        .await?;
    let count = files.len();
    let puts: Vec<ManifestEntry> = files.into_values().collect();
    let puts = &puts;
    let written = crate::versions::write_version(state, &source.space, |head| async move {
        let base = state.manifest(&head.data_hash).await?;
        let next = base.with_changes(puts, &[]).map_err(|e| {
            HubError::bad_request(synchub_protocol::codes::INVALID_MANIFEST, e.to_string())
        })?;
        if next.data_hash() == head.data_hash {
            return Ok(Step::Unchanged(head));
        }
        blobs::put_bytes(state.blobs.as_ref(), next.canonical_bytes().into()).await?;
        // Like a commit: the blobs it names come off the collector's doomed list first.
        let spared_at = crate::versions::spare_new_blobs(state, &base, &next).await?;
        crate::gc::check_window(state, spared_at)?;
        let new = NewVersion {
            data_hash: next.data_hash(),
            forced: false,
            reason: Some(format!("imported {count} file(s) from {}", source.url)),
            by: Some("import".to_owned()),
            entries: next.len() as u64,
            bytes: next.total_size(),
        };
        Ok(Step::Write { on: head, new })
    })
    .await
    .map_err(|e| SourceError::Invalid(e.to_string()))?;
    Ok(written.head().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::tests::entry;
    use synchub_protocol::Sha256Hex;

    #[test]
    fn sources_replace_only_their_folders() {
        let base = Manifest::new(vec![
            entry("tables/cities.json", b"old"),
            entry("tables/gone.json", b"x"),
            entry("arhiva/Cluj/a.json", b"a"),
            entry("qr/1.png", b"png"),
        ])
        .unwrap();
        let files: BTreeMap<_, _> = [entry("tables/cities.json", b"new")]
            .into_iter()
            .map(|e| (e.path.clone(), e))
            .collect();
        let next = replace_owned(&base, &["tables/".into()], files, 100).unwrap();
        let paths: Vec<_> = next.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["arhiva/Cluj/a.json", "qr/1.png", "tables/cities.json"]
        );
        assert_eq!(next.entries()[2].sha256, Sha256Hex::of(b"new"));
    }
}
