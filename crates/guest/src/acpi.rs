//! ACPI tables: RSDP -> XSDT/RSDT -> MADT (CPUs, LAPIC, IOAPIC) and FADT
//! (power-off and reset registers) -> DSDT (`_S5_` sleep type).
//!
//! The tables are read in place through the identity map; only the values
//! the guest needs are kept.

use core::fmt;

use crate::phys::{self, le16, le32, le64, Range, RangeSet};
use crate::smp::MAX_CPUS;

/// Where the BIOS area is scanned for the RSDP when the loader gives none.
const BIOS_SCAN: (u64, u64) = (0xe_0000, 0x10_0000);
/// The real-mode pointer to the EBDA segment.
const EBDA_PTR: u64 = 0x40e;
/// Largest table we accept (a sanity bound on `length`).
const MAX_TABLE_LEN: u32 = 1 << 20;
/// Size of the common table header.
const HEADER_LEN: usize = 36;
/// The architectural LAPIC address, used when the MADT gives none.
pub const DEFAULT_LAPIC: u64 = 0xfee0_0000;

/// FADT flags.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

/// Why ACPI could not be used.
#[derive(Debug, Clone, Copy)]
pub enum Error {
    NoRsdp,
    BadRoot(u64),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoRsdp => write!(f, "no RSDP in start info, EBDA or BIOS area"),
            Error::BadRoot(a) => write!(f, "bad XSDT/RSDT at {a:#x}"),
        }
    }
}

/// A Generic Address Structure (ACPI 5.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub bit_offset: u8,
    pub access_size: u8,
    pub addr: u64,
}

impl Gas {
    /// System memory address space.
    pub const MEMORY: u8 = 0;
    /// System I/O address space.
    pub const IO: u8 = 1;

    fn parse(b: &[u8], off: usize) -> Option<Gas> {
        let g = b.get(off..off + 12)?;
        let gas = Gas {
            space: g[0],
            bit_width: g[1],
            bit_offset: g[2],
            access_size: g[3],
            addr: le64(g, 4),
        };
        (gas.addr != 0).then_some(gas)
    }

    /// A GAS for a legacy FADT I/O block (`port`, `len` bytes).
    fn io(port: u32, len: u8) -> Option<Gas> {
        (port != 0).then_some(Gas {
            space: Gas::IO,
            bit_width: len.saturating_mul(8),
            bit_offset: 0,
            access_size: 0,
            addr: u64::from(port),
        })
    }

    /// Access width in bits: from `access_size`, else `bit_width`, else 8.
    pub fn access_bits(&self) -> u32 {
        match self.access_size {
            1 => 8,
            2 => 16,
            3 => 32,
            4 => 64,
            _ => match self.bit_width {
                16 | 32 | 64 => u32::from(self.bit_width),
                _ => 8,
            },
        }
    }
}

impl fmt::Display for Gas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = match self.space {
            Gas::MEMORY => "mem",
            Gas::IO => "io",
            _ => "other",
        };
        write!(f, "{space}:{:#x}/{}", self.addr, self.access_bits())
    }
}

/// Shows an optional register as `none` or like [`Gas`].
pub struct OptGas(pub Option<Gas>);

impl fmt::Display for OptGas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(g) => g.fmt(f),
            None => f.write_str("none"),
        }
    }
}

/// What the guest uses from the FADT (and the DSDT it points to).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fadt {
    pub revision: u8,
    pub flags: u32,
    /// SLEEP_CONTROL_REG (hardware-reduced ACPI).
    pub sleep_control: Option<Gas>,
    /// PM1a/PM1b control blocks (legacy ACPI).
    pub pm1a_cnt: Option<Gas>,
    pub pm1b_cnt: Option<Gas>,
    /// RESET_REG and RESET_VALUE, if RESET_REG_SUP is set.
    pub reset: Option<(Gas, u8)>,
    /// `_S5_` SLP_TYPa/SLP_TYPb from the DSDT, if found.
    pub s5: Option<(u8, u8)>,
}

impl Fadt {
    pub fn hw_reduced(&self) -> bool {
        self.flags & FADT_HW_REDUCED_ACPI != 0
    }
}

/// The I/O APIC from the MADT (for the interrupt-driven drivers to come).
#[derive(Debug, Clone, Copy)]
pub struct IoApic {
    pub id: u8,
    pub addr: u32,
    pub gsi_base: u32,
}

/// What the guest found in the ACPI tables.
#[derive(Debug, Clone)]
pub struct Acpi {
    pub rsdp: u64,
    /// Whether the RSDP came from scanning memory rather than start info.
    pub rsdp_scanned: bool,
    pub lapic_addr: u64,
    apic_ids: [u32; MAX_CPUS],
    nr_apic_ids: usize,
    /// Enabled CPUs beyond [`MAX_CPUS`], ignored.
    pub extra_cpus: usize,
    pub ioapic: Option<IoApic>,
    /// Every I/O APIC of the MADT (QEMU microvm has two), in MADT order.
    ioapics: [Option<IoApic>; 8],
    pub fadt: Option<Fadt>,
    /// The DSDT's AML (after the table header), for device discovery.
    pub dsdt: Option<&'static [u8]>,
    /// Physical ranges of the RSDP and every table read.
    pub tables: RangeSet,
}

impl Acpi {
    /// No ACPI: one CPU, the default LAPIC, no power registers.
    pub fn none() -> Self {
        Acpi {
            rsdp: 0,
            rsdp_scanned: false,
            lapic_addr: DEFAULT_LAPIC,
            apic_ids: [0; MAX_CPUS],
            nr_apic_ids: 0,
            extra_cpus: 0,
            ioapic: None,
            ioapics: [None; 8],
            fadt: None,
            dsdt: None,
            tables: RangeSet::new(),
        }
    }

    /// Finds and reads the tables, starting from the RSDP address the loader
    /// gave (0: scan the EBDA and the BIOS area).
    pub fn discover(rsdp_hint: u64) -> Result<Self, Error> {
        let mut acpi = Acpi::none();
        let (rsdp, scanned) = match rsdp_hint {
            0 => (find_rsdp().ok_or(Error::NoRsdp)?, true),
            a if rsdp_valid(a) => (a, false),
            _ => (find_rsdp().ok_or(Error::NoRsdp)?, true),
        };
        acpi.rsdp = rsdp;
        acpi.rsdp_scanned = scanned;
        // SAFETY: firmware tables, read only, never written while we run.
        let r = unsafe { phys::bytes(rsdp, 36) }.ok_or(Error::NoRsdp)?;
        acpi.tables.add(Range::new(rsdp, 36));
        let revision = r[15];
        let rsdt = u64::from(le32(r, 16));
        let xsdt = if revision >= 2 { le64(r, 24) } else { 0 };
        let (root, entry_len) = match table(xsdt, b"XSDT") {
            Some(t) => (t, 8),
            None => (table(rsdt, b"RSDT").ok_or(Error::BadRoot(rsdt))?, 4),
        };
        acpi.tables.add(Range::new(root.addr, root.data.len() as u64));
        for entry in root.data[HEADER_LEN..].chunks_exact(entry_len) {
            let addr = if entry_len == 8 {
                le64(entry, 0)
            } else {
                u64::from(le32(entry, 0))
            };
            let Some(t) = any_table(addr) else { continue };
            acpi.tables.add(Range::new(t.addr, t.data.len() as u64));
            match &t.signature {
                b"APIC" => acpi.parse_madt(t.data),
                b"FACP" => acpi.fadt = Some(acpi.parse_fadt(t.data)),
                _ => {}
            }
        }
        Ok(acpi)
    }

    /// Every I/O APIC, in MADT order.
    pub fn ioapics(&self) -> impl Iterator<Item = IoApic> + '_ {
        self.ioapics.iter().flatten().copied()
    }

    /// The I/O APIC serving `gsi`: the one with the highest GSI base not
    /// above it.
    pub fn ioapic_for(&self, gsi: u32) -> Option<IoApic> {
        self.ioapics
            .iter()
            .flatten()
            .filter(|io| io.gsi_base <= gsi)
            .max_by_key(|io| io.gsi_base)
            .copied()
    }

    /// APIC IDs of the enabled CPUs, in MADT order.
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.nr_apic_ids]
    }

    fn add_cpu(&mut self, apic_id: u32) {
        if self.apic_ids().contains(&apic_id) {
            return;
        }
        if self.nr_apic_ids == MAX_CPUS {
            self.extra_cpus += 1;
            return;
        }
        self.apic_ids[self.nr_apic_ids] = apic_id;
        self.nr_apic_ids += 1;
    }

    fn parse_madt(&mut self, t: &[u8]) {
        self.lapic_addr = u64::from(le32(t, HEADER_LEN));
        let mut off = HEADER_LEN + 8;
        while off + 2 <= t.len() {
            let (kind, len) = (t[off], usize::from(t[off + 1]));
            if len < 2 || off + len > t.len() {
                break;
            }
            let e = &t[off..off + len];
            match (kind, len) {
                // Processor Local APIC: uid, APIC ID, flags (bit 0: enabled).
                (0, 8..) if le32(e, 4) & 1 != 0 => self.add_cpu(u32::from(e[3])),
                // I/O APIC: id, reserved, address, GSI base.
                (1, 12..) => {
                    let io = IoApic {
                        id: e[2],
                        addr: le32(e, 4),
                        gsi_base: le32(e, 8),
                    };
                    if self.ioapic.is_none() {
                        self.ioapic = Some(io);
                    }
                    if let Some(slot) = self.ioapics.iter_mut().find(|s| s.is_none()) {
                        *slot = Some(io);
                    }
                }
                // Local APIC address override.
                (5, 12..) => self.lapic_addr = le64(e, 4),
                // Processor Local x2APIC: reserved, x2APIC ID, flags, uid.
                (9, 16..) if le32(e, 8) & 1 != 0 => self.add_cpu(le32(e, 4)),
                _ => {}
            }
            off += len;
        }
        if self.lapic_addr == 0 {
            self.lapic_addr = DEFAULT_LAPIC;
        }
    }

    fn parse_fadt(&mut self, t: &[u8]) -> Fadt {
        let mut f = Fadt {
            revision: t[8],
            flags: le32(t, 112),
            ..Fadt::default()
        };
        let pm1_cnt_len = t.get(89).copied().unwrap_or(2);
        f.pm1a_cnt = Gas::parse(t, 172).or_else(|| Gas::io(le32(t, 64), pm1_cnt_len));
        f.pm1b_cnt = Gas::parse(t, 184).or_else(|| Gas::io(le32(t, 68), pm1_cnt_len));
        if f.flags & FADT_RESET_REG_SUP != 0 {
            if let (Some(g), Some(&v)) = (Gas::parse(t, 116), t.get(128)) {
                f.reset = Some((g, v));
            }
        }
        f.sleep_control = Gas::parse(t, 244);
        let x_dsdt = le64(t, 140);
        let dsdt = if x_dsdt != 0 { x_dsdt } else { u64::from(le32(t, 40)) };
        if let Some(d) = table(dsdt, b"DSDT") {
            self.tables.add(Range::new(d.addr, d.data.len() as u64));
            f.s5 = find_s5(&d.data[HEADER_LEN..]);
            self.dsdt = Some(&d.data[HEADER_LEN..]);
        }
        f
    }
}

/// A checksum-verified table in memory.
struct Table {
    addr: u64,
    signature: [u8; 4],
    data: &'static [u8],
}

/// The table at `addr`, if its checksum is right.
fn any_table(addr: u64) -> Option<Table> {
    // SAFETY: firmware tables, read only, never written while we run.
    let header = unsafe { phys::bytes(addr, HEADER_LEN) }?;
    let len = le32(header, 4);
    if !(HEADER_LEN as u32..=MAX_TABLE_LEN).contains(&len) {
        return None;
    }
    // SAFETY: as above, the whole table.
    let data = unsafe { phys::bytes(addr, len as usize) }?;
    checksum_ok(data).then(|| Table {
        addr,
        signature: [data[0], data[1], data[2], data[3]],
        data,
    })
}

/// The table at `addr` if it has `signature` and a right checksum.
fn table(addr: u64, signature: &[u8; 4]) -> Option<Table> {
    any_table(addr).filter(|t| &t.signature == signature)
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x)) == 0
}

/// Whether a valid RSDP (v1 checksum, and the v2 one if revision >= 2) is
/// at `addr`.
fn rsdp_valid(addr: u64) -> bool {
    // SAFETY: firmware memory, read only.
    let Some(r) = (unsafe { phys::bytes(addr, 20) }) else {
        return false;
    };
    if &r[..8] != b"RSD PTR " || !checksum_ok(r) {
        return false;
    }
    if r[15] < 2 {
        return true;
    }
    // SAFETY: as above; a v2 RSDP is 36 bytes.
    let Some(r) = (unsafe { phys::bytes(addr, 36) }) else {
        return false;
    };
    let len = le32(r, 20) as usize;
    // SAFETY: as above.
    (36..=4096).contains(&len) && unsafe { phys::bytes(addr, len) }.is_some_and(checksum_ok)
}

/// Scans the first KiB of the EBDA and the BIOS area for the RSDP (on
/// 16-byte boundaries).
fn find_rsdp() -> Option<u64> {
    // SAFETY: the BIOS data area pointer, read only.
    let ebda = unsafe { phys::bytes(EBDA_PTR, 2) }.map_or(0, |b| u64::from(le16(b, 0)) << 4);
    let mut areas = [(BIOS_SCAN.0, BIOS_SCAN.1), (0, 0)];
    if (0x8_0000..0xa_0000).contains(&ebda) {
        areas = [(ebda, ebda + 1024), (BIOS_SCAN.0, BIOS_SCAN.1)];
    }
    areas
        .iter()
        .flat_map(|&(start, end)| (start..end).step_by(16))
        .find(|&a| rsdp_valid(a))
}

/// Finds `Name(_S5_, Package() { SLP_TYPa, SLP_TYPb, ... })` in AML and
/// returns the two sleep types.
fn find_s5(aml: &[u8]) -> Option<(u8, u8)> {
    let pos = aml.windows(4).position(|w| w == b"_S5_")?;
    // NameOp, optionally followed by the root prefix `\`.
    let name_op = match pos {
        0 => return None,
        p if aml[p - 1] == b'\\' && p >= 2 => aml[p - 2],
        p => aml[p - 1],
    };
    if name_op != 0x08 {
        return None;
    }
    let mut p = pos + 4;
    if *aml.get(p)? != 0x12 {
        return None; // not a PackageOp
    }
    p += 1;
    let pkg_len_bytes = usize::from(*aml.get(p)? >> 6);
    p += 1 + pkg_len_bytes;
    let num_elements = *aml.get(p)?;
    p += 1;
    let (a, next) = aml_integer(aml, p)?;
    let b = if num_elements >= 2 {
        aml_integer(aml, next).map_or(0, |(b, _)| b)
    } else {
        0
    };
    Some(((a & 7) as u8, (b & 7) as u8))
}

/// An AML integer data object at `p`: its value and the offset after it.
fn aml_integer(aml: &[u8], p: usize) -> Option<(u64, usize)> {
    let op = *aml.get(p)?;
    let n = match op {
        0x00 => return Some((0, p + 1)),        // ZeroOp
        0x01 => return Some((1, p + 1)),        // OneOp
        0xff => return Some((u64::MAX, p + 1)), // OnesOp
        0x0a => 1,                              // BytePrefix
        0x0b => 2,                              // WordPrefix
        0x0c => 4,                              // DWordPrefix
        0x0e => 8,                              // QWordPrefix
        _ => return None,
    };
    let bytes = aml.get(p + 1..p + 1 + n)?;
    let v = bytes.iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b));
    Some((v, p + 1 + n))
}
