//! A live TCP stream into the guest survives snapshots, the death of its
//! VMM (SIGKILL) and a restore in a new process on the same TAP.
//!
//! The final increment is taken with the VM paused and the VMM is killed
//! while still paused, so nothing the guest emitted after that snapshot
//! (ACKs in particular) ever left: plain snapshots give no output commit,
//! which is what replication adds.

mod common;

use common::*;
use remora_netlab::{VmLan, GUEST_IP};
use std::path::Path;
use std::time::Duration;

const TOTAL: usize = 96 << 20;

/// `remora ctl`, which must succeed.
fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let (ok, out) = ctl(sock, args);
    assert!(ok, "ctl {args:?}: {out}");
    out
}

#[test]
fn tcp_stream_survives_kill_and_restore() {
    require_kvm();
    let lan = VmLan::new("sn").expect("namespaces");
    let base = std::env::temp_dir().join(format!("remora-snapnet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (sock, dir) = (base.join("ctl.sock"), base.join("snap"));
    let guest = guest_bin();
    let cmdline = format!("workload=sink:5001 ip={GUEST_IP}/24");
    let net = format!("tap={}", lan.tap);
    let (g, s) = (guest.to_str().unwrap(), sock.to_str().unwrap());
    let mut first = spawn(lan.host.command(remora_bin().to_str().unwrap()).args([
        "run",
        "--kernel",
        g,
        "--cmdline",
        &cmdline,
        "--vcpus",
        "2",
        "--mem",
        "256",
        "--net",
        &net,
        "--control",
        s,
    ]));
    first
        .wait_line("net up", Duration::from_secs(20))
        .expect("guest network up");

    // The client streams at a modest rate so the stream spans the whole
    // snapshot sequence, the kill and the restore.
    let sender = paced_stream(&lan, 5001, TOTAL, Duration::from_millis(8));
    std::thread::sleep(Duration::from_millis(300));
    let d = dir.to_str().unwrap();
    assert!(ctl_ok(&sock, &["snapshot", "--out", d]).contains("seq=0"));
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(40));
        ctl_ok(&sock, &["snapshot", "--out", d, "--incremental"]);
    }
    ctl_ok(&sock, &["pause"]);
    assert!(ctl_ok(&sock, &["snapshot", "--out", d, "--incremental"]).contains("seq=11"));
    first.signal(libc::SIGKILL);
    let dead = first.finish(Duration::from_secs(5));
    dead.check(
        dead.line("remora-guest: sink").is_none(),
        "the stream ended before the kill: test too short",
    );

    let mut second =
        spawn(
            lan.host
                .command(remora_bin().to_str().unwrap())
                .args(["restore", "--snapshot", d, "--net", &net]),
        );
    let line = second.wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
    let want = sender.join().unwrap().expect("client stream");
    second.signal(libc::SIGTERM);
    let run = second.finish(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&base);
    let (_, line) = line.unwrap_or_else(|| {
        panic!(
            "restored guest never finished the stream\n{}{}",
            run.stdout(),
            run.stderr
        )
    });
    assert!(line.contains(&format!("bytes={TOTAL} ")), "{line}");
    assert!(
        line.ends_with(&format!("sha256={want}")),
        "stream corrupted across the restore: {line} vs {want}"
    );
}
