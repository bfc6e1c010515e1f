//! Table sources: PostgreSQL tables (and named queries) written as canonical JSON files, and
//! the statement triggers that tell the hub when one of those tables changed.
//!
//! A table's file is `tables/<name>.json`: a JSON array with one object per row, rows sorted by
//! the primary key, each row as PostgreSQL's `row_to_json` writes it (keys in column order,
//! numbers and timestamps exactly as stored), one row per line. An unchanged table therefore
//! gives the same bytes, hence the same blob, and makes no new version.

use super::SourceError;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

/// NOTIFY channel of the table triggers; the payload is the table's name (without schema).
pub const TABLES_CHANNEL: &str = "synchub_tables";

/// Longest statement of one snapshot; a table that takes longer fails the refresh (retried).
const STATEMENT_TIMEOUT: &str = "60s";

/// `table` or `schema.table`, letters, digits and underscores (quoted when used, so the name
/// is taken exactly as written).
pub fn check_table_name(name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('.').collect();
    let ok = (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "table_source table {name:?}: use a table name or schema.table (letters, digits, _)"
        ))
    }
}

/// A query's name becomes a file name: letters, digits, `_` and `-`, at most 100 bytes.
pub fn check_file_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "table_source query name {name:?}: use letters, digits, _ and - (at most 100)"
        ))
    }
}

/// The file name of a table: its name without the schema.
pub fn file_name(table: &str) -> &str {
    table.rsplit('.').next().unwrap_or(table)
}

/// Where a table's or query's JSON lives in the space.
pub fn path_of(name: &str) -> String {
    format!("tables/{name}.json")
}

fn quoted(table: &str) -> String {
    table
        .split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// Installs (or replaces) a statement trigger on every table that NOTIFYs [`TABLES_CHANNEL`]
/// after any insert, update, delete or truncate. Idempotent; needs the tables' owner.
pub async fn install_triggers(pool: &PgPool, tables: &[String]) -> Result<(), SourceError> {
    let function = format!(
        "CREATE OR REPLACE FUNCTION synchub_notify_table() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_notify('{TABLES_CHANNEL}', TG_TABLE_NAME);
             RETURN NULL;
         END
         $$"
    );
    sqlx::query(&function).execute(pool).await?;
    for table in tables.iter().cloned() {
        let trigger = format!(
            "CREATE OR REPLACE TRIGGER synchub_notify_table
                 AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {}
                 FOR EACH STATEMENT EXECUTE FUNCTION synchub_notify_table()",
            quoted(&table)
        );
        if let Err(e) = sqlx::query(&trigger).execute(pool).await {
            return Err(SourceError::Table {
                table,
                message: format!("cannot install the change trigger: {e}"),
            });
        }
    }
    Ok(())
}

/// One consistent read of several tables and queries: a read-only, repeatable-read
/// transaction, so every file of one version shows the database at one moment.
pub struct Snapshot {
    tx: Transaction<'static, Postgres>,
}

impl Snapshot {
    pub async fn begin(pool: &PgPool) -> Result<Snapshot, SourceError> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let timeout = format!("SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'");
        sqlx::query(&timeout).execute(&mut *tx).await?;
        Ok(Snapshot { tx })
    }

    /// The canonical JSON of `table`, sorted by its primary key.
    pub async fn table(&mut self, table: &str) -> Result<Vec<u8>, SourceError> {
        let key: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::TEXT FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = $1::TEXT::regclass AND i.indisprimary
              ORDER BY array_position(i.indkey::INT2[], a.attnum)",
        )
        .bind(quoted(table))
        .fetch_all(&mut *self.tx)
        .await
        .map_err(|e| SourceError::Table {
            table: table.to_owned(),
            message: e.to_string(),
        })?;
        if key.is_empty() {
            return Err(SourceError::Table {
                table: table.to_owned(),
                message: "it has no primary key to sort its rows by; name it in `queries` \
                          with an ORDER BY instead"
                    .into(),
            });
        }
        let order: Vec<String> = key.iter().map(|c| format!("t.\"{c}\"")).collect();
        self.rows(
            table,
            &format!(
                "SELECT row_to_json(t)::TEXT FROM {} t ORDER BY {}",
                quoted(table),
                order.join(", ")
            ),
        )
        .await
    }

    /// The canonical JSON of a query's rows, in the order the query gives.
    pub async fn query(&mut self, name: &str, sql: &str) -> Result<Vec<u8>, SourceError> {
        let sql = sql.trim().trim_end_matches(';');
        self.rows(name, &format!("SELECT row_to_json(q)::TEXT FROM ({sql}) q"))
            .await
    }

    async fn rows(&mut self, name: &str, sql: &str) -> Result<Vec<u8>, SourceError> {
        let rows: Vec<String> = sqlx::query_scalar(sql)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(|e| SourceError::Table {
                table: name.to_owned(),
                message: e.to_string(),
            })?;
        Ok(canonical(&rows))
    }

    pub async fn finish(self) -> Result<(), SourceError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

/// `[` newline, the rows separated by a comma and newline, newline `]` newline; `[]` newline
/// for no rows.
pub fn canonical(rows: &[String]) -> Vec<u8> {
    if rows.is_empty() {
        return b"[]\n".to_vec();
    }
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.len() + 2).sum::<usize>() + 4);
    out.extend_from_slice(b"[\n");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\n");
        }
        out.extend_from_slice(row.as_bytes());
    }
    out.extend_from_slice(b"\n]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_is_one_row_per_line() {
        assert_eq!(canonical(&[]), b"[]\n");
        let rows = vec!["{\"id\":1}".to_owned(), "{\"id\":2}".to_owned()];
        assert_eq!(canonical(&rows), b"[\n{\"id\":1},\n{\"id\":2}\n]\n");
    }

    #[test]
    fn names_are_checked() {
        check_table_name("employees").unwrap();
        check_table_name("public.cities").unwrap();
        for bad in ["", "a.b.c", "x;drop", "1abc", "a\"b"] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
        check_file_name("active-staff_2").unwrap();
        assert!(check_file_name("../x").is_err());
        assert_eq!(file_name("public.cities"), "cities");
        assert_eq!(path_of("cities"), "tables/cities.json");
        assert_eq!(quoted("public.cities"), "\"public\".\"cities\"");
    }
}
