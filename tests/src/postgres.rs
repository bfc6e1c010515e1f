//! Throwaway PostgreSQL clusters for integration tests: `initdb` + `pg_ctl` in a temporary
//! folder, listening on 127.0.0.1 and a free port, `fsync=off`. No mocks: the store and the hub
//! talk to a real server.
//!
//! One shared cluster per test process ([`PgCluster::shared`], [`test_database`] hands out a
//! fresh database on it per test); a test that stops or restarts the server starts a private
//! one ([`PgCluster::start`]) so that it does not disturb tests running beside it. Every
//! cluster is watched by a small shell loop that stops it and deletes its folder when the test
//! process exits, however it exits (a `static` never drops).

use anyhow::{Context, Result, anyhow, bail};
use sqlx::Connection;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const NOT_FOUND: &str = "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: \
     install them with `apt-get install -y postgresql` (scripts/test does this)";

/// A running PostgreSQL cluster owned by this test process.
pub struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// `initdb` refuses root: as root, every server command runs as the `postgres` user.
    as_postgres: bool,
}

/// A URL of a fresh, empty database on this process's shared cluster.
pub async fn test_database() -> Result<String> {
    tokio::task::spawn_blocking(|| PgCluster::shared().map(|_| ()))
        .await
        .context("starting PostgreSQL panicked")??;
    PgCluster::shared()?.create_database().await
}

impl PgCluster {
    /// The cluster shared by every test of this process, started on first use.
    pub fn shared() -> Result<&'static PgCluster> {
        static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| PgCluster::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// Starts a private cluster, stopped when this value drops (or the process exits).
    pub fn start() -> Result<PgCluster> {
        let bin = find_binaries()?;
        let as_postgres = std::fs::metadata("/proc/self")?.uid() == 0;
        let dir = std::env::temp_dir().join(format!(
            "synchub-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = PgCluster {
            bin,
            dir,
            port: 0,
            as_postgres,
        };
        if as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cluster.dir))?;
        }
        cluster.spawn_watchdog()?;
        let data = cluster.data();
        run(cluster
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data))
        .context("initdb failed")?;
        // A port can be taken between probing and binding (tests run in parallel processes).
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("PostgreSQL did not start")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` on this cluster (user `postgres`, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new empty database and returns its URL.
    pub async fn create_database(&self) -> Result<String> {
        let name = format!("synchub_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .with_context(|| format!("connecting to PostgreSQL on port {}", self.port))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(self.url(&name))
    }

    /// Stops the server at once (`-m immediate`: clients see their connections drop).
    pub fn stop(&self) -> Result<()> {
        run(self.command("pg_ctl").arg("-D").arg(self.data()).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]))
        .context("pg_ctl stop failed")
    }

    /// Starts the server again on the same port, after [`PgCluster::stop`].
    pub fn start_again(&self) -> Result<()> {
        self.start_server()
    }

    /// Stops and starts the server; returns once it accepts connections again.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn start_server(&self) -> Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off \
             -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        let started = run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(["-o", &options, "-w", "-t", "30", "start"]));
        started.with_context(|| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            format!(
                "pg_ctl start failed on port {}; server log ends with:\n{}",
                self.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    /// A server binary, run as `postgres` when this process is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Stops the cluster and deletes its folder once this process is gone. Its own session
    /// and no inherited output, so that it neither dies with the test's process group nor
    /// keeps the test runner waiting on a pipe.
    fn spawn_watchdog(&self) -> Result<()> {
        let stop = format!(
            "{}{} -D {} -m immediate stop",
            if self.as_postgres {
                "runuser -u postgres -- "
            } else {
                ""
            },
            self.bin.join("pg_ctl").display(),
            self.data().display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the PostgreSQL watchdog (setsid sh)")?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest `/usr/lib/postgresql/N/bin` that has `initdb` and `pg_ctl`.
fn find_binaries() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let entries = std::fs::read_dir(root).map_err(|_| anyhow!(NOT_FOUND))?;
    let newest = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major);
    newest.map(|(_, bin)| bin).ok_or_else(|| anyhow!(NOT_FOUND))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a command to completion; its output goes to the error on failure. Output is read from
/// files, not pipes: a server a command starts must not hold our pipes open.
fn run(command: &mut Command) -> Result<()> {
    let out = tempfile::tempfile()?;
    let status = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?)
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        use std::io::{Read, Seek};
        let mut out = out;
        let mut text = String::new();
        out.rewind()?;
        out.read_to_string(&mut text)?;
        bail!("{command:?} exited with {status}: {}", text.trim());
    }
    Ok(())
}

/// System 1's two tables exactly as its desktop app created them, before any hub ran (no rows:
/// tests add their own).
pub const SYSTEM1_TABLES: &str = "
CREATE TABLE sync_metadata (
    id SERIAL PRIMARY KEY,
    sync_key TEXT UNIQUE NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    data_hash TEXT,
    last_modified_by TEXT,
    last_modified_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ DEFAULT now()
);
CREATE TABLE sync_log (
    id SERIAL PRIMARY KEY,
    discord_id TEXT,
    sync_type TEXT,
    status TEXT,
    items_synced INTEGER,
    error_message TEXT,
    synced_at TIMESTAMPTZ DEFAULT now(),
    created_at TIMESTAMPTZ DEFAULT now()
);
";

/// System 1's data tables as its desktop app created them (no rows: tests add their own). The
/// app downloads them whole on every version change.
pub const SYSTEM1_DATA_TABLES: &str = "
CREATE TABLE cities (
    id SERIAL PRIMARY KEY,
    name TEXT NOT NULL
);
CREATE TABLE institutions (
    id SERIAL PRIMARY KEY,
    city_id INTEGER NOT NULL REFERENCES cities (id),
    name TEXT NOT NULL
);
CREATE TABLE employees (
    id SERIAL PRIMARY KEY,
    institution_id INTEGER NOT NULL REFERENCES institutions (id),
    name TEXT NOT NULL,
    score NUMERIC(6, 2),
    active BOOLEAN NOT NULL DEFAULT true
);
";
