//! The agent's block page as the person at the PC sees it, rendered by headless Chromium on
//! `?static=1` (the live page keeps `/events` open, so a screenshot tool never sees it load):
//! plain words in English and Romanian, the space's display name, when the data was updated,
//! advice and a retry countdown after a failure, and a button only when it does something.
//! Screenshots are kept in Cargo's test folder under target/ for a person to look at.

use anyhow::{Context, ensure};
use std::path::PathBuf;
use std::time::Duration;
use synchub_client::{HubApi, SyncClient};
use synchub_protocol::{AgentState, Role, Sha256Hex};
use synchub_tests::browser::{chromium, run_chromium, visible};
use synchub_tests::fixtures::{agent_config, wait_ready};
use synchub_tests::hub::{TestHub, fs_blob_path};

const SPACE: &str = synchub_protocol::DEFAULT_SPACE;

/// The rendered DOM of the page, and a screenshot of it saved as `name`.png.
async fn look(agent: &SyncClient, query: &str, name: &str) -> anyhow::Result<String> {
    let url = format!(
        "http://{}/?static=1&{query}",
        agent.local_api_addr().context("local API on")?
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("block-page-{name}.png"));
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=900,600",
        ],
        &url,
    )
    .await?;
    ensure!(shot.is_file(), "no screenshot of {url}");
    eprintln!("screenshot: {}", shot.display());
    run_chromium(&["--dump-dom"], &url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_block_page_speaks_to_the_office_worker() -> anyhow::Result<()> {
    chromium()?;
    // No small blobs kept in memory: the blob damaged on the hub's disk below is read from the
    // disk for the download, not served from the copy its bump's frame read.
    let hub = TestHub::start_with(|c| c.limits.hot_blob_cache_bytes = 0).await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("elevi.json"), b"{\"v\":1}")?;
    let v1 = synchub_client::publish(&api, SPACE, None, &[src.path().join("elevi.json")], None)
        .await?
        .head
        .version;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &token, dir.path());
    config
        .display_names
        .insert(SPACE.to_owned(), "Date elevi".to_owned());
    let agent = SyncClient::start(config.clone()).await?;
    wait_ready(&agent, v1, Duration::from_secs(10)).await?;

    let ready = visible(&look(&agent, "lang=en", "ready-en").await?);
    for want in ["Date elevi", "Up to date since", "You can use the program."] {
        ensure!(ready.contains(want), "missing {want:?}: {ready}");
    }
    for unwanted in [SPACE, "version", "→", "Try again now", "Update now"] {
        ensure!(!ready.contains(unwanted), "shows {unwanted:?}: {ready}");
    }
    let ro = visible(&look(&agent, "lang=ro", "ready-ro").await?);
    for want in ["Date comune", "La zi de la ora", "Puteți folosi programul."] {
        ensure!(ro.contains(want), "missing {want:?}: {ro}");
    }

    // A version whose blob is damaged on the hub: the download fails and is retried.
    agent.shutdown().await;
    std::fs::write(src.path().join("elevi.json"), b"{\"v\":2}")?;
    synchub_client::publish(&api, SPACE, None, &[src.path().join("elevi.json")], None).await?;
    let sha = Sha256Hex::of(b"{\"v\":2}");
    std::fs::write(fs_blob_path(hub.data_dir(), sha.as_str()), b"{\"v\":X}")?;
    config.client_id = Some(format!("test-agent-{}", uuid::Uuid::new_v4()));
    config.max_backoff_ms = 60_000;
    let agent = SyncClient::start(config).await?;
    let mut rx = agent.subscribe(None)?;
    // The first retries come within a second or two, quicker than a browser loads the page;
    // from the fourth failure on the agent waits at least 4 s, long enough to look at it.
    let (mut failures, mut was_failed) = (0, false);
    tokio::time::timeout(
        Duration::from_secs(40),
        rx.wait_for(|s| {
            let failed = matches!(
                s,
                AgentState::Failed {
                    retry_at: Some(_),
                    ..
                }
            );
            if failed && !was_failed {
                failures += 1;
            }
            was_failed = failed;
            failed && failures >= 4
        }),
    )
    .await
    .context("the agent did not fail four times")??;
    let failed = visible(&look(&agent, "lang=en", "failed-en").await?);
    for want in [
        "Date elevi",
        "The data arrived damaged on the way; it will be downloaded again.",
        "Please do not use the program until this finishes.",
        "Try again now",
        "Details for IT",
    ] {
        ensure!(failed.contains(want), "missing {want:?}: {failed}");
    }
    ensure!(
        failed.contains("Next try in") || failed.contains("Trying again now"),
        "no countdown: {failed}"
    );
    ensure!(!failed.contains("version 1"), "{failed}");
    let ro = visible(&look(&agent, "lang=ro", "failed-ro").await?);
    ensure!(ro.contains("Datele au sosit deteriorate"), "{ro}");
    ensure!(ro.contains("Încearcă din nou acum"), "{ro}");
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}

/// The live page (following `/events`), driven over WebDriver: while a download is under way
/// it blocks with a progress bar and MB done; when the download finishes it says the data is
/// up to date, without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_block_page_goes_from_progress_to_ready() -> anyhow::Result<()> {
    use synchub_tests::browser::Browser;
    use synchub_tests::proxy::{Fault, FaultProxy};
    let hub = TestHub::start().await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    // The agent reaches the hub through a proxy that freezes in the middle of the download.
    let proxy = FaultProxy::start(hub.config.listen).await?;
    let dir = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &token, dir.path());
    config.hubs = vec![proxy.url()];
    config.read_timeout_ms = 60_000;
    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, 1, Duration::from_secs(10)).await?;
    let browser = Browser::start(900, 600).await?;
    let page = format!(
        "http://{}/?lang=en",
        agent.local_api_addr().context("local API on")?
    );
    browser.client.goto(&page).await?;
    browser
        .wait_text(Duration::from_secs(10), "ready", |t| {
            t.contains("Up to date")
        })
        .await?;

    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    proxy.freeze_after(1_500_000);
    let (status, _) =
        synchub_tests::fixtures::commit(&hub, &token, 1, &[("arhiva.bin", &big)], &[]).await?;
    ensure!(status.is_success(), "commit: {status}");
    let text = browser
        .wait_text(Duration::from_secs(15), "the download's progress", |t| {
            t.contains("Updating the shared data…") && t.contains("of 4.0 MB")
        })
        .await?;
    ensure!(
        text.contains("Please do not use the program until this finishes."),
        "{text}"
    );
    let bar = browser
        .client
        .execute(
            "const p = document.querySelector('progress'); return p ? [p.value, p.max] : null",
            vec![],
        )
        .await?;
    ensure!(
        bar[0].as_f64().is_some_and(|v| v > 0.0) && bar[1].as_f64() == Some(4_000_000.0),
        "progress bar: {bar}"
    );
    browser
        .screenshot(
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join("block-page-live-downloading.png"),
        )
        .await?;

    proxy.set(Fault::Pass);
    let text = browser
        .wait_text(Duration::from_secs(30), "ready after the download", |t| {
            t.contains("Up to date since")
        })
        .await?;
    ensure!(text.contains("You can use the program."), "{text}");
    ensure!(!text.contains("Updating"), "{text}");
    browser
        .screenshot(
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("block-page-live-ready.png"),
        )
        .await?;
    browser.close().await?;
    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
