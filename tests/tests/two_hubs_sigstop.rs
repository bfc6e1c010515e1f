//! Two real hub processes (`synchub serve`) on one PostgreSQL database and one blob folder; an
//! agent given both URLs is downloading a large version from the first when that process is
//! frozen with SIGSTOP (TCP stays open, nothing answers). The agent must finish from the
//! second hub within 30 s.

use anyhow::{Context, bail, ensure};
use std::path::Path;
use std::time::{Duration, Instant};
use synchub_client::SyncClient;
use synchub_protocol::{AgentState, CommitRequest, DEFAULT_SPACE, ManifestEntry, Role, Sha256Hex};
use synchub_tests::fixtures::http;
use synchub_tests::load::HubCommand;
use synchub_tests::postgres::test_database;

/// A `synchub serve` process, killed on drop (and woken first if it was stopped).
struct HubProcess {
    url: String,
    child: tokio::process::Child,
}

impl HubProcess {
    async fn spawn(database_url: &str, blobs: &Path, dir: &Path) -> anyhow::Result<HubProcess> {
        // The hub's CLI behind `synchub-load hub`, which cargo builds for this test.
        let hub = HubCommand {
            program: env!("CARGO_BIN_EXE_synchub-load").into(),
            leading_args: vec!["hub".into()],
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "ping_interval_ms = 1000\n[blob_store]\nkind = \"fs\"\npath = {:?}\n",
                blobs.display().to_string()
            ),
        )?;
        let log = std::fs::File::create(dir.join("hub.log"))?;
        let child = tokio::process::Command::new(&hub.program)
            .args(&hub.leading_args)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--database-url", database_url, "--config"])
            .arg(&config)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting synchub serve")?;
        let hub = HubProcess {
            url: format!("http://127.0.0.1:{port}"),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http().get(format!("{}/readyz", hub.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(hub);
            }
            if Instant::now() > deadline {
                bail!(
                    "hub on {} not ready: {}",
                    hub.url,
                    std::fs::read_to_string(dir.join("hub.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("hub exited")?;
        // The shell's own `kill`: no package needed on a fresh machine.
        let status = std::process::Command::new("sh")
            .args(["-c", &format!("kill {signal} {pid}")])
            .status()?;
        ensure!(status.success(), "kill {signal} {pid}");
        Ok(())
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.signal("-CONT");
    }
}

async fn commit(
    url: &str,
    token: &str,
    base: u64,
    files: &[(String, Vec<u8>)],
) -> anyhow::Result<u64> {
    let mut puts = Vec::new();
    for (path, body) in files {
        let sha256 = Sha256Hex::of(body);
        let r = http()
            .put(format!("{url}/api/v1/blobs/{sha256}"))
            .bearer_auth(token)
            .body(body.clone())
            .send()
            .await?;
        ensure!(r.status().is_success(), "upload: {}", r.status());
        puts.push(ManifestEntry {
            path: path.clone(),
            size: body.len() as u64,
            sha256,
        });
    }
    let req = CommitRequest {
        base_version: base,
        puts,
        deletes: Vec::new(),
        message: None,
    };
    let r = http()
        .post(format!("{url}/api/v1/spaces/{DEFAULT_SPACE}/commits"))
        .bearer_auth(token)
        .json(&req)
        .send()
        .await?;
    ensure!(r.status().is_success(), "commit: {}", r.status());
    let body: serde_json::Value = r.json().await?;
    body["head"]["version"]
        .as_u64()
        .context("commit answer without a version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_two_urls_finishes_while_the_first_hub_is_stopped() -> anyhow::Result<()> {
    let database = test_database().await?;
    let work = tempfile::tempdir()?;
    let blobs = work.path().join("blobs");
    let token = {
        let store = synchub_hub::store::open(&database).await?;
        synchub_hub::auth::create_token(store.as_ref(), "pc", Role::Admin, None).await?
    };
    let (da, db) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&da)?;
    std::fs::create_dir_all(&db)?;
    let a = HubProcess::spawn(&database, &blobs, &da).await?;
    let b = HubProcess::spawn(&database, &blobs, &db).await?;

    let dir = tempfile::tempdir()?;
    synchub_client::install_crypto_provider();
    let agent = SyncClient::start(synchub_client::AgentConfig {
        hubs: vec![a.url.clone(), b.url.clone()],
        token: token.clone(),
        dir: dir.path().to_path_buf(),
        status_listen: None,
        client_id: Some("two-hubs".into()),
        read_timeout_ms: 2000,
        max_backoff_ms: 1000,
        ..Default::default()
    })
    .await?;
    agent.wait_ready(None, 1, Duration::from_secs(20)).await?;

    // 32 MiB in 1 MiB files: long enough to be caught in the middle.
    let files: Vec<(String, Vec<u8>)> = (0..32u32)
        .map(|i| {
            let mut body = vec![(i % 251) as u8; 1 << 20];
            body[..4].copy_from_slice(&i.to_le_bytes());
            (format!("big/{i:02}.bin"), body)
        })
        .collect();
    let mut states = agent.subscribe(None)?;
    let version = commit(&a.url, &token, 1, &files).await?;
    let state = tokio::time::timeout(
        Duration::from_secs(20),
        states.wait_for(|s| {
            matches!(s, AgentState::Downloading { bytes_done, .. } if *bytes_done > 0)
                || matches!(s, AgentState::Ready { version: v } if *v >= version)
        }),
    )
    .await
    .context("the agent never started downloading")??
    .clone();
    a.signal("-STOP")?;
    let stopped = Instant::now();
    ensure!(
        matches!(state, AgentState::Downloading { .. }),
        "the download ended before the hub could be stopped ({state:?}); use more data"
    );
    agent
        .wait_ready(None, version, Duration::from_secs(30))
        .await
        .context("the agent must finish from the second hub within 30 s")?;
    eprintln!(
        "first hub stopped mid-download ({state:?}); ready from the second after {:?}",
        stopped.elapsed()
    );
    assert_eq!(
        std::fs::read(dir.path().join("current/big/07.bin"))?,
        files[7].1
    );
    agent.shutdown().await;
    drop((a, b));
    Ok(())
}
