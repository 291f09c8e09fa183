//! The blob store contract (see `highwater::blob`'s module docs), one suite run against
//! every store: round trips, verification against an expected reference (a mismatch stores
//! nothing), unfinished writers leave nothing, content addressing, removal, listing and a
//! failing source. Then the filesystem store's own promises: its layout, the cleanup of
//! interrupted writes, names it does not trust, and persistence across a reopen. A property
//! test checks that any content written in any pieces is named by its hash and size.

mod common;

use std::error::Error;
use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use highwater::blob::{write_blob, BlobError, BlobStore, FsBlobStore, MemBlobStore, CHUNK};
use highwater::{BlobRef, Hash};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

type TestResult = Result<(), Box<dyn Error>>;

/// A store and whatever must outlive it (field order: the store is dropped first).
struct Fixture {
    store: Box<dyn BlobStore>,
    dir: Option<tempfile::TempDir>,
}

impl Fixture {
    /// Every file under the store's directory, blobs and temporary files alike (none for
    /// the in-memory store).
    fn files(&self) -> Result<Vec<PathBuf>, Box<dyn Error>> {
        let mut out = Vec::new();
        if let Some(dir) = &self.dir {
            walk(dir.path(), &mut out)?;
        }
        Ok(out)
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), out)?;
        } else {
            out.push(entry.path());
        }
    }
    Ok(())
}

fn mem() -> Result<Fixture, Box<dyn Error>> {
    Ok(Fixture {
        store: Box::new(MemBlobStore::new()),
        dir: None,
    })
}

fn fs_store() -> Result<Fixture, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = FsBlobStore::open(dir.path().join("blobs"))?;
    Ok(Fixture {
        store: Box::new(store),
        dir: Some(dir),
    })
}

/// A store in a directory shared with other processes, sparing nothing (grace 0), so that
/// the contract's removals hold.
fn shared_fs_store() -> Result<Fixture, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = FsBlobStore::open_shared(dir.path().join("blobs"), Duration::ZERO)?;
    Ok(Fixture {
        store: Box::new(store),
        dir: Some(dir),
    })
}

/// Instantiates every contract case once per store.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod mem_store {
            $(
                #[test]
                fn $case() -> super::TestResult {
                    super::$case(&super::mem()?)
                }
            )*
        }
        mod fs_store {
            $(
                #[test]
                fn $case() -> super::TestResult {
                    super::$case(&super::fs_store()?)
                }
            )*
        }
        mod shared_fs_store {
            $(
                #[test]
                fn $case() -> super::TestResult {
                    super::$case(&super::shared_fs_store()?)
                }
            )*
        }
    };
}

contract!(
    content_round_trips_empty_small_and_multi_chunk,
    finish_with_the_right_ref_succeeds,
    wrong_hash_is_refused_and_nothing_is_stored,
    wrong_size_is_refused_and_nothing_is_stored,
    dropped_writer_leaves_nothing,
    same_content_twice_is_one_blob,
    remove_reports_whether_the_blob_was_there,
    list_returns_exactly_the_stored_blobs,
    failing_source_is_a_source_error_and_stores_nothing,
);

// ---------------------------------------------------------------------------------------
// Helpers

/// More than three chunks, so writes cross every buffer boundary.
const MULTI: usize = 3 * CHUNK + 17;

/// `len` pseudo-random bytes from `seed`.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

fn blob_ref(bytes: &[u8]) -> BlobRef {
    BlobRef {
        hash: Hash::of(bytes),
        size: bytes.len() as u64,
    }
}

/// Writes `bytes` through a writer in one call and finishes it against `expected`.
fn store(
    store: &dyn BlobStore,
    bytes: &[u8],
    expected: Option<&BlobRef>,
) -> Result<BlobRef, BlobError> {
    let mut writer = store.writer()?;
    writer.write_all(bytes).map_err(|source| BlobError::Io {
        path: PathBuf::from("<test writer>"),
        source,
    })?;
    writer.finish(expected)
}

/// The stored bytes of `hash`, checking the size the store reports against them.
fn read_back(store: &dyn BlobStore, hash: &Hash) -> Result<Option<Vec<u8>>, Box<dyn Error>> {
    let Some((size, mut reader)) = store.open(hash)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    assert_eq!(size, bytes.len() as u64, "reported size of {hash}");
    Ok(Some(bytes))
}

fn assert_nothing_stored(fx: &Fixture) -> TestResult {
    assert_eq!(fx.store.list()?, vec![]);
    assert_eq!(fx.files()?, Vec::<PathBuf>::new());
    Ok(())
}

/// A source that yields `good` bytes, then fails.
struct FailingReader {
    good: Cursor<Vec<u8>>,
}

impl Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.good.read(buf)? {
            0 => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "peer went away",
            )),
            n => Ok(n),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Contract cases

fn content_round_trips_empty_small_and_multi_chunk(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    for bytes in [Vec::new(), b"hello".to_vec(), content(MULTI, 1)] {
        let want = blob_ref(&bytes);
        assert!(!s.contains(&want.hash)?);
        assert!(read_back(s, &want.hash)?.is_none());

        assert_eq!(store(s, &bytes, None)?, want);
        assert!(s.contains(&want.hash)?);
        assert_eq!(read_back(s, &want.hash)?, Some(bytes));
    }
    // The same through `write_blob`, which copies in chunks.
    let bytes = content(MULTI, 2);
    let want = blob_ref(&bytes);
    assert_eq!(write_blob(s, &mut Cursor::new(&bytes), None)?, want);
    assert_eq!(read_back(s, &want.hash)?, Some(bytes));
    Ok(())
}

fn finish_with_the_right_ref_succeeds(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    for bytes in [Vec::new(), content(MULTI, 3)] {
        let want = blob_ref(&bytes);
        assert_eq!(store(s, &bytes, Some(&want))?, want);
        assert_eq!(write_blob(s, &mut Cursor::new(&bytes), Some(&want))?, want);
        assert_eq!(read_back(s, &want.hash)?, Some(bytes));
    }
    Ok(())
}

fn wrong_hash_is_refused_and_nothing_is_stored(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    let bytes = content(MULTI, 4);
    let claimed = BlobRef {
        hash: Hash::of(b"something else"),
        size: bytes.len() as u64,
    };
    match store(s, &bytes, Some(&claimed)) {
        Err(BlobError::HashMismatch { expected, actual }) => {
            assert_eq!(expected, claimed.hash);
            assert_eq!(actual, Hash::of(&bytes));
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(!s.contains(&Hash::of(&bytes))?);
    assert!(!s.contains(&claimed.hash)?);
    assert_nothing_stored(fx)
}

fn wrong_size_is_refused_and_nothing_is_stored(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    let bytes = content(MULTI, 5);
    let claimed = BlobRef {
        hash: Hash::of(&bytes),
        size: bytes.len() as u64 + 1,
    };
    match store(s, &bytes, Some(&claimed)) {
        Err(BlobError::SizeMismatch {
            hash,
            expected,
            actual,
        }) => {
            assert_eq!(hash, claimed.hash);
            assert_eq!(expected, claimed.size);
            assert_eq!(actual, bytes.len() as u64);
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    assert!(!s.contains(&claimed.hash)?);
    assert_nothing_stored(fx)
}

fn dropped_writer_leaves_nothing(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    let bytes = content(MULTI, 6);
    let mut writer = s.writer()?;
    writer.write_all(&bytes)?;
    if fx.dir.is_some() {
        assert_eq!(fx.files()?.len(), 1, "the writer's temporary file");
    }
    drop(writer);
    assert!(!s.contains(&Hash::of(&bytes))?);
    assert_nothing_stored(fx)
}

fn same_content_twice_is_one_blob(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    let bytes = content(MULTI, 7);
    let want = blob_ref(&bytes);
    // Two writers of the same content in flight at once, then a third after both.
    let mut first = s.writer()?;
    let mut second = s.writer()?;
    first.write_all(&bytes)?;
    second.write_all(&bytes)?;
    assert_eq!(first.finish(None)?, want);
    assert_eq!(second.finish(Some(&want))?, want);
    assert_eq!(store(s, &bytes, None)?, want);

    assert_eq!(s.list()?, vec![(want.hash, want.size)]);
    assert_eq!(read_back(s, &want.hash)?, Some(bytes));
    if fx.dir.is_some() {
        assert_eq!(fx.files()?.len(), 1, "one file, no temporary left");
    }
    Ok(())
}

fn remove_reports_whether_the_blob_was_there(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    let gone = store(s, b"to be removed", None)?;
    let kept = store(s, b"to be kept", None)?;

    assert!(s.remove(&gone.hash)?);
    assert!(!s.contains(&gone.hash)?);
    assert!(read_back(s, &gone.hash)?.is_none());
    assert!(!s.remove(&gone.hash)?);
    assert!(!s.remove(&Hash::of(b"never stored"))?);

    assert_eq!(s.list()?, vec![(kept.hash, kept.size)]);
    assert_eq!(read_back(s, &kept.hash)?, Some(b"to be kept".to_vec()));
    Ok(())
}

fn list_returns_exactly_the_stored_blobs(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    assert_eq!(s.list()?, vec![]);
    let mut want = Vec::new();
    for bytes in [
        Vec::new(),
        b"x".to_vec(),
        content(CHUNK + 1, 8),
        content(100, 9),
    ] {
        let blob = store(s, &bytes, None)?;
        want.push((blob.hash, blob.size));
    }
    want.sort();
    let mut got = s.list()?;
    got.sort();
    assert_eq!(got, want);
    Ok(())
}

fn failing_source_is_a_source_error_and_stores_nothing(fx: &Fixture) -> TestResult {
    let s = &*fx.store;
    let mut source = FailingReader {
        good: Cursor::new(content(CHUNK + 100, 10)),
    };
    match write_blob(s, &mut source, None) {
        Err(BlobError::Source(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("expected a Source error, got {other:?}"),
    }
    assert_nothing_stored(fx)
}

// ---------------------------------------------------------------------------------------
// Filesystem store only

#[test]
fn fs_blob_lives_at_its_fan_out_path() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("blobs");
    let s = FsBlobStore::open(&store_dir)?;
    let bytes = content(1000, 11);
    let blob = store(&s, &bytes, None)?;

    let hex = blob.hash.to_string();
    let path = store_dir.join(&hex[..2]).join(&hex[2..4]).join(&hex);
    assert_eq!(fs::read(&path)?, bytes);
    Ok(())
}

#[test]
fn fs_open_removes_leftover_temporary_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("blobs");
    let tmp = store_dir.join("tmp");
    {
        let s = FsBlobStore::open(&store_dir)?;
        // A crash mid-write: the writer never finishes nor drops.
        let mut writer = s.writer()?;
        writer.write_all(&content(MULTI, 12))?;
        writer.flush()?;
        std::mem::forget(writer);
        fs::write(tmp.join("left-by-an-older-build"), b"junk")?;
        assert_eq!(fs::read_dir(&tmp)?.count(), 2);
    }
    let s = FsBlobStore::open(&store_dir)?;
    assert_eq!(fs::read_dir(&tmp)?.count(), 0);
    assert_eq!(s.list()?, vec![]);
    Ok(())
}

/// Hub processes sharing one blob directory: one starting does not delete another's write
/// in progress (only temporary files a day old), both see each other's blobs, and a
/// removal spares a blob younger than the grace (another process may be about to reference
/// it) until it is older.
#[test]
fn shared_stores_keep_each_others_writes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("blobs");
    let grace = Duration::from_secs(3600);
    let one = FsBlobStore::open_shared(&store_dir, grace)?;
    let bytes = content(MULTI, 31);
    let mut writing = one.writer()?;
    writing.write_all(&bytes[..CHUNK])?;
    writing.flush()?;
    // A crashed process's temporary file, two days old, and a fresh one of a live process.
    let crashed = store_dir.join("tmp").join("crashed");
    fs::create_dir_all(&crashed)?;
    let old = crashed.join("half-written");
    fs::write(&old, b"junk")?;
    let two_days = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    fs::File::options()
        .write(true)
        .open(&old)?
        .set_modified(two_days)?;

    let two = FsBlobStore::open_shared(&store_dir, grace)?;
    assert!(!old.exists(), "a day-old temporary file was kept");
    writing.write_all(&bytes[CHUNK..])?;
    let r = writing.finish(Some(&blob_ref(&bytes)))?;
    assert_eq!(
        read_back(&two, &r.hash)?,
        Some(bytes.clone()),
        "the other process's write"
    );

    // Young: spared by both. Old: removed.
    assert!(!two.remove(&r.hash)?);
    assert!(one.contains(&r.hash)?);
    let path = store_dir
        .join(&r.hash.to_string()[..2])
        .join(&r.hash.to_string()[2..4])
        .join(r.hash.to_string());
    fs::File::options()
        .write(true)
        .open(&path)?
        .set_modified(std::time::SystemTime::now() - 2 * grace)?;
    assert!(two.remove(&r.hash)?);
    assert!(!one.contains(&r.hash)?);
    Ok(())
}

#[test]
fn fs_list_ignores_names_that_are_not_blobs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("blobs");
    let s = FsBlobStore::open(&store_dir)?;
    let blob = store(&s, b"the only blob", None)?;
    let hex = blob.hash.to_string();
    let leaf = store_dir.join(&hex[..2]).join(&hex[2..4]);

    // Strays beside the blob: not a hash, a hash in upper case, a valid hash filed under
    // the wrong fan-out.
    let misplaced = Hash::of(b"misplaced");
    assert_ne!(misplaced.to_string()[..4], hex[..4]);
    fs::write(leaf.join("notes.txt"), b"stray")?;
    fs::write(
        leaf.join(Hash::of(b"upper").to_string().to_uppercase()),
        b"stray",
    )?;
    fs::write(leaf.join(misplaced.to_string()), b"misplaced")?;
    // A directory exactly where the blob of `dir_hash` would be.
    let dir_hash = Hash::of(b"a directory");
    let dh = dir_hash.to_string();
    fs::create_dir_all(store_dir.join(&dh[..2]).join(&dh[2..4]).join(&dh))?;
    // Strays at the fan-out levels and the root.
    fs::create_dir_all(store_dir.join("zz").join(&hex[2..4]))?;
    fs::write(store_dir.join("zz").join(&hex[2..4]).join(&hex), b"stray")?;
    fs::write(store_dir.join(&hex[..2]).join("not-a-dir"), b"stray")?;
    fs::write(store_dir.join("README"), b"stray")?;

    assert_eq!(s.list()?, vec![(blob.hash, blob.size)]);
    assert!(!s.contains(&misplaced)?);
    assert!(!s.contains(&dir_hash)?);
    Ok(())
}

#[test]
fn fs_blob_survives_reopening_the_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("blobs");
    let bytes = content(MULTI, 13);
    let blob = store(&FsBlobStore::open(&store_dir)?, &bytes, None)?;

    let s = FsBlobStore::open(&store_dir)?;
    assert!(s.contains(&blob.hash)?);
    assert_eq!(read_back(&s, &blob.hash)?, Some(bytes));
    assert_eq!(s.list()?, vec![(blob.hash, blob.size)]);
    Ok(())
}

#[test]
fn fs_unsynced_finish_is_visible_at_once_and_its_names_sync_later() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = FsBlobStore::open(dir.path().join("blobs"))?;
    let mut blobs = Vec::new();
    for seed in 0..40 {
        let bytes = content(1000, 100 + seed);
        let mut w = s.writer()?;
        w.write_all(&bytes)?;
        let blob = w.finish_unsynced(Some(&blob_ref(&bytes)))?;
        // Visible and whole before any name is synced.
        assert_eq!(read_back(&s, &blob.hash)?, Some(bytes));
        blobs.push(blob);
    }
    s.sync_names()?;
    // Nothing left pending: a second call has nothing to do and succeeds.
    s.sync_names()?;
    let mut listed: Vec<_> = blobs.iter().map(|b| (b.hash, b.size)).collect();
    listed.sort_unstable();
    assert_eq!(s.list()?, listed);
    Ok(())
}

#[test]
fn fs_unsynced_finish_still_verifies_and_leaves_nothing_on_a_mismatch() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fx = Fixture {
        store: Box::new(FsBlobStore::open(dir.path().join("blobs"))?),
        dir: Some(dir),
    };
    let bytes = content(1000, 7);
    let mut wrong = blob_ref(&bytes);
    wrong.hash = blob_ref(b"other").hash;
    let mut w = fx.store.writer()?;
    w.write_all(&bytes)?;
    assert!(matches!(
        w.finish_unsynced(Some(&wrong)),
        Err(BlobError::HashMismatch { .. })
    ));
    fx.store.sync_names()?;
    assert_nothing_stored(&fx)
}

#[test]
fn fs_a_pending_directory_removed_by_hand_does_not_fail_every_later_sync() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("blobs");
    let s = FsBlobStore::open(&root)?;
    let bytes = content(1000, 9);
    let mut w = s.writer()?;
    w.write_all(&bytes)?;
    let blob = w.finish_unsynced(None)?;
    let hex = blob.hash.to_string();
    fs::remove_dir_all(root.join(&hex[..2]))?;
    s.sync_names()?;
    assert!(!s.contains(&blob.hash)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Any content, any write pattern

/// Writes `bytes` in pieces of the sizes in `pieces` (cycled), then finishes.
fn store_in_pieces(
    s: &dyn BlobStore,
    bytes: &[u8],
    pieces: &[usize],
) -> Result<BlobRef, Box<dyn Error>> {
    let mut writer = s.writer()?;
    let mut rest = bytes;
    for &n in pieces.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        writer.write_all(piece)?;
        rest = tail;
    }
    Ok(writer.finish(None)?)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(32), ..ProptestConfig::default() })]

    #[test]
    fn any_content_in_any_pieces_is_named_by_its_hash_and_size(
        len in 0usize..200_000,
        seed in any::<u64>(),
        pieces in prop::collection::vec(1usize..70_000, 1..12),
    ) {
        let bytes = content(len, seed);
        for fx in [mem(), fs_store()] {
            let fx = fx.map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = store_in_pieces(&*fx.store, &bytes, &pieces)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, BlobRef { hash: Hash::of(&bytes), size: len as u64 });
            let back = read_back(&*fx.store, &got.hash)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back.as_deref(), Some(&bytes[..]));
        }
    }
}
