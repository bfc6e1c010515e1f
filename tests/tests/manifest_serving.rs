//! Manifests under a herd: a burst of requests for a new version's manifest reads it from the
//! blob store once and serves the same canonical bytes from memory; `?from=V` answers with
//! only the changes since version V; a bump's `sync_required` frame carries the delta from the
//! version before; an agent that holds a version syncs the next through a delta, and one fed a
//! wrong delta by a lying hub still ends with the right tree.

use anyhow::ensure;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::{
    DEFAULT_SPACE, DELTA_CONTENT_TYPE, FrameDelta, HubFrame, MAX_FRAME_DELTA_LEN, Manifest,
    ManifestDelta, Role, Sha256Hex,
};
use synchub_tests::fixtures::{agent_config, commit, http, metric, read_tree, wait_ready};
use synchub_tests::hub::{TestHub, WsAgent, fs_blob_path};

fn manifest_url(hub_url: &str, version: u64) -> String {
    format!("{hub_url}/api/v1/spaces/{DEFAULT_SPACE}/versions/{version}/manifest")
}

/// `GET …/manifest[?from=V]`: the content type and body.
async fn get_manifest(
    client: &reqwest::Client,
    hub: &TestHub,
    version: u64,
    from: Option<u64>,
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut url = manifest_url(&hub.url, version);
    if let Some(from) = from {
        url = format!("{url}?from={from}");
    }
    let resp = client
        .get(url)
        .bearer_auth(&hub.admin_token)
        .send()
        .await?
        .error_for_status()?;
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((content_type, resp.bytes().await?.to_vec()))
}

/// Version 2 with 40 files (a new space is version 1, empty), version 3 with one changed, one
/// added and one removed.
async fn two_versions(hub: &TestHub) -> anyhow::Result<()> {
    let bodies: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("arhiva/{i:03}.json"),
                format!("{{\"n\":{i}}}").into_bytes(),
            )
        })
        .collect();
    let files: Vec<(&str, &[u8])> = bodies
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (status, body) = commit(hub, &hub.admin_token, 1, &files, &[]).await?;
    ensure!(status.is_success(), "commit v2: {status} {body}");
    let (status, body) = commit(
        hub,
        &hub.admin_token,
        2,
        &[
            ("arhiva/007.json", b"{\"n\":\"seven\"}"),
            ("arhiva/new.json", b"{}"),
        ],
        &["arhiva/013.json"],
    )
    .await?;
    ensure!(status.is_success(), "commit v3: {status} {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_manifest_requests_reads_the_store_once() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    two_versions(&hub).await?;
    let loads_before = hub.state().manifests.loads();
    // One client: 32 requests at once over its pooled connections.
    let client = http();
    let requests = (0..32).map(|_| get_manifest(&client, &hub, 3, None));
    let answers = futures::future::try_join_all(requests).await?;
    let loads = hub.state().manifests.loads() - loads_before;
    assert!(
        loads <= 1,
        "32 concurrent requests read the manifest {loads} times"
    );
    let (content_type, bytes) = &answers[0];
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let data_hash = synchub_tests::fixtures::head(&hub, &hub.admin_token)
        .await?
        .data_hash;
    assert_eq!(Sha256Hex::of(bytes), data_hash);
    assert!(answers.iter().all(|(_, b)| b == bytes));

    // From memory: the stored copy is no longer needed to answer.
    std::fs::remove_file(fs_blob_path(hub.data_dir(), data_hash.as_str()))?;
    let (_, again) = get_manifest(&client, &hub, 3, None).await?;
    assert_eq!(&again, bytes);
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_has_only_the_changes_and_an_agent_syncs_through_it() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let root = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &token, root.path());
    // Without a socket the agent learns versions by its head check and asks for `?from=`
    // (on a socket it takes the delta in the `sync_required` frame: tests/tests/agent_frames.rs).
    config.disable_websocket = true;
    let agent = SyncClient::start(config).await?;
    two_versions(&hub).await?;
    wait_ready(&agent, 3, Duration::from_secs(20)).await?;

    let client = http();
    let (_, v1) = get_manifest(&client, &hub, 2, None).await?;
    let (_, v2) = get_manifest(&client, &hub, 3, None).await?;
    let (content_type, delta) = get_manifest(&client, &hub, 3, Some(2)).await?;
    assert_eq!(content_type, DELTA_CONTENT_TYPE);
    assert!(
        delta.len() * 4 < v2.len(),
        "a 3-path delta ({} bytes) should be far smaller than the manifest ({} bytes)",
        delta.len(),
        v2.len()
    );
    let delta = ManifestDelta::parse(&delta, 100)?;
    assert_eq!(delta.puts.len(), 2);
    assert_eq!(delta.deletes, vec!["arhiva/013.json"]);
    let base = Manifest::from_canonical(&v1, 100)?;
    assert_eq!(delta.apply(&base)?.canonical_bytes(), v2);
    // A version the hub does not know: the full manifest.
    let (content_type, full) = get_manifest(&client, &hub, 3, Some(999)).await?;
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(full, v2);

    // The agent holds version 3 now; version 4 reaches it through a delta.
    let deltas = metric(&hub, "synchub_manifest_deltas_total").await?;
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        3,
        &[("arhiva/001.json", b"{\"n\":\"one\"}")],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit v4: {status} {body}");
    wait_ready(&agent, 4, Duration::from_secs(20)).await?;
    assert!(
        metric(&hub, "synchub_manifest_deltas_total").await? > deltas,
        "the agent fetched the whole manifest instead of a delta"
    );
    let tree = read_tree(&root.path().join("current"));
    assert_eq!(tree.len(), 40);
    assert_eq!(tree["arhiva/001.json"], b"{\"n\":\"one\"}");
    assert_eq!(tree["arhiva/007.json"], b"{\"n\":\"seven\"}");
    assert!(!tree.contains_key("arhiva/013.json"));
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

/// The next `sync_required` frame on `socket`: its head and the delta beside it.
async fn next_bump(
    socket: &mut WsAgent,
) -> anyhow::Result<(synchub_protocol::Head, Option<FrameDelta>)> {
    let text = socket.next_text(Duration::from_secs(10)).await?;
    match serde_json::from_str::<HubFrame>(&text)? {
        HubFrame::SyncRequired(head) => Ok((head, FrameDelta::of_frame(&text))),
        other => anyhow::bail!("expected sync_required, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bump_frame_carries_the_delta_from_the_version_before_and_its_small_new_blobs()
-> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    two_versions(&hub).await?;
    let mut socket = WsAgent::connect(&hub, &hub.admin_token, &[DEFAULT_SPACE]).await?;
    let client = http();
    let (_, v3) = get_manifest(&client, &hub, 3, None).await?;
    let held = Manifest::from_canonical(&v3, 100)?;

    // One file changes: the frame says how, and the change rebuilds the new manifest exactly.
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        3,
        &[("arhiva/002.json", b"{\"n\":\"two\"}")],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit v4: {status} {body}");
    let (head, delta) = next_bump(&mut socket).await?;
    assert_eq!(head.version, 4);
    let delta = delta.expect("a one-file bump carries its delta in the frame");
    assert_eq!(delta.from_version, 3);
    let parsed = ManifestDelta::parse(delta.text.as_bytes(), 100)?;
    assert_eq!(parsed.puts.len(), 1);
    let rebuilt = parsed.apply(&held)?;
    assert_eq!(rebuilt.data_hash(), head.data_hash);
    let (_, v4) = get_manifest(&client, &hub, 4, None).await?;
    assert_eq!(rebuilt.canonical_bytes(), v4);
    // The new file's bytes ride along: the agents need no request at all.
    let carried: Vec<Vec<u8>> = delta
        .blobs
        .iter()
        .filter_map(|b| b.checked_bytes())
        .collect();
    assert_eq!(carried, vec![b"{\"n\":\"two\"}".to_vec()]);

    // A force-sync changes no file: its delta has no change, and its base is version 4.
    let forced = client
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/force-sync")))
        .bearer_auth(&hub.admin_token)
        .json(&serde_json::json!({"reason": "check"}))
        .send()
        .await?;
    ensure!(
        forced.status().is_success(),
        "force-sync: {}",
        forced.status()
    );
    let (head, delta) = next_bump(&mut socket).await?;
    assert!(head.forced);
    let delta = delta.expect("a force-sync carries its (empty) delta");
    assert_eq!(delta.from_version, 4);
    let parsed = ManifestDelta::parse(delta.text.as_bytes(), 100)?;
    assert!(parsed.puts.is_empty() && parsed.deletes.is_empty());
    assert!(delta.blobs.is_empty());

    // A file too large for the frame, and one whose bytes the agents already hold (another
    // file's): the delta names both, the frame carries neither.
    let large = vec![b'x'; synchub_protocol::MAX_FRAME_BLOBS_LEN + 1];
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        5,
        &[
            ("arhiva/large.bin", &large),
            ("arhiva/copy.json", b"{\"n\":\"two\"}"),
        ],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit v6: {status} {body}");
    let (head, delta) = next_bump(&mut socket).await?;
    assert_eq!(head.version, 6);
    let delta = delta.expect("a two-file bump carries its delta");
    assert_eq!(
        ManifestDelta::parse(delta.text.as_bytes(), 100)?.puts.len(),
        2
    );
    assert!(delta.blobs.is_empty(), "{:?}", delta.blobs.len());

    // 300 new files make a delta longer than a frame carries: the frame goes without one.
    let bodies: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("big/{i:03}.json"), format!("[{i}]").into_bytes()))
        .collect();
    let files: Vec<(&str, &[u8])> = bodies
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (status, body) = commit(&hub, &hub.admin_token, 6, &files, &[]).await?;
    ensure!(status.is_success(), "commit v7: {status} {body}");
    let (_, delta) = get_manifest(&client, &hub, 7, Some(6)).await?;
    assert!(delta.len() > MAX_FRAME_DELTA_LEN, "{} bytes", delta.len());
    let (head, delta) = next_bump(&mut socket).await?;
    assert_eq!(head.version, 7);
    assert_eq!(delta, None, "a delta over the frame's bound is left out");
    hub.stop().await;
    Ok(())
}

/// Forwards every request to the hub, except that a manifest delta comes back with the hash of
/// its first added entry replaced: a well-formed delta that leads to the wrong manifest.
/// Returns its URL and how many deltas it has falsified.
async fn lying_proxy(hub_url: String) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    async fn forward(
        State((hub, lies)): State<(String, Arc<AtomicUsize>)>,
        req: Request,
    ) -> Response {
        let url = format!("{hub}{}", req.uri());
        let mut out = http().request(req.method().clone(), url);
        for (name, value) in req.headers() {
            if name != axum::http::header::HOST {
                out = out.header(name, value);
            }
        }
        let body = axum::body::to_bytes(req.into_body(), 64 << 20)
            .await
            .unwrap_or_default();
        let resp = match out.body(body).send().await {
            Ok(resp) => resp,
            Err(e) => {
                return Response::builder()
                    .status(502)
                    .body(Body::from(e.to_string()))
                    .expect("a valid response");
            }
        };
        let mut builder = Response::builder().status(resp.status());
        for (name, value) in resp.headers() {
            if name != axum::http::header::CONTENT_LENGTH
                && name != axum::http::header::TRANSFER_ENCODING
            {
                builder = builder.header(name, value);
            }
        }
        let is_delta = resp
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == DELTA_CONTENT_TYPE.as_bytes());
        let mut bytes = resp.bytes().await.unwrap_or_default().to_vec();
        if is_delta {
            let mut delta = ManifestDelta::parse(&bytes, 1000).expect("the hub's delta parses");
            if let Some(first) = delta.puts.first_mut() {
                first.sha256 = Sha256Hex::of(b"not the file");
                lies.fetch_add(1, Ordering::SeqCst);
            }
            bytes = delta.encode();
        }
        builder.body(Body::from(bytes)).expect("a valid response")
    }
    let lies = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .fallback(forward)
        .with_state((hub_url, lies.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, lies))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_delta_falls_back_to_the_full_manifest() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let root = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &token, root.path());
    let (proxy, lies) = lying_proxy(hub.url.clone()).await?;
    config.hubs = vec![proxy];
    // The proxy forwards HTTP only: the agent's 1-second head check finds new versions.
    config.disable_websocket = true;
    let agent = SyncClient::start(config).await?;
    two_versions(&hub).await?;
    wait_ready(&agent, 3, Duration::from_secs(20)).await?;
    let (status, body) = commit(
        &hub,
        &hub.admin_token,
        3,
        &[("arhiva/001.json", b"{\"n\":\"one\"}")],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit v4: {status} {body}");
    wait_ready(&agent, 4, Duration::from_secs(20)).await?;
    assert!(
        lies.load(Ordering::SeqCst) > 0,
        "the agent never asked for a delta"
    );
    let tree = read_tree(&root.path().join("current"));
    assert_eq!(tree.len(), 40);
    assert_eq!(tree["arhiva/001.json"], b"{\"n\":\"one\"}");
    assert_eq!(tree["arhiva/007.json"], b"{\"n\":\"seven\"}");
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
