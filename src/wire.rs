//! The wire format: a versioned envelope around postcard-encoded messages.
//!
//! ```text
//! envelope = magic "HWSY" (4 bytes) | version u16 big-endian | kind u8 | postcard body
//! ```
//!
//! Decoding refuses trailing bytes, unknown versions and kinds, and messages over
//! [`MAX_MESSAGE_LEN`]. Inside a run, versions carry only their key, the time delta from the
//! previous version (or from `base`), and the op: the origin is the run's. Watermarks travel
//! in full or, when the other side already recorded them, as a 16-byte digest
//! ([`RequestMarks`], [`ResponseMarks`]), so a quiet round costs the same few bytes however
//! many origins and scopes there are. See `docs/protocol.md` for every field; golden-byte
//! tests pin version 1.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::WireError;
pub use crate::exchange::audit::{AuditRequest, AuditResponse};
pub use crate::exchange::{ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks};
use crate::exchange::{Page, Run};
use crate::hlc::{Hlc, NodeId};
pub use crate::record::ScopeFilter;
use crate::record::{Key, Op, Scope, Version};

/// The first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"HWSY";
/// The protocol version this build writes.
pub const PROTOCOL_VERSION: u16 = 1;
/// The protocol versions this build reads.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];
/// The largest message accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 << 20;
const HEADER_LEN: usize = 7;

/// A message that can travel in an envelope.
pub trait Message: Serialize + DeserializeOwned {
    /// The envelope's kind byte for this message.
    const KIND: u8;
}

impl Message for ExchangeRequest {
    const KIND: u8 = 1;
}

impl Message for ExchangeResponse {
    const KIND: u8 = 2;
}

impl Message for AuditRequest {
    const KIND: u8 = 3;
}

impl Message for AuditResponse {
    const KIND: u8 = 4;
}

/// Encodes `msg` in a version-1 envelope.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out.push(M::KIND);
    // IMPORTANT: writing into a Vec cannot fail, and every type here serializes infallibly.
    postcard::to_io(msg, &mut out).expect("postcard encoding into a Vec does not fail");
    out
}

/// Decodes a version-1 envelope holding an `M`.
///
/// # Errors
/// [`WireError`]: truncated input, trailing bytes, bad magic, unsupported version, another
/// message kind, a message over [`MAX_MESSAGE_LEN`], or a body that does not decode.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, WireError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    let body = check_header(bytes, M::KIND)?;
    let (msg, rest) = postcard::take_from_bytes::<M>(body).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => WireError::Truncated,
        other => WireError::Malformed {
            reason: other.to_string(),
        },
    })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { count: rest.len() });
    }
    Ok(msg)
}

fn check_header(bytes: &[u8], kind: u8) -> Result<&[u8], WireError> {
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return match bytes.first_chunk::<4>() {
            Some(m) if *m != MAGIC => Err(WireError::BadMagic { found: *m }),
            _ => Err(WireError::Truncated),
        };
    };
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let version = u16::from_be_bytes([header[4], header[5]]);
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(WireError::UnsupportedVersion {
            found: version,
            supported: SUPPORTED_VERSIONS,
        });
    }
    if header[6] != kind {
        return Err(WireError::UnexpectedKind {
            found: header[6],
            expected: kind,
        });
    }
    Ok(body)
}

/// A version inside a run, as sent: the origin is the run's and the time is a delta.
#[derive(Serialize)]
struct VersionOut<'a> {
    key: &'a Key,
    delta: u64,
    op: &'a Op,
}

#[derive(Deserialize)]
struct VersionIn {
    key: Key,
    delta: u64,
    op: Op,
}

#[derive(Serialize)]
struct RunOut<'a, V: Serialize> {
    scope: &'a Scope,
    origin: NodeId,
    base: Option<u64>,
    top: u64,
    versions: V,
}

#[derive(Deserialize)]
struct RunIn {
    scope: Scope,
    origin: NodeId,
    base: Option<u64>,
    top: u64,
    versions: Vec<VersionIn>,
}

struct Deltas<'a>(&'a Run);

impl Serialize for Deltas<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut prev = self.0.base.map_or(0, |b| b.time());
        s.collect_seq(self.0.versions.iter().map(|(key, v)| {
            let delta = v.hlc.time().wrapping_sub(prev);
            prev = v.hlc.time();
            VersionOut {
                key,
                delta,
                op: &v.op,
            }
        }))
    }
}

impl Serialize for Run {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RunOut {
            scope: &self.scope,
            origin: self.origin,
            base: self.base.map(|b| b.time()),
            top: self.top.time(),
            versions: Deltas(self),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Run {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = RunIn::deserialize(d)?;
        let mut prev = w.base.unwrap_or(0);
        let mut versions = Vec::with_capacity(w.versions.len());
        for v in w.versions {
            prev = prev
                .checked_add(v.delta)
                .ok_or_else(|| serde::de::Error::custom("version time overflows"))?;
            versions.push((
                v.key,
                Version {
                    hlc: Hlc::new(prev, w.origin),
                    op: v.op,
                },
            ));
        }
        Ok(Run {
            scope: w.scope,
            origin: w.origin,
            base: w.base.map(|b| Hlc::new(b, w.origin)),
            top: Hlc::new(w.top, w.origin),
            versions,
        })
    }
}

#[derive(Serialize)]
struct PageOut<'a> {
    runs: &'a [Run],
    more: bool,
}

#[derive(Deserialize)]
struct PageIn {
    runs: Vec<Run>,
    more: bool,
}

impl Serialize for Page {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PageOut {
            runs: &self.runs,
            more: self.more,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Page {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = PageIn::deserialize(d)?;
        Ok(Page {
            runs: p.runs,
            more: p.more,
        })
    }
}
