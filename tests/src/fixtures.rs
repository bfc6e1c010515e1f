//! Small helpers the integration test files share: an HTTP client, uploading and committing
//! files through a hub's API, reading the default space's head, an agent configuration pointed at a test hub, reading an agent's
//! tree back, reading a counter from `/metrics`, and finding the cross-built Windows agent and
//! the workspace's own programs.

use crate::hub::TestHub;
use anyhow::{Context, ensure};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use synchub_client::{AgentConfig, SyncClient};
use synchub_protocol::{CommitRequest, DEFAULT_SPACE, Head, ManifestEntry, Sha256Hex};

/// The default space's head as `token` sees it (`GET /spaces/{DEFAULT_SPACE}/head`).
pub async fn head(hub: &TestHub, token: &str) -> anyhow::Result<Head> {
    Ok(http()
        .get(hub.api(&format!("/spaces/{DEFAULT_SPACE}/head")))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// A plain HTTP client (the rustls provider installed; no proxy from the environment).
pub fn http() -> reqwest::Client {
    synchub_hub::blobs::s3::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

/// `PUT /blobs/{sha256}`; fails unless the hub answers 2xx.
pub async fn put_blob(hub: &TestHub, token: &str, body: &[u8]) -> anyhow::Result<Sha256Hex> {
    let hash = Sha256Hex::of(body);
    let r = http()
        .put(hub.api(&format!("/blobs/{hash}")))
        .bearer_auth(token)
        .body(body.to_vec())
        .send()
        .await?;
    ensure!(
        r.status().is_success(),
        "put blob on {}: {}",
        hub.url,
        r.status()
    );
    Ok(hash)
}

/// Uploads `files` and commits them (and `deletes`) on `base` in the default space; returns
/// the status and JSON body of the commit.
pub async fn commit(
    hub: &TestHub,
    token: &str,
    base: u64,
    files: &[(&str, &[u8])],
    deletes: &[&str],
) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
    let mut puts = Vec::new();
    for (path, body) in files {
        puts.push(ManifestEntry {
            path: path.to_string(),
            size: body.len() as u64,
            sha256: put_blob(hub, token, body).await?,
        });
    }
    let req = CommitRequest {
        base_version: base,
        puts,
        deletes: deletes.iter().map(|s| s.to_string()).collect(),
        message: None,
    };
    let r = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/commits")))
        .bearer_auth(token)
        .json(&req)
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    let status = r.status();
    Ok((status, r.json().await.unwrap_or(serde_json::Value::Null)))
}

/// An agent of the default space on `hub`, its data in `dir`, local API on a free port.
pub fn agent_config(hub: &TestHub, token: &str, dir: &Path) -> AgentConfig {
    synchub_client::install_crypto_provider();
    AgentConfig {
        hubs: vec![hub.url.clone()],
        token: token.to_owned(),
        spaces: vec![DEFAULT_SPACE.to_owned()],
        dir: dir.to_path_buf(),
        status_listen: Some("127.0.0.1:0".parse().expect("valid address")),
        client_id: Some(format!("test-agent-{}", uuid::Uuid::new_v4())),
        max_backoff_ms: 2000,
        ..AgentConfig::default()
    }
}

/// Every file under `root` (following `current`), path -> bytes.
pub fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    synchub_client::walk_files(root)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(root.join(&p)).expect("read a file of the tree");
            (p, bytes)
        })
        .collect()
}

/// Waits until the agent is ready at `version` or later; the error shows its status.
pub async fn wait_ready(
    client: &SyncClient,
    version: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    client
        .wait_ready(None, version, timeout)
        .await
        .map(drop)
        .with_context(|| format!("agent status: {:?}", client.status()))
}

/// The hub's `/metrics` page.
async fn metrics_text(hub: &TestHub) -> anyhow::Result<String> {
    Ok(http()
        .get(format!("{}/metrics", hub.url))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?
        .text()
        .await?)
}

/// A counter or gauge from the hub's `/metrics` (0 when absent). The recorder is process-wide:
/// other hubs in the same test process add to the same counters.
pub async fn metric(hub: &TestHub, name: &str) -> anyhow::Result<f64> {
    let text = metrics_text(hub).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}

/// The sum of a counter's samples, labelled or not, whose labels include `label` (such as
/// `via="socket"`; every sample when `None`).
pub async fn metric_where(hub: &TestHub, name: &str, label: Option<&str>) -> anyhow::Result<f64> {
    let text = metrics_text(hub).await?;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some(split) => split,
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue,
            },
        };
        if label.is_none_or(|l| labels.split(',').any(|pair| pair == l)) {
            sum += value.trim().parse::<f64>()?;
        }
    }
    Ok(sum)
}

/// `synchub-agent.exe` as `scripts/build-windows-agent` leaves it (or `SYNCHUB_AGENT_EXE`).
pub fn windows_agent_exe() -> anyhow::Result<std::path::PathBuf> {
    let exe = match std::env::var_os("SYNCHUB_AGENT_EXE") {
        Some(p) => std::path::PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/x86_64-pc-windows-gnu/debug/synchub-agent.exe"),
    };
    ensure!(
        exe.is_file(),
        "{} is missing: run scripts/build-windows-agent (after scripts/install-test-deps), \
         or scripts/test which does both",
        exe.display()
    );
    Ok(exe)
}

/// A program of this workspace (`synchub`, `synchub-agent`) in the target folder this test was
/// built into; `cargo test --workspace` (scripts/test) builds them, `cargo test -p` alone does
/// not.
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary outside a target folder")?;
    let program = dir.join(name);
    ensure!(
        program.is_file(),
        "{} is missing: run `cargo build -p synchub-hub -p synchub-client` (scripts/test \
         builds it)",
        program.display()
    );
    Ok(program)
}
