//! The latest head of every space, held in memory and fanned out to every connection.
//!
//! One `watch` channel carries an immutable snapshot of all heads. A bump builds the new
//! snapshot once, with each head's `sync_required` frame and HTTP body already serialized, so a
//! broadcast to 10,000 sockets serializes nothing per socket and queues nothing per socket: a
//! slow agent only ever sees the newest head.

use axum::extract::ws::Utf8Bytes;
use axum::http::HeaderValue;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use synchub_protocol::{Head, HubFrame};
use tokio::sync::watch;

/// One head, ready to send.
#[derive(Debug)]
pub struct Published {
    pub head: Head,
    /// The `sync_required` frame.
    pub frame: Utf8Bytes,
    /// `GET .../head` body and its ETag.
    pub json: Bytes,
    pub etag: HeaderValue,
    /// When the hub learned of it, for the fan-out latency metric.
    pub since: Instant,
}

impl Published {
    fn new(head: Head) -> Self {
        let frame = serde_json::to_string(&HubFrame::SyncRequired(head.clone()))
            .expect("a head always serializes");
        let json = serde_json::to_vec(&head).expect("a head always serializes");
        let etag = HeaderValue::from_str(&format!(
            "\"{}-{}\"",
            head.version,
            &head.data_hash.as_str()[..16]
        ))
        .expect("digits and hex make a valid header");
        Published {
            head,
            frame: frame.into(),
            json: json.into(),
            etag,
            since: Instant::now(),
        }
    }
}

/// The head that follows `current` when `head` is read, with its epoch and last forced version
/// filled in; `None` when nothing changes.
fn successor(current: Option<&Head>, mut head: Head, authoritative: bool) -> Option<Head> {
    let own_forced = if head.forced { head.version } else { 0 };
    let Some(current) = current else {
        head.forced_version = head.forced_version.max(own_forced);
        return Some(head);
    };
    if head.version > current.version {
        head.epoch = current.epoch.max(head.epoch);
        head.forced_version = head
            .forced_version
            .max(current.forced_version)
            .max(own_forced);
        return Some(head);
    }
    let same = head.version == current.version && head.data_hash == current.data_hash;
    if same || !authoritative {
        return None;
    }
    // History was rewritten under us. The new epoch is the time it was noticed, so replicas
    // that notice it separately agree roughly, and it stays above every earlier epoch.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    head.epoch = now_ms.max(current.epoch + 1).max(head.epoch);
    let kept_forced = if current.forced_version <= head.version {
        current.forced_version
    } else {
        0
    };
    head.forced_version = head.forced_version.max(kept_forced).max(own_forced);
    Some(head)
}

/// All heads at one instant. A hub serves a handful of spaces, and every socket looks its
/// spaces up after each broadcast: comparing short names is cheaper than hashing them.
pub type Snapshot = Arc<BTreeMap<String, Arc<Published>>>;

/// The heads every connection and request reads.
pub struct Heads {
    tx: watch::Sender<Snapshot>,
}

impl Default for Heads {
    fn default() -> Self {
        Heads {
            tx: watch::Sender::new(Arc::new(BTreeMap::new())),
        }
    }
}

impl Heads {
    /// Makes `head` current if it is newer than what its space has; returns whether it was.
    /// Older or equal versions are ignored, so replicas and watchers may report a head twice
    /// and a slow answer cannot undo a newer one.
    pub fn publish(&self, head: Head) -> bool {
        self.put(head, None)
    }

    /// Makes `head` current whenever its version or data hash differs from what its space has:
    /// for a read of the store, which is the truth even when it is older (a restored database, a
    /// failover to a standby that lacks the newest versions). A head that does not move forward
    /// starts a new epoch, so agents follow it instead of refusing a downgrade. `read_from` is
    /// the snapshot taken before the read: a head that moved meanwhile (a commit on this
    /// replica) is newer than the read, and only a forward move is taken then.
    pub fn replace(&self, head: Head, read_from: &Snapshot) -> bool {
        self.put(head, Some(read_from))
    }

    fn put(&self, head: Head, read_from: Option<&Snapshot>) -> bool {
        let space = head.space.clone();
        let mut head = Some(head);
        let sent = self.tx.send_if_modified(|snapshot| {
            // Decided under the channel's lock: two publishers may race.
            let current = snapshot.get(&space);
            let authoritative =
                read_from.is_some_and(|before| match (before.get(&space), current) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                });
            let Some(next) = head
                .take()
                .and_then(|h| successor(current.map(|p| &p.head), h, authoritative))
            else {
                return false;
            };
            let mut heads = BTreeMap::clone(snapshot);
            heads.insert(space.clone(), Arc::new(Published::new(next)));
            *snapshot = Arc::new(heads);
            true
        });
        if sent {
            metrics::counter!("synchub_broadcasts_total").increment(1);
        }
        sent
    }

    pub fn get(&self, space: &str) -> Option<Arc<Published>> {
        self.tx.borrow().get(space).cloned()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchub_protocol::Sha256Hex;

    fn head(space: &str, version: u64) -> Head {
        Head {
            space: space.into(),
            version,
            data_hash: Sha256Hex::empty(),
            forced: false,
            reason: None,
            by: None,
            at: "2026-11-25T00:00:00Z".into(),
            epoch: 0,
            forced_version: 0,
        }
    }

    #[test]
    fn only_newer_heads_are_published() {
        let heads = Heads::default();
        let mut rx = heads.subscribe();
        assert!(heads.publish(head("a", 2)));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!heads.publish(head("a", 2)));
        assert!(!heads.publish(head("a", 1)));
        assert!(!rx.has_changed().unwrap());
        assert!(heads.publish(head("b", 1)));
        assert_eq!(heads.get("a").unwrap().head.version, 2);
        let frame: serde_json::Value =
            serde_json::from_str(heads.get("b").unwrap().frame.as_str()).unwrap();
        assert_eq!(frame["type"], "sync_required");
    }

    #[test]
    fn an_authoritative_read_replaces_a_newer_head_in_a_new_epoch() {
        let heads = Heads::default();
        assert!(heads.publish(head("a", 12)));
        let mut restored = head("a", 10);
        restored.data_hash = Sha256Hex::of(b"other");
        assert!(
            !heads.publish(restored.clone()),
            "publish only moves forward"
        );
        let before = heads.snapshot();
        heads.publish(head("a", 13));
        assert!(
            !heads.replace(restored.clone(), &before),
            "a read older than the head it would replace is no proof of a rewrite"
        );
        assert!(heads.replace(restored.clone(), &heads.snapshot()));
        let now = heads.get("a").unwrap().head.clone();
        assert_eq!(now.version, 10);
        assert!(now.epoch > 0);
        assert!(
            !heads.replace(restored, &heads.snapshot()),
            "the same head again changes nothing"
        );
        assert!(heads.publish(head("a", 11)));
        assert_eq!(heads.get("a").unwrap().head.epoch, now.epoch);
    }

    #[test]
    fn the_last_forced_version_is_carried_forward() {
        let heads = Heads::default();
        heads.publish(head("a", 1));
        let mut forced = head("a", 2);
        forced.forced = true;
        heads.publish(forced);
        heads.publish(head("a", 3));
        let now = heads.get("a").unwrap().head.clone();
        assert!(!now.forced);
        assert_eq!(now.forced_version, 2);
    }
}
