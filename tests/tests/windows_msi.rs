//! The Windows installer builds on Linux with wixl (deploy/windows/build-msi) and holds what an
//! admin pushing it to many PCs relies on: the exe, an automatic service running `service run`,
//! the service's settings from the HUB_URL, TOKEN and SPACE properties, and a refusal to install
//! without a hub and a token.

use anyhow::{Context, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

fn msiinfo_export(msi: &Path, table: &str) -> anyhow::Result<String> {
    let out = Command::new("msiinfo")
        .args(["export"])
        .arg(msi)
        .arg(table)
        .output()
        .context("msiinfo is missing: run scripts/install-test-deps (apt-get install msitools)")?;
    ensure!(out.status.success(), "msiinfo export {table} failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn msi_builds_with_wixl_and_installs_exe_service_and_settings() -> anyhow::Result<()> {
    let debug_exe = synchub_tests::fixtures::windows_agent_exe()?;
    let out_dir = tempfile::tempdir()?;
    // The debug build without its symbols (175 MB -> ~28 MB), as a release build ships: wixl
    // compresses the whole file, seconds instead of a minute.
    let exe = out_dir.path().join("synchub-agent.exe");
    let strip = Command::new("x86_64-w64-mingw32-strip")
        .arg("-o")
        .arg(&exe)
        .arg(&debug_exe)
        .status()
        .context("x86_64-w64-mingw32-strip is missing: run scripts/install-test-deps")?;
    ensure!(strip.success(), "stripping {} failed", debug_exe.display());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let build = Command::new(root.join("deploy/windows/build-msi"))
        .arg(&exe)
        .env("CARGO_TARGET_DIR", out_dir.path())
        .output()
        .context("running deploy/windows/build-msi")?;
    ensure!(
        build.status.success(),
        "build-msi failed (wixl missing? run scripts/install-test-deps): {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let msi = PathBuf::from(String::from_utf8(build.stdout)?.trim());
    ensure!(msi.is_file(), "no MSI at {}", msi.display());

    let files = msiinfo_export(&msi, "File")?;
    ensure!(files.contains("synchub-agent.exe"), "File table:\n{files}");
    let size = std::fs::metadata(&exe)?.len().to_string();
    ensure!(files.contains(&size), "the exe is packed whole:\n{files}");

    let service = msiinfo_export(&msi, "ServiceInstall")?;
    let row = service
        .lines()
        .find(|l| l.contains("synchub-agent\t"))
        .context(format!("no service:\n{service}"))?;
    let cols: Vec<&str> = row.split('\t').collect();
    // Name, DisplayName, ServiceType (16: own process), StartType (2: automatic), ..., Arguments
    ensure!(
        cols[3] == "16" && cols[4] == "2",
        "own-process automatic service: {row}"
    );
    ensure!(
        row.contains("\tservice run\t"),
        "the service runs `service run`: {row}"
    );

    let registry = msiinfo_export(&msi, "Registry")?;
    for setting in [
        "SYNCHUB_HUB=[HUB_URL]",
        "SYNCHUB_TOKEN=[TOKEN]",
        "SYNCHUB_SPACE=[SPACE]",
        "SYNCHUB_DIR=[CommonAppDataFolder]synchub\\data",
        "Services\\synchub-agent\tEnvironment",
    ] {
        ensure!(registry.contains(setting), "{setting} missing:\n{registry}");
    }
    let conditions = msiinfo_export(&msi, "LaunchCondition")?;
    ensure!(
        conditions.contains("HUB_URL AND TOKEN"),
        "installing without a hub and a token is refused:\n{conditions}"
    );
    let properties = msiinfo_export(&msi, "Property")?;
    ensure!(properties.contains("SPACE\tglobal_version"), "{properties}");
    Ok(())
}
