//! The change notifier: what happened to a node's data and to its sync, as events.
//!
//! Every engine owns a [`Notifier`]. The engine publishes the three change events
//! (`local-change-recorded`, `remote-update-available`, `local-data-synced`) and the halts
//! it decides (`clock_skew`, `blob_staged`), and each page of a streamed transfer as it is
//! applied (`sync_page_applied`); the scheduler publishes `sync_applied`, `sync_failed` and
//! `sync_retry`.
//!
//! Subscribers read from a bounded buffer ([`EVENT_BUFFER`] events). A subscriber that falls
//! further behind is never waited for: it is told how many events it missed
//! ([`Notice::Missed`]) and goes on from the oldest one still buffered. Syncing never blocks
//! on a subscriber.
//!
//! Separately, the notifier keeps a per-scope change counter, which moves whenever this
//! node's watermarks move (a local write, or a page applied from a peer). The HTTP watch
//! endpoint waits on it: [`Notifier::wait_for_news`] returns as soon as a scope the caller
//! may read changed after its [`WatchToken`].
//!
//! Over 600 lines with its tests (about 550 without): the events, subscriptions and watch tokens
//! are the notifier's one vocabulary.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::hash::Hash;
use crate::hlc::{Hlc, NodeId};
use crate::record::{Hydration, Key, Scope, Version};

/// How many events a subscriber may fall behind before it misses some.
pub const EVENT_BUFFER: usize = 1024;

/// What changed in a node's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A local write committed (`local-change-recorded`).
    LocalChangeRecorded,
    /// Versions from a peer were applied and changed this node's state
    /// (`remote-update-available`).
    RemoteUpdateAvailable,
    /// A peer acknowledged versions this node sent it in a round this node started
    /// (`local-data-synced`). Relayed versions count too: they are ours to deliver.
    LocalDataSynced,
}

impl ChangeKind {
    /// The event's name.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::LocalChangeRecorded => "local-change-recorded",
            ChangeKind::RemoteUpdateAvailable => "remote-update-available",
            ChangeKind::LocalDataSynced => "local-data-synced",
        }
    }
}

/// A change to the records of one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The scope.
    pub scope: Scope,
    /// The affected keys, in the order they were written or sent.
    pub keys: Vec<Key>,
    /// The peer involved (none for a local write): for a remote update the one that sent
    /// the versions, which may only have relayed them.
    pub peer: Option<NodeId>,
    /// The timestamp of each key's version, in `keys` order: its origin is the node that
    /// wrote it.
    pub versions: Vec<Hlc>,
}

/// Something that happened to a node's sync.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncEvent {
    /// A round with `peer` completed (`sync_applied`).
    Applied {
        /// The peer: the name a [`crate::Session`] was given ([`crate::Session::named`];
        /// the scheduler names each peer as it was added), else the peer's node id in hex.
        peer: String,
        /// Versions sent.
        shipped: usize,
        /// Versions received.
        received: usize,
        /// Received versions that changed this node's state.
        applied: usize,
        /// Whether another round will follow at once.
        has_more: bool,
        /// How many versions the peer still holds for this node beyond the round's page,
        /// as it counted them ([`crate::ExchangeOutcome::remaining`]); `None` if it did not.
        remaining: Option<u64>,
    },
    /// A page of a streamed transfer with `peer` was applied (`sync_page_applied`): each
    /// frame of a streamed pull this node initiated, and each frame of a streamed push this
    /// node answers. Published by the engine as the page commits, so a progress bar moves
    /// within a round of hundreds of pages; the round's `sync_applied` still follows, with
    /// the round's totals (the response's page and every frame's).
    PageApplied {
        /// The peer that sent the page (see [`SyncEvent::Applied::peer`]; a responder names
        /// its initiators by id).
        peer: String,
        /// The page's number in its transfer: 1 for the first frame after the answer, 0
        /// for the response's own page when it opens a streamed pull (an initiator tells
        /// it; the request's page of a streamed push is not told).
        seq: u32,
        /// Versions the page carried.
        received: usize,
        /// Of those, versions that changed this node's state.
        applied: usize,
        /// How many versions the sender still held for this node after the page, as it
        /// counted them ([`crate::ExchangeOutcome::remaining`]); `None` if it did not (a
        /// version 1 peer, or the initiator of a push, which does not count).
        remaining: Option<u64>,
    },
    /// A round with `peer` failed (`sync_failed`).
    Failed {
        /// The peer.
        peer: String,
        /// Why, as text.
        error: String,
    },
    /// The next round with `peer` is scheduled after a failure (`sync_retry`).
    Retry {
        /// The peer.
        peer: String,
        /// Consecutive failures so far (1 after the first).
        attempt: u32,
        /// How long until the retry.
        delay: Duration,
    },
    /// A received version is stored without its file, which could not be had; its
    /// origin's watermark waits for it (`blob_staged`).
    BlobStaged {
        /// The peer that sent the version (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The version's scope.
        scope: Scope,
        /// The version's origin.
        origin: NodeId,
        /// The missing blob.
        hash: Hash,
    },
    /// Versions of `origin` were refused because their clock is too far ahead of ours
    /// (`clock_skew`); that origin's stream halts until the clocks agree.
    ClockSkew {
        /// The peer that sent the versions (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The scope.
        scope: Scope,
        /// The origin whose clock is ahead.
        origin: NodeId,
        /// How far ahead, in milliseconds.
        ahead_by_ms: u64,
    },
    /// An audit with `peer`, run by the scheduler, ended (`audit_completed`); see
    /// [`crate::SyncEngine::audit`].
    AuditCompleted {
        /// The peer (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// Versions received (this node lacked them).
        received: usize,
        /// Keys whose version here changed.
        repaired: usize,
        /// Versions sent (the peer lacked them).
        shipped: usize,
        /// Files of Staged records fetched by hash.
        files_repaired: usize,
    },
    /// An audit with `peer`, run by the scheduler, failed (`audit_failed`); the next is due
    /// after the retry delay.
    AuditFailed {
        /// The peer (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// Why, as text.
        error: String,
    },
    /// A peer holds writes by this node's own id that this node does not (its data
    /// directory was restored from a backup, or copied and run twice), so the node took a
    /// fresh id, durably, before issuing another timestamp (`restore_detected`). The old id
    /// is an ordinary origin from now on, and the lost writes come back under it.
    RestoreDetected {
        /// The peer that showed it (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The id the node wrote under until now.
        old: NodeId,
        /// The id it writes under from now on.
        new: NodeId,
        /// The scope where the peer showed it.
        scope: Scope,
        /// Our mark for the old id there (`None`: no write of ours held there).
        ours: Option<Hlc>,
        /// The newest write by the old id the peer holds there.
        theirs: Hlc,
    },
    /// The node at a peer's address is not the one this node syncs with, and nothing
    /// vouches for the change (`peer_refused`): the round is refused and nothing is sent to
    /// it until the operator accepts the new identity
    /// ([`crate::Scheduler::accept_new_identity`], `serve --accept-new-peer-id`).
    PeerRefused {
        /// The peer (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The node this node syncs with there.
        expected: NodeId,
        /// The node that answered.
        found: NodeId,
    },
    /// A version from a peer replaced a write of this node that the peer had not
    /// acknowledged before the round (`overwritten`): a concurrent edit elsewhere won
    /// last-write-wins over a local one. Carries the losing version, so an application can
    /// show the conflict or write it again.
    Overwritten {
        /// The peer that sent the winning version (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The scope.
        scope: Scope,
        /// The key.
        key: Key,
        /// This node's version that lost.
        lost: Version,
        /// The winning version's timestamp (its origin wrote it).
        winner: Hlc,
    },
    /// A file that records here referenced but this node lacked arrived and was verified
    /// (`content_ready`): records of these scopes that point at `hash` went from Staged to
    /// Resident and their files can be read now.
    ContentReady {
        /// The file's hash (records point at it in their [`crate::BlobRef`]).
        hash: Hash,
        /// The scopes with records that reference it.
        scopes: Vec<Scope>,
    },
    /// A scope's hydration changed (`hydration_changed`): a pull of it began, or a round
    /// pulled it completely. Published by the scheduler, after that round's `sync_applied`.
    HydrationChanged {
        /// The scope.
        scope: Scope,
        /// Its state now.
        state: Hydration,
    },
    /// A round with `peer` succeeded after none had or after a failure (`connected`), or
    /// failed after a success (not connected) (`connectivity_changed`). Published by the
    /// scheduler.
    ConnectivityChanged {
        /// The peer (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// Whether the last round succeeded.
        connected: bool,
    },
    /// The peer refused versions this node sent because their clock is too far ahead of
    /// the peer's (`clock_skew_at_peer`): the other side of the peer's `clock_skew`. That
    /// origin's stream to the peer halts until the clocks agree. Published by the scheduler.
    SkewAtPeer {
        /// The peer (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The scope.
        scope: Scope,
        /// The origin whose clock is ahead (this node, or one whose writes it relays).
        origin: NodeId,
        /// How far ahead, in milliseconds, as the peer measured it.
        ahead_by_ms: u64,
    },
    /// The peer at an address now answers as another node, and the change is accepted
    /// (`peer_changed`): the new node vouches that it was the old one before it took a
    /// fresh id (restored from a backup), or the operator accepted it
    /// ([`crate::Scheduler::accept_new_identity`]). The scheduler starts its rounds with it
    /// afresh (its marks in full, no halts carried over, an audit after the next round),
    /// and reports the round that found it as failed.
    PeerChanged {
        /// The peer (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The node it was.
        old: NodeId,
        /// The node it is now.
        new: NodeId,
    },
    /// Versions refused below a purge floor (`floor_refused`): this node refused the
    /// peer's versions of keys whose deletes it purged (`dropped: false`), or the peer
    /// refused ours and this node dropped them (`dropped: true`). Either way the records
    /// stay deleted; the keys name what an app may want to tell its user about.
    FloorRefused {
        /// The peer (see [`SyncEvent::Applied::peer`]).
        peer: String,
        /// The scope.
        scope: Scope,
        /// The keys of the versions refused.
        keys: Vec<Key>,
        /// Whether the versions were this node's, dropped because the peer refused them.
        dropped: bool,
    },
}

impl SyncEvent {
    /// The event's name.
    pub fn name(&self) -> &'static str {
        match self {
            SyncEvent::FloorRefused { .. } => "floor_refused",
            SyncEvent::RestoreDetected { .. } => "restore_detected",
            SyncEvent::PeerChanged { .. } => "peer_changed",
            SyncEvent::ConnectivityChanged { .. } => "connectivity_changed",
            SyncEvent::HydrationChanged { .. } => "hydration_changed",
            SyncEvent::PeerRefused { .. } => "peer_refused",
            SyncEvent::Overwritten { .. } => "overwritten",
            SyncEvent::ContentReady { .. } => "content_ready",
            SyncEvent::SkewAtPeer { .. } => "clock_skew_at_peer",
            SyncEvent::AuditCompleted { .. } => "audit_completed",
            SyncEvent::AuditFailed { .. } => "audit_failed",
            SyncEvent::Applied { .. } => "sync_applied",
            SyncEvent::PageApplied { .. } => "sync_page_applied",
            SyncEvent::Failed { .. } => "sync_failed",
            SyncEvent::Retry { .. } => "sync_retry",
            SyncEvent::BlobStaged { .. } => "blob_staged",
            SyncEvent::ClockSkew { .. } => "clock_skew",
        }
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A change to records.
    Change(Change),
    /// A sync event.
    Sync(SyncEvent),
}

impl Event {
    /// The event's name (`local-change-recorded`, `sync_applied`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Change(c) => c.kind.name(),
            Event::Sync(s) => s.name(),
        }
    }
}

/// What a subscriber receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The next event.
    Event(Event),
    /// The subscriber fell behind and this many events were dropped for it; it goes on
    /// with the oldest event still buffered.
    Missed(u64),
}

/// A subscription to a node's events.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Event>,
}

impl Subscription {
    /// Waits for the next notice; `None` once the notifier is gone.
    pub async fn recv(&mut self) -> Option<Notice> {
        match self.rx.recv().await {
            Ok(e) => Some(Notice::Event(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Notice::Missed(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next notice if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Notice> {
        match self.rx.try_recv() {
            Ok(e) => Some(Notice::Event(e)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Notice::Missed(n)),
            Err(_) => None,
        }
    }
}

/// What applying one page of a streamed transfer did (as `sync_page_applied` tells it):
/// the page's versions, those that changed this node's state, and what the sender still
/// held after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageNews {
    pub(crate) received: usize,
    pub(crate) applied: usize,
    pub(crate) remaining: Option<u64>,
}

/// The pages of streamed transfers as applied ([`Notifier::follow`]).
#[derive(Debug)]
pub(crate) struct PageFollower {
    rx: broadcast::Receiver<(String, PageNews)>,
}

/// Runs `round` to its end, calling `on_page` for each page of a streamed transfer that
/// `pages` (followed before the round started) tells and whose peer name `ours` accepts.
/// Pages still untold when the round ends were applied during it: they are told then, so
/// each is told once and the next round counts none of them. A follower that fell behind
/// misses pages (the round's outcome still counts them).
pub(crate) async fn follow_pages<F: std::future::Future>(
    pages: &mut PageFollower,
    round: F,
    ours: impl Fn(&str) -> bool,
    mut on_page: impl FnMut(PageNews),
) -> F::Output {
    let mut told = |(peer, news): (String, PageNews)| {
        if ours(&peer) {
            on_page(news);
        }
    };
    tokio::pin!(round);
    let mut open = true;
    let output = loop {
        let next = async {
            match open {
                true => pages.rx.recv().await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            output = &mut round => break output,
            page = next => match page {
                Ok(page) => told(page),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => open = false,
            },
        }
    };
    loop {
        match pages.rx.try_recv() {
            Ok(page) => told(page),
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    output
}

/// Where a watcher stands: the notifier's incarnation and change count it last saw.
///
/// Its text form (`<incarnation hex>.<count>`) is opaque to clients. A token from another
/// incarnation (the node restarted) always counts as behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchToken {
    incarnation: u64,
    seq: u64,
}

impl fmt::Display for WatchToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}.{}", self.incarnation, self.seq)
    }
}

/// A watch token that is not in the notifier's text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed watch token")]
pub struct BadWatchToken;

impl FromStr for WatchToken {
    type Err = BadWatchToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (inc, seq) = s.split_once('.').ok_or(BadWatchToken)?;
        if inc.len() != 16 || seq.is_empty() || seq.len() > 20 {
            return Err(BadWatchToken);
        }
        let incarnation = u64::from_str_radix(inc, 16).map_err(|_| BadWatchToken)?;
        if !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadWatchToken);
        }
        let seq = seq.parse().map_err(|_| BadWatchToken)?;
        Ok(WatchToken { incarnation, seq })
    }
}

/// Change counts: the total, and per scope when it last changed and by whom.
#[derive(Default)]
struct Counts {
    seq: u64,
    by_scope: BTreeMap<Scope, ScopeChanges>,
}

/// When a scope last changed, and who caused it (the peer whose page was applied; `None` for
/// a local write), plus when it last changed by someone else: enough to tell any watcher the
/// newest change it did not cause itself.
#[derive(Clone, Copy, Default)]
struct ScopeChanges {
    last: u64,
    cause: Option<NodeId>,
    /// The newest change whose cause differs from `cause` (0: none).
    other: u64,
}

impl ScopeChanges {
    fn record(&mut self, seq: u64, cause: Option<NodeId>) {
        if cause != self.cause {
            self.other = self.last;
            self.cause = cause;
        }
        self.last = seq;
    }

    /// The newest change `watcher` did not cause.
    fn newest_for(&self, watcher: Option<NodeId>) -> u64 {
        if watcher.is_some() && self.cause == watcher {
            self.other
        } else {
            self.last
        }
    }
}

/// Publishes a node's events and change counts.
pub struct Notifier {
    events: broadcast::Sender<Event>,
    /// The pages of streamed transfers, for the engine's own followers ([`follow_pages`]):
    /// apart from `events`, so that following them does not make the engine build the
    /// change events only subscribers want.
    pages: broadcast::Sender<(String, PageNews)>,
    counts: watch::Sender<Counts>,
    incarnation: u64,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("subscribers", &self.events.receiver_count())
            .field("incarnation", &format_args!("{:016x}", self.incarnation))
            .finish_non_exhaustive()
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier::new()
    }
}

impl Notifier {
    /// A notifier with no subscribers and a fresh incarnation.
    pub fn new() -> Self {
        Notifier {
            events: broadcast::channel(EVENT_BUFFER).0,
            pages: broadcast::channel(EVENT_BUFFER).0,
            counts: watch::channel(Counts::default()).0,
            incarnation: rand::random(),
        }
    }

    /// Subscribes to every event published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.events.subscribe(),
        }
    }

    /// Whether anyone is subscribed (publishers skip building events otherwise).
    pub fn has_subscribers(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Follows the pages of streamed transfers from now on ([`follow_pages`]), without
    /// counting as a subscriber.
    pub(crate) fn follow(&self) -> PageFollower {
        PageFollower {
            rx: self.pages.subscribe(),
        }
    }

    /// Tells that page `seq` of a streamed transfer from `peer` was applied:
    /// `sync_page_applied` to subscribers, and the page's news to followers.
    pub(crate) fn publish_page(&self, peer: &str, seq: u32, news: PageNews) {
        if self.has_subscribers() {
            self.publish(Event::Sync(SyncEvent::PageApplied {
                peer: peer.to_owned(),
                seq,
                received: news.received,
                applied: news.applied,
                remaining: news.remaining,
            }));
        }
        if self.pages.receiver_count() > 0 {
            // An error only means the last follower just left.
            let _ = self.pages.send((peer.to_owned(), news));
        }
    }

    /// Publishes `event` to every subscriber; never waits.
    pub fn publish(&self, event: Event) {
        // An error only means nobody is subscribed.
        let _ = self.events.send(event);
    }

    /// Notes that the watermarks of `scopes` moved, waking watchers of those scopes; `cause`
    /// is the peer whose page moved them (`None` for a local write), whose own watch is not
    /// woken by the change (it already holds what it sent).
    pub fn scopes_changed<'a>(
        &self,
        scopes: impl IntoIterator<Item = &'a Scope>,
        cause: Option<NodeId>,
    ) {
        let mut scopes = scopes.into_iter().peekable();
        if scopes.peek().is_none() {
            return;
        }
        self.counts.send_modify(|c| {
            c.seq += 1;
            let seq = c.seq;
            for s in scopes {
                match c.by_scope.get_mut(s) {
                    Some(changes) => changes.record(seq, cause),
                    None => {
                        let mut changes = ScopeChanges::default();
                        changes.record(seq, cause);
                        c.by_scope.insert(s.clone(), changes);
                    }
                }
            }
        });
    }

    /// The token for the current state, as seen by a watcher that may read `readable`.
    pub fn token(&self) -> WatchToken {
        WatchToken {
            incarnation: self.incarnation,
            seq: self.counts.borrow().seq,
        }
    }

    /// Waits until a scope accepted by `readable` changes after `since` (at once if it
    /// already did, or if `since` is `None` or from another incarnation), or until
    /// `timeout`. Changes caused by `watcher` (pages it sent) are not news to it. Returns
    /// whether there is news, and the token to wait from next.
    pub async fn wait_for_news(
        &self,
        since: Option<WatchToken>,
        watcher: Option<NodeId>,
        readable: impl Fn(&Scope) -> bool,
        timeout: Duration,
    ) -> (bool, WatchToken) {
        let mut rx = self.counts.subscribe();
        let news_after = |counts: &Counts, since: u64| {
            counts
                .by_scope
                .iter()
                .any(|(scope, changes)| changes.newest_for(watcher) > since && readable(scope))
        };
        let since = match since {
            Some(t) if t.incarnation == self.incarnation => t.seq,
            _ => return (true, self.token()),
        };
        let wait = async {
            loop {
                {
                    let counts = rx.borrow_and_update();
                    if news_after(&counts, since) {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    // The sender lives as long as `self`; this cannot happen while borrowed.
                    std::future::pending::<()>().await;
                }
            }
        };
        let news = tokio::time::timeout(timeout, wait).await.is_ok();
        (news, self.token())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_pages_is_not_subscribing() {
        let notifier = Notifier::new();
        let mut pages = notifier.follow();
        // A follower does not make publishers build the events only subscribers want.
        assert!(!notifier.has_subscribers());
        let news = PageNews {
            received: 3,
            applied: 2,
            remaining: Some(7),
        };
        notifier.publish_page("hub", 4, news);
        assert_eq!(pages.rx.try_recv().ok(), Some(("hub".to_owned(), news)));
        // A subscriber hears the page as `sync_page_applied`.
        let mut events = notifier.subscribe();
        notifier.publish_page("hub", 5, news);
        let Some(Notice::Event(event)) = events.try_recv() else {
            panic!("no event")
        };
        assert_eq!(event.name(), "sync_page_applied");
        assert_eq!(pages.rx.try_recv().ok(), Some(("hub".to_owned(), news)));
    }

    #[test]
    fn tokens_round_trip_and_refuse_junk() {
        let t = WatchToken {
            incarnation: 0xabc,
            seq: 42,
        };
        assert_eq!(t.to_string().parse::<WatchToken>(), Ok(t));
        for bad in [
            "",
            "42",
            "0000000000000abc",
            "0000000000000abc.",
            "0000000000000abc.-1",
            "0000000000000abc.+1",
            "abc.1",
            "000000000000zabc.1",
            "0000000000000abc.99999999999999999999999",
        ] {
            assert!(bad.parse::<WatchToken>().is_err(), "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_wake_only_for_readable_scopes() {
        let n = Notifier::new();
        let a = Scope::app("a", "t").unwrap();
        let b = Scope::app("b", "t").unwrap();
        let start = n.token();
        n.scopes_changed([&b], None);
        let (news, _) = n
            .wait_for_news(Some(start), None, |s| s == &a, Duration::from_millis(50))
            .await;
        assert!(!news, "a change to b is not news to a reader of a");
        let (news, next) = n
            .wait_for_news(Some(start), None, |s| s == &b, Duration::from_millis(50))
            .await;
        assert!(news);
        let (news, _) = n
            .wait_for_news(Some(next), None, |s| s == &b, Duration::from_millis(50))
            .await;
        assert!(!news, "nothing changed since the last token");
    }

    /// A watcher is not woken by the pages it sent itself, but is by anyone else's change in
    /// between, however the two interleave.
    #[tokio::test(start_paused = true)]
    async fn a_watchers_own_pushes_are_not_news_to_it() {
        let n = Notifier::new();
        let s = Scope::shared();
        let (w, x) = (
            NodeId::from_bytes([1; 16]).unwrap(),
            NodeId::from_bytes([2; 16]).unwrap(),
        );
        let wait = Duration::from_millis(50);
        let news = |since, watcher| {
            let n = &n;
            async move {
                n.wait_for_news(Some(since), watcher, |_| true, wait)
                    .await
                    .0
            }
        };
        let t0 = n.token();
        n.scopes_changed([&s], Some(w));
        let t1 = n.token();
        assert!(!news(t0, Some(w)).await, "w's own push");
        assert!(news(t0, Some(x)).await, "news to another peer");
        assert!(news(t0, None).await, "news to an anonymous watcher");

        n.scopes_changed([&s], Some(x));
        n.scopes_changed([&s], Some(w));
        n.scopes_changed([&s], Some(w));
        assert!(news(t1, Some(w)).await, "x's change between w's own");
        let t2 = n.token();
        assert!(!news(t2, Some(w)).await);

        n.scopes_changed([&s], None);
        assert!(
            news(t2, Some(w)).await,
            "a local write is news to every peer"
        );
        let t3 = n.token();
        n.scopes_changed([&s], Some(x));
        assert!(!news(t3, Some(x)).await);
        assert!(news(t3, Some(w)).await);
    }

    #[tokio::test]
    async fn a_foreign_token_is_behind() {
        let n = Notifier::new();
        let other = Notifier::new().token();
        let (news, _) = n
            .wait_for_news(Some(other), None, |_| true, Duration::ZERO)
            .await;
        assert!(news);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_what_it_missed() {
        let n = Notifier::new();
        let mut sub = n.subscribe();
        for _ in 0..EVENT_BUFFER + 5 {
            n.publish(Event::Sync(SyncEvent::Failed {
                peer: "p".into(),
                error: "e".into(),
            }));
        }
        assert_eq!(sub.recv().await, Some(Notice::Missed(5)));
        assert!(matches!(sub.recv().await, Some(Notice::Event(_))));
    }
}
