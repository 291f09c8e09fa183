//! The filesystem blob store: one file per blob under a two-level fan-out.
//!
//! Layout under the store's directory:
//!
//! ```text
//! <dir>/<hex[0..2]>/<hex[2..4]>/<hex>   a blob, named by the 64 hex digits of its hash
//! <dir>/tmp/<random>                    a blob being written
//! ```
//!
//! A writer hashes the bytes as they go into a file under `tmp/`; `finish` verifies them,
//! fsyncs the file, renames it into place and fsyncs the directory that received it, so a
//! blob is visible only complete and verified, and stays so after a crash. A crash mid-write
//! leaves a file under `tmp/`, which [`FsBlobStore::open`] deletes: one store per directory
//! at a time.
//!
//! `finish_unsynced` leaves the directories that received blobs to
//! [`BlobStore::sync_names`], which syncs each of them once however many blobs went in: a
//! page that fetched a thousand small files pays one round of directory syncs before its
//! commit, not one per file (the file's own content is synced before its rename either
//! way, so a name never survives a crash without its bytes).
//!
//! Several processes may share one directory (hub processes over one database, see
//! docs/scale.md) with [`FsBlobStore::open_shared`]: each writes under a `tmp/<random>/` of
//! its own, a start deletes only temporary files a day old, and a removal spares blobs
//! written within a grace period, which another process may be about to reference.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{verify, BlobError, BlobStore, BlobWriter, CHUNK};
use crate::hash::Hash;
use crate::poison::lock;
use crate::record::BlobRef;

/// The directory of blobs being written.
const TMP_DIR: &str = "tmp";

/// Blobs as files in a directory (see the module docs for the layout).
#[derive(Debug)]
pub struct FsBlobStore {
    root: PathBuf,
    /// Where this store's writers put their temporary files.
    tmp: PathBuf,
    /// Shared: blobs younger than this are not removed.
    spare_younger: Option<std::time::Duration>,
    /// Directories holding names not yet durable, shared with the writers.
    unsynced: Arc<UnsyncedNames>,
}

/// The directories whose new entries (blobs renamed into them by `finish_unsynced`, fan-out
/// directories created for them) are not yet durable.
#[derive(Debug, Default)]
struct UnsyncedNames {
    dirs: Mutex<BTreeSet<PathBuf>>,
    /// Held by a `sync_names` from taking the directories to their last sync, so a second
    /// call that finds none left waits for the first's syncs instead of returning early.
    syncing: Mutex<()>,
}

/// How old a temporary file of a shared directory must be before a start deletes it: no
/// write takes a day.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl FsBlobStore {
    /// Opens the store in `dir`, creating the directory if needed, and deletes the
    /// temporary files an interrupted write left behind.
    ///
    /// Only one store may use a directory at a time: opening a second one would delete the
    /// first one's writes in progress.
    ///
    /// # Errors
    /// The directory cannot be created or its `tmp/` cannot be cleaned.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, BlobError> {
        let root = dir.as_ref().to_path_buf();
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
        remove_leftovers(&tmp)?;
        Ok(FsBlobStore {
            root,
            tmp,
            spare_younger: None,
            unsynced: Arc::default(),
        })
    }

    /// Opens the store in `dir` for one of several processes sharing it: temporary files
    /// go to a directory of this store's own under `tmp/`, only those a day old are deleted
    /// (a crashed process's), and [`BlobStore::remove`] spares blobs whose file is younger
    /// than `grace` (another process may have just received one for a page it is about to
    /// commit; a later garbage collection removes it if nothing came to reference it).
    /// Every finish here is durable, [`BlobWriter::finish_unsynced`] too: another process
    /// may commit a record that counts on a blob this one wrote, and its
    /// [`BlobStore::sync_names`] would know nothing of this one's pending names.
    ///
    /// # Errors
    /// The directories cannot be created or listed.
    pub fn open_shared(
        dir: impl AsRef<Path>,
        grace: std::time::Duration,
    ) -> Result<Self, BlobError> {
        let root = dir.as_ref().to_path_buf();
        let shared_tmp = root.join(TMP_DIR);
        fs::create_dir_all(&shared_tmp).map_err(io_at(&shared_tmp))?;
        remove_stale(&shared_tmp)?;
        let tmp = shared_tmp.join(temp_name());
        fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
        Ok(FsBlobStore {
            root,
            tmp,
            spare_younger: Some(grace),
            unsynced: Arc::default(),
        })
    }

    fn path_of(&self, hash: &Hash) -> PathBuf {
        blob_path(&self.root, hash)
    }
}

impl BlobStore for FsBlobStore {
    fn contains(&self, hash: &Hash) -> Result<bool, BlobError> {
        let path = self.path_of(hash);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BlobError::Io { path, source: e }),
        }
    }

    fn open(&self, hash: &Hash) -> Result<Option<crate::blob::BlobReader>, BlobError> {
        let path = self.path_of(hash);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BlobError::Io { path, source: e }),
        };
        let size = file.metadata().map_err(io_at(&path))?.len();
        Ok(Some((size, Box::new(BufReader::new(file)))))
    }

    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        let tmp = self.tmp.join(temp_name());
        // `create_new`: a name collision fails instead of sharing another writer's file.
        let create = || OpenOptions::new().write(true).create_new(true).open(&tmp);
        let file = match create() {
            // A shared directory's idle temporary directory may have been taken for a
            // crashed process's by another one starting: make it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.spare_younger.is_some() => {
                fs::create_dir_all(&self.tmp).map_err(io_at(&self.tmp))?;
                create()
            }
            opened => opened,
        }
        .map_err(io_at(&tmp))?;
        Ok(Box::new(FsBlobWriter {
            file: Some(BufWriter::with_capacity(CHUNK, file)),
            hasher: blake3::Hasher::new(),
            size: 0,
            tmp,
            root: self.root.clone(),
            unsynced: self.unsynced.clone(),
            shared: self.spare_younger.is_some(),
            published: false,
        }))
    }

    fn remove(&self, hash: &Hash) -> Result<bool, BlobError> {
        let path = self.path_of(hash);
        if let Some(grace) = self.spare_younger {
            let young = match fs::metadata(&path) {
                Ok(meta) => meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_none_or(|age| age < grace),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(BlobError::Io { path, source: e }),
            };
            if young {
                return Ok(false);
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BlobError::Io { path, source: e }),
        }
    }

    fn list(&self) -> Result<Vec<(Hash, u64)>, BlobError> {
        let mut blobs = Vec::new();
        for (first, first_path) in fanout_dirs(&self.root)? {
            for (second, second_path) in fanout_dirs(&first_path)? {
                list_leaf(&second_path, &format!("{first}{second}"), &mut blobs)?;
            }
        }
        blobs.sort_unstable();
        Ok(blobs)
    }

    fn sync_names(&self) -> Result<(), BlobError> {
        let _syncing = lock(&self.unsynced.syncing);
        let dirs = std::mem::take(&mut *lock(&self.unsynced.dirs));
        let mut left = dirs.iter();
        while let Some(dir) = left.next() {
            match sync_dir(dir) {
                Ok(()) => {}
                // Gone (emptied and removed by hand): it holds no name to make durable.
                Err(BlobError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Pending again, with the ones not reached, for the next call.
                    lock(&self.unsynced.dirs).extend(std::iter::once(dir).chain(left).cloned());
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// A blob being written to a temporary file; see [`BlobWriter`].
struct FsBlobWriter {
    /// `None` once `finish` took it (or while dropping).
    file: Option<BufWriter<File>>,
    /// Updated with exactly the bytes the file accepted.
    hasher: blake3::Hasher,
    size: u64,
    tmp: PathBuf,
    root: PathBuf,
    unsynced: Arc<UnsyncedNames>,
    /// The directory is shared by processes: an unsynced finish is durable too.
    shared: bool,
    /// The temporary file was renamed into place (or deleted): nothing to clean up.
    published: bool,
}

impl FsBlobWriter {
    fn file(&mut self) -> io::Result<&mut BufWriter<File>> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already finished"))
    }

    /// Flushes and fsyncs the temporary file and returns what it holds.
    fn seal(&mut self) -> Result<BlobRef, BlobError> {
        let writer = self.file.take().ok_or_else(|| BlobError::Io {
            path: self.tmp.clone(),
            source: io::Error::other("blob writer already finished"),
        })?;
        let file = writer.into_inner().map_err(|e| BlobError::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_at(&self.tmp))?;
        Ok(BlobRef {
            hash: self.hasher.finalize().into(),
            size: self.size,
        })
    }

    /// Moves the sealed temporary file to `final_path`, or drops it if the blob is there.
    /// The directories that gain an entry are synced now, or with `defer` left to
    /// [`BlobStore::sync_names`].
    fn publish(&mut self, final_path: &Path, defer: bool) -> Result<(), BlobError> {
        let parent = final_path
            .parent()
            .expect("a blob path has fan-out parents");
        if final_path.is_file() {
            // Content-addressed: the stored file holds these very bytes. Its name may be
            // pending from an unsynced finish: a durable finish makes it durable now.
            fs::remove_file(&self.tmp).map_err(io_at(&self.tmp))?;
            self.published = true;
            return match defer {
                true => Ok(()),
                false => self.sync_pending_above(parent, true),
            };
        }
        let unsynced = &self.unsynced;
        let mut changed = |dir: &Path| match defer {
            true => {
                lock(&unsynced.dirs).insert(dir.to_path_buf());
                Ok(())
            }
            false => sync_dir(dir),
        };
        create_fanout(&self.root, parent, &mut changed)?;
        // IMPORTANT: the rename is durable only once the directory holding it is synced.
        // Deferred, the directory is pending before the blob becomes visible: a
        // `sync_names` that runs after a caller found the blob present covers it.
        if defer {
            changed(parent)?;
        }
        fs::rename(&self.tmp, final_path).map_err(io_at(final_path))?;
        self.published = true;
        if !defer {
            changed(parent)?;
        }
        match defer {
            true => Ok(()),
            false => self.sync_pending_above(parent, false),
        }
    }

    /// For a durable finish into `leaf`: syncs the directories on its path that an unsynced
    /// finish left pending (the fan-out directories it made; with `with_leaf`, the leaf
    /// too, when the blob itself came from such a finish), since a durable finish cannot
    /// wait for `sync_names`. They stay pending as well, which costs a second sync at most.
    fn sync_pending_above(&self, leaf: &Path, with_leaf: bool) -> Result<(), BlobError> {
        // A `sync_names` under way has taken its directories out of the set: wait for it.
        let _syncing = lock(&self.unsynced.syncing);
        let first = leaf.parent().unwrap_or(&self.root);
        let leaf = with_leaf.then_some(leaf);
        for dir in leaf.into_iter().chain([first, self.root.as_path()]) {
            if lock(&self.unsynced.dirs).contains(dir) {
                sync_dir(dir)?;
            }
        }
        Ok(())
    }
}

impl Write for FsBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file()?.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file()?.flush()
    }
}

impl FsBlobWriter {
    fn finish_as(&mut self, expected: Option<&BlobRef>, defer: bool) -> Result<BlobRef, BlobError> {
        // On any error below, `Drop` deletes the temporary file.
        let blob = self.seal()?;
        verify(&blob, expected)?;
        let final_path = blob_path(&self.root, &blob.hash);
        self.publish(&final_path, defer)?;
        Ok(blob)
    }
}

impl BlobWriter for FsBlobWriter {
    fn finish(mut self: Box<Self>, expected: Option<&BlobRef>) -> Result<BlobRef, BlobError> {
        self.finish_as(expected, false)
    }

    /// Deferred only in a directory of this process alone: in a shared one, another
    /// process may commit a record that counts on the blob (it finds it present) and its
    /// `sync_names` knows nothing of this process's pending names, so the finish is
    /// durable.
    fn finish_unsynced(
        mut self: Box<Self>,
        expected: Option<&BlobRef>,
    ) -> Result<BlobRef, BlobError> {
        let defer = !self.shared;
        self.finish_as(expected, defer)
    }
}

impl Drop for FsBlobWriter {
    fn drop(&mut self) {
        if let Some(writer) = self.file.take() {
            // Discard the buffer rather than flush bytes that are about to be deleted.
            let (file, _unwritten) = writer.into_parts();
            drop(file);
        }
        if !self.published {
            // Best effort: a file that survives is deleted by the next `open`.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Where the blob `hash` lives: `<root>/<hex[0..2]>/<hex[2..4]>/<hex>`. Derived only from
/// a [`Hash`](struct@Hash), whose `Display` is 64 lowercase hex digits, so it never leaves
/// `root`.
fn blob_path(root: &Path, hash: &Hash) -> PathBuf {
    let hex = hash.to_string();
    root.join(&hex[..2]).join(&hex[2..4]).join(&hex)
}

/// A fresh name for a temporary file.
fn temp_name() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Deletes every file in `tmp` (writes a crash interrupted).
fn remove_leftovers(tmp: &Path) -> Result<(), BlobError> {
    for entry in fs::read_dir(tmp).map_err(io_at(tmp))? {
        let entry = entry.map_err(io_at(tmp))?;
        let path = entry.path();
        if entry.file_type().map_err(io_at(&path))?.is_dir() {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BlobError::Io { path, source: e }),
        }
    }
    Ok(())
}

/// Deletes the files under `tmp` (directly or one directory down) a day old, and the
/// directories they leave empty: a crashed process's writes in a shared directory.
fn remove_stale(tmp: &Path) -> Result<(), BlobError> {
    let stale = |path: &Path| {
        fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= STALE_TEMP)
    };
    for entry in fs::read_dir(tmp).map_err(io_at(tmp))? {
        let path = entry.map_err(io_at(tmp))?.path();
        if path.is_dir() {
            for inner in fs::read_dir(&path).map_err(io_at(&path))? {
                let file = inner.map_err(io_at(&path))?.path();
                if stale(&file) {
                    let _ = fs::remove_file(&file);
                }
            }
            // Fails while it holds files (or another process's fresh directory): kept.
            if stale(&path) {
                let _ = fs::remove_dir(&path);
            }
        } else if stale(&path) {
            let _ = fs::remove_file(&path);
        }
    }
    Ok(())
}

/// The subdirectories of `dir` named like a fan-out level (two lowercase hex digits).
fn fanout_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, BlobError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let is_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if name.len() != 2 || !name.chars().all(is_hex) {
            continue;
        }
        if entry.file_type().map_err(io_at(&entry.path()))?.is_dir() {
            out.push((name, entry.path()));
        }
    }
    Ok(out)
}

/// Adds to `out` the blobs of one leaf directory whose hashes start with `prefix`. Names
/// are never trusted: anything that is not a regular file named by a hash with that prefix
/// (so that `contains` would find it) is skipped.
fn list_leaf(dir: &Path, prefix: &str, out: &mut Vec<(Hash, u64)>) -> Result<(), BlobError> {
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let Some(hash) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Hash>().ok())
        else {
            continue;
        };
        if !hash.to_string().starts_with(prefix) {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            // Removed while we were listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(BlobError::Io {
                    path: entry.path(),
                    source: e,
                })
            }
        };
        if meta.is_file() {
            out.push((hash, meta.len()));
        }
    }
    Ok(())
}

/// Creates the fan-out directories from `root` down to `leaf`, handing the parent of each
/// directory this call creates to `changed` (which syncs it, or notes it for later) so the
/// new entries survive a crash.
fn create_fanout(
    root: &Path,
    leaf: &Path,
    changed: &mut dyn FnMut(&Path) -> Result<(), BlobError>,
) -> Result<(), BlobError> {
    let first = leaf
        .parent()
        .expect("a leaf fan-out directory has a parent");
    for (dir, parent) in [(first, root), (leaf, first)] {
        match fs::create_dir(dir) {
            Ok(()) => changed(parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(BlobError::Io {
                    path: dir.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// Makes the entries of `dir` durable.
///
/// # Errors
/// The directory cannot be opened or synced. A filesystem that does not support syncing a
/// directory is not an error.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    let handle = File::open(dir).map_err(io_at(dir))?;
    match handle.sync_all() {
        Ok(()) => Ok(()),
        // EINVAL: this filesystem cannot sync a directory.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(BlobError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Makes the entries of `dir` durable: a no-op where a directory cannot be opened as a file
/// to sync it (Windows).
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), BlobError> {
    Ok(())
}

/// Wraps an I/O error with the path it concerns.
fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// The directories left pending after one blob of `content` is finished unsynced.
    fn pending_after_an_unsynced_finish(store: &FsBlobStore, content: &[u8]) -> usize {
        let mut writer = store.writer().expect("a writer");
        writer.write_all(content).expect("written");
        writer.finish_unsynced(None).expect("finished");
        lock(&store.unsynced.dirs).len()
    }

    /// A directory of one process defers the new names to `sync_names`; one shared by
    /// processes syncs them at once (another process's commit could count on the blob).
    #[test]
    fn only_a_directory_of_one_process_leaves_names_pending() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let own = FsBlobStore::open(dir.path().join("own")).expect("opened");
        assert!(pending_after_an_unsynced_finish(&own, b"one") > 0);
        own.sync_names().expect("synced");
        assert_eq!(lock(&own.unsynced.dirs).len(), 0);
        let shared = FsBlobStore::open_shared(
            dir.path().join("shared"),
            std::time::Duration::from_secs(60),
        )
        .expect("opened");
        assert_eq!(pending_after_an_unsynced_finish(&shared, b"two"), 0);
        assert!(shared.contains(&Hash::of(b"two")).expect("listed"));
    }
}
