//! A delaying TCP relay: the bench's stand-in for a wide-area link (the development kernel
//! has no netem, so `tc` cannot add the delay).
//!
//! For every accepted connection the relay connects to `upstream` and pipes both directions.
//! Each direction is a delay line: a chunk is stamped when it is read and written out at
//! stamp + `delay`, in order, so a round trip costs at least twice the delay while the
//! throughput is not capped by it (many chunks are in flight at once). An optional token
//! bucket caps each direction's rate. At most [`MAX_IN_FLIGHT`] bytes wait per direction:
//! when they are full the relay stops reading, and TCP's flow control slows the sender. An
//! end of stream is passed on (the write side shut down) once the chunks before it are out.
//!
//! The relay terminates TCP on both sides, so a connection's handshake costs no delayed
//! round trip (the client's connect is answered by the relay at once): only data is delayed.
//!
//! This file is also compiled into `tests/bench_wan_relay.rs`, which checks the delay and the
//! bytes; it uses nothing of the bench crate.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Bytes that may wait in one direction of one connection before the relay stops reading.
pub const MAX_IN_FLIGHT: usize = 8 << 20;

/// The largest chunk read at once.
const CHUNK: usize = 64 << 10;

/// What the relay does to each direction of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// How long each chunk is held (one way).
    pub delay: Duration,
    /// A cap on each direction's rate in bytes per second (`None`: no cap).
    pub rate: Option<u64>,
}

impl Link {
    /// The round trip the relay adds: the delay of both directions.
    pub fn round_trip(&self) -> Duration {
        2 * self.delay
    }
}

/// Relays every connection accepted on `listener` to `upstream` until `shutdown` completes
/// (connections in progress are dropped with the runtime).
///
/// # Errors
/// Accepting failed. A failed connection (upstream refused, a reset) ends that connection
/// only.
pub async fn run(
    listener: TcpListener,
    upstream: SocketAddr,
    link: Link,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let client = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted?.0,
        };
        tokio::spawn(async move {
            if let Err(e) = connection(client, upstream, link).await {
                eprintln!("relay: a connection to {upstream} ended: {e}");
            }
        });
    }
}

/// Pipes one accepted connection to a new one to `upstream`, both ways, until both
/// directions have ended.
async fn connection(client: TcpStream, upstream: SocketAddr, link: Link) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::try_join!(
        pipe(client_read, server_write, link),
        pipe(server_read, client_write, link)
    )?;
    Ok(())
}

/// A chunk on its way: the instant it is due, its bytes, and its share of the budget.
type Pending = (Instant, Vec<u8>, OwnedSemaphorePermit);

/// One direction: reads chunks into the delay line and writes each out when it is due, then
/// shuts the write side down after the end of stream. Returns the bytes relayed.
async fn pipe(from: OwnedReadHalf, to: OwnedWriteHalf, link: Link) -> io::Result<u64> {
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // The budget bounds the bytes queued, so the channel need not bound the chunks.
    let (tx, rx) = mpsc::unbounded_channel::<Pending>();
    let ((), relayed) = tokio::try_join!(admit(from, tx, budget, link), release(rx, to, link))?;
    Ok(relayed)
}

/// Reads chunks as they arrive and queues each, stamped with its due time, once the budget
/// has room for it. Ends (closing the queue) at the end of stream.
async fn admit(
    mut from: OwnedReadHalf,
    queue: mpsc::UnboundedSender<Pending>,
    budget: Arc<Semaphore>,
    link: Link,
) -> io::Result<()> {
    loop {
        let mut buf = vec![0; CHUNK];
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let due = Instant::now() + link.delay;
        buf.truncate(n);
        let permits = u32::try_from(n).expect("a chunk is at most CHUNK bytes");
        // IMPORTANT: nothing more is read until the chunk fits: this is the backpressure.
        let permit = budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .expect("the budget is never closed");
        if queue.send((due, buf, permit)).is_err() {
            // The writing half failed; its error ends the pipe.
            return Ok(());
        }
    }
}

/// Writes each queued chunk when it is due (and the rate allows), in order; shuts the write
/// side down once the queue is closed and empty. Returns the bytes written.
async fn release(
    mut queue: mpsc::UnboundedReceiver<Pending>,
    mut to: OwnedWriteHalf,
    link: Link,
) -> io::Result<u64> {
    let mut bucket = link.rate.map(TokenBucket::new);
    let mut relayed = 0u64;
    while let Some((due, bytes, permit)) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        if let Some(bucket) = bucket.as_mut() {
            bucket.take(bytes.len()).await;
        }
        to.write_all(&bytes).await?;
        relayed += bytes.len() as u64;
        drop(permit);
    }
    to.shutdown().await?;
    Ok(relayed)
}

/// A token bucket of `rate` bytes per second holding at most a tenth of a second's worth
/// (and at least one chunk): a chunk larger than the tokens held waits for the rest.
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let capacity = (rate / 10.0).max(CHUNK as f64);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            refilled: Instant::now(),
        }
    }

    /// Waits until `n` bytes may pass, and takes them.
    async fn take(&mut self, n: usize) {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.capacity) - n as f64;
        self.refilled = now;
        if self.tokens < 0.0 {
            // The debt is paid by waiting; the refill after the wait brings it back to zero.
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}
