//! S3-compatible backend of [`super::BlobStore`], through object_store (Backblaze B2, Supabase
//! Storage, MinIO, AWS). No S3 request is written by hand here.
//!
//! A blob is the object `<prefix>/<sha256>`. Bytes reach that key only after their hash was
//! checked: a body that fits in one part is buffered, hashed and then put straight to its key;
//! a larger one streams as a multipart upload to `<prefix>/staging/<random>` (one part buffered
//! while at most [`PARTS_IN_FLIGHT`] upload, so memory stays bounded whatever the size), is
//! completed only when the digest matches, then copied to its key and the staging object
//! deleted. A mismatch, an oversize or interrupted body aborts the multipart upload.

use super::{BlobError, BlobRead, BlobStore, ByteStream, StoredBlob, UploadCheck};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Once};
use std::time::Duration;
use synchub_protocol::Sha256Hex;

/// Size of a multipart upload part (S3 wants at least 5 MiB for all parts but the last).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploading at once; with the part being filled, the memory of one `put` stays under
/// `(PARTS_IN_FLIGHT + 1) * PART_SIZE`.
pub const PARTS_IN_FLIGHT: usize = 2;

/// Where the S3 backend stores blobs. The integrator's config loader fills it from the TOML
/// file and the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `SYNCHUB_S3_*`);
/// `Debug` and `Display` mask the secret.
#[derive(Clone, Deserialize, Serialize)]
pub struct S3Config {
    /// Endpoint URL for non-AWS services, e.g. `https://s3.us-west-004.backblazeb2.com`,
    /// `https://<project>.supabase.co/storage/v1/s3`, `http://127.0.0.1:9000`; `None` for AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    /// Folder of the bucket that holds the blobs (slashes around it do not matter).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// May be left out of the file and given by the environment instead (see
    /// `Config::apply_env`); `Config::validate` refuses it empty.
    #[serde(default)]
    pub access_key_id: String,
    #[serde(default)]
    pub secret_access_key: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`; most
    /// S3-compatible services want path style.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Allows a plain `http://` endpoint (local test servers only).
    #[serde(default)]
    pub allow_http: bool,
    /// Lifetime of presigned blob URLs handed to agents.
    #[serde(default = "default_presign_ttl_secs")]
    pub presign_ttl_secs: u64,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_prefix() -> String {
    "blobs/".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_presign_ttl_secs() -> u64 {
    300
}

impl S3Config {
    pub fn presign_ttl(&self) -> Duration {
        Duration::from_secs(self.presign_ttl_secs)
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("presign_ttl_secs", &self.presign_ttl_secs)
            .finish()
    }
}

impl fmt::Display for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "s3://{}/{} at {} ({}, key {}, secret ***)",
            self.bucket,
            self.prefix.trim_matches('/'),
            self.endpoint.as_deref().unwrap_or("AWS"),
            self.region,
            self.access_key_id,
        )
    }
}

/// Installs rustls' ring provider as the process default, once. The workspace builds reqwest
/// without a provider of its own, so any HTTPS (or object_store) client needs this first;
/// a provider installed earlier by someone else is kept.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An object store client for `config`'s bucket (its prefix is the caller's to use); no
/// request is made.
pub fn client(config: &S3Config) -> Result<AmazonS3, BlobError> {
    install_crypto_provider();
    // Not `from_env`: the environment's AWS_* variables (AWS_CA_BUNDLE, profiles, ...) must
    // not change what the explicit config says.
    let mut builder = AmazonS3Builder::new()
        .with_region(&config.region)
        .with_bucket_name(&config.bucket)
        .with_access_key_id(&config.access_key_id)
        .with_secret_access_key(&config.secret_access_key)
        .with_virtual_hosted_style_request(!config.path_style)
        .with_allow_http(config.allow_http);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    Ok(builder.build()?)
}

/// Content-addressed blobs in an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    /// The blob folder; blobs are its direct children.
    prefix: Path,
    staging: Path,
}

impl S3BlobStore {
    /// Builds the client; no request is made (a wrong bucket or key shows on first use).
    pub fn new(config: &S3Config) -> Result<Self, BlobError> {
        let store = client(config)?;
        let prefix =
            Path::parse(config.prefix.trim_matches('/')).map_err(object_store::Error::from)?;
        let staging = prefix.clone().join("staging");
        Ok(S3BlobStore {
            store: Arc::new(store),
            prefix,
            staging,
        })
    }

    fn key(&self, hash: &Sha256Hex) -> Path {
        self.prefix.clone().join(hash.as_str())
    }

    /// Objects left under `staging/`: uploads in flight, or abandoned by a crashed hub (a
    /// bucket lifecycle rule should expire them, and incomplete multipart uploads).
    pub async fn staging_objects(&self) -> Result<Vec<String>, BlobError> {
        let objects: Vec<_> = self.store.list(Some(&self.staging)).try_collect().await?;
        Ok(objects
            .into_iter()
            .map(|m| m.location.to_string())
            .collect())
    }

    fn map_err(hash: &Sha256Hex, e: object_store::Error) -> BlobError {
        match e {
            object_store::Error::NotFound { .. } => BlobError::NotFound(hash.clone()),
            e => BlobError::ObjectStore(e),
        }
    }

    /// Streams a body too large for one part: multipart to a staging key, completed and
    /// copied to `dest` only if it hashes to `expected`.
    async fn put_multipart(
        &self,
        expected: &Sha256Hex,
        first: Vec<Bytes>,
        mut body: ByteStream,
        mut check: UploadCheck,
    ) -> Result<u64, BlobError> {
        let staging = self
            .staging
            .clone()
            .join(format!("{:032x}", rand::random::<u128>()));
        let upload = self.store.put_multipart(&staging).await?;
        let mut writer = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE)));
        for chunk in first {
            writer.get().put(chunk);
        }
        let received: Result<u64, BlobError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = check.take(chunk)?;
                writer.get().wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.get().put(chunk);
            }
            check.verify(expected)
        }
        .await;
        let writer = writer.0.take().expect("writer is taken once");
        let size = match received {
            Ok(size) => size,
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key = %staging, error = %abort, "could not abort multipart upload");
                }
                return Err(e);
            }
        };
        writer.finish().await?;
        // Plain copy: a blob is immutable, so a concurrent put overwrites identical bytes.
        let copied = self.store.copy(&staging, &self.key(expected)).await;
        if let Err(e) = self.store.delete(&staging).await {
            tracing::warn!(key = %staging, error = %e, "could not delete staging object");
        }
        copied?;
        Ok(size)
    }
}

/// Holds a multipart upload; if the `put` future is dropped before it finished or aborted
/// the upload, the abort is sent from a background task so no parts stay behind.
struct AbortOnDrop(Option<WriteMultipart>);

impl AbortOnDrop {
    fn get(&mut self) -> &mut WriteMultipart {
        self.0.as_mut().expect("writer present until taken")
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = writer.abort().await {
                    tracing::warn!(error = %e, "could not abort dropped multipart upload");
                }
            });
        }
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    fn backend(&self) -> &'static str {
        "s3"
    }

    async fn put(
        &self,
        expected: &Sha256Hex,
        mut body: ByteStream,
        max_size: u64,
    ) -> Result<u64, BlobError> {
        let key = self.key(expected);
        // A stored copy that fails its hash counts as absent: the upload replaces it.
        let exists = super::holds_intact(self, expected).await?;
        let mut check = UploadCheck::new(max_size);
        let mut buffered = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = check.take(chunk)?;
            if exists {
                continue; // checked, then dropped
            }
            buffered.push(chunk);
            if check.size() >= PART_SIZE as u64 {
                return self.put_multipart(expected, buffered, body, check).await;
            }
        }
        let size = check.verify(expected)?;
        if !exists {
            // Verified in memory already, so it can go straight to its key.
            self.store
                .put(&key, PutPayload::from_iter(buffered))
                .await?;
        }
        Ok(size)
    }

    async fn size(&self, hash: &Sha256Hex) -> Result<Option<u64>, BlobError> {
        match self.store.head(&self.key(hash)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn get(
        &self,
        hash: &Sha256Hex,
        range: Option<Range<u64>>,
    ) -> Result<BlobRead, BlobError> {
        let key = self.key(hash);
        if let Some(r) = &range
            && r.start >= r.end
        {
            // Not sent: S3 would read an empty range as "the whole object".
            let size = self
                .size(hash)
                .await?
                .ok_or(BlobError::NotFound(hash.clone()))?;
            return Err(BlobError::BadRange {
                start: r.start,
                end: r.end,
                size,
            });
        }
        let options = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..Default::default()
        };
        match self.store.get_opts(&key, options).await {
            Ok(result) => Ok(BlobRead {
                size: result.meta.size,
                range: result.range.clone(),
                stream: Box::pin(result.into_stream().map_err(std::io::Error::other)),
            }),
            Err(e) => {
                let e = Self::map_err(hash, e);
                // A range past the end fails (416); tell it apart from other errors by size.
                if let (BlobError::ObjectStore(_), Some(r)) = (&e, &range)
                    && let Ok(Some(size)) = self.size(hash).await
                    && r.start >= size
                {
                    return Err(BlobError::BadRange {
                        start: r.start,
                        end: r.end,
                        size,
                    });
                }
                Err(e)
            }
        }
    }

    async fn presigned_get(
        &self,
        hash: &Sha256Hex,
        ttl: Duration,
    ) -> Result<Option<String>, BlobError> {
        let url = self
            .store
            .signed_url(reqwest::Method::GET, &self.key(hash), ttl)
            .await?;
        Ok(Some(url.to_string()))
    }

    async fn quarantine(&self, hash: &Sha256Hex) -> Result<String, BlobError> {
        // Copy, then delete the original: the bytes stay in the bucket, out of the blob folder
        // (whose listing takes only direct children).
        let dest = self.prefix.clone().join("quarantine").join(format!(
            "{hash}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ));
        self.store
            .copy(&self.key(hash), &dest)
            .await
            .map_err(|e| Self::map_err(hash, e))?;
        self.store
            .delete(&self.key(hash))
            .await
            .map_err(|e| Self::map_err(hash, e))?;
        Ok(dest.to_string())
    }

    async fn delete(&self, hash: &Sha256Hex) -> Result<bool, BlobError> {
        // S3 deletes answer success for a missing key too: ask first, for an honest count.
        if self.size(hash).await?.is_none() {
            return Ok(false);
        }
        match self.store.delete(&self.key(hash)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_stored(&self) -> Result<Vec<StoredBlob>, BlobError> {
        // Only direct children named by a digest: objects under `staging/` are skipped.
        let mut out = Vec::new();
        let mut objects = self.store.list(Some(&self.prefix));
        while let Some(meta) = objects.try_next().await? {
            let mut rest = match meta.location.prefix_match(&self.prefix) {
                Some(rest) => rest,
                None => continue,
            };
            if let (Some(name), None) = (rest.next(), rest.next())
                && let Ok(hash) = name.as_ref().parse::<Sha256Hex>()
            {
                out.push(StoredBlob {
                    hash,
                    size: meta.size,
                    modified: meta.last_modified,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_masked_secret() {
        let config: S3Config = toml::from_str(
            r#"
            bucket = "b"
            access_key_id = "AKIDEXAMPLE"
            secret_access_key = "wJalrXUtnFEMI-very-secret"
            "#,
        )
        .unwrap();
        assert_eq!(config.endpoint, None);
        assert_eq!(config.region, "us-east-1");
        assert_eq!(config.prefix, "blobs/");
        assert!(config.path_style);
        assert!(!config.allow_http);
        assert_eq!(config.presign_ttl(), Duration::from_secs(300));
        for shown in [format!("{config:?}"), format!("{config}")] {
            assert!(!shown.contains("very-secret"), "{shown}");
            assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        }
    }

    #[test]
    fn keys_live_under_the_prefix() {
        let mut config: S3Config =
            toml::from_str("bucket = \"b\"\naccess_key_id = \"a\"\nsecret_access_key = \"s\"")
                .unwrap();
        let hash = Sha256Hex::of(b"abc");
        for prefix in ["blobs/", "/blobs", "blobs"] {
            config.prefix = prefix.to_owned();
            let store = S3BlobStore::new(&config).unwrap();
            assert_eq!(store.key(&hash).to_string(), format!("blobs/{hash}"));
        }
        config.prefix = String::new();
        let store = S3BlobStore::new(&config).unwrap();
        assert_eq!(store.key(&hash).to_string(), hash.to_string());
    }
}
