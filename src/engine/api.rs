//! The records, files and status API of a node, as the engine answers it: [`NodeApi`] for
//! [`SyncEngine`]. The work runs off the async runtime's threads ([`run_blocking`]) on a
//! handle of the engine. The listing (records with their residency) and the status document
//! are built here, and only here.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::UNIX_EPOCH;

use futures_util::future::BoxFuture;

use super::SyncEngine;
use crate::api::{
    BlobTotals, FileRead, Gap, ListQuery, Listed, Listing, Lookup, NodeApi, PeerLag, RecordRead,
    ResidencyTotals, Routed, ScopeStatus, Source, Status, Visible, Written, MAX_LIST_LIMIT,
    UNACKNOWLEDGED_COUNTED,
};
use crate::blocking::run_blocking;
use crate::error::Result;
use crate::hlc::{Hlc, NodeId};
use crate::record::{Hydration, Key, Op, Scope};
use crate::watermark::ScopedWatermarks;

impl NodeApi for SyncEngine {
    fn put(&self, scope: Scope, key: Key, value: Vec<u8>) -> BoxFuture<'_, Result<Written>> {
        blocking(self, move |e| {
            let hlc = e.put(&scope, &key, value)?;
            Ok(Written { hlc, file: None })
        })
    }

    fn get(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Lookup>> {
        blocking(self, move |e| e.lookup(&scope, &key))
    }

    fn delete(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Written>> {
        blocking(self, move |e| {
            let hlc = e.delete(&scope, &key)?;
            Ok(Written { hlc, file: None })
        })
    }

    fn list(&self, scope: Scope, query: ListQuery) -> BoxFuture<'_, Result<Listing>> {
        blocking(self, move |e| e.listing(&scope, &query))
    }

    fn put_file(
        &self,
        scope: Scope,
        key: Key,
        value: Vec<u8>,
        mut content: Box<dyn Read + Send>,
    ) -> BoxFuture<'_, Result<Written>> {
        blocking(self, move |e| {
            let hlc = e.put_file(&scope, &key, value, &mut content)?;
            // The record as written, unless a newer write replaced it meanwhile.
            let file = e
                .get(&scope, &key)?
                .filter(|r| r.hlc == hlc)
                .and_then(|r| r.blob);
            Ok(Written { hlc, file })
        })
    }

    fn get_file(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<FileRead>> {
        blocking(self, move |e| e.file_read(&scope, &key))
    }

    fn status(&self, visible: Visible) -> BoxFuture<'_, Result<Status>> {
        blocking(self, move |e| e.status_of(&*visible))
    }

    fn get_routed(&self, scope: Scope, key: Key) -> BoxFuture<'_, Result<Routed<Lookup>>> {
        Box::pin(async move {
            let (hydration, route) = self.routing(&scope).await?;
            let here = {
                let (scope, key) = (scope.clone(), key.clone());
                blocking(self, move |e| e.lookup_versioned(&scope, &key))
            };
            let Some((peer, api)) = route else {
                let (_, value) = here.await?;
                return Ok(routed(value, Source::Local, hydration));
            };
            let remote = ask(api.get(scope.clone(), key)).await;
            let (local_hlc, local) = here.await?;
            let remote = match remote {
                Ok(remote) => remote,
                Err(e) => {
                    unrouted(&peer, &scope, &e);
                    return Ok(routed(local, Source::Local, hydration));
                }
            };
            // This node's own version wins where it is newer than the peer's (a write not
            // pushed yet): the answer the next rounds converge to.
            let ours_newer = match (&remote, local_hlc) {
                (Lookup::Found(theirs), Some(ours)) => ours > theirs.hlc,
                (Lookup::Missing, Some(_)) => true,
                // The peer's delete: its time is not in the answer, so the peer's stands.
                (Lookup::Deleted, _) | (_, None) => false,
            };
            Ok(match ours_newer {
                true => routed(local, Source::Local, hydration),
                false => routed(remote, Source::Remote { peer }, hydration),
            })
        })
    }

    fn list_routed(
        &self,
        scope: Scope,
        query: ListQuery,
    ) -> BoxFuture<'_, Result<Routed<Listing>>> {
        Box::pin(async move {
            let (hydration, route) = self.routing(&scope).await?;
            let here = {
                let (scope, query) = (scope.clone(), query.clone());
                blocking(self, move |e| e.listing(&scope, &query))
            };
            let Some((peer, api)) = route else {
                return Ok(routed(here.await?, Source::Local, hydration));
            };
            let limit = query.limit.clamp(1, MAX_LIST_LIMIT);
            let remote = ask(api.list(scope.clone(), query)).await;
            let local = here.await?;
            Ok(match remote {
                Ok(remote) => routed(
                    merge_listings(remote, local, limit),
                    Source::Remote { peer },
                    hydration,
                ),
                Err(e) => {
                    unrouted(&peer, &scope, &e);
                    routed(local, Source::Local, hydration)
                }
            })
        })
    }
}

/// How long a routed read waits for the peer before it answers from this node instead.
pub const ROUTED_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The peer's answer to a routed read, or an error once [`ROUTED_READ_TIMEOUT`] passed
/// (inside a tokio runtime: a peer that is slow to answer must not hold up a screen).
async fn ask<T>(read: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_err() {
        return read.await;
    }
    match tokio::time::timeout(ROUTED_READ_TIMEOUT, read).await {
        Ok(answer) => answer,
        Err(_) => Err(crate::error::TransportError::Unreachable {
            reason: format!("no answer within {ROUTED_READ_TIMEOUT:?}"),
        }
        .into()),
    }
}

fn routed<T>(value: T, source: Source, hydration: Hydration) -> Routed<T> {
    Routed {
        value,
        source,
        hydration,
    }
}

/// A routed read that the peer could not answer, answered from here instead.
fn unrouted(peer: &str, scope: &Scope, e: &crate::Error) {
    tracing::debug!(%peer, %scope, error = %crate::error::error_chain(e),
        "the peer hydrating the scope cannot answer a read; answering from this node");
}

/// A page of the peer's listing and the same page of ours, merged: per key the newer
/// version (ours where the peer lacks it or holds an older one), the first `limit` keys.
/// Either page being full means more may follow: the merged page then names its last key
/// to go on after, and a key either side left beyond it comes in the next page.
fn merge_listings(remote: Listing, local: Listing, limit: usize) -> Listing {
    let more = remote.next_after.is_some() || local.next_after.is_some();
    let mut merged: BTreeMap<Key, Listed> = remote
        .records
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
    for ours in local.records {
        match merged.get(&ours.key) {
            Some(theirs) if theirs.hlc >= ours.hlc => {}
            _ => {
                merged.insert(ours.key.clone(), ours);
            }
        }
    }
    let cut = merged.len() > limit;
    let records: Vec<Listed> = merged.into_values().take(limit).collect();
    let next_after = records
        .last()
        .filter(|_| cut || more)
        .map(|last| last.key.clone());
    Listing {
        records,
        next_after,
    }
}

/// Runs `work` on a handle of `engine` off the async runtime's threads.
fn blocking<T: Send + 'static>(
    engine: &SyncEngine,
    work: impl FnOnce(&SyncEngine) -> Result<T> + Send + 'static,
) -> BoxFuture<'static, Result<T>> {
    let engine = engine.handle();
    Box::pin(async move { run_blocking(move || work(&engine)).await? })
}

impl SyncEngine {
    fn lookup(&self, scope: &Scope, key: &Key) -> Result<Lookup> {
        Ok(self.lookup_versioned(scope, key)?.1)
    }

    /// The lookup, with the Hlc of the stored version (a tombstone's too).
    fn lookup_versioned(&self, scope: &Scope, key: &Key) -> Result<(Option<Hlc>, Lookup)> {
        let Some(version) = self.get_version(scope, key)? else {
            return Ok((None, Lookup::Missing));
        };
        let residency = self.residency_of(Some(&version))?;
        let hlc = version.hlc;
        Ok((
            Some(hlc),
            match version.op {
                Op::Put { value, .. } => Lookup::Found(RecordRead {
                    value,
                    hlc,
                    residency,
                }),
                Op::Delete => Lookup::Deleted,
            },
        ))
    }

    /// A routed read's scope: its hydration here, and the peer to ask while it is not
    /// ready (if a scheduler names one).
    async fn routing(
        &self,
        scope: &Scope,
    ) -> Result<(Hydration, Option<(String, std::sync::Arc<dyn NodeApi>)>)> {
        let hydration = {
            let scope = scope.clone();
            blocking(self, move |e| e.hydration(&scope)).await?
        };
        let route = match hydration {
            Hydration::Ready => None,
            Hydration::NotStarted | Hydration::Hydrating => self.route(scope),
        };
        Ok((hydration, route))
    }

    fn listing(&self, scope: &Scope, query: &ListQuery) -> Result<Listing> {
        let limit = query.limit.clamp(1, MAX_LIST_LIMIT);
        let rows = self.scan(scope, &query.prefix, query.after.as_ref(), limit)?;
        let full = rows.len() == limit;
        let mut records = Vec::with_capacity(rows.len());
        for r in rows {
            let residency = self.record_residency(&r)?;
            records.push(Listed {
                size: r.value.len() as u64,
                value: String::from_utf8(r.value).ok(),
                file: r.blob,
                hlc: r.hlc,
                residency,
                key: r.key,
            });
        }
        let next_after = records.last().filter(|_| full).map(|last| last.key.clone());
        Ok(Listing {
            records,
            next_after,
        })
    }

    fn file_read(&self, scope: &Scope, key: &Key) -> Result<FileRead> {
        let Some(record) = self.get(scope, key)? else {
            return Ok(FileRead::Missing);
        };
        let Some(blob) = record.blob else {
            return Ok(FileRead::NoFile);
        };
        Ok(match self.inner.blobs.open(&blob.hash)? {
            Some((_, reader)) => FileRead::Ready {
                blob,
                hlc: record.hlc,
                reader,
            },
            None => FileRead::Staged { hlc: record.hlc },
        })
    }

    /// The status document, limited to the scopes `visible` accepts (peer ids and blob
    /// totals are shown whatever it says).
    fn status_of(&self, visible: &(dyn Fn(&Scope) -> bool + Send + Sync)) -> Result<Status> {
        let marks = self.watermarks()?;
        let mut scopes = BTreeMap::new();
        for scope in self.scopes()?.into_iter().filter(|s| visible(s)) {
            let counts = self.residency_counts(&scope)?;
            let watermarks = marks
                .scope(&scope)
                .map(|w| w.iter().map(|h| (h.origin(), h)).collect())
                .unwrap_or_default();
            let residency = ResidencyTotals {
                resident: counts.resident as u64,
                staged: counts.staged as u64,
                tombstoned: counts.tombstoned as u64,
            };
            let hydration = self.hydration(&scope)?;
            scopes.insert(
                scope,
                ScopeStatus {
                    watermarks,
                    residency,
                    hydration,
                },
            );
        }
        let last = self.last_exchanges();
        let audits = self.last_audits();
        let mut peers = Vec::new();
        for peer in self.peers()? {
            let known = self.peer_watermarks(peer)?.unwrap_or_default();
            let lacks = ahead(&marks, &known, visible)
                .map(|(scope, origin, ours, theirs)| Gap {
                    scope,
                    origin,
                    ours: Some(ours),
                    theirs,
                })
                .collect();
            // What the peer held, as of the last round, that we lack.
            let behind = ahead(&known, &marks, visible)
                .map(|(scope, origin, theirs, ours)| Gap {
                    scope,
                    origin,
                    ours,
                    theirs: Some(theirs),
                })
                .collect();
            let last_exchange_unix_ms = last
                .get(&peer)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64);
            peers.push(PeerLag {
                id: peer,
                last_exchange_unix_ms,
                lacks,
                behind,
                last_audit: audits.get(&peer).copied(),
            });
        }
        let mut configured_peers = self.links();
        for link in &mut configured_peers {
            if let Some(peer) = link.id {
                let known = self.peer_watermarks(peer)?.unwrap_or_default();
                link.unacknowledged = self.unacknowledged(&marks, &known, visible)?;
                link.last_audit = audits.get(&peer).copied();
            }
            link.halted.retain(|h| visible(&h.scope));
        }
        let blobs = self.inner.blobs.list()?;
        Ok(Status {
            node: self.node_id(),
            scopes,
            peers,
            configured_peers,
            clock_ahead_ms: millis(self.clock_ahead()),
            max_drift_ms: millis(self.inner.config.max_drift),
            blobs: BlobTotals {
                count: blobs.len() as u64,
                bytes: blobs.iter().map(|(_, n)| n).sum(),
            },
        })
    }
}

impl SyncEngine {
    /// Live versions of this node's own writes in the visible scopes above what a peer's
    /// `known` marks cover (at most [`UNACKNOWLEDGED_COUNTED`] per scope).
    fn unacknowledged(
        &self,
        marks: &ScopedWatermarks,
        known: &ScopedWatermarks,
        visible: &(dyn Fn(&Scope) -> bool + Send + Sync),
    ) -> Result<u64> {
        let me = self.node_id();
        let mut count = 0u64;
        for (scope, _) in marks.iter().filter(|(s, _)| visible(s)) {
            let Some(ours) = marks.get(scope, me) else {
                continue;
            };
            let theirs = known.get(scope, me);
            if theirs >= Some(ours) {
                continue;
            }
            let read = self.inner.store.read()?;
            let rows = read.live_range(scope, me, theirs, ours, UNACKNOWLEDGED_COUNTED)?;
            count += rows.len() as u64;
        }
        Ok(count)
    }
}

/// The visible streams where `mine` is ahead of `other`: (scope, origin, my mark, the other
/// side's mark).
fn ahead<'a>(
    mine: &'a ScopedWatermarks,
    other: &'a ScopedWatermarks,
    visible: &'a (dyn Fn(&Scope) -> bool + Send + Sync),
) -> impl Iterator<Item = (Scope, NodeId, Hlc, Option<Hlc>)> + 'a {
    mine.iter()
        .filter(|(scope, _)| visible(scope))
        .flat_map(move |(scope, marks)| {
            marks.iter().filter_map(move |mark| {
                let theirs = other.get(scope, mark.origin());
                (theirs < Some(mark)).then(|| (scope.clone(), mark.origin(), mark, theirs))
            })
        })
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
