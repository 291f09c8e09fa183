//! What the streamed pull and push tests share: a transport that cannot stream, and a
//! loopback server that counts requests and can answer 404 on an endpoint, as an older
//! build does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use highwater::error::TransportError;
use highwater::http::HighwaterService;
use highwater::wire::{ExchangeRequest, ExchangeResponse};
use highwater::{EngineConfig, InProcess, ManualTime, Scope, SyncEngine, Transport};

use super::rounds::{config, TestResult};

/// A transport with the trait's defaults for `pull` and `push` (Unsupported): the engine
/// syncs in rounds over it.
pub struct Plain(pub InProcess<Arc<SyncEngine>>);

impl Transport for Plain {
    fn peer_id(&self) -> Option<highwater::NodeId> {
        self.0.peer_id()
    }
    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        self.0.exchange(request).await
    }
    async fn blobs_present(
        &self,
        hashes: Vec<highwater::Hash>,
    ) -> Result<Vec<bool>, TransportError> {
        self.0.blobs_present(hashes).await
    }
    async fn fetch_blob(
        &self,
        blob: highwater::BlobRef,
        into: &mut (dyn std::io::Write + Send),
    ) -> Result<(), TransportError> {
        self.0.fetch_blob(blob, into).await
    }
    async fn push_blob(
        &self,
        blob: highwater::BlobRef,
        content: Box<dyn std::io::Read + Send>,
    ) -> Result<(), TransportError> {
        self.0.push_blob(blob, content).await
    }
}

/// Serves `sync` over HTTP on loopback with every request counted; a request for `missing`
/// (say `/v1/sync/pull`) is answered 404, as a build without that endpoint does; such a
/// build without `/v1/sync/push` does not offer pushes either (no
/// [`highwater::http::HEADER_PUSH`] on its answers). Returns the URL and the count.
pub async fn serve_counted(
    sync: HighwaterService,
    missing: Option<&'static str>,
) -> TestResult<(String, Arc<AtomicUsize>)> {
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (sync, counted) = (sync.clone(), counted.clone());
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (sync, counted) = (sync.clone(), counted.clone());
                    async move {
                        counted.fetch_add(1, Ordering::Relaxed);
                        if missing == Some(req.uri().path()) {
                            let body =
                                http_body_util::Full::new(bytes::Bytes::from("no such endpoint"))
                                    .map_err(|e| match e {})
                                    .boxed();
                            let mut resp = hyper::Response::new(body);
                            *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let mut resp = sync.handle(req).await;
                        if missing == Some("/v1/sync/push") {
                            resp.headers_mut().remove(highwater::http::HEADER_PUSH);
                        }
                        Ok(resp)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((url, requests))
}

/// The two scopes the streamed push tests write into.
pub fn push_scopes() -> TestResult<[Scope; 2]> {
    Ok([Scope::app("notes", "items")?, Scope::shared()])
}

/// An in-memory node on the manual clock `time` that opens (and takes) streamed pushes of
/// up to `push_frames` frames (0: none).
pub fn push_node(time: &Arc<ManualTime>, push_frames: u32) -> TestResult<Arc<SyncEngine>> {
    Ok(Arc::new(SyncEngine::in_memory_with(EngineConfig {
        push_frames,
        ..config(time)
    })?))
}
