//! `--metrics` end to end: a protected test guest on a primary host
//! (network namespace) and a backup host (remora-netlab's `HaLan`), each
//! serving Prometheus metrics on its own loopback; a client streams into
//! the guest; the figures are scraped from inside each host's namespace,
//! and again on the backup after the primary is killed (SIGKILL).

mod common;

use common::*;
use remora_netlab::{HaLan, Netns, BACKUP_REPL_IP, GUEST_IP};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:12:34:56";
/// Each host is its own namespace: fixed ports do not collide.
const REPL_PORT: u16 = 7700;
const METRICS: &str = "127.0.0.1:9100";

/// A primary and a backup on an `HaLan`; the processes are killed (by
/// PID) before the namespaces go.
struct Pair {
    primary: Option<Running>,
    backup: Option<Running>,
    dir: PathBuf,
    lan: HaLan,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for r in [self.primary.take(), self.backup.take()].into_iter().flatten() {
            r.signal(libc::SIGKILL);
            let _ = r.finish(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` on the metrics port inside `ns`: the whole response.
fn get(ns: &Netns, path: &str) -> std::io::Result<String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    raw(ns, req.into_bytes())
}

fn raw(ns: &Netns, req: Vec<u8>) -> std::io::Result<String> {
    ns.spawn_thread(move || {
        let mut s = TcpStream::connect(METRICS)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&req)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("scrape thread panicked")))
}

/// A successful scrape of `/metrics` inside `ns`.
fn scrape(ns: &Netns) -> String {
    let r = get(ns, "/metrics").unwrap_or_else(|e| panic!("scrape in {}: {e}", ns.name()));
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    r
}

/// The value of sample `name` (with its labels, if any) in a scrape.
fn value(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{body}"))
}

/// Polls `/metrics` in `ns` until `pred` holds; the last scrape either way.
fn scrape_until(ns: &Netns, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match get(ns, "/metrics") {
            Ok(r) if pred(&r) => return Ok(r),
            Ok(r) => last = r,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

/// Client -> guest sink at about `mib_s` MiB/s until `stop`.
fn stream(lan: &HaLan, mib_s: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<std::io::Result<u64>> {
    lan.client.spawn_thread(move || {
        let mut c = TcpStream::connect((GUEST_IP, 5001))?;
        c.set_write_timeout(Some(Duration::from_secs(5)))?;
        let chunk = vec![0x5au8; 64 << 10];
        let t0 = Instant::now();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            c.write_all(&chunk)?;
            sent += chunk.len() as u64;
            let due = Duration::from_secs_f64(sent as f64 / (mib_s as f64 * 1048576.0));
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let _ = c.shutdown(Shutdown::Write);
        Ok(sent)
    })
}

#[test]
fn primary_and_backup_figures_move_and_failover_counts() {
    require_kvm();
    let lan = HaLan::new("mt").expect("namespaces");
    let dir = std::env::temp_dir().join(format!("remora-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut pair = Pair {
        primary: None,
        backup: None,
        dir,
        lan,
    };
    let repl = format!("{BACKUP_REPL_IP}:{REPL_PORT}");
    let net = format!("tap={},mac={MAC}", pair.lan.tap);

    let mut cmd = pair.lan.backup.command(remora_bin().to_str().unwrap());
    cmd.args(["backup", "--listen", &repl, "--net", &net, "--metrics", METRICS]);
    pair.backup = Some(spawn(&mut cmd));
    assert!(
        wait_listening(&pair.lan.backup, REPL_PORT, Duration::from_secs(10)),
        "the backup never listened"
    );
    let b0 = scrape(&pair.lan.backup);
    assert_eq!(value(&b0, "remora_backup_primary_connected"), 0.0, "{b0}");
    assert_eq!(value(&b0, "remora_backup_checkpoints_applied_total"), 0.0, "{b0}");
    assert_eq!(value(&b0, "remora_failovers_total"), 0.0, "{b0}");

    let psock = pair.dir.join("primary.sock");
    let mut cmd = pair.lan.primary.command(remora_bin().to_str().unwrap());
    cmd.args(["run", "--kernel", guest_bin().to_str().unwrap()])
        .args(["--cmdline", &format!("workload=sink:5001 ip={GUEST_IP}/24")])
        .args(["--net", &net, "--control", psock.to_str().unwrap()])
        .args(["--protect", &repl, "--metrics", METRICS]);
    let mut p = spawn(&mut cmd);
    assert!(
        p.wait_line("remora-guest: net up", Duration::from_secs(30)).is_some(),
        "primary guest network never came up"
    );
    pair.primary = Some(p);
    let protected = scrape_until(&pair.lan.primary, Duration::from_secs(60), |r| {
        r.lines().any(|l| l == "remora_protected 1")
    });
    if let Err(last) = protected {
        let p = pair.primary.take().unwrap();
        p.signal(libc::SIGKILL);
        panic!(
            "never protected; last scrape:\n{last}\n--- primary stderr:\n{}",
            p.finish(Duration::from_secs(5)).stderr
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let client = stream(&pair.lan, 16, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (p1, b1) = (scrape(&pair.lan.primary), scrape(&pair.lan.backup));
    std::thread::sleep(Duration::from_secs(1));
    let (p2, b2) = (scrape(&pair.lan.primary), scrape(&pair.lan.backup));
    let both = format!("--- first:\n{p1}\n--- second:\n{p2}");

    // The primary: checkpoints go on and are acknowledged.
    assert!(value(&p2, "remora_epoch") > value(&p1, "remora_epoch"), "{both}");
    assert!(
        value(&p2, "remora_checkpoint_pause_seconds_count") > value(&p1, "remora_checkpoint_pause_seconds_count"),
        "{both}"
    );
    // 1 s of 25 ms epochs: dozens of checkpoints (at most 3 in flight).
    let taken =
        value(&p2, "remora_checkpoint_pause_seconds_count") - value(&p1, "remora_checkpoint_pause_seconds_count");
    assert!(taken >= 10.0, "only {taken} checkpoints in 1 s\n{both}");
    assert!(value(&p2, "remora_checkpoint_pause_seconds_sum") > 0.0, "{both}");
    assert!(value(&p2, "remora_checkpoint_last_bytes") > 0.0, "{both}");
    assert!(
        value(&p2, "remora_checkpoint_bytes_sum") > value(&p1, "remora_checkpoint_bytes_sum"),
        "{both}"
    );
    assert_eq!(
        value(&p2, "remora_checkpoint_bytes_count"),
        value(&p2, "remora_checkpoint_pause_seconds_count"),
        "{both}"
    );
    assert_eq!(value(&p2, "remora_protected"), 1.0, "{both}");
    assert_eq!(value(&p2, "remora_protection_state{state=\"yes\"}"), 1.0, "{both}");
    assert_eq!(value(&p2, "remora_backup_alive"), 1.0, "{both}");
    assert!(value(&p2, "remora_replication_lag_checkpoints") <= 3.0, "{both}");
    assert_eq!(value(&p2, "remora_checkpoint_nacks_total"), 0.0, "{both}");
    assert_eq!(value(&p2, "remora_fence_generation"), 0.0, "{both}");
    assert_eq!(value(&p2, "remora_fenced"), 0.0, "{both}");
    value(&p2, "remora_output_held_bytes");
    value(&p2, "remora_speculated_flows");
    assert!(!p2.contains("remora_failovers"), "a primary has no failovers\n{p2}");

    // The backup standing by applies them.
    let both = format!("--- first:\n{b1}\n--- second:\n{b2}");
    assert!(
        value(&b2, "remora_backup_checkpoints_applied_total") > value(&b1, "remora_backup_checkpoints_applied_total"),
        "{both}"
    );
    assert!(
        value(&b2, "remora_backup_received_bytes_total") > value(&b1, "remora_backup_received_bytes_total"),
        "{both}"
    );
    assert_eq!(value(&b2, "remora_backup_primary_connected"), 1.0, "{both}");
    assert_eq!(value(&b2, "remora_failovers_total"), 0.0, "{both}");

    // Other paths and garbage, on the live server.
    let r = get(&pair.lan.primary, "/").unwrap();
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
    let r = raw(&pair.lan.primary, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n".to_vec()).unwrap();
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");

    // The primary dies: the backup takes over and counts it.
    let applied = value(&b2, "remora_backup_checkpoints_applied_total");
    let dead = pair.primary.take().unwrap();
    dead.signal(libc::SIGKILL);
    let dead = dead.finish(Duration::from_secs(5));
    let after = scrape_until(&pair.lan.backup, Duration::from_secs(30), |r| {
        r.lines().any(|l| l == "remora_failovers_total 1")
    });
    stop.store(true, Ordering::Relaxed);
    let after = after.unwrap_or_else(|last| {
        let b = pair.backup.take().unwrap();
        b.signal(libc::SIGKILL);
        panic!(
            "no failover counted; last scrape:\n{last}\n--- backup stderr:\n{}\n--- primary stderr:\n{}",
            b.finish(Duration::from_secs(5)).stderr,
            dead.stderr
        );
    });
    assert_eq!(value(&after, "remora_backup_primary_connected"), 0.0, "{after}");
    assert!(
        value(&after, "remora_backup_checkpoints_applied_total") >= applied,
        "{after}"
    );
    // The resumed guest runs here, unprotected.
    assert_eq!(value(&after, "remora_protected"), 0.0, "{after}");
    assert_eq!(value(&after, "remora_protection_state{state=\"no\"}"), 1.0, "{after}");
    let backup = pair.backup.take().unwrap();
    backup.signal(libc::SIGTERM);
    let run = backup.finish(Duration::from_secs(10));
    assert!(run.stderr.contains("remora backup: failover:"), "{}", run.stderr);
    let _ = client.join();
}

/// A metrics port in use is a one-line error before anything starts.
#[test]
fn metrics_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for args in [
        vec!["run", "--kernel", "/nonexistent", "--metrics", &addr],
        vec!["backup", "--listen", "127.0.0.1:0", "--metrics", &addr],
    ] {
        let run = run_remora(&args, Duration::from_secs(10));
        run.check(!run.status.success() && !run.timed_out, "should fail");
        let errors = run.error_lines();
        assert_eq!(errors.len(), 1, "{}", run.stderr);
        assert!(
            errors[0].starts_with(&format!("remora: error: cannot serve metrics on {addr}: ")),
            "{}",
            run.stderr
        );
    }
    let run = run_remora(
        &["run", "--metrics", "nonsense", "--kernel", "x"],
        Duration::from_secs(10),
    );
    run.check(run.status.code() == Some(2), "a bad address is a usage error");
    for cmd in ["run", "backup"] {
        let help = run_remora(&[cmd, "--help"], Duration::from_secs(10));
        help.check(
            help.stdout().contains("--metrics <ADDR:PORT>"),
            "--help names --metrics",
        );
        help.check(help.stdout().contains("/metrics"), "--help says what is served");
    }
}
