//! The hub's dashboard as an admin sees it, rendered by headless Chromium: sizes and times for
//! people (not raw byte counts and UTC ISO stamps), files changed beside the version's total,
//! and a long error that wraps in its column instead of pushing the others off-screen. A
//! screenshot is kept in Cargo's test folder under target/.

use anyhow::ensure;
use std::path::PathBuf;
use synchub_protocol::Role;
use synchub_tests::browser::{chromium, run_chromium, visible};
use synchub_tests::fixtures::{commit, http};
use synchub_tests::hub::TestHub;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_sizes_times_and_long_errors_for_people() -> anyhow::Result<()> {
    chromium()?;
    let hub = TestHub::start().await?;
    let agent = hub.token("pc-cluj-01", Role::Agent, None).await?;
    let big = vec![7u8; 2_500_000];
    let (status, _) = commit(&hub, &agent, 1, &[("elevi.bin", &big)], &[]).await?;
    ensure!(status.is_success(), "commit: {status}");
    // One unbroken 600-character word: the worst case for a table column.
    let long_error = format!("download failed: {}", "x".repeat(600));
    let report = serde_json::json!({
        "report_id": "r-1", "client_id": "pc-cluj-01", "space": "global_version",
        "sync_type": "download", "status": "failed", "version": 2, "items_synced": 4,
        "items_total": 509, "bytes": 1234, "duration_ms": 1234, "error_message": long_error,
    });
    let r = http()
        .post(hub.api("/sync-log"))
        .bearer_auth(&agent)
        .json(&report)
        .send()
        .await?;
    ensure!(r.status().is_success(), "report: {}", r.status());

    let url = format!("{}/#token={}", hub.url, hub.admin_token);
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let budget = "--virtual-time-budget=3000";
    run_chromium(
        &[
            budget,
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,800",
        ],
        &url,
    )
    .await?;
    ensure!(shot.is_file(), "no screenshot");
    eprintln!("screenshot: {}", shot.display());
    let dom = run_chromium(&[budget, "--dump-dom"], &url).await?;
    let text = visible(&dom);
    ensure!(text.contains("2.5 MB"), "version size not human: {text}");
    ensure!(!text.contains("2500000"), "raw byte count shown: {text}");
    ensure!(text.contains("4 / 509"), "changed files and total: {text}");
    ensure!(text.contains("1.2 s"), "duration not human: {text}");
    ensure!(
        !text.contains("T0") && !text.contains("Z "),
        "ISO stamps shown: {text}"
    );
    ensure!(
        dom.contains(&format!("<td class=\"wrap\">{long_error}</td>")),
        "the long error is not in a wrapping cell"
    );
    hub.stop().await;
    Ok(())
}
