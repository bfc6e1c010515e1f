//! PostgreSQL backend of [`super::Store`]: production, shared by several hub replicas and by
//! system 1 (the desktop app that bumps `sync_metadata.version` itself).
//!
//! Opening runs a migration that adopts an existing system 1 database (it only adds columns,
//! indexes, triggers and `synchub_` tables). Columns of system 1 are read with casts
//! (`version::BIGINT`, `last_modified_at::timestamptz`, ...) so their exact types do not matter.
//! Changes arrive by LISTEN/NOTIFY from triggers: at idle the hub sends no query at all.

use super::dialect::{Dialect, FedSpaces};
use super::rows::Stamp;
use super::{Change, StoreError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// NOTIFY channel of the `sync_metadata` trigger; the payload is the `sync_key`.
const HEADS_CHANNEL: &str = "synchub_heads";
/// NOTIFY channel of the `synchub_tokens` trigger.
const TOKENS_CHANNEL: &str = "synchub_tokens";

pub struct PostgresStore {
    pool: PgPool,
    options: PgConnectOptions,
    /// How `sync_log` rows are numbered for the API: `id::BIGINT`, or the hub's own
    /// `synchub_seq` column when an adopted table's `id` is not an integer.
    log_id: &'static str,
    fed: FedSpaces,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://...`) and runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("synchub");
        // One plain connection first: a pool that cannot connect only reports a timeout,
        // while this says why (refused, unknown host, wrong password, no such database).
        sqlx::Connection::close(
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&options).await?,
        )
        .await?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // Short: with the database down a request fails in 2 s with 503 and why, instead
            // of holding the client (and a connection slot) for long.
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let has_seq: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                             WHERE table_schema = current_schema() AND table_name = 'sync_log'
                               AND column_name = 'synchub_seq')",
        )
        .fetch_one(&pool)
        .await?;
        Ok(PostgresStore {
            pool,
            options,
            log_id: if has_seq { "synchub_seq" } else { "id::BIGINT" },
            fed: Default::default(),
        })
    }

    /// Connects a listener, retrying with jittered backoff (counting in `attempt`) until it
    /// listens; `None` on shutdown.
    async fn connect_listener(
        &self,
        attempt: &mut u32,
        shutdown: &CancellationToken,
    ) -> Option<PgListener> {
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.listen() => r,
            };
            match connected {
                Ok(listener) => {
                    if *attempt > 0 {
                        tracing::info!("postgres listener reconnected");
                    }
                    return Some(listener);
                }
                Err(e) => {
                    let pause = backoff(*attempt);
                    *attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?pause, "postgres listener cannot connect");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// A listener on both channels, on a connection of its own (not one of the pool's).
    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            // Short: with the database down a request fails in 2 s with 503 and why, instead
            // of holding the client (and a connection slot) for long.
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(self.options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.ignore_pool_close_event(true);
        // A lost connection is re-established by `watch`, which then sends `Change::All`.
        listener.eager_reconnect(false);
        listener.listen_all([HEADS_CHANNEL, TOKENS_CHANNEL]).await?;
        Ok(listener)
    }
}

/// Why [`relay_notifications`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Relay {
    /// The listener lost its connection: reconnect.
    Lost,
    /// Shutdown, or nobody receives changes any more.
    Stop,
}

/// Sends a [`Change`] for every notification until the listener fails or the watch stops.
async fn relay_notifications(
    mut listener: PgListener,
    changes: &mpsc::UnboundedSender<Change>,
    shutdown: &CancellationToken,
) -> Relay {
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return Relay::Stop,
            _ = changes.closed() => return Relay::Stop,
            r = listener.try_recv() => r,
        };
        let change = match received {
            Ok(Some(n)) if n.channel() == HEADS_CHANNEL => Change::Space(n.payload().to_owned()),
            Ok(Some(_)) => Change::Tokens,
            Ok(None) => {
                tracing::warn!("postgres listener lost its connection; reconnecting");
                return Relay::Lost;
            }
            Err(e) => {
                tracing::warn!(error = %e, "postgres listener failed; reconnecting");
                return Relay::Lost;
            }
        };
        if changes.send(change).is_err() {
            return Relay::Stop;
        }
    }
}

/// Pause before the `attempt`th reconnect: 100 ms doubling to 5 s, with ±25 % jitter so that
/// replicas do not reconnect in step.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let jitter = rand::random_range(0.75..1.25);
    Duration::from_millis((base as f64 * jitter) as u64)
}

#[async_trait]
impl Dialect for PostgresStore {
    type Db = Postgres;
    type Time = DateTime<Utc>;

    const NAME: &'static str = "postgres";

    const HEAD_SELECT: &'static str = "
SELECT m.sync_key::TEXT AS sync_key, m.version::BIGINT AS row_version,
       m.last_modified_by::TEXT AS row_by,
       COALESCE(m.last_modified_at::timestamptz, m.updated_at::timestamptz) AS row_at";

    const SNAPSHOT: &'static str = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY";

    const AFTER_RESTORE: &'static [&'static str] = &["
SELECT setval(pg_get_serial_sequence('synchub_tokens', 'id'), MAX(id))
  FROM synchub_tokens HAVING MAX(id) IS NOT NULL"];

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn fed(&self) -> &FedSpaces {
        &self.fed
    }

    fn store_time(at: DateTime<Utc>) -> DateTime<Utc> {
        at
    }

    fn read_time(stored: DateTime<Utc>) -> Stamp {
        Stamp::At(stored)
    }

    fn rows_changed(done: sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn sync_log_select(&self) -> String {
        format!(
            "SELECT {} AS id, report_id::TEXT AS report_id, client_id::TEXT AS client_id,
                    space::TEXT AS space, COALESCE(sync_type::TEXT, '') AS sync_type,
                    COALESCE(status::TEXT, '') AS status, version::BIGINT AS version,
                    items_synced::BIGINT AS items_synced, items_total::BIGINT AS items_total,
                    bytes::BIGINT AS bytes,
                    duration_ms::BIGINT AS duration_ms, error_message::TEXT AS error_message,
                    discord_id::TEXT AS discord_id,
                    COALESCE(synced_at::timestamptz, created_at::timestamptz, now()) AS synced_at
             FROM sync_log WHERE 1 = 1",
            self.log_id
        )
    }

    /// LISTENs on a connection of its own; `poll_interval` is unused. Sends `Change::All` and
    /// `Change::Tokens` once the listener is (re)connected and listening: the hub re-reads
    /// every head and token then, so a change made before or while the connection was down is
    /// not lost, and every later one arrives as a notification. A lost connection is re-established with jittered backoff.
    async fn watch(
        self: Arc<Self>,
        _poll_interval: Duration,
        changes: mpsc::UnboundedSender<Change>,
        shutdown: CancellationToken,
    ) {
        let mut attempt = 0u32;
        loop {
            let Some(listener) = self.connect_listener(&mut attempt, &shutdown).await else {
                return;
            };
            // Anything may have changed while no one listened: heads and tokens alike.
            if changes.send(Change::All).is_err() || changes.send(Change::Tokens).is_err() {
                return;
            }
            if relay_notifications(listener, &changes, &shutdown).await == Relay::Stop {
                return;
            }
            // Give a restarting server a moment before the first reconnect; later attempts back
            // off from there.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff(0)) => {}
            }
            attempt = 1;
        }
    }
}
