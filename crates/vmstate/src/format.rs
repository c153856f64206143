//! The container every saved state is written in:
//!
//! ```text
//! magic "REMORAST" | version u32 | kind u32 | payload_len u64 |
//! payload_crc32 u32 | header_crc32 u32 | payload (bincode)
//! ```
//! All integers little endian. The header checksum covers the fields before
//! it; the payload checksum the payload. A reader refuses a wrong magic,
//! another version, a bad checksum, a short file or bytes after the payload
//! before decoding anything. A reader of a file can take the length to
//! read from the header alone ([`payload_len`]).

use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: [u8; 8] = *b"REMORAST";
/// Bumped whenever a serialized structure changes.
pub const VERSION: u32 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;

/// Errors reading a container.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a remora state file (bad magic)")]
    BadMagic,
    #[error("state format version {found} is not supported (this remora reads version {VERSION})")]
    Version { found: u32 },
    #[error("state file holds kind {found}, expected {expected}")]
    Kind { found: u32, expected: u32 },
    #[error("state file is truncated ({have} bytes, need {need})")]
    Truncated { have: usize, need: usize },
    #[error("state file has {} bytes after its end ({need} bytes)", have - need)]
    Trailing { have: usize, need: usize },
    #[error("state file header checksum mismatch")]
    HeaderChecksum,
    #[error("state file payload checksum mismatch (corrupt or torn write)")]
    PayloadChecksum,
    #[error("state file payload does not decode: {0}")]
    Decode(String),
    #[error("cannot encode state: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_fixed_int_encoding()
}

/// Encodes `value` as a container of `kind`.
pub fn encode<T: Serialize>(kind: u32, value: &T) -> Result<Vec<u8>, FormatError> {
    let payload = bincode::serde::encode_to_vec(value, config()).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let hcrc = crc32fast::hash(&out);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// The payload length recorded in a container's header (the first
/// [`HEADER_LEN`] bytes of `header`), once the header is verified: its
/// magic, checksum, version and `kind`. A file holds exactly `HEADER_LEN`
/// plus this many bytes.
pub fn payload_len(kind: u32, header: &[u8]) -> Result<u64, FormatError> {
    if header.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            have: header.len(),
            need: HEADER_LEN,
        });
    }
    if header[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if crc32fast::hash(&header[..HEADER_LEN - 4]) != u32_at(header, HEADER_LEN - 4) {
        return Err(FormatError::HeaderChecksum);
    }
    let version = u32_at(header, 8);
    if version != VERSION {
        return Err(FormatError::Version { found: version });
    }
    let found = u32_at(header, 12);
    if found != kind {
        return Err(FormatError::Kind { found, expected: kind });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    Ok(u64::from_le_bytes(len))
}

/// Decodes a container of `kind`, verifying everything first.
pub fn decode<T: DeserializeOwned>(kind: u32, bytes: &[u8]) -> Result<T, FormatError> {
    let len = payload_len(kind, bytes)?;
    let need = HEADER_LEN.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
    if bytes.len() < need {
        return Err(FormatError::Truncated {
            have: bytes.len(),
            need,
        });
    }
    if bytes.len() > need {
        return Err(FormatError::Trailing {
            have: bytes.len(),
            need,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32fast::hash(payload) != u32_at(bytes, 24) {
        return Err(FormatError::PayloadChecksum);
    }
    let (v, _) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| FormatError::Decode(e.to_string()))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let v: Vec<u64> = (0..100).collect();
        let b = encode(7, &v).unwrap();
        assert_eq!(decode::<Vec<u64>>(7, &b).unwrap(), v);
        assert_eq!(
            decode::<Vec<u64>>(8, &b),
            Err(FormatError::Kind { found: 7, expected: 8 })
        );
        // Any single flipped bit anywhere is caught.
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(decode::<Vec<u64>>(7, &c).is_err(), "flip at byte {i} not detected");
        }
        for cut in [0, 10, HEADER_LEN, b.len() - 1] {
            assert!(matches!(
                decode::<Vec<u64>>(7, &b[..cut]),
                Err(FormatError::Truncated { .. })
            ));
        }
        // Anything after the payload is refused too.
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            decode::<Vec<u64>>(7, &long),
            Err(FormatError::Trailing {
                have: b.len() + 1,
                need: b.len()
            })
        );
        assert_eq!(payload_len(7, &b[..HEADER_LEN]), Ok((b.len() - HEADER_LEN) as u64));
        let mut other = b.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        let h = crc32fast::hash(&other[..HEADER_LEN - 4]);
        other[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&h.to_le_bytes());
        assert_eq!(decode::<Vec<u64>>(7, &other), Err(FormatError::Version { found: 2 }));
    }
}
