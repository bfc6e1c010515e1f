//! The load generator behind `synchub-load` and the benchmark smoke tests: starts a real
//! `synchub serve` process (so its memory can be read from `/proc`), drives it with real agent
//! WebSockets, HTTP head checks and `SyncClient`s, and measures what BENCHMARKS.md reports.
//!
//! One module per scenario: `fanout` ([`fanout()`]: N sockets, R rounds of head bumps:
//! force-sync, commit, outside SQL UPDATE; per-socket arrival times and hub RSS per
//! connection), `fallback` (head checks per second, 304 and 200), `download` (one agent: cold
//! and warm cache, with the data sets and [`publish_set`]), `idle_pg` (PostgreSQL transactions
//! per second with agents connected and idle), `floor` (the write-loop floor) and `herd` (N
//! simulated agents syncing at once after a bump, and the old way: every PC reading the dataset
//! from PostgreSQL). This module holds what they share: the hub process under test, agent
//! sockets, percentiles, and [`Figures`], which the binary turns into median (min, max) over
//! several runs.

mod download;
mod fallback;
mod fanout;
mod floor;
mod herd;
mod idle_pg;
mod nchan;
mod peers;

pub use download::*;
pub use fallback::*;
pub use fanout::*;
pub use floor::*;
pub use herd::*;
pub use idle_pg::*;
pub use nchan::*;
pub use peers::*;

use crate::postgres::PgCluster;
use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentFrame, Head, HeldSpace, HubFrame, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Named numbers of one run (`force.p99_ms`, `kib_per_connection`, ...), for medians over runs.
pub type Figures = BTreeMap<String, f64>;

/// Median, min and max of one figure over several runs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

/// Median (min, max) of every figure over `runs`.
pub fn summarize(runs: &[Figures]) -> BTreeMap<String, Spread> {
    let mut by_name: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in runs {
        for (k, v) in run {
            by_name.entry(k.clone()).or_default().push(*v);
        }
    }
    by_name
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            let median = if v.len() % 2 == 1 {
                v[v.len() / 2]
            } else {
                (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
            };
            let spread = Spread {
                median,
                min: v[0],
                max: v[v.len() - 1],
                runs: v.len(),
            };
            (k, spread)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The hub under test
// ---------------------------------------------------------------------------------------------

/// How to run a hub process: `synchub` itself, or a binary that runs the hub's CLI behind a
/// leading argument (`synchub-load hub ...`, which the smoke tests use because cargo builds it
/// for them).
#[derive(Clone, Debug)]
pub struct HubCommand {
    pub program: PathBuf,
    pub leading_args: Vec<String>,
}

impl HubCommand {
    /// `SYNCHUB_BIN` when set, else `synchub` in the same target folder as this executable.
    pub fn find() -> Result<HubCommand> {
        if let Some(p) = std::env::var_os("SYNCHUB_BIN") {
            return Ok(HubCommand {
                program: p.into(),
                leading_args: Vec::new(),
            });
        }
        let exe = std::env::current_exe()?;
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("synchub");
            if candidate.is_file() {
                return Ok(HubCommand {
                    program: candidate,
                    leading_args: Vec::new(),
                });
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        bail!(
            "no synchub binary beside {}: build it with `cargo build --release -p synchub-hub` \
             or set SYNCHUB_BIN",
            exe.display()
        )
    }

    fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        c.args(&self.leading_args);
        c
    }
}

/// Options for a hub process the generator starts.
#[derive(Clone, Debug)]
pub struct SpawnOptions {
    pub command: HubCommand,
    /// PostgreSQL (a private throwaway cluster) instead of SQLite.
    pub postgres: bool,
    /// SQLite only: the version-row poll interval (the hub's default is 250 ms).
    pub poll_interval_ms: Option<u64>,
    /// More lines for the hub's TOML configuration (e.g. `[limits]` to try buffer sizes).
    pub extra_config: Option<String>,
}

/// A hub being measured: started by us (killed on drop) or attached to.
pub struct Hub {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub admin_token: String,
    /// Token agents connect with (the admin token when attached).
    pub agent_token: String,
    /// For RSS readings; `None` when attached without `--hub-pid`.
    pub pid: Option<u32>,
    /// For outside SQL UPDATEs and the idle-query count; `None`: those are skipped.
    pub database_url: Option<String>,
    child: Option<tokio::process::Child>,
    pg: Option<PgCluster>,
    dir: Option<tempfile::TempDir>,
}

impl Hub {
    /// A hub someone else runs.
    pub fn attach(
        url: &str,
        admin_token: &str,
        pid: Option<u32>,
        database_url: Option<String>,
    ) -> Hub {
        synchub_hub::blobs::s3::install_crypto_provider();
        Hub {
            url: url.trim_end_matches('/').to_owned(),
            admin_token: admin_token.to_owned(),
            agent_token: admin_token.to_owned(),
            pid,
            database_url,
            child: None,
            pg: None,
            dir: None,
        }
    }

    /// Starts `synchub serve` on a fresh data folder (and database, made by `synchub init`
    /// on SQLite) on a free loopback port, with an admin and an agent token made by
    /// `synchub token create`.
    pub async fn spawn(opts: &SpawnOptions) -> Result<Hub> {
        synchub_hub::blobs::s3::install_crypto_provider();
        let dir = tempfile::Builder::new().prefix("synchub-load-").tempdir()?;
        let data = dir.path().join("data");
        let (pg, database_url) = if opts.postgres {
            let cluster = tokio::task::spawn_blocking(PgCluster::start).await??;
            let url = cluster.create_database().await?;
            (Some(cluster), url)
        } else {
            (None, format!("sqlite://{}", data.join("hub.db").display()))
        };
        let mut common = vec![
            "--data-dir".to_owned(),
            data.display().to_string(),
            "--database-url".to_owned(),
            database_url.clone(),
        ];
        {
            let mut toml = String::new();
            if let Some(ms) = opts.poll_interval_ms {
                toml.push_str(&format!("poll_interval_ms = {ms}\n"));
            }
            // Every simulated agent shares one token and one address (127.0.0.1): lift the
            // per-token socket cap and the per-address cap on connections not yet
            // authenticated, which a herd's burst of new HTTP connections would overrun.
            let no_cap = "[limits]\nmax_sockets_per_token = 0\nmax_unauthenticated_per_address = 0";
            match &opts.extra_config {
                Some(extra) if extra.contains("[limits]") => {
                    toml.push_str(&extra.replacen("[limits]", no_cap, 1));
                }
                Some(extra) => toml.push_str(&format!("{extra}\n{no_cap}")),
                None => toml.push_str(no_cap),
            }
            toml.push('\n');
            let cfg = dir.path().join("hub.toml");
            std::fs::write(&cfg, toml)?;
            common.extend(["--config".to_owned(), cfg.display().to_string()]);
        }
        let token = |name: &'static str, role: &'static str| {
            let mut c = opts.command.command();
            c.args(&common)
                .args(["token", "create", "--name", name, "--role", role])
                .env("RUST_LOG", "warn");
            async move {
                let out = c.output().await.context("running synchub token create")?;
                ensure!(
                    out.status.success(),
                    "synchub token create failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok::<_, anyhow::Error>(String::from_utf8(out.stdout)?.trim().to_owned())
            }
        };
        if pg.is_none() {
            // `token create` refuses a database that does not exist: create the hub first.
            let mut c = opts.command.command();
            c.args(&common).arg("init").env("RUST_LOG", "warn");
            let out = c.output().await.context("running synchub init")?;
            ensure!(
                out.status.success(),
                "synchub init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let admin_token = token("bench-admin", "admin").await?;
        let agent_token = token("bench-agent", "agent").await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.path().join("hub.log"))?;
        let mut c = opts.command.command();
        c.args(&common)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env(
                "RUST_LOG",
                std::env::var("SYNCHUB_LOAD_HUB_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = c.spawn().context("starting synchub serve")?;
        let pid = child.id();
        let mut hub = Hub {
            url: format!("http://127.0.0.1:{port}"),
            admin_token,
            agent_token,
            pid,
            database_url: Some(database_url),
            child: Some(child),
            pg,
            dir: Some(dir),
        };
        hub.wait_healthy(Duration::from_secs(30)).await?;
        Ok(hub)
    }

    async fn wait_healthy(&mut self, within: Duration) -> Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("the hub exited ({status}): {}", self.log_tail());
            }
            let ok = http
                .get(format!("{}/readyz", self.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the hub did not become ready: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The hub's whole log (empty for an attached hub).
    pub fn log_text(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|dir| std::fs::read_to_string(dir.path().join("hub.log")).ok())
            .unwrap_or_default()
    }

    /// The end of the hub's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let start = text.len().saturating_sub(2000);
        text[text.floor_char_boundary(start)..].to_owned()
    }

    /// `ws://127.0.0.1:PORT/api/v1/ws`
    pub fn ws_url(&self) -> String {
        format!("{}/api/v1/ws", self.url.replacen("http", "ws", 1))
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.url)
    }

    /// The loopback address the herd's connection `i` comes from when the hub listens on
    /// 127.0.0.1 (see [`SOURCE_ADDRESSES`]); `None` (the system's choice) for any other hub.
    pub fn source_address(&self, i: usize) -> Option<IpAddr> {
        let last = 2 + (i % SOURCE_ADDRESSES) as u8;
        self.url
            .starts_with("http://127.0.0.1:")
            .then_some(IpAddr::from([127, 0, 0, last]))
    }

    /// The hub's resident memory, KiB (`VmRSS`), when its pid is known.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The hub's user + system CPU so far, seconds, when its pid is known.
    pub fn cpu_secs(&self) -> Option<f64> {
        proc_cpu_secs(self.pid?)
    }

    /// The head of `space`, read over HTTP.
    pub async fn head(&self, space: &str) -> Result<Head> {
        self.admin_get(&format!("/spaces/{space}/head")).await
    }

    /// An admin's `GET` of `path` (under the API prefix), its JSON answer decoded.
    pub async fn admin_get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = reqwest::Client::new()
            .get(self.api(path))
            .bearer_auth(&self.admin_token)
            .send()
            .await?
            .error_for_status()?;
        Ok(r.json().await?)
    }

    /// The PostgreSQL cluster this hub runs on, when we started one.
    pub fn postgres(&self) -> Option<&PgCluster> {
        self.pg.as_ref()
    }

    /// Kills the hub we started (nothing when attached); the cluster and folder go on drop.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agent sockets and statistics, shared by the scenarios
// ---------------------------------------------------------------------------------------------

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Small buffers, so the generator's side of 19,000 sockets stays small too.
fn small_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 << 10)
        .write_buffer_size(0)
        .max_write_buffer_size(64 << 10)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// The loopback addresses the herd spreads its connections over (127.0.0.2 and up). From one
/// address, Linux gives `connect` about 14,000 ports toward one server port (the odd half of
/// its ephemeral range); 10,000 agent sockets and thousands of HTTP connections fill them, and
/// each new connection then scans far for a free port: a quarter of the generator's CPU in the
/// 50-file herd, and more with every run's sockets left in `TIME_WAIT`. A real fleet's PCs each
/// have an address of their own.
pub const SOURCE_ADDRESSES: usize = 8;

/// The client id simulated agent `id` says `hello` and reports with: one id per PC, as the
/// agent keeps it.
pub fn client_id(id: usize) -> String {
    format!("load-{id}")
}

/// One agent socket, from `from` when given: bearer token, `hello` saying it holds `held`,
/// then `welcome`.
async fn open_agent(
    url: &str,
    token: &str,
    held: HeldSpace,
    id: usize,
    from: Option<IpAddr>,
) -> Result<Socket> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    let config = Some(small_ws_config());
    let (mut socket, _) = match from {
        None => tokio_tungstenite::connect_async_with_config(request, config, true).await?,
        Some(from) => {
            let to: SocketAddr = request
                .uri()
                .authority()
                .context("a hub URL without host and port")?
                .as_str()
                .parse()?;
            let tcp = tokio::net::TcpSocket::new_v4()?;
            tcp.bind(SocketAddr::new(from, 0))?;
            let tcp = tcp.connect(to).await?;
            tcp.set_nodelay(true)?;
            let tcp = MaybeTlsStream::Plain(tcp);
            tokio_tungstenite::client_async_with_config(request, tcp, config).await?
        }
    };
    let hello = AgentFrame::Hello {
        protocol: PROTOCOL_VERSION,
        client_id: client_id(id),
        spaces: vec![held],
        agent_version: Some("synchub-load".into()),
        hostname: None,
    };
    socket
        .send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<HubFrame>(&t)? {
                HubFrame::Welcome { .. } => return Ok(socket),
                HubFrame::Ping => {}
                other => bail!("expected welcome, got {other:?}"),
            },
            Some(Ok(Message::Close(c))) => bail!("closed before welcome: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before welcome"),
        }
    }
}

/// One `sync_required` seen by one socket.
struct Arrival {
    conn: u32,
    version: u64,
    at: Instant,
}

/// Reads one socket until stopped: notes each `sync_required` with its arrival instant and
/// answers the hub's `ping`.
async fn read_agent(
    conn: u32,
    mut socket: Socket,
    arrivals: mpsc::UnboundedSender<Arrival>,
    stop: CancellationToken,
) {
    let pong = serde_json::to_string(&AgentFrame::Pong).expect("frames serialize");
    loop {
        let msg = tokio::select! {
            m = socket.next() => m,
            _ = stop.cancelled() => break,
        };
        let at = Instant::now();
        match msg {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<HubFrame>(&t) {
                Ok(HubFrame::SyncRequired(head)) => {
                    let _ = arrivals.send(Arrival {
                        conn,
                        version: head.version,
                        at,
                    });
                }
                Ok(HubFrame::Ping)
                    if socket
                        .send(Message::Text(pong.clone().into()))
                        .await
                        .is_err() =>
                {
                    break;
                }
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    let _ = socket.close(None).await;
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_ms.len() as f64).ceil() as usize;
    sorted_ms[rank.clamp(1, sorted_ms.len()) - 1]
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A space held at version 0 with no data: what the fan-out sockets say they hold.
fn holding_nothing(space: &str) -> HeldSpace {
    HeldSpace {
        space: space.to_owned(),
        version: 0,
        data_hash: None,
    }
}

/// The hub's `[blob_store]` section for a bucket of the test S3 server.
pub fn s3_blob_store_config(b: &synchub_hub::blobs::s3::S3Config) -> String {
    format!(
        "[blob_store]\nkind = \"s3\"\nendpoint = {:?}\nregion = {:?}\nbucket = {:?}\n\
         prefix = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\npath_style = true\n\
         allow_http = true\n",
        b.endpoint.clone().unwrap_or_default(),
        b.region,
        b.bucket,
        b.prefix,
        b.access_key_id,
        b.secret_access_key
    )
}

/// A process's user + system CPU so far, seconds (`/proc/PID/stat`, in clock ticks of
/// 1/100 s: Linux's `USER_HZ` on the architectures this runs on).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The process's own RSS, KiB.
pub fn self_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_spread() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        let runs = vec![
            Figures::from([("a".to_owned(), 3.0)]),
            Figures::from([("a".to_owned(), 1.0)]),
            Figures::from([("a".to_owned(), 2.0)]),
        ];
        let s = summarize(&runs);
        assert_eq!(
            s["a"],
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0,
                runs: 3
            }
        );
    }
}
