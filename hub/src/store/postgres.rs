//! PostgreSQL backend of [`super::Store`]: production, shared by several hub replicas and by
//! system 1 (the desktop app that bumps `sync_metadata.version` itself).
//!
//! Opening runs a migration that adopts an existing system 1 database (it only adds columns,
//! indexes, triggers and `synchub_` tables). Columns of system 1 are read with casts
//! (`version::BIGINT`, `last_modified_at::timestamptz`, ...) so their exact types do not matter.
//! Changes arrive by LISTEN/NOTIFY from triggers: at idle the hub sends no query at all.

use super::dialect::{
    Conn, Dialect, FedSpaces, HEAD_FROM, INSERT_VERSION, MOVE_HEAD, SET_DATA_HASH, TOKEN_NAMED,
    bind_data_hash, bind_move, bind_version,
};
use super::rows::{
    HeadRow, PendingVersion, decode_spaces, encode_spaces, from_db, list_limit, parse_hash,
    parse_role, parse_timestamp, rfc3339, to_db,
};
use super::*;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
use std::str::FromStr;

/// NOTIFY channel of the `sync_metadata` trigger; the payload is the `sync_key`.
const HEADS_CHANNEL: &str = "synchub_heads";
/// NOTIFY channel of the `synchub_tokens` trigger.
const TOKENS_CHANNEL: &str = "synchub_tokens";

/// Columns of a version record, in the order [`version_from_row`] reads them.
const VERSION_COLUMNS: &str =
    "space, version, data_hash, forced, reason, created_by, created_at, entries, bytes";

/// The `SELECT` list of a head read (see [`HEAD_FROM`]).
const HEAD_SELECT: &str = "
SELECT m.sync_key::TEXT AS sync_key, m.version::BIGINT AS row_version,
       m.last_modified_by::TEXT AS row_by,
       COALESCE(m.last_modified_at::timestamptz, m.updated_at::timestamptz) AS row_at,
       v.space, v.version, v.data_hash, v.forced, v.reason, v.created_by, v.created_at,
       v.entries, v.bytes";

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

fn head_row(row: &PgRow) -> Result<HeadRow, StoreError> {
    let newest = match row.try_get::<Option<i64>, _>(5)? {
        Some(_) => Some(version_from_row(row, 4)?),
        None => None,
    };
    Ok(HeadRow {
        space: row.try_get("sync_key")?,
        row_version: row.try_get("row_version")?,
        row_by: row.try_get("row_by")?,
        row_at: row.try_get("row_at")?,
        newest,
    })
}

/// Reads [`VERSION_COLUMNS`] starting at column `first`.
fn version_from_row(row: &PgRow, first: usize) -> Result<VersionInfo, StoreError> {
    let at = |i: usize| first + i;
    let created_at: DateTime<Utc> = row.try_get(at(6))?;
    Ok(VersionInfo {
        head: Head {
            space: row.try_get(at(0))?,
            version: from_db(row.try_get(at(1))?, "version")?,
            data_hash: parse_hash(row.try_get(at(2))?)?,
            forced: row.try_get(at(3))?,
            reason: row.try_get(at(4))?,
            by: row.try_get(at(5))?,
            at: rfc3339(created_at),
            epoch: 0,
            forced_version: 0,
        },
        entries: from_db(row.try_get(at(7))?, "entries")?,
        bytes: from_db(row.try_get(at(8))?, "bytes")?,
    })
}

fn token_from_row(row: &PgRow) -> Result<TokenRecord, StoreError> {
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    let revoked_at: Option<DateTime<Utc>> = row.try_get("revoked_at")?;
    Ok(TokenRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: parse_role(row.try_get("role")?)?,
        spaces: decode_spaces(row.try_get("spaces")?)?,
        token_hash: row.try_get("token_hash")?,
        created_at: rfc3339(created_at),
        revoked: revoked_at.is_some(),
    })
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

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn fed(&self) -> &FedSpaces {
        &self.fed
    }

    async fn head_rows(&self, space: Option<&str>) -> Result<Vec<HeadRow>, StoreError> {
        let rows = sqlx::query(&format!("{HEAD_SELECT}{HEAD_FROM}"))
            .bind(space)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(head_row).collect()
    }

    async fn insert_version(conn: &mut Conn<Self>, p: &PendingVersion) -> Result<u64, sqlx::Error> {
        let query = bind_version(sqlx::query(INSERT_VERSION), p, p.at);
        Ok(query.execute(conn).await?.rows_affected())
    }

    async fn move_head(
        conn: &mut Conn<Self>,
        p: &PendingVersion,
        expected: u64,
    ) -> Result<u64, sqlx::Error> {
        let query = bind_move(sqlx::query(MOVE_HEAD), p, expected, p.at);
        Ok(query.execute(conn).await?.rows_affected())
    }

    async fn set_data_hash(conn: &mut Conn<Self>, p: &PendingVersion) -> Result<(), sqlx::Error> {
        bind_data_hash(sqlx::query(SET_DATA_HASH), p)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn insert_space_row(
        conn: &mut Conn<Self>,
        space: &str,
        data_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error> {
        let inserted = sqlx::query(
            "INSERT INTO sync_metadata (sync_key, version, data_hash, last_modified_at, updated_at)
             VALUES ($1, 1, $2, $3, $3)
             ON CONFLICT (sync_key) DO NOTHING",
        )
        .bind(space)
        .bind(data_hash)
        .bind(at)
        .execute(conn)
        .await?;
        Ok(inserted.rows_affected())
    }

    async fn insert_token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<String>,
        token_hash: &str,
    ) -> Result<TokenRecord, StoreError> {
        let row = sqlx::query(
            "INSERT INTO synchub_tokens (name, role, spaces, token_hash)
             VALUES ($1, $2, $3, $4)
             RETURNING id, name, role, spaces, token_hash, created_at, revoked_at",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(spaces)
        .bind(token_hash)
        .fetch_one(&self.pool)
        .await?;
        token_from_row(&row)
    }

    async fn token_named(&self, name: &str) -> Result<bool, sqlx::Error> {
        let taken: Option<i64> = sqlx::query_scalar(TOKEN_NAMED)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(taken.is_some())
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn set_fed_spaces(&self, spaces: &[String]) {
        self.fed.set(spaces);
    }

    async fn record_outside_bump(
        &self,
        space: &str,
        content: &NewVersion,
        read_at: u64,
    ) -> Result<Option<Head>, StoreError> {
        sql::record_outside_bump(self, space, content, read_at).await
    }

    async fn ensure_space(&self, space: &str) -> Result<Head, StoreError> {
        sql::ensure_space(self, space).await
    }

    async fn head(&self, space: &str) -> Result<Option<Head>, StoreError> {
        sql::head(self, space).await
    }

    async fn heads(&self) -> Result<Vec<Head>, StoreError> {
        sql::heads(self).await
    }

    async fn create_version(
        &self,
        space: &str,
        expected: u64,
        new: NewVersion,
    ) -> Result<Head, StoreError> {
        sql::create_version(self, space, expected, new).await
    }

    async fn version(&self, space: &str, version: u64) -> Result<Option<Head>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM synchub_versions WHERE space = $1 AND version = $2"
        ))
        .bind(space)
        .bind(to_db(version))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| version_from_row(&r, 0).map(|v| v.head))
            .transpose()
    }

    async fn versions(&self, space: &str, limit: u32) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM synchub_versions WHERE space = $1
             ORDER BY version DESC LIMIT $2"
        ))
        .bind(space)
        .bind(list_limit(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| version_from_row(r, 0)).collect()
    }

    async fn insert_report(&self, report: &SyncReport) -> Result<bool, StoreError> {
        let now = Utc::now();
        let synced_at = report
            .synced_at
            .as_deref()
            .and_then(parse_timestamp)
            .unwrap_or(now);
        let inserted = sqlx::query(
            "INSERT INTO sync_log
                 (report_id, client_id, space, sync_type, status, version, items_synced, bytes,
                  duration_ms, error_message, discord_id, synced_at, created_at, items_total)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (report_id) DO NOTHING",
        )
        .bind(&report.report_id)
        .bind(&report.client_id)
        .bind(&report.space)
        .bind(report.sync_type.as_str())
        .bind(report.status.as_str())
        .bind(report.version.map(to_db))
        .bind(to_db(report.items_synced))
        .bind(to_db(report.bytes))
        .bind(to_db(report.duration_ms))
        .bind(&report.error_message)
        .bind(&report.user)
        .bind(synced_at)
        .bind(now)
        .bind(report.items_total.map(to_db))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn sync_log(&self, filter: &SyncLogFilter) -> Result<Vec<SyncLogEntry>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(format!(
            "SELECT {} AS id, report_id::TEXT AS report_id, client_id::TEXT AS client_id,
                    space::TEXT AS space, COALESCE(sync_type::TEXT, '') AS sync_type,
                    COALESCE(status::TEXT, '') AS status, version::BIGINT AS version,
                    items_synced::BIGINT AS items_synced, items_total::BIGINT AS items_total,
                    bytes::BIGINT AS bytes,
                    duration_ms::BIGINT AS duration_ms, error_message::TEXT AS error_message,
                    discord_id::TEXT AS discord_id,
                    COALESCE(synced_at::timestamptz, created_at::timestamptz, now()) AS synced_at
             FROM sync_log WHERE true",
            self.log_id
        ));
        // Rows the old app wrote have no space: they belong to every space's log.
        if let Some(space) = &filter.space {
            q.push(" AND (space = ")
                .push_bind(space.clone())
                .push(" OR space IS NULL)");
        }
        for (column, value) in [("client_id", &filter.client_id), ("status", &filter.status)] {
            if let Some(value) = value {
                q.push(format!(" AND {column} = ")).push_bind(value.clone());
            }
        }
        q.push(" ORDER BY 13 DESC, 1 DESC LIMIT ")
            .push_bind(list_limit(filter.limit));
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let synced_at: DateTime<Utc> = row.try_get("synced_at")?;
                Ok(SyncLogEntry {
                    id: row.try_get("id")?,
                    report_id: row.try_get("report_id")?,
                    client_id: row.try_get("client_id")?,
                    space: row.try_get("space")?,
                    sync_type: row.try_get("sync_type")?,
                    status: row.try_get("status")?,
                    version: row.try_get("version")?,
                    items_synced: row.try_get("items_synced")?,
                    items_total: row.try_get("items_total")?,
                    bytes: row.try_get("bytes")?,
                    duration_ms: row.try_get("duration_ms")?,
                    error_message: row.try_get("error_message")?,
                    user: row.try_get("discord_id")?,
                    synced_at: rfc3339(synced_at),
                })
            })
            .collect()
    }

    async fn create_token(
        &self,
        name: &str,
        role: Role,
        spaces: Option<&[String]>,
        token_hash: &str,
    ) -> Result<TokenRecord, StoreError> {
        sql::create_token(self, name, role, encode_spaces(spaces), token_hash).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, spaces, token_hash, created_at, revoked_at
             FROM synchub_tokens ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn put_held(
        &self,
        space: &str,
        client_id: &str,
        change: &synchub_protocol::HeldChange,
    ) -> Result<synchub_protocol::HeldRecord, StoreError> {
        super::held::postgres::put(&self.pool, space, client_id, change).await
    }

    async fn held_changes(&self) -> Result<Vec<synchub_protocol::HeldRecord>, StoreError> {
        super::held::postgres::list(&self.pool).await
    }

    async fn decide_held(
        &self,
        space: &str,
        client_id: &str,
        decision: synchub_protocol::HeldDecision,
        by: &str,
    ) -> Result<bool, StoreError> {
        super::held::postgres::decide(&self.pool, space, client_id, decision, by).await
    }

    async fn delete_held(&self, space: &str, client_id: &str) -> Result<(), StoreError> {
        super::held::postgres::delete(&self.pool, space, client_id).await
    }

    async fn record_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        from: Option<&str>,
    ) -> Result<(), StoreError> {
        super::audit::postgres::record(&self.pool, who, action, target, from).await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<synchub_protocol::AuditEntry>, StoreError> {
        super::audit::postgres::list(&self.pool, limit).await
    }

    async fn index_blobs(&self, space: &str, hashes: &[Sha256Hex]) -> Result<(), StoreError> {
        super::blob_index::postgres::index(&self.pool, space, hashes).await
    }

    async fn readable_blobs(
        &self,
        hashes: &[Sha256Hex],
        spaces: Option<&[String]>,
        token_id: i64,
    ) -> Result<std::collections::HashSet<Sha256Hex>, StoreError> {
        super::blob_index::postgres::readable(&self.pool, hashes, spaces, token_id).await
    }

    async fn note_upload(&self, hash: &Sha256Hex, token_id: i64) -> Result<(), StoreError> {
        super::blob_index::postgres::note_upload(&self.pool, hash, token_id).await
    }

    async fn bind_client(&self, client_id: &str, token_id: i64) -> Result<i64, StoreError> {
        super::blob_index::postgres::bind_client(&self.pool, client_id, token_id).await
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let revoked = sqlx::query(
            "UPDATE synchub_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(revoked > 0)
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
