//! Which paths of a two-way folder are not synced: the agent's own `.synchub/` folder, its
//! temp files, the usual temp and editor files, and whatever `.synchubignore` (gitignore
//! syntax, at the top of the folder) lists. `.synchubignore` itself is synced, so every PC
//! follows the same rules; it is read again on every scan.

use crate::error::{ClientError, Result};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use std::path::Path;

/// The file with the folder's own patterns.
pub(crate) const IGNORE_FILE: &str = ".synchubignore";

/// Suffix of the agent's temp files while it writes an incoming file.
pub(crate) const TEMP_SUFFIX: &str = ".synchub-tmp";

/// Skipped in every folder: temp files and the files editors and file managers leave.
const DEFAULTS: &[&str] = &[
    "/.synchub/",
    "*.synchub-tmp",
    "*.tmp",
    "*.temp",
    "*.part",
    "*.crdownload",
    "*~",
    "~$*",
    ".~lock.*#",
    ".*.swp",
    ".*.swx",
    ".#*",
    "#*#",
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    "__pycache__/",
    "*.pyc",
];

/// The compiled rules of one folder.
pub(crate) struct Rules {
    matcher: Gitignore,
}

impl Rules {
    /// The defaults plus `root/.synchubignore` when it exists. A malformed line is an error
    /// naming the file, so a typo cannot silently publish what was meant to stay local.
    pub(crate) fn load(root: &Path) -> Result<Rules> {
        let mut builder = GitignoreBuilder::new(root);
        for line in DEFAULTS {
            builder
                .add_line(None, line)
                .map_err(|e| ClientError::Config(format!("ignore default {line:?}: {e}")))?;
        }
        let file = root.join(IGNORE_FILE);
        if file.is_file()
            && let Some(e) = builder.add(&file)
        {
            return Err(ClientError::Config(format!("{}: {e}", file.display())));
        }
        let matcher = builder
            .build()
            .map_err(|e| ClientError::Config(format!("ignore rules: {e}")))?;
        Ok(Rules { matcher })
    }

    /// Whether `rel` (a `/`-separated path below the folder) is left alone. The walk asks
    /// for every folder on the way down, so a parent's rule covers what is inside it.
    pub(crate) fn ignored(&self, rel: &str, is_dir: bool) -> bool {
        self.matcher.matched(rel, is_dir).is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_skip_temp_and_editor_files_but_not_data() {
        let dir = tempfile::tempdir().unwrap();
        let rules = Rules::load(dir.path()).unwrap();
        assert!(rules.ignored(".synchub", true));
        assert!(rules.ignored("a/b.png.synchub-tmp", false));
        assert!(rules.ignored("a/~$report.docx", false));
        assert!(rules.ignored("a/.notes.txt.swp", false));
        assert!(rules.ignored("a/download.crdownload", false));
        assert!(rules.ignored("Thumbs.db", false));
        assert!(!rules.ignored("04313-11100-F/QR_0001.png", false));
        assert!(!rules.ignored("a/QR_0001.conflict-pc1-20261126-101500.png", false));
        assert!(!rules.ignored(IGNORE_FILE, false));
        // Only the top `.synchub` is the agent's.
        assert!(!rules.ignored("x/.synchub", true));
    }

    #[test]
    fn synchubignore_adds_patterns_and_negations() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(IGNORE_FILE),
            "# local only\ncache/\n*.log\n!keep.log\n",
        )
        .unwrap();
        let rules = Rules::load(dir.path()).unwrap();
        assert!(rules.ignored("cache", true));
        assert!(rules.ignored("x/app.log", false));
        assert!(!rules.ignored("keep.log", false));
        assert!(!rules.ignored("x/QR_1.png", false));
    }
}
