//! Bad input: one clear error line and a non-zero exit, never a panic.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn tmp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("remora-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Asserts a failed run with exactly one `remora: error:` line containing
/// every one of `needles`, and no panic.
fn assert_clear_error(run: &Run, needles: &[&str]) {
    run.check(!run.status.success(), "expected a non-zero exit");
    run.check(!run.timed_out, "remora hung on bad input");
    run.check(!run.stderr.contains("panicked"), "remora panicked");
    run.check(
        !run.stderr.contains("RUST_BACKTRACE"),
        "remora printed a backtrace hint",
    );
    let errors = run.error_lines();
    run.check(errors.len() == 1, "expected exactly one error line");
    run.check(
        errors[0].matches("(os error").count() <= 1,
        "the error line repeats its OS error",
    );
    for n in needles {
        run.check(errors[0].contains(n), &format!("error line lacks '{n}'"));
    }
}

fn run_args(extra: &[&str]) -> Run {
    let guest = guest_bin();
    let mut args = vec!["run", "--kernel", guest.to_str().unwrap(), "--cmdline", "workload=info"];
    args.extend_from_slice(extra);
    run_remora(&args, T)
}

#[test]
fn missing_kernel() {
    let run = run_remora(&["run", "--kernel", "/nonexistent/vmlinux"], T);
    assert_clear_error(&run, &["cannot open kernel", "/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn malformed_kernel() {
    let p = tmp_file("junk-kernel", &[0x42; 4096]);
    let run = run_remora(&["run", "--kernel", p.to_str().unwrap()], T);
    let _ = std::fs::remove_file(&p);
    assert_clear_error(&run, &["neither an ELF", "nor a bzImage"]);
}

#[test]
fn truncated_elf_kernel() {
    let mut bytes = std::fs::read(guest_bin()).unwrap();
    bytes.truncate(200);
    let p = tmp_file("short-elf", &bytes);
    let run = run_remora(&["run", "--kernel", p.to_str().unwrap()], T);
    let _ = std::fs::remove_file(&p);
    assert_clear_error(&run, &["kernel", "malformed"]);
}

#[test]
fn initrd_larger_than_memory() {
    require_kvm();
    let p = tmp_file("big-initrd", &vec![0u8; 40 << 20]);
    let run = run_args(&["--mem", "32", "--initrd", p.to_str().unwrap()]);
    let _ = std::fs::remove_file(&p);
    assert_clear_error(&run, &["initrd", "does not fit", "--mem"]);
}

#[test]
fn missing_initrd() {
    require_kvm();
    let run = run_args(&["--initrd", "/nonexistent/initrd.img"]);
    assert_clear_error(&run, &["cannot open initrd", "/nonexistent/initrd.img"]);
}

#[test]
fn mem_too_small() {
    let run = run_args(&["--mem", "4"]);
    assert_clear_error(&run, &["--mem 4 MiB is too small"]);
}

#[test]
fn zero_vcpus() {
    let run = run_args(&["--vcpus", "0"]);
    assert_clear_error(&run, &["--vcpus must be at least 1"]);
}

#[test]
fn too_many_vcpus() {
    require_kvm();
    let run = run_args(&["--vcpus", "100000"]);
    assert_clear_error(&run, &["--vcpus 100000 is more than this host's KVM allows"]);
}

#[test]
fn unknown_cpu_feature() {
    let run = run_args(&["--cpu-hide", "cx16,warpdrive"]);
    assert_clear_error(&run, &["unknown CPU feature 'warpdrive'", "cx16"]);
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace whose /dev is an empty tmpfs: no /dev/kvm.
    let guest = guest_bin();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {} --cmdline workload=info",
        remora_bin().display(),
        guest.display()
    );
    let run =
        spawn(Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script])).finish(T);
    assert_clear_error(&run, &["/dev/kvm does not exist", "KVM is not available"]);
}

#[test]
fn no_permission_on_dev_kvm() {
    require_kvm();
    // As an unprivileged user (nobody) /dev/kvm (0600 root here, or group kvm) cannot be opened.
    let guest = guest_bin();
    let run = spawn(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        remora_bin().to_str().unwrap(),
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "workload=info",
    ]))
    .finish(T);
    assert_clear_error(&run, &["permission denied opening /dev/kvm"]);
}

#[test]
fn missing_disk() {
    let run = run_args(&["--disk", "/nonexistent/disk.img"]);
    assert_clear_error(&run, &["cannot open disk /nonexistent/disk.img", "No such file"]);
}

#[test]
fn bad_disk_option() {
    let run = run_args(&["--disk", "/tmp/x.img,turbo"]);
    assert_clear_error(&run, &["unknown --disk option 'turbo'"]);
}

#[test]
fn bad_tap_name() {
    let run = run_args(&["--net", "tap=this-name-is-far-too-long"]);
    assert_clear_error(&run, &["TAP name 'this-name-is-far-too-long' is not valid"]);
}

#[test]
fn bad_mac() {
    let run = run_args(&["--net", "tap=t0,mac=52:54"]);
    assert_clear_error(&run, &["bad MAC address '52:54'"]);
}
