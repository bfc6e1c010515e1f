//! Which spaces reference each blob (`synchub_blob_spaces`) and which blobs each token uploaded
//! itself (`synchub_blob_uploads`): what blob reads are authorized through (see
//! `crate::blob_access`); and the token each client id reports under
//! (`synchub_client_tokens`). Written once for both backends over [`Run`]; the `IN` lists are
//! numbered `$N` parameters, which both accept.

use super::StoreError;
use super::dialect::{Param, Run};
use std::collections::HashSet;
use std::fmt::Write as _;
use synchub_protocol::Sha256Hex;

/// Rows per statement: well under SQLite's limit of 32766 parameters.
const CHUNK: usize = 500;

/// `$first, …, $(first + n - 1)` (`NULL` for none: an empty list matches nothing).
pub(super) fn marks(first: usize, n: usize) -> String {
    if n == 0 {
        return "NULL".to_owned();
    }
    let mut out = String::new();
    for i in first..first + n {
        if i > first {
            out.push_str(", ");
        }
        let _ = write!(out, "${i}");
    }
    out
}

/// The `VALUES` of a multi-row insert: `rows` groups of `columns` numbered marks,
/// `($1, $2), ($3, $4)`.
pub(super) fn value_rows(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", marks(r * columns + 1, columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records that `space` references `hashes` (rows already there stay).
pub(super) async fn index<D: Run>(
    d: &D,
    space: &str,
    hashes: &[Sha256Hex],
) -> Result<(), StoreError> {
    for chunk in hashes.chunks(CHUNK) {
        let texts: Vec<String> = chunk.iter().map(|h| h.to_string()).collect();
        let mut sql = String::from("INSERT INTO synchub_blob_spaces (sha256, space) VALUES ");
        let mut params = Vec::with_capacity(texts.len() * 2);
        for (i, h) in texts.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "(${}, ${})", 2 * i + 1, 2 * i + 2);
            params.push(Param::Text(h));
            params.push(Param::Text(space));
        }
        sql.push_str(" ON CONFLICT DO NOTHING");
        d.execute(&sql, &params).await?;
    }
    Ok(())
}

/// Those of `hashes` referenced by one of `spaces` (`None`: any space) or uploaded by the
/// token `token_id`.
pub(super) async fn readable<D: Run>(
    d: &D,
    hashes: &[Sha256Hex],
    spaces: Option<&[String]>,
    token_id: i64,
) -> Result<HashSet<Sha256Hex>, StoreError> {
    let mut found = HashSet::new();
    for chunk in hashes.chunks(CHUNK) {
        let texts: Vec<String> = chunk.iter().map(|h| h.to_string()).collect();
        let mut params: Vec<Param<'_>> = texts.iter().map(|h| Param::Text(h)).collect();
        let mut sql = format!(
            "SELECT sha256 FROM synchub_blob_spaces WHERE sha256 IN ({})",
            marks(1, texts.len())
        );
        if let Some(spaces) = spaces {
            let _ = write!(
                sql,
                " AND space IN ({})",
                marks(params.len() + 1, spaces.len())
            );
            params.extend(spaces.iter().map(|s| Param::Text(s)));
        }
        let _ = write!(
            sql,
            " UNION SELECT sha256 FROM synchub_blob_uploads WHERE token_id = ${} AND sha256 IN ({})",
            params.len() + 1,
            marks(params.len() + 2, texts.len())
        );
        params.push(Param::Int(token_id));
        params.extend(texts.iter().map(|h| Param::Text(h)));
        for row in d.fetch(&sql, &params).await? {
            let h = D::text(&row, "sha256")?;
            let hash = h
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("blob index hash {h:?}: {e}")))?;
            found.insert(hash);
        }
    }
    Ok(found)
}

/// Records that the token `token_id` uploaded `hash`.
pub(super) async fn note_upload<D: Run>(
    d: &D,
    hash: &Sha256Hex,
    token_id: i64,
) -> Result<(), StoreError> {
    let hash = hash.to_string();
    d.execute(
        "INSERT INTO synchub_blob_uploads (sha256, token_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[Param::Text(&hash), Param::Int(token_id)],
    )
    .await?;
    Ok(())
}

/// The token `client_id` is bound to: `token_id` when it was not bound yet.
pub(super) async fn bind_client<D: Run>(
    d: &D,
    client_id: &str,
    token_id: i64,
) -> Result<i64, StoreError> {
    // One statement, one round trip: the row as it is after the insert, a new one or the
    // one already there (the no-op update makes `RETURNING` give the existing owner).
    let rows = d
        .fetch(
            "INSERT INTO synchub_client_tokens (client_id, token_id) VALUES ($1, $2) \
             ON CONFLICT (client_id) DO UPDATE SET token_id = synchub_client_tokens.token_id \
             RETURNING token_id",
            &[Param::Text(client_id), Param::Int(token_id)],
        )
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| StoreError::Corrupt(format!("client id {client_id} was not bound")))?;
    Ok(D::int(row, "token_id")?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_are_numbered_from_first() {
        assert_eq!(super::marks(3, 2), "$3, $4");
        assert_eq!(super::marks(1, 0), "NULL");
        assert_eq!(super::value_rows(2, 2), "($1, $2), ($3, $4)");
    }
}
