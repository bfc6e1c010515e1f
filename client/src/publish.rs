//! Publishing local files as one new version: hash them, skip those the head already has
//! unchanged, ask the hub which blobs it lacks, upload only those, and commit on the current
//! head, with the deletions asked for (`--delete PATH`) or implied (`--mirror`: what the space
//! has under the prefix but the local folders lack). When a newer head touched the same paths the hub answers 409: the local file is kept
//! as a conflict copy (`name.conflict-<timestamp>.ext` beside it) and the error says which
//! paths lost, so nothing the user made is lost. When the hub's garbage collector removed an
//! uploaded blob before the commit named it, the hub answers `missing_blobs`: the blobs it
//! lacks are uploaded again and the commit retried (a few times, see [`commit_reuploading`]).

use crate::apply::walk_files;
use crate::blob_check::hash_file;
use crate::download::fetch_manifest;
use crate::error::{ClientError, IoContext, Result};
use crate::hub_api::{HeadCheck, HubApi};
use futures::{StreamExt, TryStreamExt};
use std::path::{Path, PathBuf};
use synchub_protocol::{
    BlobList, CommitRequest, CommitResponse, Head, ManifestEntry, Sha256Hex, codes, validate_path,
};
use tokio_util::io::ReaderStream;

/// A local file and the path it gets in the space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PublishFile {
    pub local: PathBuf,
    pub remote: String,
    pub size: u64,
    pub sha256: Sha256Hex,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The new head, or the unchanged one when nothing differed.
    pub head: Head,
    /// Files that differed from the head and were committed.
    pub files: u64,
    /// Paths removed from the space.
    pub deleted: u64,
    /// Files in the space after the publish, when the new version is known.
    pub total: Option<u64>,
    /// Blobs the hub lacked and got.
    pub uploaded: u64,
    pub bytes_uploaded: u64,
    pub unchanged: u64,
}

/// Lists the files to publish: a file goes to `prefix/<file name>`; a folder's files keep
/// their path below the folder, under `prefix/`. Every remote path is validated.
pub(crate) fn collect(paths: &[PathBuf], prefix: Option<&str>) -> Result<Vec<(PathBuf, String)>> {
    let prefix = prefix
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty());
    let join = |rel: &str| match prefix {
        Some(p) => format!("{p}/{rel}"),
        None => rel.to_owned(),
    };
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).ctx(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            for rel in walk_files(path) {
                out.push((path.join(&rel), join(&rel)));
            }
        } else {
            let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                ClientError::Config(format!("{} has no usable name", path.display()))
            })?;
            out.push((path.clone(), join(name)));
        }
    }
    for (_, remote) in &out {
        validate_path(remote)?;
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    if let Some(w) = out.windows(2).find(|w| w[0].1 == w[1].1) {
        return Err(ClientError::Config(format!(
            "two files would publish as {:?}",
            w[0].1
        )));
    }
    Ok(out)
}

/// What one publish does beyond adding and changing files.
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    /// Folder in the space the files go under.
    pub prefix: Option<String>,
    pub message: Option<String>,
    /// Make the space under `prefix` (all of it without one) identical to the local files:
    /// paths the space has there and the local files lack are deleted.
    pub mirror: bool,
    /// Paths in the space to delete (each must be there).
    pub deletes: Vec<String>,
    /// Upload every listed file's bytes, even those the hub says it has: the hub replaces a
    /// stored copy that fails its hash, so this repairs a blob damaged on the hub's disk.
    pub reupload: bool,
    /// Told the bytes uploaded so far and the bytes to upload: once before the uploads start
    /// and after each file (for a progress bar).
    pub progress: Option<UploadProgress>,
}

/// A callback for [`PublishOptions::progress`]: `(bytes done, bytes in all)`.
#[derive(Clone)]
pub struct UploadProgress(pub std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for UploadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UploadProgress")
    }
}

/// Publishes `paths` to `space` as one commit.
pub async fn publish(
    api: &HubApi,
    space: &str,
    prefix: Option<&str>,
    paths: &[PathBuf],
    message: Option<String>,
) -> Result<PublishOutcome> {
    let options = PublishOptions {
        prefix: prefix.map(str::to_owned),
        message,
        ..PublishOptions::default()
    };
    publish_with(api, space, paths, &options).await
}

/// The paths a commit deletes: those named (each must be in `current`), and with `mirror`
/// every path of `current` under `prefix` that is not in `published`. Sorted, no repeats.
pub(crate) fn deletions(
    current: Option<&synchub_protocol::Manifest>,
    published: &[String],
    options: &PublishOptions,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for path in &options.deletes {
        validate_path(path)?;
        if current.and_then(|m| m.get(path)).is_none() {
            return Err(ClientError::Config(format!(
                "cannot delete {path:?}: the space has no such file"
            )));
        }
        out.push(path.clone());
    }
    if options.mirror
        && let Some(current) = current
    {
        let scope = options
            .prefix
            .as_deref()
            .map(|p| p.trim_matches('/'))
            .filter(|p| !p.is_empty())
            .map(|p| format!("{p}/"));
        for entry in current.entries() {
            let inside = scope.as_deref().is_none_or(|s| entry.path.starts_with(s));
            if inside && published.binary_search(&entry.path).is_err() {
                out.push(entry.path.clone());
            }
        }
    }
    out.sort();
    out.dedup();
    if let Some(both) = out.iter().find(|p| published.binary_search(p).is_ok()) {
        return Err(ClientError::Config(format!(
            "{both:?} is both published and deleted"
        )));
    }
    Ok(out)
}

/// Publishes `paths` to `space` as one commit, with the deletions `options` asks for.
pub async fn publish_with(
    api: &HubApi,
    space: &str,
    paths: &[PathBuf],
    options: &PublishOptions,
) -> Result<PublishOutcome> {
    let prefix = options.prefix.as_deref();
    let message = options.message.clone();
    let listed = collect(paths, prefix)?;
    // `collect` sorts by remote path, so this is sorted for `deletions`' binary search.
    let published: Vec<String> = listed.iter().map(|(_, r)| r.clone()).collect();
    let files = tokio::task::spawn_blocking(move || -> Result<Vec<PublishFile>> {
        listed
            .into_iter()
            .map(|(local, remote)| {
                let (sha256, size) =
                    hash_file(&local).ctx(|| format!("reading {}", local.display()))?;
                Ok(PublishFile {
                    local,
                    remote,
                    size,
                    sha256,
                })
            })
            .collect()
    })
    .await
    .map_err(|e| ClientError::Protocol(e.to_string()))??;

    let head = match api.head(space, None).await? {
        HeadCheck::Head { head, .. } => head,
        HeadCheck::NotModified => {
            return Err(ClientError::Protocol("304 without If-None-Match".into()));
        }
    };
    let current = if head.version > 0 {
        Some(fetch_manifest(api, &head).await?)
    } else {
        None
    };
    let deletes = deletions(current.as_ref(), &published, options)?;
    let (changed, unchanged): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| {
        current
            .as_ref()
            .and_then(|m| m.get(&f.remote))
            .is_none_or(|e| e.sha256 != f.sha256 || e.size != f.size)
    });
    if changed.is_empty() && deletes.is_empty() && !options.reupload {
        return Ok(PublishOutcome {
            head,
            files: 0,
            deleted: 0,
            total: current.as_ref().map(|m| m.len() as u64),
            uploaded: 0,
            bytes_uploaded: 0,
            unchanged: unchanged.len() as u64,
        });
    }

    let sent: Vec<&PublishFile> = if options.reupload {
        changed.iter().chain(unchanged.iter()).collect()
    } else {
        changed.iter().collect()
    };
    let (mut uploaded, mut bytes_uploaded) =
        upload_missing(api, &sent, options.reupload, options.progress.as_ref()).await?;
    if changed.is_empty() && deletes.is_empty() {
        // A repair only: the bytes went up, the version stays.
        return Ok(PublishOutcome {
            head,
            files: 0,
            deleted: 0,
            total: current.as_ref().map(|m| m.len() as u64),
            uploaded,
            bytes_uploaded,
            unchanged: unchanged.len() as u64,
        });
    }

    let request = CommitRequest {
        base_version: head.version,
        puts: changed
            .iter()
            .map(|f| ManifestEntry {
                path: f.remote.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
            })
            .collect(),
        deletes: deletes.clone(),
        message,
    };
    let (committed, again, again_bytes) =
        commit_reuploading(api, space, &request, &sent, options.progress.as_ref()).await;
    uploaded += again;
    bytes_uploaded += again_bytes;
    match committed {
        Ok(resp) => Ok(PublishOutcome {
            head: resp.head,
            files: changed.len() as u64,
            deleted: deletes.len() as u64,
            total: current
                .as_ref()
                .map(|m| {
                    let before = m.len() as u64;
                    let added = changed
                        .iter()
                        .filter(|f| m.get(&f.remote).is_none())
                        .count() as u64;
                    before + added - deletes.len() as u64
                })
                .or(Some(changed.len() as u64)),
            uploaded,
            bytes_uploaded,
            unchanged: unchanged.len() as u64,
        }),
        Err(ClientError::Conflict { conflicts, head }) => {
            let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
            for f in changed
                .iter()
                .filter(|f| conflicts.is_empty() || conflicts.contains(&f.remote))
            {
                match keep_conflict_copy(&f.local, &stamp) {
                    Ok(copy) => {
                        tracing::warn!(file = %f.local.display(), copy = %copy.display(), "conflict: kept a copy")
                    }
                    Err(e) => {
                        tracing::error!(file = %f.local.display(), error = %e, "conflict copy failed")
                    }
                }
            }
            Err(ClientError::Conflict { conflicts, head })
        }
        Err(e) => Err(e),
    }
}

/// Retries of a commit refused with `missing_blobs`.
const MISSING_BLOB_RETRIES: u32 = 3;

/// Commits `request`; when the hub answers `missing_blobs` (its garbage collector removed a
/// blob of `sent` between the upload and the commit), uploads what it lacks again and retries,
/// up to [`MISSING_BLOB_RETRIES`] times with a growing pause (a blob the collector is still
/// deleting shows as missing once it is gone). Returns the commit's answer and the blobs and
/// bytes uploaded again.
pub(crate) async fn commit_reuploading(
    api: &HubApi,
    space: &str,
    request: &CommitRequest,
    sent: &[&PublishFile],
    progress: Option<&UploadProgress>,
) -> (Result<CommitResponse>, u64, u64) {
    let (mut uploaded, mut bytes) = (0, 0);
    let mut result = api.commit(space, request).await;
    for attempt in 1..=MISSING_BLOB_RETRIES {
        match &result {
            Err(ClientError::Api { error, .. }) if error.code == codes::MISSING_BLOBS => {
                tracing::warn!(space, attempt, reason = %error.message,
                    "the hub lacks blobs of this commit; uploading them again");
            }
            _ => break,
        }
        tokio::time::sleep(std::time::Duration::from_millis(500 << (attempt - 1))).await;
        match upload_missing(api, sent, false, progress).await {
            Ok((n, b)) => {
                uploaded += n;
                bytes += b;
            }
            Err(e) => return (Err(e), uploaded, bytes),
        }
        result = api.commit(space, request).await;
    }
    (result, uploaded, bytes)
}

/// Uploads the blobs of `sent` the hub lacks (all of them with `force`), a few at a time (the
/// hub checks every hash, so a file changed since it was hashed is refused, never stored
/// half-done). Returns how many blobs and bytes went up.
pub(crate) async fn upload_missing(
    api: &HubApi,
    sent: &[&PublishFile],
    force: bool,
    progress: Option<&UploadProgress>,
) -> Result<(u64, u64)> {
    let mut wanted: Vec<Sha256Hex> = sent.iter().map(|f| f.sha256.clone()).collect();
    wanted.sort();
    wanted.dedup();
    let missing = if force {
        wanted
    } else {
        api.missing(&BlobList { sha256: wanted }).await?.sha256
    };
    // Owned, so the upload futures borrow nothing (they must be `Send` for any caller).
    let to_upload: Vec<PublishFile> = missing
        .iter()
        .filter_map(|sha| sent.iter().find(|f| &f.sha256 == sha).map(|f| (*f).clone()))
        .collect();
    let uploaded = to_upload.len() as u64;
    let bytes_uploaded = to_upload.iter().map(|f| f.size).sum();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tell = move |n: u64| {
        if let Some(UploadProgress(progress)) = progress {
            progress(n, bytes_uploaded);
        }
    };
    tell(0);
    futures::stream::iter(to_upload)
        .map(|f| {
            let (api, done) = (api.clone(), done.clone());
            async move {
                let file = tokio::fs::File::open(&f.local)
                    .await
                    .ctx(|| format!("opening {}", f.local.display()))?;
                let body =
                    reqwest::Body::wrap_stream(ReaderStream::with_capacity(file, 256 * 1024));
                api.put_blob(&f.sha256, body).await?;
                let now = done.fetch_add(f.size, std::sync::atomic::Ordering::Relaxed) + f.size;
                Ok::<u64, ClientError>(now)
            }
        })
        .buffer_unordered(8)
        .try_for_each(|now| {
            tell(now);
            std::future::ready(Ok(()))
        })
        .await?;
    Ok((uploaded, bytes_uploaded))
}

/// `dir/name.ext` -> `dir/name.conflict-<stamp>.ext`.
pub(crate) fn conflict_copy_path(local: &Path, stamp: &str) -> PathBuf {
    let stem = local
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match local.extension() {
        Some(ext) => format!("{stem}.conflict-{stamp}.{}", ext.to_string_lossy()),
        None => format!("{stem}.conflict-{stamp}"),
    };
    local.with_file_name(name)
}

fn keep_conflict_copy(local: &Path, stamp: &str) -> Result<PathBuf> {
    let dest = conflict_copy_path(local, stamp);
    std::fs::copy(local, &dest)
        .ctx(|| format!("copying {} to {}", local.display(), dest.display()))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_copy_names() {
        assert_eq!(
            conflict_copy_path(Path::new("/a/Liceul_2026.json"), "20261125-143000"),
            PathBuf::from("/a/Liceul_2026.conflict-20261125-143000.json")
        );
        assert_eq!(
            conflict_copy_path(Path::new("/a/README"), "x"),
            PathBuf::from("/a/README.conflict-x")
        );
    }

    #[test]
    fn collect_files_and_folders_with_prefix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("qr/04313-11100-F")).unwrap();
        std::fs::write(dir.path().join("qr/04313-11100-F/a.png"), b"a").unwrap();
        std::fs::write(dir.path().join("one.json"), b"{}").unwrap();
        let got = collect(
            &[dir.path().join("qr"), dir.path().join("one.json")],
            Some("/arhiva/"),
        )
        .unwrap();
        let remotes: Vec<&str> = got.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(
            remotes,
            vec!["arhiva/04313-11100-F/a.png", "arhiva/one.json"]
        );
        assert!(collect(&[dir.path().join("one.json")], Some("../x")).is_err());
    }

    fn manifest(paths: &[&str]) -> synchub_protocol::Manifest {
        synchub_protocol::Manifest::new(
            paths
                .iter()
                .map(|p| ManifestEntry {
                    path: (*p).to_owned(),
                    size: 1,
                    sha256: Sha256Hex::of(p.as_bytes()),
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn mirror_deletes_what_the_folder_lacks_within_the_prefix() {
        let current = manifest(&["a.json", "qr/x.png", "qr/y.png", "qrcodes/z.png"]);
        let published = vec!["qr/x.png".to_owned()];
        let options = PublishOptions {
            prefix: Some("qr".into()),
            mirror: true,
            ..PublishOptions::default()
        };
        assert_eq!(
            deletions(Some(&current), &published, &options).unwrap(),
            vec!["qr/y.png"]
        );
        let whole = PublishOptions {
            mirror: true,
            ..PublishOptions::default()
        };
        assert_eq!(
            deletions(Some(&current), &published, &whole).unwrap(),
            vec!["a.json", "qr/y.png", "qrcodes/z.png"]
        );
        assert!(deletions(None, &published, &whole).unwrap().is_empty());
    }

    #[test]
    fn named_deletes_must_exist_and_not_be_published() {
        let current = manifest(&["a.json", "b.json"]);
        let options = |d: &[&str]| PublishOptions {
            deletes: d.iter().map(|p| (*p).to_owned()).collect(),
            ..PublishOptions::default()
        };
        assert_eq!(
            deletions(Some(&current), &[], &options(&["b.json"])).unwrap(),
            vec!["b.json"]
        );
        let err = deletions(Some(&current), &[], &options(&["c.json"])).unwrap_err();
        assert!(err.to_string().contains("c.json"), "{err}");
        assert!(deletions(Some(&current), &["a.json".into()], &options(&["a.json"])).is_err());
        assert!(deletions(Some(&current), &[], &options(&["../a"])).is_err());
    }
}
