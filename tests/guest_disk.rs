//! End-to-end tests of remora's virtio-blk with the test guest's `disk:MIB`
//! and `diskcheck:MIB` workloads (see crates/guest/README.md).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{guest_bin, require_kvm, run_remora, splitmix64, Run};

/// A fresh zero-filled image in the target directory, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(tag: &str, mib: u64) -> Image {
        let dir = common::target_dir().join("test-images");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{tag}-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(mib << 20).unwrap();
        Image(p)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn boot(cmdline: &str, disk: &str) -> Run {
    let guest = guest_bin();
    let run = run_remora(
        &[
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--mem",
            "256",
            "--disk",
            disk,
        ],
        Duration::from_secs(60),
    );
    eprintln!("{}", run.stdout());
    run
}

#[test]
fn disk_pattern_persists_across_boots() {
    require_kvm();
    let img = Image::new("persist", 96);
    let disk = img.0.to_str().unwrap().to_string();

    let r = boot("workload=disk:64", &disk);
    r.check(!r.timed_out && r.status.success(), "first boot exits cleanly");
    r.check(
        r.line("remora-guest: virtio blk at 0xd0000000 irq 5").is_some(),
        "device found",
    );
    r.check(r.line("remora-guest: disk ok").is_some(), "disk:64 ok");

    // The data reached the image file.
    let bytes = std::fs::read(&img.0).unwrap();
    let w0 = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
    assert_eq!(w0, splitmix64(0x7265_6d6f_7261_646b), "first word of the disk pattern");
    assert!(bytes[64 << 20..].iter().all(|&b| b == 0), "nothing written past 64 MiB");

    let r = boot("workload=diskcheck:64", &disk);
    r.check(!r.timed_out && r.status.success(), "second boot exits cleanly");
    r.check(r.line("remora-guest: diskcheck ok").is_some(), "diskcheck:64 ok");

    // Corrupt one byte: diskcheck must notice it.
    let mut bytes = bytes;
    bytes[(5 << 20) + 4097] ^= 0xff;
    std::fs::write(&img.0, &bytes).unwrap();
    let r = boot("workload=diskcheck:64", &disk);
    r.check(r.status.success(), "third boot exits cleanly");
    r.check(
        r.line("remora-guest: diskcheck MISMATCH offset=0x501000").is_some(),
        "diskcheck reports the corrupted word",
    );
}

#[test]
fn read_only_disk_reports_io_error() {
    require_kvm();
    let img = Image::new("ro", 4);
    let disk = format!("{},ro", img.0.to_str().unwrap());
    let r = boot("workload=disk:1,info", &disk);
    r.check(
        !r.timed_out && r.status.success(),
        "the VMM survives and the guest powers off",
    );
    r.check(
        r.line("remora-guest: disk error: write sector=0 status=1 (IOERR)")
            .is_some(),
        "the write fails with IOERR",
    );
    r.check(r.line("remora-guest: cpus=").is_some(), "the guest carries on");
    assert!(
        std::fs::read(&img.0).unwrap().iter().all(|&b| b == 0),
        "image untouched"
    );
}

#[test]
fn disk_too_small_is_reported() {
    require_kvm();
    let img = Image::new("small", 1);
    let r = boot("workload=disk:2", img.0.to_str().unwrap());
    r.check(r.status.success(), "clean exit");
    r.check(
        r.line("remora-guest: disk error: disk has 2048 sectors").is_some(),
        "size error",
    );
}
