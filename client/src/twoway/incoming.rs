//! A new hub version merged into the folder in place, file by file: each changed file is
//! written to a temp file beside it and renamed over it, so a program never reads a file
//! half-written. The rules, per path the hub changed since the base:
//!
//! - the local file is as in the base: the hub's version replaces it (or it is deleted);
//! - the local file already has the hub's content: nothing to do;
//! - this PC deleted it and the hub changed it: the hub's version comes back (an edit beats a
//!   deletion);
//! - this PC changed it and the hub deleted it: the local file stays, and is published again;
//! - both changed it: the hub's version takes the name and the local one is kept beside it as
//!   a conflict copy (see `conflict.rs`), which is then published like any new file.
//!
//! No local edit is ever overwritten.

use super::Folder;
use super::base::{Base, BaseFile};
use super::conflict::conflict_name;
use super::ignore::TEMP_SUFFIX;
use super::scan::Stat;
use crate::agent::Agent;
use crate::blob_check::hash_file;
use crate::cache::Cache;
use crate::download::{DownloadOptions, fetch_blobs, fetch_manifest};
use crate::error::{IoContext, Result};
use crate::space::Space;
use std::path::{Path, PathBuf};
use synchub_protocol::{Head, Manifest, ManifestEntry};

/// What a merge did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Merged {
    /// Files written or deleted here.
    pub(crate) applied: u64,
    pub(crate) bytes: u64,
    /// Local files kept as conflict copies.
    pub(crate) conflicts: Vec<String>,
    /// Files in the version.
    pub(crate) total: u64,
}

/// Brings the folder to `head`, keeping every local change (see the module comment). The
/// base is saved after the files, even when a file fails, so what was done is not redone.
pub(crate) async fn merge(
    folder: &Folder,
    ctx: &Agent,
    space: &Space,
    base: &mut Base,
    head: &Head,
) -> Result<Merged> {
    let manifest = fetch_manifest(&ctx.api, head).await?;
    let changes: Vec<(String, Option<ManifestEntry>)> = base
        .remote_changes(&manifest)
        .into_iter()
        .map(|(p, e)| (p, e.cloned()))
        .collect();
    let needed: Vec<ManifestEntry> = changes.iter().filter_map(|(_, e)| e.clone()).collect();
    let mut bytes = 0;
    if !needed.is_empty() {
        let wanted = Manifest::new(needed)?;
        let opts = DownloadOptions {
            parallel: ctx.config.parallel_downloads,
            pack_blob_max: ctx.config.pack_blob_max,
            pack_batch_bytes: ctx.config.pack_batch_bytes,
            reverify: false,
        };
        bytes = fetch_blobs(
            &ctx.api,
            &folder.cache,
            &wanted,
            &[],
            &opts,
            &space.progress,
        )
        .await?
        .bytes_fetched;
    }
    let root = folder.root.clone();
    let cache = folder.cache.clone();
    let host = folder.host.clone();
    let mut work = std::mem::take(base);
    let (work, result) = tokio::task::spawn_blocking(move || {
        let result = apply_all(&root, &cache, &host, &mut work, &changes);
        (work, result)
    })
    .await
    .map_err(|e| crate::ClientError::Protocol(format!("merge panicked: {e}")))?;
    *base = work;
    let merged = result.inspect_err(|_| {
        let _ = base.save(&folder.base_file());
    })?;
    base.version = head.version;
    base.data_hash = Some(head.data_hash.clone());
    base.save(&folder.base_file())?;
    // The folder itself holds the files: the cache keeps only what the base names (for a
    // rejected mass change), so it does not grow with every version.
    let keep: std::collections::HashSet<_> =
        base.files.values().map(|f| f.sha256.clone()).collect();
    let cache = folder.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.prune(&keep)).await;
    Ok(Merged {
        bytes,
        total: manifest.len() as u64,
        ..merged
    })
}

fn apply_all(
    root: &Path,
    cache: &Cache,
    host: &str,
    base: &mut Base,
    changes: &[(String, Option<ManifestEntry>)],
) -> Result<Merged> {
    let mut merged = Merged::default();
    let now = chrono::Utc::now();
    for (rel, remote) in changes {
        let file = local_path(root, rel);
        let local = Stat::read(&file);
        if base.unchanged_locally(rel, local, &file) {
            match remote {
                Some(e) => {
                    place(cache, e, &file)?;
                    set(base, e, &file);
                }
                None => {
                    remove(root, &file)?;
                    base.files.remove(rel);
                }
            }
            merged.applied += 1;
            continue;
        }
        match (remote, local) {
            (Some(e), Some(_))
                if hash_file(&file).is_ok_and(|(sha, size)| sha == e.sha256 && size == e.size) =>
            {
                set(base, e, &file);
            }
            (Some(e), None) => {
                place(cache, e, &file)?;
                set(base, e, &file);
                merged.applied += 1;
            }
            (None, _) => {
                base.files.remove(rel);
            }
            (Some(e), Some(_)) => {
                let copy = free_conflict_name(root, rel, host, now);
                crate::apply::rename_retrying(&file, &local_path(root, &copy))
                    .ctx(|| format!("keeping {} as {copy}", file.display()))?;
                tracing::warn!(file = %rel, copy = %copy,
                    "changed here and on the hub: the hub's version is kept, this PC's as a copy");
                place(cache, e, &file)?;
                set(base, e, &file);
                merged.applied += 1;
                merged.conflicts.push(copy);
            }
        }
    }
    Ok(merged)
}

fn set(base: &mut Base, e: &ManifestEntry, file: &Path) {
    base.files.insert(
        e.path.clone(),
        BaseFile {
            sha256: e.sha256.clone(),
            size: e.size,
            local: Stat::read(file),
        },
    );
}

/// `root/a/b` for the space path `a/b` (validated when the manifest was parsed).
pub(crate) fn local_path(root: &Path, rel: &str) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(rel.split('/'));
    p
}

fn free_conflict_name(
    root: &Path,
    rel: &str,
    host: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut n = 1;
    loop {
        let name = conflict_name(rel, host, now, n);
        if std::fs::symlink_metadata(local_path(root, &name)).is_err() || n > 1000 {
            return name;
        }
        n += 1;
    }
}

/// Copies a cached blob to a temp file beside `dest` and renames it over `dest`.
pub(crate) fn place(cache: &Cache, e: &ManifestEntry, dest: &Path) -> Result<()> {
    let dir = dest.parent().expect("a file in the folder has a parent");
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{name}.{}{TEMP_SUFFIX}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let copied = std::fs::copy(cache.path(&e.sha256), &temp)
        .and_then(|_| {
            // The cache's copies are read-only (the copy takes that over); the app's own files
            // are not.
            let mut perms = std::fs::metadata(&temp)?.permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&temp, perms)
        })
        .and_then(|()| crate::apply::sync_file(&temp));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&temp);
        return Err(crate::ClientError::io(
            format!("writing {}", temp.display()),
            e,
        ));
    }
    crate::apply::rename_retrying(&temp, dest).map_err(|err| {
        let _ = std::fs::remove_file(&temp);
        crate::ClientError::io(format!("renaming into {}", dest.display()), err)
    })
}

/// Deletes a file the hub deleted, and the folders that leaves empty.
fn remove(root: &Path, file: &Path) -> Result<()> {
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(crate::ClientError::io(
                format!("deleting {}", file.display()),
                e,
            ));
        }
    }
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == root || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchub_protocol::Sha256Hex;

    fn entry(path: &str, body: &[u8]) -> ManifestEntry {
        ManifestEntry {
            path: path.to_owned(),
            size: body.len() as u64,
            sha256: Sha256Hex::of(body),
        }
    }

    /// The base after `files` were merged: on disk and in the base.
    fn setup(files: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf, Cache, Base) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("qr");
        let cache = Cache::open(dir.path().join("cache")).unwrap();
        let mut base = Base::default();
        for (p, b) in files {
            let e = entry(p, b);
            cache.insert_bytes(&e.sha256, b).unwrap();
            let f = local_path(&root, p);
            place(&cache, &e, &f).unwrap();
            set(&mut base, &e, &f);
        }
        (dir, root, cache, base)
    }

    fn remote(cache: &Cache, path: &str, body: &[u8]) -> (String, Option<ManifestEntry>) {
        let e = entry(path, body);
        cache.insert_bytes(&e.sha256, body).unwrap();
        (path.to_owned(), Some(e))
    }

    #[test]
    fn every_rule_keeps_local_edits() {
        let (_d, root, cache, mut base) = setup(&[
            ("r/untouched.png", b"u0"),
            ("r/both.png", b"b0"),
            ("r/deleted_here.png", b"d0"),
            ("r/edited_here.png", b"e0"),
            ("r/gone_there.png", b"g0"),
        ]);
        std::fs::write(root.join("r/both.png"), b"b-local").unwrap();
        std::fs::remove_file(root.join("r/deleted_here.png")).unwrap();
        std::fs::write(root.join("r/edited_here.png"), b"e-local").unwrap();
        let changes = vec![
            remote(&cache, "r/untouched.png", b"u1"),
            remote(&cache, "r/both.png", b"b-hub"),
            remote(&cache, "r/deleted_here.png", b"d-hub"),
            ("r/edited_here.png".to_owned(), None),
            ("r/gone_there.png".to_owned(), None),
            remote(&cache, "new/n.png", b"n"),
        ];
        let merged = apply_all(&root, &cache, "pc1", &mut base, &changes).unwrap();
        let read = |p: &str| std::fs::read(root.join(p)).unwrap();
        assert_eq!(read("r/untouched.png"), b"u1");
        assert_eq!(read("r/both.png"), b"b-hub");
        assert_eq!(read("r/deleted_here.png"), b"d-hub");
        assert_eq!(read("r/edited_here.png"), b"e-local");
        assert!(!root.join("r/gone_there.png").exists());
        assert_eq!(read("new/n.png"), b"n");
        assert_eq!(merged.conflicts.len(), 1);
        let copy = &merged.conflicts[0];
        assert!(copy.starts_with("r/both.conflict-pc1-"), "{copy}");
        assert_eq!(read(copy), b"b-local");
        // The edit the hub deleted is not in the base: the next scan publishes it again.
        assert!(!base.files.contains_key("r/edited_here.png"));
        assert!(!base.files.contains_key(copy.as_str()));
        // Nothing half-written is left behind.
        let leftovers: Vec<_> = crate::apply::walk_files(&root)
            .into_iter()
            .filter(|p| p.ends_with(TEMP_SUFFIX))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Written files are unchanged for the next scan.
        for p in ["r/untouched.png", "r/both.png", "new/n.png"] {
            assert!(base.unchanged_locally(p, Stat::read(&root.join(p)), &root.join(p)));
        }
    }

    #[test]
    fn a_hub_deletion_removes_the_emptied_folder() {
        let (_d, root, cache, mut base) = setup(&[("a/b/c.png", b"c"), ("a/keep.png", b"k")]);
        apply_all(
            &root,
            &cache,
            "pc",
            &mut base,
            &[("a/b/c.png".into(), None)],
        )
        .unwrap();
        assert!(!root.join("a/b").exists());
        assert!(root.join("a/keep.png").exists());
    }
}
