//! Snapshots on disk: a base and numbered increments in one directory.
//!
//! ```text
//! DIR/0000.state  DIR/0000.mem    base: CPU/VM/device state, every non-zero page
//! DIR/0001.state  DIR/0001.mem    increment: state, pages dirtied since 0000
//! ...
//! ```
//! `.state` files use the versioned, checksummed container of
//! `remora_vmstate::format`. `.mem` files are `magic | version | seq |
//! page count | (gpa, 4 KiB page)* | crc32 of everything before`. Both are
//! written to a temporary name, synced, then renamed, so a crash leaves
//! either the whole file or none. Restore reads the base and every
//! increment in order and refuses gaps, mismatches and corruption.
//!
//! Restore never runs older or damaged state quietly: the directory must
//! hold a contiguous chain `0000..N` with both files of every snapshot
//! (only a `.mem` numbered N, left by a write that was cut short, may
//! follow it), each a regular file (never followed through a symlink);
//! every `.state` is decoded and checked, and every `.mem` verified, before
//! any page is applied. A file is read only up to the length its header
//! records, and a file of any other length is refused.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use remora_vmstate::{format, VcpuState, VmState};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

const STATE_KIND: u32 = 1;
const MEM_MAGIC: [u8; 8] = *b"REMORAMM";
const MEM_VERSION: u32 = 1;

/// The serial port's registers (vm-superio's SerialState, serializable).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SerialSnap {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

/// Everything but memory.
#[derive(Serialize, Deserialize)]
pub struct MachineSnapshot {
    pub seq: u32,
    pub mem_mib: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnap,
    /// virtio transports in device order (nets, then disks).
    pub devices: Vec<crate::devices::virtio::mmio::TransportSnap>,
}

/// Errors reading or writing snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {error}")]
    Format { path: PathBuf, error: format::FormatError },
    #[error("{path}: not a remora memory file, or a version this remora cannot read")]
    MemHeader { path: PathBuf },
    #[error("{path}: memory file is corrupt or truncated (checksum mismatch)")]
    MemChecksum { path: PathBuf },
    #[error("{path}: page {gpa:#x} is outside the guest's memory")]
    PageOutside { path: PathBuf, gpa: u64 },
    #[error("no base snapshot (0000.state) in {0}")]
    NoBase(PathBuf),
    #[error("snapshot {path} says it is number {found}, expected {expected}")]
    Sequence { path: PathBuf, found: u32, expected: u32 },
    #[error("{0} already holds snapshots; a base snapshot needs an empty or new directory")]
    NotEmpty(PathBuf),
    #[error("no base snapshot in {0}: take one (without --incremental) first")]
    NeedBase(PathBuf),
    #[error("{missing} is missing, but {later} exists: the snapshot chain has a gap")]
    Gap { missing: PathBuf, later: PathBuf },
    #[error("{path} is missing: every snapshot needs its .state and its .mem")]
    MissingMem { path: PathBuf },
    #[error("{path} is not a regular file (a symlink, directory or device): refused")]
    NotRegular { path: PathBuf },
    #[error("{path} is {have} bytes, but its header records {want}: {}", if have > want { "trailing bytes" } else { "truncated" })]
    Length { path: PathBuf, have: u64, want: u64 },
    #[error("{path} records {what}, unlike the base snapshot of its chain")]
    Mismatch { path: PathBuf, what: String },
}

/// Largest `.state` file read: a state is tens of KiB per vCPU.
const MAX_STATE_BYTES: u64 = 64 << 20;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |error| SnapshotError::Io {
        path: path.to_path_buf(),
        error,
    }
}

pub fn state_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:04}.state"))
}

pub fn mem_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:04}.mem"))
}

/// Opens a snapshot file to read: never through a symlink, and only a
/// regular file (a FIFO does not block the open); returns it and its size.
fn open_regular(path: &Path) -> Result<(File, u64), SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => SnapshotError::NotRegular { path: path.into() },
            _ => io_err(path)(e),
        })?;
    // The opened file's own metadata: nothing can swap it after the check.
    let meta = f.metadata().map_err(io_err(path))?;
    if !meta.file_type().is_file() {
        return Err(SnapshotError::NotRegular { path: path.into() });
    }
    Ok((f, meta.len()))
}

/// Checks the listing of `dir` and returns the number of snapshots in its
/// chain: `0000` to `N-1`, each with a `.state` and a `.mem`, all regular
/// files. Refuses a gap (a later file after a missing one), a missing
/// `.mem`, an entry that cannot be read and anything but a regular file.
/// A `.mem` numbered N without its `.state` is a write that was cut short
/// and is ignored; so are files of other names (such as `.tmp` files).
pub fn chain_len(dir: &Path) -> Result<u32, SnapshotError> {
    use std::collections::BTreeSet;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SnapshotError::NoBase(dir.into())),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let (mut states, mut mems) = (BTreeSet::new(), BTreeSet::new());
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some((stem, ext)) = name.to_str().and_then(|n| n.rsplit_once('.')) else {
            continue;
        };
        let set = match ext {
            "state" => &mut states,
            "mem" => &mut mems,
            _ => continue,
        };
        // Only the names the writer gives (0000, 0001, ..., 10000, ...).
        let Some(seq) = stem.parse::<u32>().ok().filter(|s| format!("{s:04}") == stem) else {
            continue;
        };
        let path = entry.path();
        // Of the entry itself: a symlink is refused, not followed.
        let kind = entry.file_type().map_err(io_err(&path))?;
        if !kind.is_file() {
            return Err(SnapshotError::NotRegular { path });
        }
        set.insert(seq);
    }
    let n = states.len() as u32;
    if !states.contains(&0) {
        return Err(SnapshotError::NoBase(dir.into()));
    }
    // n states numbered 0..n unless one is missing.
    if let Some(missing) = (0..n).find(|s| !states.contains(s)) {
        let later = states.iter().next_back().map_or(missing, |l| *l);
        return Err(SnapshotError::Gap {
            missing: state_path(dir, missing),
            later: state_path(dir, later),
        });
    }
    if let Some(missing) = (0..n).find(|s| !mems.contains(s)) {
        return Err(SnapshotError::MissingMem {
            path: mem_path(dir, missing),
        });
    }
    if let Some(later) = mems.iter().find(|m| **m > n) {
        return Err(SnapshotError::Gap {
            missing: state_path(dir, n),
            later: mem_path(dir, *later),
        });
    }
    Ok(n)
}

/// The number the next snapshot in `dir` gets (0 if none).
pub fn next_seq(dir: &Path) -> u32 {
    (0..).find(|s| !state_path(dir, *s).exists()).unwrap_or(0)
}

/// Pages copied out of guest memory while the vCPUs were paused.
pub struct Staging {
    /// Guest-physical addresses; page `i` is [`Staging::page`]`(i)`.
    pub pages: Vec<u64>,
    /// `off` bytes of padding, then the pages back to back. The padding
    /// puts the pages on page boundaries in memory: `memcpy` of a 4 KiB
    /// page to a destination 16 bytes past a page boundary (where a heap
    /// allocation starts) is ~1.6x slower on this host (4K aliasing of
    /// source and destination).
    buf: Vec<u8>,
    off: usize,
}

const P: usize = PAGE_SIZE as usize;

/// A page-aligned copy target for `n` pages in `buf`'s allocation: returns
/// the buffer (cleared, padding initialized, room for `n` pages) and the
/// padding length.
fn page_aligned(mut buf: Vec<u8>, n: usize) -> (Vec<u8>, usize) {
    buf.clear();
    buf.reserve(n * P + P);
    let off = buf.as_ptr().align_offset(P).min(P);
    buf.resize(off, 0);
    (buf, off)
}

/// Copies one 4 KiB page from guest memory to a staging slot with
/// non-temporal stores: the staging area is read once, later, by the
/// writer, so the copy skips reading the destination into the cache
/// (~20% faster than `memcpy` here). Call [`copy_done`] before another
/// thread reads the destination.
///
/// # Safety
/// `src` must be valid for reading and `dst` for writing `P` bytes, and
/// the two must not overlap.
pub(crate) unsafe fn copy_page(src: *const u8, dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        if (dst as usize).is_multiple_of(16) {
            let (s, d) = (src.cast::<__m128i>(), dst.cast::<__m128i>());
            for i in (0..P / 16).step_by(4) {
                // SAFETY: i + 3 < P / 16, so every access is within the P
                // bytes the caller vouches for; `d` is 16-byte aligned
                // (checked above) as the streaming store needs. SSE2 is
                // part of x86-64.
                unsafe {
                    let a = _mm_loadu_si128(s.add(i));
                    let b = _mm_loadu_si128(s.add(i + 1));
                    let c = _mm_loadu_si128(s.add(i + 2));
                    let e = _mm_loadu_si128(s.add(i + 3));
                    _mm_stream_si128(d.add(i), a);
                    _mm_stream_si128(d.add(i + 1), b);
                    _mm_stream_si128(d.add(i + 2), c);
                    _mm_stream_si128(d.add(i + 3), e);
                }
            }
            return;
        }
    }
    // SAFETY: as the caller guarantees.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, P) };
}

/// Orders this thread's [`copy_page`] stores before whatever it does next
/// (such as ending, which a join then observes).
pub(crate) fn copy_done() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a store fence has no preconditions; SSE2 is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

impl Staging {
    /// An empty staging area around `buf` for `n` pages, page aligned;
    /// [`Staging::slot`] gives page `i`'s destination.
    pub(crate) fn with_capacity(buf: Vec<u8>, n: usize) -> Staging {
        let (buf, off) = page_aligned(buf, n);
        Staging {
            pages: Vec::with_capacity(n),
            buf,
            off,
        }
    }

    /// Destination of page `i` (< the capacity given at creation).
    pub(crate) fn slot(&mut self, i: usize) -> *mut u8 {
        assert!(self.off + i * P <= self.buf.capacity(), "staging slot {i} out of range");
        // SAFETY: in bounds of the allocation (reserved in `page_aligned`).
        unsafe { self.buf.as_mut_ptr().add(self.off + i * P) }
    }

    /// Marks the first `n` slots as holding pages.
    ///
    /// # Safety
    /// Every one of the first `n` slots must have been written.
    pub(crate) unsafe fn set_filled(&mut self, n: usize) {
        // SAFETY: the caller wrote the first n slots; the padding was
        // initialized by `page_aligned`; n is within the reservation.
        unsafe { self.buf.set_len(self.off + n * P) };
    }

    /// Moves `other`'s pages to the end of this one's (which keeps its
    /// alignment only if it does not grow beyond its reservation).
    pub fn append(&mut self, other: &mut Staging) {
        for i in 0..other.pages.len() {
            self.buf.extend_from_slice(other.page(i));
        }
        self.pages.append(&mut other.pages);
    }

    /// Page `i`'s bytes.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.buf[self.off + i * P..self.off + (i + 1) * P]
    }

    /// The buffer, for reuse by the next snapshot.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// Copies `pages` (guest-physical addresses of 4 KiB pages). With
    /// `skip_zero`, pages that are all zero are left out (a restore starts
    /// from zeroed memory).
    pub fn copy(mem: &GuestMemoryMmap, pages: &[u64], skip_zero: bool) -> Staging {
        Self::copy_into(mem, pages, skip_zero, Vec::new())
    }

    /// [`Staging::copy`] into `buf`, reusing its allocation: a buffer that
    /// is already faulted in keeps host page faults out of the pause.
    ///
    /// Call only while nothing writes guest memory (vCPUs and device
    /// workers parked): pages are copied with plain `memcpy`.
    pub fn copy_into(mem: &GuestMemoryMmap, pages: &[u64], skip_zero: bool, buf: Vec<u8>) -> Staging {
        let (mut out, _) = Self::copy_until(mem, pages, buf, None);
        if skip_zero {
            out.drop_zero_pages();
        }
        out
    }

    /// Copies `pages` in order until all
    /// are copied or `deadline` passes; returns the staging area (with
    /// room for all of `pages`) and how many of `pages` it has dealt with
    /// (copied, or left out for lying outside guest memory). The rest can
    /// be added with [`crate::uffd::copy_protected`].
    ///
    /// Call only while nothing writes guest memory (vCPUs and device
    /// workers parked): pages are copied with plain `memcpy`.
    pub fn copy_until(
        mem: &GuestMemoryMmap,
        pages: &[u64],
        buf: Vec<u8>,
        deadline: Option<std::time::Instant>,
    ) -> (Staging, usize) {
        /// Pages a thread copies between looks at the clock.
        const CHUNK: usize = 32;
        // A page lies within one region (regions are page aligned); `host`
        // is 0 for a page outside guest memory.
        let hosts: Vec<usize> = pages
            .iter()
            .map(|&gpa| {
                let host = mem.get_host_address(GuestAddress(gpa)).ok();
                match (host, mem.checked_offset(GuestAddress(gpa), P - 1)) {
                    (Some(h), Some(_)) => h as usize,
                    _ => 0,
                }
            })
            .collect();
        let mut out = Staging::with_capacity(buf, pages.len());
        let dst = out.slot(0);
        let n = pages.len();
        // A second copy thread does not help here (the copy is bound by
        // memory bandwidth) and would add its scheduling delay to the pause.
        let mut done = 0;
        while done < n {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                break;
            }
            let end = (done + CHUNK).min(n);
            for (i, &host) in hosts.iter().enumerate().take(end).skip(done) {
                if host == 0 {
                    continue;
                }
                // SAFETY: `host` points at P bytes of live guest memory
                // (checked above) that nothing writes during the pause; slot
                // i is inside the reservation for n pages, and our heap
                // never overlaps guest memory.
                unsafe { copy_page(host as *const u8, dst.add(i * P)) };
            }
            done = end;
        }
        copy_done();
        // Slots are indexed like `pages`; close the gaps left by pages
        // outside guest memory (never expected: the pages come from the
        // regions' own dirty logs).
        let mut kept = 0;
        for i in 0..done {
            if hosts[i] == 0 {
                continue;
            }
            if kept != i {
                // SAFETY: both slots lie in the reservation; slot i was
                // written above; kept < i so they do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(dst.add(i * P), dst.add(kept * P), P) };
            }
            out.pages.push(pages[i]);
            kept += 1;
        }
        // SAFETY: the first `kept` slots were written above.
        unsafe { out.set_filled(kept) };
        (out, done)
    }

    /// Leaves out all-zero pages, compacting the rest in order.
    fn drop_zero_pages(&mut self) {
        let mut kept = 0;
        for i in 0..self.pages.len() {
            let at = self.off + i * P;
            if self.buf[at..at + P].iter().all(|b| *b == 0) {
                continue;
            }
            if kept != i {
                self.buf.copy_within(at..at + P, self.off + kept * P);
            }
            self.pages[kept] = self.pages[i];
            kept += 1;
        }
        self.pages.truncate(kept);
        self.buf.truncate(self.off + kept * P);
    }

    /// Pages of guest memory that were ever populated (present in RAM or
    /// swapped out), from /proc/self/pagemap; every other page of the
    /// anonymous mapping is still zero. Falls back to every page if
    /// pagemap cannot be read.
    pub fn populated_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        use vm_memory::MemoryRegionAddress;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let Ok(pagemap) = File::open("/proc/self/pagemap") else {
            return Self::all_pages(mem);
        };
        let mut out = Vec::new();
        for r in mem.iter() {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                return Self::all_pages(mem);
            };
            let npages = (r.len() / PAGE_SIZE) as usize;
            let mut raw = vec![0u8; npages * 8];
            let first = (host as u64 / PAGE_SIZE) * 8;
            if pagemap.read_exact_at(&mut raw, first).is_err() {
                return Self::all_pages(mem);
            }
            let base = r.start_addr().0;
            for (i, e) in raw.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                if u64::from_le_bytes(w) & (PRESENT | SWAPPED) != 0 {
                    out.push(base + i as u64 * PAGE_SIZE);
                }
            }
        }
        out
    }

    /// Every page of guest memory.
    pub fn all_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
        mem.iter()
            .flat_map(|r| {
                let base = r.start_addr().0;
                (0..r.len() / PAGE_SIZE).map(move |i| base + i * PAGE_SIZE)
            })
            .collect()
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let f = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    write(&mut w).map_err(io_err(&tmp))?;
    let f = w.into_inner().map_err(|e| SnapshotError::Io {
        path: tmp.clone(),
        error: e.into_error(),
    })?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A `Write` that also feeds a CRC32.
struct Crc<'a, W: Write>(&'a mut W, crc32fast::Hasher);
impl<W: Write> Write for Crc<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(b)?;
        self.1.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Writes snapshot `state.seq` (state and staged pages) into `dir`.
pub fn write(dir: &Path, state: &MachineSnapshot, staging: &Staging) -> Result<u64, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let seq = state.seq;
    let mpath = mem_path(dir, seq);
    write_atomic(&mpath, |w| {
        let mut c = Crc(w, crc32fast::Hasher::new());
        c.write_all(&MEM_MAGIC)?;
        c.write_all(&MEM_VERSION.to_le_bytes())?;
        c.write_all(&seq.to_le_bytes())?;
        c.write_all(&(staging.pages.len() as u64).to_le_bytes())?;
        for (i, gpa) in staging.pages.iter().enumerate() {
            c.write_all(&gpa.to_le_bytes())?;
            c.write_all(staging.page(i))?;
        }
        let crc = c.1.finalize();
        w.write_all(&crc.to_le_bytes())
    })?;
    let spath = state_path(dir, seq);
    let bytes = format::encode(STATE_KIND, state).map_err(|error| SnapshotError::Format {
        path: spath.clone(),
        error,
    })?;
    // The state file is written last: its presence marks a complete snapshot.
    write_atomic(&spath, |w| w.write_all(&bytes))?;
    Ok(staging.pages.len() as u64 * PAGE_SIZE + bytes.len() as u64)
}

/// Reads memory file `seq` once, from its header to its checksum: refuses
/// a file that is not regular, another length than its header records, a
/// page outside `mem`, or a checksum mismatch. With `apply`, writes every
/// page into `mem` as it goes (so verify a file first). Returns the number
/// of pages.
fn read_mem(path: &Path, seq: u32, mem: &GuestMemoryMmap, apply: bool) -> Result<u64, SnapshotError> {
    const HDR: u64 = 24;
    const REC: u64 = 8 + PAGE_SIZE;
    let (f, size) = open_regular(path)?;
    let mut crc = crc32fast::Hasher::new();
    let mut hdr = [0u8; HDR as usize];
    (&f).read_exact(&mut hdr)
        .map_err(|_| SnapshotError::MemHeader { path: path.into() })?;
    crc.update(&hdr);
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if hdr[..8] != MEM_MAGIC || u32_at(&hdr, 8) != MEM_VERSION || u32_at(&hdr, 12) != seq {
        return Err(SnapshotError::MemHeader { path: path.into() });
    }
    let mut cnt = [0u8; 8];
    cnt.copy_from_slice(&hdr[16..24]);
    let count = u64::from_le_bytes(cnt);
    // The size must match before anything is read on: a torn or padded
    // file is refused whole.
    let want = count.checked_mul(REC).and_then(|b| b.checked_add(HDR + 4));
    if want != Some(size) {
        return Err(SnapshotError::Length {
            path: path.into(),
            have: size,
            want: want.unwrap_or(u64::MAX),
        });
    }
    // Never more than recorded (and one byte to see a file that grew).
    let mut r = BufReader::with_capacity(1 << 20, (&f).take(size - HDR + 1));
    let mut rec = vec![0u8; REC as usize];
    for _ in 0..count {
        r.read_exact(&mut rec).map_err(io_err(path))?;
        crc.update(&rec);
        let mut g = [0u8; 8];
        g.copy_from_slice(&rec[..8]);
        let gpa = u64::from_le_bytes(g);
        if gpa % PAGE_SIZE != 0 || mem.checked_offset(GuestAddress(gpa), P - 1).is_none() {
            return Err(SnapshotError::PageOutside { path: path.into(), gpa });
        }
        if apply {
            mem.write_slice(&rec[8..], GuestAddress(gpa))
                .map_err(|_| SnapshotError::PageOutside { path: path.into(), gpa })?;
        }
    }
    let mut tail = [0u8; 4];
    r.read_exact(&mut tail).map_err(io_err(path))?;
    if crc.finalize() != u32::from_le_bytes(tail) {
        return Err(SnapshotError::MemChecksum { path: path.into() });
    }
    let mut more = [0u8; 1];
    if r.read(&mut more).map_err(io_err(path))? != 0 {
        return Err(SnapshotError::Length {
            path: path.into(),
            have: size + 1,
            want: size,
        });
    }
    Ok(count)
}

/// Verifies one memory file, then applies it to `mem`; returns the number
/// of pages.
#[cfg(test)]
fn apply_mem(path: &Path, seq: u32, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    read_mem(path, seq, mem, false)?;
    read_mem(path, seq, mem, true)
}

/// Reads the state file `seq` of `dir`: a regular file, exactly as long
/// as its header records (at most [`MAX_STATE_BYTES`]), that decodes and
/// says it is number `seq`.
pub fn read_state(dir: &Path, seq: u32) -> Result<MachineSnapshot, SnapshotError> {
    let path = state_path(dir, seq);
    let format_err = |error| SnapshotError::Format {
        path: path.clone(),
        error,
    };
    let (f, size) = open_regular(&path)?;
    let mut bytes = vec![0u8; format::HEADER_LEN];
    (&f).read_exact(&mut bytes).map_err(|_| {
        format_err(format::FormatError::Truncated {
            have: size as usize,
            need: format::HEADER_LEN,
        })
    })?;
    let len = format::payload_len(STATE_KIND, &bytes).map_err(format_err)?;
    let want = len.saturating_add(format::HEADER_LEN as u64);
    if size != want || want > MAX_STATE_BYTES {
        return Err(SnapshotError::Length { path, have: size, want });
    }
    // Never more than recorded (and one byte to see a file that grew).
    (&f).take(len + 1).read_to_end(&mut bytes).map_err(io_err(&path))?;
    let s: MachineSnapshot = format::decode(STATE_KIND, &bytes).map_err(format_err)?;
    if s.seq != seq {
        return Err(SnapshotError::Sequence {
            path,
            found: s.seq,
            expected: seq,
        });
    }
    Ok(s)
}

/// The newest snapshot's state and the number of snapshots in `dir`,
/// once the chain's listing ([`chain_len`]) and every state in it are
/// verified (each decodes, has its number, and matches the base's memory
/// size and machine).
pub fn latest(dir: &Path) -> Result<(MachineSnapshot, u32), SnapshotError> {
    let n = chain_len(dir)?;
    let base = read_state(dir, 0)?;
    let shape = |s: &MachineSnapshot| (s.mem_mib, s.vcpus.len(), s.devices.len());
    let mut newest = None;
    for seq in 1..n {
        let s = read_state(dir, seq)?;
        if shape(&s) != shape(&base) {
            let (m, v, d) = shape(&s);
            return Err(SnapshotError::Mismatch {
                path: state_path(dir, seq),
                what: format!("{m} MiB, {v} vCPUs and {d} devices"),
            });
        }
        newest = Some(s);
    }
    Ok((newest.unwrap_or(base), n))
}

/// Fills `mem` from the base and all `n` snapshots' memory files, in
/// order, once every one of them is verified.
pub fn load_memory(dir: &Path, n: u32, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    // Verify all, then apply all: a damaged increment is found before the
    // base is applied (and each file is checked again as it is applied).
    for seq in 0..n {
        read_mem(&mem_path(dir, seq), seq, mem, false)?;
    }
    let mut pages = 0;
    for seq in 0..n {
        pages += read_mem(&mem_path(dir, seq), seq, mem, true)?;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("remora-snap-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn memory_files_round_trip_and_corruption_is_refused() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x1234u16, GuestAddress(0x80_0ff0)).unwrap();
        // Before anything reads the rest (a read maps the zero page, which
        // pagemap reports present: still correct, just not filtered).
        let populated = Staging::populated_pages(&mem);
        assert!(
            populated.contains(&0x5000) && populated.contains(&0x80_0000),
            "{populated:x?}"
        );
        // Transparent huge pages may populate 2 MiB at a time.
        assert!(
            populated.len() <= 1024,
            "untouched pages reported populated: {}",
            populated.len()
        );
        let staged = Staging::copy(&mem, &Staging::all_pages(&mem), true);
        assert_eq!(staged.pages, vec![0x5000, 0x80_0000], "only non-zero pages");
        let d = dir("mem");
        std::fs::create_dir_all(&d).unwrap();
        let path = mem_path(&d, 0);
        write_atomic(&path, |w| {
            let mut c = Crc(w, crc32fast::Hasher::new());
            c.write_all(&MEM_MAGIC)?;
            c.write_all(&MEM_VERSION.to_le_bytes())?;
            c.write_all(&0u32.to_le_bytes())?;
            c.write_all(&(staged.pages.len() as u64).to_le_bytes())?;
            for (i, gpa) in staged.pages.iter().enumerate() {
                c.write_all(&gpa.to_le_bytes())?;
                c.write_all(staged.page(i))?;
            }
            let crc = c.1.finalize();
            w.write_all(&crc.to_le_bytes())
        })
        .unwrap();
        let fresh = crate::memory::create_guest_memory(16).unwrap();
        assert_eq!(apply_mem(&path, 0, &fresh).unwrap(), 2);
        assert_eq!(fresh.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xdead_beef);
        assert_eq!(fresh.read_obj::<u16>(GuestAddress(0x80_0ff0)).unwrap(), 0x1234);
        // A flipped bit or a torn tail: refused, and nothing applied.
        let good = std::fs::read(&path).unwrap();
        for (i, cut) in [(100usize, false), (good.len() - 2, true)] {
            let mut bad = good.clone();
            if cut {
                bad.truncate(i);
            } else {
                bad[i] ^= 1;
            }
            std::fs::write(&path, &bad).unwrap();
            let target = crate::memory::create_guest_memory(16).unwrap();
            assert!(apply_mem(&path, 0, &target).is_err());
            assert_eq!(
                target.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
                0,
                "corrupt file applied"
            );
        }
        assert!(matches!(
            apply_mem(&path, 1, &fresh),
            Err(SnapshotError::MemHeader { .. })
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Writes a chain of `n` snapshots of a 16 MiB guest into a fresh
    /// directory: snapshot `i` holds page `0x10000 * (i + 1)` filled with
    /// `i + 1`.
    fn chain(tag: &str, n: u32) -> (PathBuf, GuestMemoryMmap) {
        let d = dir(tag);
        let mem = crate::memory::create_guest_memory(16).unwrap();
        for seq in 0..n {
            let gpa = 0x10000 * u64::from(seq + 1);
            mem.write_slice(&[seq as u8 + 1; P], GuestAddress(gpa)).unwrap();
            let state = MachineSnapshot {
                seq,
                mem_mib: 16,
                vcpus: Vec::new(),
                vm: VmState {
                    pit: Default::default(),
                    clock: Default::default(),
                    pic_master: Default::default(),
                    pic_slave: Default::default(),
                    ioapic: Default::default(),
                },
                serial: SerialSnap::default(),
                devices: Vec::new(),
            };
            write(&d, &state, &Staging::copy(&mem, &[gpa], false)).unwrap();
        }
        (d, mem)
    }

    /// Restores `d` into `mem`, as `Vmm::restore` does.
    fn restore_into(d: &Path, mem: &GuestMemoryMmap) -> Result<u32, SnapshotError> {
        let (state, n) = latest(d)?;
        assert_eq!(state.seq, n - 1);
        load_memory(d, n, mem)?;
        Ok(n)
    }

    fn restore(d: &Path) -> Result<(u32, GuestMemoryMmap), SnapshotError> {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        Ok((restore_into(d, &mem)?, mem))
    }

    fn page_byte(mem: &GuestMemoryMmap, seq: u32) -> u8 {
        mem.read_obj(GuestAddress(0x10000 * u64::from(seq + 1))).unwrap()
    }

    /// The error of restoring `d`, which must name `file` and come before
    /// any page is applied.
    fn refused(d: &Path, file: &str) -> String {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let e = match restore_into(d, &mem) {
            Ok(n) => panic!("restored {n} snapshots from a damaged chain"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&d.join(file).display().to_string()),
            "'{e}' does not name {file}"
        );
        for seq in 0..3 {
            assert_eq!(page_byte(&mem, seq), 0, "pages applied before the error: {e}");
        }
        e
    }

    #[test]
    fn a_whole_chain_restores() {
        let (d, _) = chain("whole", 3);
        let (n, mem) = restore(&d).unwrap();
        assert_eq!(n, 3);
        for seq in 0..3 {
            assert_eq!(page_byte(&mem, seq), seq as u8 + 1);
        }
        // A .mem without its .state after the chain is a write cut short;
        // temporary files and other names are not part of the chain.
        std::fs::copy(mem_path(&d, 2), mem_path(&d, 3)).unwrap();
        std::fs::create_dir(d.join("0004.tmp")).unwrap();
        std::fs::write(d.join("notes.txt"), b"x").unwrap();
        assert_eq!(restore(&d).unwrap().0, 3);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_gap_in_the_chain_is_refused() {
        let (d, _) = chain("gap", 3);
        std::fs::remove_file(state_path(&d, 1)).unwrap();
        let e = refused(&d, "0001.state");
        assert!(e.contains("gap"), "{e}");
        // Nor is a lone .mem past the end of the chain accepted.
        let (d2, _) = chain("gap2", 2);
        std::fs::copy(mem_path(&d2, 1), mem_path(&d2, 5)).unwrap();
        refused(&d2, "0005.mem");
        for d in [d, d2] {
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    #[test]
    fn a_missing_mem_is_refused() {
        let (d, _) = chain("nomem", 3);
        std::fs::remove_file(mem_path(&d, 1)).unwrap();
        let e = refused(&d, "0001.mem");
        assert!(e.contains("is missing"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn symlinks_and_devices_are_refused_without_reading_them() {
        use std::os::unix::fs::symlink;
        // A symlink loop.
        let (d, _) = chain("loop", 3);
        std::fs::remove_file(state_path(&d, 2)).unwrap();
        symlink("0002.state", state_path(&d, 2)).unwrap();
        let e = refused(&d, "0002.state");
        assert!(e.contains("not a regular file"), "{e}");
        // A symlink to an endless file: refused before it is read.
        for (i, file) in ["0001.mem", "0001.state"].into_iter().enumerate() {
            let (d, _) = chain(&format!("zero{i}"), 2);
            std::fs::remove_file(d.join(file)).unwrap();
            symlink("/dev/zero", d.join(file)).unwrap();
            refused(&d, file);
            // Also when asked for the file directly (no listing first).
            let direct = if i == 0 {
                read_mem(
                    &d.join(file),
                    1,
                    &crate::memory::create_guest_memory(16).unwrap(),
                    false,
                )
                .map(|_| ())
            } else {
                read_state(&d, 1).map(|_| ())
            };
            assert!(matches!(direct, Err(SnapshotError::NotRegular { .. })), "{direct:?}");
            let _ = std::fs::remove_dir_all(&d);
        }
        // A FIFO would block a plain reader forever.
        let fifo = state_path(&d, 2);
        std::fs::remove_file(&fifo).unwrap();
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        refused(&d, "0002.state");
        assert!(matches!(read_state(&d, 2), Err(SnapshotError::NotRegular { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn padded_or_trailing_bytes_are_refused() {
        for (i, file) in ["0000.state", "0001.state", "0001.mem"].into_iter().enumerate() {
            let (d, _) = chain(&format!("trail{i}"), 2);
            let path = d.join(file);
            let good = std::fs::read(&path).unwrap();
            let mut long = good.clone();
            long.extend_from_slice(b"extra");
            std::fs::write(&path, &long).unwrap();
            let e = refused(&d, file);
            assert!(e.contains("trailing bytes"), "{e}");
            // Padded (sparse) to 4 GiB: refused at once, not read.
            let t = std::time::Instant::now();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(4 << 30)
                .unwrap();
            refused(&d, file);
            assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
            // Short by a byte.
            std::fs::write(&path, &good[..good.len() - 1]).unwrap();
            refused(&d, file);
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    #[test]
    fn damage_to_an_older_snapshot_is_found_before_anything_is_applied() {
        // A flipped bit in the base's state (not the newest).
        let (d, _) = chain("oldstate", 3);
        let path = state_path(&d, 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = refused(&d, "0000.state");
        assert!(e.contains("checksum"), "{e}");
        // A state that says it is another snapshot.
        std::fs::copy(state_path(&d, 2), &path).unwrap();
        let e = refused(&d, "0000.state");
        assert!(e.contains("number 2, expected 0"), "{e}");
        let _ = std::fs::remove_dir_all(&d);

        // A flipped bit in an increment's pages: the base is not applied.
        let (d, _) = chain("oldmem", 3);
        let path = mem_path(&d, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_, n) = latest(&d).unwrap();
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let e = load_memory(&d, n, &mem).unwrap_err().to_string();
        assert!(e.contains("0001.mem") && e.contains("checksum"), "{e}");
        assert_eq!(
            page_byte(&mem, 0),
            0,
            "the base was applied before the chain was verified"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
