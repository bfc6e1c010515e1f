//! The file watcher: the system's change notifications for the folder (inotify, ReadDirectory
//! ChangesW, FSEvents through the `notify` crate) only wake the scanner; what changed is
//! always decided by a scan against the base. So a lost or merged event costs nothing but
//! time, and the periodic rescan catches what no event reported.

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Notify;

/// Watches `root` recursively and wakes `wake` on any change outside `root/.synchub`. `None`
/// (logged) when the system refuses a watch: the rescan alone then notices changes.
pub(crate) fn start(root: &Path, wake: Arc<Notify>) -> Option<RecommendedWatcher> {
    let meta: PathBuf = root.join(".synchub");
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            if event.paths.iter().any(|p| !p.starts_with(&meta)) || event.paths.is_empty() {
                wake.notify_one();
            }
        }
        // An overflow or a broken watch: scan.
        Err(_) => wake.notify_one(),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher; changes are noticed by the periodic rescan");
            return None;
        }
    };
    if let Err(e) = watcher.watch(root, RecursiveMode::Recursive) {
        tracing::warn!(dir = %root.display(), error = %e,
            "cannot watch the folder; changes are noticed by the periodic rescan");
        return None;
    }
    Some(watcher)
}
