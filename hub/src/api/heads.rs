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
use synchub_protocol::{DELTA_CONTENT_TYPE, Sha256Hex, VersionInfo, codes};

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

#[derive(Deserialize)]
pub struct ManifestQuery {
    /// A version the asker holds: answer with the delta from it when the hub knows it.
    from: Option<u64>,
}

fn parse_version(version: &str) -> ApiResult<u64> {
    version.parse().map_err(|_| {
        HubError::bad_request(
            codes::BAD_REQUEST,
            format!("version {version:?} is not a number"),
        )
    })
}

/// `GET /spaces/{space}/versions/{version}/manifest[?from=V]`: the canonical bytes, whose
/// sha256 is the version's data hash, from memory (a presigned redirect when the blob store is
/// S3 and downloads are presigned); with `from`, the delta from version `V` instead when the
/// hub knows that version and the delta is the smaller answer (see
/// `synchub_protocol::delta`). The `Content-Type` says which of the two it is.
pub async fn manifest(
    State(state): State<AppState>,
    SpaceAccess { space, .. }: SpaceAccess<Read>,
    Path((_, version)): Path<(String, String)>,
    Query(q): Query<ManifestQuery>,
) -> ApiResult<Response> {
    metrics::counter!("synchub_manifest_requests_total").increment(1);
    let version = parse_version(&version)?;
    let data_hash = state.version_hash(&space, version).await?;
    let immutable = HeaderValue::from_static("private, max-age=31536000, immutable");
    if let Some(from) = q.from
        && let Some(delta) = manifest_delta(&state, &space, from, &data_hash).await?
    {
        metrics::counter!("synchub_manifest_deltas_total").increment(1);
        return Ok((
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(DELTA_CONTENT_TYPE),
                ),
                (header::CACHE_CONTROL, immutable),
            ],
            delta,
        )
            .into_response());
    }
    if state.config.presign_downloads
        && data_hash != Sha256Hex::empty()
        && let Some(url) = state
            .blobs
            .presigned_get(&data_hash, state.config.presign_ttl())
            .await?
    {
        return super::blobs::presigned_redirect(&url);
    }
    let bytes = state.manifests.canonical(&state.blobs, &data_hash).await?;
    let etag = HeaderValue::from_str(&format!("\"{data_hash}\"")).expect("hex is valid");
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, immutable),
        ],
        bytes,
    )
        .into_response())
}

/// The delta from version `from` to the manifest `to`; `None` when the hub does not know that
/// version or the full manifest is no larger (the asker then gets the full manifest).
async fn manifest_delta(
    state: &AppState,
    space: &str,
    from: u64,
    to: &Sha256Hex,
) -> ApiResult<Option<bytes::Bytes>> {
    let from_hash = match state.version_hash(space, from).await {
        Ok(hash) => hash,
        Err(HubError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let delta = state.manifests.delta(&state.blobs, &from_hash, to).await?;
    let full = state.manifests.canonical(&state.blobs, to).await?;
    Ok((delta.len() < full.len()).then_some(delta))
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
