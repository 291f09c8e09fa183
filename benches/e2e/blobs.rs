//! Blob sync between redb nodes over the in-process transport: the same total in small and
//! in large files, pulled by a child process so its peak RSS is the sync's own.

use std::io::Read;
use std::path::PathBuf;

use highwater::{Key, SyncEngine};

use crate::child::spawn_pull;
use crate::fixture::{scope, Fixture};
use crate::measure::{self, Summary};
use crate::report::{Row, Unit};
use crate::Result;

/// A size in the largest whole unit ("1 MiB", "256 MiB", "1 GiB").
pub fn size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} B"),
    }
}

/// The content of file `f`: pseudo-random bytes (blake3's output stream).
fn content(f: u64, size: u64) -> impl Read {
    let mut h = blake3::Hasher::new();
    h.update(b"highwater-bench file v1");
    h.update(&f.to_le_bytes());
    h.finalize_xof().take(size)
}

/// A closed redb node holding `total / file` files of `file` bytes, written with
/// `put_file`; the number of files and the MB/s of the writes.
///
/// # Errors
/// A store failure.
pub fn sender(fx: &mut Fixture, total: u64, file: u64) -> Result<(PathBuf, u64, f64)> {
    let files = total / file;
    let from = fx.fresh_dir("blob-sender");
    let a = SyncEngine::open(&from)?;
    let scope = scope();
    let (written, put_secs) = measure::timed(|| -> Result<()> {
        for f in 0..files {
            let key = Key::new(format!("file-{f:06}"))?;
            a.put_file(
                &scope,
                &key,
                b"a benchmark file".to_vec(),
                &mut content(f, file),
            )?;
        }
        Ok(())
    });
    written?;
    Ok((from, files, total as f64 / put_secs / 1e6))
}

/// Each file size: files written with `put_file`, then pulled `runs` times into fresh nodes.
pub fn run(fx: &mut Fixture) -> Result {
    let total = fx.sizes.blob_total;
    let mut rows = Vec::new();
    for file in fx.sizes.blob_files.clone() {
        let (from, files, put_rate) = sender(fx, total, file)?;
        let mut reports = Vec::new();
        for _ in 0..fx.sizes.runs {
            let into = fx.fresh_dir("blob-receiver");
            let r = spawn_pull(&from, &into)?;
            if r.blob_bytes != files * file || r.blob_fetches != files || r.resident as u64 != files
            {
                return Err(format!(
                    "blob sync moved {} bytes in {} fetches and holds {} files, expected {} in {files}",
                    r.blob_bytes, r.blob_fetches, r.resident, files * file
                )
                .into());
            }
            std::fs::remove_dir_all(&into)?;
            reports.push(r);
        }
        std::fs::remove_dir_all(&from)?;
        let name = size_name(file);
        let case = format!(
            "blob sync, in-process, {} in {files} files of {name}",
            size_name(total)
        );
        let disk = format!("disk write {name}");
        let rates: Vec<f64> = reports
            .iter()
            .map(|r| r.blob_bytes as f64 / r.secs / 1e6)
            .collect();
        let rss: Vec<f64> = reports.iter().map(|r| r.peak_rss as f64).collect();
        rows.push(
            Row::new(
                format!("put_file, {} in {files} files of {name}", size_name(total)),
                "MB/s",
                Unit::MbPerSec,
                Summary::one(put_rate),
            )
            .versus(&disk),
        );
        rows.push(Row::new(&case, "MB/s", Unit::MbPerSec, Summary::of(&rates)).versus(&disk));
        rows.push(Row::new(
            &case,
            "peak RSS of the sync process (both nodes)",
            Unit::MiB,
            Summary::of(&rss),
        ));
    }
    Ok(rows)
}
