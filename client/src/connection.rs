//! The push channel: one WebSocket to a hub. Says `hello` with what each space holds, takes
//! the `welcome` heads and every `sync_required` (with the spread hint and manifest delta
//! beside it), answers `ping`, sends a `status` frame on every state change (download progress
//! at most once a second) and the outbox's sync reports as `report` frames (their `report_ack`
//! goes back to the outbox). A socket that receives nothing for three ping intervals is
//! dropped, however much the agent itself sends; reconnects back off exponentially with jitter
//! and rotate through the configured hubs. While the socket is up the head is still checked
//! over HTTP now and then (a cheap ETag check), so a replica that missed a bump is noticed.
//! While no socket is up, `connected` is false and the fallback check runs.

use crate::agent::{Agent, Timestamp};
use crate::backoff::Backoff;
use crate::error::{ClientError, Result};
use crate::hub_api::{HeadCheck, HubApi};
use crate::space::{Beside, HeadSource, Space};
use crate::state::is_progress_only;
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::{AgentFrame, AgentState, Head, HeldSpace, HubFrame, PROTOCOL_VERSION};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Progress-only status frames go out at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How a socket's life ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionEnd {
    /// It was welcomed and later closed or dropped: the backoff starts over.
    AfterWelcome,
    /// It closed before the hub said `welcome`.
    BeforeWelcome,
}

/// Keeps a socket up until the agent stops.
pub(crate) async fn run(agent: Arc<Agent>) {
    let max_backoff = Duration::from_millis(agent.config.max_backoff_ms);
    let mut backoff = Backoff::new(Duration::from_millis(250), max_backoff);
    loop {
        let position = agent.api.position();
        let url = agent.api.ws_url(&agent.config.ws_path);
        let outcome = tokio::select! {
            r = session(&agent, &url) => r,
            _ = agent.stopped() => { agent.connected.send_replace(false); return; }
        };
        agent.connected.send_replace(false);
        match outcome {
            Ok(SessionEnd::AfterWelcome) => {
                tracing::info!(hub = %url, "socket closed; reconnecting");
                backoff.reset();
            }
            Ok(SessionEnd::BeforeWelcome) => {
                tracing::debug!(hub = %url, "socket closed before welcome")
            }
            Err(e) => tracing::debug!(hub = %url, error = %e, "socket failed"),
        }
        agent.api.rotate_from(position);
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = agent.stopped() => return,
        }
    }
}

/// Offers heads from the hub to the spaces this agent holds.
fn offer(agent: &Agent, heads: Vec<Head>, source: HeadSource) {
    for head in heads {
        if let Some(space) = agent.held_space(&head.space) {
            space.offer_head(head, source);
        }
    }
}

/// What this agent holds, for `hello`.
fn hello(agent: &Agent) -> AgentFrame {
    AgentFrame::Hello {
        protocol: PROTOCOL_VERSION,
        client_id: agent.client_id.clone(),
        spaces: agent
            .spaces
            .iter()
            .map(|s| {
                let held = s.held();
                HeldSpace {
                    space: s.name.clone(),
                    version: held.as_ref().map_or(0, |h| h.version),
                    data_hash: held.map(|h| h.data_hash),
                }
            })
            .collect(),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        hostname: agent.hostname.clone(),
    }
}

/// Connects, says `hello` and waits for `welcome`; `None` when the socket closed first.
async fn connect(agent: &Agent, url: &str) -> Result<Option<(Ws, Duration)>> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ClientError::Config(format!("websocket URL {url:?}: {e}")))?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", agent.api.token())
            .parse()
            .map_err(|_| {
                ClientError::Config("token has characters a header cannot carry".into())
            })?,
    );
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            false,
            agent.api.tls().map(tokio_tungstenite::Connector::Rustls),
        ),
    )
    .await
    .map_err(|_| ClientError::Unreachable(format!("{url}: connect timed out")))?
    .map_err(|e| ClientError::Unreachable(format!("{url}: {e}")))?;
    send(&mut ws, &hello(agent)).await?;

    let welcome = tokio::time::timeout(Duration::from_secs(10), next_frame(&mut ws))
        .await
        .map_err(|_| ClientError::Unreachable("no welcome within 10 s".into()))??;
    match welcome.map(|(frame, _)| frame) {
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
            offer(agent, heads, HeadSource::Welcome);
            Ok(Some((ws, Duration::from_millis(ping_interval_ms.max(100)))))
        }
        Some(HubFrame::Error { code, message }) => Err(ClientError::Protocol(format!(
            "hub refused hello: {code}: {message}"
        ))),
        Some(other) => Err(ClientError::Protocol(format!(
            "expected welcome, got {other:?}"
        ))),
        None => Ok(None),
    }
}

/// One socket's life.
async fn session(agent: &Agent, url: &str) -> Result<SessionEnd> {
    let Some((mut ws, ping_interval)) = connect(agent, url).await? else {
        return Ok(SessionEnd::BeforeWelcome);
    };
    agent.connected.send_replace(true);
    // Reports go on this socket while it lives; dropping this hands them back to HTTP.
    let mut reports = agent.reporter.outbox().attach_socket();

    // Every state change of every space becomes a status frame (the first item of each
    // stream is the current state).
    let mut states = futures::stream::select_all(agent.spaces.iter().map(|s| {
        let name = s.name.clone();
        WatchStream::new(s.state.subscribe()).map(move |state| AgentFrame::Status {
            space: name.clone(),
            state,
        })
    }));
    let _head_checks = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(head_checks(
        agent.api.clone(),
        agent.spaces.clone(),
        Duration::from_millis(agent.config.head_check_interval_ms.max(100)),
        agent.last_head_check.clone(),
    )));
    // Silence is counted from the last frame received: the status frames this agent sends
    // while downloading must not keep a dead socket alive.
    let dead_after = ping_interval * 3;
    let mut last_received = Instant::now();
    let mut last_sent: Vec<LastSent> = Vec::new();
    loop {
        tokio::select! {
            frame = tokio::time::timeout_at(last_received + dead_after, next_frame(&mut ws)) => {
                let frame = match frame {
                    Err(_) => {
                        tracing::warn!(hub = %url, "socket silent for 3 ping intervals; dropping it");
                        return Ok(SessionEnd::AfterWelcome);
                    }
                    Ok(Err(e)) => {
                        tracing::info!(hub = %url, error = %e, "socket error");
                        return Ok(SessionEnd::AfterWelcome);
                    }
                    Ok(Ok(None)) => return Ok(SessionEnd::AfterWelcome),
                    Ok(Ok(Some(f))) => f,
                };
                last_received = Instant::now();
                let (frame, beside) = frame;
                match frame {
                    HubFrame::SyncRequired(head) => {
                        tracing::info!(space = %head.space, version = head.version, forced = head.forced,
                            spread_ms = beside.spread.spread_ms,
                            delta_from = beside.delta.as_ref().map(|d| d.from_version),
                            "sync required");
                        if let Some(space) = agent.held_space(&head.space) {
                            space.note_announcement(head.version, beside);
                        }
                        offer(agent, vec![head], HeadSource::Push);
                    }
                    HubFrame::Ping => send(&mut ws, &AgentFrame::Pong).await?,
                    HubFrame::ReportAck { report_id } => {
                        agent.reporter.outbox().acked_on_socket(&report_id);
                    }
                    HubFrame::Welcome { heads, .. } => offer(agent, heads, HeadSource::Welcome),
                    HubFrame::Error { code, message } => {
                        tracing::warn!(%code, %message, "hub error frame");
                    }
                }
            }
            Some(status) = states.next() => {
                if throttled(&mut last_sent, &status, Instant::now()) {
                    continue;
                }
                send(&mut ws, &status).await?
            }
            Some(report) = reports.next() => {
                tracing::debug!(report_id = %report.report_id, "report sent on the socket");
                send(&mut ws, &AgentFrame::Report(report)).await?
            }
        }
    }
}

/// The last status frame sent for a space.
struct LastSent {
    space: String,
    state: AgentState,
    at: Instant,
}

/// Whether a status frame is only download progress sent less than [`PROGRESS_EVERY`] after
/// the previous frame of its space (then it is skipped; the next state change goes out at once).
fn throttled(last_sent: &mut Vec<LastSent>, frame: &AgentFrame, now: Instant) -> bool {
    let AgentFrame::Status { space, state } = frame else {
        return false;
    };
    match last_sent.iter_mut().find(|l| l.space == *space) {
        Some(last) => {
            if is_progress_only(&last.state, state) && now.duration_since(last.at) < PROGRESS_EVERY
            {
                return true;
            }
            last.state = state.clone();
            last.at = now;
        }
        None => last_sent.push(LastSent {
            space: space.clone(),
            state: state.clone(),
            at: now,
        }),
    }
    false
}

/// While the socket is up: checks every space's head over HTTP each `every`, conditional on
/// the last ETag, and offers what changed. A replica that missed a bump then still cannot
/// leave this agent behind for long.
async fn head_checks(
    api: HubApi,
    spaces: Vec<Arc<Space>>,
    every: Duration,
    last_ok: watch::Sender<Option<Timestamp>>,
) {
    let mut etags: Vec<Option<String>> = vec![None; spaces.len()];
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
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

/// The next hub frame, with what a `sync_required` carries beside its head; `None` when the
/// socket closed. Control frames are handled here.
async fn next_frame(ws: &mut Ws) -> Result<Option<(HubFrame, Beside)>> {
    loop {
        let msg = match ws.next().await {
            None => return Ok(None),
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return read_error(e).map(|f| f.map(|f| (f, Beside::default()))),
        };
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(_) => return Ok(None),
            // tungstenite answers pings itself; any frame proves the socket alive.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        match serde_json::from_str::<HubFrame>(&text) {
            // The spread hint and the manifest delta ride beside the head in `sync_required`
            // only.
            Ok(f @ HubFrame::SyncRequired(_)) => return Ok(Some((f, Beside::of_frame(&text)))),
            Ok(f) => return Ok(Some((f, Beside::default()))),
            Err(e) => tracing::warn!(error = %e, "ignoring a frame this agent does not know"),
        }
    }
}

/// What a failed read means: the socket closed, the connection broke (reset, I/O), or the hub
/// broke the protocol (a frame too large, not UTF-8, a malformed frame).
fn read_error(e: WsError) -> Result<Option<HubFrame>> {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => Ok(None),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Err(ClientError::Unreachable(e.to_string()))
        }
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_) => Err(
            ClientError::Protocol(format!("the hub sent a frame this agent refuses: {e}")),
        ),
        e => Err(ClientError::Unreachable(e.to_string())),
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
    fn read_errors_are_told_apart_by_kind() {
        use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
        assert!(matches!(read_error(WsError::ConnectionClosed), Ok(None)));
        let too_large = WsError::Capacity(CapacityError::MessageTooLong {
            size: 10,
            max_size: 5,
        });
        assert!(matches!(
            read_error(too_large),
            Err(ClientError::Protocol(_))
        ));
        assert!(matches!(
            read_error(WsError::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )),
            Err(ClientError::Unreachable(_))
        ));
        assert!(matches!(
            read_error(WsError::Protocol(ProtocolError::NonZeroReservedBits)),
            Err(ClientError::Protocol(_))
        ));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            read_error(WsError::Io(reset)),
            Err(ClientError::Unreachable(_))
        ));
    }

    #[test]
    fn progress_frames_go_out_once_a_second_and_other_changes_at_once() {
        let start = Instant::now();
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
