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
//!
//! While the agent's WebSocket is up (welcomed), its session attaches to the outbox
//! ([`Outbox::attach_socket`]) and reports go as `report` frames on it instead of one HTTP
//! request each; the session hands the hub's `report_ack` back ([`Outbox::acked_on_socket`]),
//! which deletes the file. A report the socket does not ack within [`ACK_WAIT`] (the socket
//! dropped, the hub answered an `error` frame, a hub that never acks) goes over HTTP from then
//! on, where a refusal is told apart precisely; when the socket drops, at once. The file stays
//! until one way or the other acks it.

use crate::backoff::Backoff;
use crate::error::{ClientError, IoContext, Result};
use crate::hub_api::HubApi;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::SyncReport;
use tokio::sync::{Notify, mpsc};

/// Failed attempts after which a report is set aside.
pub(crate) const POISON_AFTER: u32 = 8;

/// How long a report sent on the socket waits for its `report_ack` before it goes over HTTP:
/// as long as a report over HTTP may take.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(10);

/// Most reports waiting for their ack on the socket at once (the hub stores a socket's reports
/// one after the other); the others wait for the next round.
const MAX_ON_SOCKET: usize = 32;

#[derive(Clone, Debug)]
pub struct Outbox {
    dir: PathBuf,
    wake: Arc<Notify>,
    /// Per report_id: failed attempts and when the next may be made.
    attempts: Arc<Mutex<HashMap<String, (Backoff, Instant)>>>,
    socket: Arc<Mutex<SocketRoute>>,
    ack_wait: Duration,
}

/// Where reports go while a socket is up.
#[derive(Debug, Default)]
struct SocketRoute {
    /// The attached session's queue, with its attach number (a stale detach must not take a
    /// newer session's queue away).
    queue: Option<(u64, mpsc::Sender<SyncReport>)>,
    attaches: u64,
    /// Reports handed to a socket, by report_id, with when the wait for their ack ends. An id
    /// stays here until the report is acked or set aside: once its wait is over it goes over
    /// HTTP only.
    sent: HashMap<String, Instant>,
}

/// How a due report goes this round.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// On the socket (now, or earlier and its ack is awaited; or on a later round).
    Socket,
    Http,
}

/// The reports an attached socket session sends as `report` frames; dropping it detaches the
/// session, and the reports it left unacked go over HTTP on the next round.
#[derive(Debug)]
pub(crate) struct SocketReports {
    outbox: Outbox,
    attach: u64,
    queue: mpsc::Receiver<SyncReport>,
}

impl SocketReports {
    /// The next report to send; `None` once another session took over.
    pub(crate) async fn next(&mut self) -> Option<SyncReport> {
        self.queue.recv().await
    }
}

impl Drop for SocketReports {
    fn drop(&mut self) {
        self.outbox.detach_socket(self.attach);
    }
}

impl Outbox {
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(Outbox {
            dir,
            wake: Arc::new(Notify::new()),
            attempts: Arc::default(),
            socket: Arc::default(),
            ack_wait: ACK_WAIT,
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
                return Err(ClientError::io(format!("removing {}", path.display()), e));
            }
            _ => {}
        }
        self.attempts.lock().expect("outbox lock").remove(report_id);
        self.socket
            .lock()
            .expect("outbox lock")
            .sent
            .remove(report_id);
        Ok(())
    }

    /// From now on due reports go to the returned queue, for a welcomed socket to send, until
    /// it is dropped. Wakes the sender, so reports waiting go at once.
    pub(crate) fn attach_socket(&self) -> SocketReports {
        let (tx, queue) = mpsc::channel(MAX_ON_SOCKET);
        let attach = {
            let mut route = self.socket.lock().expect("outbox lock");
            route.attaches += 1;
            route.queue = Some((route.attaches, tx));
            route.attaches
        };
        self.wake.notify_one();
        SocketReports {
            outbox: self.clone(),
            attach,
            queue,
        }
    }

    /// The socket of `attach` is gone: what it left unacked goes over HTTP at once.
    fn detach_socket(&self, attach: u64) {
        let mut route = self.socket.lock().expect("outbox lock");
        if route.queue.as_ref().is_some_and(|(a, _)| *a == attach) {
            route.queue = None;
        }
        let now = Instant::now();
        for until in route.sent.values_mut() {
            *until = (*until).min(now);
        }
        drop(route);
        self.wake.notify_one();
    }

    /// The hub answered `report_ack` on the socket. An id this agent did not send on a socket
    /// is ignored (only a report the hub was given can be acked).
    pub(crate) fn acked_on_socket(&self, report_id: &str) {
        if !self
            .socket
            .lock()
            .expect("outbox lock")
            .sent
            .contains_key(report_id)
        {
            tracing::debug!(report_id, "report_ack for a report not sent on the socket");
            return;
        }
        if let Err(e) = self.ack(report_id) {
            tracing::warn!(report_id, error = %e, "could not forget an acked report");
        }
    }

    /// Hands `report` to the attached socket when there is one and it has not had the report
    /// before; a report whose ack wait is over goes over HTTP.
    fn route(&self, report: &SyncReport) -> Route {
        let now = Instant::now();
        let mut route = self.socket.lock().expect("outbox lock");
        if let Some(until) = route.sent.get(&report.report_id) {
            return if now < *until {
                Route::Socket
            } else {
                Route::Http
            };
        }
        let Some((_, queue)) = &route.queue else {
            return Route::Http;
        };
        if route.sent.values().filter(|until| now < **until).count() >= MAX_ON_SOCKET {
            return Route::Socket;
        }
        match queue.try_send(report.clone()) {
            Ok(()) => {
                let until = now + self.ack_wait;
                route.sent.insert(report.report_id.clone(), until);
                Route::Socket
            }
            Err(mpsc::error::TrySendError::Full(_)) => Route::Socket,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                route.queue = None;
                Route::Http
            }
        }
    }

    /// Sends every pending report that is due: on the attached socket when there is one (see
    /// the module's comment), else over HTTP. A report that fails over HTTP waits on its own
    /// backoff and the others still go; when the hub cannot be reached at all the round stops
    /// (the error is returned). Returns how many were delivered over HTTP.
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
            if !due || self.route(&report) == Route::Socket {
                continue;
            }
            match api.report(&report).await {
                Ok(()) => {
                    self.ack(&id)?;
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
        self.socket.lock().expect("outbox lock").sent.remove(id);
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
    async fn a_report_the_socket_does_not_ack_goes_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path().to_path_buf()).unwrap();
        outbox.ack_wait = Duration::from_millis(300);
        let (url, stored) = picky_hub(String::new()).await;
        let api = HubApi::new(vec![url], "t").unwrap();
        // A socket that takes reports and never acks (an old hub, an error frame).
        let mut socket = outbox.attach_socket();
        let id = uuid::Uuid::new_v4().to_string();
        outbox.put(&report(&id)).unwrap();
        assert_eq!(outbox.flush(&api).await.unwrap(), 0);
        let sent = tokio::time::timeout(Duration::from_secs(1), socket.next())
            .await
            .expect("the report went to the socket")
            .unwrap();
        assert_eq!(sent.report_id, id);
        // While its ack is awaited, neither way sends it again.
        assert_eq!(outbox.flush(&api).await.unwrap(), 0);
        assert!(socket.queue.try_recv().is_err(), "sent on the socket once");
        assert_eq!(stored.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(outbox.pending().len(), 1, "kept until acked");

        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            outbox.flush(&api).await.unwrap(),
            1,
            "over HTTP once the wait is over"
        );
        assert_eq!(stored.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(outbox.pending().is_empty());
        assert!(socket.queue.try_recv().is_err(), "not on the socket again");
    }

    #[tokio::test]
    async fn a_report_acked_on_the_socket_is_forgotten_and_a_dropped_socket_hands_back_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().to_path_buf()).unwrap();
        let (url, stored) = picky_hub(String::new()).await;
        let api = HubApi::new(vec![url], "t").unwrap();
        let mut socket = outbox.attach_socket();
        let (a, b) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        outbox.put(&report(&a)).unwrap();
        // An ack for a report not (yet) sent on the socket is not taken.
        outbox.acked_on_socket(&a);
        assert_eq!(outbox.pending().len(), 1);
        std::thread::sleep(Duration::from_millis(20));
        outbox.put(&report(&b)).unwrap();
        assert_eq!(outbox.flush(&api).await.unwrap(), 0);
        assert_eq!(socket.next().await.unwrap().report_id, a);
        assert_eq!(socket.next().await.unwrap().report_id, b);
        outbox.acked_on_socket(&a);
        let pending = outbox.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].report_id, b);

        // The socket drops before `b`'s ack: it goes over HTTP on the next round, without
        // waiting out ACK_WAIT.
        drop(socket);
        assert_eq!(outbox.flush(&api).await.unwrap(), 1);
        assert_eq!(stored.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(outbox.pending().is_empty());
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
