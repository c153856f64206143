//! Guest memory: anonymous mappings around the 32-bit MMIO gap, and the e820
//! map that describes them to the guest.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// A region of the guest's physical address map as reported to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// e820 / PVH memory map entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--mem {0} MiB is too small: remora needs at least {MIN_MEM_MIB} MiB")]
    TooSmall(u64),
    #[error("--mem {0} MiB is too large for this host's address space")]
    TooLarge(u64),
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Mmap {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges (guest physical start, size) for `mem_bytes` of memory: up
/// to the MMIO gap, and the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (mem_bytes - MMIO_GAP_START) as usize));
    }
    ranges
}

/// Creates guest memory of `mem_mib` MiB.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    // Keep below 1 TiB of guest-physical space: far above any realistic
    // microVM, and it keeps every address computation well inside u64.
    let bytes = mem_mib
        .checked_mul(1 << 20)
        .filter(|b| *b <= (1u64 << 40))
        .ok_or(MemoryError::TooLarge(mem_mib))?;
    GuestMemoryMmap::from_ranges(&ram_ranges(bytes)).map_err(|source| MemoryError::Mmap { mib: mem_mib, source })
}

/// The e820 map for `mem_bytes` of RAM laid out by [`ram_ranges`].
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Kind::Ram,
        },
    ];
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820Kind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_low_ram_only() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr + map[2].size, 256 << 20);
        let ram: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        assert_eq!(ram, (256 << 20) - (HIMEM_START - EBDA_START));
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_mmio_gap() {
        let mem = 4u64 << 30;
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, MMIO_GAP_END);
        assert_eq!(map[3].size, mem - MMIO_GAP_START);
        let total: usize = ram_ranges(mem).iter().map(|r| r.1).sum();
        assert_eq!(total as u64, mem);
    }

    #[test]
    fn too_small_is_an_error() {
        assert!(matches!(create_guest_memory(1), Err(MemoryError::TooSmall(1))));
        assert!(matches!(create_guest_memory(u64::MAX), Err(MemoryError::TooLarge(_))));
    }
}
