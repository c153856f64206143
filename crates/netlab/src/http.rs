//! A real HTTP server (Debian's nginx) and load generator (Debian's wrk)
//! in network namespaces, for request/response tests and benchmarks.
//!
//! [`Nginx::start`] serves one static file of a chosen size from a private
//! directory (no logs, up to 4096 connections, keep-alive without limit);
//! [`wrk`] loads it from another namespace with a Lua script that checks
//! every response (status 200 and the exact body) and reports requests,
//! bad responses, socket errors and latency percentiles.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{NetlabError, Netns, Result};

/// Whether nginx and wrk are installed.
pub fn available() -> bool {
    let ok = |p: &str, a: &str| {
        Command::new(p)
            .arg(a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    ok("nginx", "-v") && ok("wrk", "--version")
}

/// The body served: `len` bytes of a printable pattern that differs per
/// position (a truncated or shifted body cannot match).
pub fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + ((i * 7 + i / 26) % 26) as u8).collect()
}

/// A running nginx, stopped (SIGKILL of its master and workers by PID) and
/// its directory removed on drop.
pub struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
    /// `http://IP:PORT/body` of the served file.
    pub url: String,
    /// The body every response must carry.
    pub body: Vec<u8>,
}

impl Nginx {
    /// Starts nginx in `ns` listening on `ip:port`, serving `/body` of
    /// `len` bytes; returns once it accepts connections.
    pub fn start(ns: &Netns, ip: &str, port: u16, len: usize) -> Result<Nginx> {
        let dir = std::env::temp_dir().join(crate::unique_name("ngx"));
        let io = |what: String| move |source| NetlabError::Spawn { cmd: what, source };
        std::fs::create_dir_all(dir.join("www")).map_err(io(format!("mkdir {}", dir.display())))?;
        let body = body(len);
        std::fs::write(dir.join("www/body"), &body).map_err(io("write body".into()))?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile 16384;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; multi_accept on; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nodelay on;\n  keepalive_timeout 300s;\n\
               keepalive_requests 1000000;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
               fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
               server {{\n    listen {ip}:{port} backlog=4096;\n    root {d}/www;\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).map_err(io("write nginx.conf".into()))?;
        let conf_path = dir.join("nginx.conf");
        let mut cmd = ns.command("nginx");
        cmd.args(["-p", &dir.to_string_lossy(), "-c", &conf_path.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let desc = format!("{cmd:?}");
        let child = cmd.spawn().map_err(|source| NetlabError::Spawn { cmd: desc, source })?;
        let n = Nginx {
            child: Some(child),
            dir,
            url: format!("http://{ip}:{port}/body"),
            body,
        };
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().map_err(|_| NetlabError::Command {
            cmd: "nginx".into(),
            stderr: format!("bad address {ip}:{port}"),
        })?;
        let t0 = Instant::now();
        loop {
            let up = ns
                .spawn_thread(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
                .join()
                .is_ok_and(|r| r.is_ok());
            if up {
                return Ok(n);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let log = std::fs::read_to_string(n.dir.join("error.log")).unwrap_or_default();
                return Err(NetlabError::Command {
                    cmd: "nginx".into(),
                    stderr: format!("not accepting on {ip}:{port} after 10 s; error.log:\n{log}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The workers are the master's children: end them by their PIDs
        // (from /proc), then the master.
        if let Some(mut c) = self.child.take() {
            let master = c.id();
            if let Ok(entries) = std::fs::read_dir("/proc") {
                for e in entries.flatten() {
                    let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                        continue;
                    };
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let ppid = stat
                        .rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1))
                        .and_then(|p| p.parse::<u32>().ok());
                    if ppid == Some(master) {
                        let _ = crate::process::signal(pid, libc::SIGKILL);
                    }
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one wrk run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub req_per_s: f64,
    /// Responses whose status was not 200 or whose body differed.
    pub bad: u64,
    /// Socket errors: connect, read, write, timeout.
    pub errors: [u64; 4],
    /// Latency percentiles in milliseconds: 50, 90, 99.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// The Lua script: checks each response; `done` prints one summary line.
const SCRIPT: &str = r#"
local threads = {}
local expected = nil
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  local f = io.open(args[1], "rb")
  expected = f:read("*a")
  f:close()
  bad = 0
  ok = 0
  if args[2] == "close" then
    wrk.headers["Connection"] = "close"
  end
end
function response(status, headers, body)
  if status == 200 and body == expected then ok = ok + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local b, g = 0, 0
  for _, t in ipairs(threads) do
    b = b + t:get("bad")
    g = g + t:get("ok")
  end
  local e = summary.errors
  io.write(string.format("REMORA requests=%d ok=%d bad=%d connect=%d read=%d write=%d timeout=%d status=%d p50_us=%d p90_us=%d p99_us=%d duration_us=%d\n",
    summary.requests, g, b, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), summary.duration))
end
"#;

/// Runs wrk in `ns` against `server` for `duration` with `connections`
/// (2 threads); `close`: a new connection per request (`Connection:
/// close`). Every response is checked against the served body.
pub fn wrk(ns: &Netns, server: &Nginx, connections: usize, duration: Duration, close: bool) -> Result<WrkResult> {
    let dir = &server.dir;
    let script = dir.join(format!("check-{}.lua", crate::unique_name("w")));
    std::fs::write(&script, SCRIPT).map_err(|source| NetlabError::Spawn {
        cmd: "write wrk script".into(),
        source,
    })?;
    let secs = format!("{}s", duration.as_secs().max(1));
    let conns = connections.to_string();
    let threads = connections.clamp(1, 2).to_string();
    let body_path = dir.join("www/body");
    let out = ns
        .command("wrk")
        .args([
            "-t",
            &threads,
            "-c",
            &conns,
            "-d",
            &secs,
            "--timeout",
            "5s",
            "-s",
            &script.to_string_lossy(),
            &server.url,
            "--",
            &body_path.to_string_lossy(),
            if close { "close" } else { "keepalive" },
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetlabError::Spawn {
            cmd: "wrk".into(),
            source,
        })?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("REMORA "))
        .ok_or_else(|| NetlabError::Command {
            cmd: "wrk".into(),
            stderr: format!("no summary line:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)),
        })?;
    let get = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let dur = get("duration_us").max(1) as f64 / 1e6;
    Ok(WrkResult {
        requests: get("requests"),
        req_per_s: get("ok") as f64 / dur,
        bad: get("bad") + get("status"),
        errors: [get("connect"), get("read"), get("write"), get("timeout")],
        p50_ms: get("p50_us") as f64 / 1e3,
        p90_ms: get("p90_us") as f64 / 1e3,
        p99_ms: get("p99_us") as f64 / 1e3,
    })
}
