//! A node whose stored clock is far ahead of its wall clock at start-up (issue 18, item 8),
//! on a manual time source: its wall clock ran two hours ahead, it wrote, and the clock was
//! then fixed. The node never issues an older timestamp than one it issued (docs/protocol.md,
//! "The clock"), so it keeps stamping ahead; what it must do is say so, loudly and in its
//! status, and its writes must reach its peers once its wall clock catches up.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::rounds::{config, link, mem_node, sync, TestResult};
use futures_executor::block_on;
use highwater::api::{all_scopes, NodeApi};
use highwater::node::render_status;
use highwater::store::MemStore;
use highwater::{Key, ManualTime, Scope, SyncEngine};

const T0: u32 = 1_700_000_000;
const TWO_HOURS: Duration = Duration::from_secs(7200);

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

#[test]
fn a_node_started_with_its_clock_set_back_says_so_and_delivers_once_it_catches_up() -> TestResult {
    let store = Arc::new(MemStore::new());
    let ahead = ManualTime::at_secs(T0 + 7200);
    let device = SyncEngine::with_store(Box::new(store.clone()), config(&ahead))?;
    device.put(&notes(), &key("while ahead"), b"1".to_vec())?;
    drop(device);

    // The wall clock is fixed; the node restarts.
    let wall = ManualTime::at_secs(T0);
    let device = Arc::new(SyncEngine::with_store(
        Box::new(store.clone()),
        config(&wall),
    )?);
    assert!(device.clock_ahead() >= TWO_HOURS - Duration::from_secs(1));
    let status = block_on(NodeApi::status(&*device, all_scopes()))?;
    assert!(
        status.clock_ahead_ms >= 7_199_000,
        "{}",
        status.clock_ahead_ms
    );
    assert_eq!(status.max_drift_ms, 5_000);
    let text = render_status(&status);
    assert!(text.contains("2h ahead of this machine's clock"), "{text}");

    // It still stamps ahead (never an older timestamp), so a hub whose clock is right
    // refuses its writes for now, and says so.
    let written = device.put(&notes(), &key("after the fix"), b"2".to_vec())?;
    assert!(written.time() > (u64::from(T0) + 7200) << 32);
    let hub = mem_node(&wall)?;
    sync(&device, &link(&hub))?;
    assert!(hub.get(&notes(), &key("after the fix"))?.is_none());
    assert!(hub.get(&notes(), &key("while ahead"))?.is_none());

    // Two hours later the clocks agree: the status says nothing more, and the writes go.
    wall.advance(TWO_HOURS + Duration::from_secs(10));
    assert_eq!(device.clock_ahead(), Duration::ZERO);
    let status = block_on(NodeApi::status(&*device, all_scopes()))?;
    assert!(!render_status(&status).contains("ahead of this machine's clock"));
    sync(&device, &link(&hub))?;
    assert!(hub.get(&notes(), &key("after the fix"))?.is_some());
    assert!(hub.get(&notes(), &key("while ahead"))?.is_some());
    Ok(())
}
