//! Checks shared by the test suite and the fuzz targets (feature `testing`).
//!
//! A [`Simulation`] drives 2 to 5 engines through [`Action`]s (writes, deletes, exchanges
//! between any pair with any page limit, restarts) while keeping an oracle: every version
//! ever written, and their last-write-wins fold. After every round it checks the watermark
//! invariant on every node; [`Simulation::converge`] then syncs all pairs and checks that
//! every node equals the oracle and that all watermarks agree.
//!
//! A [`CoreModel`] drives replicas through the exchange core alone (no engine), with rounds
//! whose response is lost.
//!
//! Actions decode from arbitrary bytes ([`Action::decode_all`]), so proptest strategies and
//! libFuzzer inputs drive the very same code.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

mod action;
mod backends;
mod core;
mod faults;
mod fuzz;
mod power_loss;
mod sim;

pub use self::action::{file_content, scope, Action};
pub use self::backends::{copy_blobs, Backend, MemBackend, RedbBackend};
pub use self::core::{fuzz_exchange_core, CoreModel, CoreStep};
pub use self::faults::{Faults, FaultyTransport, Hook, PullFault};
pub use self::fuzz::{
    check_merge_laws, decode_versions, framed, fuzz_audit_responder, fuzz_decode_envelope,
    fuzz_decode_stream, fuzz_exchange_model, fuzz_merge_laws,
};
pub use self::power_loss::{DiskHandle, PowerLossBackend, PowerLossDisk};
pub use self::sim::{sim_config, sim_time, Simulation};

/// Runs a future to completion on the current thread (in-process exchanges never wait).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}
