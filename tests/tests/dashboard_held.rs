//! Held mass changes decided from the dashboard, in headless Chromium over WebDriver, with a
//! real two-way agent in the test process: the PC deletes most of its folder, the page lists
//! the held change (pushed to it, no reload), "Reject…" asks first and then the PC gets its
//! files back and nothing is published; the PC deletes them again, "Approve…" lets the
//! deletion out as a new version. A screenshot is kept under target/.

use anyhow::{Context, ensure};
use std::path::Path;
use std::time::{Duration, Instant};
use synchub_protocol::{DEFAULT_SPACE, HeldRecord, Role, VersionInfo};
use synchub_tests::browser::Browser;
use synchub_tests::fixtures::{self, agent_config, commit};
use synchub_tests::hub::TestHub;

const WAIT: Duration = Duration::from_secs(20);
const FILES: usize = 16;
/// Deleted at once: 10 of 16 is over the guard's half (and at its 10-file minimum).
const DELETED: usize = 10;

fn name(i: usize) -> String {
    format!("f{i:02}.txt")
}

/// The data files in the PC's folder.
fn present(folder: &Path) -> usize {
    (0..FILES)
        .filter(|i| folder.join(name(*i)).is_file())
        .count()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        ensure!(
            Instant::now() < deadline,
            "{what} did not happen in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn held(hub: &TestHub) -> anyhow::Result<Vec<HeldRecord>> {
    hub.admin_get("/held").await
}

/// Deletes the first [`DELETED`] files and waits until the hub lists the held change.
async fn delete_most(hub: &TestHub, folder: &Path) -> anyhow::Result<()> {
    for i in 0..DELETED {
        std::fs::remove_file(folder.join(name(i)))?;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        if held(hub)
            .await?
            .iter()
            .any(|h| h.change.deletes == DELETED as u64)
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the hub does not list the held change"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_mass_change_is_rejected_then_approved_from_the_page() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let publisher = hub.token("secretariat", Role::Agent, None).await?;
    let bodies: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| (name(i), format!("qr {i}").into_bytes()))
        .collect();
    let files: Vec<(&str, &[u8])> = bodies
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let (status, body) = commit(&hub, &publisher, 1, &files, &[]).await?;
    ensure!(status.is_success(), "commit: {status} {body}");
    let v1 = fixtures::head(&hub, &hub.admin_token).await?.version;

    let pc = hub.token("pc-brasov", Role::Agent, None).await?;
    let dir = tempfile::tempdir()?;
    let folder = dir.path().join("qr_codes");
    let mut config = agent_config(&hub, &pc, &folder);
    config.client_id = Some("pc-brasov".into());
    config.two_way = synchub_client::TwoWayConfig {
        enabled: true,
        stable_ms: 100,
        debounce_ms: 50,
        rescan_ms: 500,
        ..synchub_client::TwoWayConfig::default()
    };
    let agent = synchub_client::SyncClient::start(config).await?;
    wait_until("the first download", || present(&folder) == FILES).await?;

    delete_most(&hub, &folder).await?;
    let browser = Browser::start(1280, 1000).await?;
    browser
        .client
        .goto(&format!("{}/#token={}", hub.url, hub.admin_token))
        .await?;
    let text = browser
        .wait_text(WAIT, "the held change", |t| {
            t.contains(&format!("deletes {DELETED} of {FILES} files"))
        })
        .await?;
    ensure!(text.contains("Held mass changes (1)"), "{text}");
    ensure!(
        text.contains("pc-brasov") && text.contains("waiting"),
        "{text}"
    );
    browser
        .screenshot(
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-held.png"),
        )
        .await?;

    // Reject asks first; Cancel does nothing.
    browser.click("button[data-decide=\"reject\"]").await?;
    browser
        .wait_text(WAIT, "the confirmation", |t| {
            t.contains("Reject the change of pc-brasov")
        })
        .await?;
    browser.click("#confirm-cancel").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        held(&hub).await?.iter().all(|h| h.decided_by.is_none()),
        "Cancel decided"
    );
    browser.click("button[data-decide=\"reject\"]").await?;
    browser.click("#confirm-ok").await?;
    browser
        .wait_text(WAIT, "the reject notice", |t| {
            t.contains("Rejected: pc-brasov puts its files back.")
        })
        .await?;
    wait_until("the rejected files coming back", || {
        present(&folder) == FILES
    })
    .await?;
    // Settled: the agent removed it, and the page (pushed) no longer lists it.
    browser
        .wait_text(WAIT, "the list emptied", |t| {
            !t.contains("Held mass changes")
        })
        .await?;
    ensure!(
        held(&hub).await?.is_empty(),
        "still listed after the agent acted"
    );
    ensure!(
        fixtures::head(&hub, &hub.admin_token).await?.version == v1,
        "the rejected deletion was published"
    );

    // The same deletion again, approved this time: it goes out as a new version.
    delete_most(&hub, &folder).await?;
    browser
        .wait_text(WAIT, "the second held change", |t| {
            t.contains("Held mass changes (1)")
        })
        .await?;
    browser.click("button[data-decide=\"approve\"]").await?;
    browser
        .wait_text(WAIT, "the confirmation", |t| {
            t.contains("Approve the change of pc-brasov")
        })
        .await?;
    browser.click("#confirm-ok").await?;
    let deadline = Instant::now() + WAIT;
    let head = loop {
        let head = fixtures::head(&hub, &hub.admin_token).await?;
        if head.version > v1 {
            break head;
        }
        ensure!(
            Instant::now() < deadline,
            "the approved deletion was not published"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let versions: Vec<VersionInfo> = hub
        .admin_get(&format!("/spaces/{DEFAULT_SPACE}/versions?limit=1"))
        .await?;
    let newest = versions.first().context("no versions")?;
    ensure!(
        newest.head.version == head.version && newest.entries == (FILES - DELETED) as u64,
        "the new version: {newest:?}"
    );
    ensure!(present(&folder) == FILES - DELETED, "the PC put files back");
    browser.close().await?;
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
