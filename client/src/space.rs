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
}

/// Where a head came from: the hub's welcome replaces whatever is known; the others only
/// move forward (so a slow HTTP answer cannot undo a newer push).
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
        }
    }

    /// Records a head from the hub; wakes the worker when it differs from the known one.
    pub fn offer_head(&self, head: Head, source: HeadSource) {
        self.head.send_if_modified(|cur| {
            let take = match cur {
                None => true,
                Some(c) if source == HeadSource::Welcome => c != &head,
                Some(c) => {
                    head.version > c.version
                        || (head.version == c.version && head.data_hash != c.data_hash)
                }
            };
            if take {
                *cur = Some(head);
            }
            take
        });
    }

    pub fn held(&self) -> Option<(u64, Sha256Hex)> {
        self.held.lock().expect("held lock").clone()
    }

    fn set(&self, event: Event) {
        let mut new_state = None;
        self.state.send_modify(|s| {
            *s = transition(s, event);
            new_state = Some(s.clone());
        });
        if let Some(s) = new_state {
            self.write_state_file(&s);
        }
    }

    fn write_state_file(&self, state: &AgentState) {
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
    pub client_id: String,
    pub api: HubApi,
    pub outbox: Outbox,
}

fn needs_sync(held: Option<&Held>, head: &Head) -> bool {
    match held {
        None => true,
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
    let cache = match Cache::open(layout.cache_dir()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the cache");
            return;
        }
    };
    cache.clean_temp();
    *space.held.lock().expect("held lock") =
        held.as_ref().map(|h| (h.version, h.data_hash.clone()));
    let version = held.as_ref().map_or(0, |h| h.version);
    space.state.send_replace(AgentState::Starting { version });
    space.write_state_file(&AgentState::Starting { version });
    tracing::info!(space = %space.name, version, "holding");

    let mut head_rx = space.head.subscribe();
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_millis(ctx.config.max_backoff_ms.max(1000)),
    );
    let mut retry_at: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let head = head_rx.borrow_and_update().clone();
        if let Some(head) = head.filter(|h| needs_sync(held.as_ref(), h)) {
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
            space.set(Event::HeadChanged {
                target: head.version,
                forced: head.forced,
            });
            let result = tokio::select! {
                r = sync_once(&space, &ctx, &cache, held.as_ref(), &head) => r,
                _ = stop.changed() => return,
            };
            let sync_type = if head.forced {
                SyncType::ForceSync
            } else {
                SyncType::Download
            };
            match result {
                Ok((new_held, stats)) => {
                    tracing::info!(space = %space.name, version = new_held.version,
                        blobs = stats.blobs_fetched, bytes = stats.bytes_fetched,
                        repaired = stats.repaired, ms = started.elapsed().as_millis() as u64,
                        "applied");
                    *space.last_error.lock().expect("error lock") = None;
                    *space.held.lock().expect("held lock") =
                        Some((new_held.version, new_held.data_hash.clone()));
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
        tokio::select! {
            r = head_rx.changed() => if r.is_err() { return },
            _ = space.sync_now.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn record(
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
    let (manifest, _bytes) = download::fetch_manifest(&ctx.api, head).await?;
    let opts = DownloadOptions {
        parallel: ctx.config.parallel_downloads,
        pack_blob_max: ctx.config.pack_blob_max,
        pack_batch_bytes: ctx.config.pack_batch_bytes,
        reverify: head.forced,
    };
    // Progress goes out a few times a second while the download runs.
    let ticker = {
        let space = space.clone();
        tokio::spawn(async move {
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
        })
    };
    let stats = download::fetch_blobs(&ctx.api, cache, &manifest, &opts, &space.progress).await;
    ticker.abort();
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
