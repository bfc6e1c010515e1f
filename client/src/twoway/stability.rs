//! When a changed file may be taken: its size and modification time have not moved for the
//! configured time, it can be opened, and no program holds it open for writing. A file that
//! fails any of these is looked at again later, so a file written slowly (or held open by an
//! app that writes in steps) is never published half-done.
//!
//! Who holds a file open for writing is asked of the system: on Linux every process's open
//! files in `/proc` (their access mode is in `fdinfo`); on Windows an open that refuses to
//! share writing fails while another program has the file open for writing.

use super::scan::Stat;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The local changes seen but not yet taken, each with the signature it had and since when.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    seen: HashMap<String, Seen>,
}

#[derive(Debug)]
struct Seen {
    /// `None`: the file is gone (a deletion).
    stat: Option<Stat>,
    since: Instant,
}

impl Tracker {
    /// Records what a scan found for a changed path; a signature that moved starts its
    /// waiting time again.
    pub(crate) fn observe(&mut self, path: &str, stat: Option<Stat>, now: Instant) {
        match self.seen.get_mut(path) {
            Some(s) if s.stat == stat => {}
            Some(s) => {
                s.stat = stat;
                s.since = now;
            }
            None => {
                self.seen.insert(path.to_owned(), Seen { stat, since: now });
            }
        }
    }

    /// Drops paths that are no longer changed (written back, or taken).
    pub(crate) fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.seen.retain(|p, _| keep(p));
    }

    pub(crate) fn forget(&mut self, path: &str) {
        self.seen.remove(path);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Whether `path`'s signature (or its absence) has held still for `window`. A deletion
    /// waits too, so a burst of deletions is seen whole by the mass-change guard rather than
    /// published piece by piece as it happens.
    pub(crate) fn stable(&self, path: &str, now: Instant, window: Duration) -> bool {
        self.seen
            .get(path)
            .is_some_and(|s| now.duration_since(s.since) >= window)
    }

    /// When the next change that is not stable yet will be (to scan again just then).
    pub(crate) fn next_stable_at(&self, now: Instant, window: Duration) -> Option<Instant> {
        self.seen
            .values()
            .map(|s| s.since + window)
            .filter(|t| *t > now)
            .min()
    }

    /// When the oldest change was first seen with its present signature.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.seen.values().map(|s| s.since).min()
    }
}

/// Which of `paths` cannot be taken now: they cannot be opened for reading, or a program
/// holds them open for writing.
pub(crate) fn busy(paths: &[PathBuf]) -> HashSet<PathBuf> {
    let mut out: HashSet<PathBuf> = paths
        .iter()
        .filter(|p| std::fs::File::open(p).is_err())
        .cloned()
        .collect();
    out.extend(open_for_writing(paths));
    out
}

#[cfg(target_os = "linux")]
fn open_for_writing(paths: &[PathBuf]) -> HashSet<PathBuf> {
    let wanted: HashMap<PathBuf, PathBuf> = paths
        .iter()
        .filter_map(|p| Some((std::fs::canonicalize(p).ok()?, p.clone())))
        .collect();
    let mut out = HashSet::new();
    if wanted.is_empty() {
        return out;
    }
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for proc_entry in procs.flatten() {
        let pid = proc_entry.file_name();
        let Some(pid) = pid.to_str() else { continue };
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let base = proc_entry.path();
        // A process may end or forbid a look at any moment: skip it then.
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(original) = wanted.get(&target) else {
                continue;
            };
            if writes(&base.join("fdinfo").join(fd.file_name())) {
                out.insert(original.clone());
            }
        }
    }
    out
}

/// Whether an `fdinfo` file says the descriptor was opened for writing (`O_WRONLY` or
/// `O_RDWR` in the octal `flags`); unknown counts as writing, to be safe.
#[cfg(target_os = "linux")]
fn writes(fdinfo: &std::path::Path) -> bool {
    let Ok(text) = std::fs::read_to_string(fdinfo) else {
        return true;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_none_or(|flags| flags & 0o3 != 0)
}

#[cfg(windows)]
fn open_for_writing(paths: &[PathBuf]) -> HashSet<PathBuf> {
    use std::os::windows::fs::OpenOptionsExt;
    // FILE_SHARE_READ | FILE_SHARE_DELETE, no FILE_SHARE_WRITE: refused (sharing violation)
    // while another program has the file open for writing.
    const SHARE_READ_DELETE: u32 = 0x1 | 0x4;
    paths
        .iter()
        .filter(|p| {
            std::fs::OpenOptions::new()
                .read(true)
                .share_mode(SHARE_READ_DELETE)
                .open(p)
                .is_err()
        })
        .cloned()
        .collect()
}

#[cfg(not(any(target_os = "linux", windows)))]
fn open_for_writing(_paths: &[PathBuf]) -> HashSet<PathBuf> {
    // No cheap way to ask: the stability time alone decides.
    HashSet::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_that_moves_waits_again_and_deletions_wait_too() {
        let t0 = Instant::now();
        let w = Duration::from_millis(500);
        let a = Stat {
            size: 1,
            mtime_ns: 1,
        };
        let b = Stat {
            size: 2,
            mtime_ns: 2,
        };
        let mut tr = Tracker::default();
        tr.observe("x", Some(a), t0);
        assert!(!tr.stable("x", t0 + Duration::from_millis(400), w));
        tr.observe("x", Some(b), t0 + Duration::from_millis(400));
        assert!(!tr.stable("x", t0 + Duration::from_millis(800), w));
        tr.observe("x", Some(b), t0 + Duration::from_millis(800));
        assert!(tr.stable("x", t0 + Duration::from_millis(900), w));
        tr.observe("gone", None, t0 + Duration::from_millis(900));
        assert!(!tr.stable("gone", t0 + Duration::from_millis(900), w));
        assert!(tr.stable("gone", t0 + Duration::from_millis(1400), w));
        assert!(!tr.stable("unknown", t0 + Duration::from_secs(9), w));
    }

    #[cfg(any(target_os = "linux", windows))]
    #[test]
    fn a_file_another_process_writes_is_busy_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.png");
        std::fs::write(&path, b"start").unwrap();
        // Another process (this one is skipped on Linux: the agent never writes app files)
        // holds the file open for writing.
        #[cfg(target_os = "linux")]
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3>>'{}'; exec sleep 30", path.display()))
            .spawn()
            .unwrap();
        #[cfg(windows)]
        let held = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let paths = vec![path.clone()];
        let deadline = Instant::now() + Duration::from_secs(5);
        while busy(&paths).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            busy(&paths).contains(&path),
            "the writer's file is not seen as busy"
        );
        #[cfg(target_os = "linux")]
        {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        #[cfg(windows)]
        drop(held);
        assert!(busy(&paths).is_empty(), "a closed file is still busy");
        // A reader does not make a file busy.
        let _reader = std::fs::File::open(&path).unwrap();
        assert!(busy(&paths).is_empty());
    }
}
