//! The initiator's half of a round: the driver around [`Initiation`], which plans and
//! finishes the round, while this file does its IO (store, transport, blobs, events).

use crate::error::{Result, TransportError};
use crate::exchange::plan::PageLimits;
use crate::exchange::{
    marks_in_play, AppliedPage, ExchangeOptions, ExchangeOutcome, Halt, Initiation, PullCursor,
    Pushed, Received, Reply, Session,
};
use crate::hlc::{duration_to_ntp64, NodeId};
use crate::notify::ChangeKind;
use crate::record::BlobRef;
use crate::record::ScopeFilter;
use crate::transport::{frames_from, Pull, Transport, PULL_WINDOW};
use crate::wire::{ExchangeRequest, ExchangeResponse, PageFrame};
use futures_util::StreamExt;

use super::blobs::{blobs_of, Pin, Uploads};
use super::purge::{crosses, floor_in, floors_in, FLOORS_FRESH};
use super::receive::{Applied, Sender};
use super::{lock, SyncEngine};

impl SyncEngine {
    /// Runs one exchange round as initiator over `transport`, for all scopes.
    ///
    /// The engine keeps what it learns of the peer between rounds (a [`Session`] per peer);
    /// callers that keep their own use [`SyncEngine::exchange_in`].
    ///
    /// # Errors
    /// The transport failed, the peer's answer broke the protocol (nothing of it is
    /// applied), or the store failed.
    pub async fn exchange<T: Transport + ?Sized>(&self, transport: &T) -> Result<ExchangeOutcome> {
        self.exchange_with(transport, &ExchangeOptions::default())
            .await
    }

    /// Runs one exchange round as initiator over `transport`, with the session the engine
    /// keeps for the peer.
    ///
    /// # Errors
    /// As for [`SyncEngine::exchange`].
    pub async fn exchange_with<T: Transport + ?Sized>(
        &self,
        transport: &T,
        options: &ExchangeOptions,
    ) -> Result<ExchangeOutcome> {
        let mut session = self.kept_session(transport.peer_id());
        let result = self.exchange_in(&mut session, transport, options).await;
        if let Some(peer) = session.peer() {
            lock(&self.inner.peers).sessions.insert(peer, session);
        }
        result
    }

    /// Runs one exchange round as initiator over `transport`, with `session`, the caller's
    /// memory of its rounds with that peer (see [`Session`]).
    ///
    /// # Errors
    /// As for [`SyncEngine::exchange`]; also when the transport reaches another node than
    /// the session's peer.
    pub async fn exchange_in<T: Transport + ?Sized>(
        &self,
        session: &mut Session,
        transport: &T,
        options: &ExchangeOptions,
    ) -> Result<ExchangeOutcome> {
        let expected = transport.peer_id();
        self.recall_answered(expected.or(session.peer()), session);
        let limit = options
            .page_limit
            .unwrap_or(self.inner.config.page_limit)
            .max(1);
        let limits = self.page_limits(limit);
        // IMPORTANT: the held marks are taken, not read (see `Initiation::plan`): the
        // planning works on a copy, and the caller's session keeps none until the round
        // completes.
        let mut planning = session.clone();
        session.held = None;
        let engine = self.handle();
        let plan_options = options.clone();
        let (mut round, floors) = self
            .on_storage(move || -> crate::Result<_> {
                let read = engine.inner.store.read()?;
                let round = Initiation::plan(
                    engine.node_id(),
                    &*read,
                    &mut planning,
                    expected,
                    &plan_options,
                    limits,
                    &|b: &BlobRef| engine.has_blob(b),
                )?;
                // Our floors go with the first request of a session, with one at least every
                // `FLOORS_FRESH`, with any that carries versions or refusals, and with each
                // while we pull (the last page was cut): `Some` asks for the peer's floors and
                // refusals in turn, and makes the request version 2, whose answer says how
                // many versions remain.
                let stale = (engine.inner.config.time.now())
                    .saturating_sub(duration_to_ntp64(FLOORS_FRESH).unwrap_or(u64::MAX));
                let tell = planning.floors_heard.is_none_or(|at| at < stale)
                    || !planning.refused.is_empty()
                    || !round.request().page.runs.is_empty()
                    || planning.pulling;
                let floors = match tell {
                    true => Some(floors_in(&*read, round.scopes())?),
                    false => None,
                };
                Ok((round, floors))
            })
            .await??;
        let refused = std::mem::take(&mut session.refused);
        if let Some(floors) = floors {
            round.set_floors(floors, refused);
        }
        // A streamed push is opened when our page was cut (more to send), unless the session
        // found the peer cannot take one, or one of its pushes was cut and no round since
        // learnt the peer's marks; it asks for no pull: the next round does.
        let push = match session.no_push || session.push_unsure {
            true => None,
            false => round.push(self.inner.config.push_frames),
        };
        session.push_unsure |= push.is_some();
        // A streamed pull is asked for while we pull and on a session's first round (both
        // carry our floors, against which the responder plans its frames), unless the
        // session found the peer cannot stream (`send`).
        let stream = self.inner.config.pull_frames > 0
            && push.is_none()
            && round.request().ext.floors.is_some()
            && (session.pulling || session.floors_heard.is_none());
        let mut blobs_pushed = self
            .push_blobs(transport, blobs_of(round.request().page.versions()))
            .await?;
        let mut delivered = Vec::new();
        let pushed = match push {
            None => None,
            Some(cursor) => {
                let request = round.request().clone();
                let (pushed, frames) = self.push(transport, request, cursor).await?;
                if pushed.is_none() {
                    session.no_push = true;
                }
                pushed.map(|response| (response, frames))
            }
        };
        let mut sent = match pushed {
            Some((response, frames)) => {
                blobs_pushed += frames.blobs;
                delivered = frames.delivered;
                round.pushed(frames.pushed);
                Pull {
                    response,
                    frames: None,
                }
            }
            None => {
                self.send(transport, round.request().clone(), stream, session)
                    .await?
            }
        };
        let (received, frames) = loop {
            match round.receive(sent.response)? {
                Reply::Resend(request) => {
                    sent = self.send(transport, request, stream, session).await?;
                }
                Reply::Apply(received) => break (received, sent.frames),
            }
        };
        let label = session
            .name
            .clone()
            .unwrap_or_else(|| received.peer.to_string());
        let scopes = round.scopes().clone();
        let mut audit_wanted = self.heard_floors(received.peer, &received.ext.floors);
        let fetched = self.fetch_for(transport, received).await?;
        let (received, mut taken) = self.apply_fetched(&label, &scopes, fetched).await?;
        // The frames of a streamed pull, each applied as the first page was, in its own
        // transaction, while the responder plans the next ones; the files of the next page
        // are fetched while the page before it is applied.
        let mut cut = None;
        if let Some(mut frames) = frames {
            // The response's page opens the transfer: its progress is told as page 0.
            self.announce_page(&label, 0, &taken.applied, received.ext.remaining);
            let (mut pending, mut refused): (Option<(u32, Fetched<'_>)>, _) = (None, None);
            while !round.stream_ended() {
                let frame = match frames.next().await {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        cut = Some(e);
                        break;
                    }
                    None => {
                        cut = Some(TransportError::Unreachable {
                            reason: "the streamed pull ended before its last frame".to_owned(),
                        });
                        break;
                    }
                };
                let seq = frame.seq;
                let next = match round.frame(&received, frame) {
                    Ok(next) => next,
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                };
                let fetching = self.fetch_for(transport, next);
                let fetched = match pending.take() {
                    None => fetching.await?,
                    Some((before_seq, before)) => {
                        let applying = self.apply_frame(&label, &scopes, before_seq, before);
                        let (applied, fetched) =
                            futures_util::future::join(applying, fetching).await;
                        taken.absorb(applied?);
                        fetched?
                    }
                };
                pending = Some((seq, fetched));
            }
            // A page received in full before a cut or a refused frame is applied too.
            if let Some((seq, last)) = pending {
                taken.absorb(self.apply_frame(&label, &scopes, seq, last).await?);
            }
            if let Some(e) = refused {
                return Err(e);
            }
        }
        audit_wanted |= taken.crossed;
        if let Some(floors) = &round.request().ext.floors {
            audit_wanted |= crosses(&round.request().page, |s| floor_in(floors, s));
            session.floors_heard = Some(self.inner.config.time.now());
        }
        let refused = std::mem::take(&mut taken.applied.refused);
        self.announce(
            ChangeKind::LocalDataSynced,
            Some(received.peer),
            round.delivered(&received).chain(
                (delivered.iter())
                    .filter(|(s, _, h)| {
                        !(received.peer_halts.iter())
                            .any(|p| p.scope == *s && p.origin == h.origin())
                    })
                    .map(|(s, k, h)| (s, k, *h)),
            ),
        );
        let applied = AppliedPage {
            received: taken.applied.received,
            applied: taken.applied.applied,
            halts: taken.applied.halts,
        };
        let mut outcome = round.finish(session, &received, applied, &taken.mine);
        // The peer's marks of the response are recorded: a push may open again.
        session.push_unsure = false;
        outcome.blobs_pushed = blobs_pushed;
        outcome.blobs_fetched = taken.fetched;
        outcome.refused = refused.len();
        outcome.dropped = taken.dropped;
        outcome.audit_wanted = audit_wanted;
        // Refusals below a floor, either way, are halts of their own reason that hold nothing.
        outcome.halts.extend(Halt::below_floor(&refused));
        outcome
            .peer_halts
            .extend(Halt::below_floor(&received.ext.refused));
        // The refusals go out with the next request: one follows at once.
        outcome.has_more |= !refused.is_empty();
        session.refused = refused;
        self.note_exchange(outcome.peer);
        match cut {
            // The pages applied before the cut stay applied, and the session remembers
            // them; the round reports the cut, and the next one resumes from the marks.
            Some(e) => Err(e.into()),
            None => Ok(outcome),
        }
    }

    /// Sends `request` as a streamed push, with the frames `cursor` plans after it: each
    /// planned from a fresh snapshot on the storage lane, its files uploaded, then handed to
    /// the transport through a channel of [`PULL_WINDOW`] frames, so a responder that takes
    /// them slowly holds the planning back. Returns the response (`None`: the transport or
    /// the peer takes no streamed push, and nothing was sent) and what the frames carried.
    ///
    /// # Errors
    /// The transport's, if the transfer was cut or refused (the responder keeps the pages it
    /// applied); planning a frame failed (the transfer is cut there).
    async fn push<T: Transport + ?Sized>(
        &self,
        transport: &T,
        request: ExchangeRequest,
        cursor: PullCursor,
    ) -> Result<(Option<ExchangeResponse>, PushedFrames)> {
        let (tx, rx) = tokio::sync::mpsc::channel(PULL_WINDOW);
        let mut frames = PushedFrames::default();
        let sending = transport.push(request, frames_from(rx));
        let planning = self.plan_frames(transport, cursor, tx, &mut frames);
        let (sent, planned) = futures_util::future::join(sending, planning).await;
        // Not taken: the round goes as a plain one, whatever the planning met meanwhile.
        if let Err(TransportError::Unsupported { .. }) = sent {
            return Ok((None, frames));
        }
        // A frame that could not be planned cut the transfer: that is the round's error.
        planned?;
        Ok((Some(sent?), frames))
    }

    /// Plans a streamed push's frames with `cursor` and sends them into `tx` until the one
    /// with `end`, uploading each page's files before it goes (as a request's are); notes in
    /// `frames` what they carried. The planning of the next frame and the uploads of up to
    /// [`UPLOADING_FRAMES`] frames overlap (sharing one [`Uploads`]: a file goes once, at
    /// most [`TRANSFER_CONCURRENCY`](super::TRANSFER_CONCURRENCY) at once), and the frames
    /// go in order, each once its own uploads have ended. A receiver that goes away (the
    /// transfer failed) ends the planning; a frame that cannot be planned, or whose files
    /// cannot be offered, cuts the transfer.
    async fn plan_frames<T: Transport + ?Sized>(
        &self,
        transport: &T,
        cursor: PullCursor,
        tx: tokio::sync::mpsc::Sender<std::result::Result<PageFrame, TransportError>>,
        frames: &mut PushedFrames,
    ) -> Result<()> {
        let keep = self.inner.notifier.has_subscribers();
        let uploads = Uploads::default();
        let planned = futures_util::stream::unfold(Some(cursor), |cursor| async move {
            let mut cursor = cursor?;
            let engine = self.handle();
            let planned = self
                .on_storage(move || {
                    let frame = (engine.inner.store.read())
                        .map_err(crate::Error::from)
                        .and_then(|read| {
                            cursor.next_frame(&*read, &|b: &BlobRef| engine.has_blob(b))
                        });
                    (cursor, frame)
                })
                .await;
            let (cursor, frame) = match planned {
                Ok((cursor, Ok(frame))) => (cursor, frame),
                Ok((_, Err(e))) => return Some((Err(Cut::planning(e)), None)),
                Err(e) => return Some((Err(Cut::planning(e.into())), None)),
            };
            // The last frame ends the planning.
            let next = (!frame.end).then_some(cursor);
            Some((Ok(frame), next))
        });
        let uploads = &uploads;
        // Boxed as a `Send` stream: the closures' own types would leave the compiler unable
        // to prove a scheduler's round `Send` for every lifetime.
        let mut ready = planned
            .map(|planned| async move {
                let frame = planned?;
                // The files go before the page that references them, as a request's do; a
                // transport that cannot tell which the peer lacks fails the round, as it
                // does before a request.
                let blobs = blobs_of(frame.page.versions());
                match self.push_blobs_in(transport, blobs, uploads).await {
                    Ok(n) => Ok((frame, n)),
                    Err(e) => Err(Cut::uploads(e)),
                }
            })
            .buffered(UPLOADING_FRAMES)
            .boxed();
        while let Some(ready) = ready.next().await {
            let (frame, blobs) = match ready {
                Ok(ready) => ready,
                Err(Cut { reason, error }) => {
                    let cut = TransportError::Unreachable { reason };
                    let _ = tx.send(Err(cut)).await;
                    return Err(error);
                }
            };
            frames.blobs += blobs;
            frames.pushed.note(&frame.page);
            if keep {
                let versions = frame.page.versions();
                frames
                    .delivered
                    .extend(versions.map(|(s, k, v)| (s.clone(), k.clone(), v.hlc)));
            }
            let end = frame.end;
            if tx.send(Ok(frame)).await.is_err() || end {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Sends `request`: as a streamed pull if `stream` and the transport can carry one
    /// (else, remembered in `session`, as one round), or as one round.
    async fn send<T: Transport + ?Sized>(
        &self,
        transport: &T,
        request: ExchangeRequest,
        stream: bool,
        session: &mut Session,
    ) -> Result<Pull> {
        if stream && !session.no_stream {
            match transport.pull(request.clone()).await {
                Err(TransportError::Unsupported { .. }) => session.no_stream = true,
                pulled => return Ok(pulled?),
            }
        }
        let response = transport.exchange(request).await?;
        Ok(Pull {
            response,
            frames: None,
        })
    }

    /// The first half of taking a received page (a response's, or a streamed pull's
    /// frame's): fetches the files it needs that this node lacks, pinned until the page is
    /// applied ([`SyncEngine::apply_fetched`]).
    async fn fetch_for<'a, T: Transport + ?Sized>(
        &'a self,
        transport: &T,
        received: Received,
    ) -> Result<Fetched<'a>> {
        // A page that references no file needs no trip to the storage lane to ask.
        let files = received.page.versions().any(|(_, _, v)| v.blob().is_some());
        let (received, needed) = match files {
            false => (received, Vec::new()),
            true => {
                let engine = self.handle();
                let (received, needed) = self
                    .on_storage(move || {
                        let needed = engine.needed_blobs(received.page.versions());
                        (received, needed)
                    })
                    .await?;
                (received, needed?)
            }
        };
        // Pins keep fetched blobs alive until the page that references them is committed.
        let pins = self.fetch_blobs(transport, needed).await;
        Ok(Fetched { received, pins })
    }

    /// The second half of taking a received page: applies it with its knowledge of the peer
    /// in one transaction, drops the versions the peer refused, and adopts the peer's floors
    /// if the page crossed one. Returns the page and what taking it did.
    async fn apply_fetched(
        &self,
        label: &str,
        scopes: &ScopeFilter,
        fetched: Fetched<'_>,
    ) -> Result<(Received, Taken)> {
        let Fetched { received, pins } = fetched;
        let fetched_count = pins.len();
        let engine = self.handle();
        let (peer, in_play) = (label.to_owned(), scopes.clone());
        let (received, applied) = self
            .on_storage(move || {
                let applied = engine
                    .apply_page(
                        &peer,
                        Sender::Responder,
                        &received.page,
                        &in_play,
                        &received.knowledge,
                        None,
                    )
                    .and_then(|applied| {
                        let dropped =
                            engine.drop_refused(&peer, &in_play, &received.ext.refused)?;
                        let mine = marks_in_play(&*engine.inner.store.read()?, &in_play)?;
                        Ok((applied, dropped, mine))
                    });
                (received, applied)
            })
            .await?;
        let (applied, dropped, mine) = applied?;
        drop(pins);
        // A run whose base lies below its sender's floor may have skipped tombstones the
        // sender purged, which supersede versions the receiver still holds: the two compare
        // contents (the re-clone), whichever side received it.
        let crossed = self.crosses_floor(received.peer, &received.page);
        if crossed {
            // Our marks now cover what its floor answers for: so does ours.
            let (engine, scopes) = (self.handle(), scopes.clone());
            let peer = received.peer;
            self.on_storage(move || engine.adopt_floors(peer, &scopes))
                .await??;
        }
        self.announce_halts(label, &applied.halts);
        let taken = Taken {
            applied,
            dropped: dropped.len(),
            mine,
            fetched: fetched_count,
            crossed,
        };
        Ok((received, taken))
    }

    /// Takes frame `seq` of a streamed pull as [`SyncEngine::apply_fetched`] takes a page,
    /// then publishes `sync_page_applied` for it.
    async fn apply_frame(
        &self,
        label: &str,
        scopes: &ScopeFilter,
        seq: u32,
        fetched: Fetched<'_>,
    ) -> Result<Taken> {
        let (received, taken) = self.apply_fetched(label, scopes, fetched).await?;
        self.announce_page(label, seq, &taken.applied, received.ext.remaining);
        Ok(taken)
    }

    pub(super) fn page_limits(&self, versions: usize) -> PageLimits {
        PageLimits {
            versions,
            bytes: self.inner.config.page_bytes,
        }
    }

    /// A copy of the session the engine keeps for `peer` (a fresh one if none), with its held
    /// marks taken out of the kept one: the round puts them back when it completes.
    fn kept_session(&self, peer: Option<NodeId>) -> Session {
        let mut peers = lock(&self.inner.peers);
        match peer.and_then(|p| peers.sessions.get_mut(&p)) {
            Some(kept) => {
                let session = kept.clone();
                kept.held = None;
                session
            }
            None => Session::new(),
        }
    }

    /// Gives `session` the marks `peer` recorded of ours when we last answered it, if that
    /// came after the session's last round (answering takes them, initiating consumes them).
    fn recall_answered(&self, peer: Option<NodeId>, session: &mut Session) {
        if let Some(held) = peer.and_then(|p| lock(&self.inner.peers).answered.remove(&p)) {
            session.held = Some(held);
        }
    }
}

/// Frames of a streamed push whose files upload at once: the next frame's start while
/// the last files of the one before it are still going.
const UPLOADING_FRAMES: usize = 2;

/// Why a streamed push stopped on the sender's side: what the responder is told, and the
/// round's error.
struct Cut {
    reason: String,
    error: crate::Error,
}

impl Cut {
    fn planning(error: crate::Error) -> Cut {
        Cut {
            reason: "the streamed push stopped: a page could not be planned".to_owned(),
            error,
        }
    }

    fn uploads(error: TransportError) -> Cut {
        Cut {
            reason: format!("the streamed push stopped: {error}"),
            error: error.into(),
        }
    }
}

/// What the frames of a streamed push carried.
#[derive(Default)]
struct PushedFrames {
    pushed: Pushed,
    /// Files uploaded for them.
    blobs: usize,
    /// Their versions, kept only for the change events of a node with subscribers.
    delivered: Vec<(crate::record::Scope, crate::record::Key, crate::hlc::Hlc)>,
}

/// A received page whose files were fetched, with the pins that keep them until it is
/// applied.
struct Fetched<'a> {
    received: Received,
    pins: Vec<Pin<'a>>,
}

/// What taking one received page did (see `SyncEngine::apply_fetched`), summed over the
/// pages of a round.
struct Taken {
    applied: Applied,
    /// Versions of ours the peer refused below its floor, which we dropped.
    dropped: usize,
    /// Our marks in play after the page.
    mine: crate::watermark::ScopedWatermarks,
    /// Files fetched for it.
    fetched: usize,
    /// Whether a run crossed the peer's floor.
    crossed: bool,
}

impl Taken {
    /// Adds what taking a later page of the round did; its marks are the latest.
    fn absorb(&mut self, later: Taken) {
        self.applied.received += later.applied.received;
        self.applied.applied += later.applied.applied;
        self.applied.halts.extend(later.applied.halts);
        self.applied.changed_marks |= later.applied.changed_marks;
        self.applied.refused.extend(later.applied.refused);
        self.dropped += later.dropped;
        self.mine = later.mine;
        self.fetched += later.fetched;
        self.crossed |= later.crossed;
    }
}
