//! Copy-on-write for checkpoints with userfaultfd write protection
//! (opt-in: see [`crate::Vmm::set_pause_copy`] for when it pays).
//!
//! Guest memory is registered with a userfaultfd in write-protect mode once.
//! During a checkpoint's pause the VMM write-protects the epoch's dirty pages
//! (a few ioctls over runs of pages) and resumes the guest at once; the pages
//! are then copied while the guest runs. A vCPU (through KVM's
//! get_user_pages, which honours uffd-wp) or a device worker (a plain store)
//! that writes a protected page blocks in the kernel until the copier has
//! copied that page and lifted the protection, so every staged page holds
//! its content at the instant of the pause.
//!
//! The kernel interface is `linux/userfaultfd.h`; libc does not carry it, so
//! the structures and ioctl numbers are spelled out here (x86-64 layout).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};
use crate::snapshot::Staging;

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `_UFFDIO_WRITEPROTECT` in the `ioctls` mask UFFDIO_REGISTER returns.
const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

// _IOWR(0xAA, 0x3F, struct uffdio_api) and friends.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
// _IO(0xAA, 0x00) on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (32 bytes, packed in the kernel; every field used here
/// is naturally aligned within it).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    /// `arg.pagefault.flags`
    flags: u64,
    /// `arg.pagefault.address`
    address: u64,
    _feat: u64,
}

/// Errors setting up or driving write protection.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0}")]
    Create(std::io::Error),
    #[error("userfaultfd {what}: {error}")]
    Ioctl { what: &'static str, error: std::io::Error },
    #[error("this kernel's userfaultfd cannot write-protect anonymous guest memory")]
    Unsupported,
    #[error("guest memory region has no host mapping")]
    NoMapping,
}

fn ioctl_err(what: &'static str) -> impl Fn(std::io::Error) -> UffdError {
    move |error| UffdError::Ioctl { what, error }
}

/// A userfaultfd with all of guest memory registered for write protection.
pub struct WriteProtect {
    fd: OwnedFd,
    /// (guest-physical start, host start, length) of each region.
    regions: Vec<(u64, u64, u64)>,
}

impl WriteProtect {
    /// Opens a userfaultfd (the syscall, or /dev/userfaultfd) that also
    /// sees faults taken inside the kernel (KVM's get_user_pages, syscalls
    /// writing guest memory) and registers every region of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> Result<WriteProtect, UffdError> {
        let fd = open_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `api` is (repr(C), same layout); the fd is a userfaultfd we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(UffdError::Ioctl {
                what: "UFFDIO_API",
                error: std::io::Error::last_os_error(),
            });
        }
        if api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::Unsupported);
        }
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| UffdError::NoMapping)? as u64;
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: host,
                    len: r.len(),
                },
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes a `struct
            // uffdio_register` (`reg`); the range is a live mapping owned by
            // `mem`. Registration only changes how write faults on it are
            // resolved, never its contents.
            if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
                return Err(UffdError::Ioctl {
                    what: "UFFDIO_REGISTER",
                    error: std::io::Error::last_os_error(),
                });
            }
            if reg.ioctls & UFFDIO_WRITEPROTECT_BIT == 0 {
                return Err(UffdError::Unsupported);
            }
            regions.push((r.start_addr().0, host, r.len()));
        }
        Ok(WriteProtect { fd, regions })
    }

    /// Region index and host address of guest page `gpa`, if it is guest
    /// memory.
    fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, (g, _, len))| gpa >= *g && gpa - g + PAGE_SIZE <= *len)
            .map(|(i, (g, h, _))| (i, h + (gpa - g)))
    }

    /// Guest-physical address of host address `host`, if it is guest memory.
    fn gpa_of(&self, host: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|(_, h, len)| host >= *h && host - h < *len)
            .map(|(g, h, _)| g + (host - h))
    }

    /// Write-protects (or, with `protect` false, unprotects and wakes the
    /// threads waiting on) `len` bytes of guest memory at host address
    /// `host` (page aligned, inside one region).
    pub fn set(&self, host: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start: host, len },
            mode: if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads a `struct
            // uffdio_writeprotect` (`wp`); the range lies in memory
            // registered in `new`. It changes page protection only.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            // EAGAIN: the mm changed under the call (e.g. a concurrent
            // fork or munmap of another range); try again.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(ioctl_err("UFFDIO_WRITEPROTECT")(e));
            }
        }
    }

    /// Appends the host addresses of pending write-protect faults to `out`
    /// without blocking.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<(), UffdError> {
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            // SAFETY: reads at most size_of_val(&msgs) bytes into `msgs`,
            // an array of plain integers for which any bytes are valid.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(ioctl_err("read")(e)),
                };
            }
            let got = n as usize / std::mem::size_of::<UffdMsg>();
            for m in &msgs[..got] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    out.push(m.address & !(PAGE_SIZE - 1));
                }
            }
            if got < msgs.len() {
                return Ok(());
            }
        }
    }
}

fn open_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let first = std::io::Error::last_os_error();
    // Without CAP_SYS_PTRACE the syscall refuses faults taken in the kernel
    // (vm.unprivileged_userfaultfd=0); /dev/userfaultfd grants them by
    // file permission instead.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| UffdError::Create(first))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pages protected together: `pages[first..end]` lie in `len` bytes of
/// host memory from `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: usize,
    pub end: usize,
    pub host: u64,
    pub len: u64,
}

/// Groups `pages` (sorted guest-physical addresses) into runs, merging pages
/// of one region whose gap is at most `max_gap` pages: protecting a clean
/// page costs at most one spurious fault, an ioctl per page costs more.
/// Pages outside guest memory are left out.
pub fn runs(wp: &WriteProtect, pages: &[u64], max_gap: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut last_region = usize::MAX;
    for (i, gpa) in pages.iter().enumerate() {
        let Some((region, host)) = wp.locate(*gpa) else {
            continue;
        };
        if let Some(last) = out.last_mut() {
            let end = last.host + last.len;
            if region == last_region && host >= end && host - end <= max_gap * PAGE_SIZE {
                last.end = i + 1;
                last.len = host + PAGE_SIZE - last.host;
                continue;
            }
        }
        last_region = region;
        out.push(Run {
            first: i,
            end: i + 1,
            host,
            len: PAGE_SIZE,
        });
    }
    out
}

/// Write-protects every run; on failure lifts what it set and returns the
/// error (the caller then copies during the pause instead).
pub fn protect(wp: &WriteProtect, runs: &[Run]) -> Result<(), UffdError> {
    for (k, r) in runs.iter().enumerate() {
        if let Err(e) = wp.set(r.host, r.len, true) {
            for r in &runs[..k] {
                let _ = wp.set(r.host, r.len, false);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Copies the protected `pages` (sorted guest-physical addresses, grouped
/// in `runs` by [`runs`] and protected by [`protect`]) into `out`, after
/// the pages it already holds (it must have room for them:
/// [`Staging::copy_until`] makes room for the whole set), while the guest
/// runs. Write faults are served first (every 32 pages); protection is
/// lifted run by run. Also returns the number of write faults served.
///
/// Every page is copied before its protection is lifted, also when an
/// unprotect fails; the error is returned with the pages, and the caller
/// must then drop `wp` (closing the userfaultfd wakes every waiter).
pub fn copy_protected(
    wp: &WriteProtect,
    pages: &[u64],
    runs: &[Run],
    mut out: Staging,
) -> (Staging, usize, Result<(), UffdError>) {
    const P: usize = PAGE_SIZE as usize;
    /// Pages copied between two looks at the fault queue.
    const BATCH: usize = 32;
    let base = out.pages.len();
    let n: usize = runs.iter().map(|r| r.end - r.first).sum();
    // Slot of each page in `out` (runs skip pages outside memory).
    let mut slot = vec![usize::MAX; pages.len()];
    for r in runs {
        for i in r.first..r.end {
            slot[i] = out.pages.len();
            out.pages.push(pages[i]);
        }
    }
    let mut copied = vec![false; pages.len()];
    // Checks that the last slot is within the reservation.
    let _ = out.slot(base + n);
    let dst = out.slot(0);
    let mut result = Ok(());
    let mut note = |r: Result<(), UffdError>| {
        if let (Ok(()), Err(e)) = (&result, r) {
            result = Err(e);
        }
    };
    let copy = |i: usize, copied: &mut [bool]| {
        if copied[i] || slot[i] == usize::MAX {
            return;
        }
        let Some((_, host)) = wp.locate(pages[i]) else { return };
        // SAFETY: `host` is a whole page of mapped guest memory (`locate`
        // checked the region's bounds). The page is write-protected and not
        // yet copied, so every writer is blocked in the kernel until it is
        // unprotected below. `slot[i] < base + n` and the buffer has room
        // for base + n pages (checked above), so the destination is in
        // bounds and, being our heap, never overlaps guest memory.
        unsafe { crate::snapshot::copy_page(host as *const u8, dst.add(slot[i] * P)) };
        copied[i] = true;
    };
    let mut faults = Vec::new();
    let mut nfaults = 0;
    let mut serve = |copied: &mut [bool], note: &mut dyn FnMut(Result<(), UffdError>)| {
        faults.clear();
        note(wp.read_faults(&mut faults));
        nfaults += faults.len();
        for &host in &faults {
            if let Some(i) = wp.gpa_of(host).and_then(|g| pages.binary_search(&g).ok()) {
                copy(i, copied);
            }
            // Also for pages that are not ours (merged gaps) or already
            // done (the fault raced with their run's unprotect): this wakes
            // the writer.
            note(wp.set(host, PAGE_SIZE, false));
        }
    };
    for r in runs {
        for (k, i) in (r.first..r.end).enumerate() {
            if k % BATCH == 0 {
                serve(&mut copied, &mut note);
            }
            copy(i, &mut copied);
        }
        note(wp.set(r.host, r.len, false));
    }
    serve(&mut copied, &mut note);
    crate::snapshot::copy_done();
    // SAFETY: the first `base` slots were filled by the caller, the next n
    // by `copy` (each run's pages are copied either in the loop or when a
    // fault asked first).
    unsafe { out.set_filled(base + n) };
    (out, nfaults, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// A real-mode guest (its write goes through KVM) and a VMM thread
    /// (a plain store) both write protected pages: both wait, the staged
    /// pages hold the contents from before, and both writes land after.
    #[test]
    fn protected_pages_are_copied_before_guest_and_vmm_writes() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        let mem = crate::memory::create_guest_memory(16).unwrap();
        crate::memory::register_memory(&vm, &mem, true).unwrap();
        // mov byte [0x3000], 1 ; hlt
        mem.write_slice(&[0xc6, 0x06, 0x00, 0x30, 0x01, 0xf4], GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&[0xaa; 4096], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[0xbb; 4096], GuestAddress(0x5000)).unwrap();
        let wp = WriteProtect::new(&mem).expect("userfaultfd write protection (run as root)");
        let pages = [0x3000, 0x5000];
        let runs = runs(&wp, &pages, 0);
        assert_eq!(runs.len(), 2, "{runs:?}");
        protect(&wp, &runs).unwrap();

        let mut vcpu = crate::memory::real_mode_vcpu(&vm, 0x1000);
        let guest = std::thread::spawn(move || matches!(vcpu.run(), Ok(kvm_ioctls::VcpuExit::Hlt)));
        let m2 = mem.clone();
        let vmm = std::thread::spawn(move || m2.write_obj(0x55u8, GuestAddress(0x5000)).is_ok());

        // Both writers fault and wait; their pages are unchanged.
        let mut faults = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while faults.len() < 2 && Instant::now() < deadline {
            wp.read_faults(&mut faults).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        faults.sort_unstable();
        let hosts: Vec<u64> = pages.iter().map(|g| wp.locate(*g).unwrap().1).collect();
        assert_eq!(faults, hosts, "write faults on both protected pages");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0xaa);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0xbb);
        assert!(!guest.is_finished() && !vmm.is_finished(), "a write got through");

        let (staged, _, result) = copy_protected(&wp, &pages, &runs, Staging::with_capacity(Vec::new(), 2));
        result.unwrap();
        assert_eq!(staged.pages, pages);
        assert!(staged.page(0).iter().all(|b| *b == 0xaa));
        assert!(staged.page(1).iter().all(|b| *b == 0xbb));
        assert!(guest.join().unwrap(), "guest did not reach hlt");
        assert!(vmm.join().unwrap());
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0x55);
        // The writes are in the dirty logs for the next snapshot.
        let dirty = crate::memory::harvest_dirty(&vm, &mem).unwrap();
        assert!(dirty.contains(&0x3000) && dirty.contains(&0x5000), "{dirty:x?}");
    }

    /// Pages a few clean pages apart share one protected range.
    #[test]
    fn runs_merge_small_gaps_only() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let wp = WriteProtect::new(&mem).expect("userfaultfd write protection (run as root)");
        let pages = [0x1000, 0x2000, 0x4000, 0x20_0000];
        let r = runs(&wp, &pages, 1);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!((r[0].first, r[0].end, r[0].len), (0, 3, 0x4000));
        assert_eq!((r[1].first, r[1].end, r[1].len), (3, 4, 0x1000));
        assert_eq!(runs(&wp, &pages, 0).len(), 3);
        assert!(runs(&wp, &[1 << 40], 0).is_empty(), "outside guest memory");
    }
}
