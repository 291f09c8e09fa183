//! The open connections of one [`serve`](super::serve): a cap on their number, and which one
//! gives way when a new one arrives at the cap; what a connection does that counts as
//! activity; and the write timeout of its socket.
//!
//! # Making room
//!
//! A connection is *busy* from the moment hyper hands one of its requests to the service until
//! that request's response body is dropped (written out, or abandoned), and *idle* otherwise:
//! waiting for its first request, between requests when kept alive, or receiving headers
//! (a slowloris client trickling a header is idle). At the cap, a new connection takes the
//! place of the idle connection that was active least recently (accepted, or last started or
//! finished a request). Closing an idle connection loses nothing: HTTP/1.1 lets a server close
//! a connection that has no request in progress at any time, and a client retries a request
//! that found its kept-alive connection closed. Only when every connection is busy is the new
//! one shed (a minimal 503 and a close, see [`shed`]).
//!
//! So a client without a valid token, which cannot keep a request in progress (it is answered
//! 401 at once), can hold at most the idle connections, and those give way to the next
//! connection; the accept loop only ever does a bounded scan under a short lock, never waits.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::http::body::HttpBody;
use crate::http::metrics::Metrics;
use crate::poison::lock;

/// The connections of one server.
pub(super) struct Connections {
    limit: usize,
    metrics: Arc<Metrics>,
    epoch: Instant,
    next_id: AtomicU64,
    /// Admitted and not evicted. IMPORTANT: a connection leaves this map when it is evicted,
    /// before its task has closed it, so the cap counts the connections that will stay open.
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

/// What the accept loop knows of one connection.
pub(super) struct Activity {
    epoch: Instant,
    /// Requests in progress (at most one on HTTP/1.1, but counted, not assumed).
    busy: AtomicUsize,
    /// When it was accepted or last started or finished a request, in milliseconds since
    /// `epoch`.
    last: AtomicU64,
    /// Told to close, to make room for a new connection.
    evicted: Notify,
}

impl Activity {
    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Completes when the accept loop chose this connection to make room.
    pub(super) async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

/// A connection's place among the open ones; it leaves when dropped.
pub(super) struct Slot {
    connections: Arc<Connections>,
    id: u64,
    activity: Arc<Activity>,
}

impl Slot {
    pub(super) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.connections.open).remove(&self.id);
        self.connections.metrics.connection_closed();
    }
}

/// What became of a connection offered to [`Connections::admit`].
pub(super) enum Admission {
    /// It may be served.
    Admitted {
        /// Its place.
        slot: Slot,
        /// Whether an idle connection was evicted to make room.
        evicted: bool,
    },
    /// Every connection is busy: it must be shed.
    Full,
}

impl Connections {
    /// Room for `limit` connections (at least one), counted in `metrics`.
    pub(super) fn new(limit: usize, metrics: Arc<Metrics>) -> Arc<Connections> {
        Arc::new(Connections {
            limit: limit.max(1),
            metrics,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a new connection: free, or made free by evicting the idle connection that
    /// was active least recently.
    pub(super) fn admit(self: &Arc<Self>) -> Admission {
        let mut open = lock(&self.open);
        let mut evicted = false;
        if open.len() >= self.limit {
            let victim = open
                .iter()
                .filter(|(_, a)| a.busy.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, a)| a.last.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            let Some(victim) = victim else {
                self.metrics.connection_shed();
                return Admission::Full;
            };
            if let Some(activity) = open.remove(&victim) {
                // `notify_one` keeps the wake-up if its task is not waiting yet.
                activity.evicted.notify_one();
                self.metrics.connection_evicted();
                evicted = true;
            }
        }
        self.metrics.connection_opened();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            epoch: self.epoch,
            busy: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            evicted: Notify::new(),
        });
        activity.touch();
        open.insert(id, activity.clone());
        Admission::Admitted {
            slot: Slot {
                connections: self.clone(),
                id,
                activity,
            },
            evicted,
        }
    }
}

/// A request in progress on a connection: from the moment hyper hands it over until its
/// response body is dropped.
pub(super) struct Busy {
    activity: Arc<Activity>,
}

impl Busy {
    pub(super) fn new(activity: Arc<Activity>) -> Busy {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Busy { activity }
    }

    /// `body`, holding this request busy until it is dropped.
    pub(super) fn hold(self, body: HttpBody) -> HttpBody {
        http_body_util::BodyExt::boxed(Held { body, _busy: self })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request busy.
struct Held {
    body: HttpBody,
    _busy: Busy,
}

impl Body for Held {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The answer to a connection shed at the cap, written without reading its request.
fn shed_response() -> Vec<u8> {
    let body =
        r#"{"error":"too many connections in progress: try again shortly","code":"unavailable"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sheds a connection the server has no room for: a minimal 503 if the socket takes it at
/// once (it always can: a new socket's send buffer is empty), then closes it. Never waits,
/// so a flood of connections cannot hold up the accept loop. Over TLS nothing is written (a
/// response would need a handshake first): the connection is closed.
pub(super) fn shed(stream: TcpStream, tls: bool) {
    if !tls {
        let _ = stream.try_write(&shed_response());
    }
    drop(stream);
}

/// A socket whose writes fail once they make no progress for `limit`: a client that stops
/// reading a response (a blob or file download) is dropped instead of holding its
/// connection, and the blocking thread feeding the download, for good.
pub(super) struct WriteTimeout<S> {
    inner: S,
    limit: Duration,
    /// Running while a write waits for the client; reset by any write that completes.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteTimeout<S> {
    pub(super) fn new(inner: S, limit: Duration) -> WriteTimeout<S> {
        WriteTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    /// What a write that returned `polled` means, given how long writes have been stalled.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(admission: Admission) -> (Slot, bool) {
        match admission {
            Admission::Admitted { slot, evicted } => (slot, evicted),
            Admission::Full => panic!("expected room"),
        }
    }

    #[tokio::test]
    async fn at_the_cap_the_least_recently_active_idle_connection_gives_way() {
        let connections = Connections::new(3, Arc::new(Metrics::new()));
        let (a, _) = admitted(connections.admit());
        let (b, _) = admitted(connections.admit());
        let (c, _) = admitted(connections.admit());
        // All accepted within the same millisecond: make the order explicit.
        a.activity.last.store(10, Ordering::Relaxed);
        b.activity.last.store(5, Ordering::Relaxed);
        c.activity.last.store(20, Ordering::Relaxed);
        let busy_b = Busy::new(b.activity.clone());
        b.activity.last.store(5, Ordering::Relaxed);

        // b is the least recently active but busy: a gives way.
        let (d, evicted) = admitted(connections.admit());
        assert!(evicted);
        tokio::time::timeout(Duration::from_secs(1), a.activity.evicted())
            .await
            .expect("a was told to close");
        // a's slot no longer counts, even before its task drops it.
        assert_eq!(lock(&connections.open).len(), 3);
        drop(a);
        assert_eq!(lock(&connections.open).len(), 3);

        // With every connection busy, the next one is shed.
        let busy_c = Busy::new(c.activity.clone());
        let busy_d = Busy::new(d.activity.clone());
        assert!(matches!(connections.admit(), Admission::Full));
        // A request that ends frees its connection for eviction.
        drop(busy_c);
        let (_e, evicted) = admitted(connections.admit());
        assert!(evicted);
        drop((busy_b, busy_d));
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails_after_the_limit() {
        let (mut client, server) = tokio::io::duplex(16);
        let mut timed = WriteTimeout::new(server, Duration::from_millis(50));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The first bytes fit the pipe; then nobody reads.
        timed.write_all(&[1; 16]).await.unwrap();
        let started = Instant::now();
        let err = timed.write_all(&[2; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // A reader that keeps up is never cut off, however long it takes in all.
        let mut timed = WriteTimeout::new(timed.inner, Duration::from_millis(50));
        let mut drained = vec![0; 16];
        client.read_exact(&mut drained).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0; 8];
            while total < 320 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                total += client.read(&mut buf).await.unwrap();
            }
        });
        timed.write_all(&[3; 320]).await.unwrap();
        reader.await.unwrap();
    }
}
