//! The pack stream: many blobs in one HTTP response, so that a snapshot of 500 small files costs
//! one round trip instead of 500.
//!
//! The agent asks `POST /api/v1/blobs/pack` with a [`crate::BlobList`]; the hub answers with,
//! for every requested blob in order, a header line `<sha256> <size>\n` followed by exactly
//! `size` bytes. The reader checks each blob's hash itself; a stream that ends early is truncated.
//!
//! A pack may travel compressed (`Content-Encoding: zstd` or `gzip`, when the request's
//! `Accept-Encoding` allows it); the agent asks so only for packs of files
//! [`worth_compressing`], and hashes are always of the decoded bytes.

use crate::hash::Sha256Hex;

/// Content type of a pack response.
pub const PACK_CONTENT_TYPE: &str = "application/vnd.synchub.pack";

/// The header line that precedes a blob's bytes in a pack.
pub fn encode_header(sha256: &Sha256Hex, size: u64) -> String {
    format!("{sha256} {size}\n")
}

/// Extensions of formats that are compressed already (images, archives, media, office files):
/// compressing them again costs hub CPU and saves next to nothing.
const COMPRESSED_ALREADY: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "webp", "avif", "heic", "zip", "gz", "tgz", "zst", "xz", "bz2",
    "7z", "rar", "jar", "mp3", "mp4", "m4a", "mov", "avi", "mkv", "webm", "ogg", "docx", "xlsx",
    "pptx", "odt", "ods", "woff2",
];

/// Whether a file at `path` is worth compressing on the way (JSON, text, databases, ...): by
/// its extension, which is all the agent knows before it has the bytes.
pub fn worth_compressing(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.rsplit_once('.') {
        Some((_, ext)) => !COMPRESSED_ALREADY
            .iter()
            .any(|known| known.eq_ignore_ascii_case(ext)),
        None => true,
    }
}

/// Longest header line: 64 hex, a space, up to 20 digits, a line break.
pub const MAX_HEADER_LEN: usize = 64 + 1 + 20 + 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed pack header {0:?}")]
pub struct PackHeaderError(pub String);

/// Parses one header line (with or without its line break), only in the form
/// [`encode_header`] writes: a size with a sign or leading zeros is malformed.
pub fn parse_header(line: &[u8]) -> Result<(Sha256Hex, u64), PackHeaderError> {
    let bad = || PackHeaderError(String::from_utf8_lossy(line).chars().take(100).collect());
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let (hash, size) = text.split_once(' ').ok_or_else(bad)?;
    let hash = hash.parse().map_err(|_| bad())?;
    let canonical =
        size.bytes().all(|b| b.is_ascii_digit()) && (size == "0" || !size.starts_with('0'));
    if !canonical {
        return Err(bad());
    }
    let size = size.parse().map_err(|_| bad())?;
    Ok((hash, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Sha256Hex::of(b"x");
        let line = encode_header(&h, 42);
        assert!(line.len() <= MAX_HEADER_LEN);
        assert_eq!(parse_header(line.as_bytes()).unwrap(), (h.clone(), 42));
        assert!(parse_header(b"zz 1\n").is_err());
        let hash = format!("{h}");
        for size in ["+7", "007", "-1", "", " 7", "18446744073709551616"] {
            assert!(
                parse_header(format!("{hash} {size}\n").as_bytes()).is_err(),
                "{size:?}"
            );
        }
        assert!(parse_header(b"").is_err());
    }

    #[test]
    fn compressed_formats_are_not_worth_compressing() {
        for path in [
            "arhiva/2026.json",
            "notes.txt",
            "db/catalog.sqlite",
            "Makefile",
            "a.b/c",
        ] {
            assert!(worth_compressing(path), "{path}");
        }
        for path in [
            "04320-11149-F/qr_0003.png",
            "poza.JPG",
            "backup.zip",
            "x/y.tar.gz",
        ] {
            assert!(!worth_compressing(path), "{path}");
        }
    }
}
