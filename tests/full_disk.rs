//! A node whose disk fills up: writes fail with an error that names the OS error, reads go
//! on, and once space is back the node works again by itself (redb's database is reopened),
//! with nothing acknowledged lost. Runs on a small tmpfs, which needs root; elsewhere it is
//! skipped with a note.

use std::path::{Path, PathBuf};
use std::process::Command;

use highwater::error::error_chain;
use highwater::{Key, Scope, SyncEngine};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> TestResult<Option<Tmpfs>> {
        let dir = tempfile::tempdir()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(out) if out.status.success() => Ok(Some(Tmpfs { dir })),
            Ok(out) => {
                println!(
                    "skipped: cannot mount a tmpfs here (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Ok(None)
            }
            Err(e) => {
                println!("skipped: cannot run mount: {e}");
                Ok(None)
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem under `dir` with a ballast file until a write fails.
fn fill(dir: &Path) -> TestResult<PathBuf> {
    use std::io::Write;
    let ballast = dir.join("ballast");
    let mut file = std::fs::File::create(&ballast)?;
    let block = vec![0u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    // Whatever fits of a last small block.
    while file.write_all(&block[..512]).is_ok() {}
    let _ = file.sync_all();
    Ok(ballast)
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

#[test]
fn a_full_disk_fails_writes_with_the_os_error_and_the_node_recovers_when_space_is_back(
) -> TestResult {
    let Some(fs) = Tmpfs::mount("16m")? else {
        return Ok(());
    };
    let node = SyncEngine::open(fs.path().join("node"))?;
    let shared = Scope::shared();
    let value = vec![7u8; 8 << 10];
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let k = format!("before{i}");
        node.put(&shared, &key(&k), value.clone())?;
        acknowledged.push(k);
    }
    let ballast = fill(fs.path())?;

    // Writes fail, saying why; reads go on.
    let mut failed = None;
    for i in 0..50 {
        let k = format!("full{i}");
        match node.put(&shared, &key(&k), value.clone()) {
            Ok(_) => acknowledged.push(k),
            Err(e) => {
                failed = Some(error_chain(&e));
                break;
            }
        }
    }
    let failed = failed.ok_or("no write failed on a full disk")?;
    assert!(
        failed.contains("No space left on device"),
        "the error does not name the OS error: {failed}"
    );
    println!("the failure: {failed}");
    // A write while still full may fail again or fit in what the failed commit released;
    // either way nothing acknowledged is lost, and reads go on.
    if node.put(&shared, &key("still full"), value.clone()).is_ok() {
        acknowledged.push("still full".to_owned());
    }
    for k in &acknowledged {
        assert!(node.get(&shared, &key(k))?.is_some(), "{k} lost while full");
    }

    // Space is back: the next write works, with no restart.
    std::fs::remove_file(&ballast)?;
    node.put(&shared, &key("after"), value.clone())?;
    for k in acknowledged.iter().chain(["after".to_owned()].iter()) {
        assert!(node.get(&shared, &key(k))?.is_some(), "{k} lost");
    }
    // And all of it survives a reopen.
    drop(node);
    let node = SyncEngine::open(fs.path().join("node"))?;
    for k in acknowledged.iter().chain(["after".to_owned()].iter()) {
        assert!(
            node.get(&shared, &key(k))?.is_some(),
            "{k} lost after a reopen"
        );
    }
    Ok(())
}
