//! A streamed push across a slow link, measured (issue 19; docs/performance.md): a device
//! with `N` local records (redb, in a temporary directory) pushes them to an empty hub served
//! over HTTP on loopback, through the bench's delaying relay (`benches/e2e/relay.rs`, 25 ms
//! each way: a 50 ms round trip), once with the default frame budget (streamed) and once
//! with `push_frames` = 0 (a round per page), alternately, `RUNS` times each.
//!
//! ```text
//! cargo run --release --example push_wan -- [N (default 100000)] [RUNS (default 3)]
//! ```
//!
//! Each run prints the rounds, seconds and records per second, and checks that the hub ends
//! with the device's digest and watermarks.

#[path = "../benches/e2e/relay.rs"]
mod relay;

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use highwater::http::{HttpTransport, ServerConfig};
use highwater::{EngineConfig, ExchangeOptions, Key, Op, Scope, SyncEngine};

type Result<T = ()> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let runs: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut figures: Vec<(u32, f64)> = Vec::new();
    for run in 0..runs {
        for frames in [EngineConfig::default().push_frames, 0] {
            let (rounds, secs) = runtime.block_on(push(n, frames))?;
            println!(
                "run {run} push_frames {frames:>3}: {rounds:>4} rounds, {secs:6.2} s, {:>8.0} records/s",
                n as f64 / secs
            );
            figures.push((frames, secs));
        }
    }
    for frames in [EngineConfig::default().push_frames, 0] {
        let mut secs: Vec<f64> = (figures.iter())
            .filter(|(f, _)| *f == frames)
            .map(|(_, s)| *s)
            .collect();
        secs.sort_by(f64::total_cmp);
        let median = secs[secs.len() / 2];
        println!(
            "push_frames {frames:>3}: median {median:.2} s ({:.2}-{:.2}), {:.0} records/s",
            secs[0],
            secs[secs.len() - 1],
            n as f64 / median
        );
    }
    Ok(())
}

/// One push of `n` records through the relay with a frame budget of `frames`: the rounds it
/// took (the first, which ships nothing, included) and the seconds.
async fn push(n: usize, frames: u32) -> Result<(usize, f64)> {
    let dir = tempfile::tempdir()?;
    let device = SyncEngine::open_with(
        dir.path().join("device"),
        EngineConfig {
            push_frames: frames,
            ..EngineConfig::default()
        },
    )?;
    let scope = Scope::shared();
    let keys: Vec<usize> = (0..n).collect();
    for chunk in keys.chunks(10_000) {
        device.write_batch(chunk.iter().map(|i| {
            let key = Key::try_from(format!("k{i:08}").as_str()).expect("a valid key");
            let value = vec![b'v'; 100];
            (scope.clone(), key, Op::Put { value, blob: None })
        }))?;
    }
    let hub = Arc::new(SyncEngine::open(dir.path().join("hub"))?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    let served = tokio::spawn(highwater::http::serve(
        hub.clone(),
        listener,
        ServerConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let relayed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", relayed.local_addr()?);
    let link = relay::Link {
        delay: Duration::from_millis(25),
        rate: None,
    };
    debug_assert_eq!(link.round_trip(), Duration::from_millis(50));
    let relay = tokio::spawn(relay::run(relayed, upstream, link, std::future::pending()));
    let client = HttpTransport::new(&url, None)?;
    let started = Instant::now();
    let mut rounds = 1;
    while device
        .exchange_with(&client, &ExchangeOptions::default())
        .await?
        .has_more
    {
        rounds += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    relay.abort();
    let _ = stop.send(());
    served.await??;
    if hub.digest()? != device.digest()? || hub.watermarks()? != device.watermarks()? {
        return Err("the hub did not end with the device's state".into());
    }
    Ok((rounds, secs))
}
