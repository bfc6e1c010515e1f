//! The agent on its socket alone: a bump reaches an agent holding the version before through
//! the manifest delta in the `sync_required` frame (no manifest request over HTTP, a forced
//! sync too), the new small files through the blobs the frame carries (no pack or blob
//! request), and its sync report goes back as a `report` frame (no `POST /sync-log`). The
//! hub's `/metrics` counters prove all three. The metrics recorder is process-wide, so this file
//! holds one test: another hub in the same process would add to the counters.

use anyhow::ensure;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use synchub_client::SyncClient;
use synchub_protocol::{CommitResponse, DEFAULT_SPACE, ForceSyncRequest, Role};
use synchub_tests::fixtures::{
    agent_config, commit, head, http, metric_where, read_tree, wait_ready,
};
use synchub_tests::hub::TestHub;

/// Waits until `client_id`'s successful report of `sync_type` at `version` is in `sync_log`.
async fn reported(
    hub: &TestHub,
    client_id: &str,
    sync_type: &str,
    version: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = hub
            .sync_log(&format!("client_id={client_id}&limit=100"))
            .await?;
        if log.iter().any(|e| {
            e.sync_type == sync_type && e.status == "success" && e.version == Some(version as i64)
        }) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no {sync_type} report of version {version}: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The counters this test watches.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    manifest_requests: f64,
    /// Pack answers.
    packs: f64,
    /// Blob bytes sent in packs and single-blob answers.
    blob_bytes: f64,
    reports_on_socket: f64,
    reports_over_http: f64,
}

async fn counts(hub: &TestHub) -> anyhow::Result<Counts> {
    Ok(Counts {
        manifest_requests: metric_where(hub, "synchub_manifest_requests_total", None).await?,
        packs: metric_where(
            hub,
            "synchub_download_encodings_total",
            Some(r#"route="pack""#),
        )
        .await?,
        blob_bytes: metric_where(hub, "synchub_blob_bytes_sent_total", None).await?,
        reports_on_socket: metric_where(hub, "synchub_reports_total", Some(r#"via="socket""#))
            .await?,
        reports_over_http: metric_where(hub, "synchub_reports_total", Some(r#"via="http""#))
            .await?,
    })
}

fn version_of(body: &serde_json::Value) -> anyhow::Result<u64> {
    body["head"]["version"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no head version in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bump_arrives_in_its_frame_and_the_report_returns_on_the_socket() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        head(&hub, &token).await?.version,
        &[
            ("arhiva/001.json", b"{\"n\":1}"),
            ("arhiva/002.json", b"{\"n\":2}"),
            ("qr/04313-11100-F/qr_0000.png", b"png one"),
        ],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let v1 = version_of(&body)?;

    let dir = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &token, dir.path())).await?;
    wait_ready(&agent, v1, Duration::from_secs(20)).await?;
    reported(&hub, agent.client_id(), "download", v1).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.status().hub.connected {
        ensure!(Instant::now() < deadline, "no socket: {:?}", agent.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = counts(&hub).await?;
    ensure!(
        before.manifest_requests >= 1.0 && before.packs >= 1.0 && before.blob_bytes >= 1.0,
        "the first sync asked for its manifest and blobs over HTTP, so the counters exist: \
         {before:?}"
    );

    // A commit on the version the agent holds, of two small files: the frame's delta and the
    // blobs it carries are all the agent needs.
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        v1,
        &[
            ("arhiva/001.json", b"{\"n\":\"one\"}"),
            ("arhiva/003.json", b"{\"n\":3}"),
        ],
        &["arhiva/002.json"],
    )
    .await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let v2 = version_of(&body)?;
    wait_ready(&agent, v2, Duration::from_secs(20)).await?;
    let expected: BTreeMap<String, Vec<u8>> = [
        ("arhiva/001.json", &b"{\"n\":\"one\"}"[..]),
        ("arhiva/003.json", b"{\"n\":3}"),
        ("qr/04313-11100-F/qr_0000.png", b"png one"),
    ]
    .into_iter()
    .map(|(p, b)| (p.to_owned(), b.to_vec()))
    .collect();
    assert_eq!(read_tree(&dir.path().join("current")), expected);
    reported(&hub, agent.client_id(), "download", v2).await?;
    let after = counts(&hub).await?;
    assert_eq!(
        after.manifest_requests, before.manifest_requests,
        "the agent asked for a manifest although the frame carried its delta"
    );
    assert_eq!(
        (after.packs, after.blob_bytes),
        (before.packs, before.blob_bytes),
        "the agent fetched blobs although the frame carried them: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.reports_on_socket,
        before.reports_on_socket + 1.0,
        "the report came on the socket: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.reports_over_http, before.reports_over_http,
        "no report over HTTP: {before:?} -> {after:?}"
    );

    // A forced sync: a delta without changes, and the agent still checks its files.
    let resp = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/force-sync")))
        .bearer_auth(&hub.admin_token)
        .json(&ForceSyncRequest {
            reason: Some("check".into()),
        })
        .send()
        .await?;
    ensure!(resp.status().is_success(), "force-sync: {}", resp.status());
    let forced = resp.json::<CommitResponse>().await?.head;
    assert!(forced.forced);
    wait_ready(&agent, forced.version, Duration::from_secs(20)).await?;
    assert_eq!(read_tree(&dir.path().join("current")), expected);
    reported(&hub, agent.client_id(), "force_sync", forced.version).await?;
    let last = counts(&hub).await?;
    assert_eq!(
        last.manifest_requests, before.manifest_requests,
        "the forced head's manifest came from its frame too"
    );
    assert_eq!(
        (last.packs, last.blob_bytes),
        (before.packs, before.blob_bytes),
        "the forced sync found every blob in its cache"
    );
    assert_eq!(last.reports_on_socket, before.reports_on_socket + 2.0);
    assert_eq!(last.reports_over_http, before.reports_over_http);

    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
