//! The limits each figure is compared with, measured in the same run on the same records:
//! a redb bulk insert in one transaction, postcard encode and decode of the pages the
//! engine ships, blake3 over the records' bytes, disk writes in the blob cases' file sizes,
//! and raw loopback HTTP with hyper.

use std::io::Write;

use highwater::wire::{self, ExchangeResponse, ResponseMarks};
use highwater::{Hlc, Key, NodeId, Op, ScopedWatermarks, Version};
use redb::{Database, TableDefinition};

use crate::fixture::{scope, Fixture, Rec};
use crate::measure::{self, Summary};
use crate::rawhttp;
use crate::report::{count, Row, Unit};
use crate::Result;

/// key -> value: the plain table of the redb limit.
const PLAIN: TableDefinition<&[u8], &[u8]> = TableDefinition::new("plain");
/// The two-index limit's key index, shaped as the store's `keys-v2`: scope | key -> origin |
/// time.
const BY_KEY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("by-key");
/// The two-index limit's version index, shaped as the store's `versions-v2`: scope | origin
/// | time -> key length | key | version.
const BY_TIME: TableDefinition<&[u8], &[u8]> = TableDefinition::new("by-time");

/// Versions per page, as the engine's default `page_limit`.
const PAGE: usize = 1000;

/// Bytes per write in the disk limit, as `blob::CHUNK`.
const CHUNK: usize = 256 << 10;

/// Every limit.
pub fn run(fx: &mut Fixture) -> Result {
    let n = fx.sizes.records;
    let runs = fx.sizes.runs;
    let mut rows = vec![
        redb_bulk(fx, n, runs, None)?,
        redb_bulk(fx, n, runs, Some(engine_cache()?))?,
        redb_paged(fx, n, runs)?,
        redb_two_indexes(fx, n, runs)?,
    ];
    rows.extend(postcard(fx.records(n), runs)?);
    rows.push(blake3(fx.records(n), runs));
    for file in fx.sizes.blob_files.clone() {
        rows.push(disk_write(fx, fx.sizes.blob_total, file, runs)?);
    }
    rows.extend(rawhttp::limits(
        fx.sizes.http_stream,
        fx.sizes.http_requests,
        runs,
    )?);
    Ok(rows)
}

/// Inserts the records into a plain key -> value table in one durable transaction, with
/// redb's default page cache (1 GiB: the whole tree stays in memory) or with `cache` bytes
/// (the cache the measured engines run with: [`engine_cache`]).
fn redb_bulk(fx: &mut Fixture, n: u64, runs: usize, cache: Option<usize>) -> Result<Row> {
    let per_txn = usize::try_from(n)?.max(1);
    let rates = redb_insert_rates(fx, n, runs, cache, per_txn)?;
    let (cache_text, key) = match cache {
        None => ("redb's default 1 GiB cache".to_string(), "redb bulk insert"),
        Some(bytes) => (
            format!("{} MiB cache", bytes >> 20),
            "redb bulk insert, node cache",
        ),
    };
    Ok(Row::new(
        format!(
            "limit: redb bulk insert, {} records, one transaction, {cache_text}",
            count(n)
        ),
        "records/s",
        Unit::RecordsPerSec,
        Summary::of(&rates),
    )
    .key(key))
}

/// The page cache the syncing engines run with: the library's default
/// (`RedbStore::CACHE_BYTES`), or `HIGHWATER_BENCH_CACHE_MIB` as the child reads it, so the
/// limits compare at the cache the engines were given.
fn engine_cache() -> Result<usize> {
    match std::env::var("HIGHWATER_BENCH_CACHE_MIB") {
        Ok(mib) => Ok(mib.parse::<usize>()? << 20),
        Err(_) => Ok(highwater::store::RedbStore::CACHE_BYTES),
    }
}

/// Inserts the records in transactions of one page ([`PAGE`] records) each, non-durable
/// but the last, as the engine commits a bulk transfer (without its index, merge and
/// checkpoints): the cost of small commits alone.
fn redb_paged(fx: &mut Fixture, n: u64, runs: usize) -> Result<Row> {
    let cache = engine_cache()?;
    let rates = redb_insert_rates(fx, n, runs, Some(cache), PAGE)?;
    Ok(Row::new(
        format!(
            "limit: redb insert, {} records, one non-durable transaction per {PAGE}, {} MiB cache",
            count(n),
            cache >> 20
        ),
        "records/s",
        Unit::RecordsPerSec,
        Summary::of(&rates),
    )
    .key("redb paged insert"))
}

/// Inserts the records into two tables shaped as the store format's two indexes, in one
/// transaction at the node's cache: each record once under its key (at a random place, as
/// `keys-v2`) and once under its origin and time (in order, as `versions-v2`). The floor of
/// any store that keeps both orders, which a sync needs (the merge looks records up by key,
/// a pull reads them by origin and time), on this format; the store adds the merge, the
/// audit chunks and the marks on top.
fn redb_two_indexes(fx: &mut Fixture, n: u64, runs: usize) -> Result<Row> {
    let cache = engine_cache()?;
    let origin = [7u8; 16];
    // The store's scope prefix: the scope text's length, then the text.
    let text = scope().to_string();
    let mut prefix = vec![u8::try_from(text.len())?];
    prefix.extend_from_slice(text.as_bytes());
    let rates = insert_runs(fx, n, runs, "redb-two-limit", |dir, data| {
        let mut builder = Database::builder();
        builder.set_cache_size(cache);
        let db = builder.create(dir.join("limit.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut by_key = txn.open_table(BY_KEY)?;
            let mut by_time = txn.open_table(BY_TIME)?;
            let (mut key_row, mut time_row, mut value_row) = (Vec::new(), Vec::new(), Vec::new());
            for (i, (k, v)) in data.iter().enumerate() {
                let time = (1u64 << 62) + i as u64;
                time_row.clear();
                time_row.extend_from_slice(&prefix);
                time_row.extend_from_slice(&origin);
                time_row.extend_from_slice(&time.to_be_bytes());
                key_row.clear();
                key_row.extend_from_slice(&prefix);
                key_row.extend_from_slice(k);
                by_key.insert(key_row.as_slice(), &time_row[prefix.len()..])?;
                // The row of `versions-v2`: key length, key, and the version (its Hlc,
                // the op tag and the value's length before the value).
                value_row.clear();
                value_row.extend_from_slice(&(k.len() as u16).to_be_bytes());
                value_row.extend_from_slice(k);
                value_row.extend_from_slice(&time_row[prefix.len()..]);
                value_row.extend_from_slice(&[0, v.len() as u8, 0]);
                value_row.extend_from_slice(v);
                by_time.insert(time_row.as_slice(), value_row.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    })?;
    Ok(Row::new(
        format!(
            "limit: redb insert into the format's two indexes (by key, at random; by origin and time, in order), {} records, one transaction, {} MiB cache",
            count(n),
            cache >> 20
        ),
        "records/s",
        Unit::RecordsPerSec,
        Summary::of(&rates),
    )
    .key("redb two-index insert"))
}

/// Records per second inserting the records into a plain table of a fresh database (with
/// `cache` bytes of page cache, or redb's default), `per_txn` records per transaction, each
/// non-durable but the last: one rate per run.
fn redb_insert_rates(
    fx: &mut Fixture,
    n: u64,
    runs: usize,
    cache: Option<usize>,
    per_txn: usize,
) -> Result<Vec<f64>> {
    insert_runs(fx, n, runs, "redb-limit", |dir, data| {
        let mut builder = Database::builder();
        if let Some(bytes) = cache {
            builder.set_cache_size(bytes);
        }
        let db = builder.create(dir.join("limit.redb"))?;
        let txns = data.chunks(per_txn).count();
        for (i, chunk) in data.chunks(per_txn).enumerate() {
            let mut txn = db.begin_write()?;
            if i + 1 < txns {
                txn.set_durability(redb::Durability::None)?;
            }
            {
                let mut table = txn.open_table(PLAIN)?;
                for (k, v) in chunk {
                    table.insert(k.as_slice(), v.as_slice())?;
                }
            }
            txn.commit()?;
        }
        Ok(())
    })
}

/// Records per second of `runs` runs of `insert`, each given a fresh directory (removed
/// after it) and the first `n` records.
fn insert_runs(
    fx: &mut Fixture,
    n: u64,
    runs: usize,
    what: &str,
    mut insert: impl FnMut(&std::path::Path, &[Rec]) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut rates = Vec::new();
    for _ in 0..runs {
        let dir = fx.fresh_dir(what);
        std::fs::create_dir_all(&dir)?;
        let data = fx.records(n);
        let (done, secs) = measure::timed(|| insert(&dir, data));
        done?;
        rates.push(n as f64 / secs);
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(rates)
}

/// The responses that carry `data` in pages of [`PAGE`] versions, as the engine ships them.
fn pages(data: &[Rec]) -> impl Iterator<Item = ExchangeResponse> + '_ {
    let origin = NodeId::from_bytes([7; 16]).expect("a nonzero id");
    let scope = scope();
    let base_time = 1u64 << 62;
    data.chunks(PAGE).enumerate().map(move |(p, chunk)| {
        let first = (p * PAGE) as u64;
        let versions: Vec<(Key, Version)> = chunk
            .iter()
            .enumerate()
            .map(|(j, (k, v))| {
                let hlc = Hlc::new(base_time + first + j as u64 + 1, origin);
                let op = Op::Put {
                    value: v.to_vec(),
                    blob: None,
                };
                (
                    Key::new(k.to_vec()).expect("32-byte key"),
                    Version { hlc, op },
                )
            })
            .collect();
        let top = versions
            .last()
            .map_or(Hlc::new(base_time, origin), |(_, v)| v.hlc);
        let run = highwater::exchange::Run {
            scope: scope.clone(),
            origin,
            base: (first > 0).then(|| Hlc::new(base_time + first, origin)),
            top,
            versions,
        };
        let mut watermarks = ScopedWatermarks::new();
        watermarks.observe(&scope, top);
        ExchangeResponse {
            from: NodeId::from_bytes([9; 16]).expect("a nonzero id"),
            marks: ResponseMarks::Full(watermarks),
            page: highwater::exchange::Page {
                runs: vec![run],
                more: true,
            },
            halts: Vec::new(),
            ext: Default::default(),
        }
    })
}

/// Encodes and decodes the pages that carry the records, with the engine's wire codec.
fn postcard(data: &[Rec], runs: usize) -> Result<Vec<Row>> {
    let (mut enc, mut dec, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    for _ in 0..runs {
        let (mut enc_secs, mut dec_secs) = (0.0, 0.0);
        bytes = 0;
        for response in pages(data) {
            let (encoded, secs) = measure::timed(|| wire::encode(&response));
            enc_secs += secs;
            bytes += encoded.len();
            let (decoded, secs) = measure::timed(|| wire::decode::<ExchangeResponse>(&encoded));
            dec_secs += secs;
            if decoded? != response {
                return Err("a page did not survive encode and decode".into());
            }
        }
        enc.push(data.len() as f64 / enc_secs);
        dec.push(data.len() as f64 / dec_secs);
    }
    let case = format!(
        "limit: postcard (wire codec), {} records in pages of {PAGE}",
        count(data.len() as u64)
    );
    Ok(vec![
        Row::new(
            &case,
            "encode records/s",
            Unit::RecordsPerSec,
            Summary::of(&enc),
        )
        .key("postcard encode"),
        Row::new(
            &case,
            "decode records/s",
            Unit::RecordsPerSec,
            Summary::of(&dec),
        )
        .key("postcard decode"),
        Row::new(
            &case,
            "encoded bytes per record",
            Unit::Count,
            Summary::one(bytes as f64 / data.len() as f64),
        ),
    ])
}

/// blake3 over the records' bytes (keys and values, contiguous), one thread.
fn blake3(data: &[Rec], runs: usize) -> Row {
    let mut bytes =
        Vec::with_capacity(data.len() * (data.first().map_or(0, |r| r.0.len() + r.1.len())));
    for (k, v) in data {
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(v);
    }
    let rates: Vec<f64> = (0..runs)
        .map(|_| {
            let (hash, secs) = measure::timed(|| blake3::hash(&bytes));
            std::hint::black_box(hash);
            bytes.len() as f64 / secs / 1e6
        })
        .collect();
    Row::new(
        format!(
            "limit: blake3 over the records, {:.0} MB",
            bytes.len() as f64 / 1e6
        ),
        "MB/s",
        Unit::MbPerSec,
        Summary::of(&rates),
    )
    .key("blake3")
}

/// Writes `total` bytes in files of `file` bytes, each fsynced, in chunks of [`CHUNK`].
fn disk_write(fx: &mut Fixture, total: u64, file: u64, runs: usize) -> Result<Row> {
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let mut rates = Vec::new();
    for _ in 0..runs {
        let dir = fx.fresh_dir("disk-limit");
        std::fs::create_dir_all(&dir)?;
        let (done, secs) = measure::timed(|| -> Result<()> {
            for f in 0..total.div_ceil(file) {
                let mut out = std::fs::File::create(dir.join(format!("f{f}")))?;
                let mut left = file;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    out.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                out.sync_all()?;
            }
            Ok(())
        });
        done?;
        rates.push(total as f64 / secs / 1e6);
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(Row::new(
        format!(
            "limit: disk write + fsync, {} MiB in files of {}",
            total >> 20,
            crate::blobs::size_name(file)
        ),
        "MB/s",
        Unit::MbPerSec,
        Summary::of(&rates),
    )
    .key(format!("disk write {}", crate::blobs::size_name(file))))
}
