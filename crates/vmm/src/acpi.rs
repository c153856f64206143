//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT.
//!
//! No MP table and no legacy PM blocks: the FADT is hardware-reduced and
//! points its sleep control register at [`ACPI_SLEEP_CONTROL_PORT`], its
//! reset register at the i8042 command port. Devices (COM1, the i8042, the
//! virtio-mmio windows) are described in the DSDT.

use crate::memory::GuestMemoryMmap;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"REMORA";
const OEM_TABLE_ID: [u8; 8] = *b"REMORAVM";
const OEM_REVISION: u32 = 1;
/// FADT IAPC_BOOT_ARCH: an 8042 is present (so Linux probes it for
/// keyboard-controller reset), no VGA.
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// A virtio-mmio window the DSDT describes (`LNRO0005`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub addr: u64,
    pub len: u32,
    pub gsi: u32,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(usize),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

// Not `#[from]`, which would also make it the error's source: the message
// already says it, and a source would be printed a second time.
impl From<vm_memory::GuestMemoryError> for AcpiError {
    fn from(e: vm_memory::GuestMemoryError) -> Self {
        AcpiError::GuestMemory(e)
    }
}

/// Serializes `Device(path) { _HID, _UID, [_CCA 1,] _CRS }` into `sink`.
fn device(sink: &mut Vec<u8>, path: &str, hid: &dyn Aml, uid: u32, cca: bool, resources: Vec<&dyn Aml>) {
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::Name::new("_HID".into(), hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let cca_name = aml::Name::new("_CCA".into(), &aml::ONE);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid];
    if cca {
        children.push(&cca_name);
    }
    children.push(&crs);
    aml::Device::new(path.into(), children).to_aml_bytes(sink);
}

/// The DSDT's AML: `_S5_`, COM1, the i8042 and the virtio-mmio devices.
pub fn dsdt_body(mmio: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5_: the sleep type the guest writes to the sleep control register.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    device(
        &mut body,
        "_SB_.COM1",
        &aml::EISAName::new("PNP0501"),
        0,
        false,
        vec![
            &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
            &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
        ],
    );
    device(
        &mut body,
        "_SB_.PS2K",
        &aml::EISAName::new("PNP0303"),
        0,
        false,
        vec![
            &aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
            &aml::IO::new(I8042_CMD_PORT, I8042_CMD_PORT, 1, 1),
            &aml::Interrupt::new(true, true, false, false, 1),
        ],
    );
    for (i, dev) in mmio.iter().enumerate() {
        device(
            &mut body,
            &format!("_SB_.V{i:03X}"),
            &"LNRO0005",
            i as u32,
            true,
            vec![
                &aml::Memory32Fixed::new(true, dev.addr as u32, dev.len),
                &aml::Interrupt::new(true, true, false, false, dev.gsi),
            ],
        );
    }
    body
}

fn sdt_header(sig: [u8; 4], len: u32, rev: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(36);
    h.extend_from_slice(&sig);
    h.extend_from_slice(&len.to_le_bytes());
    h.push(rev);
    h.push(0); // checksum, fixed below
    h.extend_from_slice(&OEM_ID);
    h.extend_from_slice(&OEM_TABLE_ID);
    h.extend_from_slice(&OEM_REVISION.to_le_bytes());
    h.extend_from_slice(&acpi_tables::CREATOR_ID);
    h.extend_from_slice(&acpi_tables::CREATOR_REVISION);
    h
}

/// Sets byte 9 so that the table sums to zero.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// The DSDT table.
pub fn dsdt(mmio: &[MmioDevice]) -> Vec<u8> {
    let body = dsdt_body(mmio);
    let mut t = sdt_header(*b"DSDT", (36 + body.len()) as u32, 6);
    t.extend_from_slice(&body);
    fix_checksum(&mut t);
    t
}

/// The hardware-reduced FADT pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.iapc_boot_arch = (IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    b.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        I8042_CMD_PORT.into(),
    );
    b.reset_value = I8042_RESET_CMD;
    b.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_CONTROL_PORT.into(),
    );
    b.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_STATUS_PORT.into(),
    );
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"REMORA\0\0").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

/// The MADT: one enabled local APIC per vCPU (APIC ID = index) and the IOAPIC.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    let mut out = Vec::new();
    m.to_aml_bytes(&mut out);
    out
}

/// Writes all tables at [`ACPI_START`] and returns the RSDP's address.
pub fn create_acpi_tables(mem: &GuestMemoryMmap, vcpus: u8, mmio: &[MmioDevice]) -> Result<u64, AcpiError> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        let end = at + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge((end - ACPI_START) as usize));
        }
        mem.write_slice(bytes, GuestAddress(at))?;
        next = align(end);
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(mmio))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(vcpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mmio = [MmioDevice {
            addr: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        }];
        let rsdp_addr = create_acpi_tables(&mem, 4, &mmio).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]));
        assert!(sums_to_zero(&rsdp));
        let xsdt = table_at(&mem, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(sums_to_zero(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        assert_ne!(flags & (1 << 10), 0, "reset register supported");
        // Sleep control register: I/O space, our port.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            u64::from(ACPI_SLEEP_CONTROL_PORT)
        );
        // Reset register: i8042 command port, value 0xfe.
        assert_eq!(
            u64::from_le_bytes(fadt[120..128].try_into().unwrap()),
            u64::from(I8042_CMD_PORT)
        );
        assert_eq!(fadt[128], I8042_RESET_CMD);
        let dsdt = table_at(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(sums_to_zero(&dsdt));
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"_S5_"));
        assert!(find(b"LNRO0005"));
        assert!(find(b"COM1"));
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(sums_to_zero(&madt));
        let (mut off, mut lapics, mut ioapics) = (44, 0, 0);
        while off < madt.len() {
            match madt[off] {
                0 => lapics += 1,
                1 => ioapics += 1,
                t => panic!("unexpected MADT entry type {t}"),
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (4, 1));
    }
}
