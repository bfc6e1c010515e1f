//! The `synchub` binary: parse the command line, set up logging, call into the library.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use clap::Parser;
use synchub_hub::cli::{Cli, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The same style as synchub-agent: `error: ` and the causes, each once.
            eprintln!("error: {}", synchub_protocol::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
