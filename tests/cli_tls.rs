//! The `highwater` binary over TLS: `serve --tls-cert --tls-key` prints and writes an
//! `https://` URL; the record commands, `sync --peer` and a node's `--peer` reach it with
//! the CA given by `--ca-file` or `HIGHWATER_CA_FILE`, and fail with a certificate error
//! naming the URL without it; unusable certificate files are named; tokens in clear text
//! beyond loopback are refused.

#[path = "common/certs.rs"]
mod certs;
#[path = "common/process.rs"]
mod process;

use std::time::Duration;

use process::{arg, ok, poll, run, run_with_env, ServeProcess, TestResult};

const ADMIN: &str = "admin-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(20);
const EVERY: Duration = Duration::from_millis(50);

/// A token file with one token that may do everything.
fn token_file(dir: &std::path::Path) -> TestResult<std::path::PathBuf> {
    let path = dir.join("tokens.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"tokens": [{{"name": "admin", "token": "{ADMIN}", "read": ["*"], "write": ["*"], "sync": true}}]}}"#
        ),
    )?;
    Ok(path)
}

#[test]
fn an_https_node_is_reached_with_its_ca_and_refused_without() -> TestResult {
    let pki = certs::loopback()?;
    let dir = tempfile::tempdir()?;
    let tokens = token_file(dir.path())?;
    let a_dir = dir.path().join("a");
    let a = ServeProcess::start(
        &a_dir,
        &[
            "--tls-cert",
            arg(&pki.cert),
            "--tls-key",
            arg(&pki.key),
            "--token-file",
            arg(&tokens),
        ],
    )?;
    assert!(a.url.starts_with("https://127.0.0.1:"), "{}", a.url);
    let written = std::fs::read_to_string(a_dir.join(highwater::node::URL_FILE))?;
    assert_eq!(written.trim(), a.url);

    let ca = arg(&pki.ca);
    ok(&[
        "put",
        "--node",
        &a.url,
        "--token",
        ADMIN,
        "--ca-file",
        ca,
        "shared",
        "k",
        "over tls",
    ])?;
    let env = [("HIGHWATER_CA_FILE", ca), ("HIGHWATER_TOKEN", ADMIN)];
    let got = run_with_env(&["get", "--node", &a.url, "shared", "k"], &env)?;
    assert_eq!(got.stdout, b"over tls", "{got:?}");

    // Without the CA: a certificate problem, naming the node's URL.
    let refused = run(&["get", "--node", &a.url, "--token", ADMIN, "shared", "k"])?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains(&format!("TLS certificate problem with {}", a.url))
            && err.contains("--ca-file"),
        "{err}"
    );

    // One-shot sync from the https node, the CA from the environment.
    let c = dir.path().join("c");
    let sync_env = [("HIGHWATER_CA_FILE", ca), ("HIGHWATER_PEER_TOKEN", ADMIN)];
    let synced = run_with_env(&["sync", "--data", arg(&c), "--peer", &a.url], &sync_env)?;
    let summary = String::from_utf8_lossy(&synced.stdout);
    assert!(
        synced.status.success() && summary.contains("received 1 versions"),
        "{summary}{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let untrusted = run_with_env(
        &["sync", "--data", arg(&c), "--peer", &a.url],
        &[("HIGHWATER_PEER_TOKEN", ADMIN)],
    )?;
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        !untrusted.status.success() && err.contains("TLS certificate problem"),
        "{err}"
    );

    // A node whose peer is the https node pulls the record on its own rounds.
    let b = ServeProcess::start_with_env(
        &dir.path().join("b"),
        &["--interval", "200ms", "--peer", &a.url, "--ca-file", ca],
        &[("HIGHWATER_PEER_TOKEN", ADMIN)],
    )?;
    poll(DEADLINE, EVERY, "the record on b", || {
        let out = run(&["get", "--node", &b.url, "shared", "k"])?;
        Ok((out.status.success() && out.stdout == b"over tls").then_some(()))
    })
    .map_err(|e| format!("{e}; b's log:\n{}", b.log_text()))?;
    Ok(())
}

#[test]
fn unusable_certificate_files_are_named() -> TestResult {
    let pki = certs::loopback()?;
    let other = certs::loopback()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("d");
    let missing = dir.path().join("missing.pem");
    let serve = |cert: &str, key: &str| {
        run(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            arg(&data),
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ])
    };
    for (cert, key, expected) in [
        (
            arg(&missing),
            arg(&pki.key),
            format!("cannot read {}", missing.display()),
        ),
        (
            arg(&pki.cert),
            arg(&other.key),
            format!(
                "the key in {} does not match the certificate in {}",
                other.key.display(),
                pki.cert.display()
            ),
        ),
        (
            arg(&pki.key),
            arg(&pki.key),
            format!("{} holds no PEM certificate", pki.key.display()),
        ),
    ] {
        let out = serve(cert, key)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&expected), "{err}");
    }
    // A certificate without its key is refused by the argument parser.
    let half = run(&["serve", "--data", arg(&data), "--tls-cert", arg(&pki.cert)])?;
    assert!(!half.status.success());
    assert!(String::from_utf8_lossy(&half.stderr).contains("--tls-key"));
    // So is a CA file that cannot be read, before any request.
    let bad_ca = run(&[
        "get",
        "--node",
        "https://127.0.0.1:1",
        "--ca-file",
        arg(&missing),
        "shared",
        "k",
    ])?;
    let err = String::from_utf8_lossy(&bad_ca.stderr);
    assert!(
        !bad_ca.status.success()
            && err.contains(&format!("cannot use CA file {}", missing.display())),
        "{err}"
    );
    Ok(())
}

#[test]
fn tokens_in_clear_text_beyond_loopback_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tokens = token_file(dir.path())?;
    let out = run(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data",
        arg(&dir.path().join("d")),
        "--token-file",
        arg(&tokens),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to serve tokens over plain HTTP") && err.contains("--insecure-http"),
        "{err}"
    );
    Ok(())
}
