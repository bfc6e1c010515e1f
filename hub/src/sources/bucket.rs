//! Bucket sources: a folder of an existing S3-compatible bucket (Supabase Storage, B2, ...)
//! copied into a folder of a space. Used by the mirror (`[[bucket_source]]`, listing on a timer
//! and on every bump) and by `synchub import`.
//!
//! Copies are incremental: an object whose ETag and size did not change since the last listing
//! is not downloaded again; its blob hash is remembered (in memory: after a restart every
//! object is read once more). Objects are read whole (archives are small files); one above
//! [`MAX_OBJECT_BYTES`] or the hub's blob limit is skipped with a warning, like a key that is
//! not a valid path.

use super::SourceError;
use crate::blobs::{self, BlobStore};
use crate::config::BucketSource;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use synchub_protocol::{ManifestEntry, Sha256Hex};

/// Largest object copied: it is held in memory while it is hashed and stored.
pub const MAX_OBJECT_BYTES: u64 = 512 << 20;

/// `s3://bucket/prefix`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketUrl {
    pub bucket: String,
    /// Without slashes around it; empty for the whole bucket.
    pub prefix: String,
}

impl BucketUrl {
    pub fn parse(url: &str) -> Result<BucketUrl, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("bucket URL {url:?} must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || bucket.len() > 255 {
            return Err(format!("bucket URL {url:?} names no bucket"));
        }
        Ok(BucketUrl {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }
}

/// `into` is empty or a folder path ending in `/`.
pub fn check_into(into: &str) -> Result<(), String> {
    if into.is_empty() {
        return Ok(());
    }
    let folder = into
        .strip_suffix('/')
        .ok_or_else(|| format!("into {into:?} must end with /"))?;
    synchub_protocol::validate_path(folder).map_err(|e| format!("into {into:?}: {e}"))
}

/// A bucket folder and what was copied from it.
pub struct Mirror {
    store: AmazonS3,
    url: BucketUrl,
    into: String,
    /// Object key -> (ETag, size, blob hash) as last copied.
    known: HashMap<String, (Option<String>, u64, Sha256Hex)>,
}

impl Mirror {
    /// Builds the client; no request is made yet.
    pub fn new(source: &BucketSource) -> Result<Mirror, SourceError> {
        crate::blobs::s3::install_crypto_provider();
        let url = BucketUrl::parse(&source.url).map_err(SourceError::Invalid)?;
        check_into(&source.into).map_err(SourceError::Invalid)?;
        let mut builder = AmazonS3Builder::new()
            .with_region(&source.region)
            .with_bucket_name(&url.bucket)
            .with_access_key_id(&source.access_key_id)
            .with_secret_access_key(&source.secret_access_key)
            .with_virtual_hosted_style_request(!source.path_style)
            .with_allow_http(source.allow_http)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120))
                    .with_allow_http(source.allow_http),
            );
        if let Some(endpoint) = &source.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        Ok(Mirror {
            store: builder.build()?,
            url,
            into: source.into.clone(),
            known: HashMap::new(),
        })
    }

    /// The folder of the space this mirror fills (`into`).
    pub fn folder(&self) -> &str {
        &self.into
    }

    /// Forgets what earlier listings copied, so the next one copies every object again (after
    /// the collector removed a blob this mirror took for stored).
    pub fn forget(&mut self) {
        self.known.clear();
    }

    /// Lists the bucket folder and copies new or changed objects into the blob store; returns
    /// the space's entries for the folder, by path. Keys that are not valid paths are skipped
    /// with a warning.
    pub async fn sync(
        &mut self,
        blobs: &dyn BlobStore,
        max_bytes: u64,
    ) -> Result<BTreeMap<String, ManifestEntry>, SourceError> {
        let prefix = (!self.url.prefix.is_empty())
            .then(|| Path::parse(&self.url.prefix))
            .transpose()
            .map_err(object_store::Error::from)?;
        let objects: Vec<_> = self.store.list(prefix.as_ref()).try_collect().await?;
        let mut entries = BTreeMap::new();
        let mut seen = HashMap::new();
        for meta in objects {
            let key = meta.location.to_string();
            let rel = match &prefix {
                Some(p) => key
                    .strip_prefix(p.as_ref())
                    .and_then(|r| r.strip_prefix('/'))
                    .unwrap_or(&key),
                None => key.as_str(),
            };
            if rel.is_empty() || rel.ends_with('/') {
                continue; // a folder marker
            }
            let path = format!("{}{rel}", self.into);
            if let Err(e) = synchub_protocol::validate_path(&path) {
                tracing::warn!(bucket = self.url.bucket, key, error = %e, "skipping an object whose key is not a valid path");
                continue;
            }
            let limit = max_bytes.min(MAX_OBJECT_BYTES);
            if meta.size > limit {
                // One oversized object must not hold back every other change of the space.
                tracing::warn!(
                    bucket = self.url.bucket,
                    key,
                    size = meta.size,
                    limit,
                    "skipping an object above the size limit for copied objects"
                );
                continue;
            }
            let sha256 = self.copy(blobs, &key, &meta).await?;
            seen.insert(key, (meta.e_tag, meta.size, sha256.clone()));
            entries.insert(
                path.clone(),
                ManifestEntry {
                    path,
                    size: meta.size,
                    sha256,
                },
            );
        }
        self.known = seen;
        Ok(entries)
    }

    /// The hash of an object's content: remembered when its ETag and size are unchanged since
    /// the last listing, otherwise read from the bucket and copied into the blob store.
    async fn copy(
        &self,
        blobs: &dyn BlobStore,
        key: &str,
        meta: &object_store::ObjectMeta,
    ) -> Result<Sha256Hex, SourceError> {
        if let Some((etag, size, hash)) = self.known.get(key)
            && *etag == meta.e_tag
            && *size == meta.size
        {
            return Ok(hash.clone());
        }
        let bytes = self.store.get(&meta.location).await?.bytes().await?;
        if bytes.len() as u64 != meta.size {
            return Err(SourceError::Invalid(format!(
                "object {key} changed while it was read; the next listing retries"
            )));
        }
        Ok(blobs::put_bytes(blobs, bytes).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_folders_are_checked() {
        assert_eq!(
            BucketUrl::parse("s3://scores/arhiva/").unwrap(),
            BucketUrl {
                bucket: "scores".into(),
                prefix: "arhiva".into()
            }
        );
        assert_eq!(BucketUrl::parse("s3://scores").unwrap().prefix, "");
        assert!(BucketUrl::parse("https://x/y").is_err());
        assert!(BucketUrl::parse("s3:///x").is_err());
        check_into("").unwrap();
        check_into("arhiva/").unwrap();
        assert!(check_into("arhiva").is_err());
        assert!(check_into("../x/").is_err());
    }
}
