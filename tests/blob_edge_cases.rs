//! Edge cases of the blob rules found in review: a stream blocked on a blob the sender
//! lacks must not keep `has_more` set or starve later streams, and a hostile page carrying
//! one key in two runs must neither panic the receiver nor halt the wrong stream.

use std::sync::Arc;
use std::time::Duration;

use futures_executor::block_on;
use highwater::exchange::{Page, Run};
use highwater::wire::{ExchangeRequest, RequestMarks};
use highwater::{
    BlobRef, EngineConfig, ExchangeOptions, HaltReason, Hash, Hlc, InProcess, Key, ManualTime,
    NodeId, Op, Scope, ScopeFilter, ScopedWatermarks, SyncEngine, Version,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn config(time: &Arc<ManualTime>) -> EngineConfig {
    EngineConfig {
        time: time.clone(),
        ..EngineConfig::default()
    }
}

#[test]
fn a_stream_blocked_on_a_missing_blob_and_cut_by_the_limit_neither_loops_nor_starves() -> TestResult
{
    let time = ManualTime::at_secs(1_700_000_000);
    let a = Arc::new(SyncEngine::in_memory_with(config(&time))?);
    let b = SyncEngine::in_memory_with(config(&time))?;
    let files = Scope::app("files", "docs")?;
    for i in 0..3u8 {
        time.advance(Duration::from_millis(1));
        a.put_file_bytes(&files, &Key::new(format!("f{i}"))?, vec![], &[i; 100])?;
    }
    // The first file's blob is lost on A (deleted on disk): A must not ship that version.
    let first = a
        .get(&files, &Key::try_from("f0")?)?
        .and_then(|r| r.blob)
        .ok_or("no blob")?;
    a.blob_store().remove(&first.hash)?;
    // A stream planned after the blocked one ("app/files/docs" < "shared").
    a.put(&Scope::shared(), &Key::try_from("later")?, b"x".to_vec())?;

    let to_a = InProcess::new(a.clone());
    let options = ExchangeOptions {
        page_limit: Some(1),
        ..ExchangeOptions::default()
    };
    let mut rounds = 0;
    while block_on(b.exchange_with(&to_a, &options))?.has_more {
        rounds += 1;
        assert!(rounds < 50, "has_more never cleared");
    }
    assert!(
        b.get(&Scope::shared(), &Key::try_from("later")?)?.is_some(),
        "a later stream starved"
    );
    assert_eq!(
        b.get(&files, &Key::try_from("f0")?)?,
        None,
        "a version whose blob the sender lacks was shipped"
    );
    assert_eq!(to_a.stats().blob_fetches, 0);
    Ok(())
}

#[test]
fn one_key_in_two_runs_with_and_without_a_missing_blob_halts_only_its_stream() -> TestResult {
    let time = ManualTime::at_secs(1_700_000_000);
    let node = SyncEngine::in_memory_with(config(&time))?;
    let now = 1_700_000_000u64 << 32;
    let (scope, k) = (Scope::shared(), Key::try_from("k")?);
    let id = |b| NodeId::from_bytes([b; 16]).ok_or("zero id");
    let (with_blob, without, sender) = (id(1)?, id(4)?, id(9)?);
    let missing = BlobRef {
        hash: Hash::from_bytes([0xab; 32]),
        size: 3,
    };
    let run = |origin, t, op| Run {
        scope: scope.clone(),
        origin,
        base: None,
        top: Hlc::new(t, origin),
        versions: vec![(
            k.clone(),
            Version {
                hlc: Hlc::new(t, origin),
                op,
            },
        )],
    };
    let page = Page {
        runs: vec![
            run(
                with_blob,
                now - 10,
                Op::Put {
                    value: vec![],
                    blob: Some(missing),
                },
            ),
            run(
                without,
                now - 5,
                Op::Put {
                    value: b"x".to_vec(),
                    blob: None,
                },
            ),
        ],
        more: false,
    };
    let request = ExchangeRequest {
        from: sender,
        scopes: ScopeFilter::All,
        marks: RequestMarks::Full(ScopedWatermarks::default()),
        known: None,
        page,
        limit: 10,
        deferred: vec![],
        ext: Default::default(),
    };
    let response = node.answer(request)?;
    assert_eq!(response.halts.len(), 1, "{:?}", response.halts);
    assert_eq!(response.halts[0].origin, with_blob);
    assert!(
        matches!(response.halts[0].reason, HaltReason::BlobUnavailable { hash } if hash == missing.hash)
    );
    let marks = node.watermarks()?;
    assert_eq!(
        marks.get(&scope, with_blob),
        None,
        "the blob's stream must stop below it"
    );
    assert_eq!(marks.get(&scope, without), Some(Hlc::new(now - 5, without)));
    assert_eq!(node.get(&scope, &k)?.map(|r| r.value), Some(b"x".to_vec()));
    Ok(())
}

/// A peer that streams more bytes than the blob it promised.
struct Oversized {
    inner: InProcess<Arc<SyncEngine>>,
    refused: std::sync::atomic::AtomicBool,
}

impl highwater::Transport for Oversized {
    fn peer_id(&self) -> Option<NodeId> {
        self.inner.peer_id()
    }

    async fn exchange(
        &self,
        request: ExchangeRequest,
    ) -> Result<highwater::wire::ExchangeResponse, highwater::error::TransportError> {
        self.inner.exchange(request).await
    }

    async fn blobs_present(
        &self,
        hashes: Vec<Hash>,
    ) -> Result<Vec<bool>, highwater::error::TransportError> {
        self.inner.blobs_present(hashes).await
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn std::io::Write + Send),
    ) -> Result<(), highwater::error::TransportError> {
        self.inner.fetch_blob(blob, into).await?;
        // A real transport passes the write error on, as the end of the transfer.
        let result = into.write_all(&[0u8; 4096]);
        self.refused
            .store(result.is_err(), std::sync::atomic::Ordering::SeqCst);
        result.map_err(|e| highwater::error::TransportError::BlobTransfer {
            hash: blob.hash,
            reason: e.to_string(),
        })?;
        Ok(())
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn std::io::Read + Send>,
    ) -> Result<(), highwater::error::TransportError> {
        self.inner.push_blob(blob, content).await
    }
}

#[test]
fn a_fetch_that_streams_past_the_promised_size_is_cut_off_and_stores_nothing() -> TestResult {
    let time = ManualTime::at_secs(1_700_000_000);
    let a = Arc::new(SyncEngine::in_memory_with(config(&time))?);
    let b = SyncEngine::in_memory_with(config(&time))?;
    let (scope, key) = (Scope::shared(), Key::try_from("f")?);
    a.put_file_bytes(&scope, &key, "v", &[7u8; 1000])?;
    let blob = a.get(&scope, &key)?.and_then(|r| r.blob).ok_or("no blob")?;

    let to_a = Oversized {
        inner: InProcess::new(a.clone()),
        refused: Default::default(),
    };
    let outcome = block_on(b.exchange(&to_a))?;
    assert!(
        to_a.refused.load(std::sync::atomic::Ordering::SeqCst),
        "the extra bytes were accepted"
    );
    assert!(!b.blob_store().contains(&blob.hash)?);
    assert_eq!(b.residency(&scope, &key)?, highwater::Residency::Staged);
    assert!(outcome
        .halts
        .iter()
        .any(|h| matches!(h.reason, HaltReason::BlobUnavailable { hash } if hash == blob.hash)));
    Ok(())
}
