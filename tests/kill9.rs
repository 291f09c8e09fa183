//! A node killed with SIGKILL in the middle of a large sync, then restarted on the same
//! directory, converges: every record of its peer arrives with its value, every write it
//! acknowledged before the kill survives (and reaches the peer), and its status shows no gap.
//!
//! `HIGHWATER_KILL9_RECORDS` sets the size (default 50 000 records in pages of 50, a few
//! seconds of sync; 200 000 for a long run).

#[path = "common/process.rs"]
mod process;

use std::time::Duration;

use highwater::{Key, Op, Scope, SyncEngine};
use process::{ok, poll, ServeProcess, TestResult};
use serde_json::Value;

/// How long convergence may take after the restart.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(120);

fn records() -> usize {
    std::env::var("HIGHWATER_KILL9_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

fn status(url: &str) -> TestResult<Value> {
    Ok(serde_json::from_slice(&ok(&[
        "status", "--json", "--node", url,
    ])?)?)
}

fn resident(status: &Value, scope: &str) -> u64 {
    status["scopes"][scope]["residency"]["resident"]
        .as_u64()
        .unwrap_or(0)
}

fn key(i: usize) -> Key {
    Key::try_from(format!("k{i:07}").as_str()).expect("valid key")
}

fn value(i: usize) -> Vec<u8> {
    format!("value {i} {}", "x".repeat(40)).into_bytes()
}

#[test]
fn kill9_mid_sync_then_restart_converges_without_losing_a_write() -> TestResult {
    let n = records();
    let dir = tempfile::tempdir()?;
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let shared = Scope::shared();
    {
        let a = SyncEngine::open(&a_dir)?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
            a.write_batch(chunk.iter().map(|&i| {
                let op = Op::Put {
                    value: value(i),
                    blob: None,
                };
                (shared.clone(), key(i), op)
            }))?;
        }
    }
    let a = ServeProcess::start(&a_dir, &[])?;
    let b_args = [
        "--peer",
        a.url.as_str(),
        "--page-limit",
        "50",
        "--interval",
        "1s",
    ];
    let mut b = ServeProcess::start(&b_dir, &b_args)?;

    // Writes B acknowledges while it syncs.
    let acked: Vec<(String, String)> = (0..5)
        .map(|i| {
            (
                format!("acked{i}"),
                format!("written on b before the kill ({i})"),
            )
        })
        .collect();
    for (k, v) in &acked {
        ok(&["put", "--node", &b.url, "app/kill9/acked", k, v])?;
    }
    // Kill B once a good part, not all, of A's records are there (past the first durable
    // checkpoints, so the restart resumes rather than starts over).
    let seen = poll(
        Duration::from_secs(60),
        Duration::from_millis(10),
        "partial progress on b",
        || {
            let got = resident(&status(&b.url)?, "shared");
            Ok((got >= n as u64 / 5).then_some(got))
        },
    )?;
    b.kill9()?;
    eprintln!("killed b with {seen} of {n} records applied");
    assert!(
        seen < n as u64,
        "b had all {n} records before the kill; raise HIGHWATER_KILL9_RECORDS"
    );
    drop(b);

    let b = ServeProcess::start(&b_dir, &b_args)?;
    let mut last = Value::Null;
    poll(
        CONVERGE_DEADLINE,
        Duration::from_millis(100),
        "b converges",
        || {
            last = status(&b.url)?;
            let peer_in_sync = last["peers"].as_array().is_some_and(|peers| {
                peers.len() == 1
                    && peers[0]["lacks"] == serde_json::json!([])
                    && peers[0]["behind"] == serde_json::json!([])
            });
            Ok((resident(&last, "shared") == n as u64
                && resident(&last, "app/kill9/acked") == acked.len() as u64
                && peer_in_sync)
                .then_some(()))
        },
    )
    .map_err(|e| format!("{e}; last status of b: {last:#}"))?;
    poll(
        CONVERGE_DEADLINE,
        Duration::from_millis(100),
        "a has b's writes",
        || Ok((resident(&status(&a.url)?, "app/kill9/acked") == acked.len() as u64).then_some(())),
    )?;
    let (mut on_a, mut on_b) = (status(&a.url)?, status(&b.url)?);
    // Hydration is each node's own: b pulled, a only answered.
    for doc in [&mut on_a, &mut on_b] {
        for scope in doc["scopes"]
            .as_object_mut()
            .into_iter()
            .flat_map(|m| m.values_mut())
        {
            scope.as_object_mut().map(|s| s.remove("hydration"));
        }
    }
    assert_eq!(on_a["scopes"], on_b["scopes"], "same watermarks and counts");
    let human = String::from_utf8(ok(&["status", "--node", &b.url])?)?;
    assert!(human.contains("in sync"), "{human}");

    // Stop both (cleanly: B makes its applied pages durable) and compare what they hold.
    let (mut a, mut b) = (a, b);
    for node in [&mut a, &mut b] {
        let exit = node.terminate(Duration::from_secs(30))?;
        assert!(exit.success(), "exit {exit}; log:\n{}", node.log_text());
    }
    drop((a, b));
    let a = SyncEngine::open(&a_dir)?;
    let b = SyncEngine::open(&b_dir)?;
    assert_eq!(a.digest()?, b.digest()?, "the same versions on both");
    assert_eq!(a.versions(&shared)?, b.versions(&shared)?);
    for i in [0, n / 2, n - 1] {
        assert_eq!(b.get(&shared, &key(i))?.map(|r| r.value), Some(value(i)));
    }
    let acked_scope: Scope = "app/kill9/acked".parse()?;
    for (k, v) in &acked {
        for node in [&a, &b] {
            let got = node.get(&acked_scope, &Key::try_from(k.as_str())?)?;
            assert_eq!(got.map(|r| r.value), Some(v.clone().into_bytes()));
        }
    }
    Ok(())
}
