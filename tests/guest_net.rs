//! End-to-end tests of remora's virtio-net with the test guest's smoltcp
//! workloads (see crates/guest/README.md): ARP and ICMP echo, and 1 GiB TCP
//! transfers in both directions with SHA-256 compared at both ends.
//!
//! Topology (remora-netlab's VmLan): client namespace (eth0 10.0.0.1/24) --
//! veth -- bridge br0 in the host namespace -- TAP tap0 (vnet_hdr) -- remora,
//! which runs inside the host namespace. The guest takes 10.0.0.2/24.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{boot_on_lan, hex, require_kvm, splitmix64, splitmix_stream_sha, Running, Vmm};
use remora_netlab::{VmLan, CLIENT_IP, GUEST_IP};
use sha2::{Digest, Sha256};

const GIB: u64 = 1 << 30;

/// Boots the guest on the LAN under remora and waits for `net up`.
fn boot(lan: &VmLan, workloads: &str) -> (Running, String) {
    boot_on_lan(lan, Vmm::Remora, workloads, 2)
}

/// The same guest under QEMU microvm (the baseline), on the same LAN.
fn boot_qemu(lan: &VmLan, workloads: &str) -> (Running, String) {
    boot_on_lan(lan, Vmm::Qemu, workloads, 2)
}

fn stop(vm: Running) {
    vm.signal(libc::SIGTERM);
    let run = vm.finish(Duration::from_secs(10));
    eprintln!("--- guest console:\n{}", run.stdout());
    assert!(!run.timed_out, "remora did not stop on SIGTERM\n{}", run.stderr);
}

/// Sends one ICMP echo request from an unprivileged ICMP datagram socket
/// (the namespace's ping_group_range allows it) and waits for the reply.
fn icmp_echo(dst: std::net::Ipv4Addr, seq: u16) -> std::io::Result<Duration> {
    // SAFETY: plain socket calls on a descriptor this function owns; every
    // buffer passed is live and of the stated length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut pkt = [0u8; 64];
        pkt[0] = 8; // echo request
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in pkt[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let t0 = Instant::now();
        let n = libc::sendto(
            fd,
            pkt.as_ptr() as *const libc::c_void,
            pkt.len(),
            0,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if n < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        let mut reply = [0u8; 128];
        loop {
            let n = libc::recv(fd, reply.as_mut_ptr() as *mut libc::c_void, reply.len(), 0);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            let n = n as usize;
            if n >= 8 && reply[0] == 0 && reply[6..8] == seq.to_be_bytes() {
                libc::close(fd);
                if reply[8..n] != pkt[8..] {
                    return Err(std::io::Error::other("echo payload differs"));
                }
                return Ok(t0.elapsed());
            }
        }
    }
}

#[test]
fn arp_and_ping() {
    require_kvm();
    let lan = VmLan::new("gp").expect("netlab");
    lan.client
        .exec("sysctl", &["-w", "net.ipv4.ping_group_range=0 2147483647"])
        .expect("sysctl");
    let (mut vm, mac) = boot(&lan, &format!("echo:7,ping:{CLIENT_IP}"));
    let dst: std::net::Ipv4Addr = GUEST_IP.parse().unwrap();
    let rtts = lan
        .client
        .spawn_thread(move || {
            (1..=5)
                .map(|seq| icmp_echo(dst, seq))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .join()
        .unwrap();
    // The client learned the guest's MAC by ARP.
    let neigh = lan.client.ip(&["neigh", "show", GUEST_IP]).expect("ip neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    // TCP echo: a short round trip through the guest.
    let echo = lan
        .client
        .spawn_thread(|| {
            let mut s = TcpStream::connect((GUEST_IP, 7))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let msg: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
            s.write_all(&msg)?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back)?;
            Ok(back == msg)
        })
        .join()
        .unwrap();
    // guest -> client: the guest's `ping:` workload.
    let ping = vm.wait_line("remora-guest: ping ip=", Duration::from_secs(10));
    stop(vm);
    let rtts = rtts.expect("ICMP echo client -> guest");
    eprintln!("client -> guest ping rtts: {rtts:?}");
    let (_, ping) = ping.expect("guest ping summary");
    assert_eq!(ping, format!("remora-guest: ping ip={CLIENT_IP} sent=5 received=5"));
    assert!(
        neigh.contains(&mac),
        "client ARP entry for {GUEST_IP} is {mac}: {neigh}"
    );
    assert!(echo.expect("tcp echo"), "echoed bytes differ");
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or("")
}

/// CPU time (user + system, clock ticks) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

#[test]
fn idle_network_guest_does_not_spin() {
    require_kvm();
    let lan = VmLan::new("gi").expect("netlab");
    let (vm, _) = boot(&lan, "sink:5001,echo:7");
    // Some traffic first, so completed TX entries wait in the used ring
    // (the guest once busy-polled forever when idle after any transmit).
    let echo = lan.client.spawn_thread(|| {
        let mut s = TcpStream::connect((GUEST_IP, 7))?;
        s.write_all(b"hello")?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    });
    assert_eq!(echo.join().unwrap().expect("echo"), b"hello");
    std::thread::sleep(Duration::from_millis(300));
    let pid = vm.child.id();
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    stop(vm);
    // 100 ticks per second is one host CPU; allow 5 %.
    eprintln!("idle guest: {used} ticks of CPU in 2 s");
    assert!(used <= 10, "the idle guest used {used} ticks in 2 s");
}

#[test]
fn tcp_1gib_both_directions() {
    require_kvm();
    let lan = VmLan::new("gt").expect("netlab");
    let (vm, _) = boot(&lan, "sink:5001,source:5002:1024");
    let (rx, tx) = transfer_1gib(&lan, vm);
    eprintln!("remora: client -> guest {rx:.2} Gbit/s, guest -> client {tx:.2} Gbit/s");
}

/// The same transfers with the guest under QEMU microvm (no vhost), for
/// comparison: `cargo nextest run --release -p remora --test guest_net
/// --run-ignored all --no-capture qemu`.
#[test]
#[ignore = "baseline measurement; needs qemu-system-x86_64"]
fn tcp_1gib_both_directions_qemu() {
    require_kvm();
    let lan = VmLan::new("gq").expect("netlab");
    let (vm, _) = boot_qemu(&lan, "sink:5001,source:5002:1024");
    let (rx, tx) = transfer_1gib(&lan, vm);
    eprintln!("qemu: client -> guest {rx:.2} Gbit/s, guest -> client {tx:.2} Gbit/s");
}

/// 1 GiB client -> guest sink, then 1 GiB guest source -> client, with the
/// SHA-256 compared at both ends; stops the VM; returns the throughputs
/// (Gbit/s) as the client saw them.
fn transfer_1gib(lan: &VmLan, mut vm: Running) -> (f64, f64) {
    // client -> guest: 1 GiB into the sink.
    let (chunk, want_sha) = {
        let mut chunk = vec![0u8; 4 << 20];
        for (k, c) in chunk.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&splitmix64(k as u64 ^ 0x5eed).to_le_bytes());
        }
        let mut h = Sha256::new();
        for i in 0..(GIB / chunk.len() as u64) {
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            h.update(&chunk);
        }
        (chunk, hex(&h.finalize()))
    };
    let send = lan.client.spawn_thread(move || {
        let mut chunk = chunk;
        let mut s = TcpStream::connect((GUEST_IP, 5001))?;
        let t0 = Instant::now();
        for i in 0..(GIB / chunk.len() as u64) {
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            s.write_all(&chunk)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(t0.elapsed())
    });
    let line = vm.wait_line("remora-guest: sink port=5001", Duration::from_secs(120));
    let sent = send.join().unwrap();
    let Some((_, line)) = line else {
        stop(vm);
        panic!("no sink line; client: {sent:?}");
    };
    let t = sent.expect("client send");
    let rx_gbps = (GIB * 8) as f64 / t.as_secs_f64() / 1e9;
    eprintln!("client -> guest: 1 GiB in {t:?} = {rx_gbps:.2} Gbit/s; {line}");
    assert_eq!(field(&line, "bytes="), GIB.to_string(), "{line}");
    assert_eq!(field(&line, "sha256="), want_sha, "{line}");

    // The sink takes the next connection.
    let small = lan.client.spawn_thread(|| {
        let mut s = TcpStream::connect((GUEST_IP, 5001))?;
        s.write_all(b"second connection")?;
        s.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(())
    });
    let second = vm.wait_line("remora-guest: sink port=5001 bytes=17 ", Duration::from_secs(10));
    small.join().unwrap().expect("second sink connection");
    let (_, second) = second.expect("second sink line");
    assert_eq!(
        field(&second, "sha256="),
        hex(&Sha256::digest(b"second connection")),
        "{second}"
    );

    // guest -> client: 1 GiB from the source.
    let recv = lan.client.spawn_thread(|| {
        let mut s = TcpStream::connect((GUEST_IP, 5002))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let t0 = Instant::now();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        Ok((t0.elapsed(), n, hex(&h.finalize())))
    });
    let line = vm.wait_line("remora-guest: source port=5002", Duration::from_secs(120));
    let got = recv.join().unwrap();
    stop(vm);
    let (t, n, sha) = got.expect("client receive");
    let tx_gbps = (n * 8) as f64 / t.as_secs_f64() / 1e9;
    eprintln!("guest -> client: {n} bytes in {t:?} = {tx_gbps:.2} Gbit/s");
    let (_, line) = line.expect("source line");
    eprintln!("{line}");
    assert_eq!(n, GIB);
    assert_eq!(field(&line, "bytes="), GIB.to_string(), "{line}");
    assert_eq!(field(&line, "sha256="), sha, "{line}");
    assert_eq!(
        sha,
        splitmix_stream_sha(0, GIB),
        "the stream follows the documented generator"
    );
    (rx_gbps, tx_gbps)
}
