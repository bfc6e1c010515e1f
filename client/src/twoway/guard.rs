//! The mass-change guard: a local burst that deletes or replaces more of the folder than the
//! limits allow (by default half of its files, or 1,000 files) is not published. Its
//! destructive part is held: kept in `DIR/.synchub/held.json`, shown by `synchub-agent
//! status`, reported to the hub, and published only when an admin approves it; on reject the
//! folder gets those files back as the hub has them. New files are never held.

use crate::apply::write_atomic;
use crate::error::{ClientError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use synchub_protocol::HeldChange;
use synchub_protocol::held::HELD_SAMPLE_MAX;

/// When a burst is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Held above this share of the folder's files (percent).
    pub(crate) percent: u64,
    /// Held above this many files, whatever the share.
    pub(crate) files: u64,
    /// The share counts only from this many files on, so editing 2 of 3 files is no alarm.
    pub(crate) min_files: u64,
}

impl Limits {
    /// Whether deleting or replacing `destructive` of `total` files must be held.
    pub(crate) fn exceeded(&self, destructive: u64, total: u64) -> bool {
        destructive > self.files
            || (destructive >= self.min_files
                && destructive.saturating_mul(100) > total.saturating_mul(self.percent))
    }
}

/// A held burst, as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Held {
    /// The hub version the burst was made against.
    pub(crate) base_version: u64,
    pub(crate) deletes: Vec<String>,
    pub(crate) replaces: Vec<String>,
    pub(crate) change: HeldChange,
}

impl Held {
    pub(crate) fn new(
        base_version: u64,
        total: u64,
        mut deletes: Vec<String>,
        mut replaces: Vec<String>,
    ) -> Held {
        deletes.sort();
        replaces.sort();
        let change = HeldChange {
            deletes: deletes.len() as u64,
            replaces: replaces.len() as u64,
            total,
            sample_deletes: deletes.iter().take(HELD_SAMPLE_MAX).cloned().collect(),
            sample_replaces: replaces.iter().take(HELD_SAMPLE_MAX).cloned().collect(),
            held_at: chrono::Utc::now().to_rfc3339(),
        };
        Held {
            base_version,
            deletes,
            replaces,
            change,
        }
    }

    /// Whether `path` is part of the held burst.
    pub(crate) fn holds(&self, path: &str) -> bool {
        self.deletes
            .binary_search_by(|p| p.as_str().cmp(path))
            .is_ok()
            || self
                .replaces
                .binary_search_by(|p| p.as_str().cmp(path))
                .is_ok()
    }

    pub(crate) fn load(path: &Path) -> Result<Option<Held>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ClientError::Protocol(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::io(format!("reading {}", path.display()), e)),
        }
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| ClientError::Protocol(format!("encoding the held change: {e}")))?;
        write_atomic(path, &json)
    }

    pub(crate) fn remove(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::io(format!("removing {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Limits = Limits {
        percent: 50,
        files: 1000,
        min_files: 10,
    };

    #[test]
    fn half_the_folder_or_a_thousand_files_is_held() {
        assert!(!DEFAULT.exceeded(50, 100));
        assert!(DEFAULT.exceeded(51, 100));
        assert!(DEFAULT.exceeded(305, 508));
        assert!(DEFAULT.exceeded(1001, 100_000));
        assert!(!DEFAULT.exceeded(1000, 100_000));
        // A small folder: a few edits are no mass change.
        assert!(!DEFAULT.exceeded(2, 3));
        assert!(DEFAULT.exceeded(10, 12));
    }

    #[test]
    fn held_lists_are_searchable_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let held = Held::new(
            7,
            100,
            vec!["a/1.png".into(), "a/2.png".into()],
            vec!["b/1.png".into()],
        );
        assert!(held.holds("a/2.png") && held.holds("b/1.png") && !held.holds("c"));
        assert_eq!(held.change.deletes, 2);
        let path = dir.path().join("held.json");
        held.save(&path).unwrap();
        assert_eq!(Held::load(&path).unwrap(), Some(held));
        Held::remove(&path).unwrap();
        assert_eq!(Held::load(&path).unwrap(), None);
    }
}
