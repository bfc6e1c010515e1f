//! The latest head of every space, held in memory and fanned out to every connection.
//!
//! One `watch` channel carries an immutable snapshot of all heads. A bump builds the new
//! snapshot once, with each head's `sync_required` frame and HTTP body already serialized, so a
//! broadcast to 10,000 sockets serializes nothing per socket and queues nothing per socket: a
//! slow agent only ever sees the newest head.
//!
//! The fan-out: every socket task registers its socket with its connection's raw side (see
//! [`crate::shared_io`]), and parks its write half whenever it is not writing. After a bump a
//! task per worker walks its share of the registered sockets and writes the frame, encoded as a
//! WebSocket frame once per bump, to each connection: one `write` to the kernel per socket (TLS
//! encrypts there too), so no socket task is woken for a bump. A socket whose write half is
//! busy (its own task is writing) or whose kernel buffer is full is left to its task, which is
//! woken to finish the write and send whatever is newest.
//!
//! After a non-forced bump the frame carries a spread hint in proportion to the sockets that
//! follow the space (see [`SpreadPolicy`]), computed once with the frame: agents start their
//! downloads at random within it instead of all in the same millisecond. A frame that carries
//! the whole change (its delta and new blobs, see [`Carried`]) asks for no spread: the agents
//! need nothing from the hub for it.

use crate::shared_io::{RawConnection, RawWrite, State};
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use axum::http::HeaderValue;
use bytes::Bytes;
use futures::stream::SplitSink;
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};
use synchub_protocol::{FrameDelta, Head, Spread};
use tokio::sync::{Notify, watch};

/// One head, ready to send.
#[derive(Debug)]
pub struct Published {
    pub head: Head,
    /// The `sync_required` frame.
    pub frame: Utf8Bytes,
    /// The same as a whole WebSocket frame from a server (unmasked), for raw writes.
    pub encoded: Bytes,
    /// `GET .../head` body and its ETag.
    pub json: Bytes,
    pub etag: HeaderValue,
    /// When the hub learned of it, for the fan-out latency metric.
    pub since: Instant,
    /// The space's number, the same for every head of the space: the fan-out compares it,
    /// not the name.
    pub key: u32,
    /// Its place in the order heads were published (of every space): a socket was sent a
    /// head before this one exactly when its record holds a lower number for the space.
    pub seq: u64,
}

impl Published {
    fn new(head: Head, key: u32, seq: u64, spread: Spread, delta: Option<&FrameDelta>) -> Self {
        let frame = synchub_protocol::sync_required_frame(&head, spread, delta)
            .expect("a head always serializes");
        let json = serde_json::to_vec(&head).expect("a head always serializes");
        let etag = HeaderValue::from_str(&format!(
            "\"{}-{}\"",
            head.version,
            &head.data_hash.as_str()[..16]
        ))
        .expect("digits and hex make a valid header");
        let mut encoded = Vec::with_capacity(frame.len() + 10);
        tungstenite::protocol::frame::Frame::message(
            frame.clone().into_bytes(),
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ),
            true,
        )
        .format(&mut encoded)
        .expect("a frame formats into a vector");
        Published {
            head,
            frame: frame.into(),
            encoded: encoded.into(),
            json: json.into(),
            etag,
            since: Instant::now(),
            key,
            seq,
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

/// What a bump's frame carries of the change beside its head (see
/// `crate::domain::Domain::frame_delta`).
#[derive(Clone, Debug)]
pub struct Carried {
    pub delta: FrameDelta,
    /// The frame holds the whole change (the delta and every blob it adds): the agents that
    /// hold its base need no request, so the frame asks for no spread.
    pub whole: bool,
}

/// How long agents are asked to spread their downloads over after a non-forced bump:
/// `per_agent` for every socket following the space, at most `max`. A forced sync starts at
/// once everywhere, and a hint under [`SpreadPolicy::FLOOR`] is not worth sending.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpreadPolicy {
    pub per_agent: Duration,
    pub max: Duration,
}

impl SpreadPolicy {
    /// Shorter spreads are sent as none: a small fleet is served at once anyway.
    pub const FLOOR: Duration = Duration::from_millis(50);

    fn hint(&self, head: &Head, agents: usize) -> Spread {
        let spread = self
            .per_agent
            .saturating_mul(u32::try_from(agents).unwrap_or(u32::MAX))
            .min(self.max);
        if head.forced || spread < Self::FLOOR {
            return Spread::default();
        }
        Spread {
            spread_ms: spread.as_millis() as u64,
        }
    }
}

/// All heads at one instant. A hub serves a handful of spaces, and every socket looks its
/// spaces up after each broadcast: comparing short names is cheaper than hashing them.
pub type Snapshot = Arc<BTreeMap<String, Arc<Published>>>;

/// The heads every connection and request reads, and the sockets they are fanned out to.
pub struct Heads {
    tx: watch::Sender<Snapshot>,
    registry: Arc<Registry>,
    spread: SpreadPolicy,
    /// A number per space name, given once and kept: the fan-out compares a socket's spaces
    /// with the bump's by number, without reading each socket's copy of the name.
    keys: Mutex<HashMap<String, u32>>,
    /// The last [`Published::seq`] given.
    seq: AtomicU64,
}

impl Default for Heads {
    /// Heads whose frames carry no spread hint.
    fn default() -> Self {
        Heads::new(SpreadPolicy::default())
    }
}

impl Heads {
    pub fn new(spread: SpreadPolicy) -> Self {
        Heads {
            tx: watch::Sender::new(Arc::new(BTreeMap::new())),
            registry: Arc::default(),
            spread,
            keys: Mutex::default(),
            seq: AtomicU64::new(0),
        }
    }

    /// The number of `space` (see [`Published::key`]): one per name a head was published for.
    fn key(&self, space: &str) -> u32 {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&key) = keys.get(space) {
            return key;
        }
        let key = keys.len() as u32;
        keys.insert(space.to_owned(), key);
        key
    }

    /// Makes `head` current if it is newer than what its space has; returns whether it was.
    /// Older or equal versions are ignored, so replicas and watchers may report a head twice
    /// and a slow answer cannot undo a newer one.
    pub fn publish(&self, head: Head) -> bool {
        self.put(head, None, None)
    }

    /// Like [`Heads::publish`], with what the frame carries of the change.
    pub fn publish_with(&self, head: Head, carried: Option<Carried>) -> bool {
        self.put(head, None, carried)
    }

    /// Makes `head` current whenever its version or data hash differs from what its space has:
    /// for a read of the store, which is the truth even when it is older (a restored database, a
    /// failover to a standby that lacks the newest versions). A head that does not move forward
    /// starts a new epoch, so agents follow it instead of refusing a downgrade. `read_from` is
    /// the snapshot taken before the read: a head that moved meanwhile (a commit on this
    /// replica) is newer than the read, and only a forward move is taken then.
    pub fn replace(&self, head: Head, read_from: &Snapshot) -> bool {
        self.put(head, Some(read_from), None)
    }

    /// Like [`Heads::replace`], with what the frame carries of the change.
    pub fn replace_with(&self, head: Head, read_from: &Snapshot, carried: Option<Carried>) -> bool {
        self.put(head, Some(read_from), carried)
    }

    fn put(&self, head: Head, read_from: Option<&Snapshot>, carried: Option<Carried>) -> bool {
        let space = head.space.clone();
        let key = self.key(&space);
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
            let spread = match &carried {
                Some(c) if c.whole => Spread::default(),
                _ => self.spread.hint(&next, self.registry.followers(&space)),
            };
            let mut heads = BTreeMap::clone(snapshot);
            let delta = carried.as_ref().map(|c| &c.delta);
            // Under the channel's lock: numbers rise with the snapshots.
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let published = Published::new(next, key, seq, spread, delta);
            heads.insert(space.clone(), Arc::new(published));
            *snapshot = Arc::new(heads);
            true
        });
        if sent {
            metrics::counter!("synchub_broadcasts_total").increment(1);
            self.fan_out();
        }
        sent
    }

    /// Writes the current heads to every registered socket, in tasks of their own.
    fn fan_out(&self) {
        let snapshot = self.snapshot();
        let sockets = self.registry.list();
        match tokio::runtime::Handle::try_current() {
            // One task per worker thread, each with its share of the sockets, so every core
            // writes. Unconstrained: tokio's cooperative budget (128 I/O polls per turn of a
            // task) would make every socket write past the 128th of a turn report "not ready",
            // and those sockets would be handed to their own tasks. The fan-out yields every
            // `FANOUT_BATCH` sockets itself.
            Ok(rt) => {
                let share = sockets.len().div_ceil(rt.metrics().num_workers()).max(1);
                for start in (0..sockets.len()).step_by(share) {
                    let range = start..(start + share).min(sockets.len());
                    let part = fan_out(sockets.clone(), range, snapshot.clone());
                    rt.spawn(tokio::task::unconstrained(part));
                }
            }
            // No runtime (a tool publishing outside one): each socket task sends for itself.
            Err(_) => {
                for entry in sockets.iter() {
                    entry.socket.wake.notify_one();
                }
            }
        }
    }

    /// Registers a socket, whose connection's raw side is `raw`, for the fan-out; it stays
    /// registered until the result is dropped.
    pub fn register(&self, raw: RawConnection) -> Registration {
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let socket = Arc::new(FanoutSocket {
            raw: raw.clone(),
            wake: Notify::new(),
        });
        let entry = Entry {
            raw,
            socket: socket.clone(),
        };
        self.registry.change(|sockets| {
            sockets.insert(id, entry);
        });
        Registration {
            id,
            registry: self.registry.clone(),
            socket,
            followed: Vec::new(),
        }
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

/// A socket's write half: its task writes through it, and parks it between writes (see
/// [`FanoutSocket::park`]) so that the fan-out may write to the connection.
pub type SocketSink = SplitSink<WebSocket, Message>;

/// The head of one followed space last sent to a socket.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// The space's [`Published::key`].
    pub key: u32,
    /// The head's [`Published::seq`].
    pub seq: u64,
}

impl Sent {
    pub fn of(p: &Published) -> Sent {
        Sent {
            key: p.key,
            seq: p.seq,
        }
    }

    /// The frame to send when `snapshot` holds a head of this space the socket has not had.
    fn newer<'a>(&self, snapshot: &'a Snapshot) -> Option<&'a Arc<Published>> {
        snapshot
            .values()
            .find(|p| p.key == self.key)
            .filter(|p| p.seq > self.seq)
    }
}

/// The fan-out's record of one socket: the heads it was sent, and whether the fan-out may
/// write to it. It lives under the connection's lock (see [`crate::shared_io::State`]), so a
/// fan-out takes one lock per socket and reads one pair of cache lines.
#[derive(Default)]
#[repr(C)]
pub struct Fan {
    /// Inline: a socket follows one space, as a rule.
    sent: SmallVec<[Sent; 1]>,
    /// The socket task's write half is parked: it is between writes, and a raw frame goes in
    /// at a frame boundary.
    parked: bool,
}

impl Fan {
    /// The frames of every head of `snapshot` newer than what was sent, marked as sent.
    fn take_newer(&mut self, snapshot: &Snapshot) -> Vec<Arc<Published>> {
        let mut frames = Vec::new();
        for sent in &mut self.sent {
            if let Some(p) = sent.newer(snapshot) {
                sent.seq = p.seq;
                frames.push(p.clone());
            }
        }
        frames
    }
}

/// Writes the encoded frames of the newer of `heads` (a snapshot's) to the connection without
/// waiting, counting each written in `written` (by its place in `heads`): true when they are
/// all in the kernel's buffer, false when the socket task must send or finish them (its write
/// half is not parked, a frame went in only in part, a write that would block, or an error it
/// will see itself).
fn write_inline(
    st: &mut State,
    heads: &[Arc<Published>],
    cx: &mut Context<'_>,
    written: &mut [usize],
) -> bool {
    if !st.fan.parked {
        return false;
    }
    for i in 0..st.fan.sent.len() {
        let sent = st.fan.sent[i];
        // By number: the name is a heap read per socket, the number is in hand.
        let Some((at, p)) = heads.iter().enumerate().find(|(_, p)| p.key == sent.key) else {
            continue;
        };
        if p.seq <= sent.seq {
            continue;
        }
        let wrote = st.try_write(&p.encoded, cx);
        if wrote == RawWrite::NotNow {
            return false;
        }
        st.fan.sent[i].seq = p.seq;
        written[at] += 1;
        if wrote == RawWrite::Started {
            // Committed; the socket task finishes it with a flush.
            return false;
        }
    }
    true
}

/// One registered socket: its connection's raw side, which holds its fan-out record, and how
/// its task is woken for a bump the fan-out could not write.
pub struct FanoutSocket {
    raw: RawConnection,
    wake: Notify,
}

impl FanoutSocket {
    fn with_fan<R>(&self, f: impl FnOnce(&mut Fan) -> R) -> R {
        f(&mut self.raw.lock().fan)
    }

    /// Takes the heads the welcome carries. The write half is not parked yet: the welcome
    /// goes first.
    fn attach(&self, sent: Vec<Sent>) {
        self.with_fan(|fan| fan.sent = sent.into_iter().collect());
    }

    /// Ends the fan-out's writes to this socket (it is closing, or closed).
    fn detach(&self) {
        self.with_fan(|fan| fan.parked = false);
    }

    /// Resolves when the fan-out could not write a bump inline (the write half was busy or
    /// the kernel buffer full): the socket task must call [`FanoutSocket::take`] and write
    /// what it returns.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Unparks the write half for a write of the socket's own (a welcome, a ping, an answer):
    /// returns the frames of every head newer than what was sent, marked as sent. The caller
    /// writes those first, then its own frame, then parks the half again with
    /// [`FanoutSocket::park`].
    pub fn take(&self, snapshot: &Snapshot) -> Vec<Arc<Published>> {
        self.with_fan(|fan| {
            fan.parked = false;
            fan.take_newer(snapshot)
        })
    }

    /// Parks the write half after a write of the socket's own: the fan-out may write again.
    pub fn park(&self) {
        self.with_fan(|fan| fan.parked = true);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics under these locks; a poisoned one still holds consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered socket as the fan-out walks it.
#[derive(Clone)]
struct Entry {
    /// The same as `socket`'s, here so that a fan-out reads nothing of `socket` unless it
    /// must wake its task.
    raw: RawConnection,
    socket: Arc<FanoutSocket>,
}

/// Every registered socket, by registration, and the list a fan-out walks.
#[derive(Default)]
struct Sockets {
    /// By registration, so a fan-out writes to them in the order they connected: the kernel's
    /// state of each (its file, its socket) was allocated in that order, and going through it
    /// in order instead of a hash's found more of it in cache (the kernel's file lookup took
    /// 7% of the fan-out's samples in hash order, 3% in order).
    by_id: BTreeMap<u64, Entry>,
    /// The same in one slice, made by the first fan-out after a change and dropped at the next
    /// change: a fan-out to a fleet that did not change clones no socket's `Arc`.
    list: Option<Arc<[Entry]>>,
}

/// Every socket that follows heads, for the fan-out.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    sockets: Mutex<Sockets>,
    /// Sockets following each space, for the spread hint.
    followers: Mutex<HashMap<String, usize>>,
}

impl Registry {
    /// Changes the registered sockets, and drops the list made from them (outside the lock:
    /// the last fan-out's list of 10,000 sockets takes a while to drop).
    fn change(&self, f: impl FnOnce(&mut BTreeMap<u64, Entry>)) {
        let old = {
            let mut sockets = lock(&self.sockets);
            f(&mut sockets.by_id);
            sockets.list.take()
        };
        drop(old);
    }

    /// The registered sockets in order of registration.
    fn list(&self) -> Arc<[Entry]> {
        let mut sockets = lock(&self.sockets);
        let Sockets { by_id, list } = &mut *sockets;
        list.get_or_insert_with(|| by_id.values().cloned().collect())
            .clone()
    }

    fn followers(&self, space: &str) -> usize {
        lock(&self.followers).get(space).copied().unwrap_or(0)
    }
}

/// A socket's place in the fan-out; leaving it (on drop) unregisters the socket.
pub struct Registration {
    id: u64,
    registry: Arc<Registry>,
    pub socket: Arc<FanoutSocket>,
    /// The spaces counted as followed by this socket.
    followed: Vec<String>,
}

impl Registration {
    /// Gives the fan-out the heads the welcome carries (see `FanoutSocket::attach`), and
    /// counts the socket as following `spaces`.
    pub fn attach<'a>(&mut self, sent: Vec<Sent>, spaces: impl IntoIterator<Item = &'a str>) {
        let mut counts = lock(&self.registry.followers);
        for space in spaces {
            if !self.followed.iter().any(|s| s == space) {
                *counts.entry(space.to_owned()).or_default() += 1;
                self.followed.push(space.to_owned());
            }
        }
        drop(counts);
        self.socket.attach(sent);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.change(|sockets| {
            sockets.remove(&self.id);
        });
        // A fan-out under way may still hold the socket: it must not write to it any more.
        self.socket.detach();
        let mut counts = lock(&self.registry.followers);
        for space in &self.followed {
            if let Some(n) = counts.get_mut(space) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(space);
                }
            }
        }
    }
}

/// Sockets written between two yields of the fan-out, so other tasks on its worker run too.
const FANOUT_BATCH: usize = 512;

/// Writes `snapshot`'s newer heads to the sockets of `sockets` in `range` inline: per socket
/// one write of bytes serialized once, and no task woken unless its write cannot complete at
/// once.
async fn fan_out(sockets: Arc<[Entry]>, range: Range<usize>, snapshot: Snapshot) {
    let fanout = metrics::histogram!("synchub_fanout_seconds");
    let heads: Vec<Arc<Published>> = snapshot.values().cloned().collect();
    // Frames written per head in the current batch: the latency is recorded once per batch
    // (as of its end), not per socket, which would share one counter between the cores.
    let mut written = vec![0usize; heads.len()];
    let mut inline = 0u64;
    let total = range.len() as u64;
    for batch in sockets[range].chunks(FANOUT_BATCH) {
        {
            let mut cx = Context::from_waker(Waker::noop());
            for entry in batch {
                // A connection its task holds (reading, writing) is left to the task.
                let wrote = entry
                    .raw
                    .try_lock()
                    .is_some_and(|mut st| write_inline(&mut st, &heads, &mut cx, &mut written));
                if wrote {
                    inline += 1;
                } else {
                    entry.socket.wake.notify_one();
                }
            }
        }
        for (p, n) in heads.iter().zip(&mut written) {
            if *n > 0 {
                fanout.record_many(p.since.elapsed().as_secs_f64(), *n);
                *n = 0;
            }
        }
        tokio::task::yield_now().await;
    }
    metrics::counter!("synchub_fanout_inline_total").increment(inline);
    metrics::counter!("synchub_fanout_deferred_total").increment(total - inline);
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
    fn every_space_keeps_its_own_number_across_its_heads() {
        let heads = Heads::default();
        assert!(heads.publish(head("a", 1)));
        assert!(heads.publish(head("b", 1)));
        let (a, b) = (heads.get("a").unwrap().key, heads.get("b").unwrap().key);
        assert_ne!(a, b, "the fan-out tells spaces apart by number");
        assert!(heads.publish(head("a", 2)));
        assert!(heads.publish(head("b", 5)));
        assert_eq!(heads.get("a").unwrap().key, a);
        assert_eq!(heads.get("b").unwrap().key, b);
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
    fn the_spread_grows_with_the_fleet_up_to_its_cap_and_forced_syncs_have_none() {
        let policy = SpreadPolicy {
            per_agent: Duration::from_micros(200),
            max: Duration::from_secs(5),
        };
        let bump = head("a", 2);
        assert_eq!(policy.hint(&bump, 100).spread_ms, 0, "small fleet: at once");
        assert_eq!(policy.hint(&bump, 1_000).spread_ms, 200);
        assert_eq!(policy.hint(&bump, 10_000).spread_ms, 2_000);
        assert_eq!(policy.hint(&bump, 100_000).spread_ms, 5_000, "capped");
        let mut forced = head("a", 3);
        forced.forced = true;
        assert_eq!(policy.hint(&forced, 100_000).spread_ms, 0);
        assert_eq!(SpreadPolicy::default().hint(&bump, 100_000).spread_ms, 0);
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

    #[test]
    fn a_socket_is_sent_each_newer_head_once_and_never_an_older_one() {
        let heads = Heads::default();
        heads.publish(head("a", 1));
        let old = heads.snapshot();
        heads.publish(head("a", 2));
        let mut fan = Fan::default();
        fan.sent.push(Sent::of(&old["a"]));
        let versions = |frames: Vec<Arc<Published>>| -> Vec<u64> {
            frames.iter().map(|p| p.head.version).collect()
        };
        assert_eq!(versions(fan.take_newer(&heads.snapshot())), [2]);
        assert_eq!(versions(fan.take_newer(&heads.snapshot())), [0u64; 0]);
        assert_eq!(
            versions(fan.take_newer(&old)),
            [0u64; 0],
            "a fan-out late with an older snapshot"
        );
        // A restored database: a lower version in a new epoch goes out.
        let mut restored = head("a", 1);
        restored.data_hash = Sha256Hex::of(b"restored");
        assert!(heads.replace(restored, &heads.snapshot()));
        assert_eq!(versions(fan.take_newer(&heads.snapshot())), [1]);
    }

    #[test]
    fn the_fan_out_writes_only_to_a_parked_socket_and_only_what_it_lacks() {
        use tokio::io::AsyncReadExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let heads = Heads::default();
            heads.publish(head("a", 1));
            heads.publish(head("b", 1));
            let (near, mut far) = tokio::io::duplex(4096);
            let io = crate::shared_io::SharedIo::new(near);
            let raw = io.raw();
            raw.lock().fan.sent.push(Sent::of(&heads.get("a").unwrap()));
            heads.publish(head("a", 2));
            heads.publish(head("b", 2));
            let now: Vec<Arc<Published>> = heads.snapshot().values().cloned().collect();
            let mut cx = Context::from_waker(Waker::noop());
            let mut written = vec![0; now.len()];
            assert!(
                !write_inline(&mut raw.lock(), &now, &mut cx, &mut written),
                "not parked: its task is writing"
            );
            raw.lock().fan.parked = true;
            assert!(write_inline(&mut raw.lock(), &now, &mut cx, &mut written));
            assert_eq!(
                written,
                [1, 0],
                "space a's head, not b's, which it does not follow"
            );
            assert!(write_inline(&mut raw.lock(), &now, &mut cx, &mut written));
            assert_eq!(written, [1, 0], "nothing twice");
            let a = heads.get("a").unwrap();
            let mut got = vec![0; a.encoded.len()];
            far.read_exact(&mut got).await.unwrap();
            assert_eq!(got, a.encoded);
        });
    }
}
