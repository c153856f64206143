//! A real HTTP server (nginx) behind `remora relay`, loaded by a real HTTP
//! load generator (wrk) on the outer side: keep-alive with 64 and 1000
//! concurrent connections and a new connection per request, in every mode
//! (direct, buffered, speculative at 25 ms epochs). Every response is
//! checked (status and exact body) by wrk's Lua script; no socket error
//! is allowed. Speculative must never be much worse than buffered (the
//! engine once stalled all but 16 flows: 0.28x of buffered at 64
//! connections); the benchmark (benches/http.rs) measures the ratio.

mod common;

use std::time::Duration;

use common::relay::Relay;
use remora_netlab::http::{self, Nginx};
use remora_netlab::RelayLan;

const BODY: usize = 4096;

struct Cell {
    conns: usize,
    close: bool,
}

const CELLS: [Cell; 3] = [
    Cell {
        conns: 64,
        close: false,
    },
    Cell {
        conns: 1000,
        close: false,
    },
    Cell { conns: 64, close: true },
];

#[test]
fn nginx_behind_the_relay_serves_every_mode_exactly() {
    assert!(
        http::available(),
        "nginx and wrk are needed (scripts/deps.sh installs them)"
    );
    let lan = RelayLan::new("htp", None).expect("relay lan");
    let nginx = Nginx::start(&lan.server, lan.server_ip, 8080, BODY).expect("nginx");
    let mut rows = Vec::new();
    for mode in ["direct", "buffered", "speculative"] {
        let relay = Relay::start(
            &lan,
            mode,
            &["--epoch-ms", "25", "--commit-delay-ms", "1", "--budget", "16777216"],
        );
        for c in &CELLS {
            let r = http::wrk(&lan.client, &nginx, c.conns, Duration::from_secs(4), c.close).expect("wrk");
            let kind = if c.close { "close" } else { "keep-alive" };
            eprintln!(
                "{mode:<11} {:>4} conns {kind:<10}: {:>8.0} req/s p50 {:>7.1} ms p99 {:>7.1} ms, {} bad, errors {:?}",
                c.conns, r.req_per_s, r.p50_ms, r.p99_ms, r.bad, r.errors
            );
            assert_eq!(
                r.bad, 0,
                "{mode} {} {kind}: responses with a wrong status or body",
                c.conns
            );
            assert_eq!(
                r.errors, [0; 4],
                "{mode} {} {kind}: socket errors (connect, read, write, timeout)",
                c.conns
            );
            assert!(r.requests > 0, "{mode} {} {kind}: no request completed", c.conns);
            rows.push((mode, c.conns, c.close, r));
        }
        let stopped = relay.stop();
        let summary = stopped.summary().to_string();
        eprintln!("{mode}: {summary}");
    }
    let rate = |mode: &str, conns: usize, close: bool| {
        rows.iter()
            .find(|(m, n, c, _)| *m == mode && *n == conns && *c == close)
            .map(|(_, _, _, r)| r.req_per_s)
            .expect("cell measured")
    };
    for c in &CELLS {
        let (b, s) = (
            rate("buffered", c.conns, c.close),
            rate("speculative", c.conns, c.close),
        );
        eprintln!(
            "{} conns {}: speculative/buffered = {:.2}",
            c.conns,
            if c.close { "close" } else { "keep-alive" },
            s / b
        );
        assert!(
            s >= 0.5 * b,
            "{} conns{}: speculative {s:.0} req/s is far below buffered {b:.0} req/s",
            c.conns,
            if c.close { " (connection per request)" } else { "" }
        );
    }
}
