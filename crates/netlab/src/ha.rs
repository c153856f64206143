//! The replication topology: a client and two hosts (primary, backup) on
//! one LAN, and a separate replication link between the hosts.
//!
//! ```text
//!  client ns:  eth0 10.0.0.1/24 ==veth== clan ─┐
//!                                              │ lan ns: bridge br0 (the LAN switch)
//!  primary ns: br0 { tap0, vlan0 } ==veth== plan ─┤
//!  backup ns:  br0 { tap0, vlan0 } ==veth== blan ─┘
//!  primary ns: repl0 192.168.100.1/24 ==veth== backup ns: repl0 192.168.100.2/24
//! ```
//!
//! The guest takes [`crate::GUEST_IP`] (10.0.0.2/24) on `tap0` of whichever host
//! runs it: the test starts the VMM in `primary` (`primary.command(...)`
//! or `primary.spawn(...)`), the backup process runs in `backup` and
//! resumes the guest on its own `tap0`. Both TAPs are persistent, with
//! vnet headers, and the same name ([`HaLan::tap`]). The LAN switch learns
//! MACs like a real one: after a failover, frames for the guest keep
//! going to the primary's port until the backup's guest sends something
//! (an announcement) that the switch sees.
//!
//! The replication link can be cut (every packet dropped by a BPF filter
//! on `repl0`'s egress, one direction or both; the link stays up, so no
//! route changes and no RST) and shaped (`tbf`). IPv6 is off in all four
//! namespaces so the hosts add no chatter to the LAN. [`HaLan::capture_lan`]
//! records every frame entering the LAN switch with the port (host) it
//! came from.
//!
//! [`HaLan::new_fenced`] adds a fence network: an `etcd` namespace with a
//! bridge `fbr0` holding [`ETCD_IPS`], reached from each host's `fence0`
//! ([`PRIMARY_FENCE_IP`], [`BACKUP_FENCE_IP`]); either host can be cut
//! from it on its own ([`HaLan::cut_fence`]).
//!
//! Everything is removed on drop, also while a failing test unwinds.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::capture::{LanCapture, LanPort};
use crate::{Netns, Result};

/// The primary host's address on the replication link.
pub const PRIMARY_REPL_IP: &str = "192.168.100.1";
/// The backup host's address on the replication link.
pub const BACKUP_REPL_IP: &str = "192.168.100.2";
/// The replication link's interface, in both host namespaces.
pub const REPL_DEV: &str = "repl0";
/// The guest's TAP, in both host namespaces.
pub const HA_TAP: &str = "tap0";
/// The hosts' interface to the fence network.
pub const FENCE_DEV: &str = "fence0";
/// The primary host's address on the fence network.
pub const PRIMARY_FENCE_IP: &str = "192.168.101.1";
/// The backup host's address on the fence network.
pub const BACKUP_FENCE_IP: &str = "192.168.101.2";
/// Addresses for etcd members in the fence namespace (up to three).
pub const ETCD_IPS: [&str; 3] = ["192.168.101.10", "192.168.101.11", "192.168.101.12"];

/// Which way of the replication link to cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Packets from the primary to the backup (dropped on the primary's
    /// `repl0` egress).
    PrimaryToBackup,
    /// Packets from the backup to the primary (dropped on the backup's
    /// `repl0` egress).
    BackupToPrimary,
    /// Both ways.
    Both,
}

/// The replication topology (see the module documentation).
pub struct HaLan {
    /// `eth0` = [`crate::CLIENT_IP`]/24 on the LAN.
    pub client: Netns,
    /// The LAN switch: bridge `br0` with ports `clan`, `plan`, `blan`.
    pub lan: Netns,
    /// The primary host: `br0` { `tap0`, `vlan0` }, `repl0` = [`PRIMARY_REPL_IP`]/24.
    pub primary: Netns,
    /// The backup host: `br0` { `tap0`, `vlan0` }, `repl0` = [`BACKUP_REPL_IP`]/24.
    pub backup: Netns,
    /// The guest's TAP's name in `primary` and in `backup` ([`HA_TAP`]).
    pub tap: String,
    /// Cut state: [primary -> backup, backup -> primary].
    cut: [AtomicBool; 2],
    /// The fence network's namespace (etcd runs here), if any.
    pub fence: Option<Netns>,
}

/// A host of the topology (for the fence network's cuts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Primary,
    Backup,
}

/// `ip link add <a> type veth peer name <b> netns <to>` inside `from`.
fn veth(from: &Netns, a: &str, b: &str, to: &Netns) -> Result<()> {
    from.ip(&["link", "add", a, "type", "veth", "peer", "name", b, "netns", to.name()])?;
    Ok(())
}

impl HaLan {
    /// Builds the topology; `tag` (short: namespace names are at most 12
    /// characters) goes into the namespaces' names.
    pub fn new(tag: &str) -> Result<HaLan> {
        let ha = HaLan {
            client: Netns::new(&format!("{tag}c"))?,
            lan: Netns::new(&format!("{tag}l"))?,
            primary: Netns::new(&format!("{tag}p"))?,
            backup: Netns::new(&format!("{tag}b"))?,
            tap: HA_TAP.to_string(),
            cut: [AtomicBool::new(false), AtomicBool::new(false)],
            fence: None,
        };
        for ns in [&ha.client, &ha.lan, &ha.primary, &ha.backup] {
            ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
            ns.sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
        }
        let lan = &ha.lan;
        lan.ip(&["link", "add", "name", "br0", "type", "bridge"])?;
        veth(lan, "clan", "eth0", &ha.client)?;
        for (host, port) in [(&ha.primary, "plan"), (&ha.backup, "blan")] {
            veth(lan, port, "vlan0", host)?;
            host.ip(&["link", "add", "name", "br0", "type", "bridge"])?;
            host.ip(&["tuntap", "add", "dev", HA_TAP, "mode", "tap", "vnet_hdr"])?;
            host.ip(&["link", "set", "dev", HA_TAP, "master", "br0", "up"])?;
            host.ip(&["link", "set", "dev", "vlan0", "master", "br0", "up"])?;
            host.ip(&["link", "set", "dev", "br0", "up"])?;
        }
        for port in ["clan", "plan", "blan"] {
            lan.ip(&["link", "set", "dev", port, "master", "br0", "up"])?;
        }
        lan.ip(&["link", "set", "dev", "br0", "up"])?;
        ha.client
            .ip(&["addr", "add", &format!("{}/24", crate::CLIENT_IP), "dev", "eth0"])?;
        ha.client.ip(&["link", "set", "dev", "eth0", "up"])?;
        veth(&ha.primary, REPL_DEV, REPL_DEV, &ha.backup)?;
        for (host, ip) in [(&ha.primary, PRIMARY_REPL_IP), (&ha.backup, BACKUP_REPL_IP)] {
            host.ip(&["addr", "add", &format!("{ip}/24"), "dev", REPL_DEV])?;
            host.ip(&["link", "set", "dev", REPL_DEV, "up"])?;
        }
        Ok(ha)
    }

    /// [`HaLan::new`] plus the fence network (see the module documentation).
    pub fn new_fenced(tag: &str) -> Result<HaLan> {
        let mut ha = HaLan::new(tag)?;
        let f = Netns::new(&format!("{tag}e"))?;
        f.sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
        f.sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
        f.ip(&["link", "add", "name", "fbr0", "type", "bridge"])?;
        for (host, port, ip) in [
            (&ha.primary, "pfence", PRIMARY_FENCE_IP),
            (&ha.backup, "bfence", BACKUP_FENCE_IP),
        ] {
            veth(&f, port, FENCE_DEV, host)?;
            f.ip(&["link", "set", "dev", port, "master", "fbr0", "up"])?;
            host.ip(&["addr", "add", &format!("{ip}/24"), "dev", FENCE_DEV])?;
            host.ip(&["link", "set", "dev", FENCE_DEV, "up"])?;
        }
        for ip in ETCD_IPS {
            f.ip(&["addr", "add", &format!("{ip}/24"), "dev", "fbr0"])?;
        }
        f.ip(&["link", "set", "dev", "fbr0", "up"])?;
        ha.fence = Some(f);
        Ok(ha)
    }

    fn host(&self, h: Host) -> &Netns {
        match h {
            Host::Primary => &self.primary,
            Host::Backup => &self.backup,
        }
    }

    /// Cuts `host` from the fence network (its packets to etcd dropped).
    pub fn cut_fence(&self, host: Host) -> Result<()> {
        self.host(host).cut_egress(FENCE_DEV)
    }

    /// Undoes [`HaLan::cut_fence`].
    pub fn heal_fence(&self, host: Host) -> Result<()> {
        self.host(host).heal_egress(FENCE_DEV)
    }

    /// The host namespaces sending in `dir`, with their cut-state index.
    fn senders(&self, dir: Direction) -> Vec<(&Netns, usize)> {
        match dir {
            Direction::PrimaryToBackup => vec![(&self.primary, 0)],
            Direction::BackupToPrimary => vec![(&self.backup, 1)],
            Direction::Both => vec![(&self.primary, 0), (&self.backup, 1)],
        }
    }

    /// Drops every packet on the replication link in `dir` (adds to an
    /// earlier cut) until [`HaLan::heal_replication`]. Established TCP
    /// connections see silence, not a reset; packets already queued by
    /// [`HaLan::shape_replication`]'s `tbf` still arrive.
    pub fn cut_replication(&self, dir: Direction) -> Result<()> {
        for (ns, i) in self.senders(dir) {
            ns.cut_egress(REPL_DEV)?;
            self.cut[i].store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Lets packets through both ways of the replication link again.
    pub fn heal_replication(&self) -> Result<()> {
        for (ns, i) in self.senders(Direction::Both) {
            ns.heal_egress(REPL_DEV)?;
            self.cut[i].store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Whether packets in `dir` are being dropped (for `Both`: either way).
    pub fn replication_cut(&self, dir: Direction) -> bool {
        self.senders(dir)
            .iter()
            .any(|&(_, i)| self.cut[i].load(Ordering::Acquire))
    }

    /// Shapes both ways of the replication link with `tbf`: `rate` like
    /// "1gbit", `burst` like "64kb", `limit_bytes` the bottleneck queue.
    pub fn shape_replication(&self, rate: &str, burst: &str, limit_bytes: u64) -> Result<()> {
        self.primary.tbf(REPL_DEV, rate, burst, limit_bytes)?;
        self.backup.tbf(REPL_DEV, rate, burst, limit_bytes)
    }

    /// Changes the `tbf` of [`HaLan::shape_replication`] (both ways) in
    /// place: what it holds stays queued, so the connection across the
    /// link sees no loss (use this to end a slow period:
    /// [`HaLan::unshape_replication`] drops the queue).
    pub fn reshape_replication(&self, rate: &str, burst: &str, limit_bytes: u64) -> Result<()> {
        self.primary.tbf_change(REPL_DEV, rate, burst, limit_bytes)?;
        self.backup.tbf_change(REPL_DEV, rate, burst, limit_bytes)
    }

    /// Removes [`HaLan::shape_replication`]'s `tbf` (both ways); packets it
    /// still holds are dropped.
    pub fn unshape_replication(&self) -> Result<()> {
        for ns in [&self.primary, &self.backup] {
            let out = ns.exec("tc", &["qdisc", "show", "dev", REPL_DEV, "root"])?;
            if String::from_utf8_lossy(&out.stdout).contains("tbf") {
                ns.exec("tc", &["qdisc", "del", "dev", REPL_DEV, "root"])?;
            }
        }
        Ok(())
    }

    /// Starts recording every frame entering the LAN switch, with the
    /// port it came in on, until [`LanCapture::stop`]. Frames are whole
    /// (a GSO frame up to 64 KiB is one frame); see
    /// [`HaLan::capture_lan_snaplen`] to keep only a prefix of each. Stop
    /// or drop the capture before the `HaLan`: its socket keeps the LAN
    /// namespace alive.
    pub fn capture_lan(&self) -> Result<LanCapture> {
        self.capture_lan_snaplen(crate::capture::MAX_FRAME)
    }

    /// Like [`HaLan::capture_lan`], keeping the first `snaplen` bytes of
    /// each frame (the TCP summary is taken from the whole frame).
    pub fn capture_lan_snaplen(&self, snaplen: usize) -> Result<LanCapture> {
        LanCapture::start(
            &self.lan,
            &[
                ("clan", LanPort::Client),
                ("plan", LanPort::Primary),
                ("blan", LanPort::Backup),
            ],
            snaplen,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CapturedFrame;
    use crate::tests::exists;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// Whether a TCP connection from `from` to `ip:port` (a listener in
    /// `to`) is established and carries one byte each way within `timeout`.
    fn tcp_ok(from: &Netns, to: &Netns, ip: &str, port: u16, timeout: Duration) -> bool {
        let srv = to.spawn_thread(move || {
            let l = TcpListener::bind(("0.0.0.0", port))?;
            l.set_nonblocking(true)?;
            let deadline = Instant::now() + timeout + Duration::from_millis(300);
            while Instant::now() < deadline {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false)?;
                        c.set_read_timeout(Some(timeout))?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b)?;
                        c.write_all(&b)?;
                        return Ok(true);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(false)
        });
        std::thread::sleep(Duration::from_millis(50));
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let ok = from
            .spawn_thread(move || {
                let mut c = TcpStream::connect_timeout(&addr, timeout)?;
                c.set_read_timeout(Some(timeout))?;
                c.write_all(b"h")?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)?;
                Ok(b == *b"h")
            })
            .join()
            .unwrap()
            .unwrap_or(false);
        let _ = srv.join();
        ok
    }

    /// The MAC address of `dev` in `ns`.
    fn mac(ns: &Netns, dev: &str) -> [u8; 6] {
        let out = ns.ip(&["link", "show", "dev", dev]).unwrap();
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        let hex = s
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC in {s}"));
        let mut m = [0u8; 6];
        for (i, b) in hex.split(':').enumerate() {
            m[i] = u8::from_str_radix(b, 16).unwrap();
        }
        m
    }

    #[test]
    fn ha_lan_connects_cuts_heals_captures_and_cleans_up() {
        let ha = HaLan::new("h").unwrap();
        for host in [&ha.primary, &ha.backup] {
            let out = host.ip(&["-d", "link", "show", "dev", &ha.tap]).unwrap();
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(s.contains("vnet_hdr on") && s.contains("persist on"), "{s}");
            assert!(s.contains("master br0"), "{s}");
        }
        // Stand-ins for the guest: an address on each host's bridge.
        ha.primary.ip(&["addr", "add", "10.0.0.3/24", "dev", "br0"]).unwrap();
        ha.backup.ip(&["addr", "add", "10.0.0.4/24", "dev", "br0"]).unwrap();
        let (client_mac, primary_mac, backup_mac) =
            (mac(&ha.client, "eth0"), mac(&ha.primary, "br0"), mac(&ha.backup, "br0"));

        let t0 = Instant::now();
        let cap = ha.capture_lan().unwrap();
        let s = Duration::from_secs(2);
        assert!(
            tcp_ok(&ha.client, &ha.primary, "10.0.0.3", 7001, s),
            "client -> primary side"
        );
        assert!(
            tcp_ok(&ha.client, &ha.backup, "10.0.0.4", 7002, s),
            "client -> backup side"
        );
        assert!(
            tcp_ok(&ha.backup, &ha.client, crate::CLIENT_IP, 7003, s),
            "backup side -> client"
        );
        std::thread::sleep(Duration::from_millis(50));
        let frames = cap.stop();
        let t1 = Instant::now();

        assert!(!frames.is_empty());
        assert!(
            frames.iter().all(|f| f.at >= t0 && f.at <= t1),
            "timestamps outside the capture"
        );
        assert!(frames.windows(2).all(|w| w[0].at <= w[1].at), "frames out of order");
        let from = |m: [u8; 6]| -> Vec<&CapturedFrame> { frames.iter().filter(|f| f.src_mac == m).collect() };
        for (m, port, ip) in [
            (client_mac, LanPort::Client, crate::CLIENT_IP),
            (primary_mac, LanPort::Primary, "10.0.0.3"),
            (backup_mac, LanPort::Backup, "10.0.0.4"),
        ] {
            let fs = from(m);
            assert!(fs.iter().all(|f| f.port == port), "{port:?}'s frames on another port");
            assert!(fs.iter().any(|f| f.ethertype == 0x0806), "no ARP from {port:?}");
            let tcp: Vec<_> = fs.iter().filter_map(|f| f.tcp).collect();
            assert!(
                tcp.iter().all(|t| t.src.ip().to_string() == ip),
                "{port:?} sent TCP from another address"
            );
            assert!(tcp.iter().any(|t| t.is_syn()), "no SYN from {port:?}");
        }
        // The one data byte each way, summarised and in the frame.
        let data: Vec<_> = frames
            .iter()
            .filter(|f| f.tcp.is_some_and(|t| t.dst.port() == 7001 && t.payload_len == 1))
            .collect();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].port, LanPort::Client);
        assert_eq!(data[0].tcp_payload(), Some(&b"h"[..]));
        assert_eq!(data[0].len, data[0].data.len());

        // The replication link, cut and healed each way.
        let (p, b) = (&ha.primary, &ha.backup);
        let s = Duration::from_secs(1);
        assert!(
            tcp_ok(p, b, BACKUP_REPL_IP, 7010, s),
            "replication link primary -> backup"
        );
        assert!(
            tcp_ok(b, p, PRIMARY_REPL_IP, 7011, s),
            "replication link backup -> primary"
        );
        for (i, dir) in [Direction::PrimaryToBackup, Direction::BackupToPrimary, Direction::Both]
            .into_iter()
            .enumerate()
        {
            let port = 7020 + 4 * i as u16;
            ha.cut_replication(dir).unwrap();
            assert!(ha.replication_cut(dir));
            assert!(!tcp_ok(p, b, BACKUP_REPL_IP, port, s), "{dir:?} cut: p -> b connected");
            assert!(
                !tcp_ok(b, p, PRIMARY_REPL_IP, port + 1, s),
                "{dir:?} cut: b -> p connected"
            );
            ha.heal_replication().unwrap();
            assert!(!ha.replication_cut(Direction::Both));
            assert!(tcp_ok(p, b, BACKUP_REPL_IP, port + 2, s), "{dir:?} healed: p -> b");
            assert!(tcp_ok(b, p, PRIMARY_REPL_IP, port + 3, s), "{dir:?} healed: b -> p");
        }
        // The LAN is untouched by a replication cut.
        ha.cut_replication(Direction::Both).unwrap();
        assert!(tcp_ok(&ha.client, &ha.primary, "10.0.0.3", 7040, s));
        ha.heal_replication().unwrap();
        ha.heal_replication().unwrap();

        ha.shape_replication("100mbit", "64kb", 256 * 1024).unwrap();
        let out = p.exec("tc", &["qdisc", "show", "dev", REPL_DEV]).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("tbf"));
        assert!(tcp_ok(p, b, BACKUP_REPL_IP, 7041, s), "shaped link carries traffic");
        ha.reshape_replication("1gbit", "64kb", 512 * 1024).unwrap();
        let out = p.exec("tc", &["qdisc", "show", "dev", REPL_DEV]).unwrap();
        let shown = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(shown.contains("tbf") && shown.contains("rate 1Gbit"), "{shown}");
        assert!(tcp_ok(p, b, BACKUP_REPL_IP, 7042, s), "reshaped link carries traffic");
        ha.unshape_replication().unwrap();
        let out = p.exec("tc", &["qdisc", "show", "dev", REPL_DEV]).unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("tbf"));

        let names: Vec<String> = [&ha.client, &ha.lan, &ha.primary, &ha.backup]
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        drop(ha);
        for n in names {
            assert!(!exists(&n), "{n} left behind");
        }
    }

    #[test]
    fn an_established_connection_stalls_across_a_cut_and_resumes() {
        let ha = HaLan::new("s").unwrap();
        let srv = ha.backup.spawn_thread(|| {
            let l = TcpListener::bind(("0.0.0.0", 7100))?;
            let (mut c, _) = l.accept()?;
            let mut got = Vec::new();
            c.read_to_end(&mut got)?;
            Ok(got)
        });
        std::thread::sleep(Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let cli = ha.primary.spawn_thread(move || {
            let mut c = TcpStream::connect((BACKUP_REPL_IP, 7100))?;
            for chunk in rx {
                c.write_all(&chunk)?;
            }
            Ok(())
        });
        tx.send(vec![1; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        ha.cut_replication(Direction::PrimaryToBackup).unwrap();
        tx.send(vec![2; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        ha.heal_replication().unwrap();
        tx.send(vec![3; 1000]).unwrap();
        drop(tx);
        cli.join().unwrap().unwrap();
        let got = srv.join().unwrap().unwrap();
        let want: Vec<u8> = [vec![1; 1000], vec![2; 1000], vec![3; 1000]].concat();
        assert!(got == want, "stream damaged across a cut ({} bytes)", got.len());
    }

    #[test]
    fn capture_keeps_whole_frames_of_a_bulk_stream() {
        let ha = HaLan::new("k").unwrap();
        ha.primary.ip(&["addr", "add", "10.0.0.3/24", "dev", "br0"]).unwrap();
        let data: Vec<u8> = (0..50_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let len = data.len();
        let cap = ha.capture_lan().unwrap();
        let srv = ha.primary.spawn_thread(|| {
            let l = TcpListener::bind(("0.0.0.0", 7300))?;
            let (mut c, _) = l.accept()?;
            let mut n = 0usize;
            let mut b = vec![0u8; 1 << 16];
            loop {
                match c.read(&mut b)? {
                    0 => return Ok(n),
                    k => n += k,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let d2 = data.clone();
        ha.client
            .spawn_thread(move || TcpStream::connect("10.0.0.3:7300")?.write_all(&d2))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(srv.join().unwrap().unwrap(), len);
        std::thread::sleep(Duration::from_millis(50));
        let frames = cap.stop();
        // Reassemble the client's stream from the captured segments.
        let segs: Vec<_> = frames
            .iter()
            .filter(|f| f.tcp.is_some_and(|t| t.dst.port() == 7300))
            .collect();
        assert!(segs.iter().all(|f| f.port == LanPort::Client));
        let isn = segs.iter().find_map(|f| f.tcp.filter(|t| t.is_syn())).unwrap().seq;
        let mut got = vec![0u8; len];
        let mut seen = vec![false; len];
        for f in &segs {
            let (t, p) = (f.tcp.unwrap(), f.tcp_payload().unwrap());
            assert_eq!(p.len(), t.payload_len, "frame cut short");
            let off = t.seq.wrapping_sub(isn).wrapping_sub(1) as usize;
            if !p.is_empty() {
                got[off..off + p.len()].copy_from_slice(p);
                seen[off..off + p.len()].iter_mut().for_each(|s| *s = true);
            }
        }
        assert!(seen.iter().all(|&s| s), "stream bytes missing from the capture");
        assert!(got == data, "captured payload differs from the stream");
    }

    /// A gratuitous ARP for [`crate::GUEST_IP`] from `mac`, behind a zero
    /// virtio-net header, as a guest's announcement comes out of a TAP.
    fn garp(mac: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; 10];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[10, 0, 0, 2]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 0, 2]);
        f.resize(10 + 60, 0);
        f
    }

    #[test]
    fn guest_frames_from_either_tap_are_attributed_to_their_host() {
        use std::os::fd::AsRawFd;
        let ha = HaLan::new("g").unwrap();
        let guest = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let open = |ns: &Netns| {
            let tap = ha.tap.clone();
            ns.spawn_thread(move || crate::tests::open_tap(&tap))
                .join()
                .unwrap()
                .unwrap()
        };
        let (ptap, btap) = (open(&ha.primary), open(&ha.backup));
        std::thread::sleep(Duration::from_millis(100));
        let cap = ha.capture_lan().unwrap();
        let write = |fd: &std::os::fd::OwnedFd| {
            let f = garp(guest);
            // SAFETY: write(2) of a live buffer to an open TAP.
            let n = unsafe { libc::write(fd.as_raw_fd(), f.as_ptr().cast(), f.len()) };
            assert_eq!(n, f.len() as isize);
        };
        write(&ptap);
        std::thread::sleep(Duration::from_millis(20));
        write(&btap);
        // The client's ARP request for the guest floods to both TAPs.
        ha.client
            .spawn_thread(|| {
                std::net::UdpSocket::bind("0.0.0.0:0")?.send_to(b"x", (crate::GUEST_IP, 9))?;
                Ok(())
            })
            .join()
            .unwrap()
            .unwrap();
        for fd in [&ptap, &btap] {
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut arp = false;
            while !arp && Instant::now() < deadline {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll(2) on one valid pollfd; read(2) into `buf`.
                if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
                    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    // vnet header (10), then an ARP request for the guest's address.
                    arp = n >= 52 && buf[22..24] == [8, 6] && buf[48..52] == [10, 0, 0, 2];
                }
            }
            assert!(arp, "the client's ARP request did not reach a TAP");
        }
        std::thread::sleep(Duration::from_millis(50));
        let frames = cap.stop();
        let ports: Vec<LanPort> = frames.iter().filter(|f| f.src_mac == guest).map(|f| f.port).collect();
        assert_eq!(ports, vec![LanPort::Primary, LanPort::Backup]);
        assert!(frames
            .iter()
            .any(|f| f.port == LanPort::Client && f.ethertype == 0x0806 && f.dst_mac == [0xff; 6]));
    }
}
