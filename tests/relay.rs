//! End-to-end tests of `remora relay`: real Linux TCP between a server
//! namespace (the protected "guest", inner side) and a client namespace
//! (the peer, outer side) through the relay process bridging two TAPs in
//! its own namespace (remora-netlab's RelayLan), optionally behind a shaped
//! WAN namespace (BPF loss, the userspace link emulator).
//!
//! Every stream is a deterministic pattern whose SHA-256 the sender
//! computes while writing and the receiver while reading; both must match,
//! as must the lengths.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::relay::{kv, kv_req, Relay, Stopped, BUDGET};
use common::{hex, recv_stream, send_stream, splitmix_stream_sha};
use remora_netlab::emu::LinkProfile;
use remora_netlab::{RelayLan, Shaping};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// No single blocking socket call may take longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Streams

/// A listening socket in the server namespace.
fn listen(lan: &RelayLan, port: u16) -> TcpListener {
    lan.server
        .spawn_thread(move || TcpListener::bind(("0.0.0.0", port)))
        .join()
        .unwrap()
        .expect("listen in the server namespace")
}

fn accept(l: &TcpListener) -> TcpStream {
    let (s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// A connection from the client namespace to the server's `port`.
fn connect(lan: &RelayLan, port: u16) -> TcpStream {
    let ip = lan.server_ip;
    let s = lan
        .client
        .spawn_thread(move || {
            TcpStream::connect_timeout(
                &(ip.parse::<std::net::Ipv4Addr>().unwrap(), port).into(),
                Duration::from_secs(10),
            )
        })
        .join()
        .unwrap()
        .expect("connect from the client namespace through the relay");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Result of one side of a transfer: SHA of what it sent, bytes and SHA of
/// what it received.
struct Side {
    sent: String,
    got_len: u64,
    got: String,
}

/// Sends `down` bytes server -> client and `up` bytes client -> server at
/// the same time on one connection; both sides check the streams.
fn transfer(lan: &RelayLan, port: u16, seed: u64, down: u64, up: u64) -> JoinHandle<()> {
    let l = listen(lan, port);
    let srv = std::thread::spawn(move || {
        let s = Arc::new(accept(&l));
        side(s, seed * 2, down)
    });
    let cli = connect(lan, port);
    std::thread::spawn(move || {
        let c = side(Arc::new(cli), seed * 2 + 1, up);
        let s = srv.join().expect("server side panicked");
        assert_eq!(
            (s.got_len, c.got_len),
            (up, down),
            "flow {seed}: bytes received (server, client)"
        );
        assert_eq!(c.got, s.sent, "flow {seed}: server -> client stream differs");
        assert_eq!(s.got, c.sent, "flow {seed}: client -> server stream differs");
    })
}

fn side(s: Arc<TcpStream>, seed: u64, len: u64) -> Side {
    let w = s.clone();
    let writer = std::thread::spawn(move || send_stream(&w, seed, len, None).expect("send"));
    let (got_len, got) = recv_stream(&s, None).expect("receive");
    let sent = writer.join().expect("writer panicked");
    Side { sent, got_len, got }
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 * 8.0 / t.as_secs_f64() / 1e9
}

/// Runs `down` + `up` bytes through a relay in `mode` on `lan`; returns
/// the relay's exit.
fn bulk(lan: &RelayLan, mode: &str, down: u64, up: u64) -> Stopped {
    let relay = Relay::start(lan, mode, &[]);
    let t0 = Instant::now();
    transfer(lan, 5001, 1, down, up).join().expect("transfer");
    let t = t0.elapsed();
    eprintln!(
        "{mode}: {} MiB down + {} MiB up in {t:.2?} ({:.2} Gbit/s total)",
        down / MIB,
        up / MIB,
        gbps(down + up, t)
    );
    relay.stop()
}

// ---------------------------------------------------------------------------
// Tests

/// Bad usage: exactly one `remora: error:` line, exit 2 (usage) or 1, no panic.
#[test]
fn bad_arguments_give_one_error_line() {
    let t = Duration::from_secs(20);
    let long = "x".repeat(20);
    let cases: [(&[&str], &[i32]); 5] = [
        (&["relay", "--inner-tap", "a"], &[2]),
        (
            &["relay", "--inner-tap", "a", "--outer-tap", "b", "--mode", "bogus"],
            &[2],
        ),
        (
            &["relay", "--inner-tap", "a", "--outer-tap", "b", "--budget", "lots"],
            &[2],
        ),
        (
            &["relay", "--inner-tap", "a", "--outer-tap", "b", "--epoch-ms", "-5"],
            &[2],
        ),
        (&["relay", "--inner-tap", &long, "--outer-tap", "b"], &[1, 2]),
    ];
    for (args, codes) in cases {
        let run = common::run_remora(args, t);
        let what = format!("remora {}", args.join(" "));
        run.check(!run.timed_out, &format!("{what}: hung"));
        run.check(!run.stderr.contains("panicked"), &format!("{what}: panicked"));
        run.check(
            run.status.code().is_some_and(|c| codes.contains(&c)),
            &format!("{what}: exit code should be one of {codes:?}"),
        );
        run.check(
            run.error_lines().len() == 1,
            &format!("{what}: expected one error line"),
        );
        run.check(
            !run.stdout().contains("remora relay: ready"),
            &format!("{what}: relay started anyway"),
        );
    }
}

/// 256 MiB each way at once through a speculating relay, exact; the relay
/// really held (speculated) data.
#[test]
fn speculative_256_mib_each_way() {
    let lan = RelayLan::new("rs", None).expect("namespaces (run as root)");
    let s = bulk(&lan, "speculative", 256 * MIB, 256 * MIB);
    let sum = s.summary();
    assert!(
        kv_req(sum, "max_held") >= 256 << 10,
        "speculative relay never held data: {sum}"
    );
    assert!(
        kv_req(sum, "max_held") <= BUDGET + (256 << 10),
        "held beyond the budget: {sum}"
    );
}

/// Direct and buffered modes carry 256 MiB server -> client exact, and
/// hold no speculated data.
#[test]
fn direct_and_buffered_256_mib_down() {
    let lan = RelayLan::new("rd", None).expect("namespaces (run as root)");
    for mode in ["direct", "buffered"] {
        let s = bulk(&lan, mode, 256 * MIB, 0);
        let sum = s.summary();
        assert_eq!(kv(sum, "spec"), Some(0), "{mode} speculated: {sum}");
    }
}

/// 1% random loss toward the client: the relay's retransmissions (it owns
/// the delivery of what it acknowledged) keep both streams exact.
#[test]
fn exact_under_one_percent_loss_toward_client() {
    let lan = RelayLan::new("rl", Some(Shaping::default().loss_to_client(1.0))).expect("namespaces (run as root)");
    let s = bulk(&lan, "speculative", 256 * MIB, 256 * MIB);
    let sum = s.summary();
    assert!(
        kv_req(sum, "retx") > 0,
        "loss toward the client but no retransmission by the relay: {sum}"
    );
}

/// 5 ms each way with 1% of the frames overtaking the others on the WAN:
/// both streams exact.
#[test]
fn exact_under_reordering_and_delay() {
    let p = LinkProfile {
        delay: Duration::from_millis(5),
        // 1% of the frames overtake the 5 ms queue (netem-style);
        // per-frame jitter is the next test.
        reorder: 0.01,
        ..Default::default()
    };
    let shaping = Shaping {
        to_client: p,
        to_relay: p,
        ..Shaping::default()
    };
    let lan = RelayLan::new("ro", Some(shaping)).expect("namespaces (run as root)");
    let s = bulk(&lan, "speculative", 256 * MIB, 256 * MIB);
    let emu = lan.emulator.as_ref().expect("link emulator");
    let reordered = emu.counters[0].reordered.load(Ordering::Relaxed);
    // 1% of the frames; fewer frames (larger GSO batches) on a loaded host.
    assert!(reordered > 20, "the emulator reordered only {reordered} frames");
    assert!(
        kv_req(s.summary(), "max_held") > 0,
        "relay never speculated: {}",
        s.summary()
    );
}

/// 32 concurrent flows, 4 MiB each way each, all exact.
/// Per-frame jitter (4.5 ms + uniform 0..1 ms each way: 5 ms +- 0.5 ms,
/// frames overtake each other all the time) and 1% duplication, both
/// ways: streams exact, and reordering is not mistaken for loss for long
/// (recoveries it causes are undone; before the engine could tell, this
/// transfer spent minutes in spurious recoveries).
#[test]
fn exact_under_per_frame_jitter_and_duplication() {
    let p = LinkProfile {
        delay: Duration::from_micros(4500),
        jitter: Duration::from_millis(1),
        duplicate: 0.01,
        ..Default::default()
    };
    let shaping = Shaping {
        to_client: p,
        to_relay: p,
        ..Shaping::default()
    };
    let lan = RelayLan::new("rj", Some(shaping)).expect("namespaces (run as root)");
    let t0 = Instant::now();
    let s = bulk(&lan, "speculative", 64 * MIB, 16 * MIB);
    let summary = s.summary();
    eprintln!("jitter: {:.1?}: {summary}", t0.elapsed());
    assert!(kv_req(summary, "max_held") > 0, "relay never speculated: {summary}");
    let (rec, undone) = (kv_req(summary, "fast_rec"), kv_req(summary, "undone"));
    assert!(
        rec <= 2 * undone + 10,
        "{rec} fast recoveries, only {undone} undone: reordering taken for loss ({summary})"
    );
}

#[test]
fn thirty_two_concurrent_flows() {
    let lan = RelayLan::new("rf", None).expect("namespaces (run as root)");
    let relay = Relay::start(&lan, "speculative", &[]);
    let flows: Vec<_> = (0..32u16)
        .map(|i| transfer(&lan, 6000 + i, u64::from(i) + 10, 4 * MIB, 4 * MIB))
        .collect();
    let mut failed = Vec::new();
    for (i, f) in flows.into_iter().enumerate() {
        if f.join().is_err() {
            failed.push(i);
        }
    }
    let s = relay.stop();
    assert!(failed.is_empty(), "flows {failed:?} failed\n{}", s.dump());
}

/// Reads until EOF or error, returning the bytes or the error kind.
fn read_all(mut s: &TcpStream) -> Result<Vec<u8>, (ErrorKind, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) => return Err((e.kind(), got)),
        }
    }
}

/// Closes `s` with a reset (SO_LINGER 0).
fn reset(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads a struct linger from a live local.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(s);
}

/// Writes `data` to `s` from a new thread, then calls `then` there.
fn write_then(
    s: TcpStream,
    data: Vec<u8>,
    then: impl FnOnce(&TcpStream) + Send + 'static,
) -> (TcpStream, JoinHandle<()>) {
    let w = s.try_clone().expect("clone socket");
    let t = std::thread::spawn(move || {
        (&w).write_all(&data).expect("write");
        then(&w);
    });
    (s, t)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// FIN and RST from either side reach the other end as EOF resp.
/// ECONNRESET after the data; the flows leave the speculated set, nothing
/// stays held, and a new connection still works.
#[test]
fn close_by_fin_and_rst_from_either_side() {
    let lan = RelayLan::new("rc", None).expect("namespaces (run as root)");
    let mut relay = Relay::start(&lan, "speculative", &[]);
    let l = listen(&lan, 5002);
    let data = pattern(1 << 20, 7);

    // Server FIN: the client reads all, then EOF.
    let c = connect(&lan, 5002);
    let s = accept(&l);
    (&s).write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(
        read_all(&c).expect("client read after server FIN") == data,
        "server FIN: data differs"
    );
    drop(c);
    assert!(read_all(&s).expect("server read after both FINs").is_empty());
    drop(s);

    // Client FIN: the server reads all, then EOF.
    let c = connect(&lan, 5002);
    let s = accept(&l);
    // Nobody reads yet and the server's window is small: write from a thread.
    let (c, w) = write_then(c, data.clone(), |c| c.shutdown(Shutdown::Write).unwrap());
    assert!(
        read_all(&s).expect("server read after client FIN") == data,
        "client FIN: data differs"
    );
    drop(s);
    w.join().expect("client writer");
    assert!(read_all(&c).expect("client read after both FINs").is_empty());
    drop(c);

    // Server RST: the client has the data, then ECONNRESET.
    let c = connect(&lan, 5002);
    let s = accept(&l);
    (&s).write_all(&data).unwrap();
    let mut got = vec![0u8; data.len()];
    (&c).read_exact(&mut got).expect("client read before the server's RST");
    assert!(got == data, "server RST: data differs");
    reset(s);
    match read_all(&c) {
        Err((ErrorKind::ConnectionReset, rest)) if rest.is_empty() => {}
        other => panic!(
            "client after the server's RST: {:?}",
            other.map(|v| v.len()).map_err(|e| e.0)
        ),
    }
    drop(c);

    // Client RST: the server has the data, then ECONNRESET.
    let c = connect(&lan, 5002);
    let s = accept(&l);
    let (c, w) = write_then(c, data.clone(), |_| {});
    let mut got = vec![0u8; data.len()];
    (&s).read_exact(&mut got).expect("server read before the client's RST");
    w.join().expect("client writer");
    assert!(got == data, "client RST: data differs");
    reset(c);
    match read_all(&s) {
        Err((ErrorKind::ConnectionReset, rest)) if rest.is_empty() => {}
        other => panic!(
            "server after the client's RST: {:?}",
            other.map(|v| v.len()).map_err(|e| e.0)
        ),
    }
    drop(s);

    // The four flows leave the speculated set and nothing stays held.
    let from = relay.line_count();
    let quiet = relay.wait_line(
        from,
        |l| l.starts_with("remora relay: stats") && kv(l, "spec") == Some(0) && kv(l, "held") == Some(0),
        Duration::from_secs(10),
    );
    // A new connection still works, and is speculated while open.
    let c = connect(&lan, 5002);
    let s = accept(&l);
    (&s).write_all(&data).unwrap();
    let mut got = vec![0u8; data.len()];
    (&c).read_exact(&mut got).expect("new connection after the closes");
    let from = relay.line_count();
    let spec = relay.wait_line(
        from,
        |l| l.starts_with("remora relay: stats") && kv(l, "spec").is_some_and(|n| n >= 1),
        Duration::from_secs(5),
    );
    drop((c, s));
    let st = relay.stop();
    assert!(got == data, "new connection: data differs");
    assert!(
        quiet.is_some(),
        "closed flows still speculated or holding bytes 10 s later\n{}",
        st.dump()
    );
    assert!(spec.is_some(), "the new connection was not speculated\n{}", st.dump());
}

/// A relay that starts while a stream is in flight (relay #1 stopped
/// mid-stream, relay #2 started on the same persistent TAPs) carries it to
/// an exact end, and still speculates new flows.
#[test]
fn joins_a_flow_mid_stream() {
    let lan = RelayLan::new("rj", None).expect("namespaces (run as root)");
    let relay1 = Relay::start(&lan, "direct", &[]);
    let (down, up) = (96 * MIB, 16 * MIB);
    let l = listen(&lan, 5003);
    let got = Arc::new(AtomicU64::new(0));
    let srv = std::thread::spawn(move || {
        let s = accept(&l);
        let sent = send_stream(&s, 40, down, None).expect("server send");
        let (n, sha) = recv_stream(&s, None).expect("server receive");
        (sent, n, sha)
    });
    let c = connect(&lan, 5003);
    let g = got.clone();
    let cli = std::thread::spawn(move || {
        let r = recv_stream(&c, Some(&g)).expect("client receive");
        let sent = send_stream(&c, 41, up, None).expect("client send");
        (r, sent)
    });
    let t0 = Instant::now();
    while got.load(Ordering::Relaxed) < 24 * MIB {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "stream too slow through relay #1"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    relay1.stop();
    std::thread::sleep(Duration::from_millis(500));
    let p1 = got.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    let p2 = got.load(Ordering::Relaxed);
    assert_eq!(p1, p2, "bytes kept arriving without a relay");
    assert!(p2 < down, "the stream ended before relay #1 stopped");
    let relay2 = Relay::start(&lan, "speculative", &[]);
    let ((n, sha), up_sent) = cli.join().expect("client");
    let (down_sent, up_n, up_sha) = srv.join().expect("server");
    assert_eq!((n, up_n), (down, up), "bytes received (client, server)");
    assert_eq!(sha, down_sent, "server -> client stream differs");
    assert_eq!(up_sha, up_sent, "client -> server stream differs");
    // A new flow, seen from its SYN by relay #2, is speculated.
    transfer(&lan, 5004, 3, 32 * MIB, 0)
        .join()
        .expect("new flow through relay #2");
    let st = relay2.stop();
    assert!(
        kv_req(st.summary(), "max_held") > 0,
        "relay #2 did not speculate a new flow: {}",
        st.summary()
    );
    eprintln!("joined at {} MiB of {} MiB", p2 / MIB, down / MIB);
}

/// A peer that stops reading: the relay holds at most its budget, its
/// memory stays bounded and the server is held back; when the peer reads
/// again, the stream completes exact.
#[test]
fn stalled_reader_keeps_relay_memory_bounded() {
    let lan = RelayLan::new("rm", None).expect("namespaces (run as root)");
    let relay = Relay::start(&lan, "speculative", &[]);
    let rss0 = relay.rss_kib();
    assert!(rss0 > 0, "cannot read the relay's VmRSS");
    let total = 256 * MIB;
    let l = listen(&lan, 5005);
    let sent = Arc::new(AtomicU64::new(0));
    let s2 = sent.clone();
    let srv = std::thread::spawn(move || {
        let s = accept(&l);
        send_stream(&s, 50, total, Some(&s2)).expect("server send")
    });
    let c = connect(&lan, 5005);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    (&c).read_exact(&mut buf).expect("first MiB");
    h.update(&buf);
    // Stop reading for 5 s, watching the relay's memory.
    let t0 = Instant::now();
    let mut rss_max = 0;
    while t0.elapsed() < Duration::from_secs(5) {
        rss_max = rss_max.max(relay.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent_stalled = sent.load(Ordering::Relaxed);
    let mut n = MIB;
    loop {
        match (&c).read(&mut buf).expect("read after the stall") {
            0 => break,
            k => {
                h.update(&buf[..k]);
                n += k as u64;
            }
        }
    }
    let want = srv.join().expect("server");
    let st = relay.stop();
    let sum = st.summary();
    eprintln!(
        "stall: server wrote {} MiB, relay VmRSS {} -> {} KiB",
        sent_stalled / MIB,
        rss0,
        rss_max
    );
    assert_eq!(n, total, "bytes received");
    assert_eq!(hex(&h.finalize()), want, "stream differs");
    let max_held = kv_req(sum, "max_held");
    assert!(
        max_held <= BUDGET + (256 << 10),
        "held {max_held} > budget {BUDGET}: {sum}"
    );
    assert!(
        max_held >= MIB,
        "the relay held only {max_held} bytes: was it speculating? {sum}"
    );
    // Client receive buffer (<= 6 MiB) + budget + server send buffer (<= 4 MiB)
    // and slack: far below the 256 MiB the server would write unchecked.
    assert!(
        sent_stalled <= 32 * MIB,
        "server wrote {} MiB into a stalled path",
        sent_stalled / MIB
    );
    assert!(
        rss_max <= rss0 + 64 * 1024,
        "relay VmRSS grew from {rss0} to {rss_max} KiB while the peer did not read"
    );
    // The sender hashed what it wrote; the pattern is what it should be.
    assert_eq!(splitmix_stream_sha(50 << 40, total), want);
}
