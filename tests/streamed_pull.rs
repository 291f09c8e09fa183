//! Streamed pulls (issue 19): one request, the pages back to back, each applied as it
//! arrives in its own transaction. A transfer cut anywhere keeps the pages before the cut and
//! the next round resumes from the marks; frames out of order are refused; a receiver that
//! stops reading holds the sender to the window; a transport or peer that cannot stream
//! pulls in rounds.

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::rounds::{config, link, TestResult};
use common::streams::{serve_counted, Plain};
use futures_executor::block_on;
use futures_util::StreamExt;
use highwater::error::{Error, ProtocolError};
use highwater::exchange::PullCursor;
use highwater::testing::{FaultyTransport, PullFault};
use highwater::transport::{Refusal, PULL_WINDOW};
use highwater::wire::{ExchangeRequest, ExchangeResponse, PageFrame};
use highwater::{
    EngineConfig, ExchangeOptions, InProcess, Key, ManualTime, Responder, Scope, SyncEngine,
    Transport,
};

/// Versions the hub holds: half its own, half a writer's, in two scopes.
const VERSIONS: usize = 3000;
/// The page limit of the pulls here: 30 pages.
const PAGE: usize = 100;

fn options() -> ExchangeOptions {
    ExchangeOptions {
        page_limit: Some(PAGE),
        ..ExchangeOptions::default()
    }
}

/// A hub with [`VERSIONS`] versions of two origins (its own and a writer's) in two scopes.
/// Async, so a tokio test awaits it: a `block_on` nested in a tokio task never hands the
/// task's cooperative budget back, and after some rounds every tokio resource it polls says
/// "not yet" forever.
async fn hub(time: &Arc<ManualTime>) -> TestResult<Arc<SyncEngine>> {
    let hub = Arc::new(SyncEngine::in_memory_with(config(time))?);
    let writer = Arc::new(SyncEngine::in_memory_with(config(time))?);
    let (a, b) = (Scope::shared(), Scope::app("notes", "items")?);
    for i in 0..VERSIONS / 2 {
        let key = Key::try_from(format!("k{i:05}").as_str())?;
        writer.put(&a, &key, format!("w{i}").into_bytes())?;
        hub.put(&b, &key, format!("h{i}").into_bytes())?;
    }
    // The writer's versions reach the hub in rounds of their own.
    let to_hub = link(&hub);
    while writer.exchange_with(&to_hub, &options()).await?.has_more {}
    Ok(hub)
}

fn device(time: &Arc<ManualTime>, pull_frames: u32) -> TestResult<Arc<SyncEngine>> {
    Ok(Arc::new(SyncEngine::in_memory_with(EngineConfig {
        pull_frames,
        ..config(time)
    })?))
}

/// The watermark invariant, strictly (the hub takes no writes meanwhile): every version the
/// hub holds at or below one of the device's marks is on the device, or a newer one of its
/// key.
fn check_marks(device: &SyncEngine, hub: &SyncEngine) -> TestResult {
    let marks = device.watermarks()?;
    for scope in hub.scopes()? {
        let held: std::collections::BTreeMap<Key, highwater::Version> =
            device.versions(&scope)?.into_iter().collect();
        for (key, version) in hub.versions(&scope)? {
            let passed = marks
                .get(&scope, version.hlc.origin())
                .is_some_and(|w| version.hlc <= w);
            if passed && held.get(&key).is_none_or(|v| v.hlc < version.hlc) {
                return Err(format!("mark passed {key} at {:?} in {scope}", version.hlc).into());
            }
        }
    }
    Ok(())
}

#[test]
fn one_request_brings_every_page() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = block_on(hub(&time))?;
    let streamed = device(&time, 256)?;
    let to_hub = link(&hub);
    let out = block_on(streamed.exchange_with(&to_hub, &options()))?;
    assert!(!out.has_more, "{out:?}");
    assert_eq!(out.received, VERSIONS);
    assert_eq!(out.remaining, Some(0));
    assert_eq!(
        to_hub.stats().requests,
        1,
        "one request, the pages streamed back"
    );
    assert_eq!(streamed.digest()?, hub.digest()?);
    assert_eq!(streamed.watermarks()?, hub.watermarks()?);

    // The same pull in rounds takes a round trip a page, and ends in the same state.
    let rounds = device(&time, 0)?;
    let to_hub = link(&hub);
    let mut n = 0;
    while block_on(rounds.exchange_with(&to_hub, &options()))?.has_more {
        n += 1;
    }
    assert_eq!(n + 1, VERSIONS / PAGE);
    assert_eq!(to_hub.stats().requests, (VERSIONS / PAGE) as u64);
    assert_eq!(rounds.digest()?, streamed.digest()?);

    // At rest the next round is quiet: nothing streams, nothing ships.
    let out = block_on(streamed.exchange_with(&link(&hub), &options()))?;
    assert_eq!((out.received, out.has_more), (0, false), "{out:?}");
    Ok(())
}

/// A transfer limited to a few frames ends with `has_more`, and the next round streams on
/// from the marks.
#[test]
fn a_transfer_ends_at_its_frame_budget_and_the_next_goes_on() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = Arc::new(SyncEngine::in_memory_with(EngineConfig {
        pull_frames: 4,
        ..config(&time)
    })?);
    let source = block_on(self::hub(&time))?;
    while block_on(hub.exchange_with(&link(&source), &options()))?.has_more {}
    let device = device(&time, 256)?;
    let to_hub = link(&hub);
    let out = block_on(device.exchange_with(&to_hub, &options()))?;
    assert_eq!(
        out.received,
        5 * PAGE,
        "the response and four frames: {out:?}"
    );
    assert!(out.has_more);
    check_marks(&device, &hub)?;
    let mut rounds = 1;
    while block_on(device.exchange_with(&to_hub, &options()))?.has_more {
        rounds += 1;
        check_marks(&device, &hub)?;
    }
    assert_eq!(rounds + 1, VERSIONS / (5 * PAGE));
    assert_eq!(device.digest()?, hub.digest()?);
    Ok(())
}

#[test]
fn a_cut_transfer_keeps_its_pages_and_the_next_round_resumes() -> TestResult {
    for cut in [0, 1, 7, 28] {
        let time = Arc::new(ManualTime::new(1_000_000));
        let hub = block_on(hub(&time))?;
        let device = device(&time, 256)?;
        let to_hub = FaultyTransport::new(InProcess::new(hub.clone()));
        to_hub.fault_pulls(Some(PullFault::CutAfter(cut)));
        let Err(e) = block_on(device.exchange_with(&to_hub, &options())) else {
            panic!("a cut transfer reported success");
        };
        assert!(matches!(e, Error::Transport(_)), "{e:?}");
        assert_eq!(to_hub.pull_faults(), 1);
        // The response's page and every frame before the cut are applied, marks and all.
        let held: usize = SyncEngine::scopes(&hub)?
            .iter()
            .map(|s| device.versions(s).map(|v| v.len()))
            .sum::<highwater::Result<usize>>()?;
        assert!(held >= (cut + 1) * PAGE, "cut after {cut}: {held} versions");
        check_marks(&device, &hub)?;
        to_hub.fault_pulls(None);
        let out = block_on(device.exchange_with(&to_hub, &options()))?;
        assert!(!out.has_more, "{out:?}");
        assert_eq!(out.received, VERSIONS - (cut + 1) * PAGE, "cut after {cut}");
        assert_eq!(device.digest()?, hub.digest()?);
    }
    Ok(())
}

#[test]
fn frames_out_of_order_are_refused_and_nothing_after_them_applies() -> TestResult {
    for fault in [PullFault::Repeat(2), PullFault::Swap(3)] {
        let time = Arc::new(ManualTime::new(1_000_000));
        let hub = block_on(hub(&time))?;
        let device = device(&time, 256)?;
        let to_hub = FaultyTransport::new(InProcess::new(hub.clone()));
        to_hub.fault_pulls(Some(fault));
        let Err(e) = block_on(device.exchange_with(&to_hub, &options())) else {
            panic!("{fault:?} was taken");
        };
        let Error::Protocol(ProtocolError::FrameOutOfOrder {
            expected, found, ..
        }) = e
        else {
            panic!("{fault:?}: {e:?}");
        };
        let (expected_due, expected_found, applied_frames) = match fault {
            PullFault::Repeat(n) => (n + 1, n, n),
            PullFault::Swap(n) => (n, n + 1, n - 1),
            PullFault::CutAfter(_) => unreachable!(),
        };
        assert_eq!((expected, found), (expected_due, expected_found));
        let held: usize = SyncEngine::scopes(&hub)?
            .iter()
            .map(|s| device.versions(s).map(|v| v.len()))
            .sum::<highwater::Result<usize>>()?;
        assert_eq!(held, (1 + applied_frames as usize) * PAGE, "{fault:?}");
        check_marks(&device, &hub)?;
        to_hub.fault_pulls(None);
        while block_on(device.exchange_with(&to_hub, &options()))?.has_more {}
        assert_eq!(device.digest()?, hub.digest()?);
    }
    Ok(())
}

/// A responder that keeps the first pull request it answers and counts the frames it
/// plans, waking whoever waits for a count.
#[derive(Clone)]
struct Watched {
    inner: Arc<SyncEngine>,
    seen: Arc<Mutex<Option<ExchangeRequest>>>,
    planned: Arc<(Mutex<u32>, Condvar)>,
}

impl Watched {
    fn new(inner: &Arc<SyncEngine>) -> Watched {
        Watched {
            inner: inner.clone(),
            seen: Arc::default(),
            planned: Arc::default(),
        }
    }

    /// Waits until at least `n` frames were planned, or `within` passed; the count.
    fn wait_for(&self, n: u32, within: Duration) -> u32 {
        let (count, changed) = &*self.planned;
        let guard = count.lock().expect("not poisoned");
        let (guard, _) = changed
            .wait_timeout_while(guard, within, |c| *c < n)
            .expect("not poisoned");
        *guard
    }
}

impl Responder for Watched {
    fn node_id(&self) -> highwater::NodeId {
        self.inner.node_id()
    }
    fn respond(&self, request: ExchangeRequest) -> Result<ExchangeResponse, Refusal> {
        self.inner.respond(request)
    }
    fn respond_pull(
        &self,
        request: ExchangeRequest,
    ) -> Result<(ExchangeResponse, Option<PullCursor>), Refusal> {
        self.seen
            .lock()
            .expect("not poisoned")
            .get_or_insert_with(|| request.clone());
        self.inner.respond_pull(request)
    }
    fn next_frame(&self, cursor: &mut PullCursor) -> Result<PageFrame, Refusal> {
        let frame = self.inner.next_frame(cursor);
        let (count, changed) = &*self.planned;
        *count.lock().expect("not poisoned") += 1;
        changed.notify_all();
        frame
    }
    fn blobs_present(&self, hashes: &[highwater::Hash]) -> Result<Vec<bool>, Refusal> {
        self.inner.blobs_present(hashes)
    }
    fn open_blob(
        &self,
        hash: &highwater::Hash,
    ) -> Result<Option<highwater::blob::BlobReader>, Refusal> {
        self.inner.open_blob(hash)
    }
    fn accept_blob(
        &self,
        blob: &highwater::BlobRef,
        content: &mut dyn std::io::Read,
    ) -> Result<(), Refusal> {
        self.inner.accept_blob(blob, content)
    }
    fn scopes(&self) -> Result<Vec<Scope>, Refusal> {
        Responder::scopes(&*self.inner)
    }
}

#[test]
fn a_receiver_that_stops_reading_holds_the_sender_to_the_window() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = block_on(hub(&time))?;
    let device = device(&time, 256)?;
    let counting = Watched::new(&hub);
    let transport = InProcess::new(counting.clone());
    // A first request as the engine sends it on a session's first round (a pull with its
    // floors), taken from a round that records it.
    let request = first_request(&device, &hub)?;
    let pulled = block_on(transport.pull(request))?;
    let mut frames = pulled.frames.ok_or("a cut page streams frames")?;
    // Nothing read: the sender plans the window, and one frame that waits to go in.
    let window = PULL_WINDOW as u32 + 1;
    assert_eq!(counting.wait_for(window, Duration::from_secs(10)), window);
    assert_eq!(
        counting.wait_for(window + 1, Duration::from_millis(300)),
        window,
        "the sender planned past the window of a receiver that reads nothing"
    );
    // Each frame read lets one more be planned.
    for read in 1..=3 {
        let frame = block_on(frames.next()).ok_or("a frame")??;
        assert_eq!(frame.seq, read);
        assert_eq!(
            counting.wait_for(window + read, Duration::from_secs(10)),
            window + read
        );
    }
    // A receiver that goes away ends the transfer.
    drop(frames);
    let after = counting.wait_for(u32::MAX, Duration::from_millis(300));
    assert!(
        after <= window + 4,
        "planned {after} after the receiver left"
    );
    Ok(())
}

/// The request a device sends first to `hub` (a pull, with the device's floors), taken from
/// a round that records it. It carries the device's marks in full (none), so sent again it
/// opens a pull from nothing, whatever the hub recorded meanwhile.
fn first_request(device: &SyncEngine, hub: &Arc<SyncEngine>) -> TestResult<ExchangeRequest> {
    let recorder = Watched::new(hub);
    let _ = block_on(device.exchange_with(&InProcess::new(recorder.clone()), &options()));
    let request = recorder.seen.lock().expect("not poisoned").take();
    Ok(request.ok_or("no request was sent")?)
}

/// A transport that cannot stream (the trait's default `pull`): the engine pulls in
/// rounds, and remembers not to ask again.
#[test]
fn a_transport_that_cannot_stream_pulls_in_rounds() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = block_on(hub(&time))?;
    let device = device(&time, 256)?;
    let plain = Plain(InProcess::new(hub.clone()));
    let mut rounds = 1;
    while block_on(device.exchange_with(&plain, &options()))?.has_more {
        rounds += 1;
    }
    assert_eq!(rounds, VERSIONS / PAGE);
    assert_eq!(plain.0.stats().requests, (VERSIONS / PAGE) as u64);
    assert_eq!(device.digest()?, hub.digest()?);
    Ok(())
}

/// A responder that will not stream (its `pull_frames` is 0) answers the pull's request as a
/// round: the initiator gets one page and pulls the rest in rounds.
#[test]
fn a_responder_that_will_not_stream_answers_one_page() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let source = block_on(hub(&time))?;
    let hub = device(&time, 0)?;
    while block_on(hub.exchange_with(&link(&source), &options()))?.has_more {}
    let device = device(&time, 256)?;
    let to_hub = link(&hub);
    let out = block_on(device.exchange_with(&to_hub, &options()))?;
    assert_eq!((out.received, out.has_more), (PAGE, true), "{out:?}");
    while block_on(device.exchange_with(&to_hub, &options()))?.has_more {}
    assert_eq!(to_hub.stats().requests, (VERSIONS / PAGE) as u64);
    assert_eq!(device.digest()?, hub.digest()?);
    Ok(())
}

/// Serves `hub` over HTTP on loopback, with every request counted; `old` answers 404 on
/// `/v1/sync/pull`, as a build without streamed pulls does. Returns the URL and the count.
async fn serve_hub(
    hub: Arc<SyncEngine>,
    old: bool,
) -> TestResult<(String, Arc<std::sync::atomic::AtomicUsize>)> {
    let sync =
        highwater::http::HighwaterService::new(hub, highwater::http::ServerConfig::default());
    serve_counted(sync, old.then_some("/v1/sync/pull")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_one_request_brings_every_page() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = hub(&time).await?;
    let (url, requests) = serve_hub(hub.clone(), false).await?;
    let device = device(&time, 256)?;
    let client = highwater::http::HttpTransport::new(&url, None)?;
    let out = device.exchange_with(&client, &options()).await?;
    assert_eq!((out.received, out.has_more), (VERSIONS, false), "{out:?}");
    assert_eq!(requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(device.digest()?, hub.digest()?);
    assert_eq!(device.watermarks()?, hub.watermarks()?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_streamed_pulls_is_pulled_in_rounds() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = hub(&time).await?;
    let (url, requests) = serve_hub(hub.clone(), true).await?;
    let device = device(&time, 256)?;
    let client = highwater::http::HttpTransport::new(&url, None)?;
    let mut rounds = 1;
    while device.exchange_with(&client, &options()).await?.has_more {
        rounds += 1;
    }
    assert_eq!(rounds, VERSIONS / PAGE);
    // One refused pull, then a round a page: the session does not ask again.
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::Relaxed),
        1 + VERSIONS / PAGE
    );
    assert_eq!(device.digest()?, hub.digest()?);
    Ok(())
}

/// Over HTTP the window is the server's channel plus what the sockets buffer: a client that
/// reads nothing of a 200-frame transfer (about 30 MB) stops the server's planning long before
/// its end, and reading on lets the transfer finish, every frame in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_client_that_stops_reading_stops_the_planning() -> TestResult {
    use http_body_util::BodyExt;
    const BIG: usize = 200_000;
    let hub = Arc::new(SyncEngine::in_memory()?);
    let scope = Scope::shared();
    for chunk in (0..BIG).collect::<Vec<_>>().chunks(10_000) {
        hub.write_batch(chunk.iter().map(|i| {
            let key = Key::try_from(format!("k{i:07}").as_str()).expect("a valid key");
            let value = vec![b'v'; 120];
            (scope.clone(), key, highwater::Op::Put { value, blob: None })
        }))?;
    }
    let watched = Watched::new(&hub);
    let sync = highwater::http::HighwaterService::from_parts(
        Arc::new(watched.clone()),
        hub.clone(),
        highwater::http::ServerConfig::default(),
    );
    let (url, _) = serve_counted(sync, None).await?;
    // A session's first request, as the engine sends it: no marks, floors asked.
    let request = ExchangeRequest {
        from: highwater::NodeId::random(),
        scopes: highwater::ScopeFilter::All,
        marks: highwater::wire::RequestMarks::Full(Default::default()),
        known: None,
        page: Default::default(),
        limit: 1000,
        deferred: Vec::new(),
        ext: highwater::wire::RequestExt {
            floors: Some(Vec::new()),
            ..Default::default()
        },
    };
    let body = highwater::wire::encode(&request);
    let len = body.len() as u64;
    let client = highwater::http::HttpTransport::new(&url, None)?;
    let resp = client
        .call(
            hyper::Method::POST,
            "/v1/sync/pull",
            http_body_util::Full::new(bytes::Bytes::from(body))
                .map_err(|e| match e {})
                .boxed(),
            Some(len),
        )
        .await?;
    assert_eq!(resp.status(), hyper::StatusCode::OK);
    // Nothing read: the planning stops where the channel and the sockets are full.
    let frames = (BIG / 1000 - 1) as u32;
    let stalled = watched.wait_for(frames, Duration::from_secs(3));
    assert!(
        stalled < frames / 2,
        "the server planned {stalled} of {frames} frames for a client that read nothing"
    );
    // Read on: every frame arrives, in order, the last with `end`.
    let mut body = resp.into_body();
    let mut unframer = highwater::wire::Unframer::new(highwater::wire::MAX_MESSAGE_LEN);
    let mut messages = Vec::new();
    while let Some(piece) = body.frame().await {
        if let Ok(data) = piece?.into_data() {
            unframer.push(&data);
        }
        while let Some(message) = unframer.next_message()? {
            messages.push(message);
        }
    }
    assert!(unframer.is_empty());
    let response: ExchangeResponse = highwater::wire::decode(&messages[0])?;
    assert!(response.page.more);
    let seqs: Vec<u32> = messages[1..]
        .iter()
        .map(|m| highwater::wire::decode::<PageFrame>(m).map(|f| f.seq))
        .collect::<Result<_, _>>()?;
    assert_eq!(seqs, (1..=frames).collect::<Vec<_>>());
    let last: PageFrame = highwater::wire::decode(&messages[messages.len() - 1])?;
    assert!(last.end && !last.page.more);
    assert_eq!(watched.wait_for(frames, Duration::from_secs(10)), frames);
    Ok(())
}

/// Over HTTP a responder that will not stream ends the transfer with one empty frame: the
/// client takes the first page and pulls the rest in rounds, never seeing a cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_responder_that_will_not_stream_ends_the_transfer_at_once() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let source = hub(&time).await?;
    let hub = device(&time, 0)?;
    while hub
        .exchange_with(&link(&source), &options())
        .await?
        .has_more
    {}
    let (url, requests) = serve_hub(hub.clone(), false).await?;
    let device = device(&time, 256)?;
    let client = highwater::http::HttpTransport::new(&url, None)?;
    let out = device.exchange_with(&client, &options()).await?;
    assert_eq!((out.received, out.has_more), (PAGE, true), "{out:?}");
    let mut rounds = 1;
    while device.exchange_with(&client, &options()).await?.has_more {
        rounds += 1;
    }
    assert_eq!(rounds + 1, VERSIONS / PAGE);
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::Relaxed),
        VERSIONS / PAGE
    );
    assert_eq!(device.digest()?, hub.digest()?);
    Ok(())
}
