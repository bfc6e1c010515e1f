//! Issue 5's end-to-end proof: a hub whose blobs live in S3 (a real moto server), agents that
//! take large blobs from presigned URLs the hub redirects them to and small ones from packs
//! the hub streams out of the bucket, the agent's hash check behind such a redirect, an upload
//! cut off mid-body leaving nothing in the bucket, and (ignored, run by the benchmark script)
//! 1 GiB through the hub on the filesystem and on S3 with throughput and peak memory.

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use synchub_client::{AgentConfig, HubApi, SyncClient};
use synchub_hub::blobs::BlobStore;
use synchub_hub::blobs::s3::{S3BlobStore, S3Config};
use synchub_hub::config::BlobStoreConfig;
use synchub_protocol::{AgentState, BlobList, Role, Sha256Hex, pack};
use synchub_tests::fixtures::{agent_config, metric, read_tree, wait_ready};
use synchub_tests::hub::TestHub;
use synchub_tests::s3::test_bucket;
use tokio::io::AsyncWriteExt;

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;
const REDIRECTS: &str = "synchub_blob_redirects_total";

fn init() {
    synchub_client::install_crypto_provider();
}

/// A hub on SQLite whose blob store is a fresh moto bucket.
async fn s3_hub(presign: bool) -> anyhow::Result<(TestHub, S3Config)> {
    let s3 = test_bucket().await?;
    let config = s3.clone();
    let hub = TestHub::start_with(move |c| {
        c.blob_store = BlobStoreConfig::S3(config);
        c.presign_downloads = presign;
    })
    .await?;
    Ok((hub, s3))
}

/// An HTTP client that shows redirects instead of following them.
fn no_redirects() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Deterministic, incompressible bytes (splitmix64), so content is reproducible from a seed.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        Noise(seed).fill(&mut buf);
        buf
    }

    /// `len` bytes from `seed` as a stream of 1 MiB chunks, never all in memory.
    fn stream(seed: u64, len: u64) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        const CHUNK: u64 = 1 << 20;
        futures::stream::unfold((Noise(seed), len), |(mut noise, left)| async move {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0; left.min(CHUNK) as usize];
            noise.fill(&mut buf);
            Some((Ok(Bytes::from(buf)), (noise, left - left.min(CHUNK))))
        })
    }
}

/// Writes an object straight into the bucket, behind the hub's back. moto wants a credential
/// in the request (anonymous writes are refused) but checks no signature.
async fn put_object(s3: &S3Config, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
    let url = format!(
        "{}/{}/{key}",
        s3.endpoint.as_deref().context("no S3 endpoint")?,
        s3.bucket
    );
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/20260101/{}/s3/aws4_request, \
         SignedHeaders=host, Signature={}",
        s3.access_key_id,
        s3.region,
        "0".repeat(64)
    );
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .put(&url)
        .header(reqwest::header::AUTHORIZATION, authorization)
        .body(body)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "PUT {url}: {}", resp.status());
    Ok(())
}

/// Multipart uploads the bucket still has open (started and neither completed nor aborted).
async fn open_multipart_uploads(s3: &S3Config) -> anyhow::Result<usize> {
    let url = format!(
        "{}/{}?uploads",
        s3.endpoint.as_deref().context("no S3 endpoint")?,
        s3.bucket
    );
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(&url)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    Ok(resp.text().await?.matches("<UploadId>").count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_converge_through_presigned_redirects_and_packs() -> anyhow::Result<()> {
    init();
    let (hub, s3) = s3_hub(true).await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = Vec::new();
    for d in &dirs {
        agents.push(SyncClient::start(agent_config(&hub, &token, d.path())).await?);
    }
    for a in &agents {
        wait_ready(a, 0, Duration::from_secs(10)).await?;
    }
    let threshold = AgentConfig::default().pack_blob_max as usize;

    // 60 small files (packs) in 3 folders and 3 above the pack threshold (redirects), the last
    // one larger than a multipart part, so its upload goes through staging.
    let src = tempfile::tempdir()?;
    for folder in 0..3u64 {
        let dir = src.path().join(format!("range-{folder:02}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..20u64 {
            let len = 3000 + (i as usize * 211) % 4000;
            std::fs::write(
                dir.join(format!("qr_{i:04}.png")),
                Noise::bytes(folder * 100 + i, len),
            )?;
        }
    }
    let large_sizes = [
        threshold + 1,
        3 << 20,
        synchub_hub::blobs::s3::PART_SIZE + (1 << 20),
    ];
    let mut large = Vec::new();
    for (i, len) in large_sizes.iter().enumerate() {
        let bytes = Noise::bytes(1000 + i as u64, *len);
        std::fs::write(src.path().join(format!("archive-{i}.bin")), &bytes)?;
        large.push(Sha256Hex::of(&bytes));
    }

    let redirects_before = metric(&hub, REDIRECTS).await?;
    let outcome = agents[0]
        .publish(None, Some("set"), &[src.path().to_path_buf()], None)
        .await?;
    assert_eq!(outcome.files, 63);
    let v = outcome.head.version;
    let started = Instant::now();
    for a in &agents {
        wait_ready(a, v, Duration::from_secs(30)).await?;
    }
    eprintln!(
        "63 files from S3 reached 3 agents in {:?}",
        started.elapsed()
    );
    let expected: BTreeMap<String, Vec<u8>> = read_tree(src.path())
        .into_iter()
        .map(|(p, b)| (format!("set/{p}"), b))
        .collect();
    for d in &dirs {
        assert!(read_tree(&d.path().join("current")) == expected);
    }

    // The two agents that did not publish fetched every large blob through a redirect.
    let redirects = metric(&hub, REDIRECTS).await? - redirects_before;
    assert!(
        redirects >= (2 * large.len()) as f64,
        "{redirects} redirects for {} large blobs and 2 agents",
        large.len()
    );

    // The redirect itself: 307 to the moto endpoint, the bucket and the blob's key, and the
    // presigned URL serves the bytes without the hub's token.
    let client = no_redirects()?;
    for sha in &large {
        let resp = client
            .get(hub.api(&format!("/blobs/{sha}")))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(resp.status(), reqwest::StatusCode::TEMPORARY_REDIRECT);
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .context("no Location")?
            .to_str()?
            .to_owned();
        let want = format!(
            "{}/{}/blobs/{sha}?",
            s3.endpoint.as_deref().unwrap(),
            s3.bucket
        );
        assert!(location.starts_with(&want), "{location}");
        assert!(location.contains("X-Amz-Signature="), "{location}");
        let body = client.get(&location).send().await?;
        assert!(body.status().is_success(), "{}", body.status());
        assert_eq!(Sha256Hex::of(&body.bytes().await?), *sha);
    }

    // A pack straight from the bucket, in request order.
    let small: Vec<(Sha256Hex, Vec<u8>)> = ["range-01/qr_0003.png", "range-02/qr_0019.png"]
        .iter()
        .map(|p| {
            let b = std::fs::read(src.path().join(p)).unwrap();
            (Sha256Hex::of(&b), b)
        })
        .collect();
    let resp = client
        .post(hub.api("/blobs/pack"))
        .bearer_auth(&token)
        .json(&BlobList {
            sha256: small.iter().map(|(s, _)| s.clone()).collect(),
        })
        .send()
        .await?;
    assert!(resp.status().is_success(), "pack: {}", resp.status());
    let body = resp.bytes().await?;
    let mut rest = &body[..];
    for (sha, bytes) in &small {
        let nl = rest
            .iter()
            .position(|b| *b == b'\n')
            .context("pack header")?;
        let (got, size) = pack::parse_header(&rest[..=nl])?;
        assert_eq!((&got, size), (sha, bytes.len() as u64));
        assert_eq!(&rest[nl + 1..nl + 1 + bytes.len()], &bytes[..]);
        rest = &rest[nl + 1 + bytes.len()..];
    }
    assert!(rest.is_empty());

    for a in agents {
        a.shutdown().await;
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_checks_the_hash_behind_a_redirect() -> anyhow::Result<()> {
    init();
    let (hub, s3) = s3_hub(true).await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("small.json"), b"{\"v\":1}")?;
    let v1 = synchub_client::publish(&api, SPACE, None, &[src.path().join("small.json")], None)
        .await?
        .head
        .version;
    let d = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &token, d.path())).await?;
    wait_ready(&agent, v1, Duration::from_secs(10)).await?;

    // v2 adds a large file, published while the agent is stopped; then its object in the
    // bucket is overwritten with other bytes of the same size, so the presigned URL serves
    // them and only the agent's own hash check can notice.
    agent.shutdown().await;
    let large = Noise::bytes(7, 600_000);
    let large_sha = Sha256Hex::of(&large);
    std::fs::write(src.path().join("large.bin"), &large)?;
    let v2 = synchub_client::publish(
        &api,
        SPACE,
        None,
        &[src.path().join("small.json"), src.path().join("large.bin")],
        None,
    )
    .await?
    .head
    .version;
    let key = format!("blobs/{large_sha}");
    let mut bad = large.clone();
    bad[1000] ^= 0xff;
    put_object(&s3, &key, bad).await?;

    let redirects_before = metric(&hub, REDIRECTS).await?;
    let agent = SyncClient::start(agent_config(&hub, &token, d.path())).await?;
    let mut rx = agent.subscribe(None)?;
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| matches!(s, AgentState::Failed { .. })),
    )
    .await
    .context("agent never failed")??
    .clone();
    eprintln!("failed as expected: {failed:?}");
    assert!(metric(&hub, REDIRECTS).await? > redirects_before);
    assert!(!failed.allows_use(), "stay_blocked is the default");
    assert_eq!(
        std::fs::read(d.path().join("current/small.json"))?,
        b"{\"v\":1}"
    );
    assert!(!d.path().join("current/large.bin").exists());
    assert_eq!(agent.state(None)?.version(), v1);

    // The bucket is repaired: the retry applies v2.
    put_object(&s3, &key, large.clone()).await?;
    agent.sync_now(None)?;
    wait_ready(&agent, v2, Duration::from_secs(15)).await?;
    assert!(std::fs::read(d.path().join("current/large.bin"))? == large);
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

/// Sends a `PUT /blobs/{sha}` declaring `body.len()` bytes, writes the first `sent` of them and
/// then, once `before_close` returns, closes the connection.
async fn cut_off_upload<F, Fut>(
    hub: &TestHub,
    token: &str,
    body: &[u8],
    sent: usize,
    before_close: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let sha = Sha256Hex::of(body);
    let mut socket = tokio::net::TcpStream::connect(hub.config.listen).await?;
    let head = format!(
        "PUT /api/v1/blobs/{sha} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        hub.config.listen,
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    for chunk in body[..sent].chunks(256 * 1024) {
        socket.write_all(chunk).await?;
    }
    socket.flush().await?;
    before_close().await?;
    drop(socket);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_cut_off_leaves_nothing_in_the_bucket() -> anyhow::Result<()> {
    init();
    let (hub, s3) = s3_hub(false).await?;
    let token = hub.token("pcs", Role::Agent, None).await?;
    let store = S3BlobStore::new(&s3)?;
    let client = no_redirects()?;

    // 20 MiB declared, 12 MiB sent: past one part, so a multipart upload to staging is open
    // when the connection drops. Then 2 MiB declared, 1 MiB sent: the single-put path.
    let cases = [
        (20usize << 20, 12usize << 20, true),
        (2 << 20, 1 << 20, false),
    ];
    for (seed, (declared, sent, multipart)) in cases.into_iter().enumerate() {
        let body = Noise::bytes(500 + seed as u64, declared);
        let sha = Sha256Hex::of(&body);
        cut_off_upload(&hub, &token, &body, sent, || async {
            if multipart {
                // Close only once the hub has the multipart upload open, so the abort is tested.
                let deadline = Instant::now() + Duration::from_secs(15);
                while open_multipart_uploads(&s3).await? == 0 {
                    ensure!(Instant::now() < deadline, "no multipart upload was started");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(())
        })
        .await?;

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let staging = store.staging_objects().await?;
            let open = open_multipart_uploads(&s3).await?;
            if staging.is_empty() && open == 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "left behind: staging {staging:?}, {open} open multipart upload(s)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resp = client
            .get(hub.api(&format!("/blobs/{sha}")))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);
        assert_eq!(store.size(&sha).await?, None);
        assert!(!store.list().await?.contains(&sha));
    }

    // The hub still takes a whole upload afterwards.
    let body = Noise::bytes(599, 9 << 20);
    let sha = Sha256Hex::of(&body);
    let resp = client
        .put(hub.api(&format!("/blobs/{sha}")))
        .bearer_auth(&token)
        .body(body)
        .send()
        .await?;
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    assert!(store.list().await?.contains(&sha));
    assert!(store.staging_objects().await?.is_empty());
    hub.stop().await;
    Ok(())
}

#[test]
fn the_s3_example_config_parses() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/hub-s3.example.toml");
    let mut config = synchub_hub::config::Config::load(Some(&path))?;
    assert!(config.presign_downloads);
    assert_eq!(config.limits.max_blob_bytes, 5 << 30);
    let BlobStoreConfig::S3(s3) = &mut config.blob_store else {
        panic!("not an S3 blob store: {:?}", config.blob_store);
    };
    assert_eq!(
        s3.endpoint.as_deref(),
        Some("https://s3.us-west-004.backblazeb2.com")
    );
    assert_eq!(s3.region, "us-west-004");
    assert!(s3.path_style && !s3.allow_http);
    // The keys are left to the environment: refused until they are there.
    assert!(config.validate().is_err());
    if let BlobStoreConfig::S3(s3) = &mut config.blob_store {
        s3.access_key_id = "id".into();
        s3.secret_access_key = "secret".into();
    }
    config.validate()?;
    assert!(!config.masked().contains("secret\""));
    Ok(())
}

/// A size field of `/proc/self/status` (`VmHWM`: peak resident set), in bytes.
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Resets `VmHWM` to the current RSS (Linux: `5` to `/proc/self/clear_refs`); false if refused.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Hashes a stream as it arrives; returns the digest and the byte count.
async fn hash_stream<S, E>(mut stream: S) -> anyhow::Result<(Sha256Hex, u64)>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((Sha256Hex::from_digest(hasher.finalize().into()), n))
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// Benchmark (not CI): 1 GiB (or `SYNCHUB_BENCH_BYTES`) up through the hub and back down, on the
/// filesystem and on S3 (moto), with the memory the test process (hub included) grew by.
/// Greppable result lines start with `BENCH one_gigabyte`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by the benchmark script"]
async fn one_gigabyte_through_the_hub() -> anyhow::Result<()> {
    init();
    let len: u64 = std::env::var("SYNCHUB_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    const SEED: u64 = 0x5eed;
    let started = Instant::now();
    let (sha, n) = hash_stream(Box::pin(Noise::stream(SEED, len))).await?;
    assert_eq!(n, len);
    eprintln!(
        "generated and hashed {len} bytes in {:?} ({:.0} MB/s, the ceiling of the figures below)",
        started.elapsed(),
        mb_per_s(len, started.elapsed())
    );
    let client = reqwest::Client::builder().no_proxy().build()?;
    for backend in ["fs", "s3"] {
        let hub = match backend {
            "fs" => TestHub::start().await?,
            _ => s3_hub(false).await?.0,
        };
        let token = hub.token("bench", Role::Agent, None).await?;
        let url = hub.api(&format!("/blobs/{sha}"));
        let reset = reset_peak_rss();
        let hwm_before = proc_status_kib("VmHWM");

        let t = Instant::now();
        let resp = client
            .put(&url)
            .bearer_auth(&token)
            .body(reqwest::Body::wrap_stream(Noise::stream(SEED, len)))
            .send()
            .await?;
        ensure!(
            resp.status() == reqwest::StatusCode::CREATED,
            "PUT: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
        let put = t.elapsed();

        let t = Instant::now();
        let resp = client.get(&url).bearer_auth(&token).send().await?;
        ensure!(resp.status().is_success(), "GET: {}", resp.status());
        let (got, n) = hash_stream(resp.bytes_stream()).await?;
        let get = t.elapsed();
        assert_eq!((got, n), (sha.clone(), len));

        let hwm_after = proc_status_kib("VmHWM");
        // After a reset the peak starts at the current RSS; without one, growth beyond the
        // earlier peak is a lower bound.
        let growth = hwm_after.saturating_sub(hwm_before);
        println!(
            "BENCH one_gigabyte backend={backend} bytes={len} put_mb_s={:.0} get_mb_s={:.0} \
             put_s={:.2} get_s={:.2} peak_rss_growth_mib={:.1} peak_rss_mib={:.1} \
             peak_reset={reset}",
            mb_per_s(len, put),
            mb_per_s(len, get),
            put.as_secs_f64(),
            get.as_secs_f64(),
            growth as f64 / (1 << 20) as f64,
            hwm_after as f64 / (1 << 20) as f64,
        );
        // Streaming both ways: memory must not grow with the blob.
        assert!(
            growth < 256 << 20,
            "{backend}: the process grew by {} MiB moving {len} bytes",
            growth >> 20
        );
        hub.stop().await;
    }
    Ok(())
}
