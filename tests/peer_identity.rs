//! A peer whose identity changed (issue 18, item 6), on tokio's paused clock. The node at a
//! peer's address is swapped behind the device's back, as a hub replaced at the same URL:
//!
//! - a node that answers with another id than the one the device syncs with is refused:
//!   nothing the device holds reaches it (the request names the id it expects, and the
//!   other node applies and records nothing), `peer_refused` is published, and the refusal
//!   outlives a restart of the device (the expected id is noted in its store);
//! - once the operator accepts the new identity, the device re-attaches (`peer_changed`)
//!   and the new node gets everything; after a restart the new id is the expected one;
//! - a node restored from a backup with a fresh id vouches for its old id, and is accepted
//!   with no operator action.

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::rounds::{Node, TestResult};
use highwater::error::TransportError;
use highwater::notify::{Event, Notice, Subscription, SyncEvent};
use highwater::store::MemStore;
use highwater::wire::{ExchangeRequest, ExchangeResponse};
use highwater::{
    BlobRef, EngineConfig, Hash, InProcess, Key, NodeId, Scheduler, SchedulerConfig, Scope,
    SyncEngine, Transport,
};

const PATIENCE: Duration = Duration::from_secs(24 * 3600);
const HUB: &str = "http://hub.example:7447";

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

/// An address whose node can be replaced. Like the HTTP client, it learns the id of the
/// first node that answers and reports it until told to forget it.
struct Address {
    node: Mutex<Node>,
    learnt: Mutex<Option<NodeId>>,
}

impl Address {
    fn new(node: &Node) -> Arc<Address> {
        Arc::new(Address {
            node: Mutex::new(node.clone()),
            learnt: Mutex::new(None),
        })
    }

    fn replace(&self, node: &Node) {
        *self.node.lock().expect("not poisoned") = node.clone();
    }

    fn link(&self) -> InProcess<Node> {
        InProcess::new(self.node.lock().expect("not poisoned").clone())
    }
}

impl Transport for Address {
    fn peer_id(&self) -> Option<NodeId> {
        *self.learnt.lock().expect("not poisoned")
    }

    fn forget_peer(&self) {
        *self.learnt.lock().expect("not poisoned") = None;
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        let response = self.link().exchange(request).await?;
        self.learnt
            .lock()
            .expect("not poisoned")
            .get_or_insert(response.from);
        Ok(response)
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        self.link().blobs_present(hashes).await
    }

    fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn std::io::Write + Send),
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let link = self.link();
        async move { link.fetch_blob(blob, into).await }
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn std::io::Read + Send>,
    ) -> Result<(), TransportError> {
        self.link().push_blob(blob, content).await
    }
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        watch: false,
        audit_interval: None,
        jitter_seed: Some(3),
        ..SchedulerConfig::default()
    }
}

/// A device whose store outlives the engine (a restart opens a new engine on it).
fn device(store: &Arc<MemStore>) -> TestResult<Node> {
    Ok(Arc::new(SyncEngine::with_store(
        Box::new(store.clone()),
        EngineConfig::default(),
    )?))
}

/// Waits for the first sync event `pick` accepts, and returns what it made of it.
async fn next<T>(
    events: &mut Subscription,
    mut pick: impl FnMut(&SyncEvent) -> Option<T>,
) -> TestResult<T> {
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(notice) = events.recv().await {
            if let Notice::Event(Event::Sync(e)) = notice {
                if let Some(t) = pick(&e) {
                    return Some(t);
                }
            }
        }
        None
    })
    .await?;
    found.ok_or_else(|| "the notifier closed".into())
}

/// Waits (on the paused clock) until `node` holds `k`.
async fn holds(node: &Node, k: &str) -> TestResult {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while node.get(&notes(), &key(k))?.is_none() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{k} never arrived").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn refused(e: &SyncEvent) -> Option<(NodeId, NodeId)> {
    match e {
        SyncEvent::PeerRefused {
            expected, found, ..
        } => Some((*expected, *found)),
        _ => None,
    }
}

fn changed(e: &SyncEvent) -> Option<(NodeId, NodeId)> {
    match e {
        SyncEvent::PeerChanged { old, new, .. } => Some((*old, *new)),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_replaced_peer_is_refused_across_restarts_until_the_operator_accepts_it() -> TestResult {
    let store = Arc::new(MemStore::new());
    let d = device(&store)?;
    let x: Node = Arc::new(SyncEngine::in_memory()?);
    let y: Node = Arc::new(SyncEngine::in_memory()?);
    d.put(&notes(), &key("a"), b"1".to_vec())?;
    let address = Address::new(&x);
    let scheduler = Scheduler::start(d.clone(), config());
    scheduler.add_peer(HUB, address.clone())?;
    holds(&x, "a").await?;

    // The hub is replaced by a fresh node at the same address.
    let mut events = d.notifier().subscribe();
    d.put(&notes(), &key("b"), b"2".to_vec())?;
    address.replace(&y);
    scheduler.sync_now();
    let (expected, found) = next(&mut events, refused).await?;
    assert_eq!((expected, found), (x.node_id(), y.node_id()));
    assert!(y.get(&notes(), &key("b"))?.is_none(), "nothing was pushed");
    assert!(y.get(&notes(), &key("a"))?.is_none(), "nothing was pushed");
    assert!(y.peers()?.is_empty(), "the new node recorded nothing of us");
    let link = scheduler.peers().remove(0);
    assert!(link
        .last_error
        .unwrap_or_default()
        .contains("expected peer"));
    scheduler.shutdown().await?;
    drop(d);

    // A restart keeps refusing: the expected id is in the device's store.
    let d = device(&store)?;
    let mut events = d.notifier().subscribe();
    let address = Address::new(&y);
    let scheduler = Scheduler::start(d.clone(), config());
    scheduler.add_peer(HUB, address.clone())?;
    assert_eq!(
        next(&mut events, refused).await?,
        (x.node_id(), y.node_id())
    );
    assert!(y.peers()?.is_empty(), "nothing reached the new node");

    // The operator accepts the new node: it re-attaches and gets everything.
    scheduler.accept_new_identity(HUB)?;
    assert_eq!(
        next(&mut events, changed).await?,
        (x.node_id(), y.node_id())
    );
    holds(&y, "a").await?;
    holds(&y, "b").await?;
    assert!(scheduler.accept_new_identity("nobody").is_err());
    scheduler.shutdown().await?;
    drop(d);

    // After another restart the new node is the expected one; the old one is refused.
    let d = device(&store)?;
    assert_eq!(d.expected_peer(HUB)?, Some(y.node_id()));
    let mut events = d.notifier().subscribe();
    let address = Address::new(&x);
    let scheduler = Scheduler::start(d.clone(), config());
    scheduler.add_peer(HUB, address)?;
    assert_eq!(
        next(&mut events, refused).await?,
        (y.node_id(), x.node_id())
    );
    scheduler.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_peer_restored_with_a_fresh_id_vouches_for_its_old_one_and_is_accepted() -> TestResult {
    let hub_store = Arc::new(MemStore::new());
    let x: Node = Arc::new(SyncEngine::with_store(
        Box::new(hub_store.clone()),
        EngineConfig::default(),
    )?);
    let backup = hub_store.duplicate();
    let d: Node = Arc::new(SyncEngine::in_memory()?);
    d.put(&notes(), &key("a"), b"1".to_vec())?;
    let address = Address::new(&x);
    let scheduler = Scheduler::start(d.clone(), config());
    scheduler.add_peer(HUB, address.clone())?;
    holds(&x, "a").await?;

    // The hub comes back from its backup under a fresh id (`serve --restored`).
    let z: Node = Arc::new(SyncEngine::with_fresh_identity(
        Box::new(backup),
        EngineConfig::default(),
    )?);
    assert_eq!(z.previous_id(), Some(x.node_id()));
    let mut events = d.notifier().subscribe();
    d.put(&notes(), &key("b"), b"2".to_vec())?;
    address.replace(&z);
    scheduler.sync_now();
    let first = next(&mut events, |e| refused(e).map(Err).or(changed(e).map(Ok))).await?;
    assert_eq!(
        first,
        Ok((x.node_id(), z.node_id())),
        "accepted, not refused"
    );
    holds(&z, "a").await?;
    holds(&z, "b").await?;
    assert_eq!(d.expected_peer(HUB)?, Some(z.node_id()));
    scheduler.shutdown().await?;
    Ok(())
}
