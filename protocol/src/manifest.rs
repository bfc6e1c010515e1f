//! The manifest: the full content of a space at one version, as sorted `(path, size, sha256)`
//! entries, and its one canonical encoding.
//!
//! Canonical form: one line per entry, sorted by the path's bytes, `<sha256> <size> <path>\n`,
//! UTF-8. The data hash of a version is the sha256 of these bytes. Paths cannot hold control
//! characters (see [`crate::path`]), so a line break always ends an entry. The hub serves the
//! canonical bytes as is, and an agent hashes what it received before parsing it.

use crate::hash::{HashError, Sha256Hex};
use crate::path::{PathError, validate_path};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    pub size: u64,
    pub sha256: Sha256Hex,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<ManifestEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("path {0:?} appears twice")]
    Duplicate(String),
    #[error("path {0:?} is both a file and a folder")]
    FileFolderClash(String),
    #[error("manifest line {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("manifest has {count} entries, more than the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    #[error("delete of {0:?}, which the base version does not have")]
    DeleteMissing(String),
}

impl Manifest {
    /// Builds a manifest from entries in any order; validates every path and rejects
    /// duplicates and a path that is also used as a folder (`a` and `a/b`).
    pub fn new(mut entries: Vec<ManifestEntry>) -> Result<Self, ManifestError> {
        for e in &entries {
            validate_path(&e.path)?;
        }
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        for pair in entries.windows(2) {
            if pair[0].path == pair[1].path {
                return Err(ManifestError::Duplicate(pair[0].path.clone()));
            }
        }
        check_file_folder_clash(&entries)?;
        Ok(Manifest { entries })
    }

    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// How many paths differ between `old` and this manifest: added, changed (size or hash)
    /// or removed. What a sync from `old` to this version changed.
    pub fn changes_from(&self, old: &Manifest) -> u64 {
        let changed_or_added = self
            .entries
            .iter()
            .filter(|e| old.get(&e.path) != Some(*e))
            .count();
        let removed = old
            .entries
            .iter()
            .filter(|e| self.get(&e.path).is_none())
            .count();
        (changed_or_added + removed) as u64
    }

    pub fn get(&self, path: &str) -> Option<&ManifestEntry> {
        self.entries
            .binary_search_by(|e| e.path.as_bytes().cmp(path.as_bytes()))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The canonical encoding (see the module comment).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 100);
        for e in &self.entries {
            out.extend_from_slice(e.sha256.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(e.size.to_string().as_bytes());
            out.push(b' ');
            out.extend_from_slice(e.path.as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// sha256 of the canonical encoding.
    pub fn data_hash(&self) -> Sha256Hex {
        Sha256Hex::of(&self.canonical_bytes())
    }

    /// Parses the canonical encoding strictly: the bytes must be exactly what
    /// [`Manifest::canonical_bytes`] would produce, so one manifest has one hash.
    pub fn from_canonical(bytes: &[u8], max_entries: usize) -> Result<Self, ManifestError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ManifestError::Malformed {
            line: 0,
            reason: format!("not UTF-8: {e}"),
        })?;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(ManifestError::Malformed {
                line: text.lines().count(),
                reason: "truncated: last line has no line break".into(),
            });
        }
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if entries.len() >= max_entries {
                return Err(ManifestError::TooManyEntries {
                    count: text.lines().count(),
                    limit: max_entries,
                });
            }
            let malformed = |reason: &str| ManifestError::Malformed {
                line: i + 1,
                reason: reason.into(),
            };
            let mut parts = line.splitn(3, ' ');
            let (Some(hash), Some(size), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(malformed("expected '<sha256> <size> <path>'"));
            };
            let sha256: Sha256Hex = hash.parse()?;
            let size: u64 = size
                .parse()
                .map_err(|_| malformed("size is not a number"))?;
            if size.to_string().len() != line.split(' ').nth(1).map_or(0, str::len) {
                return Err(malformed("size has leading zeros or a sign"));
            }
            entries.push(ManifestEntry {
                path: path.to_owned(),
                size,
                sha256,
            });
        }
        let manifest = Manifest::new(entries)?;
        if manifest.canonical_bytes() != bytes {
            return Err(ManifestError::Malformed {
                line: 0,
                reason: "entries are not in canonical order".into(),
            });
        }
        Ok(manifest)
    }

    /// The manifest after putting `puts` (added or replaced) and removing `deletes`.
    pub fn with_changes(
        &self,
        puts: &[ManifestEntry],
        deletes: &[String],
    ) -> Result<Manifest, ManifestError> {
        let mut map: BTreeMap<&str, &ManifestEntry> =
            self.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        for d in deletes {
            validate_path(d)?;
            if map.remove(d.as_str()).is_none() {
                return Err(ManifestError::DeleteMissing(d.clone()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in puts {
            validate_path(&p.path)?;
            if !seen.insert(p.path.as_str()) {
                return Err(ManifestError::Duplicate(p.path.clone()));
            }
            map.insert(p.path.as_str(), p);
        }
        Manifest::new(map.into_values().cloned().collect())
    }

    /// Paths whose entry differs between `self` and `other` (added, removed or changed).
    pub fn changed_paths(&self, other: &Manifest) -> Vec<String> {
        let a: BTreeMap<&str, &ManifestEntry> =
            self.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let b: BTreeMap<&str, &ManifestEntry> =
            other.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let mut out: Vec<String> = a
            .iter()
            .filter(|(p, e)| b.get(*p) != Some(*e))
            .map(|(p, _)| (*p).to_owned())
            .collect();
        out.extend(
            b.keys()
                .filter(|p| !a.contains_key(*p))
                .map(|p| (*p).to_owned()),
        );
        out.sort();
        out
    }
}

/// Sorted by bytes, a folder `a/` sorts right after every `a...` name that is smaller than '/',
/// so check each path against all folder prefixes of the set.
fn check_file_folder_clash(entries: &[ManifestEntry]) -> Result<(), ManifestError> {
    let files: std::collections::HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for e in entries {
        let mut rest = e.path.as_str();
        while let Some(i) = rest.rfind('/') {
            rest = &rest[..i];
            if files.contains(rest) {
                return Err(ManifestError::FileFolderClash(rest.to_owned()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn changes_count_added_changed_and_removed_paths() {
        let entry = |path: &str, body: &[u8]| ManifestEntry {
            path: path.to_owned(),
            size: body.len() as u64,
            sha256: Sha256Hex::of(body),
        };
        let old =
            Manifest::new(vec![entry("a", b"1"), entry("b", b"2"), entry("c", b"3")]).unwrap();
        let new =
            Manifest::new(vec![entry("a", b"1"), entry("b", b"x"), entry("d", b"4")]).unwrap();
        assert_eq!(new.changes_from(&old), 3, "b changed, c removed, d added");
        assert_eq!(new.changes_from(&new), 0);
        assert_eq!(new.changes_from(&Manifest::default()), 3);
    }

    use super::*;
    use proptest::prelude::*;

    fn entry(path: &str, body: &[u8]) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            size: body.len() as u64,
            sha256: Sha256Hex::of(body),
        }
    }

    #[test]
    fn empty_manifest_hashes_to_empty_digest() {
        assert_eq!(Manifest::default().data_hash(), Sha256Hex::empty());
    }

    #[test]
    fn order_of_input_does_not_change_hash() {
        let a = Manifest::new(vec![entry("b", b"1"), entry("a/x", b"2")]).unwrap();
        let b = Manifest::new(vec![entry("a/x", b"2"), entry("b", b"1")]).unwrap();
        assert_eq!(a.data_hash(), b.data_hash());
        assert_eq!(a.entries()[0].path, "a/x");
    }

    #[test]
    fn canonical_form_is_stable() {
        // Pinned: changing the encoding would change every data_hash agents hold.
        let m = Manifest::new(vec![entry("Brașov/a.json", b"{}")]).unwrap();
        let text = String::from_utf8(m.canonical_bytes()).unwrap();
        assert_eq!(
            text,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a 2 Brașov/a.json\n"
        );
    }

    #[test]
    fn rejects_duplicates_and_clashes() {
        assert!(matches!(
            Manifest::new(vec![entry("a", b"1"), entry("a", b"2")]),
            Err(ManifestError::Duplicate(_))
        ));
        assert!(matches!(
            Manifest::new(vec![entry("a", b"1"), entry("a/b", b"2")]),
            Err(ManifestError::FileFolderClash(_))
        ));
        assert!(Manifest::new(vec![entry("../a", b"1")]).is_err());
    }

    #[test]
    fn parse_rejects_non_canonical_input() {
        let m = Manifest::new(vec![entry("a", b"1"), entry("b", b"2")]).unwrap();
        let bytes = m.canonical_bytes();
        assert_eq!(Manifest::from_canonical(&bytes, 10).unwrap(), m);
        // Truncated.
        assert!(Manifest::from_canonical(&bytes[..bytes.len() - 1], 10).is_err());
        // Reordered lines.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.reverse();
        let reordered = format!("{}\n", lines.join("\n"));
        assert!(Manifest::from_canonical(reordered.as_bytes(), 10).is_err());
        // Leading zero in size.
        let zero = text.replacen(" 1 a", " 01 a", 1);
        assert!(Manifest::from_canonical(zero.as_bytes(), 10).is_err());
        // Bad hash, too many entries.
        assert!(Manifest::from_canonical(b"xyz 1 a\n", 10).is_err());
        assert!(matches!(
            Manifest::from_canonical(&bytes, 1),
            Err(ManifestError::TooManyEntries { .. })
        ));
    }

    #[test]
    fn changes_apply_and_diff() {
        let base = Manifest::new(vec![entry("a", b"1"), entry("b", b"2")]).unwrap();
        let next = base
            .with_changes(&[entry("c", b"3"), entry("a", b"9")], &["b".into()])
            .unwrap();
        assert_eq!(next.len(), 2);
        assert_eq!(next.get("a").unwrap().sha256, Sha256Hex::of(b"9"));
        assert_eq!(base.changed_paths(&next), vec!["a", "b", "c"]);
        assert!(matches!(
            base.with_changes(&[], &["zz".into()]),
            Err(ManifestError::DeleteMissing(_))
        ));
    }

    fn arb_path() -> impl Strategy<Value = String> {
        proptest::collection::vec("[a-zA-Z0-9_ășț日-]{1,12}", 1..4)
            .prop_map(|segs| segs.join("/"))
            .prop_filter("valid", |p| validate_path(p).is_ok())
    }

    proptest! {
        #[test]
        fn canonical_round_trip(paths in proptest::collection::btree_set(arb_path(), 0..40),
                                sizes in proptest::collection::vec(any::<u64>(), 40)) {
            let entries: Vec<ManifestEntry> = paths.iter().zip(sizes.iter()).map(|(p, s)| ManifestEntry {
                path: p.clone(), size: *s, sha256: Sha256Hex::of(p.as_bytes()),
            }).collect();
            if let Ok(m) = Manifest::new(entries.clone()) {
                let bytes = m.canonical_bytes();
                let back = Manifest::from_canonical(&bytes, 1000).unwrap();
                prop_assert_eq!(&back, &m);
                prop_assert_eq!(back.data_hash(), m.data_hash());
                let mut shuffled = entries;
                shuffled.reverse();
                prop_assert_eq!(Manifest::new(shuffled).unwrap().data_hash(), m.data_hash());
            }
        }

        #[test]
        fn json_round_trip(path in arb_path(), size in any::<u64>()) {
            let e = ManifestEntry { path, size, sha256: Sha256Hex::of(b"x") };
            let back: ManifestEntry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            prop_assert_eq!(back, e);
        }
    }
}
