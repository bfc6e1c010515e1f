//! The agents connected to this hub replica: who they are and the state each last reported,
//! for `GET /api/v1/clients` and the dashboard, and to close the sockets of a revoked token.
//! A change counter tells the dashboard's event stream when to look again. What is not yet
//! recorded in the database (an agent whose state changed, one that left) waits in
//! `unwritten` for the fleet task (`fleet.rs`), which writes it a few seconds later.

use dashmap::DashMap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentState, ClientInfo, ClientSpace, FleetAgent};
use tokio_util::sync::CancellationToken;

pub struct Connection {
    pub client_id: String,
    pub token_id: i64,
    pub token_name: String,
    pub hostname: Option<String>,
    pub agent_version: Option<String>,
    pub connected_at: String,
    pub states: Mutex<Vec<ClientSpace>>,
    /// When its rows were last handed to the fleet task; `None`: changed since.
    pub recorded: Mutex<Option<Instant>>,
    /// Cancelled to close this socket: its token was revoked, or (as a child of the hub's
    /// shutdown token) the hub is stopping.
    pub closed: CancellationToken,
}

impl Connection {
    pub fn set_state(&self, space: &str, state: AgentState) {
        *self.recorded.lock().expect("client state lock poisoned") = None;
        let mut states = self.states.lock().expect("client state lock poisoned");
        match states.iter_mut().find(|s| s.space == space) {
            Some(s) => s.state = state,
            None => states.push(ClientSpace {
                space: space.to_owned(),
                state,
            }),
        }
    }

    /// Its rows for the fleet table, seen now.
    fn rows(&self, online: bool) -> Vec<FleetAgent> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let info = self.info();
        info.spaces
            .into_iter()
            .map(|s| FleetAgent {
                space: s.space,
                client_id: info.client_id.clone(),
                token_name: info.token_name.clone(),
                hostname: info.hostname.clone(),
                agent_version: info.agent_version.clone(),
                state: s.state,
                last_seen: now.clone(),
                online,
            })
            .collect()
    }

    fn info(&self) -> ClientInfo {
        ClientInfo {
            client_id: self.client_id.clone(),
            token_name: self.token_name.clone(),
            hostname: self.hostname.clone(),
            agent_version: self.agent_version.clone(),
            connected_at: self.connected_at.clone(),
            spaces: self
                .states
                .lock()
                .expect("client state lock poisoned")
                .clone(),
        }
    }
}

#[derive(Default)]
pub struct Clients {
    next_id: AtomicU64,
    live: DashMap<u64, Arc<Connection>>,
    /// Bumped when what an admin sees of the fleet changed: an agent connected or left,
    /// reported a state, a sync was logged, or a held change came, was decided or settled.
    changes: tokio::sync::watch::Sender<u64>,
    /// Rows for the fleet table not written yet, by space and client id.
    unwritten: Mutex<BTreeMap<(String, String), FleetAgent>>,
    /// Sockets per token id, counted from the upgrade (before `hello`) to the socket's end.
    per_token: Arc<DashMap<i64, usize>>,
    /// Live connections per client id (an agent that reconnected may briefly have two).
    per_client: DashMap<String, usize>,
}

/// One of a token's socket slots (see [`Clients::reserve_socket`]); freed when dropped.
pub struct SocketSlot {
    per_token: Arc<DashMap<i64, usize>>,
    token_id: i64,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.per_token.remove_if_mut(&self.token_id, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// Rows waiting for the fleet task, most; past it the oldest changes are lost (the database
/// has been down for long, and the agents' next changes are queued again).
const UNWRITTEN_MAX: usize = 100_000;

impl Clients {
    /// Registers a connection; the returned id removes it again.
    pub fn add(&self, conn: Arc<Connection>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *self.per_client.entry(conn.client_id.clone()).or_insert(0) += 1;
        self.live.insert(id, conn);
        metrics::gauge!("synchub_connections").set(self.live.len() as f64);
        self.touch();
        id
    }

    pub fn remove(&self, id: u64) {
        // An agent that reconnected already (the old socket ends late) is not offline. Counted
        // per client id: a scan of every connection per removal made a fleet that drops at
        // once (a network blip, a restart) cost the square of its size.
        if let Some((_, conn)) = self.live.remove(&id) {
            let gone = self
                .per_client
                .remove_if_mut(&conn.client_id, |_, n| {
                    *n = n.saturating_sub(1);
                    *n == 0
                })
                .is_some();
            if gone {
                self.queue(conn.rows(false));
            }
        }
        metrics::gauge!("synchub_connections").set(self.live.len() as f64);
        self.touch();
    }

    /// Says the fleet changed (see [`Clients::subscribe`]).
    pub fn touch(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every [`Clients::touch`] (several close together may wake it once).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Takes one of `token_id`'s socket slots; `None` when it holds `cap` already (0: no cap).
    pub fn reserve_socket(&self, token_id: i64, cap: usize) -> Option<SocketSlot> {
        let mut n = self.per_token.entry(token_id).or_insert(0);
        if cap != 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(SocketSlot {
            per_token: self.per_token.clone(),
            token_id,
        })
    }

    /// Closes every socket opened with one of these tokens.
    pub fn revoke(&self, token_ids: &[i64]) {
        for entry in self.live.iter() {
            if token_ids.contains(&entry.token_id) {
                entry.closed.cancel();
            }
        }
    }

    /// Queues each connected agent whose state changed since it was last queued, or that was
    /// last queued `heartbeat` ago (its "last seen" stays fresh for other replicas).
    pub fn queue_changed(&self, heartbeat: Duration) {
        for entry in self.live.iter() {
            let due = {
                let mut recorded = entry.recorded.lock().expect("client state lock poisoned");
                let due = recorded.is_none_or(|t| t.elapsed() >= heartbeat);
                if due {
                    *recorded = Some(Instant::now());
                }
                due
            };
            if due {
                self.queue(entry.rows(true));
            }
        }
    }

    fn queue(&self, rows: Vec<FleetAgent>) {
        let mut unwritten = self.unwritten();
        if unwritten.len() >= UNWRITTEN_MAX {
            tracing::warn!("fleet rows not written for long; dropping the queued ones");
            unwritten.clear();
        }
        for row in rows {
            unwritten.insert((row.space.clone(), row.client_id.clone()), row);
        }
    }

    /// The rows waiting to be written.
    pub fn unwritten_rows(&self) -> Vec<FleetAgent> {
        self.unwritten().values().cloned().collect()
    }

    /// Takes `written` off the queue, unless a newer row of the same agent came meanwhile.
    pub fn mark_written(&self, written: &[FleetAgent]) {
        let mut unwritten = self.unwritten();
        for row in written {
            let key = (row.space.clone(), row.client_id.clone());
            if unwritten.get(&key) == Some(row) {
                unwritten.remove(&key);
            }
        }
    }

    /// Only whole rows are ever written in, so a panic elsewhere cannot leave it wrong.
    fn unwritten(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), FleetAgent>> {
        self.unwritten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn list(&self) -> Vec<ClientInfo> {
        let mut out: Vec<ClientInfo> = self.live.iter().map(|e| e.info()).collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(client_id: &str) -> Arc<Connection> {
        Arc::new(Connection {
            client_id: client_id.to_owned(),
            token_id: 1,
            token_name: "office".into(),
            hostname: None,
            agent_version: None,
            connected_at: String::new(),
            states: Mutex::new(vec![ClientSpace {
                space: "qr".into(),
                state: AgentState::Ready { version: 3 },
            }]),
            recorded: Mutex::new(None),
            closed: CancellationToken::new(),
        })
    }

    fn offline_rows(clients: &Clients) -> Vec<String> {
        clients
            .unwritten_rows()
            .into_iter()
            .filter(|r| !r.online)
            .map(|r| r.client_id)
            .collect()
    }

    #[test]
    fn an_agent_is_offline_when_its_last_socket_ends() {
        let clients = Clients::default();
        let old = clients.add(connection("pc-1"));
        let new = clients.add(connection("pc-1"));
        let other = clients.add(connection("pc-2"));
        clients.remove(old);
        assert!(
            offline_rows(&clients).is_empty(),
            "pc-1 reconnected before its old socket ended"
        );
        clients.remove(new);
        clients.remove(other);
        assert_eq!(offline_rows(&clients), ["pc-1", "pc-2"]);
        assert!(clients.per_client.is_empty(), "nothing left counted");
    }
}
