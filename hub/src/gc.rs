//! Retention and garbage collection: which versions a space keeps, and a mark-and-sweep that
//! deletes the blobs (file contents and manifests) no kept version names, plus old `sync_log`
//! rows. `synchub gc [--dry-run]` runs it once; `[gc] every_secs` runs it inside the hub.
//!
//! A version is kept while it is one of the newest `keep_versions` of its space or younger than
//! `keep_days` (the head always). The sweep never deletes a blob an upload or commit in flight
//! may still need:
//! - a blob written less than `grace_secs` ago is never a candidate (an upload whose commit has
//!   not come yet);
//! - candidates are first written to a doomed list in the database; the sweep then waits
//!   `settle_secs`, marks again and deletes only candidates still unreferenced and still on the
//!   list, marking each `deleting` first;
//! - a commit takes the blobs it names off the doomed list ([`spare`]) before it checks they
//!   exist, and is refused when it cannot record its version within half of `settle_secs` of
//!   that; a commit naming a blob already marked `deleting` is refused as missing it (the agent
//!   uploads it again).
//!
//! So a version recorded after the sweep's first mark either spared its blobs before they were
//! marked `deleting`, or is seen by the second mark (recorded within the settle wait).

use crate::domain::Domain;
use crate::error::HubError;
use crate::state::AppState;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use synchub_protocol::{Sha256Hex, VersionInfo, codes};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Most versions of one space read per collection (newest first); older ones stay until a
/// later run reaches them.
const MAX_VERSIONS: u32 = 1_000_000;

/// `[retention]`: what each space keeps, and how much `sync_log` history.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// The newest versions every space keeps, whatever their age (at least 1: the head).
    pub keep_versions: u64,
    /// Versions younger than this many days are kept, whatever their number.
    pub keep_days: u64,
    /// `sync_log` rows older than this many days are deleted.
    pub sync_log_days: u64,
    /// At most this many `sync_log` rows are kept (the newest).
    pub sync_log_rows: u64,
    /// `[retention.spaces.NAME]`: a space's own `keep_versions` / `keep_days`.
    pub spaces: BTreeMap<String, SpaceRetention>,
}

/// One space's retention; unset fields take the `[retention]` values.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpaceRetention {
    pub keep_versions: Option<u64>,
    pub keep_days: Option<u64>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_versions: 100,
            keep_days: 30,
            sync_log_days: 90,
            sync_log_rows: 1_000_000,
            spaces: BTreeMap::new(),
        }
    }
}

impl RetentionConfig {
    /// `(keep_versions, keep_days)` for `space`.
    pub fn for_space(&self, space: &str) -> (u64, u64) {
        let own = self.spaces.get(space).cloned().unwrap_or_default();
        (
            own.keep_versions.unwrap_or(self.keep_versions),
            own.keep_days.unwrap_or(self.keep_days),
        )
    }

    pub fn validate(&self) -> Result<(), String> {
        let too_few = |n: u64| n == 0;
        if too_few(self.keep_versions) || self.spaces.values().any(|s| s.keep_versions == Some(0)) {
            return Err("retention keep_versions must be at least 1 (the head)".into());
        }
        if self.sync_log_rows == 0 || self.sync_log_days == 0 {
            return Err("retention sync_log_days and sync_log_rows must be above 0".into());
        }
        Ok(())
    }
}

/// `[gc]`: when the hub collects, and the safety margins of the sweep.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// Seconds between collections inside the hub (the first one this long after start);
    /// 0: never (run `synchub gc` instead).
    pub every_secs: u64,
    /// Blobs written less than this long ago are never deleted (uploads whose commit has not
    /// come yet).
    pub grace_secs: u64,
    /// How long the sweep waits between doom and delete; commits must record their version
    /// within half of it. Use the same value for the hub and `synchub gc`.
    pub settle_secs: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            every_secs: 6 * 3600,
            grace_secs: 3600,
            settle_secs: 300,
        }
    }
}

impl GcConfig {
    /// How long a commit may take from sparing its blobs to recording its version.
    pub fn commit_window(&self) -> Duration {
        Duration::from_millis(self.settle_secs * 1000 / 2)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.settle_secs < 2 {
            return Err("gc settle_secs must be at least 2 (commits get half of it)".into());
        }
        Ok(())
    }
}

/// What one collection is asked to do.
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Count only: nothing is deleted, nothing written.
    pub dry_run: bool,
    /// Expire only this space's versions (blobs are shared, so the sweep looks at every
    /// space's kept versions whatever this says).
    pub space: Option<String>,
}

/// What a collection did (or, dry, would do).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    /// Expired version records per space: deleted, or that would be.
    pub expired_versions: BTreeMap<String, Vec<u64>>,
    /// Blobs deleted (dry: that would be, if nothing names them meanwhile).
    pub blobs_freed: u64,
    pub bytes_freed: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub young_unreferenced: u64,
    /// Candidates a commit named while the sweep waited: kept.
    pub spared: u64,
    /// `sync_log` rows deleted; `None` in a dry run (not counted).
    pub sync_log_rows_deleted: Option<u64>,
}

/// Runs one collection over `domain`'s store and blob store.
pub async fn collect(domain: &Domain, options: &GcOptions) -> Result<GcReport, HubError> {
    let config = &domain.config;
    let now = Utc::now();
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    report.expired_versions = expire(domain, options, now).await?;
    let skip = if options.dry_run {
        &report.expired_versions
    } else {
        &BTreeMap::new()
    };
    let live = mark(domain, skip).await?;
    let grace_cut = now - TimeDelta::seconds(config.gc.grace_secs as i64);
    let mut candidates = Vec::new();
    for blob in domain.blobs.list_stored().await? {
        if live.contains(&blob.hash) {
            continue;
        }
        if blob.modified > grace_cut {
            report.young_unreferenced += 1;
            continue;
        }
        candidates.push(blob);
    }
    if options.dry_run {
        report.blobs_freed = candidates.len() as u64;
        report.bytes_freed = candidates.iter().map(|b| b.size).sum();
        return Ok(report);
    }
    finish_interrupted(domain, &live).await?;
    sweep(domain, candidates, &mut report).await?;
    let log_cut = now - TimeDelta::days(config.retention.sync_log_days as i64);
    report.sync_log_rows_deleted = Some(
        domain
            .store
            .prune_sync_log(log_cut, config.retention.sync_log_rows)
            .await?,
    );
    metrics::counter!("synchub_gc_blobs_deleted_total").increment(report.blobs_freed);
    metrics::counter!("synchub_gc_bytes_deleted_total").increment(report.bytes_freed);
    Ok(report)
}

/// Deletes (unless a dry run) the version records retention lets go, per space: what was
/// (or would be) expired.
async fn expire(
    domain: &Domain,
    options: &GcOptions,
    now: chrono::DateTime<Utc>,
) -> Result<BTreeMap<String, Vec<u64>>, HubError> {
    let mut expired_by_space = BTreeMap::new();
    for head in domain.store.heads().await? {
        if options.space.as_ref().is_some_and(|s| s != &head.space) {
            continue;
        }
        let versions = domain.store.versions(&head.space, MAX_VERSIONS).await?;
        let (keep, days) = domain.config.retention.for_space(&head.space);
        let expired = expired_versions(&versions, keep, days, now);
        if expired.is_empty() {
            continue;
        }
        if !options.dry_run {
            domain.store.delete_versions(&head.space, &expired).await?;
            tracing::info!(
                space = head.space,
                count = expired.len(),
                "expired versions"
            );
        }
        expired_by_space.insert(head.space.clone(), expired);
    }
    Ok(expired_by_space)
}

/// The versions of one space (newest first, as listed) that retention lets go: beyond the
/// newest `keep` and older than `days`. Never the first (the head).
pub fn expired_versions(
    versions: &[VersionInfo],
    keep: u64,
    days: u64,
    now: DateTime<Utc>,
) -> Vec<u64> {
    let cut = now - TimeDelta::days(days as i64);
    let keep = usize::try_from(keep.max(1)).unwrap_or(usize::MAX);
    versions
        .iter()
        .skip(keep)
        .filter(|v| {
            // A time that does not parse counts as young: keeping is the safe mistake.
            DateTime::parse_from_rfc3339(&v.head.at).is_ok_and(|at| at.with_timezone(&Utc) < cut)
        })
        .map(|v| v.head.version)
        .collect()
}

/// Every blob a kept version names: its manifest and the manifest's files. `skip`: versions
/// to treat as gone (a dry run's expired ones). An unreadable manifest stops the collection:
/// without it the files it names are unknown, and deleting them could lose data.
async fn mark(
    domain: &Domain,
    skip: &BTreeMap<String, Vec<u64>>,
) -> Result<HashSet<Sha256Hex>, HubError> {
    let mut live = HashSet::new();
    let mut manifests = HashSet::new();
    for head in domain.store.heads().await? {
        let skipped = skip.get(&head.space);
        for info in domain.store.versions(&head.space, MAX_VERSIONS).await? {
            if skipped.is_some_and(|s| s.contains(&info.head.version)) {
                continue;
            }
            let data_hash = info.head.data_hash;
            if !manifests.insert(data_hash.clone()) {
                continue;
            }
            let manifest = domain.manifest(&data_hash).await.map_err(|e| {
                HubError::Unavailable(format!(
                    "garbage collection stopped: the manifest of {} version {} cannot be read \
                     ({e}); run `synchub fsck`",
                    info.head.space, info.head.version
                ))
            })?;
            live.extend(manifest.entries().iter().map(|e| e.sha256.clone()));
            live.insert(data_hash);
        }
    }
    Ok(live)
}

/// Finishes what a collection stopped mid-way left on the doomed list: blobs marked
/// `deleting` are deleted (no version may name them), others named again are taken off.
async fn finish_interrupted(domain: &Domain, live: &HashSet<Sha256Hex>) -> Result<(), HubError> {
    for doomed in domain.store.doomed_blobs().await? {
        if doomed.deleting && !live.contains(&doomed.hash) {
            domain.blobs.delete(&doomed.hash).await?;
            domain.store.forget_doomed(&doomed.hash).await?;
        } else if live.contains(&doomed.hash) {
            domain.store.forget_doomed(&doomed.hash).await?;
        }
    }
    Ok(())
}

/// Dooms `candidates`, waits `settle_secs`, marks again and deletes those still unreferenced
/// and not spared by a commit meanwhile.
async fn sweep(
    domain: &Domain,
    candidates: Vec<crate::blobs::StoredBlob>,
    report: &mut GcReport,
) -> Result<(), HubError> {
    if candidates.is_empty() {
        return Ok(());
    }
    let doomed_at = Utc::now().timestamp_millis();
    let hashes: Vec<Sha256Hex> = candidates.iter().map(|b| b.hash.clone()).collect();
    domain.store.doom_blobs(&hashes, doomed_at).await?;
    tokio::time::sleep(Duration::from_secs(domain.config.gc.settle_secs)).await;
    let live = mark(domain, &BTreeMap::new()).await?;
    for blob in candidates {
        if live.contains(&blob.hash) {
            domain.store.forget_doomed(&blob.hash).await?;
            report.spared += 1;
            continue;
        }
        if !domain.store.start_deleting(&blob.hash, doomed_at).await? {
            // A commit spared it (or another collector has it).
            report.spared += 1;
            continue;
        }
        if domain.blobs.delete(&blob.hash).await? {
            report.blobs_freed += 1;
            report.bytes_freed += blob.size;
        }
        domain.store.forget_doomed(&blob.hash).await?;
    }
    Ok(())
}

/// Takes the blobs a new version will name off the doomed list (see the module comment); an
/// error when the collector is deleting one of them already. The caller must record its
/// version within [`GcConfig::commit_window`] of this call.
pub async fn spare(domain: &Domain, hashes: &[Sha256Hex]) -> Result<Instant, HubError> {
    let at = Instant::now();
    let deleting = domain.store.spare_blobs(hashes).await?;
    if let Some(first) = deleting.first() {
        return Err(HubError::bad_request(
            codes::MISSING_BLOBS,
            format!(
                "{} blob(s) are being deleted by the garbage collector (first {first}); upload \
                 them again",
                deleting.len()
            ),
        ));
    }
    Ok(at)
}

/// Refuses a write that took longer than the commit window since it spared its blobs: the
/// collector may have deleted one meanwhile. The agent retries.
pub fn check_window(domain: &Domain, spared_at: Instant) -> Result<(), HubError> {
    let window = domain.config.gc.commit_window();
    if spared_at.elapsed() > window {
        return Err(HubError::Unavailable(format!(
            "the commit took longer than {} ms between checking its blobs and recording them; \
             try again",
            window.as_millis()
        )));
    }
    Ok(())
}

/// Runs a collection every `every_secs` until `shutdown`; a failed or panicked run is logged
/// and the next one comes on time. `None` when scheduling is off.
pub fn spawn(state: AppState, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    let every = state.config.gc.every_secs;
    if every == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(every)) => {}
                _ = shutdown.cancelled() => return,
            }
            let run = {
                let state = state.clone();
                tokio::spawn(async move { collect(&state, &GcOptions::default()).await })
            };
            let outcome = tokio::select! {
                outcome = run => outcome,
                _ = shutdown.cancelled() => return,
            };
            match outcome {
                Ok(Ok(report)) => tracing::info!(
                    blobs = report.blobs_freed,
                    bytes = report.bytes_freed,
                    versions = report
                        .expired_versions
                        .values()
                        .map(Vec::len)
                        .sum::<usize>(),
                    "garbage collection done"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "garbage collection failed"),
                Err(e) => tracing::error!(error = %e, "garbage collection panicked"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchub_protocol::Head;

    fn version(n: u64, at: DateTime<Utc>) -> VersionInfo {
        VersionInfo {
            head: Head {
                space: "s".into(),
                version: n,
                data_hash: Sha256Hex::empty(),
                forced: false,
                reason: None,
                by: None,
                at: at.to_rfc3339(),
                epoch: 0,
                forced_version: 0,
            },
            entries: 0,
            bytes: 0,
        }
    }

    #[test]
    fn a_version_expires_only_beyond_the_newest_n_and_older_than_d_days() {
        let now = Utc::now();
        // Newest first: 10 versions, versions 1..=6 forty days old, 7..=10 one day old.
        let versions: Vec<_> = (1..=10u64)
            .rev()
            .map(|n| {
                let age = if n <= 6 { 40 } else { 1 };
                version(n, now - TimeDelta::days(age))
            })
            .collect();
        assert_eq!(
            expired_versions(&versions, 3, 30, now),
            vec![6, 5, 4, 3, 2, 1]
        );
        assert_eq!(expired_versions(&versions, 8, 30, now), vec![2, 1]);
        assert!(expired_versions(&versions, 3, 60, now).is_empty());
        // keep 0 still keeps the head.
        let old: Vec<_> = (1..=2u64)
            .rev()
            .map(|n| version(n, now - TimeDelta::days(99)))
            .collect();
        assert_eq!(expired_versions(&old, 0, 1, now), vec![1]);
    }
}
