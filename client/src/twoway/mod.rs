//! Two-way folder mode (`synchub-agent run --dir DIR --two-way`): DIR is the app's own folder,
//! kept equal on every PC. Changes made here are noticed (a file watcher, and a periodic
//! rescan as a safety net), taken once stable, and published as one commit per burst; new hub
//! versions are merged into the folder in place, never over a local change that is not
//! published yet (see `incoming.rs` for the rules). A burst that deletes or replaces too much
//! is held for an admin (see `guard.rs`).
//!
//! One task per space does all of it in turn, so a merge and a publish never race: the
//! watcher and the head only wake it.

mod base;
mod conflict;
mod guard;
mod ignore;
mod incoming;
mod outgoing;
mod scan;
mod stability;
mod watch;

use crate::agent::Agent;
use crate::apply::Layout;
use crate::backoff::Backoff;
use crate::cache::Cache;
use crate::error::{ClientError, Result};
use crate::report::{Outcome, SyncRecord};
use crate::space::{HeadSource, HeldVersion, Space};
use crate::state::Event;
use base::Base;
use guard::{Held, Limits};
use serde::{Deserialize, Serialize};
use stability::Tracker;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synchub_protocol::{HeldChange, HeldDecision, SyncType};
use tokio::sync::Notify;

/// `[two_way]` in the agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwoWayConfig {
    /// Sync DIR both ways (`--two-way`).
    pub enabled: bool,
    /// A changed file is taken once its size and modification time held still this long.
    pub stable_ms: u64,
    /// After a change is noticed, wait this long for more before scanning (one commit per
    /// burst).
    pub debounce_ms: u64,
    /// Full rescan interval, for changes no notification reported.
    pub rescan_ms: u64,
    /// When part of a burst stays unstable (a file held open), the stable rest goes out
    /// after this long.
    pub max_wait_ms: u64,
    /// Mass-change guard: hold a burst deleting or replacing more than this share (percent)
    /// of the files...
    pub guard_percent: u64,
    /// ... or more than this many files.
    pub guard_files: u64,
    /// The share counts from this many files on.
    pub guard_min_files: u64,
}

impl Default for TwoWayConfig {
    fn default() -> Self {
        TwoWayConfig {
            enabled: false,
            stable_ms: 500,
            debounce_ms: 100,
            rescan_ms: 10_000,
            max_wait_ms: 10_000,
            guard_percent: 50,
            guard_files: 1000,
            guard_min_files: 10,
        }
    }
}

impl TwoWayConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ClientError::Config(format!("two_way: {m}")));
        if !(1..=100).contains(&self.guard_percent) {
            return bad("guard_percent must be 1 to 100");
        }
        if self.stable_ms < 50 || self.rescan_ms < 100 {
            return bad("stable_ms must be at least 50 and rescan_ms at least 100");
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            percent: self.guard_percent,
            files: self.guard_files,
            min_files: self.guard_min_files,
        }
    }
}

/// The folder and the agent's files about it.
pub(crate) struct Folder {
    root: PathBuf,
    meta: PathBuf,
    cache: Cache,
    /// This PC's name, in conflict copies and commit messages.
    host: String,
}

impl Folder {
    fn base_file(&self) -> PathBuf {
        self.meta.join("two-way.json")
    }
    fn held_file(&self) -> PathBuf {
        self.meta.join("held.json")
    }
}

/// The held change of a space, for `GET /status` and `synchub-agent status`.
pub(crate) fn held_change(layout: &Layout) -> Option<HeldChange> {
    Held::load(&layout.meta().join("held.json"))
        .ok()
        .flatten()
        .map(|h| h.change)
}

/// Runs a space in two-way mode, and again (after a pause) if it fails or panics, until the
/// agent stops.
pub(crate) async fn supervise(space: Arc<Space>, ctx: Arc<Agent>) {
    loop {
        let ended = tokio::spawn(run(space.clone(), ctx.clone())).await;
        if *ctx.stop.borrow() {
            return;
        }
        let why = match ended {
            Ok(Ok(())) => "ended".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("panicked: {e}"),
        };
        tracing::error!(space = %space.name, %why, "the two-way task stopped; restarting it");
        space.set_error(Some(format!("two-way: {why}")));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = ctx.stopped() => return,
        }
    }
}

/// Stores the `sync_log` report of a merge or a publish.
fn report(ctx: &Agent, space: &str, sync_type: SyncType, started: Instant, outcome: Outcome) {
    let record = SyncRecord {
        space,
        sync_type,
        started,
        outcome,
    };
    if let Err(e) = ctx.reporter.record(&record) {
        tracing::error!(error = %e, "could not store a sync report");
    }
}

async fn run(space: Arc<Space>, ctx: Arc<Agent>) -> Result<()> {
    let mut stop = ctx.stop.subscribe();
    let cfg = ctx.config.two_way.clone();
    let root = space.layout.root().to_path_buf();
    std::fs::create_dir_all(&root)
        .map_err(|e| ClientError::io(format!("creating {}", root.display()), e))?;
    let folder = Folder {
        meta: space.layout.meta(),
        cache: Cache::open(space.layout.cache_dir())?,
        host: ctx.hostname.clone().unwrap_or_else(|| "pc".into()),
        root,
    };
    folder.cache.clean_temp();
    let mut base = Base::load(&folder.base_file())?;
    let mut held = Held::load(&folder.held_file())?;
    if base.version > 0 {
        space.set_held(base.data_hash.clone().map(|data_hash| HeldVersion {
            version: base.version,
            data_hash,
        }));
    }
    let wake = Arc::new(Notify::new());
    let _watcher = watch::start(&folder.root, wake.clone());
    let mut tracker = Tracker::default();
    let mut heads = space.head.subscribe();
    let stable = Duration::from_millis(cfg.stable_ms);
    let mut next_scan = Instant::now();
    let mut next_held_check = Instant::now();
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_millis(ctx.config.max_backoff_ms.max(500)),
    );
    let mut retry_at: Option<Instant> = None;
    let mut reported_unsyncable = 0usize;

    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let now = Instant::now();
        let hub_ok = retry_at.is_none_or(|t| now >= t);
        // 1. The hub's newer version first: local changes are then published on top of it.
        let head = heads.borrow_and_update().clone();
        if let Some(h) = head
            .filter(|h| h.version != base.version || base.data_hash.as_ref() != Some(&h.data_hash))
            && hub_ok
        {
            space.set(Event::HeadChanged {
                target: h.version,
                forced: h.forced,
            });
            let started = Instant::now();
            match incoming::merge(&folder, &ctx, &space, &mut base, &h).await {
                Ok(m) => {
                    backoff.reset();
                    retry_at = None;
                    space.set_error(None);
                    space.set_held(Some(HeldVersion {
                        version: h.version,
                        data_hash: h.data_hash.clone(),
                    }));
                    space.set(Event::Applied { version: h.version });
                    if m.applied > 0 || !m.conflicts.is_empty() {
                        tracing::info!(space = %space.name, version = h.version, files = m.applied,
                            conflicts = m.conflicts.len(), "merged the hub's version");
                        report(
                            &ctx,
                            &space.name,
                            SyncType::Download,
                            started,
                            Outcome::Success {
                                version: h.version,
                                items_synced: m.applied,
                                items_total: Some(m.total),
                                bytes: m.bytes,
                            },
                        );
                    }
                    // Files written here are in the base; conflict copies get published.
                    next_scan =
                        next_scan.min(Instant::now() + Duration::from_millis(cfg.debounce_ms));
                }
                Err(e) => {
                    let delay = fail(&space, &mut backoff, &mut retry_at, &e);
                    // The folder stays the app's to use: it holds the last merged version
                    // and every local change.
                    space.set(Event::Failed {
                        error: e.to_string(),
                        retry_at: chrono::Duration::from_std(delay)
                            .ok()
                            .map(|d| (chrono::Utc::now() + d).to_rfc3339()),
                        stale_allowed: true,
                    });
                    report(
                        &ctx,
                        &space.name,
                        SyncType::Download,
                        started,
                        Outcome::Failed {
                            version: Some(h.version),
                            error: e.to_string(),
                        },
                    );
                }
            }
            continue;
        }
        // Nothing heard from the hub yet: the folder's state against it is unknown.
        let first = head_none_and_first(&space, &base);
        if !first
            && matches!(
                *space.state.borrow(),
                synchub_protocol::AgentState::Starting { .. }
            )
        {
            space.set(Event::UpToDate);
        }

        // 2. The held burst: ask what the admin decided.
        if let Some(h) = held.clone()
            && now >= next_held_check
            && hub_ok
        {
            next_held_check = now + Duration::from_secs(2);
            match settle_held(&folder, &ctx, &space, &mut base, &h).await {
                Ok(true) => {
                    held = None;
                    tracker = Tracker::default();
                    next_scan = Instant::now();
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    fail(&space, &mut backoff, &mut retry_at, &e);
                }
            }
        }

        // 3. Local changes, when a scan is due.
        if now >= next_scan && !first {
            let rules = match ignore::Rules::load(&folder.root) {
                Ok(r) => r,
                Err(e) => {
                    space.set_error(Some(e.to_string()));
                    next_scan = now + Duration::from_millis(cfg.rescan_ms);
                    continue;
                }
            };
            let root = folder.root.clone();
            let snap = tokio::task::spawn_blocking(move || scan::scan(&root, &rules))
                .await
                .map_err(|e| ClientError::Protocol(format!("scan panicked: {e}")))?;
            if snap.unsyncable.len() != reported_unsyncable {
                reported_unsyncable = snap.unsyncable.len();
                if !snap.unsyncable.is_empty() {
                    tracing::warn!(files = ?snap.unsyncable.iter().take(10).collect::<Vec<_>>(),
                        count = snap.unsyncable.len(), "names the hub cannot hold are not synced");
                }
            }
            let changed = local_changes(&base, &snap.files, held.as_ref());
            tracker.retain(|p| changed.contains_key(p));
            let now = Instant::now();
            for (p, s) in &changed {
                tracker.observe(p, *s, now);
            }
            next_scan = now + Duration::from_millis(cfg.rescan_ms);
            if !tracker.is_empty() {
                let stable_paths: Vec<(String, Option<crate::twoway::scan::Stat>)> = changed
                    .iter()
                    .filter(|(p, _)| tracker.stable(p, now, stable))
                    .map(|(p, s)| (p.clone(), *s))
                    .collect();
                let waited = tracker.oldest().is_some_and(|t| {
                    now.duration_since(t) >= Duration::from_millis(cfg.max_wait_ms)
                });
                let all_stable = stable_paths.len() == changed.len();
                // Look again when the next change will have held still long enough (a
                // signature that moves meanwhile is seen then and waits again); when all are
                // stable but cannot go yet (busy, hub away), every half window.
                next_scan = tracker
                    .next_stable_at(now, stable)
                    .unwrap_or(now + stable / 2)
                    .max(now + Duration::from_millis(10));
                if (all_stable || waited) && !stable_paths.is_empty() && hub_ok {
                    let files: Vec<PathBuf> = stable_paths
                        .iter()
                        .filter(|(_, s)| s.is_some())
                        .map(|(p, _)| incoming::local_path(&folder.root, p))
                        .collect();
                    let busy = tokio::task::spawn_blocking(move || stability::busy(&files))
                        .await
                        .map_err(|e| ClientError::Protocol(format!("busy check panicked: {e}")))?;
                    let ready: Vec<_> = stable_paths
                        .into_iter()
                        .filter(|(p, _)| !busy.contains(&incoming::local_path(&folder.root, p)))
                        .collect();
                    if !busy.is_empty() {
                        tracing::debug!(count = busy.len(), "files held open for writing wait");
                    }
                    if (busy.is_empty() || waited) && !ready.is_empty() {
                        let limits = held.is_none().then(|| cfg.limits());
                        let started = Instant::now();
                        match outgoing::publish(
                            &folder,
                            &ctx,
                            &space.name,
                            &mut base,
                            ready,
                            limits,
                        )
                        .await
                        {
                            Ok(round) => {
                                backoff.reset();
                                retry_at = None;
                                for p in &round.settled {
                                    tracker.forget(p);
                                }
                                if let Some(o) = round.outcome {
                                    tracing::info!(space = %space.name, version = o.head.version,
                                        files = o.files, deleted = o.deleted, "published local changes");
                                    report(
                                        &ctx,
                                        &space.name,
                                        SyncType::Upload,
                                        started,
                                        Outcome::of_publish(&Ok(o.clone())),
                                    );
                                    space.offer_head(o.head, HeadSource::Poll);
                                }
                                if let Some(h) = round.held {
                                    tracing::warn!(space = %space.name, deletes = h.change.deletes,
                                        replaces = h.change.replaces, total = h.change.total,
                                        "mass change held until an admin approves it");
                                    h.save(&folder.held_file())?;
                                    for p in h.deletes.iter().chain(&h.replaces) {
                                        tracker.forget(p);
                                    }
                                    held = Some(h);
                                    next_held_check = Instant::now();
                                }
                                next_scan = Instant::now();
                            }
                            Err(ClientError::Conflict { head, .. }) => {
                                // A newer version touched these paths: merge it, then publish.
                                tracing::info!(space = %space.name, "a newer version touched the same files; merging it first");
                                if let Some(h) = head {
                                    space.offer_head(*h, HeadSource::Poll);
                                } else if let Ok(crate::hub_api::HeadCheck::Head { head, .. }) =
                                    ctx.api.head(&space.name, None).await
                                {
                                    space.offer_head(head, HeadSource::Poll);
                                }
                                next_scan = Instant::now();
                            }
                            Err(e) => {
                                report(
                                    &ctx,
                                    &space.name,
                                    SyncType::Upload,
                                    started,
                                    Outcome::Failed {
                                        version: None,
                                        error: e.to_string(),
                                    },
                                );
                                fail(&space, &mut backoff, &mut retry_at, &e);
                            }
                        }
                        continue;
                    }
                }
            }
        }

        let mut wake_at = next_scan;
        if held.is_some() {
            wake_at = wake_at.min(next_held_check);
        }
        if let Some(t) = retry_at {
            wake_at = wake_at.min(t.max(Instant::now()));
        }
        tokio::select! {
            _ = wake.notified() => {
                let soon = Instant::now() + Duration::from_millis(cfg.debounce_ms);
                next_scan = next_scan.min(soon);
                // Let the burst finish: more events only push the scan a little.
                tokio::time::sleep(Duration::from_millis(cfg.debounce_ms)).await;
            }
            _ = heads.changed() => {}
            _ = space.sync_now.notified() => {
                retry_at = None;
                next_scan = Instant::now();
            }
            _ = tokio::time::sleep_until(wake_at.into()) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// No head heard yet and nothing merged: the folder's state against the hub is unknown.
fn head_none_and_first(space: &Space, base: &Base) -> bool {
    space.head.borrow().is_none() && base.version == 0
}

/// Paths whose local signature differs from the base's (`None`: deleted here), leaving out a
/// held burst's paths.
fn local_changes(
    base: &Base,
    files: &BTreeMap<String, scan::Stat>,
    held: Option<&Held>,
) -> BTreeMap<String, Option<scan::Stat>> {
    let mut out = BTreeMap::new();
    for (p, s) in files {
        if base.files.get(p).is_none_or(|b| b.local != Some(*s)) {
            out.insert(p.clone(), Some(*s));
        }
    }
    for p in base.files.keys() {
        if !files.contains_key(p) {
            out.insert(p.clone(), None);
        }
    }
    if let Some(h) = held {
        out.retain(|p, _| !h.holds(p));
    }
    out
}

/// Records a failure and when to try the hub again; returns the wait.
fn fail(
    space: &Space,
    backoff: &mut Backoff,
    retry_at: &mut Option<Instant>,
    e: &ClientError,
) -> Duration {
    let delay = backoff.next_delay();
    tracing::warn!(space = %space.name, error = %e, retry_in = ?delay, "two-way sync failed");
    *retry_at = Some(Instant::now() + delay);
    space.set_error(Some(e.to_string()));
    delay
}

/// Reports the held burst to the hub and acts on the admin's decision: approved, the burst is
/// published as it is now; rejected, the held files are put back as the base has them. True
/// once settled either way.
async fn settle_held(
    folder: &Folder,
    ctx: &Agent,
    space: &Space,
    base: &mut Base,
    held: &Held,
) -> Result<bool> {
    let record = ctx
        .api
        .put_held(&space.name, &ctx.client_id, &held.change)
        .await?;
    match record.decision {
        HeldDecision::Pending => return Ok(false),
        HeldDecision::Approved => {
            tracing::info!(space = %space.name, by = ?record.decided_by, "held change approved; publishing it");
            let paths: Vec<(String, Option<scan::Stat>)> = held
                .deletes
                .iter()
                .chain(&held.replaces)
                .map(|p| {
                    (
                        p.clone(),
                        scan::Stat::read(&incoming::local_path(&folder.root, p)),
                    )
                })
                .collect();
            let started = Instant::now();
            let round = outgoing::publish(folder, ctx, &space.name, base, paths, None).await?;
            if let Some(o) = round.outcome {
                report(
                    ctx,
                    &space.name,
                    SyncType::Upload,
                    started,
                    Outcome::of_publish(&Ok(o.clone())),
                );
                space.offer_head(o.head, HeadSource::Poll);
            }
        }
        HeldDecision::Rejected => {
            tracing::info!(space = %space.name, by = ?record.decided_by, "held change rejected; restoring the files");
            restore(folder, ctx, space, base, held).await?;
        }
    }
    Held::remove(&folder.held_file())?;
    ctx.api.delete_held(&space.name, &ctx.client_id).await?;
    Ok(true)
}

/// Puts the held files back as the base has them.
async fn restore(
    folder: &Folder,
    ctx: &Agent,
    space: &Space,
    base: &mut Base,
    held: &Held,
) -> Result<()> {
    let entries: Vec<synchub_protocol::ManifestEntry> = held
        .deletes
        .iter()
        .chain(&held.replaces)
        .filter_map(|p| {
            base.files.get(p).map(|b| synchub_protocol::ManifestEntry {
                path: p.clone(),
                size: b.size,
                sha256: b.sha256.clone(),
            })
        })
        .collect();
    let wanted = synchub_protocol::Manifest::new(entries.clone())?;
    let opts = crate::download::DownloadOptions {
        parallel: ctx.config.parallel_downloads,
        pack_blob_max: ctx.config.pack_blob_max,
        pack_batch_bytes: ctx.config.pack_batch_bytes,
        reverify: false,
    };
    crate::download::fetch_blobs(
        &ctx.api,
        &folder.cache,
        &wanted,
        &[],
        &opts,
        &space.progress,
    )
    .await?;
    for e in &entries {
        let file = incoming::local_path(&folder.root, &e.path);
        incoming::place(&folder.cache, e, &file)?;
        if let Some(b) = base.files.get_mut(&e.path) {
            b.local = scan::Stat::read(&file);
        }
    }
    base.save(&folder.base_file())
}
