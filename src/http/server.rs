//! The HTTP server: a hyper service over a [`SyncEngine`], and [`serve`] to run it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;

use super::access::{Access, Grant};
use super::body::{
    collect_limited, empty, full, pump_body, stream_reader, BodyError, ChannelReader, HttpBody,
};
use super::{
    decode_query, encode_key, parse_key, HEADER_HLC, HEADER_ORIGIN, HEADER_RESIDENCY,
    MAX_WATCH_TIMEOUT,
};
use crate::blob::CHUNK;
use crate::engine::SyncEngine;
use crate::error::{Error, InputError};
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::notify::WatchToken;
use crate::record::{BlobRef, Key, Op, Residency, Scope, MAX_VALUE_LEN};
use crate::transport::{Refusal, RefusalCode, Responder};
use crate::wire::{self, ExchangeRequest, RequestMarks, ScopeFilter, MAX_MESSAGE_LEN};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Who may do what (default: open, which [`serve`] allows only on loopback).
    pub access: Arc<Access>,
    /// The largest exchange request body (default: the wire's message limit, 64 MiB).
    pub max_exchange_body: u64,
    /// The most versions an exchange request's page may carry (default 100 000).
    pub max_page_versions: usize,
    /// The largest record value body (default [`MAX_VALUE_LEN`]).
    pub max_record_body: u64,
    /// The largest blob or file body (default 64 GiB).
    pub max_blob_body: u64,
    /// Time allowed to receive a request's headers (default 10 s).
    pub header_read_timeout: Duration,
    /// Time allowed between two chunks of a request body (default 30 s).
    pub body_read_timeout: Duration,
    /// Exchanges one token may have in progress at once; more get 429 (default 2).
    pub max_exchanges_per_token: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            access: Arc::new(Access::open()),
            max_exchange_body: MAX_MESSAGE_LEN as u64,
            max_page_versions: 100_000,
            max_record_body: MAX_VALUE_LEN as u64,
            max_blob_body: 64 << 30,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_exchanges_per_token: 2,
        }
    }
}

/// The hyper service: every `/v1` endpoint of one node. Clone it freely (it is an `Arc`);
/// mount it in any hyper server, or in axum through `tower::service_fn`.
#[derive(Clone)]
pub struct HighwaterService {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<SyncEngine>,
    config: ServerConfig,
    /// Exchanges in progress, per token name.
    exchanges: Mutex<HashMap<String, usize>>,
    /// Set when the server shuts down: long polls return at once.
    closing: tokio::sync::watch::Sender<bool>,
}

/// A failed request: the status and a message for the client (never internal detail).
pub(super) struct Failure {
    status: StatusCode,
    message: String,
    close: bool,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            close: false,
        }
    }

    pub(super) fn bad(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }

    fn forbidden(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::FORBIDDEN, message)
    }

    fn body(e: BodyError, limit: u64) -> Failure {
        match e {
            BodyError::TooLarge => Failure {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("body over the limit of {limit} bytes"),
                close: true,
            },
            BodyError::Timeout => Failure {
                status: StatusCode::REQUEST_TIMEOUT,
                message: "request body stalled".into(),
                close: true,
            },
            BodyError::Broken(m) => Failure {
                status: StatusCode::BAD_REQUEST,
                message: format!("request body broken: {m}"),
                close: true,
            },
        }
    }

    fn into_response(self) -> Response<HttpBody> {
        let code = match self.status.as_u16() {
            400 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            405 => "method_not_allowed",
            408 => "timeout",
            411 => "length_required",
            413 => "too_large",
            429 => "busy",
            503 => "unavailable",
            _ => "internal",
        };
        let body = json!({ "error": self.message, "code": code }).to_string();
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Failure {
        Failure::new(refusal_status(r.code), r.reason)
    }
}

impl From<&Error> for Failure {
    fn from(e: &Error) -> Failure {
        if !matches!(e, Error::Input(_) | Error::Wire(_) | Error::Protocol(_)) {
            tracing::error!(error = %e, "request failed");
        }
        Refusal::from(e).into()
    }
}

/// The HTTP status for a refusal class.
pub fn refusal_status(code: RefusalCode) -> StatusCode {
    match code {
        RefusalCode::BadRequest => StatusCode::BAD_REQUEST,
        RefusalCode::Forbidden => StatusCode::FORBIDDEN,
        RefusalCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        RefusalCode::Unauthorized => StatusCode::UNAUTHORIZED,
        RefusalCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        RefusalCode::Busy => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

type Reply = Result<Response<HttpBody>, Failure>;

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<HttpBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Runs blocking engine work off the runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "request task failed");
        Err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
        ))
    })
}

/// The `Content-Length` header, if present and valid.
fn content_length<B>(req: &Request<B>) -> Result<Option<u64>, Failure> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| Failure::bad("malformed Content-Length")),
    }
}

/// Refuses, before reading it, a body whose declared length is over `limit`.
fn check_declared<B>(req: &Request<B>, limit: u64) -> Result<Option<u64>, Failure> {
    let len = content_length(req)?;
    if len.is_some_and(|l| l > limit) {
        return Err(Failure {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("body over the limit of {limit} bytes"),
            close: true,
        });
    }
    Ok(len)
}

fn bearer<B>(req: &Request<B>) -> Result<Option<&str>, Failure> {
    match req.headers().get(header::AUTHORIZATION) {
        None => Ok(None),
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| Failure::new(StatusCode::UNAUTHORIZED, "malformed Authorization"))?;
            // The scheme is case-insensitive (RFC 7235 section 2.1); the token is not.
            match v.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(t.trim())),
                _ => Err(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "Authorization must be a Bearer token",
                )),
            }
        }
    }
}

fn query<B>(req: &Request<B>) -> String {
    req.uri().query().unwrap_or("").to_owned()
}

/// What a request asks for, parsed from its path alone.
enum Route {
    Exchange,
    Watch,
    Blob(Hash),
    Record(Scope, Key),
    Records(Scope),
    File(Scope, Key),
    Status,
}

/// Parses `/v1/...` strictly: raw segments, no dot segments, scopes and hashes unencoded.
fn route(path: &str) -> Result<Route, Failure> {
    let not_found = || Failure::new(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
    let rest = path.strip_prefix("/v1/").ok_or_else(not_found)?;
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        ["sync", "exchange"] => Ok(Route::Exchange),
        ["sync", "watch"] => Ok(Route::Watch),
        ["status"] => Ok(Route::Status),
        ["blobs", rest @ ..] => match rest {
            [hex] => hex
                .parse::<Hash>()
                .map(Route::Blob)
                .map_err(|_| Failure::bad("a blob path is /v1/blobs/<64 lowercase hex digits>")),
            _ => Err(Failure::bad(
                "a blob path is /v1/blobs/<64 lowercase hex digits>",
            )),
        },
        ["records", rest @ ..] | ["files", rest @ ..] => {
            let files = segments[0] == "files";
            let (scope, rest) = scope_of(rest)?;
            match (rest, files) {
                ([], false) => Ok(Route::Records(scope)),
                ([key], false) => Ok(Route::Record(scope, parse_key(key)?)),
                ([key], true) => Ok(Route::File(scope, parse_key(key)?)),
                _ => Err(Failure::bad(
                    "expected /v1/records/<scope>/<percent-encoded key> (a '/' in a key is %2F)",
                )),
            }
        }
        _ => Err(not_found()),
    }
}

fn scope_of<'a, 'b>(segments: &'b [&'a str]) -> Result<(Scope, &'b [&'a str]), Failure> {
    let bad = || Failure::bad("a scope in a path is shared or app/<app_id>/<table>");
    match segments {
        ["shared", rest @ ..] => Ok((Scope::shared(), rest)),
        ["app", app, table, rest @ ..] => Ok((Scope::app(app, table).map_err(|_| bad())?, rest)),
        _ => Err(bad()),
    }
}

impl From<InputError> for Failure {
    fn from(e: InputError) -> Failure {
        Failure::bad(e.to_string())
    }
}

impl HighwaterService {
    /// A service for `engine`.
    pub fn new(engine: Arc<SyncEngine>, config: ServerConfig) -> HighwaterService {
        HighwaterService {
            inner: Arc::new(Inner {
                engine,
                config,
                exchanges: Mutex::new(HashMap::new()),
                closing: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    /// The engine served.
    pub fn engine(&self) -> &Arc<SyncEngine> {
        &self.inner.engine
    }

    /// Makes long polls in progress return at once (used on shutdown).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Handles one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<HttpBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let reply = self.dispatch(req).await;
        let resp = reply.unwrap_or_else(Failure::into_response);
        tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
        resp
    }

    async fn dispatch<B>(&self, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        // IMPORTANT: authentication comes before anything reads the body.
        let grant = self
            .inner
            .config
            .access
            .authorize(bearer(&req)?)
            .ok_or_else(|| Failure::new(StatusCode::UNAUTHORIZED, "missing or unknown token"))?;
        let route = route(req.uri().path())?;
        let method = req.method().clone();
        let allow = |allowed: &'static str| {
            let mut resp = Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method not allowed (allowed: {allowed})"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
            Ok(resp)
        };
        match (route, method) {
            (Route::Exchange, Method::POST) => self.exchange(&grant, req).await,
            (Route::Exchange, _) => allow("POST"),
            (Route::Watch, Method::GET) => self.watch(&grant, query(&req)).await,
            (Route::Watch, _) => allow("GET"),
            (Route::Blob(hash), m @ (Method::HEAD | Method::GET)) => {
                self.get_blob(&grant, hash, m == Method::HEAD).await
            }
            (Route::Blob(hash), Method::PUT) => self.put_blob(&grant, hash, req).await,
            (Route::Blob(_), _) => allow("HEAD, GET, PUT"),
            (Route::Record(scope, key), Method::GET) => self.get_record(&grant, scope, key).await,
            (Route::Record(scope, key), Method::PUT) => {
                self.put_record(&grant, scope, key, req).await
            }
            (Route::Record(scope, key), Method::DELETE) => {
                self.delete_record(&grant, scope, key).await
            }
            (Route::Record(..), _) => allow("GET, PUT, DELETE"),
            (Route::Records(scope), Method::GET) => self.list(&grant, scope, query(&req)).await,
            (Route::Records(_), _) => allow("GET"),
            (Route::File(scope, key), Method::GET) => self.get_file(&grant, scope, key).await,
            (Route::File(scope, key), Method::PUT) => self.put_file(&grant, scope, key, req).await,
            (Route::File(..), _) => allow("GET, PUT"),
            (Route::Status, Method::GET) => self.status(&grant).await,
            (Route::Status, _) => allow("GET"),
        }
    }

    fn require_sync(grant: &Grant) -> Result<(), Failure> {
        if grant.sync {
            Ok(())
        } else {
            Err(Failure::forbidden(format!(
                "token {:?} may not sync",
                grant.name
            )))
        }
    }

    fn require_read(grant: &Grant, scope: &Scope) -> Result<(), Failure> {
        if grant.can_read(scope) {
            Ok(())
        } else {
            Err(Failure::forbidden(format!(
                "token {:?} may not read scope {scope}",
                grant.name
            )))
        }
    }

    fn require_write(grant: &Grant, scope: &Scope) -> Result<(), Failure> {
        if grant.can_write(scope) {
            Ok(())
        } else {
            Err(Failure::forbidden(format!(
                "token {:?} may not write scope {scope}",
                grant.name
            )))
        }
    }

    async fn exchange<B>(&self, grant: &Grant, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        Self::require_sync(grant)?;
        let config = &self.inner.config;
        check_declared(&req, config.max_exchange_body)?;
        let _slot = self.exchange_slot(grant)?;
        let body = collect_limited(
            req.into_body(),
            config.max_exchange_body,
            config.body_read_timeout,
        )
        .await
        .map_err(|e| Failure::body(e, config.max_exchange_body))?;
        let engine = self.inner.engine.clone();
        let grant = grant.clone();
        let max_versions = config.max_page_versions;
        let encoded = blocking(move || {
            let request: ExchangeRequest =
                wire::decode(&body).map_err(|e| Failure::bad(e.to_string()))?;
            let count = request.page.version_count();
            if count > max_versions {
                return Err(Failure {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("page of {count} versions over the limit of {max_versions}"),
                    close: false,
                });
            }
            let local = engine.scopes().map_err(|e| Failure::from(&e))?;
            let request = authorize_exchange(&grant, request, &local)?;
            let response = engine.respond(request)?;
            Ok(wire::encode(&response))
        })
        .await?;
        let mut resp = Response::new(full(encoded));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        Ok(resp)
    }

    fn exchange_slot(&self, grant: &Grant) -> Result<SlotGuard, Failure> {
        let mut all = self
            .inner
            .exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = all.entry(grant.name.clone()).or_insert(0);
        // An open node has one grant for every caller: capping it would let one local
        // client's rounds turn another's away, so only token holders are capped.
        let open = self.inner.config.access.is_open();
        if !open && *n >= self.inner.config.max_exchanges_per_token {
            return Err(Failure::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "token {:?} already has {} exchanges in progress",
                    grant.name, n
                ),
            ));
        }
        *n += 1;
        Ok(SlotGuard {
            inner: self.inner.clone(),
            name: grant.name.clone(),
        })
    }

    async fn watch(&self, grant: &Grant, query: String) -> Reply {
        Self::require_sync(grant)?;
        let query = decode_query(&query)?;
        let mut since = None;
        let mut watcher = None;
        let mut timeout = Duration::from_secs(25);
        for (name, value) in query {
            match name.as_str() {
                "since" => {
                    let text = String::from_utf8(value)
                        .map_err(|_| Failure::bad("malformed watch token"))?;
                    since = Some(
                        text.parse::<WatchToken>()
                            .map_err(|e| Failure::bad(e.to_string()))?,
                    );
                }
                "watcher" => {
                    let id = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse::<NodeId>().ok())
                        .ok_or_else(|| Failure::bad("watcher must be a node id in hex"))?;
                    watcher = Some(id);
                }
                "timeout_ms" => {
                    let ms: u64 = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Failure::bad("timeout_ms must be a whole number"))?;
                    timeout = Duration::from_millis(ms).min(MAX_WATCH_TIMEOUT);
                }
                other => return Err(Failure::bad(format!("unknown parameter {other:?}"))),
            }
        }
        let notifier = SyncEngine::notifier(&self.inner.engine);
        let mut closing = self.inner.closing.subscribe();
        let readable = |s: &Scope| grant.can_read(s);
        let (news, token) = tokio::select! {
            r = notifier.wait_for_news(since, watcher, readable, timeout) => r,
            _ = closing.wait_for(|c| *c) => (false, notifier.token()),
        };
        Ok(json_response(
            StatusCode::OK,
            json!({ "news": news, "token": token.to_string() }),
        ))
    }

    async fn get_blob(&self, grant: &Grant, hash: Hash, head: bool) -> Reply {
        Self::require_sync(grant)?;
        let engine = self.inner.engine.clone();
        let found = blocking(move || Ok(engine.open_blob(&hash)?)).await?;
        let Some((size, reader)) = found else {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!("blob {hash} not stored here"),
            ));
        };
        let body = if head {
            empty()
        } else {
            stream_reader(reader, Some(size), CHUNK)
        };
        let mut resp = Response::new(body);
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        Ok(resp)
    }

    async fn put_blob<B>(&self, grant: &Grant, hash: Hash, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        Self::require_sync(grant)?;
        if grant.write.is_empty() {
            return Err(Failure::forbidden(format!(
                "token {:?} may not write",
                grant.name
            )));
        }
        let config = &self.inner.config;
        let size = check_declared(&req, config.max_blob_body)?.ok_or_else(|| {
            Failure::new(
                StatusCode::LENGTH_REQUIRED,
                "a blob upload needs Content-Length",
            )
        })?;
        let blob = BlobRef { hash, size };
        let (tx, mut reader) = ChannelReader::new();
        let engine = self.inner.engine.clone();
        let store = blocking(move || Ok(engine.accept_blob(&blob, &mut reader)?));
        let pump = pump_body(req.into_body(), tx, size, config.body_read_timeout);
        let (stored, pumped) = tokio::join!(store, pump);
        pumped.map_err(|e| Failure::body(e, size))?;
        stored?;
        Ok(json_response(
            StatusCode::OK,
            json!({ "hash": hash.to_string(), "size": size }),
        ))
    }

    async fn get_record(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
        Self::require_read(grant, &scope)?;
        let engine = self.inner.engine.clone();
        let found = blocking(move || {
            let v = engine
                .get_version(&scope, &key)
                .map_err(|e| Failure::from(&e))?;
            let residency = engine
                .residency_of(v.as_ref())
                .map_err(|e| Failure::from(&e))?;
            Ok(v.map(|v| (v, residency)))
        })
        .await?;
        let Some((version, residency)) = found else {
            return Err(Failure::new(StatusCode::NOT_FOUND, "no such record"));
        };
        let Op::Put { value, .. } = version.op else {
            return Err(Failure::new(StatusCode::NOT_FOUND, "record deleted"));
        };
        let mut resp = Response::new(full(value));
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        put_version_headers(headers, &version.hlc, residency);
        Ok(resp)
    }

    async fn put_record<B>(&self, grant: &Grant, scope: Scope, key: Key, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        Self::require_write(grant, &scope)?;
        let config = &self.inner.config;
        let limit = config.max_record_body;
        check_declared(&req, limit)?;
        let value = collect_limited(req.into_body(), limit, config.body_read_timeout)
            .await
            .map_err(|e| Failure::body(e, limit))?;
        let engine = self.inner.engine.clone();
        let hlc = blocking(move || {
            engine
                .put(&scope, &key, value.to_vec())
                .map_err(|e| Failure::from(&e))
        })
        .await?;
        Ok(json_response(StatusCode::OK, written(&hlc)))
    }

    async fn delete_record(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
        Self::require_write(grant, &scope)?;
        let engine = self.inner.engine.clone();
        let hlc =
            blocking(move || engine.delete(&scope, &key).map_err(|e| Failure::from(&e))).await?;
        Ok(json_response(StatusCode::OK, written(&hlc)))
    }

    async fn list(&self, grant: &Grant, scope: Scope, query: String) -> Reply {
        Self::require_read(grant, &scope)?;
        let mut prefix = Vec::new();
        let mut after = None;
        let mut limit = 100usize;
        for (name, value) in decode_query(&query)? {
            match name.as_str() {
                "prefix" => prefix = value,
                "after" => after = Some(Key::new(value)?),
                "limit" => {
                    limit = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| Failure::bad("limit must be 1..=1000"))?;
                }
                other => return Err(Failure::bad(format!("unknown parameter {other:?}"))),
            }
        }
        let engine = self.inner.engine.clone();
        let records = blocking(move || {
            let rows = engine
                .scan(&scope, &prefix, after.as_ref(), limit)
                .map_err(|e| Failure::from(&e))?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let residency = engine.record_residency(&r).map_err(|e| Failure::from(&e))?;
                out.push((r, residency));
            }
            Ok(out)
        })
        .await?;
        let next = (records.len() == limit)
            .then(|| records.last().map(|(r, _)| encode_key(&r.key)))
            .flatten();
        let items: Vec<_> = records
            .iter()
            .map(|(r, residency)| {
                json!({
                    "key": encode_key(&r.key),
                    "value": std::str::from_utf8(&r.value).ok(),
                    "size": r.value.len(),
                    "hlc": r.hlc.to_string(),
                    "origin": r.hlc.origin().to_string(),
                    "residency": residency.as_str(),
                    "file": r.blob.map(|b| json!({"hash": b.hash.to_string(), "size": b.size})),
                })
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            json!({ "records": items, "next_after": next }),
        ))
    }

    async fn put_file<B>(&self, grant: &Grant, scope: Scope, key: Key, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        Self::require_write(grant, &scope)?;
        let config = &self.inner.config;
        let limit = config.max_blob_body;
        check_declared(&req, limit)?;
        let (tx, mut reader) = ChannelReader::new();
        let engine = self.inner.engine.clone();
        let store = blocking(move || {
            let hlc = engine
                .put_file(&scope, &key, Vec::new(), &mut reader)
                .map_err(|e| Failure::from(&e))?;
            let blob = engine
                .get(&scope, &key)
                .map_err(|e| Failure::from(&e))?
                .and_then(|r| r.blob);
            Ok((hlc, blob))
        });
        let pump = pump_body(req.into_body(), tx, limit, config.body_read_timeout);
        let (stored, pumped) = tokio::join!(store, pump);
        pumped.map_err(|e| Failure::body(e, limit))?;
        let (hlc, blob) = stored?;
        let mut out = written(&hlc);
        if let Some(b) = blob {
            out["hash"] = json!(b.hash.to_string());
            out["size"] = json!(b.size);
        }
        Ok(json_response(StatusCode::OK, out))
    }

    async fn get_file(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
        Self::require_read(grant, &scope)?;
        let engine = self.inner.engine.clone();
        let found = blocking(move || {
            let record = engine.get(&scope, &key).map_err(|e| Failure::from(&e))?;
            let Some(record) = record else {
                return Ok(None);
            };
            let opened = engine
                .open_file(&scope, &key)
                .map_err(|e| Failure::from(&e))?;
            Ok(Some((record, opened)))
        })
        .await?;
        let Some((record, opened)) = found else {
            return Err(Failure::new(StatusCode::NOT_FOUND, "no such record"));
        };
        if record.blob.is_none() {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                "the record has no file",
            ));
        }
        let Some((blob, reader)) = opened else {
            let mut resp = Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the file is not here yet (staged): retry after the next sync",
            )
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            put_version_headers(resp.headers_mut(), &record.hlc, Residency::Staged);
            return Ok(resp);
        };
        let mut resp = Response::new(stream_reader(reader, Some(blob.size), CHUNK));
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(blob.size));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        // An entity tag is a quoted string (RFC 9110 section 8.8.3); the content's hash is
        // a strong one.
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", blob.hash)) {
            headers.insert(header::ETAG, v);
        }
        put_version_headers(headers, &record.hlc, Residency::Resident);
        Ok(resp)
    }

    async fn status(&self, grant: &Grant) -> Reply {
        let engine = self.inner.engine.clone();
        let grant = grant.clone();
        let value =
            blocking(move || status_json(&engine, &grant).map_err(|e| Failure::from(&e))).await?;
        Ok(json_response(StatusCode::OK, value))
    }
}

struct SlotGuard {
    inner: Arc<Inner>,
    name: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut all = self
            .inner
            .exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = all.get_mut(&self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                all.remove(&self.name);
            }
        }
    }
}

fn written(hlc: &crate::hlc::Hlc) -> serde_json::Value {
    json!({ "hlc": hlc.to_string(), "origin": hlc.origin().to_string() })
}

fn put_version_headers(
    headers: &mut hyper::HeaderMap,
    hlc: &crate::hlc::Hlc,
    residency: Residency,
) {
    for (name, value) in [
        (HEADER_HLC, hlc.to_string()),
        (HEADER_ORIGIN, hlc.origin().to_string()),
        (HEADER_RESIDENCY, residency.as_str().to_owned()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// Narrows an exchange to what `grant` may read, and refuses pages it may not write.
///
/// Syncing a scope needs read on it (the response ships its versions) and, for versions
/// pushed in the request's page, write. A request naming an unreadable scope is refused;
/// "all scopes" from a token that cannot read all becomes the readable scopes either side
/// holds.
fn authorize_exchange(
    grant: &Grant,
    mut request: ExchangeRequest,
    local: &[Scope],
) -> Result<ExchangeRequest, Failure> {
    match &request.scopes {
        ScopeFilter::Only(set) => {
            if let Some(s) = set.iter().find(|s| !grant.can_read(s)) {
                return Err(Failure::forbidden(format!(
                    "token {:?} may not sync scope {s}",
                    grant.name
                )));
            }
        }
        ScopeFilter::All if grant.reads_all() => {}
        ScopeFilter::All => {
            let readable: BTreeSet<Scope> = local
                .iter()
                .chain(
                    match &request.marks {
                        RequestMarks::Full(marks) => Some(marks.iter().map(|(s, _)| s)),
                        RequestMarks::Digest(_) => None,
                    }
                    .into_iter()
                    .flatten(),
                )
                .chain(request.page.runs.iter().map(|r| &r.scope))
                .filter(|s| grant.can_read(s))
                .cloned()
                .collect();
            request.scopes = ScopeFilter::Only(readable);
        }
    }
    for run in &request.page.runs {
        if !grant.can_write(&run.scope) || !request.scopes.contains(&run.scope) {
            return Err(Failure::forbidden(format!(
                "token {:?} may not write scope {}",
                grant.name, run.scope
            )));
        }
    }
    Ok(request)
}

/// The `/v1/status` document, limited to the scopes `grant` may read (also used by the CLI on
/// a data directory).
pub(crate) fn status_json(engine: &SyncEngine, grant: &Grant) -> crate::Result<serde_json::Value> {
    let marks = engine.watermarks()?;
    let readable = |s: &Scope| grant.can_read(s);
    let mut scopes = BTreeMap::new();
    for scope in engine.scopes()?.into_iter().filter(|s| readable(s)) {
        let counts = engine.residency_counts(&scope)?;
        let origins: BTreeMap<String, String> = marks
            .scope(&scope)
            .map(|w| {
                w.iter()
                    .map(|h| (h.origin().to_string(), h.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        scopes.insert(
            scope.as_str().to_owned(),
            json!({
                "watermarks": origins,
                "residency": {
                    "resident": counts.resident,
                    "staged": counts.staged,
                    "tombstoned": counts.tombstoned,
                },
            }),
        );
    }
    let last = engine.last_exchanges();
    let mut peers = Vec::new();
    for peer in engine.peers()? {
        let known = engine.peer_watermarks(peer)?.unwrap_or_default();
        let mut lacks = Vec::new();
        for (scope, ours) in marks.iter().filter(|(s, _)| readable(s)) {
            for mark in ours.iter() {
                let theirs = known.get(scope, mark.origin());
                if theirs < Some(mark) {
                    lacks.push(json!({
                        "scope": scope.as_str(),
                        "origin": mark.origin().to_string(),
                        "ours": mark.to_string(),
                        "theirs": theirs.map(|h| h.to_string()),
                    }));
                }
            }
        }
        // What the peer held, as of the last round, that we lack.
        let mut behind = Vec::new();
        for (scope, theirs) in known.iter().filter(|(s, _)| readable(s)) {
            for mark in theirs.iter() {
                let ours = marks.get(scope, mark.origin());
                if ours < Some(mark) {
                    behind.push(json!({
                        "scope": scope.as_str(),
                        "origin": mark.origin().to_string(),
                        "ours": ours.map(|h| h.to_string()),
                        "theirs": mark.to_string(),
                    }));
                }
            }
        }
        let last_ms = last
            .get(&peer)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        peers.push(json!({
            "id": peer.to_string(),
            "last_exchange_unix_ms": last_ms,
            "lacks": lacks,
            "behind": behind,
        }));
    }
    let blobs = engine.blob_store().list()?;
    Ok(json!({
        "node": engine.node_id().to_string(),
        "scopes": scopes,
        "peers": peers,
        "blobs": { "count": blobs.len(), "bytes": blobs.iter().map(|(_, n)| n).sum::<u64>() },
    }))
}

impl<B> hyper::service::Service<Request<B>> for HighwaterService
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HttpBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(service.handle(req).await) })
    }
}

/// Why [`serve`] could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// An open node (no tokens) may only listen on loopback.
    #[error("refusing to serve without tokens on non-loopback address {addr}: configure tokens")]
    OpenOnPublicAddress {
        /// The address.
        addr: SocketAddr,
    },
    /// The listener failed.
    #[error("listener failed")]
    Io(#[from] std::io::Error),
}

/// Serves `engine` on `listener` until `shutdown` completes, then stops accepting, lets
/// requests in progress finish (long polls return at once) for up to 10 s, and returns.
///
/// # Errors
/// [`ServeError::OpenOnPublicAddress`] for an open node on a non-loopback address; the
/// listener's address cannot be read.
pub async fn serve(
    engine: Arc<SyncEngine>,
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    if config.access.is_open() {
        if !addr.ip().is_loopback() {
            return Err(ServeError::OpenOnPublicAddress { addr });
        }
        tracing::warn!(%addr, "serving OPEN (no tokens): anyone on this machine may read, write and sync");
    } else {
        tracing::info!(%addr, tokens = ?config.access, "serving");
    }
    let header_timeout = config.header_read_timeout;
    let service = HighwaterService::new(engine, config);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Rounds are many small sequential requests: answer them without Nagle delays.
        let _ = stream.set_nodelay(true);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    service.close();
    tracing::info!(%addr, "shutting down");
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; abandoning them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_strict() {
        assert!(matches!(route("/v1/sync/exchange"), Ok(Route::Exchange)));
        let h = "ab".repeat(32);
        assert!(matches!(
            route(&format!("/v1/blobs/{h}")),
            Ok(Route::Blob(_))
        ));
        for bad in [
            "/v1/blobs/..%2F..%2Fetc%2Fpasswd".to_owned(),
            "/v1/blobs//etc/passwd".to_owned(),
            "/v1/blobs/%00".to_owned(),
            format!("/v1/blobs/{}", "AB".repeat(32)),
            format!("/v1/blobs/{h}/x"),
            "/v1/records/app/../x/k".to_owned(),
            "/v1/records/shared/".to_owned(),
            "/v1/records/nope/k".to_owned(),
        ] {
            let r = route(&bad);
            assert!(
                matches!(&r, Err(f) if f.status == StatusCode::BAD_REQUEST),
                "{bad}"
            );
        }
        assert!(matches!(route("/v2/x"), Err(f) if f.status == StatusCode::NOT_FOUND));
        match route("/v1/records/app/notes/items/a%2Fb%20c") {
            Ok(Route::Record(s, k)) => {
                assert_eq!(s.as_str(), "app/notes/items");
                assert_eq!(k.as_bytes(), b"a/b c");
            }
            _ => panic!("record route"),
        }
    }
}
