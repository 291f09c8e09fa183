//! The round's store work runs off the async runtime's threads: a timer on the same
//! single-threaded runtime keeps firing while a round applies a 100 000-version page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use highwater::engine::EngineConfig;
use highwater::{ExchangeOptions, InProcess, Key, Op, Scope, SyncEngine};

const VERSIONS: usize = 100_000;

fn config() -> EngineConfig {
    EngineConfig {
        max_page_limit: VERSIONS,
        page_bytes: highwater::engine::MAX_PAGE_BYTES,
        ..EngineConfig::default()
    }
}

/// The longest gap between the ticks of a 1 ms timer while `work` runs on the same
/// current-thread runtime, and how long `work` took.
async fn longest_gap<F: std::future::Future>(work: F) -> (F::Output, Duration, Duration) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let ticker = tokio::spawn(async move {
        let mut last = Instant::now();
        let mut longest = Duration::ZERO;
        loop {
            let stop = tokio::select! {
                _ = &mut stopped => true,
                () = tokio::time::sleep(Duration::from_millis(1)) => false,
            };
            // Every wake-up counts, the last one too: a stalled thread shows as the gap
            // before whichever wake-up comes first after it.
            let now = Instant::now();
            longest = longest.max(now - last);
            last = now;
            if stop {
                return longest;
            }
        }
    });
    // Let the ticker start before the work does.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let started = Instant::now();
    let out = work.await;
    let took = started.elapsed();
    let _ = stop.send(());
    let gap = ticker.await.expect("the ticker does not panic");
    (out, gap, took)
}

#[tokio::test(flavor = "current_thread")]
async fn a_timer_keeps_firing_while_a_round_applies_a_large_page(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let hub = Arc::new(SyncEngine::open_with(dir.path().join("hub"), config())?);
    let scope = Scope::shared();
    let value = vec![7u8; 100];
    let ops = (0..VERSIONS).map(|i| {
        let key = Key::try_from(format!("key-{i:06}").as_str()).expect("a short key");
        let op = Op::Put {
            value: value.clone(),
            blob: None,
        };
        (scope.clone(), key, op)
    });
    hub.write_batch(ops)?;
    let device = SyncEngine::open_with(dir.path().join("device"), config())?;
    let link = InProcess::new(hub.clone());
    let options = ExchangeOptions {
        page_limit: Some(VERSIONS),
        ..ExchangeOptions::default()
    };

    let (outcome, gap, took) = longest_gap(device.exchange_with(&link, &options)).await;
    let outcome = outcome?;
    assert_eq!(outcome.received, VERSIONS, "one page carries every version");
    assert_eq!(device.digest()?, hub.digest()?);
    println!("round: {took:?}, longest gap between 1 ms ticks: {gap:?}");
    // The round's planning, codec and commit take hundreds of milliseconds; had any of it
    // run on the runtime's one thread, the timer would have stalled as long.
    assert!(
        took > Duration::from_millis(200),
        "the round ({took:?}) is too quick to show anything"
    );
    assert!(
        gap < Duration::from_millis(50) && gap * 4 < took,
        "the timer stalled for {gap:?} during a round of {took:?}"
    );
    Ok(())
}
