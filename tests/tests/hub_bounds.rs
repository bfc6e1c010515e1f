//! What an attacker holding one agent token (or none) could do to a hub, each against a real
//! hub on loopback: over-long fields that would make frames no agent can read, reports dated
//! in the future, huge blob queries, byte ranges that wrap, hostile paths, connections that
//! never send a request, a corrupt manifest on disk, a database that is down, a full disk.

use anyhow::{Context, bail, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use synchub_protocol::{
    ApiError, CommitRequest, DEFAULT_SPACE, HubFrame, MAX_BLOBS_PER_QUERY, MAX_MESSAGE_LEN,
    ManifestEntry, Role, Sha256Hex,
};
use synchub_tests::fixtures::{self, commit, http, put_blob};
use synchub_tests::hub::{TestHub, WsAgent, fs_blob_path, ws_connect};
use synchub_tests::postgres::PgCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// Commits `files` (uploaded first) with `message` on `base`; the status and body.
async fn commit_with_message(
    hub: &TestHub,
    token: &str,
    base: u64,
    path: &str,
    message: String,
) -> anyhow::Result<(StatusCode, Value)> {
    let body = format!("{path} at {base}").into_bytes();
    let sha256 = put_blob(hub, token, &body).await?;
    let req = CommitRequest {
        base_version: base,
        puts: vec![ManifestEntry {
            path: path.to_owned(),
            size: body.len() as u64,
            sha256,
        }],
        deletes: vec![],
        message: Some(message),
    };
    let r = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/commits")))
        .bearer_auth(token)
        .json(&req)
        .send()
        .await?;
    Ok((r.status(), r.json().await.unwrap_or(Value::Null)))
}

/// A 1.1 MiB commit message used to become the head's reason and break every agent's socket
/// (the `sync_required` frame no longer fit); now it is refused and sockets live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_message_is_bounded_and_sockets_survive() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let mut agent = WsAgent::connect(&hub, &pc, &[DEFAULT_SPACE]).await?;

    let (status, body) = commit_with_message(&hub, &pc, 1, "a.txt", "x".repeat(1_100_000)).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["code"], "too_large");
    assert!(
        body["message"].as_str().unwrap_or("").contains("message"),
        "{body}"
    );
    assert_eq!(
        fixtures::head(&hub, &pc).await?.version,
        1,
        "nothing was committed"
    );

    let longest = "ș".repeat(MAX_MESSAGE_LEN / 2);
    let (status, body) = commit_with_message(&hub, &pc, 1, "a.txt", longest.clone()).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bumped = agent.next_sync_required(WAIT).await?;
    assert_eq!(bumped.reason.as_deref(), Some(longest.as_str()));
    // A new agent still gets its welcome with that head.
    let late = WsAgent::connect(&hub, &pc, &[DEFAULT_SPACE]).await?;
    assert_eq!(late.welcome_heads[0].version, 2);

    // Force-sync reasons have the same bound.
    let r = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/force-sync")))
        .bearer_auth(&hub.admin_token)
        .json(&json!({ "reason": "y".repeat(MAX_MESSAGE_LEN + 1) }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    hub.stop().await;
    Ok(())
}

/// `hello` labels are bounded: a 10 kB host name is refused, not shown to admins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_labels_are_bounded() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let mut socket = ws_connect(&hub.ws_url(), Some(&pc)).await?;
    let hello = json!({
        "type": "hello", "protocol": synchub_protocol::PROTOCOL_VERSION,
        "client_id": "pc-1", "spaces": [], "hostname": "h".repeat(10_000),
    });
    futures::SinkExt::send(
        &mut socket,
        tokio_tungstenite::tungstenite::Message::Text(hello.to_string().into()),
    )
    .await?;
    let mut agent = WsAgent {
        socket,
        welcome_heads: vec![],
    };
    let (_, frames) = agent.until_closed(WAIT).await?;
    let refused = frames.iter().any(|f| {
        matches!(f, HubFrame::Error { code, message } if code == "malformed_frame" && message.contains("hostname"))
    });
    assert!(refused, "{frames:?}");
    hub.stop().await;
    Ok(())
}

/// A failed download report; `synced_at` absent: the hub's clock.
fn report(client_id: &str, synced_at: Option<&str>) -> Value {
    json!({
        "report_id": uuid::Uuid::new_v4().to_string(), "client_id": client_id,
        "space": DEFAULT_SPACE, "sync_type": "download", "status": "failed",
        "version": 1, "error_message": "e".repeat(10_000), "synced_at": synced_at,
    })
}

/// A report dated 2100 used to stay at the top of `sync_log` for good; it is stored at the
/// hub's time now. Long error texts are cut, over-long ids refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_fields_are_bounded_and_dated_by_the_hub() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let post = |body: Value| {
        http()
            .post(hub.api("/sync-log"))
            .bearer_auth(&pc)
            .json(&body)
            .send()
    };
    let r = post(report(&"c".repeat(129), None)).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ApiError = r.json().await?;
    assert!(e.message.contains("client_id"), "{e:?}");

    let r = post(report("pc-future", Some("2100-01-01T00:00:00Z"))).await?;
    assert_eq!(r.status(), StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = post(report("pc-now", None)).await?;
    assert_eq!(r.status(), StatusCode::CREATED);

    let rows = hub.sync_log("limit=10").await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0].client_id.as_deref(),
        Some("pc-now"),
        "the future report must not pin the top: {rows:?}"
    );
    let future = &rows[1];
    assert!(!future.synced_at.starts_with("2100"), "{future:?}");
    assert_eq!(
        future.error_message.as_ref().map(String::len),
        Some(synchub_protocol::bounds::MAX_ERROR_TEXT_LEN)
    );
    hub.stop().await;
    Ok(())
}

/// 900k hashes in one `POST /blobs/missing` used to cost the hub seconds; the count is bounded
/// and the agent asks in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_blobs_query_is_bounded() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let hashes = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| Sha256Hex::of(&i.to_le_bytes()).to_string())
            .collect()
    };
    let r = http()
        .post(hub.api("/blobs/missing"))
        .bearer_auth(&pc)
        .json(&json!({ "sha256": hashes(MAX_BLOBS_PER_QUERY + 1) }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let started = Instant::now();
    let r = http()
        .post(hub.api("/blobs/missing"))
        .bearer_auth(&pc)
        .json(&json!({ "sha256": hashes(MAX_BLOBS_PER_QUERY) }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await?;
    assert_eq!(
        answer["sha256"].as_array().map(Vec::len),
        Some(MAX_BLOBS_PER_QUERY)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The agent's client splits a longer list into batches the hub accepts.
    synchub_client::install_crypto_provider();
    let api = synchub_client::HubApi::new(vec![hub.url.clone()], &pc)?;
    let held = put_blob(&hub, &pc, b"held").await?;
    let mut list: Vec<Sha256Hex> = hashes(MAX_BLOBS_PER_QUERY + 5)
        .iter()
        .map(|h| h.parse())
        .collect::<Result<_, _>>()?;
    list.push(held.clone());
    let missing = api
        .missing(&synchub_protocol::BlobList { sha256: list })
        .await?;
    assert_eq!(missing.sha256.len(), MAX_BLOBS_PER_QUERY + 5);
    assert!(!missing.sha256.contains(&held));
    hub.stop().await;
    Ok(())
}

/// `bytes=0-18446744073709551615` is an open range (it used to wrap to an empty one: 416), the
/// `bearer` scheme is case-insensitive, authenticated bytes are `private` to shared caches,
/// and query-string errors come as the JSON error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_schemes_caching_and_query_errors() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let body = b"0123456789".to_vec();
    let (status, committed) = commit(&hub, &pc, 1, &[("a.bin", &body)], &[]).await?;
    assert_eq!(status, StatusCode::CREATED, "{committed}");
    let hash = Sha256Hex::of(&body);

    for (range, want) in [
        ("bytes=0-18446744073709551615", &body[..]),
        ("bytes=4-18446744073709551615", &body[4..]),
    ] {
        let r = http()
            .get(hub.api(&format!("/blobs/{hash}")))
            .header("authorization", format!("bearer {pc}"))
            .header("range", range)
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        let cache = r.headers()["cache-control"].to_str()?.to_owned();
        assert!(cache.starts_with("private"), "{cache}");
        assert_eq!(&r.bytes().await?[..], want, "{range}");
    }
    let r = http()
        .get(hub.api(&format!("/spaces/{DEFAULT_SPACE}/versions/2/manifest")))
        .header("authorization", format!("BEARER {pc}"))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["cache-control"]
            .to_str()?
            .starts_with("private")
    );

    for query in [
        format!("/spaces/{DEFAULT_SPACE}/versions?limit=abc"),
        "/sync-log?limit=-1".to_owned(),
    ] {
        let r = http()
            .get(hub.api(&query))
            .bearer_auth(&hub.admin_token)
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        let e: ApiError = r.json().await.context("a JSON error body")?;
        assert_eq!(e.code, "bad_request");
    }
    hub.stop().await;
    Ok(())
}

/// Paths that would show as another name (bidi controls, zero-width characters) or open a
/// device on Windows are refused at commit time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deceptive_and_device_paths_are_refused() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    for path in [
        "factura\u{202E}fdp.exe",
        "a\u{200B}b.txt",
        "dir/\u{FEFF}x",
        "x\u{2066}y",
        "COM¹",
        "COM¹.txt",
        "CONIN$",
        "sub/CONOUT$.log",
    ] {
        let (status, body) = commit(&hub, &pc, 1, &[(path, b"x")], &[]).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path:?}: {body}");
        assert_eq!(body["code"], "invalid_path", "{path:?}");
    }
    assert_eq!(fixtures::head(&hub, &pc).await?.version, 1);
    hub.stop().await;
    Ok(())
}

/// True once the hub closed the connection (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or 400 before closing is fine.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Silent connections and slowloris half-headers, without a token, used to stay open for good;
/// now each is closed after the header-read deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_connections_are_closed() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| {
        c.limits.header_read_timeout_ms = 1000;
    })
    .await?;
    let addr = hub.config.listen;
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(addr).await?);
    }
    let mut slow = Vec::new();
    for _ in 0..30 {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
        slow.push(s);
    }
    // Slowloris: a header byte every 200 ms, never the blank line.
    let drip = tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for s in &mut slow {
                if s.write_all(b"X").await.is_err() {
                    continue;
                }
            }
        }
        slow
    });
    let started = Instant::now();
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "silent socket still open"
        );
    }
    let mut slow = drip.await?;
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(3)).await,
            "slow socket still open"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );

    // A keep-alive client that goes quiet is closed too, and an ordinary request still works.
    let r = http().get(format!("{}/healthz", hub.url)).send().await?;
    assert_eq!(r.status(), StatusCode::OK);
    hub.stop().await;
    Ok(())
}

/// One address may hold only so many connections that have not authenticated; a connection
/// stops counting once a request on it authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_per_address_are_capped() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| {
        c.limits.max_unauthenticated_per_address = 20;
    })
    .await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let addr = hub.config.listen;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(addr).await?);
    }
    // Let the hub accept them all before the one over the cap.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = TcpStream::connect(addr).await?;
    assert!(
        closed_within(&mut over, Duration::from_secs(3)).await,
        "the 21st unauthenticated connection was kept"
    );
    // One over the cap that asks is told why and when to come back (it used to be closed
    // without a word).
    let mut over = TcpStream::connect(addr).await?;
    let (status, headers, body) = exchange(
        &mut over,
        &format!("GET /api/v1/spaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {pc}\r\n\r\n"),
    )
    .await?;
    assert_eq!(status, 503, "{headers} {body}");
    assert!(
        headers.to_ascii_lowercase().contains("retry-after: 1"),
        "{headers}"
    );
    let error: ApiError = serde_json::from_str(&body)?;
    assert_eq!(error.code, "busy");
    assert!(error.message.contains("authenticated"), "{}", error.message);
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);

    // One of the 20 authenticates: its place is free for a new connection.
    let request =
        format!("GET /api/v1/spaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {pc}\r\n\r\n");
    held[0].write_all(request.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let n = held[0].read(&mut buf).await?;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let mut next = TcpStream::connect(addr).await?;
    next.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let n = next.read(&mut buf).await?;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    hub.stop().await;
    Ok(())
}

/// Sends `request` on `stream` and reads one response: its status, its head and its body
/// (by `Content-Length`).
async fn exchange(stream: &mut TcpStream, request: &str) -> anyhow::Result<(u16, String, String)> {
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .context("no response")??;
        ensure!(n > 0, "connection closed without a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("status line")?
        .parse()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .context("body cut short")??;
        ensure!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    Ok((status, head, body))
}

/// A herd from one address (an office behind NAT, a load test) whose downloads are put off
/// with 503 `busy` used to count as unauthenticated, because admission answered before the
/// token was looked at: past the cap new connections were closed. Now every keep-alive
/// connection that made a request with a valid token stops counting, whatever the answer,
/// and stays usable; and one more connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_with_a_token_do_not_count_against_the_cap() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| {
        c.limits.max_unauthenticated_per_address = 8;
        c.limits.max_concurrent_downloads = 1;
        // No queue: a download over the bound is put off (503) at once.
        c.limits.download_queue_ms = 0;
    })
    .await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let addr = hub.config.listen;
    // Larger than the socket buffers: a client that does not read it holds the one slot.
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let (status, body) = commit(&hub, &pc, 1, &[("big.bin", &big)], &[]).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut holder = TcpStream::connect(addr).await?;
    holder
        .write_all(
            format!(
                "GET /api/v1/blobs/{} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {pc}\r\n\r\n",
                Sha256Hex::of(&big)
            )
            .as_bytes(),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let spaces =
        format!("GET /api/v1/spaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {pc}\r\n\r\n");
    let manifest = format!(
        "GET /api/v1/spaces/{DEFAULT_SPACE}/versions/2/manifest HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {pc}\r\n\r\n"
    );
    let mut open = Vec::new();
    for i in 0..24 {
        let mut c = TcpStream::connect(addr).await?;
        // Half make an ordinary request, half a download that is put off.
        let (status, headers, body) = if i % 2 == 0 {
            exchange(&mut c, &spaces).await
        } else {
            exchange(&mut c, &manifest).await
        }
        .with_context(|| format!("connection {i}"))?;
        let expected = if i % 2 == 0 { 200 } else { 503 };
        assert_eq!(status, expected, "connection {i}: {headers} {body}");
        open.push(c);
    }
    // All stay usable, and a new one is served.
    for (i, c) in open.iter_mut().enumerate() {
        let (status, _, body) = exchange(c, &spaces)
            .await
            .with_context(|| format!("connection {i} again"))?;
        assert_eq!(status, 200, "connection {i} again: {body}");
    }
    let mut one_more = TcpStream::connect(addr).await?;
    let (status, _, body) = exchange(&mut one_more, &spaces).await?;
    assert_eq!(status, 200, "{body}");

    // Without a valid token a download is refused for that, not for being busy.
    let mut anonymous = TcpStream::connect(addr).await?;
    let (status, _, _) = exchange(
        &mut anonymous,
        &format!(
            "GET /api/v1/spaces/{DEFAULT_SPACE}/versions/2/manifest HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
    )
    .await?;
    assert_eq!(status, 401);
    drop(holder);
    hub.stop().await;
    Ok(())
}

/// One flipped byte in a stored manifest used to become the base of the next version; now the
/// commit is refused with `corrupt_data` and the head stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_manifest_is_never_built_on() -> anyhow::Result<()> {
    let mut hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let (status, body) = commit(&hub, &pc, 1, &[("a.txt", b"a"), ("b.txt", b"b")], &[]).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let v2 = fixtures::head(&hub, &pc).await?;
    hub.stop_keep().await;
    let path = fs_blob_path(hub.data_dir(), v2.data_hash.as_str());
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes)?;
    hub.restart().await?;

    let (status, body) = commit(&hub, &pc, 2, &[("c.txt", b"c")], &[]).await?;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["code"], "corrupt_data", "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("fsck"),
        "{body}"
    );
    assert_eq!(
        fixtures::head(&hub, &pc).await?.version,
        2,
        "no version on a corrupt base"
    );
    hub.stop().await;
    Ok(())
}

/// With PostgreSQL down a commit answers 503 within a few seconds and says why (it used to
/// wait the 10 s pool timeout and say "internal error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_fails_fast_with_its_reason() -> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = cluster.create_database().await?;
    let hub = TestHub::start_with(|c| c.database_url = Some(url)).await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let sha = put_blob(&hub, &pc, b"x").await?;
    cluster.stop()?;
    let req = json!({ "base_version": 1, "puts": [{ "path": "x", "size": 1, "sha256": sha }] });
    let started = Instant::now();
    let r = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/commits")))
        .bearer_auth(&pc)
        .json(&req)
        .send()
        .await?;
    let took = started.elapsed();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let e: ApiError = r.json().await?;
    assert_eq!(e.code, "unavailable");
    assert!(e.message.contains("database"), "{e:?}");
    assert!(!e.message.contains("internal error"), "{e:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    hub.stop().await;
    Ok(())
}

/// While a report waits for the database its socket still gets its pings (and so its bumps):
/// the report is stored beside the socket's loop, not in it. With PostgreSQL down, a report
/// frame used to hold its socket silent until the store gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_keeps_its_pings_while_its_report_waits_for_the_database() -> anyhow::Result<()> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = cluster.create_database().await?;
    let hub = TestHub::start_with(|c| {
        c.database_url = Some(url);
        c.ping_interval_ms = 200;
    })
    .await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let mut agent = WsAgent::connect(&hub, &pc, &[DEFAULT_SPACE]).await?;
    cluster.stop()?;
    let report = json!({
        "type": "report", "report_id": "r-down", "client_id": "pc-down",
        "space": DEFAULT_SPACE, "sync_type": "download", "status": "success",
    });
    agent.send_text(report.to_string()).await?;
    let sent = Instant::now();
    let mut pings = 0;
    let answered = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), agent.socket.next())
            .await
            .context("no answer to the report within 30 s")?
            .context("socket closed")??;
        let Message::Text(text) = msg else { continue };
        match serde_json::from_str::<HubFrame>(&text)? {
            HubFrame::Ping => {
                pings += 1;
                agent.send_text(json!({"type": "pong"}).to_string()).await?;
            }
            HubFrame::ReportAck { .. } | HubFrame::Error { .. } => break sent.elapsed(),
            _ => {}
        }
    };
    ensure!(
        answered >= Duration::from_millis(800),
        "the report was answered in {answered:?}: too soon to show a stalled socket"
    );
    assert!(
        pings >= 3,
        "{pings} pings in the {answered:?} the report waited for the database"
    );
    hub.stop().await;
    Ok(())
}

/// An agent that sends many reports at once: the socket stores at most 32 at a time and reads
/// the rest as room frees, and every report is answered, none lost or answered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_report_frames_is_answered_report_by_report() -> anyhow::Result<()> {
    const REPORTS: usize = 200;
    let hub = TestHub::start().await?;
    let mut agent = WsAgent::connect_as(
        &hub.ws_url(),
        &hub.admin_token,
        "pc-burst",
        &[DEFAULT_SPACE],
    )
    .await?;
    for i in 0..REPORTS {
        let report = json!({
            "type": "report", "report_id": format!("burst-{i}"), "client_id": "pc-burst",
            "space": DEFAULT_SPACE, "sync_type": "download", "status": "success",
        });
        agent.send_text(report.to_string()).await?;
    }
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < REPORTS {
        match agent.next_frame(Duration::from_secs(20)).await? {
            HubFrame::ReportAck { report_id } => {
                assert!(
                    acked.insert(report_id.clone()),
                    "{report_id} answered twice"
                );
            }
            other => bail!("expected report_ack, got {other:?}"),
        }
    }
    let expected: std::collections::BTreeSet<String> =
        (0..REPORTS).map(|i| format!("burst-{i}")).collect();
    assert_eq!(acked, expected);
    let stored = hub.sync_log("client_id=pc-burst&limit=1000").await?;
    assert_eq!(stored.len(), REPORTS);
    hub.stop().await;
    Ok(())
}

/// A small tmpfs, unmounted on drop: a real full disk for the blob store.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(size_kib: u32) -> anyhow::Result<SmallDisk> {
        let path = std::env::temp_dir().join(format!("synchub-full-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(&path)
            .output()?;
        if !out.status.success() {
            bail!(
                "this test mounts a small tmpfs to fill a disk and needs root (or \
                 CAP_SYS_ADMIN): run the suite as root, as scripts/test does in CI; mount said: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(SmallDisk { path })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A full disk used to answer 500 "internal error" while `/readyz` said ready; now an upload
/// gets 507 with a clear message, nothing half-written is left, and `/readyz` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_507_and_readyz_says_so() -> anyhow::Result<()> {
    let disk = SmallDisk::mount(512)?;
    let blobs = disk.path.join("blobs");
    let hub = TestHub::start_with(|c| {
        c.blob_store = synchub_hub::config::BlobStoreConfig::Fs {
            path: Some(blobs.clone()),
        };
    })
    .await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let ready = http().get(format!("{}/readyz", hub.url)).send().await?;
    assert_eq!(ready.status(), StatusCode::OK);

    let big = vec![7u8; 2 << 20];
    let hash = Sha256Hex::of(&big);
    let r = http()
        .put(hub.api(&format!("/blobs/{hash}")))
        .bearer_auth(&pc)
        .body(big)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let e: ApiError = r.json().await?;
    assert_eq!(e.code, "storage_full");
    assert!(e.message.contains("disk is full"), "{e:?}");
    let r = http()
        .get(hub.api(&format!("/blobs/{hash}")))
        .bearer_auth(&pc)
        .send()
        .await?;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "nothing half-written is visible"
    );

    let ready = http().get(format!("{}/readyz", hub.url)).send().await?;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let e: ApiError = ready.json().await?;
    assert!(e.message.contains("disk is full"), "{e:?}");
    hub.stop().await;
    drop(disk);
    Ok(())
}

/// `/metrics` names spaces, tokens and traffic: admin tokens only, unless `metrics_public`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_an_admin_token_unless_public() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let url = format!("{}/metrics", hub.url);
    let r = http().get(&url).send().await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http().get(&url).bearer_auth(&pc).send().await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http()
        .get(&url)
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await?.contains("synchub_"));
    hub.stop().await;

    let public = TestHub::start_with(|c| c.metrics_public = true).await?;
    let r = http().get(format!("{}/metrics", public.url)).send().await?;
    assert_eq!(r.status(), StatusCode::OK);
    public.stop().await;
    Ok(())
}

/// An address that sends many wrong tokens gets 429 for a while, even with a right one; other
/// addresses are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_rate_limited_per_address() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let spaces = hub.api("/spaces");
    for i in 0..synchub_hub::auth::MAX_FAILURES {
        let r = http()
            .get(&spaces)
            .bearer_auth(format!("shb_guess{i}"))
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "guess {i}");
    }
    let r = http()
        .get(&spaces)
        .bearer_auth("shb_one_more")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = http().get(&spaces).bearer_auth(&pc).send().await?;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the address is blocked"
    );
    let e: ApiError = r.json().await?;
    assert_eq!(e.code, "rate_limited");
    // Another loopback address is another client.
    let other = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()?;
    let r = other.get(&spaces).bearer_auth(&pc).send().await?;
    assert_eq!(r.status(), StatusCode::OK);
    hub.stop().await;
    Ok(())
}
