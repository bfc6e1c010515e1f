//! The audit log: every admin action (force-sync, rollback, token create and revoke, held
//! change approve and reject) is recorded with who did it (the token's name), what, to what,
//! when and from which address, after it succeeded. `GET /api/v1/audit` and `synchub audit`
//! read it.
//!
//! A failed audit write does not undo the action (it happened); it is logged as an error, so
//! a missing row is never silent.

use crate::store::Store;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use std::convert::Infallible;
use std::net::SocketAddr;

/// Who an admin action is recorded as on the command line (`synchub token`, `approve`, ...),
/// as versions made there record it in `by`.
pub const COMMAND_LINE: &str = "cli";

/// The actions recorded, as they appear in the `action` column.
pub mod actions {
    pub const FORCE_SYNC: &str = "force_sync";
    pub const ROLLBACK: &str = "rollback";
    pub const TOKEN_CREATE: &str = "token_create";
    pub const TOKEN_REVOKE: &str = "token_revoke";
    pub const HELD_APPROVE: &str = "held_approve";
    pub const HELD_REJECT: &str = "held_reject";
}

/// The address a request came from, for the audit log (`None` when the server did not record
/// one, as in some tests).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// Records one admin action that succeeded.
pub async fn record(store: &dyn Store, who: &str, action: &str, target: &str, from: Peer) {
    let from = from.0.map(|a| a.ip().to_string());
    if let Err(e) = store
        .record_audit(who, action, target, from.as_deref())
        .await
    {
        tracing::error!(error = %e, who, action, target, "could not write the audit log");
    }
}
