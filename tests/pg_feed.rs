//! The PostgreSQL change feed: processes sharing one store hear of each other's commits
//! (docs/scale.md). Two store handles on one schema stand for two hub processes. Skips (with
//! a note) without `HIGHWATER_PG_URL`.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::pg::Schema;
use common::rounds::{config, link, mem_node, sync, TestResult};
use highwater::store::{Change, FeedOptions, PgStore};
use highwater::{Key, ManualTime, Scope, SyncEngine};

const T0: u32 = 1_700_000_000;

/// Long enough for any loaded machine; a feed that works answers in milliseconds.
const WAIT: Duration = Duration::from_secs(20);

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

fn scope(name: &str) -> Scope {
    Scope::app("feed", name).expect("a valid scope")
}

/// A feed on `store` whose news arrive on the returned channel.
fn feed(
    store: &PgStore,
    options: FeedOptions,
) -> TestResult<(highwater::store::ChangeFeed, mpsc::Receiver<Vec<Change>>)> {
    let (tx, rx) = mpsc::channel();
    let feed = store.watch_changes(options, move |changes| {
        let _ = tx.send(changes);
    })?;
    Ok((feed, rx))
}

/// The next news, or a failure after [`WAIT`].
fn next(rx: &mpsc::Receiver<Vec<Change>>) -> TestResult<Vec<Change>> {
    Ok(rx.recv_timeout(WAIT)?)
}

/// Hub process 1 and hub process 3 on one schema: a write through 1 is news on 3, with no
/// cause (a local write); 3's own writes are not news to it; a page a device pushes through
/// 1 is news on 3 caused by that device. Both with LISTEN and by polling alone.
fn writes_through_one_process_are_news_on_another(options: FeedOptions) -> TestResult {
    let Some(schema) = Schema::fresh("writes_through_one_process_are_news_on_another")? else {
        return Ok(());
    };
    let time = ManualTime::at_secs(T0);
    let one = SyncEngine::with_store(Box::new(schema.open()?), config(&time))?;
    let three_store = schema.open()?;
    let (_feed, news) = feed(&three_store, options)?;
    let three = SyncEngine::with_store(Box::new(three_store), config(&time))?;

    // The feed starts from the counter it finds: wait for it to connect by writing until
    // the first news (a write before it connected is not news, by design).
    let early = scope("early");
    let mut first = None;
    for i in 0..100 {
        one.put(&early, &key(&format!("k{i}")), "v")?;
        if let Ok(changes) = news.recv_timeout(Duration::from_millis(200)) {
            first = Some(changes);
            break;
        }
    }
    let first = first.ok_or("the feed never reported a write through the other process")?;
    assert!(
        first
            .iter()
            .all(|(s, cause)| *s == early && cause.is_none()),
        "{first:?}"
    );
    while news.try_recv().is_ok() {}

    // Own writes are not news; another process's are, after them, in order.
    let (own, theirs) = (scope("own"), scope("theirs"));
    three.put(&own, &key("a"), "by three")?;
    one.put(&theirs, &key("b"), "by one")?;
    let got = next(&news)?;
    assert_eq!(
        got,
        vec![(theirs.clone(), None)],
        "three heard its own write or missed one's"
    );

    // A device's push through process one: news on three, caused by the device.
    let device = mem_node(&time)?;
    let pushed = scope("pushed");
    for i in 0..3 {
        device.put(&pushed, &key(&format!("d{i}")), "from the device")?;
    }
    let hub = Arc::new(one);
    sync(&device, &link(&hub))?;
    let got = next(&news)?;
    assert!(
        got.contains(&(pushed.clone(), Some(device.node_id()))),
        "the device's push was not news with its cause: {got:?}"
    );
    assert!(got.iter().all(|(s, _)| *s == pushed), "{got:?}");
    // The hub processes agree on what the device pushed.
    assert_eq!(three.versions(&pushed)?, hub.versions(&pushed)?);
    assert_eq!(three.versions(&pushed)?.len(), 3);
    Ok(())
}

#[test]
fn with_listen_writes_through_one_process_are_news_on_another() -> TestResult {
    writes_through_one_process_are_news_on_another(FeedOptions::default())
}

#[test]
fn by_polling_alone_writes_through_one_process_are_news_on_another() -> TestResult {
    writes_through_one_process_are_news_on_another(FeedOptions {
        listen: false,
        poll: Duration::from_millis(50),
        ..FeedOptions::default()
    })
}

/// A schema of version 1 (no change feed) is migrated to version 2 when opened, keeping its
/// data, and its feed then works.
#[test]
fn a_version_1_schema_gains_the_change_feed() -> TestResult {
    let Some(schema) = Schema::fresh("a_version_1_schema_gains_the_change_feed")? else {
        return Ok(());
    };
    let time = ManualTime::at_secs(T0);
    let s = scope("kept");
    {
        let node = SyncEngine::with_store(Box::new(schema.open()?), config(&time))?;
        node.put(&s, &key("k"), "kept across the migration")?;
    }
    // Back to version 1, as a build before the feed left it.
    schema.client()?.batch_execute(
        "DROP TABLE highwater_changes;
         DELETE FROM highwater_meta WHERE name = 'changes';
         UPDATE highwater_meta SET num = 1 WHERE name = 'schema_version';",
    )?;
    let one = SyncEngine::with_store(Box::new(schema.open()?), config(&time))?;
    let version: i64 = schema
        .client()?
        .query_one(
            "SELECT num FROM highwater_meta WHERE name = 'schema_version'",
            &[],
        )?
        .get(0);
    assert_eq!(version, i64::from(highwater::store::PG_SCHEMA_VERSION));
    assert_eq!(
        one.get(&s, &key("k"))?.map(|r| r.value),
        Some(b"kept across the migration".to_vec())
    );
    let other = schema.open()?;
    let (_feed, news) = feed(
        &other,
        FeedOptions {
            listen: false,
            poll: Duration::from_millis(20),
            ..FeedOptions::default()
        },
    )?;
    let fresh = scope("fresh");
    for i in 0..100 {
        one.put(&fresh, &key(&format!("k{i}")), "v")?;
        if let Ok(changes) = news.recv_timeout(Duration::from_millis(200)) {
            assert!(changes.iter().all(|(c, _)| *c == fresh), "{changes:?}");
            return Ok(());
        }
    }
    Err("the migrated schema's feed never reported a write".into())
}
