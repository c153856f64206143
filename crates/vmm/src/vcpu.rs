//! vCPU set-up and the per-vCPU run loop.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use remora_vmstate::VcpuState;

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
///
/// A pause can ask each vCPU thread to save its own vCPU's state
/// ([`VcpuControl::request_save`]): every thread does, in parallel, on its
/// own fd, as it parks (or, if already parked, when asked), and leaves the
/// result in its slot for [`VcpuControl::take_states`]. No other thread
/// issues ioctls on a vCPU fd.
pub struct VcpuControl {
    state: AtomicU8,
    /// Number of vCPUs.
    n: usize,
    parked: Mutex<Parked>,
    cv: Condvar,
}

/// What the threads and the VMM share under the lock.
#[derive(Default)]
struct Parked {
    /// vCPU threads parked in `checkpoint`.
    count: usize,
    /// The current save request, if any.
    save: Option<SaveRequest>,
    /// Numbers the requests.
    last_gen: u64,
    /// Per vCPU (by index): its state, and the request it answers.
    slots: Vec<Option<(u64, Result<VcpuState, String>)>>,
}

struct SaveRequest {
    gen: u64,
    /// The MSRs to save (computed once, shared by every thread).
    msrs: Arc<[u32]>,
}

impl VcpuControl {
    /// The control of `n` vCPUs (indices `0..n`), running.
    pub fn new(n: usize) -> Self {
        VcpuControl {
            state: AtomicU8::new(RUN),
            n,
            parked: Mutex::new(Parked {
                slots: (0..n).map(|_| None).collect(),
                ..Parked::default()
            }),
            cv: Condvar::new(),
        }
    }

    /// Called by vCPU `index`'s thread between runs: returns at once when
    /// running, blocks while paused (saving `fd` first, and whenever asked
    /// while parked), and returns false when the VM stops. `saved` is the
    /// last request this thread answered.
    fn checkpoint(&self, index: u8, fd: &mut VcpuFd, saved: &mut u64) -> bool {
        match self.state.load(Ordering::Acquire) {
            RUN => return true,
            STOP => return false,
            _ => {}
        }
        let mut g = crate::devices::lock(&self.parked);
        let mut counted = false;
        loop {
            let ask = g.save.as_ref().filter(|r| r.gen != *saved);
            if let Some((gen, msrs)) = ask.map(|r| (r.gen, r.msrs.clone())) {
                // Saved without the lock: every vCPU saves at once.
                drop(g);
                let state = remora_vmstate::save_vcpu(fd, &msrs).map_err(|e| format!("vCPU {index}: {e}"));
                *saved = gen;
                g = crate::devices::lock(&self.parked);
                if let Some(slot) = g.slots.get_mut(usize::from(index)) {
                    *slot = Some((gen, state));
                }
                self.cv.notify_all();
                continue;
            }
            // Parked (and saved, if asked) from here.
            if !counted {
                g.count += 1;
                counted = true;
                self.cv.notify_all();
            }
            if self.state.load(Ordering::Acquire) != PAUSE {
                break;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.count -= 1;
        self.cv.notify_all();
        self.state.load(Ordering::Acquire) == RUN
    }

    pub fn request_pause(&self) {
        self.state.store(PAUSE, Ordering::Release);
    }

    /// Asks every vCPU thread to save its vCPU (with the MSRs in `msrs`)
    /// as it parks, or now if it is parked; returns the request's number
    /// for [`VcpuControl::wait_saved`] and [`VcpuControl::take_states`].
    /// Threads only park on [`VcpuControl::request_pause`].
    pub fn request_save(&self, msrs: Arc<[u32]>) -> u64 {
        let mut g = crate::devices::lock(&self.parked);
        g.last_gen += 1;
        let gen = g.last_gen;
        g.save = Some(SaveRequest { gen, msrs });
        self.cv.notify_all();
        gen
    }

    /// Waits up to `timeout` until every vCPU has answered save request
    /// `gen`; true if they have.
    pub fn wait_saved(&self, gen: u64, timeout: std::time::Duration) -> bool {
        let answered = |p: &Parked| p.slots.iter().all(|s| matches!(s, Some((g, _)) if *g == gen));
        let g = crate::devices::lock(&self.parked);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |p| !answered(p))
            .unwrap_or_else(|p| p.into_inner());
        answered(&g)
    }

    /// Ends save request `gen` and takes every vCPU's state saved for it,
    /// in vCPU order (the first error if a vCPU could not be saved, or has
    /// not answered).
    pub fn take_states(&self, gen: u64) -> Result<Vec<VcpuState>, String> {
        let mut g = crate::devices::lock(&self.parked);
        if g.save.as_ref().is_some_and(|r| r.gen == gen) {
            g.save = None;
        }
        let mut out = Vec::with_capacity(self.n);
        for (i, slot) in g.slots.iter_mut().enumerate() {
            match slot.take() {
                Some((got, state)) if got == gen => out.push(state?),
                _ => return Err(format!("vCPU {i} did not save its state")),
            }
        }
        Ok(out)
    }

    /// Drops save request `gen` (a snapshot that gave up).
    pub fn cancel_save(&self, gen: u64) {
        let mut g = crate::devices::lock(&self.parked);
        if g.save.as_ref().is_some_and(|r| r.gen == gen) {
            g.save = None;
        }
    }

    pub fn request_stop(&self) {
        self.state.store(STOP, Ordering::Release);
        let _g = crate::devices::lock(&self.parked);
        self.cv.notify_all();
    }

    pub fn resume(&self) {
        self.state.store(RUN, Ordering::Release);
        let _g = crate::devices::lock(&self.parked);
        self.cv.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::Acquire) == PAUSE
    }

    /// Waits up to `timeout` until every vCPU is parked; true if they are.
    pub fn wait_paused(&self, timeout: std::time::Duration) -> bool {
        let g = crate::devices::lock(&self.parked);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |p| p.count < self.n)
            .unwrap_or_else(|p| p.into_inner());
        g.count >= self.n
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
/// vCPU faults; faults are reported on `events`. Only this thread uses
/// `fd`: it also saves the vCPU when a pause asks (see [`VcpuControl`]).
pub fn run_loop(
    index: u8,
    mut fd: VcpuFd,
    mem: GuestMemoryMmap,
    (bus, mmio): (PioBus, MmioBus),
    control: Arc<VcpuControl>,
    events: EventSender,
) {
    // Dropped (on every return) before `fd`.
    let kick = KickTarget::new(&mut fd);
    let mut saved = 0;
    loop {
        // After the flag is cleared (below): a kick since is seen here.
        if !control.checkpoint(index, &mut fd, &mut saved) {
            return;
        }
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

    /// vCPU `index` of `vm` in real mode, counting in EAX at 0x1000 with
    /// EBX = `index`.
    fn counting_vcpu(vm: &kvm_ioctls::VmFd, index: u8) -> VcpuFd {
        let fd = vm.create_vcpu(u64::from(index)).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        regs.rbx = u64::from(index);
        fd.set_regs(&regs).unwrap();
        // An AP would wait for INIT/SIPI.
        fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .unwrap();
        fd
    }

    /// Each vCPU thread saves its own vCPU when a pause asks for it (as it
    /// parks, or when already parked), and the states land in vCPU order.
    #[test]
    fn vcpu_threads_save_their_own_state_when_asked() {
        register_signal_handler(SIGRTMIN(), kick_handler).unwrap();
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        let mem = crate::memory::create_guest_memory(16).unwrap();
        crate::memory::register_memory(&vm, &mem, false).unwrap();
        // inc eax ; jmp $-2   (16-bit real mode)
        mem.write_slice(&[0x66, 0x40, 0xeb, 0xfc], GuestAddress(0x1000))
            .unwrap();
        const N: u8 = 2;
        let control = Arc::new(VcpuControl::new(N.into()));
        let (events, _events_rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..N)
            .map(|i| {
                let fd = counting_vcpu(&vm, i);
                let (mem, control, events) = (mem.clone(), control.clone(), events.clone());
                std::thread::spawn(move || run_loop(i, fd, mem, Default::default(), control, events))
            })
            .collect();
        let kick = |threads: &[std::thread::JoinHandle<()>]| {
            for t in threads {
                // SAFETY: signals a live thread of this test; the handler is registered.
                unsafe { libc::pthread_kill(std::os::unix::thread::JoinHandleExt::as_pthread_t(t), SIGRTMIN()) };
            }
        };
        let msrs: Arc<[u32]> = remora_vmstate::msrs_to_save(&kvm).unwrap().into();
        std::thread::sleep(Duration::from_millis(20));
        let mut last = vec![0u64; N.into()];
        for round in 0..3 {
            // As a snapshot does: ask for the states, pause, one kick each.
            let save = control.request_save(msrs.clone());
            control.request_pause();
            kick(&threads);
            assert!(control.wait_paused(Duration::from_secs(5)), "round {round}: not parked");
            assert!(control.wait_saved(save, Duration::from_secs(5)));
            let states = control.take_states(save).unwrap();
            assert_eq!(states.len(), usize::from(N));
            for (i, st) in states.iter().enumerate() {
                assert_eq!(st.regs.rbx, i as u64, "state of another vCPU in slot {i}");
                assert!(
                    st.regs.rax > last[i],
                    "round {round}: vCPU {i} did not run ({})",
                    st.regs.rax
                );
                last[i] = st.regs.rax;
            }
            // Already parked (a `pause` before the snapshot): saved on request.
            let again = control.request_save(msrs.clone());
            assert!(control.wait_saved(again, Duration::from_secs(5)));
            let states = control.take_states(again).unwrap();
            for (i, st) in states.iter().enumerate() {
                assert_eq!(st.regs.rax, last[i], "vCPU {i} ran while parked");
            }
            // Without a request, nothing is there to take.
            assert!(control.take_states(again).is_err());
            control.resume();
            // Long enough for both vCPU threads to get a CPU on a loaded
            // 2-core host (20 ms was not, once, in CI beside VM tests).
            std::thread::sleep(Duration::from_millis(200));
        }
        control.request_stop();
        for t in threads {
            while !t.is_finished() {
                kick(std::slice::from_ref(&t));
                std::thread::sleep(Duration::from_millis(1));
            }
            t.join().unwrap();
        }
    }
}
