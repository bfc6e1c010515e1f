//! Held changes: an agent in two-way mode that holds back a local mass change (see the
//! agent's mass-change guard) records it here and asks, every few seconds, what an admin
//! decided; an admin lists them and approves or rejects one (also `synchub approve|reject`).
//!
//! - `PUT /spaces/{space}/held/{client_id}` (a token of the space): record or refresh; the
//!   answer is the stored record with the decision.
//! - `DELETE /spaces/{space}/held/{client_id}` (a token of the space): the agent acted on it.
//! - `GET /held` (admin): every held change.
//! - `POST /spaces/{space}/held/{client_id}/approve|reject` (admin).

use super::{Json, space_name};
use crate::auth::Principal;
use crate::error::{ApiResult, HubError};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use synchub_protocol::{HeldChange, HeldDecision, HeldRecord, codes};

/// Longest accepted client id, in bytes (as for `sync_log` reports).
const MAX_CLIENT_ID: usize = 128;

fn client_id(id: &str) -> Result<&str, HubError> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID || id.chars().any(char::is_control) {
        return Err(HubError::bad_request(
            codes::BAD_REQUEST,
            format!("client_id must be 1 to {MAX_CLIENT_ID} bytes without control characters"),
        ));
    }
    Ok(id)
}

/// `PUT /spaces/{space}/held/{client_id}`.
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    Path((space, client)): Path<(String, String)>,
    Json(change): Json<HeldChange>,
) -> ApiResult<axum::Json<HeldRecord>> {
    space_name(&space)?;
    client_id(&client)?;
    principal.require_space(&space)?;
    change
        .validate()
        .map_err(|e| HubError::bad_request(codes::BAD_REQUEST, e))?;
    let record = state.store.put_held(&space, &client, &change).await?;
    Ok(axum::Json(record))
}

/// `DELETE /spaces/{space}/held/{client_id}`.
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path((space, client)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    space_name(&space)?;
    client_id(&client)?;
    principal.require_space(&space)?;
    state.store.delete_held(&space, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /held` (admin).
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<axum::Json<Vec<HeldRecord>>> {
    principal.require_admin()?;
    Ok(axum::Json(state.store.held_changes().await?))
}

/// `POST /spaces/{space}/held/{client_id}/approve`.
pub async fn approve(
    state: State<AppState>,
    principal: Principal,
    path: Path<(String, String)>,
) -> ApiResult<StatusCode> {
    decide(state, principal, path, HeldDecision::Approved).await
}

/// `POST /spaces/{space}/held/{client_id}/reject`.
pub async fn reject(
    state: State<AppState>,
    principal: Principal,
    path: Path<(String, String)>,
) -> ApiResult<StatusCode> {
    decide(state, principal, path, HeldDecision::Rejected).await
}

async fn decide(
    State(state): State<AppState>,
    principal: Principal,
    Path((space, client)): Path<(String, String)>,
    decision: HeldDecision,
) -> ApiResult<StatusCode> {
    space_name(&space)?;
    client_id(&client)?;
    principal.require_admin()?;
    if decide_held(&state, &space, &client, decision, &principal.name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(HubError::NotFound(format!(
            "no pending held change of {client:?} in {space:?}"
        )))
    }
}

/// Records an admin's decision (the API and the CLI); false when nothing was pending.
pub async fn decide_held(
    state: &AppState,
    space: &str,
    client: &str,
    decision: HeldDecision,
    by: &str,
) -> ApiResult<bool> {
    let done = state.store.decide_held(space, client, decision, by).await?;
    if done {
        tracing::info!(
            space,
            client,
            decision = decision.as_str(),
            by,
            "held change decided"
        );
    }
    Ok(done)
}
