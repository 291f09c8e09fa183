//! Which blobs a token may see: those a record in a scope it may read refers to, and those
//! it uploaded itself a short while ago (the upload is pending: the record that refers to
//! it comes in the round's page, after the blobs).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Failure;
use crate::hash::Hash;
use crate::http::access::Grant;
use crate::poison::lock;
use crate::record::{Scope, Version};
use crate::transport::Responder;

/// How long an upload counts as pending: longer than any round takes between pushing its
/// blobs and sending the page that refers to them.
pub(super) const UPLOAD_GRACE: Duration = Duration::from_secs(600);

/// Pending uploads kept at most; past it the oldest are forgotten first (their uploader
/// then needs a record it may read to refer to them, or to upload them again).
const MAX_PENDING: usize = 100_000;

/// Blobs uploaded recently, by token name.
#[derive(Default)]
pub(super) struct Uploads {
    pending: Mutex<HashMap<(String, Hash), Instant>>,
}

impl Uploads {
    /// Records that `token` uploaded `hash` now.
    pub(super) fn uploaded(&self, token: &str, hash: Hash) {
        let now = Instant::now();
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, at| now.duration_since(*at) < UPLOAD_GRACE);
        }
        if pending.len() >= MAX_PENDING {
            let oldest = pending
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                pending.remove(&oldest);
            }
        }
        pending.insert((token.to_owned(), hash), now);
    }

    /// Whether `token` uploaded `hash` within the grace period.
    fn pending(&self, token: &str, hash: Hash) -> bool {
        lock(&self.pending)
            .get(&(token.to_owned(), hash))
            .is_some_and(|at| at.elapsed() < UPLOAD_GRACE)
    }

    /// Whether `grant` may see blob `hash`: it reads all scopes, it uploaded the blob
    /// recently, or a record in a scope it may read refers to it.
    pub(super) fn may_see(
        &self,
        responder: &dyn Responder,
        grant: &Grant,
        hash: Hash,
    ) -> Result<bool, Failure> {
        if grant.reads_all() || self.pending(&grant.name, hash) {
            return Ok(true);
        }
        Ok(responder
            .blob_scopes(&hash)?
            .iter()
            .any(|s| grant.can_read(s)))
    }

    /// Refuses a push in which a version refers to a blob `grant` may not see: a token
    /// cannot gain access to a file by naming its hash in a record of its own.
    pub(super) fn check_pushed<'a>(
        &self,
        responder: &dyn Responder,
        grant: &Grant,
        versions: impl Iterator<Item = (&'a Scope, &'a Version)>,
    ) -> Result<(), Failure> {
        if grant.reads_all() {
            return Ok(());
        }
        let mut seen = HashSet::new();
        for (scope, version) in versions {
            let Some(blob) = version.blob() else { continue };
            if seen.insert(blob.hash) && !self.may_see(responder, grant, blob.hash)? {
                return Err(Failure::forbidden(format!(
                    "a version in scope {scope} refers to blob {}, which token {:?} neither \
                     uploaded nor may read: upload it first",
                    blob.hash, grant.name
                )));
            }
        }
        Ok(())
    }
}
