//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::worker::QueueSnap;
use super::*;

/// A transport's registers and queues in a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportSnap {
    pub device_type: u32,
    pub features_select: u32,
    pub acked_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnap>,
}

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5245_4d4f; // "REMO"
const CONFIG_START: u64 = 0x100;
/// Offset of the QueueNotify register (an ioeventfd per queue watches it).
pub const QUEUE_NOTIFY: u64 = 0x50;

/// A device behind its MMIO registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irqfd` raises its interrupt line.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irqfd: EventFd) -> Result<Self, String> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| format!("queue: {e:?}"))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_evts,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Asks the device's worker to park soon (see
    /// [`VirtioDevice::request_pause`]); [`MmioTransport::pause`] waits.
    pub fn request_pause(&mut self) {
        if self.activated {
            self.device.request_pause();
        }
    }

    /// Parks the device's worker and returns the transport's state; the
    /// device stays parked until [`MmioTransport::resume`]. Fails if the
    /// device's worker thread has ended.
    pub fn pause(&mut self) -> Result<TransportSnap, String> {
        let live = if self.activated {
            self.device.pause().map_err(|e| {
                let kind = match self.device.device_type() {
                    1 => "virtio-net".to_string(),
                    2 => "virtio-blk".to_string(),
                    t => format!("virtio device type {t}"),
                };
                format!("{kind}: {e}")
            })?
        } else {
            None
        };
        let queues = live.unwrap_or_else(|| self.queues.iter().map(QueueSnap::of).collect());
        Ok(TransportSnap {
            device_type: self.device.device_type(),
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
        })
    }

    pub fn resume(&mut self) {
        if self.activated {
            self.device.resume();
        }
    }

    /// Rebuilds a transport around `device` from a snapshot; an active
    /// device is restarted on its saved queues and nudged (queue eventfds
    /// and an interrupt), so requests the guest posted meanwhile are seen.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
        snap: &TransportSnap,
    ) -> Result<Self, String> {
        if device.device_type() != snap.device_type {
            return Err(format!(
                "snapshot has a virtio device of type {} where the command line gives type {}",
                snap.device_type,
                device.device_type()
            ));
        }
        let mut t = MmioTransport::new(device, mem, irqfd)?;
        if snap.queues.len() != t.queues.len() {
            return Err("snapshot and device disagree on the number of queues".into());
        }
        t.queues = snap
            .queues
            .iter()
            .map(|q| q.to_queue())
            .collect::<Result<Vec<_>, _>>()?;
        t.features_select = snap.features_select;
        t.acked_features_select = snap.acked_features_select;
        t.acked_features = snap.acked_features & t.device.features();
        t.queue_select = snap.queue_select;
        t.config_generation = snap.config_generation;
        t.status = snap.status;
        if snap.activated {
            t.activate();
            if !t.activated {
                return Err("the restored virtio device failed to start".into());
            }
            for evt in &t.queue_evts {
                let _ = evt.write(1);
            }
        }
        if snap.interrupt_status != 0 || snap.activated {
            t.interrupt.signal_used();
        }
        Ok(t)
    }

    /// The eventfds to register as ioeventfds on QueueNotify, one per
    /// queue (datamatch = queue index).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers are writable only while the driver sets up.
    fn can_configure_queue(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0 && !self.activated
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.queue().map(|q| q.max_size().into()).unwrap_or(0),
            0x044 => self.queue().map(|q| u32::from(q.ready())).unwrap_or(0),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configurable = self.can_configure_queue();
        match offset {
            0x014 => self.features_select = v,
            0x020 if self.status & STATUS_FEATURES_OK == 0 => {
                let offered = self.device.features();
                match self.acked_features_select {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | (u64::from(v) & offered),
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered),
                    _ => {}
                }
            }
            0x024 => self.acked_features_select = v,
            0x030 => self.queue_select = v,
            0x038 if configurable => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 if configurable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => {
                // Without an ioeventfd (or before it is registered) the
                // notification arrives here.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if configurable => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.queue() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(lo, hi),
                        0x090 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::trace!(offset, v, "virtio-mmio: ignored write"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // FEATURES_OK sticks only if the driver accepted VERSION_1.
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            v &= !STATUS_FEATURES_OK;
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
        if self.queues.iter().any(|q| !q.ready() || !q.is_valid(&self.mem)) {
            tracing::warn!("virtio-mmio: driver set DRIVER_OK with a queue not ready or invalid");
            self.status |= STATUS_FAILED;
            return;
        }
        let mut queues = Vec::new();
        for (q, evt) in self.queues.iter().zip(&self.queue_evts) {
            // The device owns the live queue; the transport keeps the
            // configuration it was given (a copy through its state).
            let mut live = match Queue::try_from(q.state()) {
                Ok(live) => live,
                Err(e) => {
                    tracing::error!("virtio-mmio: queue: {e:?}");
                    self.status |= STATUS_FAILED;
                    return;
                }
            };
            live.set_event_idx(event_idx);
            match evt.try_clone() {
                Ok(e) => queues.push((live, e)),
                Err(e) => {
                    tracing::error!("virtio-mmio: {e}");
                    self.status |= STATUS_FAILED;
                    return;
                }
            }
        }
        let act = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(act) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!("virtio device activation failed: {e}");
                self.status |= STATUS_FAILED;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            // A device that cannot stop keeps running; tell the driver.
            self.status |= STATUS_FAILED;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(!0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        activated: Arc<Mutex<Option<u64>>>,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX) | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
        }
        fn activate(&mut self, act: Activation) -> Result<(), String> {
            *self.activated.lock().unwrap() = Some(act.acked_features);
            Ok(())
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn driver_init_sequence_activates_with_acked_features() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let dev = Dummy {
            activated: activated.clone(),
        };
        let mut t = MmioTransport::new(Box::new(dev), mem, EventFd::new(0).unwrap()).unwrap();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 2);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 in the high word");
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << 5)); // bit 5 not offered
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        w(&mut t, 0x30, 0);
        assert_eq!(r(&mut t, 0x34), 16);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0x1000);
        w(&mut t, 0x90, 0x2000);
        w(&mut t, 0xa0, 0x3000);
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(
            *activated.lock().unwrap(),
            Some(1 | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1))
        );
        // Config space, and queue registers frozen after DRIVER_OK.
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        w(&mut t, 0x38, 8);
        assert_eq!(t.queues[0].size(), 16);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Dummy {
            activated: Arc::new(Mutex::new(None)),
        };
        let mut t = MmioTransport::new(Box::new(dev), mem, EventFd::new(0).unwrap()).unwrap();
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }
}

/// A live virtio-blk transport is paused mid-stream, and a new transport
/// restored from its state on the same rings carries on where it stopped.
#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn wait_used(mem: &GuestMemoryMmap, used: GuestAddress, want: u16) {
        for _ in 0..2000 {
            if mem.read_obj::<u16>(used.unchecked_add(2)).unwrap() == want {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("used index never reached {want}");
    }

    /// Posts a 1-sector read of `sector` as chain `i` (descriptors 3i..3i+2).
    fn post_read(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, i: u16, sector: u64) {
        let base = 0x10_0000 + u64::from(i) * 0x1000;
        let mut hdr = [0u8; 16];
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(base, 16, 1, i * 3 + 1)),
            RawDescriptor::from(SplitDescriptor::new(base + 0x100, 512, 1 | 2, i * 3 + 2)),
            RawDescriptor::from(SplitDescriptor::new(base + 0x400, 1, 2, 0)),
        ];
        vq.add_desc_chains(&descs, i * 3).unwrap();
    }

    #[test]
    fn block_transport_resumes_from_its_snapshot() {
        let path = std::env::temp_dir().join(format!("remora-mmio-restore-{}", std::process::id()));
        let data: Vec<u8> = (0..8 * 512).map(|i| (i / 512) as u8 + 1).collect();
        std::fs::write(&path, data).unwrap();
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut t = MmioTransport::new(
            Box::new(Block::open(&path, false).unwrap()),
            mem.clone(),
            EventFd::new(0).unwrap(),
        )
        .unwrap();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        w(&mut t, 0x38, 16);
        for (off, addr) in [
            (0x80, vq.desc_table_addr()),
            (0x90, vq.avail_addr()),
            (0xa0, vq.used_addr()),
        ] {
            w(&mut t, off, addr.0 as u32);
            w(&mut t, off + 4, (addr.0 >> 32) as u32);
        }
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        post_read(&mem, &vq, 0, 2);
        let _ = t.queue_evts()[0].write(1);
        wait_used(&mem, vq.used_addr(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0100)).unwrap(), 3);

        let snap = t.pause().unwrap();
        assert!(snap.activated);
        assert_eq!((snap.queues[0].next_avail, snap.queues[0].next_used), (1, 1));
        drop(t);

        // The guest posts another request while the old VMM is gone.
        post_read(&mem, &vq, 1, 5);
        let t2 = MmioTransport::restore(
            Box::new(Block::open(&path, false).unwrap()),
            mem.clone(),
            EventFd::new(0).unwrap(),
            &snap,
        )
        .unwrap();
        wait_used(&mem, vq.used_addr(), 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_1100)).unwrap(), 6);
        assert_ne!(t2.interrupt.status() & INT_VRING, 0);
        let net =
            Box::new(crate::devices::virtio::net::Net::with_io(Box::new(NullIo), [0x52, 0x54, 0, 0, 0, 1]).unwrap());
        assert!(MmioTransport::restore(net, mem, EventFd::new(0).unwrap(), &snap)
            .err()
            .unwrap()
            .contains("type 2"));
        let _ = std::fs::remove_file(&path);
    }

    /// A virtio-net worker that dies (here at once: its endpoint has no
    /// file descriptor to poll, so its epoll set-up fails): pausing the
    /// transport, as a snapshot does, fails with a clear error instead of
    /// waiting forever, and the devices behind the bus can be resumed.
    #[test]
    fn a_dead_net_worker_fails_the_pause_instead_of_hanging_it() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
        let net = crate::devices::virtio::net::Net::with_io(Box::new(NullIo), [0x52, 0x54, 0, 0, 0, 1]).unwrap();
        let t = MmioTransport::new(Box::new(net), mem.clone(), EventFd::new(0).unwrap()).unwrap();
        let t = Arc::new(std::sync::Mutex::new(t));
        {
            let mut t = t.lock().unwrap();
            w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            w(&mut t, 0x24, 1);
            w(&mut t, 0x20, 1);
            w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
            for (qi, vq) in [&rx, &tx].into_iter().enumerate() {
                w(&mut t, 0x30, qi as u32);
                w(&mut t, 0x38, 16);
                for (off, addr) in [
                    (0x80, vq.desc_table_addr()),
                    (0x90, vq.avail_addr()),
                    (0xa0, vq.used_addr()),
                ] {
                    w(&mut t, off, addr.0 as u32);
                    w(&mut t, off + 4, (addr.0 >> 32) as u32);
                }
                w(&mut t, 0x44, 1);
            }
            w(
                &mut t,
                0x70,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            );
        }
        let bus = crate::devices::MmioBus::new(vec![(0xd000_0000, MMIO_WINDOW, t)]);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let b = bus.clone();
        std::thread::spawn(move || {
            b.request_pause_all();
            let _ = done_tx.send(b.pause_all().map(|_| ()));
            b.resume_all();
        });
        let r = done_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("pausing a device whose worker died hung");
        let e = r.expect_err("a dead worker cannot be paused");
        assert!(e.contains("virtio-net") && e.contains("worker thread has ended"), "{e}");
    }

    struct NullIo;
    impl crate::devices::virtio::net::FrameIo for NullIo {
        fn recv(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
        fn send(&mut self, f: &[u8]) -> std::io::Result<usize> {
            Ok(f.len())
        }
        fn raw_fd(&self) -> std::os::fd::RawFd {
            -1
        }
        fn set_offload(&mut self, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }
}
