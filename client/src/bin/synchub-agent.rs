//! `synchub-agent`: runs the sync agent (`run`), publishes files (`publish`), asks a running
//! agent for its state (`status`), checks a data folder against its manifest (`verify`), goes
//! back to an older version (`restore`) and on again (`resume`) and, on Windows, manages the agent's service (`service install|uninstall|start|stop|run`).
//! Configuration layers: defaults < `--config agent.toml` < `SYNCHUB_*` env < flags.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

#[path = "synchub-agent/download_progress.rs"]
mod download_progress;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;
use synchub_client::{AgentConfig, ClientError, ExtraFiles, HubApi, OnFailure, SyncClient};

#[derive(Parser)]
#[command(
    name = "synchub-agent",
    version,
    about = "Keeps a local copy of synchub spaces in sync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until Ctrl-C / SIGTERM.
    Run(RunArgs),
    /// Publish files or folders as one new version.
    Publish(PublishArgs),
    /// Windows: install, uninstall, start or stop the agent's service (`run` is what the
    /// service manager starts; it reads %ProgramData%\synchub\agent.toml).
    #[cfg(windows)]
    Service {
        #[arg(value_enum)]
        action: ServiceAction,
    },
    /// Show the state of the agent running on this PC.
    Status {
        #[arg(long, env = "SYNCHUB_STATUS_LISTEN", default_value = "127.0.0.1:7071")]
        status_listen: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make an older version live on this PC (from a kept tree, the local cache or the hub)
    /// and hold it until `resume`. The agent must be stopped meanwhile.
    Restore {
        #[command(flatten)]
        folder: FolderArgs,
        /// The version to go back to.
        #[arg(long)]
        version: u64,
    },
    /// Let the agent follow the hub again after a `restore` (it syncs to the hub's head).
    Resume {
        #[command(flatten)]
        folder: FolderArgs,
    },
    /// Check a data folder against the manifest of the version it holds.
    Verify {
        #[arg(long, env = "SYNCHUB_DIR")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct HubArgs {
    /// Hub base URL; repeat for several replicas.
    #[arg(long = "hub", env = "SYNCHUB_HUB", value_delimiter = ',')]
    hubs: Vec<String>,
    /// The token itself. Prefer `--token-file` or `SYNCHUB_TOKEN`: any user of the computer can
    /// read a command line in the process list.
    #[arg(long, env = "SYNCHUB_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token (one line; readable by the agent's account only).
    #[arg(long, env = "SYNCHUB_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// PEM file of a private CA that signed the hub's certificate (trusted besides the
    /// system's roots).
    #[arg(long, env = "SYNCHUB_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

impl HubArgs {
    /// The token from `--token`, `SYNCHUB_TOKEN` or the token file, if any was given.
    fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let token = text.trim();
        anyhow::ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "the token file {} must hold one token on one line",
            path.display()
        );
        Ok(Some(token.to_owned()))
    }
}

/// Which agent folder `restore` and `resume` work on: the agent's configuration (on Windows,
/// the service's when present), or flags.
#[derive(Args)]
struct FolderArgs {
    #[command(flatten)]
    hub: HubArgs,
    #[arg(long, env = "SYNCHUB_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "SYNCHUB_DIR")]
    dir: Option<PathBuf>,
    /// The space [default: the only configured one].
    #[arg(long)]
    space: Option<String>,
}

impl FolderArgs {
    /// The agent's configuration with the flags over it, and the space named.
    fn config(&self) -> anyhow::Result<(AgentConfig, String)> {
        #[cfg(windows)]
        let default_config = Some(synchub_client::service::config_path()).filter(|p| p.is_file());
        #[cfg(not(windows))]
        let default_config: Option<PathBuf> = None;
        let mut cfg = match self.config.clone().or(default_config) {
            Some(path) => AgentConfig::from_toml_file(&path)?,
            None => AgentConfig::default(),
        };
        if let Some(t) = self.hub.token()? {
            cfg.token = t;
        }
        if self.hub.ca_cert.is_some() {
            cfg.ca_cert = self.hub.ca_cert.clone();
        }
        if !self.hub.hubs.is_empty() {
            cfg.hubs = self.hub.hubs.clone();
        }
        if let Some(d) = &self.dir {
            cfg.dir = d.clone();
        }
        let configured = cfg.spaces.clone();
        let space = match (&self.space, configured.as_slice()) {
            (Some(s), spaces) if spaces.contains(s) => s.clone(),
            (Some(s), _) if self.config.is_none() => {
                synchub_protocol::validate_space(s)?;
                cfg.spaces = vec![s.clone()];
                s.clone()
            }
            (Some(s), spaces) => bail!("space {s:?} is not configured (configured: {spaces:?})"),
            (None, [one]) => one.clone(),
            (None, spaces) => bail!("name the space with --space (configured: {spaces:?})"),
        };
        Ok((cfg, space))
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    hub: HubArgs,
    #[arg(long = "space", env = "SYNCHUB_SPACE", value_delimiter = ',')]
    spaces: Vec<String>,
    #[arg(long, env = "SYNCHUB_DIR")]
    dir: Option<PathBuf>,
    /// Local API address (loopback); "off" turns it off.
    #[arg(long, env = "SYNCHUB_STATUS_LISTEN")]
    status_listen: Option<String>,
    #[arg(long, env = "SYNCHUB_CONFIG")]
    config: Option<PathBuf>,
    /// remove | keep
    #[arg(long, env = "SYNCHUB_EXTRA_FILES")]
    extra_files: Option<String>,
    /// stay_blocked | unblock_stale
    #[arg(long, env = "SYNCHUB_ON_FAILURE")]
    on_failure: Option<String>,
    /// Previous trees kept beside the live one after a switch (last-good trees).
    #[arg(long, env = "SYNCHUB_KEEP_TREES")]
    keep_trees: Option<usize>,
    /// Use only the HTTP head check (no WebSocket).
    #[arg(long, env = "SYNCHUB_DISABLE_WEBSOCKET")]
    disable_websocket: bool,
    #[arg(long, env = "SYNCHUB_WS_PATH")]
    ws_path: Option<String>,
    #[arg(long, env = "SYNCHUB_FALLBACK_INTERVAL_MS")]
    fallback_interval_ms: Option<u64>,
    #[arg(long, env = "SYNCHUB_USER")]
    user: Option<String>,
    #[arg(long, env = "SYNCHUB_CLIENT_ID")]
    client_id: Option<String>,
    /// Hold only these paths: a glob (`arhiva/Cluj/**`) or a folder prefix; repeat for more.
    #[arg(long = "include")]
    include: Vec<String>,
    /// Two-way folder mode: DIR is the app's own folder; local changes are published and the
    /// hub's versions merged into it in place (see `[two_way]` in the config for the timings
    /// and the mass-change guard).
    #[arg(long, env = "SYNCHUB_TWO_WAY")]
    two_way: bool,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    hub: HubArgs,
    #[arg(long, env = "SYNCHUB_SPACE", default_value = synchub_protocol::DEFAULT_SPACE)]
    space: String,
    /// Folder in the space to publish under.
    #[arg(long)]
    prefix: Option<String>,
    #[arg(long, short)]
    message: Option<String>,
    /// Agent data folder: the report goes through its outbox (sent later if the hub is down).
    #[arg(long, env = "SYNCHUB_DIR")]
    dir: Option<PathBuf>,
    /// Who publishes, for sync_log [default: the computer's login name].
    #[arg(long, env = "SYNCHUB_USER")]
    user: Option<String>,
    /// Make the space (under --prefix) identical to the given folders: files the space has
    /// there and the folders lack are deleted.
    #[arg(long)]
    mirror: bool,
    /// Upload every file's bytes again, even unchanged ones: repairs blobs damaged on the
    /// hub's disk (the hub replaces a stored copy that fails its hash).
    #[arg(long)]
    reupload: bool,
    /// Paths in the space to delete, in the same version (repeat or list several).
    #[arg(long = "delete", value_name = "PATH", num_args = 1..)]
    deletes: Vec<String>,
    /// Files or folders to publish.
    #[arg(required_unless_present = "deletes")]
    paths: Vec<PathBuf>,
}

fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, v: &str) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_owned()))
        .with_context(|| format!("invalid {what} {v:?}"))
}

fn build_config(args: RunArgs) -> anyhow::Result<AgentConfig> {
    let mut cfg = match &args.config {
        Some(path) => AgentConfig::from_toml_file(path)?,
        None => AgentConfig::default(),
    };
    if let Some(t) = args.hub.token()? {
        cfg.token = t;
    }
    if args.hub.ca_cert.is_some() {
        cfg.ca_cert = args.hub.ca_cert.clone();
    }
    if !args.hub.hubs.is_empty() {
        cfg.hubs = args.hub.hubs;
    }
    if !args.spaces.is_empty() {
        cfg.spaces = args.spaces;
    }
    if let Some(d) = args.dir {
        cfg.dir = d;
    }
    if let Some(l) = args.status_listen {
        cfg.status_listen = if l == "off" {
            None
        } else {
            Some(
                l.parse()
                    .with_context(|| format!("invalid --status-listen {l:?}"))?,
            )
        };
    }
    if let Some(v) = args.extra_files {
        cfg.extra_files = parse_enum::<ExtraFiles>("extra_files", &v)?;
    }
    if let Some(v) = args.on_failure {
        cfg.on_failure = parse_enum::<OnFailure>("on_failure", &v)?;
    }
    if let Some(k) = args.keep_trees {
        cfg.keep_trees = k;
    }
    if args.disable_websocket {
        cfg.disable_websocket = true;
    }
    if let Some(p) = args.ws_path {
        cfg.ws_path = p;
    }
    if let Some(ms) = args.fallback_interval_ms {
        cfg.fallback_interval_ms = ms;
    }
    if args.user.is_some() {
        cfg.user = args.user;
    }
    if args.client_id.is_some() {
        cfg.client_id = args.client_id;
    }
    if !args.include.is_empty() {
        cfg.include = args.include;
    }
    if args.two_way {
        cfg.two_way.enabled = true;
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(windows)]
#[derive(Clone, Copy, clap::ValueEnum)]
enum ServiceAction {
    Install,
    Uninstall,
    Start,
    Stop,
    Run,
}

/// The service: logs to daily files (a week kept), the configuration from %ProgramData%, the
/// agent until the service manager says stop.
#[cfg(windows)]
fn service(action: ServiceAction) -> anyhow::Result<()> {
    use synchub_client::service;
    match action {
        ServiceAction::Install => service::install()?,
        ServiceAction::Uninstall => service::uninstall()?,
        ServiceAction::Start => service::start()?,
        ServiceAction::Stop => service::stop()?,
        ServiceAction::Run => {
            let runtime = tokio::runtime::Handle::current();
            let body: service::ServiceBody = Box::new(move |stop| {
                runtime.block_on(async move {
                    // agent.toml when present; the installer's settings arrive as SYNCHUB_*
                    // variables in the service's own environment.
                    let config = service::config_path();
                    let mut argv = vec!["synchub-agent".into(), "run".into()];
                    if config.is_file() {
                        argv.extend(["--config".into(), config.into_os_string()]);
                    }
                    let cli = Cli::try_parse_from::<_, std::ffi::OsString>(argv)
                        .map_err(|e| e.to_string())?;
                    let Command::Run(args) = cli.command else {
                        return Err("unexpected arguments".to_owned());
                    };
                    let cfg = build_config(args).map_err(|e| format!("{e:#}"))?;
                    tracing::info!("configuration:\n{cfg}");
                    let client = SyncClient::start(cfg).await.map_err(|e| e.to_string())?;
                    let _ = stop.await;
                    tracing::info!("stopping");
                    client.shutdown().await;
                    Ok(())
                })
            });
            tokio::task::block_in_place(|| service::run(body))?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    #[cfg(windows)]
    let _log_guard = match &cli.command {
        Command::Service {
            action: ServiceAction::Run,
        } => {
            let files = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .max_log_files(7)
                .filename_prefix("agent")
                .filename_suffix("log")
                .build(synchub_client::service::log_dir());
            match files {
                Ok(files) => {
                    let (writer, guard) = tracing_appender::non_blocking(files);
                    tracing_subscriber::fmt()
                        .with_env_filter(
                            tracing_subscriber::EnvFilter::try_from_default_env()
                                .unwrap_or_else(|_| "info".into()),
                        )
                        .with_writer(writer)
                        .with_ansi(false)
                        .init();
                    Some(guard)
                }
                Err(e) => {
                    eprintln!("error: cannot open the log folder: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    #[cfg(windows)]
    let logging_done = _log_guard.is_some();
    #[cfg(not(windows))]
    let logging_done = false;
    if !logging_done {
        init_stderr_logging();
    }
    let result = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Publish(args) => publish(args).await,
        #[cfg(windows)]
        Command::Service { action } => service(action),
        Command::Status {
            status_listen,
            json,
        } => status(status_listen, json).await,
        Command::Restore { folder, version } => restore(folder, version).await,
        Command::Resume { folder } => resume(folder),
        Command::Verify { dir, json } => verify(dir, json),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on, not a debug dump with a backtrace.
            eprintln!("error: {}", synchub_protocol::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_stderr_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = build_config(args)?;
    tracing::info!("configuration:\n{cfg}");
    let spaces = cfg.spaces.clone();
    let client = SyncClient::start(cfg).await?;
    let progress = download_progress::spawn(&client, &spaces)?;
    shutdown_signal().await;
    tracing::info!("stopping");
    for task in progress {
        task.abort();
    }
    client.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The upload's progress on stderr: a bar on a terminal, else a plain line at most every 2 s
/// and one at the end (logs and CI keep a readable record).
fn upload_progress() -> synchub_client::UploadProgress {
    use std::io::IsTerminal;
    use std::sync::{Arc, Mutex};
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("a valid template"),
        );
        return synchub_client::UploadProgress(Arc::new(move |done, total| {
            bar.set_length(total);
            bar.set_position(done);
            if done >= total {
                bar.finish_and_clear();
            }
        }));
    }
    let last = Mutex::new(Instant::now());
    synchub_client::UploadProgress(Arc::new(move |done, total| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.elapsed() >= std::time::Duration::from_secs(2);
        if total > 0 && done > 0 && (due || done >= total) {
            eprintln!(
                "uploaded {} of {}",
                indicatif::HumanBytes(done),
                indicatif::HumanBytes(total)
            );
            *last = Instant::now();
        }
    }))
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let Some(token) = args.hub.token()? else {
        bail!("no token: pass --token-file FILE or set SYNCHUB_TOKEN");
    };
    if args.hub.hubs.is_empty() {
        bail!("no hub: pass --hub URL");
    }
    let tls = synchub_client::tls_config(args.hub.ca_cert.as_deref())?;
    let api = HubApi::with_options(
        args.hub.hubs,
        &token,
        synchub_client::DEFAULT_READ_TIMEOUT,
        tls,
    )?;
    let started = Instant::now();
    let options = synchub_client::PublishOptions {
        prefix: args.prefix,
        message: args.message,
        mirror: args.mirror,
        deletes: args.deletes,
        reupload: args.reupload,
        progress: Some(upload_progress()),
    };
    let result = synchub_client::publish_with(&api, &args.space, &args.paths, &options).await;
    // Which token published (the hub names it as the version's author) on which computer,
    // and who sat at it: sync_log must say who changed the data.
    let host = host_name();
    let client_id = match &result {
        Ok(o) => match &o.head.by {
            Some(by) if o.files + o.deleted > 0 => format!("publish:{by}@{host}"),
            _ => format!("publish@{host}"),
        },
        Err(_) => format!("publish@{host}"),
    };
    let user = args.user.or_else(login_name);
    let report = synchub_client::upload_report(&client_id, &args.space, user, &result, started);
    match &args.dir {
        Some(dir) => {
            let outbox = synchub_client::Outbox::open(dir.join(".synchub").join("outbox"))?;
            outbox.put(&report)?;
            if let Err(e) = outbox.flush(&api).await {
                eprintln!("report kept in {} for later: {e}", outbox.dir().display());
            }
        }
        None => {
            if let Err(e) = api.report(&report).await {
                eprintln!("warning: could not report the upload to sync_log: {e}");
            }
        }
    }
    match result {
        Ok(o) if o.files == 0 && o.deleted == 0 => {
            println!(
                "nothing to publish: {} file(s) already at version {}{}",
                o.unchanged,
                o.head.version,
                if o.uploaded > 0 {
                    format!("; {} blob(s) uploaded again", o.uploaded)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Ok(o) => {
            println!(
                "published {} file(s), deleted {} ({} blob(s), {} bytes uploaded) as version {}",
                o.files, o.deleted, o.uploaded, o.bytes_uploaded, o.head.version
            );
            Ok(())
        }
        Err(ClientError::Conflict { conflicts, head }) => {
            eprintln!(
                "conflict: version {} changed {} of these path(s) since your base: {}",
                head.map_or(0, |h| h.version),
                conflicts.len(),
                conflicts.join(", ")
            );
            eprintln!(
                "your files were kept as *.conflict-<timestamp> copies beside them; nothing was published"
            );
            std::process::exit(2);
        }
        Err(e) => Err(e.into()),
    }
}

/// This computer's name: `COMPUTERNAME` on Windows, the host name elsewhere.
fn host_name() -> String {
    std::env::var("COMPUTERNAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.len() <= 64)
        .unwrap_or_else(|| "unknown-host".into())
}

/// The login name of the person running the command, where the system says.
fn login_name() -> Option<String> {
    std::env::var("USERNAME")
        .or_else(|_| std::env::var("USER"))
        .ok()
        .filter(|u| !u.is_empty() && u.len() <= 256)
}

async fn status(addr: SocketAddr, json: bool) -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let url = format!("http://{addr}/status");
    let no_agent = || format!("no agent answers at {addr} (is `synchub-agent run` running?)");
    let resp = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(no_agent)?;
    let body: serde_json::Value = resp.json().await.with_context(no_agent)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    print!("{}", summary(&body, chrono::Utc::now()));
    Ok(())
}

/// `synchub-agent status` for a person: the hub link, then per space one line of columns
/// (space, state, version held, hub's version, whether programs may use it) and a sentence
/// saying what is going on and what programs should do.
fn summary(body: &serde_json::Value, now: chrono::DateTime<chrono::Utc>) -> String {
    use std::fmt::Write;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
    let ago = |iso: &serde_json::Value| {
        let at = chrono::DateTime::parse_from_rfc3339(iso.as_str()?).ok()?;
        let secs = (now - at.with_timezone(&chrono::Utc)).num_seconds().max(0);
        let when = at.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S");
        Some(match secs {
            0..=89 => format!("{when} ({secs} s ago)"),
            90..=5399 => format!("{when} ({} min ago)", secs / 60),
            _ => format!("{when} ({} h ago)", secs / 3600),
        })
    };
    let hub = &body["hub"];
    let mut out = String::new();
    let link = if hub["connected"].as_bool() == Some(true) {
        format!("connected ({})", text(&hub["mode"]))
    } else {
        match hub["last_error"].as_str() {
            Some(e) => format!("cannot be reached: {e}"),
            None => format!("not connected ({})", text(&hub["mode"])),
        }
    };
    let _ = writeln!(
        out,
        "client {}  hub {}: {link}",
        text(&body["client_id"]),
        text(&hub["url"])
    );
    for s in body["spaces"].as_array().into_iter().flatten() {
        let usable = s["allows_use"].as_bool() == Some(true);
        let _ = writeln!(
            out,
            "{:<20} {:<14} version {:<6} hub {:<6} {}",
            text(&s["space"]),
            text(&s["state"]),
            s["version"],
            s["hub_version"],
            if usable { "usable" } else { "BLOCKED" },
        );
        let target = num(&s["target"]);
        let what = match s["state"].as_str().unwrap_or("") {
            "ready" => match ago(&s["applied_at"]) {
                Some(t) => format!("Up to date; this data was put in place {t}."),
                None => "Up to date.".to_owned(),
            },
            "starting" => "Comparing the data here with the hub's.".to_owned(),
            "sync_required" => format!("Version {target} is waiting to be downloaded."),
            "downloading" => {
                let (done, total) = (num(&s["bytes_done"]), num(&s["bytes_total"]));
                let pct = (done * 100).checked_div(total).unwrap_or(0);
                let rate = num(&s["bytes_per_sec"]);
                let left = (total.saturating_sub(done))
                    .checked_div(rate)
                    .map(|secs| format!(", about {secs} s left"))
                    .unwrap_or_default();
                format!(
                    "Downloading version {target}: {} of {} MB ({pct}%), {} of {} files{left}.",
                    mb(done),
                    mb(total),
                    num(&s["files_done"]),
                    num(&s["files_total"])
                )
            }
            "verifying" => format!("Checking the files of version {target}."),
            "applying" => format!("Putting version {target} in place."),
            "failed" => {
                let mut t = format!(
                    "The sync to version {target} failed: {}.",
                    text(&s["error"])
                );
                if let Some(at) = s["retry_at"].as_str()
                    && let Ok(at) = chrono::DateTime::parse_from_rfc3339(at)
                {
                    let secs = (at.with_timezone(&chrono::Utc) - now).num_seconds().max(0);
                    let _ = write!(t, " Next try in {secs} s (or `POST /sync` now).");
                }
                t
            }
            other => other.to_owned(),
        };
        let rule = if usable {
            "Programs may use it."
        } else {
            "Programs must wait."
        };
        let _ = writeln!(out, "  {what} {rule}");
        if let Some(r) = s.get("restored").filter(|r| !r.is_null()) {
            let _ = writeln!(
                out,
                "  RESTORED: version {} was restored here ({}) and is held on purpose; newer                  versions wait until `synchub-agent resume`",
                r["version"],
                ago(&r["at"]).unwrap_or_else(|| text(&r["at"]))
            );
        }
        if let Some(h) = s.get("held_change").filter(|h| !h.is_null()) {
            let _ = writeln!(
                out,
                "  HELD: deletes {} and replaces {} of {} files (since {}); waiting for an admin: \
                 synchub approve|reject --space {} --client {}",
                h["deletes"],
                h["replaces"],
                h["total"],
                text(&h["held_at"]),
                text(&s["space"]),
                text(&body["client_id"])
            );
        }
    }
    out
}

async fn restore(folder: FolderArgs, version: u64) -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let (cfg, space) = folder.config()?;
    let mark = synchub_client::restore(&cfg, &space, version).await?;
    let from = match mark.from {
        synchub_client::RestoreSource::KeptTree => "a tree kept on this PC",
        synchub_client::RestoreSource::Cache => "the local cache",
        synchub_client::RestoreSource::Hub => "the hub",
        synchub_client::RestoreSource::Unknown => "?",
    };
    println!(
        "restored version {} of {space} from {from}; the agent holds it and takes no newer          version until `synchub-agent resume`",
        mark.version
    );
    Ok(())
}

fn resume(folder: FolderArgs) -> anyhow::Result<()> {
    let (cfg, space) = folder.config()?;
    match synchub_client::resume(&cfg, &space)? {
        Some(mark) => println!(
            "resumed {space}: the agent follows the hub again (it held restored version {})",
            mark.version
        ),
        None => println!("{space} was not restored: nothing to resume"),
    }
    Ok(())
}

fn verify(dir: PathBuf, json: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let bar = indicatif::ProgressBar::new(0);
    if !std::io::stderr().is_terminal() || json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed}")
            .expect("template"),
    );
    let report = synchub_client::audit_tree(&dir, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("version {} ({})", report.version, &report.data_hash[..12]);
        println!(
            "{:<32} {:>7} {:>9} {:>8} {:>6} {:>10}",
            "folder", "files", "MB", "missing", "extra", "corrupted"
        );
        for (name, f) in &report.folders {
            println!(
                "{:<32} {:>7} {:>9.3} {:>8} {:>6} {:>10}",
                name,
                f.files,
                f.bytes as f64 / 1_000_000.0,
                f.missing,
                f.extra,
                f.corrupted
            );
        }
        for p in &report.missing {
            println!("missing   {p}");
        }
        for p in &report.extra {
            println!("extra     {p}");
        }
        for p in &report.corrupted {
            println!("corrupted {p}");
        }
        println!(
            "{}",
            if report.is_clean() {
                "OK"
            } else {
                "DIFFERENCES FOUND"
            }
        );
    }
    if !report.is_clean() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::summary;

    fn at(iso: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(iso)
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    #[test]
    fn the_status_summary_says_what_is_going_on_in_words() {
        let body = serde_json::json!({
            "client_id": "pc-cluj-01",
            "hub": {"url": "http://hub:7070", "mode": "websocket", "connected": true},
            "spaces": [
                {"space": "global_version", "state": "ready", "version": 2, "hub_version": 2,
                 "allows_use": true, "applied_at": "2026-11-26T10:00:00Z"},
                {"space": "qr", "state": "downloading", "version": 3, "target": 4,
                 "hub_version": 4, "allows_use": false, "bytes_done": 1_200_000,
                 "bytes_total": 4_000_000, "files_done": 2, "files_total": 5,
                 "bytes_per_sec": 700_000},
                {"space": "arhiva", "state": "failed", "version": 1, "target": 2,
                 "hub_version": 2, "allows_use": false, "error": "disk full",
                 "retry_at": "2026-11-26T10:03:12Z"}
            ]
        });
        let text = summary(&body, at("2026-11-26T10:03:00Z"));
        // The first line per space keeps its columns (scripts read them).
        assert!(
            text.lines()
                .any(|l| l.starts_with("global_version       ready          version 2 ")),
            "{text}"
        );
        assert!(
            text.contains("hub http://hub:7070: connected (websocket)"),
            "{text}"
        );
        assert!(text.contains("(3 min ago). Programs may use it."), "{text}");
        assert!(
            text.contains(
                "Downloading version 4: 1.2 of 4.0 MB (30%), 2 of 5 files, about 4 s left. \
                 Programs must wait."
            ),
            "{text}"
        );
        assert!(
            text.contains("The sync to version 2 failed: disk full. Next try in 12 s"),
            "{text}"
        );
        let down = serde_json::json!({
            "client_id": "pc", "spaces": [],
            "hub": {"url": "http://hub:7070", "mode": "fallback", "connected": false,
                    "last_error": "connection refused"},
        });
        assert!(
            summary(&down, at("2026-11-26T10:03:00Z"))
                .contains("hub http://hub:7070: cannot be reached: connection refused")
        );
    }
}
