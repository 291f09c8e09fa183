//! Three replicas on redb in a temporary directory: a hub and two devices. They write
//! concurrently (records and a 3 MB file), one device goes offline and both sides keep
//! writing (a conflicting write to the same key and a delete), then everything heals and
//! converges, the file Resident and byte-identical everywhere.
//!
//! Run with `cargo run --release --example demo`. Exits non-zero unless all three replicas
//! end with equal digests and equal watermarks.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use highwater::{InProcess, Key, Op, Scope, SyncEngine};

fn sync(a: &SyncEngine, b: &Arc<SyncEngine>) -> highwater::Result<(usize, usize, usize)> {
    let transport = InProcess::new(b.clone());
    let (mut rounds, mut shipped, mut received) = (0, 0, 0);
    loop {
        let out = futures_executor::block_on(a.exchange(&transport))?;
        rounds += 1;
        shipped += out.shipped;
        received += out.received;
        if !out.has_more {
            return Ok((rounds, shipped, received));
        }
    }
}

fn show(name: &str, node: &SyncEngine, scope: &Scope, key: &Key) -> highwater::Result<()> {
    match node.get(scope, key)? {
        Some(r) => println!(
            "  {name:<7} {key:?} = {:?} (written by {})",
            String::from_utf8_lossy(&r.value),
            r.hlc.origin().short()
        ),
        None => println!("  {name:<7} {key:?} = <deleted>"),
    }
    Ok(())
}

fn main() -> highwater::Result<ExitCode> {
    let dir = tempfile::tempdir().map_err(|source| highwater::error::StoreError::Io {
        path: "tempdir".into(),
        source,
    })?;
    let hub = Arc::new(SyncEngine::open(dir.path().join("hub"))?);
    let phone = SyncEngine::open(dir.path().join("phone"))?;
    let laptop = SyncEngine::open(dir.path().join("laptop"))?;
    println!(
        "hub {}  phone {}  laptop {}",
        hub.node_id().short(),
        phone.node_id().short(),
        laptop.node_id().short()
    );

    let notes = Scope::app("notes", "items")?;
    let shared = Scope::shared();

    // 1. Bulk: the phone holds 100 000 records, written in one durable batch.
    let n = 100_000u32;
    let ops = (0..n).map(|i| {
        let key = Key::new(format!("photo-{i:06}")).expect("short key");
        (
            shared.clone(),
            key,
            Op::Put {
                value: vec![b'x'; 120],
                blob: None,
            },
        )
    });
    let t = Instant::now();
    phone.write_batch(ops)?;
    println!(
        "phone: wrote {n} records in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let (rounds, shipped, _) = sync(&phone, &hub)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "phone -> hub: {shipped} versions in {rounds} rounds, {:.0} ms ({:.0} records/s)",
        secs * 1e3,
        f64::from(n) / secs
    );

    // 2. Everyone writes, everyone syncs through the hub.
    let title = Key::try_from("title")?;
    let draft = Key::try_from("draft")?;
    let photo = Key::try_from("photo")?;
    let photo_bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    phone.put_file_bytes(&notes, &photo, "holiday.jpg", &photo_bytes)?;
    phone.put(&notes, &title, "Groceries")?;
    laptop.put(&notes, &draft, "call the plumber")?;
    sync(&laptop, &hub)?;
    sync(&phone, &hub)?;
    sync(&laptop, &hub)?;

    // 3. The laptop goes offline. Both sides keep writing, to the same key too.
    laptop.put(&notes, &title, "Groceries (laptop)")?;
    phone.put(&notes, &title, "Groceries (phone, later)")?;
    phone.delete(&notes, &draft)?;
    println!("offline edits:");
    show("laptop", &laptop, &notes, &title)?;
    show("phone", &phone, &notes, &title)?;

    // 4. Heal: both devices sync with the hub until nothing moves.
    let t = Instant::now();
    for _ in 0..2 {
        sync(&phone, &hub)?;
        sync(&laptop, &hub)?;
    }
    println!(
        "healed in {:.1} ms; last write wins:",
        t.elapsed().as_secs_f64() * 1e3
    );
    for (name, node) in [("hub", &*hub), ("phone", &phone), ("laptop", &laptop)] {
        show(name, node, &notes, &title)?;
        show(name, node, &notes, &draft)?;
    }

    let mut files_ok = true;
    for (name, node) in [("hub", &*hub), ("phone", &phone), ("laptop", &laptop)] {
        let residency = node.residency(&notes, &photo)?;
        let mut bytes = Vec::new();
        if let Some((_, mut file)) = node.open_file(&notes, &photo)? {
            std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| {
                highwater::error::StoreError::Io {
                    path: "photo".into(),
                    source: e,
                }
            })?;
        }
        let same = bytes == photo_bytes;
        files_ok &= same;
        println!(
            "  {name:<7} photo: {} ({} bytes, {})",
            residency.as_str(),
            bytes.len(),
            if same { "identical" } else { "DIFFERENT" }
        );
    }

    let digests = [hub.digest()?, phone.digest()?, laptop.digest()?];
    let marks = [hub.watermarks()?, phone.watermarks()?, laptop.watermarks()?];
    println!(
        "digests: hub {}  phone {}  laptop {}",
        digests[0].short(),
        digests[1].short(),
        digests[2].short()
    );
    let converged = files_ok
        && digests.iter().all(|d| *d == digests[0])
        && marks.iter().all(|m| *m == marks[0]);
    println!(
        "{}",
        if converged {
            "converged"
        } else {
            "NOT converged"
        }
    );
    Ok(if converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
