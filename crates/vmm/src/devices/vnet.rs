//! virtio-net headers on TAP frames: completing offloaded checksums on the
//! way in, and describing large TCP frames as GSO on the way out.
//!
//! TAPs (the relay's, and the VMM's net devices) offer checksum and TSO offloads, so the kernel hands it
//! frames whose TCP/UDP checksum holds only the pseudo-header sum
//! (`NEEDS_CSUM`) and TCP frames of up to 64 KiB (GSO). The engine wants
//! complete checksums; the kernel wants frames longer than the MTU marked
//! as GSO with a partial checksum. Pure functions, tested without a TAP.

/// `struct virtio_net_hdr_v1` (with `num_buffers`), as the relay's TAPs use it.
pub const HDR_LEN: usize = 12;

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;

/// The fields of a virtio-net header the relay uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..10)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Ones'-complement sum of `b` (as big-endian 16-bit words, odd tail padded
/// with zero), not folded.
fn sum(b: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        // Sum 32-bit halves: carries accumulate in the upper bits of acc.
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Completes an offloaded checksum in place: with `NEEDS_CSUM` the field at
/// `csum_start + csum_offset` holds the pseudo-header sum, and the checksum
/// covers everything from `csum_start` to the end of the frame. Returns
/// false (frame untouched) if the header points outside the frame.
pub fn complete_checksum(frame: &mut [u8], hdr: &VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > frame.len() || start >= frame.len() {
        return false;
    }
    let c = !fold(sum(&frame[start..]));
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// What the engine should know of `frame`'s checksums, given the header it
/// came with: an offloaded checksum is completed in place (then verified
/// by construction), DATA_VALID means verified, anything else is complete
/// but unverified.
pub fn engine_checksum(frame: &mut [u8], hdr: &VnetHdr) -> remora_speculate::Checksum {
    use remora_speculate::Checksum;
    if hdr.flags & F_NEEDS_CSUM != 0 {
        if complete_checksum(frame, hdr) {
            Checksum::Verified
        } else {
            Checksum::Complete
        }
    } else if hdr.flags & F_DATA_VALID != 0 {
        Checksum::Verified
    } else {
        Checksum::Complete
    }
}

/// As [`engine_checksum`] for a frame from the guest (the engine's inner
/// side): a TCP frame whose offloaded checksum is the TCP one is handed
/// over as `Partial`, unsummed; the engine completes it only if the frame
/// itself goes on (a speculated segment's payload never needs it).
pub fn inner_checksum(frame: &mut [u8], hdr: &VnetHdr) -> remora_speculate::Checksum {
    if hdr.flags & F_NEEDS_CSUM != 0
        && hdr.csum_offset == 16
        && tcp_layout(frame).is_some_and(|(_, l3, _)| usize::from(hdr.csum_start) == ETH_LEN + l3)
    {
        return remora_speculate::Checksum::Partial;
    }
    engine_checksum(frame, hdr)
}

/// Where the TCP header of an Ethernet frame is: (ethertype, L3 header
/// length, TCP header length, IP payload length claimed by the header).
fn tcp_layout(frame: &[u8]) -> Option<(u16, usize, usize)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let l3 = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(frame.get(ETH_LEN)? & 0x0f) * 4;
            (ihl >= 20 && *frame.get(ETH_LEN + 9)? == PROTO_TCP).then_some(ihl)?
        }
        ETHERTYPE_IPV6 => (*frame.get(ETH_LEN + 6)? == PROTO_TCP).then_some(40)?,
        _ => return None,
    };
    let doff = usize::from(frame.get(ETH_LEN + l3 + 12)? >> 4) * 4;
    (doff >= 20 && ETH_LEN + l3 + doff <= frame.len()).then_some((ethertype, l3, doff))
}

/// The header to write `frame` (complete checksums) to a TAP with: plain if
/// it fits the MTU; a TCP frame longer than that becomes GSO with segments
/// of `mtu - headers` bytes and its checksum field is turned back into the
/// pseudo-header sum the kernel's segmentation expects. `None`: too long
/// and not TCP (the kernel would drop it).
/// `gso_size`, if given, is the segment size (else it follows from the MTU).
/// `partial`: the TCP checksum field already holds only the pseudo-header
/// sum (the engine's `Transmit::partial_csum`): the header asks the kernel
/// to complete it (`NEEDS_CSUM`) for frames within the MTU too.
/// `gathered`: payload bytes written after `frame` (which then holds the
/// headers only; the engine's `Transmit::held`).
pub fn header_for_output(
    frame: &mut [u8],
    gathered: usize,
    mtu: usize,
    gso_size: Option<u16>,
    partial: bool,
) -> Option<VnetHdr> {
    let total = frame.len() + gathered;
    if total <= ETH_LEN + mtu {
        if partial {
            if let Some((_, l3, _)) = tcp_layout(frame) {
                return Some(VnetHdr {
                    flags: F_NEEDS_CSUM,
                    csum_start: (ETH_LEN + l3) as u16,
                    csum_offset: 16,
                    ..VnetHdr::default()
                });
            }
        }
        return Some(VnetHdr::default());
    }
    let (ethertype, l3, doff) = tcp_layout(frame)?;
    let tcp_start = ETH_LEN + l3;
    let tcp_len = total - tcp_start;
    let by_mtu = mtu.checked_sub(l3 + doff).filter(|m| *m > 0)?;
    let mss = gso_size.map_or(by_mtu, |g| usize::from(g).clamp(1, by_mtu));
    let pseudo = match ethertype {
        ETHERTYPE_IPV4 => sum(&frame[ETH_LEN + 12..ETH_LEN + 20]) + u64::from(PROTO_TCP) + tcp_len as u64,
        _ => sum(&frame[ETH_LEN + 8..ETH_LEN + 40]) + u64::from(PROTO_TCP) + tcp_len as u64,
    };
    frame[tcp_start + 16..tcp_start + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
    Some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if ethertype == ETHERTYPE_IPV4 {
            GSO_TCPV4
        } else {
            GSO_TCPV6
        },
        hdr_len: (tcp_start + doff) as u16,
        gso_size: mss as u16,
        csum_start: tcp_start as u16,
        csum_offset: 16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet/IPv4/TCP frame with `payload` bytes, checksums complete.
    fn tcp4(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN + 20 + 32 + payload];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[ETH_LEN..];
        ip[0] = 0x45;
        let total = (20 + 32 + payload) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&[10, 7, 0, 2]);
        ip[16..20].copy_from_slice(&[10, 7, 0, 1]);
        let c = !fold(sum(&ip[..20]));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let t = ETH_LEN + 20;
        f[t..t + 2].copy_from_slice(&5201u16.to_be_bytes());
        f[t + 2..t + 4].copy_from_slice(&40000u16.to_be_bytes());
        f[t + 12] = 8 << 4;
        f[t + 13] = 0x18;
        for (i, b) in f[t + 32..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let tcp_len = f.len() - t;
        let pseudo = sum(&f[ETH_LEN + 12..ETH_LEN + 20]) + 6 + tcp_len as u64;
        let c = !fold(pseudo + sum(&f[t..]));
        f[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn tcp_ok(f: &[u8]) -> bool {
        let t = ETH_LEN + 20;
        let pseudo = sum(&f[ETH_LEN + 12..ETH_LEN + 20]) + 6 + (f.len() - t) as u64;
        fold(pseudo + sum(&f[t..])) == 0xffff
    }

    #[test]
    fn header_round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 86,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    #[test]
    fn partial_checksum_is_completed() {
        for payload in [0, 1, 7, 1448, 60_001] {
            let good = tcp4(payload);
            assert!(tcp_ok(&good));
            // What the kernel hands over: the pseudo-header sum in the field.
            let mut f = good.clone();
            let mut gso = f.clone();
            let hdr = header_for_output(&mut gso, 0, usize::MAX / 2, None, false).unwrap();
            assert_eq!(hdr, VnetHdr::default(), "fits: plain");
            let t = ETH_LEN + 20;
            let pseudo = fold(sum(&f[ETH_LEN + 12..ETH_LEN + 20]) + 6 + (f.len() - t) as u64);
            f[t + 16..t + 18].copy_from_slice(&pseudo.to_be_bytes());
            assert!(!tcp_ok(&f), "a partial checksum does not verify");
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: t as u16,
                csum_offset: 16,
                ..Default::default()
            };
            assert!(complete_checksum(&mut f, &hdr));
            assert_eq!(f, good, "payload {payload}");
        }
    }

    #[test]
    fn inner_tcp_partial_frames_are_left_to_the_engine() {
        use remora_speculate::Checksum;
        let t = ETH_LEN + 20;
        let partial = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: t as u16,
            csum_offset: 16,
            ..Default::default()
        };
        let mut f = tcp4(1000);
        f[t + 16] ^= 0xff;
        let before = f.clone();
        assert_eq!(inner_checksum(&mut f, &partial), Checksum::Partial);
        assert_eq!(f, before, "not summed");
        // An offload the engine could not complete itself (not the TCP
        // checksum field) is completed here, as for the outer side.
        let mut udp = tcp4(1000);
        udp[ETH_LEN + 9] = 17;
        let odd = VnetHdr {
            csum_offset: 6,
            ..partial
        };
        assert_eq!(inner_checksum(&mut udp, &odd), Checksum::Verified);
        let mut g = tcp4(1000);
        let shifted = VnetHdr {
            csum_start: t as u16 + 4,
            csum_offset: 12,
            ..partial
        };
        assert_eq!(inner_checksum(&mut g, &shifted), Checksum::Verified);
        // DATA_VALID and plain frames as engine_checksum says.
        let mut h = tcp4(10);
        let valid = VnetHdr {
            flags: F_DATA_VALID,
            ..Default::default()
        };
        assert_eq!(inner_checksum(&mut h, &valid), Checksum::Verified);
        assert_eq!(inner_checksum(&mut h, &VnetHdr::default()), Checksum::Complete);
    }

    #[test]
    fn bad_offsets_are_refused() {
        let mut f = tcp4(10);
        let before = f.clone();
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 60,
            csum_offset: 40,
            ..Default::default()
        };
        assert!(!complete_checksum(&mut f, &hdr));
        assert_eq!(f, before);
    }

    #[test]
    fn large_tcp_frame_becomes_gso_with_pseudo_sum() {
        let mut f = tcp4(10_000);
        let hdr = header_for_output(&mut f, 0, 1500, None, false).unwrap();
        assert_eq!(hdr.gso_type, GSO_TCPV4);
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!(hdr.gso_size, 1500 - 20 - 32);
        assert_eq!(hdr.hdr_len, (ETH_LEN + 20 + 32) as u16);
        // Completing it again (what the kernel's segmentation amounts to for
        // the whole frame) gives back a valid checksum.
        assert!(complete_checksum(&mut f, &hdr));
        assert!(tcp_ok(&f));
    }

    /// A frame within the MTU whose checksum the engine left partial gets
    /// NEEDS_CSUM at the TCP header; completing it as the kernel does gives
    /// a valid checksum.
    #[test]
    fn partial_frame_within_the_mtu_asks_the_kernel_for_its_checksum() {
        let mut f = tcp4(1000);
        let full = f.clone();
        let tcp_start = ETH_LEN + 20;
        let pseudo = sum(&f[ETH_LEN + 12..ETH_LEN + 20]) + u64::from(PROTO_TCP) + (f.len() - tcp_start) as u64;
        f[tcp_start + 16..tcp_start + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
        assert!(!tcp_ok(&f));
        let hdr = header_for_output(&mut f, 0, 1500, None, true).unwrap();
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!(hdr.gso_type, GSO_NONE);
        assert_eq!((hdr.csum_start, hdr.csum_offset), (tcp_start as u16, 16));
        assert!(complete_checksum(&mut f, &hdr));
        assert_eq!(f, full);
        // Without `partial` nothing is asked.
        let mut g = full.clone();
        assert_eq!(
            header_for_output(&mut g, 0, 1500, None, false),
            Some(VnetHdr::default())
        );
    }

    #[test]
    fn large_non_tcp_frame_is_refused() {
        let mut f = tcp4(10_000);
        f[ETH_LEN + 9] = 17;
        assert_eq!(header_for_output(&mut f, 0, 1500, None, false), None);
        let mut short = vec![0u8; 20];
        assert_eq!(
            header_for_output(&mut short, 0, 1500, None, false),
            Some(VnetHdr::default())
        );
        let mut f = tcp4(10_000);
        assert_eq!(
            header_for_output(&mut f, 0, 1500, Some(1000), false).map(|h| h.gso_size),
            Some(1000)
        );
        let mut f = tcp4(10_000);
        assert_eq!(
            header_for_output(&mut f, 0, 1500, Some(9000), false).map(|h| h.gso_size),
            Some(1448)
        );
    }
}
