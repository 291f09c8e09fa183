//! A client for a node's records API (`/v1/records`, `/v1/files`, `/v1/status`): the
//! remote side of [`NodeApi`].

use std::io::{self, Read};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use percent_encoding::{percent_decode_str, percent_encode, NON_ALPHANUMERIC};
use tokio::sync::mpsc;

use crate::api::{
    FileRead, ListQuery, Listed, Listing, Lookup, NodeApi, RecordRead, Routed, Source, Status,
    Visible, Written, MAX_LIST_LIMIT,
};
use crate::blob::CHUNK;
use crate::error::{Result, TransportError, WireError};
use crate::hash::Hash;
use crate::hlc::Hlc;
use crate::http::body::{empty, full, stream_reader, ChannelReader, Piece};
use crate::http::{
    encode_key, ClientConfig, HttpTransport, HEADER_HLC, HEADER_HYDRATION, HEADER_RESIDENCY,
    HEADER_SOURCE, NO_FILE, RECORD_DELETED,
};
use crate::record::{BlobRef, Hydration, Key, Residency, Scope, MAX_VALUE_LEN};

/// The most of a JSON answer read.
const JSON_LIMIT: usize = 16 << 20;

/// Talks to a running node's records API over HTTP, with a bearer token if given. Must be
/// used inside a tokio runtime.
#[derive(Debug)]
pub struct NodeClient {
    http: HttpTransport,
}

/// An answer this client does not understand.
fn bad(reason: impl Into<String>) -> crate::Error {
    TransportError::BadResponse(WireError::Malformed {
        reason: reason.into(),
    })
    .into()
}

impl NodeClient {
    /// A client of the node at `url` (`http://host:port` or `https://host:port`, whose
    /// certificate must chain to one of the system's trusted roots).
    ///
    /// # Errors
    /// [`TransportError::InvalidUrl`] when `url` is not an `http://` or `https://` root URL,
    /// [`TransportError::InvalidToken`] when the token is not a valid header value.
    pub fn new(url: &str, token: Option<String>) -> Result<NodeClient, TransportError> {
        Ok(NodeClient {
            http: HttpTransport::new(url, token)?,
        })
    }

    /// A client with explicit settings (the token, a CA file to trust, timeouts).
    ///
    /// # Errors
    /// As for [`NodeClient::new`], and [`TransportError::CaFile`] when the CA file cannot be
    /// used.
    pub fn with_config(url: &str, config: ClientConfig) -> Result<NodeClient, TransportError> {
        Ok(NodeClient {
            http: HttpTransport::with_config(url, config)?,
        })
    }

    /// A client over `http` as it is set up.
    pub(crate) fn over(http: HttpTransport) -> NodeClient {
        NodeClient { http }
    }

    /// The node's root URL.
    pub fn url(&self) -> &str {
        self.http.base_url()
    }

    async fn put_value(&self, scope: Scope, key: Key, value: Vec<u8>) -> Result<Written> {
        let len = value.len() as u64;
        let path = record_path(&scope, &key);
        let resp = self
            .http
            .call(Method::PUT, &path, full(value), Some(len))
            .await?;
        written(expect_ok(resp).await?).await
    }

    async fn lookup(&self, scope: Scope, key: Key) -> Result<Routed<Lookup>> {
        let resp = self
            .http
            .call(Method::GET, &record_path(&scope, &key), empty(), None)
            .await?;
        let (source, hydration) = source_headers(&resp)?;
        let routed = |value| Routed {
            value,
            source,
            hydration,
        };
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(routed(match refusal_reason(resp).await {
                Some(reason) if reason.ends_with(RECORD_DELETED) => Lookup::Deleted,
                _ => Lookup::Missing,
            }));
        }
        let resp = expect_ok(resp).await?;
        let hlc = version_header(&resp)?;
        let residency = parse_residency(header(&resp, HEADER_RESIDENCY)?)
            .ok_or_else(|| bad("unknown residency"))?;
        let value = read_limited(resp, MAX_VALUE_LEN).await?;
        Ok(routed(Lookup::Found(RecordRead {
            value: value.to_vec(),
            hlc,
            residency,
        })))
    }

    async fn tombstone(&self, scope: Scope, key: Key) -> Result<Written> {
        let resp = self
            .http
            .call(Method::DELETE, &record_path(&scope, &key), empty(), None)
            .await?;
        written(expect_ok(resp).await?).await
    }

    async fn listing(&self, scope: Scope, query: ListQuery) -> Result<Routed<Listing>> {
        let mut path = format!(
            "/v1/records/{scope}?limit={}&prefix={}",
            query.limit.clamp(1, MAX_LIST_LIMIT),
            percent_encode(&query.prefix, NON_ALPHANUMERIC)
        );
        if let Some(a) = &query.after {
            path.push_str("&after=");
            path.push_str(&encode_key(a));
        }
        let resp = self.http.call(Method::GET, &path, empty(), None).await?;
        let v = read_json(expect_ok(resp).await?).await?;
        let items = v
            .get("records")
            .and_then(|r| r.as_array())
            .ok_or_else(|| bad("listing without records"))?;
        let next_after = match v.get("next_after").and_then(|n| n.as_str()) {
            Some(k) => Some(parse_key(k).ok_or_else(|| bad("listing with an invalid next key"))?),
            None => None,
        };
        // A node older than routed reads says nothing: its answers are its own.
        let source = match v.get("source").and_then(|s| s.as_str()) {
            Some(s) => {
                Source::from_header(s).ok_or_else(|| bad("listing with an unknown source"))?
            }
            None => Source::Local,
        };
        let hydration = match v.get("hydration").and_then(|h| h.as_str()) {
            Some(h) => {
                Hydration::parse(h).ok_or_else(|| bad("listing with an unknown hydration"))?
            }
            None => Hydration::Ready,
        };
        Ok(Routed {
            value: Listing {
                records: items.iter().map(listed).collect::<Result<_>>()?,
                next_after,
            },
            source,
            hydration,
        })
    }

    async fn upload_file(
        &self,
        scope: Scope,
        key: Key,
        value: Vec<u8>,
        content: Box<dyn Read + Send>,
    ) -> Result<Written> {
        if !value.is_empty() {
            return Err(TransportError::Unsupported {
                what: "a value beside a file (the files endpoint writes an empty one)",
            }
            .into());
        }
        let body = stream_reader(content, None, CHUNK);
        let resp = self
            .http
            .call(Method::PUT, &file_path(&scope, &key), body, None)
            .await?;
        written(expect_ok(resp).await?).await
    }

    async fn file(&self, scope: Scope, key: Key) -> Result<FileRead> {
        let resp = self
            .http
            .call(Method::GET, &file_path(&scope, &key), empty(), None)
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => {
                return Ok(match refusal_reason(resp).await {
                    Some(reason) if reason.ends_with(NO_FILE) => FileRead::NoFile,
                    _ => FileRead::Missing,
                })
            }
            StatusCode::SERVICE_UNAVAILABLE if resp.headers().contains_key(HEADER_HLC) => {
                return Ok(FileRead::Staged {
                    hlc: version_header(&resp)?,
                })
            }
            _ => {}
        }
        let resp = expect_ok(resp).await?;
        let hash: Hash = header(&resp, hyper::header::ETAG.as_str())?
            .trim_matches('"')
            .parse()
            .map_err(|_| bad("malformed file hash"))?;
        let size: u64 = header(&resp, hyper::header::CONTENT_LENGTH.as_str())?
            .parse()
            .map_err(|_| bad("malformed file length"))?;
        let hlc = version_header(&resp)?;
        let blob = BlobRef { hash, size };
        let (tx, reader) = ChannelReader::new();
        tokio::spawn(feed(resp.into_body(), tx));
        Ok(FileRead::Ready {
            blob,
            hlc,
            reader: Box::new(Verified::new(reader, blob)),
        })
    }

    async fn status_document(&self) -> Result<Status> {
        let resp = self
            .http
            .call(Method::GET, "/v1/status", empty(), None)
            .await?;
        let bytes = read_limited(expect_ok(resp).await?, JSON_LIMIT).await?;
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("status document: {e}")))
    }
}

/// Where a record read's answer came from and the scope's hydration, from the response's
/// headers (a node older than routed reads sends neither: its answers are its own).
fn source_headers<B>(resp: &hyper::Response<B>) -> Result<(Source, Hydration)> {
    let text = |name: &str| resp.headers().get(name).map(|v| v.to_str().ok());
    let source = match text(HEADER_SOURCE) {
        None => Source::Local,
        Some(v) => v
            .and_then(Source::from_header)
            .ok_or_else(|| bad("unknown source header"))?,
    };
    let hydration = match text(HEADER_HYDRATION) {
        None => Hydration::Ready,
        Some(v) => v
            .and_then(Hydration::parse)
            .ok_or_else(|| bad("unknown hydration header"))?,
    };
    Ok((source, hydration))
}

impl NodeApi for NodeClient {
    fn put(&self, scope: Scope, key: Key, value: Vec<u8>) -> BoxFuture<'_, Result<Written>> {
        Box::pin(self.put_value(scope, key, value))
    }

    fn get(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Lookup>> {
        Box::pin(async move { Ok(self.lookup(scope, key).await?.value) })
    }

    /// The node routes the read itself and says where the answer came from.
    fn get_routed(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Routed<Lookup>>> {
        Box::pin(self.lookup(scope, key))
    }

    fn list_routed(
        &self,
        scope: Scope,
        query: ListQuery,
    ) -> BoxFuture<'_, Result<Routed<Listing>>> {
        Box::pin(self.listing(scope, query))
    }

    fn delete(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Written>> {
        Box::pin(self.tombstone(scope, key))
    }

    fn list(&self, scope: Scope, query: ListQuery) -> BoxFuture<'_, Result<Listing>> {
        Box::pin(async move { Ok(self.listing(scope, query).await?.value) })
    }

    fn put_file(
        &self,
        scope: Scope,
        key: Key,
        value: Vec<u8>,
        content: Box<dyn Read + Send>,
    ) -> BoxFuture<'_, Result<Written>> {
        Box::pin(self.upload_file(scope, key, value, content))
    }

    fn get_file(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<FileRead>> {
        Box::pin(self.file(scope, key))
    }

    /// The node narrows the document to what the client's token may read; `visible` is
    /// not sent.
    fn status(&self, _visible: Visible) -> BoxFuture<'_, Result<Status>> {
        Box::pin(self.status_document())
    }
}

/// Feeds a file download into the reader [`NodeApi::get_file`] returned, until the body
/// ends, breaks off, or the reader is dropped.
async fn feed(mut body: Incoming, tx: mpsc::Sender<Piece>) {
    while let Some(frame) = body.frame().await {
        let piece = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => Ok(Some(data)),
                Err(_) => continue,
            },
            Err(e) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("file transfer broke off: {e}"),
            )),
        };
        let failed = piece.is_err();
        if tx.send(piece).await.is_err() || failed {
            return;
        }
    }
    let _ = tx.send(Ok(None)).await;
}

/// A file's bytes, checked against its hash and size as they are read: the end of the
/// stream is an error when they do not match.
struct Verified<R> {
    inner: R,
    blob: BlobRef,
    hasher: blake3::Hasher,
    seen: u64,
}

impl<R: Read> Verified<R> {
    fn new(inner: R, blob: BlobRef) -> Self {
        Verified {
            inner,
            blob,
            hasher: blake3::Hasher::new(),
            seen: 0,
        }
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        if self.seen > self.blob.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "file {} is longer than {} bytes",
                    self.blob.hash, self.blob.size
                ),
            ));
        }
        if n > 0 {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        let found: Hash = self.hasher.finalize().into();
        if found != self.blob.hash || self.seen != self.blob.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "file content ({} bytes) hashes to {found}, not {} ({} bytes)",
                    self.seen, self.blob.hash, self.blob.size
                ),
            ));
        }
        Ok(0)
    }
}

fn record_path(scope: &Scope, key: &Key) -> String {
    format!("/v1/records/{scope}/{}", encode_key(key))
}

fn file_path(scope: &Scope, key: &Key) -> String {
    format!("/v1/files/{scope}/{}", encode_key(key))
}

/// A residency from its lower-case name.
fn parse_residency(name: &str) -> Option<Residency> {
    [
        Residency::Absent,
        Residency::Staged,
        Residency::Resident,
        Residency::Tombstoned,
    ]
    .into_iter()
    .find(|r| r.as_str() == name)
}

/// A key from its percent-encoded form.
fn parse_key(text: &str) -> Option<Key> {
    Key::new(percent_decode_str(text).collect::<Vec<u8>>()).ok()
}

async fn expect_ok(resp: Response<Incoming>) -> Result<Response<Incoming>> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(HttpTransport::error_for(resp).await.into())
    }
}

/// The server's message in a failure response (after `HTTP <status>: `), if it sent one.
async fn refusal_reason(resp: Response<Incoming>) -> Option<String> {
    match HttpTransport::error_for(resp).await {
        TransportError::Refused { reason, .. } => Some(reason),
        _ => None,
    }
}

fn header<'a>(resp: &'a Response<Incoming>, name: &str) -> Result<&'a str> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(format!("missing header {name}")))
}

fn version_header(resp: &Response<Incoming>) -> Result<Hlc> {
    header(resp, HEADER_HLC)?
        .parse::<Hlc>()
        .map_err(|_| bad("malformed version header"))
}

async fn read_limited(resp: Response<Incoming>, limit: usize) -> Result<Bytes> {
    http_body_util::Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| bad(format!("response body: {e}")))
}

async fn read_json(resp: Response<Incoming>) -> Result<serde_json::Value> {
    let bytes = read_limited(resp, JSON_LIMIT).await?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))
}

async fn written(resp: Response<Incoming>) -> Result<Written> {
    let v = read_json(resp).await?;
    let hlc = v
        .get("hlc")
        .and_then(|h| h.as_str())
        .and_then(|h| h.parse::<Hlc>().ok())
        .ok_or_else(|| bad("write acknowledged without a version"))?;
    let hash = v
        .get("hash")
        .and_then(|h| h.as_str())
        .and_then(|h| h.parse::<Hash>().ok());
    let size = v.get("size").and_then(|s| s.as_u64());
    let file = hash.zip(size).map(|(hash, size)| BlobRef { hash, size });
    Ok(Written { hlc, file })
}

fn listed(item: &serde_json::Value) -> Result<Listed> {
    let text = |name: &str| item.get(name).and_then(|v| v.as_str());
    let key = text("key")
        .ok_or_else(|| bad("listed record without key"))
        .and_then(|k| parse_key(k).ok_or_else(|| bad("listed record with an invalid key")))?;
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
    let file = item.get("file").filter(|f| !f.is_null());
    let file = match file {
        None => None,
        Some(f) => {
            let hash = f
                .get("hash")
                .and_then(|h| h.as_str())
                .and_then(|h| h.parse().ok());
            let size = f.get("size").and_then(|s| s.as_u64());
            Some(
                hash.zip(size)
                    .map(|(hash, size)| BlobRef { hash, size })
                    .ok_or_else(|| bad("listed record with a malformed file"))?,
            )
        }
    };
    Ok(Listed {
        key,
        value: text("value").map(str::to_owned),
        size,
        file,
        hlc,
        residency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut reader: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    }

    #[test]
    fn a_download_reads_only_if_its_bytes_match_the_hash_and_size() {
        let content = b"the file".to_vec();
        let blob = BlobRef {
            hash: Hash::of(&content),
            size: content.len() as u64,
        };
        let whole = Verified::new(io::Cursor::new(content.clone()), blob);
        assert_eq!(read_all(whole).unwrap(), content);
        let other = Verified::new(io::Cursor::new(b"the fill".to_vec()), blob);
        assert_eq!(
            read_all(other).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let short = Verified::new(io::Cursor::new(b"the".to_vec()), blob);
        assert!(read_all(short).is_err());
        let long = Verified::new(io::Cursor::new(b"the file, and more".to_vec()), blob);
        assert!(read_all(long).is_err());
    }
}
