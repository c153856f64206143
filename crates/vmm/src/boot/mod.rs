//! Loading a kernel and describing the machine to it.
//!
//! Two entry protocols:
//! - **PVH** for ELF kernels that carry a `XEN_ELFNOTE_PHYS32_ENTRY` note
//!   (Linux `vmlinux` built with CONFIG_PVH, and remora's test guest): the
//!   vCPU starts in 32-bit protected mode with paging off and `ebx` pointing
//!   to an `hvm_start_info`.
//! - **64-bit Linux boot protocol** for a bzImage: the vCPU starts in long
//!   mode on identity-mapped page tables with `rsi` pointing to the zero page.

pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::memory::GuestMemoryMmap;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::memory::{e820_map, E820Entry};

/// PVH `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Linux boot protocol: `type_of_loader` "undefined" (0xff).
const LOADER_TYPE: u8 = 0xff;
/// `boot_flag` and `header` magic values of the setup header.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Minimum boot protocol version with a 64-bit entry point and `xloadflags`.
const MIN_64BIT_BOOT_PROTOCOL: u16 = 0x020c;
/// `xloadflags`: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// `loadflags` bits we set: the kernel is loaded high and may use the heap.
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
/// Maximum number of e820 entries in the zero page.
const E820_MAX: usize = 128;

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start_info.
    Pvh,
    /// 64-bit Linux boot protocol: long mode, `rsi` = zero page.
    Linux64,
}

/// Where the boot CPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry_addr: u64,
    /// `ebx` (PVH start_info) or `rsi` (zero page).
    pub boot_info_addr: u64,
}

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {error}")]
    OpenKernel { path: PathBuf, error: std::io::Error },
    #[error("cannot open initrd {path}: {error}")]
    OpenInitrd { path: PathBuf, error: std::io::Error },
    #[error("kernel {path} is neither an ELF with a PVH entry note nor a bzImage")]
    UnknownKernelFormat { path: PathBuf },
    #[error("kernel {path} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); boot a bzImage, or a vmlinux built with CONFIG_PVH=y")]
    ElfWithoutPvh { path: PathBuf },
    #[error("kernel {path} is malformed or does not fit in guest memory: {detail}")]
    Load { path: PathBuf, detail: String },
    #[error("bzImage {path} uses boot protocol {version:#06x}; remora needs >= 2.12 with a 64-bit entry point")]
    OldBzImage { path: PathBuf, version: u16 },
    #[error("initrd {path} is {size} bytes, which does not fit in the {avail} bytes of guest memory above the kernel; raise --mem")]
    InitrdTooLarge { path: PathBuf, size: u64, avail: u64 },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
}

// Not `#[from]`, which would also make it the error's source: the message
// already says it, and a source would be printed a second time.
impl From<vm_memory::GuestMemoryError> for BootError {
    fn from(e: vm_memory::GuestMemoryError) -> Self {
        BootError::GuestMemory(e)
    }
}

/// What to boot.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_bytes: u64,
    pub rsdp_addr: u64,
}

/// The kernel formats remora recognizes, from the file's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Detects the kernel format from its header.
pub fn detect_format(file: &mut File, path: &Path) -> Result<Option<KernelFormat>, BootError> {
    let mut head = [0u8; 0x206];
    let read_err = |error| BootError::Read {
        path: path.to_path_buf(),
        error,
    };
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut n = 0;
    while n < head.len() {
        let got = file.read(&mut head[n..]).map_err(read_err)?;
        if got == 0 {
            break;
        }
        n += got;
    }
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206 && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel, initrd and command line and writes the boot data
/// (PVH start_info or Linux zero page) into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let path = spec.kernel;
    let mut file = File::open(path).map_err(|error| BootError::OpenKernel {
        path: path.to_path_buf(),
        error,
    })?;
    let load_err = |e: linux_loader::loader::Error| BootError::Load {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let cmdline_len = write_cmdline(mem, spec.cmdline)?;
    match detect_format(&mut file, path)? {
        Some(KernelFormat::Elf) => {
            let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
                _ => {
                    return Err(BootError::ElfWithoutPvh {
                        path: path.to_path_buf(),
                    })
                }
            };
            let initrd = load_initrd(mem, spec, res.kernel_end, u64::MAX)?;
            write_pvh_info(mem, spec, initrd, cmdline_len)?;
            Ok(BootEntry {
                mode: EntryMode::Pvh,
                entry_addr: entry,
                boot_info_addr: PVH_INFO_START,
            })
        }
        Some(KernelFormat::BzImage) => {
            let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let hdr = res.setup_header.ok_or_else(|| BootError::Load {
                path: path.to_path_buf(),
                detail: "no setup header".into(),
            })?;
            let version = hdr.version;
            let xloadflags = hdr.xloadflags;
            if version < MIN_64BIT_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::OldBzImage {
                    path: path.to_path_buf(),
                    version,
                });
            }
            let initrd_max = u64::from(hdr.initrd_addr_max);
            let initrd = load_initrd(mem, spec, res.kernel_end, initrd_max)?;
            write_zero_page(mem, spec, &res, initrd, cmdline_len)?;
            Ok(BootEntry {
                mode: EntryMode::Linux64,
                entry_addr: res.kernel_load.raw_value() + 0x200,
                boot_info_addr: ZERO_PAGE_START,
            })
        }
        None => Err(BootError::UnknownKernelFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Writes the NUL-terminated command line; returns its length with the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;
    Ok(len)
}

/// Loaded initrd: guest address and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Places the initrd page-aligned at the top of low RAM (below `max_addr`,
/// the kernel's `initrd_addr_max`), above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    kernel_end: u64,
    max_addr: u64,
) -> Result<Option<Initrd>, BootError> {
    let Some(path) = spec.initrd else {
        return Ok(None);
    };
    let mut file = File::open(path).map_err(|error| BootError::OpenInitrd {
        path: path.to_path_buf(),
        error,
    })?;
    let size = file
        .metadata()
        .map_err(|error| BootError::Read {
            path: path.to_path_buf(),
            error,
        })?
        .len();
    let top = spec.mem_bytes.min(MMIO_GAP_START).min(max_addr.saturating_add(1));
    let floor = kernel_end.max(HIMEM_START);
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= floor);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            avail: top.saturating_sub(floor),
        });
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::GuestMemory)?;
    Ok(Some(Initrd { addr, size }))
}

/// The PVH start_info, module list and memory map.
pub fn write_pvh_info(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    initrd: Option<Initrd>,
    _cmdline_len: usize,
) -> Result<(), BootError> {
    let map = e820_map(spec.mem_bytes);
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: spec.rsdp_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

/// The Linux zero page: setup header from the bzImage plus what the loader
/// fills in (command line, initrd, e820, RSDP).
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    res: &KernelLoaderResult,
    initrd: Option<Initrd>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.code32_start = res.kernel_load.raw_value() as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = spec.rsdp_addr;
    let map: Vec<E820Entry> = e820_map(spec.mem_bytes);
    for (i, e) in map.iter().take(E820_MAX).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len().min(E820_MAX) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// Reads back the `hvm_start_info` (used by tests and diagnostics).
pub fn read_pvh_info(mem: &GuestMemoryMmap) -> Result<hvm_start_info, vm_memory::GuestMemoryError> {
    mem.read_obj(GuestAddress(PVH_INFO_START))
}

/// Reads back the zero page (used by tests and diagnostics).
pub fn read_zero_page(mem: &GuestMemoryMmap) -> Result<boot_params, vm_memory::GuestMemoryError> {
    mem.read_obj(GuestAddress(ZERO_PAGE_START))
}

/// Checks that guest memory holds `addr..addr+len`.
pub fn in_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    mem.checked_offset(GuestAddress(addr), len.saturating_sub(1)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_LOAD at 1 MiB and a PVH entry note.
    pub(crate) fn pvh_elf(entry: u32, with_note: bool) -> Vec<u8> {
        let mut f = vec![0u8; 0x1010];
        let phnum: u16 = if with_note { 2 } else { 1 };
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        f[58..60].copy_from_slice(&64u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, at: usize, ty: u32, off: u64, addr: u64, size: u64, align: u64| {
            f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            f[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes());
            for (i, v) in [off, addr, addr, size, size, align].iter().enumerate() {
                f[at + 8 + 8 * i..at + 16 + 8 * i].copy_from_slice(&v.to_le_bytes());
            }
        };
        ph(&mut f, 64, 1, 0x1000, 0x10_0000, 0x10, 0x1000);
        if with_note {
            let note_off = 0x200;
            ph(&mut f, 120, 4, note_off as u64, 0, 20, 4);
            let mut note = Vec::new();
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&18u32.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
            f[note_off..note_off + 20].copy_from_slice(&note);
        }
        f[0x1000..0x1010].copy_from_slice(&[0xf4; 16]);
        f
    }

    /// A minimal bzImage: 4 setup sectors, protocol 2.15, 64-bit entry.
    pub(crate) fn bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut f = vec![0u8; 5 * 512 + 0x2000];
        f[0x1f1] = 4; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        f
    }

    fn file_with(bytes: &[u8]) -> tempfile_like::TempPath {
        tempfile_like::TempPath::new(bytes)
    }

    /// Just enough of a temporary file for these tests (no extra crate).
    mod tempfile_like {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};
        pub struct TempPath(PathBuf);
        static N: AtomicU32 = AtomicU32::new(0);
        impl TempPath {
            pub fn new(bytes: &[u8]) -> Self {
                let p = std::env::temp_dir().join(format!(
                    "remora-boot-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, bytes).unwrap();
                TempPath(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn guest(mib: u64) -> GuestMemoryMmap {
        crate::memory::create_guest_memory(mib).unwrap()
    }

    fn read_cstr(mem: &GuestMemoryMmap, addr: u64) -> String {
        let mut out = Vec::new();
        for i in 0.. {
            let b: u8 = mem.read_obj(GuestAddress(addr + i)).unwrap();
            if b == 0 {
                break;
            }
            out.push(b);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pvh_start_info_memmap_cmdline_and_initrd() {
        let k = file_with(&pvh_elf(0x10_0000, true));
        let rd = file_with(&[0x5a; 10000]);
        let mem = guest(64);
        let e = load_kernel(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initrd: Some(rd.path()),
                cmdline: "console=ttyS0 workload=info",
                mem_bytes: 64 << 20,
                rsdp_addr: ACPI_START,
            },
        )
        .unwrap();
        assert_eq!(e.mode, EntryMode::Pvh);
        assert_eq!(e.entry_addr, 0x10_0000);
        assert_eq!(e.boot_info_addr, PVH_INFO_START);
        let info = read_pvh_info(&mem).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.rsdp_paddr, ACPI_START);
        assert_eq!(read_cstr(&mem, info.cmdline_paddr), "console=ttyS0 workload=info");
        // Memory map: exactly the e820 map, RAM summing to 64 MiB minus the hole.
        assert_eq!(info.memmap_entries, 3);
        let mut ram = 0;
        for i in 0..info.memmap_entries as u64 {
            let ent: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr + i * 24)).unwrap();
            if ent.type_ == 1 {
                ram += ent.size;
            }
        }
        assert_eq!(ram, (64 << 20) - (HIMEM_START - EBDA_START));
        // Initrd: one module, page aligned, at the top of RAM, with our bytes.
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(m.size, 10000);
        assert_eq!(m.paddr % 4096, 0);
        assert!(m.paddr + m.size <= 64 << 20 && m.paddr + m.size > (64 << 20) - 4096);
        let b: u8 = mem.read_obj(GuestAddress(m.paddr + 9999)).unwrap();
        assert_eq!(b, 0x5a);
        // The loaded segment.
        let code: u8 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(code, 0xf4);
    }

    #[test]
    fn bzimage_zero_page() {
        let k = file_with(&bzimage(0x020f, XLF_KERNEL_64));
        let rd = file_with(&[1u8; 8192]);
        let mem = guest(128);
        let e = load_kernel(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initrd: Some(rd.path()),
                cmdline: "console=ttyS0 root=/dev/vda",
                mem_bytes: 128 << 20,
                rsdp_addr: ACPI_START,
            },
        )
        .unwrap();
        assert_eq!(e.mode, EntryMode::Linux64);
        assert_eq!(e.entry_addr, 0x10_0200, "64-bit entry is load address + 0x200");
        assert_eq!(e.boot_info_addr, ZERO_PAGE_START);
        let zp = read_zero_page(&mem).unwrap();
        let hdr = zp.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_START);
        assert_eq!({ hdr.cmdline_size } as usize, "console=ttyS0 root=/dev/vda".len() + 1);
        assert_eq!(read_cstr(&mem, CMDLINE_START), "console=ttyS0 root=/dev/vda");
        assert_ne!(hdr.loadflags & LOADED_HIGH, 0);
        assert_eq!({ zp.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(zp.e820_entries, 3);
        let e820 = zp.e820_table;
        assert_eq!(
            ({ e820[0].addr }, { e820[0].size }, { e820[0].r#type }),
            (0, EBDA_START, 1)
        );
        assert_eq!({ e820[1].r#type }, 2);
        assert_eq!({ e820[2].addr } + { e820[2].size }, 128 << 20);
        let (rd_addr, rd_size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
        assert_eq!(rd_size, 8192);
        assert_eq!(rd_addr % 4096, 0);
        assert!(rd_addr + rd_size <= 128 << 20);
        assert!(rd_addr + rd_size <= u64::from(hdr.initrd_addr_max) + 1);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let mut img = bzimage(0x020f, XLF_KERNEL_64);
        img[0x22c..0x230].copy_from_slice(&0x00ff_ffffu32.to_le_bytes()); // 16 MiB
        let k = file_with(&img);
        let rd = file_with(&[1u8; 4096]);
        let mem = guest(64);
        load_kernel(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initrd: Some(rd.path()),
                cmdline: "",
                mem_bytes: 64 << 20,
                rsdp_addr: 0,
            },
        )
        .unwrap();
        let zp = read_zero_page(&mem).unwrap();
        let hdr = zp.hdr;
        assert!(u64::from(hdr.ramdisk_image) + 4096 <= 0x100_0000);
    }

    #[test]
    fn bad_kernels_and_initrds_are_clear_errors() {
        let mem = guest(16);
        fn spec(k: &Path) -> BootSpec<'_> {
            BootSpec {
                kernel: k,
                initrd: None,
                cmdline: "",
                mem_bytes: 16 << 20,
                rsdp_addr: 0,
            }
        }
        let missing = Path::new("/nonexistent/remora-kernel");
        assert!(matches!(
            load_kernel(&mem, &spec(missing)),
            Err(BootError::OpenKernel { .. })
        ));

        let junk = file_with(b"this is not a kernel at all");
        assert!(matches!(
            load_kernel(&mem, &spec(junk.path())),
            Err(BootError::UnknownKernelFormat { .. })
        ));

        let no_note = file_with(&pvh_elf(0, false));
        assert!(matches!(
            load_kernel(&mem, &spec(no_note.path())),
            Err(BootError::ElfWithoutPvh { .. })
        ));

        let old = file_with(&bzimage(0x0206, 0));
        assert!(matches!(
            load_kernel(&mem, &spec(old.path())),
            Err(BootError::OldBzImage { .. })
        ));

        let k = file_with(&pvh_elf(0x10_0000, true));
        let big = file_with(&vec![0u8; 17 << 20]);
        let r = load_kernel(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initrd: Some(big.path()),
                cmdline: "",
                mem_bytes: 16 << 20,
                rsdp_addr: 0,
            },
        );
        let err = r.unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("raise --mem"));

        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let r = load_kernel(
            &mem,
            &BootSpec {
                kernel: k.path(),
                initrd: None,
                cmdline: &long,
                mem_bytes: 16 << 20,
                rsdp_addr: 0,
            },
        );
        assert!(matches!(r, Err(BootError::CmdlineTooLong { .. })));
    }
}
