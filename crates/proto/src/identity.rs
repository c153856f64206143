//! What a VM must look like on both hosts for the backup to resume it.

use std::fmt::Write as _;

/// The shape of the VM: the backup's standby VM must match it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmIdentity {
    pub mem_mib: u64,
    pub vcpus: u32,
    /// In the VMM's device order. Net and Disk indexes used by the
    /// checkpoint messages count the entries of that type, in this order.
    pub devices: Vec<DeviceIdentity>,
}

/// One device of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceIdentity {
    Net {
        mac: [u8; 6],
    },
    Disk {
        size_bytes: u64,
        read_only: bool,
        /// The virtio-blk serial (ASCII, NUL-padded).
        id: [u8; 20],
    },
}

impl DeviceIdentity {
    pub(crate) const NET_TAG: u8 = 1;
    pub(crate) const DISK_TAG: u8 = 2;
}

/// How the primary releases guest output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Speculative TCP (the engine acknowledges the guest at once).
    Speculative,
    /// Plain Remus output buffering.
    Buffered,
}

impl OutputMode {
    pub(crate) fn to_wire(self) -> u8 {
        match self {
            OutputMode::Speculative => 0,
            OutputMode::Buffered => 1,
        }
    }

    pub(crate) fn from_wire(b: u8) -> Option<Self> {
        match b {
            0 => Some(OutputMode::Speculative),
            1 => Some(OutputMode::Buffered),
            _ => None,
        }
    }
}

/// Names a device by its type index: "net 0", "disk 1".
fn device_name(devices: &[DeviceIdentity], i: usize) -> String {
    let Some(d) = devices.get(i) else {
        return format!("device {i}");
    };
    let nth = devices[..i]
        .iter()
        .filter(|o| std::mem::discriminant(*o) == std::mem::discriminant(d))
        .count();
    match d {
        DeviceIdentity::Net { .. } => format!("net {nth}"),
        DeviceIdentity::Disk { .. } => format!("disk {nth}"),
    }
}

fn mac_str(mac: &[u8; 6]) -> String {
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn id_str(id: &[u8; 20]) -> String {
    let end = id.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let mut s = String::from("\"");
    for &b in &id[..end] {
        s.extend(std::ascii::escape_default(b).map(char::from));
    }
    s.push('"');
    s
}

fn rw(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

impl VmIdentity {
    /// Number of Net devices.
    pub fn nets(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| matches!(d, DeviceIdentity::Net { .. }))
            .count()
    }

    /// The Disk devices in order, as (size_bytes, read_only, id).
    pub fn disks(&self) -> impl Iterator<Item = (u64, bool, [u8; 20])> + '_ {
        self.devices.iter().filter_map(|d| match *d {
            DeviceIdentity::Disk {
                size_bytes,
                read_only,
                id,
            } => Some((size_bytes, read_only, id)),
            DeviceIdentity::Net { .. } => None,
        })
    }

    /// The first difference between the primary's identity (`self`) and the
    /// backup's, as a sentence naming both values, e.g. "disk 0 size
    /// differs: primary 67108864 bytes, backup 33554432 bytes"; `None` if
    /// they match. The backup's `mem_mib: 0`, `vcpus: 0` and all-zero disk
    /// ids match anything.
    pub fn first_difference(&self, backup: &VmIdentity) -> Option<String> {
        // A backup states 0 for what it takes from the primary (memory
        // size, vCPU count, disk ids).
        if backup.mem_mib != 0 && self.mem_mib != backup.mem_mib {
            return Some(format!(
                "memory differs: primary {} MiB, backup {} MiB",
                self.mem_mib, backup.mem_mib
            ));
        }
        if backup.vcpus != 0 && self.vcpus != backup.vcpus {
            return Some(format!(
                "vCPU count differs: primary {}, backup {}",
                self.vcpus, backup.vcpus
            ));
        }
        for (i, (p, b)) in self.devices.iter().zip(&backup.devices).enumerate() {
            let pn = device_name(&self.devices, i);
            let bn = device_name(&backup.devices, i);
            match (p, b) {
                (DeviceIdentity::Net { mac: pm }, DeviceIdentity::Net { mac: bm }) => {
                    if pm != bm {
                        return Some(format!(
                            "{pn} MAC differs: primary {}, backup {}",
                            mac_str(pm),
                            mac_str(bm)
                        ));
                    }
                }
                (
                    DeviceIdentity::Disk {
                        size_bytes: ps,
                        read_only: pr,
                        id: pid,
                    },
                    DeviceIdentity::Disk {
                        size_bytes: bs,
                        read_only: br,
                        id: bid,
                    },
                ) => {
                    if ps != bs {
                        return Some(format!("{pn} size differs: primary {ps} bytes, backup {bs} bytes"));
                    }
                    if pr != br {
                        return Some(format!("{pn} mode differs: primary {}, backup {}", rw(*pr), rw(*br)));
                    }
                    if *bid != [0u8; 20] && pid != bid {
                        return Some(format!(
                            "{pn} id differs: primary {}, backup {}",
                            id_str(pid),
                            id_str(bid)
                        ));
                    }
                }
                _ => {
                    return Some(format!("device {i} differs: primary has {pn}, backup has {bn}"));
                }
            }
        }
        if self.devices.len() != backup.devices.len() {
            let (more, n) = if self.devices.len() > backup.devices.len() {
                ("primary", &self.devices)
            } else {
                ("backup", &backup.devices)
            };
            let common = self.devices.len().min(backup.devices.len());
            return Some(format!(
                "device count differs: primary {}, backup {} (only the {more} has {})",
                self.devices.len(),
                backup.devices.len(),
                device_name(n, common)
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> DeviceIdentity {
        let mut id = [0u8; 20];
        id[..4].copy_from_slice(b"root");
        DeviceIdentity::Disk {
            size_bytes: size,
            read_only: false,
            id,
        }
    }

    fn vm() -> VmIdentity {
        VmIdentity {
            mem_mib: 512,
            vcpus: 2,
            devices: vec![
                DeviceIdentity::Net {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                },
                disk(64 << 20),
            ],
        }
    }

    #[test]
    fn identical() {
        assert_eq!(vm().first_difference(&vm()), None);
    }

    #[test]
    fn disk_size() {
        let mut b = vm();
        b.devices[1] = disk(32 << 20);
        assert_eq!(
            vm().first_difference(&b).as_deref(),
            Some("disk 0 size differs: primary 67108864 bytes, backup 33554432 bytes")
        );
    }

    #[test]
    fn each_field() {
        let p = vm();
        let mut b = vm();
        b.mem_mib = 256;
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("memory differs: primary 512 MiB, backup 256 MiB")
        );
        let mut b = vm();
        b.vcpus = 1;
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("vCPU count differs: primary 2, backup 1")
        );
        let mut b = vm();
        b.devices[0] = DeviceIdentity::Net {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
        };
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("net 0 MAC differs: primary 52:54:00:12:34:56, backup 52:54:00:12:34:57")
        );
        let mut b = vm();
        b.devices[1] = DeviceIdentity::Disk {
            size_bytes: 64 << 20,
            read_only: true,
            id: *b"root\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("disk 0 mode differs: primary read-write, backup read-only")
        );
        let mut b = vm();
        b.devices[1] = DeviceIdentity::Disk {
            size_bytes: 64 << 20,
            read_only: false,
            id: *b"data\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("disk 0 id differs: primary \"root\", backup \"data\"")
        );
        let mut b = vm();
        b.devices.swap(0, 1);
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("device 0 differs: primary has net 0, backup has disk 0")
        );
        let mut b = vm();
        b.devices.push(disk(1 << 20));
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("device count differs: primary 2, backup 3 (only the backup has disk 1)")
        );
        let mut b = vm();
        b.devices.truncate(1);
        assert_eq!(
            p.first_difference(&b).as_deref(),
            Some("device count differs: primary 2, backup 1 (only the primary has disk 0)")
        );
    }
}
