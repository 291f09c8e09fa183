//! Transports: how an initiator reaches a responder.
//!
//! [`Transport`] is the initiator's side (send a request, get a response). [`Responder`] is
//! the other side's small trait (answer a request), implemented by the engine; transports
//! and servers wrap any `Responder`, so they never reach into the engine.

mod in_process;

pub use self::in_process::{InProcess, WireStats};

use std::future::Future;

use crate::error::{Error, TransportError};
use crate::hlc::NodeId;
use crate::wire::{ExchangeRequest, ExchangeResponse};

/// The initiator's side of a round. Implementations retry nothing: the scheduler owns
/// retries.
pub trait Transport: Send + Sync {
    /// The responder's id, once known (the engine ships nothing before it is).
    fn peer_id(&self) -> Option<NodeId>;

    /// Sends one request and returns the response.
    fn exchange(
        &self,
        request: ExchangeRequest,
    ) -> impl Future<Output = Result<ExchangeResponse, TransportError>> + Send;
}

/// The responder's side of a round.
pub trait Responder: Send + Sync {
    /// The responder's id.
    fn node_id(&self) -> NodeId;

    /// Answers one request.
    ///
    /// # Errors
    /// A [`Refusal`] to send back instead of a response.
    fn respond(&self, request: ExchangeRequest) -> Result<ExchangeResponse, Refusal>;
}

impl<R: Responder + ?Sized> Responder for std::sync::Arc<R> {
    fn node_id(&self) -> NodeId {
        (**self).node_id()
    }

    fn respond(&self, request: ExchangeRequest) -> Result<ExchangeResponse, Refusal> {
        (**self).respond(request)
    }
}

/// The class of a refusal, as a peer is told it (HTTP maps these to status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The request is malformed or breaks the protocol (400).
    BadRequest,
    /// The requester lacks access (403).
    Forbidden,
    /// The responder cannot serve now; try later (503).
    Unavailable,
    /// The responder failed (500).
    Internal,
}

/// What a responder tells a peer when it refuses a request: separate from the local error
/// type, and free of internal detail for server-side failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The class.
    pub code: RefusalCode,
    /// A human-readable reason.
    pub reason: String,
}

impl From<&Error> for Refusal {
    fn from(e: &Error) -> Self {
        let (code, reason) = match e {
            Error::Wire(w) => (RefusalCode::BadRequest, w.to_string()),
            Error::Protocol(p) => (RefusalCode::BadRequest, p.to_string()),
            Error::Input(i) => (RefusalCode::BadRequest, i.to_string()),
            Error::Clock(c) => (RefusalCode::Unavailable, c.to_string()),
            _ => (RefusalCode::Internal, "internal error".to_owned()),
        };
        Refusal { code, reason }
    }
}

impl From<Refusal> for TransportError {
    fn from(r: Refusal) -> Self {
        TransportError::Refused {
            code: r.code,
            reason: r.reason,
        }
    }
}
