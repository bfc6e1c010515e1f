//! Held changes: an agent in two-way mode that holds back a local mass change (its
//! mass-change guard) records it here and asks, every few seconds, what an admin decided; an
//! admin lists them and approves (the agent publishes the change) or rejects (the agent puts
//! its files back). Written over a [`Domain`], so the HTTP routes (`api/held.rs`) and the
//! command line (`synchub held|approve|reject`) run the same code.

use crate::domain::Domain;
use crate::error::HubError;
use std::collections::HashMap;
use std::sync::Mutex;
use synchub_protocol::{HeldChange, HeldDecision, HeldRecord, codes};

/// Longest accepted client id, in bytes (as for `sync_log` reports).
const MAX_CLIENT_ID: usize = 128;

/// Most held changes [`Heard`] remembers; past it, it starts over (at worst an alert twice).
const HEARD_MAX: usize = 10_000;

/// The held changes this hub replica has heard of, by space and client id, with when the
/// agent held each. An agent repeats its `PUT` every few seconds while it waits; only the
/// first of a held change is news for the dashboard's event stream and the alerts.
#[derive(Default)]
pub struct Heard(Mutex<HashMap<(String, String), String>>);

impl Heard {
    /// True the first time this replica hears of `record`'s held change.
    pub fn first(&self, record: &HeldRecord) -> bool {
        let mut heard = self.lock();
        let key = (record.space.clone(), record.client_id.clone());
        if heard.get(&key) == Some(&record.change.held_at) {
            return false;
        }
        if heard.len() >= HEARD_MAX {
            heard.clear();
        }
        heard.insert(key, record.change.held_at.clone());
        true
    }

    /// The agent acted on its held change; a later one is news again.
    pub fn forget(&self, space: &str, client: &str) {
        self.lock().remove(&(space.to_owned(), client.to_owned()));
    }

    /// Only whole entries are ever written, so a panic elsewhere cannot leave it wrong.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Checks a client id from a path.
pub fn client_id(id: &str) -> Result<&str, HubError> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID || id.chars().any(char::is_control) {
        return Err(HubError::bad_request(
            codes::BAD_REQUEST,
            format!("client_id must be 1 to {MAX_CLIENT_ID} bytes without control characters"),
        ));
    }
    Ok(id)
}

/// Records (or refreshes) an agent's held change and returns it with the decision so far.
pub async fn record(
    domain: &Domain,
    space: &str,
    client: &str,
    change: &HeldChange,
) -> Result<HeldRecord, HubError> {
    client_id(client)?;
    change
        .validate()
        .map_err(|e| HubError::bad_request(codes::BAD_REQUEST, e))?;
    Ok(domain.store.put_held(space, client, change).await?)
}

/// Every held change, oldest first.
pub async fn list(domain: &Domain) -> Result<Vec<HeldRecord>, HubError> {
    Ok(domain.store.held_changes().await?)
}

/// An admin's decision on a pending held change; 404 when there is none.
pub async fn decide(
    domain: &Domain,
    space: &str,
    client: &str,
    decision: HeldDecision,
    by: &str,
) -> Result<(), HubError> {
    client_id(client)?;
    synchub_protocol::validate_space(space)
        .map_err(|e| HubError::bad_request(codes::BAD_REQUEST, e.to_string()))?;
    if !domain
        .store
        .decide_held(space, client, decision, by)
        .await?
    {
        return Err(HubError::NotFound(format!(
            "no pending held change of {client:?} in {space:?}"
        )));
    }
    tracing::info!(
        space,
        client,
        decision = decision.as_str(),
        by,
        "held change decided"
    );
    Ok(())
}

/// Forgets a held change the agent has acted on.
pub async fn forget(domain: &Domain, space: &str, client: &str) -> Result<(), HubError> {
    client_id(client)?;
    Ok(domain.store.delete_held(space, client).await?)
}
