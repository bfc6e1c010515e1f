//! Making new versions of a space: a commit (puts and deletes against a base version), an
//! admin's force-sync (the same data, announced as forced) and a rollback (version N's data as
//! a new version, announced as forced); and reading the current head.
//!
//! Every write goes through one loop, `write_version`: read the head, decide what the next
//! version is, compare-and-swap it into the store, and when another writer moved the head in
//! between, read it again and decide again. What a commit makes of a head is decided by the
//! pure [`plan_commit`]. The HTTP handlers, the socket task and the command line all call these.

use crate::blob_access;
use crate::domain::Domain;
use crate::error::HubError;
use crate::store::{NewVersion, StoreError};
use std::collections::HashSet;
use std::sync::Arc;
use synchub_protocol::{CommitRequest, Head, Manifest, ManifestError, codes};

/// How often a write is retried when another writer moved the head between our read and our
/// compare-and-swap (each retry decides again against the new head).
const MAX_ATTEMPTS: usize = 5;

/// The longest reason a force-sync or rollback may carry (the bound of a commit message too:
/// both become the head's `reason`, which every frame and listing carries).
pub const MAX_REASON_BYTES: usize = synchub_protocol::MAX_MESSAGE_LEN;

/// What a write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// A new version, now the head (as agents see it: epoch and last forced version filled in).
    Created(Head),
    /// Nothing would change: no version was made, the head is as it was.
    Unchanged(Head),
}

impl Written {
    pub fn head(&self) -> &Head {
        match self {
            Written::Created(h) | Written::Unchanged(h) => h,
        }
    }
}

/// What one attempt of a write decided against the head it read.
pub(crate) enum Step {
    /// Record `new` on top of `on` (the head the decision was made against).
    Write {
        on: Head,
        new: NewVersion,
    },
    Unchanged(Head),
}

/// What [`plan_commit`] makes of a commit against a head.
#[derive(Debug)]
pub enum Plan {
    /// The commit changes nothing.
    Unchanged,
    /// The manifest of the next version.
    Next(Manifest),
}

/// The current head, from memory or, when this replica has not seen the space yet, the store.
pub async fn current_head(domain: &Domain, space: &str) -> Result<Head, HubError> {
    if let Some(p) = domain.heads.get(space) {
        return Ok(p.head.clone());
    }
    if !domain.config.spaces.iter().any(|s| s == space) {
        return Err(HubError::NotFound(format!(
            "space {space:?} (this hub serves only the spaces its configuration lists)"
        )));
    }
    match domain.store.head(space).await? {
        Some(head) => {
            domain.publish(head.clone()).await;
            Ok(head)
        }
        None => Err(HubError::NotFound(format!("space {space:?}"))),
    }
}

/// The head as the store has it now, made current in memory even when it is older (the
/// database was restored or failed over: see [`crate::broadcast::Heads::replace`]).
async fn reread_head(domain: &Domain, space: &str) -> Result<Head, HubError> {
    let before = domain.heads.snapshot();
    match domain.store.head(space).await? {
        Some(head) => {
            domain.replace(head.clone(), &before).await;
            // Memory may be newer still (a commit here meanwhile); never older than the read.
            Ok(domain
                .heads
                .get(space)
                .map(|p| p.head.clone())
                .filter(|h| h.version >= head.version)
                .unwrap_or(head))
        }
        None => Err(HubError::NotFound(format!("space {space:?}"))),
    }
}

/// Publishes a head this replica just wrote and returns it as agents see it (with the epoch
/// and last forced version memory carries).
async fn published(domain: &Domain, head: Head) -> Head {
    let carried = domain.frame_delta(&head).await;
    domain.heads.publish_with(head.clone(), carried);
    domain
        .heads
        .get(&head.space)
        .map(|p| p.head.clone())
        .filter(|h| h.version == head.version && h.data_hash == head.data_hash)
        .unwrap_or(head)
}

/// The one retry-on-head-moved loop: `decide` is called with the current head and says what to
/// write on top of it; a lost compare-and-swap re-reads the head and decides again.
pub(crate) async fn write_version<F, Fut>(
    domain: &Domain,
    space: &str,
    mut decide: F,
) -> Result<Written, HubError>
where
    F: FnMut(Head) -> Fut,
    Fut: Future<Output = Result<Step, HubError>>,
{
    for _ in 0..MAX_ATTEMPTS {
        let head = current_head(domain, space).await?;
        let (on, new) = match decide(head).await? {
            Step::Unchanged(head) => return Ok(Written::Unchanged(head)),
            Step::Write { on, new } => (on, new),
        };
        match domain.store.create_version(space, on.version, new).await {
            Ok(head) => {
                // Its blobs become readable to the space's tokens; a failure here is repaired
                // by the first read that misses the index (see `blob_access`). Data a version
                // shares with the one before (a force-sync) was indexed with that one.
                if head.data_hash != on.data_hash {
                    let previous = Some(&on.data_hash);
                    let index =
                        blob_access::index_version(domain, space, &head.data_hash, previous);
                    if let Err(e) = index.await {
                        tracing::warn!(space, error = %e, "could not index the new version's blobs");
                    }
                }
                return Ok(Written::Created(published(domain, head).await));
            }
            Err(StoreError::HeadMoved { current, .. }) => {
                tracing::debug!(space, current, "head moved during a write; retrying");
                reread_head(domain, space).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(HubError::Unavailable(
        "the head kept moving; try again".into(),
    ))
}

fn manifest_error(e: ManifestError) -> HubError {
    match e {
        ManifestError::Path(p) => HubError::bad_request(codes::INVALID_PATH, p.to_string()),
        ManifestError::TooManyEntries { .. } => HubError::TooLarge(e.to_string()),
        other => HubError::bad_request(codes::INVALID_MANIFEST, other.to_string()),
    }
}

/// Checks what a commit can be checked for without the store: its size and its paths, so a
/// hostile commit costs nothing.
pub fn validate_commit(request: &CommitRequest, max_entries: usize) -> Result<(), HubError> {
    request
        .check_bounds()
        .map_err(|e| HubError::TooLarge(e.to_string()))?;
    let changes = request.puts.len() + request.deletes.len();
    if changes > max_entries {
        return Err(HubError::TooLarge(format!(
            "commit of {changes} changes; the limit is {max_entries}"
        )));
    }
    Manifest::default()
        .with_changes(&request.puts, &[])
        .map_err(manifest_error)?;
    for d in &request.deletes {
        synchub_protocol::validate_path(d)
            .map_err(|e| HubError::bad_request(codes::INVALID_PATH, e.to_string()))?;
    }
    Ok(())
}

/// What `request` makes of `head` (whose manifest is `head_manifest`), given `base`, the
/// manifest of the version the request was made against: a conflict when a path it changes was
/// changed between `base` and the head, or the next manifest, or nothing to do.
pub fn plan_commit(
    base: &Manifest,
    head: &Head,
    head_manifest: &Manifest,
    request: &CommitRequest,
    max_entries: usize,
) -> Result<Plan, HubError> {
    let touched: HashSet<String> = base.changed_paths(head_manifest).into_iter().collect();
    let mut conflicts: Vec<String> = request
        .puts
        .iter()
        .map(|p| &p.path)
        .chain(&request.deletes)
        .filter(|p| touched.contains(*p))
        .cloned()
        .collect();
    if !conflicts.is_empty() {
        conflicts.sort();
        conflicts.dedup();
        return Err(HubError::Conflict {
            paths: conflicts,
            head: Box::new(head.clone()),
        });
    }
    let next = head_manifest
        .with_changes(&request.puts, &request.deletes)
        .map_err(manifest_error)?;
    if next.len() > max_entries {
        return Err(HubError::TooLarge(format!(
            "the new version would have {} entries; the limit is {max_entries}",
            next.len()
        )));
    }
    // Two spellings of one file on Windows/macOS would break every agent there.
    synchub_protocol::check_collisions(next.entries().iter().map(|e| e.path.as_str()))
        .map_err(|e| HubError::bad_request(codes::PATH_COLLISION, e.to_string()))?;
    if next.data_hash() == head.data_hash {
        return Ok(Plan::Unchanged);
    }
    Ok(Plan::Next(next))
}

/// Every put must name a stored blob of the stated size.
async fn check_blobs(domain: &Domain, request: &CommitRequest) -> Result<(), HubError> {
    let hashes: Vec<_> = request.puts.iter().map(|p| p.sha256.clone()).collect();
    let sizes = domain.blob_sizes(&hashes).await?;
    let mut missing = Vec::new();
    for (put, size) in request.puts.iter().zip(sizes) {
        match size {
            None => missing.push(put.sha256.to_string()),
            Some(s) if s != put.size => {
                return Err(HubError::bad_request(
                    codes::INVALID_MANIFEST,
                    format!(
                        "{} says {} bytes but blob {} has {s}",
                        put.path, put.size, put.sha256
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(first) = missing.first() {
        return Err(HubError::bad_request(
            codes::MISSING_BLOBS,
            format!(
                "{} blob(s) not uploaded yet (first {first}); PUT /api/v1/blobs/{{sha256}} them first",
                missing.len(),
            ),
        ));
    }
    Ok(())
}

/// The head a commit against `base_version` is planned on, and the manifest of its base.
async fn commit_base(
    domain: &Domain,
    space: &str,
    mut head: Head,
    base_version: u64,
) -> Result<(Head, Arc<Manifest>), HubError> {
    if base_version > head.version {
        // The client read a newer head elsewhere (another replica behind the balancer):
        // this replica has not heard of it yet, the store has.
        head = reread_head(domain, space).await?;
    }
    if base_version > head.version {
        return Err(HubError::bad_request(
            codes::BAD_REQUEST,
            format!(
                "base_version {base_version} is newer than the head {}",
                head.version
            ),
        ));
    }
    let base_hash = if base_version == head.version {
        head.data_hash.clone()
    } else {
        domain
            .store
            .version(space, base_version)
            .await?
            .ok_or_else(|| {
                HubError::bad_request(
                    codes::BAD_REQUEST,
                    format!("base_version {base_version} does not exist"),
                )
            })?
            .data_hash
    };
    Ok((head, domain.manifest(&base_hash).await?))
}

/// Applies `request` to `space` as `by`: a new version unless nothing changes.
#[tracing::instrument(skip(domain, request), fields(base = request.base_version))]
pub async fn commit(
    domain: &Domain,
    space: &str,
    by: &str,
    request: &CommitRequest,
) -> Result<Written, HubError> {
    let max_entries = domain.config.limits.max_manifest_entries;
    validate_commit(request, max_entries)?;
    // Off the collector's doomed list before they are checked (see `gc.rs`).
    let hashes: Vec<_> = request.puts.iter().map(|p| p.sha256.clone()).collect();
    let spared_at = crate::gc::spare(domain, &hashes).await?;
    check_blobs(domain, request).await?;
    let written = write_version(domain, space, |head| async move {
        let (head, base) = commit_base(domain, space, head, request.base_version).await?;
        let head_manifest = domain.manifest(&head.data_hash).await?;
        match plan_commit(&base, &head, &head_manifest, request, max_entries)? {
            Plan::Unchanged => Ok(Step::Unchanged(head)),
            Plan::Next(next) => {
                let manifest =
                    crate::blobs::put_bytes(domain.blobs.as_ref(), next.canonical_bytes().into())
                        .await?;
                // The same tree may exist as an old, unreferenced manifest blob.
                crate::gc::spare(domain, std::slice::from_ref(&manifest)).await?;
                crate::gc::check_window(domain, spared_at)?;
                let new = NewVersion {
                    data_hash: next.data_hash(),
                    forced: false,
                    reason: request.message.clone(),
                    by: Some(by.to_owned()),
                    entries: next.len() as u64,
                    bytes: next.total_size(),
                };
                Ok(Step::Write { on: head, new })
            }
        }
    })
    .await?;
    if let Written::Created(head) = &written {
        metrics::counter!("synchub_commits_total").increment(1);
        tracing::info!(space, version = head.version, by, "commit");
    }
    Ok(written)
}

/// For versions the hub writes itself (sources, `synchub import`): takes the blobs `next`
/// names beyond `base`, and its manifest, off the collector's doomed list and checks they are
/// stored, as [`commit`] does for an agent's commit (see `gc.rs`). The version must then be
/// recorded within the commit window of the instant returned ([`crate::gc::check_window`]).
pub(crate) async fn spare_new_blobs(
    domain: &Domain,
    base: &Manifest,
    next: &Manifest,
) -> Result<std::time::Instant, HubError> {
    let mut hashes: Vec<_> = next
        .entries()
        .iter()
        .filter(|e| base.get(&e.path).is_none_or(|b| b.sha256 != e.sha256))
        .map(|e| e.sha256.clone())
        .collect();
    hashes.push(next.data_hash());
    hashes.sort();
    hashes.dedup();
    let spared_at = crate::gc::spare(domain, &hashes).await?;
    let sizes = domain.blob_sizes(&hashes).await?;
    let gone: Vec<_> = hashes
        .iter()
        .zip(sizes)
        .filter(|(_, size)| size.is_none())
        .map(|(h, _)| h)
        .collect();
    if let Some(first) = gone.first() {
        return Err(HubError::bad_request(
            codes::MISSING_BLOBS,
            format!(
                "{} blob(s) of the new version are not in the blob store (first {first}); they \
                 are copied again on the next try",
                gone.len()
            ),
        ));
    }
    Ok(spared_at)
}

fn check_reason(reason: Option<&str>) -> Result<(), HubError> {
    match reason {
        Some(r) if r.len() > MAX_REASON_BYTES => Err(HubError::TooLarge(format!(
            "reason over {MAX_REASON_BYTES} bytes"
        ))),
        _ => Ok(()),
    }
}

/// Bumps `space` to a new version with the same data, announced as forced.
pub async fn force(
    domain: &Domain,
    space: &str,
    reason: Option<String>,
    by: &str,
) -> Result<Head, HubError> {
    check_reason(reason.as_deref())?;
    let reason = &reason;
    let written = write_version(domain, space, |head| async move {
        let manifest = domain.manifest(&head.data_hash).await?;
        let new = NewVersion {
            data_hash: head.data_hash.clone(),
            forced: true,
            reason: reason.clone(),
            by: Some(by.to_owned()),
            entries: manifest.len() as u64,
            bytes: manifest.total_size(),
        };
        Ok(Step::Write { on: head, new })
    })
    .await?;
    metrics::counter!("synchub_force_syncs_total").increment(1);
    let head = written.head().clone();
    tracing::info!(space, version = head.version, by, "force sync");
    Ok(head)
}

/// Makes version `to_version`'s data the data of a new version of `space`, announced as
/// forced (so every agent applies it even where it holds something newer).
pub async fn rollback(
    domain: &Domain,
    space: &str,
    to_version: u64,
    reason: Option<String>,
    by: &str,
) -> Result<Head, HubError> {
    check_reason(reason.as_deref())?;
    let target = domain
        .store
        .version(space, to_version)
        .await?
        .ok_or_else(|| HubError::NotFound(format!("version {to_version} of space {space:?}")))?;
    let manifest = domain.manifest(&target.data_hash).await?;
    let reason = match reason {
        Some(r) => format!("rollback to version {to_version}: {r}"),
        None => format!("rollback to version {to_version}"),
    };
    let (target, manifest, reason) = (&target, &manifest, &reason);
    let written = write_version(domain, space, |head| async move {
        let new = NewVersion {
            data_hash: target.data_hash.clone(),
            forced: true,
            reason: Some(reason.clone()),
            by: Some(by.to_owned()),
            entries: manifest.len() as u64,
            bytes: manifest.total_size(),
        };
        Ok(Step::Write { on: head, new })
    })
    .await?;
    metrics::counter!("synchub_rollbacks_total").increment(1);
    let head = written.head().clone();
    tracing::info!(space, version = head.version, to_version, by, "rollback");
    Ok(head)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use synchub_protocol::{ManifestEntry, Sha256Hex};

    /// The manifest entry of a file `path` holding `body` (also used by `sources` tests).
    pub(crate) fn entry(path: &str, body: &[u8]) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            size: body.len() as u64,
            sha256: Sha256Hex::of(body),
        }
    }

    fn manifest(entries: &[ManifestEntry]) -> Manifest {
        Manifest::default().with_changes(entries, &[]).unwrap()
    }

    fn head_of(m: &Manifest, version: u64) -> Head {
        Head {
            space: "s".into(),
            version,
            data_hash: m.data_hash(),
            forced: false,
            reason: None,
            by: None,
            at: "2026-11-26T00:00:00Z".into(),
            epoch: 0,
            forced_version: 0,
        }
    }

    fn request(base_version: u64, puts: &[ManifestEntry], deletes: &[&str]) -> CommitRequest {
        CommitRequest {
            base_version,
            puts: puts.to_vec(),
            deletes: deletes.iter().map(|d| d.to_string()).collect(),
            message: None,
        }
    }

    #[test]
    fn a_commit_on_the_head_makes_the_next_manifest() {
        let base = manifest(&[entry("a.csv", b"1")]);
        let head = head_of(&base, 3);
        let req = request(3, &[entry("b.csv", b"2")], &["a.csv"]);
        let Plan::Next(next) = plan_commit(&base, &head, &base, &req, 100).unwrap() else {
            panic!("expected a new manifest");
        };
        let paths: Vec<_> = next.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["b.csv"]);
    }

    #[test]
    fn a_commit_that_changes_nothing_is_unchanged() {
        let base = manifest(&[entry("a.csv", b"1")]);
        let head = head_of(&base, 3);
        let req = request(3, &[entry("a.csv", b"1")], &[]);
        assert!(matches!(
            plan_commit(&base, &head, &base, &req, 100),
            Ok(Plan::Unchanged)
        ));
    }

    #[test]
    fn a_path_changed_since_the_base_conflicts_and_others_merge() {
        let base = manifest(&[entry("a.csv", b"1"), entry("b.csv", b"1")]);
        let moved = manifest(&[entry("a.csv", b"2"), entry("b.csv", b"1")]);
        let head = head_of(&moved, 4);
        let req = request(3, &[entry("a.csv", b"3")], &["a.csv"]);
        match plan_commit(&base, &head, &moved, &req, 100) {
            Err(HubError::Conflict { paths, head: h }) => {
                assert_eq!(paths, ["a.csv"]);
                assert_eq!(h.version, 4);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        let req = request(3, &[entry("b.csv", b"3")], &[]);
        let Plan::Next(next) = plan_commit(&base, &head, &moved, &req, 100).unwrap() else {
            panic!("expected a merge");
        };
        assert_eq!(next.entries()[0], entry("a.csv", b"2"));
        assert_eq!(next.entries()[1], entry("b.csv", b"3"));
    }

    #[test]
    fn a_commit_over_the_entry_limit_or_with_colliding_spellings_is_refused() {
        let base = manifest(&[entry("a.csv", b"1")]);
        let head = head_of(&base, 1);
        let req = request(1, &[entry("b.csv", b"1")], &[]);
        assert!(matches!(
            plan_commit(&base, &head, &base, &req, 1),
            Err(HubError::TooLarge(_))
        ));
        let req = request(1, &[entry("A.csv", b"2")], &[]);
        match plan_commit(&base, &head, &base, &req, 100) {
            Err(HubError::BadRequest { code, .. }) => assert_eq!(code, codes::PATH_COLLISION),
            other => panic!("expected a collision, got {other:?}"),
        }
    }

    #[test]
    fn validation_refuses_too_many_changes_and_bad_paths() {
        let req = request(1, &[entry("a", b"1"), entry("b", b"1")], &["c"]);
        assert!(matches!(
            validate_commit(&req, 2),
            Err(HubError::TooLarge(_))
        ));
        let req = request(1, &[], &["../etc/passwd"]);
        match validate_commit(&req, 100) {
            Err(HubError::BadRequest { code, .. }) => assert_eq!(code, codes::INVALID_PATH),
            other => panic!("expected an invalid path, got {other:?}"),
        }
    }
}
