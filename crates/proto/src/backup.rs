//! The backup's side of the protocol.

use std::collections::VecDeque;
use std::time::Duration;

use crc32fast::Hasher;

use crate::decoder::{Decoder, Frame};
use crate::error::ProtoError;
use crate::identity::{OutputMode, VmIdentity};
use crate::wire::{CkptCounts, DiskWrite, Kind, Message, PagesPayload, PayloadSum, PAGE_SIZE, PROTOCOL_VERSION};
use crate::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT};

/// Configuration of a [`BackupSession`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// The standby VM: a Hello that differs is refused. `mem_mib: 0`,
    /// `vcpus: 0` and an all-zero disk `id` accept the primary's value (a
    /// backup that builds its standby VM from the Hello, see
    /// [`BackupSession::primary_identity`]); device kinds, order, MACs,
    /// disk sizes and modes are always compared.
    pub identity: VmIdentity,
    /// Send a Heartbeat after sending nothing for this long.
    pub heartbeat_interval: Duration,
    /// [`BackupEvent::PrimaryLost`] after receiving no byte for this long.
    pub heartbeat_timeout: Duration,
}

impl BackupConfig {
    /// The default heartbeat interval (20 ms) and timeout (100 ms).
    pub fn new(identity: VmIdentity) -> Self {
        BackupConfig {
            identity,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        }
    }
}

/// A complete, verified checkpoint, ready to apply.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub seq: u64,
    /// The engine epoch id sealed in this checkpoint.
    pub epoch: u64,
    /// The dirty pages, in the messages they came in (no copy).
    pub pages: Vec<PagesPayload>,
    /// The machine state (vCPUs, VM, devices), opaque.
    pub state: Vec<u8>,
    /// (net device index, engine delta), in order.
    pub engines: Vec<(u32, Vec<u8>)>,
    /// The guest's disk writes of the epoch, in order.
    pub disk: Vec<DiskWrite>,
}

impl Checkpoint {
    /// Number of pages over all page messages.
    pub fn page_count(&self) -> usize {
        self.pages.iter().map(PagesPayload::len).sum()
    }

    /// Every (gpa, page), in order.
    pub fn iter_pages(&self) -> impl Iterator<Item = (u64, &[u8; PAGE_SIZE])> + '_ {
        self.pages.iter().flat_map(PagesPayload::iter)
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("seq", &self.seq)
            .field("epoch", &self.epoch)
            .field("pages", &self.page_count())
            .field("state_len", &self.state.len())
            .field("engines", &self.engines.len())
            .field("disk_writes", &self.disk.len())
            .finish()
    }
}

/// What the backup session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// A good Hello arrived (identity and version match); Welcome was sent.
    Connected { output: OutputMode, epoch_ms: u32 },
    /// The session refused the primary (its Hello did not match; Refuse was
    /// sent, `reason` names the first difference) or the primary refused
    /// (reason starts with "primary refused: "). The session is closed; do
    /// not take over.
    Refused { reason: String },
    /// Pre-copied pages: write them into standby memory (not guest state
    /// until the first checkpoint completes).
    PrecopyPages(PagesPayload),
    /// A pre-copied disk extent.
    PrecopyDisk(DiskWrite),
    /// The primary's optional end-of-precopy marker.
    PrecopyDone { rounds: u32 },
    /// A complete, verified checkpoint. Apply it, then call
    /// [`BackupSession::ack`] with its seq.
    Checkpoint(Checkpoint),
    /// Checkpoint `seq` was corrupt, torn or inconsistent: it was dropped,
    /// a Nack went out, the primary will send it again. Keep the last good
    /// state.
    CheckpointRefused { seq: u64, reason: String },
    /// The primary is silent or its connection closed: take over (after
    /// applying the checkpoints already delivered). The session is closed.
    PrimaryLost { why: String },
    /// The guest ended on purpose: do not take over. The session is closed.
    Shutdown { reason: String },
    /// The fence generation the primary holds (sent once, after Welcome).
    Generation { value: u64 },
    /// The primary broke the protocol (or the stream desynchronized): close
    /// the connection and do NOT take over (the primary may be alive). A
    /// Refuse naming the reason was sent. The session is closed.
    ProtocolError { why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Connected,
    Closed,
}

/// A checkpoint being received.
struct Assembly {
    seq: u64,
    epoch: u64,
    declared: CkptCounts,
    got: CkptCounts,
    pages: Vec<PagesPayload>,
    state: Vec<u8>,
    engines: Vec<(u32, Vec<u8>)>,
    disk: Vec<DiskWrite>,
    digest: Hasher,
}

enum Recv {
    /// Between checkpoints.
    Idle,
    Receiving(Box<Assembly>),
    /// Skipping a checkpoint's messages up to its End. `seq` is `None` when
    /// its Begin was corrupt and it is not known yet whether it was the
    /// expected checkpoint (decided at its End).
    Discarding {
        seq: Option<u64>,
    },
}

/// The backup's protocol state machine: bytes in ([`Self::handle_input`]),
/// bytes out ([`Self::poll_output`] or [`Self::output`]), events
/// ([`Self::poll_event`]), one timer ([`Self::poll_timeout`],
/// [`Self::handle_timeout`]). See the crate README for the states.
///
/// Time is a `Duration` since any origin, never decreasing. The session
/// learns the time from the first `handle_input`/`handle_timeout`; until
/// then `poll_timeout` returns `Some(Duration::ZERO)` so the driver calls
/// `handle_timeout` at once.
pub struct BackupSession {
    cfg: BackupConfig,
    decoder: Decoder,
    phase: Phase,
    recv: Recv,
    /// The seq the next checkpoint must have.
    expected: u64,
    /// A Nack for `expected` went out: checkpoints after it that were
    /// already in flight are skipped silently until `expected` comes again.
    resync: bool,
    /// No CkptBegin yet: precopy messages are allowed.
    precopy_open: bool,
    /// Highest seq delivered as [`BackupEvent::Checkpoint`].
    delivered: u64,
    /// Highest seq acknowledged.
    acked: u64,
    out: Vec<u8>,
    events: VecDeque<BackupEvent>,
    now: Option<Duration>,
    last_rx: Duration,
    last_tx: Duration,
    guest_pages: u64,
    nets: usize,
    disks: Vec<(u64, bool)>,
    /// The primary's identity, once its Hello was accepted.
    primary: Option<VmIdentity>,
}

impl BackupSession {
    /// The primary's identity from its accepted Hello (the VM to build:
    /// memory size, vCPUs, device ids).
    pub fn primary_identity(&self) -> Option<&VmIdentity> {
        self.primary.as_ref()
    }

    pub fn new(cfg: BackupConfig) -> Self {
        let guest_pages = cfg.identity.mem_mib.saturating_mul((1 << 20) / PAGE_SIZE as u64);
        let nets = cfg.identity.nets();
        let disks = cfg.identity.disks().map(|(size, ro, _)| (size, ro)).collect();
        BackupSession {
            cfg,
            decoder: Decoder::new(),
            phase: Phase::AwaitHello,
            recv: Recv::Idle,
            expected: 1,
            resync: false,
            precopy_open: true,
            delivered: 0,
            acked: 0,
            out: Vec::new(),
            events: VecDeque::new(),
            now: None,
            last_rx: Duration::ZERO,
            last_tx: Duration::ZERO,
            guest_pages,
            nets,
            disks,
            primary: None,
        }
    }

    /// True once refused, shut down, lost or failed: no more events, no
    /// more input processed.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Highest checkpoint seq delivered as an event.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Highest checkpoint seq acknowledged by [`Self::ack`].
    pub fn acked(&self) -> u64 {
        self.acked
    }

    fn observe(&mut self, now: Duration) {
        match self.now {
            None => {
                self.now = Some(now);
                self.last_rx = now;
                self.last_tx = now;
            }
            Some(n) => self.now = Some(n.max(now)),
        }
    }

    /// Bytes from the primary (any amount, split anywhere).
    pub fn handle_input(&mut self, now: Duration, bytes: &[u8]) {
        self.observe(now);
        if self.phase == Phase::Closed {
            return;
        }
        if !bytes.is_empty() {
            self.last_rx = self.now.unwrap_or(now);
        }
        self.decoder.feed(bytes);
        while self.phase != Phase::Closed {
            match self.decoder.next() {
                Ok(Some(frame)) => self.on_frame(frame),
                Ok(None) => break,
                Err(ProtoError::UnsupportedVersion(v)) if self.phase == Phase::AwaitHello => {
                    self.refuse_hello(format!(
                        "unsupported protocol version {v} (this backup speaks {PROTOCOL_VERSION})"
                    ));
                }
                Err(e) => self.fail(e.to_string()),
            }
        }
    }

    /// The connection reached end of file (or failed): the primary is lost
    /// unless the session already ended (Shutdown, Refuse, protocol error).
    pub fn handle_eof(&mut self) {
        if self.phase == Phase::Closed {
            return;
        }
        let mut why = String::from("connection closed by the primary");
        if let Recv::Receiving(a) = &self.recv {
            why.push_str(&format!(" during checkpoint {} (discarded)", a.seq));
        } else if self.decoder.in_frame() {
            why.push_str(" in the middle of a message");
        }
        self.lost(why);
    }

    /// When the driver must call [`Self::handle_timeout`] (absolute time);
    /// `None` once closed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.phase == Phase::Closed {
            return None;
        }
        if self.now.is_none() {
            return Some(Duration::ZERO);
        }
        let dead = self.last_rx.saturating_add(self.cfg.heartbeat_timeout);
        if self.phase == Phase::Connected {
            Some(dead.min(self.last_tx.saturating_add(self.cfg.heartbeat_interval)))
        } else {
            Some(dead)
        }
    }

    /// Liveness check and heartbeat.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.observe(now);
        if self.phase == Phase::Closed {
            return;
        }
        let now = self.now.unwrap_or(now);
        let silent = now.saturating_sub(self.last_rx);
        if silent >= self.cfg.heartbeat_timeout {
            self.lost(format!(
                "no bytes from the primary for {silent:?} (heartbeat timeout {:?})",
                self.cfg.heartbeat_timeout
            ));
            return;
        }
        if self.phase == Phase::Connected && now.saturating_sub(self.last_tx) >= self.cfg.heartbeat_interval {
            let sent_at_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
            self.send(&Message::Heartbeat { sent_at_ns });
        }
    }

    /// The driver applied checkpoint `seq` (delivered by
    /// [`BackupEvent::Checkpoint`]): send its Ack. Checkpoints must be
    /// acknowledged in order, each once.
    pub fn ack(&mut self, seq: u64) -> Result<(), ProtoError> {
        if self.phase == Phase::Closed {
            return Err(ProtoError::Closed);
        }
        if seq != self.acked + 1 || seq > self.delivered {
            return Err(ProtoError::Misuse(format!(
                "ack({seq}): next to acknowledge is {} and the last delivered is {}",
                self.acked + 1,
                self.delivered
            )));
        }
        self.acked = seq;
        self.send(&Message::Ack { seq });
        Ok(())
    }

    /// Refuse the primary (busy, cannot apply, ...): sends Refuse, closes.
    pub fn refuse(&mut self, reason: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        self.send(&Message::Refuse {
            reason: reason.to_owned(),
        });
        self.phase = Phase::Closed;
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<BackupEvent> {
        self.events.pop_front()
    }

    /// All bytes to send to the primary, if any (the buffer is taken).
    pub fn poll_output(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.out))
        }
    }

    /// The bytes to send, in place: write them, then remove what was
    /// written (`drain(..n)` or `clear()`); the capacity is kept.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    fn send(&mut self, msg: &Message) {
        if let Err(e) = msg.encode(&mut self.out) {
            tracing::error!("cannot encode {:?}: {e}", msg.kind());
            return;
        }
        if let Some(now) = self.now {
            self.last_tx = now;
        }
    }

    fn lost(&mut self, why: String) {
        tracing::warn!("primary lost: {why}");
        self.events.push_back(BackupEvent::PrimaryLost { why });
        self.phase = Phase::Closed;
    }

    fn fail(&mut self, why: String) {
        tracing::warn!("replication protocol error: {why}");
        self.send(&Message::Refuse {
            reason: format!("protocol error: {why}"),
        });
        self.events.push_back(BackupEvent::ProtocolError { why });
        self.phase = Phase::Closed;
    }

    fn refuse_hello(&mut self, reason: String) {
        tracing::warn!("refusing the primary: {reason}");
        self.send(&Message::Refuse { reason: reason.clone() });
        self.events.push_back(BackupEvent::Refused { reason });
        self.phase = Phase::Closed;
    }

    fn on_frame(&mut self, frame: Frame) {
        match self.phase {
            Phase::AwaitHello => match frame {
                Frame::Message {
                    msg:
                        Message::Hello {
                            version,
                            vm,
                            output,
                            epoch_ms,
                        },
                    ..
                } => {
                    if version != PROTOCOL_VERSION {
                        self.refuse_hello(format!(
                            "unsupported protocol version {version} (this backup speaks {PROTOCOL_VERSION})"
                        ));
                    } else if let Some(diff) = vm.first_difference(&self.cfg.identity) {
                        self.refuse_hello(diff);
                    } else {
                        self.send(&Message::Welcome {
                            version: PROTOCOL_VERSION,
                        });
                        self.phase = Phase::Connected;
                        self.guest_pages = vm.mem_mib.saturating_mul((1 << 20) / PAGE_SIZE as u64);
                        self.primary = Some(vm);
                        self.events.push_back(BackupEvent::Connected { output, epoch_ms });
                    }
                }
                Frame::Message {
                    msg: Message::Refuse { reason },
                    ..
                } => self.peer_refused(reason),
                Frame::Message { msg, .. } => self.fail(format!("expected Hello, got {:?}", msg.kind())),
                Frame::Corrupt { kind, len } => self.fail(format!("corrupt {kind:?} message ({len} bytes)")),
            },
            Phase::Connected => match frame {
                Frame::Message { msg, sum } => self.on_message(msg, sum),
                Frame::Corrupt { kind, len } => self.on_corrupt(kind, len),
            },
            Phase::Closed => {}
        }
    }

    fn peer_refused(&mut self, reason: String) {
        tracing::warn!("the primary refused: {reason}");
        self.events.push_back(BackupEvent::Refused {
            reason: format!("primary refused: {reason}"),
        });
        self.phase = Phase::Closed;
    }

    fn on_corrupt(&mut self, kind: Kind, len: u32) {
        let what = format!("corrupt {kind:?} message ({len} bytes)");
        match kind {
            // Liveness is counted in bytes: a damaged heartbeat did its job.
            Kind::Heartbeat => tracing::warn!("{what}, ignored"),
            Kind::CkptBegin => match self.recv {
                Recv::Idle => {
                    self.precopy_open = false;
                    if self.resync {
                        // Could be the retransmission we wait for or a later
                        // checkpoint still in flight: its End decides.
                        self.recv = Recv::Discarding { seq: None };
                    } else {
                        let seq = self.expected;
                        self.refuse_checkpoint(seq, what);
                        self.recv = Recv::Discarding { seq: Some(seq) };
                    }
                }
                _ => self.fail(format!("{what} inside a checkpoint")),
            },
            Kind::CkptPages | Kind::CkptState | Kind::CkptEngine | Kind::CkptDisk => {
                match std::mem::replace(&mut self.recv, Recv::Idle) {
                    Recv::Idle => self.fail(format!("{what} outside a checkpoint")),
                    Recv::Receiving(a) => {
                        self.refuse_checkpoint(a.seq, what);
                        self.recv = Recv::Discarding { seq: Some(a.seq) };
                    }
                    d @ Recv::Discarding { .. } => self.recv = d,
                }
            }
            Kind::CkptEnd => match std::mem::replace(&mut self.recv, Recv::Idle) {
                Recv::Idle => self.fail(format!("{what} outside a checkpoint")),
                Recv::Receiving(a) => self.refuse_checkpoint(a.seq, what),
                Recv::Discarding { seq: Some(_) } => {}
                Recv::Discarding { seq: None } => {
                    // Neither its Begin nor its End could be read: it may
                    // have been the checkpoint we wait for. Ask for it again
                    // (if it was a later one, the primary gets a second Nack
                    // for the same seq: see the README).
                    let seq = self.expected;
                    self.refuse_checkpoint(seq, format!("{what}; its Begin was corrupt too"));
                }
            },
            _ => self.fail(what),
        }
    }

    fn on_message(&mut self, msg: Message, sum: PayloadSum) {
        match msg {
            Message::Heartbeat { .. } => {}
            Message::Generation { value } => self.events.push_back(BackupEvent::Generation { value }),
            Message::Refuse { reason } => self.peer_refused(reason),
            Message::Shutdown { reason } => {
                tracing::info!("the primary shut the guest down: {reason}");
                self.events.push_back(BackupEvent::Shutdown { reason });
                self.phase = Phase::Closed;
            }
            Message::Hello { .. } => self.fail("second Hello".into()),
            Message::Welcome { .. } | Message::Ack { .. } | Message::Nack { .. } | Message::Received { .. } => {
                self.fail(format!("{:?} is not a message from the primary", msg.kind()))
            }
            Message::PrecopyPages { pages } => {
                if let Some(why) = self.precopy_check(Kind::PrecopyPages) {
                    return self.fail(why);
                }
                if let Some(gpa) = pages
                    .iter()
                    .map(|(gpa, _)| gpa)
                    .find(|gpa| !gpa.is_multiple_of(PAGE_SIZE as u64))
                {
                    return self.fail(format!("precopy page at unaligned gpa {gpa:#x}"));
                }
                self.events.push_back(BackupEvent::PrecopyPages(pages));
            }
            Message::PrecopyDisk { disk, offset, data } => {
                if let Some(why) = self.precopy_check(Kind::PrecopyDisk) {
                    return self.fail(why);
                }
                // A read-only disk may still be pre-copied (its content must match).
                if let Err(why) = self.disk_range(disk, offset, data.len(), false) {
                    return self.fail(format!("precopy: {why}"));
                }
                self.events
                    .push_back(BackupEvent::PrecopyDisk(DiskWrite { disk, offset, data }));
            }
            Message::PrecopyDone { rounds } => {
                if let Some(why) = self.precopy_check(Kind::PrecopyDone) {
                    return self.fail(why);
                }
                self.events.push_back(BackupEvent::PrecopyDone { rounds });
            }
            Message::CkptBegin {
                seq,
                epoch,
                pages,
                state_len,
                engines,
                disk_writes,
            } => {
                let declared = CkptCounts {
                    pages,
                    state_len,
                    engines,
                    disk_writes,
                };
                self.on_begin(seq, epoch, declared, sum)
            }
            Message::CkptPages { .. }
            | Message::CkptState { .. }
            | Message::CkptEngine { .. }
            | Message::CkptDisk { .. } => match std::mem::replace(&mut self.recv, Recv::Idle) {
                Recv::Idle => self.fail(format!("{:?} outside a checkpoint", msg.kind())),
                Recv::Receiving(mut a) => match self.add(&mut a, msg, sum) {
                    Ok(()) => self.recv = Recv::Receiving(a),
                    Err(why) => {
                        self.refuse_checkpoint(a.seq, why);
                        self.recv = Recv::Discarding { seq: Some(a.seq) };
                    }
                },
                d @ Recv::Discarding { .. } => self.recv = d,
            },
            Message::CkptEnd { seq, digest } => self.on_end(seq, digest),
        }
    }

    fn precopy_check(&self, kind: Kind) -> Option<String> {
        if !self.precopy_open {
            Some(format!("{kind:?} after the first checkpoint began"))
        } else {
            None
        }
    }

    fn on_begin(&mut self, seq: u64, epoch: u64, declared: CkptCounts, sum: PayloadSum) {
        if !matches!(self.recv, Recv::Idle) {
            return self.fail(format!("CkptBegin {seq} inside a checkpoint"));
        }
        self.precopy_open = false;
        if seq == self.expected {
            if declared.pages > self.guest_pages {
                self.refuse_checkpoint(
                    seq,
                    format!("declares {} pages, the guest has {}", declared.pages, self.guest_pages),
                );
                self.recv = Recv::Discarding { seq: Some(seq) };
                return;
            }
            let mut digest = Hasher::new();
            digest.combine(&sum.hasher());
            self.recv = Recv::Receiving(Box::new(Assembly {
                seq,
                epoch,
                declared,
                got: CkptCounts::default(),
                pages: Vec::new(),
                state: Vec::new(),
                engines: Vec::new(),
                disk: Vec::new(),
                digest,
            }));
        } else if self.resync && seq > self.expected {
            // Sent before the primary saw our Nack: it will come again.
            tracing::debug!("skipping checkpoint {seq} until {} is resent", self.expected);
            self.recv = Recv::Discarding { seq: Some(seq) };
        } else {
            self.fail(format!("checkpoint {seq} out of order: expected {}", self.expected));
        }
    }

    /// Adds one checkpoint message; `Err` is the reason to refuse it.
    fn add(&self, a: &mut Assembly, msg: Message, sum: PayloadSum) -> Result<(), String> {
        match msg {
            Message::CkptPages { pages } => {
                let n = pages.len() as u64;
                if n > a.declared.pages - a.got.pages {
                    return Err(format!("more pages than the {} declared", a.declared.pages));
                }
                if let Some(gpa) = pages
                    .iter()
                    .map(|(gpa, _)| gpa)
                    .find(|gpa| !gpa.is_multiple_of(PAGE_SIZE as u64))
                {
                    return Err(format!("page at unaligned gpa {gpa:#x}"));
                }
                a.got.pages += n;
                a.pages.push(pages);
            }
            Message::CkptState { bytes } => {
                let n = bytes.len() as u64;
                if n > a.declared.state_len - a.got.state_len {
                    return Err(format!("more state than the {} bytes declared", a.declared.state_len));
                }
                a.got.state_len += n;
                if a.state.is_empty() {
                    a.state = bytes;
                } else {
                    a.state.extend_from_slice(&bytes);
                }
            }
            Message::CkptEngine { net, bytes } => {
                if a.got.engines >= a.declared.engines {
                    return Err(format!("more engine deltas than the {} declared", a.declared.engines));
                }
                if net as usize >= self.nets {
                    return Err(format!(
                        "engine delta for net {net}, the VM has {} net devices",
                        self.nets
                    ));
                }
                a.got.engines += 1;
                a.engines.push((net, bytes));
            }
            Message::CkptDisk { disk, offset, data } => {
                if a.got.disk_writes >= a.declared.disk_writes {
                    return Err(format!("more disk writes than the {} declared", a.declared.disk_writes));
                }
                self.disk_range(disk, offset, data.len(), true)?;
                a.got.disk_writes += 1;
                a.disk.push(DiskWrite { disk, offset, data });
            }
            // on_message only passes the four kinds above.
            other => return Err(format!("unexpected {:?}", other.kind())),
        }
        a.digest.combine(&sum.hasher());
        Ok(())
    }

    fn disk_range(&self, disk: u32, offset: u64, len: usize, write: bool) -> Result<(), String> {
        let Some(&(size, read_only)) = self.disks.get(disk as usize) else {
            return Err(format!("write to disk {disk}, the VM has {} disks", self.disks.len()));
        };
        if write && read_only {
            return Err(format!("write to read-only disk {disk}"));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(format!(
                "write of {len} bytes at {offset} beyond the end of disk {disk} ({size} bytes)"
            )),
        }
    }

    fn on_end(&mut self, seq: u64, digest: u32) {
        match std::mem::replace(&mut self.recv, Recv::Idle) {
            Recv::Idle => self.fail(format!("CkptEnd {seq} outside a checkpoint")),
            Recv::Receiving(a) => {
                if seq != a.seq {
                    return self.fail(format!("CkptEnd {seq} ends checkpoint {}", a.seq));
                }
                if a.got != a.declared {
                    let why = format!("incomplete: declared {:?}, received {:?}", a.declared, a.got);
                    return self.refuse_checkpoint(seq, why);
                }
                let computed = a.digest.clone().finalize();
                if computed != digest {
                    let why = format!("digest mismatch: End says {digest:#010x}, computed {computed:#010x}");
                    return self.refuse_checkpoint(seq, why);
                }
                let a = *a;
                self.delivered = seq;
                self.expected = seq + 1;
                self.resync = false;
                self.events.push_back(BackupEvent::Checkpoint(Checkpoint {
                    seq,
                    epoch: a.epoch,
                    pages: a.pages,
                    state: a.state,
                    engines: a.engines,
                    disk: a.disk,
                }));
            }
            Recv::Discarding { seq: Some(s) } => {
                if s != seq {
                    self.fail(format!("CkptEnd {seq} ends checkpoint {s}"));
                }
            }
            Recv::Discarding { seq: None } => {
                if seq == self.expected {
                    self.refuse_checkpoint(seq, "corrupt CkptBegin".into());
                } else if !(self.resync && seq > self.expected) {
                    self.fail(format!("checkpoint {seq} out of order: expected {}", self.expected));
                }
            }
        }
    }

    fn refuse_checkpoint(&mut self, seq: u64, reason: String) {
        tracing::warn!("refusing checkpoint {seq}: {reason}");
        self.send(&Message::Nack {
            seq,
            reason: reason.clone(),
        });
        self.events.push_back(BackupEvent::CheckpointRefused { seq, reason });
        self.resync = true;
    }
}
