//! A hub's in-memory heads and tokens follow the database whatever happens to the
//! notifications: a lost NOTIFY is healed by the periodic re-read, a restored database (an older
//! head) replaces the newer one in a new epoch, a replica behind the balancer re-reads the store
//! for a commit based on a head it has not heard of, and a token revoked or changed before its
//! socket's `hello` cannot keep the socket.
//!
//! Every hub is a real in-process hub on real PostgreSQL (started by the harness); the lost
//! notification is made real by turning the `sync_metadata` trigger off.

use anyhow::{Context, ensure};
use reqwest::StatusCode;
use sqlx::Connection;
use std::path::Path;
use std::time::{Duration, Instant};
use synchub_hub::config::BlobStoreConfig;
use synchub_protocol::{
    AgentFrame, DEFAULT_SPACE, Head, HeldSpace, HubFrame, PROTOCOL_VERSION, Role,
};
use synchub_tests::fixtures::{commit, http};
use synchub_tests::hub::{TestHub, WsAgent, ws_connect};
use synchub_tests::postgres::test_database;

const WAIT: Duration = Duration::from_secs(10);

async fn sql(url: &str, statements: &[&str]) -> anyhow::Result<()> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    for s in statements {
        sqlx::query(s)
            .execute(&mut c)
            .await
            .with_context(|| format!("running {s}"))?;
    }
    c.close().await?;
    Ok(())
}

/// A hub on the PostgreSQL database `url` (blobs in `blobs`, shared by replicas), re-reading
/// every head each `reread_ms`.
async fn hub_on(url: &str, blobs: &Path, reread_ms: u64) -> anyhow::Result<TestHub> {
    TestHub::start_with(|c| {
        c.database_url = Some(url.to_owned());
        c.blob_store = BlobStoreConfig::Fs {
            path: Some(blobs.to_path_buf()),
        };
        c.reread_interval_ms = reread_ms;
        c.ping_interval_ms = 60_000;
    })
    .await
}

async fn commit_ok(hub: &TestHub, token: &str, base: u64, name: &str) -> anyhow::Result<Head> {
    let (status, body) = commit(hub, token, base, &[(name, name.as_bytes())], &[]).await?;
    ensure!(
        status == StatusCode::CREATED,
        "commit on v{base}: {status} {body}"
    );
    Ok(serde_json::from_value(body["head"].clone())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_is_healed_by_the_periodic_reread() -> anyhow::Result<()> {
    let url = test_database().await?;
    let blobs = tempfile::tempdir()?;
    let hub = hub_on(&url, blobs.path(), 1000).await?;
    let mut agent = WsAgent::connect(&hub, &hub.admin_token, &[DEFAULT_SPACE]).await?;
    let v1 = agent.welcome_heads[0].version;
    // The bump's NOTIFY never happens: only a re-read can find it.
    sql(
        &url,
        &[
            "ALTER TABLE sync_metadata DISABLE TRIGGER synchub_notify_head",
            "UPDATE sync_metadata SET version = version + 1 WHERE sync_key = 'global_version'",
        ],
    )
    .await?;
    let bumped = Instant::now();
    let head = agent
        .next_sync_required(Duration::from_secs(5))
        .await
        .context("a bump whose notification was lost must still arrive")?;
    assert_eq!(head.version, v1 + 1);
    eprintln!("a bump without NOTIFY arrived in {:?}", bumped.elapsed());
    let ready = http().get(format!("{}/readyz", hub.url)).send().await?;
    assert_eq!(ready.status(), StatusCode::OK);
    let body = ready.text().await?;
    assert!(body.contains("heads last read"), "{body}");
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_database_replaces_the_newer_head_in_a_new_epoch() -> anyhow::Result<()> {
    let url = test_database().await?;
    let blobs = tempfile::tempdir()?;
    let hub = hub_on(&url, blobs.path(), 1000).await?;
    let token = hub.admin_token.clone();
    let v2 = commit_ok(&hub, &token, 1, "a.txt").await?;
    let v3 = commit_ok(&hub, &token, v2.version, "b.txt").await?;
    let mut agent = WsAgent::connect(&hub, &token, &[DEFAULT_SPACE]).await?;
    assert_eq!(agent.welcome_heads[0].version, v3.version);
    // What a restore of a backup taken at v2 looks like to the hub.
    sql(
        &url,
        &[
            &format!(
                "DELETE FROM synchub_versions WHERE space = 'global_version' AND version > {}",
                v2.version
            ),
            &format!(
                "UPDATE sync_metadata SET version = {}, data_hash = '{}' WHERE sync_key = 'global_version'",
                v2.version, v2.data_hash
            ),
        ],
    )
    .await?;
    let head = agent
        .next_sync_required(WAIT)
        .await
        .context("agents must be told of the restored head")?;
    assert_eq!((head.version, &head.data_hash), (v2.version, &v2.data_hash));
    assert!(
        head.epoch > v3.epoch,
        "a rewrite starts a new epoch: {head:?}"
    );
    // Commits work on the restored history (they got 503 until a restart).
    let v3b = commit_ok(&hub, &token, v2.version, "c.txt").await?;
    assert_eq!(v3b.version, v2.version + 1);
    assert_eq!(v3b.epoch, head.epoch);
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_a_replica_that_missed_the_newest_head_rereads_the_store() -> anyhow::Result<()>
{
    let url = test_database().await?;
    let blobs = tempfile::tempdir()?;
    // No timer re-read during the test: only the commit path can find the new head.
    let a = hub_on(&url, blobs.path(), 600_000).await?;
    let b = hub_on(&url, blobs.path(), 600_000).await?;
    sql(
        &url,
        &["ALTER TABLE sync_metadata DISABLE TRIGGER synchub_notify_head"],
    )
    .await?;
    let v2 = commit_ok(&a, &a.admin_token, 1, "on-a.txt").await?;
    assert_eq!(b.state().heads.get(DEFAULT_SPACE).unwrap().head.version, 1);
    // The publisher read v2 on A; its commit lands on B.
    let v3 = commit_ok(&b, &b.admin_token, v2.version, "on-b.txt").await?;
    assert_eq!(v3.version, v2.version + 1);
    a.stop().await;
    b.stop().await;
    Ok(())
}

/// Opens a socket (upgrade done), lets `between` run, then says hello; returns what came back.
async fn hello_after(
    hub: &TestHub,
    token: &str,
    between: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<HubFrame> {
    let socket = ws_connect(&hub.ws_url(), Some(token)).await?;
    between.await?;
    let mut agent = WsAgent {
        socket,
        welcome_heads: Vec::new(),
    };
    let hello = AgentFrame::Hello {
        protocol: PROTOCOL_VERSION,
        client_id: "late-hello".into(),
        spaces: vec![HeldSpace {
            space: DEFAULT_SPACE.into(),
            version: 0,
            data_hash: None,
        }],
        agent_version: None,
        hostname: None,
    };
    agent.send_text(serde_json::to_string(&hello)?).await?;
    agent.next_frame(WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_before_hello_gets_no_welcome() -> anyhow::Result<()> {
    let url = test_database().await?;
    let blobs = tempfile::tempdir()?;
    let hub = hub_on(&url, blobs.path(), 600_000).await?;
    let token = hub.token("pc-1", Role::Agent, None).await?;
    let state = hub.state().clone();
    let reply = hello_after(&hub, &token, async {
        state.store.revoke_token("pc-1").await?;
        state.tokens.reload(state.store.as_ref()).await?;
        Ok(())
    })
    .await?;
    assert!(
        matches!(&reply, HubFrame::Error { code, .. } if code == "unauthorized"),
        "a revoked token's socket must be refused, got {reply:?}"
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_rights_change_loses_its_sockets() -> anyhow::Result<()> {
    let url = test_database().await?;
    let blobs = tempfile::tempdir()?;
    let hub = hub_on(&url, blobs.path(), 600_000).await?;
    let token = hub.token("pc-2", Role::Admin, None).await?;
    let mut agent = WsAgent::connect(&hub, &token, &[DEFAULT_SPACE]).await?;
    // Demoted to an agent of another space, by SQL as an operator would.
    sql(
        &url,
        &["UPDATE synchub_tokens SET role = 'agent', spaces = '[\"other\"]' WHERE name = 'pc-2'"],
    )
    .await?;
    let (close, _) = agent
        .until_closed(WAIT)
        .await
        .context("a socket admitted under the old rights must close")?;
    ensure!(close.is_some(), "closed without a close frame");
    hub.stop().await;
    Ok(())
}
