//! The content-addressed blob cache of one space: `DIR/.synchub/cache/ab/<sha256>`. A blob
//! enters it only after its hash was checked (written under `tmp/`, then renamed), so a file
//! under its address always held those bytes when it arrived. Trees are built from here by
//! hard links; a forced sync re-hashes the entries because a hard-linked file edited in place
//! changes here too.
//!
//! `manifests/<version>-<hash>` keeps the canonical manifests of versions applied here, as
//! long as the cache still holds every blob one names (at most [`MAX_KEPT_MANIFESTS`]): with
//! them `synchub-agent restore` rebuilds such a version without the hub.

use crate::blob_check::{OnDisk, check_file, hash_file};
use crate::error::{ClientError, IoContext, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use synchub_protocol::{Manifest, Sha256Hex};

/// Most manifests kept in `manifests/` (the newest versions win).
pub(crate) const MAX_KEPT_MANIFESTS: usize = 16;

/// The blob cache of one space.
#[derive(Clone, Debug)]
pub(crate) struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating) the cache under `root`.
    pub(crate) fn open(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(root.join("tmp")).ctx(|| format!("creating {}", root.display()))?;
        Ok(Cache { root })
    }

    /// Where the blob lives.
    pub(crate) fn path(&self, sha256: &Sha256Hex) -> PathBuf {
        let s = sha256.as_str();
        self.root.join(&s[..2]).join(s)
    }

    /// The partial download of a large blob, kept across failures for a ranged resume.
    pub(crate) fn part_path(&self, sha256: &Sha256Hex) -> PathBuf {
        self.root.join("tmp").join(format!("{sha256}.part"))
    }

    /// A fresh temp file name for a blob being written.
    pub(crate) fn temp_path(&self) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{}.tmp", uuid::Uuid::new_v4().simple()))
    }

    /// Whether the blob is present with the expected size (not re-hashed).
    pub(crate) fn has(&self, sha256: &Sha256Hex, size: u64) -> bool {
        std::fs::metadata(self.path(sha256)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Whether the blob is there. With `rehash` (a forced sync) its bytes are hashed again and
    /// a wrong entry (edited in place through a tree link, damaged) is dropped; without, the
    /// size decides.
    pub(crate) fn check(&self, sha256: &Sha256Hex, size: u64, rehash: bool) -> Result<Cached> {
        let path = self.path(sha256);
        if !rehash {
            return Ok(if self.has(sha256, size) {
                Cached::Intact
            } else {
                Cached::Missing
            });
        }
        match check_file(&path, sha256, size).ctx(|| format!("reading {}", path.display()))? {
            OnDisk::Intact => Ok(Cached::Intact),
            OnDisk::Missing => Ok(Cached::Missing),
            OnDisk::Corrupted { .. } => {
                tracing::warn!(blob = %sha256, "cached blob is corrupted; dropping it");
                remove_file_forced(&path).ctx(|| format!("removing {}", path.display()))?;
                Ok(Cached::Dropped)
            }
        }
    }

    /// The paths of `manifest` whose blob the cache lacks.
    pub(crate) fn lacking<'m>(&self, manifest: &'m synchub_protocol::Manifest) -> Vec<&'m str> {
        manifest
            .entries()
            .iter()
            .filter(|e| !self.has(&e.sha256, e.size))
            .map(|e| e.path.as_str())
            .collect()
    }

    /// Moves a checked temp file to the blob's address (fsync'd first).
    pub(crate) fn insert(&self, temp: &Path, sha256: &Sha256Hex) -> Result<()> {
        let dest = self.path(sha256);
        let dir = dest.parent().expect("cache path has a parent");
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        crate::apply::sync_file(temp).ctx(|| format!("syncing {}", temp.display()))?;
        self.place(temp, sha256, &dest)
    }

    /// Renames a checked temp file to `dest`. An entry already there (the same blob fetched
    /// twice) is usually right and read-only through its tree links, and Windows cannot rename
    /// over a read-only file: keep a right one, replace a wrong one.
    fn place(&self, temp: &Path, sha256: &Sha256Hex, dest: &Path) -> Result<()> {
        if std::fs::symlink_metadata(dest).is_ok() {
            if hash_file(dest).is_ok_and(|(actual, _)| actual == *sha256) {
                let _ = std::fs::remove_file(temp);
                return Ok(());
            }
            remove_file_forced(dest).ctx(|| format!("removing {}", dest.display()))?;
        }
        crate::apply::rename_retrying(temp, dest)
            .ctx(|| format!("renaming into {}", dest.display()))
    }

    /// Writes checked bytes to a temp file, fsyncs it and moves it to the blob's address: one
    /// blocking call per small blob instead of a trip to the blocking pool per step.
    pub(crate) fn insert_bytes(&self, sha256: &Sha256Hex, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let temp = self.temp_path();
        let written = std::fs::File::create(&temp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(ClientError::io(format!("writing {}", temp.display()), e));
        }
        let dest = self.path(sha256);
        let dir = dest.parent().expect("cache path has a parent");
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        self.place(&temp, sha256, &dest)
    }

    /// Drops temp files of interrupted writes (not `.part` files: those resume).
    pub(crate) fn clean_temp(&self) {
        if let Ok(rd) = std::fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// Keeps the manifest of a version applied here (written whole or not at all).
    pub(crate) fn keep_manifest(&self, version: u64, manifest: &Manifest) -> Result<()> {
        let dir = self.manifests_dir();
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let canonical = manifest.canonical_bytes();
        let name = crate::apply::tree_name(version, &Sha256Hex::of(&canonical));
        crate::apply::write_atomic(&dir.join(name), &canonical)
    }

    /// The kept manifests of `version` whose bytes still hash to the name they are kept
    /// under, newest first.
    pub(crate) fn manifests_of(&self, version: u64) -> Vec<Manifest> {
        let mut found: Vec<(std::time::SystemTime, Manifest)> = self
            .kept_manifests()
            .into_iter()
            .filter(|(v, _)| *v == version)
            .filter_map(|(_, path)| {
                let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
                let bytes = std::fs::read(&path).ok()?;
                let name = path.file_name()?.to_str()?;
                let hash = Sha256Hex::of(&bytes);
                if crate::apply::tree_name(version, &hash) != name {
                    tracing::warn!(path = %path.display(), "a kept manifest is damaged; ignoring it");
                    return None;
                }
                let manifest =
                    Manifest::from_canonical(&bytes, crate::download::MAX_MANIFEST_ENTRIES).ok()?;
                Some((written, manifest))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found.into_iter().map(|(_, m)| m).collect()
    }

    /// `(version, path)` of every kept manifest.
    fn kept_manifests(&self) -> Vec<(u64, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.manifests_dir()) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                if name.contains(".tmp-") {
                    return None;
                }
                let version = name.split_once('-')?.0.parse().ok()?;
                Some((version, e.path()))
            })
            .collect()
    }

    /// Drops kept manifests naming a blob the cache no longer holds, and all but the newest
    /// [`MAX_KEPT_MANIFESTS`] versions.
    pub(crate) fn prune_manifests(&self) {
        let mut kept = self.kept_manifests();
        kept.sort_by_key(|k| std::cmp::Reverse(k.0));
        for (i, (_, path)) in kept.iter().enumerate() {
            let whole = i < MAX_KEPT_MANIFESTS
                && std::fs::read(path).ok().is_some_and(|bytes| {
                    Manifest::from_canonical(&bytes, crate::download::MAX_MANIFEST_ENTRIES)
                        .is_ok_and(|m| self.lacking(&m).is_empty())
                });
            if !whole {
                let _ = std::fs::remove_file(path);
            }
        }
        // Temp files of a write cut short.
        if let Ok(rd) = std::fs::read_dir(self.manifests_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().contains(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes every entry not in `keep`, and stale partial downloads.
    pub(crate) fn prune(&self, keep: &HashSet<Sha256Hex>) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        for dir in rd.flatten() {
            let name = dir.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 {
                continue;
            }
            let Ok(inner) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for f in inner.flatten() {
                let keep_it = f
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Sha256Hex>().ok())
                    .is_some_and(|h| keep.contains(&h));
                if !keep_it {
                    let _ = remove_file_forced(&f.path());
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let keep_it = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".part"))
                    .and_then(|n| n.parse::<Sha256Hex>().ok())
                    .is_some_and(|h| keep.contains(&h));
                if !keep_it {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// What [`Cache::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cached {
    Intact,
    /// Not there (or, without a re-hash, not at its size).
    Missing,
    /// It was there with other bytes and has been removed: fetch it again.
    Dropped,
}

/// Removes a file even when it was made read-only (tree files are).
pub(crate) fn remove_file_forced(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let mut perms = std::fs::metadata(path)?.permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(path, perms)?;
            std::fs::remove_file(path)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_verify_prune() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("cache")).unwrap();
        let body = b"hello";
        let sha = Sha256Hex::of(body);
        let tmp = cache.temp_path();
        std::fs::write(&tmp, body).unwrap();
        cache.insert(&tmp, &sha).unwrap();
        assert!(cache.has(&sha, 5));
        assert!(!cache.has(&sha, 6));
        assert_eq!(cache.check(&sha, 5, true).unwrap(), Cached::Intact);
        // Corrupt in place (what an edit through a hard link does): a re-hash drops it.
        std::fs::write(cache.path(&sha), b"HELLO").unwrap();
        assert_eq!(cache.check(&sha, 5, false).unwrap(), Cached::Intact);
        assert_eq!(cache.check(&sha, 5, true).unwrap(), Cached::Dropped);
        assert_eq!(cache.check(&sha, 5, true).unwrap(), Cached::Missing);
        assert!(!cache.path(&sha).exists());
        let tmp = cache.temp_path();
        std::fs::write(&tmp, body).unwrap();
        cache.insert(&tmp, &sha).unwrap();
        cache.prune(&HashSet::new());
        assert!(!cache.path(&sha).exists());
    }
}
