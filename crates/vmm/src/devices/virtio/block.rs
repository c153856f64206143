//! virtio-blk on a raw image file: read, write, flush (durable before it
//! completes), get-id. Requests outside the disk or writes to a read-only
//! disk complete with VIRTIO_BLK_S_IOERR, never a VMM failure.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::*;

pub const TYPE_BLOCK: u32 = 2;
const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_FLUSH: u32 = 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const ID_LEN: usize = 20;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {error}")]
    Open { path: PathBuf, error: std::io::Error },
    #[error("disk {path} is empty (0 bytes); create it first, e.g. truncate -s 1G {path}")]
    Empty { path: PathBuf },
}

/// A guest write, logged for replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The guest's writes to a disk since the last [`WriteLog::take`], while
/// logging is on (a protected VM): the replication driver ships each
/// epoch's writes with its checkpoint and the backup applies them only
/// when the checkpoint is complete. The write itself goes to the disk at
/// once, as without logging.
#[derive(Default)]
pub struct WriteLog {
    log: std::sync::Mutex<Option<Vec<DiskWrite>>>,
    /// Bytes logged since the last take.
    bytes: std::sync::atomic::AtomicU64,
}

/// Bytes of guest writes one checkpoint carries per disk at most: beyond
/// it the guest's disk writes wait for the next checkpoint.
pub const WRITE_LOG_LIMIT: u64 = 16 << 20;

impl WriteLog {
    /// Whether the log holds [`WRITE_LOG_LIMIT`] bytes or more.
    pub fn is_full(&self) -> bool {
        self.bytes.load(std::sync::atomic::Ordering::Acquire) >= WRITE_LOG_LIMIT
    }

    /// Starts logging (drops anything logged before).
    pub fn start(&self) {
        *crate::devices::lock(&self.log) = Some(Vec::new());
    }

    /// Stops logging and drops the log.
    pub fn stop(&self) {
        *crate::devices::lock(&self.log) = None;
        self.bytes.store(0, std::sync::atomic::Ordering::Release);
    }

    /// The writes logged since the last call (logging goes on).
    pub fn take(&self) -> Vec<DiskWrite> {
        let mut g = crate::devices::lock(&self.log);
        self.bytes.store(0, std::sync::atomic::Ordering::Release);
        match &mut *g {
            Some(v) => std::mem::take(v),
            None => Vec::new(),
        }
    }

    fn record(&self, offset: u64, data: Vec<u8>) {
        if let Some(v) = &mut *crate::devices::lock(&self.log) {
            self.bytes
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::AcqRel);
            v.push(DiskWrite { offset, data });
        }
    }
}

/// The disk model and its worker.
pub struct Block {
    file: Arc<File>,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_LEN],
    worker: Option<(JoinHandle<()>, Arc<worker::WorkerCtl>)>,
    log: Arc<WriteLog>,
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|error| BlockError::Open {
                path: path.into(),
                error,
            })?;
        let len = file
            .metadata()
            .map_err(|error| BlockError::Open {
                path: path.into(),
                error,
            })?
            .len();
        if len < SECTOR {
            return Err(BlockError::Empty { path: path.into() });
        }
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Block {
            file: Arc::new(file),
            read_only,
            sectors: len / SECTOR,
            id,
            worker: None,
            log: Arc::new(WriteLog::default()),
        })
    }

    /// The disk's write log (off until started).
    pub fn write_log(&self) -> Arc<WriteLog> {
        self.log.clone()
    }

    /// Size in bytes (whole sectors).
    pub fn size_bytes(&self) -> u64 {
        self.sectors * SECTOR
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The id the guest reads (VIRTIO_BLK_T_GET_ID).
    pub fn id(&self) -> [u8; ID_LEN] {
        self.id
    }

    /// Presents another id (a backup presents the primary's).
    pub fn set_id(&mut self, id: [u8; ID_LEN]) {
        self.id = id;
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}

/// One request's outcome: the head to return and the bytes written into
/// the driver's buffers.
pub struct Completion {
    pub head: u16,
    pub len: u32,
}

/// Executes one request chain against the disk.
pub fn process_request(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    file: &File,
    read_only: bool,
    sectors: u64,
    id: &[u8; ID_LEN],
    log: &WriteLog,
) -> Completion {
    let head = chain.head_index();
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => return Completion { head, len: 0 },
    };
    let writable = writer.available_bytes();
    if writable == 0 {
        // No room for a status byte: nothing can be reported.
        return Completion { head, len: 0 };
    }
    let mut status_w = match writer.split_at(writable - 1) {
        Ok(s) => s,
        Err(_) => return Completion { head, len: 0 },
    };
    let mut hdr = [0u8; 16];
    let status = if reader.read_exact(&mut hdr).is_err() {
        S_IOERR
    } else {
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let in_range = |len: usize| -> Option<u64> {
            let len = len as u64;
            let off = sector.checked_mul(SECTOR)?;
            (off.checked_add(len)? <= sectors * SECTOR && len.is_multiple_of(SECTOR)).then_some(off)
        };
        match kind {
            T_IN => match in_range(writer.available_bytes()) {
                Some(off) => {
                    let mut buf = vec![0u8; writer.available_bytes()];
                    if file.read_exact_at(&mut buf, off).is_ok() && writer.write_all(&buf).is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                None => S_IOERR,
            },
            T_OUT => match in_range(reader.available_bytes()) {
                Some(_) if read_only => S_IOERR,
                Some(off) => {
                    let mut buf = vec![0u8; reader.available_bytes()];
                    if reader.read_exact(&mut buf).is_ok() && file.write_all_at(&buf, off).is_ok() {
                        log.record(off, buf);
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                None => S_IOERR,
            },
            T_FLUSH if read_only => S_OK,
            T_FLUSH => {
                if file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                if writer.write_all(&id[..n]).is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            _ => S_UNSUPP,
        }
    };
    let _ = status_w.write_all(&[status]);
    Completion {
        head,
        len: (writer.bytes_written() + 1) as u32,
    }
}

/// Pops and executes every available request; returns whether the driver
/// must be interrupted.
pub fn drain_queue(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    file: &File,
    read_only: bool,
    sectors: u64,
    id: &[u8; ID_LEN],
    log: &WriteLog,
) -> bool {
    loop {
        if q.disable_notification(mem).is_err() {
            return false;
        }
        let chains: Vec<_> = match q.iter(mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                tracing::warn!("virtio-blk: bad avail ring: {e:?}");
                return false;
            }
        };
        for chain in chains {
            let c = process_request(mem, chain, file, read_only, sectors, id, log);
            if let Err(e) = q.add_used(mem, c.head, c.len) {
                tracing::warn!("virtio-blk: used ring: {e:?}");
            }
        }
        match q.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    q.needs_notification(mem).unwrap_or(true)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << F_FLUSH) | (1 << F_SEG_MAX);
        if self.read_only {
            f |= 1 << F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, mut act: Activation) -> Result<(), String> {
        let (mut q, evt) = act.queues.pop().ok_or("virtio-blk needs one queue")?;
        let ctl = Arc::new(worker::WorkerCtl::new().map_err(|e| e.to_string())?);
        let (file, ro, sectors, id, log) = (
            self.file.clone(),
            self.read_only,
            self.sectors,
            self.id,
            self.log.clone(),
        );
        let (mem, interrupt, ctl2) = (act.mem, act.interrupt, ctl.clone());
        let t = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || {
                // Marks the worker dead however the thread ends.
                let _alive = ctl2.alive("virtio-blk");
                // Requests the guest posted while the write log was full.
                let mut deferred = false;
                loop {
                    if log.is_full() {
                        // Replication is behind: the guest's writes wait
                        // for the next checkpoint to take the log (its
                        // pause wakes this worker), so the log and the
                        // checkpoints stay bounded.
                        deferred |= wait_readable_for(&evt, &ctl2.wake, 5);
                    } else {
                        let kicked = deferred || wait_readable(&evt, &ctl2.wake);
                        deferred = false;
                        if kicked && drain_queue(&mut q, &mem, &file, ro, sectors, &id, &log) {
                            interrupt.signal_used();
                        }
                    }
                    if !ctl2.checkpoint(&[&q]) {
                        return;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        self.worker = Some((t, ctl));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some((t, ctl)) = self.worker.take() {
            ctl.stop();
            let _ = t.join();
        }
        true
    }

    fn worker(&self) -> Option<&worker::WorkerCtl> {
        self.worker.as_ref().map(|(_, ctl)| &**ctl)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Blocks until `evt` (consumed) or `wake` fires; true if `evt` fired.
fn wait_readable(evt: &EventFd, wake: &EventFd) -> bool {
    wait_readable_for(evt, wake, -1)
}

/// [`wait_readable`] for at most `timeout_ms` (-1: forever).
fn wait_readable_for(evt: &EventFd, wake: &EventFd, timeout_ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs for the call's duration.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if n <= 0 {
        return false;
    }
    if fds[0].revents & libc::POLLIN != 0 {
        let _ = evt.read();
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const VRING_DESC_F_WRITE: u16 = 2;

    struct Disk {
        path: PathBuf,
    }
    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
    fn disk(name: &str, sectors: u64) -> Disk {
        let path = std::env::temp_dir().join(format!("remora-blk-{}-{name}", std::process::id()));
        let data: Vec<u8> = (0..sectors * SECTOR).map(|i| (i / SECTOR) as u8).collect();
        std::fs::write(&path, data).unwrap();
        Disk { path }
    }

    /// Submits one request (header, data buffer, status) through a real
    /// split queue and returns (status, used len, data buffer contents).
    fn request(blk: &Block, kind: u32, sector: u64, data: &[u8], device_writes_data: bool) -> (u8, u32, Vec<u8>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(data, GuestAddress(0x2_0000)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(0x1_0000, 16, 0, 0))];
        if !data.is_empty() {
            let f = if device_writes_data { VRING_DESC_F_WRITE } else { 0 };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                0x2_0000,
                data.len() as u32,
                f,
                0,
            )));
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            0x3_0000,
            1,
            VRING_DESC_F_WRITE,
            0,
        )));
        vq.build_desc_chain(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        drain_queue(&mut q, &mem, &blk.file, blk.read_only, blk.sectors, &blk.id, &blk.log);
        assert_eq!(q.next_used(), 1, "request not completed");
        let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        let status: u8 = mem.read_obj(GuestAddress(0x3_0000)).unwrap();
        let mut buf = vec![0u8; data.len()];
        mem.read_slice(&mut buf, GuestAddress(0x2_0000)).unwrap();
        (status, used_len, buf)
    }

    use vm_memory::Address;

    #[test]
    fn read_write_flush_get_id() {
        let d = disk("rw", 8);
        let blk = Block::open(&d.path, false).unwrap();
        let (s, len, buf) = request(&blk, T_IN, 2, &[0u8; 1024], true);
        assert_eq!((s, len), (S_OK, 1025));
        assert!(buf[..512].iter().all(|b| *b == 2) && buf[512..].iter().all(|b| *b == 3));
        let (s, len, _) = request(&blk, T_OUT, 7, &[0xab; 512], false);
        assert_eq!((s, len), (S_OK, 1));
        assert!(std::fs::read(&d.path).unwrap()[7 * 512..].iter().all(|b| *b == 0xab));
        assert_eq!(request(&blk, T_FLUSH, 0, &[], false).0, S_OK);
        let (s, _, id) = request(&blk, T_GET_ID, 0, &[0u8; 20], true);
        assert_eq!(s, S_OK);
        assert!(String::from_utf8_lossy(&id).starts_with("remora-blk-"));
    }

    #[test]
    fn out_of_range_readonly_and_unknown_get_error_status() {
        let d = disk("err", 8);
        let blk = Block::open(&d.path, false).unwrap();
        assert_eq!(request(&blk, T_IN, 7, &[0u8; 1024], true).0, S_IOERR, "past the end");
        assert_eq!(
            request(&blk, T_OUT, u64::MAX / 4, &[0u8; 512], false).0,
            S_IOERR,
            "overflow"
        );
        assert_eq!(request(&blk, 99, 0, &[], false).0, S_UNSUPP);
        let ro = Block::open(&d.path, true).unwrap();
        assert_ne!(ro.features() & (1 << F_RO), 0);
        assert_eq!(request(&ro, T_OUT, 0, &[1u8; 512], false).0, S_IOERR);
        assert!(
            std::fs::read(&d.path).unwrap()[..512].iter().all(|b| *b == 0),
            "read-only disk written"
        );
    }

    #[test]
    fn missing_and_empty_disks_are_clear_errors() {
        let e = Block::open(Path::new("/nonexistent/disk.img"), false).err().unwrap();
        assert!(e.to_string().contains("cannot open disk /nonexistent/disk.img"));
        let d = disk("empty", 0);
        let e = Block::open(&d.path, false).err().unwrap();
        assert!(e.to_string().contains("is empty"));
    }
}
