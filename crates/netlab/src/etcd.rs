//! Real etcd servers (Debian's `etcd-server`) for the fence's tests: one
//! node or a cluster, on loopback or inside a namespace, each with its own
//! data directory; killed (by PID) and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{NetlabError, Netns, Result};

/// One etcd member.
struct Node {
    name: String,
    ip: String,
    client_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of real `etcd` processes.
pub struct EtcdCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    ns: Option<String>,
}

/// The etcd binary.
pub const ETCD: &str = "etcd";

/// Whether Debian's etcd-server is installed.
pub fn available() -> bool {
    Command::new(ETCD)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl EtcdCluster {
    /// Starts one member per entry of `ips` (`ns`: inside that namespace,
    /// else on this host — use 127.0.0.1 and a free `base_port` then);
    /// member i listens for clients on `ips[i]:base_port + 2 * i` and for
    /// peers on the next port. Fast elections (50 ms heartbeats, 300 ms
    /// election timeout) so a test sees a leader change within a second.
    /// Returns once every member answers.
    pub fn start(ns: Option<&Netns>, ips: &[&str], base_port: u16) -> Result<EtcdCluster> {
        let dir = std::env::temp_dir().join(crate::unique_name("etcd"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| NetlabError::Spawn {
            cmd: format!("mkdir {}", dir.display()),
            source,
        })?;
        let mut cluster = EtcdCluster {
            nodes: Vec::new(),
            dir,
            ns: ns.map(|n| n.name().to_string()),
        };
        let peer = |i: usize, ip: &str| format!("http://{ip}:{}", base_port + 2 * i as u16 + 1);
        let initial: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("n{i}={}", peer(i, ip)))
            .collect();
        let token = crate::unique_name("tok");
        for (i, ip) in ips.iter().enumerate() {
            let name = format!("n{i}");
            let client_port = base_port + 2 * i as u16;
            let client = format!("http://{ip}:{client_port}");
            let data = cluster.dir.join(&name);
            let mut cmd = match ns {
                Some(n) => n.command(ETCD),
                None => Command::new(ETCD),
            };
            cmd.args([
                "--name",
                &name,
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer(i, ip),
                "--initial-advertise-peer-urls",
                &peer(i, ip),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &token,
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "300",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            let desc = format!("{cmd:?}");
            let child = cmd.spawn().map_err(|source| NetlabError::Spawn { cmd: desc, source })?;
            cluster.nodes.push(Node {
                name,
                ip: ip.to_string(),
                client_port,
                child: Some(child),
            });
        }
        cluster.wait_healthy(Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// The client URLs of the members still running.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("http://{}:{}", n.ip, n.client_port))
            .collect()
    }

    /// The client URLs of all members (running or not).
    pub fn all_endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://{}:{}", n.ip, n.client_port))
            .collect()
    }

    /// `etcd=URL,...` for remora's `--fence` (all members).
    pub fn fence_arg(&self) -> String {
        format!("etcd={}", self.all_endpoints().join(","))
    }

    fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> Result<std::process::Output> {
        let eps = endpoints.join(",");
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &eps, "--command-timeout=2s", "--dial-timeout=1s"])
            .args(args);
        crate::run(&mut cmd)
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            let eps = self.endpoints();
            match self.etcdctl(&eps, &["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(e) if t.elapsed() > timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The index of the current leader (asked of the running members).
    pub fn leader(&self) -> Option<usize> {
        let out = self
            .etcdctl(&self.endpoints(), &["endpoint", "status", "-w", "fields"])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // Blocks of `"Key" : value` lines, one per endpoint, each ending
        // with its "Endpoint" line.
        let (mut member, mut leader) = (None::<String>, None::<String>);
        for line in text.lines() {
            let Some((k, v)) = line.split_once(" : ") else { continue };
            let (k, v) = (k.trim().trim_matches('"'), v.trim().trim_matches('"').to_string());
            match k {
                "MemberID" => member = Some(v),
                "Leader" => leader = Some(v),
                "Endpoint" => {
                    if member.is_some() && member == leader {
                        return self
                            .nodes
                            .iter()
                            .position(|n| v.ends_with(&format!("{}:{}", n.ip, n.client_port)));
                    }
                    member = None;
                }
                _ => {}
            }
        }
        None
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Member `i`'s name.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The value at `key` (None if absent or unreachable).
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self
            .etcdctl(&self.endpoints(), &["get", "--print-value-only", key])
            .ok()?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_three_node_cluster_elects_a_new_leader() {
        if !available() {
            eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
            return;
        }
        let ns = Netns::new("etcdt").unwrap();
        let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
        let mut c = EtcdCluster::start(Some(&ns), &ips, 23790).unwrap();
        assert_eq!(c.endpoints().len(), 3);
        let leader = c.leader().expect("a leader");
        c.kill(leader);
        let t = Instant::now();
        let new = loop {
            if let Some(l) = c.leader() {
                break l;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no new leader");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_ne!(new, leader);
        assert_eq!(c.endpoints().len(), 2);
    }
}
