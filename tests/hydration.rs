//! The hydration plan (issue 18, items 1 and 2), on tokio's paused clock: a hub holds
//! 100 000 records in four background scopes and 100 in a boot scope; a fresh device pulls
//! the boot scope first, and `Scheduler::ready()` resolves after it alone; the background
//! scopes follow without holding it up, each scope's state moves `not_started` ->
//! (`hydrating`) -> `ready`, is in the status document, and survives a restart. Reads of a
//! background scope go to the hub while it hydrates (item 3), and stay on the device once
//! it is ready.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use highwater::api::{all_scopes, ListQuery, Lookup, NodeApi, Source};
use highwater::notify::{Event, Notice, SyncEvent};
use highwater::store::MemStore;
use highwater::{
    EngineConfig, Hydration, InProcess, Key, Op, Scheduler, SchedulerConfig, Scope, SyncEngine,
};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const PATIENCE: Duration = Duration::from_secs(24 * 3600);
const BACKGROUND: usize = 100_000;
const BOOT: usize = 100;

fn boot() -> Scope {
    Scope::app("notes", "settings").expect("a valid scope")
}

fn background() -> Vec<Scope> {
    (0..4)
        .map(|i| Scope::app("notes", &format!("items{i}")).expect("a valid scope"))
        .collect()
}

fn fill(node: &SyncEngine, scope: &Scope, n: usize) -> TestResult {
    let keys: Vec<usize> = (0..n).collect();
    for chunk in keys.chunks(5_000) {
        node.write_batch(chunk.iter().map(|i| {
            (
                scope.clone(),
                Key::try_from(format!("k{i:06}").as_str()).expect("a valid key"),
                Op::Put {
                    value: format!("value {i}").into_bytes(),
                    blob: None,
                },
            )
        }))?;
    }
    Ok(())
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        watch: false,
        audit_interval: None,
        jitter_seed: Some(5),
        boot_scopes: [boot()].into(),
        ..SchedulerConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn ready_resolves_after_the_boot_scope_alone_and_the_background_follows() -> TestResult {
    let started = Instant::now();
    let hub = Arc::new(SyncEngine::in_memory()?);
    for scope in background() {
        fill(&hub, &scope, BACKGROUND / 4)?;
    }
    fill(&hub, &boot(), BOOT)?;
    println!("hub filled in {:?}", started.elapsed());

    let store = Arc::new(MemStore::new());
    let device = Arc::new(SyncEngine::with_store(
        Box::new(store.clone()),
        EngineConfig::default(),
    )?);
    assert_eq!(device.hydration(&boot())?, Hydration::NotStarted);
    let mut events = device.notifier().subscribe();
    let scheduler = Scheduler::start(device.clone(), config());
    assert!(!scheduler.is_ready());
    scheduler.add_peer("hub", Arc::new(InProcess::new(hub.clone())))?;
    tokio::time::timeout(PATIENCE, scheduler.ready()).await?;

    // Versions pulled before the boot scope was ready: the boot scope's alone.
    let mut pulled = 0;
    let mut states: BTreeMap<Scope, Vec<Hydration>> = BTreeMap::new();
    loop {
        match events.try_recv() {
            Some(Notice::Event(Event::Sync(SyncEvent::Applied { received, .. }))) => {
                pulled += received
            }
            Some(Notice::Event(Event::Sync(SyncEvent::HydrationChanged { scope, state }))) => {
                states.entry(scope.clone()).or_default().push(state);
                if scope == boot() && state == Hydration::Ready {
                    break;
                }
            }
            Some(_) => {}
            None => return Err("ready() resolved before the boot scope was ready".into()),
        }
    }
    println!("pulled {pulled} versions before ready()");
    assert_eq!(pulled, BOOT, "ready() waited for the boot scope alone");
    assert_eq!(states.get(&boot()), Some(&vec![Hydration::Ready]));

    // The background follows; each of its scopes ends ready.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while background()
        .iter()
        .any(|s| states.get(s).and_then(|v| v.last()) != Some(&Hydration::Ready))
    {
        let notice = tokio::time::timeout_at(deadline, events.recv()).await?;
        match notice.ok_or("the notifier closed")? {
            Notice::Event(Event::Sync(SyncEvent::Applied { received, .. })) => pulled += received,
            Notice::Event(Event::Sync(SyncEvent::HydrationChanged { scope, state })) => {
                states.entry(scope).or_default().push(state);
            }
            Notice::Missed(n) => return Err(format!("missed {n} events").into()),
            _ => {}
        }
    }
    assert_eq!(pulled, BOOT + BACKGROUND);
    assert_eq!(device.digest()?, hub.digest()?);
    let first = &background()[0];
    assert_eq!(
        states.get(first),
        Some(&vec![Hydration::Hydrating, Hydration::Ready]),
        "the first background scope was pulled over many rounds"
    );
    let status = NodeApi::status(&*device, all_scopes()).await?;
    for (scope, s) in &status.scopes {
        assert_eq!(s.hydration, Hydration::Ready, "{scope}");
    }
    assert_eq!(
        status.to_json()["scopes"]["app/notes/settings"]["hydration"],
        "ready"
    );
    scheduler.shutdown().await?;
    drop(device);

    // After a restart the boot scope is still ready: ready() resolves at once.
    let device = Arc::new(SyncEngine::with_store(
        Box::new(store.clone()),
        EngineConfig::default(),
    )?);
    let scheduler = Scheduler::start(device.clone(), config());
    assert!(scheduler.is_ready());
    tokio::time::timeout(Duration::from_millis(1), scheduler.ready()).await?;
    scheduler.shutdown().await?;
    println!("whole test in {:?}", started.elapsed());
    Ok(())
}

fn value_of(lookup: Lookup) -> Option<Vec<u8>> {
    lookup.found().map(|r| r.value)
}

#[tokio::test(start_paused = true)]
async fn reads_go_to_the_hub_while_a_scope_hydrates_and_stay_here_once_ready() -> TestResult {
    let hub = Arc::new(SyncEngine::in_memory()?);
    for scope in background() {
        fill(&hub, &scope, BACKGROUND / 4)?;
    }
    fill(&hub, &boot(), BOOT)?;
    let device = Arc::new(SyncEngine::in_memory()?);
    let mut events = device.notifier().subscribe();
    let scheduler = Scheduler::start(device.clone(), config());
    scheduler.add_peer("hub", Arc::new(InProcess::new(hub.clone())))?;
    tokio::time::timeout(PATIENCE, scheduler.ready()).await?;
    // Hold the background where it is (a round in flight may finish: at most one page of
    // the 100 000 versions).
    scheduler.pause();

    // The last key written to the last background scope is pulled last: not here yet.
    let last = background().pop().ok_or("no background scope")?;
    let key = Key::try_from("k024999")?;
    assert_ne!(device.hydration(&last)?, Hydration::Ready);
    assert_eq!(device.get(&last, &key)?, None);
    let hub_source = Source::Remote {
        peer: "hub".to_owned(),
    };
    let read = scheduler.get_routed(last.clone(), key.clone()).await?;
    assert_eq!(
        read.source, hub_source,
        "a background key while it hydrates"
    );
    assert_ne!(read.hydration, Hydration::Ready);
    assert_eq!(value_of(read.value), Some(b"value 24999".to_vec()));
    // The engine's own records API answers the same while this scheduler runs.
    let read = NodeApi::get_routed(&*device, last.clone(), key.clone()).await?;
    assert_eq!(read.source, hub_source);
    let page = scheduler
        .list_routed(
            last.clone(),
            ListQuery {
                prefix: b"k0249".to_vec(),
                limit: 1000,
                ..ListQuery::default()
            },
        )
        .await?;
    assert_eq!(page.source, hub_source);
    assert_eq!(
        page.value.records.len(),
        100,
        "k024900 to k024999, from the hub"
    );
    assert_eq!(page.value.next_after, None);

    // A write here that the hub has not received wins where it is newer (read your writes).
    device.put(&last, &key, b"edited on the device".to_vec())?;
    let read = scheduler.get_routed(last.clone(), key.clone()).await?;
    assert_eq!(read.source, Source::Local);
    assert_eq!(value_of(read.value), Some(b"edited on the device".to_vec()));
    let page = scheduler
        .list_routed(
            last.clone(),
            ListQuery {
                prefix: b"k0249".to_vec(),
                after: Some(Key::try_from("k024997")?),
                limit: 10,
            },
        )
        .await?;
    let values: Vec<Option<String>> = page.value.records.into_iter().map(|r| r.value).collect();
    assert_eq!(
        values,
        [
            Some("value 24998".to_owned()),
            Some("edited on the device".to_owned())
        ]
    );

    // The boot scope is ready: its reads are this node's.
    let read = scheduler
        .get_routed(boot(), Key::try_from("k000042")?)
        .await?;
    assert_eq!(
        (read.source, read.hydration),
        (Source::Local, Hydration::Ready)
    );
    assert_eq!(value_of(read.value), Some(b"value 42".to_vec()));

    // Once the background scope is ready, its reads are this node's too.
    scheduler.resume();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let notice = tokio::time::timeout_at(deadline, events.recv()).await?;
        if let Notice::Event(Event::Sync(SyncEvent::HydrationChanged { scope, state })) =
            notice.ok_or("the notifier closed")?
        {
            if scope == last && state == Hydration::Ready {
                break;
            }
        }
    }
    let read = scheduler.get_routed(last.clone(), key.clone()).await?;
    assert_eq!(
        (read.source, read.hydration),
        (Source::Local, Hydration::Ready)
    );
    assert_eq!(value_of(read.value), Some(b"edited on the device".to_vec()));
    let read = scheduler
        .get_routed(last.clone(), Key::try_from("k024998")?)
        .await?;
    assert_eq!(read.source, Source::Local);
    assert_eq!(value_of(read.value), Some(b"value 24998".to_vec()));
    scheduler.shutdown().await?;
    Ok(())
}
