//! Admin views of the live system: the agents connected to this replica.

use crate::auth::AdminToken;
use crate::error::ApiResult;
use crate::state::AppState;
use axum::extract::State;
use synchub_protocol::ClientInfo;

/// `GET /clients` (admin): agents connected to this replica, with their last reported state.
pub async fn clients(
    State(state): State<AppState>,
    _admin: AdminToken,
) -> ApiResult<axum::Json<Vec<ClientInfo>>> {
    Ok(axum::Json(state.clients.list()))
}
