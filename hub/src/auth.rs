//! Bearer tokens: random secrets handed out once and stored only as their sha256, with a
//! capability (`read`, `publish` or `admin`, see [`Role`]) and optionally a list of spaces.
//!
//! Every request is checked against an in-memory copy of the live tokens ([`Tokens`]), reloaded
//! when the store reports that the token table changed, so that authenticating the 1-second
//! fallback checks of thousands of agents costs no database query.

use crate::error::HubError;
use crate::store::{Store, StoreError, TokenRecord};
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::header;
use axum::http::request::Parts;
use rand::RngCore;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};
use synchub_protocol::{Role, Sha256Hex, codes};

/// Who is calling: a live token's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub token_id: i64,
    pub name: String,
    pub role: Role,
    pub spaces: Option<Vec<String>>,
}

impl Principal {
    pub fn may_use_space(&self, space: &str) -> bool {
        self.role == Role::Admin
            || self
                .spaces
                .as_ref()
                .is_none_or(|list| list.iter().any(|s| s == space))
    }

    pub fn require_space(&self, space: &str) -> Result<(), HubError> {
        if self.may_use_space(space) {
            Ok(())
        } else {
            Err(HubError::Forbidden(format!(
                "token {:?} may not use space {space:?}",
                self.name
            )))
        }
    }

    pub fn require_admin(&self) -> Result<(), HubError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(HubError::Forbidden(format!(
                "token {:?} may {}; this needs an admin token",
                self.name,
                self.role.as_str()
            )))
        }
    }

    /// Checks that this token may commit to `space`: `publish` on it, or `admin`.
    pub fn require_publish(&self, space: &str) -> Result<(), HubError> {
        self.require_space(space)?;
        if self.role.may_publish() {
            Ok(())
        } else {
            Err(HubError::Forbidden(format!(
                "token {:?} may only read; committing to {space:?} needs publish",
                self.name
            )))
        }
    }
}

/// A new random token secret: `shb_` and 64 hex characters.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("shb_{}", hex::encode(bytes))
}

/// What is stored for a secret.
pub fn hash_secret(secret: &str) -> String {
    Sha256Hex::of(secret.as_bytes()).to_string()
}

/// Creates a token and returns its secret, which is shown once and never stored.
pub async fn create_token(
    store: &dyn Store,
    name: &str,
    role: Role,
    spaces: Option<&[String]>,
) -> Result<String, StoreError> {
    let secret = generate_secret();
    store
        .create_token(name, role, spaces, &hash_secret(&secret))
        .await?;
    Ok(secret)
}

/// The live tokens, by hash of their secret.
#[derive(Default)]
pub struct Tokens {
    by_hash: RwLock<Arc<HashMap<String, Principal>>>,
    /// Wrong tokens per client address, for the rate limit in [`FailedAuth`].
    pub failures: FailedAuth,
    /// Reloads run one at a time: two that overlapped could install the older read last, and
    /// a token created in between would look revoked (its sockets closed).
    reloading: tokio::sync::Mutex<()>,
}

impl Tokens {
    /// Reloads from the store; returns the ids of tokens that were live and are not any more.
    pub async fn reload(&self, store: &dyn Store) -> Result<Vec<i64>, StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        let records = store.tokens().await?;
        let live: HashMap<String, Principal> = records
            .into_iter()
            .filter(|t| !t.revoked)
            .map(|t: TokenRecord| {
                (
                    t.token_hash,
                    Principal {
                        token_id: t.id,
                        name: t.name,
                        role: t.role,
                        spaces: t.spaces,
                    },
                )
            })
            .collect();
        let live = Arc::new(live);
        let old = std::mem::replace(
            &mut *self.by_hash.write().expect("token lock poisoned"),
            live.clone(),
        );
        // Gone: revoked or deleted, and also changed (role or spaces), whose sockets were
        // admitted under the old rights; their agents reconnect under the new ones.
        let still: HashMap<i64, &Principal> = live.values().map(|p| (p.token_id, p)).collect();
        Ok(old
            .values()
            .filter(|p| still.get(&p.token_id) != Some(p))
            .map(|p| p.token_id)
            .collect())
    }

    /// True while the token of `principal` is live with the same rights: a socket checks it
    /// once registered, so a revocation between the upgrade and `hello` is not missed.
    pub fn is_current(&self, principal: &Principal) -> bool {
        let map = self.by_hash.read().expect("token lock poisoned").clone();
        map.values().any(|p| p == principal)
    }

    pub fn authenticate(&self, secret: &str) -> Option<Principal> {
        let map = self.by_hash.read().expect("token lock poisoned").clone();
        map.get(&hash_secret(secret)).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.read().expect("token lock poisoned").is_empty()
    }
}

/// Anything that can authenticate a request (the app state).
pub trait HasTokens {
    fn tokens(&self) -> &Tokens;
}

impl<S> FromRequestParts<S> for Principal
where
    S: HasTokens + Send + Sync,
{
    type Rejection = HubError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HubError> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(HubError::Unauthorized)?;
        let secret = value
            .to_str()
            .ok()
            .and_then(bearer_secret)
            .ok_or(HubError::Unauthorized)?;
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let failures = &state.tokens().failures;
        if let Some(ip) = peer
            && failures.is_blocked(ip)
        {
            return Err(HubError::RateLimited(format!(
                "too many wrong tokens from {ip}; try again in a minute"
            )));
        }
        let Some(principal) = state.tokens().authenticate(secret) else {
            if let Some(ip) = peer {
                failures.note(ip);
            }
            return Err(HubError::Unauthorized);
        };
        if let Some(connection) = parts.extensions.get::<crate::connections::ConnectionAuth>() {
            connection.authenticated();
        }
        Ok(principal)
    }
}

/// Wrong tokens an address may send per [`FAILURE_WINDOW`] before its requests with a token
/// get 429 for the rest of the window. Guessing a 256-bit token is hopeless anyway; this keeps
/// a scanner from costing the hub work and filling its logs.
pub const MAX_FAILURES: u32 = 100;
pub const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses remembered at most (old windows are dropped first).
const MAX_TRACKED: usize = 100_000;

/// Wrong tokens per client address in the current window.
#[derive(Default)]
pub struct FailedAuth(std::sync::Mutex<HashMap<std::net::IpAddr, (std::time::Instant, u32)>>);

impl FailedAuth {
    pub fn is_blocked(&self, ip: std::net::IpAddr) -> bool {
        let map = self.0.lock().expect("lock");
        map.get(&ip)
            .is_some_and(|(since, n)| *n >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW)
    }

    pub fn note(&self, ip: std::net::IpAddr) {
        let mut map = self.0.lock().expect("lock");
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = map.entry(ip).or_insert((std::time::Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (std::time::Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// The secret of an `Authorization: Bearer SECRET` value; the scheme is case-insensitive
/// (RFC 9110), so `bearer` and `BEARER` work too.
fn bearer_secret(value: &str) -> Option<&str> {
    let (scheme, secret) = value.trim().split_once(' ')?;
    let secret = secret.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !secret.is_empty()).then_some(secret)
}

/// A live admin token: the extractor of admin-only routes that name no space.
pub struct AdminToken(pub Principal);

impl<S> FromRequestParts<S> for AdminToken
where
    S: HasTokens + Send + Sync,
{
    type Rejection = HubError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HubError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        principal.require_admin()?;
        Ok(AdminToken(principal))
    }
}

/// What a route does with a space, as a marker type for [`SpaceAccess`]: each says which
/// tokens may do it.
pub trait Access: Send + Sync + 'static {
    /// Checks that `principal` may do this with `space`.
    fn check(principal: &Principal, space: &str) -> Result<(), HubError>;
}

/// Read a space: its head, manifests, and follow it.
pub struct Read;
/// Write new versions of a space by committing.
pub struct Publish;
/// Administer a space: its history, force-syncs and rollbacks.
pub struct Admin;

impl Access for Read {
    fn check(principal: &Principal, space: &str) -> Result<(), HubError> {
        principal.require_space(space)
    }
}

impl Access for Publish {
    fn check(principal: &Principal, space: &str) -> Result<(), HubError> {
        principal.require_publish(space)
    }
}

impl Access for Admin {
    fn check(principal: &Principal, _space: &str) -> Result<(), HubError> {
        principal.require_admin()
    }
}

/// The `{space}` of the route, well-formed, and a live token allowed `A` on it: 401 without a
/// token, 400 for a malformed name, 403 when the token may not.
pub struct SpaceAccess<A> {
    pub principal: Principal,
    pub space: String,
    access: PhantomData<A>,
}

impl<S, A> FromRequestParts<S> for SpaceAccess<A>
where
    S: HasTokens + Send + Sync,
    A: Access,
{
    type Rejection = HubError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HubError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| HubError::bad_request(codes::BAD_REQUEST, e.body_text()))?;
        let space = params
            .iter()
            .find(|(name, _)| *name == "space")
            .map(|(_, value)| value.to_owned())
            .ok_or_else(|| HubError::NotFound("no space in this route".into()))?;
        synchub_protocol::validate_space(&space)
            .map_err(|e| HubError::bad_request(codes::BAD_REQUEST, e.to_string()))?;
        A::check(&principal, &space)?;
        Ok(SpaceAccess {
            principal,
            space,
            access: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_secret("Bearer abc"), Some("abc"));
        assert_eq!(bearer_secret("bearer abc"), Some("abc"));
        assert_eq!(bearer_secret("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_secret("Basic abc"), None);
        assert_eq!(bearer_secret("Bearer "), None);
        assert_eq!(bearer_secret("Bearerabc"), None);
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let a = generate_secret();
        assert_ne!(a, generate_secret());
        assert!(a.starts_with("shb_") && a.len() == 68);
        assert_ne!(hash_secret(&a), a);
        assert_eq!(hash_secret(&a).len(), 64);
    }

    #[test]
    fn space_limits() {
        let p = Principal {
            token_id: 1,
            name: "pc1".into(),
            role: Role::Agent,
            spaces: Some(vec!["a".into()]),
        };
        assert!(p.may_use_space("a"));
        assert!(!p.may_use_space("b"));
        assert!(p.require_admin().is_err());
        let admin = Principal {
            role: Role::Admin,
            ..p
        };
        assert!(admin.may_use_space("b"));
    }

    #[test]
    fn only_publish_and_admin_commit() {
        let reader = Principal {
            token_id: 1,
            name: "pc1".into(),
            role: Role::Read,
            spaces: Some(vec!["a".into()]),
        };
        assert!(reader.require_space("a").is_ok());
        assert!(reader.require_publish("a").is_err());
        let publisher = Principal {
            role: Role::Publish,
            ..reader.clone()
        };
        assert!(publisher.require_publish("a").is_ok());
        assert!(publisher.require_publish("b").is_err());
        let admin = Principal {
            role: Role::Admin,
            ..reader
        };
        assert!(admin.require_publish("b").is_ok());
    }
}
