//! A real Linux kernel (Debian 12's cloud kernel) parsing remora's boot data.
//!
//! On this machine's kvm_pvm the kernel runs entirely in emulated ring 0
//! and dies on the `int3` of its self-test about a minute in, so the smoke
//! test asserts what Linux prints before that (its memory map, ACPI tables,
//! CPUs and command line) and then the clear emulation-failure message. On
//! a real KVM host the same kernel boots to userspace.

mod common;

use common::*;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use remora_vmm::boot::{load_kernel, read_zero_page, BootSpec, EntryMode};

/// The Debian kernel's files, fetched once with apt-get and cached in the
/// target directory.
struct Kernel {
    bzimage: PathBuf,
    vmlinux: PathBuf,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Decompresses the LZ4 "legacy" stream the kernel build uses
/// (magic 0x184c2102, then blocks of `u32 size | data`, 8 MiB each).
fn lz4_legacy_decompress(mut data: &[u8]) -> Vec<u8> {
    const MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    const BLOCK: usize = 8 << 20;
    assert_eq!(&data[..4], &MAGIC, "not an LZ4 legacy stream");
    data = &data[4..];
    let mut out = Vec::new();
    while data.len() >= 4 {
        if data[..4] == MAGIC {
            data = &data[4..];
            continue;
        }
        let size = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        if size == 0 || size > data.len() - 4 {
            break; // the trailing uncompressed-size word
        }
        let mut block = vec![0u8; BLOCK];
        let n = lz4_flex::block::decompress_into(&data[4..4 + size], &mut block).expect("LZ4 block");
        out.extend_from_slice(&block[..n]);
        data = &data[4 + size..];
    }
    out
}

/// The ELF vmlinux inside a bzImage (payload_offset/payload_length of the
/// setup header locate the compressed kernel).
fn extract_vmlinux(bz: &[u8]) -> Vec<u8> {
    let setup_sects = if bz[0x1f1] == 0 { 4 } else { bz[0x1f1] as usize };
    let start = (setup_sects + 1) * 512;
    let off = u32::from_le_bytes(bz[0x248..0x24c].try_into().unwrap()) as usize;
    let len = u32::from_le_bytes(bz[0x24c..0x250].try_into().unwrap()) as usize;
    let payload = &bz[start + off..start + off + len];
    assert_eq!(
        &payload[..4],
        &[0x02, 0x21, 0x4c, 0x18],
        "Debian's kernel is LZ4-compressed; this one is not (first bytes {:02x?})",
        &payload[..4]
    );
    let elf = lz4_legacy_decompress(payload);
    assert_eq!(&elf[..4], b"\x7fELF");
    elf
}

fn debian_kernel() -> Kernel {
    let dir = target_dir().join("remora-test-cache/linux");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = File::create(dir.join(".lock")).unwrap();
    lock.lock().unwrap(); // tests in parallel processes fetch once
    let bzimage = dir.join("vmlinuz");
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.exists() {
        let work = dir.join("fetch");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        sh(Command::new("apt-get")
            .args(["download", "linux-image-cloud-amd64"])
            .current_dir(&work));
        let meta = std::fs::read_dir(&work).unwrap().next().unwrap().unwrap().path();
        let depends = sh(Command::new("dpkg-deb").args(["-f", meta.to_str().unwrap(), "Depends"]));
        let pkg = depends
            .split([',', ' ', '('])
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
            .unwrap_or_else(|| panic!("no kernel package in Depends: {depends}"))
            .to_string();
        sh(Command::new("apt-get").args(["download", &pkg]).current_dir(&work));
        let deb = std::fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{pkg}_")))
            .unwrap();
        sh(Command::new("dpkg-deb").args(["-x", deb.to_str().unwrap(), work.join("x").to_str().unwrap()]));
        let vmlinuz = std::fs::read_dir(work.join("x/boot"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
            .expect("vmlinuz in the package");
        let bz = std::fs::read(&vmlinuz).unwrap();
        std::fs::write(&bzimage, &bz).unwrap();
        let tmp = dir.join("vmlinux.tmp");
        std::fs::write(&tmp, extract_vmlinux(&bz)).unwrap();
        std::fs::rename(&tmp, &vmlinux).unwrap();
        let _ = std::fs::remove_dir_all(&work);
    }
    Kernel { bzimage, vmlinux }
}

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 clearcpuid=xsave,xsaves,xsaveopt,xsavec";

#[test]
fn debian_kernel_boots_through_pvh_until_its_int3() {
    require_kvm();
    let k = debian_kernel();
    let run = run_remora(
        &[
            "run",
            "--kernel",
            k.vmlinux.to_str().unwrap(),
            "--vcpus",
            "2",
            "--mem",
            "512",
            "--cpu-hide",
            "cx16",
            "--cmdline",
            CMDLINE,
        ],
        Duration::from_secs(400),
    );
    run.check(!run.timed_out, "the kernel neither finished nor failed in time");
    run.check(run.line("Linux version").is_some(), "no 'Linux version'");
    // e820: exactly the map remora built for 512 MiB.
    let e820: Vec<&str> = run
        .lines
        .iter()
        .filter_map(|(_, l)| l.split("BIOS-e820: ").nth(1))
        .collect();
    run.check(
        e820 == [
            "[mem 0x0000000000000000-0x000000000009fbff] usable",
            "[mem 0x000000000009fc00-0x00000000000fffff] reserved",
            "[mem 0x0000000000100000-0x000000001fffffff] usable",
        ],
        &format!("unexpected e820 map {e820:?}"),
    );
    for table in ["ACPI: RSDP", "ACPI: XSDT", "ACPI: FACP", "ACPI: DSDT", "ACPI: APIC"] {
        run.check(run.line(table).is_some(), &format!("no '{table}'"));
    }
    run.check(
        !run.stdout().contains("ACPI Error") && !run.stdout().contains("ACPI BIOS Error"),
        "Linux reported an ACPI error",
    );
    run.check(
        run.line("smpboot: Allowing 2 CPUs").is_some(),
        "no 'smpboot: Allowing 2 CPUs'",
    );
    run.check(
        run.line(&format!("Kernel command line: {CMDLINE}"))
            .is_some_and(|(_, l)| l.ends_with(CMDLINE)),
        "command line not passed exactly",
    );
    // Then this machine's limit: the clear emulation-failure message.
    run.check(!run.status.success(), "expected a non-zero exit at the int3");
    let errors = run.error_lines();
    run.check(errors.len() == 1, "expected one error line");
    run.check(
        errors[0].contains("emulation failure")
            && errors[0].contains("RIP 0x")
            && errors[0].contains("instruction bytes: cc"),
        "the error does not name the emulation failure, RIP and the int3",
    );
}

#[test]
fn debian_bzimage_zero_page_follows_the_boot_protocol() {
    let k = debian_kernel();
    let mem = remora_vmm::memory::create_guest_memory(256).unwrap();
    let initrd = std::env::temp_dir().join(format!("remora-linux-initrd-{}", std::process::id()));
    std::fs::write(&initrd, vec![7u8; 3 << 20]).unwrap();
    let entry = load_kernel(
        &mem,
        &BootSpec {
            kernel: &k.bzimage,
            initrd: Some(Path::new(&initrd)),
            cmdline: "console=ttyS0 root=/dev/vda",
            mem_bytes: 256 << 20,
            rsdp_addr: 0xe0000,
        },
    )
    .unwrap();
    let _ = std::fs::remove_file(&initrd);
    assert_eq!(entry.mode, EntryMode::Linux64);
    let zp = read_zero_page(&mem).unwrap();
    let hdr = zp.hdr;
    assert!({ hdr.version } >= 0x020c, "64-bit boot needs protocol 2.12+");
    assert_ne!({ hdr.xloadflags } & 1, 0, "XLF_KERNEL_64");
    assert_eq!(entry.entry_addr, u64::from(hdr.code32_start) + 0x200);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
    assert_eq!({ zp.acpi_rsdp_addr }, 0xe0000);
    let (rd, rd_size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
    assert_eq!(rd_size, 3 << 20);
    assert_eq!(rd % 4096, 0);
    assert!(rd + rd_size <= u64::from(hdr.initrd_addr_max) + 1);
    assert!(rd + rd_size <= 256 << 20);
    // The initrd must not overlap the memory the kernel decompresses into.
    assert!(rd >= u64::from(hdr.code32_start) + u64::from(hdr.init_size));
    assert_eq!(zp.e820_entries, 3);
}
