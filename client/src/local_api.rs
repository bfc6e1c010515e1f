//! The agent's local API on 127.0.0.1, for programs and people on this PC: `GET /status`
//! (JSON), `GET /events` (server-sent events, one per state change), `POST /sync` (download
//! now / retry) and `GET /` (the block page: state, progress and a "download now" button that
//! follows `/events`).

use crate::{Inner, SpaceStatus};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_stream::wrappers::WatchStream;

/// Binds `addr` (loopback only) and serves until the client stops.
pub async fn serve(
    addr: SocketAddr,
    inner: Arc<Inner>,
) -> crate::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    if !addr.ip().is_loopback() {
        return Err(crate::ClientError::Config(format!(
            "local API address {addr} is not loopback"
        )));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::ClientError::io(format!("binding local API on {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| crate::ClientError::io("local API address", e))?;
    let mut stop = inner.stop.subscribe();
    let app = router(inner);
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "local API stopped");
        }
    });
    Ok((bound, task))
}

pub fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status", get(status))
        .route("/events", get(events))
        .route("/sync", post(sync_now))
        .with_state(inner)
}

async fn status(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    Json(inner.status())
}

async fn sync_now(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    for s in &inner.spaces {
        s.sync_now.notify_one();
    }
    (StatusCode::ACCEPTED, Json(inner.status()))
}

async fn events(
    State(inner): State<Arc<Inner>>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let streams = inner.spaces.iter().map(|s| {
        let space = s.clone();
        WatchStream::new(s.state.subscribe()).map(move |state| {
            let body = SpaceStatus {
                space: space.name.clone(),
                allows_use: state.allows_use(),
                hub_version: space.head.borrow().as_ref().map(|h| h.version),
                last_error: space.last_error.lock().expect("error lock").clone(),
                state,
            };
            Ok(Event::default()
                .event("state")
                .json_data(&body)
                .unwrap_or_else(|_| Event::default().data("{}")))
        })
    });
    let mut stop = inner.stop.subscribe();
    let merged = futures::stream::select_all(streams).take_until(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    Sse::new(merged).keep_alive(KeepAlive::default())
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>synchub agent</title>
<style>
body{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em}
.card{border:1px solid #ccc;border-radius:8px;padding:1em;margin:1em 0}
.blocked{border-color:#c33;background:#fff4f4}.ready{border-color:#3a3;background:#f4fff4}
progress{width:100%}button{font-size:1.1em;padding:.5em 1em}
</style></head><body>
<h1>Data sync</h1>
<div id="spaces">Loading…</div>
<button id="now">Download now</button>
<p id="hub"></p>
<script>
const spaces = {};
// Error texts come from the hub or the network: never insert them as HTML.
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
function render() {
  const el = document.getElementById('spaces');
  el.innerHTML = '';
  for (const s of Object.values(spaces)) {
    const d = document.createElement('div');
    d.className = 'card ' + (s.allows_use ? 'ready' : 'blocked');
    let text = `<b>${esc(s.space)}</b>: ${esc(s.state)} (version ${esc(s.version)}` +
      (s.target !== undefined ? ` → ${esc(s.target)}` : '') + ')';
    if (!s.allows_use) text += '<br>Use of the data is blocked until the download is applied.';
    if (s.state === 'downloading') {
      text += `<br><progress max="${s.bytes_total || 1}" value="${s.bytes_done}"></progress>` +
        ` ${s.files_done}/${s.files_total} files, ${((s.bytes_per_sec || 0) / 1e6).toFixed(1)} MB/s`;
    }
    if (s.last_error) text += `<br>Last error: ${esc(s.last_error)}`;
    d.innerHTML = text;
    el.appendChild(d);
  }
}
function showHub(hub) {
  document.getElementById('hub').textContent = `Hub ${hub.url} (${hub.mode})` +
    (hub.last_error ? ` — cannot reach it: ${hub.last_error}` : '');
}
fetch('/status').then(r => r.json()).then(st => {
  for (const s of st.spaces) spaces[s.space] = s;
  showHub(st.hub);
  render();
});
setInterval(() => fetch('/status').then(r => r.json()).then(st => showHub(st.hub)).catch(() => {}), 2000);
new EventSource('/events').addEventListener('state', e => {
  const s = JSON.parse(e.data); spaces[s.space] = s; render();
});
document.getElementById('now').onclick = () => fetch('/sync', {method: 'POST'});
</script></body></html>"#;
