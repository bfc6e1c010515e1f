//! Sync reports: every sync an agent made goes to `sync_log`, once (idempotent by report id).
//! Called by `POST /api/v1/sync-log` and by the socket task for a `report` frame alike.

use crate::auth::Principal;
use crate::domain::Domain;
use crate::error::HubError;
use synchub_protocol::bounds::MAX_CLOCK_SKEW_SECS;
use synchub_protocol::{SyncReport, codes};

/// Checks that `client_id` reports under `principal`'s token: a client id is bound to the
/// token of its first report or held change, and another token is refused (403), so a token
/// cannot write rows in another PC's name. Several PCs may share a token, each with its id.
pub async fn require_own_client(
    domain: &Domain,
    principal: &Principal,
    client_id: &str,
) -> Result<(), HubError> {
    let owner = domain
        .store
        .bind_client(client_id, principal.token_id)
        .await?;
    if owner == principal.token_id {
        Ok(())
    } else {
        Err(HubError::Forbidden(format!(
            "client_id {client_id:?} reports under another token; each PC keeps its own id"
        )))
    }
}

/// Whether a report was stored now or had been stored before under its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    New,
    Duplicate,
}

/// Checks `report` (every field bounded; a long error message is cut, not refused), checks that
/// `principal` may use its space and that its `client_id` is this token's (see
/// [`require_own_client`]), and stores it.
pub async fn store(
    domain: &Domain,
    principal: &Principal,
    mut report: SyncReport,
) -> Result<(String, Stored), HubError> {
    let bad = |m: String| HubError::bad_request(codes::BAD_REQUEST, m);
    report.check_bounds().map_err(|e| bad(e.to_string()))?;
    synchub_protocol::validate_space(&report.space).map_err(|e| bad(e.to_string()))?;
    principal.require_space(&report.space)?;
    require_own_client(domain, principal, &report.client_id).await?;
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
    if !domain.store.insert_report(&report).await? {
        return Ok((report.report_id, Stored::Duplicate));
    }
    metrics::counter!("synchub_reports_total", "status" => report.status.as_str()).increment(1);
    Ok((report.report_id, Stored::New))
}
