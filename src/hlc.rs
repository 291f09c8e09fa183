//! Node identity and the hybrid logical clock.
//!
//! [`Hlc`] is a uhlc [`uhlc::Timestamp`]: NTP64 time (upper 32 bits seconds since
//! the Unix epoch, lower 32 bits fraction), then the 16-byte [`NodeId`]. The total order is
//! time, then id, so two nodes never tie.
//!
//! [`Clock`] keeps uhlc's update rule (`issue` = max(now, last + 1); `observe` takes the max)
//! but owns its state, so that the engine can persist the last issued time and restore it
//! after a restart, inject a time source in tests, and refuse overflowing timestamps with an
//! error where uhlc's `NTP64` arithmetic is unchecked.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uhlc::{Timestamp, ID, NTP64};

use crate::error::ClockError;

/// A node's identity: 16 random bytes, never all zero, chosen at first start and persisted.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(ID);

impl NodeId {
    /// A fresh random id.
    pub fn random() -> Self {
        NodeId(ID::rand())
    }

    /// The id from its 16 bytes (uhlc's little-endian layout).
    ///
    /// # Errors
    /// `None` for the all-zero id, which uhlc reserves.
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        ID::try_from(bytes).ok().map(NodeId)
    }

    /// The id's 16 bytes (uhlc's little-endian layout; byte order is also the sort order).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// The uhlc id.
    pub fn as_uhlc(&self) -> &ID {
        &self.0
    }

    /// The first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        let s = self.to_string();
        s.chars().take(8).collect()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

impl FromStr for NodeId {
    type Err = uhlc::ParseIDError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ID::from_str(s).map(NodeId)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <[u8; 16]>::deserialize(d)?;
        NodeId::from_bytes(bytes).ok_or_else(|| serde::de::Error::custom("the all-zero node id"))
    }
}

/// A hybrid-logical-clock timestamp: NTP64 time, then the issuing node's id.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(Timestamp);

impl Hlc {
    /// The timestamp `time` issued by `origin`.
    pub fn new(time: u64, origin: NodeId) -> Self {
        Hlc(Timestamp::new(NTP64(time), origin.0))
    }

    /// The NTP64 time as a raw `u64`.
    pub fn time(&self) -> u64 {
        self.0.get_time().0
    }

    /// The node that issued this timestamp.
    pub fn origin(&self) -> NodeId {
        NodeId(*self.0.get_id())
    }

    /// The uhlc timestamp.
    pub fn as_uhlc(&self) -> &Timestamp {
        &self.0
    }

    /// The wall-clock time this timestamp stands for (its NTP64 time, counted from the Unix
    /// epoch as this crate's clocks count it), to show when a version was written.
    pub fn to_system_time(&self) -> std::time::SystemTime {
        self.0.get_time().to_system_time()
    }

    /// 24 bytes whose byte order is the Hlc order: time big-endian, then the id bytes.
    pub fn to_sort_key(self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.time().to_be_bytes());
        out[8..].copy_from_slice(&self.origin().to_bytes());
        out
    }
}

impl fmt::Display for Hlc {
    /// uhlc's text form: `<NTP64 as decimal>/<id hex>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({})", self.0)
    }
}

impl FromStr for Hlc {
    type Err = uhlc::ParseTimestampError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Timestamp::from_str(s).map(Hlc)
    }
}

impl Serialize for Hlc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.time(), self.origin()).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (time, origin) = <(u64, NodeId)>::deserialize(d)?;
        Ok(Hlc::new(time, origin))
    }
}

/// Converts a duration to NTP64 units, or `None` if it does not fit (uhlc's own conversion
/// asserts instead).
pub fn duration_to_ntp64(d: Duration) -> Option<u64> {
    let secs = d.as_secs();
    if secs >= 1 << 32 {
        return None;
    }
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    Some((secs << 32) | frac)
}

/// Converts NTP64 units to a duration.
pub fn ntp64_to_duration(t: u64) -> Duration {
    NTP64(t).to_duration()
}

/// Where the clock reads physical time from, as raw NTP64 since the Unix epoch.
pub trait TimeSource: Send + Sync + 'static {
    /// The current physical time.
    fn now(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct WallClock;

impl TimeSource for WallClock {
    fn now(&self) -> u64 {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        duration_to_ntp64(since).unwrap_or(u64::MAX)
    }
}

/// A time source set by hand, for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualTime(AtomicU64);

impl ManualTime {
    /// A manual clock reading `t` (NTP64).
    pub fn new(t: u64) -> Arc<Self> {
        Arc::new(ManualTime(AtomicU64::new(t)))
    }

    /// A manual clock reading `secs` seconds after the epoch.
    pub fn at_secs(secs: u32) -> Arc<Self> {
        Self::new(u64::from(secs) << 32)
    }

    /// Sets the time (it may go backwards, as wall clocks do).
    pub fn set(&self, t: u64) {
        self.0.store(t, Ordering::SeqCst);
    }

    /// Moves the time by `d` forwards.
    pub fn advance(&self, d: Duration) {
        let step = duration_to_ntp64(d).unwrap_or(u64::MAX);
        let now = self.0.load(Ordering::SeqCst);
        self.0.store(now.saturating_add(step), Ordering::SeqCst);
    }

    /// Moves the time by `d` backwards.
    pub fn rewind(&self, d: Duration) {
        let step = duration_to_ntp64(d).unwrap_or(u64::MAX);
        let now = self.0.load(Ordering::SeqCst);
        self.0.store(now.saturating_sub(step), Ordering::SeqCst);
    }
}

impl TimeSource for ManualTime {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A node's hybrid logical clock.
pub struct Clock {
    time: Arc<dyn TimeSource>,
    max_drift: u64,
    max_drift_duration: Duration,
    /// The id it issues under and the last time issued or observed, under one lock: a
    /// timestamp is issued under the id current at that instant, and [`Clock::rotate`] is
    /// atomic with respect to issuing.
    state: Mutex<State>,
}

#[derive(Clone, Copy)]
struct State {
    id: NodeId,
    last: u64,
}

impl Clock {
    /// A clock for node `id` reading `time`, refusing timestamps more than `max_drift` ahead.
    ///
    /// # Errors
    /// [`ClockError::DriftOutOfRange`] if `max_drift` does not fit NTP64 (over ~136 years).
    pub fn new(
        id: NodeId,
        time: Arc<dyn TimeSource>,
        max_drift: Duration,
    ) -> Result<Self, ClockError> {
        let drift =
            duration_to_ntp64(max_drift).ok_or(ClockError::DriftOutOfRange { max_drift })?;
        Ok(Clock {
            time,
            max_drift: drift,
            max_drift_duration: max_drift,
            state: Mutex::new(State { id, last: 0 }),
        })
    }

    /// This clock's node.
    pub fn id(&self) -> NodeId {
        self.lock().id
    }

    /// Issues every later timestamp under `id`, and later than `past` (and than every one
    /// issued or observed before): a node that takes a fresh identity after a restore makes
    /// sure no timestamp it issues from now on can equal one issued before, under either id.
    pub fn rotate(&self, id: NodeId, past: u64) {
        let mut state = self.lock();
        state.id = id;
        state.last = state.last.max(past);
    }

    /// A fresh timestamp, greater than every one issued or observed before.
    ///
    /// # Errors
    /// [`ClockError::Exhausted`] if the last time is `u64::MAX`.
    pub fn issue(&self) -> Result<Hlc, ClockError> {
        let now = self.time.now();
        let mut state = self.lock();
        let next = if now > state.last {
            now
        } else {
            state.last.checked_add(1).ok_or(ClockError::Exhausted)?
        };
        state.last = next;
        Ok(Hlc::new(next, state.id))
    }

    /// Checks that `hlc` is not further ahead of the physical clock than the drift bound.
    ///
    /// # Errors
    /// [`ClockError::Skew`] naming the origin and how far ahead it is.
    pub fn check(&self, hlc: Hlc) -> Result<(), ClockError> {
        let now = self.time.now();
        let bound = now.saturating_add(self.max_drift);
        if hlc.time() > bound {
            return Err(ClockError::Skew {
                origin: hlc.origin(),
                ahead_by: ntp64_to_duration(hlc.time() - now),
                max_drift: self.max_drift_duration,
            });
        }
        Ok(())
    }

    /// Checks `hlc` and moves the clock to it if it is ahead, so later timestamps exceed it.
    ///
    /// # Errors
    /// [`ClockError::Skew`] as for [`Clock::check`]; the clock is then unchanged.
    pub fn observe(&self, hlc: Hlc) -> Result<(), ClockError> {
        self.check(hlc)?;
        self.raise(hlc);
        Ok(())
    }

    /// Moves the clock to `hlc` if it is ahead, without the drift check: for timestamps that
    /// already passed [`Clock::check`] (a second reading of the time source could differ).
    pub fn raise(&self, hlc: Hlc) {
        let mut state = self.lock();
        state.last = state.last.max(hlc.time());
    }

    /// The last time issued or observed (what must be persisted).
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// Raises the clock to a persisted `last` time (never lowers it).
    pub fn restore(&self, last: u64) {
        let mut state = self.lock();
        state.last = state.last.max(last);
    }

    /// The physical time now.
    pub fn now(&self) -> u64 {
        self.time.now()
    }

    /// How far the clock (its last time issued or observed) is ahead of the physical time:
    /// beyond the drift bound, the timestamps it issues are refused by peers whose clocks
    /// agree with this one's time source.
    pub fn ahead(&self) -> Duration {
        let last = self.last();
        ntp64_to_duration(last.saturating_sub(self.time.now()))
    }

    /// The drift bound.
    pub fn max_drift(&self) -> Duration {
        self.max_drift_duration
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The guarded value is plain data, valid whatever a panicking holder did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = *self.lock();
        f.debug_struct("Clock")
            .field("id", &state.id)
            .field("last", &state.last)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(t: &Arc<ManualTime>) -> Clock {
        Clock::new(NodeId::random(), t.clone(), Duration::from_secs(5)).expect("5 s fits NTP64")
    }

    #[test]
    fn an_hlc_reads_back_as_the_wall_clock_time_it_was_issued_at() {
        let t = ManualTime::at_secs(1_700_000_000);
        let hlc = clock(&t).issue().unwrap();
        let at = hlc.to_system_time();
        let since = at.duration_since(std::time::UNIX_EPOCH).unwrap();
        // NTP64 keeps 32 bits of fraction: nanoseconds round.
        assert!(since.abs_diff(Duration::from_secs(1_700_000_000)) < Duration::from_micros(1));
    }

    #[test]
    fn issue_is_strictly_monotonic_even_when_time_goes_back() {
        let t = ManualTime::at_secs(1_000);
        let c = clock(&t);
        let a = c.issue().unwrap();
        t.rewind(Duration::from_secs(100));
        let b = c.issue().unwrap();
        assert!(b > a);
        assert_eq!(b.time(), a.time() + 1);
    }

    #[test]
    fn observe_moves_the_clock_past_remote_time() {
        let t = ManualTime::at_secs(1_000);
        let c = clock(&t);
        let remote = Hlc::new((1_002u64) << 32, NodeId::random());
        c.observe(remote).unwrap();
        assert!(c.issue().unwrap().time() > remote.time());
    }

    #[test]
    fn skew_is_refused_and_leaves_the_clock_alone() {
        let t = ManualTime::at_secs(1_000);
        let c = clock(&t);
        let origin = NodeId::random();
        let err = c.observe(Hlc::new(1_010u64 << 32, origin)).unwrap_err();
        match err {
            ClockError::Skew {
                origin: o,
                ahead_by,
                ..
            } => {
                assert_eq!(o, origin);
                assert_eq!(ahead_by, Duration::from_secs(10));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(c.last(), 0);
    }

    #[test]
    fn timestamps_near_u64_max_do_not_panic() {
        let t = ManualTime::new(u64::MAX - 1);
        let c = clock(&t);
        c.observe(Hlc::new(u64::MAX, NodeId::random())).unwrap();
        assert_eq!(c.issue(), Err(ClockError::Exhausted));
        let t2 = ManualTime::at_secs(1);
        let c2 = clock(&t2);
        assert!(matches!(
            c2.observe(Hlc::new(u64::MAX, NodeId::random())),
            Err(ClockError::Skew { .. })
        ));
    }

    #[test]
    fn zero_id_is_refused() {
        assert!(NodeId::from_bytes([0; 16]).is_none());
        let bytes = postcard::to_allocvec(&[0u8; 16]).unwrap();
        assert!(postcard::from_bytes::<NodeId>(&bytes).is_err());
    }

    #[test]
    fn sort_key_order_matches_hlc_order() {
        let a = NodeId::from_bytes([1; 16]).unwrap();
        let b = NodeId::from_bytes([2; 16]).unwrap();
        let hs = [
            Hlc::new(5, b),
            Hlc::new(5, a),
            Hlc::new(4, b),
            Hlc::new(6, a),
        ];
        for x in hs {
            for y in hs {
                assert_eq!(x.cmp(&y), x.to_sort_key().cmp(&y.to_sort_key()));
            }
        }
    }

    #[test]
    fn text_form_round_trips() {
        let h = Hlc::new(
            7386690599959157260,
            NodeId::from_bytes([0x33, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
        );
        assert_eq!(h.to_string(), "7386690599959157260/33");
        assert_eq!("7386690599959157260/33".parse::<Hlc>().unwrap(), h);
    }
}
