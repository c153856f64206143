//! HTTP benchmark: nginx (4 KiB responses) in the relay's server namespace
//! (the protected "guest"), wrk on the outer side, through `remora relay`
//! in direct, buffered and speculative mode at 25 ms epochs (commit delay
//! 1 ms): keep-alive with 64 and 1000 connections, a new connection per
//! request with 64 and 1000. Each cell is the median (by req/s) of RUNS
//! runs of SECS seconds (REMORA_BENCH_RUNS, REMORA_BENCH_SECS); every
//! response is checked by wrk's Lua script. Prints req/s and latency
//! p50/p99 per cell with speculative/buffered, writes
//! target/bench/http.json and target/bench/http.txt.
//!
//! Targets (issue 13): speculative >= buffered in req/s at every
//! connection count, p99 within 2 epochs (50 ms) of buffered.
//!
//! Run: `scripts/bench.sh http`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::relay::Relay;
use remora_netlab::http::{self, Nginx, WrkResult};
use remora_netlab::RelayLan;

const MODES: [&str; 3] = ["direct", "buffered", "speculative"];
const CELLS: [(usize, bool); 4] = [(64, false), (1000, false), (64, true), (1000, true)];
const EPOCH_MS: &str = "25";

fn main() {
    assert!(
        http::available(),
        "nginx and wrk are needed (scripts/deps.sh installs them)"
    );
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let runs = env("REMORA_BENCH_RUNS", 3).max(1) as usize;
    let secs = env("REMORA_BENCH_SECS", 5).max(1);
    let started = Instant::now();
    let lan = RelayLan::new("bh", None).expect("namespaces (run as root)");
    let nginx = Nginx::start(&lan.server, lan.server_ip, 8080, 4096).expect("nginx");
    let mut cells: Vec<(&str, usize, bool, WrkResult)> = Vec::new();
    for mode in MODES {
        let relay = Relay::start(
            &lan,
            mode,
            &["--epoch-ms", EPOCH_MS, "--commit-delay-ms", "1", "--budget", "16777216"],
        );
        for (conns, close) in CELLS {
            let mut reps: Vec<WrkResult> = (0..runs)
                .map(|_| {
                    let r = http::wrk(&lan.client, &nginx, conns, Duration::from_secs(secs), close).expect("wrk");
                    assert_eq!(r.bad, 0, "{mode} {conns} close={close}: wrong responses");
                    r
                })
                .collect();
            reps.sort_by(|a, b| a.req_per_s.total_cmp(&b.req_per_s));
            let r = reps.swap_remove(reps.len() / 2);
            eprintln!(
                "{:>4.0}s {mode:<11} {conns:>4} {:<10} {:>8.0} req/s p50 {:>7.1} ms p99 {:>7.1} ms errors {:?}",
                started.elapsed().as_secs_f64(),
                if close { "close" } else { "keep-alive" },
                r.req_per_s,
                r.p50_ms,
                r.p99_ms,
                r.errors
            );
            cells.push((mode, conns, close, r));
        }
        relay.stop();
    }
    let get = |m: &str, n: usize, c: bool| {
        cells
            .iter()
            .find(|(mm, nn, cc, _)| *mm == m && *nn == n && *cc == c)
            .map(|x| x.3.clone())
            .unwrap_or_default()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "HTTP through remora relay: nginx 4 KiB responses, wrk (2 threads), {EPOCH_MS} ms epochs, commit delay 1 ms; \
         req/s and latency p50/p99 (ms), median of {runs} runs of {secs} s per cell"
    );
    let _ = writeln!(
        out,
        "{:>5} {:<10} | {:>17} | {:>17} | {:>17} | {:>10} {:>13}",
        "conns", "kind", "direct", "buffered", "speculative", "spec/buf", "p99 spec-buf"
    );
    for (conns, close) in CELLS {
        let d = get("direct", conns, close);
        let b = get("buffered", conns, close);
        let s = get("speculative", conns, close);
        let f = |r: &WrkResult| format!("{:>6.0} {:>4.0}/{:>5.0}", r.req_per_s, r.p50_ms, r.p99_ms);
        let _ = writeln!(
            out,
            "{conns:>5} {:<10} | {} | {} | {} | {:>9.2}x {:>10.0} ms",
            if close { "close" } else { "keep-alive" },
            f(&d),
            f(&b),
            f(&s),
            if b.req_per_s > 0.0 {
                s.req_per_s / b.req_per_s
            } else {
                0.0
            },
            s.p99_ms - b.p99_ms
        );
    }
    let _ = writeln!(out, "total bench time {:.0} s", started.elapsed().as_secs_f64());
    print!("{out}");
    let rows: Vec<String> = cells
        .iter()
        .map(|(m, n, c, r)| {
            format!(
                "{{\"mode\":\"{m}\",\"conns\":{n},\"close\":{c},\"req_per_s\":{:.1},\"p50_ms\":{:.2},\"p90_ms\":{:.2},\"p99_ms\":{:.2},\"errors\":{:?}}}",
                r.req_per_s, r.p50_ms, r.p90_ms, r.p99_ms, r.errors
            )
        })
        .collect();
    let dir = common::target_dir().join("bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(
        dir.join("http.json"),
        format!(
            "{{\"benchmark\":\"http\",\"epoch_ms\":{EPOCH_MS},\"runs_per_cell\":{runs},\"secs\":{secs},\"rows\":[\n{}\n]}}\n",
            rows.join(",\n")
        ),
    )
    .expect("write http.json");
    std::fs::write(dir.join("http.txt"), &out).expect("write http.txt");
    println!("wrote {}", dir.join("http.json").display());
}
