//! Held changes over HTTP (see [`crate::held`]):
//!
//! - `PUT /spaces/{space}/held/{client_id}` (a token that may publish to the space): record
//!   or refresh; the answer is the stored record with the decision.
//! - `DELETE /spaces/{space}/held/{client_id}` (the same): the agent acted on it.
//!
//!   Both need `{client_id}` to be the calling token's (bound by its first report, held
//!   change or `hello`, see [`crate::reports::require_own_client`]): one PC cannot hold or withdraw
//!   another's change.
//! - `GET /held` (admin): every held change.
//! - `POST /spaces/{space}/held/{client_id}/approve|reject` (admin).
//!
//! A held change this replica hears of for the first time, a decision and a deletion tell the
//! dashboard's event stream; the first also goes to the alerts.

use super::Json;
use crate::audit::{self, Peer, actions};
use crate::auth::{Admin, AdminToken, Publish, SpaceAccess};
use crate::error::ApiResult;
use crate::held;
use crate::reports::require_own_client;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use synchub_protocol::{HeldChange, HeldDecision, HeldRecord};

/// `PUT /spaces/{space}/held/{client_id}`.
pub async fn put(
    State(state): State<AppState>,
    access: SpaceAccess<Publish>,
    Path((_, client)): Path<(String, String)>,
    Json(change): Json<HeldChange>,
) -> ApiResult<axum::Json<HeldRecord>> {
    held::client_id(&client)?;
    require_own_client(&state, &access.principal, &client).await?;
    let record = held::record(&state, &access.space, &client, &change).await?;
    if record.decision == HeldDecision::Pending && state.held_heard.first(&record) {
        state.clients.touch();
        // No receiver (alerts off) is fine.
        let _ = state.held_news.send(record.clone());
    }
    Ok(axum::Json(record))
}

/// `DELETE /spaces/{space}/held/{client_id}`.
pub async fn delete(
    State(state): State<AppState>,
    access: SpaceAccess<Publish>,
    Path((_, client)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    held::client_id(&client)?;
    require_own_client(&state, &access.principal, &client).await?;
    held::forget(&state, &access.space, &client).await?;
    state.held_heard.forget(&access.space, &client);
    state.clients.touch();
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /held` (admin).
pub async fn list(
    State(state): State<AppState>,
    _admin: AdminToken,
) -> ApiResult<axum::Json<Vec<HeldRecord>>> {
    Ok(axum::Json(held::list(&state).await?))
}

/// `POST /spaces/{space}/held/{client_id}/approve`.
pub async fn approve(
    State(state): State<AppState>,
    access: SpaceAccess<Admin>,
    peer: Peer,
    Path((_, client)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let decision = HeldDecision::Approved;
    decide(
        &state,
        &access,
        peer,
        &client,
        decision,
        actions::HELD_APPROVE,
    )
    .await
}

/// `POST /spaces/{space}/held/{client_id}/reject`.
pub async fn reject(
    State(state): State<AppState>,
    access: SpaceAccess<Admin>,
    peer: Peer,
    Path((_, client)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let decision = HeldDecision::Rejected;
    decide(
        &state,
        &access,
        peer,
        &client,
        decision,
        actions::HELD_REJECT,
    )
    .await
}

/// Records an admin's decision on a held change, tells the dashboard, and audits it.
async fn decide(
    state: &AppState,
    access: &SpaceAccess<Admin>,
    peer: Peer,
    client: &str,
    decision: HeldDecision,
    action: &str,
) -> ApiResult<StatusCode> {
    let by = &access.principal.name;
    held::decide(state, &access.space, client, decision, by).await?;
    state.clients.touch();
    let target = format!("{}/{client}", access.space);
    audit::record(state.store.as_ref(), by, action, &target, peer).await;
    Ok(StatusCode::NO_CONTENT)
}
