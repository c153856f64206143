//! Replication and failover end to end: a protected test guest on a
//! primary host (network namespace), a backup host, a client on the LAN
//! with real Linux TCP, and real processes killed with SIGKILL.
//!
//! Topology (remora-netlab's `HaLan`): client -- LAN bridge -- primary's
//! TAP / backup's TAP, and a separate replication link between the hosts.

mod common;

use common::*;
use remora_netlab::{Direction, EtcdCluster, HaLan, Host, LanPort, BACKUP_REPL_IP, ETCD_IPS, GUEST_IP};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:12:34:56";
const MIB: usize = 1 << 20;
/// Each test process picks its own ports.
static PORT: AtomicU16 = AtomicU16::new(0);

fn next_port() -> u16 {
    let base = 20000 + (std::process::id() % 20000) as u16;
    base + PORT.fetch_add(1, Ordering::Relaxed)
}

/// A primary and a backup on an `HaLan`.
struct Pair {
    lan: HaLan,
    dir: PathBuf,
    primary: Option<Running>,
    backup: Option<Running>,
    psock: PathBuf,
    bsock: PathBuf,
    port: u16,
    /// `--fence` for both, with its etcd (dropped after the processes).
    fence: Option<String>,
    etcd: Option<EtcdCluster>,
    /// More options for `start_primary` / `start_backup`.
    primary_extra: Vec<String>,
    backup_extra: Vec<String>,
}

struct Opts<'a> {
    workloads: &'a str,
    output: &'a str,
    /// Disk size in MiB (0: no disk).
    disk_mib: u64,
    vcpus: u32,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        require_kvm();
        Pair::on(tag, HaLan::new(tag).expect("namespaces"), None)
    }

    /// A pair fenced by a real etcd of `nodes` members on the fence network.
    fn new_fenced(tag: &str, nodes: usize) -> Pair {
        require_kvm();
        assert!(
            remora_netlab::etcd::available(),
            "etcd is not installed (scripts/deps.sh installs etcd-server)"
        );
        let lan = HaLan::new_fenced(tag).expect("namespaces");
        let etcd = EtcdCluster::start(lan.fence.as_ref(), &ETCD_IPS[..nodes], 2379).expect("etcd");
        Pair::on(tag, lan, Some(etcd))
    }

    fn on(tag: &str, lan: HaLan, etcd: Option<EtcdCluster>) -> Pair {
        let dir = std::env::temp_dir().join(format!("remora-repl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Pair {
            psock: dir.join("primary.sock"),
            bsock: dir.join("backup.sock"),
            lan,
            dir,
            primary: None,
            backup: None,
            port: next_port(),
            fence: etcd.as_ref().map(EtcdCluster::fence_arg),
            etcd,
            primary_extra: Vec::new(),
            backup_extra: Vec::new(),
        }
    }

    /// `--fence ARG`, if this pair is fenced.
    fn fence_args(&self) -> Vec<String> {
        match &self.fence {
            Some(f) => vec!["--fence".into(), f.clone()],
            None => Vec::new(),
        }
    }

    fn disk(&self, name: &str, mib: u64) -> PathBuf {
        let p = self.dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(mib << 20).unwrap();
        p
    }

    fn backup_addr(&self) -> String {
        format!("{BACKUP_REPL_IP}:{}", self.port)
    }

    /// `remora run` of the test guest with `workloads` on the primary host's
    /// TAP and control socket, then `extra` options.
    fn primary_command(&self, workloads: &str, extra: &[&str]) -> std::process::Command {
        let mut cmd = self.lan.primary.command(remora_bin().to_str().unwrap());
        cmd.args(["run", "--kernel", guest_bin().to_str().unwrap()])
            .args(["--cmdline", &format!("workload={workloads} ip={GUEST_IP}/24")])
            .args(["--net", &format!("tap={},mac={MAC}", self.lan.tap)])
            .args(["--control", self.psock.to_str().unwrap()])
            .args(extra);
        cmd
    }

    /// Starts `cmd` as the primary and waits for the guest's network.
    fn boot_primary(&mut self, mut cmd: std::process::Command) {
        let mut p = spawn(&mut cmd);
        p.wait_line("remora-guest: net up", Duration::from_secs(30))
            .expect("primary guest network up");
        self.primary = Some(p);
    }

    /// `remora backup --listen LISTEN` in `ns` on that host's TAP, then
    /// `extra` options.
    fn backup_command(&self, ns: &remora_netlab::Netns, listen: &str, extra: &[&str]) -> std::process::Command {
        let mut cmd = ns.command(remora_bin().to_str().unwrap());
        cmd.args(["backup", "--listen", listen])
            .args(["--net", &format!("tap={},mac={MAC}", self.lan.tap)])
            .args(extra);
        cmd
    }

    /// Starts a backup (waits for it to listen).
    fn start_backup(&mut self, o: &Opts) {
        let mut extra = vec!["--control".to_string(), self.bsock.display().to_string()];
        extra.extend(self.fence_args());
        extra.extend(self.backup_extra.iter().cloned());
        if o.disk_mib > 0 {
            let d = self.disk("backup.img", o.disk_mib);
            extra.extend(["--disk".into(), d.display().to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut cmd = self.backup_command(&self.lan.backup, &self.backup_addr(), &extra);
        self.backup = Some(spawn(&mut cmd));
        assert!(
            wait_listening(&self.lan.backup, self.port, Duration::from_secs(10)),
            "the backup never listened"
        );
    }

    /// Boots the protected primary and waits until it is protected.
    fn start_primary(&mut self, o: &Opts) {
        let mut extra: Vec<String> = vec![
            "--vcpus".into(),
            o.vcpus.to_string(),
            "--mem".into(),
            "256".into(),
            "--protect".into(),
            self.backup_addr(),
            "--output".into(),
            o.output.into(),
        ];
        extra.extend(self.fence_args());
        extra.extend(self.primary_extra.iter().cloned());
        if o.disk_mib > 0 {
            let d = self.disk("primary.img", o.disk_mib);
            extra.extend(["--disk".into(), d.display().to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        self.boot_primary(self.primary_command(o.workloads, &extra));
        if let Err(st) = try_wait_status(&self.psock, "protected=yes", Duration::from_secs(60)) {
            let p = self.primary.take().unwrap();
            p.signal(libc::SIGKILL);
            let p = p.finish(Duration::from_secs(5));
            let b = self.backup.take().unwrap();
            b.signal(libc::SIGKILL);
            let b = b.finish(Duration::from_secs(5));
            panic!(
                "never protected: {st}\n--- primary stderr:\n{}\n--- backup stderr:\n{}",
                p.stderr, b.stderr
            );
        }
    }

    fn kill_primary(&mut self) -> Run {
        let p = self.primary.take().expect("a primary");
        p.signal(libc::SIGKILL);
        p.finish(Duration::from_secs(5))
    }

    fn backup(&mut self) -> &mut Running {
        self.backup.as_mut().expect("a backup")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for r in [self.primary.take(), self.backup.take()].into_iter().flatten() {
            r.signal(libc::SIGKILL);
            let _ = r.finish(Duration::from_secs(5));
        }
        self.etcd.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `ctl status` until its line contains `want`.
fn wait_status(sock: &Path, want: &str, timeout: Duration) -> String {
    try_wait_status(sock, want, timeout).unwrap_or_else(|last| panic!("status never showed '{want}': {last}"))
}

fn try_wait_status(sock: &Path, want: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let (ok, out) = ctl(sock, &["status"]);
        if ok && out.contains(want) {
            return Ok(out);
        }
        last = out;
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last)
}

/// The value of `key=` in a line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(key)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
}

/// Client -> guest sink: `total` bytes of a deterministic stream, paced at
/// about `mib_s` MiB/s; returns its SHA-256.
fn sink_stream(lan: &HaLan, port: u16, total: usize, mib_s: u64) -> std::thread::JoinHandle<std::io::Result<String>> {
    lan.client.spawn_thread(move || {
        let mut c = TcpStream::connect((GUEST_IP, port))?;
        // A stream that stalls fails the test instead of hanging it.
        c.set_write_timeout(Some(Duration::from_secs(60)))?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 256 << 10];
        let mut k = 0x5eed_u64 << 32;
        let t0 = Instant::now();
        let mut sent = 0usize;
        while sent < total {
            fill_splitmix(&mut chunk, &mut k);
            c.write_all(&chunk)?;
            h.update(&chunk);
            sent += chunk.len();
            let due = Duration::from_secs_f64(sent as f64 / (mib_s as f64 * MIB as f64));
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        c.shutdown(Shutdown::Write)?;
        let _ = c.read_to_end(&mut Vec::new());
        Ok(hex(&h.finalize()))
    })
}

/// Guest source -> client: reads everything at about `mib_s` MiB/s;
/// returns (bytes, SHA-256). A reset is an error.
fn source_stream(lan: &HaLan, port: u16, mib_s: u64) -> std::thread::JoinHandle<std::io::Result<(u64, String)>> {
    lan.client.spawn_thread(move || {
        let mut s = TcpStream::connect((GUEST_IP, port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        let t0 = Instant::now();
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
            let due = Duration::from_secs_f64(n as f64 / (mib_s as f64 * MIB as f64));
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok((n, hex(&h.finalize())))
    })
}

/// A pseudo-random number from the clock (the seed is printed).
fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    splitmix64(s ^ u64::from(std::process::id()))
}

/// Streams 256 MiB each way through a protected guest, kills the primary
/// `kill_after` into the streams, and checks both streams finish exactly on
/// the backup, with no reset, and that no guest ACK of an uncommitted
/// epoch reached the client.
fn failover_trial(tag: &str, output: &str, kill_after: Duration) {
    const TOTAL: usize = 256 << 20;
    let mut pair = Pair::new(tag);
    let o = Opts {
        workloads: "sink:5001,source:5002:256",
        output,
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    eprintln!("{tag}: backup listening");
    pair.start_primary(&o);
    eprintln!("{tag}: primary protected");
    let cap = pair.lan.capture_lan().expect("LAN capture");
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 48);
    let source = source_stream(&pair.lan, 5002, 48);
    std::thread::sleep(kill_after);
    let status = ctl(&pair.psock, &["status"]).1;
    let killed_at = Instant::now();
    let dead = pair.kill_primary();
    assert!(
        dead.line("remora-guest: sink port=5001").is_none() && dead.line("remora-guest: source").is_none(),
        "a stream ended before the kill: test too short\n{}",
        dead.stdout()
    );
    eprintln!("{tag}: primary killed");
    let b = pair.backup();
    let sink_line = b.wait_line("remora-guest: sink port=5001", Duration::from_secs(60));
    eprintln!("{tag}: sink line {sink_line:?}");
    let want = sink.join().unwrap();
    let got = source.join().unwrap();
    let frames = cap.stop();
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    let diag = format!(
        "status before the kill: {status}\n--- backup stderr:\n{}\n--- backup console:\n{}\n--- primary stderr:\n{}",
        run.stderr,
        run.stdout(),
        dead.stderr
    );
    let want = want.unwrap_or_else(|e| panic!("client sink stream failed: {e}\n{diag}"));
    let (n, sha) = got.unwrap_or_else(|e| panic!("client source stream failed (reset?): {e}\n{diag}"));
    let (_, line) = sink_line.unwrap_or_else(|| panic!("the backup never finished the sink stream\n{diag}"));
    assert_eq!(field(&line, "bytes="), TOTAL.to_string(), "{line}\n{diag}");
    assert_eq!(field(&line, "sha256="), want, "sink stream corrupted\n{diag}");
    assert_eq!(n, TOTAL as u64, "source stream length\n{diag}");
    assert_eq!(
        sha,
        splitmix_stream_sha(0, TOTAL as u64),
        "source stream corrupted\n{diag}"
    );
    assert!(run.stderr.contains("remora backup: failover:"), "{diag}");

    // One active copy: every frame with the guest's MAC that the primary's
    // host emitted precedes every one the backup's host emitted. (Output
    // commit of the guest's ACKs is proven by the sink stream above: an
    // ACK released ahead of the backup's checkpoint would free client data
    // the resumed guest never got, and the stream could not finish exact.)
    let mac = parse_mac(MAC);
    let last_primary = frames
        .iter()
        .filter(|f| f.port == LanPort::Primary && f.src_mac == mac)
        .map(|f| f.at)
        .max();
    let first_backup = frames
        .iter()
        .filter(|f| f.port == LanPort::Backup && f.src_mac == mac)
        .map(|f| f.at)
        .min();
    let dump = |port: LanPort, last: bool| {
        let v: Vec<String> = frames
            .iter()
            .filter(|f| f.port == port && f.src_mac == mac)
            .filter_map(|f| f.tcp.map(|t| (f.at, t)))
            .map(|(at, t)| {
                format!(
                    "{:?} {} seq={} ack={} flags={:#x} len={}",
                    at.saturating_duration_since(killed_at),
                    t.src.port(),
                    t.seq,
                    t.ack,
                    t.flags,
                    t.payload_len
                )
            })
            .collect();
        let n = v.len();
        if last {
            v[n.saturating_sub(8)..].join("\n")
        } else {
            v[..n.min(8)].join("\n")
        }
    };
    let diag = format!(
        "{diag}\n--- last primary frames:\n{}\n--- first backup frames:\n{}",
        dump(LanPort::Primary, true),
        dump(LanPort::Backup, false)
    );
    let (Some(lp), Some(fb)) = (last_primary, first_backup) else {
        panic!(
            "the capture did not see both hosts emit ({} frames)\n{diag}",
            frames.len()
        );
    };
    assert!(lp < fb, "both hosts emitted with the guest's MAC at once\n{diag}");
    // The backup announced the guest's MAC (RARP) and, for the addresses
    // its engine knows, its IP (gratuitous ARP).
    let from_backup = |ethertype: u16| {
        frames
            .iter()
            .any(|f| f.port == LanPort::Backup && f.src_mac == mac && f.ethertype == ethertype)
    };
    assert!(from_backup(0x8035), "no RARP announce from the backup\n{diag}");
    if output == "speculative" {
        let garp = frames.iter().any(|f| {
            f.port == LanPort::Backup && f.ethertype == 0x0806 && f.data.get(28..32) == Some(&[10, 0, 0, 2][..])
        });
        assert!(garp, "no gratuitous ARP for the guest from the backup\n{diag}");
    }
    assert!(
        fb > killed_at,
        "the backup emitted before the primary was killed\n{diag}"
    );
    eprintln!(
        "{tag}: kill after {kill_after:?}: first frame from the backup {:?} after the kill",
        fb - killed_at
    );
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

fn kill_trials(output: &str, trials: u32) {
    let s = seed();
    eprintln!("{output}: seed {s:#x}");
    for i in 0..trials {
        // Kill somewhere in the first 3.5 s of ~5.5 s streams.
        let ms = 300 + splitmix64(s ^ u64::from(i)) % 3200;
        failover_trial(&format!("k{}{i}", &output[..1]), output, Duration::from_millis(ms));
    }
}

#[test]
fn kill_primary_speculative_streams_exact() {
    kill_trials("speculative", 5);
}

#[test]
fn kill_primary_buffered_streams_exact() {
    kill_trials("buffered", 5);
}

/// diskloop and the memory checker on 2 vCPUs across a failover.
#[test]
fn disk_and_memory_survive_failover() {
    let mut pair = Pair::new("dm");
    let o = Opts {
        workloads: "mem:64,diskloop:8,sink:5001",
        output: "speculative",
        disk_mib: 16,
        vcpus: 2,
    };
    pair.start_backup(&o);
    pair.start_primary(&o);
    let rounds = |l: &str| -> u64 {
        l.split("diskloop ok rounds=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let p = pair.primary.as_mut().unwrap();
    p.wait_line_where(|l| rounds(l) >= 2, Duration::from_secs(60))
        .expect("diskloop runs on the primary");
    p.wait_line("remora-guest: mem ok", Duration::from_secs(30))
        .expect("memory checker runs");
    std::thread::sleep(Duration::from_millis(700));
    let dead = pair.kill_primary();
    let rounds_before: u64 = dead
        .lines
        .iter()
        .filter_map(|(_, l)| l.split("diskloop ok rounds=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);
    let b = pair.backup();
    // Rounds are printed at most once a second: any later round will do.
    let more = b.wait_line_where(|l| rounds(l) > rounds_before, Duration::from_secs(90));
    let mem = b.wait_line("remora-guest: mem ok", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    let diag = format!(
        "--- backup stderr:\n{}\n--- backup console:\n{}",
        run.stderr,
        run.stdout()
    );
    assert!(more.is_some(), "diskloop did not continue on the backup\n{diag}");
    assert!(mem.is_some(), "memory checker did not continue\n{diag}");
    assert!(!run.stdout().contains("MISMATCH"), "{diag}");
    assert!(!run.stdout().contains("error"), "{diag}");
}

/// Killing the backup leaves the primary running unprotected (streams
/// exact); a new backup protects it again; then the primary dies and the
/// new backup finishes the stream.
#[test]
fn lost_backup_then_reprotect_then_failover() {
    const TOTAL: usize = 192 << 20;
    let mut pair = Pair::new("rp");
    let o = Opts {
        workloads: "sink:5001",
        output: "speculative",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    pair.start_primary(&o);
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 24);
    std::thread::sleep(Duration::from_millis(1500));
    let first = pair.backup.take().unwrap();
    first.signal(libc::SIGKILL);
    let _ = first.finish(Duration::from_secs(5));
    let st = wait_status(&pair.psock, "protected=no", Duration::from_secs(5));
    assert!(st.contains("last_error="), "status should say why: {st}");
    // A new backup on another port.
    pair.port = next_port();
    pair.start_backup(&o);
    let (ok, out) = ctl(&pair.psock, &["protect", &pair.backup_addr()]);
    assert!(ok, "ctl protect: {out}");
    let (ok, out) = ctl(&pair.psock, &["protect", &pair.backup_addr()]);
    assert!(
        !ok && out.contains("already"),
        "a second protect must be refused: {out}"
    );
    wait_status(&pair.psock, "protected=yes", Duration::from_secs(60));
    let (ok, json) = ctl(&pair.psock, &["status", "--json"]);
    assert!(
        ok && json.contains("\"protected\":\"yes\"") && json.contains("\"epoch\":"),
        "{json}"
    );
    std::thread::sleep(Duration::from_millis(800));
    let dead = pair.kill_primary();
    assert!(dead.line("remora-guest: sink").is_none(), "stream ended too early");
    let line = pair
        .backup()
        .wait_line("remora-guest: sink port=5001", Duration::from_secs(120));
    let want = sink.join().unwrap();
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    let diag = format!(
        "--- backup stderr:\n{}\n--- primary stderr:\n{}",
        run.stderr, dead.stderr
    );
    let want = want.unwrap_or_else(|e| panic!("client: {e}\n{diag}"));
    let (_, line) = line.unwrap_or_else(|| panic!("no sink line on the new backup\n{diag}"));
    assert_eq!(field(&line, "sha256="), want, "{diag}");
    assert!(dead.stderr.contains("UNPROTECTED"), "{diag}");
}

/// One corrupted byte on the replication link: the backup refuses that
/// checkpoint, keeps the last good one, the primary sends it again, and a
/// failover afterwards is exact.
#[test]
fn corrupt_checkpoint_is_refused_and_failover_stays_exact() {
    const TOTAL: usize = 192 << 20;
    let mut pair = Pair::new("cp");
    let o = Opts {
        workloads: "sink:5001",
        output: "speculative",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    // The primary talks to a proxy in its own namespace.
    let target: std::net::SocketAddr = pair.backup_addr().parse().unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", pair.port + 1000).parse().unwrap();
    let proxy = remora_netlab::CorruptProxy::start(&pair.lan.primary, listen, target).expect("proxy");
    let real = pair.port;
    // start_primary protects to backup_addr(): point it at the proxy.
    let proxied = proxy.local_addr().to_string();
    let cmd = pair.primary_command("sink:5001", &["--vcpus", "2", "--mem", "256", "--protect", &proxied]);
    pair.boot_primary(cmd);
    wait_status(&pair.psock, "protected=yes", Duration::from_secs(60));
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 24);
    std::thread::sleep(Duration::from_millis(500));
    // A byte 64 KiB further on: inside a checkpoint's pages while the
    // stream dirties receive buffers.
    proxy.corrupt_at(proxy.forwarded() + (64 << 10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.corrupted().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.corrupted().is_some(), "the proxy never corrupted a byte");
    std::thread::sleep(Duration::from_millis(800));
    let st = ctl(&pair.psock, &["status"]).1;
    let dead = pair.kill_primary();
    let line = pair
        .backup()
        .wait_line("remora-guest: sink port=5001", Duration::from_secs(120));
    let want = sink.join().unwrap();
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    let diag = format!(
        "status: {st}\n--- backup stderr:\n{}\n--- primary stderr:\n{}",
        run.stderr, dead.stderr
    );
    let _ = real;
    assert!(
        run.stderr.contains("refused checkpoint") || run.stderr.contains("protocol error"),
        "the backup did not notice the corruption\n{diag}"
    );
    let want = want.unwrap_or_else(|e| panic!("client: {e}\n{diag}"));
    let (_, line) = line.unwrap_or_else(|| panic!("no sink line on the backup\n{diag}"));
    assert_eq!(field(&line, "sha256="), want, "{diag}");
}

/// Bad input: clear errors, exit codes, nothing lost.
#[test]
fn bad_input_is_refused_clearly() {
    let mut pair = Pair::new("bi");
    // No --listen.
    let r = run_remora(&["backup", "--net", "tap=x"], Duration::from_secs(10));
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    // A TAP that does not exist on the backup host.
    let r = {
        let mut c = pair.lan.backup.command(remora_bin().to_str().unwrap());
        c.args(["backup", "--listen", "127.0.0.1:1", "--net", "tap=nosuchtap0"]);
        let run = spawn(&mut c);
        run.finish(Duration::from_secs(10))
    };
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stderr.contains("TAP 'nosuchtap0' does not exist"), "{}", r.stderr);
    // A missing disk.
    let r = {
        let mut c = pair.lan.backup.command(remora_bin().to_str().unwrap());
        c.args(["backup", "--listen", "127.0.0.1:1", "--disk", "/nonexistent/disk.img"]);
        spawn(&mut c).finish(Duration::from_secs(10))
    };
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stderr.contains("/nonexistent/disk.img"), "{}", r.stderr);

    // A backup whose disk is smaller than the primary's: the primary is
    // refused at connect time, runs on unprotected, and says why.
    let o = Opts {
        workloads: "sink:5001",
        output: "speculative",
        disk_mib: 0,
        vcpus: 1,
    };
    let small = pair.disk("small.img", 8);
    let big = pair.disk("big.img", 16);
    let mut c = pair.backup_command(
        &pair.lan.backup,
        &pair.backup_addr(),
        &["--disk", small.to_str().unwrap()],
    );
    pair.backup = Some(spawn(&mut c));
    std::thread::sleep(Duration::from_millis(500));
    let c = pair.primary_command(
        o.workloads,
        &["--disk", big.to_str().unwrap(), "--protect", &pair.backup_addr()],
    );
    pair.boot_primary(c);
    let st = wait_status(&pair.psock, "last_error=", Duration::from_secs(20));
    assert!(st.contains("protected=no") && st.contains("size differs"), "{st}");

    // A second primary while the backup serves one is refused as busy: use
    // a fresh backup with a matching disk.
    let b = pair.backup.take().unwrap();
    b.signal(libc::SIGKILL);
    let _ = b.finish(Duration::from_secs(5));
    pair.port = next_port();
    let matching = pair.disk("match.img", 16);
    let mut c = pair.backup_command(
        &pair.lan.backup,
        &pair.backup_addr(),
        &["--disk", matching.to_str().unwrap()],
    );
    pair.backup = Some(spawn(&mut c));
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = ctl(&pair.psock, &["protect", &pair.backup_addr()]);
    assert!(ok, "{out}");
    wait_status(&pair.psock, "protected=yes", Duration::from_secs(60));
    let addr = pair.backup_addr();
    let busy = pair.lan.primary.spawn_thread(move || {
        let mut s = TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        Ok(String::from_utf8_lossy(&v).into_owned())
    });
    let reply = busy.join().unwrap().unwrap();
    assert!(reply.contains("busy"), "second primary: {reply:?}");
    // The first primary is still protected.
    wait_status(&pair.psock, "protected=yes", Duration::from_secs(2));

    // A primary pointed at something that is not a backup.
    let not_backup: std::net::SocketAddr = format!("{BACKUP_REPL_IP}:{}", pair.port + 2000).parse().unwrap();
    let junk = pair.lan.backup.spawn_thread(move || {
        let l = std::net::TcpListener::bind(not_backup)?;
        let (mut s, _) = l.accept()?;
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n")?;
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut c = pair.lan.primary.command(remora_bin().to_str().unwrap());
    let sock2 = pair.dir.join("p2.sock");
    let guest = guest_bin();
    c.args([
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "workload=sink:5001 ip=10.0.0.3/24",
        "--net",
        "tap=tap9",
        "--control",
        sock2.to_str().unwrap(),
        "--protect",
        &not_backup.to_string(),
    ]);
    let mut p2 = spawn(&mut c);
    p2.wait_line("remora-guest: net up", Duration::from_secs(30))
        .expect("net up");
    let st = wait_status(&sock2, "last_error=", Duration::from_secs(20));
    assert!(st.contains("protected=no") && st.contains("backup"), "{st}");
    p2.signal(libc::SIGTERM);
    let r2 = p2.finish(Duration::from_secs(10));
    assert!(r2.status.success(), "{}", r2.stderr);
    let _ = junk.join();
}

/// `ctl protect` on a VM started without --protect puts the engine on its
/// path while it runs; `ctl pause` does not end the protection; a stream
/// started after the protection survives the primary's death.
#[test]
fn protect_a_running_vm() {
    const TOTAL: usize = 96 << 20;
    let mut pair = Pair::new("pr");
    let o = Opts {
        workloads: "sink:5001",
        output: "speculative",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    let cmd = pair.primary_command("sink:5001", &["--vcpus", "2"]);
    pair.boot_primary(cmd);
    let st = wait_status(&pair.psock, "protected=no", Duration::from_secs(5));
    assert!(!st.contains("last_error"), "{st}");
    let (ok, out) = ctl(&pair.psock, &["protect", &pair.backup_addr()]);
    assert!(ok && out.contains("protecting"), "{out}");
    wait_status(&pair.psock, "protected=yes", Duration::from_secs(60));
    // A pause stops checkpoints, not the protection.
    assert!(ctl(&pair.psock, &["pause"]).0);
    std::thread::sleep(Duration::from_millis(400));
    assert!(ctl(&pair.psock, &["resume"]).0);
    let before = field(
        &wait_status(&pair.psock, "protected=yes", Duration::from_secs(2)),
        "epoch=",
    )
    .to_string();
    std::thread::sleep(Duration::from_millis(300));
    let after = wait_status(&pair.psock, "protected=yes", Duration::from_secs(2));
    assert_ne!(
        field(&after, "epoch="),
        before,
        "checkpoints did not go on after resume: {after}"
    );
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 24);
    std::thread::sleep(Duration::from_millis(1500));
    let dead = pair.kill_primary();
    let line = pair
        .backup()
        .wait_line("remora-guest: sink port=5001", Duration::from_secs(60));
    let want = sink.join().unwrap();
    let b = pair.backup.take().unwrap();
    b.signal(libc::SIGTERM);
    let run = b.finish(Duration::from_secs(10));
    let diag = format!("--- backup:\n{}\n--- primary:\n{}", run.stderr, dead.stderr);
    let want = want.unwrap_or_else(|e| panic!("client: {e}\n{diag}"));
    let (_, line) = line.unwrap_or_else(|| panic!("no sink line on the backup\n{diag}"));
    assert_eq!(field(&line, "sha256="), want, "{diag}");
}

/// An operator stopping the primary (SIGTERM) is not a failure: the
/// backup is told and exits without taking over.
#[test]
fn stopping_the_primary_ends_the_backup_without_takeover() {
    let mut pair = Pair::new("st");
    let o = Opts {
        workloads: "sink:5001",
        output: "speculative",
        disk_mib: 0,
        vcpus: 1,
    };
    pair.start_backup(&o);
    pair.start_primary(&o);
    std::thread::sleep(Duration::from_millis(300));
    let p = pair.primary.take().unwrap();
    p.signal(libc::SIGTERM);
    let p = p.finish(Duration::from_secs(10));
    assert!(p.status.success(), "{}", p.stderr);
    let b = pair.backup.take().unwrap().finish(Duration::from_secs(10));
    assert!(!b.timed_out, "the backup did not exit\n{}", b.stderr);
    assert!(b.status.success(), "{}", b.stderr);
    assert!(b.stderr.contains("no takeover"), "{}", b.stderr);
    assert!(!b.stderr.contains("failover"), "{}", b.stderr);
}

/// After a failover the new primary (the old backup) is protected again
/// with `ctl protect` by a fresh backup on the old primary's host; that
/// one takes over in turn; the stream stays exact across both failovers.
#[test]
fn failover_reprotect_failover_again() {
    const TOTAL: usize = 160 << 20;
    let mut pair = Pair::new("rf");
    let o = Opts {
        workloads: "sink:5001",
        output: "speculative",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    pair.start_primary(&o);
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 16);
    std::thread::sleep(Duration::from_millis(1000));
    let first = pair.kill_primary();
    // The old backup runs the guest now; a new backup on the old primary's
    // host, listening on its end of the replication link.
    wait_status(&pair.bsock, "protected=no", Duration::from_secs(10));
    let port = next_port();
    let addr = format!("{}:{port}", remora_netlab::PRIMARY_REPL_IP);
    let mut cmd = pair.backup_command(&pair.lan.primary, &addr, &["--control", pair.psock.to_str().unwrap()]);
    let mut second_backup = spawn(&mut cmd);
    assert!(
        wait_listening(&pair.lan.primary, port, Duration::from_secs(10)),
        "the second backup never listened"
    );
    let (ok, out) = ctl(&pair.bsock, &["protect", &addr]);
    assert!(ok, "ctl protect on the new primary: {out}");
    wait_status(&pair.bsock, "protected=yes", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    // Second failover: kill the old backup (now the primary).
    let b = pair.backup.take().unwrap();
    b.signal(libc::SIGKILL);
    let second = b.finish(Duration::from_secs(5));
    let line = second_backup.wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
    let want = sink.join().unwrap();
    second_backup.signal(libc::SIGTERM);
    let third = second_backup.finish(Duration::from_secs(10));
    let diag = format!(
        "--- first primary:\n{}\n--- second (old backup):\n{}\n--- third (new backup):\n{}",
        first.stderr, second.stderr, third.stderr
    );
    let want = want.unwrap_or_else(|e| panic!("client: {e}\n{diag}"));
    let (_, line) = line.unwrap_or_else(|| panic!("the third host never finished the stream\n{diag}"));
    assert_eq!(field(&line, "bytes="), TOTAL.to_string(), "{diag}");
    assert_eq!(
        field(&line, "sha256="),
        want,
        "stream corrupted across two failovers\n{diag}"
    );
    assert!(
        second.stderr.contains("failover:") && third.stderr.contains("failover:"),
        "{diag}"
    );
}

/// Frames with the guest's MAC from each host, in capture order: the
/// hosts' emission intervals must not overlap (one active copy). Returns
/// (last from the primary's host, first from the backup's host).
fn one_active_copy(frames: &[remora_netlab::CapturedFrame]) -> (Option<Instant>, Option<Instant>) {
    let mac = parse_mac(MAC);
    let at = |port: LanPort| {
        frames
            .iter()
            .filter(move |f| f.port == port && f.src_mac == mac)
            .map(|f| f.at)
    };
    let (last_p, first_b) = (at(LanPort::Primary).max(), at(LanPort::Backup).min());
    if let (Some(lp), Some(fb)) = (last_p, first_b) {
        assert!(
            lp < fb,
            "two active copies: the primary's host emitted {:?} after the backup's first frame",
            lp - fb
        );
    }
    (last_p, first_b)
}

/// Both streams of a fenced trial, finished on whichever host runs the
/// guest: exact, no reset.
fn check_streams(
    sink: std::thread::JoinHandle<std::io::Result<String>>,
    source: std::thread::JoinHandle<std::io::Result<(u64, String)>>,
    console: &str,
    total: usize,
    diag: &str,
) {
    let want = sink
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("sink stream failed: {e}\n{diag}"));
    let (n, sha) = source
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("source stream failed (reset?): {e}\n{diag}"));
    let line = console
        .lines()
        .find(|l| l.contains("remora-guest: sink port=5001"))
        .unwrap_or_else(|| panic!("the sink stream never finished\n{diag}"));
    assert_eq!(field(line, "bytes="), total.to_string(), "{diag}");
    assert_eq!(field(line, "sha256="), want, "sink stream corrupted\n{diag}");
    assert_eq!(n, total as u64, "{diag}");
    assert_eq!(
        sha,
        splitmix_stream_sha(0, total as u64),
        "source stream corrupted\n{diag}"
    );
    assert!(!console.contains("MISMATCH"), "{diag}");
}

/// A stalled primary (SIGSTOP for ten heartbeat timeouts, then SIGCONT):
/// the backup wins the fence and takes over; the primary wakes, loses the
/// fence, emits nothing more and exits with status 5. Without the fence
/// (and the lease) it would go on unprotected: two active copies.
#[test]
fn fenced_stopped_primary_cannot_come_back() {
    const TOTAL: usize = 96 << 20;
    let mut pair = Pair::new_fenced("fs", 1);
    let o = Opts {
        workloads: "sink:5001,source:5002:96",
        output: "speculative",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    pair.start_primary(&o);
    let (ok, st) = ctl(&pair.psock, &["status"]);
    assert!(
        ok && field(&st, "fence=") == "1",
        "the primary holds generation 1: {st}"
    );
    let cap = pair.lan.capture_lan().expect("LAN capture");
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 24);
    let source = source_stream(&pair.lan, 5002, 24);
    std::thread::sleep(Duration::from_millis(1200));
    let p = pair.primary.take().unwrap();
    p.signal(libc::SIGSTOP);
    let stopped_at = Instant::now();
    let took = pair.backup().wait_line_where(|_| false, Duration::from_millis(1000));
    assert!(took.is_none());
    p.signal(libc::SIGCONT);
    let dead = p.finish(Duration::from_secs(10));
    let b = pair.backup();
    let done = b.wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
    std::thread::sleep(Duration::from_millis(300));
    let frames = cap.stop();
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    let diag = format!(
        "--- primary stderr:\n{}\n--- backup stderr:\n{}\n--- backup console:\n{}",
        dead.stderr,
        run.stderr,
        run.stdout()
    );
    assert!(done.is_some(), "the backup never finished the stream\n{diag}");
    assert_eq!(
        dead.status.code(),
        Some(5),
        "the stalled primary must exit fenced\n{diag}"
    );
    assert!(dead.stderr.contains("FENCED"), "{diag}");
    assert!(run.stderr.contains("fence: generation 1 -> 2"), "{diag}");
    check_streams(sink, source, &run.stdout(), TOTAL, &diag);
    let (last_p, first_b) = one_active_copy(&frames);
    let (lp, fb) = (last_p.expect("primary frames"), first_b.expect("backup frames"));
    // The lease: the primary fell silent when it stopped, not when it woke.
    assert!(
        lp < stopped_at + Duration::from_millis(150),
        "the primary emitted {:?} after SIGSTOP\n{diag}",
        lp.saturating_duration_since(stopped_at)
    );
    eprintln!(
        "stalled primary: last primary frame {:?} after SIGSTOP, first backup frame {:?} after",
        lp.saturating_duration_since(stopped_at),
        fb - stopped_at
    );
}

/// The replication link cut both ways while both hosts live: the fence
/// lets exactly one go on (either may win the race); the streams finish
/// exactly on the winner and the hosts never emit at the same time.
#[test]
fn fenced_cut_link_leaves_one_active_copy() {
    const TOTAL: usize = 96 << 20;
    let mut pair = Pair::new_fenced("fc", 1);
    let o = Opts {
        workloads: "sink:5001,source:5002:96",
        output: "buffered",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    pair.start_primary(&o);
    let cap = pair.lan.capture_lan().expect("LAN capture");
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 24);
    let source = source_stream(&pair.lan, 5002, 24);
    std::thread::sleep(Duration::from_millis(1200));
    pair.lan.cut_replication(Direction::Both).unwrap();
    // Whoever wins, one of them says so.
    let t = Instant::now();
    let mut winner = None;
    while t.elapsed() < Duration::from_secs(20) && winner.is_none() {
        // The backup serves its control socket once it runs the guest.
        if ctl(&pair.bsock, &["status"]).0 {
            winner = Some(Host::Backup);
        } else if field(&ctl(&pair.psock, &["status"]).1, "fence=") == "2" {
            winner = Some(Host::Primary);
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let winner = winner.expect("neither copy won the fence");
    let (console, diag) = match winner {
        Host::Backup => {
            let dead = pair.primary.take().unwrap().finish(Duration::from_secs(10));
            let b = pair.backup();
            let done = b.wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
            let backup = pair.backup.take().unwrap();
            backup.signal(libc::SIGTERM);
            let run = backup.finish(Duration::from_secs(10));
            let diag = format!(
                "--- primary stderr:\n{}\n--- backup stderr:\n{}",
                dead.stderr, run.stderr
            );
            assert!(done.is_some(), "{diag}");
            assert_eq!(dead.status.code(), Some(5), "the primary lost the fence\n{diag}");
            (run.stdout(), diag)
        }
        Host::Primary => {
            let p = pair.primary.as_mut().unwrap();
            let done = p.wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
            std::thread::sleep(Duration::from_millis(300));
            let b = pair.backup.take().unwrap();
            b.signal(libc::SIGTERM);
            let brun = b.finish(Duration::from_secs(10));
            let p = pair.primary.take().unwrap();
            p.signal(libc::SIGTERM);
            let run = p.finish(Duration::from_secs(10));
            let diag = format!(
                "--- primary stderr:\n{}\n--- backup stderr:\n{}",
                run.stderr, brun.stderr
            );
            assert!(done.is_some(), "{diag}");
            assert!(brun.stderr.contains("no takeover"), "the backup lost the fence\n{diag}");
            assert!(!brun.stderr.contains("failover:"), "{diag}");
            (run.stdout(), diag)
        }
    };
    let frames = cap.stop();
    check_streams(sink, source, &console, TOTAL, &diag);
    one_active_copy(&frames);
    eprintln!("cut link: {winner:?} won the fence");
}

/// A fenced primary that cannot reach etcd at start holds the guest's
/// output (the guest cannot be reached) and keeps trying; once etcd
/// answers, it claims a generation and the guest is reachable.
#[test]
fn fenced_primary_holds_output_until_etcd_answers() {
    let mut pair = Pair::new_fenced("fh", 1);
    pair.lan.cut_fence(Host::Primary).unwrap();
    let mut extra = pair.fence_args();
    extra.extend(["--mem".into(), "128".into()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut cmd = pair.primary_command("echo:5003", &extra);
    let mut p = spawn(&mut cmd);
    p.wait_line("remora-guest: net up", Duration::from_secs(30))
        .expect("guest up");
    let probe = |lan: &HaLan| {
        lan.client
            .spawn_thread(|| {
                let addr: std::net::SocketAddr = format!("{GUEST_IP}:5003").parse().unwrap();
                let mut c = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))?;
                c.set_read_timeout(Some(Duration::from_secs(2)))?;
                c.write_all(b"ping")?;
                let mut b = [0u8; 4];
                c.read_exact(&mut b)?;
                Ok(b == *b"ping")
            })
            .join()
            .unwrap()
    };
    assert!(
        probe(&pair.lan).is_err(),
        "the guest answered before the fence was claimed"
    );
    let st = ctl(&pair.psock, &["status"]).1;
    assert!(st.contains("fence=claiming"), "{st}");
    pair.lan.heal_fence(Host::Primary).unwrap();
    wait_status(&pair.psock, "fence=1", Duration::from_secs(10));
    assert!(
        matches!(probe(&pair.lan), Ok(true)),
        "the guest is reachable once the fence is held"
    );
    pair.primary = Some(p);
    let p = pair.primary.take().unwrap();
    p.signal(libc::SIGTERM);
    let run = p.finish(Duration::from_secs(10));
    assert!(run.stderr.contains("cannot claim a generation"), "{}", run.stderr);
    assert_eq!(run.status.code(), Some(0));
}

/// A three-member etcd whose leader is killed together with the primary:
/// the backup's compare-and-swap waits for the new leader, then takes
/// over; the streams finish exactly.
#[test]
fn fenced_failover_survives_the_etcd_leader_dying() {
    const TOTAL: usize = 96 << 20;
    let mut pair = Pair::new_fenced("fl", 3);
    let o = Opts {
        workloads: "sink:5001,source:5002:96",
        output: "speculative",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    pair.start_primary(&o);
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 24);
    let source = source_stream(&pair.lan, 5002, 24);
    std::thread::sleep(Duration::from_millis(1200));
    let etcd = pair.etcd.as_mut().unwrap();
    let t = Instant::now();
    let leader = loop {
        match etcd.leader() {
            Some(l) => break l,
            None if t.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("no etcd leader"),
        }
    };
    // The leader first: the backup's compare-and-swap has to wait for the
    // election (300 ms election timeout).
    etcd.kill(leader);
    let dead = pair.kill_primary();
    let b = pair.backup();
    let done = b.wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    let diag = format!(
        "--- primary stderr:\n{}\n--- backup stderr:\n{}",
        dead.stderr, run.stderr
    );
    assert!(done.is_some(), "{diag}");
    assert!(run.stderr.contains("fence: generation 1 -> 2"), "{diag}");
    check_streams(sink, source, &run.stdout(), TOTAL, &diag);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("failover: detect"))
        .unwrap_or("");
    eprintln!("leader {leader} killed with the primary: {line}");
    let fence_ms: u64 = line
        .split("(fence ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        fence_ms >= 100,
        "the claim did not wait for a new leader: {line}\n{diag}"
    );
}

/// Primary and backup must agree on the fence: a mismatch is refused
/// before the backup holds anything, with a message naming --fence.
#[test]
fn fence_mismatch_is_refused() {
    let mut pair = Pair::new_fenced("fm", 1);
    let o = Opts {
        workloads: "sink:5001",
        output: "speculative",
        disk_mib: 0,
        vcpus: 1,
    };
    // Backup fenced, primary not.
    pair.start_backup(&o);
    let mut cmd = pair.primary_command("sink:5001", &["--mem", "128", "--protect", &pair.backup_addr()]);
    let mut p = spawn(&mut cmd);
    p.wait_line("remora-guest: net up", Duration::from_secs(30))
        .expect("guest up");
    let st = wait_status(&pair.psock, "last_error", Duration::from_secs(30));
    assert!(st.contains("--fence"), "{st}");
    p.signal(libc::SIGTERM);
    let run = p.finish(Duration::from_secs(10));
    assert!(
        run.stderr.contains("no --fence"),
        "the unfenced primary warns: {}",
        run.stderr
    );
    let b = pair.backup.take().unwrap();
    b.signal(libc::SIGTERM);
    let brun = b.finish(Duration::from_secs(10));
    assert!(brun.stderr.contains("the primary does not"), "{}", brun.stderr);
}

/// `--tls-cert DIR/NAME.pem --tls-key DIR/NAME.key --tls-ca CA`.
fn tls_args(dir: &Path, name: &str, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{name}.pem")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

/// Mutual TLS on the replication link with certificates from `remora
/// certs`: replication and failover work over it; a primary with a
/// certificate from another CA, with a backup's certificate (wrong role),
/// or without TLS is refused before it sends any guest state.
#[test]
fn mutual_tls_replication_refuses_strangers() {
    const TOTAL: usize = 64 << 20;
    let mut pair = Pair::new("tl");
    let certs = pair.dir.join("certs");
    let other = pair.dir.join("other");
    let ok = |args: &[&str]| {
        let r = run_remora(args, Duration::from_secs(20));
        assert!(r.status.success(), "{args:?}: {}", r.stderr);
    };
    let (c, o) = (certs.to_str().unwrap(), other.to_str().unwrap());
    ok(&["certs", "init", "--dir", c]);
    ok(&[
        "certs",
        "issue",
        "--dir",
        c,
        "backup1",
        "--role",
        "backup",
        "--san",
        BACKUP_REPL_IP,
    ]);
    ok(&["certs", "issue", "--dir", c, "primary1", "--role", "primary"]);
    ok(&["certs", "init", "--dir", o]);
    ok(&["certs", "issue", "--dir", o, "primary1", "--role", "primary"]);
    let again = run_remora(
        &["certs", "issue", "--dir", c, "primary1", "--role", "primary"],
        Duration::from_secs(20),
    );
    assert!(
        !again.status.success() && again.stderr.contains("already exists"),
        "{}",
        again.stderr
    );
    let ca = certs.join("ca.pem");
    pair.backup_extra = tls_args(&certs, "backup1", &ca);
    let o = Opts {
        workloads: "sink:5001,source:5002:64",
        output: "speculative",
        disk_mib: 0,
        vcpus: 2,
    };
    pair.start_backup(&o);
    // Refused: another CA's certificate, the backup's own certificate used
    // by a primary, and plain TCP.
    for (what, extra) in [
        ("another CA", tls_args(&other, "primary1", &ca)),
        ("wrong role", tls_args(&certs, "backup1", &ca)),
        ("no TLS", vec!["--insecure".to_string()]),
    ] {
        let mut args = vec![
            "--mem".to_string(),
            "128".into(),
            "--protect".into(),
            pair.backup_addr(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = pair.primary_command("sink:5001", &args);
        let mut p = spawn(&mut cmd);
        p.wait_line("remora-guest: net up", Duration::from_secs(30))
            .expect("guest up");
        let st = wait_status(&pair.psock, "last_error", Duration::from_secs(30));
        assert!(st.contains("protected=no"), "{what}: {st}");
        p.signal(libc::SIGKILL);
        let _ = p.finish(Duration::from_secs(5));
        let _ = std::fs::remove_file(&pair.psock);
    }
    // The backup refused them all and still stands by: the right primary
    // is protected, and a failover over TLS is exact.
    pair.primary_extra = tls_args(&certs, "primary1", &ca);
    pair.start_primary(&o);
    let sink = sink_stream(&pair.lan, 5001, TOTAL, 24);
    let source = source_stream(&pair.lan, 5002, 24);
    std::thread::sleep(Duration::from_millis(1000));
    let dead = pair.kill_primary();
    let done = pair
        .backup()
        .wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    let diag = format!(
        "--- primary stderr:\n{}\n--- backup stderr:\n{}",
        dead.stderr, run.stderr
    );
    assert!(done.is_some(), "{diag}");
    assert_eq!(run.stderr.matches("remora backup: refused").count(), 3, "{diag}");
    assert!(run.stderr.contains("failover:"), "{diag}");
    assert!(
        !dead.stderr.contains("plain TCP"),
        "TLS in use: no plaintext warning\n{diag}"
    );
    check_streams(sink, source, &run.stdout(), TOTAL, &diag);
}
