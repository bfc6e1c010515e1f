//! The API's error type and its one mapping to an HTTP status and a JSON body with a stable
//! `code` (see `synchub_protocol::codes`).

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
    /// The space is served but the hub holds no data for it yet (adopted without content):
    /// 503 with the reason shown, so agents stay blocked and say why.
    #[error("{0}")]
    NoData(String),
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

    fn status_and_code(&self) -> (StatusCode, &'static str) {
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
            HubError::NoData(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::NO_DATA),
            HubError::Store(StoreError::NoSuchSpace(_)) => {
                (StatusCode::NOT_FOUND, codes::NOT_FOUND)
            }
            HubError::Store(StoreError::DuplicateToken(_)) => {
                (StatusCode::CONFLICT, codes::CONFLICT)
            }
            // The database is down or restarting: a retry later will do.
            HubError::Store(StoreError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed,
            )) => (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE),
            HubError::Store(_) | HubError::Blob(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL)
            }
        }
    }
}

impl From<BlobError> for HubError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::NotFound(h) => HubError::NotFound(format!("blob {h}")),
            BlobError::HashMismatch { .. } => HubError::HashMismatch(e.to_string()),
            BlobError::TooLarge { .. } => HubError::TooLarge(e.to_string()),
            BlobError::BadRange { size, .. } => HubError::RangeNotSatisfiable { size },
            BlobError::Interrupted(_) => {
                HubError::bad_request(codes::BAD_REQUEST, format!("{e}; nothing was stored"))
            }
            other => HubError::Blob(other),
        }
    }
}

impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let expected = matches!(self, HubError::NoData(_));
        if status.is_server_error() && !expected {
            tracing::error!(error = %self, "request failed");
        }
        let message = if status.is_server_error() && !expected {
            // Internal details go to the log, not to clients.
            "internal error; see the hub's log".to_owned()
        } else {
            self.to_string()
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
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, HubError>;
