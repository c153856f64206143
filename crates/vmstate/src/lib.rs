//! The state of a KVM machine, apart from guest memory and device models:
//! every vCPU's registers, FPU/XSAVE, LAPIC, MSRs, events and CPUID, and
//! the VM-wide in-kernel irqchip (PIC, IOAPIC), PIT and kvmclock.
//!
//! Capture and restore follow the orders Firecracker and Cloud Hypervisor
//! learned the hard way (see `../shared/notes/kvm-vmm-checklist.md`):
//! save mp_state first and vcpu_events last; restore CPUID first, MSRs
//! after the LAPIC (TSC_DEADLINE after TSC), events last, then
//! KVMCLOCK_CTRL.
//!
//! [`format`] wraps any serializable state in a versioned container with
//! checksums, so a torn or corrupt file is refused, never restored.

pub mod cpu;
pub mod format;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub tsc_khz: Option<u32>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// VM-wide in-kernel devices and the clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// Errors capturing or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("invalid state: {0}")]
    Invalid(String),
    #[error("this host cannot run the saved vCPU: it lacks {0}")]
    IncompatibleCpu(String),
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm(what, e)
}

/// MSR_IA32_TSC_DEADLINE: restored after everything else (it is only
/// meaningful once the TSC and LAPIC timer mode are in place).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_GET_MSRS takes at most this many entries at once.
const MSR_CHUNK: usize = 64;

/// The MSRs to save: KVM's list of MSRs it can save and restore.
pub fn msrs_to_save(hv: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(hv
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Completes any PIO/MMIO the vCPU has pending (KVM finishes it on the next
/// KVM_RUN; with immediate_exit set that run returns at once), so the saved
/// registers do not depend on an exit userspace already handled.
pub fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    // EINTR is the expected result.
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

/// Reads the MSRs in `indices`, skipping those KVM refuses to read.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut pending: Vec<u32> = indices.to_vec();
    while !pending.is_empty() {
        let take = pending.len().min(MSR_CHUNK);
        let chunk: Vec<kvm_msr_entry> = pending[..take]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < take {
            // KVM stops at the first MSR it cannot read: drop it, go on.
            tracing::debug!("MSR {:#x} not readable, not saved", pending[n]);
            pending.drain(..=n);
        } else {
            pending.drain(..take);
        }
    }
    Ok(out)
}

/// Captures a vCPU that is out of KVM_RUN (paused).
pub fn save_vcpu(fd: &mut VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    complete_pending_io(fd);
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = get_msrs(fd, msr_indices)?;
    let vcpu_events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        tsc_khz,
        msrs,
        vcpu_events,
    })
}

/// Restores a vCPU into a freshly created vCPU of a VM whose irqchip exists.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| StateError::Invalid(format!("CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    // The guest's TSC runs at the saved rate on a host whose TSC differs
    // (KVM scales it); before the MSRs, which include the TSC itself.
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!("cannot set the guest's TSC to {khz} kHz (its clock may drift): {e}");
            }
        }
    }
    fd.set_mp_state(s.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a whole kvm_xsave (4 KiB region), the size the
    // legacy KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let (deadline, rest): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) =
        s.msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    for group in [rest, deadline] {
        for chunk in group.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(StateError::Invalid(format!(
                    "KVM refused MSR {:#x} on restore",
                    chunk[n].index
                )));
            }
        }
    }
    fd.set_vcpu_events(&s.vcpu_events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    // Tell the guest's kvmclock the vCPU was paused (no soft-lockup splat).
    // Guests without kvmclock make this fail with EINVAL, which is fine.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Captures the VM-wide state (vCPUs paused).
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    // Only the clock value is restored; the flags describe this host's reading.
    clock.flags = 0;
    Ok(VmState {
        pit,
        clock,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Restores VM-wide state into a VM with an irqchip and a PIT.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    vm.set_clock(&s.clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Round trip through real KVM: a counting real-mode guest is paused,
/// saved, restored into a new VM and must continue from where it was.
#[cfg(test)]
mod kvm_tests {
    use super::*;
    use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
    use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

    // inc eax; mov [0x2000], eax; jmp $-8   (16-bit real mode)
    const CODE: [u8; 8] = [0x66, 0x40, 0x66, 0xa3, 0x00, 0x20, 0xeb, 0xf8];

    fn new_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config::default()).unwrap();
        let region = mem.iter().next().unwrap();
        let r = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which outlives the VM in these tests.
        unsafe { vm.set_user_memory_region(r) }.unwrap();
        vm
    }

    /// Runs the vCPU for `ms` milliseconds on a thread, then kicks it out.
    fn run_for(fd: VcpuFd, ms: u64) -> VcpuFd {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        register_signal_handler(SIGRTMIN(), noop).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let mut fd = fd;
            while !s.load(Ordering::Acquire) {
                let _ = fd.run();
            }
            fd
        });
        std::thread::sleep(Duration::from_millis(ms));
        stop.store(true, Ordering::Release);
        while !t.is_finished() {
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join().unwrap()
    }

    #[test]
    fn paused_vcpu_continues_in_a_new_vm() {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&CODE, GuestAddress(0x1000)).unwrap();
        let vm = new_vm(&kvm, &mem);
        let fd = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rax = 0;
        regs.rflags = 2;
        fd.set_regs(&regs).unwrap();

        let mut fd = run_for(fd, 30);
        let msrs = msrs_to_save(&kvm).unwrap();
        let vstate = save_vcpu(&mut fd, &msrs).unwrap();
        let mstate = save_vm(&vm).unwrap();
        let count = vstate.regs.rax as u32;
        assert!(count > 0, "the guest did not run");
        assert!(!vstate.msrs.is_empty());
        // Through the on-disk format and back.
        let bytes = format::encode(1, &(&vstate, &mstate)).unwrap();
        let (vstate, mstate): (VcpuState, VmState) = format::decode(1, &bytes).unwrap();
        cpu::check_compatible(&vstate.cpuid, &cpu::host_cpuid()).unwrap();

        // The old VM keeps counting: the copy must not depend on it.
        let mem2 = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut page = vec![0u8; 1 << 20];
        mem.read_slice(&mut page, GuestAddress(0)).unwrap();
        mem2.write_slice(&page, GuestAddress(0)).unwrap();
        let stored: u32 = mem2.read_obj(GuestAddress(0x2000)).unwrap();
        assert!(stored == count || stored + 1 == count, "memory {stored} vs eax {count}");
        drop(fd);
        drop(vm);

        let vm2 = new_vm(&kvm, &mem2);
        restore_vm(&vm2, &mstate).unwrap();
        let fd2 = vm2.create_vcpu(0).unwrap();
        restore_vcpu(&fd2, &vstate).unwrap();
        assert_eq!(fd2.get_regs().unwrap().rax as u32, count);
        let fd2 = run_for(fd2, 30);
        let after = fd2.get_regs().unwrap().rax as u32;
        let stored_after: u32 = mem2.read_obj(GuestAddress(0x2000)).unwrap();
        assert!(after > count, "restored guest did not continue: {after} <= {count}");
        assert!(stored_after >= count && stored_after <= after);
        assert_eq!(fd2.get_regs().unwrap().rip & !0xf, 0x1000, "still in the loop");
    }
}
