//! Fan-out: N agent sockets, R rounds of head bumps of each [`BumpKind`] (force-sync, commit,
//! outside SQL UPDATE), and when each socket got each `sync_required`; plus the hub's RSS per
//! connection.

use super::{
    Arrival, Figures, Hub, holding_nothing, median, open_agent, percentile, read_agent,
    self_rss_kib,
};
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::StreamExt;
use serde::Serialize;
use sqlx::Connection;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use synchub_client::HubApi;
use synchub_protocol::{CommitRequest, DEFAULT_SPACE, ManifestEntry, Sha256Hex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
    /// The hub's CPU from just before a bump until every socket had it, per delivered frame
    /// (µs), over all rounds; it includes making the bump (a commit, a force-sync).
    pub hub_cpu_us_per_frame: Option<f64>,
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
            if let Some(us) = b.hub_cpu_us_per_frame {
                f.insert(format!("{k}.hub_cpu_us_per_frame"), us);
            }
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
                 max {:.2} ms  last (median of {} rounds) {:.2} ms  hub CPU {} µs/frame",
                b.kind.name(),
                b.delivered,
                b.expected,
                b.missing,
                b.p50_ms,
                b.p90_ms,
                b.p99_ms,
                b.max_ms,
                b.rounds,
                b.last_ms_median,
                b.hub_cpu_us_per_frame
                    .map_or("?".to_owned(), |us| format!("{us:.1}"))
            )?;
        }
        Ok(())
    }
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
                    match open_agent(url, token, holding_nothing(space), i, None).await {
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
    // Hub CPU seconds per kind, summed over rounds (None once a reading failed).
    let mut cpu: BTreeMap<&'static str, Option<f64>> = BTreeMap::new();
    let mut version = hub.head(&space).await?.version;
    for _round in 0..opts.rounds {
        for &kind in &kinds {
            // Drop anything left from the previous bump.
            while rx.try_recv().is_ok() {}
            let target = version + 1;
            let mut arrived: Vec<Option<Instant>> = vec![None; n];
            let mut count = 0usize;
            let cpu0 = hub.cpu_secs();
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
            let used = cpu0.zip(hub.cpu_secs()).map(|(a, b)| b - a);
            let total = cpu.entry(kind.name()).or_insert(Some(0.0));
            *total = total.zip(used).map(|(t, u)| t + u);
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
                hub_cpu_us_per_frame: cpu
                    .get(k.name())
                    .copied()
                    .flatten()
                    .filter(|_| delivered > 0)
                    .map(|secs| secs * 1e6 / delivered as f64),
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
