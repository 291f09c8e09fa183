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
pub use crate::exchange::audit::{AuditExt, AuditRequest, AuditResponse};
use crate::exchange::audit::{Shipment, Wanted};
use crate::exchange::ranges::{RangesIn, RangesOut};
pub use crate::exchange::{
    ExchangeRequest, ExchangeResponse, PageFrame, RequestExt, RequestMarks, ResponseExt,
    ResponseMarks,
};
use crate::exchange::{Halt, Page, Run};
use crate::hlc::{Hlc, NodeId};
pub use crate::record::ScopeFilter;
use crate::record::{Key, Op, Scope, Version};
use crate::watermark::MarksDigest;

/// The first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"HWSY";
/// The newest protocol version this build writes. Each message goes out in the lowest
/// version that carries it ([`Message::version`]), so a message that uses nothing newer
/// is version 1, byte for byte.
pub const PROTOCOL_VERSION: u16 = 2;
/// The protocol versions this build reads.
pub const SUPPORTED_VERSIONS: &[u16] = &[1, 2];
/// The largest message accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 << 20;
const HEADER_LEN: usize = 7;

/// A message that can travel in an envelope.
pub trait Message: Serialize + DeserializeOwned {
    /// The envelope's kind byte for this message.
    const KIND: u8;

    /// The lowest protocol version that carries this message (1 unless it uses something
    /// newer).
    fn version(&self) -> u16 {
        1
    }

    /// Writes the body as protocol `version` has it (the same in every version unless the
    /// message says otherwise).
    fn write_body(&self, version: u16, out: &mut Vec<u8>) {
        let _ = version;
        // IMPORTANT: writing into a Vec cannot fail, and every type here serializes
        // infallibly.
        postcard::to_io(self, out).expect("postcard encoding into a Vec does not fail");
    }

    /// Reads a body of protocol `version`; returns the message and the bytes after it.
    ///
    /// # Errors
    /// The body does not decode.
    fn read_body(version: u16, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        let _ = version;
        postcard::take_from_bytes(body)
    }
}

// Version 2 appends the extension to the version 1 body. A postcard struct is its fields in
// order, so version 1 is the same fields as a tuple without the extension.

impl Message for ExchangeRequest {
    const KIND: u8 = 1;

    fn version(&self) -> u16 {
        lowest_version(self.ext.is_empty())
    }

    fn write_body(&self, version: u16, out: &mut Vec<u8>) {
        let v1 = (
            &self.from,
            &self.scopes,
            &self.marks,
            &self.known,
            &self.page,
            &self.limit,
            &self.deferred,
        );
        write_versioned(out, v1, (version >= 2).then_some(&self.ext));
    }

    fn read_body(version: u16, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        type V1 = (
            NodeId,
            ScopeFilter,
            RequestMarks,
            Option<MarksDigest>,
            Page,
            u32,
            Vec<(Scope, NodeId)>,
        );
        let ((from, scopes, marks, known, page, limit, deferred), rest) =
            postcard::take_from_bytes::<V1>(body)?;
        let (ext, rest) = read_ext(version, rest)?;
        let request = ExchangeRequest {
            from,
            scopes,
            marks,
            known,
            page,
            limit,
            deferred,
            ext,
        };
        Ok((request, rest))
    }
}

impl Message for ExchangeResponse {
    const KIND: u8 = 2;

    fn version(&self) -> u16 {
        lowest_version(self.ext.is_empty())
    }

    fn write_body(&self, version: u16, out: &mut Vec<u8>) {
        let v1 = (&self.from, &self.marks, &self.page, &self.halts);
        write_versioned(out, v1, (version >= 2).then_some(&self.ext));
    }

    fn read_body(version: u16, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        type V1 = (NodeId, ResponseMarks, Page, Vec<Halt>);
        let ((from, marks, page, halts), rest) = postcard::take_from_bytes::<V1>(body)?;
        let (ext, rest) = read_ext(version, rest)?;
        let response = ExchangeResponse {
            from,
            marks,
            page,
            halts,
            ext,
        };
        Ok((response, rest))
    }
}

/// A frame exists only in version 2 (a streamed pull): its body is the struct's fields.
impl Message for PageFrame {
    const KIND: u8 = 5;

    fn version(&self) -> u16 {
        2
    }
}

/// The lowest version that carries a message: 1 unless its extension is used.
fn lowest_version(ext_is_empty: bool) -> u16 {
    if ext_is_empty {
        1
    } else {
        2
    }
}

fn write_versioned<V: Serialize, E: Serialize>(out: &mut Vec<u8>, v1: V, ext: Option<&E>) {
    // IMPORTANT: writing into a Vec cannot fail, and every type here serializes infallibly.
    postcard::to_io(&v1, &mut *out).expect("postcard encoding into a Vec does not fail");
    if let Some(ext) = ext {
        postcard::to_io(ext, &mut *out).expect("postcard encoding into a Vec does not fail");
    }
}

/// The extension of a version 2 body (after the version 1 fields); empty for version 1.
fn read_ext<E: DeserializeOwned + Default>(
    version: u16,
    rest: &[u8],
) -> Result<(E, &[u8]), postcard::Error> {
    if version >= 2 {
        postcard::take_from_bytes::<E>(rest)
    } else {
        Ok((E::default(), rest))
    }
}

impl Message for AuditRequest {
    const KIND: u8 = 3;

    fn version(&self) -> u16 {
        lowest_version(self.ext.is_empty())
    }

    fn write_body(&self, version: u16, out: &mut Vec<u8>) {
        let v1 = (
            &self.from,
            &self.scopes,
            &self.opening,
            RangesOut(&self.segments),
            &self.versions,
            &self.wanted,
        );
        write_versioned(out, v1, (version >= 2).then_some(&self.ext));
    }

    fn read_body(version: u16, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        type V1 = (NodeId, ScopeFilter, bool, RangesIn, Shipment, Wanted);
        let ((from, scopes, opening, RangesIn(segments), versions, wanted), rest) =
            postcard::take_from_bytes::<V1>(body)?;
        let (ext, rest) = read_ext(version, rest)?;
        let request = AuditRequest {
            from,
            scopes,
            opening,
            segments,
            versions,
            wanted,
            ext,
        };
        Ok((request, rest))
    }
}

impl Message for AuditResponse {
    const KIND: u8 = 4;

    fn version(&self) -> u16 {
        lowest_version(self.ext.is_empty())
    }

    fn write_body(&self, version: u16, out: &mut Vec<u8>) {
        let v1 = (
            &self.from,
            RangesOut(&self.segments),
            &self.versions,
            &self.wanted,
            &self.offered,
            &self.halts,
        );
        write_versioned(out, v1, (version >= 2).then_some(&self.ext));
    }

    fn read_body(version: u16, body: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        type V1 = (NodeId, RangesIn, Shipment, Wanted, Wanted, Vec<Halt>);
        let ((from, RangesIn(segments), versions, wanted, offered, halts), rest) =
            postcard::take_from_bytes::<V1>(body)?;
        let (ext, rest) = read_ext(version, rest)?;
        let response = AuditResponse {
            from,
            segments,
            versions,
            wanted,
            offered,
            halts,
            ext,
        };
        Ok((response, rest))
    }
}

/// Encodes `msg` in an envelope of the lowest version that carries it
/// ([`Message::version`]).
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    encode_as(msg, msg.version())
}

/// Encodes `msg` in an envelope of protocol `version` at most: what that version cannot
/// carry is left out (a responder answers a version 1 request in version 1).
pub fn encode_as<M: Message>(msg: &M, version: u16) -> Vec<u8> {
    let version = version.clamp(1, PROTOCOL_VERSION);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.push(M::KIND);
    msg.write_body(version, &mut out);
    out
}

/// Decodes an envelope holding an `M`, of any supported version.
///
/// # Errors
/// [`WireError`]: truncated input, trailing bytes, bad magic, unsupported version, another
/// message kind, a message over [`MAX_MESSAGE_LEN`], or a body that does not decode.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, WireError> {
    decode_versioned(bytes).map(|(msg, _)| msg)
}

/// Decodes an envelope holding an `M`, and says which protocol version it was.
///
/// # Errors
/// As for [`decode`].
pub fn decode_versioned<M: Message>(bytes: &[u8]) -> Result<(M, u16), WireError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    let (version, body) = check_header(bytes, M::KIND)?;
    let (msg, rest) = M::read_body(version, body).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => WireError::Truncated,
        other => WireError::Malformed {
            reason: other.to_string(),
        },
    })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { count: rest.len() });
    }
    Ok((msg, version))
}

fn check_header(bytes: &[u8], kind: u8) -> Result<(u16, &[u8]), WireError> {
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
    Ok((version, body))
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

/// The length prefix of one message in a stream: 4 bytes, big-endian.
const FRAME_PREFIX: usize = 4;

/// Encodes `msg` in protocol `version` at most (as [`encode_as`]) for a stream of messages:
/// its envelope's length as 4 bytes big-endian, then the envelope. A streamed pull's body
/// over HTTP is such messages back to back (docs/protocol.md, "Streamed pulls").
pub fn encode_framed<M: Message>(msg: &M, version: u16) -> Vec<u8> {
    let envelope = encode_as(msg, version);
    let len = u32::try_from(envelope.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(FRAME_PREFIX + envelope.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&envelope);
    out
}

/// Splits a stream of length-prefixed envelopes ([`encode_framed`]) back into envelopes, as
/// the bytes arrive in chunks of any size. Holds at most one message and the start of the
/// next: a prefix that announces more than `max` bytes is refused before they are read.
#[derive(Debug)]
pub struct Unframer {
    buf: bytes::BytesMut,
    max: usize,
}

impl Unframer {
    /// An unframer that refuses messages over `max` bytes (at most [`MAX_MESSAGE_LEN`]).
    pub fn new(max: usize) -> Unframer {
        Unframer {
            buf: bytes::BytesMut::new(),
            max: max.min(MAX_MESSAGE_LEN),
        }
    }

    /// Adds the next bytes of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole envelope, or `None` until more bytes arrive.
    ///
    /// # Errors
    /// [`WireError::TooLarge`] for a prefix over the limit, [`WireError::Truncated`] for an
    /// empty message. The stream cannot be read further after either.
    pub fn next_message(&mut self) -> Result<Option<bytes::Bytes>, WireError> {
        let Some(prefix) = self.buf.first_chunk::<FRAME_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > self.max {
            return Err(WireError::TooLarge { len, max: self.max });
        }
        if len == 0 {
            return Err(WireError::Truncated);
        }
        if self.buf.len() < FRAME_PREFIX + len {
            self.buf.reserve(FRAME_PREFIX + len - self.buf.len());
            return Ok(None);
        }
        let _ = self.buf.split_to(FRAME_PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Whether no part of a message is buffered: a stream that ends here ended between
    /// messages, anywhere else it was cut inside one.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
