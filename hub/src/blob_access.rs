//! Who may read and write which blobs. Blobs are named by content and shared by every space,
//! so a blob is readable by a token when a space the token may read references it (an index,
//! hash -> spaces, filled as versions are written) or when the token uploaded it itself (a
//! publish in progress). Uploading needs `publish` on some space and counts against the
//! token's hourly upload quota (`limits.upload_bytes_per_token_per_hour`).
//!
//! Versions written by this hub index their new entries as they are made. Heads the hub did
//! not write itself (sources, an outside bump, another replica, data from before the index)
//! are indexed the first time a read is not found in the index: every head the token may read
//! is checked for its index marker (the manifest's own hash, written last) and indexed when it
//! lacks it, then the read is looked up again.

use crate::auth::Principal;
use crate::domain::Domain;
use crate::error::HubError;
use crate::store::{Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use synchub_protocol::{Role, Sha256Hex};

/// The window of the upload quota.
const QUOTA_WINDOW: Duration = Duration::from_secs(3600);

/// Those of `hashes` that `principal` may read (admins: all of them).
pub async fn readable(
    domain: &Domain,
    principal: &Principal,
    hashes: &[Sha256Hex],
) -> Result<HashSet<Sha256Hex>, HubError> {
    if principal.role == Role::Admin || hashes.is_empty() {
        return Ok(hashes.iter().cloned().collect());
    }
    // Most reads are of the current heads' blobs (a herd after a bump): answered from memory.
    let in_heads = in_readable_heads(domain, principal, hashes).await;
    if in_heads.len() == hashes.len() {
        return Ok(in_heads.into_keys().collect());
    }
    let spaces = principal.spaces.as_deref();
    let store = domain.store.as_ref();
    let found = store
        .readable_blobs(hashes, spaces, principal.token_id)
        .await?;
    if found.len() == hashes.len() || !index_readable_heads(domain, principal).await? {
        return Ok(found);
    }
    Ok(store
        .readable_blobs(hashes, spaces, principal.token_id)
        .await?)
}

/// Those of `hashes` that the current head of a space `principal` may use names, with their
/// sizes as the manifest says. A head whose manifest cannot be read contributes nothing here
/// (the database's index decides then).
pub async fn in_readable_heads(
    domain: &Domain,
    principal: &Principal,
    hashes: &[Sha256Hex],
) -> HashMap<Sha256Hex, u64> {
    let mut found = HashMap::new();
    for (space, published) in domain.heads.snapshot().iter() {
        if !principal.may_use_space(space) {
            continue;
        }
        let Ok(set) = domain
            .manifests
            .blob_set(&domain.blobs, &published.head.data_hash)
            .await
        else {
            continue;
        };
        found.extend(
            hashes
                .iter()
                .filter_map(|h| set.get(h).map(|size| (h.clone(), *size))),
        );
        if found.len() == hashes.len() {
            break;
        }
    }
    found
}

/// Indexes the heads `principal` may read that are not indexed yet; true when it indexed one.
async fn index_readable_heads(domain: &Domain, principal: &Principal) -> Result<bool, HubError> {
    let mut indexed = false;
    for (space, published) in domain.heads.snapshot().iter() {
        if !principal.may_use_space(space) {
            continue;
        }
        match index_version(domain, space, &published.head.data_hash, None).await {
            Ok(done) => indexed |= done,
            // A head whose manifest cannot be read (corrupt, missing) makes none of its blobs
            // readable; it does not fail reads of the other spaces.
            Err(HubError::Store(e)) => return Err(e.into()),
            Err(e) => tracing::warn!(space, error = %e, "could not index a head's blobs"),
        }
    }
    Ok(indexed)
}

/// Records that `space` references every entry of the manifest `data_hash` (and the manifest
/// itself, last, as the marker that it is indexed). With `previous`, the manifest of the
/// version it was written on, entries that one had are skipped when it is indexed already.
/// False when `data_hash` was indexed for `space` already.
pub async fn index_version(
    domain: &Domain,
    space: &str,
    data_hash: &Sha256Hex,
    previous: Option<&Sha256Hex>,
) -> Result<bool, HubError> {
    let store = domain.store.as_ref();
    if is_indexed(store, space, data_hash).await? {
        return Ok(false);
    }
    let manifest = if *data_hash == Sha256Hex::empty() {
        Default::default()
    } else {
        domain.manifest(data_hash).await?
    };
    let known: HashSet<Sha256Hex> = match previous {
        Some(p) if is_indexed(store, space, p).await? => domain
            .manifest(p)
            .await?
            .entries()
            .iter()
            .map(|e| e.sha256.clone())
            .collect(),
        _ => HashSet::new(),
    };
    let mut new: Vec<Sha256Hex> = manifest
        .entries()
        .iter()
        .map(|e| e.sha256.clone())
        .filter(|h| !known.contains(h))
        .collect();
    new.sort();
    new.dedup();
    store.index_blobs(space, &new).await?;
    store
        .index_blobs(space, std::slice::from_ref(data_hash))
        .await?;
    Ok(true)
}

/// True when the manifest `data_hash` is indexed for `space` (its marker row is there).
async fn is_indexed(
    store: &dyn Store,
    space: &str,
    data_hash: &Sha256Hex,
) -> Result<bool, StoreError> {
    let spaces = [space.to_owned()];
    let hashes = std::slice::from_ref(data_hash);
    let found = store.readable_blobs(hashes, Some(&spaces[..]), -1).await?;
    Ok(!found.is_empty())
}

/// Checks that `principal` may upload blobs: `publish` on some space, or `admin`.
pub fn require_upload(principal: &Principal) -> Result<(), HubError> {
    if principal.role.may_publish() {
        Ok(())
    } else {
        Err(HubError::Forbidden(format!(
            "token {:?} may only read; uploading blobs needs publish",
            principal.name
        )))
    }
}

/// Bytes uploaded per token in its current hour (this replica's count).
#[derive(Default)]
pub struct UploadQuota(Mutex<HashMap<i64, (Instant, u64)>>);

impl UploadQuota {
    /// Refuses (429) when the token's uploads this hour plus `incoming` (the declared size,
    /// 0 when unknown) would pass `limit` bytes; 0: no quota.
    pub fn check(&self, principal: &Principal, incoming: u64, limit: u64) -> Result<(), HubError> {
        if limit == 0 {
            return Ok(());
        }
        let mut map = self.0.lock().expect("quota lock poisoned");
        let (since, used) = map.entry(principal.token_id).or_insert((Instant::now(), 0));
        if since.elapsed() >= QUOTA_WINDOW {
            *since = Instant::now();
            *used = 0;
        }
        if used.saturating_add(incoming) > limit || *used >= limit {
            let wait = QUOTA_WINDOW.saturating_sub(since.elapsed()).as_secs() / 60 + 1;
            return Err(HubError::RateLimited(format!(
                "token {:?} uploaded {used} bytes this hour; its quota is {limit} bytes per hour \
                 (limits.upload_bytes_per_token_per_hour); try again in {wait} min",
                principal.name
            )));
        }
        Ok(())
    }

    /// Counts `bytes` received from the token.
    pub fn add(&self, principal: &Principal, bytes: u64) {
        let mut map = self.0.lock().expect("quota lock poisoned");
        let (since, used) = map.entry(principal.token_id).or_insert((Instant::now(), 0));
        if since.elapsed() >= QUOTA_WINDOW {
            *since = Instant::now();
            *used = 0;
        }
        *used = used.saturating_add(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: i64) -> Principal {
        Principal {
            token_id: id,
            name: format!("pc{id}"),
            role: Role::Publish,
            spaces: None,
        }
    }

    #[test]
    fn quota_counts_per_token_and_refuses_past_the_limit() {
        let q = UploadQuota::default();
        let (a, b) = (token(1), token(2));
        assert!(q.check(&a, 600, 1000).is_ok());
        q.add(&a, 600);
        let e = q.check(&a, 600, 1000).unwrap_err();
        assert!(
            e.to_string().contains("quota is 1000 bytes per hour"),
            "{e}"
        );
        assert!(q.check(&a, 400, 1000).is_ok());
        assert!(q.check(&b, 1000, 1000).is_ok());
        assert!(q.check(&a, u64::MAX, 0).is_ok());
    }
}
