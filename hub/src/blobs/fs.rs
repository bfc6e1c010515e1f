//! Filesystem backend of [`super::BlobStore`]: the embedded default.
//!
//! Blobs live at `root/ab/cd/<sha256>` (the first two bytes of the digest as folders, so no
//! folder grows past 65,536 entries). An upload streams to `root/tmp/<random>` while it is
//! hashed and counted, is fsync'd, and is renamed into place only when the digest matches, so
//! a reader never sees a partial or wrong blob. Every failure path (and a dropped `put`
//! future) removes the temporary file. A root belongs to one hub process: `new` deletes what
//! an earlier process left in `tmp/`.

use super::{BlobError, BlobRead, BlobStore, ByteStream, HotBlobs, StoredBlob, UploadCheck};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::io::{ErrorKind, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use synchub_protocol::Sha256Hex;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

/// Size of the chunks `get` streams.
const READ_CHUNK: usize = 64 * 1024;

/// Content-addressed blobs in a local folder.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating it if needed) the store at `root` and removes stale uploads from
    /// `root/tmp`.
    pub fn new(root: PathBuf) -> Result<Self, BlobError> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            let path = entry.path();
            let removed = if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => tracing::debug!(path = %path.display(), "removed stale upload"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(FsBlobStore { root, tmp })
    }

    /// Opens the store a running hub owns at `root`, for a command-line tool beside it: creates
    /// nothing and leaves `tmp/` (the hub's uploads in flight) alone. `NotFound` when `root`
    /// is not there.
    pub fn open_existing(root: PathBuf) -> Result<Self, BlobError> {
        if !root.is_dir() {
            return Err(BlobError::Io(std::io::Error::new(
                ErrorKind::NotFound,
                format!("no blob folder at {}", root.display()),
            )));
        }
        let tmp = root.join("tmp");
        Ok(FsBlobStore { root, tmp })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder uploads stream to before they are verified (empty when no upload runs).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Where the blob `hash` lives: `root/ab/cd/abcd...`.
    pub fn blob_path(&self, hash: &Sha256Hex) -> PathBuf {
        let h = hash.as_str();
        self.root.join(&h[0..2]).join(&h[2..4]).join(h)
    }

    /// Writes the body to a fresh temporary file; returns it (still guarded) with the size,
    /// once the stream ended within `max_size` and hashed to `expected`.
    async fn receive(
        &self,
        mut body: ByteStream,
        expected: &Sha256Hex,
        max_size: u64,
    ) -> Result<(TempFile, u64), BlobError> {
        let temp = TempFile::new(self.tmp.join(format!("{:016x}", rand::random::<u64>())));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .await?;
        // Network chunks are small; each tokio::fs write is a trip to the blocking pool, so
        // gather them into large writes.
        let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut check = UploadCheck::new(max_size);
        while let Some(chunk) = body.next().await {
            file.write_all(&check.take(chunk)?).await?;
        }
        let size = check.verify(expected)?;
        file.flush().await?;
        let file = file.into_inner();
        file.sync_all().await?;
        drop(file);
        Ok((temp, size))
    }
}

/// Chunks a pack's reading task may be ahead of the socket.
const PACK_CHUNKS_AHEAD: usize = 16;

type PackSender = tokio::sync::mpsc::Sender<std::io::Result<Bytes>>;

impl FsBlobStore {
    /// Sends one blob of a pack (blocking): from `hot`, or read whole and kept there when
    /// small, or streamed in chunks. Ok when the client went away (nothing more to do).
    fn send_blob(
        &self,
        hash: &Sha256Hex,
        size: u64,
        hot: &HotBlobs,
        tx: &PackSender,
    ) -> Result<(), BlobError> {
        use std::io::Read;
        if let Some(bytes) = hot.get(hash, size) {
            let _ = tx.blocking_send(Ok(bytes));
            return Ok(());
        }
        let file = std::fs::File::open(self.blob_path(hash)).map_err(|e| not_found(hash, e))?;
        let actual = file.metadata()?.len();
        if actual != size {
            return Err(BlobError::BadRange {
                start: 0,
                end: size,
                size: actual,
            });
        }
        let mut file = file.take(size);
        if hot.takes(size) {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)?;
            let _ = tx.blocking_send(Ok(hot.put_checked(hash, Bytes::from(bytes))));
            return Ok(());
        }
        loop {
            let mut chunk = vec![0; READ_CHUNK];
            let n = file.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            chunk.truncate(n);
            if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                return Ok(());
            }
        }
    }
}

/// Reads a body only to check it: the blob is stored already.
async fn check_only(
    mut body: ByteStream,
    expected: &Sha256Hex,
    max_size: u64,
) -> Result<u64, BlobError> {
    let mut check = UploadCheck::new(max_size);
    while let Some(chunk) = body.next().await {
        check.take(chunk)?;
    }
    check.verify(expected)
}

/// A temporary upload file, removed when dropped unless it was renamed into place: this
/// covers every error path and a `put` future dropped mid-stream.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> Self {
        TempFile { path, armed: true }
    }

    async fn persist(mut self, dest: &Path) -> std::io::Result<()> {
        tokio::fs::rename(&self.path, dest).await?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %self.path.display(), error = %e,
                    "could not remove temporary upload"),
            }
        }
    }
}

/// Makes a rename in `dir` durable.
async fn sync_dir(dir: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

fn not_found(hash: &Sha256Hex, e: std::io::Error) -> BlobError {
    if e.kind() == ErrorKind::NotFound {
        BlobError::NotFound(hash.clone())
    } else {
        BlobError::Io(e)
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    fn backend(&self) -> &'static str {
        "fs"
    }

    async fn put(
        &self,
        expected: &Sha256Hex,
        body: ByteStream,
        max_size: u64,
    ) -> Result<u64, BlobError> {
        let dest = self.blob_path(expected);
        if super::holds_intact(self, expected).await? {
            return check_only(body, expected, max_size).await;
        }
        let (temp, size) = self.receive(body, expected, max_size).await?;
        let dir = dest.parent().expect("blob path has folders").to_path_buf();
        tokio::fs::create_dir_all(&dir).await?;
        // A concurrent put of the same blob may have renamed first: renaming over it swaps
        // identical bytes atomically, so readers never notice. A corrupt copy is replaced
        // the same way.
        temp.persist(&dest).await?;
        sync_dir(dir).await?;
        Ok(size)
    }

    async fn size(&self, hash: &Sha256Hex) -> Result<Option<u64>, BlobError> {
        match tokio::fs::metadata(self.blob_path(hash)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// All in one blocking task: a `tokio::fs` call per blob is a hand-off to the blocking
    /// pool and back each time, which cost more than the `stat` itself in a herd.
    async fn sizes(&self, hashes: &[Sha256Hex]) -> Result<Vec<Option<u64>>, BlobError> {
        let paths: Vec<PathBuf> = hashes.iter().map(|h| self.blob_path(h)).collect();
        let sizes = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|path| match std::fs::metadata(path) {
                    Ok(meta) => Ok(Some(meta.len())),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                })
                .collect::<Result<Vec<_>, _>>()
        });
        Ok(sizes.await.map_err(std::io::Error::other)??)
    }

    async fn get(
        &self,
        hash: &Sha256Hex,
        range: Option<Range<u64>>,
    ) -> Result<BlobRead, BlobError> {
        let mut file = tokio::fs::File::open(self.blob_path(hash))
            .await
            .map_err(|e| not_found(hash, e))?;
        let size = file.metadata().await?.len();
        let range = match range {
            None => 0..size,
            Some(r) if r.start >= size || r.start >= r.end => {
                return Err(BlobError::BadRange {
                    start: r.start,
                    end: r.end,
                    size,
                });
            }
            Some(r) => r.start..r.end.min(size),
        };
        if range.start > 0 {
            file.seek(SeekFrom::Start(range.start)).await?;
        }
        let reader = file.take(range.end - range.start);
        Ok(BlobRead {
            size,
            range,
            stream: Box::pin(ReaderStream::with_capacity(reader, READ_CHUNK)),
        })
    }

    async fn presigned_get(
        &self,
        _hash: &Sha256Hex,
        _ttl: Duration,
    ) -> Result<Option<String>, BlobError> {
        Ok(None)
    }

    async fn quarantine(&self, hash: &Sha256Hex) -> Result<String, BlobError> {
        let folder = self.root.join("quarantine");
        tokio::fs::create_dir_all(&folder).await?;
        let dest = folder.join(format!(
            "{hash}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ));
        tokio::fs::rename(self.blob_path(hash), &dest)
            .await
            .map_err(|e| not_found(hash, e))?;
        sync_dir(folder).await?;
        Ok(dest.display().to_string())
    }

    /// One blocking task reads the whole pack with plain file reads and hands the bytes over a
    /// short channel: a few hundred small files cost one hand-off, not several `tokio::fs` trips
    /// each. The task ends when the pack is read or the client goes away.
    fn read_pack(self: Arc<Self>, items: Vec<(Sha256Hex, u64)>, hot: HotBlobs) -> ByteStream {
        // (A pack of blobs all in memory never gets here: see `HotBlobs::whole_pack`.)
        let (tx, rx) = tokio::sync::mpsc::channel(PACK_CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || {
            for (hash, size) in items {
                let header = Bytes::from(synchub_protocol::pack::encode_header(&hash, size));
                if tx.blocking_send(Ok(header)).is_err() {
                    return;
                }
                if let Err(e) = self.send_blob(&hash, size, &hot, &tx) {
                    let _ = tx.blocking_send(Err(std::io::Error::other(e)));
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    async fn list_stored(&self) -> Result<Vec<StoredBlob>, BlobError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || list_blocking(&root))
            .await
            .map_err(std::io::Error::other)?
    }

    async fn delete(&self, hash: &Sha256Hex) -> Result<bool, BlobError> {
        let path = self.blob_path(hash);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        sync_dir(path.parent().expect("blob path has folders").to_path_buf()).await?;
        Ok(true)
    }
}

/// Walks `root/ab/cd/`; anything else (tmp/, stray files) is not a blob and is skipped.
fn list_blocking(root: &Path) -> Result<Vec<StoredBlob>, BlobError> {
    fn is_byte_dir(entry: &std::fs::DirEntry) -> bool {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.len() == 2
            && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && entry.file_type().is_ok_and(|t| t.is_dir())
    }
    let mut out = Vec::new();
    for first in std::fs::read_dir(root)? {
        let first = first?;
        if !is_byte_dir(&first) {
            continue;
        }
        for second in std::fs::read_dir(first.path())? {
            let second = second?;
            if !is_byte_dir(&second) {
                continue;
            }
            for blob in std::fs::read_dir(second.path())? {
                let blob = blob?;
                let Some(hash) = blob
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Sha256Hex>().ok())
                else {
                    continue;
                };
                let meta = match blob.metadata() {
                    Ok(meta) => meta,
                    // Deleted since the folder was read (a sweep elsewhere).
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                out.push(StoredBlob {
                    hash,
                    size: meta.len(),
                    modified: meta.modified()?.into(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_removes_stale_uploads_and_keeps_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::new(dir.path().to_path_buf()).unwrap();
        let hash = Sha256Hex::of(b"abc");
        let blob = store.blob_path(&hash);
        assert_eq!(
            blob,
            dir.path().join("ba").join("78").join(hash.as_str()),
            "root/ab/cd/<sha256>"
        );
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"abc").unwrap();
        std::fs::write(store.tmp_dir().join("0123"), b"half an upload").unwrap();
        std::fs::create_dir(store.tmp_dir().join("stray")).unwrap();

        let store = FsBlobStore::new(dir.path().to_path_buf()).unwrap();
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
        assert_eq!(std::fs::read(&blob).unwrap(), b"abc");
        let listed = list_blocking(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((&listed[0].hash, listed[0].size), (&hash, 3));
    }
}
