//! Headless Chromium for tests of the pages people see (the agent's block page, the hub's
//! dashboard): render a page to its DOM or a screenshot, and read its visible text; or drive
//! it over WebDriver ([`Browser`]: click, type, wait for live updates). A missing Chromium or
//! chromedriver fails the test with how to install it.

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

/// Headless Chromium driven over WebDriver (Debian's `chromedriver`, through `fantoccini`), to
/// click buttons and read pages that keep live connections open. The driver process is killed
/// on drop; call [`Browser::close`] to end the session cleanly first.
pub struct Browser {
    pub client: fantoccini::Client,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

/// `chromedriver` on PATH (Debian: `chromium-driver`).
pub fn chromedriver() -> anyhow::Result<PathBuf> {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let path = dir.join("chromedriver");
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("chromedriver is missing: run scripts/install-test-deps (Debian package chromium-driver)")
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless Chromium window of
    /// `width` x `height`.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Browser> {
        let chromium = chromium()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let driver = tokio::process::Command::new(chromedriver()?)
            .arg(format!("--port={port}"))
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let profile = tempfile::tempdir()?;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         format!("--window-size={width},{height}"),
                         format!("--user-data-dir={}", profile.path().display())],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("no WebDriver session from chromedriver within 20 s: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Ok(Browser {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    /// Waits until `check` of the page's visible text holds; the error shows the text.
    pub async fn wait_text(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let text = self.text().await?;
            if check(&text) {
                return Ok(text);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{what} not shown within {timeout:?}; the page says: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `css` selects, finding it again if the page redrew it meanwhile.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            let result = async {
                self.client
                    .find(fantoccini::Locator::Css(css))
                    .await?
                    .click()
                    .await
            }
            .await;
            match result {
                Ok(_) => return Ok(()),
                Err(e) if tries < 5 && e.to_string().contains("stale element") => tries += 1,
                Err(e) => return Err(e).with_context(|| format!("clicking {css}")),
            }
        }
    }

    /// The text a person reads on the page now.
    pub async fn text(&self) -> anyhow::Result<String> {
        let v = self
            .client
            .execute("return document.body.innerText", vec![])
            .await?;
        Ok(v.as_str()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// Saves a screenshot at `path` (tests use Cargo's test folder under target/).
    pub async fn screenshot(&self, path: PathBuf) -> anyhow::Result<PathBuf> {
        let png = self.client.screenshot().await?;
        std::fs::write(&path, png)?;
        eprintln!("screenshot: {}", path.display());
        Ok(path)
    }

    pub async fn close(self) -> anyhow::Result<()> {
        self.client.close().await?;
        Ok(())
    }
}
