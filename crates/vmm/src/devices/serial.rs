//! COM1: a 16550A (vm-superio) whose interrupt is an irqfd and whose output
//! goes to a console sink, flushed once per vCPU exit rather than per byte.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;

/// Raises the serial IRQ through an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Collects transmitted bytes; [`SerialConsole`] hands them to the sink.
#[derive(Default)]
pub struct TxBuffer(Vec<u8>);

impl Write for TxBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The console device on the bus.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, TxBuffer>,
    sink: Box<dyn Write + Send>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, sink: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), TxBuffer::default()),
            sink,
        }
    }

    /// The UART's registers, for snapshots.
    pub fn state(&self) -> crate::snapshot::SerialSnap {
        let st = self.uart.state();
        crate::snapshot::SerialSnap {
            regs: [
                st.baud_divisor_low,
                st.baud_divisor_high,
                st.interrupt_enable,
                st.interrupt_identification,
                st.line_control,
                st.line_status,
                st.modem_control,
                st.modem_status,
                st.scratch,
            ],
            in_buffer: st.in_buffer,
        }
    }

    /// A console whose UART resumes from `snap`.
    pub fn from_state(
        snap: &crate::snapshot::SerialSnap,
        irq: EventFd,
        sink: Box<dyn Write + Send>,
    ) -> io::Result<Self> {
        let r = snap.regs;
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: snap.in_buffer.clone(),
        };
        let uart = Serial::from_state(&st, IrqTrigger(irq), NoEvents, TxBuffer::default())
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(SerialConsole { uart, sink })
    }

    /// Bytes typed by the user, for the guest to read. Returns how many
    /// fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Writes out whatever the guest transmitted.
    pub fn flush_output(&mut self) {
        self.flush_tx();
    }

    fn flush_tx(&mut self) {
        let tx = &mut self.uart.writer_mut().0;
        if tx.is_empty() {
            return;
        }
        // A closed or full console must not stop the guest: drop the output.
        if let Err(e) = self.sink.write_all(tx).and_then(|_| self.sink.flush()) {
            tracing::debug!("console write failed: {e}");
        }
        tx.clear();
    }
}

impl PioDevice for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        // `rep outsb` arrives as one exit with many bytes.
        for b in data {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                tracing::debug!("serial write: {e:?}");
            }
        }
        self.flush_tx();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn string_output_reaches_sink_and_input_is_readable() {
        let out = Shared::default();
        let mut s = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        s.write(0, b"hello\n");
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
        assert_eq!(s.enqueue_input(b"ab"), 2);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rx = [0u8];
        s.read(0, &mut rx);
        assert_eq!(rx[0], b'a');
    }
}
