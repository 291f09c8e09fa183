//! A device node restored from a backup, with the release binary's commands as a user runs
//! them: the device wrote, was backed up (its data directory copied while stopped), wrote
//! more and overwrote a record, synced those to the hub, and was stopped; the backup was put
//! back and the node started again. With no operator action the restored node detects the
//! restore, takes a fresh id, and gets its later writes back; no node loses an acknowledged
//! write. The same with the blob directory not restored: the node fetches the files its
//! records reference from the hub.

#[path = "common/process.rs"]
mod process;

use std::path::Path;
use std::time::Duration;

use process::{arg, ok, poll, run, ServeProcess, TestResult};

const WAIT: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_millis(50);

/// The value of `key` in `shared` on the node at `url`, if any.
fn value(url: &str, key: &str) -> TestResult<Option<String>> {
    let out = run(&["get", "--node", url, "shared", key])?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn put(url: &str, key: &str, value: &str) -> TestResult {
    ok(&["put", "--node", url, "shared", key, value])?;
    Ok(())
}

/// Waits until the node at `url` holds `value` under `key`.
fn holds(url: &str, key: &str, want: &str) -> TestResult {
    poll(WAIT, EVERY, &format!("{url} holds {key} = {want}"), || {
        Ok((value(url, key)?.as_deref() == Some(want)).then_some(()))
    })
}

fn device(dir: &Path, hub: &ServeProcess) -> TestResult<ServeProcess> {
    ServeProcess::start(dir, &["--peer", &hub.url, "--interval", "200ms"])
}

fn stop(node: &mut ServeProcess) -> TestResult {
    let status = node.terminate(WAIT)?;
    assert!(status.success(), "the node stopped with {status}");
    Ok(())
}

/// Runs the scenario; `with_blobs` says whether the backup put back the blob directory too.
fn restore_scenario(with_blobs: bool) -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (hub_dir, dev_dir) = (tmp.path().join("hub"), tmp.path().join("device"));
    let backup = tmp.path().join("backup");
    let hub = ServeProcess::start(&hub_dir, &["--interval", "200ms"])?;

    // Before the backup: five records and a file, synced to the hub.
    let mut dev = device(&dev_dir, &hub)?;
    for i in 0..5 {
        put(&dev.url, &format!("d{i}"), &format!("v{i}"))?;
    }
    let file = tmp.path().join("photo.bin");
    let photo: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &photo)?;
    ok(&[
        "put-file",
        "--node",
        &dev.url,
        "shared",
        "photo",
        arg(&file),
    ])?;
    holds(&hub.url, "d4", "v4")?;
    poll(WAIT, EVERY, "the hub holds the photo", || {
        let out = tmp.path().join("hub-photo.bin");
        let got = run(&["get-file", "--node", &hub.url, "shared", "photo", arg(&out)])?;
        Ok(got.status.success().then_some(()))
    })?;
    stop(&mut dev)?;
    copy_dir(&dev_dir, &backup)?;

    // After the backup: five more records and an overwrite, synced to the hub.
    let mut dev = device(&dev_dir, &hub)?;
    for i in 5..10 {
        put(&dev.url, &format!("d{i}"), &format!("v{i}"))?;
    }
    put(&dev.url, "d0", "v0, later")?;
    holds(&hub.url, "d9", "v9")?;
    holds(&hub.url, "d0", "v0, later")?;
    stop(&mut dev)?;

    // The backup goes back, the node starts again as it was: nothing else is done.
    std::fs::remove_dir_all(&dev_dir)?;
    copy_dir(&backup, &dev_dir)?;
    if !with_blobs {
        std::fs::remove_dir_all(dev_dir.join("blobs"))?;
    }
    let dev = device(&dev_dir, &hub)?;
    for i in 5..10 {
        holds(&dev.url, &format!("d{i}"), &format!("v{i}"))?;
    }
    holds(&dev.url, "d0", "v0, later")?;
    let back = tmp.path().join("photo-back.bin");
    poll(WAIT, EVERY, "the device reads its photo", || {
        let got = run(&[
            "get-file",
            "--node",
            &dev.url,
            "shared",
            "photo",
            arg(&back),
        ])?;
        Ok(got.status.success().then_some(()))
    })?;
    assert_eq!(std::fs::read(&back)?, photo);

    // New writes go out, and no node lost anything it acknowledged.
    put(&dev.url, "d10", "after the restore")?;
    holds(&hub.url, "d10", "after the restore")?;
    for i in 1..10 {
        for url in [&hub.url, &dev.url] {
            assert_eq!(
                value(url, &format!("d{i}"))?,
                Some(format!("v{i}")),
                "{url}"
            );
        }
    }
    let log = dev.log_text();
    assert!(
        log.contains("took a fresh node id"),
        "the device said nothing of the restore:\n{log}"
    );
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> TestResult {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[test]
fn a_restored_device_takes_its_later_writes_back_without_operator_action() -> TestResult {
    restore_scenario(true)
}

#[test]
fn a_restored_device_without_its_blob_directory_fetches_its_files_again() -> TestResult {
    restore_scenario(false)
}

fn direct_value(dir: &Path, key: &str) -> TestResult<Option<String>> {
    let out = run(&["get", "--data", arg(dir), "shared", key])?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The node id the node at `url` (or on the data directory `dir`) reports.
fn node_id(target: &[&str]) -> TestResult<String> {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(target);
    let status: serde_json::Value = serde_json::from_slice(&ok(&args)?)?;
    Ok(status["node"].as_str().ok_or("no node id")?.to_owned())
}

/// `highwater audit` on a restored data directory, with no node running on it: the audit
/// takes a fresh id, brings back the writes made after the backup, lists them, and a second
/// audit finds the two sides the same.
#[test]
fn the_audit_command_repairs_a_restored_data_directory_and_says_what_differed() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (dev, backup) = (tmp.path().join("device"), tmp.path().join("backup"));
    let hub = ServeProcess::start(&tmp.path().join("hub"), &["--interval", "1h"])?;
    let sync = || ok(&["sync", "--data", arg(&dev), "--peer", &hub.url]);
    ok(&["put", "--data", arg(&dev), "shared", "before", "b"])?;
    sync()?;
    copy_dir(&dev, &backup)?;
    ok(&["put", "--data", arg(&dev), "shared", "later", "l"])?;
    ok(&["put", "--data", arg(&dev), "shared", "before", "b, later"])?;
    sync()?;
    let old_id = node_id(&["--data", arg(&dev)])?;
    std::fs::remove_dir_all(&dev)?;
    copy_dir(&backup, &dev)?;
    assert_eq!(direct_value(&dev, "later")?, None);

    let report = String::from_utf8(ok(&["audit", "--data", arg(&dev), "--peer", &hub.url])?)?;
    assert!(report.contains("2 keys repaired here"), "{report}");
    assert!(report.contains("repaired: shared later"), "{report}");
    assert!(report.contains("repaired: shared before"), "{report}");
    assert_eq!(direct_value(&dev, "later")?.as_deref(), Some("l"));
    assert_eq!(direct_value(&dev, "before")?.as_deref(), Some("b, later"));
    assert_ne!(node_id(&["--data", arg(&dev)])?, old_id, "a fresh id");

    let again = String::from_utf8(ok(&["audit", "--data", arg(&dev), "--peer", &hub.url])?)?;
    assert!(again.contains("the same live contents"), "{again}");
    Ok(())
}

/// A hub restored from a backup has no peers of its own to detect the restore with: its
/// devices call it. `serve --restored` takes a fresh id before it issues any timestamp, and
/// the hub's own later writes, which a device holds, come back in the device's next round.
#[test]
fn a_hub_started_with_restored_gets_its_own_later_writes_back_from_a_device() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (hub_dir, backup) = (tmp.path().join("hub"), tmp.path().join("backup"));
    let mut hub = ServeProcess::start(&hub_dir, &[])?;
    let port = hub.url.rsplit(':').next().ok_or("no port")?.to_owned();
    let listen = format!("127.0.0.1:{port}");
    let start_hub = |extra: &[&str]| {
        let mut args = vec!["--listen", listen.as_str()];
        args.extend_from_slice(extra);
        ServeProcess::start(&hub_dir, &args)
    };
    put(&hub.url, "h0", "before")?;
    stop(&mut hub)?;
    copy_dir(&hub_dir, &backup)?;
    let mut hub = start_hub(&[])?;
    let dev = device(&tmp.path().join("device"), &hub)?;
    put(&hub.url, "h1", "after the backup")?;
    holds(&dev.url, "h1", "after the backup")?;
    let old_id = node_id(&["--node", &hub.url])?;
    stop(&mut hub)?;

    std::fs::remove_dir_all(&hub_dir)?;
    copy_dir(&backup, &hub_dir)?;
    let hub = start_hub(&["--restored"])?;
    assert_ne!(node_id(&["--node", &hub.url])?, old_id, "a fresh id");
    holds(&hub.url, "h1", "after the backup")?;
    put(&hub.url, "h2", "after the restore")?;
    holds(&dev.url, "h2", "after the restore")?;
    let log = dev.log_text();
    assert!(
        log.contains("answers as another node"),
        "the device said nothing of the hub's new id:\n{log}"
    );
    Ok(())
}
