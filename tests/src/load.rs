//! The load generator behind `synchub-load` and the benchmark smoke tests: starts a real
//! `synchub serve` process (so its memory can be read from `/proc`), drives it with real agent
//! WebSockets, HTTP head checks and `SyncClient`s, and measures what BENCHMARKS.md reports.
//!
//! Scenarios: [`fanout`] (N sockets, R rounds of head bumps: force-sync, commit, outside SQL
//! UPDATE; per-socket arrival times and hub RSS per connection), [`fallback_builtin`] /
//! [`fallback_wrk`] (head checks per second, 304 and 200), [`download`] (one agent: cold and
//! warm cache) with [`publish_set`], and [`idle_pg`] (PostgreSQL transactions per second with
//! agents connected and idle). Every scenario returns a serializable report whose
//! [`Figures`] the binary turns into median (min, max) over several runs.

use crate::postgres::PgCluster;
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use sqlx::Connection;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use synchub_client::{AgentConfig, HubApi, SyncClient};
use synchub_protocol::{
    AgentFrame, AgentState, CommitRequest, DEFAULT_SPACE, Head, HeldSpace, HubFrame, ManifestEntry,
    PROTOCOL_VERSION, Sha256Hex,
};
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
            // Every simulated agent shares one token: lift the per-token socket cap.
            let no_cap = "[limits]\nmax_sockets_per_token = 0";
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

    /// The end of the hub's log, for error messages.
    pub fn log_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let text = std::fs::read_to_string(dir.path().join("hub.log")).unwrap_or_default();
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

    /// The hub's resident memory, KiB (`VmRSS`), when its pid is known.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The head of `space`, read over HTTP.
    pub async fn head(&self, space: &str) -> Result<Head> {
        let r = reqwest::Client::new()
            .get(self.api(&format!("/spaces/{space}/head")))
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
// Fan-out
// ---------------------------------------------------------------------------------------------

/// How a round moves the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BumpKind {
    /// `POST /spaces/{space}/force-sync`.
    Force,
    /// `POST /spaces/{space}/commits` with one small file.
    Commit,
    /// `UPDATE sync_metadata SET version = version + 1` from outside the hub.
    Sql,
}

impl BumpKind {
    pub const ALL: [BumpKind; 3] = [BumpKind::Force, BumpKind::Commit, BumpKind::Sql];

    pub fn name(self) -> &'static str {
        match self {
            BumpKind::Force => "force",
            BumpKind::Commit => "commit",
            BumpKind::Sql => "sql",
        }
    }
}

impl std::str::FromStr for BumpKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "force" => Ok(BumpKind::Force),
            "commit" => Ok(BumpKind::Commit),
            "sql" => Ok(BumpKind::Sql),
            o => Err(format!("unknown bump kind {o:?}: use force, commit or sql")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FanoutOptions {
    pub connections: usize,
    pub rounds: usize,
    /// Handshakes in flight at once.
    pub connect_concurrency: usize,
    pub kinds: Vec<BumpKind>,
    pub space: String,
    /// Longest wait for every socket to get one bump.
    pub bump_timeout: Duration,
    /// Longest wait for all sockets to be welcomed.
    pub connect_timeout: Duration,
    /// Pause between bumps, so one bump's stragglers do not overlap the next.
    pub pause: Duration,
}

impl Default for FanoutOptions {
    fn default() -> Self {
        FanoutOptions {
            connections: 1000,
            rounds: 3,
            connect_concurrency: 200,
            kinds: BumpKind::ALL.to_vec(),
            space: DEFAULT_SPACE.to_owned(),
            bump_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(120),
            pause: Duration::from_millis(200),
        }
    }
}

/// Delivery of one kind of bump over all rounds.
#[derive(Clone, Debug, Serialize)]
pub struct BumpStats {
    pub kind: BumpKind,
    pub rounds: usize,
    /// connections × rounds.
    pub expected: usize,
    pub delivered: usize,
    pub missing: usize,
    /// Latency from just before the bump was made to the `sync_required` reaching a socket,
    /// over every (socket, round).
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Per round: when the last socket had it; the median over rounds.
    pub last_ms_median: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FanoutReport {
    pub connections: usize,
    pub welcomed: usize,
    pub connect_secs: f64,
    pub hub_rss_before_kib: Option<u64>,
    pub hub_rss_after_kib: Option<u64>,
    pub kib_per_connection: Option<f64>,
    /// This generator's own RSS after connecting.
    pub generator_rss_kib: Option<u64>,
    pub bumps: Vec<BumpStats>,
}

impl FanoutReport {
    pub fn figures(&self) -> Figures {
        let mut f = Figures::new();
        f.insert("connect_secs".into(), self.connect_secs);
        if let Some(k) = self.kib_per_connection {
            f.insert("kib_per_connection".into(), k);
        }
        for b in &self.bumps {
            let k = b.kind.name();
            f.insert(format!("{k}.missing"), b.missing as f64);
            f.insert(format!("{k}.p50_ms"), b.p50_ms);
            f.insert(format!("{k}.p90_ms"), b.p90_ms);
            f.insert(format!("{k}.p99_ms"), b.p99_ms);
            f.insert(format!("{k}.max_ms"), b.max_ms);
            f.insert(format!("{k}.last_ms"), b.last_ms_median);
        }
        f
    }
}

impl std::fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections welcomed in {:.2} s",
            self.welcomed, self.connect_secs
        )?;
        if let (Some(b), Some(a), Some(k)) = (
            self.hub_rss_before_kib,
            self.hub_rss_after_kib,
            self.kib_per_connection,
        ) {
            write!(f, "; hub RSS {b} -> {a} KiB = {k:.2} KiB/connection")?;
        }
        for b in &self.bumps {
            write!(
                f,
                "\n  {:<6} delivered {}/{} missing {}  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  \
                 max {:.2} ms  last (median of {} rounds) {:.2} ms",
                b.kind.name(),
                b.delivered,
                b.expected,
                b.missing,
                b.p50_ms,
                b.p90_ms,
                b.p99_ms,
                b.max_ms,
                b.rounds,
                b.last_ms_median
            )?;
        }
        Ok(())
    }
}

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

/// One agent socket: bearer token, `hello` for `space` (holding nothing), then `welcome`.
async fn open_agent(url: &str, token: &str, space: &str, id: usize) -> Result<Socket> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(small_ws_config()), true)
            .await?;
    let hello = AgentFrame::Hello {
        protocol: PROTOCOL_VERSION,
        client_id: format!("load-{id}"),
        spaces: vec![HeldSpace {
            space: space.to_owned(),
            version: 0,
            data_hash: None,
        }],
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

/// Moves the head of a space, one way per [`BumpKind`].
struct Bumper {
    http: reqwest::Client,
    api: HubApi,
    hub_url: String,
    admin_token: String,
    space: String,
    sql: Option<SqlConn>,
    blob: ManifestEntry,
    commits: u64,
}

enum SqlConn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl SqlConn {
    async fn open(url: &str) -> Result<SqlConn> {
        if url.starts_with("sqlite:") {
            use std::str::FromStr;
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
                .busy_timeout(Duration::from_secs(10));
            Ok(SqlConn::Sqlite(
                sqlx::SqliteConnection::connect_with(&opts).await?,
            ))
        } else {
            Ok(SqlConn::Postgres(sqlx::PgConnection::connect(url).await?))
        }
    }

    /// What an outside writer (system 1) does: bump the version row by hand.
    async fn bump(&mut self, space: &str) -> Result<()> {
        let n = match self {
            SqlConn::Sqlite(c) => sqlx::query(
                "UPDATE sync_metadata SET version = version + 1, last_modified_by = 'synchub-load' \
                 WHERE sync_key = ?1",
            )
            .bind(space)
            .execute(c)
            .await?
            .rows_affected(),
            SqlConn::Postgres(c) => sqlx::query(
                "UPDATE sync_metadata SET version = version + 1, last_modified_by = 'synchub-load' \
                 WHERE sync_key = $1",
            )
            .bind(space)
            .execute(c)
            .await?
            .rows_affected(),
        };
        ensure!(n == 1, "no sync_metadata row for {space:?}");
        Ok(())
    }
}

impl Bumper {
    async fn new(hub: &Hub, space: &str) -> Result<Bumper> {
        let api = HubApi::new(vec![hub.url.clone()], &hub.admin_token)?;
        let bytes = b"synchub-load commit bump\n".to_vec();
        let sha256 = Sha256Hex::of(&bytes);
        api.put_blob(&sha256, bytes.clone().into()).await?;
        let sql = match &hub.database_url {
            Some(u) => Some(SqlConn::open(u).await?),
            None => None,
        };
        Ok(Bumper {
            http: reqwest::Client::new(),
            api,
            hub_url: hub.url.clone(),
            admin_token: hub.admin_token.clone(),
            space: space.to_owned(),
            sql,
            blob: ManifestEntry {
                path: String::new(),
                size: bytes.len() as u64,
                sha256,
            },
            commits: 0,
        })
    }

    async fn bump(&mut self, kind: BumpKind, base: u64) -> Result<()> {
        match kind {
            BumpKind::Force => {
                self.http
                    .post(format!(
                        "{}/api/v1/spaces/{}/force-sync",
                        self.hub_url, self.space
                    ))
                    .bearer_auth(&self.admin_token)
                    .json(&serde_json::json!({"reason": "synchub-load"}))
                    .send()
                    .await?
                    .error_for_status()?;
            }
            BumpKind::Commit => {
                self.commits += 1;
                let mut entry = self.blob.clone();
                entry.path = format!("synchub-load/bump-{}-{}.txt", base, self.commits);
                let req = CommitRequest {
                    base_version: base,
                    puts: vec![entry],
                    deletes: Vec::new(),
                    message: Some("synchub-load".into()),
                };
                self.api.commit(&self.space, &req).await?;
            }
            BumpKind::Sql => {
                let sql = self
                    .sql
                    .as_mut()
                    .ok_or_else(|| anyhow!("no database URL for an outside UPDATE"))?;
                sql.bump(&self.space).await?;
            }
        }
        Ok(())
    }
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

/// The process's own RSS, KiB.
pub fn self_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Opens `connections` agent sockets to `hub`, then bumps the head `rounds` times per kind and
/// records when each socket got each `sync_required`.
pub async fn fanout(hub: &Hub, opts: &FanoutOptions) -> Result<FanoutReport> {
    let space = opts.space.clone();
    // Let the hub settle (its first requests allocate) before the baseline reading.
    hub.head(&space).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = hub.rss_kib();

    let (tx, mut rx) = mpsc::unbounded_channel::<Arrival>();
    let stop = CancellationToken::new();
    let url = hub.ws_url();
    let started = Instant::now();
    let opened = futures::stream::iter(0..opts.connections)
        .map(|i| {
            let (url, token, space) = (&url, &hub.agent_token, &space);
            async move {
                let mut last = None;
                // A busy listen queue can refuse a handshake now and then: retry a few times.
                for attempt in 0..5u64 {
                    match open_agent(url, token, space, i).await {
                        Ok(s) => return Ok((i, s)),
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
                }
                Err(last.expect("at least one attempt"))
            }
        })
        .buffer_unordered(opts.connect_concurrency.max(1));
    let mut welcomed = 0usize;
    let mut first_error = None;
    let mut readers = Vec::with_capacity(opts.connections);
    let connect = async {
        let mut opened = std::pin::pin!(opened);
        while let Some(r) = opened.next().await {
            match r {
                Ok((i, socket)) => {
                    welcomed += 1;
                    readers.push(tokio::spawn(read_agent(
                        i as u32,
                        socket,
                        tx.clone(),
                        stop.clone(),
                    )));
                }
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(e);
                    }
                }
            }
        }
    };
    if tokio::time::timeout(opts.connect_timeout, connect)
        .await
        .is_err()
    {
        stop.cancel();
        bail!(
            "only {welcomed} of {} sockets welcomed within {:?}",
            opts.connections,
            opts.connect_timeout
        );
    }
    let connect_secs = started.elapsed().as_secs_f64();
    if welcomed < opts.connections {
        stop.cancel();
        bail!(
            "only {welcomed} of {} sockets were welcomed; first error: {:#}",
            opts.connections,
            first_error.map(|e| e.to_string()).unwrap_or_default()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = hub.rss_kib();
    let generator_rss = self_rss_kib();

    let mut bumper = Bumper::new(hub, &space).await?;
    let mut kinds = opts.kinds.clone();
    if bumper.sql.is_none() {
        kinds.retain(|k| *k != BumpKind::Sql);
    }
    let n = opts.connections;
    let mut latencies: BTreeMap<&'static str, (Vec<f64>, Vec<f64>, usize)> = BTreeMap::new();
    let mut version = hub.head(&space).await?.version;
    for _round in 0..opts.rounds {
        for &kind in &kinds {
            // Drop anything left from the previous bump.
            while rx.try_recv().is_ok() {}
            let target = version + 1;
            let mut arrived: Vec<Option<Instant>> = vec![None; n];
            let mut count = 0usize;
            let t0 = Instant::now();
            bumper
                .bump(kind, version)
                .await
                .with_context(|| format!("bumping by {}", kind.name()))?;
            let deadline = tokio::time::Instant::now() + opts.bump_timeout;
            while count < n {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(a)) if a.version >= target => {
                        let slot = &mut arrived[a.conn as usize];
                        if slot.is_none() {
                            *slot = Some(a.at);
                            count += 1;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            version = target;
            let entry = latencies.entry(kind.name()).or_default();
            let mut last: f64 = 0.0;
            for at in arrived.iter().flatten() {
                let ms = at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
                last = last.max(ms);
                entry.0.push(ms);
            }
            entry.1.push(last);
            entry.2 += count;
            tokio::time::sleep(opts.pause).await;
        }
    }
    stop.cancel();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }

    let bumps = kinds
        .iter()
        .map(|k| {
            let (mut all, mut lasts, delivered) = latencies.remove(k.name()).unwrap_or_default();
            all.sort_by(f64::total_cmp);
            let expected = n * opts.rounds;
            BumpStats {
                kind: *k,
                rounds: opts.rounds,
                expected,
                delivered,
                missing: expected - delivered,
                p50_ms: percentile(&all, 50.0),
                p90_ms: percentile(&all, 90.0),
                p99_ms: percentile(&all, 99.0),
                max_ms: all.last().copied().unwrap_or(0.0),
                last_ms_median: median(&mut lasts),
            }
        })
        .collect();
    let kib_per_connection = match (rss_before, rss_after) {
        (Some(b), Some(a)) if n > 0 => Some((a as f64 - b as f64) / n as f64),
        _ => None,
    };
    Ok(FanoutReport {
        connections: n,
        welcomed,
        connect_secs,
        hub_rss_before_kib: rss_before,
        hub_rss_after_kib: rss_after,
        kib_per_connection,
        generator_rss_kib: generator_rss,
        bumps,
    })
}

// ---------------------------------------------------------------------------------------------
// Fallback head checks
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Data sets, publish and download
// ---------------------------------------------------------------------------------------------

/// What one agent downloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSet {
    /// System 2's QR codes: `folders` range folders, `files` PNG-sized files of ~5 KB.
    QrLike { folders: usize, files: usize },
    /// Many small files (~1 KB) in folders of 100.
    SmallFiles { files: usize },
    /// One large file (plus a small one that the warm run changes).
    Large { bytes: u64 },
}

impl DataSet {
    /// A set shaped like the QR-code app's folder: 54 folders, 508 files, ~2.5 MB.
    pub const QR: DataSet = DataSet::QrLike {
        folders: 54,
        files: 508,
    };

    pub fn name(&self) -> String {
        match self {
            DataSet::QrLike { files, .. } => format!("qr-{files}"),
            DataSet::SmallFiles { files } => format!("small-{files}"),
            DataSet::Large { bytes } => format!("large-{}MiB", bytes >> 20),
        }
    }
}

/// A fast deterministic byte stream: incompressible like PNGs, without a crypto RNG's cost.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A QR-like folder name: system 2 names range folders by part code.
fn part_code(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("{:05}-{:05}-F", 4313 + i * 7, 11100 + i * 13)
    } else {
        format!("Y{:06}-{:05}", 129120 + i * 11, 1780 + i * 3)
    }
}

/// Writes `set` under `dir`; returns (files, bytes) and the path of the file the warm run
/// changes.
pub fn generate_set(set: DataSet, dir: &Path, seed: u64) -> Result<(u64, u64, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let mut noise = Noise(seed | 1);
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut large = 0u64;
    let mut write = |path: PathBuf, size: usize, noise: &mut Noise| -> Result<PathBuf> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut buf = vec![0u8; size];
        noise.fill(&mut buf);
        std::fs::write(&path, &buf)?;
        files += 1;
        bytes += size as u64;
        Ok(path)
    };
    let first = match set {
        DataSet::QrLike {
            folders,
            files: count,
        } => {
            let mut first = None;
            for i in 0..count {
                let folder = part_code(i % folders.max(1));
                // 4.0 to 6.0 KB, ~5 KB on average: 508 files make ~2.5 MB.
                let size = 4000 + (i * 397) % 2000;
                let p = write(
                    dir.join(&folder).join(format!("{folder}_{i:04}.png")),
                    size,
                    &mut noise,
                )?;
                first.get_or_insert(p);
            }
            first.ok_or_else(|| anyhow!("empty set"))?
        }
        DataSet::SmallFiles { files: count } => {
            let mut first = None;
            for i in 0..count {
                let p = write(
                    dir.join(format!("d{:04}", i / 100))
                        .join(format!("f{i:06}.bin")),
                    800 + (i * 131) % 400,
                    &mut noise,
                )?;
                first.get_or_insert(p);
            }
            first.ok_or_else(|| anyhow!("empty set"))?
        }
        DataSet::Large { bytes: size } => {
            let path = dir.join("large.bin");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
            let mut buf = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                noise.fill(&mut buf[..n]);
                std::io::Write::write_all(&mut f, &buf[..n])?;
                left -= n as u64;
            }
            std::io::Write::flush(&mut f)?;
            large = size;
            write(dir.join("small.txt"), 1000, &mut noise)?
        }
    };
    let large_files = u64::from(large > 0);
    Ok((files + large_files, bytes + large, first))
}

/// Rewrites one file with new bytes of the same size (the warm run's change).
pub fn change_file(path: &Path, seed: u64) -> Result<()> {
    let len = std::fs::metadata(path)?.len() as usize;
    let mut buf = vec![0u8; len];
    Noise(seed | 1).fill(&mut buf);
    std::fs::write(path, buf)?;
    Ok(())
}

#[derive(Clone, Debug, Serialize)]
pub struct PublishReport {
    pub set: String,
    pub files: u64,
    pub bytes: u64,
    pub secs: f64,
    pub version: u64,
}

impl PublishReport {
    pub fn figures(&self) -> Figures {
        Figures::from([(format!("{}.publish_secs", self.set), self.secs)])
    }
}

impl std::fmt::Display for PublishReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "publish {} ({} files, {:.1} MB) as one commit: {:.3} s -> v{}",
            self.set,
            self.files,
            self.bytes as f64 / 1e6,
            self.secs,
            self.version
        )
    }
}

/// Publishes the files under `dir` to `space` as one commit, as an agent's `publish` does
/// (hash, ask which blobs are missing, upload them, commit).
pub async fn publish_set(
    hub: &Hub,
    space: &str,
    dir: &Path,
    set: DataSet,
) -> Result<PublishReport> {
    let api = HubApi::new(vec![hub.url.clone()], &hub.admin_token)?;
    let started = Instant::now();
    let out = synchub_client::publish(&api, space, None, &[dir.to_path_buf()], None)
        .await
        .context("publishing")?;
    let secs = started.elapsed().as_secs_f64();
    Ok(PublishReport {
        set: set.name(),
        files: out.files,
        bytes: out.bytes_uploaded,
        secs,
        version: out.head.version,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct DownloadReport {
    pub set: String,
    pub files: u64,
    pub bytes: u64,
    pub publish_secs: f64,
    /// From the agent leaving `ready` (its `sync_required`) to `ready` at the new version,
    /// with an empty cache.
    pub cold_secs: f64,
    pub cold_mb_per_sec: f64,
    /// The same after one file changed.
    pub warm_secs: f64,
}

impl DownloadReport {
    pub fn figures(&self) -> Figures {
        let s = &self.set;
        Figures::from([
            (format!("{s}.publish_secs"), self.publish_secs),
            (format!("{s}.cold_secs"), self.cold_secs),
            (format!("{s}.cold_mb_per_sec"), self.cold_mb_per_sec),
            (format!("{s}.warm_secs"), self.warm_secs),
        ])
    }
}

impl std::fmt::Display for DownloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "download {} ({} files, {:.1} MB): cold {:.3} s ({:.0} MB/s), warm (one file \
             changed) {:.3} s; publish {:.3} s",
            self.set,
            self.files,
            self.bytes as f64 / 1e6,
            self.cold_secs,
            self.cold_mb_per_sec,
            self.warm_secs,
            self.publish_secs
        )
    }
}

/// Waits for the agent to leave `ready` at `from` and come back ready at `to` or newer; the
/// time between the two.
async fn time_sync(
    rx: &mut tokio::sync::watch::Receiver<AgentState>,
    from: u64,
    to: u64,
    within: Duration,
) -> Result<(Instant, Instant)> {
    let deadline = tokio::time::Instant::now() + within;
    let mut left: Option<Instant> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        match state {
            AgentState::Ready { version } if version >= to => {
                let now = Instant::now();
                return Ok((left.unwrap_or(now), now));
            }
            AgentState::Ready { version } if version == from => {}
            AgentState::Failed { error, .. } => bail!("the agent failed: {error}"),
            _ => {
                left.get_or_insert_with(Instant::now);
            }
        }
        tokio::time::timeout_at(deadline, rx.changed())
            .await
            .map_err(|_| {
                anyhow!(
                    "agent not ready at v{to} within {within:?}: {:?}",
                    rx.borrow()
                )
            })?
            .map_err(|_| anyhow!("agent stopped"))?;
    }
}

/// One agent (`SyncClient`) downloads `set`: published while the agent waits at the empty
/// head (cold cache), then again after one file changed (warm).
pub async fn download(hub: &Hub, set: DataSet, work: &Path) -> Result<DownloadReport> {
    let space = DEFAULT_SPACE;
    let src = work.join("src");
    let (files, bytes, changed) = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || generate_set(set, &src, 7)).await??
    };
    let agent_dir = work.join("agent");
    let config = AgentConfig {
        hubs: vec![hub.url.clone()],
        token: hub.agent_token.clone(),
        spaces: vec![space.to_owned()],
        dir: agent_dir,
        status_listen: None,
        download_jitter_ms: 0,
        ..AgentConfig::default()
    };
    let agent = SyncClient::start(config).await?;
    let result = async {
        let v0 = hub.head(space).await?.version;
        agent
            .wait_ready(None, v0, Duration::from_secs(30))
            .await
            .context("agent ready before the publish")?;
        let mut rx = agent.subscribe(None)?;
        rx.borrow_and_update();
        let limit = Duration::from_secs(600);

        let publish = publish_set(hub, space, &src, set).await?;
        let (a, b) = time_sync(&mut rx, v0, publish.version, limit).await?;
        let cold = b.duration_since(a).as_secs_f64();

        change_file(&changed, 99)?;
        let warm_pub = publish_set(hub, space, &src, set).await?;
        let (a, b) = time_sync(&mut rx, publish.version, warm_pub.version, limit).await?;
        let warm = b.duration_since(a).as_secs_f64();
        Ok::<_, anyhow::Error>(DownloadReport {
            set: set.name(),
            files,
            bytes,
            publish_secs: publish.secs,
            cold_secs: cold,
            cold_mb_per_sec: bytes as f64 / 1e6 / cold.max(1e-9),
            warm_secs: warm,
        })
    }
    .await;
    agent.shutdown().await;
    result
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL at idle
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub struct IdleReport {
    pub agents: usize,
    /// One figure per window.
    pub windows: Vec<IdleWindow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdleWindow {
    pub secs: f64,
    pub transactions: i64,
    pub transactions_per_sec: f64,
}

impl std::fmt::Display for IdleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgreSQL at idle with {} agents:", self.agents)?;
        for w in &self.windows {
            write!(
                f,
                "\n  {} transactions in {:.1} s = {:.2} per second",
                w.transactions, w.secs, w.transactions_per_sec
            )?;
        }
        Ok(())
    }
}

/// Transactions committed and rolled back in the hub's database so far. Read through a
/// connection to the `postgres` database, so that reading does not count.
async fn xact_count(cluster: &PgCluster, db: &str) -> Result<i64> {
    let mut c = sqlx::PgConnection::connect(&cluster.url("postgres")).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
    )
    .bind(db)
    .fetch_one(&mut c)
    .await?;
    c.close().await?;
    Ok(n)
}

/// With `agents` sockets connected and idle, counts the hub database's transactions per second
/// in `windows` consecutive windows of `window`, after `settle` (PostgreSQL's statistics
/// reach `pg_stat_database` up to ~10 s late from idle backends, so settle at least that long
/// for exact figures).
pub async fn idle_pg(
    hub: &Hub,
    agents: usize,
    settle: Duration,
    window: Duration,
    windows: usize,
) -> Result<IdleReport> {
    let cluster = hub
        .postgres()
        .ok_or_else(|| anyhow!("idle-pg needs a hub the generator started on PostgreSQL"))?;
    let url = hub
        .database_url
        .as_deref()
        .ok_or_else(|| anyhow!("no database URL"))?;
    let db = url
        .rsplit('/')
        .next()
        .and_then(|d| d.split('?').next())
        .ok_or_else(|| anyhow!("no database name in {url}"))?
        .to_owned();
    let (tx, _rx) = mpsc::unbounded_channel::<Arrival>();
    let stop = CancellationToken::new();
    let ws = hub.ws_url();
    let sockets: Vec<_> = futures::stream::iter(0..agents)
        .map(|i| {
            let (ws, token) = (&ws, &hub.agent_token);
            async move { open_agent(ws, token, DEFAULT_SPACE, i).await }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let mut readers = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        readers.push(tokio::spawn(read_agent(
            i as u32,
            s?,
            tx.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(settle).await;
    let mut out = Vec::new();
    let mut before = xact_count(cluster, &db).await?;
    for _ in 0..windows {
        let t = Instant::now();
        tokio::time::sleep(window).await;
        let after = xact_count(cluster, &db).await?;
        let secs = t.elapsed().as_secs_f64();
        out.push(IdleWindow {
            secs,
            transactions: after - before,
            transactions_per_sec: (after - before) as f64 / secs,
        });
        before = after;
    }
    stop.cancel();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    Ok(IdleReport {
        agents,
        windows: out,
    })
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

    #[test]
    fn qr_set_is_the_size_of_system_2s() {
        let dir = tempfile::tempdir().unwrap();
        let (files, bytes, _) = generate_set(DataSet::QR, dir.path(), 1).unwrap();
        assert_eq!(files, 508);
        assert!((2_400_000..2_700_000).contains(&bytes), "{bytes}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 54);
    }
}
