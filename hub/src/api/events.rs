//! `GET /events` (admin): server-sent events that tell the dashboard when to look again, so it
//! updates within a moment of a change instead of polling. One `event: changed` with
//! `data: heads` when a head moved and `data: fleet` when an agent connected, left, reported a
//! state, a sync was logged or a held change came, was decided or was settled; several changes close together may come as one event. The
//! stream ends when the hub shuts down or the token is revoked. Browsers read it with `fetch`
//! (an `EventSource` cannot send the Authorization header).

use crate::auth::AdminToken;
use crate::error::ApiResult;
use crate::state::AppState;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::StreamExt;
use std::convert::Infallible;
use tokio_stream::wrappers::WatchStream;

pub async fn events(
    State(state): State<AppState>,
    AdminToken(principal): AdminToken,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let heads = WatchStream::from_changes(state.heads.subscribe()).map(|_| "heads");
    let fleet = WatchStream::from_changes(state.clients.subscribe()).map(|_| "fleet");
    let shutdown = state.shutdown.clone().cancelled_owned();
    let live = state.clone();
    let stream = futures::stream::select(heads, fleet)
        .take_while(move |_| {
            let current = live.tokens.is_current(&principal);
            async move { current }
        })
        .take_until(shutdown)
        .map(|what| Ok(Event::default().event("changed").data(what)));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
