//! Checkpoint benchmark: a 512 MiB, 2-vCPU test guest takes a base and
//! 100 incremental snapshots at 25 ms intervals while
//!   (a) a TCP stream from a client namespace runs into its `sink` (twice:
//!       dirty pages copied during the pause, the default, and copied on
//!       write after it, `REMORA_PAUSE_COPY_US=0`), and
//!   (b) its `mem` workload rewrites a region (three region sizes, so the
//!       pause can be fitted against the number of dirty pages).
//! Prints p50/p99/max pause (vCPUs stopped to resumed, as the VMM measures
//! it), dirty pages per epoch, harvest MB/s, the mean of each part of the
//! pause the VMM reports, the stream's rate and the per-page cost, and
//! writes target/bench/snapshot.json. `cargo bench --bench snapshot -- tcp`
//! (or `mem`) runs one half.
//!
//! Run: `scripts/bench.sh snapshot`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use remora_vmm::control::{request, Command as Ctl};

const EPOCHS: usize = 100;
const EPOCH: Duration = Duration::from_millis(25);

#[derive(Default)]
struct Series {
    name: String,
    pause_us: Vec<u64>,
    pages: Vec<u64>,
    /// Parts of the pause the VMM reports (name, value per epoch).
    parts: Vec<(&'static str, Vec<u64>)>,
    /// What the guest got done meanwhile, for the report.
    note: String,
}

/// The parts of a pause (or of the work after it) the VMM's reply may name.
const PARTS: [&str; 7] = [
    "kick_us",
    "state_us",
    "harvest_us",
    "protect_us",
    "copy_us",
    "wp_runs",
    "wp_faults",
];

fn field_opt(reply: &str, key: &str) -> Option<u64> {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

fn field(reply: &str, key: &str) -> u64 {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in '{reply}'"))
}

fn checkpoints(name: &str, sock: &Path, dir: &Path) -> Series {
    let _ = std::fs::remove_dir_all(dir);
    let base = request(
        sock,
        &Ctl::Snapshot {
            dir: dir.into(),
            incremental: false,
        },
    )
    .unwrap();
    assert!(base.starts_with("ok"), "{base}");
    let mut s = Series {
        name: name.into(),
        ..Default::default()
    };
    let mut next = Instant::now() + EPOCH;
    for _ in 0..EPOCHS {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += EPOCH;
        let r = request(
            sock,
            &Ctl::Snapshot {
                dir: dir.into(),
                incremental: true,
            },
        )
        .unwrap();
        assert!(r.starts_with("ok"), "{r}");
        s.pause_us.push(field(&r, "pause_us="));
        s.pages.push(field(&r, "pages="));
        for key in PARTS {
            if let Some(v) = field_opt(&r, key) {
                match s.parts.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, vs)) => vs.push(v),
                    None => s.parts.push((key, vec![v])),
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    s
}

fn pct(v: &[u64], p: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn guest_args<'a>(guest: &'a str, cmdline: &'a str, sock: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--kernel",
        guest,
        "--cmdline",
        cmdline,
        "--vcpus",
        "2",
        "--mem",
        "512",
        "--control",
        sock,
    ]
}

fn tmp(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("remora-bench-snap-{}-{tag}", std::process::id()))
}

/// (a): a TCP stream into the guest's sink while checkpointing, with the
/// VMM's `REMORA_PAUSE_COPY_US` set to `pause_copy` (`all`: every dirty
/// page is copied during the pause; `0`: all are copied on write after it).
fn with_tcp_stream(guest: &str, pause_copy: &str) -> Series {
    use remora_netlab::VmLan;
    let lan = VmLan::new("bs").expect("namespaces (run as root)");
    let (sock, dir) = (tmp("a.sock"), tmp("a"));
    let cmdline = format!("ip={}/24 workload=sink:5000", remora_netlab::GUEST_IP);
    let net = format!("tap={}", lan.tap);
    let mut args = guest_args(guest, &cmdline, sock.to_str().unwrap());
    args.extend_from_slice(&["--net", &net]);
    let mut cmd = lan.host.command(common::remora_bin().to_str().unwrap());
    cmd.args(&args).env("REMORA_PAUSE_COPY_US", pause_copy);
    let mut vm = common::spawn(&mut cmd);
    vm.wait_line("net up", Duration::from_secs(20))
        .expect("guest network up");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = lan.client.spawn_thread(move || {
        let mut c = std::net::TcpStream::connect((remora_netlab::GUEST_IP, 5000))?;
        let buf = vec![0x5au8; 1 << 16];
        let mut sent = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            c.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        Ok(sent)
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let name = match pause_copy {
        "all" => "tcp stream into sink".to_string(),
        "0" => "tcp, copy-on-write".to_string(),
        us => format!("tcp, cow after {us} us"),
    };
    let mut s = checkpoints(&name, &sock, &dir);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap().unwrap_or(0);
    s.note = format!(
        "stream {:.2} Gbit/s over the run, checkpoints included",
        sent as f64 * 8.0 / secs / 1e9
    );
    eprintln!("  ({})", s.note);
    vm.signal(libc::SIGTERM);
    let _ = vm.finish(Duration::from_secs(10));
    s
}

/// (b): the mem workload rewriting `mib` MiB.
fn with_mem(guest: &str, mib: u32) -> Series {
    let (sock, dir) = (tmp(&format!("b{mib}.sock")), tmp(&format!("b{mib}")));
    let cmdline = format!("workload=mem:{mib}");
    let args = guest_args(guest, &cmdline, sock.to_str().unwrap());
    let mut vm = common::spawn_remora(&args);
    vm.wait_line("mem ok", Duration::from_secs(30))
        .expect("mem workload running");
    let s = checkpoints(&format!("mem:{mib}"), &sock, &dir);
    vm.signal(libc::SIGTERM);
    let run = vm.finish(Duration::from_secs(10));
    assert!(
        run.line("MISMATCH").is_none(),
        "mem workload saw corruption: {}",
        run.stdout()
    );
    s
}

fn main() {
    common::require_kvm();
    let guest = common::guest_bin();
    let g = guest.to_str().unwrap();
    // `cargo bench --bench snapshot -- tcp|mem` runs one part only.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |k: &str| only.is_empty() || only.iter().any(|o| o == k);
    let mut all = Vec::new();
    if want("tcp") {
        // The default (every page copied during the pause), then
        // copy-on-write, in the same run.
        all.push(with_tcp_stream(g, "all"));
        all.push(with_tcp_stream(g, "0"));
    }
    if want("mem") {
        for mib in [4, 16, 64] {
            all.push(with_mem(g, mib));
        }
    }
    println!(
        "512 MiB guest, 2 vCPUs, {EPOCHS} incremental checkpoints every {} ms",
        EPOCH.as_millis()
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "load", "p50 us", "p99 us", "max us", "pages/epoch", "harvest MB/s"
    );
    let mut json = Vec::new();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for s in &all {
        let mean_pages = s.pages.iter().sum::<u64>() as f64 / s.pages.len() as f64;
        let total_us: u64 = s.pause_us.iter().sum();
        let mbps = s.pages.iter().sum::<u64>() as f64 * 4096.0 / (total_us as f64 / 1e6) / 1e6;
        println!(
            "{:<22} {:>9} {:>9} {:>9} {:>12.0} {:>12.0}",
            s.name,
            pct(&s.pause_us, 0.5),
            pct(&s.pause_us, 0.99),
            pct(&s.pause_us, 1.0),
            mean_pages,
            mbps
        );
        json.push(format!(
            "{{\"load\":\"{}\",\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"pages_per_epoch\":{mean_pages:.1},\"harvest_mb_s\":{mbps:.1}}}",
            s.name,
            pct(&s.pause_us, 0.5),
            pct(&s.pause_us, 0.99),
            pct(&s.pause_us, 1.0)
        ));
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        let parts: Vec<String> = s
            .parts
            .iter()
            .map(|(k, v)| format!("{}={:.0}", k.trim_end_matches("_us"), mean(v)))
            .collect();
        println!("{:<22}   mean: pause={:.0} {}", "", mean(&s.pause_us), parts.join(" "));
        // The parts that do not scale with dirty pages, as percentiles.
        let spread: Vec<String> = s
            .parts
            .iter()
            .filter(|(k, _)| matches!(*k, "kick_us" | "state_us"))
            .map(|(k, v)| {
                format!(
                    "{} p50/p99/max={}/{}/{}",
                    k.trim_end_matches("_us"),
                    pct(v, 0.5),
                    pct(v, 0.99),
                    pct(v, 1.0)
                )
            })
            .collect();
        println!("{:<22}   {}", "", spread.join(", "));
        if !s.note.is_empty() {
            println!("{:<22}   {}", "", s.note);
        }
        if s.name.starts_with("mem") {
            xs.extend(s.pages.iter().map(|p| *p as f64));
            ys.extend(s.pause_us.iter().map(|p| *p as f64));
        }
    }
    // Least squares: pause = fixed + per_page * pages.
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let per_page = if var > 0.0 { cov / var } else { 0.0 };
    let fixed = my - per_page * mx;
    println!(
        "pause ~= {fixed:.0} us + {:.3} us per dirty page (mem runs, least squares)",
        per_page
    );
    if let Some(tcp) = all.iter().find(|s| s.name.starts_with("tcp stream")) {
        let p99_tcp = pct(&tcp.pause_us, 0.99);
        println!(
            "target p99 <= 2000 us with a TCP stream: {} ({p99_tcp} us)",
            if p99_tcp <= 2000 { "met" } else { "NOT met" }
        );
    }
    let dir = common::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let out = format!(
        "{{\"benchmark\":\"snapshot\",\"epochs\":{EPOCHS},\"epoch_ms\":{},\"series\":[{}],\"fixed_us\":{fixed:.1},\"per_page_us\":{per_page:.4}}}\n",
        EPOCH.as_millis(),
        json.join(",")
    );
    std::fs::write(dir.join("snapshot.json"), out).unwrap();
    println!("wrote {}", dir.join("snapshot.json").display());
}
