//! PostgreSQL at idle: with agents connected and nothing changing, how many transactions per
//! second the hub's database sees.

use super::{Arrival, Hub, holding_nothing, open_agent, read_agent};
use crate::postgres::PgCluster;
use anyhow::{Result, anyhow};
use futures::StreamExt;
use serde::Serialize;
use sqlx::Connection;
use std::time::{Duration, Instant};
use synchub_protocol::DEFAULT_SPACE;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Serialize)]
pub struct IdleReport {
    pub agents: usize,
    /// One figure per window.
    pub windows: Vec<IdleWindow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdleWindow {
    pub secs: f64,
    pub transactions: i64,
    pub transactions_per_sec: f64,
}

impl std::fmt::Display for IdleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgreSQL at idle with {} agents:", self.agents)?;
        for w in &self.windows {
            write!(
                f,
                "\n  {} transactions in {:.1} s = {:.2} per second",
                w.transactions, w.secs, w.transactions_per_sec
            )?;
        }
        Ok(())
    }
}

/// Transactions committed and rolled back in the hub's database so far. Read through a
/// connection to the `postgres` database, so that reading does not count.
async fn xact_count(cluster: &PgCluster, db: &str) -> Result<i64> {
    let mut c = sqlx::PgConnection::connect(&cluster.url("postgres")).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
    )
    .bind(db)
    .fetch_one(&mut c)
    .await?;
    c.close().await?;
    Ok(n)
}

/// With `agents` sockets connected and idle, counts the hub database's transactions per second
/// in `windows` consecutive windows of `window`, after `settle` (PostgreSQL's statistics
/// reach `pg_stat_database` up to ~10 s late from idle backends, so settle at least that long
/// for exact figures).
pub async fn idle_pg(
    hub: &Hub,
    agents: usize,
    settle: Duration,
    window: Duration,
    windows: usize,
) -> Result<IdleReport> {
    let cluster = hub
        .postgres()
        .ok_or_else(|| anyhow!("idle-pg needs a hub the generator started on PostgreSQL"))?;
    let url = hub
        .database_url
        .as_deref()
        .ok_or_else(|| anyhow!("no database URL"))?;
    let db = url
        .rsplit('/')
        .next()
        .and_then(|d| d.split('?').next())
        .ok_or_else(|| anyhow!("no database name in {url}"))?
        .to_owned();
    let (tx, _rx) = mpsc::unbounded_channel::<Arrival>();
    let stop = CancellationToken::new();
    let ws = hub.ws_url();
    let sockets: Vec<_> = futures::stream::iter(0..agents)
        .map(|i| {
            let (ws, token) = (&ws, &hub.agent_token);
            async move { open_agent(ws, token, holding_nothing(DEFAULT_SPACE), i, None).await }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let mut readers = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        readers.push(tokio::spawn(read_agent(
            i as u32,
            s?,
            tx.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(settle).await;
    let mut out = Vec::new();
    let mut before = xact_count(cluster, &db).await?;
    for _ in 0..windows {
        let t = Instant::now();
        tokio::time::sleep(window).await;
        let after = xact_count(cluster, &db).await?;
        let secs = t.elapsed().as_secs_f64();
        out.push(IdleWindow {
            secs,
            transactions: after - before,
            transactions_per_sec: (after - before) as f64 / secs,
        });
        before = after;
    }
    stop.cancel();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    Ok(IdleReport {
        agents,
        windows: out,
    })
}
