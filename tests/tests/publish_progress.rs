//! A publish reports its upload's progress (what `synchub-agent publish` draws as a bar on a
//! terminal, or prints as plain lines): first nothing done of the bytes to upload, then after
//! each file more, ending at all of them; only what the hub lacks counts.

use anyhow::ensure;
use std::sync::{Arc, Mutex};
use synchub_client::{HubApi, PublishOptions, UploadProgress, publish_with};
use synchub_protocol::{DEFAULT_SPACE, Role};
use synchub_tests::hub::TestHub;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reports_its_upload_progress() -> anyhow::Result<()> {
    let hub = TestHub::start().await?;
    let token = hub.token("secretariat", Role::Agent, None).await?;
    let api = HubApi::new(vec![hub.url.clone()], &token)?;
    let src = tempfile::tempdir()?;
    let sizes = [300_000usize, 700_000, 1_000_000];
    for (i, size) in sizes.iter().enumerate() {
        std::fs::write(
            src.path().join(format!("f{i}.bin")),
            vec![i as u8 + 1; *size],
        )?;
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let options = PublishOptions {
        progress: Some(UploadProgress(Arc::new(move |done, total| {
            record.lock().expect("lock").push((done, total));
        }))),
        ..PublishOptions::default()
    };
    let outcome = publish_with(&api, DEFAULT_SPACE, &[src.path().to_path_buf()], &options).await?;
    let calls = seen.lock().expect("lock").clone();
    let total: u64 = sizes.iter().map(|s| *s as u64).sum();
    ensure!(outcome.bytes_uploaded == total, "{outcome:?}");
    ensure!(calls.first() == Some(&(0, total)), "{calls:?}");
    ensure!(calls.last() == Some(&(total, total)), "{calls:?}");
    ensure!(
        calls.len() == sizes.len() + 1,
        "one call per file: {calls:?}"
    );
    ensure!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{calls:?}");

    // One file changed: only its bytes are to upload.
    std::fs::write(src.path().join("f0.bin"), vec![9u8; 300_000])?;
    seen.lock().expect("lock").clear();
    publish_with(&api, DEFAULT_SPACE, &[src.path().to_path_buf()], &options).await?;
    let calls = seen.lock().expect("lock").clone();
    ensure!(calls == [(0, 300_000), (300_000, 300_000)], "{calls:?}");
    hub.stop().await;
    Ok(())
}
