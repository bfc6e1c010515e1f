//! Two-way folder mode end to end: a real hub and three real `synchub-agent --two-way`
//! processes, each over its own folder, as three PCs running the QR app would be.
//!
//! Phases, in one run per backend: each PC writes new PNGs into its own range folders while
//! the others apply (and the time from a PNG written on one PC to its appearance on the others
//! is measured); two PCs edit the same file at once; a file is written slowly, held open for
//! 2 s; one PC deletes 60 % of the tree, which is held until an admin approves it, and another
//! does the same, which an admin rejects (the files come back there); last an admin rolls back
//! to the version before the approved delete and every folder becomes that tree. After every
//! phase each folder must equal the hub's head byte for byte, and at the end every write ever
//! made must still exist, at its path or as a conflict copy.
//!
//! It lives in `client/tests` so that `CARGO_BIN_EXE_synchub-agent` is the agent just built.

use anyhow::{Context, bail, ensure};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use synchub_protocol::{Head, HeldRecord, Manifest, Role, Sha256Hex, VersionInfo};
use synchub_tests::hub::{Backend, TestHub};

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;

/// One PC: its folder and its agent process (killed on drop).
struct Pc {
    name: &'static str,
    dir: tempfile::TempDir,
    status: std::net::SocketAddr,
    child: Child,
}

impl Drop for Pc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pc {
    fn start(hub: &TestHub, token: &str, name: &'static str) -> anyhow::Result<Pc> {
        let dir = tempfile::tempdir()?;
        let status = free_port()?;
        let config = dir.path().join("agent.toml");
        let folder = dir.path().join("qr_codes");
        std::fs::create_dir_all(&folder)?;
        std::fs::write(
            &config,
            format!(
                "hubs = [{hub:?}]\ntoken = {token:?}\ndir = {folder:?}\nstatus_listen = \"{status}\"\n\
                 client_id = \"{name}\"\nmax_backoff_ms = 2000\n\n[two_way]\nenabled = true\n\
                 stable_ms = 300\ndebounce_ms = 50\nrescan_ms = 2000\n",
                hub = hub.url,
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_synchub-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting synchub-agent")?;
        Ok(Pc {
            name,
            dir,
            status,
            child,
        })
    }

    fn folder(&self) -> PathBuf {
        self.dir.path().join("qr_codes")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.folder().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent"))?;
        std::fs::write(&path, bytes)?;
        Ok(())
    }

    async fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(reqwest::get(format!("http://{}/status", self.status))
            .await?
            .json()
            .await?)
    }
}

fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A PNG-like body unique to `tag` (a real PNG signature, then bytes that differ per file).
fn png(tag: &str, len: usize) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(format!("{tag};").bytes().cycle().take(len));
    out
}

/// The synced files of a folder (the agent's `.synchub/` left out), path -> bytes.
fn folder_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    synchub_client::walk_files(root)
        .into_iter()
        .filter(|p| !p.starts_with(".synchub/"))
        .filter_map(|p| std::fs::read(root.join(&p)).ok().map(|b| (p, b)))
        .collect()
}

/// The hub, as an admin reads it.
struct Admin {
    http: reqwest::Client,
    hub: String,
    token: String,
}

impl Admin {
    /// `GET /api/v1{path}` with the admin token, as JSON.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .http
            .get(format!("{}/api/v1{path}", self.hub))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn head(&self) -> anyhow::Result<Head> {
        self.get_json(&format!("/spaces/{SPACE}/head")).await
    }

    async fn manifest(&self, head: &Head) -> anyhow::Result<Manifest> {
        if head.data_hash == Sha256Hex::empty() {
            return Ok(Manifest::default());
        }
        let bytes = self
            .http
            .get(format!(
                "{}/api/v1/spaces/{SPACE}/versions/{}/manifest",
                self.hub, head.version
            ))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        Ok(Manifest::from_canonical(&bytes, 1_000_000)?)
    }

    async fn versions(&self) -> anyhow::Result<Vec<VersionInfo>> {
        self.get_json(&format!("/spaces/{SPACE}/versions?limit=1000"))
            .await
    }

    /// `POST …/rollback` to version `to`; the new head.
    async fn rollback(&self, to: u64) -> anyhow::Result<Head> {
        let created: serde_json::Value = self
            .http
            .post(format!("{}/api/v1/spaces/{SPACE}/rollback", self.hub))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "to_version": to, "reason": "test rollback" }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(serde_json::from_value(created["head"].clone())?)
    }

    async fn held(&self) -> anyhow::Result<Vec<HeldRecord>> {
        self.get_json("/held").await
    }

    async fn decide(&self, client: &str, decision: &str) -> anyhow::Result<()> {
        self.http
            .post(format!(
                "{}/api/v1/spaces/{SPACE}/held/{client}/{decision}",
                self.hub
            ))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

/// Waits until every folder holds exactly the hub's head (same paths, same hashes) and the
/// head stops moving; returns the head's tree by hash.
/// The end of every PC's log, for a failure's message.
fn logs(pcs: &[&Pc]) -> String {
    pcs.iter()
        .map(|pc| format!("--- {} ---\n{}", pc.name, pc.log_tail()))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn converged(
    admin: &Admin,
    pcs: &[&Pc],
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, Sha256Hex>> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let head = admin.head().await?;
        let manifest = admin.manifest(&head).await?;
        let want: BTreeMap<String, Sha256Hex> = manifest
            .entries()
            .iter()
            .map(|e| (e.path.clone(), e.sha256.clone()))
            .collect();
        let mut all = true;
        for pc in pcs {
            let have: BTreeMap<String, Sha256Hex> = folder_tree(&pc.folder())
                .into_iter()
                .map(|(p, b)| (p, Sha256Hex::of(&b)))
                .collect();
            if have != want {
                all = false;
                let missing: Vec<_> = want
                    .keys()
                    .filter(|p| !have.contains_key(*p))
                    .take(5)
                    .collect();
                let extra: Vec<_> = have
                    .keys()
                    .filter(|p| !want.contains_key(*p))
                    .take(5)
                    .collect();
                let differ: Vec<_> = want
                    .iter()
                    .filter(|(p, s)| have.get(*p).is_some_and(|h| h != *s))
                    .map(|(p, _)| p)
                    .take(5)
                    .collect();
                last = format!(
                    "{} at head v{}: missing {missing:?} extra {extra:?} differ {differ:?}",
                    pc.name, head.version
                );
                break;
            }
        }
        if all && admin.head().await?.version == head.version {
            return Ok(want);
        }
        if Instant::now() > deadline {
            bail!("not converged after {timeout:?}: {last}\n{}", logs(pcs));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes whole range folders from `pc`'s folder (moved out of it, each in one rename, as
/// a person deleting folders would) until at least `percent` of `tree`'s files are gone;
/// returns the paths removed.
fn remove_folders(
    pc: &Pc,
    tree: &BTreeMap<String, Sha256Hex>,
    percent: usize,
) -> anyhow::Result<Vec<String>> {
    let mut by_folder: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for path in tree.keys() {
        let top = path.split_once('/').map_or(path.as_str(), |(t, _)| t);
        by_folder.entry(top).or_default().push(path.clone());
    }
    let mut removed = Vec::new();
    let aside = pc
        .dir
        .path()
        .join(format!("deleted-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&aside)?;
    for (top, paths) in by_folder {
        if removed.len() * 100 >= tree.len() * percent {
            break;
        }
        std::fs::rename(pc.folder().join(top), aside.join(top))?;
        removed.extend(paths);
    }
    Ok(removed)
}

async fn wait_for_file(
    root: &Path,
    rel: &str,
    bytes: &[u8],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let path = root.join(rel);
    loop {
        if std::fs::read(&path).is_ok_and(|b| b == bytes) {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < timeout,
            "{rel} did not reach {} in {timeout:?}",
            root.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn three_pcs_keep_one_folder(backend: Backend, s3: bool) -> anyhow::Result<()> {
    let bucket = match s3 {
        true => Some(synchub_tests::s3::test_bucket().await?),
        false => None,
    };
    let hub = TestHub::start_with_backend_and(backend, move |c| {
        if let Some(b) = bucket {
            c.blob_store = synchub_hub::config::BlobStoreConfig::S3(b);
        }
    })
    .await?;
    let admin = Admin {
        http: reqwest::Client::new(),
        hub: hub.url.clone(),
        token: hub.admin_token.clone(),
    };
    let mut pcs = Vec::new();
    for name in ["pc-cluj", "pc-iasi", "pc-brasov"] {
        let token = hub.token(name, Role::Agent, None).await?;
        pcs.push(Pc::start(&hub, &token, name)?);
    }
    let all: Vec<&Pc> = pcs.iter().collect();
    // The last bytes each PC wrote to each path, to prove at the end that none was lost.
    let mut written: BTreeMap<(&str, String), Vec<u8>> = BTreeMap::new();

    // 1. Each PC writes new PNGs into its own range folders while the others apply.
    for round in 0..3 {
        for (i, pc) in pcs.iter().enumerate() {
            for folder in 0..2 {
                for n in 0..8 {
                    let rel = format!("0431{i}-1110{folder}-F/QR_{round}_{n:04}.png");
                    let body = png(&format!("{}/{rel}", pc.name), 3000 + n * 37);
                    pc.write(&rel, &body)?;
                    written.insert((pc.name, rel), body);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let tree = converged(&admin, &all, Duration::from_secs(60)).await?;
    ensure!(tree.len() == 3 * 3 * 2 * 8, "head has {} files", tree.len());

    // The time from a PNG written on one PC to its appearance on the other two.
    let mut latencies = Vec::new();
    for run in 0..9 {
        let from = &pcs[run % 3];
        let rel = format!("latency/QR_{run:04}.png");
        let body = png(&format!("latency {run}"), 2500);
        let start = Instant::now();
        from.write(&rel, &body)?;
        written.insert((from.name, rel.clone()), body.clone());
        let mut slowest = Duration::ZERO;
        for pc in pcs.iter().filter(|p| p.name != from.name) {
            wait_for_file(&pc.folder(), &rel, &body, Duration::from_secs(20)).await?;
            slowest = slowest.max(start.elapsed());
        }
        latencies.push(slowest);
    }
    latencies.sort();
    println!(
        "two-way latency, PNG written on one PC until on both others ({:?}, {} blobs): median {:?}, min {:?}, max {:?} over {} runs",
        backend,
        if s3 { "S3" } else { "fs" },
        latencies[latencies.len() / 2],
        latencies[0],
        latencies[latencies.len() - 1],
        latencies.len()
    );
    converged(&admin, &all, Duration::from_secs(30)).await?;

    // 2. Two PCs edit the same file at once: one version keeps the name, the other is kept
    // as a conflict copy, on every PC.
    let shared = "04310-11100-F/QR_0_0000.png";
    let edit_a = png("edit from cluj", 4000);
    let edit_b = png("edit from iasi", 4100);
    pcs[0].write(shared, &edit_a)?;
    pcs[1].write(shared, &edit_b)?;
    written.insert((pcs[0].name, shared.into()), edit_a.clone());
    written.insert((pcs[1].name, shared.into()), edit_b.clone());
    let tree = converged(&admin, &all, Duration::from_secs(60)).await?;
    let copies: Vec<&String> = tree.keys().filter(|p| p.contains(".conflict-")).collect();
    ensure!(
        copies.len() == 1,
        "expected one conflict copy, found {copies:?}\n{}",
        logs(&all)
    );
    let kept: BTreeSet<&Sha256Hex> = [&tree[shared], &tree[copies[0]]].into_iter().collect();
    let both: BTreeSet<Sha256Hex> = [Sha256Hex::of(&edit_a), Sha256Hex::of(&edit_b)].into();
    ensure!(
        kept == both.iter().collect(),
        "the two edits are not both kept (at {shared} and {})",
        copies[0]
    );

    // 3. A file written slowly, open for writing for 2 s, is never published half-done.
    let slow_rel = "04312-11101-F/QR_slow.png";
    let slow_body = png("written slowly", 60_000);
    {
        let path = pcs[2].folder().join(slow_rel);
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&slow_body[..20_000])?;
        f.flush()?;
        // Still, and open for writing, far longer than the agent's stability time.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        f.write_all(&slow_body[20_000..40_000])?;
        f.flush()?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        f.write_all(&slow_body[40_000..])?;
    }
    written.insert((pcs[2].name, slow_rel.into()), slow_body.clone());
    for pc in &pcs {
        wait_for_file(&pc.folder(), slow_rel, &slow_body, Duration::from_secs(20)).await?;
    }
    let slow_hash = Sha256Hex::of(&slow_body);
    for v in admin.versions().await? {
        let m = admin.manifest(&v.head).await?;
        if let Some(e) = m.get(slow_rel) {
            ensure!(
                e.sha256 == slow_hash,
                "version {} holds {slow_rel} half-written ({} bytes)",
                v.head.version,
                e.size
            );
        }
    }
    let tree = converged(&admin, &all, Duration::from_secs(30)).await?;

    // 4. One PC deletes 60 % of the tree: held until approved, then it reaches the others.
    let before = admin.head().await?;
    let before_mass_delete = before.version;
    let victims = remove_folders(&pcs[2], &tree, 60)?;
    let deleted: BTreeSet<Sha256Hex> = victims.iter().map(|v| tree[v].clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let status = pcs[2].status().await?;
        if let Some(h) = status["spaces"][0]
            .get("held_change")
            .filter(|h| !h.is_null())
        {
            break h.clone();
        }
        ensure!(
            Instant::now() < deadline,
            "the mass delete was not held: {status}\n{}",
            pcs[2].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        held["deletes"] == victims.len() as u64,
        "held {} of {} deletes\n{}",
        held["deletes"],
        victims.len(),
        pcs[2].log_tail()
    );
    let listed = loop {
        let list = admin.held().await?;
        if let Some(r) = list.into_iter().find(|r| r.client_id == "pc-brasov") {
            break r;
        }
        ensure!(
            Instant::now() < deadline,
            "the hub does not list the held change"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(listed.change.deletes == victims.len() as u64);
    let printed = Command::new(env!("CARGO_BIN_EXE_synchub-agent"))
        .args(["status", "--status-listen", &pcs[2].status.to_string()])
        .output()?;
    let printed = String::from_utf8_lossy(&printed.stdout);
    ensure!(
        printed.contains("HELD"),
        "`synchub-agent status` does not show it:\n{printed}"
    );
    // Nothing went out meanwhile: the others still have every file.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        admin.head().await?.version == before.version,
        "the held delete was published"
    );
    for pc in &pcs[..2] {
        ensure!(
            folder_tree(&pc.folder()).len() == tree.len(),
            "{} lost files before approval",
            pc.name
        );
    }
    admin.decide("pc-brasov", "approve").await?;
    let tree = converged(&admin, &all, Duration::from_secs(60)).await?;
    ensure!(
        victims.iter().all(|v| !tree.contains_key(v)),
        "the approved delete did not reach the hub"
    );
    ensure!(
        admin.held().await?.is_empty(),
        "the approved change is still listed"
    );

    // 5. Another mass delete, rejected: the PC gets the files back and nothing goes out.
    let before = admin.head().await?;
    let victims2 = remove_folders(&pcs[1], &tree, 60)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = admin.held().await?;
        if list.iter().any(|r| r.client_id == "pc-iasi") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the second mass delete was not held\n{}",
            pcs[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin.decide("pc-iasi", "reject").await?;
    let tree = converged(&admin, &all, Duration::from_secs(30)).await?;
    ensure!(
        admin.head().await?.version == before.version,
        "the rejected delete was published"
    );
    ensure!(
        victims2.iter().all(|v| tree.contains_key(v)),
        "the rejected files did not come back"
    );
    ensure!(
        admin.held().await?.is_empty(),
        "the rejected change is still listed"
    );

    // No write lost: the last body each PC wrote to each path is in the final tree, unless
    // the approved mass delete removed it on purpose.
    let present: BTreeSet<Sha256Hex> = tree.values().cloned().collect();
    for ((pc, rel), body) in &written {
        let hash = Sha256Hex::of(body);
        ensure!(
            present.contains(&hash) || deleted.contains(&hash),
            "{pc}'s write to {rel} is lost"
        );
    }
    // 6. An admin rolls back to the version before the approved mass delete: every PC's
    //    folder ends as that version's tree (the deleted range folders come back).
    let target = admin
        .versions()
        .await?
        .into_iter()
        .find(|v| v.head.version == before_mass_delete)
        .context("the version before the mass delete is listed")?;
    let want: BTreeMap<String, Sha256Hex> = admin
        .manifest(&target.head)
        .await?
        .entries()
        .iter()
        .map(|e| (e.path.clone(), e.sha256.clone()))
        .collect();
    let rolled = admin.rollback(before_mass_delete).await?;
    ensure!(rolled.forced, "a rollback is announced as forced");
    let tree = converged(&admin, &all, Duration::from_secs(60)).await?;
    ensure!(
        tree == want,
        "after the rollback the head is not version {before_mass_delete}'s tree"
    );
    ensure!(
        victims
            .iter()
            .all(|v| pcs.iter().all(|pc| pc.folder().join(v).is_file())),
        "a rolled-back file is missing on a PC"
    );

    for pc in pcs {
        drop(pc);
    }
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_fs() {
    three_pcs_keep_one_folder(Backend::Sqlite, false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_s3() {
    three_pcs_keep_one_folder(Backend::Postgres, true)
        .await
        .unwrap();
}
