//! The PostgreSQL store (feature `postgres`). Layout (schema version 1; see
//! `docs/storage.md`, "PostgreSQL"):
//!
//! The tables mirror the redb store's: versions keyed by `(scope, origin, time)` (the order in
//! which a sync delivers them and an audit walks them), a key index `(scope, key) -> (origin,
//! time)`, this node's marks, what it learned of its peers' marks, blob references per scope,
//! floors, and the clock and node id in `highwater_meta`. [`migrations`] creates them.
//!
//! Every `u64` that is compared or ordered (times, blob sizes) is stored as a `bigint` with
//! its sign bit flipped ([`to_sql`]), so that `ORDER BY`, `<` and `max` on the column follow
//! `u64` order. Scopes are `text COLLATE "C"` (byte order, which is `Scope`'s order); node
//! ids, keys and hashes are `bytea` (byte order, as in redb).
//!
//! IMPORTANT: every commit first locks the `clock` row of `highwater_meta` (`SELECT ... FOR
//! UPDATE`), so commits to one store run one at a time, as they do on redb's single writer,
//! and the read-modify-write steps of `apply_batch` (the merge, the conditional watermark
//! advance, the reference counts) see every earlier commit under READ COMMITTED. Readers
//! take a REPEATABLE READ snapshot and never wait for a commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::{Client, Statement};
use r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;

use crate::error::StoreError;
use crate::hlc::NodeId;
use crate::record::{Key, Scope, Version};

mod feed;
mod migrations;
mod tls;

use self::tls::PgTls;

pub use self::feed::{Change, ChangeFeed, FeedOptions};

pub use self::migrations::SCHEMA_VERSION;
mod read;
mod write;

type Conn = PooledConnection<Manager>;

/// A connection and the statements prepared on it, by their SQL text: a statement run
/// through its prepared form is one round trip instead of two (prepare, then execute).
pub(super) struct PgConn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// The statement for `sql`, prepared on this session once (prepared statements outlive
/// the transactions they were prepared in).
fn prepared(
    client: &mut impl postgres::GenericClient,
    statements: &mut HashMap<&'static str, Statement>,
    sql: &'static str,
) -> Result<Statement, StoreError> {
    if let Some(statement) = statements.get(sql) {
        return Ok(statement.clone());
    }
    let statement = client.prepare(sql).map_err(pg)?;
    statements.insert(sql, statement.clone());
    Ok(statement)
}

/// r2d2_postgres's manager, with a statement cache per connection.
#[derive(Debug)]
struct Manager(PostgresConnectionManager<PgTls>);

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.0.connect()?,
            statements: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}

/// A store in a PostgreSQL database (one schema per store), reached through a pool of
/// connections.
///
/// Commits to one store are serialized by a row lock (see `docs/storage.md`); readers hold a
/// REPEATABLE READ snapshot on a pooled connection until they are dropped, so a thread may
/// hold a reader and commit (on another connection) as long as the pool has one free.
/// [`Durability::Deferred`](super::Durability::Deferred) commits run with
/// `synchronous_commit = off` (atomic and visible at once; a crash of the database may lose
/// the newest of them, never one without the later ones); a durable commit or
/// [`Store::flush`](super::Store::flush) makes them durable.
pub struct PgStore {
    /// Always `Some` but in `drop`, which closes it off the async runtime.
    pool: Option<Pool<Manager>>,
    /// Whether a deferred commit of this handle may not be durable yet.
    deferred: AtomicBool,
    /// This handle's name in the change feed (random): its own commits are not news to it.
    writer: i64,
    /// How the change feed connects (outside the pool: it holds its connection).
    config: postgres::Config,
    tls: PgTls,
    schema: Option<String>,
}

/// How [`PgStore::open_with`] connects.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// The schema holding the store's tables (created if missing); `None`: the connection's
    /// default `search_path`.
    pub schema: Option<String>,
    /// The most connections the pool opens.
    pub pool_size: u32,
    /// How long a call waits for a free connection (or a new one) before it fails with
    /// [`StoreError::Pool`].
    pub connect_timeout: Duration,
    /// A PEM file of CA certificates to trust, besides the system's, for a URL with
    /// `sslmode=require` (TLS, the server's certificate verified against them and its name
    /// against the URL's host). Without `sslmode=require` the connection is in clear text.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: None,
            pool_size: PgStore::POOL_SIZE,
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }
}

/// Sets the store's schema on every connection the pool opens.
#[derive(Debug)]
struct SearchPath(String);

impl r2d2::CustomizeConnection<PgConn, postgres::Error> for SearchPath {
    fn on_acquire(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        conn.client
            .batch_execute(&format!("SET search_path TO {}", quote_ident(&self.0)))
    }
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PgStore {
    /// The default pool size: a hub serves a round per request, each holding a connection
    /// for a read or a commit.
    pub const POOL_SIZE: u32 = 16;

    /// Opens the store at `url` (`postgres://user@host:port/db`) with default
    /// [`PgOptions`], creating or migrating its tables.
    ///
    /// # Errors
    /// The URL does not parse, the database cannot be reached, or it holds a newer schema.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &PgOptions::default())
    }

    /// Opens the store at `url` with `options`, creating the schema and the tables if
    /// missing and migrating older ones (docs/storage.md, "Schema").
    ///
    /// # Errors
    /// As [`PgStore::open`].
    pub fn open_with(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        let mut config: postgres::Config = url.parse().map_err(pg)?;
        // libpq's default, `prefer`, tries TLS and falls back to clear text without checking
        // a certificate: it protects from nothing. Clear text unless TLS is required.
        if config.get_ssl_mode() == postgres::config::SslMode::Prefer {
            config.ssl_mode(postgres::config::SslMode::Disable);
        }
        let tls = PgTls::new(options.ca_file.as_deref())?;
        if let Some(schema) = &options.schema {
            // Before the pool, whose connections set the schema as their search path.
            let mut client = config.connect(tls.clone()).map_err(pg)?;
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    quote_ident(schema)
                ))
                .map_err(pg)?;
        }
        let mut builder = Pool::builder()
            .max_size(options.pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(options.connect_timeout);
        if let Some(schema) = &options.schema {
            builder = builder.connection_customizer(Box::new(SearchPath(schema.clone())));
        }
        let pool = builder
            .build(Manager(PostgresConnectionManager::new(
                config.clone(),
                tls.clone(),
            )))
            .map_err(StoreError::Pool)?;
        let store = PgStore {
            pool: Some(pool),
            deferred: AtomicBool::new(false),
            writer: rand::random(),
            config,
            tls,
            schema: options.schema.clone(),
        };
        migrations::migrate(&mut store.conn()?.client)?;
        Ok(store)
    }

    /// A pooled connection.
    fn conn(&self) -> Result<Conn, StoreError> {
        self.pool
            .as_ref()
            .expect("the pool lives until drop")
            .get()
            .map_err(StoreError::Pool)
    }

    fn note_deferred(&self, deferred: bool) {
        if deferred {
            self.deferred.store(true, Ordering::Release);
        }
    }

    fn take_deferred(&self) -> bool {
        self.deferred.swap(false, Ordering::AcqRel)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing a connection runs the client's own runtime, which cannot start on a thread
        // that drives tokio tasks (an engine dropped by an async task, say): close the pool on
        // a thread of its own there.
        let pool = self.pool.take();
        if tokio::runtime::Handle::try_current().is_ok() {
            let closed = std::thread::Builder::new()
                .name("highwater-pg-close".into())
                .spawn(move || drop(pool))
                .map(|t| t.join());
            if !matches!(closed, Ok(Ok(()))) {
                tracing::warn!("could not close the PostgreSQL pool on a thread of its own");
            }
        } else {
            drop(pool);
        }
    }
}

/// A PostgreSQL failure as a store error.
fn pg(e: postgres::Error) -> StoreError {
    StoreError::Postgres(Box::new(e))
}

const SIGN: u64 = 1 << 63;

/// A `u64` as a `bigint` whose signed order is the `u64` order: the sign bit flipped.
pub(crate) fn to_sql(value: u64) -> i64 {
    i64::from_be_bytes((value ^ SIGN).to_be_bytes())
}

/// The `u64` stored by [`to_sql`].
pub(crate) fn from_sql(value: i64) -> u64 {
    u64::from_be_bytes(value.to_be_bytes()) ^ SIGN
}

/// A row limit: `usize` as a `bigint`, saturating.
fn limit_sql(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn node_id(bytes: &[u8], what: &'static str) -> Result<NodeId, StoreError> {
    let arr: [u8; 16] = bytes.try_into().map_err(|_| StoreError::Corrupt { what })?;
    NodeId::from_bytes(arr).ok_or(StoreError::Corrupt { what })
}

fn scope_of(text: &str) -> Result<Scope, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt { what: "scope" })
}

fn key_of(bytes: Vec<u8>) -> Result<Key, StoreError> {
    Key::new(bytes).map_err(|_| StoreError::Corrupt { what: "record key" })
}

fn encode_version(v: &Version) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding into a Vec does not fail")
}

fn decode_version(bytes: &[u8]) -> Result<Version, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt { what: "record" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flipped_bigints_keep_u64_order() {
        let values = [0, 1, 130, SIGN - 1, SIGN, SIGN + 1, u64::MAX - 1, u64::MAX];
        for pair in values.windows(2) {
            assert!(to_sql(pair[0]) < to_sql(pair[1]), "{pair:?}");
        }
        for v in values {
            assert_eq!(from_sql(to_sql(v)), v);
        }
        assert_eq!(to_sql(0), i64::MIN);
        assert_eq!(to_sql(u64::MAX), i64::MAX);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("hw_test"), "\"hw_test\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
