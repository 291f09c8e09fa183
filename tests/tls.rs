//! TLS both ways: a hub served over HTTPS with a certificate from a CA made in the test; a
//! device that trusts the CA syncs with it (records and a file) and reads through the records
//! API; a client that does not trust the CA, or reaches the hub under a name its certificate
//! does not carry, fails with a certificate error naming the URL; curl reads a record with
//! `--cacert`; and what may listen beyond loopback.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::certs::{loopback, pki, Pki};
use common::http::{tokens, Server, HUB, READER};
use common::rounds::TestResult;
use highwater::api::NodeApi;
use highwater::error::TransportError;
use highwater::http::{
    serve, ClientConfig, HttpTransport, NodeClient, ServeError, ServerConfig, ServerTls, TlsError,
};
use highwater::{Error as HwError, Key, Scope, SyncEngine};

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

/// A hub with tokens, serving HTTPS with `pki`'s certificate.
async fn hub(pki: &Pki) -> TestResult<Server> {
    let config = ServerConfig {
        access: tokens(),
        tls: Some(ServerTls::from_pem_files(&pki.cert, &pki.key)?),
        ..ServerConfig::default()
    };
    Server::start(config).await
}

/// Client settings with `token`, trusting `ca` (besides the system's roots) if given.
fn client(token: &str, ca: Option<&Path>) -> ClientConfig {
    ClientConfig {
        token: Some(token.to_owned()),
        ca_file: ca.map(Path::to_owned),
        ..ClientConfig::default()
    }
}

/// The certificate problem in `result`, if that is how it failed.
fn certificate_problem<T: std::fmt::Debug>(
    result: Result<T, HwError>,
) -> TestResult<(String, String)> {
    match result {
        Err(HwError::Transport(TransportError::Certificate { url, reason })) => Ok((url, reason)),
        other => Err(format!("expected a certificate error, got {other:?}").into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_trusts_the_ca_syncs_with_an_https_hub() -> TestResult {
    let pki = loopback()?;
    let hub = hub(&pki).await?;
    assert!(hub.url().starts_with("https://127.0.0.1:"), "{}", hub.url());
    let shared = Scope::shared();
    hub.engine
        .put(&shared, &key("from-hub"), b"hello device".to_vec())?;

    let device = SyncEngine::in_memory()?;
    device.put(&shared, &key("from-device"), b"hello hub".to_vec())?;
    let photo: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    device.put_file_bytes(&shared, &key("photo"), Vec::new(), &photo)?;

    let to_hub = HttpTransport::with_config(&hub.url(), client(HUB, Some(&pki.ca)))?;
    let mut rounds = 0;
    while device.exchange(&to_hub).await?.has_more {
        rounds += 1;
        assert!(rounds < 100, "the sync does not end");
    }
    assert_eq!(device.digest()?, hub.engine.digest()?);
    assert_eq!(device.watermarks()?, hub.engine.watermarks()?);
    let (blob, _) = hub
        .engine
        .open_file(&shared, &key("photo"))?
        .ok_or("the file reached the hub")?;
    assert_eq!(blob.size, photo.len() as u64);

    // The records API over HTTPS, with a token that may only read.
    let reader = NodeClient::with_config(&hub.url(), client(READER, Some(&pki.ca)))?;
    let read = reader
        .get(shared.clone(), key("from-device"))
        .await?
        .found()
        .ok_or("the device's record is on the hub")?;
    assert_eq!(read.value, b"hello hub");
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_ca_gets_a_certificate_error_naming_the_url() -> TestResult
{
    let pki = loopback()?;
    let hub = hub(&pki).await?;
    hub.engine
        .put(&Scope::shared(), &key("k"), b"secret".to_vec())?;
    let before = hub.snapshot()?;

    // Only the system's roots: the test CA is not among them.
    let device = SyncEngine::in_memory()?;
    device.put(&Scope::shared(), &key("mine"), b"v".to_vec())?;
    let untrusting = HttpTransport::with_config(&hub.url(), client(HUB, None))?;
    let (url, reason) = certificate_problem(device.exchange(&untrusting).await)?;
    assert_eq!(url, hub.url());
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    let message = TransportError::Certificate {
        url: url.clone(),
        reason,
    }
    .to_string();
    assert!(
        message.contains("certificate") && message.contains(&hub.url()),
        "{message}"
    );
    let records = NodeClient::with_config(&hub.url(), client(READER, None))?;
    let (url, _) = certificate_problem(records.get(Scope::shared(), key("k")).await)?;
    assert_eq!(url, hub.url());

    // Trusting another CA is no better.
    let other = loopback()?;
    let wrong_ca = HttpTransport::with_config(&hub.url(), client(HUB, Some(&other.ca)))?;
    certificate_problem(device.exchange(&wrong_ca).await)?;

    // Nothing crossed: the device holds nothing of the hub's, the hub nothing of the device's.
    assert!(device.get(&Scope::shared(), &key("k"))?.is_none());
    assert_eq!(hub.snapshot()?, before);
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_a_certificate_error() -> TestResult {
    let pki = pki(&["hub.example"])?;
    let hub = hub(&pki).await?;
    let device = SyncEngine::in_memory()?;
    let transport = HttpTransport::with_config(&hub.url(), client(HUB, Some(&pki.ca)))?;
    let (url, reason) = certificate_problem(device.exchange(&transport).await)?;
    assert_eq!(url, hub.url());
    assert!(reason.contains("not valid for name"), "{reason}");
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_tls_do_not_mix_and_that_is_not_a_certificate_error() -> TestResult {
    let pki = loopback()?;
    let tls_hub = hub(&pki).await?;
    let plain_url = tls_hub.url().replacen("https://", "http://", 1);
    let device = SyncEngine::in_memory()?;
    let plain = HttpTransport::with_config(&plain_url, client(HUB, Some(&pki.ca)))?;
    match device.exchange(&plain).await {
        Err(HwError::Transport(TransportError::Unreachable { .. })) => {}
        other => panic!("plain HTTP to a TLS port: {other:?}"),
    }
    let plain_hub = Server::start(ServerConfig {
        access: tokens(),
        ..ServerConfig::default()
    })
    .await?;
    let tls_url = plain_hub.url().replacen("http://", "https://", 1);
    let tls = HttpTransport::with_config(&tls_url, client(HUB, Some(&pki.ca)))?;
    match device.exchange(&tls).await {
        Err(HwError::Transport(TransportError::Unreachable { .. })) => {}
        other => panic!("TLS to a plain HTTP port: {other:?}"),
    }
    tls_hub.stop().await?;
    plain_hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_a_record_over_https_with_the_ca() -> TestResult {
    let curl = Path::new("/usr/bin/curl");
    if !curl.exists() {
        println!("skipped: /usr/bin/curl is absent");
        return Ok(());
    }
    let pki = loopback()?;
    let hub = hub(&pki).await?;
    hub.engine
        .put(&Scope::shared(), &key("greeting"), b"hello curl".to_vec())?;
    let port = hub.addr.port();
    let ca = pki.ca.clone();
    let run = move |url: String, with_ca: bool| {
        let mut cmd = std::process::Command::new("/usr/bin/curl");
        cmd.args(["--silent", "--show-error", "--fail", "--max-time", "10"])
            .args(["--header", &format!("Authorization: Bearer {READER}")]);
        if with_ca {
            cmd.arg("--cacert").arg(&ca);
        }
        cmd.arg(url).output()
    };
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{port}/v1/records/shared/greeting");
        let (u, r) = (url.clone(), run.clone());
        let out = tokio::task::spawn_blocking(move || r(u, true)).await??;
        assert!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello curl", "{url}");
    }
    // Without the CA, curl refuses the certificate (exit code 60).
    let url = format!("https://127.0.0.1:{port}/v1/records/shared/greeting");
    let out = tokio::task::spawn_blocking(move || run(url, false)).await??;
    assert_eq!(out.status.code(), Some(60), "{out:?}");
    hub.stop().await
}

#[tokio::test]
async fn beyond_loopback_tokens_need_tls_or_an_explicit_insecure_http() -> TestResult {
    let pki = loopback()?;
    let engine = Arc::new(SyncEngine::in_memory()?);
    let tls = ServerTls::from_pem_files(&pki.cert, &pki.key)?;
    let with_tokens = || ServerConfig {
        access: tokens(),
        ..ServerConfig::default()
    };

    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let addr = listener.local_addr()?;
    match serve(engine.clone(), listener, with_tokens(), async {}).await {
        Err(ServeError::TokensInClearText { addr: refused }) => assert_eq!(refused, addr),
        other => panic!("expected TokensInClearText, got {other:?}"),
    }
    let message = ServeError::TokensInClearText { addr }.to_string();
    assert!(message.contains("--insecure-http"), "{message}");

    // An open node stays refused there, TLS or not: anyone could write.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let open_tls = ServerConfig {
        tls: Some(tls.clone()),
        ..ServerConfig::default()
    };
    match serve(engine.clone(), listener, open_tls, async {}).await {
        Err(ServeError::OpenOnPublicAddress { .. }) => {}
        other => panic!("expected OpenOnPublicAddress, got {other:?}"),
    }

    // Tokens over TLS, and tokens in clear text when asked for explicitly, are served (here
    // until the at-once shutdown); so is anything on loopback.
    for config in [
        ServerConfig {
            tls: Some(tls.clone()),
            ..with_tokens()
        },
        ServerConfig {
            insecure_http: true,
            ..with_tokens()
        },
    ] {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
        serve(engine.clone(), listener, config, async {}).await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    serve(engine, listener, with_tokens(), async {}).await?;
    Ok(())
}

#[test]
fn certificate_and_key_files_are_checked_and_named() -> TestResult {
    let pki = loopback()?;
    let other = loopback()?;
    match ServerTls::from_pem_files(&pki.cert, &other.key) {
        Err(e @ TlsError::KeyMismatch { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(&*other.key.to_string_lossy())
                    && message.contains(&*pki.cert.to_string_lossy()),
                "{message}"
            );
        }
        other => panic!("expected KeyMismatch, got {other:?}"),
    }
    // A key file given as the certificate, and the other way round.
    assert!(matches!(
        ServerTls::from_pem_files(&pki.key, &pki.key),
        Err(TlsError::NoCertificate { path }) if path == pki.key
    ));
    assert!(matches!(
        ServerTls::from_pem_files(&pki.cert, &pki.cert),
        Err(TlsError::NoKey { path }) if path == pki.cert
    ));
    let broken = pki.dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )?;
    assert!(matches!(
        ServerTls::from_pem_files(&broken, &pki.key),
        Err(TlsError::Pem { path, .. }) if path == broken
    ));
    // A client's CA file too, before anything is sent.
    let missing = pki.dir.path().join("missing.pem");
    match HttpTransport::with_config("https://127.0.0.1:1", client(HUB, Some(&missing))) {
        Err(TransportError::CaFile { path, reason }) => {
            assert_eq!(path, missing);
            assert!(reason.contains("cannot read"), "{reason}");
        }
        other => panic!("expected CaFile, got {other:?}"),
    }
    Ok(())
}
