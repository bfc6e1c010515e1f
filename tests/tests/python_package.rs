//! Runs the Python package's pytest suite (`python/tests`), so the test command covers it:
//! the package against a real hub and agent (the `synchub` and `synchub-agent` programs of
//! this target folder, which `cargo test --workspace` builds), its Tkinter block screen on an
//! Xvfb display, and `mypy --strict`. A missing Python, pytest, Tk, mypy or Xvfb fails the
//! test with how to install it.

use anyhow::{Context, bail, ensure};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A Python 3 that has pytest, tkinter and mypy: `python3` on PATH, else Debian's own.
fn python() -> anyhow::Result<PathBuf> {
    for candidate in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import pytest, tkinter, mypy"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(candidate.into());
        }
    }
    bail!(
        "no python3 with pytest, tkinter and mypy: run scripts/install-test-deps \
         (Debian packages python3-pytest python3-tk python3-mypy xvfb)"
    )
}

/// `target/debug` (or whichever profile folder this test was built into).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary outside a target folder")?
        .to_path_buf();
    for name in ["synchub", "synchub-agent"] {
        ensure!(
            dir.join(name).is_file(),
            "{} is missing: run `cargo build -p synchub-hub -p synchub-client` \
             (scripts/test builds it)",
            dir.join(name).display()
        );
    }
    Ok(dir)
}

#[test]
fn the_python_package_passes_its_tests_against_a_real_hub_and_agent() -> anyhow::Result<()> {
    let python = python()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../python");
    let status = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(&root)
        .env("SYNCHUB_BIN_DIR", bin_dir()?)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .with_context(|| format!("running {} -m pytest", python.display()))?;
    ensure!(
        status.success(),
        "pytest in {} failed: {status}",
        root.display()
    );
    Ok(())
}
