//! The audit round's driver (initiator) and answer (responder) around
//! [`crate::exchange::audit`], and applying audited versions: by last-write-wins, never
//! moving a watermark.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::LastAudit;
use crate::error::{Error, ProtocolError, Result};
use crate::exchange::apply::skew_reason;
use crate::exchange::audit::{shipped, AuditExt, AuditRequest, AuditResponse, Auditor, Shipment};
use crate::exchange::{Halt, HaltReason, RestoreEvidence};
use crate::hlc::NodeId;
use crate::notify::ChangeKind;
use crate::record::{Key, Scope, ScopeFilter};
use crate::store::{Batch, Durability};
use crate::transport::Transport;

use super::blobs::blobs_of;
use super::{lock, RestoreDetection, SyncEngine};

/// Options of an audit.
#[derive(Clone, Debug, Default)]
pub struct AuditOptions {
    /// The scopes to audit (default: all the peer grants).
    pub scopes: ScopeFilter,
}

/// What an audit found and repaired, seen from the initiator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditOutcome {
    /// The responder.
    pub peer: Option<NodeId>,
    /// Requests sent.
    pub rounds: usize,
    /// Versions the peer sent (it held them and this node did not).
    pub received: usize,
    /// The keys whose stored version here changed: the peer's version won.
    pub repaired: Vec<(Scope, Key)>,
    /// Versions this node sent (it held them and the peer did not).
    pub shipped: usize,
    /// Versions the peer sent that this node refused (clock skew, its own id, below its
    /// purge floor).
    pub halts: Vec<Halt>,
    /// Versions this node sent that the peer refused.
    pub peer_halts: Vec<Halt>,
    /// Blobs fetched from the peer.
    pub blobs_fetched: usize,
    /// Blobs pushed to the peer.
    pub blobs_pushed: usize,
    /// Files of Staged records here that the audit fetched from the peer, by hash.
    pub files_repaired: usize,
    /// Versions the peer sent that this node refused below its purge floor (their keys'
    /// deletes were purged here); the peer was told and drops them.
    pub refused: usize,
    /// Versions of ours the peer refused below its floor, which this node dropped.
    pub dropped: usize,
}

impl AuditOutcome {
    /// Whether the two replicas held the same live contents (nothing moved either way).
    pub fn clean(&self) -> bool {
        self.received == 0 && self.shipped == 0 && self.files_repaired == 0
    }
}

/// What applying audited versions did.
pub(super) struct AppliedVersions {
    pub(super) received: usize,
    /// The keys whose stored version changed.
    pub(super) applied: Vec<(Scope, Key)>,
    pub(super) halts: Vec<Halt>,
    /// Versions refused below the floor (their keys' deletes were purged here).
    pub(super) refused: Vec<super::Refused>,
}

impl SyncEngine {
    /// Audits this node's live contents against the peer's over `transport`, for every
    /// scope the peer grants, and repairs every difference both ways (see
    /// [`crate::exchange::audit`]): each side receives the versions it lacks and keeps the
    /// newer version of every differing key. No watermark moves. Then fetches, by hash,
    /// the files of Staged records here that the peer holds.
    ///
    /// # Errors
    /// The transport failed (a peer without audits answers `Unsupported` or 404), the peer
    /// broke the protocol, or the store failed. What was applied before the error stays.
    pub async fn audit<T: Transport + ?Sized>(&self, transport: &T) -> Result<AuditOutcome> {
        self.audit_with(transport, &AuditOptions::default()).await
    }

    /// Audits as [`SyncEngine::audit`], with `options`.
    ///
    /// # Errors
    /// As for [`SyncEngine::audit`].
    pub async fn audit_with<T: Transport + ?Sized>(
        &self,
        transport: &T,
        options: &AuditOptions,
    ) -> Result<AuditOutcome> {
        let me = self.node_id();
        let mut peer = transport.peer_id();
        if peer == Some(me) {
            return Err(ProtocolError::PeerIsSelf { node: me }.into());
        }
        let engine = self.handle();
        let scopes = options.scopes.clone();
        let mut auditor = self
            .on_storage(move || -> Result<Auditor> {
                let read = engine.inner.store.read()?;
                let local = read.scopes()?;
                Ok(Auditor::start(engine.node_id(), &*read, &scopes, &local)?)
            })
            .await??;
        let mut outcome = AuditOutcome::default();
        let mut refused_here = Vec::new();
        let engine = self.handle();
        let in_play = options.scopes.clone();
        let floors = self
            .on_storage(move || engine.floors_in_play(&in_play))
            .await??;
        loop {
            let engine = self.handle();
            let (back, request) = self
                .on_storage(move || {
                    let request = engine
                        .inner
                        .store
                        .read()
                        .map_err(Error::from)
                        .and_then(|read| Ok(auditor.request(&*read)?));
                    (auditor, request)
                })
                .await?;
            auditor = back;
            // Versions of the last response we refused below our floor are reported with the
            // next request, or with one of their own when the audit is otherwise done.
            let refusals = AuditExt {
                floors: Some(floors.clone()),
                refused: std::mem::take(&mut refused_here),
            };
            let request = request?;
            // The audit is done but for telling the peer what we refused: one last request.
            let closing = request.is_none();
            let mut request = match request {
                Some(request) => request,
                None if refusals.refused.is_empty() => break,
                None => AuditRequest {
                    from: me,
                    scopes: options.scopes.clone(),
                    opening: false,
                    segments: Vec::new(),
                    versions: Vec::new(),
                    wanted: Vec::new(),
                    ext: AuditExt::default(),
                },
            };
            request.ext = refusals;
            outcome.rounds += 1;
            outcome.shipped += shipped(&request.versions).count();
            let blobs = blobs_of(shipped(&request.versions));
            outcome.blobs_pushed += self.push_blobs(transport, blobs).await?;
            let response = transport.audit(request).await?;
            check_responder(me, peer, &response)?;
            peer = Some(response.from);
            outcome.peer_halts.extend(
                (response.halts.iter())
                    .filter(|h| h.holds_stream())
                    .cloned()
                    .chain(Halt::below_floor(&response.ext.refused)),
            );
            let label = response.from.to_string();
            let engine = self.handle();
            let in_play = options.scopes.clone();
            let (response, dropped) = self
                .on_storage(move || {
                    let dropped = engine.drop_refused(&label, &in_play, &response.ext.refused);
                    (response, dropped)
                })
                .await?;
            outcome.dropped += dropped?.len();
            if closing {
                break;
            }
            let (response, applied, fetched) = self
                .take_audited(transport, response, &options.scopes)
                .await?;
            outcome.refused += applied.refused.len();
            outcome.halts.extend(Halt::below_floor(&applied.refused));
            refused_here = applied.refused;
            let engine = self.handle();
            let (back, received) = self
                .on_storage(move || {
                    let received = engine
                        .inner
                        .store
                        .read()
                        .map_err(Error::from)
                        .and_then(|read| Ok(auditor.receive(&*read, &response)?));
                    (auditor, received)
                })
                .await?;
            auditor = back;
            received?;
            outcome.blobs_fetched += fetched;
            outcome.received += applied.received;
            outcome.repaired.extend(applied.applied);
            outcome.halts.extend(applied.halts);
        }
        outcome.peer = peer;
        let halted = (outcome.halts.iter())
            .chain(&outcome.peer_halts)
            .any(Halt::holds_stream);
        if let Some(p) = peer.filter(|_| !halted) {
            let engine = self.handle();
            let scopes = options.scopes.clone();
            self.on_storage(move || engine.adopt_floors(p, &scopes))
                .await??;
        }
        outcome.files_repaired = self.repair_staged(transport).await?;
        if let Some(p) = peer {
            self.note_exchange(p);
            self.note_audit(p, true, &outcome);
        }
        tracing::info!(peer = ?peer.map(|p| p.to_string()), rounds = outcome.rounds,
            received = outcome.received, repaired = outcome.repaired.len(),
            shipped = outcome.shipped, files = outcome.files_repaired, "audit done");
        Ok(outcome)
    }

    /// Fetches the blobs of a response's versions, then applies them (on a blocking
    /// thread). Returns the response, what the apply did, and how many blobs arrived.
    async fn take_audited<T: Transport + ?Sized>(
        &self,
        transport: &T,
        response: AuditResponse,
        scopes: &ScopeFilter,
    ) -> Result<(AuditResponse, AppliedVersions, usize)> {
        let engine = self.handle();
        let (response, needed) = self
            .on_storage(move || {
                let needed = engine.needed_blobs(shipped(&response.versions));
                (response, needed)
            })
            .await?;
        // Pins keep fetched blobs alive until the versions that reference them commit.
        let fetched = self.fetch_blobs(transport, needed?).await;
        let engine = self.handle();
        let scopes = scopes.clone();
        let (response, applied) = self
            .on_storage(move || {
                let from = response.from;
                let applied = engine.apply_versions(
                    &from.to_string(),
                    from,
                    true,
                    &response.versions,
                    &scopes,
                );
                (response, applied)
            })
            .await?;
        Ok((response, applied?, fetched.len()))
    }

    /// Answers one audit request (the responder's half): applies the versions it carries,
    /// then answers its ranges, the versions it asks for and what this node lacks.
    ///
    /// # Errors
    /// The request breaks the protocol (a version outside the scopes in play, or one that
    /// does not validate: nothing of it is applied), or the store failed.
    pub fn answer_audit(&self, request: AuditRequest) -> Result<AuditResponse> {
        let me = self.node_id();
        let from = request.from;
        if from == me {
            return Err(ProtocolError::PeerIsSelf { node: me }.into());
        }
        let label = from.to_string();
        self.drop_refused(&label, &request.scopes, &request.ext.refused)?;
        if let Some(floors) = &request.ext.floors {
            self.heard_floors(from, floors);
        }
        let adopt = self.inner.config.restore_detection == RestoreDetection::Any;
        let applied = self.apply_versions(
            &from.to_string(),
            from,
            adopt,
            &request.versions,
            &request.scopes,
        )?;
        self.note_exchange(from);
        let read = self.inner.store.read()?;
        let scopes = request.scopes.clone();
        let mut response = crate::exchange::audit::respond(
            self.node_id(),
            &*read,
            &request,
            &|s| scopes.contains(s),
            applied.halts,
        )?;
        response.ext.refused = applied.refused;
        drop(read);
        let seen = AuditOutcome {
            received: applied.received,
            repaired: applied.applied,
            shipped: shipped(&response.versions).count(),
            ..AuditOutcome::default()
        };
        self.note_audit(from, false, &seen);
        Ok(response)
    }

    /// The last audit with each peer since the engine was opened, in either role (memory
    /// only; as a responder, each request counts, with what it moved).
    pub fn last_audits(&self) -> HashMap<NodeId, LastAudit> {
        lock(&self.inner.peers).audits.clone()
    }

    fn note_audit(&self, peer: NodeId, initiated: bool, outcome: &AuditOutcome) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let mut peers = lock(&self.inner.peers);
        let entry = peers.audits.entry(peer).or_default();
        // A responder sees an audit as several requests: it sums them while they come.
        let same =
            !initiated && !entry.initiated && at_unix_ms.saturating_sub(entry.at_unix_ms) < 60_000;
        let base = if same { *entry } else { LastAudit::default() };
        *entry = LastAudit {
            at_unix_ms,
            initiated,
            received: base.received + count(outcome.received),
            repaired: base.repaired + count(outcome.repaired.len()),
            shipped: base.shipped + count(outcome.shipped),
            files_repaired: base.files_repaired + count(outcome.files_repaired),
        };
    }

    /// Applies audited versions in one durable transaction, by last-write-wins, moving no
    /// watermark. Versions too far ahead of our clock are refused, and so are versions of
    /// our own id above our own mark, unless `adopt` says to act on that evidence of a
    /// restore (see [`SyncEngine::take_fresh_identity`]); versions of our id at or below
    /// our mark are ours, lost here, and apply. A version whose blob is not here applies
    /// Staged.
    ///
    /// # Errors
    /// A version outside `scopes` or one that does not validate (nothing applies); a store
    /// failure.
    pub(super) fn apply_versions(
        &self,
        peer: &str,
        from: NodeId,
        adopt: bool,
        shipment: &Shipment,
        scopes: &ScopeFilter,
    ) -> Result<AppliedVersions> {
        validate(shipment, scopes)?;
        let received = shipped(shipment).count();
        if received == 0 {
            return Ok(AppliedVersions {
                received,
                applied: Vec::new(),
                halts: Vec::new(),
                refused: Vec::new(),
            });
        }
        let own = self.inner.store.read()?.watermarks()?;
        let mut me = self.node_id();
        let evidence = shipped(shipment).find_map(|(scope, _, v)| {
            let ours = own.get(scope, me);
            (v.hlc.origin() == me && ours < Some(v.hlc)).then(|| RestoreEvidence {
                scope: scope.clone(),
                ours,
                theirs: v.hlc,
            })
        });
        match evidence {
            Some(evidence) if adopt => me = self.take_fresh_identity(peer, &evidence)?,
            Some(evidence) => self.warn_of_evidence(peer, from, &evidence),
            None => {}
        }
        // IMPORTANT: pinned from the presence check to the commit (as for a page).
        let (_pins, ()) = self.pin_for_commit(
            blobs_of(shipped(shipment)).into_iter().map(|b| b.hash),
            || Ok(()),
        )?;
        let mut refused: BTreeMap<(Scope, NodeId), HaltReason> = BTreeMap::new();
        let mut batch = Batch::new(0, Durability::Immediate);
        for (scope, key, v) in shipped(shipment) {
            let origin = v.hlc.origin();
            if origin == me && own.get(scope, me) < Some(v.hlc) {
                refused.insert((scope.clone(), me), HaltReason::OwnOrigin);
                continue;
            }
            if let Err(e) = self.inner.clock.check(v.hlc) {
                refused
                    .entry((scope.clone(), origin))
                    .or_insert_with(|| skew_reason(&e));
                continue;
            }
            batch.upserts.push((scope.clone(), key.clone(), v.clone()));
        }
        let halts: Vec<Halt> = refused
            .into_iter()
            .map(|((scope, origin), reason)| Halt {
                scope,
                origin,
                reason,
            })
            .collect();
        if batch.upserts.is_empty() {
            self.announce_halts(peer, &halts);
            return Ok(AppliedVersions {
                received,
                applied: Vec::new(),
                halts,
                refused: Vec::new(),
            });
        }
        if let Some(max) = batch.upserts.iter().map(|(_, _, v)| v.hlc).max() {
            // Every accepted version passed the drift check above.
            self.inner.clock.raise(max);
        }
        batch.clock = self.inner.clock.last();
        let report = self.inner.store.commit(&batch)?;
        lock(&self.inner.guards).referenced(
            batch
                .upserts
                .iter()
                .filter_map(|(_, _, v)| v.blob().map(|b| b.hash)),
        );
        let removable = self
            .inner
            .note_commit(Durability::Immediate, 0, report.unreferenced);
        self.remove_unreferenced(&removable);
        let applied: Vec<(Scope, Key)> = report
            .applied
            .iter()
            .map(|&i| {
                let (s, k, _) = &batch.upserts[i];
                (s.clone(), k.clone())
            })
            .collect();
        self.announce(
            ChangeKind::RemoteUpdateAvailable,
            Some(from),
            report.applied.iter().map(|&i| {
                let (s, k, v) = &batch.upserts[i];
                (s, k, v.hlc)
            }),
        );
        self.announce_halts(peer, &halts);
        let refused = self.refused_in(peer, &batch, &report.refused);
        Ok(AppliedVersions {
            received,
            applied,
            halts,
            refused,
        })
    }
}

/// The responder must be another node, and the one the audit started with.
fn check_responder(me: NodeId, peer: Option<NodeId>, response: &AuditResponse) -> Result<()> {
    if response.from == me {
        return Err(ProtocolError::PeerIsSelf { node: me }.into());
    }
    match peer {
        Some(expected) if expected != response.from => Err(ProtocolError::UnexpectedPeer {
            expected,
            found: response.from,
        }
        .into()),
        _ => Ok(()),
    }
}

/// Every version of `shipment` is in a scope in play and valid, or nothing applies.
fn validate(shipment: &Shipment, scopes: &ScopeFilter) -> Result<(), ProtocolError> {
    for (scope, key, v) in shipped(shipment) {
        if !scopes.contains(scope) {
            return Err(ProtocolError::ScopeNotInPlay {
                scope: scope.clone(),
            });
        }
        if v.op.validate().is_err() {
            return Err(ProtocolError::MalformedVersion {
                scope: scope.clone(),
                key: key.clone(),
                reason: "value over the size limit",
            });
        }
    }
    Ok(())
}

impl SyncEngine {
    /// Fetches from the peer, by hash, the files that stored versions here reference and the
    /// blob store lacks (a blob directory that was lost, or not restored with its database):
    /// their records are Staged, and no round brings them again because the marks already
    /// passed them. Each file is verified by its hash. Returns how many arrived.
    ///
    /// # Errors
    /// The store failed, or the transport failed asking which files the peer holds.
    pub(super) async fn repair_staged<T: Transport + ?Sized>(
        &self,
        transport: &T,
    ) -> Result<usize> {
        let mut after = None;
        let mut repaired = 0;
        loop {
            let engine = self.handle();
            let (missing, last) = self
                .on_storage(move || engine.missing_referenced(after, 1024))
                .await??;
            if !missing.is_empty() {
                let present = transport
                    .blobs_present(missing.iter().map(|b| b.hash).collect())
                    .await?;
                let there: Vec<_> = missing
                    .into_iter()
                    .zip(present)
                    .filter_map(|(b, p)| p.then_some(b))
                    .collect();
                repaired += self.fetch_blobs(transport, there).await.len();
            }
            match last {
                Some(last) => after = Some(last),
                None => return Ok(repaired),
            }
        }
    }

    /// Whether any stored version references a file the blob store lacks (its record is
    /// Staged): the files an audit's repair would fetch. Looks at every referenced blob; a
    /// store failure counts as none missing.
    pub async fn missing_files(&self) -> bool {
        let engine = self.handle();
        let found = self.on_storage(move || -> Result<bool> {
            let mut after = None;
            loop {
                let (missing, last) = engine.missing_referenced(after, 1024)?;
                if !missing.is_empty() {
                    return Ok(true);
                }
                match last {
                    Some(last) => after = Some(last),
                    None => return Ok(false),
                }
            }
        });
        matches!(found.await, Ok(Ok(true)))
    }

    /// How many distinct files stored versions reference that the blob store lacks (their
    /// records are Staged). Looks at every referenced blob (one lookup each): a blocking
    /// call, for status and metrics rather than for every request.
    ///
    /// # Errors
    /// A store or blob store failure.
    pub fn staged_files(&self) -> Result<u64> {
        let mut count = 0u64;
        let mut after = None;
        loop {
            let (missing, last) = self.missing_referenced(after, 1024)?;
            count += missing.len() as u64;
            match last {
                Some(last) => after = Some(last),
                None => return Ok(count),
            }
        }
    }

    /// Up to `limit` referenced blobs after `after` (in hash order) that the blob store
    /// lacks; and the last hash looked at, if more may follow.
    fn missing_referenced(
        &self,
        after: Option<crate::hash::Hash>,
        limit: usize,
    ) -> Result<(Vec<crate::record::BlobRef>, Option<crate::hash::Hash>)> {
        let blobs = self
            .inner
            .store
            .read()?
            .referenced_blobs(after.as_ref(), limit)?;
        let last = (blobs.len() == limit)
            .then(|| blobs.last().map(|b| b.hash))
            .flatten();
        let mut missing = Vec::new();
        for blob in blobs {
            if !self.inner.blobs.contains(&blob.hash)? {
                missing.push(blob);
            }
        }
        Ok((missing, last))
    }
}
