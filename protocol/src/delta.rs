//! Manifest deltas: what changed between two versions' manifests, so an agent that holds one
//! version learns the next from a few lines instead of the whole manifest.
//!
//! Encoding (UTF-8, one item per line, each ending in `\n`):
//!
//! ```text
//! synchub-manifest-delta 1
//! from <sha256 of the base manifest>
//! to <sha256 of the resulting manifest>
//! + <sha256> <size> <path>      an entry added or changed
//! - <path>                      an entry removed
//! ```
//!
//! The `+` and `-` lines are sorted by the path's bytes and name each path at most once. A
//! delta is never trusted: [`ManifestDelta::apply`] checks that the base hashes to `from` and
//! that the result hashes to `to`, which the agent compares with the announced `data_hash`.

use crate::hash::Sha256Hex;
use crate::manifest::{Manifest, ManifestEntry, ManifestError};
use crate::path::validate_path;

/// The `Content-Type` of a delta answer (a full manifest is `text/plain`).
pub const DELTA_CONTENT_TYPE: &str = "application/x-synchub-manifest-delta";

const MAGIC: &str = "synchub-manifest-delta 1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestDelta {
    pub from: Sha256Hex,
    pub to: Sha256Hex,
    /// Added or changed entries, sorted by path.
    pub puts: Vec<ManifestEntry>,
    /// Removed paths, sorted.
    pub deletes: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("manifest delta line {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("manifest delta has {count} changes, more than the limit of {limit}")]
    TooManyChanges { count: usize, limit: usize },
    #[error("manifest delta is from base {expected}, not the held manifest {actual}")]
    WrongBase {
        expected: Sha256Hex,
        actual: Sha256Hex,
    },
    #[error("manifest delta gives a manifest hashing to {actual}, not {expected}")]
    WrongResult {
        expected: Sha256Hex,
        actual: Sha256Hex,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl ManifestDelta {
    /// The changes that turn `old` into `new`.
    pub fn between(old: &Manifest, new: &Manifest) -> Self {
        let puts = new
            .entries()
            .iter()
            .filter(|e| old.get(&e.path) != Some(*e))
            .cloned()
            .collect();
        let deletes = old
            .entries()
            .iter()
            .filter(|e| new.get(&e.path).is_none())
            .map(|e| e.path.clone())
            .collect();
        // Entries of a manifest are sorted by path bytes, so both lists are too.
        ManifestDelta {
            from: old.data_hash(),
            to: new.data_hash(),
            puts,
            deletes,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{MAGIC}\nfrom {}\nto {}\n", self.from, self.to).into_bytes();
        for e in &self.puts {
            out.extend_from_slice(format!("+ {} {} {}\n", e.sha256, e.size, e.path).as_bytes());
        }
        for d in &self.deletes {
            out.extend_from_slice(format!("- {d}\n").as_bytes());
        }
        out
    }

    /// Parses an encoded delta, refusing one with more than `max_changes` lines of changes.
    pub fn parse(bytes: &[u8], max_changes: usize) -> Result<Self, DeltaError> {
        let malformed = |line: usize, reason: &str| DeltaError::Malformed {
            line,
            reason: reason.to_owned(),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| malformed(0, "not UTF-8"))?;
        if !text.ends_with('\n') {
            return Err(malformed(0, "truncated: last line has no line break"));
        }
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(malformed(1, "not a synchub manifest delta (version 1)"));
        }
        let mut hash_line = |n: usize, key: &str| -> Result<Sha256Hex, DeltaError> {
            let value = lines
                .next()
                .and_then(|l| l.strip_prefix(key)?.strip_prefix(' '))
                .ok_or_else(|| malformed(n, &format!("expected '{key} <sha256>'")))?;
            value.parse().map_err(|_| malformed(n, "not a sha256"))
        };
        let from = hash_line(2, "from")?;
        let to = hash_line(3, "to")?;
        let (mut puts, mut deletes) = (Vec::new(), Vec::new());
        for (i, line) in lines.enumerate() {
            let n = i + 4;
            if puts.len() + deletes.len() >= max_changes {
                return Err(DeltaError::TooManyChanges {
                    count: text.lines().count() - 3,
                    limit: max_changes,
                });
            }
            if let Some(path) = line.strip_prefix("- ") {
                validate_path(path).map_err(ManifestError::from)?;
                deletes.push(path.to_owned());
            } else if let Some(rest) = line.strip_prefix("+ ") {
                let entry = Manifest::from_canonical(format!("{rest}\n").as_bytes(), 1)
                    .map_err(|e| malformed(n, &e.to_string()))?;
                puts.extend(entry.entries().iter().cloned());
            } else {
                return Err(malformed(
                    n,
                    "expected '+ <sha256> <size> <path>' or '- <path>'",
                ));
            }
        }
        Ok(ManifestDelta {
            from,
            to,
            puts,
            deletes,
        })
    }

    /// The manifest this delta gives from `base`, checked: `base` must hash to `from` and the
    /// result to `to`.
    pub fn apply(&self, base: &Manifest) -> Result<Manifest, DeltaError> {
        let actual = base.data_hash();
        if actual != self.from {
            return Err(DeltaError::WrongBase {
                expected: self.from.clone(),
                actual,
            });
        }
        let result = base.with_changes(&self.puts, &self.deletes)?;
        let actual = result.data_hash();
        if actual != self.to {
            return Err(DeltaError::WrongResult {
                expected: self.to.clone(),
                actual,
            });
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, body: &[u8]) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            size: body.len() as u64,
            sha256: Sha256Hex::of(body),
        }
    }

    fn pair() -> (Manifest, Manifest) {
        let old = Manifest::new(vec![
            entry("a.json", b"1"),
            entry("b b/c.json", b"2"),
            entry("d.png", b"3"),
        ])
        .unwrap();
        let new = Manifest::new(vec![
            entry("a.json", b"1"),
            entry("b b/c.json", b"changed"),
            entry("e.json", b"new"),
        ])
        .unwrap();
        (old, new)
    }

    #[test]
    fn a_delta_names_only_the_changes_and_rebuilds_the_manifest() {
        let (old, new) = pair();
        let delta = ManifestDelta::between(&old, &new);
        assert_eq!(
            delta
                .puts
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>(),
            vec!["b b/c.json", "e.json"]
        );
        assert_eq!(delta.deletes, vec!["d.png"]);
        let bytes = delta.encode();
        let parsed = ManifestDelta::parse(&bytes, 100).unwrap();
        assert_eq!(parsed, delta);
        let rebuilt = parsed.apply(&old).unwrap();
        assert_eq!(rebuilt.canonical_bytes(), new.canonical_bytes());
    }

    #[test]
    fn the_encoding_is_pinned() {
        let (old, new) = pair();
        let text = String::from_utf8(ManifestDelta::between(&old, &new).encode()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "synchub-manifest-delta 1");
        assert_eq!(lines[1], format!("from {}", old.data_hash()));
        assert_eq!(lines[2], format!("to {}", new.data_hash()));
        assert_eq!(
            lines[3],
            format!("+ {} 7 b b/c.json", Sha256Hex::of(b"changed"))
        );
        assert_eq!(lines[5], "- d.png");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn an_empty_delta_between_equal_manifests() {
        let (old, _) = pair();
        let delta = ManifestDelta::between(&old, &old);
        assert!(delta.puts.is_empty() && delta.deletes.is_empty());
        assert_eq!(delta.apply(&old).unwrap(), old);
    }

    #[test]
    fn a_wrong_base_or_result_is_refused() {
        let (old, new) = pair();
        let delta = ManifestDelta::between(&old, &new);
        assert!(matches!(
            delta.apply(&new),
            Err(DeltaError::WrongBase { .. })
        ));
        let mut lying = delta.clone();
        lying.to = Sha256Hex::of(b"something else");
        assert!(matches!(
            lying.apply(&old),
            Err(DeltaError::WrongResult { .. })
        ));
        let mut dropped = delta;
        dropped.deletes.clear();
        assert!(matches!(
            dropped.apply(&old),
            Err(DeltaError::WrongResult { .. })
        ));
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let (old, new) = pair();
        let good = ManifestDelta::between(&old, &new).encode();
        assert!(ManifestDelta::parse(&good[..good.len() - 1], 100).is_err());
        assert!(ManifestDelta::parse(b"hello\n", 100).is_err());
        let text = String::from_utf8(good.clone()).unwrap();
        assert!(ManifestDelta::parse(text.replace("- d.png", "* d.png").as_bytes(), 100).is_err());
        assert!(
            ManifestDelta::parse(text.replace("- d.png", "- ../evil").as_bytes(), 100).is_err()
        );
        assert!(matches!(
            ManifestDelta::parse(&good, 2),
            Err(DeltaError::TooManyChanges { .. })
        ));
    }
}
