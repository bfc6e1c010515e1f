//! A fleet connecting at once while the hub is busy: the kernel holds the connections the hub
//! has not accepted yet in the listening socket's queue. With tokio's default queue of 1,024,
//! a 10,000-agent herd showed hundreds of dropped SYNs (`ListenOverflows`), each connection
//! waiting a second for its retry. Here the hub process is frozen (SIGSTOP) so it accepts
//! nothing, and 2,000 PCs connect: every connection must complete in the kernel's queue.

use anyhow::{Context, ensure};
use std::time::Duration;
use synchub_tests::load::{Hub, HubCommand, SpawnOptions};

/// Sends `signal` to `pid` with the shell's own `kill` (no package needed).
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill {signal} {pid}")])
        .status()?;
    ensure!(status.success(), "kill {signal} {pid}");
    Ok(())
}

/// Wakes the hub even when the test fails half-way, so it can be stopped.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = signal(self.0, "-CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_pcs_connecting_to_a_busy_hub_wait_in_its_queue() -> anyhow::Result<()> {
    const PCS: usize = 2000;
    synchub_hub::server::raise_open_file_limit();
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")?
        .trim()
        .parse()?;
    ensure!(
        somaxconn > PCS,
        "net.core.somaxconn is {somaxconn}: this test needs more than {PCS} \
         (`sysctl -w net.core.somaxconn=4096`, the default of current kernels)"
    );
    let hub = Hub::spawn(&SpawnOptions {
        command: HubCommand {
            program: env!("CARGO_BIN_EXE_synchub-load").into(),
            leading_args: vec!["hub".into()],
        },
        postgres: false,
        poll_interval_ms: None,
        extra_config: None,
    })
    .await?;
    let pid = hub.pid.context("the hub was spawned, so it has a pid")?;
    let addr = hub
        .url
        .trim_start_matches("http://")
        .parse::<std::net::SocketAddr>()?;

    signal(pid, "-STOP")?;
    let thaw = Thaw(pid);
    let connects = (0..PCS).map(|_| {
        tokio::time::timeout(
            Duration::from_millis(700),
            tokio::net::TcpStream::connect(addr),
        )
    });
    let results = futures::future::join_all(connects).await;
    let connected: Vec<_> = results.into_iter().filter_map(|r| r.ok()?.ok()).collect();
    drop(thaw);

    assert_eq!(
        connected.len(),
        PCS,
        "connections past the hub's listen queue had their SYN dropped (a second's wait each)"
    );
    drop(connected);
    hub.stop().await;
    Ok(())
}
