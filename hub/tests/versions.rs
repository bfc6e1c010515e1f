//! The hub's version operations through its API, on both database backends: a rollback makes a
//! new head with an earlier version's data that agents get as forced, only admins may roll
//! back, and a socket's refused report says why with the right code.

use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;
use synchub_protocol::{ApiError, CommitResponse, DEFAULT_SPACE, HubFrame, Role};
use synchub_tests::backend_matrix;
use synchub_tests::fixtures::{commit, http};
use synchub_tests::hub::{Backend, TestHub, WsAgent};

const WAIT: Duration = Duration::from_secs(10);

async fn manifest_bytes(hub: &TestHub, token: &str, version: u64) -> anyhow::Result<Vec<u8>> {
    let url = hub.api(&format!(
        "/spaces/{DEFAULT_SPACE}/versions/{version}/manifest"
    ));
    let r = http().get(url).bearer_auth(token).send().await?;
    Ok(r.error_for_status()?.bytes().await?.to_vec())
}

async fn rollback(hub: &TestHub, token: &str, body: serde_json::Value) -> reqwest::Response {
    http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/rollback")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("rollback request")
}

async fn rollback_is_a_forced_head_with_the_old_data(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let files: &[(&str, &[u8])] = &[("scoruri/clasa_5.csv", b"ana,9\n")];
    let (status, body) = commit(&hub, &agent, 1, files, &[]).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let v2: CommitResponse = serde_json::from_value(body)?;
    let files: &[(&str, &[u8])] = &[("scoruri/clasa_5.csv", b"ana,4\n")];
    let (status, body) = commit(&hub, &agent, 2, files, &[]).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut socket = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;

    let r = rollback(&hub, &agent, json!({"to_version": 2})).await;
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "an agent may not roll back"
    );
    let r = rollback(&hub, &hub.admin_token, json!({"to_version": 99})).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = rollback(
        &hub,
        &hub.admin_token,
        json!({"to_version": 2, "reason": "wrong grades"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let head = r.json::<CommitResponse>().await?.head;
    assert_eq!(head.version, 4);
    assert!(head.forced);
    assert_eq!(head.data_hash, v2.head.data_hash);
    assert_eq!(
        head.reason.as_deref(),
        Some("rollback to version 2: wrong grades")
    );

    let pushed = socket.next_sync_required(WAIT).await?;
    assert_eq!(pushed.version, 4);
    assert!(pushed.forced, "agents must get a rollback as forced");
    assert_eq!(pushed.data_hash, v2.head.data_hash);
    assert_eq!(
        manifest_bytes(&hub, &agent, 4).await?,
        manifest_bytes(&hub, &agent, 2).await?
    );
    hub.stop().await;
    Ok(())
}

async fn a_refused_socket_report_says_why(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub
        .token("pc", Role::Agent, Some(vec![DEFAULT_SPACE.into()]))
        .await?;
    let mut socket = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    let report = json!({"type": "report", "report_id": "r1", "client_id": "pc-1",
                        "space": "other_space", "sync_type": "download", "status": "success"});
    socket.send_text(report.to_string()).await?;
    match socket.next_frame(WAIT).await? {
        HubFrame::Error { code, message } => {
            assert_eq!(code, "forbidden", "{message}");
            assert!(message.contains("other_space"), "{message}");
        }
        other => anyhow::bail!("expected an error frame, got {other:?}"),
    }
    hub.stop().await;
    Ok(())
}

backend_matrix!(
    [sqlite => Backend::Sqlite, postgres => Backend::Postgres]
    rollback_is_a_forced_head_with_the_old_data,
    a_refused_socket_report_says_why,
);

#[tokio::test]
async fn a_rollback_reason_is_bounded() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let reason = "x".repeat(1001);
    let r = rollback(
        &hub,
        &hub.admin_token,
        json!({"to_version": 1, "reason": reason}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json::<ApiError>().await?.code, "too_large");
    hub.stop().await;
    Ok(())
}
