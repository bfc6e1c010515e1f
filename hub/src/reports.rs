//! Sync reports: every sync an agent made goes to `sync_log`, once (idempotent by report id).
//! Called by `POST /api/v1/sync-log` and by the socket task for a `report` frame alike.
//!
//! After a bump a whole fleet reports within seconds, in the middle of its downloads. The
//! reports are therefore written by one [`ReportWriter`] task in batches: it takes every report
//! waiting (up to [`BATCH_ROWS`]) into one transaction, so a thousand reports cost a few commits
//! instead of a thousand. A report is acknowledged only after its batch committed; over a
//! bounded queue the hub answers 503 `busy` with `Retry-After` and the agent's outbox retries.

use crate::auth::Principal;
use crate::domain::Domain;
use crate::error::HubError;
use crate::store::Store;
use futures::FutureExt;
use std::sync::Arc;
use synchub_protocol::bounds::MAX_CLOCK_SKEW_SECS;
use synchub_protocol::{SyncReport, codes};
use tokio::sync::{mpsc, oneshot};

/// Checks that `client_id` reports under `principal`'s token: a client id is bound to the
/// token of its first report or held change, and another token is refused (403), so a token
/// cannot write rows in another PC's name. Several PCs may share a token, each with its id.
pub async fn require_own_client(
    domain: &Domain,
    principal: &Principal,
    client_id: &str,
) -> Result<(), HubError> {
    let owner = match domain.client_owners.get(client_id) {
        Some(owner) => owner,
        None => {
            let owner = domain
                .store
                .bind_client(client_id, principal.token_id)
                .await?;
            domain.client_owners.insert(client_id.to_owned(), owner);
            owner
        }
    };
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

/// How a report reached the hub, as `synchub_reports_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A `report` frame on the agent's socket.
    Socket,
    /// `POST /api/v1/sync-log`.
    Http,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Socket => "socket",
            Via::Http => "http",
        }
    }
}

/// Checks `report` (every field bounded; a long error message is cut, not refused), checks that
/// `principal` may use its space and that its `client_id` is this token's (see
/// [`require_own_client`]), and stores it.
pub async fn store(
    domain: &Domain,
    principal: &Principal,
    mut report: SyncReport,
    via: Via,
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
    if !domain.reports.write(report.clone()).await? {
        return Ok((report.report_id, Stored::Duplicate));
    }
    let (status, via) = (report.status.as_str(), via.as_str());
    metrics::counter!("synchub_reports_total", "status" => status, "via" => via).increment(1);
    Ok((report.report_id, Stored::New))
}

/// Reports written in one transaction at most.
pub const BATCH_ROWS: usize = 500;

/// A report waiting for its batch, and who is told once it is stored.
struct Queued {
    report: SyncReport,
    done: oneshot::Sender<Result<bool, String>>,
}

/// The queue of reports to store and the task that writes them in batches; the task ends once
/// every `ReportWriter` is dropped and the queue is written.
#[derive(Clone)]
pub struct ReportWriter {
    tx: mpsc::Sender<Queued>,
}

impl ReportWriter {
    /// Starts the writer over `store` with room for `queue` reports waiting (must run inside a
    /// tokio runtime).
    pub fn spawn(store: Arc<dyn Store>, queue: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue.max(1));
        tokio::spawn(write_batches(store, rx));
        ReportWriter { tx }
    }

    /// Stores `report` with the next batch; true when stored now, false when a report with its
    /// id was stored before. `Busy` when the queue is full, `Unavailable` when the batch failed.
    pub async fn write(&self, report: SyncReport) -> Result<bool, HubError> {
        let (done, stored) = oneshot::channel();
        self.tx
            .try_send(Queued { report, done })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    metrics::counter!("synchub_reports_refused_total").increment(1);
                    HubError::Busy {
                        retry_after_secs: crate::admission::RETRY_AFTER_SECS,
                    }
                }
                mpsc::error::TrySendError::Closed(_) => {
                    HubError::Unavailable("the report writer has stopped".into())
                }
            })?;
        stored
            .await
            .map_err(|_| HubError::Unavailable("the report was not stored; send it again".into()))?
            .map_err(HubError::Unavailable)
    }
}

/// Takes every report waiting (up to [`BATCH_ROWS`]) and writes them in one transaction, until
/// the queue is closed and empty. A batch that fails is written again one report at a time, so
/// one bad row fails alone; a panic fails only its batch (its reporters are told and retry).
async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(BATCH_ROWS);
    while rx.recv_many(&mut batch, BATCH_ROWS).await > 0 {
        let queued = std::mem::take(&mut batch);
        let written = std::panic::AssertUnwindSafe(write_batch(store.as_ref(), queued))
            .catch_unwind()
            .await;
        if written.is_err() {
            tracing::error!("writing a batch of sync reports panicked; its reporters retry");
        }
    }
}

async fn write_batch(store: &dyn Store, queued: Vec<Queued>) {
    let reports: Vec<SyncReport> = queued.iter().map(|q| q.report.clone()).collect();
    metrics::histogram!("synchub_report_batch_rows").record(reports.len() as f64);
    match store.insert_reports(&reports).await {
        Ok(stored) => {
            for (q, stored) in queued.into_iter().zip(stored) {
                let _ = q.done.send(Ok(stored));
            }
        }
        Err(e) if queued.len() > 1 => {
            tracing::warn!(error = %e, rows = queued.len(),
                "a batch of sync reports failed; writing them one at a time");
            for q in queued {
                let stored = store
                    .insert_reports(std::slice::from_ref(&q.report))
                    .await
                    .map(|s| s.first().copied().unwrap_or(false))
                    .map_err(|e| format!("storing the report failed: {e}"));
                let _ = q.done.send(stored);
            }
        }
        Err(e) => {
            for q in queued {
                let _ = q.done.send(Err(format!("storing the report failed: {e}")));
            }
        }
    }
}
