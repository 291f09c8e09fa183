//! Bodies: bounded collection, and bridges between hyper's async bodies and the blocking
//! `Read`/`Write` streams of the blob store and the engine.

use std::io::{self, Read};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// The body type of every response the server writes and every request the client sends.
pub type HttpBody = BoxBody<Bytes, io::Error>;

/// Chunks in flight between a blocking reader or writer and the socket.
const CHANNEL_CHUNKS: usize = 4;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> HttpBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// No body.
pub fn empty() -> HttpBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// It is longer than allowed.
    TooLarge,
    /// No bytes arrived within the read timeout.
    Timeout,
    /// The stream failed.
    Broken(String),
}

/// Reads a whole body, refusing more than `limit` bytes and any wait of more than `idle`
/// for the next chunk.
pub async fn collect_limited<B>(mut body: B, limit: u64, idle: Duration) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut out = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Err(e))) => return Err(BodyError::Broken(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if out.len() as u64 + data.len() as u64 > limit {
                return Err(BodyError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
}

/// Pumps an async body into a channel read by a [`ChannelReader`] on a blocking thread.
/// Returns how the body ended: `Ok` once fully sent, or why it stopped.
pub async fn pump_body<B>(
    mut body: B,
    tx: mpsc::Sender<io::Result<Bytes>>,
    limit: u64,
    idle: Duration,
) -> Result<(), BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut total = 0u64;
    let fail = |tx: &mpsc::Sender<io::Result<Bytes>>, e: BodyError| {
        let kind = match e {
            BodyError::TooLarge => io::ErrorKind::FileTooLarge,
            BodyError::Timeout => io::ErrorKind::TimedOut,
            BodyError::Broken(_) => io::ErrorKind::ConnectionAborted,
        };
        // The reader may be gone already; then nobody needs telling.
        let _ = tx.try_send(Err(io::Error::new(kind, "request body failed")));
        Err(e)
    };
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return fail(&tx, BodyError::Timeout),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return fail(&tx, BodyError::Broken(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > limit {
                return fail(&tx, BodyError::TooLarge);
            }
            if tx.send(Ok(data)).await.is_err() {
                // The reader stopped (it failed or has all it wanted).
                return Ok(());
            }
        }
    }
}

/// A blocking `Read` over chunks sent from an async task. Must not be read on a runtime
/// thread (it blocks): use it inside `spawn_blocking`.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    /// A reader and the sender feeding it.
    pub fn new() -> (mpsc::Sender<io::Result<Bytes>>, ChannelReader) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        (
            tx,
            ChannelReader {
                rx,
                current: Bytes::new(),
            },
        )
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.current = b,
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A response body fed from a blocking reader through a channel, with a known length.
pub struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    remaining: Option<u64>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(b))) => {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(b.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Streams `reader` as a body of exactly `len` bytes (or unknown length), reading it on a
/// blocking thread in chunks of `chunk` bytes. A read failure, or a reader that ends early
/// or runs long, ends the body with an error so the peer sees a broken transfer.
pub fn stream_reader(mut reader: Box<dyn Read + Send>, len: Option<u64>, chunk: usize) -> HttpBody {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; chunk];
            let n = match read_full(&mut reader, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            if n == 0 {
                if len.is_some_and(|l| l != sent) {
                    let _ = tx.blocking_send(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "content ended before its length",
                    )));
                }
                return;
            }
            sent += n as u64;
            if len.is_some_and(|l| sent > l) {
                let _ = tx.blocking_send(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "content longer than its length",
                )));
                return;
            }
            buf.truncate(n);
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return; // The peer went away.
            }
        }
    });
    ChannelBody { rx, remaining: len }.boxed()
}

/// Reads until `buf` is full or the reader ends.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
