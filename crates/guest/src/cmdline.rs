//! The guest's command line: whitespace-separated `key=value` words.
//!
//! Keys:
//! - `workload=W[,W...]`: what to run, in order, then power off (see
//!   [`Workload`]): `info`, `reboot`, `panic`, `fault`, `compute:N`,
//!   `disk:MIB`, `diskcheck:MIB`, `diskloop:MIB`, `mem:MIB`, `clock`,
//!   `sink:PORT`, `source:PORT:MIB`, `echo:PORT`, `ping:A.B.C.D`.
//!   Default `info`. An unknown name is reported and nothing runs.
//! - `ip=A.B.C.D/P`: the guest's address (for the network workloads to come).
//! - `gw=A.B.C.D`: default gateway (ditto).
//! - `debug` or `debug=1`: print what the guest found (ACPI, memory map, ...).
//!
//! Unknown keys are ignored (a loader may add its own, such as QEMU's
//! `virtio_mmio.device=`).

/// Most workloads in one `workload=` list.
pub const MAX_WORKLOADS: usize = 16;

/// One entry of `workload=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload<'a> {
    /// Print `cpus=N mem_kib=M`.
    Info,
    /// Reset the machine.
    Reboot,
    /// Triple-fault.
    Panic,
    /// Execute `ud2` in ring 3: the shim prints its fault line for #UD
    /// (vector 6) and triple-faults (tests the exception path).
    Fault,
    /// Every CPU runs `iters` iterations of `dec; jnz` in ring 3.
    Compute { iters: u64 },
    /// virtio-blk: write MIB MiB of the disk pattern, flush, read back.
    Disk { mib: u64 },
    /// virtio-blk: read and verify what `disk:MIB` wrote.
    DiskCheck { mib: u64 },
    /// TCP: hash everything received on PORT.
    Sink { port: u16 },
    /// TCP: send MIB MiB of the source stream to each connection on PORT.
    Source { port: u16, mib: u64 },
    /// TCP: echo on PORT.
    Echo { port: u16 },
    /// ICMP echo requests to an address.
    Ping { ip: [u8; 4] },
    /// Memory checker over MIB MiB on every CPU, forever.
    Mem { mib: u64 },
    /// Monotonic clock and timer check, forever.
    Clock,
    /// virtio-blk: write, flush, read back and verify MIB MiB in rounds,
    /// forever.
    DiskLoop { mib: u64 },
    /// Not a workload this guest knows (kept to report it).
    Unknown(&'a str),
}

impl<'a> Workload<'a> {
    fn parse(s: &'a str) -> Self {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        match (name, arg) {
            ("info", None) => Workload::Info,
            ("reboot", None) => Workload::Reboot,
            ("panic", None) => Workload::Panic,
            ("fault", None) => Workload::Fault,
            ("clock", None) => Workload::Clock,
            ("compute", Some(n)) => match parse_u64(n) {
                Some(iters) => Workload::Compute { iters },
                None => Workload::Unknown(s),
            },
            ("disk", Some(n)) => parse_u64(n).map_or(Workload::Unknown(s), |mib| Workload::Disk { mib }),
            ("diskcheck", Some(n)) => parse_u64(n).map_or(Workload::Unknown(s), |mib| Workload::DiskCheck { mib }),
            ("diskloop", Some(n)) => parse_u64(n)
                .filter(|&m| m > 0)
                .map_or(Workload::Unknown(s), |mib| Workload::DiskLoop { mib }),
            ("mem", Some(n)) => parse_u64(n).map_or(Workload::Unknown(s), |mib| Workload::Mem { mib }),
            ("sink", Some(p)) => parse_port(p).map_or(Workload::Unknown(s), |port| Workload::Sink { port }),
            ("ping", Some(a)) => parse_ipv4(a).map_or(Workload::Unknown(s), |ip| Workload::Ping { ip }),
            ("echo", Some(p)) => parse_port(p).map_or(Workload::Unknown(s), |port| Workload::Echo { port }),
            ("source", Some(a)) => match a.split_once(':') {
                Some((p, m)) => match (parse_port(p), parse_u64(m)) {
                    (Some(port), Some(mib)) => Workload::Source { port, mib },
                    _ => Workload::Unknown(s),
                },
                None => Workload::Unknown(s),
            },
            _ => Workload::Unknown(s),
        }
    }
}

/// An IPv4 address with a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: [u8; 4],
    pub prefix: u8,
}

/// A problem with the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<'a> {
    /// The command line is not UTF-8.
    NotUtf8,
    /// A workload this guest does not know.
    UnknownWorkload(&'a str),
    /// More than [`MAX_WORKLOADS`] workloads.
    TooManyWorkloads,
    /// A value that does not parse, e.g. `ip=1.2.3`.
    BadValue { key: &'a str, value: &'a str },
}

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Config<'a> {
    workloads: [Workload<'a>; MAX_WORKLOADS],
    nr_workloads: usize,
    pub ip: Option<Ipv4Cidr>,
    pub gateway: Option<[u8; 4]>,
    pub debug: bool,
}

impl<'a> Config<'a> {
    /// Parses a command line.
    pub fn parse(cmdline: &'a [u8]) -> Result<Self, Error<'a>> {
        let text = core::str::from_utf8(cmdline).map_err(|_| Error::NotUtf8)?;
        let mut config = Config {
            workloads: [Workload::Info; MAX_WORKLOADS],
            nr_workloads: 0,
            ip: None,
            gateway: None,
            debug: false,
        };
        let mut saw_workload = false;
        for word in text.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let bad = || Error::BadValue { key, value };
            match key {
                "workload" => {
                    // A later `workload=` replaces an earlier one.
                    saw_workload = true;
                    config.nr_workloads = 0;
                    for w in value.split(',').filter(|w| !w.is_empty()) {
                        let w = Workload::parse(w);
                        if let Workload::Unknown(name) = w {
                            return Err(Error::UnknownWorkload(name));
                        }
                        if config.nr_workloads == MAX_WORKLOADS {
                            return Err(Error::TooManyWorkloads);
                        }
                        config.workloads[config.nr_workloads] = w;
                        config.nr_workloads += 1;
                    }
                }
                "ip" => config.ip = Some(parse_cidr(value).ok_or_else(bad)?),
                "gw" => config.gateway = Some(parse_ipv4(value).ok_or_else(bad)?),
                "debug" => config.debug = matches!(value, "" | "1" | "on" | "yes" | "true"),
                _ => {}
            }
        }
        if !saw_workload {
            config.nr_workloads = 1; // `info`
        }
        Ok(config)
    }

    /// The workloads to run, in order.
    pub fn workloads(&self) -> &[Workload<'a>] {
        &self.workloads[..self.nr_workloads]
    }
}

fn parse_port(s: &str) -> Option<u16> {
    parse_u64(s).and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0)
}

impl Workload<'_> {
    /// Whether the workload runs in the network loop.
    pub fn is_net(&self) -> bool {
        matches!(
            self,
            Workload::Sink { .. } | Workload::Source { .. } | Workload::Echo { .. } | Workload::Ping { .. }
        )
    }
}

/// A decimal `u64`; `_` may separate digits (`compute:1_000_000`).
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.starts_with('_') {
        return None;
    }
    let mut v: u64 = 0;
    for c in s.bytes() {
        match c {
            b'0'..=b'9' => v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?,
            b'_' => {}
            _ => return None,
        }
    }
    Some(v)
}

fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_cidr(s: &str) -> Option<Ipv4Cidr> {
    let (addr, prefix) = s.split_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(Ipv4Cidr {
        addr: parse_ipv4(addr)?,
        prefix,
    })
}
