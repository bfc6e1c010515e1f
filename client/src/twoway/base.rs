//! The common ancestor of the folder and the hub, per file: the content each path had when
//! this PC and the hub last agreed on it, and the local signature it had then. A local file
//! whose signature (or, failing that, hash) still matches its base entry is unchanged here;
//! a hub version whose entry differs from the base changed there. Both changed: a conflict.
//!
//! Kept in `DIR/.synchub/two-way.json`, rewritten atomically after every change, so a crash
//! at any point leaves an older base: files are then compared by hash, and nothing that
//! changed on either side is taken for unchanged.

use super::scan::Stat;
use crate::apply::write_atomic;
use crate::error::{ClientError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use synchub_protocol::{Manifest, ManifestEntry, Sha256Hex};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Base {
    /// The last hub version merged into the folder (0: none yet).
    pub(crate) version: u64,
    /// Its data hash, to tell a rewritten version with the same number.
    pub(crate) data_hash: Option<Sha256Hex>,
    pub(crate) files: BTreeMap<String, BaseFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BaseFile {
    pub(crate) sha256: Sha256Hex,
    pub(crate) size: u64,
    /// The file's signature when it was last known to hold this content.
    pub(crate) local: Option<Stat>,
}

impl Base {
    pub(crate) fn load(path: &Path) -> Result<Base> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Base::default()),
            Err(e) => Err(ClientError::io(format!("reading {}", path.display()), e)),
        }
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self)
            .map_err(|e| ClientError::Protocol(format!("encoding the base: {e}")))?;
        write_atomic(path, &json)
    }

    /// Whether the local file at `path` (signature `now`) holds the base content, by
    /// signature when it matches, else by hashing `file`.
    pub(crate) fn unchanged_locally(&self, rel: &str, now: Option<Stat>, file: &Path) -> bool {
        match (self.files.get(rel), now) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(b), Some(s)) => {
                b.local == Some(s)
                    || (b.size == s.size
                        && crate::blob_check::hash_file(file).is_ok_and(|(sha, _)| sha == b.sha256))
            }
        }
    }

    /// Paths where `remote` differs from the base, each with the remote entry (`None`: the
    /// hub deleted it).
    pub(crate) fn remote_changes<'a>(
        &self,
        remote: &'a Manifest,
    ) -> Vec<(String, Option<&'a ManifestEntry>)> {
        let mut out = Vec::new();
        for e in remote.entries() {
            match self.files.get(&e.path) {
                Some(b) if b.sha256 == e.sha256 && b.size == e.size => {}
                _ => out.push((e.path.clone(), Some(e))),
            }
        }
        for path in self.files.keys() {
            if remote.get(path).is_none() {
                out.push((path.clone(), None));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, body: &[u8]) -> ManifestEntry {
        ManifestEntry {
            path: path.to_owned(),
            size: body.len() as u64,
            sha256: Sha256Hex::of(body),
        }
    }

    #[test]
    fn remote_changes_are_what_differs_from_the_base() {
        let mut base = Base::default();
        for (p, b) in [("a", &b"1"[..]), ("b", b"2"), ("c", b"3")] {
            let e = entry(p, b);
            base.files.insert(
                p.to_owned(),
                BaseFile {
                    sha256: e.sha256,
                    size: e.size,
                    local: None,
                },
            );
        }
        let remote = Manifest::new(vec![
            entry("a", b"1"),
            entry("b", b"changed"),
            entry("d", b"4"),
        ])
        .unwrap();
        let mut got: Vec<(String, bool)> = base
            .remote_changes(&remote)
            .into_iter()
            .map(|(p, e)| (p, e.is_some()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("b".to_owned(), true),
                ("c".to_owned(), false),
                ("d".to_owned(), true)
            ]
        );
    }

    #[test]
    fn unchanged_by_signature_or_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a");
        std::fs::write(&file, b"1").unwrap();
        let now = Stat::read(&file);
        let mut base = Base::default();
        let e = entry("a", b"1");
        base.files.insert(
            "a".into(),
            BaseFile {
                sha256: e.sha256,
                size: 1,
                local: None,
            },
        );
        // No signature recorded: the hash decides.
        assert!(base.unchanged_locally("a", now, &file));
        std::fs::write(&file, b"2").unwrap();
        assert!(!base.unchanged_locally("a", Stat::read(&file), &file));
        assert!(!base.unchanged_locally("a", None, &file));
        assert!(base.unchanged_locally("new", None, &dir.path().join("new")));
        let path = dir.path().join("base.json");
        base.save(&path).unwrap();
        assert_eq!(Base::load(&path).unwrap(), base);
        assert_eq!(
            Base::load(&dir.path().join("none")).unwrap(),
            Base::default()
        );
    }
}
