//! remora-guest: a bare-metal x86_64 test guest for remora.
//!
//! A tiny ring-0 shim written in assembly (`shim.S`: PVH entry, paging,
//! GDT/TSS/IDT, syscalls, the AP trampoline) and a ring-3 Rust program (this
//! crate) that does all the work. On kvm_pvm hosts ring 0 is emulated one
//! instruction at a time and dies on SSE, while ring 3 runs natively; so no
//! compiled code ever runs in ring 0 (see /work/shared/notes/pvm.md).
//!
//! Boot: the shim enters ring 3 at [`remora_entry`] on every CPU. The BSP
//! prints its first line, reads the PVH start info, the command line and
//! the ACPI tables, starts the APs, runs the workloads and powers off.
//!
//! Modules: `shim.S` (ring 0), `sys` (syscall wrappers), `console`,
//! `bootinfo` (PVH start info), `cmdline`, `acpi`, `power`, `smp`, `time`,
//! `irq` (IOAPIC, LAPIC timer, calibration, sleeping), `virtio`
//! (discovery, transport, split rings), `blk`, `net` (virtio-net +
//! smoltcp), `memtest`, `clock`, `bg` (the per-CPU endless workloads),
//! `workloads`; `phys`, `palloc` (physical bump
//! allocator), `pattern` (deterministic data) and `sync` are helpers.

#![no_std]
#![no_main]

mod acpi;
mod bg;
mod blk;
mod bootinfo;
mod clock;
mod cmdline;
mod console;
mod irq;
mod mem;
mod memtest;
mod net;
mod palloc;
mod pattern;
mod phys;
mod power;
mod smp;
mod sync;
mod sys;
mod time;
mod virtio;
mod workloads;

use acpi::{Acpi, OptGas};
use bootinfo::StartInfo;
use cmdline::Config;
use console::Sanitized;
use power::Power;
use smp::Lapic;

core::arch::global_asm!(include_str!("shim.S"), options(att_syntax));

#[global_allocator]
static ALLOCATOR: palloc::Bump = palloc::Bump;

/// Ring-3 entry of every CPU, `iretq`ed to by the shim with this CPU's
/// index (0 = the BSP) and the physical address of the PVH start info.
#[no_mangle]
pub extern "C" fn remora_entry(cpu: u32, start_info: u32) -> ! {
    if cpu == 0 {
        bsp_main(u64::from(start_info))
    } else {
        smp::ap_main(cpu)
    }
}

fn bsp_main(start_info: u64) -> ! {
    smp::bsp_online();
    let info = match StartInfo::read(start_info) {
        Ok(info) => info,
        Err(e) => {
            say!("error: unusable PVH start info at {start_info:#x}: {e}");
            Power::without_acpi().poweroff()
        }
    };
    let mut cmdline_buf = [0u8; bootinfo::CMDLINE_MAX];
    let cmdline = info.cmdline(&mut cmdline_buf);
    say!("boot cmdline=\"{}\"", Sanitized(cmdline));

    let acpi = Acpi::discover(info.rsdp_paddr).unwrap_or_else(|e| {
        say!("warning: no ACPI ({e}): one CPU, power-off via isa-debug-exit");
        Acpi::none()
    });
    let power = Power::from_acpi(&acpi);
    let config = match Config::parse(cmdline) {
        Ok(c) => c,
        Err(e) => {
            match e {
                cmdline::Error::UnknownWorkload(w) => say!("error: unknown workload '{w}'"),
                cmdline::Error::TooManyWorkloads => {
                    say!("error: more than {} workloads", cmdline::MAX_WORKLOADS)
                }
                cmdline::Error::NotUtf8 => say!("error: command line is not UTF-8"),
                cmdline::Error::BadValue { key, value } => {
                    say!("error: bad value '{value}' for '{key}'")
                }
            }
            power.poweroff()
        }
    };
    if config.debug {
        print_debug(&info, &acpi, &power, &config);
    }

    // SAFETY: the LAPIC address from the MADT (or the architectural
    // default), below 4 GiB.
    let lapic = unsafe { Lapic::new(acpi.lapic_addr) };
    lapic.enable();
    let mut avoid = acpi.tables;
    info.reserve(&mut avoid, cmdline.len());
    let me = lapic.id();
    let others = acpi.apic_ids().iter().filter(|&&id| id != me).count();
    if others > 0 {
        match smp::pick_trampoline_page(&info, &avoid) {
            Some(page) => {
                let n = smp::start_aps(&lapic, acpi.apic_ids(), page);
                if config.debug || n as usize != others + 1 {
                    say!("smp: {n} of {} cpus online (trampoline {page:#x})", others + 1);
                }
            }
            None => say!("warning: no free page below 1 MiB for the AP trampoline"),
        }
    }

    // Timers (and so the TSC rate) matter only to the device and memory
    // workloads; calibrating costs ~35 ms, so plain boots skip it.
    let needs_timers = config.workloads().iter().any(|w| {
        w.is_net()
            || matches!(
                w,
                cmdline::Workload::Disk { .. }
                    | cmdline::Workload::DiskCheck { .. }
                    | cmdline::Workload::DiskLoop { .. }
                    | cmdline::Workload::Mem { .. }
                    | cmdline::Workload::Clock
            )
    });
    if needs_timers {
        irq::calibrate(&lapic);
    }
    if config.debug && needs_timers {
        say!(
            "debug: tsc_hz={} lapic_timer_khz={}",
            time::tsc_hz(),
            irq::lapic_ticks_per_ms()
        );
    }
    palloc::init(&info, &avoid);
    let (blk, net) = probe_virtio(&acpi, cmdline, &lapic);
    let machine = workloads::Machine {
        power: &power,
        lapic: &lapic,
        mem_kib: info.ram_kib(),
        blk,
        net,
        ip: config.ip,
        gateway: config.gateway,
    };
    workloads::run(machine, config.workloads())
}

/// Finds the virtio-mmio devices, routes their interrupts to this CPU and
/// brings up the first virtio-blk and the first virtio-net device.
fn probe_virtio(acpi: &Acpi, cmdline: &[u8], lapic: &Lapic) -> (Option<blk::Blk>, Option<net::VirtioNet>) {
    let found = virtio::discover(acpi.dsdt, cmdline);
    let (mut blk, mut net) = (None, None);
    for d in found.iter() {
        if !phys::is_mapped(d.base, 0x1000) {
            continue;
        }
        // SAFETY: a virtio-mmio window named by the firmware or the
        // command line, in the uncached part of the identity map.
        let mmio = unsafe { virtio::Mmio::new(d.base) };
        let Some((version, id)) = mmio.probe() else {
            continue;
        };
        let kind = match id {
            1 => "net",
            2 => "blk",
            _ => "other",
        };
        say!("virtio {kind} at {:#x} irq {}", d.base, d.gsi);
        if version != 2 {
            say!(
                "warning: legacy virtio-mmio (version {version}) at {:#x} not supported",
                d.base
            );
            continue;
        }
        // Without a MADT (QEMU microvm acpi=off) assume the standard I/O
        // APIC at 0xfec00000 serving GSIs from 0.
        let standard = acpi::IoApic {
            id: 0,
            addr: 0xfec0_0000,
            gsi_base: 0,
        };
        let io = match acpi.ioapics().next() {
            Some(_) => acpi.ioapic_for(d.gsi),
            None => Some(standard),
        };
        match io {
            Some(io) => {
                // SAFETY: the MADT's I/O APIC address (below 4 GiB, in the
                // uncached part of the identity map).
                let io = unsafe { irq::IoApic::new(u64::from(io.addr), io.gsi_base) };
                if !io.route(d.gsi, irq::DEVICE_VECTOR, lapic.id()) {
                    say!("warning: gsi {} is beyond its I/O APIC's pins", d.gsi);
                }
            }
            None => say!("warning: no I/O APIC for gsi {}", d.gsi),
        }
        match id {
            1 if net.is_none() => match net::VirtioNet::new(mmio) {
                Ok(n) => net = Some(n),
                Err(e) => say!("warning: virtio-net at {:#x}: {e}", d.base),
            },
            2 if blk.is_none() => match blk::Blk::new(mmio) {
                Ok(b) => blk = Some(b),
                Err(e) => say!("warning: virtio-blk at {:#x}: {e}", d.base),
            },
            _ => {}
        }
    }
    (blk, net)
}

/// `debug`: what the guest found.
fn print_debug(info: &StartInfo, acpi: &Acpi, power: &Power, config: &Config<'_>) {
    say!(
        "debug: start_info={:#x} version={} rsdp_paddr={:#x} memmap_paddr={:#x} entries={}",
        info.paddr,
        info.version,
        info.rsdp_paddr,
        info.memmap_paddr,
        info.memmap_entries
    );
    for e in info.memmap() {
        say!(
            "debug: memmap {:#012x}-{:#012x} type {}",
            e.addr,
            e.addr + e.size,
            e.kind
        );
    }
    say!(
        "debug: acpi rsdp={:#x}{} lapic={:#x} apic_ids={:?} extra_cpus={}",
        acpi.rsdp,
        if acpi.rsdp_scanned { " (scanned)" } else { "" },
        acpi.lapic_addr,
        acpi.apic_ids(),
        acpi.extra_cpus
    );
    for io in acpi.ioapics() {
        say!(
            "debug: ioapic id={} addr={:#x} gsi_base={}",
            io.id,
            io.addr,
            io.gsi_base
        );
    }
    match &acpi.fadt {
        Some(f) => say!(
            "debug: fadt rev={} flags={:#x} hw_reduced={} sleep_control={} pm1a_cnt={} s5={:?} reset={} value={:#x}",
            f.revision,
            f.flags,
            f.hw_reduced(),
            OptGas(f.sleep_control),
            OptGas(f.pm1a_cnt),
            f.s5,
            OptGas(f.reset.map(|r| r.0)),
            f.reset.map_or(0, |r| r.1)
        ),
        None => say!("debug: no FADT"),
    }
    say!(
        "debug: s5_type={} tsc_hz={:?} ip={:?} gw={:?}",
        power.s5_type(),
        time::tsc_hz_from_cpuid(),
        config.ip,
        config.gateway
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(l) => console::print_line_forced(format_args!("panic at {}:{}: {}", l.file(), l.line(), info.message())),
        None => console::print_line_forced(format_args!("panic: {}", info.message())),
    }
    sys::triple_fault()
}
