//! Which spaces reference each blob (`synchub_blob_spaces`) and which blobs each token uploaded
//! itself (`synchub_blob_uploads`): what blob reads are authorized through (see
//! `crate::blob_access`). The SQL is the same for both backends; sqlx's `QueryBuilder` writes
//! each one's parameter marks, so it is written once here and instantiated for each.

use super::StoreError;
use std::collections::HashSet;
use synchub_protocol::Sha256Hex;

/// Rows per statement: two parameters each, well under SQLite's limit of 32766.
const CHUNK: usize = 500;

fn parse(hashes: Vec<String>) -> Result<HashSet<Sha256Hex>, StoreError> {
    hashes
        .into_iter()
        .map(|h| {
            h.parse()
                .map_err(|e| StoreError::Corrupt(format!("blob index hash {h:?}: {e}")))
        })
        .collect()
}

macro_rules! blob_index_queries {
    ($name:ident, $db:ty) => {
        pub(super) mod $name {
            use super::*;
            use sqlx::{Pool, QueryBuilder};

            /// Records that `space` references `hashes` (rows already there stay).
            pub async fn index(
                pool: &Pool<$db>,
                space: &str,
                hashes: &[Sha256Hex],
            ) -> Result<(), StoreError> {
                for chunk in hashes.chunks(CHUNK) {
                    let mut q: QueryBuilder<'_, $db> =
                        QueryBuilder::new("INSERT INTO synchub_blob_spaces (sha256, space) ");
                    q.push_values(chunk, |mut row, h| {
                        row.push_bind(h.to_string()).push_bind(space);
                    });
                    q.push(" ON CONFLICT DO NOTHING");
                    q.build().execute(pool).await?;
                }
                Ok(())
            }

            /// Those of `hashes` referenced by one of `spaces` (`None`: any space) or uploaded
            /// by the token `token_id`.
            pub async fn readable(
                pool: &Pool<$db>,
                hashes: &[Sha256Hex],
                spaces: Option<&[String]>,
                token_id: i64,
            ) -> Result<HashSet<Sha256Hex>, StoreError> {
                let mut found = HashSet::new();
                for chunk in hashes.chunks(CHUNK) {
                    let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                        "SELECT sha256 FROM synchub_blob_spaces WHERE sha256 IN (",
                    );
                    push_list(&mut q, chunk.iter().map(|h| h.to_string()));
                    if let Some(spaces) = spaces {
                        q.push(" AND space IN (");
                        push_list(&mut q, spaces.iter().cloned());
                    }
                    q.push(" UNION SELECT sha256 FROM synchub_blob_uploads WHERE token_id = ");
                    q.push_bind(token_id);
                    q.push(" AND sha256 IN (");
                    push_list(&mut q, chunk.iter().map(|h| h.to_string()));
                    let rows: Vec<(String,)> = q.build_query_as().fetch_all(pool).await?;
                    found.extend(parse(rows.into_iter().map(|(h,)| h).collect())?);
                }
                Ok(found)
            }

            /// Records that the token `token_id` uploaded `hash`.
            pub async fn note_upload(
                pool: &Pool<$db>,
                hash: &Sha256Hex,
                token_id: i64,
            ) -> Result<(), StoreError> {
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "INSERT INTO synchub_blob_uploads (sha256, token_id) VALUES (",
                );
                q.push_bind(hash.to_string());
                q.push(", ");
                q.push_bind(token_id);
                q.push(") ON CONFLICT DO NOTHING");
                q.build().execute(pool).await?;
                Ok(())
            }

            /// The token `client_id` is bound to: `token_id` when it was not bound yet.
            pub async fn bind_client(
                pool: &Pool<$db>,
                client_id: &str,
                token_id: i64,
            ) -> Result<i64, StoreError> {
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "INSERT INTO synchub_client_tokens (client_id, token_id) VALUES (",
                );
                q.push_bind(client_id);
                q.push(", ");
                q.push_bind(token_id);
                q.push(") ON CONFLICT DO NOTHING");
                q.build().execute(pool).await?;
                let mut q: QueryBuilder<'_, $db> = QueryBuilder::new(
                    "SELECT token_id FROM synchub_client_tokens WHERE client_id = ",
                );
                q.push_bind(client_id);
                let (owner,): (i64,) = q.build_query_as().fetch_one(pool).await?;
                Ok(owner)
            }

            /// `v1, v2, …)`: a parenthesized list's values and its closing parenthesis (an
            /// empty list matches nothing).
            fn push_list(q: &mut QueryBuilder<'_, $db>, values: impl Iterator<Item = String>) {
                let mut any = false;
                {
                    let mut list = q.separated(", ");
                    for v in values {
                        list.push_bind(v);
                        any = true;
                    }
                }
                if !any {
                    q.push("NULL");
                }
                q.push(")");
            }
        }
    };
}

blob_index_queries!(sqlite, sqlx::Sqlite);
blob_index_queries!(postgres, sqlx::Postgres);
