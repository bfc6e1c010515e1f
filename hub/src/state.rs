//! The state every request handler and socket task shares.

use crate::auth::{HasTokens, Tokens};
use crate::blobs::{self, BlobStore};
use crate::broadcast::Heads;
use crate::clients::Clients;
use crate::config::Config;
use crate::error::HubError;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use synchub_protocol::{Manifest, Sha256Hex, codes};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub hub_id: String,
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub heads: Heads,
    pub tokens: Tokens,
    pub clients: Clients,
    /// Cancelled when the hub shuts down: sockets close with "going away".
    pub shutdown: CancellationToken,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// How well the heads keep in step with the database, for `/readyz`.
    pub reconcile: Reconcile,
    /// When a write last failed for a full disk (a 507 was answered); `/readyz` reports it for
    /// [`STORAGE_FULL_REPORTED`] after.
    pub storage_full_at: Mutex<Option<Instant>>,
    manifests: Mutex<HashMap<Sha256Hex, Arc<Manifest>>>,
}

/// The watcher and the re-reads that keep the in-memory heads and tokens in step with the
/// database: set by the hub's supervised tasks, read by `/readyz` (which therefore needs no
/// query of its own).
#[derive(Default)]
pub struct Reconcile {
    pub health: watch::Sender<ReconcileHealth>,
    /// Asks for a re-read of every head and token now (at most one per second is made).
    pub wake: Notify,
}

#[derive(Clone, Debug, Default)]
pub struct ReconcileHealth {
    /// The store's watcher task is running (it is restarted when it ends).
    pub watcher_up: bool,
    /// The task applying changes is running.
    pub apply_up: bool,
    /// When every head and token was last read successfully.
    pub last_reread: Option<Instant>,
    /// When the last read of the store was tried, successful or not.
    pub last_attempt: Option<Instant>,
    /// Why the last read failed, until one succeeds.
    pub last_error: Option<String>,
}

/// How long `/readyz` says "disk full" after a write failed for it: long enough for a probe
/// to see it, short enough that a freed disk is noticed without a restart.
pub const STORAGE_FULL_REPORTED: std::time::Duration = std::time::Duration::from_secs(60);

/// Parsed manifests kept in memory; they are immutable, so this only bounds memory.
const MANIFEST_CACHE: usize = 8;

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl HasTokens for AppState {
    fn tokens(&self) -> &Tokens {
        &self.0.tokens
    }
}

impl AppState {
    pub fn new(
        config: Config,
        hub_id: String,
        store: Arc<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        shutdown: CancellationToken,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Self {
        AppState(Arc::new(Inner {
            config,
            hub_id,
            store,
            blobs,
            heads: Heads::default(),
            tokens: Tokens::default(),
            clients: Clients::default(),
            shutdown,
            metrics,
            reconcile: Reconcile::default(),
            storage_full_at: Mutex::new(None),
            manifests: Mutex::new(HashMap::new()),
        }))
    }

    /// The manifest whose canonical bytes hash to `data_hash`, from the blob store.
    pub async fn manifest(&self, data_hash: &Sha256Hex) -> Result<Arc<Manifest>, HubError> {
        if let Some(m) = self.manifests.lock().expect("lock").get(data_hash) {
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
        let mut cache = self.manifests.lock().expect("lock");
        if cache.len() >= MANIFEST_CACHE {
            cache.clear();
        }
        cache.insert(data_hash.clone(), manifest.clone());
        Ok(manifest)
    }
}
