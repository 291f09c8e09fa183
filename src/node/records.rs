//! Record commands (the CLI's get, ls, put-file, get-file) over any [`NodeApi`]: a running
//! node reached over HTTP, or a data directory this process opened ([`open_api`] gives
//! either), and what they fail with ([`CommandError`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::terminal::escape_line;
use super::NodeError;
use crate::api::{FileRead, ListQuery, Listed, NodeApi, RecordRead, Written, MAX_LIST_LIMIT};
use crate::blob::{copy_chunks, CopyError};
use crate::blocking::run_blocking;
use crate::engine::EngineConfig;
use crate::error::{Error, RefusalCode, TransportError, WireError};
use crate::http::{ClientConfig, NodeClient};
use crate::record::{Key, Scope};

/// Why a record command could not do its work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The record does not exist (or is deleted), or has no file.
    #[error("{what}: {scope}/{key}")]
    NotFound {
        /// What is missing ("no such record", "the record has no file").
        what: &'static str,
        /// The scope.
        scope: String,
        /// The key, as text for a terminal ([`super::terminal::escape_line`]).
        key: String,
    },
    /// The record's file has not arrived on this node yet.
    #[error("the file of {scope}/{key} is not here yet (staged): retry after the next sync")]
    Staged {
        /// The scope.
        scope: String,
        /// The key.
        key: String,
    },
    /// The node could not be reached in time.
    #[error("cannot reach the node: {reason}")]
    Unreachable {
        /// Why.
        reason: String,
    },
    /// The node's TLS certificate was not accepted (an unknown issuer, expired, or not valid
    /// for the host in the URL).
    #[error("TLS certificate problem with {url}: {reason} (trust the node's CA with --ca-file or HIGHWATER_CA_FILE)")]
    Certificate {
        /// The node's URL.
        url: String,
        /// What was wrong with the certificate.
        reason: String,
    },
    /// The node refused the request (its status and message).
    #[error("the node refused: {reason}")]
    Refused {
        /// The status and the node's message.
        reason: String,
    },
    /// The node refused the request's token, or the request carried none (401).
    #[error("the node refused the token: {reason} (give the node's token with --token or HIGHWATER_TOKEN)")]
    Unauthorized {
        /// The node's message.
        reason: String,
    },
    /// The node answered something this client does not understand.
    #[error("the node sent a bad response: {reason}")]
    BadResponse {
        /// What is wrong with it.
        reason: String,
    },
    /// The record's file could not be read to its end: a transfer that broke off, bytes
    /// that do not match its hash, or a failing disk.
    #[error("the file could not be read")]
    Transfer {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A local file (the one to store, or where output goes) could not be read or written.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Stopped by Ctrl-C or SIGTERM before it finished; what completed is kept.
    #[error("interrupted; what completed before is kept")]
    Interrupted,
    /// Any other failure of the node or of the data directory's engine (invalid input, a
    /// store failure...).
    #[error(transparent)]
    Engine(Error),
}

impl From<Error> for CommandError {
    fn from(e: Error) -> CommandError {
        match e {
            Error::Transport(TransportError::Unreachable { reason }) => {
                CommandError::Unreachable { reason }
            }
            Error::Transport(TransportError::Refused {
                code: RefusalCode::Unauthorized,
                reason,
            }) => CommandError::Unauthorized { reason },
            Error::Transport(TransportError::Refused { reason, .. }) => {
                CommandError::Refused { reason }
            }
            Error::Transport(TransportError::Certificate { url, reason }) => {
                CommandError::Certificate { url, reason }
            }
            Error::Transport(TransportError::BadResponse(WireError::Malformed { reason })) => {
                CommandError::BadResponse { reason }
            }
            Error::Transport(TransportError::BadResponse(other)) => CommandError::BadResponse {
                reason: other.to_string(),
            },
            other => CommandError::Engine(other),
        }
    }
}

/// Where record commands act: the data directory `data` if given (opened by this process),
/// else the node at `url` with `token`.
///
/// # Errors
/// [`NodeError::DataDirInUse`] while a running node holds `data`, [`NodeError::Open`] for
/// another failure to open it, [`NodeError::BadUrl`] for a `url` that cannot be used.
pub fn open_api(
    url: &str,
    token: Option<String>,
    data: Option<&Path>,
) -> Result<Box<dyn NodeApi>, NodeError> {
    let client = ClientConfig {
        token,
        ..ClientConfig::default()
    };
    open_api_with(url, client, data)
}

/// As [`open_api`], reaching the node with `client`'s settings (its token, a CA file to
/// trust for an `https://` node).
///
/// # Errors
/// As for [`open_api`], and [`NodeError::Transport`] when the CA file cannot be used.
pub fn open_api_with(
    url: &str,
    client: ClientConfig,
    data: Option<&Path>,
) -> Result<Box<dyn NodeApi>, NodeError> {
    Ok(match data {
        Some(dir) => Box::new(super::open_data_dir(dir, EngineConfig::default())?),
        None => Box::new(NodeClient::with_config(url, client)?),
    })
}

/// As [`open_api_with`], for commands that only read: a data directory that does not exist
/// is refused ([`NodeError::NoDataDir`]) rather than created, so a mistyped `--data` says
/// so instead of showing an empty node.
///
/// # Errors
/// As for [`open_api_with`], and [`NodeError::NoDataDir`].
pub fn open_api_reading(
    url: &str,
    client: ClientConfig,
    data: Option<&Path>,
) -> Result<Box<dyn NodeApi>, NodeError> {
    if let Some(dir) = data {
        super::require_data_dir(dir)?;
    }
    open_api_with(url, client, data)
}

/// A scope and key as text for an error message (the key escaped for a terminal).
fn text(scope: &Scope, key: &Key) -> (String, String) {
    (scope.to_string(), escape_line(key.as_bytes()))
}

fn not_found(what: &'static str, scope: &Scope, key: &Key) -> CommandError {
    let (scope, key) = text(scope, key);
    CommandError::NotFound { what, scope, key }
}

/// The live record under `key`.
///
/// # Errors
/// [`CommandError::NotFound`] when it is absent or deleted, or the node failed.
pub async fn get(api: &dyn NodeApi, scope: &Scope, key: &Key) -> Result<RecordRead, CommandError> {
    api.get(scope.clone(), key.clone())
        .await?
        .found()
        .ok_or_else(|| not_found("no such record", scope, key))
}

/// Calls `each` on every live record of `scope` whose key starts with `prefix`, in key
/// order, at most `limit` of them (all without one), a page at a time; returns how many.
///
/// # Errors
/// The node failed, or `each` did.
pub async fn list(
    api: &dyn NodeApi,
    scope: &Scope,
    prefix: &[u8],
    limit: Option<usize>,
    mut each: impl FnMut(&Listed) -> Result<(), CommandError>,
) -> Result<usize, CommandError> {
    let mut left = limit.unwrap_or(usize::MAX);
    let mut after: Option<Key> = None;
    let mut count = 0;
    while left > 0 {
        let query = ListQuery {
            prefix: prefix.to_vec(),
            after,
            limit: left.min(MAX_LIST_LIMIT),
        };
        let page = api.list(scope.clone(), query).await?;
        for item in &page.records {
            each(item)?;
        }
        left = left.saturating_sub(page.records.len());
        count += page.records.len();
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(count)
}

/// Writes a record whose file is the content of `path`, streamed; durable when this
/// returns.
///
/// # Errors
/// [`CommandError::Io`] when the file cannot be opened, or the node failed.
pub async fn put_file(
    api: &dyn NodeApi,
    scope: &Scope,
    key: &Key,
    path: &Path,
) -> Result<Written, CommandError> {
    // Opened here for a clear error naming the file.
    let file = std::fs::File::open(path).map_err(|source| CommandError::Io {
        path: path.to_owned(),
        source,
    })?;
    let content = Box::new(std::io::BufReader::new(file));
    Ok(api
        .put_file(scope.clone(), key.clone(), Vec::new(), content)
        .await?)
}

/// Streams the file of the record under `key` into `into` (on a blocking thread), checked
/// against its size (and, over HTTP, its hash); returns `into` and the size.
///
/// # Errors
/// [`CommandError::NotFound`] (no record, or no file), [`CommandError::Staged`] (the file
/// has not arrived yet), [`CommandError::Transfer`] (its bytes could not be read whole),
/// [`CommandError::Io`] (`into` failed), or the node failed.
pub async fn get_file<W: Write + Send + 'static>(
    api: &dyn NodeApi,
    scope: &Scope,
    key: &Key,
    mut into: W,
) -> Result<(W, u64), CommandError> {
    let (blob, mut reader) = match api.get_file(scope.clone(), key.clone()).await? {
        FileRead::Ready { blob, reader, .. } => (blob, reader),
        FileRead::Staged { .. } => {
            let (scope, key) = text(scope, key);
            return Err(CommandError::Staged { scope, key });
        }
        FileRead::NoFile => return Err(not_found("the record has no file", scope, key)),
        FileRead::Missing => return Err(not_found("no such record", scope, key)),
    };
    let copy = run_blocking(move || copy_chunks(&mut reader, &mut into).map(|n| (into, n)));
    let (into, copied) = match copy.await.map_err(Error::from)? {
        Ok(done) => done,
        Err(CopyError::Read(source)) => return Err(CommandError::Transfer { source }),
        Err(CopyError::Write(source)) => {
            return Err(CommandError::Io {
                path: "output".into(),
                source,
            })
        }
    };
    if copied != blob.size {
        return Err(CommandError::Transfer {
            source: std::io::Error::other(format!(
                "file {} has {copied} bytes, not {}",
                blob.hash, blob.size
            )),
        });
    }
    Ok((into, copied))
}
