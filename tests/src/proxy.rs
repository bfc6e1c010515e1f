//! A small fault-injecting TCP proxy for tests: it sits between an agent and a hub on loopback
//! and, on command, freezes every connection (keeps TCP open, forwards nothing: a hung hub or
//! proxy), cuts them (clean close) or resets them (RST), new connections included while the
//! fault lasts. Real sockets, no mocks: the agent sees exactly what a bad network shows it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Keep every connection open and forward nothing (new ones are accepted and held too).
    Freeze,
    /// Close every connection cleanly; new ones are closed at once.
    Cut,
    /// Reset every connection (RST); new ones are reset at once.
    Reset,
}

/// A proxy on `127.0.0.1:PORT` in front of `target`; stopped on drop.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    budget: Arc<Budget>,
    task: JoinHandle<()>,
}

/// Bytes forwarded towards the client, and after how many the proxy freezes by itself (to
/// freeze in the middle of a download, whatever its speed).
#[derive(Default)]
struct Budget {
    forwarded: AtomicU64,
    freeze_at: AtomicU64,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let fault = Arc::new(watch::Sender::new(Fault::Pass));
        let budget = Arc::new(Budget {
            forwarded: AtomicU64::new(0),
            freeze_at: AtomicU64::new(u64::MAX),
        });
        let (f, b) = (fault.clone(), budget.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, target, f.clone(), b.clone()));
            }
        });
        Ok(FaultProxy {
            addr,
            fault,
            budget,
            task,
        })
    }

    /// Freezes by itself once `bytes` more have been forwarded towards the client.
    pub fn freeze_after(&self, bytes: u64) {
        let now = self.budget.forwarded.load(Ordering::SeqCst);
        self.budget.freeze_at.store(now + bytes, Ordering::SeqCst);
    }

    /// Bytes forwarded towards the client so far (what crossed the "network").
    pub fn forwarded(&self) -> u64 {
        self.budget.forwarded.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Connections end too.
        self.fault.send_replace(Fault::Cut);
    }
}

async fn serve(
    client: TcpStream,
    target: SocketAddr,
    sender: Arc<watch::Sender<Fault>>,
    budget: Arc<Budget>,
) {
    let mut fault = sender.subscribe();
    if end_if_faulted(&client, *fault.borrow_and_update()) {
        return;
    }
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    loop {
        let now = *fault.borrow_and_update();
        match now {
            Fault::Pass => {}
            Fault::Freeze => {
                if fault.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Cut => return,
            Fault::Reset => {
                if let Ok(client) = cr.reunite(cw) {
                    let _ = client.set_zero_linger();
                }
                return;
            }
        }
        tokio::select! {
            n = cr.read(&mut up_buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // Bytes read just as a freeze began are held back until it ends.
                    if wait_while_frozen(&mut fault).await.is_err() || uw.write_all(&up_buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            n = ur.read(&mut down_buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if wait_while_frozen(&mut fault).await.is_err() || cw.write_all(&down_buf[..n]).await.is_err() {
                        return;
                    }
                    let total = budget.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                    if total >= budget.freeze_at.load(Ordering::SeqCst) {
                        budget.freeze_at.store(u64::MAX, Ordering::SeqCst);
                        sender.send_replace(Fault::Freeze);
                    }
                }
            },
            changed = fault.changed() => if changed.is_err() { return },
        }
    }
}

/// Waits while the proxy is frozen; `Err` when it is cut or reset meanwhile.
async fn wait_while_frozen(fault: &mut watch::Receiver<Fault>) -> Result<(), ()> {
    loop {
        match *fault.borrow_and_update() {
            Fault::Pass => return Ok(()),
            Fault::Freeze => {}
            Fault::Cut | Fault::Reset => return Err(()),
        }
        fault.changed().await.map_err(|_| ())?;
    }
}

/// Closes or resets a new connection while the proxy cuts or resets; true when it did.
fn end_if_faulted(client: &TcpStream, fault: Fault) -> bool {
    match fault {
        Fault::Cut => true,
        Fault::Reset => {
            let _ = client.set_zero_linger();
            true
        }
        Fault::Pass | Fault::Freeze => false,
    }
}

/// A front door that sends WebSocket upgrades to one address and every other HTTP connection
/// to another, as a balancer may: the agent's socket and its HTTP calls then take different
/// paths (different replicas, or two [`FaultProxy`]s faulted separately). Stopped on drop.
pub struct Splitter {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Splitter {
    pub async fn start(websocket: SocketAddr, http: SocketAddr) -> anyhow::Result<Splitter> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let Ok(n) = client.peek(&mut head).await else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
                    let target = if text.contains("upgrade: websocket") {
                        websocket
                    } else {
                        http
                    };
                    if let Ok(mut upstream) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Ok(Splitter { addr, task })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
