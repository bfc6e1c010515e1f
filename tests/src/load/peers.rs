//! The fan-out against its peer and its floor, interleaved: each run measures the hub, nginx
//! with nchan, and the write-loop floor one after the other (in an order that turns with each
//! run), so the three share the machine's state of that minute, and reports each run's ratios.
//! A shared VM's speed drifts by tens of percent between minutes; a ratio of neighbours
//! cancels most of that, where medians of blocks run minutes apart do not.

use super::{FanoutOptions, FanoutReport, Figures, FloorReport, Hub, NchanOptions, NchanReport};
use super::{SpawnOptions, fanout, nchan_fanout, write_loop_floor};
use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use std::path::PathBuf;

/// One interleaved run.
#[derive(Clone, Debug)]
pub struct PeersOptions {
    /// The hub's fan-out (force-sync bumps); its `connections` and `rounds` are everyone's.
    pub fanout: FanoutOptions,
    pub nchan_workers: usize,
    /// This binary, for the floor's server process.
    pub me: PathBuf,
    /// Which of the three goes first (0, 1, 2), turning with each run.
    pub turn: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeersReport {
    pub order: Vec<&'static str>,
    pub hub: FanoutReport,
    pub nchan: NchanReport,
    pub floor: FloorReport,
}

impl PeersReport {
    /// Each server's figures, and the hub's against the others': its CPU per delivered frame
    /// over theirs, and its time to the last socket over theirs.
    pub fn figures(&self) -> Figures {
        let mut f = Figures::new();
        for (k, v) in self.hub.figures() {
            f.insert(format!("hub.{k}"), v);
        }
        f.extend(self.nchan.figures());
        f.extend(self.floor.figures());
        let hub = self.hub.bumps.first();
        // No ratio over a reading of nothing (a CPU time under the clock's tick).
        let ratio =
            |a: Option<f64>, b: Option<f64>| a.zip(b.filter(|b| *b > 0.0)).map(|(a, b)| a / b);
        let hub_cpu = hub.and_then(|b| b.hub_cpu_us_per_frame);
        let hub_last = hub.map(|b| b.last_ms_median);
        let pairs = [
            (
                "ratio.hub_cpu_over_floor",
                ratio(hub_cpu, self.floor.server_cpu_us_per_frame),
            ),
            (
                "ratio.hub_cpu_over_nchan",
                ratio(hub_cpu, self.nchan.server_cpu_us_per_frame),
            ),
            (
                "ratio.hub_last_over_floor",
                ratio(hub_last, Some(self.floor.last_ms_median)),
            ),
            (
                "ratio.hub_last_over_nchan",
                ratio(hub_last, Some(self.nchan.last_ms_median)),
            ),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                f.insert(k.into(), v);
            }
        }
        f
    }
}

impl std::fmt::Display for PeersReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "in the order {}", self.order.join(", "))?;
        writeln!(f, "  hub:   {}", self.hub)?;
        writeln!(f, "  nchan: {}", self.nchan)?;
        write!(f, "  floor: {}", self.floor)
    }
}

/// The three, one after the other, each on fresh servers and fresh sockets.
pub async fn peers(spawn: &SpawnOptions, opts: &PeersOptions) -> Result<PeersReport> {
    let n = opts.fanout.connections;
    let rounds = opts.fanout.rounds;
    let mut order = vec!["hub", "nchan", "floor"];
    order.rotate_left(opts.turn % 3);
    let (mut hub, mut nchan, mut floor) = (None, None, None);
    for &which in &order {
        match which {
            "hub" => {
                let h = Hub::spawn(spawn).await?;
                let r = fanout(&h, &opts.fanout).await;
                let r = r.with_context(|| format!("hub log: {}", h.log_tail()));
                h.stop().await;
                hub = Some(r?);
            }
            "nchan" => {
                let o = NchanOptions {
                    subscribers: n,
                    rounds,
                    workers: opts.nchan_workers,
                };
                nchan = Some(nchan_fanout(&o).await.context("nginx+nchan")?);
            }
            _ => {
                let r = write_loop_floor(opts.me.clone(), n, rounds).await;
                floor = Some(r.context("the write-loop floor")?);
            }
        }
    }
    let missing = || anyhow!("a server of the three was not measured");
    Ok(PeersReport {
        order,
        hub: hub.ok_or_else(missing)?,
        nchan: nchan.ok_or_else(missing)?,
        floor: floor.ok_or_else(missing)?,
    })
}
