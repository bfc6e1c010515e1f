//! Fallback head checks: how many `GET .../head` answers (304 or 200) the hub serves per
//! second, driven from this process or by `wrk`.

use super::{Figures, Hub};
use anyhow::{Context, Result, anyhow, ensure};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct FallbackReport {
    /// `not_modified` (304) or `full` (200).
    pub answer: &'static str,
    pub tool: &'static str,
    pub connections: usize,
    pub secs: f64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_sec: f64,
}

impl FallbackReport {
    pub fn figures(&self) -> Figures {
        let mut f = Figures::new();
        f.insert(format!("{}.rps", self.answer), self.requests_per_sec);
        f.insert(format!("{}.errors", self.answer), self.errors as f64);
        f
    }
}

impl std::fmt::Display for FallbackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "head check ({}, {}): {:.0} requests/s over {} connections ({} requests, {} errors, \
             {:.1} s)",
            self.answer,
            self.tool,
            self.requests_per_sec,
            self.connections,
            self.requests,
            self.errors,
            self.secs
        )
    }
}

/// The ETag of the current head, for `If-None-Match`.
pub async fn head_etag(hub: &Hub, space: &str) -> Result<String> {
    let r = reqwest::Client::new()
        .get(hub.api(&format!("/spaces/{space}/head")))
        .bearer_auth(&hub.agent_token)
        .send()
        .await?
        .error_for_status()?;
    Ok(r.headers()
        .get("etag")
        .ok_or_else(|| anyhow!("head answer without ETag"))?
        .to_str()?
        .to_owned())
}

/// Head checks from this process: `connections` keep-alive connections, each sending one
/// request after the other for `duration`.
pub async fn fallback_builtin(
    hub: &Hub,
    space: &str,
    not_modified: bool,
    connections: usize,
    duration: Duration,
) -> Result<FallbackReport> {
    let etag = head_etag(hub, space).await?;
    let url = hub.api(&format!("/spaces/{space}/head"));
    let requests = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        // One client per task: one keep-alive connection each, like a PC's agent.
        let http = reqwest::Client::builder().http1_only().build()?;
        let (url, etag, token) = (url.clone(), etag.clone(), hub.agent_token.clone());
        let (requests, errors) = (requests.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let want = if not_modified { 304 } else { 200 };
            while Instant::now() < end {
                let mut req = http.get(&url).bearer_auth(&token);
                if not_modified {
                    req = req.header("if-none-match", &etag);
                }
                match req.send().await {
                    Ok(r) if r.status().as_u16() == want => {
                        let _ = r.bytes().await;
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = requests.load(Ordering::Relaxed);
    Ok(FallbackReport {
        answer: if not_modified { "not_modified" } else { "full" },
        tool: "builtin",
        connections,
        secs,
        requests: n,
        errors: errors.load(Ordering::Relaxed),
        requests_per_sec: n as f64 / secs,
    })
}

/// Head checks with `wrk` (Debian's package): a Lua script sets Authorization and, for 304
/// answers, If-None-Match; non-2xx/3xx answers count as errors.
pub async fn fallback_wrk(
    hub: &Hub,
    space: &str,
    not_modified: bool,
    connections: usize,
    threads: usize,
    duration: Duration,
) -> Result<FallbackReport> {
    let etag = head_etag(hub, space).await?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("head.lua");
    let mut lua = format!(
        "wrk.method = \"GET\"\nwrk.headers[\"Authorization\"] = \"Bearer {}\"\n",
        hub.agent_token
    );
    if not_modified {
        lua.push_str(&format!(
            "wrk.headers[\"If-None-Match\"] = '{}'\n",
            etag.replace('\'', "")
        ));
    }
    // wrk counts answers other than 2xx/3xx ("Non-2xx or 3xx responses") as errors.
    std::fs::write(&script, lua)?;
    let out = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("-s")
        .arg(&script)
        .arg(hub.api(&format!("/spaces/{space}/head")))
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk: install it with `apt-get install -y wrk`")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .ok_or_else(|| anyhow!("no Requests/sec in wrk's output: {text}"))?
        .trim()
        .parse()?;
    let requests: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let errors: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(FallbackReport {
        answer: if not_modified { "not_modified" } else { "full" },
        tool: "wrk",
        connections,
        secs: duration.as_secs_f64(),
        requests,
        errors,
        requests_per_sec: rps,
    })
}
