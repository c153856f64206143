//! Console output on COM1: every line starts with `remora-guest: ` and is
//! written with a single WRITE syscall, under a lock so lines from
//! different CPUs never interleave.

use core::fmt::{self, Write};

use crate::sync::SpinLock;
use crate::sys;

/// The first 16550 UART; the VMM and QEMU both put it at 0x3f8.
pub const COM1: u16 = 0x3f8;
/// What every line the guest prints starts with.
pub const PREFIX: &str = "remora-guest: ";
/// Longest line (including the prefix and the newline); longer lines are
/// cut short.
const LINE_MAX: usize = 1024;

/// Serialises lines from different CPUs.
static CONSOLE: SpinLock<()> = SpinLock::new(());

/// A line being formatted; silently truncates at [`LINE_MAX`].
struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    fn new() -> Self {
        let mut line = Self {
            buf: [0; LINE_MAX],
            len: 0,
        };
        line.push(PREFIX.as_bytes());
        line
    }

    fn push(&mut self, bytes: &[u8]) {
        // Keep one byte for the newline.
        let room = LINE_MAX - 1 - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn finish(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

fn emit(bytes: &[u8]) {
    // SAFETY: COM1's transmit register; writing it only sends bytes.
    unsafe { sys::write_port(COM1, bytes) }
}

/// Prints one line (the prefix and the newline are added).
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut line = Line::new();
    // Line::write_str never fails; a Display impl that fails just ends the line.
    let _ = line.write_fmt(args);
    let bytes = line.finish();
    let _guard = CONSOLE.lock();
    emit(bytes);
}

/// Prints one line even if another CPU holds the console lock (for panics:
/// the holder may be the panicking CPU itself).
pub fn print_line_forced(args: fmt::Arguments<'_>) {
    let mut line = Line::new();
    let _ = line.write_fmt(args);
    let bytes = line.finish();
    let mut guard = None;
    for _ in 0..1_000_000 {
        guard = CONSOLE.try_lock();
        if guard.is_some() {
            break;
        }
        core::hint::spin_loop();
    }
    emit(bytes);
    drop(guard);
}

/// Prints a line on the console: `say!("cpus={}", n)` prints
/// `remora-guest: cpus=2`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::print_line(format_args!($($arg)*))
    };
}

/// Shows a string from outside (the command line) with anything that is
/// not printable ASCII, and `"`, replaced by `?`.
pub struct Sanitized<'a>(pub &'a [u8]);

impl fmt::Display for Sanitized<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) && b != b'"' {
                b as char
            } else {
                '?'
            };
            f.write_char(c)?;
        }
        Ok(())
    }
}
