//! One space: the state it shares with the rest of the client (the newest head the hub
//! announced, from the WebSocket or a head check; the state watch that status frames, the
//! local API and `state.json` follow; the gate that blocks local readers) and its worker.
//!
//! The worker compares the announced head with the held version; when they differ it blocks
//! local use, downloads, verifies, prepares the new tree, waits for readers to let go and
//! switches `current`. Failures leave the old tree in place and retry with backoff. While a
//! version restored with `synchub-agent restore` is held (see `restore.rs`) it follows no
//! head until `synchub-agent resume`.

use crate::SpaceStatus;
use crate::agent::Agent;
use crate::apply::{self, Held, Layout};
use crate::backoff::Backoff;
use crate::cache::Cache;
use crate::config::OnFailure;
use crate::download::{self, DownloadOptions, DownloadStats, Progress};
use crate::error::{ClientError, Result};
use crate::report::{Outcome, SyncRecord};
use crate::state::{Event, transition};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentState, FrameDelta, Head, Sha256Hex, Spread, SyncType};
use tokio::sync::{Notify, RwLock, watch};

/// A space as every task of the agent sees it.
pub(crate) struct Space {
    pub name: String,
    pub layout: Layout,
    pub state: watch::Sender<AgentState>,
    /// Newest head announced by the hub.
    pub head: watch::Sender<Option<Head>>,
    /// What the applied tree is (what `hello` tells the hub).
    held: Mutex<Option<HeldVersion>>,
    /// Readers hold it shared; the switch takes it exclusively.
    pub gate: Arc<RwLock<()>>,
    /// `POST /sync` and `SyncClient::sync_now`: retry or check now.
    pub sync_now: Notify,
    last_error: Mutex<Option<String>>,
    pub(crate) progress: Arc<Progress>,
    /// Held while `state.json` is written: one writer at a time, each writing the newest state.
    state_file: Mutex<()>,
    /// What the last `sync_required` frame carried beside its head, and the version it
    /// announced.
    announced: Mutex<(u64, Beside)>,
}

/// What a `sync_required` frame may carry beside the head: the spread hint and the manifest
/// delta from the version before.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Beside {
    pub spread: Spread,
    pub delta: Option<FrameDelta>,
}

impl Beside {
    /// What a frame's text carries beside its head (nothing when it is not a `sync_required`).
    pub(crate) fn of_frame(text: &str) -> Beside {
        Beside {
            spread: Spread::of_frame(text),
            delta: FrameDelta::of_frame(text),
        }
    }
}

/// The version and data hash of the applied tree. With selective sync, the data hash of the
/// head the part was taken from (the part's own hash names no version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldVersion {
    pub version: u64,
    pub data_hash: Sha256Hex,
}

/// Where a head came from (for logs): every source follows the same rule, [`follows`], so
/// neither a lagging replica's `welcome` nor a slow HTTP answer can undo a newer head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeadSource {
    Welcome,
    Push,
    Poll,
}

impl Space {
    pub(crate) fn new(name: String, layout: Layout) -> Self {
        Space {
            name,
            layout,
            state: watch::Sender::new(AgentState::Starting { version: 0 }),
            head: watch::Sender::new(None),
            held: Mutex::new(None),
            gate: Arc::new(RwLock::new(())),
            sync_now: Notify::new(),
            last_error: Mutex::new(None),
            progress: Arc::new(Progress::default()),
            state_file: Mutex::new(()),
            announced: Mutex::new((0, Beside::default())),
        }
    }

    /// Records a head from the hub; wakes the worker when it differs from the known one.
    pub(crate) fn offer_head(&self, head: Head, source: HeadSource) {
        self.head.send_if_modified(|cur| {
            let take = cur.as_ref().is_none_or(|c| follows(c, &head));
            if !take && cur.as_ref().is_some_and(|c| c.version > head.version) {
                tracing::debug!(space = %self.name, offered = head.version, ?source,
                    "ignoring an older head (a replica that lags)");
            }
            if take {
                *cur = Some(head);
            }
            take
        });
    }

    /// Records what the hub sent beside its announcement of `version` (the spread hint, the
    /// manifest delta).
    pub(crate) fn note_announcement(&self, version: u64, beside: Beside) {
        *self.announced.lock().expect("announcement lock") = (version, beside);
    }

    /// How long the hub asked agents to spread their downloads of `version` over (bounded:
    /// a hub cannot hold a PC back for long).
    fn spread_for(&self, version: u64) -> Duration {
        let announced = self.announced.lock().expect("announcement lock");
        if announced.0 != version {
            return Duration::ZERO;
        }
        Duration::from_millis(announced.1.spread.spread_ms).min(MAX_SPREAD)
    }

    /// The manifest delta the hub sent with its announcement of `version`, if it sent one.
    fn frame_delta_for(&self, version: u64) -> Option<FrameDelta> {
        let announced = self.announced.lock().expect("announcement lock");
        (announced.0 == version)
            .then(|| announced.1.delta.clone())
            .flatten()
    }

    /// Resolves once a head other than `head` is known (see [`follows`]).
    async fn superseded(&self, head: &Head) {
        let mut rx = self.head.subscribe();
        let _ = rx.wait_for(|h| h.as_ref().is_some_and(|h| h != head)).await;
    }

    pub(crate) fn held(&self) -> Option<HeldVersion> {
        self.held.lock().expect("held lock").clone()
    }

    pub(crate) fn set_held(&self, held: Option<HeldVersion>) {
        *self.held.lock().expect("held lock") = held;
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("error lock").clone()
    }

    pub(crate) fn set_error(&self, error: Option<String>) {
        *self.last_error.lock().expect("error lock") = error;
    }

    /// What `/status` and `/events` show of this space in `state`.
    pub(crate) fn status_in(&self, state: AgentState) -> SpaceStatus {
        SpaceStatus {
            space: self.name.clone(),
            allows_use: state.allows_use(),
            state,
            hub_version: self.head.borrow().as_ref().map(|h| h.version),
            last_error: self.last_error(),
            applied_at: self.applied_at(),
            held_change: crate::twoway::held_change(&self.layout),
            restored: crate::restore::restored(&self.layout),
        }
    }

    pub(crate) fn status(&self) -> SpaceStatus {
        self.status_in(self.state.borrow().clone())
    }

    /// When the data held now was put in place: the time `current` was switched.
    fn applied_at(&self) -> Option<String> {
        let modified = std::fs::symlink_metadata(self.layout.current())
            .and_then(|m| m.modified())
            .ok()?;
        Some(chrono::DateTime::<chrono::Utc>::from(modified).to_rfc3339())
    }

    pub(crate) fn set(&self, event: Event) {
        self.state.send_modify(|s| *s = transition(s, event));
        self.write_state_file();
    }

    /// Writes the newest state to `state.json`. Callers on several tasks are serialized and
    /// each writes what is current when its turn comes, so an older state never lands last.
    fn write_state_file(&self) {
        let _one_writer = self.state_file.lock().expect("state file lock");
        let state = &self.state.borrow().clone();
        #[derive(Serialize)]
        struct StateFile<'a> {
            space: &'a str,
            allows_use: bool,
            #[serde(flatten)]
            state: &'a AgentState,
            last_error: Option<String>,
            updated_at: String,
        }
        let body = StateFile {
            space: &self.name,
            allows_use: state.allows_use(),
            state,
            last_error: self.last_error(),
            updated_at: chrono::Utc::now().to_rfc3339(),
        };
        let json = serde_json::to_vec_pretty(&body).expect("state serializes");
        if let Err(e) = apply::write_atomic(&self.layout.state_file(), &json) {
            tracing::warn!(error = %e, "could not write state.json");
        }
    }
}

/// The longest spread hint an agent follows; a larger one is cut to this.
const MAX_SPREAD: Duration = Duration::from_secs(60);

/// Whether `next` replaces `current`. Within an epoch heads only move forward. A newer epoch
/// (the hub found its database rewritten) is followed even to a lower version. An older epoch
/// is taken only with a higher version: a replica that has not noticed the rewrite yet, or one
/// restarted since (its epoch starts again at 0), which moves on from there.
pub(crate) fn follows(current: &Head, next: &Head) -> bool {
    use std::cmp::Ordering::*;
    let moved = (next.version, &next.data_hash) != (current.version, &current.data_hash);
    match next.epoch.cmp(&current.epoch) {
        Greater => moved,
        Equal => {
            next.version > current.version
                || (next.version == current.version && next.data_hash != current.data_hash)
        }
        Less => next.version > current.version,
    }
}

/// Whether every local file must be checked again: the head is forced, or a force-sync
/// happened after the version held (the agent skipped it).
fn must_reverify(held: Option<&Held>, head: &Head) -> bool {
    head.forced || held.is_some_and(|h| head.forced_version > h.version)
}

/// With selective sync the held tree's manifest is a part of the head's, so its hash differs:
/// the version, and the data hash of the head the part was taken from (once known), decide.
fn needs_sync(
    held: Option<&Held>,
    head: &Head,
    selective: bool,
    taken_from: Option<&Sha256Hex>,
) -> bool {
    match held {
        None => true,
        Some(h) if selective => {
            h.version != head.version || taken_from.is_some_and(|t| *t != head.data_hash)
        }
        Some(h) => h.version != head.version || h.data_hash != head.data_hash,
    }
}

/// Runs the space's worker until the agent stops.
pub(crate) async fn run_worker(space: Arc<Space>, agent: Arc<Agent>) {
    let Some(worker) = Worker::start(space, agent).await else {
        return;
    };
    worker.run().await;
}

/// The sync loop of one space and what it keeps between attempts.
struct Worker {
    space: Arc<Space>,
    agent: Arc<Agent>,
    cache: Cache,
    held: Option<Held>,
    /// Data hash of the head the held part was taken from (selective sync).
    taken_from: Option<Sha256Hex>,
    backoff: Backoff,
    /// After a failure: no new attempt before this (unless asked, or the head moves).
    retry_at: Option<Instant>,
    /// At start: when to stop waiting for a first head.
    boot_deadline: Instant,
    /// The folder's lock, held while the worker runs (`restore` takes it too).
    _lock: Option<std::fs::File>,
    /// While a non-forced download waits out its spread: when it starts. Drawn once per wait,
    /// so a newer head arriving meanwhile does not make a second wait.
    spread_until: Option<(Instant, chrono::DateTime<chrono::Utc>)>,
}

/// What a successful attempt put in place.
struct Applied {
    held: Held,
    stats: DownloadStats,
}

impl Worker {
    /// Recovers the local tree and opens the cache (retrying until it opens); `None` when the
    /// agent stops first.
    async fn start(space: Arc<Space>, agent: Arc<Agent>) -> Option<Worker> {
        let boot_deadline = Instant::now() + Duration::from_millis(agent.config.boot_wait_ms);
        let lock = loop {
            match crate::restore::lock_folder(&space.layout) {
                Ok(Some(lock)) => break Some(lock),
                Ok(None) => {
                    tracing::info!(space = %space.name, "a restore is running on this folder; waiting for it");
                }
                Err(e) => {
                    // A file system without locks: run unguarded rather than not at all.
                    tracing::warn!(space = %space.name, error = %e, "cannot lock the folder; running without the lock");
                    break None;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = agent.stopped() => return None,
            }
        };
        let recovered = {
            let layout = space.layout.clone();
            let previous = agent.config.keep_trees;
            tokio::task::spawn_blocking(move || apply::recover(&layout, previous)).await
        };
        let held = match recovered {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::error!(space = %space.name, error = %e, "cannot read the local tree");
                space.set_error(Some(e.to_string()));
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "recovery panicked");
                None
            }
        };
        let stale_allowed = agent.config.on_failure == OnFailure::UnblockStale && held.is_some();
        let cache = loop {
            match Cache::open(space.layout.cache_dir()) {
                Ok(c) => break c,
                Err(e) => {
                    // Not for good: the folder may come back (a network drive, a full disk).
                    tracing::error!(error = %e, "cannot open the cache; retrying");
                    space.set_error(Some(e.to_string()));
                    space.set(Event::Failed {
                        error: format!("cannot open the cache: {e}"),
                        retry_at: None,
                        stale_allowed,
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = agent.stopped() => return None,
                    }
                }
            }
        };
        cache.clean_temp();
        space.set_held(held.as_ref().map(|h| HeldVersion {
            version: h.version,
            data_hash: h.data_hash.clone(),
        }));
        let version = held.as_ref().map_or(0, |h| h.version);
        space.state.send_replace(AgentState::Starting { version });
        space.write_state_file();
        tracing::info!(space = %space.name, version, "holding");
        let backoff = Backoff::new(
            Duration::from_secs(1),
            Duration::from_millis(agent.config.max_backoff_ms.max(1000)),
        );
        Some(Worker {
            space,
            agent,
            cache,
            held,
            taken_from: None,
            backoff,
            retry_at: None,
            boot_deadline,
            _lock: lock,
            spread_until: None,
        })
    }

    fn stale_allowed(&self) -> bool {
        self.agent.config.on_failure == OnFailure::UnblockStale && self.held.is_some()
    }

    fn needs_sync(&self, head: &Head) -> bool {
        needs_sync(
            self.held.as_ref(),
            head,
            self.agent.selection.is_some(),
            self.taken_from.as_ref(),
        )
    }

    async fn run(mut self) {
        let agent = self.agent.clone();
        let space = self.space.clone();
        let mut head_rx = space.head.subscribe();
        loop {
            if *agent.stop.borrow() {
                return;
            }
            let head = head_rx.borrow_and_update().clone();
            if crate::restore::restored(&space.layout).is_some() {
                self.hold_restored(&mut head_rx).await;
                continue;
            }
            if let Some(head) = head.filter(|h| self.needs_sync(h)) {
                if let Some(at) = self.retry_at.take() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = space.sync_now.notified() => {}
                        _ = head_rx.changed() => {}
                        _ = agent.stopped() => return,
                    }
                    continue;
                }
                if let Some(at) = self.spread_start(&head) {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        // "Update now" on the block page: no more waiting.
                        _ = space.sync_now.notified() => {
                            self.spread_until = Some((Instant::now(), chrono::Utc::now()));
                        }
                        _ = head_rx.changed() => {}
                        _ = agent.stopped() => return,
                    }
                    continue;
                }
                self.spread_until = None;
                tokio::select! {
                    _ = self.sync(&head) => {}
                    _ = agent.stopped() => return,
                }
                continue;
            }
            self.spread_until = None;
            if head_rx.borrow().is_some()
                && !matches!(*space.state.borrow(), AgentState::Ready { .. })
            {
                space.set(Event::UpToDate);
            }
            // No head at all since start (the hub is unreachable): after a bounded wait the
            // space says so, under the usual stale-use policy, instead of staying `starting`.
            let booting = head_rx.borrow().is_none()
                && matches!(*space.state.borrow(), AgentState::Starting { .. });
            let deadline = self.boot_deadline;
            let boot_timeout = async move {
                if booting {
                    tokio::time::sleep_until(deadline.into()).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                r = head_rx.changed() => if r.is_err() { return },
                _ = space.sync_now.notified() => {}
                _ = boot_timeout => self.no_head_at_boot(),
                _ = agent.stopped() => return,
            }
        }
    }

    /// A restored version is held on purpose: programs may use it and no head is followed
    /// until `synchub-agent resume` removes the mark (looked for every second, or at once on
    /// `POST /sync`).
    async fn hold_restored(&mut self, head_rx: &mut watch::Receiver<Option<Head>>) {
        if !matches!(*self.space.state.borrow(), AgentState::Ready { .. }) {
            tracing::info!(space = %self.space.name, "holding a restored version until `synchub-agent resume`");
            self.space.set_error(None);
            self.space.set(Event::UpToDate);
        }
        self.retry_at = None;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = self.space.sync_now.notified() => {}
            _ = head_rx.changed() => {}
            _ = self.agent.stopped() => {}
        }
    }

    /// Before a download of `head`: when it may start, if that is later than now. A forced
    /// head starts at once; otherwise the start is drawn uniformly within the hub's spread hint
    /// (or the configured `download_jitter_ms`, whichever is longer), once per wait, and the
    /// space says it is waiting and until when.
    fn spread_start(&mut self, head: &Head) -> Option<Instant> {
        if head.forced {
            self.spread_until = None;
            return None;
        }
        let now = Instant::now();
        let (at, wall) = *self.spread_until.get_or_insert_with(|| {
            let window = self
                .space
                .spread_for(head.version)
                .max(Duration::from_millis(self.agent.config.download_jitter_ms));
            let wait = Duration::from_millis(rand::random_range(0..=window.as_millis() as u64));
            let wall = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            (now + wait, wall)
        });
        if at <= now {
            return None;
        }
        tracing::info!(space = %self.space.name, target = head.version,
            wait_ms = (at - now).as_millis() as u64, "spreading the download before it starts");
        self.space.set(Event::Spreading {
            target: head.version,
            starts_at: wall.to_rfc3339(),
        });
        Some(at)
    }

    fn no_head_at_boot(&self) {
        let error = format!(
            "no head from the hub within {} s of start",
            self.agent.config.boot_wait_ms / 1000
        );
        tracing::warn!(space = %self.space.name, %error);
        self.space.set_error(Some(error.clone()));
        self.space.set(Event::Failed {
            error,
            retry_at: None,
            stale_allowed: self.stale_allowed(),
        });
    }

    /// One attempt at `head`, reported whatever its end (but a newer head cutting it short).
    async fn sync(&mut self, head: &Head) {
        let started = Instant::now();
        let hub_in_use = self.agent.api.position();
        self.space.set(Event::HeadChanged {
            target: head.version,
            forced: head.forced,
        });
        let sync_type = if must_reverify(self.held.as_ref(), head) {
            SyncType::ForceSync
        } else {
            SyncType::Download
        };
        let result = sync_once(
            &self.space,
            &self.agent,
            &self.cache,
            self.held.as_ref(),
            head,
        )
        .await;
        let outcome = match result {
            Err(ClientError::Superseded) => {
                tracing::info!(space = %self.space.name, target = head.version,
                    "a newer head arrived during the sync; starting over for it");
                return;
            }
            Ok(applied) => self.applied(head, applied, started),
            Err(e) => self.failed(head, e, hub_in_use),
        };
        let record = SyncRecord {
            space: &self.space.name,
            sync_type,
            started,
            outcome,
        };
        if let Err(e) = self.agent.reporter.record(&record) {
            tracing::error!(error = %e, "could not store a sync report");
        }
    }

    fn applied(&mut self, head: &Head, applied: Applied, started: Instant) -> Outcome {
        let Applied { held, stats } = applied;
        tracing::info!(space = %self.space.name, version = held.version,
            blobs = stats.blobs_fetched, bytes = stats.bytes_fetched, carried = stats.carried,
            repaired = stats.repaired, ms = started.elapsed().as_millis() as u64,
            "applied");
        self.space.set_error(None);
        // With selective sync, the head's hash: the part's own hash names no version.
        let data_hash = if self.agent.selection.is_some() {
            head.data_hash.clone()
        } else {
            held.data_hash.clone()
        };
        self.taken_from = Some(head.data_hash.clone());
        self.space.set_held(Some(HeldVersion {
            version: held.version,
            data_hash,
        }));
        // What changed, not the whole version: a 4-file change reports 4.
        let total = held.manifest.len() as u64;
        let changed = match &self.held {
            Some(old) => held.manifest.changes_from(&old.manifest),
            None => total,
        };
        let version = held.version;
        self.held = Some(held);
        self.backoff.reset();
        self.space.set(Event::Applied { version });
        Outcome::Success {
            version,
            items_synced: changed,
            items_total: Some(total),
            // What reached this PC for the sync: fetched, or carried in the frame.
            bytes: stats.bytes_fetched + stats.carried_bytes,
        }
    }

    fn failed(&mut self, head: &Head, error: ClientError, hub_in_use: usize) -> Outcome {
        if matches!(error, ClientError::Unreachable(_)) {
            // Try the next configured hub (unless the connection moved on already).
            self.agent.api.rotate_from(hub_in_use);
        }
        let delay = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        let retry_wall = chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        tracing::warn!(space = %self.space.name, target = head.version, error = %error,
            retry_in_ms = delay.as_millis() as u64, "sync failed; nothing applied");
        let error = error.to_string();
        self.space.set_error(Some(error.clone()));
        self.space.set(Event::Failed {
            error: error.clone(),
            retry_at: Some(retry_wall.to_rfc3339()),
            stale_allowed: self.stale_allowed(),
        });
        Outcome::Failed {
            version: Some(head.version),
            error,
        }
    }
}

/// One attempt: download, verify, prepare, switch.
async fn sync_once(
    space: &Arc<Space>,
    agent: &Agent,
    cache: &Cache,
    held: Option<&Held>,
    head: &Head,
) -> Result<Applied> {
    let started = Instant::now();
    space.set(Event::Progress {
        files_done: 0,
        files_total: 0,
        bytes_done: 0,
        bytes_total: 0,
        bytes_per_sec: 0,
    });
    // Until the new tree is prepared, a newer head stops this sync (nothing is applied).
    let superseded = space.superseded(head);
    tokio::pin!(superseded);
    // A held tree is a delta's base only when it is whole (not narrowed by a selection).
    let delta_base = held
        .filter(|_| agent.selection.is_none())
        .map(|h| (h.version, &h.manifest));
    // The delta the announcing frame carried spares asking the hub, when it starts from the
    // version held.
    let mut pushed = space.frame_delta_for(head.version);
    // So do the new blobs it carried (a small change's): those the download needs are stored
    // once they check out, whether or not the delta itself was used.
    let carried = pushed
        .as_mut()
        .map(|delta| std::mem::take(&mut delta.blobs))
        .unwrap_or_default();
    // The whole manifest's hash is checked against the head here, before any narrowing.
    let manifest = tokio::select! {
        r = download::fetch_manifest_since(&agent.api, head, delta_base, pushed) => r?,
        _ = &mut superseded => return Err(ClientError::Superseded),
    };
    let manifest = match &agent.selection {
        Some(selection) => selection.narrow(&manifest),
        None => manifest,
    };
    let opts = DownloadOptions {
        parallel: agent.config.parallel_downloads,
        pack_blob_max: agent.config.pack_blob_max,
        pack_batch_bytes: agent.config.pack_batch_bytes,
        reverify: must_reverify(held, head),
    };
    // Progress goes out a few times a second while the download runs.
    let ticker = {
        let space = space.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.tick().await;
            loop {
                tick.tick().await;
                space.set(space.progress.event(started));
            }
        }))
    };
    let stats = tokio::select! {
        r = download::fetch_blobs(&agent.api, cache, &manifest, &carried, &opts, &space.progress) => r,
        _ = &mut superseded => return Err(ClientError::Superseded),
    };
    drop(ticker);
    let stats = stats?;
    space.set(space.progress.event(started));

    space.set(Event::Verifying);
    let lacking = cache.lacking(&manifest);
    if let Some(first) = lacking.first() {
        return Err(ClientError::Protocol(format!(
            "{} file(s) missing from the cache after download (first: {first})",
            lacking.len(),
        )));
    }

    space.set(Event::Applying);
    let prepared = {
        let layout = space.layout.clone();
        let cache = cache.clone();
        let held = held.cloned();
        let mode = agent.config.extra_files;
        let version = head.version;
        tokio::task::spawn_blocking(move || -> Result<apply::Prepared> {
            if let Some(h) = &held {
                apply::keep_extra_files(&layout, h, mode)?;
            }
            apply::prepare(&layout, &cache, &manifest, version, held.as_ref())
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("apply panicked: {e}")))??
    };
    {
        // Wait for readers holding the old tree, then switch while no new one can start.
        let _exclusive = space.gate.write().await;
        apply::switch(&space.layout, &prepared)?;
    }
    let layout = space.layout.clone();
    let live = prepared.held.clone();
    let previous = agent.config.keep_trees;
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || {
        apply::cleanup(&layout, Some(&live.tree), previous);
        // The cache keeps what the live and the last-good trees hold, and the manifests of
        // versions it can still rebuild (what `restore` uses).
        let kept = apply::last_good(&layout, Some(&live.tree));
        let keep_blobs = std::iter::once(&live)
            .chain(&kept)
            .flat_map(|h| h.manifest.entries().iter().map(|e| e.sha256.clone()))
            .collect();
        cache.prune(&keep_blobs);
        if let Err(e) = cache.keep_manifest(live.version, &live.manifest) {
            tracing::warn!(error = %e, "could not keep the manifest in the cache");
        }
        cache.prune_manifests();
    })
    .await
    .ok();
    Ok(Applied {
        held: prepared.held,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(version: u64, epoch: u64, hash: &[u8]) -> Head {
        Head {
            space: "s".into(),
            version,
            data_hash: Sha256Hex::of(hash),
            forced: false,
            reason: None,
            by: None,
            at: "2026-11-26T00:00:00Z".into(),
            epoch,
            forced_version: 0,
        }
    }

    #[test]
    fn heads_never_move_back_within_an_epoch_and_follow_a_new_one() {
        let shared = Space::new("s".into(), Layout::new(std::env::temp_dir()));
        shared.offer_head(head(12, 0, b"12"), HeadSource::Push);
        // A lagging replica's welcome.
        shared.offer_head(head(11, 0, b"11"), HeadSource::Welcome);
        assert_eq!(shared.head.borrow().as_ref().unwrap().version, 12);
        // The database was restored: a new epoch, lower version.
        shared.offer_head(head(10, 5, b"10"), HeadSource::Welcome);
        assert_eq!(shared.head.borrow().as_ref().unwrap().version, 10);
        // A replica that has not noticed yet cannot take the agent back to the old history...
        shared.offer_head(head(10, 0, b"old10"), HeadSource::Poll);
        assert_eq!(shared.head.borrow().as_ref().unwrap().epoch, 5);
        // ...but one restarted since (epoch 0 again) moves it on with a newer version.
        shared.offer_head(head(11, 0, b"new11"), HeadSource::Push);
        assert_eq!(shared.head.borrow().as_ref().unwrap().version, 11);
    }
}
