//! `synchub-agent run` with its stderr not a terminal (a service log, a pipe) reports a long
//! download as plain lines: one every 2 s while it lasts, even while it is stalled, and one
//! when it is done. The download is stalled on purpose by a proxy that freezes mid-way.
//!
//! It lives in `client/tests` so that `CARGO_BIN_EXE_synchub-agent` is the agent just built.

use anyhow::{Context, ensure};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::Role;
use synchub_tests::fixtures::commit;
use synchub_tests::hub::TestHub;
use synchub_tests::proxy::{Fault, FaultProxy};

/// Kills the agent when the test ends, however it ends.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the agent's stderr holds a line containing `want`; returns everything so far.
fn wait_line(log: &Mutex<String>, want: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = log.lock().map_err(|_| anyhow::anyhow!("log lock"))?.clone();
        if text.lines().any(|l| l.contains(want)) {
            return Ok(text);
        }
        ensure!(
            Instant::now() < deadline,
            "no line with {want:?} within {timeout:?}; stderr:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_reports_plain_progress_lines_and_its_end() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let publisher = hub.token("secretariat", Role::Agent, None).await?;
    // 4 MB that do not compress, in four files.
    let bodies: Vec<Vec<u8>> = (0..4u8)
        .map(|f| {
            (0..1_000_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ f)
                .collect()
        })
        .collect();
    let names = ["a.bin", "b.bin", "c.bin", "d.bin"];
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&bodies)
        .map(|(n, b)| (*n, b.as_slice()))
        .collect();
    let (status, body) = commit(&hub, &publisher, 1, &files, &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");

    let proxy = FaultProxy::start(hub.url.trim_start_matches("http://").parse()?).await?;
    // The download stalls after 1.5 MB of it.
    proxy.freeze_after(1_500_000);
    let pc = hub.token("pc-sibiu-01", Role::Agent, None).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "hubs = [{:?}]\ntoken = {pc:?}\ndir = {:?}\nclient_id = \"pc-sibiu-01\"\n\
             read_timeout_ms = 60000\n",
            proxy.url(),
            dir.path().join("data"),
        ),
    )?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_synchub-agent"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting synchub-agent")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let _agent = Agent(child);
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut l) = sink.lock() {
                l.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });

    let wait = Duration::from_secs(20);
    let text = tokio::task::block_in_place(|| {
        wait_line(&log, "downloading global_version version 2: ", wait)
    })?;
    let line = text
        .lines()
        .find(|l| l.contains("downloading global_version"))
        .unwrap_or_default();
    ensure!(line.contains("of 4.00 MB ("), "{line}");
    ensure!(line.contains("of 4 files"), "{line}");
    ensure!(
        !text.contains('\u{1b}'),
        "terminal escapes in a pipe:\n{text}"
    );
    // Stalled: the lines keep coming (every 2 s), saying where it stands.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let stalled = log.lock().map_err(|_| anyhow::anyhow!("log lock"))?.clone();
    let count = stalled.matches("downloading global_version").count();
    ensure!(
        count >= 2,
        "{count} progress lines in 4.5 s of stall:\n{stalled}"
    );
    ensure!(!stalled.contains("downloaded global_version"), "{stalled}");
    proxy.set(Fault::Pass);
    let text = tokio::task::block_in_place(|| {
        wait_line(&log, "downloaded global_version version 2 in ", wait)
    })?;
    ensure!(text.contains("(now ready)"), "{text}");
    hub.stop().await;
    Ok(())
}
