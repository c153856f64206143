//! Relay scale benchmark: 1, 8, 100, 1000 and 5000 concurrent TCP flows
//! server -> client (inner -> outer) through `remora relay --mode
//! speculative` at 25 ms epochs on an unshaped veth. Per row: aggregate
//! goodput at the receivers, the relay's CPU (cores busy) and its memory
//! per flow (RSS growth over the 1-flow row, divided by the flows), and
//! the engine's flow table from the relay's summary; and the same flows
//! through a `direct` relay, what the host and the bench's sender can move. One thread drives all
//! sockets (non-blocking), so thousands of flows cost the bench no threads.
//!
//! Target (issue 13): aggregate at 1000 flows within 20% of 8 flows.
//! REMORA_BENCH_FLOWS=1,8,100 narrows the rows; REMORA_BENCH_SECS (5).
//! Writes target/bench/scale.{txt,json}.
//!
//! Run: `scripts/bench.sh scale`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::relay::{kv, Relay};
use remora_netlab::RelayLan;

const ROWS: [usize; 5] = [1, 8, 100, 1000, 5000];

/// Raises the soft open-files limit to `n` (or the hard limit, if lower).
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that lives on our stack.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit(NOFILE): {}", std::io::Error::last_os_error());
    lim.rlim_cur = n.min(lim.rlim_max);
    // SAFETY: setrlimit reads one rlimit struct that lives on our stack.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(rc, 0, "setrlimit(NOFILE, {n}): {}", std::io::Error::last_os_error());
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

struct Row {
    flows: usize,
    gbps: f64,
    cpu: f64,
    rss_kib: u64,
    summary: String,
}

fn measure(lan: &RelayLan, mode: &str, flows: usize, port: u16, secs: u64) -> Row {
    let relay = Relay::start(
        lan,
        mode,
        &["--epoch-ms", "25", "--commit-delay-ms", "1", "--budget", "16777216"],
    );
    let listener: TcpListener = lan
        .server
        .spawn_thread(move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
            Ok(l)
        })
        .join()
        .expect("listen thread")
        .expect("listen in the server namespace");
    // Accept while connecting (std's listen backlog is 128).
    let acceptor = std::thread::spawn(move || {
        (0..flows)
            .map(|_| listener.accept().map(|(s, _)| s))
            .collect::<std::io::Result<Vec<TcpStream>>>()
    });
    let ip = lan.server_ip;
    let clients: Vec<TcpStream> = lan
        .client
        .spawn_thread(move || {
            // 64 connecting threads (they inherit the namespace): each
            // handshake waits for an epoch to commit.
            let per = flows.div_ceil(64);
            let hs: Vec<_> = (0..flows.div_ceil(per))
                .map(|i| {
                    let n = per.min(flows - i * per);
                    std::thread::spawn(move || {
                        (0..n)
                            .map(|_| TcpStream::connect((ip, port)))
                            .collect::<std::io::Result<Vec<_>>>()
                    })
                })
                .collect();
            let mut v = Vec::with_capacity(flows);
            for h in hs {
                v.extend(
                    h.join()
                        .map_err(|_| std::io::Error::other("connect thread panicked"))??,
                );
            }
            Ok(v)
        })
        .join()
        .expect("connect thread")
        .expect("connect through the relay");
    let mut servers = acceptor.join().expect("accept thread").expect("accept");
    for s in servers.iter().chain(clients.iter()) {
        s.set_nonblocking(true).expect("nonblocking");
    }
    let buf = vec![0x5au8; 64 << 10];
    let mut rbuf = vec![0u8; 256 << 10];
    let (mut got, mut warm) = (0u64, 0u64);
    let (pid, t0) = (relay.pid(), Instant::now());
    let skip = Duration::from_secs(1);
    let run = skip + Duration::from_secs(secs);
    let (mut cpu0, mut tw) = (0.0, t0);
    let mut warmed = false;
    while t0.elapsed() < run {
        if !warmed && t0.elapsed() >= skip {
            warmed = true;
            warm = got;
            cpu0 = cpu_secs(pid);
            tw = Instant::now();
        }
        let mut progress = false;
        for s in servers.iter_mut() {
            match s.write(&buf) {
                Ok(n) if n > 0 => progress = true,
                Err(e) if e.kind() != ErrorKind::WouldBlock => panic!("server write: {e}"),
                _ => {}
            }
        }
        for c in clients.iter() {
            loop {
                match (&*c).read(&mut rbuf) {
                    Ok(0) => panic!("a flow closed early"),
                    Ok(n) => {
                        got += n as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let dt = tw.elapsed().as_secs_f64();
    let cpu = (cpu_secs(pid) - cpu0) / dt;
    let rss_kib = relay.rss_kib();
    drop(servers);
    drop(clients);
    let s = relay.stop();
    Row {
        flows,
        gbps: (got - warm) as f64 * 8.0 / dt / 1e9,
        cpu,
        rss_kib,
        summary: s.summary().to_string(),
    }
}

fn main() {
    raise_nofile(32768);
    let secs = std::env::var("REMORA_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5u64);
    let rows: Vec<usize> = std::env::var("REMORA_BENCH_FLOWS").ok().map_or(ROWS.to_vec(), |v| {
        v.split(',').filter_map(|x| x.trim().parse().ok()).collect()
    });
    let started = Instant::now();
    let lan = RelayLan::new("bs", None).expect("namespaces (run as root)");
    lan.server
        .sysctl("net/core/somaxconn", "8192")
        .and_then(|_| lan.server.sysctl("net/ipv4/tcp_max_syn_backlog", "8192"))
        .expect("sysctl");
    let mut out_rows = Vec::new();
    let mut direct = Vec::new();
    let mut port = 9000;
    for &n in &rows {
        // The same flows through a `direct` relay: what this host and the
        // bench's one sender thread can move at all.
        port += 1;
        let d = measure(&lan, "direct", n, port, secs);
        eprintln!(
            "{:>4.0}s {n:>5} flows direct: {:.3} Gbit/s",
            started.elapsed().as_secs_f64(),
            d.gbps
        );
        direct.push((n, d.gbps));
        port += 1;
        let r = measure(&lan, "speculative", n, port, secs);
        eprintln!(
            "{:>4.0}s {:>5} flows: {:.3} Gbit/s, relay {:.2} cores, RSS {} KiB; {}",
            started.elapsed().as_secs_f64(),
            n,
            r.gbps,
            r.cpu,
            r.rss_kib,
            r.summary
        );
        out_rows.push(r);
    }
    let base_rss = out_rows.iter().find(|r| r.flows == 1).map_or(0, |r| r.rss_kib);
    let g8 = out_rows.iter().find(|r| r.flows == 8).map(|r| r.gbps);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "relay scale: speculative, 25 ms epochs, unshaped veth, {secs} s per row after 1 s warm-up; one sender thread for all flows"
    );
    let _ = writeln!(
        out,
        "{:>6} {:>9} {:>8} {:>11} {:>12} {:>9} {:>8} {:>13} {:>11}",
        "flows", "Gbit/s", "vs 8", "relay cores", "KiB/flow", "max_held", "retx", "direct Gbit/s", "spec/direct"
    );
    for r in &out_rows {
        let per_flow = if r.flows > 1 && r.rss_kib > base_rss {
            format!("{:.1}", (r.rss_kib - base_rss) as f64 / r.flows as f64)
        } else {
            "-".into()
        };
        let d = direct.iter().find(|(n, _)| *n == r.flows).map_or(0.0, |x| x.1);
        let _ = writeln!(
            out,
            "{:>6} {:>9.3} {:>8} {:>11.2} {:>12} {:>9} {:>8} {:>13.3} {:>11}",
            r.flows,
            r.gbps,
            g8.map_or("-".into(), |g| format!("{:.2}x", r.gbps / g)),
            r.cpu,
            per_flow,
            kv(&r.summary, "max_held").unwrap_or(0),
            kv(&r.summary, "retx").unwrap_or(0),
            d,
            if d > 0.0 {
                format!("{:.2}x", r.gbps / d)
            } else {
                "-".into()
            }
        );
    }
    let _ = writeln!(out, "total bench time {:.0} s", started.elapsed().as_secs_f64());
    print!("{out}");
    let json: Vec<String> = out_rows
        .iter()
        .map(|r| {
            format!(
                "{{\"flows\":{},\"gbps\":{:.4},\"relay_cores\":{:.3},\"rss_kib\":{},\"direct_gbps\":{:.4}}}",
                r.flows,
                r.gbps,
                r.cpu,
                r.rss_kib,
                direct.iter().find(|(n, _)| *n == r.flows).map_or(0.0, |x| x.1)
            )
        })
        .collect();
    let dir = common::target_dir().join("bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(
        dir.join("scale.json"),
        format!(
            "{{\"benchmark\":\"relay-scale\",\"secs\":{secs},\"rows\":[\n{}\n]}}\n",
            json.join(",\n")
        ),
    )
    .expect("write scale.json");
    std::fs::write(dir.join("scale.txt"), &out).expect("write scale.txt");
}
