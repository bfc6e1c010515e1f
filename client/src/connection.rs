//! The push channel: one WebSocket to a hub. Says `hello` with what each space holds, takes
//! the `welcome` heads and every `sync_required`, answers `ping`, and sends a `status` frame
//! on every state change (download progress at most once a second). A socket that receives
//! nothing for three ping intervals is dropped, however much the agent itself sends; reconnects
//! back off exponentially with jitter and rotate through the configured hubs. While the socket
//! is up the head is still checked over HTTP now and then (a cheap ETag check), so a replica
//! that missed a bump is noticed. While no socket is up, `connected` is false and the fallback
//! check runs.

use crate::backoff::Backoff;
use crate::error::{ClientError, Result};
use crate::hub_api::{HeadCheck, HubApi};
use crate::space::{HeadSource, SpaceShared};
use crate::state::is_progress_only;
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::{AgentFrame, AgentState, HeldSpace, HubFrame, PROTOCOL_VERSION};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Everything the connection task needs.
pub struct ConnectionContext {
    pub api: HubApi,
    pub ws_path: String,
    pub client_id: String,
    pub hostname: Option<String>,
    pub spaces: Vec<Arc<SpaceShared>>,
    pub max_backoff: Duration,
    /// True while a welcomed socket is up.
    pub connected: watch::Sender<bool>,
    /// How often the head is checked over HTTP while the socket is up.
    pub head_check_interval: Duration,
    /// Last time a head check answered (shared with the fallback, shown on `/status`).
    pub last_head_check: watch::Sender<Option<chrono::DateTime<chrono::Utc>>>,
}

/// Progress-only status frames go out at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Keeps a socket up until `stop` fires.
pub async fn run(ctx: Arc<ConnectionContext>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(250), ctx.max_backoff);
    loop {
        let position = ctx.api.position();
        let url = ctx.api.ws_url(&ctx.ws_path);
        let outcome = tokio::select! {
            r = session(&ctx, &url) => r,
            _ = stop.changed() => { ctx.connected.send_replace(false); return; }
        };
        ctx.connected.send_replace(false);
        match outcome {
            Ok(true) => {
                tracing::info!(hub = %url, "socket closed; reconnecting");
                backoff.reset();
            }
            Ok(false) => tracing::debug!(hub = %url, "socket closed before welcome"),
            Err(e) => tracing::debug!(hub = %url, error = %e, "socket failed"),
        }
        ctx.api.rotate_from(position);
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One socket's life. `Ok(true)` when it was welcomed (then the backoff restarts).
async fn session(ctx: &ConnectionContext, url: &str) -> Result<bool> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ClientError::Config(format!("websocket URL {url:?}: {e}")))?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", ctx.api.token()).parse().map_err(|_| {
            ClientError::Config("token has characters a header cannot carry".into())
        })?,
    );
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            false,
            ctx.api.tls().map(tokio_tungstenite::Connector::Rustls),
        ),
    )
    .await
    .map_err(|_| ClientError::Unreachable(format!("{url}: connect timed out")))?
    .map_err(|e| ClientError::Unreachable(format!("{url}: {e}")))?;

    let hello = AgentFrame::Hello {
        protocol: PROTOCOL_VERSION,
        client_id: ctx.client_id.clone(),
        spaces: ctx
            .spaces
            .iter()
            .map(|s| {
                let held = s.held();
                HeldSpace {
                    space: s.name.clone(),
                    version: held.as_ref().map_or(0, |h| h.0),
                    data_hash: held.map(|h| h.1),
                }
            })
            .collect(),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        hostname: ctx.hostname.clone(),
    };
    send(&mut ws, &hello).await?;

    let welcome = tokio::time::timeout(Duration::from_secs(10), next_frame(&mut ws))
        .await
        .map_err(|_| ClientError::Unreachable("no welcome within 10 s".into()))??;
    let ping_interval = match welcome {
        Some(HubFrame::Welcome {
            protocol,
            heads,
            ping_interval_ms,
            hub_id,
        }) => {
            if protocol != PROTOCOL_VERSION {
                tracing::warn!(protocol, "hub speaks another protocol version");
            }
            tracing::info!(hub = %url, hub_id, "connected");
            for head in heads {
                if let Some(space) = ctx.spaces.iter().find(|s| s.name == head.space) {
                    space.offer_head(head, HeadSource::Welcome);
                }
            }
            Duration::from_millis(ping_interval_ms.max(100))
        }
        Some(HubFrame::Error { code, message }) => {
            return Err(ClientError::Protocol(format!(
                "hub refused hello: {code}: {message}"
            )));
        }
        Some(other) => {
            return Err(ClientError::Protocol(format!(
                "expected welcome, got {other:?}"
            )));
        }
        None => return Ok(false),
    };
    ctx.connected.send_replace(true);

    // Every state change of every space becomes a status frame (the first item of each
    // stream is the current state).
    let mut states = futures::stream::select_all(ctx.spaces.iter().map(|s| {
        let name = s.name.clone();
        WatchStream::new(s.state.subscribe()).map(move |state| AgentFrame::Status {
            space: name.clone(),
            state,
        })
    }));
    let _head_checks = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(head_checks(
        ctx.api.clone(),
        ctx.spaces.clone(),
        ctx.head_check_interval,
        ctx.last_head_check.clone(),
    )));
    // Silence is counted from the last frame received: the status frames this agent sends
    // while downloading must not keep a dead socket alive.
    let dead_after = ping_interval * 3;
    let mut last_received = tokio::time::Instant::now();
    let mut last_sent: Vec<(String, AgentState, tokio::time::Instant)> = Vec::new();
    loop {
        tokio::select! {
            frame = tokio::time::timeout_at(last_received + dead_after, next_frame(&mut ws)) => {
                let frame = match frame {
                    Err(_) => {
                        tracing::warn!(hub = %url, "socket silent for 3 ping intervals; dropping it");
                        return Ok(true);
                    }
                    Ok(Err(e)) => { tracing::info!(hub = %url, error = %e, "socket error"); return Ok(true); }
                    Ok(Ok(None)) => return Ok(true),
                    Ok(Ok(Some(f))) => f,
                };
                last_received = tokio::time::Instant::now();
                match frame {
                    HubFrame::SyncRequired(head) => {
                        if let Some(space) = ctx.spaces.iter().find(|s| s.name == head.space) {
                            tracing::info!(space = %head.space, version = head.version, forced = head.forced, "sync required");
                            space.offer_head(head, HeadSource::Push);
                        }
                    }
                    HubFrame::Ping => send(&mut ws, &AgentFrame::Pong).await?,
                    HubFrame::ReportAck { .. } => {}
                    HubFrame::Welcome { heads, .. } => {
                        for head in heads {
                            if let Some(space) = ctx.spaces.iter().find(|s| s.name == head.space) {
                                space.offer_head(head, HeadSource::Welcome);
                            }
                        }
                    }
                    HubFrame::Error { code, message } => {
                        tracing::warn!(%code, %message, "hub error frame");
                    }
                }
            }
            Some(status) = states.next() => {
                if throttled(&mut last_sent, &status, tokio::time::Instant::now()) {
                    continue;
                }
                send(&mut ws, &status).await?
            }
        }
    }
}

/// Whether a status frame is only download progress sent less than [`PROGRESS_EVERY`] after
/// the previous frame of its space (then it is skipped; the next state change goes out at once).
fn throttled(
    last_sent: &mut Vec<(String, AgentState, tokio::time::Instant)>,
    frame: &AgentFrame,
    now: tokio::time::Instant,
) -> bool {
    let AgentFrame::Status { space, state } = frame else {
        return false;
    };
    match last_sent.iter_mut().find(|(s, _, _)| s == space) {
        Some((_, last, at)) => {
            if is_progress_only(last, state) && now.duration_since(*at) < PROGRESS_EVERY {
                return true;
            }
            *last = state.clone();
            *at = now;
        }
        None => last_sent.push((space.clone(), state.clone(), now)),
    }
    false
}

/// While the socket is up: checks every space's head over HTTP each `every`, conditional on
/// the last ETag, and offers what changed. A replica that missed a bump then still cannot
/// leave this agent behind for long.
async fn head_checks(
    api: HubApi,
    spaces: Vec<Arc<SpaceShared>>,
    every: Duration,
    last_ok: watch::Sender<Option<chrono::DateTime<chrono::Utc>>>,
) {
    let mut etags: Vec<Option<String>> = vec![None; spaces.len()];
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (space, etag) in spaces.iter().zip(etags.iter_mut()) {
            match api.head(&space.name, etag.as_deref()).await {
                Ok(HeadCheck::NotModified) => {
                    last_ok.send_replace(Some(chrono::Utc::now()));
                }
                Ok(HeadCheck::Head { head, etag: tag }) => {
                    last_ok.send_replace(Some(chrono::Utc::now()));
                    *etag = tag;
                    space.offer_head(head, HeadSource::Poll);
                }
                Err(e) => {
                    tracing::debug!(space = %space.name, error = %e, "head check beside the socket failed");
                    *etag = None;
                }
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Ws, frame: &AgentFrame) -> Result<()> {
    let text = serde_json::to_string(frame).expect("frame serializes");
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| ClientError::Unreachable(format!("sending: {e}")))
}

/// The next hub frame; `None` when the socket closed. Control frames are handled here.
async fn next_frame(ws: &mut Ws) -> Result<Option<HubFrame>> {
    loop {
        let Some(msg) = ws.next().await else {
            return Ok(None);
        };
        let msg = msg.map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(_) => return Ok(None),
            // tungstenite answers pings itself; any frame proves the socket alive.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        match serde_json::from_str::<HubFrame>(&text) {
            Ok(f) => return Ok(Some(f)),
            Err(e) => tracing::warn!(error = %e, "ignoring a frame this agent does not know"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn downloading(bytes_done: u64) -> AgentFrame {
        AgentFrame::Status {
            space: "s".into(),
            state: AgentState::Downloading {
                version: 1,
                target: 2,
                files_done: 0,
                files_total: 1,
                bytes_done,
                bytes_total: 100,
                bytes_per_sec: 0,
            },
        }
    }

    #[test]
    fn progress_frames_go_out_once_a_second_and_other_changes_at_once() {
        let start = tokio::time::Instant::now();
        let mut last = Vec::new();
        assert!(!throttled(&mut last, &downloading(1), start));
        let mut sent = 0;
        let mut now = start;
        for i in 0..20 {
            now += Duration::from_millis(250);
            if !throttled(&mut last, &downloading(2 + i), now) {
                sent += 1;
            }
        }
        assert!((4..=6).contains(&sent), "{sent} progress frames in 5 s");
        let verifying = AgentFrame::Status {
            space: "s".into(),
            state: AgentState::Verifying {
                version: 1,
                target: 2,
            },
        };
        assert!(!throttled(&mut last, &verifying, now));
    }
}
