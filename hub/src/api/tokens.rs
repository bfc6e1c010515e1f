//! Tokens from the dashboard (admin): list them (never their secrets), create one (its secret
//! is in the answer, the only time it is shown) and revoke one. Changes take effect on this
//! replica at once (a revoked token's sockets are closed) and on the others when their store
//! watcher sees the token table change, as with `synchub token` on the command line.

use crate::api::Json;
use crate::audit::{self, Peer, actions};
use crate::auth::AdminToken;
use crate::error::{ApiResult, HubError};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use synchub_protocol::{CreateTokenRequest, CreatedToken, TokenInfo, codes};

/// Longest token name, as on the command line.
const MAX_NAME: usize = 128;
/// Most spaces one token may be limited to.
const MAX_SPACES: usize = 100;

/// `GET /tokens`
pub async fn list(
    State(state): State<AppState>,
    _admin: AdminToken,
) -> ApiResult<axum::Json<Vec<TokenInfo>>> {
    let tokens = state.store.tokens().await?;
    Ok(axum::Json(
        tokens
            .into_iter()
            .map(|t| TokenInfo {
                name: t.name,
                role: t.role,
                spaces: t.spaces,
                created_at: t.created_at,
                revoked: t.revoked,
            })
            .collect(),
    ))
}

/// `POST /tokens`: 201 with the secret; 409 when a token has that name already.
pub async fn create(
    State(state): State<AppState>,
    AdminToken(principal): AdminToken,
    peer: Peer,
    Json(req): Json<CreateTokenRequest>,
) -> ApiResult<(StatusCode, axum::Json<CreatedToken>)> {
    let name = req.name.trim();
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(HubError::bad_request(
            codes::BAD_REQUEST,
            format!("a token name is 1 to {MAX_NAME} bytes of printable text"),
        ));
    }
    let spaces = req.spaces.filter(|s| !s.is_empty());
    if let Some(list) = &spaces {
        if list.len() > MAX_SPACES {
            return Err(HubError::TooLarge(format!(
                "at most {MAX_SPACES} spaces per token"
            )));
        }
        for s in list {
            synchub_protocol::validate_space(s)
                .map_err(|e| HubError::bad_request(codes::BAD_REQUEST, e.to_string()))?;
        }
    }
    let secret =
        crate::auth::create_token(state.store.as_ref(), name, req.role, spaces.as_deref()).await?;
    state.tokens.reload(state.store.as_ref()).await?;
    tracing::info!(
        name,
        role = req.role.as_str(),
        by = principal.name,
        "token created"
    );
    let target = format!("{name} ({})", req.role.as_str());
    let store = state.store.as_ref();
    audit::record(store, &principal.name, actions::TOKEN_CREATE, &target, peer).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            name: name.to_owned(),
            role: req.role,
            secret,
        }),
    ))
}

/// `DELETE /tokens/{name}`: 204; 404 when no live token has that name. The token in use for
/// this request cannot revoke itself (the page would lock its admin out).
pub async fn revoke(
    State(state): State<AppState>,
    AdminToken(principal): AdminToken,
    peer: Peer,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if name == principal.name {
        return Err(HubError::bad_request(
            codes::BAD_REQUEST,
            "this is the token you are signed in with; revoke it with another admin token",
        ));
    }
    if !state.store.revoke_token(&name).await? {
        return Err(HubError::NotFound(format!("no live token named {name:?}")));
    }
    let gone = state.tokens.reload(state.store.as_ref()).await?;
    state.clients.revoke(&gone);
    tracing::info!(name, by = principal.name, "token revoked");
    let store = state.store.as_ref();
    audit::record(store, &principal.name, actions::TOKEN_REVOKE, &name, peer).await;
    Ok(StatusCode::NO_CONTENT)
}
