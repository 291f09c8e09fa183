//! Power loss: [`PowerLossDisk`], a redb storage backend that keeps only what was synced,
//! and [`PowerLossBackend`], simulation nodes on such disks.

use std::sync::{Arc, Mutex};

use super::backends::SimIds;
use super::Backend;
use crate::blob::MemBlobStore;
use crate::engine::SyncEngine;
use crate::hlc::ManualTime;
use crate::poison::lock;
use crate::store::RedbStore;

// For doc links only.
#[cfg(doc)]
use super::Action;

/// A redb storage backend that models power loss: writes land in a volatile image,
/// `sync_data` makes them durable, and [`PowerLossDisk::after_power_loss`] gives a disk
/// holding only what was synced.
#[derive(Debug, Default)]
pub struct PowerLossDisk {
    images: Mutex<DiskImages>,
}

#[derive(Debug, Default)]
struct DiskImages {
    volatile: Vec<u8>,
    durable: Vec<u8>,
}

impl PowerLossDisk {
    /// A new, empty disk.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A disk holding what this one had synced: everything written since the last
    /// `sync_data` is lost, as in a power cut.
    pub fn after_power_loss(&self) -> Arc<Self> {
        let durable = lock(&self.images).durable.clone();
        Arc::new(PowerLossDisk {
            images: Mutex::new(DiskImages {
                volatile: durable.clone(),
                durable,
            }),
        })
    }
}

/// A handle redb can own, sharing the disk with the test.
#[derive(Debug)]
pub struct DiskHandle(pub Arc<PowerLossDisk>);

fn out_of_range() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "read past the end of the disk",
    )
}

impl redb::StorageBackend for DiskHandle {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(lock(&self.0.images).volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let images = lock(&self.0.images);
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(out.len()).ok_or_else(out_of_range)?;
        out.copy_from_slice(images.volatile.get(start..end).ok_or_else(out_of_range)?);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        lock(&self.0.images).volatile.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut images = lock(&self.0.images);
        images.durable = images.volatile.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut images = lock(&self.0.images);
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(data.len()).ok_or_else(out_of_range)?;
        if images.volatile.len() < end {
            images.volatile.resize(end, 0);
        }
        images.volatile[start..end].copy_from_slice(data);
        Ok(())
    }
}

/// redb nodes on [`PowerLossDisk`]s, whose blobs (in memory) are durable once written,
/// as an fsynced blob file is; [`Action::Crash`] cuts a node's power.
pub struct PowerLossBackend {
    time: Arc<ManualTime>,
    disks: Vec<Arc<PowerLossDisk>>,
    blobs: Vec<Arc<MemBlobStore>>,
    ids: SimIds,
}

impl PowerLossBackend {
    /// `n` empty nodes reading `time`.
    pub fn new(n: usize, time: Arc<ManualTime>) -> Self {
        PowerLossBackend {
            time,
            disks: (0..n).map(|_| PowerLossDisk::new()).collect(),
            blobs: (0..n).map(|_| Arc::new(MemBlobStore::new())).collect(),
            ids: SimIds::default(),
        }
    }
}

impl Backend for PowerLossBackend {
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine> {
        let store = Box::new(RedbStore::with_backend(DiskHandle(self.disks[i].clone()))?);
        self.ids
            .open(store, self.blobs[i].clone(), i, fresh_identity, &self.time)
    }

    fn crash(&mut self, i: usize) -> Result<bool, String> {
        self.disks[i] = self.disks[i].after_power_loss();
        Ok(true)
    }

    fn snapshot(&mut self, _i: usize) -> Result<(), String> {
        Ok(())
    }

    fn restore(&mut self, _i: usize) -> Result<bool, String> {
        Ok(false)
    }
}
