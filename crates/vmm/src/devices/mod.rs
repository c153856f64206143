//! Port-I/O devices and the bus that routes vCPU exits to them.

pub mod legacy;
pub mod serial;
pub mod tap;
pub mod virtio;
pub mod vnet;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

/// What a device asks of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// Reset through the i8042 or the FADT reset register.
    Reset,
}

/// Channel on which devices report [`DeviceEvent`]s.
pub type EventSender = Sender<crate::VmEvent>;

/// A device on the port-I/O bus. `offset` is relative to its base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it.
pub type SharedPio = Arc<Mutex<dyn PioDevice>>;

struct Range {
    base: u16,
    len: u16,
    dev: SharedPio,
}

/// Routes port I/O to devices by port range. Unclaimed reads see all ones,
/// unclaimed writes are dropped (as on a real ISA bus).
#[derive(Default, Clone)]
pub struct PioBus {
    ranges: Arc<Vec<Range>>,
}

impl PioBus {
    /// A bus with the given devices (base port, length, device).
    pub fn new(devices: Vec<(u16, u16, SharedPio)>) -> Self {
        let ranges = devices
            .into_iter()
            .map(|(base, len, dev)| Range { base, len, dev })
            .collect();
        PioBus {
            ranges: Arc::new(ranges),
        }
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && port - r.base < r.len)
            .map(|r| (r, port - r.base))
    }

    /// A read of `data.len()` bytes at `port`. Returns whether a device
    /// claimed the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((r, off)) => {
                lock(&r.dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A write at `port`. Returns whether a device claimed the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((r, off)) => {
                lock(&r.dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// A transport at (base, length) on the MMIO bus.
pub type MmioWindow = (u64, u64, Arc<Mutex<virtio::mmio::MmioTransport>>);

/// Routes MMIO exits to virtio-mmio transports by address window.
#[derive(Default, Clone)]
pub struct MmioBus {
    windows: Arc<Vec<MmioWindow>>,
}

impl MmioBus {
    pub fn new(windows: Vec<MmioWindow>) -> Self {
        MmioBus {
            windows: Arc::new(windows),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Asks every device's worker to park, without waiting.
    pub fn request_pause_all(&self) {
        for (_, _, t) in self.windows.iter() {
            lock(t).request_pause();
        }
    }

    /// Parks every device's worker; returns the transports' states in
    /// order, or the error of the first device whose worker has ended
    /// (the caller resumes them all either way).
    pub fn pause_all(&self) -> Result<Vec<virtio::mmio::TransportSnap>, String> {
        self.windows.iter().map(|(_, _, t)| lock(t).pause()).collect()
    }

    pub fn resume_all(&self) {
        for (_, _, t) in self.windows.iter() {
            lock(t).resume();
        }
    }

    fn find(&self, addr: u64) -> Option<(&Mutex<virtio::mmio::MmioTransport>, u64)> {
        self.windows
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, dev)| (&**dev, addr - base))
    }

    /// Returns whether a device claimed the address; unclaimed reads see ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock (a device is plain data;
/// a panic elsewhere does not make its state unusable).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rec(Vec<(u16, u8)>);
    impl PioDevice for Rec {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_range() {
        let dev = Arc::new(Mutex::new(Rec(Vec::new())));
        let bus = PioBus::new(vec![(0x3f8, 8, dev.clone())]);
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x3f7, &[7]));
        assert_eq!(lock(&dev).0, vec![(7, 7)]);
    }
}
