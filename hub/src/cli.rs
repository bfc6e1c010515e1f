//! The `synchub` command line: `init`, `serve`, `token create|list|revoke`, `force-sync`,
//! `rollback`, `import`, `fsck`, `held`, `approve|reject`, `backup`, `restore`. `init` creates a hub's data folder,
//! database and admin token; the others work on an existing hub's database directly, so they run beside a
//! live hub, which notices their changes through its watcher (new heads are broadcast, revoked
//! tokens' sockets closed). They never create a database: one run in the wrong folder would
//! otherwise print a token or a version that the running hub never sees.

use crate::audit::{COMMAND_LINE as CLI, actions};
use crate::config::Config;
use crate::domain::Domain;
use crate::server;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use synchub_protocol::{HeldDecision, Role};

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
    /// Data folder (SQLite database and blobs) [default: ./synchub-hub-data].
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a hub: its data folder, database and an admin token (saved to a file only you
    /// can read); prints where the token is and the dashboard's address.
    Init,
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
    /// Re-hash every stored blob and manifest: report what is corrupt or missing and move
    /// corrupt blobs aside to `quarantine/` (never deleted). Exits with 1 when anything is
    /// wrong.
    Fsck {
        /// Only report; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete the version records retention lets go (`[retention]`), the blobs no kept
    /// version names (older than `[gc] grace_secs`) and old `sync_log` rows; prints what was
    /// (or, with --dry-run, would be) freed.
    Gc {
        /// Only count what would be freed; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Expire only this space's versions (blobs are shared: every space's kept versions
        /// protect theirs).
        #[arg(long)]
        space: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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
    /// Announce a new version with the data of an earlier one to every agent, as forced.
    Rollback {
        /// Space to roll back [default: global_version].
        #[arg(long, default_value = synchub_protocol::DEFAULT_SPACE)]
        space: String,
        /// The version whose data the new version gets.
        #[arg(long)]
        to_version: u64,
        /// Shown to agents and kept in the version history.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Copy an existing bucket folder (s3://bucket/prefix) into a space as one new version.
    Import(crate::sources::ImportArgs),
    /// List the local mass changes agents in two-way mode hold for approval.
    Held {
        #[arg(long)]
        json: bool,
    },
    /// Let an agent publish the mass change it holds.
    Approve(HeldArgs),
    /// The newest admin actions (who, what, to what, when, from where), newest first.
    Audit {
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Make an agent put back the files of the mass change it holds.
    Reject(HeldArgs),
    /// Back the hub up (database records and the blobs its versions name) into a folder or
    /// s3://bucket/prefix; blobs already there are not copied again. Runs beside a live hub.
    Backup {
        /// A folder or s3://bucket/prefix [default: `[backup] to` of the config].
        #[arg(long)]
        to: Option<String>,
        /// List the complete backups there instead of making one.
        #[arg(long)]
        list: bool,
        /// After the backup, keep only the newest N complete backups (older ones, and blobs
        /// only they name, are deleted).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
        /// Print the report (or the list) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild an empty hub (new data folder, or empty database and blob store) from a
    /// backup; run it before `synchub serve`.
    Restore {
        /// A folder or s3://bucket/prefix [default: `[backup] to` of the config].
        #[arg(long)]
        from: Option<String>,
        /// The backup to restore (as `synchub backup --list` shows it) [default: the newest].
        #[arg(long)]
        backup: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which held change.
#[derive(Args, Debug)]
pub struct HeldArgs {
    #[arg(long, default_value = synchub_protocol::DEFAULT_SPACE)]
    pub space: String,
    /// The agent's client id (as `synchub held` lists it).
    #[arg(long)]
    pub client: String,
}

#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Create a token and print its secret (alone, on stdout); it is not shown again.
    Create {
        /// The token's name (also `--name NAME`); one token per PC keeps its reports apart.
        #[arg(required_unless_present = "name_flag", conflicts_with = "name_flag")]
        name: Option<String>,
        #[arg(long = "name", id = "name_flag", hide = true)]
        name_flag: Option<String>,
        /// What it may do: read (sync), publish (also commit) or admin. `--role` is the old
        /// spelling, and `agent` the old word for publish.
        #[arg(long = "can", alias = "role", value_parser = parse_role, default_value = "read")]
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

/// Where the admin token made by `init` (or a first `serve`) is saved.
pub fn admin_token_path(config: &Config) -> PathBuf {
    config.data_dir.join("admin-token")
}

/// Saves a new admin token's secret to [`admin_token_path`], readable by its owner only, and
/// returns the path. Written to a temporary file and renamed, so the file is whole or absent.
fn save_admin_token(config: &Config, secret: &str) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    use std::io::Write;
    let path = admin_token_path(config);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&config.data_dir)?;
        // tempfile creates the file with mode 0600 on Unix.
        let mut file = tempfile::NamedTempFile::new_in(&config.data_dir)?;
        writeln!(file, "{secret}")?;
        file.as_file().sync_all()?;
        file.persist(&path).map_err(|e| e.error)?;
        Ok(())
    };
    write().with_context(|| format!("cannot save the admin token to {}", path.display()))?;
    Ok(path)
}

/// The dashboard's address for a hub listening on `addr` (a wildcard address is reached on
/// loopback from the hub's own machine).
fn dashboard_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("http://{}/", SocketAddr::new(ip, addr.port()))
}

/// `path` made absolute for messages, so "where it looked" is clear whatever the folder.
fn shown(path: &std::path::Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// Refuses to go on when the SQLite database the configuration names does not exist: opening
/// it would create a new, empty hub that the running one never sees.
fn require_database(config: &Config) -> anyhow::Result<()> {
    if let Some(path) = config.sqlite_path()
        && !path.exists()
    {
        anyhow::bail!(
            "no hub database at {}; run this in the folder the hub runs in, or pass the hub's \
             --data-dir, --database-url or --config (create a new hub with `synchub init`)",
            shown(&path)
        );
    }
    Ok(())
}

/// Prints the first-start lines: where the admin token is and the dashboard's address. Not
/// println!: a closed stdout (`synchub serve | head`) must not stop a running hub.
fn print_first_start(token_file: &std::path::Path, addr: SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(
        std::io::stdout(),
        "\nAdmin token (named \"admin\"), readable only by you: {}\n\
         Dashboard: {}  (paste the admin token when it asks)\n",
        shown(token_file),
        dashboard_url(addr)
    )
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Init => init(&common).await,
        Command::Serve { listen } => serve(&common, listen).await,
        Command::Token { action } => token(&common, action).await,
        Command::Import(args) => import(&common, args).await,
        Command::ForceSync { space, reason } => force_sync(&common, space, reason).await,
        Command::Fsck { dry_run, json } => fsck(&common, dry_run, json).await,
        Command::Gc {
            dry_run,
            space,
            json,
        } => gc(&common, crate::gc::GcOptions { dry_run, space }, json).await,
        Command::Rollback {
            space,
            to_version,
            reason,
        } => rollback(&common, space, to_version, reason).await,
        Command::Held { json } => held(&common, json).await,
        Command::Approve(args) => decide(&common, args, HeldDecision::Approved).await,
        Command::Reject(args) => decide(&common, args, HeldDecision::Rejected).await,
        Command::Audit { limit, json } => audit(&common, limit, json).await,
        Command::Backup {
            to,
            list,
            keep,
            json,
        } => backup(&common, to, list, keep, json).await,
        Command::Restore { from, backup, json } => restore(&common, from, backup, json).await,
    }
}

/// `synchub init`: a new hub and its admin token, unless one exists.
async fn init(common: &Common) -> anyhow::Result<()> {
    let config = load_config(common)?;
    if let Some(path) = config.sqlite_path()
        && path.exists()
    {
        println!(
            "A hub database exists already at {}; start it with `synchub serve`.",
            shown(&path)
        );
        return Ok(());
    }
    let (store, _) = server::open_parts(&config).await?;
    if !store.tokens().await?.is_empty() {
        println!(
            "The hub database at {} has tokens already; start it with `synchub serve`.",
            crate::config::mask_url_password(&config.database_url())
        );
        return Ok(());
    }
    let secret = crate::auth::create_token(store.as_ref(), "admin", Role::Admin, None).await?;
    let token_file = save_admin_token(&config, &secret)?;
    println!("Created a hub in {}.", shown(&config.data_dir));
    print_first_start(&token_file, config.listen)?;
    println!("Start it with `synchub serve` (same folder or --data-dir).");
    Ok(())
}

/// `synchub serve`: runs the hub until a signal.
async fn serve(common: &Common, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let mut config = load_config(common)?;
    if let Some(l) = listen {
        config.listen = l;
    }
    tracing::info!("configuration:\n{}", config.masked());
    let hub = server::start(config).await.map_err(with_advice)?;
    if let Some(secret) = &hub.initial_admin_token {
        let shown = save_admin_token(&hub.state.config, secret)
            .map_err(std::io::Error::other)
            .and_then(|file| print_first_start(&file, hub.addr));
        if let Err(e) = shown {
            tracing::warn!(
                error = %e,
                "could not save or print the new admin token; create another with `synchub token create NAME --can admin`"
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

/// `synchub token …`, on an existing hub's database.
async fn token(common: &Common, action: TokenAction) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let store = crate::store::open(&config.database_url()).await?;
    match action {
        TokenAction::Create {
            name,
            name_flag,
            role,
            spaces,
        } => {
            let name = name.or(name_flag).unwrap_or_default();
            anyhow::ensure!(
                !name.is_empty() && name.len() <= 128,
                "token name must be 1 to 128 bytes"
            );
            for s in &spaces {
                synchub_protocol::validate_space(s)?;
            }
            let spaces = (!spaces.is_empty()).then_some(spaces.as_slice());
            let secret = crate::auth::create_token(store.as_ref(), &name, role, spaces).await?;
            let target = format!("{name} ({})", role.as_str());
            let peer = crate::audit::Peer(None);
            crate::audit::record(store.as_ref(), CLI, actions::TOKEN_CREATE, &target, peer).await;
            println!("{secret}");
        }
        TokenAction::List { json } => print_tokens(store.tokens().await?, json)?,
        TokenAction::Revoke { name } => {
            anyhow::ensure!(
                store.revoke_token(&name).await?,
                "no live token named {name:?}"
            );
            let peer = crate::audit::Peer(None);
            crate::audit::record(store.as_ref(), CLI, actions::TOKEN_REVOKE, &name, peer).await;
            eprintln!(
                "revoked {name:?}; a running hub closes its connections within a poll interval"
            );
        }
    }
    Ok(())
}

/// Prints `tokens` as a table, or as JSON with `json`.
fn print_tokens(tokens: Vec<crate::store::TokenRecord>, json: bool) -> anyhow::Result<()> {
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
            "{:<24} {:<7} {:<8} {:<26} SPACES",
            "NAME", "CAN", "STATE", "CREATED"
        );
        for t in tokens {
            println!(
                "{:<24} {:<7} {:<8} {:<26} {}",
                t.name,
                t.role.as_str(),
                if t.revoked { "revoked" } else { "live" },
                t.created_at,
                t.spaces.map_or("(all)".into(), |s| s.join(","))
            );
        }
    }
    Ok(())
}

/// `synchub import`: a bucket folder into a space, as one new version.
async fn import(common: &Common, args: crate::sources::ImportArgs) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let source = args.source()?;
    let domain = Domain::open_existing(config).await?;
    let head = crate::sources::import(&domain, &source).await?;
    println!("{} is now at version {}", head.space, head.version);
    Ok(())
}

/// `synchub force-sync`, on an existing hub's data.
async fn force_sync(common: &Common, space: String, reason: Option<String>) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let domain = Domain::open_existing(config).await?;
    let head = crate::versions::force(&domain, &space, reason, CLI).await?;
    let target = format!("{space} v{}", head.version);
    audit_cli(&domain, actions::FORCE_SYNC, &target).await;
    println!("{space} is now at version {} (forced)", head.version);
    Ok(())
}

/// `synchub rollback`, on an existing hub's data.
async fn rollback(
    common: &Common,
    space: String,
    to_version: u64,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let domain = Domain::open_existing(config).await?;
    let head = crate::versions::rollback(&domain, &space, to_version, reason, CLI).await?;
    let target = format!("{space} v{} (data of v{to_version})", head.version);
    audit_cli(&domain, actions::ROLLBACK, &target).await;
    println!(
        "{space} is now at version {} with the data of version {to_version} (forced)",
        head.version
    );
    Ok(())
}

async fn fsck(common: &Common, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let (store, blobs) = server::open_existing_parts(&config).await?;
    let report = crate::fsck::fsck(store.as_ref(), blobs.as_ref(), !dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_fsck(&report);
    }
    anyhow::ensure!(
        report.is_clean(),
        "{} corrupt blob(s), {} damaged version(s)",
        report.corrupt.len(),
        report.damaged_versions.len()
    );
    Ok(())
}

/// `synchub gc`, on an existing hub's data (the hub may be running).
async fn gc(common: &Common, options: crate::gc::GcOptions, json: bool) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let domain = Domain::open_existing(config).await?;
    if let Some(space) = &options.space {
        anyhow::ensure!(
            domain.store.head(space).await?.is_some(),
            "no space named {space:?}"
        );
    }
    let report = crate::gc::collect(&domain, &options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let (verb, would) = if report.dry_run {
        ("would free", "would expire")
    } else {
        ("freed", "expired")
    };
    for (space, versions) in &report.expired_versions {
        println!("{space}: {would} {} version(s)", versions.len());
    }
    println!(
        "{verb} {} blob(s), {} bytes; kept {} unreferenced blob(s) younger than the grace period",
        report.blobs_freed, report.bytes_freed, report.young_unreferenced
    );
    if report.spared > 0 {
        println!(
            "{} blob(s) named again while the sweep waited: kept",
            report.spared
        );
    }
    match report.sync_log_rows_deleted {
        Some(n) => println!("deleted {n} old sync_log row(s)"),
        None => println!("sync_log rows are not counted in a dry run"),
    }
    Ok(())
}

/// `synchub held`: the held changes and their decisions.
async fn held(common: &Common, json: bool) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let domain = Domain::open_existing(config).await?;
    let held = crate::held::list(&domain).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&held)?);
        return Ok(());
    }
    if held.is_empty() {
        println!("no held changes");
        return Ok(());
    }
    println!(
        "{:<20} {:<36} {:<9} {:>8} {:>8} {:>8}  HELD AT",
        "SPACE", "CLIENT", "DECISION", "DELETES", "REPLACES", "FILES"
    );
    for h in held {
        println!(
            "{:<20} {:<36} {:<9} {:>8} {:>8} {:>8}  {}",
            h.space,
            h.client_id,
            h.decision.as_str(),
            h.change.deletes,
            h.change.replaces,
            h.change.total,
            h.change.held_at
        );
    }
    Ok(())
}

/// `synchub approve|reject`: records the decision; the agent acts on it at its next check.
async fn decide(common: &Common, args: HeldArgs, decision: HeldDecision) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let domain = Domain::open_existing(config).await?;
    crate::held::decide(&domain, &args.space, &args.client, decision, CLI).await?;
    let action = match decision {
        HeldDecision::Approved => actions::HELD_APPROVE,
        _ => actions::HELD_REJECT,
    };
    audit_cli(&domain, action, &format!("{}/{}", args.space, args.client)).await;
    println!(
        "{} {}'s held change in {}; the agent acts on it within a few seconds",
        decision.as_str(),
        args.client,
        args.space
    );
    Ok(())
}

/// Records an admin action made on the command line.
async fn audit_cli(domain: &Domain, action: &str, target: &str) {
    let peer = crate::audit::Peer(None);
    crate::audit::record(domain.store.as_ref(), CLI, action, target, peer).await;
}

/// `synchub audit`: the newest admin actions.
async fn audit(common: &Common, limit: u32, json: bool) -> anyhow::Result<()> {
    let config = load_config(common)?;
    require_database(&config)?;
    let store = crate::store::open(&config.database_url()).await?;
    let entries = store.audit(limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<24} {:<13} {:<16} TARGET",
        "WHEN", "WHO", "ACTION", "FROM"
    );
    for e in entries {
        println!(
            "{:<24} {:<24} {:<13} {:<16} {}",
            e.at,
            e.who,
            e.action,
            e.from.as_deref().unwrap_or("-"),
            e.target
        );
    }
    Ok(())
}

/// The backup place `given` on the command line, else the configuration's `[backup] to`.
fn backup_place(config: &Config, given: Option<String>, flag: &str) -> anyhow::Result<String> {
    given.or_else(|| config.backup.to.clone()).ok_or_else(|| {
        anyhow::anyhow!(
            "say where backups are: {flag} DIR|s3://bucket/prefix, or `[backup] to` in the config"
        )
    })
}

/// A progress line on stderr while blobs are copied, when stderr is a terminal and the
/// output is not JSON; hidden otherwise.
fn blob_progress(json: bool) -> indicatif::ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} blobs {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn show_progress(bar: &indicatif::ProgressBar, p: &crate::backup::Progress) {
    bar.set_length(p.blobs_total);
    bar.set_position(p.copied + p.skipped);
    bar.set_message(format!(
        "(copied {}, {} bytes; already there {})",
        p.copied, p.copied_bytes, p.skipped
    ));
}

/// `synchub backup`: one backup (or, with --list, the complete ones), beside a live hub.
async fn backup(
    common: &Common,
    to: Option<String>,
    list: bool,
    keep: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    use crate::backup::{self, target::Target, target::TargetSpec};
    let config = load_config(common)?;
    let place = backup_place(&config, to, "--to")?;
    let spec = TargetSpec::parse(&place).map_err(anyhow::Error::msg)?;
    if list {
        let target = Target::open(&spec, &config, false)?;
        let complete = backup::list(&target).await?;
        let summaries: Vec<backup::BackupSummary> = complete.iter().map(Into::into).collect();
        if json {
            println!("{}", serde_json::to_string_pretty(&summaries)?);
            return Ok(());
        }
        println!(
            "{:<24} {:<24} {:>8} {:>8} {:>14}  HEADS",
            "ID", "TAKEN AT", "VERSIONS", "BLOBS", "BYTES"
        );
        for s in summaries {
            let heads: Vec<String> = s
                .spaces
                .iter()
                .map(|h| format!("{} v{}", h.space, h.version))
                .collect();
            println!(
                "{:<24} {:<24} {:>8} {:>8} {:>14}  {}",
                s.id,
                s.taken_at,
                s.versions,
                s.blob_count,
                s.blob_bytes,
                heads.join(", ")
            );
        }
        return Ok(());
    }
    require_database(&config)?;
    let target = Target::open(&spec, &config, true)?;
    let domain = Domain::open_existing(config).await?;
    let bar = blob_progress(json);
    let report = backup::run(&domain, &target, keep, &|p| show_progress(&bar, p)).await;
    bar.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "backup {} in {}: {} version(s), {} blob(s) ({} bytes); copied {} blob(s) ({} bytes), \
         {} already there",
        report.id,
        report.target,
        report.versions,
        report.blob_count,
        report.blob_bytes,
        report.copied,
        report.copied_bytes,
        report.skipped
    );
    if let Some(pruned) = &report.pruned {
        println!(
            "pruned {} older backup(s) and {} blob(s) ({} bytes) no kept backup names",
            pruned.backups.len(),
            pruned.blobs,
            pruned.bytes
        );
    }
    Ok(())
}

/// `synchub restore`: an empty hub rebuilt from a backup.
async fn restore(
    common: &Common,
    from: Option<String>,
    id: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let config = load_config(common)?;
    let place = backup_place(&config, from, "--from")?;
    let bar = blob_progress(json);
    let report = crate::backup::restore::restore(&config, &place, id.as_deref(), &|p| {
        show_progress(&bar, p)
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "restored backup {} (taken {}): {} version(s), {} record(s), {} blob(s) copied ({} \
         bytes)",
        report.backup,
        report.taken_at,
        report.versions,
        report.records,
        report.blobs.copied,
        report.blobs.copied_bytes
    );
    for head in &report.spaces {
        println!("{} is at version {}", head.space, head.version);
    }
    println!("start the hub with `synchub serve`");
    Ok(())
}

fn print_fsck(report: &crate::fsck::FsckReport) {
    println!(
        "checked {} blob(s) ({} bytes) and {} manifest(s)",
        report.blobs_checked, report.bytes_checked, report.manifests_checked
    );
    for c in &report.corrupt {
        match &c.quarantined_to {
            Some(to) => println!(
                "corrupt blob {} (hashes to {}): moved to {to}",
                c.sha256, c.actual
            ),
            None => println!("corrupt blob {} (hashes to {})", c.sha256, c.actual),
        }
    }
    for d in &report.damaged_versions {
        println!("{} version {}: {}", d.space, d.version, d.problem);
    }
    if !report.damaged_versions.is_empty() {
        println!(
            "re-publish the files of a damaged version (synchub-agent publish --reupload) to \
             restore their blobs"
        );
    }
}

/// Adds what to do to start-up errors whose fix is not obvious from the cause alone.
fn with_advice(e: server::StartError) -> anyhow::Error {
    match e {
        server::StartError::Bind { addr, source }
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            anyhow::anyhow!(
                "cannot listen on {addr}: another program (another hub?) listens there; stop it \
                 or pass --listen with a free address"
            )
        }
        e => e.into(),
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
