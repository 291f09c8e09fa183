//! Fetched and uploaded files' names are made durable together, before anything relies on
//! them.
//!
//! A round that fetches files publishes each one with `finish_unsynced` (its bytes are
//! synced, the directory entry that names it not yet) and makes all their names durable
//! with one `sync_names` once they are in; a responder stores each uploaded file the same
//! way, and a page that references a file syncs any name still pending before it commits. The blob store here counts those calls and can refuse
//! `sync_names`, standing for a disk that fails to sync a directory: then no record that
//! counts on an unsynced name may be committed.

mod common;

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use highwater::blob::{BlobError, BlobReader, BlobStore, BlobWriter, MemBlobStore};
use highwater::store::MemStore;
use highwater::{
    BlobRef, Hash, InProcess, Key, ManualTime, Residency, Scope, SyncEngine, Transport,
};

use common::rounds::{config, TestResult};

/// What the wrapped store saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// Blobs finished with `finish_unsynced` whose names no `sync_names` has made durable.
    pending: Mutex<HashSet<Hash>>,
    durable_finishes: AtomicUsize,
    unsynced_finishes: AtomicUsize,
    syncs: AtomicUsize,
    refuse_sync: AtomicBool,
}

/// A memory blob store that tracks which names would survive a crash.
struct Names {
    inner: MemBlobStore,
    seen: Arc<Seen>,
}

impl BlobStore for Names {
    fn contains(&self, hash: &Hash) -> Result<bool, BlobError> {
        self.inner.contains(hash)
    }

    fn open(&self, hash: &Hash) -> Result<Option<BlobReader>, BlobError> {
        self.inner.open(hash)
    }

    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        Ok(Box::new(NamesWriter {
            inner: self.inner.writer()?,
            seen: self.seen.clone(),
        }))
    }

    fn remove(&self, hash: &Hash) -> Result<bool, BlobError> {
        self.inner.remove(hash)
    }

    fn list(&self) -> Result<Vec<(Hash, u64)>, BlobError> {
        self.inner.list()
    }

    fn sync_names(&self) -> Result<(), BlobError> {
        self.seen.syncs.fetch_add(1, Ordering::Relaxed);
        if self.seen.refuse_sync.load(Ordering::Relaxed) {
            return Err(BlobError::Io {
                path: "blobs/ab".into(),
                source: io::Error::other("the directory cannot be synced"),
            });
        }
        self.seen.pending.lock().expect("not poisoned").clear();
        Ok(())
    }
}

struct NamesWriter {
    inner: Box<dyn BlobWriter>,
    seen: Arc<Seen>,
}

impl Write for NamesWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter for NamesWriter {
    fn finish(self: Box<Self>, expected: Option<&BlobRef>) -> Result<BlobRef, BlobError> {
        self.seen.durable_finishes.fetch_add(1, Ordering::Relaxed);
        self.inner.finish(expected)
    }

    fn finish_unsynced(self: Box<Self>, expected: Option<&BlobRef>) -> Result<BlobRef, BlobError> {
        let seen = self.seen.clone();
        let blob = self.inner.finish(expected)?;
        seen.unsynced_finishes.fetch_add(1, Ordering::Relaxed);
        seen.pending.lock().expect("not poisoned").insert(blob.hash);
        Ok(blob)
    }
}

const FILES: u64 = 30;
const FILE_BYTES: usize = 200 << 10;

fn scope() -> Scope {
    Scope::app("files", "docs").expect("a valid scope")
}

fn key(i: u64) -> Key {
    Key::new(format!("file-{i:03}")).expect("a valid key")
}

fn content(i: u64) -> Vec<u8> {
    let mut out = vec![0u8; FILE_BYTES];
    let mut xof = blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .finalize_xof();
    xof.fill(&mut out);
    out
}

/// A hub holding [`FILES`] files, and a device on a [`Names`] blob store.
fn nodes() -> TestResult<(Arc<SyncEngine>, SyncEngine, Arc<Seen>)> {
    let time = ManualTime::at_secs(1_700_000_000);
    let hub = Arc::new(SyncEngine::in_memory_with(config(&time))?);
    for i in 0..FILES {
        hub.put_file_bytes(&scope(), &key(i), b"a file".to_vec(), &content(i))?;
    }
    let seen = Arc::new(Seen::default());
    let blobs = Arc::new(Names {
        inner: MemBlobStore::new(),
        seen: seen.clone(),
    });
    let device = SyncEngine::with_stores(Box::new(MemStore::new()), blobs, config(&time))?;
    Ok((hub, device, seen))
}

/// A device holding [`FILES`] files, and a hub on a [`Names`] blob store it uploads them to.
fn uploading_nodes() -> TestResult<(SyncEngine, Arc<SyncEngine>, Arc<Seen>)> {
    let time = ManualTime::at_secs(1_700_000_000);
    let device = SyncEngine::in_memory_with(config(&time))?;
    for i in 0..FILES {
        device.put_file_bytes(&scope(), &key(i), b"a file".to_vec(), &content(i))?;
    }
    let seen = Arc::new(Seen::default());
    let blobs = Arc::new(Names {
        inner: MemBlobStore::new(),
        seen: seen.clone(),
    });
    let hub = SyncEngine::with_stores(Box::new(MemStore::new()), blobs, config(&time))?;
    Ok((device, Arc::new(hub), seen))
}

/// Every record of the device that is Resident has a durable name.
fn no_record_counts_on_a_pending_name(device: &SyncEngine, seen: &Seen) -> TestResult {
    let pending = seen.pending.lock().expect("not poisoned").clone();
    for i in 0..FILES {
        if device.residency(&scope(), &key(i))? == Residency::Resident {
            let blob = device.get(&scope(), &key(i))?.and_then(|r| r.blob);
            let blob = blob.ok_or("a Resident record without a file")?;
            assert!(
                !pending.contains(&blob.hash),
                "record {i} is stored Resident with a file whose name is not durable"
            );
        }
    }
    Ok(())
}

async fn sync(device: &SyncEngine, hub: &impl Transport) -> highwater::Result<usize> {
    let mut rounds = 0;
    loop {
        rounds += 1;
        if !device.exchange(hub).await?.has_more {
            return Ok(rounds);
        }
    }
}

fn assert_every_file_arrived(device: &SyncEngine) -> TestResult {
    for i in 0..FILES {
        assert_eq!(device.residency(&scope(), &key(i))?, Residency::Resident);
        let (_, mut reader) = device
            .open_file(&scope(), &key(i))?
            .ok_or("a file did not arrive")?;
        let mut got = Vec::new();
        reader.read_to_end(&mut got)?;
        assert!(got == content(i), "file {i} differs");
    }
    Ok(())
}

/// On a multi-threaded runtime (the fetches write on blocking threads): every fetched file
/// is published unsynced, and a handful of `sync_names` calls make them all durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_names_are_synced_together_before_the_commit() -> TestResult {
    let (hub, device, seen) = nodes()?;
    let rounds = sync(&device, &InProcess::new(hub)).await?;
    // One after the fetches and one before the commit of the page that needed them, at
    // most, per round: not one per file.
    synced_together(&device, &seen, 2 * rounds)
}

/// Every file arrived at `receiver`, each finished unsynced, and between 1 and `most` name
/// syncs made them all durable.
fn synced_together(receiver: &SyncEngine, seen: &Seen, most: usize) -> TestResult {
    assert_every_file_arrived(receiver)?;
    assert_eq!(
        seen.unsynced_finishes.load(Ordering::Relaxed),
        FILES as usize
    );
    assert_eq!(seen.durable_finishes.load(Ordering::Relaxed), 0);
    let syncs = seen.syncs.load(Ordering::Relaxed);
    assert!(
        (1..=most).contains(&syncs),
        "{syncs} name syncs for {FILES} files, at most {most} expected"
    );
    assert!(seen.pending.lock().expect("not poisoned").is_empty());
    no_record_counts_on_a_pending_name(receiver, seen)
}

/// A disk that cannot sync the names: the round fails, and no record counting on them is
/// stored; once it can, the next rounds bring everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_cannot_be_synced_hold_back_the_records_that_need_them() -> TestResult {
    let (hub, device, seen) = nodes()?;
    held_back_until_the_names_sync(&device, &device, &InProcess::new(hub), &seen).await
}

/// `device` syncs with `link` while `receiver`'s blob store refuses to sync names: the
/// round fails with the files in but no record counting on them stored; once names sync,
/// the next rounds bring every file.
async fn held_back_until_the_names_sync(
    device: &SyncEngine,
    receiver: &SyncEngine,
    link: &impl Transport,
    seen: &Seen,
) -> TestResult {
    seen.refuse_sync.store(true, Ordering::Relaxed);
    let failed = sync(device, link).await;
    assert!(
        failed.is_err(),
        "the receiver committed without durable names"
    );
    assert!(
        !seen.pending.lock().expect("not poisoned").is_empty(),
        "the files were moved"
    );
    no_record_counts_on_a_pending_name(receiver, seen)?;
    for i in 0..FILES {
        assert_ne!(receiver.residency(&scope(), &key(i))?, Residency::Resident);
    }
    seen.refuse_sync.store(false, Ordering::Relaxed);
    sync(device, link).await?;
    assert_every_file_arrived(receiver)?;
    no_record_counts_on_a_pending_name(receiver, seen)
}

/// Without a runtime (a plain executor) the bytes are written inline, with the same
/// outcome.
#[test]
fn without_a_runtime_the_files_arrive_the_same() -> TestResult {
    let (hub, device, seen) = nodes()?;
    futures_executor::block_on(sync(&device, &InProcess::new(hub)))?;
    assert_every_file_arrived(&device)?;
    assert_eq!(
        seen.unsynced_finishes.load(Ordering::Relaxed),
        FILES as usize
    );
    no_record_counts_on_a_pending_name(&device, &seen)
}

/// A file large enough to be read aside and written through the pipe (over 4 MiB) arrives
/// whole on a multi-threaded runtime, its name synced like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_arrives_whole_through_the_pipe() -> TestResult {
    let (hub, device, seen) = nodes()?;
    let big = Key::new("big")?;
    let mut bytes = vec![0u8; (6 << 20) + 12_345];
    blake3::Hasher::new()
        .update(b"big")
        .finalize_xof()
        .fill(&mut bytes);
    hub.put_file_bytes(&scope(), &big, b"a big file".to_vec(), &bytes)?;
    sync(&device, &InProcess::new(hub)).await?;
    assert_eq!(device.residency(&scope(), &big)?, Residency::Resident);
    let (_, mut reader) = device.open_file(&scope(), &big)?.ok_or("no file")?;
    let mut got = Vec::new();
    reader.read_to_end(&mut got)?;
    assert!(got == bytes, "the big file differs");
    assert!(seen.pending.lock().expect("not poisoned").is_empty());
    Ok(())
}

/// A responder stores each uploaded file unsynced, and the commit of the page that
/// references them makes their names durable together: not one directory sync per file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_names_are_synced_together_before_the_commit() -> TestResult {
    let (device, hub, seen) = uploading_nodes()?;
    let rounds = sync(&device, &InProcess::new(hub.clone())).await?;
    // One before the commit of the page that references them, at most, per round.
    synced_together(&hub, &seen, rounds)
}

/// A responder whose disk cannot sync the uploaded files' names refuses the page that
/// needs them: the round fails and no record counting on them is stored; once it can, the
/// next rounds bring everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_names_that_cannot_be_synced_hold_back_the_records_that_need_them() -> TestResult {
    let (device, hub, seen) = uploading_nodes()?;
    held_back_until_the_names_sync(&device, &hub, &InProcess::new(hub.clone()), &seen).await
}

/// A local write that points at a file a peer uploaded (its page not committed: here, the
/// hub could not sync names) syncs the name first, or writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_pointing_at_an_uploaded_file_syncs_its_name_first() -> TestResult {
    let (device, hub, seen) = uploading_nodes()?;
    seen.refuse_sync.store(true, Ordering::Relaxed);
    assert!(sync(&device, &InProcess::new(hub.clone())).await.is_err());
    let blob = BlobRef {
        hash: Hash::of(&content(0)),
        size: FILE_BYTES as u64,
    };
    assert!(
        seen.pending
            .lock()
            .expect("not poisoned")
            .contains(&blob.hash),
        "the file was uploaded, its name pending"
    );
    let op = || highwater::Op::Put {
        value: b"the hub's own record".to_vec(),
        blob: Some(blob),
    };
    let own = Key::new("hub-own")?;
    assert!(
        hub.write(&scope(), &own, op()).is_err(),
        "a record was written counting on a name that is not durable"
    );
    assert!(hub.get(&scope(), &own)?.is_none());
    seen.refuse_sync.store(false, Ordering::Relaxed);
    hub.write(&scope(), &own, op())?;
    assert!(!seen
        .pending
        .lock()
        .expect("not poisoned")
        .contains(&blob.hash));
    assert_eq!(hub.residency(&scope(), &own)?, Residency::Resident);
    Ok(())
}
