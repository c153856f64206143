//! `remora`: run a KVM microVM (and, as the project grows, replicate it).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use remora_replication::metrics::{Metrics, Role};
use remora_replication::primary::{PrimaryOptions, Protector};
use remora_replication::OutputMode;
use remora_vmm::{VmConfig, VmEvent, VmExit, Vmm};

#[derive(Parser)]
#[command(
    name = "remora",
    version,
    about = "A KVM hypervisor for highly available virtual machines",
    long_about = "remora runs KVM microVMs. `remora run` boots a kernel (a PVH ELF such as a Linux vmlinux \
or remora's test guest, or a bzImage) with ACPI, SMP and a serial console on stdout.\n\n\
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=remora_vmm=debug) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a microVM and attach its serial console to this terminal.
    ///
    /// The VM ends when the guest powers off or reboots (exit status 0), when
    /// it crashes (triple fault, KVM emulation failure: non-zero, with the
    /// cause), or on SIGINT/SIGTERM (exit status 0 after a clean stop).
    Run(RunArgs),
    /// Resume a VM from a snapshot directory (the base and its increments,
    /// applied in order) in this new process.
    Restore(RestoreArgs),
    /// Talk to a running VM's control socket.
    Ctl(CtlArgs),
    /// Stand by for a primary (`remora run --protect`) and take over its
    /// guest when it dies.
    ///
    /// The backup checks its devices (every --net TAP must exist, every
    /// --disk must open; MACs, disk sizes and modes must match the
    /// primary's: a mismatch refuses the primary at connect time), then
    /// listens. It receives the initial sync (memory and the disks'
    /// allocated extents, while the guest runs on the primary) and then one
    /// checkpoint per epoch: guest memory, vCPU and device state, the
    /// epoch's disk writes and the network engines' held bytes. Each
    /// checkpoint is verified (framed, checksummed) and applied all or
    /// nothing, then acknowledged; a corrupt one is refused and sent again.
    /// No kernel is needed here: the guest comes from the primary.
    ///
    /// When the primary dies (its connection closes, or it is silent for
    /// --heartbeat-timeout-ms) the backup resumes the guest from the last
    /// complete checkpoint on its own TAPs and disks, announces the guest's
    /// MAC on the LAN, and runs it as `remora run` would (serial console on
    /// stdout, --control socket, exit status). If the primary's guest powers
    /// off or its operator stops it, the backup exits (status 0) without
    /// taking over. With --fence the backup takes over only after moving
    /// the VM's generation in etcd (a primary that went on alone wins
    /// instead, and the backup stands by again); without a fence, a cut
    /// replication link makes both hosts run the guest. With --tls-* the
    /// link is mutual TLS; without it, plain TCP (a warning at start unless
    /// --insecure).
    Backup(BackupArgs),
    /// Relay TCP/IP between two TAP devices through remora's output-commit
    /// engine, without a VM: the inner TAP stands for the protected guest,
    /// the outer one for the network.
    ///
    /// Epochs are simulated: every --epoch-ms the current epoch ends, and
    /// --commit-delay-ms later it commits, as if a backup had acknowledged
    /// its checkpoint. Modes: `direct` forwards at once both ways (no
    /// replication, a plain layer-2 bridge); `buffered` holds every
    /// inner->outer frame until its epoch commits (plain Remus output
    /// commit); `speculative` acknowledges the inner side's TCP data at once,
    /// holds it until its epoch commits and then delivers it reliably itself
    /// (flows seen from their SYN; everything else is buffered). outer->inner
    /// is always immediate. Stops on SIGINT/SIGTERM with a summary (exit 0).
    Relay(RelayArgs),
    /// Make the certificates for mutual TLS on the replication link: a CA
    /// (`init`), then one certificate per node (`issue`): role `backup`
    /// for hosts that run `remora backup` (it must name the address the
    /// primaries dial, --san), role `primary` for hosts that run `remora
    /// run --protect`. Keys never leave DIR and are never overwritten.
    Certs(CertsArgs),
    /// RACC, remora's replication-aware TCP congestion control, for Linux
    /// guests (and any Linux host): install, remove, status.
    ///
    /// RACC is a BPF tcp_congestion_ops named `remora_racc` (no kernel
    /// module; needs BTF and BPF struct_ops, Linux 6.4+ for its links).
    /// Behind a remora VMM that speculates the guest's TCP, the VMM puts a
    /// mark (a TCP option) on the ACKs it builds: a RACC socket that sees it
    /// fills the window the VMM advertises at once and does not back off
    /// (the VMM delivers reliably to the real peer). Toward anything else it
    /// is the kernel's CUBIC. Select it per socket (TCP_CONGESTION), per
    /// route (`ip route ... congctl remora_racc`) or as the default
    /// (`install --default`). Run it inside the guest, as root.
    Racc(RaccArgs),
}

#[derive(Args)]
struct RaccArgs {
    #[command(subcommand)]
    action: RaccAction,
}

#[derive(Subcommand)]
enum RaccAction {
    /// Load and register remora_racc (idempotent) and its sock_ops watcher
    /// (on the cgroup v2 root); both stay after this command exits (pinned
    /// under /sys/fs/bpf/remora_racc).
    Install {
        /// Also make it this network namespace's default congestion control.
        #[arg(long)]
        default: bool,
    },
    /// Unregister remora_racc (the default goes back to cubic if it was
    /// RACC). Refuses while sockets use it, unless --force.
    Remove {
        /// Remove even while sockets use it (they keep it until they close).
        #[arg(long)]
        force: bool,
    },
    /// Whether it is installed, the default congestion control, sockets
    /// using it and its counters.
    Status,
}

#[derive(Args)]
struct CertsArgs {
    #[command(subcommand)]
    action: CertsAction,
}

#[derive(Subcommand)]
enum CertsAction {
    /// Create DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "remora replication CA")]
        name: String,
    },
    /// Create DIR/NAME.pem and DIR/NAME.key, signed by DIR's CA.
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node's name (also the files' names).
        name: String,
        /// What the node runs: `backup` (TLS server) or `primary` (TLS client).
        #[arg(long, value_enum)]
        role: CertRole,
        /// Addresses or DNS names in the certificate (a backup's must
        /// include the address primaries dial, e.g. 192.168.100.2).
        #[arg(long, value_name = "IP|DNS")]
        san: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CertRole {
    Primary,
    Backup,
}

/// How the replication link is secured (`run` and `backup`).
#[derive(Args, Clone)]
struct TlsArgs {
    /// This node's certificate (PEM; `remora certs issue`): mutual TLS on
    /// the replication link, with --tls-key and --tls-ca.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"], conflicts_with = "insecure")]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA that issued the peer's certificate (PEM): a peer without a
    /// certificate from it, or with the other role's, is refused before
    /// any guest state moves.
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Replicate over plain TCP (unauthenticated, unencrypted: anyone who
    /// can reach the link can read the guest's memory or feed a backup).
    /// Without TLS and without this flag remora says so at start.
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    /// The loaded TLS settings (None: plain TCP, with a warning unless
    /// --insecure).
    fn load(&self, who: &str, replicating: bool) -> anyhow::Result<Option<remora_replication::tls::Tls>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let files = remora_replication::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                Ok(Some(remora_replication::tls::Tls::load(&files)?))
            }
            _ => {
                if replicating && !self.insecure {
                    eprintln!(
                        "{who}: warning: the replication link is plain TCP (no --tls-cert/--tls-key/--tls-ca): unauthenticated and unencrypted; pass --insecure to say that is intended"
                    );
                }
                Ok(None)
            }
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputArg {
    /// The engine acknowledges the guest's TCP data at once and delivers it
    /// itself once its checkpoint is safe (fast).
    Speculative,
    /// Plain output commit: every frame waits for its checkpoint (Remus).
    Buffered,
}

#[derive(Args)]
struct BackupArgs {
    /// Address to wait for the primary on, e.g. 192.168.100.2:7700.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: std::net::SocketAddr,
    /// The guest's network interfaces, as on the primary (same order and
    /// MACs); each TAP must exist on this host, on the guest's LAN.
    #[arg(long, value_name = "tap=NAME,mac=MAC")]
    net: Vec<remora_vmm::NetConfig>,
    /// The guest's disks, as on the primary (same order, sizes and modes):
    /// this host's replicas, kept equal to the primary's by the
    /// checkpoints. Their content is overwritten.
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<remora_vmm::DiskConfig>,
    /// Serve control requests on this Unix socket once the guest runs here.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Take over when the primary has been silent this long.
    #[arg(long, value_name = "MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    heartbeat_timeout_ms: u64,
    /// One active copy, decided in etcd: etcd=URL[,URL...][,key=PREFIX]
    /// (e.g. etcd=http://10.0.0.5:2379). Before a copy emits the guest's
    /// output on its own (a VM starting, a primary going on without its
    /// backup, a backup taking over) it must move the VM's generation
    /// counter from the value it knows to the next one (compare-and-swap);
    /// the loser never emits a frame (a primary that loses stops, exit
    /// status 5; a backup that loses stands by). While etcd cannot be
    /// reached, output is held. Use the same value on primary and backup.
    /// Without a fence, a cut replication link can leave two active copies.
    #[arg(long, value_name = "etcd=URL,...")]
    fence: Option<remora_replication::fence::FenceConfig>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics (text format), e.g.
    /// 127.0.0.1:9100: while standing by, checkpoints applied, bytes
    /// received, whether a primary is connected; failovers; once the guest
    /// runs here, its protection figures as for `remora run --metrics`.
    /// Names start with `remora_`; any other path gets 404.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// The KVM device.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    kvm: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RelayMode {
    Direct,
    Buffered,
    Speculative,
}

#[derive(Args)]
struct RelayArgs {
    /// The protected side's TAP (opened if it exists, else created).
    #[arg(long, value_name = "NAME")]
    inner_tap: String,
    /// The network side's TAP (opened if it exists, else created).
    #[arg(long, value_name = "NAME")]
    outer_tap: String,
    /// How inner->outer traffic is released.
    #[arg(long, value_enum, default_value = "speculative")]
    mode: RelayMode,
    /// Epoch (checkpoint interval) in milliseconds, 1 to 10000.
    #[arg(long, value_name = "N", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    epoch_ms: u64,
    /// Time from the end of an epoch to its commit, in milliseconds (0 to 10000).
    #[arg(long, value_name = "D", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    commit_delay_ms: u64,
    /// Bytes one speculated TCP flow may hold (acknowledged to the inner
    /// side, not yet to the peer); a full budget closes the inner side's
    /// window. A flow's rate is at most budget / (epoch + commit delay +
    /// RTT): the default allows ~4.5 Gbit/s at 25 ms epochs.
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    budget: usize,
    /// Bytes all speculated flows together may hold.
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
    global_cap: usize,
    /// IP MTU of both links.
    #[arg(long, value_name = "BYTES", default_value_t = 1500)]
    mtu: usize,
    /// Print a line of counters every second.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct RestoreArgs {
    /// Snapshot directory written by `remora ctl ... snapshot --out DIR`.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Serve control requests on this Unix socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The VM's disks, as given to `remora run` (same order).
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<remora_vmm::DiskConfig>,
    /// The VM's network interfaces, as given to `remora run` (same order).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<remora_vmm::NetConfig>,
    /// The KVM device.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    kvm: PathBuf,
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's control socket (`remora run --control PATH`).
    socket: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Subcommand)]
enum CtlRequest {
    /// Print whether the VM runs or is paused, its snapshot chain and its
    /// protection: protected (no/syncing/yes), backup, epoch (checkpoints
    /// acknowledged), last and p99 pause (us), bytes of the last
    /// checkpoint, lag (checkpoints unacknowledged), output held (bytes),
    /// backup alive.
    Status {
        /// One JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// Start protecting the running VM with the backup at ADDR:PORT
    /// (`remora backup --listen ADDR:PORT`): initial sync while the guest
    /// runs, then one checkpoint per epoch. `status` shows progress.
    Protect {
        #[arg(value_name = "ADDR:PORT")]
        addr: String,
    },
    /// Stop the vCPUs (the VM keeps its state).
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Save the VM into DIR: a base snapshot, or with --incremental only
    /// what changed since the last snapshot into the same DIR. The vCPUs are
    /// paused only while state and dirty pages are copied to memory.
    Snapshot {
        /// Directory of the snapshot chain.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Add an increment to the chain in DIR instead of starting one.
        #[arg(long)]
        incremental: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: an ELF with a PVH entry note (vmlinux, remora-guest) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk, placed at the top of low memory.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "console=ttyS0")]
    cmdline: String,
    /// Number of vCPUs (1 to what KVM allows, at most 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB (at least 16).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    mem: u64,
    /// Hide CPU features from the guest, comma separated, e.g. `cx16,xsave`
    /// (hiding xsave also hides AVX and the other features that need it).
    /// Names follow /proc/cpuinfo; an unknown name is an error that lists
    /// the known ones.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpu_hide: Vec<String>,
    /// A virtio-blk disk on a raw image file; repeat for more disks.
    /// Requests beyond the image or writes to a read-only disk fail in the
    /// guest with an I/O error.
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<remora_vmm::DiskConfig>,
    /// A virtio-net interface on a TAP: an existing (persistent) TAP is
    /// attached to, a missing one is created. The MAC defaults to a stable
    /// locally administered address derived from the TAP name. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<remora_vmm::NetConfig>,
    /// Serve control requests (status, pause, resume, snapshot, protect)
    /// on this Unix socket; see `remora ctl`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Protect the VM from boot on with the backup at ADDR:PORT (`remora
    /// backup`). Replicated: guest memory, vCPU and device state, disk
    /// writes, the network engine's held bytes. The backup needs the same
    /// TAP names on its LAN and disks of the same sizes, not the kernel. If
    /// the backup is lost, the VM goes on unprotected (held output is
    /// released) and `ctl protect` can protect it again.
    #[arg(long, value_name = "ADDR:PORT")]
    protect: Option<String>,
    /// Checkpoint interval in milliseconds (with --protect or `ctl protect`).
    #[arg(long, value_name = "MS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    epoch_ms: u64,
    /// How the guest's output is held until its checkpoint is safe.
    #[arg(long, value_enum, default_value = "speculative")]
    output: OutputArg,
    /// The backup is lost when silent this long (the primary then runs
    /// unprotected).
    #[arg(long, value_name = "MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    heartbeat_timeout_ms: u64,
    /// One active copy, decided in etcd: etcd=URL[,URL...][,key=PREFIX]
    /// (e.g. etcd=http://10.0.0.5:2379). Before a copy emits the guest's
    /// output on its own (a VM starting, a primary going on without its
    /// backup, a backup taking over) it must move the VM's generation
    /// counter from the value it knows to the next one (compare-and-swap);
    /// the loser never emits a frame (a primary that loses stops, exit
    /// status 5; a backup that loses stands by). While etcd cannot be
    /// reached, output is held. Use the same value on primary and backup.
    /// Without a fence, a cut replication link can leave two active copies.
    #[arg(long, value_name = "etcd=URL,...")]
    fence: Option<remora_replication::fence::FenceConfig>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics (text format), e.g.
    /// 127.0.0.1:9100: checkpoints acknowledged (epoch), a histogram of
    /// checkpoint pauses and of checkpoint sizes, replication lag, output
    /// held, speculated flows, protection state, backup alive, refused
    /// checkpoints (nacks), fence generation. Names start with `remora_`;
    /// any other path gets 404.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// The KVM device.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    kvm: PathBuf,
}

impl From<OutputArg> for OutputMode {
    fn from(o: OutputArg) -> OutputMode {
        match o {
            OutputArg::Speculative => OutputMode::Speculative,
            OutputArg::Buffered => OutputMode::Buffered,
        }
    }
}

/// The engine between a protected guest's net devices and their TAPs.
fn engine_config(output: OutputMode) -> remora_speculate::Config {
    remora_speculate::Config {
        mode: match output {
            OutputMode::Speculative => remora_speculate::Mode::Speculative,
            OutputMode::Buffered => remora_speculate::Mode::Buffered,
        },
        per_flow_budget: 16 << 20,
        tso_max: 64_000,
        // The TAP completes the checksums of the segments the engine sends.
        offload_checksums: true,
        ..remora_speculate::Config::default()
    }
}

/// How a VM is protected (`run --protect`, `ctl protect`, and a backup's
/// resumed guest protected again).
fn primary_options(
    epoch_ms: u64,
    output: OutputMode,
    heartbeat_timeout_ms: u64,
    fence: Option<remora_replication::fence::FenceConfig>,
    generation: Option<u64>,
    tls: Option<remora_replication::tls::Tls>,
    metrics: Option<Arc<Metrics>>,
) -> PrimaryOptions {
    PrimaryOptions {
        tls,
        fence,
        generation,
        metrics,
        epoch: std::time::Duration::from_millis(epoch_ms),
        output,
        heartbeat_timeout: std::time::Duration::from_millis(heartbeat_timeout_ms),
        max_in_flight: 3,
        engine: engine_config(output),
        connect_timeout: std::time::Duration::from_secs(5),
    }
}

fn main() -> ExitCode {
    block_stop_signals();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as usual.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // Bad usage gets the same one-line form as every other error.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("remora: error: {}", first.trim_start_matches("error: "));
            eprintln!("see 'remora --help'");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Ctl(args) => ctl(args),
        Command::Backup(args) => backup(args),
        Command::Relay(args) => relay(args),
        Command::Certs(args) => certs(args),
        Command::Racc(args) => racc(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("remora: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The stop signals remora handles itself.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialize it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks the stop signals in the calling thread and so in every thread it
/// spawns later: called first thing in main, so that no helper thread
/// (replication, console) can be killed by a stop signal's default action;
/// [`forward_stop_signals`] then takes them.
fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: `set` is initialized; this only changes this thread's mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        eprintln!("remora: warning: cannot block stop signals: error {rc}");
    }
}

/// Calls `on_signal` with each stop signal's name from a dedicated thread,
/// until it returns false (the signals are blocked since main started).
fn forward_stop_signals(on_signal: impl Fn(&'static str) -> bool + Send + 'static) -> anyhow::Result<()> {
    let set = stop_signals();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialized above; sigwait writes the signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let name = match sig {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            if !on_signal(name) {
                return;
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// `--metrics ADDR`: the figures, served from now on (a port in use is
/// an error before anything starts).
fn serve_metrics(addr: Option<std::net::SocketAddr>, role: Role, who: &str) -> anyhow::Result<Option<Arc<Metrics>>> {
    let Some(addr) = addr else { return Ok(None) };
    let m = Arc::new(Metrics::new(role));
    let local = remora_replication::metrics::serve(addr, m.clone())?;
    eprintln!("{who}: metrics at http://{local}/metrics");
    Ok(Some(m))
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let metrics = serve_metrics(args.metrics, Role::Primary, "remora")?;
    let fenced = args.fence.is_some();
    if let Some(f) = &args.fence {
        eprintln!("remora: fence: {f}");
    } else if args.protect.is_some() {
        warn_no_fence("remora");
    }
    let tls = args.tls.load("remora", args.protect.is_some())?;
    let opts = primary_options(
        args.epoch_ms,
        args.output.into(),
        args.heartbeat_timeout_ms,
        args.fence,
        None,
        tls,
        metrics,
    );
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        mem_mib: args.mem,
        cpu_hide: args.cpu_hide,
        kvm_path: args.kvm,
        console: Box::new(std::io::stdout()),
        disks: args.disk,
        nets: args.net,
        // With --protect the engine is on the path from boot, so every
        // TCP flow is seen from its SYN and can be speculated. With a
        // fence it also holds the output until a generation is claimed.
        output: (args.protect.is_some() || fenced).then(|| opts.engine.clone()),
    };
    let mut vmm = Vmm::new(config)?;
    if let Some(p) = args.control {
        vmm.set_control_socket(p);
    }
    let protector = Protector::new(&vmm, opts)?;
    protector.start()?;
    vmm.set_repl_hook(protector.hook());
    if let Some(addr) = &args.protect {
        protector.protect(addr)?;
        eprintln!(
            "remora: protecting the VM with the backup at {addr} (epoch {} ms)",
            args.epoch_ms
        );
    }
    let p = protector.clone();
    let code = run_vmm(vmm, move |exit| p.shutdown(&exit_reason(exit)))?;
    Ok(fenced_exit(&protector, code))
}

/// Exit status 5 for a copy that lost the fence.
fn fenced_exit(protector: &Protector, code: ExitCode) -> ExitCode {
    if protector.fenced() {
        ExitCode::from(5)
    } else {
        code
    }
}

/// Says, once, what running without a fence risks.
fn warn_no_fence(who: &str) {
    eprintln!(
        "{who}: warning: no --fence: if the replication link is cut while both hosts live, both may run the guest (two active copies); use --fence etcd=URL on primary and backup"
    );
}

/// Why the VM ended, for the backup (which then does not take over).
fn exit_reason(exit: &VmExit) -> String {
    match exit {
        VmExit::PowerOff => "guest powered off".to_string(),
        VmExit::Reset => "guest reset".to_string(),
        VmExit::Stopped(why) => why.clone(),
        VmExit::Fault { vcpu, fault } => format!("vCPU {vcpu}: {fault}"),
    }
}

fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    use remora_replication::backup::{serve, BackupOptions, Outcome};
    let tls = args.tls.load("remora backup", true)?;
    let metrics = serve_metrics(args.metrics, Role::Backup, "remora backup")?;
    let opts = BackupOptions {
        tls: tls.clone(),
        listen: args.listen,
        nets: args.net,
        disks: args.disk,
        heartbeat_timeout: std::time::Duration::from_millis(args.heartbeat_timeout_ms),
        kvm_path: args.kvm,
        engine: engine_config(OutputMode::Speculative),
        fence: args.fence.clone(),
        metrics: metrics.clone(),
    };
    match &args.fence {
        Some(f) => eprintln!("remora backup: fence: {f}"),
        None => warn_no_fence("remora backup"),
    }
    // A backup standing by exits on a stop signal; once it runs the guest,
    // the signal stops the VM as for `remora run`.
    let target: SignalTarget = Default::default();
    forward_to(&target, "remora backup")?;
    match serve(opts, Box::new(std::io::stdout()))? {
        Outcome::Shutdown(reason) => {
            eprintln!("remora backup: done: the primary's guest ended ({reason})");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Takeover {
            mut vmm,
            timing,
            output: output_mode,
            generation,
        } => {
            if let Some(p) = args.control {
                vmm.set_control_socket(p);
            }
            // The new primary can be protected again (`ctl protect`).
            let protector = Protector::new(
                &vmm,
                primary_options(
                    25,
                    output_mode,
                    args.heartbeat_timeout_ms,
                    args.fence,
                    generation,
                    tls,
                    metrics,
                ),
            )?;
            vmm.set_repl_hook(protector.hook());
            let decided = timing.decided_at;
            eprintln!(
                "remora backup: failover: detect {} ms (fence {} ms), restore {} ms, guest running {} ms after the decision (checkpoint {})",
                timing.detect.as_millis(),
                timing.fence.as_millis(),
                timing.restore.as_millis(),
                decided.elapsed().as_millis(),
                timing.seq
            );
            let p = protector.clone();
            let code = run_vmm_with(*vmm, &target, move |exit| p.shutdown(&exit_reason(exit)))?;
            Ok(fenced_exit(&protector, code))
        }
    }
}

fn certs(args: CertsArgs) -> anyhow::Result<ExitCode> {
    use remora_replication::tls;
    match args.action {
        CertsAction::Init { dir, name } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let (c, k) = tls::make_ca(&dir, &name)?;
            println!("CA certificate {} and key {}", c.display(), k.display());
        }
        CertsAction::Issue { dir, name, role, san } => {
            if name.is_empty() || name.contains('/') || name.starts_with('.') || name == "ca" {
                anyhow::bail!("bad certificate name '{name}': a plain file name other than 'ca'");
            }
            let role = match role {
                CertRole::Primary => tls::Role::Primary,
                CertRole::Backup => tls::Role::Backup,
            };
            let sans = if san.is_empty() { vec![name.clone()] } else { san };
            let (c, k) = tls::issue(&dir, &name, role, &sans)?;
            println!(
                "{name}: certificate {} and key {} ({})",
                c.display(),
                k.display(),
                sans.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn racc(args: RaccArgs) -> anyhow::Result<ExitCode> {
    use remora_racc as racc;
    match args.action {
        RaccAction::Install { default } => {
            let how = racc::install(&racc::InstallOptions { make_default: default })?;
            match how {
                racc::Installed::Now => println!("{} installed", racc::NAME),
                racc::Installed::Already => println!("{} was already installed", racc::NAME),
            }
            if default {
                println!(
                    "{} is the default congestion control of this network namespace",
                    racc::NAME
                );
            }
        }
        RaccAction::Remove { force } => match racc::remove(force)? {
            racc::Removed::Now => println!("{} removed", racc::NAME),
            racc::Removed::NotInstalled => println!("{} was not installed", racc::NAME),
        },
        RaccAction::Status => {
            let s = racc::status()?;
            let state = match (s.registered, s.pinned) {
                (true, true) => "installed",
                (true, false) => "registered by something other than remora",
                (false, _) => "not installed",
            };
            println!("{}: {state}", racc::NAME);
            println!("default congestion control: {}", s.default_cc);
            match s.sockets {
                Some(n) => println!("sockets using it (this network namespace): {n}"),
                None => println!("sockets using it: unknown (ss not available)"),
            }
            if let Some(c) = s.counters {
                println!(
                    "counters: sockets {} marked segments {} windows filled {} back-offs refused {} fallbacks to cubic {}",
                    c.sockets, c.marked_segments, c.windows_filled, c.backoffs_refused, c.fallbacks
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let mut vmm = Vmm::restore(remora_vmm::RestoreConfig {
        snapshot: args.snapshot,
        kvm_path: args.kvm,
        console: Box::new(std::io::stdout()),
        disks: args.disk,
        nets: args.net,
    })?;
    if let Some(p) = args.control {
        vmm.set_control_socket(p);
    }
    run_vmm(vmm, |_| {})
}

fn ctl(args: CtlArgs) -> anyhow::Result<ExitCode> {
    use remora_vmm::control::{request, Command as C};
    let mut json = false;
    let cmd = match args.request {
        CtlRequest::Status { json: j } => {
            json = j;
            C::Status
        }
        CtlRequest::Protect { addr } => C::Protect { addr },
        CtlRequest::Pause => C::Pause,
        CtlRequest::Resume => C::Resume,
        CtlRequest::Snapshot { out, incremental } => {
            // The VMM may run in another directory: send an absolute path.
            let out = std::path::absolute(&out).with_context(|| format!("bad path {}", out.display()))?;
            C::Snapshot { dir: out, incremental }
        }
    };
    let reply =
        request(&args.socket, &cmd).with_context(|| format!("cannot reach the VM at {}", args.socket.display()))?;
    match reply.strip_prefix("ok") {
        Some(rest) if json => {
            println!("{}", status_json(rest.trim()));
            Ok(ExitCode::SUCCESS)
        }
        Some(rest) => {
            println!("{}", rest.trim());
            Ok(ExitCode::SUCCESS)
        }
        None => anyhow::bail!("{}", reply.strip_prefix("error ").unwrap_or(&reply)),
    }
}

/// `status` text (a state word, then `key=value` pairs, values optionally
/// in double quotes) as one JSON object; numbers stay numbers.
fn status_json(line: &str) -> String {
    let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    let mut fields = Vec::new();
    let mut rest = line.trim();
    let mut first = true;
    while !rest.is_empty() {
        let (word, tail) = match rest.find('=') {
            Some(eq) if !rest[..eq].contains(' ') => {
                let key = &rest[..eq];
                let after = &rest[eq + 1..];
                let (val, tail) = if let Some(q) = after.strip_prefix('"') {
                    match q.find('"') {
                        Some(end) => (&q[..end], &q[end + 1..]),
                        None => (q, ""),
                    }
                } else {
                    match after.find(' ') {
                        Some(sp) => (&after[..sp], &after[sp..]),
                        None => (after, ""),
                    }
                };
                let v = if val.parse::<f64>().is_ok() {
                    val.to_string()
                } else {
                    format!("\"{}\"", esc(val))
                };
                (format!("\"{}\":{v}", esc(key)), tail)
            }
            _ => {
                let (w, tail) = match rest.find(' ') {
                    Some(sp) => (&rest[..sp], &rest[sp..]),
                    None => (rest, ""),
                };
                let key = if first { "state" } else { "flag" };
                (format!("\"{key}\":\"{}\"", esc(w)), tail)
            }
        };
        first = false;
        fields.push(word);
        rest = tail.trim_start();
    }
    format!("{{{}}}", fields.join(","))
}

/// Where stop signals go: the running VM, or (a backup standing by) exit.
type SignalTarget = std::sync::Arc<std::sync::Mutex<Option<std::sync::mpsc::Sender<VmEvent>>>>;

fn run_vmm(vmm: Vmm, on_exit: impl FnOnce(&VmExit)) -> anyhow::Result<ExitCode> {
    let target: SignalTarget = Default::default();
    forward_to(&target, "remora")?;
    run_vmm_with(vmm, &target, on_exit)
}

/// Forwards stop signals to the VM in `target`; without one, exits.
fn forward_to(target: &SignalTarget, who: &'static str) -> anyhow::Result<()> {
    let t = target.clone();
    forward_stop_signals(move |name| {
        let tx = t.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tx {
            Some(tx) => tx.send(VmEvent::Stop(format!("stopped by {name}"))).is_ok(),
            None => {
                eprintln!("{who}: stopped by {name}");
                std::process::exit(0);
            }
        }
    })
}

fn run_vmm_with(vmm: Vmm, target: &SignalTarget, on_exit: impl FnOnce(&VmExit)) -> anyhow::Result<ExitCode> {
    *target.lock().unwrap_or_else(|p| p.into_inner()) = Some(vmm.event_sender());
    if std::io::stdin().is_terminal() {
        let serial = vmm.serial();
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                let mut stdin = std::io::stdin();
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        let taken = remora_vmm::devices::lock(&serial).enqueue_input(rest);
                        rest = &rest[taken..];
                        if taken == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                }
            })
            .context("cannot start the console input thread")?;
    }
    let exit = vmm.run()?;
    on_exit(&exit);
    match &exit {
        VmExit::PowerOff => eprintln!("remora: guest powered off"),
        VmExit::Reset => eprintln!("remora: guest reset; the VM ends (remora does not reboot guests)"),
        VmExit::Stopped(why) => eprintln!("remora: {why}"),
        VmExit::Fault { vcpu, fault } => eprintln!("remora: error: vCPU {vcpu}: {fault}"),
    }
    Ok(if exit.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn relay(args: RelayArgs) -> anyhow::Result<ExitCode> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    let (mode, mode_name) = match args.mode {
        RelayMode::Direct => (remora_speculate::Mode::Direct, "direct"),
        RelayMode::Buffered => (remora_speculate::Mode::Buffered, "buffered"),
        RelayMode::Speculative => (remora_speculate::Mode::Speculative, "speculative"),
    };
    let cfg = remora_relay::RelayConfig {
        inner_tap: args.inner_tap,
        outer_tap: args.outer_tap,
        mode,
        epoch: Duration::from_millis(args.epoch_ms),
        commit_delay: Duration::from_millis(args.commit_delay_ms),
        budget: args.budget,
        global_cap: args.global_cap,
        mtu: args.mtu,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    forward_stop_signals(move |_| {
        flag.store(true, Ordering::Relaxed);
        true
    })?;
    let mut relay = remora_relay::Relay::open(cfg)?;
    let c = relay.config();
    println!(
        "remora relay: ready inner={} outer={} mode={mode_name} epoch={}ms commit-delay={}ms budget={}",
        c.inner_tap, c.outer_tap, args.epoch_ms, args.commit_delay_ms, c.budget
    );
    let stats = args.stats;
    let report = relay.run(&stop, |r| {
        if stats {
            println!("remora relay: stats {r}");
        }
    })?;
    println!("remora relay: summary {report}");
    Ok(ExitCode::SUCCESS)
}
