//! The folder as it is on disk: every synced file with its size and modification time (the
//! cheap signature a change shows in), walked without following links and without entering
//! ignored folders. Names the hub would refuse (too long, reserved on Windows, ...) are
//! listed apart so the agent can say so instead of failing the whole folder.

use super::ignore::Rules;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::UNIX_EPOCH;

/// Size and modification time of a file: when neither moved, its bytes are taken as unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stat {
    pub(crate) size: u64,
    /// Nanoseconds since 1970.
    pub(crate) mtime_ns: u64,
}

impl Stat {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Stat {
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Stat {
            size: meta.len(),
            mtime_ns,
        }
    }

    /// The file's signature now, `None` when it is gone (or not a plain file).
    pub(crate) fn read(path: &Path) -> Option<Stat> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.is_file().then(|| Stat::of(&meta))
    }
}

/// The synced files of a folder (path -> signature) and the names that cannot be synced.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) files: BTreeMap<String, Stat>,
    pub(crate) unsyncable: Vec<String>,
}

/// Walks `root` under `rules`.
pub(crate) fn scan(root: &Path, rules: &Rules) -> Snapshot {
    let mut out = Snapshot::default();
    walk(root, "", rules, &mut out);
    out
}

fn walk(dir: &Path, prefix: &str, rules: &Rules, out: &mut Snapshot) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            out.unsyncable
                .push(format!("{prefix}{}", name.to_string_lossy()));
            continue;
        };
        let rel = format!("{prefix}{name}");
        if meta.is_dir() {
            if !rules.ignored(&rel, true) {
                walk(&entry.path(), &format!("{rel}/"), rules, out);
            }
        } else if meta.is_file() && !rules.ignored(&rel, false) {
            if synchub_protocol::validate_path(&rel).is_ok() {
                out.files.insert(rel, Stat::of(&meta));
            } else {
                out.unsyncable.push(rel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_files_skipping_ignored_and_the_agent_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".synchub/cache")).unwrap();
        std::fs::write(root.join(".synchub/cache/x"), b"x").unwrap();
        std::fs::create_dir_all(root.join("r1/sub")).unwrap();
        std::fs::write(root.join("r1/QR_1.png"), b"png").unwrap();
        std::fs::write(root.join("r1/sub/QR_2.png"), b"png2").unwrap();
        std::fs::write(root.join("r1/QR_3.png.synchub-tmp"), b"half").unwrap();
        std::fs::write(root.join("CON.png"), b"reserved on Windows").unwrap();
        let snap = scan(root, &Rules::load(root).unwrap());
        let paths: Vec<&str> = snap.files.keys().map(String::as_str).collect();
        assert_eq!(paths, vec!["r1/QR_1.png", "r1/sub/QR_2.png"]);
        assert_eq!(snap.files["r1/QR_1.png"].size, 3);
        assert_eq!(snap.unsyncable, vec!["CON.png"]);
    }
}
