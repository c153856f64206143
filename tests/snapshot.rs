//! Snapshots through the control socket, and restore in a new process.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("remora-snaptest-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Starts the guest computing for several seconds on 2 vCPUs with a
/// control socket; returns it once the guest runs.
fn start_long_compute(sock: &Path, extra: &[&str]) -> Running {
    let guest = guest_bin();
    let mut args = vec![
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "workload=compute:6000000000",
        "--vcpus",
        "2",
        "--mem",
        "64",
        "--control",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut r = spawn_remora(&args);
    r.wait_line("remora-guest", Duration::from_secs(10))
        .expect("guest booted");
    r
}

#[test]
fn base_and_increments_restore_in_a_new_process() {
    require_kvm();
    let (sock, dir, disk) = (tmp("sock"), tmp("dir"), tmp("disk.img"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = disk.to_str().unwrap();
    let r = start_long_compute(&sock, &["--disk", disk_arg]);
    let (ok, out) = ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap()]);
    assert!(ok, "base snapshot: {out}");
    assert!(out.contains("seq=0"), "{out}");
    for i in 1..=5 {
        std::thread::sleep(Duration::from_millis(150));
        let (ok, out) = ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap(), "--incremental"]);
        assert!(ok && out.contains(&format!("seq={i}")), "increment {i}: {out}");
    }
    // The first VMM dies without warning.
    r.signal(libc::SIGKILL);
    let first = r.finish(Duration::from_secs(5));
    first.check(!first.status.success(), "first VMM should have been killed");
    first.check(
        first.line("compute cycles_per_iter").is_none(),
        "finished before the kill: test too short",
    );

    // The device list must match the snapshot's.
    let run = run_remora(
        &["restore", "--snapshot", dir.to_str().unwrap()],
        Duration::from_secs(30),
    );
    run.check(
        !run.status.success()
            && run
                .error_lines()
                .iter()
                .any(|l| l.contains("the snapshot has 1 virtio devices, the command line gives 0")),
        "restoring without the VM's disk must be refused",
    );
    let run = run_remora(
        &["restore", "--snapshot", dir.to_str().unwrap(), "--disk", disk_arg],
        Duration::from_secs(60),
    );
    run.check(run.status.success(), "restored VM did not finish cleanly");
    run.check(
        run.line("remora-guest: compute cycles_per_iter=").is_some(),
        "restored guest did not finish its computation",
    );
    run.check(
        run.stderr.contains("guest powered off"),
        "restored guest did not power off",
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&disk);
}

#[test]
fn corrupt_or_incomplete_snapshots_are_refused() {
    require_kvm();
    let (sock, dir) = (tmp("sock2"), tmp("dir2"));
    let r = start_long_compute(&sock, &[]);
    // An increment needs a base; a base needs an empty directory.
    let (ok, out) = ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap(), "--incremental"]);
    assert!(!ok && out.contains("no base snapshot"), "{out}");
    assert!(ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap()]).0);
    let (ok, out) = ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap()]);
    assert!(!ok && out.contains("already holds snapshots"), "{out}");
    assert!(ctl(&sock, &["snapshot", "--out", dir.to_str().unwrap(), "--incremental"]).0);
    let (ok, out) = ctl(&sock, &["pause"]);
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, out) = ctl(&sock, &["status"]);
    assert!(ok && out.starts_with("paused vcpus=2"), "{out}");
    assert!(ctl(&sock, &["resume"]).0);
    r.signal(libc::SIGKILL);
    let _ = r.finish(Duration::from_secs(5));

    // A flipped bit in the page data of the base: refused with a clear error.
    let mem1 = dir.join("0000.mem");
    let mut bytes = std::fs::read(&mem1).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&mem1, &bytes).unwrap();
    let run = run_remora(
        &["restore", "--snapshot", dir.to_str().unwrap()],
        Duration::from_secs(30),
    );
    run.check(!run.status.success(), "a corrupt snapshot was restored");
    let errors = run.error_lines();
    run.check(
        errors.len() == 1 && errors[0].contains("checksum mismatch"),
        "expected one error naming the checksum",
    );
    // A missing directory.
    let run = run_remora(&["restore", "--snapshot", "/nonexistent/snap"], Duration::from_secs(30));
    run.check(
        !run.status.success() && run.error_lines().iter().any(|l| l.contains("no base snapshot")),
        "expected a clear error for a missing snapshot",
    );
    // The control socket of a VM that is gone.
    let (ok, out) = ctl(&sock, &["status"]);
    assert!(!ok && out.contains("cannot reach the VM"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot that fails to be written must not lose its dirty pages (the
/// dirty logs were cleared when it was taken), nor move the chain to a bad
/// directory; its error names the OS error once.
#[test]
fn failed_snapshot_writes_lose_no_pages() {
    require_kvm();
    let (sock, dir) = (tmp("sock3"), tmp("dir3"));
    let d = dir.to_str().unwrap();
    let guest = guest_bin();
    // A region large enough that the guest's random rewrites do not cover
    // it again between two back-to-back snapshots.
    let r = spawn_remora(&[
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "workload=mem:256",
        "--vcpus",
        "2",
        "--mem",
        "320",
        "--control",
        sock.to_str().unwrap(),
    ]);
    let mut r = r;
    r.wait_line("mem ok", Duration::from_secs(20))
        .expect("mem workload running");
    let (ok, out) = ctl(&sock, &["snapshot", "--out", d]);
    assert!(ok && out.contains("seq=0"), "{out}");
    std::thread::sleep(Duration::from_millis(50));
    let (ok, out) = ctl(&sock, &["snapshot", "--out", d, "--incremental"]);
    assert!(ok && out.contains("seq=1"), "{out}");
    std::thread::sleep(Duration::from_millis(100));
    // 0002 cannot be written: its temporary file is a directory.
    let blocker = dir.join("0002.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let (ok, out) = ctl(&sock, &["snapshot", "--out", d, "--incremental"]);
    assert!(!ok && out.contains("Is a directory"), "{out}");
    assert_eq!(out.matches("Is a directory").count(), 1, "the OS error twice: {out}");
    std::fs::remove_dir(&blocker).unwrap();
    let (ok, out) = ctl(&sock, &["snapshot", "--out", d, "--incremental"]);
    assert!(ok && out.contains("seq=2"), "{out}");
    // A base that cannot be written leaves the chain where it was.
    let (ok, out) = ctl(&sock, &["snapshot", "--out", "/proc/remora-no-such-dir"]);
    assert!(!ok, "{out}");
    let (ok, out) = ctl(&sock, &["status"]);
    assert!(ok && out.contains(&format!("snapshot_dir={d}")), "{out}");
    let (ok, out) = ctl(&sock, &["snapshot", "--out", d, "--incremental"]);
    assert!(ok && out.contains("seq=3"), "{out}");
    r.signal(libc::SIGKILL);
    let first = r.finish(Duration::from_secs(5));
    first.check(first.line("MISMATCH").is_none(), "corruption before the snapshots");

    // The guest checks its pages for a few seconds after the restore.
    let run = run_remora(&["restore", "--snapshot", d], Duration::from_secs(6));
    let _ = std::fs::remove_dir_all(&dir);
    run.check(
        run.line("mem MISMATCH").is_none(),
        "the restored guest found pages the increments missed",
    );
    run.check(
        run.lines.iter().filter(|(_, l)| l.contains("mem ok")).count() >= 2,
        "the restored guest did not keep checking its memory",
    );
}

/// Restore of a damaged chain exits non-zero with one error line naming
/// the damaged file, never running older state in its place.
#[test]
fn damaged_chains_are_refused_with_one_clear_error() {
    require_kvm();
    let (sock, dir) = (tmp("sock4"), tmp("dir4"));
    let d = dir.to_str().unwrap();
    let r = start_long_compute(&sock, &[]);
    assert!(ctl(&sock, &["snapshot", "--out", d]).0);
    for _ in 1..=3 {
        std::thread::sleep(Duration::from_millis(50));
        assert!(ctl(&sock, &["snapshot", "--out", d, "--incremental"]).0);
    }
    r.signal(libc::SIGKILL);
    let _ = r.finish(Duration::from_secs(5));

    type Damage = fn(&Path);
    let cases: [(&str, &str, Damage); 5] = [
        ("0001.state", "gap", |d| {
            std::fs::remove_file(d.join("0001.state")).unwrap()
        }),
        ("0002.mem", "is missing", |d| {
            std::fs::remove_file(d.join("0002.mem")).unwrap()
        }),
        ("0002.state", "not a regular file", |d| {
            std::fs::remove_file(d.join("0002.state")).unwrap();
            std::os::unix::fs::symlink("0002.state", d.join("0002.state")).unwrap();
        }),
        ("0000.state", "checksum", |d| {
            let p = d.join("0000.state");
            let mut b = std::fs::read(&p).unwrap();
            let i = b.len() - 8;
            b[i] ^= 0x10;
            std::fs::write(&p, b).unwrap();
        }),
        ("0001.state", "trailing bytes", |d| {
            let p = d.join("0001.state");
            let mut b = std::fs::read(&p).unwrap();
            b.extend_from_slice(&[0; 4096]);
            std::fs::write(&p, b).unwrap();
        }),
    ];
    let copy = tmp("dir4-copy");
    for (file, why, damage) in cases {
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
        }
        damage(&copy);
        let run = run_remora(
            &["restore", "--snapshot", copy.to_str().unwrap()],
            Duration::from_secs(30),
        );
        run.check(
            !run.timed_out && !run.status.success(),
            &format!("{file} ({why}) was restored"),
        );
        run.check(
            run.line("remora-guest").is_none(),
            &format!("the guest ran from a chain with {file} damaged ({why})"),
        );
        let errors = run.error_lines();
        run.check(
            errors.len() == 1 && errors[0].contains(&format!("{}/{file}", copy.display())) && errors[0].contains(why),
            &format!("expected one error line naming {file} ({why})"),
        );
    }
    let _ = std::fs::remove_dir_all(&copy);
    let _ = std::fs::remove_dir_all(&dir);
}
