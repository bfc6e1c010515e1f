//! The dashboard driven as an admin drives it, in headless Chromium over WebDriver: the fleet
//! summary counts PCs on the head, behind, downloading and failed; a click on a PC shows its
//! sync history; the version chart counts the PCs holding each version; sync_log is searched
//! and paged; "Force sync…" asks for confirmation (Cancel does nothing) and then makes a forced
//! version; "Roll back to this…" on a version puts its data back; changes arrive pushed; a new
//! token is shown once and can be revoked; the page fits a phone's width. Screenshots are kept
//! under target/.

use anyhow::{Context, ensure};
use fantoccini::Locator;
use std::time::Duration;
use synchub_protocol::{AgentFrame, AgentState, DEFAULT_SPACE, Role};
use synchub_tests::browser::Browser;
use synchub_tests::fixtures::{self, agent_config, commit, http, wait_ready};
use synchub_tests::hub::{TestHub, WsAgent};

const WAIT: Duration = Duration::from_secs(15);

/// A bare agent that reports `state` for the default space.
async fn agent_in(hub: &TestHub, name: &str, state: AgentState) -> anyhow::Result<WsAgent> {
    let token = hub.token(name, Role::Agent, None).await?;
    let mut a = WsAgent::connect(hub, &token, &[DEFAULT_SPACE]).await?;
    let frame = AgentFrame::Status {
        space: DEFAULT_SPACE.into(),
        state,
    };
    a.send_text(serde_json::to_string(&frame)?).await?;
    Ok(a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_answers_an_admins_questions_and_forces_a_sync() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let publisher = hub.token("secretariat", Role::Agent, None).await?;
    let (status, _) = commit(&hub, &publisher, 1, &[("elevi.json", b"{}")], &[]).await?;
    ensure!(status.is_success(), "commit: {status}");
    // One real PC on the head; bare agents behind, downloading and failed.
    let pc = hub.token("pc-cluj-01", Role::Agent, None).await?;
    let dir = tempfile::tempdir()?;
    let config = agent_config(&hub, &pc, dir.path());
    let pc_id = config.client_id.clone().context("client id")?;
    let agent = synchub_client::SyncClient::start(config).await?;
    wait_ready(&agent, 2, WAIT).await?;
    let _behind = agent_in(&hub, "pc-behind", AgentState::Ready { version: 1 }).await?;
    let downloading = AgentState::Downloading {
        version: 1,
        target: 2,
        files_done: 0,
        files_total: 1,
        bytes_done: 1_000_000,
        bytes_total: 3_000_000,
        bytes_per_sec: 500_000,
    };
    let _downloading = agent_in(&hub, "pc-downloading", downloading).await?;
    let failed = AgentState::Failed {
        version: 1,
        target: 2,
        error: "disk full".into(),
        retry_at: None,
        stale_allowed: false,
    };
    let _failed = agent_in(&hub, "pc-failed", failed).await?;
    // sync_log entries to search and page through: 30 failures, one of them a full disk.
    for i in 0..30 {
        let error = if i == 7 {
            "quota exceeded on D:".to_owned()
        } else {
            format!("timeout {i}")
        };
        let report = serde_json::json!({
            "report_id": format!("r-{i}"), "client_id": "pc-old", "space": DEFAULT_SPACE,
            "sync_type": "download", "status": "failed", "version": 2,
            "error_message": error,
        });
        let r = http()
            .post(hub.api("/sync-log"))
            .bearer_auth(&publisher)
            .json(&report)
            .send()
            .await?;
        ensure!(r.status().is_success(), "report: {}", r.status());
    }

    let browser = Browser::start(1280, 1000).await?;
    let c = &browser.client;
    c.goto(&format!("{}/#token={}", hub.url, hub.admin_token))
        .await?;
    let text = browser
        .wait_text(WAIT, "the fleet summary", |t| t.contains("4 connected"))
        .await?;
    for want in [
        "1 on the head",
        "1 behind",
        "1 downloading",
        "1 failed",
        "disk full",
    ] {
        ensure!(text.contains(want), "summary lacks {want:?}: {text}");
    }
    ensure!(!text.contains("3000000"), "raw byte count: {text}");
    ensure!(text.contains("1.0 MB of 3.0 MB"), "progress in MB: {text}");
    browser
        .screenshot(
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-summary.png"),
        )
        .await?;

    // The version chart and table: one PC (the real one) reported holding version 2.
    let bars = c
        .execute(
            "return [...document.querySelectorAll('#chart title')].map(t => t.textContent)",
            vec![],
        )
        .await?;
    ensure!(
        bars.as_array().is_some_and(|b| b.iter().any(|t| t
            .as_str()
            .is_some_and(|t| t.starts_with("version 2: 1 PCs")))),
        "chart: {bars}"
    );

    // A PC's history.
    browser
        .click(&format!("tr[data-client=\"{pc_id}\"]"))
        .await?;
    let text = browser
        .wait_text(WAIT, "the PC's history", |t| {
            t.contains(&format!("History of {pc_id}"))
        })
        .await?;
    ensure!(text.contains("1 syncs, 0 failed"), "{text}");

    // sync_log: 31 entries (30 reported + the real PC's), 25 a page; search narrows it.
    browser
        .wait_text(WAIT, "paging", |t| t.contains("page 1 of 2 (31 entries)"))
        .await?;
    browser.click("#next").await?;
    browser
        .wait_text(WAIT, "page 2", |t| t.contains("page 2 of 2"))
        .await?;
    c.find(Locator::Id("search"))
        .await?
        .send_keys("quota")
        .await?;
    let text = browser
        .wait_text(WAIT, "the search", |t| {
            t.contains("page 1 of 1 (1 entries)")
        })
        .await?;
    ensure!(text.contains("quota exceeded on D:"), "{text}");
    ensure!(!text.contains("timeout 3"), "{text}");

    // Force sync asks first; Cancel does nothing.
    browser.click("#force").await?;
    browser
        .wait_text(WAIT, "the confirmation", |t| {
            t.contains("Force every PC to download")
        })
        .await?;
    browser.click("#confirm-cancel").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        fixtures::head(&hub, &hub.admin_token).await?.version == 2,
        "Cancel forced a sync"
    );
    browser.click("#force").await?;
    c.find(Locator::Id("confirm-input"))
        .await?
        .send_keys("new class lists")
        .await?;
    browser.click("#confirm-ok").await?;
    browser
        .wait_text(WAIT, "the force-sync notice", |t| {
            t.contains("global_version is now at version 3")
        })
        .await?;
    let forced = fixtures::head(&hub, &hub.admin_token).await?;
    ensure!(forced.version == 3 && forced.forced, "{forced:?}");
    ensure!(
        forced.reason.as_deref() == Some("new class lists"),
        "{forced:?}"
    );
    wait_ready(&agent, 3, WAIT).await?;

    // Roll back to version 1 (before elevi.json) from its row, after a confirmation.
    browser.click("button[data-rollback=\"1\"]").await?;
    browser
        .wait_text(WAIT, "the confirmation", |t| {
            t.contains("Roll global_version back to version 1?")
        })
        .await?;
    c.find(Locator::Id("confirm-input"))
        .await?
        .send_keys("wrong list published")
        .await?;
    browser.click("#confirm-ok").await?;
    browser
        .wait_text(WAIT, "the rollback notice", |t| {
            t.contains("global_version is now at version 4, with the data of version 1.")
        })
        .await?;
    let rolled = fixtures::head(&hub, &hub.admin_token).await?;
    ensure!(rolled.version == 4 && rolled.forced, "{rolled:?}");
    // Both buttons' actions are in the audit log on the page: who, what, on what.
    browser
        .wait_text(WAIT, "the audit log", |t| {
            t.contains("admin force sync global_version v3")
                && t.contains("admin rollback global_version v4 (data of v1)")
        })
        .await?;
    ensure!(
        rolled
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("wrong list published")),
        "{rolled:?}"
    );
    wait_ready(&agent, 4, WAIT).await?;
    ensure!(
        !dir.path().join("current/elevi.json").exists(),
        "the PC still has the file version 1 did not have"
    );

    // A phone: nothing wider than the screen but the tables, which scroll in their section.
    c.set_window_size(390, 844).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let overflow = c
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth",
            vec![],
        )
        .await?;
    ensure!(
        overflow.as_i64().is_some_and(|o| o <= 0),
        "the page is wider than a phone by {overflow} px"
    );
    browser
        .screenshot(
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-phone.png"),
        )
        .await?;
    browser.close().await?;
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_arrive_live_and_a_token_is_shown_once_then_revoked() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let browser = Browser::start(1280, 1000).await?;
    let c = &browser.client;
    let page = format!("{}/#token={}", hub.url, hub.admin_token);
    c.goto(&page).await?;
    browser
        .wait_text(WAIT, "the head", |t| t.contains("version 1"))
        .await?;
    let deadline = std::time::Instant::now() + WAIT;
    while c.find(Locator::Id("live")).await?.text().await? != "live" {
        ensure!(
            std::time::Instant::now() < deadline,
            "the event stream never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Pushed, not polled: while the event stream is up the page polls only every 30 s.
    let publisher = hub.token("secretariat", Role::Agent, None).await?;
    let (status, _) = commit(&hub, &publisher, 1, &[("elevi.json", b"{}")], &[]).await?;
    ensure!(status.is_success(), "commit: {status}");
    let pushed = std::time::Instant::now();
    browser
        .wait_text(Duration::from_secs(5), "the new version", |t| {
            t.contains("version 2")
        })
        .await?;
    eprintln!(
        "the dashboard showed version 2 {:?} after the commit",
        pushed.elapsed()
    );
    let _pc = agent_in(&hub, "pc-live", AgentState::Ready { version: 1 }).await?;
    browser
        .wait_text(Duration::from_secs(5), "the new agent", |t| {
            t.contains("pc-live") && t.contains("1 behind")
        })
        .await?;

    // A token: created after a confirmation, its secret shown once.
    c.find(Locator::Id("token-name"))
        .await?
        .send_keys("pc-iasi-07")
        .await?;
    browser.click("#token-create").await?;
    browser
        .wait_text(WAIT, "the confirmation", |t| {
            t.contains("Create a read token named \"pc-iasi-07\"?")
        })
        .await?;
    browser.click("#confirm-ok").await?;
    browser
        .wait_text(WAIT, "the new secret", |t| {
            t.contains("Copy this token now")
        })
        .await?;
    let secret = c
        .find(Locator::Id("token-secret-value"))
        .await?
        .text()
        .await?;
    ensure!(secret.starts_with("shb_"), "secret: {secret:?}");
    browser
        .screenshot(
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-token.png"),
        )
        .await?;
    let spaces = |secret: String| {
        let url = hub.api("/spaces");
        async move { anyhow::Ok(http().get(url).bearer_auth(secret).send().await?.status()) }
    };
    ensure!(
        spaces(secret.clone()).await?.is_success(),
        "the new token works"
    );
    browser.click("#token-done").await?;
    let text = browser.text().await?;
    ensure!(!text.contains(&secret), "secret still shown after Done");
    c.goto(&page).await?;
    let text = browser
        .wait_text(WAIT, "the token list", |t| {
            t.contains("pc-iasi-07 read live")
        })
        .await?;
    ensure!(!text.contains(&secret), "secret shown again");
    ensure!(
        !c.source().await?.contains(&secret),
        "the secret is in the page"
    );

    // Revoked from its button, after a confirmation: refused at once.
    browser.click("button[data-revoke=\"pc-iasi-07\"]").await?;
    browser.click("#confirm-ok").await?;
    browser
        .wait_text(WAIT, "the revoked token", |t| {
            t.contains("pc-iasi-07 read revoked")
        })
        .await?;
    ensure!(
        spaces(secret).await? == reqwest::StatusCode::UNAUTHORIZED,
        "a revoked token still works"
    );
    // Both actions are in the audit log on the page: who, what, on what.
    browser
        .wait_text(WAIT, "the audit log", |t| {
            t.contains("admin token revoked pc-iasi-07")
                && t.contains("admin token created pc-iasi-07 (read)")
        })
        .await?;

    // The API behind the buttons: names are unique, and the admin cannot lock itself out.
    let dup = http()
        .post(hub.api("/tokens"))
        .bearer_auth(&hub.admin_token)
        .json(&serde_json::json!({"name": "secretariat", "role": "agent"}))
        .send()
        .await?;
    ensure!(
        dup.status() == reqwest::StatusCode::CONFLICT,
        "{}",
        dup.status()
    );
    let own = hub
        .state()
        .store
        .tokens()
        .await?
        .into_iter()
        .find(|t| t.role == Role::Admin)
        .context("the admin token")?;
    let me = http()
        .delete(hub.api(&format!("/tokens/{}", own.name)))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?;
    ensure!(
        me.status() == reqwest::StatusCode::BAD_REQUEST,
        "{}",
        me.status()
    );
    let as_agent = http()
        .get(hub.api("/tokens"))
        .bearer_auth(&publisher)
        .send()
        .await?;
    ensure!(
        as_agent.status() == reqwest::StatusCode::FORBIDDEN,
        "{}",
        as_agent.status()
    );
    browser.close().await?;
    hub.stop().await;
    Ok(())
}
