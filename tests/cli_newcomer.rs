//! What a newcomer hit with the `highwater` binary (issue 18, items 4 and 9), as separate
//! processes: read commands on a mistyped data directory, a node URL without a scheme, a
//! port in use, a refused token, and a device whose hub is down or refuses its token, seen
//! in its log and in `highwater status`.

#[path = "common/process.rs"]
mod process;

use std::time::Duration;

use process::{arg, poll, run, ServeProcess, TestResult};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);
const EVERY: Duration = Duration::from_millis(100);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A port nothing listens on (bound, then released).
fn dead_url() -> TestResult<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("http://{}", listener.local_addr()?))
}

#[test]
fn read_commands_do_not_create_a_mistyped_data_dir() -> TestResult {
    let dir = tempfile::tempdir()?;
    let typo = dir.path().join("typo");
    for args in [
        vec!["ls", "--data", arg(&typo), "shared"],
        vec!["status", "--data", arg(&typo)],
        vec!["get", "--data", arg(&typo), "shared", "k"],
    ] {
        let out = run(&args)?;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains("no data directory at"), "{args:?}: {err}");
        assert!(!typo.exists(), "{args:?} created the directory");
    }
    // A command that writes still creates it.
    run(&["put", "--data", arg(&typo), "shared", "k", "v"])?;
    assert!(typo.is_dir());
    Ok(())
}

#[test]
fn a_node_url_without_a_scheme_says_what_to_write() -> TestResult {
    let out = run(&["status", "--node", "127.0.0.1:7448"])?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("write http://127.0.0.1:7448"), "{err}");
    Ok(())
}

#[test]
fn serve_on_a_port_in_use_leaves_no_data_dir_behind() -> TestResult {
    let dir = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let listen = taken.local_addr()?.to_string();
    let data = dir.path().join("new");
    let out = run(&["serve", "--data", arg(&data), "--listen", &listen])?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot listen on"),
        "{}",
        stderr(&out)
    );
    assert!(!data.exists(), "serve created {}", data.display());
    Ok(())
}

#[test]
fn sync_takes_token_and_a_refused_one_names_the_option() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"tokens": [{"name": "peer", "token": "peer-token-0123456789", "read": ["*"], "write": ["*"], "sync": true}]}"#,
    )?;
    let hub = ServeProcess::start(&dir.path().join("hub"), &["--token-file", arg(&tokens)])?;
    let device = dir.path().join("device");
    for flag in ["--token", "--peer-token"] {
        let out = run(&[
            "sync",
            "--data",
            arg(&device),
            "--peer",
            &hub.url,
            flag,
            "peer-token-0123456789",
        ])?;
        assert!(out.status.success(), "{flag}: {}", stderr(&out));
    }
    let out = run(&[
        "sync",
        "--data",
        arg(&device),
        "--peer",
        &hub.url,
        "--token",
        "wrong-token-0123456789",
    ])?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("refused the token") && err.contains("--token or HIGHWATER_PEER_TOKEN"),
        "{err}"
    );
    Ok(())
}

fn status_json(url: &str) -> TestResult<Value> {
    let out = run(&["status", "--json", "--node", url])?;
    if !out.status.success() {
        return Err(stderr(&out).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn a_device_whose_hub_is_down_says_so_in_its_log_and_its_status() -> TestResult {
    let dir = tempfile::tempdir()?;
    let hub = dead_url()?;
    let device = ServeProcess::start(&dir.path().join("device"), &["--peer", &hub])?;
    // Listed by URL at once, and failing.
    let peer = poll(DEADLINE, EVERY, "a failed round in the status", || {
        let doc = status_json(&device.url)?;
        let peer = doc["configured_peers"][0].clone();
        Ok((peer["consecutive_failures"].as_u64() > Some(0)).then_some(peer))
    })?;
    assert_eq!(peer["name"], Value::from(hub.clone()));
    assert_eq!(peer["connected"], Value::from(false));
    let text = String::from_utf8(run(&["status", "--node", &device.url])?.stdout)?;
    assert!(
        text.contains(&hub) && text.contains("not connected"),
        "{text}"
    );
    let log = poll(DEADLINE, EVERY, "a WARN in the log", || {
        let log = device.log_text();
        Ok(log.contains("round failed").then_some(log))
    })?;
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains(&format!("is a node running at {hub}")),
        "{log}"
    );
    Ok(())
}

#[test]
fn a_device_whose_token_is_refused_logs_which_option_gives_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"tokens": [{"name": "peer", "token": "peer-token-0123456789", "read": ["*"], "write": ["*"], "sync": true}]}"#,
    )?;
    let hub = ServeProcess::start(&dir.path().join("hub"), &["--token-file", arg(&tokens)])?;
    let device = ServeProcess::start_with_env(
        &dir.path().join("device"),
        &["--peer", &hub.url],
        &[("HIGHWATER_PEER_TOKEN", "wrong-token-0123456789")],
    )?;
    let log = poll(DEADLINE, EVERY, "a WARN in the log", || {
        let log = device.log_text();
        Ok(log.contains("round failed").then_some(log))
    })?;
    assert!(log.contains("HIGHWATER_PEER_TOKEN"), "{log}");
    let doc = status_json(&device.url)?;
    let error = doc["configured_peers"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("401"), "{error}");
    Ok(())
}

#[test]
fn serve_syncs_only_the_scopes_given_for_a_peer() -> TestResult {
    let dir = tempfile::tempdir()?;
    let hub = ServeProcess::start(&dir.path().join("hub"), &[])?;
    let scopes = format!("{}=app/notes/items", hub.url);
    let interval = format!("{}=200ms", hub.url);
    let device = ServeProcess::start(
        &dir.path().join("device"),
        &[
            "--peer",
            &hub.url,
            "--peer-scopes",
            &scopes,
            "--peer-interval",
            &interval,
        ],
    )?;
    for (scope, k) in [("app/notes/items", "n"), ("shared", "s")] {
        let out = run(&["put", "--node", &device.url, scope, k, "v"])?;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    poll(DEADLINE, EVERY, "the note on the hub", || {
        let out = run(&["get", "--node", &hub.url, "app/notes/items", "n"])?;
        Ok(out.status.success().then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(600));
    let shared = run(&["get", "--node", &hub.url, "shared", "s"])?;
    assert!(
        !shared.status.success(),
        "a scope not given for the peer was synced"
    );

    let other = run(&[
        "serve",
        "--data",
        arg(&dir.path().join("x")),
        "--listen",
        "127.0.0.1:0",
        "--peer",
        &hub.url,
        "--peer-interval",
        "http://127.0.0.1:9=5s",
    ])?;
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("not one of the node's --peer URLs"),
        "{}",
        stderr(&other)
    );
    Ok(())
}
