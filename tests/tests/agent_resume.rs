//! An interrupted download of a large blob resumes with a Range request instead of starting
//! over, and a partial file with wrong bytes is caught by the hash check and fetched again.

use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::{Role, Sha256Hex};
use synchub_tests::fixtures::{agent_config, commit, metric};
use synchub_tests::hub::TestHub;

fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_download_resumes_with_a_range_request() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let big = blob(1, 3_000_000);
    commit(&hub, &token, 1, &[("archive.bin", &big)], &[]).await?;
    let sent_since = |before: f64| {
        let hub = &hub;
        async move { anyhow::Ok((metric(hub, "synchub_blob_bytes_sent_total").await? - before) as u64) }
    };

    // A previous attempt got the first 2 MB of the blob.
    let dir = tempfile::tempdir()?;
    let parts = dir.path().join(".synchub/cache/tmp");
    std::fs::create_dir_all(&parts)?;
    std::fs::write(
        parts.join(format!("{}.part", Sha256Hex::of(&big))),
        &big[..2_000_000],
    )?;
    let before = metric(&hub, "synchub_blob_bytes_sent_total").await?;
    let mut config = agent_config(&hub, &token, dir.path());
    config.max_backoff_ms = 500;
    let agent = SyncClient::start(config).await?;
    agent
        .wait_ready(None, 2, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {:?}", agent.status()))?;
    assert_eq!(std::fs::read(dir.path().join("current/archive.bin"))?, big);
    // Only the last 1 MB came, by Range.
    assert_eq!(sent_since(before).await?, 1_000_000, "bytes the hub sent");

    // A partial of the next blob holds wrong bytes: the resumed download fails its hash check,
    // the partial is dropped, and the retry fetches the whole blob.
    let other = blob(2, 2_000_000);
    std::fs::write(
        parts.join(format!("{}.part", Sha256Hex::of(&other))),
        vec![0u8; 500_000],
    )?;
    let before = metric(&hub, "synchub_blob_bytes_sent_total").await?;
    commit(&hub, &token, 2, &[("second.bin", &other)], &[]).await?;
    agent
        .wait_ready(None, 3, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {:?}", agent.status()))?;
    assert_eq!(std::fs::read(dir.path().join("current/second.bin"))?, other);
    assert_eq!(std::fs::read(dir.path().join("current/archive.bin"))?, big);
    assert_eq!(
        sent_since(before).await?,
        1_500_000 + 2_000_000,
        "bytes the hub sent: the resumed rest, then the whole blob"
    );
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
