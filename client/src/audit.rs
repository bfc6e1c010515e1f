//! The tree audit behind `synchub-agent verify`: checks the tree `DIR/current` against the
//! manifest of the version it holds (the copy kept beside the tree), per top folder: files and
//! MB, and the paths that are missing, extra or corrupted. (The QR app's own sync ran such a
//! check every 30 minutes; here it is on demand.) It reads only: a running agent may be
//! building the next tree meanwhile.

use crate::apply::{Layout, walk_files};
use crate::blob_check::{OnDisk, check_file};
use crate::error::{ClientError, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// One top folder of an audited tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FolderStats {
    /// Files found (listed or not).
    pub files: u64,
    pub bytes: u64,
    /// Files the manifest lists for this folder.
    pub expected_files: u64,
    pub expected_bytes: u64,
    /// Listed files that are not there.
    pub missing: u64,
    /// Files there that the manifest does not list.
    pub extra: u64,
    /// Listed files with other bytes.
    pub corrupted: u64,
}

/// What [`audit_tree`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TreeAudit {
    /// The version the folder holds.
    pub version: u64,
    /// Its data hash (manifest sha256).
    pub data_hash: String,
    /// Keyed by top folder; files at the top level are under `.`.
    pub folders: BTreeMap<String, FolderStats>,
    /// Paths, as in [`FolderStats`].
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub corrupted: Vec<String>,
}

impl TreeAudit {
    /// Nothing missing, extra or corrupted.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.corrupted.is_empty()
    }
}

fn top_folder(path: &str) -> String {
    match path.split_once('/') {
        Some((top, _)) => top.to_owned(),
        None => ".".to_owned(),
    }
}

/// Audits the space folder `dir`. `on_file` is called once per manifest entry checked
/// (for a progress bar) with the number done and the total.
pub fn audit_tree(dir: &Path, mut on_file: impl FnMut(u64, u64)) -> Result<TreeAudit> {
    let layout = Layout::new(dir);
    if !layout.meta().is_dir() {
        return Err(ClientError::Config(format!(
            "{} is not an agent folder (no .synchub/ inside)",
            dir.display()
        )));
    }
    // `apply::recover` also repairs `current` and deletes stray trees, which is only safe in
    // the agent itself: this reads the live tree's name and manifest without touching anything.
    let Some(held) = crate::apply::read_live(&layout)? else {
        return Err(ClientError::Config(format!(
            "{} holds no version yet",
            dir.display()
        )));
    };
    let root = layout.current();
    let mut report = TreeAudit {
        version: held.version,
        data_hash: held.data_hash.to_string(),
        ..Default::default()
    };
    let total = held.manifest.len() as u64;
    for (i, e) in held.manifest.entries().iter().enumerate() {
        let stats = report.folders.entry(top_folder(&e.path)).or_default();
        stats.expected_files += 1;
        stats.expected_bytes += e.size;
        // A file that cannot be read counts as missing.
        match check_file(&root.join(&e.path), &e.sha256, e.size).unwrap_or(OnDisk::Missing) {
            OnDisk::Intact => {
                stats.files += 1;
                stats.bytes += e.size;
            }
            OnDisk::Corrupted { size } => {
                stats.files += 1;
                stats.bytes += size;
                stats.corrupted += 1;
                report.corrupted.push(e.path.clone());
            }
            OnDisk::Missing => {
                stats.missing += 1;
                report.missing.push(e.path.clone());
            }
        }
        on_file(i as u64 + 1, total);
    }
    let listed: HashSet<&str> = held
        .manifest
        .entries()
        .iter()
        .map(|e| e.path.as_str())
        .collect();
    for rel in walk_files(&root) {
        if !listed.contains(rel.as_str()) {
            let stats = report.folders.entry(top_folder(&rel)).or_default();
            stats.extra += 1;
            stats.files += 1;
            stats.bytes += std::fs::metadata(root.join(&rel))
                .map(|m| m.len())
                .unwrap_or(0);
            report.extra.push(rel);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{prepare, switch};
    use crate::cache::Cache;
    use synchub_protocol::{Manifest, ManifestEntry, Sha256Hex};

    #[test]
    fn finds_missing_extra_and_corrupted() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.trees()).unwrap();
        let cache = Cache::open(layout.cache_dir()).unwrap();
        let mut entries = Vec::new();
        for (p, body) in [
            ("A/1.png", &b"one"[..]),
            ("A/2.png", b"two"),
            ("B/3.png", b"three"),
        ] {
            let sha = Sha256Hex::of(body);
            let t = cache.temp_path();
            std::fs::write(&t, body).unwrap();
            cache.insert(&t, &sha).unwrap();
            entries.push(ManifestEntry {
                path: p.into(),
                size: body.len() as u64,
                sha256: sha,
            });
        }
        let m = Manifest::new(entries).unwrap();
        let p = prepare(&layout, &cache, &m, 4, None).unwrap();
        switch(&layout, &p).unwrap();
        let clean = audit_tree(dir.path(), |_, _| {}).unwrap();
        assert!(clean.is_clean());
        assert_eq!(clean.folders["A"].files, 2);
        let tree = p.held.tree_path(&layout);
        crate::cache::remove_file_forced(&tree.join("A/1.png")).unwrap();
        crate::cache::remove_file_forced(&tree.join("B/3.png")).unwrap();
        std::fs::write(tree.join("B/3.png"), b"THREE").unwrap();
        std::fs::write(tree.join("B/extra.png"), b"x").unwrap();
        let r = audit_tree(dir.path(), |_, _| {}).unwrap();
        assert_eq!(r.missing, vec!["A/1.png"]);
        assert_eq!(r.corrupted, vec!["B/3.png"]);
        assert_eq!(r.extra, vec!["B/extra.png"]);
        assert_eq!(r.folders["B"].extra, 1);
        assert_eq!(r.version, 4);
    }
}
