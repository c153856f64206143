//! virtio-net on a TAP with virtio-net headers: checksum and TSO offloads
//! both ways, mergeable receive buffers, event-driven (epoll on the queue
//! eventfds and the TAP), no busy polling.
//!
//! Frames the guest hands over are never dropped while the TAP exists: if
//! the TAP cannot take a frame (full, or down), the descriptor stays in
//! the ring and is retried. Frames from the TAP wait in the kernel's queue
//! while the guest has no receive buffers.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::commit::{EnginePort, OutputCommit};
use super::*;
use crate::devices::tap::{self, VNET_HDR_LEN};

pub const TYPE_NET: u32 = 1;
const QUEUE_SIZE: u16 = 256;
const F_CSUM: u32 = 0;
const F_GUEST_CSUM: u32 = 1;
const F_MAC: u32 = 5;
const F_GUEST_TSO4: u32 = 7;
const F_GUEST_TSO6: u32 = 8;
const F_GUEST_ECN: u32 = 9;
const F_HOST_TSO4: u32 = 11;
const F_HOST_TSO6: u32 = 12;
const F_MRG_RXBUF: u32 = 15;
const F_STATUS: u32 = 16;
const LINK_UP: u16 = 1;
/// Largest frame: vnet header + 64 KiB TSO segment + Ethernet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// How long to wait before retrying a TAP that refused a frame (down).
const TX_RETRY_MS: i32 = 10;

/// Where frames go: a TAP in production, a socketpair in tests.
pub trait FrameIo: Send {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
    fn raw_fd(&self) -> RawFd;
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// A `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("tap", v)) => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(parse_mac(v)?),
                _ => return Err(format!("unknown --net option '{kv}' (expected tap=NAME[,mac=MAC])")),
            }
        }
        let tap = tap.ok_or("--net needs tap=NAME")?;
        let mac = mac.unwrap_or_else(|| default_mac(&tap));
        Ok(NetConfig { tap, mac })
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("bad MAC address '{s}' (expected six hex bytes like 52:54:00:12:34:56)");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address '{s}' is a multicast address"));
    }
    Ok(mac)
}

/// A locally administered MAC derived from the TAP name (stable per TAP).
pub fn default_mac(tap: &str) -> [u8; 6] {
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// The device model.
pub struct Net {
    io: Option<Box<dyn FrameIo>>,
    mac: [u8; 6],
    worker: Option<(JoinHandle<()>, Arc<worker::WorkerCtl>)>,
    /// Output commit's handle (the engine runs in the worker, if any).
    commit: Arc<OutputCommit>,
    /// The engine to start the device with.
    output: Option<OutputSetup>,
}

/// An engine a device starts with.
pub struct OutputSetup {
    /// A fresh engine, or one restored from a checkpoint.
    pub engine: remora_speculate::Engine,
    /// The engine's clock when the device starts (its time at the
    /// checkpoint for a restored engine, else zero).
    pub now: std::time::Duration,
    /// Announce the guest's MAC when the device starts (after a failover).
    pub announce: bool,
}

impl Net {
    /// Opens the TAP now, so a bad name is reported before boot.
    pub fn open(cfg: &NetConfig) -> Result<Net, tap::TapError> {
        let io = Box::new(tap::Tap::open(&cfg.tap)?);
        Net::with_io(io, cfg.mac).map_err(|e| tap::TapError::Configure {
            name: cfg.tap.clone(),
            what: "eventfd",
            error: e,
        })
    }

    pub fn with_io(io: Box<dyn FrameIo>, mac: [u8; 6]) -> io::Result<Net> {
        Ok(Net {
            io: Some(io),
            mac,
            worker: None,
            commit: Arc::new(OutputCommit::new()?),
            output: None,
        })
    }

    /// The device's output-commit handle.
    pub fn output_commit(&self) -> Arc<OutputCommit> {
        self.commit.clone()
    }

    /// Puts the speculative engine between this device and its TAP (before
    /// the device is activated).
    pub fn set_output_commit(&mut self, setup: OutputSetup) {
        self.output = Some(setup);
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_RING_EVENT_IDX,
            F_CSUM,
            F_GUEST_CSUM,
            F_MAC,
            F_GUEST_TSO4,
            F_GUEST_TSO6,
            F_GUEST_ECN,
            F_HOST_TSO4,
            F_HOST_TSO6,
            F_MRG_RXBUF,
            F_STATUS,
        ]
        .iter()
        .fold(0u64, |f, b| f | (1 << b))
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }

    fn activate(&mut self, act: Activation) -> Result<(), String> {
        let mut io = self.io.take().ok_or("virtio-net activated twice without reset")?;
        let f = act.acked_features;
        let has = |b: u32| f & (1 << b) != 0;
        let mut offload = 0;
        if has(F_GUEST_CSUM) {
            offload |= tap::TUN_F_CSUM;
            if has(F_GUEST_TSO4) {
                offload |= tap::TUN_F_TSO4;
            }
            if has(F_GUEST_TSO6) {
                offload |= tap::TUN_F_TSO6;
            }
            if has(F_GUEST_ECN) {
                offload |= tap::TUN_F_TSO_ECN;
            }
        }
        io.set_offload(offload).map_err(|e| e.to_string())?;
        let mut queues = act.queues.into_iter();
        let (rx, rx_evt) = queues.next().ok_or("virtio-net needs an RX queue")?;
        let (tx, tx_evt) = queues.next().ok_or("virtio-net needs a TX queue")?;
        let ctl = Arc::new(worker::WorkerCtl::new().map_err(|e| e.to_string())?);
        let ctl2 = ctl.clone();
        let mut w = NetWorker::new(act.mem, rx, tx, io, act.interrupt, has(F_MRG_RXBUF));
        if let Some(setup) = self.output.take() {
            let mut port = EnginePort::new(setup.engine, self.commit.clone(), self.mac, setup.now);
            if setup.announce {
                port.start_announce();
            }
            w.port = Some(port);
        } else if let Some(engine) = self.commit.take_install() {
            w.port = Some(EnginePort::new(
                engine,
                self.commit.clone(),
                self.mac,
                Default::default(),
            ));
        }
        w.commit = Some((self.commit.clone(), self.mac));
        let t = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || {
                // Marks the worker dead however the thread ends.
                let _alive = ctl2.alive("virtio-net");
                if let Err(e) = w.run(&rx_evt, &tx_evt, &ctl2) {
                    tracing::error!("virtio-net worker stopped: {e}");
                }
            })
            .map_err(|e| e.to_string())?;
        self.worker = Some((t, ctl));
        Ok(())
    }

    fn worker(&self) -> Option<&worker::WorkerCtl> {
        self.worker.as_ref().map(|(_, ctl)| &**ctl)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some((t, ctl)) = self.worker.take() {
            ctl.stop();
            let _ = t.join();
        }
    }
}

/// Outcome of pushing the TX ring to the TAP.
#[derive(Debug, PartialEq, Eq)]
pub enum TxState {
    /// Ring empty.
    Idle,
    /// The TAP is full: wait for it to be writable.
    Full,
    /// The TAP refuses frames (down): retry after a while.
    Down,
}

/// The device's data path, separate from its thread for testing.
pub struct NetWorker {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub io: Box<dyn FrameIo>,
    pub interrupt: Arc<Interrupt>,
    pub mergeable: bool,
    rx_frame: Vec<u8>,
    /// Length of a frame read from the TAP but not yet delivered.
    rx_pending: usize,
    tx_frame: Vec<u8>,
    /// Output commit, if the device has it.
    pub port: Option<EnginePort>,
    /// The device's output-commit handle (an engine may be installed
    /// through it while the device runs) and MAC.
    pub commit: Option<(Arc<OutputCommit>, [u8; 6])>,
}

const EV_RX: u64 = 1;
const EV_TX: u64 = 2;
const EV_IO: u64 = 3;
const EV_CTL: u64 = 4;
const EV_COMMIT: u64 = 5;
/// TAP frames read per pass when the engine is on the path.
const TAP_BATCH: usize = 64;

impl NetWorker {
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        io: Box<dyn FrameIo>,
        irq: Arc<Interrupt>,
        mergeable: bool,
    ) -> Self {
        NetWorker {
            mem,
            rx,
            tx,
            io,
            interrupt: irq,
            mergeable,
            rx_frame: vec![0u8; MAX_FRAME],
            rx_pending: 0,
            tx_frame: Vec::with_capacity(MAX_FRAME),
            port: None,
            commit: None,
        }
    }

    fn run(&mut self, rx_evt: &EventFd, tx_evt: &EventFd, ctl: &worker::WorkerCtl) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let ep = Epoll::new()?;
        ep.ctl(
            ControlOperation::Add,
            rx_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EV_RX),
        )?;
        ep.ctl(
            ControlOperation::Add,
            tx_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EV_TX),
        )?;
        ep.ctl(
            ControlOperation::Add,
            ctl.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EV_CTL),
        )?;
        if let Some((c, _)) = &self.commit {
            ep.ctl(
                ControlOperation::Add,
                c.wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, EV_COMMIT),
            )?;
        }
        let io_fd = self.io.raw_fd();
        let mut io_events = EventSet::IN;
        ep.ctl(ControlOperation::Add, io_fd, EpollEvent::new(io_events, EV_IO))?;
        let mut events = vec![EpollEvent::default(); 8];
        let mut tx_state = TxState::Idle;
        loop {
            let mut timeout = if tx_state == TxState::Down { TX_RETRY_MS } else { -1 };
            if let Some(port) = &self.port {
                let t = port.timeout_ms();
                if t >= 0 && (timeout < 0 || t < timeout) {
                    timeout = t;
                }
            }
            let n = match ep.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut do_rx = false;
            let mut do_tx = tx_state == TxState::Down && n == 0;
            for ev in &events[..n] {
                match ev.data() {
                    EV_CTL => {
                        if let Some(port) = &mut self.port {
                            // A checkpoint's pause: everything the guest
                            // handed over so far belongs to the sealed
                            // epoch. Only when the worker is about to park:
                            // a stale wake-up must not end the epoch early.
                            if ctl.pause_requested() {
                                port.seal_if_requested();
                            }
                        }
                        if !ctl.checkpoint(&[&self.rx, &self.tx]) {
                            return Ok(());
                        }
                    }
                    EV_COMMIT => {
                        if let Some((c, mac)) = &self.commit {
                            let _ = c.wake.read();
                            if self.port.is_none() {
                                if let Some(engine) = c.take_install() {
                                    self.port = Some(EnginePort::new(engine, c.clone(), *mac, Default::default()));
                                }
                            }
                        }
                        do_rx = true;
                    }
                    EV_RX => {
                        let _ = rx_evt.read();
                        do_rx = true;
                    }
                    EV_TX => {
                        let _ = tx_evt.read();
                        do_tx = true;
                    }
                    _ => {
                        if ev.event_set().contains(EventSet::OUT) {
                            do_tx = true;
                        }
                        if ev.event_set().contains(EventSet::IN) {
                            do_rx = true;
                        }
                    }
                }
            }
            if do_tx {
                tx_state = self.process_tx();
            }
            let mut rx_blocked = false;
            if self.port.is_some() {
                // Timers, commits and the engine's output run on every pass.
                rx_blocked = self.process_engine(do_rx);
                // Frames held by an expired output lease wait for its
                // renewal (a wake-up), not for TAP writability.
                if self
                    .port
                    .as_ref()
                    .is_some_and(|p| !p.to_tap.is_empty() && p.ctl.may_emit())
                {
                    tx_state = TxState::Full;
                } else if tx_state == TxState::Full {
                    tx_state = TxState::Idle;
                }
            } else if do_rx {
                rx_blocked = self.process_rx();
            }
            // Listen for TAP input only while there is somewhere to put it,
            // and for TAP writability only while frames wait.
            let mut want = EventSet::empty();
            if !rx_blocked {
                want |= EventSet::IN;
            }
            if tx_state == TxState::Full {
                want |= EventSet::OUT;
            }
            if want != io_events {
                ep.ctl(ControlOperation::Modify, io_fd, EpollEvent::new(want, EV_IO))?;
                io_events = want;
            }
        }
    }

    /// Sends every frame in the TX ring; returns why it stopped.
    pub fn process_tx(&mut self) -> TxState {
        let mut used = false;
        let state = loop {
            let _ = self.tx.disable_notification(&self.mem);
            let mut state = TxState::Idle;
            while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                self.tx_frame.clear();
                let mut ok = true;
                for d in chain.readable() {
                    let start = self.tx_frame.len();
                    let len = d.len() as usize;
                    if start + len > MAX_FRAME {
                        ok = false;
                        break;
                    }
                    self.tx_frame.resize(start + len, 0);
                    if self.mem.read_slice(&mut self.tx_frame[start..], d.addr()).is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok && self.tx_frame.len() > VNET_HDR_LEN && self.port.is_some() {
                    if let Some(port) = &mut self.port {
                        port.from_guest(&mut self.tx_frame);
                    }
                } else if ok && self.tx_frame.len() > VNET_HDR_LEN {
                    match self.io.send(&self.tx_frame) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.tx.go_to_previous_position();
                            state = TxState::Full;
                            break;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                            self.tx.go_to_previous_position();
                            state = TxState::Down;
                            break;
                        }
                        Err(e) => tracing::warn!("virtio-net: frame dropped: {e}"),
                    }
                } else {
                    tracing::warn!("virtio-net: malformed TX chain dropped");
                }
                let _ = self.tx.add_used(&self.mem, head, 0);
                used = true;
            }
            if state != TxState::Idle {
                break state;
            }
            match self.tx.enable_notification(&self.mem) {
                Ok(true) => continue,
                _ => break TxState::Idle,
            }
        };
        if used && self.tx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
        state
    }

    /// With output commit: runs the engine's timers and commits, reads
    /// TAP frames into it (if `read_tap`), writes its output, and moves its
    /// frames for the guest into the RX ring. Returns true when the guest
    /// has no room and the TAP should not be read.
    pub fn process_engine(&mut self, read_tap: bool) -> bool {
        let Some(port) = &mut self.port else {
            return false;
        };
        if read_tap {
            for _ in 0..TAP_BATCH {
                if port.guest_backlogged() {
                    break;
                }
                match self.io.recv(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => port.from_tap(&mut self.rx_frame[..n]),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: TAP read: {e}");
                        break;
                    }
                }
            }
        }
        port.tick();
        port.drain(&mut *self.io);
        self.deliver_to_guest()
    }

    /// Moves the engine's frames for the guest into the RX ring; true if
    /// some are left for lack of buffers.
    fn deliver_to_guest(&mut self) -> bool {
        let Some(port) = &mut self.port else {
            return false;
        };
        let mut used = false;
        let blocked = loop {
            let Some(f) = port.to_guest.front_mut() else {
                break false;
            };
            if Self::deliver_rx(&mut self.rx, &self.mem, self.mergeable, f) {
                used = true;
                port.to_guest.pop_front();
            } else {
                match self.rx.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    _ => break true,
                }
            }
        };
        let backlogged = port.guest_backlogged();
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
        blocked || backlogged
    }

    /// Moves frames from the TAP into the RX ring until either is empty.
    /// Returns true when it stopped for lack of guest buffers.
    pub fn process_rx(&mut self) -> bool {
        let mut used = false;
        let blocked = loop {
            if self.rx_pending == 0 {
                match self.io.recv(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_pending = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: TAP read: {e}");
                        break false;
                    }
                }
            }
            let len = self.rx_pending;
            if Self::deliver_rx(&mut self.rx, &self.mem, self.mergeable, &mut self.rx_frame[..len]) {
                used = true;
                self.rx_pending = 0;
            } else {
                // Out of buffers: re-arm the guest's notification and, if
                // it added some meanwhile, try again.
                match self.rx.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    _ => break true,
                }
            }
        };
        if used && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
        blocked
    }

    /// Writes `frame` (vnet header included) into one chain (or several with mergeable
    /// buffers). Returns false, leaving the ring untouched, if the guest
    /// has not posted enough room.
    fn deliver_rx(rx: &mut Queue, mem: &GuestMemoryMmap, mergeable: bool, frame: &mut [u8]) -> bool {
        let len = frame.len();
        let mut chains: Vec<(u16, Vec<(GuestAddress, usize)>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let bufs: Vec<(GuestAddress, usize)> = chain.writable().map(|d| (d.addr(), d.len() as usize)).collect();
            room += bufs.iter().map(|b| b.1).sum::<usize>();
            chains.push((head, bufs));
            if !mergeable {
                break;
            }
        }
        if room < len {
            if !mergeable && !chains.is_empty() {
                // One buffer too small for this frame, and there will never
                // be a bigger one: drop the frame, return the buffer.
                tracing::warn!("virtio-net: RX buffer of {room} bytes too small for a {len}-byte frame");
                for (head, _) in &chains {
                    let _ = rx.add_used(mem, *head, 0);
                }
                return true;
            }
            for _ in &chains {
                rx.go_to_previous_position();
            }
            return false;
        }
        // num_buffers (offset 10 of virtio_net_hdr_v1).
        let nbuf = chains.len() as u16;
        frame[10..12].copy_from_slice(&nbuf.to_le_bytes());
        let mut off = 0;
        for (head, bufs) in &chains {
            let start = off;
            for (addr, blen) in bufs {
                if off == len {
                    break;
                }
                let n = (*blen).min(len - off);
                if mem.write_slice(&frame[off..off + n], *addr).is_err() {
                    tracing::warn!("virtio-net: RX buffer outside guest memory");
                }
                off += n;
            }
            let _ = rx.add_used(mem, *head, (off - start) as u32);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const WRITE: u16 = 2;

    struct Sock(UnixDatagram);
    impl FrameIo for Sock {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
            self.0.send(frame)
        }
        fn raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
        fn set_offload(&mut self, _: u32) -> io::Result<()> {
            Ok(())
        }
    }

    fn frame(n: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..n).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        f
    }

    #[test]
    fn tx_frames_reach_the_endpoint_intact() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let txq = MockSplitQueue::new(&mem, 16);
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let f = frame(3000, 1);
        // Header and payload in separate descriptors, as Linux does.
        mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(0x20_0000)).unwrap();
        txq.build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, VNET_HDR_LEN as u32, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 3000, 0, 0)),
        ])
        .unwrap();
        let mut w = NetWorker::new(
            mem.clone(),
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            Box::new(Sock(a)),
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
            true,
        );
        assert_eq!(w.process_tx(), TxState::Idle);
        let mut got = vec![0u8; 8000];
        let n = b.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(w.tx.next_used(), 1);
        assert_ne!(w.interrupt.status() & INT_VRING, 0);
    }

    #[test]
    fn rx_merges_buffers_and_waits_for_room() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rxq = MockSplitQueue::new(&mem, 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let mut w = NetWorker::new(
            mem.clone(),
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            Box::new(Sock(a)),
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
            true,
        );
        let f = frame(5000, 9);
        b.send(&f).unwrap();
        // No buffers yet: blocked, nothing consumed.
        assert!(w.process_rx());
        assert_eq!(w.rx.next_used(), 0);
        // Two 4 KiB buffers: the frame spans both, num_buffers = 2.
        rxq.build_multiple_desc_chains(&[
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 4096, WRITE, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 4096, WRITE, 0)),
        ])
        .unwrap();
        assert!(!w.process_rx());
        assert_eq!(w.rx.next_used(), 2);
        let mut got = vec![0u8; f.len()];
        mem.read_slice(&mut got[..4096], GuestAddress(0x10_0000)).unwrap();
        mem.read_slice(&mut got[4096..], GuestAddress(0x20_0000)).unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(&got[12..], &f[12..]);
    }

    #[test]
    fn net_options_parse() {
        let c: NetConfig = "tap=tap0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        let d: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(d.mac, default_mac("tap0"));
        assert!("mac=52:54:00:aa:bb:cc"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("tap=NAME"));
        assert!("tap=t,mac=01:00:00:00:00:00"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("tap=t,mac=zz".parse::<NetConfig>().unwrap_err().contains("bad MAC"));
        assert!("tap=t,speed=9"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("unknown --net option"));
    }
}
