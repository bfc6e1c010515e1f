//! Commits whose paths are one file on Windows or macOS (case, Unicode normalization, a file
//! against a folder) are refused with the stable code `path_collision`, on both backends, and
//! the version is not created.

use reqwest::StatusCode;
use synchub_protocol::{ApiError, DEFAULT_SPACE, Head, Role, codes};
use synchub_tests::backend_matrix;
use synchub_tests::fixtures::{commit, http};
use synchub_tests::hub::{Backend, TestHub};

async fn head_version(hub: &TestHub, token: &str) -> anyhow::Result<u64> {
    let head: Head = http()
        .get(hub.api(&format!("/spaces/{DEFAULT_SPACE}/head")))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(head.version)
}

/// Files of one commit: path and body.
type Puts<'a> = &'a [(&'a str, &'a [u8])];

async fn colliding_commits_are_refused(backend: Backend) -> anyhow::Result<()> {
    let hub = TestHub::start_backend(backend).await?;
    let agent = hub.token("pc", Role::Agent, None).await?;
    let (s, body) = commit(
        &hub,
        &agent,
        1,
        &[("img/A.png", b"upper"), ("Școala/x", b"1")],
        &[],
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    let nfd_school = "S\u{326}coala/y"; // the NFD spelling of the folder held as NFC
    let cases: [(&str, Puts<'_>); 4] = [
        (
            "case, in one commit",
            &[("doc/R.txt", b"1"), ("doc/r.txt", b"2")],
        ),
        ("case, against the head", &[("img/a.png", b"lower")]),
        ("normalization of a folder", &[(nfd_school, b"2")]),
        ("file against a folder", &[("IMG", b"file")]),
    ];
    for (what, puts) in cases {
        let (s, body) = commit(&hub, &agent, 2, puts, &[]).await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {body}");
        let e: ApiError = serde_json::from_value(body)?;
        assert_eq!(e.code, codes::PATH_COLLISION, "{what}");
        assert_eq!(
            head_version(&hub, &agent).await?,
            2,
            "{what}: no version made"
        );
    }
    // Replacing the file under the same spelling, or deleting the old spelling while adding the
    // new one, is fine.
    let (s, body) = commit(&hub, &agent, 2, &[("img/a.png", b"lower")], &["img/A.png"]).await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    hub.stop().await;
    Ok(())
}

backend_matrix!(
    [sqlite => Backend::Sqlite, postgres => Backend::Postgres]
    colliding_commits_are_refused
);
