//! Reading a request: its [`Route`] parsed strictly from the path, and the header and
//! query helpers (bearer token, declared body length).

use hyper::header;
use hyper::{Request, StatusCode};

use super::Failure;
use crate::hash::Hash;
use crate::http::parse_key;
use crate::record::{Key, Scope};

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
pub(super) fn check_declared<B>(req: &Request<B>, limit: u64) -> Result<Option<u64>, Failure> {
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

/// The bearer token of the request's `Authorization` header, if it has one.
///
/// Given twice, it is a bad request: which of the two counts would be a guess, and a proxy in
/// front may have checked the other one.
pub(super) fn bearer<B>(req: &Request<B>) -> Result<Option<&str>, Failure> {
    let mut given = req.headers().get_all(header::AUTHORIZATION).iter();
    let first = given.next();
    if given.next().is_some() {
        return Err(Failure::bad("Authorization given more than once"));
    }
    match first {
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

pub(super) fn query<B>(req: &Request<B>) -> String {
    req.uri().query().unwrap_or("").to_owned()
}

/// What a request asks for, parsed from its path alone.
pub(super) enum Route {
    Exchange,
    /// `POST /v1/sync/pull`: an exchange whose answer streams its pages.
    Pull,
    /// `POST /v1/sync/push`: an exchange whose request streams its pages.
    Push,
    Audit,
    Watch,
    Blob(Hash),
    Record(Scope, Key),
    Records(Scope),
    File(Scope, Key),
    Status,
    Metrics,
}

/// What kind of endpoint `path` names, for the request latency metric: a fixed set of
/// names, whatever a client sends.
pub(super) fn endpoint_kind(path: &str) -> &'static str {
    if path == "/metrics" {
        return "metrics";
    }
    let mut segments = path.strip_prefix("/v1/").unwrap_or("").split('/');
    match (segments.next(), segments.next(), segments.next()) {
        (Some("sync"), Some("exchange"), None) => "exchange",
        (Some("sync"), Some("pull"), None) => "pull",
        (Some("sync"), Some("push"), None) => "push",
        (Some("sync"), Some("audit"), None) => "audit",
        (Some("sync"), Some("watch"), None) => "watch",
        (Some("blobs"), ..) => "blob",
        (Some("records"), ..) => "records",
        (Some("files"), ..) => "files",
        (Some("status"), None, _) => "status",
        _ => "other",
    }
}

/// Parses `/v1/...` strictly: raw segments, no dot segments, scopes and hashes unencoded.
pub(super) fn route(path: &str) -> Result<Route, Failure> {
    let not_found = || Failure::new(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
    if path == "/metrics" {
        return Ok(Route::Metrics);
    }
    let rest = path.strip_prefix("/v1/").ok_or_else(not_found)?;
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        ["sync", "exchange"] => Ok(Route::Exchange),
        ["sync", "pull"] => Ok(Route::Pull),
        ["sync", "push"] => Ok(Route::Push),
        ["sync", "audit"] => Ok(Route::Audit),
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
