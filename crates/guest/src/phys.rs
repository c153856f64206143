//! Access to physical memory from ring 3.
//!
//! The shim identity-maps the first 4 GiB with user-accessible pages, so a
//! physical address below 4 GiB is also a valid pointer. 0-3 GiB is
//! cached RAM; 3-4 GiB (IOAPIC, LAPIC, virtio-mmio, ACPI GED) is uncached.

/// End of the identity map.
pub const MAPPED_END: u64 = 1 << 32;

/// Whether `[addr, addr + len)` is mapped and does not contain address 0.
pub fn is_mapped(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= MAPPED_END)
}

/// Borrows `len` bytes of physical memory, or `None` if they are not
/// mapped.
///
/// # Safety
/// The range must hold data that nothing writes while the slice lives
/// (firmware tables, the PVH start info and command line, ...), and must
/// not be MMIO or memory the program owns through Rust objects.
pub unsafe fn bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    if !is_mapped(addr, len as u64) {
        return None;
    }
    // SAFETY: the range is inside the identity map (so `addr` is a valid,
    // non-null pointer to `len` readable bytes) and the caller guarantees
    // it is not written while borrowed.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Reads a little-endian `u16` at `off` in `b` (0 if out of range).
pub fn le16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

/// Reads a little-endian `u32` at `off` in `b` (0 if out of range).
pub fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a little-endian `u64` at `off` in `b` (0 if out of range).
pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}

/// A physical address range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn new(start: u64, len: u64) -> Self {
        Self {
            start,
            end: start.saturating_add(len),
        }
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// A fixed-capacity list of ranges that must not be overwritten.
#[derive(Debug, Clone, Copy)]
pub struct RangeSet {
    ranges: [Range; 32],
    len: usize,
}

impl RangeSet {
    pub const fn new() -> Self {
        Self {
            ranges: [Range { start: 0, end: 0 }; 32],
            len: 0,
        }
    }

    /// Adds a range; returns false if the set is full.
    pub fn add(&mut self, r: Range) -> bool {
        if self.len == self.ranges.len() {
            return false;
        }
        self.ranges[self.len] = r;
        self.len += 1;
        true
    }

    pub fn overlaps(&self, r: &Range) -> bool {
        self.ranges[..self.len].iter().any(|x| x.overlaps(r))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range> {
        self.ranges[..self.len].iter()
    }
}
