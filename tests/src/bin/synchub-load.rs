//! `synchub-load`: the benchmark load generator (see BENCHMARKS.md and `scripts/bench/`).
//! Each subcommand is one scenario of [`synchub_tests::load`], run `--runs` times on a fresh
//! hub each time; it prints one line per run and the median (min, max) of every figure, or
//! with `--json` one JSON document on stdout (the lines then go to stderr). Every run has a
//! time limit and the hubs it starts are killed when it ends.
//!
//! `synchub-load hub ARGS...` runs the hub's own command line (`synchub ARGS...`) in this
//! process; the smoke tests use it because cargo builds this binary for them.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use synchub_tests::load::{self, BumpKind, DataSet, Figures, Hub, HubCommand, SpawnOptions};
use synchub_tests::postgres::PgCluster;

/// The generator's allocator. It shares two cores with the hub it measures, so its own CPU
/// is kept down: with glibc's, a herd of 250 KB packs (a read buffer taken per read while the
/// last chunk is still being compared, on 4,096 connections) made the per-thread arenas map
/// and unmap whole heaps, and the page faults and system time around them cost the generator
/// ~1.5 s of CPU per 10,000 agents. Built without transparent huge pages (`no_thp`): with
/// them, clearing 2 MB pages took 42% of the generator's samples. The hub it measures runs as
/// its own program (`SYNCHUB_BIN`) with the system's allocator; only `synchub-load hub` (the
/// smoke tests' hub) runs on this one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "synchub-load",
    about = "Load generator and benchmarks for synchub"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Print one JSON document on stdout (human lines go to stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Repeat the scenario this many times, each on a fresh hub; figures are median (min, max).
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    /// The hub binary [default: $SYNCHUB_BIN, or `synchub` beside this binary].
    #[arg(long, global = true)]
    synchub: Option<std::path::PathBuf>,
    /// Run the hub on a throwaway PostgreSQL cluster instead of SQLite.
    #[arg(long, global = true)]
    postgres: bool,
    /// SQLite: the hub's version-row poll interval (ms) [hub default: 250].
    #[arg(long, global = true)]
    poll_ms: Option<u64>,
    /// More TOML for the hub's configuration file, e.g. `'[limits]\nws_buffer_bytes = 1024'`.
    #[arg(long, global = true)]
    hub_config: Option<String>,
    /// Give up on one run after this many seconds.
    #[arg(long, global = true, default_value_t = 300)]
    run_timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// N agent sockets, R rounds of head bumps; delivery latency and hub memory per socket.
    Fanout(FanoutArgs),
    /// Head checks per second (the agents' 1-second fallback), 304 and 200 answers.
    Fallback(FallbackArgs),
    /// One agent downloads a data set: cold cache, then warm (one file changed).
    Download(DownloadArgs),
    /// Publish the QR-like set (54 folders, 508 files of ~5 KB) as one commit.
    Publish,
    /// PostgreSQL transactions per second with agents connected and idle.
    IdlePg(IdleArgs),
    /// N simulated agents holding the QR set, all syncing at once after a bump of 1 file, of
    /// 50 files, and a force-sync; with `--s3` the hub's blobs are on a moto S3 server.
    Herd(HerdArgs),
    /// The fan-out's floor: a plain loop of one write of a pre-encoded frame per socket to N
    /// loopback sockets, timed and its CPU read like the hub's.
    Floor(FloorArgs),
    /// The fan-out's peer: nginx with the nchan module (started here, on loopback), N
    /// WebSocket subscribers on one channel, one HTTP publish per round.
    Nchan(NchanArgs),
    /// The hub's fan-out, nginx+nchan and the write-loop floor, interleaved: each run measures
    /// the three one after the other (the order turning with each run) and reports the hub's
    /// CPU per frame and time to the last socket over theirs.
    Peers(PeersArgs),
    /// The floor's server side, started by `floor`.
    #[command(hide = true)]
    WriteLoopServer {
        #[arg(long)]
        connections: usize,
    },
    /// The old way, for comparison with `herd`: N clients each read the whole QR set from
    /// PostgreSQL at once, as the desktop app does on a version change.
    OldWay(OldWayArgs),
    /// Run the hub's command line in this process (`synchub-load hub serve ...`).
    #[command(disable_help_flag = true)]
    Hub {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct FanoutArgs {
    /// Sockets to open (repeat or comma-separate for several sizes).
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "1000")]
    connections: Vec<usize>,
    /// Bumps of each kind.
    #[arg(long, short = 'r', default_value_t = 3)]
    rounds: usize,
    /// Kinds of bump: force, commit, sql.
    #[arg(long, value_delimiter = ',', default_value = "force,commit,sql")]
    kinds: Vec<BumpKind>,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Attach to this running hub (`http://HOST:PORT`) instead of starting one.
    #[arg(long, requires = "admin_token")]
    hub: Option<String>,
    /// Admin token of the attached hub (also used by the agent sockets).
    #[arg(long)]
    admin_token: Option<String>,
    /// Pid of the attached hub, to read its memory.
    #[arg(long)]
    hub_pid: Option<u32>,
    /// Database URL of the attached hub, for the outside-UPDATE bump.
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(Args, Debug)]
struct FallbackArgs {
    /// Concurrent keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// Seconds per measurement.
    #[arg(long, short = 'd', default_value_t = 5)]
    duration: u64,
    /// `wrk` (Debian's package) or `builtin` (this process, reqwest).
    #[arg(long, default_value = "wrk")]
    tool: String,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args, Debug)]
struct DownloadArgs {
    /// qr, small, large (repeat or comma-separate).
    #[arg(long, value_delimiter = ',', default_value = "qr,small,large")]
    sets: Vec<String>,
    /// Files of the `small` set.
    #[arg(long, default_value_t = 10_000)]
    small_files: usize,
    /// Size of the `large` set's file, MiB.
    #[arg(long, default_value_t = 1024)]
    large_mib: u64,
}

#[derive(Args, Debug)]
struct IdleArgs {
    #[arg(long, short = 'n', default_value_t = 1000)]
    agents: usize,
    /// Seconds to wait before the first window (statistics reach pg_stat_database late).
    #[arg(long, default_value_t = 11)]
    settle: u64,
    /// Seconds per window; one window per run.
    #[arg(long, default_value_t = 10)]
    window: u64,
}

#[derive(Args, Debug)]
struct HerdArgs {
    /// Simulated agents (repeat or comma-separate for several sizes).
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "1000")]
    agents: Vec<usize>,
    /// Cases: one_file, fifty_files, force.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "one_file,fifty_files,force"
    )]
    cases: Vec<load::HerdCase>,
    /// Keep the hub's blobs in a bucket of a moto S3 server (`pip install 'moto[server]'`).
    #[arg(long)]
    s3: bool,
    /// HTTP requests in flight at once from the whole herd (open files are bounded).
    #[arg(long, default_value_t = 4096)]
    http_connections: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Longest wait for one case, seconds.
    #[arg(long, default_value_t = 120)]
    case_timeout: u64,
    /// Agents wait a random time within the hub's spread hint before a non-forced download,
    /// as the agent does (default: all start at once, the worst case).
    #[arg(long)]
    spread: bool,
}

#[derive(Args, Debug)]
struct FloorArgs {
    /// Sockets (repeat or comma-separate for several sizes).
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "1000")]
    connections: Vec<usize>,
    /// Write loops per run.
    #[arg(long, short = 'r', default_value_t = 3)]
    rounds: usize,
}

#[derive(Args, Debug)]
struct NchanArgs {
    /// Subscribers (repeat or comma-separate for several sizes).
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "1000")]
    connections: Vec<usize>,
    /// Publishes per run.
    #[arg(long, short = 'r', default_value_t = 3)]
    rounds: usize,
    /// nginx worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(Args, Debug)]
struct PeersArgs {
    /// Sockets for each of the three (repeat or comma-separate for several sizes).
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "1000")]
    connections: Vec<usize>,
    /// Force-syncs, publishes and write loops per server and run.
    #[arg(long, short = 'r', default_value_t = 3)]
    rounds: usize,
    /// nginx worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(Args, Debug)]
struct OldWayArgs {
    /// Clients (repeat or comma-separate for several sizes).
    #[arg(long, short = 'n', value_delimiter = ',', default_value = "1000")]
    clients: Vec<usize>,
}

/// What `--json` prints.
#[derive(Serialize)]
struct Output<T: Serialize> {
    scenario: String,
    machine: Machine,
    runs: Vec<T>,
    summary: std::collections::BTreeMap<String, load::Spread>,
}

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    date: String,
    /// `/proc/loadavg`'s 1, 5 and 15 minute figures when the scenario started: the machine
    /// may be shared, and a figure is only as good as it was quiet.
    load_average: String,
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        date: chrono_date(),
        load_average: std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    }
}

fn chrono_date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

struct Printer {
    json: bool,
}

impl Printer {
    fn line(&self, s: impl std::fmt::Display) {
        if self.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Scenario::Hub { args } = &cli.scenario {
        return run_hub(args.clone());
    }
    if let Scenario::WriteLoopServer { connections } = &cli.scenario {
        synchub_hub::server::raise_open_file_limit();
        return match load::write_loop_server(*connections) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("synchub-load write-loop-server: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    synchub_hub::server::raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synchub-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The hub's own `main`, for `synchub-load hub ...`.
fn run_hub(args: Vec<String>) -> std::process::ExitCode {
    use clap::Parser as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = synchub_hub::cli::Cli::parse_from(std::iter::once("synchub".to_owned()).chain(args));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(synchub_hub::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synchub: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn spawn_options(common: &Common) -> Result<SpawnOptions> {
    let command = match &common.synchub {
        Some(p) => HubCommand {
            program: p.clone(),
            leading_args: Vec::new(),
        },
        None => HubCommand::find().or_else(|e| {
            // No synchub beside us: run the hub from this binary.
            let me = std::env::current_exe()?;
            eprintln!("note: {e}; running the hub as `{} hub`", me.display());
            Ok::<_, anyhow::Error>(HubCommand {
                program: me,
                leading_args: vec!["hub".into()],
            })
        })?,
    };
    Ok(SpawnOptions {
        command,
        postgres: common.postgres,
        poll_interval_ms: common.poll_ms,
        extra_config: common.hub_config.clone().map(|s| s.replace("\\n", "\n")),
    })
}

/// Runs `one` `runs` times with a time limit each; prints each run and the summary.
async fn repeat<T, F, Fut>(
    common: &Common,
    scenario: String,
    mut one: F,
    figures: impl Fn(&T) -> Figures,
) -> Result<()>
where
    T: Serialize + std::fmt::Display,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let p = Printer { json: common.json };
    let m = machine();
    p.line(format_args!(
        "# {scenario}: {} run(s); {} cores ({}), {}, load average {}; hub and generator share \
         the machine",
        common.runs, m.nproc, m.cpu, m.date, m.load_average
    ));
    let mut runs = Vec::new();
    let mut figs = Vec::new();
    for i in 0..common.runs.max(1) {
        let limit = Duration::from_secs(common.run_timeout);
        let report = tokio::time::timeout(limit, one(i))
            .await
            .with_context(|| format!("run {} took longer than {limit:?}", i + 1))??;
        p.line(format_args!("run {}: {report}", i + 1));
        figs.push(figures(&report));
        runs.push(report);
    }
    let summary = load::summarize(&figs);
    p.line(format_args!(
        "# {scenario}: median (min, max) over {} run(s)",
        runs.len()
    ));
    for (k, s) in &summary {
        p.line(format_args!(
            "  {k:<28} {:>10.2}  ({:.2}, {:.2})",
            s.median, s.min, s.max
        ));
    }
    if common.json {
        let out = Output {
            scenario,
            machine: m,
            runs,
            summary,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let common = cli.common;
    match cli.scenario {
        Scenario::Fanout(a) => {
            let backend = if a.hub.is_some() {
                "attached"
            } else if common.postgres {
                "postgres"
            } else {
                "sqlite"
            };
            for &n in &a.connections {
                if n > 19_000 {
                    eprintln!(
                        "warning: {n} sockets: one process holds at most ~19,000 here (hard \
                         open-file limit 20,000); raise it with `ulimit -n` / LimitNOFILE"
                    );
                }
                let opts = load::FanoutOptions {
                    connections: n,
                    rounds: a.rounds,
                    connect_concurrency: a.concurrency,
                    kinds: a.kinds.clone(),
                    ..Default::default()
                };
                let spawn = spawn_options(&common)?;
                let attach = a.hub.clone().map(|url| {
                    (
                        url,
                        a.admin_token.clone().unwrap_or_default(),
                        a.hub_pid,
                        a.database_url.clone(),
                    )
                });
                repeat(
                    &common,
                    format!("fanout {backend} {n} connections x {} rounds", a.rounds),
                    |_| {
                        let (opts, spawn, attach) = (opts.clone(), spawn.clone(), attach.clone());
                        async move {
                            let hub = match attach {
                                Some((url, token, pid, db)) => Hub::attach(&url, &token, pid, db),
                                None => Hub::spawn(&spawn).await?,
                            };
                            let r = load::fanout(&hub, &opts).await;
                            let r = r.with_context(|| format!("hub log: {}", hub.log_tail()));
                            hub.stop().await;
                            r
                        }
                    },
                    load::FanoutReport::figures,
                )
                .await?;
            }
        }
        Scenario::Fallback(a) => {
            if a.tool == "wrk" && which("wrk").is_none() {
                bail!(
                    "wrk is not installed: `apt-get install -y wrk` (scripts/bench/fallback does this), or use --tool builtin"
                );
            }
            let spawn = spawn_options(&common)?;
            for not_modified in [true, false] {
                let answer = if not_modified { "304" } else { "200" };
                repeat(
                    &common,
                    format!(
                        "fallback head check, {answer} answers, {} connections, {}",
                        a.connections, a.tool
                    ),
                    |_| {
                        let spawn = spawn.clone();
                        let tool = a.tool.clone();
                        let (c, t, d) = (a.connections, a.threads, Duration::from_secs(a.duration));
                        async move {
                            let hub = Hub::spawn(&spawn).await?;
                            let space = synchub_protocol::DEFAULT_SPACE;
                            let r = if tool == "wrk" {
                                load::fallback_wrk(&hub, space, not_modified, c, t, d).await
                            } else {
                                load::fallback_builtin(&hub, space, not_modified, c, d).await
                            };
                            hub.stop().await;
                            r
                        }
                    },
                    load::FallbackReport::figures,
                )
                .await?;
            }
        }
        Scenario::Download(a) => {
            let spawn = spawn_options(&common)?;
            for name in &a.sets {
                let set = match name.as_str() {
                    "qr" => DataSet::QR,
                    "small" => DataSet::SmallFiles {
                        files: a.small_files,
                    },
                    "large" => DataSet::Large {
                        bytes: a.large_mib << 20,
                    },
                    o => bail!("unknown set {o:?}: use qr, small or large"),
                };
                repeat(
                    &common,
                    format!("download {}", set.name()),
                    |_| {
                        let spawn = spawn.clone();
                        async move {
                            let hub = Hub::spawn(&spawn).await?;
                            let work = tempfile::Builder::new()
                                .prefix("synchub-load-dl-")
                                .tempdir()?;
                            let r = load::download(&hub, set, work.path()).await;
                            hub.stop().await;
                            r
                        }
                    },
                    load::DownloadReport::figures,
                )
                .await?;
            }
        }
        Scenario::Publish => {
            let spawn = spawn_options(&common)?;
            repeat(
                &common,
                "publish qr-508 as one commit".into(),
                |_| {
                    let spawn = spawn.clone();
                    async move {
                        let hub = Hub::spawn(&spawn).await?;
                        let work = tempfile::Builder::new()
                            .prefix("synchub-load-pub-")
                            .tempdir()?;
                        let src = work.path().join("src");
                        let s = src.clone();
                        tokio::task::spawn_blocking(move || load::generate_set(DataSet::QR, &s, 3))
                            .await??;
                        let r = load::publish_set(
                            &hub,
                            synchub_protocol::DEFAULT_SPACE,
                            &src,
                            DataSet::QR,
                        )
                        .await;
                        hub.stop().await;
                        r
                    }
                },
                load::PublishReport::figures,
            )
            .await?;
        }
        Scenario::IdlePg(a) => {
            let mut spawn = spawn_options(&common)?;
            spawn.postgres = true;
            // One hub and one set of sockets; each run is one window.
            let hub = Hub::spawn(&spawn).await?;
            let limit = Duration::from_secs(common.run_timeout);
            let windows = common.runs.max(1);
            let report = tokio::time::timeout(
                limit,
                load::idle_pg(
                    &hub,
                    a.agents,
                    Duration::from_secs(a.settle),
                    Duration::from_secs(a.window),
                    windows,
                ),
            )
            .await
            .context("idle-pg took too long")??;
            hub.stop().await;
            let p = Printer { json: common.json };
            p.line(&report);
            let figs: Vec<Figures> = report
                .windows
                .iter()
                .map(|w| {
                    Figures::from([("transactions_per_sec".to_owned(), w.transactions_per_sec)])
                })
                .collect();
            let summary = load::summarize(&figs);
            for (k, s) in &summary {
                p.line(format_args!(
                    "  {k:<28} {:>10.2}  ({:.2}, {:.2}) over {} windows",
                    s.median, s.min, s.max, s.runs
                ));
            }
            if common.json {
                let out = Output {
                    scenario: format!("idle-pg {} agents", a.agents),
                    machine: machine(),
                    runs: vec![report],
                    summary,
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
        }
        Scenario::Herd(a) => herd(&common, &a).await?,
        Scenario::OldWay(a) => {
            for &n in &a.clients {
                repeat(
                    &common,
                    format!("old way: {n} clients read the QR set from PostgreSQL"),
                    |_| async move {
                        let cluster = tokio::task::spawn_blocking(PgCluster::start).await??;
                        let work = tempfile::Builder::new()
                            .prefix("synchub-load-old-")
                            .tempdir()?;
                        load::old_way(&cluster, n, work.path()).await
                    },
                    load::OldWayReport::figures,
                )
                .await?;
            }
        }
        Scenario::Floor(a) => {
            let me = std::env::current_exe()?;
            for &n in &a.connections {
                repeat(
                    &common,
                    format!("write-loop floor {n} sockets x {} rounds", a.rounds),
                    |_| load::write_loop_floor(me.clone(), n, a.rounds),
                    load::FloorReport::figures,
                )
                .await?;
            }
        }
        Scenario::Nchan(a) => {
            for &n in &a.connections {
                let opts = load::NchanOptions {
                    subscribers: n,
                    rounds: a.rounds,
                    workers: a.workers,
                };
                repeat(
                    &common,
                    format!(
                        "nginx+nchan {n} subscribers x {} rounds, {} worker(s)",
                        a.rounds, a.workers
                    ),
                    |_| load::nchan_fanout(&opts),
                    load::NchanReport::figures,
                )
                .await?;
            }
        }
        Scenario::Peers(a) => {
            let me = std::env::current_exe()?;
            let spawn = spawn_options(&common)?;
            for &n in &a.connections {
                let fanout = load::FanoutOptions {
                    connections: n,
                    rounds: a.rounds,
                    kinds: vec![BumpKind::Force],
                    ..Default::default()
                };
                repeat(
                    &common,
                    format!(
                        "fan-out peers {n} sockets x {} rounds: hub, nginx+nchan ({} worker(s)), \
                         write-loop floor, interleaved",
                        a.rounds, a.workers
                    ),
                    |turn| {
                        let opts = load::PeersOptions {
                            fanout: fanout.clone(),
                            nchan_workers: a.workers,
                            me: me.clone(),
                            turn,
                        };
                        let spawn = spawn.clone();
                        async move { load::peers(&spawn, &opts).await }
                    },
                    load::PeersReport::figures,
                )
                .await?;
            }
        }
        Scenario::Hub { .. } | Scenario::WriteLoopServer { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(())
}

async fn herd(common: &Common, a: &HerdArgs) -> Result<()> {
    let spawn = spawn_options(common)?;
    let backend = match (common.postgres, a.s3) {
        (false, false) => "sqlite+fs",
        (true, false) => "postgres+fs",
        (false, true) => "sqlite+s3",
        (true, true) => "postgres+s3",
    };
    for &n in &a.agents {
        let opts = load::HerdOptions {
            agents: n,
            cases: a.cases.clone(),
            connect_concurrency: a.concurrency,
            http_connections: a.http_connections,
            case_timeout: Duration::from_secs(a.case_timeout),
            spread: a.spread,
            ..Default::default()
        };
        repeat(
            common,
            format!("herd {backend} {n} agents"),
            |_| {
                let (opts, mut spawn) = (opts.clone(), spawn.clone());
                async move {
                    if a.s3 {
                        let bucket = synchub_tests::s3::test_bucket().await?;
                        let extra = spawn.extra_config.take().unwrap_or_default();
                        spawn.extra_config =
                            Some(format!("{}\n{extra}", load::s3_blob_store_config(&bucket)));
                    }
                    let hub = Hub::spawn(&spawn).await?;
                    let work = tempfile::Builder::new()
                        .prefix("synchub-load-herd-")
                        .tempdir()?;
                    let r = load::herd(&hub, &opts, work.path()).await;
                    let r = r.with_context(|| format!("hub log: {}", hub.log_tail()));
                    hub.stop().await;
                    r
                }
            },
            load::HerdReport::figures,
        )
        .await?;
    }
    Ok(())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}
