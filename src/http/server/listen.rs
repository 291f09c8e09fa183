//! Serving on a TCP listener: [`serve`] and its [`ServeError`], and the hyper `Service`
//! impl each connection runs.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::{Request, Response};
use tokio::net::TcpListener;

use super::{HighwaterService, ServerConfig};
use crate::api::NodeApi;
use crate::http::body::HttpBody;
use crate::transport::Responder;

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

/// Serves `node` (see [`HighwaterService::new`]) on `listener` until `shutdown` completes,
/// then stops accepting, lets requests in progress finish (long polls return at once) for up
/// to 10 s, and returns.
///
/// # Errors
/// [`ServeError::OpenOnPublicAddress`] for an open node on a non-loopback address; the
/// listener's address cannot be read.
pub async fn serve<N: Responder + NodeApi + 'static>(
    node: Arc<N>,
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
    let service = HighwaterService::new(node, config);
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
