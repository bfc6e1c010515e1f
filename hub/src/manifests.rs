//! Manifests served like blobs: their canonical bytes (and the deltas between two of them) are
//! immutable, so they are kept in memory once loaded and every request after the first is a
//! copy of a reference-counted buffer.
//!
//! Each cache loads an entry once however many requests ask for it at the same moment (the
//! others wait for that one load), is bounded in bytes or entries, and evicts the least used.
//! Hashing, parsing and diffing run on the blocking pool, not on the async workers. Which data
//! hash a version has comes from the in-memory heads for the current version and from a small
//! cache otherwise, so a herd of agents asking for the new version makes no database query.

use crate::blobs::{self, BlobStore};
use crate::error::HubError;
use bytes::Bytes;
use moka::future::Cache;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use synchub_protocol::{Manifest, ManifestDelta, Sha256Hex, codes};

/// Parsed manifests kept (they are large in memory; the commit path needs only the newest few).
const PARSED_ENTRIES: u64 = 8;
/// Version-to-data-hash entries kept (a few hundred bytes each).
const VERSION_ENTRIES: u64 = 10_000;

pub struct Manifests {
    max_entries: usize,
    canonical: Cache<Sha256Hex, Bytes>,
    parsed: Cache<Sha256Hex, Arc<Manifest>>,
    blob_sets: Cache<Sha256Hex, Arc<HashMap<Sha256Hex, u64>>>,
    deltas: Cache<(Sha256Hex, Sha256Hex), Bytes>,
    versions: Cache<(String, u64), Sha256Hex>,
    loads: AtomicU64,
}

/// Weight of a cached buffer in bytes, as moka wants it.
fn weight<K>(_: &K, bytes: &Bytes) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

impl Manifests {
    /// Caches holding at most `cache_bytes` of canonical manifests (and a quarter of that of
    /// deltas), for manifests of at most `max_entries` entries.
    pub fn new(cache_bytes: u64, max_entries: usize) -> Self {
        Manifests {
            max_entries,
            canonical: Cache::builder()
                .max_capacity(cache_bytes)
                .weigher(weight)
                .build(),
            parsed: Cache::new(PARSED_ENTRIES),
            blob_sets: Cache::new(PARSED_ENTRIES),
            deltas: Cache::builder()
                .max_capacity(cache_bytes / 4)
                .weigher(weight)
                .build(),
            versions: Cache::new(VERSION_ENTRIES),
            loads: AtomicU64::new(0),
        }
    }

    /// How many times canonical bytes were read from the blob store (not served from memory).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// The canonical bytes whose sha256 is `data_hash`, read from `store` once.
    pub async fn canonical(
        &self,
        store: &Arc<dyn BlobStore>,
        data_hash: &Sha256Hex,
    ) -> Result<Bytes, HubError> {
        if data_hash == &Sha256Hex::empty() {
            return Ok(Bytes::new());
        }
        // A canonical line is at most a hash, a size and a path of bounded length.
        let limit = (self.max_entries as u64) * 1400 + 1;
        self.canonical
            .try_get_with_by_ref(data_hash, async {
                self.loads.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("synchub_manifest_loads_total").increment(1);
                Ok::<_, HubError>(blobs::get_bytes(store.as_ref(), data_hash, limit).await?)
            })
            .await
            .map_err(unshare)
    }

    /// The parsed manifest of `data_hash` (parsed on the blocking pool, once).
    pub async fn parsed(
        &self,
        store: &Arc<dyn BlobStore>,
        data_hash: &Sha256Hex,
    ) -> Result<Arc<Manifest>, HubError> {
        self.parsed
            .try_get_with_by_ref(data_hash, async {
                let bytes = self.canonical(store, data_hash).await?;
                let (max, hash) = (self.max_entries, data_hash.clone());
                blocking(move || {
                    Manifest::from_canonical(&bytes, max)
                        .map(Arc::new)
                        .map_err(|e| {
                            HubError::bad_request(
                                codes::INVALID_MANIFEST,
                                format!("stored manifest {hash} is unreadable: {e}"),
                            )
                        })
                })
                .await
            })
            .await
            .map_err(unshare)
    }

    /// Every blob the manifest `data_hash` names, and the manifest itself, with their sizes:
    /// which blobs a reader of that version may fetch and how large they are, answered from
    /// memory (built once, on the blocking pool).
    pub async fn blob_set(
        &self,
        store: &Arc<dyn BlobStore>,
        data_hash: &Sha256Hex,
    ) -> Result<Arc<HashMap<Sha256Hex, u64>>, HubError> {
        self.blob_sets
            .try_get_with_by_ref(data_hash, async {
                let manifest = self.parsed(store, data_hash).await?;
                let hash = data_hash.clone();
                let own_size = self.canonical(store, data_hash).await?.len() as u64;
                blocking(move || {
                    let mut set: HashMap<Sha256Hex, u64> = manifest
                        .entries()
                        .iter()
                        .map(|e| (e.sha256.clone(), e.size))
                        .collect();
                    set.insert(hash, own_size);
                    Ok(Arc::new(set))
                })
                .await
            })
            .await
            .map_err(unshare)
    }

    /// The encoded delta from the manifest `from` to the manifest `to`, computed once.
    pub async fn delta(
        &self,
        store: &Arc<dyn BlobStore>,
        from: &Sha256Hex,
        to: &Sha256Hex,
    ) -> Result<Bytes, HubError> {
        self.deltas
            .try_get_with((from.clone(), to.clone()), async {
                let (old, new) =
                    tokio::try_join!(self.parsed(store, from), self.parsed(store, to))?;
                blocking(move || Ok(Bytes::from(ManifestDelta::between(&old, &new).encode()))).await
            })
            .await
            .map_err(unshare)
    }

    /// The data hash of `version` of `space`, read by `read` on a miss (a database query).
    pub async fn version_hash<F>(
        &self,
        space: &str,
        version: u64,
        read: F,
    ) -> Result<Sha256Hex, HubError>
    where
        F: Future<Output = Result<Option<Sha256Hex>, HubError>>,
    {
        self.versions
            .try_get_with((space.to_owned(), version), async {
                read.await?.ok_or_else(|| {
                    HubError::NotFound(format!("version {version} of space {space:?}"))
                })
            })
            .await
            .map_err(unshare)
    }

    /// Forgets which data hash each version has: after a restore or failover the database may
    /// number versions differently from what this hub read before.
    pub fn forget_versions(&self) {
        self.versions.invalidate_all();
    }
}

/// Runs CPU-heavy work (hashing, parsing, diffing) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, HubError> + Send + 'static,
) -> Result<T, HubError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| HubError::Unavailable(format!("manifest work failed: {e}")))?
}

/// A load's error as every request that waited for it sees it: the same status and message.
fn unshare(e: Arc<HubError>) -> HubError {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(e) => match &*e {
            HubError::NotFound(m) => HubError::NotFound(m.clone()),
            HubError::TooLarge(m) => HubError::TooLarge(m.clone()),
            HubError::BadRequest { code, message } => HubError::bad_request(code, message.clone()),
            HubError::Unavailable(m) => HubError::Unavailable(m.clone()),
            // A damaged stored manifest stays what it is (500 `corrupt_data`, "run fsck"),
            // not a 503 that tells the caller to come back.
            HubError::Blob(blobs::BlobError::Corrupt { hash, actual }) => {
                HubError::Blob(blobs::BlobError::Corrupt {
                    hash: hash.clone(),
                    actual: actual.clone(),
                })
            }
            other => HubError::Unavailable(other.to_string()),
        },
    }
}
