//! The `synchub` binary as an admin uses it: `init` and `serve` on the embedded default,
//! `token` create/list/revoke, `force-sync` and `rollback` beside a running hub, `held` and
//! `approve`/`reject` of a two-way agent's held change, and its errors.

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
    output(synchub(dir).args(args))
}

/// Runs `synchub ARGS` in the folder `cwd`, without `--data-dir` (the defaults apply).
fn raw_run(cwd: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_synchub"));
    c.env("RUST_LOG", "info")
        .env_remove("SYNCHUB_CONFIG")
        .env_remove("SYNCHUB_DATA_DIR")
        .env_remove("SYNCHUB_DATABASE_URL")
        .current_dir(cwd)
        .args(args);
    output(&mut c)
}

fn output(c: &mut Command) -> (bool, String, String) {
    let out = c.output().expect("run synchub");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Minimal blocking GETs with a bearer token.
mod http {
    pub fn blocking_status(url: &str, token: &str) -> u16 {
        synchub_hub::blobs::s3::install_crypto_provider();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            ::reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    }

    /// The default space's head as a running hub at `base_url` serves it.
    pub fn blocking_head(base_url: &str, token: &str) -> serde_json::Value {
        synchub_hub::blobs::s3::install_crypto_provider();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            ::reqwest::Client::new()
                .get(format!("{base_url}/api/v1/spaces/global_version/head"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    }
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

/// Creates a hub in `dir` with `synchub init`.
fn init(dir: &std::path::Path) {
    let (ok, out, err) = run(dir, &["init"]);
    assert!(ok, "init failed: {out}{err}");
}

/// The admin token file: its secret, after checking only its owner may read it.
fn admin_token(dir: &std::path::Path) -> String {
    let path = dir.join("admin-token");
    let meta = std::fs::metadata(&path).expect("admin token file");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "{}",
        path.display()
    );
    let secret = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    assert!(secret.starts_with("shb_"), "{secret:?}");
    secret
}

#[test]
fn first_start_saves_the_admin_token_and_shows_the_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let first = serve(dir.path());
    assert!(first.url.starts_with("http://127.0.0.1:"));
    let token_file = dir.path().join("admin-token");
    assert!(
        first.stdout.contains(&token_file.display().to_string()),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains(&format!("{}/", first.url)),
        "dashboard address missing: {}",
        first.stdout
    );
    let secret = admin_token(dir.path());
    assert!(!first.stdout.contains(&secret), "secret printed");
    let second = serve(dir.path());
    assert!(
        !second.stdout.contains("Admin token"),
        "token made twice: {}",
        second.stdout
    );
    assert_eq!(admin_token(dir.path()), secret);
}

#[test]
fn init_creates_a_hub_and_says_where_the_token_is() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let (ok, out, err) = run(&data, &["init"]);
    assert!(ok, "{err}");
    assert!(data.join("hub.db").exists());
    assert!(
        out.contains(&data.join("admin-token").display().to_string()),
        "{out}"
    );
    assert!(out.contains("http://127.0.0.1:7070/"), "{out}");
    let secret = admin_token(&data);
    // Again: nothing changes, and it says so.
    let (ok, out, _) = run(&data, &["init"]);
    assert!(ok);
    assert!(out.contains("exists already"), "{out}");
    assert_eq!(admin_token(&data), secret);
    // The token works on the hub that serves this folder.
    let served = spawn_serve(&data, Stdio::null());
    let status = http::blocking_status(&format!("{}/api/v1/clients", served.url), &secret);
    assert_eq!(status, 200);
}

#[test]
fn the_default_data_folder_is_not_the_agents() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = raw_run(dir.path(), &["init"]);
    assert!(ok, "{err}");
    assert!(dir.path().join("synchub-hub-data/hub.db").exists());
    // `synchub-agent run` defaults to ./synchub-data.
    assert!(!dir.path().join("synchub-data").exists());
}

#[test]
fn commands_refuse_a_database_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["token", "create", "--name", "pc", "--role", "agent"][..],
        &["token", "list"][..],
        &["force-sync"][..],
    ] {
        let (ok, out, err) = run(dir.path(), args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(out.is_empty(), "{args:?} printed {out:?}");
        assert!(
            err.contains(&dir.path().join("hub.db").display().to_string())
                && err.contains("synchub init")
                && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    let (ok, out, err) = raw_run(dir.path(), &["token", "list"]);
    assert!(!ok, "{out}");
    assert!(err.contains("synchub-hub-data/hub.db"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a refused command left files behind"
    );
}

#[test]
fn database_url_commands_touch_no_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://hub:secret@127.0.0.1:{port}/synchub");
    for args in [&["token", "list"][..], &["force-sync"][..]] {
        let mut all = vec!["--database-url", url.as_str()];
        all.extend_from_slice(args);
        let (ok, _, _) = raw_run(dir.path(), &all);
        assert!(!ok);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{args:?} created a local folder"
        );
    }
}

#[test]
fn an_address_in_use_is_one_line_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_serve(dir.path(), Stdio::null());
    let addr = first.url.trim_start_matches("http://");
    let (ok, _, err) = run(dir.path(), &["serve", "--listen", addr]);
    assert!(!ok);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: cannot listen on"), "{err}");
    assert!(last.contains("--listen"), "no advice: {err}");
    assert_eq!(err.matches("listens there").count(), 1, "repeated: {err}");
}

#[test]
fn token_create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path());
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
    // The new form: a name, read by default.
    let (ok, _, err) = run(dir.path(), &["token", "create", "pc-02", "--space", "qr"]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(dir.path(), &["token", "list"]);
    assert!(ok);
    // `--role agent`, the old spelling, still works and means publish.
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        line("pc-01 ").contains("publish") && line("pc-01 ").contains("qr"),
        "{out}"
    );
    assert!(line("pc-02 ").contains("read"), "{out}");
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
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "admin from init, pc-01, pc-02: {rows:?}");
    let pc = rows.iter().find(|r| r["name"] == "pc-01").unwrap();
    assert_eq!(pc["revoked"], true);
    let (ok, _, err) = run(dir.path(), &["token", "revoke", "pc-01"]);
    assert!(!ok, "revoking twice succeeded");
    assert!(err.contains("no live token"), "{err}");
    // Each change is in the audit log, newest first, as done on the command line.
    let (ok, out, err) = run(dir.path(), &["audit", "--json"]);
    assert!(ok, "{err}");
    let log: Vec<synchub_protocol::AuditEntry> = serde_json::from_str(&out).unwrap();
    let got: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|e| (e.who.as_str(), e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("cli", "token_revoke", "pc-01"),
            ("cli", "token_create", "pc-02 (read)"),
            ("cli", "token_create", "pc-01 (publish)"),
        ]
    );
}

#[test]
fn force_sync_beside_a_running_hub() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path());
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let head = http::blocking_head(&guard.url, &token);
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
fn rollback_beside_a_running_hub() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path());
    let (ok, out, err) = run(dir.path(), &["force-sync"]);
    assert!(ok, "{err}");
    assert!(out.contains("version 2"), "{out}");
    let (ok, out, err) = run(
        dir.path(),
        &["rollback", "--to-version", "1", "--reason", "undo"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("version 3") && out.contains("version 1"),
        "{out}"
    );
    let token = admin_token(dir.path());
    let guard = spawn_serve(dir.path(), Stdio::null());
    let head = http::blocking_head(&guard.url, &token);
    assert_eq!(head["version"], 3, "{head}");
    assert_eq!(head["forced"], true, "{head}");
    assert_eq!(head["reason"], "rollback to version 1: undo", "{head}");
    let (ok, _, err) = run(dir.path(), &["rollback", "--to-version", "42"]);
    assert!(!ok);
    assert!(err.contains("version 42"), "{err}");
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

#[tokio::test]
async fn held_changes_are_listed_approved_and_rejected() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path());
    let url = format!("sqlite://{}", dir.path().join("hub.db").display());
    let store = synchub_hub::store::open(&url).await.unwrap();
    let change = synchub_protocol::HeldChange {
        deletes: 93,
        replaces: 0,
        total: 155,
        sample_deletes: vec!["04310-11100-F/QR_0001.png".into()],
        sample_replaces: Vec::new(),
        held_at: "2026-11-26T16:00:00Z".into(),
    };
    for client in ["pc-brasov", "pc-iasi"] {
        store
            .put_held("global_version", client, &change)
            .await
            .unwrap();
    }
    let (ok, out, err) = run(dir.path(), &["held"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("pc-brasov") && out.contains("pending") && out.contains("93"),
        "{out}"
    );
    let (ok, out, err) = run(dir.path(), &["approve", "--client", "pc-brasov"]);
    assert!(ok, "{err}");
    assert!(out.contains("approved"), "{out}");
    let (ok, _, err) = run(dir.path(), &["reject", "--client", "pc-iasi"]);
    assert!(ok, "{err}");
    let decided: Vec<_> = store
        .held_changes()
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.client_id, h.decision, h.decided_by))
        .collect();
    use synchub_protocol::HeldDecision::*;
    assert_eq!(
        decided,
        vec![
            ("pc-brasov".to_owned(), Approved, Some("cli".to_owned())),
            ("pc-iasi".to_owned(), Rejected, Some("cli".to_owned())),
        ]
    );
    // A decision is made once; the agent asking again does not undo it.
    let (ok, _, err) = run(dir.path(), &["reject", "--client", "pc-brasov"]);
    assert!(!ok && err.contains("no pending held change"), "{err}");
    let again = store
        .put_held("global_version", "pc-brasov", &change)
        .await
        .unwrap();
    assert_eq!(again.decision, Approved);
    let (ok, _, err) = run(dir.path(), &["approve", "--client", "nobody"]);
    assert!(!ok && err.contains("no pending held change"), "{err}");
}
