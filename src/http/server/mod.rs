//! The HTTP server: a hyper service over a node, and [`serve`] to run it.
//!
//! The service sees the node only through two traits: the [`Responder`] for sync, blobs and
//! watch, and the [`NodeApi`] for records, files and status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use self::routes::{bearer, endpoint_kind, query, route, Route};
use super::access::{Access, Grant};
use super::body::{full, HttpBody, Lingering};
use super::metrics::{Metrics, CONTENT_TYPE as METRICS_TYPE};
use super::tls::ServerTls;
use crate::api::NodeApi;
use crate::record::{Scope, MAX_VALUE_LEN};
use crate::transport::Responder;
use crate::wire::MAX_MESSAGE_LEN;

mod connections;
mod failure;
mod listen;
mod push;
mod records;
mod routes;
mod sync;
mod uploads;

pub use self::failure::refusal_status;
pub(super) use self::failure::Failure;
pub(crate) use self::listen::check_exposure;
pub use self::listen::{serve, ServeError};

/// The default cap on open connections: half the common soft limit of 1024 open files, since
/// a connection that serves a download holds a second descriptor (the blob file), and the
/// store, the blob uploads and the node's own connections to its peers need some too.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

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
    /// Time a client has to send a request's headers, counted from the moment [`serve`]
    /// waits for a request: from the accept for the first, from the end of the previous
    /// response on a kept-alive connection. So it is also the keep-alive idle timeout: a
    /// connection without a request for this long is closed (default 10 s). [`serve`] gives a
    /// TLS handshake as long.
    pub header_read_timeout: Duration,
    /// Time allowed between two chunks of a request body (default 30 s).
    pub body_read_timeout: Duration,
    /// Time a response write may go without the client taking a byte; then [`serve`] drops
    /// the connection (default 30 s). A download that keeps moving may take as long as it
    /// needs.
    pub write_timeout: Duration,
    /// Connections [`serve`] keeps open at once (default 512). At the cap a new connection
    /// takes the place of the idle connection that was active least recently; it is shed
    /// with a 503 only when every connection has a request in progress.
    pub max_connections: usize,
    /// Exchanges one token may have in progress at once; more get 429 (default 2).
    pub max_exchanges_per_token: usize,
    /// The certificate and key [`serve`] presents; every connection then speaks TLS
    /// (default none: plain HTTP).
    pub tls: Option<ServerTls>,
    /// Lets [`serve`] listen beyond loopback with tokens but without TLS, the tokens crossing
    /// the network in clear text (default false: refused, [`ServeError::TokensInClearText`]).
    /// For a node behind a TLS-terminating proxy on another machine of a trusted network.
    pub insecure_http: bool,
    /// What the server counts and `GET /metrics` shows (default: a fresh set; a node shares
    /// one with its scheduler's hooks).
    pub metrics: Arc<Metrics>,
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
            write_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_exchanges_per_token: 2,
            tls: None,
            insecure_http: false,
            metrics: Arc::new(Metrics::new()),
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
    /// Sync, blobs and watch.
    responder: Arc<dyn Responder>,
    /// Records, files and status.
    api: Arc<dyn NodeApi>,
    config: ServerConfig,
    /// Exchanges in progress, per token name.
    exchanges: Mutex<HashMap<String, usize>>,
    /// Blobs each token uploaded recently (it may refer to them, and read them back).
    uploads: uploads::Uploads,
    /// Set when the server shuts down: long polls return at once.
    closing: tokio::sync::watch::Sender<bool>,
}

type Reply = Result<Response<HttpBody>, Failure>;

/// Runs blocking responder work off the runtime threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    // A panic in a handler's storage work answers 500 rather than drop the connection.
    let caught = move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    match crate::blocking::run_blocking(caught).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => {
            tracing::error!("a request's storage work panicked");
            Err(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            ))
        }
        Err(e) => Err(Failure::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

impl HighwaterService {
    /// A service for `node`, which answers both sync and the records API (the engine does).
    pub fn new<N: Responder + NodeApi + 'static>(
        node: Arc<N>,
        config: ServerConfig,
    ) -> HighwaterService {
        HighwaterService::from_parts(node.clone(), node, config)
    }

    /// A service whose sync, blob and watch requests `responder` answers, and whose records,
    /// files and status requests `api` answers.
    pub fn from_parts(
        responder: Arc<dyn Responder>,
        api: Arc<dyn NodeApi>,
        config: ServerConfig,
    ) -> HighwaterService {
        HighwaterService {
            inner: Arc::new(Inner {
                responder,
                api,
                config,
                exchanges: Mutex::new(HashMap::new()),
                uploads: uploads::Uploads::default(),
                closing: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    /// Makes long polls in progress return at once (used on shutdown).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Completes once [`HighwaterService::close`] was called.
    pub(super) async fn closing(&self) {
        let mut closing = self.inner.closing.subscribe();
        // An error means the sender is gone, which it cannot be while `self` holds it.
        let _ = closing.wait_for(|c| *c).await;
    }

    /// Handles one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<HttpBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let endpoint = endpoint_kind(&path);
        // IMPORTANT: authentication comes before anything reads the body. A request it
        // refuses is answered and its connection ends, its body unread (as any request's
        // refused before its body): no client without a token holds a connection open or
        // makes this server read.
        let (token, reply) = match self.authenticate(&req) {
            Ok(grant) => {
                // A streamed push's client sends frames until it reads the answer: whenever
                // that answer comes before the body's end (a refusal, a frame refused, an
                // answer that takes no frame), the rest is drained while it goes out, so the
                // client reads it rather than a reset connection. Other bodies are read
                // whole before any answer that needs them, or are small.
                let linger = (endpoint == "push").then_some(self.inner.config.body_read_timeout);
                let req = req.map(|body| Lingering::new(body, linger));
                (Some(grant.name.clone()), self.dispatch(grant, req).await)
            }
            Err(refused) => (None, Err(refused)),
        };
        let resp = reply.unwrap_or_else(Failure::into_response);
        let status = resp.status();
        let metrics = &self.inner.config.metrics;
        metrics.request(endpoint, token.as_deref(), status, started.elapsed());
        tracing::debug!(%method, %path, status = status.as_u16(), "request");
        resp
    }

    /// The grant of the request's token.
    fn authenticate<B>(&self, req: &Request<B>) -> Result<Grant, Failure> {
        self.inner
            .config
            .access
            .authorize(bearer(req)?)
            .ok_or_else(|| Failure::new(StatusCode::UNAUTHORIZED, "missing or unknown token"))
    }

    async fn dispatch<B>(&self, grant: Grant, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
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
            (Route::Pull, Method::POST) => self.pull(&grant, req).await,
            (Route::Pull, _) => allow("POST"),
            (Route::Push, Method::POST) => self.push(&grant, req).await,
            (Route::Push, _) => allow("POST"),
            (Route::Audit, Method::POST) => self.audit(&grant, req).await,
            (Route::Audit, _) => allow("POST"),
            (Route::Watch, Method::GET) => self.watch(&grant, query(&req)).await,
            (Route::Watch, _) => allow("GET"),
            (Route::Blob(hash), m @ (Method::HEAD | Method::GET)) => {
                self.get_blob(&grant, hash, m == Method::HEAD).await
            }
            (Route::Blob(hash), Method::PUT) => self.put_blob(&grant, hash, req).await,
            (Route::Blob(_), _) => allow("HEAD, GET, PUT"),
            (Route::Record(scope, key), Method::GET) => {
                self.get_record(&grant, scope, key, records::routes(&req))
                    .await
            }
            (Route::Record(scope, key), Method::PUT) => {
                self.put_record(&grant, scope, key, req).await
            }
            (Route::Record(scope, key), Method::DELETE) => {
                self.delete_record(&grant, scope, key).await
            }
            (Route::Record(..), _) => allow("GET, PUT, DELETE"),
            (Route::Records(scope), Method::GET) => {
                self.list(&grant, scope, query(&req), records::routes(&req))
                    .await
            }
            (Route::Records(_), _) => allow("GET"),
            (Route::File(scope, key), Method::GET) => self.get_file(&grant, scope, key).await,
            (Route::File(scope, key), Method::PUT) => self.put_file(&grant, scope, key, req).await,
            (Route::File(..), _) => allow("GET, PUT"),
            (Route::Status, Method::GET) => self.status(&grant).await,
            (Route::Status, _) => allow("GET"),
            (Route::Metrics, Method::GET) => self.metrics(&grant).await,
            (Route::Metrics, _) => allow("GET"),
        }
    }

    /// `GET /metrics`: for tokens with the metrics right (every caller of an open node).
    async fn metrics(&self, grant: &Grant) -> Reply {
        if !grant.metrics {
            return Err(Failure::forbidden(format!(
                "token {:?} may not read metrics",
                grant.name
            )));
        }
        let metrics = self.inner.config.metrics.clone();
        let text = blocking(move || Ok(metrics.render())).await?;
        let mut resp = Response::new(full(text));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(METRICS_TYPE));
        Ok(resp)
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
}
