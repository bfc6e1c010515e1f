//! synchub-client: the agent that keeps a local copy of hub spaces in sync, as an embeddable
//! library ([`SyncClient`]) and the `synchub-agent` binary.
//!
//! A [`SyncClient`] holds a WebSocket to the hub (falling back to a 1-second HTTP head check
//! while it is down), downloads every announced version into a content-addressed cache,
//! checks every hash, and switches the `DIR/current` link to the new tree in one atomic
//! rename. Programs on the PC read `DIR/current/...` and block while a sync is under way
//! through [`SyncClient::access`], the local API (`local_api`) or `DIR/.synchub/state.json`.
//! Every sync is reported to the hub's `sync_log` through an on-disk outbox.

pub mod apply;
pub mod backoff;
pub mod cache;
pub mod config;
mod connection;
pub mod download;
pub mod error;
pub mod fallback;
pub mod hub_api;
pub mod local_api;
pub mod outbox;
pub mod publish;
pub mod selection;
#[cfg(windows)]
pub mod service;
pub mod space;
pub mod state;
pub mod twoway;
pub mod verify;

pub use config::{AgentConfig, ExtraFiles, OnFailure};
pub use error::{ClientError, Result};
pub use hub_api::HubApi;
pub use publish::PublishOutcome;
pub use twoway::TwoWayConfig;

use serde::Serialize;
use space::{SpaceShared, WorkerContext};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentState, SyncReport, SyncStatus, SyncType};
use tokio::sync::{OwnedRwLockReadGuard, watch};
use tokio::task::JoinHandle;

/// A running agent: syncs its spaces until [`SyncClient::shutdown`].
pub struct SyncClient {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    local_api: Option<SocketAddr>,
}

/// What the tasks and the local API share.
pub struct Inner {
    pub(crate) config: AgentConfig,
    pub(crate) client_id: String,
    pub(crate) api: HubApi,
    pub(crate) spaces: Vec<Arc<SpaceShared>>,
    pub(crate) outbox: outbox::Outbox,
    pub(crate) connected: watch::Sender<bool>,
    pub(crate) last_head_check: watch::Sender<Option<chrono::DateTime<chrono::Utc>>>,
    /// Why the last head check failed, until one succeeds again.
    pub(crate) hub_error: watch::Sender<Option<String>>,
    pub(crate) stop: watch::Sender<bool>,
}

/// Permission to read a space's data: while any guard lives, no new version is switched in.
/// Obtained only when the space is ready (or stale use is allowed after a failure).
pub struct AccessGuard {
    _guard: OwnedRwLockReadGuard<()>,
    path: PathBuf,
    version: u64,
}

impl AccessGuard {
    /// `DIR/current`: read the data under it.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
    /// The version the data is at.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// A snapshot of the agent, as `GET /status` returns it.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub client_id: String,
    pub hub: HubStatus,
    pub spaces: Vec<SpaceStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HubStatus {
    pub url: String,
    /// `websocket` while the push channel is up, else `fallback` (HTTP head check).
    pub mode: &'static str,
    pub connected: bool,
    pub last_head_check: Option<String>,
    /// Why the hub cannot be reached over HTTP, while it cannot.
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SpaceStatus {
    pub space: String,
    pub allows_use: bool,
    #[serde(flatten)]
    pub state: AgentState,
    /// The newest version the hub announced.
    pub hub_version: Option<u64>,
    pub last_error: Option<String>,
    /// When the data held now was put in place (RFC 3339), if any is held.
    #[serde(default)]
    pub applied_at: Option<String>,
    /// Two-way mode: a local mass change held until an admin approves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_change: Option<synchub_protocol::HeldChange>,
}

impl SyncClient {
    /// Checks the configuration, recovers the local trees and starts syncing.
    pub async fn start(config: AgentConfig) -> Result<SyncClient> {
        config.validate()?;
        hub_api::install_crypto_provider();
        let meta = config.dir.join(".synchub");
        std::fs::create_dir_all(&meta)
            .map_err(|e| ClientError::io(format!("creating {}", meta.display()), e))?;
        let client_id = match &config.client_id {
            Some(id) => id.clone(),
            None => load_or_create_client_id(&meta)?,
        };
        let api = HubApi::with_read_timeout(
            config.hubs.clone(),
            &config.token,
            Duration::from_millis(config.read_timeout_ms.max(100)),
        )?;
        let outbox = outbox::Outbox::open(meta.join("outbox"))?;
        let mut spaces = Vec::new();
        for name in &config.spaces {
            let layout = apply::Layout::new(config.space_dir(name));
            std::fs::create_dir_all(layout.meta())
                .map_err(|e| ClientError::io(format!("creating {}", layout.meta().display()), e))?;
            spaces.push(Arc::new(SpaceShared::new(name.clone(), layout)));
        }
        let inner = Arc::new(Inner {
            client_id: client_id.clone(),
            api: api.clone(),
            spaces: spaces.clone(),
            outbox: outbox.clone(),
            connected: watch::Sender::new(false),
            last_head_check: watch::Sender::new(None),
            hub_error: watch::Sender::new(None),
            stop: watch::Sender::new(false),
            config: config.clone(),
        });

        let mut tasks = Vec::new();
        let worker_ctx = Arc::new(WorkerContext {
            selection: selection::Selection::new(&config.include)?,
            config: config.clone(),
            client_id: client_id.clone(),
            api: api.clone(),
            outbox: outbox.clone(),
        });
        for s in &spaces {
            if config.two_way.enabled {
                tasks.push(tokio::spawn(twoway::supervise(
                    s.clone(),
                    worker_ctx.clone(),
                    inner.stop.subscribe(),
                )));
                continue;
            }
            tasks.push(tokio::spawn(supervise_worker(
                s.clone(),
                worker_ctx.clone(),
                inner.stop.subscribe(),
            )));
        }
        if !config.disable_websocket {
            let ctx = Arc::new(connection::ConnectionContext {
                api: api.clone(),
                ws_path: config.ws_path.clone(),
                client_id: client_id.clone(),
                hostname: hostname(),
                spaces: spaces.clone(),
                max_backoff: Duration::from_millis(config.max_backoff_ms),
                connected: inner.connected.clone(),
                head_check_interval: Duration::from_millis(config.head_check_interval_ms.max(100)),
                last_head_check: inner.last_head_check.clone(),
            });
            tasks.push(tokio::spawn(connection::run(ctx, inner.stop.subscribe())));
        }
        let fb = Arc::new(fallback::FallbackContext {
            api: api.clone(),
            spaces: spaces.clone(),
            interval: Duration::from_millis(config.fallback_interval_ms.max(50)),
            only_channel: config.disable_websocket,
            last_ok: inner.last_head_check.clone(),
            last_error: inner.hub_error.clone(),
        });
        tasks.push(tokio::spawn(fallback::run(
            fb,
            inner.connected.subscribe(),
            inner.stop.subscribe(),
        )));
        tasks.push(tokio::spawn(
            outbox.clone().run(api.clone(), inner.stop.subscribe()),
        ));
        let local_api = match config.status_listen {
            Some(addr) => {
                let (bound, task) = local_api::serve(addr, inner.clone()).await?;
                tasks.push(task);
                Some(bound)
            }
            None => None,
        };
        tracing::info!(client_id, ?local_api, "agent started");
        Ok(SyncClient {
            inner,
            tasks: Mutex::new(tasks),
            local_api,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// Where the local API listens, when it is on.
    pub fn local_api_addr(&self) -> Option<SocketAddr> {
        self.local_api
    }

    fn space(&self, space: Option<&str>) -> Result<&Arc<SpaceShared>> {
        match space {
            None => self.inner.spaces.first(),
            Some(name) => self.inner.spaces.iter().find(|s| s.name == name),
        }
        .ok_or_else(|| ClientError::Config(format!("space {space:?} is not configured")))
    }

    /// Current state of a space (`None`: the first configured space).
    pub fn state(&self, space: Option<&str>) -> Result<AgentState> {
        Ok(self.space(space)?.state.borrow().clone())
    }

    /// Follows the state of a space.
    pub fn subscribe(&self, space: Option<&str>) -> Result<watch::Receiver<AgentState>> {
        Ok(self.space(space)?.state.subscribe())
    }

    /// The folder programs read (`DIR/current`, or `DIR/<space>/current`).
    pub fn data_path(&self, space: Option<&str>) -> Result<PathBuf> {
        Ok(self.space(space)?.layout.current())
    }

    /// Waits until the first space may be used and returns a guard that keeps a new version
    /// from being switched in while it lives.
    pub async fn access(&self) -> Result<AccessGuard> {
        self.access_space(None).await
    }

    /// [`SyncClient::access`] for a named space.
    pub async fn access_space(&self, space: Option<&str>) -> Result<AccessGuard> {
        let space = self.space(space)?.clone();
        let mut rx = space.state.subscribe();
        loop {
            rx.wait_for(AgentState::allows_use)
                .await
                .map_err(|_| ClientError::Shutdown)?;
            let guard = space.gate.clone().read_owned().await;
            // The state may have moved on while we queued for the lock.
            let state = space.state.borrow().clone();
            if state.allows_use() {
                return Ok(AccessGuard {
                    _guard: guard,
                    path: space.layout.current(),
                    version: state.version(),
                });
            }
        }
    }

    /// A guard now, or `None` when use is blocked.
    pub fn try_access(&self, space: Option<&str>) -> Result<Option<AccessGuard>> {
        let space = self.space(space)?;
        let state = space.state.borrow().clone();
        if !state.allows_use() {
            return Ok(None);
        }
        Ok(space
            .gate
            .clone()
            .try_read_owned()
            .ok()
            .map(|g| AccessGuard {
                _guard: g,
                path: space.layout.current(),
                version: state.version(),
            }))
    }

    /// Start a pending download (or retry a failed one) now.
    pub fn sync_now(&self, space: Option<&str>) -> Result<()> {
        self.space(space)?.sync_now.notify_one();
        Ok(())
    }

    /// Waits until the space is ready at `version` or newer, or the timeout passes.
    pub async fn wait_ready(
        &self,
        space: Option<&str>,
        version: u64,
        timeout: Duration,
    ) -> Result<AgentState> {
        let mut rx = self.subscribe(space)?;
        let res = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| matches!(s, AgentState::Ready { version: v } if *v >= version)),
        )
        .await
        .map(|r| r.map(|s| s.clone()));
        match res {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(ClientError::Shutdown),
            Err(_) => Err(ClientError::Unreachable(format!(
                "not ready at v{version} after {timeout:?}: {:?}",
                rx.borrow().clone()
            ))),
        }
    }

    /// Publishes files or folders to a space as one commit and reports an `upload`.
    pub async fn publish(
        &self,
        space: Option<&str>,
        prefix: Option<&str>,
        paths: &[PathBuf],
        message: Option<String>,
    ) -> Result<PublishOutcome> {
        let name = self.space(space)?.name.clone();
        let started = Instant::now();
        let result = publish::publish(&self.inner.api, &name, prefix, paths, message).await;
        let report = upload_report(
            &self.inner.client_id,
            &name,
            self.inner.config.user.clone(),
            &result,
            started,
        );
        self.inner.outbox.put(&report)?;
        result
    }

    /// A snapshot for status displays.
    pub fn status(&self) -> StatusReport {
        self.inner.status()
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        self.inner.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for SyncClient {
    fn drop(&mut self) {
        self.inner.stop.send_replace(true);
        for t in self.tasks.lock().expect("tasks lock").iter() {
            t.abort();
        }
    }
}

impl Inner {
    pub(crate) fn status(&self) -> StatusReport {
        let connected = *self.connected.borrow();
        StatusReport {
            client_id: self.client_id.clone(),
            hub: HubStatus {
                url: self.api.hub().to_owned(),
                mode: if connected { "websocket" } else { "fallback" },
                connected,
                last_head_check: self.last_head_check.borrow().map(|t| t.to_rfc3339()),
                last_error: self.hub_error.borrow().clone(),
            },
            spaces: self
                .spaces
                .iter()
                .map(|s| {
                    let state = s.state.borrow().clone();
                    SpaceStatus {
                        space: s.name.clone(),
                        allows_use: state.allows_use(),
                        state,
                        hub_version: s.head.borrow().as_ref().map(|h| h.version),
                        last_error: s.last_error.lock().expect("error lock").clone(),
                        applied_at: local_api::applied_at(&s.layout),
                        held_change: twoway::held_change(&s.layout),
                    }
                })
                .collect(),
        }
    }
}

/// The `sync_log` report of a publish.
pub fn upload_report(
    client_id: &str,
    space: &str,
    user: Option<String>,
    result: &Result<PublishOutcome>,
    started: Instant,
) -> SyncReport {
    let (status, version, items, bytes, error) = match result {
        Ok(o) => (
            SyncStatus::Success,
            Some(o.head.version),
            o.files + o.deleted,
            o.bytes_uploaded,
            None,
        ),
        Err(e) => (SyncStatus::Failed, None, 0, 0, Some(e.to_string())),
    };
    let items_total = result.as_ref().ok().and_then(|o| o.total);
    SyncReport {
        report_id: uuid::Uuid::new_v4().to_string(),
        client_id: client_id.to_owned(),
        space: space.to_owned(),
        sync_type: SyncType::Upload,
        status,
        version,
        items_synced: items,
        items_total,
        bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        error_message: error,
        user,
        synced_at: Some(chrono::Utc::now().to_rfc3339()),
    }
}

/// Runs a space's worker, and runs it again (after a pause) if it ends or panics before the
/// agent stops: a space must never be left `starting` or half-way with nobody working on it.
async fn supervise_worker(
    space: Arc<SpaceShared>,
    ctx: Arc<WorkerContext>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let run = tokio::spawn(space::run_worker(space.clone(), ctx.clone(), stop.clone()));
        let ended = run.await;
        if *stop.borrow() {
            return;
        }
        tracing::error!(space = %space.name, outcome = ?ended.err(), "the sync worker stopped; restarting it");
        *space.last_error.lock().expect("error lock") =
            Some("the sync worker stopped; restarting it".into());
        let mut stop = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn load_or_create_client_id(meta: &std::path::Path) -> Result<String> {
    let path = meta.join("client_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_owned());
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    apply::write_atomic(&path, id.as_bytes())?;
    Ok(id)
}

pub(crate) fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}
