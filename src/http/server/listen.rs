//! Serving on a TCP listener: [`serve`] and its [`ServeError`], the rule for what may listen
//! beyond loopback, the accept loop (the connection cap, TLS on accepted connections), and the
//! hyper `Service` impls each connection runs.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::connections::{shed, Activity, Admission, Busy, Connections, Slot, WriteTimeout};
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
    /// A node with tokens but without TLS may only listen on loopback, unless told
    /// explicitly ([`ServerConfig::insecure_http`]): its tokens would cross the network in
    /// clear text.
    #[error("refusing to serve tokens over plain HTTP on non-loopback address {addr}: configure TLS (--tls-cert and --tls-key), or accept clear-text tokens explicitly (--insecure-http)")]
    TokensInClearText {
        /// The address.
        addr: SocketAddr,
    },
    /// The listener failed.
    #[error("listener failed")]
    Io(#[from] std::io::Error),
}

/// Whether a node with `config` may listen on `addr`: loopback always; any other address
/// only with tokens, and then only over TLS or with [`ServerConfig::insecure_http`].
///
/// # Errors
/// [`ServeError::OpenOnPublicAddress`] for an open node, [`ServeError::TokensInClearText`]
/// for tokens without TLS, on a non-loopback address.
pub(crate) fn check_exposure(addr: SocketAddr, config: &ServerConfig) -> Result<(), ServeError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    // An open node grants everything to anyone who connects: TLS would only encrypt that.
    if config.access.is_open() {
        return Err(ServeError::OpenOnPublicAddress { addr });
    }
    if config.tls.is_none() && !config.insecure_http {
        return Err(ServeError::TokensInClearText { addr });
    }
    Ok(())
}

/// Serves `node` (see [`HighwaterService::new`]) on `listener` until `shutdown` completes,
/// then stops accepting, lets requests in progress finish (long polls return at once) for up
/// to 10 s, and returns. With [`ServerConfig::tls`], every connection speaks TLS: a client
/// that does not complete its handshake within the header read timeout is dropped.
///
/// At most [`ServerConfig::max_connections`] connections are open at once: at the cap a new
/// connection takes the place of the idle connection (no request in progress) that was active
/// least recently, and is shed with a 503 only when every connection is busy. A client has
/// [`ServerConfig::header_read_timeout`] from the moment the server waits for a request (a new
/// connection, or the end of the previous response) to send its headers, and a response write
/// that makes no progress for [`ServerConfig::write_timeout`] drops the connection.
///
/// # Errors
/// [`ServeError::OpenOnPublicAddress`] for an open node on a non-loopback address,
/// [`ServeError::TokensInClearText`] for tokens without TLS there (see
/// [`ServerConfig::insecure_http`]); the listener's address cannot be read.
pub async fn serve<N: Responder + NodeApi + 'static>(
    node: Arc<N>,
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    check_exposure(addr, &config)?;
    let tls = config.tls.as_ref().map(|t| t.acceptor());
    if config.access.is_open() {
        tracing::warn!(%addr, "serving OPEN (no tokens): anyone on this machine may read, write and sync");
    } else if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, tokens = ?config.access, "serving tokens over plain HTTP (--insecure-http): they cross the network in clear text");
    } else {
        tracing::info!(%addr, tokens = ?config.access, tls = tls.is_some(), "serving");
    }
    let header_timeout = config.header_read_timeout;
    let write_timeout = config.write_timeout;
    let connections = Connections::new(config.max_connections, config.metrics.clone());
    let service = HighwaterService::new(node, config);
    let graceful = GracefulShutdown::new();
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
        let slot = match connections.admit() {
            Admission::Admitted { slot, evicted } => {
                if evicted {
                    tracing::debug!(%peer, "at the connection cap: the least recently active idle connection gave way");
                }
                slot
            }
            Admission::Full => {
                tracing::debug!(%peer, "at the connection cap with every connection busy: shed");
                shed(stream, tls.is_some());
                continue;
            }
        };
        // Rounds are many small sequential requests: answer them without Nagle delays.
        let _ = stream.set_nodelay(true);
        let stream = WriteTimeout::new(stream, write_timeout);
        let connection = Connection {
            service: service.clone(),
            watcher: graceful.watcher(),
            header_timeout,
            peer,
            slot,
        };
        match &tls {
            None => {
                tokio::spawn(connection.serve(stream));
            }
            Some(acceptor) => {
                tokio::spawn(connection.handshake(acceptor.clone(), stream));
            }
        }
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

/// One accepted connection, before its task serves it.
struct Connection {
    service: HighwaterService,
    /// Held from the accept on, so shutdown waits for a connection still in its handshake.
    watcher: Watcher,
    header_timeout: Duration,
    peer: SocketAddr,
    /// Its place among the open connections, given up when the task ends.
    slot: Slot,
}

impl Connection {
    /// Completes the TLS handshake within the header read timeout (a client that never
    /// finishes one holds its connection no longer than one that never sends headers), then
    /// serves HTTP over it. Shutdown abandons a handshake in progress.
    async fn handshake(self, acceptor: tokio_rustls::TlsAcceptor, stream: WriteTimeout<TcpStream>) {
        let service = self.service.clone();
        let activity = self.slot.activity().clone();
        let accepted = tokio::select! {
            a = tokio::time::timeout(self.header_timeout, acceptor.accept(stream)) => a,
            () = service.closing() => return,
            // A handshake in progress is idle: it may give way like any other.
            () = activity.evicted() => return,
        };
        match accepted {
            Ok(Ok(tls)) => self.serve(tls).await,
            Ok(Err(e)) => tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
        }
    }

    /// Serves HTTP/1.1 on `io` until the client or the server closes it, or the accept
    /// loop evicts it to make room.
    async fn serve<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = self.slot.activity().clone();
        let tracked = Tracked {
            service: self.service,
            activity: activity.clone(),
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .serve_connection(TokioIo::new(io), tracked);
        tokio::select! {
            served = self.watcher.watch(conn) => {
                if let Err(e) = served {
                    tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
                }
            }
            // Dropping the connection closes it; it had no request in progress.
            () = activity.evicted() => {
                tracing::debug!(peer = %self.peer, "idle connection closed to make room");
            }
        }
    }
}

/// The service of one connection: marks it busy while a request is in progress, so the
/// accept loop evicts it only when idle.
#[derive(Clone)]
struct Tracked {
    service: HighwaterService,
    activity: Arc<Activity>,
}

impl<B> hyper::service::Service<Request<B>> for Tracked
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HttpBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        // Busy from now: hyper calls this as soon as the request's headers are in.
        let busy = Busy::new(self.activity.clone());
        let service = self.service.clone();
        Box::pin(async move {
            let resp = service.handle(req).await;
            Ok(resp.map(|body| busy.hold(body)))
        })
    }
}
