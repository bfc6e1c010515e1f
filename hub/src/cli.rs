//! The `synchub` command line: `serve`, `token create|list|revoke`, `force-sync`, `import`. Commands
//! other than `serve` work on the database directly, so they run beside a live hub; the hub
//! notices their changes through its watcher (new heads are broadcast, revoked tokens' sockets
//! closed).

use crate::config::Config;
use crate::server;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use synchub_protocol::Role;

#[derive(Parser, Debug)]
#[command(name = "synchub", version, about = "Realtime push-based sync hub")]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the hub's data is; shared by every command.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "SYNCHUB_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Data folder (SQLite database and blobs) [default: ./synchub-data].
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the hub.
    Serve {
        /// Address to listen on [default: 127.0.0.1:7070].
        #[arg(long, short = 'l')]
        listen: Option<SocketAddr>,
    },
    /// Manage bearer tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Announce a new version with the same data to every agent, as forced.
    ForceSync {
        /// Space to force [default: global_version].
        #[arg(long, default_value = synchub_protocol::DEFAULT_SPACE)]
        space: String,
        /// Shown to agents and kept in the version history.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Copy an existing bucket folder (s3://bucket/prefix) into a space as one new version.
    Import(crate::sources::ImportArgs),
}

#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Create a token and print its secret (alone, on stdout); it is not shown again.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Limit the token to this space (repeat for several); default all spaces.
        #[arg(long = "space")]
        spaces: Vec<String>,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name; its live connections are closed.
    Revoke { name: String },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// Defaults, then the file, then the environment, then flags.
pub fn load_config(common: &Common) -> anyhow::Result<Config> {
    let mut config = Config::load(common.config.as_deref())?;
    config.apply_env()?;
    if let Some(d) = &common.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(u) = &common.database_url {
        config.database_url = Some(u.clone());
    }
    config.validate()?;
    Ok(config)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Serve { listen } => {
            let mut config = load_config(&common)?;
            if let Some(l) = listen {
                config.listen = l;
            }
            tracing::info!("configuration:\n{}", config.masked());
            let hub = server::start(config).await?;
            if let Some(secret) = &hub.initial_admin_token {
                // Not println!: a closed stdout (`synchub serve | head`) must not stop a
                // running hub. The log says where to look if this line is lost.
                use std::io::Write;
                let shown = writeln!(
                    std::io::stdout(),
                    "\nThis hub had no tokens, so it created an admin token named \"admin\".\n\
                     It is shown only this once; keep it safe:\n\n    {secret}\n"
                );
                if shown.is_err() {
                    tracing::warn!(
                        "could not print the new admin token; create another with `synchub token create --role admin`"
                    );
                }
            }
            let stop = hub.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: closing sockets with \"going away\"");
                stop.cancel();
            });
            hub.wait().await;
            Ok(())
        }
        Command::Token { action } => {
            let config = load_config(&common)?;
            let (store, _) = server::open_parts(&config).await?;
            match action {
                TokenAction::Create { name, role, spaces } => {
                    anyhow::ensure!(
                        !name.is_empty() && name.len() <= 128,
                        "token name must be 1 to 128 bytes"
                    );
                    for s in &spaces {
                        synchub_protocol::validate_space(s)?;
                    }
                    let spaces = (!spaces.is_empty()).then_some(spaces.as_slice());
                    let secret =
                        crate::auth::create_token(store.as_ref(), &name, role, spaces).await?;
                    println!("{secret}");
                }
                TokenAction::List { json } => {
                    let tokens = store.tokens().await?;
                    if json {
                        let rows: Vec<_> = tokens
                            .iter()
                            .map(|t| {
                                serde_json::json!({
                                    "name": t.name, "role": t.role, "spaces": t.spaces,
                                    "created_at": t.created_at, "revoked": t.revoked,
                                })
                            })
                            .collect();
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        println!(
                            "{:<24} {:<6} {:<8} {:<26} SPACES",
                            "NAME", "ROLE", "STATE", "CREATED"
                        );
                        for t in tokens {
                            println!(
                                "{:<24} {:<6} {:<8} {:<26} {}",
                                t.name,
                                t.role.as_str(),
                                if t.revoked { "revoked" } else { "live" },
                                t.created_at,
                                t.spaces.map_or("(all)".into(), |s| s.join(","))
                            );
                        }
                    }
                }
                TokenAction::Revoke { name } => {
                    anyhow::ensure!(
                        store.revoke_token(&name).await?,
                        "no live token named {name:?}"
                    );
                    eprintln!(
                        "revoked {name:?}; a running hub closes its connections within a poll interval"
                    );
                }
            }
            Ok(())
        }
        Command::Import(args) => {
            let config = load_config(&common)?;
            let source = args.source()?;
            let state = server::offline_state(config).await?;
            let head = crate::sources::import(&state, &source).await?;
            println!("{} is now at version {}", head.space, head.version);
            Ok(())
        }
        Command::ForceSync { space, reason } => {
            let config = load_config(&common)?;
            let state = server::offline_state(config).await?;
            let head = crate::api::commits::force(&state, &space, reason, "cli")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{space} is now at version {} (forced)", head.version);
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
