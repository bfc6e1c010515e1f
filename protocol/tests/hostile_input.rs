//! Everything a peer sends is parsed by this crate: the manifest parser, the pack header reader,
//! frame decoding and path validation must answer any bytes with a value or an error, never a
//! panic, and whatever they accept must hold what the hub and agent rely on. Random input plus
//! seeds that were once trouble (u64 wraps, bidi controls, device names, huge lengths).

use proptest::prelude::*;
use synchub_protocol::{AgentFrame, HubFrame, Manifest, pack, validate_path};

/// Inputs that broke, or nearly broke, a parser once; every property below also runs on them.
const SEEDS: &[&str] = &[
    "",
    "\n",
    "a\t0\te3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n",
    "a\t18446744073709551615\te3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n",
    "a\t-1\tzz\n",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 18446744073709551616\n",
    "invoice\u{202E}gpj.exe",
    "zero\u{200B}width",
    "COM¹",
    "CONIN$",
    "a/../b",
    "{\"type\":\"hello\",\"protocol\":1,\"client_id\":\"x\",\"spaces\":[]}",
    "{\"type\":\"report\",\"report_id\":\"\",\"client_id\":\"\",\"space\":\"\",\"sync_type\":\"download\",\"status\":\"failed\"}",
    "{\"type\":\"status\",\"space\":\"s\",\"state\":\"failed\",\"version\":18446744073709551615,\"target\":0,\"error\":\"\",\"retry_at\":null}",
    "{\"type\":\"sync_required\",\"space\":\"s\",\"version\":1,\"data_hash\":\"00\",\"forced\":false,\"at\":\"\"}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

fn check_all(bytes: &[u8]) {
    // Manifest: accepted ones re-encode to the same bytes, and every path is valid.
    if let Ok(m) = Manifest::from_canonical(bytes, 1000) {
        assert_eq!(m.canonical_bytes(), bytes);
        for e in m.entries() {
            assert_eq!(validate_path(&e.path), Ok(()));
        }
    }
    // Pack header: an accepted one encodes back to the same line.
    if let Ok((hash, size)) = pack::parse_header(bytes) {
        assert_eq!(pack::encode_header(&hash, size).as_bytes(), bytes);
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        // Frames: decoding and bounds never panic.
        if let Ok(mut frame) = serde_json::from_str::<AgentFrame>(text) {
            let _ = frame.check_bounds();
        }
        let _ = serde_json::from_str::<HubFrame>(text);
        // Paths: an accepted path has no invisible or control character.
        if validate_path(text).is_ok() {
            assert!(
                !text
                    .chars()
                    .any(|c| c.is_control() || c == '\u{202E}' || c == '\u{200B}')
            );
        }
    }
}

#[test]
fn seeds() {
    for seed in SEEDS {
        check_all(seed.as_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_all(&bytes);
    }

    #[test]
    fn arbitrary_text(text in "\\PC{0,120}") {
        check_all(text.as_bytes());
    }

    #[test]
    fn seeds_mutated(seed in proptest::sample::select(SEEDS), at in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = seed.as_bytes().to_vec();
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = byte;
        }
        check_all(&bytes);
    }
}
