//! Applying a downloaded version so that readers never see a mix and a kill -9 at any instant
//! leaves the old tree or the new one.
//!
//! Layout of a space folder `DIR`:
//! ```text
//! DIR/current                          link to the live tree (Unix: symlink; Windows: junction)
//! DIR/.synchub/live                    the live tree's name, one line: the truth
//! DIR/.synchub/trees/<name>/           a complete tree (read-only files, hard links into the cache)
//! DIR/.synchub/trees/<name>.manifest   the canonical manifest of that tree
//! DIR/.synchub/cache/ab/<sha256>       verified blobs
//! DIR/.synchub/kept/<timestamp>/...    extra files kept with extra_files = "keep"
//! ```
//! A new tree is built completely beside the old one and fsync'd; then `live` is replaced
//! atomically (temp file + rename: the commit point), then `current` is pointed at the tree.
//! On Unix that is one `rename` of a new symlink over the old one. Windows needs a privilege
//! for symlinks and cannot rename over a directory link, so there `current` is a directory
//! junction (no privilege needed): a new junction is made under a temp name, the old one is
//! moved aside, the new one moved in, the old one removed. A reader that resolves `live` (or
//! `current`) once and reads below the tree it names sees one complete version, whatever the
//! agent does meanwhile. On start whatever `live` names is the truth (`current` is repaired to
//! match, for a crash between the two steps).
//!
//! Last-good trees: after a switch the previous `keep_trees` complete trees stay beside the
//! live one, so a program that resolved `current` (or cd'd into it) before the switch keeps
//! reading a whole tree; older ones, and unfinished ones, are deleted. A tree is complete when
//! its manifest file is there (written last by `prepare`, removed first by `cleanup`). One a
//! reader still holds open on Windows cannot be deleted yet: a later cleanup does it.

use crate::cache::{Cache, remove_file_forced};
use crate::config::ExtraFiles;
use crate::error::{ClientError, IoContext, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use synchub_protocol::{Manifest, Sha256Hex, check_collisions, validate_path};

/// Where things live in a space folder.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }
    /// The link programs read through.
    pub(crate) fn current(&self) -> PathBuf {
        self.root.join("current")
    }
    pub(crate) fn meta(&self) -> PathBuf {
        self.root.join(".synchub")
    }
    pub(crate) fn trees(&self) -> PathBuf {
        self.meta().join("trees")
    }
    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.meta().join("cache")
    }
    pub(crate) fn kept(&self) -> PathBuf {
        self.meta().join("kept")
    }
    pub(crate) fn state_file(&self) -> PathBuf {
        self.meta().join("state.json")
    }
    /// The file naming the live tree.
    pub(crate) fn live_file(&self) -> PathBuf {
        self.meta().join("live")
    }
    /// Locked by the running agent's worker and by `restore`: one of them at a time.
    pub(crate) fn lock_file(&self) -> PathBuf {
        self.meta().join("agent.lock")
    }
    /// Present while a restored version is held on purpose (see `restore.rs`).
    pub(crate) fn restored_file(&self) -> PathBuf {
        self.meta().join("restored")
    }
    fn manifest_file(&self, tree: &str) -> PathBuf {
        self.trees().join(format!("{tree}.manifest"))
    }
}

/// The version a space folder holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub version: u64,
    pub data_hash: Sha256Hex,
    /// Folder name under `trees/`.
    pub tree: String,
    pub manifest: Manifest,
}

impl Held {
    pub(crate) fn tree_path(&self, layout: &Layout) -> PathBuf {
        layout.trees().join(&self.tree)
    }
}

/// `<version>-<first 8 hex of data_hash>`.
pub(crate) fn tree_name(version: u64, data_hash: &Sha256Hex) -> String {
    format!("{version}-{}", &data_hash.as_str()[..8])
}

/// Reads which tree is live, loads its manifest, points `current` at it when a crash left it
/// elsewhere and deletes every other tree but the newest `previous` complete ones, and
/// leftover temp links. `None` when nothing was ever applied.
pub(crate) fn recover(layout: &Layout, previous: usize) -> Result<Option<Held>> {
    std::fs::create_dir_all(layout.trees())
        .ctx(|| format!("creating {}", layout.trees().display()))?;
    let held = read_live(layout)?;
    if let Some(h) = held.as_ref().filter(|h| !link_points_at(layout, &h.tree)) {
        tracing::info!(tree = h.tree, "pointing current at the live tree again");
        point_current(layout, &h.tree)?;
    }
    cleanup(layout, held.as_ref().map(|h| h.tree.as_str()), previous);
    // state.json is written only by the running agent, so its temp files are stale here.
    if let Ok(rd) = std::fs::read_dir(layout.meta()) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("state.json.tmp-")
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(held)
}

/// The live tree without changing anything: the name in `live`, or for a folder written by an
/// older agent, the tree `current` links to.
pub(crate) fn read_live(layout: &Layout) -> Result<Option<Held>> {
    let link = layout.current();
    match std::fs::symlink_metadata(&link) {
        Ok(m) if !is_link(&link, &m) => {
            return Err(ClientError::Config(format!(
                "{} exists and is not a link the agent made; move it away so the agent can manage it",
                link.display()
            )));
        }
        _ => {}
    }
    let tree = match std::fs::read_to_string(layout.live_file()) {
        Ok(s) => s.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::read_link(&link) {
            Ok(t) => t
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
                .unwrap_or_default(),
            Err(_) => return Ok(None),
        },
        Err(e) => {
            return Err(ClientError::io(
                format!("reading {}", layout.live_file().display()),
                e,
            ));
        }
    };
    load_tree(layout, tree)
}

fn load_tree(layout: &Layout, tree: String) -> Result<Option<Held>> {
    let Some(version) = tree.split('-').next().and_then(|v| v.parse::<u64>().ok()) else {
        return Ok(None);
    };
    if tree.contains(['/', '\\']) || !layout.trees().join(&tree).is_dir() {
        tracing::warn!(tree, "the live tree is missing; starting empty");
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

/// Whether `current` resolves to the tree `tree`.
fn link_points_at(layout: &Layout, tree: &str) -> bool {
    match (
        std::fs::canonicalize(layout.current()),
        std::fs::canonicalize(layout.trees().join(tree)),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Deletes every tree (and its manifest) but `live` and the newest `previous` complete trees
/// besides it (newest by the time their manifest was written), unfinished trees, and stale
/// temp links (links first, so none is left pointing into a removed tree). A tree's manifest
/// goes before its folder, so a folder a reader holds open on Windows is left without one:
/// never taken for a last-good tree, and removed by a later cleanup.
pub(crate) fn cleanup(layout: &Layout, live: Option<&str>, previous: usize) {
    if let Ok(rd) = std::fs::read_dir(layout.meta()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = ["current.tmp-", "current.old-", "live.tmp-"];
            if stale.iter().any(|p| name.starts_with(p)) {
                let _ = remove_link(&e.path());
            }
        }
    }
    let mut names: Vec<String> = match std::fs::read_dir(layout.trees()) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .map(|n| n.strip_suffix(".manifest").map(str::to_owned).unwrap_or(n))
            .filter(|n| Some(n.as_str()) != live)
            .collect(),
        Err(_) => return,
    };
    names.sort();
    names.dedup();
    let mut complete: Vec<(std::time::SystemTime, String)> = names
        .iter()
        .filter(|n| layout.trees().join(n).is_dir())
        .filter_map(|n| {
            let written = std::fs::metadata(layout.manifest_file(n))
                .and_then(|m| m.modified())
                .ok()?;
            Some((written, n.clone()))
        })
        .collect();
    complete.sort_by(|a, b| b.cmp(a));
    let kept: HashSet<&str> = complete
        .iter()
        .take(previous)
        .map(|(_, n)| n.as_str())
        .collect();
    for name in names.iter().filter(|n| !kept.contains(n.as_str())) {
        let manifest = layout.manifest_file(name);
        match remove_file_forced(&manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %manifest.display(), error = %err, "could not remove an old tree's manifest");
                continue;
            }
        }
        let path = layout.trees().join(name);
        if let Err(err) = remove_tree(&path) {
            tracing::warn!(path = %path.display(), error = %err,
                "could not remove an old tree (still open?); a later cleanup will");
        }
    }
}

/// The complete trees besides `live` (last-good trees), each with its manifest.
pub(crate) fn last_good(layout: &Layout, live: Option<&str>) -> Vec<Held> {
    let Ok(rd) = std::fs::read_dir(layout.trees()) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| Some(n.as_str()) != live && layout.manifest_file(n).is_file())
        .filter_map(|n| load_tree(layout, n).ok().flatten())
        .collect()
}

/// Removes a tree whose files may be read-only.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
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
pub(crate) struct Prepared {
    pub held: Held,
}

/// Builds the tree of `manifest` from the cache under `trees/`, fsyncs it and writes its
/// manifest beside it. Every blob must be in the cache. `current` is not touched.
pub(crate) fn prepare(
    layout: &Layout,
    cache: &Cache,
    manifest: &Manifest,
    version: u64,
    current: Option<&Held>,
) -> Result<Prepared> {
    // Two spellings of one file (case, Unicode normalization) land on one file on Windows and
    // macOS; the hub refuses such versions, an older hub may not have.
    check_collisions(manifest.entries().iter().map(|e| e.path.as_str()))
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
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
        match std::fs::hard_link(&src, &dest) {
            Ok(()) => {}
            // Never write through what is there: it may be a read-only link into the cache.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ClientError::io(
                    format!("{} already exists in the new tree", dest.display()),
                    e,
                ));
            }
            // No hard links here (another volume, FAT): a copy, written new and renamed in.
            Err(_) => copy_new(&src, &dest)?,
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
    write_atomic(&mf, &canonical)?;
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
pub(crate) fn keep_extra_files(layout: &Layout, held: &Held, mode: ExtraFiles) -> Result<usize> {
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

/// Makes the prepared tree the live one: `live` is replaced atomically (from here on a crash
/// comes back to the new tree), then `current` is pointed at it.
pub(crate) fn switch(layout: &Layout, prepared: &Prepared) -> Result<()> {
    let tree = &prepared.held.tree;
    write_atomic(&layout.live_file(), format!("{tree}\n").as_bytes())?;
    point_current(layout, tree)?;
    sync_dir(layout.root())?;
    Ok(())
}

/// A fresh temp name in `.synchub/` for a link being made or retired.
fn temp_link(layout: &Layout, kind: &str) -> PathBuf {
    layout
        .meta()
        .join(format!("current.{kind}-{}", uuid::Uuid::new_v4().simple()))
}

/// Points `current` at `tree`: a new symlink under a temp name, renamed over `current`
/// (atomic).
#[cfg(not(windows))]
fn point_current(layout: &Layout, tree: &str) -> Result<()> {
    let target = Path::new(".synchub").join("trees").join(tree);
    let tmp = temp_link(layout, "tmp");
    std::os::unix::fs::symlink(&target, &tmp).ctx(|| format!("creating link {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, layout.current()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ClientError::io(
            format!("switching {}", layout.current().display()),
            e,
        ));
    }
    Ok(())
}

/// Points `current` at `tree` with a directory junction (no privilege needed, unlike a
/// symlink). Windows cannot rename over a directory, so the old junction is moved aside first;
/// for that instant `current` is absent, which `live` covers: it already names the new tree,
/// and a restart repairs `current` from it.
#[cfg(windows)]
fn point_current(layout: &Layout, tree: &str) -> Result<()> {
    let target = std::path::absolute(layout.trees().join(tree))
        .ctx(|| format!("resolving {}", layout.trees().display()))?;
    let tmp = temp_link(layout, "tmp");
    let current = layout.current();
    if let Err(e) = junction::create(&target, &tmp) {
        // Some file systems have no junctions (FAT, some network shares, Wine). `live` still
        // names the tree; never leave `current` showing an older one.
        let _ = std::fs::remove_dir(&tmp);
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(error = %e, "no directory junctions here: `current` is not kept; \
                programs must read the tree named in .synchub\\live");
        });
        return match std::fs::symlink_metadata(&current) {
            Ok(_) => remove_link(&current).ctx(|| format!("removing {}", current.display())),
            Err(_) => Ok(()),
        };
    }
    let old = temp_link(layout, "old");
    match std::fs::symlink_metadata(&current) {
        Ok(_) => {
            if let Err(e) = rename_retrying(&current, &old) {
                let _ = remove_link(&tmp);
                return Err(ClientError::io(
                    format!("moving {} aside", current.display()),
                    e,
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ClientError::io(current.display().to_string(), e)),
    }
    rename_retrying(&tmp, &current).ctx(|| format!("switching {}", current.display()))?;
    let _ = remove_link(&old);
    Ok(())
}

/// Whether `path` (with metadata `m`, not followed) is a link the agent made.
fn is_link(path: &Path, m: &std::fs::Metadata) -> bool {
    #[cfg(windows)]
    if junction::exists(path).unwrap_or(false) {
        return true;
    }
    let _ = path;
    m.file_type().is_symlink()
}

/// Removes a link (a directory junction on Windows, which only `remove_dir` removes), or a
/// stale temp file, never what a link points to.
fn remove_link(path: &Path) -> std::io::Result<()> {
    #[cfg(windows)]
    {
        use std::os::windows::fs::MetadataExt;
        const FILE_ATTRIBUTE_DIRECTORY: u32 = 0x10;
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.file_attributes() & FILE_ATTRIBUTE_DIRECTORY != 0)
        {
            return std::fs::remove_dir(path);
        }
    }
    std::fs::remove_file(path)
}

/// Flushes the file at `path` to disk. Windows flushes only through a handle with write
/// access (a read-only handle gets "Access denied"), so there a read-only file (a copy of a
/// cache blob) is made writable for the flush and read-only again after it.
pub(crate) fn sync_file(path: &Path) -> std::io::Result<()> {
    #[cfg(windows)]
    {
        let perms = std::fs::metadata(path)?.permissions();
        if !perms.readonly() {
            return std::fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .sync_all();
        }
        let mut writable = perms.clone();
        #[allow(clippy::permissions_set_readonly_false)]
        writable.set_readonly(false);
        std::fs::set_permissions(path, writable)?;
        let synced = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.sync_all());
        std::fs::set_permissions(path, perms)?;
        synced
    }
    #[cfg(not(windows))]
    {
        std::fs::File::open(path)?.sync_all()
    }
}

/// Copies `src` to `dest`, which must not exist: to a temp file beside it, fsync'd, then
/// renamed in, so nothing half-written is ever visible and no existing file is written through.
fn copy_new(src: &Path, dest: &Path) -> Result<()> {
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("f");
    let tmp = dest.with_file_name(format!(".{name}.synchub-{}", uuid::Uuid::new_v4().simple()));
    let copied = std::fs::copy(src, &tmp).and_then(|_| sync_file(&tmp));
    if let Err(e) = copied {
        let _ = remove_file_forced(&tmp);
        return Err(ClientError::io(
            format!("copying {} to {}", src.display(), tmp.display()),
            e,
        ));
    }
    if std::fs::symlink_metadata(dest).is_ok() {
        let _ = remove_file_forced(&tmp);
        return Err(ClientError::io(
            format!("{} already exists in the new tree", dest.display()),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    rename_retrying(&tmp, dest).ctx(|| format!("renaming into {}", dest.display()))
}

/// Writes a file atomically: a temp file with a unique name beside it, fsync'd, then renamed
/// over the target (retried while Windows reports the target open by a reader). For
/// `live`, `state.json` and friends.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!("{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(ClientError::io(tmp.display().to_string(), e));
    }
    if let Err(e) = rename_retrying(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ClientError::io(path.display().to_string(), e));
    }
    Ok(())
}

/// `rename`, retried for up to ~2 s while Windows refuses it because a reader has the target
/// open without delete sharing (Python's `open` does) or a scanner briefly holds it. On Unix
/// the first answer stands.
pub(crate) fn rename_retrying(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut wait = std::time::Duration::from_millis(5);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match std::fs::rename(from, to) {
            Err(e) if is_sharing_violation(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// ERROR_ACCESS_DENIED (5), ERROR_SHARING_VIOLATION (32), ERROR_LOCK_VIOLATION (33): what
/// Windows answers while another process holds the file.
fn is_sharing_violation(e: &std::io::Error) -> bool {
    cfg!(windows) && matches!(e.raw_os_error(), Some(5 | 32 | 33))
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
        assert_eq!(recover(&layout, 0).unwrap(), None);
        let p1 = prepare(&layout, &cache, &m1, 1, None).unwrap();
        switch(&layout, &p1).unwrap();
        assert_eq!(
            std::fs::read(layout.current().join("a/x.txt")).unwrap(),
            b"one"
        );
        let held = recover(&layout, 0).unwrap().unwrap();
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
        let held2 = recover(&layout, 0).unwrap().unwrap();
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
        let held = recover(&layout, 0).unwrap().unwrap();
        let p2 = prepare(&layout, &cache, &m1, 1, Some(&held)).unwrap();
        assert_ne!(p2.held.tree, held.tree);
        switch(&layout, &p2).unwrap();
        let again = recover(&layout, 0).unwrap().unwrap();
        assert_eq!(again.tree, p2.held.tree);
        assert_eq!(again.version, 1);
    }

    #[test]
    fn crash_between_live_and_link_comes_back_to_the_new_tree() {
        let (_d, layout, cache, m1) = setup(&[("f", b"one")]);
        let p1 = prepare(&layout, &cache, &m1, 1, None).unwrap();
        switch(&layout, &p1).unwrap();
        let held = recover(&layout, 0).unwrap().unwrap();
        let m2 = Manifest::new(vec![ManifestEntry {
            path: "g".into(),
            size: 3,
            sha256: m1.entries()[0].sha256.clone(),
        }])
        .unwrap();
        let p2 = prepare(&layout, &cache, &m2, 2, Some(&held)).unwrap();
        // Killed right after the commit point: `live` names the new tree, `current` the old.
        write_atomic(&layout.live_file(), p2.held.tree.as_bytes()).unwrap();
        assert!(layout.current().join("f").exists());
        let back = recover(&layout, 0).unwrap().unwrap();
        assert_eq!(back.version, 2);
        assert_eq!(std::fs::read(layout.current().join("g")).unwrap(), b"one");
        assert!(!layout.current().join("f").exists());
        assert!(!held.tree_path(&layout).exists(), "old tree removed");
    }

    #[test]
    fn a_hundred_applies_leave_one_tree_and_no_temp_files() {
        let (_d, layout, cache, m) = setup(&[("a/x", b"1"), ("b", b"2")]);
        let mut held = None;
        for v in 1..=100 {
            let p = prepare(&layout, &cache, &m, v, held.as_ref()).unwrap();
            switch(&layout, &p).unwrap();
            cleanup(&layout, Some(&p.held.tree), 0);
            held = Some(p.held);
        }
        let held = held.unwrap();
        assert_eq!(recover(&layout, 0).unwrap().unwrap().version, 100);
        assert_eq!(std::fs::read(layout.current().join("a/x")).unwrap(), b"1");
        let trees: Vec<_> = std::fs::read_dir(layout.trees())
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(trees.len(), 2, "the tree and its manifest");
        let meta: Vec<String> = std::fs::read_dir(layout.meta())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp") || n.contains("old"))
            .collect();
        assert!(meta.is_empty(), "{meta:?}");
        assert_eq!(
            std::fs::read_to_string(layout.live_file()).unwrap().trim(),
            held.tree
        );
    }

    #[test]
    fn the_previous_trees_are_kept_and_older_ones_removed() {
        let (_d, layout, cache, m) = setup(&[("a/x", b"1"), ("b", b"2")]);
        let mut trees = Vec::new();
        let mut held: Option<Held> = None;
        for v in 1..=4 {
            let p = prepare(&layout, &cache, &m, v, held.as_ref()).unwrap();
            switch(&layout, &p).unwrap();
            cleanup(&layout, Some(&p.held.tree), 2);
            trees.push(p.held.tree.clone());
            held = Some(p.held);
            // Manifests written within one clock tick would tie.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut kept: Vec<u64> = last_good(&layout, Some(&trees[3]))
            .iter()
            .map(|h| h.version)
            .collect();
        kept.sort();
        assert_eq!(kept, [2, 3]);
        assert!(!layout.trees().join(&trees[0]).exists(), "the oldest went");
        // A tree that lost its manifest (a removal cut short) is unfinished: never kept.
        std::fs::remove_file(layout.trees().join(format!("{}.manifest", trees[1]))).unwrap();
        assert_eq!(recover(&layout, 2).unwrap().unwrap().version, 4);
        assert!(!layout.trees().join(&trees[1]).exists());
        assert!(layout.trees().join(&trees[2]).join("a/x").is_file());
        // Zero keeps only the live tree.
        cleanup(&layout, Some(&trees[3]), 0);
        assert!(last_good(&layout, Some(&trees[3])).is_empty());
    }

    #[test]
    fn folder_of_an_older_agent_is_taken_over_from_its_link() {
        let (_d, layout, cache, m1) = setup(&[("f", b"one")]);
        let p1 = prepare(&layout, &cache, &m1, 7, None).unwrap();
        switch(&layout, &p1).unwrap();
        // Older agents kept no `live` file: `current` alone said which tree was live.
        std::fs::remove_file(layout.live_file()).unwrap();
        let held = recover(&layout, 0).unwrap().unwrap();
        assert_eq!(held.version, 7);
        assert!(held.tree_path(&layout).exists());
    }

    #[test]
    fn colliding_spellings_are_refused_and_the_cache_is_untouched() {
        let nfc = "Brașov/Școala.json";
        let nfd = "Brașov/S\u{326}coala.json";
        let (_d, layout, cache, m) = setup(&[
            ("img/A.png", b"upper"),
            ("img/a.png", b"lower"),
            (nfc, b"1"),
        ]);
        let err = prepare(&layout, &cache, &m, 2, None).unwrap_err();
        assert!(err.to_string().contains("img/A.png"), "{err}");
        let m2 = Manifest::new(vec![
            m.get(nfc).unwrap().clone(),
            ManifestEntry {
                path: nfd.into(),
                ..m.get("img/a.png").unwrap().clone()
            },
        ])
        .unwrap();
        assert!(prepare(&layout, &cache, &m2, 3, None).is_err());
        for e in m.entries() {
            assert_eq!(
                cache.check(&e.sha256, e.size, true).unwrap(),
                crate::cache::Cached::Intact,
                "{} intact",
                e.path
            );
        }
        assert!(!layout.current().exists());
    }

    #[test]
    fn copy_fallback_never_writes_through_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("blob");
        std::fs::write(&src, b"new bytes").unwrap();
        // What a colliding name would meet: a read-only hard link to another cache entry.
        let entry = dir.path().join("entry");
        std::fs::write(&entry, b"cache entry").unwrap();
        let dest = dir.path().join("tree-file");
        std::fs::hard_link(&entry, &dest).unwrap();
        let mut perms = std::fs::metadata(&dest).unwrap().permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&dest, perms).unwrap();
        assert!(copy_new(&src, &dest).is_err());
        assert_eq!(std::fs::read(&entry).unwrap(), b"cache entry");
        let fresh = dir.path().join("fresh");
        copy_new(&src, &fresh).unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"new bytes");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            4,
            "no temp file left"
        );
    }

    #[test]
    fn concurrent_atomic_writes_all_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let body = format!("{{\"writer\":{w},\"n\":{i}}}").repeat(50);
                        write_atomic(&path, body.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let body = std::fs::read_to_string(&path).unwrap();
        assert!(body.ends_with("\"n\":49}"), "{body}");
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, 1, "no temp files left");
    }

    #[test]
    fn current_that_is_a_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.current()).unwrap();
        assert!(matches!(recover(&layout, 0), Err(ClientError::Config(_))));
    }
}
