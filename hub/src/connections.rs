//! Accepting HTTP connections: the hub's own accept loop instead of `axum::serve`, for what
//! that one lacks against hostile clients.
//!
//! - A header-read deadline (`limits.header_read_timeout_ms`): a connection that has not sent
//!   a whole request head within it is closed, whether it sends nothing (an idle keep-alive
//!   socket included) or sends headers a byte at a time (slowloris).
//! - A cap on connections per client address that have not yet made an authenticated request
//!   (`limits.max_unauthenticated_per_address`): one address cannot hold thousands of sockets
//!   open without a token. A connection stops counting once a request on it authenticates
//!   (see [`ConnectionAuth`]), so a whole office behind one NAT address is not limited.
//!
//! With TLS configured the handshake happens in the connection's task, under the same
//! header-read deadline.
//!
//! Each connection's task stops on shutdown after its request in flight (WebSockets are closed
//! by their own tasks, which watch the same shutdown).

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
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
}

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
            tracing::debug!(%peer, "too many unauthenticated connections from this address");
            drop(stream);
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
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(auth.clone());
        request.extensions_mut().insert(ConnectInfo(peer));
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
