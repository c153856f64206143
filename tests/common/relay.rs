//! A `remora relay` process for the end-to-end tests (tests/relay.rs,
//! tests/racc.rs): started in a RelayLan's relay namespace, its stdout
//! lines collected as they arrive, stopped by SIGTERM with a check of its
//! summary, killed on drop.

use std::io::Read;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use remora_netlab::RelayLan;

/// Per-flow budget given to every relay (bytes) unless `--budget` is passed.
pub const BUDGET: u64 = 4 << 20;

/// A running `remora relay`, its stdout lines collected as they arrive.
pub struct Relay {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    stderr: Option<JoinHandle<String>>,
    desc: String,
}

/// How a relay ended.
pub struct Stopped {
    pub status: ExitStatus,
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Stopped {
    pub fn summary(&self) -> &str {
        self.lines
            .iter()
            .find(|l| l.starts_with("remora relay: summary"))
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no summary line\n{}", self.dump()))
    }

    pub fn dump(&self) -> String {
        format!(
            "--- status {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status,
            self.lines.join("\n"),
            self.stderr
        )
    }
}

impl Relay {
    /// Starts `remora relay --mode MODE --stats --budget BUDGET EXTRA` in the
    /// relay namespace and waits for its `ready` line.
    pub fn start(lan: &RelayLan, mode: &str, extra: &[&str]) -> Relay {
        let budget = BUDGET.to_string();
        let mut cmd = lan.relay_command(&super::remora_bin());
        cmd.args(["--mode", mode, "--stats"]);
        if !extra.contains(&"--budget") {
            cmd.args(["--budget", &budget]);
        }
        cmd.args(extra);
        let desc = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn remora relay");
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut r = Relay {
            child,
            lines,
            stderr: Some(stderr),
            desc,
        };
        if r.wait_line(0, |l| l.starts_with("remora relay: ready"), Duration::from_secs(15))
            .is_none()
        {
            let s = r.kill();
            panic!("{}: no ready line\n{}", s.1, s.0.dump());
        }
        r
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits for a stdout line at index >= `from` satisfying `pred`.
    pub fn wait_line(&mut self, from: usize, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().skip(from).find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() > deadline || self.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// VmRSS of the relay process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn collect(&mut self, status: ExitStatus) -> Stopped {
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        // The stdout reader ends at EOF, which follows the exit.
        std::thread::sleep(Duration::from_millis(100));
        Stopped {
            status,
            lines: self.lines.lock().unwrap().clone(),
            stderr,
        }
    }

    pub fn kill(&mut self) -> (Stopped, String) {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait");
        (self.collect(status), self.desc.clone())
    }

    /// SIGTERM; asserts a clean exit (status 0, a summary line) within 10 s.
    pub fn stop(mut self) -> Stopped {
        // SAFETY: kill(2) on the PID of our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let Some(status) = status else {
            let (s, desc) = self.kill();
            panic!("{desc}: did not exit within 10 s of SIGTERM\n{}", s.dump());
        };
        let s = self.collect(status);
        eprintln!("{}", s.summary());
        assert!(s.status.success(), "relay exited with {:?}\n{}", s.status, s.dump());
        s
    }
}

impl Drop for Relay {
    /// A failing test must not leave its relay running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The number after `key=` in a `key=value ...` line (units after the
/// digits ignored).
pub fn kv(line: &str, key: &str) -> Option<u64> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(|v| v.chars().take_while(char::is_ascii_digit).collect::<String>())
        .and_then(|v| v.parse().ok())
}

pub fn kv_req(line: &str, key: &str) -> u64 {
    kv(line, key).unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}
