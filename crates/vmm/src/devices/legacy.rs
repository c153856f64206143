//! i8042 (reset line only) and the ACPI hardware-reduced sleep registers.

use super::{DeviceEvent, EventSender, PioDevice};
use crate::layout::{ACPI_S5_SLEEP_TYPE, I8042_CMD_PORT, I8042_DATA_PORT, I8042_RESET_CMD};
use crate::VmEvent;

/// The i8042 keyboard controller, enough for the guest to find it and to
/// reset the machine with command 0xfe. Occupies ports 0x60..=0x64.
pub struct I8042 {
    events: EventSender,
}

impl I8042 {
    pub fn new(events: EventSender) -> Self {
        I8042 { events }
    }
    /// Base port and length on the bus.
    pub const BASE: u16 = I8042_DATA_PORT;
    pub const LEN: u16 = I8042_CMD_PORT - I8042_DATA_PORT + 1;
}

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == I8042_CMD_PORT - I8042_DATA_PORT && data.first() == Some(&I8042_RESET_CMD) {
            let _ = self.events.send(VmEvent::Device(DeviceEvent::Reset));
        }
    }
}

/// The FADT's sleep control (offset 0) and sleep status (offset 1)
/// registers. Writing SLP_EN with the `_S5_` sleep type powers off.
pub struct AcpiSleep {
    events: EventSender,
}

impl AcpiSleep {
    pub fn new(events: EventSender) -> Self {
        AcpiSleep { events }
    }
    pub const LEN: u16 = 2;
    const SLP_EN: u8 = 1 << 5;
}

impl PioDevice for AcpiSleep {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & Self::SLP_EN != 0 && (v >> 2) & 0x7 == ACPI_S5_SLEEP_TYPE {
            let _ = self.events.send(VmEvent::Device(DeviceEvent::PowerOff));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn sleep_register_powers_off_only_on_s5_with_slp_en() {
        let (tx, rx) = channel();
        let mut d = AcpiSleep::new(tx);
        d.write(0, &[ACPI_S5_SLEEP_TYPE << 2]); // no SLP_EN
        d.write(0, &[(3 << 2) | 0x20]); // S3
        assert!(rx.try_recv().is_err());
        d.write(0, &[(ACPI_S5_SLEEP_TYPE << 2) | 0x20]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Device(DeviceEvent::PowerOff))));
    }

    #[test]
    fn i8042_resets_on_0xfe() {
        let (tx, rx) = channel();
        let mut d = I8042::new(tx);
        d.write(4, &[0xd1]);
        d.write(0, &[0xfe]);
        assert!(rx.try_recv().is_err());
        d.write(4, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Device(DeviceEvent::Reset))));
    }
}
