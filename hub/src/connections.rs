//! Accepting HTTP connections: the hub's own accept loop instead of `axum::serve`, for what
//! that one lacks against hostile clients.
//!
//! - A header-read deadline (`limits.header_read_timeout_ms`): a connection that has not sent
//!   a whole request head within it is closed, whether it sends nothing (an idle keep-alive
//!   socket included) or sends headers a byte at a time (slowloris).
//! - A cap on connections per client address that have not yet made an authenticated request
//!   (`limits.max_unauthenticated_per_address`): one address cannot hold thousands of sockets
//!   open without a token. A connection stops counting once a request on it authenticates
//!   (see [`ConnectionAuth`]), so a whole office behind one NAT address is not limited. A
//!   connection over the cap is answered `503 busy` with `Retry-After` and closed (a bare close
//!   with TLS, or when many refusals are in flight already), and the refusal is logged at
//!   warn, at most once per [`REFUSAL_LOG_EVERY`].
//! - A send deadline (`limits.send_idle_timeout_ms`): a connection whose client stops taking
//!   what the hub writes (a pack it requested and no longer reads, a socket that never drains)
//!   is closed once a write has waited that long, so its download slot is given back.
//!
//! With TLS configured the handshake happens in the connection's task, under the same
//! header-read deadline.
//!
//! Each connection's task stops on shutdown after its request in flight (WebSockets are closed
//! by their own tasks, which watch the same shutdown).

use crate::shared_io::{SharedIo, Stream};
use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// What the accept loop enforces (from [`crate::config::Limits`]).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    /// 0: no cap.
    pub max_unauthenticated_per_address: usize,
    /// A write that cannot proceed for this long ends the connection.
    pub send_idle_timeout: Duration,
}

/// Refused connections answered with a 503 at once; more are closed without an answer.
const MAX_ANSWERED_REFUSALS: usize = 64;
/// How long a refused connection has to send its request head before the 503 goes out.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);
/// Refusals are logged at most this often (with how many there were since).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connections per address that have not authenticated yet.
#[derive(Default)]
struct Unauthenticated(Mutex<HashMap<IpAddr, usize>>);

impl Unauthenticated {
    fn admit(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<Admission> {
        let mut counts = self.0.lock().expect("lock");
        let count = counts.entry(ip).or_default();
        if cap > 0 && *count >= cap {
            return None;
        }
        *count += 1;
        Some(Admission {
            ip,
            counts: self.clone(),
            released: AtomicBool::new(false),
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut counts = self.0.lock().expect("lock");
        if let Some(count) = counts.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&ip);
            }
        }
    }
}

/// One connection's place in its address's count, given back when the connection
/// authenticates or ends, whichever comes first.
struct Admission {
    ip: IpAddr,
    counts: Arc<Unauthenticated>,
    released: AtomicBool,
}

impl Admission {
    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.counts.release(self.ip);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release();
    }
}

/// In every request's extensions: the authentication extractor marks the connection as
/// authenticated, so it no longer counts against its address's cap.
#[derive(Clone)]
pub struct ConnectionAuth(Arc<Admission>);

impl ConnectionAuth {
    pub fn authenticated(&self) {
        self.0.release();
    }
}

/// The warn line about refused connections, at most once per [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct RefusalLog {
    last: Mutex<Option<Instant>>,
    since: AtomicU64,
}

impl RefusalLog {
    fn note(&self, ip: IpAddr, cap: usize) {
        self.since.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let refused = self.since.swap(0, Ordering::Relaxed);
        tracing::warn!(address = %ip, refused, cap,
            "refusing connections: this address holds limits.max_unauthenticated_per_address \
             connections that have not made an authenticated request yet");
    }
}

/// Answers a connection over the cap with `503 busy` and `Retry-After`, then closes it.
async fn refuse<S>(stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(|_: hyper::Request<Incoming>| async {
        let body = synchub_protocol::ApiError {
            code: synchub_protocol::codes::BUSY.to_owned(),
            message: "too many connections from this address have not made an authenticated \
                      request yet; try again shortly"
                .to_owned(),
            conflicts: Vec::new(),
            head: None,
        };
        let mut response = (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(body),
        )
            .into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(crate::admission::RETRY_AFTER_SECS),
        );
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_DEADLINE)
        .keep_alive(false);
    let answered = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_DEADLINE * 2, answered).await;
}

/// Serves `app` on `listener` (through TLS with `tls`) until `shutdown`, then waits for the
/// connections' requests in flight to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let counts = Arc::new(Unauthenticated::default());
    let refusals = RefusalLog::default();
    let answering = Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERED_REFUSALS));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors, or a connection reset before we took it: go on
                // after a moment rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admission) = counts.admit(peer.ip(), limits.max_unauthenticated_per_address)
        else {
            metrics::counter!("synchub_connections_refused_total").increment(1);
            refusals.note(peer.ip(), limits.max_unauthenticated_per_address);
            match (&tls, answering.clone().try_acquire_owned()) {
                (None, Ok(slot)) => {
                    connections.spawn(async move {
                        refuse(stream).await;
                        drop(slot);
                    });
                }
                _ => drop(stream),
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let auth = ConnectionAuth(Arc::new(admission));
        let (app, shutdown) = (app.clone(), shutdown.clone());
        match &tls {
            None => connections.spawn(serve_connection(stream, peer, auth, app, limits, shutdown)),
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    // The handshake is part of reading the request head: same deadline.
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, auth, app, limits, shutdown).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                })
            }
        };
    }
    connections.close();
    connections.wait().await;
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    auth: ConnectionAuth,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) where
    S: Into<Stream>,
{
    // Shared with the fan-out once the connection is a WebSocket (see `crate::shared_io`).
    let stream = SharedIo::new(stream);
    let raw = stream.raw();
    // Under TLS too: the deadline is on the connection's own writes, whatever is written
    // through it. The fan-out's raw writes never wait, and need none.
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(limits.send_idle_timeout));
    let stream = Box::pin(stream);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(auth.clone());
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(raw.clone());
        app.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        // Header-read deadline, a client gone mid-request: routine, not worth more.
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_counts_until_authenticated_or_closed() {
        let counts = Arc::new(Unauthenticated::default());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = counts.admit(ip, 2).expect("first");
        let b = counts.admit(ip, 2).expect("second");
        assert!(counts.admit(ip, 2).is_none(), "third over the cap");
        assert!(
            counts.admit([10, 0, 0, 2].into(), 2).is_some(),
            "other address"
        );
        let a = ConnectionAuth(Arc::new(a));
        a.authenticated();
        a.authenticated();
        let c = counts.admit(ip, 2).expect("a's place is free");
        drop(b);
        drop(a);
        assert!(counts.admit(ip, 2).is_some());
        drop(c);
        assert!(counts.0.lock().unwrap().is_empty());
    }
}
