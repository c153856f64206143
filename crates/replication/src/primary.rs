//! The primary: protects a running VM by checkpointing it to a backup.
//!
//! One replication thread per protection: connect, hello, live pre-copy
//! (memory, then the disks' allocated extents, then rounds of the pages
//! dirtied meanwhile until the rest fits one pause), then the epoch loop:
//! every epoch one checkpoint (a pause of the VM; the transfer happens
//! while the guest runs the next epoch), at most `max_in_flight`
//! unacknowledged (when the backup falls behind, epochs stretch; they are
//! never dropped). A reader thread takes the backup's acknowledgements and
//! commits each acknowledged checkpoint's epoch in the net devices'
//! engines at once. A refused (Nack) checkpoint is sent again with every
//! later one (the primary keeps them until acknowledged).
//!
//! Any failure (connect, write, backup silent for the heartbeat timeout,
//! protocol error) ends the protection: the VM goes on unprotected, its
//! engines release everything they held (the peer sees no gap), `status`
//! says why, and `ctl protect` can start again (with a new full sync).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use remora_proto::{
    DeviceIdentity, OutputMode, PrimaryConfig, PrimaryEvent, PrimaryReceiver, PrimarySender, PrimarySession, VmIdentity,
};
use remora_speculate::EpochId;
use remora_vmm::checkpoint::{Checkpoint, ReplHook, ReplReply, ReplRequest};
use remora_vmm::devices::lock;
use remora_vmm::devices::virtio::commit::{mono_ns, OutputCommit, LEASE_FOREVER};
use remora_vmm::memory::GuestMemoryMmap;
use remora_vmm::{VmEvent, Vmm};
use vm_memory::{Bytes, GuestAddress};

/// Prefix of the Shutdown reason by which a primary that goes on without
/// its backup tells it not to take over.
pub const UNPROTECTED: &str = "unprotected: ";

/// `remora_vmstate::format` kind of a checkpoint's machine state.
pub const STATE_KIND: u32 = 3;
/// Pages per pre-copy / checkpoint pages message.
const PAGES_PER_MESSAGE: usize = 256;
/// Pre-copy stops when a round has at most this many dirty pages left
/// (they go into the first checkpoint's pause) or after `MAX_ROUNDS`.
const PRECOPY_DONE_PAGES: usize = 4096;
const MAX_ROUNDS: u32 = 8;
/// Disk pre-copy chunk.
const DISK_CHUNK: usize = 1 << 20;

/// How to protect.
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    pub epoch: Duration,
    pub output: OutputMode,
    pub heartbeat_timeout: Duration,
    /// Checkpoints sent and not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// The engine put between each net device and its TAP.
    pub engine: remora_speculate::Config,
    /// How long to wait for the backup's TCP connection and hello.
    pub connect_timeout: Duration,
    /// The fence (`--fence`); without one a cut replication link can
    /// leave two active copies.
    pub fence: Option<crate::fence::FenceConfig>,
    /// The generation this copy already holds (a backup's resumed guest:
    /// it won the fence to take over). `None`: claim one at start.
    pub generation: Option<u64>,
    /// Mutual TLS on the replication link (`None`: plain TCP).
    pub tls: Option<crate::tls::Tls>,
    /// Where to record the protection's figures (`--metrics`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Where protection stands (for `ctl status`).
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// "no", "syncing", "yes".
    pub protected: &'static str,
    pub backup: String,
    /// Checkpoints acknowledged.
    pub epoch: u64,
    pub last_pause_us: u64,
    pauses: VecDeque<u64>,
    pub last_bytes: u64,
    /// Checkpoints sent and not yet acknowledged.
    pub lag: u64,
    pub backup_alive: bool,
    pub last_error: Option<String>,
    pub nacks: u64,
    /// The fence generation held ("-" without a fence, "claiming",
    /// "fenced" once lost).
    pub fence: String,
}

impl Status {
    fn p99_pause(&self) -> u64 {
        if self.pauses.is_empty() {
            return 0;
        }
        let mut v: Vec<u64> = self.pauses.iter().copied().collect();
        v.sort_unstable();
        v[((v.len() * 99).div_ceil(100)).saturating_sub(1)]
    }
}

struct InFlight {
    seq: u64,
    epochs: Vec<Option<EpochId>>,
    /// The checkpoint on the wire, kept for a resend until acknowledged.
    bytes: Arc<Vec<u8>>,
}

#[derive(Default)]
struct Link {
    inflight: VecDeque<InFlight>,
    failed: Option<String>,
    resend_from: Option<u64>,
    acked: u64,
}

struct Inner {
    opts: PrimaryOptions,
    events: Sender<VmEvent>,
    mem: GuestMemoryMmap,
    identity: VmIdentity,
    commits: Vec<Arc<OutputCommit>>,
    disks: Vec<PathBuf>,
    status: Mutex<Status>,
    running: AtomicBool,
    /// The connection's writer, while a protection runs.
    writer: Mutex<Option<Arc<crate::beacon::Link>>>,
    stopping: AtomicBool,
    fence: Option<crate::fence::Fence>,
    /// The generation held, once claimed.
    generation: Mutex<Option<u64>>,
    /// This copy lost the fence: its output is off for good.
    fenced: AtomicBool,
    /// A backup got the generation during this protection (it could take
    /// over): going on alone needs the fence.
    exposed: AtomicBool,
}

/// Protects one VM; cheap to clone.
#[derive(Clone)]
pub struct Protector {
    inner: Arc<Inner>,
}

/// Errors starting a protection.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error("already {0}: one backup at a time")]
    Busy(&'static str),
    #[error("bad backup address '{0}': {1}")]
    Address(String, String),
    #[error("{0}")]
    Fence(#[from] crate::fence::FenceError),
    #[error("this copy lost the fence: it may not run the guest's output again")]
    Fenced,
}

impl Protector {
    /// Prepares protection of `vmm` (before it runs); nothing starts until
    /// [`Protector::protect`]. With a fence and no generation yet, the
    /// guest's output is held until [`Protector::start`] claims one.
    pub fn new(vmm: &Vmm, opts: PrimaryOptions) -> Result<Protector, ProtectError> {
        let devs = vmm.repl_devices();
        let mut devices = Vec::new();
        for n in &devs.nets {
            devices.push(DeviceIdentity::Net { mac: n.mac });
        }
        for d in &devs.disks {
            devices.push(DeviceIdentity::Disk {
                size_bytes: d.size_bytes,
                read_only: d.read_only,
                id: d.id,
            });
        }
        let identity = VmIdentity {
            mem_mib: vmm.mem_mib(),
            vcpus: vmm.vcpu_count() as u32,
            devices,
        };
        let first_mac = devs.nets.first().map(|n| n.mac);
        let fence = match &opts.fence {
            Some(cfg) => {
                let mut f = crate::fence::Fence::new(cfg.clone(), crate::fence::vm_name(first_mac))?;
                // Short attempts, retried: output waits on them.
                f.timeout = Duration::from_millis(500);
                Some(f)
            }
            None => None,
        };
        let commits: Vec<Arc<OutputCommit>> = devs.nets.iter().map(|n| n.commit.clone()).collect();
        if fence.is_some() && opts.generation.is_none() {
            for c in &commits {
                c.set_lease(0);
            }
        }
        let fence_status = match (&fence, opts.generation) {
            (None, _) => "-".to_string(),
            (Some(_), Some(g)) => g.to_string(),
            (Some(_), None) => "claiming".to_string(),
        };
        let generation = opts.generation;
        let protector = Protector {
            inner: Arc::new(Inner {
                opts,
                events: vmm.event_sender(),
                mem: vmm.memory(),
                identity,
                commits,
                disks: devs.disks.iter().map(|d| d.path.clone()).collect(),
                status: Mutex::new(Status {
                    protected: "no",
                    fence: fence_status,
                    ..Status::default()
                }),
                running: AtomicBool::new(false),
                writer: Mutex::new(None),
                stopping: AtomicBool::new(false),
                fence,
                generation: Mutex::new(generation),
                fenced: AtomicBool::new(false),
                exposed: AtomicBool::new(false),
            }),
        };
        if let Some(m) = &protector.inner.opts.metrics {
            // Read at scrape time; a weak reference, so the registry does
            // not keep a finished VM's memory alive.
            let weak = Arc::downgrade(&protector.inner);
            m.set_source(move |m| {
                if let Some(inner) = weak.upgrade() {
                    Protector { inner }.record(m);
                }
            });
        }
        Ok(protector)
    }

    /// Sets the protection's figures in `m` (at scrape time).
    fn record(&self, m: &crate::metrics::Metrics) {
        let held: u64 = self.inner.commits.iter().map(|c| c.held()).sum();
        let flows: u64 = self.inner.commits.iter().map(|c| c.flows()).sum();
        let generation = *lock(&self.inner.generation);
        let st = lock(&self.inner.status);
        m.set_protection(&crate::metrics::Protection {
            state: st.protected,
            epoch: st.epoch,
            lag: st.lag,
            held_bytes: held,
            flows,
            backup_alive: st.backup_alive,
            generation,
            fenced: self.fenced(),
        });
    }

    /// With a fence and no generation yet: claims the next generation in
    /// the background (the VM is starting: it becomes the active copy),
    /// retrying while etcd is unreachable; the guest's output is held
    /// until then.
    pub fn start(&self) -> Result<(), ProtectError> {
        if self.inner.fence.is_none() || lock(&self.inner.generation).is_some() {
            return Ok(());
        }
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("fence".into())
            .spawn(move || {
                let Some(fence) = &inner.fence else { return };
                let owner = crate::fence::owner("primary");
                let mut reported = None::<Instant>;
                loop {
                    if inner.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    match fence.claim_next(&owner) {
                        Ok(g) => {
                            // The gate first: a protection waits for the
                            // generation and then sets its lease.
                            open_gate(&inner);
                            *lock(&inner.generation) = Some(g);
                            lock(&inner.status).fence = g.to_string();
                            eprintln!(
                                "remora: fence: this copy holds generation {g} at {} ({}): output flows",
                                fence.key(),
                                fence.config()
                            );
                            return;
                        }
                        Err(e) => {
                            lock(&inner.status).fence = format!("claiming ({e})");
                            if reported.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                                eprintln!("remora: fence: cannot claim a generation: {e}; the guest's output is held, retrying");
                                reported = Some(Instant::now());
                            }
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            })
            .map_err(|e| ProtectError::Address("-".into(), format!("cannot start the fence thread: {e}")))?;
        Ok(())
    }

    /// Whether this copy lost the fence (its output is off for good).
    pub fn fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::Acquire)
    }

    /// The `ctl protect` / `status` handler to install in the VMM.
    pub fn hook(&self) -> Box<dyn ReplHook> {
        Box::new(Hook(self.clone()))
    }

    /// Starts protecting to the backup at `addr` (in the background).
    pub fn protect(&self, addr: &str) -> Result<(), ProtectError> {
        let sa: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| ProtectError::Address(addr.into(), e.to_string()))?
            .next()
            .ok_or_else(|| ProtectError::Address(addr.into(), "no address".into()))?;
        if self.fenced() {
            return Err(ProtectError::Fenced);
        }
        if self.inner.running.swap(true, Ordering::AcqRel) {
            let st = lock(&self.inner.status).protected;
            return Err(ProtectError::Busy(if st == "yes" { "protected" } else { "syncing" }));
        }
        {
            let mut st = lock(&self.inner.status);
            st.protected = "syncing";
            st.backup = addr.to_string();
            st.last_error = None;
            st.epoch = 0;
            st.lag = 0;
        }
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new().name("replication".into()).spawn(move || {
            let why = replicate(&inner, sa);
            unprotect(&inner, why);
            inner.running.store(false, Ordering::Release);
        });
        if let Err(e) = spawned {
            self.inner.running.store(false, Ordering::Release);
            lock(&self.inner.status).protected = "no";
            return Err(ProtectError::Address(
                addr.into(),
                format!("cannot start a thread: {e}"),
            ));
        }
        Ok(())
    }

    /// The guest ended on purpose (or the operator stopped it): tell the
    /// backup not to take over.
    pub fn shutdown(&self, reason: &str) {
        // The link first: the replication thread keeps it open until
        // `stopping` is set.
        let link = lock(&self.inner.writer).clone();
        self.inner.stopping.store(true, Ordering::Release);
        if let Some(w) = link {
            let _ = w.send(&remora_proto::Message::Shutdown { reason: reason.into() });
            // The process exits next: the Shutdown must reach the backup
            // (behind what is still queued) before the socket closes.
            if !w.finish(SHUTDOWN_LIMIT) {
                tracing::warn!("the backup did not confirm the shutdown; it may take over");
            }
        }
    }

    pub fn status(&self) -> Status {
        lock(&self.inner.status).clone()
    }

    /// `ctl status` text: `key=value` pairs.
    pub fn status_line(&self) -> String {
        let st = lock(&self.inner.status);
        let held: u64 = self.inner.commits.iter().map(|c| c.held()).sum();
        let mut s = format!(
            "protected={} backup={} epoch={} pause_us={} pause_p99_us={} ckpt_bytes={} lag={} output_held={} backup_alive={} nacks={} fence={}",
            st.protected,
            if st.backup.is_empty() { "-" } else { &st.backup },
            st.epoch,
            st.last_pause_us,
            st.p99_pause(),
            st.last_bytes,
            st.lag,
            held,
            if st.backup_alive { "yes" } else { "no" },
            st.nacks,
            st.fence.split_whitespace().next().unwrap_or("-"),
        );
        if let Some(e) = &st.last_error {
            s.push_str(&format!(" last_error=\"{}\"", e.replace('"', "'")));
        }
        s
    }
}

struct Hook(Protector);

impl ReplHook for Hook {
    fn protect(&mut self, addr: &str) -> Result<String, String> {
        self.0.protect(addr).map_err(|e| e.to_string())?;
        Ok(format!("protecting to {addr} (initial sync running; see status)"))
    }

    fn status(&self) -> String {
        self.0.status_line()
    }
}

const VM_STOPPED: &str = "the VM has stopped";
/// How long a stopping primary waits for the backup to read everything
/// up to its Shutdown (a slow link may hold a checkpoint's megabytes; a
/// backup that is gone resets the connection at once, only a silent one
/// makes the primary wait this long).
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// A request to the VMM's event loop.
fn ask(inner: &Inner, req: ReplRequest) -> Result<ReplReply, String> {
    let (tx, rx) = channel();
    inner
        .events
        .send(VmEvent::Repl(req, tx))
        .map_err(|_| VM_STOPPED.to_string())?;
    rx.recv().map_err(|_| VM_STOPPED.to_string())?
}

/// Opens every net device's output gate for good (no backup, or this
/// copy won the fence).
fn open_gate(inner: &Inner) {
    for c in &inner.commits {
        c.set_lease(LEASE_FOREVER);
    }
}

/// This copy lost the fence: output off for good, and the VM stops.
fn fence_off(inner: &Inner, why: String) {
    for c in &inner.commits {
        c.fence_off();
    }
    inner.fenced.store(true, Ordering::Release);
    {
        let mut st = lock(&inner.status);
        st.protected = "fenced";
        st.fence = "fenced".into();
        st.last_error = Some(why.clone());
    }
    eprintln!("remora: FENCED: {why}; this copy emits nothing more and stops");
    tracing::error!("fenced: {why}");
    let _ = inner.events.send(VmEvent::Stop(format!("fenced: {why}")));
}

/// With a fence: moves the generation on before this copy emits output on
/// its own (the backup may be taking over right now). Retries while etcd
/// is unreachable, holding the output. `Some(true)`: go on; `Some(false)`:
/// fenced; `None`: the VM stopped before the fence answered (output stays
/// held).
fn claim_to_go_on(inner: &Inner) -> Option<bool> {
    let Some(fence) = &inner.fence else { return Some(true) };
    let Some(held) = *lock(&inner.generation) else {
        // Still claiming at start: that claim opens the gate.
        return Some(true);
    };
    let owner = crate::fence::owner("primary (unprotected)");
    let mut reported = None::<Instant>;
    loop {
        if inner.stopping.load(Ordering::Acquire) {
            return None;
        }
        match fence.claim(held, &owner) {
            Ok(crate::fence::Claim::Won(g)) => {
                *lock(&inner.generation) = Some(g);
                lock(&inner.status).fence = g.to_string();
                eprintln!("remora: fence: generation {held} -> {g}: this copy goes on alone");
                return Some(true);
            }
            Ok(crate::fence::Claim::Lost { generation, owner }) => {
                fence_off(
                    inner,
                    format!(
                        "the fence moved from generation {held} to {generation} ({owner}): another copy (the backup) took over"
                    ),
                );
                return Some(false);
            }
            Err(e) => {
                lock(&inner.status).fence = format!("{held} (etcd unreachable)");
                if reported.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    eprintln!(
                        "remora: fence: {e}; the guest's output stays held until this copy can claim generation {}",
                        held + 1
                    );
                    reported = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Ends a protection: once the fence allows it, output flows freely again.
fn unprotect(inner: &Inner, why: String) {
    *lock(&inner.writer) = None;
    let stopping = inner.stopping.load(Ordering::Acquire);
    let exposed = inner.exposed.swap(false, Ordering::AcqRel);
    if exposed && claim_to_go_on(inner) != Some(true) {
        // Fenced, or stopping without the fence's word: nothing is
        // released (a backup may run the guest).
        lock(&inner.status).backup_alive = false;
        return;
    }
    if let Err(e) = ask(inner, ReplRequest::Unprotect) {
        tracing::debug!("unprotect: {e}");
    }
    if inner.fence.is_none() || lock(&inner.generation).is_some() {
        open_gate(inner);
    }
    let mut st = lock(&inner.status);
    st.protected = "no";
    st.backup_alive = false;
    st.lag = 0;
    if !stopping {
        eprintln!(
            "remora: protection to {} ended: {why}; the VM runs UNPROTECTED (held output released). Protect it again with 'remora ctl SOCKET protect ADDR:PORT'",
            st.backup
        );
        tracing::error!(backup = %st.backup, "protection ended: {why}");
        st.last_error = Some(why);
    }
}

/// The whole protection; returns why it ended.
fn replicate(inner: &Arc<Inner>, addr: SocketAddr) -> String {
    let opts = &inner.opts;
    // With a fence, a backup must learn the generation it would take over.
    let mut waited = false;
    let generation = loop {
        if inner.fence.is_none() {
            break None;
        }
        if let Some(g) = *lock(&inner.generation) {
            break Some(g);
        }
        if inner.stopping.load(Ordering::Acquire) {
            return VM_STOPPED.to_string();
        }
        if !waited {
            eprintln!("remora: protect: waiting for the fence's generation before connecting to {addr}");
            waited = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stream = match TcpStream::connect_timeout(&addr, opts.connect_timeout) {
        Ok(s) => s,
        Err(e) => return format!("cannot connect to the backup at {addr}: {e}"),
    };
    let _ = stream.set_nodelay(true);
    let hb = crate::heartbeat_interval(opts.heartbeat_timeout);
    let session = PrimarySession::new(PrimaryConfig {
        identity: inner.identity.clone(),
        output: opts.output,
        epoch_ms: opts.epoch.as_millis().min(u128::from(u32::MAX)) as u32,
        heartbeat_interval: hb,
        heartbeat_timeout: opts.heartbeat_timeout,
    });
    let mut session = match session {
        Ok(s) => s,
        Err(e) => return format!("cannot encode the hello: {e}"),
    };
    let transport = match &opts.tls {
        Some(tls) => crate::tls::connect(stream, tls, addr.ip(), opts.connect_timeout).map_err(|e| e.to_string()),
        None => crate::tls::plain(stream).map_err(|e| format!("socket: {e}")),
    };
    let (mut reader, mut writer) = match transport {
        Ok(t) => t,
        Err(e) => return e,
    };
    // A write that makes no progress for this long means the link is cut
    // (a blocked writer would otherwise never see the reader's verdict,
    // and the VM's output would stay held): it fails the protection.
    let stall = (opts.heartbeat_timeout * 2).max(Duration::from_millis(500));
    let _ = writer.raw().set_write_timeout(Some(stall));
    // Hello, and the backup's answer.
    let start = Instant::now();
    while let Some(b) = session.poll_output() {
        if let Err(e) = writer.write_all(&b) {
            return format!("cannot send to the backup: {e}");
        }
    }
    let _ = reader.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if start.elapsed() > opts.connect_timeout {
            return format!(
                "no answer from {addr} within {:?}: is it a remora backup?",
                opts.connect_timeout
            );
        }
        match reader.read(&mut buf) {
            Ok(0) => session.handle_eof(),
            Ok(n) => session.handle_input(start.elapsed(), &buf[..n]),
            Err(e) if crate::would_block(&e) => {}
            Err(e) => return format!("reading from {addr}: {e}"),
        }
        match session.poll_event() {
            Some(PrimaryEvent::Welcomed) => break,
            Some(PrimaryEvent::Refused { reason }) => return format!("the backup refused: {reason}"),
            Some(PrimaryEvent::BackupLost { why }) => return format!("{addr} is not a usable remora backup: {why}"),
            _ => {}
        }
    }
    eprintln!("remora: protect: connected to backup {addr}");
    let conn = crate::beacon::Link::new(writer);
    if let Some(value) = generation {
        inner.exposed.store(true, Ordering::Release);
        if let Err(e) = conn.send(&remora_proto::Message::Generation { value }) {
            return format!("cannot send to the backup: {e}");
        }
    }
    // From now on the backup may come to take over: output only under the
    // lease its receipt reports renew.
    let lease = lease_ns(opts.heartbeat_timeout);
    let until = mono_ns().saturating_add(lease);
    for c in &inner.commits {
        c.set_lease(until);
    }
    if let Err(e) = conn.start_beacon(hb, false) {
        return format!("cannot start the heartbeat thread: {e}");
    }
    *lock(&inner.writer) = Some(conn.clone());
    lock(&inner.status).backup_alive = true;
    let (sender, receiver) = session.split();
    let mut tx = Tx {
        sender,
        link: conn.clone(),
        origin: start,
    };

    // Acknowledgements from now on.
    let link = Arc::new((Mutex::new(Link::default()), Condvar::new()));
    let reader_stop = Arc::new(AtomicBool::new(false));
    let reader_thread = {
        let (inner, link, stop, conn) = (inner.clone(), link.clone(), reader_stop.clone(), conn.clone());
        std::thread::Builder::new()
            .name("repl-reader".into())
            .spawn(move || read_acks(&inner, reader, receiver, &link, &conn, &stop, start))
    };
    let reader_thread = match reader_thread {
        Ok(t) => t,
        Err(e) => return format!("cannot start the reader thread: {e}"),
    };
    let why = match sync_and_run(inner, &mut tx, &link) {
        Ok(()) => "stopped".to_string(),
        Err(e) if e.starts_with("sending to the backup") => {
            // A backup that refuses (e.g. a --fence mismatch) closes the
            // connection: its Refuse, read by the reader, says why better
            // than the broken pipe.
            let t = Instant::now();
            loop {
                if let Some(f) = lock(&link.0).failed.clone() {
                    break f;
                }
                if t.elapsed() > Duration::from_millis(300) {
                    break e;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Err(e) => e,
    };
    reader_stop.store(true, Ordering::Release);
    if why == VM_STOPPED {
        // The guest ended: Protector::shutdown (called right after the VM's
        // run returns) tells the backup why, on this connection.
        let t = Instant::now();
        while !inner.stopping.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if !inner.stopping.load(Ordering::Acquire) {
        // If the backup is alive after all (a slow link, a stall), it must
        // not take over a guest that goes on here.
        let _ = conn.send(&remora_proto::Message::Shutdown {
            reason: format!("{UNPROTECTED}{why}"),
        });
    }
    if !inner.stopping.load(Ordering::Acquire) {
        conn.close();
    }
    let _ = reader_thread.join();
    why
}

/// How long after writing bytes the backup has since received the primary
/// may still emit output: the backup cannot decide the primary is dead
/// before a heartbeat timeout has passed since it received them. A
/// sixteenth is kept back for clock-rate drift between the hosts.
fn lease_ns(heartbeat_timeout: Duration) -> u64 {
    let t = heartbeat_timeout.as_nanos() as u64;
    t - t / 16
}

/// The sending side of a protection: the protocol's sender half and the
/// connection.
struct Tx {
    sender: PrimarySender,
    link: Arc<crate::beacon::Link>,
    origin: Instant,
}

impl Tx {
    /// Writes whatever the sender has (a heartbeat too, if one is due).
    fn flush(&mut self) -> Result<(), String> {
        self.sender.handle_timeout(self.origin.elapsed());
        while let Some(b) = self.sender.poll_output() {
            self.link.write(&b).map_err(|e| format!("sending to the backup: {e}"))?;
        }
        Ok(())
    }

    fn send_raw(&mut self, b: &[u8]) -> Result<(), String> {
        self.link.write(b).map_err(|e| format!("sending to the backup: {e}"))
    }
}

/// The reader thread: acknowledgements commit epochs; Nacks ask for a
/// resend; silence or a closed connection fails the link.
fn read_acks(
    inner: &Inner,
    mut r: crate::tls::SecureRead,
    mut rx: PrimaryReceiver,
    link: &(Mutex<Link>, Condvar),
    conn: &crate::beacon::Link,
    stop: &AtomicBool,
    origin: Instant,
) {
    let lease = lease_ns(inner.opts.heartbeat_timeout);
    let hb = crate::heartbeat_interval(inner.opts.heartbeat_timeout);
    let _ = r.set_read_timeout(Some(hb));
    let mut buf = vec![0u8; 64 << 10];
    let fail = |why: String| {
        let mut l = lock(&link.0);
        if l.failed.is_none() {
            l.failed = Some(why);
        }
        link.1.notify_all();
    };
    while !stop.load(Ordering::Acquire) {
        match r.read(&mut buf) {
            Ok(0) => {
                rx.handle_eof();
                fail("the backup closed the connection".into());
                return;
            }
            Ok(n) => rx.handle_input(origin.elapsed(), &buf[..n]),
            Err(e) if crate::would_block(&e) => {}
            Err(e) => {
                fail(format!("replication link: {e}"));
                return;
            }
        }
        rx.handle_timeout(origin.elapsed());
        while let Some(ev) = rx.poll_event() {
            match ev {
                PrimaryEvent::Acked { seq } => {
                    let mut l = lock(&link.0);
                    while l.inflight.front().is_some_and(|f| f.seq <= seq) {
                        if let Some(f) = l.inflight.pop_front() {
                            for (c, e) in inner.commits.iter().zip(&f.epochs) {
                                if let Some(e) = e {
                                    c.commit(*e);
                                }
                            }
                        }
                    }
                    l.acked = l.acked.max(seq);
                    let lag = l.inflight.len() as u64;
                    link.1.notify_all();
                    drop(l);
                    let mut st = lock(&inner.status);
                    if st.protected != "yes" {
                        eprintln!(
                            "remora: protect: VM protected by {} from checkpoint {seq} on",
                            st.backup
                        );
                    }
                    st.protected = "yes";
                    st.epoch = seq;
                    st.lag = lag;
                    st.backup_alive = true;
                }
                PrimaryEvent::Nacked { seq, reason } => {
                    tracing::warn!(seq, "backup refused checkpoint: {reason}; sending it again");
                    eprintln!("remora: protect: backup refused checkpoint {seq} ({reason}); sending it again");
                    let mut l = lock(&link.0);
                    l.resend_from = Some(l.resend_from.map_or(seq, |s| s.min(seq)));
                    link.1.notify_all();
                    lock(&inner.status).nacks += 1;
                    if let Some(m) = &inner.opts.metrics {
                        m.nack();
                    }
                }
                PrimaryEvent::BackupLost { why } => {
                    lock(&inner.status).backup_alive = false;
                    fail(format!("backup lost: {why}"));
                    return;
                }
                PrimaryEvent::Refused { reason } => {
                    fail(format!("the backup refused: {reason}"));
                    return;
                }
                PrimaryEvent::Received { bytes } => {
                    if let Some(t) = conn.lease_base(bytes) {
                        for c in &inner.commits {
                            c.extend_lease(t.saturating_add(lease));
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Pre-copy, then the epoch loop, until the link fails or the VM stops.
fn sync_and_run(inner: &Inner, tx: &mut Tx, link: &(Mutex<Link>, Condvar)) -> Result<(), String> {
    let failed = || lock(&link.0).failed.clone();
    // Engines on every net path before the first checkpoint.
    for c in &inner.commits {
        if !c.has_engine() {
            let engine = remora_speculate::Engine::new(inner.opts.engine.clone())
                .map_err(|e| format!("speculative engine: {e}"))?;
            c.install(engine);
        }
    }
    let ReplReply::Pages(populated) = ask(inner, ReplRequest::StartTracking)? else {
        return Err("internal error: unexpected reply to StartTracking".into());
    };
    let t0 = Instant::now();
    let mut progress = Progress::new();
    send_pages(inner, tx, &populated, 0, &mut progress)?;
    if let Some(e) = failed() {
        return Err(e);
    }
    for (i, path) in inner.disks.iter().enumerate() {
        precopy_disk(tx, i as u32, path, &mut progress)?;
    }
    let mut rounds = 1;
    loop {
        let ReplReply::Pages(dirty) = ask(inner, ReplRequest::Harvest)? else {
            return Err("internal error: unexpected reply to Harvest".into());
        };
        if dirty.len() <= PRECOPY_DONE_PAGES || rounds >= MAX_ROUNDS {
            // What is left goes into the first checkpoint: put it back.
            carry(inner, dirty)?;
            break;
        }
        send_pages(inner, tx, &dirty, rounds, &mut progress)?;
        rounds += 1;
        if let Some(e) = failed() {
            return Err(e);
        }
    }
    tx.sender.precopy_done(rounds).map_err(|e| format!("encoding: {e}"))?;
    tx.flush()?;
    eprintln!(
        "remora: protect: pre-copy done: {} MiB in {rounds} rounds, {:.1} s, {:.0} MiB/s",
        progress.bytes >> 20,
        t0.elapsed().as_secs_f64(),
        progress.bytes as f64 / (1 << 20) as f64 / t0.elapsed().as_secs_f64().max(1e-3)
    );
    epoch_loop(inner, tx, link)
}

/// Puts pages that were harvested but not sent back into the VMM's dirty
/// set, so the next checkpoint sends them.
fn carry(inner: &Inner, pages: Vec<u64>) -> Result<(), String> {
    ask(inner, ReplRequest::Carry { pages }).map(|_| ())
}

struct Progress {
    bytes: u64,
    last: Instant,
    start: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            bytes: 0,
            last: Instant::now(),
            start: Instant::now(),
        }
    }

    fn report(&mut self, what: &str, done: usize, total: usize, round: u32, force: bool) {
        if !force && self.last.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.last = Instant::now();
        let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        let rate = self.bytes as f64 / (1 << 20) as f64 / self.start.elapsed().as_secs_f64().max(1e-3);
        eprintln!("remora: protect: pre-copy round {round}: {what} {pct}% ({done}/{total}), {rate:.0} MiB/s");
    }
}

/// Sends guest pages (read live) as pre-copy messages.
fn send_pages(inner: &Inner, tx: &mut Tx, pages: &[u64], round: u32, progress: &mut Progress) -> Result<(), String> {
    let mut page = vec![0u8; 4096];
    let mut chunk: Vec<(u64, Vec<u8>)> = Vec::with_capacity(PAGES_PER_MESSAGE);
    for (i, gpa) in pages.chunks(PAGES_PER_MESSAGE).enumerate() {
        chunk.clear();
        for g in gpa {
            if inner.mem.read_slice(&mut page, GuestAddress(*g)).is_ok() {
                chunk.push((*g, page.clone()));
            }
        }
        tx.sender
            .precopy_pages(chunk.iter().map(|(g, p)| (*g, p.as_slice())))
            .map_err(|e| format!("encoding pages: {e}"))?;
        tx.flush()?;
        progress.bytes += (gpa.len() * 4096) as u64;
        progress.report("memory", (i + 1) * PAGES_PER_MESSAGE, pages.len(), round, false);
    }
    progress.report("memory", pages.len(), pages.len(), round, true);
    Ok(())
}

/// Sends a disk's allocated extents (SEEK_DATA/SEEK_HOLE).
fn precopy_disk(tx: &mut Tx, disk: u32, path: &PathBuf, progress: &mut Progress) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("disk {}: {e}", path.display()))?;
    let len = f.metadata().map_err(|e| format!("disk {}: {e}", path.display()))?.len();
    let fd = f.as_raw_fd();
    let mut off: u64 = 0;
    let mut buf = vec![0u8; DISK_CHUNK];
    let mut sent = 0u64;
    while off < len {
        // SAFETY: plain lseek on a file descriptor we own.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // no more data (ENXIO) or no SEEK_DATA: stop at what we have
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, if hole < 0 { len } else { (hole as u64).min(len) });
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(DISK_CHUNK);
            f.read_exact_at(&mut buf[..n], at)
                .map_err(|e| format!("reading disk {}: {e}", path.display()))?;
            tx.sender
                .precopy_disk(disk, at, &buf[..n])
                .map_err(|e| format!("encoding disk data: {e}"))?;
            tx.flush()?;
            at += n as u64;
            sent += n as u64;
            progress.bytes += n as u64;
            progress.report("disk", (sent >> 20) as usize, (len >> 20) as usize, 0, false);
        }
        off = end;
    }
    Ok(())
}

/// One checkpoint per epoch until the link fails or the VM stops.
fn epoch_loop(inner: &Inner, tx: &mut Tx, link: &(Mutex<Link>, Condvar)) -> Result<(), String> {
    let opts = &inner.opts;
    let hb = crate::heartbeat_interval(opts.heartbeat_timeout);
    let mut seq: u64 = 1;
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut next = Instant::now();
    loop {
        if inner.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        // Refused checkpoints (and every later one) go again, in order.
        let resend: Vec<Arc<Vec<u8>>> = {
            let mut l = lock(&link.0);
            if let Some(e) = &l.failed {
                return Err(e.clone());
            }
            match l.resend_from.take() {
                Some(from) => l
                    .inflight
                    .iter()
                    .filter(|f| f.seq >= from)
                    .map(|f| f.bytes.clone())
                    .collect(),
                None => Vec::new(),
            }
        };
        for b in resend {
            tx.send_raw(&b)?;
        }
        // At most max_in_flight unacknowledged: the epoch stretches.
        {
            let mut l = lock(&link.0);
            while l.inflight.len() >= opts.max_in_flight && l.failed.is_none() && l.resend_from.is_none() {
                let (g, to) = link.1.wait_timeout(l, hb).unwrap_or_else(|p| p.into_inner());
                l = g;
                if to.timed_out() {
                    drop(l);
                    tx.flush()?;
                    l = lock(&link.0);
                }
            }
            if l.resend_from.is_some() {
                continue;
            }
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = Instant::now() + opts.epoch;
        let buf = pool.pop().unwrap_or_default();
        let reply = match ask(
            inner,
            ReplRequest::Checkpoint {
                seq,
                buf,
                protect: seq == 1,
            },
        ) {
            // An operator paused the VM: nothing changes until it resumes.
            Err(e) if e.contains(remora_vmm::checkpoint::PAUSED) => {
                std::thread::sleep(opts.epoch);
                continue;
            }
            r => r?,
        };
        let ReplReply::Checkpoint(ckpt) = reply else {
            return Err("internal error: unexpected reply to Checkpoint".into());
        };
        let ckpt = *ckpt;
        let (bytes, epochs) = encode_checkpoint(&mut tx.sender, &ckpt)?;
        {
            let mut st = lock(&inner.status);
            st.last_pause_us = ckpt.pause_us;
            st.pauses.push_back(ckpt.pause_us);
            if st.pauses.len() > 1000 {
                st.pauses.pop_front();
            }
            st.last_bytes = bytes.len() as u64;
        }
        if let Some(m) = &opts.metrics {
            m.checkpoint(Duration::from_micros(ckpt.pause_us), bytes.len() as u64);
        }
        pool.push(ckpt.pages.into_buffer());
        let bytes = Arc::new(bytes);
        let copy = bytes.clone();
        {
            let mut l = lock(&link.0);
            l.inflight.push_back(InFlight { seq, epochs, bytes });
            lock(&inner.status).lag = l.inflight.len() as u64;
        }
        tx.send_raw(&copy)?;
        tx.flush()?;
        seq += 1;
    }
}

/// A checkpoint's bytes on the wire, and the epoch it seals in each net.
fn encode_checkpoint(session: &mut PrimarySender, c: &Checkpoint) -> Result<(Vec<u8>, Vec<Option<EpochId>>), String> {
    let state = remora_vmstate::format::encode(STATE_KIND, &c.state).map_err(|e| format!("encoding state: {e}"))?;
    let engines: Vec<(u32, Vec<u8>)> = c
        .engines
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.as_ref().map(|s| {
                let mut b = Vec::new();
                b.extend_from_slice(&(s.at.as_nanos() as u64).to_le_bytes());
                b.extend_from_slice(&s.epoch.0.to_le_bytes());
                b.extend_from_slice(&s.delta.encode());
                (i as u32, b)
            })
        })
        .collect();
    let epochs: Vec<Option<EpochId>> = c.engines.iter().map(|s| s.as_ref().map(|s| s.epoch)).collect();
    let disk_writes: u64 = c.disks.iter().map(|d| d.len() as u64).sum();
    let epoch = epochs.iter().flatten().next().map_or(0, |e| e.0);
    session
        .begin_checkpoint(
            c.seq,
            epoch,
            remora_proto::CkptCounts {
                pages: c.pages.pages.len() as u64,
                state_len: state.len() as u64,
                engines: engines.len() as u32,
                disk_writes,
            },
        )
        .map_err(|e| format!("encoding: {e}"))?;
    let n = c.pages.pages.len();
    let mut i = 0;
    while i < n {
        let end = (i + PAGES_PER_MESSAGE).min(n);
        session
            .pages((i..end).map(|k| (c.pages.pages[k], c.pages.page(k))))
            .map_err(|e| format!("encoding pages: {e}"))?;
        i = end;
    }
    session.state(&state).map_err(|e| format!("encoding state: {e}"))?;
    for (net, b) in &engines {
        session.engine(*net, b).map_err(|e| format!("encoding engine: {e}"))?;
    }
    for (disk, writes) in c.disks.iter().enumerate() {
        for wr in writes {
            session
                .disk_write(disk as u32, wr.offset, &wr.data)
                .map_err(|e| format!("encoding disk write: {e}"))?;
        }
    }
    session.end_checkpoint().map_err(|e| format!("encoding: {e}"))?;
    // Everything since begin_checkpoint is in one buffer: taken, not copied.
    let mut bytes = session.poll_output().unwrap_or_default();
    while let Some(b) = session.poll_output() {
        bytes.extend_from_slice(&b);
    }
    Ok((bytes, epochs))
}
