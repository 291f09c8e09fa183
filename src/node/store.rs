//! Where a node keeps its records and blobs: the redb file and blob directory of its data
//! directory, or a PostgreSQL database and a blob directory that several node processes
//! share as one hub (docs/scale.md).

use std::path::PathBuf;
use std::sync::Arc;

use super::{open_data_dir_as, NodeError, NodeOptions};
use crate::engine::{SyncEngine, BLOB_DIR, DB_FILE};

/// What tells a process of other processes' commits to the store it shares.
#[cfg(feature = "postgres")]
pub(super) type Feed = crate::store::ChangeFeed;
/// What tells a process of other processes' commits to the store it shares (none in a
/// build without PostgreSQL).
#[cfg(not(feature = "postgres"))]
pub(super) type Feed = ();

/// A node's engine, and what comes with its store.
pub(super) struct Opened {
    pub(super) engine: Arc<SyncEngine>,
    /// The redb file, for the metrics (none for a database).
    pub(super) store_file: Option<PathBuf>,
    pub(super) feed: Option<Feed>,
}

/// Opens the store `options` name.
///
/// # Errors
/// The data directory or the database cannot be opened, or the build cannot use the store.
pub(super) fn open(options: &NodeOptions) -> Result<Opened, NodeError> {
    let Some(url) = &options.store else {
        if options.blobs.is_some() {
            return Err(NodeError::StoreUnsupported {
                reason: "a blob directory of its own (--blobs) is for a node whose store is a \
                         database (--store); a data directory keeps its blobs in it"
                    .into(),
            });
        }
        let engine = open_data_dir_as(&options.data, options.engine_config(), options.restored)?;
        return Ok(Opened {
            engine: Arc::new(engine),
            store_file: Some(options.data.join(DB_FILE)),
            feed: None,
        });
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(NodeError::StoreUnsupported {
            reason: format!(
                "store {}: only postgres:// (or postgresql://) URLs name a store",
                redacted(url)
            ),
        });
    }
    open_postgres(options, url)
}

#[cfg(feature = "postgres")]
fn open_postgres(options: &NodeOptions, url: &str) -> Result<Opened, NodeError> {
    use std::sync::{OnceLock, Weak};

    use crate::blob::FsBlobStore;
    use crate::engine::UPLOAD_GRACE;
    use crate::error::Error;
    use crate::store::{FeedOptions, PgOptions, PgStore};

    let failed = |source: Error| NodeError::Store {
        url: redacted(url),
        source,
    };
    std::fs::create_dir_all(&options.data).map_err(|source| NodeError::Io {
        path: options.data.clone(),
        source,
    })?;
    let store = PgStore::open_with(
        url,
        &PgOptions {
            schema: options.store_schema.clone(),
            pool_size: options.store_pool.unwrap_or(PgStore::POOL_SIZE),
            ca_file: options.store_ca_file.clone(),
            ..PgOptions::default()
        },
    )
    .map_err(|e| failed(e.into()))?;
    let blob_dir = options
        .blobs
        .clone()
        .unwrap_or_else(|| options.data.join(BLOB_DIR));
    // Other processes may be about to reference a blob this one would remove: spare those
    // received within the upload grace.
    let blobs = FsBlobStore::open_shared(&blob_dir, UPLOAD_GRACE).map_err(|e| failed(e.into()))?;
    // The feed starts before the engine it tells, which it reaches through this cell.
    let engine_cell: Arc<OnceLock<Weak<SyncEngine>>> = Arc::new(OnceLock::new());
    let tell = engine_cell.clone();
    let feed = store
        .watch_changes(FeedOptions::default(), move |changes| {
            let Some(engine) = tell.get().and_then(Weak::upgrade) else {
                return;
            };
            for (scope, cause) in &changes {
                engine
                    .notifier()
                    .scopes_changed(std::iter::once(scope), *cause);
            }
        })
        .map_err(|e| failed(e.into()))?;
    let (store, blobs) = (Box::new(store), Arc::new(blobs));
    let engine = if options.restored {
        SyncEngine::with_stores_restored(store, blobs, options.engine_config())
    } else {
        SyncEngine::with_stores(store, blobs, options.engine_config())
    }
    .map_err(failed)?;
    let engine = Arc::new(engine);
    let _ = engine_cell.set(Arc::downgrade(&engine));
    tracing::info!(
        store = %redacted(url), schema = ?options.store_schema, blobs = %blob_dir.display(),
        node = %engine.node_id(), "records in PostgreSQL, shared with any other process of this hub"
    );
    Ok(Opened {
        engine,
        store_file: None,
        feed: Some(feed),
    })
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_: &NodeOptions, url: &str) -> Result<Opened, NodeError> {
    Err(NodeError::StoreUnsupported {
        reason: format!(
            "store {}: this build has no PostgreSQL support (feature `postgres`)",
            redacted(url)
        ),
    })
}

/// `url` without the password of its user info (`postgres://user:secret@host/db` ->
/// `postgres://user:…@host/db`), for logs and errors.
pub(super) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:…@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_are_left_out_of_store_urls() {
        assert_eq!(
            redacted("postgres://hub:s3cret@db.internal:5432/highwater"),
            "postgres://hub:…@db.internal:5432/highwater"
        );
        assert_eq!(
            redacted("postgres://root@127.0.0.1/test"),
            "postgres://root@127.0.0.1/test"
        );
        assert_eq!(redacted("postgres://db/x?user=a"), "postgres://db/x?user=a");
        assert_eq!(redacted("not a url"), "not a url");
    }
}
