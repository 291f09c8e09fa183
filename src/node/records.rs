//! Record commands against either a running node or a data directory opened directly.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::NodeError;
use crate::api::{all_scopes, NodeApi, Status};
use crate::engine::SyncEngine;
use crate::hlc::Hlc;
use crate::http::{NodeClient, RemoteRecord};
use crate::record::{Key, Residency, Scope};

/// A write's acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The version's timestamp.
    pub hlc: Hlc,
}

/// One record of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The key.
    pub key: Key,
    /// The value's size in bytes.
    pub size: u64,
    /// The attached file's size, if the record has one.
    pub file_size: Option<u64>,
    /// The version's timestamp.
    pub hlc: Hlc,
    /// Where the record stands.
    pub residency: Residency,
}

/// A residency from its lower-case name.
pub(crate) fn parse_residency(name: &str) -> Option<Residency> {
    [
        Residency::Absent,
        Residency::Staged,
        Residency::Resident,
        Residency::Tombstoned,
    ]
    .into_iter()
    .find(|r| r.as_str() == name)
}

/// Where record commands act: a running node through its records API, or a data directory
/// this process opened (see [`super::open_data_dir`]). Both answer the same way.
// One per command: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Records {
    /// A running node.
    Remote(NodeClient),
    /// A data directory opened by this process.
    Local(Arc<SyncEngine>),
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Records::Remote(c) => f.debug_tuple("Remote").field(c).finish(),
            Records::Local(e) => f.debug_tuple("Local").field(&e.node_id()).finish(),
        }
    }
}

/// Runs blocking engine work off the async threads.
async fn blocking<T: Send + 'static>(
    engine: &Arc<SyncEngine>,
    f: impl FnOnce(&SyncEngine) -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| NodeError::Io {
            path: "engine task".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}

impl Records {
    /// Writes `value` under `key`; durable when this returns.
    ///
    /// # Errors
    /// The node refused or could not be reached, or the local engine failed.
    pub async fn put(
        &self,
        scope: &Scope,
        key: &Key,
        value: Vec<u8>,
    ) -> Result<Written, NodeError> {
        match self {
            Records::Remote(c) => c.put(scope, key, value).await,
            Records::Local(e) => {
                let (scope, key) = (scope.clone(), key.clone());
                blocking(e, move |e| {
                    Ok(Written {
                        hlc: e.put(&scope, &key, value)?,
                    })
                })
                .await
            }
        }
    }

    /// The live record under `key`, or `None` if it is absent or deleted.
    ///
    /// # Errors
    /// As for [`Records::put`].
    pub async fn get(&self, scope: &Scope, key: &Key) -> Result<Option<RemoteRecord>, NodeError> {
        match self {
            Records::Remote(c) => c.get(scope, key).await,
            Records::Local(e) => {
                let (scope, key) = (scope.clone(), key.clone());
                blocking(e, move |e| {
                    let Some(record) = e.get(&scope, &key)? else {
                        return Ok(None);
                    };
                    let residency = e.record_residency(&record)?;
                    Ok(Some(RemoteRecord {
                        value: record.value,
                        hlc: record.hlc,
                        residency,
                    }))
                })
                .await
            }
        }
    }

    /// Deletes `key` (writes a tombstone); durable when this returns.
    ///
    /// # Errors
    /// As for [`Records::put`].
    pub async fn delete(&self, scope: &Scope, key: &Key) -> Result<Written, NodeError> {
        match self {
            Records::Remote(c) => c.delete(scope, key).await,
            Records::Local(e) => {
                let (scope, key) = (scope.clone(), key.clone());
                blocking(e, move |e| {
                    Ok(Written {
                        hlc: e.delete(&scope, &key)?,
                    })
                })
                .await
            }
        }
    }

    /// Live records of `scope` in key order: keys starting with `prefix`, strictly after
    /// `after`, at most `limit` (1..=1000).
    ///
    /// # Errors
    /// As for [`Records::put`].
    pub async fn list(
        &self,
        scope: &Scope,
        prefix: &[u8],
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<Listed>, NodeError> {
        match self {
            Records::Remote(c) => c.list(scope, prefix, after, limit).await,
            Records::Local(e) => {
                let (scope, prefix, after) = (scope.clone(), prefix.to_vec(), after.cloned());
                blocking(e, move |e| {
                    let mut out = Vec::new();
                    for r in e.scan(&scope, &prefix, after.as_ref(), limit.clamp(1, 1000))? {
                        let residency = e.record_residency(&r)?;
                        out.push(Listed {
                            size: r.value.len() as u64,
                            file_size: r.blob.map(|b| b.size),
                            hlc: r.hlc,
                            residency,
                            key: r.key,
                        });
                    }
                    Ok(out)
                })
                .await
            }
        }
    }

    /// Writes a record whose file is the content of `path`, streamed; durable when this
    /// returns.
    ///
    /// # Errors
    /// The file cannot be read, or as for [`Records::put`].
    pub async fn put_file(
        &self,
        scope: &Scope,
        key: &Key,
        path: &Path,
    ) -> Result<Written, NodeError> {
        match self {
            Records::Remote(c) => c.put_file(scope, key, path).await,
            Records::Local(e) => {
                let (scope, key, path) = (scope.clone(), key.clone(), path.to_owned());
                blocking(e, move |e| {
                    // Read here for a clear error naming the file.
                    let file = std::fs::File::open(&path).map_err(|source| NodeError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    let mut reader = std::io::BufReader::new(file);
                    Ok(Written {
                        hlc: e.put_file(&scope, &key, Vec::new(), &mut reader)?,
                    })
                })
                .await
            }
        }
    }

    /// Streams the file of the record under `key` into `into`; returns its size.
    ///
    /// # Errors
    /// [`NodeError::NotFound`] (no record, or no file), [`NodeError::Staged`] (the file has
    /// not arrived yet), or as for [`Records::put`].
    pub async fn get_file(
        &self,
        scope: &Scope,
        key: &Key,
        into: &mut (dyn Write + Send),
    ) -> Result<u64, NodeError> {
        let e = match self {
            Records::Remote(c) => return c.get_file(scope, key, into).await,
            Records::Local(e) => e,
        };
        let text = || {
            (
                scope.to_string(),
                String::from_utf8_lossy(key.as_bytes()).into_owned(),
            )
        };
        let Some(record) = e.get(scope, key)? else {
            let (scope, key) = text();
            return Err(NodeError::NotFound {
                what: "no such record",
                scope,
                key,
            });
        };
        if record.blob.is_none() {
            let (scope, key) = text();
            return Err(NodeError::NotFound {
                what: "the record has no file",
                scope,
                key,
            });
        }
        let Some((blob, mut reader)) = e.open_file(scope, key)? else {
            let (scope, key) = text();
            return Err(NodeError::Staged { scope, key });
        };
        // The copy runs on this thread: `into` is the caller's (a file or stdout of the CLI).
        let copied = std::io::copy(&mut reader, into).map_err(|source| NodeError::Io {
            path: "output".into(),
            source,
        })?;
        if copied != blob.size {
            return Err(NodeError::Io {
                path: "blob store".into(),
                source: std::io::Error::other(format!(
                    "file {} has {copied} bytes, not {}",
                    blob.hash, blob.size
                )),
            });
        }
        Ok(copied)
    }

    /// The status document (everything, for a local directory).
    ///
    /// # Errors
    /// As for [`Records::put`].
    pub async fn status(&self) -> Result<Status, NodeError> {
        match self {
            Records::Remote(c) => c.status().await,
            Records::Local(e) => Ok(NodeApi::status(&**e, all_scopes()).await?),
        }
    }
}
