#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod blob;
pub mod blocking;
pub mod engine;
pub mod error;
pub mod exchange;
pub mod hash;
pub mod hlc;
pub mod http;
pub mod merge;
pub mod node;
pub mod notify;
mod poison;
pub mod record;
pub mod scheduler;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod watermark;
pub mod wire;

pub use crate::api::NodeApi;
pub use crate::engine::{
    EngineConfig, ExchangeOptions, ExchangeOutcome, PurgeReport, Record, ResidencyCounts,
    RestoreDetection, SyncEngine,
};
pub use crate::error::{Error, Result};
pub use crate::exchange::{Halt, HaltReason, Session};
pub use crate::hash::Hash;
pub use crate::hlc::{Hlc, ManualTime, NodeId, TimeSource};
pub use crate::record::ScopeFilter;
pub use crate::record::{BlobRef, Hydration, Key, Op, Residency, Scope, Version};
pub use crate::scheduler::{
    Backoff, PeerOptions, PeerStatus, Scheduler, SchedulerConfig, SchedulerError,
};
pub use crate::transport::{InProcess, Refusal, Responder, Transport, WatchReply};
pub use crate::watermark::{ScopedWatermarks, Watermarks};
