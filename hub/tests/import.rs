//! `synchub import s3://bucket/prefix --space S --into arhiva/` as an admin runs it: the real
//! binary against a moto bucket holding the old app's archives, then a hub on the same folder
//! serving them; a second run changes nothing; missing keys are a clear error.

use std::process::Command;
use synchub_protocol::{DEFAULT_SPACE, Manifest, Role, Sha256Hex};
use synchub_tests::fixtures::http;
use synchub_tests::hub::TestHub;
use synchub_tests::s3::{moto_server, put_object, test_bucket};

fn import(dir: &std::path::Path, bucket: &str, keys: bool) -> (bool, String, String) {
    let endpoint = moto_server().expect("moto").endpoint();
    let mut c = Command::new(env!("CARGO_BIN_EXE_synchub"));
    c.env_remove("SYNCHUB_CONFIG")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .arg("--data-dir")
        .arg(dir)
        .args(["import", &format!("s3://{bucket}/arhiva"), "--space"])
        .args([DEFAULT_SPACE, "--into", "arhiva/", "--endpoint", &endpoint])
        .arg("--allow-http");
    if keys {
        c.env("SYNCHUB_BUCKET_ACCESS_KEY_ID", "testing")
            .env("SYNCHUB_BUCKET_SECRET_ACCESS_KEY", "testing");
    } else {
        c.env_remove("SYNCHUB_BUCKET_ACCESS_KEY_ID")
            .env_remove("SYNCHUB_BUCKET_SECRET_ACCESS_KEY");
    }
    let out = c.output().expect("run synchub import");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_copies_a_bucket_folder_into_a_space() -> anyhow::Result<()> {
    let bucket = test_bucket().await?.bucket;
    let files = [
        ("arhiva/Cluj/Liceul_1_2026-01-05_10-00-00.json", "{\"a\":1}"),
        ("arhiva/Iași/Liceul_2_2026-01-05_09-00-00.json", "{\"b\":2}"),
    ];
    for (key, body) in files {
        put_object(&bucket, key, body.as_bytes()).await?;
    }
    put_object(&bucket, "other/not-imported.json", b"{}").await?;
    let dir = tempfile::tempdir()?;

    // Like `token` and `force-sync`, import works on an existing hub only.
    let (ok, _, err) = tokio::task::block_in_place(|| import(dir.path(), &bucket, true));
    assert!(!ok);
    assert!(err.contains("synchub init"), "{err}");
    let init = Command::new(env!("CARGO_BIN_EXE_synchub"))
        .env_remove("SYNCHUB_CONFIG")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("init")
        .output()?;
    assert!(init.status.success(), "{init:?}");

    let (ok, _, err) = tokio::task::block_in_place(|| import(dir.path(), &bucket, false));
    assert!(!ok);
    assert!(err.contains("SYNCHUB_BUCKET_ACCESS_KEY_ID"), "{err}");

    let (ok, out, err) = tokio::task::block_in_place(|| import(dir.path(), &bucket, true));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "global_version is now at version 2");
    let (ok, out, err) = tokio::task::block_in_place(|| import(dir.path(), &bucket, true));
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "global_version is now at version 2",
        "nothing new"
    );

    let mut config = synchub_hub::config::Config::for_data_dir(dir.path());
    config.listen = "127.0.0.1:0".parse()?;
    let hub = TestHub::start_config(config).await?;
    let token = hub.token("pc", Role::Agent, None).await?;
    let bytes = http()
        .get(hub.api(&format!("/spaces/{DEFAULT_SPACE}/versions/2/manifest")))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let manifest = Manifest::from_canonical(&bytes, 100)?;
    let got: Vec<_> = manifest
        .entries()
        .iter()
        .map(|e| (e.path.as_str(), e.sha256.clone()))
        .collect();
    let mut want: Vec<_> = files
        .iter()
        .map(|(k, b)| (*k, Sha256Hex::of(b.as_bytes())))
        .collect();
    want.sort();
    assert_eq!(got, want);
    hub.stop().await;
    Ok(())
}
