//! synchub-client: the agent that keeps a local copy of hub spaces in sync, as an embeddable
//! library ([`SyncClient`]) and the `synchub-agent` binary.
//!
//! A [`SyncClient`] holds a WebSocket to the hub (falling back to a 1-second HTTP head check
//! while it is down), downloads every announced version into a content-addressed cache,
//! checks every hash, and switches the `DIR/current` link to the new tree in one atomic
//! rename. Programs on the PC read `DIR/current/...` and block while a sync is under way
//! through [`SyncClient::access`], the local API or `DIR/.synchub/state.json`. Every sync is
//! reported to the hub's `sync_log` through an on-disk outbox.
//!
//! ```no_run
//! use std::time::Duration;
//! use synchub_client::{AgentConfig, SyncClient};
//!
//! # async fn example() -> synchub_client::Result<()> {
//! let config = AgentConfig {
//!     hubs: vec!["http://hub.example:8080".into()],
//!     token: "an agent token".into(),
//!     dir: "D:\\synchub".into(),
//!     ..AgentConfig::default()
//! };
//! let client = SyncClient::start(config).await?;
//! // Waits while a new version is downloaded; no new one is switched in while `data` lives.
//! let data = client.access().await?;
//! let elevi = std::fs::read(data.path().join("elevi.json"))
//!     .map_err(|e| synchub_client::ClientError::io("reading elevi.json", e))?;
//! println!("version {}: {} bytes", data.version(), elevi.len());
//! drop(data);
//! client.wait_ready(None, 12, Duration::from_secs(60)).await?;
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used))]
#![warn(unreachable_pub)]

mod agent;
mod apply;
mod audit;
mod backoff;
mod blob_check;
mod cache;
mod config;
mod connection;
mod download;
mod error;
mod fallback;
mod hub_api;
mod local_api;
mod outbox;
mod publish;
mod report;
mod restore;
mod selection;
#[cfg(windows)]
pub mod service;
mod space;
mod state;
mod twoway;

pub use apply::walk_files;
pub use audit::{FolderStats, TreeAudit, audit_tree};
pub use config::{AgentConfig, ExtraFiles, OnFailure};
pub use download::fetch_manifest;
pub use error::{ClientError, Result};
pub use hub_api::{DEFAULT_READ_TIMEOUT, HeadCheck, HubApi, install_crypto_provider, tls_config};
pub use outbox::Outbox;
pub use publish::{PublishOptions, PublishOutcome, UploadProgress, publish, publish_with};
pub use report::upload_report;
pub use restore::{RestoreSource, Restored, restore, resume};
pub use state::target_of;
pub use twoway::TwoWayConfig;

use agent::Agent;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentState, SyncType};
use tokio::sync::{OwnedRwLockReadGuard, watch};
use tokio::task::JoinHandle;

/// A running agent: syncs its spaces until [`SyncClient::shutdown`].
pub struct SyncClient {
    agent: Arc<Agent>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    local_api: Option<SocketAddr>,
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

/// The hub as the agent sees it.
#[derive(Clone, Debug, Serialize)]
pub struct HubStatus {
    /// The hub URL in use.
    pub url: String,
    /// `websocket` while the push channel is up, else `fallback` (HTTP head check).
    pub mode: &'static str,
    pub connected: bool,
    pub last_head_check: Option<String>,
    /// Why the hub cannot be reached over HTTP, while it cannot.
    pub last_error: Option<String>,
}

/// One space as the agent holds it.
#[derive(Clone, Debug, Serialize)]
pub struct SpaceStatus {
    pub space: String,
    /// Whether local programs may read the data now.
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
    /// A version restored with `synchub-agent restore`: held, following no head, until
    /// `synchub-agent resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<Restored>,
}

impl SyncClient {
    /// Checks the configuration, recovers the local trees and starts syncing.
    pub async fn start(config: AgentConfig) -> Result<SyncClient> {
        hub_api::install_crypto_provider();
        let agent = Arc::new(Agent::new(config)?);
        let mut tasks = Vec::new();
        for space in &agent.spaces {
            if agent.config.two_way.enabled {
                tasks.push(tokio::spawn(twoway::supervise(
                    space.clone(),
                    agent.clone(),
                )));
                continue;
            }
            tasks.push(tokio::spawn(supervise_worker(space.clone(), agent.clone())));
        }
        if !agent.config.disable_websocket {
            tasks.push(tokio::spawn(connection::run(agent.clone())));
        }
        tasks.push(tokio::spawn(fallback::run(agent.clone())));
        let outbox = agent.reporter.outbox().clone();
        tasks.push(tokio::spawn(
            outbox.run(agent.api.clone(), agent.stop.subscribe()),
        ));
        let local_api = match agent.config.status_listen {
            Some(addr) => {
                let (bound, task) = local_api::serve(addr, agent.clone()).await?;
                tasks.push(task);
                Some(bound)
            }
            None => None,
        };
        tracing::info!(client_id = agent.client_id, ?local_api, "agent started");
        Ok(SyncClient {
            agent,
            tasks: Mutex::new(tasks),
            local_api,
        })
    }

    /// The id this agent reports under.
    pub fn client_id(&self) -> &str {
        &self.agent.client_id
    }

    /// Where the local API listens, when it is on.
    pub fn local_api_addr(&self) -> Option<SocketAddr> {
        self.local_api
    }

    /// Current state of a space (`None`: the first configured space).
    pub fn state(&self, space: Option<&str>) -> Result<AgentState> {
        Ok(self.agent.space(space)?.state.borrow().clone())
    }

    /// Follows the state of a space.
    pub fn subscribe(&self, space: Option<&str>) -> Result<watch::Receiver<AgentState>> {
        Ok(self.agent.space(space)?.state.subscribe())
    }

    /// The folder programs read (`DIR/current`, or `DIR/<space>/current`).
    pub fn data_path(&self, space: Option<&str>) -> Result<PathBuf> {
        Ok(self.agent.space(space)?.layout.current())
    }

    /// Waits until the first space may be used and returns a guard that keeps a new version
    /// from being switched in while it lives.
    pub async fn access(&self) -> Result<AccessGuard> {
        self.access_space(None).await
    }

    /// [`SyncClient::access`] for a named space.
    pub async fn access_space(&self, space: Option<&str>) -> Result<AccessGuard> {
        let space = self.agent.space(space)?.clone();
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
        let space = self.agent.space(space)?;
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
        self.agent.space(space)?.sync_now.notify_one();
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
        let name = self.agent.space(space)?.name.clone();
        let started = Instant::now();
        let result = publish::publish(&self.agent.api, &name, prefix, paths, message).await;
        self.agent.reporter.record(&report::SyncRecord {
            space: &name,
            sync_type: SyncType::Upload,
            started,
            outcome: report::Outcome::of_publish(&result),
        })?;
        result
    }

    /// A snapshot for status displays.
    pub fn status(&self) -> StatusReport {
        self.agent.status()
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        self.agent.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for SyncClient {
    fn drop(&mut self) {
        self.agent.stop.send_replace(true);
        for t in self.tasks.lock().expect("tasks lock").iter() {
            t.abort();
        }
    }
}

/// Runs a space's worker, and runs it again (after a pause) if it ends or panics before the
/// agent stops: a space must never be left `starting` or half-way with nobody working on it.
async fn supervise_worker(space: Arc<space::Space>, agent: Arc<Agent>) {
    loop {
        let run = tokio::spawn(space::run_worker(space.clone(), agent.clone()));
        let ended = run.await;
        if *agent.stop.borrow() {
            return;
        }
        tracing::error!(space = %space.name, outcome = ?ended.err(), "the sync worker stopped; restarting it");
        space.set_error(Some("the sync worker stopped; restarting it".into()));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = agent.stopped() => return,
        }
    }
}
