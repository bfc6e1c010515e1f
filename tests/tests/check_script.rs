//! `scripts/check`, which `scripts/test` runs before any test, fails on a formatting
//! difference, on a clippy warning and on a rustdoc warning, and passes clean code. It is run
//! on a one-file crate made here, so the check itself is what is tested, in seconds.

use anyhow::{Context, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

const CLEAN: &str =
    "//! A crate.\n\n/// Adds one.\npub fn add_one(x: u32) -> u32 {\n    x + 1\n}\n";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check")
}

/// Makes a crate whose lib.rs is `source` and runs the check in it; true when it passes.
fn check(source: &str) -> anyhow::Result<bool> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("Cargo.toml"),
        "[package]\nname = \"checked\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n",
    )?;
    std::fs::create_dir(dir.path().join("src"))?;
    std::fs::write(dir.path().join("src/lib.rs"), source)?;
    let lock = Command::new("cargo")
        .arg("generate-lockfile")
        .current_dir(dir.path())
        .output()
        .context("running cargo generate-lockfile")?;
    ensure!(
        lock.status.success(),
        "{}",
        String::from_utf8_lossy(&lock.stderr)
    );
    let out = Command::new(script())
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTDOCFLAGS")
        .output()
        .context("running scripts/check")?;
    Ok(out.status.success())
}

#[test]
fn the_check_fails_on_format_clippy_and_doc_warnings() -> anyhow::Result<()> {
    ensure!(check(CLEAN)?, "clean code must pass");
    let unformatted = CLEAN.replace("x + 1", "x+1");
    ensure!(!check(&unformatted)?, "a formatting difference must fail");
    let clippy = CLEAN.replace("x + 1", "let y = x + 1;\n    return y;");
    ensure!(!check(&clippy)?, "a clippy warning must fail");
    let doc = CLEAN.replace("/// Adds one.", "/// Adds one, unlike [`add_two`].");
    ensure!(!check(&doc)?, "a rustdoc warning must fail");
    Ok(())
}
