//! Write-to-visible latency through a hub, in-process: a write on device A becomes readable
//! on device C. A pushes to the hub right after each write (as its scheduler does soon after
//! a local change); C waits on the hub's watch and pulls as soon as it reports news. The
//! latency runs from A's `put` to C's `remote-update-available` event for the key, and C's
//! copy is then read back and checked. All three are redb nodes, so every step commits
//! durably (A's write, the hub's apply of A's last page, C's apply).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use highwater::notify::{ChangeKind, Event, Notice, Subscription};
use highwater::{InProcess, Key, SyncEngine, Transport};

use crate::fixture::{pull, scope, Fixture};
use crate::measure::Summary;
use crate::records;
use crate::report::{Bound, Row, Unit};
use crate::Result;

/// The target for the p99 (stated for HTTP; in-process is its lower bound).
const TARGET_P99_SECS: f64 = 0.020;

/// How long one write may take to become visible before the case fails.
const TIMEOUT: Duration = Duration::from_secs(5);

/// How long C's watch waits before asking again (it also bounds the shutdown).
const WATCH_WAIT: Duration = Duration::from_millis(100);

pub fn run(fx: &mut Fixture) -> Result {
    let writes = fx.sizes.visible_writes;
    let hub = Arc::new(SyncEngine::open(fx.fresh_dir("visible-hub"))?);
    let a = SyncEngine::open(fx.fresh_dir("visible-a"))?;
    let c = Arc::new(SyncEngine::open(fx.fresh_dir("visible-c"))?);
    let scope = scope();
    let to_hub = InProcess::new(hub.clone());
    // First contact both ways, so that later rounds ship at once.
    a.put(&scope, &Key::new("seed")?, b"seed".to_vec())?;
    pull(&a, &to_hub)?;
    pull(&c, &InProcess::new(hub.clone()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (c, hub, stop) = (c.clone(), hub.clone(), stop.clone());
        std::thread::spawn(move || watch_and_pull(&c, hub, &stop))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let mut events = c.notifier().subscribe();
    let mut latencies = Vec::with_capacity(writes);
    let measured = (|| -> Result<()> {
        for i in 0..writes as u64 {
            let key = Key::new(format!("visible-{i:06}"))?;
            let value = records::value(i, 0).to_vec();
            let started = Instant::now();
            a.put(&scope, &key, value.clone())?;
            rt.block_on(a.exchange(&to_hub))?;
            rt.block_on(async { tokio::time::timeout(TIMEOUT, seen(&mut events, &key)).await })
                .map_err(|_| format!("write {i} not visible on C after {TIMEOUT:?}"))??;
            latencies.push(started.elapsed().as_secs_f64());
            if c.get(&scope, &key)?.map(|r| r.value) != Some(value) {
                return Err(format!("C announced write {i} but does not hold it").into());
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let rounds = watcher.join().map_err(|_| "the watcher panicked")??;
    measured?;
    let case = format!("write-to-visible, in-process, A -> hub -> C (watch), {writes} writes");
    let p = |q| Summary::one(Summary::quantile(&latencies, q));
    Ok(vec![
        Row::new(&case, "p50", Unit::Millis, p(0.5)),
        Row::new(&case, "p99", Unit::Millis, p(0.99)).target(Bound::AtMost(TARGET_P99_SECS)),
        Row::new(&case, "max", Unit::Millis, p(1.0)),
        Row::new(
            &case,
            "C's rounds",
            Unit::Count,
            Summary::one(rounds as f64),
        ),
    ])
}

/// Waits for C's `remote-update-available` event naming `key`.
async fn seen(events: &mut Subscription, key: &Key) -> Result<()> {
    loop {
        match events.recv().await {
            Some(Notice::Event(Event::Change(ch)))
                if ch.kind == ChangeKind::RemoteUpdateAvailable && ch.keys.contains(key) =>
            {
                return Ok(())
            }
            Some(Notice::Missed(n)) => return Err(format!("missed {n} events on C").into()),
            Some(_) => {}
            None => return Err("C's notifier is gone".into()),
        }
    }
}

/// C's side: watch the hub, pull whenever it has news, until `stop`. Returns C's rounds.
fn watch_and_pull(
    c: &SyncEngine,
    hub: Arc<SyncEngine>,
    stop: &AtomicBool,
) -> std::result::Result<usize, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let link = InProcess::new(hub);
        let (mut token, mut rounds) = (None, 0);
        while !stop.load(Ordering::Relaxed) {
            let reply = link
                .watch(token.take(), Some(c.node_id()), WATCH_WAIT)
                .await
                .map_err(|e| e.to_string())?;
            token = Some(reply.token);
            if reply.news {
                loop {
                    let out = c.exchange(&link).await.map_err(|e| e.to_string())?;
                    rounds += 1;
                    if !out.has_more {
                        break;
                    }
                }
            }
        }
        Ok(rounds)
    })
}
