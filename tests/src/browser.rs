//! Headless Chromium for tests of the pages people see (the agent's block page, the hub's
//! dashboard): render a page to its DOM or a screenshot, and read its visible text. A missing
//! Chromium fails the test with how to install it.

use anyhow::{Context, bail, ensure};
use std::path::PathBuf;
use std::time::Duration;

/// Chromium on PATH (Debian: `chromium`).
pub fn chromium() -> anyhow::Result<PathBuf> {
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    bail!("headless Chromium is missing: run scripts/install-test-deps (Debian package chromium)")
}

/// Runs Chromium headless with `args` on `url`; its stdout. Fails if it does not finish.
pub async fn run_chromium(args: &[&str], url: &str) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    let child = tokio::process::Command::new(chromium()?)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .with_context(|| format!("Chromium did not finish loading {url}"))??;
    ensure!(out.status.success(), "Chromium failed on {url}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The text a person reads: the body without tags and the script.
pub fn visible(dom: &str) -> String {
    let body = dom.split("<script").next().unwrap_or(dom);
    let mut out = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
