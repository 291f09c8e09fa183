//! A caller-owned `Session` carries what a node keeps of its rounds with one peer: halts with
//! their reasons, and the marks the peer recorded of ours (so a quiet round sends a digest).
//! It belongs to one peer, and the scheduler keeps one per peer and shows it.

mod common;

use std::time::Duration;

use common::rounds::{link, mem_node, TestResult};
use futures_executor::block_on;
use highwater::error::ProtocolError;
use highwater::notify::{Event, Notice, SyncEvent};
use highwater::{
    Error, ExchangeOptions, HaltReason, Key, ManualTime, Scheduler, SchedulerConfig, Scope, Session,
};

const T0: u32 = 1_700_000_000;

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

#[test]
fn a_session_remembers_halts_with_their_reasons_and_the_peers_record_of_our_marks() -> TestResult {
    let me = mem_node(&ManualTime::at_secs(T0))?;
    let ahead = mem_node(&ManualTime::at_secs(T0 + 60))?;
    let near = mem_node(&ManualTime::at_secs(T0))?;
    ahead.put(&Scope::shared(), &key("a"), b"from the future".to_vec())?;
    near.put(&Scope::shared(), &key("n"), b"now".to_vec())?;
    let options = ExchangeOptions::default();

    // A halted stream is remembered with its reason, from both sides' point of view.
    let mut with_ahead = Session::named("ahead");
    let out = block_on(me.exchange_in(&mut with_ahead, &link(&ahead), &options))?;
    assert_eq!(out.halts.len(), 1);
    assert_eq!(with_ahead.peer(), Some(ahead.node_id()));
    let halted = with_ahead.halted_here();
    assert_eq!(halted.len(), 1);
    assert_eq!(halted[0].origin, ahead.node_id());
    assert!(
        matches!(halted[0].reason, HaltReason::ClockSkew { ahead_by_ms } if ahead_by_ms >= 59_000),
        "{halted:?}"
    );
    assert!(
        !with_ahead.marks_held(),
        "after a halt the next request is in full"
    );

    // A clean round leaves the peer's record of our marks in the session, so the next
    // quiet round names them by digest and costs a few bytes; a fresh session sends them
    // in full.
    let mut with_near = Session::new();
    let to_near = link(&near);
    block_on(me.exchange_in(&mut with_near, &to_near, &options))?;
    assert!(with_near.marks_held());
    assert!(with_near.halted_here().is_empty());
    block_on(me.exchange_in(&mut with_near, &to_near, &options))?;
    let digest_request = to_near.stats().last_request;
    block_on(me.exchange_in(&mut Session::new(), &to_near, &options))?;
    let full_request = to_near.stats().last_request;
    assert!(
        digest_request < full_request,
        "a held session sends {digest_request} bytes, a fresh one {full_request}"
    );
    Ok(())
}

#[test]
fn a_session_is_refused_for_another_peer_and_nothing_is_applied() -> TestResult {
    let me = mem_node(&ManualTime::at_secs(T0))?;
    let first = mem_node(&ManualTime::at_secs(T0))?;
    let other = mem_node(&ManualTime::at_secs(T0))?;
    other.put(&Scope::shared(), &key("k"), b"v".to_vec())?;
    let mut session = Session::new();
    block_on(me.exchange_in(&mut session, &link(&first), &ExchangeOptions::default()))?;

    let refused =
        block_on(me.exchange_in(&mut session, &link(&other), &ExchangeOptions::default()));
    match refused {
        Err(Error::Protocol(ProtocolError::UnexpectedPeer { expected, found })) => {
            assert_eq!((expected, found), (first.node_id(), other.node_id()));
        }
        other => panic!("expected UnexpectedPeer, got {other:?}"),
    }
    assert_eq!(me.get(&Scope::shared(), &key("k"))?, None);
    assert_eq!(session.peer(), Some(first.node_id()));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_scheduler_keeps_a_session_per_peer_and_shows_its_halts() -> TestResult {
    let me = mem_node(&ManualTime::at_secs(T0))?;
    let ahead = mem_node(&ManualTime::at_secs(T0 + 60))?;
    ahead.put(&Scope::shared(), &key("a"), b"from the future".to_vec())?;
    let mut events = me.notifier().subscribe();
    let scheduler = Scheduler::start(me.clone(), SchedulerConfig::default());
    scheduler.add_peer("the-hub", std::sync::Arc::new(link(&ahead)))?;

    // The skew event names the peer by the scheduler's name for it.
    let skew = loop {
        let notice = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await?
            .ok_or("the notifier is gone")?;
        if let Notice::Event(Event::Sync(e @ SyncEvent::ClockSkew { .. })) = notice {
            break e;
        }
    };
    assert!(
        matches!(&skew, SyncEvent::ClockSkew { peer, origin, .. } if peer == "the-hub" && *origin == ahead.node_id()),
        "{skew:?}"
    );
    // Wait for the round to finish recording, then read the status.
    let status = loop {
        let status = scheduler.peers().remove(0);
        if status.rounds > 0 {
            break status;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(status.session.peer(), Some(ahead.node_id()));
    let halted = status.session.halted_here();
    assert_eq!(halted.len(), 1, "{halted:?}");
    assert!(matches!(halted[0].reason, HaltReason::ClockSkew { .. }));
    scheduler.shutdown().await?;
    Ok(())
}
