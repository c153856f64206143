//! Relay benchmark: TCP goodput server -> client (inner -> outer, the
//! direction the relay holds back) through `remora relay` in direct,
//! buffered (Remus output commit) and speculative mode, for epochs of 10,
//! 25 and 50 ms (commit delay 1 ms), 1 and 8 flows, on five links between
//! the relay and the client:
//!
//! * `veth`: unshaped veth;
//! * `1g-deep`: 1 Gbit/s, 1 ms RTT (0.5 ms each way in the link emulator),
//!   a deep bottleneck queue (tbf limit 12.5 MB, 100 ms at line rate);
//! * `1g-shallow`: the same with a shallow queue (375 KB, 3 ms);
//! * `1g-jitter`: 1 Gbit/s, 5 ms +- 0.5 ms per frame each way (4.5 ms plus
//!   uniform 0..1 ms: frames overtake each other), deep queue;
//! * `1g-shallow-loss`: `1g-shallow` plus 0.5% random loss toward the client.
//!
//! Direct mode does not depend on the epoch: it is measured once per link
//! and flow count. Every run starts a fresh relay on the link's
//! namespaces, runs RUN seconds, and reports the goodput at the receiver
//! after the first SKIP (handshake, slow start). The servers' congestion
//! control (cubic, bbr and remora_racc by default;
//! REMORA_BENCH_CC=cubic,bbr,remora_racc) is set per socket; RACC is
//! installed first (`remora racc install`) when listed;
//! REMORA_BENCH_RUNS=3 measures each cell 3 times and keeps the median; REMORA_BENCH_LINKS=veth,... runs a subset of the links; REMORA_BENCH_VERBOSE=1 prints each relay summary;
//! REMORA_BENCH_EPOCHS=25 and REMORA_BENCH_FLOWS=1 narrow the grid. Prints a table of Gbit/s with speculative/direct and
//! speculative/buffered ratios, writes target/bench/relay.json, and
//! scripts/bench.sh draws target/bench/relay.png from it.
//!
//! Run: `scripts/bench.sh relay`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_netlab::{set_tcp_congestion, RelayLan, Shaping};

const RUN: Duration = Duration::from_millis(4500);
const SKIP: Duration = Duration::from_millis(500);
const EPOCHS_MS: [u64; 3] = [10, 25, 50];
const COMMIT_DELAY_MS: u64 = 1;
const FLOWS: [usize; 2] = [1, 8];
/// The per-flow budget: large enough not to bind a flow at 25 ms epochs on
/// unshaped veth (64 MiB / 26 ms is ~20 Gbit/s; the relay's default, 16 MiB,
/// allows ~5), as the engine's targets are stated for.
const BUDGET: &str = "67108864";
/// All flows together: 8 flows x 64 MiB, twice over.
const GLOBAL_CAP: &str = "1073741824";

struct Link {
    name: &'static str,
    desc: &'static str,
    shaping: Option<Shaping>,
}

fn links() -> Vec<Link> {
    let half_ms = Duration::from_micros(500);
    let deep = Shaping::rate("1gbit", 12_500_000).delay(half_ms);
    let shallow = Shaping::rate("1gbit", 375_000).delay(half_ms);
    let mut jitter = Shaping::rate("1gbit", 12_500_000).delay(Duration::from_micros(4500));
    jitter.to_client.jitter = Duration::from_millis(1);
    jitter.to_relay.jitter = Duration::from_millis(1);
    vec![
        Link {
            name: "veth",
            desc: "unshaped veth",
            shaping: None,
        },
        Link {
            name: "1g-deep",
            desc: "1 Gbit/s, 1 ms RTT, 100 ms queue",
            shaping: Some(deep),
        },
        Link {
            name: "1g-shallow",
            desc: "1 Gbit/s, 1 ms RTT, 3 ms queue",
            shaping: Some(shallow.clone()),
        },
        Link {
            name: "1g-jitter",
            desc: "1 Gbit/s, 5 ms +- 0.5 ms per frame each way (reordering), 100 ms queue",
            shaping: Some(jitter),
        },
        Link {
            name: "1g-shallow-loss",
            desc: "1 Gbit/s, 1 ms RTT, 3 ms queue, 0.5% loss toward the client",
            shaping: Some(shallow.loss_to_client(0.5)),
        },
    ]
}

/// One measurement.
struct Cell {
    cc: String,
    link: &'static str,
    flows: usize,
    mode: &'static str,
    /// None for direct (no epochs).
    epoch_ms: Option<u64>,
    gbps: f64,
    /// From the relay's summary.
    retx: u64,
    max_held: u64,
}

fn kv(line: &str, key: &str) -> u64 {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(|v| v.chars().take_while(char::is_ascii_digit).collect::<String>())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `flows` streams server -> client through a fresh relay; returns
/// (Gbit/s after SKIP, relay summary line).
fn measure(lan: &RelayLan, cc: &str, mode: &str, epoch_ms: u64, flows: usize, port: u16) -> (f64, String) {
    let (e, d) = (epoch_ms.to_string(), COMMIT_DELAY_MS.to_string());
    let mut cmd = lan.relay_command(&common::remora_bin());
    cmd.args([
        "--mode",
        mode,
        "--epoch-ms",
        &e,
        "--commit-delay-ms",
        &d,
        "--budget",
        BUDGET,
        "--global-cap",
        GLOBAL_CAP,
    ]);
    let mut relay = common::spawn(&mut cmd);
    if relay
        .wait_line("remora relay: ready", Duration::from_secs(15))
        .is_none()
    {
        let run = relay.finish(Duration::from_secs(1));
        panic!("relay did not start\n{}\n{}", run.stdout(), run.stderr);
    }

    let cc2 = cc.to_string();
    let listener = lan
        .server
        .spawn_thread(move || {
            let l = TcpListener::bind(("0.0.0.0", port))?;
            set_tcp_congestion(&l, &cc2)?;
            Ok(l)
        })
        .join()
        .unwrap()
        .expect("listen in the server namespace");
    let server = std::thread::spawn(move || {
        let mut writers = Vec::new();
        for _ in 0..flows {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            writers.push(std::thread::spawn(move || {
                let buf = vec![0x5au8; 1 << 20];
                // Until the client goes away.
                while s.write_all(&buf).is_ok() {}
            }));
        }
        for w in writers {
            let _ = w.join();
        }
    });

    let ip = lan.server_ip;
    let conns: Vec<TcpStream> = (0..flows)
        .map(|_| {
            lan.client
                .spawn_thread(move || TcpStream::connect((ip, port)))
                .join()
                .unwrap()
                .expect("connect through the relay")
        })
        .collect();
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let (got, stop) = (got.clone(), stop.clone());
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                while !stop.load(Ordering::Relaxed) {
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => {
                            got.fetch_add(k as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(SKIP);
    let (b0, t1) = (got.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(RUN.saturating_sub(t0.elapsed()));
    let (b1, t2) = (got.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    let _ = server.join();
    relay.signal(libc::SIGTERM);
    let run = relay.finish(Duration::from_secs(10));
    let summary = run.line("remora relay: summary").map(|(_, l)| l.to_string());
    let summary = summary.unwrap_or_else(|| panic!("no relay summary\n{}\n{}", run.stdout(), run.stderr));
    let gbps = (b1 - b0) as f64 * 8.0 / (t2 - t1).as_secs_f64() / 1e9;
    (gbps, summary)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn main() {
    let ccs: Vec<String> = std::env::var("REMORA_BENCH_CC")
        .unwrap_or_else(|_| "cubic,bbr,remora_racc".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    // REMORA_BENCH_LINKS=veth,1g-deep runs a subset (for quick looks).
    let only = std::env::var("REMORA_BENCH_LINKS").ok();
    let links: Vec<Link> = links()
        .into_iter()
        .filter(|l| only.as_deref().is_none_or(|o| o.split(',').any(|n| n.trim() == l.name)))
        .collect();
    // REMORA_BENCH_EPOCHS=25 and REMORA_BENCH_FLOWS=1 narrow the grid too.
    let list = |var: &str, all: &[u64]| -> Vec<u64> {
        std::env::var(var).ok().map_or_else(
            || all.to_vec(),
            |v| {
                v.split(',')
                    .filter_map(|x| x.trim().parse().ok())
                    .filter(|x| all.contains(x))
                    .collect()
            },
        )
    };
    let epochs_ms = list("REMORA_BENCH_EPOCHS", &EPOCHS_MS);
    let flows_list: Vec<usize> = list("REMORA_BENCH_FLOWS", &FLOWS.map(|f| f as u64))
        .into_iter()
        .map(|f| f as usize)
        .collect();
    let repeat: usize = std::env::var("REMORA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    if ccs.iter().any(|c| c == "remora_racc") {
        let out = std::process::Command::new(common::remora_bin())
            .args(["racc", "install"])
            .output()
            .expect("run remora racc install");
        assert!(
            out.status.success(),
            "remora racc install failed (RACC is in REMORA_BENCH_CC): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let started = Instant::now();
    let mut cells: Vec<Cell> = Vec::new();
    let mut port = 7000u16;
    for link in &links {
        let lan = RelayLan::new("bl", link.shaping.clone()).expect("namespaces (run as root)");
        for cc in &ccs {
            for &flows in &flows_list {
                let mut runs: Vec<(&'static str, Option<u64>)> = vec![("direct", None)];
                for &e in &epochs_ms {
                    runs.push(("buffered", Some(e)));
                    runs.push(("speculative", Some(e)));
                }
                for (mode, epoch) in runs {
                    // The median run (by goodput) of `repeat`.
                    let mut reps: Vec<(f64, String)> = (0..repeat)
                        .map(|_| {
                            port += 1;
                            measure(&lan, cc, mode, epoch.unwrap_or(25), flows, port)
                        })
                        .collect();
                    reps.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let (gbps, summary) = reps.swap_remove(reps.len() / 2);
                    let (retx, max_held) = (kv(&summary, "retx"), kv(&summary, "max_held"));
                    eprintln!(
                        "{:>4.0}s {} {cc} {flows} flow(s) {mode} epoch {}: {gbps:.3} Gbit/s (retx {retx}, max_held {max_held})",
                        started.elapsed().as_secs_f64(),
                        link.name,
                        epoch.map_or("-".into(), |e| format!("{e} ms")),
                    );
                    if std::env::var_os("REMORA_BENCH_VERBOSE").is_some() {
                        eprintln!("      {summary}");
                    }
                    cells.push(Cell {
                        cc: cc.clone(),
                        link: link.name,
                        flows,
                        mode,
                        epoch_ms: epoch,
                        gbps,
                        retx,
                        max_held,
                    });
                }
            }
        }
    }

    let get = |cc: &str, link: &str, flows: usize, mode: &str, e: Option<u64>| {
        cells
            .iter()
            .find(|c| c.cc == cc && c.link == link && c.flows == flows && c.mode == mode && c.epoch_ms == e)
            .map_or(0.0, |c| c.gbps)
    };
    println!(
        "TCP goodput server -> client (inner -> outer) through remora relay, Gbit/s at the receiver \
         after the first {:.1} s of {:.1} s runs (median of {repeat}); commit delay {COMMIT_DELAY_MS} ms, budget {BUDGET} B/flow",
        SKIP.as_secs_f64(),
        RUN.as_secs_f64()
    );
    for l in &links {
        println!("  {:<16} {}", l.name, l.desc);
    }
    println!(
        "{:<11} {:<16} {:>5} {:>6} {:>8} {:>9} {:>12} {:>11} {:>11}",
        "cc", "link", "flows", "epoch", "direct", "buffered", "speculative", "spec/direct", "spec/buffer"
    );
    for cc in &ccs {
        for l in &links {
            for &flows in &flows_list {
                let d = get(cc, l.name, flows, "direct", None);
                for &e in &epochs_ms {
                    let b = get(cc, l.name, flows, "buffered", Some(e));
                    let s = get(cc, l.name, flows, "speculative", Some(e));
                    println!(
                        "{cc:<11} {:<16} {flows:>5} {:>4}ms {d:>8.3} {b:>9.3} {s:>12.3} {:>11} {:>11}",
                        l.name,
                        e,
                        ratio(s, d),
                        ratio(s, b)
                    );
                }
            }
        }
    }
    // RACC against CUBIC, per speculative cell: the gain RACC brings.
    if ccs.iter().any(|c| c == "remora_racc") && ccs.iter().any(|c| c == "cubic") {
        println!("speculative: remora_racc / cubic");
        for l in &links {
            for &flows in &flows_list {
                for &e in &epochs_ms {
                    let r = get("remora_racc", l.name, flows, "speculative", Some(e));
                    let c = get("cubic", l.name, flows, "speculative", Some(e));
                    let d = get("cubic", l.name, flows, "direct", None);
                    println!(
                        "  {:<16} {flows:>5} {:>4}ms racc {r:>7.3} cubic {c:>7.3} gain {:>6}  racc/direct(cubic) {:>6}",
                        l.name,
                        e,
                        ratio(r, c),
                        ratio(r, d)
                    );
                }
            }
        }
    }
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());

    let links_json: Vec<String> = links
        .iter()
        .map(|l| format!("{{\"name\":\"{}\",\"desc\":\"{}\"}}", l.name, l.desc))
        .collect();
    let rows: Vec<String> = cells
        .iter()
        .map(|c| {
            format!(
                "{{\"cc\":\"{}\",\"link\":\"{}\",\"flows\":{},\"mode\":\"{}\",\"epoch_ms\":{},\"gbps\":{:.4},\"retx\":{},\"max_held\":{}}}",
                c.cc,
                c.link,
                c.flows,
                c.mode,
                c.epoch_ms.map_or("null".into(), |e| e.to_string()),
                c.gbps,
                c.retx,
                c.max_held
            )
        })
        .collect();
    let ccs_json: Vec<String> = ccs.iter().map(|c| format!("\"{c}\"")).collect();
    let dir = common::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("relay.json"),
        format!(
            "{{\"benchmark\":\"relay\",\"direction\":\"server->client (inner->outer)\",\"run_s\":{},\"skip_s\":{},\
             \"runs_per_cell\":{repeat},\"commit_delay_ms\":{COMMIT_DELAY_MS},\"budget\":{BUDGET},\"epochs_ms\":{:?},\"flows\":{:?},\"cc\":[{}],\
             \"links\":[{}],\"rows\":[\n{}\n]}}\n",
            RUN.as_secs_f64(),
            SKIP.as_secs_f64(),
            epochs_ms,
            flows_list,
            ccs_json.join(","),
            links_json.join(","),
            rows.join(",\n")
        ),
    )
    .unwrap();
    println!("wrote {}", dir.join("relay.json").display());
}
