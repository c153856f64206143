//! Network benchmark: TCP throughput between a client namespace and the
//! test guest, guest->client and client->guest, 10 s x 3 runs each, under
//! remora and under QEMU microvm (virtio-net-device on the same kind of
//! TAP, vhost=off), with 1 and 2 vCPUs, all in one run. Prints Gbit/s and
//! remora/QEMU ratios and writes target/bench/net.json.
//!
//! Run: `scripts/bench.sh net`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Vmm;
use remora_netlab::{VmLan, GUEST_IP};

const RUN: Duration = Duration::from_secs(10);
const RUNS: usize = 3;

/// Client -> guest sink for RUN; returns Gbit/s.
fn to_guest(lan: &VmLan) -> f64 {
    lan.client
        .spawn_thread(|| {
            let mut s = TcpStream::connect((GUEST_IP, 5001))?;
            let buf = vec![0xa5u8; 1 << 20];
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < RUN {
                s.write_all(&buf)?;
                n += buf.len() as u64;
            }
            let secs = t0.elapsed().as_secs_f64();
            s.shutdown(std::net::Shutdown::Write)?;
            let _ = s.read_to_end(&mut Vec::new());
            Ok(n as f64 * 8.0 / secs / 1e9)
        })
        .join()
        .unwrap()
        .expect("client -> guest")
}

/// Guest source -> client for RUN; returns Gbit/s.
fn from_guest(lan: &VmLan) -> f64 {
    lan.client
        .spawn_thread(|| {
            let mut s = TcpStream::connect((GUEST_IP, 5002))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = vec![0u8; 1 << 20];
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < RUN {
                match s.read(&mut buf)? {
                    0 => break,
                    k => n += k as u64,
                }
            }
            Ok(n as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9)
        })
        .join()
        .unwrap()
        .expect("guest -> client")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    common::require_kvm();
    let mut rows = Vec::new();
    for vcpus in [1u32, 2] {
        for vmm in [Vmm::Remora, Vmm::Qemu] {
            let (mut tx, mut rx) = (Vec::new(), Vec::new());
            for run in 0..RUNS {
                // A fresh LAN and VM per run: no state carried between runs.
                let lan = VmLan::new("bn").expect("namespaces (run as root)");
                let (vm, _) = common::boot_on_lan(&lan, vmm, "sink:5001,source:5002:1000000", vcpus);
                std::thread::sleep(Duration::from_millis(200));
                tx.push(from_guest(&lan));
                std::thread::sleep(Duration::from_millis(200));
                rx.push(to_guest(&lan));
                vm.signal(libc::SIGTERM);
                let _ = vm.finish(Duration::from_secs(10));
                eprintln!(
                    "{vmm:?} {vcpus} vCPU run {}: guest->client {:.2}, client->guest {:.2} Gbit/s",
                    run + 1,
                    tx[run],
                    rx[run]
                );
            }
            rows.push((vcpus, vmm, median(tx), median(rx)));
        }
    }
    println!("TCP, test guest (smoltcp), 10 s x {RUNS} per cell, median Gbit/s");
    println!(
        "{:<6} {:<7} {:>14} {:>14}",
        "vCPUs", "vmm", "guest->client", "client->guest"
    );
    for (v, vmm, tx, rx) in &rows {
        println!("{v:<6} {:<7} {tx:>14.2} {rx:>14.2}", format!("{vmm:?}"));
    }
    let mut json = Vec::new();
    for v in [1u32, 2] {
        let get = |m: Vmm| {
            rows.iter()
                .find(|r| r.0 == v && r.1 == m)
                .map(|r| (r.2, r.3))
                .unwrap_or((0.0, 0.0))
        };
        let (r, q) = (get(Vmm::Remora), get(Vmm::Qemu));
        println!(
            "{v} vCPU: remora/QEMU guest->client {:.2}x, client->guest {:.2}x",
            r.0 / q.0,
            r.1 / q.1
        );
        json.push(format!(
            "{{\"vcpus\":{v},\"remora\":{{\"guest_to_client_gbps\":{:.3},\"client_to_guest_gbps\":{:.3}}},\"qemu\":{{\"guest_to_client_gbps\":{:.3},\"client_to_guest_gbps\":{:.3}}}}}",
            r.0, r.1, q.0, q.1
        ));
    }
    let dir = common::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("net.json"),
        format!(
            "{{\"benchmark\":\"net\",\"run_s\":10,\"runs\":{RUNS},\"rows\":[{}]}}\n",
            json.join(",")
        ),
    )
    .unwrap();
    println!("wrote {}", dir.join("net.json").display());
}
