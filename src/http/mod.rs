//! Sync over HTTP: the server ([`serve`], [`HighwaterService`]), the client transport
//! ([`HttpTransport`]) and the records API's client ([`NodeClient`]), on hyper 1.
//!
//! Every endpoint lives under `/v1`; docs/http.md is the reference (paths, bodies, status
//! codes, tokens and limits):
//!
//! - `POST /v1/sync/exchange`: one round; the body is the wire envelope ([`crate::wire`]).
//! - `HEAD|GET|PUT /v1/blobs/<64 lowercase hex>`: blob presence, download, upload (streamed,
//!   verified while received, stored only if the bytes hash to the path).
//! - `GET /v1/sync/watch?since=<token>&timeout_ms=N`: long-poll for news.
//! - `PUT|GET|DELETE /v1/records/<scope>/<key>`, `GET /v1/records/<scope>?prefix=&after=&limit=`,
//!   `PUT|GET /v1/files/<scope>/<key>`: the records API for applications and the CLI.
//! - `GET /v1/status`: node id, watermarks, residency, peers and what they lack.
//! - `GET /metrics`: the node's [`Metrics`] in the Prometheus text format.

pub mod access;
pub(crate) mod body;
mod client;
mod metrics;
mod node_client;
pub(crate) mod server;
pub(crate) mod tls;

use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use self::server_failure::Failure;

pub use self::access::{Access, AccessError, Grant, ScopePattern};
pub use self::body::HttpBody;
pub use self::client::{ClientConfig, HttpTransport, POOL_IDLE};
pub use self::metrics::{Metrics, STAGED_EVERY};
pub use self::node_client::NodeClient;
pub use self::server::{
    refusal_status, serve, HighwaterService, ServeError, ServerConfig, DEFAULT_MAX_CONNECTIONS,
};
pub use self::tls::{ServerTls, TlsError};
/// The rustls this crate builds on, for [`ServerTls::from_rustls`] and
/// [`ServerTls::rustls_config`].
pub use rustls;

use crate::record::Key;

/// Response header: the record version's Hlc (`<NTP64 decimal>/<origin hex>`).
pub const HEADER_HLC: &str = "x-highwater-hlc";
/// Response header: the record version's origin node id (hex).
pub const HEADER_ORIGIN: &str = "x-highwater-origin";
/// Response header: the record's residency (`resident`, `staged`, ...).
pub const HEADER_RESIDENCY: &str = "x-highwater-residency";
/// Response header of a record read or listing: where the answer came from, `local` or
/// `remote <peer URL>` (a read routed to the peer hydrating the scope; see docs/http.md).
pub const HEADER_SOURCE: &str = "x-highwater-source";
/// Response header of a record read or listing: the scope's hydration on the node asked
/// (`not_started`, `hydrating`, `ready`).
pub const HEADER_HYDRATION: &str = "x-highwater-hydration";
/// Request header of a record read or listing: `local` asks the node to answer from its own
/// store and route nothing (a node routing a read to its peer sends it).
pub const HEADER_ROUTE: &str = "x-highwater-route";
/// Response header of a sync message's answer (`exchange`, `pull`, `push`, `audit`): present,
/// with the value `1`, when the node takes streamed pushes (`POST /v1/sync/push`). A client
/// opens a push only to a node whose answers carry it, or before it heard any answer (see
/// docs/http.md): a build without the endpoint answers 404 without reading the body, and a
/// client still sending then may see a broken pipe instead of that 404.
pub const HEADER_PUSH: &str = "x-highwater-push";
/// The message of a 404 for a key without any version.
const NO_SUCH_RECORD: &str = "no such record";
/// The message of a 404 for a key whose latest version is a delete.
const RECORD_DELETED: &str = "record deleted";
/// The message of a 404 for a file of a record that has none.
const NO_FILE: &str = "the record has no file";
/// The longest a watch request waits.
pub const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Characters left as they are in keys in paths and queries: RFC 3986 unreserved.
const KEY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A key as it appears in a path segment or query value.
pub fn encode_key(key: &Key) -> String {
    percent_encoding::percent_encode(key.as_bytes(), KEY_SET).to_string()
}

/// A string value as it appears in a query.
fn encode_query_value(value: &str) -> String {
    utf8_percent_encode(value, KEY_SET).to_string()
}

/// Decodes percent-escapes, refusing a `%` that is not followed by two hex digits: a lenient
/// decoder keeps such text as it is, so `%G1` would name a different key than the client's
/// encoder meant (and than a stricter proxy in front understood).
fn percent_decode(text: &str, what: &str) -> Result<Vec<u8>, Failure> {
    let bytes = text.as_bytes();
    let escapes_ok = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return Err(Failure::bad(format!(
            "malformed percent-escape in {what} (a % must start %XX, two hex digits; a literal % is %25)"
        )));
    }
    Ok(percent_decode_str(text).collect())
}

/// A key from a percent-encoded path segment.
fn parse_key(segment: &str) -> Result<Key, Failure> {
    Key::new(percent_decode(segment, "the key")?).map_err(Into::into)
}

/// Decodes `a=b&c=d` (percent-encoded, `+` not special), refusing repeated names and
/// malformed escapes.
fn decode_query(query: &str) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = String::from_utf8(percent_decode(name, "the query")?)
            .map_err(|_| Failure::bad("malformed query"))?;
        if out.iter().any(|(n, _)| *n == name) {
            return Err(Failure::bad(format!("parameter {name:?} given twice")));
        }
        out.push((name, percent_decode(value, "the query")?));
    }
    Ok(out)
}

mod server_failure {
    pub(super) use super::server::Failure;
}
