//! Downloading a version into the cache: the manifest first (its sha256 must equal the
//! announced `data_hash` before it is even parsed), then only the blobs the cache lacks, in
//! parallel: small ones in packs (one request for hundreds of files), large ones one by one
//! with a ranged resume of a partial file. Every blob is hashed before it enters the cache, so
//! a wrong or truncated body never reaches a tree.

use crate::cache::{Cache, hash_file};
use crate::error::{ClientError, IoContext, Result};
use crate::hub_api::HubApi;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use synchub_protocol::{BlobList, Head, Manifest, ManifestEntry, Sha256Hex, pack};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::io::StreamReader;

/// Most entries accepted in a manifest from the hub.
pub const MAX_MANIFEST_ENTRIES: usize = 2_000_000;

/// Download counters, read by the state reporter while the download runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_done: AtomicU64,
    pub files_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.files_done.load(Ordering::Relaxed),
            self.files_total.load(Ordering::Relaxed),
            self.bytes_done.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
        )
    }
}

/// How to fetch.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    pub parallel: usize,
    pub pack_blob_max: u64,
    pub pack_batch_bytes: u64,
    /// Re-hash every cache entry the manifest names (a forced sync).
    pub reverify: bool,
}

/// What a download did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DownloadStats {
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Cache entries found corrupted and fetched again (forced sync).
    pub repaired: u64,
}

/// Fetches and checks the manifest of `head`. Returns it with its canonical bytes.
pub async fn fetch_manifest(api: &HubApi, head: &Head) -> Result<(Manifest, bytes::Bytes)> {
    if head.data_hash == Sha256Hex::empty() {
        // An empty space (version 0 has no stored manifest): nothing to ask for.
        return Ok((Manifest::default(), bytes::Bytes::new()));
    }
    let bytes = api.manifest_bytes(&head.space, head.version).await?;
    let actual = Sha256Hex::of(&bytes);
    if actual != head.data_hash {
        return Err(ClientError::HashMismatch {
            what: format!("manifest of {} v{}", head.space, head.version),
            expected: head.data_hash.clone(),
            actual,
        });
    }
    let manifest = Manifest::from_canonical(&bytes, MAX_MANIFEST_ENTRIES)?;
    Ok((manifest, bytes))
}

/// The distinct blobs of a manifest, first occurrence order.
pub fn unique_blobs(manifest: &Manifest) -> Vec<(Sha256Hex, u64)> {
    let mut seen = HashSet::new();
    manifest
        .entries()
        .iter()
        .filter(|e| seen.insert(e.sha256.clone()))
        .map(|e| (e.sha256.clone(), e.size))
        .collect()
}

/// Brings every blob of `manifest` into the cache.
pub async fn fetch_blobs(
    api: &HubApi,
    cache: &Cache,
    manifest: &Manifest,
    opts: &DownloadOptions,
    progress: &Arc<Progress>,
) -> Result<DownloadStats> {
    let blobs = unique_blobs(manifest);
    let mut stats = DownloadStats::default();
    let mut needed = Vec::new();
    {
        let cache = cache.clone();
        let reverify = opts.reverify;
        let (need, repaired) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut need = Vec::new();
            let mut repaired = 0;
            for (sha, size) in blobs {
                let present = cache.has(&sha, size);
                let ok = if reverify && present {
                    let ok = cache.verify(&sha)?;
                    if !ok {
                        repaired += 1;
                    }
                    ok
                } else {
                    if reverify && !present && cache.path(&sha).exists() {
                        repaired += 1;
                        let _ = crate::cache::remove_file_forced(&cache.path(&sha));
                    }
                    present
                };
                if !ok {
                    need.push((sha, size));
                }
            }
            Ok((need, repaired))
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("cache check panicked: {e}")))??;
        needed.extend(need);
        stats.repaired = repaired;
    }
    progress.files_done.store(0, Ordering::Relaxed);
    progress.bytes_done.store(0, Ordering::Relaxed);
    progress
        .files_total
        .store(needed.len() as u64, Ordering::Relaxed);
    progress.bytes_total.store(
        needed.iter().map(|(_, s)| *s).sum::<u64>(),
        Ordering::Relaxed,
    );
    if needed.is_empty() {
        return Ok(stats);
    }

    let mut jobs: Vec<Job> = Vec::new();
    let mut batch: Vec<(Sha256Hex, u64)> = Vec::new();
    let mut batch_bytes = 0u64;
    for (sha, size) in needed {
        if size > opts.pack_blob_max {
            jobs.push(Job::Single(sha, size));
            continue;
        }
        if !batch.is_empty() && (batch_bytes + size > opts.pack_batch_bytes || batch.len() >= 1000)
        {
            jobs.push(Job::Pack(std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push((sha, size));
    }
    if !batch.is_empty() {
        jobs.push(Job::Pack(batch));
    }
    // Large blobs first: they set the total time.
    jobs.sort_by_key(|j| std::cmp::Reverse(j.bytes()));

    let results: Vec<(u64, u64)> = futures::stream::iter(jobs)
        .map(|job| {
            let api = api.clone();
            let cache = cache.clone();
            let progress = progress.clone();
            async move {
                match job {
                    Job::Single(sha, size) => fetch_single(&api, &cache, &sha, size, &progress)
                        .await
                        .map(|b| (1, b)),
                    Job::Pack(list) => {
                        let n = list.len() as u64;
                        fetch_pack(&api, &cache, &list, &progress)
                            .await
                            .map(|b| (n, b))
                    }
                }
            }
        })
        .buffer_unordered(opts.parallel.max(1))
        .try_collect()
        .await?;
    for (n, b) in results {
        stats.blobs_fetched += n;
        stats.bytes_fetched += b;
    }
    Ok(stats)
}

enum Job {
    Single(Sha256Hex, u64),
    Pack(Vec<(Sha256Hex, u64)>),
}

impl Job {
    fn bytes(&self) -> u64 {
        match self {
            Job::Single(_, s) => *s,
            Job::Pack(l) => l.iter().map(|(_, s)| *s).sum(),
        }
    }
}

fn body_reader(resp: reqwest::Response) -> impl tokio::io::AsyncRead + Unpin {
    StreamReader::new(resp.bytes_stream().map_err(std::io::Error::other))
}

/// One large blob, resuming `DIR/.synchub/cache/tmp/<sha>.part` with a Range request.
async fn fetch_single(
    api: &HubApi,
    cache: &Cache,
    sha: &Sha256Hex,
    size: u64,
    progress: &Progress,
) -> Result<u64> {
    let part = cache.part_path(sha);
    let mut hasher = Sha256::new();
    let mut have = match tokio::fs::metadata(&part).await {
        Ok(m) if m.len() < size => m.len(),
        Ok(_) => {
            let _ = tokio::fs::remove_file(&part).await;
            0
        }
        Err(_) => 0,
    };
    if have > 0 {
        // Hash what is already there so the final check covers the whole blob.
        let mut f = tokio::fs::File::open(&part)
            .await
            .ctx(|| part.display().to_string())?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = have;
        while left > 0 {
            let n = f.read(&mut buf).await.ctx(|| part.display().to_string())?;
            if n == 0 {
                break;
            }
            let n = n.min(left as usize);
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
    }
    let resp = api.blob(sha, have).await?;
    let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
    if !resumed && have > 0 {
        hasher = Sha256::new();
        have = 0;
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
    progress.bytes_done.fetch_add(have, Ordering::Relaxed);
    let mut stream = resp.bytes_stream();
    let mut got = have;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // Keep what arrived for a ranged resume.
                let _ = file.flush().await;
                return Err(e.into());
            }
        };
        got += chunk.len() as u64;
        if got > size {
            drop(file);
            let _ = tokio::fs::remove_file(&part).await;
            return Err(ClientError::Protocol(format!(
                "blob {sha} is longer than its size {size}"
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .ctx(|| format!("writing {}", part.display()))?;
        progress
            .bytes_done
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    file.flush().await.ctx(|| part.display().to_string())?;
    drop(file);
    if got < size {
        // Keep the part: the next attempt resumes from here.
        return Err(ClientError::Truncated(format!(
            "blob {sha} ({got} of {size} bytes)"
        )));
    }
    let actual = Sha256Hex::from_digest(hasher.finalize().into());
    if &actual != sha {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(ClientError::HashMismatch {
            what: format!("blob {sha}"),
            expected: sha.clone(),
            actual,
        });
    }
    let cache2 = cache.clone();
    let sha2 = sha.clone();
    tokio::task::spawn_blocking(move || cache2.insert(&part, &sha2))
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))??;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(got - have)
}

/// Many small blobs in one pack response.
async fn fetch_pack(
    api: &HubApi,
    cache: &Cache,
    list: &[(Sha256Hex, u64)],
    progress: &Progress,
) -> Result<u64> {
    let req = BlobList {
        sha256: list.iter().map(|(s, _)| s.clone()).collect(),
    };
    let resp = api.pack(&req).await?;
    let mut reader = BufReader::with_capacity(64 * 1024, body_reader(resp));
    let mut total = 0u64;
    let mut line = Vec::with_capacity(pack::MAX_HEADER_LEN);
    // Checked blobs are written to the cache by blocking tasks in batches, while the pack
    // goes on streaming in.
    let mut writers = tokio::task::JoinSet::new();
    let mut batch: Vec<(Sha256Hex, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    for (expected, expected_size) in list {
        line.clear();
        let n = (&mut reader)
            .take(pack::MAX_HEADER_LEN as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| ClientError::Unreachable(format!("reading pack: {e}")))?;
        if n == 0 || !line.ends_with(b"\n") {
            return Err(ClientError::Truncated(format!(
                "pack before blob {expected}"
            )));
        }
        let (sha, size) =
            pack::parse_header(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if &sha != expected || size != *expected_size {
            return Err(ClientError::Protocol(format!(
                "pack sent {sha} ({size} bytes) where {expected} ({expected_size} bytes) was asked"
            )));
        }
        let bytes = read_checked(&mut reader, &sha, size, progress).await?;
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
        progress.files_done.fetch_add(written, Ordering::Relaxed);
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

/// Reads exactly `size` bytes of one small blob, hashing them; fails on a short read or a
/// wrong hash.
async fn read_checked<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    sha: &Sha256Hex,
    size: u64,
    progress: &Progress,
) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; size as usize];
    let mut filled = 0;
    while filled < bytes.len() {
        let n = reader
            .read(&mut bytes[filled..])
            .await
            .map_err(|e| ClientError::Unreachable(format!("reading pack: {e}")))?;
        if n == 0 {
            return Err(ClientError::Truncated(format!(
                "blob {sha} in pack ({filled} of {size} bytes)"
            )));
        }
        filled += n;
        progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
    }
    let actual = Sha256Hex::of(&bytes);
    if &actual != sha {
        return Err(ClientError::HashMismatch {
            what: format!("blob {sha}"),
            expected: sha.clone(),
            actual,
        });
    }
    Ok(bytes)
}

/// Hashes local files against manifest entries: the paths whose content differs or is
/// missing under `root`. Used by `verify` and reports.
pub fn compare_tree(root: &std::path::Path, entries: &[ManifestEntry]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| match hash_file(&root.join(&e.path)) {
            Ok((h, n)) => h != e.sha256 || n != e.size,
            Err(_) => true,
        })
        .map(|e| e.path.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_checked_rejects_short_and_wrong_bodies() {
        let p = Progress::default();
        let body = b"0123456789";
        let sha = Sha256Hex::of(body);
        let mut ok: &[u8] = body;
        assert_eq!(read_checked(&mut ok, &sha, 10, &p).await.unwrap(), body);
        let mut short: &[u8] = &body[..5];
        assert!(matches!(
            read_checked(&mut short, &sha, 10, &p).await,
            Err(ClientError::Truncated(_))
        ));
        let mut wrong: &[u8] = b"0123456780";
        assert!(matches!(
            read_checked(&mut wrong, &sha, 10, &p).await,
            Err(ClientError::HashMismatch { .. })
        ));
    }

    #[test]
    fn unique_blobs_dedups() {
        let e = |p: &str, b: &[u8]| ManifestEntry {
            path: p.into(),
            size: b.len() as u64,
            sha256: Sha256Hex::of(b),
        };
        let m = Manifest::new(vec![e("a", b"1"), e("b", b"1"), e("c", b"2")]).unwrap();
        assert_eq!(unique_blobs(&m).len(), 2);
    }
}
