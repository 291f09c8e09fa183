//! The `highwater` binary end to end: nodes as separate processes on ports from the OS,
//! records and files written and read through the CLI, the data-directory lock, one-shot
//! sync, tokens, and a clean stop on SIGTERM.

#[path = "common/process.rs"]
mod process;

use std::path::Path;
use std::time::Duration;

use highwater::{Key, Op, Scope, SyncEngine};
use process::{arg, ok, poll, run, run_with_env, ServeProcess, TestResult};
use serde_json::Value;

/// How long a write on one node may take to be readable on the other.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often a test asks again.
const EVERY: Duration = Duration::from_millis(50);

/// Polls `get` on `url` until the record is there; returns its value.
fn get_eventually(url: &str, scope: &str, key: &str, env: &[(&str, &str)]) -> TestResult<Vec<u8>> {
    let mut last = String::new();
    poll(DEADLINE, EVERY, &format!("{scope}/{key} on {url}"), || {
        let out = run_with_env(&["get", "--node", url, scope, key], env)?;
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        Ok(out.status.success().then_some(out.stdout))
    })
    .map_err(|e| format!("{e}; last error: {last}").into())
}

fn status_json(args: &[&str]) -> TestResult<Value> {
    let mut all = vec!["status", "--json"];
    all.extend_from_slice(args);
    Ok(serde_json::from_slice(&ok(&all)?)?)
}

#[test]
fn two_serve_processes_share_a_record_and_a_file_through_the_cli() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a = ServeProcess::start(&dir.path().join("a"), &["--interval", "200ms"])?;
    let b = ServeProcess::start(
        &dir.path().join("b"),
        &["--interval", "200ms", "--peer", &a.url],
    )?;
    assert_ne!(a.url, b.url);

    ok(&[
        "put",
        "--node",
        &a.url,
        "shared",
        "greeting",
        "hello from a",
    ])?;
    let photo: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let src = dir.path().join("photo.bin");
    std::fs::write(&src, &photo)?;
    ok(&[
        "put-file",
        "--node",
        &a.url,
        "app/notes/items",
        "photo",
        arg(&src),
    ])?;

    // B pulls both from A on its own rounds.
    assert_eq!(
        get_eventually(&b.url, "shared", "greeting", &[])?,
        b"hello from a"
    );
    let copy = dir.path().join("copy.bin");
    poll(DEADLINE, EVERY, "the file on b", || {
        let out = run(&[
            "get-file",
            "--node",
            &b.url,
            "app/notes/items",
            "photo",
            arg(&copy),
        ])?;
        Ok(out.status.success().then_some(()))
    })?;
    assert_eq!(std::fs::read(&copy)?, photo);
    let listing = String::from_utf8(ok(&["ls", "--node", &b.url, "app/notes/items"])?)?;
    assert!(
        listing.starts_with("photo\t0 B\tresident\tfile 300000 B\t"),
        "{listing}"
    );

    // And the other way: B's rounds carry B's write to A.
    ok(&["put", "--node", &b.url, "shared", "reply", "hello from b"])?;
    assert_eq!(
        get_eventually(&a.url, "shared", "reply", &[])?,
        b"hello from b"
    );
    // A delete travels too.
    ok(&["rm", "--node", &a.url, "shared", "greeting"])?;
    poll(DEADLINE, EVERY, "the delete on b", || {
        let out = run(&["get", "--node", &b.url, "shared", "greeting"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        Ok((!out.status.success() && err.contains("no such record")).then_some(()))
    })?;
    Ok(())
}

#[test]
fn a_data_dir_held_by_a_node_is_refused_with_the_nodes_url() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a_dir = dir.path().join("a");
    let a = ServeProcess::start(&a_dir, &[])?;
    for args in [
        vec!["get", "--data", arg(&a_dir), "shared", "k"],
        vec!["status", "--data", arg(&a_dir)],
        vec!["serve", "--listen", "127.0.0.1:0", "--data", arg(&a_dir)],
        vec!["sync", "--data", arg(&a_dir), "--peer", &a.url],
    ] {
        let out = run(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains("is in use by a running node") && err.contains(&a.url),
            "{args:?}: {err}"
        );
    }
    // The node itself is unharmed.
    ok(&["put", "--node", &a.url, "shared", "k", "v"])?;
    assert_eq!(ok(&["get", "--node", &a.url, "shared", "k"])?, b"v");
    Ok(())
}

#[test]
fn record_commands_work_directly_on_a_free_data_dir() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("d");
    let data = arg(&d);
    ok(&["put", "--data", data, "app/notes/items", "n1", "first"])?;
    ok(&["put", "--data", data, "app/notes/items", "n2", "second"])?;
    ok(&[
        "put",
        "--data",
        data,
        "app/notes/items",
        "n1",
        "first, edited",
    ])?;
    assert_eq!(
        ok(&["get", "--data", data, "app/notes/items", "n1"])?,
        b"first, edited"
    );
    let src = dir.path().join("f.txt");
    std::fs::write(&src, b"file body")?;
    ok(&["put-file", "--data", data, "shared", "f", arg(&src)])?;
    assert_eq!(
        ok(&["get-file", "--data", data, "shared", "f", "-"])?,
        b"file body"
    );
    ok(&["rm", "--data", data, "app/notes/items", "n2"])?;
    let gone = run(&["get", "--data", data, "app/notes/items", "n2"])?;
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no such record: app/notes/items/n2"));
    let no_file = run(&["get-file", "--data", data, "app/notes/items", "n1", "-"])?;
    assert!(String::from_utf8_lossy(&no_file.stderr).contains("the record has no file"));
    let listing = String::from_utf8(ok(&["ls", "--data", data, "app/notes/items"])?)?;
    let keys: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(keys, ["n1"]);
    let status = status_json(&["--data", data])?;
    assert_eq!(
        status["scopes"]["app/notes/items"]["residency"],
        serde_json::json!({"resident": 1, "staged": 0, "tombstoned": 1})
    );
    // A bad scope is refused before anything is opened.
    let bad = run(&["put", "--data", data, "notes", "k", "v"])?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid scope"));
    Ok(())
}

#[test]
fn purge_removes_old_tombstones_from_a_data_dir() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("d");
    let data = arg(&d);
    ok(&["put", "--data", data, "app/notes/items", "gone", "v"])?;
    ok(&["put", "--data", data, "app/notes/items", "kept", "v"])?;
    ok(&["rm", "--data", data, "app/notes/items", "gone"])?;
    // At the default retention (30 days) a fresh tombstone stays.
    let out = String::from_utf8(ok(&["purge", "--data", data])?)?;
    assert!(out.starts_with("purged 0 tombstones"), "{out}");
    let status = status_json(&["--data", data])?;
    assert_eq!(
        status["scopes"]["app/notes/items"]["residency"]["tombstoned"],
        1
    );
    // With no retention, and no peer to wait for, it goes; the live record stays.
    let out = String::from_utf8(ok(&[
        "purge",
        "--data",
        data,
        "--tombstone-retention",
        "0s",
    ])?)?;
    assert!(out.starts_with("purged 1 tombstone of"), "{out}");
    assert!(out.contains("floor of app/notes/items: "), "{out}");
    let status = status_json(&["--data", data])?;
    assert_eq!(
        status["scopes"]["app/notes/items"]["residency"],
        serde_json::json!({"resident": 1, "staged": 0, "tombstoned": 0})
    );
    assert_eq!(
        ok(&["get", "--data", data, "app/notes/items", "kept"])?,
        b"v"
    );
    Ok(())
}

/// Writes `n` records (and one file) on a node's directory through the library.
fn seed(dir: &Path, n: usize, file: &[u8]) -> TestResult<SyncEngine> {
    let engine = SyncEngine::open(dir)?;
    let shared = Scope::shared();
    let ops = (0..n).map(|i| {
        let key = Key::try_from(format!("k{i:06}").as_str()).expect("valid key");
        let value = format!("value {i}").into_bytes();
        (shared.clone(), key, Op::Put { value, blob: None })
    });
    engine.write_batch(ops)?;
    engine.put_file_bytes(&shared, &Key::try_from("file")?, Vec::new(), file)?;
    Ok(engine)
}

#[test]
fn one_shot_sync_pages_through_everything_and_reports_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a_dir = dir.path().join("a");
    let file: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    drop(seed(&a_dir, 3000, &file)?);
    let a = ServeProcess::start(&a_dir, &[])?;
    let c = dir.path().join("c");
    let args = [
        "sync",
        "--data",
        arg(&c),
        "--peer",
        &a.url,
        "--page-limit",
        "100",
    ];
    let summary = String::from_utf8(ok(&args)?)?;
    assert!(
        summary
            .contains("received 3001 versions (3001 applied), sent 0; files: fetched 1 (200000 B)"),
        "{summary}"
    );
    let rounds: usize = summary
        .split(" in ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or("no round count")?;
    // Streamed back to back (docs/protocol.md, "Streamed pulls"): fewer rounds than pages.
    assert!(rounds < 30, "pages of 100 for 3001 versions: {summary}");

    // The same state on both sides, and C sees no gap with A.
    let on_a = status_json(&["--node", &a.url])?;
    let on_c = status_json(&["--data", arg(&c)])?;
    assert_eq!(on_a["scopes"], on_c["scopes"]);
    assert_eq!(on_c["peers"][0]["id"], on_a["node"]);
    assert_eq!(on_c["peers"][0]["lacks"], serde_json::json!([]));
    assert_eq!(on_c["peers"][0]["behind"], serde_json::json!([]));
    let human = String::from_utf8(ok(&["status", "--data", arg(&c)])?)?;
    assert!(
        human.contains("shared: 3001 resident, 0 staged, 0 tombstoned"),
        "{human}"
    );
    assert!(human.contains("in sync"), "{human}");
    assert_eq!(
        ok(&["get-file", "--data", arg(&c), "shared", "file", "-"])?,
        file
    );

    // Nothing left: a second sync moves nothing.
    let again = String::from_utf8(ok(&args)?)?;
    assert!(again.contains("in 1 round"), "{again}");
    assert!(again.contains("received 0 versions"), "{again}");
    Ok(())
}

#[test]
fn tokens_guard_a_node_and_a_peer_presents_its_own() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"tokens": [
            {"name": "admin", "token": "admin-token-0123456789", "read": ["*"], "write": ["*"], "sync": true},
            {"name": "peer", "token": "peer-token-0123456789", "read": ["*"], "write": ["*"], "sync": true},
            {"name": "reader", "token": "reader-token-0123456789", "read": ["shared"]}
        ]}"#,
    )?;
    let a = ServeProcess::start(&dir.path().join("a"), &["--token-file", arg(&tokens)])?;
    let anonymous = run(&["put", "--node", &a.url, "shared", "k", "v"])?;
    assert!(!anonymous.status.success());
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("HTTP 401"));
    ok(&[
        "put",
        "--node",
        &a.url,
        "--token",
        "admin-token-0123456789",
        "shared",
        "k",
        "v",
    ])?;
    let reader = [("HIGHWATER_TOKEN", "reader-token-0123456789")];
    let read = run_with_env(&["get", "--node", &a.url, "shared", "k"], &reader)?;
    assert_eq!(read.stdout, b"v");
    let write = run_with_env(&["put", "--node", &a.url, "shared", "k", "w"], &reader)?;
    assert!(String::from_utf8_lossy(&write.stderr).contains("HTTP 403"));

    // A peer syncs with the token it presents.
    let b = ServeProcess::start_with_env(
        &dir.path().join("b"),
        &["--interval", "200ms", "--peer", &a.url],
        &[("HIGHWATER_PEER_TOKEN", "peer-token-0123456789")],
    )?;
    assert_eq!(get_eventually(&b.url, "shared", "k", &[])?, b"v");
    Ok(())
}

#[test]
fn sigterm_stops_a_node_cleanly_and_frees_its_directory() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a_dir = dir.path().join("a");
    let mut a = ServeProcess::start(&a_dir, &[])?;
    assert!(a_dir.join(highwater::node::URL_FILE).exists());
    ok(&["put", "--node", &a.url, "shared", "k", "kept"])?;
    let status = a.terminate(Duration::from_secs(20))?;
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        a.log_text()
    );
    assert!(!a_dir.join(highwater::node::URL_FILE).exists());
    assert_eq!(ok(&["get", "--data", arg(&a_dir), "shared", "k"])?, b"kept");
    Ok(())
}

#[test]
fn keys_and_values_from_the_store_reach_a_terminal_escaped() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("d");
    let data = arg(&d);
    // What any peer could have written: terminal escapes in a key and a value, a key that
    // is not UTF-8, a bidirectional override.
    let evil_key = "title\u{1b}]0;pwned\u{7}\u{1b}[2J";
    let value = "line 1\n\u{1b}[31mred\u{1b}[0m\u{202e}";
    ok(&["put", "--data", data, "shared", evil_key, value])?;
    {
        let engine = SyncEngine::open(&d)?;
        engine.put(
            &Scope::shared(),
            &Key::new(b"raw\xff\x9b".to_vec())?,
            b"v".to_vec(),
        )?;
    }
    let listing = ok(&["ls", "--data", data, "shared"])?;
    assert!(
        !listing.contains(&0x1b) && !listing.contains(&0x07),
        "{listing:?}"
    );
    let listing = String::from_utf8(listing)?;
    let keys: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(
        keys,
        [r"raw\xff\x9b", r"title\x1b]0;pwned\x07\x1b[2J"],
        "{listing}"
    );

    // An error quoting a key escapes it too.
    let missing = run(&["get", "--data", data, "shared", "no\u{1b}[2Jpe"])?;
    let err = String::from_utf8(missing.stderr)?;
    assert!(
        err.contains(r"no such record: shared/no\x1b[2Jpe") && !err.contains('\u{1b}'),
        "{err:?}"
    );

    // On a pipe `get` writes the value's bytes as they are...
    assert_eq!(
        ok(&["get", "--data", data, "shared", evil_key])?,
        value.as_bytes()
    );
    // ...and on a terminal, escaped (newlines kept). `script` gives the command a terminal.
    if !Path::new("/usr/bin/script").exists() {
        println!("terminal check skipped: /usr/bin/script is absent");
        return Ok(());
    }
    let command = format!(
        "{} get --data {} shared 'title\u{1b}]0;pwned\u{7}\u{1b}[2J'",
        process::bin(),
        data
    );
    let shown = std::process::Command::new("/usr/bin/script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(shown.status.success(), "{shown:?}");
    let shown = String::from_utf8(shown.stdout)?.replace("\r\n", "\n");
    assert_eq!(shown, "line 1\n\\x1b[31mred\\x1b[0m\\u{202e}");
    // A file shown on a terminal too.
    let file = dir.path().join("f.bin");
    std::fs::write(&file, b"\x1b[2Jcleared?\xff")?;
    ok(&["put-file", "--data", data, "shared", "f", arg(&file)])?;
    let command = format!("{} get-file --data {} shared f -", process::bin(), data);
    let shown = std::process::Command::new("/usr/bin/script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(shown.status.success(), "{shown:?}");
    assert_eq!(String::from_utf8(shown.stdout)?, r"\x1b[2Jcleared?\xff");
    Ok(())
}

#[test]
fn serve_audits_each_peer_on_its_audit_interval_and_refuses_a_zero_one() -> TestResult {
    let dir = tempfile::tempdir()?;
    let b = ServeProcess::start(&dir.path().join("b"), &[])?;
    let a = ServeProcess::start(
        &dir.path().join("a"),
        &[
            "--peer",
            &b.url,
            "--interval",
            "1h",
            "--audit-interval",
            "300ms",
        ],
    )?;
    // Within a few intervals the node has audited its peer, and its status says so.
    let audit = poll(DEADLINE, EVERY, "a's status shows an audit of b", || {
        let status = status_json(&["--node", &a.url])?;
        let audit = status["peers"][0]["last_audit"].clone();
        Ok((!audit.is_null()).then_some(audit))
    })?;
    assert_eq!(audit["initiated"], Value::Bool(true), "{audit}");
    assert_eq!(audit["received"], 0, "{audit}");

    let zero = run(&[
        "serve",
        "--data",
        arg(&dir.path().join("c")),
        "--audit-interval",
        "0s",
    ])?;
    assert!(!zero.status.success());
    let said = String::from_utf8_lossy(&zero.stderr);
    assert!(said.contains("use `off`"), "{said}");
    Ok(())
}

/// `serve --paused` starts offline on purpose: it serves, takes writes and starts no round;
/// SIGUSR2 resumes syncing (the hub's record arrives) and SIGUSR1 pauses it again, as the
/// status document shows.
#[cfg(unix)]
#[test]
fn serve_starts_paused_and_signals_pause_and_resume_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let hub = ServeProcess::start(&dir.path().join("hub"), &[])?;
    ok(&["put", "--node", &hub.url, "shared", "k", "from the hub"])?;
    let device = ServeProcess::start(
        &dir.path().join("device"),
        &["--interval", "100ms", "--paused", "--peer", &hub.url],
    )?;
    let peer = |url: &str| -> TestResult<Value> {
        Ok(status_json(&["--node", url])?["configured_peers"][0].clone())
    };
    let first = peer(&device.url)?;
    assert_eq!(first["paused"], Value::Bool(true), "{first}");
    assert_eq!(
        first["last_success_unix_ms"],
        Value::Null,
        "no round ran: {first}"
    );
    // It takes writes while paused.
    ok(&["put", "--node", &device.url, "shared", "mine", "offline"])?;

    let signal = |name: &str| -> TestResult {
        let status = std::process::Command::new("kill")
            .args([name, &device.pid().to_string()])
            .status()?;
        assert!(status.success(), "kill {name}");
        Ok(())
    };
    signal("-USR2")?;
    assert_eq!(
        get_eventually(&device.url, "shared", "k", &[])?,
        b"from the hub"
    );
    assert_eq!(get_eventually(&hub.url, "shared", "mine", &[])?, b"offline");
    assert_eq!(peer(&device.url)?["paused"], Value::Bool(false));
    signal("-USR1")?;
    poll(DEADLINE, EVERY, "paused again", || {
        Ok((peer(&device.url)?["paused"] == Value::Bool(true)).then_some(()))
    })?;
    Ok(())
}

/// `--cache-mib` sizes the store's page cache: a node starts with a small one and serves,
/// and 0 is refused before anything is opened.
#[test]
fn serve_takes_a_cache_size_and_refuses_zero() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("node");
    let out = run(&["serve", "--data", arg(&data), "--cache-mib", "0"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a zero cache was taken");
    assert!(stderr.contains("--cache-mib"), "{stderr}");
    assert!(
        !data.exists(),
        "the data directory was created for a refused command"
    );
    let node = ServeProcess::start(&data, &["--cache-mib", "16"])?;
    ok(&[
        "put",
        "--node",
        &node.url,
        "shared",
        "k",
        "with a small cache",
    ])?;
    assert_eq!(
        ok(&["get", "--node", &node.url, "shared", "k"])?,
        b"with a small cache"
    );
    Ok(())
}
