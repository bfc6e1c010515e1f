//! A hub that lies: the agent checks everything it is sent, so a hostile or broken hub can
//! neither write outside the data folder nor get unverified data applied. The fake hub here
//! serves manifests whose hash matches what it announced, so only the agent's own path and
//! content checks stand in the way.

use axum::Router;
use axum::routing::get;
use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::{AgentState, Head, Sha256Hex};
use synchub_tests::fixtures::agent_config;
use synchub_tests::hub::TestHub;

/// Serves one head (version 2) and its manifest bytes, nothing else (no WebSocket: the agent
/// uses its 1-second fallback).
async fn fake_hub(manifest: Vec<u8>) -> anyhow::Result<String> {
    let head = Head {
        space: "global_version".into(),
        version: 2,
        data_hash: Sha256Hex::of(&manifest),
        forced: false,
        reason: None,
        by: Some("mallory".into()),
        at: "2026-11-25T00:00:00Z".into(),
        epoch: 0,
        forced_version: 0,
    };
    let app = Router::new()
        .route(
            "/api/v1/spaces/global_version/head",
            get(move || {
                let head = head.clone();
                async move { axum::Json(head) }
            }),
        )
        .route(
            "/api/v1/spaces/global_version/versions/2/manifest",
            get(move || {
                let m = manifest.clone();
                async move { m }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

async fn agent_fails_on(manifest: &str, expected_error: &str) -> anyhow::Result<()> {
    let url = fake_hub(manifest.as_bytes().to_vec()).await?;
    // A real hub only to borrow the test configuration helper; the agent talks to the fake one.
    let hub = TestHub::start().await?;
    let root = tempfile::tempdir()?;
    let dir = root.path().join("data");
    let mut config = agent_config(&hub, "shb_any", &dir);
    config.hubs = vec![url];
    config.disable_websocket = true;
    let agent = SyncClient::start(config).await?;
    let mut states = agent.subscribe(None)?;
    let failed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let AgentState::Failed { error, .. } = states.borrow_and_update().clone() {
                return error;
            }
            if states.changed().await.is_err() {
                return String::new();
            }
        }
    })
    .await?;
    assert!(
        failed.contains(expected_error),
        "agent failed with {failed:?}"
    );
    assert!(!agent.state(None)?.allows_use(), "use must stay blocked");
    // Nothing was written beside the data folder.
    let beside: Vec<_> = std::fs::read_dir(root.path())?
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, vec![std::ffi::OsString::from("data")]);
    assert!(!dir.join("current/evil").exists());
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_with_a_path_out_of_the_folder_is_refused() -> anyhow::Result<()> {
    let hash = Sha256Hex::of(b"x");
    agent_fails_on(&format!("{hash} 1 ../evil\n"), "'..' segment").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_with_an_absolute_path_is_refused() -> anyhow::Result<()> {
    let hash = Sha256Hex::of(b"x");
    agent_fails_on(&format!("{hash} 1 /etc/evil\n"), "is absolute").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_manifest_is_refused() -> anyhow::Result<()> {
    agent_fails_on("not a manifest\n", "invalid manifest").await
}
