//! The audit log (`synchub_audit`): one row per admin action, appended and never changed. The
//! SQL is the same for both backends except for the parameter marks, so, as for held changes,
//! it is written once here and instantiated for each pool.

use super::StoreError;
use synchub_protocol::AuditEntry;

/// The row's columns, as read.
type Row = (i64, String, String, String, String, Option<String>);

fn entry((id, at, who, action, target, peer): Row) -> AuditEntry {
    AuditEntry {
        id,
        at,
        who,
        action,
        target,
        from: peer,
    }
}

/// `?1` marks for SQLite, `$1` for PostgreSQL.
fn sql(text: &str, dollar: bool) -> String {
    if dollar {
        text.replace('?', "$")
    } else {
        text.to_owned()
    }
}

macro_rules! audit_queries {
    ($name:ident, $pool:ty, $dollar:expr) => {
        pub(super) mod $name {
            use super::*;

            /// Appends one action, stamped with the database's clock as seen by the hub now.
            pub async fn record(
                pool: &$pool,
                who: &str,
                action: &str,
                target: &str,
                from: Option<&str>,
            ) -> Result<(), StoreError> {
                sqlx::query(&sql(
                    "INSERT INTO synchub_audit (at, who, action, target, peer) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    $dollar,
                ))
                .bind(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .bind(who)
                .bind(action)
                .bind(target)
                .bind(from)
                .execute(pool)
                .await?;
                Ok(())
            }

            /// The newest `limit` entries, newest first.
            pub async fn list(pool: &$pool, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
                let rows: Vec<Row> = sqlx::query_as(&sql(
                    "SELECT id, at, who, action, target, peer FROM synchub_audit \
                     ORDER BY id DESC LIMIT ?1",
                    $dollar,
                ))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().map(entry).collect())
            }
        }
    };
}

audit_queries!(sqlite, sqlx::SqlitePool, false);
audit_queries!(postgres, sqlx::PgPool, true);
