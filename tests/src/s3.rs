//! The S3-compatible test server: one moto server per test process, a fresh bucket per test.
//!
//! `test_bucket()` starts `moto_server` on a free loopback port the first time it is called,
//! shares it through a static, and creates a new bucket on every call so tests never see each
//! other's objects. A watchdog shell stops the server once the test process is gone, so
//! nothing outlives the run even when a test panics or the process is killed.

use anyhow::{Context, bail};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use synchub_hub::blobs::s3::S3Config;

const INSTALL_HINT: &str =
    "moto_server not found: install it with `pip install 'moto[server]'` (scripts/test does this)";

/// A running moto server (it lives as long as the test process).
#[derive(Debug, Clone)]
pub struct MotoServer {
    pub port: u16,
    pub pid: u32,
}

impl MotoServer {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A `[[bucket_source]]` reading `s3://bucket/prefix` on this server into `into` of the
    /// default space, every `interval_secs`.
    pub fn bucket_source(
        &self,
        bucket: &str,
        prefix: &str,
        into: &str,
        interval_secs: u64,
    ) -> synchub_hub::config::BucketSource {
        synchub_hub::config::BucketSource {
            space: synchub_protocol::DEFAULT_SPACE.to_owned(),
            url: format!("s3://{bucket}/{prefix}"),
            into: into.to_owned(),
            endpoint: Some(self.endpoint()),
            region: "us-east-1".to_owned(),
            access_key_id: "testing".to_owned(),
            secret_access_key: "testing".to_owned(),
            path_style: true,
            allow_http: true,
            interval_secs,
        }
    }
}

static SERVER: OnceLock<Result<MotoServer, String>> = OnceLock::new();

/// The process's moto server, started on first use. Errors (moto missing, start failed) are
/// remembered so every test fails with the same message.
pub fn moto_server() -> anyhow::Result<MotoServer> {
    SERVER
        .get_or_init(|| start_moto().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn start_moto() -> anyhow::Result<MotoServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::env::temp_dir().join(format!("synchub-moto-{}-{port}.log", std::process::id()));
    let log_file = std::fs::File::create(&log)?;
    let mut child = match Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(INSTALL_HINT),
        Err(e) => return Err(e).context("starting moto_server"),
    };
    let pid = child.id();
    // The watchdog: polls this process and stops moto when it is gone, then removes its log
    // (a failed start puts the log in its error).
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill {pid} 2>/dev/null; \
             sleep 1; rm -f \"$1\"",
            parent = std::process::id()
        ))
        .arg("sh")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the moto watchdog")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            if output.contains("No module named") || status.code() == Some(127) {
                bail!("{INSTALL_HINT}\n{output}");
            }
            bail!("moto_server exited at start ({status}):\n{output}");
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("moto_server did not listen on port {port} within 30 s:\n{output}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reap moto in the background so it never lingers as a zombie.
    std::thread::spawn(move || child.wait());
    Ok(MotoServer { port, pid })
}

/// A fresh, empty bucket on the process's moto server, as the hub's S3 config (dummy keys,
/// plain http, path style).
pub async fn test_bucket() -> anyhow::Result<S3Config> {
    let server = tokio::task::spawn_blocking(moto_server).await??;
    let bucket = format!("synchub-{}", uuid::Uuid::new_v4().simple());
    synchub_hub::blobs::s3::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let url = format!("{}/{bucket}", server.endpoint());
    // moto answers as soon as it listens, but give a just-started server a few tries.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.put(&url).send().await {
            Ok(response) if response.status().is_success() => break,
            Ok(response) => bail!(
                "creating bucket {bucket} on moto: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            ),
            Err(_) if attempt < 50 => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(e).context(format!("creating bucket {bucket} on moto")),
        }
    }
    Ok(S3Config {
        endpoint: Some(server.endpoint()),
        region: "us-east-1".to_owned(),
        bucket,
        prefix: "blobs/".to_owned(),
        access_key_id: "testing".to_owned(),
        secret_access_key: "testing".to_owned(),
        path_style: true,
        allow_http: true,
        presign_ttl_secs: 300,
    })
}

/// Puts an object into a bucket of the process's moto server (as another program would upload
/// it). moto refuses anonymous overwrites but checks no signature: a dummy one will do.
pub async fn put_object(bucket: &str, key: &str, body: &[u8]) -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(moto_server).await??;
    crate::fixtures::http()
        .put(format!("{}/{bucket}/{key}", server.endpoint()))
        .header(reqwest::header::AUTHORIZATION, dummy_authorization())
        .body(body.to_vec())
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("uploading {key} to moto"))?;
    Ok(())
}

/// Reads an object of a bucket on the process's moto server; `None` when it is absent.
pub async fn get_object(bucket: &str, key: &str) -> anyhow::Result<Option<bytes::Bytes>> {
    let server = tokio::task::spawn_blocking(moto_server).await??;
    let r = crate::fixtures::http()
        .get(format!("{}/{bucket}/{key}", server.endpoint()))
        .header(reqwest::header::AUTHORIZATION, dummy_authorization())
        .send()
        .await?;
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    Ok(Some(
        r.error_for_status()
            .with_context(|| format!("reading {key} from moto"))?
            .bytes()
            .await?,
    ))
}

/// An `Authorization` header moto accepts: it wants a credential but checks no signature.
fn dummy_authorization() -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature={}",
        "0".repeat(64)
    )
}
