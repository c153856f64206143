//! The primary's side of the protocol, in two halves that can live on two
//! threads: [`PrimarySender`] produces every byte the primary sends,
//! [`PrimaryReceiver`] consumes every byte the backup sends. They share
//! three counters (atomics, no lock): the highest checkpoint begun, the
//! highest ended, the highest acknowledged, and the seq a Nack asked to
//! resend from.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crc32fast::Hasher;

use crate::decoder::{Decoder, Frame};
use crate::error::ProtoError;
use crate::identity::{OutputMode, VmIdentity};
use crate::wire::{
    encode_begin, encode_disk, encode_end, encode_engine, encode_fixed, encode_hello, encode_pages, CkptCounts, Kind,
    Message, PagesKind, PayloadSum, DEFAULT_PAGES_PER_MESSAGE, MAX_PAGES_PER_MESSAGE, MAX_PAYLOAD, PROTOCOL_VERSION,
};
use crate::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT};

/// Configuration of a [`PrimarySession`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryConfig {
    /// Sent in Hello; the backup refuses if its standby VM differs.
    pub identity: VmIdentity,
    pub output: OutputMode,
    pub epoch_ms: u32,
    /// The sender sends a Heartbeat after sending nothing for this long.
    pub heartbeat_interval: Duration,
    /// [`PrimaryEvent::BackupLost`] after receiving no byte for this long.
    pub heartbeat_timeout: Duration,
}

impl PrimaryConfig {
    /// The default heartbeat interval (20 ms) and timeout (100 ms).
    pub fn new(identity: VmIdentity, output: OutputMode, epoch_ms: u32) -> Self {
        PrimaryConfig {
            identity,
            output,
            epoch_ms,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        }
    }
}

/// What the primary session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// The backup accepted the Hello.
    Welcomed,
    /// The backup refused (identity mismatch, busy, version, or a protocol
    /// error it found). Closed.
    Refused { reason: String },
    /// Checkpoint `seq` and every one before it are applied on the backup:
    /// commit their epochs (release output, drop disk logs).
    Acked { seq: u64 },
    /// The backup dropped checkpoint `seq` and every later one already in
    /// flight: finish the checkpoint being sent (if any), then send `seq`,
    /// `seq + 1`, ... again (go-back-N) with the same content.
    Nacked { seq: u64, reason: String },
    /// The backup is silent, its connection closed, or it broke the
    /// protocol. Closed.
    BackupLost { why: String },
    /// The backup had received `bytes` of this connection when it said so:
    /// it cannot decide the primary is dead before the heartbeat timeout
    /// has passed since the primary wrote them (the output lease).
    Received { bytes: u64 },
}

#[derive(Debug, Default)]
struct Shared {
    /// Highest seq begun (any attempt).
    begun: AtomicU64,
    /// Highest seq whose End was written.
    ended: AtomicU64,
    /// Highest seq acknowledged.
    acked: AtomicU64,
    /// A Nack asked to resend from this seq (0: none pending).
    resend_from: AtomicU64,
}

impl Shared {
    fn unacked(&self) -> std::ops::RangeInclusive<u64> {
        let acked = self.acked.load(Ordering::Acquire);
        let ended = self.ended.load(Ordering::Acquire);
        acked + 1..=ended
    }

    fn lag(&self) -> u64 {
        let acked = self.acked.load(Ordering::Acquire);
        self.ended.load(Ordering::Acquire).saturating_sub(acked)
    }
}

struct OpenCkpt {
    seq: u64,
    declared: CkptCounts,
    sent: CkptCounts,
    digest: Hasher,
}

/// The sending half of the primary: encodes Hello, precopy, checkpoints,
/// heartbeats and Shutdown into its output buffer.
///
/// The output is a plain `Vec<u8>`: [`Self::output`] gives it in place (write
/// it, then `clear()` it, keeping its capacity; pages are copied once, from
/// the caller's memory into this buffer), [`Self::poll_output`] takes it.
/// The buffer grows with what is encoded: feed large page sets in chunks and
/// drain in between.
pub struct PrimarySender {
    shared: Arc<Shared>,
    out: Vec<u8>,
    open: Option<OpenCkpt>,
    last_begun: u64,
    precopy_open: bool,
    shut_down: bool,
    pages_per_message: usize,
    heartbeat_interval: Duration,
    now: Option<Duration>,
    last_tx: Duration,
}

impl PrimarySender {
    fn new(cfg: &PrimaryConfig, shared: Arc<Shared>) -> Result<Self, ProtoError> {
        let mut s = PrimarySender {
            shared,
            out: Vec::new(),
            open: None,
            last_begun: 0,
            precopy_open: true,
            shut_down: false,
            pages_per_message: DEFAULT_PAGES_PER_MESSAGE,
            heartbeat_interval: cfg.heartbeat_interval,
            now: None,
            last_tx: Duration::ZERO,
        };
        encode_hello(&mut s.out, PROTOCOL_VERSION, &cfg.identity, cfg.output, cfg.epoch_ms)?;
        Ok(s)
    }

    /// Page records per pages message (clamped to 1..=[`MAX_PAGES_PER_MESSAGE`];
    /// default [`DEFAULT_PAGES_PER_MESSAGE`]).
    pub fn set_pages_per_message(&mut self, n: usize) {
        self.pages_per_message = n.clamp(1, MAX_PAGES_PER_MESSAGE);
    }

    fn wrote(&mut self) {
        if let Some(now) = self.now {
            self.last_tx = now;
        }
    }

    fn usable(&self) -> Result<(), ProtoError> {
        if self.shut_down {
            Err(ProtoError::Closed)
        } else {
            Ok(())
        }
    }

    fn precopy(&self, what: &str) -> Result<(), ProtoError> {
        self.usable()?;
        if !self.precopy_open {
            return Err(ProtoError::Misuse(format!("{what} after the first checkpoint began")));
        }
        Ok(())
    }

    fn open_ckpt(&mut self, what: &str) -> Result<&mut OpenCkpt, ProtoError> {
        if self.shut_down {
            return Err(ProtoError::Closed);
        }
        self.open
            .as_mut()
            .ok_or_else(|| ProtoError::Misuse(format!("{what} outside a checkpoint")))
    }

    /// Pages before the first checkpoint (split into messages as needed).
    /// Returns the number of pages written.
    pub fn precopy_pages<I, P>(&mut self, pages: I) -> Result<u64, ProtoError>
    where
        I: IntoIterator<Item = (u64, P)>,
        P: AsRef<[u8]>,
    {
        self.precopy("precopy_pages")?;
        let mut it = pages.into_iter();
        let mut total = 0u64;
        let res = loop {
            match encode_pages(&mut self.out, PagesKind::Precopy, &mut it, self.pages_per_message) {
                Ok(Some((n, _))) => total += n as u64,
                Ok(None) => break Ok(total),
                Err(e) => break Err(e),
            }
        };
        self.wrote();
        res
    }

    /// A disk extent before the first checkpoint (at most
    /// [`MAX_PAYLOAD`] - 12 bytes).
    pub fn precopy_disk(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), ProtoError> {
        self.precopy("precopy_disk")?;
        encode_disk(&mut self.out, Kind::PrecopyDisk, disk, offset, data)?;
        self.wrote();
        Ok(())
    }

    /// The optional end-of-precopy marker.
    pub fn precopy_done(&mut self, rounds: u32) -> Result<(), ProtoError> {
        self.precopy("precopy_done")?;
        encode_fixed(&mut self.out, Kind::PrecopyDone, &rounds.to_le_bytes())?;
        self.wrote();
        Ok(())
    }

    /// Starts checkpoint `seq` with the counts its messages will add up to.
    /// `seq` is the last begun + 1, or, after a [`PrimaryEvent::Nacked`],
    /// the Nack's seq (go-back-N: then seq + 1, ...).
    pub fn begin_checkpoint(&mut self, seq: u64, epoch: u64, counts: CkptCounts) -> Result<(), ProtoError> {
        self.usable()?;
        if let Some(o) = &self.open {
            return Err(ProtoError::Misuse(format!(
                "begin_checkpoint({seq}) while checkpoint {} is open",
                o.seq
            )));
        }
        let resend_from = self.shared.resend_from.load(Ordering::Acquire);
        let rewind = resend_from != 0 && seq == resend_from;
        if seq != self.last_begun + 1 && !rewind {
            return Err(ProtoError::Misuse(format!(
                "begin_checkpoint({seq}): the next checkpoint is {}{}",
                self.last_begun + 1,
                if resend_from != 0 {
                    format!(" (or {resend_from}, Nacked)")
                } else {
                    String::new()
                }
            )));
        }
        if rewind {
            // Only this retransmission clears the request (a later Nack
            // sets it again).
            let _ = self
                .shared
                .resend_from
                .compare_exchange(resend_from, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        let sum = encode_begin(&mut self.out, seq, epoch, counts)?;
        let mut digest = Hasher::new();
        digest.combine(&sum.hasher());
        self.open = Some(OpenCkpt {
            seq,
            declared: counts,
            sent: CkptCounts::default(),
            digest,
        });
        self.last_begun = seq;
        self.precopy_open = false;
        self.shared.begun.fetch_max(seq, Ordering::AcqRel);
        self.wrote();
        Ok(())
    }

    /// Dirty pages of the open checkpoint, each (gpa, 4096 bytes), written
    /// with one copy into the output (split into messages of
    /// `pages_per_message`). Returns the number written. More pages than
    /// declared in total fails before writing the message that would
    /// exceed.
    pub fn pages<I, P>(&mut self, pages: I) -> Result<u64, ProtoError>
    where
        I: IntoIterator<Item = (u64, P)>,
        P: AsRef<[u8]>,
    {
        self.open_ckpt("pages")?;
        let mut it = pages.into_iter();
        let mut total = 0u64;
        let per = self.pages_per_message;
        let res = loop {
            let Some(o) = self.open.as_mut() else { break Ok(total) };
            let mark = self.out.len();
            match encode_pages(&mut self.out, PagesKind::Checkpoint, &mut it, per) {
                Ok(Some((n, sum))) => {
                    if n as u64 > o.declared.pages - o.sent.pages {
                        self.out.truncate(mark);
                        break Err(ProtoError::Misuse(format!(
                            "checkpoint {}: more pages than the {} declared",
                            o.seq, o.declared.pages
                        )));
                    }
                    o.sent.pages += n as u64;
                    o.digest.combine(&sum.hasher());
                    total += n as u64;
                }
                Ok(None) => break Ok(total),
                Err(e) => break Err(e),
            }
        };
        self.wrote();
        res
    }

    /// Machine state bytes of the open checkpoint (split into messages of
    /// at most [`MAX_PAYLOAD`]; may be called several times).
    pub fn state(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        let o = self.open_ckpt("state")?;
        if bytes.len() as u64 > o.declared.state_len - o.sent.state_len {
            return Err(ProtoError::Misuse(format!(
                "checkpoint {}: more state than the {} bytes declared",
                o.seq, o.declared.state_len
            )));
        }
        for chunk in bytes.chunks(MAX_PAYLOAD as usize) {
            let sum = encode_fixed(&mut self.out, Kind::CkptState, chunk)?;
            self.count(|c| c.state_len += chunk.len() as u64, sum);
        }
        self.wrote();
        Ok(())
    }

    /// One net device's engine delta (at most [`MAX_PAYLOAD`] - 4 bytes).
    pub fn engine(&mut self, net: u32, bytes: &[u8]) -> Result<(), ProtoError> {
        let o = self.open_ckpt("engine")?;
        if o.sent.engines >= o.declared.engines {
            return Err(ProtoError::Misuse(format!(
                "checkpoint {}: more engine deltas than the {} declared",
                o.seq, o.declared.engines
            )));
        }
        let sum = encode_engine(&mut self.out, net, bytes)?;
        self.count(|c| c.engines += 1, sum);
        self.wrote();
        Ok(())
    }

    /// One logged guest disk write (at most [`MAX_PAYLOAD`] - 12 bytes), in
    /// the order the guest made them.
    pub fn disk_write(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), ProtoError> {
        let o = self.open_ckpt("disk_write")?;
        if o.sent.disk_writes >= o.declared.disk_writes {
            return Err(ProtoError::Misuse(format!(
                "checkpoint {}: more disk writes than the {} declared",
                o.seq, o.declared.disk_writes
            )));
        }
        let sum = encode_disk(&mut self.out, Kind::CkptDisk, disk, offset, data)?;
        self.count(|c| c.disk_writes += 1, sum);
        self.wrote();
        Ok(())
    }

    fn count(&mut self, f: impl FnOnce(&mut CkptCounts), sum: PayloadSum) {
        if let Some(o) = self.open.as_mut() {
            f(&mut o.sent);
            o.digest.combine(&sum.hasher());
        }
    }

    /// Ends the open checkpoint (writes End with the digest). Fails, leaving
    /// it open, if what was sent does not add up to the declared counts.
    /// Returns its seq.
    pub fn end_checkpoint(&mut self) -> Result<u64, ProtoError> {
        let o = self.open_ckpt("end_checkpoint")?;
        if o.sent != o.declared {
            return Err(ProtoError::Misuse(format!(
                "checkpoint {}: declared {:?}, sent {:?}",
                o.seq, o.declared, o.sent
            )));
        }
        let seq = o.seq;
        let digest = o.digest.clone().finalize();
        encode_end(&mut self.out, seq, digest)?;
        self.open = None;
        self.shared.ended.fetch_max(seq, Ordering::AcqRel);
        self.wrote();
        Ok(seq)
    }

    /// True while a checkpoint is open (begun, not ended).
    pub fn in_checkpoint(&self) -> bool {
        self.open.is_some()
    }

    /// The guest ended on purpose: tells the backup not to take over. The
    /// sender accepts nothing after it; close the connection once the
    /// output is written.
    pub fn shutdown(&mut self, reason: &str) -> Result<(), ProtoError> {
        self.usable()?;
        encode_fixed(&mut self.out, Kind::Shutdown, reason.as_bytes())?;
        self.shut_down = true;
        self.open = None;
        self.wrote();
        Ok(())
    }

    /// Checkpoints ended but not acknowledged yet, oldest first (as the
    /// receiver last saw the acks).
    pub fn unacked(&self) -> impl Iterator<Item = u64> {
        self.shared.unacked()
    }

    /// How many checkpoints are ended but not acknowledged.
    pub fn lag(&self) -> u64 {
        self.shared.lag()
    }

    /// The bytes to send, in place: write them, then remove what was
    /// written (`clear()` or `drain(..n)`); the capacity is kept.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// All bytes to send, if any (the buffer is taken).
    pub fn poll_output(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.out))
        }
    }

    /// When the next heartbeat is due (absolute); `Some(ZERO)` until the
    /// sender has seen the time, `None` after Shutdown.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.shut_down {
            return None;
        }
        match self.now {
            None => Some(Duration::ZERO),
            Some(_) => Some(self.last_tx.saturating_add(self.heartbeat_interval)),
        }
    }

    /// Records the time and sends a Heartbeat if nothing was written for
    /// the heartbeat interval. Cheap: call it on every loop iteration (the
    /// sender only knows the time from here; output written since the last
    /// call counts as written at the last time seen, which can only make a
    /// heartbeat early, never late).
    pub fn handle_timeout(&mut self, now: Duration) {
        let now = match self.now {
            None => {
                self.last_tx = now;
                now
            }
            Some(n) => n.max(now),
        };
        self.now = Some(now);
        if self.shut_down {
            return;
        }
        if now.saturating_sub(self.last_tx) >= self.heartbeat_interval {
            let sent_at_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
            if encode_fixed(&mut self.out, Kind::Heartbeat, &sent_at_ns.to_le_bytes()).is_ok() {
                self.last_tx = now;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxPhase {
    AwaitWelcome,
    Ready,
    Closed,
}

/// The receiving half of the primary: decodes Welcome, Refuse, Ack, Nack
/// and heartbeats, and watches the backup's liveness.
pub struct PrimaryReceiver {
    shared: Arc<Shared>,
    decoder: Decoder,
    phase: RxPhase,
    events: VecDeque<PrimaryEvent>,
    heartbeat_timeout: Duration,
    now: Option<Duration>,
    last_rx: Duration,
}

impl PrimaryReceiver {
    fn new(cfg: &PrimaryConfig, shared: Arc<Shared>) -> Self {
        PrimaryReceiver {
            shared,
            decoder: Decoder::new(),
            phase: RxPhase::AwaitWelcome,
            events: VecDeque::new(),
            heartbeat_timeout: cfg.heartbeat_timeout,
            now: None,
            last_rx: Duration::ZERO,
        }
    }

    fn observe(&mut self, now: Duration) -> Duration {
        let now = match self.now {
            None => {
                self.last_rx = now;
                now
            }
            Some(n) => n.max(now),
        };
        self.now = Some(now);
        now
    }

    /// True once refused, lost or failed.
    pub fn is_closed(&self) -> bool {
        self.phase == RxPhase::Closed
    }

    /// True once Welcome arrived.
    pub fn is_welcomed(&self) -> bool {
        self.phase == RxPhase::Ready
    }

    /// Bytes from the backup (any amount, split anywhere).
    pub fn handle_input(&mut self, now: Duration, bytes: &[u8]) {
        let now = self.observe(now);
        if self.phase == RxPhase::Closed {
            return;
        }
        if !bytes.is_empty() {
            self.last_rx = now;
        }
        self.decoder.feed(bytes);
        while self.phase != RxPhase::Closed {
            match self.decoder.next() {
                Ok(Some(Frame::Message { msg, .. })) => self.on_message(msg),
                Ok(Some(Frame::Corrupt { kind, len })) => match kind {
                    // Acks are cumulative: the next one covers a lost one.
                    Kind::Heartbeat | Kind::Ack => {
                        tracing::warn!("corrupt {kind:?} from the backup ({len} bytes), ignored")
                    }
                    _ => self.fail(format!("corrupt {kind:?} message ({len} bytes)")),
                },
                Ok(None) => break,
                Err(e) => self.fail(e.to_string()),
            }
        }
    }

    fn on_message(&mut self, msg: Message) {
        match (self.phase, msg) {
            (_, Message::Refuse { reason }) => {
                tracing::warn!("the backup refused: {reason}");
                self.events.push_back(PrimaryEvent::Refused { reason });
                self.phase = RxPhase::Closed;
            }
            // The backup's beacon may report before its Welcome is out.
            (RxPhase::AwaitWelcome | RxPhase::Ready, Message::Received { bytes }) => {
                self.events.push_back(PrimaryEvent::Received { bytes });
            }
            (RxPhase::AwaitWelcome, Message::Welcome { version }) => {
                if version == PROTOCOL_VERSION {
                    self.phase = RxPhase::Ready;
                    self.events.push_back(PrimaryEvent::Welcomed);
                } else {
                    self.fail(format!(
                        "Welcome with version {version}, this primary speaks {PROTOCOL_VERSION}"
                    ));
                }
            }
            (RxPhase::AwaitWelcome, m) => self.fail(format!("expected Welcome, got {:?}", m.kind())),
            (RxPhase::Ready, Message::Heartbeat { .. }) => {}
            (RxPhase::Ready, Message::Ack { seq }) => {
                let acked = self.shared.acked.load(Ordering::Acquire);
                let ended = self.shared.ended.load(Ordering::Acquire);
                if seq <= acked || seq > ended {
                    return self.fail(format!("Ack {seq}: acknowledged up to {acked}, ended up to {ended}"));
                }
                self.shared.acked.store(seq, Ordering::Release);
                self.events.push_back(PrimaryEvent::Acked { seq });
            }
            (RxPhase::Ready, Message::Nack { seq, reason }) => {
                let acked = self.shared.acked.load(Ordering::Acquire);
                let begun = self.shared.begun.load(Ordering::Acquire);
                if seq <= acked || seq > begun {
                    return self.fail(format!("Nack {seq}: acknowledged up to {acked}, begun up to {begun}"));
                }
                tracing::warn!("the backup refused checkpoint {seq}: {reason}");
                self.shared.resend_from.store(seq, Ordering::Release);
                self.events.push_back(PrimaryEvent::Nacked { seq, reason });
            }
            (RxPhase::Ready, m) => self.fail(format!("{:?} is not a message from the backup", m.kind())),
            (RxPhase::Closed, _) => {}
        }
    }

    fn fail(&mut self, why: String) {
        self.lost(format!("protocol error: {why}"));
    }

    fn lost(&mut self, why: String) {
        tracing::warn!("backup lost: {why}");
        self.events.push_back(PrimaryEvent::BackupLost { why });
        self.phase = RxPhase::Closed;
    }

    /// The connection reached end of file (or failed).
    pub fn handle_eof(&mut self) {
        if self.phase != RxPhase::Closed {
            self.lost("connection closed by the backup".into());
        }
    }

    /// When [`Self::handle_timeout`] must run (absolute); `Some(ZERO)`
    /// until the receiver has seen the time, `None` once closed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match (self.phase, self.now) {
            (RxPhase::Closed, _) => None,
            (_, None) => Some(Duration::ZERO),
            (_, Some(_)) => Some(self.last_rx.saturating_add(self.heartbeat_timeout)),
        }
    }

    /// Liveness check.
    pub fn handle_timeout(&mut self, now: Duration) {
        let now = self.observe(now);
        if self.phase == RxPhase::Closed {
            return;
        }
        let silent = now.saturating_sub(self.last_rx);
        if silent >= self.heartbeat_timeout {
            self.lost(format!(
                "no bytes from the backup for {silent:?} (heartbeat timeout {:?})",
                self.heartbeat_timeout
            ));
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PrimaryEvent> {
        self.events.pop_front()
    }

    /// Checkpoints ended but not acknowledged yet, oldest first.
    pub fn unacked(&self) -> impl Iterator<Item = u64> {
        self.shared.unacked()
    }

    /// How many checkpoints are ended but not acknowledged.
    pub fn lag(&self) -> u64 {
        self.shared.lag()
    }

    /// Highest seq acknowledged.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Acquire)
    }
}

/// The primary's protocol state machine for a single-threaded driver: a
/// [`PrimarySender`] and a [`PrimaryReceiver`] behind one API. A driver
/// with a sender thread and a reader thread calls [`Self::split`] and gives
/// each thread its half.
pub struct PrimarySession {
    sender: PrimarySender,
    receiver: PrimaryReceiver,
}

impl PrimarySession {
    /// Writes the Hello into the output at once. Fails only if the identity
    /// has more than 2^32 devices.
    pub fn new(cfg: PrimaryConfig) -> Result<Self, ProtoError> {
        let shared = Arc::new(Shared::default());
        Ok(PrimarySession {
            sender: PrimarySender::new(&cfg, shared.clone())?,
            receiver: PrimaryReceiver::new(&cfg, shared),
        })
    }

    /// The two halves, for a sender thread and a reader thread.
    pub fn split(self) -> (PrimarySender, PrimaryReceiver) {
        (self.sender, self.receiver)
    }

    pub fn sender(&mut self) -> &mut PrimarySender {
        &mut self.sender
    }

    pub fn receiver(&mut self) -> &mut PrimaryReceiver {
        &mut self.receiver
    }

    /// See [`PrimaryReceiver::handle_input`].
    pub fn handle_input(&mut self, now: Duration, bytes: &[u8]) {
        self.receiver.handle_input(now, bytes);
    }

    /// See [`PrimaryReceiver::handle_eof`].
    pub fn handle_eof(&mut self) {
        self.receiver.handle_eof();
    }

    pub fn poll_event(&mut self) -> Option<PrimaryEvent> {
        self.receiver.poll_event()
    }

    /// The earlier of the heartbeat and the liveness deadline.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match (self.sender.poll_timeout(), self.receiver.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Heartbeat (sender) and liveness (receiver).
    pub fn handle_timeout(&mut self, now: Duration) {
        self.sender.handle_timeout(now);
        self.receiver.handle_timeout(now);
    }

    pub fn is_closed(&self) -> bool {
        self.receiver.is_closed()
    }

    pub fn output(&mut self) -> &mut Vec<u8> {
        self.sender.output()
    }

    pub fn poll_output(&mut self) -> Option<Vec<u8>> {
        self.sender.poll_output()
    }

    pub fn set_pages_per_message(&mut self, n: usize) {
        self.sender.set_pages_per_message(n);
    }

    pub fn precopy_pages<I, P>(&mut self, pages: I) -> Result<u64, ProtoError>
    where
        I: IntoIterator<Item = (u64, P)>,
        P: AsRef<[u8]>,
    {
        self.sender.precopy_pages(pages)
    }

    pub fn precopy_disk(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), ProtoError> {
        self.sender.precopy_disk(disk, offset, data)
    }

    pub fn precopy_done(&mut self, rounds: u32) -> Result<(), ProtoError> {
        self.sender.precopy_done(rounds)
    }

    pub fn begin_checkpoint(&mut self, seq: u64, epoch: u64, counts: CkptCounts) -> Result<(), ProtoError> {
        self.sender.begin_checkpoint(seq, epoch, counts)
    }

    pub fn pages<I, P>(&mut self, pages: I) -> Result<u64, ProtoError>
    where
        I: IntoIterator<Item = (u64, P)>,
        P: AsRef<[u8]>,
    {
        self.sender.pages(pages)
    }

    pub fn state(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        self.sender.state(bytes)
    }

    pub fn engine(&mut self, net: u32, bytes: &[u8]) -> Result<(), ProtoError> {
        self.sender.engine(net, bytes)
    }

    pub fn disk_write(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), ProtoError> {
        self.sender.disk_write(disk, offset, data)
    }

    pub fn end_checkpoint(&mut self) -> Result<u64, ProtoError> {
        self.sender.end_checkpoint()
    }

    pub fn shutdown(&mut self, reason: &str) -> Result<(), ProtoError> {
        self.sender.shutdown(reason)
    }

    pub fn unacked(&self) -> impl Iterator<Item = u64> {
        self.receiver.unacked()
    }

    pub fn lag(&self) -> u64 {
        self.receiver.lag()
    }
}
