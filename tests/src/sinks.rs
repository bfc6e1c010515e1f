//! Receivers for the hub's alerts, started by tests on loopback: an HTTP server that keeps
//! every JSON body posted to it (a Discord, Slack or plain webhook), and a minimal SMTP server
//! that keeps every message delivered to it (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT;
//! no TLS, no AUTH). Each records when a message arrived, to measure alert latency.

use anyhow::{Context, anyhow};
use axum::extract::{Path, State};
use axum::routing::post;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What arrived, in order, with the time each came in.
pub struct Inbox<T> {
    items: Mutex<Vec<(Instant, T)>>,
    arrived: Notify,
}

impl<T: Clone> Inbox<T> {
    fn new() -> Arc<Self> {
        Arc::new(Inbox {
            items: Mutex::new(Vec::new()),
            arrived: Notify::new(),
        })
    }

    fn push(&self, item: T) {
        self.items
            .lock()
            .expect("inbox lock")
            .push((Instant::now(), item));
        self.arrived.notify_waiters();
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<(Instant, T)> {
        self.items.lock().expect("inbox lock").clone()
    }

    /// Waits until an item matching `want` has arrived; returns it and when it came.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        want: impl Fn(&T) -> bool,
    ) -> anyhow::Result<(Instant, T)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            if let Some(hit) = self.all().into_iter().find(|(_, t)| want(t)) {
                return Ok(hit);
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .map_err(|_| anyhow!("nothing matching arrived within {timeout:?}"))?;
        }
    }
}

/// An HTTP server taking `POST /hook/{name}` with a JSON body.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    /// `(name, body)` per request.
    pub inbox: Arc<Inbox<(String, serde_json::Value)>>,
    task: JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> anyhow::Result<WebhookReceiver> {
        let inbox = Inbox::new();
        let app = axum::Router::new()
            .route(
                "/hook/{name}",
                post(
                    |State(inbox): State<Arc<Inbox<(String, serde_json::Value)>>>,
                     Path(name): Path<String>,
                     axum::Json(body): axum::Json<serde_json::Value>| async move {
                        inbox.push((name, body));
                        axum::http::StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(inbox.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(WebhookReceiver { addr, inbox, task })
    }

    /// The URL of the hook called `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/hook/{name}", self.addr)
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One message an SMTP client delivered.
#[derive(Clone, Debug)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// Headers and body as sent (dot-stuffing undone).
    pub data: String,
}

/// A minimal SMTP server on loopback.
pub struct SmtpSink {
    pub addr: SocketAddr,
    pub inbox: Arc<Inbox<Mail>>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> anyhow::Result<SmtpSink> {
        let inbox = Inbox::new();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sink = inbox.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(socket, &sink).await {
                        eprintln!("smtp sink: {e:#}");
                    }
                });
            }
        });
        Ok(SmtpSink { addr, inbox, task })
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn session(socket: tokio::net::TcpStream, inbox: &Inbox<Mail>) -> anyhow::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    reply(&mut write, "220 sink ESMTP").await?;
    let (mut from, mut to) = (String::new(), Vec::new());
    while let Some(line) = read_line(&mut lines).await? {
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            reply(&mut write, "250-sink\r\n250 8BITMIME").await?;
        } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
            reply(&mut write, "250 ok").await?;
        } else if upper.starts_with("RSET") {
            (from, to) = (String::new(), Vec::new());
            reply(&mut write, "250 ok").await?;
        } else if upper.starts_with("MAIL FROM:") {
            from = address(&line[10..]);
            reply(&mut write, "250 ok").await?;
        } else if upper.starts_with("RCPT TO:") {
            to.push(address(&line[8..]));
            reply(&mut write, "250 ok").await?;
        } else if upper == "DATA" {
            reply(&mut write, "354 end with .").await?;
            let mut data = String::new();
            loop {
                let l = read_line(&mut lines)
                    .await?
                    .context("connection closed in DATA")?;
                if l == "." {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                data.push('\n');
                anyhow::ensure!(data.len() < 10 << 20, "message over 10 MiB");
            }
            inbox.push(Mail {
                from: std::mem::take(&mut from),
                to: std::mem::take(&mut to),
                data,
            });
            reply(&mut write, "250 queued").await?;
        } else if upper.starts_with("QUIT") {
            reply(&mut write, "221 bye").await?;
            return Ok(());
        } else {
            reply(&mut write, "502 not implemented").await?;
        }
    }
    Ok(())
}

async fn reply(w: &mut tokio::net::tcp::OwnedWriteHalf, text: &str) -> std::io::Result<()> {
    w.write_all(format!("{text}\r\n").as_bytes()).await
}

async fn read_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
) -> anyhow::Result<Option<String>> {
    tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("SMTP client silent for 30 s")?
        .context("reading SMTP")
}

/// `<a@b> SIZE=…` -> `a@b`.
fn address(arg: &str) -> String {
    let arg = arg.trim();
    let end = arg.find('>').map_or(arg.len(), |i| i + 1);
    arg[..end]
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}
