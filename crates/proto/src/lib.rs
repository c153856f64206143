//! remora's replication protocol between a primary host and a backup host,
//! sans-IO: bytes and time in, bytes, events and deadlines out. No sockets,
//! no threads, no clocks (time is a [`std::time::Duration`] since any
//! origin).
//!
//! * [`wire`]: the frame format, the [`Message`]s and their encoders (the
//!   page encoder copies each page once, straight into the output).
//! * [`Decoder`]: incremental; corrupt payloads are reported and skipped,
//!   desynchronization is fatal.
//! * [`BackupSession`]: checks the Hello, assembles and verifies
//!   checkpoints, acks, heartbeats, detects a silent primary.
//! * [`PrimarySession`]: Hello, precopy, checkpoints with their digest,
//!   heartbeats, acks; splits into a [`PrimarySender`] and a
//!   [`PrimaryReceiver`] for a sender thread and a reader thread.
//!
//! The crate README describes the byte layouts and the state machines.

pub mod backup;
pub mod decoder;
pub mod error;
pub mod identity;
pub mod primary;
pub mod wire;

use std::time::Duration;

pub use backup::{BackupConfig, BackupEvent, BackupSession, Checkpoint};
pub use decoder::{Decoder, Frame};
pub use error::ProtoError;
pub use identity::{DeviceIdentity, OutputMode, VmIdentity};
pub use primary::{PrimaryConfig, PrimaryEvent, PrimaryReceiver, PrimarySender, PrimarySession};
pub use wire::{
    encode_pages, CkptCounts, DiskWrite, Kind, Message, PagesIter, PagesKind, PagesPayload, PayloadSum,
    DEFAULT_PAGES_PER_MESSAGE, MAX_PAGES_PER_MESSAGE, MAX_PAYLOAD, PAGE_SIZE, PROTOCOL_VERSION,
};

/// Default: send a heartbeat after this long without sending anything.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);
/// Default: the peer is lost after this long without receiving a byte
/// (DESIGN.md: 100 ms).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(100);
