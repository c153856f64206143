//! The test guest's `mem:MIB` memory checker (crates/guest/README.md):
//! every vCPU keeps rewriting and verifying generation-stamped pages; the
//! guest reports `mem ok checks=N` every second, or a MISMATCH and powers
//! off. Used here across snapshots and a restore in a new process.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("remora-guestmem-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

fn checks(line: &str) -> u64 {
    line.split("checks=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn mem_checker_reports_every_second() {
    require_kvm();
    let guest = guest_bin();
    let mut vm = spawn_remora(&[
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "workload=mem:32",
        "--vcpus",
        "2",
        "--mem",
        "128",
    ]);
    vm.wait_line(
        "remora-guest: mem start mib=32 pages=8192 cpus=2",
        Duration::from_secs(10),
    )
    .expect("mem start line");
    std::thread::sleep(Duration::from_millis(3500));
    vm.signal(libc::SIGTERM);
    let run = vm.finish(Duration::from_secs(10));
    let oks: Vec<_> = run
        .lines
        .iter()
        .filter(|(_, l)| l.contains("remora-guest: mem ok checks="))
        .collect();
    run.check(oks.len() >= 2, "at least two `mem ok` lines in 3.5 s");
    run.check(run.line("MISMATCH").is_none(), "no mismatch");
    for w in oks.windows(2) {
        let dt = w[1].0.saturating_sub(w[0].0);
        run.check(
            dt > Duration::from_millis(700) && dt < Duration::from_millis(1300),
            "about 1 s apart",
        );
        run.check(checks(&w[1].1) > checks(&w[0].1), "checks grow");
    }
    eprintln!("{}", run.stdout());
}

#[test]
fn mem_checker_survives_snapshots_and_restore() {
    require_kvm();
    let (sock, sock2, dir) = (tmp("sock"), tmp("sock2"), tmp("dir"));
    let guest = guest_bin();
    let mut vm = spawn_remora(&[
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "workload=mem:32",
        "--vcpus",
        "2",
        "--mem",
        "128",
        "--control",
        sock.to_str().unwrap(),
    ]);
    vm.wait_line("remora-guest: mem ok", Duration::from_secs(10))
        .expect("first mem ok line");
    let (ok, out) = ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap()]);
    assert!(ok, "base snapshot: {out}");
    for i in 1..=3 {
        std::thread::sleep(Duration::from_millis(300));
        let (ok, out) = ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap(), "--incremental"]);
        assert!(ok, "increment {i}: {out}");
    }
    std::thread::sleep(Duration::from_millis(1200));
    vm.signal(libc::SIGKILL);
    let first = vm.finish(Duration::from_secs(5));
    first.check(first.line("MISMATCH").is_none(), "no mismatch before the kill");
    let mut restored = spawn_remora(&[
        "restore",
        "--snapshot",
        dir.to_str().unwrap(),
        "--control",
        sock2.to_str().unwrap(),
    ]);
    let a = restored.wait_line("remora-guest: mem", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(2500));
    restored.signal(libc::SIGTERM);
    let run = restored.finish(Duration::from_secs(10));
    eprintln!("--- before:\n{}--- restored:\n{}", first.stdout(), run.stdout());
    run.check(a.is_some(), "the restored guest reports");
    run.check(run.line("MISMATCH").is_none(), "no mismatch after the restore");
    let oks = run.lines.iter().filter(|(_, l)| l.contains("mem ok checks=")).count();
    run.check(oks >= 2, "the restored checker keeps running");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&sock2);
}
