//! The agent's local API keeps web pages out: a DNS-rebinding page (its own name as `Host`)
//! cannot read `/status`, and a page from another site cannot fire `POST /sync`; the block
//! page itself and programs on the PC still can.

use std::net::SocketAddr;
use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::Role;
use synchub_tests::fixtures::{agent_config, wait_ready};
use synchub_tests::hub::TestHub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one raw request with exactly these headers; the status code.
async fn status_of(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await??;
    let text = String::from_utf8_lossy(&head);
    Ok(text[9..12].parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_refuses_other_hosts_and_cross_site_posts() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let dir = tempfile::tempdir()?;
    let agent = SyncClient::start(agent_config(&hub, &pc, dir.path())).await?;
    wait_ready(&agent, 1, Duration::from_secs(20)).await?;
    let addr = agent.local_api_addr().expect("local API on");
    let port = addr.port();
    let own = format!("Host: 127.0.0.1:{port}");

    assert_eq!(status_of(addr, "GET", "/status", &[&own]).await?, 200);
    assert_eq!(
        status_of(addr, "GET", "/status", &["Host: localhost"]).await?,
        200
    );
    assert_eq!(
        status_of(addr, "GET", "/status", &[&format!("Host: [::1]:{port}")]).await?,
        200
    );
    // DNS rebinding: the page's own name arrives as Host.
    for host in [
        format!("Host: evil.example:{port}"),
        "Host: 127.0.0.1.evil.example".to_owned(),
    ] {
        assert_eq!(
            status_of(addr, "GET", "/status", &[&host]).await?,
            421,
            "{host}"
        );
        assert_eq!(status_of(addr, "GET", "/", &[&host]).await?, 421, "{host}");
    }

    // Cross-site POSTs carry the foreign Origin (or Sec-Fetch-Site), which no script can hide.
    for headers in [
        vec![own.clone(), "Origin: https://evil.example".to_owned()],
        vec![own.clone(), "Origin: null".to_owned()],
        vec![own.clone(), "Sec-Fetch-Site: cross-site".to_owned()],
    ] {
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        assert_eq!(
            status_of(addr, "POST", "/sync", &refs).await?,
            403,
            "{headers:?}"
        );
    }
    // The block page's own button, and a program on the PC (no Origin).
    let same = format!("Origin: http://127.0.0.1:{port}");
    assert_eq!(
        status_of(
            addr,
            "POST",
            "/sync",
            &[&own, &same, "Sec-Fetch-Site: same-origin"]
        )
        .await?,
        202
    );
    assert_eq!(status_of(addr, "POST", "/sync", &[&own]).await?, 202);

    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
