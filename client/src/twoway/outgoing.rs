//! Local changes published as one commit: each changed file is first copied into the agent's
//! cache and hashed there, so what is uploaded is exactly what was hashed even if the app
//! writes again meanwhile (a file whose signature moved during the copy is left for the next
//! round). The commit is made against the base version: the hub takes it on top of newer
//! versions unless one of them touched the same paths (409), in which case the agent merges
//! that version first (making conflict copies) and publishes again.

use super::Folder;
use super::base::{Base, BaseFile};
use super::guard::{Held, Limits};
use super::incoming::local_path;
use super::scan::Stat;
use crate::agent::Agent;
use crate::blob_check::hash_file;
use crate::cache::Cache;
use crate::error::{IoContext, Result};
use crate::publish::{PublishFile, PublishOutcome, commit_reuploading, upload_missing};
use std::path::Path;
use synchub_protocol::{CommitRequest, ManifestEntry};

/// What one round of publishing did.
#[derive(Debug, Default)]
pub(crate) struct Round {
    /// The commit's outcome, when one was made.
    pub(crate) outcome: Option<PublishOutcome>,
    /// Paths that moved while being read: looked at again later.
    pub(crate) moved: Vec<String>,
    /// Paths settled without a commit (content back to the base's) or by the commit.
    pub(crate) settled: Vec<String>,
    /// A destructive part held back by the guard.
    pub(crate) held: Option<Held>,
}

/// Publishes `paths` (each with the signature it was seen stable at; `None`: deleted). With
/// `limits`, a destructive part over them is held instead of published.
pub(crate) async fn publish(
    folder: &Folder,
    ctx: &Agent,
    space: &str,
    base: &mut Base,
    paths: Vec<(String, Option<Stat>)>,
    limits: Option<Limits>,
) -> Result<Round> {
    let root = folder.root.clone();
    let cache = folder.cache.clone();
    let snapshot = base.clone();
    let (files, round0) =
        tokio::task::spawn_blocking(move || take(&root, &cache, &snapshot, paths))
            .await
            .map_err(|e| {
                crate::ClientError::Protocol(format!("reading changes panicked: {e}"))
            })??;
    let mut round = round0;
    // Content back to the base's: only the signature moved.
    for (rel, f, stat) in &files.unchanged {
        base.files.insert(
            rel.clone(),
            BaseFile {
                sha256: f.sha256.clone(),
                size: f.size,
                local: Some(*stat),
            },
        );
    }
    let mut puts = files.puts;
    let mut deletes = files.deletes;
    if let Some(limits) = limits {
        let replaces: Vec<String> = puts
            .iter()
            .filter(|(f, _)| base.files.contains_key(&f.remote))
            .map(|(f, _)| f.remote.clone())
            .collect();
        if limits.exceeded(
            (replaces.len() + deletes.len()) as u64,
            base.files.len() as u64,
        ) {
            let held = Held::new(
                base.version,
                base.files.len() as u64,
                std::mem::take(&mut deletes),
                replaces,
            );
            puts.retain(|(f, _)| !held.holds(&f.remote));
            round.held = Some(held);
        }
    }
    if puts.is_empty() && deletes.is_empty() {
        base.save(&folder.base_file())?;
        return Ok(round);
    }
    let sent: Vec<&PublishFile> = puts.iter().map(|(f, _)| f).collect();
    let (mut uploaded, mut bytes_uploaded) = upload_missing(&ctx.api, &sent, false, None).await?;
    let request = CommitRequest {
        base_version: base.version,
        puts: puts
            .iter()
            .map(|(f, _)| ManifestEntry {
                path: f.remote.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
            })
            .collect(),
        deletes: deletes.clone(),
        message: Some(format!(
            "two-way: {} changed, {} deleted on {}",
            puts.len(),
            deletes.len(),
            folder.host
        )),
    };
    let (resp, again, again_bytes) =
        commit_reuploading(&ctx.api, space, &request, &sent, None).await;
    let resp = resp?;
    uploaded += again;
    bytes_uploaded += again_bytes;
    for (f, stat) in &puts {
        base.files.insert(
            f.remote.clone(),
            BaseFile {
                sha256: f.sha256.clone(),
                size: f.size,
                local: Some(*stat),
            },
        );
        round.settled.push(f.remote.clone());
    }
    for d in &deletes {
        base.files.remove(d);
        round.settled.push(d.clone());
    }
    base.save(&folder.base_file())?;
    round.outcome = Some(PublishOutcome {
        head: resp.head,
        files: puts.len() as u64,
        deleted: deletes.len() as u64,
        total: None,
        uploaded,
        bytes_uploaded,
        unchanged: files.unchanged.len() as u64,
    });
    Ok(round)
}

/// The changes read from disk: files to put (copied into the cache), deletions, and files
/// whose bytes equal the base's.
struct Taken {
    puts: Vec<(PublishFile, Stat)>,
    deletes: Vec<String>,
    unchanged: Vec<(String, PublishFile, Stat)>,
}

fn take(
    root: &Path,
    cache: &Cache,
    base: &Base,
    paths: Vec<(String, Option<Stat>)>,
) -> Result<(Taken, Round)> {
    let mut taken = Taken {
        puts: Vec::new(),
        deletes: Vec::new(),
        unchanged: Vec::new(),
    };
    let mut round = Round::default();
    for (rel, seen) in paths {
        let file = local_path(root, &rel);
        let Some(seen) = seen else {
            if Stat::read(&file).is_none() && base.files.contains_key(&rel) {
                taken.deletes.push(rel);
            } else {
                round.moved.push(rel);
            }
            continue;
        };
        let Some(f) = snapshot(cache, &file, &rel)? else {
            round.moved.push(rel);
            continue;
        };
        // The copy is good only if the file did not move while it was read.
        if Stat::read(&file) != Some(seen) || f.size != seen.size {
            round.moved.push(rel);
            continue;
        }
        match base.files.get(&rel) {
            Some(b) if b.sha256 == f.sha256 && b.size == f.size => {
                round.settled.push(rel.clone());
                taken.unchanged.push((rel, f, seen));
            }
            _ => taken.puts.push((f, seen)),
        }
    }
    Ok((taken, round))
}

/// Copies `file` into the cache under its hash; `None` when it vanished meanwhile.
fn snapshot(cache: &Cache, file: &Path, rel: &str) -> Result<Option<PublishFile>> {
    let temp = cache.temp_path();
    if let Some(dir) = temp.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::copy(file, &temp) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            return Err(crate::ClientError::io(
                format!("reading {}", file.display()),
                e,
            ));
        }
    }
    let (sha256, size) = hash_file(&temp).ctx(|| format!("hashing {}", temp.display()))?;
    cache.insert(&temp, &sha256)?;
    Ok(Some(PublishFile {
        local: cache.path(&sha256),
        remote: rel.to_owned(),
        size,
        sha256,
    }))
}
