//! TLS in the hub, end to end with a private CA made in the test: a hub with `tls_cert` and
//! `tls_key` serves `https://` and `wss://`; an agent given `ca_cert` gets a publish pushed over
//! `wss://` and applies it over `https://`; plain HTTP and clients without the CA are refused;
//! a SIGHUP makes the hub present a renewed certificate without a restart.

use anyhow::{Context, ensure};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use synchub_client::{DEFAULT_READ_TIMEOUT, HubApi, tls_config};
use synchub_client::{SyncClient, publish};
use synchub_protocol::{ClientInfo, DEFAULT_SPACE, Role};
use synchub_tests::fixtures::{agent_config, http, read_tree, wait_ready};
use synchub_tests::hub::TestHub;

/// A CA (its certificate written to `dir/NAME-ca.pem`) and a server certificate for
/// `localhost` and 127.0.0.1 signed by it (`dir/NAME-cert.pem`, `dir/NAME-key.pem`).
fn make_ca_and_server_cert(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("synchub test CA {name}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert = params.signed_by(&key, &ca)?;
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// An HTTP client trusting the CA in `ca`.
fn client_trusting(ca: &Path) -> anyhow::Result<reqwest::Client> {
    let tls = tls_config(Some(ca))?.context("a TLS config")?;
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(tls.as_ref().clone())
        .build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_with_a_private_ca_and_reload_on_sighup() -> anyhow::Result<()> {
    synchub_client::install_crypto_provider();
    let certs = tempfile::tempdir()?;
    let (ca1, cert1, key1) = make_ca_and_server_cert(certs.path(), "one")?;
    let (cert_path, key_path) = (certs.path().join("hub.pem"), certs.path().join("hub.key"));
    std::fs::copy(&cert1, &cert_path)?;
    std::fs::copy(&key1, &key_path)?;
    let hub = TestHub::start_with(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await?;
    ensure!(hub.url.starts_with("https://"), "{}", hub.url);

    // An agent trusting the private CA follows the space over wss:// and https://.
    let pc = hub.token("pc", Role::Agent, None).await?;
    let data = tempfile::tempdir()?;
    let mut config = agent_config(&hub, &pc, data.path());
    config.ca_cert = Some(ca1.clone());
    // No HTTP polling to speak of: the bump must come over the WebSocket.
    config.fallback_interval_ms = 60_000;
    config.head_check_interval_ms = 60_000;
    let client_id = config.client_id.clone().context("client id")?;
    let agent = SyncClient::start(config).await?;
    wait_ready(&agent, 1, Duration::from_secs(20)).await?;

    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("Școala.json"), b"{\"elevi\":30}")?;
    let office = hub.token("office", Role::Agent, None).await?;
    let api = HubApi::with_options(
        vec![hub.url.clone()],
        &office,
        DEFAULT_READ_TIMEOUT,
        tls_config(Some(&ca1))?,
    )?;
    let head = publish(&api, DEFAULT_SPACE, None, &[src.path().to_path_buf()], None)
        .await?
        .head;
    wait_ready(&agent, head.version, Duration::from_secs(10)).await?;
    let tree = read_tree(&data.path().join("current"));
    assert_eq!(tree["Școala.json"], b"{\"elevi\":30}");

    let trusted = client_trusting(&ca1)?;
    let clients: Vec<ClientInfo> = trusted
        .get(hub.api("/clients"))
        .bearer_auth(&hub.admin_token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(
        clients.iter().any(|c| c.client_id == client_id),
        "the agent's wss:// socket is not listed: {clients:?}"
    );

    // Plain HTTP on the TLS port and clients without the CA get nothing.
    let plain = hub.url.replacen("https://", "http://", 1);
    assert!(http().get(format!("{plain}/healthz")).send().await.is_err());
    assert!(
        http()
            .get(format!("{}/healthz", hub.url))
            .send()
            .await
            .is_err()
    );

    // A renewed certificate from another CA, picked up on SIGHUP.
    let (ca2, cert2, key2) = make_ca_and_server_cert(certs.path(), "two")?;
    std::fs::copy(&cert2, &cert_path)?;
    std::fs::copy(&key2, &key_path)?;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()?;
    ensure!(status.success(), "kill -HUP");
    let mut renewed = false;
    for _ in 0..50 {
        let fresh = client_trusting(&ca2)?;
        if fresh
            .get(format!("{}/healthz", hub.url))
            .send()
            .await
            .is_ok()
        {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        renewed,
        "the hub still presents the old certificate after SIGHUP"
    );
    let old = client_trusting(&ca1)?;
    assert!(
        old.get(format!("{}/healthz", hub.url))
            .send()
            .await
            .is_err()
    );

    // A broken file on the next SIGHUP keeps the certificate in use.
    std::fs::write(&cert_path, b"not a certificate")?;
    std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = client_trusting(&ca2)?;
    let r = fresh.get(format!("{}/healthz", hub.url)).send().await?;
    assert_eq!(r.status(), reqwest::StatusCode::OK);

    agent.shutdown().await;
    hub.stop().await;
    Ok(())
}
