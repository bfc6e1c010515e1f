//! Admin views of the live system: the agents connected to this replica, the fleet as
//! recorded (every agent heard from, per space; see [`crate::fleet`]) and the audit log of
//! admin actions (see [`crate::audit`]).

use super::Query;
use crate::auth::AdminToken;
use crate::error::ApiResult;
use crate::state::AppState;
use axum::extract::State;
use serde::Deserialize;
use synchub_protocol::{AuditEntry, ClientInfo, FleetView, codes};

/// `GET /clients` (admin): agents connected to this replica, with their last reported state.
pub async fn clients(
    State(state): State<AppState>,
    _admin: AdminToken,
) -> ApiResult<axum::Json<Vec<ClientInfo>>> {
    Ok(axum::Json(state.clients.list()))
}

#[derive(Deserialize)]
pub struct FleetQuery {
    space: Option<String>,
}

/// `GET /fleet?space=` (admin; the default space when none is named): every agent recorded
/// for the space, online ones first, and the summary's counts.
pub async fn fleet(
    State(state): State<AppState>,
    _admin: AdminToken,
    super::Query(q): super::Query<FleetQuery>,
) -> ApiResult<axum::Json<FleetView>> {
    let space = q
        .space
        .unwrap_or_else(|| synchub_protocol::DEFAULT_SPACE.to_owned());
    synchub_protocol::validate_space(&space)
        .map_err(|e| crate::error::HubError::bad_request(codes::BAD_REQUEST, e.to_string()))?;
    Ok(axum::Json(crate::fleet::view(&state, &space).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<u32>,
}

/// `GET /audit?limit=N` (admin): the newest admin actions, newest first (100 unless `limit`
/// says otherwise, at most 1000).
pub async fn audit(
    State(state): State<AppState>,
    _admin: AdminToken,
    Query(q): Query<AuditQuery>,
) -> ApiResult<axum::Json<Vec<AuditEntry>>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(axum::Json(state.store.audit(limit).await?))
}
