//! Packs under a herd: a pack of small and large blobs comes back whole and in order, and the
//! small blobs, once read and checked (or uploaded through the hub), are served from memory (a
//! herd asking for the same changed files does not read them from disk or the bucket again).

use anyhow::ensure;
use synchub_hub::config::BlobStoreConfig;
use synchub_protocol::{BlobList, Sha256Hex, pack};
use synchub_tests::fixtures::{http, put_blob};
use synchub_tests::hub::{TestHub, fs_blob_path};
use synchub_tests::proxy::{Fault, FaultProxy};

/// `POST /blobs/pack`, parsed: each blob's hash and bytes, in the order sent.
async fn get_pack(
    hub: &TestHub,
    hashes: &[Sha256Hex],
) -> anyhow::Result<Vec<(Sha256Hex, Vec<u8>)>> {
    let resp = http()
        .post(hub.api("/blobs/pack"))
        .bearer_auth(&hub.admin_token)
        .json(&BlobList {
            sha256: hashes.to_vec(),
        })
        .send()
        .await?;
    ensure!(resp.status().is_success(), "pack: {}", resp.status());
    let body = resp.bytes().await?;
    let mut rest = &body[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| anyhow::anyhow!("pack header without a line break"))?;
        let (hash, size) = pack::parse_header(&rest[..end])?;
        let size = usize::try_from(size)?;
        ensure!(rest.len() > end + size, "pack cut short");
        out.push((hash, rest[end + 1..end + 1 + size].to_vec()));
        rest = &rest[end + 1 + size..];
    }
    Ok(out)
}

/// A hub whose blobs are in a moto bucket reached through a fault proxy.
async fn hub_on_s3_behind_a_proxy() -> anyhow::Result<(TestHub, FaultProxy)> {
    let mut s3 = synchub_tests::s3::test_bucket().await?;
    let endpoint = s3.endpoint.clone().expect("moto has an endpoint");
    let proxy = FaultProxy::start(endpoint.trim_start_matches("http://").parse()?).await?;
    s3.endpoint = Some(proxy.url());
    let hub = TestHub::start_with(move |c| c.blob_store = BlobStoreConfig::S3(s3)).await?;
    Ok((hub, proxy))
}

/// Commits one file as the admin (its blob uploaded through the hub first); its hash.
async fn commit_one(hub: &TestHub, path: &str, body: &[u8]) -> anyhow::Result<Sha256Hex> {
    let base = synchub_tests::fixtures::head(hub, &hub.admin_token)
        .await?
        .version;
    let (status, answer) =
        synchub_tests::fixtures::commit(hub, &hub.admin_token, base, &[(path, body)], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {answer}");
    Ok(Sha256Hex::of(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_comes_whole_and_small_blobs_are_served_from_memory() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let bodies: Vec<Vec<u8>> = vec![
        b"{\"a\":1}".to_vec(),
        (0..200_000u32).map(|i| (i % 253) as u8).collect(), // over the 64 KiB of hot blobs
        b"{\"b\":2}".to_vec(),
    ];
    let mut hashes = Vec::new();
    for b in &bodies {
        hashes.push(put_blob(&hub, &hub.admin_token, b).await?);
    }
    let first = get_pack(&hub, &hashes).await?;
    assert_eq!(first.len(), 3);
    for ((hash, bytes), (asked, body)) in first.iter().zip(hashes.iter().zip(&bodies)) {
        assert_eq!(hash, asked);
        assert!(bytes == body, "blob {hash} differs");
    }

    // The small blobs were read and checked once and are now served from memory: bytes
    // changed on disk behind the hub's back (same size) are not read again.
    let path = fs_blob_path(hub.data_dir(), hashes[0].as_str());
    let mut perms = std::fs::metadata(&path)?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms)?;
    std::fs::write(&path, b"{\"a\":9}")?;
    let again = get_pack(&hub, &[hashes[0].clone(), hashes[2].clone()]).await?;
    assert_eq!(again[0].1, bodies[0]);
    assert_eq!(again[1].1, bodies[2]);
    hub.stop().await;
    Ok(())
}

/// Bytes uploaded under a hash they do not have are refused, and the hub keeps nothing of them:
/// the herd after the next bump still gets the blob's real bytes, not the upload's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_uploaded_under_another_hash_are_not_served() -> anyhow::Result<()> {
    let mut hub = TestHub::start().await?;
    let (real, fake) = (&b"{\"elevi\": 28}"[..], &b"{\"elevi\": 99}"[..]);
    let hash = commit_one(&hub, "elevi.json", real).await?;
    // A restarted hub has nothing in memory: only the upload below could put something there.
    hub.stop_keep().await;
    hub.restart().await?;
    let resp = http()
        .put(hub.api(&format!("/blobs/{hash}")))
        .bearer_auth(&hub.admin_token)
        .body(fake)
        .send()
        .await?;
    assert!(
        resp.status().is_client_error(),
        "an upload under another hash answered {}",
        resp.status()
    );
    let pack = get_pack(&hub, std::slice::from_ref(&hash)).await?;
    assert!(
        pack.len() == 1 && pack[0].1 == real,
        "the pack served other bytes"
    );
    hub.stop().await;
    Ok(())
}

/// A pack answer says how long it is (`Content-Length`), as a download of known size should: the
/// download slot it holds used to hide the size, and every pack went out chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_says_its_length() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let mut hashes = Vec::new();
    for body in [&b"{\"a\":1}"[..], b"{\"b\":2}"] {
        hashes.push(put_blob(&hub, &hub.admin_token, body).await?);
    }
    let resp = http()
        .post(hub.api("/blobs/pack"))
        .bearer_auth(&hub.admin_token)
        .header("accept-encoding", "identity")
        .json(&BlobList { sha256: hashes })
        .send()
        .await?;
    ensure!(resp.status().is_success(), "pack: {}", resp.status());
    let declared = resp
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let chunked = resp.headers().contains_key("transfer-encoding");
    let body = resp.bytes().await?;
    assert_eq!(
        declared,
        Some(body.len().to_string()),
        "a pack of {} bytes without its length (chunked: {chunked})",
        body.len()
    );
    hub.stop().await;
    Ok(())
}

/// A herd after a bump asks for the same new blob many times at once. With the blobs in an
/// object store, each of those asks used to be its own read from the store (a thousand agents:
/// a thousand GETs of one blob, and moto or a real bucket's rate limit falling over); now the
/// first ask reads it and the others wait for those bytes. Counted as the bytes the bucket sent
/// through a proxy: about one blob's worth, not one per ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_asking_for_a_new_blob_reads_it_from_the_bucket_once() -> anyhow::Result<()> {
    const ASKS: usize = 40;
    // 60 KB: under the 64 KiB of a hot blob, large beside the requests' own bytes.
    let body: Vec<u8> = (0..60_000u32)
        .map(|i| (i.wrapping_mul(7919) % 251) as u8)
        .collect();
    let (mut hub, proxy) = hub_on_s3_behind_a_proxy().await?;
    let hash = commit_one(&hub, "qr/new.png", &body).await?;
    // The hub that took the upload keeps the blob in memory (see the test below); a restarted
    // hub, like a replica that did not take it, must read it from the bucket.
    hub.stop_keep().await;
    hub.restart().await?;

    // Every ask reaches the hub while the bucket answers nothing, then the bucket answers: the
    // asks overlap as a herd's do.
    proxy.set(Fault::Freeze);
    let before = proxy.forwarded();
    let asks: Vec<_> = (0..ASKS)
        .map(|_| {
            let (hub, hash) = (&hub, hash.clone());
            async move { get_pack(hub, &[hash]).await }
        })
        .collect();
    let (packs, ()) = tokio::join!(futures::future::join_all(asks), async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        proxy.set(Fault::Pass);
    });
    for pack in packs {
        let pack = pack?;
        ensure!(
            pack.len() == 1 && pack[0].0 == hash && pack[0].1 == body,
            "a pack came back wrong"
        );
    }
    let from_bucket = proxy.forwarded() - before;
    assert!(
        from_bucket < 3 * body.len() as u64,
        "{ASKS} asks for one {}-byte blob read {from_bucket} bytes from the bucket",
        body.len()
    );
    hub.stop().await;
    Ok(())
}

/// A publish uploads the new files through the hub, which announces the version right after,
/// and the fleet then asks for exactly those blobs. The hub keeps a small blob it just stored,
/// so the herd does not wait for the bucket: here the bucket is cut off after the commit and
/// the pack still comes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_blob_uploaded_through_the_hub_is_served_without_the_bucket() -> anyhow::Result<()>
{
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 241) as u8).collect();
    let (hub, proxy) = hub_on_s3_behind_a_proxy().await?;
    let hash = commit_one(&hub, "qr/just-published.png", &body).await?;

    proxy.set(Fault::Cut);
    let pack = get_pack(&hub, std::slice::from_ref(&hash)).await?;
    ensure!(
        pack.len() == 1 && pack[0].0 == hash && pack[0].1 == body,
        "the pack of the blob just published came back wrong"
    );
    hub.stop().await;
    Ok(())
}
