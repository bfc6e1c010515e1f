//! The agent's local API on 127.0.0.1, for programs and people on this PC (web pages from
//! elsewhere are refused: see [`local_only`]): `GET /status`
//! (JSON), `GET /events` (server-sent events, one per state change), `POST /sync` (download
//! now / retry) and `GET /` (the block page). The page is written for the person at the PC,
//! in English or Romanian after the browser's language (`?lang=` overrides): plain words,
//! the space's display name from the config, MB done of total with time left, when the data
//! was last updated, advice for each failure, a countdown to the next retry, and a button
//! only when it does something. It carries the status it was served with, so `?static=1`
//! renders completely without `/events` (which never ends) for screenshot tools.

use crate::agent::Agent;
use axum::extract::{Query, State};
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
pub(crate) async fn serve(
    addr: SocketAddr,
    agent: Arc<Agent>,
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
    let app = router(agent.clone());
    let task = tokio::spawn(async move {
        let shutdown = async move { agent.stopped().await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "local API stopped");
        }
    });
    Ok((bound, task))
}

fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status", get(status))
        .route("/events", get(events))
        .route("/sync", post(sync_now))
        .layer(axum::middleware::from_fn(local_only))
        .with_state(agent)
}

/// Whether `host` (a `Host` header or the host of an `Origin`) names this machine's loopback:
/// `127.0.0.1`, `localhost` or `[::1]`, with any port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "::1"
}

/// Keeps web pages out. A page from another site that rebinds its DNS name to 127.0.0.1 still
/// sends its own name as `Host`: refused, so it cannot read `/status`. A cross-site `POST /sync`
/// carries the foreign page's `Origin` (browsers always send it on a cross-origin POST and no
/// script can set it): refused, so no page can start downloads on every PC that opens it.
/// Programs on the PC (curl, the Python package) send no `Origin` and are not affected.
async fn local_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match refusal(request.method(), request.headers()) {
        Some(refused) => refused.into_response(),
        None => next.run(request).await,
    }
}

/// Why [`local_only`] refuses a request with these headers, if it does.
fn refusal(
    method: &axum::http::Method,
    headers: &axum::http::HeaderMap,
) -> Option<(StatusCode, &'static str)> {
    use axum::http::header;
    let value = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if !value(header::HOST.as_str()).is_some_and(is_loopback_host) {
        return Some((
            StatusCode::MISDIRECTED_REQUEST,
            "this API answers only to http://127.0.0.1 or http://localhost\n",
        ));
    }
    if method == axum::http::Method::GET {
        return None;
    }
    let foreign_origin = value(header::ORIGIN.as_str()).is_some_and(|origin| {
        origin
            .strip_prefix("http://")
            .is_none_or(|host| !is_loopback_host(host))
    });
    let cross_site = value("sec-fetch-site").is_some_and(|s| s == "cross-site" || s == "same-site");
    (foreign_origin || cross_site).then_some((
        StatusCode::FORBIDDEN,
        "requests from other web sites are refused\n",
    ))
}

async fn status(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.status())
}

async fn sync_now(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    for s in &agent.spaces {
        s.sync_now.notify_one();
    }
    (StatusCode::ACCEPTED, Json(agent.status()))
}

async fn events(
    State(agent): State<Arc<Agent>>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let streams = agent.spaces.iter().map(|s| {
        let space = s.clone();
        WatchStream::new(s.state.subscribe()).map(move |state| {
            Ok(Event::default()
                .event("state")
                .json_data(space.status_in(state))
                .unwrap_or_else(|_| Event::default().data("{}")))
        })
    });
    let merged = futures::stream::select_all(streams).take_until(async move {
        agent.stopped().await;
    });
    Sse::new(merged).keep_alive(KeepAlive::default())
}

#[derive(serde::Deserialize)]
struct PageQuery {
    #[serde(default, rename = "static")]
    static_view: Option<String>,
}

/// The block page with the current status (and the display names) inside it, so it renders
/// at once; `?static=1` leaves out the live updates.
async fn page(State(agent): State<Arc<Agent>>, Query(q): Query<PageQuery>) -> Html<String> {
    let live = !matches!(q.static_view.as_deref(), Some("1" | "true"));
    let initial = serde_json::json!({
        "status": agent.status(),
        "names": agent.config.display_names,
        "live": live,
    });
    // Inside <script>: `</` must not close it early.
    let initial = initial.to_string().replace("</", "<\\/");
    Html(PAGE.replace("__INITIAL__", &initial))
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>synchub</title>
<style>
body{font-family:system-ui,"Segoe UI",sans-serif;max-width:42em;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.4em;font-weight:600}
.card{border:2px solid #ccc;border-radius:10px;padding:1em 1.2em;margin:1em 0}
.blocked{border-color:#c33;background:#fff5f5}.ready{border-color:#3a3;background:#f5fff5}
.stale{border-color:#d90;background:#fffaf0}
.name{font-weight:600;font-size:1.15em}.main{font-size:1.3em;margin:.4em 0}
.use{font-weight:600}.advice{margin:.4em 0}.retry{color:#555}
progress{width:100%;height:1.2em}
button{font-size:1.1em;padding:.5em 1.2em;margin-top:.6em;cursor:pointer}
.feedback{margin-left:.8em;color:#555}
details{margin-top:.6em;color:#666;font-size:.85em}details div{overflow-wrap:anywhere}
</style></head><body>
<h1 id="title"></h1>
<div id="spaces"></div>
<p id="hub" class="retry"></p>
<script id="initial" type="application/json">__INITIAL__</script>
<script>
const initial = JSON.parse(document.getElementById('initial').textContent);
const T = {
  en: {
    title: 'Shared data', data: 'The shared data',
    starting: 'Checking for new data…',
    ready: (t) => t ? `Up to date since ${t}` : 'Up to date',
    required: 'New data is available; the update starts in a moment.',
    spreading: (left) => `New data is available; this PC starts its update in ${left}, so that not every PC asks the server at once.`,
    forced: 'The administrator asked every PC to refresh its data.',
    downloading: (d, t, p, left) => `Updating the shared data… ${d} of ${t} MB (${p}%)` + (left ? `, about ${left} left` : ''),
    verifying: 'Checking the new data…', applying: 'Putting the new data in place…',
    mayUse: 'You can use the program.', mayNot: 'Please do not use the program until this finishes.',
    unreachable: 'The server cannot be reached.',
    staleOk: (t) => t ? `You can keep working with the data from ${t}.` : 'You can keep working with the data you have.',
    staleNo: 'The program can be used again once the update is done.',
    damaged: 'The data arrived damaged on the way; it will be downloaded again.',
    disk: 'The disk of this PC is full. Free some space or call IT.',
    access: 'This PC is no longer allowed to get the data. Please call the administrator.',
    other: 'The update did not finish; it will be tried again.',
    retryIn: (s) => `Next try in ${s}.`, retryNow: 'Trying again now…',
    tryNow: 'Try again now', updateNow: 'Update now', asked: 'Started.', noAnswer: 'The agent did not answer.',
    details: 'Details for IT', offline: 'The server cannot be reached; the agent keeps trying.',
    s: 's', min: 'min',
  },
  ro: {
    title: 'Date comune', data: 'Datele comune',
    starting: 'Se verifică dacă există date noi…',
    ready: (t) => t ? `La zi de la ora ${t}` : 'La zi',
    required: 'Sunt date noi; actualizarea începe imediat.',
    spreading: (left) => `Sunt date noi; acest calculator începe actualizarea în ${left}, ca să nu ceară toate calculatoarele datele deodată.`,
    forced: 'Administratorul a cerut reîmprospătarea datelor pe toate calculatoarele.',
    downloading: (d, t, p, left) => `Se actualizează datele comune… ${d} din ${t} MB (${p}%)` + (left ? `, încă aproximativ ${left}` : ''),
    verifying: 'Se verifică datele noi…', applying: 'Se instalează datele noi…',
    mayUse: 'Puteți folosi programul.', mayNot: 'Vă rugăm nu folosiți programul până la terminare.',
    unreachable: 'Serverul nu poate fi contactat.',
    staleOk: (t) => t ? `Puteți lucra în continuare cu datele de la ora ${t}.` : 'Puteți lucra în continuare cu datele existente.',
    staleNo: 'Programul poate fi folosit din nou după actualizare.',
    damaged: 'Datele au sosit deteriorate; vor fi descărcate din nou.',
    disk: 'Discul acestui calculator este plin. Eliberați spațiu sau anunțați IT.',
    access: 'Acest calculator nu mai are acces la date. Vă rugăm anunțați administratorul.',
    other: 'Actualizarea nu s-a terminat; se va încerca din nou.',
    retryIn: (s) => `Următoarea încercare în ${s}.`, retryNow: 'Se încearcă din nou acum…',
    tryNow: 'Încearcă din nou acum', updateNow: 'Actualizează acum', asked: 'Pornit.', noAnswer: 'Agentul nu a răspuns.',
    details: 'Detalii pentru IT', offline: 'Serverul nu poate fi contactat; agentul încearcă în continuare.',
    s: 's', min: 'min',
  },
};
// The PC's language as the browser reports it; ?lang= overrides (for tests and support).
const wanted = new URLSearchParams(location.search).get('lang') ||
  (navigator.languages || [navigator.language || 'en']).join(',');
const lang = /(^|,)ro/i.test(wanted) ? 'ro' : 'en';
const L = T[lang];
document.documentElement.lang = lang;
document.title = L.title;
document.getElementById('title').textContent = L.title;

const spaces = {};
for (const s of initial.status.spaces) spaces[s.space] = s;
let hub = initial.status.hub;
const feedback = {};

const mb = (b) => (b / 1e6).toLocaleString(lang, {minimumFractionDigits: 1, maximumFractionDigits: 1});
function duration(sec) {
  sec = Math.max(0, Math.ceil(sec));
  return sec < 90 ? `${sec} ${L.s}` : `${Math.round(sec / 60)} ${L.min}`;
}
function clock(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (isNaN(d)) return '';
  const time = d.toLocaleTimeString(lang, {hour: '2-digit', minute: '2-digit', hourCycle: 'h23'});
  return d.toDateString() === new Date().toDateString() ? time
    : d.toLocaleDateString(lang, {day: 'numeric', month: 'short'}) + ' ' + time;
}
// What went wrong, in the words of the person at the PC; the raw text stays under "Details".
function kind(error) {
  const e = (error || '').toLowerCase();
  if (/no space|disk full|quota/.test(e)) return 'disk';
  if (/401|403|unauthori|forbidden|revoked/.test(e)) return 'access';
  if (/hash|mismatch|corrupt|checksum|truncated/.test(e)) return 'damaged';
  if (/connect|connection|timed out|timeout|dns|unreachable|refused|reset|network|hub/.test(e)) return 'unreachable';
  return 'other';
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function card(s) {
  const since = clock(s.applied_at);
  const d = el('div', 'card ' + (s.state === 'ready' ? 'ready' : s.allows_use ? 'stale' : 'blocked'));
  d.appendChild(el('div', 'name', (initial.names || {})[s.space] || L.data));
  const main = el('div', 'main');
  let advice = null, retry = null, button = null;
  switch (s.state) {
    case 'ready': main.textContent = L.ready(since); break;
    case 'starting': main.textContent = L.starting; break;
    case 'sync_required':
      main.textContent = s.forced ? L.forced
        : s.starts_at ? L.spreading(duration((new Date(s.starts_at) - Date.now()) / 1000)) : L.required;
      button = L.updateNow; break;
    case 'downloading': {
      const total = s.bytes_total || 0, done = Math.min(s.bytes_done || 0, total);
      const pct = total ? Math.floor(done * 100 / total) : 0;
      const left = s.bytes_per_sec > 0 && total > done ? duration((total - done) / s.bytes_per_sec) : '';
      main.textContent = L.downloading(mb(done), mb(total), pct, left);
      const bar = el('progress'); bar.max = total || 1; bar.value = done;
      main.appendChild(bar);
      break;
    }
    case 'verifying': main.textContent = L.verifying; break;
    case 'applying': main.textContent = L.applying; break;
    case 'failed': {
      const k = kind(s.error || s.last_error);
      main.textContent = L[k];
      advice = s.stale_allowed ? L.staleOk(since) : L.staleNo;
      if (s.retry_at) {
        const sec = (new Date(s.retry_at) - Date.now()) / 1000;
        retry = sec > 0.5 ? L.retryIn(duration(sec)) : L.retryNow;
      }
      button = L.tryNow;
      break;
    }
    default: main.textContent = s.state;
  }
  d.appendChild(main);
  if (advice) d.appendChild(el('div', 'advice', advice));
  if (retry) d.appendChild(el('div', 'retry', retry));
  d.appendChild(el('div', 'use', s.allows_use ? L.mayUse : L.mayNot));
  if (button) {
    const b = el('button', '', button);
    b.disabled = !!feedback.pending;
    b.onclick = syncNow;
    d.appendChild(b);
    if (feedback.text) d.appendChild(el('span', 'feedback', feedback.text));
  }
  const raw = s.error || s.last_error;
  if (raw) {
    const det = el('details');
    det.appendChild(el('summary', '', L.details));
    det.appendChild(el('div', '', raw));
    d.appendChild(det);
  }
  return d;
}
function render() {
  const root = document.getElementById('spaces');
  root.replaceChildren(...Object.values(spaces).map(card));
  const down = hub && !hub.connected && hub.last_error;
  document.getElementById('hub').textContent = down ? L.offline : '';
}
function syncNow() {
  feedback.pending = true; feedback.text = L.retryNow; render();
  fetch('/sync', {method: 'POST'})
    .then((r) => { feedback.text = r.ok ? L.asked : L.noAnswer; })
    .catch(() => { feedback.text = L.noAnswer; })
    .finally(() => {
      render();
      setTimeout(() => { feedback.pending = false; feedback.text = ''; render(); }, 3000);
    });
}
render();
if (initial.live) {
  new EventSource('/events').addEventListener('state', (e) => {
    const s = JSON.parse(e.data); spaces[s.space] = s; render();
  });
  // The countdown, and the hub's reachability, which has no event of its own.
  setInterval(() => {
    fetch('/status').then((r) => r.json()).then((st) => {
      hub = st.hub;
      for (const s of st.spaces) spaces[s.space] = s;
      render();
    }).catch(() => render());
  }, 1000);
}
</script></body></html>"#;
