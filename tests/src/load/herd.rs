//! Herd: N simulated agents that hold the QR set, and one bump that sends all of them to the
//! hub at once. Each agent does over the network what the real agent does: `hello` /
//! `welcome`, then on `sync_required` a `downloading` status frame, the manifest as a delta
//! from the version it holds (the one the frame carries when it starts from that version,
//! else `?from=V`; rebuilt and checked against the announced `data_hash`; the full manifest,
//! hash checked before parsing, when the hub sends that instead or the delta does not check
//! out), the new blobs the frame carries (each checked against its sha256) and one pack of the
//! others it lacks (each blob's sha256 checked), a `ready` status frame and a `report` frame,
//! counted once the hub acknowledges it. Nothing is written to disk, and a forced sync's local re-hash (work on each PC, not on the hub) is
//! left out. Answers 429 and 503 are honoured by waiting `Retry-After`, as the agent does.
//!
//! The herd shares two cores with the hub, so the generator keeps its own CPU down without
//! asking the hub for less: the agents that held the same version and were sent the same
//! answer share one plan (the rebuilt manifest and the list of blobs to fetch), and an answer
//! or a pack is checked by comparing its bytes with the copy that was checked first (a delta
//! rebuilt and hashed, every blob of a pack hashed). Every agent still sends every request
//! and reads every byte; an answer that differs from the first is checked in full on its own.
//!
//! Cases: a commit changing 1 file, one changing 50, and a force-sync. Per case: time from
//! just before the bump until each agent held the new version (p50, p99, last), the hub's CPU
//! seconds and peak RSS (from `/proc`), body bytes the agents received, throttled answers and
//! requests that failed for good. [`old_way`] measures what the desktop app does without the
//! hub: every PC reads the whole dataset from PostgreSQL after a version change.

use super::{DataSet, generate_set};
use super::{Figures, Hub, SOURCE_ADDRESSES, open_agent, percentile, publish_set};
use crate::postgres::PgCluster;
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use sha2::Digest;
use sqlx::{Connection, Row};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_client::HubApi;
use synchub_protocol::{
    AgentFrame, AgentState, BlobList, CommitRequest, DEFAULT_SPACE, DELTA_CONTENT_TYPE, FrameDelta,
    Head, HeldSpace, HubFrame, Manifest, ManifestDelta, ManifestEntry, Sha256Hex, Spread,
    SyncReport, SyncStatus, SyncType, pack,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Most entries a simulated agent accepts in a manifest (the agent's own bound).
const MAX_MANIFEST_ENTRIES: usize = 2_000_000;

/// Deadline of one HTTP request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Failed attempts of one request before it counts as failed for good (429/503 answers are
/// not failures; see [`MAX_THROTTLED`]).
const ATTEMPTS: u32 = 20;

/// 429/503 answers one request takes before it counts as failed for good.
const MAX_THROTTLED: u32 = 300;

/// What one case changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HerdCase {
    /// A commit that changes one file's bytes.
    OneFile,
    /// A commit that changes fifty files' bytes.
    FiftyFiles,
    /// `POST .../force-sync`: every agent re-verifies (no blob changes).
    Force,
}

impl HerdCase {
    pub const ALL: [HerdCase; 3] = [HerdCase::OneFile, HerdCase::FiftyFiles, HerdCase::Force];

    pub fn name(self) -> &'static str {
        match self {
            HerdCase::OneFile => "one_file",
            HerdCase::FiftyFiles => "fifty_files",
            HerdCase::Force => "force",
        }
    }

    fn files_changed(self) -> usize {
        match self {
            HerdCase::OneFile => 1,
            HerdCase::FiftyFiles => 50,
            HerdCase::Force => 0,
        }
    }
}

impl std::str::FromStr for HerdCase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "one_file" | "1" => Ok(HerdCase::OneFile),
            "fifty_files" | "50" => Ok(HerdCase::FiftyFiles),
            "force" => Ok(HerdCase::Force),
            o => Err(format!(
                "unknown herd case {o:?}: use one_file, fifty_files or force"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HerdOptions {
    pub agents: usize,
    pub cases: Vec<HerdCase>,
    /// Handshakes in flight at once.
    pub connect_concurrency: usize,
    /// HTTP requests in flight at once from the whole herd. One process may hold ~19,000
    /// open files here, and the sockets take one each: the rest is shared by the downloads.
    pub http_connections: usize,
    /// Longest wait for every agent to hold one case's version and report it.
    pub case_timeout: Duration,
    /// Wait a random time within the hub's spread hint before a non-forced download, as the
    /// agent does. Off by default: every agent starts at once, the worst case.
    pub spread: bool,
    pub connect_timeout: Duration,
}

impl Default for HerdOptions {
    fn default() -> Self {
        HerdOptions {
            agents: 1000,
            cases: HerdCase::ALL.to_vec(),
            connect_concurrency: 200,
            http_connections: 4096,
            case_timeout: Duration::from_secs(120),
            spread: false,
            connect_timeout: Duration::from_secs(120),
        }
    }
}

/// One case, over the whole herd.
#[derive(Clone, Debug, Serialize)]
pub struct CaseStats {
    pub case: HerdCase,
    pub agents: usize,
    /// Agents that held the new version within the case's time limit.
    pub converged: usize,
    /// The publisher's uploads of the changed files before its commit (not counted below).
    pub upload_ms: f64,
    /// From just before the bump (the commit, or the force-sync) to an agent holding the new
    /// version (hashes checked).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub last_ms: f64,
    /// Reports the hub stored (answered 2xx).
    pub reports: u64,
    /// The hub's user + system CPU from just before the bump until every report was stored.
    pub hub_cpu_secs: Option<f64>,
    /// This load generator's own CPU over the same time (it shares the machine with the hub).
    pub load_cpu_secs: Option<f64>,
    /// Body bytes the agents received (manifests and packs).
    pub bytes: u64,
    /// The hub's peak RSS during the case (reset before it where the kernel allows).
    pub hub_peak_rss_kib: Option<u64>,
    /// 429 and 503 answers (each honoured by waiting `Retry-After`).
    pub throttled: u64,
    /// Requests that failed for good (after retries) or answers that did not check out.
    pub failed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct HerdReport {
    pub agents: usize,
    pub set: String,
    pub set_files: u64,
    pub set_bytes: u64,
    pub connect_secs: f64,
    pub cases: Vec<CaseStats>,
}

impl HerdReport {
    pub fn figures(&self) -> Figures {
        let mut f = Figures::new();
        for c in &self.cases {
            let k = c.case.name();
            f.insert(format!("{k}.upload_ms"), c.upload_ms);
            f.insert(format!("{k}.p50_ms"), c.p50_ms);
            f.insert(format!("{k}.p99_ms"), c.p99_ms);
            f.insert(format!("{k}.last_ms"), c.last_ms);
            f.insert(format!("{k}.missing"), (c.agents - c.converged) as f64);
            f.insert(format!("{k}.mb"), c.bytes as f64 / 1e6);
            f.insert(format!("{k}.throttled"), c.throttled as f64);
            f.insert(format!("{k}.failed"), c.failed as f64);
            if let Some(cpu) = c.hub_cpu_secs {
                f.insert(format!("{k}.hub_cpu_secs"), cpu);
            }
            if let Some(cpu) = c.load_cpu_secs {
                f.insert(format!("{k}.load_cpu_secs"), cpu);
            }
            if let Some(rss) = c.hub_peak_rss_kib {
                f.insert(format!("{k}.hub_peak_rss_mib"), rss as f64 / 1024.0);
            }
        }
        f
    }
}

impl std::fmt::Display for HerdReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} agents holding {} ({} files, {:.1} MB), welcomed in {:.2} s",
            self.agents,
            self.set,
            self.set_files,
            self.set_bytes as f64 / 1e6,
            self.connect_secs
        )?;
        for c in &self.cases {
            let cpu = c.hub_cpu_secs.map_or("?".into(), |s| format!("{s:.2}"));
            let load = c.load_cpu_secs.map_or("?".into(), |s| format!("{s:.2}"));
            let rss = c
                .hub_peak_rss_kib
                .map_or("?".into(), |k| format!("{:.0}", k as f64 / 1024.0));
            write!(
                f,
                "\n  {:<11} held {}/{}  p50 {:.0} ms  p99 {:.0} ms  last {:.0} ms  hub CPU {cpu} s  \
                 load CPU {load} s  {:.1} MB  peak RSS {rss} MiB  429/503 {}  failed {}  reports {}  \
                 (uploads before the commit {:.0} ms)",
                c.case.name(),
                c.converged,
                c.agents,
                c.p50_ms,
                c.p99_ms,
                c.last_ms,
                c.bytes as f64 / 1e6,
                c.throttled,
                c.failed,
                c.reports,
                c.upload_ms
            )?;
        }
        Ok(())
    }
}

/// What every simulated agent shares: the HTTP clients (one per source address, see
/// [`Hub::source_address`]; their pools bounded together by `permits`), the counters, and the
/// manifests already parsed (one copy per data hash, not one per agent).
struct Shared {
    clients: Vec<reqwest::Client>,
    /// The same per source address for packs asked for uncompressed (see [`PackClient`]).
    pack_clients: Vec<PackClient>,
    next_client: AtomicUsize,
    api: String,
    token: String,
    space: String,
    permits: Semaphore,
    bytes: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
    reports: AtomicU64,
    manifests: Mutex<HashMap<Sha256Hex, Arc<Manifest>>>,
    /// What agents that held one data hash do to reach another, worked out once from the
    /// first answer (see the module comment).
    plans: Mutex<HashMap<PlanKey, Arc<Plan>>>,
    /// Whether agents honour the spread hint ([`HerdOptions::spread`]).
    spread: bool,
}

/// The data hash held, the one announced, and whether the frame's delta (and blobs) was used.
type PlanKey = (Sha256Hex, Sha256Hex, bool);

/// A sync from one data hash to another, as the first agent to make it worked it out.
struct Plan {
    /// The delta it was worked out from (the frame's, or the answer to `manifest?from=`).
    answer: bytes::Bytes,
    /// The full manifest too, when the answer was not a usable delta.
    full: Option<bytes::Bytes>,
    manifest: Arc<Manifest>,
    /// The blobs the frame carried (each checked against its hash), which are not fetched.
    carried: Vec<synchub_protocol::FrameBlob>,
    /// The blobs to fetch, in packs of at most 1,000, and whether to ask for them compressed.
    packs: Vec<Vec<(Sha256Hex, u64)>>,
    compressible: bool,
    /// Each pack's body once one was checked blob by blob.
    checked: Vec<std::sync::OnceLock<bytes::Bytes>>,
    fetched: u64,
    changed: u64,
}

impl Shared {
    /// The HTTP client for the next request, in turn.
    fn http(&self) -> &reqwest::Client {
        self.in_turn(&self.clients)
    }

    /// The client for the next uncompressed pack, in turn.
    fn pack_http(&self) -> &PackClient {
        self.in_turn(&self.pack_clients)
    }

    /// The next of `clients` (one per source address), in turn.
    fn in_turn<'a, C>(&self, clients: &'a [C]) -> &'a C {
        &clients[self.next_client.fetch_add(1, Ordering::Relaxed) % clients.len()]
    }

    /// Sends `make()` until it is answered 2xx: 429/503 wait `Retry-After` (1 s when absent),
    /// other failures back off; the body, or an error once the attempts are spent.
    async fn request(&self, make: impl Fn() -> reqwest::RequestBuilder) -> Result<bytes::Bytes> {
        Ok(self
            .request_typed(|| Answer::send(make()), None)
            .await?
            .1
            .into_bytes())
    }

    /// Like [`Shared::request`] for any client (`send` makes one attempt), with whether the
    /// answer is a manifest delta, and the body read against `like` when given (see
    /// [`read_body`]). Each attempt, answer and body, has [`REQUEST_DEADLINE`].
    async fn request_typed<F>(
        &self,
        send: impl Fn() -> F,
        like: Option<&std::sync::OnceLock<bytes::Bytes>>,
    ) -> Result<(bool, Body)>
    where
        F: Future<Output = Result<Answer, String>>,
    {
        let mut last = String::new();
        // As the agent: a 429/503 is the hub pacing the herd, not a failed attempt; only the
        // case's time limit bounds those waits (and MAX_THROTTLED, against a hub that never
        // lets anyone in).
        let (mut attempt, mut throttled) = (0u32, 0u32);
        while attempt < ATTEMPTS && throttled < MAX_THROTTLED {
            let sent = {
                let _permit = self.permits.acquire().await?;
                let one_try = async {
                    match send().await {
                        Ok(r) if r.status().is_success() => {
                            let delta = r
                                .headers()
                                .get(reqwest::header::CONTENT_TYPE)
                                .is_some_and(|v| v.as_bytes() == DELTA_CONTENT_TYPE.as_bytes());
                            match read_body(r, like).await {
                                Ok((n, b)) => Ok((delta, n, b)),
                                Err(e) => Err((None, e)),
                            }
                        }
                        Ok(r) => {
                            let wait = r
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.trim().parse::<u64>().ok());
                            Err((Some((r.status().as_u16(), wait)), r.status().to_string()))
                        }
                        Err(e) => Err((None, e)),
                    }
                };
                tokio::time::timeout(REQUEST_DEADLINE, one_try)
                    .await
                    .unwrap_or_else(|_| Err((None, "no answer within the deadline".into())))
            };
            match sent {
                Ok((delta, n, b)) => {
                    self.bytes.fetch_add(n, Ordering::Relaxed);
                    return Ok((delta, b));
                }
                Err((Some((429 | 503, wait)), why)) => {
                    throttled += 1;
                    self.throttled.fetch_add(1, Ordering::Relaxed);
                    let secs = wait.unwrap_or(1).clamp(1, 60);
                    // Spread the retries over the second after the hint, as agents do.
                    let jitter = rand::random_range(0..1000u64);
                    tokio::time::sleep(Duration::from_secs(secs) + Duration::from_millis(jitter))
                        .await;
                    last = why;
                }
                Err((_, why)) => {
                    last = why;
                    if attempt >= 3 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    attempt += 1;
                }
            }
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        bail!("request failed for good: {last}")
    }

    /// The full manifest of `head`, its hash checked before parsing; one shared copy per hash.
    async fn manifest(&self, head: &Head) -> Result<(bytes::Bytes, Arc<Manifest>)> {
        let url = format!(
            "{}/spaces/{}/versions/{}/manifest",
            self.api, head.space, head.version
        );
        let bytes = self
            .request(|| self.http().get(&url).bearer_auth(&self.token))
            .await?;
        if Sha256Hex::of(&bytes) != head.data_hash {
            self.failed.fetch_add(1, Ordering::Relaxed);
            bail!("manifest of v{} does not match its data_hash", head.version);
        }
        let parsed = Manifest::from_canonical(&bytes, MAX_MANIFEST_ENTRIES)?;
        Ok((bytes, self.share(head, parsed)?))
    }

    /// The one shared copy of the manifest of `head.data_hash`.
    fn share(&self, head: &Head, parsed: Manifest) -> Result<Arc<Manifest>> {
        let mut known = self.manifests.lock().map_err(|_| anyhow!("poisoned"))?;
        Ok(known
            .entry(head.data_hash.clone())
            .or_insert_with(|| Arc::new(parsed))
            .clone())
    }

    /// Works out the sync from `held` to `head` from the answer to `manifest?from=` (a delta
    /// rebuilt and checked against `data_hash`, or the whole manifest hash checked), fetching
    /// the whole manifest when that answer is not usable, as the agent falls back to.
    async fn plan(
        &self,
        head: &Head,
        held: &Manifest,
        answer: bytes::Bytes,
        delta: bool,
        carried: &[synchub_protocol::FrameBlob],
    ) -> Result<Plan> {
        let rebuilt = if delta {
            ManifestDelta::parse(&answer, MAX_MANIFEST_ENTRIES)
                .ok()
                .filter(|d| d.to == head.data_hash)
                .and_then(|d| d.apply(held).ok())
        } else if Sha256Hex::of(&answer) == head.data_hash {
            Manifest::from_canonical(&answer, MAX_MANIFEST_ENTRIES).ok()
        } else {
            None
        };
        let (full, manifest) = match rebuilt {
            Some(m) => (None, self.share(head, m)?),
            None => {
                let (bytes, m) = self.manifest(head).await?;
                (Some(bytes), m)
            }
        };
        // As the agent: a carried blob counts only when its bytes hash right.
        let mut carried_bytes = 0;
        let carried: Vec<_> = carried
            .iter()
            .filter(|b| {
                let bytes = b.checked_bytes();
                carried_bytes += bytes.as_ref().map_or(0, |b| b.len() as u64);
                bytes.is_some()
            })
            .cloned()
            .collect();
        let mut have: HashSet<&Sha256Hex> = held.entries().iter().map(|e| &e.sha256).collect();
        have.extend(carried.iter().map(|b| &b.sha256));
        let mut seen = HashSet::new();
        let wanted: Vec<&ManifestEntry> = manifest
            .entries()
            .iter()
            .filter(|e| !have.contains(&e.sha256) && seen.insert(&e.sha256))
            .collect();
        // As the agent: a pack of files already compressed (the QR set's PNGs) is asked for
        // without compression.
        let compressible = wanted.iter().any(|e| pack::worth_compressing(&e.path));
        let need: Vec<(Sha256Hex, u64)> =
            wanted.iter().map(|e| (e.sha256.clone(), e.size)).collect();
        // The agent's pack limit: at most 1,000 blobs in one request.
        let packs: Vec<Vec<_>> = need.chunks(1000).map(<[_]>::to_vec).collect();
        Ok(Plan {
            answer,
            full,
            carried,
            checked: packs.iter().map(|_| std::sync::OnceLock::new()).collect(),
            fetched: carried_bytes + need.iter().map(|(_, s)| s).sum::<u64>(),
            changed: manifest.changes_from(held),
            manifest,
            packs,
            compressible,
        })
    }

    /// Fetches pack `k` of `plan` and checks it: against the body already checked, else
    /// every blob's size and hash (and keeps it as the checked body).
    async fn pack(&self, plan: &Plan, k: usize) -> Result<()> {
        let blobs = &plan.packs[k];
        let list = BlobList {
            sha256: blobs.iter().map(|(h, _)| h.clone()).collect(),
        };
        let url = format!("{}/blobs/pack", self.api);
        let like = Some(&plan.checked[k]);
        let answer = if plan.compressible {
            let send = || Answer::send(self.http().post(&url).bearer_auth(&self.token).json(&list));
            self.request_typed(send, like).await?
        } else {
            let body = bytes::Bytes::from(serde_json::to_vec(&list)?);
            let send = || self.pack_http().post(&url, &self.token, body.clone());
            self.request_typed(send, like).await?
        };
        let body = match answer.1 {
            Body::Same(_) => return Ok(()),
            Body::Other(body) => body,
        };
        let checked = check_pack(&body, blobs);
        match checked {
            Ok(()) => {
                let _ = plan.checked[k].set(body);
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        checked
    }
}

/// A client for packs asked for uncompressed: hyper's, with a read buffer of a fixed
/// [`PACK_READ_BUFFER`]. Through reqwest, hyper grows each connection's read buffer up to
/// ~400 KB and takes a fresh one for each read while the last chunk is still held; with a
/// fixed size the generator's allocator (see `GLOBAL` in `synchub-load`) hands the same few
/// blocks out again. Measured at 10,000 agents and a 50-file bump (2.5 GB over 4,096
/// connections), the generator took 4.3–5.5 s of CPU with reqwest and glibc's allocator, 7–15 s
/// with reqwest and mimalloc (fresh memory for the growing buffers), and 2.7–3.0 s with
/// this client and mimalloc; the rest of it is on the cores the hub it measures runs on.
struct PackClient(
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
);

/// The read buffer of a [`PackClient`] connection.
const PACK_READ_BUFFER: usize = 64 * 1024;

impl PackClient {
    /// From `from`, at most `idle` connections kept for the next requests.
    fn new(from: Option<std::net::IpAddr>, idle: usize) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_local_address(from);
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(REQUEST_DEADLINE));
        PackClient(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(idle)
                .http1_read_buf_exact_size(PACK_READ_BUFFER)
                .build(connector),
        )
    }

    /// `POST url` with `json`, uncompressed.
    async fn post(&self, url: &str, token: &str, json: bytes::Bytes) -> Result<Answer, String> {
        let request = hyper::Request::post(url)
            .header(reqwest::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT_ENCODING, "identity")
            .body(http_body_util::Full::new(json))
            .map_err(|e| e.to_string())?;
        match self.0.request(request).await {
            Ok(r) => Ok(Answer::Hyper(r)),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// An answer from either client, read the same way.
enum Answer {
    Reqwest(reqwest::Response),
    Hyper(hyper::Response<hyper::body::Incoming>),
}

impl Answer {
    async fn send(request: reqwest::RequestBuilder) -> Result<Answer, String> {
        request
            .send()
            .await
            .map(Answer::Reqwest)
            .map_err(|e| e.to_string())
    }

    fn status(&self) -> reqwest::StatusCode {
        match self {
            Answer::Reqwest(r) => r.status(),
            Answer::Hyper(r) => r.status(),
        }
    }

    fn headers(&self) -> &reqwest::header::HeaderMap {
        match self {
            Answer::Reqwest(r) => r.headers(),
            Answer::Hyper(r) => r.headers(),
        }
    }

    /// The body's length, when the answer says it.
    fn content_length(&self) -> Option<u64> {
        self.headers()
            .get(reqwest::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }

    /// The body's next chunk; `None` at its end.
    async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        match self {
            Answer::Reqwest(r) => r.chunk().await.map_err(|e| e.to_string()),
            Answer::Hyper(r) => {
                use http_body_util::BodyExt;
                while let Some(frame) = r.body_mut().frame().await {
                    match frame.map_err(|e| e.to_string())?.into_data() {
                        Ok(data) => return Ok(Some(data)),
                        // Trailers: not data.
                        Err(_) => continue,
                    }
                }
                Ok(None)
            }
        }
    }
}

/// A response body, as [`read_body`] read it.
enum Body {
    /// The same bytes as the body it was read against (that body).
    Same(bytes::Bytes),
    /// Other bytes (or no body to read against): to be checked in full.
    Other(bytes::Bytes),
}

impl Body {
    fn into_bytes(self) -> bytes::Bytes {
        match self {
            Body::Same(b) | Body::Other(b) => b,
        }
    }
}

/// Reads a response body (its length and the body). Against `like`, when it holds a body by
/// the time the first chunk arrives, chunk by chunk, keeping nothing while the bytes match:
/// most agents of the herd receive what another already checked in full, and collecting
/// 250 KB per agent only to compare it cost the generator a fifth of its CPU (allocations,
/// copies and page faults) on the cores it shares with the hub. `like` is looked at then, not
/// when the request is sent: after a bump thousands of requests go out before the first pack
/// has come back. A body that differs is kept whole and checked on its own.
async fn read_body(
    mut r: Answer,
    like: Option<&std::sync::OnceLock<bytes::Bytes>>,
) -> Result<(u64, Body), String> {
    let Some(first) = r.chunk().await? else {
        return Ok((0, Body::Other(bytes::Bytes::new())));
    };
    let mut at = 0;
    let mut next = Some(first);
    let like = like.and_then(std::sync::OnceLock::get);
    if let Some(like) = like {
        while let Some(chunk) = next.take() {
            if like.get(at..at + chunk.len()) != Some(&chunk[..]) {
                next = Some(chunk);
                break;
            }
            at += chunk.len();
            next = r.chunk().await?;
        }
        if next.is_none() {
            let body = if at == like.len() {
                Body::Same(like.clone())
            } else {
                Body::Other(like.slice(..at))
            };
            return Ok((at as u64, body));
        }
    }
    // Kept whole: no body to compare with, or one that differs from it at `at`.
    let expected = r.content_length().unwrap_or(0).min(MAX_PREALLOCATED);
    let mut all = bytes::BytesMut::with_capacity(usize::try_from(expected).unwrap_or(0));
    all.extend_from_slice(like.map_or(&[][..], |l| &l[..at]));
    while let Some(chunk) = next.take() {
        all.extend_from_slice(&chunk);
        next = r.chunk().await?;
    }
    Ok((all.len() as u64, Body::Other(all.freeze())))
}

/// Most bytes set aside for a body from its announced length before any has arrived.
const MAX_PREALLOCATED: u64 = 64 << 20;

/// Reads a pack body: for each expected blob in order, `<sha256> <size>\n` and the bytes,
/// whose hash must match.
fn check_pack(mut body: &[u8], blobs: &[(Sha256Hex, u64)]) -> Result<()> {
    for (want, want_size) in blobs {
        let end = body
            .iter()
            .take(pack::MAX_HEADER_LEN)
            .position(|b| *b == b'\n')
            .ok_or_else(|| anyhow!("pack truncated before the header of {want}"))?;
        let (sha, size) = pack::parse_header(&body[..=end])?;
        ensure!(
            sha == *want && size == *want_size,
            "pack sent {sha} {size}, expected {want} {want_size}"
        );
        body = &body[end + 1..];
        let size = usize::try_from(size)?;
        ensure!(body.len() >= size, "pack truncated inside {want}");
        let digest: [u8; 32] = sha2::Sha256::digest(&body[..size]).into();
        ensure!(
            Sha256Hex::from_digest(digest) == *want,
            "blob {want} in the pack has other bytes"
        );
        body = &body[size..];
    }
    ensure!(
        body.is_empty(),
        "pack has {} bytes past its blobs",
        body.len()
    );
    Ok(())
}

/// An agent that holds the new version: which and when.
struct Held {
    version: u64,
    at: Instant,
}

/// One simulated agent: waits for `sync_required` and syncs, until stopped.
async fn run_agent(
    id: usize,
    mut socket: super::Socket,
    shared: Arc<Shared>,
    mut holds: (u64, Sha256Hex, Arc<Manifest>),
    done: mpsc::UnboundedSender<Held>,
    stop: CancellationToken,
) {
    // The id its socket said `hello` with, as the agent's reports carry its one id.
    let client_id = super::client_id(id);
    let pong = serde_json::to_string(&AgentFrame::Pong).expect("frames serialize");
    // A head announced while a sync was under way, to sync to next, with the spread hint and
    // the delta its frame carried.
    let mut pending: Option<Announced> = None;
    loop {
        let Announced {
            head,
            spread,
            delta,
        } = match pending.take() {
            Some(next) if next.head.version > holds.0 => next,
            _ => {
                let msg = tokio::select! {
                    m = socket.next() => m,
                    _ = stop.cancelled() => break,
                };
                match read_frame(msg, &mut socket, &pong, &shared).await {
                    Frame::Head(next) if next.head.version > holds.0 => *next,
                    Frame::Closed => break,
                    _ => continue,
                }
            }
        };
        let started = Instant::now();
        let status = |state| {
            let frame = AgentFrame::Status {
                space: shared.space.clone(),
                state,
            };
            Message::Text(
                serde_json::to_string(&frame)
                    .expect("frames serialize")
                    .into(),
            )
        };
        let downloading = AgentState::Downloading {
            version: holds.0,
            target: head.version,
            files_done: 0,
            files_total: 0,
            bytes_done: 0,
            bytes_total: 0,
            bytes_per_sec: 0,
        };
        if socket.send(status(downloading)).await.is_err() {
            break;
        }
        // As the agent: the socket is still read while the download runs (pings answered,
        // a newer head noted), or the hub would close it as dead under a slow download.
        let synced = {
            let delay = if shared.spread && !head.forced && spread.spread_ms > 0 {
                Duration::from_millis(rand::random_range(0..spread.spread_ms))
            } else {
                Duration::ZERO
            };
            let syncing = async {
                tokio::time::sleep(delay).await;
                sync(&shared, &head, &holds, delta.as_ref()).await
            };
            tokio::pin!(syncing);
            loop {
                tokio::select! {
                    r = &mut syncing => break Some(r),
                    m = socket.next() => match read_frame(m, &mut socket, &pong, &shared).await {
                        Frame::Head(newer) if newer.head.version > head.version => {
                            pending = Some(*newer);
                        }
                        Frame::Closed => break None,
                        _ => {}
                    },
                    _ = stop.cancelled() => break None,
                }
            }
        };
        let Some(synced) = synced else { break };
        let Ok((manifest, fetched, changed)) = synced else {
            continue;
        };
        let _ = done.send(Held {
            version: head.version,
            at: Instant::now(),
        });
        holds = (head.version, head.data_hash.clone(), manifest.clone());
        let ready = AgentState::Ready {
            version: head.version,
        };
        if socket.send(status(ready)).await.is_err() {
            break;
        }
        let report = SyncReport {
            report_id: uuid::Uuid::new_v4().to_string(),
            client_id: client_id.clone(),
            space: shared.space.clone(),
            sync_type: if head.forced {
                SyncType::ForceSync
            } else {
                SyncType::Download
            },
            status: SyncStatus::Success,
            version: Some(head.version),
            items_synced: changed,
            items_total: Some(manifest.len() as u64),
            bytes: fetched,
            duration_ms: started.elapsed().as_millis() as u64,
            error_message: None,
            user: None,
            synced_at: None,
        };
        // As the agent: the report goes on the socket, and counts once the hub acknowledges it.
        let report = serde_json::to_string(&AgentFrame::Report(report)).expect("frames serialize");
        if socket.send(Message::Text(report.into())).await.is_err() {
            break;
        }
    }
    let _ = socket.close(None).await;
}

/// A head a `sync_required` frame announced, with what the frame carried beside it.
struct Announced {
    head: Head,
    spread: Spread,
    delta: Option<FrameDelta>,
}

/// What one message from the hub means to a simulated agent.
enum Frame {
    Head(Box<Announced>),
    Closed,
    Other,
}

/// Reads one message: a head announced, the socket gone, or anything else (a ping is answered
/// and a report's acknowledgement counted here).
async fn read_frame(
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    socket: &mut super::Socket,
    pong: &str,
    shared: &Shared,
) -> Frame {
    match msg {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<HubFrame>(&t) {
            Ok(HubFrame::SyncRequired(head)) => Frame::Head(Box::new(Announced {
                head,
                spread: Spread::of_frame(&t),
                delta: FrameDelta::of_frame(&t),
            })),
            Ok(HubFrame::ReportAck { .. }) => {
                shared.reports.fetch_add(1, Ordering::Relaxed);
                Frame::Other
            }
            Ok(HubFrame::Ping) => {
                if socket.send(Message::Text(pong.into())).await.is_err() {
                    Frame::Closed
                } else {
                    Frame::Other
                }
            }
            _ => Frame::Other,
        },
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Frame::Closed,
        Some(Ok(_)) => Frame::Other,
    }
}

/// Syncs from `held` (version, data hash, manifest) to `head`: the delta (the frame's when it
/// starts from the held version, else asked for; or the whole manifest) and the blobs `held`
/// lacks, every answer checked. Returns the manifest, the bytes fetched and the number of
/// paths that changed.
async fn sync(
    shared: &Shared,
    head: &Head,
    held: &(u64, Sha256Hex, Arc<Manifest>),
    in_frame: Option<&FrameDelta>,
) -> Result<(Arc<Manifest>, u64, u64)> {
    let (held_version, held_hash, held_manifest) = held;
    let in_frame = in_frame.filter(|d| d.from_version == *held_version);
    let carried = in_frame.map_or(&[][..], |d| &d.blobs[..]);
    let (delta, answer) = match in_frame {
        Some(d) => (true, bytes::Bytes::from(d.text.clone())),
        None => {
            let url = format!(
                "{}/spaces/{}/versions/{}/manifest?from={held_version}",
                shared.api, head.space, head.version
            );
            shared
                .request_typed(
                    || Answer::send(shared.http().get(&url).bearer_auth(&shared.token)),
                    None,
                )
                .await
                .map(|(delta, body)| (delta, body.into_bytes()))?
        }
    };
    let key = (
        held_hash.clone(),
        head.data_hash.clone(),
        in_frame.is_some(),
    );
    let known = shared
        .plans
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .get(&key)
        .cloned();
    let plan = match known {
        Some(plan) if plan.answer == answer && plan.carried[..] == *carried => {
            if let Some(full) = &plan.full {
                // The answer was not usable: the agent fetches the whole manifest too.
                let (bytes, _) = shared.manifest(head).await?;
                ensure!(bytes == *full, "the whole manifest changed under its hash");
            }
            plan
        }
        _ => {
            let plan = shared
                .plan(head, held_manifest, answer, delta, carried)
                .await?;
            let plan = Arc::new(plan);
            shared
                .plans
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .entry(key)
                .or_insert(plan)
                .clone()
        }
    };
    for k in 0..plan.packs.len() {
        shared.pack(&plan, k).await?;
    }
    Ok((plan.manifest.clone(), plan.fetched, plan.changed))
}

/// Waits until the hub is idle (under 10% of a core over a quarter second; at most 30 s), so a
/// case does not pay for work that came before it: the connections' set-up (each `hello`
/// binds its client id) or the previous case's stragglers.
async fn wait_idle(hub: &Hub) {
    const SLICE: Duration = Duration::from_millis(250);
    let deadline = Instant::now() + Duration::from_secs(30);
    let Some(mut before) = hub.cpu_secs() else {
        return;
    };
    while Instant::now() < deadline {
        tokio::time::sleep(SLICE).await;
        let Some(now) = hub.cpu_secs() else { return };
        if now - before <= 0.1 * SLICE.as_secs_f64() {
            return;
        }
        before = now;
    }
}

/// Resets the hub's peak RSS (`VmHWM`) where the kernel allows it (`clear_refs` 5).
fn reset_peak_rss(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

fn peak_rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Moves the head for `case`: a commit that gives `changed` files new bytes (uploaded first,
/// as a publisher does), or a force-sync. Returns when the bump itself was sent: the herd is
/// timed from there, since no agent can act on the uploads before the commit.
async fn bump(
    hub: &Hub,
    api: &HubApi,
    case: HerdCase,
    current: &Manifest,
    base: u64,
    round: u64,
) -> Result<Instant> {
    if case == HerdCase::Force {
        let at = Instant::now();
        reqwest::Client::new()
            .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/force-sync")))
            .bearer_auth(&hub.admin_token)
            .json(&serde_json::json!({"reason": "synchub-load herd"}))
            .timeout(REQUEST_DEADLINE)
            .send()
            .await?
            .error_for_status()?;
        return Ok(at);
    }
    let mut puts = Vec::new();
    // Files spread over the set, different ones each round.
    let entries = current.entries();
    let step = (entries.len() / case.files_changed()).max(1);
    for k in 0..case.files_changed() {
        let old = &entries[(k * step + round as usize) % entries.len()];
        let mut bytes = vec![0u8; old.size as usize];
        let seed = (round << 32) ^ (k as u64) ^ 0x9e37_79b9;
        super::download::Noise(seed | 1).fill(&mut bytes);
        let sha256 = Sha256Hex::of(&bytes);
        api.put_blob(&sha256, bytes.into()).await?;
        puts.push(ManifestEntry {
            path: old.path.clone(),
            size: old.size,
            sha256,
        });
    }
    let req = CommitRequest {
        base_version: base,
        puts,
        deletes: Vec::new(),
        message: Some(format!("synchub-load herd {}", case.name())),
    };
    let at = Instant::now();
    api.commit(DEFAULT_SPACE, &req).await?;
    Ok(at)
}

/// Publishes the QR set, connects `agents` simulated agents holding it, and runs each case.
pub async fn herd(hub: &Hub, opts: &HerdOptions, work: &Path) -> Result<HerdReport> {
    let set = DataSet::QR;
    let src = work.join("src");
    let (set_files, set_bytes, _) = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || generate_set(set, &src, 11)).await??
    };
    let published = publish_set(hub, DEFAULT_SPACE, &src, set).await?;
    let head = hub.head(DEFAULT_SPACE).await?;
    ensure!(
        head.version == published.version,
        "the head moved while publishing"
    );

    let addresses: Vec<_> = (0..SOURCE_ADDRESSES)
        .map(|i| hub.source_address(i))
        .collect();
    let clients = addresses
        .iter()
        .map(|from| {
            reqwest::Client::builder()
                .no_proxy()
                .local_address(*from)
                .pool_max_idle_per_host(opts.http_connections.div_ceil(addresses.len()))
                .tcp_nodelay(true)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let idle = opts.http_connections.div_ceil(addresses.len());
    let pack_clients = addresses
        .iter()
        .map(|from| PackClient::new(*from, idle))
        .collect();
    let shared = Arc::new(Shared {
        clients,
        pack_clients,
        next_client: AtomicUsize::new(0),
        api: hub.api(""),
        token: hub.agent_token.clone(),
        space: DEFAULT_SPACE.to_owned(),
        permits: Semaphore::new(opts.http_connections.max(1)),
        bytes: AtomicU64::new(0),
        throttled: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        reports: AtomicU64::new(0),
        manifests: Mutex::new(HashMap::new()),
        plans: Mutex::new(HashMap::new()),
        spread: opts.spread,
    });
    let (_, mut manifest) = shared.manifest(&head).await?;

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Held>();
    let stop = CancellationToken::new();
    let url = hub.ws_url();
    let held = HeldSpace {
        space: DEFAULT_SPACE.to_owned(),
        version: head.version,
        data_hash: Some(head.data_hash.clone()),
    };
    let started = Instant::now();
    let opened = futures::stream::iter(0..opts.agents)
        .map(|i| {
            let (url, token, held) = (&url, &hub.agent_token, held.clone());
            async move {
                let mut last = None;
                for attempt in 0..5u64 {
                    match open_agent(url, token, held.clone(), i, hub.source_address(i)).await {
                        Ok(s) => return Ok((i, s)),
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
                }
                Err(last.expect("at least one attempt"))
            }
        })
        .buffer_unordered(opts.connect_concurrency.max(1));
    let mut agents = Vec::with_capacity(opts.agents);
    let connect = async {
        let mut opened = std::pin::pin!(opened);
        while let Some(r) = opened.next().await {
            let (i, socket) = r?;
            agents.push(tokio::spawn(run_agent(
                i,
                socket,
                shared.clone(),
                (head.version, head.data_hash.clone(), manifest.clone()),
                done_tx.clone(),
                stop.clone(),
            )));
        }
        Ok::<_, anyhow::Error>(())
    };
    let connected = tokio::time::timeout(opts.connect_timeout, connect).await;
    let result = match connected {
        Ok(Ok(())) => {
            let connect_secs = started.elapsed().as_secs_f64();
            run_cases(hub, opts, &shared, &mut manifest, &mut done_rx)
                .await
                .map(|cases| HerdReport {
                    agents: opts.agents,
                    set: set.name(),
                    set_files,
                    set_bytes,
                    connect_secs,
                    cases,
                })
        }
        Ok(Err(e)) => Err(e.context("connecting the herd")),
        Err(_) => Err(anyhow!(
            "the herd was not welcomed within {:?}",
            opts.connect_timeout
        )),
    };
    stop.cancel();
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
    }
    result
}

async fn run_cases(
    hub: &Hub,
    opts: &HerdOptions,
    shared: &Arc<Shared>,
    manifest: &mut Arc<Manifest>,
    done_rx: &mut mpsc::UnboundedReceiver<Held>,
) -> Result<Vec<CaseStats>> {
    let api = HubApi::new(vec![hub.url.clone()], &hub.admin_token)?;
    let n = opts.agents;
    let mut out = Vec::new();
    for (round, &case) in opts.cases.iter().enumerate() {
        wait_idle(hub).await;
        let base = hub.head(DEFAULT_SPACE).await?.version;
        let target = base + 1;
        while done_rx.try_recv().is_ok() {}
        let (bytes0, throttled0, failed0, reports0) = (
            shared.bytes.load(Ordering::Relaxed),
            shared.throttled.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
            shared.reports.load(Ordering::Relaxed),
        );
        reset_peak_rss(hub.pid);
        let cpu0 = hub.cpu_secs();
        let load0 = super::proc_cpu_secs(std::process::id());
        let started = Instant::now();
        let t0 = bump(hub, &api, case, manifest, base, round as u64)
            .await
            .with_context(|| format!("bumping for {}", case.name()))?;
        let deadline = tokio::time::Instant::now() + opts.case_timeout;
        let mut times = Vec::with_capacity(n);
        while times.len() < n {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(h)) if h.version >= target => {
                    times.push(h.at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        // CPU and memory include the reports of this case: wait for them (or the limit).
        while shared.reports.load(Ordering::Relaxed) - reports0 < times.len() as u64
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu = match (cpu0, hub.cpu_secs()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let load_cpu = match (load0, super::proc_cpu_secs(std::process::id())) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        times.sort_by(f64::total_cmp);
        out.push(CaseStats {
            case,
            agents: n,
            converged: times.len(),
            upload_ms: t0.duration_since(started).as_secs_f64() * 1000.0,
            p50_ms: percentile(&times, 50.0),
            p99_ms: percentile(&times, 99.0),
            last_ms: times.last().copied().unwrap_or(0.0),
            reports: shared.reports.load(Ordering::Relaxed) - reports0,
            hub_cpu_secs: cpu,
            load_cpu_secs: load_cpu,
            bytes: shared.bytes.load(Ordering::Relaxed) - bytes0,
            hub_peak_rss_kib: peak_rss_kib(hub.pid),
            throttled: shared.throttled.load(Ordering::Relaxed) - throttled0,
            failed: shared.failed.load(Ordering::Relaxed) - failed0,
        });
        let head = hub.head(DEFAULT_SPACE).await?;
        *manifest = shared.manifest(&head).await?.1;
        // Let stragglers' status frames and the hub's queues settle between cases.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The old way: every PC reads the whole dataset from PostgreSQL
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub struct OldWayReport {
    pub clients: usize,
    /// Connections PostgreSQL was allowed to serve at once (its `max_connections` less a
    /// margin): more clients wait for a slot, as they would be refused and retry.
    pub concurrent: usize,
    pub files: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub last_ms: f64,
    pub bytes: u64,
    pub failed: u64,
}

impl OldWayReport {
    pub fn figures(&self) -> Figures {
        Figures::from([
            ("old_way.p50_ms".to_owned(), self.p50_ms),
            ("old_way.p99_ms".to_owned(), self.p99_ms),
            ("old_way.last_ms".to_owned(), self.last_ms),
            ("old_way.mb".to_owned(), self.bytes as f64 / 1e6),
            ("old_way.failed".to_owned(), self.failed as f64),
        ])
    }
}

impl std::fmt::Display for OldWayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "old way: {} clients each read {} files from PostgreSQL ({} at once): p50 {:.0} ms  \
             p99 {:.0} ms  last {:.0} ms  {:.1} MB  failed {}",
            self.clients,
            self.files,
            self.concurrent,
            self.p50_ms,
            self.p99_ms,
            self.last_ms,
            self.bytes as f64 / 1e6,
            self.failed
        )
    }
}

/// Loads the QR set into a `files` table of a fresh database on `cluster`, then has `clients`
/// clients each connect and `SELECT` every file (checking each file's hash) at once, as the
/// desktop app does on a version change.
pub async fn old_way(cluster: &PgCluster, clients: usize, work: &Path) -> Result<OldWayReport> {
    let src = work.join("old-way-src");
    let (files, _, _) = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || generate_set(DataSet::QR, &src, 11)).await??
    };
    let url = cluster.create_database().await?;
    let mut c = sqlx::PgConnection::connect(&url).await?;
    sqlx::query(
        "CREATE TABLE files (path text PRIMARY KEY, sha256 text NOT NULL, content bytea NOT NULL)",
    )
    .execute(&mut c)
    .await?;
    for path in list_files(&src)? {
        let content = std::fs::read(&path)?;
        let rel = path.strip_prefix(&src)?.to_string_lossy().into_owned();
        sqlx::query("INSERT INTO files VALUES ($1, $2, $3)")
            .bind(rel)
            .bind(Sha256Hex::of(&content).to_string())
            .bind(content)
            .execute(&mut c)
            .await?;
    }
    c.close().await?;
    // The test cluster allows 200 connections; leave some for the hub and psql.
    let concurrent = clients.clamp(1, 180);
    let slots = Arc::new(Semaphore::new(concurrent));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let reads = futures::stream::iter(0..clients)
        .map(|_| {
            let (url, slots, failed) = (url.clone(), slots.clone(), failed.clone());
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.ok()?;
                match read_all(&url).await {
                    Ok(bytes) => Some((t0.elapsed().as_secs_f64() * 1000.0, bytes)),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            })
        })
        .buffer_unordered(clients.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut times = Vec::new();
    let mut bytes = 0;
    for r in reads {
        if let Some((ms, b)) = r? {
            times.push(ms);
            bytes += b;
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(OldWayReport {
        clients,
        concurrent,
        files,
        p50_ms: percentile(&times, 50.0),
        p99_ms: percentile(&times, 99.0),
        last_ms: times.last().copied().unwrap_or(0.0),
        bytes,
        failed: failed.load(Ordering::Relaxed),
    })
}

/// One client of the old way: a new connection, every file, each hash checked.
async fn read_all(url: &str) -> Result<u64> {
    let mut c = tokio::time::timeout(REQUEST_DEADLINE, sqlx::PgConnection::connect(url)).await??;
    let rows = tokio::time::timeout(
        REQUEST_DEADLINE,
        sqlx::query("SELECT path, sha256, content FROM files").fetch_all(&mut c),
    )
    .await??;
    let mut bytes = 0u64;
    for row in rows {
        let sha: String = row.try_get("sha256")?;
        let content: Vec<u8> = row.try_get("content")?;
        ensure!(
            Sha256Hex::of(&content).as_str() == sha,
            "a file's bytes do not match"
        );
        bytes += content.len() as u64;
    }
    c.close().await?;
    Ok(bytes)
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_is_checked_blob_by_blob() {
        let a = b"first".to_vec();
        let b = b"second blob".to_vec();
        let (ha, hb) = (Sha256Hex::of(&a), Sha256Hex::of(&b));
        let mut body = pack::encode_header(&ha, a.len() as u64).into_bytes();
        body.extend_from_slice(&a);
        body.extend_from_slice(pack::encode_header(&hb, b.len() as u64).as_bytes());
        body.extend_from_slice(&b);
        let want = [(ha.clone(), 5), (hb.clone(), 11)];
        check_pack(&body, &want).unwrap();
        let mut wrong = body.clone();
        *wrong.last_mut().unwrap() ^= 1;
        assert!(
            check_pack(&wrong, &want).is_err(),
            "a changed byte is caught"
        );
        assert!(
            check_pack(&body[..body.len() - 1], &want).is_err(),
            "truncation is caught"
        );
        assert!(
            check_pack(&body, &want[..1]).is_err(),
            "extra bytes are caught"
        );
    }
}
