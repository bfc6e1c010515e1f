//! Kill -9 during apply: the real `synchub-agent` binary is killed at random instants while it
//! switches between two versions whose every file differs; after each kill `DIR/current` must
//! be exactly one of the two trees, never a mix, and a restart must converge and clean up.

use anyhow::{Context, ensure};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use synchub_client::HubApi;
use synchub_protocol::Role;
use synchub_tests::hub::TestHub;

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;

fn write_set(root: &Path, seed: &str) -> anyhow::Result<()> {
    for folder in 0..54 {
        let name = format!("F{folder:02}");
        std::fs::create_dir_all(root.join(&name))?;
        for i in 0..10 {
            let body: Vec<u8> = format!("{seed}/{name}/{i};")
                .bytes()
                .cycle()
                .take(5000)
                .collect();
            std::fs::write(root.join(&name).join(format!("{i}.png")), body)?;
        }
    }
    Ok(())
}

fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    synchub_client::walk_files(root)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(root.join(&p)).unwrap();
            (p, b)
        })
        .collect()
}

fn spawn_agent(hub: &TestHub, token: &str, dir: &Path) -> anyhow::Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_synchub-agent"))
        .args(["run", "--hub", &hub.url, "--token", token, "--space", SPACE])
        .arg("--dir")
        .arg(dir)
        .args(["--status-listen", "off"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting synchub-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_during_apply_leaves_exactly_one_tree() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let a = tempfile::tempdir()?;
    let b = tempfile::tempdir()?;
    write_set(a.path(), "A")?;
    write_set(b.path(), "B")?;
    let tree_a = read_tree(a.path());
    let tree_b = read_tree(b.path());
    let dir = tempfile::tempdir()?;

    // First version fully applied.
    let mut version = synchub_client::publish(&api, SPACE, None, &[a.path().to_path_buf()], None)
        .await?
        .head
        .version;
    let mut child = spawn_agent(&hub, &token, dir.path())?;
    wait_for_tree(dir.path(), &tree_a, Duration::from_secs(20)).await?;
    child.kill()?;
    child.wait()?;

    let mut rng = rand::rng();
    let mut saw_new = 0;
    for round in 0..24 {
        // Publish the other set, start the agent and kill it somewhere in its sync.
        let (src, _) = if round % 2 == 0 {
            (b.path(), &tree_b)
        } else {
            (a.path(), &tree_a)
        };
        version = synchub_client::publish(&api, SPACE, None, &[src.to_path_buf()], None)
            .await?
            .head
            .version;
        let mut child = spawn_agent(&hub, &token, dir.path())?;
        let delay = rng.random_range(0..400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill()?; // SIGKILL
        child.wait()?;
        let now = read_tree(&dir.path().join("current"));
        ensure!(
            now == tree_a || now == tree_b,
            "round {round} (killed after {delay} ms): current is a mix of {} files",
            now.len()
        );
        let expected_new = if round % 2 == 0 { &tree_b } else { &tree_a };
        if &now == expected_new {
            saw_new += 1;
        }
        // Let the next round start from a converged state half of the time, so kills land
        // both on fresh starts and on starts with leftovers.
        if round % 3 == 2 {
            let mut child = spawn_agent(&hub, &token, dir.path())?;
            wait_for_tree(dir.path(), expected_new, Duration::from_secs(20)).await?;
            child.kill()?;
            child.wait()?;
        }
    }
    eprintln!("kills landed after the switch in {saw_new} of 24 rounds; last version {version}");

    // A final run converges and removes unfinished trees.
    let final_tree = if 24 % 2 == 0 { &tree_a } else { &tree_b };
    let mut child = spawn_agent(&hub, &token, dir.path())?;
    wait_for_tree(dir.path(), final_tree, Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let trees: Vec<_> = std::fs::read_dir(dir.path().join(".synchub/trees"))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    child.kill()?;
    child.wait()?;
    // The live tree and one last-good tree (the default `keep_trees`), both complete.
    ensure!(trees.len() == 2, "trees left: {trees:?}");
    for t in &trees {
        let manifest = format!("{}.manifest", t.to_string_lossy());
        ensure!(
            dir.path().join(".synchub/trees").join(manifest).is_file(),
            "unfinished tree left: {t:?}"
        );
    }
    hub.stop().await;
    Ok(())
}

async fn wait_for_tree(
    dir: &Path,
    want: &BTreeMap<String, Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if dir.join("current").exists() && &read_tree(&dir.join("current")) == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "agent did not converge in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
