//! The socket task: one per connected agent, at `GET /api/v1/ws`.
//!
//! After the agent's `hello` the hub registers the socket with the fan-out in
//! [`crate::broadcast`] with its connection's raw side (see [`crate::shared_io`]), answers
//! `welcome` with the current heads, then waits on four things: a frame from the agent
//! (`status`, `report`, `pong`), the ping timer, the end of the connection, and a wake-up from
//! the fan-out. A bump is written to the
//! socket by the fan-out itself, without waking this task; only when that write cannot finish
//! at once (the kernel buffer is full, or this task is writing) does the fan-out wake the task
//! to send it. Buffers are set small and explicitly so that an idle socket costs a few KiB.

use crate::auth::Principal;
use crate::broadcast::{FanoutSocket, Heads, Sent, SocketSink};
use crate::clients::Connection;
use crate::shared_io::RawConnection;
use crate::state::AppState;
use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, SplitStream};
use futures::{SinkExt, StreamExt};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synchub_protocol::{AgentFrame, HeldSpace, HubFrame, PROTOCOL_VERSION, codes, validate_space};

/// See [`upgrade`]: how far past `limits.max_frame_bytes` a message is still read to answer it.
const HARD_LIMIT_FACTOR: usize = 16;

/// How long an agent has to say `hello` after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sending and receiving frames: on the whole socket before `hello`, on [`Split`] after.
trait Frames {
    fn send(&mut self, msg: Message) -> impl Future<Output = Result<(), axum::Error>> + Send;
    fn recv(&mut self) -> impl Future<Output = Option<Result<Message, axum::Error>>> + Send;
}

impl Frames for WebSocket {
    fn send(&mut self, msg: Message) -> impl Future<Output = Result<(), axum::Error>> + Send {
        WebSocket::send(self, msg)
    }

    fn recv(&mut self) -> impl Future<Output = Option<Result<Message, axum::Error>>> + Send {
        WebSocket::recv(self)
    }
}

/// A socket after `hello`: both halves here, the write half parked with the fan-out between
/// this task's own writes.
struct Split<'a> {
    stream: SplitStream<WebSocket>,
    sink: SocketSink,
    fan: &'a FanoutSocket,
    heads: &'a Heads,
    fanout_seconds: &'a metrics::Histogram,
}

impl Split<'_> {
    /// Writes the heads the fan-out could not, then `msg` if any, and flushes.
    async fn write(&mut self, msg: Option<Message>) -> Result<(), axum::Error> {
        let closing = matches!(msg, Some(Message::Close(_)));
        let snapshot = self.heads.snapshot();
        let frames = self.fan.take(&snapshot);
        let sink = &mut self.sink;
        let written = async {
            for p in &frames {
                sink.feed(Message::Text(p.frame.clone())).await?;
                self.fanout_seconds.record(p.since.elapsed().as_secs_f64());
            }
            if let Some(msg) = msg {
                sink.feed(msg).await?;
            }
            sink.flush().await
        }
        .await;
        // After a close nothing more may go out, nor after a failed write.
        if !closing && written.is_ok() {
            self.fan.park();
        }
        written
    }
}

impl Frames for Split<'_> {
    fn send(&mut self, msg: Message) -> impl Future<Output = Result<(), axum::Error>> + Send {
        self.write(Some(msg))
    }

    fn recv(&mut self) -> impl Future<Output = Option<Result<Message, axum::Error>>> + Send {
        self.stream.next()
    }
}

pub async fn upgrade(
    State(state): State<AppState>,
    principal: Principal,
    Extension(raw): Extension<RawConnection>,
    ws: WebSocketUpgrade,
) -> Response {
    let limits = &state.config.limits;
    let cap = limits.max_sockets_per_token;
    let Some(slot) = state.clients.reserve_socket(principal.token_id, cap) else {
        let msg = format!(
            "token {:?} has {cap} sockets open already (limits.max_sockets_per_token); \
             give each PC its own token",
            principal.name
        );
        tracing::info!(
            token = principal.name,
            cap,
            "socket refused: token at its cap"
        );
        return crate::error::HubError::RateLimited(msg).into_response();
    };
    // Messages up to HARD_LIMIT_FACTOR times the limit are read whole and then refused with an
    // error frame and a clean close; beyond that tungstenite drops the connection mid-message.
    let hard_limit = limits.max_frame_bytes.saturating_mul(HARD_LIMIT_FACTOR);
    ws.read_buffer_size(limits.ws_buffer_bytes)
        .write_buffer_size(limits.ws_buffer_bytes)
        .max_write_buffer_size(limits.max_frame_bytes.max(1 << 20))
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| async move {
            run(state, principal, socket, raw).await;
            drop(slot);
        })
}

fn frame(f: &HubFrame) -> Message {
    Message::Text(serde_json::to_string(f).expect("frames serialize").into())
}

fn error_frame(code: &str, message: impl Into<String>) -> Message {
    frame(&HubFrame::Error {
        code: code.into(),
        message: message.into(),
    })
}

/// Sends an `error` frame, then a close with `close_code`; the agent is done for.
async fn refuse(socket: &mut impl Frames, code: &str, message: String, close: u16) {
    tracing::debug!(code, message, "closing socket");
    let _ = socket.send(error_frame(code, message.clone())).await;
    let reason: String = message.chars().take(100).collect();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: close,
            reason: reason.into(),
        })))
        .await;
    drain(socket).await;
}

/// Reads what the agent still sends for a moment before the socket is dropped: closing a TCP
/// socket with unread bytes sends a reset, which would discard our error and close frames
/// before the agent reads them.
async fn drain(socket: &mut impl Frames) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(next)) = tokio::time::timeout_at(deadline, socket.recv()).await {
        match next {
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tracing::instrument(name = "socket", skip_all, fields(token = %principal.name))]
async fn run(state: AppState, principal: Principal, mut socket: WebSocket, raw: RawConnection) {
    let Some((client_id, spaces, hostname, agent_version)) =
        receive_hello(&state, &principal, &mut socket).await
    else {
        return;
    };
    let conn = Arc::new(Connection {
        client_id,
        token_id: principal.token_id,
        token_name: principal.name.clone(),
        hostname,
        agent_version,
        connected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        states: Default::default(),
        recorded: Default::default(),
        closed: state.shutdown.child_token(),
    });
    let id = state.clients.add(conn.clone());
    bind_client_early(&state, &principal, &conn.client_id);
    // Registered first, then checked: a reload after this line closes the socket through
    // `clients`, one before it (while the agent had not said hello) is seen here.
    if !state.tokens.is_current(&principal) {
        let msg = "token revoked or changed".to_owned();
        refuse(&mut socket, codes::UNAUTHORIZED, msg, close_code::POLICY).await;
        state.clients.remove(id);
        return;
    }
    serve(&state, &principal, &conn, spaces, socket, raw).await;
    state.clients.remove(id);
}

/// Binds the hello's client id to the socket's token now, out of the rush after a bump, so the
/// reports that follow need no query for it (see [`crate::reports::require_own_client`]). A
/// refusal here changes nothing: the same check refuses the id's reports.
fn bind_client_early(state: &AppState, principal: &Principal, client_id: &str) {
    if state.client_owners.contains_key(client_id) {
        return;
    }
    let (state, principal, client_id) = (state.clone(), principal.clone(), client_id.to_owned());
    tokio::spawn(async move {
        if let Err(e) = crate::reports::require_own_client(&state, &principal, &client_id).await {
            tracing::debug!(client = client_id, error = %e, "client id not bound at hello");
        }
    });
}

/// The first frame, a text within the frame limit read within the hello deadline; otherwise
/// the socket is refused (or was closed) and there is none.
async fn first_text_frame(state: &AppState, socket: &mut WebSocket) -> Option<Utf8Bytes> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await;
    match first {
        Ok(Some(Ok(Message::Text(text)))) if text.len() > state.config.limits.max_frame_bytes => {
            let msg = format!("hello of {} bytes is over the frame limit", text.len());
            refuse(socket, codes::FRAME_TOO_LARGE, msg, close_code::SIZE).await;
            None
        }
        Ok(Some(Ok(Message::Text(text)))) => Some(text),
        Ok(Some(Ok(_))) => {
            let msg = "the first frame must be a JSON text `hello`".to_owned();
            refuse(socket, codes::MALFORMED_FRAME, msg, close_code::POLICY).await;
            None
        }
        Ok(Some(Err(e))) => {
            refuse_read_error(socket, e).await;
            None
        }
        Ok(None) => None,
        Err(_) => {
            let msg = "no hello within 10 s".to_owned();
            refuse(socket, codes::MALFORMED_FRAME, msg, close_code::POLICY).await;
            None
        }
    }
}

async fn receive_hello(
    state: &AppState,
    principal: &Principal,
    socket: &mut WebSocket,
) -> Option<(String, Vec<HeldSpace>, Option<String>, Option<String>)> {
    let text = first_text_frame(state, socket).await?;
    // Every field of a hello is bounded (see `synchub_protocol::bounds`).
    let hello = serde_json::from_str::<AgentFrame>(&text).and_then(|mut f| {
        f.check_bounds().map_err(serde::de::Error::custom)?;
        Ok(f)
    });
    let (protocol, client_id, spaces, hostname, agent_version) = match hello {
        Ok(AgentFrame::Hello {
            protocol,
            client_id,
            spaces,
            hostname,
            agent_version,
        }) => (protocol, client_id, spaces, hostname, agent_version),
        Ok(_) => {
            let msg = "the first frame must be `hello`".to_owned();
            refuse(socket, codes::MALFORMED_FRAME, msg, close_code::POLICY).await;
            return None;
        }
        Err(e) => {
            let msg = format!("malformed hello: {e}");
            refuse(socket, codes::MALFORMED_FRAME, msg, close_code::POLICY).await;
            return None;
        }
    };
    if protocol != PROTOCOL_VERSION {
        let msg =
            format!("protocol {protocol} is not supported; this hub speaks {PROTOCOL_VERSION}");
        refuse(socket, codes::BAD_REQUEST, msg, close_code::PROTOCOL).await;
        return None;
    }
    match followed_spaces(state, principal, spaces) {
        Ok(spaces) => Some((client_id, spaces, hostname, agent_version)),
        Err((code, msg)) => {
            refuse(socket, code, msg, close_code::POLICY).await;
            None
        }
    }
}

/// The spaces a `hello` asks to follow (none: every space the token may read), each checked:
/// well-formed, allowed to the token and served with data; otherwise the code and message the
/// socket is refused with.
fn followed_spaces(
    state: &AppState,
    principal: &Principal,
    mut spaces: Vec<HeldSpace>,
) -> Result<Vec<HeldSpace>, (&'static str, String)> {
    if spaces.is_empty() {
        spaces = state
            .heads
            .snapshot()
            .keys()
            .filter(|s| principal.may_use_space(s))
            .map(|s| HeldSpace {
                space: s.clone(),
                version: 0,
                data_hash: None,
            })
            .collect();
    }
    for held in &spaces {
        validate_space(&held.space).map_err(|e| (codes::BAD_REQUEST, e.to_string()))?;
        if !principal.may_use_space(&held.space) {
            let msg = format!("token may not use space {:?}", held.space);
            return Err((codes::FORBIDDEN, msg));
        }
        if state.heads.get(&held.space).is_none() {
            if state.config.spaces.contains(&held.space) {
                // Adopted without data: the agent stays blocked and says why.
                let msg = format!("the hub has no data for space {:?} yet", held.space);
                return Err((codes::NO_DATA, msg));
            }
            return Err((codes::NOT_FOUND, format!("no space named {:?}", held.space)));
        }
    }
    Ok(spaces)
}

async fn refuse_read_error(socket: &mut impl Frames, e: axum::Error) {
    let e = e.into_inner();
    if let Some(tungstenite::Error::Capacity(_)) = e.downcast_ref::<tungstenite::Error>() {
        let msg = "frame larger than the hub's limit".to_owned();
        refuse(socket, codes::FRAME_TOO_LARGE, msg, close_code::SIZE).await;
    } else {
        tracing::debug!(error = %e, "socket read failed");
    }
}

/// The heads the welcome frame carries for the spaces the agent holds, each space once, and
/// the list the fan-out compares later broadcasts against (a Vec: an agent follows one space
/// or a few).
fn first_heads(
    held: &[HeldSpace],
    snapshot: &crate::broadcast::Snapshot,
) -> (Vec<Sent>, Vec<synchub_protocol::Head>) {
    let mut sent: Vec<Sent> = Vec::with_capacity(held.len());
    let mut heads = Vec::with_capacity(held.len());
    for p in held.iter().filter_map(|h| snapshot.get(&h.space)) {
        if !sent.iter().any(|s| s.key == p.key) {
            sent.push(Sent::of(p));
            heads.push(p.head.clone());
        }
    }
    (sent, heads)
}

async fn serve(
    state: &AppState,
    principal: &Principal,
    conn: &Connection,
    held: Vec<HeldSpace>,
    socket: WebSocket,
    raw: RawConnection,
) {
    // Registered before the heads are read: a bump after the read reaches this socket, by the
    // fan-out or, while the write half is not parked yet (until the welcome is out), by waking
    // this task.
    let mut registration = state.heads.register(raw);
    let snapshot = state.heads.snapshot();
    let (sent, heads) = first_heads(&held, &snapshot);
    let followed: Vec<(String, u64)> = heads.iter().map(|h| (h.space.clone(), h.version)).collect();
    let welcome = HubFrame::Welcome {
        protocol: PROTOCOL_VERSION,
        hub_id: state.hub_id.clone(),
        heads,
        ping_interval_ms: state.config.ping_interval_ms,
    };
    let (sink, stream) = socket.split();
    registration.attach(sent, followed.iter().map(|(space, _)| space.as_str()));
    // Registered once per socket, not looked up in the recorder on every send of a broadcast.
    let fanout_seconds = metrics::histogram!("synchub_fanout_seconds");
    let mut socket = Split {
        stream,
        sink,
        fan: &registration.socket,
        heads: &state.heads,
        fanout_seconds: &fanout_seconds,
    };
    if socket.send(frame(&welcome)).await.is_err() {
        return;
    }
    pump(state, principal, conn, &followed, &mut socket).await;
}

/// Reports of one socket waiting for their batch to be stored at once. Past this the socket is
/// not read until one is stored (an agent has at most 32 waiting for their acknowledgement).
const REPORTS_IN_FLIGHT: usize = 32;

/// A socket's reports being stored, each resolving to the frame that answers it. They are not
/// awaited in the socket's loop: while the database is slow or down, the socket still gets its
/// bumps and pings. Made at the first report, so an idle socket carries none of it.
#[derive(Default)]
struct Storing<'a>(Option<FuturesUnordered<BoxFuture<'a, Message>>>);

impl<'a> Storing<'a> {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesUnordered::len)
    }

    fn push(&mut self, report: BoxFuture<'a, Message>) {
        self.0
            .get_or_insert_with(FuturesUnordered::new)
            .push(report);
    }

    /// The next answer; pending for ever while none is being stored.
    async fn next(&mut self) -> Option<Message> {
        match &mut self.0 {
            Some(storing) => storing.next().await,
            None => std::future::pending().await,
        }
    }
}

/// Serves a welcomed socket until it must close: the bumps the fan-out left to its task,
/// frames from the agent, the answers to its reports, pings (and the close of a silent agent),
/// and the close when its token is revoked or the hub stops.
async fn pump(
    state: &AppState,
    principal: &Principal,
    conn: &Connection,
    followed: &[(String, u64)],
    socket: &mut Split<'_>,
) {
    let ping_every = Duration::from_millis(state.config.ping_interval_ms);
    let ping = Utf8Bytes::from(serde_json::to_string(&HubFrame::Ping).expect("frames serialize"));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    // Made once, not on every turn of the loop: re-registering 10,000 waiters on shared
    // cancellation tokens after every broadcast showed in profiles.
    let closed = conn.closed.cancelled();
    tokio::pin!(closed);
    let mut storing = Storing::default();
    loop {
        tokio::select! {
            () = socket.fan.woken() => {
                if socket.write(None).await.is_err() {
                    return;
                }
            }
            msg = socket.recv(), if storing.len() < REPORTS_IN_FLIGHT => {
                let heard = Heard { state, principal, conn, followed };
                // Boxed: handling a frame is rare next to waiting, and its future is large.
                let received = Box::pin(receive(&heard, msg, &mut last_heard, socket, &mut storing));
                if !received.await {
                    return;
                }
            }
            Some(reply) = storing.next(), if storing.len() > 0 => {
                if socket.send(reply).await.is_err() {
                    return;
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > ping_every * 3 {
                    tracing::info!(client = %conn.client_id, "no frame for three ping intervals; closing");
                    return;
                }
                if socket.send(Message::Text(ping.clone())).await.is_err() {
                    return;
                }
            }
            _ = &mut closed => {
                close_ended(state, socket).await;
                return;
            }
        }
    }
}

/// Who a socket's frames come from: what handling them needs.
struct Heard<'a> {
    state: &'a AppState,
    principal: &'a Principal,
    conn: &'a Connection,
    followed: &'a [(String, u64)],
}

/// Handles one message read from the socket (a report joins `storing`); false when the socket
/// must close.
async fn receive<'a>(
    heard: &Heard<'a>,
    msg: Option<Result<Message, axum::Error>>,
    last_heard: &mut Instant,
    socket: &mut impl Frames,
    storing: &mut Storing<'a>,
) -> bool {
    let state = heard.state;
    match msg {
        Some(Ok(Message::Text(text))) if text.len() > state.config.limits.max_frame_bytes => {
            let msg = format!(
                "frame of {} bytes is over the limit of {}",
                text.len(),
                state.config.limits.max_frame_bytes
            );
            refuse(socket, codes::FRAME_TOO_LARGE, msg, close_code::SIZE).await;
            false
        }
        Some(Ok(Message::Text(text))) => {
            *last_heard = Instant::now();
            handle_frame(heard, &text, socket, storing).await
        }
        Some(Ok(Message::Binary(_))) => {
            let msg = "binary frames are not part of the protocol".to_owned();
            refuse(socket, codes::MALFORMED_FRAME, msg, close_code::POLICY).await;
            false
        }
        Some(Ok(Message::Close(_))) | None => false,
        Some(Ok(_)) => {
            *last_heard = Instant::now();
            true
        }
        Some(Err(e)) => {
            refuse_read_error(socket, e).await;
            false
        }
    }
}

/// Closes a socket whose connection was ended: "going away" on shutdown, a refusal when its
/// token was revoked.
async fn close_ended(state: &AppState, socket: &mut impl Frames) {
    if state.shutdown.is_cancelled() {
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: close_code::AWAY,
                reason: "hub shutting down".into(),
            })))
            .await;
    } else {
        let msg = "token revoked".to_owned();
        refuse(socket, codes::UNAUTHORIZED, msg, close_code::POLICY).await;
    }
}

/// Stores a sync report; the frame that answers it, with its id or the error.
async fn store_report(
    state: &AppState,
    principal: &Principal,
    report: synchub_protocol::SyncReport,
) -> Message {
    let via = crate::reports::Via::Socket;
    match crate::reports::store(state, principal, report, via).await {
        Ok((id, stored)) => {
            if stored == crate::reports::Stored::New {
                state.clients.touch();
            }
            frame(&HubFrame::ReportAck { report_id: id })
        }
        Err(e) => {
            let (code, message) = e.code_and_message();
            error_frame(code, message)
        }
    }
}

/// Handles one frame from the agent (a report joins `storing`); false when the socket must
/// close.
async fn handle_frame<'a>(
    heard: &Heard<'a>,
    text: &str,
    socket: &mut impl Frames,
    storing: &mut Storing<'a>,
) -> bool {
    let Heard {
        state,
        principal,
        conn,
        followed,
    } = *heard;
    let frame_in = match serde_json::from_str::<AgentFrame>(text) {
        Ok(mut f) => {
            if let Err(e) = f.check_bounds() {
                let _ = socket
                    .send(error_frame(codes::BAD_REQUEST, e.to_string()))
                    .await;
                return true;
            }
            f
        }
        Err(e) => {
            let msg = format!("malformed frame: {e}");
            refuse(socket, codes::MALFORMED_FRAME, msg, close_code::POLICY).await;
            return false;
        }
    };
    match frame_in {
        AgentFrame::Pong => true,
        AgentFrame::Status { space, state: s } => {
            if !followed.iter().any(|(s, _)| *s == space) {
                let msg = format!("status for space {space:?}, which this socket does not follow");
                let _ = socket.send(error_frame(codes::BAD_REQUEST, msg)).await;
                return true;
            }
            conn.set_state(&space, s);
            state.clients.touch();
            true
        }
        AgentFrame::Report(report) => {
            storing.push(Box::pin(store_report(state, principal, report)));
            true
        }
        AgentFrame::Hello { .. } => {
            let _ = socket
                .send(error_frame(
                    codes::BAD_REQUEST,
                    "hello was already received",
                ))
                .await;
            true
        }
    }
}
