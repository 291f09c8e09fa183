//! What the cases share: the sizes, a scratch directory, the generated records, and redb
//! nodes that hold them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures_executor::block_on;
use highwater::{ExchangeOptions, InProcess, Key, Op, Scope, SyncEngine, Transport};

use crate::records::{self, KEY_LEN, VALUE_LEN};
use crate::{measure, Result, Sizes};

/// Records per `write_batch` when a node is filled.
pub const WRITE_BATCH: usize = 10_000;

/// Rounds a sync may take before the bench calls it a livelock.
pub const MAX_ROUNDS: usize = 100_000;

/// One generated record.
pub type Rec = ([u8; KEY_LEN], [u8; VALUE_LEN]);

/// State shared by the cases of one run.
pub struct Fixture {
    /// The run's sizes.
    pub sizes: Sizes,
    /// The automerge peer binary, if given.
    pub automerge: Option<PathBuf>,
    dir: tempfile::TempDir,
    data: Vec<Rec>,
    /// Nodes holding the first n records, by n, and the seconds their writes took.
    senders: HashMap<u64, (PathBuf, f64)>,
    /// Nodes synced from the sender of n records, by n.
    replicas: HashMap<u64, PathBuf>,
    /// Updates written so far (each delta writes a new generation of values).
    pub generation: u64,
    next_dir: usize,
}

impl Fixture {
    /// A fixture with an empty scratch directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(sizes: Sizes, automerge: Option<PathBuf>) -> Result<Fixture> {
        Ok(Fixture {
            sizes,
            automerge,
            dir: tempfile::tempdir()?,
            data: Vec::new(),
            senders: HashMap::new(),
            replicas: HashMap::new(),
            generation: 0,
            next_dir: 0,
        })
    }

    /// A fresh, empty directory in the scratch directory.
    pub fn fresh_dir(&mut self, what: &str) -> PathBuf {
        self.next_dir += 1;
        self.dir.path().join(format!("{what}-{}", self.next_dir))
    }

    /// The first `n` generated records (generated once, for the largest size asked).
    pub fn records(&mut self, n: u64) -> &[Rec] {
        let n = usize::try_from(n).expect("record counts fit in memory");
        if self.data.len() < n {
            let start = self.data.len() as u64;
            self.data
                .extend((start..n as u64).map(|i| (records::key(i), records::value(i, 0))));
        }
        &self.data[..n]
    }

    /// A redb node holding the first `n` records (created once), and the seconds its
    /// writes took. The node is closed: open it with [`SyncEngine::open`].
    ///
    /// # Errors
    /// A store failure.
    pub fn sender(&mut self, n: u64) -> Result<(PathBuf, f64)> {
        if let Some(s) = self.senders.get(&n) {
            return Ok(s.clone());
        }
        let dir = self.fresh_dir("sender");
        let node = SyncEngine::open(&dir)?;
        let scope = scope();
        let data = self.records(n);
        let (written, secs) = measure::timed(|| -> Result<()> {
            for chunk in data.chunks(WRITE_BATCH) {
                node.write_batch(chunk.iter().map(|(k, v)| put(&scope, k, v)))?;
            }
            Ok(())
        });
        written?;
        drop(node);
        self.senders.insert(n, (dir.clone(), secs));
        Ok((dir, secs))
    }

    /// Remembers `dir` as a node synced from the sender of `n` records.
    pub fn keep_replica(&mut self, n: u64, dir: PathBuf) {
        self.replicas.insert(n, dir);
    }

    /// A node synced from the sender of `n` records: one kept by an earlier case, or a new
    /// one pulled in this process.
    ///
    /// # Errors
    /// A store or sync failure.
    pub fn replica(&mut self, n: u64) -> Result<PathBuf> {
        if let Some(dir) = self.replicas.get(&n) {
            return Ok(dir.clone());
        }
        let (from, _) = self.sender(n)?;
        let into = self.fresh_dir("replica");
        let a = Arc::new(SyncEngine::open(&from)?);
        let b = SyncEngine::open(&into)?;
        pull(&b, &InProcess::new(a.clone()))?;
        if a.digest()? != b.digest()? {
            return Err("replica: digests differ after the sync".into());
        }
        self.replicas.insert(n, into.clone());
        Ok(into)
    }
}

/// The scope every benchmark record lives in.
pub fn scope() -> Scope {
    Scope::app("bench", "records").expect("a valid scope name")
}

/// A put of one generated record.
pub fn put(scope: &Scope, key: &[u8], value: &[u8]) -> (Scope, Key, Op) {
    (
        scope.clone(),
        Key::new(key).expect("generated keys are 32 bytes"),
        Op::Put {
            value: value.to_vec(),
            blob: None,
        },
    )
}

/// What a sync moved, summed over its rounds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pulled {
    /// Rounds run.
    pub rounds: usize,
    /// Versions received.
    pub received: usize,
    /// Received versions that changed the receiver.
    pub applied: usize,
    /// Versions sent.
    pub shipped: usize,
}

/// Runs rounds from `node` over `link` while `has_more`.
///
/// # Errors
/// A round failed, or `has_more` was still set after [`MAX_ROUNDS`] rounds.
pub fn pull<T: Transport>(node: &SyncEngine, link: &T) -> Result<Pulled> {
    pull_with(node, link, &ExchangeOptions::default())
}

/// Runs rounds from `node` over `link` with `options` while `has_more`.
///
/// # Errors
/// As for [`pull`].
pub fn pull_with<T: Transport>(
    node: &SyncEngine,
    link: &T,
    options: &ExchangeOptions,
) -> Result<Pulled> {
    block_on(pull_async(node, link, options))
}

/// [`pull_with`] as a future (for transports that need a runtime, as HTTP does).
///
/// # Errors
/// As for [`pull`].
pub async fn pull_async<T: Transport>(
    node: &SyncEngine,
    link: &T,
    options: &ExchangeOptions,
) -> Result<Pulled> {
    let mut p = Pulled::default();
    loop {
        let out = node.exchange_with(link, options).await?;
        p.rounds += 1;
        p.received += out.received;
        p.applied += out.applied;
        p.shipped += out.shipped;
        if !out.halts.is_empty() || !out.peer_halts.is_empty() {
            return Err(format!("a round halted streams: {:?}", out.halts).into());
        }
        if !out.has_more {
            return Ok(p);
        }
        if p.rounds >= MAX_ROUNDS {
            return Err("has_more still set after MAX_ROUNDS rounds".into());
        }
    }
}

/// Today's UTC date, `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
