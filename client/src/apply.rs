//! Applying a downloaded version so that readers never see a mix and a kill -9 at any instant
//! leaves the old tree or the new one.
//!
//! Layout of a space folder `DIR`:
//! ```text
//! DIR/current                          symlink -> .synchub/trees/<version>-<hash8>
//! DIR/.synchub/trees/<name>/           a complete tree (read-only files, hard links into the cache)
//! DIR/.synchub/trees/<name>.manifest   the canonical manifest of that tree
//! DIR/.synchub/cache/ab/<sha256>       verified blobs
//! DIR/.synchub/kept/<timestamp>/...    extra files kept with extra_files = "keep"
//! ```
//! A new tree is built completely beside the old one, fsync'd, then `current` is replaced in
//! one `rename` of a new symlink over it. On start whatever `current` names is the truth; any
//! other tree (unfinished or old) is deleted.

use crate::cache::{Cache, remove_file_forced};
use crate::config::ExtraFiles;
use crate::error::{ClientError, IoContext, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use synchub_protocol::{Manifest, Sha256Hex, validate_path};

/// Where things live in a space folder.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The link programs read through.
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }
    pub fn meta(&self) -> PathBuf {
        self.root.join(".synchub")
    }
    pub fn trees(&self) -> PathBuf {
        self.meta().join("trees")
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.meta().join("cache")
    }
    pub fn outbox(&self) -> PathBuf {
        self.meta().join("outbox")
    }
    pub fn kept(&self) -> PathBuf {
        self.meta().join("kept")
    }
    pub fn state_file(&self) -> PathBuf {
        self.meta().join("state.json")
    }
    fn manifest_file(&self, tree: &str) -> PathBuf {
        self.trees().join(format!("{tree}.manifest"))
    }
}

/// The version a space folder holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub version: u64,
    pub data_hash: Sha256Hex,
    /// Folder name under `trees/`.
    pub tree: String,
    pub manifest: Manifest,
}

impl Held {
    pub fn tree_path(&self, layout: &Layout) -> PathBuf {
        layout.trees().join(&self.tree)
    }
}

/// `<version>-<first 8 hex of data_hash>`.
pub fn tree_name(version: u64, data_hash: &Sha256Hex) -> String {
    format!("{version}-{}", &data_hash.as_str()[..8])
}

/// Reads what `current` points to, loads its manifest and deletes every other tree and
/// leftover temp link. `None` when nothing was ever applied.
pub fn recover(layout: &Layout) -> Result<Option<Held>> {
    std::fs::create_dir_all(layout.trees())
        .ctx(|| format!("creating {}", layout.trees().display()))?;
    let held = read_current(layout)?;
    cleanup(layout, held.as_ref().map(|h| h.tree.as_str()));
    Ok(held)
}

fn read_current(layout: &Layout) -> Result<Option<Held>> {
    let link = layout.current();
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(ClientError::Config(format!(
                "{} exists and is not a symlink; move it away so the agent can manage it",
                link.display()
            )));
        }
        Err(e) => return Err(ClientError::io(format!("reading {}", link.display()), e)),
    };
    let Some(tree) = target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let Some(version) = tree.split('-').next().and_then(|v| v.parse::<u64>().ok()) else {
        return Ok(None);
    };
    if !layout.trees().join(&tree).is_dir() {
        tracing::warn!(tree, "current points to a missing tree; starting empty");
        return Ok(None);
    }
    let bytes = match std::fs::read(layout.manifest_file(&tree)) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(tree, error = %e, "manifest of the current tree is missing");
            return Ok(None);
        }
    };
    let data_hash = Sha256Hex::of(&bytes);
    let manifest = Manifest::from_canonical(&bytes, crate::download::MAX_MANIFEST_ENTRIES)?;
    Ok(Some(Held {
        version,
        data_hash,
        tree,
        manifest,
    }))
}

/// Deletes every tree (and its manifest) but `keep`, and stale temp links.
pub fn cleanup(layout: &Layout, keep: Option<&str>) {
    if let Ok(rd) = std::fs::read_dir(layout.trees()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = name.strip_suffix(".manifest").unwrap_or(&name);
            if Some(base) == keep {
                continue;
            }
            let path = e.path();
            let res = if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&path)
            } else {
                remove_file_forced(&path)
            };
            if let Err(err) = res {
                tracing::warn!(path = %path.display(), error = %err, "could not remove old tree");
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(layout.meta()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("current.tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes a tree whose files may be read-only.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            // Read-only folders (someone chmod'ed them) block removal: open them up and retry.
            for f in walk_files(path) {
                let _ = remove_file_forced(&path.join(&f));
            }
            std::fs::remove_dir_all(path)
        }
    }
}

/// Relative `/`-separated paths of regular files under `root` (symlinks are not followed).
pub fn walk_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel_path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push((e.path(), rel_path)),
                Ok(t) if t.is_file() => out.push(rel_path),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// A tree built and synced, ready to be switched to.
#[derive(Debug)]
pub struct Prepared {
    pub held: Held,
}

/// Builds the tree of `manifest` from the cache under `trees/`, fsyncs it and writes its
/// manifest beside it. Every blob must be in the cache. `current` is not touched.
pub fn prepare(
    layout: &Layout,
    cache: &Cache,
    manifest: &Manifest,
    version: u64,
    current: Option<&Held>,
) -> Result<Prepared> {
    let canonical = manifest.canonical_bytes();
    let data_hash = Sha256Hex::of(&canonical);
    let mut tree = tree_name(version, &data_hash);
    if current.is_some_and(|h| h.tree == tree) {
        // Re-applying the held version (a repair): build beside it, never over it.
        tree = format!("{tree}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    }
    let dir = layout.trees().join(&tree);
    remove_tree(&dir).ctx(|| format!("removing {}", dir.display()))?;
    let _ = remove_file_forced(&layout.manifest_file(&tree));
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;

    let mut dirs: HashSet<PathBuf> = HashSet::new();
    dirs.insert(dir.clone());
    for entry in manifest.entries() {
        // The manifest was validated when parsed; check again right before touching disk.
        validate_path(&entry.path)?;
        let dest = dir.join(&entry.path);
        if !dest.starts_with(&dir) {
            return Err(ClientError::Protocol(format!(
                "path {:?} escapes the tree",
                entry.path
            )));
        }
        let parent = dest
            .parent()
            .expect("joined path has a parent")
            .to_path_buf();
        if dirs.insert(parent.clone()) {
            std::fs::create_dir_all(&parent).ctx(|| format!("creating {}", parent.display()))?;
            let mut p = parent.parent();
            while let Some(q) = p {
                if !q.starts_with(&dir) || !dirs.insert(q.to_path_buf()) {
                    break;
                }
                p = q.parent();
            }
        }
        let src = cache.path(&entry.sha256);
        if std::fs::hard_link(&src, &dest).is_err() {
            std::fs::copy(&src, &dest)
                .ctx(|| format!("copying {} to {}", src.display(), dest.display()))?;
            std::fs::File::open(&dest)
                .and_then(|f| f.sync_all())
                .ctx(|| format!("syncing {}", dest.display()))?;
        }
        let mut perms = std::fs::metadata(&dest)
            .ctx(|| dest.display().to_string())?
            .permissions();
        if !perms.readonly() {
            // Read-only discourages edits in place, which would also change the cache entry.
            perms.set_readonly(true);
            std::fs::set_permissions(&dest, perms).ctx(|| dest.display().to_string())?;
        }
    }
    for d in &dirs {
        sync_dir(d)?;
    }
    let mf = layout.manifest_file(&tree);
    write_synced(&mf, &canonical)?;
    sync_dir(&layout.trees())?;
    Ok(Prepared {
        held: Held {
            version,
            data_hash,
            tree,
            manifest: manifest.clone(),
        },
    })
}

/// Copies files of the held tree that its manifest does not list into `kept/<timestamp>/`.
/// Returns how many were kept.
pub fn keep_extra_files(layout: &Layout, held: &Held, mode: ExtraFiles) -> Result<usize> {
    if mode != ExtraFiles::Keep {
        return Ok(0);
    }
    let tree = held.tree_path(layout);
    let extras: Vec<String> = walk_files(&tree)
        .into_iter()
        .filter(|p| held.manifest.get(p).is_none())
        .collect();
    if extras.is_empty() {
        return Ok(0);
    }
    let stamp = chrono::Utc::now()
        .format("%Y-%m-%dT%H-%M-%S%.3fZ")
        .to_string();
    let dest_root = layout.kept().join(stamp);
    for rel in &extras {
        let dest = dest_root.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).ctx(|| parent.display().to_string())?;
        }
        std::fs::copy(tree.join(rel), &dest).ctx(|| format!("keeping {rel}"))?;
    }
    tracing::info!(count = extras.len(), dest = %dest_root.display(), "kept extra files");
    Ok(extras.len())
}

/// Points `current` at the prepared tree: a new symlink under a temp name, renamed over
/// `current` (atomic), then the folder is fsync'd.
pub fn switch(layout: &Layout, prepared: &Prepared) -> Result<()> {
    let target = Path::new(".synchub")
        .join("trees")
        .join(&prepared.held.tree);
    let tmp = layout
        .meta()
        .join(format!("current.tmp-{}", uuid::Uuid::new_v4().simple()));
    symlink_dir(&target, &tmp).ctx(|| format!("creating link {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, layout.current()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ClientError::io(
            format!("switching {}", layout.current().display()),
            e,
        ));
    }
    sync_dir(layout.root())?;
    Ok(())
}

#[cfg(unix)]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_dir(target, link)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).ctx(|| tmp.display().to_string())?;
    f.write_all(bytes).ctx(|| tmp.display().to_string())?;
    f.sync_all().ctx(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, path).ctx(|| path.display().to_string())
}

/// Writes a file atomically (temp + fsync + rename), for state.json and friends.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_synced(path, bytes)
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .ctx(|| format!("syncing {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchub_protocol::ManifestEntry;

    fn setup(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Layout, Cache, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.trees()).unwrap();
        let cache = Cache::open(layout.cache_dir()).unwrap();
        let mut entries = Vec::new();
        for (p, body) in files {
            let sha = Sha256Hex::of(body);
            let t = cache.temp_path();
            std::fs::write(&t, body).unwrap();
            cache.insert(&t, &sha).unwrap();
            entries.push(ManifestEntry {
                path: (*p).into(),
                size: body.len() as u64,
                sha256: sha,
            });
        }
        (dir, layout, cache, Manifest::new(entries).unwrap())
    }

    #[test]
    fn build_switch_recover_and_cleanup() {
        let (_d, layout, cache, m1) = setup(&[("a/x.txt", b"one"), ("b.txt", b"two")]);
        assert_eq!(recover(&layout).unwrap(), None);
        let p1 = prepare(&layout, &cache, &m1, 1, None).unwrap();
        switch(&layout, &p1).unwrap();
        assert_eq!(
            std::fs::read(layout.current().join("a/x.txt")).unwrap(),
            b"one"
        );
        let held = recover(&layout).unwrap().unwrap();
        assert_eq!(held.version, 1);
        assert_eq!(held.data_hash, m1.data_hash());

        // A user drops an extra file into the tree; keep mode saves it.
        let tree = held.tree_path(&layout);
        std::fs::write(tree.join("extra.txt"), b"mine").unwrap();
        assert_eq!(
            keep_extra_files(&layout, &held, ExtraFiles::Keep).unwrap(),
            1
        );
        assert_eq!(
            keep_extra_files(&layout, &held, ExtraFiles::Remove).unwrap(),
            0
        );

        // An unfinished tree from a crash is removed on recovery.
        std::fs::create_dir_all(layout.trees().join("9-deadbeef/x")).unwrap();
        let p2 = prepare(
            &layout,
            &cache,
            &Manifest::new(vec![m1.entries()[1].clone()]).unwrap(),
            2,
            Some(&held),
        )
        .unwrap();
        switch(&layout, &p2).unwrap();
        let held2 = recover(&layout).unwrap().unwrap();
        assert_eq!(held2.version, 2);
        assert!(!layout.current().join("a/x.txt").exists());
        assert!(!layout.current().join("extra.txt").exists());
        let left: Vec<_> = std::fs::read_dir(layout.trees())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}"); // the tree and its manifest
        let kept = walk_files(&layout.kept());
        assert_eq!(kept.len(), 1);
        assert!(kept[0].ends_with("/extra.txt"));
    }

    #[test]
    fn reapplying_the_held_version_builds_a_fresh_tree() {
        let (_d, layout, cache, m1) = setup(&[("f", b"x")]);
        let p1 = prepare(&layout, &cache, &m1, 1, None).unwrap();
        switch(&layout, &p1).unwrap();
        let held = recover(&layout).unwrap().unwrap();
        let p2 = prepare(&layout, &cache, &m1, 1, Some(&held)).unwrap();
        assert_ne!(p2.held.tree, held.tree);
        switch(&layout, &p2).unwrap();
        let again = recover(&layout).unwrap().unwrap();
        assert_eq!(again.tree, p2.held.tree);
        assert_eq!(again.version, 1);
    }

    #[test]
    fn current_that_is_a_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.current()).unwrap();
        assert!(matches!(recover(&layout), Err(ClientError::Config(_))));
    }
}
