//! remora's virtual machine monitor: a KVM microVM with ACPI, SMP, a serial
//! console and ACPI power-off, booting PVH ELF kernels and bzImages.
//!
//! [`Vmm::new`] builds the machine from a [`VmConfig`]; [`Vmm::run`] runs it
//! until the guest powers off, resets, faults, or the caller stops it.

pub mod acpi;
pub mod boot;
pub mod checkpoint;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod diag;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod uffd;
pub mod vcpu;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// Output commit for the nets (the engine between each device and its
    /// TAP), for a VM that is or will be protected; `None`: frames go
    /// straight to the TAP.
    pub output: Option<remora_speculate::Config>,
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
    /// A control-socket request and where to send the reply.
    Control(control::Command, Sender<control::Reply>),
    /// A request of the replication driver and where to send the reply.
    Repl(checkpoint::ReplRequest, Sender<Result<checkpoint::ReplReply, String>>),
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
    #[error("cannot open {path}: {error}")]
    KvmOpen { path: PathBuf, error: std::io::Error },
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
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("cannot restore: {0}")]
    State(remora_vmstate::StateError),
    #[error("control socket {path}: {error}")]
    Control { path: PathBuf, error: std::io::Error },
}

// Not `#[from]`, which would also make it the error's source: the message
// already says it, and a source would be printed a second time.
impl From<remora_vmstate::StateError> for VmError {
    fn from(e: remora_vmstate::StateError) -> Self {
        VmError::State(e)
    }
}

impl VmError {
    /// Maps a KVM ioctl error to [`VmError::Kvm`] naming the ioctl.
    pub fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
        move |e| VmError::Kvm(what, e)
    }
}

/// A built VM, ready to run.
pub struct Vmm {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    mem_mib: u64,
    /// The vCPUs until [`Vmm::run`] hands each to its thread (the only one
    /// to use it); empty from then on (count the vCPU threads instead).
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    /// The MSRs each vCPU saves, once known.
    msrs: Option<Arc<[u32]>>,
    bus: PioBus,
    mmio: MmioBus,
    serial: Arc<Mutex<SerialConsole>>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    control_path: Option<PathBuf>,
    /// Directory of the snapshot chain being extended, once a base was
    /// written there (KVM dirty logging is on from the first base tried).
    snapshot_dir: Option<PathBuf>,
    /// Pages dirtied since the last snapshot that was written in full.
    dirty: memory::DirtyCarry,
    /// The staging buffer of the last snapshot, kept for the next one.
    staging_buf: Vec<u8>,
    /// Copy-on-write for increments (None: copy during the pause).
    wp: Option<uffd::WriteProtect>,
    /// Whether setting up `wp` was tried (it is tried once, at the first
    /// increment with a `pause_copy` budget).
    wp_tried: bool,
    /// Write faults served while copying the last snapshot.
    wp_faults: usize,
    /// How long into a pause increments are copied before the remaining
    /// pages are write-protected and copied after it (None: all during
    /// the pause).
    pause_copy: Option<Duration>,
    /// Number of the next snapshot in `snapshot_dir`, if known.
    next_seq: Option<u32>,
    /// What replication needs of the devices.
    repl: checkpoint::ReplDevices,
    /// The replication driver's part of `protect` and `status`.
    repl_hook: Option<Box<dyn checkpoint::ReplHook>>,
    /// Pages written since the last checkpoint reached the backup, while
    /// replication tracks them (every harvest feeds it and `dirty`).
    repl_dirty: memory::DirtyCarry,
    tracking: bool,
    /// vCPUs of the VM (`vcpu_fds` is empty once it runs).
    vcpu_count: usize,
}

/// Merge dirty pages at most this many clean pages apart into one
/// write-protected range.
const WP_MAX_GAP: u64 = 16;

/// A snapshot's pages at the end of the pause.
enum Staged {
    /// Copied during the pause.
    Copied(snapshot::Staging),
    /// `pages[..in_pause]` copied into `staging` during the pause, the
    /// rest write-protected (as `runs`) to be copied after it.
    Protected {
        staging: snapshot::Staging,
        in_pause: usize,
        pages: Vec<u64>,
        runs: Vec<uffd::Run>,
    },
}

/// Where a snapshot's pause went, in microseconds.
struct PauseParts {
    /// vCPU, VM and device state.
    state_us: u128,
    /// Reading and clearing the dirty logs.
    harvest_us: u128,
    /// Write-protecting the dirty pages (copy-on-write).
    protect_us: u128,
    /// Copying pages into the staging buffer (during the pause, or with
    /// copy-on-write after it).
    copy_us: u128,
    /// Ranges write-protected (0: copied during the pause).
    runs: usize,
}

/// The devices and host resources of a VM rebuilt by [`Vmm::restore_from`].
pub struct RestoreDevices {
    pub kvm_path: PathBuf,
    pub console: Box<dyn Write + Send>,
    /// As given to `remora run` (same kinds, same order).
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// Output commit for the nets (see [`VmConfig::output`]).
    pub output: Option<remora_speculate::Config>,
    /// Engines restored from a checkpoint, by net device (they announce
    /// the guest's MAC when the device starts).
    pub engines: Vec<Option<RestoredEngine>>,
    /// Disk ids to present instead of those derived from the file names
    /// (a backup presents the primary's).
    pub disk_ids: Vec<[u8; devices::virtio::block::ID_LEN]>,
}

/// An engine rebuilt from a checkpoint, and its clock at that checkpoint.
pub struct RestoredEngine {
    pub engine: remora_speculate::Engine,
    pub now: Duration,
}

/// How to resume a snapshot.
pub struct RestoreConfig {
    pub snapshot: PathBuf,
    pub kvm_path: PathBuf,
    pub console: Box<dyn Write + Send>,
    /// The VM's devices, as given to `remora run` (same kinds, same order;
    /// paths and TAP names may differ).
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
}

/// Opens the virtio devices: nets first, then disks, in command-line order.
/// With `output`, every net device gets the speculative engine between
/// it and its TAP (`engines[i]`, restored from a checkpoint, or a fresh
/// one), in auto-commit mode until a backup protects the VM.
fn open_virtio(
    nets: &[NetConfig],
    disks: &[DiskConfig],
    output: Option<&remora_speculate::Config>,
    mut engines: Vec<Option<RestoredEngine>>,
    disk_ids: &[[u8; devices::virtio::block::ID_LEN]],
) -> Result<(Vec<Box<dyn devices::virtio::VirtioDevice>>, checkpoint::ReplDevices), VmError> {
    use devices::virtio::net::{Net, OutputSetup};
    let mut virtio: Vec<Box<dyn devices::virtio::VirtioDevice>> = Vec::new();
    let mut repl = checkpoint::ReplDevices::default();
    engines.resize_with(nets.len(), || None);
    for (n, restored) in nets.iter().zip(engines) {
        let mut net = Net::open(n)?;
        match (restored, output) {
            (Some(r), _) => net.set_output_commit(OutputSetup {
                engine: r.engine,
                now: r.now,
                announce: true,
            }),
            (None, Some(cfg)) => net.set_output_commit(OutputSetup {
                engine: remora_speculate::Engine::new(cfg.clone())
                    .map_err(|e| VmError::Setup(format!("speculative engine: {e}")))?,
                now: Duration::ZERO,
                announce: false,
            }),
            (None, None) => {}
        }
        repl.nets.push(checkpoint::NetDevice {
            mac: n.mac,
            commit: net.output_commit(),
        });
        virtio.push(Box::new(net));
    }
    for (i, d) in disks.iter().enumerate() {
        let mut blk = devices::virtio::block::Block::open(&d.path, d.read_only)?;
        if let Some(id) = disk_ids.get(i) {
            blk.set_id(*id);
        }
        repl.disks.push(checkpoint::DiskDevice {
            path: d.path.clone(),
            size_bytes: blk.size_bytes(),
            read_only: blk.read_only(),
            id: blk.id(),
            log: blk.write_log(),
        });
        virtio.push(Box::new(blk));
    }
    if virtio.len() > layout::MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices(virtio.len()));
    }
    Ok((virtio, repl))
}

/// The MMIO windows and interrupts of `n` virtio devices.
fn virtio_windows(n: usize) -> Vec<acpi::MmioDevice> {
    (0..n)
        .map(|i| acpi::MmioDevice {
            addr: layout::VIRTIO_MMIO_BASE + i as u64 * devices::virtio::mmio::MMIO_WINDOW,
            len: devices::virtio::mmio::MMIO_WINDOW as u32,
            gsi: layout::VIRTIO_GSI_BASE + i as u32,
        })
        .collect()
}

/// Puts each device behind a virtio-mmio transport (fresh, or restored
/// from `snaps`) with an irqfd for its interrupt and an ioeventfd per queue.
fn attach_virtio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: Vec<Box<dyn devices::virtio::VirtioDevice>>,
    snaps: Option<&[devices::virtio::mmio::TransportSnap]>,
) -> Result<MmioBus, VmError> {
    use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
    let windows = virtio_windows(devices.len());
    let mut out = Vec::new();
    for (i, (dev, w)) in devices.into_iter().zip(&windows).enumerate() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
        vm.register_irqfd(&irq, w.gsi).map_err(VmError::kvm("KVM_IRQFD"))?;
        let t = match snaps.and_then(|s| s.get(i)) {
            Some(snap) => MmioTransport::restore(dev, mem.clone(), irq, snap),
            None => MmioTransport::new(dev, mem.clone(), irq),
        }
        .map_err(VmError::Setup)?;
        for (qi, evt) in t.queue_evts().iter().enumerate() {
            let addr = IoEventAddress::Mmio(w.addr + QUEUE_NOTIFY);
            vm.register_ioevent(evt, &addr, qi as u32)
                .map_err(VmError::kvm("KVM_IOEVENTFD"))?;
        }
        out.push((w.addr, u64::from(w.len), Arc::new(Mutex::new(t))));
    }
    Ok(MmioBus::new(out))
}

/// A VM with its in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
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
    Ok(vm)
}

/// COM1 (fresh, or resumed from a snapshot), the i8042 and the ACPI sleep
/// registers on a port bus.
fn legacy_devices(
    vm: &VmFd,
    events_tx: &Sender<VmEvent>,
    console: Box<dyn Write + Send>,
    serial_state: Option<&snapshot::SerialSnap>,
) -> Result<(PioBus, Arc<Mutex<SerialConsole>>), VmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Setup(format!("eventfd: {e}")))?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .map_err(VmError::kvm("KVM_IRQFD"))?;
    let serial = match serial_state {
        Some(st) => SerialConsole::from_state(st, serial_irq, console).map_err(|e| VmError::Setup(e.to_string()))?,
        None => SerialConsole::new(serial_irq, console),
    };
    let serial = Arc::new(Mutex::new(serial));
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
    Ok((bus, serial))
}

fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::KvmMissing { path: path.into() })?;
    Kvm::new_with_path(&c).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::KvmMissing { path: path.into() },
        libc::EACCES | libc::EPERM => VmError::KvmPermission { path: path.into() },
        _ => VmError::KvmOpen {
            path: path.into(),
            error: std::io::Error::from_raw_os_error(e.errno()),
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

        let vm = create_vm(&kvm)?;
        memory::register_memory(&vm, &mem, false).map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;

        // Devices are opened before anything else touches the guest, so a
        // bad --disk or --net is reported before boot.
        let (virtio, repl) = open_virtio(&config.nets, &config.disks, config.output.as_ref(), Vec::new(), &[])?;
        let windows = virtio_windows(virtio.len());
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
        let (bus, serial) = legacy_devices(&vm, &events_tx, config.console, None)?;

        let mmio = attach_virtio(&vm, &mem, virtio, None)?;

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
            vcpus.push(v.fd);
        }
        tracing::info!(vcpus = nvcpus, mem_mib = config.mem_mib, mode = ?entry.mode, entry = entry.entry_addr, "VM built");
        let mut vmm = Vmm::assemble(
            kvm,
            vm,
            (mem, config.mem_mib),
            vcpus,
            (bus, mmio, serial),
            (events_tx, events_rx),
        );
        vmm.repl = repl;
        Ok(vmm)
    }

    /// Rebuilds a VM from the snapshot chain in `cfg.snapshot` (the base and
    /// every increment, in order), in this fresh process.
    pub fn restore(cfg: RestoreConfig) -> Result<Vmm, VmError> {
        let dir = &cfg.snapshot;
        let (state, count) = snapshot::latest(dir)?;
        let mem = memory::create_guest_memory(state.mem_mib)?;
        let pages = snapshot::load_memory(dir, count, &mem)?;
        tracing::info!(snapshots = count, pages, "snapshot chain loaded");
        Vmm::restore_from(
            mem,
            state,
            RestoreDevices {
                kvm_path: cfg.kvm_path,
                console: cfg.console,
                disks: cfg.disks,
                nets: cfg.nets,
                output: None,
                engines: Vec::new(),
                disk_ids: Vec::new(),
            },
        )
    }

    /// Rebuilds a VM from guest memory that already holds its pages (a
    /// backup's standby memory, used in place) and its machine state.
    pub fn restore_from(
        mem: GuestMemoryMmap,
        state: snapshot::MachineSnapshot,
        cfg: RestoreDevices,
    ) -> Result<Vmm, VmError> {
        let host = remora_vmstate::cpu::host_cpuid();
        for v in &state.vcpus {
            remora_vmstate::cpu::check_compatible(&v.cpuid, &host)?;
        }
        let kvm = open_kvm(&cfg.kvm_path)?;
        let max = (kvm.get_max_vcpus() as u32).min(MAX_VCPUS);
        if state.vcpus.len() as u32 > max || state.vcpus.is_empty() {
            return Err(VmError::TooManyVcpus {
                requested: state.vcpus.len() as u32,
                max,
            });
        }
        let (virtio, repl) = open_virtio(&cfg.nets, &cfg.disks, cfg.output.as_ref(), cfg.engines, &cfg.disk_ids)?;
        if virtio.len() != state.devices.len() {
            return Err(VmError::Setup(format!(
                "the snapshot has {} virtio devices, the command line gives {}: pass the same --net/--disk options as to 'remora run'",
                state.devices.len(),
                virtio.len()
            )));
        }
        if vm_memory::GuestMemoryBackend::iter(&mem)
            .map(vm_memory::GuestMemoryRegion::len)
            .sum::<u64>()
            != state.mem_mib << 20
        {
            return Err(VmError::Setup(
                "guest memory and state disagree on the memory size".into(),
            ));
        }
        // Loading is not guest activity: start the next chain clean.
        for r in vm_memory::GuestMemoryBackend::iter(&mem) {
            std::ops::Deref::deref(r).bitmap().reset();
        }
        let vm = create_vm(&kvm)?;
        memory::register_memory(&vm, &mem, false).map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        let (events_tx, events_rx) = channel();
        let (bus, serial) = legacy_devices(&vm, &events_tx, cfg.console, Some(&state.serial))?;
        let mut vcpus = Vec::new();
        for (i, vs) in state.vcpus.iter().enumerate() {
            let fd = vm.create_vcpu(i as u64).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
            remora_vmstate::restore_vcpu(&fd, vs)?;
            vcpus.push(fd);
        }
        remora_vmstate::restore_vm(&vm, &state.vm)?;
        let mmio = attach_virtio(&vm, &mem, virtio, Some(&state.devices))?;
        tracing::info!(vcpus = vcpus.len(), "VM restored");
        let mut vmm = Vmm::assemble(
            kvm,
            vm,
            (mem, state.mem_mib),
            vcpus,
            (bus, mmio, serial),
            (events_tx, events_rx),
        );
        vmm.repl = repl;
        Ok(vmm)
    }

    fn assemble(
        kvm: Kvm,
        vm: VmFd,
        (mem, mem_mib): (GuestMemoryMmap, u64),
        vcpus: Vec<kvm_ioctls::VcpuFd>,
        (bus, mmio, serial): (PioBus, MmioBus, Arc<Mutex<SerialConsole>>),
        (events_tx, events_rx): (Sender<VmEvent>, Receiver<VmEvent>),
    ) -> Vmm {
        let vcpu_count = vcpus.len();
        Vmm {
            kvm,
            vm,
            mem,
            mem_mib,
            vcpu_fds: vcpus,
            msrs: None,
            bus,
            mmio,
            serial,
            events_tx,
            events_rx,
            control_path: None,
            snapshot_dir: None,
            dirty: memory::DirtyCarry::default(),
            staging_buf: Vec::new(),
            wp: None,
            wp_tried: false,
            wp_faults: 0,
            pause_copy: pause_copy_from_env(),
            next_seq: None,
            repl: checkpoint::ReplDevices::default(),
            repl_hook: None,
            repl_dirty: memory::DirtyCarry::default(),
            tracking: false,
            vcpu_count,
        }
    }

    /// How long into a checkpoint's pause dirty pages are copied; pages
    /// left then are write-protected (userfaultfd) and copied, copy on
    /// write, after the guest resumes. `None` (the default, or
    /// `REMORA_PAUSE_COPY_US=all`) copies every page during the pause;
    /// `REMORA_PAUSE_COPY_US=N` sets N microseconds.
    ///
    /// Copy-on-write is off by default because on a shadow-paging host
    /// (kvm_pvm) it costs the guest more than it saves: write-protecting
    /// a page costs the pause nearly as much as copying it (~0.25 vs
    /// ~0.37 us), and KVM drops its mappings of every protected page
    /// (MMU notifier), so the guest re-faults on them (a TCP stream into
    /// the guest ran 30-40% slower). With hardware two-dimensional paging
    /// those re-faults are cheap.
    pub fn set_pause_copy(&mut self, budget: Option<Duration>) {
        self.pause_copy = budget;
    }

    /// Serves control requests on a Unix socket at `path` while running.
    pub fn set_control_socket(&mut self, path: PathBuf) {
        self.control_path = Some(path);
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
        // Re-registering the same handler on a later VM is harmless.
        register_signal_handler(SIGRTMIN(), vcpu::kick_handler)
            .map_err(|e| VmError::Setup(format!("vCPU kick signal handler: {e}")))?;
        if let Some(path) = &self.control_path {
            control::serve(path, self.events_tx.clone()).map_err(|error| VmError::Control {
                path: path.clone(),
                error,
            })?;
        }
        let control = Arc::new(vcpu::VcpuControl::new(self.vcpu_fds.len()));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        // Each vCPU fd goes to its thread, the only one to use it.
        for (index, fd) in std::mem::take(&mut self.vcpu_fds).into_iter().enumerate() {
            let buses = (self.bus.clone(), self.mmio.clone());
            let (mem, control, events) = (self.mem.clone(), control.clone(), self.events_tx.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu::run_loop(index as u8, fd, mem, buses, control, events))
                .map_err(|e| VmError::Setup(format!("cannot start vCPU thread: {e}")))?;
            threads.push(t);
        }
        let exit = loop {
            // The Vmm holds a sender itself, so recv() cannot fail while `self` lives.
            match self.events_rx.recv() {
                Err(_) => break VmExit::Stopped("event channel closed".into()),
                Ok(VmEvent::Device(DeviceEvent::PowerOff)) => break VmExit::PowerOff,
                Ok(VmEvent::Device(DeviceEvent::Reset)) => break VmExit::Reset,
                Ok(VmEvent::Stop(why)) => break VmExit::Stopped(why),
                Ok(VmEvent::VcpuFault { index, fault }) => break VmExit::Fault { vcpu: index, fault },
                Ok(VmEvent::Control(cmd, reply)) => {
                    let r = self.handle_control(cmd, &control, &threads);
                    let _ = reply.send(r);
                }
                Ok(VmEvent::Repl(req, reply)) => {
                    let r = self.handle_repl(req, &control, &threads);
                    let _ = reply.send(r);
                }
            }
        };
        control.request_stop();
        for t in threads {
            while !t.is_finished() {
                // A vCPU inside KVM_RUN leaves it with EINTR on this signal;
                // one that is about to enter sees the stop or the next kick.
                if let Err(e) = t.kill(SIGRTMIN()) {
                    tracing::debug!("kick vCPU: {e}");
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            let _ = t.join();
        }
        lock(&self.serial).flush_output();
        if let Some(p) = &self.control_path {
            let _ = std::fs::remove_file(p);
        }
        Ok(exit)
    }

    /// Parks every vCPU outside KVM_RUN.
    fn pause_vcpus(&self, control: &vcpu::VcpuControl, threads: &[JoinHandle<()>]) -> Result<(), String> {
        control.request_pause();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut kicks = 0;
        loop {
            // One signal per thread is enough: it ends a KVM_RUN, or the
            // next one (see vcpu::kick_handler). Kicking again every few
            // milliseconds is only a safety net.
            for t in threads {
                let _ = t.kill(SIGRTMIN());
            }
            if control.wait_paused(Duration::from_millis(5)) {
                return Ok(());
            }
            kicks += 1;
            tracing::debug!(kicks, "vCPUs not parked 5 ms after a kick, kicking again");
            if Instant::now() > deadline {
                control.resume();
                return Err("vCPUs did not pause within 5 s".into());
            }
        }
    }

    fn handle_control(
        &mut self,
        cmd: control::Command,
        control: &vcpu::VcpuControl,
        threads: &[JoinHandle<()>],
    ) -> control::Reply {
        let state = |paused: bool| if paused { "paused" } else { "running" };
        match cmd {
            control::Command::Status => {
                let mut line = format!(
                    "{} vcpus={} mem_mib={} snapshot_dir={}",
                    state(control.is_paused()),
                    threads.len(),
                    self.mem_mib,
                    self.snapshot_dir
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|| "-".into())
                );
                if let Some(r) = self.repl_status() {
                    line.push(' ');
                    line.push_str(&r);
                }
                Ok(line)
            }
            control::Command::Protect { addr } => self.repl_protect(&addr),
            control::Command::Pause => {
                if !control.is_paused() {
                    self.pause_vcpus(control, threads)?;
                }
                Ok(state(true).into())
            }
            control::Command::Resume => {
                control.resume();
                Ok(state(false).into())
            }
            control::Command::Snapshot { dir, incremental } => {
                let was_paused = control.is_paused();
                self.wp_faults = 0;
                let msrs = self.msrs()?;
                // Other runnable threads on the host must not stretch the
                // pause: the VMM thread runs it at real-time priority.
                let _rt = RealTime::enter();
                let t0 = Instant::now();
                // Device workers park while the vCPUs are being stopped;
                // capture() waits for them.
                self.mmio.request_pause_all();
                // Each vCPU thread saves its own vCPU, all at once, as it
                // parks (or now, if already parked); capture() takes them.
                let save = control.request_save(msrs);
                let parked = if was_paused {
                    Ok(())
                } else {
                    self.pause_vcpus(control, threads)
                };
                let saved = parked.and_then(|()| {
                    if control.wait_saved(save, Duration::from_secs(5)) {
                        Ok(())
                    } else {
                        Err("vCPUs did not save their state within 5 s".to_string())
                    }
                });
                if let Err(e) = saved {
                    control.cancel_save(save);
                    if !was_paused {
                        control.resume();
                    }
                    self.mmio.resume_all();
                    return Err(e);
                }
                let kick_us = t0.elapsed().as_micros();
                let staged = self.capture(control, save, &dir, incremental, t0);
                if !was_paused {
                    control.resume();
                }
                let pause_us = t0.elapsed().as_micros();
                // Device workers go on right after the vCPUs (waking them
                // costs tens of microseconds here).
                self.mmio.resume_all();
                drop(_rt);
                let (state, staged, mut parts) = staged?;
                let staging = match staged {
                    Staged::Copied(s) => s,
                    Staged::Protected {
                        staging,
                        in_pause,
                        pages,
                        runs,
                    } => {
                        let t = Instant::now();
                        let staging = self.copy_protected(staging, &pages[in_pause..], &runs)?;
                        parts.copy_us += t.elapsed().as_micros();
                        staging
                    }
                };
                let pages = staging.pages.len();
                let written = snapshot::write(&dir, &state, &staging);
                self.staging_buf = staging.into_buffer();
                // Only a snapshot written in full extends (or starts) a
                // chain; a failed one keeps its dirty pages for the next.
                let bytes = match written {
                    Ok(bytes) => {
                        self.dirty.delivered();
                        self.snapshot_dir = Some(dir);
                        self.next_seq = Some(state.seq + 1);
                        bytes
                    }
                    Err(e) => {
                        self.next_seq = None;
                        return Err(e.to_string());
                    }
                };
                Ok(format!(
                    "seq={} pages={pages} pause_us={pause_us} bytes={bytes} kick_us={kick_us} state_us={} harvest_us={} protect_us={} copy_us={} wp_runs={} wp_faults={}",
                    state.seq, parts.state_us, parts.harvest_us, parts.protect_us, parts.copy_us, parts.runs, self.wp_faults
                ))
            }
        }
    }

    /// With the vCPUs parked: takes the vCPU states their threads saved
    /// for request `save`, saves VM/device state and copies the pages for
    /// this snapshot into a staging buffer (or protects them for
    /// copy-on-write). Leaves the device workers parked.
    fn capture(
        &mut self,
        control: &vcpu::VcpuControl,
        save: u64,
        dir: &std::path::Path,
        incremental: bool,
        paused_at: Instant,
    ) -> Result<(snapshot::MachineSnapshot, Staged, PauseParts), String> {
        let t0 = Instant::now();
        let vcpus = control.take_states(save)?;
        let seq = if incremental {
            if self.snapshot_dir.as_deref() != Some(dir) {
                return Err(snapshot::SnapshotError::NeedBase(dir.into()).to_string());
            }
            // The chain's next number, known from the last snapshot unless
            // the directory changed since (a full scan costs a stat per
            // snapshot in the chain).
            match self.next_seq {
                Some(s)
                    if !snapshot::state_path(dir, s).exists()
                        && (s == 0 || snapshot::state_path(dir, s - 1).exists()) =>
                {
                    s
                }
                _ => snapshot::next_seq(dir),
            }
        } else {
            if snapshot::next_seq(dir) != 0 {
                return Err(snapshot::SnapshotError::NotEmpty(dir.into()).to_string());
            }
            0
        };
        let vm = remora_vmstate::save_vm(&self.vm).map_err(|e| e.to_string())?;
        let serial = lock(&self.serial).state();
        // Device workers park between requests for the same cut; the
        // caller resumes them once the pages are staged.
        let devices = self.mmio.pause_all().map_err(|e| {
            tracing::error!("snapshot refused, the VM keeps running: {e}");
            format!("cannot snapshot the devices: {e}")
        })?;
        let t1 = Instant::now();
        let (staging, harvest_us, copy_us) = self.stage_pages(incremental, paused_at)?;
        let t2 = Instant::now();
        let parts = PauseParts {
            state_us: (t1 - t0).as_micros(),
            harvest_us,
            protect_us: (t2 - t1).as_micros().saturating_sub(harvest_us + copy_us),
            copy_us,
            runs: match &staging {
                Staged::Copied(_) => 0,
                Staged::Protected { runs, .. } => runs.len(),
            },
        };
        Ok((
            snapshot::MachineSnapshot {
                seq,
                mem_mib: self.mem_mib,
                vcpus,
                vm,
                serial,
                devices,
            },
            staging,
            parts,
        ))
    }

    /// The MSRs every vCPU saves (KVM's list, read once).
    fn msrs(&mut self) -> Result<Arc<[u32]>, String> {
        if let Some(m) = &self.msrs {
            return Ok(m.clone());
        }
        let list: Arc<[u32]> = remora_vmstate::msrs_to_save(&self.kvm)
            .map_err(|e| e.to_string())?
            .into();
        self.msrs = Some(list.clone());
        Ok(list)
    }

    /// Stages this snapshot's pages (all for a base, dirty for an
    /// increment): copies them, or write-protects them for
    /// [`Vmm::copy_protected`] after the pause; also returns the time the
    /// dirty-log harvest took.
    fn stage_pages(&mut self, incremental: bool, paused_at: Instant) -> Result<(Staged, u128, u128), String> {
        let t = Instant::now();
        // Pages of earlier snapshots that failed to be written stay in the
        // set until one is written (see memory::DirtyCarry).
        Ok(if incremental {
            self.harvest()?;
            let dirty = self.dirty.pages();
            let harvest_us = t.elapsed().as_micros();
            if self.pause_copy.is_some() && !self.wp_tried {
                // Registered only when used: it is not free for the guest.
                self.wp_tried = true;
                match uffd::WriteProtect::new(&self.mem) {
                    Ok(wp) => self.wp = Some(wp),
                    Err(e) => tracing::warn!("no copy-on-write, increments are copied during the pause: {e}"),
                }
            }
            let buf = std::mem::take(&mut self.staging_buf);
            let deadline = match (&self.wp, self.pause_copy) {
                (Some(_), Some(d)) => Some(paused_at + d),
                _ => None,
            };
            let (staging, done) = snapshot::Staging::copy_until(&self.mem, dirty, buf, deadline);
            let copy_us = t.elapsed().as_micros() - harvest_us;
            if done == dirty.len() {
                return Ok((Staged::Copied(staging), harvest_us, copy_us));
            }
            let rest = &dirty[done..];
            let protected = self.wp.as_ref().map(|wp| {
                let runs = uffd::runs(wp, rest, WP_MAX_GAP);
                uffd::protect(wp, &runs).map(|()| runs)
            });
            match protected {
                Some(Ok(runs)) => (
                    Staged::Protected {
                        staging,
                        in_pause: done,
                        pages: dirty.to_vec(),
                        runs,
                    },
                    harvest_us,
                    copy_us,
                ),
                failed => {
                    if let Some(Err(e)) = failed {
                        tracing::warn!("copy-on-write off, copying during the pause from now on: {e}");
                    }
                    self.wp = None;
                    // Not reached without `wp`: the copy had no deadline.
                    let (mut rest_staged, _) = snapshot::Staging::copy_until(&self.mem, rest, Vec::new(), None);
                    let mut staging = staging;
                    staging.append(&mut rest_staged);
                    (Staged::Copied(staging), harvest_us, copy_us)
                }
            }
        } else {
            let buf = std::mem::take(&mut self.staging_buf);
            // From the base on, KVM logs guest writes for the increments.
            memory::register_memory(&self.vm, &self.mem, true).map_err(|e| format!("dirty logging: {e}"))?;
            // A base holds every page; its harvest only matters to the
            // current chain, if the base is not written.
            self.harvest()?;
            let harvest_us = t.elapsed().as_micros();
            let staging =
                snapshot::Staging::copy_into(&self.mem, &snapshot::Staging::populated_pages(&self.mem), true, buf);
            (
                Staged::Copied(staging),
                harvest_us,
                t.elapsed().as_micros() - harvest_us,
            )
        })
    }

    /// Copies write-protected pages while the guest runs (see
    /// [`uffd::copy_protected`]); on a userfaultfd failure turns
    /// copy-on-write off, which releases any writer still waiting.
    fn copy_protected(
        &mut self,
        staging: snapshot::Staging,
        pages: &[u64],
        runs: &[uffd::Run],
    ) -> Result<snapshot::Staging, String> {
        let Some(wp) = &self.wp else {
            // Not reached: pages are only protected while `wp` is set.
            return Err("internal error: protected pages without a userfaultfd".into());
        };
        let (staging, faults, result) = uffd::copy_protected(wp, pages, runs, staging);
        self.wp_faults = faults;
        if let Err(e) = result {
            tracing::warn!("copy-on-write off, copying during the pause from now on: {e}");
            self.wp = None;
        }
        Ok(staging)
    }
}

/// `REMORA_PAUSE_COPY_US` (microseconds, or `all`); unset means `all`.
/// See [`Vmm::set_pause_copy`].
fn pause_copy_from_env() -> Option<Duration> {
    match std::env::var("REMORA_PAUSE_COPY_US") {
        Ok(v) if v.trim() == "all" => None,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(us) => Some(Duration::from_micros(us)),
            Err(_) => {
                tracing::warn!("ignoring REMORA_PAUSE_COPY_US={v}: expected microseconds or 'all'");
                None
            }
        },
        Err(_) => None,
    }
}

/// Moves the calling thread to SCHED_FIFO priority 1 for good, if the
/// host allows it (CAP_SYS_NICE); returns whether it did. For threads that
/// must run within milliseconds however busy the host is and that use
/// little CPU, such as replication heartbeats.
pub fn promote_to_realtime() -> bool {
    let rt = libc::sched_param { sched_priority: 1 };
    // SAFETY: a plain syscall on the calling thread with a valid pointer.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &rt) == 0 }
}

/// Runs the calling thread at SCHED_FIFO priority 1 until dropped (then
/// back to its old policy), if the host allows it: a checkpoint's pause
/// is short (milliseconds) and must not wait for other threads' time
/// slices. Without the privilege (CAP_SYS_NICE) nothing changes.
struct RealTime(Option<(libc::c_int, libc::sched_param)>);

impl RealTime {
    fn enter() -> RealTime {
        let mut old = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscalls on the calling thread (pid 0) with valid
        // pointers to local sched_param values.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            if policy < 0 || libc::sched_getparam(0, &mut old) != 0 {
                return RealTime(None);
            }
            let rt = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &rt) != 0 {
                return RealTime(None);
            }
            RealTime(Some((policy, old)))
        }
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        if let Some((policy, old)) = self.0 {
            // SAFETY: as in `enter`.
            unsafe { libc::sched_setscheduler(0, policy, &old) };
        }
    }
}
