//! Limits one token cannot pass, against a real hub on loopback: sockets per token, a request
//! body that stops arriving, and the hourly upload quota. Each is what a stolen or misused
//! token (or a broken agent) would otherwise spend the hub's sockets, tasks and disk on.

use reqwest::StatusCode;
use std::time::Duration;
use synchub_protocol::{ApiError, DEFAULT_SPACE, Role, Sha256Hex};
use synchub_tests::fixtures::http;
use synchub_tests::hub::{TestHub, WsAgent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holds_at_most_its_cap_of_sockets() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| c.limits.max_sockets_per_token = 4).await?;
    let pc = hub.token("pc", Role::Read, None).await?;
    let other = hub.token("pc-2", Role::Read, None).await?;
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(WsAgent::connect(&hub, &pc, &[DEFAULT_SPACE]).await?);
    }
    let fifth = WsAgent::connect(&hub, &pc, &[DEFAULT_SPACE])
        .await
        .err()
        .map(|e| format!("{e:#}"));
    let fifth = fifth.expect("a fifth socket of one token is refused");
    assert!(fifth.contains("429"), "{fifth}");
    // The refusal says why, in the JSON error body of the upgrade request.
    let r = http()
        .get(hub.api("/ws"))
        .bearer_auth(&pc)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let e: ApiError = r.json().await?;
    assert!(e.message.contains("max_sockets_per_token"), "{e:?}");
    // Another token is not affected, and a closed socket frees its slot.
    WsAgent::connect(&hub, &other, &[DEFAULT_SPACE]).await?;
    drop(sockets.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match WsAgent::connect(&hub, &pc, &[DEFAULT_SPACE]).await {
            Ok(s) => break sockets.push(s),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(())
}

/// Sends a request head promising 1000 bytes of body and 10 of them; the status line the hub
/// answers with, or `None` when it did not answer within 5 s.
async fn stalled_body(hub: &TestHub, method: &str, path: &str, token: &str) -> Option<String> {
    let addr = hub.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "{method} /api/v1{path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"base_ver"
    );
    s.write_all(head.as_bytes()).await.ok()?;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    text.lines().next().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_cut_off_with_408() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| c.limits.body_idle_timeout_ms = 500).await?;
    let pc = hub.token("pc", Role::Publish, None).await?;
    let commit = format!("/spaces/{DEFAULT_SPACE}/commits");
    let blob = format!("/blobs/{}", Sha256Hex::of(b"x"));
    for (method, path) in [("POST", commit.as_str()), ("PUT", blob.as_str())] {
        let status = stalled_body(&hub, method, path, &pc).await;
        assert_eq!(
            status.as_deref(),
            Some("HTTP/1.1 408 Request Timeout"),
            "{method} {path}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_the_hourly_quota_get_429() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| c.limits.upload_bytes_per_token_per_hour = 1000).await?;
    let pc = hub.token("pc", Role::Publish, None).await?;
    let other = hub.token("pc-2", Role::Publish, None).await?;
    let put = |token: &str, body: Vec<u8>| {
        http()
            .put(hub.api(&format!("/blobs/{}", Sha256Hex::of(&body))))
            .bearer_auth(token.to_owned())
            .body(body)
            .send()
    };
    assert_eq!(put(&pc, vec![1; 600]).await?.status(), StatusCode::CREATED);
    let r = put(&pc, vec![2; 600]).await?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let e: ApiError = r.json().await?;
    assert_eq!(e.code, "rate_limited");
    assert!(e.message.contains("1000 bytes per hour"), "{e:?}");
    // The quota is per token.
    assert_eq!(
        put(&other, vec![2; 600]).await?.status(),
        StatusCode::CREATED
    );
    Ok(())
}
