//! The write-loop floor for the fan-out: a server process that holds N plain loopback TCP
//! connections and, on each command, writes one pre-encoded WebSocket text frame (the size
//! of a `sync_required`) to every connection in a plain loop, one `write` each. Nothing can
//! deliver a frame to N sockets with less server work; the hub's fan-out is measured against
//! it with the same generator on the same cores.
//!
//! The server is this binary (`synchub-load write-loop-server`) in a child process, so its CPU
//! can be read from `/proc` like the hub's.

use super::{Figures, percentile, proc_cpu_secs};
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::StreamExt;
use serde::Serialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use synchub_protocol::{Head, HubFrame, Sha256Hex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The JSON of a `sync_required` of a typical head at `version`.
pub fn sync_required_json(version: u64) -> Vec<u8> {
    let head = Head {
        space: synchub_protocol::DEFAULT_SPACE.into(),
        version,
        data_hash: Sha256Hex::of(b"write-loop floor"),
        forced: false,
        reason: None,
        by: Some("admin".into()),
        at: "2026-11-26T00:00:00.000Z".into(),
        epoch: 0,
        forced_version: 0,
    };
    serde_json::to_vec(&HubFrame::SyncRequired(head)).expect("frames serialize")
}

/// A WebSocket text frame as a server sends it (unmasked) holding a `sync_required` of a
/// typical head.
pub fn sync_required_frame() -> Vec<u8> {
    let payload = sync_required_json(123_456);
    let mut frame = vec![0x81];
    match payload.len() {
        n @ 0..=125 => frame.push(n as u8),
        n => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// The server side, run as `synchub-load write-loop-server`: prints `PORT <port>`, accepts
/// `connections` connections, then for every line `go` on stdin writes the frame to each
/// connection in turn and prints `done <connections that took it whole>`; ends at EOF.
pub fn write_loop_server(connections: usize) -> Result<()> {
    let listener = listen_loopback()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "PORT {}", listener.local_addr()?.port())?;
    out.flush()?;
    let mut sockets = Vec::with_capacity(connections);
    while sockets.len() < connections {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        sockets.push(s);
    }
    let frame = sync_required_frame();
    for line in std::io::stdin().lock().lines() {
        if line? != "go" {
            continue;
        }
        let mut whole = 0usize;
        for s in &mut sockets {
            if let Ok(n) = s.write(&frame)
                && n == frame.len()
            {
                whole += 1;
            }
        }
        writeln!(out, "done {whole}")?;
        out.flush()?;
    }
    Ok(())
}

/// A listener on a free loopback port that holds as many pending connections as the hub's
/// ([`synchub_hub::server::LISTEN_BACKLOG`]; nginx's in the nchan peer too). std's
/// `TcpListener::bind` holds 128: 10,000 connections at 200 at a time overflowed it
/// (`ListenOverflows` in `nstat`), and with SYN cookies a handshake the client took as done
/// was never accepted, so the server waited for it and the run failed.
fn listen_loopback() -> Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(i32::try_from(synchub_hub::server::LISTEN_BACKLOG)?)?;
    Ok(socket.into())
}

#[derive(Clone, Debug, Serialize)]
pub struct FloorReport {
    pub connections: usize,
    pub rounds: usize,
    pub frame_bytes: usize,
    /// From the `go` to each connection having the frame, over every (connection, round).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Per round, when the last connection had it; the median over rounds.
    pub last_ms_median: f64,
    /// The server's CPU per delivered frame, µs.
    pub server_cpu_us_per_frame: Option<f64>,
}

impl FloorReport {
    pub fn figures(&self) -> Figures {
        let mut f = Figures::from([
            ("floor.p50_ms".to_owned(), self.p50_ms),
            ("floor.p99_ms".to_owned(), self.p99_ms),
            ("floor.last_ms".to_owned(), self.last_ms_median),
        ]);
        if let Some(us) = self.server_cpu_us_per_frame {
            f.insert("floor.server_cpu_us_per_frame".into(), us);
        }
        f
    }
}

impl std::fmt::Display for FloorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write-loop floor, {} connections x {} rounds, {}-byte frame: p50 {:.2} ms  p99 {:.2} \
             ms  last (median) {:.2} ms  server CPU {} µs/frame",
            self.connections,
            self.rounds,
            self.frame_bytes,
            self.p50_ms,
            self.p99_ms,
            self.last_ms_median,
            self.server_cpu_us_per_frame
                .map_or("?".to_owned(), |us| format!("{us:.1}"))
        )
    }
}

/// Starts `program write-loop-server` (this binary), connects `connections` readers and
/// times `rounds` write loops.
pub async fn write_loop_floor(
    program: PathBuf,
    connections: usize,
    rounds: usize,
) -> Result<FloorReport> {
    let mut child = tokio::process::Command::new(&program)
        .args([
            "write-loop-server",
            "--connections",
            &connections.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} write-loop-server", program.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("the server exited at once"))?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut next_line = async || -> Result<String> {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("the write-loop server did not answer")??
            .ok_or_else(|| anyhow!("the write-loop server ended"))
    };
    let port: u16 = next_line()
        .await?
        .strip_prefix("PORT ")
        .ok_or_else(|| anyhow!("no port from the write-loop server"))?
        .parse()?;
    let frame_len = sync_required_frame().len();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let streams: Vec<Result<tokio::net::TcpStream>> = futures::stream::iter(0..connections)
        .map(|_| async move { Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?) })
        .buffer_unordered(200)
        .collect()
        .await;
    let mut readers = Vec::with_capacity(connections);
    for (i, s) in streams.into_iter().enumerate() {
        let mut s = s?;
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; frame_len];
            while s.read_exact(&mut buf).await.is_ok() {
                if tx.send((i, Instant::now())).is_err() {
                    break;
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(connections * rounds);
    let mut lasts = Vec::with_capacity(rounds);
    let mut cpu = Some(0.0);
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu0 = proc_cpu_secs(pid);
        let t0 = Instant::now();
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
        let mut got = vec![false; connections];
        let mut count = 0;
        let mut last: f64 = 0.0;
        while count < connections {
            let (i, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("a frame did not arrive")?
                .ok_or_else(|| anyhow!("the readers ended"))?;
            if !std::mem::replace(&mut got[i], true) {
                count += 1;
                let ms = at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
                last = last.max(ms);
                all.push(ms);
            }
        }
        let done = next_line().await?;
        ensure!(
            done == format!("done {connections}"),
            "the server wrote short: {done}"
        );
        let used = cpu0.zip(proc_cpu_secs(pid)).map(|(a, b)| b - a);
        cpu = cpu.zip(used).map(|(c, u)| c + u);
        lasts.push(last);
    }
    drop(stdin);
    for r in readers {
        r.abort();
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
        bail!("the write-loop server did not end at EOF");
    }
    all.sort_by(f64::total_cmp);
    lasts.sort_by(f64::total_cmp);
    Ok(FloorReport {
        connections,
        rounds,
        frame_bytes: frame_len,
        p50_ms: percentile(&all, 50.0),
        p99_ms: percentile(&all, 99.0),
        last_ms_median: lasts.get(lasts.len() / 2).copied().unwrap_or(0.0),
        server_cpu_us_per_frame: cpu.map(|c| c * 1e6 / (connections * rounds).max(1) as f64),
    })
}
