//! Reads: a REPEATABLE READ READ ONLY transaction on a pooled connection, held by the
//! [`Reader`] until it is dropped.

use std::cell::RefCell;
use std::collections::BTreeMap;

use postgres::types::ToSql;
use postgres::Row;

use super::{
    decode_version, from_sql, key_of, limit_sql, node_id, pg, prepared, scope_of, to_sql, Conn,
    PgStore,
};
use crate::error::StoreError;
use crate::hash::Hash;
use crate::hlc::{Hlc, NodeId};
use crate::record::{BlobRef, Key, Scope, Version};
use crate::store::audit::{item_hash_parts, split_positions};
use crate::store::{AuditPoint, AuditRange, Fingerprint, KeyRange, StoreRead};
use crate::watermark::ScopedWatermarks;

/// A consistent snapshot: one REPEATABLE READ transaction, rolled back when dropped.
pub(super) struct Reader {
    conn: RefCell<Conn>,
}

impl PgStore {
    /// A reader whose snapshot is taken now.
    pub(super) fn reader(&self) -> Result<Reader, StoreError> {
        let mut conn = self.conn()?;
        // A REPEATABLE READ transaction takes its snapshot at its first query, not at BEGIN:
        // the SELECT pins it here, so a commit that returns after `read` is not in it.
        conn.client
            .batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;
             SELECT num FROM highwater_meta WHERE name = 'clock';",
            )
            .map_err(pg)?;
        Ok(Reader {
            conn: RefCell::new(conn),
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // A connection that cannot roll back is broken; the pool discards closed ones.
        if let Err(e) = self.conn.get_mut().client.batch_execute("ROLLBACK") {
            tracing::warn!(error = %e, "could not end a PostgreSQL read transaction");
        }
    }
}

/// The rows of a range of the audit order, `[lo, hi)` within a scope (parameters `$2..$5`;
/// the lower bound always given, the least point for none), in that order, at most `$6`,
/// with these columns.
///
/// IMPORTANT: every lower bound of a paged read is a plain comparison, never `$n IS NULL OR
/// ...`: PostgreSQL runs a prepared statement with a generic plan after five executions,
/// and a generic plan cannot bound the index scan by a condition under an `OR`, so every
/// page would scan from the scope's start (a 1M-record pull went quadratic).
macro_rules! audit_rows {
    ($columns:literal) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM highwater_versions WHERE scope = $1
              AND (origin, time) >= ($2, $3)
              AND ($4::bytea IS NULL OR (origin, time) < ($4, $5))
              ORDER BY origin, time LIMIT $6"
        )
    };
}

fn point_of(row: &Row) -> Result<AuditPoint, StoreError> {
    Ok(AuditPoint {
        origin: node_id(row.try_get(0).map_err(pg)?, "origin")?,
        time: from_sql(row.try_get(1).map_err(pg)?),
    })
}

/// `(origin, time)` parameters of an optional audit bound.
fn bound(point: Option<AuditPoint>) -> (Option<Vec<u8>>, i64) {
    match point {
        Some(p) => (Some(p.origin.to_bytes().to_vec()), to_sql(p.time)),
        None => (None, 0),
    }
}

/// A page of a scope's keys in key order: `scope`, the least key, the end (none: no end),
/// the limit (see `audit_rows!` on the one lower bound).
const SCAN_SQL: &str = "SELECT k.key, v.key, v.version FROM highwater_keys k
     LEFT JOIN highwater_versions v
       ON v.scope = k.scope AND v.origin = k.origin AND v.time = k.time
     WHERE k.scope = $1 AND k.key >= $2
       AND ($3::bytea IS NULL OR k.key < $3)
     ORDER BY k.key LIMIT $4";

/// A page of one origin's live versions in a scope: `scope`, `origin`, the least and the
/// greatest time (flipped), the limit.
const LIVE_RANGE_SQL: &str = "SELECT key, version FROM highwater_versions
     WHERE scope = $1 AND origin = $2 AND time >= $3 AND time <= $4
     ORDER BY time LIMIT $5";

/// The least stored time (flipped) of a range that starts after `after` (every time for
/// none); `None` when nothing can come after it.
fn first_after(after: Option<Hlc>) -> Option<i64> {
    match after {
        None => Some(to_sql(0)),
        Some(a) => a.time().checked_add(1).map(to_sql),
    }
}

/// The first byte string after every string starting with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A stored version from a `(key, version)` pair of a join, checking it is the key's.
fn joined(
    key: &Key,
    stored: Option<Vec<u8>>,
    version: Option<Vec<u8>>,
) -> Result<Version, StoreError> {
    match (stored, version) {
        (Some(k), Some(v)) if k == key.as_bytes() => decode_version(&v),
        _ => Err(StoreError::Corrupt { what: "key index" }),
    }
}

fn marks_of(rows: &[Row]) -> Result<ScopedWatermarks, StoreError> {
    let mut out = ScopedWatermarks::new();
    for row in rows {
        let scope = scope_of(row.try_get(0).map_err(pg)?)?;
        let origin = node_id(row.try_get(1).map_err(pg)?, "origin")?;
        out.observe(
            &scope,
            Hlc::new(from_sql(row.try_get(2).map_err(pg)?), origin),
        );
    }
    Ok(out)
}

impl Reader {
    fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut conn = self.conn.borrow_mut();
        let conn = &mut **conn;
        let statement = prepared(&mut conn.client, &mut conn.statements, sql)?;
        conn.client.query(&statement, params).map_err(pg)
    }

    fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let mut conn = self.conn.borrow_mut();
        let conn = &mut **conn;
        let statement = prepared(&mut conn.client, &mut conn.statements, sql)?;
        conn.client.query_opt(&statement, params).map_err(pg)
    }

    /// The points of the range in audit order, with their keys if `keys`, at most `limit`.
    fn audit_rows(
        &self,
        scope: &Scope,
        range: &AuditRange,
        keys: bool,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        // No lower bound: the least point (the empty byte string sorts before every id).
        let (lo, lo_time) = match bound(range.lo) {
            (Some(lo), time) => (lo, time),
            (None, _) => (Vec::new(), to_sql(0)),
        };
        let (hi, hi_time) = bound(range.hi);
        let sql = if keys {
            audit_rows!("origin, time, key")
        } else {
            audit_rows!("origin, time")
        };
        self.query(
            sql,
            &[
                &scope.as_str(),
                &lo,
                &lo_time,
                &hi,
                &hi_time,
                &limit_sql(limit),
            ],
        )
    }
}

impl StoreRead for Reader {
    fn get(&self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        let row = self.query_opt(
            "SELECT v.key, v.version FROM highwater_keys k
             LEFT JOIN highwater_versions v
               ON v.scope = k.scope AND v.origin = k.origin AND v.time = k.time
             WHERE k.scope = $1 AND k.key = $2",
            &[&scope.as_str(), &key.as_bytes()],
        )?;
        row.map(|r| joined(key, r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?))
            .transpose()
    }

    fn scan(&self, scope: &Scope, range: &KeyRange) -> Result<Vec<(Key, Version)>, StoreError> {
        // One lower bound, the greater of the prefix and the key just after `after` (the
        // key with a 0 byte appended): two would leave the generic plan to bound the index
        // scan by either (see `audit_rows!`).
        let from = match &range.after {
            Some(after) if after.as_bytes() >= range.prefix.as_slice() => {
                let mut next = after.as_bytes().to_vec();
                next.push(0);
                next
            }
            _ => range.prefix.clone(),
        };
        let end = prefix_end(&range.prefix);
        let rows = self.query(
            SCAN_SQL,
            &[&scope.as_str(), &from, &end, &limit_sql(range.limit)],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let key = key_of(r.try_get(0).map_err(pg)?)?;
            let version = joined(&key, r.try_get(1).map_err(pg)?, r.try_get(2).map_err(pg)?)?;
            out.push((key, version));
        }
        Ok(out)
    }

    fn watermarks(&self) -> Result<ScopedWatermarks, StoreError> {
        marks_of(&self.query("SELECT scope, origin, time FROM highwater_marks", &[])?)
    }

    fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>, StoreError> {
        let id = peer.to_bytes().to_vec();
        if self
            .query_opt("SELECT 1 FROM highwater_peers WHERE peer = $1", &[&id])?
            .is_none()
        {
            return Ok(None);
        }
        let rows = self.query(
            "SELECT scope, origin, time FROM highwater_peer_marks WHERE peer = $1",
            &[&id],
        )?;
        marks_of(&rows).map(Some)
    }

    fn peers(&self) -> Result<Vec<NodeId>, StoreError> {
        self.query("SELECT peer FROM highwater_peers ORDER BY peer", &[])?
            .iter()
            .map(|r| node_id(r.try_get(0).map_err(pg)?, "peer id"))
            .collect()
    }

    fn live_range(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        limit: usize,
    ) -> Result<Vec<(Key, Version)>, StoreError> {
        let Some(from) = first_after(after) else {
            return Ok(Vec::new());
        };
        let rows = self.query(
            LIVE_RANGE_SQL,
            &[
                &scope.as_str(),
                &origin.to_bytes().as_slice(),
                &from,
                &to_sql(upto.time()),
                &limit_sql(limit),
            ],
        )?;
        rows.iter()
            .map(|r| {
                Ok((
                    key_of(r.try_get(0).map_err(pg)?)?,
                    decode_version(r.try_get(1).map_err(pg)?)?,
                ))
            })
            .collect()
    }

    fn live_count(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        cap: u64,
    ) -> Result<u64, StoreError> {
        if cap == 0 {
            return Ok(0);
        }
        let Some(from) = first_after(after) else {
            return Ok(0);
        };
        // O(min(count, cap)) index entries: the LIMIT stops the scan at the cap.
        let row = self.query_opt(
            "SELECT count(*) FROM (SELECT 1 FROM highwater_versions
             WHERE scope = $1 AND origin = $2 AND time >= $3 AND time <= $4
             LIMIT $5) AS counted",
            &[
                &scope.as_str(),
                &origin.to_bytes().as_slice(),
                &from,
                &to_sql(upto.time()),
                &limit_sql(usize::try_from(cap).unwrap_or(usize::MAX)),
            ],
        )?;
        let n: i64 = match row {
            Some(r) => r.try_get(0).map_err(pg)?,
            None => 0,
        };
        u64::try_from(n).map_err(|_| StoreError::Corrupt { what: "count" })
    }

    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError> {
        let row = self.query_opt(
            "SELECT COALESCE(sum(count), 0)::bigint FROM highwater_blob_refs WHERE hash = $1",
            &[&hash.as_bytes().as_slice()],
        )?;
        let total: i64 = match row {
            Some(r) => r.try_get(0).map_err(pg)?,
            None => 0,
        };
        u64::try_from(total).map_err(|_| StoreError::Corrupt {
            what: "blob references",
        })
    }

    fn blob_scopes(&self, hash: &Hash) -> Result<Vec<Scope>, StoreError> {
        self.query(
            "SELECT scope FROM highwater_blob_refs WHERE hash = $1 ORDER BY scope",
            &[&hash.as_bytes().as_slice()],
        )?
        .iter()
        .map(|r| scope_of(r.try_get(0).map_err(pg)?))
        .collect()
    }

    fn referenced_blobs(
        &self,
        after: Option<&Hash>,
        limit: usize,
    ) -> Result<Vec<BlobRef>, StoreError> {
        let after: &[u8] = after.map_or(&[], |h| h.as_bytes().as_slice());
        let rows = self.query(
            "SELECT hash, max(size) FROM highwater_blob_refs WHERE hash > $1
             GROUP BY hash ORDER BY hash LIMIT $2",
            &[&after, &limit_sql(limit)],
        )?;
        rows.iter()
            .map(|r| {
                let hash: &[u8] = r.try_get(0).map_err(pg)?;
                let hash: [u8; 32] = hash
                    .try_into()
                    .map_err(|_| StoreError::Corrupt { what: "blob hash" })?;
                Ok(BlobRef {
                    hash: Hash::from_bytes(hash),
                    size: from_sql(r.try_get(1).map_err(pg)?),
                })
            })
            .collect()
    }

    fn scopes(&self) -> Result<Vec<Scope>, StoreError> {
        // The scopes of the key index by a skip scan (one index probe per scope, not a read
        // of every key), and those of the marks.
        let rows = self.query(
            "WITH RECURSIVE s(scope) AS (
                 (SELECT scope FROM highwater_keys ORDER BY scope LIMIT 1)
                 UNION ALL
                 SELECT (SELECT k.scope FROM highwater_keys k WHERE k.scope > s.scope
                         ORDER BY k.scope LIMIT 1)
                 FROM s WHERE s.scope IS NOT NULL
             )
             SELECT scope FROM s WHERE scope IS NOT NULL
             UNION SELECT DISTINCT scope FROM highwater_marks",
            &[],
        )?;
        let mut out = rows
            .iter()
            .map(|r| scope_of(r.try_get(0).map_err(pg)?))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn clock(&self) -> Result<u64, StoreError> {
        let row = self.query_opt("SELECT num FROM highwater_meta WHERE name = 'clock'", &[])?;
        match row {
            Some(r) => Ok(from_sql(r.try_get(0).map_err(pg)?)),
            None => Ok(0),
        }
    }

    fn floors(&self) -> Result<BTreeMap<Scope, u64>, StoreError> {
        self.query("SELECT scope, time FROM highwater_floors", &[])?
            .iter()
            .map(|r| {
                Ok((
                    scope_of(r.try_get(0).map_err(pg)?)?,
                    from_sql(r.try_get(1).map_err(pg)?),
                ))
            })
            .collect()
    }

    fn peer_seen(&self, peer: NodeId) -> Result<Option<u64>, StoreError> {
        let row = self.query_opt(
            "SELECT seen FROM highwater_peers WHERE peer = $1",
            &[&peer.to_bytes().as_slice()],
        )?;
        match row {
            Some(r) => Ok(Some(from_sql(r.try_get(0).map_err(pg)?)).filter(|t| *t > 0)),
            None => Ok(None),
        }
    }

    fn fingerprint(&self, scope: &Scope, range: &AuditRange) -> Result<Fingerprint, StoreError> {
        // O(range): every version in the range is read and hashed (redb sums chunks).
        let mut fp = Fingerprint::EMPTY;
        for row in self.audit_rows(scope, range, true, usize::MAX)? {
            let origin: &[u8] = row.try_get(0).map_err(pg)?;
            let origin: [u8; 16] = origin
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "origin" })?;
            let time = from_sql(row.try_get(1).map_err(pg)?);
            let key: &[u8] = row.try_get(2).map_err(pg)?;
            fp.add(item_hash_parts(key, time, &origin));
        }
        Ok(fp)
    }

    fn audit_split(
        &self,
        scope: &Scope,
        range: &AuditRange,
        parts: usize,
    ) -> Result<Vec<AuditPoint>, StoreError> {
        if parts <= 1 {
            return Ok(Vec::new());
        }
        let rows = self.audit_rows(scope, range, false, usize::MAX)?;
        split_positions(rows.len() as u64, parts)
            .map(|at| {
                let at = usize::try_from(at).expect("a position below rows.len()");
                point_of(&rows[at])
            })
            .collect()
    }

    fn audit_items(
        &self,
        scope: &Scope,
        range: &AuditRange,
        limit: usize,
    ) -> Result<Vec<(Hlc, Key)>, StoreError> {
        self.audit_rows(scope, range, true, limit)?
            .iter()
            .map(|r| Ok((point_of(r)?.hlc(), key_of(r.try_get(2).map_err(pg)?)?)))
            .collect()
    }

    fn version_at(&self, scope: &Scope, hlc: Hlc) -> Result<Option<(Key, Version)>, StoreError> {
        let row = self.query_opt(
            "SELECT key, version FROM highwater_versions
             WHERE scope = $1 AND origin = $2 AND time = $3",
            &[
                &scope.as_str(),
                &hlc.origin().to_bytes().as_slice(),
                &to_sql(hlc.time()),
            ],
        )?;
        let Some(r) = row else {
            return Ok(None);
        };
        let key = key_of(r.try_get(0).map_err(pg)?)?;
        let version = decode_version(r.try_get(1).map_err(pg)?)?;
        if version.hlc != hlc {
            return Err(StoreError::Corrupt { what: "version" });
        }
        Ok(Some((key, version)))
    }
}

#[cfg(test)]
mod tests {
    use super::{prefix_end, LIVE_RANGE_SQL, SCAN_SQL};

    /// The paged reads bound their index scan from their lower bound under the generic plan
    /// PostgreSQL switches a prepared statement to (a condition under `OR` would only
    /// filter, and a 1M-record pull went quadratic). Needs `HIGHWATER_PG_URL`.
    #[test]
    fn paged_reads_bound_the_index_scan_under_a_generic_plan() {
        let Ok(url) = std::env::var("HIGHWATER_PG_URL") else {
            eprintln!("note: HIGHWATER_PG_URL is not set: the plan test skips");
            return;
        };
        let schema = format!("hw_plan_{:016x}", rand::random::<u64>());
        let options = crate::store::PgOptions {
            schema: Some(schema.clone()),
            pool_size: 1,
            ..crate::store::PgOptions::default()
        };
        let store = crate::store::PgStore::open_with(&url, &options).expect("a store");
        drop(store);
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("a client");
        let explain = |client: &mut postgres::Client, sql: &str, args: &str| -> String {
            client
                .batch_execute(&format!(
                    "SET search_path TO {schema}; SET plan_cache_mode = force_generic_plan;
                     DEALLOCATE ALL; PREPARE q AS {sql}"
                ))
                .expect("prepared");
            let rows = client
                .query(&format!("EXPLAIN EXECUTE q({args})"), &[])
                .expect("explained");
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let range = explain(
            &mut client,
            LIVE_RANGE_SQL,
            "'app/a/b', '\\x00'::bytea, 5, 10, 100",
        );
        let scan = explain(
            &mut client,
            SCAN_SQL,
            "'app/a/b', '\\x61'::bytea, NULL, 100",
        );
        let audit = explain(
            &mut client,
            audit_rows!("origin, time"),
            "'app/a/b', '\\x00'::bytea, 5, NULL, 0, 100",
        );
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .expect("dropped");
        assert!(range.contains("(\"time\" >= $3)"), "{range}");
        assert!(scan.contains("(key >= $2))"), "{scan}");
        assert!(
            audit.contains("ROW(origin, \"time\") >= ROW($2, $3)"),
            "{audit}"
        );
    }

    #[test]
    fn prefix_end_is_the_first_string_past_the_prefix() {
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[0x61, 0xff]), Some(vec![0x62]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
