//! Compression on the download path: manifests, deltas and packs come compressed (zstd or gzip)
//! when `Accept-Encoding` allows it and as they are otherwise, decoding to the same bytes; a
//! real agent fetching JSON through a proxy moves far fewer bytes than the files hold, and asks
//! for packs of images as they are.

use anyhow::ensure;
use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::{BlobList, DEFAULT_SPACE, Role, Sha256Hex};
use synchub_tests::fixtures::{agent_config, commit, http, read_tree, wait_ready};
use synchub_tests::hub::TestHub;
use synchub_tests::proxy::FaultProxy;

/// A JSON archive of the kind the app writes: `n` records, compressible like the real ones.
fn json_archive(seed: usize, n: usize) -> Vec<u8> {
    let records: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":{},"elev":"Elev {seed}-{i}","clasa":"{}","note":[{},{},{}],"absente":{}}}"#,
                seed * 1000 + i,
                ["IX A", "X B", "XI C", "XII D"][i % 4],
                5 + i % 5,
                6 + i % 4,
                7 + i % 3,
                i % 7
            )
        })
        .collect();
    format!("[{}]", records.join(",")).into_bytes()
}

/// A client that neither offers nor decodes compression, to see the bytes as sent.
fn raw_client() -> anyhow::Result<reqwest::Client> {
    synchub_hub::blobs::s3::install_crypto_provider();
    Ok(reqwest::Client::builder()
        .no_proxy()
        .no_zstd()
        .no_gzip()
        .build()?)
}

struct Fetched {
    encoding: Option<String>,
    body: Vec<u8>,
}

async fn fetch(request: reqwest::RequestBuilder) -> anyhow::Result<Fetched> {
    let resp = request.send().await?;
    ensure!(resp.status().is_success(), "{}", resp.status());
    let encoding = resp
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok(Fetched {
        encoding,
        body: resp.bytes().await?.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_deltas_and_packs_are_compressed_when_asked() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    // Version 2: one small file, a manifest too short to be worth compressing.
    let (status, body) = commit(&hub, &hub.admin_token, 1, &[("a.json", b"{}")], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let archives: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| (format!("arhiva/{i:03}.json"), json_archive(i, 40)))
        .collect();
    let files: Vec<(&str, &[u8])> = archives
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (status, body) = commit(&hub, &hub.admin_token, 2, &files, &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let changed: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| (format!("arhiva/{i:03}.json"), json_archive(i + 500, 40)))
        .collect();
    let files: Vec<(&str, &[u8])> = changed
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (status, body) = commit(&hub, &hub.admin_token, 3, &files, &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");

    let raw = raw_client()?;
    let decoding = http();
    let token = &hub.admin_token;
    for path in [
        format!("/spaces/{DEFAULT_SPACE}/versions/3/manifest"),
        format!("/spaces/{DEFAULT_SPACE}/versions/4/manifest?from=3"),
    ] {
        let url = hub.api(&path);
        let plain = fetch(raw.get(&url).bearer_auth(token)).await?;
        assert_eq!(
            plain.encoding, None,
            "{path}: asked for nothing, got it plain"
        );
        for encoding in ["zstd", "gzip"] {
            let packed = fetch(
                raw.get(&url)
                    .bearer_auth(token)
                    .header("accept-encoding", encoding),
            )
            .await?;
            assert_eq!(packed.encoding.as_deref(), Some(encoding), "{path}");
            // Mostly hex digests: about half of their bytes is all compression can take.
            assert!(
                packed.body.len() * 5 < plain.body.len() * 4,
                "{path}: {encoding} {} bytes against {} plain",
                packed.body.len(),
                plain.body.len()
            );
        }
        // The decoding client offers compression itself and gets the very same bytes.
        let decoded = fetch(decoding.get(&url).bearer_auth(token)).await?;
        assert!(decoded.body == plain.body, "{path}: decoded bytes differ");
    }
    let delta = fetch(
        raw.get(hub.api(&format!(
            "/spaces/{DEFAULT_SPACE}/versions/4/manifest?from=3"
        )))
        .bearer_auth(token),
    )
    .await?;
    ensure!(
        String::from_utf8_lossy(&delta.body).contains("arhiva/000.json"),
        "the delta names the changed files"
    );

    // A pack of JSON archives: compressed when asked, the same stream once decoded.
    let list = BlobList {
        sha256: archives.iter().map(|(_, b)| Sha256Hex::of(b)).collect(),
    };
    let url = hub.api("/blobs/pack");
    let plain = fetch(raw.post(&url).bearer_auth(token).json(&list)).await?;
    assert_eq!(plain.encoding, None);
    let total: usize = archives.iter().map(|(_, b)| b.len()).sum();
    assert!(plain.body.len() > total, "the plain pack holds every byte");
    let packed = fetch(
        raw.post(&url)
            .bearer_auth(token)
            .header("accept-encoding", "zstd")
            .json(&list),
    )
    .await?;
    assert_eq!(packed.encoding.as_deref(), Some("zstd"));
    assert!(
        packed.body.len() * 3 < plain.body.len(),
        "pack: zstd {} bytes against {} plain",
        packed.body.len(),
        plain.body.len()
    );
    let decoded = fetch(decoding.post(&url).bearer_auth(token).json(&list)).await?;
    assert!(decoded.body == plain.body, "the decoded pack differs");

    // A small answer goes as it is even when compression is offered.
    let small = fetch(
        raw.get(hub.api(&format!("/spaces/{DEFAULT_SPACE}/versions/2/manifest")))
            .bearer_auth(token)
            .header("accept-encoding", "zstd"),
    )
    .await?;
    assert_eq!(small.encoding, None, "{} bytes", small.body.len());
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_json_compressed_and_images_as_they_are() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let proxy = FaultProxy::start(hub.config.listen).await?;
    let archives: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("arhiva/{i:03}.json"), json_archive(i, 60)))
        .collect();
    let json_bytes: u64 = archives.iter().map(|(_, b)| b.len() as u64).sum();
    let files: Vec<(&str, &[u8])> = archives
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (status, body) = commit(&hub, &hub.admin_token, 1, &files, &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");

    let token = hub.token("pc", Role::Agent, None).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &token, dir.path());
    config.hubs = vec![proxy.url()];
    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, 2, Duration::from_secs(20)).await?;
    let tree = read_tree(&dir.path().join("current"));
    for (path, bytes) in &archives {
        assert!(tree.get(path) == Some(bytes), "{path} differs");
    }
    let moved = proxy.forwarded();
    assert!(
        moved * 3 < json_bytes,
        "{moved} bytes crossed the network for {json_bytes} bytes of JSON"
    );

    // Files named as images are asked for as they are, however well their bytes would
    // compress: the agent goes by the extension.
    let images: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("qr/{i:03}.png"), json_archive(i + 100, 60)))
        .collect();
    let image_bytes: u64 = images.iter().map(|(_, b)| b.len() as u64).sum();
    let files: Vec<(&str, &[u8])> = images
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let before = proxy.forwarded();
    let (status, body) = commit(&hub, &hub.admin_token, 2, &files, &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    wait_ready(&agent, 3, Duration::from_secs(20)).await?;
    let moved = proxy.forwarded() - before;
    assert!(
        moved >= image_bytes,
        "{moved} bytes crossed the network for {image_bytes} bytes of images: compressed"
    );
    let tree = read_tree(&dir.path().join("current"));
    for (path, bytes) in images.iter().chain(&archives) {
        assert!(tree.get(path) == Some(bytes), "{path} differs");
    }
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
