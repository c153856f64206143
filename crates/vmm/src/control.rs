//! The control socket: one request line in, one reply line out.
//!
//! ```text
//! status                        -> ok running vcpus=2 snapshots=3
//! pause | resume                -> ok paused | ok running
//! snapshot DIR base|incremental -> ok seq=3 pages=812 pause_us=640 bytes=3330048 ...
//! protect ADDR:PORT             -> ok protecting to ADDR:PORT (replication starts; see status)
//! ```
//! With replication, `status` goes on with the driver's `key=value` pairs
//! (protected, epoch, pauses, lag, output held, backup).
//! A snapshot's reply goes on with where the pause went (microseconds):
//! `kick_us` (stopping the vCPUs, each of which saves its own state as it
//! stops), `state_us` (VM and device state),
//! `harvest_us` (dirty logs), `protect_us` (write-protecting pages left for
//! copy-on-write), `copy_us` (copying pages; with
//! copy-on-write this includes the copy after the pause), `wp_runs` and
//! `wp_faults` (ranges protected, writes that waited for their page).
//!
//! Errors come back as `error MESSAGE`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::time::Duration;

use crate::VmEvent;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    Pause,
    Resume,
    Snapshot {
        dir: PathBuf,
        incremental: bool,
    },
    /// Start replicating to the backup at this address.
    Protect {
        addr: String,
    },
}

impl Command {
    pub fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => Ok(Command::Status),
            ["pause"] => Ok(Command::Pause),
            ["resume"] => Ok(Command::Resume),
            ["snapshot", dir, kind @ ("base" | "incremental")] => Ok(Command::Snapshot {
                dir: PathBuf::from(dir),
                incremental: *kind == "incremental",
            }),
            ["protect", addr] => Ok(Command::Protect { addr: addr.to_string() }),
            _ => Err(format!("unknown request '{}'", line.trim())),
        }
    }

    pub fn to_line(&self) -> String {
        match self {
            Command::Status => "status".into(),
            Command::Pause => "pause".into(),
            Command::Resume => "resume".into(),
            Command::Protect { addr } => format!("protect {addr}"),
            Command::Snapshot { dir, incremental } => format!(
                "snapshot {} {}",
                dir.display(),
                if *incremental { "incremental" } else { "base" }
            ),
        }
    }
}

/// The VMM's answer.
pub type Reply = Result<String, String>;

/// Longest request line, newline included.
pub const MAX_REQUEST: usize = 4096;
/// Time a client has to send its whole request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Clients served at once; more are answered `error busy` at once.
pub const MAX_CLIENTS: usize = 32;

/// Listens on `path` (replacing a stale socket) and forwards requests to
/// the VMM's event loop. Clients are served concurrently, each with a
/// deadline for its whole request, so a slow or idle client cannot block
/// another (`status` answers while others dawdle).
pub fn serve(path: &Path, events: Sender<VmEvent>) -> std::io::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running VMM", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let active = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new().name("control".into()).spawn(move || {
        use std::sync::atomic::Ordering;
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                active.fetch_sub(1, Ordering::AcqRel);
                let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = (&conn).write_all(b"error busy: too many control clients at once\n");
                continue;
            }
            let (events, active2) = (events.clone(), active.clone());
            let spawned = std::thread::Builder::new()
                .name("control-client".into())
                .spawn(move || {
                    let _ = handle(conn, &events);
                    active2.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })?;
    Ok(())
}

/// Reads one request line within [`REQUEST_DEADLINE`] and at most
/// [`MAX_REQUEST`] bytes.
fn read_request(conn: &UnixStream) -> Result<String, String> {
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 512];
    loop {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no complete request within {} s", REQUEST_DEADLINE.as_secs()))?;
        conn.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let n = match (&*conn).read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err("empty request".into()),
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("no complete request within {} s", REQUEST_DEADLINE.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
    }
    if buf.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    String::from_utf8(buf).map_err(|_| "request is not valid UTF-8".to_string())
}

fn handle(conn: UnixStream, events: &Sender<VmEvent>) -> Result<(), ()> {
    let reply = match read_request(&conn).and_then(|line| Command::parse(&line)) {
        Err(e) => Err(e),
        Ok(cmd) => {
            let (tx, rx) = channel();
            if events.send(VmEvent::Control(cmd, tx)).is_err() {
                Err("the VM has stopped".to_string())
            } else {
                rx.recv().unwrap_or_else(|_| Err("the VM has stopped".into()))
            }
        }
    };
    let text = match reply {
        Ok(s) => format!("ok {s}\n"),
        Err(e) => format!("error {e}\n"),
    };
    let _ = conn.set_write_timeout(Some(REQUEST_DEADLINE));
    let _ = (&conn).write_all(text.as_bytes());
    Ok(())
}

/// Sends one request to the VMM at `path` and returns its reply line.
pub fn request(path: &Path, cmd: &Command) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("{}\n", cmd.to_line()).as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_text_form() {
        for c in [
            Command::Status,
            Command::Pause,
            Command::Resume,
            Command::Snapshot {
                dir: "/tmp/s".into(),
                incremental: true,
            },
        ] {
            assert_eq!(Command::parse(&c.to_line()), Ok(c));
        }
        assert!(Command::parse("snapshot /x sideways").is_err());
        assert!(Command::parse("reboot").is_err());
    }

    /// A control socket served by a stand-in event loop that answers
    /// `status` at once.
    fn served(tag: &str) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
        let path = std::env::temp_dir().join(format!("remora-ctl-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let (tx, rx) = channel::<VmEvent>();
        serve(&path, tx).unwrap();
        let t = std::thread::spawn(move || {
            while let Ok(ev) = rx.recv() {
                if let VmEvent::Control(_, reply) = ev {
                    let _ = reply.send(Ok("running".into()));
                }
            }
        });
        (path, t)
    }

    fn raw(path: &Path, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = String::new();
        let _ = BufReader::new(&s).read_line(&mut out);
        out
    }

    #[test]
    fn slow_idle_and_flooding_clients_do_not_block_status() {
        let (path, _t) = served("slow");
        // Idle clients, and clients that send a byte every 300 ms.
        let mut idle = Vec::new();
        for _ in 0..5 {
            idle.push(UnixStream::connect(&path).unwrap());
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut slow = Vec::new();
        for _ in 0..8 {
            let (p, stop) = (path.clone(), stop.clone());
            slow.push(std::thread::spawn(move || {
                let mut s = UnixStream::connect(&p).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if s.write_all(b"s").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..10 {
            let t0 = std::time::Instant::now();
            let r = request(&path, &Command::Status).unwrap();
            assert_eq!(r, "ok running");
            assert!(
                t0.elapsed() < Duration::from_millis(100),
                "status took {:?}",
                t0.elapsed()
            );
        }
        // A flood beyond the client limit: every connection gets an answer
        // (served or busy), none hangs, and status still answers.
        let flood: Vec<_> = (0..3 * MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let t0 = std::time::Instant::now();
        let mut busy = 0;
        for mut c in flood {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.write_all(b"status\n");
            let mut out = String::new();
            let _ = BufReader::new(&c).read_line(&mut out);
            assert!(
                out.starts_with("ok running") || out.starts_with("error busy"),
                "{out:?}"
            );
            busy += usize::from(out.starts_with("error busy"));
        }
        assert!(busy > 0, "the flood never hit the client limit");
        assert!(t0.elapsed() < Duration::from_secs(3));
        let t0 = std::time::Instant::now();
        assert_eq!(request(&path, &Command::Status).unwrap(), "ok running");
        assert!(t0.elapsed() < Duration::from_millis(100));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(idle);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn malformed_requests_get_an_error() {
        let (path, _t) = served("bad");
        assert!(raw(&path, b"\xff\xfe status\n").starts_with("error request is not valid UTF-8"));
        assert!(raw(&path, &[b'x'; 5000]).starts_with("error request longer than 4096 bytes"));
        assert!(raw(&path, b"reboot now\n").starts_with("error unknown request"));
        assert_eq!(raw(&path, b"status\n"), "ok running\n");
        // A request without its newline before the client's half-close
        // still counts.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"status").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = BufReader::new(&s).read_line(&mut out);
        assert_eq!(out, "ok running\n");
        // An idle client is told after the deadline and let go.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = std::time::Instant::now();
        let mut out = String::new();
        let _ = BufReader::new(&mut s).read_line(&mut out);
        assert!(out.starts_with("error no complete request"), "{out:?}");
        assert!(t0.elapsed() >= REQUEST_DEADLINE && t0.elapsed() < REQUEST_DEADLINE + Duration::from_secs(1));
        let _ = std::fs::remove_file(&path);
    }
}
