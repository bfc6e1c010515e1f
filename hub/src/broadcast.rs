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
    /// Older or equal versions are ignored, so replicas and watchers may report a head twice.
    pub fn publish(&self, head: Head) -> bool {
        let newer = self
            .tx
            .borrow()
            .get(&head.space)
            .is_none_or(|p| head.version > p.head.version);
        if !newer {
            return false;
        }
        let space = head.space.clone();
        let version = head.version;
        let published = Arc::new(Published::new(head));
        let sent = self.tx.send_if_modified(|snapshot| {
            // Checked again under the channel's lock: two publishers may race.
            if snapshot
                .get(&space)
                .is_some_and(|p| p.head.version >= version)
            {
                return false;
            }
            let mut next = BTreeMap::clone(snapshot);
            next.insert(space, published);
            *snapshot = Arc::new(next);
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
}
