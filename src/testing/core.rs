//! The exchange core driven directly: [`CoreModel`] runs 2 to 4 replicas, each a
//! [`MemStore`] and its sessions, through the core's steps ([`Initiation`], [`Answer`],
//! [`plan_page_apply`]) with no engine, runtime or transport, through the real wire codec.
//! Rounds can lose their response, so the responder's knowledge of the initiator runs ahead
//! of what the initiator holds, and sessions keep or lose their held marks accordingly.
//! After every step the watermark invariant is checked against every version ever written;
//! [`CoreModel::converge`] then checks that every replica equals the last-write-wins oracle.

use std::collections::{BTreeMap, HashMap};

use crate::exchange::apply::plan_page_apply;
use crate::exchange::plan::PageLimits;
use crate::exchange::{
    Answer, Answering, AppliedPage, ExchangeOptions, HeldMarks, Initiation, Page, Reply, Session,
};
use crate::hlc::{Hlc, NodeId};
use crate::merge::{self, State};
use crate::record::{Key, Op, Scope, ScopeFilter, Version};
use crate::store::{Advance, Batch, Durability, KeyRange, MemStore, PeerKnowledge, Store};
use crate::wire::{self, ExchangeRequest, ExchangeResponse};

use super::scope;

/// One step of a [`CoreModel`], decoded from 4 bytes ([`CoreStep::decode_all`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreStep {
    /// Replica `node` writes (or deletes) `key` in scope number `scope`.
    Write {
        /// Writer.
        node: usize,
        /// Scope index (see [`scope`]).
        scope: u8,
        /// Key byte.
        key: u8,
        /// A tombstone instead of a value.
        delete: bool,
    },
    /// `from` initiates a round with `to`.
    Round {
        /// Initiator.
        from: usize,
        /// Responder.
        to: usize,
        /// Page limit, both ways.
        limit: usize,
        /// Only this scope (index) instead of all.
        only: Option<u8>,
        /// The response is lost: the responder applied the request and recorded its
        /// knowledge, the initiator applies nothing.
        lose_response: bool,
    },
}

impl CoreStep {
    /// Decodes steps for `nodes` replicas from bytes, 4 per step (a short tail is ignored).
    pub fn decode_all(nodes: usize, bytes: &[u8]) -> Vec<CoreStep> {
        let nodes = nodes.max(2);
        bytes
            .chunks_exact(4)
            .map(|b| {
                let node = usize::from(b[1]) % nodes;
                if b[0] % 2 == 0 {
                    CoreStep::Write {
                        node,
                        scope: b[2] % 3,
                        key: b[3] % 8,
                        delete: b[0] % 8 == 6,
                    }
                } else {
                    let to = (node + 1 + usize::from(b[2]) % (nodes - 1)) % nodes;
                    CoreStep::Round {
                        from: node,
                        to,
                        limit: 1 + usize::from(b[3] % 4),
                        only: (b[0] % 16 == 3).then_some(b[3] / 4 % 3),
                        lose_response: b[0] % 16 == 7,
                    }
                }
            })
            .collect()
    }
}

struct Replica {
    id: NodeId,
    store: MemStore,
    clock: u64,
    /// A session per peer id.
    sessions: HashMap<NodeId, Session>,
    /// The marks each peer recorded of ours when we last answered it.
    answered: HashMap<NodeId, HeldMarks>,
}

/// Replicas driven through the exchange core, and the oracle: see [`crate::testing`].
pub struct CoreModel {
    replicas: Vec<Replica>,
    /// Every version ever written.
    history: Vec<(Scope, Key, Version)>,
    oracle: State,
}

type Outcome<T = ()> = Result<T, String>;

fn err(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

impl CoreModel {
    /// `n` empty replicas (2 to 4), with ids `[1; 16]`, `[2; 16]`, ...
    ///
    /// # Errors
    /// A store failure.
    pub fn new(n: usize) -> Outcome<CoreModel> {
        let replicas = (0..n.clamp(2, 4))
            .map(|i| {
                let store = MemStore::new();
                let fixed = NodeId::from_bytes([i as u8 + 1; 16]).expect("not all zero");
                let id = store.identity(fixed).map_err(err)?;
                Ok(Replica {
                    id,
                    store,
                    clock: 0,
                    sessions: HashMap::new(),
                    answered: HashMap::new(),
                })
            })
            .collect::<Outcome<Vec<_>>>()?;
        Ok(CoreModel {
            replicas,
            history: Vec::new(),
            oracle: State::new(),
        })
    }

    /// Runs one step, then checks the watermark invariant.
    ///
    /// # Errors
    /// A store or protocol failure, or a broken invariant.
    pub fn step(&mut self, step: &CoreStep) -> Outcome {
        match *step {
            CoreStep::Write {
                node,
                scope: s,
                key,
                delete,
            } => self.write(node, scope(s), key, delete)?,
            CoreStep::Round {
                from,
                to,
                limit,
                only,
                lose_response,
            } => {
                let scopes = match only {
                    Some(s) => ScopeFilter::Only([scope(s)].into_iter().collect()),
                    None => ScopeFilter::All,
                };
                self.round(from, to, limit, scopes, lose_response)?;
            }
        }
        self.check_watermarks()
    }

    fn write(&mut self, node: usize, scope: Scope, key: u8, delete: bool) -> Outcome {
        let replica = &mut self.replicas[node];
        replica.clock += 1;
        let hlc = Hlc::new(replica.clock, replica.id);
        let op = if delete {
            Op::Delete
        } else {
            Op::Put {
                value: hlc.to_string().into_bytes(),
                blob: None,
            }
        };
        let key = Key::new(vec![b'k', key]).map_err(err)?;
        let version = Version { hlc, op };
        let mut batch = Batch::new(replica.clock, Durability::Immediate);
        batch
            .upserts
            .push((scope.clone(), key.clone(), version.clone()));
        batch.advances.push(Advance {
            scope: scope.clone(),
            base: None,
            top: hlc,
        });
        replica.store.commit(&batch).map_err(err)?;
        merge::merge_into(&mut self.oracle, &scope, &key, &version);
        self.history.push((scope, key, version));
        Ok(())
    }

    /// One round, `from` initiating to `to`; returns the initiator's `has_more` (false for
    /// a lost response).
    fn round(
        &mut self,
        from: usize,
        to: usize,
        limit: usize,
        scopes: ScopeFilter,
        lose_response: bool,
    ) -> Outcome<bool> {
        let limits = PageLimits {
            versions: limit,
            bytes: 1 << 20,
        };
        let options = ExchangeOptions {
            scopes,
            page_limit: Some(limit),
        };
        let (id_from, id_to) = (self.replicas[from].id, self.replicas[to].id);
        let initiator = &mut self.replicas[from];
        let mut session = initiator.sessions.remove(&id_to).unwrap_or_default();
        if let Some(held) = initiator.answered.remove(&id_to) {
            session.held = Some(held);
        }
        let read = initiator.store.read().map_err(err)?;
        let mut round = Initiation::plan(
            id_from,
            &*read,
            &mut session,
            Some(id_to),
            &options,
            limits,
            &|_| true,
        )
        .map_err(err)?;
        drop(read);
        let mut request = round.request().clone();
        let received = loop {
            let response = self.answer(to, &request)?;
            if lose_response {
                self.replicas[from].sessions.insert(id_to, session);
                return Ok(false);
            }
            match round.receive(response).map_err(err)? {
                Reply::Resend(again) => request = again,
                Reply::Apply(received) => break received,
            }
        };
        let initiator = &mut self.replicas[from];
        let applied = apply(initiator, &received.page, received.knowledge.clone())?;
        let mine = initiator
            .store
            .read()
            .map_err(err)?
            .watermarks()
            .map_err(err)?;
        let mut mine_in_play = mine;
        mine_in_play.retain(|s| round.scopes().contains(s));
        let outcome = round.finish(&mut session, &received, applied, &mine_in_play);
        initiator.sessions.insert(id_to, session);
        Ok(outcome.has_more)
    }

    /// The responder's side, through the wire codec both ways.
    fn answer(&mut self, to: usize, request: &ExchangeRequest) -> Outcome<ExchangeResponse> {
        let request: ExchangeRequest = wire::decode(&wire::encode(request)).map_err(err)?;
        let responder = &mut self.replicas[to];
        let read = responder.store.read().map_err(err)?;
        let limits = PageLimits {
            versions: 10_000,
            bytes: 1 << 20,
        };
        let planned =
            Answer::plan(responder.id, &*read, request, limits, 0, &|_| true).map_err(err)?;
        drop(read);
        let response = match planned {
            Answering::Resend(response) => response,
            Answering::Apply(answer) => {
                let applied = apply(responder, answer.incoming(), answer.knowledge().clone())?;
                let mut marks = responder
                    .store
                    .read()
                    .map_err(err)?
                    .watermarks()
                    .map_err(err)?;
                marks.retain(|s| answer.scopes().contains(s));
                let from = answer.from();
                let (response, held) = answer.respond(applied.halts, Some(marks));
                responder.answered.insert(from, held);
                response
            }
        };
        wire::decode(&wire::encode(&response)).map_err(err)
    }

    /// Every replica's stored state, tombstones included.
    fn state(&self, i: usize) -> Outcome<State> {
        let read = self.replicas[i].store.read().map_err(err)?;
        let mut out = BTreeMap::new();
        for s in 0..3 {
            let range = KeyRange {
                limit: usize::MAX,
                ..KeyRange::default()
            };
            for (key, v) in read.scan(&scope(s), &range).map_err(err)? {
                out.insert((scope(s), key), v);
            }
        }
        Ok(out)
    }

    /// The watermark invariant on every replica (as in [`super::Simulation`]): every
    /// version under a mark is held, or superseded by a version held or still on its way.
    ///
    /// # Errors
    /// The first violation.
    pub fn check_watermarks(&self) -> Outcome {
        for (i, replica) in self.replicas.iter().enumerate() {
            let read = replica.store.read().map_err(err)?;
            let marks = read.watermarks().map_err(err)?;
            let passed =
                |s: &Scope, v: &Version| marks.get(s, v.hlc.origin()).is_some_and(|w| v.hlc <= w);
            for (s, key, v) in &self.history {
                if !passed(s, v) {
                    continue;
                }
                let held = read.get(s, key).map_err(err)?;
                if held.as_ref().is_some_and(|h| h.hlc >= v.hlc) {
                    continue;
                }
                let on_its_way = self
                    .history
                    .iter()
                    .any(|(s2, k2, w)| s2 == s && k2 == key && w.hlc > v.hlc && !passed(s2, w));
                if !on_its_way {
                    return Err(format!(
                        "replica {i}: mark of {s} covers {v:?} of {key:?}, but it holds {held:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rounds between every ordered pair until none has more (bounded), then checks that
    /// every replica equals the oracle and that all marks agree.
    ///
    /// # Errors
    /// What did not converge.
    pub fn converge(&mut self) -> Outcome {
        let n = self.replicas.len();
        for _pass in 0..4 {
            for from in 0..n {
                for to in (0..n).filter(|t| *t != from) {
                    let mut rounds = 0;
                    while self.round(from, to, 1000, ScopeFilter::All, false)? {
                        rounds += 1;
                        if rounds > 100 {
                            return Err(format!("{from} -> {to}: has_more after 100 rounds"));
                        }
                    }
                    self.check_watermarks()?;
                }
            }
        }
        let marks = |i: usize| -> Outcome<_> {
            self.replicas[i]
                .store
                .read()
                .map_err(err)?
                .watermarks()
                .map_err(err)
        };
        for i in 0..n {
            let state = self.state(i)?;
            if state != self.oracle {
                return Err(format!("replica {i} differs from the oracle"));
            }
            if marks(i)? != marks(0)? {
                return Err(format!("replica {i}'s marks differ from replica 0's"));
            }
        }
        Ok(())
    }
}

/// Applies a received page the way a driver does (no blobs, no clock bound): what the core
/// decides, with the sender's knowledge, in one transaction.
fn apply(replica: &mut Replica, page: &Page, knowledge: PeerKnowledge) -> Outcome<AppliedPage> {
    let own = replica
        .store
        .read()
        .map_err(err)?
        .watermarks()
        .map_err(err)?;
    let plan = plan_page_apply(page, replica.id, &own, |_| Ok(()), |_, _, _| true);
    if let Some(top) = plan.upserts.iter().map(|(_, _, v)| v.hlc.time()).max() {
        replica.clock = replica.clock.max(top);
    }
    let mut batch = Batch::new(replica.clock, Durability::Immediate);
    batch.upserts = plan.upserts;
    batch.advances = plan.advances;
    batch.peer = Some(knowledge);
    let report = replica.store.commit(&batch).map_err(err)?;
    Ok(AppliedPage {
        received: page.version_count(),
        applied: report.applied.len(),
        halts: plan.halts,
    })
}

/// Fuzz target `exchange_core`: the first byte picks 2 to 4 replicas, the rest are
/// [`CoreStep::decode_all`]; runs them on a [`CoreModel`] (the watermark invariant after
/// every step), then [`CoreModel::converge`].
///
/// # Errors
/// A description of the broken invariant.
pub fn fuzz_exchange_core(data: &[u8]) -> Result<(), String> {
    let Some((&first, rest)) = data.split_first() else {
        return Ok(());
    };
    let n = 2 + usize::from(first % 3);
    let mut model = CoreModel::new(n)?;
    for step in CoreStep::decode_all(n, rest) {
        model.step(&step)?;
    }
    model.converge()
}
