//! The Windows agent (`synchub-agent.exe`, x86_64-pc-windows-gnu) run under Wine against a
//! Linux hub on loopback: the QR set published and applied, then changes, deletes and a forced
//! repair, each applied byte-identical; a Windows process holding a file of the live tree open
//! across an apply; the agent killed mid-apply and restarted; then the QR app's folder in
//! two-way mode (filled from the hub, a local PNG published, another PC's PNG applied).
//!
//! `scripts/test` builds the exe (scripts/build-windows-agent); `SYNCHUB_AGENT_EXE` points at
//! another build. Wine starts once per test binary (a fresh prefix boots slowly).

use anyhow::{Context, bail, ensure};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use synchub_client::HubApi;
use synchub_protocol::{DEFAULT_SPACE, Role};
use synchub_tests::hub::TestHub;
use synchub_tests::load::{DataSet, generate_set};

const WINE: &str = "/usr/lib/wine/wine64";

fn agent_exe() -> anyhow::Result<PathBuf> {
    let exe = synchub_tests::fixtures::windows_agent_exe()?;
    ensure!(
        exe.with_file_name("bcryptprimitives.dll").is_file(),
        "the Wine shim bcryptprimitives.dll is missing beside {}: run scripts/build-windows-agent",
        exe.display()
    );
    ensure!(
        Path::new(WINE).is_file(),
        "{WINE} is missing: run scripts/install-test-deps (apt-get install wine64)"
    );
    Ok(exe)
}

/// `Z:` is `/` under Wine.
fn win_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

struct Wine {
    prefix: tempfile::TempDir,
}

impl Wine {
    /// A fresh prefix, booted once (the slow part of Wine's first start).
    fn boot() -> anyhow::Result<Wine> {
        let prefix = tempfile::tempdir()?;
        let wine = Wine { prefix };
        let started = Instant::now();
        let status = wine
            .command(WINE)
            .arg("wineboot")
            .arg("--init")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("starting wine")?;
        ensure!(status.success(), "wineboot failed: {status}");
        eprintln!("wine prefix booted in {:?}", started.elapsed());
        Ok(wine)
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("WINEPREFIX", self.prefix.path())
            .env("WINEDEBUG", "-all")
            .env_remove("DISPLAY");
        c
    }

    fn spawn_agent(
        &self,
        exe: &Path,
        hub: &TestHub,
        token: &str,
        dir: &Path,
    ) -> anyhow::Result<Agent> {
        self.spawn_agent_with(exe, hub, token, dir, &[])
    }

    fn spawn_agent_with(
        &self,
        exe: &Path,
        hub: &TestHub,
        token: &str,
        dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let log = dir.with_extension("log");
        let child = self
            .command(WINE)
            .arg(exe)
            .args([
                "run",
                "--hub",
                &hub.url,
                "--token",
                token,
                "--space",
                DEFAULT_SPACE,
            ])
            .arg("--dir")
            .arg(win_path(dir))
            .args(["--status-listen", "off"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting synchub-agent.exe under wine")?;
        Ok(Agent { child, log })
    }
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The live tree as the docs tell a program to find it: the name in `.synchub/live`.
fn live_tree(dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(dir.join(".synchub/live")).ok()?;
    Some(dir.join(".synchub/trees").join(name.trim()))
}

fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    synchub_client::walk_files(root)
        .into_iter()
        .filter_map(|p| Some((p.clone(), std::fs::read(root.join(&p)).ok()?)))
        .collect()
}

/// `state.json` says ready at `version`.
fn ready_at(dir: &Path, version: u64) -> bool {
    std::fs::read(dir.join(".synchub/state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["state"] == "ready" && v["version"] == version)
}

/// Waits until the agent is ready at `version` with exactly `want` in its live tree; returns
/// how long that took.
async fn wait_applied(
    agent: &Agent,
    dir: &Path,
    version: u64,
    want: &BTreeMap<String, Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if ready_at(dir, version) {
            let tree = live_tree(dir).context("no .synchub/live")?;
            let got = read_tree(&tree);
            ensure!(
                &got == want,
                "version {version}: live tree {} differs: {} files, {} expected",
                tree.display(),
                got.len(),
                want.len()
            );
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "agent not ready at version {version} after {timeout:?}; state.json: {}\nlog:\n{}",
                std::fs::read_to_string(dir.join(".synchub/state.json")).unwrap_or_default(),
                agent.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn files_of(root: &Path) -> BTreeMap<String, Vec<u8>> {
    read_tree(root)
}

async fn publish(api: &HubApi, src: &Path) -> anyhow::Result<u64> {
    Ok(
        synchub_client::publish(api, DEFAULT_SPACE, None, &[src.to_path_buf()], None)
            .await?
            .head
            .version,
    )
}

/// Commits the tree `want` exactly (puts what differs, deletes what is gone) on the head.
async fn commit_exact(
    hub: &TestHub,
    token: &str,
    base: u64,
    old: &BTreeMap<String, Vec<u8>>,
    want: &BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<u64> {
    let puts: Vec<(&str, &[u8])> = want
        .iter()
        .filter(|(p, b)| old.get(*p) != Some(*b))
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let deletes: Vec<&str> = old
        .keys()
        .filter(|p| !want.contains_key(*p))
        .map(String::as_str)
        .collect();
    let (status, body) = synchub_tests::fixtures::commit(hub, token, base, &puts, &deletes).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    body["head"]["version"].as_u64().context("head version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_agent_under_wine() -> anyhow::Result<()> {
    let exe = agent_exe()?;
    let wine = Wine::boot()?;
    synchub_client::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let admin = hub.token("ops", Role::Admin, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let work = tempfile::tempdir()?;
    let src = work.path().join("qr");
    generate_set(DataSet::QR, &src, 17)?;
    let mut want = files_of(&src);
    assert_eq!(want.len(), 508);
    let dir = work.path().join("pc");
    std::fs::create_dir_all(&dir)?;

    // 1. The QR set, first apply (the agent starting included).
    let mut version = publish(&api, &src).await?;
    let mut agent = wine.spawn_agent(&exe, &hub, &token, &dir)?;
    let first = wait_applied(&agent, &dir, version, &want, Duration::from_secs(120)).await?;
    eprintln!("QR set under Wine: first apply (agent start to ready) {first:?}");

    // 2. Changes: 40 files rewritten, 5 added.
    let old = want.clone();
    for (i, body) in want.values_mut().enumerate().filter(|(i, _)| i % 13 == 0) {
        body.extend_from_slice(format!("v2-{i}").as_bytes());
    }
    for i in 0..5 {
        want.insert(format!("nou/Școala_{i}.png"), vec![i as u8; 4096]);
    }
    version = commit_exact(&hub, &token, version, &old, &want).await?;
    let t = wait_applied(&agent, &dir, version, &want, Duration::from_secs(60)).await?;
    eprintln!("QR set under Wine: incremental apply (40 changed, 5 added) {t:?}");

    // 3. Deletes: a whole folder and a few single files, while a Windows process holds a
    //    file of the live tree open (as a Python reader would).
    let held_tree = live_tree(&dir).context("live tree")?;
    let held_file = held_tree.join(want.keys().next().context("a file")?);
    let reader = wine
        .command(WINE)
        // cmd opens the file as ping's stdin and holds it until ping ends (~7 s).
        .args(["cmd", "/c", "ping -n 8 127.0.0.1 >NUL <"])
        .arg(win_path(&held_file))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = want.clone();
    let doomed = old
        .keys()
        .nth(100)
        .context("file")?
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    want.retain(|p, _| !p.starts_with(&format!("{doomed}/")));
    for p in old.keys().skip(200).step_by(50) {
        want.remove(p);
    }
    version = commit_exact(&hub, &token, version, &old, &want).await?;
    let t = wait_applied(&agent, &dir, version, &want, Duration::from_secs(60)).await?;
    eprintln!("apply with a reader holding a file open: {t:?}");
    let mut reader = reader;
    let status = reader.wait()?;
    ensure!(
        status.success(),
        "the reader could read its file to the end: {status}"
    );

    // 4. A forced repair: a file of the live tree corrupted on the PC (through its cache
    //    link), then an admin's force-sync: the agent re-hashes and rebuilds.
    let live = live_tree(&dir).context("live tree")?;
    let victim = live.join(want.keys().nth(7).context("file")?);
    let mut perms = std::fs::metadata(&victim)?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&victim, perms)?;
    std::fs::write(&victim, b"corrupted on this PC")?;
    let r = synchub_tests::fixtures::http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/force-sync")))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"reason": "repair"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "force-sync: {}", r.status());
    let forced: serde_json::Value = r.json().await?;
    version = forced["head"]["version"].as_u64().unwrap_or(version + 1);
    wait_applied(&agent, &dir, version, &want, Duration::from_secs(60)).await?;
    ensure!(!held_tree.exists() || held_tree != live_tree(&dir).unwrap_or_default());

    // 5. Killed mid-apply (every file changes), restarted: the new version, byte-identical.
    let old = want.clone();
    for body in want.values_mut() {
        body.extend_from_slice(b"-v5");
    }
    version = commit_exact(&hub, &token, version, &old, &want).await?;
    let started = Instant::now();
    loop {
        let state = std::fs::read_to_string(dir.join(".synchub/state.json")).unwrap_or_default();
        if state.contains("\"downloading\"")
            || state.contains("\"applying\"")
            || state.contains("\"verifying\"")
        {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no sync started: {state}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.kill();
    let before = read_tree(&live_tree(&dir).context("live tree after kill")?);
    ensure!(
        before == old || before == want,
        "after the kill the live tree is a mix"
    );
    agent = wine.spawn_agent(&exe, &hub, &token, &dir)?;
    wait_applied(&agent, &dir, version, &want, Duration::from_secs(120)).await?;
    // The older trees go (the reader is gone): the live tree and one last-good tree (the
    // default `keep_trees`), each with its manifest.
    let started = Instant::now();
    loop {
        let trees = std::fs::read_dir(dir.join(".synchub/trees"))?.count();
        if trees == 4 {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "{trees} entries left in trees/"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.kill();

    two_way_under_wine(&wine, &exe, &hub, &token, version, &want).await?;
    hub.stop().await;
    Ok(())
}

/// Whether the hub's head manifest names `path` with the sha256 of `bytes`.
async fn head_has(hub: &TestHub, token: &str, path: &str, bytes: &[u8]) -> anyhow::Result<bool> {
    let version = synchub_tests::fixtures::head(hub, token).await?.version;
    let manifest = synchub_tests::fixtures::http()
        .get(hub.api(&format!(
            "/spaces/{DEFAULT_SPACE}/versions/{version}/manifest"
        )))
        .bearer_auth(token)
        .send()
        .await?
        .text()
        .await?;
    let sha = synchub_protocol::Sha256Hex::of(bytes);
    Ok(manifest
        .lines()
        .any(|l| l.starts_with(sha.as_str()) && l.ends_with(path)))
}

/// The QR app's folder in two-way mode on a Windows PC: the agent fills the empty folder with
/// the head, a PNG the app writes there reaches the hub, and a PNG another PC publishes
/// appears in the folder.
async fn two_way_under_wine(
    wine: &Wine,
    exe: &Path,
    hub: &TestHub,
    token: &str,
    version: u64,
    want: &BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let folder = work.path().join("qr_codes");
    std::fs::create_dir_all(&folder)?;
    let agent = wine.spawn_agent_with(exe, hub, token, &folder, &["--two-way"])?;
    let in_folder = |folder: &Path| {
        read_tree(folder)
            .into_iter()
            .filter(|(p, _)| !p.starts_with(".synchub"))
            .collect::<BTreeMap<_, _>>()
    };
    let started = Instant::now();
    while &in_folder(&folder) != want {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "two-way folder under Wine never held version {version}: {} files of {}\nlog:\n{}",
            in_folder(&folder).len(),
            want.len(),
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "two-way under Wine: folder filled in {:?}",
        started.elapsed()
    );

    // The app writes a PNG into its folder: the agent publishes it.
    let png: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    let path = "wine-range/QR_from_windows.png";
    std::fs::create_dir_all(folder.join("wine-range"))?;
    std::fs::write(folder.join(path), &png)?;
    let started = Instant::now();
    while !head_has(hub, token, path, &png).await? {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "a PNG written on the Windows PC never reached the hub\nlog:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "two-way under Wine: a local PNG published in {:?}",
        started.elapsed()
    );

    // Another PC publishes a PNG: it appears in the Windows PC's folder.
    let other: Vec<u8> = (0..2500u32).map(|i| (i * 13 % 256) as u8).collect();
    let base = synchub_tests::fixtures::head(hub, token).await?.version;
    let (status, body) = synchub_tests::fixtures::commit(
        hub,
        token,
        base,
        &[("other-range/QR_from_linux.png", other.as_slice())],
        &[],
    )
    .await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let started = Instant::now();
    while std::fs::read(folder.join("other-range/QR_from_linux.png")).ok() != Some(other.clone()) {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "a PNG published elsewhere never appeared in the Windows PC's folder\nlog:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "two-way under Wine: a PNG from another PC applied in {:?}",
        started.elapsed()
    );
    // Nothing written on either side was lost.
    let got = in_folder(&folder);
    ensure!(got.get(path) == Some(&png), "the local PNG is gone");
    ensure!(
        got.len() == want.len() + 2,
        "{} files, {} expected",
        got.len(),
        want.len() + 2
    );
    drop(agent);
    Ok(())
}
