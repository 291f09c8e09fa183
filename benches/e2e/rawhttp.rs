//! The raw loopback HTTP limit: a minimal hyper 1 server and client, each on its own
//! current-thread tokio runtime (on 2 cores these answer small sequential requests several
//! times faster than a multi-thread runtime). It measures the throughput of one large
//! streamed response body and the round trip of small requests, the ceilings of highwater's
//! blob transfers and rounds over HTTP.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::measure::Summary;
use crate::report::{Row, Unit};
use crate::Result;

/// Bytes per frame of the streamed body, as `blob::CHUNK`.
const CHUNK: usize = 256 << 10;

/// Bytes of a small request's and response's bodies.
const SMALL: usize = 64;

/// A body of `left` bytes sent as slices of one chunk.
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

type ServerBody = http_body_util::Either<Repeat, Full<Bytes>>;

/// `GET /stream/N` answers N bytes; anything else answers [`SMALL`] bytes.
async fn handle(req: Request<Incoming>) -> std::result::Result<Response<ServerBody>, Infallible> {
    let stream = req
        .uri()
        .path()
        .strip_prefix("/stream/")
        .and_then(|n| n.parse::<u64>().ok());
    // Read the request body, as a server of uploads would.
    let _ = req.into_body().collect().await;
    let body = match stream {
        Some(left) => http_body_util::Either::Left(Repeat {
            chunk: Bytes::from(vec![0x5a; CHUNK]),
            left,
        }),
        None => http_body_util::Either::Right(Full::new(Bytes::from_static(&[0x5a; SMALL]))),
    };
    Ok(Response::new(body))
}

/// A server on 127.0.0.1 in its own thread until the returned sender is dropped or used.
fn start_server() -> Result<(
    std::net::SocketAddr,
    oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { break };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(handle);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                }
            }
        });
    });
    Ok((addr, stop, thread))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole response body; returns its length.
async fn fetch(sender: &mut Sender, method: &str, path: &str, body: Bytes) -> Result<u64> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .body(Full::new(body))?;
    let mut resp = sender.send_request(req).await?.into_body();
    let mut n = 0u64;
    while let Some(frame) = resp.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
        }
    }
    Ok(n)
}

/// The raw HTTP limits: streamed body throughput (`runs` times `stream` bytes) and the
/// round trip of `requests` small sequential requests on one connection.
pub fn limits(stream: u64, requests: usize, runs: usize) -> Result<Vec<Row>> {
    let (addr, stop, server) = start_server()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let measured = rt.block_on(async {
        let mut sender = connect(addr).await?;
        let mut rates = Vec::new();
        for _ in 0..runs {
            let path = format!("/stream/{stream}");
            let started = std::time::Instant::now();
            let got = fetch(&mut sender, "GET", &path, Bytes::new()).await?;
            let secs = started.elapsed().as_secs_f64();
            if got != stream {
                return Err(format!("the raw stream moved {got} bytes, expected {stream}").into());
            }
            rates.push(stream as f64 / secs / 1e6);
        }
        let mut rtts = Vec::new();
        for _ in 0..requests {
            let body = Bytes::from_static(&[0xa5; SMALL]);
            let (got, secs) = {
                let started = std::time::Instant::now();
                let got = fetch(&mut sender, "POST", "/small", body).await?;
                (got, started.elapsed().as_secs_f64())
            };
            if got != SMALL as u64 {
                return Err("a small response had the wrong length".into());
            }
            rtts.push(secs);
        }
        Ok::<_, Box<dyn std::error::Error>>((rates, rtts))
    });
    let _ = stop.send(());
    server.join().map_err(|_| "the raw HTTP server panicked")?;
    let (rates, rtts) = measured?;
    Ok(vec![
        Row::new(
            format!(
                "limit: raw loopback HTTP (hyper), one {} MiB body",
                stream >> 20
            ),
            "MB/s",
            Unit::MbPerSec,
            Summary::of(&rates),
        )
        .key("raw HTTP stream"),
        Row::new(
            format!("limit: raw loopback HTTP (hyper), {requests} small requests"),
            "round trip",
            Unit::Millis,
            Summary::of(&rtts),
        )
        .key("raw HTTP round trip"),
    ])
}
