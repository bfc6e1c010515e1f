//! Both programs report a failure the same way: one line on stderr, `error: ` and what went
//! wrong with its causes, each said once, and a failing exit code. (The agent used to print
//! `synchub-agent: ` and repeat an I/O cause; the hub printed `synchub: ` and no causes.)

use anyhow::{Context, ensure};
use std::process::Command;
use synchub_tests::load::HubCommand;

/// Runs the command and returns its exit code and the last line it wrote to stderr.
fn failure(mut command: Command) -> anyhow::Result<(Option<i32>, String)> {
    let out = command
        .env("RUST_LOG", "off")
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    Ok((out.status.code(), last))
}

fn check(program: &str, (code, line): (Option<i32>, String)) -> anyhow::Result<()> {
    ensure!(code == Some(1), "{program} exited with {code:?}: {line}");
    ensure!(line.starts_with("error: "), "{program} printed {line:?}");
    ensure!(
        line.contains("missing.toml"),
        "{program} does not name the file: {line:?}"
    );
    ensure!(
        line.matches("os error 2").count() == 1,
        "{program} says the cause other than once: {line:?}"
    );
    Ok(())
}

#[test]
fn agent_and_hub_print_a_missing_config_file_alike() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.toml");

    let mut agent = Command::new(env!("CARGO_BIN_EXE_synchub-agent"));
    agent.arg("run").arg("--config").arg(&missing);
    check("synchub-agent", failure(agent)?)?;

    let hub = HubCommand::find()?;
    let mut command = Command::new(&hub.program);
    command
        .args(&hub.leading_args)
        .arg("--config")
        .arg(&missing)
        .arg("serve");
    check("synchub", failure(command)?)?;
    Ok(())
}
