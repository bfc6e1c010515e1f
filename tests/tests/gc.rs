//! Retention and garbage collection on SQLite + filesystem blobs and on PostgreSQL + S3 (moto):
//! a collection deletes exactly the blobs only expired versions named (never a blob younger
//! than the grace period) and keeps `sync_log` to its age and row bounds, a dry run deletes
//! nothing and counts the same, a commit that names an
//! unreferenced blob while the sweep waits keeps it, and a commit naming a blob the sweep is
//! deleting is refused as missing it; `synchub import` and a bucket source follow the same
//! rule.

use reqwest::StatusCode;
use std::collections::BTreeSet;
use std::time::Duration;
use synchub_hub::config::BlobStoreConfig;
use synchub_hub::gc::{GcOptions, collect};
use synchub_hub::store::SyncLogFilter;
use synchub_protocol::{
    CommitRequest, DEFAULT_SPACE, ManifestEntry, Role, Sha256Hex, SyncReport, SyncStatus, SyncType,
    codes,
};
use synchub_tests::backend_matrix;
use synchub_tests::fixtures::{commit, http, put_blob};
use synchub_tests::hub::TestHub;

/// The database and blob store pairs the collector runs on.
#[derive(Clone, Copy, Debug)]
enum Stack {
    SqliteFs,
    PostgresS3,
}

/// Seconds a blob stays safe from the collector in these tests.
const GRACE_SECS: u64 = 2;

/// A hub keeping the newest 2 versions (whatever their age), collecting only when told.
async fn start(stack: Stack) -> anyhow::Result<TestHub> {
    let (database_url, s3) = match stack {
        Stack::SqliteFs => (None, None),
        Stack::PostgresS3 => (
            Some(synchub_tests::postgres::test_database().await?),
            Some(synchub_tests::s3::test_bucket().await?),
        ),
    };
    TestHub::start_with(|c| {
        if database_url.is_some() {
            c.database_url = database_url;
        }
        if let Some(s3) = s3 {
            c.blob_store = BlobStoreConfig::S3(s3);
        }
        c.retention.keep_versions = 2;
        c.retention.keep_days = 0;
        c.gc.every_secs = 0;
        c.gc.grace_secs = GRACE_SECS;
        c.gc.settle_secs = 6;
    })
    .await
}

async fn stored(hub: &TestHub) -> anyhow::Result<BTreeSet<Sha256Hex>> {
    Ok(hub.state().blobs.list().await?.into_iter().collect())
}

async fn version_numbers(hub: &TestHub) -> anyhow::Result<Vec<u64>> {
    let versions = hub.state().store.versions(DEFAULT_SPACE, 100).await?;
    Ok(versions.iter().map(|v| v.head.version).collect())
}

/// Commits `files` on `base`, expecting a new version.
async fn new_version(
    hub: &TestHub,
    token: &str,
    base: u64,
    files: &[(&str, &[u8])],
    deletes: &[&str],
) -> anyhow::Result<()> {
    let (status, body) = commit(hub, token, base, files, deletes).await?;
    anyhow::ensure!(
        status == StatusCode::CREATED,
        "commit on {base}: {status} {body}"
    );
    Ok(())
}

/// A commit naming an already stored blob without uploading it (what an agent does after
/// `missing` said the hub has it).
async fn commit_existing(
    hub: &TestHub,
    token: &str,
    base: u64,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(StatusCode, serde_json::Value)> {
    let request = CommitRequest {
        base_version: base,
        puts: vec![ManifestEntry {
            path: path.to_owned(),
            size: body.len() as u64,
            sha256: Sha256Hex::of(body),
        }],
        deletes: Vec::new(),
        message: None,
    };
    let r = http()
        .post(hub.api(&format!("/spaces/{DEFAULT_SPACE}/commits")))
        .bearer_auth(token)
        .json(&request)
        .send()
        .await?;
    let status = r.status();
    Ok((status, r.json().await.unwrap_or_default()))
}

async fn blob_bytes(hub: &TestHub, token: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let r = http()
        .get(hub.api(&format!("/blobs/{}", Sha256Hex::of(body))))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?;
    Ok(r.bytes().await?.to_vec())
}

async fn gc_frees_exactly_the_blobs_of_expired_versions(stack: Stack) -> anyhow::Result<()> {
    let hub = start(stack).await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    // v1 is the empty space; v2..v4 change a.txt and keep b.txt.
    new_version(&hub, &pc, 1, &[("a.txt", b"a one"), ("b.txt", b"b")], &[]).await?;
    let v2_manifest = hub.state().store.version(DEFAULT_SPACE, 2).await?.unwrap();
    new_version(&hub, &pc, 2, &[("a.txt", b"a two")], &[]).await?;
    new_version(&hub, &pc, 3, &[("a.txt", b"a three")], &[]).await?;
    tokio::time::sleep(Duration::from_secs(GRACE_SECS + 1)).await;
    // An upload whose commit has not come yet: younger than the grace period.
    put_blob(&hub, &pc, b"uploaded, not committed yet").await?;
    let before = stored(&hub).await?;

    let dry = collect(
        hub.state(),
        &GcOptions {
            dry_run: true,
            space: None,
        },
    )
    .await?;
    assert_eq!(dry.expired_versions[DEFAULT_SPACE], vec![2, 1]);
    assert_eq!(stored(&hub).await?, before, "a dry run deletes no blob");
    assert_eq!(version_numbers(&hub).await?, vec![4, 3, 2, 1]);

    let report = collect(hub.state(), &GcOptions::default()).await?;
    let after = stored(&hub).await?;
    let freed: BTreeSet<_> = before.difference(&after).cloned().collect();
    // v2's manifest and "a one" are named only by v2; v1's empty manifest only by v1.
    let mut expected: BTreeSet<_> = [v2_manifest.data_hash, Sha256Hex::of(b"a one")].into();
    if before.contains(&Sha256Hex::empty()) {
        expected.insert(Sha256Hex::empty());
    }
    assert_eq!(
        freed, expected,
        "exactly the blobs only expired versions named"
    );
    assert_eq!(report.blobs_freed, expected.len() as u64);
    assert_eq!(
        (dry.blobs_freed, dry.bytes_freed),
        (report.blobs_freed, report.bytes_freed),
        "the dry run counted what the collection freed"
    );
    assert_eq!(report.young_unreferenced, 1, "the fresh upload is kept");
    assert!(after.contains(&Sha256Hex::of(b"uploaded, not committed yet")));
    assert_eq!(version_numbers(&hub).await?, vec![4, 3]);
    // The head's files are all still served.
    assert_eq!(blob_bytes(&hub, &pc, b"a three").await?, b"a three");
    assert_eq!(blob_bytes(&hub, &pc, b"b").await?, b"b");

    // The first collection's wait outlasted the grace period: a second one frees the upload
    // no commit came for, and nothing else.
    let again = collect(hub.state(), &GcOptions::default()).await?;
    assert_eq!((again.blobs_freed, again.expired_versions.len()), (1, 0));
    let last = stored(&hub).await?;
    let gone: Vec<_> = after.difference(&last).cloned().collect();
    assert_eq!(gone, vec![Sha256Hex::of(b"uploaded, not committed yet")]);
    assert_eq!(blob_bytes(&hub, &pc, b"a three").await?, b"a three");
    hub.stop().await;
    Ok(())
}

async fn a_commit_in_flight_stays_intact(stack: Stack) -> anyhow::Result<()> {
    let hub = start(stack).await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    new_version(
        &hub,
        &pc,
        1,
        &[("x.txt", b"x body"), ("w.txt", b"w body")],
        &[],
    )
    .await?;
    new_version(&hub, &pc, 2, &[("y.txt", b"y one")], &["x.txt", "w.txt"]).await?;
    new_version(&hub, &pc, 3, &[("y.txt", b"y two")], &[]).await?;
    tokio::time::sleep(Duration::from_secs(GRACE_SECS + 1)).await;

    // The sweep dooms "x body" and "w body" (only the expired v2 names them), then waits.
    let sweep = {
        let state = hub.state().clone();
        tokio::spawn(async move { collect(&state, &GcOptions::default()).await })
    };
    let x = Sha256Hex::of(b"x body");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !hub
        .state()
        .store
        .doomed_blobs()
        .await?
        .iter()
        .any(|d| d.hash == x)
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "x body never doomed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An agent that was told the hub has "x body" commits it as a new file meanwhile.
    let (status, body) = commit_existing(&hub, &pc, 4, "z.txt", b"x body").await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // While the sweep still waits: the commit took its blob off the doomed list (so the sweep
    // cannot delete it even if its second mark misses the new version); the other stays.
    let doomed: Vec<_> = hub.state().store.doomed_blobs().await?;
    assert!(!sweep.is_finished(), "the sweep is still waiting");
    assert!(
        !doomed.iter().any(|d| d.hash == x),
        "x body is still doomed"
    );
    assert!(doomed.iter().any(|d| d.hash == Sha256Hex::of(b"w body")));

    let report = sweep.await??;
    assert!(report.spared >= 1, "{report:?}");
    let after = stored(&hub).await?;
    assert!(after.contains(&x), "the blob the commit named survived");
    assert!(
        !after.contains(&Sha256Hex::of(b"w body")),
        "the other doomed blob went"
    );
    assert_eq!(blob_bytes(&hub, &pc, b"x body").await?, b"x body");
    assert!(hub.state().store.doomed_blobs().await?.is_empty());
    hub.stop().await;
    Ok(())
}

async fn a_commit_naming_a_blob_being_deleted_is_refused(stack: Stack) -> anyhow::Result<()> {
    let hub = start(stack).await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let hash = put_blob(&hub, &pc, b"about to go").await?;
    let store = &hub.state().store;
    store.doom_blobs(std::slice::from_ref(&hash), 0).await?;
    assert!(store.start_deleting(&hash, 0).await?);
    let (status, body) = commit_existing(&hub, &pc, 1, "late.txt", b"about to go").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], codes::MISSING_BLOBS, "{body}");
    assert_eq!(version_numbers(&hub).await?, vec![1], "no version was made");
    hub.stop().await;
    Ok(())
}

/// `synchub import` of a bucket folder holding `keys` (under `in/`) into `imported/`.
async fn import(
    hub: &TestHub,
    bucket: &str,
    keys: &[(&str, &[u8])],
) -> Result<synchub_protocol::Head, synchub_hub::sources::SourceError> {
    let server = tokio::task::spawn_blocking(synchub_tests::s3::moto_server)
        .await
        .expect("moto start")
        .expect("moto server (pip install 'moto[server]')");
    for (key, body) in keys {
        synchub_tests::s3::put_object(bucket, &format!("in/{key}"), body)
            .await
            .expect("put object");
    }
    let source = server.bucket_source(bucket, "in", "imported/", 60);
    synchub_hub::sources::import(hub.state(), &source).await
}

async fn an_import_spares_the_blobs_it_names(stack: Stack) -> anyhow::Result<()> {
    let hub = start(stack).await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let store = &hub.state().store;
    let bucket = synchub_tests::s3::test_bucket().await?.bucket;
    // An old upload no version names, put on the doomed list by a collection under way; then
    // a bucket file with the same bytes is imported.
    let hash = put_blob(&hub, &pc, b"same bytes").await?;
    store.doom_blobs(std::slice::from_ref(&hash), 0).await?;
    let head = import(&hub, &bucket, &[("a.txt", b"same bytes")]).await?;
    assert!(head.version >= 1);
    assert!(
        !store.doomed_blobs().await?.iter().any(|d| d.hash == hash),
        "the blob the import named is still doomed"
    );
    assert!(
        !store.start_deleting(&hash, i64::MAX).await?,
        "the sweep could still delete it"
    );
    assert_eq!(blob_bytes(&hub, &pc, b"same bytes").await?, b"same bytes");

    // A blob the sweep is deleting already: the import is refused and makes no version.
    let gone = put_blob(&hub, &pc, b"being deleted").await?;
    store.doom_blobs(std::slice::from_ref(&gone), 0).await?;
    assert!(store.start_deleting(&gone, 0).await?);
    let err = import(&hub, &bucket, &[("b.txt", b"being deleted")])
        .await
        .expect_err("an import naming a blob being deleted");
    assert!(err.to_string().contains("garbage collector"), "{err}");
    assert_eq!(
        version_numbers(&hub).await?.first().copied(),
        Some(head.version),
        "no version was made"
    );
    hub.stop().await;
    Ok(())
}

/// A `[[bucket_source]]` (sources run on PostgreSQL only) spares the blobs its versions name,
/// like a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_source_spares_the_blobs_it_names() -> anyhow::Result<()> {
    let database_url = synchub_tests::postgres::test_database().await?;
    let bucket = synchub_tests::s3::test_bucket().await?.bucket;
    let server = tokio::task::spawn_blocking(synchub_tests::s3::moto_server).await??;
    let source = server.bucket_source(&bucket, "in", "imported/", 1);
    let hub = TestHub::start_with(|c| {
        c.database_url = Some(database_url);
        c.bucket_source = vec![source];
        c.gc.every_secs = 0;
    })
    .await?;
    let pc = hub.token("pc", Role::Agent, None).await?;
    let store = &hub.state().store;
    let hash = put_blob(&hub, &pc, b"same bytes").await?;
    store.doom_blobs(std::slice::from_ref(&hash), 0).await?;
    synchub_tests::s3::put_object(&bucket, "in/a.txt", b"same bytes").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(head) = store.head(DEFAULT_SPACE).await?
            && head.version > 0
            && hub
                .state()
                .manifest(&head.data_hash)
                .await?
                .get("imported/a.txt")
                .is_some()
        {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the bucket source never recorded imported/a.txt"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !store.doomed_blobs().await?.iter().any(|d| d.hash == hash),
        "the blob the source named is still doomed"
    );
    assert!(!store.start_deleting(&hash, i64::MAX).await?);
    hub.stop().await;
    Ok(())
}

/// A report of the default space written `days_ago` days ago.
fn report(id: &str, days_ago: i64) -> SyncReport {
    SyncReport {
        report_id: id.to_owned(),
        client_id: "pc".to_owned(),
        space: DEFAULT_SPACE.to_owned(),
        sync_type: SyncType::Download,
        status: SyncStatus::Success,
        version: Some(1),
        items_synced: 1,
        items_total: Some(1),
        bytes: 1,
        duration_ms: 1,
        error_message: None,
        user: None,
        synced_at: Some(
            (chrono::Utc::now() - chrono::Duration::days(days_ago))
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
    }
}

async fn sync_log_keeps_only_recent_rows_up_to_the_cap(stack: Stack) -> anyhow::Result<()> {
    let hub = start(stack).await?;
    let store = &hub.state().store;
    // sync_log_days = 90, sync_log_rows = 3 (below): two rows too old, then six recent ones.
    for (id, days) in [("old-1", 200), ("old-2", 91), ("a", 5), ("b", 4), ("c", 3)] {
        store.insert_report(&report(id, days)).await?;
    }
    for (id, days) in [("d", 2), ("e", 1), ("f", 0)] {
        store.insert_report(&report(id, days)).await?;
    }
    let mut state_config = hub.state().config.clone();
    state_config.retention.sync_log_rows = 3;
    let domain = synchub_hub::domain::Domain::new(
        state_config,
        hub.state().store.clone(),
        hub.state().blobs.clone(),
    );
    let dry = collect(
        &domain,
        &GcOptions {
            dry_run: true,
            space: None,
        },
    )
    .await?;
    assert_eq!(dry.sync_log_rows_deleted, None);
    assert_eq!(
        store.sync_log(&log_filter()).await?.len(),
        8,
        "a dry run deletes no row"
    );
    let report = collect(&domain, &GcOptions::default()).await?;
    let left: Vec<_> = store
        .sync_log(&log_filter())
        .await?
        .into_iter()
        .filter_map(|e| e.report_id)
        .collect();
    assert_eq!(left, vec!["f", "e", "d"], "the newest 3 rows, newest first");
    assert_eq!(report.sync_log_rows_deleted, Some(5));
    hub.stop().await;
    Ok(())
}

fn log_filter() -> SyncLogFilter {
    SyncLogFilter {
        limit: 100,
        ..SyncLogFilter::default()
    }
}

backend_matrix!(
    [sqlite_fs => Stack::SqliteFs, postgres_s3 => Stack::PostgresS3]
    sync_log_keeps_only_recent_rows_up_to_the_cap,
    gc_frees_exactly_the_blobs_of_expired_versions,
    a_commit_in_flight_stays_intact,
    a_commit_naming_a_blob_being_deleted_is_refused,
    an_import_spares_the_blobs_it_names,
);
