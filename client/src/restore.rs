//! `synchub-agent restore --version N`: makes an older version live again on this PC, for a PC
//! that must go back, with or without the hub. The version comes from, in this order:
//! 1. a last-good tree of that version (its files hash-checked against its manifest);
//! 2. the blob cache: a manifest of that version kept there (or beside a damaged tree) whose
//!    blobs are all in the cache, each hashed again before the tree is built;
//! 3. the hub, when it can be reached: the version's manifest (it keeps retained versions) and
//!    the blobs the cache lacks, every one hash-checked as in a sync.
//!
//! The new tree is switched in like a sync's (`apply.rs`), and the folder is marked restored
//! (`.synchub/restored`): the agent then serves that version, shows it in its status and
//! follows no head until `synchub-agent resume` removes the mark; from there it syncs to the
//! hub's head as usual. Restore takes the folder's lock, which a running agent's worker holds,
//! so the agent (its service) must be stopped while it runs.

use crate::apply::{self, Held, Layout, Prepared};
use crate::blob_check::{OnDisk, check_file};
use crate::cache::{Cache, Cached};
use crate::config::AgentConfig;
use crate::download::{self, DownloadOptions, MAX_MANIFEST_ENTRIES, Progress};
use crate::error::{ClientError, IoContext, Result};
use crate::hub_api::HubApi;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::sync::Arc;
use synchub_protocol::Manifest;

/// What `.synchub/restored` records: the folder holds an older version on purpose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    pub version: u64,
    /// Where the version was taken from.
    pub from: RestoreSource,
    /// When it was restored (RFC 3339).
    pub at: String,
}

/// Where a restored version came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreSource {
    /// A last-good tree kept beside the live one (or the live tree itself).
    KeptTree,
    /// Rebuilt from the blob cache, without the hub.
    Cache,
    /// Downloaded from the hub.
    Hub,
    /// The mark could not be read (edited by hand); the folder is still held.
    Unknown,
}

/// The restore mark of a folder, when there is one.
pub(crate) fn restored(layout: &Layout) -> Option<Restored> {
    let bytes = std::fs::read(layout.restored_file()).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap_or(Restored {
        version: 0,
        from: RestoreSource::Unknown,
        at: String::new(),
    }))
}

/// Takes the folder's lock without waiting: `Ok(None)` while another process (the agent, or
/// a restore) holds it. The operating system lets go when the holder exits, even by a crash.
pub(crate) fn lock_folder(layout: &Layout) -> Result<Option<File>> {
    let path = layout.lock_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(ClientError::io(format!("locking {}", path.display()), e))
        }
    }
}

/// Makes `version` of `space` live in the folder `config` names and marks it restored.
pub async fn restore(config: &AgentConfig, space: &str, version: u64) -> Result<Restored> {
    if config.two_way.enabled {
        return Err(ClientError::Config(
            "restore works on a synced folder (`current`); a two-way folder goes back with \
             `synchub rollback` on the hub"
                .into(),
        ));
    }
    let layout = Layout::new(config.space_dir(space));
    if !layout.trees().is_dir() {
        return Err(ClientError::Config(format!(
            "{} holds no synced data of space {space:?} (no .synchub/trees)",
            layout.root().display()
        )));
    }
    let Some(_lock) = lock_folder(&layout)? else {
        return Err(ClientError::Config(format!(
            "an agent is running on {}: stop it first (`synchub-agent service stop` on \
             Windows, or stop `synchub-agent run`), then restore",
            layout.root().display()
        )));
    };
    let cache = Cache::open(layout.cache_dir())?;
    let live = apply::read_live(&layout)?;

    let found = {
        let (layout, cache, live) = (layout.clone(), cache.clone(), live.clone());
        tokio::task::spawn_blocking(move || from_this_pc(&layout, &cache, live.as_ref(), version))
            .await
            .map_err(|e| ClientError::Protocol(format!("restore panicked: {e}")))??
    };
    let (prepared, from) = match found {
        Some(found) => found,
        None => {
            let manifest = from_hub(config, &cache, space, version)
                .await
                .map_err(|e| not_here(version, config, e))?;
            let prepared = build(&layout, &cache, manifest, version, live.as_ref()).await?;
            (prepared, RestoreSource::Hub)
        }
    };
    let mark = Restored {
        version,
        from,
        at: chrono::Utc::now().to_rfc3339(),
    };
    // The mark goes first: a crash after it leaves the agent holding, never syncing over a
    // restore the user asked for; a failed switch takes it back.
    let json = serde_json::to_vec_pretty(&mark).expect("the mark serializes");
    apply::write_atomic(&layout.restored_file(), &json)?;
    let switched = if live.as_ref().is_some_and(|h| h.tree == prepared.held.tree) {
        Ok(())
    } else {
        apply::switch(&layout, &prepared)
    };
    if let Err(e) = switched {
        let _ = std::fs::remove_file(layout.restored_file());
        return Err(e);
    }
    if let Err(e) = cache.keep_manifest(version, &prepared.held.manifest) {
        tracing::warn!(error = %e, "could not keep the manifest in the cache");
    }
    tracing::info!(space, version, ?from, tree = prepared.held.tree, "restored");
    Ok(mark)
}

/// Removes the restore mark of `space`'s folder; the agent then follows the hub's head again
/// (within a second when it runs). Returns the mark there was.
pub fn resume(config: &AgentConfig, space: &str) -> Result<Option<Restored>> {
    let layout = Layout::new(config.space_dir(space));
    let mark = restored(&layout);
    match std::fs::remove_file(layout.restored_file()) {
        Ok(()) => Ok(mark),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClientError::io(
            format!("removing {}", layout.restored_file().display()),
            e,
        )),
    }
}

/// The error when neither this PC nor the hub has the version.
fn not_here(version: u64, config: &AgentConfig, e: ClientError) -> ClientError {
    match e {
        ClientError::Api { status: 404, .. } => ClientError::Config(format!(
            "version {version} is not kept on this PC and the hub does not have it (expired or \
             never made): {e}"
        )),
        ClientError::Config(_) if config.hubs.is_empty() => ClientError::Config(format!(
            "version {version} is not kept on this PC and no hub is configured (--hub) to \
             download it from"
        )),
        e @ ClientError::Unreachable(_) => ClientError::Config(format!(
            "version {version} is not kept on this PC and the hub cannot be reached: {e}"
        )),
        e => ClientError::Config(format!(
            "version {version} is not kept on this PC and downloading it from the hub failed: {e}"
        )),
    }
}

/// The version from a last-good tree or the cache, ready to switch to; `None` when this PC
/// has neither.
fn from_this_pc(
    layout: &Layout,
    cache: &Cache,
    live: Option<&Held>,
    version: u64,
) -> Result<Option<(Prepared, RestoreSource)>> {
    let mut trees: Vec<Held> = apply::last_good(layout, None)
        .into_iter()
        .filter(|h| h.version == version)
        .collect();
    // The live tree first (nothing to switch), then the others.
    trees.sort_by_key(|h| live.is_none_or(|l| l.tree != h.tree));
    for held in &trees {
        if tree_intact(layout, held) {
            return Ok(Some((
                Prepared { held: held.clone() },
                RestoreSource::KeptTree,
            )));
        }
        tracing::warn!(
            tree = held.tree,
            "a kept tree was changed or damaged; not using it"
        );
    }
    let manifests = trees
        .into_iter()
        .map(|h| h.manifest)
        .chain(cache.manifests_of(version));
    for manifest in manifests {
        if cache_holds(cache, &manifest)? {
            let prepared = apply::prepare(layout, cache, &manifest, version, live)?;
            return Ok(Some((prepared, RestoreSource::Cache)));
        }
    }
    Ok(None)
}

/// Whether every file of a kept tree still has the bytes its manifest names (and nothing
/// else is there).
fn tree_intact(layout: &Layout, held: &Held) -> bool {
    let root = held.tree_path(layout);
    let listed = apply::walk_files(&root);
    listed.len() == held.manifest.len()
        && held.manifest.entries().iter().all(|e| {
            matches!(
                check_file(&root.join(&e.path), &e.sha256, e.size),
                Ok(OnDisk::Intact)
            )
        })
}

/// Whether the cache holds every blob of `manifest`, each hashed again (a damaged entry is
/// dropped).
fn cache_holds(cache: &Cache, manifest: &Manifest) -> Result<bool> {
    for e in manifest.entries() {
        if cache.check(&e.sha256, e.size, true)? != Cached::Intact {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The version's manifest from the hub, and every blob the cache lacks (hash-checked).
async fn from_hub(
    config: &AgentConfig,
    cache: &Cache,
    space: &str,
    version: u64,
) -> Result<Manifest> {
    if config.hubs.is_empty() {
        return Err(ClientError::Config("no hub configured".into()));
    }
    let api = HubApi::for_agent(config)?;
    let bytes = api.manifest_bytes(space, version).await?;
    let manifest = Manifest::from_canonical(&bytes, MAX_MANIFEST_ENTRIES)?;
    let manifest = match crate::selection::Selection::new(&config.include)? {
        Some(selection) => selection.narrow(&manifest),
        None => manifest,
    };
    let opts = DownloadOptions {
        parallel: config.parallel_downloads,
        pack_blob_max: config.pack_blob_max,
        pack_batch_bytes: config.pack_batch_bytes,
        reverify: true,
    };
    download::fetch_blobs(
        &api,
        cache,
        &manifest,
        &[],
        &opts,
        &Arc::new(Progress::default()),
    )
    .await?;
    if let Some(first) = cache.lacking(&manifest).first() {
        return Err(ClientError::Protocol(format!(
            "{first} is missing from the cache after the download"
        )));
    }
    Ok(manifest)
}

/// Builds the tree of a downloaded manifest (blocking work off the runtime).
async fn build(
    layout: &Layout,
    cache: &Cache,
    manifest: Manifest,
    version: u64,
    live: Option<&Held>,
) -> Result<Prepared> {
    let (layout, cache, live) = (layout.clone(), cache.clone(), live.cloned());
    tokio::task::spawn_blocking(move || {
        apply::prepare(&layout, &cache, &manifest, version, live.as_ref())
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("restore panicked: {e}")))?
}
