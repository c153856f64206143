//! Frame parsing, building and checksum helpers (Ethernet II + IPv4/IPv6 + TCP).
//!
//! Headers are parsed with `etherparse` header slices; TCP options are parsed
//! here because the engine needs their byte offsets to rewrite them in place
//! (SACK blocks, TSecr). Checksums are computed with `etherparse::checksum`.
//!
//! Everything in this module is total: malformed input yields `None` /
//! [`Parsed::Other`], never a panic.

use etherparse::checksum::Sum16BitWords;
use etherparse::{Ethernet2HeaderSlice, Ipv4HeaderSlice, Ipv6HeaderSlice, TcpHeaderSlice};

/// Ethernet header length (no VLAN tags; tagged frames are treated as non-TCP).
pub const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;

/// TCP flag bits.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Maximum number of SACK blocks carried in one segment.
pub const MAX_SACK: usize = 4;

/// IP-layer fields of a TCP segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Net {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        tos: u8,
        ttl: u8,
        df: bool,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        traffic_class: u8,
        flow_label: u32,
        hop_limit: u8,
    },
}

impl Net {
    /// Source and destination addresses as a flow-key pair.
    pub fn addrs(&self) -> (IpAddr, IpAddr) {
        match *self {
            Net::V4 { src, dst, .. } => (IpAddr::V4(src), IpAddr::V4(dst)),
            Net::V6 { src, dst, .. } => (IpAddr::V6(src), IpAddr::V6(dst)),
        }
    }

    /// The same header parameters with source and destination swapped.
    pub fn reversed(&self) -> Net {
        match *self {
            Net::V4 { src, dst, tos, ttl, df } => Net::V4 {
                src: dst,
                dst: src,
                tos,
                ttl,
                df,
            },
            Net::V6 {
                src,
                dst,
                traffic_class,
                flow_label,
                hop_limit,
            } => Net::V6 {
                src: dst,
                dst: src,
                traffic_class,
                flow_label,
                hop_limit,
            },
        }
    }

    /// IP header length of frames built from this.
    pub fn header_len(&self) -> usize {
        match self {
            Net::V4 { .. } => 20,
            Net::V6 { .. } => 40,
        }
    }
}

/// A compact IP address (plain bytes, cheap to hash and copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum IpAddr {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// Parsed TCP options, with the offsets (relative to the start of the TCP
/// header) of the ones the engine rewrites in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOpts {
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    /// (TSval, TSecr)
    pub timestamps: Option<(u32, u32)>,
    pub sack: [(u32, u32); MAX_SACK],
    pub sack_len: u8,
    /// Offset of the TSecr field (4 bytes) from the start of the TCP header.
    pub tsecr_offset: Option<usize>,
    /// Offset and length of the whole SACK option from the start of the TCP header.
    pub sack_option: Option<(usize, usize)>,
}

impl TcpOpts {
    /// The SACK blocks carried.
    pub fn sack_blocks(&self) -> &[(u32, u32)] {
        &self.sack[..usize::from(self.sack_len).min(MAX_SACK)]
    }
}

/// Parse the option bytes of a TCP header. `None` if malformed.
pub fn parse_options(opts: &[u8]) -> Option<TcpOpts> {
    let mut out = TcpOpts::default();
    let mut i = 0;
    while i < opts.len() {
        let kind = opts[i];
        match kind {
            0 => break,
            1 => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let len = usize::from(*opts.get(i + 1)?);
        if len < 2 || i + len > opts.len() {
            return None;
        }
        let body = &opts[i + 2..i + len];
        match (kind, len) {
            (2, 4) => out.mss = Some(u16::from_be_bytes([body[0], body[1]])),
            (3, 3) => out.wscale = Some(body[0].min(14)),
            (4, 2) => out.sack_permitted = true,
            (5, _) => {
                if (len - 2) % 8 != 0 {
                    return None;
                }
                let n = ((len - 2) / 8).min(MAX_SACK);
                for b in 0..n {
                    let o = b * 8;
                    out.sack[b] = (be32(&body[o..o + 4]), be32(&body[o + 4..o + 8]));
                }
                out.sack_len = n as u8;
                out.sack_option = Some((20 + i, len));
            }
            (8, 10) => {
                out.timestamps = Some((be32(&body[0..4]), be32(&body[4..8])));
                out.tsecr_offset = Some(20 + i + 6);
            }
            // Known kinds with a wrong length are malformed.
            (2, _) | (3, _) | (4, _) | (8, _) => return None,
            _ => {}
        }
        i += len;
    }
    Some(out)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// A parsed TCP segment inside an Ethernet frame.
#[derive(Clone, Debug)]
pub struct Segment<'a> {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub net: Net,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub checksum: u16,
    pub opts: TcpOpts,
    /// Offset of the TCP header in the frame.
    pub tcp_offset: usize,
    /// TCP header length (with options).
    pub tcp_header_len: usize,
    pub payload: &'a [u8],
}

impl Segment<'_> {
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    /// Sequence space consumed (payload + SYN + FIN).
    pub fn seq_len(&self) -> u32 {
        self.payload.len() as u32 + u32::from(self.has(flags::SYN)) + u32::from(self.has(flags::FIN))
    }
    /// Length of the frame up to the end of the TCP payload (drops Ethernet padding).
    pub fn frame_len(&self) -> usize {
        self.tcp_offset + self.tcp_header_len + self.payload.len()
    }
}

/// Result of parsing a frame.
#[derive(Debug)]
pub enum Parsed<'a> {
    Tcp(Segment<'a>),
    /// Not TCP, or TCP we do not handle (IP options, extension headers,
    /// fragments, VLAN tags), or malformed.
    Other,
}

/// Parse an Ethernet II frame. Never panics.
pub fn parse(frame: &[u8]) -> Parsed<'_> {
    parse_inner(frame).map_or(Parsed::Other, Parsed::Tcp)
}

fn parse_inner(frame: &[u8]) -> Option<Segment<'_>> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).ok()?;
    let rest = frame.get(ETH_LEN..)?;
    let (net, ip_len, tcp_total) = match eth.ether_type().0 {
        ETHERTYPE_IPV4 => {
            let ip = Ipv4HeaderSlice::from_slice(rest).ok()?;
            if ip.ihl() != 5
                || ip.protocol().0 != IPPROTO_TCP
                || ip.more_fragments()
                || ip.fragments_offset().value() != 0
            {
                return None;
            }
            let total = usize::from(ip.total_len());
            if total > rest.len() || total < 40 {
                return None;
            }
            let net = Net::V4 {
                src: ip.source(),
                dst: ip.destination(),
                tos: rest[1],
                ttl: ip.ttl(),
                df: ip.dont_fragment(),
            };
            (net, 20, total - 20)
        }
        ETHERTYPE_IPV6 => {
            let ip = Ipv6HeaderSlice::from_slice(rest).ok()?;
            if ip.next_header().0 != IPPROTO_TCP {
                return None;
            }
            let plen = usize::from(ip.payload_length());
            if plen < 20 || 40 + plen > rest.len() {
                return None;
            }
            let net = Net::V6 {
                src: ip.source(),
                dst: ip.destination(),
                traffic_class: ip.traffic_class(),
                flow_label: ip.flow_label().value(),
                hop_limit: ip.hop_limit(),
            };
            (net, 40, plen)
        }
        _ => return None,
    };
    let tcp_offset = ETH_LEN + ip_len;
    let tcp_bytes = frame.get(tcp_offset..tcp_offset + tcp_total)?;
    let tcp = TcpHeaderSlice::from_slice(tcp_bytes).ok()?;
    let hlen = tcp.slice().len();
    let opts = parse_options(tcp.options())?;
    let mut f = 0u8;
    for (b, v) in [
        (tcp.fin(), flags::FIN),
        (tcp.syn(), flags::SYN),
        (tcp.rst(), flags::RST),
        (tcp.psh(), flags::PSH),
        (tcp.ack(), flags::ACK),
        (tcp.urg(), flags::URG),
        (tcp.ece(), flags::ECE),
        (tcp.cwr(), flags::CWR),
    ] {
        if b {
            f |= v;
        }
    }
    Some(Segment {
        eth_src: eth.source(),
        eth_dst: eth.destination(),
        net,
        src_port: tcp.source_port(),
        dst_port: tcp.destination_port(),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags: f,
        window: tcp.window_size(),
        checksum: tcp.checksum(),
        opts,
        tcp_offset,
        tcp_header_len: hlen,
        payload: tcp_bytes.get(hlen..)?,
    })
}

fn pseudo_sum(net: &Net, tcp_len: usize) -> Sum16BitWords {
    let mut s = Sum16BitWords::new();
    match net {
        Net::V4 { src, dst, .. } => s
            .add_4bytes(*src)
            .add_4bytes(*dst)
            .add_2bytes([0, IPPROTO_TCP])
            .add_2bytes((tcp_len as u16).to_be_bytes()),
        Net::V6 { src, dst, .. } => s
            .add_16bytes(*src)
            .add_16bytes(*dst)
            .add_4bytes((tcp_len as u32).to_be_bytes())
            .add_4bytes([0, 0, 0, IPPROTO_TCP]),
    }
}

/// Verify the TCP checksum (and the IPv4 header checksum) of a parsed segment.
pub fn verify_checksums(frame: &[u8], seg: &Segment<'_>) -> bool {
    let end = seg.frame_len();
    let Some(tcp) = frame.get(seg.tcp_offset..end) else {
        return false;
    };
    if let Net::V4 { .. } = seg.net {
        let Some(ip) = frame.get(ETH_LEN..ETH_LEN + 20) else {
            return false;
        };
        if Sum16BitWords::new().add_slice(ip).ones_complement() != 0 {
            return false;
        }
    }
    pseudo_sum(&seg.net, tcp.len()).add_slice(tcp).ones_complement() == 0
}

/// Sets the checksum of the (option-less) IPv4 header after the Ethernet
/// header.
fn ipv4_header_checksum(frame: &mut [u8]) {
    frame[ETH_LEN + 10] = 0;
    frame[ETH_LEN + 11] = 0;
    let c = Sum16BitWords::new()
        .add_slice(&frame[ETH_LEN..ETH_LEN + 20])
        .ones_complement()
        .to_be();
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
}

/// Recompute the TCP (and IPv4 header) checksum of a frame in place.
/// `tcp_offset` is the offset of the TCP header. No-op on a malformed frame.
pub fn fix_checksums(frame: &mut [u8], net: &Net, tcp_offset: usize) {
    if frame.len() < tcp_offset + 20 {
        return;
    }
    if let Net::V4 { .. } = net {
        ipv4_header_checksum(frame);
    }
    frame[tcp_offset + 16] = 0;
    frame[tcp_offset + 17] = 0;
    let tcp = &frame[tcp_offset..];
    let c = pseudo_sum(net, tcp.len()).add_slice(tcp).ones_complement().to_be();
    frame[tcp_offset + 16..tcp_offset + 18].copy_from_slice(&c.to_be_bytes());
}

/// The IPv4 header checksum, and in the TCP checksum field the folded
/// pseudo-header sum only (not complemented), as Linux leaves a
/// `CHECKSUM_PARTIAL` segment: the device completes it over the segment.
pub fn partial_checksums(frame: &mut [u8], net: &Net, tcp_offset: usize) {
    let len = frame.len().saturating_sub(tcp_offset);
    partial_checksums_len(frame, net, tcp_offset, len);
}

/// As [`partial_checksums`] for a TCP segment of `len` bytes of which the
/// frame holds only the headers (the payload is written after it).
fn partial_checksums_len(frame: &mut [u8], net: &Net, tcp_offset: usize, len: usize) {
    if frame.len() < tcp_offset + 20 {
        return;
    }
    if let Net::V4 { .. } = net {
        ipv4_header_checksum(frame);
    }
    let folded = !pseudo_sum(net, len).ones_complement().to_be();
    frame[tcp_offset + 16..tcp_offset + 18].copy_from_slice(&folded.to_be_bytes());
}

/// Ones-complement sum of a byte region (used for incremental checksum updates).
fn region_sum(b: &[u8]) -> u16 {
    // `ones_complement` returns the complement; undo it to get the folded sum.
    // (`etherparse` sums native-endian words; `to_be` gives the numeric value.)
    (!Sum16BitWords::new().add_slice(b).ones_complement()).to_be()
}

/// Update a TCP checksum incrementally (RFC 1624) after the header bytes
/// `old` (even offset, same length) were replaced with `new`.
pub fn checksum_adjust(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    // HC' = ~(~HC + ~m + m')
    let mut sum: u32 = u32::from(!csum);
    sum += u32::from(!region_sum(old));
    sum += u32::from(region_sum(new));
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Description of a TCP segment to build.
#[derive(Clone, Debug)]
pub struct Build<'a> {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    /// Source/destination and header parameters of the IP layer.
    pub net: Net,
    pub ip_id: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamps: Option<(u32, u32)>,
    pub sack: &'a [(u32, u32)],
}

impl Build<'_> {
    /// Length of the TCP options this segment will carry (padded to 4).
    pub fn options_len(&self) -> usize {
        options_len(
            self.mss.is_some(),
            self.wscale.is_some(),
            self.sack_permitted,
            self.timestamps.is_some(),
            self.sack.len(),
        )
    }

    /// Build the frame with the payload given as up to two slices (e.g. the
    /// two halves of a ring buffer). Checksums are computed.
    pub fn to_frame(&self, p1: &[u8], p2: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        self.write_frame(&mut f, &[], p1, p2, None, false);
        f
    }

    /// [`Build::to_frame`] into `f` (cleared first; its allocation is
    /// reused, e.g. a frame given back with [`crate::Engine::recycle`]),
    /// with `extra` (whole options, a multiple of 4 bytes, e.g.
    /// [`RACC_MARK`]) after the other options (dropped if the options would
    /// exceed 40 bytes). With `partial` the TCP checksum field holds only
    /// the pseudo-header sum (virtio's `NEEDS_CSUM`: the device or the
    /// kernel completes it), so the payload is never summed here.
    /// `gathered`: the frame gets only the headers, sized (lengths and the
    /// partial checksum, which must be asked for) for a payload of that
    /// many bytes that the driver writes after it; `p1`/`p2` are ignored.
    pub fn write_frame(
        &self,
        f: &mut Vec<u8>,
        extra: &[u8],
        p1: &[u8],
        p2: &[u8],
        gathered: Option<usize>,
        partial: bool,
    ) {
        let (p1, p2, plen) = match gathered {
            Some(n) => (&[][..], &[][..], n),
            None => (p1, p2, p1.len() + p2.len()),
        };
        let extra = if extra.len().is_multiple_of(4) && self.options_len() + extra.len() <= 40 {
            extra
        } else {
            &[]
        };
        let olen = self.options_len() + extra.len();
        let iplen = self.net.header_len();
        let tcp_len = 20 + olen + plen;
        f.clear();
        f.reserve(ETH_LEN + iplen + tcp_len - plen + p1.len() + p2.len());
        f.extend_from_slice(&self.eth_dst);
        f.extend_from_slice(&self.eth_src);
        match self.net {
            Net::V4 { src, dst, tos, ttl, df } => {
                f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                f.push(0x45);
                f.push(tos);
                f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
                f.extend_from_slice(&self.ip_id.to_be_bytes());
                f.extend_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
                f.push(ttl);
                f.push(IPPROTO_TCP);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&src);
                f.extend_from_slice(&dst);
            }
            Net::V6 {
                src,
                dst,
                traffic_class,
                flow_label,
                hop_limit,
            } => {
                f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
                let w = (6u32 << 28) | (u32::from(traffic_class) << 20) | (flow_label & 0xfffff);
                f.extend_from_slice(&w.to_be_bytes());
                f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
                f.push(IPPROTO_TCP);
                f.push(hop_limit);
                f.extend_from_slice(&src);
                f.extend_from_slice(&dst);
            }
        }
        let tcp_offset = f.len();
        f.extend_from_slice(&self.src_port.to_be_bytes());
        f.extend_from_slice(&self.dst_port.to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.push((((20 + olen) / 4) as u8) << 4);
        f.push(self.flags);
        f.extend_from_slice(&self.window.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        // Options.
        if let Some(m) = self.mss {
            f.extend_from_slice(&[2, 4]);
            f.extend_from_slice(&m.to_be_bytes());
        }
        if let Some(w) = self.wscale {
            f.extend_from_slice(&[1, 3, 3, w]);
        }
        if self.sack_permitted {
            f.extend_from_slice(&[1, 1, 4, 2]);
        }
        if let Some((v, e)) = self.timestamps {
            f.extend_from_slice(&[1, 1, 8, 10]);
            f.extend_from_slice(&v.to_be_bytes());
            f.extend_from_slice(&e.to_be_bytes());
        }
        if !self.sack.is_empty() {
            let n = self.sack.len().min(MAX_SACK);
            f.extend_from_slice(&[1, 1, 5, (2 + 8 * n) as u8]);
            for &(l, r) in &self.sack[..n] {
                f.extend_from_slice(&l.to_be_bytes());
                f.extend_from_slice(&r.to_be_bytes());
            }
        }
        f.extend_from_slice(extra);
        debug_assert_eq!(f.len(), tcp_offset + 20 + olen);
        f.extend_from_slice(p1);
        f.extend_from_slice(p2);
        if gathered.is_some() || partial {
            partial_checksums_len(f, &self.net, tcp_offset, tcp_len);
        } else {
            fix_checksums(f, &self.net, tcp_offset);
        }
    }
}

/// remora's mark on the speculative ACKs the engine builds for the guest
/// ([`crate::Config::mark_acks`]): an RFC 6994 experimental TCP option
/// (kind 253, length 4, ExID 0x524d "RM"). RACC, remora's congestion
/// control for guests (crates/racc), fills the advertised window of a
/// socket whose ACKs carry it; every other TCP stack ignores it.
pub const RACC_MARK: [u8; 4] = [253, 4, 0x52, 0x4d];

/// Length of the options block built by [`Build::to_frame`].
pub fn options_len(mss: bool, ws: bool, sackp: bool, ts: bool, nsack: usize) -> usize {
    let mut n = 0;
    if mss {
        n += 4;
    }
    if ws {
        n += 4;
    }
    if sackp {
        n += 4;
    }
    if ts {
        n += 12;
    }
    if nsack > 0 {
        n += 4 + 8 * nsack.min(MAX_SACK);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(net: Net, payload: &[u8]) -> Vec<u8> {
        Build {
            eth_src: [2, 0, 0, 0, 0, 1],
            eth_dst: [2, 0, 0, 0, 0, 2],
            net,
            ip_id: 7,
            src_port: 1234,
            dst_port: 80,
            seq: 0xfffffff0,
            ack: 42,
            flags: flags::ACK | flags::PSH,
            window: 512,
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: Some((100, 200)),
            sack: &[(1, 2), (5, 9)],
        }
        .to_frame(payload, b"xyz")
    }

    fn v4() -> Net {
        Net::V4 {
            src: [10, 0, 0, 1],
            dst: [10, 0, 0, 2],
            tos: 0,
            ttl: 64,
            df: true,
        }
    }

    fn v6() -> Net {
        Net::V6 {
            src: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            dst: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            traffic_class: 0,
            flow_label: 0x12345,
            hop_limit: 64,
        }
    }

    #[test]
    fn build_parse_roundtrip_and_checksums() {
        for net in [v4(), v6()] {
            let f = sample(net, b"hello");
            let Parsed::Tcp(s) = parse(&f) else {
                panic!("not parsed")
            };
            assert_eq!(s.net, net);
            assert_eq!(s.seq, 0xfffffff0);
            assert_eq!(s.ack, 42);
            assert_eq!(s.payload, b"helloxyz");
            assert_eq!(s.opts.timestamps, Some((100, 200)));
            assert_eq!(s.opts.sack_blocks(), &[(1, 2), (5, 9)]);
            assert!(verify_checksums(&f, &s));
            // Cross-check the TCP checksum against etherparse's own routine.
            let tcp = TcpHeaderSlice::from_slice(&f[s.tcp_offset..]).unwrap();
            let want = match net {
                Net::V4 { src, dst, .. } => tcp.calc_checksum_ipv4_raw(src, dst, s.payload).unwrap(),
                Net::V6 { src, dst, .. } => tcp.calc_checksum_ipv6_raw(src, dst, s.payload).unwrap(),
            };
            assert_eq!(want, s.checksum);
            let mut bad = f.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            let Parsed::Tcp(s2) = parse(&bad) else { panic!() };
            assert!(!verify_checksums(&bad, &s2));
        }
    }

    /// A partial checksum completed as a device does (ones-complement sum
    /// from the TCP header on, with the pseudo-header sum in the field,
    /// complemented into the field) gives the full checksum, odd lengths too.
    #[test]
    fn partial_checksum_completed_by_a_device_is_the_full_one() {
        for net in [v4(), v6()] {
            for payload in [&b""[..], b"a", b"hello world", &[0xffu8; 1447][..]] {
                let b = Build {
                    eth_src: [2, 0, 0, 0, 0, 1],
                    eth_dst: [2, 0, 0, 0, 0, 2],
                    net,
                    ip_id: 9,
                    src_port: 1234,
                    dst_port: 80,
                    seq: 77,
                    ack: 42,
                    flags: flags::ACK,
                    window: 512,
                    mss: None,
                    wscale: None,
                    sack_permitted: false,
                    timestamps: Some((1, 2)),
                    sack: &[],
                };
                let full = b.to_frame(payload, b"z");
                let mut part = Vec::new();
                b.write_frame(&mut part, &[], payload, b"z", None, true);
                // Headers only, for a gather write of the same payload:
                // the same bytes once the payload follows.
                let mut gathered = Vec::new();
                b.write_frame(&mut gathered, &[], &[], &[], Some(payload.len() + 1), false);
                gathered.extend_from_slice(payload);
                gathered.extend_from_slice(b"z");
                assert_eq!(gathered, part, "gathered {net:?} payload {}", payload.len());
                let Parsed::Tcp(s) = parse(&full) else { panic!() };
                let off = s.tcp_offset;
                assert_eq!(full[..off + 16], part[..off + 16], "headers before the checksum differ");
                assert_ne!(full[off + 16..off + 18], part[off + 16..off + 18]);
                let folded = !Sum16BitWords::new().add_slice(&part[off..]).ones_complement();
                part[off + 16..off + 18].copy_from_slice(&(!folded).to_ne_bytes());
                assert_eq!(full, part, "{net:?} payload {}", payload.len());
            }
        }
    }

    #[test]
    fn incremental_checksum_matches_full() {
        for net in [v4(), v6()] {
            let mut f = sample(net, b"abcdefg");
            let Parsed::Tcp(s) = parse(&f) else { panic!() };
            let off = s.tcp_offset;
            let hl = s.tcp_header_len;
            let csum = s.checksum;
            let old: Vec<u8> = f[off..off + hl].to_vec();
            f[off + 8..off + 12].copy_from_slice(&0xdeadbeefu32.to_be_bytes());
            f[off + 14..off + 16].copy_from_slice(&7u16.to_be_bytes());
            let mut new = f[off..off + hl].to_vec();
            new[16] = 0;
            new[17] = 0;
            let mut oldz = old.clone();
            oldz[16] = 0;
            oldz[17] = 0;
            let c = checksum_adjust(csum, &oldz, &new);
            f[off + 16..off + 18].copy_from_slice(&c.to_be_bytes());
            let Parsed::Tcp(s2) = parse(&f) else { panic!() };
            assert!(verify_checksums(&f, &s2));
        }
    }

    #[test]
    fn malformed_options_and_truncation() {
        assert!(parse_options(&[2, 4, 5]).is_none());
        assert!(parse_options(&[3, 2]).is_none());
        assert!(parse_options(&[5, 7, 0, 0, 0, 0, 0]).is_none());
        assert!(parse_options(&[9, 0]).is_none());
        let o = parse_options(&[1, 1, 2, 4, 5, 0xb4, 3, 3, 7, 4, 2, 0]).unwrap();
        assert_eq!(o.mss, Some(1460));
        assert_eq!(o.wscale, Some(7));
        assert!(o.sack_permitted);
        let f = sample(v4(), b"hello");
        for n in 0..f.len() {
            // Truncated frames never panic; most are rejected.
            let _ = parse(&f[..n]);
        }
        assert!(matches!(parse(&f[..f.len() - 1]), Parsed::Other));
    }
}
