//! Mounting highwater inside an application's own hyper 1 server: the application answers
//! `/health` itself and hands every `/v1/...` request to a [`HighwaterService`].
//!
//! `cargo run --example mount` serves on a loopback port, checks itself (the app's own
//! route, a second node syncing over HTTP, the record read back through the mounted
//! records API), shuts down and exits: 0 when every check passed.
//!
//! Mounted this way, the application's server owns the connection settings that
//! [`highwater::http::serve`] would otherwise set (header read timeout, graceful
//! shutdown) and the rule that a node without tokens listens on loopback only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use highwater::http::{HighwaterService, HttpBody, HttpTransport, ServerConfig};
use highwater::{Key, Scope, SyncEngine};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The application's router: its own routes, and highwater under `/v1/`.
async fn route(
    sync: HighwaterService,
    req: Request<Incoming>,
) -> Result<Response<HttpBody>, Infallible> {
    if req.uri().path().starts_with("/v1/") {
        return Ok(sync.handle(req).await);
    }
    let (status, text) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => (StatusCode::OK, "ok"),
        _ => (StatusCode::NOT_FOUND, "not found"),
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    Ok(resp)
}

/// Accepts connections until `stop` turns true.
async fn run(listener: TcpListener, sync: HighwaterService, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let sync = sync.clone();
        let service = hyper::service::service_fn(move |req| route(sync.clone(), req));
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    // Long polls in progress (GET /v1/sync/watch) return at once.
    sync.close();
}

/// The checks a CI run relies on.
async fn self_check(addr: SocketAddr, node: &SyncEngine) -> Result<(), Error> {
    let client = HttpTransport::new(&format!("http://{addr}"), None)?;
    let empty = || Empty::new().map_err(|e| match e {}).boxed();

    let health = client.call(Method::GET, "/health", empty(), None).await?;
    assert_eq!(health.status(), StatusCode::OK, "the app's own route");
    println!("GET /health: {}", health.status());

    // A second node writes and syncs with the mounted one over HTTP.
    let laptop = SyncEngine::in_memory()?;
    let hello = Key::try_from("hello")?;
    laptop.put(&Scope::shared(), &hello, b"from the laptop".to_vec())?;
    while laptop.exchange(&client).await?.has_more {}
    assert_eq!(node.digest()?, laptop.digest()?, "the two nodes converged");
    println!("synced: both nodes hold digest {}", node.digest()?);

    // And the record reads back through the mounted records API.
    let resp = client
        .call(Method::GET, "/v1/records/shared/hello", empty(), None)
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(body.as_ref(), b"from the laptop");
    println!(
        "GET /v1/records/shared/hello: {:?}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let node = Arc::new(SyncEngine::in_memory()?);
    // Open (no tokens) is fine on loopback; elsewhere give `access` a token file
    // (`highwater::http::Access::from_file`).
    let sync = HighwaterService::new(node.clone(), ServerConfig::default());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(run(listener, sync, stopped));
    println!("serving on http://{addr} (/health by the app, /v1/* by highwater)");

    let checked = self_check(addr, &node).await;
    stop.send_replace(true);
    server.await?;
    checked?;
    println!("self-check passed");
    Ok(())
}
