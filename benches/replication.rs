//! Replication benchmark: what protecting a VM with `remora run --protect`
//! costs and buys, measured side by side in one run on the HA topology of
//! tests/replication.rs (remora-netlab's `HaLan`: a client, a LAN switch,
//! a primary and a backup host, a separate replication link). Every VM is
//! the test guest with 2 vCPUs and 512 MiB. Baselines are measured in the
//! same run, and every ratio is against them.
//!
//! 1. TCP throughput guest->client (`source`) and client->guest (`sink`),
//!    unpaced client, time-bounded (RUN, the first SKIP not counted):
//!    unprotected (`remora run` on the primary's TAP, no engine) vs
//!    `--output buffered` vs `--output speculative` at epochs of 10, 25 and
//!    50 ms, on the unshaped LAN and on a 1 Gbit/s link with a 3 ms queue
//!    (tbf on both ends of the client's LAN cable: `clan` in the switch,
//!    `eth0` in the client). One VM (pair) per setup; RUNS runs per cell,
//!    alternating the links; median. Guest->client is the client's receive
//!    rate; client->guest is what the guest acknowledged (bytes written
//!    minus the client's SIOCOUTQ). A measurement is valid only if the VM
//!    was still protected at its end; one during which protection was lost
//!    is reported (with both processes' output) and taken again once on a
//!    fresh pair; the table counts the losses.
//! 2. Checkpoint pause and bytes per checkpoint under TCP streams both ways
//!    (speculative, 25 ms): `ctl status` polled every 5 ms, one sample per
//!    checkpoint (seq = epoch + lag); the primary's own p99 (last 1000
//!    pauses) is shown beside it.
//! 3. Failover: FAILOVERS trials, each a fresh pair; the client reads the
//!    guest's `source` stream (and checks every byte); SIGKILL of the
//!    primary 1.0 to 2.0 s into the stream (spread evenly over the
//!    trials); time from the kill to the client's first read after the
//!    backup's host sent its first frame of stream data (seen by a LAN
//!    capture of frame headers, started shortly before the kill); the
//!    backup's own `failover: detect ..` line.
//! 4. Replication link: bytes sent on the primary's repl0 per second
//!    (/proc/PID/net/dev), and the primary's CPU (utime+stime, per thread
//!    group: vCPUs, device workers, the event loop that takes checkpoints,
//!    the replication threads) per second and per checkpoint, against an
//!    unprotected VM under the same streams (same runs as 2., alternating).
//! 5. Memory: VmRSS/VmHWM of the primary and the backup with `mem:400`
//!    (the guest touches and keeps rewriting 400 MiB), against guest RAM;
//!    a run that loses its protection is reported and does not count (at
//!    most RUNS + 2 attempts).
//! 6. Request/response: 64-byte round trips against `echo`, unprotected vs
//!    both modes at each epoch.
//! 7. Unprotected remora vs QEMU microvm (virtio-net-device, vhost=off) on
//!    the same primary host: 512 MiB guest->client, fixed size, QEMU_RUNS
//!    runs each, alternating.
//! 8. Failover with and without the fence: cell 3's trial on a plain pair
//!    and on a fenced one (`HaLan::new_fenced`, a one-member etcd on the
//!    fence network, `--fence` on both), FENCE_FAILOVERS kills each,
//!    alternating, at the same kill moments; the backup's own
//!    `(fence N ms)` part of its detect beside the rest.
//! 9. TLS cost: cells 2/4's loaded run (speculative, 25 ms, streams both
//!    ways) on a plain pair and with mutual TLS on the replication link
//!    (certificates from `remora certs`), TLS_RUNS each, alternating:
//!    checkpoint pause, bytes per checkpoint (status and on the wire),
//!    repl0 throughput, the primary's CPU.
//!
//! REMORA_BENCH_ONLY=throughput,pause,failover,memory,qemu,fence,tls runs a
//! subset (for quick looks; `pause` includes the replication link and CPU
//! cells); REMORA_BENCH_FAILOVERS=N changes the number of kills of cell 3,
//! REMORA_BENCH_FENCE_FAILOVERS=N those of cell 8 (per setup);
//! REMORA_BENCH_EPOCHS=25 and REMORA_BENCH_MODES=speculative narrow cells
//! 1 and 6;
//! REMORA_BENCH_VERBOSE=1 prints more. Prints the table, writes
//! target/bench/replication.json; scripts/bench.sh replication draws
//! target/bench/replication.png from it.
//!
//! Run: `scripts/bench.sh replication`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Running;
use remora_netlab::{EtcdCluster, HaLan, LanPort, BACKUP_REPL_IP, ETCD_IPS, GUEST_IP};

const MAC: &str = "52:54:00:12:34:56";
const MEM_MIB: u64 = 512;
const VCPUS: u32 = 2;
const REPL_PORT: u16 = 7700;
const RUNS: usize = 3;
const RUN: Duration = Duration::from_millis(4000);
const SKIP: Duration = Duration::from_millis(500);
const EPOCHS_MS: [u64; 3] = [10, 25, 50];
/// The epoch the targets are stated at (remora's default).
const TARGET_EPOCH: u64 = 25;
const FAILOVERS: usize = 20;
/// Cell 8: kills per setup (unfenced, fenced).
const FENCE_FAILOVERS: usize = 10;
/// Request/response: at most this many round trips or this long, per run.
const RR_MAX: usize = 2000;
const RR_TIME: Duration = Duration::from_millis(1500);
/// Cells 2 and 4: streams both ways for this long per run.
const LOAD_RUN: Duration = Duration::from_secs(5);
const STATUS_POLL: Duration = Duration::from_millis(5);
/// `remora run`'s limit of unacknowledged checkpoints (src/main.rs).
const MAX_IN_FLIGHT: u64 = 3;
/// Cell 7: bytes of the fixed-size guest->client transfer, and runs (each
/// well under a second and noisy: more than RUNS).
const QEMU_MIB: u64 = 512;
const QEMU_RUNS: usize = 5;
/// The guest's ports.
const SINK: u16 = 5001;
const SOURCE: u16 = 5002;
const ECHO: u16 = 5003;
/// The 1 Gbit/s link: rate, burst, queue (3 ms at line rate).
const SHAPE_RATE: &str = "1gbit";
const SHAPE_BURST: &str = "128kb";
const SHAPE_QUEUE: u64 = 375_000;

fn verbose() -> bool {
    std::env::var_os("REMORA_BENCH_VERBOSE").is_some()
}

// ---------------------------------------------------------------- VMs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unprotected,
    Buffered,
    Speculative,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unprotected => "unprotected",
            Mode::Buffered => "buffered",
            Mode::Speculative => "speculative",
        }
    }
}

/// What runs the guest on the primary host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `remora run`, protected (with a backup) or not.
    Remora { mode: Mode, epoch_ms: u64 },
    /// QEMU microvm, as in tests/common `boot_on_lan`.
    Qemu,
}

/// What a protected pair adds to cells 2-4's plain one (cells 8 and 9).
#[derive(Debug, Clone, Default)]
struct Extras {
    /// A one-member etcd on the fence network, `--fence` on both.
    fence: bool,
    /// Mutual TLS on the replication link: (primary's, backup's) options.
    tls: Option<(Vec<String>, Vec<String>)>,
}

/// A guest on a fresh `HaLan`: the primary (and, protected, a backup).
struct Vm {
    /// Before `lan`: dropped (its members killed) before the namespaces go.
    etcd: Option<EtcdCluster>,
    lan: HaLan,
    extras: Extras,
    dir: PathBuf,
    kind: Kind,
    primary: Option<Running>,
    backup: Option<Running>,
    psock: PathBuf,
    bsock: PathBuf,
}

fn tag_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("remora-bench-repl-{tag}-{}-{n}", std::process::id()))
}

impl Vm {
    /// Boots `workloads` under `kind`; protected ones wait for `protected=yes`.
    fn start(kind: Kind, workloads: &str) -> Result<Vm, String> {
        Vm::start_with(kind, workloads, Extras::default())
    }

    /// [`Vm::start`] with a fence and/or TLS on the pair.
    fn start_with(kind: Kind, workloads: &str, extras: Extras) -> Result<Vm, String> {
        let (lan, etcd) = if extras.fence {
            let lan = HaLan::new_fenced("rb").map_err(|e| format!("namespaces (run as root): {e}"))?;
            let etcd =
                EtcdCluster::start(lan.fence.as_ref(), &ETCD_IPS[..1], 2379).map_err(|e| format!("etcd: {e}"))?;
            (lan, Some(etcd))
        } else {
            (
                HaLan::new("rb").map_err(|e| format!("namespaces (run as root): {e}"))?,
                None,
            )
        };
        let dir = tag_dir("vm");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut vm = Vm {
            psock: dir.join("primary.sock"),
            bsock: dir.join("backup.sock"),
            etcd,
            lan,
            extras,
            dir,
            kind,
            primary: None,
            backup: None,
        };
        let protect = match kind {
            Kind::Remora { mode, epoch_ms } if mode != Mode::Unprotected => Some((mode, epoch_ms)),
            _ => None,
        };
        if protect.is_some() {
            vm.start_backup()?;
        }
        let guest = common::guest_bin();
        let g = guest.display().to_string();
        let cmdline = format!("workload={workloads} ip={GUEST_IP}/24");
        let (v, m) = (VCPUS.to_string(), MEM_MIB.to_string());
        let mut cmd = match kind {
            Kind::Remora { .. } => {
                let mut c = vm.lan.primary.command(common::remora_bin().to_str().unwrap());
                c.args(["run", "--kernel", &g, "--cmdline", &cmdline, "--vcpus", &v, "--mem", &m])
                    .args(["--net", &format!("tap={},mac={MAC}", vm.lan.tap)])
                    .args(["--control", vm.psock.to_str().unwrap()]);
                if let Some((mode, epoch_ms)) = protect {
                    c.args(["--protect", &format!("{BACKUP_REPL_IP}:{REPL_PORT}")]).args([
                        "--epoch-ms",
                        &epoch_ms.to_string(),
                        "--output",
                        mode.name(),
                    ]);
                    c.args(vm.fence_args());
                    if let Some((p, _)) = &vm.extras.tls {
                        c.args(p);
                    }
                }
                c
            }
            Kind::Qemu => common::qemu_microvm(&vm.lan.primary, &v, &m, &g, &cmdline, &vm.lan.tap, Some(MAC)),
        };
        let mut p = common::spawn(&mut cmd);
        if p.wait_line("remora-guest: net up", Duration::from_secs(30)).is_none() {
            let run = p.finish(Duration::from_secs(1));
            return Err(format!("{kind:?}: no `net up`\n{}\n{}", run.stdout(), run.stderr));
        }
        vm.primary = Some(p);
        if protect.is_some() {
            vm.wait_status("protected=yes", Duration::from_secs(60))?;
        }
        Ok(vm)
    }

    fn start_backup(&mut self) -> Result<(), String> {
        let mut cmd = self.lan.backup.command(common::remora_bin().to_str().unwrap());
        cmd.args(["backup", "--listen", &format!("{BACKUP_REPL_IP}:{REPL_PORT}")])
            .args(["--net", &format!("tap={},mac={MAC}", self.lan.tap)])
            .args(["--control", self.bsock.to_str().unwrap()])
            .args(self.fence_args());
        if let Some((_, b)) = &self.extras.tls {
            cmd.args(b);
        }
        self.backup = Some(common::spawn(&mut cmd));
        if common::wait_listening(&self.lan.backup, REPL_PORT, Duration::from_secs(10)) {
            Ok(())
        } else {
            Err("the backup never listened".into())
        }
    }

    fn status(&self) -> String {
        status(&self.psock)
    }

    /// `--fence etcd=URL` for a fenced pair, else nothing.
    fn fence_args(&self) -> Vec<String> {
        match &self.etcd {
            Some(e) => vec!["--fence".into(), e.fence_arg()],
            None => Vec::new(),
        }
    }

    fn wait_status(&self, want: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let s = self.status();
            if s.contains(want) {
                return Ok(s);
            }
            last = s;
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("status never showed '{want}': {last}"))
    }

    fn primary_pid(&self) -> u32 {
        self.primary.as_ref().map_or(0, |p| p.child.id())
    }

    fn backup_pid(&self) -> u32 {
        self.backup.as_ref().map_or(0, |p| p.child.id())
    }

    fn protected(&self) -> bool {
        matches!(self.kind, Kind::Remora { mode, .. } if mode != Mode::Unprotected)
    }

    /// For a protected VM: Err if protection was lost (the numbers would be
    /// an unprotected VM's), with both processes' output (the VM is
    /// stopped then).
    fn check_protected(&mut self) -> Result<(), String> {
        if !self.protected() || self.primary.is_none() {
            return Ok(());
        }
        let s = self.status();
        if s.contains("protected=yes") {
            return Ok(());
        }
        let b = self.backup.take().map(|b| {
            b.signal(libc::SIGKILL);
            b.finish(Duration::from_secs(5))
        });
        let p = self.primary.take().map(|p| {
            p.signal(libc::SIGKILL);
            p.finish(Duration::from_secs(5))
        });
        let tail = |s: &str| {
            let v: Vec<&str> = s.lines().collect();
            v[v.len().saturating_sub(30)..].join("\n")
        };
        Err(format!(
            "protection lost: {s}\n--- backup exit {:?}, stderr:\n{}\n--- backup console (tail):\n{}\n--- primary stderr:\n{}\n--- primary console (tail):\n{}",
            b.as_ref().map(|r| r.status),
            b.as_ref().map_or(String::new(), |r| tail(&r.stderr)),
            b.as_ref().map_or(String::new(), |r| tail(&r.stdout())),
            p.as_ref().map_or(String::new(), |r| tail(&r.stderr)),
            p.as_ref().map_or(String::new(), |r| tail(&r.stdout())),
        ))
    }

    /// Stops the primary (SIGTERM: a protected one tells its backup not to
    /// take over) and the backup; returns their runs.
    fn stop(mut self) -> (Option<common::Run>, Option<common::Run>) {
        let p = self.primary.take().map(|p| {
            p.signal(libc::SIGTERM);
            p.finish(Duration::from_secs(10))
        });
        let b = self.backup.take().map(|b| {
            // It exits by itself after the primary's Shutdown.
            let run = {
                let deadline = Instant::now() + Duration::from_secs(3);
                let mut b = b;
                while Instant::now() < deadline && matches!(b.child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                b.signal(libc::SIGTERM);
                b
            };
            run.finish(Duration::from_secs(10))
        });
        (p, b)
    }

    /// The 1 Gbit/s, 3 ms queue link between the client and the switch
    /// (both ways), or none.
    fn shape(&self, on: bool) -> Result<(), String> {
        let ends = [(&self.lan.lan, "clan"), (&self.lan.client, "eth0")];
        for (ns, dev) in ends {
            if on {
                ns.tbf(dev, SHAPE_RATE, SHAPE_BURST, SHAPE_QUEUE)
                    .map_err(|e| e.to_string())?;
            } else {
                let out = ns
                    .exec("tc", &["qdisc", "show", "dev", dev, "root"])
                    .map_err(|e| e.to_string())?;
                if String::from_utf8_lossy(&out.stdout).contains("tbf") {
                    ns.exec("tc", &["qdisc", "del", "dev", dev, "root"])
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for r in [self.primary.take(), self.backup.take()].into_iter().flatten() {
            r.signal(libc::SIGKILL);
            let _ = r.finish(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ctl status` over the control socket (in process: no `remora ctl`
/// process per poll).
fn status(sock: &Path) -> String {
    remora_vmm::control::request(sock, &remora_vmm::control::Command::Status).unwrap_or_else(|e| format!("error {e}"))
}

/// The number after `key=` in a status line.
fn num(line: &str, key: &str) -> Option<u64> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------- /proc

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name's closing parenthesis: state is field 3.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (get(14) + get(15)) as f64 / clk_tck()
}

/// utime + stime (seconds) of each of `pid`'s threads: tid -> (name, s).
fn thread_cpu(pid: u32) -> BTreeMap<u32, (String, f64)> {
    let mut m = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return m;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let s = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (s.find('('), s.rfind(')')) else {
            continue;
        };
        let name = s[open + 1..close].to_string();
        let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
        let get = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        m.insert(tid, (name, (get(14) + get(15)) as f64 / clk_tck()));
    }
    m
}

/// Which part of the VMM a thread is (by its name).
fn thread_group(name: &str) -> &'static str {
    if name.starts_with("vcpu") {
        "vcpu"
    } else if name.starts_with("virtio") {
        "device"
    } else if name.starts_with("repl") {
        "replication"
    } else if name == "remora" {
        // The VMM's event loop: checkpoints are taken here.
        "main"
    } else {
        "other"
    }
}

/// CPU seconds per thread group between two `thread_cpu` readings.
fn group_cpu(a: &BTreeMap<u32, (String, f64)>, b: &BTreeMap<u32, (String, f64)>) -> BTreeMap<&'static str, f64> {
    let mut g = BTreeMap::new();
    for (tid, (name, t1)) in b {
        let t0 = a.get(tid).map_or(0.0, |x| x.1);
        *g.entry(thread_group(name)).or_insert(0.0) += t1 - t0;
    }
    g
}

/// (VmRSS, VmHWM) of `pid` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// Bytes `pid`'s network namespace sent on `dev`.
fn tx_bytes(pid: u32, dev: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{dev}:")).map(str::to_string))
        .and_then(|r| r.split_whitespace().nth(8)?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- client side

/// A TCP connection from the client namespace to the guest.
fn connect(lan: &HaLan, port: u16) -> Result<TcpStream, String> {
    let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse().unwrap();
    // EHOSTUNREACH (the guest's ARP reply not seen within the kernel's 3
    // solicitations, seen on a loaded machine) is tried again, twice.
    let mut tries = 0;
    loop {
        tries += 1;
        let r = lan
            .client
            .spawn_thread(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .join()
            .unwrap();
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EHOSTUNREACH) && tries < 3 => {
                eprintln!("connect to {addr}: {e}: trying again");
            }
            r => return r.map_err(|e| format!("connect to {addr} (try {tries}): {e}")),
        }
    }
}

/// Makes closing `s` reset the connection at once (SO_LINGER 0), so the
/// guest's `source` serves the next connection whatever state this one is
/// in (a FIN would leave it sending into a closed socket until its next
/// retransmission).
fn reset_on_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) with a valid linger struct on an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// Guest `source` -> client for RUN, unpaced; Gbit/s after SKIP.
fn from_guest(lan: &HaLan) -> Result<f64, String> {
    let mut s = connect(lan, SOURCE)?;
    reset_on_close(&s);
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (got, stop) = (got.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(), String> {
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => return Err("the guest closed the source stream".into()),
                    Ok(k) => {
                        got.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    Err(e) if timed_out(&e) => {}
                    Err(e) => return Err(format!("source stream: {e}")),
                }
            }
            // Dropped with SO_LINGER 0: a reset; the guest's source serves
            // the next connection.
            Ok(())
        })
    };
    let t0 = Instant::now();
    std::thread::sleep(SKIP);
    let (b0, t1) = (got.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(RUN.saturating_sub(t0.elapsed()));
    let (b1, t2) = (got.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap()?;
    Ok((b1 - b0) as f64 * 8.0 / (t2 - t1).as_secs_f64() / 1e9)
}

/// Bytes in `s`'s send queue not yet acknowledged by the peer (SIOCOUTQ).
fn unacked(s: &TcpStream) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) on a TCP socket writes one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n.max(0) as u64
    } else {
        0
    }
}

/// Client -> guest `sink` for RUN, unpaced; Gbit/s the guest acknowledged
/// after SKIP. Then closes cleanly (the guest's sink sees the end).
fn to_guest(lan: &HaLan) -> Result<f64, String> {
    let s = connect(lan, SINK)?;
    let probe = s.try_clone().map_err(|e| e.to_string())?;
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || -> Result<TcpStream, String> {
            let mut s = s;
            s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
            let buf = vec![0xa5u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                match s.write(&buf) {
                    Ok(k) => {
                        written.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    Err(e) if timed_out(&e) => {}
                    Err(e) => return Err(format!("sink stream: {e}")),
                }
            }
            Ok(s)
        })
    };
    let acked = || written.load(Ordering::Relaxed).saturating_sub(unacked(&probe));
    let t0 = Instant::now();
    std::thread::sleep(SKIP);
    let (b0, t1) = (acked(), Instant::now());
    std::thread::sleep(RUN.saturating_sub(t0.elapsed()));
    let (b1, t2) = (acked(), Instant::now());
    stop.store(true, Ordering::Relaxed);
    let mut s = writer.join().unwrap()?;
    // Let the guest take the rest and close (bounded).
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let _ = s.read_to_end(&mut Vec::new());
    Ok((b1 - b0) as f64 * 8.0 / (t2 - t1).as_secs_f64() / 1e9)
}

/// 64-byte round trips against `echo`: latencies in microseconds.
fn echo_rr(lan: &HaLan) -> Result<Vec<f64>, String> {
    let mut s = connect(lan, ECHO)?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut lat = Vec::new();
    let mut back = [0u8; 64];
    let t0 = Instant::now();
    for i in 0..RR_MAX {
        if t0.elapsed() > RR_TIME {
            break;
        }
        let msg = [i as u8; 64];
        let t = Instant::now();
        s.write_all(&msg).map_err(|e| format!("echo write: {e}"))?;
        s.read_exact(&mut back)
            .map_err(|e| format!("echo read (round trip {i}): {e}"))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        if back != msg {
            return Err(format!("echo returned other bytes (round trip {i})"));
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.read_to_end(&mut Vec::new());
    Ok(lat)
}

/// Checks the guest's `source` stream (seed 0, see crates/guest/README.md)
/// as it arrives.
struct SourceCheck {
    pos: u64,
    bad_at: Option<u64>,
}

impl SourceCheck {
    fn feed(&mut self, data: &[u8]) {
        if self.bad_at.is_some() {
            self.pos += data.len() as u64;
            return;
        }
        let mut i = 0;
        while i < data.len() {
            let p = self.pos + i as u64;
            let word = common::splitmix64(p / 8).to_le_bytes();
            let off = (p % 8) as usize;
            let n = (8 - off).min(data.len() - i);
            if data[i..i + n] != word[off..off + n] {
                self.bad_at = Some(p);
                break;
            }
            i += n;
        }
        self.pos += data.len() as u64;
    }
}

// ---------------------------------------------------------------- statistics

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile of the finite values (NaN marks a failed run).
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn fmt(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "-".into()
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

/// A JSON number (null for NaN).
fn jnum(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "null".into()
    }
}

fn jarr(v: &[f64]) -> String {
    format!("[{}]", v.iter().map(|x| jnum(*x)).collect::<Vec<_>>().join(","))
}

fn jstr(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
    )
}

/// Problems met during the run (printed at the end, in the JSON too).
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, what: String) {
        let short: String = what.lines().take(40).collect::<Vec<_>>().join("\n");
        eprintln!("PROBLEM: {short}");
        self.0.push(what.lines().next().unwrap_or("").to_string());
    }
}

fn elapsed(started: Instant) -> String {
    format!("{:>4.0}s", started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- 1 + 6: throughput and round trips

const LINKS: [(&str, &str); 2] = [
    ("lan", "unshaped LAN"),
    ("1g-3ms", "1 Gbit/s, 3 ms queue (client side, both ways)"),
];

struct Setup {
    mode: Mode,
    epoch_ms: Option<u64>,
    /// [link] -> runs, Gbit/s (NaN: failed).
    g2c: [Vec<f64>; 2],
    c2g: [Vec<f64>; 2],
    /// Round-trip latencies (us), all runs pooled.
    rr: Vec<f64>,
    rr_runs_p50: Vec<f64>,
    /// The last status line (protected setups).
    status: String,
    /// Measurements during which protection was lost (taken again).
    lost: usize,
}

/// The epochs of cells 1 and 6 (REMORA_BENCH_EPOCHS=25 narrows them).
fn epochs() -> Vec<u64> {
    std::env::var("REMORA_BENCH_EPOCHS").ok().map_or_else(
        || EPOCHS_MS.to_vec(),
        |v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
    )
}

/// Cells 1 and 6: unprotected, then both modes at each epoch
/// (REMORA_BENCH_MODES=speculative narrows the modes).
fn setups() -> Vec<(Mode, Option<u64>)> {
    let modes = std::env::var("REMORA_BENCH_MODES").unwrap_or_default();
    let want = |m: Mode| modes.is_empty() || modes.split(',').any(|x| x.trim() == m.name());
    let mut v = Vec::new();
    if want(Mode::Unprotected) {
        v.push((Mode::Unprotected, None));
    }
    for e in epochs() {
        for m in [Mode::Buffered, Mode::Speculative] {
            if want(m) {
                v.push((m, Some(e)));
            }
        }
    }
    v
}

/// One measurement of a setup, on `vm` (started if there is none). A VM
/// that lost its protection meanwhile is stopped and reported, and the
/// measurement is taken again once on a fresh VM; NaN if that fails too.
fn measure<T>(
    vm: &mut Option<Vm>,
    kind: Kind,
    what: &str,
    lost: &mut usize,
    problems: &mut Problems,
    f: impl Fn(&Vm) -> Result<T, String>,
) -> Option<T> {
    for _attempt in 0..2 {
        if vm.is_none() {
            match Vm::start(kind, &format!("sink:{SINK},source:{SOURCE}:1000000,echo:{ECHO}")) {
                Ok(v) => {
                    std::thread::sleep(Duration::from_millis(200));
                    *vm = Some(v);
                }
                Err(e) => {
                    problems.add(format!("{what}: start: {e}"));
                    return None;
                }
            }
        }
        let v = vm.as_mut().unwrap();
        let r = f(v);
        if let Err(e) = v.check_protected() {
            *lost += 1;
            problems.add(format!("{what}: {e}"));
            *vm = None;
            continue;
        }
        return match r {
            Ok(x) => Some(x),
            Err(e) => {
                problems.add(format!("{what}: {e}"));
                None
            }
        };
    }
    None
}

fn throughput(started: Instant, problems: &mut Problems) -> Vec<Setup> {
    let mut out = Vec::new();
    for (mode, epoch_ms) in setups() {
        let mut s = Setup {
            mode,
            epoch_ms,
            g2c: [Vec::new(), Vec::new()],
            c2g: [Vec::new(), Vec::new()],
            rr: Vec::new(),
            rr_runs_p50: Vec::new(),
            status: String::new(),
            lost: 0,
        };
        let label = format!(
            "{} {}",
            mode.name(),
            epoch_ms.map_or("-".to_string(), |e| format!("{e} ms"))
        );
        let kind = Kind::Remora {
            mode,
            epoch_ms: epoch_ms.unwrap_or(TARGET_EPOCH),
        };
        let mut vm: Option<Vm> = None;
        let mut lost = 0;
        for run in 0..RUNS {
            // Request/response on the unshaped LAN.
            let what = format!("round trips {label} run {}", run + 1);
            let rr = measure(&mut vm, kind, &what, &mut lost, problems, |v| {
                v.shape(false)?;
                echo_rr(&v.lan)
            });
            if let Some(l) = rr {
                s.rr_runs_p50.push(median(&l));
                s.rr.extend(l);
            }
            for (li, (link, _)) in LINKS.iter().enumerate() {
                let what = format!("throughput {label} {link} run {}", run + 1);
                let shaped = li == 1;
                let r = measure(&mut vm, kind, &what, &mut lost, problems, |v| {
                    v.shape(shaped)?;
                    std::thread::sleep(Duration::from_millis(100));
                    let a = from_guest(&v.lan).map_err(|e| format!("guest->client: {e}"))?;
                    std::thread::sleep(Duration::from_millis(100));
                    let b = to_guest(&v.lan).map_err(|e| format!("client->guest: {e}"))?;
                    Ok((a, b))
                });
                let (a, b) = r.unwrap_or((f64::NAN, f64::NAN));
                eprintln!(
                    "{} throughput {label:<16} {link:<7} run {}: guest->client {a:.3}, client->guest {b:.3} Gbit/s",
                    elapsed(started),
                    run + 1
                );
                s.g2c[li].push(a);
                s.c2g[li].push(b);
            }
        }
        s.lost = lost;
        eprintln!(
            "{} round trips {label}: {} samples, p50 {:.0} us, p99 {:.0} us; protection lost {lost} times",
            elapsed(started),
            s.rr.len(),
            percentile(&s.rr, 50.0),
            percentile(&s.rr, 99.0)
        );
        if let Some(vm) = vm {
            if vm.protected() {
                s.status = vm.status();
                if verbose() {
                    eprintln!("      {}", s.status);
                }
            }
            let (p, _) = vm.stop();
            if let Some(p) = p {
                if p.stderr.contains("UNPROTECTED") {
                    problems.add(format!("{label}: the primary ran unprotected:\n{}", p.stderr));
                }
            }
        }
        out.push(s);
    }
    out
}

// ---------------------------------------------------------------- 2 + 4: pauses, link, CPU

/// One sample per checkpoint seen by polling `status`.
#[derive(Default)]
struct Polled {
    /// seq -> (pause_us, ckpt_bytes).
    ckpts: BTreeMap<u64, (u64, u64)>,
    polls: u64,
    max_lag: u64,
    last: String,
}

fn poll_status(sock: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Polled> {
    std::thread::spawn(move || {
        let mut p = Polled::default();
        while !stop.load(Ordering::Relaxed) {
            let line = status(&sock);
            p.polls += 1;
            if let (Some(epoch), Some(lag), Some(pause), Some(bytes)) = (
                num(&line, "epoch"),
                num(&line, "lag"),
                num(&line, "pause_us"),
                num(&line, "ckpt_bytes"),
            ) {
                if line.contains("protected=yes") && epoch > 0 {
                    p.ckpts.entry(epoch + lag).or_insert((pause, bytes));
                    p.max_lag = p.max_lag.max(lag);
                }
            }
            p.last = line;
            std::thread::sleep(STATUS_POLL);
        }
        p
    })
}

/// One loaded run (streams both ways for LOAD_RUN).
#[derive(Default, Clone)]
struct Load {
    g2c_gbps: f64,
    c2g_gbps: f64,
    primary_cpu: f64,
    backup_cpu: f64,
    secs: f64,
    ckpts: u64,
    repl_bytes: u64,
    pauses_us: Vec<f64>,
    bytes: Vec<f64>,
    coverage: f64,
    own_p99_us: f64,
    primary_rss_kib: u64,
    backup_rss_kib: u64,
    /// The primary's CPU seconds per thread group (vcpu, device, main,
    /// replication, other).
    threads: BTreeMap<&'static str, f64>,
}

/// Streams both ways through a fresh VM of `mode` (25 ms epochs) for
/// LOAD_RUN, measuring the primary (and backup) meanwhile.
fn load_run(mode: Mode, workloads: &str) -> Result<Load, String> {
    load_run_with(mode, workloads, Extras::default())
}

/// [`load_run`] on a pair with `extras` (cell 9: mutual TLS).
fn load_run_with(mode: Mode, workloads: &str, extras: Extras) -> Result<Load, String> {
    let mut vm = Vm::start_with(
        Kind::Remora {
            mode,
            epoch_ms: TARGET_EPOCH,
        },
        workloads,
        extras,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = vm.protected().then(|| poll_status(vm.psock.clone(), stop.clone()));
    let (pp, bp) = (vm.primary_pid(), vm.backup_pid());
    // Connected first: a connect that waits for ARP is not in the window.
    let (src, snk) = match (connect(&vm.lan, SOURCE), connect(&vm.lan, SINK)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = poller {
                let _ = h.join();
            }
            vm.check_protected().map_err(|p| format!("{e}; {p}"))?;
            return Err(format!("{e}; still protected: {}", vm.status()));
        }
    };
    let th0 = thread_cpu(pp);
    let (c0, bc0, x0, t0) = (cpu_secs(pp), cpu_secs(bp), tx_bytes(pp, "repl0"), Instant::now());
    let e0 = num(&vm.status(), "epoch").unwrap_or(0);
    let (mut g2c, mut c2g) = (0.0, 0.0);
    let mut rss = (0u64, 0u64);
    // The primary's figures at the end of LOAD_RUN: not after the sink's
    // drain (up to 20 s on a loaded machine), which would dilute the rates.
    let mut end = None;
    // Both ways at once; each stream measures itself.
    let psock = vm.psock.clone();
    let streams = std::thread::scope(|sc| -> Result<(), String> {
        let a = sc.spawn(|| stream_for(src, true, LOAD_RUN));
        let b = sc.spawn(|| stream_for(snk, false, LOAD_RUN));
        std::thread::sleep(LOAD_RUN / 2);
        rss = (rss_kib(pp).0, rss_kib(bp).0);
        std::thread::sleep(LOAD_RUN.saturating_sub(t0.elapsed()));
        end = Some((
            t0.elapsed().as_secs_f64(),
            cpu_secs(pp),
            cpu_secs(bp),
            tx_bytes(pp, "repl0"),
            thread_cpu(pp),
            status(&psock),
        ));
        // Checkpoints sampled during the window only.
        stop.store(true, Ordering::Relaxed);
        g2c = a.join().unwrap()?;
        c2g = b.join().unwrap()?;
        Ok(())
    });
    if let Err(e) = streams {
        // A stream that failed because protection was lost says so.
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = poller {
            let _ = h.join();
        }
        vm.check_protected().map_err(|p| format!("{e}; {p}"))?;
        return Err(format!("{e}; still protected: {}", vm.status()));
    }
    let (secs, c1, bc1, x1, th1, last) = end.expect("the window's end");
    let threads = group_cpu(&th0, &th1);
    let e1 = num(&last, "epoch").unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    let polled = poller.map(|h| h.join().unwrap()).unwrap_or_default();
    vm.check_protected()?;
    let _ = vm.stop();
    let pauses: Vec<f64> = polled.ckpts.values().map(|v| v.0 as f64).collect();
    let bytes: Vec<f64> = polled.ckpts.values().map(|v| v.1 as f64).collect();
    let span = match (polled.ckpts.keys().next(), polled.ckpts.keys().last()) {
        (Some(a), Some(b)) => (b - a + 1) as f64,
        _ => f64::NAN,
    };
    Ok(Load {
        g2c_gbps: g2c,
        c2g_gbps: c2g,
        primary_cpu: c1 - c0,
        backup_cpu: if bp > 0 { bc1 - bc0 } else { 0.0 },
        secs,
        ckpts: e1.saturating_sub(e0),
        repl_bytes: x1.saturating_sub(x0),
        coverage: polled.ckpts.len() as f64 / span,
        pauses_us: pauses,
        bytes,
        own_p99_us: num(&last, "pause_p99_us").map_or(f64::NAN, |v| v as f64),
        primary_rss_kib: rss.0,
        backup_rss_kib: rss.1,
        threads,
    })
}

/// An unpaced stream on `s` (connected to `source` or `sink`) for `d`; Gbit/s over
/// the whole time (the receiver's view for guest->client, the guest's
/// acknowledgements for client->guest).
fn stream_for(s: TcpStream, from_guest: bool, d: Duration) -> Result<f64, String> {
    let t0 = Instant::now();
    let mut n = 0u64;
    if from_guest {
        let mut s = s;
        reset_on_close(&s);
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while t0.elapsed() < d {
            match s.read(&mut buf) {
                Ok(0) => return Err("the guest closed the source stream".into()),
                Ok(k) => n += k as u64,
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(format!("source stream: {e}")),
            }
        }
    } else {
        let mut s = s;
        s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let buf = vec![0x5au8; 64 << 10];
        while t0.elapsed() < d {
            match s.write(&buf) {
                Ok(k) => n += k as u64,
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(format!("sink stream: {e}")),
            }
        }
        n = n.saturating_sub(unacked(&s));
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let _ = s.read_to_end(&mut Vec::new());
    }
    Ok(n as f64 * 8.0 / d.as_secs_f64() / 1e9)
}

// ---------------------------------------------------------------- 3: failover

#[derive(Default, Clone)]
struct Failover {
    /// Kill -> the client's first read after the backup's host sent its
    /// first stream data (ms).
    resume_ms: f64,
    /// The client's gap between its last read before that and that read.
    gap_ms: f64,
    /// Kill -> the backup's host's first frame with stream data (LAN capture).
    first_frame_ms: f64,
    detect_ms: f64,
    /// The part of detect spent on the fence (`(fence N ms)`; 0 unfenced).
    fence_ms: f64,
    restore_ms: f64,
    running_ms: f64,
    /// Bytes read before / after the kill.
    before: u64,
    after: u64,
    /// Frames the capture lost (kernel drops).
    dropped: u64,
}

/// Why a failover trial gave no measurement.
enum TrialError {
    /// The VM was no longer protected when the kill was due (no kill).
    LostBeforeKill(String),
    /// Anything else (start, the stream, the failover itself).
    Failed(String),
}

impl From<String> for TrialError {
    fn from(s: String) -> TrialError {
        TrialError::Failed(s)
    }
}

fn failover_trial(kill_after: Duration) -> Result<Failover, TrialError> {
    failover_trial_with(kill_after, false)
}

/// [`failover_trial`] on a pair fenced by a one-member etcd (cell 8), or
/// not.
fn failover_trial_with(kill_after: Duration, fenced: bool) -> Result<Failover, TrialError> {
    let mut vm = Vm::start_with(
        Kind::Remora {
            mode: Mode::Speculative,
            epoch_ms: TARGET_EPOCH,
        },
        &format!("source:{SOURCE}:1000000"),
        Extras {
            fence: fenced,
            tls: None,
        },
    )?;
    let mut s = connect(&vm.lan, SOURCE)?;
    reset_on_close(&s);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || -> (Vec<(Instant, u64)>, SourceCheck, Option<String>) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = vec![0u8; 1 << 20];
            let mut reads = Vec::with_capacity(1 << 16);
            let mut check = SourceCheck { pos: 0, bad_at: None };
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => return (reads, check, Some("the stream ended".into())),
                    Ok(k) => {
                        reads.push((Instant::now(), k as u64));
                        check.feed(&buf[..k]);
                    }
                    Err(e) if timed_out(&e) => {}
                    Err(e) => return (reads, check, Some(format!("read: {e}"))),
                }
            }
            (reads, check, None)
        })
    };
    // The LAN capture (frame headers only) from shortly before the kill:
    // it shows when the backup's host first sends stream data.
    let lead = Duration::from_millis(200);
    std::thread::sleep(kill_after.saturating_sub(lead));
    let cap = vm
        .lan
        .capture_lan_snaplen(128)
        .map_err(|e| format!("LAN capture: {e}"))?;
    std::thread::sleep(lead);
    let before_status = vm.status();
    if !before_status.contains("protected=yes") {
        stop.store(true, Ordering::Relaxed);
        let _ = reader.join();
        drop(cap);
        return Err(TrialError::LostBeforeKill(match vm.check_protected() {
            Err(e) => e,
            Ok(()) => format!("protection lost: {before_status}"),
        }));
    }
    let p = vm.primary.take().expect("a primary");
    let killed = Instant::now();
    p.signal(libc::SIGKILL);
    let dead = p.finish(Duration::from_secs(5));
    // Data again, then a little more.
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (reads, check, err) = reader.join().unwrap();
    let (frames, dropped) = cap.stop_lossy().map_err(|e| format!("LAN capture: {e}"))?;
    let b = vm.backup.take().expect("a backup");
    b.signal(libc::SIGTERM);
    let brun = b.finish(Duration::from_secs(10));
    let diag = || {
        format!(
            "status before the kill: {before_status}\n--- backup stderr:\n{}\n--- primary stderr:\n{}",
            brun.stderr, dead.stderr
        )
    };
    if let Some(e) = err {
        return Err(format!("client stream: {e}\n{}", diag()).into());
    }
    if let Some(at) = check.bad_at {
        return Err(format!("the source stream is corrupt at byte {at}\n{}", diag()).into());
    }
    let line = brun
        .stderr
        .lines()
        .find(|l| l.contains("remora backup: failover:"))
        .ok_or_else(|| format!("no failover line from the backup\n{}", diag()))?
        .to_string();
    if fenced && !brun.stderr.contains("fence: generation 1 -> 2") {
        return Err(format!(
            "the fenced backup took over without moving the generation 1 -> 2\n{}",
            diag()
        )
        .into());
    }
    let after_ms = |key: &str| {
        line.split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // The backup's host's first frame with stream data, and the client's
    // first read after it (with the gap before that read).
    let mac = parse_mac(MAC);
    let first = frames
        .iter()
        .filter(|f| f.port == LanPort::Backup && f.src_mac == mac)
        .filter(|f| f.tcp.is_some_and(|t| t.payload_len > 0))
        .map(|f| f.at)
        .min()
        .ok_or_else(|| {
            format!(
                "the capture saw no stream data from the backup's host ({} frames, {dropped} dropped by the kernel)\n{}",
                frames.len(),
                diag()
            )
        })?;
    let i = reads
        .iter()
        .position(|r| r.0 > first)
        .ok_or_else(|| format!("the client read nothing after the backup's first frame\n{}", diag()))?;
    let resume = reads[i].0;
    let prev = if i > 0 { reads[i - 1].0 } else { killed };
    let before: u64 = reads.iter().filter(|r| r.0 <= killed).map(|r| r.1).sum();
    let after: u64 = reads[i..].iter().map(|r| r.1).sum();
    Ok(Failover {
        resume_ms: (resume - killed).as_secs_f64() * 1e3,
        gap_ms: (resume - prev).as_secs_f64() * 1e3,
        first_frame_ms: (first.saturating_duration_since(killed)).as_secs_f64() * 1e3,
        detect_ms: after_ms("detect "),
        fence_ms: after_ms("(fence "),
        restore_ms: after_ms("restore "),
        running_ms: after_ms("guest running "),
        before,
        after,
        dropped,
    })
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    m
}

/// Kill moments spread over [1.0, 2.0) s into the stream.
fn kill_moment(i: usize, n: usize) -> Duration {
    Duration::from_millis(1000 + (1000 * i / n.max(1)) as u64)
}

// ---------------------------------------------------------------- 8: failover and the fence

/// Cell 8's setups: (name, fenced).
const FENCE_SETUPS: [(&str, bool); 2] = [("no fence", false), ("fence", true)];

/// One setup's failover trials.
#[derive(Default)]
struct FenceCell {
    fo: Vec<Failover>,
    failed: usize,
    lost: usize,
}

/// `n` kills each way, alternating unfenced and fenced trials at the same
/// kill moments; a trial whose VM lost protection before the kill is
/// replaced (at most 5 per setup).
fn fence_cell(n: usize, started: Instant, problems: &mut Problems) -> [FenceCell; 2] {
    if !remora_netlab::etcd::available() {
        problems.add("fence: etcd is not installed (scripts/deps.sh installs etcd-server)".into());
        return Default::default();
    }
    let mut cells: [FenceCell; 2] = Default::default();
    let mut i = 0;
    loop {
        let mut ran = false;
        for (k, (name, fenced)) in FENCE_SETUPS.iter().enumerate() {
            let c = &mut cells[k];
            if c.fo.len() + c.failed >= n || c.lost >= 5 {
                continue;
            }
            ran = true;
            let at = kill_moment((c.fo.len() + c.failed) % n, n);
            i += 1;
            match failover_trial_with(at, *fenced) {
                Ok(f) => {
                    eprintln!(
                        "{} {name} failover trial {} (kill at {:?}): data again after {:.0} ms (backup's first frame {:.0} ms); backup: detect {} (fence {}) restore {} running {} ms",
                        elapsed(started),
                        c.fo.len() + c.failed + 1,
                        at,
                        f.resume_ms,
                        f.first_frame_ms,
                        f.detect_ms,
                        f.fence_ms,
                        f.restore_ms,
                        f.running_ms
                    );
                    c.fo.push(f);
                }
                Err(TrialError::LostBeforeKill(e)) => {
                    c.lost += 1;
                    problems.add(format!(
                        "{name} failover trial {i} (kill due at {at:?}): protection lost BEFORE the kill (trial replaced): {e}"
                    ));
                }
                Err(TrialError::Failed(e)) => {
                    c.failed += 1;
                    problems.add(format!("{name} failover trial {i} (kill at {at:?}): {e}"));
                }
            }
        }
        if !ran {
            return cells;
        }
    }
}

// ---------------------------------------------------------------- 9: TLS cost

/// Cell 9's setups: (name, mutual TLS).
const TLS_SETUPS: [(&str, bool); 2] = [("plaintext", false), ("mTLS", true)];
/// Cell 9: runs per setup (alternating).
const TLS_RUNS: usize = 4;

/// A CA and a primary's and a backup's certificates (`remora certs`) in
/// `dir`; (primary's, backup's) `--tls-*` options.
fn make_certs(dir: &Path) -> Result<(Vec<String>, Vec<String>), String> {
    let _ = std::fs::remove_dir_all(dir);
    let d = dir.to_str().unwrap();
    for args in [
        vec!["certs", "init", "--dir", d],
        vec![
            "certs",
            "issue",
            "--dir",
            d,
            "backup1",
            "--role",
            "backup",
            "--san",
            BACKUP_REPL_IP,
        ],
        vec!["certs", "issue", "--dir", d, "primary1", "--role", "primary"],
    ] {
        let r = common::run_remora(&args, Duration::from_secs(20));
        if !r.status.success() {
            return Err(format!("remora {}: {}", args.join(" "), r.stderr));
        }
    }
    let ca = dir.join("ca.pem").display().to_string();
    let opts = |name: &str| -> Vec<String> {
        vec![
            "--tls-cert".into(),
            dir.join(format!("{name}.pem")).display().to_string(),
            "--tls-key".into(),
            dir.join(format!("{name}.key")).display().to_string(),
            "--tls-ca".into(),
            ca.clone(),
        ]
    };
    Ok((opts("primary1"), opts("backup1")))
}

/// Cells 2/4's loaded run (speculative, 25 ms, streams both ways), plain
/// and with mutual TLS, TLS_RUNS valid runs each, alternating; a failed
/// run (e.g. protection lost) is reported and taken again, at most
/// TLS_RUNS + 3 attempts per setup. Returns the runs and the attempts.
fn tls_cell(started: Instant, problems: &mut Problems) -> ([Vec<Load>; 2], [usize; 2]) {
    let mut out: [Vec<Load>; 2] = Default::default();
    let mut attempts = [0usize; 2];
    let dir = tag_dir("certs");
    let tls = match make_certs(&dir) {
        Ok(t) => t,
        Err(e) => {
            problems.add(format!("tls: certificates: {e}"));
            return (out, attempts);
        }
    };
    let wl = format!("sink:{SINK},source:{SOURCE}:1000000");
    while (0..2).any(|k| out[k].len() < TLS_RUNS && attempts[k] < TLS_RUNS + 3) {
        for (k, (name, on)) in TLS_SETUPS.iter().enumerate() {
            if out[k].len() >= TLS_RUNS || attempts[k] >= TLS_RUNS + 3 {
                continue;
            }
            attempts[k] += 1;
            let run = attempts[k] - 1;
            let extras = Extras {
                fence: false,
                tls: on.then(|| tls.clone()),
            };
            match load_run_with(Mode::Speculative, &wl, extras) {
                Ok(l) => {
                    eprintln!(
                        "{} tls {name} run {}: guest->client {:.3} client->guest {:.3} Gbit/s, primary cpu {:.2} s in {:.1} s, {} checkpoints, repl {:.0} MiB, pause p50 {:.0} p99 {:.0} us",
                        elapsed(started),
                        run + 1,
                        l.g2c_gbps,
                        l.c2g_gbps,
                        l.primary_cpu,
                        l.secs,
                        l.ckpts,
                        l.repl_bytes as f64 / (1 << 20) as f64,
                        percentile(&l.pauses_us, 50.0),
                        percentile(&l.pauses_us, 99.0)
                    );
                    out[k].push(l);
                }
                Err(e) => problems.add(format!("tls {name} run {}: {e}", run + 1)),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    (out, attempts)
}

// ---------------------------------------------------------------- 5: memory

#[derive(Default, Clone)]
struct Memory {
    primary_rss: u64,
    primary_hwm: u64,
    backup_rss: u64,
    backup_hwm: u64,
    ckpt_bytes_p50: f64,
    ckpt_bytes_max: f64,
    pause_p50_us: f64,
    ckpts_per_s: f64,
}

fn memory_run() -> Result<Memory, String> {
    let mut vm = Vm::start(
        Kind::Remora {
            mode: Mode::Speculative,
            epoch_ms: TARGET_EPOCH,
        },
        &format!("mem:400,echo:{ECHO}"),
    )?;
    // Let the checker touch its 400 MiB and the checkpoints settle.
    std::thread::sleep(Duration::from_secs(2));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll_status(vm.psock.clone(), stop.clone());
    let (pp, bp) = (vm.primary_pid(), vm.backup_pid());
    let e0 = num(&vm.status(), "epoch").unwrap_or(0);
    let t0 = Instant::now();
    let mut m = Memory::default();
    while t0.elapsed() < Duration::from_secs(4) {
        let (p, b) = (rss_kib(pp).0, rss_kib(bp).0);
        m.primary_rss = m.primary_rss.max(p);
        m.backup_rss = m.backup_rss.max(b);
        std::thread::sleep(Duration::from_millis(50));
    }
    let e1 = num(&vm.status(), "epoch").unwrap_or(0);
    m.ckpts_per_s = e1.saturating_sub(e0) as f64 / t0.elapsed().as_secs_f64();
    m.primary_hwm = rss_kib(pp).1;
    m.backup_hwm = rss_kib(bp).1;
    stop.store(true, Ordering::Relaxed);
    let polled = poller.join().unwrap();
    vm.check_protected()?;
    let (p, _) = vm.stop();
    if let Some(p) = p {
        if p.stdout().contains("MISMATCH") {
            return Err(format!("the memory checker failed:\n{}", p.stdout()));
        }
    }
    let bytes: Vec<f64> = polled.ckpts.values().map(|v| v.1 as f64).collect();
    let pauses: Vec<f64> = polled.ckpts.values().map(|v| v.0 as f64).collect();
    m.ckpt_bytes_p50 = median(&bytes);
    m.ckpt_bytes_max = max(&bytes);
    m.pause_p50_us = median(&pauses);
    Ok(m)
}

// ---------------------------------------------------------------- 7: QEMU

/// Fixed-size guest->client transfer (QEMU_MIB): Gbit/s from connect to EOF.
fn fixed_transfer(kind: Kind) -> Result<f64, String> {
    let vm = Vm::start(kind, &format!("source:{SOURCE}:{QEMU_MIB}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let mut s = connect(&vm.lan, SOURCE)?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) => return Err(format!("{kind:?}: source stream: {e}")),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = vm.stop();
    if n != QEMU_MIB << 20 {
        return Err(format!("{kind:?}: got {n} bytes, want {}", QEMU_MIB << 20));
    }
    Ok(n as f64 * 8.0 / secs / 1e9)
}

// ---------------------------------------------------------------- main

fn main() {
    common::require_kvm();
    let only = std::env::var("REMORA_BENCH_ONLY").ok();
    let want = |what: &str| only.as_deref().is_none_or(|o| o.split(',').any(|w| w.trim() == what));
    let failovers: usize = std::env::var("REMORA_BENCH_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FAILOVERS);
    let started = Instant::now();
    let mut problems = Problems::default();

    // 1 + 6
    let tput = if want("throughput") {
        throughput(started, &mut problems)
    } else {
        Vec::new()
    };

    // 2 + 4: protected and unprotected under the same streams, alternating.
    let (mut prot, mut unprot) = (Vec::new(), Vec::new());
    if want("pause") {
        let wl = format!("sink:{SINK},source:{SOURCE}:1000000");
        for run in 0..RUNS {
            for mode in [Mode::Speculative, Mode::Unprotected] {
                match load_run(mode, &wl) {
                    Ok(l) => {
                        eprintln!(
                            "{} load {} run {}: guest->client {:.3} client->guest {:.3} Gbit/s, cpu {:.2} s in {:.1} s, {} checkpoints, repl {:.0} MiB, pause p50 {:.0} p99 {:.0} max {:.0} us (coverage {:.0}%)",
                            elapsed(started),
                            mode.name(),
                            run + 1,
                            l.g2c_gbps,
                            l.c2g_gbps,
                            l.primary_cpu,
                            l.secs,
                            l.ckpts,
                            l.repl_bytes as f64 / (1 << 20) as f64,
                            percentile(&l.pauses_us, 50.0),
                            percentile(&l.pauses_us, 99.0),
                            max(&l.pauses_us),
                            l.coverage * 100.0
                        );
                        if mode == Mode::Unprotected {
                            unprot.push(l);
                        } else {
                            prot.push(l);
                        }
                    }
                    Err(e) => problems.add(format!("load run {} {}: {e}", mode.name(), run + 1)),
                }
            }
        }
    }

    // 3
    let mut fo: Vec<Failover> = Vec::new();
    let (mut fo_failed, mut fo_lost) = (0, 0);
    if want("failover") {
        // A trial whose VM lost its protection before the kill is no
        // failover: it is reported and replaced (at most 5 times).
        let mut i = 0;
        while fo.len() + fo_failed < failovers && fo_lost < 5 {
            let at = kill_moment(i % failovers, failovers);
            i += 1;
            match failover_trial(at) {
                Ok(f) => {
                    eprintln!(
                        "{} failover trial {} (kill at {:?}): data again after {:.0} ms (read gap {:.0} ms, backup's first frame {:.0} ms); backup: detect {} restore {} running {} ms; {} MiB before, {} MiB after",
                        elapsed(started),
                        i,
                        at,
                        f.resume_ms,
                        f.gap_ms,
                        f.first_frame_ms,
                        f.detect_ms,
                        f.restore_ms,
                        f.running_ms,
                        f.before >> 20,
                        f.after >> 20
                    );
                    fo.push(f);
                }
                Err(TrialError::LostBeforeKill(e)) => {
                    fo_lost += 1;
                    problems.add(format!(
                        "failover trial {i} (kill due at {at:?}): protection lost BEFORE the kill (trial replaced): {e}"
                    ));
                }
                Err(TrialError::Failed(e)) => {
                    fo_failed += 1;
                    problems.add(format!("failover trial {i} (kill at {at:?}): {e}"));
                }
            }
        }
    }

    // 8
    let fence = if want("fence") {
        let n = std::env::var("REMORA_BENCH_FENCE_FAILOVERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(FENCE_FAILOVERS);
        fence_cell(n, started, &mut problems)
    } else {
        Default::default()
    };

    // 9
    let (tls, tls_attempts) = if want("tls") {
        tls_cell(started, &mut problems)
    } else {
        Default::default()
    };

    // 5
    let mut mem: Vec<Memory> = Vec::new();
    let mut mem_attempts = 0;
    if want("memory") {
        // A run that loses its protection is reported and does not count;
        // at most RUNS + 2 attempts.
        while mem.len() < RUNS && mem_attempts < RUNS + 2 {
            mem_attempts += 1;
            let run = mem_attempts - 1;
            match memory_run() {
                Ok(m) => {
                    eprintln!(
                        "{} memory attempt {}: primary rss {} MiB (hwm {}), backup rss {} MiB (hwm {}); ckpt p50 {:.1} MiB, {:.1} ckpt/s",
                        elapsed(started),
                        run + 1,
                        m.primary_rss >> 10,
                        m.primary_hwm >> 10,
                        m.backup_rss >> 10,
                        m.backup_hwm >> 10,
                        m.ckpt_bytes_p50 / (1 << 20) as f64,
                        m.ckpts_per_s
                    );
                    mem.push(m);
                }
                Err(e) => problems.add(format!("memory attempt {}: {e}", run + 1)),
            }
        }
    }

    // 7
    let (mut rq, mut qq) = (Vec::new(), Vec::new());
    if want("qemu") {
        for run in 0..QEMU_RUNS {
            for (kind, v) in [
                (
                    Kind::Remora {
                        mode: Mode::Unprotected,
                        epoch_ms: TARGET_EPOCH,
                    },
                    &mut rq,
                ),
                (Kind::Qemu, &mut qq),
            ] {
                let g = fixed_transfer(kind).unwrap_or_else(|e| {
                    problems.add(format!("fixed transfer run {}: {e}", run + 1));
                    f64::NAN
                });
                eprintln!(
                    "{} {QEMU_MIB} MiB guest->client run {} {}: {g:.3} Gbit/s",
                    elapsed(started),
                    run + 1,
                    if kind == Kind::Qemu { "qemu" } else { "remora" }
                );
                v.push(g);
            }
        }
    }

    let total = started.elapsed().as_secs_f64();
    let report = Report {
        tput,
        prot,
        unprot,
        fo,
        fo_failed,
        fo_lost,
        fence,
        tls,
        tls_attempts,
        mem,
        mem_attempts,
        rq,
        qq,
        problems: problems.0,
        total,
    };
    report.print();
    report.write_json();
}

struct Report {
    tput: Vec<Setup>,
    prot: Vec<Load>,
    unprot: Vec<Load>,
    fo: Vec<Failover>,
    fo_failed: usize,
    /// Trials whose VM lost its protection before the kill (replaced).
    fo_lost: usize,
    /// Cell 8: [no fence, fence].
    fence: [FenceCell; 2],
    /// Cell 9: [plaintext, mTLS].
    tls: [Vec<Load>; 2],
    tls_attempts: [usize; 2],
    mem: Vec<Memory>,
    mem_attempts: usize,
    rq: Vec<f64>,
    qq: Vec<f64>,
    problems: Vec<String>,
    total: f64,
}

/// Medians of a per-run field.
fn med<T>(v: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(&v.iter().map(f).filter(|x| x.is_finite()).collect::<Vec<_>>())
}

impl Report {
    fn cell(&self, mode: Mode, epoch: Option<u64>) -> Option<&Setup> {
        self.tput.iter().find(|s| s.mode == mode && s.epoch_ms == epoch)
    }

    fn print(&self) {
        println!(
            "remora replication benchmark: test guest, {VCPUS} vCPUs, {MEM_MIB} MiB; medians of {RUNS} runs unless said; \
             HA LAN in network namespaces (client, switch, primary, backup, replication link)"
        );
        let mut targets: Vec<String> = Vec::new();

        if !self.tput.is_empty() {
            println!();
            println!(
                "1. TCP throughput, Gbit/s (unpaced client, {:.1} s runs, first {:.1} s not counted; client->guest = bytes the guest acknowledged)",
                RUN.as_secs_f64(),
                SKIP.as_secs_f64()
            );
            for (name, desc) in LINKS {
                println!("   {name:<7} {desc}");
            }
            println!(
                "   {:<7} {:<14} {:>5} {:>11} {:>9} {:>11} {:>10} {:>10}",
                "link", "direction", "epoch", "unprotected", "buffered", "speculative", "spec/unpr", "spec/buf"
            );
            let unp = self.cell(Mode::Unprotected, None);
            // (median, its text: "*" when fewer than RUNS runs are valid).
            let cell = |s: Option<&Setup>, g2c: bool, l: usize| -> (f64, String) {
                let Some(s) = s else {
                    return (f64::NAN, "-".into());
                };
                let v = if g2c { &s.g2c[l] } else { &s.c2g[l] };
                let m = median(v);
                let valid = v.iter().filter(|x| x.is_finite()).count();
                let star = if valid < RUNS && valid > 0 { "*" } else { "" };
                (m, format!("{}{star}", fmt(m, 3)))
            };
            let mut starred = false;
            for (li, (link, _)) in LINKS.iter().enumerate() {
                for (dir, g2c) in [("guest->client", true), ("client->guest", false)] {
                    let (u, ut) = cell(unp, g2c, li);
                    for e in epochs() {
                        let (b, bt) = cell(self.cell(Mode::Buffered, Some(e)), g2c, li);
                        let (sp, st) = cell(self.cell(Mode::Speculative, Some(e)), g2c, li);
                        starred |= [&ut, &bt, &st].iter().any(|t| t.ends_with('*'));
                        println!(
                            "   {link:<7} {dir:<14} {:>3}ms {ut:>11} {bt:>9} {st:>11} {:>10} {:>10}",
                            e,
                            ratio(sp, u),
                            ratio(sp, b)
                        );
                        if e == TARGET_EPOCH && g2c {
                            if li == 0 {
                                targets.push(format!(
                                    "speculative >= 0.9x unprotected guest->client ({link}, {e} ms): {} ({})",
                                    ratio(sp, u),
                                    verdict(sp >= 0.9 * u)
                                ));
                            } else {
                                targets.push(format!(
                                    "speculative >= 5x buffered guest->client ({link}, {e} ms): {} ({})",
                                    ratio(sp, b),
                                    verdict(sp >= 5.0 * b)
                                ));
                            }
                        }
                    }
                }
            }
            if starred {
                println!("   * median of fewer than {RUNS} valid runs (see the protection losses below)");
            }
            let lost: Vec<String> = self
                .tput
                .iter()
                .filter(|s| s.lost > 0)
                .map(|s| {
                    format!(
                        "{} {}: {}",
                        s.mode.name(),
                        s.epoch_ms.map_or("-".into(), |e| format!("{e}ms")),
                        s.lost
                    )
                })
                .collect();
            let n = RUNS * (LINKS.len() + 1);
            if lost.is_empty() {
                println!("   protection held through every measurement");
            } else {
                println!(
                    "   protection LOST during measurements (of {n} per setup; each taken again once on a fresh VM pair, see Problems): {}",
                    lost.join(", ")
                );
            }
            // The unshaped-LAN target the brief also reads on the shaped link.
            if let (Some(u), Some(s)) = (unp, self.cell(Mode::Speculative, Some(TARGET_EPOCH))) {
                let (u, s) = (median(&u.g2c[1]), median(&s.g2c[1]));
                targets.push(format!(
                    "speculative >= 0.9x unprotected guest->client ({}, {TARGET_EPOCH} ms): {} ({})",
                    LINKS[1].0,
                    ratio(s, u),
                    verdict(s >= 0.9 * u)
                ));
            }
            if let (Some(b), Some(s)) = (
                self.cell(Mode::Buffered, Some(TARGET_EPOCH)),
                self.cell(Mode::Speculative, Some(TARGET_EPOCH)),
            ) {
                let (b, s) = (median(&b.c2g[1]), median(&s.c2g[1]));
                targets.push(format!(
                    "(for reference, not a target) speculative/buffered client->guest ({}, {TARGET_EPOCH} ms): {}",
                    LINKS[1].0,
                    ratio(s, b)
                ));
            }
        }

        if !self.prot.is_empty() || !self.unprot.is_empty() {
            let p = &self.prot;
            let pauses: Vec<f64> = p.iter().flat_map(|l| l.pauses_us.iter().copied()).collect();
            println!();
            println!(
                "2. Checkpoint pause under TCP streams both ways (speculative, {TARGET_EPOCH} ms epochs, {:.0} s runs; status polled every {} ms)",
                LOAD_RUN.as_secs_f64(),
                STATUS_POLL.as_millis()
            );
            println!(
                "   checkpoints sampled {} ({:.0}% of those taken), pause p50 {} us, p99 {} us, max {} us (primary's own p99: {} us)",
                pauses.len(),
                med(p, |l| l.coverage) * 100.0,
                fmt(med(p, |l| percentile(&l.pauses_us, 50.0)), 0),
                fmt(med(p, |l| percentile(&l.pauses_us, 99.0)), 0),
                fmt(med(p, |l| max(&l.pauses_us)), 0),
                fmt(med(p, |l| l.own_p99_us), 0)
            );
            println!(
                "   bytes per checkpoint p50 {} KiB, p99 {} KiB, max {} KiB",
                fmt(med(p, |l| percentile(&l.bytes, 50.0)) / 1024.0, 0),
                fmt(med(p, |l| percentile(&l.bytes, 99.0)) / 1024.0, 0),
                fmt(med(p, |l| max(&l.bytes)) / 1024.0, 0)
            );
            let p99 = med(p, |l| percentile(&l.pauses_us, 99.0));
            targets.push(format!(
                "checkpoint pause p99 <= 2 ms: {} us ({})",
                fmt(p99, 0),
                verdict(p99 <= 2000.0)
            ));
            let u = &self.unprot;
            println!();
            println!(
                "4. Replication link and CPU, same runs (streams both ways), vs an unprotected VM under the same streams; \
                 CPU in cores (CPU s per s) by the primary's threads"
            );
            println!(
                "   {:<12} {:>9} {:>9} {:>8} {:>10} {:>7} {:>6} {:>7} {:>6} {:>8} {:>7} {:>8}",
                "",
                "g->c Gb/s",
                "c->g Gb/s",
                "ckpts/s",
                "repl MiB/s",
                "primary",
                "vCPUs",
                "devices",
                "main",
                "repl thr",
                "backup",
                "ms/ckpt"
            );
            let grp = |l: &Load, g: &str| l.threads.get(g).copied().unwrap_or(0.0) / l.secs;
            for (name, v) in [("protected", p), ("unprotected", u)] {
                // The checkpoint machinery: the VMM's event loop (pause,
                // capture) and the replication threads (encode, send, acks).
                let per = med(v, |l| {
                    if l.ckpts > 0 {
                        (l.threads.get("main").copied().unwrap_or(0.0)
                            + l.threads.get("replication").copied().unwrap_or(0.0))
                            / l.ckpts as f64
                            * 1e3
                    } else {
                        f64::NAN
                    }
                });
                println!(
                    "   {name:<12} {:>9} {:>9} {:>8} {:>10} {:>7} {:>6} {:>7} {:>6} {:>8} {:>7} {:>8}",
                    fmt(med(v, |l| l.g2c_gbps), 3),
                    fmt(med(v, |l| l.c2g_gbps), 3),
                    fmt(med(v, |l| l.ckpts as f64 / l.secs), 1),
                    fmt(med(v, |l| l.repl_bytes as f64 / l.secs / (1 << 20) as f64), 1),
                    fmt(med(v, |l| l.primary_cpu / l.secs), 2),
                    fmt(med(v, |l| grp(l, "vcpu")), 2),
                    fmt(med(v, |l| grp(l, "device")), 2),
                    fmt(med(v, |l| grp(l, "main")), 2),
                    fmt(med(v, |l| grp(l, "replication")), 2),
                    if name == "protected" {
                        fmt(med(v, |l| l.backup_cpu / l.secs), 2)
                    } else {
                        "-".into()
                    },
                    fmt(per, 2),
                );
            }
            println!(
                "   ms/ckpt = CPU of the event loop (pause, capture) + replication threads (encode, send, acks) per checkpoint; \
                 the link carries {} Gbit/s ({} MiB per checkpoint on the wire)",
                fmt(med(p, |l| l.repl_bytes as f64 * 8.0 / l.secs / 1e9), 3),
                fmt(
                    med(p, |l| if l.ckpts > 0 {
                        l.repl_bytes as f64 / l.ckpts as f64 / (1 << 20) as f64
                    } else {
                        f64::NAN
                    }),
                    2
                )
            );
        }

        if !self.fo.is_empty() || self.fo_failed > 0 {
            let f = &self.fo;
            let resume: Vec<f64> = f.iter().map(|x| x.resume_ms).collect();
            println!();
            println!(
                "3. Failover: {} kills of the primary (SIGKILL) during a guest->client stream (speculative, {TARGET_EPOCH} ms, \
                 heartbeat timeout 100 ms): {} measured, {} failed after the kill; {} more trials lost protection BEFORE the kill \
                 (not counted, replaced; see Problems)",
                self.fo.len() + self.fo_failed,
                self.fo.len(),
                self.fo_failed,
                self.fo_lost
            );
            let col = |g: fn(&Failover) -> f64| f.iter().map(g).collect::<Vec<_>>();
            println!(
                "   kill -> client receives data again: p50 {} ms, max {} ms (its read gap p50 {} ms, max {} ms); \
                 kill -> backup host's first stream frame p50 {} ms, max {} ms; every byte of the stream checked{}",
                fmt(median(&resume), 0),
                fmt(max(&resume), 0),
                fmt(median(&col(|x| x.gap_ms)), 0),
                fmt(max(&col(|x| x.gap_ms)), 0),
                fmt(median(&col(|x| x.first_frame_ms)), 0),
                fmt(max(&col(|x| x.first_frame_ms)), 0),
                if self.fo_failed == 0 {
                    ": exact"
                } else {
                    " (see Problems)"
                }
            );
            let dropped: u64 = f.iter().map(|x| x.dropped).sum();
            if dropped > 0 {
                println!("   (the LAN capture lost {dropped} frames over the trials: a first frame may be seen late)");
            }
            println!(
                "   backup's own line (p50/max): detect {}/{} ms, restore {}/{} ms, guest running {}/{} ms after the decision",
                fmt(med(f, |x| x.detect_ms), 0),
                fmt(max(&f.iter().map(|x| x.detect_ms).collect::<Vec<_>>()), 0),
                fmt(med(f, |x| x.restore_ms), 0),
                fmt(max(&f.iter().map(|x| x.restore_ms).collect::<Vec<_>>()), 0),
                fmt(med(f, |x| x.running_ms), 0),
                fmt(max(&f.iter().map(|x| x.running_ms).collect::<Vec<_>>()), 0),
            );
            let p50 = median(&resume);
            targets.push(format!(
                "failover p50 <= 300 ms: {} ms ({}{})",
                fmt(p50, 0),
                verdict(p50 <= 300.0 && self.fo_failed == 0),
                if self.fo_failed > 0 { ", with failed trials" } else { "" }
            ));
        }

        if !self.mem.is_empty() {
            let m = &self.mem;
            let guest = (MEM_MIB << 10) as f64;
            println!();
            println!(
                "5. Memory with mem:400 (the guest rewrites 400 MiB), speculative {TARGET_EPOCH} ms; MiB (x guest RAM {MEM_MIB} MiB); \
                 {} runs that stayed protected of {} attempts",
                m.len(),
                self.mem_attempts
            );
            let mib = |k: f64| format!("{} ({})", fmt(k / 1024.0, 0), ratio(k, guest));
            println!(
                "   primary VmRSS {}, VmHWM {};  backup VmRSS {}, VmHWM {}",
                mib(med(m, |x| x.primary_rss as f64)),
                mib(med(m, |x| x.primary_hwm as f64)),
                mib(med(m, |x| x.backup_rss as f64)),
                mib(med(m, |x| x.backup_hwm as f64))
            );
            let ck = med(m, |x| x.ckpt_bytes_p50);
            println!(
                "   checkpoints meanwhile: p50 {} MiB, max {} MiB, {} per s, pause p50 {} ms",
                fmt(ck / (1 << 20) as f64, 1),
                fmt(med(m, |x| x.ckpt_bytes_max) / (1 << 20) as f64, 1),
                fmt(med(m, |x| x.ckpts_per_s), 1),
                fmt(med(m, |x| x.pause_p50_us) / 1e3, 1)
            );
            if !self.prot.is_empty() {
                println!(
                    "   under the TCP streams of 2. (no mem workload): primary VmRSS {} MiB, backup VmRSS {} MiB",
                    fmt(med(&self.prot, |l| l.primary_rss_kib as f64) / 1024.0, 0),
                    fmt(med(&self.prot, |l| l.backup_rss_kib as f64) / 1024.0, 0)
                );
            }
            let ck_max = med(m, |x| x.ckpt_bytes_max) / 1024.0;
            let limit_kib = 1.1 * guest + MAX_IN_FLIGHT as f64 * ck_max;
            let b = med(m, |x| x.backup_hwm as f64);
            println!(
                "   allowance: 1.1x guest RAM + {MAX_IN_FLIGHT} (the primary's in-flight limit) x the largest checkpoint = {} MiB \
                 (with one checkpoint: {} MiB)",
                fmt(limit_kib / 1024.0, 0),
                fmt((1.1 * guest + ck_max) / 1024.0, 0)
            );
            targets.push(format!(
                "backup <= 1.1x guest RAM + checkpoints in flight ({} MiB): VmHWM {} MiB ({})",
                fmt(limit_kib / 1024.0, 0),
                fmt(b / 1024.0, 0),
                verdict(b <= limit_kib)
            ));
        }

        let rr: Vec<&Setup> = self.tput.iter().filter(|s| !s.rr.is_empty()).collect();
        if !rr.is_empty() {
            let u = self.cell(Mode::Unprotected, None).map(|s| percentile(&s.rr, 50.0));
            println!();
            println!(
                "6. Request/response: 64-byte round trips against echo (unshaped LAN; {RUNS} runs of up to {RR_MAX} or {:.1} s, pooled), us",
                RR_TIME.as_secs_f64()
            );
            println!(
                "   {:<12} {:>5} {:>8} {:>9} {:>9} {:>9} {:>12}",
                "mode", "epoch", "samples", "p50", "p99", "max", "p50 added"
            );
            for s in rr {
                let p50 = percentile(&s.rr, 50.0);
                println!(
                    "   {:<12} {:>5} {:>8} {:>9} {:>9} {:>9} {:>12}",
                    s.mode.name(),
                    s.epoch_ms.map_or("-".into(), |e| format!("{e}ms")),
                    s.rr.len(),
                    fmt(p50, 0),
                    fmt(percentile(&s.rr, 99.0), 0),
                    fmt(max(&s.rr), 0),
                    u.map_or("-".into(), |u| if s.mode == Mode::Unprotected {
                        "-".into()
                    } else {
                        fmt(p50 - u, 0)
                    })
                );
            }
        }

        if !self.rq.is_empty() {
            let (r, q) = (median(&self.rq), median(&self.qq));
            println!();
            println!(
                "7. Unprotected remora vs QEMU microvm (virtio-net-device, vhost=off) on the primary host: {QEMU_MIB} MiB guest->client, \
                 Gbit/s, median of {QEMU_RUNS} runs each (alternating)"
            );
            println!(
                "   remora {} (runs {}), QEMU {} (runs {}): remora/QEMU {}",
                fmt(r, 3),
                self.rq.iter().map(|x| fmt(*x, 2)).collect::<Vec<_>>().join(" "),
                fmt(q, 3),
                self.qq.iter().map(|x| fmt(*x, 2)).collect::<Vec<_>>().join(" "),
                ratio(r, q)
            );
            targets.push(format!(
                "unprotected remora >= 1.0x QEMU guest->client: {} ({})",
                if r.is_finite() && q > 0.0 {
                    format!("{:.3}x", r / q)
                } else {
                    "-".into()
                },
                verdict(r >= q)
            ));
        }

        if self.fence.iter().any(|c| !c.fo.is_empty() || c.failed > 0) {
            println!();
            println!(
                "8. Failover with and without the fence: cell 3's trial (speculative, {TARGET_EPOCH} ms, SIGKILL of the primary 1.0 to 2.0 s \
                 into a guest->client stream, every byte checked), unfenced and fenced (one-member etcd on the fence network, \
                 --fence on both), alternating; ms"
            );
            println!(
                "   {:<9} {:>8} {:>6} {:>4} {:>14} {:>13} {:>12} {:>12} {:>12} {:>12}",
                "setup",
                "measured",
                "failed",
                "lost",
                "kill->data p50",
                "max",
                "first frame",
                "detect",
                "(fence)",
                "restore"
            );
            let pm = |v: &[Failover], g: fn(&Failover) -> f64| {
                let c: Vec<f64> = v.iter().map(g).collect();
                format!("{}/{}", fmt(median(&c), 0), fmt(max(&c), 0))
            };
            for ((name, _), c) in FENCE_SETUPS.iter().zip(&self.fence) {
                let resume: Vec<f64> = c.fo.iter().map(|x| x.resume_ms).collect();
                println!(
                    "   {name:<9} {:>8} {:>6} {:>4} {:>14} {:>13} {:>12} {:>12} {:>12} {:>12}",
                    c.fo.len(),
                    c.failed,
                    c.lost,
                    fmt(median(&resume), 0),
                    fmt(max(&resume), 0),
                    pm(&c.fo, |x| x.first_frame_ms),
                    pm(&c.fo, |x| x.detect_ms),
                    pm(&c.fo, |x| x.fence_ms),
                    pm(&c.fo, |x| x.restore_ms),
                );
            }
            let p50 = |c: &FenceCell| median(&c.fo.iter().map(|x| x.resume_ms).collect::<Vec<_>>());
            println!(
                "   columns with two figures: p50/max; (fence) = the backup's own `(fence N ms)`, part of its detect; \
                 fenced - unfenced kill->data p50: {} ms",
                fmt(p50(&self.fence[1]) - p50(&self.fence[0]), 0)
            );
        }

        if self.tls.iter().any(|v| !v.is_empty()) {
            println!();
            println!(
                "9. TLS cost: cells 2/4's run (speculative, {TARGET_EPOCH} ms, TCP streams both ways, {:.0} s), plain TCP vs mutual TLS \
                 on the replication link, {TLS_RUNS} valid runs wanted each (a failed run is taken again, at most {} attempts), \
                 alternating; medians of the per-run figures",
                LOAD_RUN.as_secs_f64(),
                TLS_RUNS + 3
            );
            println!(
                "   {:<9} {:>4} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>8} {:>6}",
                "setup",
                "runs",
                "g->c Gb/s",
                "c->g Gb/s",
                "pause p50",
                "p99 us",
                "ckpt KiB",
                "wire KiB",
                "repl MiB/s",
                "ckpts/s",
                "primary",
                "repl thr",
                "main"
            );
            let grp = |l: &Load, g: &str| l.threads.get(g).copied().unwrap_or(0.0) / l.secs;
            let wire = |l: &Load| {
                if l.ckpts > 0 {
                    l.repl_bytes as f64 / l.ckpts as f64 / 1024.0
                } else {
                    f64::NAN
                }
            };
            for (((name, _), v), n) in TLS_SETUPS.iter().zip(&self.tls).zip(self.tls_attempts) {
                println!(
                    "   {name:<9} {:>4} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>8} {:>6}",
                    format!("{}/{n}", v.len()),
                    fmt(med(v, |l| l.g2c_gbps), 3),
                    fmt(med(v, |l| l.c2g_gbps), 3),
                    fmt(med(v, |l| percentile(&l.pauses_us, 50.0)), 0),
                    fmt(med(v, |l| percentile(&l.pauses_us, 99.0)), 0),
                    fmt(med(v, |l| percentile(&l.bytes, 50.0)) / 1024.0, 0),
                    fmt(med(v, wire), 0),
                    fmt(med(v, |l| l.repl_bytes as f64 / l.secs / (1 << 20) as f64), 1),
                    fmt(med(v, |l| l.ckpts as f64 / l.secs), 1),
                    fmt(med(v, |l| l.primary_cpu / l.secs), 2),
                    fmt(med(v, |l| grp(l, "replication")), 2),
                    fmt(med(v, |l| grp(l, "main")), 2),
                );
            }
            let (a, b) = (&self.tls[0], &self.tls[1]);
            println!(
                "   mTLS/plaintext: pause p50 {}, p99 {}, repl MiB/s {}, primary CPU/s {}, wire bytes per checkpoint {}",
                ratio(med(b, |l| percentile(&l.pauses_us, 50.0)), med(a, |l| percentile(&l.pauses_us, 50.0))),
                ratio(med(b, |l| percentile(&l.pauses_us, 99.0)), med(a, |l| percentile(&l.pauses_us, 99.0))),
                ratio(
                    med(b, |l| l.repl_bytes as f64 / l.secs),
                    med(a, |l| l.repl_bytes as f64 / l.secs)
                ),
                ratio(med(b, |l| l.primary_cpu / l.secs), med(a, |l| l.primary_cpu / l.secs)),
                ratio(med(b, wire), med(a, wire)),
            );
            println!(
                "   pause = status-polled checkpoint pause (us); ckpt KiB = checkpoint size p50 (status ckpt_bytes); wire KiB = bytes sent \
                 on repl0 per checkpoint; primary = the primary's CPU in cores (CPU s per s), repl thr / main = its replication \
                 threads / event loop"
            );
        }

        println!();
        println!("Targets:");
        for t in &targets {
            println!("   {t}");
        }
        if !self.problems.is_empty() {
            println!();
            println!("Problems ({}; details on stderr):", self.problems.len());
            for p in &self.problems {
                println!("   {p}");
            }
        }
        println!("total bench time {:.0} s", self.total);
    }

    fn write_json(&self) {
        let mut o: Vec<String> = vec![
            "\"benchmark\":\"replication\"".into(),
            format!("\"vcpus\":{VCPUS},\"mem_mib\":{MEM_MIB},\"runs\":{RUNS}"),
            format!(
                "\"run_s\":{},\"skip_s\":{},\"epochs_ms\":{:?},\"target_epoch_ms\":{TARGET_EPOCH}",
                RUN.as_secs_f64(),
                SKIP.as_secs_f64(),
                EPOCHS_MS
            ),
            format!(
                "\"links\":[{}]",
                LINKS
                    .iter()
                    .map(|(n, d)| format!("{{\"name\":{},\"desc\":{}}}", jstr(n), jstr(d)))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ];
        let rows: Vec<String> = self
            .tput
            .iter()
            .map(|s| {
                let links: Vec<String> = LINKS
                    .iter()
                    .enumerate()
                    .map(|(i, (n, _))| {
                        format!(
                            "{}:{{\"guest_to_client_gbps\":{},\"client_to_guest_gbps\":{},\"guest_to_client_runs\":{},\"client_to_guest_runs\":{}}}",
                            jstr(n),
                            jnum(median(&s.g2c[i])),
                            jnum(median(&s.c2g[i])),
                            jarr(&s.g2c[i]),
                            jarr(&s.c2g[i])
                        )
                    })
                    .collect();
                format!(
                    "{{\"mode\":{},\"epoch_ms\":{},\"protection_lost\":{},{},\"rr_us\":{{\"samples\":{},\"p50\":{},\"p99\":{},\"max\":{},\"runs_p50\":{}}},\"status\":{}}}",
                    jstr(s.mode.name()),
                    s.epoch_ms.map_or("null".into(), |e| e.to_string()),
                    s.lost,
                    links.join(","),
                    s.rr.len(),
                    jnum(percentile(&s.rr, 50.0)),
                    jnum(percentile(&s.rr, 99.0)),
                    jnum(max(&s.rr)),
                    jarr(&s.rr_runs_p50),
                    jstr(&s.status)
                )
            })
            .collect();
        o.push(format!("\"throughput\":[\n{}\n]", rows.join(",\n")));
        let load = |v: &[Load]| -> String {
            let runs: Vec<String> = v
                .iter()
                .map(|l| {
                    format!(
                        "{{\"guest_to_client_gbps\":{},\"client_to_guest_gbps\":{},\"secs\":{},\"threads_cpu_s\":{{{}}},\"primary_cpu_s\":{},\"backup_cpu_s\":{},\"checkpoints\":{},\"repl_bytes\":{},\"coverage\":{},\"pause_p50_us\":{},\"pause_p99_us\":{},\"pause_max_us\":{},\"own_p99_us\":{},\"bytes_p50\":{},\"bytes_p99\":{},\"bytes_max\":{},\"primary_rss_kib\":{},\"backup_rss_kib\":{},\"pauses_us\":{}}}",
                        jnum(l.g2c_gbps),
                        jnum(l.c2g_gbps),
                        jnum(l.secs),
                        l.threads
                            .iter()
                            .map(|(k, v)| format!("{}:{}", jstr(k), jnum(*v)))
                            .collect::<Vec<_>>()
                            .join(","),
                        jnum(l.primary_cpu),
                        jnum(l.backup_cpu),
                        l.ckpts,
                        l.repl_bytes,
                        jnum(l.coverage),
                        jnum(percentile(&l.pauses_us, 50.0)),
                        jnum(percentile(&l.pauses_us, 99.0)),
                        jnum(max(&l.pauses_us)),
                        jnum(l.own_p99_us),
                        jnum(percentile(&l.bytes, 50.0)),
                        jnum(percentile(&l.bytes, 99.0)),
                        jnum(max(&l.bytes)),
                        l.primary_rss_kib,
                        l.backup_rss_kib,
                        jarr(&l.pauses_us)
                    )
                })
                .collect();
            format!("[{}]", runs.join(",\n"))
        };
        o.push(format!(
            "\"load\":{{\"protected\":{},\n\"unprotected\":{}}}",
            load(&self.prot),
            load(&self.unprot)
        ));
        let fo: Vec<String> = self.fo.iter().map(fo_json).collect();
        o.push(format!(
            "\"failover\":{{\"trials\":{},\"failed\":{},\"lost_before_kill\":{},\"runs\":[{}]}}",
            self.fo.len() + self.fo_failed,
            self.fo_failed,
            self.fo_lost,
            fo.join(",\n")
        ));
        o.push(format!(
            "\"fence_failover\":{{{}}}",
            FENCE_SETUPS
                .iter()
                .zip(&self.fence)
                .map(|((name, fenced), c)| format!(
                    "{}:{{\"fenced\":{fenced},\"trials\":{},\"failed\":{},\"lost_before_kill\":{},\"resume_ms_p50\":{},\"resume_ms_max\":{},\"fence_ms_p50\":{},\"fence_ms_max\":{},\"runs\":[{}]}}",
                    jstr(name),
                    c.fo.len() + c.failed,
                    c.failed,
                    c.lost,
                    jnum(median(&c.fo.iter().map(|x| x.resume_ms).collect::<Vec<_>>())),
                    jnum(max(&c.fo.iter().map(|x| x.resume_ms).collect::<Vec<_>>())),
                    jnum(median(&c.fo.iter().map(|x| x.fence_ms).collect::<Vec<_>>())),
                    jnum(max(&c.fo.iter().map(|x| x.fence_ms).collect::<Vec<_>>())),
                    c.fo.iter().map(fo_json).collect::<Vec<_>>().join(",\n")
                ))
                .collect::<Vec<_>>()
                .join(",\n")
        ));
        o.push(format!(
            "\"tls\":{{\"runs_per_setup\":{TLS_RUNS},\"attempts\":{{{}}},{}}}",
            TLS_SETUPS
                .iter()
                .zip(self.tls_attempts)
                .map(|((name, _), n)| format!("{}:{n}", jstr(name)))
                .collect::<Vec<_>>()
                .join(","),
            TLS_SETUPS
                .iter()
                .zip(&self.tls)
                .map(|((name, _), v)| format!("{}:{}", jstr(name), load(v)))
                .collect::<Vec<_>>()
                .join(",\n")
        ));
        let mem: Vec<String> = self
            .mem
            .iter()
            .map(|m| {
                format!(
                    "{{\"primary_rss_kib\":{},\"primary_hwm_kib\":{},\"backup_rss_kib\":{},\"backup_hwm_kib\":{},\"ckpt_bytes_p50\":{},\"ckpt_bytes_max\":{},\"ckpts_per_s\":{},\"pause_p50_us\":{}}}",
                    m.primary_rss,
                    m.primary_hwm,
                    m.backup_rss,
                    m.backup_hwm,
                    jnum(m.ckpt_bytes_p50),
                    jnum(m.ckpt_bytes_max),
                    jnum(m.ckpts_per_s),
                    jnum(m.pause_p50_us)
                )
            })
            .collect();
        o.push(format!(
            "\"memory\":{{\"attempts\":{},\"runs\":[{}]}}",
            self.mem_attempts,
            mem.join(",\n")
        ));
        o.push(format!(
            "\"qemu\":{{\"mib\":{QEMU_MIB},\"remora_gbps\":{},\"qemu_gbps\":{},\"remora_runs\":{},\"qemu_runs\":{}}}",
            jnum(median(&self.rq)),
            jnum(median(&self.qq)),
            jarr(&self.rq),
            jarr(&self.qq)
        ));
        o.push(format!(
            "\"problems\":[{}]",
            self.problems.iter().map(|p| jstr(p)).collect::<Vec<_>>().join(",")
        ));
        o.push(format!("\"total_s\":{:.0}", self.total));
        let dir = common::target_dir().join("bench");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("replication.json");
        std::fs::write(&path, format!("{{{}}}\n", o.join(",\n"))).unwrap();
        println!("wrote {}", path.display());
    }
}

/// One failover trial as JSON.
fn fo_json(f: &Failover) -> String {
    format!(
        "{{\"resume_ms\":{},\"gap_ms\":{},\"first_frame_ms\":{},\"detect_ms\":{},\"fence_ms\":{},\"restore_ms\":{},\"running_ms\":{},\"bytes_before\":{},\"bytes_after\":{},\"capture_dropped\":{}}}",
        jnum(f.resume_ms),
        jnum(f.gap_ms),
        jnum(f.first_frame_ms),
        jnum(f.detect_ms),
        jnum(f.fence_ms),
        jnum(f.restore_ms),
        jnum(f.running_ms),
        f.before,
        f.after,
        f.dropped
    )
}
