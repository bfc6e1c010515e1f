//! The client library's error type: one enum with variants a caller can act on (retry later,
//! fix the configuration, resolve a conflict), shared by download, apply, publish and the
//! connection code. Binaries wrap it in `anyhow`.

use synchub_protocol::{ApiError, Head, ManifestError, PathError, Sha256Hex};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub could not be reached or the connection broke: retry later.
    #[error("hub unreachable: {0}")]
    Unreachable(String),
    /// The hub answered with an error body.
    #[error("hub answered {status}: {} ({})", .error.message, .error.code)]
    Api { status: u16, error: Box<ApiError> },
    /// Bytes from the hub did not match their announced sha256 (manifest or blob).
    #[error("hash mismatch for {what}: expected {expected}, got {actual}")]
    HashMismatch {
        what: String,
        expected: Sha256Hex,
        actual: Sha256Hex,
    },
    /// A blob or pack ended before its announced size.
    #[error("truncated download of {0}")]
    Truncated(String),
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("unsafe path: {0}")]
    Path(#[from] PathError),
    /// A commit lost against a newer head; `conflicts` are the paths the newer head touched.
    #[error("conflict with version {} on {} path(s): {}", .head.as_ref().map_or(0, |h| h.version), .conflicts.len(), .conflicts.join(", "))]
    Conflict {
        conflicts: Vec<String>,
        head: Option<Box<Head>>,
    },
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The client is shutting down.
    #[error("shut down")]
    Shutdown,
    /// A newer head arrived while a sync was under way: that sync stops for the newer one.
    #[error("a newer head arrived")]
    Superseded,
}

impl ClientError {
    /// Wraps an I/O error with what was being done (usually the path).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> Self {
        // Include the source chain: reqwest's top-level message alone says little.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        ClientError::Unreachable(msg)
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Adds a context to I/O results: `fs::read(p).ctx(|| format!("reading {p:?}"))`.
pub(crate) trait IoContext<T> {
    fn ctx<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| ClientError::io(f(), e))
    }
}
