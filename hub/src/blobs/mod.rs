//! Content-addressed blob storage behind one trait: the local filesystem (default) and
//! S3-compatible object storage (Backblaze B2, Supabase Storage, MinIO, AWS).
//!
//! A blob's address is the sha256 of its bytes. `put` hashes the bytes while they stream and
//! makes them visible under the address only once the hash matched, so a reader never sees a
//! half-written or wrong blob. Manifests are blobs too, addressed by their data hash.

pub mod fs;
pub mod s3;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use synchub_protocol::{Sha256Hex, pack};

pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0} not found")]
    NotFound(Sha256Hex),
    #[error("uploaded bytes hash to {actual}, not {expected}")]
    HashMismatch {
        expected: Sha256Hex,
        actual: Sha256Hex,
    },
    #[error("blob is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("range {start}..{end} is outside the blob of {size} bytes")]
    BadRange { start: u64, end: u64, size: u64 },
    /// The upload stream failed (client went away, body truncated): nothing was stored.
    #[error("upload interrupted: {0}")]
    Interrupted(std::io::Error),
    /// A stored blob whose bytes do not hash to its name: changed on disk or in the bucket.
    #[error(
        "stored blob {hash} is corrupt (its bytes hash to {actual}); run `synchub fsck` to find \
         and set aside every corrupt blob"
    )]
    Corrupt { hash: Sha256Hex, actual: Sha256Hex },
    #[error("blob storage error: {0}")]
    Io(#[from] std::io::Error),
    #[error("object storage error: {0}")]
    ObjectStore(#[from] object_store::Error),
}

/// A blob as a listing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    pub hash: Sha256Hex,
    pub size: u64,
    /// When its bytes were last written (file mtime, object last-modified).
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// A blob being read: its full size and a stream of the requested range.
pub struct BlobRead {
    pub size: u64,
    pub range: Range<u64>,
    pub stream: ByteStream,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Short name for logs: "fs" or "s3".
    fn backend(&self) -> &'static str;

    /// Stores `body` under `expected` if its bytes hash to it and are at most `max_size` long.
    /// When the blob exists already the body is still read and checked, then dropped. Returns
    /// the size.
    async fn put(
        &self,
        expected: &Sha256Hex,
        body: ByteStream,
        max_size: u64,
    ) -> Result<u64, BlobError>;

    /// Size of the blob, or `None` when the store lacks it.
    async fn size(&self, hash: &Sha256Hex) -> Result<Option<u64>, BlobError>;

    /// Sizes of many blobs, in order (`None` where the store lacks one): a pack's header
    /// needs every size before its first byte. A few lookups at a time by default.
    async fn sizes(&self, hashes: &[Sha256Hex]) -> Result<Vec<Option<u64>>, BlobError> {
        let mut sizes = Vec::with_capacity(hashes.len());
        for chunk in hashes.chunks(16) {
            let lookups: Vec<_> = chunk.iter().map(|h| self.size(h)).collect();
            sizes.extend(futures::future::try_join_all(lookups).await?);
        }
        Ok(sizes)
    }

    /// Reads the blob, or the byte `range` of it (end exclusive, clamped to the size).
    async fn get(&self, hash: &Sha256Hex, range: Option<Range<u64>>)
    -> Result<BlobRead, BlobError>;

    /// A short-lived URL a client can GET the blob from directly, where the backend offers
    /// one (S3); `None` for the filesystem.
    async fn presigned_get(
        &self,
        hash: &Sha256Hex,
        ttl: Duration,
    ) -> Result<Option<String>, BlobError>;

    /// Every stored blob's address (for backups); order unspecified.
    async fn list(&self) -> Result<Vec<Sha256Hex>, BlobError> {
        Ok(self
            .list_stored()
            .await?
            .into_iter()
            .map(|b| b.hash)
            .collect())
    }

    /// Every stored blob with its size and when it was written (for the garbage collector,
    /// which spares young blobs); order unspecified.
    async fn list_stored(&self) -> Result<Vec<StoredBlob>, BlobError>;

    /// Deletes a stored blob for good (the garbage collector's sweep); false when it was not
    /// there.
    async fn delete(&self, hash: &Sha256Hex) -> Result<bool, BlobError>;

    /// Moves a stored blob aside (never deletes it), under `quarantine/` beside the blobs, so
    /// that it is no longer served or listed but can still be looked at; returns where it went.
    async fn quarantine(&self, hash: &Sha256Hex) -> Result<String, BlobError>;

    /// The body of a pack of `items` (hash and size, sizes known to the caller): each blob
    /// after its header, in order (format in `synchub_protocol::pack`). Small blobs come from
    /// `hot` when it has them and are put there after a read. By default up to
    /// [`PACK_READS_IN_FLIGHT`] reads are started ahead of the one being sent (an object
    /// store's round trips overlap); the filesystem reads a whole pack in one blocking task.
    fn read_pack(self: Arc<Self>, items: Vec<(Sha256Hex, u64)>, hot: HotBlobs) -> ByteStream {
        use futures::StreamExt;
        futures::stream::iter(items)
            .map(move |(hash, size)| {
                let (store, hot) = (self.clone(), hot.clone());
                async move {
                    let header = Ok(Bytes::from(pack::encode_header(&hash, size)));
                    let small = if hot.takes(size) {
                        hot.load(&hash, size, get_bytes(store.as_ref(), &hash, size))
                            .await
                            .map(Some)
                    } else {
                        Ok(None)
                    };
                    match small {
                        Ok(Some(bytes)) => futures::stream::iter([header, Ok(bytes)]).boxed(),
                        Ok(None) => match store.get(&hash, None).await {
                            Ok(read) => futures::stream::once(async { header })
                                .chain(read.stream)
                                .boxed(),
                            Err(e) => failed(e),
                        },
                        Err(e) => failed(e),
                    }
                }
            })
            .buffered(PACK_READS_IN_FLIGHT)
            .flatten()
            .boxed()
    }
}

/// Reads a pack keeps started ahead of the blob being sent (see [`BlobStore::read_pack`]).
pub const PACK_READS_IN_FLIGHT: usize = 8;

/// A pack body that fails with `e` (the client sees a truncated pack and retries).
fn failed(e: BlobError) -> ByteStream {
    use futures::StreamExt;
    futures::stream::once(async move { Err(std::io::Error::other(e)) }).boxed()
}

/// Small blobs kept in memory because many agents ask for the same ones at once after a bump.
/// Only bytes that hashed to their address are put here. Cheap to clone (one shared cache).
#[derive(Clone)]
pub struct HotBlobs {
    cache: moka::sync::Cache<Sha256Hex, Bytes>,
    /// Whole pack bodies by their list of blobs (see [`HotBlobs::whole_pack`]).
    packs: moka::sync::Cache<Vec<(Sha256Hex, u64)>, Bytes>,
    max_blob: u64,
    /// Reads under way, so that a herd asking for a new blob at once reads it from the store
    /// once (see [`HotBlobs::load`]).
    loading: Arc<Mutex<HashMap<Sha256Hex, Arc<tokio::sync::OnceCell<Bytes>>>>>,
}

impl HotBlobs {
    /// At most `bytes` in all, each blob at most `max_blob` bytes, and a quarter as much again
    /// of whole pack bodies; `bytes == 0` keeps nothing.
    pub fn new(bytes: u64, max_blob: u64) -> Self {
        let weight = |b: &Bytes| u32::try_from(b.len()).unwrap_or(u32::MAX);
        HotBlobs {
            cache: moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(move |_: &Sha256Hex, b: &Bytes| weight(b))
                .build(),
            packs: moka::sync::Cache::builder()
                .max_capacity(bytes / 4)
                .weigher(move |_: &Vec<(Sha256Hex, u64)>, b: &Bytes| weight(b))
                .build(),
            max_blob: if bytes == 0 { 0 } else { max_blob },
            loading: Arc::default(),
        }
    }

    /// The blob's bytes from memory, or from `read` (bytes already checked against `hash`)
    /// and kept. Packs that ask for the same blob while it is being read wait for that one
    /// read instead of each reading it: after a bump the whole fleet asks for the same new
    /// blobs within a second, and an object store would get one request per agent. When the
    /// read fails or its pack goes away, the next waiter reads.
    pub async fn load(
        &self,
        hash: &Sha256Hex,
        size: u64,
        read: impl Future<Output = Result<Bytes, BlobError>>,
    ) -> Result<Bytes, BlobError> {
        if let Some(bytes) = self.get(hash, size) {
            return Ok(bytes);
        }
        let cell = self
            .loads()
            .entry(hash.clone())
            .or_insert_with(|| Arc::new(tokio::sync::OnceCell::new()))
            .clone();
        let done = LoadDone {
            hot: self,
            hash,
            cell,
        };
        let result = done
            .cell
            .get_or_try_init(|| async { read.await.map(|bytes| self.put(hash, bytes)) })
            .await
            .cloned();
        drop(done);
        result.and_then(|bytes| {
            if bytes.len() as u64 == size {
                Ok(bytes)
            } else {
                Err(BlobError::BadRange {
                    start: 0,
                    end: size,
                    size: bytes.len() as u64,
                })
            }
        })
    }

    fn loads(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Sha256Hex, Arc<tokio::sync::OnceCell<Bytes>>>> {
        self.loading.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a blob of `size` bytes is kept once read.
    pub fn takes(&self, size: u64) -> bool {
        size <= self.max_blob
    }

    /// The whole body of a pack of `items` (format in `synchub_protocol::pack`) in one buffer,
    /// when every blob is held: the herd after a bump asks for the same few new blobs, and one
    /// buffer with a known length goes out in a few large writes instead of a chunked stream of
    /// a header and a blob per item. The body is kept too: the agents that held the same
    /// version ask for the same list, and then share one buffer instead of each copying it.
    pub fn whole_pack(&self, items: &[(Sha256Hex, u64)]) -> Option<Bytes> {
        if self.max_blob == 0 {
            return None;
        }
        if let Some(body) = self.packs.get(items) {
            return Some(body);
        }
        let held: Vec<Bytes> = items
            .iter()
            .map(|(hash, size)| self.get(hash, *size))
            .collect::<Option<_>>()?;
        let len: usize = held.iter().map(|b| b.len() + 80).sum();
        let mut body = bytes::BytesMut::with_capacity(len);
        for ((hash, size), bytes) in items.iter().zip(held) {
            body.extend_from_slice(pack::encode_header(hash, *size).as_bytes());
            body.extend_from_slice(&bytes);
        }
        let body = body.freeze();
        self.packs.insert(items.to_vec(), body.clone());
        Some(body)
    }

    /// The blob's bytes, when held and of the expected `size`.
    pub fn get(&self, hash: &Sha256Hex, size: u64) -> Option<Bytes> {
        if !self.takes(size) {
            return None;
        }
        self.cache.get(hash).filter(|b| b.len() as u64 == size)
    }

    /// Keeps the bytes of a blob just stored through this hub (the store checked them against
    /// `hash`), when it is small enough to be kept.
    pub fn keep_stored(&self, hash: &Sha256Hex, bytes: Bytes) {
        if self.takes(bytes.len() as u64) {
            self.put(hash, bytes);
        }
    }

    /// Keeps bytes already checked against `hash`; returns them.
    fn put(&self, hash: &Sha256Hex, bytes: Bytes) -> Bytes {
        self.cache.insert(hash.clone(), bytes.clone());
        bytes
    }

    /// Keeps `bytes` when they hash to `hash` and returns them. Bytes that do not (a blob
    /// damaged on disk) are not kept: the error is logged for the admin (`synchub fsck`
    /// finds and quarantines such blobs) and the bytes are still sent, so the agent's own
    /// check fails, it says the data arrived damaged and downloads again, instead of a pack
    /// cut off mid-stream that reads as an unreachable hub.
    pub(crate) fn put_checked(&self, hash: &Sha256Hex, bytes: Bytes) -> Bytes {
        let actual = Sha256Hex::of(&bytes);
        if &actual != hash {
            metrics::counter!("synchub_corrupt_blobs_served_total").increment(1);
            tracing::error!(
                blob = %hash,
                actual = %actual,
                "a stored blob does not match its hash; run `synchub fsck`"
            );
            return bytes;
        }
        self.put(hash, bytes)
    }
}

/// Ends one ask of [`HotBlobs::load`], also when its pack goes away mid-read: the read's entry
/// goes once the bytes are in the cache, or once no other ask waits on a read that failed or
/// was dropped (the map and this hold the only references).
struct LoadDone<'a> {
    hot: &'a HotBlobs,
    hash: &'a Sha256Hex,
    cell: Arc<tokio::sync::OnceCell<Bytes>>,
}

impl Drop for LoadDone<'_> {
    fn drop(&mut self) {
        let mut loads = self.hot.loads();
        if loads
            .get(self.hash)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
            && (self.cell.initialized() || Arc::strong_count(&self.cell) <= 2)
        {
            loads.remove(self.hash);
        }
    }
}

/// Hashes and counts an upload while it streams and enforces the size limit: what every
/// backend's `put` does before the bytes may become visible under their address.
pub(crate) struct UploadCheck {
    hasher: sha2::Sha256,
    size: u64,
    max_size: u64,
}

impl UploadCheck {
    pub(crate) fn new(max_size: u64) -> Self {
        use sha2::Digest;
        UploadCheck {
            hasher: sha2::Sha256::new(),
            size: 0,
            max_size,
        }
    }

    /// The next chunk of the body, counted against the limit and hashed.
    pub(crate) fn take(&mut self, chunk: std::io::Result<Bytes>) -> Result<Bytes, BlobError> {
        use sha2::Digest;
        let chunk = chunk.map_err(BlobError::Interrupted)?;
        self.size += chunk.len() as u64;
        if self.size > self.max_size {
            return Err(BlobError::TooLarge {
                limit: self.max_size,
            });
        }
        self.hasher.update(&chunk);
        Ok(chunk)
    }

    /// Bytes taken so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The size, if the bytes hash to `expected`; `HashMismatch` otherwise.
    pub(crate) fn verify(self, expected: &Sha256Hex) -> Result<u64, BlobError> {
        use sha2::Digest;
        let actual = Sha256Hex::from_digest(self.hasher.finalize().into());
        if &actual == expected {
            Ok(self.size)
        } else {
            Err(BlobError::HashMismatch {
                expected: expected.clone(),
                actual,
            })
        }
    }
}

/// Whether the store holds `hash` with bytes that still hash to it. A stored copy can go bad
/// behind the hub's back (a failing disk, a hand-edited bucket); `put` uses this so that a
/// re-upload of the right bytes replaces such a copy instead of being dropped as a duplicate.
pub(crate) async fn holds_intact(
    store: &dyn BlobStore,
    hash: &Sha256Hex,
) -> Result<bool, BlobError> {
    use futures::StreamExt;
    let mut read = match store.get(hash, None).await {
        Ok(read) => read,
        Err(BlobError::NotFound(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut check = UploadCheck::new(u64::MAX);
    while let Some(chunk) = read.stream.next().await {
        check.take(Ok(chunk?))?;
    }
    match check.verify(hash) {
        Ok(_) => Ok(true),
        Err(BlobError::HashMismatch { actual, .. }) => {
            tracing::warn!(%hash, %actual, "stored blob fails its hash; the upload replaces it");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Stores bytes already in memory (manifests): a convenience over [`BlobStore::put`].
pub async fn put_bytes(store: &dyn BlobStore, bytes: Bytes) -> Result<Sha256Hex, BlobError> {
    let hash = Sha256Hex::of(&bytes);
    let len = bytes.len() as u64;
    store
        .put(
            &hash,
            Box::pin(futures::stream::once(async { Ok(bytes) })),
            len,
        )
        .await?;
    Ok(hash)
}

/// Reads a whole blob into memory (manifests), refusing one over `limit` bytes.
pub async fn get_bytes<S: BlobStore + ?Sized>(
    store: &S,
    hash: &Sha256Hex,
    limit: u64,
) -> Result<Bytes, BlobError> {
    use futures::TryStreamExt;
    let read = store.get(hash, None).await?;
    if read.size > limit {
        return Err(BlobError::TooLarge { limit });
    }
    let chunks: Vec<Bytes> = read.stream.try_collect().await?;
    let bytes = Bytes::from(chunks.concat());
    // Whatever is read whole is checked: one flipped byte in a stored manifest must not become
    // the base of the next version.
    let actual = {
        // Hashing a large manifest takes milliseconds: not on the async workers.
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || Sha256Hex::of(&bytes))
            .await
            .map_err(std::io::Error::other)?
    };
    if &actual != hash {
        return Err(BlobError::Corrupt {
            hash: hash.clone(),
            actual,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn hot() -> HotBlobs {
        HotBlobs::new(1 << 20, 64 << 10)
    }

    #[tokio::test]
    async fn a_pack_of_held_blobs_is_one_buffer_and_one_missing_blob_means_none() {
        let hot = hot();
        let blobs = [&b"first image"[..], b"second", b"first image"];
        let items: Vec<(Sha256Hex, u64)> = blobs
            .iter()
            .map(|b| (Sha256Hex::of(b), b.len() as u64))
            .collect();
        for (b, (hash, size)) in blobs.iter().zip(&items) {
            let read = async { Ok(Bytes::copy_from_slice(b)) };
            hot.load(hash, *size, read).await.unwrap();
        }
        let mut expected = Vec::new();
        for (b, (hash, size)) in blobs.iter().zip(&items) {
            expected.extend_from_slice(pack::encode_header(hash, *size).as_bytes());
            expected.extend_from_slice(b);
        }
        let first = hot.whole_pack(&items).unwrap();
        assert_eq!(&first[..], &expected[..]);
        let again = hot.whole_pack(&items).unwrap();
        assert_eq!(
            again.as_ptr(),
            first.as_ptr(),
            "the same list shares one buffer"
        );
        let unknown = (Sha256Hex::of(b"not held"), 8);
        assert_eq!(hot.whole_pack(&[items[0].clone(), unknown]), None);
        let wrong_size = (items[1].0.clone(), 7);
        assert_eq!(hot.whole_pack(&[wrong_size]), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn asks_while_a_blob_is_read_share_that_read() {
        let (hot, bytes) = (hot(), Bytes::from_static(b"a new QR image"));
        let hash = Sha256Hex::of(&bytes);
        let reads = AtomicUsize::new(0);
        let read = || async {
            reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(bytes.clone())
        };
        let asks = (0..20).map(|_| hot.load(&hash, bytes.len() as u64, read()));
        for got in futures::future::join_all(asks).await {
            assert_eq!(got.unwrap(), bytes);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(hot.loads().is_empty(), "no read left under way");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_or_abandoned_read_is_tried_again_and_leaves_nothing_behind() {
        let (hot, bytes) = (hot(), Bytes::from_static(b"a new QR image"));
        let (hash, size) = (Sha256Hex::of(&bytes), bytes.len() as u64);
        let failed = hot
            .load(&hash, size, async {
                Err(BlobError::NotFound(hash.clone()))
            })
            .await;
        assert!(failed.is_err());
        assert!(hot.loads().is_empty(), "a failed read is forgotten");

        // A pack that goes away in the middle of its read.
        let abandoned = hot.load(&hash, size, futures::future::pending());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), abandoned)
                .await
                .is_err()
        );
        assert!(hot.loads().is_empty(), "an abandoned read is forgotten");

        let got = hot.load(&hash, size, async { Ok(bytes.clone()) }).await;
        assert_eq!(got.unwrap(), bytes);
    }
}
