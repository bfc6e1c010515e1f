//! What each fuzz target checks, shared by the cargo-fuzz targets in `fuzz/` (which include
//! this file) and the property tests of the normal suite (`hostile_input.rs`), so the
//! corpora the fuzzer finds run here too. Each takes any bytes: it must not panic, and
//! whatever the parser accepts must hold what the hub and agent rely on.

use synchub_protocol::{AgentFrame, HubFrame, Manifest, pack, validate_path};

/// Manifest parser: an accepted manifest re-encodes to the same bytes (one manifest, one
/// hash), and every path in it is valid.
pub fn manifest(bytes: &[u8]) {
    if let Ok(m) = Manifest::from_canonical(bytes, 1000) {
        assert_eq!(m.canonical_bytes(), bytes);
        for e in m.entries() {
            assert_eq!(validate_path(&e.path), Ok(()));
        }
    }
}

/// Pack reader: a header line is accepted only in the form the hub writes it (with or without
/// its line break), so it encodes back to the same line.
pub fn pack_header(bytes: &[u8]) {
    if let Ok((hash, size)) = pack::parse_header(bytes) {
        let line = pack::encode_header(&hash, size);
        let line = line.as_bytes();
        assert!(
            line == bytes || &line[..line.len() - 1] == bytes,
            "{bytes:?}"
        );
        assert!(line.len() <= pack::MAX_HEADER_LEN);
    }
}

/// Frame decoding: agent frames decode and get their bounds checked without panicking, and a
/// decoded frame of either side encodes to JSON that decodes to the same frame.
pub fn frame(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(mut frame) = serde_json::from_str::<AgentFrame>(text) {
        let _ = frame.check_bounds();
        let again: AgentFrame =
            serde_json::from_str(&serde_json::to_string(&frame).expect("encodes"))
                .expect("decodes");
        assert_eq!(again, frame);
    }
    if let Ok(frame) = serde_json::from_str::<HubFrame>(text) {
        let again: HubFrame =
            serde_json::from_str(&serde_json::to_string(&frame).expect("encodes"))
                .expect("decodes");
        assert_eq!(again, frame);
    }
}

/// Path validation: an accepted path has no control, bidi or zero-width character, and no
/// `.`/`..` or empty component.
pub fn path(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if validate_path(text).is_ok() {
        assert!(
            !text.chars().any(|c| c.is_control()
                || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200B}'..='\u{200F}')),
            "{text:?}"
        );
        assert!(
            text.split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
            "{text:?}"
        );
    }
}

/// Every check on the same bytes.
pub fn all(bytes: &[u8]) {
    manifest(bytes);
    pack_header(bytes);
    frame(bytes);
    path(bytes);
}
