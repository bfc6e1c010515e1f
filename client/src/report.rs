//! Sync reports: every download, forced sync and publish becomes one `sync_log` row on the
//! hub. A [`SyncRecord`] says what happened; the [`Reporter`] turns it into a
//! [`SyncReport`] with this agent's id and user and stores it in the outbox, which delivers it
//! when the hub answers.

use crate::error::Result;
use crate::outbox::Outbox;
use crate::publish::PublishOutcome;
use std::time::Instant;
use synchub_protocol::{SyncReport, SyncStatus, SyncType};

/// What one sync or publish did.
#[derive(Clone, Debug)]
pub(crate) struct SyncRecord<'a> {
    pub space: &'a str,
    pub sync_type: SyncType,
    pub started: Instant,
    pub outcome: Outcome,
}

/// How it ended.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Success {
        version: u64,
        /// Files that changed (not the whole version: a 4-file change reports 4).
        items_synced: u64,
        /// Files the space holds afterwards, when known.
        items_total: Option<u64>,
        bytes: u64,
    },
    Failed {
        /// The version it was after, when there was one.
        version: Option<u64>,
        error: String,
    },
}

impl Outcome {
    /// How a publish ended.
    pub(crate) fn of_publish(result: &Result<PublishOutcome>) -> Outcome {
        match result {
            Ok(o) => Outcome::Success {
                version: o.head.version,
                items_synced: o.files + o.deleted,
                items_total: o.total,
                bytes: o.bytes_uploaded,
            },
            Err(e) => Outcome::Failed {
                version: None,
                error: e.to_string(),
            },
        }
    }
}

impl SyncRecord<'_> {
    /// The report as `client_id` (run by `user`) sends it.
    pub(crate) fn report(&self, client_id: &str, user: Option<String>) -> SyncReport {
        let mut report = SyncReport {
            report_id: uuid::Uuid::new_v4().to_string(),
            client_id: client_id.to_owned(),
            space: self.space.to_owned(),
            sync_type: self.sync_type,
            status: SyncStatus::Success,
            version: None,
            items_synced: 0,
            items_total: None,
            bytes: 0,
            duration_ms: self.started.elapsed().as_millis() as u64,
            error_message: None,
            user,
            synced_at: Some(chrono::Utc::now().to_rfc3339()),
        };
        match &self.outcome {
            Outcome::Success {
                version,
                items_synced,
                items_total,
                bytes,
            } => {
                report.version = Some(*version);
                report.items_synced = *items_synced;
                report.items_total = *items_total;
                report.bytes = *bytes;
            }
            Outcome::Failed { version, error } => {
                report.status = SyncStatus::Failed;
                report.version = *version;
                report.error_message = Some(error.clone());
            }
        }
        report
    }
}

/// Records this agent's syncs in its outbox.
#[derive(Clone, Debug)]
pub(crate) struct Reporter {
    client_id: String,
    user: Option<String>,
    outbox: Outbox,
}

impl Reporter {
    pub(crate) fn new(client_id: String, user: Option<String>, outbox: Outbox) -> Self {
        Reporter {
            client_id,
            user,
            outbox,
        }
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Stores the report of `record` for delivery.
    pub(crate) fn record(&self, record: &SyncRecord<'_>) -> Result<()> {
        self.outbox
            .put(&record.report(&self.client_id, self.user.clone()))
    }
}

/// The `sync_log` report of a publish made by `client_id` (run by `user`).
pub fn upload_report(
    client_id: &str,
    space: &str,
    user: Option<String>,
    result: &Result<PublishOutcome>,
    started: Instant,
) -> SyncReport {
    SyncRecord {
        space,
        sync_type: SyncType::Upload,
        started,
        outcome: Outcome::of_publish(result),
    }
    .report(client_id, user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_report_no_items_and_their_error() {
        let record = SyncRecord {
            space: "s",
            sync_type: SyncType::Download,
            started: Instant::now(),
            outcome: Outcome::Failed {
                version: Some(4),
                error: "hash mismatch".into(),
            },
        };
        let report = record.report("pc-1", Some("ana".into()));
        assert_eq!(report.status, SyncStatus::Failed);
        assert_eq!(report.version, Some(4));
        assert_eq!(report.items_synced, 0);
        assert_eq!(report.error_message.as_deref(), Some("hash mismatch"));
        assert_eq!(report.user.as_deref(), Some("ana"));
        assert_eq!(report.client_id, "pc-1");
    }
}
