//! Background capture of the frames entering a bridge, by port.
//!
//! One `AF_PACKET` socket, opened inside the bridge's namespace and bound
//! to no interface, sees every frame every interface of the namespace
//! receives; `PACKET_IGNORE_OUTGOING` hides the copies the bridge sends
//! out, and the receiving interface (`sll_ifindex`) names the port — the
//! host — the frame came from. A single socket keeps the frames in the
//! order the kernel received them; each is stamped with its kernel receive
//! time (`SO_TIMESTAMPNS`) mapped to an [`Instant`]. The socket has a
//! 256 MiB receive buffer; frames the kernel still had to drop are counted
//! ([`LanCapture::stop`] refuses to return an incomplete capture).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::{NetlabError, Netns, Result};

const SOL_PACKET: libc::c_int = 263;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_OUTGOING: u8 = 4;
const SO_TIMESTAMPNS: libc::c_int = 35;
/// Largest frame kept: a 64 KiB GSO frame with its Ethernet header.
pub(crate) const MAX_FRAME: usize = 65_536 + 14;
/// The socket's receive buffer (the kernel accounts twice this): room
/// for a backlog of a few thousand 64 KiB frames while the capture thread
/// catches up. Only a backlog uses memory.
const RCVBUF: libc::c_int = 256 << 20;
/// Bytes received of each frame at least: Ethernet, IPv4 and TCP headers
/// with options, for the summary.
const HEADERS: usize = 14 + 60 + 60;

/// The switch port a frame came in on, i.e. the host that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LanPort {
    Client,
    Primary,
    Backup,
}

/// The TCP/IPv4 headers of a captured frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSummary {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    /// The TCP flags byte (see the `FIN`.. `ACK` constants).
    pub flags: u8,
    /// Payload bytes (all segments' of a GSO frame).
    pub payload_len: usize,
    /// Offset of the payload in the frame.
    pub payload_offset: usize,
}

impl TcpSummary {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;

    pub fn is_syn(&self) -> bool {
        self.flags & Self::SYN != 0
    }
    pub fn is_fin(&self) -> bool {
        self.flags & Self::FIN != 0
    }
    pub fn is_rst(&self) -> bool {
        self.flags & Self::RST != 0
    }
    /// The sequence number just past this segment's payload (SYN and FIN
    /// count one each).
    pub fn end_seq(&self) -> u32 {
        let extra = u32::from(self.is_syn()) + u32::from(self.is_fin());
        self.seq.wrapping_add(self.payload_len as u32).wrapping_add(extra)
    }
}

/// One frame that entered the LAN switch.
#[derive(Debug, Clone)]
pub struct CapturedFrame {
    /// When the kernel received it on the switch port.
    pub at: Instant,
    /// The port it came in on.
    pub port: LanPort,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The EtherType (0x0800 IPv4, 0x0806 ARP, ...).
    pub ethertype: u16,
    /// The frame's whole length (a GSO frame counts all its segments).
    pub len: usize,
    /// The frame's first `min(len, snaplen)` bytes, from the Ethernet header.
    pub data: Vec<u8>,
    /// Its TCP/IPv4 headers, if it is a TCP/IPv4 frame.
    pub tcp: Option<TcpSummary>,
}

impl CapturedFrame {
    /// The TCP payload bytes that were kept (all of them unless the
    /// capture's snaplen cut the frame short).
    pub fn tcp_payload(&self) -> Option<&[u8]> {
        let t = self.tcp?;
        let end = (t.payload_offset + t.payload_len).min(self.data.len());
        Some(self.data.get(t.payload_offset..end).unwrap_or(&[]))
    }
}

/// Parses the TCP/IPv4 headers of the Ethernet frame `f` (`len` its whole
/// length, `f` possibly a prefix).
fn tcp_summary(f: &[u8], len: usize) -> Option<TcpSummary> {
    let be16 = |o: usize| -> Option<u16> { Some(u16::from_be_bytes(f.get(o..o + 2)?.try_into().ok()?)) };
    let be32 = |o: usize| -> Option<u32> { Some(u32::from_be_bytes(f.get(o..o + 4)?.try_into().ok()?)) };
    if be16(12)? != 0x0800 {
        return None;
    }
    let ip = 14;
    let vihl = *f.get(ip)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 || *f.get(ip + 9)? != 6 {
        return None;
    }
    // A non-first fragment has no TCP header.
    if be16(ip + 6)? & 0x1fff != 0 {
        return None;
    }
    // BIG TCP GSO frames carry 0 as the total length.
    let ip_len = match usize::from(be16(ip + 2)?) {
        0 => len.saturating_sub(ip),
        n => n,
    };
    let tcp = ip + ihl;
    let doff = usize::from(*f.get(tcp + 12)? >> 4) * 4;
    let addr = |o: usize| -> Option<Ipv4Addr> { Some(Ipv4Addr::from(be32(o)?)) };
    Some(TcpSummary {
        src: SocketAddrV4::new(addr(ip + 12)?, be16(tcp)?),
        dst: SocketAddrV4::new(addr(ip + 16)?, be16(tcp + 2)?),
        seq: be32(tcp + 4)?,
        ack: be32(tcp + 8)?,
        flags: *f.get(tcp + 13)?,
        payload_len: ip_len.saturating_sub(ihl + doff),
        payload_offset: tcp + doff,
    })
}

/// The frames captured and the kernel's count of frames dropped.
type Captured = (Vec<CapturedFrame>, u64);

/// A capture in progress; stops (and joins its thread) on drop.
pub struct LanCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Captured>>>,
}

impl LanCapture {
    /// Captures the frames `ns`'s interfaces `ports` (name, label) receive.
    pub(crate) fn start(ns: &Netns, ports: &[(&str, LanPort)], snaplen: usize) -> Result<LanCapture> {
        let names: Vec<(String, LanPort)> = ports.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        let desc = format!("packet socket in {}", ns.name());
        let (fd, index) = ns
            .spawn_thread(move || {
                let mut index = Vec::new();
                for (name, port) in names {
                    index.push((ifindex(&name)?, port));
                }
                Ok((capture_socket()?, index))
            })
            .join()
            .map_err(|_| NetlabError::Command {
                cmd: desc.clone(),
                stderr: "thread panicked".into(),
            })?
            .map_err(|source| NetlabError::Spawn { cmd: desc, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || capture_loop(fd, index, snaplen.min(MAX_FRAME), stop2));
        Ok(LanCapture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops capturing and returns the frames in the order the kernel
    /// received them (`at` non-decreasing). Frames still in flight toward the switch (queued in
    /// a qdisc, a TAP not yet read) when this is called are not included:
    /// wait for the traffic to settle first.
    ///
    /// # Panics
    ///
    /// If the kernel dropped frames because the capture fell behind (an
    /// incomplete capture could hide the frame a test looks for), or the
    /// capture failed; see [`LanCapture::stop_lossy`].
    pub fn stop(self) -> Vec<CapturedFrame> {
        match self.stop_lossy() {
            Ok((frames, 0)) => frames,
            Ok((frames, dropped)) => panic!(
                "LAN capture incomplete: the kernel dropped {dropped} frames ({} captured)",
                frames.len()
            ),
            Err(e) => panic!("LAN capture failed: {e}"),
        }
    }

    /// Stops capturing; returns the frames and how many frames the kernel
    /// dropped because the capture socket's buffer was full.
    pub fn stop_lossy(mut self) -> io::Result<(Vec<CapturedFrame>, u64)> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("capture thread panicked")),
            None => Ok((Vec::new(), 0)),
        }
    }
}

impl Drop for LanCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads an int from a valid pointer for the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// The index of interface `name` in the calling thread's namespace.
fn ifindex(name: &str) -> io::Result<i32> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("bad interface name"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string valid for the call.
    match unsafe { libc::if_nametoindex(cname.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i as i32),
    }
}

/// A packet socket receiving every frame of the calling thread's
/// namespace, not the ones sent, with kernel receive timestamps.
fn capture_socket() -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the returned fd is owned below.
    let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(&fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, SO_TIMESTAMPNS, 1)?;
    // Reset the drop counter (it counts from socket creation).
    packet_drops(&fd)?;
    Ok(fd)
}

/// Frames dropped since the last call (PACKET_STATISTICS resets on read).
fn packet_drops(fd: &OwnedFd) -> io::Result<u64> {
    let mut st = [0u32; 2]; // struct tpacket_stats { tp_packets, tp_drops }
    let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `st` and updates `len`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_PACKET,
            PACKET_STATISTICS,
            st.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    Ok(u64::from(st[1]))
}

/// Receives frames until `stop`, then drains what is queued and returns
/// the frames and the kernel's drop count.
fn capture_loop(
    fd: OwnedFd,
    index: Vec<(i32, LanPort)>,
    snaplen: usize,
    stop: Arc<AtomicBool>,
) -> io::Result<Captured> {
    let mut frames = Vec::new();
    // Each frame is received straight into its own buffer (one copy),
    // big enough for the kept prefix and the headers of the summary.
    let cap = snaplen.max(HEADERS);
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    loop {
        let stopping = stop.load(Ordering::Acquire);
        loop {
            let mut data: Vec<u8> = Vec::with_capacity(cap);
            // SAFETY: sockaddr_ll and msghdr are plain data; zero is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: cap,
            };
            // SAFETY: as above.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: recvmsg writes into the buffers `msg` points to, each
            // valid for its stated length for the call's duration; with
            // MSG_TRUNC it returns the frame's whole length but writes at
            // most `cap` bytes.
            let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            let (now_sys, now) = (SystemTime::now(), Instant::now());
            let len = n as usize;
            // SAFETY: recvmsg initialised the first min(len, cap) bytes.
            unsafe { data.set_len(len.min(cap)) };
            if sll.sll_pkttype == PACKET_OUTGOING || data.len() < 14 {
                continue;
            }
            let Some(&(_, port)) = index.iter().find(|(i, _)| *i == sll.sll_ifindex) else {
                continue;
            };
            // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk the
            // control buffer within msg_controllen.
            let stamp = unsafe { timestamp(&msg) };
            // A stamp in the future or absurdly old (not CLOCK_REALTIME):
            // the receive time will do.
            let age = stamp
                .and_then(|t| now_sys.duration_since(t).ok())
                .filter(|a| *a < Duration::from_secs(60))
                .unwrap_or(Duration::ZERO);
            let mac = |o: usize| -> [u8; 6] { data[o..o + 6].try_into().unwrap_or_default() };
            let (dst_mac, src_mac) = (mac(0), mac(6));
            let ethertype = u16::from_be_bytes([data[12], data[13]]);
            let tcp = tcp_summary(&data, len);
            data.truncate(snaplen);
            data.shrink_to_fit();
            frames.push(CapturedFrame {
                at: now.checked_sub(age).unwrap_or(now),
                port,
                dst_mac,
                src_mac,
                ethertype,
                len,
                data,
                tcp,
            });
        }
        if stopping {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd for the call's duration.
        unsafe { libc::poll(&mut pfd, 1, 10) };
    }
    let dropped = packet_drops(&fd)?;
    // The socket's queue is in arrival order up to cross-CPU races of a
    // few microseconds; make `at` non-decreasing.
    frames.sort_by_key(|f| f.at);
    Ok((frames, dropped))
}

/// The SCM_TIMESTAMPNS receive time in `msg`'s control data.
///
/// # Safety
///
/// `msg` must come from a successful recvmsg(2) with its control buffer
/// still alive.
unsafe fn timestamp(msg: &libc::msghdr) -> Option<SystemTime> {
    // SAFETY: per the caller, `msg` describes a valid control buffer.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: `c` points to a cmsghdr inside the control buffer.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == SO_TIMESTAMPNS {
            // SAFETY: an SCM_TIMESTAMPNS message carries a struct timespec.
            let ts: libc::timespec = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            return Some(SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
        // SAFETY: as above; CMSG_NXTHDR returns null past the end.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_summary_parses_a_segment() {
        let mut f = vec![0u8; 14 + 20 + 20 + 5];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&45u16.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 2]);
        f[30..34].copy_from_slice(&[10, 0, 0, 1]);
        f[34..36].copy_from_slice(&5000u16.to_be_bytes());
        f[36..38].copy_from_slice(&40000u16.to_be_bytes());
        f[38..42].copy_from_slice(&7u32.to_be_bytes());
        f[42..46].copy_from_slice(&9u32.to_be_bytes());
        f[46] = 5 << 4;
        f[47] = TcpSummary::PSH | TcpSummary::ACK;
        f[54..].copy_from_slice(b"hello");
        let t = tcp_summary(&f, f.len()).unwrap();
        assert_eq!(t.src, "10.0.0.2:5000".parse().unwrap());
        assert_eq!(t.dst, "10.0.0.1:40000".parse().unwrap());
        assert_eq!((t.seq, t.ack, t.payload_len, t.payload_offset), (7, 9, 5, 54));
        assert_eq!(t.end_seq(), 12);
        assert!(!t.is_syn() && !t.is_fin() && !t.is_rst());
        // A truncated prefix still gives the headers.
        assert_eq!(tcp_summary(&f[..54], f.len()), Some(t));
        f[23] = 17;
        assert_eq!(tcp_summary(&f, f.len()), None);
    }
}
