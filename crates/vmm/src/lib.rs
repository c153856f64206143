//! remora's virtual machine monitor: a KVM microVM with ACPI, SMP, a serial
//! console and ACPI power-off, booting PVH ELF kernels and bzImages.
//!
//! [`Vmm::new`] builds the machine from a [`VmConfig`]; [`Vmm::run`] runs it
//! until the guest powers off, resets, faults, or the caller stops it.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod diag;
pub mod layout;
pub mod memory;
pub mod vcpu;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use devices::legacy::{AcpiSleep, I8042};
use devices::serial::SerialConsole;
use devices::{lock, DeviceEvent, MmioBus, PioBus, PioDevice};
pub use vcpu::VcpuFault;

/// Largest vCPU count remora offers: APIC IDs are 8-bit in the MADT and
/// 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;

/// What to run.
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// CPU features to hide from the guest (names from [`cpuid::FEATURES`]).
    pub cpu_hide: Vec<String>,
    /// The KVM device, normally /dev/kvm.
    pub kvm_path: PathBuf,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// virtio-blk disks, in order (the first is /dev/vda under Linux).
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces on TAPs, in order.
    pub nets: Vec<NetConfig>,
}

pub use devices::virtio::net::NetConfig;

/// A `--disk PATH[,ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// Parses `PATH[,ro]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("--disk needs a path: --disk PATH[,ro]")?;
        let mut read_only = false;
        for opt in parts {
            match opt {
                "ro" | "readonly" => read_only = true,
                "rw" => read_only = false,
                other => return Err(format!("unknown --disk option '{other}' (known: ro, rw)")),
            }
        }
        Ok(DiskConfig {
            path: path.into(),
            read_only,
        })
    }
}

/// Events that end (or may end) the VM, from devices, vCPUs or the caller.
#[derive(Debug)]
pub enum VmEvent {
    Device(DeviceEvent),
    VcpuFault {
        index: u8,
        fault: VcpuFault,
    },
    /// The caller asks the VM to stop (e.g. on SIGTERM); the string says why.
    Stop(String),
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    PowerOff,
    Reset,
    Stopped(String),
    Fault { vcpu: u8, fault: VcpuFault },
}

impl VmExit {
    /// Whether the guest (or the operator) ended the VM normally.
    pub fn is_clean(&self) -> bool {
        !matches!(self, VmExit::Fault { .. })
    }
}

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{path} does not exist: KVM is not available on this host (load the kvm module, or enable nested virtualization for this VM)")]
    KvmMissing { path: PathBuf },
    #[error("permission denied opening {path}: run as root or join the group that owns it (usually 'kvm')")]
    KvmPermission { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    KvmOpen { path: PathBuf, source: std::io::Error },
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::BlockError),
    #[error(transparent)]
    Tap(#[from] devices::tap::TapError),
    #[error("too many virtio devices ({0}); at most {max}", max = layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error("VM setup failed: {0}")]
    Setup(String),
}

impl VmError {
    /// Maps a KVM ioctl error to [`VmError::Kvm`] naming the ioctl.
    pub fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
        move |e| VmError::Kvm(what, e)
    }
}

/// A built VM, ready to run.
pub struct Vmm {
    _kvm: Kvm,
    _vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<vcpu::Vcpu>,
    bus: PioBus,
    mmio: MmioBus,
    serial: Arc<Mutex<SerialConsole>>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
}

fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::KvmMissing { path: path.into() })?;
    Kvm::new_with_path(&c).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::KvmMissing { path: path.into() },
        libc::EACCES | libc::EPERM => VmError::KvmPermission { path: path.into() },
        _ => VmError::KvmOpen {
            path: path.into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        },
    })
}

impl Vmm {
    /// Builds the VM: KVM, memory, ACPI, kernel, devices and vCPUs.
    pub fn new(config: VmConfig) -> Result<Vmm, VmError> {
        if config.vcpus == 0 {
            return Err(VmError::NoVcpus);
        }
        let hidden = cpuid::parse_hidden(&config.cpu_hide)?;
        // Input that needs no KVM is checked first; the mapping is lazy.
        let mem = memory::create_guest_memory(config.mem_mib)?;
        let kvm = open_kvm(&config.kvm_path)?;
        let max = (kvm.get_max_vcpus() as u32).min(MAX_VCPUS);
        if config.vcpus > max {
            return Err(VmError::TooManyVcpus {
                requested: config.vcpus,
                max,
            });
        }
        let nvcpus = config.vcpus as u8;
        let mem_bytes = config.mem_mib << 20;

        let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(VmError::kvm("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(VmError::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(VmError::kvm("KVM_CREATE_PIT2"))?;
        memory::register_memory(&vm, &mem, false).map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;

        // Devices are opened before anything else touches the guest, so a
        // bad --disk is reported before boot.
        let mut virtio: Vec<Box<dyn devices::virtio::VirtioDevice>> = Vec::new();
        for n in &config.nets {
            virtio.push(Box::new(devices::virtio::net::Net::open(n)?));
        }
        for d in &config.disks {
            virtio.push(Box::new(devices::virtio::block::Block::open(&d.path, d.read_only)?));
        }
        if virtio.len() > layout::MAX_VIRTIO_DEVICES {
            return Err(VmError::TooManyDevices(virtio.len()));
        }
        let windows: Vec<acpi::MmioDevice> = (0..virtio.len())
            .map(|i| acpi::MmioDevice {
                addr: layout::VIRTIO_MMIO_BASE + i as u64 * devices::virtio::mmio::MMIO_WINDOW,
                len: devices::virtio::mmio::MMIO_WINDOW as u32,
                gsi: layout::VIRTIO_GSI_BASE + i as u32,
            })
            .collect();
        let rsdp = acpi::create_acpi_tables(&mem, nvcpus, &windows)?;
        let entry = boot::load_kernel(
            &mem,
            &boot::BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                mem_bytes,
                rsdp_addr: rsdp,
            },
        )?;

        let (events_tx, events_rx) = channel();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
            .map_err(VmError::kvm("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, config.console)));
        let bus = PioBus::new(vec![
            (layout::COM1_PORT, 8, serial.clone() as Arc<Mutex<dyn PioDevice>>),
            (
                I8042::BASE,
                I8042::LEN,
                Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
            ),
            (
                layout::ACPI_SLEEP_CONTROL_PORT,
                AcpiSleep::LEN,
                Arc::new(Mutex::new(AcpiSleep::new(events_tx.clone()))),
            ),
        ]);

        let mut mmio_windows = Vec::new();
        for (dev, w) in virtio.into_iter().zip(&windows) {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
            vm.register_irqfd(&irq, w.gsi).map_err(VmError::kvm("KVM_IRQFD"))?;
            let t = devices::virtio::mmio::MmioTransport::new(dev, mem.clone(), irq).map_err(VmError::Setup)?;
            for (qi, evt) in t.queue_evts().iter().enumerate() {
                let addr = IoEventAddress::Mmio(w.addr + devices::virtio::mmio::QUEUE_NOTIFY);
                vm.register_ioevent(evt, &addr, qi as u32)
                    .map_err(VmError::kvm("KVM_IOEVENTFD"))?;
            }
            mmio_windows.push((w.addr, u64::from(w.len), Arc::new(Mutex::new(t))));
        }
        let mmio = MmioBus::new(mmio_windows);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(nvcpus.into());
        for index in 0..nvcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
            let mut v = vcpu::Vcpu { index, fd };
            let cpuid = cpuid::vcpu_cpuid(&supported, index, nvcpus, &hidden);
            vcpu::configure(&mut v, &cpuid, &mem, &entry)?;
            vcpus.push(v);
        }
        tracing::info!(vcpus = nvcpus, mem_mib = config.mem_mib, mode = ?entry.mode, entry = entry.entry_addr, "VM built");
        Ok(Vmm {
            _kvm: kvm,
            _vm: vm,
            mem,
            vcpus,
            bus,
            mmio,
            serial,
            events_tx,
            events_rx,
        })
    }

    /// A sender the caller can use to stop the VM ([`VmEvent::Stop`]).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// The serial console, for feeding it input.
    pub fn serial(&self) -> Arc<Mutex<SerialConsole>> {
        self.serial.clone()
    }

    /// Runs the VM until it ends, then stops every vCPU.
    pub fn run(mut self) -> Result<VmExit, VmError> {
        extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        // Re-registering the same no-op handler on a later VM is harmless.
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| VmError::Setup(format!("vCPU kick signal handler: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for v in self.vcpus.drain(..) {
            let buses = (self.bus.clone(), self.mmio.clone());
            let (mem, stop, events) = (self.mem.clone(), stop.clone(), self.events_tx.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", v.index))
                .spawn(move || vcpu::run_loop(v, mem, buses, stop, events))
                .map_err(|e| VmError::Setup(format!("cannot start vCPU thread: {e}")))?;
            threads.push(t);
        }
        // The Vmm holds a sender itself, so recv() cannot fail while `self` lives.
        let exit = match self.events_rx.recv() {
            Err(_) => VmExit::Stopped("event channel closed".into()),
            Ok(VmEvent::Device(DeviceEvent::PowerOff)) => VmExit::PowerOff,
            Ok(VmEvent::Device(DeviceEvent::Reset)) => VmExit::Reset,
            Ok(VmEvent::Stop(why)) => VmExit::Stopped(why),
            Ok(VmEvent::VcpuFault { index, fault }) => VmExit::Fault { vcpu: index, fault },
        };
        stop.store(true, Ordering::Release);
        for t in threads {
            while !t.is_finished() {
                // A vCPU inside KVM_RUN leaves it with EINTR on this signal;
                // one that is about to enter sees `stop` or gets the next kick.
                if let Err(e) = t.kill(SIGRTMIN()) {
                    tracing::debug!("kick vCPU: {e}");
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            let _ = t.join();
        }
        lock(&self.serial).flush_output();
        Ok(exit)
    }
}
