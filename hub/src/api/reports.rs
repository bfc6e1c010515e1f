//! `sync_log`: agents report every sync they made (idempotent by report id); admins list them.

use super::Json;
use crate::auth::Principal;
use crate::error::{ApiResult, HubError};
use crate::state::AppState;
use crate::store::SyncLogFilter;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use synchub_protocol::{SyncLogEntry, SyncReport, codes};

const MAX_ERROR_MESSAGE: usize = 4000;

/// Checks and stores a report; returns its id and whether it was new.
pub async fn store_report(
    state: &AppState,
    principal: &Principal,
    mut report: SyncReport,
) -> ApiResult<(String, bool)> {
    let bad = |m: String| HubError::bad_request(codes::BAD_REQUEST, m);
    if report.report_id.is_empty() || report.report_id.len() > 128 {
        return Err(bad("report_id must be 1 to 128 bytes".into()));
    }
    if report.client_id.is_empty() || report.client_id.len() > 128 {
        return Err(bad("client_id must be 1 to 128 bytes".into()));
    }
    synchub_protocol::validate_space(&report.space).map_err(|e| bad(e.to_string()))?;
    principal.require_space(&report.space)?;
    if let Some(at) = &report.synced_at {
        chrono::DateTime::parse_from_rfc3339(at)
            .map_err(|e| bad(format!("synced_at {at:?} is not RFC 3339: {e}")))?;
    }
    if let Some(msg) = &mut report.error_message
        && msg.len() > MAX_ERROR_MESSAGE
    {
        let mut cut = MAX_ERROR_MESSAGE;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
    }
    if report.user.as_ref().is_some_and(|u| u.len() > 256) {
        return Err(bad("user must be at most 256 bytes".into()));
    }
    let stored = state.store.insert_report(&report).await?;
    if stored {
        metrics::counter!("synchub_reports_total", "status" => report.status.as_str()).increment(1);
        state.clients.touch();
    }
    Ok((report.report_id, stored))
}

/// `POST /sync-log`: 201 when stored, 200 when a report with this id was stored before.
pub async fn post(
    State(state): State<AppState>,
    principal: Principal,
    Json(report): Json<SyncReport>,
) -> ApiResult<Response> {
    let (report_id, stored) = store_report(&state, &principal, report).await?;
    let status = if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        axum::Json(serde_json::json!({ "report_id": report_id, "stored": stored })),
    )
        .into_response())
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
    principal: Principal,
    Query(q): Query<LogQuery>,
) -> ApiResult<axum::Json<Vec<SyncLogEntry>>> {
    principal.require_admin()?;
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
