//! Sync reports in batches: a fleet reporting at once is written in a few transactions, each
//! report acknowledged only once stored, and over a full queue the hub answers 503 `busy` with
//! `Retry-After` instead of storing late or losing the report. On both backends.

use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use synchub_protocol::{DEFAULT_SPACE, SyncReport, SyncStatus, SyncType};
use synchub_tests::fixtures::{http, metric};
use synchub_tests::hub::{Backend, TestHub};

fn report(n: usize) -> SyncReport {
    SyncReport {
        report_id: format!("herd-{n:04}-{}", uuid::Uuid::new_v4()),
        client_id: format!("pc-{n:04}"),
        space: DEFAULT_SPACE.to_owned(),
        sync_type: SyncType::Download,
        status: SyncStatus::Success,
        version: Some(1),
        items_synced: 1,
        items_total: Some(508),
        bytes: 5000,
        duration_ms: 40,
        error_message: None,
        user: None,
        synced_at: None,
    }
}

/// Posts `report` until the hub takes it; returns how many times it was put off.
async fn post_until_stored(
    client: &reqwest::Client,
    hub: &TestHub,
    report: &SyncReport,
) -> anyhow::Result<u32> {
    let mut put_off = 0;
    loop {
        let resp = client
            .post(hub.api("/sync-log"))
            .bearer_auth(&hub.admin_token)
            .json(report)
            .send()
            .await?;
        match resp.status().as_u16() {
            201 => return Ok(put_off),
            503 => {
                anyhow::ensure!(
                    resp.headers().get("retry-after").is_some(),
                    "a busy answer without Retry-After"
                );
                put_off += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            status => anyhow::bail!("report answered {status}: {}", resp.text().await?),
        }
    }
}

async fn a_rush_of_reports_is_stored_in_few_transactions(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_with_backend_and(backend, |c| c.limits.max_queued_reports = 4).await?;
    let batches_before = metric(&hub, "synchub_report_batch_rows_count").await?;
    let reports: Vec<SyncReport> = (0..200).map(report).collect();
    // 100 PCs reporting at once over kept-alive connections (under the hub's cap on
    // connections per address that have not authenticated yet).
    let client = http();
    let put_off: Vec<u32> = futures::stream::iter(&reports)
        .map(|r| post_until_stored(&client, &hub, r))
        .buffer_unordered(100)
        .try_collect()
        .await?;
    let batches = metric(&hub, "synchub_report_batch_rows_count").await? - batches_before;
    assert!(
        batches > 0.0 && batches < 200.0,
        "200 reports took {batches} transactions"
    );
    assert!(
        put_off.iter().sum::<u32>() > 0,
        "200 reports at once never filled a queue of 4"
    );

    // Every acknowledged report is in sync_log, once.
    let log = hub.sync_log("limit=1000").await?;
    let ids: HashSet<String> = log.into_iter().filter_map(|e| e.report_id).collect();
    for r in &reports {
        assert!(
            ids.contains(&r.report_id),
            "{} acknowledged, not stored",
            r.report_id
        );
    }
    // Sent again: a duplicate, not a second row.
    let again = http()
        .post(hub.api("/sync-log"))
        .bearer_auth(&hub.admin_token)
        .json(&reports[0])
        .send()
        .await?;
    assert_eq!(again.status(), 200);
    hub.stop().await;
    Ok(())
}

/// One test for both backends, one after the other: the batch counter is process-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_in_batches_on_both_backends() -> anyhow::Result<()> {
    a_rush_of_reports_is_stored_in_few_transactions(Backend::Sqlite).await?;
    a_rush_of_reports_is_stored_in_few_transactions(Backend::Postgres).await
}
