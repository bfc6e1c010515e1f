//! When the hub cannot be reached: a socket that goes silent without closing (a NAT or proxy
//! that dropped the flow) is noticed within a few ping intervals and replaced, so the agent
//! still learns of new versions; a hub that is down is shown on `/status` with the reason, and
//! local use stays blocked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use synchub_client::SyncClient;
use synchub_protocol::Role;
use synchub_tests::fixtures::{agent_config, commit};
use synchub_tests::hub::TestHub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback TCP proxy; [`Proxy::freeze`] makes every connection open so far stop carrying
/// bytes (without closing), while new connections work.
struct Proxy {
    addr: std::net::SocketAddr,
    generation: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let generation = Arc::new(AtomicU64::new(0));
        let gen_accept = generation.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let born = gen_accept.load(Ordering::SeqCst);
                let generation = gen_accept.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let a = pump(ri, wo, born, generation.clone());
                    let b = pump(ro, wi, born, generation);
                    tokio::join!(a, b);
                });
            }
        });
        Ok(Proxy { addr, generation })
    }

    fn freeze(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    born: u64,
    generation: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation.load(Ordering::SeqCst) != born {
            // Frozen: swallow everything, keep the connection open, never answer.
            futures::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_replaced_within_seconds() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let hub = TestHub::start_with(|c| c.ping_interval_ms = 300).await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let proxy = Proxy::start(hub.config.listen).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &token, dir.path());
    config.hubs = vec![format!("http://{}", proxy.addr)];
    config.max_backoff_ms = 1000;
    let agent = SyncClient::start(config).await?;
    agent.wait_ready(None, 1, Duration::from_secs(10)).await?;

    // The network path dies silently: the agent's socket (and pooled HTTP connections) hang.
    proxy.freeze();
    let (status, body) = commit(
        &hub,
        &token,
        1,
        &[("data.json", b"{\"after\":\"freeze\"}")],
        &[],
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    // Three silent ping intervals (0.9 s) plus reconnect or fallback: well within 6 s.
    agent
        .wait_ready(None, 2, Duration::from_secs(6))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "agent never learned of version 2: {e}; {:?}",
                agent.status()
            )
        })?;
    let got = std::fs::read(dir.path().join("current/data.json"))
        .or_else(|_| std::fs::read(dir.path().join("global_version/current/data.json")))?;
    assert_eq!(got, b"{\"after\":\"freeze\"}");
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_hub_is_shown_with_its_reason() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, "shb_unused", dir.path());
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    config.hubs = vec![format!("http://{closed}")];
    let agent = SyncClient::start(config).await?;
    let url = format!(
        "http://{}/status",
        agent.local_api_addr().expect("local API")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status: serde_json::Value = reqwest::get(&url).await?.json().await?;
        if let Some(error) = status["hub"]["last_error"].as_str() {
            assert!(error.contains("unreachable"), "{error}");
            assert_eq!(status["spaces"][0]["allows_use"], false);
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no hub error shown: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
