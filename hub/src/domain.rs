//! What the hub's operations work on, without HTTP: the configuration, the store, the blob
//! store, the in-memory heads and the manifest caches ([`crate::manifests`]).
//!
//! [`crate::versions`] and [`crate::reports`] are written over a [`Domain`]; the HTTP handlers
//! and the socket task reach it through [`crate::state::AppState`] (which derefs to it), and the
//! command line builds one on an existing hub's data ([`Domain::open_existing`]), so every caller
//! runs the same code.

use crate::blobs::{self, BlobStore};
use crate::broadcast::{Carried, Heads, Snapshot, SpreadPolicy};
use crate::config::Config;
use crate::error::HubError;
use crate::manifests::Manifests;
use crate::store::{self, Store};
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::{
    FrameBlob, FrameDelta, Head, MAX_FRAME_BLOBS_LEN, MAX_FRAME_DELTA_LEN, Manifest, ManifestDelta,
    Sha256Hex,
};

pub struct Domain {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub heads: Heads,
    pub manifests: Manifests,
    /// Small blobs served from memory in packs.
    pub hot_blobs: blobs::HotBlobs,
    /// Where sync reports go to be stored in batches.
    pub reports: crate::reports::ReportWriter,
    /// The token each client id is bound to, as read from the store (a binding never
    /// changes), so a report costs no query for it once its PC has reported before.
    pub client_owners: moka::sync::Cache<String, i64>,
}

/// Client ids whose token binding is kept in memory.
const CLIENT_OWNERS_CACHED: u64 = 100_000;

/// Longest a bump waits for the manifest delta its frame carries; a slower delta (manifests
/// read from a slow store) is left out, and agents ask for it as before.
const FRAME_DELTA_DEADLINE: Duration = Duration::from_secs(2);

/// Most bytes of delta text and base64 blobs a bump's frame carries together. The fan-out writes
/// a frame to every socket in one `write`, which fits the kernel's initial send buffer (16 KiB
/// on Linux) when the frame does; the rest of a longer frame waits for each socket's own task,
/// which copies it into that socket's buffer. With 32 KiB of blobs in the frame (44 KB), a
/// 10,000-agent bump took the hub's peak memory from 270 to 670 MiB.
const FRAME_BUDGET: usize = 12 * 1024;

impl Domain {
    /// Starts the report writer: call inside a tokio runtime.
    pub fn new(config: Config, store: Arc<dyn Store>, blobs: Arc<dyn BlobStore>) -> Self {
        let manifests = Manifests::new(
            config.limits.manifest_cache_bytes,
            config.limits.max_manifest_entries,
        );
        let hot_blobs = blobs::HotBlobs::new(
            config.limits.hot_blob_cache_bytes,
            config.limits.hot_blob_max_bytes,
        );
        let reports =
            crate::reports::ReportWriter::spawn(store.clone(), config.limits.max_queued_reports);
        let heads = Heads::new(SpreadPolicy {
            per_agent: Duration::from_micros(config.download_spread_per_agent_us),
            max: Duration::from_millis(config.download_spread_max_ms),
        });
        Domain {
            config,
            store,
            blobs,
            heads,
            manifests,
            hot_blobs,
            reports,
            client_owners: moka::sync::Cache::new(CLIENT_OWNERS_CACHED),
        }
    }

    /// A domain over an existing hub's data, for command-line tools running beside the hub
    /// (see [`crate::server::open_existing_parts`]), with every head loaded.
    pub async fn open_existing(config: Config) -> Result<Self, crate::server::StartError> {
        let (store, blobs) = crate::server::open_existing_parts(&config).await?;
        let domain = Domain::new(config, store, blobs);
        for head in domain.store.heads().await? {
            domain.heads.publish(head);
        }
        Ok(domain)
    }

    /// The manifest whose canonical bytes hash to `data_hash`, from the blob store (cached).
    pub async fn manifest(&self, data_hash: &Sha256Hex) -> Result<Arc<Manifest>, HubError> {
        self.manifests.parsed(&self.blobs, data_hash).await
    }

    /// The data hash of `version` of `space`: the head's when it is the current version (no
    /// query), otherwise read once from the store and kept.
    pub async fn version_hash(&self, space: &str, version: u64) -> Result<Sha256Hex, HubError> {
        if let Some(published) = self.heads.get(space)
            && published.head.version == version
        {
            return Ok(published.head.data_hash.clone());
        }
        let store = self.store.clone();
        let read = async move {
            Ok(store
                .version(space, version)
                .await?
                .map(|head| head.data_hash))
        };
        self.manifests.version_hash(space, version, read).await
    }

    /// Sizes of `hashes` in the blob store, `None` for the missing ones (on the filesystem all
    /// in one blocking task).
    pub async fn blob_sizes(&self, hashes: &[Sha256Hex]) -> Result<Vec<Option<u64>>, HubError> {
        Ok(self.blobs.sizes(hashes).await?)
    }

    /// Whether this hub announces `head`: not when it does not serve its space (not in
    /// `spaces`), nor when the space was adopted without any data the hub knows (agents would
    /// apply an empty tree as if it were the data; they stay blocked and `GET …/head` says why).
    fn announced(&self, head: &Head) -> bool {
        if !self.config.spaces.contains(&head.space) {
            tracing::debug!(
                space = head.space,
                "not serving a space that is not configured"
            );
            return false;
        }
        if store::has_no_data(head) {
            tracing::warn!(
                space = head.space,
                version = head.version,
                "space adopted without data: not announced until a source or a publish fills it \
                 (see docs/MIGRATION.md)"
            );
            return false;
        }
        true
    }

    /// The delta from the head announced now to `head`, for `head`'s `sync_required` frame,
    /// with the blobs it adds while they fit the frame (`FRAME_BUDGET`, 12 KiB with the delta):
    /// the agents that hold the current version (most of them) then need no manifest request,
    /// and after a small change no request at all. `None` when nothing moves, when either side
    /// has no stored manifest, when the delta is longer than a frame carries or is not ready
    /// within `FRAME_DELTA_DEADLINE` (2 s).
    pub async fn frame_delta(&self, head: &Head) -> Option<Carried> {
        let current = self.heads.get(&head.space)?;
        let from = &current.head;
        let moves = head.version != from.version || head.data_hash != from.data_hash;
        let empty = Sha256Hex::empty();
        if !moves || from.data_hash == empty || head.data_hash == empty {
            return None;
        }
        let delta = async {
            let bytes = self
                .manifests
                .delta(&self.blobs, &from.data_hash, &head.data_hash)
                .await?;
            if bytes.len() > MAX_FRAME_DELTA_LEN {
                return Ok(None);
            }
            let room = FRAME_BUDGET.saturating_sub(bytes.len());
            let (blobs, whole) = self.frame_blobs(&from.data_hash, &bytes, room).await;
            Ok::<_, HubError>(Some((bytes, blobs, whole)))
        };
        match tokio::time::timeout(FRAME_DELTA_DEADLINE, delta).await {
            Ok(Ok(Some((bytes, blobs, whole)))) => Some(Carried {
                delta: FrameDelta {
                    from_version: from.version,
                    text: String::from_utf8(bytes.to_vec()).ok()?,
                    blobs,
                },
                whole,
            }),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::warn!(space = head.space, version = head.version, error = %e,
                    "no manifest delta for the frame; agents ask for it");
                None
            }
            Err(_) => {
                tracing::warn!(
                    space = head.space,
                    version = head.version,
                    "manifest delta not ready in time for the frame; agents ask for it"
                );
                None
            }
        }
    }

    /// The blobs the encoded `delta` adds that the manifest `from` does not have, in the
    /// delta's order, while their base64 fits `room` bytes and they fit [`MAX_FRAME_BLOBS_LEN`]
    /// together (read through the hot blobs, so the packs of agents that still ask find them in
    /// memory). A blob that cannot be read is left out: the agents fetch it. Also whether
    /// they are every blob the delta adds (the frame then holds the whole change).
    async fn frame_blobs(
        &self,
        from: &Sha256Hex,
        delta: &[u8],
        room: usize,
    ) -> (Vec<FrameBlob>, bool) {
        let Ok(delta) = ManifestDelta::parse(delta, MAX_FRAME_DELTA_LEN) else {
            return (Vec::new(), false);
        };
        let held = match self.manifests.blob_set(&self.blobs, from).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "no blobs in the frame: the held manifest is unreadable");
                return (Vec::new(), false);
            }
        };
        let mut whole = true;
        let (mut raw_room, mut room) = (MAX_FRAME_BLOBS_LEN as u64, room as u64);
        let mut blobs: Vec<FrameBlob> = Vec::new();
        for put in delta.puts {
            let encoded = put.size.div_ceil(3) * 4;
            let carried = blobs.iter().any(|b| b.sha256 == put.sha256);
            if carried || held.contains_key(&put.sha256) {
                continue;
            }
            if put.size > raw_room || encoded > room {
                whole = false;
                continue;
            }
            let read = blobs::get_bytes(&*self.blobs, &put.sha256, put.size);
            match self.hot_blobs.load(&put.sha256, put.size, read).await {
                Ok(bytes) => {
                    raw_room -= put.size;
                    room -= encoded;
                    blobs.push(FrameBlob::new(put.sha256, &bytes));
                }
                Err(e) => {
                    whole = false;
                    tracing::warn!(blob = %put.sha256, error = %e,
                        "blob left out of the frame; agents fetch it");
                }
            }
        }
        (blobs, whole)
    }

    /// Announces a head this hub made or was told of (it only moves forward; see
    /// [`crate::broadcast::Heads::publish`]), with the delta to it in the frame.
    pub async fn publish(&self, head: Head) {
        if !self.announced(&head) {
            return;
        }
        let carried = self.frame_delta(&head).await;
        let (space, version, forced) = (head.space.clone(), head.version, head.forced);
        if self.heads.publish_with(head, carried) {
            tracing::info!(space, version, forced, "head moved; broadcasting");
        }
    }

    /// Applies a head read from the store (see [`crate::broadcast::Heads::replace`]).
    pub async fn replace(&self, head: Head, read_from: &Snapshot) {
        if !self.announced(&head) {
            return;
        }
        let carried = self.frame_delta(&head).await;
        let (space, version) = (head.space.clone(), head.version);
        let before = self.heads.get(&space).map(|p| p.head.version);
        if self.heads.replace_with(head, read_from, carried) {
            let epoch = self.heads.get(&space).map_or(0, |p| p.head.epoch);
            match before {
                Some(b) if b >= version => {
                    self.manifests.forget_versions();
                    tracing::warn!(
                        space,
                        version,
                        was = b,
                        epoch,
                        "the database holds an older head than this hub knew (restore or failover); following it"
                    )
                }
                _ => tracing::info!(space, version, "head moved; broadcasting"),
            }
        }
    }
}
