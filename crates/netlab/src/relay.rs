//! The relay topology: a server namespace standing in for the protected
//! guest, `remora relay` bridging two TAPs in a relay namespace, and a
//! client namespace on the outer side, optionally behind a shaped WAN
//! namespace.
//!
//! ```text
//!  S (server, "guest")        R (relay)                                [W (wan)]               C (client)
//!  eth0 10.7.0.2/24 ==veth== vs ─ bri ─ ti ⇄ remora relay ⇄ to ─ bro ─ vc ==veth== x0 ⇄ x1 ==veth== eth0 10.7.0.1/24
//! ```
//!
//! Without shaping `vc` is the client's `eth0`'s veth peer and there is no
//! W. With shaping, W forwards between `x0` (relay side) and `x1` (client
//! side) through the userspace link emulator when the profile asks for
//! delay, jitter, reordering, duplication or emulator loss, and through a
//! kernel bridge otherwise; `tbf` (rate, bottleneck queue) and BPF random
//! loss sit on the egress of `x1` (toward the client) and `x0` (toward the
//! relay). TSO/GSO stay on everywhere: the relay uses vnet_hdr offloads.

use std::path::Path;
use std::process::Command;

use crate::emu::{LinkEmulator, LinkProfile};
use crate::{Netns, Result};

/// The server's ("guest's") address, on the inner side of the relay.
pub const RELAY_SERVER_IP: &str = "10.7.0.2";
/// The client's address, on the outer side of the relay.
pub const RELAY_CLIENT_IP: &str = "10.7.0.1";
/// Name of the relay's inner (guest-side) TAP in the relay namespace.
pub const INNER_TAP: &str = "ti";
/// Name of the relay's outer (network-side) TAP in the relay namespace.
pub const OUTER_TAP: &str = "to";

/// How the WAN namespace between the relay and the client shapes traffic.
#[derive(Debug, Clone)]
pub struct Shaping {
    /// `tbf` rate in both directions (e.g. "1gbit"); `None`: no tbf.
    pub rate: Option<String>,
    /// `tbf` burst (e.g. "128kb").
    pub burst: String,
    /// `tbf` queue limit in bytes (the bottleneck buffer).
    pub queue_bytes: u64,
    /// Emulator profile of frames toward the client (relay -> client).
    pub to_client: LinkProfile,
    /// Emulator profile of frames toward the relay (client -> relay).
    pub to_relay: LinkProfile,
    /// BPF random loss (percent) of frames leaving W toward the client.
    pub loss_to_client: f64,
    /// BPF random loss (percent) of frames leaving W toward the relay.
    pub loss_to_relay: f64,
}

impl Default for Shaping {
    fn default() -> Self {
        Shaping {
            rate: None,
            burst: "128kb".into(),
            queue_bytes: 1 << 20,
            to_client: LinkProfile::default(),
            to_relay: LinkProfile::default(),
            loss_to_client: 0.0,
            loss_to_relay: 0.0,
        }
    }
}

impl Shaping {
    /// A `rate` link (tbf both ways) with a bottleneck queue of `queue_bytes`.
    pub fn rate(rate: &str, queue_bytes: u64) -> Shaping {
        Shaping {
            rate: Some(rate.into()),
            queue_bytes,
            ..Shaping::default()
        }
    }

    /// Adds `one_way` of fixed delay in both directions (link emulator).
    pub fn delay(mut self, one_way: std::time::Duration) -> Shaping {
        self.to_client.delay = one_way;
        self.to_relay.delay = one_way;
        self
    }

    /// Drops `percent` % of the frames toward the client (BPF on egress).
    pub fn loss_to_client(mut self, percent: f64) -> Shaping {
        self.loss_to_client = percent;
        self
    }

    fn needs_emulator(&self) -> bool {
        let busy = |p: &LinkProfile| {
            !p.delay.is_zero() || !p.jitter.is_zero() || p.reorder > 0.0 || p.duplicate > 0.0 || p.loss > 0.0
        };
        busy(&self.to_client) || busy(&self.to_relay)
    }
}

/// The relay topology (see the module documentation). Everything is
/// removed on drop, also while a failing test unwinds; the relay process
/// itself is the caller's (start it with [`RelayLan::relay_command`]).
pub struct RelayLan {
    /// The emulator (if any) stops before its namespace goes away.
    pub emulator: Option<LinkEmulator>,
    /// S: the protected side ("guest"), `eth0` = [`RELAY_SERVER_IP`]/24.
    pub server: Netns,
    /// R: the relay's namespace with bridges `bri` {vs, ti} and `bro` {to, vc}.
    pub relay: Netns,
    /// W: the shaped WAN between the relay and the client, if any.
    pub wan: Option<Netns>,
    /// C: the peer, `eth0` = [`RELAY_CLIENT_IP`]/24.
    pub client: Netns,
    /// The inner TAP's name in `relay` ([`INNER_TAP`]).
    pub inner_tap: String,
    /// The outer TAP's name in `relay` ([`OUTER_TAP`]).
    pub outer_tap: String,
    pub server_ip: &'static str,
    pub client_ip: &'static str,
}

/// `ip link add <a> type veth peer name <b> netns <ns>` inside `from`.
fn veth(from: &Netns, a: &str, b: &str, to: &Netns) -> Result<()> {
    from.ip(&["link", "add", a, "type", "veth", "peer", "name", b, "netns", to.name()])?;
    Ok(())
}

impl RelayLan {
    /// Builds the topology; `shaping` adds the WAN namespace.
    pub fn new(tag: &str, shaping: Option<Shaping>) -> Result<RelayLan> {
        let server = Netns::new(&format!("{tag}s"))?;
        let relay = Netns::new(&format!("{tag}r"))?;
        let client = Netns::new(&format!("{tag}c"))?;
        let wan = match shaping {
            Some(_) => Some(Netns::new(&format!("{tag}w"))?),
            None => None,
        };
        let mut lan = RelayLan {
            emulator: None,
            server,
            relay,
            wan,
            client,
            inner_tap: INNER_TAP.into(),
            outer_tap: OUTER_TAP.into(),
            server_ip: RELAY_SERVER_IP,
            client_ip: RELAY_CLIENT_IP,
        };
        let r = &lan.relay;
        // Inner side: S.eth0 <-> vs on bri, with the inner TAP.
        veth(r, "vs", "eth0", &lan.server)?;
        r.ip(&["link", "add", "name", "bri", "type", "bridge"])?;
        r.ip(&["tuntap", "add", "dev", INNER_TAP, "mode", "tap", "vnet_hdr"])?;
        r.ip(&["link", "set", "dev", "vs", "master", "bri", "up"])?;
        r.ip(&["link", "set", "dev", INNER_TAP, "master", "bri", "up"])?;
        r.ip(&["link", "set", "dev", "bri", "up"])?;
        // Outer side: the outer TAP and vc on bro.
        r.ip(&["link", "add", "name", "bro", "type", "bridge"])?;
        r.ip(&["tuntap", "add", "dev", OUTER_TAP, "mode", "tap", "vnet_hdr"])?;
        r.ip(&["link", "set", "dev", OUTER_TAP, "master", "bro", "up"])?;
        match (&lan.wan, &shaping) {
            (Some(w), Some(sh)) => {
                veth(r, "vc", "x0", w)?;
                veth(w, "x1", "eth0", &lan.client)?;
                w.ip(&["link", "set", "dev", "x0", "up"])?;
                w.ip(&["link", "set", "dev", "x1", "up"])?;
                if let Some(rate) = &sh.rate {
                    w.tbf("x1", rate, &sh.burst, sh.queue_bytes)?;
                    w.tbf("x0", rate, &sh.burst, sh.queue_bytes)?;
                }
                if sh.loss_to_client > 0.0 {
                    w.random_loss("x1", sh.loss_to_client)?;
                }
                if sh.loss_to_relay > 0.0 {
                    w.random_loss("x0", sh.loss_to_relay)?;
                }
                if sh.needs_emulator() {
                    lan.emulator = Some(w.link_emulator("x0", "x1", sh.to_client, sh.to_relay)?);
                } else {
                    w.ip(&["link", "add", "name", "bw", "type", "bridge"])?;
                    w.ip(&["link", "set", "dev", "x0", "master", "bw"])?;
                    w.ip(&["link", "set", "dev", "x1", "master", "bw"])?;
                    w.ip(&["link", "set", "dev", "bw", "up"])?;
                }
            }
            _ => veth(r, "vc", "eth0", &lan.client)?,
        }
        let r = &lan.relay;
        r.ip(&["link", "set", "dev", "vc", "master", "bro", "up"])?;
        r.ip(&["link", "set", "dev", "bro", "up"])?;
        for (ns, ip) in [(&lan.server, RELAY_SERVER_IP), (&lan.client, RELAY_CLIENT_IP)] {
            // No IPv6 chatter (router/neighbour solicitations, MLD) through the relay.
            ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
            ns.sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "dev", "eth0", "up"])?;
        }
        Ok(lan)
    }

    /// `ip netns exec R <remora> relay --inner-tap ti --outer-tap to`; add
    /// the mode and the rest.
    pub fn relay_command(&self, remora: &Path) -> Command {
        let mut c = self.relay.command(&remora.to_string_lossy());
        c.args(["relay", "--inner-tap", &self.inner_tap, "--outer-tap", &self.outer_tap]);
        c
    }

    /// Sets the default TCP congestion control of the two endpoints (S and
    /// C). A namespace other than the host's may only pick one of the
    /// host's `tcp_allowed_congestion_control`; use [`set_tcp_congestion`]
    /// on each socket (as root) for any available one.
    pub fn set_congestion_control(&self, cc: &str) -> Result<()> {
        self.server.sysctl("net/ipv4/tcp_congestion_control", cc)?;
        self.client.sysctl("net/ipv4/tcp_congestion_control", cc)
    }
}

/// Sets the congestion control of one TCP socket (`TCP_CONGESTION`); as
/// root any of `tcp_available_congestion_control` may be chosen.
pub fn set_tcp_congestion(sock: &impl std::os::fd::AsRawFd, cc: &str) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `cc.len()` bytes from a live string.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The congestion control of one TCP socket.
pub fn tcp_congestion(sock: &impl std::os::fd::AsRawFd) -> std::io::Result<String> {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let b = &buf[..(len as usize).min(buf.len())];
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    Ok(String::from_utf8_lossy(&b[..end]).into_owned())
}

impl Netns {
    /// Writes `value` to /proc/sys/`key` (e.g. "net/ipv4/tcp_congestion_control")
    /// as seen from inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{key}");
        let value = value.to_string();
        let desc = format!("write {value} to {path} in {}", self.name());
        let r = self.spawn_thread(move || std::fs::write(&path, value)).join();
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(crate::NetlabError::Spawn { cmd: desc, source }),
            Err(_) => Err(crate::NetlabError::Command {
                cmd: desc,
                stderr: "thread panicked".into(),
            }),
        }
    }

    /// Reads /proc/sys/`key` as seen from inside this namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{key}");
        let desc = format!("read {path} in {}", self.name());
        match self.spawn_thread(move || std::fs::read_to_string(&path)).join() {
            Ok(Ok(v)) => Ok(v.trim().to_string()),
            Ok(Err(source)) => Err(crate::NetlabError::Spawn { cmd: desc, source }),
            Err(_) => Err(crate::NetlabError::Command {
                cmd: desc,
                stderr: "thread panicked".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{exists, open_tap};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A stand-in for `remora relay --mode direct`: copies frames (with
    /// their vnet headers) between the two TAPs until dropped.
    struct DumbRelay {
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Drop for DumbRelay {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn dumb_relay(lan: &RelayLan) -> DumbRelay {
        let (a, b) = (lan.inner_tap.clone(), lan.outer_tap.clone());
        let (i, o) = lan
            .relay
            .spawn_thread(move || Ok((open_tap(&a)?, open_tap(&b)?)))
            .join()
            .unwrap()
            .expect("open TAPs");
        let (i2, o2) = (i.try_clone().unwrap(), o.try_clone().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(i, o), (o2, i2)] {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 70_000];
                while !stop.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd: from.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: poll(2) on one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                        continue;
                    }
                    // SAFETY: read(2) into `buf`, at most its length.
                    let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n > 0 {
                        // SAFETY: write(2) of the `n` bytes just read.
                        unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n as usize) };
                    }
                }
            }));
        }
        DumbRelay { stop, threads }
    }

    /// Sends `len` bytes server -> client and `len` client -> server at
    /// once; returns (handshake time, both streams intact).
    fn exchange(lan: &RelayLan, port: u16, len: usize) -> (Duration, bool) {
        let data: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let d2 = data.clone();
        let srv = lan.server.spawn_thread(move || {
            let l = TcpListener::bind(("0.0.0.0", port))?;
            let (c, _) = l.accept()?;
            let mut w = c.try_clone()?;
            let t = std::thread::spawn(move || w.write_all(&d2).and_then(|_| w.shutdown(std::net::Shutdown::Write)));
            let mut got = Vec::new();
            (&c).read_to_end(&mut got)?;
            t.join().map_err(|_| std::io::Error::other("writer panicked"))??;
            Ok(got)
        });
        std::thread::sleep(Duration::from_millis(100));
        let d3 = data.clone();
        let ip = lan.server_ip;
        let (rtt, from_server) = lan
            .client
            .spawn_thread(move || {
                let t0 = Instant::now();
                let c = TcpStream::connect((ip, port))?;
                let rtt = t0.elapsed();
                let mut w = c.try_clone()?;
                let t =
                    std::thread::spawn(move || w.write_all(&d3).and_then(|_| w.shutdown(std::net::Shutdown::Write)));
                let mut got = Vec::new();
                (&c).read_to_end(&mut got)?;
                t.join().map_err(|_| std::io::Error::other("writer panicked"))??;
                Ok((rtt, got))
            })
            .join()
            .unwrap()
            .expect("client");
        let to_server = srv.join().unwrap().expect("server");
        (rtt, from_server == data && to_server == data)
    }

    #[test]
    fn relay_lan_builds_and_cleans_up() {
        let lan = RelayLan::new("y", Some(Shaping::rate("1gbit", 1 << 20).loss_to_client(0.5))).unwrap();
        for tap in [INNER_TAP, OUTER_TAP] {
            let out = lan.relay.ip(&["-d", "link", "show", "dev", tap]).unwrap();
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(s.contains("vnet_hdr on") && s.contains("persist on"), "{s}");
        }
        let out = lan.wan.as_ref().unwrap().ip(&["link", "show", "master", "bw"]).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("x1"));
        let names: Vec<String> = [&lan.server, &lan.relay, &lan.client, lan.wan.as_ref().unwrap()]
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        assert_eq!(lan.server.sysctl_get("net/ipv6/conf/all/disable_ipv6").unwrap(), "1");
        lan.set_congestion_control("reno").unwrap();
        assert_eq!(
            lan.client.sysctl_get("net/ipv4/tcp_congestion_control").unwrap(),
            "reno"
        );
        let cc = lan
            .client
            .spawn_thread(|| {
                let l = TcpListener::bind("127.0.0.1:0")?;
                set_tcp_congestion(&l, "cubic")?;
                tcp_congestion(&l)
            })
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(cc, "cubic");
        drop(lan);
        for n in names {
            assert!(!exists(&n), "{n} left behind");
        }
    }

    #[test]
    fn frames_cross_between_the_taps() {
        let lan = RelayLan::new("z", None).unwrap();
        let _r = dumb_relay(&lan);
        let (_, ok) = exchange(&lan, 5101, 8 << 20);
        assert!(ok, "streams corrupted through the TAP pair");
    }

    #[test]
    fn the_wan_delays_both_ways() {
        let d = Duration::from_millis(20);
        let lan = RelayLan::new("q", Some(Shaping::default().delay(d))).unwrap();
        assert!(lan.emulator.is_some());
        let _r = dumb_relay(&lan);
        let (rtt, ok) = exchange(&lan, 5102, 2 << 20);
        assert!(ok, "streams corrupted through the emulated WAN");
        assert!(rtt >= 2 * d, "handshake took {rtt:?}, the WAN adds {:?}", 2 * d);
    }
}
