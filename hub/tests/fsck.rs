//! `synchub fsck` as an admin runs it, on a filesystem blob store and on S3 (moto): a hub
//! makes versions, then a file's blob and a manifest go bad behind its back; fsck names both
//! blobs and every version they hurt, moves them aside (never deletes them), and a second run
//! finds nothing left to move.

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::Value;
use std::process::Command;
use synchub_hub::config::{BlobStoreConfig, Config};
use synchub_protocol::{Head, Role, Sha256Hex};
use synchub_tests::fixtures::{commit, http};
use synchub_tests::hub::{TestHub, fs_blob_path};
use synchub_tests::s3::{get_object, put_object, test_bucket};

/// Runs `synchub --config FILE fsck ARGS --json`; success and the JSON report.
fn fsck(config: &Config, args: &[&str]) -> anyhow::Result<(bool, Value)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("hub.toml");
    std::fs::write(&file, toml::to_string(config)?)?;
    let out = Command::new(env!("CARGO_BIN_EXE_synchub"))
        .env_remove("SYNCHUB_CONFIG")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .arg("--config")
        .arg(&file)
        .arg("fsck")
        .args(args)
        .arg("--json")
        .output()?;
    let report = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "fsck printed no JSON report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.success(), report))
}

/// Two versions on `hub`: v2 with a.txt and b.txt, v3 adding c.txt. Returns v2's and v3's
/// heads and a.txt's blob.
async fn two_versions(hub: &TestHub) -> anyhow::Result<(Head, Head, Sha256Hex)> {
    let pc = hub.token("pc", Role::Agent, None).await?;
    let head = |v: u64| {
        let pc = pc.clone();
        async move {
            let r = http()
                .get(hub.api(&format!("/spaces/{}/head", synchub_protocol::DEFAULT_SPACE)))
                .bearer_auth(&pc)
                .send()
                .await?;
            anyhow::ensure!(r.status() == StatusCode::OK);
            let h: Head = r.json().await?;
            anyhow::ensure!(h.version == v, "at version {}", h.version);
            Ok(h)
        }
    };
    let (s, b) = commit(hub, &pc, 1, &[("a.txt", b"aaaa"), ("b.txt", b"bbbb")], &[]).await?;
    anyhow::ensure!(s == StatusCode::CREATED, "{b}");
    let v2 = head(2).await?;
    let (s, b) = commit(hub, &pc, 2, &[("c.txt", b"cccc")], &[]).await?;
    anyhow::ensure!(s == StatusCode::CREATED, "{b}");
    let v3 = head(3).await?;
    Ok((v2, v3, Sha256Hex::of(b"aaaa")))
}

fn names(report: &Value, key: &str, field: &str) -> Vec<String> {
    report[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x[field].to_string().trim_matches('"').to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What both backends must show after a.txt's blob and v3's manifest went bad.
fn check_reports(
    first: (bool, Value),
    second: (bool, Value),
    v3: &Head,
    a: &Sha256Hex,
) -> anyhow::Result<Vec<String>> {
    let (ok, report) = first;
    assert!(!ok, "fsck must fail when something is wrong: {report}");
    let mut corrupt = names(&report, "corrupt", "sha256");
    corrupt.sort();
    let mut want = vec![a.to_string(), v3.data_hash.to_string()];
    want.sort();
    assert_eq!(corrupt, want, "{report}");
    let damaged: Vec<String> = report["damaged_versions"]
        .as_array()
        .context("damaged_versions")?
        .iter()
        .map(|d| format!("{}", d["version"]))
        .collect();
    // v2 and v3 both name a.txt; v3's manifest is corrupt too.
    assert_eq!(damaged, vec!["3", "2"], "{report}");
    let moved = names(&report, "corrupt", "quarantined_to");
    assert!(moved.iter().all(|m| m.contains("quarantine/")), "{report}");

    let (ok, report) = second;
    assert!(!ok, "the damaged versions are still reported: {report}");
    assert_eq!(names(&report, "corrupt", "sha256"), Vec::<String>::new());
    assert_eq!(report["damaged_versions"].as_array().map(Vec::len), Some(2));
    Ok(moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_finds_and_moves_aside_corrupt_blobs_on_fs() -> anyhow::Result<()> {
    let mut hub = TestHub::start().await?;
    let (_, v3, a) = two_versions(&hub).await?;
    hub.stop_keep().await;
    let (ok, clean) = tokio::task::block_in_place(|| fsck(&hub.config, &["--dry-run"]))?;
    assert!(ok, "{clean}");
    assert_eq!(
        clean["blobs_checked"], 6,
        "empty, a, b, c, 2 manifests: {clean}"
    );

    for hash in [&a, &v3.data_hash] {
        let path = fs_blob_path(hub.data_dir(), hash.as_str());
        let mut bytes = std::fs::read(&path)?;
        bytes[0] ^= 0x20;
        std::fs::write(&path, bytes)?;
    }
    let dry = tokio::task::block_in_place(|| fsck(&hub.config, &["--dry-run"]))?;
    assert!(!dry.0 && names(&dry.1, "corrupt", "quarantined_to") == ["null", "null"]);
    assert!(
        fs_blob_path(hub.data_dir(), a.as_str()).exists(),
        "dry run moves nothing"
    );

    let first = tokio::task::block_in_place(|| fsck(&hub.config, &[]))?;
    let second = tokio::task::block_in_place(|| fsck(&hub.config, &[]))?;
    let moved = check_reports(first, second, &v3, &a)?;
    assert!(!fs_blob_path(hub.data_dir(), a.as_str()).exists());
    for m in moved {
        assert!(std::path::Path::new(&m).is_file(), "{m} kept");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_finds_and_moves_aside_corrupt_blobs_on_s3() -> anyhow::Result<()> {
    let s3 = test_bucket().await?;
    let bucket = s3.bucket.clone();
    let mut hub = TestHub::start_with(|c| c.blob_store = BlobStoreConfig::S3(s3)).await?;
    let (_, v3, a) = two_versions(&hub).await?;
    hub.stop_keep().await;
    for hash in [&a, &v3.data_hash] {
        put_object(&bucket, &format!("blobs/{hash}"), b"not what was stored").await?;
    }
    let first = tokio::task::block_in_place(|| fsck(&hub.config, &[]))?;
    let second = tokio::task::block_in_place(|| fsck(&hub.config, &[]))?;
    let moved = check_reports(first, second, &v3, &a)?;
    // The moved objects are still in the bucket; the originals are gone from the blob folder.
    for key in moved {
        let kept = get_object(&bucket, &key).await?;
        assert_eq!(kept.as_deref(), Some(&b"not what was stored"[..]), "{key}");
    }
    assert_eq!(get_object(&bucket, &format!("blobs/{a}")).await?, None);
    Ok(())
}
