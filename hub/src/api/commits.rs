//! Making new versions over HTTP: a commit, an admin's force-sync and rollback. Each handler
//! extracts, calls [`crate::versions`] and maps the result to a status.

use super::Json;
use crate::audit::{self, Peer, actions};
use crate::auth::{Admin, Publish, SpaceAccess};
use crate::error::ApiResult;
use crate::state::AppState;
use crate::versions::{self, Written};
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use synchub_protocol::{CommitRequest, CommitResponse, ForceSyncRequest, Head};

type Created = (StatusCode, axum::Json<CommitResponse>);

fn created(head: Head) -> Created {
    (StatusCode::CREATED, axum::Json(CommitResponse { head }))
}

/// `POST /spaces/{space}/commits`: 201 with the new head, or 200 with the head when nothing
/// changed.
pub async fn commit(
    State(state): State<AppState>,
    access: SpaceAccess<Publish>,
    Json(request): Json<CommitRequest>,
) -> ApiResult<Created> {
    let by = &access.principal.name;
    Ok(
        match versions::commit(&state, &access.space, by, &request).await? {
            Written::Created(head) => created(head),
            Written::Unchanged(head) => (StatusCode::OK, axum::Json(CommitResponse { head })),
        },
    )
}

/// `POST /spaces/{space}/force-sync` (admin).
pub async fn force_sync(
    State(state): State<AppState>,
    access: SpaceAccess<Admin>,
    peer: Peer,
    Json(request): Json<ForceSyncRequest>,
) -> ApiResult<Created> {
    let by = &access.principal.name;
    let head = versions::force(&state, &access.space, request.reason, by).await?;
    let target = format!("{} v{}", access.space, head.version);
    audit::record(state.store.as_ref(), by, actions::FORCE_SYNC, &target, peer).await;
    Ok(created(head))
}

/// The body of `POST /spaces/{space}/rollback`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub to_version: u64,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /spaces/{space}/rollback` (admin): a new version with version N's data, forced.
pub async fn rollback(
    State(state): State<AppState>,
    access: SpaceAccess<Admin>,
    peer: Peer,
    Json(request): Json<RollbackRequest>,
) -> ApiResult<Created> {
    let by = &access.principal.name;
    let head = versions::rollback(
        &state,
        &access.space,
        request.to_version,
        request.reason,
        by,
    )
    .await?;
    let target = format!(
        "{} v{} (data of v{})",
        access.space, head.version, request.to_version
    );
    audit::record(state.store.as_ref(), by, actions::ROLLBACK, &target, peer).await;
    Ok(created(head))
}
