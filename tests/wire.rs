//! Protocol version 1 on the wire: golden bytes pin the encoding, every message round-trips,
//! bad bytes are refused with a typed error, and a request that is refused (by the codec or
//! by the protocol rules) changes nothing on the responder.

mod common;

use std::collections::BTreeSet;
use std::error::Error;

use highwater::error::{ProtocolError, WireError};
use highwater::exchange::audit::{
    AuditExt, AuditRequest, AuditResponse, Claim, Items, Part, Print, Segment,
};
use highwater::exchange::{Page, Run};
use highwater::store::AuditPoint;
use highwater::watermark::MarksDigest;
use highwater::wire::{
    self, ExchangeRequest, ExchangeResponse, PageFrame, RequestExt, RequestMarks, ResponseExt,
    ResponseMarks, MAGIC, MAX_MESSAGE_LEN,
};
use highwater::{
    BlobRef, EngineConfig, Error as HwError, Halt, HaltReason, Hash, Hlc, Key, ManualTime, NodeId,
    Op, Scope, ScopeFilter, ScopedWatermarks, SyncEngine, Version,
};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn Error>>;

/// 2023-11-14T22:13:20Z in NTP64 (seconds in the upper 32 bits).
const T: u64 = 1_700_000_000 << 32;

fn id(b: u8) -> NodeId {
    NodeId::from_bytes([b; 16]).expect("a non-zero id")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn scope(s: &str) -> Scope {
    s.parse().expect("a valid scope")
}

fn put(value: &[u8]) -> Op {
    Op::Put {
        value: value.to_vec(),
        blob: None,
    }
}

fn marks(list: &[(&Scope, Hlc)]) -> ScopedWatermarks {
    let mut w = ScopedWatermarks::new();
    for (s, h) in list {
        w.observe(s, *h);
    }
    w
}

/// A run from origin 0x0a in `shared` over (T, T+2]: a put at T+1, a delete at T+2.
fn run_a() -> Run {
    let a = id(0x0a);
    Run {
        scope: Scope::shared(),
        origin: a,
        base: Some(Hlc::new(T, a)),
        top: Hlc::new(T + 2, a),
        versions: vec![
            (
                key("k1"),
                Version {
                    hlc: Hlc::new(T + 1, a),
                    op: put(b"v1"),
                },
            ),
            (
                key("k2"),
                Version {
                    hlc: Hlc::new(T + 2, a),
                    op: Op::Delete,
                },
            ),
        ],
    }
}

/// The request of a second round, limited to two scopes, deferring one halted stream.
fn golden_request() -> ExchangeRequest {
    let (a, b) = (id(0x0a), id(0x0b));
    let notes = scope("app/notes/items");
    ExchangeRequest {
        from: a,
        scopes: ScopeFilter::Only(BTreeSet::from([Scope::shared(), notes])),
        marks: RequestMarks::Full(marks(&[
            (&Scope::shared(), Hlc::new(T + 2, a)),
            (&Scope::shared(), Hlc::new(T + 1, b)),
        ])),
        known: Some(MarksDigest::from_bytes([0x33; 16])),
        page: Page {
            runs: vec![run_a()],
            more: false,
        },
        limit: 1000,
        deferred: vec![(scope("app/notes/items"), id(0x0c))],
        ext: Default::default(),
    }
}

/// A first-contact request over all scopes: watermarks only.
fn golden_request_all() -> ExchangeRequest {
    ExchangeRequest {
        from: id(0x0a),
        scopes: ScopeFilter::All,
        marks: RequestMarks::Full(marks(&[(&Scope::shared(), Hlc::new(T, id(0x0a)))])),
        known: None,
        page: Page::default(),
        limit: 1,
        deferred: vec![],
        ext: Default::default(),
    }
}

/// The request of a quiet round: both sides' marks as digests, nothing to ship.
fn golden_request_quiet() -> ExchangeRequest {
    ExchangeRequest {
        from: id(0x0a),
        scopes: ScopeFilter::All,
        marks: RequestMarks::Digest(MarksDigest::from_bytes([0x44; 16])),
        known: Some(MarksDigest::from_bytes([0x55; 16])),
        page: Page::default(),
        limit: 1000,
        deferred: vec![],
        ext: Default::default(),
    }
}

/// The answer to a quiet round: the responder's marks are the ones the initiator knows.
fn golden_response_same() -> ExchangeResponse {
    ExchangeResponse {
        from: id(0x0b),
        marks: ResponseMarks::Same,
        page: Page::default(),
        halts: vec![],
        ext: Default::default(),
    }
}

/// An answer with a full run (one put with a blob), an empty run, and a halt.
fn golden_response() -> ExchangeResponse {
    let (a, b) = (id(0x0a), id(0x0b));
    let notes = scope("app/notes/items");
    let blob = BlobRef {
        hash: Hash::from_bytes([0x11; 32]),
        size: 300,
    };
    ExchangeResponse {
        from: b,
        marks: ResponseMarks::Full(marks(&[
            (&Scope::shared(), Hlc::new(T + 2, a)),
            (&Scope::shared(), Hlc::new(T + 5, b)),
            (&notes, Hlc::new(T + 9, b)),
        ])),
        page: Page {
            runs: vec![
                Run {
                    scope: Scope::shared(),
                    origin: b,
                    base: Some(Hlc::new(T + 1, b)),
                    top: Hlc::new(T + 5, b),
                    versions: vec![(
                        key("f"),
                        Version {
                            hlc: Hlc::new(T + 4, b),
                            op: Op::Put {
                                value: b"x".to_vec(),
                                blob: Some(blob),
                            },
                        },
                    )],
                },
                Run {
                    scope: notes,
                    origin: b,
                    base: None,
                    top: Hlc::new(T + 9, b),
                    versions: vec![],
                },
            ],
            more: true,
        },
        halts: vec![Halt {
            scope: Scope::shared(),
            origin: id(0x0c),
            reason: HaltReason::ClockSkew { ahead_by_ms: 7000 },
        }],
        ext: Default::default(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digits"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Golden bytes: protocol version 1
//
// Every message starts with the 7-byte envelope header
//   48 57 53 59   magic b"HWSY"
//   00 01         version 1, u16 big-endian
//   01 | 02       kind: 1 = ExchangeRequest, 2 = ExchangeResponse
// followed by the postcard body, fields in declaration order: a NodeId is its 16 raw bytes
// (no length prefix), an enum starts with its variant index as a varint (ScopeFilter::All = 0,
// Only = 1; Option None = 0, Some = 1; Op::Put = 0, Delete = 1; RequestMarks::Full = 0,
// Digest = 1; ResponseMarks::Full = 0, Same = 1, Resend = 2), a marks digest is its 16 raw
// bytes, sequences, maps, strings and
// byte strings start with their length as a varint, and integers are LEB128 varints, so
// T = 1_700_000_000 << 32 = 0x6553f100_00000000 is the 9 bytes 80 80 80 80 80 a0 fc a9 65 and
// T+2 is 82 80 80 80 80 a0 fc a9 65. Inside a run, each version carries its time as the delta
// from the previous one (or from base): 01, 01 below.

#[rustfmt::skip]
const GOLDEN_REQUEST: &str = concat!(
    "48575359", "0001", "01",                           // header: magic, version 1, request
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",                 // from: node 0x0a
    "01", "02",                                         // scopes: Only, 2 scopes
    "0f", "6170702f6e6f7465732f6974656d73",             //   "app/notes/items"
    "06", "736861726564",                               //   "shared"
    "00",                                               // marks: Full
    "01", "06", "736861726564", "02",                   //   1 scope, "shared", 2 origins
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", "8280808080a0fca965", // 0x0a at T+2
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", "8180808080a0fca965", // 0x0b at T+1
    "01", "33333333333333333333333333333333",           // known: Some(digest)
    "01",                                               // page: 1 run
    "06", "736861726564",                               //   scope "shared"
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",                 //   origin 0x0a
    "01", "8080808080a0fca965",                         //   base Some(T)
    "8280808080a0fca965",                               //   top T+2
    "02",                                               //   2 versions
    "02", "6b31", "01", "00", "02", "7631", "00",       //     "k1", +1, Put "v1", no blob
    "02", "6b32", "01", "01",                           //     "k2", +1, Delete
    "00",                                               //   more: false
    "e807",                                             // limit: 1000
    "01",                                               // deferred: 1 stream
    "0f", "6170702f6e6f7465732f6974656d73",             //   scope "app/notes/items"
    "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",                 //   origin 0x0c
);

#[rustfmt::skip]
const GOLDEN_REQUEST_ALL: &str = concat!(
    "48575359", "0001", "01",
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",                 // from: node 0x0a
    "00",                                               // scopes: All
    "00", "01", "06", "736861726564", "01",             // marks: Full, "shared", 1 origin
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", "8080808080a0fca965", // 0x0a at T
    "00",                                               // known: None (first contact)
    "00", "00",                                         // page: no runs, more: false
    "01",                                               // limit: 1
    "00",                                               // deferred: none
);

/// 63 bytes, whatever the number of scopes and origins.
#[rustfmt::skip]
const GOLDEN_REQUEST_QUIET: &str = concat!(
    "48575359", "0001", "01",
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",                 // from: node 0x0a
    "00",                                               // scopes: All
    "01", "44444444444444444444444444444444",           // marks: Digest
    "01", "55555555555555555555555555555555",           // known: Some(digest)
    "00", "00",                                         // page: no runs, more: false
    "e807",                                             // limit: 1000
    "00",                                               // deferred: none
);

/// 27 bytes, whatever the number of scopes and origins.
#[rustfmt::skip]
const GOLDEN_RESPONSE_SAME: &str = concat!(
    "48575359", "0001", "02",
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",                 // from: node 0x0b
    "01",                                               // marks: Same
    "00", "00",                                         // page: no runs, more: false
    "00",                                               // halts: none
);

#[rustfmt::skip]
const GOLDEN_RESPONSE: &str = concat!(
    "48575359", "0001", "02",                           // header: magic, version 1, response
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",                 // from: node 0x0b
    "00",                                               // marks: Full
    "02",                                               //   2 scopes, in scope order
    "0f", "6170702f6e6f7465732f6974656d73", "01",       //   "app/notes/items", 1 origin
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", "8980808080a0fca965", // 0x0b at T+9
    "06", "736861726564", "02",                         //   "shared", 2 origins
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", "8280808080a0fca965", // 0x0a at T+2
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", "8580808080a0fca965", // 0x0b at T+5
    "02",                                               // page: 2 runs
    "06", "736861726564",                               //   scope "shared"
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",                 //   origin 0x0b
    "01", "8180808080a0fca965",                         //   base Some(T+1)
    "8580808080a0fca965",                               //   top T+5
    "01", "01", "66", "03", "00", "01", "78",           //   1 version: "f", +3, Put "x",
    "01", "1111111111111111111111111111111111111111111111111111111111111111", "ac02", // blob Some(hash, 300)
    "0f", "6170702f6e6f7465732f6974656d73",             //   scope "app/notes/items"
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",                 //   origin 0x0b
    "00", "8980808080a0fca965", "00",                   //   base None, top T+9, no versions
    "01",                                               //   more: true
    "01",                                               // halts: 1
    "06", "736861726564",                               //   scope "shared"
    "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",                 //   origin 0x0c
    "00", "d836",                                       //   ClockSkew { ahead_by_ms: 7000 }
);

#[test]
fn golden_request_is_pinned() -> TestResult {
    let bytes = wire::encode(&golden_request());
    assert_eq!(hex(&bytes), GOLDEN_REQUEST);
    assert_eq!(bytes[..4], MAGIC);
    // Nothing of version 2 is used: the request goes out as version 1.
    assert_eq!(bytes[4..6], 1u16.to_be_bytes());
    assert_eq!(
        wire::decode::<ExchangeRequest>(&unhex(GOLDEN_REQUEST))?,
        golden_request()
    );
    Ok(())
}

#[test]
fn golden_request_over_all_scopes_is_pinned() -> TestResult {
    assert_eq!(
        hex(&wire::encode(&golden_request_all())),
        GOLDEN_REQUEST_ALL
    );
    assert_eq!(
        wire::decode::<ExchangeRequest>(&unhex(GOLDEN_REQUEST_ALL))?,
        golden_request_all()
    );
    Ok(())
}

#[test]
fn golden_quiet_round_is_pinned() -> TestResult {
    let request = wire::encode(&golden_request_quiet());
    assert_eq!(hex(&request), GOLDEN_REQUEST_QUIET);
    assert_eq!(
        wire::decode::<ExchangeRequest>(&request)?,
        golden_request_quiet()
    );
    let response = wire::encode(&golden_response_same());
    assert_eq!(hex(&response), GOLDEN_RESPONSE_SAME);
    assert_eq!(
        wire::decode::<ExchangeResponse>(&response)?,
        golden_response_same()
    );
    assert_eq!((request.len(), response.len()), (63, 27));
    Ok(())
}

/// `Resend` is tag 2, with an empty page and no halts.
#[test]
fn resend_response_is_pinned() -> TestResult {
    let response = ExchangeResponse::resend(id(0x0b));
    assert_eq!(
        hex(&wire::encode(&response)),
        concat!(
            "48575359000102",
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "02",
            "0000",
            "00"
        )
    );
    assert_eq!(
        wire::decode::<ExchangeResponse>(&wire::encode(&response))?,
        response
    );
    Ok(())
}

#[test]
fn golden_response_is_pinned() -> TestResult {
    assert_eq!(hex(&wire::encode(&golden_response())), GOLDEN_RESPONSE);
    assert_eq!(
        wire::decode::<ExchangeResponse>(&unhex(GOLDEN_RESPONSE))?,
        golden_response()
    );
    Ok(())
}

/// The blob halt is `HaltReason` tag 2 followed by the 32 hash bytes; pinned on its own
/// because the round-trip generators do not produce it.
#[test]
fn blob_unavailable_halt_is_pinned() -> TestResult {
    let hash = Hash::from_bytes([0xab; 32]);
    let halt = Halt {
        scope: Scope::shared(),
        origin: id(1),
        reason: HaltReason::BlobUnavailable { hash },
    };
    let response = ExchangeResponse {
        from: id(2),
        marks: ResponseMarks::Full(ScopedWatermarks::new()),
        page: Page::default(),
        halts: vec![halt],
        ext: Default::default(),
    };
    let bytes = wire::encode(&response);
    // ... halts: len 1 | scope "shared" (len 6) | origin 16 x 01 | tag 2 | 32 x ab
    let mut tail = vec![1u8, 6];
    tail.extend_from_slice(b"shared");
    tail.extend_from_slice(&[1; 16]);
    tail.push(2);
    tail.extend_from_slice(&[0xab; 32]);
    assert!(bytes.ends_with(&tail), "{}", hex(&bytes));
    assert_eq!(wire::decode::<ExchangeResponse>(&bytes)?, response);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Round trip

fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 16]>().prop_filter_map("the zero id is reserved", NodeId::from_bytes)
}

fn any_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        Just(Scope::shared()),
        "app/[a-z0-9][a-z0-9_.-]{0,6}/[A-Za-z0-9_][a-z0-9_.-]{0,6}".prop_map(|s| scope(&s))
    ]
}

fn any_op() -> impl Strategy<Value = Op> {
    let blob = (any::<[u8; 32]>(), any::<u64>()).prop_map(|(h, size)| BlobRef {
        hash: Hash::from_bytes(h),
        size,
    });
    prop_oneof![
        (
            prop::collection::vec(any::<u8>(), 0..24),
            prop::option::of(blob)
        )
            .prop_map(|(value, blob)| Op::Put { value, blob }),
        Just(Op::Delete),
    ]
}

/// A well-formed run: versions ascending from `base`, `top` at or above the last one.
fn any_run() -> impl Strategy<Value = Run> {
    let version = (
        prop::collection::vec(any::<u8>(), 1..12),
        1..1u64 << 40,
        any_op(),
    );
    (
        any_scope(),
        node_id(),
        prop::option::of(0..1u64 << 62),
        prop::collection::vec(version, 0..5),
        0..1u64 << 40,
    )
        .prop_map(|(scope, origin, base, versions, extra)| {
            let mut time = base.unwrap_or(0);
            let versions: Vec<_> = versions
                .into_iter()
                .map(|(k, delta, op)| {
                    time += delta;
                    (
                        Key::new(k).expect("1-11 bytes"),
                        Version {
                            hlc: Hlc::new(time, origin),
                            op,
                        },
                    )
                })
                .collect();
            Run {
                scope,
                origin,
                base: base.map(|b| Hlc::new(b, origin)),
                top: Hlc::new(time + 1 + extra, origin),
                versions,
            }
        })
}

fn any_marks() -> impl Strategy<Value = ScopedWatermarks> {
    prop::collection::vec((any_scope(), node_id(), any::<u64>()), 0..6).prop_map(|list| {
        let mut w = ScopedWatermarks::new();
        for (s, origin, t) in list {
            w.observe(&s, Hlc::new(t, origin));
        }
        w
    })
}

fn any_digest() -> impl Strategy<Value = MarksDigest> {
    any::<[u8; 16]>().prop_map(MarksDigest::from_bytes)
}

fn any_request_marks() -> impl Strategy<Value = RequestMarks> {
    prop_oneof![
        any_marks().prop_map(RequestMarks::Full),
        any_digest().prop_map(RequestMarks::Digest),
    ]
}

fn any_response_marks() -> impl Strategy<Value = ResponseMarks> {
    prop_oneof![
        any_marks().prop_map(ResponseMarks::Full),
        Just(ResponseMarks::Same),
        Just(ResponseMarks::Resend),
    ]
}

fn any_page() -> impl Strategy<Value = Page> {
    (prop::collection::vec(any_run(), 0..4), any::<bool>())
        .prop_map(|(runs, more)| Page { runs, more })
}

fn any_request() -> impl Strategy<Value = ExchangeRequest> {
    let scopes = prop_oneof![
        Just(ScopeFilter::All),
        prop::collection::btree_set(any_scope(), 0..4).prop_map(ScopeFilter::Only)
    ];
    let deferred = prop::collection::vec((any_scope(), node_id()), 0..3);
    (
        node_id(),
        scopes,
        any_request_marks(),
        prop::option::of(any_digest()),
        any_page(),
        any::<u32>(),
        deferred,
    )
        .prop_map(
            |(from, scopes, marks, known, page, limit, deferred)| ExchangeRequest {
                from,
                scopes,
                marks,
                known,
                page,
                limit,
                deferred,
                ext: Default::default(),
            },
        )
}

fn any_response() -> impl Strategy<Value = ExchangeResponse> {
    let reason = prop_oneof![
        any::<u64>().prop_map(|ahead_by_ms| HaltReason::ClockSkew { ahead_by_ms }),
        Just(HaltReason::OwnOrigin)
    ];
    let halt = (any_scope(), node_id(), reason).prop_map(|(scope, origin, reason)| Halt {
        scope,
        origin,
        reason,
    });
    (
        node_id(),
        any_response_marks(),
        any_page(),
        prop::collection::vec(halt, 0..3),
    )
        .prop_map(|(from, marks, page, halts)| ExchangeResponse {
            from,
            marks,
            page,
            halts,
            ext: Default::default(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(256), ..ProptestConfig::default() })]

    #[test]
    fn requests_round_trip(request in any_request()) {
        let bytes = wire::encode(&request);
        prop_assert_eq!(&bytes[..7], &[0x48, 0x57, 0x53, 0x59, 0x00, 0x01, 0x01][..]);
        prop_assert_eq!(wire::decode::<ExchangeRequest>(&bytes), Ok(request));
    }

    #[test]
    fn responses_round_trip(response in any_response()) {
        let bytes = wire::encode(&response);
        prop_assert_eq!(&bytes[..7], &[0x48, 0x57, 0x53, 0x59, 0x00, 0x01, 0x02][..]);
        prop_assert_eq!(wire::decode::<ExchangeResponse>(&bytes), Ok(response));
    }
}

// ---------------------------------------------------------------------------------------
// Bad bytes: a typed error each, and the responder left as it was

/// A responder with records, watermarks and knowledge of one peer.
fn responder() -> Result<SyncEngine, Box<dyn Error>> {
    let config = EngineConfig {
        time: ManualTime::at_secs(1_700_000_100),
        ..EngineConfig::default()
    };
    let engine = SyncEngine::in_memory_with(config)?;
    engine.put(&Scope::shared(), &key("mine"), b"x".to_vec())?;
    engine.delete(&scope("app/notes/items"), &key("gone"))?;
    engine.answer(golden_request_all())?;
    Ok(engine)
}

/// What a refused request must leave unchanged.
fn state(engine: &SyncEngine) -> Result<impl PartialEq + std::fmt::Debug, Box<dyn Error>> {
    Ok((
        engine.digest()?,
        engine.watermarks()?,
        engine.peers()?,
        engine.peer_watermarks(id(0x0a))?,
    ))
}

/// The server's path: decode, and answer only what decodes.
fn serve(engine: &SyncEngine, bytes: &[u8]) -> Result<ExchangeResponse, Box<dyn Error>> {
    let request = wire::decode::<ExchangeRequest>(bytes)?;
    Ok(engine.answer(request)?)
}

/// Feeds `bytes` to a responder and checks that it is refused with `expected` and that the
/// responder is unchanged.
fn refused(bytes: &[u8], expected: impl Fn(&WireError) -> bool) -> TestResult {
    let engine = responder()?;
    let before = state(&engine)?;
    let err = wire::decode::<ExchangeRequest>(bytes).expect_err("bad bytes must not decode");
    assert!(expected(&err), "unexpected error {err:?}");
    assert!(serve(&engine, bytes).is_err());
    assert_eq!(state(&engine)?, before);
    Ok(())
}

#[test]
fn a_good_request_does_change_the_responder() -> TestResult {
    // The control for the tests below: the same path applies a valid request's run.
    let engine = responder()?;
    let before = state(&engine)?;
    serve(&engine, &unhex(GOLDEN_REQUEST))?;
    assert_ne!(state(&engine)?, before);
    assert!(engine
        .get_version(&Scope::shared(), &key("k2"))?
        .is_some_and(|v| v.is_tombstone()));
    Ok(())
}

#[test]
fn every_prefix_is_truncated_never_ok_never_a_panic() -> TestResult {
    let engine = responder()?;
    let before = state(&engine)?;
    let request = unhex(GOLDEN_REQUEST);
    for len in 0..request.len() {
        let prefix = &request[..len];
        match wire::decode::<ExchangeRequest>(prefix) {
            Err(WireError::Truncated) => {}
            Err(WireError::Malformed { .. }) if len > 7 => {}
            other => panic!("prefix of {len} bytes gave {other:?}"),
        }
        assert!(serve(&engine, prefix).is_err());
    }
    assert_eq!(state(&engine)?, before);
    let response = unhex(GOLDEN_RESPONSE);
    for len in 0..response.len() {
        match wire::decode::<ExchangeResponse>(&response[..len]) {
            Err(WireError::Truncated) => {}
            Err(WireError::Malformed { .. }) if len > 7 => {}
            other => panic!("response prefix of {len} bytes gave {other:?}"),
        }
    }
    assert_eq!(
        wire::decode::<ExchangeRequest>(&[]),
        Err(WireError::Truncated)
    );
    assert_eq!(
        wire::decode::<ExchangeRequest>(&request[..7]),
        Err(WireError::Truncated),
        "a header alone"
    );
    assert_eq!(
        wire::decode::<ExchangeRequest>(&request[..request.len() - 1]),
        Err(WireError::Truncated),
        "one byte short"
    );
    Ok(())
}

#[test]
fn trailing_bytes_are_refused() -> TestResult {
    let mut bytes = unhex(GOLDEN_REQUEST);
    bytes.extend_from_slice(&[0x00, 0xff, 0x01]);
    refused(&bytes, |e| *e == WireError::TrailingBytes { count: 3 })?;
    let mut bytes = unhex(GOLDEN_REQUEST_ALL);
    bytes.push(0);
    refused(&bytes, |e| *e == WireError::TrailingBytes { count: 1 })
}

#[test]
fn wrong_magic_is_refused() -> TestResult {
    let mut bytes = unhex(GOLDEN_REQUEST);
    bytes[..4].copy_from_slice(b"HWSX");
    refused(&bytes, |e| *e == WireError::BadMagic { found: *b"HWSX" })?;
    refused(b"GET / HTTP/1.1\r\n\r\n", |e| {
        *e == WireError::BadMagic { found: *b"GET " }
    })?;
    refused(b"HWS!", |e| *e == WireError::BadMagic { found: *b"HWS!" })
}

#[test]
fn unknown_versions_are_refused_naming_the_supported_ones() -> TestResult {
    for version in [0u16, 3, 0x0100, 0xffff] {
        let mut bytes = unhex(GOLDEN_REQUEST);
        bytes[4..6].copy_from_slice(&version.to_be_bytes());
        refused(
            &bytes,
            |e| matches!(e, WireError::UnsupportedVersion { found, supported } if *found == version && *supported == [1, 2]),
        )?;
    }
    Ok(())
}

#[test]
fn another_message_kind_is_refused() -> TestResult {
    refused(&unhex(GOLDEN_RESPONSE), |e| {
        *e == WireError::UnexpectedKind {
            found: 2,
            expected: 1,
        }
    })?;
    let mut bytes = unhex(GOLDEN_REQUEST);
    bytes[6] = 0x03;
    refused(&bytes, |e| {
        *e == WireError::UnexpectedKind {
            found: 3,
            expected: 1,
        }
    })?;
    assert_eq!(
        wire::decode::<ExchangeResponse>(&unhex(GOLDEN_REQUEST)),
        Err(WireError::UnexpectedKind {
            found: 1,
            expected: 2
        })
    );
    Ok(())
}

#[test]
fn oversized_messages_are_refused_before_decoding() -> TestResult {
    let mut bytes = unhex(GOLDEN_REQUEST);
    bytes.resize(MAX_MESSAGE_LEN + 1, 0);
    refused(&bytes, |e| {
        *e == WireError::TooLarge {
            len: MAX_MESSAGE_LEN + 1,
            max: MAX_MESSAGE_LEN,
        }
    })
}

#[test]
fn a_zero_node_id_in_the_body_is_malformed() -> TestResult {
    let mut bytes = unhex(GOLDEN_REQUEST);
    bytes[7..23].fill(0);
    refused(&bytes, |e| matches!(e, WireError::Malformed { .. }))?;
    // The run's origin (after header, from, scopes and watermarks).
    let mut bytes = unhex(GOLDEN_REQUEST);
    let at = hex(&bytes)
        .find("01067368617265640a0a")
        .map(|i| i / 2 + 8)
        .ok_or("run origin not found")?;
    assert_eq!(bytes[at..at + 16], [0x0a; 16]);
    bytes[at..at + 16].fill(0);
    refused(&bytes, |e| matches!(e, WireError::Malformed { .. }))
}

#[test]
fn an_invalid_scope_in_the_body_is_malformed() -> TestResult {
    let mut request = golden_request();
    request.page.runs[0].scope = scope("app/aa/x");
    request.scopes = ScopeFilter::All;
    let mut bytes = wire::encode(&request);
    let at = bytes
        .windows(8)
        .position(|w| w == b"app/aa/x")
        .ok_or("scope not found")?;
    bytes[at..at + 8].copy_from_slice(b"app/../x");
    refused(&bytes, |e| matches!(e, WireError::Malformed { .. }))?;
    // An unknown enum tag (ScopeFilter has two variants).
    let mut bytes = unhex(GOLDEN_REQUEST);
    bytes[23] = 0x07;
    refused(&bytes, |e| matches!(e, WireError::Malformed { .. }))
}

#[test]
fn an_unknown_marks_tag_is_malformed() -> TestResult {
    // After the header (7), from (16) and scopes All (1): RequestMarks has two variants.
    let mut bytes = unhex(GOLDEN_REQUEST_ALL);
    assert_eq!(bytes[24], 0x00, "RequestMarks::Full");
    bytes[24] = 0x02;
    refused(&bytes, |e| matches!(e, WireError::Malformed { .. }))?;
    // ResponseMarks has three.
    let mut bytes = unhex(GOLDEN_RESPONSE_SAME);
    bytes[23] = 0x03;
    assert!(matches!(
        wire::decode::<ExchangeResponse>(&bytes),
        Err(WireError::Malformed { .. })
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Marks as digests

#[test]
fn a_marks_digest_the_responder_cannot_resolve_gets_resend_and_changes_nothing() -> TestResult {
    let engine = responder()?;
    let before = state(&engine)?;
    let known = engine
        .peer_watermarks(id(0x0a))?
        .ok_or("the responder recorded 0x0a's marks")?;
    // The golden request carries a page; with a digest of marks the responder never
    // recorded, none of it applies.
    let mut request = golden_request();
    let mut other = known.clone();
    other.observe(&Scope::shared(), Hlc::new(T + 7, id(0x0a)));
    request.marks = RequestMarks::Digest(other.digest());
    let response = engine.answer(request)?;
    assert_eq!(response, ExchangeResponse::resend(engine.node_id()));
    assert_eq!(state(&engine)?, before);
    assert!(engine.get_version(&Scope::shared(), &key("k2"))?.is_none());
    // The digest of what it did record stands for those marks: the page applies.
    let mut request = golden_request();
    request.marks = RequestMarks::Digest(known.digest());
    let response = engine.answer(request)?;
    assert!(matches!(response.marks, ResponseMarks::Full(_)));
    assert!(engine
        .get_version(&Scope::shared(), &key("k2"))?
        .is_some_and(|v| v.is_tombstone()));
    Ok(())
}

#[test]
fn the_responder_says_same_only_when_its_marks_hash_to_known() -> TestResult {
    let engine = responder()?;
    let mine = engine.watermarks()?;
    let mut request = golden_request_all();
    request.known = Some(mine.digest());
    assert_eq!(engine.answer(request.clone())?.marks, ResponseMarks::Same);
    let mut stale = mine.clone();
    stale.observe(&Scope::shared(), Hlc::new(T, id(0x0c)));
    request.known = Some(stale.digest());
    assert_eq!(engine.answer(request)?.marks, ResponseMarks::Full(mine));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Requests that decode but break the protocol

/// A request from node 0x0b whose page starts with a valid run (a new key) and then holds
/// `bad`: the valid run must not be applied either.
fn request_with(bad: Vec<Run>) -> ExchangeRequest {
    let b = id(0x0b);
    let good = Run {
        scope: Scope::shared(),
        origin: b,
        base: None,
        top: Hlc::new(T + 1, b),
        versions: vec![(
            key("fresh"),
            Version {
                hlc: Hlc::new(T + 1, b),
                op: put(b"good"),
            },
        )],
    };
    let mut runs = vec![good];
    runs.extend(bad);
    ExchangeRequest {
        from: b,
        scopes: ScopeFilter::All,
        marks: RequestMarks::Full(marks(&[(&Scope::shared(), Hlc::new(T + 1, b))])),
        known: None,
        page: Page { runs, more: false },
        limit: 100,
        deferred: vec![],
        ext: Default::default(),
    }
}

fn protocol_refused(
    request: ExchangeRequest,
    expected: impl Fn(&ProtocolError) -> bool,
) -> TestResult {
    let engine = responder()?;
    let before = state(&engine)?;
    match engine.answer(request) {
        Err(HwError::Protocol(p)) => assert!(expected(&p), "unexpected protocol error {p:?}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(state(&engine)?, before);
    assert!(engine.get(&Scope::shared(), &key("fresh"))?.is_none());
    Ok(())
}

fn run_c(base: Option<u64>, top: u64, times: &[u64]) -> Run {
    let c = id(0x0c);
    Run {
        scope: scope("app/notes/items"),
        origin: c,
        base: base.map(|t| Hlc::new(T + t, c)),
        top: Hlc::new(T + top, c),
        versions: times
            .iter()
            .map(|t| {
                (
                    key(&format!("c{t}")),
                    Version {
                        hlc: Hlc::new(T + t, c),
                        op: put(b"c"),
                    },
                )
            })
            .collect(),
    }
}

#[test]
fn runs_out_of_order_are_refused() -> TestResult {
    protocol_refused(request_with(vec![run_c(None, 5, &[2, 1])]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })?;
    protocol_refused(request_with(vec![run_c(None, 5, &[2, 2])]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })?;
    protocol_refused(request_with(vec![run_c(Some(2), 5, &[2])]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })?;
    protocol_refused(request_with(vec![run_c(None, 5, &[6])]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })
}

#[test]
fn a_run_whose_base_is_not_below_its_top_is_refused() -> TestResult {
    protocol_refused(request_with(vec![run_c(Some(5), 5, &[])]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })?;
    protocol_refused(request_with(vec![run_c(Some(6), 5, &[])]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })
}

#[test]
fn a_version_from_another_origin_inside_a_run_is_refused() -> TestResult {
    let mut run = run_c(None, 5, &[1, 2]);
    run.versions[1].1.hlc = Hlc::new(T + 2, id(0x0d));
    protocol_refused(request_with(vec![run]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })
}

#[test]
fn two_runs_for_the_same_scope_and_origin_are_refused() -> TestResult {
    let (c, s) = (id(0x0c), scope("app/notes/items"));
    protocol_refused(
        request_with(vec![run_c(None, 2, &[1]), run_c(Some(2), 4, &[3])]),
        |p| {
            *p == ProtocolError::DuplicateRun {
                scope: s.clone(),
                origin: c,
            }
        },
    )
}

#[test]
fn a_value_over_the_size_limit_is_refused() -> TestResult {
    let mut run = run_c(None, 5, &[1]);
    run.versions[0].1.op = put(&vec![0u8; highwater::record::MAX_VALUE_LEN + 1]);
    protocol_refused(request_with(vec![run]), |p| {
        matches!(p, ProtocolError::MalformedRun { .. })
    })
}

#[test]
fn a_run_for_a_scope_not_in_play_is_refused() -> TestResult {
    let mut request = request_with(vec![run_c(None, 5, &[1])]);
    request.scopes = ScopeFilter::Only(BTreeSet::from([Scope::shared()]));
    protocol_refused(request, |p| {
        *p == ProtocolError::ScopeNotInPlay {
            scope: scope("app/notes/items"),
        }
    })
}

#[test]
fn a_request_from_our_own_id_is_refused() -> TestResult {
    let engine = responder()?;
    let before = state(&engine)?;
    let mut request = request_with(vec![]);
    request.from = engine.node_id();
    match engine.answer(request) {
        Err(HwError::Protocol(ProtocolError::PeerIsSelf { node })) => {
            assert_eq!(node, engine.node_id())
        }
        other => panic!("expected PeerIsSelf, got {other:?}"),
    }
    assert_eq!(state(&engine)?, before);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Audit messages (kinds 3 and 4)
// ---------------------------------------------------------------------------------------

/// An audit request: one scope's range split in two parts (a fingerprint and items), a
/// shipped version, and a wanted item.
fn golden_audit_request() -> AuditRequest {
    let (a, b) = (id(0x0a), id(0x0b));
    let notes = scope("app/notes/items");
    let mid = AuditPoint {
        origin: a,
        time: T + 3,
    };
    AuditRequest {
        from: a,
        scopes: ScopeFilter::All,
        opening: false,
        segments: vec![Segment {
            scope: notes.clone(),
            lo: None,
            parts: vec![
                Part {
                    hi: Some(mid),
                    claim: Claim::Fingerprint(Print { count: 2, sum: 5 }),
                },
                Part {
                    hi: None,
                    claim: Claim::Items(Items(vec![Hlc::new(T + 3, a), Hlc::new(T + 4, a)])),
                },
            ],
        }],
        versions: vec![(
            notes.clone(),
            vec![(
                key("k"),
                Version {
                    hlc: Hlc::new(T + 1, a),
                    op: Op::Delete,
                },
            )],
        )],
        wanted: vec![(notes, Items(vec![Hlc::new(T + 2, b)]))],
        ext: AuditExt::default(),
    }
}

/// An audit response with nothing left open.
fn golden_audit_response() -> AuditResponse {
    AuditResponse {
        from: id(0x0b),
        segments: vec![],
        versions: vec![],
        wanted: vec![],
        offered: vec![],
        halts: vec![],
        ext: AuditExt::default(),
    }
}

const GOLDEN_AUDIT_REQUEST: &str = concat!(
    "4857535900",
    "0103",                             // magic, version 1, kind 3
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", // from 0x0a
    "00",                               // scopes: All
    "00",                               // opening: false
    "39",                               // ranges: 57 bytes, 1 segment
    "01",                               //   head: lo None (kind 0), a scope follows (tag 1)
    "0f",
    "6170702f6e6f7465732f6974656d73", //   scope "app/notes/items"
    "02",                             //   2 parts
    "04",
    "0500000000000000", //     Fingerprint: count 2 << 1 | 0, sum 5 (u64 LE)
    "8f8080808080f1a79503",
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", //     hi: (T+3) << 2 | 3 (another origin), 0x0a
    "05",                               //     Items: 2 << 1 | 1
    "01",                               //       T+3: the last point's origin, + 0
    "05",                               //       T+4: + 1 (1 << 2 | 1)
    "00",                               //     hi: None
    "01",                               // versions: 1 scope
    "0f",
    "6170702f6e6f7465732f6974656d73", //   scope "app/notes/items"
    "01",
    "01",
    "6b", //   1 version, key "k"
    "8180808080a0fca965",
    "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", // Hlc T+1, 0x0a
    "01",                               //   op: Delete
    "01",                               // wanted: 1 scope
    "0f",
    "6170702f6e6f7465732f6974656d73", //   scope "app/notes/items"
    "01",
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", //   1 group, origin 0x0b
    "01",
    "8280808080a0fca965", //   1 time: T+2
);

const GOLDEN_AUDIT_RESPONSE: &str = concat!(
    "4857535900",
    "0104",                             // magic, version 1, kind 4
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", // from 0x0b
    "00",
    "00",
    "00",
    "00",
    "00", // nothing open, shipped, wanted,
          // offered or halted
);

#[test]
fn audit_messages_are_pinned() -> TestResult {
    let request = golden_audit_request();
    let bytes = wire::encode(&request);
    assert_eq!(hex(&bytes), GOLDEN_AUDIT_REQUEST);
    assert_eq!(wire::decode::<AuditRequest>(&bytes)?, request);
    let response = golden_audit_response();
    let bytes = wire::encode(&response);
    assert_eq!(hex(&bytes), GOLDEN_AUDIT_RESPONSE);
    assert_eq!(wire::decode::<AuditResponse>(&bytes)?, response);
    // An audit message is not an exchange message, and the other way round.
    assert!(matches!(
        wire::decode::<ExchangeRequest>(&bytes),
        Err(WireError::UnexpectedKind {
            found: 4,
            expected: 1
        })
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Protocol version 2: an extension after the version 1 body, used only when needed
// ---------------------------------------------------------------------------------------

/// A response whose extension says how much remains: version 2.
fn golden_response_v2() -> ExchangeResponse {
    ExchangeResponse {
        ext: ResponseExt {
            remaining: Some(1000),
            floors: vec![(Scope::shared(), T)],
            refused: vec![],
            previous: None,
        },
        ..golden_response_same()
    }
}

const GOLDEN_RESPONSE_V2: &str = concat!(
    "4857535900",
    "0202",                             // magic, version 2, kind 2
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", // from 0x0b
    "01",                               // marks: Same
    "00",
    "00", // page: no runs, more: false
    "00", // halts: none
    "01",
    "e807", // ext: remaining Some(1000)
    "01",
    "06",
    "736861726564",       // floors: 1, scope "shared"
    "8080808080a0fca965", //   time T
    "00",                 // refused: none
    "00",                 // previous: None
);

/// An audit response that reports a refusal below the floor: version 2.
fn golden_audit_response_v2() -> AuditResponse {
    AuditResponse {
        ext: AuditExt {
            floors: None,
            refused: vec![(Scope::shared(), key("k"), Hlc::new(T, id(0x0a)))],
        },
        ..golden_audit_response()
    }
}

#[test]
fn an_audit_message_reporting_refusals_is_version_2() -> TestResult {
    assert_eq!(wire::encode(&golden_audit_response())[4..6], [0, 1]);
    let v2 = golden_audit_response_v2();
    let bytes = wire::encode(&v2);
    assert_eq!(bytes[4..6], [0, 2]);
    let v1_len = wire::encode(&golden_audit_response()).len();
    assert_eq!(
        hex(&bytes[v1_len..]),
        concat!(
            "00", // floors: None
            "01",
            "06",
            "736861726564", // refused: 1, scope "shared"
            "01",
            "6b", // key "k"
            "8080808080a0fca965",
            "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", // Hlc T, 0x0a
        )
    );
    assert_eq!(
        wire::decode_versioned::<AuditResponse>(&bytes)?,
        (v2.clone(), 2)
    );
    assert_eq!(
        wire::encode_as(&v2, 1),
        wire::encode(&golden_audit_response()),
        "left out for a version 1 peer"
    );
    Ok(())
}

/// A quiet round's request addressed to the node it expects: version 2.
#[test]
fn a_request_naming_its_responder_is_version_2_with_the_id_after_the_v1_body() -> TestResult {
    let addressed = ExchangeRequest {
        ext: RequestExt {
            to: Some(id(0x0b)),
            ..RequestExt::default()
        },
        ..golden_request_quiet()
    };
    let bytes = wire::encode(&addressed);
    let v1 = wire::encode(&golden_request_quiet());
    assert_eq!(bytes[4..6], [0, 2]);
    assert_eq!(
        bytes[6..6 + v1.len() - 6],
        v1[6..],
        "the version 1 body, unchanged"
    );
    assert_eq!(
        hex(&bytes[v1.len()..]),
        concat!(
            "00",                                 // ext: floors None
            "00",                                 // refused: none
            "010b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", // to: Some(0x0b)
        )
    );
    assert_eq!(wire::decode::<ExchangeRequest>(&bytes)?, addressed);
    Ok(())
}

#[test]
fn a_message_goes_out_in_the_lowest_version_that_carries_it() -> TestResult {
    // Nothing of version 2 used: version 1, byte for byte (the golden tests above).
    assert_eq!(wire::encode(&golden_response_same())[4..6], [0, 1]);
    // The extension used: version 2, the version 1 body then the extension.
    let v2 = golden_response_v2();
    let bytes = wire::encode(&v2);
    assert_eq!(hex(&bytes), GOLDEN_RESPONSE_V2);
    assert_eq!(
        wire::decode_versioned::<ExchangeResponse>(&bytes)?,
        (v2.clone(), 2)
    );
    // Encoded for a version 1 peer, the extension is left out.
    let v1 = wire::encode_as(&v2, 1);
    assert_eq!(v1, wire::encode(&golden_response_same()));
    assert_eq!(
        wire::decode::<ExchangeResponse>(&v1)?,
        golden_response_same()
    );
    // A version 2 envelope must carry the extension: without it the body is short.
    let mut cut = wire::encode(&golden_response_same());
    cut[5] = 2;
    assert_eq!(
        wire::decode::<ExchangeResponse>(&cut),
        Err(WireError::Truncated)
    );
    // And a version this build does not know is refused naming the ones it does.
    let mut unknown = bytes.clone();
    unknown[5] = 3;
    assert_eq!(
        wire::decode::<ExchangeResponse>(&unknown)
            .expect_err("version 3 is unknown")
            .to_string(),
        "unsupported protocol version 3; supported: [1, 2]"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Streamed pulls: the frames after a response (kind 5, version 2 only), length-prefixed
// ---------------------------------------------------------------------------------------

/// A frame of a streamed pull: the third, with one empty run, more to come.
fn golden_frame() -> PageFrame {
    let b = id(0x0b);
    PageFrame {
        seq: 3,
        page: Page {
            runs: vec![Run {
                scope: Scope::shared(),
                origin: b,
                base: Some(Hlc::new(T + 1, b)),
                top: Hlc::new(T + 5, b),
                versions: vec![],
            }],
            more: true,
        },
        remaining: Some(1000),
        end: false,
    }
}

const GOLDEN_FRAME: &str = concat!(
    "48575359",
    "0002",
    "05", // header: magic, version 2, frame
    "03", // seq 3
    "01", // page: 1 run
    "06",
    "736861726564",                     //   scope "shared"
    "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", //   origin 0x0b
    "01",
    "8180808080a0fca965", //   base Some(T+1)
    "8580808080a0fca965", //   top T+5
    "00",                 //   no versions
    "01",                 //   more: true
    "01",
    "e807", // remaining Some(1000)
    "00",   // end: false
);

#[test]
fn golden_frame_is_pinned() -> TestResult {
    let bytes = wire::encode(&golden_frame());
    assert_eq!(hex(&bytes), GOLDEN_FRAME);
    assert_eq!(
        wire::decode_versioned::<PageFrame>(&bytes)?,
        (golden_frame(), 2)
    );
    // A frame is not a response, nor the other way round.
    assert!(matches!(
        wire::decode::<ExchangeResponse>(&bytes),
        Err(WireError::UnexpectedKind {
            found: 5,
            expected: 2
        })
    ));
    Ok(())
}

/// A streamed body: each message's length in 4 bytes big-endian, then the message; split
/// back the same whatever the sizes of the pieces it arrives in.
#[test]
fn a_stream_splits_back_into_its_messages_whatever_its_pieces() -> TestResult {
    let response = wire::encode_framed(&golden_response(), 1);
    let frame = wire::encode_framed(&golden_frame(), 2);
    let plain = wire::encode(&golden_response());
    assert_eq!(
        response[..4],
        u32::try_from(plain.len())?.to_be_bytes(),
        "the length prefix"
    );
    assert_eq!(response[4..], plain[..]);
    let stream = [response.clone(), frame.clone()].concat();
    for piece in 1..=stream.len() {
        let mut unframer = wire::Unframer::new(wire::MAX_MESSAGE_LEN);
        let mut messages = Vec::new();
        for chunk in stream.chunks(piece) {
            unframer.push(chunk);
            while let Some(message) = unframer.next_message()? {
                messages.push(message);
            }
        }
        assert!(unframer.is_empty(), "ended between messages");
        assert_eq!(messages.len(), 2, "pieces of {piece}");
        assert_eq!(
            wire::decode::<ExchangeResponse>(&messages[0])?,
            golden_response()
        );
        assert_eq!(wire::decode::<PageFrame>(&messages[1])?, golden_frame());
    }
    // A stream cut inside a message is told from one that ended between two.
    let mut unframer = wire::Unframer::new(wire::MAX_MESSAGE_LEN);
    unframer.push(&stream[..response.len() + 3]);
    assert!(unframer.next_message()?.is_some());
    assert_eq!(unframer.next_message()?, None);
    assert!(!unframer.is_empty());
    // A prefix over the limit is refused before its bytes are read; so is an empty message.
    let mut unframer = wire::Unframer::new(100);
    unframer.push(&101u32.to_be_bytes());
    assert_eq!(
        unframer.next_message(),
        Err(WireError::TooLarge { len: 101, max: 100 })
    );
    let mut unframer = wire::Unframer::new(100);
    unframer.push(&[0, 0, 0, 0]);
    assert_eq!(unframer.next_message(), Err(WireError::Truncated));
    Ok(())
}
