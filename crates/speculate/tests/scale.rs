//! Many flows through one engine: every flow progresses when the global cap
//! is smaller than flows x budget, and connection churn costs no more than
//! output commit (issue 13: "never worse than buffering").

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use remora_speculate::wire::{self, Parsed};
use remora_speculate::{Config, Engine, Mode, Side};

const SERVER_PORT: u16 = 80;
const EPOCH_MS: u64 = 25;

/// One client (peer) / server (guest) connection doing request/response.
struct Conn {
    guest: Tcp,
    peer: Tcp,
    /// Requests sent by the client / responses queued by the server.
    reqs: usize,
    resps: usize,
    /// When the outstanding request was sent.
    req_at: u64,
    /// Request -> full response times.
    latencies: Vec<u64>,
    started: u64,
    /// Close after the first response (connection per request).
    close: bool,
    finished: Option<u64>,
}

struct World {
    now: u64,
    engine: Engine,
    conns: Vec<Conn>,
    by_port: HashMap<u16, usize>,
    to_peer: Link,
    to_engine: Link,
    rng: Rng,
    req_len: usize,
    resp_len: usize,
    next_seal: u64,
    pending: Vec<(u64, remora_speculate::EpochId)>,
    next_port: u16,
    max_flows: usize,
    max_reserved: u64,
}

impl World {
    fn new(mode: Mode, cfg: Config, req_len: usize, resp_len: usize) -> World {
        World {
            now: 0,
            engine: Engine::new(Config { mode, ..cfg }).expect("valid config"),
            conns: Vec::new(),
            by_port: HashMap::new(),
            to_peer: Link::new(0, 0, 1, 0),
            to_engine: Link::new(0, 0, 1, 0),
            rng: Rng::new(1),
            req_len,
            resp_len,
            next_seal: EPOCH_MS,
            pending: Vec::new(),
            next_port: 1024,
            max_flows: 0,
            max_reserved: 0,
        }
    }

    /// A new client connection in slot `slot` (or a new slot).
    fn connect(&mut self, slot: Option<usize>, close: bool) {
        let port = self.next_port;
        self.next_port = if self.next_port == u16::MAX {
            1024
        } else {
            self.next_port + 1
        };
        let gnet = v4([10, 0, 0, 1], [10, 0, 0, 2]);
        let pnet = gnet.reversed();
        let o = opts(Some(7), true, true);
        let mut guest = Tcp::new(
            "guest",
            GUEST_MAC,
            PEER_MAC,
            gnet,
            SERVER_PORT,
            port,
            o.clone(),
            self.rng.next() as u32,
        );
        let mut peer = Tcp::new(
            "peer",
            PEER_MAC,
            GUEST_MAC,
            pnet,
            port,
            SERVER_PORT,
            o,
            self.rng.next() as u32,
        );
        guest.check_ack_monotone = true;
        peer.check_window = true;
        guest.rto_ms = Some(300);
        peer.rto_ms = Some(300);
        guest.listen();
        peer.connect(self.now);
        if close {
            guest.reply_fin_on_fin = true;
        }
        let c = Conn {
            guest,
            peer,
            reqs: 0,
            resps: 0,
            req_at: self.now,
            latencies: Vec::new(),
            started: self.now,
            close,
            finished: None,
        };
        let i = match slot {
            Some(i) => {
                self.by_port.remove(&self.conns[i].peer.port);
                self.conns[i] = c;
                i
            }
            None => {
                self.conns.push(c);
                self.conns.len() - 1
            }
        };
        self.by_port.insert(port, i);
    }

    fn t(&self) -> Duration {
        Duration::from_millis(self.now)
    }

    fn peer_port(f: &[u8]) -> Option<u16> {
        match wire::parse(f) {
            Parsed::Tcp(s) => Some(if s.src_port == SERVER_PORT {
                s.dst_port
            } else {
                s.src_port
            }),
            Parsed::Other => None,
        }
    }

    fn drain(&mut self) {
        while let Some(tx) = self.engine.poll_transmit() {
            match tx.to {
                Side::Inner => {
                    if let Some(&i) = Self::peer_port(&tx.frame).and_then(|p| self.by_port.get(&p)) {
                        let now = self.now;
                        self.conns[i].guest.input(now, &tx.frame);
                    }
                }
                Side::Outer => self.to_peer.send(&mut self.rng, self.now, tx.frame),
            }
        }
    }

    fn app(&mut self) {
        let now = self.now;
        let (req_len, resp_len) = (self.req_len, self.resp_len);
        for c in &mut self.conns {
            if c.finished.is_some() {
                continue;
            }
            // Client: next request once the previous response is complete.
            if c.peer.st == St::Established && c.peer.received.len() >= c.reqs.saturating_mul(resp_len) {
                if c.reqs > 0 && c.latencies.len() < c.reqs {
                    c.latencies.push(now - c.req_at);
                }
                if c.close && c.reqs == 1 {
                    if c.peer.fin_rcvd && c.guest.fin_rcvd && c.peer.all_acked() && c.guest.all_acked() {
                        c.finished = Some(now);
                    }
                } else if c.peer.data.len() == c.reqs * req_len {
                    c.peer.data.extend(std::iter::repeat_n(c.reqs as u8, req_len));
                    c.reqs += 1;
                    c.req_at = now;
                    if c.close {
                        c.peer.fin_wanted = true;
                    }
                }
            }
            // Server: a response per complete request.
            if c.guest.received.len() >= (c.resps + 1) * req_len {
                c.guest.data.extend(std::iter::repeat_n(c.resps as u8 ^ 0x5a, resp_len));
                c.resps += 1;
            }
        }
    }

    fn step(&mut self) {
        let now = self.now;
        let t = self.t();
        self.app();
        for i in 0..self.conns.len() {
            self.conns[i].guest.tick(now);
            while let Some(f) = self.conns[i].guest.out.pop_front() {
                self.engine.handle_inner(t, &f);
                self.drain();
                if self.conns[i].guest.out.is_empty() {
                    self.conns[i].guest.tick(now);
                }
            }
            self.conns[i].peer.tick(now);
        }
        for f in self.to_peer.due(now) {
            if let Some(&i) = Self::peer_port(&f).and_then(|p| self.by_port.get(&p)) {
                self.conns[i].peer.input(now, &f);
            }
        }
        for c in &mut self.conns {
            while let Some(f) = c.peer.out.pop_front() {
                self.to_engine.send(&mut self.rng, now, f);
            }
        }
        for f in self.to_engine.due(now) {
            self.engine.handle_outer(t, &f);
            self.drain();
        }
        if now >= self.next_seal {
            let id = self.engine.seal_epoch(t);
            self.pending.push((now + 2, id));
            self.next_seal = now + EPOCH_MS;
        }
        while self.pending.first().is_some_and(|p| p.0 <= now) {
            let (_, id) = self.pending.remove(0);
            self.engine.commit_epoch(t, id);
            self.drain();
        }
        if self.engine.poll_timeout().is_some_and(|d| d <= t) {
            self.engine.handle_timeout(t);
            self.drain();
        }
        let st = self.engine.stats();
        self.max_flows = self.max_flows.max(st.flows);
        self.max_reserved = self.max_reserved.max(st.bytes_reserved);
        self.now += 1;
    }

    fn violations(&self) -> Vec<String> {
        self.conns
            .iter()
            .flat_map(|c| c.guest.violations.iter().chain(c.peer.violations.iter()))
            .cloned()
            .collect()
    }
}

fn cfg(budget: usize, cap: usize) -> Config {
    Config {
        per_flow_budget: budget,
        global_cap: cap,
        ..Config::default()
    }
}

/// Keep-alive request/response on `n` connections for `ms` milliseconds.
/// Returns (completed responses per connection, worst latency).
fn keepalive(mode: Mode, cfg: Config, n: usize, resp_len: usize, ms: u64) -> (Vec<usize>, u64, World) {
    let mut w = World::new(mode, cfg, 100, resp_len);
    for _ in 0..n {
        w.connect(None, false);
    }
    while w.now < ms {
        w.step();
    }
    let done: Vec<usize> = w.conns.iter().map(|c| c.latencies.len()).collect();
    let worst = w
        .conns
        .iter()
        .flat_map(|c| c.latencies.iter().copied().chain(std::iter::once(w.now - c.req_at)))
        .max()
        .unwrap_or(0);
    (done, worst, w)
}

/// The VMM's sizes (16 MiB per flow, 256 MiB global: 16 full budgets) and
/// 64 keep-alive connections: every connection progresses, about as fast
/// as with output commit.
#[test]
fn many_keepalive_flows_all_progress() {
    let c = cfg(16 << 20, 256 << 20);
    let (buf_done, buf_worst, _) = keepalive(Mode::Buffered, c.clone(), 64, 20_000, 3000);
    let (spec_done, spec_worst, w) = keepalive(Mode::Speculative, c, 64, 20_000, 3000);
    let v = w.violations();
    assert!(v.is_empty(), "{v:?}");
    let min_buf = *buf_done.iter().min().unwrap();
    let min_spec = *spec_done.iter().min().unwrap();
    eprintln!(
        "keep-alive x64: buffered {} responses (min/flow {min_buf}, worst {buf_worst} ms), speculative {} (min/flow {min_spec}, worst {spec_worst} ms), stats {:?}",
        buf_done.iter().sum::<usize>(),
        spec_done.iter().sum::<usize>(),
        w.engine.stats()
    );
    assert!(min_buf > 10, "buffered baseline: {buf_done:?}");
    assert!(
        min_spec >= min_buf,
        "every flow progresses: spec {spec_done:?} buffered {buf_done:?}"
    );
    assert!(
        spec_worst <= buf_worst + 2 * EPOCH_MS,
        "worst latency {spec_worst} ms vs buffered {buf_worst} ms"
    );
    assert!(w.max_reserved <= 256 << 20);
}

/// A tight pool: cap = 4 budgets, 32 flows with responses bigger than a
/// fair share of it. Every flow still completes requests every few epochs.
#[test]
fn tight_pool_every_flow_progresses() {
    let c = cfg(1 << 20, 4 << 20);
    let (buf_done, buf_worst, _) = keepalive(Mode::Buffered, c.clone(), 32, 300_000, 4000);
    let (spec_done, spec_worst, w) = keepalive(Mode::Speculative, c, 32, 300_000, 4000);
    let v = w.violations();
    assert!(v.is_empty(), "{v:?}");
    eprintln!(
        "tight pool x32: buffered {buf_done:?} worst {buf_worst} ms; speculative {spec_done:?} worst {spec_worst} ms; max reserved {}",
        w.max_reserved
    );
    assert!(
        *spec_done.iter().min().unwrap() >= 5,
        "every flow progresses: {spec_done:?}"
    );
    assert!(
        spec_worst <= buf_worst + 2 * EPOCH_MS,
        "worst latency {spec_worst} ms vs buffered {buf_worst} ms"
    );
    assert!(w.max_reserved <= 4 << 20, "cap respected: {}", w.max_reserved);
}

/// Connection per request: 5000 connections, 32 at a time. The flow table
/// stays bounded and no connection takes more than two epochs longer than
/// the worst one with output commit.
#[test]
fn connection_churn_costs_no_more_than_buffering() {
    let run = |mode: Mode| {
        let mut w = World::new(mode, cfg(16 << 20, 256 << 20), 100, 2000);
        for _ in 0..32 {
            w.connect(None, true);
        }
        let mut started = 32;
        let mut durations = Vec::new();
        while durations.len() < 5000 && w.now < 600_000 {
            w.step();
            for i in 0..w.conns.len() {
                if let Some(end) = w.conns[i].finished {
                    durations.push(end - w.conns[i].started);
                    if started < 5000 {
                        started += 1;
                        w.connect(Some(i), true);
                    } else {
                        w.conns[i].finished = None;
                        w.conns[i].reqs = usize::MAX / 2;
                    }
                }
            }
        }
        (durations, w)
    };
    let (buf, wb) = run(Mode::Buffered);
    let (spec, ws) = run(Mode::Speculative);
    let v = ws.violations();
    assert!(v.is_empty(), "{:?}", &v[..v.len().min(5)]);
    assert_eq!(buf.len(), 5000);
    assert_eq!(spec.len(), 5000, "all connections complete");
    let bw = *buf.iter().max().unwrap();
    let sw = *spec.iter().max().unwrap();
    eprintln!(
        "churn: buffered {} ms total (worst {bw} ms), speculative {} ms total (worst {sw} ms), max flows {}, stats {:?}",
        wb.now,
        ws.now,
        ws.max_flows,
        ws.engine.stats()
    );
    assert!(sw <= bw + 2 * EPOCH_MS, "worst connection {sw} ms vs buffered {bw} ms");
    assert!(
        ws.now <= wb.now + wb.now / 10,
        "total {} ms vs buffered {} ms",
        ws.now,
        wb.now
    );
    assert!(ws.max_flows <= 1000, "flow table grew to {}", ws.max_flows);
}
