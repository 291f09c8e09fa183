//! TLS on the server: a hub served over HTTPS with a certificate from a CA made in the test;
//! curl reads a record with `--cacert`; certificate and key files are checked; and what may
//! listen beyond loopback.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::certs::{loopback, Pki};
use common::http::{tokens, Server, READER};
use common::rounds::TestResult;
use highwater::http::{serve, ServeError, ServerConfig, ServerTls, TlsError};
use highwater::{Key, Scope, SyncEngine};

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
    Ok(())
}
