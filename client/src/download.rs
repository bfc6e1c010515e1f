//! Downloading a version into the cache: the manifest first (its sha256 must equal the
//! announced `data_hash` before it is even parsed; when a version is held, only the delta from
//! it is fetched and the manifest rebuilt from it is checked the same way), then only the blobs
//! the cache lacks, in parallel: small ones in packs (one request for hundreds of files), large
//! ones one by one with a ranged resume of a partial file; those the announcing frame carried
//! are not fetched. Every byte passes a [`BlobCheck`] before it enters the cache, so a wrong or
//! truncated body never reaches a tree.

use crate::blob_check::BlobCheck;
use crate::cache::{Cache, Cached};
use crate::error::{ClientError, IoContext, Result};
use crate::hub_api::HubApi;
use crate::state::Event;
use futures::{StreamExt, TryStreamExt};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use synchub_protocol::{
    BlobList, FrameBlob, FrameDelta, Head, Manifest, ManifestDelta, Sha256Hex, pack,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::io::StreamReader;

/// Most entries accepted in a manifest from the hub.
pub(crate) const MAX_MANIFEST_ENTRIES: usize = 2_000_000;

/// Download counters, read by the state reporter while the download runs.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    files_done: AtomicU64,
    files_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
}

impl Progress {
    /// The counters as a progress event, with the average rate since `started`.
    pub(crate) fn event(&self, started: Instant) -> Event {
        let bytes_done = self.bytes_done.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        Event::Progress {
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
            bytes_done,
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_per_sec: if secs > 0.0 {
                (bytes_done as f64 / secs) as u64
            } else {
                0
            },
        }
    }

    fn start(&self, needed: &[Blob]) {
        self.files_done.store(0, Ordering::Relaxed);
        self.bytes_done.store(0, Ordering::Relaxed);
        let total: u64 = needed.iter().map(|b| b.size).sum();
        self.files_total
            .store(needed.len() as u64, Ordering::Relaxed);
        self.bytes_total.store(total, Ordering::Relaxed);
    }

    fn bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    fn files(&self, n: u64) {
        self.files_done.fetch_add(n, Ordering::Relaxed);
    }
}

/// How to fetch.
#[derive(Clone, Debug)]
pub(crate) struct DownloadOptions {
    pub parallel: usize,
    pub pack_blob_max: u64,
    pub pack_batch_bytes: u64,
    /// Re-hash every cache entry the manifest names (a forced sync).
    pub reverify: bool,
}

/// What a download did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DownloadStats {
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Cache entries found corrupted and fetched again (forced sync).
    pub repaired: u64,
    /// Blobs taken from the `sync_required` frame instead of fetched (not in the two above),
    /// and their bytes.
    pub carried: u64,
    pub carried_bytes: u64,
}

/// One blob a manifest names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Blob {
    pub sha256: Sha256Hex,
    pub size: u64,
    /// Worth compressing on the way (by its file's extension): packs of such blobs are asked
    /// for compressed, packs of images and archives are not.
    pub compressible: bool,
}

/// Fetches the manifest of `head` and checks it against the head's `data_hash` before
/// parsing it.
pub async fn fetch_manifest(api: &HubApi, head: &Head) -> Result<Manifest> {
    if head.data_hash == Sha256Hex::empty() {
        // An empty space (version 0 has no stored manifest): nothing to ask for.
        return Ok(Manifest::default());
    }
    let bytes = api.manifest_bytes(&head.space, head.version).await?;
    BlobCheck::manifest(head).whole(&bytes)?;
    Ok(Manifest::from_canonical(&bytes, MAX_MANIFEST_ENTRIES)?)
}

/// Like [`fetch_manifest`], from the changes since `base` (a version held whole, with its
/// manifest): the full manifest is rebuilt from them and must hash to the head's `data_hash`.
/// The changes come from `pushed` (the delta the announcing frame carried) when it starts from
/// `base`'s version, without a request; else, or when it does not check out, they are asked
/// for (`?from=`). Any error or mismatch on that way falls back to the full manifest.
pub(crate) async fn fetch_manifest_since(
    api: &HubApi,
    head: &Head,
    base: Option<(u64, &Manifest)>,
    pushed: Option<FrameDelta>,
) -> Result<Manifest> {
    let Some((from, base)) = base.filter(|(v, _)| *v != head.version) else {
        return fetch_manifest(api, head).await;
    };
    if head.data_hash == Sha256Hex::empty() {
        return Ok(Manifest::default());
    }
    match pushed {
        Some(pushed) if pushed.from_version == from => {
            match rebuild_blocking(pushed.text.into(), base, head).await {
                Ok(manifest) => return Ok(manifest),
                Err(error) => {
                    tracing::warn!(space = head.space, version = head.version, from, %error,
                        "the frame's manifest delta is not usable; asking the hub");
                }
            }
        }
        Some(pushed) => {
            tracing::debug!(
                space = head.space,
                version = head.version,
                from,
                delta_from = pushed.from_version,
                "the frame's manifest delta starts elsewhere"
            );
        }
        None => {}
    }
    let rebuilt = match api.manifest_since(&head.space, head.version, from).await {
        Ok((true, delta)) => rebuild_blocking(delta, base, head).await,
        Ok((false, bytes)) => {
            // The hub had no delta for this base and sent the whole manifest.
            BlobCheck::manifest(head).whole(&bytes)?;
            return Ok(Manifest::from_canonical(&bytes, MAX_MANIFEST_ENTRIES)?);
        }
        Err(e) => Err(e),
    };
    match rebuilt {
        Ok(manifest) => Ok(manifest),
        Err(error) => {
            tracing::warn!(space = head.space, version = head.version, from, %error,
                "manifest delta not usable; fetching the whole manifest");
            fetch_manifest(api, head).await
        }
    }
}

/// [`rebuild`] on the blocking pool (a large manifest takes a while to hash).
async fn rebuild_blocking(delta: bytes::Bytes, base: &Manifest, head: &Head) -> Result<Manifest> {
    let (base, head) = (base.clone(), head.clone());
    tokio::task::spawn_blocking(move || rebuild(&delta, &base, &head))
        .await
        .map_err(|e| ClientError::Protocol(format!("manifest delta: {e}")))?
}

/// The manifest of `head` from `base` and an encoded delta, checked against `data_hash`.
fn rebuild(delta: &[u8], base: &Manifest, head: &Head) -> Result<Manifest> {
    let delta = ManifestDelta::parse(delta, MAX_MANIFEST_ENTRIES)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    if delta.to != head.data_hash {
        return Err(ClientError::Protocol(format!(
            "manifest delta leads to {}, not the announced {}",
            delta.to, head.data_hash
        )));
    }
    delta
        .apply(base)
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

/// The distinct blobs of a manifest, first occurrence order.
pub(crate) fn unique_blobs(manifest: &Manifest) -> Vec<Blob> {
    let mut seen = HashSet::new();
    manifest
        .entries()
        .iter()
        .filter(|e| seen.insert(e.sha256.clone()))
        .map(|e| Blob {
            sha256: e.sha256.clone(),
            size: e.size,
            compressible: pack::worth_compressing(&e.path),
        })
        .collect()
}

/// The blobs of `blobs` the cache lacks (re-hashing what it has when `rehash`), and how many
/// of those it held wrong and dropped.
fn lacking(cache: &Cache, blobs: Vec<Blob>, rehash: bool) -> Result<(Vec<Blob>, u64)> {
    let mut need = Vec::new();
    let mut dropped = 0;
    for blob in blobs {
        match cache.check(&blob.sha256, blob.size, rehash)? {
            Cached::Intact => continue,
            Cached::Missing => {}
            Cached::Dropped => dropped += 1,
        }
        need.push(blob);
    }
    Ok((need, dropped))
}

/// Brings every blob of `manifest` into the cache. The blobs a `sync_required` frame carried
/// (`carried`) that it needs and that check out are stored as they are; the rest is fetched.
pub(crate) async fn fetch_blobs(
    api: &HubApi,
    cache: &Cache,
    manifest: &Manifest,
    carried: &[FrameBlob],
    opts: &DownloadOptions,
    progress: &Arc<Progress>,
) -> Result<DownloadStats> {
    let blobs = unique_blobs(manifest);
    let (needed, repaired) = {
        let cache = cache.clone();
        let rehash = opts.reverify;
        tokio::task::spawn_blocking(move || lacking(&cache, blobs, rehash))
            .await
            .map_err(|e| ClientError::Protocol(format!("cache check panicked: {e}")))??
    };
    let mut stats = DownloadStats {
        repaired,
        ..DownloadStats::default()
    };
    progress.start(&needed);
    let (needed, carried, carried_bytes) = store_carried(cache, needed, carried, progress).await?;
    stats.carried = carried;
    stats.carried_bytes = carried_bytes;
    if needed.is_empty() {
        return Ok(stats);
    }

    let mut jobs: Vec<Job> = Vec::new();
    // Compressible and incompressible blobs go in packs of their own: [compressible as usize].
    let mut batches: [(Vec<Blob>, u64); 2] = Default::default();
    for blob in needed {
        if blob.size > opts.pack_blob_max {
            jobs.push(Job::Single(blob));
            continue;
        }
        let (batch, batch_bytes) = &mut batches[usize::from(blob.compressible)];
        if !batch.is_empty()
            && (*batch_bytes + blob.size > opts.pack_batch_bytes || batch.len() >= 1000)
        {
            jobs.push(Job::Pack(std::mem::take(batch)));
            *batch_bytes = 0;
        }
        *batch_bytes += blob.size;
        batch.push(blob);
    }
    for (batch, _) in batches {
        if !batch.is_empty() {
            jobs.push(Job::Pack(batch));
        }
    }
    // Large blobs first: they set the total time.
    jobs.sort_by_key(|j| std::cmp::Reverse(j.bytes()));

    let fetched: Vec<Fetched> = futures::stream::iter(jobs)
        .map(|job| {
            let api = api.clone();
            let cache = cache.clone();
            let progress = progress.clone();
            async move {
                match job {
                    Job::Single(blob) => fetch_single(&api, &cache, &blob, &progress)
                        .await
                        .map(|bytes| Fetched { blobs: 1, bytes }),
                    Job::Pack(list) => {
                        fetch_pack(&api, &cache, &list, &progress)
                            .await
                            .map(|bytes| Fetched {
                                blobs: list.len() as u64,
                                bytes,
                            })
                    }
                }
            }
        })
        .buffer_unordered(opts.parallel.max(1))
        .try_collect()
        .await?;
    for f in fetched {
        stats.blobs_fetched += f.blobs;
        stats.bytes_fetched += f.bytes;
    }
    Ok(stats)
}

/// Stores the blobs of `needed` that a frame carried, when their bytes are right (hash and
/// size, as a pack's are checked), and counts them as done. Returns the blobs still to fetch,
/// how many were stored and their bytes. A carried blob the download does not need is not even
/// decoded.
async fn store_carried(
    cache: &Cache,
    needed: Vec<Blob>,
    carried: &[FrameBlob],
    progress: &Progress,
) -> Result<(Vec<Blob>, u64, u64)> {
    if carried.is_empty() {
        return Ok((needed, 0, 0));
    }
    let carried: HashMap<&Sha256Hex, &FrameBlob> = carried.iter().map(|c| (&c.sha256, c)).collect();
    let mut rest = Vec::with_capacity(needed.len());
    let mut batch = Vec::new();
    for blob in needed {
        let Some(frame_blob) = carried.get(&blob.sha256) else {
            rest.push(blob);
            continue;
        };
        let checked = frame_blob.checked_bytes().and_then(|bytes| {
            let right = BlobCheck::blob(&blob.sha256, blob.size).whole(&bytes);
            right.is_ok().then_some(bytes)
        });
        match checked {
            Some(bytes) => batch.push((blob.sha256, bytes)),
            None => {
                tracing::warn!(blob = %blob.sha256,
                    "a blob the frame carried does not check out; fetching it");
                rest.push(blob);
            }
        }
    }
    if batch.is_empty() {
        return Ok((rest, 0, 0));
    }
    let bytes: usize = batch.iter().map(|(_, b)| b.len()).sum();
    let stored = tokio::task::spawn_blocking(write_batch(cache.clone(), batch))
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))??;
    progress.bytes(bytes as u64);
    progress.files(stored);
    Ok((rest, stored, bytes as u64))
}

/// What one job brought in.
struct Fetched {
    blobs: u64,
    bytes: u64,
}

enum Job {
    Single(Blob),
    Pack(Vec<Blob>),
}

impl Job {
    fn bytes(&self) -> u64 {
        match self {
            Job::Single(blob) => blob.size,
            Job::Pack(list) => list.iter().map(|b| b.size).sum(),
        }
    }
}

fn body_reader(resp: reqwest::Response) -> impl tokio::io::AsyncRead + Unpin {
    StreamReader::new(resp.bytes_stream().map_err(std::io::Error::other))
}

/// One large blob, resuming `DIR/.synchub/cache/tmp/<sha>.part` with a Range request.
/// Returns the bytes that came over the network.
async fn fetch_single(
    api: &HubApi,
    cache: &Cache,
    blob: &Blob,
    progress: &Progress,
) -> Result<u64> {
    let part = cache.part_path(&blob.sha256);
    let mut check = BlobCheck::blob(&blob.sha256, blob.size);
    let have = match tokio::fs::metadata(&part).await {
        Ok(m) if m.len() < blob.size => m.len(),
        Ok(_) => {
            let _ = tokio::fs::remove_file(&part).await;
            0
        }
        Err(_) => 0,
    };
    let resp = api.blob(&blob.sha256, have).await?;
    let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
    if resumed {
        // What is already there is checked too, so the final check covers the whole blob.
        let mut f = tokio::fs::File::open(&part)
            .await
            .ctx(|| part.display().to_string())?;
        let mut buf = vec![0u8; 256 * 1024];
        while check.received() < have {
            let n = f.read(&mut buf).await.ctx(|| part.display().to_string())?;
            if n == 0 {
                break;
            }
            let left = (have - check.received()) as usize;
            check.update(&buf[..n.min(left)])?;
        }
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&part)
        .await
        .ctx(|| format!("opening {}", part.display()))?;
    // Gather network chunks into large writes (each tokio::fs write is a blocking-pool trip).
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let from = check.received();
    progress.bytes(from);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // Keep what arrived for a ranged resume.
                let _ = file.flush().await;
                return Err(e.into());
            }
        };
        if let Err(e) = check.update(&chunk) {
            drop(file);
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        file.write_all(&chunk)
            .await
            .ctx(|| format!("writing {}", part.display()))?;
        progress.bytes(chunk.len() as u64);
    }
    file.flush().await.ctx(|| part.display().to_string())?;
    drop(file);
    let fetched = check.received() - from;
    match check.finish() {
        Ok(()) => {}
        // Keep the part: the next attempt resumes from here.
        Err(e @ ClientError::Truncated(_)) => return Err(e),
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    }
    let cache = cache.clone();
    let sha = blob.sha256.clone();
    tokio::task::spawn_blocking(move || cache.insert(&part, &sha))
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))??;
    progress.files(1);
    Ok(fetched)
}

/// Smaller packs are not worth compressing.
const COMPRESS_MIN_BYTES: u64 = 1024;

/// Many small blobs in one pack response.
async fn fetch_pack(
    api: &HubApi,
    cache: &Cache,
    list: &[Blob],
    progress: &Progress,
) -> Result<u64> {
    let req = BlobList {
        sha256: list.iter().map(|b| b.sha256.clone()).collect(),
    };
    let bytes: u64 = list.iter().map(|b| b.size).sum();
    let compress = bytes >= COMPRESS_MIN_BYTES && list.iter().all(|b| b.compressible);
    let resp = api.pack(&req, compress).await?;
    let mut reader = BufReader::with_capacity(64 * 1024, body_reader(resp));
    let mut total = 0u64;
    let mut line = Vec::with_capacity(pack::MAX_HEADER_LEN);
    // Checked blobs are written to the cache by blocking tasks in batches, while the pack
    // goes on streaming in.
    let mut writers = tokio::task::JoinSet::new();
    let mut batch: Vec<(Sha256Hex, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    for expected in list {
        line.clear();
        let n = (&mut reader)
            .take(pack::MAX_HEADER_LEN as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| ClientError::Unreachable(format!("reading pack: {e}")))?;
        if n == 0 || !line.ends_with(b"\n") {
            return Err(ClientError::Truncated(format!(
                "pack before blob {}",
                expected.sha256
            )));
        }
        let (sha, size) =
            pack::parse_header(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if sha != expected.sha256 || size != expected.size {
            return Err(ClientError::Protocol(format!(
                "pack sent {sha} ({size} bytes) where {} ({} bytes) was asked",
                expected.sha256, expected.size
            )));
        }
        let bytes = read_checked(&mut reader, expected, progress).await?;
        batch_bytes += bytes.len();
        batch.push((sha, bytes));
        if batch_bytes >= WRITE_BATCH_BYTES || batch.len() >= WRITE_BATCH_BLOBS {
            writers.spawn_blocking(write_batch(cache.clone(), std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        total += size;
    }
    if !batch.is_empty() {
        writers.spawn_blocking(write_batch(cache.clone(), batch));
    }
    while let Some(done) = writers.join_next().await {
        let written = done.map_err(|e| ClientError::Protocol(e.to_string()))??;
        progress.files(written);
    }
    Ok(total)
}

/// A write batch of small blobs: bounded so that writing overlaps with reading the pack.
const WRITE_BATCH_BYTES: usize = 1 << 20;
const WRITE_BATCH_BLOBS: usize = 64;

/// Stores checked blobs in the cache; returns how many.
fn write_batch(cache: Cache, batch: Vec<(Sha256Hex, Vec<u8>)>) -> impl FnOnce() -> Result<u64> {
    move || {
        for (sha, bytes) in &batch {
            cache.insert_bytes(sha, bytes)?;
        }
        Ok(batch.len() as u64)
    }
}

/// Reads the bytes of one small blob from a pack and checks them; fails on a short read or a
/// wrong hash.
async fn read_checked<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    blob: &Blob,
    progress: &Progress,
) -> Result<Vec<u8>> {
    let mut check = BlobCheck::blob(&blob.sha256, blob.size);
    let mut bytes = vec![0u8; blob.size as usize];
    let mut filled = 0;
    while filled < bytes.len() {
        let n = reader
            .read(&mut bytes[filled..])
            .await
            .map_err(|e| ClientError::Unreachable(format!("reading pack: {e}")))?;
        if n == 0 {
            break;
        }
        check.update(&bytes[filled..filled + n])?;
        filled += n;
        progress.bytes(n as u64);
    }
    check.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_checked_rejects_short_and_wrong_bodies() {
        let p = Progress::default();
        let body = b"0123456789";
        let blob = Blob {
            sha256: Sha256Hex::of(body),
            size: 10,
            compressible: true,
        };
        let mut ok: &[u8] = body;
        assert_eq!(read_checked(&mut ok, &blob, &p).await.unwrap(), body);
        let mut short: &[u8] = &body[..5];
        assert!(matches!(
            read_checked(&mut short, &blob, &p).await,
            Err(ClientError::Truncated(_))
        ));
        let mut wrong: &[u8] = b"0123456780";
        assert!(matches!(
            read_checked(&mut wrong, &blob, &p).await,
            Err(ClientError::HashMismatch { .. })
        ));
    }

    fn manifest_of(files: &[(&str, &[u8])]) -> Manifest {
        Manifest::new(
            files
                .iter()
                .map(|(path, body)| synchub_protocol::ManifestEntry {
                    path: (*path).into(),
                    size: body.len() as u64,
                    sha256: Sha256Hex::of(body),
                })
                .collect(),
        )
        .unwrap()
    }

    fn head_of(version: u64, manifest: &Manifest) -> Head {
        Head {
            space: "s".into(),
            version,
            data_hash: manifest.data_hash(),
            forced: false,
            reason: None,
            by: None,
            at: "2026-11-27T00:00:00Z".into(),
            epoch: 0,
            forced_version: 0,
        }
    }

    /// A hub that answers every manifest request (`?from=` too) with `manifest` whole, and
    /// counts them.
    async fn manifest_hub(manifest: &Manifest) -> (HubApi, Arc<AtomicU64>) {
        use axum::{Router, routing::get};
        let asked = Arc::new(AtomicU64::new(0));
        let count = asked.clone();
        let body = manifest.canonical_bytes();
        let app = Router::new().route(
            "/api/v1/spaces/{space}/versions/{version}/manifest",
            get(move || {
                count.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                async move { body }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (HubApi::new(vec![url], "t").unwrap(), asked)
    }

    #[tokio::test]
    async fn a_frame_delta_from_the_held_version_makes_the_manifest_without_a_request() {
        let v1 = manifest_of(&[("a", b"1"), ("b", b"2")]);
        let v2 = manifest_of(&[("a", b"1"), ("c", b"3")]);
        let (api, asked) = manifest_hub(&v2).await;
        let pushed = FrameDelta {
            from_version: 1,
            text: String::from_utf8(ManifestDelta::between(&v1, &v2).encode()).unwrap(),
            blobs: Vec::new(),
        };
        let got = fetch_manifest_since(&api, &head_of(2, &v2), Some((1, &v1)), Some(pushed))
            .await
            .unwrap();
        assert_eq!(got, v2);
        assert_eq!(asked.load(Ordering::SeqCst), 0, "no manifest request");

        // A forced head: the same data under a new version, a delta without changes.
        let forced = FrameDelta {
            from_version: 2,
            text: String::from_utf8(ManifestDelta::between(&v2, &v2).encode()).unwrap(),
            blobs: Vec::new(),
        };
        let mut head = head_of(3, &v2);
        head.forced = true;
        let got = fetch_manifest_since(&api, &head, Some((2, &v2)), Some(forced))
            .await
            .unwrap();
        assert_eq!(got, v2);
        assert_eq!(asked.load(Ordering::SeqCst), 0, "no manifest request");
    }

    #[tokio::test]
    async fn a_frame_delta_that_does_not_check_out_falls_back_to_asking_the_hub() {
        let v1 = manifest_of(&[("a", b"1"), ("b", b"2")]);
        let v2 = manifest_of(&[("a", b"1"), ("c", b"3")]);
        let other = manifest_of(&[("a", b"1"), ("d", b"4")]);
        let text = |from: &Manifest, to: &Manifest| {
            String::from_utf8(ManifestDelta::between(from, to).encode()).unwrap()
        };
        let cases = [
            // Leads to another manifest than the announced one.
            ("wrong result", 1, text(&v1, &other)),
            // Starts from a manifest other than the one held.
            ("wrong base", 1, text(&other, &v2)),
            ("not a delta", 1, "nonsense\n".to_owned()),
            // Right, but from a version this agent does not hold: not used.
            ("another version", 7, text(&v1, &v2)),
        ];
        for (case, from_version, text) in cases {
            let (api, asked) = manifest_hub(&v2).await;
            let pushed = FrameDelta {
                from_version,
                text,
                blobs: Vec::new(),
            };
            let got = fetch_manifest_since(&api, &head_of(2, &v2), Some((1, &v1)), Some(pushed))
                .await
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(got, v2, "{case}");
            assert_eq!(
                asked.load(Ordering::SeqCst),
                1,
                "{case}: asked the hub once"
            );
        }
    }

    /// A hub that serves `bodies` as blobs, in packs and one by one, and counts the requests
    /// for them.
    async fn blob_hub(bodies: &[&[u8]]) -> (HubApi, Arc<AtomicU64>) {
        use axum::extract::Path;
        use axum::routing::{get, post};
        use axum::{Json, Router};
        let store: Arc<HashMap<Sha256Hex, Vec<u8>>> = Arc::new(
            bodies
                .iter()
                .map(|b| (Sha256Hex::of(b), b.to_vec()))
                .collect(),
        );
        let asked = Arc::new(AtomicU64::new(0));
        let (pack_store, pack_count) = (store.clone(), asked.clone());
        let (blob_store, blob_count) = (store, asked.clone());
        let app = Router::new()
            .route(
                "/api/v1/blobs/pack",
                post(move |Json(list): Json<BlobList>| async move {
                    pack_count.fetch_add(1, Ordering::SeqCst);
                    let mut body = Vec::new();
                    for sha in &list.sha256 {
                        let bytes = &pack_store[sha];
                        body.extend(pack::encode_header(sha, bytes.len() as u64).into_bytes());
                        body.extend_from_slice(bytes);
                    }
                    body
                }),
            )
            .route(
                "/api/v1/blobs/{sha}",
                get(move |Path(sha): Path<Sha256Hex>| async move {
                    blob_count.fetch_add(1, Ordering::SeqCst);
                    blob_store[&sha].clone()
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (HubApi::new(vec![url], "t").unwrap(), asked)
    }

    fn options() -> DownloadOptions {
        DownloadOptions {
            parallel: 2,
            pack_blob_max: 256 * 1024,
            pack_batch_bytes: 4 << 20,
            reverify: false,
        }
    }

    #[tokio::test]
    async fn blobs_the_frame_carried_are_stored_without_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("cache")).unwrap();
        cache.insert_bytes(&Sha256Hex::of(b"old"), b"old").unwrap();
        let manifest = manifest_of(&[
            ("keep/held.txt", b"old"),
            ("keep/new.png", b"new qr"),
            ("other/new.png", b"not selected"),
        ]);
        // An agent that holds only `keep/`: the frame's blob of `other/` is none of its business.
        let selection = crate::selection::Selection::new(&["keep/**".to_owned()])
            .unwrap()
            .unwrap();
        let narrowed = selection.narrow(&manifest);
        let carried = [
            FrameBlob::new(Sha256Hex::of(b"new qr"), b"new qr"),
            FrameBlob::new(Sha256Hex::of(b"not selected"), b"not selected"),
        ];
        let (api, asked) = blob_hub(&[b"old", b"new qr", b"not selected"]).await;
        let progress = Arc::new(Progress::default());
        let stats = fetch_blobs(&api, &cache, &narrowed, &carried, &options(), &progress)
            .await
            .unwrap();
        assert_eq!(asked.load(Ordering::SeqCst), 0, "no pack or blob request");
        assert_eq!((stats.carried, stats.carried_bytes), (1, 6));
        assert_eq!((stats.blobs_fetched, stats.bytes_fetched), (0, 0));
        assert_eq!(
            std::fs::read(cache.path(&Sha256Hex::of(b"new qr"))).unwrap(),
            b"new qr"
        );
        assert!(cache.lacking(&narrowed).is_empty());
        assert!(
            !cache.path(&Sha256Hex::of(b"not selected")).exists(),
            "a carried blob outside the selection is not stored"
        );
        let Event::Progress {
            files_done,
            files_total,
            bytes_done,
            bytes_total,
            ..
        } = progress.event(Instant::now())
        else {
            unreachable!()
        };
        assert_eq!((files_done, files_total), (1, 1));
        assert_eq!((bytes_done, bytes_total), (6, 6));
    }

    #[tokio::test]
    async fn a_carried_blob_that_does_not_check_out_is_fetched() {
        let files: [(&str, &[u8]); 3] = [
            ("a.txt", b"right"),
            ("b.png", b"also right"),
            ("c.txt", b"carried right"),
        ];
        let manifest = manifest_of(&files);
        let carried = [
            // Named by the right hash, other bytes.
            FrameBlob::new(Sha256Hex::of(b"right"), b"wrong"),
            FrameBlob {
                sha256: Sha256Hex::of(b"also right"),
                data: "not base64!".into(),
            },
            FrameBlob::new(Sha256Hex::of(b"carried right"), b"carried right"),
        ];
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("cache")).unwrap();
        let (api, asked) = blob_hub(&files.map(|(_, body)| body)).await;
        let progress = Arc::new(Progress::default());
        let stats = fetch_blobs(&api, &cache, &manifest, &carried, &options(), &progress)
            .await
            .unwrap();
        assert_eq!(stats.carried, 1, "only the right one is taken");
        assert_eq!(stats.blobs_fetched, 2, "the two wrong ones are fetched");
        assert_eq!(asked.load(Ordering::SeqCst), 2, "a pack of each kind");
        for (_, body) in files {
            assert_eq!(
                std::fs::read(cache.path(&Sha256Hex::of(body))).unwrap(),
                body
            );
        }
    }

    #[test]
    fn unique_blobs_dedups() {
        use synchub_protocol::ManifestEntry;
        let e = |p: &str, b: &[u8]| ManifestEntry {
            path: p.into(),
            size: b.len() as u64,
            sha256: Sha256Hex::of(b),
        };
        let m = Manifest::new(vec![e("a", b"1"), e("b", b"1"), e("c", b"2")]).unwrap();
        assert_eq!(unique_blobs(&m).len(), 2);
    }
}
