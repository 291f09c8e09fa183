//! The streamed push endpoint (`POST /v1/sync/push`): the request and the initiator's
//! frames read from one streamed body, each admitted and applied as it arrives
//! (docs/http.md, docs/protocol.md "Streamed pushes").

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::{Request, StatusCode};

use super::sync::{admit_exchange, check_runs, check_writes, count_exchange};
use super::{blocking, Failure, HighwaterService, Inner, Reply};
use crate::exchange::{Page, PushStart};
use crate::http::access::Grant;
use crate::http::body::BodyError;
use crate::transport::Responder;
use crate::wire::{self, ExchangeRequest, Message, PageFrame, ScopeFilter};

impl HighwaterService {
    /// A streamed push: the body is the request and then the initiator's frames, each
    /// length-prefixed (`wire::encode_framed`) and each within the exchange body limit. The
    /// request is admitted as an exchange's and each frame's page as a request's page is
    /// (the page limits, write grants on its scopes, its files uploaded or held here), then
    /// applied on a blocking thread before the next is read, so a server that applies slowly
    /// slows the sender through TCP. The answer, sent after the last frame, is the round's
    /// response. A frame refused, or a body that ends before the last, ends the transfer with
    /// an error; the pages applied before stay. The token's exchange slot is held
    /// throughout.
    pub(super) async fn push<B>(&self, grant: &Grant, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        Self::require_sync(grant)?;
        if !self.inner.responder.takes_pushes() {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                "this node does not take streamed pushes",
            ));
        }
        let _slot = self.exchange_slot(grant)?;
        let config = &self.inner.config;
        let (limit, idle) = (config.max_exchange_body, config.body_read_timeout);
        let mut body = req.into_body();
        let max = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut unframer = wire::Unframer::new(max);
        let first = next_envelope(&mut body, &mut unframer, limit, idle)
            .await?
            .ok_or_else(|| Failure::bad("a streamed push without its request"))?;
        let mut received = first.len();
        let (inner, owned) = (self.inner.clone(), grant.clone());
        let (opened, version) = blocking(move || {
            let (request, version) = wire::decode_versioned::<ExchangeRequest>(&first)
                .map_err(|e| Failure::bad(e.to_string()))?;
            let responder = &*inner.responder;
            let request = admit_exchange(&inner, responder, &owned, request)?;
            let count = request.page.version_count();
            inner
                .config
                .metrics
                .count_versions("responder", "received", count);
            Ok((responder.open_push(request)?, version))
        })
        .await?;
        let mut transfer = match opened {
            PushStart::Answered(response) => {
                // Nothing of the frames is taken: the answer goes at once.
                let encoded = wire::encode_as(&response, version.min(response.version()));
                return Ok(self.sent("push", received, encoded));
            }
            PushStart::Receiving(transfer) => transfer,
        };
        while !transfer.ended() {
            let message = next_envelope(&mut body, &mut unframer, limit, idle)
                .await?
                .ok_or_else(|| Failure::bad("the streamed push ended before its last frame"))?;
            received += message.len();
            let (inner, owned) = (self.inner.clone(), grant.clone());
            transfer = blocking(move || {
                let frame =
                    wire::decode::<PageFrame>(&message).map_err(|e| Failure::bad(e.to_string()))?;
                let responder = &*inner.responder;
                admit_page(&inner, responder, &owned, transfer.scopes(), &frame.page)?;
                let count = frame.page.version_count();
                responder.push_frame(&mut transfer, frame)?;
                inner
                    .config
                    .metrics
                    .count_versions("responder", "received", count);
                Ok(transfer)
            })
            .await?;
        }
        let (inner, responder) = (self.inner.clone(), self.inner.responder.clone());
        let encoded = blocking(move || {
            let response = responder.close_push(transfer)?;
            count_exchange(&inner, 0, &response);
            Ok(wire::encode_as(&response, version.min(response.version())))
        })
        .await?;
        Ok(self.sent("push", received, encoded))
    }
}

/// Checks a streamed push's frame's page as [`admit_exchange`] checks a request's: its size,
/// write grants on its scopes (which must be in play, `scopes`), the files it names.
fn admit_page(
    inner: &Inner,
    responder: &dyn Responder,
    grant: &Grant,
    scopes: &ScopeFilter,
    page: &Page,
) -> Result<(), Failure> {
    let max_versions = inner.config.max_page_versions;
    let count = page.version_count();
    if count > max_versions {
        return Err(Failure {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("page of {count} versions over the limit of {max_versions}"),
            close: true,
        });
    }
    check_runs(page, max_versions)?;
    check_writes(grant, scopes, page.runs.iter().map(|r| &r.scope))?;
    let pushed = page.versions().map(|(s, _, v)| (s, v));
    inner.uploads.check_pushed(responder, grant, pushed)?;
    Ok(())
}

/// The next whole message of a streamed request body, each at most `limit` bytes, none
/// waiting more than `idle` for its next bytes (`None`: the body ended between messages).
async fn next_envelope<B>(
    body: &mut B,
    unframer: &mut wire::Unframer,
    limit: u64,
    idle: Duration,
) -> Result<Option<Bytes>, Failure>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    loop {
        match unframer.next_message() {
            Ok(Some(message)) => return Ok(Some(message)),
            Ok(None) => {}
            Err(crate::error::WireError::TooLarge { .. }) => {
                return Err(Failure::body(BodyError::TooLarge, limit))
            }
            Err(e) => return Err(Failure::bad(e.to_string())),
        }
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(Failure::body(BodyError::Timeout, limit)),
            Ok(None) if unframer.is_empty() => return Ok(None),
            Ok(None) => return Err(Failure::bad("the body broke off inside a message")),
            Ok(Some(Err(e))) => return Err(Failure::body(BodyError::Broken(e.to_string()), limit)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            unframer.push(&data);
        }
    }
}
