//! `synchub restore --from DIR|s3://... [--backup ID]`: rebuilds an empty hub from a complete
//! backup (the newest by default).
//!
//! The hub must be empty: a database with any space, version, token, held change, `sync_log`
//! or audit row is refused, and so is a blob store holding a blob the backup does not name
//! (blobs it names may be there: left by an interrupted restore, which can simply be run
//! again). The records file is checked against the hash its index gives before anything is
//! written; every blob is hashed as it is copied into the hub's blob store; then the records
//! go into the database in one transaction. Heads come back with their version numbers and
//! data hashes, so an agent that held a version before finds the same one and downloads
//! nothing.

use super::target::{Target, TargetSpec};
use super::{BackupError, BackupIndex, Progress, ProgressFn, SpaceHead, copy_blobs_between};
use crate::blobs::{BlobStore, fs::FsBlobStore, s3::S3BlobStore};
use crate::config::{BlobStoreConfig, Config};
use crate::store::{self, Record, Store};
use serde::Serialize;
use std::collections::HashSet;
use std::io::BufRead;
use std::sync::Arc;
use synchub_protocol::Sha256Hex;

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub backup: String,
    pub taken_at: String,
    pub spaces: Vec<SpaceHead>,
    pub versions: u64,
    pub records: u64,
    pub blobs: Progress,
}

/// Restores backup `id` (the newest complete one when `None`) from `from` into the empty hub
/// `config` names.
pub async fn restore(
    config: &Config,
    from: &str,
    id: Option<&str>,
    progress: &ProgressFn<'_>,
) -> Result<RestoreReport, BackupError> {
    let spec = TargetSpec::parse(from).map_err(BackupError::Config)?;
    let target = Target::open(&spec, config, false)?;
    let index = match id {
        Some(id) => super::read_index(&target, id).await.map_err(|e| match e {
            BackupError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
                BackupError::NoBackup(format!("{} holds no complete backup {id}", target.shown))
            }
            BackupError::ObjectStore(object_store::Error::NotFound { .. }) => {
                BackupError::NoBackup(format!("{} holds no complete backup {id}", target.shown))
            }
            e => e,
        })?,
        None => super::list(&target)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                BackupError::NoBackup(format!("{} holds no complete backup", target.shown))
            })?,
    };
    let records = fetch_records(&target, &index).await?;

    if let Some(path) = config.sqlite_path()
        && let Some(folder) = path.parent()
    {
        std::fs::create_dir_all(folder)?;
    }
    let store = store::open(&config.database_url()).await?;
    refuse_occupied_database(store.as_ref(), config).await?;
    let blobs = open_blob_store(config, &index).await?;
    let copied = copy_blobs_between(target.blobs.clone(), blobs, &index.blobs, progress).await?;

    let reader = std::io::BufReader::new(std::fs::File::open(records.path())?);
    let mut lines = reader.lines().map(|line| {
        let line = line?;
        serde_json::from_str::<Record>(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    });
    let written = store.import(&mut lines).await?;
    Ok(RestoreReport {
        backup: index.id.clone(),
        taken_at: index.taken_at.clone(),
        spaces: index.spaces.clone(),
        versions: index.versions,
        records: written,
        blobs: copied,
    })
}

/// The backup's records file, copied to a local temporary file and checked against the size
/// and hash its index gives.
async fn fetch_records(
    target: &Target,
    index: &BackupIndex,
) -> Result<tempfile::NamedTempFile, BackupError> {
    let local = tempfile::NamedTempFile::new()?;
    target.fetch_to(&index.records.path, local.path()).await?;
    let path = local.path().to_path_buf();
    let (actual, bytes) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let bytes = std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
        Ok((Sha256Hex::from_digest(hasher.finalize().into()), bytes))
    })
    .await
    .map_err(std::io::Error::other)??;
    if actual != index.records.sha256 || bytes != index.records.bytes {
        return Err(BackupError::Damaged(format!(
            "{} reads back as {bytes} bytes hashing to {actual}; the index says {} bytes \
             hashing to {}",
            index.records.path, index.records.bytes, index.records.sha256
        )));
    }
    Ok(local)
}

/// Refuses a database that holds any row a restore would write, saying what is there.
async fn refuse_occupied_database(store: &dyn Store, config: &Config) -> Result<(), BackupError> {
    let occupied = store.occupied_tables().await?;
    if occupied.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = occupied
        .iter()
        .map(|(table, rows)| format!("{table}: {rows} row(s)"))
        .collect();
    Err(BackupError::NotEmpty(format!(
        "the hub's database ({}) is not empty ({}); restore only into an empty hub: a new \
         data folder, or an empty database and blob store",
        crate::config::mask_url_password(&config.database_url()),
        what.join(", ")
    )))
}

/// The hub's blob store, refused when it holds a blob `index` does not name.
async fn open_blob_store(
    config: &Config,
    index: &BackupIndex,
) -> Result<Arc<dyn BlobStore>, BackupError> {
    let (blobs, shown): (Arc<dyn BlobStore>, String) = match &config.blob_store {
        BlobStoreConfig::Fs { path } => {
            let root = path
                .clone()
                .unwrap_or_else(|| config.data_dir.join("blobs"));
            let shown = root.display().to_string();
            (Arc::new(FsBlobStore::new(root)?), shown)
        }
        BlobStoreConfig::S3(s3) => (Arc::new(S3BlobStore::new(s3)?), s3.to_string()),
    };
    let named: HashSet<&Sha256Hex> = index.blobs.iter().map(|b| &b.sha256).collect();
    let foreign: Vec<Sha256Hex> = blobs
        .list()
        .await?
        .into_iter()
        .filter(|h| !named.contains(h))
        .collect();
    if let Some(first) = foreign.first() {
        return Err(BackupError::NotEmpty(format!(
            "the hub's blob store ({shown}) holds {} blob(s) backup {} does not name (first \
             {first}); restore only into an empty blob store",
            foreign.len(),
            index.id
        )));
    }
    Ok(blobs)
}
