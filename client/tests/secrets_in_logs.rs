//! No secret in any log: a hub (logging at debug into memory) and the real `synchub-agent`
//! binary (at debug, its output captured) do a whole sync with every token this test creates,
//! including a refused one; neither log, nor the agent's command line, holds any of them.

use anyhow::{Context, ensure};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_client::HubApi;
use synchub_protocol::{DEFAULT_SPACE, Role};
use synchub_tests::hub::TestHub;

/// Everything the in-process hub logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_appears_in_any_log() -> anyhow::Result<()> {
    let hub_log = Captured::default();
    let writer = hub_log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    synchub_client::install_crypto_provider();

    let hub = TestHub::start().await?;
    let pc = hub.token("pc-cluj-01", Role::Agent, None).await?;
    let publisher = hub.token("office", Role::Agent, None).await?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{pc}\n"))?;

    let data = dir.path().join("data");
    let log_path = dir.path().join("agent.log");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_synchub-agent"))
        .args(["run", "--hub", &hub.url, "--space", DEFAULT_SPACE])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--dir")
        .arg(&data)
        .args(["--status-listen", "off"])
        .env("RUST_LOG", "debug")
        .env_remove("SYNCHUB_TOKEN")
        .stdout(Stdio::from(std::fs::File::create(&log_path)?))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log_path)?,
        ))
        .spawn()
        .context("starting synchub-agent")?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.id()))?;

    // A publish, a force-sync by the admin, and a request with a wrong token.
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("a.json"), b"{}")?;
    let api = HubApi::new(vec![hub.url.clone()], &publisher)?;
    let version = synchub_client::publish(&api, DEFAULT_SPACE, None, &[src], None)
        .await?
        .head
        .version;
    let wrong = "shb_0000000000000000000000000000000000000000000000000000000000000000";
    let refused = synchub_tests::fixtures::http()
        .get(format!("{}/api/v1/spaces", hub.url))
        .bearer_auth(wrong)
        .send()
        .await?;
    ensure!(refused.status() == 401);
    let forced = synchub_tests::fixtures::http()
        .post(format!(
            "{}/api/v1/spaces/{DEFAULT_SPACE}/force-sync",
            hub.url
        ))
        .bearer_auth(&hub.admin_token)
        .json(&serde_json::json!({ "reason": "check" }))
        .send()
        .await?;
    ensure!(forced.status() == 201, "force-sync: {}", forced.status());

    // The agent applies the forced version (and reports it).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.join("current/a.json").exists() {
        ensure!(
            Instant::now() < deadline,
            "the agent did not sync version {version}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.kill()?;
    agent.wait()?;
    let admin = hub.admin_token.clone();
    hub.stop().await;

    let agent_log = std::fs::read_to_string(&log_path)?;
    let hub_log = String::from_utf8(hub_log.0.lock().expect("lock").clone())?;
    ensure!(
        !agent_log.is_empty() && !hub_log.is_empty(),
        "no logs captured"
    );
    ensure!(
        agent_log.contains("DEBUG"),
        "the agent did not log at debug"
    );
    let cmdline = String::from_utf8_lossy(&cmdline);
    let secrets = [
        ("admin", admin.as_str()),
        ("pc", pc.as_str()),
        ("publisher", publisher.as_str()),
        ("wrong", wrong),
    ];
    for (name, secret) in secrets {
        // Half a secret is as good as the whole for guessing; look for its random part.
        let part = &secret[4..36];
        assert!(
            !hub_log.contains(part),
            "the {name} token is in the hub's log"
        );
        assert!(
            !agent_log.contains(part),
            "the {name} token is in the agent's log"
        );
        assert!(
            !cmdline.contains(part),
            "the {name} token is on the agent's command line"
        );
    }
    Ok(())
}
