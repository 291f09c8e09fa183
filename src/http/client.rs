//! The HTTP client transport.
//!
//! Over 600 lines with its tests: one transport, `HttpTransport`, and the private helpers of its
//! requests (round trips, streamed pulls and pushes, blob streams, watches).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{channel_body, empty, full, stream_reader, HttpBody};
use super::encode_query_value;
use super::tls::{certificate_problem, client_config};
use crate::blob::CHUNK;
use crate::error::{error_chain, TransportError, WireError};
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::poison::lock;
use crate::record::BlobRef;
use crate::transport::{
    frames_from, Frames, Pull, RefusalCode, Transport, WatchReply, PULL_WINDOW,
};
use crate::wire::{
    self, AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse, Message, PageFrame,
};

/// Blob presence questions (HEAD requests) in flight at once.
const PRESENCE_CONCURRENCY: usize = 8;
/// The most of an error body read for its message.
const ERROR_BODY_LIMIT: usize = 64 << 10;

/// How long the client keeps an idle connection for the next request: under the server's
/// keep-alive (`ServerConfig::header_read_timeout`, 10 s), so the client lets a connection go
/// before the server closes it. With a longer pool time a request sent just as the server
/// closed the connection failed with "connection closed before message completed" (seen
/// with 1 000 devices on one hub, whose rounds came about 10 s apart).
pub const POOL_IDLE: Duration = Duration::from_secs(5);

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The bearer token, if the node wants one.
    pub token: Option<String>,
    /// Time allowed for a whole exchange request and response, for the response headers of
    /// any other request, and for the answer to a blob upload once all its bytes are sent
    /// (default 60 s).
    pub timeout: Duration,
    /// Time a blob transfer may go without moving a byte, downloads and uploads (default
    /// 30 s). A transfer that keeps moving may take as long as it needs.
    pub idle_timeout: Duration,
    /// Time allowed to connect (default 10 s).
    pub connect_timeout: Duration,
    /// A PEM file of CA certificates to trust for `https://` nodes, besides the operating
    /// system's trusted roots (default none).
    pub ca_file: Option<PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            token: None,
            timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }
}

/// Reaches a node over HTTP or HTTPS. It retries nothing (the scheduler owns retries) and maps
/// every failure to a [`TransportError`]: `Unreachable` for connection failures and timeouts,
/// `Certificate` for a node whose TLS certificate is not trusted, `Refused` with the status's
/// [`RefusalCode`] and the server's message for HTTP errors, `BadResponse` for a body that
/// does not decode (an exchange envelope, or watch JSON).
///
/// The peer's node id is learned from its first response and then expected: a different
/// node answering at the same address is refused ([`crate::error::ProtocolError`]).
/// Must be used inside a tokio runtime.
pub struct HttpTransport {
    base: String,
    client: Client<HttpsConnector<HttpConnector>, HttpBody>,
    auth: Option<HeaderValue>,
    config: ClientConfig,
    peer: Mutex<Option<NodeId>>,
    /// Whether the node's last sync answer offered streamed pushes ([`super::HEADER_PUSH`]);
    /// `None` until one came (or since the peer was forgotten).
    offers_pushes: Mutex<Option<bool>>,
    /// Every request asks the node not to route reads ([`super::HEADER_ROUTE`]): this
    /// transport carries reads a node routes to its peer.
    route_local: bool,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("base", &self.base)
            .field("peer", &self.peer_id())
            .finish_non_exhaustive()
    }
}

fn unreachable(reason: impl Into<String>) -> TransportError {
    TransportError::Unreachable {
        reason: reason.into(),
    }
}

/// A watch answer that is not the JSON expected.
fn bad_response(why: &str) -> TransportError {
    TransportError::BadResponse(WireError::Malformed {
        reason: format!("watch response {why}"),
    })
}

impl HttpTransport {
    /// A transport to the node at `base_url` (`http://host:port` or `https://host:port`),
    /// with default settings: an `https://` node must present a certificate that chains to
    /// one of the operating system's trusted roots.
    ///
    /// # Errors
    /// [`TransportError::InvalidUrl`] when `base_url` is not an `http://` or `https://` root
    /// URL with a host, [`TransportError::InvalidToken`] when the token is not a valid header
    /// value.
    pub fn new(base_url: &str, token: Option<String>) -> Result<HttpTransport, TransportError> {
        HttpTransport::with_config(
            base_url,
            ClientConfig {
                token,
                ..ClientConfig::default()
            },
        )
    }

    /// A transport with explicit settings.
    ///
    /// # Errors
    /// As for [`HttpTransport::new`], and [`TransportError::CaFile`] when
    /// [`ClientConfig::ca_file`] cannot be read or holds no usable certificate.
    pub fn with_config(
        base_url: &str,
        config: ClientConfig,
    ) -> Result<HttpTransport, TransportError> {
        let bad = |why: &str| TransportError::InvalidUrl {
            url: base_url.to_owned(),
            reason: why.to_owned(),
        };
        let uri: Uri = base_url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s,
            // `127.0.0.1:7447` parses as a bare authority: say what to write rather than
            // guess between http and https.
            None if uri.authority().is_some() => {
                return Err(bad(&format!(
                    "no scheme; write http://{base_url} (or https://{base_url} for a node with TLS)"
                )))
            }
            _ => return Err(bad("only http:// and https:// are supported")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("give the node's root URL, without a path"));
        }
        let base = format!("{scheme}://{authority}");
        let auth = match &config.token {
            None => None,
            Some(t) => Some(
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| TransportError::InvalidToken)?,
            ),
        };
        // The system's roots are read only for a node that speaks TLS; a CA file given is
        // checked either way, so a mistake in it shows at once.
        let tls = client_config(config.ca_file.as_deref(), scheme == "https").map_err(|e| {
            TransportError::CaFile {
                path: config.ca_file.clone().unwrap_or_default(),
                reason: error_chain(&e),
            }
        })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        // `https_or_http` lets the http scheme through: a transport only ever sends to its
        // own base URL, so an http:// transport never speaks TLS and an https:// one always.
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(HttpTransport {
            base,
            client,
            auth,
            config,
            peer: Mutex::new(None),
            offers_pushes: Mutex::new(None),
            route_local: false,
        })
    }

    /// Expects `peer` to answer (refusing any other node from the first round on).
    pub fn expecting(self, peer: NodeId) -> HttpTransport {
        *lock(&self.peer) = Some(peer);
        self
    }

    /// The node's root URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends one request to `path_and_query` (starting with `/v1/`) with the token, and
    /// returns the response once its headers arrive (within the configured timeout). Any
    /// status is returned as it is; [`HttpTransport::error_for`] turns a failure status into
    /// an error.
    ///
    /// # Errors
    /// [`TransportError::Unreachable`] when the node cannot be reached in time;
    /// [`TransportError::InvalidUrl`] when `path_and_query` does not make a valid URI.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: HttpBody,
        content_length: Option<u64>,
    ) -> Result<Response<Incoming>, TransportError> {
        self.call_within(
            method,
            path_and_query,
            body,
            content_length,
            self.config.timeout,
        )
        .await
    }

    async fn call_within(
        &self,
        method: Method,
        path_and_query: &str,
        body: HttpBody,
        content_length: Option<u64>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, TransportError> {
        let req = self.request(method, path_and_query, body, content_length)?;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(unreachable(format!(
                "no response from {} within {timeout:?}",
                self.base
            ))),
            Ok(Err(e)) => Err(self.failed(&e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: HttpBody,
        content_length: Option<u64>,
    ) -> Result<Request<HttpBody>, TransportError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base))
            .body(body)
            .map_err(|e| TransportError::InvalidUrl {
                url: format!("{}{path_and_query}", self.base),
                reason: e.to_string(),
            })?;
        let headers = req.headers_mut();
        if let Some(a) = &self.auth {
            headers.insert(header::AUTHORIZATION, a.clone());
        }
        if self.route_local {
            headers.insert(super::HEADER_ROUTE, HeaderValue::from_static("local"));
        }
        if let Some(n) = content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Ok(req)
    }

    fn failed(&self, e: &hyper_util::client::legacy::Error) -> TransportError {
        match certificate_problem(e) {
            Some(reason) => TransportError::Certificate {
                url: self.base.clone(),
                reason,
            },
            None => unreachable(format!("{}: {}", self.base, error_chain(e))),
        }
    }

    /// Sends an upload whose body counts what it sent in `sent`, all of it once `done` says
    /// so of the count (or of nothing else it knows). An upload may take as long as it keeps
    /// moving: it fails when no byte moves for `idle_timeout`, or, once all are sent, when
    /// no response comes within `timeout`.
    async fn upload(
        &self,
        req: Request<HttpBody>,
        sent: &AtomicU64,
        done: impl Fn(u64) -> bool,
    ) -> Result<Response<Incoming>, TransportError> {
        let mut response = std::pin::pin!(self.client.request(req));
        let mut seen = 0;
        loop {
            let done = done(seen);
            let wait = if done {
                self.config.timeout
            } else {
                self.config.idle_timeout
            };
            match tokio::time::timeout(wait, &mut response).await {
                Ok(result) => return result.map_err(|e| self.failed(&e)),
                Err(_) => {
                    let now = sent.load(Ordering::Relaxed);
                    if now == seen {
                        let what = if done {
                            "no response"
                        } else {
                            "upload stalled"
                        };
                        return Err(unreachable(format!(
                            "{what} from {}: nothing moved for {wait:?}",
                            self.base
                        )));
                    }
                    seen = now;
                }
            }
        }
    }

    /// The error for a failure response: its status as a [`RefusalCode`] and the server's
    /// message (read from its JSON body).
    pub async fn error_for(resp: Response<Incoming>) -> TransportError {
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), ERROR_BODY_LIMIT)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        let code = match status {
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                RefusalCode::BadRequest
            }
            StatusCode::UNAUTHORIZED => RefusalCode::Unauthorized,
            StatusCode::FORBIDDEN => RefusalCode::Forbidden,
            StatusCode::PAYLOAD_TOO_LARGE => RefusalCode::TooLarge,
            StatusCode::TOO_MANY_REQUESTS => RefusalCode::Busy,
            StatusCode::INSUFFICIENT_STORAGE => RefusalCode::StorageFull,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT => {
                RefusalCode::Unavailable
            }
            _ => RefusalCode::Internal,
        };
        TransportError::Refused {
            code,
            reason: format!("HTTP {}: {message}", status.as_u16()),
        }
    }

    /// POSTs one wire message to `path` and decodes the answer, within the request timeout.
    async fn post_message<Q: Message, A: Message>(
        &self,
        path: &str,
        request: &Q,
    ) -> Result<A, TransportError> {
        let body = wire::encode(request);
        let len = body.len() as u64;
        let round = async {
            let resp = self.call(Method::POST, path, full(body), Some(len)).await?;
            if resp.status() != StatusCode::OK {
                return Err(HttpTransport::error_for(resp).await);
            }
            self.learn_offer(&resp);
            let bytes = http_body_util::Limited::new(resp.into_body(), wire::MAX_MESSAGE_LEN + 16)
                .collect()
                .await
                .map_err(|e| unreachable(format!("response body broke off: {e}")))?
                .to_bytes();
            wire::decode::<A>(&bytes).map_err(TransportError::BadResponse)
        };
        tokio::time::timeout(self.config.timeout, round)
            .await
            .map_err(|_| unreachable(format!("{path} on {} timed out", self.base)))?
    }

    async fn head_blob(&self, hash: Hash) -> Result<bool, TransportError> {
        let resp = self
            .call(Method::HEAD, &format!("/v1/blobs/{hash}"), empty(), None)
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(HttpTransport::error_for(resp).await),
        }
    }

    /// Notes whether a sync answer (200) offered streamed pushes: the latest answer counts,
    /// so a node restarted with pushes turned on or off is believed from its next answer.
    fn learn_offer(&self, resp: &Response<Incoming>) {
        let offered = resp.headers().contains_key(super::HEADER_PUSH);
        *lock(&self.offers_pushes) = Some(offered);
    }

    fn learn_peer(&self, from: NodeId) {
        let mut peer = lock(&self.peer);
        // The engine checks a mismatch against what was expected; only learn the first.
        peer.get_or_insert(from);
    }
}

/// The next whole message of a streamed body, or `None` if the body ended between messages.
async fn next_message(
    body: &mut Incoming,
    unframer: &mut wire::Unframer,
) -> Result<Option<Bytes>, TransportError> {
    loop {
        if let Some(message) = unframer
            .next_message()
            .map_err(TransportError::BadResponse)?
        {
            return Ok(Some(message));
        }
        match body.frame().await {
            None if unframer.is_empty() => return Ok(None),
            None => return Err(unreachable("the pull's body broke off inside a message")),
            Some(Err(e)) => return Err(unreachable(format!("the pull's body broke off: {e}"))),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    unframer.push(&data);
                }
            }
        }
    }
}

/// Reads a streamed pull's frames into `tx` until the last; a body that ends before it, breaks
/// off, stalls for `idle`, or carries what does not decode, ends with the error. A receiver
/// that goes away (the round failed) ends the reading, which drops the connection.
async fn read_frames(
    mut body: Incoming,
    mut unframer: wire::Unframer,
    tx: tokio::sync::mpsc::Sender<Result<PageFrame, TransportError>>,
    idle: Duration,
) {
    loop {
        let next = tokio::time::timeout(idle, next_message(&mut body, &mut unframer))
            .await
            .unwrap_or_else(|_| Err(unreachable("the streamed pull stalled")));
        let item = match next {
            Ok(Some(bytes)) => {
                wire::decode::<PageFrame>(&bytes).map_err(TransportError::BadResponse)
            }
            // The engine sees the channel close: without a last frame, a cut.
            Ok(None) => return,
            Err(e) => Err(e),
        };
        let last = item.as_ref().map_or(true, |f| f.end);
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// Feeds a streamed push's body: `first` (the request), then each frame length-prefixed,
/// until the one with `end` (then `ended` is set). An error among the frames, or their end
/// before the last, breaks the body off with an error, so the server sees a cut, never a
/// clean end.
async fn feed_frames(
    first: Vec<u8>,
    mut frames: Frames,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    ended: Arc<std::sync::atomic::AtomicBool>,
) {
    if tx.send(Ok(Bytes::from(first))).await.is_err() {
        return;
    }
    loop {
        let piece = match frames.next().await {
            Some(Ok(frame)) => {
                let end = frame.end;
                let bytes = Bytes::from(wire::encode_framed(&frame, frame.version()));
                if tx.send(Ok(bytes)).await.is_err() {
                    return;
                }
                if end {
                    ended.store(true, Ordering::Relaxed);
                    return;
                }
                continue;
            }
            Some(Err(e)) => std::io::Error::other(e.to_string()),
            None => std::io::Error::other("the streamed push ended before its last frame"),
        };
        let _ = tx.send(Err(piece)).await;
        return;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A request body that counts the bytes taken from it, so an upload's progress can be
/// watched.
struct Counted {
    inner: HttpBody,
    sent: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Transport for HttpTransport {
    fn peer_id(&self) -> Option<NodeId> {
        *lock(&self.peer)
    }

    /// The peer's records API over HTTP, with this transport's settings (its token too),
    /// asking the peer to answer from its own store: a read routed to it goes no further.
    fn records(&self) -> Option<std::sync::Arc<dyn crate::api::NodeApi>> {
        let mut http = HttpTransport::with_config(&self.base, self.config.clone()).ok()?;
        http.route_local = true;
        Some(std::sync::Arc::new(super::NodeClient::over(http)))
    }

    fn forget_peer(&self) {
        *lock(&self.peer) = None;
        *lock(&self.offers_pushes) = None;
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        let response: ExchangeResponse = self.post_message("/v1/sync/exchange", &request).await?;
        self.learn_peer(response.from);
        Ok(response)
    }

    /// `POST /v1/sync/pull`: the response is read at once (within the timeout), the frames
    /// after it by a task that feeds the engine through a channel of [`PULL_WINDOW`] frames,
    /// each within the timeout of the one before. A server without the endpoint (404) is
    /// one that cannot stream: [`TransportError::Unsupported`], and the engine pulls in
    /// rounds.
    async fn pull(&self, request: ExchangeRequest) -> Result<Pull, TransportError> {
        const PATH: &str = "/v1/sync/pull";
        let body = wire::encode(&request);
        let len = body.len() as u64;
        let idle = self.config.timeout;
        let first = async {
            let resp = self.call(Method::POST, PATH, full(body), Some(len)).await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Err(TransportError::Unsupported { what: "pull" }),
                _ => return Err(HttpTransport::error_for(resp).await),
            }
            self.learn_offer(&resp);
            let mut body = resp.into_body();
            let mut unframer = wire::Unframer::new(wire::MAX_MESSAGE_LEN);
            let first = next_message(&mut body, &mut unframer)
                .await?
                .ok_or_else(|| unreachable("the pull's body ended before its response"))?;
            let response =
                wire::decode::<ExchangeResponse>(&first).map_err(TransportError::BadResponse)?;
            Ok((response, body, unframer))
        };
        let (response, body, unframer) = tokio::time::timeout(idle, first)
            .await
            .map_err(|_| unreachable(format!("{PATH} on {} timed out", self.base)))??;
        self.learn_peer(response.from);
        // Frames follow a cut page, the last with `end` (docs/protocol.md).
        let frames = response.page.more.then(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(PULL_WINDOW);
            tokio::spawn(read_frames(body, unframer, tx, idle));
            frames_from(rx)
        });
        Ok(Pull { response, frames })
    }

    /// `POST /v1/sync/push`: one request whose body is the request and then the frames,
    /// each length-prefixed, fed from `frames` by a task through a channel of
    /// [`PULL_WINDOW`] pieces (a server that reads slowly slows the planning through TCP).
    /// It may take as long as it keeps moving, as an upload does; once the last frame went,
    /// the response must come within the timeout. A server without the endpoint (404) is
    /// one that cannot take a streamed push: [`TransportError::Unsupported`], and the engine
    /// pushes in rounds. An error among `frames`, or their end before the last, breaks the
    /// body off: the server sees a cut.
    ///
    /// A node whose last sync answer did not offer pushes ([`super::HEADER_PUSH`]) gets no
    /// request: `Unsupported` at once. A build without the endpoint answers 404 without
    /// reading the body and closes, and a client still sending may then see a broken pipe
    /// instead of the 404 (the write failing before the read), which would fail the round
    /// rather than fall back to rounds. Before any answer was heard, the push is tried.
    ///
    /// Once an answer arrives, the frames stop: a server that answers before the last frame
    /// (a refusal, or an answer that takes none) reads the rest only to discard it.
    async fn push(
        &self,
        request: ExchangeRequest,
        frames: Frames,
    ) -> Result<ExchangeResponse, TransportError> {
        const PATH: &str = "/v1/sync/push";
        if *lock(&self.offers_pushes) == Some(false) {
            return Err(TransportError::Unsupported { what: "push" });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(PULL_WINDOW);
        let first = wire::encode_framed(&request, request.version());
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let feeding = tokio::spawn(feed_frames(first, frames, tx, ended.clone()));
        // Whatever the outcome, the frames stop being read (the engine's planning stops).
        let stop = AbortOnDrop(feeding);
        let sent = Arc::new(AtomicU64::new(0));
        let body = Counted {
            inner: channel_body(rx),
            sent: sent.clone(),
        }
        .boxed();
        let req = self.request(Method::POST, PATH, body, None)?;
        let done = |_: u64| ended.load(Ordering::Relaxed);
        let resp = self.upload(req, &sent, done).await?;
        // The server answered, so it takes no more frames (what it did not read, it reads
        // only to discard). Stopping the feeder closes the body's channel: the frames queued
        // go, then the body ends cleanly, so the server can keep the connection; the
        // planning stops.
        drop(stop);
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(TransportError::Unsupported { what: "push" }),
            _ => return Err(HttpTransport::error_for(resp).await),
        }
        self.learn_offer(&resp);
        let read = http_body_util::Limited::new(resp.into_body(), wire::MAX_MESSAGE_LEN + 16);
        let bytes = tokio::time::timeout(self.config.timeout, read.collect())
            .await
            .map_err(|_| unreachable(format!("{PATH} on {} timed out", self.base)))?
            .map_err(|e| unreachable(format!("response body broke off: {e}")))?
            .to_bytes();
        let response =
            wire::decode::<ExchangeResponse>(&bytes).map_err(TransportError::BadResponse)?;
        self.learn_peer(response.from);
        Ok(response)
    }

    async fn audit(&self, request: AuditRequest) -> Result<AuditResponse, TransportError> {
        let response: AuditResponse = self.post_message("/v1/sync/audit", &request).await?;
        self.learn_peer(response.from);
        Ok(response)
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        futures_util::stream::iter(hashes)
            .map(|h| self.head_blob(h))
            .buffered(PRESENCE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn Write + Send),
    ) -> Result<(), TransportError> {
        let hash = blob.hash;
        let resp = self
            .call(Method::GET, &format!("/v1/blobs/{hash}"), empty(), None)
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(TransportError::BlobNotFound { hash }),
            _ => return Err(HttpTransport::error_for(resp).await),
        }
        let broke = |reason: String| TransportError::BlobTransfer { hash, reason };
        let mut body = resp.into_body();
        loop {
            let frame = match tokio::time::timeout(self.config.idle_timeout, body.frame()).await {
                Err(_) => return Err(broke("download stalled".into())),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(broke(format!("download broke off: {e}"))),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                into.write_all(&data)
                    .map_err(|e| broke(format!("writing locally: {e}")))?;
            }
        }
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn Read + Send>,
    ) -> Result<(), TransportError> {
        let sent = Arc::new(AtomicU64::new(0));
        let body = Counted {
            inner: stream_reader(content, Some(blob.size), CHUNK),
            sent: sent.clone(),
        }
        .boxed();
        let path = format!("/v1/blobs/{}", blob.hash);
        let req = self.request(Method::PUT, &path, body, Some(blob.size))?;
        let size = blob.size;
        let resp = self.upload(req, &sent, |n| n >= size).await?;
        if resp.status().is_success() {
            // Drain the small JSON acknowledgement so the connection can be reused.
            let _ = resp.into_body().collect().await;
            Ok(())
        } else {
            Err(HttpTransport::error_for(resp).await)
        }
    }

    async fn watch(
        &self,
        since: Option<String>,
        watcher: Option<NodeId>,
        timeout: Duration,
    ) -> Result<WatchReply, TransportError> {
        let mut path = format!("/v1/sync/watch?timeout_ms={}", timeout.as_millis());
        if let Some(s) = &since {
            path.push_str("&since=");
            path.push_str(&encode_query_value(s));
        }
        if let Some(id) = watcher {
            path.push_str("&watcher=");
            path.push_str(&id.to_string());
        }
        // The server holds the request up to `timeout`: allow for that on top.
        let wait = timeout + self.config.timeout;
        let call = async {
            let resp = self
                .call_within(Method::GET, &path, empty(), None, wait)
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(HttpTransport::error_for(resp).await);
            }
            let bytes: Bytes = http_body_util::Limited::new(resp.into_body(), ERROR_BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| unreachable(format!("watch response broke off: {e}")))?
                .to_bytes();
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|_| bad_response("not JSON"))?;
            match (
                v.get("news").and_then(|n| n.as_bool()),
                v.get("token").and_then(|t| t.as_str()),
            ) {
                (Some(news), Some(token)) => Ok(WatchReply {
                    news,
                    token: token.to_owned(),
                }),
                _ => Err(bad_response("lacks news or token")),
            }
        };
        tokio::time::timeout(wait, call)
            .await
            .map_err(|_| unreachable(format!("watch on {} timed out", self.base)))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_url_is_a_local_configuration_error_not_a_refusal() {
        for url in [
            "not a url",
            "ftp://host:1",
            "https://host:1/path",
            "http://host:1/path",
            "http://host:1/?q",
        ] {
            match HttpTransport::new(url, None) {
                Err(TransportError::InvalidUrl { url: u, .. }) => assert_eq!(u, url),
                other => panic!("{url}: expected InvalidUrl, got {other:?}"),
            }
        }
        assert!(matches!(
            HttpTransport::new("http://host:1", Some("a\nb".into())),
            Err(TransportError::InvalidToken)
        ));
    }

    #[test]
    fn an_address_without_a_scheme_is_told_what_to_write() {
        match HttpTransport::new("127.0.0.1:7448", None) {
            Err(e @ TransportError::InvalidUrl { .. }) => {
                let text = e.to_string();
                assert!(text.contains("write http://127.0.0.1:7448"), "{text}");
            }
            other => panic!("expected InvalidUrl, got {other:?}"),
        }
    }
}
