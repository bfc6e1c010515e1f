//! Making new versions: a commit (puts and deletes against a base version, applied atomically)
//! and an admin's force-sync (the same data, announced as forced).

use super::{Json, space_name};
use crate::auth::Principal;
use crate::blobs;
use crate::error::{ApiResult, HubError};
use crate::state::AppState;
use crate::store::{NewVersion, StoreError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::collections::HashSet;
use synchub_protocol::{
    CommitRequest, CommitResponse, ForceSyncRequest, Head, Manifest, ManifestError, codes,
};

/// How often a commit is retried when another writer moved the head between our read and our
/// compare-and-swap (each retry re-checks for conflicts).
const MAX_ATTEMPTS: usize = 5;

/// The current head, from memory or, when this replica has not seen the space yet, the store.
pub async fn current_head(state: &AppState, space: &str) -> ApiResult<Head> {
    if let Some(p) = state.heads.get(space) {
        return Ok(p.head.clone());
    }
    if !state.config.spaces.contains(&space.to_owned()) {
        return Err(HubError::NotFound(format!(
            "space {space:?} (this hub serves only the spaces its configuration lists)"
        )));
    }
    match state.store.head(space).await? {
        Some(head) => {
            crate::server::publish(state, head.clone());
            Ok(head)
        }
        None => Err(HubError::NotFound(format!("space {space:?}"))),
    }
}

/// Publishes a head this replica just wrote and returns it as agents see it (with the epoch
/// and last forced version memory carries).
fn published(state: &AppState, head: Head) -> Head {
    state.heads.publish(head.clone());
    state
        .heads
        .get(&head.space)
        .map(|p| p.head.clone())
        .filter(|h| h.version == head.version && h.data_hash == head.data_hash)
        .unwrap_or(head)
}

/// The head as the store has it now, made current in memory even when it is older (the
/// database was restored or failed over: see [`crate::broadcast::Heads::replace`]).
async fn reread_head(state: &AppState, space: &str) -> ApiResult<Head> {
    let before = state.heads.snapshot();
    match state.store.head(space).await? {
        Some(head) => {
            crate::server::replace(state, head.clone(), &before);
            // Memory may be newer still (a commit here meanwhile); never older than the read.
            Ok(state
                .heads
                .get(space)
                .map(|p| p.head.clone())
                .filter(|h| h.version >= head.version)
                .unwrap_or(head))
        }
        None => Err(HubError::NotFound(format!("space {space:?}"))),
    }
}

fn manifest_error(e: ManifestError) -> HubError {
    match e {
        ManifestError::Path(p) => HubError::bad_request(codes::INVALID_PATH, p.to_string()),
        ManifestError::TooManyEntries { .. } => HubError::TooLarge(e.to_string()),
        other => HubError::bad_request(codes::INVALID_MANIFEST, other.to_string()),
    }
}

/// `POST /spaces/{space}/commits`.
pub async fn commit(
    State(state): State<AppState>,
    principal: Principal,
    Path(space): Path<String>,
    Json(req): Json<CommitRequest>,
) -> ApiResult<Response> {
    space_name(&space)?;
    principal.require_space(&space)?;
    req.check_bounds()
        .map_err(|e| HubError::TooLarge(e.to_string()))?;
    let limits = &state.config.limits;
    if req.puts.len() + req.deletes.len() > limits.max_manifest_entries {
        return Err(HubError::TooLarge(format!(
            "commit of {} changes; the limit is {}",
            req.puts.len() + req.deletes.len(),
            limits.max_manifest_entries
        )));
    }
    // Validate paths before touching anything, so a hostile commit costs nothing.
    Manifest::default()
        .with_changes(&req.puts, &[])
        .map_err(manifest_error)?;
    for d in &req.deletes {
        synchub_protocol::validate_path(d)
            .map_err(|e| HubError::bad_request(codes::INVALID_PATH, e.to_string()))?;
    }
    check_blobs(&state, &req).await?;

    for _ in 0..MAX_ATTEMPTS {
        let mut head = current_head(&state, &space).await?;
        if req.base_version > head.version {
            // The client read a newer head elsewhere (another replica behind the balancer):
            // this replica has not heard of it yet, the store has.
            head = reread_head(&state, &space).await?;
        }
        if req.base_version > head.version {
            return Err(HubError::bad_request(
                codes::BAD_REQUEST,
                format!(
                    "base_version {} is newer than the head {}",
                    req.base_version, head.version
                ),
            ));
        }
        let head_manifest = state.manifest(&head.data_hash).await?;
        if req.base_version < head.version {
            let base = state
                .store
                .version(&space, req.base_version)
                .await?
                .ok_or_else(|| {
                    HubError::bad_request(
                        codes::BAD_REQUEST,
                        format!("base_version {} does not exist", req.base_version),
                    )
                })?;
            let base_manifest = state.manifest(&base.data_hash).await?;
            let touched: HashSet<String> = base_manifest
                .changed_paths(&head_manifest)
                .into_iter()
                .collect();
            let mut conflicts: Vec<String> = req
                .puts
                .iter()
                .map(|p| &p.path)
                .chain(&req.deletes)
                .filter(|p| touched.contains(*p))
                .cloned()
                .collect();
            if !conflicts.is_empty() {
                conflicts.sort();
                conflicts.dedup();
                return Err(HubError::Conflict {
                    paths: conflicts,
                    head: Box::new(head),
                });
            }
        }
        let next = head_manifest
            .with_changes(&req.puts, &req.deletes)
            .map_err(manifest_error)?;
        if next.len() > limits.max_manifest_entries {
            return Err(HubError::TooLarge(format!(
                "the new version would have {} entries; the limit is {}",
                next.len(),
                limits.max_manifest_entries
            )));
        }
        // Two spellings of one file on Windows/macOS would break every agent there.
        synchub_protocol::check_collisions(next.entries().iter().map(|e| e.path.as_str()))
            .map_err(|e| HubError::bad_request(codes::PATH_COLLISION, e.to_string()))?;
        let data_hash = next.data_hash();
        if data_hash == head.data_hash {
            // Nothing changes: no new version, no broadcast.
            return Ok((StatusCode::OK, axum::Json(CommitResponse { head })).into_response());
        }
        blobs::put_bytes(state.blobs.as_ref(), next.canonical_bytes().into()).await?;
        let new = NewVersion {
            data_hash,
            forced: false,
            reason: req.message.clone(),
            by: Some(principal.name.clone()),
            entries: next.len() as u64,
            bytes: next.total_size(),
        };
        match state.store.create_version(&space, head.version, new).await {
            Ok(head) => {
                metrics::counter!("synchub_commits_total").increment(1);
                tracing::info!(space, version = head.version, by = principal.name, "commit");
                let head = published(&state, head);
                return Ok(
                    (StatusCode::CREATED, axum::Json(CommitResponse { head })).into_response()
                );
            }
            Err(StoreError::HeadMoved { current, .. }) => {
                tracing::debug!(space, current, "head moved during commit; retrying");
                reread_head(&state, &space).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(HubError::Unavailable(
        "the head kept moving; try the commit again".into(),
    ))
}

/// Every put must name a stored blob of the stated size.
async fn check_blobs(state: &AppState, req: &CommitRequest) -> ApiResult<()> {
    let hashes: Vec<_> = req.puts.iter().map(|p| p.sha256.clone()).collect();
    let sizes = super::blobs::sizes(state, &hashes).await?;
    let mut missing = Vec::new();
    for (put, size) in req.puts.iter().zip(sizes) {
        match size {
            None => missing.push(put.sha256.to_string()),
            Some(s) if s != put.size => {
                return Err(HubError::bad_request(
                    codes::INVALID_MANIFEST,
                    format!(
                        "{:?} says {} bytes but blob {} has {s}",
                        put.path, put.size, put.sha256
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if !missing.is_empty() {
        return Err(HubError::bad_request(
            codes::MISSING_BLOBS,
            format!(
                "{} blob(s) not uploaded yet (first {}); PUT /api/v1/blobs/{{sha256}} them first",
                missing.len(),
                missing[0]
            ),
        ));
    }
    Ok(())
}

/// Bumps `space` to a new version with the same data, announced as forced.
pub async fn force(
    state: &AppState,
    space: &str,
    reason: Option<String>,
    by: &str,
) -> ApiResult<Head> {
    for _ in 0..MAX_ATTEMPTS {
        let head = current_head(state, space).await?;
        let manifest = state.manifest(&head.data_hash).await?;
        let new = NewVersion {
            data_hash: head.data_hash.clone(),
            forced: true,
            reason: reason.clone(),
            by: Some(by.to_owned()),
            entries: manifest.len() as u64,
            bytes: manifest.total_size(),
        };
        match state.store.create_version(space, head.version, new).await {
            Ok(head) => {
                metrics::counter!("synchub_force_syncs_total").increment(1);
                tracing::info!(space, version = head.version, by, "force sync");
                let head = published(state, head);
                return Ok(head);
            }
            Err(StoreError::HeadMoved { .. }) => {
                reread_head(state, space).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(HubError::Unavailable(
        "the head kept moving; try again".into(),
    ))
}

/// `POST /spaces/{space}/force-sync` (admin).
pub async fn force_sync(
    State(state): State<AppState>,
    principal: Principal,
    Path(space): Path<String>,
    Json(req): Json<ForceSyncRequest>,
) -> ApiResult<Response> {
    space_name(&space)?;
    principal.require_admin()?;
    req.check_bounds()
        .map_err(|e| HubError::TooLarge(e.to_string()))?;
    let head = force(&state, &space, req.reason, &principal.name).await?;
    Ok((StatusCode::CREATED, axum::Json(CommitResponse { head })).into_response())
}
