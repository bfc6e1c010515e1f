//! The `synchub` binary as an admin uses it: `serve` on the embedded default, `token`
//! create/list/revoke, `force-sync` beside a running hub, and its errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn synchub(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_synchub"));
    c.env("RUST_LOG", "info").env_remove("SYNCHUB_CONFIG");
    c.arg("--data-dir").arg(dir);
    c
}

fn run(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = synchub(dir).args(args).output().expect("run synchub");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `synchub serve` process, killed on drop.
struct Served {
    child: Child,
    url: String,
    stdout: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `synchub serve` on a free port and waits for the address it logs. The guard exists
/// before the wait, so the hub is killed even when the address never shows.
fn spawn_serve(dir: &std::path::Path, stdout: Stdio) -> Served {
    let child = synchub(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start synchub serve");
    let mut served = Served {
        child,
        url: String::new(),
        stdout: String::new(),
    };
    let stderr = served.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("addr=") {
                let addr: String = line[i + 5..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("hub did not log its address");
    served.url = format!("http://{addr}");
    served
}

/// Runs a hub until it listens, stops it, and keeps what it printed on stdout.
fn serve(dir: &std::path::Path) -> Served {
    let mut served = spawn_serve(dir, Stdio::piped());
    // The first-start banner is printed right before the listening log line.
    std::thread::sleep(Duration::from_millis(200));
    let _ = served.child.kill();
    let _ = served.child.wait();
    let mut out = String::new();
    use std::io::Read;
    served
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    served.stdout = out;
    served
}

#[test]
fn first_start_prints_an_admin_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = serve(dir.path());
    assert!(first.url.starts_with("http://127.0.0.1:"));
    assert!(first.stdout.contains("admin token"), "{}", first.stdout);
    assert!(first.stdout.contains("shb_"));
    let second = serve(dir.path());
    assert!(
        !second.stdout.contains("shb_"),
        "token printed twice: {}",
        second.stdout
    );
}

#[test]
fn token_create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(
        dir.path(),
        &[
            "token", "create", "--name", "pc-01", "--role", "agent", "--space", "qr",
        ],
    );
    assert!(ok, "{err}");
    let secret = out.trim();
    assert!(
        secret.starts_with("shb_") && !secret.contains(char::is_whitespace),
        "stdout must be the token alone: {out:?}"
    );
    let (ok, out, _) = run(dir.path(), &["token", "list"]);
    assert!(ok);
    assert!(out.contains("pc-01") && out.contains("agent") && out.contains("qr"));
    assert!(!out.contains(secret), "list must never show secrets");
    let (ok, _, err) = run(
        dir.path(),
        &["token", "create", "--name", "pc-01", "--role", "agent"],
    );
    assert!(!ok, "duplicate name accepted");
    assert!(err.contains("pc-01"), "{err}");
    let (ok, _, err) = run(
        dir.path(),
        &["token", "create", "--name", "x", "--role", "root"],
    );
    assert!(!ok);
    assert!(err.contains("root"), "{err}");
    let (ok, _, err) = run(
        dir.path(),
        &[
            "token", "create", "--name", "x", "--role", "agent", "--space", "../etc",
        ],
    );
    assert!(!ok);
    assert!(err.contains("space"), "{err}");
    let (ok, _, _) = run(dir.path(), &["token", "revoke", "pc-01"]);
    assert!(ok);
    let (ok, out, _) = run(dir.path(), &["token", "list", "--json"]);
    assert!(ok);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["revoked"], true);
    let (ok, _, err) = run(dir.path(), &["token", "revoke", "pc-01"]);
    assert!(!ok, "revoking twice succeeded");
    assert!(err.contains("no live token"), "{err}");
}

#[test]
fn force_sync_beside_a_running_hub() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, _) = run(
        dir.path(),
        &["token", "create", "--name", "pc", "--role", "agent"],
    );
    assert!(ok);
    let token = out.trim().to_owned();
    let guard = spawn_serve(dir.path(), Stdio::null());
    let (ok, out, err) = run(dir.path(), &["force-sync", "--reason", "fix"]);
    assert!(ok, "{err}");
    assert!(out.contains("version 2"), "{out}");
    synchub_hub::blobs::s3::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let head: serde_json::Value = rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{}/api/v1/spaces/global_version/head", guard.url))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        });
        if head["version"] == 2 {
            assert_eq!(head["forced"], true);
            assert_eq!(head["reason"], "fix");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "running hub did not see the CLI's force-sync: {head}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = run(dir.path(), &["force-sync", "--space", "nope"]);
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hub.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let (ok, _, err) = run(dir.path(), &["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("lisen"), "{err}");
    let (ok, _, err) = run(dir.path(), &["serve", "--config", "/nonexistent/hub.toml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/hub.toml"), "{err}");
}

#[test]
fn an_unreachable_database_says_why_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on a port we just bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://hub:secret@127.0.0.1:{port}/synchub");
    let started = Instant::now();
    let (ok, _, err) = run(dir.path(), &["--database-url", &url, "token", "list"]);
    assert!(!ok);
    assert!(err.contains("Connection refused"), "{err}");
    assert_eq!(
        err.matches("database error").count(),
        1,
        "cause repeated: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
