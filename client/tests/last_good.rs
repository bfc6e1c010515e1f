//! Last-good trees and `synchub-agent restore`, with real agent processes against a real hub:
//! a program that cd'd into the old tree and holds a file open keeps reading across a switch;
//! `keep_trees` previous trees stay and older ones go; a restore from a kept tree holds that
//! version (status says so, a newer head waits) until `resume`; a restore with the hub down
//! rebuilds from the cache; a version never held comes from the hub; a version neither here
//! nor reachable is a clear error.

use anyhow::{Context, ensure};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use synchub_client::HubApi;
use synchub_protocol::Role;
use synchub_tests::hub::TestHub;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;
const AGENT: &str = env!("CARGO_BIN_EXE_synchub-agent");

/// A running `synchub-agent run`, killed on drop.
struct Agent(Child);

impl Agent {
    fn start(hub_url: &str, token: &str, dir: &Path, extra: &[&str]) -> anyhow::Result<Agent> {
        let child = Command::new(AGENT)
            .args(["run", "--hub", hub_url, "--token", token, "--space", SPACE])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting synchub-agent")?;
        Ok(Agent(child))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `synchub-agent ARGS` to its end.
fn agent_cli(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(AGENT)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .context("running synchub-agent")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `synchub-agent restore --dir DIR --version N` (and `more`), to its end.
fn restore(dir: &Path, version: u64, more: &[&str]) -> anyhow::Result<Output> {
    let dir = dir.to_str().context("utf-8 path")?;
    let version = version.to_string();
    let mut args = vec![
        "restore",
        "--dir",
        dir,
        "--space",
        SPACE,
        "--version",
        version.as_str(),
    ];
    args.extend_from_slice(more);
    agent_cli(&args)
}

/// Publishes `files` (name, body) into the space; the new version.
async fn publish(api: &HubApi, files: &[(&str, &str)]) -> anyhow::Result<u64> {
    let src = tempfile::tempdir()?;
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, body)| {
            let p = src.path().join(name);
            std::fs::write(&p, body).map(|_| p)
        })
        .collect::<Result<_, _>>()?;
    Ok(synchub_client::publish(api, SPACE, None, &paths, None)
        .await?
        .head
        .version)
}

/// Waits until `DIR/current/name` holds `body`.
async fn wait_for(dir: &Path, name: &str, body: &str, timeout: Duration) -> anyhow::Result<()> {
    let path = dir.join("current").join(name);
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(&path).is_ok_and(|b| b == body) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} never held {body:?} (it holds {:?})",
            path.display(),
            std::fs::read_to_string(&path).ok()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Versions of the complete trees in `DIR/.synchub/trees` (a folder with its manifest).
fn tree_versions(dir: &Path) -> anyhow::Result<Vec<u64>> {
    let trees = dir.join(".synchub/trees");
    let mut versions = Vec::new();
    for e in std::fs::read_dir(&trees)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() && trees.join(format!("{name}.manifest")).is_file() {
            versions.push(name.split('-').next().unwrap_or("").parse()?);
        }
    }
    versions.sort();
    Ok(versions)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_reading_the_old_tree_is_not_cut_off_by_a_switch() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let dir = tempfile::tempdir()?;
    publish(
        &api,
        &[("a.txt", "first line\nsecond line\n"), ("b.txt", "old b\n")],
    )
    .await?;
    let _agent = Agent::start(&hub.url, &token, dir.path(), &[])?;
    wait_for(dir.path(), "b.txt", "old b\n", Duration::from_secs(20)).await?;

    // A program enters the data folder through `current`, opens a.txt and reads its first
    // line; it reads on, and opens b.txt, only after the switch.
    let mut reader = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"cd current && exec 3<a.txt && read -r first <&3 && echo "$first" && read -r go && cat b.txt && cat <&3"#)
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting sh")?;
    let mut stdout = tokio::io::BufReader::new(reader.stdout.take().context("stdout")?);
    let mut first = String::new();
    tokio::time::timeout(Duration::from_secs(10), stdout.read_line(&mut first)).await??;
    ensure!(first == "first line\n", "the reader began with {first:?}");

    publish(&api, &[("a.txt", "new a\n"), ("b.txt", "new b\n")]).await?;
    wait_for(dir.path(), "b.txt", "new b\n", Duration::from_secs(20)).await?;
    // The switch's cleanup runs right after it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut stdin = reader.stdin.take().context("stdin")?;
    stdin.write_all(b"go\n").await?;
    drop(stdin);
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(10), stdout.read_to_string(&mut rest)).await??;
    let status = tokio::time::timeout(Duration::from_secs(10), reader.wait()).await??;
    let mut err = String::new();
    if let Some(mut e) = reader.stderr.take() {
        e.read_to_string(&mut err).await?;
    }
    ensure!(
        status.success() && rest == "old b\nsecond line\n",
        "the reader was cut off by the switch: {status}, read {rest:?}, errors {err:?}"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_trees_are_kept_and_older_ones_removed() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let dir = tempfile::tempdir()?;
    let mut versions = vec![publish(&api, &[("n.txt", "1")]).await?];
    let _agent = Agent::start(&hub.url, &token, dir.path(), &["--keep-trees", "2"])?;
    wait_for(dir.path(), "n.txt", "1", Duration::from_secs(20)).await?;
    for n in 2..=4 {
        let body = n.to_string();
        versions.push(publish(&api, &[("n.txt", body.as_str())]).await?);
        wait_for(dir.path(), "n.txt", &body, Duration::from_secs(20)).await?;
    }
    // The live tree and the two before it; the first one went.
    let want = versions[1..].to_vec();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tree_versions(dir.path())? != want {
        ensure!(
            Instant::now() < deadline,
            "trees {:?}, want {want:?}",
            tree_versions(dir.path())?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let trees = dir.path().join(".synchub/trees");
    let mut kept_bodies = Vec::new();
    for e in std::fs::read_dir(&trees)?
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        kept_bodies.push(std::fs::read_to_string(e.path().join("n.txt"))?);
    }
    kept_bodies.sort();
    ensure!(kept_bodies == ["2", "3", "4"], "{kept_bodies:?}");
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_version_is_held_until_resume() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let args = ["--status-listen", listen.as_str()];
    let v1 = publish(&api, &[("f.txt", "one")]).await?;
    let agent = Agent::start(&hub.url, &token, dir.path(), &args)?;
    wait_for(dir.path(), "f.txt", "one", Duration::from_secs(20)).await?;
    publish(&api, &[("f.txt", "two")]).await?;
    wait_for(dir.path(), "f.txt", "two", Duration::from_secs(20)).await?;

    // Not while the agent runs: it would sync over the restore.
    let out = restore(dir.path(), v1, &[])?;
    ensure!(
        !out.status.success() && text(&out).contains("an agent is running"),
        "restore beside a running agent: {}",
        text(&out)
    );
    agent.stop()?;
    let out = restore(dir.path(), v1, &[])?;
    ensure!(out.status.success(), "restore: {}", text(&out));
    ensure!(text(&out).contains("kept on this PC"), "{}", text(&out));
    ensure!(std::fs::read_to_string(dir.path().join("current/f.txt"))? == "one");

    // The agent starts again: it serves version 1, says why, and a newer head waits.
    let _agent = Agent::start(&hub.url, &token, dir.path(), &args)?;
    let v3 = publish(&api, &[("f.txt", "three")]).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = agent_cli(&["status", "--status-listen", &listen])?;
        let shown = text(&out);
        if out.status.success()
            && shown.contains("RESTORED")
            && shown.contains(&format!("hub {v3}"))
        {
            break shown;
        }
        ensure!(
            Instant::now() < deadline,
            "status never showed the restore: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(status.contains("usable"), "{status}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        std::fs::read_to_string(dir.path().join("current/f.txt"))? == "one",
        "the agent synced over the restored version"
    );

    let dir_arg = dir.path().to_str().context("utf-8 path")?;
    let out = agent_cli(&["resume", "--dir", dir_arg, "--space", SPACE])?;
    ensure!(
        out.status.success() && text(&out).contains("resumed"),
        "{}",
        text(&out)
    );
    wait_for(dir.path(), "f.txt", "three", Duration::from_secs(20)).await?;
    let out = agent_cli(&["status", "--status-listen", &listen])?;
    ensure!(!text(&out).contains("RESTORED"), "{}", text(&out));
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_the_cache_from_the_hub_or_a_clear_error() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let mut hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let dir = tempfile::tempdir()?;
    // Version 2 holds every blob of version 1: after it, the cache can rebuild version 1.
    let v1 = publish(&api, &[("a.txt", "alpha")]).await?;
    let agent = Agent::start(&hub.url, &token, dir.path(), &["--keep-trees", "0"])?;
    wait_for(dir.path(), "a.txt", "alpha", Duration::from_secs(20)).await?;
    let v2 = publish(&api, &[("b.txt", "beta")]).await?;
    wait_for(dir.path(), "b.txt", "beta", Duration::from_secs(20)).await?;
    // The cleanup after the switch: v1's tree gone, v2's manifest kept in the cache.
    let manifests = dir.path().join(".synchub/cache/manifests");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tree_versions(dir.path())? != [v2]
        || !std::fs::read_dir(&manifests).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{v2}-"))
            })
        })
    {
        ensure!(
            Instant::now() < deadline,
            "no cleanup after the switch to v2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop()?;
    let v3 = publish(&api, &[("a.txt", "gamma")]).await?;
    let url = hub.url.clone();
    let hub_args = ["--hub", url.as_str(), "--token", token.as_str()];

    // The hub down: version 1 is rebuilt from the cache, hash-checked.
    hub.stop_keep().await;
    ensure!(
        !tree_versions(dir.path())?.contains(&v1),
        "no tree of v1 is kept"
    );
    let out = restore(dir.path(), v1, &hub_args)?;
    ensure!(
        out.status.success(),
        "restore from the cache: {}",
        text(&out)
    );
    ensure!(text(&out).contains("local cache"), "{}", text(&out));
    ensure!(std::fs::read_to_string(dir.path().join("current/a.txt"))? == "alpha");
    ensure!(!dir.path().join("current/b.txt").exists());

    // A version this PC never held, with the hub down: a clear error, nothing changed.
    let out = restore(dir.path(), v3, &hub_args)?;
    ensure!(!out.status.success(), "{}", text(&out));
    ensure!(
        text(&out).contains(&format!(
            "version {v3} is not kept on this PC and the hub cannot be reached"
        )),
        "{}",
        text(&out)
    );
    ensure!(std::fs::read_to_string(dir.path().join("current/a.txt"))? == "alpha");

    // With the hub back it is downloaded.
    hub.restart().await?;
    let out = restore(dir.path(), v3, &hub_args)?;
    ensure!(out.status.success(), "restore from the hub: {}", text(&out));
    ensure!(text(&out).contains("from the hub"), "{}", text(&out));
    ensure!(std::fs::read_to_string(dir.path().join("current/a.txt"))? == "gamma");
    ensure!(std::fs::read_to_string(dir.path().join("current/b.txt"))? == "beta");
    hub.stop().await;
    Ok(())
}
