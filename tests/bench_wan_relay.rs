//! The end-to-end benchmark's delaying relay (`benches/e2e/relay.rs`, compiled in here by
//! path): a round trip through it costs at least twice its delay, bytes come out intact and
//! in order both ways with the ends of stream passed on, the delay does not cap the
//! throughput (a delay line, not a delay per chunk), and a rate cap holds.

#[path = "../benches/e2e/relay.rs"]
mod relay;

use std::error::Error;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use relay::Link;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

const DELAY: Duration = Duration::from_millis(25);

/// An upstream on 127.0.0.1 that echoes every connection's bytes and shuts its write side
/// down after the client's end of stream.
async fn echo_server() -> TestResult<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let (mut read, mut write) = stream.into_split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

/// A relay on 127.0.0.1 in front of `upstream`, until the returned sender is dropped.
async fn relay_to(
    upstream: SocketAddr,
    link: Link,
) -> TestResult<(SocketAddr, oneshot::Sender<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(relay::run(listener, upstream, link, async move {
        let _ = stopped.await;
    }));
    Ok((addr, stop))
}

fn seeded() -> rand::rngs::StdRng {
    let seed = rand::rng().random::<u64>();
    println!("seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[tokio::test]
async fn a_round_trip_costs_at_least_twice_the_delay() -> TestResult {
    let link = Link {
        delay: DELAY,
        rate: None,
    };
    let (addr, _stop) = relay_to(echo_server().await?, link).await?;
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    for i in 0..5u8 {
        let started = Instant::now();
        stream.write_all(&[i]).await?;
        stream.read_exact(&mut byte).await?;
        let took = started.elapsed();
        assert_eq!(byte[0], i, "ping {i} came back changed");
        assert!(
            took >= link.round_trip(),
            "ping {i} took {took:?}, less than the round trip {:?}",
            link.round_trip()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_large_payload_comes_back_intact_in_order_and_not_capped_by_the_delay() -> TestResult {
    // Four times the relay's budget per direction, so the backpressure is exercised.
    let mut payload = vec![0u8; 4 * relay::MAX_IN_FLIGHT];
    seeded().fill_bytes(&mut payload);
    let link = Link {
        delay: DELAY,
        rate: None,
    };
    let (addr, _stop) = relay_to(echo_server().await?, link).await?;
    let stream = TcpStream::connect(addr).await?;
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await?;
        // The end of stream must reach the echo server through the relay, and its end of
        // stream come back, or the read below never ends.
        write.shutdown().await
    });
    let mut echoed = Vec::with_capacity(payload.len());
    read.read_to_end(&mut echoed).await?;
    writer.await??;
    let took = started.elapsed();
    assert_eq!(echoed.len(), payload.len(), "bytes lost or added");
    assert!(echoed == payload, "bytes changed or reordered");
    // At most 64 KiB per chunk: a relay that held each chunk in turn would need at least
    // 512 x 25 ms = 12.8 s per direction for these 32 MiB.
    assert!(
        took < Duration::from_secs(6),
        "32 MiB both ways took {took:?}: the delay caps the throughput"
    );
    Ok(())
}

#[tokio::test]
async fn a_rate_cap_holds() -> TestResult {
    const RATE: u64 = 4 << 20;
    const BYTES: usize = 2 << 20;
    let link = Link {
        delay: Duration::ZERO,
        rate: Some(RATE),
    };
    let (addr, _stop) = relay_to(echo_server().await?, link).await?;
    let stream = TcpStream::connect(addr).await?;
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        write.write_all(&vec![7u8; BYTES]).await?;
        write.shutdown().await
    });
    let mut echoed = Vec::new();
    read.read_to_end(&mut echoed).await?;
    writer.await??;
    let took = started.elapsed().as_secs_f64();
    assert_eq!(echoed.len(), BYTES);
    // The bucket starts full with a tenth of a second's worth; the rest waits for the rate.
    let least = (BYTES as f64 - RATE as f64 / 10.0) / RATE as f64;
    assert!(
        took >= least,
        "{BYTES} bytes at {RATE} B/s took {took} s, less than {least} s"
    );
    Ok(())
}
