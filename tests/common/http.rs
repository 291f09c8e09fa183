//! A node served over HTTP on loopback, requests written by hand on a raw socket, and the
//! storage snapshot a refused request must leave unchanged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use highwater::engine::BLOB_DIR;
use highwater::http::{serve, Access, ClientConfig, HttpBody, HttpTransport, ServerConfig};
use highwater::{EngineConfig, Hash, ScopedWatermarks, SyncEngine};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::rounds::TestResult;

/// How long a test waits for anything the server must do promptly. Only a bound on a
/// failure: every wait ends on an event long before it.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// A token that may read, write and sync everything.
pub const HUB: &str = "hub-secret-0123456789";
/// A token that may read, write and sync `app/a/*` only.
pub const APP_A: &str = "app-a-secret-0123456789";
/// A token that may read everything and nothing else.
pub const READER: &str = "reader-secret-0123456789";

/// The token file of a protected node: [`HUB`], [`APP_A`] and [`READER`].
pub fn tokens() -> Arc<Access> {
    let json = format!(
        r#"{{"tokens": [
            {{"name": "hub", "token": "{HUB}", "read": ["*"], "write": ["*"], "sync": true}},
            {{"name": "app-a", "token": "{APP_A}", "read": ["app/a/*"], "write": ["app/a/*"], "sync": true}},
            {{"name": "reader", "token": "{READER}", "read": ["*"]}}
        ]}}"#
    );
    Arc::new(Access::from_json(&json).expect("a valid token file"))
}

/// A redb node served on `127.0.0.1:0` until [`Server::stop`].
pub struct Server {
    /// The node's engine.
    pub engine: Arc<SyncEngine>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory (redb file and `blobs/`); other files may sit beside them.
    pub dir: tempfile::TempDir,
    /// Whether it speaks TLS.
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), highwater::http::ServeError>>>,
}

impl Server {
    /// Serves a new node with default engine settings.
    pub async fn start(config: ServerConfig) -> TestResult<Server> {
        Server::start_with(EngineConfig::default(), config).await
    }

    /// Serves a new node with `engine_config`.
    pub async fn start_with(
        engine_config: EngineConfig,
        config: ServerConfig,
    ) -> TestResult<Server> {
        let dir = tempfile::tempdir()?;
        let engine = Arc::new(SyncEngine::open_with(dir.path(), engine_config)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tls = config.tls.is_some();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(engine.clone(), listener, config, async move {
            let _ = stopped.await;
        }));
        Ok(Server {
            engine,
            addr,
            dir,
            tls,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The node's root URL (`https://` when it speaks TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The node's blob directory.
    pub fn blob_dir(&self) -> PathBuf {
        self.dir.path().join(BLOB_DIR)
    }

    /// A client with `token`.
    pub fn client(&self, token: Option<&str>) -> TestResult<HttpTransport> {
        Ok(HttpTransport::with_config(
            &self.url(),
            ClientConfig {
                token: token.map(str::to_owned),
                ..ClientConfig::default()
            },
        )?)
    }

    /// What a refused request must leave unchanged.
    pub fn snapshot(&self) -> TestResult<Snapshot> {
        snapshot(&self.engine, &self.blob_dir())
    }

    /// Stops the server and checks that it ended cleanly.
    pub async fn stop(mut self) -> TestResult {
        self.shut_down().await
    }

    /// Stops the server (it lets requests in progress finish) and checks that it ended
    /// cleanly; the engine stays open.
    pub async fn shut_down(&mut self) -> TestResult {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

/// A node's data and the files under its blob directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The digest of every record.
    pub digest: Hash,
    /// The node's watermarks.
    pub watermarks: ScopedWatermarks,
    /// The blob store's listing.
    pub blobs: Vec<(Hash, u64)>,
    /// Every file under the blob directory (including `tmp/`), with its length.
    pub files: BTreeMap<PathBuf, u64>,
}

/// The snapshot of `engine` whose blobs live in `blob_dir`.
pub fn snapshot(engine: &SyncEngine, blob_dir: &Path) -> TestResult<Snapshot> {
    Ok(Snapshot {
        digest: engine.digest()?,
        watermarks: engine.watermarks()?,
        blobs: engine.blob_store().list()?,
        files: files_under(blob_dir)?,
    })
}

/// Every file under `dir`, recursively, with its length.
pub fn files_under(dir: &Path) -> TestResult<BTreeMap<PathBuf, u64>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                out.insert(entry.path(), meta.len());
            }
        }
    }
    Ok(out)
}

/// Whether the blob store's temporary directory is empty.
pub fn tmp_is_empty(blob_dir: &Path) -> TestResult<bool> {
    Ok(std::fs::read_dir(blob_dir.join("tmp"))?.next().is_none())
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (by Content-Length).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> TestResult<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The JSON error message.
    pub fn error(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_default()
    }
}

/// A connection on which requests are written by hand.
pub struct Raw {
    stream: TcpStream,
    /// Bytes read past the last response.
    buffer: Vec<u8>,
}

impl Raw {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> TestResult<Raw> {
        Ok(Raw {
            stream: TcpStream::connect(addr).await?,
            buffer: Vec::new(),
        })
    }

    /// Writes `bytes` as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> TestResult {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads more bytes; false at the end of the stream.
    async fn fill(&mut self) -> TestResult<bool> {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(PROMPTLY, self.stream.read(&mut chunk))
            .await
            .map_err(|_| "no bytes from the server in time")??;
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Reads one response (head and Content-Length body), failing if it does not arrive
    /// promptly.
    pub async fn response(&mut self) -> TestResult<RawResponse> {
        self.read_response(true).await
    }

    /// Reads the response to a HEAD request (its Content-Length announces no body).
    pub async fn head_response(&mut self) -> TestResult<RawResponse> {
        self.read_response(false).await
    }

    async fn read_response(&mut self, with_body: bool) -> TestResult<RawResponse> {
        let head_end = loop {
            if let Some(i) = find(&self.buffer, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await? {
                return Err(format!(
                    "connection closed before a response: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                )
                .into());
            }
        };
        let head = String::from_utf8(self.buffer[..head_end].to_vec())?;
        self.buffer.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().ok_or("no status line")?;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .ok_or("no status code")?
            .parse()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse())
            .transpose()?
            .filter(|_| with_body)
            .unwrap_or(0);
        while self.buffer.len() < len {
            if !self.fill().await? {
                return Err("connection closed inside a response body".into());
            }
        }
        let body = self.buffer.drain(..len).collect();
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// Reads until the server closes the connection (failing if it does not promptly), and
    /// returns what came after the last response.
    pub async fn closed(&mut self) -> TestResult<Vec<u8>> {
        loop {
            match self.fill().await {
                Ok(true) => {}
                Ok(false) => return Ok(std::mem::take(&mut self.buffer)),
                Err(e) => {
                    // A reset is a close too (the server may drop unread bytes).
                    let reset = e
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset);
                    return if reset {
                        Ok(std::mem::take(&mut self.buffer))
                    } else {
                        Err(e)
                    };
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends one request with `head` (request line and headers, without the blank line) and
/// `body`, on a new connection, and reads the response.
pub async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> TestResult<RawResponse> {
    let mut conn = Raw::connect(addr).await?;
    let mut bytes = format!("{head}\r\n\r\n").into_bytes();
    bytes.extend_from_slice(body);
    conn.send(&bytes).await?;
    conn.response().await
}

/// A request head for `method path` with an optional bearer token and extra header lines.
pub fn head(method: &str, path: &str, token: Option<&str>, extra: &[String]) -> String {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: localhost");
    if let Some(t) = token {
        out.push_str(&format!("\r\nAuthorization: Bearer {t}"));
    }
    for line in extra {
        out.push_str("\r\n");
        out.push_str(line);
    }
    out
}

/// A whole body for the client.
pub fn body(bytes: impl Into<Bytes>) -> HttpBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// Sends `method path` with `bytes` through `client`, returning the status, the headers and
/// the whole response body.
pub async fn call(
    client: &HttpTransport,
    method: Method,
    path: &str,
    bytes: impl Into<Bytes>,
) -> TestResult<(StatusCode, hyper::HeaderMap, Bytes)> {
    let bytes = bytes.into();
    let len = bytes.len() as u64;
    let resp = client.call(method, path, body(bytes), Some(len)).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, headers, bytes))
}

/// The `code` and `error` of a JSON error body.
pub fn error_of(bytes: &[u8]) -> TestResult<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    let field = |name: &str| {
        v.get(name)
            .and_then(|f| f.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("no {name:?} in {v}"))
    };
    Ok((field("code")?, field("error")?))
}
