//! Admission instead of a stampede: a hub bounded to one download at a time answers the others
//! `503 busy` with `Retry-After` at once, and agents that are put off keep waiting (never
//! reported as failed) and all end with the right tree once the slot frees. A client that stops
//! reading its download is cut off after the send deadline, so it cannot keep a slot for good.

use anyhow::{Context, ensure};
use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::{AgentState, DEFAULT_SPACE, Role, Sha256Hex};
use synchub_tests::fixtures::{agent_config, commit, http, metric, read_tree, wait_ready};
use synchub_tests::hub::TestHub;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_put_off_by_a_busy_hub_wait_and_all_converge() -> anyhow::Result<()> {
    // No queue: a download over the bound is refused at once.
    let hub = TestHub::start_with(|c| {
        c.limits.max_concurrent_downloads = 1;
        c.limits.download_queue_ms = 0;
    })
    .await?;
    // A blob larger than the loopback socket buffers: a reader that stops reading holds the
    // one download slot for as long as it likes.
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let small: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            (
                format!("arhiva/{i:02}.json"),
                format!("{{\"n\":{i}}}").into_bytes(),
            )
        })
        .collect();
    let mut files: Vec<(&str, &[u8])> = small
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    files.push(("big.bin", &big));
    let (status, body) = commit(&hub, &hub.admin_token, 1, &files, &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");

    let held = http()
        .get(hub.api(&format!("/blobs/{}", Sha256Hex::of(&big))))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    ensure!(
        held.status().is_success(),
        "holding download: {}",
        held.status()
    );
    // The slot is taken: the next download is refused at once, with Retry-After.
    let refused = http()
        .get(hub.api(&format!("/spaces/{DEFAULT_SPACE}/versions/2/manifest")))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert!(refused.text().await?.contains("\"busy\""));

    let token = hub.token("pcs", Role::Agent, None).await?;
    let dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = Vec::new();
    for d in &dirs {
        agents.push(SyncClient::start(agent_config(&hub, &token, d.path())).await?);
    }
    // For a while every agent is put off; none of them calls that a failure.
    let refused_before = metric(&hub, "synchub_downloads_refused_total").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused_since = metric(&hub, "synchub_downloads_refused_total").await? - refused_before;
    assert!(
        refused_since >= agents.len() as f64,
        "only {refused_since} downloads were refused while the slot was held"
    );
    for a in &agents {
        let state = a.state(None)?;
        assert!(
            !matches!(state, AgentState::Failed { .. }),
            "an agent put off by a busy hub reports {state:?}"
        );
    }

    drop(held);
    for a in &agents {
        wait_ready(a, 2, Duration::from_secs(60)).await?;
    }
    for d in &dirs {
        let tree = read_tree(&d.path().join("current"));
        assert_eq!(tree.len(), 31);
        assert!(tree["big.bin"] == big, "big.bin differs");
    }
    for a in agents {
        a.shutdown().await;
    }
    hub.stop().await;
    Ok(())
}

/// A hub with one download slot and one place in its queue (see [`one_slot_taken`]).
struct SlotTaken {
    hub: TestHub,
    /// The response of the reader holding the slot, its body not read yet.
    held: reqwest::Response,
    /// The blob it reads, and its size.
    blob_url: String,
    blob_size: usize,
    /// A manifest, for the next download to ask for.
    manifest_url: String,
}

/// A hub with one download slot and one place in its queue (a wait of up to `queue_ms`), the
/// slot held by a reader of a 32 MiB blob that has not read its body.
async fn one_slot_taken(queue_ms: u64) -> anyhow::Result<SlotTaken> {
    let hub = TestHub::start_with(|c| {
        c.limits.max_concurrent_downloads = 1;
        c.limits.download_queue_ms = queue_ms;
        c.limits.max_queued_downloads = 1;
    })
    .await?;
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let (status, body) = commit(&hub, &hub.admin_token, 1, &[("big.bin", &big)], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let blob_url = hub.api(&format!("/blobs/{}", Sha256Hex::of(&big)));
    let manifest_url = hub.api(&format!("/spaces/{DEFAULT_SPACE}/versions/2/manifest"));
    let held = http()
        .get(&blob_url)
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    ensure!(held.status().is_success(), "holding: {}", held.status());
    Ok(SlotTaken {
        hub,
        held,
        blob_url,
        blob_size: big.len(),
        manifest_url,
    })
}

/// With the queue, a download that finds every slot taken waits for one instead of being
/// refused, as long as a slot frees within `download_queue_ms`; a wait longer than that is
/// refused with `Retry-After`, and so is one that finds the queue full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_over_the_bound_waits_in_the_queue_for_a_slot() -> anyhow::Result<()> {
    // The one slot is held by a reader that has not read its body yet.
    let SlotTaken {
        hub,
        held,
        blob_url,
        blob_size,
        manifest_url,
    } = one_slot_taken(3_000).await?;
    let waiting = tokio::spawn({
        let (url, token) = (manifest_url.clone(), hub.admin_token.clone());
        async move { http().get(url).bearer_auth(token).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The queue (one place) is full now: the next one is refused at once.
    let started = std::time::Instant::now();
    let refused = http()
        .get(&manifest_url)
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    assert_eq!(refused.status(), 503, "a full queue refuses");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    // The holder finishes reading within the queued one's wait: it is served, not refused.
    let read = held.bytes().await?;
    assert_eq!(read.len(), blob_size);
    let served = waiting.await??;
    assert_eq!(
        served.status(),
        200,
        "a download queued while the slot was taken is served once it frees"
    );

    // A wait longer than download_queue_ms ends in 503 busy with Retry-After.
    let held = http()
        .get(&blob_url)
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    let started = std::time::Instant::now();
    let timed_out = http()
        .get(&manifest_url)
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    assert_eq!(timed_out.status(), 503);
    assert!(timed_out.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() >= Duration::from_millis(2_900),
        "refused only after the queue wait, not at once: {:?}",
        started.elapsed()
    );
    drop(held);
    hub.stop().await;
    Ok(())
}

/// A client that asks for a large blob and then stops reading (without closing) gives its
/// download slot back after `limits.send_idle_timeout_ms`: it is cut off, and the next
/// download is served instead of refused until TCP gives up on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_slot() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::start_with(|c| {
        c.limits.max_concurrent_downloads = 1;
        c.limits.send_idle_timeout_ms = 1_000;
        // No queue: a download over the bound is refused at once while the slot is held.
        c.limits.download_queue_ms = 0;
    })
    .await?;
    // Larger than the loopback socket buffers together, so the hub's writes block.
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let (status, body) = commit(&hub, &hub.admin_token, 1, &[("big.bin", &big)], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");

    let addr = hub.url.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await?;
    stalled
        .write_all(
            format!(
                "GET /api/v1/blobs/{} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
                Sha256Hex::of(&big),
                hub.admin_token
            )
            .as_bytes(),
        )
        .await?;
    let manifest = hub.api(&format!("/spaces/{DEFAULT_SPACE}/versions/2/manifest"));
    let get = || {
        http()
            .get(&manifest)
            .bearer_auth(&hub.admin_token)
            .timeout(Duration::from_secs(5))
            .send()
    };
    // The stalled client holds the one slot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get().await?.status(),
        503,
        "the stalled download holds the slot"
    );

    let asked = std::time::Instant::now();
    loop {
        let status = get().await?.status();
        if status.is_success() {
            break;
        }
        assert_eq!(status, 503);
        ensure!(
            asked.elapsed() < Duration::from_secs(10),
            "still refused {:?} after the stalled client stopped reading",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stalled connection was closed by the hub before the whole blob went out.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut got))
        .await
        .context("the stalled connection is still open")?;
    assert!(
        read.is_err() || got.len() < big.len(),
        "the whole blob arrived ({} bytes): nothing was cut off",
        got.len()
    );
    hub.stop().await;
    Ok(())
}

/// A download whose client gives up while it waits in the queue gives its place back: the
/// queue does not fill up with requests nobody waits for any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_the_queue_gives_its_place_back() -> anyhow::Result<()> {
    let SlotTaken {
        hub,
        held,
        blob_size,
        manifest_url,
        ..
    } = one_slot_taken(5_000).await?;
    // Three clients in turn take the one place in the queue and give up after 300 ms.
    for i in 0..3 {
        let gave_up = http()
            .get(&manifest_url)
            .bearer_auth(&hub.admin_token)
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(
            gave_up.as_ref().is_err_and(|e| e.is_timeout()),
            "client {i} waited in the queue: {gave_up:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The place is free again: the next download waits for the slot and is served.
    let waiting = tokio::spawn({
        let (url, token) = (manifest_url.clone(), hub.admin_token.clone());
        async move { http().get(url).bearer_auth(token).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = held.bytes().await?;
    assert_eq!(read.len(), blob_size);
    assert_eq!(
        waiting.await??.status(),
        200,
        "a place left by clients that gave up is free for the next download"
    );
    hub.stop().await;
    Ok(())
}
