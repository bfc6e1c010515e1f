//! What `synchub-agent run` shows of a long download on stderr: a progress bar per space on a
//! terminal; otherwise (a service log, a pipe) a plain line every 2 s while a download lasts
//! and one when it ends, so a log keeps a readable record. Downloads over within 2 s print
//! nothing here (the agent's log has them).
//!
//! [`Lines`] decides the plain lines from the agent's state (no I/O, unit-tested below);
//! [`spawn`] follows each space's state and draws.

use std::time::{Duration, Instant};
use synchub_client::SyncClient;
use synchub_protocol::AgentState;
use tokio::task::JoinHandle;

/// A plain line at most this often while a download lasts.
const EVERY: Duration = Duration::from_secs(2);

/// Follows every space's state until the agent stops; the tasks end with it (or on abort).
pub fn spawn(client: &SyncClient, spaces: &[String]) -> anyhow::Result<Vec<JoinHandle<()>>> {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    spaces
        .iter()
        .map(|space| {
            let states = client.subscribe(Some(space))?;
            Ok(tokio::spawn(follow(space.clone(), states, terminal)))
        })
        .collect()
}

async fn follow(
    space: String,
    mut states: tokio::sync::watch::Receiver<AgentState>,
    terminal: bool,
) {
    let mut lines = Lines::new(&space);
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        tokio::select! {
            changed = states.changed() => if changed.is_err() { return },
            // A stalled download changes nothing; its line still comes.
            _ = tokio::time::sleep(EVERY) => {}
        }
        let state = states.borrow_and_update().clone();
        if !terminal {
            if let Some(line) = lines.on(&state, Instant::now()) {
                eprintln!("{line}");
            }
            continue;
        }
        match &state {
            AgentState::Downloading {
                target,
                bytes_done,
                bytes_total,
                ..
            } => {
                let bar = bar.get_or_insert_with(|| new_bar(&space, *target));
                bar.set_length(*bytes_total);
                bar.set_position(*bytes_done);
            }
            // Verifying and applying follow the download: the bar stays until the end.
            AgentState::Verifying { .. } | AgentState::Applying { .. } => {}
            _ => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    }
}

fn new_bar(space: &str, target: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:40} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(format!("{space} v{target}"));
    bar
}

/// The plain lines of one space's downloads.
pub struct Lines {
    space: String,
    /// The download under way: its target version, when it started, when a line last came
    /// (none yet: the download is short so far).
    current: Option<(u64, Instant, Option<Instant>)>,
}

impl Lines {
    pub fn new(space: &str) -> Lines {
        Lines {
            space: space.to_owned(),
            current: None,
        }
    }

    /// The line to print for `state` at `now`, if any.
    pub fn on(&mut self, state: &AgentState, now: Instant) -> Option<String> {
        let space = &self.space;
        match state {
            AgentState::Downloading {
                target,
                files_done,
                files_total,
                bytes_done,
                bytes_total,
                bytes_per_sec,
                ..
            } => {
                let (_, started, last) = self.current.get_or_insert((*target, now, None));
                let due = last.map_or(*started, |l| l) + EVERY;
                if now < due {
                    return None;
                }
                *last = Some(now);
                Some(format!(
                    "downloading {space} version {target}: {} of {} ({files_done} of \
                     {files_total} files, {}/s)",
                    indicatif::DecimalBytes(*bytes_done),
                    indicatif::DecimalBytes(*bytes_total),
                    indicatif::DecimalBytes(*bytes_per_sec)
                ))
            }
            AgentState::Verifying { .. } | AgentState::Applying { .. } => None,
            other => {
                let (target, started, last) = self.current.take()?;
                last?;
                let took = indicatif::HumanDuration(now.duration_since(started));
                Some(match other {
                    AgentState::Failed { error, .. } => {
                        format!("download of {space} version {target} failed after {took}: {error}")
                    }
                    _ => format!(
                        "downloaded {space} version {target} in {took} (now {})",
                        other.name()
                    ),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn downloading(done: u64) -> AgentState {
        AgentState::Downloading {
            version: 1,
            target: 2,
            files_done: 1,
            files_total: 4,
            bytes_done: done,
            bytes_total: 8_000_000,
            bytes_per_sec: 1_000_000,
        }
    }

    #[test]
    fn a_long_download_gets_a_line_every_2_s_and_one_at_the_end() {
        let mut l = Lines::new("s");
        let t0 = Instant::now();
        assert_eq!(l.on(&downloading(0), t0), None);
        assert_eq!(
            l.on(&downloading(1_000_000), t0 + Duration::from_secs(1)),
            None
        );
        let line = l.on(&downloading(2_500_000), t0 + Duration::from_secs(2));
        assert_eq!(
            line.as_deref(),
            Some("downloading s version 2: 2.50 MB of 8.00 MB (1 of 4 files, 1.00 MB/s)")
        );
        assert_eq!(
            l.on(&downloading(3_000_000), t0 + Duration::from_secs(3)),
            None
        );
        assert!(
            l.on(&downloading(3_000_000), t0 + Duration::from_secs(4))
                .is_some()
        );
        let verifying = AgentState::Verifying {
            version: 1,
            target: 2,
        };
        assert_eq!(l.on(&verifying, t0 + Duration::from_secs(5)), None);
        let end = l.on(
            &AgentState::Ready { version: 2 },
            t0 + Duration::from_secs(6),
        );
        assert_eq!(
            end.as_deref(),
            Some("downloaded s version 2 in 6 seconds (now ready)")
        );
        assert_eq!(
            l.on(
                &AgentState::Ready { version: 2 },
                t0 + Duration::from_secs(9)
            ),
            None
        );
    }

    #[test]
    fn a_short_download_says_nothing_and_a_failure_says_why() {
        let mut l = Lines::new("s");
        let t0 = Instant::now();
        assert_eq!(l.on(&downloading(0), t0), None);
        assert_eq!(
            l.on(
                &AgentState::Ready { version: 2 },
                t0 + Duration::from_secs(1)
            ),
            None
        );
        assert_eq!(l.on(&downloading(0), t0 + Duration::from_secs(10)), None);
        assert!(
            l.on(&downloading(1), t0 + Duration::from_secs(12))
                .is_some()
        );
        let failed = AgentState::Failed {
            version: 1,
            target: 2,
            error: "disk full".into(),
            retry_at: None,
            stale_allowed: false,
        };
        let end = l.on(&failed, t0 + Duration::from_secs(13));
        assert_eq!(
            end.as_deref(),
            Some("download of s version 2 failed after 3 seconds: disk full")
        );
    }
}
