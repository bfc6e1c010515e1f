//! Selective sync: an agent may hold only part of a space (`--include 'arhiva/Cluj/**'
//! --include 'tables/**'`). The whole manifest is still fetched and its hash checked against
//! the head's data hash; only then is it narrowed to the included paths, and only that part is
//! downloaded, verified, applied, counted by `verify` and reported.
//!
//! A pattern with glob characters (`*`, `?`, `[`, `{`) is a glob where `*` stays inside one
//! folder and `**` crosses folders; a pattern without them is a path prefix: `arhiva/Cluj`
//! takes that file or everything under that folder.

use crate::error::{ClientError, Result};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use synchub_protocol::Manifest;

/// Most patterns one agent may give.
pub(crate) const MAX_PATTERNS: usize = 100;
/// Longest pattern.
pub(crate) const MAX_PATTERN_BYTES: usize = 1000;

#[derive(Clone, Debug)]
pub(crate) struct Selection {
    set: GlobSet,
}

impl Selection {
    /// `None` for no patterns: the whole space.
    pub(crate) fn new(patterns: &[String]) -> Result<Option<Selection>> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let bad = |m: String| Err(ClientError::Config(m));
        if patterns.len() > MAX_PATTERNS {
            return bad(format!("at most {MAX_PATTERNS} --include patterns"));
        }
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES {
                return bad(format!(
                    "--include pattern {pattern:?} must be 1 to {MAX_PATTERN_BYTES} bytes"
                ));
            }
            for glob in globs_of(pattern) {
                let glob = GlobBuilder::new(&glob)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| ClientError::Config(format!("--include {pattern:?}: {e}")))?;
                builder.add(glob);
            }
        }
        let set = builder
            .build()
            .map_err(|e| ClientError::Config(format!("--include: {e}")))?;
        Ok(Some(Selection { set }))
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        self.set.is_match(path)
    }

    /// The entries of `manifest` this agent holds.
    pub(crate) fn narrow(&self, manifest: &Manifest) -> Manifest {
        let entries = manifest
            .entries()
            .iter()
            .filter(|e| self.matches(&e.path))
            .cloned()
            .collect();
        Manifest::new(entries).expect("a subset of a valid manifest is valid")
    }
}

/// A prefix becomes "the path itself, or anything under it"; a glob stays as it is.
fn globs_of(pattern: &str) -> Vec<String> {
    if pattern.contains(['*', '?', '[', '{']) {
        return vec![pattern.to_owned()];
    }
    let folder = pattern.trim_end_matches('/');
    vec![folder.to_owned(), format!("{folder}/**")]
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchub_protocol::{ManifestEntry, Sha256Hex};

    fn sel(patterns: &[&str]) -> Selection {
        let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        Selection::new(&p).unwrap().unwrap()
    }

    #[test]
    fn globs_and_prefixes() {
        let s = sel(&["arhiva/Cluj/**", "tables/*.json"]);
        assert!(s.matches("arhiva/Cluj/Liceul_1.json"));
        assert!(s.matches("arhiva/Cluj/sub/x.json"));
        assert!(!s.matches("arhiva/Cluj-Napoca/x.json"));
        assert!(!s.matches("arhiva/Iasi/x.json"));
        assert!(s.matches("tables/cities.json"));
        assert!(
            !s.matches("tables/old/cities.json"),
            "* stays in one folder"
        );
        let p = sel(&["arhiva/Cluj/"]);
        assert!(p.matches("arhiva/Cluj/a.json"));
        assert!(!p.matches("arhiva/Cluja/a.json"));
        assert!(Selection::new(&[]).unwrap().is_none());
        assert!(Selection::new(&["a/[".into()]).is_err());
        assert!(Selection::new(&[String::new()]).is_err());
    }

    #[test]
    fn narrows_a_manifest() {
        let entry = |p: &str| ManifestEntry {
            path: p.into(),
            size: 1,
            sha256: Sha256Hex::of(p.as_bytes()),
        };
        let m = Manifest::new(vec![
            entry("arhiva/Cluj/a.json"),
            entry("arhiva/Iasi/b.json"),
            entry("tables/cities.json"),
        ])
        .unwrap();
        let part = sel(&["arhiva/Cluj/**"]).narrow(&m);
        let paths: Vec<_> = part.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["arhiva/Cluj/a.json"]);
    }
}
