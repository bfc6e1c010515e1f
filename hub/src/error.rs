//! The hub's error type and its one mapping to a status, a stable `code` (see
//! `synchub_protocol::codes`) and the message a caller is shown, used by the HTTP API (a JSON
//! `ApiError` body) and by the socket task (an `error` frame) alike.
//!
//! A 503 says why (the database is down, the head kept moving, no data yet): the caller can
//! act on it by retrying later. Other server errors are logged with their detail and shown as
//! a generic "internal error", so nothing internal leaks to a client.

use crate::blobs::BlobError;
use crate::store::StoreError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use synchub_protocol::{ApiError, Head, codes};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{code}: {message}")]
    BadRequest { code: &'static str, message: String },
    #[error("missing or unknown bearer token")]
    Unauthorized,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("commit conflicts with version {} on {} path(s)", head.version, paths.len())]
    Conflict { paths: Vec<String>, head: Box<Head> },
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("{0}")]
    HashMismatch(String),
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Too many wrong tokens from this address: 429 until the window passes.
    #[error("{0}")]
    RateLimited(String),
    /// The request body stopped arriving for longer than `limits.body_idle_timeout_ms`: 408.
    #[error(
        "the request body stopped arriving for longer than limits.body_idle_timeout_ms; \
         nothing was stored"
    )]
    BodyTimeout,
    /// The space is served but the hub holds no data for it yet (adopted without content):
    /// 503 with the reason shown, so agents stay blocked and say why.
    #[error("{0}")]
    NoData(String),
    /// Over the bound of concurrent downloads: 503 with `Retry-After`, not a failure.
    #[error("the hub is serving as many downloads as it may; try again in {retry_after_secs} s")]
    Busy { retry_after_secs: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(BlobError),
}

impl HubError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        HubError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status and stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            HubError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            HubError::Unauthorized => (StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED),
            HubError::Forbidden(_) => (StatusCode::FORBIDDEN, codes::FORBIDDEN),
            HubError::NotFound(_) => (StatusCode::NOT_FOUND, codes::NOT_FOUND),
            HubError::Conflict { .. } => (StatusCode::CONFLICT, codes::CONFLICT),
            HubError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, codes::TOO_LARGE),
            HubError::HashMismatch(_) => (StatusCode::UNPROCESSABLE_ENTITY, codes::HASH_MISMATCH),
            HubError::RangeNotSatisfiable { .. } => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                codes::RANGE_NOT_SATISFIABLE,
            ),
            HubError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE),
            HubError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, codes::RATE_LIMITED),
            HubError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, codes::REQUEST_TIMEOUT),
            HubError::NoData(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::NO_DATA),
            HubError::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, codes::BUSY),
            HubError::Store(StoreError::NoSuchSpace(_)) => {
                (StatusCode::NOT_FOUND, codes::NOT_FOUND)
            }
            HubError::Store(StoreError::DuplicateToken(_)) => {
                (StatusCode::CONFLICT, codes::CONFLICT)
            }
            // Out of disk: nothing was stored, and the caller is told so (507).
            HubError::Store(e) if db_full(e) => {
                (StatusCode::INSUFFICIENT_STORAGE, codes::STORAGE_FULL)
            }
            HubError::Blob(BlobError::Io(e)) if io_full(e) => {
                (StatusCode::INSUFFICIENT_STORAGE, codes::STORAGE_FULL)
            }
            // The database is down or restarting: a retry later will do.
            HubError::Store(StoreError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed,
            )) => (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE),
            HubError::Blob(BlobError::Corrupt { .. }) => {
                (StatusCode::INTERNAL_SERVER_ERROR, codes::CORRUPT_DATA)
            }
            HubError::Store(_) | HubError::Blob(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL)
            }
        }
    }
}

/// The database could not write for lack of space (SQLite `SQLITE_FULL`, PostgreSQL
/// `disk_full`).
fn db_full(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Io(io)) => io_full(io),
        StoreError::Database(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("13" | "53100"))
        }
        _ => false,
    }
}

fn io_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl From<BlobError> for HubError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::NotFound(h) => HubError::NotFound(format!("blob {h}")),
            BlobError::HashMismatch { .. } => HubError::HashMismatch(e.to_string()),
            BlobError::TooLarge { .. } => HubError::TooLarge(e.to_string()),
            BlobError::BadRange { size, .. } => HubError::RangeNotSatisfiable { size },
            BlobError::Interrupted(ref io) if is_body_timeout(io) => HubError::BodyTimeout,
            BlobError::Interrupted(_) => {
                HubError::bad_request(codes::BAD_REQUEST, format!("{e}; nothing was stored"))
            }
            other => HubError::Blob(other),
        }
    }
}

impl HubError {
    /// The code and the message a caller is shown, logging what it is not shown: the one
    /// mapping behind both [`IntoResponse`] and the socket's `error` frames.
    pub fn code_and_message(&self) -> (&'static str, String) {
        let (status, code) = self.status_and_code();
        (code, self.shown_message(status))
    }

    fn shown_message(&self, status: StatusCode) -> String {
        if !status.is_server_error() {
            return self.to_string();
        }
        match self {
            HubError::NoData(m) => m.clone(),
            // Expected in a rush; counted in `synchub_downloads_refused_total`, not logged.
            HubError::Busy { .. } => self.to_string(),
            HubError::Unavailable(_) => {
                tracing::warn!(error = %self, "request refused for now");
                self.to_string()
            }
            _ if status == StatusCode::INSUFFICIENT_STORAGE => {
                tracing::error!(error = %self, "out of disk space");
                "the hub's disk is full: nothing was stored; free space on the hub and try again"
                    .to_owned()
            }
            // Says which blob and what to run; the hash is no secret.
            HubError::Blob(BlobError::Corrupt { .. }) => {
                tracing::error!(error = %self, "corrupt data in the blob store");
                self.to_string()
            }
            HubError::Store(StoreError::Database(e))
                if status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                tracing::warn!(error = %e, "database unavailable");
                format!("database unavailable: {e}")
            }
            _ => {
                tracing::error!(error = %self, "request failed");
                // Internal details go to the log, not to clients.
                "internal error; see the hub's log".to_owned()
            }
        }
    }
}

impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = self.shown_message(status);
        let retry_after = match &self {
            HubError::Busy { retry_after_secs } => Some(HeaderValue::from(*retry_after_secs)),
            _ => None,
        };
        let (conflicts, head) = match self {
            HubError::Conflict { paths, head } => (paths, Some(*head)),
            _ => (Vec::new(), None),
        };
        let body = ApiError {
            code: code.to_owned(),
            message,
            conflicts,
            head,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(value) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, HubError>;

/// True when `e`, or an error it wraps, is the request body's idle timeout (tower-http's
/// `TimeoutError`, from the layer `api::router` puts on every body).
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503_says_why_and_other_server_errors_do_not_leak() {
        let down = HubError::Store(StoreError::Database(sqlx::Error::PoolTimedOut));
        assert_eq!(down.status_and_code().0, StatusCode::SERVICE_UNAVAILABLE);
        let (code, message) = down.code_and_message();
        assert_eq!(code, codes::UNAVAILABLE);
        assert!(message.starts_with("database unavailable: "), "{message}");
        let (code, message) =
            HubError::Unavailable("the head kept moving".into()).code_and_message();
        assert_eq!(code, codes::UNAVAILABLE);
        assert!(message.contains("the head kept moving"), "{message}");
        let corrupt = HubError::Store(StoreError::Corrupt("secret detail".into()));
        let (code, message) = corrupt.code_and_message();
        assert_eq!(code, codes::INTERNAL);
        assert!(!message.contains("secret detail"), "{message}");
    }

    #[test]
    fn client_errors_keep_their_code_and_message() {
        let (code, message) =
            HubError::Forbidden("token \"pc\" may not use space \"x\"".into()).code_and_message();
        assert_eq!(code, codes::FORBIDDEN);
        assert!(message.contains("may not use space"), "{message}");
    }
}
