//! `synchub-agent publish` as an admin runs it: `--mirror` makes the space identical to a
//! folder (deletions included), `--delete PATH` removes files, and every publish is reported
//! to `sync_log` with the publishing token's name and the person's user name; `--reupload`
//! repairs a blob damaged on the hub; a blob the hub's garbage collector removed between its
//! upload and the commit (`missing_blobs`) is uploaded again and the commit retried.

use anyhow::{Context, ensure};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use synchub_client::HeadCheck;
use synchub_client::HubApi;
use synchub_protocol::{Role, Sha256Hex, SyncLogEntry};
use synchub_tests::fixtures::http;
use synchub_tests::hub::TestHub;

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;

/// Runs `synchub-agent publish ARGS` against `hub` with `token`; its stdout, or its stderr as
/// the error.
fn publish(hub: &TestHub, token: &str, args: &[&str]) -> anyhow::Result<String> {
    publish_to(&hub.url, token, args)
}

/// [`publish`] through the hub URL `url` (a proxy in front of it).
fn publish_to(url: &str, token: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_synchub-agent"))
        .args(["publish", "--hub", url, "--token", token])
        .args(args)
        .env("RUST_LOG", "warn")
        .env("USER", "maria")
        .env_remove("USERNAME")
        .env_remove("SYNCHUB_USER")
        .output()
        .context("running synchub-agent publish")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "publish {args:?} failed: {stderr}");
    Ok(stdout)
}

/// The paths of the space's current version.
async fn paths(hub: &TestHub, token: &str) -> anyhow::Result<Vec<String>> {
    let api = HubApi::new(vec![hub.url.clone()], token)?;
    let HeadCheck::Head { head, .. } = api.head(SPACE, None).await? else {
        anyhow::bail!("304 without an ETag");
    };
    let manifest = synchub_client::fetch_manifest(&api, &head).await?;
    Ok(manifest.entries().iter().map(|e| e.path.clone()).collect())
}

fn write(dir: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    Ok(std::fs::write(dir.join(name), body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_and_delete_remove_files_and_reports_say_who() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let token = hub.token("publisher-cluj", Role::Agent, None).await?;
    let src = tempfile::tempdir()?;
    let dir = src.path().to_str().context("utf-8 temp path")?;
    for name in ["a.json", "b.json", "c.json"] {
        write(src.path(), name, name)?;
    }
    publish(&hub, &token, &[dir])?;
    ensure!(paths(&hub, &token).await? == ["a.json", "b.json", "c.json"]);

    // A file removed from the folder: a plain publish keeps it, --mirror deletes it.
    std::fs::remove_file(src.path().join("b.json"))?;
    let out = publish(&hub, &token, &[dir])?;
    ensure!(out.contains("nothing to publish"), "{out}");
    let out = publish(&hub, &token, &["--mirror", dir])?;
    ensure!(out.contains("deleted 1"), "{out}");
    ensure!(paths(&hub, &token).await? == ["a.json", "c.json"]);

    // --delete alone, and a path the space lacks is an error that changes nothing.
    let out = publish(&hub, &token, &["--delete", "c.json"])?;
    ensure!(out.contains("deleted 1"), "{out}");
    ensure!(paths(&hub, &token).await? == ["a.json"]);
    let err = publish(&hub, &token, &["--delete", "nope.json"]).unwrap_err();
    ensure!(err.to_string().contains("nope.json"), "{err}");
    ensure!(paths(&hub, &token).await? == ["a.json"]);

    // A blob damaged on the hub's disk: --reupload sends the bytes again and the hub keeps
    // the good copy.
    let sha = synchub_protocol::Sha256Hex::of(b"a.json");
    let stored = synchub_tests::hub::fs_blob_path(hub.data_dir(), sha.as_str());
    std::fs::write(&stored, b"rotten")?;
    let a_json = src.path().join("a.json");
    let out = publish(
        &hub,
        &token,
        &["--reupload", a_json.to_str().context("utf-8")?],
    )?;
    ensure!(out.contains("1 blob(s) uploaded again"), "{out}");
    ensure!(
        std::fs::read(&stored)? == b"a.json",
        "the damaged copy stayed"
    );

    let log = hub.sync_log("limit=100").await?;
    let changes: Vec<&SyncLogEntry> = log
        .iter()
        .filter(|e| e.sync_type == "upload" && e.status == "success")
        .filter(|e| e.items_synced.unwrap_or(0) > 0)
        .collect();
    ensure!(changes.len() == 3, "{log:#?}");
    for e in changes {
        let client = e.client_id.as_deref().unwrap_or_default();
        ensure!(client.contains("publisher-cluj"), "no token name: {e:?}");
        ensure!(e.user.as_deref() == Some("maria"), "no user: {e:?}");
    }
    Ok(())
}

/// A proxy in front of `hub` that deletes `blob` from the hub's blob folder before it passes
/// on the first commit: what the garbage collector does to an upload whose commit comes late.
/// Returns its URL and the number of commits that went through it.
async fn sweeping_proxy(
    hub: &TestHub,
    blob: &Sha256Hex,
) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    use axum::response::IntoResponse;
    let commits = Arc::new(AtomicUsize::new(0));
    let target = hub.url.clone();
    let stored = synchub_tests::hub::fs_blob_path(hub.data_dir(), blob.as_str());
    let seen = commits.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (target, stored, seen) = (target.clone(), stored.clone(), seen.clone());
        async move {
            let (parts, body) = req.into_parts();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let commit = parts.method == axum::http::Method::POST && path.ends_with("/commits");
            if commit && seen.fetch_add(1, Ordering::SeqCst) == 0 {
                let _ = std::fs::remove_file(&stored);
            }
            let mut forward = http().request(parts.method.clone(), format!("{target}{path}"));
            for (name, value) in &parts.headers {
                if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
                    forward = forward.header(name, value);
                }
            }
            let body = reqwest::Body::wrap_stream(body.into_data_stream());
            match forward.body(body).send().await {
                Ok(answer) => {
                    let status = answer.status();
                    let kind = answer
                        .headers()
                        .get(axum::http::header::CONTENT_TYPE)
                        .cloned();
                    let bytes = answer.bytes().await.unwrap_or_default();
                    let mut out = axum::response::Response::new(axum::body::Body::from(bytes));
                    *out.status_mut() = status;
                    if let Some(kind) = kind {
                        out.headers_mut()
                            .insert(axum::http::header::CONTENT_TYPE, kind);
                    }
                    out
                }
                Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, commits))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_swept_before_the_commit_is_uploaded_again() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let token = hub.token("publisher", Role::Agent, None).await?;
    let src = tempfile::tempdir()?;
    write(src.path(), "late.json", "swept meanwhile")?;
    let blob = Sha256Hex::of(b"swept meanwhile");
    let (url, commits) = sweeping_proxy(&hub, &blob).await?;
    let file = src.path().join("late.json");
    let out = publish_to(&url, &token, &[file.to_str().context("utf-8")?])?;
    ensure!(out.contains("published 1 file(s)"), "{out}");
    ensure!(
        commits.load(Ordering::SeqCst) == 2,
        "one refused commit, one retry"
    );
    ensure!(paths(&hub, &token).await? == ["late.json"]);
    let stored = synchub_tests::hub::fs_blob_path(hub.data_dir(), blob.as_str());
    ensure!(
        std::fs::read(&stored)? == b"swept meanwhile",
        "the blob is stored again"
    );
    Ok(())
}
