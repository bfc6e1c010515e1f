//! The state every request handler and socket task shares.

use crate::auth::{HasTokens, Tokens};
use crate::clients::Clients;
use crate::domain::Domain;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use synchub_protocol::HeldRecord;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The [`Domain`] (config, store, blobs, heads) plus what only a serving hub has; derefs to the
/// domain, so `state.store` and `state.heads` read as before.
pub struct Inner {
    pub domain: Domain,
    pub hub_id: String,
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
    /// The held changes this replica heard of, so each is news once.
    pub held_heard: crate::held::Heard,
    /// Each held change the first time this replica hears of it, for the alerts.
    pub held_news: broadcast::Sender<HeldRecord>,
    /// Why each scheduled backup failed (see `backup.rs`), for the alerts.
    pub backup_failures: broadcast::Sender<String>,
    /// Blob bytes each token uploaded this hour.
    pub upload_quota: crate::blob_access::UploadQuota,
}

/// Held changes queued for the alerts; a held change is rare, so more means something is
/// wrong and the oldest are dropped.
const HELD_NEWS: usize = 64;

/// How long `/readyz` says "disk full" after a write failed for it: long enough for a probe
/// to see it, short enough that a freed disk is noticed without a restart.
pub const STORAGE_FULL_REPORTED: std::time::Duration = std::time::Duration::from_secs(60);

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

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::ops::Deref for Inner {
    type Target = Domain;
    fn deref(&self) -> &Domain {
        &self.domain
    }
}

impl HasTokens for AppState {
    fn tokens(&self) -> &Tokens {
        &self.0.tokens
    }
}

impl AppState {
    pub fn new(
        domain: Domain,
        hub_id: String,
        shutdown: CancellationToken,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Self {
        AppState(Arc::new(Inner {
            domain,
            hub_id,
            tokens: Tokens::default(),
            clients: Clients::default(),
            shutdown,
            metrics,
            reconcile: Reconcile::default(),
            storage_full_at: Mutex::new(None),
            held_heard: crate::held::Heard::default(),
            held_news: broadcast::channel(HELD_NEWS).0,
            backup_failures: broadcast::channel(HELD_NEWS).0,
            upload_quota: Default::default(),
        }))
    }
}
