//! What the hub's operations work on, without HTTP: the configuration, the store, the blob
//! store, the in-memory heads and a small cache of parsed manifests.
//!
//! [`crate::versions`] and [`crate::reports`] are written over a [`Domain`]; the HTTP handlers
//! and the socket task reach it through [`crate::state::AppState`] (which derefs to it), and the
//! command line builds one on an existing hub's data ([`Domain::open_existing`]), so every caller
//! runs the same code.

use crate::blobs::{self, BlobStore};
use crate::broadcast::{Heads, Snapshot};
use crate::config::Config;
use crate::error::HubError;
use crate::store::{self, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use synchub_protocol::{Head, Manifest, Sha256Hex, codes};

/// Parsed manifests kept in memory; they are immutable, so this only bounds memory.
const MANIFEST_CACHE: usize = 8;

pub struct Domain {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub heads: Heads,
    manifests: Mutex<HashMap<Sha256Hex, Arc<Manifest>>>,
}

impl Domain {
    pub fn new(config: Config, store: Arc<dyn Store>, blobs: Arc<dyn BlobStore>) -> Self {
        Domain {
            config,
            store,
            blobs,
            heads: Heads::default(),
            manifests: Mutex::new(HashMap::new()),
        }
    }

    /// A domain over an existing hub's data, for command-line tools running beside the hub
    /// (see [`crate::server::open_existing_parts`]), with every head loaded.
    pub async fn open_existing(config: Config) -> Result<Self, crate::server::StartError> {
        let (store, blobs) = crate::server::open_existing_parts(&config).await?;
        let domain = Domain::new(config, store, blobs);
        for head in domain.store.heads().await? {
            domain.heads.publish(head);
        }
        Ok(domain)
    }

    /// The manifest whose canonical bytes hash to `data_hash`, from the blob store.
    pub async fn manifest(&self, data_hash: &Sha256Hex) -> Result<Arc<Manifest>, HubError> {
        if let Some(m) = self.cache().get(data_hash) {
            return Ok(m.clone());
        }
        let limit = (self.config.limits.max_manifest_entries as u64) * 1400 + 1;
        let bytes = blobs::get_bytes(self.blobs.as_ref(), data_hash, limit).await?;
        let manifest = if bytes.is_empty() {
            Manifest::default()
        } else {
            Manifest::from_canonical(&bytes, self.config.limits.max_manifest_entries).map_err(
                |e| {
                    HubError::bad_request(
                        codes::INVALID_MANIFEST,
                        format!("stored manifest {data_hash} is unreadable: {e}"),
                    )
                },
            )?
        };
        let manifest = Arc::new(manifest);
        let mut cache = self.cache();
        if cache.len() >= MANIFEST_CACHE {
            cache.clear();
        }
        cache.insert(data_hash.clone(), manifest.clone());
        Ok(manifest)
    }

    /// Sizes of `hashes` in the blob store, `None` for the missing ones; a few lookups at a
    /// time.
    pub async fn blob_sizes(&self, hashes: &[Sha256Hex]) -> Result<Vec<Option<u64>>, HubError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(hashes.iter().cloned())
            .map(|h| {
                let blobs = self.blobs.clone();
                async move { blobs.size(&h).await }
            })
            .buffered(16)
            .try_collect()
            .await
            .map_err(HubError::from)
    }

    /// The cache holds only immutable values, so a panic elsewhere cannot leave it wrong.
    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Sha256Hex, Arc<Manifest>>> {
        self.manifests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this hub announces `head`: not when it does not serve its space (not in
    /// `spaces`), nor when the space was adopted without any data the hub knows (agents would
    /// apply an empty tree as if it were the data; they stay blocked and `GET …/head` says why).
    fn announced(&self, head: &Head) -> bool {
        if !self.config.spaces.contains(&head.space) {
            tracing::debug!(
                space = head.space,
                "not serving a space that is not configured"
            );
            return false;
        }
        if store::has_no_data(head) {
            tracing::warn!(
                space = head.space,
                version = head.version,
                "space adopted without data: not announced until a source or a publish fills it \
                 (see docs/MIGRATION.md)"
            );
            return false;
        }
        true
    }

    /// Announces a head this hub made or was told of (it only moves forward; see
    /// [`crate::broadcast::Heads::publish`]).
    pub fn publish(&self, head: Head) {
        if !self.announced(&head) {
            return;
        }
        let (space, version, forced) = (head.space.clone(), head.version, head.forced);
        if self.heads.publish(head) {
            tracing::info!(space, version, forced, "head moved; broadcasting");
        }
    }

    /// Applies a head read from the store (see [`crate::broadcast::Heads::replace`]).
    pub fn replace(&self, head: Head, read_from: &Snapshot) {
        if !self.announced(&head) {
            return;
        }
        let (space, version) = (head.space.clone(), head.version);
        let before = self.heads.get(&space).map(|p| p.head.version);
        if self.heads.replace(head, read_from) {
            let epoch = self.heads.get(&space).map_or(0, |p| p.head.epoch);
            match before {
                Some(b) if b >= version => {
                    tracing::warn!(
                        space,
                        version,
                        was = b,
                        epoch,
                        "the database holds an older head than this hub knew (restore or failover); following it"
                    )
                }
                _ => tracing::info!(space, version, "head moved; broadcasting"),
            }
        }
    }
}
