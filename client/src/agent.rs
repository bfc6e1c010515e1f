//! The running agent's one shared context: the configuration, the hub API, the spaces, the
//! reporter and the watches that the tasks (space workers, the WebSocket, the fallback head
//! check, the outbox sender, the local API) read and write. Every task holds an
//! `Arc<Agent>`; [`crate::SyncClient`] owns the tasks and stops them through `stop`.

use crate::apply::{self, Layout};
use crate::config::AgentConfig;
use crate::error::{ClientError, Result};
use crate::hub_api::HubApi;
use crate::outbox::Outbox;
use crate::report::Reporter;
use crate::selection::Selection;
use crate::space::Space;
use crate::{HubStatus, StatusReport};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// A point in time the status page shows.
pub(crate) type Timestamp = chrono::DateTime<chrono::Utc>;

/// What every task of one agent shares.
pub(crate) struct Agent {
    pub config: AgentConfig,
    pub client_id: String,
    /// This PC's name, sent in `hello`.
    pub hostname: Option<String>,
    pub api: HubApi,
    /// Selective sync: only these paths of each space are held.
    pub selection: Option<Selection>,
    pub spaces: Vec<Arc<Space>>,
    pub reporter: Reporter,
    /// True while a welcomed WebSocket is up (the fallback check pauses meanwhile).
    pub connected: watch::Sender<bool>,
    /// Last time a head check over HTTP answered.
    pub last_head_check: watch::Sender<Option<Timestamp>>,
    /// Why the last head check failed, until one succeeds again.
    pub hub_error: watch::Sender<Option<String>>,
    /// Set once to stop every task.
    pub stop: watch::Sender<bool>,
}

impl Agent {
    /// Checks the configuration and prepares the folders; starts nothing.
    pub(crate) fn new(config: AgentConfig) -> Result<Agent> {
        config.validate()?;
        let meta = config.dir.join(".synchub");
        std::fs::create_dir_all(&meta)
            .map_err(|e| ClientError::io(format!("creating {}", meta.display()), e))?;
        let client_id = match &config.client_id {
            Some(id) => id.clone(),
            None => load_or_create_client_id(&meta)?,
        };
        let api = HubApi::for_agent(&config)?;
        let outbox = Outbox::open(meta.join("outbox"))?;
        let mut spaces = Vec::new();
        for name in &config.spaces {
            let layout = Layout::new(config.space_dir(name));
            std::fs::create_dir_all(layout.meta())
                .map_err(|e| ClientError::io(format!("creating {}", layout.meta().display()), e))?;
            spaces.push(Arc::new(Space::new(name.clone(), layout)));
        }
        Ok(Agent {
            selection: Selection::new(&config.include)?,
            reporter: Reporter::new(client_id.clone(), config.user.clone(), outbox),
            client_id,
            hostname: hostname(),
            api,
            spaces,
            connected: watch::Sender::new(false),
            last_head_check: watch::Sender::new(None),
            hub_error: watch::Sender::new(None),
            stop: watch::Sender::new(false),
            config,
        })
    }

    /// The space named `name` (`None`: the first configured one).
    pub(crate) fn space(&self, name: Option<&str>) -> Result<&Arc<Space>> {
        match name {
            None => self.spaces.first(),
            Some(name) => self.spaces.iter().find(|s| s.name == name),
        }
        .ok_or_else(|| ClientError::Config(format!("space {name:?} is not configured")))
    }

    /// The space a hub frame or answer names, if this agent holds it.
    pub(crate) fn held_space(&self, name: &str) -> Option<&Arc<Space>> {
        self.spaces.iter().find(|s| s.name == name)
    }

    /// A snapshot for `GET /status` and [`crate::SyncClient::status`].
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
            spaces: self.spaces.iter().map(|s| s.status()).collect(),
        }
    }

    /// Resolves once the agent is told to stop.
    pub(crate) async fn stopped(&self) {
        let mut stop = self.stop.subscribe();
        let _ = stop.wait_for(|s| *s).await;
    }
}

fn load_or_create_client_id(meta: &Path) -> Result<String> {
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

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}
