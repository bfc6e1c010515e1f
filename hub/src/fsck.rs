//! `synchub fsck`: re-hashes every stored blob (manifests are blobs too), moves aside the ones
//! whose bytes no longer hash to their name, and checks that every version's manifest is
//! stored, readable and names only blobs the store holds intact.
//!
//! The hub checks what it reads whole (manifests) on every load and agents check every file
//! they download, so corruption never spreads; this finds it before anyone trips on it, and
//! says which versions are hurt. Nothing is deleted: a corrupt blob goes to `quarantine/`
//! beside the blobs, where a re-upload of the right bytes (`synchub-agent publish
//! --reupload`) cannot collide with it.

use crate::blobs::{BlobError, BlobStore};
use crate::store::{Store, StoreError};
use futures::TryStreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use synchub_protocol::{Manifest, Sha256Hex};

#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
}

/// What `fsck` found (and did).
#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Blobs whose bytes do not hash to their name.
    pub corrupt: Vec<CorruptBlob>,
    pub manifests_checked: u64,
    /// Versions whose manifest, or a file named in it, is missing or corrupt.
    pub damaged_versions: Vec<DamagedVersion>,
}

#[derive(Debug, Serialize)]
pub struct CorruptBlob {
    pub sha256: Sha256Hex,
    /// What its bytes hash to now.
    pub actual: Sha256Hex,
    /// Where it was moved to (with `--quarantine`).
    pub quarantined_to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DamagedVersion {
    pub space: String,
    pub version: u64,
    pub problem: String,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.damaged_versions.is_empty()
    }
}

/// Most versions per space whose manifests are checked (newest first).
const MAX_VERSIONS: u32 = 100_000;

/// Checks every blob and every version's manifest; with `quarantine`, moves corrupt blobs
/// aside.
pub async fn fsck(
    store: &dyn Store,
    blobs: &dyn BlobStore,
    quarantine: bool,
) -> Result<FsckReport, FsckError> {
    let mut report = FsckReport::default();
    let mut intact = HashSet::new();
    for hash in blobs.list().await? {
        let read = match blobs.get(&hash, None).await {
            Ok(read) => read,
            // Removed since the listing (another fsck, an operator): not ours to judge.
            Err(BlobError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let size = read.size;
        let actual = content_hash(read).await?;
        report.blobs_checked += 1;
        report.bytes_checked += size;
        if actual == hash {
            intact.insert(hash);
            continue;
        }
        let quarantined_to = if quarantine {
            let to = blobs.quarantine(&hash).await?;
            tracing::warn!(sha256 = %hash, %actual, to, "corrupt blob moved aside");
            Some(to)
        } else {
            tracing::warn!(sha256 = %hash, %actual, "corrupt blob");
            None
        };
        report.corrupt.push(CorruptBlob {
            sha256: hash,
            actual,
            quarantined_to,
        });
    }

    let mut checked: HashSet<Sha256Hex> = HashSet::new();
    let mut damaged_manifests: std::collections::HashMap<Sha256Hex, String> = Default::default();
    for head in store.heads().await? {
        for info in store.versions(&head.space, MAX_VERSIONS).await? {
            let data_hash = info.head.data_hash.clone();
            if checked.insert(data_hash.clone()) {
                report.manifests_checked += 1;
                if let Some(problem) = check_manifest(blobs, &intact, &data_hash).await? {
                    damaged_manifests.insert(data_hash.clone(), problem);
                }
            }
            if let Some(problem) = damaged_manifests.get(&data_hash) {
                report.damaged_versions.push(DamagedVersion {
                    space: info.head.space.clone(),
                    version: info.head.version,
                    problem: problem.clone(),
                });
            }
        }
    }
    Ok(report)
}

/// The SHA-256 of what a blob read really holds.
async fn content_hash(read: crate::blobs::BlobRead) -> Result<Sha256Hex, BlobError> {
    let mut hasher = Sha256::new();
    let mut stream = read.stream;
    while let Some(chunk) = stream.try_next().await.map_err(BlobError::Io)? {
        hasher.update(&chunk);
    }
    Ok(Sha256Hex::from_digest(hasher.finalize().into()))
}

/// Why the manifest `data_hash` cannot be used, if it cannot.
async fn check_manifest(
    blobs: &dyn BlobStore,
    intact: &HashSet<Sha256Hex>,
    data_hash: &Sha256Hex,
) -> Result<Option<String>, FsckError> {
    if *data_hash == Sha256Hex::empty() {
        return Ok(None);
    }
    if !intact.contains(data_hash) {
        return Ok(Some(format!(
            "its manifest {data_hash} is missing or corrupt"
        )));
    }
    let bytes = match crate::blobs::get_bytes(blobs, data_hash, u64::MAX).await {
        Ok(bytes) => bytes,
        Err(BlobError::NotFound(_) | BlobError::Corrupt { .. }) => {
            return Ok(Some(format!(
                "its manifest {data_hash} is missing or corrupt"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let manifest = match Manifest::from_canonical(&bytes, usize::MAX) {
        Ok(m) => m,
        Err(e) => return Ok(Some(format!("its manifest {data_hash} is unreadable: {e}"))),
    };
    let bad: Vec<&str> = manifest
        .entries()
        .iter()
        .filter(|e| !intact.contains(&e.sha256))
        .map(|e| e.path.as_str())
        .collect();
    Ok(match bad.as_slice() {
        [] => None,
        [first, ..] => Some(format!(
            "{} file(s) missing or corrupt in the blob store, first {first:?}",
            bad.len()
        )),
    })
}
