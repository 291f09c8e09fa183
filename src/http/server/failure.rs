//! A failed request ([`Failure`]): its conversions from refusals and errors, its JSON
//! response, and the HTTP status of each refusal class.

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::error::{Error, InputError};
use crate::http::body::{full, BodyError, HttpBody};
use crate::transport::{Refusal, RefusalCode};

/// A failed request: the status and a message for the client (never internal detail).
pub(in crate::http) struct Failure {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) close: bool,
}

impl Failure {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            close: false,
        }
    }

    pub(in crate::http) fn bad(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn forbidden(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::FORBIDDEN, message)
    }

    pub(super) fn body(e: BodyError, limit: u64) -> Failure {
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

    pub(super) fn into_response(self) -> Response<HttpBody> {
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
            507 => "insufficient_storage",
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
            tracing::error!(error = %crate::error::error_chain(e), "request failed");
        }
        Refusal::from(e).into()
    }
}

impl From<InputError> for Failure {
    fn from(e: InputError) -> Failure {
        Failure::bad(e.to_string())
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
        RefusalCode::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(super) fn json_response(status: StatusCode, value: serde_json::Value) -> Response<HttpBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
