//! An in-process hub on an ephemeral loopback port, for integration tests, and a minimal
//! WebSocket agent that speaks the real protocol (bearer token, `hello`) so tests can watch what
//! the hub sends.

use anyhow::{Context, anyhow, bail};
use futures::{SinkExt, StreamExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use synchub_hub::config::Config;
use synchub_hub::server::{self, RunningHub};
use synchub_hub::state::AppState;
use synchub_protocol::{
    AgentFrame, Head, HeldSpace, HubFrame, PROTOCOL_VERSION, Role, SyncLogEntry,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A hub running in this test process. Stopped (sockets closed) on [`TestHub::stop`] or drop.
pub struct TestHub {
    /// `http://127.0.0.1:PORT` (`https://` with TLS configured)
    pub url: String,
    /// Secret of the admin token the hub created on first start.
    pub admin_token: String,
    pub config: Config,
    hub: Option<RunningHub>,
    _dir: Option<tempfile::TempDir>,
}

impl TestHub {
    /// A hub on the embedded default (SQLite and filesystem blobs) in a temporary folder.
    pub async fn start() -> anyhow::Result<TestHub> {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestHub::start`], with the configuration adjusted by `configure` first (e.g. a
    /// PostgreSQL `database_url` or an S3 blob store).
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> anyhow::Result<TestHub> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::for_data_dir(dir.path().join("data"));
        config.listen = "127.0.0.1:0".parse()?;
        config.poll_interval_ms = 50;
        configure(&mut config);
        let mut hub = Self::start_config(config).await?;
        hub._dir = Some(dir);
        Ok(hub)
    }

    /// Starts a hub on exactly this configuration (the caller owns its folders).
    pub async fn start_config(config: Config) -> anyhow::Result<TestHub> {
        synchub_hub::blobs::s3::install_crypto_provider();
        let running = server::start(config.clone())
            .await
            .context("starting the hub")?;
        let admin_token = match &running.initial_admin_token {
            Some(t) => t.clone(),
            // A second replica on a shared database: make our own admin token.
            None => {
                synchub_hub::auth::create_token(
                    running.state.store.as_ref(),
                    &format!("admin-{}", uuid::Uuid::new_v4()),
                    Role::Admin,
                    None,
                )
                .await?
            }
        };
        running
            .state
            .tokens
            .reload(running.state.store.as_ref())
            .await?;
        let scheme = if config.tls_files().is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}", running.addr);
        let mut config = config;
        config.listen = running.addr;
        Ok(TestHub {
            url,
            admin_token,
            config,
            hub: Some(running),
            _dir: None,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.hub.as_ref().expect("hub running").state
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// `ws://127.0.0.1:PORT/api/v1/ws` (`wss://` with TLS)
    pub fn ws_url(&self) -> String {
        format!("{}/api/v1/ws", self.url.replacen("http", "ws", 1))
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.url)
    }

    /// `GET /api/v1{path}` as the admin, its JSON answer (an error status is an error).
    pub async fn admin_get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(reqwest::Client::new()
            .get(self.api(path))
            .bearer_auth(&self.admin_token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// `GET /sync-log?{query}` as the admin: the stored sync reports, newest first.
    pub async fn sync_log(&self, query: &str) -> anyhow::Result<Vec<SyncLogEntry>> {
        self.admin_get(&format!("/sync-log?{query}")).await
    }

    /// Creates a token directly in the store and makes the running hub know it at once.
    pub async fn token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<Vec<String>>,
    ) -> anyhow::Result<String> {
        let state = self.state();
        let secret =
            synchub_hub::auth::create_token(state.store.as_ref(), name, role, spaces.as_deref())
                .await?;
        state.tokens.reload(state.store.as_ref()).await?;
        Ok(secret)
    }

    /// Stops the hub (WebSockets get "going away") and keeps its folder for a restart.
    pub async fn stop_keep(&mut self) {
        if let Some(hub) = self.hub.take() {
            hub.stop().await;
        }
    }

    /// Starts again on the same folder, database and port after [`TestHub::stop_keep`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.hub.is_none(), "hub still running");
        let mut last = None;
        // The port may take a moment to be free again.
        for _ in 0..50 {
            match server::start(self.config.clone()).await {
                Ok(h) => {
                    self.hub = Some(h);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow!("restart failed: {:?}", last))
    }

    pub async fn stop(mut self) {
        self.stop_keep().await;
    }
}

/// Path of a blob in a filesystem blob store rooted at `<data_dir>/blobs`.
pub fn fs_blob_path(data_dir: &Path, sha256: &str) -> PathBuf {
    data_dir
        .join("blobs")
        .join(&sha256[0..2])
        .join(&sha256[2..4])
        .join(sha256)
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A bare WebSocket agent for tests: connect, `hello`, then read frames.
pub struct WsAgent {
    pub socket: Socket,
    pub welcome_heads: Vec<Head>,
}

/// Opens the WebSocket with `token` (none: no Authorization header); the upgrade's error status
/// is returned as `Err`.
pub async fn ws_connect(hub_ws_url: &str, token: Option<&str>) -> anyhow::Result<Socket> {
    let mut request = hub_ws_url.into_client_request()?;
    if let Some(token) = token {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
    }
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

impl WsAgent {
    /// Connects, says hello for `spaces` (holding nothing), and waits for `welcome`.
    pub async fn connect(hub: &TestHub, token: &str, spaces: &[&str]) -> anyhow::Result<WsAgent> {
        Self::connect_url(&hub.ws_url(), token, spaces).await
    }

    pub async fn connect_url(url: &str, token: &str, spaces: &[&str]) -> anyhow::Result<WsAgent> {
        let client_id = format!("test-{}", uuid::Uuid::new_v4());
        Self::connect_as(url, token, &client_id, spaces).await
    }

    /// Like [`WsAgent::connect_url`], saying hello as `client_id`.
    pub async fn connect_as(
        url: &str,
        token: &str,
        client_id: &str,
        spaces: &[&str],
    ) -> anyhow::Result<WsAgent> {
        let mut socket = ws_connect(url, Some(token)).await?;
        let hello = AgentFrame::Hello {
            protocol: PROTOCOL_VERSION,
            client_id: client_id.to_owned(),
            spaces: spaces
                .iter()
                .map(|s| HeldSpace {
                    space: s.to_string(),
                    version: 0,
                    data_hash: None,
                })
                .collect(),
            agent_version: Some("test".into()),
            hostname: None,
        };
        socket
            .send(Message::Text(serde_json::to_string(&hello)?.into()))
            .await?;
        let mut agent = WsAgent {
            socket,
            welcome_heads: Vec::new(),
        };
        match agent.next_frame(Duration::from_secs(10)).await? {
            HubFrame::Welcome { heads, .. } => agent.welcome_heads = heads,
            other => bail!("expected welcome, got {other:?}"),
        }
        Ok(agent)
    }

    /// The next hub frame other than `ping`, within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> anyhow::Result<HubFrame> {
        let text = self.next_text(timeout).await?;
        serde_json::from_str(&text).with_context(|| format!("hub sent an unparsable frame: {text}"))
    }

    /// The text of the next hub frame other than `ping`, within `timeout` (for fields the
    /// typed frame does not keep).
    pub async fn next_text(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| anyhow!("no frame within {timeout:?}"))?
                .ok_or_else(|| anyhow!("socket closed"))??;
            match msg {
                Message::Text(t)
                    if serde_json::from_str::<HubFrame>(&t).ok() != Some(HubFrame::Ping) =>
                {
                    return Ok(t.to_string());
                }
                Message::Close(c) => bail!("socket closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// Waits for a `sync_required` and returns its head.
    pub async fn next_sync_required(&mut self, timeout: Duration) -> anyhow::Result<Head> {
        match self.next_frame(timeout).await? {
            HubFrame::SyncRequired(h) => Ok(h),
            other => bail!("expected sync_required, got {other:?}"),
        }
    }

    /// Reads until the socket closes; returns the close frame and any error frame seen.
    pub async fn until_closed(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(Option<CloseFrame>, Vec<HubFrame>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| anyhow!("socket still open after {timeout:?}"))?;
            match next {
                None | Some(Err(_)) => return Ok((None, frames)),
                Some(Ok(Message::Close(c))) => return Ok((c, frames)),
                Some(Ok(Message::Text(t))) => {
                    if let Ok(f) = serde_json::from_str::<HubFrame>(&t) {
                        frames.push(f);
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn send_text(&mut self, text: String) -> anyhow::Result<()> {
        self.socket.send(Message::Text(text.into())).await?;
        Ok(())
    }
}

/// Database backends the hub suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl TestHub {
    /// A hub on `backend` (PostgreSQL: a fresh database on the test cluster).
    pub async fn start_backend(backend: Backend) -> anyhow::Result<TestHub> {
        Self::start_with_backend_and(backend, |_| {}).await
    }

    /// Like [`TestHub::start_backend`], with the configuration adjusted by `configure`.
    pub async fn start_with_backend_and(
        backend: Backend,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<TestHub> {
        let url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(crate::postgres::test_database().await?),
        };
        Self::start_with(|c| {
            if url.is_some() {
                c.database_url = url;
            }
            configure(c);
        })
        .await
    }
}
