//! `remora-replication`: the I/O drivers of remora's replication.
//!
//! * [`primary`]: protects a running VM — connects to a backup, pre-copies
//!   memory and disks while the guest runs, then takes one checkpoint per
//!   epoch ([`remora_vmm::checkpoint`]) and streams it while the guest runs
//!   the next epoch; the backup's acknowledgements commit each epoch's
//!   output in the VM's net devices. Losing the backup never hangs the VM:
//!   it goes on unprotected and releases everything it held.
//! * [`backup`]: waits for a primary, keeps the guest's memory in the
//!   mapping it will run from, applies each complete, verified checkpoint
//!   (pages, state, disk writes, engine deltas) all or nothing, acknowledges
//!   it, and on the primary's death resumes the guest from the last one.
//! * [`metrics`]: the Prometheus figures of both (`--metrics ADDR`) and
//!   the small HTTP server that exposes them.
//!
//! The wire protocol is the sans-IO `remora-proto` crate.

pub mod backup;
mod beacon;
pub mod fence;
pub mod metrics;
pub mod primary;
pub mod tls;

use std::time::Duration;

pub use remora_proto::OutputMode;

/// Heartbeat interval for a given heartbeat timeout: four beats per timeout.
pub fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_millis(5))
}

/// A read that timed out (a socket with a read timeout), not an error.
pub(crate) fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}
