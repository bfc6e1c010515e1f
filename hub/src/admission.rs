//! Admission instead of a stampede: the downloads (manifests, packs, blobs) served at once are
//! bounded, and a request over the bound is answered at once with 503 `busy` and
//! `Retry-After` rather than queued behind the others. Agents wait that long (with jitter) and
//! ask again without counting it as a failed sync, so after a bump the fleet is served at the
//! pace the hub's cores allow instead of every request slowing down together.
//!
//! A slot is held until the answer's body has been sent (a pack streams long after its
//! handler returned).

use crate::error::HubError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// How long a refused agent is told to wait before asking again.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The download slots, shared by the routes the admission layer is put on.
#[derive(Clone)]
pub struct Downloads(Arc<Semaphore>);

impl Downloads {
    /// `max` downloads at once; 0 means no bound.
    pub fn new(max: usize) -> Self {
        let max = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        };
        Downloads(Arc::new(Semaphore::new(max)))
    }
}

/// Middleware: serves the request in a free slot, or refuses it with 503 and `Retry-After`.
pub async fn admit(State(slots): State<Downloads>, request: Request, next: Next) -> Response {
    let Ok(slot) = slots.0.clone().try_acquire_owned() else {
        metrics::counter!("synchub_downloads_refused_total").increment(1);
        return HubError::Busy {
            retry_after_secs: RETRY_AFTER_SECS,
        }
        .into_response();
    };
    let (parts, body) = next.run(request).await.into_parts();
    // The slot goes with the body: released when the last byte is sent or the client leaves.
    let body = body.map_frame(move |frame| {
        let _held = &slot;
        frame
    });
    Response::from_parts(parts, Body::new(body))
}
