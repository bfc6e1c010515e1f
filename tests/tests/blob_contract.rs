//! The `BlobStore` contract, one suite run against both backends: the filesystem store in a
//! temporary folder and the S3 store on a fresh bucket of the process's moto server.
//!
//! Each contract test is an `async fn(Backend)` below; `backend_matrix!` instantiates it once per
//! backend (`fs::name`, `s3::name`). `large_blob_throughput` is `#[ignore]`d: the benchmark
//! script runs it with `--ignored --nocapture` (use `--release`) and it prints throughput and
//! peak RSS rather than asserting them.

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synchub_hub::blobs::fs::FsBlobStore;
use synchub_hub::blobs::s3::{PART_SIZE, S3BlobStore};
use synchub_hub::blobs::{BlobError, BlobRead, BlobStore, ByteStream};
use synchub_protocol::Sha256Hex;

/// Larger than one multipart part, so S3 takes the staging + multipart path.
const MULTIPART_BODY: u64 = PART_SIZE as u64 + 1024 * 1024 + 17;
const MIB: u64 = 1024 * 1024;

/// A store under test and what it needs to look for leftovers.
struct Backend {
    store: Arc<dyn BlobStore>,
    kind: Kind,
}

enum Kind {
    /// The folder is deleted when the backend is dropped.
    Fs {
        store: FsBlobStore,
        _dir: tempfile::TempDir,
    },
    S3 {
        store: S3BlobStore,
        config: synchub_hub::blobs::s3::S3Config,
    },
}

impl Backend {
    async fn fs() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = FsBlobStore::new(dir.path().join("blobs"))?;
        Ok(Backend {
            store: Arc::new(store.clone()),
            kind: Kind::Fs { store, _dir: dir },
        })
    }

    async fn s3() -> anyhow::Result<Self> {
        let config = synchub_tests::s3::test_bucket().await?;
        let store = S3BlobStore::new(&config)?;
        Ok(Backend {
            store: Arc::new(store.clone()),
            kind: Kind::S3 { store, config },
        })
    }

    /// Temporary files (fs) or staging objects (S3) left behind.
    async fn leftovers(&self) -> anyhow::Result<Vec<String>> {
        Ok(match &self.kind {
            Kind::Fs { store, .. } => std::fs::read_dir(store.tmp_dir())?
                .map(|e| Ok(e?.path().display().to_string()))
                .collect::<std::io::Result<_>>()?,
            Kind::S3 { store, .. } => store.staging_objects().await?,
        })
    }

    /// Replaces the stored copy of `hash` with `bytes` behind the store's back, as a failing
    /// disk or a careless admin would.
    async fn corrupt(&self, hash: &Sha256Hex, bytes: &[u8]) -> anyhow::Result<()> {
        match &self.kind {
            Kind::Fs { store, .. } => std::fs::write(store.blob_path(hash), bytes)?,
            Kind::S3 { config, .. } => {
                // moto does not check signatures, only that a request names its key id.
                let url = format!(
                    "{}/{}/{}{}",
                    config
                        .endpoint
                        .as_deref()
                        .context("test bucket has an endpoint")?,
                    config.bucket,
                    config.prefix,
                    hash
                );
                let client = reqwest::Client::builder().no_proxy().build()?;
                let auth = format!(
                    "AWS4-HMAC-SHA256 Credential={}/20260101/{}/s3/aws4_request, \
                     SignedHeaders=host, Signature=00",
                    config.access_key_id, config.region
                );
                let response = client
                    .put(&url)
                    .header("authorization", auth)
                    .body(bytes.to_vec())
                    .send()
                    .await?;
                ensure!(
                    response.status().is_success(),
                    "PUT {url}: {}",
                    response.status()
                );
            }
        }
        Ok(())
    }

    /// The blob is nowhere to be seen: no size, not readable, not listed, no leftovers.
    async fn assert_absent(&self, hash: &Sha256Hex) -> anyhow::Result<()> {
        let store = &self.store;
        ensure!(store.size(hash).await?.is_none(), "size() sees {hash}");
        match store.get(hash, None).await {
            Err(BlobError::NotFound(h)) => ensure!(&h == hash),
            Err(e) => anyhow::bail!("get({hash}) failed with {e} instead of NotFound"),
            Ok(_) => anyhow::bail!("get({hash}) found the blob"),
        }
        ensure!(!store.list().await?.contains(hash), "list() has {hash}");
        let left = self.leftovers().await?;
        ensure!(left.is_empty(), "left behind: {left:?}");
        Ok(())
    }
}

/// `data` as a stream of `chunk`-byte pieces.
fn chunked(data: &Bytes, chunk: usize) -> ByteStream {
    let pieces: Vec<_> = (0..data.len())
        .step_by(chunk.max(1))
        .map(|at| Ok(data.slice(at..(at + chunk).min(data.len()))))
        .collect();
    Box::pin(stream::iter(pieces))
}

/// Deterministic bytes (xorshift), fast enough to generate hundreds of MiB.
fn generated(len: u64, seed: u64) -> impl Iterator<Item = Bytes> {
    const CHUNK: u64 = 64 * 1024;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK);
        left -= n;
        let mut buf = Vec::with_capacity(n as usize + 8);
        while (buf.len() as u64) < n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            buf.extend_from_slice(&state.to_le_bytes());
        }
        buf.truncate(n as usize);
        Some(Bytes::from(buf))
    })
}

fn generated_stream(len: u64, seed: u64) -> ByteStream {
    Box::pin(stream::iter(generated(len, seed).map(Ok)))
}

fn generated_hash(len: u64, seed: u64) -> Sha256Hex {
    let mut hasher = Sha256::new();
    generated(len, seed).for_each(|chunk| hasher.update(&chunk));
    Sha256Hex::from_digest(hasher.finalize().into())
}

/// Yields `len` generated bytes, then fails like a client that went away.
fn interrupted_stream(len: u64, seed: u64) -> ByteStream {
    let broken = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "client went away");
    Box::pin(generated_stream(len, seed).chain(stream::once(async { Err(broken) })))
}

fn random_bytes(len: usize, seed: u64) -> Bytes {
    Bytes::from(
        generated(len as u64, seed)
            .flat_map(|b| b.to_vec())
            .collect::<Vec<u8>>(),
    )
}

async fn read_all(read: BlobRead) -> anyhow::Result<Vec<u8>> {
    let chunks: Vec<Bytes> = read.stream.try_collect().await?;
    Ok(chunks.concat())
}

async fn get_range(
    store: &dyn BlobStore,
    hash: &Sha256Hex,
    range: Range<u64>,
) -> Result<(Range<u64>, Vec<u8>), BlobError> {
    let read = store.get(hash, Some(range)).await?;
    let got = read.range.clone();
    let chunks: Vec<Bytes> = read.stream.try_collect().await?;
    Ok((got, chunks.concat()))
}

async fn round_trip(b: Backend) -> anyhow::Result<()> {
    let data = random_bytes(300_001, 1);
    let hash = Sha256Hex::of(&data);
    let size = b.store.put(&hash, chunked(&data, 7_000), 1 << 20).await?;
    ensure!(size == data.len() as u64);
    ensure!(b.store.size(&hash).await? == Some(size));
    let read = b.store.get(&hash, None).await?;
    ensure!(read.size == size && read.range == (0..size));
    ensure!(read_all(read).await? == data, "bytes differ");
    ensure!(b.leftovers().await?.is_empty());
    Ok(())
}

async fn empty_blob(b: Backend) -> anyhow::Result<()> {
    let hash = Sha256Hex::empty();
    ensure!(b.store.put(&hash, chunked(&Bytes::new(), 1), 0).await? == 0);
    ensure!(b.store.size(&hash).await? == Some(0));
    let read = b.store.get(&hash, None).await?;
    ensure!(read.size == 0);
    ensure!(read_all(read).await?.is_empty());
    Ok(())
}

async fn put_existing(b: Backend) -> anyhow::Result<()> {
    let data = random_bytes(50_000, 2);
    let hash = Sha256Hex::of(&data);
    b.store.put(&hash, chunked(&data, 4096), 1 << 20).await?;
    // Again: accepted, body still checked.
    ensure!(b.store.put(&hash, chunked(&data, 999), 1 << 20).await? == 50_000);
    let wrong = random_bytes(50_000, 3);
    match b.store.put(&hash, chunked(&wrong, 4096), 1 << 20).await {
        Err(BlobError::HashMismatch { expected, .. }) => ensure!(expected == hash),
        other => anyhow::bail!("wrong body for an existing blob gave {other:?}"),
    }
    match b.store.put(&hash, chunked(&data, 4096), 100).await {
        Err(BlobError::TooLarge { limit: 100 }) => {}
        other => anyhow::bail!("oversize body for an existing blob gave {other:?}"),
    }
    let read = b.store.get(&hash, None).await?;
    ensure!(read_all(read).await? == data, "existing blob changed");
    ensure!(b.leftovers().await?.is_empty());
    Ok(())
}

/// A stored copy that no longer matches its address (bit rot, a truncated copy) is replaced
/// by a re-upload of the right bytes instead of being kept as "already there".
async fn put_repairs_a_corrupt_copy(b: Backend) -> anyhow::Result<()> {
    let data = random_bytes(50_000, 4);
    let hash = Sha256Hex::of(&data);
    b.store.put(&hash, chunked(&data, 4096), 1 << 20).await?;
    let mut bad = data.to_vec();
    bad[10] ^= 0xff;
    b.corrupt(&hash, &bad).await?;
    ensure!(b.store.put(&hash, chunked(&data, 4096), 1 << 20).await? == 50_000);
    let read = b.store.get(&hash, None).await?;
    ensure!(
        read_all(read).await? == data,
        "re-upload kept the corrupt copy"
    );
    // A wrong body neither repairs nor replaces anything.
    b.corrupt(&hash, &bad[..1000]).await?;
    match b
        .store
        .put(&hash, chunked(&Bytes::from(bad), 4096), 1 << 20)
        .await
    {
        Err(BlobError::HashMismatch { .. }) => {}
        other => anyhow::bail!("wrong body over a corrupt copy gave {other:?}"),
    }
    ensure!(b.store.size(&hash).await? == Some(1000));
    ensure!(b.leftovers().await?.is_empty());
    Ok(())
}

async fn range_reads(b: Backend) -> anyhow::Result<()> {
    let data = random_bytes(100_000, 4);
    let hash = Sha256Hex::of(&data);
    let size = data.len() as u64;
    b.store.put(&hash, chunked(&data, 10_000), size).await?;
    let store = b.store.as_ref();
    for (asked, expect) in [
        (0..1, 0..1),
        (1234..56789, 1234..56789),
        (99_000..size, 99_000..size),
        (99_999..size + 500, 99_999..size),
        (0..u64::MAX, 0..size),
    ] {
        let (got, bytes) = get_range(store, &hash, asked.clone()).await?;
        ensure!(got == expect, "range {asked:?} read as {got:?}");
        let want = &data[expect.start as usize..expect.end as usize];
        ensure!(bytes == want, "range {asked:?}: bytes differ");
    }
    for beyond in [size..size + 1, size + 10..size + 20, 5..5] {
        match get_range(store, &hash, beyond.clone()).await {
            Err(BlobError::BadRange { size: s, .. }) => ensure!(s == size),
            other => anyhow::bail!("range {beyond:?} gave {:?}", other.map(|r| r.0)),
        }
    }
    let missing = Sha256Hex::of(b"never stored");
    ensure!(matches!(
        b.store.get(&missing, Some(0..1)).await,
        Err(BlobError::NotFound(_))
    ));
    Ok(())
}

async fn wrong_hash(b: Backend) -> anyhow::Result<()> {
    for len in [10_000, MULTIPART_BODY] {
        let claimed = generated_hash(len, 6);
        match b
            .store
            .put(&claimed, generated_stream(len, 5), u64::MAX)
            .await
        {
            Err(BlobError::HashMismatch { expected, actual }) => {
                ensure!(expected == claimed && actual == generated_hash(len, 5));
            }
            other => anyhow::bail!("{len} bytes under a wrong hash gave {other:?}"),
        }
        b.assert_absent(&claimed).await?;
        b.assert_absent(&generated_hash(len, 5)).await?;
    }
    Ok(())
}

async fn too_large(b: Backend) -> anyhow::Result<()> {
    for (len, limit) in [(10_000, 9_999), (MULTIPART_BODY, MULTIPART_BODY - 1)] {
        let hash = generated_hash(len, 7);
        match b.store.put(&hash, generated_stream(len, 7), limit).await {
            Err(BlobError::TooLarge { limit: l }) => ensure!(l == limit),
            other => anyhow::bail!("{len} bytes over a {limit} limit gave {other:?}"),
        }
        b.assert_absent(&hash).await?;
    }
    // Exactly at the limit is fine.
    let hash = generated_hash(10_000, 7);
    ensure!(
        b.store
            .put(&hash, generated_stream(10_000, 7), 10_000)
            .await?
            == 10_000
    );
    Ok(())
}

async fn interrupted(b: Backend) -> anyhow::Result<()> {
    for len in [10_000, MULTIPART_BODY] {
        // The hash of the whole body the client meant to send.
        let hash = generated_hash(len + 1000, 8);
        match b
            .store
            .put(&hash, interrupted_stream(len, 8), u64::MAX)
            .await
        {
            Err(BlobError::Interrupted(e)) => {
                ensure!(e.kind() == std::io::ErrorKind::ConnectionReset)
            }
            other => anyhow::bail!("a stream broken after {len} bytes gave {other:?}"),
        }
        b.assert_absent(&hash).await?;
    }
    Ok(())
}

async fn concurrent_puts(b: Backend) -> anyhow::Result<()> {
    for len in [MIB, MULTIPART_BODY] {
        let hash = generated_hash(len, 9);
        let puts = (0..2).map(|_| {
            let store = b.store.clone();
            let hash = hash.clone();
            tokio::spawn(async move { store.put(&hash, generated_stream(len, 9), len).await })
        });
        for put in futures::future::join_all(puts).await {
            ensure!(put?? == len);
        }
        let read = b.store.get(&hash, None).await?;
        ensure!(Sha256Hex::of(&read_all(read).await?) == hash);
        ensure!(b.leftovers().await?.is_empty());
    }
    Ok(())
}

async fn list(b: Backend) -> anyhow::Result<()> {
    ensure!(b.store.list().await?.is_empty());
    let mut hashes = Vec::new();
    for seed in 10..13 {
        let data = random_bytes(1000 + seed as usize, seed);
        hashes.push(synchub_hub::blobs::put_bytes(b.store.as_ref(), data).await?);
    }
    // A failed upload adds nothing.
    let _ = b
        .store
        .put(&generated_hash(100, 99), interrupted_stream(50, 99), 1000)
        .await;
    let mut listed = b.store.list().await?;
    listed.sort();
    hashes.sort();
    ensure!(listed == hashes, "listed {listed:?}, stored {hashes:?}");
    Ok(())
}

async fn multipart_sized_blob(b: Backend) -> anyhow::Result<()> {
    let len = 20 * MIB;
    let hash = generated_hash(len, 14);
    ensure!(b.store.put(&hash, generated_stream(len, 14), len).await? == len);
    ensure!(b.store.size(&hash).await? == Some(len));
    let read = b.store.get(&hash, None).await?;
    ensure!(read.size == len);
    let mut hasher = Sha256::new();
    let mut read_len = 0u64;
    let mut stream = read.stream;
    while let Some(chunk) = stream.try_next().await? {
        read_len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    ensure!(read_len == len);
    ensure!(
        Sha256Hex::from_digest(hasher.finalize().into()) == hash,
        "bytes differ"
    );
    // A range across the part boundary.
    let boundary = PART_SIZE as u64;
    let (_, bytes) = get_range(b.store.as_ref(), &hash, boundary - 10..boundary + 10).await?;
    let whole: Vec<u8> = generated(boundary + 10, 14)
        .flat_map(|c| c.to_vec())
        .collect();
    ensure!(bytes == whole[boundary as usize - 10..]);
    ensure!(b.leftovers().await?.is_empty());
    Ok(())
}

async fn presigned_get(b: Backend) -> anyhow::Result<()> {
    let data = random_bytes(70_000, 15);
    let hash = synchub_hub::blobs::put_bytes(b.store.as_ref(), data.clone()).await?;
    let url = b
        .store
        .presigned_get(&hash, Duration::from_secs(60))
        .await?;
    match b.store.backend() {
        "fs" => ensure!(url.is_none(), "fs gave a presigned URL"),
        _ => {
            let url = url.context("S3 gave no presigned URL")?;
            synchub_hub::blobs::s3::install_crypto_provider();
            let client = reqwest::Client::builder().no_proxy().build()?;
            let response = client.get(&url).send().await?.error_for_status()?;
            ensure!(
                response.bytes().await? == data,
                "presigned download differs"
            );
        }
    }
    Ok(())
}

synchub_tests::backend_matrix!(
    [fs => Backend::fs().await?, s3 => Backend::s3().await?]
    round_trip,
    empty_blob,
    put_existing,
    put_repairs_a_corrupt_copy,
    range_reads,
    wrong_hash,
    too_large,
    interrupted,
    concurrent_puts,
    list,
    multipart_sized_blob,
    presigned_get,
);

/// The environment here sets AWS_CA_BUNDLE (and could set other AWS_* variables): the S3
/// store must ignore them for its explicit config. Runs `s3::round_trip` in a child process
/// of this test binary with hostile AWS_* values.
#[test]
fn s3_ignores_aws_environment() -> anyhow::Result<()> {
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["s3::round_trip", "--exact", "--test-threads=1"])
        .env("AWS_CA_BUNDLE", "/nonexistent/ca-bundle.pem")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .env("AWS_ENDPOINT", "http://127.0.0.1:1")
        .env("AWS_REGION", "nowhere-1")
        .env("AWS_ALLOW_HTTP", "false")
        .env("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true")
        .stdout(std::process::Stdio::null())
        .status()?;
    ensure!(
        status.success(),
        "s3::round_trip failed under hostile AWS_* variables"
    );
    Ok(())
}

fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

/// Streams a 256 MiB blob in and out of each backend; prints MB/s and peak RSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture, in release mode"]
async fn large_blob_throughput() -> anyhow::Result<()> {
    let len = 256 * MIB;
    let hash = generated_hash(len, 42);
    let mb = len as f64 / 1e6;
    for backend in [Backend::fs().await?, Backend::s3().await?] {
        let name = backend.store.backend();
        let started = Instant::now();
        backend
            .store
            .put(&hash, generated_stream(len, 42), len)
            .await?;
        let put = started.elapsed();
        let rss_after_put = proc_status("VmHWM:");

        let started = Instant::now();
        let mut stream = backend.store.get(&hash, None).await?.stream;
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.try_next().await? {
            hasher.update(&chunk);
        }
        let get = started.elapsed();
        ensure!(Sha256Hex::from_digest(hasher.finalize().into()) == hash);
        println!(
            "blob {name}: 256 MiB put {:.0} MB/s ({put:.2?}), get+verify {:.0} MB/s ({get:.2?}); \
             peak RSS after put {rss_after_put}, after get {} (VmRSS now {})",
            mb / put.as_secs_f64(),
            mb / get.as_secs_f64(),
            proc_status("VmHWM:"),
            proc_status("VmRSS:"),
        );
    }
    Ok(())
}
