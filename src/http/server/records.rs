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
use super::{blocking, Failure, HighwaterService, Reply};
use crate::api::{NodeApi, Visible};
use crate::blob::CHUNK;
use crate::http::access::Grant;
use crate::http::body::{collect_limited, full, pump_body, stream_reader, ChannelReader};
use crate::http::{decode_query, encode_key, HEADER_HLC, HEADER_ORIGIN, HEADER_RESIDENCY};
use crate::record::{Key, Op, Residency, Scope};

impl HighwaterService {
    pub(super) async fn get_record(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
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
        let engine = self.inner.engine.clone();
        let hlc = blocking(move || {
            engine
                .put(&scope, &key, value.to_vec())
                .map_err(|e| Failure::from(&e))
        })
        .await?;
        Ok(json_response(StatusCode::OK, written(&hlc)))
    }

    pub(super) async fn delete_record(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
        Self::require_write(grant, &scope)?;
        let engine = self.inner.engine.clone();
        let hlc =
            blocking(move || engine.delete(&scope, &key).map_err(|e| Failure::from(&e))).await?;
        Ok(json_response(StatusCode::OK, written(&hlc)))
    }

    pub(super) async fn list(&self, grant: &Grant, scope: Scope, query: String) -> Reply {
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

    pub(super) async fn get_file(&self, grant: &Grant, scope: Scope, key: Key) -> Reply {
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

    pub(super) async fn status(&self, grant: &Grant) -> Reply {
        let grant = grant.clone();
        let visible: Visible = Arc::new(move |s: &Scope| grant.can_read(s));
        let status = self
            .inner
            .engine
            .status(visible)
            .await
            .map_err(|e| Failure::from(&e))?;
        Ok(json_response(StatusCode::OK, status.to_json()))
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
