//! `synchub-agent publish` as an admin runs it: `--mirror` makes the space identical to a
//! folder (deletions included), `--delete PATH` removes files, and every publish is reported
//! to `sync_log` with the publishing token's name and the person's user name; `--reupload`
//! repairs a blob damaged on the hub.

use anyhow::{Context, ensure};
use std::path::Path;
use std::process::Command;
use synchub_client::HeadCheck;
use synchub_client::HubApi;
use synchub_protocol::{Role, SyncLogEntry};
use synchub_tests::fixtures::http;
use synchub_tests::hub::TestHub;

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;

/// Runs `synchub-agent publish ARGS` against `hub` with `token`; its stdout, or its stderr as
/// the error.
fn publish(hub: &TestHub, token: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_synchub-agent"))
        .args(["publish", "--hub", &hub.url, "--token", token])
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

    let log: Vec<SyncLogEntry> = http()
        .get(hub.api("/sync-log?limit=100"))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?
        .json()
        .await?;
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
