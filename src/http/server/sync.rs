//! The sync endpoints: exchange, streamed pull and audit (with their per-token slots and
//! scope authorization), watch, and blob download and upload. The streamed push is in
//! `push.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::failure::json_response;
use super::routes::check_declared;
use super::{blocking, Failure, HighwaterService, Inner, Reply};
use crate::blob::CHUNK;
use crate::exchange::audit::shipped;
use crate::exchange::{Page, PullCursor};
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::http::access::Grant;
use crate::http::body::{
    channel_body, collect_limited, empty, full, pump_body, stream_reader, ChannelReader, HttpBody,
};
use crate::http::{decode_query, HEADER_PUSH, MAX_WATCH_TIMEOUT};
use crate::notify::WatchToken;
use crate::poison::lock;
use crate::record::{BlobRef, Scope};
use crate::transport::{Responder, PULL_WINDOW};
use crate::wire::{
    self, AuditRequest, ExchangeRequest, ExchangeResponse, Message, PageFrame, RequestMarks,
    ScopeFilter,
};

impl HighwaterService {
    pub(super) async fn exchange<B>(&self, grant: &Grant, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let inner = self.inner.clone();
        self.sync_message(
            "exchange",
            grant,
            req,
            move |responder, grant, request: ExchangeRequest| {
                let request = admit_exchange(&inner, responder, grant, request)?;
                let count = request.page.version_count();
                let response = responder.respond(request)?;
                count_exchange(&inner, count, &response);
                Ok(response)
            },
        )
        .await
    }

    /// A streamed pull: the request is an exchange's, admitted as one; the body is the
    /// response and then the frames, each length-prefixed (`wire::encode_framed`), planned
    /// one at a time on a blocking thread while the ones before travel. The channel to the
    /// body holds at most [`PULL_WINDOW`] of them, so a client that reads slowly slows the
    /// planning, and one that goes away ends it. The token's exchange slot is held until
    /// the last frame is sent.
    pub(super) async fn pull<B>(&self, grant: &Grant, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let (slot, body) = self.sync_body(grant, req).await?;
        let (inner, grant) = (self.inner.clone(), grant.clone());
        let received = body.len();
        let (first, cursor) = blocking(move || {
            let (request, version) = wire::decode_versioned::<ExchangeRequest>(&body)
                .map_err(|e| Failure::bad(e.to_string()))?;
            let responder = &*inner.responder;
            let request = admit_exchange(&inner, responder, &grant, request)?;
            let count = request.page.version_count();
            let (response, cursor) = responder.respond_pull(request)?;
            count_exchange(&inner, count, &response);
            let version = version.min(response.version());
            let mut first = wire::encode_framed(&response, version);
            // Frames follow a cut page; a responder that will not stream it ends the
            // transfer at once, so the client can tell the end from a cut.
            if cursor.is_none() && response.page.more {
                let end = PageFrame {
                    seq: 1,
                    page: Page {
                        runs: Vec::new(),
                        more: true,
                    },
                    remaining: response.ext.remaining,
                    end: true,
                };
                first.extend(wire::encode_framed(&end, 2));
            }
            Ok((first, cursor))
        })
        .await?;
        self.inner
            .config
            .metrics
            .message("pull", received, first.len());
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(PULL_WINDOW);
        // The channel is empty: the first message always fits.
        let _ = tx.try_send(Ok(Bytes::from(first)));
        if let Some(cursor) = cursor {
            tokio::spawn(send_frames(self.inner.clone(), cursor, tx, slot));
        }
        let mut resp = Response::new(channel_body(rx));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        self.offer_pushes(&mut resp);
        Ok(resp)
    }

    /// Says on a sync message's answer that this node takes streamed pushes, if it does: a
    /// client opens a push only to a node that said so ([`HEADER_PUSH`]), as a build without
    /// the endpoint would answer it 404 while the client still sends.
    fn offer_pushes(&self, resp: &mut Response<HttpBody>) {
        if self.inner.responder.takes_pushes() {
            resp.headers_mut()
                .insert(HEADER_PUSH, HeaderValue::from_static("1"));
        }
    }

    /// The response that carries `encoded`, a sync message answering `received` bytes.
    pub(super) fn sent(
        &self,
        kind: &'static str,
        received: usize,
        encoded: Vec<u8>,
    ) -> Response<HttpBody> {
        self.inner
            .config
            .metrics
            .message(kind, received, encoded.len());
        let mut resp = Response::new(full(encoded));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        self.offer_pushes(&mut resp);
        resp
    }

    pub(super) async fn audit<B>(&self, grant: &Grant, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let max_versions = self.inner.config.max_page_versions;
        let metrics = self.inner.config.metrics.clone();
        let inner = self.inner.clone();
        self.sync_message(
            "audit",
            grant,
            req,
            move |responder, grant, request: AuditRequest| {
                let count = shipped(&request.versions).count();
                if count > max_versions {
                    return Err(Failure {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        message: format!("{count} versions over the limit of {max_versions}"),
                        close: false,
                    });
                }
                let local = responder.scopes()?;
                let request = authorize_audit(grant, request, &local)?;
                let pushed = shipped(&request.versions).map(|(s, _, v)| (s, v));
                inner.uploads.check_pushed(responder, grant, pushed)?;
                let response = responder.audit(request)?;
                metrics.count_versions("responder", "received", count);
                metrics.count_versions("responder", "shipped", shipped(&response.versions).count());
                metrics.count_halts("responder", "us", &response.halts);
                Ok(response)
            },
        )
        .await
    }

    /// A sync message's round trip: the sync right, the body within its limits and the
    /// token's slot, then `handle` on a blocking thread with the decoded request, and the
    /// answer encoded.
    async fn sync_message<B, Q, A>(
        &self,
        kind: &'static str,
        grant: &Grant,
        req: Request<B>,
        handle: impl FnOnce(&dyn Responder, &Grant, Q) -> Result<A, Failure> + Send + 'static,
    ) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
        Q: wire::Message + Send + 'static,
        A: wire::Message + Send + 'static,
    {
        let (_slot, body) = self.sync_body(grant, req).await?;
        let responder = self.inner.responder.clone();
        let grant = grant.clone();
        let received = body.len();
        let encoded = blocking(move || {
            let (request, version) =
                wire::decode_versioned::<Q>(&body).map_err(|e| Failure::bad(e.to_string()))?;
            let response = handle(&*responder, &grant, request)?;
            // Answered in the request's version at most: a version 1 peer reads it.
            Ok(wire::encode_as(&response, version.min(response.version())))
        })
        .await?;
        Ok(self.sent(kind, received, encoded))
    }

    /// A sync message's body, read once the token may sync, within the body limit and the
    /// token's exchange slots: the slot (held while it lives) and the bytes.
    async fn sync_body<B>(
        &self,
        grant: &Grant,
        req: Request<B>,
    ) -> Result<(SlotGuard, Bytes), Failure>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        Self::require_sync(grant)?;
        let config = &self.inner.config;
        check_declared(&req, config.max_exchange_body)?;
        let slot = self.exchange_slot(grant)?;
        let body = collect_limited(
            req.into_body(),
            config.max_exchange_body,
            config.body_read_timeout,
        )
        .await
        .map_err(|e| Failure::body(e, config.max_exchange_body))?;
        Ok((slot, body))
    }

    pub(super) fn exchange_slot(&self, grant: &Grant) -> Result<SlotGuard, Failure> {
        let mut all = lock(&self.inner.exchanges);
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

    pub(super) async fn watch(&self, grant: &Grant, query: String) -> Reply {
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
        let notifier = self.inner.responder.notifier().ok_or_else(|| {
            Failure::new(StatusCode::NOT_IMPLEMENTED, "this node cannot be watched")
        })?;
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

    pub(super) async fn get_blob(&self, grant: &Grant, hash: Hash, head: bool) -> Reply {
        Self::require_sync(grant)?;
        let inner = self.inner.clone();
        let grant = grant.clone();
        let found = blocking(move || {
            // A blob the token may not see is answered as one not stored: its hash says
            // nothing about whether this node holds it.
            if !inner.uploads.may_see(&*inner.responder, &grant, hash)? {
                return Ok(None);
            }
            Ok(inner.responder.open_blob(&hash)?)
        })
        .await?;
        let Some((size, reader)) = found else {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!(
                    "blob {hash} not stored here, or no record this token may read refers to it"
                ),
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

    pub(super) async fn put_blob<B>(&self, grant: &Grant, hash: Hash, req: Request<B>) -> Reply
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
        let responder = self.inner.responder.clone();
        let store = blocking(move || Ok(responder.accept_blob(&blob, &mut reader)?));
        let pump = pump_body(req.into_body(), tx, size, config.body_read_timeout);
        let (stored, pumped) = tokio::join!(store, pump);
        pumped.map_err(|e| Failure::body(e, size))?;
        stored?;
        self.inner.uploads.uploaded(&grant.name, hash);
        Ok(json_response(
            StatusCode::OK,
            json!({ "hash": hash.to_string(), "size": size }),
        ))
    }
}

/// Checks an exchange request against the limits and `grant` (its page's size, the scopes
/// it may read and write, the files it names), narrowing its scopes to what the token may
/// read.
pub(super) fn admit_exchange(
    inner: &Inner,
    responder: &dyn Responder,
    grant: &Grant,
    request: ExchangeRequest,
) -> Result<ExchangeRequest, Failure> {
    let max_versions = inner.config.max_page_versions;
    let count = request.page.version_count();
    if count > max_versions {
        return Err(Failure {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("page of {count} versions over the limit of {max_versions}"),
            close: false,
        });
    }
    check_runs(&request.page, max_versions)?;
    let local = responder.scopes()?;
    let request = authorize_exchange(grant, request, &local)?;
    let pushed = request.page.versions().map(|(s, _, v)| (s, v));
    inner.uploads.check_pushed(responder, grant, pushed)?;
    Ok(request)
}

/// A page has at most as many runs as a page may have versions (a run without versions
/// still costs the receiver a mark).
pub(super) fn check_runs(page: &Page, max_versions: usize) -> Result<(), Failure> {
    if page.runs.len() > max_versions.max(1) {
        return Err(Failure {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "page of {} runs over the limit of {max_versions}",
                page.runs.len()
            ),
            close: false,
        });
    }
    Ok(())
}

/// The responder's metrics for one answered exchange that brought `received` versions.
pub(super) fn count_exchange(inner: &Inner, received: usize, response: &ExchangeResponse) {
    let metrics = &inner.config.metrics;
    metrics.count_versions("responder", "received", received);
    metrics.count_versions("responder", "shipped", response.page.version_count());
    metrics.count_halts("responder", "us", &response.halts);
}

/// Plans and sends a streamed pull's frames into `tx` until the last; a refusal or a storage
/// failure breaks the body off (the client sees a cut transfer and keeps what it applied).
async fn send_frames(
    inner: Arc<Inner>,
    mut cursor: PullCursor,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    _slot: SlotGuard,
) {
    loop {
        let responder = inner.responder.clone();
        let planned = crate::blocking::run_blocking(move || {
            let frame = responder.next_frame(&mut cursor);
            (cursor, frame)
        })
        .await;
        let Ok((moved, frame)) = planned else { return };
        cursor = moved;
        let (bytes, end) = match frame {
            Ok(frame) => {
                inner.config.metrics.count_versions(
                    "responder",
                    "shipped",
                    frame.page.version_count(),
                );
                let bytes = wire::encode_framed(&frame, 2);
                inner.config.metrics.message("pull", 0, bytes.len());
                (Ok(Bytes::from(bytes)), frame.end)
            }
            Err(refusal) => {
                tracing::warn!(
                    peer = %cursor.from(), reason = %refusal.reason,
                    "a streamed pull stopped"
                );
                (Err(std::io::Error::other(refusal.reason)), true)
            }
        };
        if tx.send(bytes).await.is_err() || end {
            return;
        }
    }
}

pub(super) struct SlotGuard {
    inner: Arc<Inner>,
    name: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut all = lock(&self.inner.exchanges);
        if let Some(n) = all.get_mut(&self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                all.remove(&self.name);
            }
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
    let marks = match &request.marks {
        RequestMarks::Full(marks) => marks.iter().map(|(s, _)| s).collect(),
        RequestMarks::Digest(_) => Vec::new(),
    };
    let mentioned = marks
        .into_iter()
        .chain(request.page.runs.iter().map(|r| &r.scope));
    request.scopes = readable_scopes(grant, &request.scopes, mentioned, local)?;
    check_writes(
        grant,
        &request.scopes,
        request.page.runs.iter().map(|r| &r.scope),
    )?;
    Ok(request)
}

/// Narrows an audit to what `grant` may read, and refuses versions it may not write (as for
/// an exchange).
fn authorize_audit(
    grant: &Grant,
    mut request: AuditRequest,
    local: &[Scope],
) -> Result<AuditRequest, Failure> {
    let mentioned = request
        .segments
        .iter()
        .map(|s| &s.scope)
        .chain(request.versions.iter().map(|(s, _)| s))
        .chain(request.wanted.iter().map(|(s, _)| s));
    request.scopes = readable_scopes(grant, &request.scopes, mentioned, local)?;
    check_writes(
        grant,
        &request.scopes,
        request.versions.iter().map(|(s, _)| s),
    )?;
    Ok(request)
}

/// The scopes in play for `grant`: a request naming an unreadable scope is refused; "all
/// scopes" from a token that cannot read all becomes the readable scopes among those the
/// request mentions and those held here.
fn readable_scopes<'a>(
    grant: &Grant,
    scopes: &ScopeFilter,
    mentioned: impl Iterator<Item = &'a Scope>,
    local: &'a [Scope],
) -> Result<ScopeFilter, Failure> {
    match scopes {
        ScopeFilter::Only(set) => match set.iter().find(|s| !grant.can_read(s)) {
            Some(s) => Err(Failure::forbidden(format!(
                "token {:?} may not sync scope {s}",
                grant.name
            ))),
            None => Ok(scopes.clone()),
        },
        ScopeFilter::All if grant.reads_all() => Ok(ScopeFilter::All),
        ScopeFilter::All => {
            let readable: BTreeSet<Scope> = local
                .iter()
                .chain(mentioned)
                .filter(|s| grant.can_read(s))
                .cloned()
                .collect();
            Ok(ScopeFilter::Only(readable))
        }
    }
}

/// Every scope written to is in play and writable by `grant`.
pub(super) fn check_writes<'a>(
    grant: &Grant,
    in_play: &ScopeFilter,
    written: impl Iterator<Item = &'a Scope>,
) -> Result<(), Failure> {
    for scope in written {
        if !grant.can_write(scope) || !in_play.contains(scope) {
            return Err(Failure::forbidden(format!(
                "token {:?} may not write scope {scope}",
                grant.name
            )));
        }
    }
    Ok(())
}
