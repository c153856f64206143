//! Guest memory: anonymous mappings around the 32-bit MMIO gap, and the e820
//! map that describes them to the guest.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestAddress;

/// Guest memory with a dirty bitmap: every write the VMM makes through
/// vm-memory (virtio used rings, RX buffers, block reads) marks its page,
/// which KVM's dirty log cannot see.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

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
    #[error("cannot map {mib} MiB of guest memory: {error}")]
    Mmap {
        mib: u64,
        error: vm_memory::mmap::FromRangesError,
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
    GuestMemoryMmap::from_ranges(&ram_ranges(bytes)).map_err(|error| MemoryError::Mmap { mib: mem_mib, error })
}

/// Registers every region as a KVM memory slot (slot = region index),
/// with KVM dirty logging if `log_dirty`. Registering again with another
/// `log_dirty` switches logging on or off.
pub fn register_memory(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), kvm_ioctls::Error> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mmap of `region.len()` bytes
        // owned by `mem`, which its owner keeps alive at least as long as
        // the VM fd that maps it; slots do not overlap (regions are disjoint).
        unsafe { vm.set_user_memory_region(r) }?;
    }
    Ok(())
}

/// Guest page size for dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Guest-physical addresses of the pages written since the last harvest,
/// by the guest (KVM's dirty log, read-and-clear) or by the VMM (the
/// memory's own bitmap, read-and-reset). Call with the vCPUs paused for an
/// exact, atomic cut.
pub fn harvest_dirty(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>, kvm_ioctls::Error> {
    let mut pages = Vec::new();
    harvest_dirty_into(vm, mem, &mut pages)?;
    Ok(pages)
}

/// [`harvest_dirty`] appending to `pages` (in ascending order); on an
/// error, the pages of the slots read before it are in `pages` (their logs
/// are cleared, so they must not be dropped).
pub fn harvest_dirty_into(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    pages: &mut Vec<u64>,
) -> Result<(), kvm_ioctls::Error> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in mem.iter().enumerate() {
        let kvm_log = vm.get_dirty_log(slot as u32, region.len() as usize)?;
        // The region's whole AtomicBitmap (not the GuestMemoryRegion slice view).
        let vmm_log = std::ops::Deref::deref(region).bitmap().get_and_reset();
        let base = region.start_addr().raw_value();
        let words = kvm_log.len().max(vmm_log.len());
        for w in 0..words {
            let mut bits = kvm_log.get(w).copied().unwrap_or(0) | vmm_log.get(w).copied().unwrap_or(0);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                pages.push(base + (w as u64 * 64 + b) * PAGE_SIZE);
            }
        }
    }
    Ok(())
}

/// The dirty set of the next checkpoint (snapshot increment, replication
/// checkpoint): every page harvested from the dirty logs since the last
/// checkpoint that reached its destination.
///
/// Harvesting clears the logs, so a checkpoint that fails after its
/// harvest (a write error, a full disk, a lost peer) must not drop its
/// pages: they stay here and are merged (deduplicated) with the next
/// harvest, until [`DirtyCarry::delivered`] says a checkpoint holding them
/// was written (or acknowledged) in full. The rule: a checkpoint that did
/// not reach its destination never loses its dirty set.
#[derive(Debug, Default)]
pub struct DirtyCarry {
    /// Sorted, without duplicates.
    pages: Vec<u64>,
}

impl DirtyCarry {
    /// Reads and clears the dirty logs (as [`harvest_dirty`]) into the set.
    /// On an error the pages read before it stay in the set.
    pub fn harvest(&mut self, vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap) -> Result<(), kvm_ioctls::Error> {
        if self.pages.is_empty() {
            // The common case: nothing carried, the harvest is the set.
            let r = harvest_dirty_into(vm, mem, &mut self.pages);
            if !self.pages.is_sorted() {
                self.pages.sort_unstable();
                self.pages.dedup();
            }
            return r;
        }
        let mut fresh = Vec::new();
        let r = harvest_dirty_into(vm, mem, &mut fresh);
        self.add(&fresh);
        r
    }

    /// Adds `pages` (guest-physical page addresses) to the set.
    pub fn add(&mut self, pages: &[u64]) {
        if pages.is_empty() {
            return;
        }
        self.pages.extend_from_slice(pages);
        self.pages.sort_unstable();
        self.pages.dedup();
    }

    /// The pages the next checkpoint must hold, in ascending order.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// A checkpoint holding every page of [`DirtyCarry::pages`] reached its
    /// destination: the next one starts from the next harvest alone.
    pub fn delivered(&mut self) {
        self.pages.clear();
    }
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

/// vCPU 0 of `vm` in real mode with CS base 0, about to run at `rip`
/// (tests that let a guest write memory).
#[cfg(test)]
pub(crate) fn real_mode_vcpu(vm: &kvm_ioctls::VmFd, rip: u64) -> kvm_ioctls::VcpuFd {
    let vcpu = vm.create_vcpu(0).expect("create vCPU");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");
    vcpu
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

    /// A real-mode guest writes one page and halts while the VMM writes
    /// another: one harvest sees both, the next sees neither.
    #[test]
    fn harvest_sees_guest_and_vmm_writes_exactly_once() {
        use vm_memory::Bytes;
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        let mem = create_guest_memory(16).unwrap();
        register_memory(&vm, &mem, true).unwrap();
        // mov byte [0x3000], 1 ; hlt
        mem.write_slice(&[0xc6, 0x06, 0x00, 0x30, 0x01, 0xf4], GuestAddress(0x1000))
            .unwrap();
        let _ = harvest_dirty(&vm, &mem).unwrap(); // the loader's own writes
        let mut vcpu = real_mode_vcpu(&vm, 0x1000);
        assert!(matches!(vcpu.run(), Ok(kvm_ioctls::VcpuExit::Hlt)));
        mem.write_obj(7u32, GuestAddress(0x50_0000)).unwrap();
        let dirty = harvest_dirty(&vm, &mem).unwrap();
        assert!(dirty.contains(&0x3000), "guest write missed: {dirty:x?}");
        assert!(dirty.contains(&0x50_0000), "VMM write missed: {dirty:x?}");
        assert!(dirty.len() <= 4, "unexpected dirty pages: {dirty:x?}");
        assert!(harvest_dirty(&vm, &mem).unwrap().is_empty(), "harvest did not clear");
    }

    /// Pages of a harvest whose checkpoint failed reach the next one.
    #[test]
    fn dirty_carry_keeps_undelivered_pages() {
        use vm_memory::Bytes;
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mem = create_guest_memory(16).unwrap();
        register_memory(&vm, &mem, true).unwrap();
        let mut carry = DirtyCarry::default();
        carry.harvest(&vm, &mem).unwrap();
        carry.delivered();
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        carry.harvest(&vm, &mem).unwrap();
        assert_eq!(carry.pages(), [0x3000, 0x5000]);
        // That checkpoint failed: the next harvest adds to its pages.
        mem.write_obj(2u8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(2u8, GuestAddress(0x4000)).unwrap();
        carry.harvest(&vm, &mem).unwrap();
        assert_eq!(carry.pages(), [0x3000, 0x4000, 0x5000], "merged and deduplicated");
        carry.delivered();
        carry.harvest(&vm, &mem).unwrap();
        assert!(carry.pages().is_empty(), "{:x?}", carry.pages());
        carry.add(&[0x9000, 0x1000, 0x9000]);
        carry.add(&[0x2000]);
        assert_eq!(carry.pages(), [0x1000, 0x2000, 0x9000]);
    }

    #[test]
    fn too_small_is_an_error() {
        assert!(matches!(create_guest_memory(1), Err(MemoryError::TooSmall(1))));
        assert!(matches!(create_guest_memory(u64::MAX), Err(MemoryError::TooLarge(_))));
    }
}
