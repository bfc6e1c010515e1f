//! Reading where a space is: its head (served from memory with an ETag, the 1-second fallback
//! check), the manifest of a version, and the version history.

use super::Query;
use crate::auth::{Admin, Principal, Read, SpaceAccess};
use crate::error::{ApiResult, HubError};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use synchub_protocol::{VersionInfo, codes};

/// `GET /spaces/{space}/head`: no database query; `304` when `If-None-Match` matches.
pub async fn head(
    State(state): State<AppState>,
    SpaceAccess { space, .. }: SpaceAccess<Read>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let published = state.heads.get(&space).ok_or_else(|| {
        if state.config.spaces.contains(&space) {
            HubError::NoData(format!(
                "the hub has no data for space {space:?} yet: it was adopted from an existing \
                 version row without content; agents stay blocked until a source or a publish \
                 fills it"
            ))
        } else {
            HubError::NotFound(format!("space {space:?}"))
        }
    })?;
    metrics::counter!("synchub_head_requests_total").increment(1);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == published.etag.as_bytes());
    if not_modified {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, published.etag.clone())],
        )
            .into_response());
    }
    Ok((
        [
            (header::ETAG, published.etag.clone()),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from(published.json.clone()),
    )
        .into_response())
}

/// `GET /spaces`: the heads of every space the token may use, from memory.
pub async fn spaces(
    State(state): State<AppState>,
    principal: Principal,
) -> axum::Json<Vec<synchub_protocol::Head>> {
    let snapshot = state.heads.snapshot();
    let mut heads: Vec<_> = snapshot
        .values()
        .filter(|p| principal.may_use_space(&p.head.space))
        .map(|p| p.head.clone())
        .collect();
    heads.sort_by(|a, b| a.space.cmp(&b.space));
    axum::Json(heads)
}

/// `GET /spaces/{space}/versions/{version}/manifest`: the canonical bytes, whose sha256 is the
/// version's data hash.
pub async fn manifest(
    State(state): State<AppState>,
    SpaceAccess { space, .. }: SpaceAccess<Read>,
    Path((_, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let version: u64 = version.parse().map_err(|_| {
        HubError::bad_request(
            codes::BAD_REQUEST,
            format!("version {version:?} is not a number"),
        )
    })?;
    let head = state
        .store
        .version(&space, version)
        .await?
        .ok_or_else(|| HubError::NotFound(format!("version {version} of space {space:?}")))?;
    let manifest = state.manifest(&head.data_hash).await?;
    let etag = HeaderValue::from_str(&format!("\"{}\"", head.data_hash)).expect("hex is valid");
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (header::ETAG, etag),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=31536000, immutable"),
            ),
        ],
        manifest.canonical_bytes(),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<u32>,
}

/// `GET /spaces/{space}/versions` (admin): newest first.
pub async fn versions(
    State(state): State<AppState>,
    SpaceAccess { space, .. }: SpaceAccess<Admin>,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<Vec<VersionInfo>>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(axum::Json(state.store.versions(&space, limit).await?))
}
