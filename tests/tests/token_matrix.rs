//! Who may call what, on both database backends: every route of the hub against five callers
//! (no token, a token of another space, a read-only token, a publishing token, an admin
//! token), each answer's status checked; then what the statuses do not show: blob lists and
//! packs see only the caller's spaces, a blob a token uploaded itself is readable by it, a
//! client id reports under one token only (the first to report it or to say `hello` with it),
//! and every admin action is in the audit log.

use anyhow::Context;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use synchub_protocol::{
    ApiError, AuditEntry, BlobList, CommitRequest, DEFAULT_SPACE, ManifestEntry, Role, Sha256Hex,
    SyncLogEntry,
};
use synchub_tests::backend_matrix;
use synchub_tests::fixtures::{http, put_blob};
use synchub_tests::hub::{Backend, TestHub, WsAgent};

const S: &str = DEFAULT_SPACE;
const OTHER: &str = "other";

/// The callers, in the order of each row's expected statuses.
const CALLERS: [&str; 5] = ["no token", "other space", "read", "publish", "admin"];

struct Callers {
    /// `publish` on [`OTHER`] only.
    wrong: String,
    /// `read` on [`S`].
    read: String,
    /// `publish` on [`S`].
    publish: String,
    admin: String,
}

impl Callers {
    fn token(&self, i: usize) -> Option<&str> {
        [
            None,
            Some(&self.wrong),
            Some(&self.read),
            Some(&self.publish),
            Some(&self.admin),
        ][i]
            .map(String::as_str)
    }
}

/// Token names as the hub knows them.
const WRONG: &str = "pc-other";
const READ: &str = "pc-read";
const PUBLISH: &str = "pc-publish";
const ADMIN: &str = "admin";

async fn start(backend: Backend) -> anyhow::Result<(TestHub, Callers)> {
    let hub = TestHub::start_with_backend_and(backend, |c| {
        c.spaces = vec![S.into(), OTHER.into()];
    })
    .await?;
    let callers = Callers {
        wrong: hub
            .token(WRONG, Role::Publish, Some(vec![OTHER.into()]))
            .await?,
        read: hub.token(READ, Role::Read, Some(vec![S.into()])).await?,
        publish: hub
            .token(PUBLISH, Role::Publish, Some(vec![S.into()]))
            .await?,
        admin: hub.admin_token.clone(),
    };
    Ok((hub, callers))
}

/// Commits `files` to `space` on top of its head; returns the new version.
async fn commit_to(
    hub: &TestHub,
    token: &str,
    space: &str,
    files: &[(&str, &[u8])],
) -> anyhow::Result<u64> {
    let mut puts = Vec::new();
    for (path, body) in files {
        puts.push(ManifestEntry {
            path: path.to_string(),
            size: body.len() as u64,
            sha256: put_blob(hub, token, body).await?,
        });
    }
    let base = head_version(hub, token, space).await?;
    let req = CommitRequest {
        base_version: base,
        puts,
        deletes: Vec::new(),
        message: None,
    };
    let r = http()
        .post(hub.api(&format!("/spaces/{space}/commits")))
        .bearer_auth(token)
        .json(&req)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "commit: {}", r.text().await?);
    let body: Value = r.json().await?;
    body["head"]["version"].as_u64().context("version")
}

async fn head_version(hub: &TestHub, token: &str, space: &str) -> anyhow::Result<u64> {
    let head: Value = http()
        .get(hub.api(&format!("/spaces/{space}/head")))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    head["version"].as_u64().context("version")
}

fn held_change() -> Value {
    json!({"deletes": 40, "replaces": 0, "total": 50, "held_at": "2026-11-26T10:00:00Z"})
}

/// A report of caller `i`'s PC, `pc-{i}`.
fn report(i: usize) -> Value {
    report_as(i, &format!("pc-{i}"))
}

fn report_as(i: usize, client: &str) -> Value {
    json!({"report_id": format!("matrix-{i}"), "client_id": client, "space": S,
           "sync_type": "download", "status": "success", "version": 2})
}

/// One row: a request (made for caller `i`, with its token added after) and the status each
/// caller gets.
struct Row {
    what: String,
    expect: [u16; 5],
    request: Box<dyn Fn(usize) -> RequestBuilder + Send + Sync>,
}

fn row(
    what: impl Into<String>,
    expect: [u16; 5],
    request: impl Fn(usize) -> RequestBuilder + Send + Sync + 'static,
) -> Row {
    Row {
        what: what.into(),
        expect,
        request: Box::new(request),
    }
}

/// The table. `a` is a blob of [`S`], `o` one of [`OTHER`].
fn rows(hub: &TestHub, a: &Sha256Hex, o: &Sha256Hex) -> Vec<Row> {
    let (root, api) = (hub.url.clone(), hub.api(""));
    let get = move |path: &str| {
        let url = format!("{api}{path}");
        move |_| http().get(&url)
    };
    let api = hub.api("");
    let send = move |method: Method, path: String, body: Value| {
        let url = format!("{api}{path}");
        move |_| http().request(method.clone(), &url).json(&body)
    };
    let (u1, u2, u3, u4, u5) = (
        hub.api(&format!("/spaces/{S}/commits")),
        hub.api(&format!("/blobs/{a}")),
        hub.api("/tokens"),
        hub.api("/sync-log"),
        root,
    );
    vec![
        row("GET /spaces", [401, 200, 200, 200, 200], get("/spaces")),
        row(
            "GET head",
            [401, 403, 200, 200, 200],
            get(&format!("/spaces/{S}/head")),
        ),
        row(
            "GET manifest",
            [401, 403, 200, 200, 200],
            get(&format!("/spaces/{S}/versions/2/manifest")),
        ),
        row(
            "GET versions",
            [401, 403, 403, 403, 200],
            get(&format!("/spaces/{S}/versions")),
        ),
        // At version 2, the head until the force-sync and rollback rows below.
        row(
            "POST commit (nothing to change)",
            [401, 403, 403, 200, 200],
            move |_| {
                http()
                    .post(&u1)
                    .json(&json!({"base_version": 2, "puts": [], "deletes": []}))
            },
        ),
        row("GET blob of S", [401, 404, 200, 200, 200], {
            let u = u2.clone();
            move |_| http().get(&u)
        }),
        row("HEAD blob of S", [401, 404, 200, 200, 200], {
            let u = u2.clone();
            move |_| http().head(&u)
        }),
        row(
            "GET blob of OTHER",
            [401, 200, 404, 404, 200],
            get(&format!("/blobs/{o}")),
        ),
        row("PUT a new blob", [401, 201, 403, 201, 201], {
            let api = hub.api("");
            move |i| {
                let body = format!("upload by caller {i}").into_bytes();
                http()
                    .put(format!("{api}/blobs/{}", Sha256Hex::of(&body)))
                    .body(body)
            }
        }),
        row(
            "POST pack",
            [401, 404, 200, 200, 200],
            send(Method::POST, "/blobs/pack".into(), json!({"sha256": [a]})),
        ),
        row(
            "POST missing",
            [401, 200, 200, 200, 200],
            send(
                Method::POST,
                "/blobs/missing".into(),
                json!({"sha256": [a]}),
            ),
        ),
        row("POST report", [401, 403, 201, 201, 201], {
            let u = u4.clone();
            move |i| http().post(&u).json(&report(i))
        }),
        row("GET sync-log", [401, 403, 403, 403, 200], get("/sync-log")),
        row("GET events", [401, 403, 403, 403, 200], get("/events")),
        row("GET tokens", [401, 403, 403, 403, 200], get("/tokens")),
        row("POST tokens", [401, 403, 403, 403, 201], move |i| {
            http()
                .post(&u3)
                .json(&json!({"name": format!("made-by-{i}"), "can": "read"}))
        }),
        row(
            "DELETE token",
            [401, 403, 403, 403, 204],
            send(Method::DELETE, "/tokens/victim".into(), Value::Null),
        ),
        row("GET clients", [401, 403, 403, 403, 200], get("/clients")),
        row("GET audit", [401, 403, 403, 403, 200], get("/audit")),
        row("GET held", [401, 403, 403, 403, 200], get("/held")),
        // Each caller holds a change of its own PC, `pc-{i}`.
        row("PUT held change", [401, 403, 403, 200, 200], {
            let api = hub.api("");
            move |i| {
                http()
                    .put(format!("{api}/spaces/{S}/held/pc-{i}"))
                    .json(&held_change())
            }
        }),
        row(
            "POST approve",
            [401, 403, 403, 403, 204],
            send(
                Method::POST,
                format!("/spaces/{S}/held/pc-3/approve"),
                Value::Null,
            ),
        ),
        row(
            "POST reject",
            [401, 403, 403, 403, 204],
            send(
                Method::POST,
                format!("/spaces/{S}/held/pc-4/reject"),
                Value::Null,
            ),
        ),
        row("DELETE held change", [401, 403, 403, 204, 204], {
            let api = hub.api("");
            move |i| http().delete(format!("{api}/spaces/{S}/held/pc-{i}"))
        }),
        row(
            "POST force-sync",
            [401, 403, 403, 403, 201],
            send(
                Method::POST,
                format!("/spaces/{S}/force-sync"),
                json!({"reason": "matrix"}),
            ),
        ),
        row(
            "POST rollback",
            [401, 403, 403, 403, 201],
            send(
                Method::POST,
                format!("/spaces/{S}/rollback"),
                json!({"to_version": 2}),
            ),
        ),
        row("GET /metrics", [401, 403, 403, 403, 200], {
            let u = format!("{u5}/metrics");
            move |_| http().get(&u)
        }),
        row("GET /readyz", [200, 200, 200, 200, 200], {
            let u = format!("{u5}/readyz");
            move |_| http().get(&u)
        }),
        row(
            "GET /api/v1/ws without upgrade",
            [401, 400, 400, 400, 400],
            get("/ws"),
        ),
    ]
}

async fn every_route_for_every_caller(backend: Backend) -> anyhow::Result<()> {
    let (hub, callers) = start(backend).await?;
    commit_to(&hub, &callers.admin, S, &[("a.txt", b"in S")]).await?;
    commit_to(&hub, &callers.admin, OTHER, &[("o.txt", b"in OTHER")]).await?;
    let (a, o) = (Sha256Hex::of(b"in S"), Sha256Hex::of(b"in OTHER"));
    hub.token("victim", Role::Read, None).await?;

    let mut wrong = Vec::new();
    for row in rows(&hub, &a, &o) {
        for (i, expected) in row.expect.iter().enumerate() {
            let mut request = (row.request)(i);
            if let Some(token) = callers.token(i) {
                request = request.bearer_auth(token);
            }
            let r = request
                .timeout(std::time::Duration::from_secs(10))
                .send()
                .await
                .with_context(|| format!("{} as {}", row.what, CALLERS[i]))?;
            if r.status().as_u16() != *expected {
                wrong.push(format!(
                    "{} as {}: {} (expected {expected})",
                    row.what,
                    CALLERS[i],
                    r.status()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "wrong statuses:\n{}", wrong.join("\n"));

    // The socket: a token follows only spaces it may read.
    assert!(WsAgent::connect(&hub, &callers.wrong, &[S]).await.is_err());
    for token in [&callers.read, &callers.publish, &callers.admin] {
        WsAgent::connect(&hub, token, &[S]).await?;
    }
    Ok(())
}

async fn missing(hub: &TestHub, token: &str, hashes: &[&Sha256Hex]) -> anyhow::Result<BlobList> {
    Ok(http()
        .post(hub.api("/blobs/missing"))
        .bearer_auth(token)
        .json(&json!({ "sha256": hashes }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn blobs_are_scoped_to_readable_spaces(backend: Backend) -> anyhow::Result<()> {
    let (hub, callers) = start(backend).await?;
    commit_to(&hub, &callers.admin, S, &[("a.txt", b"in S")]).await?;
    let a = Sha256Hex::of(b"in S");
    let absent = Sha256Hex::of(b"nobody has this");

    // Another space's token learns nothing: the blob is "missing" to it, as one nobody has.
    let seen = missing(&hub, &callers.wrong, &[&a, &absent]).await?;
    assert_eq!(seen.sha256, vec![a.clone(), absent.clone()]);
    let seen = missing(&hub, &callers.read, &[&a, &absent]).await?;
    assert_eq!(seen.sha256, vec![absent.clone()]);

    // Uploading it proves it has the bytes: from then on the blob is readable to that token
    // (a publish in progress reads back what it uploaded), and to no other.
    put_blob(&hub, &callers.wrong, b"in S").await?;
    let r = http()
        .get(hub.api(&format!("/blobs/{a}")))
        .bearer_auth(&callers.wrong)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await?[..], b"in S");
    let mine = put_blob(&hub, &callers.publish, b"not committed yet").await?;
    for (token, status) in [
        (&callers.publish, 200),
        (&callers.read, 404),
        (&callers.wrong, 404),
    ] {
        let r = http()
            .get(hub.api(&format!("/blobs/{mine}")))
            .bearer_auth(token)
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), status);
    }
    Ok(())
}

async fn a_client_id_reports_under_one_token(backend: Backend) -> anyhow::Result<()> {
    let (hub, callers) = start(backend).await?;
    let post = |token: &str, body: Value| {
        http()
            .post(hub.api("/sync-log"))
            .bearer_auth(token.to_owned())
            .json(&body)
            .send()
    };
    assert_eq!(
        post(&callers.read, report_as(1, "pc-a")).await?.status(),
        StatusCode::CREATED
    );
    // Another token cannot write rows (or held changes) in that PC's name.
    let r = post(&callers.publish, report_as(2, "pc-a")).await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let e: ApiError = r.json().await?;
    assert!(e.message.contains("another token"), "{e:?}");
    let r = http()
        .put(hub.api(&format!("/spaces/{S}/held/pc-a")))
        .bearer_auth(&callers.publish)
        .json(&held_change())
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Its own token keeps reporting under it, and a PC sharing the token has its own id.
    assert_eq!(
        post(&callers.read, report_as(3, "pc-a")).await?.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        post(&callers.read, report_as(4, "pc-b")).await?.status(),
        StatusCode::CREATED
    );
    let rows: Vec<SyncLogEntry> = http()
        .get(hub.api("/sync-log"))
        .bearer_auth(&callers.admin)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let ids: Vec<_> = rows.iter().map(|r| r.report_id.as_deref()).collect();
    assert_eq!(
        ids,
        vec![Some("matrix-4"), Some("matrix-3"), Some("matrix-1")]
    );
    Ok(())
}

/// A `hello` binds its client id to the socket's token, as a first report does: another token
/// cannot then report in that PC's name, even before the PC has reported anything.
async fn a_hello_binds_its_client_id(backend: Backend) -> anyhow::Result<()> {
    let (hub, callers) = start(backend).await?;
    let _socket = WsAgent::connect_as(&hub.ws_url(), &callers.read, "pc-hello", &[S]).await?;
    // The binding is made beside the welcome, not before it: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !hub.state().client_owners.contains_key("pc-hello") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the hello's client id was not bound within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = http()
        .post(hub.api("/sync-log"))
        .bearer_auth(&callers.publish)
        .json(&report_as(1, "pc-hello"))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http()
        .post(hub.api("/sync-log"))
        .bearer_auth(&callers.read)
        .json(&report_as(2, "pc-hello"))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::CREATED);
    Ok(())
}

async fn admin_actions_are_audited(backend: Backend) -> anyhow::Result<()> {
    let (hub, callers) = start(backend).await?;
    let admin = &callers.admin;
    let post = |path: String, body: Value| {
        http()
            .post(hub.api(&path))
            .bearer_auth(admin)
            .json(&body)
            .send()
    };
    post(format!("/spaces/{S}/force-sync"), json!({}))
        .await?
        .error_for_status()?;
    post(format!("/spaces/{S}/rollback"), json!({"to_version": 1}))
        .await?
        .error_for_status()?;
    post("/tokens".into(), json!({"name": "pc-new"}))
        .await?
        .error_for_status()?;
    http()
        .delete(hub.api("/tokens/pc-new"))
        .bearer_auth(admin)
        .send()
        .await?
        .error_for_status()?;
    let r = http()
        .put(hub.api(&format!("/spaces/{S}/held/pc-x")))
        .bearer_auth(&callers.publish)
        .json(&held_change())
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    post(format!("/spaces/{S}/held/pc-x/approve"), Value::Null)
        .await?
        .error_for_status()?;

    let log: Vec<AuditEntry> = http()
        .get(hub.api("/audit?limit=10"))
        .bearer_auth(admin)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let got: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|e| (e.who.as_str(), e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (ADMIN, "held_approve", format!("{S}/pc-x").as_str()),
            (ADMIN, "token_revoke", "pc-new"),
            (ADMIN, "token_create", "pc-new (read)"),
            (ADMIN, "rollback", format!("{S} v3 (data of v1)").as_str()),
            (ADMIN, "force_sync", format!("{S} v2").as_str()),
        ]
    );
    for e in &log {
        assert_eq!(e.from.as_deref(), Some("127.0.0.1"), "{e:?}");
        chrono::DateTime::parse_from_rfc3339(&e.at)?;
    }
    // The audit log is for admins only.
    let r = http()
        .get(hub.api("/audit"))
        .bearer_auth(&callers.publish)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    Ok(())
}

backend_matrix!(
    [sqlite => Backend::Sqlite, postgres => Backend::Postgres]
    every_route_for_every_caller,
    blobs_are_scoped_to_readable_spaces,
    a_client_id_reports_under_one_token,
    a_hello_binds_its_client_id,
    admin_actions_are_audited,
);
