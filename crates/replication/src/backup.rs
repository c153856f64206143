//! The backup: standby memory, apply-on-commit, failover.
//!
//! The backup checks its own devices first (every TAP exists, every disk
//! opens), then listens. One primary at a time: a second one is refused
//! ("busy"). After a good hello it maps the guest's memory (the mapping
//! the guest will run from: a failover copies nothing), writes pre-copied
//! pages and disk extents straight into it, then applies each complete,
//! verified checkpoint all or nothing — pages into memory, disk writes
//! into its disks, engine deltas into replicas — keeps its machine state,
//! and acknowledges it. A refused checkpoint (corrupt, torn) never touches
//! any of that; the session asks the primary to send it again.
//!
//! When the primary dies (its connection closes, or it is silent for the
//! heartbeat timeout), the backup resumes the guest from the last applied
//! checkpoint: the engines commit that checkpoint's epoch and retransmit
//! what the peer has not acknowledged, the net devices announce the
//! guest's MAC, and the VM runs like any `remora run` VM. A primary whose
//! guest ended on purpose says so (Shutdown): no takeover. A primary that
//! breaks the protocol is disconnected without a takeover (it may be
//! alive) and the backup waits for a primary again.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remora_proto::{BackupConfig, BackupEvent, BackupSession, DeviceIdentity, OutputMode, VmIdentity};
use remora_speculate::{EngineDelta, EngineReplica, EpochId};
use remora_vmm::devices::lock;
use remora_vmm::memory::GuestMemoryMmap;
use remora_vmm::snapshot::MachineSnapshot;
use remora_vmm::{DiskConfig, NetConfig, RestoreDevices, RestoredEngine, Vmm};
use vm_memory::{Bytes, GuestAddress};

use crate::primary::STATE_KIND;

/// How to run a backup.
pub struct BackupOptions {
    pub listen: SocketAddr,
    pub nets: Vec<NetConfig>,
    pub disks: Vec<DiskConfig>,
    pub heartbeat_timeout: Duration,
    pub kvm_path: PathBuf,
    /// Engine settings for the resumed guest (the mode follows the
    /// primary's output mode).
    pub engine: remora_speculate::Config,
    /// The fence: a takeover must first move the primary's generation on.
    pub fence: Option<crate::fence::FenceConfig>,
    /// Mutual TLS on the replication link (`None`: plain TCP).
    pub tls: Option<crate::tls::Tls>,
    /// Where to record the standby's figures (`--metrics`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Errors of the backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("TAP '{0}' does not exist on this host: create it first (e.g. ip tuntap add dev {0} mode tap vnet_hdr) and put it on the guest's LAN")]
    NoTap(String),
    #[error("disk {path}: {why}")]
    Disk { path: PathBuf, why: String },
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: SocketAddr, error: std::io::Error },
    #[error("the primary was lost ({why}) before its first checkpoint completed: there is no guest state to resume")]
    NothingToResume { why: String },
    #[error("cannot resume the guest: {0}")]
    Restore(remora_vmm::VmError),
    #[error("{0}")]
    Other(String),
}

/// How the backup's watch ended.
pub enum Outcome {
    /// The primary died: the guest, resumed and ready to run, and the
    /// output mode it was protected with (for protecting it again).
    Takeover {
        vmm: Box<Vmm>,
        timing: FailoverTiming,
        output: OutputMode,
        /// The fence generation this copy won to take over.
        generation: Option<u64>,
    },
    /// The primary's guest ended on purpose.
    Shutdown(String),
}

/// Where a failover's time went.
#[derive(Debug, Clone, Copy)]
pub struct FailoverTiming {
    /// From the last byte heard from the primary to the decision.
    pub detect: Duration,
    /// The fence's compare-and-swap (zero without a fence).
    pub fence: Duration,
    /// Building the VM from the last checkpoint.
    pub restore: Duration,
    /// The checkpoint resumed.
    pub seq: u64,
    /// When the decision was taken (for "first guest instruction").
    pub decided_at: Instant,
}

/// A local device, for the identity check.
fn local_identity(opts: &BackupOptions) -> Result<(Vec<DeviceIdentity>, Vec<File>), BackupError> {
    let mut devices = Vec::new();
    for n in &opts.nets {
        if !std::path::Path::new("/sys/class/net").join(&n.tap).exists() {
            return Err(BackupError::NoTap(n.tap.clone()));
        }
        devices.push(DeviceIdentity::Net { mac: n.mac });
    }
    let mut files = Vec::new();
    for d in &opts.disks {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d.path)
            .map_err(|e| BackupError::Disk {
                path: d.path.clone(),
                why: e.to_string(),
            })?;
        let len = f
            .metadata()
            .map_err(|e| BackupError::Disk {
                path: d.path.clone(),
                why: e.to_string(),
            })?
            .len();
        devices.push(DeviceIdentity::Disk {
            size_bytes: len / 512 * 512,
            read_only: d.read_only,
            // Any: the backup presents the primary's id after a failover.
            id: [0; 20],
        });
        files.push(f);
    }
    Ok((devices, files))
}

/// What the backup holds for one primary.
struct Standby {
    mem: GuestMemoryMmap,
    output: OutputMode,
    replicas: Vec<EngineReplica>,
    /// Per net: (engine clock, epoch) of the last applied checkpoint.
    engine_at: Vec<Option<(Duration, EpochId)>>,
    state: Option<MachineSnapshot>,
    seq: u64,
    disk_ids: Vec<[u8; 20]>,
    /// The fence generation the primary holds (from its Generation message).
    generation: Option<u64>,
    /// The VM's name in the fence's keys.
    vm_name: String,
}

/// Runs the backup until it takes over or the primary's guest ends.
pub fn serve(opts: BackupOptions, console: Box<dyn Write + Send>) -> Result<Outcome, BackupError> {
    let (devices, mut disks) = local_identity(&opts)?;
    let listener = TcpListener::bind(opts.listen).map_err(|error| BackupError::Listen {
        addr: opts.listen,
        error,
    })?;
    eprintln!(
        "remora backup: listening on {} ({} net, {} disk; heartbeat timeout {} ms)",
        listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        opts.nets.len(),
        opts.disks.len(),
        opts.heartbeat_timeout.as_millis()
    );
    let busy: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let conns = accept_thread(listener, busy.clone())?;
    loop {
        let Ok((stream, peer)) = conns.recv() else {
            return Err(BackupError::Other("the listener stopped".into()));
        };
        *lock(&busy) = Some(peer.to_string());
        let r = watch(&opts, &devices, &mut disks, stream, peer);
        *lock(&busy) = None;
        if let Some(m) = &opts.metrics {
            m.primary_connected(false);
        }
        match r {
            Ok(Some((standby, why, last_rx))) => {
                let output = standby.output;
                let t = Instant::now();
                let generation = match claim_takeover(&opts, &standby)? {
                    Fenced::Won(g) => g,
                    Fenced::Lost => {
                        eprintln!("remora backup: waiting for a primary again on {}", opts.listen);
                        continue;
                    }
                };
                let fence_time = t.elapsed();
                return takeover(&opts, standby, why, last_rx, console).map(|(vmm, mut timing)| {
                    timing.fence = fence_time;
                    if let Some(m) = &opts.metrics {
                        m.failover();
                    }
                    Outcome::Takeover {
                        vmm: Box::new(vmm),
                        timing,
                        output,
                        generation,
                    }
                });
            }
            Ok(None) => {}
            Err(Watch::Shutdown(reason)) => return Ok(Outcome::Shutdown(reason)),
            Err(Watch::Fatal(e)) => return Err(e),
        }
        eprintln!("remora backup: waiting for a primary again on {}", opts.listen);
    }
}

/// Accepts connections: the first goes to the watcher, others are refused
/// while one is being served.
fn accept_thread(
    listener: TcpListener,
    busy: Arc<Mutex<Option<String>>>,
) -> Result<Receiver<(TcpStream, SocketAddr)>, BackupError> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("backup-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let Ok(peer) = s.peer_addr() else { continue };
                let serving = lock(&busy).clone();
                match serving {
                    Some(p) => {
                        let reason = format!("busy: this backup already protects a VM from {p}");
                        eprintln!("remora backup: refused a second primary {peer}: {reason}");
                        let mut out = Vec::new();
                        if (remora_proto::Message::Refuse { reason }).encode(&mut out).is_ok() {
                            let _ = s.write_all(&out);
                        }
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    None => {
                        // Marked busy before the watcher picks it up.
                        *lock(&busy) = Some(peer.to_string());
                        if tx.send((s, peer)).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .map_err(|e| BackupError::Other(format!("cannot start the accept thread: {e}")))?;
    Ok(rx)
}

enum Watch {
    Shutdown(String),
    Fatal(BackupError),
}

enum Fenced {
    /// Take over (holding this generation, with a fence).
    Won(Option<u64>),
    /// The primary went on alone: no takeover.
    Lost,
}

/// With a fence: moves the primary's generation on before taking over
/// (the primary, if alive, may be trying the same to go on alone).
/// Retries while etcd is unreachable: without the fence's word this copy
/// must not run the guest.
fn claim_takeover(opts: &BackupOptions, s: &Standby) -> Result<Fenced, BackupError> {
    let Some(cfg) = &opts.fence else {
        return Ok(Fenced::Won(None));
    };
    let Some(held) = s.generation else {
        // Refused at the first checkpoint: not reached.
        return Err(BackupError::Other("no fence generation from the primary".into()));
    };
    let mut fence =
        crate::fence::Fence::new(cfg.clone(), s.vm_name.clone()).map_err(|e| BackupError::Other(e.to_string()))?;
    // Short attempts: a dead etcd member (or leader) must cost the guest
    // one election, not a long timeout per try.
    fence.timeout = Duration::from_millis(500);
    let owner = crate::fence::owner("backup (took over)");
    let mut reported = None::<Instant>;
    loop {
        match fence.claim(held, &owner) {
            Ok(crate::fence::Claim::Won(g)) => {
                eprintln!("remora backup: fence: generation {held} -> {g}: this copy takes over");
                return Ok(Fenced::Won(Some(g)));
            }
            Ok(crate::fence::Claim::Lost { generation, owner }) => {
                eprintln!(
                    "remora backup: fence: generation moved from {held} to {generation} ({owner}): the primary went on without this backup; no takeover"
                );
                return Ok(Fenced::Lost);
            }
            Err(e) => {
                if reported.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    eprintln!(
                        "remora backup: fence: {e}; cannot take over until etcd answers (the guest stays down, retrying)"
                    );
                    reported = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves one primary. `Ok(Some)`: take over; `Ok(None)`: the session
/// ended without a takeover (wait for another primary).
#[allow(clippy::type_complexity)]
fn watch(
    opts: &BackupOptions,
    devices: &[DeviceIdentity],
    disks: &mut [File],
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<Option<(Standby, String, Instant)>, Watch> {
    let _ = stream.set_nodelay(true);
    let hb = crate::heartbeat_interval(opts.heartbeat_timeout);
    // Nothing of the protocol before the peer proved who it is.
    let transport = match &opts.tls {
        Some(tls) => {
            crate::tls::accept(stream, tls, &peer.to_string(), Duration::from_secs(5)).map_err(|e| e.to_string())
        }
        None => crate::tls::plain(stream).map_err(|e| e.to_string()),
    };
    let (mut stream, writer) = match transport {
        Ok(t) => t,
        Err(e) => {
            eprintln!("remora backup: refused {peer}: {e}");
            return Ok(None);
        }
    };
    let _ = stream.set_read_timeout(Some(hb.min(Duration::from_millis(10))));
    let origin = Instant::now();
    let session = BackupSession::new(BackupConfig {
        identity: VmIdentity {
            mem_mib: 0,
            vcpus: 0,
            devices: devices.to_vec(),
        },
        heartbeat_interval: hb,
        heartbeat_timeout: opts.heartbeat_timeout,
    });
    let link = crate::beacon::Link::new(writer);
    let _ = link.start_beacon(hb, true);
    let r = watch_link(opts, disks, &mut stream, peer, &link, session, origin);
    link.close();
    r
}

#[allow(clippy::type_complexity)]
fn watch_link(
    opts: &BackupOptions,
    disks: &mut [File],
    stream: &mut crate::tls::SecureRead,
    peer: SocketAddr,
    link: &crate::beacon::Link,
    mut session: BackupSession,
    origin: Instant,
) -> Result<Option<(Standby, String, Instant)>, Watch> {
    let mut standby: Option<Standby> = None;
    let mut buf = vec![0u8; 1 << 20];
    let mut last_rx = Instant::now();
    loop {
        let eof = match stream.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => {
                last_rx = Instant::now();
                session.handle_input(origin.elapsed(), &buf[..n]);
                // Counted once the session's liveness clock restarted.
                link.rx_bytes.fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel);
                if let Some(m) = &opts.metrics {
                    m.received(n as u64);
                }
                false
            }
            Err(e) if crate::would_block(&e) => false,
            Err(e) => {
                tracing::warn!("replication link from {peer}: {e}");
                true
            }
        };
        if eof {
            session.handle_eof();
        }
        session.handle_timeout(origin.elapsed());
        while let Some(ev) = session.poll_event() {
            match ev {
                BackupEvent::Connected { output, epoch_ms } => {
                    let hello = session.primary_identity().cloned().unwrap_or_default();
                    eprintln!(
                        "remora backup: primary {peer} connected: {} MiB, {} vCPUs, {} devices, output {output:?}, epoch {epoch_ms} ms",
                        hello.mem_mib,
                        hello.vcpus,
                        hello.devices.len()
                    );
                    if let Some(m) = &opts.metrics {
                        m.primary_connected(true);
                    }
                    let mem = remora_vmm::memory::create_guest_memory(hello.mem_mib)
                        .map_err(|e| Watch::Fatal(BackupError::Other(e.to_string())))?;
                    let nets = hello
                        .devices
                        .iter()
                        .filter(|d| matches!(d, DeviceIdentity::Net { .. }))
                        .count();
                    let disk_ids = hello
                        .devices
                        .iter()
                        .filter_map(|d| match d {
                            DeviceIdentity::Disk { id, .. } => Some(*id),
                            _ => None,
                        })
                        .collect();
                    let first_mac = hello.devices.iter().find_map(|d| match d {
                        DeviceIdentity::Net { mac } => Some(*mac),
                        _ => None,
                    });
                    standby = Some(Standby {
                        mem,
                        output,
                        replicas: (0..nets).map(|_| EngineReplica::new()).collect(),
                        engine_at: vec![None; nets],
                        state: None,
                        seq: 0,
                        disk_ids,
                        generation: None,
                        vm_name: crate::fence::vm_name(first_mac),
                    });
                }
                BackupEvent::PrecopyPages(pages) => {
                    if let Some(s) = &standby {
                        for (gpa, page) in pages.iter() {
                            let _ = s.mem.write_slice(page, GuestAddress(gpa));
                        }
                    }
                }
                BackupEvent::PrecopyDisk(w) => {
                    if let Some(f) = disks.get(w.disk as usize) {
                        if let Err(e) = f.write_all_at(&w.data, w.offset) {
                            return Err(Watch::Fatal(BackupError::Other(format!(
                                "writing disk {} on the backup: {e}",
                                w.disk
                            ))));
                        }
                    }
                }
                BackupEvent::PrecopyDone { rounds } => {
                    tracing::info!(rounds, "pre-copy received");
                }
                BackupEvent::Generation { value } => {
                    if opts.fence.is_none() {
                        let why =
                            "the primary runs with --fence and this backup does not: start both with the same --fence";
                        eprintln!("remora backup: refusing {peer}: {why}");
                        session.refuse(why);
                        flush(&mut session, link);
                        return Ok(None);
                    }
                    if let Some(s) = standby.as_mut() {
                        s.generation = Some(value);
                    }
                }
                BackupEvent::Checkpoint(c) => {
                    let Some(s) = standby.as_mut() else {
                        session.refuse("checkpoint before hello");
                        continue;
                    };
                    if opts.fence.is_some() && s.generation.is_none() {
                        let why =
                            "this backup runs with --fence and the primary does not: start both with the same --fence";
                        eprintln!("remora backup: refusing {peer}: {why}");
                        session.refuse(why);
                        flush(&mut session, link);
                        return Ok(None);
                    }
                    let seq = c.seq;
                    match apply(s, disks, c) {
                        Ok(()) => {
                            if s.seq == 0 {
                                eprintln!("remora backup: first checkpoint applied: the VM is protected");
                            }
                            s.seq = seq;
                            if let Some(m) = &opts.metrics {
                                m.applied();
                            }
                            if let Err(e) = session.ack(seq) {
                                tracing::warn!("ack {seq}: {e}");
                            }
                        }
                        Err(e) => {
                            eprintln!("remora backup: cannot apply checkpoint {seq}: {e}; the standby state is no longer usable");
                            return Err(Watch::Fatal(BackupError::Other(format!(
                                "checkpoint {seq} could not be applied: {e}"
                            ))));
                        }
                    }
                }
                BackupEvent::CheckpointRefused { seq, reason } => {
                    let last = standby.as_ref().map_or(0, |s| s.seq);
                    eprintln!(
                        "remora backup: refused checkpoint {seq}: {reason}; keeping checkpoint {last}, asked the primary to send it again"
                    );
                }
                BackupEvent::PrimaryLost { why } => {
                    flush(&mut session, link);
                    return match standby {
                        Some(s) if s.state.is_some() => Ok(Some((s, why, last_rx))),
                        // Nothing to resume yet: a primary that died (or a
                        // client that went away) before the first
                        // checkpoint leaves this backup as it was.
                        _ => {
                            eprintln!(
                                "remora backup: {peer} went away ({why}) before the first checkpoint completed: nothing to take over"
                            );
                            Ok(None)
                        }
                    };
                }
                BackupEvent::Shutdown { reason } => {
                    if let Some(why) = reason.strip_prefix(crate::primary::UNPROTECTED) {
                        eprintln!("remora backup: the primary {peer} goes on without this backup ({why}): no takeover");
                        return Ok(None);
                    }
                    eprintln!("remora backup: the primary's guest ended ({reason}): no takeover");
                    return Err(Watch::Shutdown(reason));
                }
                BackupEvent::Refused { reason } => {
                    flush(&mut session, link);
                    eprintln!("remora backup: primary {peer} refused: {reason}");
                    return Ok(None);
                }
                BackupEvent::ProtocolError { why } => {
                    flush(&mut session, link);
                    eprintln!(
                        "remora backup: protocol error from {peer}: {why}; disconnected (no takeover: the primary may be alive)"
                    );
                    return Ok(None);
                }
            }
        }
        flush(&mut session, link);
    }
}

fn flush(session: &mut BackupSession, link: &crate::beacon::Link) {
    while let Some(b) = session.poll_output() {
        if link.write(&b).is_err() {
            return;
        }
    }
}

/// Applies a verified checkpoint: everything is decoded and checked
/// first; only then do pages, disk writes and engine deltas land.
fn apply(s: &mut Standby, disks: &[File], c: remora_proto::Checkpoint) -> Result<(), String> {
    let state: MachineSnapshot =
        remora_vmstate::format::decode(STATE_KIND, &c.state).map_err(|e| format!("machine state: {e}"))?;
    let mem_bytes: u64 = vm_memory::GuestMemoryBackend::iter(&s.mem)
        .map(vm_memory::GuestMemoryRegion::len)
        .sum();
    if state.mem_mib << 20 != mem_bytes {
        return Err("machine state and memory size disagree".into());
    }
    let mut deltas = Vec::new();
    for (net, b) in &c.engines {
        let (at, rest) = b.split_at_checked(16).ok_or("engine payload too short")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&at[..8]);
        let at_ns = u64::from_le_bytes(a);
        a.copy_from_slice(&at[8..16]);
        let epoch = u64::from_le_bytes(a);
        let d = EngineDelta::decode(rest).map_err(|e| format!("engine delta of net {net}: {e}"))?;
        if *net as usize >= s.replicas.len() {
            return Err(format!("engine delta for net {net}, the VM has {}", s.replicas.len()));
        }
        deltas.push((*net as usize, Duration::from_nanos(at_ns), EpochId(epoch), d));
    }
    for w in &c.disk {
        if w.disk as usize >= disks.len() {
            return Err(format!("write to disk {}, the VM has {}", w.disk, disks.len()));
        }
    }
    // Every page inside guest memory, before anything changes.
    for (gpa, _) in c.iter_pages() {
        if vm_memory::GuestMemoryBackend::checked_offset(&s.mem, GuestAddress(gpa), 4095).is_none() {
            return Err(format!("page {gpa:#x} outside guest memory"));
        }
    }
    // A replica refuses a delta out of order without changing. With one
    // net (the usual case) it is applied in place; with several, on copies
    // (a copy holds every byte the engine holds), so a later net's refusal
    // leaves the earlier ones untouched.
    if deltas.len() <= 1 {
        for (net, _, _, d) in &deltas {
            s.replicas[*net]
                .apply(d)
                .map_err(|e| format!("engine delta of net {net}: {e}"))?;
        }
    } else {
        let mut replicas = s.replicas.clone();
        for (net, _, _, d) in &deltas {
            replicas[*net]
                .apply(d)
                .map_err(|e| format!("engine delta of net {net}: {e}"))?;
        }
        s.replicas = replicas;
    }
    for (gpa, page) in c.iter_pages() {
        s.mem
            .write_slice(page, GuestAddress(gpa))
            .map_err(|_| format!("page {gpa:#x} outside guest memory"))?;
    }
    for w in &c.disk {
        disks[w.disk as usize]
            .write_all_at(&w.data, w.offset)
            .map_err(|e| format!("disk {} write: {e}", w.disk))?;
    }
    for (net, at, epoch, _) in deltas {
        s.engine_at[net] = Some((at, epoch));
    }
    s.state = Some(state);
    Ok(())
}

/// Resumes the guest from the standby state.
fn takeover(
    opts: &BackupOptions,
    s: Standby,
    why: String,
    last_rx: Instant,
    console: Box<dyn Write + Send>,
) -> Result<(Vmm, FailoverTiming), BackupError> {
    let decided_at = Instant::now();
    let detect = decided_at - last_rx;
    eprintln!(
        "remora backup: primary lost ({why}); taking over from checkpoint {}",
        s.seq
    );
    let t0 = Instant::now();
    let mut cfg = opts.engine.clone();
    cfg.mode = match s.output {
        OutputMode::Speculative => remora_speculate::Mode::Speculative,
        OutputMode::Buffered => remora_speculate::Mode::Buffered,
    };
    let engines = s
        .replicas
        .iter()
        .zip(&s.engine_at)
        .map(|(r, at)| {
            at.map(|(now, epoch)| {
                let mut engine = r
                    .to_engine(cfg.clone())
                    .map_err(|e| BackupError::Other(format!("speculative engine: {e}")))?;
                engine.commit_epoch(now, epoch);
                engine.resume_after_failover(now);
                Ok(RestoredEngine { engine, now })
            })
            .transpose()
        })
        .collect::<Result<_, BackupError>>()?;
    let state = s
        .state
        .ok_or_else(|| BackupError::NothingToResume { why: why.clone() })?;
    let vmm = Vmm::restore_from(
        s.mem,
        state,
        RestoreDevices {
            kvm_path: opts.kvm_path.clone(),
            console,
            disks: opts.disks.clone(),
            nets: opts.nets.clone(),
            output: Some(cfg),
            engines,
            disk_ids: s.disk_ids,
        },
    )
    .map_err(BackupError::Restore)?;
    let timing = FailoverTiming {
        detect,
        fence: Duration::ZERO,
        restore: t0.elapsed(),
        seq: s.seq,
        decided_at,
    };
    Ok((vmm, timing))
}
