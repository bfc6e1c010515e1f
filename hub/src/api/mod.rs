//! The HTTP API under `/api/v1`, one module per route group, plus `/healthz`, `/readyz` and
//! `/metrics`. Every error is a JSON `ApiError` with a stable `code` (see [`crate::error`]).

pub mod admin;
pub mod blobs;
pub mod commits;
pub mod events;
pub mod heads;
pub mod held;
pub mod reports;
pub mod tokens;

use crate::admission::Downloads;
use crate::error::HubError;
use crate::state::{AppState, ReconcileHealth, STORAGE_FULL_REPORTED};
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use std::time::Duration;
use synchub_protocol::codes;
use tower_http::CompressionLevel;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::SizeAbove;

// Who may call what: the extractor each handler takes decides it, before the body is read.
//   Principal              any live token
//   SpaceAccess<Read>      a token allowed on {space} (any capability)
//   SpaceAccess<Publish>   a `publish` token allowed on {space}, or an admin
//   SpaceAccess<Admin>     an admin token, {space} well-formed
//   AdminToken             an admin token

pub fn router(state: AppState) -> Router {
    let json_limit = state.config.limits.max_request_bytes;
    let body_idle = Duration::from_millis(state.config.limits.body_idle_timeout_ms);
    // Downloads past the bound wait in a short queue, then are refused with 503 and
    // Retry-After (admission.rs); the layer is put on the download routes only (and on GET of
    // a blob, not PUT).
    let limits = &state.config.limits;
    let downloads = crate::admission::Downloads::new(
        limits.max_concurrent_downloads,
        limits.max_queued_downloads,
        Duration::from_millis(limits.download_queue_ms),
        state.clone(),
    );
    let api = space_routes(&downloads)
        .merge(admin_routes())
        .merge(blob_routes(&downloads))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(json_limit));
    Router::new()
        .nest("/api/v1", api)
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            note_storage_full,
        ))
        .layer(axum::middleware::from_fn(count_requests))
        // A body that stops arriving is cut off (408) rather than holding a task for good.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body_idle))
        // A span per request (method, path), so what a handler logs says which request it was.
        // Failures are logged by the error itself (`HubError`), at the level each deserves:
        // a `503 busy` in a rush is routine and not logged at all, so the layer's own
        // report of every 5xx stays at debug.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(state)
}

/// What agents use: the socket, heads, manifests, commits, reports and held changes; manifest
/// downloads go through the admission bound.
fn space_routes(downloads: &Downloads) -> Router<AppState> {
    let admit = axum::middleware::from_fn_with_state(downloads.clone(), crate::admission::admit);
    Router::new()
        .route("/ws", get(crate::ws::upgrade)) // Principal; each followed space: Read
        .route("/spaces", get(heads::spaces)) // Principal; lists the spaces it may Read
        .route("/spaces/{space}/head", get(heads::head)) // SpaceAccess<Read>
        .route(
            "/spaces/{space}/versions/{version}/manifest",
            get(heads::manifest) // SpaceAccess<Read>
                .route_layer(compression())
                .route_layer(from_fn_with_state("manifest", count_encoding))
                .route_layer(admit),
        )
        .route("/spaces/{space}/commits", post(commits::commit)) // SpaceAccess<Publish>
        // POST: Principal, and Read on the report's space; GET: AdminToken.
        .route("/sync-log", post(reports::post).get(reports::list))
        .route(
            "/spaces/{space}/held/{client_id}",
            put(held::put).delete(held::delete), // SpaceAccess<Publish>
        )
}

/// Blob bytes: download (through the admission bound), upload, packs and the
/// which-are-missing question.
fn blob_routes(downloads: &Downloads) -> Router<AppState> {
    let admit = axum::middleware::from_fn_with_state(downloads.clone(), crate::admission::admit);
    Router::new()
        .route(
            "/blobs/pack",
            post(blobs::pack) // Principal
                .route_layer(compression())
                .route_layer(from_fn_with_state("pack", count_encoding))
                .route_layer(admit.clone()),
        )
        .route("/blobs/missing", post(blobs::missing)) // Principal
        .route(
            "/blobs/{sha256}",
            get(blobs::get_blob) // Principal
                .route_layer(admit)
                .put(blobs::put_blob) // Principal
                // Streamed, with their own limit (`limits.max_blob_bytes`).
                .layer(DefaultBodyLimit::disable()),
        )
}

/// Answers shorter than this are sent as they are: compressing them saves nothing worth it.
const COMPRESS_MIN_BYTES: u64 = 1024;

/// Compression for a download route (manifests, deltas, packs), as the request's
/// `Accept-Encoding` allows: zstd or gzip, at their fastest level (the hub's CPU is what a
/// herd of agents waits on). The agent asks for packs of images and archives uncompressed.
fn compression() -> CompressionLayer<SizeAbove> {
    CompressionLayer::new()
        .quality(CompressionLevel::Fastest)
        .compress_when(SizeAbove::new(COMPRESS_MIN_BYTES))
}

/// Middleware outside [`compression`]: counts each answer of a download route by its encoding
/// (`synchub_download_encodings_total{route, encoding}`).
async fn count_encoding(
    State(route): State<&'static str>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let response = next.run(request).await;
    if response.status().is_success() {
        let encoding = match response.headers().get(axum::http::header::CONTENT_ENCODING) {
            Some(v) if v == "zstd" => "zstd",
            Some(v) if v == "gzip" => "gzip",
            Some(_) => "other",
            None => "identity",
        };
        metrics::counter!("synchub_download_encodings_total", "route" => route, "encoding" => encoding)
            .increment(1);
    }
    response
}

/// What only admins do: history, force-syncs, rollbacks, tokens, decisions, the audit log.
fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/spaces/{space}/versions", get(heads::versions)) // SpaceAccess<Admin>
        .route("/spaces/{space}/force-sync", post(commits::force_sync)) // SpaceAccess<Admin>
        .route("/spaces/{space}/rollback", post(commits::rollback)) // SpaceAccess<Admin>
        .route("/events", get(events::events)) // AdminToken
        .route("/tokens", get(tokens::list).post(tokens::create)) // AdminToken
        .route("/tokens/{name}", axum::routing::delete(tokens::revoke)) // AdminToken
        .route("/clients", get(admin::clients)) // AdminToken
        .route("/fleet", get(admin::fleet)) // AdminToken
        .route("/audit", get(admin::audit)) // AdminToken
        .route("/held", get(held::list)) // AdminToken
        .route(
            "/spaces/{space}/held/{client_id}/approve",
            post(held::approve), // SpaceAccess<Admin>
        )
        .route(
            "/spaces/{space}/held/{client_id}/reject",
            post(held::reject), // SpaceAccess<Admin>
        )
}

/// Remembers a write that failed for a full disk (507), for `/readyz`.
async fn note_storage_full(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let response = next.run(request).await;
    if response.status() == StatusCode::INSUFFICIENT_STORAGE {
        *state.storage_full_at.lock().expect("lock") = Some(std::time::Instant::now());
    }
    response
}

/// Counts requests by route and status for `/metrics`.
async fn count_requests(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    metrics::counter!(
        "synchub_http_requests_total",
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}

/// The admin dashboard: a static page that reads the admin API with a token the admin enters.
async fn dashboard() -> impl IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("../../assets/dashboard.html"),
    )
}

async fn not_found() -> HubError {
    HubError::NotFound("no such route".into())
}

/// Ready once the heads are loaded, the database watcher runs and the heads were read from the
/// database recently. A probe makes no query of its own: when the last read is over a second
/// old it asks the hub's reconciler for one (which makes at most one per second, however many
/// probes come) and waits up to 2 s for it.
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.heads.snapshot().is_empty() {
        return HubError::Unavailable("heads not loaded yet".into()).into_response();
    }
    let fresh = Duration::from_secs(1);
    let mut health = state.reconcile.health.subscribe();
    let stale = |h: &ReconcileHealth| h.last_attempt.is_none_or(|t| t.elapsed() > fresh);
    if stale(&health.borrow_and_update()) {
        state.reconcile.wake.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(2), health.wait_for(|h| !stale(h))).await;
    }
    let h = state.reconcile.health.borrow().clone();
    let age = h.last_reread.map(|t| t.elapsed().as_secs_f64());
    let full_since = state
        .storage_full_at
        .lock()
        .expect("lock")
        .map(|t| t.elapsed())
        .filter(|since| *since < STORAGE_FULL_REPORTED);
    let problem = if let Some(since) = full_since {
        Some(format!(
            "the hub's disk is full: a write failed for lack of space {:.0} s ago",
            since.as_secs_f64()
        ))
    } else if !h.watcher_up || !h.apply_up {
        Some("the database watcher is not running".to_owned())
    } else if let Some(e) = &h.last_error {
        Some(format!("database: {e}"))
    } else if stale(&h) {
        Some("the database did not answer within 2 s".to_owned())
    } else {
        None
    };
    let age = age.map_or("never".to_owned(), |a| format!("{a:.1} s ago"));
    match problem {
        Some(p) => HubError::Unavailable(format!("{p}; heads last read {age}")).into_response(),
        None => (
            StatusCode::OK,
            format!("ready\nwatcher: running\nheads last read: {age}\n"),
        )
            .into_response(),
    }
}

/// Prometheus metrics: for admin tokens, or anyone with `metrics_public = true` (they name
/// spaces, token names and traffic, which an outsider should not map).
async fn metrics(
    State(state): State<AppState>,
    admin: Result<crate::auth::AdminToken, HubError>,
) -> Result<String, HubError> {
    if !state.config.metrics_public {
        admin?;
    }
    Ok(state.metrics.render())
}

/// Maps axum's JSON body rejections to our error body.
pub struct Json<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HubError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, HubError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => {
                if crate::error::is_body_timeout(&rejection) {
                    Err(HubError::BodyTimeout)
                } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Err(HubError::TooLarge("request body over the limit".into()))
                } else {
                    Err(HubError::bad_request(
                        codes::BAD_REQUEST,
                        rejection.body_text(),
                    ))
                }
            }
        }
    }
}

/// Maps axum's query-string rejections to our error body (400 `bad_request` in JSON, like
/// every other error).
pub struct Query<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HubError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, HubError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|rejection| HubError::bad_request(codes::BAD_REQUEST, rejection.body_text()))
    }
}
