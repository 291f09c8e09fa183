//! Relays: C learns A's writes only through B, and the watermarks that come with them are
//! exact, so when A and C later meet directly neither ships a single version, in one round.

mod common;

use common::rounds::{link, mem_node, sync, sync_with, Link, Node, TestResult, Totals};
use highwater::exchange::Page;
use highwater::wire::{
    encode, ExchangeRequest, ExchangeResponse, RequestExt, RequestMarks, ResponseExt,
    ResponseMarks, ScopeFilter,
};
use highwater::{ExchangeOptions, Key, ManualTime, Scope, SyncEngine};

/// A's history: 50 puts over two scopes, then an overwrite and a delete.
fn write_history(a: &SyncEngine) -> TestResult {
    let scopes = [Scope::shared(), Scope::app("notes", "items")?];
    for i in 0..50 {
        let key = Key::try_from(format!("k{i:02}").as_str())?;
        a.put(&scopes[i % 2], &key, format!("v{i}").into_bytes())?;
    }
    a.put(
        &scopes[1],
        &Key::try_from("k03")?,
        b"v3, overwritten".to_vec(),
    )?;
    a.delete(&scopes[0], &Key::try_from("k08")?)?;
    Ok(())
}

/// How a round's marks travel: the request's marks in full or as a digest, whether it names
/// the responder's marks it knows, and the response's marks in full or as "same".
#[derive(Clone, Copy)]
struct MarksForm {
    request_digest: bool,
    known: bool,
    response_same: bool,
    /// The initiator's first request of a session: it also asks for the responder's purge
    /// floors (`RequestExt::floors`, a few bytes of version 2), and the version 2 answer
    /// says how many versions remain (`ResponseExt::remaining`: none).
    first_of_session: bool,
}

/// Both sides' marks in full: the first round between two nodes.
const FIRST: MarksForm = MarksForm {
    request_digest: false,
    known: false,
    response_same: false,
    first_of_session: true,
};

/// The encoded size of a request from `from` to `to` that carries no version, its marks in
/// `form`.
fn empty_request_len(from: &SyncEngine, to: &SyncEngine, form: MarksForm) -> TestResult<u64> {
    let mine = from.watermarks()?;
    let request = ExchangeRequest {
        from: from.node_id(),
        scopes: ScopeFilter::All,
        marks: if form.request_digest {
            RequestMarks::Digest(mine.digest())
        } else {
            RequestMarks::Full(mine)
        },
        known: form
            .known
            .then(|| to.watermarks())
            .transpose()?
            .map(|w| w.digest()),
        page: Page::default(),
        limit: u32::try_from(from.config().page_limit)?,
        deferred: Vec::new(),
        // A session's first request asks for the peer's floors, and one with its marks in
        // full names the node it is for.
        ext: RequestExt {
            floors: form.first_of_session.then(Vec::new),
            refused: Vec::new(),
            to: (!form.request_digest).then(|| to.node_id()),
        },
    };
    Ok(encode(&request).len() as u64)
}

fn empty_response_len(node: &SyncEngine, form: MarksForm) -> TestResult<u64> {
    let response = ExchangeResponse {
        from: node.node_id(),
        marks: if form.response_same {
            ResponseMarks::Same
        } else {
            ResponseMarks::Full(node.watermarks()?)
        },
        page: Page::default(),
        halts: Vec::new(),
        ext: ResponseExt {
            remaining: form.first_of_session.then_some(0),
            ..ResponseExt::default()
        },
    };
    Ok(encode(&response).len() as u64)
}

/// Syncs `from` to `to` directly and checks that not one version crossed, in either
/// direction, and that one round sufficed: the outcome's counts and the wire's byte counts
/// (every request and response exactly the size of one carrying no version, its marks in
/// `form`).
fn assert_direct_round_is_empty(from: &SyncEngine, to: &Node, form: MarksForm) -> TestResult {
    let wire: Link = link(to);
    let totals = sync(from, &wire)?;
    assert_eq!(
        totals,
        Totals {
            rounds: 1,
            shipped: 0,
            received: 0,
            applied: 0
        },
        "direct sync after the relay"
    );
    let stats = wire.stats();
    assert_eq!(stats.requests, 1);
    assert_eq!(
        stats.bytes_sent,
        empty_request_len(from, to, form)?,
        "request carried versions, or its marks in another form"
    );
    assert_eq!(
        stats.bytes_received,
        empty_response_len(to, form)?,
        "response carried versions, or its marks in another form"
    );
    Ok(())
}

/// B <-> A, then B <-> C, with `options` (B initiates both), then B goes away and A and C meet directly.
fn relay(options: &ExchangeOptions) -> TestResult<(Totals, Totals)> {
    let time = ManualTime::at_secs(1_700_000_000);
    let (a, b, c) = (mem_node(&time)?, mem_node(&time)?, mem_node(&time)?);
    write_history(&a)?;

    // B pulls from A, then pushes to C; A and C never meet.
    let (to_a, to_c) = (link(&a), link(&c));
    let a_b = sync_with(&b, &to_a, options)?;
    let b_c = sync_with(&b, &to_c, options)?;

    assert_eq!(c.digest()?, a.digest()?, "C holds A's state");
    let a_marks = a.watermarks()?;
    for scope in a.scopes()? {
        let a_own = a_marks.get(&scope, a.node_id());
        assert!(a_own.is_some(), "A has a mark of its own in {scope}");
        assert_eq!(
            c.watermarks()?.get(&scope, a.node_id()),
            a_own,
            "C's W[A] in {scope}"
        );
    }
    assert_eq!(b.watermarks()?, a_marks);
    assert_eq!(c.watermarks()?, a_marks);

    // B goes away.
    drop((to_a, to_c, b));

    // A knows nothing of C: both send their marks in full.
    assert_direct_round_is_empty(&a, &c, FIRST)?;
    // From then on each knows the other's marks, and knows that the other recorded its own
    // (from its request, or from its answer): digests only, in either direction, again
    // with a planned page rather than a first contact.
    let quiet = MarksForm {
        request_digest: true,
        known: true,
        response_same: true,
        first_of_session: false,
    };
    // (C's first request to A.)
    assert_direct_round_is_empty(
        &c,
        &a,
        MarksForm {
            first_of_session: true,
            ..quiet
        },
    )?;
    assert_direct_round_is_empty(&a, &c, quiet)?;
    assert_direct_round_is_empty(&c, &a, quiet)?;

    assert_eq!(a.watermarks()?, a_marks);
    assert_eq!(c.watermarks()?, a_marks);
    assert_eq!(a.peer_watermarks(c.node_id())?, Some(a_marks.clone()));
    assert_eq!(c.peer_watermarks(a.node_id())?, Some(a_marks));
    assert_eq!(c.digest()?, a.digest()?);
    Ok((a_b, b_c))
}

#[test]
fn writes_relayed_through_b_are_never_shipped_again_between_a_and_c() -> TestResult {
    let (a_b, b_c) = relay(&ExchangeOptions::default())?;
    // 50 puts, one overwrite (superseding one put), one delete (superseding another): B
    // pulls all 50 live versions in one round; it pushes them to C in its second round (a
    // first contact ships nothing).
    assert_eq!((a_b.rounds, a_b.shipped, a_b.received), (1, 0, 50));
    assert_eq!((b_c.rounds, b_c.shipped, b_c.received), (2, 50, 0));
    Ok(())
}

#[test]
fn relay_with_pages_of_three_converges_and_stays_exact() -> TestResult {
    let (a_b, b_c) = relay(&ExchangeOptions {
        page_limit: Some(3),
        ..ExchangeOptions::default()
    })?;
    // B pulls from A in pages of three streamed back to back (one round), and pushes to C
    // the same way once a first contact (which ships nothing) told it C's marks.
    assert!(a_b.rounds < 50 / 3, "B <- A took {} rounds", a_b.rounds);
    assert_eq!(
        b_c.rounds, 2,
        "B -> C: a first contact, then one streamed push"
    );
    assert_eq!((a_b.shipped, a_b.received), (0, 50));
    assert_eq!((b_c.shipped, b_c.received), (50, 0));
    Ok(())
}
