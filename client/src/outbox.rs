//! Reports waiting for the hub: every sync report is written to
//! `DIR/.synchub/outbox/<report_id>.json` (atomically) before anything is sent, and the file is
//! deleted only once the hub answered 201 (stored) or 200 (already had that report_id). A
//! report made offline is therefore sent later, and the hub's dedup on report_id makes a
//! resend after a lost answer harmless: each report is stored once.
//!
//! Each report is retried on its own schedule (backoff per report), so one report that keeps
//! failing does not hold back the ones after it; after [`POISON_AFTER`] failed attempts it is
//! set aside as `*.poison` with a warning. Only the hub's own refusal of a report (its JSON
//! error body, 400/403/422) sets it aside at once: a 404 or 413 from a proxy in front of the
//! hub is retried like any other failure.

use crate::backoff::Backoff;
use crate::error::{ClientError, IoContext, Result};
use crate::hub_api::HubApi;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::SyncReport;
use tokio::sync::Notify;

/// Failed attempts after which a report is set aside.
pub(crate) const POISON_AFTER: u32 = 8;

#[derive(Clone, Debug)]
pub struct Outbox {
    dir: PathBuf,
    wake: Arc<Notify>,
    /// Per report_id: failed attempts and when the next may be made.
    attempts: Arc<Mutex<HashMap<String, (Backoff, Instant)>>>,
}

impl Outbox {
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(Outbox {
            dir,
            wake: Arc::new(Notify::new()),
            attempts: Arc::default(),
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

    /// Sends every pending report that is due. A report that fails waits on its own backoff
    /// and the others still go; when the hub cannot be reached at all the round stops (the
    /// error is returned). Returns how many were delivered.
    pub async fn flush(&self, api: &HubApi) -> Result<usize> {
        let mut sent = 0;
        for report in self.pending() {
            let id = report.report_id.clone();
            let due = self
                .attempts
                .lock()
                .expect("outbox lock")
                .get(&id)
                .is_none_or(|(_, at)| *at <= Instant::now());
            if !due {
                continue;
            }
            match api.report(&report).await {
                Ok(()) => {
                    self.ack(&id)?;
                    self.attempts.lock().expect("outbox lock").remove(&id);
                    sent += 1;
                }
                // The hub itself refuses this report for good (malformed, forbidden).
                Err(ClientError::Api { status, error })
                    if matches!(status, 400 | 403 | 422) && error.code != status.to_string() =>
                {
                    tracing::warn!(report_id = %id, code = %error.code, "hub refused report; moved aside");
                    self.set_aside(&id, "rejected")?;
                }
                Err(ClientError::Unreachable(e)) => {
                    self.failed(&id, &e)?;
                    return Err(ClientError::Unreachable(e));
                }
                Err(e) => self.failed(&id, &e.to_string())?,
            }
        }
        Ok(sent)
    }

    /// Counts a failed attempt; after [`POISON_AFTER`] the report is set aside.
    fn failed(&self, id: &str, error: &str) -> Result<()> {
        let attempts = {
            let mut map = self.attempts.lock().expect("outbox lock");
            let (backoff, at) = map.entry(id.to_owned()).or_insert_with(|| {
                (
                    Backoff::new(Duration::from_secs(2), Duration::from_secs(300)),
                    Instant::now(),
                )
            });
            *at = Instant::now() + backoff.next_delay();
            backoff.attempts()
        };
        if attempts >= POISON_AFTER {
            tracing::warn!(report_id = %id, attempts, error, "report keeps failing; set aside as .poison, later reports still go");
            self.set_aside(id, "poison")?;
        } else {
            tracing::debug!(report_id = %id, attempts, error, "report not delivered; retried later");
        }
        Ok(())
    }

    fn set_aside(&self, id: &str, extension: &str) -> Result<()> {
        self.attempts.lock().expect("outbox lock").remove(id);
        let path = self.path_of(id)?;
        std::fs::rename(&path, path.with_extension(extension))
            .ctx(|| format!("setting {} aside", path.display()))
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

    /// A hub (or proxy) that answers 500 to one report and 201 to the others.
    async fn picky_hub(poison: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use axum::{Json, Router, http::StatusCode, routing::post};
        let stored = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = stored.clone();
        let app = Router::new().route(
            "/api/v1/sync-log",
            post(move |Json(r): Json<SyncReport>| {
                let (poison, count) = (poison.clone(), count.clone());
                async move {
                    if r.report_id == poison {
                        (StatusCode::INTERNAL_SERVER_ERROR, "boom")
                    } else {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        (StatusCode::CREATED, "")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, stored)
    }

    #[tokio::test]
    async fn a_404_from_a_proxy_is_retried_not_rejected() {
        use axum::{Router, http::StatusCode, routing::post};
        let app = Router::new().route(
            "/api/v1/sync-log",
            post(|| async { (StatusCode::NOT_FOUND, "<html>no route</html>") }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().to_path_buf()).unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        outbox.put(&report(&id)).unwrap();
        let api = HubApi::new(vec![url], "t").unwrap();
        assert_eq!(outbox.flush(&api).await.unwrap(), 0);
        assert_eq!(outbox.pending().len(), 1, "kept for a later attempt");
        assert!(!dir.path().join(format!("{id}.rejected")).exists());
    }

    #[tokio::test]
    async fn a_report_that_always_fails_does_not_block_the_others_and_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().to_path_buf()).unwrap();
        let bad = uuid::Uuid::new_v4().to_string();
        outbox.put(&report(&bad)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let good = uuid::Uuid::new_v4().to_string();
        outbox.put(&report(&good)).unwrap();
        let (url, stored) = picky_hub(bad.clone()).await;
        let api = HubApi::new(vec![url], "t").unwrap();
        assert_eq!(
            outbox.flush(&api).await.unwrap(),
            1,
            "the later report still goes"
        );
        assert_eq!(stored.load(std::sync::atomic::Ordering::SeqCst), 1);
        for _ in 1..POISON_AFTER {
            // Make the failing report due again without waiting out its backoff.
            for (_, at) in outbox.attempts.lock().unwrap().values_mut() {
                *at = Instant::now();
            }
            outbox.flush(&api).await.unwrap();
        }
        assert!(outbox.pending().is_empty());
        assert!(dir.path().join(format!("{bad}.poison")).exists());
    }
}
