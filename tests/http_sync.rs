//! Two nodes sync over real HTTP on loopback, both ways, records and files; the same
//! scenario over the in-process transport ends in the identical state.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use highwater::http::{serve, HttpTransport, ServerConfig};
use highwater::{InProcess, Key, Scope, SyncEngine, Transport};
use tokio::sync::oneshot;

struct Node {
    engine: Arc<SyncEngine>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(SyncEngine::open(dir.path()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            engine.clone(),
            listener,
            ServerConfig::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        Node {
            engine,
            addr,
            stop: Some(stop),
            task: Some(tokio::spawn(async move {
                task.await.unwrap().unwrap();
            })),
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

/// Writes the scenario's first half on `a` and `b` (offline from each other).
fn write_scenario(a: &SyncEngine, b: &SyncEngine) {
    let notes = Scope::app("notes", "items").unwrap();
    let shared = Scope::shared();
    for i in 0..300 {
        a.put(
            &notes,
            &Key::try_from(format!("a{i:04}").as_str()).unwrap(),
            vec![i as u8; 40],
        )
        .unwrap();
    }
    for i in 0..200 {
        b.put(
            &shared,
            &Key::try_from(format!("b{i:04}").as_str()).unwrap(),
            vec![7; 10],
        )
        .unwrap();
    }
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    a.put_file_bytes(
        &notes,
        &Key::try_from("photo").unwrap(),
        b"meta".to_vec(),
        &big,
    )
    .unwrap();
    b.put_file_bytes(
        &shared,
        &Key::try_from("doc").unwrap(),
        Vec::new(),
        b"small file",
    )
    .unwrap();
    // A conflict: both write the same key; b writes last and wins.
    a.put(
        &shared,
        &Key::try_from("conflict").unwrap(),
        b"from a".to_vec(),
    )
    .unwrap();
    b.put(
        &shared,
        &Key::try_from("conflict").unwrap(),
        b"from b".to_vec(),
    )
    .unwrap();
    a.delete(&notes, &Key::try_from("a0001").unwrap()).unwrap();
}

async fn converge<T: Transport>(a: &SyncEngine, to_b: &T) -> usize {
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100, "no convergence after 100 rounds");
        let out = a.exchange(to_b).await.unwrap();
        if !out.has_more {
            return rounds;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sync_both_ways_over_http_like_in_process() {
    // Over HTTP: a initiates against b's server.
    let a_dir = tempfile::tempdir().unwrap();
    let a = Arc::new(SyncEngine::open(a_dir.path()).unwrap());
    let b = Node::start().await;
    write_scenario(&a, &b.engine);
    let to_b = HttpTransport::new(&b.url(), None).unwrap();
    // Small pages so the sync takes several (streamed both ways, in a few rounds).
    let opts = highwater::ExchangeOptions {
        page_limit: Some(64),
        ..Default::default()
    };
    let (mut rounds, mut moved) = (0, 0);
    loop {
        let out = a.exchange_with(&to_b, &opts).await.unwrap();
        moved += out.shipped + out.received;
        if !out.has_more {
            break;
        }
        rounds += 1;
        assert!(rounds < 100);
    }
    assert!(
        moved > 3 * 64,
        "expected several pages, moved {moved} versions"
    );
    converge(&a, &to_b).await;
    assert_eq!(a.digest().unwrap(), b.engine.digest().unwrap());
    assert_eq!(a.watermarks().unwrap(), b.engine.watermarks().unwrap());
    let photo = Key::try_from("photo").unwrap();
    let notes = Scope::app("notes", "items").unwrap();
    let mut bytes = Vec::new();
    b.engine
        .open_file(&notes, &photo)
        .unwrap()
        .expect("photo arrived")
        .1
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(bytes.len(), 3_000_000);
    assert_eq!(
        a.get(&Scope::shared(), &Key::try_from("conflict").unwrap())
            .unwrap()
            .unwrap()
            .value,
        b"from b"
    );
    assert_eq!(
        a.residency(&Scope::shared(), &Key::try_from("doc").unwrap())
            .unwrap(),
        highwater::Residency::Resident
    );

    // The same scenario in process ends in the identical state (same records, same HLCs
    // aside, the same digests of content: compare per-key values and tombstones).
    let c = SyncEngine::in_memory().unwrap();
    let d = Arc::new(SyncEngine::in_memory().unwrap());
    write_scenario(&c, &d);
    converge(&c, &InProcess::new(d.clone())).await;
    assert_eq!(c.digest().unwrap(), d.digest().unwrap());
    assert_eq!(
        content(&a),
        content(&c),
        "HTTP and in-process end in the same content"
    );
    b.stop().await;
}

/// (scope, key, value or file hash, tombstone)
type Row = (String, Vec<u8>, Option<Vec<u8>>, bool);

/// The live content of every scope, without timestamps (two runs of a scenario issue
/// different HLCs), so two runs can be compared.
fn content(e: &SyncEngine) -> Vec<Row> {
    let mut out = Vec::new();
    for scope in e.scopes().unwrap() {
        for (key, v) in e.versions(&scope).unwrap() {
            let (value, file) = match &v.op {
                highwater::Op::Put { value, blob } => (
                    Some(value.clone()),
                    blob.map(|b| b.hash.to_string().into_bytes()),
                ),
                highwater::Op::Delete => (None, None),
            };
            out.push((
                scope.to_string(),
                key.as_bytes().to_vec(),
                value.or(file),
                v.is_tombstone(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_wakes_on_a_write_before_its_timeout() {
    let b = Node::start().await;
    let t = HttpTransport::new(&b.url(), None).unwrap();
    let first = t.watch(None, None, Duration::from_secs(5)).await.unwrap();
    assert!(first.news, "no token: news at once");
    let token = first.token.clone();
    let waiter = tokio::spawn(async move {
        let t = t;
        let started = tokio::time::Instant::now();
        let reply = t
            .watch(Some(token), None, Duration::from_secs(30))
            .await
            .unwrap();
        (reply, started.elapsed())
    });
    // The waiter may or may not be parked yet; either way the write must be news.
    b.engine
        .put(
            &Scope::shared(),
            &Key::try_from("k").unwrap(),
            b"v".to_vec(),
        )
        .unwrap();
    let (reply, waited) = waiter.await.unwrap();
    assert!(reply.news);
    assert!(
        waited < Duration::from_secs(30),
        "woke by news, not timeout"
    );
    assert_ne!(reply.token, first.token);
    b.stop().await;
}

/// A device's own push is no news to its own watch (it would only run one more round to
/// learn nothing), but a write another device pushes is, and so is the push to a watcher
/// that does not say who it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watchers_own_push_is_not_news_to_it() {
    let hub = Node::start().await;
    let (a, x) = (Node::start().await, Node::start().await);
    let to_hub = |n: &Node| HttpTransport::new(&hub.url(), None).map(|t| (n.engine.clone(), t));
    let (a_engine, a_link) = to_hub(&a).unwrap();
    let (x_engine, x_link) = to_hub(&x).unwrap();
    let watch = |since: &str, watcher: Option<highwater::NodeId>, ms: u64| {
        let t = HttpTransport::new(&hub.url(), None).unwrap();
        let since = since.to_owned();
        async move {
            t.watch(Some(since), watcher, Duration::from_millis(ms))
                .await
                .unwrap()
                .news
        }
    };
    let start = a_link
        .watch(None, Some(a_engine.node_id()), Duration::from_secs(1))
        .await
        .unwrap()
        .token;

    let k = Key::try_from("from-a").unwrap();
    a_engine.put(&Scope::shared(), &k, b"a".to_vec()).unwrap();
    while a_engine.exchange(&a_link).await.unwrap().has_more {}
    a_engine.exchange(&a_link).await.unwrap();
    assert_eq!(
        hub.engine
            .get(&Scope::shared(), &k)
            .unwrap()
            .map(|r| r.value),
        Some(b"a".to_vec()),
        "the push landed"
    );
    assert!(
        !watch(&start, Some(a_engine.node_id()), 300).await,
        "a's own push woke a's watch"
    );
    assert!(
        watch(&start, None, 30_000).await,
        "an anonymous watcher sees it"
    );
    assert!(
        watch(&start, Some(x_engine.node_id()), 30_000).await,
        "x sees a's push"
    );

    let k = Key::try_from("from-x").unwrap();
    x_engine.put(&Scope::shared(), &k, b"x".to_vec()).unwrap();
    while x_engine.exchange(&x_link).await.unwrap().has_more {}
    x_engine.exchange(&x_link).await.unwrap();
    assert!(
        watch(&start, Some(a_engine.node_id()), 30_000).await,
        "x's push is news to a"
    );
    for n in [hub, a, x] {
        n.stop().await;
    }
}
