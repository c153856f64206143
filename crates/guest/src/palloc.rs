//! A bump allocator of physical memory for rings, packet buffers, socket
//! buffers and the memory checker's region: RAM of the PVH memory map
//! above the image (and above anything the loader placed there), below
//! 3 GiB (the cached part of the identity map). Nothing is ever freed.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::{StartInfo, MEMMAP_RAM};
use crate::phys::RangeSet;

/// Top of the cached identity map.
const CACHED_END: u64 = 3 << 30;

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __image_end: u8;
}

/// Picks the largest RAM block above the image, clear of `avoid`.
pub fn init(info: &StartInfo, avoid: &RangeSet) {
    let image_end = (&raw const __image_end) as u64;
    let mut best = (0u64, 0u64);
    for e in info.memmap().filter(|e| e.kind == MEMMAP_RAM) {
        let mut start = e.addr.max(image_end);
        let end = (e.addr + e.size).min(CACHED_END);
        // Skip past anything the loader put in this block (start info,
        // command line, modules, tables).
        for r in avoid.iter() {
            if r.end > start && r.start < end {
                start = start.max(r.end);
            }
        }
        let start = (start + 0xfff) & !0xfff;
        if end > start && end - start > best.1 - best.0 {
            best = (start, end);
        }
    }
    NEXT.store(best.0, Ordering::Relaxed);
    END.store(best.1, Ordering::Relaxed);
}

/// Bytes still free.
pub fn free() -> u64 {
    END.load(Ordering::Relaxed).saturating_sub(NEXT.load(Ordering::Relaxed))
}

/// Allocates `size` bytes aligned to `align` (a power of two), zeroed
/// (which also touches every page once). Panics when memory runs out.
pub fn alloc(size: usize, align: usize) -> u64 {
    let align = align.max(64) as u64;
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        let start = (cur + align - 1) & !(align - 1);
        let end = start + size as u64;
        assert!(
            end <= END.load(Ordering::Relaxed),
            "out of memory allocating {size} bytes ({} free)",
            free()
        );
        match NEXT.compare_exchange(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: [start, end) is RAM in the cached identity map that
                // nobody else owns (the bump pointer only moves forward).
                unsafe { core::ptr::write_bytes(start as *mut u8, 0, size) };
                return start;
            }
            Err(v) => cur = v,
        }
    }
}

/// Allocates a zeroed byte buffer that lives for the rest of the run.
pub fn alloc_slice(size: usize) -> &'static mut [u8] {
    let p = alloc(size, 4096);
    // SAFETY: freshly allocated, zeroed, never handed out again.
    unsafe { core::slice::from_raw_parts_mut(p as *mut u8, size) }
}

/// A global allocator over [`alloc`], for dependencies that link `alloc`
/// (feature unification can turn on `alloc` features of shared crates such
/// as `sha2` when the workspace builds its tests); the guest's own code
/// does not allocate. Memory is never freed.
pub struct Bump;

// SAFETY: `alloc` hands out fresh, suitably aligned, never-reused blocks.
unsafe impl core::alloc::GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        if END.load(Ordering::Relaxed) == 0 {
            return core::ptr::null_mut();
        }
        alloc(layout.size().max(1), layout.align()) as *mut u8
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}
