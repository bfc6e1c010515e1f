//! Validation of the relative paths a manifest names, shared by hub and agent so that a path
//! one side accepts is one the other can write on Linux, macOS and Windows alike.

/// Longest accepted path, in UTF-16 code units (what Windows counts). An agent's tree path is
/// `DIR\.synchub\trees\<version>-<hash8>-<suffix>\` followed by this path; at most 180 units
/// leave about 80 for that prefix, so a program that is not long-path aware still stays under
/// Windows' `MAX_PATH` (260) with a `DIR` of up to ~28 characters such as `D:\synchub\qr`.
pub const MAX_PATH_LEN: usize = 180;
/// Longest accepted path segment, in bytes.
pub const MAX_SEGMENT_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error(
        "path {0:?} is longer than {MAX_PATH_LEN} characters (UTF-16 units, as Windows counts)"
    )]
    TooLong(String),
    #[error("path {0:?} is absolute; paths are relative to the space")]
    Absolute(String),
    #[error("path {0:?} has an empty, '.' or '..' segment")]
    BadSegment(String),
    #[error("path {0:?} contains a backslash; use '/'")]
    Backslash(String),
    #[error("path {0:?} contains a control or reserved character")]
    BadCharacter(String),
    #[error(
        "path {0:?} contains an invisible character (a bidirectional control or a zero-width \
         character) that makes it look like another name"
    )]
    InvisibleCharacter(String),
    #[error("path {0:?} uses a name Windows reserves (CON, NUL, COM1, CONIN$, ...)")]
    ReservedName(String),
    #[error("path {0:?} has a segment ending in '.' or ' '")]
    TrailingDotOrSpace(String),
    #[error("path {0:?} has a segment longer than {MAX_SEGMENT_LEN} bytes")]
    SegmentTooLong(String),
    #[error("invalid space name {0:?}: use 1-64 ASCII letters, digits, '_', '-' or '.'")]
    InvalidSpace(String),
}

/// Device names Windows opens instead of a file, whatever the extension. `COM`/`LPT` take a
/// digit 0-9 or a superscript ¹ ² ³ (Windows counts those as digits here too).
const RESERVED: [&str; 6] = ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"];
const RESERVED_PORTS: [&str; 2] = ["COM", "LPT"];

/// Characters that change how a name is shown without being seen: bidirectional controls
/// (U+202E makes `exe.txt` read as `txt.exe`) and zero-width ones (two names that look the
/// same). No file name an office uses needs them.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{FEFF}')
}

fn is_reserved(stem: &str) -> bool {
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(stem)) {
        return true;
    }
    RESERVED_PORTS.iter().any(|port| {
        stem.get(..3)
            .is_some_and(|head| head.eq_ignore_ascii_case(port))
            && matches!(
                &stem[3..],
                "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "¹" | "²" | "³"
            )
    })
}

/// Accepts a relative, `/`-separated path that is safe to create under a folder on any OS.
pub fn validate_path(path: &str) -> Result<(), PathError> {
    let shown = || path.chars().take(120).collect::<String>();
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN && path.encode_utf16().nth(MAX_PATH_LEN).is_some() {
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
        if is_invisible(c) {
            return Err(PathError::InvisibleCharacter(shown()));
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
        if is_reserved(stem) {
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
        let max_len = format!("{}/{}", "ș".repeat(100), "ș".repeat(MAX_PATH_LEN - 101));
        for ok in [
            "a",
            "Brașov/Școala_2026.json",
            "arhiva/Cluj/Liceul_2026-11-25_14-30-00.json",
            "04313-11100-F/qr_0001.png",
            "Y129120-01780/x.png",
            ".hidden/file",
            "CONSOLE/x",
            "日本/ファイル.txt",
            "COM10",
            "LPT",
            "COM⁴",
            "CONIN",
            max_len.as_str(),
        ] {
            assert_eq!(validate_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_hostile_paths() {
        let long_segment = "a".repeat(256);
        let long_path = format!("{}/x", "abcdefgh/".repeat(120));
        // Near the old 1024-byte bound: with DIR\.synchub\trees\... in front it passes
        // Windows' MAX_PATH.
        let windows_long = format!("{}/file.png", "folder_12345678/".repeat(12));
        let one_over = format!("{}/{}", "ș".repeat(100), "ș".repeat(MAX_PATH_LEN - 100));
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
            "CONIN$",
            "a/conout$.txt",
            "COM0",
            "lpt0.txt",
            "COM¹",
            "x/LPT³.log",
            "COM² .txt",
            "conin$.log",
            "CONOUT$ .txt",
            "invoice\u{202E}gpj.exe",
            "a\u{202A}b",
            "a\u{2066}b",
            "a\u{200F}b",
            "zero\u{200B}width",
            "a\u{200D}b",
            "\u{FEFF}bom.txt",
            "soft\u{00AD}hyphen",
            "word\u{2060}joiner",
            "dir./x",
            "dir /x",
            "a|b",
            "a*b",
            long_segment.as_str(),
            long_path.as_str(),
            windows_long.as_str(),
            one_over.as_str(),
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
