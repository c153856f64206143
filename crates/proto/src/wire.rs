//! The wire format: frames, message kinds, payload layouts, encoders.
//!
//! See the crate README for the exact byte layouts.

use crc32fast::Hasher;

use crate::error::ProtoError;
use crate::identity::{DeviceIdentity, OutputMode, VmIdentity};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"RMRP";
/// The protocol version this crate speaks (in Hello and Welcome).
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;
/// Bytes after the payload (its crc32).
pub const TRAILER_LEN: usize = 4;
/// Largest payload accepted or produced; a header announcing more is fatal.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Bytes of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of one page record in a pages payload: gpa u64 + the page.
pub const PAGE_RECORD_LEN: usize = 8 + PAGE_SIZE;
/// The most page records one pages message can hold.
pub const MAX_PAGES_PER_MESSAGE: usize = MAX_PAYLOAD as usize / PAGE_RECORD_LEN;
/// Page records per message the primary session writes by default (about
/// 1 MiB per message).
pub const DEFAULT_PAGES_PER_MESSAGE: usize = 256;
/// Bytes of the fixed fields trailing a disk payload (disk u32, offset u64).
pub const DISK_TRAILER_LEN: usize = 12;
/// Bytes of the fixed field trailing an engine payload (net u32).
pub const ENGINE_TRAILER_LEN: usize = 4;

/// A message kind: the `kind` byte of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Refuse = 3,
    PrecopyPages = 4,
    PrecopyDisk = 5,
    PrecopyDone = 6,
    CkptBegin = 10,
    CkptPages = 11,
    CkptState = 12,
    CkptEngine = 13,
    CkptDisk = 14,
    CkptEnd = 15,
    Ack = 20,
    Nack = 21,
    Heartbeat = 30,
    Shutdown = 31,
    Received = 32,
    Generation = 33,
}

impl Kind {
    /// The kind for a header byte, if known.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Refuse,
            4 => Kind::PrecopyPages,
            5 => Kind::PrecopyDisk,
            6 => Kind::PrecopyDone,
            10 => Kind::CkptBegin,
            11 => Kind::CkptPages,
            12 => Kind::CkptState,
            13 => Kind::CkptEngine,
            14 => Kind::CkptDisk,
            15 => Kind::CkptEnd,
            20 => Kind::Ack,
            21 => Kind::Nack,
            30 => Kind::Heartbeat,
            31 => Kind::Shutdown,
            32 => Kind::Received,
            33 => Kind::Generation,
            _ => return None,
        })
    }

    /// True for the messages that belong to a checkpoint (Begin .. End).
    pub fn is_checkpoint(self) -> bool {
        matches!(
            self,
            Kind::CkptBegin | Kind::CkptPages | Kind::CkptState | Kind::CkptEngine | Kind::CkptDisk | Kind::CkptEnd
        )
    }
}

/// crc32 and length of one payload. Two of them combine into the crc of the
/// concatenation, which is how checkpoint digests are computed without
/// hashing payloads twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadSum {
    pub crc: u32,
    pub len: u32,
}

impl PayloadSum {
    /// A hasher standing for this payload, for [`Hasher::combine`].
    pub(crate) fn hasher(self) -> Hasher {
        Hasher::new_with_initial_len(self.crc, u64::from(self.len))
    }
}

/// Parses a complete 16-byte header: returns the kind and payload length,
/// or the fatal error.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, u32), ProtoError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let stored = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let computed = crc32fast::hash(&h[..12]);
    if stored != computed {
        return Err(ProtoError::HeaderCrc { stored, computed });
    }
    let flags = h[5];
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 || reserved != 0 {
        return Err(ProtoError::UnsupportedHeader { flags, reserved });
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > MAX_PAYLOAD {
        return Err(ProtoError::Oversize { len: u64::from(len) });
    }
    let kind = Kind::from_u8(h[4]).ok_or(ProtoError::UnknownKind(h[4]))?;
    Ok((kind, len))
}

/// Builds the 16-byte header of a frame.
pub fn build_header(kind: Kind, payload_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes one frame straight into an output buffer: a header placeholder,
/// then the payload as it is put (hashed on the way), then the header is
/// patched and the trailer appended by [`FrameWriter::finish`].
pub(crate) struct FrameWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    kind: Kind,
    hasher: Hasher,
}

impl<'a> FrameWriter<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>, kind: Kind, payload_hint: usize) -> Self {
        out.reserve(HEADER_LEN + payload_hint + TRAILER_LEN);
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        FrameWriter {
            out,
            start,
            kind,
            hasher: Hasher::new(),
        }
    }

    #[inline]
    pub(crate) fn put(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.out.extend_from_slice(b);
    }

    pub(crate) fn put_u8(&mut self, v: u8) {
        self.put(&[v]);
    }

    pub(crate) fn put_u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }

    pub(crate) fn put_u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }

    fn payload_len(&self) -> usize {
        self.out.len() - self.start - HEADER_LEN
    }

    /// Removes the partial frame from the output.
    pub(crate) fn abort(self) {
        self.out.truncate(self.start);
    }

    /// Completes the frame; if the payload is too large, removes it and
    /// fails.
    pub(crate) fn finish(self) -> Result<PayloadSum, ProtoError> {
        let len = self.payload_len();
        let len32 = match u32::try_from(len) {
            Ok(l) if l <= MAX_PAYLOAD => l,
            _ => {
                self.out.truncate(self.start);
                return Err(ProtoError::Oversize { len: len as u64 });
            }
        };
        let header = build_header(self.kind, len32);
        self.out[self.start..self.start + HEADER_LEN].copy_from_slice(&header);
        let crc = self.hasher.finalize();
        self.out.extend_from_slice(&crc.to_le_bytes());
        Ok(PayloadSum { crc, len: len32 })
    }
}

/// Which pages message to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagesKind {
    /// `PrecopyPages`: before the first checkpoint.
    Precopy,
    /// `CkptPages`: inside a checkpoint.
    Checkpoint,
}

impl PagesKind {
    pub fn kind(self) -> Kind {
        match self {
            PagesKind::Precopy => Kind::PrecopyPages,
            PagesKind::Checkpoint => Kind::CkptPages,
        }
    }
}

/// Writes at most one pages message (at most `max_pages` records, clamped
/// to 1..=[`MAX_PAGES_PER_MESSAGE`]) from `pages` into `out`: one copy of
/// each page, one reservation (from the iterator's size hint), crc computed
/// as the pages are copied.
///
/// Returns `Ok(None)` and writes nothing when the iterator is empty,
/// otherwise the number of pages written and the payload's sum. A page that
/// is not [`PAGE_SIZE`] bytes fails with [`ProtoError::Misuse`] and leaves
/// `out` as it was (the records of this message already taken from the
/// iterator are lost).
pub fn encode_pages<I, P>(
    out: &mut Vec<u8>,
    kind: PagesKind,
    pages: &mut I,
    max_pages: usize,
) -> Result<Option<(usize, PayloadSum)>, ProtoError>
where
    I: Iterator<Item = (u64, P)>,
    P: AsRef<[u8]>,
{
    let max_pages = max_pages.clamp(1, MAX_PAGES_PER_MESSAGE);
    let Some((gpa, page)) = pages.next() else {
        return Ok(None);
    };
    let hint = pages.size_hint().0.saturating_add(1).min(max_pages);
    let mut w = FrameWriter::new(out, kind.kind(), hint * PAGE_RECORD_LEN);
    let mut n = 0usize;
    let mut item = Some((gpa, page));
    while let Some((gpa, page)) = item.take() {
        let page = page.as_ref();
        if page.len() != PAGE_SIZE {
            w.abort();
            return Err(ProtoError::Misuse(format!(
                "page at gpa {gpa:#x} is {} bytes, not {PAGE_SIZE}",
                page.len()
            )));
        }
        w.put(&gpa.to_le_bytes());
        w.put(page);
        n += 1;
        if n < max_pages {
            item = pages.next();
        }
    }
    let sum = w.finish()?;
    Ok(Some((n, sum)))
}

/// A pages payload as received: `n` records of gpa u64 + [`PAGE_SIZE`]
/// bytes, held in the very buffer the decoder filled (no copy). Iterate it
/// with [`PagesPayload::iter`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PagesPayload {
    buf: Vec<u8>,
}

impl std::fmt::Debug for PagesPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesPayload").field("pages", &self.len()).finish()
    }
}

impl PagesPayload {
    /// Wraps a received payload; its length must be a multiple of
    /// [`PAGE_RECORD_LEN`].
    pub fn from_payload(buf: Vec<u8>) -> Result<Self, ProtoError> {
        if !buf.len().is_multiple_of(PAGE_RECORD_LEN) {
            return Err(ProtoError::Misuse(format!(
                "pages payload of {} bytes is not a multiple of {PAGE_RECORD_LEN}",
                buf.len()
            )));
        }
        Ok(PagesPayload { buf })
    }

    /// Builds a payload from pages (tests, small senders); pages that are
    /// not [`PAGE_SIZE`] bytes fail.
    pub fn from_pages<I, P>(pages: I) -> Result<Self, ProtoError>
    where
        I: IntoIterator<Item = (u64, P)>,
        P: AsRef<[u8]>,
    {
        let mut buf = Vec::new();
        for (gpa, page) in pages {
            let page = page.as_ref();
            if page.len() != PAGE_SIZE {
                return Err(ProtoError::Misuse(format!(
                    "page at gpa {gpa:#x} is {} bytes, not {PAGE_SIZE}",
                    page.len()
                )));
            }
            buf.extend_from_slice(&gpa.to_le_bytes());
            buf.extend_from_slice(page);
        }
        Ok(PagesPayload { buf })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.buf.len() / PAGE_RECORD_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The pages, in order: (gpa, page).
    pub fn iter(&self) -> PagesIter<'_> {
        PagesIter {
            records: self.buf.chunks_exact(PAGE_RECORD_LEN),
        }
    }

    /// The wire bytes (the records).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The buffer back, e.g. to reuse it.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

impl<'a> IntoIterator for &'a PagesPayload {
    type Item = (u64, &'a [u8; PAGE_SIZE]);
    type IntoIter = PagesIter<'a>;
    fn into_iter(self) -> PagesIter<'a> {
        self.iter()
    }
}

/// Iterator over the (gpa, page) records of a [`PagesPayload`].
#[derive(Clone)]
pub struct PagesIter<'a> {
    records: std::slice::ChunksExact<'a, u8>,
}

fn split_record(rec: &[u8]) -> Option<(u64, &[u8; PAGE_SIZE])> {
    let (gpa, rest) = rec.split_first_chunk::<8>()?;
    let page = rest.first_chunk::<PAGE_SIZE>()?;
    Some((u64::from_le_bytes(*gpa), page))
}

impl<'a> Iterator for PagesIter<'a> {
    type Item = (u64, &'a [u8; PAGE_SIZE]);

    fn next(&mut self) -> Option<Self::Item> {
        // Every chunk is exactly PAGE_RECORD_LEN bytes, so split_record
        // never fails.
        self.records.next().and_then(split_record)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

impl ExactSizeIterator for PagesIter<'_> {}

/// One guest disk write (or, in precopy, one disk extent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    /// Index among the VM's disks (the Disk entries of the identity, in
    /// order).
    pub disk: u32,
    /// Byte offset on the disk.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The counts a checkpoint declares in its Begin, checked by the backup at
/// its End.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CkptCounts {
    /// Page records over all CkptPages messages.
    pub pages: u64,
    /// Bytes over all CkptState messages.
    pub state_len: u64,
    /// CkptEngine messages.
    pub engines: u32,
    /// CkptDisk messages.
    pub disk_writes: u64,
}

/// Every protocol message. `Message::encode` writes its frame;
/// [`crate::Decoder`] produces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// primary -> backup, first message.
    Hello {
        version: u32,
        vm: VmIdentity,
        output: OutputMode,
        epoch_ms: u32,
    },
    /// backup -> primary: accepted.
    Welcome {
        version: u32,
    },
    /// either way: refused; the sender closes after it.
    Refuse {
        reason: String,
    },
    /// primary -> backup, before the first checkpoint only.
    PrecopyPages {
        pages: PagesPayload,
    },
    /// primary -> backup, before the first checkpoint only.
    PrecopyDisk {
        disk: u32,
        offset: u64,
        data: Vec<u8>,
    },
    /// primary -> backup: optional end-of-precopy marker.
    PrecopyDone {
        rounds: u32,
    },
    /// starts checkpoint `seq`.
    CkptBegin {
        seq: u64,
        epoch: u64,
        pages: u64,
        state_len: u64,
        engines: u32,
        disk_writes: u64,
    },
    CkptPages {
        pages: PagesPayload,
    },
    CkptState {
        bytes: Vec<u8>,
    },
    CkptEngine {
        net: u32,
        bytes: Vec<u8>,
    },
    CkptDisk {
        disk: u32,
        offset: u64,
        data: Vec<u8>,
    },
    /// digest = crc32 of the concatenated payloads from Begin through the
    /// last message before End.
    CkptEnd {
        seq: u64,
        digest: u32,
    },
    /// backup -> primary: checkpoint `seq` (and every one before) applied.
    Ack {
        seq: u64,
    },
    /// backup -> primary: checkpoint `seq` refused; resend from `seq` on.
    Nack {
        seq: u64,
        reason: String,
    },
    Heartbeat {
        sent_at_ns: u64,
    },
    /// primary -> backup: the guest ended on purpose; do not take over.
    Shutdown {
        reason: String,
    },
    /// backup -> primary: bytes received on this connection so far (the
    /// backup's liveness clock restarted when they arrived: the primary's
    /// output lease).
    Received {
        bytes: u64,
    },
    /// primary -> backup: the fence generation the primary holds (a
    /// takeover must move it from this value to the next).
    Generation {
        value: u64,
    },
}

impl Message {
    /// The header kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Welcome { .. } => Kind::Welcome,
            Message::Refuse { .. } => Kind::Refuse,
            Message::PrecopyPages { .. } => Kind::PrecopyPages,
            Message::PrecopyDisk { .. } => Kind::PrecopyDisk,
            Message::PrecopyDone { .. } => Kind::PrecopyDone,
            Message::CkptBegin { .. } => Kind::CkptBegin,
            Message::CkptPages { .. } => Kind::CkptPages,
            Message::CkptState { .. } => Kind::CkptState,
            Message::CkptEngine { .. } => Kind::CkptEngine,
            Message::CkptDisk { .. } => Kind::CkptDisk,
            Message::CkptEnd { .. } => Kind::CkptEnd,
            Message::Ack { .. } => Kind::Ack,
            Message::Nack { .. } => Kind::Nack,
            Message::Heartbeat { .. } => Kind::Heartbeat,
            Message::Shutdown { .. } => Kind::Shutdown,
            Message::Received { .. } => Kind::Received,
            Message::Generation { .. } => Kind::Generation,
        }
    }

    /// Appends this message's frame to `out`; returns its payload's sum.
    /// Fails (writing nothing) if the payload would exceed [`MAX_PAYLOAD`].
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<PayloadSum, ProtoError> {
        match self {
            Message::Hello {
                version,
                vm,
                output,
                epoch_ms,
            } => encode_hello(out, *version, vm, *output, *epoch_ms),
            Message::Welcome { version } => encode_fixed(out, Kind::Welcome, &version.to_le_bytes()),
            Message::Refuse { reason } => encode_fixed(out, Kind::Refuse, reason.as_bytes()),
            Message::PrecopyPages { pages } => encode_fixed(out, Kind::PrecopyPages, pages.as_bytes()),
            Message::PrecopyDisk { disk, offset, data } => encode_disk(out, Kind::PrecopyDisk, *disk, *offset, data),
            Message::PrecopyDone { rounds } => encode_fixed(out, Kind::PrecopyDone, &rounds.to_le_bytes()),
            Message::CkptBegin {
                seq,
                epoch,
                pages,
                state_len,
                engines,
                disk_writes,
            } => encode_begin(
                out,
                *seq,
                *epoch,
                CkptCounts {
                    pages: *pages,
                    state_len: *state_len,
                    engines: *engines,
                    disk_writes: *disk_writes,
                },
            ),
            Message::CkptPages { pages } => encode_fixed(out, Kind::CkptPages, pages.as_bytes()),
            Message::CkptState { bytes } => encode_fixed(out, Kind::CkptState, bytes),
            Message::CkptEngine { net, bytes } => encode_engine(out, *net, bytes),
            Message::CkptDisk { disk, offset, data } => encode_disk(out, Kind::CkptDisk, *disk, *offset, data),
            Message::CkptEnd { seq, digest } => encode_end(out, *seq, *digest),
            Message::Ack { seq } => encode_fixed(out, Kind::Ack, &seq.to_le_bytes()),
            Message::Nack { seq, reason } => {
                let mut w = FrameWriter::new(out, Kind::Nack, 8 + reason.len());
                w.put_u64(*seq);
                w.put(reason.as_bytes());
                w.finish()
            }
            Message::Heartbeat { sent_at_ns } => encode_fixed(out, Kind::Heartbeat, &sent_at_ns.to_le_bytes()),
            Message::Shutdown { reason } => encode_fixed(out, Kind::Shutdown, reason.as_bytes()),
            Message::Received { bytes } => encode_fixed(out, Kind::Received, &bytes.to_le_bytes()),
            Message::Generation { value } => encode_fixed(out, Kind::Generation, &value.to_le_bytes()),
        }
    }

    /// Parses the payload of an intact frame of `kind`. Takes the payload
    /// buffer so that pages, state and disk data are handed out without a
    /// copy.
    pub fn decode(kind: Kind, payload: Vec<u8>) -> Result<Message, ProtoError> {
        let malformed = |why: String| ProtoError::Malformed { kind, why };
        Ok(match kind {
            Kind::Hello => decode_hello(&payload)?,
            Kind::Welcome => {
                let mut r = Reader::new(kind, &payload);
                let version = r.u32()?;
                r.end()?;
                Message::Welcome { version }
            }
            Kind::Refuse => Message::Refuse {
                reason: utf8(kind, payload)?,
            },
            Kind::PrecopyPages => Message::PrecopyPages {
                pages: pages_payload(kind, payload)?,
            },
            Kind::PrecopyDisk => {
                let (disk, offset, data) = split_disk(kind, payload)?;
                Message::PrecopyDisk { disk, offset, data }
            }
            Kind::PrecopyDone => {
                let mut r = Reader::new(kind, &payload);
                let rounds = r.u32()?;
                r.end()?;
                Message::PrecopyDone { rounds }
            }
            Kind::CkptBegin => {
                let mut r = Reader::new(kind, &payload);
                let m = Message::CkptBegin {
                    seq: r.u64()?,
                    epoch: r.u64()?,
                    pages: r.u64()?,
                    state_len: r.u64()?,
                    engines: r.u32()?,
                    disk_writes: r.u64()?,
                };
                r.end()?;
                m
            }
            Kind::CkptPages => Message::CkptPages {
                pages: pages_payload(kind, payload)?,
            },
            Kind::CkptState => Message::CkptState { bytes: payload },
            Kind::CkptEngine => {
                let mut bytes = payload;
                let Some(at) = bytes.len().checked_sub(ENGINE_TRAILER_LEN) else {
                    return Err(malformed(format!("{} bytes, shorter than its trailer", bytes.len())));
                };
                let mut r = Reader::new(kind, &bytes[at..]);
                let net = r.u32()?;
                bytes.truncate(at);
                Message::CkptEngine { net, bytes }
            }
            Kind::CkptDisk => {
                let (disk, offset, data) = split_disk(kind, payload)?;
                Message::CkptDisk { disk, offset, data }
            }
            Kind::CkptEnd => {
                let mut r = Reader::new(kind, &payload);
                let m = Message::CkptEnd {
                    seq: r.u64()?,
                    digest: r.u32()?,
                };
                r.end()?;
                m
            }
            Kind::Ack => {
                let mut r = Reader::new(kind, &payload);
                let seq = r.u64()?;
                r.end()?;
                Message::Ack { seq }
            }
            Kind::Nack => {
                let mut r = Reader::new(kind, &payload);
                let seq = r.u64()?;
                let reason = std::str::from_utf8(r.rest())
                    .map_err(|e| malformed(format!("reason is not UTF-8: {e}")))?
                    .to_owned();
                Message::Nack { seq, reason }
            }
            Kind::Heartbeat => {
                let mut r = Reader::new(kind, &payload);
                let sent_at_ns = r.u64()?;
                r.end()?;
                Message::Heartbeat { sent_at_ns }
            }
            Kind::Shutdown => Message::Shutdown {
                reason: utf8(kind, payload)?,
            },
            Kind::Received => {
                let mut r = Reader::new(kind, &payload);
                let bytes = r.u64()?;
                r.end()?;
                Message::Received { bytes }
            }
            Kind::Generation => {
                let mut r = Reader::new(kind, &payload);
                let value = r.u64()?;
                r.end()?;
                Message::Generation { value }
            }
        })
    }
}

pub(crate) fn encode_fixed(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) -> Result<PayloadSum, ProtoError> {
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(ProtoError::Oversize {
            len: payload.len() as u64,
        });
    }
    let mut w = FrameWriter::new(out, kind, payload.len());
    w.put(payload);
    w.finish()
}

pub(crate) fn encode_hello(
    out: &mut Vec<u8>,
    version: u32,
    vm: &VmIdentity,
    output: OutputMode,
    epoch_ms: u32,
) -> Result<PayloadSum, ProtoError> {
    let devices = u32::try_from(vm.devices.len())
        .map_err(|_| ProtoError::Misuse(format!("{} devices do not fit a Hello", vm.devices.len())))?;
    let mut w = FrameWriter::new(out, Kind::Hello, 25 + 33 * vm.devices.len());
    w.put_u32(version);
    w.put_u64(vm.mem_mib);
    w.put_u32(vm.vcpus);
    w.put_u8(output.to_wire());
    w.put_u32(epoch_ms);
    w.put_u32(devices);
    for d in &vm.devices {
        match d {
            DeviceIdentity::Net { mac } => {
                w.put_u8(DeviceIdentity::NET_TAG);
                w.put(mac);
            }
            DeviceIdentity::Disk {
                size_bytes,
                read_only,
                id,
            } => {
                w.put_u8(DeviceIdentity::DISK_TAG);
                w.put_u64(*size_bytes);
                w.put_u8(u8::from(*read_only));
                w.put(id);
            }
        }
    }
    w.finish()
}

fn decode_hello(payload: &[u8]) -> Result<Message, ProtoError> {
    let kind = Kind::Hello;
    let mut r = Reader::new(kind, payload);
    let version = r.u32()?;
    if version != PROTOCOL_VERSION {
        // The rest of the layout belongs to that version: do not parse it.
        return Err(ProtoError::UnsupportedVersion(version));
    }
    let mem_mib = r.u64()?;
    let vcpus = r.u32()?;
    let output_byte = r.u8()?;
    let output = OutputMode::from_wire(output_byte).ok_or_else(|| ProtoError::Malformed {
        kind,
        why: format!("unknown output mode {output_byte}"),
    })?;
    let epoch_ms = r.u32()?;
    let count = r.u32()? as usize;
    // Each device takes at least 7 bytes: never trust the count for the
    // allocation.
    let mut devices = Vec::with_capacity(count.min(r.remaining() / 7));
    for i in 0..count {
        let tag = r.u8()?;
        let d = match tag {
            DeviceIdentity::NET_TAG => DeviceIdentity::Net { mac: r.array()? },
            DeviceIdentity::DISK_TAG => {
                let size_bytes = r.u64()?;
                let read_only = match r.u8()? {
                    0 => false,
                    1 => true,
                    b => {
                        return Err(ProtoError::Malformed {
                            kind,
                            why: format!("device {i}: read_only byte {b}"),
                        });
                    }
                };
                DeviceIdentity::Disk {
                    size_bytes,
                    read_only,
                    id: r.array()?,
                }
            }
            t => {
                return Err(ProtoError::Malformed {
                    kind,
                    why: format!("device {i}: unknown tag {t}"),
                })
            }
        };
        devices.push(d);
    }
    r.end()?;
    Ok(Message::Hello {
        version,
        vm: VmIdentity {
            mem_mib,
            vcpus,
            devices,
        },
        output,
        epoch_ms,
    })
}

pub(crate) fn encode_begin(out: &mut Vec<u8>, seq: u64, epoch: u64, c: CkptCounts) -> Result<PayloadSum, ProtoError> {
    let mut w = FrameWriter::new(out, Kind::CkptBegin, 44);
    w.put_u64(seq);
    w.put_u64(epoch);
    w.put_u64(c.pages);
    w.put_u64(c.state_len);
    w.put_u32(c.engines);
    w.put_u64(c.disk_writes);
    w.finish()
}

pub(crate) fn encode_end(out: &mut Vec<u8>, seq: u64, digest: u32) -> Result<PayloadSum, ProtoError> {
    let mut w = FrameWriter::new(out, Kind::CkptEnd, 12);
    w.put_u64(seq);
    w.put_u32(digest);
    w.finish()
}

pub(crate) fn encode_engine(out: &mut Vec<u8>, net: u32, bytes: &[u8]) -> Result<PayloadSum, ProtoError> {
    if bytes.len() + ENGINE_TRAILER_LEN > MAX_PAYLOAD as usize {
        return Err(ProtoError::Oversize {
            len: (bytes.len() + ENGINE_TRAILER_LEN) as u64,
        });
    }
    let mut w = FrameWriter::new(out, Kind::CkptEngine, bytes.len() + ENGINE_TRAILER_LEN);
    w.put(bytes);
    w.put_u32(net);
    w.finish()
}

pub(crate) fn encode_disk(
    out: &mut Vec<u8>,
    kind: Kind,
    disk: u32,
    offset: u64,
    data: &[u8],
) -> Result<PayloadSum, ProtoError> {
    if data.len() + DISK_TRAILER_LEN > MAX_PAYLOAD as usize {
        return Err(ProtoError::Oversize {
            len: (data.len() + DISK_TRAILER_LEN) as u64,
        });
    }
    let mut w = FrameWriter::new(out, kind, data.len() + DISK_TRAILER_LEN);
    w.put(data);
    w.put_u32(disk);
    w.put_u64(offset);
    w.finish()
}

fn split_disk(kind: Kind, mut payload: Vec<u8>) -> Result<(u32, u64, Vec<u8>), ProtoError> {
    let Some(at) = payload.len().checked_sub(DISK_TRAILER_LEN) else {
        return Err(ProtoError::Malformed {
            kind,
            why: format!("{} bytes, shorter than its trailer", payload.len()),
        });
    };
    let mut r = Reader::new(kind, &payload[at..]);
    let disk = r.u32()?;
    let offset = r.u64()?;
    payload.truncate(at);
    Ok((disk, offset, payload))
}

fn pages_payload(kind: Kind, payload: Vec<u8>) -> Result<PagesPayload, ProtoError> {
    let len = payload.len();
    PagesPayload::from_payload(payload).map_err(|_| ProtoError::Malformed {
        kind,
        why: format!("{len} bytes is not a whole number of {PAGE_RECORD_LEN}-byte page records"),
    })
}

fn utf8(kind: Kind, payload: Vec<u8>) -> Result<String, ProtoError> {
    String::from_utf8(payload).map_err(|e| ProtoError::Malformed {
        kind,
        why: format!("text is not UTF-8: {e}"),
    })
}

/// Bounds-checked little-endian reader over a payload.
struct Reader<'a> {
    kind: Kind,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(kind: Kind, buf: &'a [u8]) -> Self {
        Reader { kind, buf }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        match self.buf.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.buf = rest;
                Ok(*head)
            }
            None => Err(ProtoError::Malformed {
                kind: self.kind,
                why: format!("truncated: needed {N} more bytes, {} left", self.buf.len()),
            }),
        }
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed {
                kind: self.kind,
                why: format!("{} trailing bytes", self.buf.len()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::{Decoder, Frame};

    fn page(fill: u8) -> [u8; PAGE_SIZE] {
        let mut p = [fill; PAGE_SIZE];
        p[0] = fill.wrapping_add(1);
        p[PAGE_SIZE - 1] = fill.wrapping_add(2);
        p
    }

    fn identity() -> VmIdentity {
        VmIdentity {
            mem_mib: 0x1_0000_0001,
            vcpus: 0x0102_0304,
            devices: vec![
                DeviceIdentity::Net {
                    mac: [1, 2, 3, 4, 5, 6],
                },
                DeviceIdentity::Disk {
                    size_bytes: 0x0a0b_0c0d_0e0f_1011,
                    read_only: true,
                    id: [7; 20],
                },
                DeviceIdentity::Disk {
                    size_bytes: 1,
                    read_only: false,
                    id: *b"abcdefghijklmnopqrst",
                },
                DeviceIdentity::Net { mac: [0xff; 6] },
            ],
        }
    }

    /// Encodes, checks the frame's layout, decodes (whole and byte by byte).
    fn round_trip(m: Message) {
        let mut out = vec![0xee; 3]; // encoding appends
        let sum = m.encode(&mut out).unwrap();
        let frame = &out[3..];
        assert_eq!(&frame[..4], b"RMRP");
        assert_eq!(frame[4], m.kind() as u8);
        assert_eq!(&frame[5..8], &[0, 0, 0]);
        let len = u32::from_le_bytes(frame[8..12].try_into().unwrap());
        assert_eq!(len, sum.len);
        assert_eq!(frame.len(), HEADER_LEN + len as usize + TRAILER_LEN);
        assert_eq!(
            u32::from_le_bytes(frame[12..16].try_into().unwrap()),
            crc32fast::hash(&frame[..12])
        );
        let payload = &frame[HEADER_LEN..HEADER_LEN + len as usize];
        assert_eq!(crc32fast::hash(payload), sum.crc);
        assert_eq!(
            u32::from_le_bytes(frame[frame.len() - 4..].try_into().unwrap()),
            sum.crc
        );

        let mut d = Decoder::new();
        d.feed(frame);
        assert_eq!(d.next().unwrap(), Some(Frame::Message { msg: m.clone(), sum }));
        assert_eq!(d.next().unwrap(), None);

        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in frame {
            d.feed(std::slice::from_ref(b));
            while let Some(f) = d.next().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![Frame::Message { msg: m, sum }]);
    }

    #[test]
    fn hello() {
        for output in [OutputMode::Speculative, OutputMode::Buffered] {
            round_trip(Message::Hello {
                version: PROTOCOL_VERSION,
                vm: identity(),
                output,
                epoch_ms: 25,
            });
        }
        round_trip(Message::Hello {
            version: 1,
            vm: VmIdentity::default(),
            output: OutputMode::Buffered,
            epoch_ms: 0,
        });
    }

    #[test]
    fn hello_layout() {
        let m = Message::Hello {
            version: 1,
            vm: VmIdentity {
                mem_mib: 512,
                vcpus: 2,
                devices: vec![
                    DeviceIdentity::Net {
                        mac: [1, 2, 3, 4, 5, 6],
                    },
                    DeviceIdentity::Disk {
                        size_bytes: 4096,
                        read_only: true,
                        id: [9; 20],
                    },
                ],
            },
            output: OutputMode::Buffered,
            epoch_ms: 25,
        };
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        let p = &out[HEADER_LEN..out.len() - TRAILER_LEN];
        let mut want = Vec::new();
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&512u64.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.push(1);
        want.extend_from_slice(&25u32.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.push(1);
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        want.push(2);
        want.extend_from_slice(&4096u64.to_le_bytes());
        want.push(1);
        want.extend_from_slice(&[9; 20]);
        assert_eq!(p, &want[..]);
    }

    #[test]
    fn hello_other_version_is_refusable() {
        let mut out = Vec::new();
        // A version-2 Hello whose body this version cannot parse.
        encode_fixed(&mut out, Kind::Hello, &[2, 0, 0, 0, 0xff]).unwrap();
        let mut d = Decoder::new();
        d.feed(&out);
        assert_eq!(d.next(), Err(ProtoError::UnsupportedVersion(2)));
    }

    #[test]
    fn hello_malformed() {
        for body in [
            &[1u8, 0, 0, 0][..], // truncated
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0,
            ][..], // output 9
        ] {
            let mut out = Vec::new();
            encode_fixed(&mut out, Kind::Hello, body).unwrap();
            let mut d = Decoder::new();
            d.feed(&out);
            assert!(matches!(d.next(), Err(ProtoError::Malformed { kind: Kind::Hello, .. })));
        }
        // A device count far beyond the payload must not allocate or panic.
        let mut body = Vec::new();
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&[0; 8 + 4 + 1 + 4]);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut out = Vec::new();
        encode_fixed(&mut out, Kind::Hello, &body).unwrap();
        let mut d = Decoder::new();
        d.feed(&out);
        assert!(matches!(d.next(), Err(ProtoError::Malformed { kind: Kind::Hello, .. })));
    }

    #[test]
    fn small_messages() {
        round_trip(Message::Welcome { version: 0xdead_beef });
        round_trip(Message::Refuse {
            reason: "disk 0 size differs ✗".into(),
        });
        round_trip(Message::Refuse { reason: String::new() });
        round_trip(Message::PrecopyDone { rounds: 0x0102_0304 });
        round_trip(Message::CkptEnd {
            seq: u64::MAX - 1,
            digest: 0x8765_4321,
        });
        round_trip(Message::Ack {
            seq: 0x0102_0304_0506_0708,
        });
        round_trip(Message::Nack {
            seq: 42,
            reason: "digest mismatch".into(),
        });
        round_trip(Message::Nack {
            seq: 0,
            reason: String::new(),
        });
        round_trip(Message::Heartbeat { sent_at_ns: u64::MAX });
        round_trip(Message::Received { bytes: 1 << 40 });
        round_trip(Message::Generation { value: 7 });
        round_trip(Message::Shutdown {
            reason: "guest powered off".into(),
        });
    }

    #[test]
    fn begin() {
        round_trip(Message::CkptBegin {
            seq: 1,
            epoch: 0x1122_3344_5566_7788,
            pages: 0x0101_0101_0101,
            state_len: 0x0202_0202_0202,
            engines: 0x0303_0303,
            disk_writes: 0x0404_0404_0404,
        });
        let mut out = Vec::new();
        Message::CkptBegin {
            seq: 1,
            epoch: 2,
            pages: 3,
            state_len: 4,
            engines: 5,
            disk_writes: 6,
        }
        .encode(&mut out)
        .unwrap();
        assert_eq!(out.len(), HEADER_LEN + 44 + TRAILER_LEN);
    }

    #[test]
    fn pages_messages() {
        let pages = PagesPayload::from_pages([(0u64, page(1)), (0x1000, page(2)), (!0xfffu64, page(3))]).unwrap();
        assert_eq!(pages.len(), 3);
        let got: Vec<(u64, [u8; PAGE_SIZE])> = pages.iter().map(|(g, p)| (g, *p)).collect();
        assert_eq!(got[1], (0x1000, page(2)));
        assert_eq!(got[2].0, !0xfffu64);
        round_trip(Message::PrecopyPages { pages: pages.clone() });
        round_trip(Message::CkptPages { pages });
        round_trip(Message::CkptPages {
            pages: PagesPayload::default(),
        });
    }

    #[test]
    fn byte_messages() {
        round_trip(Message::CkptState {
            bytes: (0..10_000u32).map(|i| i as u8).collect(),
        });
        round_trip(Message::CkptState { bytes: Vec::new() });
        round_trip(Message::CkptEngine {
            net: 0xabcd_ef01,
            bytes: vec![1, 2, 3],
        });
        round_trip(Message::CkptEngine {
            net: 0,
            bytes: Vec::new(),
        });
        round_trip(Message::CkptDisk {
            disk: 3,
            offset: 0x0102_0304_0506_0708,
            data: vec![5; 4096],
        });
        round_trip(Message::CkptDisk {
            disk: 0,
            offset: 0,
            data: Vec::new(),
        });
        round_trip(Message::PrecopyDisk {
            disk: 7,
            offset: 1 << 40,
            data: vec![6; 777],
        });
    }

    #[test]
    fn disk_and_engine_layout() {
        let mut out = Vec::new();
        Message::CkptDisk {
            disk: 2,
            offset: 9,
            data: vec![0xaa, 0xbb],
        }
        .encode(&mut out)
        .unwrap();
        let p = &out[HEADER_LEN..out.len() - TRAILER_LEN];
        assert_eq!(p, &[0xaa, 0xbb, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        out.clear();
        Message::CkptEngine {
            net: 1,
            bytes: vec![0xcc],
        }
        .encode(&mut out)
        .unwrap();
        let p = &out[HEADER_LEN..out.len() - TRAILER_LEN];
        assert_eq!(p, &[0xcc, 1, 0, 0, 0]);
    }

    #[test]
    fn short_trailers_are_malformed() {
        for kind in [Kind::CkptDisk, Kind::PrecopyDisk, Kind::CkptEngine] {
            let mut out = Vec::new();
            encode_fixed(&mut out, kind, &[1, 2, 3]).unwrap();
            let mut d = Decoder::new();
            d.feed(&out);
            assert!(matches!(d.next(), Err(ProtoError::Malformed { .. })), "{kind:?}");
        }
        let mut out = Vec::new();
        encode_fixed(&mut out, Kind::CkptPages, &[0; PAGE_RECORD_LEN + 1]).unwrap();
        let mut d = Decoder::new();
        d.feed(&out);
        assert!(matches!(
            d.next(),
            Err(ProtoError::Malformed {
                kind: Kind::CkptPages,
                ..
            })
        ));
        let mut out = Vec::new();
        encode_fixed(&mut out, Kind::Refuse, &[0xff, 0xfe]).unwrap();
        let mut d = Decoder::new();
        d.feed(&out);
        assert!(matches!(
            d.next(),
            Err(ProtoError::Malformed { kind: Kind::Refuse, .. })
        ));
    }

    #[test]
    fn encode_pages_splits_and_checks() {
        let pages: Vec<(u64, [u8; PAGE_SIZE])> = (0..10u64).map(|i| (i << 12, page(i as u8))).collect();
        let mut out = Vec::new();
        let mut it = pages.iter().map(|(g, p)| (*g, p));
        let mut n = Vec::new();
        while let Some((k, _)) = encode_pages(&mut out, PagesKind::Checkpoint, &mut it, 4).unwrap() {
            n.push(k);
        }
        assert_eq!(n, vec![4, 4, 2]);
        let mut d = Decoder::new();
        d.feed(&out);
        let mut got = Vec::new();
        while let Some(Frame::Message {
            msg: Message::CkptPages { pages },
            ..
        }) = d.next().unwrap()
        {
            got.extend(pages.iter().map(|(g, p)| (g, *p)));
        }
        assert_eq!(got, pages);

        // (u64, &[u8]) works too; a short page is refused and nothing written.
        let short = [0u8; 100];
        let mut out = vec![1, 2, 3];
        let p0 = page(0);
        let mut it = [(0u64, &p0[..]), (4096, &short[..])].into_iter();
        assert!(matches!(
            encode_pages(&mut out, PagesKind::Precopy, &mut it, 16),
            Err(ProtoError::Misuse(_))
        ));
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn oversize_payload_is_refused_when_encoding() {
        let big = vec![0u8; MAX_PAYLOAD as usize + 1];
        let mut out = Vec::new();
        assert!(matches!(
            Message::CkptState { bytes: big.clone() }.encode(&mut out),
            Err(ProtoError::Oversize { .. })
        ));
        assert!(encode_disk(&mut out, Kind::CkptDisk, 0, 0, &big[..MAX_PAYLOAD as usize - 11]).is_err());
        assert!(out.is_empty());
        assert!(encode_disk(&mut out, Kind::CkptDisk, 0, 0, &big[..MAX_PAYLOAD as usize - 12]).is_ok());
    }

    #[test]
    fn digest_combines() {
        let a = b"hello ";
        let b = b"world";
        let mut h = Hasher::new();
        h.combine(
            &PayloadSum {
                crc: crc32fast::hash(a),
                len: 6,
            }
            .hasher(),
        );
        h.combine(
            &PayloadSum {
                crc: crc32fast::hash(b),
                len: 5,
            }
            .hasher(),
        );
        h.combine(
            &PayloadSum {
                crc: crc32fast::hash(b""),
                len: 0,
            }
            .hasher(),
        );
        assert_eq!(h.finalize(), crc32fast::hash(b"hello world"));
    }
}
