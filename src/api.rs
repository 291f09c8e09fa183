//! A node's records, files and status API, as one trait both of its sides implement.
//!
//! [`NodeApi`] is what applications and the command line ask of a node: write, read, delete
//! and list records, write and read files (streamed, never whole in memory), and the status
//! document. The engine answers it for a data directory this process holds; the HTTP
//! client [`NodeClient`](crate::http::NodeClient) answers it for a node reached over HTTP,
//! and the HTTP server's records handlers call it. So the operations, the listing and the
//! status document are written once, and code that holds a `Box<dyn NodeApi>` (the CLI's
//! record commands) works the same on either side.
//!
//! The trait is dyn-compatible: every method returns a boxed future, and arguments are
//! owned so the future borrows nothing but the implementation.
//!
//! ```
//! use highwater::api::{self, Lookup, NodeApi};
//! use highwater::{Key, Scope, SyncEngine};
//!
//! # futures_executor::block_on(async {
//! let node: Box<dyn NodeApi> = Box::new(SyncEngine::in_memory()?);
//! let notes = Scope::app("notes", "items")?;
//! let written = node.put(notes.clone(), Key::try_from("n1")?, b"hello".to_vec()).await?;
//! match node.get(notes, Key::try_from("n1")?).await? {
//!     Lookup::Found(read) => assert_eq!((read.value, read.hlc), (b"hello".to_vec(), written.hlc)),
//!     other => panic!("expected the record, got {other:?}"),
//! }
//! let status = node.status(api::all_scopes()).await?;
//! assert_eq!(status.scopes.len(), 1);
//! # Ok::<(), highwater::Error>(())
//! # }).unwrap();
//! ```
//!
//! Over 600 lines with its tests: the trait and the types its operations take and return are one
//! API, read together by both of its implementations.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::hlc::{Hlc, NodeId};
use crate::record::{BlobRef, Hydration, Key, Residency, Scope};

/// The records a listing returns when the query does not say.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// The most records one listing returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// Which scopes a caller may read: the status document shows only those.
pub type Visible = Arc<dyn Fn(&Scope) -> bool + Send + Sync>;

/// Every scope is visible (the status of a data directory this process holds).
pub fn all_scopes() -> Visible {
    Arc::new(|_| true)
}

/// A node's records, files and status, wherever the node is (see the [module docs](self)).
pub trait NodeApi: Send + Sync {
    /// Writes `value` under `key`; durable when the future completes.
    ///
    /// # Errors
    /// A value over the size limit, a store failure, or, over HTTP, the node cannot be
    /// reached or refuses.
    fn put(&self, scope: Scope, key: Key, value: Vec<u8>) -> BoxFuture<'_, Result<Written>>;

    /// The record under `key`, with where it stands.
    ///
    /// # Errors
    /// A store failure, or, over HTTP, the node cannot be reached or refuses.
    fn get(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Lookup>>;

    /// Deletes `key` (writes a tombstone, also for a key that was absent); durable when the
    /// future completes.
    ///
    /// # Errors
    /// As for [`NodeApi::put`].
    fn delete(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Written>>;

    /// Live records of `scope` in key byte order, as `query` says.
    ///
    /// # Errors
    /// As for [`NodeApi::get`].
    fn list(&self, scope: Scope, query: ListQuery) -> BoxFuture<'_, Result<Listing>>;

    /// Writes a record whose file is `content`, streamed into the blob store (never whole
    /// in memory) and verified, then the record pointing at it; durable when the future
    /// completes. Over HTTP `value` must be empty (the files endpoint writes none).
    ///
    /// # Errors
    /// Reading `content` or the blob store failed (no record is written), or as for
    /// [`NodeApi::put`].
    fn put_file(
        &self,
        scope: Scope,
        key: Key,
        value: Vec<u8>,
        content: Box<dyn Read + Send>,
    ) -> BoxFuture<'_, Result<Written>>;

    /// The file of the record under `key`: a reader over it if it is here, else why not.
    /// The reader blocks: read it off the async runtime's threads (say, in
    /// [`crate::blocking::run_blocking`]).
    ///
    /// # Errors
    /// As for [`NodeApi::get`].
    fn get_file(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<FileRead>>;

    /// The status document, limited to the scopes `visible` accepts. A node reached over
    /// HTTP decides this itself from the caller's token, and ignores `visible`.
    ///
    /// # Errors
    /// As for [`NodeApi::get`].
    fn status(&self, visible: Visible) -> BoxFuture<'_, Result<Status>>;

    /// As [`NodeApi::get`], routed while the scope hydrates: a node whose scheduler pulls a
    /// scope that is not [`Hydration::Ready`] from a peer it can read from asks that peer,
    /// and says where the answer came from (see docs/scheduling.md, "Routed reads"). The
    /// default answers [`NodeApi::get`], from here.
    ///
    /// # Errors
    /// As for [`NodeApi::get`] (a peer that cannot answer is not an error: the answer is
    /// then this node's own).
    fn get_routed(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Routed<Lookup>>> {
        Box::pin(async move { Ok(Routed::here(self.get(scope, key).await?)) })
    }

    /// As [`NodeApi::list`], routed as [`NodeApi::get_routed`] is.
    ///
    /// # Errors
    /// As for [`NodeApi::get_routed`].
    fn list_routed(
        &self,
        scope: Scope,
        query: ListQuery,
    ) -> BoxFuture<'_, Result<Routed<Listing>>> {
        Box::pin(async move { Ok(Routed::here(self.list(scope, query).await?)) })
    }
}

/// Where a routed read's answer came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The node's own store.
    Local,
    /// The peer that hydrates the scope, by the name it was added under (a node's: its
    /// URL), asked with this node's token for it.
    Remote {
        /// The peer's name.
        peer: String,
    },
}

impl Source {
    /// `local`, or `remote <peer>`: the `Highwater-Source` header's value.
    pub fn to_header(&self) -> String {
        match self {
            Source::Local => "local".to_owned(),
            Source::Remote { peer } => format!("remote {peer}"),
        }
    }

    /// The inverse of [`Source::to_header`]; `None` for anything else.
    pub fn from_header(value: &str) -> Option<Source> {
        match value.split_once(' ') {
            None if value == "local" => Some(Source::Local),
            Some(("remote", peer)) if !peer.is_empty() => Some(Source::Remote {
                peer: peer.to_owned(),
            }),
            _ => None,
        }
    }
}

/// A routed read's answer ([`NodeApi::get_routed`]): the value, where it came from, and
/// the scope's hydration on the node asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed<T> {
    /// The answer.
    pub value: T,
    /// Where it came from.
    pub source: Source,
    /// The scope's hydration on the node that was asked (not on the peer): an answer from
    /// [`Source::Local`] while it is not [`Hydration::Ready`] may lack what the peer holds.
    pub hydration: Hydration,
}

impl<T> Routed<T> {
    /// An answer from this node's store, whose scope's hydration the default methods do not
    /// know: they say [`Hydration::Ready`] (an implementation that routes knows better).
    pub fn here(value: T) -> Routed<T> {
        Routed {
            value,
            source: Source::Local,
            hydration: Hydration::Ready,
        }
    }
}

/// A write's acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The version's timestamp (its origin is the node that wrote it).
    pub hlc: Hlc,
    /// The file the record points at, for a file written with [`NodeApi::put_file`].
    pub file: Option<BlobRef>,
}

/// A live record as read, with where it stands on the node that answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRead {
    /// The value.
    pub value: Vec<u8>,
    /// The version's timestamp (its origin is the writer).
    pub hlc: Hlc,
    /// Resident, or Staged while its file has not arrived.
    pub residency: Residency,
}

/// The answer to [`NodeApi::get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The live record.
    Found(RecordRead),
    /// The key's latest version is a delete.
    Deleted,
    /// No version of the key is stored.
    Missing,
}

impl Lookup {
    /// The live record, if there is one.
    pub fn found(self) -> Option<RecordRead> {
        match self {
            Lookup::Found(read) => Some(read),
            Lookup::Deleted | Lookup::Missing => None,
        }
    }
}

/// What [`NodeApi::list`] lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    /// Only keys starting with these bytes.
    pub prefix: Vec<u8>,
    /// Only keys strictly after this one (a listing's [`Listing::next_after`]).
    pub after: Option<Key>,
    /// At most this many records, 1 to [`MAX_LIST_LIMIT`] (others are clamped to it).
    pub limit: usize,
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            prefix: Vec::new(),
            after: None,
            limit: DEFAULT_LIST_LIMIT,
        }
    }
}

/// One record of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The key.
    pub key: Key,
    /// The value if it is UTF-8 text (else read it by key).
    pub value: Option<String>,
    /// The value's size in bytes.
    pub size: u64,
    /// The attached file, if the record has one.
    pub file: Option<BlobRef>,
    /// The version's timestamp.
    pub hlc: Hlc,
    /// Where the record stands.
    pub residency: Residency,
}

/// A page of live records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// The records, in key byte order.
    pub records: Vec<Listed>,
    /// The last key of a full page (as many records as the limit), to pass back as
    /// [`ListQuery::after`] for the next page; `None` when the listing is done.
    pub next_after: Option<Key>,
}

/// The answer to [`NodeApi::get_file`].
pub enum FileRead {
    /// The file is here.
    Ready {
        /// Its hash and size.
        blob: BlobRef,
        /// The record version's timestamp.
        hlc: Hlc,
        /// Its bytes (a blocking reader; a reader over HTTP checks them against the hash
        /// and fails at the end if they do not match).
        reader: Box<dyn Read + Send>,
    },
    /// The record has a file that has not arrived yet: retry after the next sync.
    Staged {
        /// The record version's timestamp.
        hlc: Hlc,
    },
    /// The record has no file.
    NoFile,
    /// No live record under the key (absent or deleted).
    Missing,
}

impl std::fmt::Debug for FileRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileRead::Ready { blob, hlc, .. } => f
                .debug_struct("Ready")
                .field("blob", blob)
                .field("hlc", hlc)
                .finish_non_exhaustive(),
            FileRead::Staged { hlc } => f.debug_struct("Staged").field("hlc", hlc).finish(),
            FileRead::NoFile => f.write_str("NoFile"),
            FileRead::Missing => f.write_str("Missing"),
        }
    }
}

/// The status document (`GET /v1/status`, `highwater status --json`): what a node holds and
/// what its peers lack. Its JSON shape is docs/http.md's: ids and timestamps as text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The node's id.
    #[serde(with = "text")]
    pub node: NodeId,
    /// The visible scopes the node holds.
    pub scopes: BTreeMap<Scope, ScopeStatus>,
    /// Every peer the node has completed a round with, in either role.
    pub peers: Vec<PeerLag>,
    /// Every peer this node is configured to sync with (its scheduler's peers, by the name
    /// each was added under: a node's are its `--peer` URLs), from the start, before any
    /// round succeeded. Empty for a node that runs no scheduler.
    #[serde(default)]
    pub configured_peers: Vec<PeerLink>,
    /// How far the node's clock (the last time it issued or observed) is ahead of its wall
    /// clock, in milliseconds (0 when it is not). Beyond `max_drift_ms` its new writes are
    /// refused by peers whose clocks are right, until its wall clock catches up.
    #[serde(default)]
    pub clock_ahead_ms: u64,
    /// The node's max drift: how far ahead of its clock it accepts a version, in
    /// milliseconds (what its peers likely allow too).
    #[serde(default)]
    pub max_drift_ms: u64,
    /// The blob store's totals.
    pub blobs: BlobTotals,
}

impl Status {
    /// The document as JSON, with its keys in order.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a status document has text map keys only")
    }
}

/// One scope of the status document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeStatus {
    /// The node's watermark per origin.
    #[serde(with = "text_map")]
    pub watermarks: BTreeMap<NodeId, Hlc>,
    /// How many of the scope's records stand where.
    pub residency: ResidencyTotals,
    /// How far the node has pulled the scope from its peers.
    #[serde(default)]
    pub hydration: Hydration,
}

/// Records of a scope by residency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidencyTotals {
    /// Live records with their file, or without one.
    pub resident: u64,
    /// Live records whose file is not here yet.
    pub staged: u64,
    /// Deleted keys (tombstones).
    pub tombstoned: u64,
}

/// A peer in the status document, and the streams either side lacks as of their last round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLag {
    /// The peer's id.
    #[serde(with = "text")]
    pub id: NodeId,
    /// When the last round with the peer completed (`None` if none since the node started).
    pub last_exchange_unix_ms: Option<u64>,
    /// Visible streams where the node's watermark is ahead of what it last learned of the
    /// peer's.
    #[serde(default)]
    pub lacks: Vec<Gap>,
    /// Visible streams where the peer's watermark, as last learned, is ahead of the node's.
    #[serde(default)]
    pub behind: Vec<Gap>,
    /// The last audit with the peer since the node started, in either role, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_audit: Option<LastAudit>,
}

/// A peer this node syncs with, as its scheduler sees it (see [`crate::PeerStatus`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLink {
    /// The name the peer was added under (a node's peers: their URLs).
    pub name: String,
    /// The peer's node id, once known.
    #[serde(default, with = "text_option")]
    pub id: Option<NodeId>,
    /// Whether the last round with the peer succeeded (false before the first one ended).
    pub connected: bool,
    /// When the last round succeeded.
    pub last_success_unix_ms: Option<u64>,
    /// Why the last failed round failed, with its causes (kept after later successes).
    pub last_error: Option<String>,
    /// Failed rounds since the last success.
    pub consecutive_failures: u32,
    /// Whether syncing is paused ([`crate::Scheduler::pause`]).
    #[serde(default)]
    pub paused: bool,
    /// Live versions written on this node that the peer had not acknowledged as of the last
    /// round (counted up to [`UNACKNOWLEDGED_COUNTED`] per scope).
    pub unacknowledged: u64,
    /// Streams this node halted, waiting for a file the peer could not give.
    pub files_missing: u64,
    /// Streams halted either way, and why, as of the last round.
    pub halted: Vec<HaltedStream>,
    /// The last audit the scheduler ran with the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_audit: Option<LastAudit>,
    /// The current or last pull from the peer (a burst of rounds while it had more), once
    /// a round succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullProgress>,
}

/// How far a pull from a peer has come: the rounds in a row that found more to pull, up to
/// and including the one that found nothing more (and, within a streamed round, its pages
/// applied so far).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullProgress {
    /// Versions received in this pull so far.
    pub received: u64,
    /// Versions the peer still holds for this node, as its last answer counted them
    /// ([`crate::ExchangeOutcome::remaining`]); `None` if it did not count (a version 1
    /// peer). `received + remaining` is the pull's total.
    pub remaining: Option<u64>,
}

impl PullProgress {
    /// The pull's total, `received + remaining`, when the peer counted.
    pub fn total(&self) -> Option<u64> {
        self.remaining.map(|r| self.received.saturating_add(r))
    }

    /// The progress after one more round that received `received` versions and whose
    /// answer counted `remaining`; `first`: the round starts a new pull.
    pub fn after_round(self, first: bool, received: u64, remaining: Option<u64>) -> Self {
        let before = if first { 0 } else { self.received };
        PullProgress {
            received: before.saturating_add(received),
            remaining,
        }
    }
}

/// The most unacknowledged writes [`PeerLink::unacknowledged`] counts per scope: the count
/// is a scan, and beyond this the number says "many".
pub const UNACKNOWLEDGED_COUNTED: usize = 10_000;

/// A stream (scope and origin) that one side of a round halted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltedStream {
    /// The scope.
    pub scope: Scope,
    /// The origin.
    #[serde(with = "text")]
    pub origin: NodeId,
    /// `here` (this node refused what the peer sent) or `peer` (the peer refused ours).
    pub by: HaltSide,
    /// `clock_skew`, `own_origin` or `blob_unavailable`.
    pub reason: String,
    /// For a clock skew: how far ahead the origin's clock was, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead_by_ms: Option<u64>,
}

/// Which side halted a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaltSide {
    /// This node.
    Here,
    /// The peer.
    Peer,
}

/// What the last audit with a peer found (see [`crate::SyncEngine::audit`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastAudit {
    /// When it ended.
    pub at_unix_ms: u64,
    /// Whether this node initiated it.
    pub initiated: bool,
    /// Versions this node received (it lacked them).
    pub received: u64,
    /// Keys whose version here changed.
    pub repaired: u64,
    /// Versions this node sent (the peer lacked them).
    pub shipped: u64,
    /// Files of Staged records fetched by hash.
    pub files_repaired: u64,
}

/// One stream (scope and origin) on which two watermarks differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The scope.
    pub scope: Scope,
    /// The origin.
    #[serde(with = "text")]
    pub origin: NodeId,
    /// The node's mark (`None`: it holds nothing of the origin).
    #[serde(default, with = "text_option")]
    pub ours: Option<Hlc>,
    /// The peer's mark as last learned (`None`: nothing known).
    #[serde(default, with = "text_option")]
    pub theirs: Option<Hlc>,
}

/// The blob store's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobTotals {
    /// Blobs stored.
    pub count: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// A value as its text form (`Display`, `FromStr`): node ids and Hlcs in JSON.
mod text {
    use std::borrow::Cow;
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub(super) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        <Cow<'de, str>>::deserialize(d)?
            .parse()
            .map_err(de::Error::custom)
    }
}

/// An optional value as its text form, or null.
mod text_option {
    use std::borrow::Cow;
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<T: Display, S: Serializer>(
        value: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        <Option<Cow<'de, str>>>::deserialize(d)?
            .map(|s| s.parse().map_err(de::Error::custom))
            .transpose()
    }
}

/// A map whose keys and values are in their text form.
mod text_map {
    use std::collections::BTreeMap;
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<K: Display, V: Display, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    pub(super) fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: FromStr + Ord,
        K::Err: Display,
        V: FromStr,
        V::Err: Display,
        D: Deserializer<'de>,
    {
        BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                let k = k.parse().map_err(de::Error::custom)?;
                let v = v.parse().map_err(de::Error::custom)?;
                Ok((k, v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_document_reads_back_from_its_json() {
        let a: NodeId = "aa".parse().expect("a node id");
        let b: NodeId = "bb".parse().expect("a node id");
        let mark = Hlc::new(7_000_000_000_000_000_000, a);
        let gap = Gap {
            scope: Scope::shared(),
            origin: a,
            ours: Some(mark),
            theirs: None,
        };
        let status = Status {
            node: a,
            scopes: BTreeMap::from([(
                Scope::shared(),
                ScopeStatus {
                    watermarks: BTreeMap::from([(a, mark)]),
                    residency: ResidencyTotals {
                        resident: 3,
                        staged: 1,
                        tombstoned: 2,
                    },
                    hydration: Hydration::Ready,
                },
            )]),
            peers: vec![PeerLag {
                id: b,
                last_exchange_unix_ms: None,
                lacks: vec![gap],
                behind: Vec::new(),
                last_audit: None,
            }],
            configured_peers: Vec::new(),
            clock_ahead_ms: 0,
            max_drift_ms: 5000,
            blobs: BlobTotals { count: 2, bytes: 9 },
        };
        let json = status.to_json();
        assert_eq!(
            json,
            serde_json::json!({
                "node": "aa",
                "scopes": {"shared": {
                    "watermarks": {"aa": "7000000000000000000/aa"},
                    "residency": {"resident": 3, "staged": 1, "tombstoned": 2},
                    "hydration": "ready",
                }},
                "peers": [{
                    "id": "bb",
                    "last_exchange_unix_ms": null,
                    "lacks": [{"scope": "shared", "origin": "aa",
                               "ours": "7000000000000000000/aa", "theirs": null}],
                    "behind": [],
                }],
                "configured_peers": [],
                "clock_ahead_ms": 0,
                "max_drift_ms": 5000,
                "blobs": {"count": 2, "bytes": 9},
            })
        );
        let back: Status = serde_json::from_value(json).expect("it parses");
        assert_eq!(back, status);
    }
}
