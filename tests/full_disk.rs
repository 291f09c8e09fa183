//! A node whose disk fills up: writes fail with an error that names the OS error, reads go
//! on, and once space is back the node works again by itself (redb's database is reopened),
//! with nothing acknowledged lost. Runs on a small tmpfs, which needs root; elsewhere it is
//! skipped with a note.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::http::{call, error_of};
use highwater::error::error_chain;
use highwater::http::{serve, HttpTransport, ServerConfig};
use highwater::{Key, Scope, SyncEngine};
use hyper::{Method, StatusCode};

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

/// The same over HTTP: a PUT on a full disk is answered 507 with the OS error, a read still
/// 200, and once space is back the next PUT is 200 with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_full_disk_is_507_naming_the_os_error_until_space_is_back() -> TestResult {
    let Some(fs) = Tmpfs::mount("16m")? else {
        return Ok(());
    };
    let node = Arc::new(SyncEngine::open(fs.path().join("node"))?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        node.clone(),
        listener,
        ServerConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = HttpTransport::new(&url, None)?;
    let value = vec![7u8; 8 << 10];
    let (status, _, _) = call(
        &client,
        Method::PUT,
        "/v1/records/shared/first",
        value.clone(),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let ballast = fill(fs.path())?;

    let mut refused = None;
    for i in 0..50 {
        let at = format!("/v1/records/shared/full{i}");
        let (status, _, body) = call(&client, Method::PUT, &at, value.clone()).await?;
        match status {
            StatusCode::OK => continue,
            other => {
                refused = Some((other, error_of(&body)?));
                break;
            }
        }
    }
    let (status, (code, message)) = refused.ok_or("no PUT failed on a full disk")?;
    assert_eq!(
        status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{code}: {message}"
    );
    assert!(
        message.contains("No space left on device"),
        "the answer does not name the OS error: {message}"
    );
    // Files too: their blob cannot be written. The server fails at the first chunk, and
    // reads the rest before answering: the client, still sending 8 MiB (more than the
    // sockets buffer), gets the 507 instead of a broken pipe.
    let (status, _, body) = call(
        &client,
        Method::PUT,
        "/v1/files/shared/big",
        vec![1u8; 8 << 20],
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    // Reads go on.
    let (status, _, body) = call(&client, Method::GET, "/v1/records/shared/first", "").await?;
    assert_eq!((status, body.len()), (StatusCode::OK, value.len()));

    std::fs::remove_file(&ballast)?;
    let (status, _, body) = call(
        &client,
        Method::PUT,
        "/v1/records/shared/after",
        value.clone(),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = call(
        &client,
        Method::PUT,
        "/v1/files/shared/big",
        vec![1u8; 1 << 20],
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert!(node.get(&Scope::shared(), &key("first"))?.is_some());
    let _ = stop.send(());
    server.await??;
    Ok(())
}
