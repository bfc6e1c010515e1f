//! Starting and stopping a hub: open the store and blob store, load heads and tokens, start the
//! watcher that turns version-row changes into broadcasts, and serve HTTP until shutdown.

use crate::blobs::{self, BlobError, BlobStore};
use crate::config::{BlobStoreConfig, Config, ConfigError};
use crate::state::AppState;
use crate::store::{self, Change, StoreError};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use synchub_protocol::Role;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data folder {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A hub that is serving.
pub struct RunningHub {
    pub addr: SocketAddr,
    pub state: AppState,
    /// The secret of the admin token created because the hub had no token at all; shown once.
    pub initial_admin_token: Option<String>,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    watcher: JoinHandle<()>,
}

impl RunningHub {
    /// Stops accepting, closes every WebSocket with "going away" and waits for the tasks.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.watcher).await;
    }

    /// Resolves when the server ended (after [`RunningHub::stop`] or a fatal error).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn wait(self) {
        let _ = self.server.await;
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.watcher).await;
    }
}

/// The process-wide Prometheus recorder (a recorder can be installed once per process).
fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("non-empty buckets")
                .install_recorder()
                .unwrap_or_else(|_| {
                    metrics_exporter_prometheus::PrometheusBuilder::new()
                        .build_recorder()
                        .handle()
                })
        })
        .clone()
}

/// Opens the blob store the configuration names.
pub async fn open_blobs(config: &Config) -> Result<Arc<dyn BlobStore>, StartError> {
    Ok(match &config.blob_store {
        BlobStoreConfig::Fs { path } => {
            let root = path
                .clone()
                .unwrap_or_else(|| config.data_dir.join("blobs"));
            Arc::new(blobs::fs::FsBlobStore::new(root)?)
        }
        BlobStoreConfig::S3(s3) => Arc::new(blobs::s3::S3BlobStore::new(s3)?),
    })
}

/// Opens the store and blob store and makes sure the configured spaces exist (and the empty
/// manifest, which a new space starts with, is stored).
pub async fn open_parts(
    config: &Config,
) -> Result<(Arc<dyn store::Store>, Arc<dyn BlobStore>), StartError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = store::open(&config.database_url()).await?;
    let blobs = open_blobs(config).await?;
    blobs::put_bytes(blobs.as_ref(), bytes::Bytes::new()).await?;
    for space in &config.spaces {
        store.ensure_space(space).await?;
    }
    Ok((store, blobs))
}

/// Opens an existing hub's store and blob store for a command-line tool running beside the
/// hub: creates no folder, database or blob, and leaves the hub's uploads in flight alone.
/// The caller checks first that the database exists ([`Config::sqlite_path`]).
pub async fn open_existing_parts(
    config: &Config,
) -> Result<(Arc<dyn store::Store>, Arc<dyn BlobStore>), StartError> {
    config.validate()?;
    let store = store::open(&config.database_url()).await?;
    let blobs: Arc<dyn BlobStore> = match &config.blob_store {
        BlobStoreConfig::Fs { path } => Arc::new(blobs::fs::FsBlobStore::open_existing(
            path.clone()
                .unwrap_or_else(|| config.data_dir.join("blobs")),
        )?),
        BlobStoreConfig::S3(s3) => Arc::new(blobs::s3::S3BlobStore::new(s3)?),
    };
    Ok((store, blobs))
}

/// The hub's state without a server, for command-line tools that act like the hub on an
/// existing hub's data ([`open_existing_parts`]).
pub async fn offline_state(config: Config) -> Result<AppState, StartError> {
    let (store, blobs) = open_existing_parts(&config).await?;
    let state = AppState::new(
        config,
        "cli".into(),
        store.clone(),
        blobs,
        CancellationToken::new(),
        metrics_handle(),
    );
    for head in store.heads().await? {
        state.heads.publish(head);
    }
    Ok(state)
}

/// Starts a hub: returns once it is listening.
pub async fn start(config: Config) -> Result<RunningHub, StartError> {
    raise_open_file_limit();
    let (store, blobs) = open_parts(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let hub_id = config.hub_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "hub".into());
        format!("{host}:{}", addr.port())
    });
    let shutdown = CancellationToken::new();
    let poll = Duration::from_millis(config.poll_interval_ms);
    let state = AppState::new(
        config,
        hub_id,
        store.clone(),
        blobs,
        shutdown.clone(),
        metrics_handle(),
    );

    state.tokens.reload(store.as_ref()).await?;
    let initial_admin_token = if state.tokens.is_empty() {
        let created =
            match crate::auth::create_token(store.as_ref(), "admin", Role::Admin, None).await {
                Ok(secret) => Some(secret),
                // Replicas started together on an empty database: another one made it (and
                // printed its secret).
                Err(StoreError::DuplicateToken(_)) => None,
                Err(e) => return Err(e.into()),
            };
        state.tokens.reload(store.as_ref()).await?;
        created
    } else {
        None
    };
    for head in store.heads().await? {
        state.heads.publish(head);
    }

    let (tx, rx) = mpsc::unbounded_channel();
    let watch_task = tokio::spawn(store.clone().watch(poll, tx, shutdown.child_token()));
    let apply_task = tokio::spawn(apply_changes(state.clone(), rx));
    let watcher = tokio::spawn(async move {
        let _ = watch_task.await;
        let _ = apply_task.await;
    });

    let app = crate::api::router(state.clone());
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "server stopped");
        }
    });
    tracing::info!(%addr, hub_id = state.hub_id, store = state.store.backend(), blobs = state.blobs.backend(), "hub listening");
    Ok(RunningHub {
        addr,
        state,
        initial_admin_token,
        shutdown,
        server,
        watcher,
    })
}

/// Turns what the store's watcher noticed into broadcasts and token reloads.
async fn apply_changes(state: AppState, mut rx: mpsc::UnboundedReceiver<Change>) {
    while let Some(change) = rx.recv().await {
        let result = match change {
            Change::Space(space) => state.store.head(&space).await.map(|h| {
                if let Some(h) = h {
                    publish(&state, h);
                }
            }),
            Change::All => state.store.heads().await.map(|heads| {
                for h in heads {
                    publish(&state, h);
                }
            }),
            Change::Tokens => state
                .tokens
                .reload(state.store.as_ref())
                .await
                .map(|gone| state.clients.revoke(&gone)),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not apply a database change; the next one retries");
        }
    }
}

fn publish(state: &AppState, head: synchub_protocol::Head) {
    let (space, version, forced) = (head.space.clone(), head.version, head.forced);
    if state.heads.publish(head) {
        tracing::info!(space, version, forced, "head moved; broadcasting");
    }
}

/// Each socket is a file descriptor; the default soft limit (1024) would cap the agents.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}
