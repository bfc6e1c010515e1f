//! Admission instead of a stampede: the downloads (manifests, packs, blobs) served at once are
//! bounded. A request over the bound waits for a slot in a short first-come-first-served
//! queue (at most `download_queue_ms`, at most `max_queued_downloads` waiting); when the queue
//! is full or the wait runs out it is answered 503 `busy` with `Retry-After`. Agents wait
//! that long (with jitter) and ask again without counting it as a failed sync, so after a
//! bump the fleet is served at the pace the hub's cores allow instead of every request
//! slowing down together. The queue matters in a herd: without it every request that found
//! the slots taken came back a second or two later, and the retries (tens of thousands for
//! 10,000 agents) cost the hub more than the downloads.
//!
//! A slot is held until the answer's body has been sent (a pack streams long after its
//! handler returned), or until the connection is closed for not reading it
//! (`limits.send_idle_timeout_ms`, see `connections.rs`).
//!
//! The caller is authenticated before a slot is looked at: a request without a valid token is
//! answered 401, not 503, and a refused agent's connection counts as authenticated, not
//! against its address's cap on unauthenticated connections.

use crate::auth::{HasTokens, Principal, Tokens};
use crate::error::HubError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a refused agent is told to wait before asking again.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The download slots and their queue, shared by the routes the admission layer is put on,
/// and the state callers are authenticated against.
#[derive(Clone)]
pub struct Downloads {
    slots: Arc<Semaphore>,
    /// Requests waiting for a slot now.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    wait: Duration,
    state: AppState,
}

impl Downloads {
    /// `max` downloads at once (0: no bound); up to `max_waiting` more wait at most `wait`
    /// for a slot.
    pub fn new(max: usize, max_waiting: usize, wait: Duration, state: AppState) -> Self {
        let max = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        };
        Downloads {
            slots: Arc::new(Semaphore::new(max)),
            waiting: Arc::default(),
            max_waiting,
            wait,
            state,
        }
    }

    /// A slot: a free one, or one that frees within the wait while the queue has room.
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        if self.wait.is_zero() {
            return None;
        }
        // The place is given back however the wait ends, also when the request is dropped
        // while it waits (its client went away).
        let _place = QueuePlace::take(&self.waiting, self.max_waiting)?;
        let slot = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await;
        slot.ok()?.ok()
    }
}

/// One place in the download queue, held while a request waits for a slot.
struct QueuePlace<'a>(&'a AtomicUsize);

impl<'a> QueuePlace<'a> {
    /// A place, unless `max` requests wait already.
    fn take(waiting: &'a AtomicUsize, max: usize) -> Option<Self> {
        let place = QueuePlace(waiting);
        (waiting.fetch_add(1, Ordering::AcqRel) < max).then_some(place)
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HasTokens for Downloads {
    fn tokens(&self) -> &Tokens {
        self.state.tokens()
    }
}

/// Middleware: serves an authenticated request in a slot (waiting for one in the queue when
/// there is room), or refuses it with 503 and `Retry-After`. The handler checks what the
/// caller may read.
pub async fn admit(
    State(downloads): State<Downloads>,
    _caller: Principal,
    request: Request,
    next: Next,
) -> Response {
    let Some(slot) = downloads.slot().await else {
        metrics::counter!("synchub_downloads_refused_total").increment(1);
        return HubError::Busy {
            retry_after_secs: RETRY_AFTER_SECS,
        }
        .into_response();
    };
    let (parts, body) = next.run(request).await.into_parts();
    // The slot goes with the body: released when the last byte is sent or the client leaves.
    Response::from_parts(parts, Body::new(SlotBody { body, _slot: slot }))
}

/// An answer's body with the download slot it holds. It passes the body's size on, so an
/// answer of known length goes out with `Content-Length`, not chunked.
struct SlotBody {
    body: Body,
    _slot: OwnedSemaphorePermit,
}

impl http_body::Body for SlotBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
