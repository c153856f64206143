//! `remora-racc`: RACC, remora's replication-aware TCP congestion control
//! for Linux guests, and its loader.
//!
//! The congestion control is a BPF `tcp_congestion_ops` (struct_ops) named
//! [`NAME`], compiled from `bpf/racc.bpf.c` at build time and loaded into
//! the running kernel with libbpf: no kernel module. A cgroup `sock_ops`
//! program beside it watches for remora's mark ([`MARK`], a TCP option the
//! speculative engine puts on the ACKs it builds). A socket whose ACKs carry
//! the mark fills the window the VMM advertises and never backs off; any
//! other socket is the kernel's CUBIC. The crate's README.md says why.
//!
//! [`install`] registers both and pins them under [`PIN_DIR`] (so they
//! outlive the process), [`remove`] unpins them, [`status`] reports.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libbpf_rs::{MapCore, MapFlags, MapHandle, ObjectBuilder, PrintLevel};
use tracing::{debug, info};

/// The congestion control's name (`sysctl net.ipv4.tcp_congestion_control`,
/// `ip route ... congctl`, `TCP_CONGESTION`).
pub const NAME: &str = "remora_racc";

/// remora's mark on speculative ACKs: an RFC 6994 experimental TCP option
/// (kind 253, length 4, ExID 0x524d, "RM"). Must equal
/// `remora_speculate::wire::RACC_MARK`.
pub const MARK: [u8; 4] = [253, 4, 0x52, 0x4d];

/// Where the links and the statistics map are pinned (bpffs).
pub const PIN_DIR: &str = "/sys/fs/bpf/remora_racc";

const BPFFS: &str = "/sys/fs/bpf";
const AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
const DEFAULT: &str = "/proc/sys/net/ipv4/tcp_congestion_control";
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/racc.bpf.o"));

/// What went wrong, each with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaccError {
    #[error("RACC needs root (CAP_BPF and CAP_NET_ADMIN) to load BPF programs; run as root")]
    NotRoot,
    #[error("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): RACC needs a kernel built with CONFIG_DEBUG_INFO_BTF (5.13 or later with BPF struct_ops)")]
    NoBtf,
    #[error("no cgroup v2 hierarchy is mounted (needed for RACC's sock_ops program); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NoCgroup2,
    #[error("cannot mount bpffs at {BPFFS}: {0}")]
    Bpffs(String),
    #[error("a congestion control named {NAME} is registered, but not by remora (nothing pinned at {PIN_DIR}); remove it first")]
    NameTaken,
    #[error("{NAME} is installed, but its pins ({PIN_DIR}) are not visible here (another mount namespace, e.g. `ip netns exec`); run remove where bpffs shows them")]
    PinsHidden,
    #[error("the kernel refused RACC's BPF programs ({step}): {error}{}", libbpf_log(.log))]
    Load {
        step: &'static str,
        /// libbpf's error.
        error: String,
        log: String,
    },
    #[error("{sockets} socket(s) in this network namespace still use {NAME}; close them, or remove with --force (they keep RACC until they close)")]
    InUse { sockets: usize },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn libbpf_log(log: &str) -> String {
    if log.trim().is_empty() {
        String::new()
    } else {
        format!("\nlibbpf said:\n{}", log.trim_end())
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RaccError {
    let what = what.into();
    move |source| RaccError::Io { what, source }
}

/// Options of [`install`].
#[derive(Clone, Debug, Default)]
pub struct InstallOptions {
    /// Also make RACC the default congestion control of this network
    /// namespace (`net.ipv4.tcp_congestion_control`).
    pub make_default: bool,
}

/// The result of [`install`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// Registered now.
    Now,
    /// It was installed already (nothing loaded twice).
    Already,
}

/// The result of [`remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removed {
    /// Unregistered now.
    Now,
    /// It was not installed.
    NotInstalled,
}

/// RACC's counters (all CPUs, since it was installed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Sockets that started with RACC.
    pub sockets: u64,
    /// Segments that carried remora's mark.
    pub marked_segments: u64,
    /// Times a window was opened to the VMM's advertised window.
    pub windows_filled: u64,
    /// Back-offs refused because the VMM owns delivery.
    pub backoffs_refused: u64,
    /// Times a socket fell back from VMM behaviour to CUBIC.
    pub fallbacks: u64,
}

/// What [`status`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Listed in `tcp_available_congestion_control`.
    pub registered: bool,
    /// Installed by remora (its struct_ops loaded, links pinned under
    /// [`PIN_DIR`]).
    pub pinned: bool,
    /// This network namespace's default congestion control.
    pub default_cc: String,
    /// Sockets of this network namespace using RACC (from `ss`), if known.
    pub sockets: Option<usize>,
    /// Counters, if installed by remora.
    pub counters: Option<Counters>,
}

fn read_trim(path: &str) -> Result<String, RaccError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err(format!("reading {path}")))
}

/// True if [`NAME`] is a registered congestion control.
pub fn registered() -> Result<bool, RaccError> {
    Ok(read_trim(AVAILABLE)?.split_whitespace().any(|c| c == NAME))
}

fn pin(name: &str) -> PathBuf {
    Path::new(PIN_DIR).join(name)
}

fn pinned() -> bool {
    pin("cc").exists()
}

/// RACC's struct_ops map is loaded (seen from any mount namespace: `ip
/// netns exec` hides the host's bpffs and so the pins).
fn ours_loaded() -> bool {
    libbpf_rs::query::MapInfoIter::default()
        .any(|m| m.ty == libbpf_rs::MapType::StructOps && m.name.as_encoded_bytes() == b"racc")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Mount points of a filesystem type, from /proc/self/mounts.
fn mounts_of(fstype: &str) -> Result<Vec<PathBuf>, RaccError> {
    let m = fs::read_to_string("/proc/self/mounts").map_err(io_err("reading /proc/self/mounts"))?;
    Ok(m.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (_, at, ty) = (it.next()?, it.next()?, it.next()?);
            (ty == fstype).then(|| PathBuf::from(at.replace("\\040", " ")))
        })
        .collect())
}

fn ensure_bpffs() -> Result<(), RaccError> {
    if mounts_of("bpf")?.iter().any(|p| p == Path::new(BPFFS)) {
        return Ok(());
    }
    info!("mounting bpffs at {BPFFS}");
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(|e| RaccError::Bpffs(e.to_string()))?;
    if !out.status.success() {
        return Err(RaccError::Bpffs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// libbpf's messages during one load (for the error).
static LOG: Mutex<String> = Mutex::new(String::new());

fn collect_log(level: PrintLevel, msg: String) {
    if matches!(level, PrintLevel::Debug) {
        return;
    }
    if let Ok(mut l) = LOG.lock() {
        // Keep the tail: the verifier's last lines say what failed.
        if l.len() > 16 << 10 {
            let cut = l.len() - (8 << 10);
            let cut = (cut..l.len()).find(|&i| l.is_char_boundary(i)).unwrap_or(l.len());
            l.drain(..cut);
        }
        l.push_str(&msg);
    }
}

fn take_log() -> String {
    LOG.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default()
}

fn load_err(step: &'static str) -> impl FnOnce(libbpf_rs::Error) -> RaccError {
    move |e| RaccError::Load {
        step,
        error: e.to_string(),
        log: take_log(),
    }
}

/// Registers RACC (idempotent): loads the BPF object, registers the
/// congestion control, attaches the sock_ops program to the cgroup v2
/// root, pins both links and the counters under [`PIN_DIR`].
pub fn install(opts: &InstallOptions) -> Result<Installed, RaccError> {
    if !is_root() {
        return Err(RaccError::NotRoot);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(RaccError::NoBtf);
    }
    let result = if registered()? {
        if !pinned() && !ours_loaded() {
            return Err(RaccError::NameTaken);
        }
        Installed::Already
    } else {
        load_and_pin()?;
        Installed::Now
    };
    if let Err(e) = allow() {
        debug!("{e}");
    }
    if opts.make_default {
        set_default(NAME)?;
    }
    Ok(result)
}

fn load_and_pin() -> Result<(), RaccError> {
    ensure_bpffs()?;
    let cgroup = mounts_of("cgroup2")?.into_iter().next().ok_or(RaccError::NoCgroup2)?;
    // Pins of an earlier install whose links are gone (a half-done remove).
    let _ = fs::remove_dir_all(PIN_DIR);
    fs::create_dir_all(PIN_DIR).map_err(io_err(format!("creating {PIN_DIR}")))?;
    take_log();
    libbpf_rs::set_print(Some((PrintLevel::Info, collect_log)));
    let r = (|| {
        let open = ObjectBuilder::default()
            .open_memory(OBJECT)
            .map_err(load_err("opening the object"))?;
        let mut obj = open.load().map_err(load_err("loading the programs"))?;
        let cg = fs::File::open(&cgroup).map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
        let mut sockops = None;
        for p in obj.progs_mut() {
            if p.name() == "racc_sockops" {
                sockops = Some(
                    p.attach_cgroup(cg.as_raw_fd())
                        .map_err(load_err("attaching sock_ops to the cgroup"))?,
                );
            }
        }
        let mut sockops = sockops.ok_or_else(|| RaccError::Load {
            step: "finding racc_sockops",
            error: "the object has no program racc_sockops".into(),
            log: String::new(),
        })?;
        sockops
            .pin(pin("sockops"))
            .map_err(load_err("pinning the sock_ops link"))?;
        for mut m in obj.maps_mut() {
            if m.name() == "racc_stats" {
                m.pin(pin("stats")).map_err(load_err("pinning the counters"))?;
            }
        }
        for mut m in obj.maps_mut() {
            if m.name() == "racc" {
                let mut link = m
                    .attach_struct_ops()
                    .map_err(load_err("registering tcp_congestion_ops"))?;
                link.pin(pin("cc"))
                    .map_err(load_err("pinning the congestion control link"))?;
            }
        }
        Ok(())
    })();
    libbpf_rs::set_print(None);
    if r.is_err() {
        let _ = fs::remove_dir_all(PIN_DIR);
    } else {
        info!(cgroup = %cgroup.display(), "{NAME} registered, pinned at {PIN_DIR}");
    }
    r
}

/// Adds RACC to the host-wide allowed list: unprivileged sockets may
/// choose it, and network namespaces other than the host's may make it
/// their default. Only the host's namespace can write the list.
fn allow() -> Result<(), RaccError> {
    let allowed = read_trim(ALLOWED)?;
    if allowed.split_whitespace().any(|c| c == NAME) {
        return Ok(());
    }
    fs::write(ALLOWED, format!("{allowed} {NAME}")).map_err(io_err(format!(
        "adding {NAME} to {ALLOWED} (needed before a network namespace other than the host's can make it its default: \
         run `remora racc install` in the host's namespace first)"
    )))
}

fn set_default(cc: &str) -> Result<(), RaccError> {
    if cc == NAME {
        allow()?;
    }
    fs::write(DEFAULT, cc).map_err(io_err(format!("setting {DEFAULT} to {cc}")))
}

/// Sockets of this network namespace whose congestion control is RACC
/// (from `ss -tin`); `None` if `ss` cannot be run.
pub fn sockets_using() -> Option<usize> {
    let out = Command::new("ss").args(["-tinH"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == NAME))
            .count(),
    )
}

/// Unregisters RACC. Refuses while sockets of this namespace use it unless
/// `force` (they keep it until they close). The default congestion control
/// goes back to cubic if it was RACC.
pub fn remove(force: bool) -> Result<Removed, RaccError> {
    if !is_root() {
        return Err(RaccError::NotRoot);
    }
    if !pinned() {
        if registered()? {
            if ours_loaded() {
                return Err(RaccError::PinsHidden);
            }
            return Err(RaccError::NameTaken);
        }
        let _ = fs::remove_dir_all(PIN_DIR);
        return Ok(Removed::NotInstalled);
    }
    if let Some(n) = sockets_using().filter(|&n| n > 0) {
        if !force {
            return Err(RaccError::InUse { sockets: n });
        }
    }
    if read_trim(DEFAULT)? == NAME {
        set_default("cubic")?;
    }
    // Unpinning drops the last reference to each link: the kernel detaches
    // the sock_ops program and unregisters the congestion control.
    for p in ["sockops", "cc", "stats"] {
        match fs::remove_file(pin(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("unpinning {}", pin(p).display()))(e)),
        }
    }
    let _ = fs::remove_dir(PIN_DIR);
    // Link release is asynchronous (RCU); wait until the name is gone.
    let t0 = Instant::now();
    while registered()? && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    debug!(after = ?t0.elapsed(), "{NAME} unregistered");
    Ok(Removed::Now)
}

fn counters() -> Option<Counters> {
    let map = MapHandle::from_pinned_path(pin("stats")).ok()?;
    let get = |i: u32| -> u64 {
        map.lookup_percpu(&i.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .map(|cpus| {
                cpus.iter()
                    .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes))
                    .sum()
            })
            .unwrap_or(0)
    };
    Some(Counters {
        sockets: get(0),
        marked_segments: get(1),
        windows_filled: get(2),
        backoffs_refused: get(3),
        fallbacks: get(4),
    })
}

/// Whether RACC is installed, the default congestion control, the sockets
/// using it and its counters.
pub fn status() -> Result<Status, RaccError> {
    let pinned = pinned() || ours_loaded();
    Ok(Status {
        registered: registered()?,
        pinned,
        default_cc: read_trim(DEFAULT)?,
        sockets: sockets_using(),
        counters: if pinned { counters() } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_is_a_bpf_elf_with_the_congestion_control() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // e_machine EM_BPF (247), little endian.
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
        let has = |s: &[u8]| OBJECT.windows(s.len()).any(|w| w == s);
        assert!(has(b".struct_ops.link"));
        assert!(has(NAME.as_bytes()));
        assert!(has(b"racc_sockops"));
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = RaccError::InUse { sockets: 3 }.to_string();
        assert!(e.contains("3 socket(s)") && e.contains("--force"), "{e}");
        assert!(RaccError::NoBtf.to_string().contains("CONFIG_DEBUG_INFO_BTF"));
    }
}
