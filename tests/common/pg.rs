//! A fresh PostgreSQL schema per test when `HIGHWATER_PG_URL` is set (e.g.
//! `postgres://root@127.0.0.1:5432/test`); without it, PostgreSQL tests skip with a note.
#![allow(dead_code)]

use std::error::Error;
use std::io::Write;
use std::sync::Once;

use highwater::store::{PgOptions, PgStore};
use postgres::{Client, NoTls};

/// The variable naming the database the PostgreSQL tests use.
pub const URL_VAR: &str = "HIGHWATER_PG_URL";

/// A schema made for one test, dropped (with everything in it) when this is dropped, also
/// when the test fails or panics.
pub struct Schema {
    url: String,
    name: String,
}

impl Schema {
    /// A fresh schema `hw_test_<random>`, or `None` after printing a note when
    /// `HIGHWATER_PG_URL` is not set.
    ///
    /// # Errors
    /// The variable is set but the database cannot be reached.
    pub fn fresh(test: &str) -> Result<Option<Schema>, Box<dyn Error>> {
        let Ok(url) = std::env::var(URL_VAR) else {
            // Once per test binary, past the test harness's capture (which hides the output
            // of passing tests).
            static NOTE: Once = Once::new();
            NOTE.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "note: {URL_VAR} is not set: the PostgreSQL tests skip (first: {test})"
                );
            });
            return Ok(None);
        };
        let name = format!("hw_test_{:016x}", rand::random::<u64>());
        let mut client = Client::connect(&url, NoTls)?;
        client.batch_execute(&format!("CREATE SCHEMA {name}"))?;
        Ok(Some(Schema { url, name }))
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A store in this schema (a small pool: tests run many at once).
    ///
    /// # Errors
    /// The store cannot be opened.
    pub fn open(&self) -> Result<PgStore, Box<dyn Error>> {
        Ok(PgStore::open_with(
            &self.url,
            &PgOptions {
                schema: Some(self.name.clone()),
                pool_size: 4,
                ..PgOptions::default()
            },
        )?)
    }

    /// A store in this schema whose connections carry `application` as their application
    /// name (so that a test can find them in `pg_stat_activity`).
    ///
    /// # Errors
    /// The store cannot be opened.
    pub fn open_as(&self, application: &str) -> Result<PgStore, Box<dyn Error>> {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        Ok(PgStore::open_with(
            &format!("{}{sep}application_name={application}", self.url),
            &PgOptions {
                schema: Some(self.name.clone()),
                pool_size: 4,
                ..PgOptions::default()
            },
        )?)
    }

    /// A plain connection whose search path is this schema, to look at or damage rows.
    ///
    /// # Errors
    /// The database cannot be reached.
    pub fn client(&self) -> Result<Client, Box<dyn Error>> {
        let mut client = Client::connect(&self.url, NoTls)?;
        client.batch_execute(&format!("SET search_path TO {}", self.name))?;
        Ok(client)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let dropped = Client::connect(&self.url, NoTls).and_then(|mut c| {
            c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
        });
        if let Err(e) = dropped {
            eprintln!("could not drop the test schema {}: {e}", self.name);
        }
    }
}

impl Schema {
    /// How many keys of `scope` the store in this schema holds (for a test watching another
    /// process's progress).
    ///
    /// # Errors
    /// The database cannot be reached.
    pub fn keys_held(
        &self,
        client: &mut Client,
        scope: &highwater::Scope,
    ) -> Result<i64, Box<dyn Error>> {
        let _ = self;
        Ok(client
            .query_one(
                "SELECT count(*) FROM highwater_keys WHERE scope = $1",
                &[&scope.as_str()],
            )?
            .get(0))
    }
}

/// The key of bulk record `i`.
pub fn bulk_key(i: usize) -> highwater::Key {
    highwater::Key::try_from(format!("k{i:05}").as_str()).expect("a short key")
}

/// Writes `n` records `bulk_key(i) -> value(i)` on `node` in batches of 5 000; returns each
/// record's version, in order.
///
/// # Errors
/// A write failed.
pub fn write_bulk(
    node: &highwater::SyncEngine,
    scope: &highwater::Scope,
    n: usize,
    value: impl Fn(usize) -> String,
) -> Result<Vec<highwater::Hlc>, Box<dyn Error>> {
    let mut hlcs = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        hlcs.extend(node.write_batch(chunk.iter().map(|&i| {
            let op = highwater::Op::Put {
                value: value(i).into_bytes(),
                blob: None,
            };
            (scope.clone(), bulk_key(i), op)
        }))?);
    }
    Ok(hlcs)
}
