//! Where backups live: a local folder or `s3://bucket/prefix`, with the same layout in both.
//!
//! - `blobs/`: content-addressed blobs, through the blob store of that kind (a folder: the
//!   filesystem store's `blobs/ab/cd/<sha256>`; a bucket: `blobs/<sha256>`), so every blob is
//!   hashed as it is written and never visible half-written;
//! - `data/<id>.jsonl`: a backup's database records;
//! - `backups/<id>.json`: a backup's index, written last (a folder: a temporary file renamed
//!   into place; a bucket: one PUT), so a backup is listed only once everything it names is
//!   there.
//!
//! S3 targets take their connection (endpoint, region, keys, path style) from `[backup]`,
//! falling back to the S3 blob store's settings and then the environment.

use super::BackupError;
use crate::blobs::s3::{PART_SIZE, PARTS_IN_FLIGHT, S3BlobStore, S3Config};
use crate::blobs::{BlobStore, fs::FsBlobStore};
use crate::config::{BlobStoreConfig, Config};
use crate::sources::bucket::BucketUrl;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// Folder of the indexes.
pub const INDEX_FOLDER: &str = "backups";
/// Folder of the records files.
pub const DATA_FOLDER: &str = "data";
/// Largest index or records file read into memory at once (an index names every blob).
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// A backup place as named on the command line or in `[backup] to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    Dir(PathBuf),
    S3(BucketUrl),
}

impl TargetSpec {
    /// `s3://bucket/prefix`, or a folder path.
    pub fn parse(text: &str) -> Result<TargetSpec, String> {
        if text.trim().is_empty() {
            return Err("the backup place is empty: give a folder or s3://bucket/prefix".into());
        }
        if text.starts_with("s3://") {
            return BucketUrl::parse(text).map(TargetSpec::S3);
        }
        if text.contains("://") {
            return Err(format!(
                "backup place {text:?}: only folders and s3://bucket/prefix are supported"
            ));
        }
        Ok(TargetSpec::Dir(PathBuf::from(text)))
    }
}

enum Place {
    Dir(PathBuf),
    S3 {
        store: Arc<AmazonS3>,
        prefix: ObjectPath,
    },
}

/// An opened backup place: its files and its blobs.
pub struct Target {
    place: Place,
    pub blobs: Arc<dyn BlobStore>,
    /// For messages: the folder or `s3://bucket/prefix`.
    pub shown: String,
}

impl Target {
    /// Opens `spec`; with `create`, a folder is created when missing (a backup), otherwise
    /// it must exist (a listing, a restore).
    pub fn open(spec: &TargetSpec, config: &Config, create: bool) -> Result<Target, BackupError> {
        match spec {
            TargetSpec::Dir(root) => {
                if create {
                    for folder in [INDEX_FOLDER, DATA_FOLDER, "blobs"] {
                        std::fs::create_dir_all(root.join(folder))?;
                    }
                } else if !root.join(INDEX_FOLDER).is_dir() {
                    return Err(BackupError::NoBackup(format!(
                        "{} holds no backups (no {INDEX_FOLDER}/ folder)",
                        root.display()
                    )));
                }
                let blobs: Arc<dyn BlobStore> = if create {
                    Arc::new(FsBlobStore::new(root.join("blobs"))?)
                } else {
                    Arc::new(FsBlobStore::open_existing(root.join("blobs"))?)
                };
                Ok(Target {
                    place: Place::Dir(root.clone()),
                    blobs,
                    shown: root.display().to_string(),
                })
            }
            TargetSpec::S3(url) => {
                let mut s3 = s3_config(config, &url.bucket);
                let prefix = ObjectPath::parse(&url.prefix).map_err(object_store::Error::from)?;
                s3.prefix = prefix.clone().join("blobs").to_string();
                Ok(Target {
                    place: Place::S3 {
                        store: Arc::new(crate::blobs::s3::client(&s3)?),
                        prefix,
                    },
                    blobs: Arc::new(S3BlobStore::new(&s3)?),
                    shown: format!("s3://{}/{}", url.bucket, url.prefix),
                })
            }
        }
    }

    fn dir_path(root: &Path, rel: &str) -> PathBuf {
        rel.split('/')
            .fold(root.to_path_buf(), |p, part| p.join(part))
    }

    fn object_path(prefix: &ObjectPath, rel: &str) -> ObjectPath {
        rel.split('/')
            .fold(prefix.clone(), |p, part| p.join(part.to_owned()))
    }

    /// A local file to write a records file into before [`Target::put_file`]: in the target's
    /// own folder when it is one (so putting it is a rename), else in the system's temp.
    pub fn staging_file(&self) -> Result<tempfile::NamedTempFile, BackupError> {
        Ok(match &self.place {
            Place::Dir(root) => tempfile::Builder::new()
                .prefix(".partial-")
                .tempfile_in(root.join(DATA_FOLDER))?,
            Place::S3 { .. } => tempfile::NamedTempFile::new()?,
        })
    }

    /// Puts a local file at `rel`, whole or not at all.
    pub async fn put_file(
        &self,
        rel: &str,
        file: tempfile::NamedTempFile,
    ) -> Result<(), BackupError> {
        match &self.place {
            Place::Dir(root) => {
                let dest = Self::dir_path(root, rel);
                tokio::task::spawn_blocking(move || persist(file, &dest))
                    .await
                    .map_err(std::io::Error::other)??;
            }
            Place::S3 { store, prefix } => {
                let upload = store.put_multipart(&Self::object_path(prefix, rel)).await?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                let mut reader = tokio::fs::File::open(file.path()).await?;
                let mut chunk = vec![0u8; 1 << 20];
                let sent: Result<(), BackupError> = async {
                    loop {
                        let n = reader.read(&mut chunk).await?;
                        if n == 0 {
                            return Ok(());
                        }
                        writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                        writer.write(&chunk[..n]);
                    }
                }
                .await;
                match sent {
                    Ok(()) => {
                        writer.finish().await?;
                    }
                    Err(e) => {
                        if let Err(abort) = writer.abort().await {
                            tracing::warn!(error = %abort, "could not abort a backup upload");
                        }
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Puts `bytes` at `rel`, whole or not at all.
    pub async fn put_bytes(&self, rel: &str, bytes: Bytes) -> Result<(), BackupError> {
        match &self.place {
            Place::Dir(root) => {
                let dest = Self::dir_path(root, rel);
                let folder = dest
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.clone());
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    use std::io::Write;
                    let mut file = tempfile::Builder::new()
                        .prefix(".partial-")
                        .tempfile_in(&folder)?;
                    file.write_all(&bytes)?;
                    persist(file, &dest)
                })
                .await
                .map_err(std::io::Error::other)??;
            }
            Place::S3 { store, prefix } => {
                store
                    .put(&Self::object_path(prefix, rel), PutPayload::from(bytes))
                    .await?;
            }
        }
        Ok(())
    }

    /// The file at `rel` (at most 256 MiB).
    pub async fn get_bytes(&self, rel: &str) -> Result<Bytes, BackupError> {
        let too_large = || BackupError::Damaged(format!("{rel} is larger than 256 MiB"));
        match &self.place {
            Place::Dir(root) => {
                let path = Self::dir_path(root, rel);
                if tokio::fs::metadata(&path).await?.len() > MAX_INDEX_BYTES {
                    return Err(too_large());
                }
                Ok(Bytes::from(tokio::fs::read(path).await?))
            }
            Place::S3 { store, prefix } => {
                let got = store.get(&Self::object_path(prefix, rel)).await?;
                if got.meta.size > MAX_INDEX_BYTES {
                    return Err(too_large());
                }
                Ok(got.bytes().await?)
            }
        }
    }

    /// Copies the file at `rel` into the local file `dest`.
    pub async fn fetch_to(&self, rel: &str, dest: &Path) -> Result<(), BackupError> {
        match &self.place {
            Place::Dir(root) => {
                tokio::fs::copy(Self::dir_path(root, rel), dest).await?;
            }
            Place::S3 { store, prefix } => {
                use tokio::io::AsyncWriteExt;
                let mut stream = store
                    .get(&Self::object_path(prefix, rel))
                    .await?
                    .into_stream();
                let mut out = tokio::fs::File::create(dest).await?;
                while let Some(chunk) = stream.try_next().await? {
                    out.write_all(&chunk).await?;
                }
                out.flush().await?;
            }
        }
        Ok(())
    }

    /// Names of the files directly in `folder` (not temporary ones).
    pub async fn list(&self, folder: &str) -> Result<Vec<String>, BackupError> {
        let mut names = Vec::new();
        match &self.place {
            Place::Dir(root) => {
                let mut entries = match tokio::fs::read_dir(Self::dir_path(root, folder)).await {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                    Err(e) => return Err(e.into()),
                };
                while let Some(entry) = entries.next_entry().await? {
                    if entry.file_type().await?.is_file()
                        && let Ok(name) = entry.file_name().into_string()
                    {
                        names.push(name);
                    }
                }
            }
            Place::S3 { store, prefix } => {
                let folder = Self::object_path(prefix, folder);
                let listed = store.list_with_delimiter(Some(&folder)).await?;
                names.extend(
                    listed
                        .objects
                        .iter()
                        .filter_map(|meta| meta.location.filename().map(str::to_owned)),
                );
            }
        }
        names.retain(|n| !n.starts_with(".partial-"));
        Ok(names)
    }

    /// Deletes the file at `rel` (nothing when it is not there).
    pub async fn delete(&self, rel: &str) -> Result<(), BackupError> {
        match &self.place {
            Place::Dir(root) => match tokio::fs::remove_file(Self::dir_path(root, rel)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            },
            Place::S3 { store, prefix } => {
                match store.delete(&Self::object_path(prefix, rel)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

/// Syncs `file`, renames it to `dest` and syncs the folder, so `dest` is whole or absent
/// even after a power cut.
fn persist(file: tempfile::NamedTempFile, dest: &Path) -> std::io::Result<()> {
    file.as_file().sync_all()?;
    file.persist(dest).map_err(|e| e.error)?;
    if let Some(folder) = dest.parent() {
        std::fs::File::open(folder)?.sync_all()?;
    }
    Ok(())
}

/// The S3 connection for a backup bucket: `[backup]`'s own settings, else the S3 blob
/// store's, else the environment (`SYNCHUB_BACKUP_ACCESS_KEY_ID`, `AWS_ACCESS_KEY_ID`, ...).
pub fn s3_config(config: &Config, bucket: &str) -> S3Config {
    let b = &config.backup;
    let base = match &config.blob_store {
        BlobStoreConfig::S3(s3) => Some(s3),
        BlobStoreConfig::Fs { .. } => None,
    };
    let env = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
    };
    S3Config {
        endpoint: b
            .endpoint
            .clone()
            .or_else(|| base.and_then(|s| s.endpoint.clone())),
        region: b
            .region
            .clone()
            .or_else(|| base.map(|s| s.region.clone()))
            .unwrap_or_else(|| "us-east-1".to_owned()),
        bucket: bucket.to_owned(),
        prefix: String::new(),
        access_key_id: b
            .access_key_id
            .clone()
            .or_else(|| base.map(|s| s.access_key_id.clone()))
            .or_else(|| env(["SYNCHUB_BACKUP_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"]))
            .unwrap_or_default(),
        secret_access_key: b
            .secret_access_key
            .clone()
            .or_else(|| base.map(|s| s.secret_access_key.clone()))
            .or_else(|| env(["SYNCHUB_BACKUP_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"]))
            .unwrap_or_default(),
        path_style: b.path_style.or(base.map(|s| s.path_style)).unwrap_or(true),
        allow_http: b.allow_http.or(base.map(|s| s.allow_http)).unwrap_or(false),
        presign_ttl_secs: 300,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_parse_as_folders_or_buckets() {
        assert_eq!(
            TargetSpec::parse("/srv/backups").unwrap(),
            TargetSpec::Dir("/srv/backups".into())
        );
        match TargetSpec::parse("s3://b/hub/backups/").unwrap() {
            TargetSpec::S3(url) => {
                assert_eq!((url.bucket, url.prefix), ("b".into(), "hub/backups".into()))
            }
            other => panic!("{other:?}"),
        }
        assert!(TargetSpec::parse("").is_err());
        assert!(TargetSpec::parse("gs://b/x").is_err());
        assert!(TargetSpec::parse("s3://").is_err());
    }
}
