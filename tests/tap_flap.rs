//! The VM keeps running, and a TCP stream into it completes intact, when
//! its TAP goes down for a while and comes back.

mod common;

use common::*;
use remora_netlab::VmLan;
use std::time::Duration;

const TOTAL: usize = 64 << 20;

#[test]
fn stream_survives_tap_down_and_up() {
    require_kvm();
    let lan = VmLan::new("tf").expect("namespaces");
    let (mut vm, _) = boot_on_lan(&lan, Vmm::Remora, "sink:5001", 2);
    let sender = paced_stream(&lan, 5001, TOTAL, Duration::from_millis(6));
    std::thread::sleep(Duration::from_millis(300));
    lan.host.ip(&["link", "set", &lan.tap, "down"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lan.host.ip(&["link", "set", &lan.tap, "up"]).unwrap();
    let line = vm.wait_line("remora-guest: sink port=5001", Duration::from_secs(90));
    let want = sender.join().unwrap().expect("client stream");
    vm.signal(libc::SIGTERM);
    let run = vm.finish(Duration::from_secs(10));
    run.check(
        run.status.success(),
        "the VMM did not keep running through the TAP flap",
    );
    let (_, line) = line.unwrap_or_else(|| panic!("stream never completed\n{}{}", run.stdout(), run.stderr));
    assert!(line.contains(&format!("bytes={TOTAL} ")), "{line}");
    assert!(
        line.ends_with(&format!("sha256={want}")),
        "stream corrupted: {line} vs {want}"
    );
}
