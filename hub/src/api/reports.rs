//! `sync_log`: agents report every sync they made (idempotent by report id); admins list them.

use super::{Json, Query};
use crate::auth::Principal;
use crate::error::{ApiResult, HubError};
use crate::state::AppState;
use crate::store::SyncLogFilter;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use synchub_protocol::bounds::MAX_CLOCK_SKEW_SECS;
use synchub_protocol::{SyncLogEntry, SyncReport, codes};

/// Checks and stores a report; returns its id and whether it was new.
pub async fn store_report(
    state: &AppState,
    principal: &Principal,
    mut report: SyncReport,
) -> ApiResult<(String, bool)> {
    let bad = |m: String| HubError::bad_request(codes::BAD_REQUEST, m);
    report.check_bounds().map_err(|e| bad(e.to_string()))?;
    synchub_protocol::validate_space(&report.space).map_err(|e| bad(e.to_string()))?;
    principal.require_space(&report.space)?;
    if let Some(at) = &report.synced_at {
        let when = chrono::DateTime::parse_from_rfc3339(at)
            .map_err(|e| bad(format!("synced_at {at:?} is not RFC 3339: {e}")))?;
        let now = chrono::Utc::now();
        if when > now + chrono::Duration::seconds(MAX_CLOCK_SKEW_SECS) {
            // A PC clock ahead (or a forged date) would pin the report at the top of
            // `sync_log` for good: the report is kept, at the hub's time.
            tracing::warn!(
                client = report.client_id,
                synced_at = at,
                "report dated in the future; stored at the hub's time"
            );
            report.synced_at = Some(now.to_rfc3339());
        }
    }
    let stored = state.store.insert_report(&report).await?;
    if stored {
        metrics::counter!("synchub_reports_total", "status" => report.status.as_str()).increment(1);
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
