//! vCPU set-up and the per-vCPU run loop.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::regs;
use crate::boot::BootEntry;
use crate::devices::{EventSender, MmioBus, PioBus};
use crate::diag;
use crate::{VmError, VmEvent};

/// Why a vCPU stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuFault {
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    TripleFault { rip: u64 },
    /// KVM_EXIT_INTERNAL_ERROR.
    Internal {
        suberror: u32,
        rip: u64,
        cpl: u8,
        bytes: Vec<u8>,
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry { reason: u64 },
    /// An exit remora does not handle, or a failing KVM_RUN.
    Unexpected(String),
}

impl std::fmt::Display for VcpuFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuFault::TripleFault { rip } => write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}"),
            VcpuFault::Internal {
                suberror,
                rip,
                cpl,
                bytes,
                data,
            } => {
                let what = match suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failure",
                    _ => "internal error",
                };
                write!(
                    f,
                    "KVM internal error: {what} (suberror {suberror}) at RIP {rip:#x} (CPL {cpl}), instruction bytes: {}",
                    if bytes.is_empty() { "unreadable".to_string() } else { diag::hex_bytes(bytes) }
                )?;
                if !data.is_empty() {
                    write!(f, ", data: {data:x?}")?;
                }
                Ok(())
            }
            VcpuFault::FailEntry { reason } => {
                write!(
                    f,
                    "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x})"
                )
            }
            VcpuFault::Unexpected(s) => write!(f, "{s}"),
        }
    }
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU this thread runs, while it
    /// runs one (null otherwise): the kick signal's handler sets it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Handler of the signal that kicks a vCPU thread (SIGRTMIN): sets the
/// thread's own vCPU's `kvm_run.immediate_exit`, so a kick is never lost,
/// wherever it lands. Inside KVM_RUN the signal alone makes it return
/// (EINTR); between the thread's last look at [`VcpuControl`] and its
/// next KVM_RUN, the flag makes that KVM_RUN return at once, before
/// entering the guest. The run loop clears the flag after each KVM_RUN and
/// then looks at the control again.
///
/// Async-signal-safe: one read of a constant-initialized thread-local
/// (no lazy initialization, no destructor) and one volatile byte store.
pub extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: a non-null pointer is this thread's vCPU's kvm_run
            // field, set by `KickTarget` while its VcpuFd (and so the
            // mapping) lives and reset before it is dropped; this handler
            // runs on that same thread. The byte is shared with the kernel,
            // which reads it when KVM_RUN starts.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// Points the kick handler of the calling thread at `fd`'s
/// `immediate_exit` until dropped (drop it before `fd`).
struct KickTarget(*mut u8);

impl KickTarget {
    fn new(fd: &mut VcpuFd) -> KickTarget {
        let p: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
        KickTarget(p)
    }

    /// Clears `immediate_exit` (while the exit being handled may borrow
    /// other parts of kvm_run).
    fn clear(&self) {
        // SAFETY: the field of the live VcpuFd this target was made from
        // (it outlives `self`); a one-byte volatile store that overlaps no
        // exit data a VcpuExit may borrow.
        unsafe { std::ptr::write_volatile(self.0, 0) };
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Run/pause/stop requests shared by the VMM and its vCPU threads. A vCPU
/// thread looks at it after every exit; the VMM kicks threads out of
/// KVM_RUN with a signal ([`kick_handler`]) so they look.
pub struct VcpuControl {
    state: AtomicU8,
    paused: Mutex<usize>,
    cv: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: AtomicU8::new(RUN),
            paused: Mutex::new(0),
            cv: Condvar::new(),
        }
    }
}

impl VcpuControl {
    /// Called by a vCPU thread between runs: returns at once when running,
    /// blocks while paused, and returns false when the VM stops.
    fn checkpoint(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            RUN => return true,
            STOP => return false,
            _ => {}
        }
        let mut paused = crate::devices::lock(&self.paused);
        *paused += 1;
        self.cv.notify_all();
        while self.state.load(Ordering::Acquire) == PAUSE {
            paused = self.cv.wait(paused).unwrap_or_else(|p| p.into_inner());
        }
        *paused -= 1;
        self.cv.notify_all();
        self.state.load(Ordering::Acquire) == RUN
    }

    pub fn request_pause(&self) {
        self.state.store(PAUSE, Ordering::Release);
    }

    pub fn request_stop(&self) {
        self.state.store(STOP, Ordering::Release);
        let _g = crate::devices::lock(&self.paused);
        self.cv.notify_all();
    }

    pub fn resume(&self) {
        self.state.store(RUN, Ordering::Release);
        let _g = crate::devices::lock(&self.paused);
        self.cv.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::Acquire) == PAUSE
    }

    /// Waits up to `timeout` until `n` vCPUs are parked; true if they are.
    pub fn wait_paused(&self, n: usize, timeout: std::time::Duration) -> bool {
        let g = crate::devices::lock(&self.paused);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |p| *p < n)
            .unwrap_or_else(|p| p.into_inner());
        *g >= n
    }
}

/// Sets a vCPU's CPUID, MSRs, LAPIC LINT pins and (for the boot CPU) its
/// registers. APs wait for INIT/SIPI in the in-kernel LAPIC.
pub fn configure(vcpu: &mut Vcpu, cpuid: &CpuId, mem: &GuestMemoryMmap, entry: &BootEntry) -> Result<(), VmError> {
    let fd = &vcpu.fd;
    fd.set_cpuid2(cpuid).map_err(VmError::kvm("KVM_SET_CPUID2"))?;
    let entries: Vec<kvm_msr_entry> = regs::boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| VmError::Setup(format!("MSR list: {e:?}")))?;
    let n = fd.set_msrs(&msrs).map_err(VmError::kvm("KVM_SET_MSRS"))?;
    if n != entries.len() {
        tracing::warn!("KVM accepted {n} of {} boot MSRs", entries.len());
    }
    set_lint(fd)?;
    if vcpu.index == 0 {
        let base = fd.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        let sregs = regs::boot_sregs(mem, entry.mode, &base).map_err(|e| VmError::Setup(e.to_string()))?;
        fd.set_sregs(&sregs).map_err(VmError::kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&regs::boot_regs(entry))
            .map_err(VmError::kvm("KVM_SET_REGS"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(VmError::kvm("KVM_SET_FPU"))?;
    }
    Ok(())
}

/// LINT0 = ExtINT (the 8259's output), LINT1 = NMI, as firmware would.
fn set_lint(fd: &VcpuFd) -> Result<(), VmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 7;
    const MODE_NMI: u32 = 4;
    let mut lapic = fd.get_lapic().map_err(VmError::kvm("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    fd.set_lapic(&lapic).map_err(VmError::kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Runs a vCPU until the VM stops (`stop` set and the thread kicked) or the
/// vCPU faults; faults are reported on `events`.
pub fn run_loop(
    index: u8,
    fd: Arc<Mutex<VcpuFd>>,
    mem: GuestMemoryMmap,
    (bus, mmio): (PioBus, MmioBus),
    control: Arc<VcpuControl>,
    events: EventSender,
) {
    // Dropped (on every return) before `fd`.
    let kick = KickTarget::new(&mut crate::devices::lock(&fd));
    loop {
        // After the flag is cleared (below): a kick since is seen here.
        if !control.checkpoint() {
            return;
        }
        // Held only while in KVM_RUN and handling its exit, so the VMM can
        // save the vCPU while it is parked in checkpoint().
        let mut fd = crate::devices::lock(&fd);
        let run = fd.run();
        // Set by a kick during this run or before it: consumed.
        kick.clear();
        let fault = match run {
            Ok(VcpuExit::IoOut(port, data)) => {
                if !bus.write(port, data) {
                    tracing::trace!(vcpu = index, port, "write to unclaimed port");
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    tracing::trace!(vcpu = index, addr, "read from unclaimed MMIO");
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    tracing::trace!(vcpu = index, addr, "write to unclaimed MMIO");
                }
                None
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Shutdown) => {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                Some(VcpuFault::TripleFault { rip })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                use crate::devices::DeviceEvent;
                let ev = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => DeviceEvent::Reset,
                    _ => DeviceEvent::PowerOff,
                };
                let _ = events.send(VmEvent::Device(ev));
                None
            }
            Ok(VcpuExit::InternalError) => Some(internal_error(&mut fd, &mem)),
            Ok(VcpuExit::FailEntry(reason, _)) => Some(VcpuFault::FailEntry { reason }),
            Ok(other) => Some(VcpuFault::Unexpected(format!("unhandled vCPU exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VcpuFault::Unexpected(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(fault) = fault {
            let _ = events.send(VmEvent::VcpuFault { index, fault });
            return;
        }
    }
}

fn internal_error(fd: &mut VcpuFd, mem: &GuestMemoryMmap) -> VcpuFault {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the
    // kernel fills the `internal` member of the kvm_run union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data = internal.data[..ndata].to_vec();
    let (rip, cpl, bytes) = match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => (r.rip, s.cs.dpl, diag::instruction_bytes(mem, &s, r.rip)),
        _ => (0, 0, Vec::new()),
    };
    VcpuFault::Internal {
        suberror: internal.suberror,
        rip,
        cpl,
        bytes,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

    /// A kick that lands after the run loop looked at its control and
    /// before KVM_RUN (here: just before) makes that KVM_RUN return at
    /// once instead of running the guest until some later kick.
    #[test]
    fn a_kick_before_kvm_run_is_not_lost() {
        register_signal_handler(SIGRTMIN(), kick_handler).unwrap();
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        let mem = crate::memory::create_guest_memory(16).unwrap();
        crate::memory::register_memory(&vm, &mem, false).unwrap();
        // jmp $ (forever)
        mem.write_slice(&[0xeb, 0xfe], GuestAddress(0x1000)).unwrap();
        let mut fd = crate::memory::real_mode_vcpu(&vm, 0x1000);
        let kick = KickTarget::new(&mut fd);
        // A watchdog ends a lost kick's KVM_RUN, so the test fails
        // instead of hanging.
        let done = Arc::new(AtomicBool::new(false));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let d = done.clone();
        let watchdog = std::thread::spawn(move || {
            let start = Instant::now();
            while !d.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
                if start.elapsed() < Duration::from_secs(2) {
                    continue;
                }
                // SAFETY: `me` is the test thread, alive until `done`.
                unsafe { libc::pthread_kill(me, SIGRTMIN()) };
            }
        });
        for round in 0..3 {
            // SAFETY: signals this thread; the handler is registered above.
            unsafe { libc::pthread_kill(me, SIGRTMIN()) };
            let t = Instant::now();
            let r = fd.run();
            kick.clear();
            let took = t.elapsed();
            assert!(
                matches!(&r, Err(e) if e.errno() == libc::EINTR),
                "round {round}: {:?}",
                r.map(|e| format!("{e:?}"))
            );
            assert!(
                took < Duration::from_secs(1),
                "round {round}: the kick was lost ({took:?})"
            );
        }
        done.store(true, Ordering::Release);
        watchdog.join().unwrap();
        drop(kick);
    }
}
