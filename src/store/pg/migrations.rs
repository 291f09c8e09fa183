//! The PostgreSQL schema and its versions.
//!
//! `highwater_meta` holds the schema version (`name = 'schema_version'`, in `num`). Opening
//! a store runs, in one transaction under a lock that keeps two processes from migrating at
//! once, every migration from the stored version to [`SCHEMA_VERSION`]: [`MIGRATIONS`]`[i]`
//! takes a schema from version `i` to `i + 1` (version 0: no tables). A schema newer than
//! this build's is refused with [`StoreError::UnsupportedFormat`].
//!
//! Encodings (see the module docs of `store::pg`): times and sizes are `bigint`s with the
//! sign bit flipped; scopes `text COLLATE "C"`; node ids (16 bytes), keys and hashes
//! (32 bytes) `bytea`; versions `postcard(Version)` as in redb.

use postgres::Client;

use super::{pg, to_sql};
use crate::error::StoreError;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

/// The migrations, in order: `MIGRATIONS[i]` takes version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2];

/// Version 1. Each table: key columns -> value columns.
const V1: &str = r#"
-- name -> num | bytes: 'schema_version' -> num; 'clock' -> num (flipped time, the clock's
-- last issued or observed time); 'node_id' -> bytes (16); 'note/<name>' -> bytes (the
-- engine's notes, Store::note).
-- highwater_meta itself is created before the migrations run (it holds their version).

-- scope | origin | time -> key | postcard(Version): every stored version (the latest of
-- its key, tombstones included), in Hlc order per origin: the live-version index.
CREATE TABLE highwater_versions (
    scope text COLLATE "C" NOT NULL,
    origin bytea NOT NULL,
    time bigint NOT NULL,
    key bytea NOT NULL,
    version bytea NOT NULL,
    PRIMARY KEY (scope, origin, time)
);

-- scope | key -> origin | time: where each key's stored version is.
CREATE TABLE highwater_keys (
    scope text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    origin bytea NOT NULL,
    time bigint NOT NULL,
    PRIMARY KEY (scope, key)
);

-- scope | origin -> time: this node's watermarks.
CREATE TABLE highwater_marks (
    scope text COLLATE "C" NOT NULL,
    origin bytea NOT NULL,
    time bigint NOT NULL,
    PRIMARY KEY (scope, origin)
);

-- peer -> last seen (flipped; 0: met, time unknown): the peers this node has met (redb's
-- `peer -> seen` sentinel row).
CREATE TABLE highwater_peers (
    peer bytea PRIMARY KEY,
    seen bigint NOT NULL
);

-- peer | scope | origin -> time: what this node learned of each peer's watermarks.
CREATE TABLE highwater_peer_marks (
    peer bytea NOT NULL,
    scope text COLLATE "C" NOT NULL,
    origin bytea NOT NULL,
    time bigint NOT NULL,
    PRIMARY KEY (peer, scope, origin)
);

-- hash | scope -> count | size (flipped): the stored versions of the scope that reference
-- the blob (never 0: no row) and the blob's size.
CREATE TABLE highwater_blob_refs (
    hash bytea NOT NULL,
    scope text COLLATE "C" NOT NULL,
    count bigint NOT NULL CHECK (count > 0),
    size bigint NOT NULL,
    PRIMARY KEY (hash, scope)
);

-- scope -> time (flipped, never 0: no row): the purge floor, the newest purged
-- tombstone's time.
CREATE TABLE highwater_floors (
    scope text COLLATE "C" PRIMARY KEY,
    time bigint NOT NULL
);
"#;

/// Version 2: the change feed, by which processes sharing the store hear of each other's
/// commits (`PgStore::watch_changes`, docs/scale.md).
const V2: &str = r#"
-- scope | writer | cause -> seq, at: the last commit by `writer` (a store handle, one per
-- process) of a page from peer `cause` (16 bytes; empty: a local write) that changed the
-- scope's versions or marks, as the 'changes' counter of highwater_meta numbered it
-- (commits take it under the commit lock, so seq order is commit order), and when. Rows not
-- renewed for a while are pruned by the feeds.
CREATE TABLE highwater_changes (
    scope text COLLATE "C" NOT NULL,
    writer bigint NOT NULL,
    cause bytea NOT NULL,
    seq bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, writer, cause)
);
CREATE INDEX highwater_changes_by_seq ON highwater_changes (seq);
INSERT INTO highwater_meta (name, num) VALUES ('changes', 0) ON CONFLICT (name) DO NOTHING;
"#;

/// Creates `highwater_meta` if missing and runs the migrations the stored schema needs, in
/// one transaction.
///
/// # Errors
/// A database failure, or a schema newer than [`SCHEMA_VERSION`].
pub(super) fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut txn = client.transaction().map_err(pg)?;
    // Two processes opening a new store at once would both create the tables; the second
    // waits here and then finds them. The lock is the schema's (its name's hash) and ends
    // with the transaction.
    txn.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('highwater_migrate/' || current_schema()));
         CREATE TABLE IF NOT EXISTS highwater_meta (
             name text PRIMARY KEY,
             num bigint,
             bytes bytea
         );",
    )
    .map_err(pg)?;
    let found = txn
        .query_opt(
            "SELECT num FROM highwater_meta WHERE name = 'schema_version'",
            &[],
        )
        .map_err(pg)?
        .map(|row| row.try_get::<_, Option<i64>>(0))
        .transpose()
        .map_err(pg)?
        .flatten()
        .unwrap_or(0);
    let found = u32::try_from(found).map_err(|_| StoreError::Corrupt {
        what: "schema version",
    })?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::UnsupportedFormat {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    for sql in &MIGRATIONS[found as usize..] {
        txn.batch_execute(sql).map_err(pg)?;
    }
    txn.execute(
        "INSERT INTO highwater_meta (name, num) VALUES ('schema_version', $1)
         ON CONFLICT (name) DO UPDATE SET num = EXCLUDED.num",
        &[&i64::from(SCHEMA_VERSION)],
    )
    .map_err(pg)?;
    // The clock row exists from the start: every commit locks it first.
    txn.execute(
        "INSERT INTO highwater_meta (name, num) VALUES ('clock', $1) ON CONFLICT (name) DO NOTHING",
        &[&to_sql(0)],
    )
    .map_err(pg)?;
    txn.commit().map_err(pg)?;
    tracing::info!(
        from = found,
        to = SCHEMA_VERSION,
        "migrated the PostgreSQL store schema"
    );
    Ok(())
}
