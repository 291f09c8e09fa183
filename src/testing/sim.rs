//! The [`Simulation`]: several engines driven by actions, the oracle of every version
//! written, and the watermark and convergence checks.
//!
//! One file over 600 lines because the simulation's steps, its oracle and its checks share one
//! state (the nodes, the history, the faults): split, each part would reach into the others.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::{
    block_on, file_content, scope, Action, Backend, FaultyTransport, MemBackend, PowerLossBackend,
    PullFault, RedbBackend,
};
use crate::engine::{AuditOutcome, EngineConfig, ExchangeOptions, SyncEngine};
use crate::exchange::HaltReason;
use crate::hash::Hash;
use crate::hlc::ManualTime;
use crate::merge::{self, State};
use crate::record::{BlobRef, Key, Op, Scope, Version};
use crate::transport::InProcess;

/// A fault on one blob's transfers in a simulation.
#[derive(Clone, Copy, Debug)]
struct Fault {
    rounds_left: u8,
    corrupt: bool,
}

/// Several engines, an oracle, and the invariant checks.
pub struct Simulation {
    nodes: Vec<Option<Arc<SyncEngine>>>,
    backend: Box<dyn Backend>,
    wrote_since_backup: Vec<bool>,
    history: Vec<(Scope, Key, Version)>,
    /// Versions lost to lossy restores (no node held them or anything newer of their key).
    lost: Vec<(Scope, Key, Version)>,
    oracle: State,
    files: Vec<Hash>,
    faults: BTreeMap<Hash, Fault>,
    time: Arc<ManualTime>,
    lossy_restores: bool,
    /// Rounds run so far.
    pub rounds: usize,
    /// Rounds whose streamed pull or push was cut (by [`Action::Exchange`]'s `cut`) so far.
    pub cuts: usize,
    /// Of [`Simulation::cuts`], those of a streamed push.
    pub push_cuts: usize,
}

/// The configuration simulations give their engines: a shared manual clock.
pub fn sim_config(time: &Arc<ManualTime>) -> EngineConfig {
    EngineConfig {
        time: time.clone(),
        ..EngineConfig::default()
    }
}

/// The manual clock simulations start from.
pub fn sim_time() -> Arc<ManualTime> {
    ManualTime::at_secs(1_700_000_000)
}

impl Simulation {
    /// `n` in-memory nodes sharing one manual clock.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn in_memory(n: usize) -> crate::Result<Self> {
        let time = sim_time();
        Self::with_backend(n, Box::new(MemBackend::new(n, time.clone())), time)
    }

    /// `n` redb nodes under `root`, sharing one manual clock.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn redb(n: usize, root: impl Into<PathBuf>) -> crate::Result<Self> {
        let time = sim_time();
        Self::with_backend(n, Box::new(RedbBackend::new(root, time.clone())), time)
    }

    /// `n` redb nodes on power-loss disks (see [`PowerLossBackend`]), sharing one manual
    /// clock.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn power_loss(n: usize) -> crate::Result<Self> {
        let time = sim_time();
        Self::with_backend(n, Box::new(PowerLossBackend::new(n, time.clone())), time)
    }

    /// `n` nodes opened through `backend`, whose engines read `time`.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn with_backend(
        n: usize,
        mut backend: Box<dyn Backend>,
        time: Arc<ManualTime>,
    ) -> crate::Result<Self> {
        let nodes = (0..n)
            .map(|i| backend.open(i, false).map(|e| Some(Arc::new(e))))
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Simulation {
            nodes,
            backend,
            wrote_since_backup: vec![false; n],
            history: Vec::new(),
            lost: Vec::new(),
            oracle: State::new(),
            files: Vec::new(),
            faults: BTreeMap::new(),
            time,
            lossy_restores: false,
            rounds: 0,
            cuts: 0,
            push_cuts: 0,
        })
    }

    /// Lets [`Action::Restore`] restore nodes that wrote since their backup (losing those
    /// writes where no peer has them). See docs/protocol.md, "Known limitation: restoring
    /// lost writes", for why convergence can then fail.
    pub fn allow_lossy_restores(mut self) -> Self {
        self.lossy_restores = true;
        self
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Arc<SyncEngine> {
        self.nodes[i]
            .as_ref()
            .expect("nodes are always reopened after a restart")
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the simulation has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The LWW fold of every version written so far.
    pub fn oracle(&self) -> &State {
        &self.oracle
    }

    /// Applies one action, then checks the watermark invariant on every node.
    ///
    /// # Errors
    /// An engine error, or a description of a broken invariant.
    pub fn step(&mut self, action: &Action) -> Result<(), String> {
        let n = self.len();
        match *action {
            Action::Put {
                node,
                scope: s,
                key,
                value,
            } => self.write(
                node % n,
                s,
                key,
                Op::Put {
                    value: vec![value],
                    blob: None,
                },
            )?,
            Action::Delete {
                node,
                scope: s,
                key,
            } => self.write(node % n, s, key, Op::Delete)?,
            Action::Exchange {
                from,
                to,
                limit,
                only_scope,
                cut,
            } => {
                let options = ExchangeOptions {
                    scopes: match only_scope {
                        None => crate::ScopeFilter::All,
                        Some(s) => crate::ScopeFilter::Only([scope(s)].into_iter().collect()),
                    },
                    page_limit: Some(limit),
                };
                self.round_cut(from % n, to % n, &options, cut)?;
            }
            Action::Audit { from, to } => {
                self.audit(from % n, to % n)?;
            }
            Action::PutFile {
                node,
                scope: sc,
                key,
                content,
            } => self.write_file(node % n, sc, key, content)?,
            Action::BlobFault {
                blob,
                rounds,
                corrupt,
            } => {
                if !self.files.is_empty() {
                    let hash = self.files[usize::from(blob) % self.files.len()];
                    self.faults.insert(
                        hash,
                        Fault {
                            rounds_left: rounds,
                            corrupt,
                        },
                    );
                }
            }
            Action::Tick { millis } => self
                .time
                .advance(std::time::Duration::from_millis(u64::from(millis))),
            Action::Restart { node } => {
                self.reopen(node % n, |_| Ok(false))?;
            }
            Action::Crash { node } => {
                self.backend.crash(node % n)?;
                self.reopen(node % n, |_| Ok(false))?;
            }
            Action::Snapshot { node } => {
                self.reopen(node % n, |b| b.snapshot(node % n).map(|()| false))?;
                self.wrote_since_backup[node % n] = false;
            }
            Action::Restore { node }
                if self.wrote_since_backup[node % n] && !self.lossy_restores =>
            {
                self.reopen(node % n, |_| Ok(false))?;
            }
            Action::Restore { node } => {
                let fresh = self.wrote_since_backup[node % n];
                let restored = self.reopen(node % n, |b| Ok(b.restore(node % n)? && fresh))?;
                if restored {
                    self.wrote_since_backup[node % n] = false;
                }
                self.forget_lost_versions()?;
            }
        }
        self.check_watermarks()
    }

    fn write(&mut self, node: usize, s: u8, key: u8, op: Op) -> Result<(), String> {
        let (scope, key) = (scope(s), Key::new([key]).expect("one byte is a valid key"));
        let hlc = self
            .node(node)
            .write(&scope, &key, op.clone())
            .map_err(|e| format!("write on node {node}: {e:?}"))?;
        let version = Version { hlc, op };
        self.wrote_since_backup[node] = true;
        merge::merge_into(&mut self.oracle, &scope, &key, &version);
        self.history.push((scope, key, version));
        Ok(())
    }

    fn write_file(&mut self, node: usize, s: u8, key: u8, content: u8) -> Result<(), String> {
        let (scope, key) = (scope(s), Key::new([key]).expect("one byte is a valid key"));
        let bytes = file_content(content);
        let value = vec![content];
        let hlc = self
            .node(node)
            .put_file_bytes(&scope, &key, value.clone(), &bytes)
            .map_err(|e| format!("put_file on node {node}: {e:?}"))?;
        let blob = BlobRef {
            hash: Hash::of(&bytes),
            size: bytes.len() as u64,
        };
        let version = Version {
            hlc,
            op: Op::Put {
                value,
                blob: Some(blob),
            },
        };
        self.wrote_since_backup[node] = true;
        self.files.push(blob.hash);
        merge::merge_into(&mut self.oracle, &scope, &key, &version);
        self.history.push((scope, key, version));
        Ok(())
    }

    /// One audit from `from` to `to`, through the blob faults in force. Checks that it moved
    /// no mark on either side, that nothing was refused, and that the two now hold the same
    /// live contents; returns what it found.
    ///
    /// # Errors
    /// An engine error, a mark that moved, or a refusal.
    pub fn audit(&mut self, from: usize, to: usize) -> Result<AuditOutcome, String> {
        if from == to {
            return Ok(AuditOutcome::default());
        }
        let marks = |i: usize| self.node(i).watermarks().map_err(|e| format!("{e:?}"));
        let before = (marks(from)?, marks(to)?);
        let transport = self.faulty(to);
        let out = block_on(self.node(from).audit(&transport))
            .map_err(|e| format!("audit {from}->{to}: {e:?}"))?;
        if (marks(from)?, marks(to)?) != before {
            return Err(format!("audit {from}->{to} moved a mark: {out:?}"));
        }
        if out
            .halts
            .iter()
            .chain(&out.peer_halts)
            .any(crate::Halt::holds_stream)
        {
            return Err(format!("audit {from}->{to} refused versions: {out:?}"));
        }
        if self.state_of(from)? != self.state_of(to)? {
            return Err(format!(
                "after audit {from}->{to} their live contents differ: {out:?}"
            ));
        }
        Ok(out)
    }

    /// A transport to node `to` with the blob faults in force.
    fn faulty(&self, to: usize) -> FaultyTransport<InProcess<Arc<SyncEngine>>> {
        let transport = FaultyTransport::new(InProcess::new(self.node(to).clone()));
        for (hash, fault) in &self.faults {
            if fault.corrupt {
                transport.corrupt(*hash);
            } else {
                transport.fail(*hash);
            }
        }
        transport
    }

    /// One round from `from` to `to`. Returns `has_more`.
    ///
    /// # Errors
    /// An engine error, or a self-exchange.
    pub fn round(
        &mut self,
        from: usize,
        to: usize,
        options: &ExchangeOptions,
    ) -> Result<bool, String> {
        self.round_cut(from, to, options, None)
    }

    /// One round as [`Simulation::round`], whose streamed pull or push (if it streams one)
    /// breaks off after `cut` frames: the round fails, keeping the pages before the cut (on
    /// whichever side received them), and says there is more.
    ///
    /// # Errors
    /// As for [`Simulation::round`]; the injected cut is not one.
    pub fn round_cut(
        &mut self,
        from: usize,
        to: usize,
        options: &ExchangeOptions,
        cut: Option<u8>,
    ) -> Result<bool, String> {
        if from == to {
            return Ok(false);
        }
        let transport = self.faulty(to);
        let cut = cut.map(|n| PullFault::CutAfter(usize::from(n)));
        transport.fault_pulls(cut);
        transport.fault_pushes(cut);
        let out = match block_on(self.node(from).exchange_with(&transport, options)) {
            Err(_) if transport.pull_faults() + transport.push_faults() > 0 => {
                self.rounds += 1;
                self.cuts += 1;
                self.push_cuts += transport.push_faults();
                return Ok(true);
            }
            out => out.map_err(|e| format!("exchange {from}->{to}: {e:?}"))?,
        };
        self.rounds += 1;
        let faulty = |h: &crate::Halt| match h.reason {
            HaltReason::BlobUnavailable { hash } => self.faults.contains_key(&hash),
            HaltReason::BelowFloor { .. } => true,
            _ => false,
        };
        if !out.halts.iter().chain(&out.peer_halts).all(faulty) {
            return Err(format!(
                "unexpected halts in {from}->{to}: {:?} {:?} (faults {:?})",
                out.halts, out.peer_halts, self.faults
            ));
        }
        self.faults.retain(|_, f| {
            f.rounds_left = f.rounds_left.saturating_sub(1);
            f.rounds_left > 0
        });
        Ok(out.has_more)
    }

    /// Closes node `i`, runs `between` on the backend (which says whether to reopen under a
    /// fresh id), and opens it again. Returns what `between` said.
    fn reopen(
        &mut self,
        i: usize,
        between: impl FnOnce(&mut dyn Backend) -> Result<bool, String>,
    ) -> Result<bool, String> {
        // Drop the engine first: a redb file may be opened once per process.
        self.nodes[i] = None;
        let fresh = between(&mut *self.backend)?;
        let engine = self
            .backend
            .open(i, fresh)
            .map_err(|e| format!("reopen node {i}: {e:?}"))?;
        self.nodes[i] = Some(Arc::new(engine));
        Ok(fresh)
    }

    /// After a restore, versions that no node holds (nor anything newer of their key) are
    /// gone for good, as they would be: drop them from the history and rebuild the oracle
    /// from what survives.
    fn forget_lost_versions(&mut self) -> Result<(), String> {
        let mut survivors = State::new();
        for i in 0..self.len() {
            for ((scope, key), v) in self.state_of(i)? {
                merge::merge_into(&mut survivors, &scope, &key, &v);
            }
        }
        let (kept, lost): (Vec<_>, Vec<_>) = std::mem::take(&mut self.history)
            .into_iter()
            .partition(|(s, k, v)| {
                survivors
                    .get(&(s.clone(), k.clone()))
                    .is_some_and(|held| held.hlc >= v.hlc)
            });
        self.history = kept;
        self.lost.extend(lost);
        self.oracle = survivors;
        Ok(())
    }

    /// Checks the watermark invariant on every node, in the form the protocol guarantees at
    /// every step: for every version `v` ever written by origin `n` with Hlc <= the node's
    /// `W[n]`, the node holds `v` or a newer version of the same key, *or* some newer
    /// version `w` of that key exists whose origin's stream the node has not yet passed
    /// (`W[w.origin] < w.hlc`), so `w` (or newer) is still on its way. See
    /// docs/protocol.md, "What a watermark claims". At quiescence this is the strict claim.
    ///
    /// # Errors
    /// A description of the first violation: a watermark that advanced over a gap.
    pub fn check_watermarks(&self) -> Result<(), String> {
        for i in 0..self.len() {
            let node = self.node(i);
            let marks = node.watermarks().map_err(|e| format!("{e:?}"))?;
            let passed = |scope: &Scope, v: &Version| {
                marks.get(scope, v.hlc.origin()).is_some_and(|w| v.hlc <= w)
            };
            for (scope, key, v) in &self.history {
                if !passed(scope, v) {
                    continue;
                }
                let held = node.get_version(scope, key).map_err(|e| format!("{e:?}"))?;
                if held.as_ref().is_some_and(|h| h.hlc >= v.hlc) {
                    continue;
                }
                let on_its_way = self
                    .history
                    .iter()
                    .any(|(s, k, w)| s == scope && k == key && w.hlc > v.hlc && !passed(s, w));
                // A newer version of the key that a lossy restore took: a peer may have passed
                // `v` because that version superseded it, and only an audit brings `v` back
                // (docs/protocol.md, "Restoring lost writes"). `converge` checks the end.
                let lost_newer = self
                    .lost
                    .iter()
                    .any(|(s, k, w)| s == scope && k == key && w.hlc > v.hlc);
                if !on_its_way && !lost_newer {
                    return Err(format!(
                        "node {i}: watermark {:?} of {scope} covers {v:?} for {key:?}, but it holds {held:?} and nothing newer is on its way",
                        marks.get(scope, v.hlc.origin())
                    ));
                }
            }
        }
        Ok(())
    }

    /// Node `i`'s full state, tombstones included.
    ///
    /// # Errors
    /// An engine error.
    pub fn state_of(&self, i: usize) -> Result<State, String> {
        let node = self.node(i);
        let mut out = BTreeMap::new();
        for s in 0..3 {
            let scope = scope(s);
            for (key, version) in node.versions(&scope).map_err(|e| format!("{e:?}"))? {
                out.insert((scope.clone(), key), version);
            }
        }
        Ok(out)
    }

    /// Syncs every ordered pair until nothing moves (bounded), audits every ordered pair
    /// (which repairs what rounds cannot see, such as what a lossy restore left short), syncs
    /// again, then checks that every node equals the oracle, that all watermarks agree, and
    /// that a second audit of every pair finds nothing.
    ///
    /// # Errors
    /// A description of what did not converge.
    pub fn converge(&mut self) -> Result<(), String> {
        let n = self.len();
        // Failures "stop after a while": heal every transfer before the final sync.
        self.faults.clear();
        self.sync_all()?;
        for from in 0..n {
            for to in 0..n {
                self.audit(from, to)?;
            }
        }
        self.sync_all()?;
        self.check_converged()?;
        for from in 0..n {
            for to in 0..n {
                let out = self.audit(from, to)?;
                if !out.clean() {
                    return Err(format!(
                        "a second audit {from}->{to} found something: {out:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rounds between every ordered pair until nothing moves, three passes.
    fn sync_all(&mut self) -> Result<(), String> {
        let n = self.len();
        let options = ExchangeOptions::default();
        for _pass in 0..3 {
            for from in 0..n {
                for to in 0..n {
                    let mut guard = 0;
                    while self.round(from, to, &options)? {
                        guard += 1;
                        if guard > 10_000 {
                            return Err(format!("{from}->{to}: has_more never cleared"));
                        }
                    }
                    self.check_watermarks()?;
                }
            }
        }
        Ok(())
    }

    /// Every node equals the oracle, holds no Staged record, and has node 0's marks.
    fn check_converged(&mut self) -> Result<(), String> {
        let n = self.len();
        let first = self.node(0).watermarks().map_err(|e| format!("{e:?}"))?;
        for i in 0..n {
            let state = self.state_of(i)?;
            if state != self.oracle {
                return Err(format!(
                    "node {i} differs from the oracle:\n node: {state:?}\n oracle: {:?}",
                    self.oracle
                ));
            }
            // A record may stay Staged only if no node holds its file (a lossy restore took
            // the only copy): every other file arrives once the faults heal.
            for ((scope, key), version) in &state {
                let Some(blob) = version.blob() else { continue };
                let here = self.node(i).blob_store().contains(&blob.hash);
                if here.map_err(|e| format!("{e:?}"))? {
                    continue;
                }
                let anywhere = (0..n).any(|j| {
                    self.node(j)
                        .blob_store()
                        .contains(&blob.hash)
                        .unwrap_or(false)
                });
                if anywhere {
                    return Err(format!(
                        "node {i} holds {scope} {key:?} Staged though another node has its file"
                    ));
                }
            }
            let marks = self.node(i).watermarks().map_err(|e| format!("{e:?}"))?;
            if marks != first {
                return Err(format!(
                    "watermarks differ: node 0 {first:?} vs node {i} {marks:?}"
                ));
            }
        }
        Ok(())
    }

    /// After [`Simulation::converge`]: one more round between every pair ships nothing and
    /// reports `has_more == false`.
    ///
    /// # Errors
    /// A description of the first round that moved something.
    pub fn check_quiet(&mut self) -> Result<(), String> {
        let n = self.len();
        for from in 0..n {
            for to in (0..n).filter(|t| *t != from) {
                let transport = InProcess::new(self.node(to).clone());
                let out =
                    block_on(self.node(from).exchange(&transport)).map_err(|e| format!("{e:?}"))?;
                if out.shipped != 0 || out.received != 0 || out.has_more {
                    return Err(format!(
                        "round {from}->{to} after convergence was not quiet: {out:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}
