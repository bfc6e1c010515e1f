//! Blob routes: download one (Range for resume, immutable caching, a presigned redirect when
//! the store is S3), upload one (hash checked while streaming), many in one pack, and ask
//! which of a list the hub lacks. Reads see only the blobs the token may read, through the
//! spaces it may read (see [`crate::blob_access`]); a blob it may not read is "not found", as
//! one the hub lacks, so a token learns nothing about other spaces' files.

use super::Json;
use crate::auth::Principal;
use crate::blob_access;
use crate::error::{ApiResult, HubError};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::{StreamExt, TryStreamExt};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use synchub_protocol::{BlobList, MAX_BLOBS_PER_QUERY, Sha256Hex, codes, pack};

fn parse_hash(s: &str) -> ApiResult<Sha256Hex> {
    s.parse().map_err(|e: synchub_protocol::HashError| {
        HubError::bad_request(codes::INVALID_HASH, e.to_string())
    })
}

/// A single `bytes=` range against a blob of `size` bytes. `Ok(None)`: serve the whole blob
/// (no header, or a form we do not serve such as several ranges).
fn parse_range(value: Option<&HeaderValue>, size: u64) -> ApiResult<Option<Range<u64>>> {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let range = match (start.parse::<u64>().ok(), end.parse::<u64>().ok()) {
        // `e` may be u64::MAX ("to the end" from clients that say so): no wrap.
        (Some(s), Some(e)) if s <= e => s..e.saturating_add(1).min(size),
        (Some(s), None) if end.is_empty() => s..size,
        (None, Some(n)) if start.is_empty() => size.saturating_sub(n)..size,
        _ => return Ok(None),
    };
    if range.start >= size || range.is_empty() {
        return Err(HubError::RangeNotSatisfiable { size });
    }
    Ok(Some(range))
}

/// `GET /blobs/{sha256}`.
pub async fn get_blob(
    State(state): State<AppState>,
    principal: Principal,
    Path(hash): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let hash = parse_hash(&hash)?;
    let not_found = || HubError::NotFound(format!("blob {hash}"));
    let hashes = [hash.clone()];
    if blob_access::readable(&state, &principal, &hashes)
        .await?
        .is_empty()
    {
        return Err(not_found());
    }
    let size = state.blobs.size(&hash).await?.ok_or_else(not_found)?;
    if state.config.presign_downloads
        && let Some(url) = state
            .blobs
            .presigned_get(&hash, state.config.presign_ttl())
            .await?
    {
        metrics::counter!("synchub_blob_redirects_total").increment(1);
        return presigned_redirect(&url);
    }
    let range = parse_range(headers.get(header::RANGE), size)?;
    let read = state.blobs.get(&hash, range.clone()).await?;
    let len = read.range.end - read.range.start;
    metrics::counter!("synchub_blob_bytes_sent_total").increment(len);
    let mut response = Response::new(Body::from_stream(read.stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        // Private: the bytes were read with a token; a shared cache must not serve them to
        // anyone without one.
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{hash}\"")).expect("hex is valid"),
    );
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let content_range = format!("bytes {}-{}/{}", read.range.start, read.range.end - 1, size);
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&content_range).expect("digits are valid"),
        );
    }
    Ok(response)
}

fn lock(kept: &Mutex<BytesMut>) -> MutexGuard<'_, BytesMut> {
    // Only extending a buffer happens under this lock.
    kept.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 307 to a presigned URL of the blob store, where the client downloads the bytes itself.
pub(super) fn presigned_redirect(url: &str) -> ApiResult<Response> {
    let location = HeaderValue::from_str(url)
        .map_err(|_| HubError::Unavailable("presigned URL is not a valid header".into()))?;
    Ok((
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, location)],
    )
        .into_response())
}

/// `PUT /blobs/{sha256}`: 201 when stored, 200 when the hub had it already (either way the
/// token may read it from now on). Needs `publish`; counts against the upload quota.
pub async fn put_blob(
    State(state): State<AppState>,
    principal: Principal,
    Path(hash): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    blob_access::require_upload(&principal)?;
    let hash = parse_hash(&hash)?;
    let limit = state.config.max_blob_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(HubError::TooLarge(format!(
            "blob of {} bytes is over the limit of {limit}",
            declared.unwrap_or_default()
        )));
    }
    let quota = state.config.limits.upload_bytes_per_token_per_hour;
    let quotas = &state.upload_quota;
    quotas.check(&principal, declared.unwrap_or(0), quota)?;
    let existed = state.blobs.size(&hash).await?.is_some();
    // A blob small enough for the hot cache is kept as it goes to the store: the version it
    // is part of is announced next and the fleet asks for it within a second, and the first
    // ask would otherwise read it back from the store (on S3, a round trip to the bucket
    // while the herd waits). Its declared length bounds it (the body cannot be longer).
    let kept = declared
        .filter(|n| state.hot_blobs.takes(*n))
        .map(|n| Arc::new(Mutex::new(BytesMut::with_capacity(n as usize))));
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let stream = match kept.clone() {
        Some(kept) => stream
            .inspect_ok(move |chunk| lock(&kept).extend_from_slice(chunk))
            .boxed(),
        None => stream.boxed(),
    };
    let size = state.blobs.put(&hash, stream, limit).await?;
    if let Some(kept) = kept {
        // The store read the whole body and checked its hash.
        let bytes = std::mem::take(&mut *lock(&kept)).freeze();
        if bytes.len() as u64 == size {
            state.hot_blobs.keep_stored(&hash, bytes);
        }
    }
    quotas.add(&principal, size);
    state.store.note_upload(&hash, principal.token_id).await?;
    metrics::counter!("synchub_blob_bytes_received_total").increment(size);
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        axum::Json(serde_json::json!({ "sha256": hash, "size": size })),
    )
        .into_response())
}

/// `POST /blobs/missing`: which of these the hub lacks, or the token may not read (an upload
/// of one of those makes it readable to the token).
pub async fn missing(
    State(state): State<AppState>,
    principal: Principal,
    Json(list): Json<BlobList>,
) -> ApiResult<axum::Json<BlobList>> {
    if list.sha256.len() > MAX_BLOBS_PER_QUERY {
        return Err(HubError::TooLarge(format!(
            "{} blobs asked about; the limit is {MAX_BLOBS_PER_QUERY} per request",
            list.sha256.len(),
        )));
    }
    let readable = blob_access::readable(&state, &principal, &list.sha256).await?;
    let found = state.blob_sizes(&list.sha256).await?;
    let sha256 = list
        .sha256
        .into_iter()
        .zip(found)
        .filter(|(h, size)| size.is_none() || !readable.contains(h))
        .map(|(h, _)| h)
        .collect();
    Ok(axum::Json(BlobList { sha256 }))
}

/// Each asked blob with its size; not found when any of them is missing or not readable by
/// `principal`. A pack of the current heads' blobs (a herd after a bump) is answered from the
/// manifests in memory, without asking the blob store.
async fn sized_blobs(
    state: &AppState,
    principal: &Principal,
    sha256: Vec<Sha256Hex>,
) -> ApiResult<Vec<(Sha256Hex, u64)>> {
    let in_heads = blob_access::in_readable_heads(state, principal, &sha256).await;
    let from_heads: Option<Vec<u64>> = sha256.iter().map(|h| in_heads.get(h).copied()).collect();
    if let Some(sizes) = from_heads {
        return Ok(sha256.into_iter().zip(sizes).collect());
    }
    let readable = blob_access::readable(state, principal, &sha256).await?;
    let found = state.blob_sizes(&sha256).await?;
    let missing: Vec<String> = sha256
        .iter()
        .zip(&found)
        .filter(|(h, s)| s.is_none() || !readable.contains(*h))
        .map(|(h, _)| h.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(HubError::NotFound(format!(
            "{} blob(s), first {}",
            missing.len(),
            missing[0]
        )));
    }
    Ok(sha256
        .into_iter()
        .zip(found.into_iter().flatten())
        .collect())
}

/// `POST /blobs/pack`: many blobs in one response (format in `synchub_protocol::pack`).
pub async fn pack(
    State(state): State<AppState>,
    principal: Principal,
    Json(list): Json<BlobList>,
) -> ApiResult<Response> {
    let limits = &state.config.limits;
    if list.sha256.len() > limits.max_pack_blobs {
        return Err(HubError::TooLarge(format!(
            "pack of {} blobs; the limit is {}",
            list.sha256.len(),
            limits.max_pack_blobs
        )));
    }
    let items = sized_blobs(&state, &principal, list.sha256).await?;
    let total: u64 = items.iter().map(|(_, s)| s).sum();
    if total > limits.max_pack_bytes {
        return Err(HubError::TooLarge(format!(
            "pack of {total} bytes; the limit is {}",
            limits.max_pack_bytes
        )));
    }
    metrics::counter!("synchub_blob_bytes_sent_total").increment(total);
    let body = match state.hot_blobs.whole_pack(&items) {
        // The herd after a bump, from the second agent on: every blob is in memory.
        Some(bytes) => Body::from(bytes),
        None => Body::from_stream(
            state
                .blobs
                .clone()
                .read_pack(items, state.hot_blobs.clone()),
        ),
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(pack::PACK_CONTENT_TYPE),
        )],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> ApiResult<Option<Range<u64>>> {
        parse_range(Some(&HeaderValue::from_str(v).unwrap()), size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-0", 10).unwrap(), Some(0..1));
        assert_eq!(range("bytes=5-", 10).unwrap(), Some(5..10));
        assert_eq!(range("bytes=-3", 10).unwrap(), Some(7..10));
        assert_eq!(range("bytes=2-100", 10).unwrap(), Some(2..10));
        assert_eq!(range("bytes=0-1,4-5", 10).unwrap(), None);
        assert_eq!(range("items=0-1", 10).unwrap(), None);
        assert!(range("bytes=10-", 10).is_err());
        assert!(range("bytes=20-30", 10).is_err());
        assert_eq!(
            range("bytes=0-18446744073709551615", 10).unwrap(),
            Some(0..10)
        );
        assert_eq!(
            range("bytes=3-18446744073709551615", 10).unwrap(),
            Some(3..10)
        );
    }
}
