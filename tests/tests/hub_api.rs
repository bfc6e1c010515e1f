//! The hub's HTTP API and WebSocket against a real hub on loopback, on both database
//! backends: auth, commits and their broadcast, reading back manifests and blobs, force-sync,
//! outside bumps, and every kind of bad input.

use anyhow::Context;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use synchub_protocol::{
    ApiError, BlobList, CommitResponse, DEFAULT_SPACE, Head, HubFrame, Manifest, Role, Sha256Hex,
    SyncLogEntry, pack,
};
use synchub_tests::backend_matrix;
use synchub_tests::fixtures::{self, commit, http, put_blob};
use synchub_tests::hub::{Backend, TestHub, WsAgent, fs_blob_path, ws_connect};
use synchub_tests::requests::{in_default_space, refusal};

const WAIT: Duration = Duration::from_secs(10);

async fn commit_broadcast_and_read_back(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let mut sockets = join_all((0..4).map(|_| WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE])))
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = fixtures::head(&hub, &agent).await?;
    assert_eq!(start.version, 1);
    assert_eq!(start.data_hash, Sha256Hex::empty());
    assert_eq!(sockets[0].welcome_heads, vec![start.clone()]);

    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("Brașov/Școala_{i}.json"),
                format!("{{\"n\":{i}}}").into_bytes(),
            )
        })
        .chain([("arhiva/big.bin".to_string(), vec![7u8; 300_000])])
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (status, body) = commit(&hub, &agent, 1, &refs, &[]).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let new: CommitResponse = serde_json::from_value(body)?;
    assert_eq!(new.head.version, 2);
    assert!(!new.head.forced);

    for s in &mut sockets {
        let h = s.next_sync_required(WAIT).await?;
        assert_eq!(h, new.head);
    }

    // The manifest hashes to the announced data_hash and names every file.
    let bytes = hub
        .get_bytes(&in_default_space("/versions/2/manifest"), &agent)
        .await?;
    assert_eq!(Sha256Hex::of(&bytes), new.head.data_hash);
    let manifest = Manifest::from_canonical(&bytes, 1000)?;
    assert_eq!(manifest.len(), files.len());

    // Every blob reads back byte for byte, one by one and in one pack.
    for (path, body) in &files {
        let e = manifest.get(path).context("path missing")?;
        let got = hub
            .get(&format!("/blobs/{}", e.sha256), &agent)
            .send()
            .await?;
        assert_eq!(got.status(), StatusCode::OK);
        assert!(
            got.headers()["cache-control"]
                .to_str()?
                .contains("immutable")
        );
        assert_eq!(&got.bytes().await?[..], &body[..]);
    }
    let list = BlobList {
        sha256: manifest
            .entries()
            .iter()
            .map(|e| e.sha256.clone())
            .collect(),
    };
    let packed = hub
        .post("/blobs/pack", &agent, &list)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let mut rest = &packed[..];
    for e in manifest.entries() {
        let nl = rest.iter().position(|b| *b == b'\n').context("header")?;
        let (hash, size) = pack::parse_header(&rest[..=nl])?;
        assert_eq!(hash, e.sha256);
        let blob = &rest[nl + 1..nl + 1 + size as usize];
        assert_eq!(Sha256Hex::of(blob), e.sha256);
        rest = &rest[nl + 1 + size as usize..];
    }
    assert!(rest.is_empty());

    // Range reads for resume.
    let big = manifest.get("arhiva/big.bin").unwrap();
    let big_blob = format!("/blobs/{}", big.sha256);
    let part = hub
        .get(&big_blob, &agent)
        .header("range", "bytes=299990-")
        .send()
        .await?;
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        part.headers()["content-range"],
        "bytes 299990-299999/300000"
    );
    assert_eq!(part.bytes().await?.len(), 10);
    let beyond = hub
        .get(&big_blob, &agent)
        .header("range", "bytes=300000-")
        .send()
        .await?;
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // A delete makes the next version; an identical commit makes none.
    let (status, body) = commit(&hub, &agent, 2, &[], &["arhiva/big.bin"]).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["head"]["version"], 3);
    let (status, body) = commit(&hub, &agent, 3, &[(&files[0].0, &files[0].1)], &[]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["head"]["version"], 3);

    // Versions are listed for admins, newest first.
    let versions: Vec<Value> = hub
        .get_json(&in_default_space("/versions"), &hub.admin_token)
        .await?;
    assert_eq!(versions[0]["version"], 3);
    assert_eq!(versions.len(), 3);
    hub.stop().await;
    Ok(())
}

async fn head_etag_and_304(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let head = in_default_space("/head");
    let first = hub.get(&head, &agent).send().await?;
    let etag = first.headers()["etag"].clone();
    let again = hub
        .get(&head, &agent)
        .header("if-none-match", etag.clone())
        .send()
        .await?;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    commit(&hub, &agent, 1, &[("a.txt", b"a")], &[]).await?;
    let moved = hub
        .get(&head, &agent)
        .header("if-none-match", etag)
        .send()
        .await?;
    assert_eq!(moved.status(), StatusCode::OK);
    let h: Head = moved.json().await?;
    assert_eq!(h.version, 2);
    hub.stop().await;
    Ok(())
}

async fn force_sync_reaches_every_socket(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?);
    }
    // An agent may not force.
    let force = in_default_space("/force-sync");
    let r = hub
        .post(&force, &agent, &json!({"reason": "x"}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let reset = json!({"reason": "score sheets reset"});
    let r = hub.post(&force, &hub.admin_token, &reset).send().await?;
    assert_eq!(r.status(), StatusCode::CREATED);
    for s in &mut sockets {
        let h = s.next_sync_required(WAIT).await?;
        assert!(h.forced);
        assert_eq!(h.version, 2);
        assert_eq!(h.data_hash, Sha256Hex::empty());
        assert_eq!(h.reason.as_deref(), Some("score sheets reset"));
        assert_eq!(h.by.as_deref(), Some("admin"));
    }
    hub.stop().await;
    Ok(())
}

/// A plain SQL UPDATE of the version row, as system 1 or an operator would make it.
async fn outside_bump(hub: &TestHub) -> anyhow::Result<()> {
    let url = hub.config.database_url();
    let sql = "UPDATE sync_metadata SET version = version + 1, last_modified_by = 'old-app' \
               WHERE sync_key = 'global_version'";
    if url.starts_with("postgres") {
        let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
        sqlx::query(sql).execute(&mut c).await?;
    } else {
        let mut c = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await?;
        sqlx::query(sql).execute(&mut c).await?;
    }
    Ok(())
}

async fn outside_sql_bump_is_broadcast_as_forced(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    commit(&hub, &agent, 1, &[("a.txt", b"a")], &[]).await?;
    let mut socket = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    let before = socket.welcome_heads[0].clone();
    assert_eq!(before.version, 2);
    outside_bump(&hub).await?;
    let h = socket.next_sync_required(WAIT).await?;
    assert_eq!(h.version, 3);
    assert!(h.forced);
    assert_eq!(h.data_hash, before.data_hash, "same data, announced again");
    assert_eq!(h.by.as_deref(), Some("old-app"));
    // The HTTP head agrees, and the manifest of the new version is served.
    assert_eq!(fixtures::head(&hub, &agent).await?.version, 3);
    let r = hub
        .get(&in_default_space("/versions/3/manifest"), &agent)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    hub.stop().await;
    Ok(())
}

async fn reconnect_gets_current_head_in_welcome(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let socket = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    drop(socket);
    commit(&hub, &agent, 1, &[("a.txt", b"a")], &[]).await?;
    commit(&hub, &agent, 2, &[("b.txt", b"b")], &[]).await?;
    let socket = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    assert_eq!(socket.welcome_heads.len(), 1);
    assert_eq!(socket.welcome_heads[0].version, 3);
    hub.stop().await;
    Ok(())
}

async fn auth_matrix(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let limited = hub
        .token("qr-only", Role::Agent, Some(vec!["qr".into()]))
        .await?;
    let h = Sha256Hex::of(b"x");
    let routes: Vec<(reqwest::Method, String)> = vec![
        (reqwest::Method::GET, in_default_space("/head")),
        (
            reqwest::Method::GET,
            in_default_space("/versions/1/manifest"),
        ),
        (reqwest::Method::GET, in_default_space("/versions")),
        (reqwest::Method::POST, in_default_space("/commits")),
        (reqwest::Method::POST, in_default_space("/force-sync")),
        (reqwest::Method::GET, format!("/blobs/{h}")),
        (reqwest::Method::PUT, format!("/blobs/{h}")),
        (reqwest::Method::POST, "/blobs/pack".into()),
        (reqwest::Method::POST, "/blobs/missing".into()),
        (reqwest::Method::POST, "/sync-log".into()),
        (reqwest::Method::GET, "/sync-log".into()),
        (reqwest::Method::GET, "/clients".into()),
    ];
    for (method, path) in &routes {
        for token in [None, Some("shb_0000"), Some("")] {
            let mut req = http().request(method.clone(), hub.api(path));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await?;
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            let e: ApiError = r.json().await?;
            assert_eq!(e.code, "unauthorized");
        }
    }
    // Admin-only routes refuse an agent token.
    for (method, path) in [
        (reqwest::Method::GET, in_default_space("/versions")),
        (reqwest::Method::POST, in_default_space("/force-sync")),
        (reqwest::Method::GET, "/sync-log".to_string()),
        (reqwest::Method::GET, "/clients".to_string()),
    ] {
        let as_agent = hub.request(method.clone(), &path, &agent).json(&json!({}));
        assert_eq!(
            refusal(as_agent).await?,
            (StatusCode::FORBIDDEN, "forbidden".into()),
            "{method} {path}"
        );
        let r = hub
            .request(method.clone(), &path, &hub.admin_token)
            .json(&json!({}))
            .send()
            .await?;
        assert!(
            r.status().is_success(),
            "admin {method} {path}: {}",
            r.status()
        );
    }
    // A token limited to another space.
    let r = hub.get(&in_default_space("/head"), &limited).send().await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (status, body) = commit(&hub, &limited, 1, &[("a", b"a")], &[]).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // The WebSocket upgrade needs a token too; a limited token cannot follow another space.
    assert!(ws_connect(&hub.ws_url(), None).await.is_err());
    assert!(ws_connect(&hub.ws_url(), Some("shb_nope")).await.is_err());
    let refused = WsAgent::connect(&hub, &limited, &[DEFAULT_SPACE]).await;
    assert!(refused.is_err(), "limited token followed another space");

    // Revoking a token closes its live sockets and refuses its requests.
    let mut live = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    assert!(hub.state().store.revoke_token("pc").await?);
    let gone = hub
        .state()
        .tokens
        .reload(hub.state().store.as_ref())
        .await?;
    hub.state().clients.revoke(&gone);
    let (close, frames) = live.until_closed(WAIT).await?;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1008));
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, HubFrame::Error { code, .. } if code == "unauthorized"))
    );
    let r = hub.get(&in_default_space("/head"), &agent).send().await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    hub.stop().await;
    Ok(())
}

async fn revoke_from_another_process_closes_sockets(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let mut live = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    // Another store handle, as `synchub token revoke` would open.
    let other = synchub_hub::store::open(&hub.config.database_url()).await?;
    assert!(other.revoke_token("pc").await?);
    let (close, _) = live.until_closed(WAIT).await?;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1008));
    hub.stop().await;
    Ok(())
}

async fn bad_input_is_refused(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let commits = in_default_space("/commits");
    let post_commit = |body: &Value| hub.post(&commits, &agent, body);
    let good = put_blob(&hub, &agent, b"hello").await?;

    // Hostile and malformed paths: 400 invalid_path, nothing committed.
    for path in [
        "../etc/passwd",
        "/abs",
        "a/../../b",
        "C:/x",
        "a\\b",
        "CON",
        "a/./b",
        "",
    ] {
        let req = json!({"base_version": 1, "puts": [{"path": path, "size": 5, "sha256": good}]});
        assert_eq!(
            refusal(post_commit(&req)).await?,
            (StatusCode::BAD_REQUEST, "invalid_path".into()),
            "{path:?}"
        );
    }
    let r = post_commit(&json!({"base_version": 1, "deletes": ["../x"]}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Malformed bodies: 400.
    for body in [
        "{",
        "[]",
        "{\"base_version\": \"one\"}",
        "{\"base_version\": 1, \"puts\": [{\"path\": \"a\", \"size\": 1, \"sha256\": \"zz\"}]}",
    ] {
        let raw = hub
            .request(reqwest::Method::POST, &commits, &agent)
            .header("content-type", "application/json")
            .body(body);
        assert_eq!(
            refusal(raw).await?,
            (StatusCode::BAD_REQUEST, "bad_request".into()),
            "{body}"
        );
    }
    // Duplicate paths, a size that lies, a blob never uploaded.
    let dup = json!({"base_version": 1, "puts": [
        {"path": "a", "size": 5, "sha256": good}, {"path": "a", "size": 5, "sha256": good}]});
    let r = post_commit(&dup).send().await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let lie = json!({"base_version": 1, "puts": [{"path": "a", "size": 6, "sha256": good}]});
    let r = post_commit(&lie).send().await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let absent = json!({"base_version": 1, "puts": [{"path": "a", "size": 1, "sha256": Sha256Hex::of(b"never")}]});
    assert_eq!(
        refusal(post_commit(&absent)).await?,
        (StatusCode::BAD_REQUEST, "missing_blobs".into())
    );
    // Base versions that do not exist.
    let r = post_commit(&json!({"base_version": 99})).send().await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        fixtures::head(&hub, &agent).await?.version,
        1,
        "nothing was committed"
    );

    // Bad hashes in URLs: 400 invalid_hash.
    for bad in ["zz", "..%2F..%2Fetc%2Fpasswd", &"A".repeat(64)] {
        assert_eq!(
            refusal(hub.get(&format!("/blobs/{bad}"), &agent)).await?,
            (StatusCode::BAD_REQUEST, "invalid_hash".into()),
            "{bad}"
        );
    }
    // A blob whose bytes do not match: 422, nothing stored.
    let claimed = Sha256Hex::of(b"the real bytes");
    let claimed_blob = format!("/blobs/{claimed}");
    assert_eq!(
        refusal(hub.put(&claimed_blob, &agent, "other bytes")).await?,
        (StatusCode::UNPROCESSABLE_ENTITY, "hash_mismatch".into())
    );
    let r = hub.get(&claimed_blob, &agent).send().await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(!fs_blob_path(hub.data_dir(), claimed.as_str()).exists());

    // A truncated upload (the connection closes before Content-Length bytes): nothing stored.
    let body = vec![1u8; 100_000];
    let hash = Sha256Hex::of(&body);
    let addr = hub.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await?;
    use tokio::io::AsyncWriteExt;
    let headers = format!(
        "PUT /api/v1/blobs/{hash} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {agent}\r\ncontent-length: 100000\r\n\r\n"
    );
    tcp.write_all(headers.as_bytes()).await?;
    tcp.write_all(&body[..40_000]).await?;
    tcp.shutdown().await?;
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = hub.get(&format!("/blobs/{hash}"), &agent).send().await?;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a truncated upload became visible"
    );

    // Unknown space, version and route: 404 with a code.
    for path in [
        "/spaces/nope/head".to_string(),
        in_default_space("/versions/42/manifest"),
        "/no/such/route".to_string(),
        format!("/blobs/{}", Sha256Hex::of(b"absent")),
    ] {
        assert_eq!(
            refusal(hub.get(&path, &agent)).await?,
            (StatusCode::NOT_FOUND, "not_found".into()),
            "{path}"
        );
    }
    let r = hub.get("/spaces/..%2F..%2Fetc/head", &agent).send().await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // A pack naming a missing blob.
    let some_absent = BlobList {
        sha256: vec![good.clone(), Sha256Hex::of(b"absent")],
    };
    let r = hub.post("/blobs/pack", &agent, &some_absent).send().await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // /blobs/missing answers which are absent.
    let r: BlobList = hub
        .post("/blobs/missing", &agent, &some_absent)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r.sha256, vec![Sha256Hex::of(b"absent")]);
    hub.stop().await;
    Ok(())
}

async fn conflicting_commit_gets_409(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let (s, _) = commit(&hub, &agent, 1, &[("a.txt", b"1"), ("b.txt", b"1")], &[]).await?;
    assert_eq!(s, StatusCode::CREATED);
    // PC 1 edits a.txt on version 2.
    let (s, _) = commit(&hub, &agent, 2, &[("a.txt", b"pc1")], &[]).await?;
    assert_eq!(s, StatusCode::CREATED);
    // PC 2, still on version 2, edits a.txt too: conflict naming the path.
    let (s, body) = commit(&hub, &agent, 2, &[("a.txt", b"pc2"), ("c.txt", b"x")], &[]).await?;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let e: ApiError = serde_json::from_value(body)?;
    assert_eq!(e.code, "conflict");
    assert_eq!(e.conflicts, vec!["a.txt"]);
    assert_eq!(e.head.map(|h| h.version), Some(3));
    // PC 2 touching only other paths on the old base is merged onto the head.
    let (s, body) = commit(&hub, &agent, 2, &[("c.txt", b"x")], &["b.txt"]).await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let manifest = hub
        .get_bytes(&in_default_space("/versions/4/manifest"), &agent)
        .await?;
    let m = Manifest::from_canonical(&manifest, 100)?;
    let paths: Vec<&str> = m.entries().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["a.txt", "c.txt"]);
    assert_eq!(m.get("a.txt").unwrap().sha256, Sha256Hex::of(b"pc1"));
    hub.stop().await;
    Ok(())
}

async fn sync_log_reports(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let report = |id: &str, status: &str| {
        json!({"report_id": id, "client_id": "pc-1", "space": DEFAULT_SPACE,
               "sync_type": "download", "status": status, "version": 2, "items_synced": 508,
               "bytes": 2_500_000, "duration_ms": 420, "user": "ana"})
    };
    let post = |body: Value| hub.post("/sync-log", &agent, &body).send();
    assert_eq!(
        post(report("r1", "success")).await?.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        post(report("r1", "success")).await?.status(),
        StatusCode::OK,
        "idempotent"
    );
    let mut failed = report("r2", "failed");
    failed["error_message"] = json!("x".repeat(10_000));
    assert_eq!(post(failed).await?.status(), StatusCode::CREATED);
    // Reports over the socket are acknowledged.
    let mut ws = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    let frame = json!({"type": "report", "report_id": "r3", "client_id": "pc-2", "space": DEFAULT_SPACE,
                       "sync_type": "force_sync", "status": "success"});
    ws.send_text(frame.to_string()).await?;
    assert_eq!(
        ws.next_frame(WAIT).await?,
        HubFrame::ReportAck {
            report_id: "r3".into()
        }
    );
    // Bad reports.
    for bad in [
        json!({"report_id": "", "client_id": "c", "space": DEFAULT_SPACE, "sync_type": "download", "status": "success"}),
        json!({"report_id": "x", "client_id": "c", "space": "../x", "sync_type": "download", "status": "success"}),
        json!({"report_id": "x", "client_id": "c", "space": DEFAULT_SPACE, "sync_type": "teleport", "status": "success"}),
        json!({"report_id": "x", "client_id": "c", "space": DEFAULT_SPACE, "sync_type": "download", "status": "success", "synced_at": "yesterday"}),
    ] {
        assert_eq!(
            post(bad.clone()).await?.status(),
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    let list = |path| hub.get_json::<Vec<SyncLogEntry>>(path, &hub.admin_token);
    let all = list("/sync-log").await?;
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].report_id.as_deref(), Some("r3"), "newest first");
    let failed = list("/sync-log?status=failed").await?;
    assert_eq!(failed.len(), 1);
    assert!(failed[0].error_message.as_ref().unwrap().len() <= 4000);
    let pc1 = list("/sync-log?client_id=pc-1").await?;
    assert_eq!(pc1.len(), 2);
    assert_eq!(pc1[1].items_synced, Some(508));
    assert_eq!(pc1[1].user.as_deref(), Some("ana"));
    hub.stop().await;
    Ok(())
}

async fn malformed_and_oversized_frames_close_only_that_socket(
    backend: Backend,
) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let mut bystander = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;

    let mut bad = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    bad.send_text("{not json".into()).await?;
    let (close, frames) = bad.until_closed(WAIT).await?;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1008));
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, HubFrame::Error { code, .. } if code == "malformed_frame"))
    );

    let mut big = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    let huge = json!({"type": "status", "space": DEFAULT_SPACE, "state": "failed", "version": 1,
                      "target": 2, "error": "x".repeat(200_000), "retry_at": null});
    let _ = big.send_text(huge.to_string()).await;
    let (close, frames) = big.until_closed(WAIT).await?;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1009));
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, HubFrame::Error { code, .. } if code == "frame_too_large")),
        "{frames:?}"
    );

    // A first frame that is not hello, and a hello for an unknown space.
    let mut raw = ws_connect(&hub.ws_url(), Some(&agent)).await?;
    use futures::SinkExt;
    raw.send(tokio_tungstenite::tungstenite::Message::Text(
        "{\"type\":\"pong\"}".into(),
    ))
    .await?;
    let mut w = WsAgent {
        socket: raw,
        welcome_heads: vec![],
    };
    let (close, _) = w.until_closed(WAIT).await?;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1008));
    assert!(
        WsAgent::connect(&hub, &agent, &["no-such-space"])
            .await
            .is_err()
    );

    // The hub goes on serving everyone else.
    commit(&hub, &agent, 1, &[("a.txt", b"a")], &[]).await?;
    assert_eq!(bystander.next_sync_required(WAIT).await?.version, 2);
    hub.stop().await;
    Ok(())
}

async fn status_frames_show_in_clients_listing(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let mut ws = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    ws.send_text(
        json!({"type": "status", "space": DEFAULT_SPACE, "state": "downloading", "version": 1,
               "target": 2, "files_done": 3, "files_total": 508, "bytes_done": 1, "bytes_total": 9})
        .to_string(),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let clients: Vec<Value> = hub.get_json("/clients", &hub.admin_token).await?;
        if clients.len() == 1 && clients[0]["spaces"][0]["state"] == "downloading" {
            assert_eq!(clients[0]["spaces"][0]["files_total"], 508);
            assert_eq!(clients[0]["token_name"], "pc");
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "status not shown: {clients:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.stop().await;
    Ok(())
}

async fn shutdown_closes_sockets_going_away(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let mut ws = WsAgent::connect(&hub, &agent, &[DEFAULT_SPACE]).await?;
    let stopping = tokio::spawn(hub.stop());
    let (close, _) = ws.until_closed(WAIT).await?;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
    stopping.await?;
    Ok(())
}

async fn spaces_listing_and_dashboard(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_with_backend_and(backend, |c| c.spaces.push("qr".into())).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let limited = hub
        .token("qr-only", Role::Agent, Some(vec!["qr".into()]))
        .await?;
    let list = |token| hub.get_json::<Vec<Head>>("/spaces", token);
    let all: Vec<String> = list(&agent).await?.into_iter().map(|h| h.space).collect();
    assert_eq!(all, vec!["global_version", "qr"]);
    let qr: Vec<String> = list(&limited).await?.into_iter().map(|h| h.space).collect();
    assert_eq!(qr, vec!["qr"]);
    let page = http().get(format!("{}/", hub.url)).send().await?;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()?
            .starts_with("text/html")
    );
    let html = page.text().await?;
    assert!(html.contains("Force sync") && html.contains("/sync-log"));
    hub.stop().await;
    Ok(())
}

backend_matrix!(
    [sqlite => Backend::Sqlite, postgres => Backend::Postgres]
    spaces_listing_and_dashboard,
    commit_broadcast_and_read_back,
    head_etag_and_304,
    force_sync_reaches_every_socket,
    outside_sql_bump_is_broadcast_as_forced,
    reconnect_gets_current_head_in_welcome,
    auth_matrix,
    revoke_from_another_process_closes_sockets,
    bad_input_is_refused,
    conflicting_commit_gets_409,
    sync_log_reports,
    malformed_and_oversized_frames_close_only_that_socket,
    status_frames_show_in_clients_listing,
    shutdown_closes_sockets_going_away,
);

#[tokio::test]
async fn oversized_blob_and_body_get_413() -> anyhow::Result<()> {
    let hub = TestHub::start_with(|c| {
        c.limits.max_blob_bytes = 1000;
        c.limits.max_request_bytes = 2000;
    })
    .await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let body = vec![0u8; 5000];
    let blob = format!("/blobs/{}", Sha256Hex::of(&body));
    assert_eq!(
        refusal(hub.put(&blob, &agent, body.clone())).await?,
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large".into())
    );
    // Chunked (no Content-Length): the limit is enforced while streaming.
    let stream = futures::stream::iter((0..5).map(|_| Ok::<_, std::io::Error>(vec![0u8; 1000])));
    let r = hub
        .put(&blob, &agent, reqwest::Body::wrap_stream(stream))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let big_commit = json!({"base_version": 1, "message": "x".repeat(5000)});
    assert_eq!(
        refusal(hub.post(&in_default_space("/commits"), &agent, &big_commit)).await?,
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large".into())
    );
    hub.stop().await;
    Ok(())
}
