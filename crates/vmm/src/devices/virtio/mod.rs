//! virtio devices on the virtio-mmio transport (version 2).

pub mod block;
pub mod commit;
pub mod mmio;
pub mod net;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Feature bits shared by every device.
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// Interrupt status bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the status register the driver reads and acks,
/// and the irqfd that raises the line.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Signals used-ring updates.
    pub fn signal_used(&self) {
        self.signal(INT_VRING);
    }

    /// Signals a configuration change.
    pub fn signal_config(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// Queues with the eventfd the driver's notifications arrive on.
    pub queues: Vec<(Queue, EventFd)>,
    pub interrupt: std::sync::Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (1 net, 2 block, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device (typically a worker thread).
    fn activate(&mut self, act: Activation) -> Result<(), String>;
    /// Stops the device after a driver reset; returns whether it could.
    fn reset(&mut self) -> bool {
        false
    }
    /// The control of the device's worker thread, while it is active.
    fn worker(&self) -> Option<&worker::WorkerCtl> {
        None
    }
    /// Asks the device's worker to park at its next wake-up, without
    /// waiting (a later [`VirtioDevice::pause`] waits for it).
    fn request_pause(&mut self) {
        if let Some(ctl) = self.worker() {
            ctl.request_pause();
        }
    }
    /// Parks the device's worker between requests and returns the state of
    /// the queues it owns (`None` if the device is not active), or an error
    /// if the worker thread has ended.
    fn pause(&mut self) -> Result<Option<Vec<worker::QueueSnap>>, worker::WorkerDead> {
        self.worker().map(worker::WorkerCtl::pause).transpose()
    }
    /// Lets a paused worker continue.
    fn resume(&mut self) {
        if let Some(ctl) = self.worker() {
            ctl.resume();
        }
    }
}

/// Copies `config[offset..]` into `data`, zero-filling past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}
