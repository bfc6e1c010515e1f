//! The name of a conflict copy: when this PC and another changed the same file, the hub's
//! version takes the file's name and this PC's is kept beside it as
//! `name.conflict-<host>-<UTC time>.ext`, which is then published like any new file. The name
//! depends only on the path, the host and the time, so it says where the copy came from.

use chrono::{DateTime, Utc};
use synchub_protocol::validate_path;

/// Longest host part of a conflict name.
const HOST_MAX: usize = 32;

/// `dir/name.ext` -> `dir/name.conflict-<host>-<YYYYMMDD-HHMMSS>.ext`; `n > 1` adds `-n`
/// (a second conflict on the same file within a second). A name that would be too long keeps
/// a shorter stem.
pub(crate) fn conflict_name(rel: &str, host: &str, at: DateTime<Utc>, n: u32) -> String {
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(HOST_MAX)
        .collect();
    let host = if host.is_empty() {
        "pc".to_owned()
    } else {
        host
    };
    let stamp = at.format("%Y%m%d-%H%M%S");
    let tag = if n > 1 {
        format!("conflict-{host}-{stamp}-{n}")
    } else {
        format!("conflict-{host}-{stamp}")
    };
    let (dir, file) = match rel.rsplit_once('/') {
        Some((d, f)) => (Some(d), f),
        None => (None, rel),
    };
    let (stem, ext) = match file.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, Some(e)),
        _ => (file, None),
    };
    let build = |stem: &str| {
        let name = match ext {
            Some(e) => format!("{stem}.{tag}.{e}"),
            None => format!("{stem}.{tag}"),
        };
        match dir {
            Some(d) => format!("{d}/{name}"),
            None => name,
        }
    };
    let mut stem: String = stem.to_owned();
    let mut out = build(&stem);
    while validate_path(&out).is_err() && !stem.is_empty() {
        stem.pop();
        out = build(&stem);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn names_carry_host_and_time_and_stay_valid() {
        let at = Utc.with_ymd_and_hms(2026, 11, 26, 10, 15, 0).unwrap();
        assert_eq!(
            conflict_name("04313-F/QR_0001.png", "PC-Cluj 2", at, 1),
            "04313-F/QR_0001.conflict-PC-Cluj_2-20261126-101500.png"
        );
        assert_eq!(
            conflict_name("README", "pc", at, 2),
            "README.conflict-pc-20261126-101500-2"
        );
        assert_eq!(
            conflict_name(".synchubignore", "", at, 1),
            ".synchubignore.conflict-pc-20261126-101500"
        );
        let long = format!("d/{}.png", "x".repeat(175));
        let name = conflict_name(&long, "pc", at, 1);
        assert!(validate_path(&name).is_ok(), "{name}");
        assert!(name.ends_with(".conflict-pc-20261126-101500.png"), "{name}");
    }
}
