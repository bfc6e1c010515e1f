//! Backups of a hub: `synchub backup --to DIR|s3://bucket/prefix`, the `[backup]` schedule
//! inside the hub, and `synchub restore` (in [`restore`]).
//!
//! A backup is the database read at one consistent point (see `store/backup.rs`), written as
//! JSON lines to `data/<id>.jsonl`, plus every blob the backed-up versions name (their
//! manifests and the manifests' files), content-addressed under `blobs/`: a blob already in
//! the target is not copied again, and every copied blob is hashed as it is written. The index
//! `backups/<id>.json` is written last; only a backup with an index is listed or restored, so
//! one that failed half-way is invisible and the previous ones stay as they were. Pruning
//! deletes the oldest indexes beyond `keep`, their records, and then only the blobs that no
//! kept backup names.

pub mod restore;
pub mod target;

use crate::blobs::{BlobError, BlobStore};
use crate::domain::Domain;
use crate::state::AppState;
use crate::store::{Record, RecordsError, StoreError};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::Sha256Hex;
use target::{DATA_FOLDER, INDEX_FOLDER, Target, TargetSpec};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The version of the index format; listings skip (and restores refuse) another.
pub const INDEX_FORMAT: u32 = 1;

/// Blobs copied at once (an object store's round trips overlap).
const COPIES_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Records(#[from] RecordsError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// A blob that could not be copied (read, written, or its bytes do not match its hash).
    #[error("blob {hash} could not be copied: {source}")]
    Copy { hash: Sha256Hex, source: BlobError },
    #[error("backup storage: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("backup file: {0}")]
    Io(#[from] std::io::Error),
    /// A version's manifest cannot be read from the hub's blob store.
    #[error("{0}")]
    Manifest(String),
    /// Nothing to restore or list there, or no backup of that id.
    #[error("{0}")]
    NoBackup(String),
    /// A backup file that does not read back as written (or in a format this hub lacks).
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    /// A restore into a hub that holds data.
    #[error("{0}")]
    NotEmpty(String),
    #[error("{0}")]
    Config(String),
}

/// `[backup]`: where and how often the hub backs itself up, and how many backups it keeps.
/// `Debug` masks the secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// A folder or `s3://bucket/prefix`: where scheduled backups go, and the default of
    /// `synchub backup --to` and `synchub restore --from`.
    pub to: Option<String>,
    /// Time between scheduled backups, e.g. "30m", "1h", "2s"; unset: no schedule.
    #[serde(with = "humane_duration")]
    pub every: Option<Duration>,
    /// Complete backups a scheduled run keeps (older ones are pruned after it).
    pub keep: u32,
    /// For an `s3://` place: endpoint URL (non-AWS services); default the S3 blob store's.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Default the S3 blob store's, else `SYNCHUB_BACKUP_ACCESS_KEY_ID` / `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// Default the S3 blob store's, else `SYNCHUB_BACKUP_SECRET_ACCESS_KEY` /
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    pub path_style: Option<bool>,
    /// Allows a plain `http://` endpoint (local test servers only).
    pub allow_http: Option<bool>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            to: None,
            every: None,
            keep: 48,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            path_style: None,
            allow_http: None,
        }
    }
}

impl std::fmt::Debug for BackupConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupConfig")
            .field("to", &self.to)
            .field("every", &self.every)
            .field("keep", &self.keep)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .finish_non_exhaustive()
    }
}

impl BackupConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(to) = &self.to {
            TargetSpec::parse(to).map_err(|e| format!("backup to: {e}"))?;
        }
        if let Some(every) = self.every {
            if self.to.is_none() {
                return Err(
                    "backup every is set but backup to is not: say where backups go".into(),
                );
            }
            if every < Duration::from_secs(1) {
                return Err("backup every must be at least 1s".into());
            }
        }
        if self.keep == 0 {
            return Err("backup keep must be at least 1".into());
        }
        Ok(())
    }

    /// This configuration with the secret masked, for the start-up log.
    pub fn masked(&self) -> BackupConfig {
        BackupConfig {
            secret_access_key: self.secret_access_key.as_ref().map(|_| "***".into()),
            ..self.clone()
        }
    }
}

/// `every = "30m"`: humane durations through humantime, both ways.
mod humane_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"30m\", \"1h 30m\", \"2s\""
            ))
        })
    }
}

/// A blob a backup holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobRef {
    pub sha256: Sha256Hex,
    pub size: u64,
}

/// A space's head in a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceHead {
    pub space: String,
    pub version: i64,
    pub data_hash: Option<String>,
}

/// A file of the backup with what it must read back as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Relative to the backup place, `/`-separated.
    pub path: String,
    pub sha256: Sha256Hex,
    pub bytes: u64,
}

/// `backups/<id>.json`: one complete backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupIndex {
    pub format: u32,
    pub id: String,
    /// When the database was read.
    pub taken_at: String,
    pub finished_at: String,
    /// The database backend it was read from.
    pub backend: String,
    pub records: FileRef,
    pub spaces: Vec<SpaceHead>,
    /// Version records, over every space.
    pub versions: u64,
    pub blob_count: u64,
    pub blob_bytes: u64,
    /// Every blob the backed-up versions name, by hash.
    pub blobs: Vec<BlobRef>,
}

/// A complete backup as `synchub backup --list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct BackupSummary {
    pub id: String,
    pub taken_at: String,
    pub spaces: Vec<SpaceHead>,
    pub versions: u64,
    pub blob_count: u64,
    pub blob_bytes: u64,
}

impl From<&BackupIndex> for BackupSummary {
    fn from(i: &BackupIndex) -> Self {
        BackupSummary {
            id: i.id.clone(),
            taken_at: i.taken_at.clone(),
            spaces: i.spaces.clone(),
            versions: i.versions,
            blob_count: i.blob_count,
            blob_bytes: i.blob_bytes,
        }
    }
}

/// How far a backup's (or a restore's) blob copying is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    pub blobs_total: u64,
    pub copied: u64,
    pub copied_bytes: u64,
    pub skipped: u64,
    pub skipped_bytes: u64,
}

/// Told of the progress after every blob.
pub type ProgressFn<'a> = dyn Fn(&Progress) + Send + Sync + 'a;

/// What `synchub backup` did.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    pub id: String,
    pub target: String,
    pub taken_at: String,
    pub spaces: Vec<SpaceHead>,
    pub versions: u64,
    pub blob_count: u64,
    pub blob_bytes: u64,
    /// Blobs written to the target by this backup.
    pub copied: u64,
    pub copied_bytes: u64,
    /// Blobs the target held already.
    pub skipped: u64,
    pub skipped_bytes: u64,
    pub records: FileRef,
    /// With a `keep`: what pruning removed.
    pub pruned: Option<PruneReport>,
}

/// What pruning removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub backups: Vec<String>,
    pub blobs: u64,
    pub bytes: u64,
}

/// A new backup's id: its start time, which sorts in time order.
fn new_id() -> String {
    Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

fn index_path(id: &str) -> String {
    format!("{INDEX_FOLDER}/{id}.json")
}

/// The local records file being written, hashed and counted as it goes.
struct RecordsFile {
    out: std::io::BufWriter<std::fs::File>,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl RecordsFile {
    fn line(&mut self, record: &Record) -> std::io::Result<()> {
        use sha2::Digest;
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.hasher.update(&line);
        self.bytes += line.len() as u64;
        self.out.write_all(&line)
    }
}

/// Makes one backup of `domain` into `target`; with `keep`, prunes to that many afterwards.
pub async fn run(
    domain: &Domain,
    target: &Target,
    keep: Option<u32>,
    progress: &ProgressFn<'_>,
) -> Result<BackupReport, BackupError> {
    let id = new_id();
    let staged = target.staging_file()?;
    let mut file = RecordsFile {
        out: std::io::BufWriter::new(staged.reopen()?),
        hasher: <sha2::Sha256 as sha2::Digest>::new(),
        bytes: 0,
    };
    let (mut taken_at, mut spaces, mut versions) = (String::new(), Vec::new(), Vec::new());
    domain
        .store
        .export(&mut |record: Record| {
            match &record {
                Record::Header { taken_at: at, .. } => taken_at = at.clone(),
                Record::Space {
                    space,
                    version,
                    data_hash,
                    ..
                } => spaces.push(SpaceHead {
                    space: space.clone(),
                    version: *version,
                    data_hash: data_hash.clone(),
                }),
                Record::Version {
                    space,
                    version,
                    data_hash,
                    ..
                } => versions.push((space.clone(), *version, data_hash.clone())),
                _ => {}
            }
            file.line(&record)
        })
        .await?;
    file.out.flush()?;
    file.out.get_ref().sync_all()?;
    let records = FileRef {
        path: format!("{DATA_FOLDER}/{id}.jsonl"),
        sha256: Sha256Hex::from_digest(sha2::Digest::finalize(file.hasher).into()),
        bytes: file.bytes,
    };

    let blobs = named_blobs(domain, &versions).await?;
    let counts =
        copy_blobs_between(domain.blobs.clone(), target.blobs.clone(), &blobs, progress).await?;
    target.put_file(&records.path, staged).await?;
    let index = BackupIndex {
        format: INDEX_FORMAT,
        id: id.clone(),
        taken_at: taken_at.clone(),
        finished_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        backend: domain.store.backend().to_owned(),
        records: records.clone(),
        spaces: spaces.clone(),
        versions: versions.len() as u64,
        blob_count: blobs.len() as u64,
        blob_bytes: blobs.iter().map(|b| b.size).sum(),
        blobs,
    };
    let bytes = serde_json::to_vec_pretty(&index).map_err(std::io::Error::other)?;
    // The index last: from here on the backup is listed.
    target.put_bytes(&index_path(&id), bytes.into()).await?;
    let pruned = match keep {
        Some(keep) => Some(prune(target, keep).await?),
        None => None,
    };
    Ok(BackupReport {
        id,
        target: target.shown.clone(),
        taken_at,
        spaces,
        versions: index.versions,
        blob_count: index.blob_count,
        blob_bytes: index.blob_bytes,
        copied: counts.copied,
        copied_bytes: counts.copied_bytes,
        skipped: counts.skipped,
        skipped_bytes: counts.skipped_bytes,
        records,
        pruned,
    })
}

/// Every blob the versions name: each distinct manifest and its files, sorted by hash.
async fn named_blobs(
    domain: &Domain,
    versions: &[(String, i64, String)],
) -> Result<Vec<BlobRef>, BackupError> {
    let mut blobs: BTreeMap<Sha256Hex, u64> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (space, version, data_hash) in versions {
        if !seen.insert(data_hash.clone()) {
            continue;
        }
        let hash: Sha256Hex = data_hash.parse().map_err(|e| {
            BackupError::Manifest(format!("{space} version {version} has data hash {e}"))
        })?;
        let unreadable = |e: String| {
            BackupError::Manifest(format!(
                "the manifest of {space} version {version} cannot be read ({e}); run `synchub \
                 fsck`"
            ))
        };
        let manifest = domain
            .manifest(&hash)
            .await
            .map_err(|e| unreadable(e.to_string()))?;
        for entry in manifest.entries() {
            blobs.insert(entry.sha256.clone(), entry.size);
        }
        let size = domain
            .blobs
            .size(&hash)
            .await?
            .ok_or_else(|| unreadable("its blob is missing".into()))?;
        blobs.insert(hash, size);
    }
    Ok(blobs
        .into_iter()
        .map(|(sha256, size)| BlobRef { sha256, size })
        .collect())
}

/// Copies the blobs `to` lacks from `from`, each verified as it is written; the ones it holds
/// are skipped. Used by backups (hub to target) and restores (target to hub).
pub(crate) async fn copy_blobs_between(
    from: Arc<dyn BlobStore>,
    to: Arc<dyn BlobStore>,
    blobs: &[BlobRef],
    progress: &ProgressFn<'_>,
) -> Result<Progress, BackupError> {
    let present: HashSet<Sha256Hex> = to.list().await?.into_iter().collect();
    let mut done = Progress {
        blobs_total: blobs.len() as u64,
        ..Progress::default()
    };
    let mut wanted = Vec::new();
    for blob in blobs {
        if present.contains(&blob.sha256) {
            done.skipped += 1;
            done.skipped_bytes += blob.size;
        } else {
            wanted.push(blob.clone());
        }
    }
    progress(&done);
    let mut copies = futures::stream::iter(wanted)
        .map(|blob| {
            let (from, to) = (from.clone(), to.clone());
            async move {
                let copied = async {
                    let read = from.get(&blob.sha256, None).await?;
                    // `put` hashes the bytes and stores them only if they match the address.
                    to.put(&blob.sha256, read.stream, read.size).await
                };
                copied.await.map_err(|source| BackupError::Copy {
                    hash: blob.sha256.clone(),
                    source,
                })
            }
        })
        .buffer_unordered(COPIES_IN_FLIGHT);
    while let Some(copied) = copies.next().await {
        done.copied += 1;
        done.copied_bytes += copied?;
        progress(&done);
    }
    Ok(done)
}

/// The complete backups in `target`, newest first. An index that does not parse is skipped
/// with a warning (it cannot be restored either).
pub async fn list(target: &Target) -> Result<Vec<BackupIndex>, BackupError> {
    let mut ids: Vec<String> = target
        .list(INDEX_FOLDER)
        .await?
        .into_iter()
        .filter_map(|name| name.strip_suffix(".json").map(str::to_owned))
        .collect();
    ids.sort();
    ids.reverse();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match read_index(target, &id).await {
            Ok(index) => out.push(index),
            Err(e) => {
                tracing::warn!(backup = id, error = %e, "skipping an unreadable backup index")
            }
        }
    }
    Ok(out)
}

/// The index of backup `id`.
pub async fn read_index(target: &Target, id: &str) -> Result<BackupIndex, BackupError> {
    let bytes = target.get_bytes(&index_path(id)).await?;
    let index: BackupIndex = serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::Damaged(format!("index {id}: {e}")))?;
    if index.format != INDEX_FORMAT {
        return Err(BackupError::Damaged(format!(
            "index {id} is format {}; this hub reads format {INDEX_FORMAT}",
            index.format
        )));
    }
    if index.id != id {
        return Err(BackupError::Damaged(format!(
            "index {id} names itself {}",
            index.id
        )));
    }
    Ok(index)
}

/// Keeps the newest `keep` complete backups: deletes the older ones' indexes (first, so
/// they stop being listed), their records, records no index names that are older than the
/// oldest kept backup (left by failed runs), then every blob no kept backup names.
pub async fn prune(target: &Target, keep: u32) -> Result<PruneReport, BackupError> {
    let keep = usize::try_from(keep.max(1)).unwrap_or(usize::MAX);
    let complete = list(target).await?;
    let mut report = PruneReport::default();
    let (kept, old) = complete.split_at(complete.len().min(keep));
    for index in old {
        target.delete(&index_path(&index.id)).await?;
        target.delete(&index.records.path).await?;
        report.backups.push(index.id.clone());
    }
    if let Some(oldest_kept) = kept.last() {
        let named: HashSet<&str> = kept.iter().map(|i| i.records.path.as_str()).collect();
        for name in target.list(DATA_FOLDER).await? {
            let path = format!("{DATA_FOLDER}/{name}");
            let older = name
                .strip_suffix(".jsonl")
                .is_some_and(|id| id < oldest_kept.id.as_str());
            if older && !named.contains(path.as_str()) {
                target.delete(&path).await?;
            }
        }
    }
    let needed: BTreeSet<&Sha256Hex> = kept
        .iter()
        .flat_map(|i| i.blobs.iter().map(|b| &b.sha256))
        .collect();
    for blob in target.blobs.list_stored().await? {
        if !needed.contains(&blob.hash) && target.blobs.delete(&blob.hash).await? {
            report.blobs += 1;
            report.bytes += blob.size;
        }
    }
    Ok(report)
}

/// Runs a backup every `[backup] every` until `shutdown`, pruning to `keep` after each; a
/// failed or panicked run is logged, counted in `synchub_backup_failures_total`, alerted
/// (`[alerts]`) and leaves the earlier backups as they were; the next one comes on time.
/// `None` when there is no schedule.
pub fn spawn(state: AppState, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    let every = state.config.backup.every?;
    let to = state.config.backup.to.clone()?;
    let keep = state.config.backup.keep;
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            let run = {
                let (state, to) = (state.clone(), to.clone());
                tokio::spawn(async move { scheduled(&state, &to, keep).await })
            };
            let outcome = tokio::select! {
                outcome = run => outcome,
                _ = shutdown.cancelled() => return,
            };
            match outcome {
                Ok(Ok(report)) => {
                    metrics::gauge!("synchub_backup_last_success_timestamp_seconds")
                        .set(Utc::now().timestamp() as f64);
                    tracing::info!(
                        backup = report.id,
                        place = report.target,
                        copied = report.copied,
                        skipped = report.skipped,
                        bytes = report.copied_bytes,
                        pruned = report.pruned.map_or(0, |p| p.backups.len()),
                        "backup done"
                    );
                }
                Ok(Err(e)) => {
                    metrics::counter!("synchub_backup_failures_total").increment(1);
                    let why = synchub_protocol::error_chain(&e);
                    // Nobody listening (alerts off) is fine.
                    let _ = state
                        .backup_failures
                        .send(format!("backup to {to} failed: {why}"));
                    tracing::error!(
                        place = to,
                        error = why,
                        "backup failed; earlier backups are intact"
                    );
                }
                Err(e) => {
                    metrics::counter!("synchub_backup_failures_total").increment(1);
                    let _ = state
                        .backup_failures
                        .send(format!("backup to {to} panicked: {e}"));
                    tracing::error!(place = to, error = %e, "backup panicked; earlier backups are intact");
                }
            }
        }
    }))
}

async fn scheduled(state: &AppState, to: &str, keep: u32) -> Result<BackupReport, BackupError> {
    let spec = TargetSpec::parse(to).map_err(BackupError::Config)?;
    let target = Target::open(&spec, &state.config, true)?;
    run(state, &target, Some(keep), &|_| {}).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_takes_humane_durations_and_keep_defaults_to_48() {
        let c: BackupConfig = toml::from_str("to = \"/b\"\nevery = \"30m\"").unwrap();
        assert_eq!(c.every, Some(Duration::from_secs(1800)));
        assert_eq!(c.keep, 48);
        c.validate().unwrap();
        let c: BackupConfig = toml::from_str("to = \"/b\"\nevery = \"1h 30m\"").unwrap();
        assert_eq!(c.every, Some(Duration::from_secs(5400)));
        let back: BackupConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.every, c.every);
        let err = toml::from_str::<BackupConfig>("every = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("30m"), "{err}");
        let no_place: BackupConfig = toml::from_str("every = \"1m\"").unwrap();
        assert!(no_place.validate().is_err());
        let none: BackupConfig = toml::from_str("keep = 0").unwrap();
        assert!(none.validate().is_err());
    }

    #[test]
    fn ids_sort_in_time_order() {
        let a = new_id();
        std::thread::sleep(Duration::from_millis(5));
        let b = new_id();
        assert!(a < b, "{a} {b}");
        assert!(a.ends_with('Z') && !a.contains(':'), "{a}");
    }
}
