//! An interrupted download of a large blob resumes with a Range request instead of starting
//! over, and a partial file with wrong bytes is caught by the hash check and fetched again.

use std::time::Duration;
use synchub_client::{AgentConfig, SyncClient};
use synchub_protocol::{CommitRequest, ManifestEntry, Role, Sha256Hex};
use synchub_tests::hub::TestHub;

async fn publish(
    hub: &TestHub,
    token: &str,
    base: u64,
    path: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let hash = Sha256Hex::of(body);
    http.put(hub.api(&format!("/blobs/{hash}")))
        .bearer_auth(token)
        .body(body.to_vec())
        .send()
        .await?
        .error_for_status()?;
    let req = CommitRequest {
        base_version: base,
        puts: vec![ManifestEntry {
            path: path.into(),
            size: body.len() as u64,
            sha256: hash,
        }],
        deletes: vec![],
        message: None,
    };
    http.post(hub.api("/spaces/global_version/commits"))
        .bearer_auth(token)
        .json(&req)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

async fn bytes_sent(hub: &TestHub) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{}/metrics", hub.url))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("synchub_blob_bytes_sent_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}

fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_download_resumes_with_a_range_request() -> anyhow::Result<()> {
    synchub_client::hub_api::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let big = blob(1, 3_000_000);
    publish(&hub, &token, 1, "archive.bin", &big).await?;
    let other = blob(2, 2_000_000);
    publish(&hub, &token, 2, "second.bin", &other).await?;

    // A previous attempt got 2 MB of the first blob, and wrong bytes for the second.
    let dir = tempfile::tempdir()?;
    let parts = dir.path().join(".synchub/cache/tmp");
    std::fs::create_dir_all(&parts)?;
    std::fs::write(
        parts.join(format!("{}.part", Sha256Hex::of(&big))),
        &big[..2_000_000],
    )?;
    std::fs::write(
        parts.join(format!("{}.part", Sha256Hex::of(&other))),
        vec![0u8; 500_000],
    )?;

    let before = bytes_sent(&hub).await?;
    let agent = SyncClient::start(AgentConfig {
        hubs: vec![hub.url.clone()],
        token: token.clone(),
        spaces: vec!["global_version".into()],
        dir: dir.path().to_path_buf(),
        status_listen: None,
        max_backoff_ms: 500,
        ..AgentConfig::default()
    })
    .await?;
    agent
        .wait_ready(None, 3, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {:?}", agent.status()))?;
    assert_eq!(std::fs::read(dir.path().join("current/archive.bin"))?, big);
    assert_eq!(std::fs::read(dir.path().join("current/second.bin"))?, other);

    // The first blob's last 1 MB came by Range; the second's bad 500 KB were caught by the
    // hash check, then it came whole (the resumed attempt sent its remaining 1.5 MB first).
    let sent = bytes_sent(&hub).await? - before;
    let resumed_first = 1_000_000;
    let second = 1_500_000 + 2_000_000;
    assert_eq!(sent, resumed_first + second, "bytes the hub sent");
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
