//! A userspace link emulator: delay, jitter, reordering, duplication and
//! loss between two interfaces of one namespace (this kernel has no netem).
//!
//! Frames are taken from each interface with an `AF_PACKET` socket and
//! sent out of the other. `PACKET_VNET_HDR` keeps GSO/checksum metadata
//! with every frame, so TSO-sized frames cross unchanged (no MTU errors,
//! no re-segmentation cost).

use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const MAX_FRAME: usize = 10 + 65_550;

/// What one direction of the link does to frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkProfile {
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from [0, jitter) per frame (reorders).
    pub jitter: Duration,
    /// Probability a frame skips the delay queue and goes out at once,
    /// overtaking those before it (netem-style reordering).
    pub reorder: f64,
    /// Probability a frame is sent twice.
    pub duplicate: f64,
    /// Probability a frame is dropped.
    pub loss: f64,
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub frames_in: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    pub frames_out: AtomicU64,
}

/// A running emulator; stops (and joins its threads) on drop.
pub struct LinkEmulator {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    /// a->b and b->a counters.
    pub counters: [Arc<LinkCounters>; 2],
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Err(e)) => eprintln!("link emulator: {e}"),
                Err(_) => eprintln!("link emulator thread panicked"),
                Ok(Ok(())) => {}
            }
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

/// A packet socket on `dev` with virtio-net headers, not seeing its own output.
fn packet_socket(dev: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the returned fd is owned below.
    let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for opt in [PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING] {
        // SAFETY: setsockopt reads an int from a valid pointer for the call.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_PACKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    // A burst (an epoch's output released at once) must reach the emulated
    // bottleneck queue instead of overflowing the socket's default 208 KiB.
    let big: libc::c_int = 64 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt reads an int from a valid pointer for the call.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&big as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    let cname = std::ffi::CString::new(dev).map_err(|_| io::Error::other("bad interface name"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string valid for the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid initial value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind reads a sockaddr_ll of the given size from a valid pointer.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

struct Pending {
    due: Instant,
    seq: u64,
    frame: Vec<u8>,
}
impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // Min-heap on (due, seq).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// xorshift64*: fast, seedable, good enough for link impairments.
struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn forward(
    from: OwnedFd,
    to: OwnedFd,
    p: LinkProfile,
    seed: u64,
    stop: Arc<AtomicBool>,
    c: Arc<LinkCounters>,
) -> io::Result<()> {
    let mut rng = Rng(seed | 1);
    let mut queue: BinaryHeap<Pending> = BinaryHeap::new();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        while queue.peek().is_some_and(|q| q.due <= now) {
            if let Some(q) = queue.pop() {
                // SAFETY: send(2) reads `q.frame` for its length; the fd is a bound packet socket.
                let rc = unsafe { libc::send(to.as_raw_fd(), q.frame.as_ptr().cast(), q.frame.len(), 0) };
                if rc >= 0 {
                    c.frames_out.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let wait_ms = match queue.peek() {
            Some(q) => q.due.saturating_duration_since(Instant::now()).as_millis().min(10) as i32,
            None => 10,
        };
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd for the call's duration.
        if unsafe { libc::poll(&mut pfd, 1, wait_ms) } <= 0 {
            continue;
        }
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
            c.frames_in.fetch_add(1, Ordering::Relaxed);
            if rng.unit() < p.loss {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = Instant::now();
            let copies = if rng.unit() < p.duplicate {
                c.duplicated.fetch_add(1, Ordering::Relaxed);
                2
            } else {
                1
            };
            for _ in 0..copies {
                let due = if rng.unit() < p.reorder {
                    c.reordered.fetch_add(1, Ordering::Relaxed);
                    now
                } else {
                    now + p.delay + p.jitter.mul_f64(rng.unit())
                };
                seq += 1;
                queue.push(Pending {
                    due,
                    seq,
                    frame: buf[..n as usize].to_vec(),
                });
            }
        }
    }
    Ok(())
}

impl super::Netns {
    /// Forwards frames between interfaces `a` and `b` of this namespace,
    /// applying `ab` to frames from `a` to `b` and `ba` the other way.
    pub fn link_emulator(&self, a: &str, b: &str, ab: LinkProfile, ba: LinkProfile) -> super::Result<LinkEmulator> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = [Arc::new(LinkCounters::default()), Arc::new(LinkCounters::default())];
        let (a2, b2) = (a.to_string(), b.to_string());
        let socks = self
            .spawn_thread(move || {
                Ok((
                    packet_socket(&a2)?,
                    packet_socket(&b2)?,
                    packet_socket(&b2)?,
                    packet_socket(&a2)?,
                ))
            })
            .join()
            .map_err(|_| super::NetlabError::Command {
                cmd: "link emulator setup".into(),
                stderr: "thread panicked".into(),
            })?
            .map_err(|source| super::NetlabError::Spawn {
                cmd: format!("packet sockets on {a} and {b}"),
                source,
            })?;
        let (a_rx, b_tx, b_rx, a_tx) = socks;
        let mut threads = Vec::new();
        for (from, to, p, seed, c) in [
            (a_rx, b_tx, ab, 0x9e37_79b9, &counters[0]),
            (b_rx, a_tx, ba, 0x7f4a_7c15, &counters[1]),
        ] {
            let (stop, c) = (stop.clone(), c.clone());
            threads.push(std::thread::spawn(move || forward(from, to, p, seed, stop, c)));
        }
        Ok(LinkEmulator {
            stop,
            threads,
            counters,
        })
    }
}
