//! Streamed pushes (issue 19): a device with many local writes sends them in one request,
//! its pages back to back, each applied by the responder as it arrives in its own
//! transaction. A transfer cut anywhere keeps the pages the responder applied and the next
//! rounds resume from the marks; frames out of order are refused with nothing after them
//! applied; a responder that stops taking frames holds the sender to the window; a transport
//! or peer that cannot take a push gets the pages in rounds; a token may not write through a
//! frame what it may not write through a request.

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::rounds::{link, TestResult};
use common::streams::{push_node as node, push_scopes as scopes, serve_counted, Plain};
use futures_executor::block_on;
use highwater::error::{Error, TransportError};
use highwater::exchange::{PushStart, PushTransfer};
use highwater::testing::{FaultyTransport, PullFault};
use highwater::transport::{Refusal, RefusalCode, PULL_WINDOW};
use highwater::wire::{ExchangeRequest, ExchangeResponse, PageFrame};
use highwater::{
    ExchangeOptions, InProcess, Key, ManualTime, Responder, Scope, SyncEngine, Transport,
};

/// Versions the device writes: half in each of two scopes.
const VERSIONS: usize = 3000;
/// The page limit of the rounds here: 30 pages.
const PAGE: usize = 100;

fn options() -> ExchangeOptions {
    ExchangeOptions {
        page_limit: Some(PAGE),
        ..ExchangeOptions::default()
    }
}

/// A device back from a long offline stretch: [`VERSIONS`] local writes, half in each scope
/// (each with a small file of its own when `files`).
fn device(time: &Arc<ManualTime>, push_frames: u32, files: bool) -> TestResult<Arc<SyncEngine>> {
    let device = node(time, push_frames)?;
    for scope in scopes()? {
        for i in 0..VERSIONS / 2 {
            let key = Key::try_from(format!("k{i:05}").as_str())?;
            let value = format!("v{i}").into_bytes();
            match files {
                true => {
                    let file = format!("file {i} of {scope}").into_bytes();
                    device.put_file_bytes(&scope, &key, value, &file)?;
                }
                false => drop(device.put(&scope, &key, value)?),
            }
        }
    }
    Ok(device)
}

/// Versions `node` holds, in every scope.
fn held(node: &SyncEngine) -> TestResult<usize> {
    let mut n = 0;
    for scope in scopes()? {
        n += node.versions(&scope)?.len();
    }
    Ok(n)
}

/// The watermark invariant on the receiver of a push, strictly (the device writes nothing
/// meanwhile): every version the device holds at or below one of the hub's marks is on the
/// hub, or a newer one of its key.
fn check_marks(hub: &SyncEngine, device: &SyncEngine) -> TestResult {
    let marks = hub.watermarks()?;
    for scope in scopes()? {
        let held: std::collections::BTreeMap<Key, highwater::Version> =
            hub.versions(&scope)?.into_iter().collect();
        for (key, version) in device.versions(&scope)? {
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

/// The first round between two nodes ships nothing (neither knows what the other holds):
/// it learns the hub's marks, and says there is more.
async fn first_contact<T: Transport>(device: &SyncEngine, to_hub: &T) -> TestResult {
    let out = device.exchange_with(to_hub, &options()).await?;
    assert_eq!((out.shipped, out.has_more), (0, true), "{out:?}");
    Ok(())
}

#[test]
fn one_request_moves_every_page() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let streamed = device(&time, 256, false)?;
    let to_hub = link(&hub);
    block_on(first_contact(&streamed, &to_hub))?;
    let out = block_on(streamed.exchange_with(&to_hub, &options()))?;
    assert_eq!((out.shipped, out.has_more), (VERSIONS, false), "{out:?}");
    assert_eq!(to_hub.stats().requests, 2, "one request pushed every page");
    assert_eq!(held(&hub)?, VERSIONS);
    assert_eq!(hub.digest()?, streamed.digest()?);
    assert_eq!(hub.watermarks()?, streamed.watermarks()?);
    // The response carried the hub's marks with the pushed pages: the device knows it holds
    // them, and the next round is quiet.
    let known = streamed.peer_watermarks(hub.node_id())?;
    assert_eq!(known.as_ref(), Some(&hub.watermarks()?));
    let out = block_on(streamed.exchange_with(&to_hub, &options()))?;
    assert_eq!((out.shipped, out.has_more), (0, false), "{out:?}");

    // The same push in rounds takes a round trip a page, and ends in the same state.
    let hub_rounds = node(&time, 256)?;
    let rounds = device(&time, 0, false)?;
    let to_hub = link(&hub_rounds);
    block_on(first_contact(&rounds, &to_hub))?;
    let mut n = 1;
    while block_on(rounds.exchange_with(&to_hub, &options()))?.has_more {
        n += 1;
    }
    assert_eq!(n, VERSIONS / PAGE);
    assert_eq!(to_hub.stats().requests, 1 + (VERSIONS / PAGE) as u64);
    assert_eq!(hub_rounds.digest()?, rounds.digest()?);
    Ok(())
}

#[test]
fn the_responder_tells_each_pushed_page_as_it_is_applied() -> TestResult {
    use highwater::notify::{Event, Notice, SyncEvent};
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let streamed = device(&time, 256, false)?;
    let to_hub = link(&hub);
    block_on(first_contact(&streamed, &to_hub))?;
    let mut events = SyncEngine::notifier(&hub).subscribe();
    let out = block_on(streamed.exchange_with(&to_hub, &options()))?;
    assert_eq!((out.shipped, out.has_more), (VERSIONS, false), "{out:?}");
    let mut told = Vec::new();
    while let Some(notice) = events.try_recv() {
        if let Notice::Event(Event::Sync(SyncEvent::PageApplied {
            peer,
            seq,
            received,
            applied,
            remaining,
        })) = notice
        {
            assert_eq!(peer, streamed.node_id().to_string());
            told.push((seq, received, applied, remaining));
        }
    }
    // The request's page is not told; each of the 29 frames after it is. A pushing device
    // does not count what it has left (a responder's count is for its initiator's bar).
    let frames = (VERSIONS / PAGE - 1) as u32;
    let expected: Vec<_> = (1..=frames).map(|seq| (seq, PAGE, PAGE, None)).collect();
    assert_eq!(told, expected);
    Ok(())
}

/// A transfer limited to a few frames ends with `has_more`, and the next round pushes on
/// from the marks the response told.
#[test]
fn a_transfer_ends_at_its_frame_budget_and_the_next_goes_on() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let device = device(&time, 4, false)?;
    let to_hub = link(&hub);
    block_on(first_contact(&device, &to_hub))?;
    let out = block_on(device.exchange_with(&to_hub, &options()))?;
    assert_eq!(
        out.shipped,
        5 * PAGE,
        "the request and four frames: {out:?}"
    );
    assert!(out.has_more);
    check_marks(&hub, &device)?;
    let mut rounds = 1;
    while block_on(device.exchange_with(&to_hub, &options()))?.has_more {
        rounds += 1;
        check_marks(&hub, &device)?;
    }
    assert_eq!(rounds + 1, VERSIONS / (5 * PAGE));
    assert_eq!(to_hub.stats().requests, 1 + (VERSIONS / (5 * PAGE)) as u64);
    assert_eq!(hub.digest()?, device.digest()?);
    Ok(())
}

#[test]
fn a_cut_transfer_keeps_the_pages_applied_and_the_next_rounds_resume() -> TestResult {
    for cut in [0, 1, 7, 28] {
        let time = Arc::new(ManualTime::new(1_000_000));
        let hub = node(&time, 256)?;
        let device = device(&time, 256, false)?;
        let to_hub = FaultyTransport::new(InProcess::new(hub.clone()));
        block_on(first_contact(&device, &to_hub))?;
        to_hub.fault_pushes(Some(PullFault::CutAfter(cut)));
        let Err(e) = block_on(device.exchange_with(&to_hub, &options())) else {
            panic!("a cut transfer reported success");
        };
        assert!(matches!(e, Error::Transport(_)), "{e:?}");
        assert_eq!(to_hub.push_faults(), 1);
        // The request's page and every frame before the cut are applied, marks and all.
        assert_eq!(held(&hub)?, (cut + 1) * PAGE, "cut after {cut}");
        check_marks(&hub, &device)?;
        to_hub.fault_pushes(None);
        // The next round goes plain and learns the hub's marks (its page may be one the hub
        // has); the ones after push on from them, never again what the hub applied.
        let mut shipped = 0;
        loop {
            let out = block_on(device.exchange_with(&to_hub, &options()))?;
            shipped += out.shipped;
            check_marks(&hub, &device)?;
            if !out.has_more {
                break;
            }
        }
        let left = VERSIONS - (cut + 1) * PAGE;
        assert!(
            (left..=left + PAGE).contains(&shipped),
            "cut after {cut}: {shipped} versions sent to resume, {left} were left"
        );
        assert_eq!(hub.digest()?, device.digest()?);
        assert_eq!(hub.watermarks()?, device.watermarks()?);
    }
    Ok(())
}

#[test]
fn frames_out_of_order_are_refused_and_nothing_after_them_applies() -> TestResult {
    for fault in [PullFault::Repeat(2), PullFault::Swap(3)] {
        let time = Arc::new(ManualTime::new(1_000_000));
        let hub = node(&time, 256)?;
        let device = device(&time, 256, false)?;
        let to_hub = FaultyTransport::new(InProcess::new(hub.clone()));
        block_on(first_contact(&device, &to_hub))?;
        to_hub.fault_pushes(Some(fault));
        let Err(e) = block_on(device.exchange_with(&to_hub, &options())) else {
            panic!("{fault:?} was taken");
        };
        let (due, found, applied_frames) = match fault {
            PullFault::Repeat(n) => (n + 1, n, n),
            PullFault::Swap(n) => (n, n + 1, n - 1),
            PullFault::CutAfter(_) => unreachable!(),
        };
        let Error::Transport(TransportError::Refused { code, reason }) = &e else {
            panic!("{fault:?}: {e:?}");
        };
        assert_eq!(*code, RefusalCode::BadRequest, "{reason}");
        let told = format!("frame {found} where frame {due} was due");
        assert!(reason.contains(&told), "{fault:?}: {reason}");
        assert_eq!(
            held(&hub)?,
            (1 + applied_frames as usize) * PAGE,
            "{fault:?}"
        );
        check_marks(&hub, &device)?;
        to_hub.fault_pushes(None);
        while block_on(device.exchange_with(&to_hub, &options()))?.has_more {}
        assert_eq!(hub.digest()?, device.digest()?);
    }
    Ok(())
}

/// A responder whose frames wait at a gate until it opens, and which counts the
/// `blobs_present` questions it is asked: the initiator asks one for each page it plans
/// (every version has a file), the request's too.
#[derive(Clone)]
struct Gated {
    inner: Arc<SyncEngine>,
    open: Arc<(Mutex<bool>, Condvar)>,
    asked: Arc<(Mutex<u32>, Condvar)>,
}

impl Gated {
    fn new(inner: &Arc<SyncEngine>) -> Gated {
        Gated {
            inner: inner.clone(),
            open: Arc::default(),
            asked: Arc::default(),
        }
    }

    /// Waits until at least `n` questions were asked, or `within` passed; the count.
    fn wait_for(&self, n: u32, within: Duration) -> u32 {
        let (count, changed) = &*self.asked;
        let guard = count.lock().expect("not poisoned");
        let (guard, _) = changed
            .wait_timeout_while(guard, within, |c| *c < n)
            .expect("not poisoned");
        *guard
    }

    fn open(&self) {
        let (open, changed) = &*self.open;
        *open.lock().expect("not poisoned") = true;
        changed.notify_all();
    }
}

/// Opens the gate when dropped.
struct OpenOnDrop(Gated);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

impl Responder for Gated {
    fn node_id(&self) -> highwater::NodeId {
        self.inner.node_id()
    }
    fn respond(&self, request: ExchangeRequest) -> Result<ExchangeResponse, Refusal> {
        self.inner.respond(request)
    }
    fn takes_pushes(&self) -> bool {
        true
    }
    fn open_push(&self, request: ExchangeRequest) -> Result<PushStart, Refusal> {
        Responder::open_push(&*self.inner, request)
    }
    fn push_frame(&self, transfer: &mut PushTransfer, frame: PageFrame) -> Result<(), Refusal> {
        let (open, changed) = &*self.open;
        let guard = open.lock().expect("not poisoned");
        drop(changed.wait_while(guard, |o| !*o).expect("not poisoned"));
        self.inner.push_frame(transfer, frame)
    }
    fn close_push(&self, transfer: PushTransfer) -> Result<ExchangeResponse, Refusal> {
        self.inner.close_push(transfer)
    }
    fn blobs_present(&self, hashes: &[highwater::Hash]) -> Result<Vec<bool>, Refusal> {
        let (count, changed) = &*self.asked;
        *count.lock().expect("not poisoned") += 1;
        changed.notify_all();
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

/// The responder applies frames on the runtime's blocking threads while the sender plans on
/// its own: so the test runs on a runtime (without one, the in-process transport applies on
/// the caller's thread, and a frame at the gate would hold the planning too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_that_stops_taking_frames_holds_the_sender_to_the_window() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let device = device(&time, 256, true)?;
    let gated = Gated::new(&hub);
    let transport = Arc::new(InProcess::new(gated.clone()));
    first_contact(&device, &*transport).await?;
    let asked_before = gated.wait_for(0, Duration::ZERO);
    // However the test ends, the gate opens: a frame held at it would keep the runtime
    // from shutting down.
    let _open = OpenOnDrop(gated.clone());
    let pushing = {
        let (device, transport) = (device.clone(), transport.clone());
        tokio::spawn(async move { device.exchange_with(&*transport, &options()).await })
    };
    // The first frame waits at the gate: the sender plans it, the window behind it, and one
    // that waits to go in (each asked about its files first); the request's page was asked
    // about too. One more frame may be planned and asked about meanwhile: the next frame's
    // files go while the one before waits.
    let window = asked_before + 1 + 1 + PULL_WINDOW as u32 + 1;
    assert!(gated.wait_for(window, Duration::from_secs(10)) >= window);
    let most = window + 1;
    let asked = gated.wait_for(most + 1, Duration::from_millis(300));
    assert!(
        asked <= most,
        "the sender planned past the window of a responder that takes nothing: {asked} pages asked about, at most {most} expected"
    );
    gated.open();
    let out = pushing.await??;
    assert_eq!((out.shipped, out.has_more), (VERSIONS, false), "{out:?}");
    assert_eq!(hub.digest()?, device.digest()?);
    Ok(())
}

#[test]
fn a_transport_or_a_responder_that_cannot_take_a_push_gets_the_pages_in_rounds() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    // A transport without `push`, and a responder whose budget is 0 (it takes none).
    for plain in [true, false] {
        let hub = node(&time, if plain { 256 } else { 0 })?;
        let device = device(&time, 256, false)?;
        let inner = link(&hub);
        let rounds = if plain {
            let plain = Plain(inner);
            block_on(first_contact(&device, &plain))?;
            let mut n = 1;
            while block_on(device.exchange_with(&plain, &options()))?.has_more {
                n += 1;
            }
            assert_eq!(plain.0.stats().requests, 1 + (VERSIONS / PAGE) as u64);
            n
        } else {
            block_on(first_contact(&device, &inner))?;
            let mut n = 1;
            while block_on(device.exchange_with(&inner, &options()))?.has_more {
                n += 1;
            }
            assert_eq!(inner.stats().requests, 1 + (VERSIONS / PAGE) as u64);
            n
        };
        assert_eq!(rounds, VERSIONS / PAGE, "plain transport: {plain}");
        assert_eq!(hub.digest()?, device.digest()?);
    }
    Ok(())
}

/// Serves `hub` over HTTP on loopback with `server`, every request counted; `old` answers
/// 404 on `/v1/sync/push`, as a build without streamed pushes does. Returns the URL and the
/// count.
async fn serve(
    hub: Arc<SyncEngine>,
    server: highwater::http::ServerConfig,
    old: bool,
) -> TestResult<(String, Arc<std::sync::atomic::AtomicUsize>)> {
    let sync = highwater::http::HighwaterService::new(hub, server);
    serve_counted(sync, old.then_some("/v1/sync/push")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_one_request_moves_every_page() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let (url, requests) = serve(hub.clone(), Default::default(), false).await?;
    let device = device(&time, 256, false)?;
    let client = highwater::http::HttpTransport::new(&url, None)?;
    first_contact(&device, &client).await?;
    let out = device.exchange_with(&client, &options()).await?;
    assert_eq!((out.shipped, out.has_more), (VERSIONS, false), "{out:?}");
    assert_eq!(requests.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(hub.digest()?, device.digest()?);
    assert_eq!(hub.watermarks()?, device.watermarks()?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_streamed_pushes_gets_the_pages_in_rounds() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let (url, requests) = serve(hub.clone(), Default::default(), true).await?;
    let device = device(&time, 256, false)?;
    let client = highwater::http::HttpTransport::new(&url, None)?;
    let mut rounds = 0;
    while device.exchange_with(&client, &options()).await?.has_more {
        rounds += 1;
    }
    assert_eq!(rounds, VERSIONS / PAGE);
    // First contact, then a round a page: its answer did not offer pushes, so none is
    // opened (a push would be answered 404 while the client still sends).
    assert_eq!(
        requests.load(std::sync::atomic::Ordering::Relaxed),
        1 + VERSIONS / PAGE
    );
    assert_eq!(hub.digest()?, device.digest()?);
    Ok(())
}

/// A token that may write one scope and not the other: the pages of the first are taken,
/// the first frame that carries the other is refused as a request's page would be, and
/// nothing of it or after it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_frame_the_token_may_not_write_is_refused() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let access = highwater::http::Access::from_json(
        r#"{"tokens":[{"name":"notes","token":"nnnnnnnnnnnnnnnn","read":["*"],
            "write":["app/notes/*"],"sync":true}]}"#,
    )?;
    let server = highwater::http::ServerConfig {
        access: Arc::new(access),
        ..Default::default()
    };
    let (url, _) = serve(hub.clone(), server, false).await?;
    let device = device(&time, 256, false)?;
    let client = highwater::http::HttpTransport::new(&url, Some("nnnnnnnnnnnnnnnn".to_owned()))?;
    first_contact(&device, &client).await?;
    let Err(e) = device.exchange_with(&client, &options()).await else {
        panic!("a page the token may not write was taken");
    };
    let Error::Transport(TransportError::Refused { code, reason }) = &e else {
        panic!("{e:?}");
    };
    assert_eq!(*code, RefusalCode::Forbidden, "{reason}");
    let [notes, shared] = scopes()?;
    assert!(reason.contains(&shared.to_string()), "{reason}");
    assert_eq!(hub.versions(&notes)?.len(), VERSIONS / 2);
    assert!(hub.versions(&shared)?.is_empty());
    check_marks(&hub, &device)?;
    Ok(())
}

/// Uploads of one frame's files: a layer that holds the first upload of frame 1 (files
/// `PAGE_OF_FILES..2 * PAGE_OF_FILES`) until an upload of frame 2's files starts, and notes
/// whether one did.
#[derive(Clone, Default)]
struct HoldFirst {
    state: Arc<(Mutex<Overlap>, Condvar)>,
}

#[derive(Default)]
struct Overlap {
    /// The hashes of frame 1's first file and of frame 2's files.
    first: Option<highwater::Hash>,
    second: Vec<highwater::Hash>,
    /// An upload of frame 2 started while the first one of frame 1 was held.
    overlapped: bool,
    second_started: bool,
}

/// Files per page in the overlap test.
const PAGE_OF_FILES: usize = 5;

impl highwater::transport::Layer for HoldFirst {
    fn push_from(
        &self,
        blob: &highwater::BlobRef,
        content: Box<dyn std::io::Read + Send>,
    ) -> Box<dyn std::io::Read + Send> {
        let (state, changed) = &*self.state;
        let mut s = state.lock().expect("not poisoned");
        if s.second.contains(&blob.hash) {
            s.second_started = true;
            changed.notify_all();
        }
        let held = s.first == Some(blob.hash);
        Box::new(Held {
            content,
            state: held.then(|| self.state.clone()),
        })
    }
}

/// An upload's content; the held one waits, at its first read (on the thread that copies
/// it, not the round's task), until frame 2's uploads begin, and gives up after a while,
/// which the test then reports (it would wait for ever if the uploads went one frame at a
/// time).
struct Held {
    content: Box<dyn std::io::Read + Send>,
    state: Option<Arc<(Mutex<Overlap>, Condvar)>>,
}

impl std::io::Read for Held {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(state) = self.state.take() {
            let (state, changed) = &*state;
            let s = state.lock().expect("not poisoned");
            let (mut s, _) = changed
                .wait_timeout_while(s, Duration::from_secs(20), |s| !s.second_started)
                .expect("not poisoned");
            s.overlapped = s.second_started;
        }
        self.content.read(buf)
    }
}

/// The files of the next frame start uploading while the last of the frame before are still
/// going: an upload of frame 1 held until one of frame 2 starts does not stall the push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_frames_files_upload_while_the_last_ones_go() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, 256)?;
    let device = node(&time, 256)?;
    let [notes, _] = scopes()?;
    let files = 4 * PAGE_OF_FILES;
    let content = |i: usize| format!("file {i}").into_bytes();
    let mut hashes = Vec::new();
    for i in 0..files {
        let key = Key::try_from(format!("f{i:03}").as_str())?;
        device.put_file_bytes(&notes, &key, b"v".to_vec(), &content(i))?;
        hashes.push(highwater::Hash::of(&content(i)));
    }
    let layer = HoldFirst::default();
    {
        let mut s = layer.state.0.lock().expect("not poisoned");
        s.first = Some(hashes[PAGE_OF_FILES]);
        s.second = hashes[2 * PAGE_OF_FILES..3 * PAGE_OF_FILES].to_vec();
    }
    let to_hub = highwater::transport::Layered::with_layer(link(&hub), layer.clone());
    let options = ExchangeOptions {
        page_limit: Some(PAGE_OF_FILES),
        ..ExchangeOptions::default()
    };
    let out = device.exchange_with(&to_hub, &options).await?;
    assert_eq!((out.shipped, out.has_more), (0, true), "{out:?}");
    let out = device.exchange_with(&to_hub, &options).await?;
    assert_eq!((out.shipped, out.has_more), (files, false), "{out:?}");
    assert_eq!(out.blobs_pushed, files, "each file went once");
    assert_eq!(to_hub.inner().stats().blob_pushes, files as u64);
    assert!(
        layer.state.0.lock().expect("not poisoned").overlapped,
        "frame 2's files waited for frame 1's last upload"
    );
    assert_eq!(hub.digest()?, device.digest()?);
    for i in 0..files {
        let key = Key::try_from(format!("f{i:03}").as_str())?;
        assert_eq!(hub.residency(&notes, &key)?, highwater::Residency::Resident);
    }
    Ok(())
}
