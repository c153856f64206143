//! The VM keeps running, and a TCP stream into it completes intact, when
//! its TAP goes down for a while and comes back.

mod common;

use common::*;
use remora_netlab::{VmLan, GUEST_IP};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const TOTAL: usize = 64 << 20;

#[test]
fn stream_survives_tap_down_and_up() {
    require_kvm();
    let lan = VmLan::new("tf").expect("namespaces");
    let mut vm = boot_on_lan(&lan, Vmm::Remora, "sink:5001", 2);
    let sender = lan.client.spawn_thread(|| {
        let mut c = TcpStream::connect((GUEST_IP, 5001))?;
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 256 << 10];
        for i in 0..TOTAL / chunk.len() {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 13 + j * 5) as u8;
            }
            c.write_all(&chunk)?;
            h.update(&chunk);
            std::thread::sleep(Duration::from_millis(6));
        }
        c.shutdown(std::net::Shutdown::Write)?;
        let _ = c.read_to_end(&mut Vec::new());
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>())
    });
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
