//! Everything a peer sends is parsed by this crate: the manifest parser, the pack header reader,
//! frame decoding and path validation must answer any bytes with a value or an error, never a
//! panic, and whatever they accept must hold what the hub and agent rely on. Random input plus
//! seeds that were once trouble (u64 wraps, bidi controls, device names, huge lengths).

use proptest::prelude::*;

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

mod fuzz_checks;

fn check_all(bytes: &[u8]) {
    fuzz_checks::all(bytes);
}

#[test]
fn seeds() {
    for seed in SEEDS {
        check_all(seed.as_bytes());
    }
}

/// The fuzz targets' seed corpora (`fuzz/seeds/TARGET/`), and whatever a fuzz run found and
/// was kept there: each file through every check.
#[test]
fn fuzz_seed_corpora() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let mut files = 0;
    for target in std::fs::read_dir(&seeds).expect("fuzz/seeds exists") {
        for file in std::fs::read_dir(target.expect("entry").path()).expect("a target folder") {
            let bytes = std::fs::read(file.expect("entry").path()).expect("a seed file");
            check_all(&bytes);
            files += 1;
        }
    }
    assert!(files >= 4 * SEEDS.len(), "only {files} seed files");
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
