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

/// Listens on `path` (replacing a stale socket) and forwards requests to
/// the VMM's event loop.
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
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            // The VMM is gone: nothing left to serve.
            if handle(conn, &events).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

fn handle(conn: UnixStream, events: &Sender<VmEvent>) -> Result<(), ()> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let mut reader = BufReader::new(&conn).take(4096);
    if reader.read_line(&mut line).is_err() {
        return Ok(());
    }
    let reply = match Command::parse(&line) {
        Err(e) => Err(e),
        Ok(cmd) => {
            let (tx, rx) = channel();
            if events.send(VmEvent::Control(cmd, tx)).is_err() {
                return Err(());
            }
            rx.recv().unwrap_or_else(|_| Err("the VM has stopped".into()))
        }
    };
    let text = match reply {
        Ok(s) => format!("ok {s}\n"),
        Err(e) => format!("error {e}\n"),
    };
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
}
