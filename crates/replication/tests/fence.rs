//! The fence against a real etcd (Debian's etcd-server) in a network
//! namespace: compare-and-swap semantics, races, and a leader killed
//! between claims.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use remora_netlab::{etcd, EtcdCluster, Netns};
use remora_replication::fence::{Claim, Fence, FenceConfig};

fn fence(cluster: &EtcdCluster, vm: &str) -> Fence {
    let cfg: FenceConfig = format!("{},key=/test", cluster.fence_arg()).parse().unwrap();
    Fence::new(cfg, vm.to_string()).unwrap()
}

/// Runs `f` inside `ns` (the client's sockets belong to it).
fn inside<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    ns.spawn_thread(move || Ok(f())).join().unwrap().unwrap()
}

#[test]
fn generations_move_by_compare_and_swap_and_one_racer_wins() {
    if !etcd::available() {
        eprintln!("skipped: etcd is not installed");
        return;
    }
    let ns = Netns::new("fence1").unwrap();
    let cluster = Arc::new(EtcdCluster::start(Some(&ns), &["127.0.0.1"], 24790).unwrap());
    let c = cluster.clone();
    inside(&ns, move || {
        let f = fence(&c, "52-54-00-00-00-01");
        assert_eq!(f.read().unwrap(), (0, String::new()), "never claimed: generation 0");
        assert_eq!(f.claim(0, "primary a").unwrap(), Claim::Won(1));
        // A stale claimant loses and learns who holds it.
        assert_eq!(
            f.claim(0, "primary b").unwrap(),
            Claim::Lost {
                generation: 1,
                owner: "primary a".into()
            }
        );
        assert_eq!(f.claim_next("restarted").unwrap(), 2);
        assert_eq!(f.read().unwrap(), (2, "restarted".into()));
        assert_eq!(c.get("/test/vm/52-54-00-00-00-01/generation").as_deref(), Some("2"));
        // A retry of a claim that already went through (its answer lost)
        // is recognised by the owner's name.
        assert_eq!(f.claim(1, "restarted").unwrap(), Claim::Won(2));
        // Another VM's counter is its own.
        let g = fence(&c, "52-54-00-00-00-02");
        assert_eq!(g.claim(0, "other").unwrap(), Claim::Won(1));
    });
    // Primary and backup race from the same generation, 20 times: exactly
    // one wins each round.
    for round in 0..20u64 {
        let barrier = Arc::new(Barrier::new(2));
        let mut handles = Vec::new();
        for who in ["primary", "backup"] {
            let (c, b) = (cluster.clone(), barrier.clone());
            handles.push(ns.spawn_thread(move || {
                let f = fence(&c, "52-54-00-00-00-03");
                // Connect first, so both ask at the same moment.
                let _ = f.read();
                b.wait();
                Ok(f.claim(round, who).unwrap())
            }));
        }
        let results: Vec<Claim> = handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        let won = results
            .iter()
            .filter(|r| matches!(r, Claim::Won(g) if *g == round + 1))
            .count();
        assert_eq!(won, 1, "round {round}: {results:?}");
    }
}

#[test]
fn a_claim_survives_the_etcd_leader_being_killed() {
    if !etcd::available() {
        eprintln!("skipped: etcd is not installed");
        return;
    }
    let ns = Netns::new("fence3").unwrap();
    let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let mut cluster = EtcdCluster::start(Some(&ns), &ips, 25790).unwrap();
    let arg = format!("{},key=/test", cluster.fence_arg());
    let leader = cluster.leader().expect("a leader");
    let f = {
        let arg = arg.clone();
        inside(&ns, move || {
            let f = Fence::new(arg.parse().unwrap(), "vm".into()).unwrap();
            assert_eq!(f.claim(0, "first").unwrap(), Claim::Won(1));
            f
        })
    };
    cluster.kill(leader);
    // The client retries as remora does (every 100 ms while unreachable).
    let t = Instant::now();
    let r = inside(&ns, move || loop {
        match f.claim(1, "after the leader died") {
            Ok(c) => return (c, t.elapsed()),
            Err(e) if t.elapsed() < Duration::from_secs(15) => {
                eprintln!("retrying: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("no claim within 15 s of the leader's death: {e}"),
        }
    });
    assert_eq!(r.0, Claim::Won(2));
    eprintln!("claim after killing leader {}: {:?}", cluster.name(leader), r.1);
    // A new client may first reach the dead member (connection refused):
    // remora retries every call, so does this read.
    let g = inside(&ns, move || {
        let f = Fence::new(arg.parse().unwrap(), "vm".into()).unwrap();
        let t = Instant::now();
        loop {
            match f.read() {
                Ok(g) => return g,
                Err(e) if t.elapsed() < Duration::from_secs(15) => {
                    eprintln!("retrying the read: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("no read within 15 s: {e}"),
            }
        }
    });
    assert_eq!(g.0, 2);
}
