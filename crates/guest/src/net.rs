//! virtio-net driver, smoltcp glue and the network workloads `sink:PORT`,
//! `source:PORT:MIB`, `echo:PORT` (TCP) and `ping:IP` (ICMP echo; the
//! interface itself answers echo requests).
//!
//! Features: VERSION_1, EVENT_IDX, MAC, STATUS, GUEST_CSUM + GUEST_TSO4
//! (the host may hand us up to 64 KiB TCP frames with partial checksums,
//! so smoltcp does not verify IPv4/TCP/UDP checksums on receive), and
//! CSUM + HOST_TSO4: smoltcp emits MSS-sized, fully checksummed segments;
//! the driver coalesces consecutive full-sized data segments of one
//! connection (same headers but seq, contiguous) into one TSO frame of up
//! to 64 KiB (GSO_TCPV4, NEEDS_CSUM, gso_size = the MSS) that the host
//! segments again. No mergeable RX buffers: each RX descriptor is one
//! 64 KiB + header buffer.
//!
//! Loop (NAPI style, one CPU): read the interrupt count, let smoltcp take
//! every received frame, let the applications move data, let smoltcp emit
//! segments until it has nothing more (or the TX ring is full), publish RX
//! buffers and kick TX once for the whole batch. When nothing moved, reclaim
//! finished TX slots, arm both rings (EVENT_IDX; poll again if used entries
//! already wait) and sleep until the device interrupt or smoltcp's next
//! timer (LAPIC one-shot). If smoltcp wants to send "now" but the TX ring is
//! full, sleep until the TX completion interrupt; the loop never spins on
//! work it cannot do.

use core::cell::RefCell;
use core::sync::atomic::Ordering;

use sha2::{Digest, Sha256};
use smoltcp::iface::{Config as IfConfig, Interface, PollResult, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address};

use crate::cmdline::{Ipv4Cidr, Workload};
use crate::irq;
use crate::palloc;
use crate::pattern;
use crate::say;
use crate::smp::Lapic;
use crate::time;
use crate::virtio::{Mmio, Queue, DESC_WRITE, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use crate::workloads::Extra;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_HOST_TSO4: u64 = 1 << 11;
const F_STATUS: u64 = 1 << 16;

/// virtio_net_hdr_v1.
const HDR: usize = 12;
/// RX buffer with GUEST_TSO4 (65550-byte frames + header, rounded up).
const RX_BIG: usize = 65_568;
/// RX buffer without it.
const RX_SMALL: usize = 2048;
/// TX slot: a TSO frame of up to 64 KiB + header (rounded to pages).
const TX_BUF: usize = 17 * 4096;
/// Ethernet MTU including the Ethernet header (smoltcp's convention).
const MTU: usize = 1514;
/// Socket buffers of the bulk workloads.
const BULK_BUF: usize = 4 << 20;
const SMALL_BUF: usize = 256 << 10;
/// TCP workloads served (at most).
const MAX_APPS: usize = 16;
/// Listening sockets per TCP port (connections served at the same time).
const SOCKETS_PER_PORT: usize = 2;

struct Rings {
    rxq: Queue,
    txq: Queue,
    rx_base: u64,
    rx_buf: usize,
    tx_base: u64,
    tx_free: [u16; 256],
    tx_nfree: usize,
    /// Where smoltcp writes each frame before it is copied to a TX slot
    /// (or appended to the pending TSO frame).
    staging: u64,
    /// Coalesce TCP segments into TSO frames (HOST_TSO4 and CSUM agreed).
    tso: bool,
    pending: Option<Pending>,
}

/// A TSO frame being built from consecutive full-sized segments of one
/// connection, in TX slot `slot`.
struct Pending {
    slot: u16,
    /// Frame bytes so far (after the virtio header).
    len: usize,
    segs: u32,
    /// Payload of the first segment (the gso_size).
    mss: usize,
    /// Payload of the last segment appended.
    last: usize,
    next_seq: u32,
    /// TCP header length.
    thl: usize,
}

/// Ethernet + IPv4 (no options) header length.
const L3_END: usize = 14 + 20;

/// The TCP header length and payload length of `f` if it is a plain IPv4
/// TCP data segment with only ACK/PSH set (the kind TSO can carry).
fn tcp_data(f: &[u8]) -> Option<(usize, usize)> {
    if f.len() < L3_END + 20 || f[12..14] != [0x08, 0x00] || f[14] != 0x45 || f[23] != 6 {
        return None;
    }
    if u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0 {
        return None; // fragment
    }
    let thl = usize::from(f[L3_END + 12] >> 4) * 4;
    let flags = f[L3_END + 13];
    if thl < 20 || flags & !0x18 != 0 || flags & 0x10 == 0 {
        return None;
    }
    let ip_len = usize::from(u16::from_be_bytes([f[16], f[17]]));
    if ip_len + 14 != f.len() || f.len() <= L3_END + thl {
        return None;
    }
    Some((thl, f.len() - L3_END - thl))
}

fn seq(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[L3_END + 4], f[L3_END + 5], f[L3_END + 6], f[L3_END + 7]])
}

/// One's-complement sum of big-endian 16-bit words.
fn csum_add(mut sum: u32, b: &[u8]) -> u32 {
    let mut c = b.chunks_exact(2);
    for w in &mut c {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [x] = c.remainder() {
        sum += u32::from(*x) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

impl Rings {
    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.txq.pop_used() {
            self.tx_free[self.tx_nfree] = id;
            self.tx_nfree += 1;
        }
    }

    fn slot_addr(&self, slot: u16) -> u64 {
        self.tx_base + u64::from(slot) * TX_BUF as u64
    }

    /// Puts the pending TSO frame (if any) in the TX ring.
    fn finish_pending(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let addr = self.slot_addr(p.slot);
        // SAFETY: TX slot p.slot is ours until pushed; TX_BUF bytes.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, TX_BUF) };
        let (hdr, f) = buf.split_at_mut(HDR);
        hdr.fill(0);
        if p.segs > 1 {
            // IPv4 total length and header checksum.
            let ip_len = (p.len - 14) as u16;
            f[16..18].copy_from_slice(&ip_len.to_be_bytes());
            f[24..26].fill(0);
            let c = !csum_fold(csum_add(0, &f[14..L3_END]));
            f[24..26].copy_from_slice(&c.to_be_bytes());
            // TCP checksum field: the pseudo-header sum, uncomplemented
            // (the host finishes it for every segment).
            let tcp_len = (p.len - L3_END) as u16;
            let mut sum = csum_add(0, &f[26..34]);
            sum += 6 + u32::from(tcp_len);
            f[L3_END + 16..L3_END + 18].copy_from_slice(&csum_fold(sum).to_be_bytes());
            hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
            hdr[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
            hdr[2..4].copy_from_slice(&((L3_END + p.thl) as u16).to_le_bytes());
            hdr[4..6].copy_from_slice(&(p.mss as u16).to_le_bytes());
            hdr[6..8].copy_from_slice(&(L3_END as u16).to_le_bytes());
            hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        self.txq.set_desc(p.slot, addr, (HDR + p.len) as u32, 0, 0);
        self.txq.push(p.slot);
    }

    /// Appends the segment `f` to the pending TSO frame if it continues it.
    fn try_append(&mut self, f: &[u8], thl: usize, payload: usize) -> bool {
        let Some(p) = self.pending.as_ref() else {
            return false;
        };
        if thl != p.thl || p.last != p.mss || payload > p.mss || seq(f) != p.next_seq || p.len + payload > 14 + 65_535 {
            return false;
        }
        let addr = self.slot_addr(p.slot) as usize + HDR;
        // SAFETY: the pending frame in its TX slot (ours until pushed).
        let cur = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, TX_BUF - HDR) };
        // Same Ethernet header, addresses, ports, ack, data offset, window
        // and options; only seq, flags (PSH) and checksums may differ.
        let same = cur[..14] == f[..14]
            && cur[26..L3_END + 4] == f[26..L3_END + 4]
            && cur[L3_END + 8..L3_END + 13] == f[L3_END + 8..L3_END + 13]
            && cur[L3_END + 14..L3_END + 16] == f[L3_END + 14..L3_END + 16]
            && cur[L3_END + 20..L3_END + thl] == f[L3_END + 20..L3_END + thl];
        if !same {
            return false;
        }
        let p = self.pending.as_mut().unwrap_or_else(|| unreachable!());
        cur[p.len..p.len + payload].copy_from_slice(&f[L3_END + thl..]);
        cur[L3_END + 13] |= f[L3_END + 13] & 0x08;
        p.len += payload;
        p.segs += 1;
        p.last = payload;
        p.next_seq = p.next_seq.wrapping_add(payload as u32);
        true
    }

    /// Queues the frame of `len` bytes in the staging buffer.
    fn queue_frame(&mut self, len: usize) {
        // SAFETY: the staging buffer (TX_BUF bytes) holds the frame.
        let f = unsafe { core::slice::from_raw_parts(self.staging as *const u8, len) };
        let data = if self.tso { tcp_data(f) } else { None };
        if let Some((thl, payload)) = data {
            if self.try_append(f, thl, payload) {
                return;
            }
        }
        self.finish_pending();
        if self.tx_nfree == 0 {
            self.reclaim_tx();
        }
        if self.tx_nfree == 0 {
            return; // dropped (TCP will retransmit)
        }
        self.tx_nfree -= 1;
        let slot = self.tx_free[self.tx_nfree];
        let addr = self.slot_addr(slot);
        // SAFETY: TX slot `slot` is ours (off the free list); TX_BUF bytes.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, TX_BUF) };
        buf[HDR..HDR + len].copy_from_slice(f);
        match data {
            Some((thl, payload)) => {
                self.pending = Some(Pending {
                    slot,
                    len,
                    segs: 1,
                    mss: payload,
                    last: payload,
                    next_seq: seq(f).wrapping_add(payload as u32),
                    thl,
                })
            }
            None => {
                buf[..HDR].fill(0);
                self.txq.set_desc(slot, addr, (HDR + len) as u32, 0, 0);
                self.txq.push(slot);
            }
        }
    }
}

/// A virtio-net device as a smoltcp [`Device`].
pub struct VirtioNet {
    r: RefCell<Rings>,
    pub mac: [u8; 6],
    rx_csum_offload: bool,
}

impl VirtioNet {
    pub fn new(mmio: Mmio) -> Result<VirtioNet, &'static str> {
        let want = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | F_MAC
            | F_STATUS
            | F_CSUM
            | F_HOST_TSO4
            | F_GUEST_CSUM
            | F_GUEST_TSO4;
        let f = mmio.negotiate(want)?;
        let ev = f & VIRTIO_F_RING_EVENT_IDX != 0;
        let csum = f & F_GUEST_CSUM != 0;
        let big = csum && f & F_GUEST_TSO4 != 0;
        let tso = f & F_CSUM != 0 && f & F_HOST_TSO4 != 0;
        let rx_buf = if big { RX_BIG } else { RX_SMALL };
        let mut rxq = mmio.queue(0, 128, ev)?;
        let mut txq = mmio.queue(1, 128, ev)?;
        let mut mac = [0u8; 6];
        if f & F_MAC != 0 {
            for (i, m) in mac.iter_mut().enumerate() {
                *m = mmio.config8(i);
            }
        } else {
            mac = [0x02, 0, 0, 0, 0, 0x02];
        }
        let rx_base = palloc::alloc(usize::from(rxq.size) * rx_buf, 4096);
        for i in 0..rxq.size {
            rxq.set_desc(i, rx_base + u64::from(i) * rx_buf as u64, rx_buf as u32, DESC_WRITE, 0);
            rxq.push(i);
        }
        let tx_base = palloc::alloc(usize::from(txq.size) * TX_BUF, 4096);
        let mut tx_free = [0u16; 256];
        for (i, t) in tx_free.iter_mut().enumerate().take(usize::from(txq.size)) {
            *t = i as u16;
        }
        let tx_nfree = usize::from(txq.size);
        // Interrupts only when we arm a ring before sleeping.
        rxq.arm();
        txq.arm();
        mmio.driver_ok();
        rxq.kick();
        let staging = palloc::alloc(TX_BUF, 4096);
        Ok(VirtioNet {
            r: RefCell::new(Rings {
                rxq,
                txq,
                rx_base,
                rx_buf,
                tx_base,
                tx_free,
                tx_nfree,
                staging,
                tso,
                pending: None,
            }),
            mac,
            rx_csum_offload: csum,
        })
    }

    /// Finishes the pending TSO frame, publishes re-posted RX buffers and
    /// queued TX frames (one notification each at most, and only if the
    /// device wants one).
    pub fn flush(&mut self) {
        let r = self.r.get_mut();
        r.finish_pending();
        r.rxq.kick();
        r.txq.kick();
    }

    /// Takes back the TX slots the device is done with; true if the TX
    /// ring is still full (nothing more can be sent until it completes
    /// some).
    pub fn tx_full(&mut self) -> bool {
        let r = self.r.get_mut();
        r.reclaim_tx();
        r.tx_nfree == 0
    }

    /// Arms both rings; true if used entries already wait.
    ///
    /// TX completions are reclaimed first: they are otherwise only taken
    /// back when the ring is full, and completed-but-unreclaimed entries
    /// would make this return true forever (a busy loop).
    pub fn arm(&mut self) -> bool {
        let r = self.r.get_mut();
        r.reclaim_tx();
        let a = r.rxq.arm();
        let b = r.txq.in_flight() > 0 && r.txq.arm();
        a || b
    }
}

pub struct NetRx<'a> {
    r: &'a RefCell<Rings>,
    id: u16,
    len: usize,
}

impl phy::RxToken for NetRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let addr = {
            let r = self.r.borrow();
            r.rx_base + u64::from(self.id) * r.rx_buf as u64
        };
        // SAFETY: the device wrote `len` bytes into this buffer and gave it
        // back; it is not re-posted until this token is dropped.
        let frame = unsafe { core::slice::from_raw_parts((addr as usize + HDR) as *const u8, self.len - HDR) };
        f(frame)
    }
}

impl Drop for NetRx<'_> {
    fn drop(&mut self) {
        self.r.borrow_mut().rxq.push(self.id);
    }
}

pub struct NetTx<'a> {
    r: &'a RefCell<Rings>,
}

impl phy::TxToken for NetTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut r = self.r.borrow_mut();
        let len = len.min(MTU);
        // SAFETY: the staging buffer, TX_BUF >= MTU bytes, only used here.
        let buf = unsafe { core::slice::from_raw_parts_mut(r.staging as *mut u8, len) };
        let res = f(buf);
        r.queue_frame(len);
        res
    }
}

impl Device for VirtioNet {
    type RxToken<'a> = NetRx<'a>;
    type TxToken<'a> = NetTx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(NetRx<'_>, NetTx<'_>)> {
        let (id, len) = loop {
            let mut r = self.r.borrow_mut();
            let (id, len) = r.rxq.pop_used()?;
            if (len as usize) > HDR {
                break (id, len as usize);
            }
            r.rxq.push(id);
        };
        Some((NetRx { r: &self.r, id, len }, NetTx { r: &self.r }))
    }

    fn transmit(&mut self, _t: Instant) -> Option<NetTx<'_>> {
        let r = self.r.get_mut();
        if r.tx_nfree == 0 {
            r.reclaim_tx();
        }
        (r.tx_nfree > 0).then_some(NetTx { r: &self.r })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU;
        if self.rx_csum_offload {
            c.checksum.ipv4 = Checksum::Tx;
            c.checksum.tcp = Checksum::Tx;
            c.checksum.udp = Checksum::Tx;
        }
        c
    }
}

fn now() -> Instant {
    Instant::from_micros(time::micros() as i64)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sink,
    Source(u64),
    Echo,
}

struct App {
    kind: Kind,
    port: u16,
    h: SocketHandle,
    hash: Sha256,
    bytes: u64,
    active: bool,
    closing: bool,
    /// The connection's line was printed.
    reported: bool,
}

impl App {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Sink => "sink",
            Kind::Source(_) => "source",
            Kind::Echo => "echo",
        }
    }

    fn report(&mut self) {
        self.reported = true;
        let d = self.hash.finalize_reset();
        let mut hex = [0u8; 64];
        for (i, b) in d.iter().enumerate() {
            hex[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
            hex[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 15)];
        }
        say!(
            "{} port={} bytes={} sha256={}",
            self.name(),
            self.port,
            self.bytes,
            core::str::from_utf8(&hex).unwrap_or("?")
        );
    }

    /// Moves data; returns true if anything moved.
    fn service(&mut self, sockets: &mut SocketSet<'_>) -> bool {
        let s = sockets.get_mut::<tcp::Socket>(self.h);
        let state = s.state();
        if !s.is_open() || state == tcp::State::TimeWait {
            if self.active {
                if !self.reported {
                    // Reset by the peer, or (source) the last ACK and the
                    // peer's FIN came in one batch: TimeWait without our
                    // having seen an empty send queue in between.
                    self.report();
                }
                self.active = false;
                self.closing = false;
                self.reported = false;
                self.bytes = 0;
                self.hash = Sha256::new();
            }
            if state == tcp::State::TimeWait {
                s.abort();
            }
            if !s.is_open() {
                let _ = s.listen(self.port);
            }
            return false;
        }
        if !self.active && s.is_active() && state != tcp::State::Listen && state != tcp::State::SynReceived {
            self.active = true;
        }
        if !self.active {
            return false;
        }
        let mut moved = false;
        match self.kind {
            Kind::Sink => {
                while s.can_recv() {
                    let hash = &mut self.hash;
                    let n = s
                        .recv(|b| {
                            hash.update(&*b);
                            (b.len(), b.len())
                        })
                        .unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    self.bytes += n as u64;
                    moved = true;
                }
                if !s.may_recv() && !self.closing {
                    self.report();
                    self.closing = true;
                    s.close();
                }
            }
            Kind::Source(total) => {
                while self.bytes < total && s.can_send() {
                    let (hash, sent) = (&mut self.hash, self.bytes);
                    let n = s
                        .send(|b| {
                            let n = (b.len() as u64).min(total - sent) as usize;
                            pattern::fill(0, sent, &mut b[..n]);
                            hash.update(&b[..n]);
                            (n, n)
                        })
                        .unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    self.bytes += n as u64;
                    moved = true;
                }
                if (self.bytes == total || !s.may_send()) && !self.closing {
                    self.closing = true;
                    s.close();
                }
                if self.closing && !self.reported && s.send_queue() == 0 {
                    self.report();
                }
            }
            Kind::Echo => {
                let mut buf = [0u8; 8192];
                while s.can_recv() && s.can_send() {
                    let room = (s.send_capacity() - s.send_queue()).min(buf.len());
                    let n = s.recv_slice(&mut buf[..room]).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    self.hash.update(&buf[..n]);
                    let _ = s.send_slice(&buf[..n]);
                    self.bytes += n as u64;
                    moved = true;
                }
                if !s.may_recv() && !s.can_recv() && s.send_queue() == 0 && !self.closing {
                    self.report();
                    self.closing = true;
                    s.close();
                }
            }
        }
        moved
    }
}

/// Longest sleep while the TX ring is full (the TX interrupt normally
/// ends it much sooner).
const TX_FULL_WAIT_US: u64 = 10_000;
/// Sleep when smoltcp asks to be polled now but emits nothing.
const STALL_WAIT_US: u64 = 100;

/// Echo requests a `ping:IP` workload sends, one every [`PING_INTERVAL_US`].
const PING_COUNT: u16 = 5;
const PING_INTERVAL_US: u64 = 200_000;
/// How long to wait for the last reply.
const PING_WAIT_US: u64 = 2_000_000;

/// `ping:IP`: ICMP echo requests to IP; prints one line per reply and a
/// summary.
struct Pinger {
    ip: [u8; 4],
    h: SocketHandle,
    ident: u16,
    sent: u16,
    received: u16,
    next_us: u64,
    done: bool,
}

impl Pinger {
    fn service(&mut self, sockets: &mut SocketSet<'_>) -> bool {
        if self.done {
            return false;
        }
        let s = sockets.get_mut::<icmp::Socket>(self.h);
        let now = time::micros();
        let mut moved = false;
        while let Ok((data, _from)) = s.recv() {
            let Ok(pkt) = Icmpv4Packet::new_checked(data) else {
                continue;
            };
            let Ok(Icmpv4Repr::EchoReply { ident, seq_no, data }) =
                Icmpv4Repr::parse(&pkt, &ChecksumCapabilities::default())
            else {
                continue;
            };
            if ident != self.ident || data.len() < 8 {
                continue;
            }
            let mut t = [0u8; 8];
            t.copy_from_slice(&data[..8]);
            let rtt = now.saturating_sub(u64::from_le_bytes(t));
            let [a, b, c, d] = self.ip;
            say!("ping reply from {a}.{b}.{c}.{d} seq={seq_no} rtt_us={rtt}");
            self.received += 1;
            moved = true;
        }
        if self.sent < PING_COUNT && now >= self.next_us && s.can_send() {
            let mut payload = [0u8; 56];
            payload[..8].copy_from_slice(&now.to_le_bytes());
            let repr = Icmpv4Repr::EchoRequest {
                ident: self.ident,
                seq_no: self.sent,
                data: &payload,
            };
            let [a, b, c, d] = self.ip;
            if let Ok(buf) = s.send(repr.buffer_len(), IpAddress::v4(a, b, c, d)) {
                let mut pkt = Icmpv4Packet::new_unchecked(buf);
                repr.emit(&mut pkt, &ChecksumCapabilities::default());
                self.sent += 1;
                self.next_us = now + PING_INTERVAL_US;
                moved = true;
            }
        }
        let finished = self.received >= PING_COUNT
            || (self.sent == PING_COUNT && now >= self.next_us - PING_INTERVAL_US + PING_WAIT_US);
        if finished {
            let [a, b, c, d] = self.ip;
            say!("ping ip={a}.{b}.{c}.{d} sent={} received={}", self.sent, self.received);
            self.done = true;
        }
        moved
    }

    /// Microseconds until this pinger needs to run again.
    fn wait_us(&self) -> Option<u64> {
        if self.done {
            return None;
        }
        let now = time::micros();
        let at = if self.sent < PING_COUNT {
            self.next_us
        } else {
            self.next_us - PING_INTERVAL_US + PING_WAIT_US
        };
        Some(at.saturating_sub(now))
    }
}

/// Runs the network workloads in `ws` forever, and `extra` (`diskloop`,
/// the BSP's clock checks) in the same loop.
pub fn run(
    lapic: &Lapic,
    mut dev: VirtioNet,
    ip: Option<Ipv4Cidr>,
    gw: Option<[u8; 4]>,
    ws: &[Workload<'_>],
    extra: &mut Extra,
) -> ! {
    let ip = ip.unwrap_or(Ipv4Cidr {
        addr: [10, 0, 0, 2],
        prefix: 24,
    });
    let mut cfg = IfConfig::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac)));
    cfg.random_seed = time::rdtsc();
    let mut iface = Interface::new(cfg, &mut dev, now());
    let [a, b, c, d] = ip.addr;
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), ip.prefix));
    });
    if let Some([a, b, c, d]) = gw {
        let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
    }
    let mut storage: [SocketStorage<'_>; SOCKETS_PER_PORT * MAX_APPS + 2] =
        core::array::from_fn(|_| SocketStorage::EMPTY);
    let mut icmp_meta = [[icmp::PacketMetadata::EMPTY; 8]; 4];
    let mut icmp_data = [[0u8; 2048]; 4];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut pingers: [Option<Pinger>; 2] = Default::default();
    let mut icmp_bufs = icmp_meta.chunks_mut(2).zip(icmp_data.chunks_mut(2));
    for (slot, w) in pingers
        .iter_mut()
        .zip(ws.iter().filter(|w| matches!(w, Workload::Ping { .. })))
    {
        let Workload::Ping { ip } = *w else { continue };
        let Some(([m0, m1], [d0, d1])) = icmp_bufs.next() else {
            break;
        };
        let mut s = icmp::Socket::new(
            icmp::PacketBuffer::new(&mut m0[..], &mut d0[..]),
            icmp::PacketBuffer::new(&mut m1[..], &mut d1[..]),
        );
        let ident = 0x7200 | (time::rdtsc() & 0xff) as u16;
        let _ = s.bind(icmp::Endpoint::Ident(ident));
        *slot = Some(Pinger {
            ip,
            h: sockets.add(s),
            ident,
            sent: 0,
            received: 0,
            next_us: 0,
            done: false,
        });
    }
    // SOCKETS_PER_PORT sockets listen on each TCP port, so that one is
    // still listening while another finishes its connection (LastAck,
    // FinWait): back-to-back connections are accepted, not reset.
    let mut apps: [Option<App>; SOCKETS_PER_PORT * MAX_APPS] = core::array::from_fn(|_| None);
    let mut slots = apps.iter_mut();
    'ws: for w in ws.iter().take(MAX_APPS) {
        let (kind, port) = match *w {
            Workload::Sink { port } => (Kind::Sink, port),
            Workload::Source { port, mib } => (Kind::Source(mib << 20), port),
            Workload::Echo { port } => (Kind::Echo, port),
            _ => continue,
        };
        let (rx, tx) = match kind {
            Kind::Sink => (BULK_BUF, SMALL_BUF),
            Kind::Source(_) => (SMALL_BUF, BULK_BUF),
            Kind::Echo => (SMALL_BUF, SMALL_BUF),
        };
        for _ in 0..SOCKETS_PER_PORT {
            let Some(slot) = slots.next() else {
                break 'ws;
            };
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(palloc::alloc_slice(rx)),
                tcp::SocketBuffer::new(palloc::alloc_slice(tx)),
            );
            s.set_ack_delay(None);
            s.set_nagle_enabled(false);
            let _ = s.listen(port);
            let h = sockets.add(s);
            *slot = Some(App {
                kind,
                port,
                h,
                hash: Sha256::new(),
                bytes: 0,
                active: false,
                closing: false,
                reported: false,
            });
        }
    }
    let m = dev.mac;
    say!(
        "net up ip={a}.{b}.{c}.{d}/{} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        ip.prefix,
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    );
    let mut stalled = false;
    loop {
        let seen = irq::irq_count().load(Ordering::Acquire);
        let t = now();
        let mut busy = iface.poll(t, &mut dev, &mut sockets) != PollResult::None;
        for app in apps.iter_mut().flatten() {
            busy |= app.service(&mut sockets);
        }
        for p in pingers.iter_mut().flatten() {
            busy |= p.service(&mut sockets);
        }
        busy |= extra.service();
        for _ in 0..1024 {
            if iface.poll_egress(t, &mut dev, &mut sockets) == PollResult::None {
                break;
            }
            busy = true;
        }
        dev.flush();
        if busy {
            stalled = false;
            continue;
        }
        if dev.arm() || extra.arm() {
            continue;
        }
        // Nothing moved. smoltcp may still want to send "now": because the
        // TX ring is full (wait for the TX interrupt, armed above), or
        // because a timer expired since `t` (poll once more); if it says
        // "now" again without sending anything, sleep a little instead of
        // spinning.
        let mut timeout = match iface.poll_delay(now(), &sockets) {
            Some(d) if d == Duration::ZERO => {
                if dev.tx_full() {
                    TX_FULL_WAIT_US
                } else if !stalled {
                    stalled = true;
                    continue;
                } else {
                    STALL_WAIT_US
                }
            }
            Some(d) => d.total_micros().min(1_000_000),
            None => 1_000_000,
        };
        for p in pingers.iter().flatten() {
            if let Some(us) = p.wait_us() {
                timeout = timeout.min(us.max(1));
            }
        }
        irq::sleep(lapic, seen, Some(timeout));
    }
}
