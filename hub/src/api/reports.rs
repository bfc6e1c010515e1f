//! `sync_log` over HTTP: agents post every sync they made (see [`crate::reports`]); admins list
//! them.

use super::{Json, Query};
use crate::auth::{AdminToken, Principal};
use crate::error::{ApiResult, HubError};
use crate::reports::{self, Stored};
use crate::state::AppState;
use crate::store::SyncLogFilter;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use synchub_protocol::{SyncLogEntry, SyncReport, codes};

/// `POST /sync-log`: 201 when stored, 200 when a report with this id was stored before.
pub async fn post(
    State(state): State<AppState>,
    principal: Principal,
    Json(report): Json<SyncReport>,
) -> ApiResult<(StatusCode, axum::Json<serde_json::Value>)> {
    let (report_id, stored) =
        reports::store(&state, &principal, report, reports::Via::Http).await?;
    if stored == Stored::New {
        state.clients.touch();
    }
    let status = match stored {
        Stored::New => StatusCode::CREATED,
        Stored::Duplicate => StatusCode::OK,
    };
    let stored = stored == Stored::New;
    Ok((
        status,
        axum::Json(serde_json::json!({ "report_id": report_id, "stored": stored })),
    ))
}

#[derive(Deserialize)]
pub struct LogQuery {
    space: Option<String>,
    client_id: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

/// `GET /sync-log` (admin): newest first, filtered by space, client and status.
pub async fn list(
    State(state): State<AppState>,
    _admin: AdminToken,
    Query(q): Query<LogQuery>,
) -> ApiResult<axum::Json<Vec<SyncLogEntry>>> {
    if let Some(s) = &q.status
        && s != "success"
        && s != "failed"
    {
        return Err(HubError::bad_request(
            codes::BAD_REQUEST,
            format!("status {s:?}: use success or failed"),
        ));
    }
    let filter = SyncLogFilter {
        space: q.space,
        client_id: q.client_id,
        status: q.status,
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    Ok(axum::Json(state.store.sync_log(&filter).await?))
}
