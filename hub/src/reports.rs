//! Sync reports: every sync an agent made goes to `sync_log`, once (idempotent by report id).
//! Called by `POST /api/v1/sync-log` and by the socket task for a `report` frame alike.

use crate::auth::Principal;
use crate::domain::Domain;
use crate::error::HubError;
use synchub_protocol::{SyncReport, codes};

const MAX_ERROR_MESSAGE: usize = 4000;

/// Whether a report was stored now or had been stored before under its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    New,
    Duplicate,
}

/// Checks `report` (every field bounded; a long error message is cut, not refused), checks that
/// `principal` may use its space, and stores it.
pub async fn store(
    domain: &Domain,
    principal: &Principal,
    mut report: SyncReport,
) -> Result<(String, Stored), HubError> {
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
    if !domain.store.insert_report(&report).await? {
        return Ok((report.report_id, Stored::Duplicate));
    }
    metrics::counter!("synchub_reports_total", "status" => report.status.as_str()).increment(1);
    Ok((report.report_id, Stored::New))
}
