//! Reports waiting for the hub: every sync report is written to
//! `DIR/.synchub/outbox/<report_id>.json` (atomically) before anything is sent, and the file is
//! deleted only once the hub answered 201 (stored) or 200 (already had that report_id). A
//! report made offline is therefore sent later, and the hub's dedup on report_id makes a
//! resend after a lost answer harmless: each report is stored once.

use crate::error::{ClientError, IoContext, Result};
use crate::hub_api::HubApi;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::SyncReport;
use tokio::sync::Notify;

#[derive(Clone, Debug)]
pub struct Outbox {
    dir: PathBuf,
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(Outbox {
            dir,
            wake: Arc::new(Notify::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, report_id: &str) -> Result<PathBuf> {
        // report_ids are uuids; anything else must not become a path.
        if report_id.is_empty()
            || report_id.len() > 64
            || !report_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ClientError::Protocol(format!(
                "bad report_id {report_id:?}"
            )));
        }
        Ok(self.dir.join(format!("{report_id}.json")))
    }

    /// Stores a report for sending and wakes the sender.
    pub fn put(&self, report: &SyncReport) -> Result<()> {
        let path = self.path_of(&report.report_id)?;
        let json = serde_json::to_vec_pretty(report).expect("report serializes");
        crate::apply::write_atomic(&path, &json)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Reports not yet acknowledged, oldest first. Unreadable files are moved to `*.bad`.
    pub fn pending(&self) -> Vec<SyncReport> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let modified = e.metadata().and_then(|m| m.modified()).ok();
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<SyncReport>(&b).ok())
            {
                Some(r) => found.push((modified, r)),
                None => {
                    tracing::warn!(path = %path.display(), "unreadable report; moved aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                }
            }
        }
        found.sort_by_key(|a| a.0);
        found.into_iter().map(|(_, r)| r).collect()
    }

    /// The hub has the report: forget it.
    pub fn ack(&self, report_id: &str) -> Result<()> {
        let path = self.path_of(report_id)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ClientError::io(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Sends every pending report; stops at the first one the hub could not take.
    /// Returns how many were delivered.
    pub async fn flush(&self, api: &HubApi) -> Result<usize> {
        let mut sent = 0;
        for report in self.pending() {
            match api.report(&report).await {
                Ok(()) => {
                    self.ack(&report.report_id)?;
                    sent += 1;
                }
                // The hub refuses this report for good (malformed, forbidden): keep it aside
                // rather than retrying it forever.
                Err(ClientError::Api { status, error })
                    if (400..500).contains(&status)
                        && status != 408
                        && status != 429
                        && status != 401 =>
                {
                    tracing::warn!(report_id = %report.report_id, code = %error.code, "hub refused report; moved aside");
                    let path = self.path_of(&report.report_id)?;
                    let _ = std::fs::rename(&path, path.with_extension("rejected"));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Sends reports as they come and retries every few seconds until `stop` fires.
    pub async fn run(self, api: HubApi, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            match self.flush(&api).await {
                Ok(n) if n > 0 => tracing::debug!(sent = n, "reports delivered"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "reports wait for the hub"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchub_protocol::{SyncStatus, SyncType};

    fn report(id: &str) -> SyncReport {
        SyncReport {
            report_id: id.into(),
            client_id: "c".into(),
            space: "s".into(),
            sync_type: SyncType::Download,
            status: SyncStatus::Success,
            version: Some(1),
            items_synced: 3,
            items_total: Some(500),
            bytes: 10,
            duration_ms: 5,
            error_message: None,
            user: None,
            synced_at: None,
        }
    }

    #[test]
    fn put_pending_ack_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let a = uuid::Uuid::new_v4().to_string();
        let b = uuid::Uuid::new_v4().to_string();
        outbox.put(&report(&a)).unwrap();
        outbox.put(&report(&b)).unwrap();
        std::fs::write(outbox.dir().join("junk.json"), b"{").unwrap();
        let pending = outbox.pending();
        assert_eq!(pending.len(), 2);
        assert!(outbox.dir().join("junk.bad").exists());
        outbox.ack(&a).unwrap();
        outbox.ack(&a).unwrap(); // idempotent
        let pending = outbox.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].report_id, b);
        assert!(outbox.put(&report("../evil")).is_err());
    }

    #[tokio::test]
    async fn flush_keeps_reports_while_the_hub_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().to_path_buf()).unwrap();
        outbox
            .put(&report(&uuid::Uuid::new_v4().to_string()))
            .unwrap();
        // Port 9 on loopback: nothing listens.
        let api = HubApi::new(vec!["http://127.0.0.1:9".into()], "t").unwrap();
        assert!(outbox.flush(&api).await.is_err());
        assert_eq!(outbox.pending().len(), 1);
    }
}
