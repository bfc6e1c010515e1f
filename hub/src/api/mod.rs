//! The HTTP API under `/api/v1`, one module per route group, plus `/healthz`, `/readyz` and
//! `/metrics`. Every error is a JSON `ApiError` with a stable `code` (see [`crate::error`]).

pub mod admin;
pub mod blobs;
pub mod commits;
pub mod heads;
pub mod reports;

use crate::error::HubError;
use crate::state::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use synchub_protocol::codes;

pub fn router(state: AppState) -> Router {
    let json_limit = state.config.limits.max_request_bytes;
    let api = Router::new()
        .route("/ws", get(crate::ws::upgrade))
        .route("/spaces", get(heads::spaces))
        .route("/spaces/{space}/head", get(heads::head))
        .route("/spaces/{space}/versions", get(heads::versions))
        .route(
            "/spaces/{space}/versions/{version}/manifest",
            get(heads::manifest),
        )
        .route("/spaces/{space}/commits", post(commits::commit))
        .route("/spaces/{space}/force-sync", post(commits::force_sync))
        .route("/blobs/pack", post(blobs::pack))
        .route("/blobs/missing", post(blobs::missing))
        .route(
            "/blobs/{sha256}",
            get(blobs::get_blob)
                .put(blobs::put_blob)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/sync-log", post(reports::post).get(reports::list))
        .route("/clients", get(admin::clients))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(json_limit));
    Router::new()
        .nest("/api/v1", api)
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(state)
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

/// Ready once the heads are loaded and the database answers.
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.heads.snapshot().is_empty() {
        return HubError::Unavailable("heads not loaded yet".into()).into_response();
    }
    // A health check must answer quickly even when the database hangs.
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.heads()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => HubError::Unavailable(format!("database: {e}")).into_response(),
        Err(_) => {
            HubError::Unavailable("database did not answer within 2 s".into()).into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
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
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
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

/// Parses a space name from the path, answering 400 for a malformed one.
pub fn space_name(space: &str) -> Result<&str, HubError> {
    synchub_protocol::validate_space(space)
        .map_err(|e| HubError::bad_request(codes::BAD_REQUEST, e.to_string()))?;
    Ok(space)
}
