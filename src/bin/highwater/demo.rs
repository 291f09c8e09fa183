//! The one-command demo (`highwater demo`): three nodes on loopback HTTP (a hub and two
//! devices), concurrent writes, a device cut off, offline edits on both sides with a
//! conflict and a delete, a failed blob transfer that stages a record and halts only its
//! origin, healing, and checked convergence.
//!
//! Everything runs in temporary directories; nothing needs configuring. [`run`] returns a
//! [`DemoReport`] whose `converged` is true only if every check held.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use highwater::error::{Error, TransportError};
use highwater::hash::Hash;
use highwater::hlc::NodeId;
use highwater::http::{serve, HttpTransport, ServerConfig};
use highwater::notify::{Event, Notice, SyncEvent};
use highwater::record::{Key, Op, Residency, Scope};
use highwater::scheduler::{Backoff, Scheduler, SchedulerConfig};
use highwater::transport::{Call, Layer, Layered};
use highwater::SyncEngine;

/// Locks `m`; the demo's mutexes guard plain maps, valid whatever a panicking holder did.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Records each node writes in the concurrent phase (default 5000).
    pub records_per_node: usize,
    /// Size of the file each node writes (default 2 MiB).
    pub file_size: usize,
    /// The longest each phase may take before the demo gives up (default 60 s).
    pub deadline: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            records_per_node: 5000,
            file_size: 2 << 20,
            deadline: Duration::from_secs(60),
        }
    }
}

/// What the demo showed.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Whether every node ended with the same digest, every file Resident and
    /// byte-identical, the conflict resolved to the later write and the delete applied.
    pub converged: bool,
}

/// A link from a device to the hub that the demo can cut, and on which it can fail blob
/// downloads: a [`Layer`] over the device's transport to the hub.
#[derive(Default)]
struct Link {
    /// While set, every call fails as if the hub were unreachable.
    cut: AtomicBool,
    /// Hashes whose next downloads fail, with how many failures remain.
    failing: Mutex<HashMap<Hash, u32>>,
}

impl Link {
    fn check(&self) -> Result<(), TransportError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(TransportError::Unreachable {
                reason: "demo: link cut".into(),
            })
        } else {
            Ok(())
        }
    }

    /// Fails this download of `hash` if it is one of the failures still owed.
    fn check_download(&self, hash: Hash) -> Result<(), TransportError> {
        let mut failing = lock(&self.failing);
        let Some(n) = failing.get_mut(&hash) else {
            return Ok(());
        };
        *n -= 1;
        if *n == 0 {
            failing.remove(&hash);
        }
        Err(TransportError::BlobTransfer {
            hash,
            reason: "demo: injected transfer failure".into(),
        })
    }
}

impl Layer for Link {
    fn before(&self, call: Call<'_>) -> Result<(), TransportError> {
        self.check()?;
        match call {
            Call::FetchBlob(blob) => self.check_download(blob.hash),
            _ => Ok(()),
        }
    }
}

struct Node {
    name: &'static str,
    engine: Arc<SyncEngine>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    scheduler: Option<Scheduler>,
    link: Option<Arc<Layered<HttpTransport, Link>>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(name: &'static str) -> Result<Node, DemoError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("highwater-demo-{name}-"))
            .tempdir()
            .map_err(setup)?;
        let engine = Arc::new(SyncEngine::open(dir.path())?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(setup)?;
        let addr = listener.local_addr().map_err(setup)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let engine = engine.clone();
            async move {
                let shutdown = async move {
                    let _ = stopped.await;
                };
                if let Err(e) = serve(engine, listener, ServerConfig::default(), shutdown).await {
                    tracing::error!(error = %e, "demo server failed");
                }
            }
        });
        Ok(Node {
            name,
            engine,
            addr,
            stop: Some(stop),
            server: Some(server),
            scheduler: None,
            link: None,
            _dir: dir,
        })
    }

    /// Starts this device's scheduler, syncing with `hub` over a cuttable link.
    fn follow(&mut self, hub: &Node) -> Result<(), DemoError> {
        let http = HttpTransport::new(&format!("http://{}", hub.addr), None).map_err(setup)?;
        let link = Arc::new(Layered::<_, Link>::new(http));
        let scheduler = Scheduler::start(
            self.engine.clone(),
            SchedulerConfig {
                interval: Duration::from_secs(2),
                debounce: Duration::from_millis(10),
                backoff: Backoff {
                    base: Duration::from_millis(100),
                    factor: 2.0,
                    cap: Duration::from_secs(1),
                    jitter: Duration::from_millis(50),
                },
                watch_timeout: Duration::from_secs(10),
                ..SchedulerConfig::default()
            },
        );
        scheduler.add_peer("hub", link.clone()).map_err(setup)?;
        self.scheduler = Some(scheduler);
        self.link = Some(link);
        Ok(())
    }

    async fn stop(mut self) -> Result<(), DemoError> {
        if let Some(s) = self.scheduler.take() {
            s.shutdown().await?;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        Ok(self.engine.flush()?)
    }
}

fn key(s: &str) -> Key {
    Key::try_from(s).expect("demo keys are short and non-empty")
}

/// Deterministic pseudo-random bytes (so files differ per node and compress poorly).
fn file_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, DemoError> {
    Ok(tokio::task::spawn_blocking(f).await.map_err(setup)??)
}

/// Why the demo could not run (a demo that runs but does not converge is a report).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] Error),
    /// Setting up nodes (directories, sockets, tasks) failed.
    #[error("demo setup failed: {0}")]
    Setup(String),
}

fn setup(e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// Waits (polling every 10 ms) until `done` holds, or `deadline` passes.
async fn wait_until(
    deadline: Duration,
    mut done: impl FnMut() -> Result<bool, Error>,
) -> Result<bool, Error> {
    let end = Instant::now() + deadline;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        if done()? {
            return Ok(true);
        }
        if Instant::now() > end {
            return Ok(false);
        }
    }
}

fn same_digest(nodes: &[&Node]) -> Result<bool, Error> {
    let first = nodes[0].engine.digest()?;
    for n in &nodes[1..] {
        if n.engine.digest()? != first {
            return Ok(false);
        }
    }
    Ok(true)
}

fn staged(engine: &SyncEngine) -> Result<usize, Error> {
    let mut n = 0;
    for scope in engine.scopes()? {
        n += engine.residency_counts(&scope)?.staged;
    }
    Ok(n)
}

/// Runs the demo, narrating to `out`.
///
/// # Errors
/// A node could not start, or storage failed. A demo that runs but does not converge
/// returns a report with `converged: false`.
pub async fn run(
    options: &DemoOptions,
    out: &mut (dyn Write + Send),
) -> Result<DemoReport, DemoError> {
    let mut say = |line: String| {
        let _ = writeln!(out, "{line}");
    };
    let started = Instant::now();
    let mut phase = Instant::now();
    // The time since the last lap (each phase's own time).
    let lap = |phase: &mut Instant| {
        let d = phase.elapsed();
        *phase = Instant::now();
        d
    };

    let hub = Node::start("hub").await?;
    let mut d1 = Node::start("device-1").await?;
    let mut d2 = Node::start("device-2").await?;
    let names: HashMap<NodeId, &str> = [&hub, &d1, &d2]
        .iter()
        .map(|n| (n.engine.node_id(), n.name))
        .collect();
    for n in [&hub, &d1, &d2] {
        say(format!(
            "started {:<9} id {} at http://{}",
            n.name,
            n.engine.node_id().short(),
            n.addr
        ));
    }
    d1.follow(&hub)?;
    d2.follow(&hub)?;
    say("devices sync with the hub: on change, on the hub's watch news, and every 2 s".into());

    // Phase 1: everyone writes at once.
    let notes = Scope::app("notes", "items").map_err(Error::Input)?;
    let files = Scope::shared();
    let mut writers = Vec::new();
    for (i, n) in [&hub, &d1, &d2].iter().enumerate() {
        let engine = n.engine.clone();
        let name = n.name;
        let (notes, files) = (notes.clone(), files.clone());
        let count = options.records_per_node;
        let size = options.file_size;
        writers.push(blocking(move || {
            for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
                engine.write_batch(chunk.iter().map(|j| {
                    (
                        notes.clone(),
                        key(&format!("{name}/{j:05}")),
                        Op::Put {
                            value: format!("note {j} written on {name}; padding to a typical record size of about one hundred and twenty bytes").into_bytes(),
                            blob: None,
                        },
                    )
                }))?;
            }
            engine.put_file_bytes(
                &files,
                &key(&format!("files/{name}.bin")),
                b"application/octet-stream".to_vec(),
                &file_bytes(i as u64 + 1, size),
            )?;
            Ok(())
        }));
    }
    for w in writers {
        w.await?;
    }
    let writes = lap(&mut phase);
    say(format!(
        "wrote {} records and a {} KiB file on each node, concurrently, in {} ms",
        options.records_per_node,
        options.file_size >> 10,
        writes.as_millis()
    ));
    let ok = wait_until(options.deadline, || same_digest(&[&hub, &d1, &d2])).await?;
    let d = lap(&mut phase);
    say(format!(
        "{} all three nodes hold the same {} records and 3 files after {} ms",
        if ok { "ok:" } else { "FAILED:" },
        3 * options.records_per_node + 3,
        d.as_millis()
    ));

    // Phase 2: device-2 goes offline; both sides write, with a conflict and a delete.
    let link2 = d2.link.clone().expect("device-2 follows the hub");
    link2.layer().cut.store(true, Ordering::SeqCst);
    say("device-2 is cut off from the hub".into());
    let title = key("title");
    let photo_key = key("files/taken-offline.bin");
    let photo = file_bytes(99, options.file_size / 2);
    let photo_hash = Hash::of(&photo);
    {
        let (e1, e2) = (d1.engine.clone(), d2.engine.clone());
        let (notes, files, title, photo_key) = (
            notes.clone(),
            files.clone(),
            title.clone(),
            photo_key.clone(),
        );
        blocking(move || {
            e1.put(&notes, &title, b"Title from device-1".to_vec())?;
            e1.delete(&notes, &key("hub/00007"))?;
            e1.put_file_bytes(&files, &photo_key, b"image/raw".to_vec(), &photo)?;
            // Written after device-1's: its Hlc is later, so it wins everywhere.
            e2.put(&notes, &title, b"Title from device-2 (offline)".to_vec())?;
            e2.put(
                &notes,
                &key("device-2/offline"),
                b"written while offline".to_vec(),
            )?;
            Ok(())
        })
        .await?;
    }
    say("device-1 wrote notes/title, deleted notes/hub/00007 and added a file; device-2, offline, wrote notes/title too".into());
    let ok1 = wait_until(options.deadline, || same_digest(&[&hub, &d1])).await?;
    lap(&mut phase);
    say(format!(
        "{} hub and device-1 agree; device-2 differs: {}",
        if ok1 { "ok:" } else { "FAILED:" },
        !same_digest(&[&hub, &d2])?
    ));

    // Phase 3: reconnect device-2, with the new file's first download failing.
    let mut events = d2.engine.notifier().subscribe();
    lock(&link2.layer().failing).insert(photo_hash, 1);
    link2.layer().cut.store(false, Ordering::SeqCst);
    if let Some(s) = &d2.scheduler {
        s.sync_now();
    }
    say("device-2 reconnects; the new file's first download will fail".into());
    let staged_seen = tokio::time::timeout(options.deadline, async {
        while let Some(notice) = events.recv().await {
            if let Notice::Event(Event::Sync(SyncEvent::BlobStaged { origin, hash, .. })) = notice {
                return Some((origin, hash));
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    match staged_seen {
        Some((origin, hash)) => say(format!(
            "ok: blob_staged on device-2: {} from {} is Staged; {}'s stream waits for it while the others proceed",
            hash.short(),
            names.get(&origin).copied().unwrap_or("?"),
            names.get(&origin).copied().unwrap_or("?"),
        )),
        None => say("FAILED: no blob_staged event on device-2".into()),
    }
    // device-1's notes are another stream (scope, origin) than its file: they go through.
    let others = d2.engine.get(&notes, &key("hub/00007"))?.is_none()
        && d2.engine.residency(&files, &photo_key)? == Residency::Staged;
    if others {
        say("ok: meanwhile device-2 applied device-1's notes (the delete of hub/00007): only the file's stream waits".into());
    }
    let ok2 = wait_until(options.deadline, || {
        Ok(same_digest(&[&hub, &d1, &d2])?
            && staged(&hub.engine)? + staged(&d1.engine)? + staged(&d2.engine)? == 0)
    })
    .await?;
    let d = lap(&mut phase);
    say(format!(
        "{} the retry fetched the file; all three converged {} ms after reconnecting",
        if ok2 { "ok:" } else { "FAILED:" },
        d.as_millis()
    ));

    // Checks.
    let mut converged = ok && ok1 && staged_seen.is_some() && ok2;
    let mut digests = Vec::new();
    for n in [&hub, &d1, &d2] {
        let winner = n.engine.get(&notes, &title)?;
        let deleted = n.engine.get(&notes, &key("hub/00007"))?.is_none();
        let winner_ok = winner.as_ref().is_some_and(|r| {
            r.value == b"Title from device-2 (offline)" && r.hlc.origin() == d2.engine.node_id()
        });
        let mut files_ok = true;
        for f in ["hub", "device-1", "device-2", "taken-offline"] {
            let k = if f == "taken-offline" {
                photo_key.clone()
            } else {
                key(&format!("files/{f}.bin"))
            };
            let resident = n.engine.residency(&files, &k)? == Residency::Resident;
            let intact = match n.engine.open_file(&files, &k)? {
                Some((blob, mut reader)) => {
                    let mut hasher = blake3::Hasher::new();
                    std::io::copy(&mut reader, &mut hasher).map_err(setup)?;
                    Hash::from(hasher.finalize()) == blob.hash
                }
                None => false,
            };
            files_ok &= resident && intact;
        }
        converged &= winner_ok && deleted && files_ok;
        if let Some(w) = &winner {
            say(format!(
                "{:<9} notes/title = {:?} (LWW winner: {}), hub/00007 deleted: {}, files Resident and intact: {}",
                n.name,
                String::from_utf8_lossy(&w.value),
                names.get(&w.hlc.origin()).copied().unwrap_or("?"),
                deleted,
                files_ok
            ));
        }
        digests.push((n.name.to_owned(), n.engine.digest()?));
    }
    for (name, digest) in &digests {
        say(format!("{name:<9} digest {}", digest.short()));
    }
    let total = started.elapsed();
    say(format!(
        "{} in {} ms",
        if converged {
            "CONVERGED"
        } else {
            "NOT CONVERGED"
        },
        total.as_millis()
    ));
    for n in [hub, d1, d2] {
        n.stop().await?;
    }
    Ok(DemoReport { converged })
}
