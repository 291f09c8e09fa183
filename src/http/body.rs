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

/// What a [`ChannelReader`] receives: a chunk of the body (`Some`), the body's end
/// (`None`), or why it failed.
///
/// IMPORTANT: the end is explicit. A channel closed without it (the pump was dropped with
/// its request, or stopped on an error it could not deliver) reads as an error, never as the
/// end of the body, so a body cut off midway cannot be stored as if it were whole.
pub type Piece = io::Result<Option<Bytes>>;

/// Pumps an async body into a channel read by a [`ChannelReader`] on a blocking thread.
/// Returns how the body ended: `Ok` once fully sent (or the reader stopped wanting it), or
/// why it stopped.
pub async fn pump_body<B>(
    mut body: B,
    tx: mpsc::Sender<Piece>,
    limit: u64,
    idle: Duration,
) -> Result<(), BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut total = 0u64;
    let fail = |tx: &mpsc::Sender<Piece>, e: BodyError| {
        let kind = match e {
            BodyError::TooLarge => io::ErrorKind::FileTooLarge,
            BodyError::Timeout => io::ErrorKind::TimedOut,
            BodyError::Broken(_) => io::ErrorKind::ConnectionAborted,
        };
        // If the channel is full or the reader gone, the reader still fails: the channel
        // closes without an end.
        let _ = tx.try_send(Err(io::Error::new(kind, "request body failed")));
        Err(e)
    };
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return fail(&tx, BodyError::Timeout),
            Ok(None) => None,
            Ok(Some(Err(e))) => return fail(&tx, BodyError::Broken(e.to_string())),
            Ok(Some(Ok(f))) => Some(f),
        };
        let Some(frame) = frame else {
            // The reader may have stopped already; then it needs no end.
            let _ = tx.send(Ok(None)).await;
            return Ok(());
        };
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > limit {
                return fail(&tx, BodyError::TooLarge);
            }
            if tx.send(Ok(Some(data))).await.is_err() {
                // The reader stopped (it failed, a full disk say, or has all it wanted).
                drain(body, DRAIN_LIMIT, idle).await;
                return Ok(());
            }
        }
    }
}

/// How much of a request body the server reads and discards after its handler stopped
/// wanting it: before answering (a blob upload), or while the answer goes out (a streamed
/// push, [`Lingering`]).
pub const DRAIN_LIMIT: u64 = 16 << 20;

/// Reads and discards up to `limit` more bytes of `body` (each frame within `idle`): a
/// server that answers while the client is still sending, and closes, leaves the client
/// with a broken pipe instead of the answer (a 507 for a full disk, say). A client with
/// more than `limit` left still sees the connection close.
async fn drain<B>(mut body: B, limit: u64, idle: Duration)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut drained = 0u64;
    while drained <= limit {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    drained += data.len() as u64;
                }
            }
            _ => return,
        }
    }
}

/// A request body that, dropped before its end, reads and discards the rest in a task of its
/// own ([`drain`], up to [`DRAIN_LIMIT`] bytes, each frame within `idle`), so a handler can
/// answer early (a refusal, an answer that takes nothing of the rest) and the client, still
/// sending, reads that answer instead of a broken pipe.
///
/// This works because hyper's HTTP/1 server keeps reading a request's body for as long as
/// the body is alive and polled, even once the response went out: the connection closes (or
/// is kept alive) only when the draining task has read the body's end or dropped it. Without
/// a runtime, or set not to `linger`, the rest is dropped as before.
pub struct Lingering<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    /// `None` once dropped into a draining task.
    inner: Option<B>,
    /// Set when the body ended (or broke): nothing is left to drain.
    ended: bool,
    /// The idle time allowed per frame while draining; `None`: do not linger.
    linger: Option<Duration>,
}

impl<B> Lingering<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    /// Wraps `inner`; dropped before its end, it is drained if `linger` gives the idle time
    /// allowed for each frame.
    pub fn new(inner: B, linger: Option<Duration>) -> Lingering<B> {
        Lingering {
            inner: Some(inner),
            ended: false,
            linger,
        }
    }
}

impl<B> Body for Lingering<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B> Drop for Lingering<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    fn drop(&mut self) {
        let (Some(inner), Some(idle)) = (self.inner.take(), self.linger) else {
            return;
        };
        if self.ended || inner.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(inner, DRAIN_LIMIT, idle));
        }
    }
}

/// A blocking `Read` over chunks sent from an async task ([`pump_body`]). Must not be read
/// on a runtime thread (it blocks): use it inside `spawn_blocking`.
pub struct ChannelReader {
    rx: mpsc::Receiver<Piece>,
    current: Bytes,
    ended: bool,
}

impl ChannelReader {
    /// A reader and the sender feeding it.
    pub fn new() -> (mpsc::Sender<Piece>, ChannelReader) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        (
            tx,
            ChannelReader {
                rx,
                current: Bytes::new(),
                ended: false,
            },
        )
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "request body cut off",
                    ))
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) => self.ended = true,
                Some(Ok(Some(b))) => self.current = b,
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

/// A body of unknown length fed through `rx` (sent chunked); an error ends it broken off.
pub fn channel_body(rx: mpsc::Receiver<io::Result<Bytes>>) -> HttpBody {
    BoxBody::new(ChannelBody {
        rx,
        remaining: None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(mut reader: ChannelReader) -> io::Result<Vec<u8>> {
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        })
        .await
        .expect("the reader does not panic")
    }

    #[tokio::test]
    async fn a_whole_body_reads_to_its_end() {
        let (tx, reader) = ChannelReader::new();
        let body = Full::new(Bytes::from_static(b"all of it"));
        let pumped = pump_body(body, tx, 100, Duration::from_secs(5)).await;
        assert!(pumped.is_ok());
        assert_eq!(read_all(reader).await.unwrap(), b"all of it");
    }

    #[tokio::test]
    async fn a_body_cut_off_is_an_error_not_an_end() {
        // The pump went away after one chunk (its request was dropped): the reader must
        // not take what it got for the whole body.
        let (tx, reader) = ChannelReader::new();
        tx.send(Ok(Some(Bytes::from_static(b"half"))))
            .await
            .unwrap();
        drop(tx);
        let err = read_all(reader).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A body fed through a channel of one chunk: its sender gets further only while
    /// something reads the body.
    fn fed() -> (
        mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
        impl Body<Data = Bytes, Error = io::Error> + Send + Unpin + 'static,
    ) {
        let (tx, rx) = mpsc::channel(1);
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        (tx, http_body_util::StreamBody::new(Box::pin(chunks)))
    }

    #[tokio::test]
    async fn a_lingering_body_dropped_before_its_end_is_read_on_behind() {
        let chunk = || Ok(Frame::data(Bytes::from_static(b"chunk")));
        for linger in [true, false] {
            let (tx, body) = fed();
            let mut body = Lingering::new(body, linger.then_some(Duration::from_secs(5)));
            tx.send(chunk()).await.unwrap();
            assert!(body.frame().await.is_some_and(|f| f.is_ok()));
            drop(body);
            // Ten more chunks through a channel of one: only if the rest is read.
            let rest = async {
                for _ in 0..10 {
                    if tx.send(chunk()).await.is_err() {
                        return false;
                    }
                }
                true
            };
            let read = tokio::time::timeout(Duration::from_secs(5), rest).await;
            assert_eq!(read.unwrap_or(false), linger, "linger: {linger}");
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_an_error_even_with_the_channel_full() {
        // Nobody reads while the pump runs, so the channel is full when the limit is
        // passed and the error cannot be queued.
        let (tx, reader) = ChannelReader::new();
        let chunks: Vec<Result<Frame<Bytes>, io::Error>> = (0..CHANNEL_CHUNKS + 2)
            .map(|_| Ok(Frame::data(Bytes::from_static(b"x"))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let limit = CHANNEL_CHUNKS as u64;
        let pumped = tokio::spawn(pump_body(body, tx, limit, Duration::from_secs(5)));
        let reading = read_all(reader);
        let (pumped, read) = tokio::join!(pumped, reading);
        assert!(matches!(pumped.unwrap(), Err(BodyError::TooLarge)));
        assert!(read.is_err(), "read {:?}", read);
    }
}
