//! Prometheus metrics (`--metrics ADDR`): a registry of remora's figures
//! and a minimal HTTP/1.1 server for `GET /metrics` (text exposition
//! format 0.0.4).
//!
//! Events (a checkpoint's pause and size, a refused checkpoint, a
//! checkpoint applied on the backup) are recorded where they happen, on
//! atomics; figures that already live elsewhere (a protection's state, the
//! output held by the net devices) are read at scrape time through a
//! source function, so the epoch loop takes no extra lock for them.
//!
//! The server needs no HTTP crate: one accept thread, and one short-lived
//! thread per client with read/write timeouts and an overall deadline, at
//! most [`MAX_CLIENTS`] at once (more are answered 503 without waiting),
//! so a slow or silent client cannot hold up a scrape. Nothing a client
//! sends can panic it: anything but `GET /metrics` gets 400, 404 or 405.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Clients served at once; more are answered 503 at once.
pub const MAX_CLIENTS: usize = 16;
/// Longest request head accepted (request line and headers).
const MAX_REQUEST: usize = 8 << 10;
/// Per read or write on a client socket.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A client must have sent its whole request head within this.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Checkpoint pause buckets, seconds (0.5 ms to 100 ms).
const PAUSE_BUCKETS: [f64; 8] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1];
/// The protection states (`remora_protection_state{state=...}`).
const STATES: [&str; 4] = ["no", "syncing", "yes", "fenced"];

/// Which process serves the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `remora run`: the protection figures.
    Primary,
    /// `remora backup`: the standby figures and failovers, and the
    /// protection figures of the guest once it runs here.
    Backup,
}

/// A protection's figures, read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Protection<'a> {
    /// "no", "syncing", "yes" or "fenced".
    pub state: &'a str,
    /// Checkpoints acknowledged (this protection).
    pub epoch: u64,
    /// Checkpoints sent and not yet acknowledged.
    pub lag: u64,
    /// Guest output held until its checkpoint commits, bytes.
    pub held_bytes: u64,
    /// TCP flows the net engines speculate on.
    pub flows: u64,
    pub backup_alive: bool,
    /// The fence generation held, if any.
    pub generation: Option<u64>,
    pub fenced: bool,
}

type StateLabel = [(&'static str, &'static str); 1];
type Source = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The figures and their registry; shared (`Arc`) by the server and the
/// code that records them.
pub struct Metrics {
    registry: Registry,
    source: Mutex<Option<Source>>,
    epoch: Gauge,
    pause: Histogram,
    ckpt_bytes: Histogram,
    last_bytes: Gauge,
    lag: Gauge,
    held: Gauge,
    flows: Gauge,
    protected: Gauge,
    state: Family<StateLabel, Gauge>,
    backup_alive: Gauge,
    nacks: Counter,
    generation: Gauge,
    fenced: Gauge,
    failovers: Counter,
    applied: Counter,
    received: Counter,
    primary_connected: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn gauge_u64(g: &Gauge, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

impl Metrics {
    pub fn new(role: Role) -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("remora"),
            source: Mutex::new(None),
            epoch: Gauge::default(),
            pause: Histogram::new(PAUSE_BUCKETS),
            ckpt_bytes: Histogram::new(exponential_buckets(4096.0, 4.0, 10)),
            last_bytes: Gauge::default(),
            lag: Gauge::default(),
            held: Gauge::default(),
            flows: Gauge::default(),
            protected: Gauge::default(),
            state: Family::default(),
            backup_alive: Gauge::default(),
            nacks: Counter::default(),
            generation: Gauge::default(),
            fenced: Gauge::default(),
            failovers: Counter::default(),
            applied: Counter::default(),
            received: Counter::default(),
            primary_connected: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "epoch",
            "Checkpoints the backup acknowledged in the current protection",
            m.epoch.clone(),
        );
        r.register(
            "checkpoint_pause_seconds",
            "Time the guest was paused for a checkpoint",
            m.pause.clone(),
        );
        r.register(
            "checkpoint_bytes",
            "Size of a checkpoint on the wire (its sum: bytes sent in checkpoints)",
            m.ckpt_bytes.clone(),
        );
        r.register(
            "checkpoint_last_bytes",
            "Size of the last checkpoint on the wire",
            m.last_bytes.clone(),
        );
        r.register(
            "replication_lag_checkpoints",
            "Checkpoints sent and not yet acknowledged",
            m.lag.clone(),
        );
        r.register(
            "output_held_bytes",
            "Guest output held until its checkpoint is acknowledged",
            m.held.clone(),
        );
        r.register(
            "speculated_flows",
            "TCP flows the network engines speculate on",
            m.flows.clone(),
        );
        r.register(
            "protected",
            "1 while a backup holds an acknowledged checkpoint of the guest",
            m.protected.clone(),
        );
        r.register(
            "protection_state",
            "1 for the protection's current state (no, syncing, yes, fenced)",
            m.state.clone(),
        );
        r.register("backup_alive", "1 while the backup answers", m.backup_alive.clone());
        r.register(
            "checkpoint_nacks",
            "Checkpoints the backup refused (sent again)",
            m.nacks.clone(),
        );
        r.register(
            "fence_generation",
            "Fence generation this copy holds (0: none, or no --fence)",
            m.generation.clone(),
        );
        r.register(
            "fenced",
            "1 once this copy lost the fence (its output is off for good)",
            m.fenced.clone(),
        );
        if role == Role::Backup {
            r.register("failovers", "Takeovers by this backup", m.failovers.clone());
            r.register(
                "backup_checkpoints_applied",
                "Checkpoints this backup applied while standing by",
                m.applied.clone(),
            );
            r.register(
                "backup_received_bytes",
                "Bytes received from primaries while standing by",
                m.received.clone(),
            );
            r.register(
                "backup_primary_connected",
                "1 while a primary is connected to this backup",
                m.primary_connected.clone(),
            );
        }
        m.set_protection(&Protection {
            state: "no",
            ..Protection::default()
        });
        m
    }

    /// Installs the function that sets the protection figures at scrape
    /// time (replacing any earlier one).
    pub fn set_source(&self, f: impl Fn(&Metrics) + Send + Sync + 'static) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// A checkpoint was taken: its pause and its size on the wire.
    pub fn checkpoint(&self, pause: Duration, bytes: u64) {
        self.pause.observe(pause.as_secs_f64());
        self.ckpt_bytes.observe(bytes as f64);
        gauge_u64(&self.last_bytes, bytes);
    }

    /// The backup refused a checkpoint.
    pub fn nack(&self) {
        self.nacks.inc();
    }

    /// Sets the figures of a protection.
    pub fn set_protection(&self, p: &Protection) {
        gauge_u64(&self.epoch, p.epoch);
        gauge_u64(&self.lag, p.lag);
        gauge_u64(&self.held, p.held_bytes);
        gauge_u64(&self.flows, p.flows);
        self.protected.set(i64::from(p.state == "yes"));
        for s in STATES {
            self.state.get_or_create(&[("state", s)]).set(i64::from(p.state == s));
        }
        self.backup_alive.set(i64::from(p.backup_alive));
        gauge_u64(&self.generation, p.generation.unwrap_or(0));
        self.fenced.set(i64::from(p.fenced));
    }

    /// The backup took over.
    pub fn failover(&self) {
        self.failovers.inc();
    }

    /// The backup applied a checkpoint.
    pub fn applied(&self) {
        self.applied.inc();
    }

    /// The backup received bytes from its primary.
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }

    /// A primary connected to (true) or left (false) the backup.
    pub fn primary_connected(&self, yes: bool) {
        self.primary_connected.set(i64::from(yes));
    }

    /// The text exposition of every figure (the source runs first).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        if let Some(f) = &*self.source.lock().unwrap_or_else(|p| p.into_inner()) {
            f(self);
        }
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Errors starting the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Thread(std::io::Error),
}

/// Serves `metrics` at `http://ADDR/metrics` from a background thread;
/// returns the address bound (port 0 picks one).
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, metrics))
        .map_err(MetricsError::Thread)?;
    tracing::info!(%local, "serving metrics at /metrics");
    Ok(local)
}

fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                tracing::debug!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::AcqRel);
            busy(stream);
            continue;
        }
        let (m, a) = (metrics.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-client".into())
            .spawn(move || {
                handle(stream, &m);
                a.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("metrics: cannot start a client thread: {e}");
        }
    }
}

/// Too many clients: a 503 written without waiting (best effort: a
/// request not read yet may turn the close into a reset).
fn busy(mut s: TcpStream) {
    if s.set_nonblocking(true).is_ok() {
        let _ = s.write_all(&response(
            503,
            "Service Unavailable",
            "text/plain",
            b"too many clients\n",
            &[],
        ));
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET /metrics` (`head`: HEAD, no body).
    Metrics {
        head: bool,
    },
    NotFound,
    MethodNotAllowed,
    Bad(&'static str),
}

/// Parses a request head (everything before the blank line).
fn parse(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Bad("not text");
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad("malformed request line");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Request::Bad("malformed request line");
    }
    if !target.starts_with('/') {
        return Request::Bad("bad request target");
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ if path == "/metrics" => return Request::MethodNotAllowed,
        _ => return Request::NotFound,
    };
    if path == "/metrics" {
        Request::Metrics { head }
    } else {
        Request::NotFound
    }
}

/// Reads a request head: `Ok(None)` if the client closed or went silent
/// before sending one.
fn read_head(s: &mut TcpStream) -> Result<Option<Vec<u8>>, &'static str> {
    let start = Instant::now();
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST {
            return Err("request too large");
        }
        if start.elapsed() > REQUEST_DEADLINE {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("request too slow")
            };
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return if buf.is_empty() {
                    Ok(None)
                } else {
                    Err("incomplete request")
                }
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if crate::would_block(&e) || e.kind() == std::io::ErrorKind::Interrupted => {
                if buf.is_empty() && start.elapsed() >= IO_TIMEOUT {
                    return Ok(None);
                }
            }
            Err(_) => return Ok(None),
        }
    }
}

/// End of the head: the blank line (CRLF or bare LF).
fn find_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn response(code: u16, reason: &str, content_type: &str, body: &[u8], extra: &[(&str, &str)]) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Serves one client: one request, one response, close.
fn handle(mut s: TcpStream, metrics: &Metrics) {
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let req = match read_head(&mut s) {
        Ok(Some(head)) => parse(&head),
        Ok(None) => return,
        Err(why) => Request::Bad(why),
    };
    let out = match req {
        Request::Metrics { head } => match metrics.render() {
            Ok(text) => {
                let mut r = response(200, "OK", prometheus_text::CONTENT_TYPE, text.as_bytes(), &[]);
                if head {
                    r.truncate(r.len() - text.len());
                }
                r
            }
            Err(e) => {
                tracing::warn!("metrics: encoding: {e}");
                response(500, "Internal Server Error", "text/plain", b"encoding failed\n", &[])
            }
        },
        Request::NotFound => response(404, "Not Found", "text/plain", b"not found: try /metrics\n", &[]),
        Request::MethodNotAllowed => response(
            405,
            "Method Not Allowed",
            "text/plain",
            b"method not allowed\n",
            &[("Allow", "GET, HEAD")],
        ),
        Request::Bad(why) => {
            tracing::debug!(%peer, "metrics: bad request: {why}");
            response(400, "Bad Request", "text/plain", format!("{why}\n").as_bytes(), &[])
        }
    };
    if let Err(e) = s.write_all(&out) {
        tracing::debug!(%peer, "metrics: writing the response: {e}");
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(role: Role) -> (Arc<Metrics>, SocketAddr) {
        let m = Arc::new(Metrics::new(role));
        let addr = serve("127.0.0.1:0".parse().unwrap(), m.clone()).expect("serve");
        (m, addr)
    }

    /// Sends `req` raw and returns the whole response.
    fn exchange(addr: SocketAddr, req: &[u8]) -> String {
        try_exchange(addr, req).unwrap()
    }

    fn try_exchange(addr: SocketAddr, req: &[u8]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(req)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
    }

    /// The value of an unlabelled sample `name`.
    fn sample(body: &str, name: &str) -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn get_metrics_serves_the_registry() {
        let (m, addr) = start(Role::Primary);
        let r = get(addr, "/metrics");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert_eq!(sample(&r, "remora_checkpoint_pause_seconds_count"), Some(0.0), "{r}");
        assert_eq!(sample(&r, "remora_protected"), Some(0.0), "{r}");
        assert!(r.contains("remora_protection_state{state=\"no\"} 1"), "{r}");
        // A primary has no standby figures.
        assert!(!r.contains("remora_failovers"), "{r}");

        m.checkpoint(Duration::from_micros(1500), 123_456);
        m.checkpoint(Duration::from_micros(700), 4000);
        m.nack();
        m.set_source(|m| {
            m.set_protection(&Protection {
                state: "yes",
                epoch: 42,
                lag: 2,
                held_bytes: 777,
                flows: 3,
                backup_alive: true,
                generation: Some(9),
                fenced: false,
            })
        });
        let r = get(addr, "/metrics?x=1");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert_eq!(sample(&r, "remora_checkpoint_pause_seconds_count"), Some(2.0), "{r}");
        assert_eq!(sample(&r, "remora_checkpoint_bytes_sum"), Some(127_456.0), "{r}");
        assert_eq!(sample(&r, "remora_checkpoint_last_bytes"), Some(4000.0), "{r}");
        assert!(
            r.contains("remora_checkpoint_pause_seconds_bucket{le=\"0.001\"} 1"),
            "{r}"
        );
        assert!(
            r.contains("remora_checkpoint_pause_seconds_bucket{le=\"0.0025\"} 2"),
            "{r}"
        );
        assert_eq!(sample(&r, "remora_checkpoint_nacks_total"), Some(1.0), "{r}");
        assert_eq!(sample(&r, "remora_epoch"), Some(42.0), "{r}");
        assert_eq!(sample(&r, "remora_replication_lag_checkpoints"), Some(2.0), "{r}");
        assert_eq!(sample(&r, "remora_output_held_bytes"), Some(777.0), "{r}");
        assert_eq!(sample(&r, "remora_speculated_flows"), Some(3.0), "{r}");
        assert_eq!(sample(&r, "remora_protected"), Some(1.0), "{r}");
        assert_eq!(sample(&r, "remora_backup_alive"), Some(1.0), "{r}");
        assert_eq!(sample(&r, "remora_fence_generation"), Some(9.0), "{r}");
        assert_eq!(sample(&r, "remora_fenced"), Some(0.0), "{r}");
        assert!(r.contains("remora_protection_state{state=\"yes\"} 1"), "{r}");
        assert!(r.contains("remora_protection_state{state=\"no\"} 0"), "{r}");

        // HEAD: the headers only.
        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"), "{r}");
    }

    #[test]
    fn backup_figures() {
        let (m, addr) = start(Role::Backup);
        m.primary_connected(true);
        m.applied();
        m.applied();
        m.received(1000);
        let r = get(addr, "/metrics");
        assert_eq!(sample(&r, "remora_backup_checkpoints_applied_total"), Some(2.0), "{r}");
        assert_eq!(sample(&r, "remora_backup_received_bytes_total"), Some(1000.0), "{r}");
        assert_eq!(sample(&r, "remora_backup_primary_connected"), Some(1.0), "{r}");
        assert_eq!(sample(&r, "remora_failovers_total"), Some(0.0), "{r}");
        m.primary_connected(false);
        m.failover();
        let r = get(addr, "/metrics");
        assert_eq!(sample(&r, "remora_failovers_total"), Some(1.0), "{r}");
        assert_eq!(sample(&r, "remora_backup_primary_connected"), Some(0.0), "{r}");
    }

    #[test]
    fn other_paths_and_methods() {
        let (_m, addr) = start(Role::Primary);
        for p in ["/", "/metricsx", "/metrics/", "/favicon.ico"] {
            let r = get(addr, p);
            assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{p}: {r}");
        }
        let r = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
        assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
        // HTTP/1.0 and bare LF line ends are fine.
        let r = exchange(addr, b"GET /metrics HTTP/1.0\n\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    }

    #[test]
    fn garbage_is_a_bad_request() {
        let (_m, addr) = start(Role::Primary);
        for req in [
            &b"\x00\x01\x02\xff\xfe\r\n\r\n"[..],
            b"hello\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
        ] {
            let r = exchange(addr, req);
            assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{req:?}: {r}");
        }
        // A head that never ends is cut off.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&vec![b'a'; MAX_REQUEST + 2048]);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let r = String::from_utf8_lossy(&out);
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        // A client that closes half-way gets nothing and harms nothing.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /met").unwrap();
        drop(s);
        assert!(get(addr, "/metrics").starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[test]
    fn silent_clients_do_not_block_a_scrape() {
        let (_m, addr) = start(Role::Primary);
        // More silent clients than threads allowed, and one half request.
        let mut idle: Vec<TcpStream> = (0..MAX_CLIENTS + 4)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        idle.push(half);
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let mut ok = false;
        // Past the limit a scrape may be turned away (503, or a reset if
        // its request came before the close) but is never held up; once
        // the silent ones time out it is served.
        while t.elapsed() < Duration::from_secs(15) {
            let asked = Instant::now();
            match try_exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n") {
                Ok(r) if r.starts_with("HTTP/1.1 200 OK\r\n") => {
                    ok = true;
                    break;
                }
                Ok(r) => assert!(r.starts_with("HTTP/1.1 503 "), "{r}"),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            }
            assert!(asked.elapsed() < Duration::from_millis(500), "{:?}", asked.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ok, "never served with silent clients around");
        assert!(t.elapsed() < IO_TIMEOUT + Duration::from_secs(2), "{:?}", t.elapsed());
        drop(idle);

        // Under the limit, a silent client does not delay a scrape at all.
        let _silent = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        assert!(get(addr, "/metrics").starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[test]
    fn bind_error_says_where() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let e = serve(addr, Arc::new(Metrics::new(Role::Primary))).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with(&format!("cannot serve metrics on {addr}: ")), "{s}");
    }

    #[test]
    fn parse_requests() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1"), Request::Metrics { head: false });
        assert_eq!(parse(b"HEAD /metrics?a HTTP/1.1"), Request::Metrics { head: true });
        assert_eq!(parse(b"GET / HTTP/1.1"), Request::NotFound);
        assert_eq!(parse(b"DELETE /metrics HTTP/1.1"), Request::MethodNotAllowed);
        assert_eq!(parse(b"DELETE /x HTTP/1.1"), Request::NotFound);
        assert!(matches!(parse(b""), Request::Bad(_)));
        assert!(matches!(parse(b"GET  /metrics HTTP/1.1"), Request::Bad(_)));
        assert_eq!(find_end(b"a\r\n\r\nb"), Some(1));
        assert_eq!(find_end(b"a\n\nb"), Some(1));
        assert_eq!(find_end(b"a\r\n"), None);
    }
}
