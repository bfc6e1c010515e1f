//! Starting and stopping a hub: open the store and blob store, load heads and tokens, start the
//! watcher that turns version-row changes into broadcasts, and serve HTTP until shutdown.
//!
//! The watcher and the task that applies its changes are supervised (restarted when they end
//! before shutdown). A change is kept until the read it calls for succeeds, retried with
//! backoff, and every head and token is read again every `reread_interval_ms` anyway, so a lost
//! notification or a failed read delays a head by at most that long.

use crate::blobs::{self, BlobError, BlobStore};
use crate::config::{BlobStoreConfig, Config, ConfigError};
use crate::domain::Domain;
use crate::state::AppState;
use crate::store::{self, Change, StoreError};
use std::collections::BTreeSet;
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
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
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
    store.set_fed_spaces(&config.fed_spaces());
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

/// Binds the listening socket; returns it with the address it got (the port may have been 0).
/// Connections the kernel may hold for the hub before it accepts them (capped by the kernel's
/// `net.core.somaxconn`, 4,096 on current Linux). A fleet that connects or fetches at once
/// fills tokio's default of 1,024 while the hub is busy, and every connection past it has its
/// SYN dropped and waits a second for the retry.
pub const LISTEN_BACKLOG: u32 = 4096;

async fn bind(listen: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind {
        addr: listen,
        source,
    };
    let socket = match listen {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(bind_error)?;
    // As `TcpListener::bind` does: a restarted hub binds while old connections linger.
    #[cfg(unix)]
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(listen).map_err(bind_error)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    Ok((listener, addr))
}

/// Loads the tokens and, on a database without any, creates the first admin token; returns its
/// secret when this hub made it.
async fn first_admin_token(
    state: &AppState,
    store: &dyn store::Store,
) -> Result<Option<String>, StartError> {
    state.tokens.reload(store).await?;
    if !state.tokens.is_empty() {
        return Ok(None);
    }
    let created = match crate::auth::create_token(store, "admin", Role::Admin, None).await {
        Ok(secret) => Some(secret),
        // Replicas started together on an empty database: another one made it (and
        // printed its secret).
        Err(StoreError::DuplicateToken(_)) => None,
        Err(e) => return Err(e.into()),
    };
    state.tokens.reload(store).await?;
    Ok(created)
}

/// Starts the version watcher, the external sources, the alerts, the fleet writer, the
/// scheduled garbage collection and the scheduled backups; the returned task ends once all of them have stopped.
fn spawn_background(
    state: &AppState,
    poll: Duration,
    shutdown: &CancellationToken,
) -> Result<JoinHandle<()>, StartError> {
    let watcher = tokio::spawn(supervise(state.clone(), poll, shutdown.clone()));
    let sources = crate::sources::spawn(state.clone(), shutdown.child_token());
    let alerts = match crate::alerts::spawn(state.clone(), shutdown.child_token()) {
        Ok(task) => task,
        Err(e) => {
            shutdown.cancel();
            return Err(e.into());
        }
    };
    let fleet = crate::fleet::spawn(state.clone(), shutdown.child_token());
    let gc = crate::gc::spawn(state.clone(), shutdown.child_token());
    let backup = crate::backup::spawn(state.clone(), shutdown.child_token());
    Ok(tokio::spawn(async move {
        let _ = watcher.await;
        let _ = fleet.await;
        for task in [sources, alerts, gc, backup].into_iter().flatten() {
            let _ = task.await;
        }
    }))
}

/// Starts serving connections on the listener, and, with TLS, reloading the certificate on
/// SIGHUP; returns both tasks.
fn spawn_server(
    listener: tokio::net::TcpListener,
    state: &AppState,
    tls_certs: Option<Arc<crate::tls::TlsCerts>>,
    shutdown: &CancellationToken,
) -> (JoinHandle<()>, Option<JoinHandle<()>>) {
    let app = crate::api::router(state.clone());
    let (tls, tls_reload) = match tls_certs {
        Some(certs) => {
            let reload = crate::tls::reload_on_sighup(certs.clone(), shutdown.clone());
            (Some(certs.acceptor()), Some(reload))
        }
        None => (None, None),
    };
    let stop = shutdown.clone();
    let limits = crate::connections::ConnectionLimits {
        header_read_timeout: Duration::from_millis(state.config.limits.header_read_timeout_ms),
        max_unauthenticated_per_address: state.config.limits.max_unauthenticated_per_address,
        send_idle_timeout: Duration::from_millis(state.config.limits.send_idle_timeout_ms),
    };
    let server = tokio::spawn(crate::connections::serve(listener, app, limits, tls, stop));
    (server, tls_reload)
}

/// Starts a hub: returns once it is listening.
pub async fn start(config: Config) -> Result<RunningHub, StartError> {
    raise_open_file_limit();
    // A certificate that does not load stops the start before anything runs.
    let tls_certs = match config.tls_files() {
        Some((cert, key)) => Some(crate::tls::TlsCerts::load(cert, key)?),
        None => None,
    };
    let (store, blobs) = open_parts(&config).await?;
    let (listener, addr) = bind(config.listen).await?;
    let hub_id = config
        .hub_id
        .clone()
        .unwrap_or_else(|| default_hub_id(addr.port()));
    let shutdown = CancellationToken::new();
    let poll = Duration::from_millis(config.poll_interval_ms);
    let state = AppState::new(
        Domain::new(config, store.clone(), blobs),
        hub_id,
        shutdown.clone(),
        metrics_handle(),
    );

    let initial_admin_token = first_admin_token(&state, store.as_ref()).await?;
    for head in store.heads().await? {
        state.publish(head).await;
    }
    let watcher = spawn_background(&state, poll, &shutdown)?;

    let (server, tls_reload) = spawn_server(listener, &state, tls_certs, &shutdown);
    let watcher = tokio::spawn(async move {
        let _ = watcher.await;
        if let Some(task) = tls_reload {
            let _ = task.await;
        }
    });
    let scheme = if state.config.tls_files().is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, scheme, hub_id = state.hub_id, store = state.store.backend(), blobs = state.blobs.backend(), "hub listening");
    Ok(RunningHub {
        addr,
        state,
        initial_admin_token,
        shutdown,
        server,
        watcher,
    })
}

/// The id a hub announces when its configuration names none: the machine's host name (read from
/// the kernel: `$HOSTNAME` is a shell variable that systemd does not set), the port, and a random
/// part, so that two replicas never announce the same id, even on hosts that share a name.
pub fn default_hub_id(port: u16) -> String {
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            let name = std::fs::read_to_string(p).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or_else(|| "hub".to_owned());
    format!("{host}:{port}-{:08x}", rand::random::<u32>())
}

/// Runs the store's watcher and the task that applies what it reports, restarting either when
/// it ends before shutdown (a panic, a bug): heads must never freeze while the hub serves.
async fn supervise(state: AppState, poll: Duration, shutdown: CancellationToken) {
    let (tx, rx) = mpsc::unbounded_channel();
    let watcher = {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                state.reconcile.health.send_modify(|h| h.watcher_up = true);
                let run = tokio::spawn(state.store.clone().watch(
                    poll,
                    tx.clone(),
                    shutdown.child_token(),
                ));
                let ended = run.await;
                state.reconcile.health.send_modify(|h| h.watcher_up = false);
                if shutdown.is_cancelled() {
                    return;
                }
                tracing::error!(outcome = ?ended.err(), "the database watcher stopped; restarting it");
                // Whatever changed while no one watched is read again.
                let _ = tx.send(Change::All);
                let _ = tx.send(Change::Tokens);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    };
    let mut reconciler = Reconciler {
        state: state.clone(),
        changes: rx,
        dirty: Dirty::default(),
    };
    loop {
        state.reconcile.health.send_modify(|h| h.apply_up = true);
        let run = std::panic::AssertUnwindSafe(reconciler.run(&shutdown));
        let ended = futures::FutureExt::catch_unwind(run).await;
        state.reconcile.health.send_modify(|h| h.apply_up = false);
        if ended.is_ok() || shutdown.is_cancelled() {
            break;
        }
        tracing::error!("applying database changes panicked; restarting");
        reconciler.dirty.all = true;
        reconciler.dirty.tokens = true;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    let _ = watcher.await;
}

/// What still has to be read from the store: a change is dropped only once it is applied.
#[derive(Debug, Default)]
struct Dirty {
    spaces: BTreeSet<String>,
    all: bool,
    tokens: bool,
}

impl Dirty {
    fn add(&mut self, change: Change) {
        match change {
            Change::Space(space) => {
                self.spaces.insert(space);
            }
            Change::All => self.all = true,
            Change::Tokens => self.tokens = true,
        }
    }

    fn is_empty(&self) -> bool {
        self.spaces.is_empty() && !self.all && !self.tokens
    }
}

/// Turns what the watcher noticed, and a timer, into broadcasts and token reloads.
struct Reconciler {
    state: AppState,
    changes: mpsc::UnboundedReceiver<Change>,
    dirty: Dirty,
}

impl Reconciler {
    /// Until shutdown (or the watcher's channel closes).
    async fn run(&mut self, shutdown: &CancellationToken) {
        let every = Duration::from_millis(self.state.config.reread_interval_ms);
        let mut reread = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = RetryBackoff::default();
        loop {
            let retry = async {
                match backoff.retry_at {
                    Some(at) if !self.dirty.is_empty() => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                change = self.changes.recv() => match change {
                    Some(c) => self.dirty.add(c),
                    None => return,
                },
                _ = reread.tick() => {
                    self.dirty.all = true;
                    self.dirty.tokens = true;
                }
                _ = self.state.reconcile.wake.notified() => {
                    let recent = self.state.reconcile.health.borrow().last_attempt
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
                    if recent {
                        continue;
                    }
                    self.dirty.all = true;
                    self.dirty.tokens = true;
                    backoff.retry_at = None;
                }
                _ = retry => backoff.retry_at = None,
                _ = shutdown.cancelled() => return,
            }
            while let Ok(c) = self.changes.try_recv() {
                self.dirty.add(c);
            }
            if backoff.retry_at.is_some() || self.dirty.is_empty() {
                continue;
            }
            let rereads_all = self.dirty.all && self.dirty.tokens;
            let result = self.apply().await;
            self.report(result, rereads_all, &mut backoff);
        }
    }

    /// Records an attempt's outcome in the health the readiness check reads, and on a failure
    /// when to try again.
    fn report(
        &self,
        result: Result<(), StoreError>,
        rereads_all: bool,
        backoff: &mut RetryBackoff,
    ) {
        let now = std::time::Instant::now();
        match result {
            Ok(()) => {
                backoff.reset();
                self.state.reconcile.health.send_modify(|h| {
                    h.last_attempt = Some(now);
                    h.last_error = None;
                    if rereads_all {
                        h.last_reread = Some(now);
                    }
                });
            }
            Err(e) => {
                let delay = backoff.fail();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "could not read a database change; kept, and retried");
                self.state.reconcile.health.send_modify(|h| {
                    h.last_attempt = Some(now);
                    h.last_error = Some(e.to_string());
                });
            }
        }
    }

    /// Reads what is dirty; each part is forgotten once applied, so a failure keeps the rest.
    async fn apply(&mut self) -> Result<(), StoreError> {
        let state = &self.state;
        if self.dirty.all {
            let before = state.heads.snapshot();
            for head in state.store.heads().await? {
                state.replace(head, &before).await;
            }
            self.dirty.all = false;
            self.dirty.spaces.clear();
        }
        while let Some(space) = self.dirty.spaces.first().cloned() {
            let before = state.heads.snapshot();
            if let Some(head) = state.store.head(&space).await? {
                state.replace(head, &before).await;
            }
            self.dirty.spaces.remove(&space);
        }
        if self.dirty.tokens {
            let gone = state.tokens.reload(state.store.as_ref()).await?;
            state.clients.revoke(&gone);
            self.dirty.tokens = false;
        }
        Ok(())
    }
}

/// Waits between failed reads of the store: 100 ms doubling to 5 s.
#[derive(Default)]
struct RetryBackoff {
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
}

impl RetryBackoff {
    fn fail(&mut self) -> Duration {
        let delay = Duration::from_millis(100 << self.failures.min(6)).min(Duration::from_secs(5));
        self.failures += 1;
        self.retry_at = Some(tokio::time::Instant::now() + delay);
        delay
    }

    fn reset(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }
}

/// Each socket is a file descriptor; the default soft limit (1024) would cap the agents.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_hub_id_names_the_host_and_differs_per_process() {
        let a = default_hub_id(7070);
        let b = default_hub_id(7070);
        assert_ne!(a, b, "two replicas on one port must not share an id");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        assert!(a.starts_with(host.trim()), "{a}");
        assert!(a.contains(":7070-"), "{a}");
        assert!(!a.starts_with(':'), "{a}");
    }
}
