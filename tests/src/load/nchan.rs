//! The fan-out peer: nginx with the nchan module (Debian: `nginx`, `libnginx-mod-nchan`), run
//! as a throwaway server on loopback, N WebSocket subscribers on one channel, and rounds of one
//! HTTP publish of a `sync_required` frame each. The subscribers are read by the same code
//! as the hub's agent sockets ([`read_agent`]) and the server's CPU is read from `/proc`
//! like the hub's (master and workers), so the figures compare with `fanout` and `floor`.

use super::floor::sync_required_json;
use super::{Arrival, Figures, median, percentile, proc_cpu_secs, read_agent, small_ws_config};
use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where Debian's package puts the module.
const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// What to run.
#[derive(Clone, Debug)]
pub struct NchanOptions {
    pub subscribers: usize,
    pub rounds: usize,
    /// nginx worker processes (the hub runs one process with a worker thread per core).
    pub workers: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct NchanReport {
    pub subscribers: usize,
    pub rounds: usize,
    pub workers: usize,
    pub connect_secs: f64,
    /// Publishes whose frame reached every subscriber.
    pub delivered: usize,
    pub missing: usize,
    /// From just before the publish request to each subscriber having the frame.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Per round, when the last subscriber had it; the median over rounds.
    pub last_ms_median: f64,
    /// nginx's CPU (master and workers) per delivered frame, µs.
    pub server_cpu_us_per_frame: Option<f64>,
}

impl NchanReport {
    pub fn figures(&self) -> Figures {
        let mut f = Figures::from([
            ("nchan.p50_ms".to_owned(), self.p50_ms),
            ("nchan.p99_ms".to_owned(), self.p99_ms),
            ("nchan.last_ms".to_owned(), self.last_ms_median),
            ("nchan.missing".to_owned(), self.missing as f64),
        ]);
        if let Some(us) = self.server_cpu_us_per_frame {
            f.insert("nchan.server_cpu_us_per_frame".into(), us);
        }
        f
    }
}

impl std::fmt::Display for NchanReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nginx+nchan, {} subscribers x {} rounds, {} worker(s): p50 {:.2} ms  p99 {:.2} ms  \
             last (median) {:.2} ms  missing {}  server CPU {} µs/frame",
            self.subscribers,
            self.rounds,
            self.workers,
            self.p50_ms,
            self.p99_ms,
            self.last_ms_median,
            self.missing,
            self.server_cpu_us_per_frame
                .map_or("?".to_owned(), |us| format!("{us:.1}"))
        )
    }
}

/// A running nginx, stopped on drop.
struct Nginx {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(workers: usize, connections: usize) -> Result<Nginx> {
        if !Path::new(NCHAN_MODULE).exists() {
            bail!(
                "{NCHAN_MODULE} is missing: install the peer with \
                 `apt-get install nginx libnginx-mod-nchan`"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("synchub-nchan-")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::write(
            dir.path().join("nginx.conf"),
            config(dir.path(), workers, connections, port),
        )?;
        let child = tokio::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            // Not the test's own output: a worker left behind would hold it open, and a test
            // run piped through `tee` would wait for it for good.
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting nginx (apt-get install nginx libnginx-mod-nchan)")?;
        let nginx = Nginx {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                let said = std::fs::read_to_string(nginx._dir.path().join("stderr.log"))
                    .unwrap_or_default();
                bail!(
                    "nginx did not listen on {port} within 10 s: {}",
                    said.trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(nginx)
    }

    /// CPU of the master and its workers, seconds.
    fn cpu_secs(&self) -> Option<f64> {
        let master = self.child.id()?;
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        let mut total = proc_cpu_secs(master)?;
        for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
            total += proc_cpu_secs(pid)?;
        }
        Some(total)
    }
}

impl Drop for Nginx {
    /// A TERM to the master stops its workers too, once it has had the time to (a KILL, which
    /// the child gets when dropped, would leave them running): up to 5 s.
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// nginx.conf for one channel `/sub/fanout` (WebSocket subscribers) and `/pub/fanout`.
fn config(dir: &Path, workers: usize, connections: usize, port: u16) -> String {
    // Workers drop to `nobody` when nginx starts as root; they must read the temp folder.
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    let files = connections + 1000;
    format!(
        "load_module {NCHAN_MODULE};\n{user}worker_processes {workers};\n\
         worker_rlimit_nofile {files};\npid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections {files}; multi_accept on; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {tmp};\n\
           nchan_max_reserved_memory 256M;\n\
           server {{\n    listen 127.0.0.1:{port} backlog=4096;\n\
             location = /sub/fanout {{ nchan_subscriber websocket; nchan_channel_id fanout; \
               nchan_subscriber_first_message newest; }}\n\
             location = /pub/fanout {{ nchan_publisher http; nchan_channel_id fanout; \
               nchan_message_buffer_length 1; }}\n  }}\n}}\n",
        pid = dir.join("nginx.pid").display(),
        err = dir.join("error.log").display(),
        tmp = dir.join("body").display(),
    )
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Starts nginx+nchan, connects `subscribers` WebSockets, publishes `rounds` frames.
pub async fn nchan_fanout(opts: &NchanOptions) -> Result<NchanReport> {
    synchub_hub::blobs::s3::install_crypto_provider();
    let nginx = Nginx::start(opts.workers, opts.subscribers).await?;
    let url = format!("ws://127.0.0.1:{}/sub/fanout", nginx.port);
    let (tx, mut rx) = mpsc::unbounded_channel::<Arrival>();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let sockets: Vec<Result<_>> = futures::stream::iter(0..opts.subscribers)
        .map(|_| {
            let url = url.clone();
            async move {
                let (s, _) = tokio_tungstenite::connect_async_with_config(
                    url.as_str(),
                    Some(small_ws_config()),
                    true,
                )
                .await?;
                Ok(s)
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let mut readers = Vec::with_capacity(opts.subscribers);
    for (i, s) in sockets.into_iter().enumerate() {
        let s = s.with_context(|| format!("subscriber {i} of {}", opts.subscribers))?;
        readers.push(tokio::spawn(read_agent(
            i as u32,
            s,
            tx.clone(),
            stop.clone(),
        )));
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let publish_url = format!("http://127.0.0.1:{}/pub/fanout", nginx.port);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let n = opts.subscribers;
    let (mut all, mut lasts, mut delivered) = (Vec::new(), Vec::new(), 0usize);
    let mut cpu = Some(0.0);
    for round in 0..opts.rounds {
        while rx.try_recv().is_ok() {}
        let version = 1_000 + round as u64;
        let body = sync_required_json(version);
        let mut arrived = vec![false; n];
        let mut count = 0usize;
        let mut last: f64 = 0.0;
        let cpu0 = nginx.cpu_secs();
        let t0 = Instant::now();
        let answer = http.post(&publish_url).body(body).send().await?;
        if !answer.status().is_success() {
            bail!("nchan refused the publish: {}", answer.status());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while count < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(a)) if a.version == version => {
                    if !std::mem::replace(&mut arrived[a.conn as usize], true) {
                        count += 1;
                        let ms = a.at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
                        last = last.max(ms);
                        all.push(ms);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let used = cpu0.zip(nginx.cpu_secs()).map(|(a, b)| b - a);
        cpu = cpu.zip(used).map(|(c, u)| c + u);
        delivered += count;
        lasts.push(last);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    drop(nginx);
    all.sort_by(f64::total_cmp);
    Ok(NchanReport {
        subscribers: n,
        rounds: opts.rounds,
        workers: opts.workers,
        connect_secs,
        delivered,
        missing: n * opts.rounds - delivered,
        p50_ms: percentile(&all, 50.0),
        p99_ms: percentile(&all, 99.0),
        last_ms_median: median(&mut lasts),
        server_cpu_us_per_frame: cpu
            .filter(|_| delivered > 0)
            .map(|c| c * 1e6 / delivered as f64),
    })
}
