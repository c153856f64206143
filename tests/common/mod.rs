//! Helpers shared by the end-to-end tests: locating binaries, running
//! `remora` with a timeout while timestamping its console lines.
#![allow(dead_code)]

pub mod relay;

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `remora` binary under test.
pub fn remora_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_remora"))
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// The release test guest; the README's test command builds it first.
pub fn guest_bin() -> PathBuf {
    let p = target_dir().join("release/remora-guest");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release` (the README's test command does)",
        p.display()
    );
    p
}

/// Fails the test (never skips it) when KVM cannot be used.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("these tests need a usable /dev/kvm (run as root on a KVM host): {e}");
    }
}

/// A finished `remora` run.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    /// Console lines with the time since spawn at which each arrived.
    pub lines: Vec<(Duration, String)>,
    pub stderr: String,
    /// Time from spawn to process exit.
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Run {
    pub fn stdout(&self) -> String {
        self.lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// The first console line containing `needle`, with its arrival time.
    pub fn line(&self, needle: &str) -> Option<(Duration, &str)> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, l)| (*t, l.as_str()))
    }

    /// Panics with the whole output if `cond` is false.
    pub fn check(&self, cond: bool, what: &str) {
        assert!(
            cond,
            "{what}\n--- status: {:?} (timed out: {}) after {:?}\n--- stdout:\n{}--- stderr:\n{}",
            self.status,
            self.timed_out,
            self.elapsed,
            self.stdout(),
            self.stderr
        );
    }

    /// The lines remora itself wrote to stderr that are not log lines.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("remora: error")).collect()
    }
}

/// Spawned `remora` whose output is being collected.
pub struct Running {
    pub child: Child,
    start: Instant,
    lines_rx: mpsc::Receiver<(Duration, String)>,
    lines: Vec<(Duration, String)>,
    stderr_thread: Option<std::thread::JoinHandle<String>>,
}

/// Starts `remora ARGS`.
pub fn spawn_remora(args: &[&str]) -> Running {
    spawn(Command::new(remora_bin()).args(args))
}

/// Starts `cmd` with its stdout/stderr collected.
pub fn spawn(cmd: &mut Command) -> Running {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let stderr_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Running {
        child,
        start,
        lines_rx,
        lines: Vec::new(),
        stderr_thread: Some(stderr_thread),
    }
}

impl Drop for Running {
    /// A test that fails before `finish` must not leave its VM running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    /// The console lines that arrived so far (without waiting).
    pub fn lines_so_far(&mut self) -> &[(Duration, String)] {
        while let Ok(l) = self.lines_rx.try_recv() {
            self.lines.push(l);
        }
        &self.lines
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a console line containing `needle`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Option<(Duration, String)> {
        if let Some(l) = self.lines.iter().find(|(_, l)| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines_rx.recv_timeout(left) {
                Ok(l) => {
                    self.lines.push(l.clone());
                    if l.1.contains(needle) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits up to `timeout` for a console line for which `pred` holds.
    pub fn wait_line_where(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<(Duration, String)> {
        if let Some(l) = self.lines.iter().find(|(_, l)| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines_rx.recv_timeout(left) {
                Ok(l) => {
                    self.lines.push(l.clone());
                    if pred(&l.1) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Sends `sig` to the child (by its PID).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `timeout` (from now) for exit; then kills the child (by PID).
    pub fn finish(mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.start.elapsed();
        let stderr = self
            .stderr_thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        // The reader ends at EOF, which follows the exit.
        while let Ok(l) = self.lines_rx.recv_timeout(Duration::from_secs(2)) {
            self.lines.push(l);
        }
        Run {
            status,
            lines: std::mem::take(&mut self.lines),
            stderr,
            elapsed,
            timed_out,
        }
    }
}

/// Runs `remora ARGS` to completion (killed after `timeout`).
pub fn run_remora(args: &[&str], timeout: Duration) -> Run {
    spawn_remora(args).finish(timeout)
}

/// Boots the test guest with `cmdline` on `vcpus` vCPUs.
pub fn run_guest(cmdline: &str, vcpus: u32, mem_mib: u32, timeout: Duration) -> Run {
    let guest = guest_bin();
    let (v, m) = (vcpus.to_string(), mem_mib.to_string());
    run_remora(
        &[
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--vcpus",
            &v,
            "--mem",
            &m,
        ],
        timeout,
    )
}

/// Usable RAM in KiB the guest should report for `mem_mib` (the e820 map
/// minus the EBDA/BIOS hole between 0x9fc00 and 1 MiB).
pub fn expected_mem_kib(mem_mib: u64) -> u64 {
    (mem_mib << 10) - (0x10_0000 - 0x9_fc00) / 1024
}

/// Which VMM runs the test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Remora,
    /// QEMU microvm, userspace virtio-net (vhost=off), modern virtio-mmio.
    Qemu,
}

/// Boots the test guest with `workloads` on `lan` (inside its host
/// namespace, on its TAP) under `vmm`, and waits for `net up`; returns the
/// VM and the guest's MAC address from that line.
pub fn boot_on_lan(lan: &remora_netlab::VmLan, vmm: Vmm, workloads: &str, vcpus: u32) -> (Running, String) {
    let guest = guest_bin();
    let g = guest.to_str().unwrap().to_string();
    let cmdline = format!("workload={workloads} ip={}/24", remora_netlab::GUEST_IP);
    let (v, tap) = (vcpus.to_string(), lan.tap.clone());
    let mut cmd = match vmm {
        Vmm::Remora => {
            let mut c = lan.host.command(remora_bin().to_str().unwrap());
            c.args([
                "run",
                "--kernel",
                &g,
                "--cmdline",
                &cmdline,
                "--vcpus",
                &v,
                "--mem",
                "256",
            ])
            .args(["--net", &format!("tap={tap}")]);
            c
        }
        Vmm::Qemu => qemu_microvm(&lan.host, &v, "256", &g, &cmdline, &tap, None),
    };
    let mut vm = spawn(&mut cmd);
    let Some((t, line)) = vm.wait_line("remora-guest: net up", Duration::from_secs(30)) else {
        let run = vm.finish(Duration::from_secs(1));
        panic!("{vmm:?}: no `net up` line\n{}\n{}", run.stdout(), run.stderr);
    };
    eprintln!("{line} (after {t:?})");
    assert!(line.contains(&format!("ip={}/24", remora_netlab::GUEST_IP)), "{line}");
    let mac = line.split("mac=").nth(1).unwrap_or("").trim().to_string();
    (vm, mac)
}

/// QEMU microvm (the baseline) booting `kernel` in `ns` on `tap`, with the
/// same virtio-mmio version as remora's devices; `mac` defaults to QEMU's.
pub fn qemu_microvm(
    ns: &remora_netlab::Netns,
    vcpus: &str,
    mem_mib: &str,
    kernel: &str,
    cmdline: &str,
    tap: &str,
    mac: Option<&str>,
) -> Command {
    let mut c = ns.command("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,acpi=on",
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args([
        "-smp",
        vcpus,
        "-m",
        mem_mib,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .args(["-serial", "stdio", "-no-reboot", "-kernel", kernel, "-append", cmdline])
    .args([
        "-netdev",
        &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
    ]);
    match mac {
        Some(m) => c.args(["-device", &format!("virtio-net-device,netdev=n0,mac={m}")]),
        None => c.args(["-device", "virtio-net-device,netdev=n0"]),
    };
    c.args(["-global", "virtio-mmio.force-legacy=false"]);
    c
}

/// Waits up to `timeout` until something listens on TCP `port` in `ns`.
pub fn wait_listening(ns: &remora_netlab::Netns, port: u16, timeout: Duration) -> bool {
    let port = format!(":{port} ");
    let deadline = Instant::now() + timeout;
    loop {
        let out = ns
            .exec("ss", &["-ltnH"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        if out.is_ok_and(|o| o.contains(&port)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `remora ctl SOCKET ARGS`: (success, stdout + stderr).
pub fn ctl(sock: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(remora_bin())
        .arg("ctl")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// From `lan`'s client, streams `total` bytes (a multiple of 256 KiB) into
/// the guest's `port` at a modest pace (a chunk every `pause`), so the
/// stream spans whatever the test does meanwhile; returns its SHA-256.
pub fn paced_stream(
    lan: &remora_netlab::VmLan,
    port: u16,
    total: usize,
    pause: Duration,
) -> std::thread::JoinHandle<std::io::Result<String>> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    lan.client.spawn_thread(move || {
        let mut c = std::net::TcpStream::connect((remora_netlab::GUEST_IP, port))?;
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 256 << 10];
        for i in 0..total / chunk.len() {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 31 + j * 7) as u8;
            }
            c.write_all(&chunk)?;
            h.update(&chunk);
            std::thread::sleep(pause);
        }
        c.shutdown(std::net::Shutdown::Write)?;
        let _ = c.read_to_end(&mut Vec::new());
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    })
}

/// splitmix64: the test guest's stream and disk pattern generator (see
/// crates/guest/README.md), one 64-bit little-endian word per 8 bytes.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` (a multiple of 8 bytes) with the splitmix64 stream from
/// counter `*k` on, advancing it.
pub fn fill_splitmix(buf: &mut [u8], k: &mut u64) {
    for c in buf.chunks_exact_mut(8) {
        c.copy_from_slice(&splitmix64(*k).to_le_bytes());
        *k += 1;
    }
}

/// Lower-case hex of a digest.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of the first `len` bytes (a multiple of 8) of the
/// splitmix64 stream whose first word is `splitmix64(first)`.
pub fn splitmix_stream_sha(first: u64, len: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut k = first;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill_splitmix(&mut buf[..n], &mut k);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex(&h.finalize())
}

/// Writes `len` bytes (a multiple of 8) of stream `seed` (splitmix64 from
/// counter `seed << 40`), then shuts the write side down; returns the
/// SHA-256 of what was written. `progress` counts bytes handed to the kernel.
pub fn send_stream(mut s: &TcpStream, seed: u64, len: u64, progress: Option<&AtomicU64>) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut k = seed << 40;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill_splitmix(&mut buf[..n], &mut k);
        s.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    s.shutdown(Shutdown::Write)?;
    Ok(hex(&h.finalize()))
}

/// Reads to EOF; returns (bytes, SHA-256). `progress` counts bytes read.
pub fn recv_stream(mut s: &TcpStream, progress: Option<&AtomicU64>) -> io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok((n, hex(&h.finalize()))),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
                if let Some(p) = progress {
                    p.fetch_add(k as u64, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("after {n} bytes: {e}"))),
        }
    }
}
