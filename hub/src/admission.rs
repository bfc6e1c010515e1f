//! Admission instead of a stampede: the downloads (manifests, packs, blobs) served at once are
//! bounded, and a request over the bound is answered at once with 503 `busy` and
//! `Retry-After` rather than queued behind the others. Agents wait that long (with jitter) and
//! ask again without counting it as a failed sync, so after a bump the fleet is served at the
//! pace the hub's cores allow instead of every request slowing down together.
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
use http_body_util::BodyExt;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// How long a refused agent is told to wait before asking again.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The download slots, shared by the routes the admission layer is put on, and the state
/// callers are authenticated against.
#[derive(Clone)]
pub struct Downloads {
    slots: Arc<Semaphore>,
    state: AppState,
}

impl Downloads {
    /// `max` downloads at once; 0 means no bound.
    pub fn new(max: usize, state: AppState) -> Self {
        let max = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        };
        Downloads {
            slots: Arc::new(Semaphore::new(max)),
            state,
        }
    }
}

impl HasTokens for Downloads {
    fn tokens(&self) -> &Tokens {
        self.state.tokens()
    }
}

/// Middleware: serves an authenticated request in a free slot, or refuses it with 503 and
/// `Retry-After`. The handler checks what the caller may read.
pub async fn admit(
    State(downloads): State<Downloads>,
    _caller: Principal,
    request: Request,
    next: Next,
) -> Response {
    let Ok(slot) = downloads.slots.clone().try_acquire_owned() else {
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
