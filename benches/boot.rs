//! Boot benchmark: process start to the guest's first console line (and to
//! process exit after the guest powers off), median of 10, for remora and
//! for QEMU's microvm booting the same test guest, in one run.
//!
//! Run: `scripts/bench.sh boot` (builds the guest, then this).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

const RUNS: usize = 10;
const CMDLINE: &str = "workload=info";

struct Sample {
    first_line: Duration,
    exit: Duration,
}

fn measure(mut cmd: Command) -> Sample {
    let mut r = common::spawn(&mut cmd);
    let first = r
        .wait_line("", Duration::from_secs(20))
        .expect("no console output within 20 s");
    let run = r.finish(Duration::from_secs(20));
    assert!(!run.timed_out, "did not exit: {}", run.stderr);
    Sample {
        first_line: first.0,
        exit: run.elapsed,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    common::require_kvm();
    let guest = common::guest_bin();
    let g = guest.to_str().unwrap().to_string();
    let remora = || {
        let mut c = Command::new(common::remora_bin());
        c.args([
            "run",
            "--kernel",
            &g,
            "--cmdline",
            CMDLINE,
            "--vcpus",
            "2",
            "--mem",
            "256",
        ]);
        c
    };
    let qemu = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm",
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-smp",
            "2",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            &g,
            "-append",
            CMDLINE,
        ]);
        c
    };
    let (mut rs, mut qs) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        // Interleave so drift on a shared machine hits both alike.
        rs.push(measure(remora()));
        qs.push(measure(qemu()));
        eprint!("\rboot benchmark: {}/{RUNS}", i + 1);
    }
    eprintln!();
    let row = |name: &str, s: &[Sample]| {
        let first = median(s.iter().map(|x| x.first_line).collect());
        let exit = median(s.iter().map(|x| x.exit).collect());
        let min = s.iter().map(|x| x.first_line).min().unwrap_or_default();
        let max = s.iter().map(|x| x.first_line).max().unwrap_or_default();
        println!(
            "{name:<8} {:>10.1} {:>10.1} {:>10.1} {:>12.1}",
            ms(first),
            ms(min),
            ms(max),
            ms(exit)
        );
        (first, exit)
    };
    println!("test guest, 2 vCPUs, 256 MiB, cmdline \"{CMDLINE}\", median of {RUNS}");
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>12}",
        "vmm", "first ms", "min ms", "max ms", "exit ms"
    );
    let (rf, re) = row("remora", &rs);
    let (qf, qe) = row("qemu", &qs);
    let ratio = qf.as_secs_f64() / rf.as_secs_f64();
    println!("first console line: remora is {ratio:.1}x faster than QEMU microvm");
    let json = format!(
        "{{\"benchmark\":\"boot\",\"runs\":{RUNS},\"vcpus\":2,\"mem_mib\":256,\
\"remora\":{{\"first_line_ms\":{:.3},\"exit_ms\":{:.3}}},\
\"qemu\":{{\"first_line_ms\":{:.3},\"exit_ms\":{:.3}}},\"qemu_over_remora_first_line\":{ratio:.3}}}\n",
        ms(rf),
        ms(re),
        ms(qf),
        ms(qe)
    );
    let dir = common::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("boot.json"), json).unwrap();
    println!("wrote {}", dir.join("boot.json").display());
}
