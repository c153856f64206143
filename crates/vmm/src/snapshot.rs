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
}

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

/// Applies one memory file to `mem`; returns the number of pages.
fn apply_mem(path: &Path, seq: u32, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut crc = crc32fast::Hasher::new();
    let mut hdr = [0u8; 24];
    r.read_exact(&mut hdr)
        .map_err(|_| SnapshotError::MemHeader { path: path.into() })?;
    crc.update(&hdr);
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if hdr[..8] != MEM_MAGIC || u32_at(&hdr, 8) != MEM_VERSION || u32_at(&hdr, 12) != seq {
        return Err(SnapshotError::MemHeader { path: path.into() });
    }
    let mut cnt = [0u8; 8];
    cnt.copy_from_slice(&hdr[16..24]);
    let count = u64::from_le_bytes(cnt);
    // The size must match before anything is applied: a torn file is refused whole.
    if count.checked_mul(8 + PAGE_SIZE).and_then(|b| b.checked_add(24 + 4)) != Some(len) {
        return Err(SnapshotError::MemChecksum { path: path.into() });
    }
    // Verify first, then apply: read twice rather than apply a corrupt file.
    let mut rec = vec![0u8; 8 + PAGE_SIZE as usize];
    for _ in 0..count {
        r.read_exact(&mut rec).map_err(io_err(path))?;
        crc.update(&rec);
    }
    let mut tail = [0u8; 4];
    r.read_exact(&mut tail).map_err(io_err(path))?;
    if crc.finalize() != u32::from_le_bytes(tail) {
        return Err(SnapshotError::MemChecksum { path: path.into() });
    }
    let f = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    r.read_exact(&mut hdr).map_err(io_err(path))?;
    for _ in 0..count {
        r.read_exact(&mut rec).map_err(io_err(path))?;
        let mut g = [0u8; 8];
        g.copy_from_slice(&rec[..8]);
        let gpa = u64::from_le_bytes(g);
        mem.write_slice(&rec[8..], GuestAddress(gpa))
            .map_err(|_| SnapshotError::PageOutside { path: path.into(), gpa })?;
    }
    Ok(count)
}

/// Reads the state file `seq` of `dir`.
pub fn read_state(dir: &Path, seq: u32) -> Result<MachineSnapshot, SnapshotError> {
    let path = state_path(dir, seq);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let s: MachineSnapshot = format::decode(STATE_KIND, &bytes).map_err(|error| SnapshotError::Format {
        path: path.clone(),
        error,
    })?;
    if s.seq != seq {
        return Err(SnapshotError::Sequence {
            path,
            found: s.seq,
            expected: seq,
        });
    }
    Ok(s)
}

/// The newest snapshot's state and the number of snapshots in `dir`.
pub fn latest(dir: &Path) -> Result<(MachineSnapshot, u32), SnapshotError> {
    let n = next_seq(dir);
    if n == 0 {
        return Err(SnapshotError::NoBase(dir.into()));
    }
    Ok((read_state(dir, n - 1)?, n))
}

/// Fills `mem` from the base and all `n` snapshots' memory files, in order.
pub fn load_memory(dir: &Path, n: u32, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    let mut pages = 0;
    for seq in 0..n {
        pages += apply_mem(&mem_path(dir, seq), seq, mem)?;
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
}
