//! The workloads named by `workload=` (see `cmdline`).

use core::arch::asm;
use core::sync::atomic::Ordering;

use crate::bg;
use crate::blk::{self, Blk, DiskLoop};
use crate::clock::Mono;
use crate::cmdline::{Ipv4Cidr, Workload};
use crate::irq;
use crate::net::{self, VirtioNet};
use crate::power::Power;
use crate::say;
use crate::smp::{self, Job, Lapic};
use crate::sys;
use crate::time;

/// What the workloads may use.
pub struct Machine<'a> {
    pub power: &'a Power,
    pub lapic: &'a Lapic,
    /// RAM in the memory map, in KiB.
    pub mem_kib: u64,
    pub blk: Option<Blk>,
    pub net: Option<VirtioNet>,
    pub ip: Option<Ipv4Cidr>,
    pub gateway: Option<[u8; 4]>,
}

/// What the BSP's service loop does besides the network workloads:
/// `diskloop`, and with `clock` a check of the time on every pass.
pub struct Extra {
    pub disk: Option<DiskLoop>,
    pub clock: Option<Mono>,
}

impl Extra {
    /// Moves the disk loop on; true if anything completed.
    pub fn service(&mut self) -> bool {
        if let Some(m) = self.clock.as_mut() {
            m.check(0);
        }
        self.disk.as_mut().is_some_and(|d| d.service())
    }

    /// Arms the disk's interrupt; true if completions already wait.
    pub fn arm(&mut self) -> bool {
        self.disk.as_mut().is_some_and(|d| d.arm())
    }
}

/// Runs the workloads in order, then powers off. The endless ones come
/// after all the others: the network workloads (`sink`, `source`, `echo`,
/// `ping`) and `diskloop` in one service loop on the BSP, `mem` and
/// `clock` on every other CPU beside it, or on every CPU if there is no
/// service loop.
pub fn run(mut m: Machine<'_>, workloads: &[Workload<'_>]) -> ! {
    for w in workloads {
        match *w {
            Workload::Disk { mib } => blk::workload(m.blk.as_mut(), m.lapic, mib, false),
            Workload::DiskCheck { mib } => blk::workload(m.blk.as_mut(), m.lapic, mib, true),
            Workload::Mem { .. } | Workload::Clock | Workload::DiskLoop { .. } => {}
            Workload::Sink { .. } | Workload::Source { .. } | Workload::Echo { .. } | Workload::Ping { .. } => {}
            Workload::Info => say!("cpus={} mem_kib={}", smp::online(), m.mem_kib),
            Workload::Reboot => m.power.reset(),
            Workload::Panic => sys::triple_fault(),
            Workload::Fault => invalid_opcode(),
            Workload::Compute { iters } => compute(&m, iters),
            Workload::Unknown(name) => {
                say!("error: unknown workload '{}'", name);
                m.power.poweroff()
            }
        }
    }
    let net = workloads.iter().any(|w| w.is_net());
    let find = |f: fn(&Workload<'_>) -> Option<u64>| workloads.iter().find_map(f);
    let diskloop = find(|w| match *w {
        Workload::DiskLoop { mib } => Some(mib),
        _ => None,
    });
    let mem = find(|w| match *w {
        Workload::Mem { mib } => Some(mib),
        _ => None,
    });
    let clock = workloads.iter().any(|w| matches!(w, Workload::Clock));
    let serve = net || diskloop.is_some();
    if mem.is_some() || clock {
        // Without a service loop this never returns.
        bg::start(m.lapic, m.power, mem, clock, serve);
    }
    let mut extra = Extra {
        disk: diskloop.and_then(|mib| DiskLoop::new(m.blk.take(), mib)),
        clock: clock.then(Mono::new),
    };
    if net {
        match m.net.take() {
            Some(dev) => net::run(m.lapic, dev, m.ip, m.gateway, workloads, &mut extra),
            None => say!("net error: no virtio-net device"),
        }
    } else if extra.disk.is_some() {
        loop {
            let seen = irq::irq_count().load(Ordering::Acquire);
            if extra.service() || extra.arm() {
                continue;
            }
            irq::sleep(m.lapic, seen, Some(1_000_000));
        }
    }
    m.power.poweroff()
}

/// Raises #UD in ring 3; the shim reports it and triple-faults.
fn invalid_opcode() -> ! {
    // SAFETY: ud2 only raises #UD, which the shim's handler turns into a
    // console line and a triple fault; nothing returns here.
    unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// Runs `iters` iterations of `dec; jnz` on one register: the inner loop of
/// the `compute` workload. A host-side test (the workspace's
/// `tests/guest_boot.rs`) runs the identical instruction sequence on the
/// host to compare cycles per iteration with the guest's ring 3.
#[inline(never)]
pub fn spin(iters: u64) {
    if iters == 0 {
        return;
    }
    // SAFETY: the loop only counts a register down to zero.
    unsafe {
        asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) iters => _, options(nomem, nostack));
    }
}

/// One CPU's part of `compute`: TSC cycles for [`spin`]`(iters)`.
fn compute_on_cpu(_cpu: u32, iters: u64) -> u64 {
    let t0 = time::rdtsc_fenced();
    spin(iters);
    let t1 = time::rdtsc_fenced();
    t1.wrapping_sub(t0)
}

/// `compute:N`: every CPU spins N iterations; prints the slowest CPU's
/// cycles per iteration with three decimals.
fn compute(m: &Machine<'_>, iters: u64) {
    let results = smp::run_on_all(
        m.lapic,
        Job {
            func: compute_on_cpu,
            arg: iters,
        },
    );
    let slowest = results.iter().map(|r| r.load(Ordering::Relaxed)).max().unwrap_or(0);
    // Rounded to 1/1000 of a cycle, in integers.
    let milli = match iters {
        0 => 0,
        n => (u128::from(slowest) * 1000 + u128::from(n) / 2) / u128::from(n),
    };
    say!("compute cycles_per_iter={}.{:03}", milli / 1000, milli % 1000);
}
