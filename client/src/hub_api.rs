//! The hub's HTTP API as the agent uses it (`/api/v1/...`): head checks with ETags, manifests,
//! blobs (single with Range, and packs), uploads, commits and sync reports. Holds the list of
//! hub URLs and which one is in use; the connection code and the sync worker move to the next
//! one after a failure.
//!
//! Every call has deadlines: 5 s to connect, an idle-read deadline (an answer that stays
//! silent that long fails, however long the whole download takes) and a whole-request deadline
//! for the small answers (heads, manifests, reports), so a hub or proxy that keeps TCP open
//! but stops answering cannot leave a PC downloading forever.
//!
//! Manifests, deltas and packs of compressible files travel compressed when the hub agrees:
//! the client offers `Accept-Encoding: gzip, zstd` and decodes as the body arrives, so every
//! hash is checked on the decoded bytes. Single blobs are asked for as they are (`identity`),
//! so a resumed download's byte range means the same bytes.

use crate::error::{ClientError, Result};
use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_NONE_MATCH, RANGE};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use synchub_protocol::{
    ApiError, BlobList, CommitRequest, CommitResponse, Head, Sha256Hex, SyncReport,
};

/// Installs the ring crypto provider for rustls once per process (reqwest is built without one).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// TLS settings trusting the system's roots and the private CA in the PEM file `ca_cert`;
/// `None` without one (the HTTP client's and WebSocket's defaults, the system's roots, apply).
pub fn tls_config(ca_cert: Option<&std::path::Path>) -> Result<Option<Arc<rustls::ClientConfig>>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let Some(path) = ca_cert else {
        return Ok(None);
    };
    install_crypto_provider();
    let bad = |reason: String| {
        ClientError::Config(format!("CA certificate {}: {reason}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let ours = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    if ours.is_empty() {
        return Err(bad("no CERTIFICATE block in the file".into()));
    }
    for cert in ours {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// The hub's HTTP API, over the configured hub URLs (one in use at a time).
#[derive(Clone)]
pub struct HubApi {
    http: reqwest::Client,
    hubs: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    token: Arc<str>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Result of a conditional head check.
#[derive(Debug)]
pub enum HeadCheck {
    NotModified,
    Head { head: Head, etag: Option<String> },
}

/// How long a manifest may take, whole.
const MANIFEST_DEADLINE: Duration = Duration::from_secs(120);

/// Idle-read deadline of [`HubApi::new`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

impl HubApi {
    pub fn new(hubs: Vec<String>, token: &str) -> Result<Self> {
        Self::with_read_timeout(hubs, token, DEFAULT_READ_TIMEOUT)
    }

    /// Like [`HubApi::new`], abandoning an answer silent for `read_timeout`.
    pub fn with_read_timeout(
        hubs: Vec<String>,
        token: &str,
        read_timeout: Duration,
    ) -> Result<Self> {
        Self::with_options(hubs, token, read_timeout, None)
    }

    /// The API of `config`'s hubs with its token, read timeout (at least 100 ms) and CA
    /// certificate, as the agent and its commands use it.
    pub fn for_agent(config: &crate::AgentConfig) -> Result<Self> {
        Self::with_options(
            config.hubs.clone(),
            &config.token,
            Duration::from_millis(config.read_timeout_ms.max(100)),
            tls_config(config.ca_cert.as_deref())?,
        )
    }

    /// Like [`HubApi::with_read_timeout`], with the TLS settings of [`tls_config`] (`None`:
    /// the system's roots).
    pub fn with_options(
        hubs: Vec<String>,
        token: &str,
        read_timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self> {
        install_crypto_provider();
        if hubs.is_empty() {
            return Err(ClientError::Config("no hub URL".into()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(read_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(tls) = &tls {
            builder = builder.tls_backend_preconfigured(rustls::ClientConfig::clone(tls));
        }
        let http = builder.build().map_err(ClientError::from)?;
        let hubs = hubs
            .into_iter()
            .map(|h| h.trim_end_matches('/').to_owned())
            .collect();
        Ok(HubApi {
            http,
            hubs: Arc::new(hubs),
            current: Arc::new(AtomicUsize::new(0)),
            token: token.into(),
            tls,
        })
    }

    /// The TLS settings the WebSocket must use too (`None`: the defaults).
    pub fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// The hub URL in use.
    pub fn hub(&self) -> &str {
        &self.hubs[self.current.load(Ordering::Relaxed) % self.hubs.len()]
    }

    /// Moves to the next configured hub (after a failed connection).
    pub(crate) fn rotate(&self) {
        if self.hubs.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Which hub is in use, for [`HubApi::rotate_from`].
    pub(crate) fn position(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Moves to the next hub if the one at `position` is still in use: two tasks that saw the
    /// same hub fail move on once, not twice (which, with two hubs, would land back on it).
    pub(crate) fn rotate_from(&self, position: usize) {
        if self.hubs.len() > 1 {
            let _ = self.current.compare_exchange(
                position,
                position.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.hub())
    }

    /// The WebSocket URL of the hub in use, for the route `ws_path`.
    pub(crate) fn ws_url(&self, ws_path: &str) -> String {
        let hub = self.hub();
        let rest = hub
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| hub.strip_prefix("http://").map(|r| format!("ws://{r}")))
            .unwrap_or_else(|| hub.to_owned());
        format!("{rest}{ws_path}")
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(&*self.token)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(&*self.token)
    }

    /// `GET /spaces/{space}/head`, conditional on `etag`.
    pub async fn head(&self, space: &str, etag: Option<&str>) -> Result<HeadCheck> {
        let mut req = self
            .get(&format!("/spaces/{space}/head"))
            .timeout(Duration::from_secs(5));
        if let Some(etag) = etag {
            req = req.header(IF_NONE_MATCH, etag);
        }
        let resp = req.send().await?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(HeadCheck::NotModified);
        }
        let resp = check(resp).await?;
        let etag = resp
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let head = resp.json::<Head>().await?;
        Ok(HeadCheck::Head { head, etag })
    }

    /// The canonical manifest bytes of a version (not yet checked).
    pub(crate) async fn manifest_bytes(&self, space: &str, version: u64) -> Result<bytes::Bytes> {
        let req = self
            .get(&format!("/spaces/{space}/versions/{version}/manifest"))
            .timeout(MANIFEST_DEADLINE);
        Ok(self.send_admitted(req).await?.bytes().await?)
    }

    /// The manifest of `version` as a delta from version `from` when the hub answers with one
    /// (`Ok((true, bytes))`), else the full canonical bytes (`Ok((false, bytes))`); unchecked.
    pub(crate) async fn manifest_since(
        &self,
        space: &str,
        version: u64,
        from: u64,
    ) -> Result<(bool, bytes::Bytes)> {
        let req = self
            .get(&format!(
                "/spaces/{space}/versions/{version}/manifest?from={from}"
            ))
            .timeout(MANIFEST_DEADLINE);
        let resp = self.send_admitted(req).await?;
        let delta = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == synchub_protocol::DELTA_CONTENT_TYPE.as_bytes());
        Ok((delta, resp.bytes().await?))
    }

    /// `GET /blobs/{sha256}` from byte `from` on (a 206 when `from > 0` and the hub honours it).
    pub(crate) async fn blob(&self, sha256: &Sha256Hex, from: u64) -> Result<reqwest::Response> {
        let mut req = self
            .get(&format!("/blobs/{sha256}"))
            .header(reqwest::header::ACCEPT_ENCODING, "identity");
        if from > 0 {
            req = req.header(RANGE, format!("bytes={from}-"));
        }
        self.send_admitted(req).await
    }

    /// `POST /blobs/pack`: the response streams the blobs in request order, compressed when
    /// `compress` (and the hub agrees), decoded by the client as it arrives.
    pub(crate) async fn pack(&self, list: &BlobList, compress: bool) -> Result<reqwest::Response> {
        let mut req = self.post("/blobs/pack").json(list);
        if !compress {
            // Images and archives: compressing them again would cost the hub for nothing.
            req = req.header(reqwest::header::ACCEPT_ENCODING, "identity");
        }
        self.send_admitted(req).await
    }

    /// Sends a download request; while the hub answers 503 or 429 with `Retry-After` (it
    /// serves as many downloads as it may), waits that long plus up to as long again at random
    /// (so refused agents do not come back together) and asks again: being put off is not a
    /// failure. Gives the refusal as an error only after [`MAX_BUSY_WAIT`] in all.
    async fn send_admitted(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let started = std::time::Instant::now();
        loop {
            let attempt = req.try_clone().ok_or_else(|| {
                ClientError::Protocol("a download request cannot be repeated".into())
            })?;
            let resp = attempt.send().await?;
            match retry_after(&resp) {
                Some(wait) if started.elapsed() + wait <= MAX_BUSY_WAIT => {
                    tracing::debug!(url = %resp.url(), wait_ms = wait.as_millis() as u64,
                        "hub busy; asking again after its Retry-After");
                    tokio::time::sleep(wait).await;
                }
                _ => return check(resp).await,
            }
        }
    }

    /// `POST /blobs/missing`: which of these the hub lacks, asked in batches of at most
    /// [`synchub_protocol::MAX_BLOBS_PER_QUERY`] (the hub's bound per request).
    pub async fn missing(&self, list: &BlobList) -> Result<BlobList> {
        let mut missing = BlobList::default();
        for batch in list.sha256.chunks(synchub_protocol::MAX_BLOBS_PER_QUERY) {
            let batch = BlobList {
                sha256: batch.to_vec(),
            };
            let resp = self.post("/blobs/missing").json(&batch).send().await?;
            let answer: BlobList = check(resp).await?.json().await?;
            missing.sha256.extend(answer.sha256);
        }
        Ok(missing)
    }

    /// `PUT /blobs/{sha256}`.
    pub async fn put_blob(&self, sha256: &Sha256Hex, body: reqwest::Body) -> Result<()> {
        let resp = self
            .http
            .put(self.url(&format!("/blobs/{sha256}")))
            .bearer_auth(&*self.token)
            .body(body)
            .send()
            .await?;
        check(resp).await.map(drop)
    }

    /// `POST /spaces/{space}/commits`; a 409 becomes [`ClientError::Conflict`].
    pub async fn commit(&self, space: &str, req: &CommitRequest) -> Result<CommitResponse> {
        let resp = self
            .post(&format!("/spaces/{space}/commits"))
            .json(req)
            .send()
            .await?;
        match check(resp).await {
            Ok(resp) => Ok(resp.json().await?),
            Err(ClientError::Api { status: 409, error }) => Err(ClientError::Conflict {
                conflicts: error.conflicts,
                head: error.head.map(Box::new),
            }),
            Err(e) => Err(e),
        }
    }

    /// `POST /sync-log`: Ok once the hub stored the report (or already had it).
    pub async fn report(&self, report: &SyncReport) -> Result<()> {
        let resp = self
            .post("/sync-log")
            .json(report)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        check(resp).await.map(drop)
    }

    /// `PUT /spaces/{space}/held/{client_id}`: tells the hub about a held change (again, if
    /// it already knows it) and returns what an admin decided.
    pub async fn put_held(
        &self,
        space: &str,
        client_id: &str,
        change: &synchub_protocol::HeldChange,
    ) -> Result<synchub_protocol::HeldRecord> {
        let resp = self
            .http
            .put(self.url(&format!("/spaces/{space}/held/{client_id}")))
            .bearer_auth(&*self.token)
            .json(change)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        Ok(check(resp).await?.json().await?)
    }

    /// `DELETE /spaces/{space}/held/{client_id}`: the held change was published or rolled back.
    pub async fn delete_held(&self, space: &str, client_id: &str) -> Result<()> {
        let resp = self
            .http
            .delete(self.url(&format!("/spaces/{space}/held/{client_id}")))
            .bearer_auth(&*self.token)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        check(resp).await.map(drop)
    }
}

/// Turns an error status into [`ClientError::Api`] with the hub's JSON body.
/// How long in all a download may be put off by a busy hub before it counts as failed.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(600);

/// For a 503 or 429 with `Retry-After: <seconds>`: how long to wait, with jitter (the delay
/// plus up to as much again; at least 100 ms, at most a minute before the jitter).
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    if !matches!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
    ) {
        return None;
    }
    let secs: u64 = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let base = Duration::from_secs(secs.min(60)).max(Duration::from_millis(100));
    Some(base + base.mul_f64(rand::random::<f64>()))
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let error = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| ApiError {
        code: status.as_str().to_owned(),
        message: text.chars().take(300).collect(),
        conflicts: Vec::new(),
        head: None,
    });
    Err(ClientError::Api {
        status: status.as_u16(),
        error: Box::new(error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_rotation() {
        let api = HubApi::new(
            vec!["http://127.0.0.1:1/".into(), "https://b.example".into()],
            "t",
        )
        .unwrap();
        assert_eq!(api.url("/x"), "http://127.0.0.1:1/api/v1/x");
        assert_eq!(api.ws_url("/api/v1/ws"), "ws://127.0.0.1:1/api/v1/ws");
        api.rotate();
        assert_eq!(api.ws_url("/api/v1/ws"), "wss://b.example/api/v1/ws");
        api.rotate();
        assert_eq!(api.hub(), "http://127.0.0.1:1");
    }
}
