//! Alerts where the office already talks: webhooks (Discord, Slack or plain JSON) and email
//! over SMTP, for a PC failing or behind the head for longer than a threshold, a mass change
//! an agent holds for an admin's approval, this replica losing its database, and a daily
//! summary.
//!
//! Two supervised tasks: the watcher looks at the connected agents, the heads and the
//! database's health every `check_interval_ms`, and hears at once of each held change this
//! replica's agents report (`state.held_news`), and decides what to say ([`Watcher`], pure
//! logic over a [`Fleet`] snapshot, unit-tested below); the sender delivers each alert to every
//! sink, each send with a deadline and a few retries. Alerts are rate-limited: one per PC
//! and kind of trouble until it clears (then a "back to normal"), the same PC not again within
//! `repeat_after_secs`, and at most `max_per_hour` in all; what the limit holds back is counted
//! and said in the next alert that goes out.

use crate::config::ConfigError;
use crate::state::AppState;
use chrono::{DateTime, NaiveTime, Utc};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use synchub_protocol::{AgentState, ClientInfo, HeldRecord};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `[alerts]` in the hub's configuration. Nothing is watched unless a webhook or an email is
/// configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// `[[alerts.webhook]]`: `url` and `format` (`discord`, `slack` or `json`).
    pub webhook: Vec<WebhookConfig>,
    /// `[alerts.email]`: an SMTP server and the addresses to write to.
    pub email: Option<EmailConfig>,
    /// A PC failing, or behind the head, for longer than this is reported.
    pub pc_after_secs: u64,
    /// This replica failing to read its database for longer than this is reported.
    pub database_after_secs: u64,
    /// The same PC (or the database) is not reported again within this, after an alert.
    pub repeat_after_secs: u64,
    /// At most this many alerts an hour in all; more are counted and mentioned later.
    pub max_per_hour: u32,
    /// When to send the daily summary, `HH:MM` (or `HH:MM:SS`) UTC; none: no summary.
    pub daily_summary_utc: Option<String>,
    /// How often the fleet and the database are looked at.
    pub check_interval_ms: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook: Vec::new(),
            email: None,
            pc_after_secs: 600,
            database_after_secs: 30,
            repeat_after_secs: 3600,
            max_per_hour: 30,
            daily_summary_utc: None,
            check_interval_ms: 1000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
}

/// The body a webhook gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// `{"content": "..."}` (Discord's incoming webhooks).
    Discord,
    /// `{"text": "..."}` (Slack's incoming webhooks, also Mattermost and Rocket.Chat).
    Slack,
    /// The alert as a JSON object: `kind`, `hub`, `subject`, `title`, `text`, `at`.
    #[default]
    Json,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub smtp_host: String,
    /// Default: 465 with `security = "tls"`, 587 with `starttls`, 25 with `none`.
    #[serde(default)]
    pub smtp_port: Option<u16>,
    #[serde(default)]
    pub security: SmtpSecurity,
    #[serde(default)]
    pub username: Option<String>,
    /// Or `SYNCHUB_SMTP_PASSWORD` in the environment.
    #[serde(default)]
    pub password: Option<String>,
    /// `synchub <alerts@example.org>`
    pub from: String,
    pub to: Vec<String>,
}

impl std::fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailConfig")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("from", &self.from)
            .field("to", &self.to)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpSecurity {
    /// TLS from the first byte (port 465).
    Tls,
    /// Plain connection upgraded with STARTTLS, which must succeed (port 587).
    #[default]
    Starttls,
    /// No encryption: only for a relay on the same machine or network.
    None,
}

impl AlertsConfig {
    /// Whether alerts go anywhere.
    pub fn enabled(&self) -> bool {
        !self.webhook.is_empty() || self.email.is_some()
    }

    /// Checks the addresses and times before the hub starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(format!("alerts: {m}")));
        for w in &self.webhook {
            match reqwest::Url::parse(&w.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return invalid(format!("webhook url {:?} is not an http(s) URL", w.url)),
            }
        }
        if let Some(e) = &self.email {
            if e.smtp_host.is_empty() {
                return invalid("email.smtp_host is empty".into());
            }
            if let Err(err) = e.from.parse::<lettre::message::Mailbox>() {
                return invalid(format!("email.from {:?}: {err}", e.from));
            }
            if e.to.is_empty() {
                return invalid("email.to names nobody".into());
            }
            for to in &e.to {
                if let Err(err) = to.parse::<lettre::message::Mailbox>() {
                    return invalid(format!("email.to {to:?}: {err}"));
                }
            }
        }
        if let Some(t) = &self.daily_summary_utc {
            parse_time(t).map_err(|m| ConfigError::Invalid(format!("alerts: {m}")))?;
        }
        if self.check_interval_ms == 0 || self.max_per_hour == 0 {
            return invalid("check_interval_ms and max_per_hour must be above 0".into());
        }
        Ok(())
    }

    /// Fills the SMTP password from `SYNCHUB_SMTP_PASSWORD` when the file has none.
    pub fn apply_env(&mut self) {
        if let Some(e) = &mut self.email
            && e.password.is_none()
            && let Ok(p) = std::env::var("SYNCHUB_SMTP_PASSWORD")
            && !p.is_empty()
        {
            e.password = Some(p);
        }
    }

    /// A copy with the secrets masked, for the start-up log.
    pub fn masked(&self) -> AlertsConfig {
        let mut shown = self.clone();
        if let Some(e) = &mut shown.email
            && e.password.is_some()
        {
            e.password = Some("***".into());
        }
        for w in &mut shown.webhook {
            // A webhook URL is its own secret (Discord and Slack put the key in the path).
            if let Ok(mut u) = reqwest::Url::parse(&w.url) {
                u.set_path("/***");
                u.set_query(None);
                w.url = u.to_string();
            }
        }
        shown
    }
}

fn parse_time(text: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(text, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(text, "%H:%M"))
        .map_err(|_| format!("daily_summary_utc {text:?} is not HH:MM or HH:MM:SS"))
}

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    PcFailing,
    PcBehind,
    PcRecovered,
    DatabaseLost,
    DatabaseBack,
    DailySummary,
    /// A mass change waits for an admin's approval (raised by [`held_change`]).
    HeldChange,
    /// A scheduled backup failed (raised by [`backup_failed`]).
    BackupFailed,
}

/// One message to every sink.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    /// The replica that sends it.
    pub hub: String,
    /// What it is about: a PC's client id, `database`, or `summary`.
    pub subject: String,
    pub title: String,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// The alert for a mass change `name` (the PC, as `pc_name` writes it) holds for approval.
pub fn held_change(hub: &str, record: &HeldRecord, name: &str) -> Alert {
    let c = &record.change;
    let space = &record.space;
    let mut what = Vec::new();
    if c.deletes > 0 {
        what.push(format!("delete {} files", c.deletes));
    }
    if c.replaces > 0 {
        what.push(format!("replace {} files", c.replaces));
    }
    let sample: Vec<&str> = c
        .sample_deletes
        .iter()
        .chain(&c.sample_replaces)
        .take(5)
        .map(String::as_str)
        .collect();
    let mut text = format!(
        "{name} would {} of the {} in {space} at once; it holds the change until an admin \
         approves or rejects it on the dashboard (or with synchub approve|reject).",
        what.join(" and "),
        c.total
    );
    if !sample.is_empty() {
        text.push_str(&format!(" For example: {}.", sample.join(", ")));
    }
    Alert {
        kind: AlertKind::HeldChange,
        hub: hub.to_owned(),
        subject: format!("{}@{space}", record.client_id),
        title: format!("A mass change to {space} by {name} waits for approval"),
        text,
        at: Utc::now(),
    }
}

/// The alert for a scheduled backup that failed for `why`.
pub fn backup_failed(hub: &str, why: &str) -> Alert {
    Alert {
        kind: AlertKind::BackupFailed,
        hub: hub.to_owned(),
        subject: "backup".to_owned(),
        title: "A scheduled backup failed".to_owned(),
        text: format!(
            "{why}. The earlier backups are intact and the next run comes on time; \
             `synchub backup --list` shows the complete ones."
        ),
        at: Utc::now(),
    }
}

/// What the watcher looks at, taken once per check.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    pub clients: Vec<ClientInfo>,
    /// Head version per space.
    pub heads: BTreeMap<String, u64>,
    /// Why the last read of the database failed, while it fails.
    pub database_error: Option<String>,
    /// Held changes waiting for a decision, when they were read (only for the summary).
    pub held_pending: Option<usize>,
}

impl Fleet {
    fn of(state: &AppState) -> Fleet {
        Fleet {
            clients: state.clients.list(),
            heads: state
                .heads
                .snapshot()
                .iter()
                .map(|(space, p)| (space.clone(), p.head.version))
                .collect(),
            database_error: state.reconcile.health.borrow().last_error.clone(),
            held_pending: None,
        }
    }
}

/// A PC's trouble in one space, as seen now.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Trouble {
    Failing {
        error: String,
    },
    Behind {
        holds: u64,
        head: u64,
        state: String,
    },
}

/// A trouble being watched: since when, and whether it was reported.
struct Episode {
    kind: AlertKind,
    since: Instant,
    alerted: bool,
    name: String,
}

/// Decides what to say; keeps no I/O, so the tests drive it with made-up fleets and times.
pub struct Watcher {
    hub: String,
    pc_after: Duration,
    database_after: Duration,
    repeat_after: Duration,
    max_per_hour: usize,
    /// Key: client id and space.
    pcs: HashMap<(String, String), Episode>,
    database: Option<Episode>,
    last_alerted: HashMap<String, Instant>,
    sent: VecDeque<Instant>,
    held_back: u64,
}

impl Watcher {
    pub fn new(hub: &str, config: &AlertsConfig) -> Watcher {
        Watcher {
            hub: hub.to_owned(),
            pc_after: Duration::from_secs(config.pc_after_secs),
            database_after: Duration::from_secs(config.database_after_secs),
            repeat_after: Duration::from_secs(config.repeat_after_secs),
            max_per_hour: config.max_per_hour as usize,
            pcs: HashMap::new(),
            database: None,
            last_alerted: HashMap::new(),
            sent: VecDeque::new(),
            held_back: 0,
        }
    }

    /// The alerts `fleet` calls for at `now`, past the rate limit.
    pub fn check(&mut self, fleet: &Fleet, now: Instant) -> Vec<Alert> {
        let mut out = Vec::new();
        self.check_pcs(fleet, now, &mut out);
        self.check_database(fleet, now, &mut out);
        out.into_iter().filter_map(|a| self.admit(a, now)).collect()
    }

    /// How many alerts the rate limit held back so far.
    pub fn held_back(&self) -> u64 {
        self.held_back
    }

    fn check_pcs(&mut self, fleet: &Fleet, now: Instant, out: &mut Vec<Alert>) {
        let mut seen = std::collections::HashSet::new();
        for client in &fleet.clients {
            let name = pc_name(client);
            for s in &client.spaces {
                let key = (client.client_id.clone(), s.space.clone());
                seen.insert(key.clone());
                let head = fleet.heads.get(&s.space).copied();
                match trouble(&s.state, head) {
                    Some(t) => {
                        let kind = match t {
                            Trouble::Failing { .. } => AlertKind::PcFailing,
                            Trouble::Behind { .. } => AlertKind::PcBehind,
                        };
                        let episode = self.pcs.entry(key).or_insert(Episode {
                            kind,
                            since: now,
                            alerted: false,
                            name: name.clone(),
                        });
                        // Behind turning into failing (or back) is the same episode: one
                        // alert, in the words of what it is when the threshold passes.
                        if !episode.alerted && now.duration_since(episode.since) >= self.pc_after {
                            episode.alerted = true;
                            episode.kind = kind;
                            let lasted = now.duration_since(episode.since);
                            let (title, text) = trouble_words(&name, &s.space, t, lasted);
                            out.push(self.alert(kind, &client.client_id, title, text));
                        }
                    }
                    None => {
                        if let Some(ep) = self.pcs.remove(&key)
                            && ep.alerted
                        {
                            out.push(self.alert(
                                AlertKind::PcRecovered,
                                &client.client_id,
                                format!("{name} is up to date again on {}", s.space),
                                format!(
                                    "{name} holds the head of {} again, after {}.",
                                    s.space,
                                    fmt_duration(now.duration_since(ep.since))
                                ),
                            ));
                        }
                    }
                }
            }
        }
        // A PC that went away is no longer watched (it says nothing more here).
        self.pcs.retain(|k, _| seen.contains(k));
    }

    fn check_database(&mut self, fleet: &Fleet, now: Instant, out: &mut Vec<Alert>) {
        match &fleet.database_error {
            Some(error) => {
                let ep = self.database.get_or_insert(Episode {
                    kind: AlertKind::DatabaseLost,
                    since: now,
                    alerted: false,
                    name: String::new(),
                });
                if !ep.alerted && now.duration_since(ep.since) >= self.database_after {
                    ep.alerted = true;
                    let lasted = fmt_duration(now.duration_since(ep.since));
                    let hub = self.hub.clone();
                    out.push(self.alert(
                        AlertKind::DatabaseLost,
                        "database",
                        format!("Hub {hub} cannot reach its database"),
                        format!(
                            "Hub replica {hub} has failed to read its database for {lasted}: \
                             {error}. It keeps serving the heads it knows; new versions are \
                             not seen until the database answers."
                        ),
                    ));
                }
            }
            None => {
                if let Some(ep) = self.database.take()
                    && ep.alerted
                {
                    let hub = self.hub.clone();
                    out.push(self.alert(
                        AlertKind::DatabaseBack,
                        "database",
                        format!("Hub {hub} reaches its database again"),
                        format!(
                            "Hub replica {hub} reads its database again, after {}.",
                            fmt_duration(now.duration_since(ep.since))
                        ),
                    ));
                }
            }
        }
    }

    /// The daily summary of `fleet`.
    pub fn summary(&self, fleet: &Fleet) -> Alert {
        let (on_head, behind, failing) = counts(fleet);
        let heads: Vec<String> = fleet
            .heads
            .iter()
            .map(|(s, v)| format!("{s} at version {v}"))
            .collect();
        let database = match &fleet.database_error {
            Some(e) => format!("The database does not answer: {e}."),
            None => "The database answers.".to_owned(),
        };
        let held = fleet
            .held_pending
            .map_or("unknown (not read)".to_owned(), |n| n.to_string());
        let watched: Vec<String> = self
            .pcs
            .values()
            .map(|e| {
                format!(
                    "{} ({}, {})",
                    e.name,
                    kind_words(e.kind),
                    fmt_duration(e.since.elapsed())
                )
            })
            .collect();
        let mut text = format!(
            "PCs connected to hub {}: {}; on the head: {on_head}, behind: {behind}, failing: \
             {failing}. Heads: {}. {database} Held changes waiting for approval: {held}.",
            self.hub,
            fleet.clients.len(),
            if heads.is_empty() {
                "none".to_owned()
            } else {
                heads.join(", ")
            },
        );
        if !watched.is_empty() {
            text.push_str(&format!(" Not current: {}.", watched.join(", ")));
        }
        self.alert(
            AlertKind::DailySummary,
            "summary",
            format!(
                "synchub daily summary: {on_head} of {} PCs on the head",
                fleet.clients.len()
            ),
            text,
        )
    }

    fn alert(&self, kind: AlertKind, subject: &str, title: String, text: String) -> Alert {
        Alert {
            kind,
            hub: self.hub.clone(),
            subject: subject.to_owned(),
            title,
            text,
            at: Utc::now(),
        }
    }

    /// The rate limit: a subject's new trouble not within `repeat_after` of its last alert
    /// (its "back to normal" always goes, if its trouble went), and `max_per_hour` in all.
    pub fn admit(&mut self, mut alert: Alert, now: Instant) -> Option<Alert> {
        let trouble = matches!(
            alert.kind,
            AlertKind::PcFailing
                | AlertKind::PcBehind
                | AlertKind::DatabaseLost
                | AlertKind::BackupFailed
        );
        if trouble
            && let Some(last) = self.last_alerted.get(&alert.subject)
            && now.duration_since(*last) < self.repeat_after
        {
            return self.hold_back(alert);
        }
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(3600))
        {
            self.sent.pop_front();
        }
        if self.sent.len() >= self.max_per_hour {
            return self.hold_back(alert);
        }
        self.sent.push_back(now);
        if trouble {
            self.last_alerted.insert(alert.subject.clone(), now);
        }
        if self.held_back > 0 {
            alert.text.push_str(&format!(
                "\n({} earlier alerts were held back by the rate limit; see the dashboard.)",
                self.held_back
            ));
            self.held_back = 0;
        }
        Some(alert)
    }

    fn hold_back(&mut self, alert: Alert) -> Option<Alert> {
        tracing::warn!(kind = ?alert.kind, subject = alert.subject, "alert held back by the rate limit");
        metrics::counter!("synchub_alerts_held_back_total").increment(1);
        self.held_back += 1;
        None
    }
}

/// Whether a PC's state in a space is trouble, given the space's head.
fn trouble(state: &AgentState, head: Option<u64>) -> Option<Trouble> {
    match state {
        AgentState::Failed {
            error, version: _, ..
        } => Some(Trouble::Failing {
            error: error.clone(),
        }),
        AgentState::Ready { version } if head.is_none_or(|h| h == *version) => None,
        other => {
            let holds = other.version();
            let head = head.unwrap_or(holds);
            // Starting at the head is a PC that just connected; anything else short of ready
            // at the head is behind.
            if matches!(other, AgentState::Starting { .. }) && holds == head {
                return None;
            }
            let state = serde_json::to_value(other)
                .ok()
                .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_owned))
                .unwrap_or_default();
            Some(Trouble::Behind { holds, head, state })
        }
    }
}

/// PCs on the head, behind and failing (a PC counts once, by its worst space).
fn counts(fleet: &Fleet) -> (usize, usize, usize) {
    let (mut on_head, mut behind, mut failing) = (0, 0, 0);
    for c in &fleet.clients {
        let states: Vec<_> = c
            .spaces
            .iter()
            .map(|s| trouble(&s.state, fleet.heads.get(&s.space).copied()))
            .collect();
        if states
            .iter()
            .any(|t| matches!(t, Some(Trouble::Failing { .. })))
        {
            failing += 1;
        } else if states.iter().any(Option::is_some) {
            behind += 1;
        } else {
            on_head += 1;
        }
    }
    (on_head, behind, failing)
}

/// The title and text of a PC's trouble in `space` that lasted `lasted`.
fn trouble_words(name: &str, space: &str, t: Trouble, lasted: Duration) -> (String, String) {
    let minutes = fmt_duration(lasted);
    match t {
        Trouble::Failing { error } => (
            format!("{name} cannot sync {space}"),
            format!("{name} has failed to sync {space} for {minutes}: {error}"),
        ),
        Trouble::Behind { holds, head, state } => (
            format!("{name} is behind on {space}"),
            format!(
                "{name} holds version {holds} of {space} while the head is {head}, for \
                 {minutes} (now {state})."
            ),
        ),
    }
}

fn pc_name(c: &ClientInfo) -> String {
    match &c.hostname {
        Some(h) if *h != c.token_name => format!("{} ({h})", c.token_name),
        _ => c.token_name.clone(),
    }
}

fn kind_words(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::PcFailing => "failing",
        _ => "behind",
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------------

/// Deadline of one webhook call or SMTP session.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per sink and alert, 1 s then 4 s apart.
const ATTEMPTS: u32 = 3;
/// Alerts waiting for the sender; more are dropped with a warning (a sink that hangs must not
/// grow the hub's memory).
const QUEUE: usize = 64;
/// Discord refuses content over 2000 characters.
const DISCORD_MAX: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("webhook {url}: {source}")]
    Webhook { url: String, source: reqwest::Error },
    #[error("webhook {url} answered {status}")]
    WebhookStatus {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("email: {0}")]
    Email(String),
}

type Smtp = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;

/// Where alerts go.
enum Sink {
    Webhook {
        url: String,
        shown: String,
        format: WebhookFormat,
    },
    Email {
        transport: Box<Smtp>,
        from: lettre::message::Mailbox,
        to: Vec<lettre::message::Mailbox>,
    },
}

fn sinks(config: &AlertsConfig) -> Result<Vec<Sink>, ConfigError> {
    config.validate()?;
    let shown = config.masked();
    let mut out: Vec<Sink> = config
        .webhook
        .iter()
        .zip(shown.webhook)
        .map(|(w, s)| Sink::Webhook {
            url: w.url.clone(),
            shown: s.url,
            format: w.format,
        })
        .collect();
    if let Some(e) = &config.email {
        let invalid = |m: String| ConfigError::Invalid(format!("alerts.email: {m}"));
        let builder = match e.security {
            SmtpSecurity::Tls => Smtp::relay(&e.smtp_host).map_err(|x| invalid(x.to_string()))?,
            SmtpSecurity::Starttls => {
                Smtp::starttls_relay(&e.smtp_host).map_err(|x| invalid(x.to_string()))?
            }
            SmtpSecurity::None => Smtp::builder_dangerous(&e.smtp_host),
        };
        let mut builder = builder.timeout(Some(SEND_TIMEOUT));
        if let Some(port) = e.smtp_port {
            builder = builder.port(port);
        }
        if let (Some(user), Some(password)) = (&e.username, &e.password) {
            builder =
                builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                    user.clone(),
                    password.clone(),
                ));
        }
        let parse = |a: &str| {
            a.parse::<lettre::message::Mailbox>()
                .map_err(|x| invalid(format!("{a:?}: {x}")))
        };
        out.push(Sink::Email {
            transport: Box::new(builder.build()),
            from: parse(&e.from)?,
            to: e.to.iter().map(|t| parse(t)).collect::<Result<_, _>>()?,
        });
    }
    Ok(out)
}

impl Sink {
    fn name(&self) -> String {
        match self {
            Sink::Webhook { shown, format, .. } => format!("{format:?} webhook {shown}"),
            Sink::Email { to, .. } => format!("email to {}", to.len()),
        }
    }

    async fn send(&self, http: &reqwest::Client, alert: &Alert) -> Result<(), SendError> {
        match self {
            Sink::Webhook { url, format, .. } => {
                let body = webhook_body(*format, alert);
                let r = http
                    .post(url)
                    .json(&body)
                    .timeout(SEND_TIMEOUT)
                    .send()
                    .await
                    .map_err(|source| SendError::Webhook {
                        url: self.name(),
                        source,
                    })?;
                if !r.status().is_success() {
                    return Err(SendError::WebhookStatus {
                        url: self.name(),
                        status: r.status(),
                    });
                }
                Ok(())
            }
            Sink::Email {
                transport,
                from,
                to,
            } => {
                use lettre::AsyncTransport;
                let mut message = lettre::Message::builder()
                    .from(from.clone())
                    .subject(format!("[synchub] {}", alert.title));
                for t in to {
                    message = message.to(t.clone());
                }
                let message = message
                    .header(lettre::message::header::ContentType::TEXT_PLAIN)
                    .body(format!(
                        "{}\n\n-- \nhub {} at {}\n",
                        alert.text,
                        alert.hub,
                        alert.at.to_rfc3339()
                    ))
                    .map_err(|e| SendError::Email(e.to_string()))?;
                tokio::time::timeout(SEND_TIMEOUT, transport.send(message))
                    .await
                    .map_err(|_| SendError::Email("the SMTP server did not finish in 10 s".into()))?
                    .map_err(|e| SendError::Email(e.to_string()))?;
                Ok(())
            }
        }
    }
}

/// The JSON a webhook of `format` receives for `alert`.
pub fn webhook_body(format: WebhookFormat, alert: &Alert) -> serde_json::Value {
    match format {
        WebhookFormat::Discord => {
            let mut content = format!("**{}**\n{}", alert.title, alert.text);
            if content.chars().count() > DISCORD_MAX {
                content = content.chars().take(DISCORD_MAX - 1).collect::<String>() + "…";
            }
            serde_json::json!({ "content": content })
        }
        WebhookFormat::Slack => {
            serde_json::json!({ "text": format!("*{}*\n{}", alert.title, alert.text) })
        }
        WebhookFormat::Json => serde_json::to_value(alert).unwrap_or_default(),
    }
}

/// Starts the watcher and the sender when alerts go anywhere; both stop on `shutdown`.
pub fn spawn(
    state: AppState,
    shutdown: CancellationToken,
) -> Result<Option<JoinHandle<()>>, ConfigError> {
    let config = state.config.alerts.clone();
    if !config.enabled() {
        return Ok(None);
    }
    let sinks = sinks(&config)?;
    tracing::info!(
        sinks = ?sinks.iter().map(Sink::name).collect::<Vec<_>>(),
        pc_after_secs = config.pc_after_secs,
        "alerts on"
    );
    let (tx, rx) = mpsc::channel(QUEUE);
    let watcher = tokio::spawn(supervised(
        "alert watcher",
        shutdown.clone(),
        WatchTask {
            state: state.clone(),
            watcher: Watcher::new(&state.hub_id, &config),
            summary_at: config
                .daily_summary_utc
                .as_deref()
                .and_then(|t| parse_time(t).ok()),
            next_summary: None,
            held: state.held_news.subscribe(),
            backups: state.backup_failures.subscribe(),
            tx,
            interval: Duration::from_millis(config.check_interval_ms),
            database_check: Duration::from_secs(config.database_after_secs.clamp(1, 10)),
        },
    ));
    let sender = tokio::spawn(supervised(
        "alert sender",
        shutdown,
        SendTask {
            sinks,
            rx,
            http: reqwest::Client::builder()
                .timeout(SEND_TIMEOUT)
                .connect_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| ConfigError::Invalid(format!("alerts: HTTP client: {e}")))?,
        },
    ));
    Ok(Some(tokio::spawn(async move {
        let _ = watcher.await;
        let _ = sender.await;
    })))
}

/// A task that runs until shutdown and is restarted (its state kept) if it panics.
trait Task: Send + 'static {
    fn run(&mut self, shutdown: &CancellationToken)
    -> impl std::future::Future<Output = ()> + Send;
}

async fn supervised(name: &'static str, shutdown: CancellationToken, mut task: impl Task) {
    loop {
        let ended = std::panic::AssertUnwindSafe(task.run(&shutdown))
            .catch_unwind()
            .await;
        if shutdown.is_cancelled() {
            return;
        }
        match ended {
            Ok(()) => tracing::error!(task = name, "stopped before shutdown; restarting"),
            Err(_) => tracing::error!(task = name, "panicked; restarting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

struct WatchTask {
    state: AppState,
    watcher: Watcher,
    summary_at: Option<NaiveTime>,
    next_summary: Option<DateTime<Utc>>,
    /// Held changes as this replica first hears of them.
    held: tokio::sync::broadcast::Receiver<HeldRecord>,
    /// Why scheduled backups failed.
    backups: tokio::sync::broadcast::Receiver<String>,
    tx: mpsc::Sender<Alert>,
    interval: Duration,
    database_check: Duration,
}

impl WatchTask {
    fn queue(&self, alert: Alert) {
        tracing::info!(kind = ?alert.kind, subject = alert.subject, title = alert.title, "alert");
        if self.tx.try_send(alert).is_err() {
            tracing::warn!("alert queue full (a sink is slow or down); alert dropped");
            metrics::counter!("synchub_alerts_dropped_total").increment(1);
        }
    }
}

impl Task for WatchTask {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_db_check = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                held = self.held.recv() => {
                    match held {
                        Ok(record) => self.on_held(&record),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "held changes came faster than alerts; some not alerted");
                        }
                        // The hub's state (the sender) is gone: it is shutting down.
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                    continue;
                }
                failed = self.backups.recv() => {
                    match failed {
                        Ok(why) => {
                            let alert = backup_failed(&self.state.hub_id, &why);
                            if let Some(a) = self.watcher.admit(alert, Instant::now()) {
                                self.queue(a);
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                    continue;
                }
                _ = shutdown.cancelled() => return,
            }
            // The reconciler reads the database only when told of a change or every
            // `reread_interval_ms`; ask it now and then, so a lost database is noticed.
            if last_db_check.elapsed() >= self.database_check {
                self.state.reconcile.wake.notify_one();
                last_db_check = Instant::now();
            }
            let fleet = Fleet::of(&self.state);
            for alert in self.watcher.check(&fleet, Instant::now()) {
                self.queue(alert);
            }
            self.summary_if_due(fleet).await;
        }
    }
}

impl WatchTask {
    /// A held change: alerted at once (within the rate limit), named as the dashboard names
    /// the PC when it is connected here.
    fn on_held(&mut self, record: &HeldRecord) {
        let name = self
            .state
            .clients
            .list()
            .iter()
            .find(|c| c.client_id == record.client_id)
            .map_or_else(|| record.client_id.clone(), pc_name);
        let alert = held_change(&self.state.hub_id, record, &name);
        if let Some(a) = self.watcher.admit(alert, Instant::now()) {
            self.queue(a);
        }
    }

    /// The daily summary, when its time came; it reads the held changes from the database.
    async fn summary_if_due(&mut self, mut fleet: Fleet) {
        let Some(at) = self.summary_at else { return };
        let now = Utc::now();
        let next = *self.next_summary.get_or_insert_with(|| next_time(now, at));
        if now < next {
            return;
        }
        self.next_summary = Some(next_time(now + chrono::Duration::seconds(1), at));
        let held = tokio::time::timeout(SEND_TIMEOUT, self.state.store.held_changes()).await;
        fleet.held_pending = match held {
            Ok(Ok(list)) => Some(
                list.iter()
                    .filter(|h| h.decision == synchub_protocol::HeldDecision::Pending)
                    .count(),
            ),
            _ => None,
        };
        let summary = self.watcher.summary(&fleet);
        if let Some(a) = self.watcher.admit(summary, Instant::now()) {
            self.queue(a);
        }
    }
}

/// The first moment at or after `now` whose UTC time of day is `at`.
fn next_time(now: DateTime<Utc>, at: NaiveTime) -> DateTime<Utc> {
    let today = now.date_naive().and_time(at).and_utc();
    if today >= now {
        today
    } else {
        today + chrono::Duration::days(1)
    }
}

struct SendTask {
    sinks: Vec<Sink>,
    rx: mpsc::Receiver<Alert>,
    http: reqwest::Client,
}

impl Task for SendTask {
    async fn run(&mut self, shutdown: &CancellationToken) {
        loop {
            let alert = tokio::select! {
                a = self.rx.recv() => match a {
                    Some(a) => a,
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            };
            let sends = self.sinks.iter().map(|sink| {
                let (http, alert) = (&self.http, &alert);
                async move {
                    for attempt in 1..=ATTEMPTS {
                        match sink.send(http, alert).await {
                            Ok(()) => {
                                metrics::counter!("synchub_alerts_sent_total").increment(1);
                                return;
                            }
                            Err(e) if attempt < ATTEMPTS => {
                                tracing::warn!(error = %e, attempt, "alert not delivered; retrying");
                                tokio::time::sleep(Duration::from_secs(4u64.pow(attempt - 1)))
                                    .await;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, title = alert.title, "alert not delivered; given up");
                                metrics::counter!("synchub_alerts_failed_total").increment(1);
                            }
                        }
                    }
                }
            });
            tokio::select! {
                _ = futures::future::join_all(sends) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synchub_protocol::ClientSpace;

    fn client(id: &str, state: AgentState) -> ClientInfo {
        ClientInfo {
            client_id: id.into(),
            token_name: format!("pc-{id}"),
            hostname: Some(format!("HOST-{id}")),
            agent_version: None,
            connected_at: String::new(),
            spaces: vec![ClientSpace {
                space: "s".into(),
                state,
            }],
        }
    }

    fn fleet(clients: Vec<ClientInfo>, head: u64) -> Fleet {
        Fleet {
            clients,
            heads: BTreeMap::from([("s".to_owned(), head)]),
            database_error: None,
            held_pending: Some(0),
        }
    }

    fn failed(version: u64) -> AgentState {
        AgentState::Failed {
            version,
            target: version + 1,
            error: "hash mismatch".into(),
            retry_at: None,
            stale_allowed: false,
        }
    }

    fn config() -> AlertsConfig {
        AlertsConfig {
            pc_after_secs: 60,
            database_after_secs: 30,
            repeat_after_secs: 600,
            max_per_hour: 3,
            ..AlertsConfig::default()
        }
    }

    #[test]
    fn a_pc_is_reported_once_after_the_threshold_and_when_it_recovers() {
        let mut w = Watcher::new("hub-a", &config());
        let t0 = Instant::now();
        let bad = fleet(vec![client("1", failed(3))], 4);
        assert!(w.check(&bad, t0).is_empty());
        assert!(w.check(&bad, t0 + Duration::from_secs(59)).is_empty());
        let alerts = w.check(&bad, t0 + Duration::from_secs(61));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].kind, AlertKind::PcFailing);
        assert!(
            alerts[0].text.contains("pc-1 (HOST-1)"),
            "{}",
            alerts[0].text
        );
        assert!(alerts[0].text.contains("hash mismatch"));
        assert!(w.check(&bad, t0 + Duration::from_secs(500)).is_empty());
        let good = fleet(vec![client("1", AgentState::Ready { version: 4 })], 4);
        let back = w.check(&good, t0 + Duration::from_secs(501));
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].kind, AlertKind::PcRecovered);
        // Trouble again soon after: held back (flapping), and said in the next alert.
        let t1 = t0 + Duration::from_secs(502);
        assert!(w.check(&bad, t1).is_empty());
        assert!(w.check(&bad, t1 + Duration::from_secs(61)).is_empty());
        assert_eq!(w.held_back(), 1);
    }

    #[test]
    fn behind_is_trouble_but_ready_at_the_head_and_a_fresh_start_are_not() {
        let downloading = AgentState::Downloading {
            version: 3,
            target: 4,
            files_done: 0,
            files_total: 1,
            bytes_done: 0,
            bytes_total: 10,
            bytes_per_sec: 0,
        };
        assert!(matches!(
            trouble(&downloading, Some(4)),
            Some(Trouble::Behind {
                holds: 3,
                head: 4,
                ..
            })
        ));
        assert!(trouble(&AgentState::Ready { version: 3 }, Some(4)).is_some());
        assert!(trouble(&AgentState::Ready { version: 4 }, Some(4)).is_none());
        assert!(trouble(&AgentState::Starting { version: 4 }, Some(4)).is_none());
        let mut w = Watcher::new("hub-a", &config());
        let t0 = Instant::now();
        let f = fleet(vec![client("1", downloading)], 4);
        w.check(&f, t0);
        let a = w.check(&f, t0 + Duration::from_secs(60));
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, AlertKind::PcBehind);
        assert!(a[0].text.contains("version 3") && a[0].text.contains("downloading"));
    }

    #[test]
    fn at_most_max_per_hour_and_the_rest_is_counted_in_the_next() {
        let mut w = Watcher::new("hub-a", &config());
        let t0 = Instant::now();
        let bad = fleet(
            (1..=5).map(|i| client(&i.to_string(), failed(1))).collect(),
            2,
        );
        w.check(&bad, t0);
        assert_eq!(w.check(&bad, t0 + Duration::from_secs(60)).len(), 3);
        assert_eq!(w.held_back(), 2);
        // An hour later there is room again; the next alert says what was held back.
        let db = Fleet {
            database_error: Some("connection refused".into()),
            ..bad.clone()
        };
        let t1 = t0 + Duration::from_secs(3661);
        assert!(w.check(&db, t1).is_empty());
        let a = w.check(&db, t1 + Duration::from_secs(30));
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, AlertKind::DatabaseLost);
        assert!(a[0].text.contains("connection refused"));
        assert!(
            a[0].text.contains("2 earlier alerts were held back"),
            "{}",
            a[0].text
        );
        assert_eq!(w.held_back(), 0);
    }

    #[test]
    fn the_formats_and_the_daily_time() {
        let w = Watcher::new("hub-a", &config());
        let f = fleet(
            vec![
                client("1", AgentState::Ready { version: 2 }),
                client("2", failed(1)),
            ],
            2,
        );
        let s = w.summary(&f);
        assert!(s.text.contains(": 2; on the head: 1,"), "{}", s.text);
        assert!(s.text.contains("failing: 1."), "{}", s.text);
        let d = webhook_body(WebhookFormat::Discord, &s);
        assert!(
            d["content"]
                .as_str()
                .is_some_and(|c| c.starts_with("**synchub daily"))
        );
        let long = Alert {
            text: "x".repeat(5000),
            ..s.clone()
        };
        let d = webhook_body(WebhookFormat::Discord, &long);
        assert_eq!(d["content"].as_str().map(|c| c.chars().count()), Some(2000));
        assert!(webhook_body(WebhookFormat::Slack, &s)["text"].is_string());
        assert_eq!(
            webhook_body(WebhookFormat::Json, &s)["kind"],
            "daily_summary"
        );

        let at = parse_time("07:30").unwrap();
        let now = DateTime::parse_from_rfc3339("2026-11-26T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(next_time(now, at).to_rfc3339(), "2026-11-27T07:30:00+00:00");
        assert!(parse_time("25:00").is_err());
    }

    #[test]
    fn a_held_change_says_who_what_and_how_much() {
        let record = HeldRecord {
            space: "s".into(),
            client_id: "c-1".into(),
            change: synchub_protocol::HeldChange {
                deletes: 7,
                replaces: 3,
                total: 12,
                sample_deletes: vec!["a.png".into()],
                sample_replaces: vec!["b.png".into()],
                held_at: "2026-11-26T08:00:00Z".into(),
            },
            decision: synchub_protocol::HeldDecision::Pending,
            decided_by: None,
            updated_at: String::new(),
        };
        let a = held_change("hub-a", &record, "pc-1 (HOST-1)");
        assert_eq!(a.kind, AlertKind::HeldChange);
        assert!(
            a.text.starts_with(
                "pc-1 (HOST-1) would delete 7 files and replace 3 files of the 12 in s"
            ),
            "{}",
            a.text
        );
        assert!(a.text.contains("For example: a.png, b.png."), "{}", a.text);
        // Not trouble: a second held change of the same PC is not held back as a repeat.
        let mut w = Watcher::new("hub-a", &config());
        let t0 = Instant::now();
        assert!(w.admit(a.clone(), t0).is_some());
        assert!(w.admit(a, t0 + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn configuration_is_checked_and_secrets_masked() {
        let mut c = AlertsConfig {
            webhook: vec![WebhookConfig {
                url: "https://discord.com/api/webhooks/123/SECRET".into(),
                format: WebhookFormat::Discord,
            }],
            email: Some(EmailConfig {
                smtp_host: "smtp.example.org".into(),
                smtp_port: None,
                security: SmtpSecurity::Starttls,
                username: Some("u".into()),
                password: Some("hunter2".into()),
                from: "synchub <alerts@example.org>".into(),
                to: vec!["admin@example.org".into()],
            }),
            ..AlertsConfig::default()
        };
        c.validate().unwrap();
        let shown = format!("{:?}", c.masked());
        assert!(
            !shown.contains("SECRET") && !shown.contains("hunter2"),
            "{shown}"
        );
        c.webhook[0].url = "ftp://x".into();
        assert!(c.validate().is_err());
        c.webhook.clear();
        if let Some(e) = &mut c.email {
            e.to = vec!["not an address".into()];
        }
        assert!(c.validate().is_err());
    }
}
