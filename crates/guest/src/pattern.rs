//! Deterministic byte streams that the host-side tests reproduce.
//!
//! Both are sequences of little-endian 64-bit words, word `k` being
//! `splitmix64(k + seed)`:
//!
//! ```text
//! splitmix64(x): z = x + 0x9e3779b97f4a7c15          (wrapping)
//!                z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
//!                z = (z ^ (z >> 27)) * 0x94d049bb133111eb
//!                return z ^ (z >> 31)
//! ```
//!
//! - the TCP `source` stream: seed 0, byte `i` of a connection is byte
//!   `i % 8` of word `i / 8`;
//! - the disk pattern: seed [`DISK_SEED`], word `k` sits at byte offset
//!   `8 * k` of the disk (independent of the boot, so a later boot can
//!   verify what an earlier one wrote).

/// Seed of the disk pattern ("remoradk" as a big-endian number).
pub const DISK_SEED: u64 = 0x7265_6d6f_7261_646b;

#[inline(always)]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with bytes `off..off + buf.len()` of the stream `seed`.
pub fn fill(seed: u64, off: u64, buf: &mut [u8]) {
    let mut i = off;
    let mut b = 0;
    // Unaligned head.
    while !i.is_multiple_of(8) && b < buf.len() {
        buf[b] = (splitmix64(i / 8 + seed) >> ((i % 8) * 8)) as u8;
        i += 1;
        b += 1;
    }
    let mut chunks = buf[b..].chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&splitmix64(i / 8 + seed).to_le_bytes());
        i += 8;
    }
    for (j, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x = (splitmix64(i / 8 + seed) >> (j * 8)) as u8;
    }
}
