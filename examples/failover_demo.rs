//! The failover demo (`scripts/demo.sh`): a protected test guest streams
//! TCP to a client on its LAN, the primary host's `remora` is killed with
//! SIGKILL partway, the backup resumes the guest and the stream carries on.
//! Shows the client's throughput per 100 ms across the failover, the
//! failover time and whether every byte arrived exactly once, and writes
//! `target/demo/failover.json` for `scripts/plot_demo.py`.
//!
//! Topology: remora-netlab's `HaLan` (client, LAN switch, primary and
//! backup host namespaces, replication link 192.168.100.1 <->
//! 192.168.100.2), as in tests/replication.rs. Needs root and /dev/kvm,
//! and `target/release/{remora,remora-guest}` (`cargo build --release`).
//!
//! Everything it creates (namespaces, processes, a temporary directory) is
//! removed on every exit path: normal return, error, panic (the release
//! profile aborts, so a panic hook cleans up first) and SIGINT/SIGTERM/
//! SIGHUP (a signal thread cleans up and exits with status 130).

use anyhow::{bail, Context, Result};
use clap::Parser;
use remora_netlab::{CapturedFrame, HaLan, LanPort, BACKUP_REPL_IP, CLIENT_IP, GUEST_IP, PRIMARY_REPL_IP};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:12:34:56";
const MAC_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SOURCE_PORT: u16 = 5002;
const REPL_PORT: u16 = 7700;
const MIB: u64 = 1 << 20;
const BIN_MS: u64 = 100;
/// The plot's fine series, to show the gap.
const FINE_MS: u64 = 10;

/// The failover demo: stream from a protected guest, kill its primary, watch the backup take over.
#[derive(Parser, Debug)]
struct Args {
    /// MiB the guest's `source` workload sends.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(16..=65536))]
    mib: u64,
    /// Kill the primary this long after the client connected...
    #[arg(long, default_value_t = 1000)]
    kill_after_ms: u64,
    /// ... or once the client has received this share of the stream (percent), if sooner.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=90))]
    kill_by_percent: u64,
    /// How the primary holds the guest's output until its checkpoint is safe.
    #[arg(long, default_value = "speculative", value_parser = ["speculative", "buffered"])]
    output: String,
    /// Print every frame on the LAN from 50 ms before the kill to 50 ms after the backup's first stream data.
    #[arg(long)]
    trace: bool,
    /// Where the timeline (JSON) goes [default: TARGET/demo/failover.json, TARGET the cargo target
    /// directory this program and remora were built in].
    #[arg(long)]
    json: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// Cleanup on every exit path.

/// What must not outlive the demo, for the signal thread and the panic hook.
struct Registry {
    pids: Vec<i32>,
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
}

static REG: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    netns: Vec::new(),
    dirs: Vec::new(),
});

fn reg() -> MutexGuard<'static, Registry> {
    REG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills (SIGKILL, by PID) and reaps every process still registered,
/// deletes the namespaces and directories. Used when the normal drops
/// cannot run.
fn cleanup_registered(r: &mut Registry) {
    for pid in r.pids.drain(..) {
        // SAFETY: kill(2)/waitpid(2) on the PID of a child this process
        // spawned and has not reaped (reaping unregisters it).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    for ns in r.netns.drain(..) {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
    for d in r.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (so in every thread spawned
/// later; children get a clean mask from std) and handles them on a
/// dedicated thread: clean up, exit 130.
fn install_cleanup_handlers() -> Result<()> {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        // The release profile aborts after this hook: clean up now. Do not
        // wait forever for a lock a panicking thread might hold.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(mut r) = REG.try_lock() {
                cleanup_registered(&mut r);
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }));
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; the calls
    // only write to it and to this thread's signal mask.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!("cannot block the stop signals: error {rc}");
    }
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised above; sigwait writes the signal to `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        eprintln!("\ninterrupted (signal {sig}): cleaning up");
        // Waits until the main thread is not half-way through creating or
        // removing something, and keeps the lock so that it creates
        // nothing more before the exit.
        let mut r = reg();
        cleanup_registered(&mut r);
        std::process::exit(130);
    })?;
    Ok(())
}

/// The topology, whose namespaces are registered while they exist.
struct Lan {
    ha: Option<HaLan>,
}

impl Lan {
    fn new() -> Result<Lan> {
        let mut r = reg();
        let ha = HaLan::new("fo").context("building the namespaces")?;
        for ns in [&ha.client, &ha.lan, &ha.primary, &ha.backup] {
            r.netns.push(ns.name().to_string());
        }
        Ok(Lan { ha: Some(ha) })
    }

    fn ha(&self) -> &HaLan {
        self.ha.as_ref().expect("present until dropped")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let mut r = reg();
        if let Some(ha) = self.ha.take() {
            let names: Vec<String> = [&ha.client, &ha.lan, &ha.primary, &ha.backup]
                .iter()
                .map(|n| n.name().to_string())
                .collect();
            drop(ha);
            r.netns.retain(|n| !names.contains(n));
        }
    }
}

/// A temporary directory, registered while it exists.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let d = std::env::temp_dir().join(format!("remora-demo-{}", std::process::id()));
        let mut r = reg();
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        r.dirs.push(d.clone());
        Ok(TempDir(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let mut r = reg();
        let _ = std::fs::remove_dir_all(&self.0);
        r.dirs.retain(|d| d != &self.0);
    }
}

// ---------------------------------------------------------------------------
// Processes with their output lines.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// A `remora` process we started, with every line it printed.
struct Proc {
    child: Option<Child>,
    pid: i32,
    rx: Receiver<(Stream, String)>,
    lines: Vec<(Stream, String)>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Result<Proc> {
        let mut r = reg();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id() as i32;
        r.pids.push(pid);
        drop(r);
        let (tx, rx) = channel();
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        for (pipe, which) in [
            (Box::new(out) as Box<dyn Read + Send>, Stream::Stdout),
            (Box::new(err), Stream::Stderr),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((which, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Proc {
            child: Some(child),
            pid,
            rx,
            lines: Vec::new(),
        })
    }

    /// Waits up to `timeout` for a line of `which` containing `needle`.
    fn wait_line(&mut self, which: Stream, needle: &str, timeout: Duration) -> Option<String> {
        if let Some((_, l)) = self.lines.iter().find(|(w, l)| *w == which && l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok((w, l)) => {
                    self.lines.push((w, l.clone()));
                    if w == which && l.contains(needle) {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return None,
                // Both pipes closed: the process is gone.
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn signal(&self, sig: i32) {
        if self.child.is_some() {
            // SAFETY: kill(2) on the PID of our child, not yet reaped.
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    /// Waits up to `timeout` for the exit (then SIGKILL), reaps it and
    /// collects the rest of its output. Returns its exit status text.
    fn finish(&mut self, timeout: Duration) -> String {
        let Some(mut child) = self.child.take() else {
            return "already reaped".into();
        };
        let deadline = Instant::now() + timeout;
        let mut r = reg();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break format!("{s}"),
                Ok(None) if Instant::now() < deadline => {
                    drop(r);
                    std::thread::sleep(Duration::from_millis(5));
                    r = reg();
                }
                _ => {
                    let _ = child.kill();
                    break match child.wait() {
                        Ok(s) => format!("{s} (killed after {timeout:?})"),
                        Err(e) => format!("unknown: {e}"),
                    };
                }
            }
        };
        r.pids.retain(|p| *p != self.pid);
        drop(r);
        // The readers end at EOF, right after the exit.
        while let Ok(l) = self.rx.recv_timeout(Duration::from_secs(2)) {
            self.lines.push(l);
        }
        status
    }

    fn text(&mut self, which: Stream) -> String {
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
        self.lines
            .iter()
            .filter(|(w, _)| *w == which)
            .map(|(_, l)| format!("    {l}\n"))
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGKILL);
            self.finish(Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------------------
// The guest's deterministic stream (crates/guest/README.md).

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The offset of the first byte of `buf` (at stream offset `off`) that
/// differs from the `source` stream (seed 0).
fn first_mismatch(buf: &[u8], off: u64) -> Option<u64> {
    let mut j = 0;
    while j < buf.len() {
        let pos = off + j as u64;
        let word = splitmix64(pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let take = (8 - start).min(buf.len() - j);
        if buf[j..j + take] != word[start..start + take] {
            let k = (0..take).find(|&k| buf[j + k] != word[start + k]).unwrap_or(0);
            return Some(pos + k as u64);
        }
        j += take;
    }
    None
}

/// SHA-256 (hex) of the first `len` bytes of the `source` stream.
fn source_sha(len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut k = 0u64;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let words = n.div_ceil(8);
        for c in buf[..words * 8].chunks_exact_mut(8) {
            c.copy_from_slice(&splitmix64(k).to_le_bytes());
            k += 1;
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex(&h.finalize())
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// The client.

/// What the client saw.
struct Received {
    bytes: u64,
    sha: String,
    mismatch: Option<u64>,
    /// (microseconds since t0, bytes) per read.
    reads: Vec<(u64, u32)>,
    /// Why the stream ended other than by an orderly close.
    error: Option<String>,
}

/// Reads the guest's `source` stream until it closes, from the client
/// namespace, as fast as it can (so the gap in what it receives is the
/// outage, not hidden by its socket buffer); `progress` follows the byte
/// count.
fn client(lan: &HaLan, t0: Instant, progress: Arc<AtomicU64>) -> std::thread::JoinHandle<std::io::Result<Received>> {
    lan.client.spawn_thread(move || {
        let mut s = TcpStream::connect((GUEST_IP, SOURCE_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut r = Received {
            bytes: 0,
            sha: String::new(),
            mismatch: None,
            reads: Vec::with_capacity(1 << 16),
            error: None,
        };
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    r.error = Some(match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "no data for 20 s".to_string(),
                        _ => e.to_string(),
                    });
                    break;
                }
            };
            r.reads.push((t0.elapsed().as_micros() as u64, n as u32));
            h.update(&buf[..n]);
            if r.mismatch.is_none() {
                r.mismatch = first_mismatch(&buf[..n], r.bytes);
            }
            r.bytes += n as u64;
            progress.store(r.bytes, Ordering::Relaxed);
        }
        r.sha = hex(&h.finalize());
        Ok(r)
    })
}

// ---------------------------------------------------------------------------

fn remora_paths() -> Result<(PathBuf, PathBuf)> {
    // target/release/examples/failover_demo -> target/release
    let exe = std::env::current_exe().context("locating this program")?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = exe.parent().and_then(Path::parent) {
        dirs.push(d.to_path_buf());
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t).join("release"));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release"));
    for d in &dirs {
        let (r, g) = (d.join("remora"), d.join("remora-guest"));
        if r.is_file() && g.is_file() {
            return Ok((r, g));
        }
    }
    bail!(
        "target/release/remora and target/release/remora-guest are missing (looked in {}): \
         run `cargo build --release --workspace` first",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// `remora ctl SOCK status`.
fn status(remora: &Path, sock: &Path) -> (bool, String) {
    match Command::new(remora).arg("ctl").arg(sock).arg("status").output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
            .trim()
            .to_string(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// The value of `key=` in a line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(key)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
}

/// Bytes per `bin_ms` bin, from t0 to the last read.
fn bins(reads: &[(u64, u32)], bin_ms: u64) -> Vec<u64> {
    let last = reads.last().map(|r| r.0).unwrap_or(0);
    let mut b = vec![0u64; (last / (bin_ms * 1000)) as usize + 1];
    for &(t, n) in reads {
        b[(t / (bin_ms * 1000)) as usize] += u64::from(n);
    }
    b
}

/// Mbit/s of `bytes` in a `bin_ms` bin.
fn mbit(bytes: u64, bin_ms: u64) -> f64 {
    bytes as f64 * 8.0 / (bin_ms as f64 / 1000.0) / 1e6
}

/// What the LAN switch saw of the guest's frames (times in microseconds
/// since t0).
struct Wire {
    frames: usize,
    /// Frames the capture could not keep up with.
    dropped: u64,
    last_primary: Option<u64>,
    first_backup: Option<u64>,
    /// The first frame from the backup host carrying stream data.
    first_backup_data: Option<u64>,
    /// Stream bytes the backup sent that the primary had sent already
    /// (the unacknowledged tail it took over and resent).
    resent: u64,
    /// Stream payload per 100 ms bin: (from the primary host, from the backup host).
    per_bin: Vec<(u64, u64)>,
    /// The same per 10 ms.
    per_fine: Vec<(u64, u64)>,
    /// Every stream segment: (time, sent again: its start was below the
    /// highest sequence number seen before it, payload bytes).
    segs: Vec<(u64, bool, u64)>,
}

impl Wire {
    /// (segments, bytes, retransmitted segments, their bytes) on the LAN in `[a, e]`.
    fn between(&self, a: u64, e: u64) -> (usize, u64, usize, u64) {
        let mut r = (0, 0, 0, 0);
        for &(_, again, len) in self.segs.iter().filter(|s| s.0 >= a && s.0 <= e) {
            r.0 += 1;
            r.1 += len;
            if again {
                r.2 += 1;
                r.3 += len;
            }
        }
        r
    }
}

fn wire(frames: &[CapturedFrame], dropped: u64, t0: Instant) -> Wire {
    let us = |f: &CapturedFrame| f.at.saturating_duration_since(t0).as_micros() as u64;
    let mut w = Wire {
        frames: frames.len(),
        dropped,
        last_primary: None,
        first_backup: None,
        first_backup_data: None,
        resent: 0,
        per_bin: Vec::new(),
        per_fine: Vec::new(),
        segs: Vec::new(),
    };
    let mut max_end = 0u64;
    // Stream sequence numbers relative to the first data segment's.
    let mut base: Option<u32> = None;
    let mut primary_end = 0u64;
    for f in frames.iter().filter(|f| f.src_mac == MAC_BYTES) {
        let t = us(f);
        match f.port {
            LanPort::Primary => w.last_primary = Some(t),
            LanPort::Backup => {
                w.first_backup.get_or_insert(t);
            }
            LanPort::Client => continue,
        }
        let Some(tcp) = f.tcp.filter(|t| t.src.port() == SOURCE_PORT && t.payload_len > 0) else {
            continue;
        };
        let rel = u64::from(tcp.seq.wrapping_sub(*base.get_or_insert(tcp.seq)));
        // A 32-bit sequence space: the stream may wrap it once it is past 4 GiB, not here.
        let end = rel + tcp.payload_len as u64;
        let len = tcp.payload_len as u64;
        w.segs.push((t, rel < max_end, len));
        max_end = max_end.max(end);
        let primary = f.port == LanPort::Primary;
        for (v, bin_ms) in [(&mut w.per_bin, BIN_MS), (&mut w.per_fine, FINE_MS)] {
            let bin = (t / (bin_ms * 1000)) as usize;
            if v.len() <= bin {
                v.resize(bin + 1, (0, 0));
            }
            if primary {
                v[bin].0 += len;
            } else {
                v[bin].1 += len;
            }
        }
        if primary {
            primary_end = primary_end.max(end);
        } else {
            w.first_backup_data.get_or_insert(t);
            w.resent += primary_end.min(end).saturating_sub(rel);
        }
    }
    w
}

/// Prints the frames on the LAN around the failover.
fn trace(frames: &[CapturedFrame], t0: Instant, kill: Duration, first_backup_data: Option<u64>) {
    let kill_us = kill.as_micros() as u64;
    let from = kill_us.saturating_sub(50_000);
    let to = first_backup_data.unwrap_or(kill_us + 1_000_000) + 50_000;
    println!("frames entering the LAN switch, ms after the kill (seq/ack relative to the initial sequence numbers):");
    // Initial sequence numbers: the guest's (SYN-ACK) and the client's (SYN).
    let isn = |from_guest: bool| {
        frames
            .iter()
            .filter_map(|f| f.tcp)
            .find(|t| t.is_syn() && (t.src.port() == SOURCE_PORT) == from_guest)
            .map(|t| t.seq)
            .unwrap_or(0)
    };
    let (guest_isn, client_isn) = (isn(true), isn(false));
    for f in frames {
        let t = f.at.saturating_duration_since(t0).as_micros() as u64;
        if !(from..=to).contains(&t) {
            continue;
        }
        let dt = (t as f64 - kill_us as f64) / 1000.0;
        match f.tcp {
            Some(tcp) => {
                let (sb, ab) = if tcp.src.port() == SOURCE_PORT {
                    (guest_isn, client_isn)
                } else {
                    (client_isn, guest_isn)
                };
                println!(
                    "  {dt:+9.3} {:<7?} {}->{} seq={} ack={} flags={:#04x} len={}",
                    f.port,
                    tcp.src.port(),
                    tcp.dst.port(),
                    tcp.seq.wrapping_sub(sb),
                    tcp.ack.wrapping_sub(ab),
                    tcp.flags,
                    tcp.payload_len
                );
            }
            None => println!(
                "  {dt:+9.3} {:<7?} ethertype={:#06x} len={}",
                f.port, f.ethertype, f.len
            ),
        }
    }
}

/// The client's silences of at least `min_us` (start, end), longest first.
fn silences(reads: &[(u64, u32)], from_us: u64, min_us: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = reads
        .windows(2)
        .filter(|w| w[1].0 > from_us && w[1].0 - w[0].0 >= min_us)
        .map(|w| (w[0].0, w[1].0))
        .collect();
    v.sort_by_key(|(a, b)| std::cmp::Reverse(b - a));
    v
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = install_cleanup_handlers() {
        eprintln!("failover demo: error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = demo(&args);
    // Everything was dropped inside demo(); this only catches leftovers.
    cleanup_registered(&mut reg());
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("failover demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo; Ok(false) when the stream was not exact.
fn demo(args: &Args) -> Result<bool> {
    let (remora, guest) = remora_paths()?;
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root (network namespaces, TAP devices, /dev/kvm)");
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("the demo needs a usable /dev/kvm")?;
    let total = args.mib * MIB;
    let t_start = Instant::now();
    let json_path = match &args.json {
        Some(p) => p.clone(),
        None => remora
            .parent()
            .and_then(Path::parent)
            .context("the target directory")?
            .join("demo/failover.json"),
    };
    // No stale timeline for the plot if this run fails.
    let _ = std::fs::remove_file(&json_path);

    println!("building the LAN...");
    let lan = Lan::new()?;
    let ha = lan.ha();
    println!(
        "  client {CLIENT_IP} on the LAN switch with the primary and backup hosts (guest TAP {} on each); \
         replication link {PRIMARY_REPL_IP} <-> {BACKUP_REPL_IP}",
        ha.tap
    );
    println!(
        "  namespaces: client {}, LAN {}, primary {}, backup {}",
        ha.client.name(),
        ha.lan.name(),
        ha.primary.name(),
        ha.backup.name()
    );
    let tmp = TempDir::new()?;
    let (psock, bsock) = (tmp.0.join("primary.sock"), tmp.0.join("backup.sock"));
    let repl = format!("{BACKUP_REPL_IP}:{REPL_PORT}");
    let net = format!("tap={},mac={MAC}", ha.tap);
    let remora_s = remora.to_str().context("remora path")?;

    let mut cmd = ha.backup.command(remora_s);
    cmd.args(["backup", "--listen", &repl, "--net", &net, "--control"])
        .arg(&bsock);
    let mut backup = Proc::spawn(cmd)?;
    println!(
        "starting the backup on the backup host: remora backup --listen {repl} --net {net} (pid {})",
        backup.pid
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ha
            .backup
            .exec("ss", &["-ltnH"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        if out.is_ok_and(|o| o.contains(&format!(":{REPL_PORT}"))) {
            break;
        }
        if backup.exited() || Instant::now() > deadline {
            backup.finish(Duration::from_secs(1));
            bail!("the backup did not start listening:\n{}", backup.text(Stream::Stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let workload = format!("workload=source:{SOURCE_PORT}:{} ip={GUEST_IP}/24", args.mib);
    let mut cmd = ha.primary.command(remora_s);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&guest)
        .args(["--cmdline", &workload, "--vcpus", "2", "--mem", "256", "--net", &net])
        .arg("--control")
        .arg(&psock)
        .args(["--protect", &repl, "--output", &args.output]);
    let boot = Instant::now();
    let mut primary = Proc::spawn(cmd)?;
    println!(
        "booting the protected guest on the primary host: remora run --kernel {} --cmdline \"{workload}\" \
         --vcpus 2 --mem 256 --net {net} --protect {repl} --output {} (pid {})",
        guest.display(),
        args.output,
        primary.pid
    );
    let Some(up) = primary.wait_line(Stream::Stdout, "remora-guest: net up", Duration::from_secs(30)) else {
        primary.finish(Duration::from_secs(1));
        bail!(
            "the guest's network never came up\n  console:\n{}  stderr:\n{}",
            primary.text(Stream::Stdout),
            primary.text(Stream::Stderr)
        );
    };
    println!("  guest console: {up}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let protected = loop {
        let (ok, st) = status(&remora, &psock);
        if ok && st.contains("protected=yes") {
            break st;
        }
        if primary.exited() || backup.exited() || Instant::now() > deadline {
            bail!(
                "the primary never became protected; last status: {st}\n  primary stderr:\n{}  backup stderr:\n{}",
                primary.text(Stream::Stderr),
                backup.text(Stream::Stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "primary protected: {protected} ({} after its start)",
        secs(boot.elapsed())
    );

    println!(
        "streaming {} MiB from the guest ({GUEST_IP}:{SOURCE_PORT}) to the client ({CLIENT_IP}), read as fast as it can...",
        args.mib,
    );
    // Every frame entering the LAN switch, headers only: which host sent
    // the guest's frames, and when.
    let capture = ha.capture_lan_snaplen(128).context("starting the LAN capture")?;
    let progress = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let reader = client(ha, t0, progress.clone());
    let kill_bytes = total * args.kill_by_percent / 100;
    let kill_after = Duration::from_millis(args.kill_after_ms);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = progress.load(Ordering::Relaxed);
        if got >= kill_bytes || (got > 0 && t0.elapsed() >= kill_after) {
            break;
        }
        if reader.is_finished() || Instant::now() > deadline {
            let why = match reader.join() {
                Ok(Ok(r)) => format!("{} bytes, error: {:?}", r.bytes, r.error),
                Ok(Err(e)) => format!("cannot connect: {e}"),
                Err(_) => "the client thread panicked".into(),
            };
            bail!(
                "the stream ended (or stalled) before the kill: {why}\n  primary console:\n{}  primary stderr:\n{}",
                primary.text(Stream::Stdout),
                primary.text(Stream::Stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let st_before = status(&remora, &psock).1;
    primary.signal(libc::SIGKILL);
    let kill_at = t0.elapsed();
    let got_at_kill = progress.load(Ordering::Relaxed);
    println!(
        "killing the primary (pid {}) at t={} with SIGKILL, {:.1} MiB received so far",
        primary.pid,
        secs(kill_at),
        got_at_kill as f64 / MIB as f64
    );
    println!("  its last status: {st_before}");
    let protected_at_kill = st_before.contains("protected=yes");
    if !protected_at_kill {
        println!("  warning: the primary was NOT protected any more when it was killed (see last_error above)");
    }
    primary.finish(Duration::from_secs(5));
    let primary_console = primary.text(Stream::Stdout);
    if primary_console.contains("remora-guest: source") {
        println!("  warning: the guest had finished the stream before the kill (make the stream longer)");
    }

    let failover = backup.wait_line(Stream::Stderr, "remora backup: failover:", Duration::from_secs(20));
    match &failover {
        Some(l) => println!(
            "backup took over (t={}): {}",
            secs(t0.elapsed()),
            l.trim_start_matches("remora backup: ")
        ),
        None => println!("the backup did NOT take over within 20 s"),
    }
    let received = match reader.join() {
        Ok(r) => r.context("client")?,
        Err(_) => bail!("the client thread panicked"),
    };
    let end = t0.elapsed();
    println!(
        "stream ended at t={}: {} bytes{}",
        secs(end),
        received.bytes,
        match &received.error {
            Some(e) => format!(", ERROR: {e}"),
            None => " (orderly close)".into(),
        }
    );
    let guest_line = if failover.is_some() {
        backup.wait_line(Stream::Stdout, "remora-guest: source", Duration::from_secs(10))
    } else {
        None
    };
    if let Some(l) = &guest_line {
        println!("  guest console (now on the backup host): {l}");
    }
    std::thread::sleep(Duration::from_millis(50));
    let (frames, dropped) = capture.stop_lossy().unwrap_or_else(|e| {
        println!("  (the LAN capture failed: {e})");
        (Vec::new(), 0)
    });
    backup.signal(libc::SIGTERM);
    let bstatus = backup.finish(Duration::from_secs(10));
    println!("stopped the backup: {bstatus}");
    let w = wire(&frames, dropped, t0);

    // Timeline.
    let b = bins(&received.reads, BIN_MS);
    let fine = bins(&received.reads, FINE_MS);
    let kill_us = kill_at.as_micros() as u64;
    let bin_of = |us: u64| (us / (BIN_MS * 1000)) as usize;
    let kill_bin = bin_of(kill_us);
    let takeover_bin = w.first_backup_data.map(bin_of);
    let peak = b.iter().map(|&x| mbit(x, BIN_MS)).fold(1.0, f64::max);
    println!();
    println!(
        "client throughput per {BIN_MS} ms (t since the client connected; full bar = {peak:.0} Mbit/s; \
         via = the host whose frames carried the stream on the LAN)"
    );
    println!("  t (s)    Mbit/s via");
    for (i, &bytes) in b.iter().enumerate() {
        let v = mbit(bytes, BIN_MS);
        let bar = "#".repeat((v / peak * 50.0).round() as usize);
        let via = match w.per_bin.get(i) {
            Some((p, b)) if *p > 0 && *b > 0 => "P+B",
            Some((p, _)) if *p > 0 => "P",
            Some((_, b)) if *b > 0 => "B",
            _ => "-",
        };
        let mut notes = Vec::new();
        if i == kill_bin {
            notes.push(format!("primary killed at t={}", secs(kill_at)));
        }
        if Some(i) == takeover_bin {
            notes.push("the backup's first stream data on the LAN".to_string());
        }
        let note = if notes.is_empty() {
            String::new()
        } else {
            format!("  <- {}", notes.join("; "))
        };
        println!(
            "  {:5.1} {:9.1} {via:<3} |{bar:<50}|{note}",
            i as f64 * BIN_MS as f64 / 1000.0,
            v
        );
    }
    println!();

    // Throughput on either side of the failover: whole bins only, not the
    // first (connection set-up) nor the last (the stream's end).
    let first_bin = received.reads.first().map(|r| bin_of(r.0) + 1);
    let avg = |from: usize, to: usize| -> Option<f64> {
        (to > from + 1).then(|| b[from..to].iter().map(|&x| mbit(x, BIN_MS)).sum::<f64>() / (to - from) as f64)
    };
    let before = first_bin.and_then(|f| avg(f, kill_bin.min(b.len())));
    let after = takeover_bin.and_then(|r| avg(r + 1, b.len().saturating_sub(1)));
    if let (Some(x), Some(y)) = (before, after) {
        println!(
            "throughput at the client: {x:.0} Mbit/s from the protected primary; {y:.0} Mbit/s from the backup \
             after the failover (it runs the guest unprotected now: no checkpoints, no held output)"
        );
    }

    // Failover time.
    let t = |us: u64| format!("t={:.3} s", us as f64 / 1e6);
    let rel = |us: u64| {
        let d = us as i64 - kill_us as i64;
        format!(
            "{}{} ms after the kill",
            if d < 0 { "-" } else { "" },
            d.unsigned_abs() / 1000
        )
    };
    println!("failover:");
    // The failover's pause: the longest silence of the client that spans
    // the kill or begins before the backup's first stream data reached the
    // LAN (later ones are the backup's own hiccups).
    let backup_from = w.first_backup_data.unwrap_or(u64::MAX);
    let gap = silences(&received.reads, kill_us, 0)
        .into_iter()
        .find(|&(a, _)| a < backup_from)
        .filter(|_| failover.is_some());
    if let Some((a, e)) = gap {
        let before_kill = if a < kill_us {
            format!(", {} of it before the kill", ms(Duration::from_micros(kill_us - a)))
        } else {
            String::new()
        };
        println!(
            "  client: the stream resumed {} after the kill; it received nothing for {} ({} .. {}{before_kill})",
            ms(Duration::from_micros(e.saturating_sub(kill_us))),
            ms(Duration::from_micros(e - a)),
            t(a),
            t(e),
        );
    }
    if let (Some(lp), Some(fb)) = (w.last_primary, w.first_backup) {
        println!(
            "  LAN: the primary host's last guest frame at {} ({}), the backup host's first at {} ({}): \
             {} without a frame from the guest",
            t(lp),
            rel(lp),
            t(fb),
            rel(fb),
            ms(Duration::from_micros(fb.saturating_sub(lp)))
        );
        println!(
            "  one active copy: {}",
            if lp < fb && fb > kill_us {
                "yes (every guest frame from the primary host precedes every one from the backup host)"
            } else {
                "NO: both hosts emitted the guest's frames at once"
            }
        );
    }
    if let Some(fd) = w.first_backup_data {
        let what = if w.resent > 0 {
            format!(
                "it first resent {} KiB the primary had already sent (unacknowledged as of the last \
                 checkpoint: the retransmission queue travels in the checkpoints), then went on with the stream",
                w.resent.div_ceil(1024)
            )
        } else {
            "it went on exactly where the primary's output stopped (nothing to resend)".to_string()
        };
        println!("  the backup's first stream data at {} ({}); {what}", t(fd), rel(fd));
    }
    if w.dropped > 0 {
        println!(
            "  (the LAN capture missed {} of {} frames)",
            w.dropped,
            w.frames + w.dropped as usize
        );
    }
    if let Some(l) = &failover {
        println!("  backup's own account: {}", l.trim_start_matches("remora backup: "));
    }
    // Other pauses of the stream (not the failover's), for the record.
    let start = received.reads.first().map(|r| r.0).unwrap_or(0);
    let mut others: Vec<(u64, u64)> = silences(&received.reads, start, 100_000)
        .into_iter()
        .filter(|g| Some(*g) != gap)
        .collect();
    others.sort();
    for (a, e) in &others {
        let (n, bytes, rn, rbytes) = w.between(*a, *e);
        let when = if *e <= kill_us || w.first_backup_data.is_none() {
            format!("{} before the kill", ms(Duration::from_micros(kill_us - e)))
        } else {
            format!(
                "{} after the takeover",
                ms(Duration::from_micros(
                    a.saturating_sub(w.first_backup_data.unwrap_or(kill_us))
                ))
            )
        };
        println!(
            "  note: the stream also paused {} at {} ({when}), not part of the failover; meanwhile the LAN \
             carried {n} stream segments from the guest ({:.0} KiB), {rn} of them sent again ({:.0} KiB)",
            ms(Duration::from_micros(e - a)),
            t(*a),
            bytes as f64 / 1024.0,
            rbytes as f64 / 1024.0,
        );
    }

    // Exactness.
    println!("checking the stream against the guest's generator (splitmix64, seed 0)...");
    let want = source_sha(total);
    println!("  received: {:>10} bytes, sha256 {}", received.bytes, received.sha);
    println!("  expected: {total:>10} bytes, sha256 {want}");
    if let Some(l) = &guest_line {
        println!(
            "  guest:    {:>10} bytes, sha256 {} (the guest's own count, finished on the backup)",
            field(l, "bytes="),
            field(l, "sha256=")
        );
    }
    let guest_sha_ok = guest_line.as_deref().is_none_or(|l| field(l, "sha256=") == want);
    let one_copy = match (w.last_primary, w.first_backup) {
        (Some(lp), Some(fb)) => lp < fb,
        _ => true,
    };
    let exact = received.error.is_none()
        && received.bytes == total
        && received.sha == want
        && received.mismatch.is_none()
        && failover.is_some()
        && guest_sha_ok
        && one_copy;
    if args.trace || !exact {
        trace(&frames, t0, kill_at, w.first_backup_data);
    }
    drop(frames);

    // Plot data.
    let num = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_else(|| "null".into());
    let sec = |v: Option<u64>| num(v.map(|x| x as f64 / 1e6));
    let series = |v: &mut dyn Iterator<Item = u64>, bin: u64| {
        v.map(|x| format!("{:.3}", mbit(x, bin))).collect::<Vec<_>>().join(",")
    };
    let json = format!(
        "{{\"bin_ms\":{BIN_MS},\"mbit\":[{}],\"fine_ms\":{FINE_MS},\"fine_mbit\":[{}],\
         \"wire_primary_mbit\":[{}],\"wire_backup_mbit\":[{}],\"wire_primary_fine_mbit\":[{}],\
         \"wire_backup_fine_mbit\":[{}],\"kill_s\":{:.6},\
         \"client_gap_s\":{},\"last_primary_s\":{},\"first_backup_s\":{},\"first_backup_data_s\":{},\
         \"failover\":{},\"received\":{},\"total\":{total},\"exact\":{exact},\"output\":\"{}\",\
         \"before_mbit\":{},\"after_mbit\":{}}}\n",
        series(&mut b.iter().copied(), BIN_MS),
        series(&mut fine.iter().copied(), FINE_MS),
        series(&mut w.per_bin.iter().map(|x| x.0), BIN_MS),
        series(&mut w.per_bin.iter().map(|x| x.1), BIN_MS),
        series(&mut w.per_fine.iter().map(|x| x.0), FINE_MS),
        series(&mut w.per_fine.iter().map(|x| x.1), FINE_MS),
        kill_at.as_secs_f64(),
        match gap {
            Some((a, e)) => format!("[{:.6},{:.6}]", a as f64 / 1e6, e as f64 / 1e6),
            None => "null".into(),
        },
        sec(w.last_primary),
        sec(w.first_backup),
        sec(w.first_backup_data),
        match &failover {
            Some(l) => format!("\"{}\"", l.replace('\\', "\\\\").replace('"', "'")),
            None => "null".into(),
        },
        received.bytes,
        args.output,
        num(before),
        num(after),
    );
    if let Some(d) = json_path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    println!("timeline written to {}", json_path.display());

    drop(lan);
    drop(tmp);
    println!("cleaned up (namespaces, processes, temporary files)");
    println!("demo took {} after the build", secs(t_start.elapsed()));
    if exact {
        println!(
            "result: {} MiB received, sha256 matches; the guest and its TCP connection survived the primary's death",
            total / MIB
        );
        return Ok(true);
    }
    let mut why = Vec::new();
    if let Some(e) = &received.error {
        why.push(format!("the stream broke: {e}"));
    }
    if received.bytes != total {
        why.push(format!("received {} of {total} bytes", received.bytes));
    }
    if let Some(m) = received.mismatch {
        why.push(format!("first wrong byte at offset {m}"));
    }
    if received.sha != want {
        why.push("sha256 differs".into());
    }
    if failover.is_none() {
        why.push("the backup never took over".into());
    }
    if !protected_at_kill {
        why.push("the primary had lost its backup before the kill (see the backup's stderr below)".into());
    }
    if !guest_sha_ok {
        why.push("the guest's own sha256 differs from the generator's".into());
    }
    if !one_copy {
        why.push("both hosts emitted the guest's frames at once".into());
    }
    println!("result: FAILED: {}", why.join("; "));
    println!("  primary console (until the kill):\n{primary_console}");
    println!("  primary stderr:\n{}", primary.text(Stream::Stderr));
    println!("  backup stderr:\n{}", backup.text(Stream::Stderr));
    println!("  backup console:\n{}", backup.text(Stream::Stdout));
    Ok(false)
}
