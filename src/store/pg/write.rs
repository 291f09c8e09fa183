//! Commits: `apply_batch` over [`Writer`], the row operations of one PostgreSQL
//! transaction.

use postgres::types::ToSql;
use postgres::{IsolationLevel, Row, Transaction};

use std::collections::HashMap;

use postgres::Statement;

use super::{decode_version, encode_version, from_sql, pg, prepared, to_sql, PgStore};
use crate::error::StoreError;
use crate::hlc::{Hlc, NodeId};
use crate::record::{BlobRef, Key, Scope, ScopeFilter, Version};
use crate::store::{
    apply_batch, Batch, BatchReport, Durability, PeerKnowledge, ScopeRefs, Store, StoreRead, TxnOps,
};

/// The row operations of one transaction that holds the store's commit lock.
struct Writer<'a, 'c> {
    txn: &'a mut Transaction<'c>,
    statements: &'a mut HashMap<&'static str, Statement>,
}

/// Begins a READ COMMITTED transaction and takes the store's commit lock.
///
/// IMPORTANT: every commit takes this lock first, so commits run one at a time and each
/// statement of a commit sees every commit before it: the merge, the conditional watermark
/// advance (`base <= W`) and the counts are read and written under it, in the same
/// transaction as the versions they concern.
fn begin(conn: &mut postgres::Client) -> Result<Transaction<'_>, StoreError> {
    let mut txn = conn
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .map_err(pg)?;
    txn.execute(
        "SELECT num FROM highwater_meta WHERE name = 'clock' FOR UPDATE",
        &[],
    )
    .map_err(pg)?;
    Ok(txn)
}

/// A stored version from a `(key, version)` join of the key index, checking it is `key`'s.
fn stored_of(key: &Key, row: Option<Row>) -> Result<Option<Version>, StoreError> {
    let Some(row) = row else {
        return Ok(None);
    };
    let stored: Option<&[u8]> = row.try_get(0).map_err(pg)?;
    let version: Option<&[u8]> = row.try_get(1).map_err(pg)?;
    match (stored, version) {
        (Some(k), Some(v)) if k == key.as_bytes() => decode_version(v).map(Some),
        _ => Err(StoreError::Corrupt { what: "key index" }),
    }
}

impl Writer<'_, '_> {
    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let statement = prepared(self.txn, self.statements, sql)?;
        self.txn.execute(&statement, params).map_err(pg)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let statement = prepared(self.txn, self.statements, sql)?;
        self.txn.query_opt(&statement, params).map_err(pg)
    }

    fn set_position(&mut self, scope: &Scope, key: &Key, hlc: Hlc) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO highwater_keys (scope, key, origin, time) VALUES ($1, $2, $3, $4)
             ON CONFLICT (scope, key) DO UPDATE SET origin = EXCLUDED.origin, time = EXCLUDED.time",
            &[
                &scope.as_str(),
                &key.as_bytes(),
                &hlc.origin().to_bytes().as_slice(),
                &to_sql(hlc.time()),
            ],
        )?;
        Ok(())
    }
}

/// The scopes whose stored versions or marks `batch` changed, as `report` says.
fn changed_scopes<'b>(batch: &'b Batch, report: &BatchReport) -> Vec<&'b Scope> {
    let mut scopes: Vec<&Scope> = report
        .applied
        .iter()
        .map(|&i| &batch.upserts[i].0)
        .chain(
            batch
                .advances
                .iter()
                .zip(&report.advanced)
                .filter(|(_, moved)| **moved)
                .map(|(a, _)| &a.scope),
        )
        .collect();
    if report.removed > 0 {
        scopes.extend(batch.removals.iter().map(|(s, _, _)| s));
    }
    scopes.sort_unstable();
    scopes.dedup();
    scopes
}

impl Writer<'_, '_> {
    /// Numbers this commit in the change feed and notes the scopes it changed, under
    /// `writer`, then wakes the listeners (PostgreSQL delivers the notification at commit,
    /// and not at all on a rollback).
    fn record_changes(
        &mut self,
        writer: i64,
        cause: Option<NodeId>,
        scopes: &[&Scope],
    ) -> Result<(), StoreError> {
        let seq: i64 = self
            .query_opt(
                "UPDATE highwater_meta SET num = num + 1 WHERE name = 'changes' RETURNING num",
                &[],
            )?
            .ok_or(StoreError::Corrupt {
                what: "change counter",
            })?
            .try_get(0)
            .map_err(pg)?;
        let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let cause = cause.map(NodeId::to_bytes);
        let cause: &[u8] = cause.as_ref().map_or(&[], |c| c.as_slice());
        self.execute(
            "INSERT INTO highwater_changes (scope, writer, cause, seq, at)
             SELECT s, $2, $3, $4, now() FROM unnest($1::text[]) AS s
             ON CONFLICT (scope, writer, cause)
             DO UPDATE SET seq = EXCLUDED.seq, at = EXCLUDED.at",
            &[&names, &writer, &cause, &seq],
        )?;
        self.execute(
            "SELECT pg_notify('highwater_changes', current_schema())",
            &[],
        )?;
        Ok(())
    }
}

impl TxnOps for Writer<'_, '_> {
    fn swap_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<Option<Version>, StoreError> {
        // One statement: the CTEs see the snapshot before the upsert, so `old` is the
        // position it replaced, and the replaced version's row is still there.
        let row = self.query_opt(
            "WITH old AS (
                 SELECT origin, time FROM highwater_keys WHERE scope = $1 AND key = $2
             ), up AS (
                 INSERT INTO highwater_keys (scope, key, origin, time) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (scope, key)
                 DO UPDATE SET origin = EXCLUDED.origin, time = EXCLUDED.time
             )
             SELECT v.key, v.version FROM old LEFT JOIN highwater_versions v
               ON v.scope = $1 AND v.origin = old.origin AND v.time = old.time",
            &[
                &scope.as_str(),
                &key.as_bytes(),
                &version.hlc.origin().to_bytes().as_slice(),
                &to_sql(version.hlc.time()),
            ],
        )?;
        stored_of(key, row)
    }

    fn take_record(&mut self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        let row = self.query_opt(
            "WITH old AS (
                 DELETE FROM highwater_keys WHERE scope = $1 AND key = $2 RETURNING origin, time
             )
             SELECT v.key, v.version FROM old LEFT JOIN highwater_versions v
               ON v.scope = $1 AND v.origin = old.origin AND v.time = old.time",
            &[&scope.as_str(), &key.as_bytes()],
        )?;
        stored_of(key, row)
    }

    fn has_record(&mut self, scope: &Scope, key: &Key) -> Result<bool, StoreError> {
        Ok(self
            .query_opt(
                "SELECT 1 FROM highwater_keys WHERE scope = $1 AND key = $2",
                &[&scope.as_str(), &key.as_bytes()],
            )?
            .is_some())
    }

    fn get_floor(&mut self, scope: &Scope) -> Result<u64, StoreError> {
        let row = self.query_opt(
            "SELECT time FROM highwater_floors WHERE scope = $1",
            &[&scope.as_str()],
        )?;
        match row {
            Some(r) => Ok(from_sql(r.try_get(0).map_err(pg)?)),
            None => Ok(0),
        }
    }

    fn set_floor(&mut self, scope: &Scope, time: u64) -> Result<(), StoreError> {
        if time > 0 {
            self.execute(
                "INSERT INTO highwater_floors (scope, time) VALUES ($1, $2)
                 ON CONFLICT (scope) DO UPDATE SET time = EXCLUDED.time",
                &[&scope.as_str(), &to_sql(time)],
            )?;
        }
        Ok(())
    }

    fn remove_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM highwater_marks WHERE scope = $1 AND origin = $2",
            &[&scope.as_str(), &origin.to_bytes().as_slice()],
        )?;
        Ok(())
    }

    fn forget_peer(&mut self, peer: NodeId) -> Result<(), StoreError> {
        let id = peer.to_bytes();
        self.execute(
            "DELETE FROM highwater_peer_marks WHERE peer = $1",
            &[&id.as_slice()],
        )?;
        self.execute(
            "DELETE FROM highwater_peers WHERE peer = $1",
            &[&id.as_slice()],
        )?;
        Ok(())
    }

    fn raise_seen(&mut self, peer: NodeId, time: u64) -> Result<(), StoreError> {
        // A peer seen is a peer met: the row is made if missing.
        self.execute(
            "INSERT INTO highwater_peers (peer, seen) VALUES ($1, $2)
             ON CONFLICT (peer) DO UPDATE SET seen = GREATEST(highwater_peers.seen, EXCLUDED.seen)",
            &[&peer.to_bytes().as_slice(), &to_sql(time)],
        )?;
        Ok(())
    }

    fn put_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError> {
        self.set_position(scope, key, version.hlc)
    }

    fn live_key_at(&mut self, scope: &Scope, hlc: Hlc) -> Result<Option<Key>, StoreError> {
        let row = self.query_opt(
            "SELECT key FROM highwater_versions WHERE scope = $1 AND origin = $2 AND time = $3",
            &[
                &scope.as_str(),
                &hlc.origin().to_bytes().as_slice(),
                &to_sql(hlc.time()),
            ],
        )?;
        row.map(|r| super::key_of(r.try_get(0).map_err(pg)?))
            .transpose()
    }

    fn remove_live(&mut self, scope: &Scope, _key: &Key, hlc: Hlc) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM highwater_versions WHERE scope = $1 AND origin = $2 AND time = $3",
            &[
                &scope.as_str(),
                &hlc.origin().to_bytes().as_slice(),
                &to_sql(hlc.time()),
            ],
        )?;
        Ok(())
    }

    fn insert_live(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError> {
        let hlc = version.hlc;
        self.execute(
            "INSERT INTO highwater_versions (scope, origin, time, key, version)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (scope, origin, time)
             DO UPDATE SET key = EXCLUDED.key, version = EXCLUDED.version",
            &[
                &scope.as_str(),
                &hlc.origin().to_bytes().as_slice(),
                &to_sql(hlc.time()),
                &key.as_bytes(),
                &encode_version(version),
            ],
        )?;
        Ok(())
    }

    fn get_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<Option<Hlc>, StoreError> {
        let row = self.query_opt(
            "SELECT time FROM highwater_marks WHERE scope = $1 AND origin = $2",
            &[&scope.as_str(), &origin.to_bytes().as_slice()],
        )?;
        row.map(|r| Ok(Hlc::new(from_sql(r.try_get(0).map_err(pg)?), origin)))
            .transpose()
    }

    fn set_mark(&mut self, scope: &Scope, mark: Hlc) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO highwater_marks (scope, origin, time) VALUES ($1, $2, $3)
             ON CONFLICT (scope, origin) DO UPDATE SET time = EXCLUDED.time",
            &[
                &scope.as_str(),
                &mark.origin().to_bytes().as_slice(),
                &to_sql(mark.time()),
            ],
        )?;
        Ok(())
    }

    fn replace_peer_marks(&mut self, k: &PeerKnowledge) -> Result<(), StoreError> {
        let id = k.peer.to_bytes();
        match &k.scopes {
            ScopeFilter::All => self.execute(
                "DELETE FROM highwater_peer_marks WHERE peer = $1",
                &[&id.as_slice()],
            )?,
            ScopeFilter::Only(set) => {
                let scopes: Vec<&str> = set.iter().map(Scope::as_str).collect();
                self.execute(
                    "DELETE FROM highwater_peer_marks WHERE peer = $1 AND scope = ANY($2)",
                    &[&id.as_slice(), &scopes],
                )?
            }
        };
        // The peer's row says it was met; its last-seen time is kept.
        self.execute(
            "INSERT INTO highwater_peers (peer, seen) VALUES ($1, $2) ON CONFLICT (peer) DO NOTHING",
            &[&id.as_slice(), &to_sql(0)],
        )?;
        let (mut scopes, mut origins, mut times) = (Vec::new(), Vec::new(), Vec::new());
        for (scope, marks) in k.marks.iter() {
            if !k.scopes.contains(scope) {
                continue;
            }
            for hlc in marks.iter() {
                scopes.push(scope.as_str());
                origins.push(hlc.origin().to_bytes().to_vec());
                times.push(to_sql(hlc.time()));
            }
        }
        if !scopes.is_empty() {
            self.execute(
                "INSERT INTO highwater_peer_marks (peer, scope, origin, time)
                 SELECT $1, m.scope, m.origin, m.time
                 FROM unnest($2::text[], $3::bytea[], $4::bigint[]) AS m(scope, origin, time)",
                &[&id.as_slice(), &scopes, &origins, &times],
            )?;
        }
        Ok(())
    }

    fn raise_clock(&mut self, time: u64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE highwater_meta SET num = GREATEST(num, $1) WHERE name = 'clock'",
            &[&to_sql(time)],
        )?;
        Ok(())
    }

    fn issued(&mut self) -> Result<(u64, Option<NodeId>), StoreError> {
        let issued = self
            .query_opt("SELECT num FROM highwater_meta WHERE name = 'issued'", &[])?
            .map(|row| row.try_get::<_, i64>(0).map(from_sql))
            .transpose()
            .map_err(pg)?
            .unwrap_or(0);
        let identity = self
            .query_opt(
                "SELECT bytes FROM highwater_meta WHERE name = 'node_id'",
                &[],
            )?
            .map(|row| {
                let bytes: &[u8] = row.try_get(0).map_err(pg)?;
                super::node_id(bytes, "node id")
            })
            .transpose()?;
        Ok((issued, identity))
    }

    fn set_issued(&mut self, time: u64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO highwater_meta (name, num) VALUES ('issued', $1)
             ON CONFLICT (name) DO UPDATE SET num = EXCLUDED.num",
            &[&to_sql(time)],
        )?;
        Ok(())
    }

    fn adjust_blob_refs(
        &mut self,
        scope: &Scope,
        blob: &BlobRef,
        delta: i64,
    ) -> Result<u64, StoreError> {
        let hash = blob.hash.as_bytes().as_slice();
        let corrupt = || StoreError::Corrupt {
            what: "blob references",
        };
        let current = match self.query_opt(
            "SELECT count, size FROM highwater_blob_refs WHERE hash = $1 AND scope = $2",
            &[&hash, &scope.as_str()],
        )? {
            Some(r) => Some(ScopeRefs {
                count: u64::try_from(r.try_get::<_, i64>(0).map_err(pg)?).map_err(|_| corrupt())?,
                size: from_sql(r.try_get(1).map_err(pg)?),
            }),
            None => None,
        };
        match ScopeRefs::adjusted(current, blob, delta) {
            Some(refs) => {
                let count = i64::try_from(refs.count).map_err(|_| corrupt())?;
                self.execute(
                    "INSERT INTO highwater_blob_refs (hash, scope, count, size)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (hash, scope)
                     DO UPDATE SET count = EXCLUDED.count, size = EXCLUDED.size",
                    &[&hash, &scope.as_str(), &count, &to_sql(refs.size)],
                )?
            }
            None => self.execute(
                "DELETE FROM highwater_blob_refs WHERE hash = $1 AND scope = $2",
                &[&hash, &scope.as_str()],
            )?,
        };
        let total: i64 = self
            .query_opt(
                "SELECT COALESCE(sum(count), 0)::bigint FROM highwater_blob_refs WHERE hash = $1",
                &[&hash],
            )?
            .map(|r| r.try_get(0).map_err(pg))
            .transpose()?
            .unwrap_or(0);
        u64::try_from(total).map_err(|_| corrupt())
    }

    fn finish_upserts(&mut self) -> Result<(), StoreError> {
        // No summaries to keep: fingerprints are folds over the rows of their range.
        Ok(())
    }
}

impl Store for PgStore {
    fn read(&self) -> Result<Box<dyn StoreRead + '_>, StoreError> {
        Ok(Box::new(self.reader()?))
    }

    fn identity(&self, fresh: NodeId) -> Result<NodeId, StoreError> {
        let mut conn = self.conn()?;
        let mut txn = begin(&mut conn.client)?;
        txn.execute(
            "INSERT INTO highwater_meta (name, bytes) VALUES ('node_id', $1)
             ON CONFLICT (name) DO NOTHING",
            &[&fresh.to_bytes().as_slice()],
        )
        .map_err(pg)?;
        let row = txn
            .query_one(
                "SELECT bytes FROM highwater_meta WHERE name = 'node_id'",
                &[],
            )
            .map_err(pg)?;
        let bytes: Option<&[u8]> = row.try_get(0).map_err(pg)?;
        let id = super::node_id(bytes.unwrap_or_default(), "node id")?;
        txn.commit().map_err(pg)?;
        Ok(id)
    }

    fn replace_identity(&self, id: NodeId) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut txn = begin(&mut conn.client)?;
        txn.execute(
            "INSERT INTO highwater_meta (name, bytes) VALUES ('node_id', $1)
             ON CONFLICT (name) DO UPDATE SET bytes = EXCLUDED.bytes",
            &[&id.to_bytes().as_slice()],
        )
        .map_err(pg)?;
        txn.commit().map_err(pg)
    }

    fn note(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self
            .conn()?
            .client
            .query_opt(
                "SELECT bytes FROM highwater_meta WHERE name = 'note/' || $1",
                &[&name],
            )
            .map_err(pg)?;
        match row {
            Some(r) => r.try_get(0).map_err(pg),
            None => Ok(None),
        }
    }

    fn set_note(&self, name: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut txn = begin(&mut conn.client)?;
        match value {
            Some(v) => txn.execute(
                "INSERT INTO highwater_meta (name, bytes) VALUES ('note/' || $1, $2)
                 ON CONFLICT (name) DO UPDATE SET bytes = EXCLUDED.bytes",
                &[&name, &v],
            ),
            None => txn.execute(
                "DELETE FROM highwater_meta WHERE name = 'note/' || $1",
                &[&name],
            ),
        }
        .map_err(pg)?;
        txn.commit().map_err(pg)
    }

    fn commit(&self, batch: &Batch) -> Result<BatchReport, StoreError> {
        let mut conn = self.conn()?;
        let super::PgConn { client, statements } = &mut *conn;
        let mut txn = begin(client)?;
        // IMPORTANT: the data and the watermark advances that cover it share this
        // transaction; an error drops `txn`, which rolls all of it back.
        let mut writer = Writer {
            txn: &mut txn,
            statements,
        };
        let report = apply_batch(&mut writer, batch)?;
        let changed = changed_scopes(batch, &report);
        if !changed.is_empty() {
            let cause = batch.peer.as_ref().map(|k| k.peer);
            writer.record_changes(self.writer, cause, &changed)?;
        }
        let deferred = batch.durability == Durability::Deferred;
        if deferred {
            // Atomic and visible at commit, on disk within a moment: WAL is written in
            // order, so a crash loses the newest deferred commits, never one alone, and a
            // later synchronous commit flushes every earlier one.
            txn.batch_execute("SET LOCAL synchronous_commit TO OFF")
                .map_err(pg)?;
        }
        txn.commit().map_err(pg)?;
        self.note_deferred(deferred);
        Ok(report)
    }

    fn flush(&self) -> Result<(), StoreError> {
        if !self.take_deferred() {
            return Ok(());
        }
        // A synchronous commit that writes a row flushes the WAL up to its commit record,
        // which follows every deferred commit made before it.
        let flushed = (|| {
            let mut conn = self.conn()?;
            let mut txn = begin(&mut conn.client)?;
            txn.execute(
                "UPDATE highwater_meta SET num = num WHERE name = 'clock'",
                &[],
            )
            .map_err(pg)?;
            txn.commit().map_err(pg)
        })();
        if flushed.is_err() {
            self.note_deferred(true);
        }
        flushed
    }
}
