//! Network topologies in Linux network namespaces for tests and
//! benchmarks.
//!
//! Every namespace gets a unique name (`rm<tag><pid><counter>`, short
//! enough for interface names too), and everything is removed when its
//! owner is dropped — also while a failing test unwinds. Links can be
//! shaped: rate and bottleneck queue with `tbf`, random loss or a total
//! cut with a classic BPF filter on clsact egress (this host has neither
//! netem nor clang), delay, jitter, reordering and duplication with the
//! userspace link emulator ([`emu`]).
//!
//! Topologies: [`VmLan`] (a client and one VM host on a bridge),
//! [`RelayLan`] (the relay between two TAPs, optionally behind a shaped
//! WAN) and [`HaLan`], the replication topology: a client, a primary and
//! a backup host on one LAN switch, each host with its guest TAP on a
//! local bridge, and a replication link between the hosts that tests can
//! cut (per direction) and shape. [`HaLan::capture_lan`] records every
//! frame entering the LAN switch with the host it came from, to check
//! which host emitted the guest's frames and that no uncommitted output
//! escaped. [`CorruptProxy`] is a TCP proxy flipping exactly one byte of
//! a stream at a chosen offset, to prove corruption is detected.
//! [`process`] sends the process faults (SIGKILL, SIGSTOP/SIGCONT) and
//! reads a thread's scheduler state to aim them.

pub mod capture;
pub mod emu;
pub mod etcd;
pub mod ha;
pub mod http;
pub mod process;
pub mod proxy;
pub mod relay;

pub use capture::{CapturedFrame, LanCapture, LanPort, TcpSummary};
pub use etcd::EtcdCluster;
pub use ha::{
    Direction, HaLan, Host, BACKUP_FENCE_IP, BACKUP_REPL_IP, ETCD_IPS, FENCE_DEV, HA_TAP, PRIMARY_FENCE_IP,
    PRIMARY_REPL_IP, REPL_DEV,
};
pub use proxy::CorruptProxy;
pub use relay::{
    set_tcp_congestion, tcp_congestion, RelayLan, Shaping, INNER_TAP, OUTER_TAP, RELAY_CLIENT_IP, RELAY_SERVER_IP,
};

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Errors setting up a topology.
#[derive(Debug, thiserror::Error)]
pub enum NetlabError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, NetlabError>;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique on this host for this process: `<tag><pid36><n36>`.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("rm{tag}{}{}", base36(std::process::id()), base36(n));
    name.chars().take(12).collect()
}

fn base36(mut v: u32) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// Runs a command to completion, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| NetlabError::Spawn {
        cmd: desc.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetlabError::Command {
            cmd: desc,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// A network namespace, deleted on drop together with the processes this
/// value started in it.
pub struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn new(tag: &str) -> Result<Netns> {
        sweep_orphans();
        let name = unique_name(tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        // Who owns it: a test killed before its drop ran (SIGKILL, a
        // timeout) leaves the namespace, and the next one created on this
        // host removes it.
        let _ = std::fs::create_dir_all(OWNERS);
        let _ = std::fs::write(owner_file(&name), std::process::id().to_string());
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `program ARGS` in the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program).args(args))
    }

    /// Starts a process in the namespace; it is killed (by PID) and reaped
    /// when the namespace is dropped, unless waited for before.
    pub fn spawn(&mut self, mut cmd: Command) -> Result<&mut Child> {
        let desc = format!("{cmd:?}");
        let child = cmd.spawn().map_err(|source| NetlabError::Spawn { cmd: desc, source })?;
        self.children.push(child);
        let last = self.children.len() - 1;
        Ok(&mut self.children[last])
    }

    /// Runs `f` on a new thread inside this namespace (its sockets belong
    /// to the namespace), returning its join handle.
    pub fn spawn_thread<T, F>(&self, f: F) -> std::thread::JoinHandle<std::io::Result<T>>
    where
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path)?;
            enter_netns(&file)?;
            f()
        })
    }

    /// Rate limit and bottleneck queue on `dev`'s egress: `rate` like
    /// "1gbit", `burst` like "64kb", `limit_bytes` the queue in bytes.
    pub fn tbf(&self, dev: &str, rate: &str, burst: &str, limit_bytes: u64) -> Result<()> {
        let limit = limit_bytes.to_string();
        run(Command::new("tc").args([
            "-n", &self.name, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "limit",
            &limit,
        ]))?;
        Ok(())
    }

    /// Changes the rate, burst and queue limit of [`Netns::tbf`]'s qdisc on
    /// `dev` in place (`tc qdisc change`): the packets it holds stay
    /// queued, none is dropped (deleting or replacing the qdisc would drop
    /// them, which a TCP connection across the link sees as a loss).
    pub fn tbf_change(&self, dev: &str, rate: &str, burst: &str, limit_bytes: u64) -> Result<()> {
        let limit = limit_bytes.to_string();
        run(Command::new("tc").args([
            "-n", &self.name, "qdisc", "change", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "limit",
            &limit,
        ]))?;
        Ok(())
    }

    /// Drops each packet leaving `dev` with probability `percent` / 100,
    /// with a classic BPF filter on clsact egress (replacing an earlier
    /// `random_loss` on `dev`).
    pub fn random_loss(&self, dev: &str, percent: f64) -> Result<()> {
        self.egress_filter(dev, LOSS_PREF, &loss_program(percent))
    }

    /// Drops every packet leaving `dev` (a BPF egress filter evaluated
    /// before [`Netns::random_loss`]'s) until [`Netns::heal_egress`]. The
    /// link stays up: no route changes, no carrier loss, no RST; the
    /// peers just stop hearing each other. Packets already queued in a
    /// root qdisc (`tbf`) still leave.
    pub fn cut_egress(&self, dev: &str) -> Result<()> {
        self.egress_filter(dev, CUT_PREF, &cbpf(&[(BPF_RET_K, 0, 0, TC_ACT_SHOT)]))
    }

    /// Removes [`Netns::cut_egress`]'s filter from `dev`, if there is one.
    pub fn heal_egress(&self, dev: &str) -> Result<()> {
        let pref = CUT_PREF.to_string();
        let show = Command::new("tc")
            .args(["-n", &self.name, "filter", "show", "dev", dev, "egress", "pref", &pref])
            .output();
        match show {
            Ok(o) if o.status.success() && !o.stdout.is_empty() => {
                run(Command::new("tc").args(["-n", &self.name, "filter", "del", "dev", dev, "egress", "pref", &pref]))?;
                Ok(())
            }
            // No clsact qdisc or no such filter: nothing is cut.
            _ => Ok(()),
        }
    }

    /// Installs (or replaces) the direct-action classic BPF program `prog`
    /// (`tc` bytecode syntax) at priority `pref` on `dev`'s clsact egress.
    fn egress_filter(&self, dev: &str, pref: u32, prog: &str) -> Result<()> {
        let pref = pref.to_string();
        run(Command::new("tc").args(["-n", &self.name, "qdisc", "replace", "dev", dev, "clsact"]))?;
        run(Command::new("tc").args([
            "-n",
            &self.name,
            "filter",
            "replace",
            "dev",
            dev,
            "egress",
            "pref",
            &pref,
            "handle",
            "1",
            "bpf",
            "direct-action",
            "bytecode",
            prog,
        ]))?;
        Ok(())
    }
}

/// clsact egress priority of [`Netns::cut_egress`]'s filter (runs first).
const CUT_PREF: u32 = 1;
/// clsact egress priority of [`Netns::random_loss`]'s filter.
const LOSS_PREF: u32 = 49152;

// Classic BPF, as cls_bpf runs it in direct-action mode: the program's
// return value is the TC action. No compiler needed (this host has no
// clang), and SKF_AD_RANDOM gives a per-packet random number.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const SKF_AD_RANDOM: u32 = 0xffff_f000 + 56;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// `tc ... bpf bytecode` text of a classic BPF program.
fn cbpf(insns: &[(u16, u8, u8, u32)]) -> String {
    let mut s = format!("{},", insns.len());
    for (code, jt, jf, k) in insns {
        s.push_str(&format!("{code} {jt} {jf} {k},"));
    }
    s
}

/// The program dropping each packet with probability `percent` / 100.
fn loss_program(percent: f64) -> String {
    let thresh = (percent / 100.0 * 4_294_967_296.0).round();
    if thresh >= 4_294_967_296.0 {
        return cbpf(&[(BPF_RET_K, 0, 0, TC_ACT_SHOT)]);
    }
    if thresh <= 0.0 || thresh.is_nan() {
        return cbpf(&[(BPF_RET_K, 0, 0, TC_ACT_OK)]);
    }
    // A = random u32; drop iff A < thresh.
    cbpf(&[
        (BPF_LD_W_ABS, 0, 0, SKF_AD_RANDOM),
        (BPF_JGE_K, 1, 0, thresh as u32),
        (BPF_RET_K, 0, 0, TC_ACT_SHOT),
        (BPF_RET_K, 0, 0, TC_ACT_OK),
    ])
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(owner_file(&self.name));
    }
}

/// Where each namespace this crate creates records its owner's PID.
const OWNERS: &str = "/run/remora-netlab";

fn owner_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(OWNERS).join(name)
}

/// Deletes namespaces whose owner process is gone (killed before it could
/// clean up). A live owner, or a PID that cannot be read, keeps its
/// namespace.
fn sweep_orphans() {
    let Ok(dir) = std::fs::read_dir(OWNERS) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks that the PID exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Moves the calling thread into the network namespace `file` refers to.
fn enter_netns(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on a valid open namespace fd; it only changes this
    // thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The LAN a VM sits on: a `client` namespace whose `eth0` (10.0.0.1/24)
/// is a veth into a bridge `br0` in a `host` namespace; the VM's TAP
/// (persistent, with vnet headers, named `tap0`) is on the same bridge.
/// Run the VMM inside `host` (`host.command(...)`), the guest takes
/// 10.0.0.2/24.
pub struct VmLan {
    pub client: Netns,
    pub host: Netns,
    pub tap: String,
}

/// The client's address on the guest's LAN ([`VmLan`], [`HaLan`]).
pub const CLIENT_IP: &str = "10.0.0.1";
/// The guest's address on its LAN ([`VmLan`], [`HaLan`]).
pub const GUEST_IP: &str = "10.0.0.2";

impl VmLan {
    pub fn new(tag: &str) -> Result<VmLan> {
        let client = Netns::new(&format!("{tag}c"))?;
        let host = Netns::new(&format!("{tag}h"))?;
        let tap = "tap0".to_string();
        host.ip(&["link", "add", "br0", "type", "bridge"])?;
        host.ip(&[
            "link",
            "add",
            "vclient",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            client.name(),
        ])?;
        host.ip(&["link", "set", "vclient", "master", "br0", "up"])?;
        host.ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])?;
        host.ip(&["link", "set", &tap, "master", "br0", "up"])?;
        host.ip(&["link", "set", "br0", "up"])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        Ok(VmLan { client, host, tap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a network namespace of that name exists.
    pub(crate) fn exists(name: &str) -> bool {
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .split_whitespace()
            .any(|n| n == name)
    }

    /// Attaches to the persistent vnet_hdr TAP `name` of the calling
    /// thread's namespace.
    pub(crate) fn open_tap(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const IFF_TAP: libc::c_short = 0x0002;
        const IFF_NO_PI: libc::c_short = 0x1000;
        const IFF_VNET_HDR: libc::c_short = 0x4000;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads/writes a 40-byte struct ifreq, which `ifr` is.
        if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f.into())
    }

    /// A namespace whose owner died without dropping it is removed by the
    /// next namespace created; one whose owner lives is kept.
    #[test]
    fn namespaces_of_dead_owners_are_swept() {
        let mut dead = Command::new("true").spawn().unwrap();
        let pid = dead.id();
        dead.wait().unwrap();
        let orphan = unique_name("or");
        run(Command::new("ip").args(["netns", "add", &orphan])).unwrap();
        std::fs::create_dir_all(OWNERS).unwrap();
        std::fs::write(owner_file(&orphan), pid.to_string()).unwrap();
        let live = Netns::new("lv").unwrap();
        let other = Netns::new("ot").unwrap();
        assert!(!exists(&orphan), "orphan {orphan} not swept");
        assert!(!owner_file(&orphan).exists());
        assert!(exists(live.name()) && owner_file(live.name()).exists());
        let name = live.name().to_string();
        drop(live);
        drop(other);
        assert!(!exists(&name) && !owner_file(&name).exists());
    }

    /// Two namespaces joined by a veth pair.
    fn pair(tag: &str) -> (Netns, Netns) {
        let a = Netns::new(&format!("{tag}a")).unwrap();
        let b = Netns::new(&format!("{tag}b")).unwrap();
        a.ip(&[
            "link",
            "add",
            "v0",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            b.name(),
        ])
        .unwrap();
        a.ip(&["addr", "add", "192.168.77.1/24", "dev", "v0"]).unwrap();
        b.ip(&["addr", "add", "192.168.77.2/24", "dev", "v1"]).unwrap();
        a.ip(&["link", "set", "v0", "up"]).unwrap();
        b.ip(&["link", "set", "v1", "up"]).unwrap();
        (a, b)
    }

    /// Sends `count` UDP datagrams from `from` to `to_ns` and counts
    /// what arrives.
    fn udp_delivered(from: &Netns, to_ns: &Netns, to: &str, count: u32) -> u32 {
        use std::net::UdpSocket;
        use std::time::Duration;
        let rx = to_ns.spawn_thread(move || {
            let s = UdpSocket::bind("0.0.0.0:6000")?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut n = 0;
            let mut buf = [0u8; 64];
            while s.recv(&mut buf).is_ok() {
                n += 1;
            }
            Ok(n)
        });
        std::thread::sleep(Duration::from_millis(100));
        let to = format!("{to}:6000");
        from.spawn_thread(move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..count {
                s.send_to(b"x", &to)?;
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
        rx.join().unwrap().unwrap()
    }

    #[test]
    fn names_are_unique_and_short() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        assert!(a.len() <= 12);
    }

    #[test]
    fn namespaces_are_removed_even_when_a_test_panics() {
        let mut seen = String::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ns = Netns::new("p").unwrap();
            seen = ns.name().to_string();
            assert!(exists(&seen));
            panic!("simulated test failure");
        }));
        assert!(r.is_err());
        assert!(!seen.is_empty() && !exists(&seen), "{seen} left behind");
    }

    #[test]
    fn veth_pair_carries_traffic_and_bpf_loss_drops_it() {
        let (a, b) = pair("l");
        assert_eq!(udp_delivered(&a, &b, "192.168.77.2", 200), 200);
        a.random_loss("v0", 100.0).unwrap();
        assert_eq!(
            udp_delivered(&a, &b, "192.168.77.2", 50),
            0,
            "100% loss let packets through"
        );
        a.random_loss("v0", 30.0).unwrap();
        let got = udp_delivered(&a, &b, "192.168.77.2", 1000);
        assert!((600..=800).contains(&got), "30% loss delivered {got}/1000");
    }

    #[test]
    fn tbf_limits_the_rate() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let (a, b) = pair("t");
        a.tbf("v0", "8mbit", "16kb", 64 * 1024).unwrap();
        let rx = b.spawn_thread(|| {
            let l = TcpListener::bind("0.0.0.0:5001")?;
            let (mut c, _) = l.accept()?;
            let mut n = 0u64;
            let mut buf = vec![0u8; 65536];
            loop {
                match c.read(&mut buf)? {
                    0 => return Ok(n),
                    k => n += k as u64,
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let t = std::time::Instant::now();
        a.spawn_thread(|| {
            let mut c = TcpStream::connect("192.168.77.2:5001")?;
            c.write_all(&vec![0u8; 1_000_000])?;
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
        assert_eq!(rx.join().unwrap().unwrap(), 1_000_000);
        let secs = t.elapsed().as_secs_f64();
        // 1 MB at 8 Mbit/s takes ~1 s; unshaped veth takes milliseconds.
        assert!(secs > 0.7, "1 MB crossed an 8 Mbit/s link in {secs:.2} s");
    }

    /// a -- [x0 emu x1] -- b
    fn emulated(tag: &str, ab: emu::LinkProfile, ba: emu::LinkProfile) -> (Netns, Netns, Netns, emu::LinkEmulator) {
        let a = Netns::new(&format!("{tag}a")).unwrap();
        let m = Netns::new(&format!("{tag}m")).unwrap();
        let b = Netns::new(&format!("{tag}b")).unwrap();
        m.ip(&[
            "link",
            "add",
            "x0",
            "type",
            "veth",
            "peer",
            "name",
            "v0",
            "netns",
            a.name(),
        ])
        .unwrap();
        m.ip(&[
            "link",
            "add",
            "x1",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            b.name(),
        ])
        .unwrap();
        m.ip(&["link", "set", "x0", "up"]).unwrap();
        m.ip(&["link", "set", "x1", "up"]).unwrap();
        a.ip(&["addr", "add", "192.168.78.1/24", "dev", "v0"]).unwrap();
        b.ip(&["addr", "add", "192.168.78.2/24", "dev", "v1"]).unwrap();
        a.ip(&["link", "set", "v0", "up"]).unwrap();
        b.ip(&["link", "set", "v1", "up"]).unwrap();
        let e = m.link_emulator("x0", "x1", ab, ba).unwrap();
        (a, m, b, e)
    }

    #[test]
    fn emulator_delays_and_carries_tcp_intact() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let d = std::time::Duration::from_millis(25);
        let p = emu::LinkProfile {
            delay: d,
            ..Default::default()
        };
        let (a, _m, b, _e) = emulated("d", p, p);
        let data: Vec<u8> = (0..4_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let want = data.clone();
        let rx = b.spawn_thread(|| {
            let l = TcpListener::bind("0.0.0.0:5002")?;
            let (mut c, _) = l.accept()?;
            let mut got = Vec::new();
            c.read_to_end(&mut got)?;
            Ok(got)
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let rtt = a
            .spawn_thread(move || {
                let t = std::time::Instant::now();
                let mut c = TcpStream::connect("192.168.78.2:5002")?;
                let rtt = t.elapsed();
                c.write_all(&data)?;
                Ok(rtt)
            })
            .join()
            .unwrap()
            .unwrap();
        assert!(rtt >= 2 * d, "handshake took {rtt:?}, the link adds {:?}", 2 * d);
        assert!(
            rx.join().unwrap().unwrap() == want,
            "stream corrupted across the emulator"
        );
    }

    #[test]
    fn emulator_reorders_duplicates_and_drops() {
        use std::net::UdpSocket;
        let p = emu::LinkProfile {
            delay: std::time::Duration::from_millis(5),
            jitter: std::time::Duration::from_millis(5),
            reorder: 0.1,
            duplicate: 0.1,
            loss: 0.1,
        };
        let (a, _m, b, e) = emulated("r", p, emu::LinkProfile::default());
        let rx = b.spawn_thread(|| {
            let s = UdpSocket::bind("0.0.0.0:6001")?;
            // The first datagram may wait for ARP, itself subject to loss.
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            while s.recv(&mut buf).is_ok() {
                s.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
                got.push(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
            Ok(got)
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        a.spawn_thread(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for i in 0..2000u32 {
                s.send_to(&i.to_le_bytes(), "192.168.78.2:6001")?;
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
        let got = rx.join().unwrap().unwrap();
        let inversions = got.windows(2).filter(|w| w[1] < w[0]).count();
        let mut uniq = got.clone();
        uniq.sort_unstable();
        uniq.dedup();
        let dups = got.len() - uniq.len();
        let lost = 2000 - uniq.len();
        assert!(inversions > 50, "only {inversions} reorderings");
        assert!((100..400).contains(&dups), "{dups} duplicates");
        assert!((100..350).contains(&lost), "{lost} lost");
        assert!(e.counters[0].frames_in.load(std::sync::atomic::Ordering::Relaxed) >= 2000);
    }

    #[test]
    fn vm_lan_builds_and_cleans_up() {
        let lan = VmLan::new("v").unwrap();
        let out = lan.host.ip(&["-d", "link", "show", "tap0"]).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("vnet_hdr on"));
        let (c, h) = (lan.client.name().to_string(), lan.host.name().to_string());
        drop(lan);
        assert!(!exists(&c) && !exists(&h));
    }
}
