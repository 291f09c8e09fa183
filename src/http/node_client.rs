//! A client for a node's records API (`/v1/records`, `/v1/files`, `/v1/status`).

use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use percent_encoding::{percent_encode, NON_ALPHANUMERIC};

use crate::api::Status;
use crate::blob::CHUNK;
use crate::hash::Hash;
use crate::hlc::Hlc;
use crate::http::body::{empty, full, stream_reader};
use crate::http::{encode_key, HttpTransport, HEADER_HLC, HEADER_RESIDENCY};
use crate::node::records::{parse_residency, Listed, Written};
use crate::node::NodeError;
use crate::record::{Key, Residency, Scope, MAX_VALUE_LEN};

/// The most of a JSON answer read.
const JSON_LIMIT: usize = 16 << 20;

/// A record read from a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRecord {
    /// The value.
    pub value: Vec<u8>,
    /// The version's timestamp (its origin is the writer).
    pub hlc: Hlc,
    /// Where the record stands on that node.
    pub residency: Residency,
}

/// Talks to a running node's records API over HTTP, with a bearer token if given.
#[derive(Debug)]
pub struct NodeClient {
    http: HttpTransport,
}

fn bad(reason: impl Into<String>) -> NodeError {
    NodeError::BadResponse {
        reason: reason.into(),
    }
}

fn key_text(key: &Key) -> String {
    String::from_utf8_lossy(key.as_bytes()).into_owned()
}

fn not_found(what: &'static str, scope: &Scope, key: &Key) -> NodeError {
    NodeError::NotFound {
        what,
        scope: scope.to_string(),
        key: key_text(key),
    }
}

impl NodeClient {
    /// A client of the node at `url` (`http://host:port`).
    ///
    /// # Errors
    /// `url` is not an `http://` root URL, or the token is not a valid header value.
    pub fn new(url: &str, token: Option<String>) -> Result<NodeClient, NodeError> {
        Ok(NodeClient {
            http: crate::node::transport_to(url, token)?,
        })
    }

    /// The node's root URL.
    pub fn url(&self) -> &str {
        self.http.base_url()
    }

    /// Writes `value` under `key`; durable on the node when this returns.
    ///
    /// # Errors
    /// The node cannot be reached or refuses (no access, value too large...).
    pub async fn put(
        &self,
        scope: &Scope,
        key: &Key,
        value: Vec<u8>,
    ) -> Result<Written, NodeError> {
        let len = value.len() as u64;
        let resp = self
            .http
            .call(
                Method::PUT,
                &record_path(scope, key),
                full(value),
                Some(len),
            )
            .await?;
        written(expect_ok(resp).await?).await
    }

    /// The live record under `key`, or `None` if it is absent or deleted.
    ///
    /// # Errors
    /// The node cannot be reached or refuses.
    pub async fn get(&self, scope: &Scope, key: &Key) -> Result<Option<RemoteRecord>, NodeError> {
        let resp = self
            .http
            .call(Method::GET, &record_path(scope, key), empty(), None)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = expect_ok(resp).await?;
        let hlc = header(&resp, HEADER_HLC)?
            .parse::<Hlc>()
            .map_err(|_| bad("malformed version header"))?;
        let residency = parse_residency(header(&resp, HEADER_RESIDENCY)?)
            .ok_or_else(|| bad("unknown residency"))?;
        let value = read_limited(resp, MAX_VALUE_LEN).await?;
        Ok(Some(RemoteRecord {
            value: value.to_vec(),
            hlc,
            residency,
        }))
    }

    /// Deletes `key` (writes a tombstone); durable on the node when this returns.
    ///
    /// # Errors
    /// The node cannot be reached or refuses.
    pub async fn delete(&self, scope: &Scope, key: &Key) -> Result<Written, NodeError> {
        let resp = self
            .http
            .call(Method::DELETE, &record_path(scope, key), empty(), None)
            .await?;
        written(expect_ok(resp).await?).await
    }

    /// Live records of `scope` in key order: keys starting with `prefix`, strictly after
    /// `after`, at most `limit` (1..=1000).
    ///
    /// # Errors
    /// The node cannot be reached or refuses.
    pub async fn list(
        &self,
        scope: &Scope,
        prefix: &[u8],
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<Listed>, NodeError> {
        let mut path = format!(
            "/v1/records/{scope}?limit={}&prefix={}",
            limit.clamp(1, 1000),
            percent_encode(prefix, NON_ALPHANUMERIC)
        );
        if let Some(a) = after {
            path.push_str("&after=");
            path.push_str(&encode_key(a));
        }
        let resp = self.http.call(Method::GET, &path, empty(), None).await?;
        let v = read_json(expect_ok(resp).await?).await?;
        let items = v
            .get("records")
            .and_then(|r| r.as_array())
            .ok_or_else(|| bad("listing without records"))?;
        items.iter().map(listed).collect()
    }

    /// Writes a record whose file is the content of `path`, streamed; durable on the node
    /// when this returns.
    ///
    /// # Errors
    /// The file cannot be read, or the node cannot be reached or refuses.
    pub async fn put_file(
        &self,
        scope: &Scope,
        key: &Key,
        path: &Path,
    ) -> Result<Written, NodeError> {
        let io = |source| NodeError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let body = stream_reader(Box::new(file), Some(len), CHUNK);
        let resp = self
            .http
            .call(Method::PUT, &file_path(scope, key), body, Some(len))
            .await?;
        written(expect_ok(resp).await?).await
    }

    /// Streams the file of the record under `key` into `into`, checking it against its hash;
    /// returns its size.
    ///
    /// # Errors
    /// [`NodeError::NotFound`] (no record, or no file), [`NodeError::Staged`] (the file has
    /// not arrived on that node yet), the transfer broke off or the bytes do not match the
    /// hash, or `into` failed.
    pub async fn get_file(
        &self,
        scope: &Scope,
        key: &Key,
        into: &mut (dyn Write + Send),
    ) -> Result<u64, NodeError> {
        let resp = self
            .http
            .call(Method::GET, &file_path(scope, key), empty(), None)
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => {
                let e = HttpTransport::error_for(resp).await;
                let what = match &e {
                    crate::error::TransportError::Refused { reason, .. }
                        if reason.contains("no file") =>
                    {
                        "the record has no file"
                    }
                    _ => "no such record",
                };
                return Err(not_found(what, scope, key));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                return Err(NodeError::Staged {
                    scope: scope.to_string(),
                    key: key_text(key),
                })
            }
            _ => {}
        }
        let resp = expect_ok(resp).await?;
        let expected: Hash = header(&resp, hyper::header::ETAG.as_str())?
            .trim_matches('"')
            .parse()
            .map_err(|_| bad("malformed file hash"))?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| bad(format!("file transfer broke off: {e}")))?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                size += data.len() as u64;
                into.write_all(&data).map_err(|source| NodeError::Io {
                    path: "output".into(),
                    source,
                })?;
            }
        }
        let found: Hash = hasher.finalize().into();
        if found != expected {
            return Err(bad(format!(
                "file content hashes to {found}, not {expected}"
            )));
        }
        Ok(size)
    }

    /// The node's `/v1/status` document.
    ///
    /// # Errors
    /// The node cannot be reached or refuses.
    pub async fn status(&self) -> Result<Status, NodeError> {
        let resp = self
            .http
            .call(Method::GET, "/v1/status", empty(), None)
            .await?;
        let v = read_json(expect_ok(resp).await?).await?;
        serde_json::from_value(v).map_err(|e| bad(format!("status document: {e}")))
    }
}

fn record_path(scope: &Scope, key: &Key) -> String {
    format!("/v1/records/{scope}/{}", encode_key(key))
}

fn file_path(scope: &Scope, key: &Key) -> String {
    format!("/v1/files/{scope}/{}", encode_key(key))
}

async fn expect_ok(resp: Response<Incoming>) -> Result<Response<Incoming>, NodeError> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(HttpTransport::error_for(resp).await.into())
    }
}

fn header<'a>(resp: &'a Response<Incoming>, name: &str) -> Result<&'a str, NodeError> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(format!("missing header {name}")))
}

async fn read_limited(resp: Response<Incoming>, limit: usize) -> Result<Bytes, NodeError> {
    http_body_util::Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| bad(format!("response body: {e}")))
}

async fn read_json(resp: Response<Incoming>) -> Result<serde_json::Value, NodeError> {
    let bytes = read_limited(resp, JSON_LIMIT).await?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))
}

async fn written(resp: Response<Incoming>) -> Result<Written, NodeError> {
    let v = read_json(resp).await?;
    let hlc = v
        .get("hlc")
        .and_then(|h| h.as_str())
        .and_then(|h| h.parse::<Hlc>().ok())
        .ok_or_else(|| bad("write acknowledged without a version"))?;
    Ok(Written { hlc })
}

fn listed(item: &serde_json::Value) -> Result<Listed, NodeError> {
    let text = |name: &str| item.get(name).and_then(|v| v.as_str());
    let key_bytes: Vec<u8> = text("key")
        .map(|k| percent_encoding::percent_decode_str(k).collect())
        .ok_or_else(|| bad("listed record without key"))?;
    let key = Key::new(key_bytes).map_err(|_| bad("listed record with an invalid key"))?;
    let hlc = text("hlc")
        .and_then(|h| h.parse::<Hlc>().ok())
        .ok_or_else(|| bad("listed record without version"))?;
    let residency = text("residency")
        .and_then(parse_residency)
        .ok_or_else(|| bad("listed record without residency"))?;
    let size = item
        .get("size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| bad("listed record without size"))?;
    let file_size = item
        .get("file")
        .and_then(|f| f.get("size"))
        .and_then(|s| s.as_u64());
    Ok(Listed {
        key,
        size,
        file_size,
        hlc,
        residency,
    })
}
