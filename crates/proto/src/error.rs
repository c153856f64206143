//! Errors of the protocol crate.

use crate::wire::{Kind, MAX_PAYLOAD};

/// Everything that can go wrong in the protocol.
///
/// The decoder's errors ([`ProtoError::is_fatal`] is true for all of them)
/// mean the connection can no longer be trusted and must be closed. A
/// payload whose checksum is wrong is *not* an error: the decoder reports it
/// as [`crate::Frame::Corrupt`] and carries on.
///
/// [`ProtoError::Misuse`] and [`ProtoError::Closed`] are returned by the
/// sessions' local API (the driver called something out of order); they say
/// nothing about the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The first four bytes of a header are not `RMRP`: the stream is
    /// desynchronized.
    #[error("stream desynchronized: bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The header's checksum does not match: the stream is desynchronized.
    #[error("stream desynchronized: header checksum mismatch (header says {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    /// flags or reserved are not zero (an intact header this version does
    /// not understand).
    #[error("unsupported header: flags {flags:#04x}, reserved {reserved:#06x} (both must be 0)")]
    UnsupportedHeader { flags: u8, reserved: u16 },
    /// An intact header names a message kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A payload longer than [`MAX_PAYLOAD`].
    #[error("payload of {len} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    Oversize { len: u64 },
    /// A payload with a good checksum that does not parse: the peer has a bug.
    #[error("malformed {kind:?} message: {why}")]
    Malformed { kind: Kind, why: String },
    /// A Hello with a protocol version this side does not speak.
    #[error("unsupported protocol version {0} (this side speaks {v})", v = crate::PROTOCOL_VERSION)]
    UnsupportedVersion(u32),
    /// The local driver called the API out of order or with bad arguments.
    #[error("API misuse: {0}")]
    Misuse(String),
    /// The session is closed (refused, shut down, lost or failed).
    #[error("the session is closed")]
    Closed,
}

impl ProtoError {
    /// True for the errors that end the connection (every decoder error).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ProtoError::Misuse(_) | ProtoError::Closed)
    }
}
