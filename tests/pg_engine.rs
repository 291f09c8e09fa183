//! A `SyncEngine` on a PostgreSQL store syncs with one on redb: writes, deletes, conflicts
//! and a file on both sides converge both ways, an audit then finds nothing, and the
//! PostgreSQL node reopened from its schema keeps its id and clock and has nothing to do.
//! Skips (with a note) without `HIGHWATER_PG_URL`.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use common::pg::Schema;
use common::rounds::{config, link, sync, TestResult};
use futures_executor::block_on;
use highwater::{Key, ManualTime, Scope, SyncEngine};

const T0: u32 = 1_700_000_000;

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

/// Every scope's stored versions, and the marks, are the same on both.
fn same(a: &SyncEngine, b: &SyncEngine) -> TestResult {
    assert_eq!(a.scopes()?, b.scopes()?);
    for scope in a.scopes()? {
        assert_eq!(a.versions(&scope)?, b.versions(&scope)?, "scope {scope}");
    }
    assert_eq!(a.watermarks()?, b.watermarks()?);
    assert_eq!(a.digest()?, b.digest()?);
    Ok(())
}

fn file_of(node: &SyncEngine, k: &str) -> TestResult<Option<Vec<u8>>> {
    let Some((_, mut reader)) = node.open_file(&notes(), &key(k))? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    reader.read_to_end(&mut out)?;
    Ok(Some(out))
}

#[test]
fn a_postgres_node_and_a_redb_node_converge() -> TestResult {
    let Some(schema) = Schema::fresh("a_postgres_node_and_a_redb_node_converge")? else {
        return Ok(());
    };
    let time = ManualTime::at_secs(T0);
    let dir = tempfile::tempdir()?;
    let r = Arc::new(SyncEngine::open_with(dir.path(), config(&time))?);
    let p = Arc::new(SyncEngine::with_store(
        Box::new(schema.open()?),
        config(&time),
    )?);
    let (shared, s) = (Scope::shared(), notes());

    for i in 0..60 {
        p.put(&s, &key(&format!("p{i}")), format!("p{i}").into_bytes())?;
    }
    for i in 0..25 {
        r.put(&s, &key(&format!("r{i}")), format!("r{i}").into_bytes())?;
    }
    p.put(&shared, &key("both"), "from p")?;
    p.delete(&s, &key("p5"))?;
    p.put_file_bytes(
        &s,
        &key("doc"),
        "a file",
        b"file written on the PostgreSQL node",
    )?;
    time.advance(Duration::from_millis(5));
    // The later write wins on both, whichever side initiates.
    r.put(&shared, &key("both"), "from r")?;

    sync(&p, &link(&r))?;
    sync(&r, &link(&p))?;
    same(&p, &r)?;
    assert_eq!(
        r.get(&shared, &key("both"))?.map(|rec| rec.value),
        Some(b"from r".to_vec())
    );
    assert!(r.get(&s, &key("p5"))?.is_none(), "the delete travelled");
    assert_eq!(
        file_of(&r, "doc")?,
        Some(b"file written on the PostgreSQL node".to_vec())
    );

    // More changes from both, the redb node initiating.
    time.advance(Duration::from_millis(5));
    r.delete(&s, &key("p7"))?;
    p.put(&s, &key("r3"), "rewritten on p")?;
    p.put_file_bytes(&s, &key("doc"), "a file", b"second revision")?;
    sync(&r, &link(&p))?;
    sync(&p, &link(&r))?;
    same(&p, &r)?;
    assert_eq!(file_of(&r, "doc")?, Some(b"second revision".to_vec()));

    // The audits compare live contents (fingerprints from PostgreSQL): nothing to repair.
    let out = block_on(p.audit(&link(&r)))?;
    assert!(out.clean(), "{out:?}");
    let out = block_on(r.audit(&link(&p)))?;
    assert!(out.clean(), "{out:?}");

    // Reopened from its schema, the node is the same node with nothing to do.
    let id = p.node_id();
    let clock = p.clock_time();
    drop(p);
    let p = Arc::new(SyncEngine::with_store(
        Box::new(schema.open()?),
        config(&time),
    )?);
    assert_eq!(p.node_id(), id);
    assert!(p.clock_time() >= clock);
    let out = block_on(p.exchange(&link(&r)))?;
    assert_eq!((out.shipped, out.received, out.has_more), (0, 0, false));
    same(&p, &r)?;
    Ok(())
}

/// The PostgreSQL node's server connections are killed again and again while a device pushes
/// to it and it writes locally (as a database restart or a failover would cut them): rounds
/// and writes fail with an error, never a panic; once the connections are left alone the
/// pool reconnects, every write that was acknowledged on either side is on both, the two
/// hold the same versions and marks, and an audit finds nothing.
#[test]
fn killed_database_connections_fail_rounds_and_lose_nothing_acknowledged() -> TestResult {
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(schema) =
        Schema::fresh("killed_database_connections_fail_rounds_and_lose_nothing_acknowledged")?
    else {
        return Ok(());
    };
    let time = ManualTime::at_secs(T0);
    let p = Arc::new(SyncEngine::with_store(
        Box::new(schema.open_as(schema.name())?),
        config(&time),
    )?);
    let d = common::rounds::mem_node(&time)?;
    let s = notes();

    // Kills this store's connections (and only these: they carry the schema's name as
    // their application name) every few milliseconds until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (stop, mut client, name) = (stop.clone(), schema.client()?, schema.name().to_owned());
        std::thread::spawn(move || -> Result<u64, String> {
            let mut killed = 0;
            while !stop.load(Ordering::SeqCst) {
                let rows = client
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1",
                        &[&name],
                    )
                    .map_err(|e| e.to_string())?;
                killed += rows.len() as u64;
                std::thread::sleep(Duration::from_millis(3));
            }
            Ok(killed)
        })
    };

    let (mut acked_on_p, mut failures) = (Vec::new(), 0);
    for i in 0..150 {
        d.put(&s, &key(&format!("d{i}")), format!("d{i}").into_bytes())?;
        match p.put(&s, &key(&format!("p{i}")), format!("p{i}").into_bytes()) {
            Ok(_) => acked_on_p.push(format!("p{i}")),
            Err(_) => failures += 1,
        }
        if block_on(d.exchange(&link(&p))).is_err() {
            failures += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let killed = killer.join().map_err(|_| "the killer panicked")??;
    assert!(
        killed > 0 && failures > 0,
        "killed {killed}, failures {failures}"
    );

    // Left alone, the pool reconnects and both sides converge with nothing acknowledged lost.
    sync(&d, &link(&p))?;
    sync(&p, &link(&d))?;
    same(&p, &d)?;
    for i in 0..150 {
        assert!(p.get(&s, &key(&format!("d{i}")))?.is_some(), "d{i} on p");
    }
    for k in &acked_on_p {
        assert!(
            d.get(&s, &key(k))?.is_some(),
            "{k}, acknowledged on p, on d"
        );
    }
    assert!(block_on(d.audit(&link(&p)))?.clean());
    Ok(())
}

/// Two engines on one schema, as two hub processes on one database: they share one identity
/// and write at once, each with its own clock (the second's set back, as a process on a
/// machine whose clock is behind). No timestamp is committed twice, each key holds the
/// version its write returned, and the shared mark of the origin covers every write.
#[test]
fn two_writers_on_one_schema_never_commit_a_timestamp_twice() -> TestResult {
    let Some(schema) = Schema::fresh("two_writers_on_one_schema_never_commit_a_timestamp_twice")?
    else {
        return Ok(());
    };
    let ahead = ManualTime::at_secs(T0 + 10);
    let behind = ManualTime::at_secs(T0);
    let a = Arc::new(SyncEngine::with_store(
        Box::new(schema.open()?),
        config(&ahead),
    )?);
    let b = Arc::new(SyncEngine::with_store(
        Box::new(schema.open()?),
        config(&behind),
    )?);
    assert_eq!(a.node_id(), b.node_id(), "one store, one identity");
    let s = notes();
    const WRITES: usize = 150;
    let writer = |engine: Arc<SyncEngine>, name: &'static str, s: Scope| {
        std::thread::spawn(move || -> Result<Vec<(Key, highwater::Hlc)>, String> {
            (0..WRITES)
                .map(|i| {
                    let k = key(&format!("{name}{i}"));
                    engine
                        .put(&s, &k, format!("{name}{i}").into_bytes())
                        .map(|hlc| (k, hlc))
                        .map_err(|e| e.to_string())
                })
                .collect()
        })
    };
    let wa = writer(a.clone(), "a", s.clone());
    let wb = writer(b.clone(), "b", s.clone());
    let mut written = wa.join().expect("writer a")?;
    written.extend(wb.join().expect("writer b")?);

    let mut times: Vec<u64> = written.iter().map(|(_, h)| h.time()).collect();
    times.sort_unstable();
    times.dedup();
    assert_eq!(times.len(), 2 * WRITES, "a timestamp was issued twice");
    let versions = a.versions(&s)?;
    assert_eq!(versions.len(), 2 * WRITES);
    for (k, hlc) in &written {
        let stored = versions
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.hlc);
        assert_eq!(stored, Some(*hlc), "key {k:?}");
        assert_eq!(hlc.origin(), a.node_id());
    }
    let newest = written.iter().map(|(_, h)| *h).max();
    assert_eq!(a.watermarks()?.get(&s, a.node_id()), newest);
    // The writer whose clock is behind issued above everything the other committed: its
    // last write is after the other's first.
    let first_a = written[..WRITES].iter().map(|(_, h)| h.time()).min();
    let last_b = written[WRITES..].iter().map(|(_, h)| h.time()).max();
    assert!(
        last_b > first_a,
        "b's writes all came before a's: no interleaving to check"
    );
    Ok(())
}

/// A scheduler with boot scopes starts on a PostgreSQL node from inside a runtime (the
/// blocking client cannot run on a runtime's thread, so the start reads the scopes'
/// hydration off it), and finds a scope made ready before it ready at once.
#[test]
fn a_scheduler_with_boot_scopes_starts_on_a_postgres_node_in_a_runtime() -> TestResult {
    let Some(schema) = Schema::fresh("a_scheduler_with_boot_scopes_starts_on_a_postgres_node")?
    else {
        return Ok(());
    };
    let time = ManualTime::at_secs(T0);
    let p = Arc::new(SyncEngine::with_store(
        Box::new(schema.open()?),
        config(&time),
    )?);
    let (ready, waiting) = (notes(), Scope::app("notes", "drafts")?);
    p.set_hydration(&ready, highwater::Hydration::Ready)?;
    for flavor in ["current-thread", "multi-thread"] {
        let rt = match flavor {
            "current-thread" => tokio::runtime::Builder::new_current_thread(),
            _ => tokio::runtime::Builder::new_multi_thread(),
        }
        .enable_all()
        .build()?;
        let boot = |scopes: &[&Scope]| highwater::SchedulerConfig {
            boot_scopes: scopes.iter().map(|s| (*s).clone()).collect(),
            ..highwater::SchedulerConfig::default()
        };
        let (all_ready, one_waiting) = rt.block_on(async {
            let all = highwater::Scheduler::start(p.clone(), boot(&[&ready]));
            let one = highwater::Scheduler::start(p.clone(), boot(&[&ready, &waiting]));
            (all.is_ready(), one.is_ready())
        });
        assert!(all_ready, "{flavor}: the ready boot scope counts as ready");
        assert!(
            !one_waiting,
            "{flavor}: a boot scope never pulled is not ready"
        );
    }
    Ok(())
}
