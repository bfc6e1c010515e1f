//! Validation of the relative paths a manifest names, shared by hub and agent so that a path
//! one side accepts is one the other can write on Linux, macOS and Windows alike.

/// Longest accepted path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest accepted path segment, in bytes.
pub const MAX_SEGMENT_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path {0:?} is longer than {MAX_PATH_LEN} bytes")]
    TooLong(String),
    #[error("path {0:?} is absolute; paths are relative to the space")]
    Absolute(String),
    #[error("path {0:?} has an empty, '.' or '..' segment")]
    BadSegment(String),
    #[error("path {0:?} contains a backslash; use '/'")]
    Backslash(String),
    #[error("path {0:?} contains a control or reserved character")]
    BadCharacter(String),
    #[error("path {0:?} uses a name Windows reserves (CON, NUL, COM1, ...)")]
    ReservedName(String),
    #[error("path {0:?} has a segment ending in '.' or ' '")]
    TrailingDotOrSpace(String),
    #[error("path {0:?} has a segment longer than {MAX_SEGMENT_LEN} bytes")]
    SegmentTooLong(String),
    #[error("invalid space name {0:?}: use 1-64 ASCII letters, digits, '_', '-' or '.'")]
    InvalidSpace(String),
}

const RESERVED: [&str; 22] = [
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// Accepts a relative, `/`-separated path that is safe to create under a folder on any OS.
pub fn validate_path(path: &str) -> Result<(), PathError> {
    let shown = || path.chars().take(120).collect::<String>();
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(shown()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(shown()));
    }
    if path.contains('\\') {
        return Err(PathError::Backslash(shown()));
    }
    let bytes = path.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(PathError::Absolute(shown()));
    }
    for c in path.chars() {
        if c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') {
            return Err(PathError::BadCharacter(shown()));
        }
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(PathError::BadSegment(shown()));
        }
        if segment.len() > MAX_SEGMENT_LEN {
            return Err(PathError::SegmentTooLong(shown()));
        }
        if segment.ends_with('.') || segment.ends_with(' ') {
            return Err(PathError::TrailingDotOrSpace(shown()));
        }
        let stem = segment.split('.').next().unwrap_or(segment).trim_end();
        if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(stem)) {
            return Err(PathError::ReservedName(shown()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_non_ascii_paths() {
        for ok in [
            "a",
            "Brașov/Școala_2026.json",
            "arhiva/Cluj/Liceul_2026-11-25_14-30-00.json",
            "04313-11100-F/qr_0001.png",
            "Y129120-01780/x.png",
            ".hidden/file",
            "CONSOLE/x",
            "日本/ファイル.txt",
        ] {
            assert_eq!(validate_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_hostile_paths() {
        let long_segment = "a".repeat(256);
        let long_path = format!("{}/x", "abcdefgh/".repeat(120));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "C:/Windows",
            "c:x",
            "a\0b",
            "a\nb",
            "a/CON",
            "nul.txt",
            "com1",
            "Lpt9.log",
            "dir./x",
            "dir /x",
            "a|b",
            "a*b",
            long_segment.as_str(),
            long_path.as_str(),
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn space_names() {
        assert!(crate::validate_space("global_version").is_ok());
        assert!(crate::validate_space("qr-codes.v2").is_ok());
        for bad in ["", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(crate::validate_space(bad).is_err(), "{bad:?}");
        }
    }
}
