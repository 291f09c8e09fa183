//! The records API: get, put, delete and list records, put and get files, and the status
//! document.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::failure::json_response;
use super::routes::check_declared;
use super::{Failure, HighwaterService, Reply};
use crate::api::{FileRead, ListQuery, Lookup, Routed, Source, Visible, Written, MAX_LIST_LIMIT};
use crate::blob::CHUNK;
use crate::http::access::Grant;
use crate::http::body::{collect_limited, full, pump_body, stream_reader, ChannelReader};
use crate::http::{
    decode_query, encode_key, HEADER_HLC, HEADER_HYDRATION, HEADER_ORIGIN, HEADER_RESIDENCY,
    HEADER_ROUTE, HEADER_SOURCE, NO_FILE, NO_SUCH_RECORD, RECORD_DELETED,
};
use crate::record::{Hydration, Key, Residency, Scope};

impl HighwaterService {
    pub(super) async fn get_record(
        &self,
        grant: &Grant,
        scope: Scope,
        key: Key,
        route: bool,
    ) -> Reply {
        // IMPORTANT: the caller's grant is checked here, before a read is routed to a peer
        // with this node's own token for it.
        Self::require_read(grant, &scope)?;
        let api = &self.inner.api;
        let routed = match route {
            true => api.get_routed(scope, key).await,
            false => api.get(scope, key).await.map(Routed::here),
        };
        let routed = routed.map_err(failed)?;
        let (source, hydration) = (routed.source, route.then_some(routed.hydration));
        let missing = |message| {
            let mut resp = Failure::new(StatusCode::NOT_FOUND, message).into_response();
            put_source_headers(resp.headers_mut(), &source, hydration);
            Ok(resp)
        };
        let read = match routed.value {
            Lookup::Found(read) => read,
            Lookup::Deleted => return missing(RECORD_DELETED),
            Lookup::Missing => return missing(NO_SUCH_RECORD),
        };
        let mut resp = Response::new(full(read.value));
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        put_version_headers(headers, &read.hlc, read.residency);
        put_source_headers(headers, &source, hydration);
        Ok(resp)
    }

    pub(super) async fn put_record<B>(
        &self,
        grant: &Grant,
        scope: Scope,
        key: Key,
        req: Request<B>,
    ) -> Reply
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
        let done = self.inner.api.put(scope, key, value.to_vec()).await;
        Ok(json_response(
            StatusCode::OK,
            written(&done.map_err(failed)?),
        ))
    }

    pub(super) async fn delete_record(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
        Self::require_write(grant, &scope)?;
        let done = self.inner.api.delete(scope, key).await;
        Ok(json_response(
            StatusCode::OK,
            written(&done.map_err(failed)?),
        ))
    }

    pub(super) async fn list(
        &self,
        grant: &Grant,
        scope: Scope,
        query: String,
        route: bool,
    ) -> Reply {
        Self::require_read(grant, &scope)?;
        let mut list = ListQuery::default();
        for (name, value) in decode_query(&query)? {
            match name.as_str() {
                "prefix" => list.prefix = value,
                "after" => list.after = Some(Key::new(value)?),
                "limit" => {
                    list.limit = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
                        .ok_or_else(|| Failure::bad("limit must be 1..=1000"))?;
                }
                other => return Err(Failure::bad(format!("unknown parameter {other:?}"))),
            }
        }
        let api = &self.inner.api;
        let routed = match route {
            true => api.list_routed(scope, list).await,
            false => api.list(scope, list).await.map(Routed::here),
        };
        let routed = routed.map_err(failed)?;
        let hydration = route.then_some(routed.hydration);
        let listing = routed.value;
        let items: Vec<_> = listing
            .records
            .iter()
            .map(|r| {
                json!({
                    "key": encode_key(&r.key),
                    "value": r.value,
                    "size": r.size,
                    "hlc": r.hlc.to_string(),
                    "origin": r.hlc.origin().to_string(),
                    "residency": r.residency.as_str(),
                    "file": r.file.map(|b| json!({"hash": b.hash.to_string(), "size": b.size})),
                })
            })
            .collect();
        let next = listing.next_after.as_ref().map(encode_key);
        let mut body = json!({
            "records": items,
            "next_after": next,
            "source": routed.source.to_header(),
        });
        if let Some(h) = hydration {
            body["hydration"] = json!(h.as_str());
        }
        let mut resp = json_response(StatusCode::OK, body);
        put_source_headers(resp.headers_mut(), &routed.source, hydration);
        Ok(resp)
    }

    pub(super) async fn put_file<B>(
        &self,
        grant: &Grant,
        scope: Scope,
        key: Key,
        req: Request<B>,
    ) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        Self::require_write(grant, &scope)?;
        let config = &self.inner.config;
        let limit = config.max_blob_body;
        check_declared(&req, limit)?;
        let (tx, reader) = ChannelReader::new();
        let store = self
            .inner
            .api
            .put_file(scope, key, Vec::new(), Box::new(reader));
        let pump = pump_body(req.into_body(), tx, limit, config.body_read_timeout);
        let (stored, pumped) = tokio::join!(store, pump);
        pumped.map_err(|e| Failure::body(e, limit))?;
        Ok(json_response(
            StatusCode::OK,
            written(&stored.map_err(failed)?),
        ))
    }

    pub(super) async fn get_file(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
        Self::require_read(grant, &scope)?;
        let (blob, hlc, reader) = match self.inner.api.get_file(scope, key).await.map_err(failed)? {
            FileRead::Ready { blob, hlc, reader } => (blob, hlc, reader),
            FileRead::Missing => return Err(Failure::new(StatusCode::NOT_FOUND, NO_SUCH_RECORD)),
            FileRead::NoFile => return Err(Failure::new(StatusCode::NOT_FOUND, NO_FILE)),
            FileRead::Staged { hlc } => {
                let mut resp = Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the file is not here yet (staged): retry after the next sync",
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                put_version_headers(resp.headers_mut(), &hlc, Residency::Staged);
                return Ok(resp);
            }
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
        put_version_headers(headers, &hlc, Residency::Resident);
        Ok(resp)
    }

    pub(super) async fn status(&self, grant: &Grant) -> Reply {
        let grant = grant.clone();
        let visible: Visible = Arc::new(move |s: &Scope| grant.can_read(s));
        let status = self.inner.api.status(visible).await.map_err(failed)?;
        Ok(json_response(StatusCode::OK, status.to_json()))
    }
}

/// The failure for an error of the records API.
fn failed(e: crate::Error) -> Failure {
    Failure::from(&e)
}

/// The acknowledgement of a write: its version, and the file a file write stored.
fn written(w: &Written) -> serde_json::Value {
    let mut out = json!({ "hlc": w.hlc.to_string(), "origin": w.hlc.origin().to_string() });
    if let Some(b) = w.file {
        out["hash"] = json!(b.hash.to_string());
        out["size"] = json!(b.size);
    }
    out
}

/// Whether a record read may be routed to a peer: not when the caller is itself a node
/// routing a read here (its request says `x-highwater-route: local`), so that two nodes
/// hydrating from each other never pass a read back and forth.
pub(super) fn routes<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(HEADER_ROUTE)
        .is_none_or(|v| v.as_bytes() != b"local")
}

/// Where a read's answer came from, and the scope's hydration here (when it was routed).
fn put_source_headers(
    headers: &mut hyper::HeaderMap,
    source: &Source,
    hydration: Option<Hydration>,
) {
    // A peer's name is its URL, which is a valid header value; one that is not is left out.
    if let Ok(v) = HeaderValue::from_str(&source.to_header()) {
        headers.insert(HEADER_SOURCE, v);
    }
    if let Some(h) = hydration {
        headers.insert(HEADER_HYDRATION, HeaderValue::from_static(h.as_str()));
    }
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
