//! The hub's alerts reach the office: a real agent failing to sync is reported on a Discord, a
//! Slack and a plain JSON webhook and by email (a local HTTP receiver and a local SMTP sink),
//! then reported back to normal; many PCs failing at once are rate-limited; a replica whose
//! PostgreSQL connection is cut reports it and its return; the daily summary comes at its time.
//! The first test prints how long after the PC failed the alert arrived.

use anyhow::{Context, ensure};
use std::time::{Duration, Instant};
use synchub_hub::alerts::{AlertsConfig, EmailConfig, SmtpSecurity, WebhookConfig, WebhookFormat};
use synchub_protocol::{AgentFrame, AgentState, DEFAULT_SPACE, Role};
use synchub_tests::fixtures::{agent_config, commit};
use synchub_tests::hub::{TestHub, WsAgent, fs_blob_path};
use synchub_tests::proxy::{Fault, FaultProxy};
use synchub_tests::sinks::{SmtpSink, WebhookReceiver};

fn hook(receiver: &WebhookReceiver, name: &str, format: WebhookFormat) -> WebhookConfig {
    WebhookConfig {
        url: receiver.url(name),
        format,
    }
}

fn kind_is(body: &serde_json::Value, kind: &str) -> bool {
    body["kind"] == kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pc_is_reported_on_every_sink_and_again_when_it_recovers() -> anyhow::Result<()> {
    let hooks = WebhookReceiver::start().await?;
    let smtp = SmtpSink::start().await?;
    let hub = TestHub::start_with(|c| {
        c.alerts = AlertsConfig {
            webhook: vec![
                hook(&hooks, "discord", WebhookFormat::Discord),
                hook(&hooks, "slack", WebhookFormat::Slack),
                hook(&hooks, "json", WebhookFormat::Json),
            ],
            email: Some(EmailConfig {
                smtp_host: "127.0.0.1".into(),
                smtp_port: Some(smtp.addr.port()),
                security: SmtpSecurity::None,
                username: None,
                password: None,
                from: "synchub <alerts@scoala.ro>".into(),
                to: vec!["it@scoala.ro".into()],
            }),
            pc_after_secs: 1,
            ..AlertsConfig::default()
        };
        // No blobs kept in memory: the hub would otherwise serve the file it was just sent
        // from there, whatever happens to its disk below.
        c.limits.hot_blob_cache_bytes = 0;
    })
    .await?;
    let pc = hub.token("pc-cluj-01", Role::Agent, None).await?;
    let good = b"{\"elevi\": 28}";
    let (status, _) = commit(&hub, &pc, 1, &[("elevi.json", good)], &[]).await?;
    ensure!(status.is_success(), "commit: {status}");
    // Damaged on the hub's disk: the agent's download fails its hash check, again and again.
    let blob = fs_blob_path(
        hub.data_dir(),
        synchub_protocol::Sha256Hex::of(good).as_str(),
    );
    std::fs::write(&blob, b"{\"elevi\": 99}")?;

    let dir = tempfile::tempdir()?;
    let agent = synchub_client::SyncClient::start(agent_config(&hub, &pc, dir.path())).await?;
    let mut state = agent.subscribe(None)?;
    tokio::time::timeout(
        Duration::from_secs(20),
        state.wait_for(|s| matches!(s, AgentState::Failed { .. })),
    )
    .await
    .context("the agent did not fail")??;
    let failed_at = Instant::now();

    let wait = Duration::from_secs(15);
    let (arrived, (_, json)) = hooks
        .inbox
        .wait_for(wait, |(name, b)| name == "json" && kind_is(b, "pc_failing"))
        .await?;
    let latency = arrived.saturating_duration_since(failed_at);
    eprintln!(
        "alert latency: the JSON webhook got the alert {} ms after the PC failed \
         (threshold pc_after_secs = 1, check_interval_ms = 1000)",
        latency.as_millis()
    );
    ensure!(latency < Duration::from_secs(4), "alert took {latency:?}");
    let text = json["text"].as_str().unwrap_or_default();
    ensure!(text.contains("pc-cluj-01"), "{json}");
    ensure!(text.contains(DEFAULT_SPACE), "{json}");
    ensure!(json["hub"].is_string() && json["at"].is_string(), "{json}");
    let (_, (_, discord)) = hooks
        .inbox
        .wait_for(wait, |(name, _)| name == "discord")
        .await?;
    let content = discord["content"].as_str().unwrap_or_default();
    ensure!(content.starts_with("**pc-cluj-01"), "{discord}");
    ensure!(content.contains("cannot sync"), "{discord}");
    let (_, (_, slack)) = hooks
        .inbox
        .wait_for(wait, |(name, _)| name == "slack")
        .await?;
    ensure!(
        slack["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("*pc-cluj-01")),
        "{slack}"
    );
    let (_, mail) = smtp.inbox.wait_for(wait, |_| true).await?;
    ensure!(mail.from == "alerts@scoala.ro", "{mail:?}");
    ensure!(mail.to == ["it@scoala.ro"], "{mail:?}");
    ensure!(
        mail.data.contains("Subject: [synchub] pc-cluj-01"),
        "{}",
        mail.data
    );
    ensure!(mail.data.contains("failed to sync"), "{}", mail.data);

    // One alert per sink for the whole episode, however long it lasts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failing = |name: &str| {
        hooks
            .inbox
            .all()
            .iter()
            .filter(|(_, (n, b))| n == name && (n != "json" || kind_is(b, "pc_failing")))
            .count()
    };
    ensure!(failing("json") == 1 && failing("discord") == 1, "repeated");
    ensure!(smtp.inbox.all().len() == 1, "repeated mail");

    // Repaired: the agent's next retry succeeds, and the office hears it is fine again.
    std::fs::write(&blob, good)?;
    agent.sync_now(None)?;
    hooks
        .inbox
        .wait_for(Duration::from_secs(20), |(name, b)| {
            name == "json" && kind_is(b, "pc_recovered")
        })
        .await?;
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

/// A bare agent that says it holds version 1 and failed to get `target`.
async fn failing_agent(hub: &TestHub, token: &str, target: u64) -> anyhow::Result<WsAgent> {
    let mut a = WsAgent::connect(hub, token, &[DEFAULT_SPACE]).await?;
    let frame = AgentFrame::Status {
        space: DEFAULT_SPACE.into(),
        state: AgentState::Failed {
            version: 1,
            target,
            error: "disk full".into(),
            retry_at: None,
            stale_allowed: false,
        },
    };
    a.send_text(serde_json::to_string(&frame)?).await?;
    Ok(a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pcs_failing_at_once_are_rate_limited() -> anyhow::Result<()> {
    let hooks = WebhookReceiver::start().await?;
    let hub = TestHub::start_with(|c| {
        c.alerts = AlertsConfig {
            webhook: vec![hook(&hooks, "json", WebhookFormat::Json)],
            pc_after_secs: 0,
            max_per_hour: 2,
            check_interval_ms: 100,
            ..AlertsConfig::default()
        };
    })
    .await?;
    let admin = hub.admin_token.clone();
    let (status, body) = commit(&hub, &admin, 1, &[("a.txt", b"a")], &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let mut agents = Vec::new();
    for i in 0..5 {
        let token = hub.token(&format!("pc-{i}"), Role::Agent, None).await?;
        agents.push(failing_agent(&hub, &token, 2).await?);
    }
    hooks
        .inbox
        .wait_for(Duration::from_secs(10), |_| hooks.inbox.all().len() >= 2)
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = hooks.inbox.all();
    ensure!(
        got.len() == 2,
        "max_per_hour = 2, five PCs failing: {} alerts",
        got.len()
    );
    ensure!(got.iter().all(|(_, (_, b))| kind_is(b, "pc_failing")));
    drop(agents);
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_its_database_says_so_and_when_it_is_back() -> anyhow::Result<()> {
    let hooks = WebhookReceiver::start().await?;
    let url = synchub_tests::postgres::test_database().await?;
    // The replica reaches PostgreSQL through a proxy the test can cut.
    let (before, rest) = url.rsplit_once(':').context("a database URL with a port")?;
    let (port, db) = rest.split_once('/').context("a database name")?;
    let proxy = FaultProxy::start(format!("127.0.0.1:{port}").parse()?).await?;
    let proxied = format!("{before}:{}/{db}", proxy.addr.port());
    let hub = TestHub::start_with(|c| {
        c.database_url = Some(proxied);
        c.alerts = AlertsConfig {
            webhook: vec![hook(&hooks, "json", WebhookFormat::Json)],
            database_after_secs: 1,
            ..AlertsConfig::default()
        };
    })
    .await?;
    proxy.set(Fault::Reset);
    let cut = Instant::now();
    let (arrived, (_, lost)) = hooks
        .inbox
        .wait_for(Duration::from_secs(20), |(_, b)| {
            kind_is(b, "database_lost")
        })
        .await?;
    eprintln!(
        "database alert {} ms after the connection was cut (database_after_secs = 1)",
        arrived.duration_since(cut).as_millis()
    );
    ensure!(
        lost["text"]
            .as_str()
            .is_some_and(|t| t.contains("failed to read its database")),
        "{lost}"
    );
    proxy.set(Fault::Pass);
    hooks
        .inbox
        .wait_for(Duration::from_secs(30), |(_, b)| {
            kind_is(b, "database_back")
        })
        .await?;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_summary_comes_at_its_time() -> anyhow::Result<()> {
    let hooks = WebhookReceiver::start().await?;
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let hub = TestHub::start_with(|c| {
        c.alerts = AlertsConfig {
            webhook: vec![hook(&hooks, "slack", WebhookFormat::Slack)],
            daily_summary_utc: Some(at.format("%H:%M:%S").to_string()),
            ..AlertsConfig::default()
        };
    })
    .await?;
    let pc = hub.token("pc-iasi-02", Role::Agent, None).await?;
    let (status, _) = commit(&hub, &hub.admin_token, 1, &[("a.txt", b"a")], &[]).await?;
    ensure!(status.is_success());
    let _failing = failing_agent(&hub, &pc, 2).await?;
    let (_, (_, body)) = hooks
        .inbox
        .wait_for(Duration::from_secs(15), |_| true)
        .await?;
    let text = body["text"].as_str().unwrap_or_default();
    ensure!(text.starts_with("*synchub daily summary"), "{body}");
    ensure!(text.contains("PCs connected to hub"), "{body}");
    ensure!(
        text.contains(": 1; on the head: 0, behind: 0, failing: 1."),
        "{body}"
    );
    let early = chrono::Utc::now() - at;
    ensure!(
        early > chrono::Duration::milliseconds(-100),
        "summary came {early} before its time"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(hooks.inbox.all().len() == 1, "one summary a day");
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_mass_change_is_alerted_once_when_the_agent_reports_it() -> anyhow::Result<()> {
    let hooks = WebhookReceiver::start().await?;
    let hub = TestHub::start_with(|c| {
        c.alerts = AlertsConfig {
            webhook: vec![
                hook(&hooks, "json", WebhookFormat::Json),
                hook(&hooks, "discord", WebhookFormat::Discord),
            ],
            ..AlertsConfig::default()
        };
    })
    .await?;
    let pc = hub.token("pc-brasov-03", Role::Agent, None).await?;
    // Connected, so the alert names the PC as the dashboard does (token and host).
    let _ws = WsAgent::connect(&hub, &pc, &[DEFAULT_SPACE]).await?;
    let client = hub
        .state()
        .clients
        .list()
        .first()
        .map(|c| c.client_id.clone())
        .context("the agent is listed")?;
    let change = synchub_protocol::HeldChange {
        deletes: 40,
        replaces: 0,
        total: 60,
        sample_deletes: vec!["qr/0001.png".into(), "qr/0002.png".into()],
        sample_replaces: Vec::new(),
        held_at: chrono::Utc::now().to_rfc3339(),
    };
    // The agent's PUT, as its two-way loop makes it every few seconds while it waits.
    let put = || {
        synchub_tests::fixtures::http()
            .put(hub.api(&format!("/spaces/{DEFAULT_SPACE}/held/{client}")))
            .bearer_auth(&pc)
            .json(&change)
            .send()
    };
    let sent = Instant::now();
    ensure!(put().await?.status().is_success(), "PUT held");
    let (arrived, (_, json)) = hooks
        .inbox
        .wait_for(Duration::from_secs(10), |(name, b)| {
            name == "json" && kind_is(b, "held_change")
        })
        .await?;
    eprintln!(
        "held-change alert {} ms after the agent reported it",
        arrived.duration_since(sent).as_millis()
    );
    let text = json["text"].as_str().unwrap_or_default();
    ensure!(text.contains("pc-brasov-03"), "{json}");
    ensure!(text.contains("delete 40 files of the 60"), "{json}");
    ensure!(text.contains("qr/0001.png"), "{json}");
    let (_, (_, discord)) = hooks
        .inbox
        .wait_for(Duration::from_secs(10), |(name, _)| name == "discord")
        .await?;
    ensure!(
        discord["content"]
            .as_str()
            .is_some_and(|c| c.contains("waits for approval")),
        "{discord}"
    );
    // The agent's refreshes of the same held change are not news.
    for _ in 0..3 {
        ensure!(put().await?.status().is_success(), "PUT held again");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_alerts = hooks
        .inbox
        .all()
        .iter()
        .filter(|(_, (n, b))| n == "json" && kind_is(b, "held_change"))
        .count();
    ensure!(held_alerts == 1, "{held_alerts} alerts for one held change");
    hub.stop().await;
    Ok(())
}
