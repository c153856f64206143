//! End-to-end tests of RACC (crates/racc): the BPF congestion control
//! loaded into this host's kernel by `remora racc install`, used by real
//! Linux TCP senders in the relay's server namespace (the protected
//! "guest") toward a real Linux receiver behind a shaped WAN.
//!
//! RACC is host-global kernel state, so everything runs in one test, in
//! order: install (twice: idempotent), a RACC sender through a speculative
//! relay (exact stream; the engine's mark reached the sender and RACC
//! filled the VMM's window), RACC and CUBIC senders through a `direct`
//! relay over a lossy bottleneck (no mark, no window filled, no back-off
//! refused: CUBIC's behaviour and throughput), `remove` refused while a
//! socket uses RACC, then removed (if this test installed it).

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::relay::Relay;
use common::{recv_stream, send_stream, splitmix_stream_sha};
use remora_netlab::{set_tcp_congestion, tcp_congestion, RelayLan, Shaping};

const MIB: u64 = 1 << 20;
const NAME: &str = "remora_racc";

fn racc(args: &[&str]) -> (bool, String) {
    racc_in(None, args)
}

/// `remora racc ARGS`, in a namespace if given: (success, stdout+stderr).
fn racc_in(ns: Option<&remora_netlab::Netns>, args: &[&str]) -> (bool, String) {
    let bin = common::remora_bin();
    let mut cmd = match ns {
        Some(ns) => ns.command(bin.to_str().expect("utf-8 path")),
        None => Command::new(&bin),
    };
    let out = cmd.arg("racc").args(args).output().expect("run remora racc");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// RACC's counters from `remora racc status`.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    marked: u64,
    filled: u64,
    refused: u64,
}

fn counters() -> Counters {
    let (ok, out) = racc(&["status"]);
    assert!(ok, "racc status failed: {out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("counters:"))
        .unwrap_or_else(|| panic!("no counters in status:\n{out}"));
    let num = |key: &str| -> u64 {
        let i = line.find(key).unwrap_or_else(|| panic!("{key} missing: {line}")) + key.len();
        line[i..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key}: bad number in {line}"))
    };
    Counters {
        marked: num("marked segments "),
        filled: num("windows filled "),
        refused: num("back-offs refused "),
    }
}

/// TCP_INFO of a socket: (congestion window in segments, total
/// retransmissions).
fn cwnd_retrans(s: &TcpStream) -> (u32, u32) {
    // SAFETY: an all-zero tcp_info is a valid value of this plain C struct.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    (info.tcpi_snd_cwnd, info.tcpi_total_retrans)
}

/// What one transfer did.
struct Sent {
    gbps: f64,
    /// Largest congestion window seen at the sender (segments).
    max_cwnd: u32,
    retrans: u32,
}

/// The server (inner side) sends `len` bytes with congestion control `cc`
/// to the client through whatever relay runs on `lan`; the client checks
/// the stream. `cc` None: the server namespace's default.
fn send_down(lan: &RelayLan, port: u16, cc: Option<&str>, seed: u64, len: u64) -> Sent {
    let cc2 = cc.map(str::to_string);
    let l: TcpListener = lan
        .server
        .spawn_thread(move || {
            let l = TcpListener::bind(("0.0.0.0", port))?;
            if let Some(cc) = cc2 {
                set_tcp_congestion(&l, &cc)?;
            }
            Ok(l)
        })
        .join()
        .expect("listener thread")
        .expect("listen in the server namespace");
    let want_cc = cc.map(str::to_string);
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let got_cc = tcp_congestion(&s).expect("TCP_CONGESTION");
        if let Some(w) = want_cc {
            assert_eq!(got_cc, w, "the accepted socket's congestion control");
        }
        let s = std::sync::Arc::new(s);
        let s2 = s.clone();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        // Sample the window while sending.
        let sampler = std::thread::spawn(move || {
            let mut max = 0;
            while !d2.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(cwnd_retrans(&s2).0);
                std::thread::sleep(Duration::from_millis(2));
            }
            max
        });
        let sha = send_stream(&s, seed, len, None).expect("send");
        // The retransmission count once the peer has everything.
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &*s, &mut buf);
        let (_, retrans) = cwnd_retrans(&s);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (sha, sampler.join().expect("sampler"), retrans, got_cc)
    });
    let ip = lan.server_ip;
    let c = lan
        .client
        .spawn_thread(move || TcpStream::connect((ip, port)))
        .join()
        .expect("connect thread")
        .expect("connect through the relay");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t0 = Instant::now();
    let (n, sha) = recv_stream(&c, None).expect("receive");
    let t = t0.elapsed();
    drop(c);
    let (sent_sha, max_cwnd, retrans, got_cc) = server.join().expect("server side");
    assert_eq!(n, len, "bytes received");
    assert_eq!(sha, sent_sha, "the stream differs");
    assert_eq!(
        sha,
        splitmix_stream_sha(seed << 40, len),
        "the stream is not the pattern"
    );
    let gbps = len as f64 * 8.0 / t.as_secs_f64() / 1e9;
    eprintln!(
        "  {got_cc}: {} MiB in {t:.2?} = {gbps:.3} Gbit/s, max cwnd {max_cwnd} segments, {retrans} retransmissions",
        len / MIB
    );
    Sent {
        gbps,
        max_cwnd,
        retrans,
    }
}

/// Removes RACC at the end if this test installed it (also on failure).
struct Uninstall(bool);

impl Drop for Uninstall {
    fn drop(&mut self) {
        if self.0 {
            let (ok, out) = racc(&["remove", "--force"]);
            if !ok {
                eprintln!("racc remove --force: {out}");
            }
        }
    }
}

fn available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == NAME)
}

#[test]
fn racc_fills_the_vmm_window_and_is_cubic_toward_a_real_peer() {
    // Install, twice: the second is a no-op.
    let before = available();
    let (ok, out) = racc(&["install"]);
    assert!(ok, "racc install: {out}");
    let guard = Uninstall(!before);
    assert!(
        available(),
        "{NAME} not in tcp_available_congestion_control after install:\n{out}"
    );
    let (ok, out) = racc(&["install"]);
    assert!(ok && out.contains("already installed"), "second install: {out}");
    let (ok, out) = racc(&["status"]);
    assert!(ok && out.contains(&format!("{NAME}: installed")), "status: {out}");

    // 1. Behind a speculating relay: 1 Gbit/s bottleneck, 10 ms RTT, 25 ms
    //    epochs. RACC is the server namespace's default (`install --default`
    //    run there), the way a guest would use it.
    let lan = RelayLan::new(
        "rcs",
        Some(Shaping::rate("1gbit", 4 * MIB).delay(Duration::from_millis(5))),
    )
    .expect("relay lan");
    let (ok, out) = racc_in(Some(&lan.server), &["install", "--default"]);
    assert!(
        ok && out.contains("already installed"),
        "install --default in the server namespace: {out}"
    );
    assert_eq!(
        lan.server
            .sysctl_get("net/ipv4/tcp_congestion_control")
            .expect("sysctl"),
        NAME
    );
    let relay = Relay::start(
        &lan,
        "speculative",
        &["--epoch-ms", "25", "--commit-delay-ms", "5", "--budget", "16777216"],
    );
    let c0 = counters();
    let racc_spec = send_down(&lan, 5101, None, 1, 64 * MIB);
    let c1 = counters();
    eprintln!("  counters: {c0:?} -> {c1:?}");
    assert!(
        c1.marked > c0.marked,
        "no marked ACK reached the RACC sender (the engine's mark or the sock_ops watcher is broken)"
    );
    assert!(c1.filled > c0.filled, "RACC never opened its window to the VMM's");
    let cubic_spec = send_down(&lan, 5102, Some("cubic"), 2, 64 * MIB);
    relay.stop();
    eprintln!(
        "speculative relay: racc {:.3} Gbit/s (max cwnd {}), cubic {:.3} Gbit/s (max cwnd {}): {:.2}x",
        racc_spec.gbps,
        racc_spec.max_cwnd,
        cubic_spec.gbps,
        cubic_spec.max_cwnd,
        racc_spec.gbps / cubic_spec.gbps
    );
    // The VMM advertises up to the 16 MiB budget: RACC's window follows it
    // (CUBIC's grows by its own clock; it never needs more than the BDP).
    assert!(
        racc_spec.max_cwnd > 2 * cubic_spec.max_cwnd.max(10),
        "RACC's window ({}) did not open beyond CUBIC's ({})",
        racc_spec.max_cwnd,
        cubic_spec.max_cwnd
    );
    drop(lan);

    // 2. Through a `direct` relay (no speculation: the peer's own ACKs) over
    //    a 200 Mbit/s bottleneck with a small queue: losses happen, RACC
    //    must react as CUBIC does.
    let lan = RelayLan::new(
        "rcd",
        Some(Shaping::rate("200mbit", 256 << 10).delay(Duration::from_millis(5))),
    )
    .expect("relay lan");
    let relay = Relay::start(&lan, "direct", &[]);
    let c0 = counters();
    let racc_direct = send_down(&lan, 5201, Some(NAME), 3, 48 * MIB);
    let c1 = counters();
    let cubic_direct = send_down(&lan, 5202, Some("cubic"), 4, 48 * MIB);
    relay.stop();
    drop(lan);
    eprintln!(
        "direct relay: racc {:.3} Gbit/s ({} retx), cubic {:.3} Gbit/s ({} retx): {:.2}x",
        racc_direct.gbps,
        racc_direct.retrans,
        cubic_direct.gbps,
        cubic_direct.retrans,
        racc_direct.gbps / cubic_direct.gbps
    );
    assert_eq!(c1.marked, c0.marked, "marks seen without a speculating VMM");
    assert_eq!(c1.filled, c0.filled, "RACC filled a window without a VMM's mark");
    assert_eq!(c1.refused, c0.refused, "RACC refused a back-off toward a real peer");
    let ratio = racc_direct.gbps / cubic_direct.gbps;
    assert!(
        (0.6..=1.6).contains(&ratio),
        "RACC toward a real peer ({:.3} Gbit/s) is not CUBIC-like ({:.3} Gbit/s)",
        racc_direct.gbps,
        cubic_direct.gbps
    );

    // 3. `remove` while a socket of this namespace uses RACC: refused.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    set_tcp_congestion(&l, NAME).expect("TCP_CONGESTION on the listener");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    assert_eq!(tcp_congestion(&s).expect("cc"), NAME);
    let (ok, out) = racc(&["remove"]);
    assert!(
        !ok && out.contains("socket(s)") && out.contains("--force"),
        "remove while in use: {out}"
    );
    assert!(available(), "a refused remove unregistered RACC");
    drop((c, s, l));
    if guard.0 {
        std::thread::sleep(Duration::from_millis(200));
        let (ok, out) = racc(&["remove"]);
        assert!(ok && out.contains("removed"), "remove: {out}");
        assert!(!available(), "{NAME} still registered after remove");
        let (ok, out) = racc(&["status"]);
        assert!(ok && out.contains("not installed"), "status after remove: {out}");
        std::mem::forget(guard);
    }
}
