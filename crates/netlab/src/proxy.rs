//! A test-only TCP proxy that forwards byte-exactly, except for one byte
//! it flips on request: for proving that a receiver detects corruption
//! the TCP checksum let through (the replication stream's own checks).
//!
//! The proxy runs inside a namespace: it listens there, accepts one
//! connection at a time, connects to the target from there and copies
//! both ways (half-closes are passed on) until both directions end; then
//! it accepts the next. Offsets count the client-to-target bytes of all
//! connections together, from the proxy's start.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{NetlabError, Netns, Result};

const NONE: u64 = u64::MAX;

/// State shared between the proxy's handle and its threads.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Client-to-target bytes forwarded, over all connections.
    forwarded: AtomicU64,
    /// Offset armed for corruption, or `NONE`.
    armed: AtomicU64,
    /// Offset corrupted last, or `NONE`.
    corrupted: AtomicU64,
    connections: AtomicU64,
    /// The current connection's sockets (shut down to stop the copiers).
    live: Mutex<Vec<TcpStream>>,
}

/// A running proxy; dropping it closes its sockets and joins its threads.
pub struct CorruptProxy {
    shared: Arc<Shared>,
    local: SocketAddr,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl CorruptProxy {
    /// Listens on `listen` inside `ns` (port 0: any free port, see
    /// [`CorruptProxy::local_addr`]) and forwards each accepted connection
    /// to `target`, connected from inside `ns`.
    pub fn start(ns: &Netns, listen: SocketAddr, target: SocketAddr) -> Result<CorruptProxy> {
        let desc = format!("proxy listening on {listen} in {}", ns.name());
        let listener = ns
            .spawn_thread(move || {
                let l = TcpListener::bind(listen)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .join()
            .map_err(|_| NetlabError::Command {
                cmd: desc.clone(),
                stderr: "thread panicked".into(),
            })?
            .map_err(|source| NetlabError::Spawn { cmd: desc, source })?;
        let local = listener.local_addr().map_err(|source| NetlabError::Spawn {
            cmd: "proxy local_addr".into(),
            source,
        })?;
        let shared = Arc::new(Shared {
            armed: AtomicU64::new(NONE),
            corrupted: AtomicU64::new(NONE),
            ..Shared::default()
        });
        let s = shared.clone();
        // The accepting thread stays in `ns`: it connects to the target from there.
        let thread = ns.spawn_thread(move || accept_loop(listener, target, s));
        Ok(CorruptProxy {
            shared,
            local,
            thread: Some(thread),
        })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Arms a one-time corruption: the byte at client-to-target `offset`
    /// (or, if that was forwarded already, the next byte forwarded) is
    /// XORed with 0x01. Replaces an armed corruption that has not fired.
    pub fn corrupt_at(&self, offset: u64) {
        self.shared.armed.store(offset.min(NONE - 1), Ordering::Release);
    }

    /// The offset of the byte corrupted last, if any was.
    pub fn corrupted(&self) -> Option<u64> {
        match self.shared.corrupted.load(Ordering::Acquire) {
            NONE => None,
            o => Some(o),
        }
    }

    /// Client-to-target bytes forwarded so far, over all connections.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Acquire)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }
}

impl Drop for CorruptProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Ok(live) = self.shared.live.lock() {
            for s in live.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) => eprintln!("corrupt proxy: {e}"),
                Err(_) => eprintln!("corrupt proxy thread panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Waits up to `ms` for `fd` to become readable.
fn wait_readable(fd: &impl AsRawFd, ms: i32) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd for the call's duration.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

fn accept_loop(listener: TcpListener, target: SocketAddr, s: Arc<Shared>) -> io::Result<()> {
    while !s.stop.load(Ordering::Acquire) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                wait_readable(&listener, 20);
                continue;
            }
            Err(e) => return Err(e),
        };
        client.set_nonblocking(false)?;
        let server = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("corrupt proxy: connecting to {target}: {e}");
                continue; // Dropping `client` closes it.
            }
        };
        s.connections.fetch_add(1, Ordering::AcqRel);
        for c in [&client, &server] {
            c.set_nodelay(true)?;
        }
        {
            let mut live = s.live.lock().map_err(|_| io::Error::other("poisoned"))?;
            if s.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            *live = vec![client.try_clone()?, server.try_clone()?];
        }
        let (c2, t2) = (client.try_clone()?, server.try_clone()?);
        let s2 = s.clone();
        let up = std::thread::spawn(move || copy(client, server, Some(&s2)));
        let down = std::thread::spawn(move || copy(t2, c2, None));
        for t in [up, down] {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("corrupt proxy: {e}"),
                Err(_) => eprintln!("corrupt proxy copier panicked"),
            }
        }
        if let Ok(mut live) = s.live.lock() {
            live.clear();
        }
    }
    Ok(())
}

/// Copies `from` to `to` until `from`'s end, then half-closes `to`; on an
/// error closes both ways of both. `s` is set for the client-to-target
/// direction, which counts and corrupts.
fn copy(mut from: TcpStream, mut to: TcpStream, s: Option<&Shared>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let r = (|| loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.shutdown(Shutdown::Write),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(s) = s {
            let base = s.forwarded.load(Ordering::Acquire);
            let armed = s.armed.load(Ordering::Acquire);
            if armed != NONE
                && armed < base + n as u64
                && s.armed
                    .compare_exchange(armed, NONE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                let i = armed.saturating_sub(base) as usize;
                buf[i] ^= 0x01;
                s.corrupted.store(base + i as u64, Ordering::Release);
            }
            to.write_all(&buf[..n])?;
            s.forwarded.fetch_add(n as u64, Ordering::AcqRel);
        } else {
            to.write_all(&buf[..n])?;
        }
    })();
    if r.is_err() {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A target in `ns` on `port` that echoes nothing but returns all it
    /// read per connection, and replies with `reply` bytes to each.
    fn sink(ns: &Netns, port: u16, conns: usize, reply: Vec<u8>) -> JoinHandle<io::Result<Vec<Vec<u8>>>> {
        ns.spawn_thread(move || {
            let l = TcpListener::bind(("127.0.0.1", port))?;
            let mut all = Vec::new();
            for _ in 0..conns {
                let (mut c, _) = l.accept()?;
                c.write_all(&reply)?;
                let mut got = Vec::new();
                c.read_to_end(&mut got)?;
                all.push(got);
            }
            Ok(all)
        })
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect()
    }

    fn diffs(a: &[u8], b: &[u8]) -> Vec<(usize, u8)> {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, (x, y))| (i, x ^ y))
            .collect()
    }

    #[test]
    fn proxy_flips_exactly_one_byte_and_forwards_the_rest() {
        let ns = Netns::new("x").unwrap();
        let reply = pattern(3_000_000, 7);
        let srv = sink(&ns, 7200, 1, reply.clone());
        std::thread::sleep(Duration::from_millis(100));
        // A fixed port outside the ephemeral range: after the drop, a
        // connect to a freed ephemeral port could connect to itself.
        let proxy = CorruptProxy::start(
            &ns,
            "127.0.0.1:7204".parse().unwrap(),
            "127.0.0.1:7200".parse().unwrap(),
        )
        .unwrap();
        let addr = proxy.local_addr();
        assert_eq!(addr.port(), 7204);
        let off = 1_234_567u64;
        proxy.corrupt_at(off);
        let data = pattern(4_000_000, 1);
        let d2 = data.clone();
        let back = ns
            .spawn_thread(move || {
                let c = TcpStream::connect(addr)?;
                let mut w = c.try_clone()?;
                let t = std::thread::spawn(move || w.write_all(&d2).and_then(|_| w.shutdown(Shutdown::Write)));
                let mut got = Vec::new();
                (&c).read_to_end(&mut got)?;
                t.join().map_err(|_| io::Error::other("writer panicked"))??;
                Ok(got)
            })
            .join()
            .unwrap()
            .unwrap();
        let got = srv.join().unwrap().unwrap().remove(0);
        assert_eq!(diffs(&data, &got), vec![(off as usize, 0x01)]);
        assert!(back == reply, "target -> client stream altered");
        assert_eq!(proxy.corrupted(), Some(off));
        assert_eq!(proxy.forwarded(), data.len() as u64);
        assert_eq!(proxy.connections(), 1);
        drop(proxy);
        let refused = ns
            .spawn_thread(move || {
                Ok(TcpStream::connect(addr).err().map(|e| e.kind()) == Some(io::ErrorKind::ConnectionRefused))
            })
            .join()
            .unwrap()
            .unwrap();
        assert!(refused, "proxy still listening after drop");
    }

    #[test]
    fn a_past_offset_corrupts_the_next_byte_and_offsets_span_connections() {
        let ns = Netns::new("x").unwrap();
        let srv = sink(&ns, 7201, 2, Vec::new());
        std::thread::sleep(Duration::from_millis(100));
        let proxy = CorruptProxy::start(
            &ns,
            "127.0.0.1:7202".parse().unwrap(),
            "127.0.0.1:7201".parse().unwrap(),
        )
        .unwrap();
        // First connection: 1000 clean bytes.
        let first = pattern(1000, 3);
        let f2 = first.clone();
        ns.spawn_thread(move || TcpStream::connect("127.0.0.1:7202")?.write_all(&f2))
            .join()
            .unwrap()
            .unwrap();
        // Second connection, kept open while the corruption is armed.
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let cli = ns.spawn_thread(move || {
            let mut c = TcpStream::connect("127.0.0.1:7202")?;
            for chunk in rx {
                c.write_all(&chunk)?;
            }
            Ok(())
        });
        let second = pattern(3000, 5);
        tx.send(second[..500].to_vec()).unwrap();
        let t = std::time::Instant::now();
        while proxy.forwarded() < 1500 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "proxy stuck at {}",
                proxy.forwarded()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(proxy.corrupted(), None);
        proxy.corrupt_at(10); // Long gone: the next byte forwarded (1500) takes it.
        tx.send(second[500..].to_vec()).unwrap();
        drop(tx);
        cli.join().unwrap().unwrap();
        let got = srv.join().unwrap().unwrap();
        assert!(got[0] == first, "first connection altered");
        assert_eq!(diffs(&second, &got[1]), vec![(500, 0x01)]);
        assert_eq!(proxy.corrupted(), Some(1500));
        assert_eq!(proxy.forwarded(), 4000);
        assert_eq!(proxy.connections(), 2);
    }

    #[test]
    fn dropping_the_proxy_ends_a_live_connection() {
        let ns = Netns::new("x").unwrap();
        let srv = sink(&ns, 7203, 1, Vec::new());
        std::thread::sleep(Duration::from_millis(100));
        let proxy =
            CorruptProxy::start(&ns, "127.0.0.1:0".parse().unwrap(), "127.0.0.1:7203".parse().unwrap()).unwrap();
        let addr = proxy.local_addr();
        let (tx, rx) = mpsc::channel::<()>();
        let cli = ns.spawn_thread(move || {
            let mut c = TcpStream::connect(addr)?;
            c.write_all(b"abc")?;
            let _ = rx.recv();
            let mut b = [0u8; 1];
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            // The proxy closed the connection: end of stream, not a timeout.
            Ok(c.read(&mut b).map(|n| n == 0).unwrap_or(true))
        });
        let t = std::time::Instant::now();
        while proxy.forwarded() < 3 {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(proxy);
        assert!(t.elapsed() < Duration::from_secs(2), "drop blocked");
        tx.send(()).unwrap();
        assert!(cli.join().unwrap().unwrap(), "client connection still open");
        assert_eq!(srv.join().unwrap().unwrap(), vec![b"abc".to_vec()]);
    }
}
