//! One space's sync task and the state it shares with the rest of the client: the newest head
//! the hub announced (from the WebSocket or the fallback check), the state watch that status
//! frames, the local API and `state.json` follow, and the gate that blocks local readers.
//!
//! The worker compares the announced head with the held version; when they differ it blocks
//! local use, downloads, verifies, prepares the new tree, waits for readers to let go and
//! switches `current`. Failures leave the old tree in place and retry with backoff.

use crate::apply::{self, Held, Layout};
use crate::backoff::Backoff;
use crate::cache::Cache;
use crate::config::{AgentConfig, OnFailure};
use crate::download::{self, DownloadOptions, Progress};
use crate::error::{ClientError, Result};
use crate::hub_api::HubApi;
use crate::outbox::Outbox;
use crate::selection::Selection;
use crate::state::{Event, transition};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentState, Head, Sha256Hex, SyncReport, SyncStatus, SyncType};
use tokio::sync::{Notify, RwLock, watch};

/// What the rest of the client sees of a space.
pub struct SpaceShared {
    pub name: String,
    pub layout: Layout,
    pub state: watch::Sender<AgentState>,
    /// Newest head announced by the hub.
    pub head: watch::Sender<Option<Head>>,
    /// Version and data hash of the applied tree.
    pub held: Mutex<Option<(u64, Sha256Hex)>>,
    /// Readers hold it shared; the switch takes it exclusively.
    pub gate: Arc<RwLock<()>>,
    /// `POST /sync` and `SyncClient::sync_now`: retry or check now.
    pub sync_now: Notify,
    pub last_error: Mutex<Option<String>>,
    pub progress: Arc<Progress>,
    /// Held while `state.json` is written: one writer at a time, each writing the newest state.
    state_file: Mutex<()>,
}

/// Where a head came from (for logs): every source follows the same rule, [`follows`], so
/// neither a lagging replica's `welcome` nor a slow HTTP answer can undo a newer head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadSource {
    Welcome,
    Push,
    Poll,
}

impl SpaceShared {
    pub fn new(name: String, layout: Layout) -> Self {
        SpaceShared {
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
        }
    }

    /// Records a head from the hub; wakes the worker when it differs from the known one.
    pub fn offer_head(&self, head: Head, source: HeadSource) {
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

    /// Resolves once a head other than `head` is known (see [`follows`]).
    async fn superseded(&self, head: &Head) {
        let mut rx = self.head.subscribe();
        let _ = rx.wait_for(|h| h.as_ref().is_some_and(|h| h != head)).await;
    }

    pub fn held(&self) -> Option<(u64, Sha256Hex)> {
        self.held.lock().expect("held lock").clone()
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
            last_error: self.last_error.lock().expect("error lock").clone(),
            updated_at: chrono::Utc::now().to_rfc3339(),
        };
        let json = serde_json::to_vec_pretty(&body).expect("state serializes");
        if let Err(e) = apply::write_atomic(&self.layout.state_file(), &json) {
            tracing::warn!(error = %e, "could not write state.json");
        }
    }
}

/// What the worker needs besides its space.
pub struct WorkerContext {
    pub config: AgentConfig,
    /// Selective sync: only these paths of each space are held.
    pub selection: Option<Selection>,
    pub client_id: String,
    pub api: HubApi,
    pub outbox: Outbox,
}

/// Whether `next` replaces `current`. Within an epoch heads only move forward. A newer epoch
/// (the hub found its database rewritten) is followed even to a lower version. An older epoch
/// is taken only with a higher version: a replica that has not noticed the rewrite yet, or one
/// restarted since (its epoch starts again at 0), which moves on from there.
pub fn follows(current: &Head, next: &Head) -> bool {
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

/// Runs the space until `stop` fires.
pub async fn run_worker(
    space: Arc<SpaceShared>,
    ctx: Arc<WorkerContext>,
    mut stop: watch::Receiver<bool>,
) {
    let layout = space.layout.clone();
    let recovered = {
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || apply::recover(&layout)).await
    };
    let mut held = match recovered {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::error!(space = %space.name, error = %e, "cannot read the local tree");
            *space.last_error.lock().expect("error lock") = Some(e.to_string());
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "recovery panicked");
            None
        }
    };
    let boot_deadline = Instant::now() + Duration::from_millis(ctx.config.boot_wait_ms);
    let cache = loop {
        match Cache::open(layout.cache_dir()) {
            Ok(c) => break c,
            Err(e) => {
                // Not for good: the folder may come back (a network drive, a full disk).
                tracing::error!(error = %e, "cannot open the cache; retrying");
                *space.last_error.lock().expect("error lock") = Some(e.to_string());
                space.set(Event::Failed {
                    error: format!("cannot open the cache: {e}"),
                    retry_at: None,
                    stale_allowed: ctx.config.on_failure == OnFailure::UnblockStale
                        && held.is_some(),
                });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    cache.clean_temp();
    *space.held.lock().expect("held lock") =
        held.as_ref().map(|h| (h.version, h.data_hash.clone()));
    let version = held.as_ref().map_or(0, |h| h.version);
    space.state.send_replace(AgentState::Starting { version });
    space.write_state_file();
    tracing::info!(space = %space.name, version, "holding");

    let mut head_rx = space.head.subscribe();
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_millis(ctx.config.max_backoff_ms.max(1000)),
    );
    let mut retry_at: Option<Instant> = None;
    let selective = ctx.selection.is_some();
    // Data hash of the head the held part was taken from (selective sync).
    let mut taken_from: Option<Sha256Hex> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let head = head_rx.borrow_and_update().clone();
        if let Some(head) =
            head.filter(|h| needs_sync(held.as_ref(), h, selective, taken_from.as_ref()))
        {
            if let Some(at) = retry_at {
                let wait = tokio::time::sleep_until(at.into());
                tokio::select! {
                    _ = wait => {}
                    _ = space.sync_now.notified() => {}
                    _ = head_rx.changed() => {}
                    _ = stop.changed() => return,
                }
                retry_at = None;
                continue;
            }
            let started = Instant::now();
            let hub_in_use = ctx.api.position();
            space.set(Event::HeadChanged {
                target: head.version,
                forced: head.forced,
            });
            let result = tokio::select! {
                r = sync_once(&space, &ctx, &cache, held.as_ref(), &head) => r,
                _ = stop.changed() => return,
            };
            let sync_type = if must_reverify(held.as_ref(), &head) {
                SyncType::ForceSync
            } else {
                SyncType::Download
            };
            match result {
                Err(ClientError::Superseded) => {
                    tracing::info!(space = %space.name, target = head.version,
                        "a newer head arrived during the sync; starting over for it");
                }
                Ok((new_held, stats)) => {
                    tracing::info!(space = %space.name, version = new_held.version,
                        blobs = stats.blobs_fetched, bytes = stats.bytes_fetched,
                        repaired = stats.repaired, ms = started.elapsed().as_millis() as u64,
                        "applied");
                    *space.last_error.lock().expect("error lock") = None;
                    // With selective sync, the head's hash: the part's own hash names no version.
                    let held_hash = if selective {
                        head.data_hash.clone()
                    } else {
                        new_held.data_hash.clone()
                    };
                    taken_from = Some(head.data_hash.clone());
                    *space.held.lock().expect("held lock") = Some((new_held.version, held_hash));
                    // What changed, not the whole version: a 4-file change reports 4.
                    let total = new_held.manifest.len() as u64;
                    let files = match &held {
                        Some(old) => new_held.manifest.changes_from(&old.manifest),
                        None => total,
                    };
                    let version = new_held.version;
                    held = Some(new_held);
                    backoff.reset();
                    space.set(Event::Applied { version });
                    record(
                        &ctx,
                        &space.name,
                        sync_type,
                        SyncStatus::Success,
                        Some(version),
                        (files, Some(total)),
                        stats.bytes_fetched,
                        started,
                        None,
                    );
                }
                Err(e) => {
                    if matches!(e, ClientError::Unreachable(_)) {
                        // Try the next configured hub (unless the connection moved on already).
                        ctx.api.rotate_from(hub_in_use);
                    }
                    let delay = backoff.next_delay();
                    retry_at = Some(Instant::now() + delay);
                    let retry_wall =
                        chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                    tracing::warn!(space = %space.name, target = head.version, error = %e,
                        retry_in_ms = delay.as_millis() as u64, "sync failed; nothing applied");
                    *space.last_error.lock().expect("error lock") = Some(e.to_string());
                    space.set(Event::Failed {
                        error: e.to_string(),
                        retry_at: Some(retry_wall.to_rfc3339()),
                        stale_allowed: ctx.config.on_failure == OnFailure::UnblockStale
                            && held.is_some(),
                    });
                    record(
                        &ctx,
                        &space.name,
                        sync_type,
                        SyncStatus::Failed,
                        Some(head.version),
                        (0, None),
                        0,
                        started,
                        Some(e.to_string()),
                    );
                }
            }
            continue;
        }
        if head_rx.borrow().is_some() && !matches!(*space.state.borrow(), AgentState::Ready { .. })
        {
            space.set(Event::UpToDate);
        }
        // No head at all since start (the hub is unreachable): after a bounded wait the space
        // says so, under the usual stale-use policy, instead of staying `starting`.
        let booting = head_rx.borrow().is_none()
            && matches!(*space.state.borrow(), AgentState::Starting { .. });
        let boot_timeout = async {
            if booting {
                tokio::time::sleep_until(boot_deadline.into()).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = head_rx.changed() => if r.is_err() { return },
            _ = space.sync_now.notified() => {}
            _ = boot_timeout => {
                let error = format!(
                    "no head from the hub within {} s of start",
                    ctx.config.boot_wait_ms / 1000
                );
                tracing::warn!(space = %space.name, %error);
                *space.last_error.lock().expect("error lock") = Some(error.clone());
                space.set(Event::Failed {
                    error,
                    retry_at: None,
                    stale_allowed: ctx.config.on_failure == OnFailure::UnblockStale
                        && held.is_some(),
                });
            }
            _ = stop.changed() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn record(
    ctx: &WorkerContext,
    space: &str,
    sync_type: SyncType,
    status: SyncStatus,
    version: Option<u64>,
    (items, items_total): (u64, Option<u64>),
    bytes: u64,
    started: Instant,
    error: Option<String>,
) {
    let report = SyncReport {
        report_id: uuid::Uuid::new_v4().to_string(),
        client_id: ctx.client_id.clone(),
        space: space.to_owned(),
        sync_type,
        status,
        version,
        items_synced: items,
        items_total,
        bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        error_message: error,
        user: ctx.config.user.clone(),
        synced_at: Some(chrono::Utc::now().to_rfc3339()),
    };
    if let Err(e) = ctx.outbox.put(&report) {
        tracing::error!(error = %e, "could not store a sync report");
    }
}

/// One attempt: download, verify, prepare, switch.
async fn sync_once(
    space: &Arc<SpaceShared>,
    ctx: &WorkerContext,
    cache: &Cache,
    held: Option<&Held>,
    head: &Head,
) -> Result<(Held, download::DownloadStats)> {
    if !head.forced && ctx.config.download_jitter_ms > 0 {
        let ms = rand::random_range(0..=ctx.config.download_jitter_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    space.set(Event::Progress {
        files_done: 0,
        files_total: 0,
        bytes_done: 0,
        bytes_total: 0,
        bytes_per_sec: 0,
    });
    let started = std::time::Instant::now();
    // Until the new tree is prepared, a newer head stops this sync (nothing is applied).
    let superseded = space.superseded(head);
    tokio::pin!(superseded);
    // The whole manifest's hash is checked against the head here, before any narrowing.
    let (manifest, _bytes) = tokio::select! {
        r = download::fetch_manifest(&ctx.api, head) => r?,
        _ = &mut superseded => return Err(ClientError::Superseded),
    };
    let manifest = match &ctx.selection {
        Some(selection) => selection.narrow(&manifest),
        None => manifest,
    };
    let opts = DownloadOptions {
        parallel: ctx.config.parallel_downloads,
        pack_blob_max: ctx.config.pack_blob_max,
        pack_batch_bytes: ctx.config.pack_batch_bytes,
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
                let (files_done, files_total, bytes_done, bytes_total) = space.progress.snapshot();
                space.set(Event::Progress {
                    files_done,
                    files_total,
                    bytes_done,
                    bytes_total,
                    bytes_per_sec: rate(bytes_done, started),
                });
            }
        }))
    };
    let stats = tokio::select! {
        r = download::fetch_blobs(&ctx.api, cache, &manifest, &opts, &space.progress) => r,
        _ = &mut superseded => return Err(ClientError::Superseded),
    };
    drop(ticker);
    let stats = stats?;
    let (files_done, files_total, bytes_done, bytes_total) = space.progress.snapshot();
    space.set(Event::Progress {
        files_done,
        files_total,
        bytes_done,
        bytes_total,
        bytes_per_sec: rate(bytes_done, started),
    });

    space.set(Event::Verifying);
    let missing: Vec<_> = manifest
        .entries()
        .iter()
        .filter(|e| !cache.has(&e.sha256, e.size))
        .map(|e| e.path.clone())
        .collect();
    if !missing.is_empty() {
        return Err(ClientError::Protocol(format!(
            "{} file(s) missing from the cache after download (first: {})",
            missing.len(),
            missing[0]
        )));
    }

    space.set(Event::Applying);
    let prepared = {
        let layout = space.layout.clone();
        let cache = cache.clone();
        let held = held.cloned();
        let mode = ctx.config.extra_files;
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
    let keep_tree = prepared.held.tree.clone();
    let keep_blobs = download::unique_blobs(&prepared.held.manifest)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let cache2 = cache.clone();
    tokio::task::spawn_blocking(move || {
        apply::cleanup(&layout, Some(&keep_tree));
        cache2.prune(&keep_blobs);
    })
    .await
    .ok();
    Ok((prepared.held, stats))
}

/// Average bytes per second since `started`.
fn rate(bytes: u64, started: std::time::Instant) -> u64 {
    let secs = started.elapsed().as_secs_f64();
    if secs > 0.0 {
        (bytes as f64 / secs) as u64
    } else {
        0
    }
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
        let shared = SpaceShared::new("s".into(), Layout::new(std::env::temp_dir()));
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
