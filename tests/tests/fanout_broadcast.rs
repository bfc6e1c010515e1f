//! The fan-out writes a bump to each socket itself, without waking the socket's task, and
//! leaves a socket to its own task only when the write cannot finish at once: 200 sockets all
//! get every bump (most of them written inline), and an agent that stops reading delays no one
//! else.

use futures::future::join_all;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use std::time::{Duration, Instant};
use synchub_protocol::{
    AgentFrame, CommitResponse, DEFAULT_SPACE, HeldSpace, HubFrame, PROTOCOL_VERSION, Role,
};
use synchub_tests::fixtures::{self, commit};
use synchub_tests::hub::{TestHub, WsAgent};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sockets_all_get_every_bump() -> anyhow::Result<()> {
    // One token for 200 sockets: the per-token socket cap is lifted.
    let hub = TestHub::start_with(|c| c.limits.max_sockets_per_token = 0).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let mut sockets = join_all((0..200).map(|_| WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE])))
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let inline_before = fixtures::metric(&hub, "synchub_fanout_inline_total").await?;
    for round in 0..3u64 {
        let name = format!("round-{round}.json");
        let (status, body) = commit(&hub, &agent, 1 + round, &[(&name, b"{}")], &[]).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let new: CommitResponse = serde_json::from_value(body)?;
        for (i, s) in sockets.iter_mut().enumerate() {
            let got = s.next_sync_required(WAIT).await?;
            assert_eq!(got, new.head, "socket {i}, round {round}");
        }
    }
    let inline = fixtures::metric(&hub, "synchub_fanout_inline_total").await? - inline_before;
    // Idle sockets with empty kernel buffers take the frame at once: the fan-out wrote nearly
    // all 600 itself rather than waking 600 socket tasks.
    assert!(
        inline >= 500.0,
        "only {inline} of 600 deliveries were written by the fan-out"
    );
    hub.stop().await;
    Ok(())
}

/// An agent socket that says hello and then never reads again; its receive buffer is made
/// small so that the hub's side fills quickly.
async fn stalled_socket(
    hub: &TestHub,
    token: &str,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let addr: std::net::SocketAddr = hub.url.trim_start_matches("http://").parse()?;
    let tcp = tokio::net::TcpSocket::new_v4()?;
    tcp.set_recv_buffer_size(4096)?;
    let stream = tcp.connect(addr).await?;
    let mut request = hub.ws_url().into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await?;
    let hello = AgentFrame::Hello {
        protocol: PROTOCOL_VERSION,
        client_id: "stalled".into(),
        spaces: vec![HeldSpace {
            space: DEFAULT_SPACE.into(),
            version: 0,
            data_hash: None,
        }],
        agent_version: None,
        hostname: None,
    };
    socket
        .send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    match socket.next().await {
        Some(Ok(Message::Text(t))) => {
            let frame: HubFrame = serde_json::from_str(&t)?;
            anyhow::ensure!(matches!(frame, HubFrame::Welcome { .. }), "{frame:?}");
        }
        other => anyhow::bail!("expected welcome, got {other:?}"),
    }
    Ok(socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_whose_reader_stalls_does_not_hold_up_others() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let _stalled = stalled_socket(&hub, &agent).await?;
    let mut reader = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    let deferred_before = fixtures::metric(&hub, "synchub_fanout_deferred_total").await?;

    // 400 heads of ~16 KB each: ~6.5 MB, more than the kernel buffers between the hub and a
    // peer that does not read can hold, so the stalled socket's writes stop completing.
    let base = hub
        .state()
        .heads
        .get(DEFAULT_SPACE)
        .expect("a head")
        .head
        .clone();
    let started = Instant::now();
    let mut last = base.clone();
    for n in 1..=400u64 {
        last = base.clone();
        last.version = base.version + n;
        last.reason = Some(format!("{n:>16384}"));
        assert!(hub.state().heads.publish(last.clone()));
        tokio::task::yield_now().await;
    }
    // The reading agent gets every head up to the newest, whatever the stalled one does (a
    // fan-out that waited for the stalled socket would leave it waiting past the deadline).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = reader
            .next_sync_required(deadline.saturating_duration_since(Instant::now()))
            .await?;
        if h.version == last.version {
            break;
        }
    }
    println!(
        "6.5 MB of heads to the reading agent in {:?}",
        started.elapsed()
    );
    let deferred = fixtures::metric(&hub, "synchub_fanout_deferred_total").await? - deferred_before;
    assert!(
        deferred >= 1.0,
        "the stalled socket's bumps were handed to its own task"
    );

    // The hub still takes new sockets, and a later bump reaches them and the reader.
    let mut late = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    let mut after = base.clone();
    after.version = last.version + 1;
    assert!(hub.state().heads.publish(after.clone()));
    assert_eq!(late.next_sync_required(WAIT).await?.version, after.version);
    assert_eq!(
        reader.next_sync_required(WAIT).await?.version,
        after.version
    );
    hub.stop().await;
    Ok(())
}
