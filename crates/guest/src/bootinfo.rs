//! The PVH `hvm_start_info` the loader hands over in `ebx`
//! (xen/include/public/arch-x86/hvm/start_info.h).

use core::fmt;

use crate::phys::{self, Range, RangeSet};

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` (version 1).
const START_INFO_SIZE: usize = 56;
/// Size of one `hvm_memmap_table_entry`.
const MEMMAP_ENTRY_SIZE: usize = 24;
/// Size of one `hvm_modlist_entry`.
const MODLIST_ENTRY_SIZE: u64 = 32;
/// Longest command line we read.
pub const CMDLINE_MAX: usize = 4096;
/// `hvm_memmap_table_entry.type` of usable RAM.
pub const MEMMAP_RAM: u32 = 1;

/// Why the start info is unusable.
#[derive(Debug, Clone, Copy)]
pub enum Error {
    /// The address is 0 or not identity-mapped.
    Unmapped(u64),
    /// Wrong magic number.
    BadMagic(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unmapped(a) => write!(f, "address {a:#x} is not mapped"),
            Error::BadMagic(m) => write!(f, "magic {m:#x}, expected {MAGIC:#x}"),
        }
    }
}

/// The fields of `hvm_start_info` the guest uses.
#[derive(Debug, Clone, Copy)]
pub struct StartInfo {
    pub paddr: u64,
    pub version: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    /// 0 when version 0 (no memory map).
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

/// One memory map entry.
#[derive(Debug, Clone, Copy)]
pub struct MemMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl StartInfo {
    /// Reads the start info at `paddr`.
    pub fn read(paddr: u64) -> Result<Self, Error> {
        // SAFETY: the loader's start info is not written by anyone while the
        // guest runs (and never by this program).
        let b = unsafe { phys::bytes(paddr, START_INFO_SIZE) }.ok_or(Error::Unmapped(paddr))?;
        let magic = phys::le32(b, 0);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = phys::le32(b, 4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (phys::le64(b, 40), phys::le32(b, 48))
        } else {
            (0, 0)
        };
        Ok(Self {
            paddr,
            version,
            nr_modules: phys::le32(b, 12),
            modlist_paddr: phys::le64(b, 16),
            cmdline_paddr: phys::le64(b, 24),
            rsdp_paddr: phys::le64(b, 32),
            memmap_paddr,
            memmap_entries,
        })
    }

    /// Copies the NUL-terminated command line into `buf` and returns it
    /// (empty if there is none; cut at `buf.len()` bytes).
    pub fn cmdline<'b>(&self, buf: &'b mut [u8]) -> &'b [u8] {
        let mut len = 0;
        let mut addr = self.cmdline_paddr;
        // Read page by page so an unmapped tail never matters.
        while len < buf.len() && phys::is_mapped(addr, 1) {
            let chunk = (4096 - (addr & 0xfff)) as usize;
            let chunk = chunk.min(buf.len() - len);
            // SAFETY: the loader's command line is only read.
            let Some(src) = (unsafe { phys::bytes(addr, chunk) }) else {
                break;
            };
            match src.iter().position(|&b| b == 0) {
                Some(end) => {
                    buf[len..len + end].copy_from_slice(&src[..end]);
                    len += end;
                    return &buf[..len];
                }
                None => {
                    buf[len..len + chunk].copy_from_slice(src);
                    len += chunk;
                    addr += chunk as u64;
                }
            }
        }
        &buf[..len]
    }

    /// The memory map entries (none for a version-0 start info).
    pub fn memmap(&self) -> impl Iterator<Item = MemMapEntry> + '_ {
        let n = self.memmap_entries as usize;
        // SAFETY: the loader's memory map is only read.
        let table = unsafe { phys::bytes(self.memmap_paddr, n * MEMMAP_ENTRY_SIZE) }.unwrap_or(&[]);
        table.chunks_exact(MEMMAP_ENTRY_SIZE).map(|e| MemMapEntry {
            addr: phys::le64(e, 0),
            size: phys::le64(e, 8),
            kind: phys::le32(e, 16),
        })
    }

    /// Sum of the RAM entries of the memory map, in KiB.
    pub fn ram_kib(&self) -> u64 {
        self.memmap()
            .filter(|e| e.kind == MEMMAP_RAM)
            .map(|e| e.size / 1024)
            .sum()
    }

    /// Records where the start info, its memory map, module list and
    /// command line (up to `cmdline_len` bytes and the NUL) live.
    pub fn reserve(&self, set: &mut RangeSet, cmdline_len: usize) {
        set.add(Range::new(self.paddr, START_INFO_SIZE as u64));
        set.add(Range::new(
            self.memmap_paddr,
            u64::from(self.memmap_entries) * MEMMAP_ENTRY_SIZE as u64,
        ));
        set.add(Range::new(
            self.modlist_paddr,
            u64::from(self.nr_modules) * MODLIST_ENTRY_SIZE,
        ));
        set.add(Range::new(self.cmdline_paddr, cmdline_len as u64 + 1));
    }
}
