//! Three `highwater serve` processes on one PostgreSQL schema and one blob directory act as
//! one hub (docs/scale.md): devices attached to different processes write, delete,
//! conflict and share a file, and converge to the last-write-wins outcome; one process is
//! killed with SIGKILL in the middle of a device's sync, which then finishes through another
//! and loses nothing; a write through process 1 is news to a watcher on process 3. Skips
//! (with a note) without `HIGHWATER_PG_URL`.

mod common;
#[path = "common/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{bulk_key, write_bulk, Schema, URL_VAR};
use highwater::http::HttpTransport;
use highwater::{ExchangeOptions, Hlc, Key, Scope, SyncEngine, Transport};
use process::{ServeProcess, TestResult};

/// A write: its version, and its value (`None`: a delete).
type Write = (Hlc, Option<Vec<u8>>);

/// What was written, per record: the winning write so far (the last-write-wins oracle).
#[derive(Default)]
struct Oracle(BTreeMap<(Scope, Key), Write>);

impl Oracle {
    fn saw(&mut self, scope: &Scope, key: &Key, hlc: Hlc, value: Option<&[u8]>) {
        let entry = self
            .0
            .entry((scope.clone(), key.clone()))
            .or_insert((hlc, value.map(<[u8]>::to_vec)));
        if hlc > entry.0 {
            *entry = (hlc, value.map(<[u8]>::to_vec));
        }
    }

    fn put(&mut self, node: &SyncEngine, scope: &Scope, key: &str, value: &str) -> TestResult {
        let key = Key::try_from(key)?;
        let hlc = node.put(scope, &key, value)?;
        self.saw(scope, &key, hlc, Some(value.as_bytes()));
        Ok(())
    }

    fn delete(&mut self, node: &SyncEngine, scope: &Scope, key: &str) -> TestResult {
        let key = Key::try_from(key)?;
        let hlc = node.delete(scope, &key)?;
        self.saw(scope, &key, hlc, None);
        Ok(())
    }

    /// `node` holds exactly the oracle's live records, at the winning versions.
    fn check(&self, name: &str, node: &SyncEngine) -> TestResult {
        for ((scope, key), (hlc, value)) in &self.0 {
            let got = node.get(scope, key)?;
            assert_eq!(
                got.as_ref().map(|r| &r.value),
                value.as_ref(),
                "{name}: {scope}/{key:?}"
            );
            if let Some(record) = got {
                assert_eq!(record.hlc, *hlc, "{name}: {scope}/{key:?}");
            }
        }
        Ok(())
    }
}

/// Starts hub process `name` on the schema and the shared blob directory.
fn hub(
    dir: &Path,
    name: &str,
    url: &str,
    schema: &Schema,
    blobs: &Path,
) -> TestResult<ServeProcess> {
    ServeProcess::start(
        &dir.join(name),
        &[
            "--store",
            url,
            "--store-schema",
            schema.name(),
            "--blobs",
            process::arg(blobs),
            "--interval",
            "1h",
            "--purge-interval",
            "off",
            "--audit-interval",
            "off",
        ],
    )
}

/// Rounds from `device` over `to` until nothing is left either way.
async fn sync(device: &SyncEngine, to: &HttpTransport, options: &ExchangeOptions) -> TestResult {
    for _ in 0..10_000 {
        if !device.exchange_with(to, options).await?.has_more {
            return Ok(());
        }
    }
    Err("still has_more after 10 000 rounds".into())
}

fn scope(name: &str) -> Scope {
    Scope::app("hub", name).expect("a valid scope")
}

/// The synchronous PostgreSQL client of the test's own checks runs its own runtime, so the
/// test drives the devices' async rounds with `rt.block_on` from plain code.
#[test]
fn three_hub_processes_on_one_database_act_as_one_hub() -> TestResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let Some(schema) = Schema::fresh("three_hub_processes_on_one_database_act_as_one_hub")? else {
        return Ok(());
    };
    let url = std::env::var(URL_VAR)?;
    let dir = tempfile::tempdir()?;
    let blobs = dir.path().join("shared-blobs");
    let p1 = hub(dir.path(), "p1", &url, &schema, &blobs)?;
    let mut p2 = hub(dir.path(), "p2", &url, &schema, &blobs)?;
    let p3 = hub(dir.path(), "p3", &url, &schema, &blobs)?;
    let link = |p: &ServeProcess| HttpTransport::new(&p.url, None);
    let (to1, to2, to3) = (link(&p1)?, link(&p2)?, link(&p3)?);

    // Devices a (on process 1), b (on 2) and c (on 3).
    let a = Arc::new(SyncEngine::in_memory()?);
    let b = Arc::new(SyncEngine::in_memory()?);
    let c = Arc::new(SyncEngine::in_memory()?);
    let options = ExchangeOptions::default();
    let (notes, files) = (scope("notes"), scope("files"));
    let mut oracle = Oracle::default();
    for i in 0..40 {
        oracle.put(&a, &notes, &format!("a{i}"), &format!("from a {i}"))?;
        oracle.put(&b, &notes, &format!("b{i}"), &format!("from b {i}"))?;
    }
    oracle.put(&c, &notes, "c0", "from c")?;
    // Conflicts: the same keys written on every device; the latest write wins everywhere.
    for k in ["both0", "both1", "both2"] {
        oracle.put(&a, &notes, k, "a's take")?;
        oracle.put(&b, &notes, k, "b's take")?;
        oracle.put(&c, &notes, k, "c's take")?;
    }
    let content = b"a file put on device a, read on device c through another process".repeat(500);
    let file = a.put_file_bytes(&files, &Key::try_from("doc")?, "a document", &content)?;
    oracle.saw(&files, &Key::try_from("doc")?, file, Some(b"a document"));

    rt.block_on(sync(&a, &to1, &options))?;
    rt.block_on(sync(&b, &to2, &options))?;
    rt.block_on(sync(&c, &to3, &options))?;
    // Deletes after the first sync, through other processes than the writers'.
    oracle.delete(&c, &notes, "a3")?;
    oracle.delete(&b, &notes, "c0")?;
    rt.block_on(sync(&c, &to3, &options))?;
    rt.block_on(sync(&b, &to2, &options))?;

    // A write through process 1 is news to a watcher on process 3 (c, which did not make it).
    let first = rt.block_on(to3.watch(None, Some(c.node_id()), Duration::ZERO))?;
    oracle.put(&a, &notes, "watched", "news across processes")?;
    let written = Instant::now();
    rt.block_on(sync(&a, &to1, &options))?;
    let reply = rt.block_on(to3.watch(
        Some(first.token),
        Some(c.node_id()),
        Duration::from_secs(20),
    ))?;
    assert!(
        reply.news,
        "no news on process 3 of a write through process 1"
    );
    eprintln!(
        "news on process 3 {:?} after the write through process 1",
        written.elapsed()
    );

    // Device d pushes 20 000 records in pages of 200 through process 2, which is killed
    // partway; d goes on through process 3 (as a load balancer would send it).
    let bulk = scope("bulk");
    let d = Arc::new(SyncEngine::in_memory()?);
    const BULK: usize = 20_000;
    let hlcs = write_bulk(&d, &bulk, BULK, |i| format!("bulk {i}"))?;
    for (i, hlc) in hlcs.into_iter().enumerate() {
        oracle.saw(
            &bulk,
            &bulk_key(i),
            hlc,
            Some(format!("bulk {i}").as_bytes()),
        );
    }
    let small = ExchangeOptions {
        page_limit: Some(200),
        ..ExchangeOptions::default()
    };
    let pushing = {
        let (d, to2, small) = (d.clone(), link(&p2)?, small.clone());
        rt.spawn(async move {
            let mut rounds = 0usize;
            loop {
                match d.exchange_with(&to2, &small).await {
                    Ok(out) if !out.has_more => return Ok::<_, String>((rounds, false)),
                    Ok(_) => rounds += 1,
                    Err(e) => {
                        eprintln!("d's round through process 2 failed after {rounds}: {e}");
                        return Ok((rounds, true));
                    }
                }
            }
        })
    };
    let mut db = schema.client()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held = schema.keys_held(&mut db, &bulk)?;
        if held >= (BULK / 5) as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process 2 took only {held} records in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    p2.kill9()?;
    let (rounds, cut) = rt.block_on(pushing)??;
    assert!(
        cut,
        "d finished all {rounds} rounds before process 2 was killed"
    );
    rt.block_on(sync(&d, &to3, &small))?;

    // Everyone converges through whichever process it is attached to.
    for _ in 0..2 {
        rt.block_on(sync(&a, &to1, &options))?;
        rt.block_on(sync(&b, &to3, &options))?;
        rt.block_on(sync(&c, &to3, &options))?;
        rt.block_on(sync(&d, &to1, &options))?;
    }
    for (name, device) in [("a", &a), ("b", &b), ("c", &c), ("d", &d)] {
        oracle.check(name, device)?;
        for s in [&notes, &files, &bulk] {
            assert_eq!(device.versions(s)?, a.versions(s)?, "{name}: scope {s}");
        }
    }
    assert_eq!(
        b.versions(&bulk)?.len(),
        BULK,
        "b lacks some of d's records"
    );
    // The file, uploaded through process 1, read on c through process 3.
    let (_, mut reader) = c
        .open_file(&files, &Key::try_from("doc")?)?
        .ok_or("c has no file")?;
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut got)?;
    assert_eq!(got, content);

    // The status and the metrics of a process read the shared store; SIGTERM stops each
    // cleanly (its final flush runs off the runtime's threads).
    let status: serde_json::Value =
        serde_json::from_slice(&process::ok(&["status", "--json", "--node", &p3.url])?)?;
    assert_eq!(
        status["scopes"][bulk.as_str()]["residency"]["resident"].as_u64(),
        Some(BULK as u64),
        "{status:#}"
    );
    for mut p in [p1, p3] {
        let exit = p.terminate(Duration::from_secs(30))?;
        assert!(exit.success(), "exit {exit}; log:\n{}", p.log_text());
    }
    Ok(())
}

/// `serve --store` with a URL that names no store this build can use, or a database that
/// cannot be reached, fails at start with a message naming it (without its password), and
/// `--blobs` without `--store` is refused. These need no database.
#[test]
fn serve_refuses_stores_it_cannot_use_with_a_clear_message() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("node");
    let cases: [(&[&str], &str); 3] = [
        (
            &["--store", "mysql://hub:secret@db/x"],
            "only postgres:// (or postgresql://) URLs name a store",
        ),
        (
            // Port 1 on loopback: nothing listens there.
            &["--store", "postgres://hub:secret@127.0.0.1:1/x"],
            "cannot open the store at postgres://hub:…@127.0.0.1:1/x",
        ),
        (&["--blobs", "/tmp/elsewhere"], "--store"),
    ];
    for (args, expected) in cases {
        let mut all = vec![
            "serve",
            "--data",
            process::arg(&data),
            "--listen",
            "127.0.0.1:0",
        ];
        all.extend_from_slice(args);
        let out = process::run(&all)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("secret"),
            "{args:?} printed the password: {stderr}"
        );
    }
    Ok(())
}
