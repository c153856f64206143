//! The fence: one active copy of a VM, decided in etcd.
//!
//! A generation counter per VM is the fencing token (VMware FT's
//! test-and-set, not a lease: an etcd lease can outlive its TTL across
//! leader changes). Whoever wants to emit the guest's output on its own —
//! a primary starting, a primary going on without its backup, a backup
//! taking over — must first move the generation from the value it knows
//! to the next one with a compare-and-swap. Exactly one of two racing
//! copies wins; the loser never emits a frame.
//!
//! Keys, under the configured prefix (default `/remora`):
//! `PREFIX/vm/VMNAME/generation` (decimal; absent = 0) and
//! `PREFIX/vm/VMNAME/owner` (who won it, for the operator). VMNAME is the
//! guest's first MAC address (both hosts see the same one), `vm` without
//! a net device.
//!
//! The etcd client is async (tonic); each [`Fence`] owns a one-thread
//! tokio runtime and offers blocking calls with a deadline.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};

/// `--fence etcd=URL[,URL...][,key=PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
}

/// Errors of the fence.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("bad --fence '{0}': {1} (expected etcd=URL[,URL...][,key=PREFIX], e.g. etcd=http://10.0.0.5:2379)")]
    Config(String, String),
    #[error("etcd unreachable ({0})")]
    Unreachable(String),
    #[error("etcd holds a malformed generation at {key}: '{value}'")]
    Corrupt { key: String, value: String },
    #[error("cannot start the etcd client's runtime: {0}")]
    Runtime(std::io::Error),
}

impl FromStr for FenceConfig {
    type Err = FenceError;

    fn from_str(s: &str) -> Result<FenceConfig, FenceError> {
        let bad = |why: &str| FenceError::Config(s.to_string(), why.to_string());
        let rest = s.strip_prefix("etcd=").ok_or_else(|| bad("only etcd is supported"))?;
        let mut endpoints = Vec::new();
        let mut prefix = "/remora".to_string();
        for part in rest.split(',') {
            if let Some(p) = part.strip_prefix("key=") {
                if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') {
                    return Err(bad("key= must be an absolute prefix like /remora/prod"));
                }
                prefix = p.to_string();
            } else if part.is_empty() {
                return Err(bad("empty endpoint"));
            } else {
                let url = if part.contains("://") {
                    part.to_string()
                } else {
                    format!("http://{part}")
                };
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(bad("endpoints are http:// or https:// URLs"));
                }
                let host = url.split("://").nth(1).unwrap_or_default();
                if host.is_empty() || !host.contains(':') {
                    return Err(bad("an endpoint needs host:port"));
                }
                endpoints.push(url);
            }
        }
        if endpoints.is_empty() {
            return Err(bad("no etcd endpoint"));
        }
        Ok(FenceConfig { endpoints, prefix })
    }
}

impl fmt::Display for FenceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd {} (key {})", self.endpoints.join(","), self.prefix)
    }
}

/// The result of a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This copy holds the returned generation now.
    Won(u64),
    /// Someone else moved the generation first.
    Lost { generation: u64, owner: String },
}

/// A VM's fence in etcd.
pub struct Fence {
    cfg: FenceConfig,
    vm: String,
    rt: tokio::runtime::Runtime,
    client: Mutex<Option<Client>>,
    /// Deadline of one etcd call (connect + request).
    pub timeout: Duration,
}

/// The VM's name in the fence's keys: its first MAC, `vm` without one.
pub fn vm_name(first_mac: Option<[u8; 6]>) -> String {
    match first_mac {
        Some(m) => m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join("-"),
        None => "vm".into(),
    }
}

impl Fence {
    pub fn new(cfg: FenceConfig, vm: String) -> Result<Fence, FenceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(FenceError::Runtime)?;
        Ok(Fence {
            cfg,
            vm,
            rt,
            client: Mutex::new(None),
            timeout: Duration::from_secs(2),
        })
    }

    pub fn config(&self) -> &FenceConfig {
        &self.cfg
    }

    /// The generation key.
    pub fn key(&self) -> String {
        format!("{}/vm/{}/generation", self.cfg.prefix, self.vm)
    }

    fn owner_key(&self) -> String {
        format!("{}/vm/{}/owner", self.cfg.prefix, self.vm)
    }

    /// Runs one etcd operation with a connected client (connecting first
    /// if needed; a failed call drops the client so the next reconnects).
    fn call<T, F, Fut>(&self, f: F) -> Result<T, FenceError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.timeout;
        let endpoints = self.cfg.endpoints.clone();
        let existing = guard.clone();
        let r = self.rt.block_on(async move {
            let client = match existing {
                Some(c) => c,
                None => {
                    let opts = ConnectOptions::new()
                        .with_connect_timeout(timeout)
                        .with_timeout(timeout)
                        .with_require_leader(true);
                    match tokio::time::timeout(timeout, Client::connect(&endpoints, Some(opts))).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => return (None, Err(FenceError::Unreachable(e.to_string()))),
                        Err(_) => {
                            return (
                                None,
                                Err(FenceError::Unreachable(format!("no answer within {timeout:?}"))),
                            )
                        }
                    }
                }
            };
            let r = match tokio::time::timeout(timeout, f(client.clone())).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(FenceError::Unreachable(e.to_string())),
                Err(_) => Err(FenceError::Unreachable(format!("no answer within {timeout:?}"))),
            };
            let keep = r.is_ok().then_some(client);
            (keep, r)
        });
        *guard = r.0;
        r.1
    }

    fn parse(&self, v: &[u8]) -> Result<u64, FenceError> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| FenceError::Corrupt {
                key: self.key(),
                value: String::from_utf8_lossy(v).into_owned(),
            })
    }

    /// The current generation and its owner (0 and "" if never claimed).
    pub fn read(&self) -> Result<(u64, String), FenceError> {
        let (key, owner_key) = (self.key(), self.owner_key());
        let (g, o) = self.call(|mut c| async move {
            let g = c.get(key, None).await?;
            let o = c.get(owner_key, None).await?;
            Ok((
                g.kvs().first().map(|kv| kv.value().to_vec()),
                o.kvs().first().map(|kv| kv.value().to_vec()),
            ))
        })?;
        let generation = match g {
            Some(v) => self.parse(&v)?,
            None => 0,
        };
        Ok((
            generation,
            o.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default(),
        ))
    }

    /// Compare-and-swap from `expected` to `expected + 1`, naming `owner`
    /// (which must be unique to the caller: a retry that finds its own
    /// name at `expected + 1` won on an earlier attempt whose answer was
    /// lost).
    pub fn claim(&self, expected: u64, owner: &str) -> Result<Claim, FenceError> {
        let (key, owner_key) = (self.key(), self.owner_key());
        let next = expected + 1;
        let cmp = if expected == 0 {
            Compare::version(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(key.clone(), CompareOp::Equal, expected.to_string())
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([
                TxnOp::put(key.clone(), next.to_string(), None),
                TxnOp::put(owner_key.clone(), owner, None),
            ])
            .or_else([TxnOp::get(key, None), TxnOp::get(owner_key, None)]);
        let resp = self.call(|mut c| async move { c.txn(txn).await })?;
        if resp.succeeded() {
            return Ok(Claim::Won(next));
        }
        let mut values = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let generation = match values.next().flatten() {
            Some(v) => self.parse(&v)?,
            None => 0,
        };
        let holder = values
            .next()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        // An earlier attempt whose answer was lost (a timeout, a leader
        // change) may have won already: the owner key says so.
        if generation == next && holder == owner {
            return Ok(Claim::Won(next));
        }
        Ok(Claim::Lost {
            generation,
            owner: holder,
        })
    }

    /// Claims the next generation whatever it is now (a VM starting: it
    /// becomes the active copy). Retries a lost race a few times.
    pub fn claim_next(&self, owner: &str) -> Result<u64, FenceError> {
        let mut last = None;
        for _ in 0..8 {
            let (g, _) = self.read()?;
            match self.claim(g, owner)? {
                Claim::Won(n) => return Ok(n),
                Claim::Lost { generation, .. } => last = Some(generation),
            }
        }
        Err(FenceError::Unreachable(format!(
            "the generation keeps moving (last seen {}): another copy is claiming it too",
            last.unwrap_or(0)
        )))
    }
}

/// Who we are, for the owner key: role, host and pid.
pub fn owner(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{role} {} pid {}", host.trim(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fence_flag() {
        let c: FenceConfig = "etcd=http://10.0.0.5:2379,10.0.0.6:2379,key=/remora/prod"
            .parse()
            .unwrap();
        assert_eq!(c.endpoints, vec!["http://10.0.0.5:2379", "http://10.0.0.6:2379"]);
        assert_eq!(c.prefix, "/remora/prod");
        let d: FenceConfig = "etcd=127.0.0.1:2379".parse().unwrap();
        assert_eq!(d.prefix, "/remora");
        for bad in [
            "",
            "zk=1.2.3.4:2181",
            "etcd=",
            "etcd=,",
            "etcd=host",
            "etcd=1.2.3.4:2379,key=relative",
            "etcd=1.2.3.4:2379,key=/",
            "etcd=ftp://1.2.3.4:2379",
        ] {
            let e = bad.parse::<FenceConfig>().unwrap_err().to_string();
            assert!(e.contains("bad --fence"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_the_vm_by_its_mac() {
        assert_eq!(vm_name(Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])), "52-54-00-12-34-56");
        assert_eq!(vm_name(None), "vm");
    }

    #[test]
    fn an_unreachable_etcd_is_an_error_within_the_deadline() {
        // A port nothing listens on (connection refused at once).
        let cfg: FenceConfig = "etcd=127.0.0.1:9".parse().unwrap();
        let mut f = Fence::new(cfg, "vm".into()).unwrap();
        f.timeout = Duration::from_millis(500);
        let t = std::time::Instant::now();
        assert!(matches!(f.read(), Err(FenceError::Unreachable(_))));
        assert!(matches!(f.claim(3, "test"), Err(FenceError::Unreachable(_))));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}
