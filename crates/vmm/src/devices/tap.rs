//! TAP devices with virtio-net headers (IFF_VNET_HDR).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// TUNSETOFFLOAD flags.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// virtio_net_hdr_v1 (with num_buffers): what VERSION_1 drivers use.
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name '{0}' is not valid: 1 to 15 bytes, no '/', whitespace or NUL")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP '{name}': {error}{hint}")]
    Attach {
        name: String,
        error: io::Error,
        hint: &'static str,
    },
    #[error("cannot configure TAP '{name}' ({what}): {error}")]
    Configure {
        name: String,
        what: &'static str,
        error: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP queue.
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        && name != "."
        && name != ".."
}

impl Tap {
    /// Opens the TAP `name`, creating it if it does not exist (an existing
    /// persistent TAP is attached to). The TAP is non-blocking and carries
    /// 12-byte virtio-net headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is a valid,
        // correctly sized ifreq that lives for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            let error = io::Error::last_os_error();
            let hint = match error.raw_os_error() {
                Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or a persistent TAP owned by this user)",
                Some(libc::EBUSY) => " (another process holds it)",
                Some(libc::EINVAL) => " (an interface of that name exists and is not a TAP with vnet headers)",
                _ => "",
            };
            return Err(TapError::Attach {
                name: name.into(),
                error,
                hint,
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which is valid for the call.
        if unsafe { libc::ioctl(tap.fd(), TUNSETVNETHDRSZ as _, &hdr_len) } < 0 {
            return Err(tap.config_err("vnet header size"));
        }
        Ok(tap)
    }

    fn config_err(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            error: io::Error::last_os_error(),
        }
    }

    /// Tells the kernel which offloads the guest accepts on receive.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD as _, libc::c_ulong::from(flags)) } < 0 {
            return Err(self.config_err("offloads"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl super::virtio::net::FrameIo for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut self.file, buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut self.file, frame)
    }
    fn raw_fd(&self) -> RawFd {
        self.fd()
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for bad in ["", "a/b", "sixteen-chars-xx", "has space", ".."] {
            assert!(matches!(Tap::open(bad), Err(TapError::BadName(_))), "{bad:?}");
        }
    }
}
