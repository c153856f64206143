//! End-to-end tests of the engine against model endpoints and a lossy link.

mod common;

use common::*;
use proptest::prelude::*;
use remora_speculate::Mode;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Guest -> peer bulk data (and a little data back) through a lossy,
    /// duplicating, reordering outer link with arbitrary epochs.
    #[test]
    fn speculative_stream_is_exact(
        ipv6 in any::<bool>(),
        ws in any::<bool>(),
        sack in any::<bool>(),
        ts in any::<bool>(),
        seed in any::<u64>(),
        loss in 0u32..30,
        dup in 0u32..20,
        jitter in 0u64..100,
        epoch_ms in 1u64..40,
        commit_delay in 0u64..60,
        len in 0usize..400_000,
        budget in 65_536usize..400_000,
        reverse in 0usize..20_000,
        rcv_buf in 8_000usize..300_000,
        read_rate in 50usize..200_000,
        write_rate in proptest::option::of(1usize..2_000),
        inner_loss in prop_oneof![Just(0u32), 1u32..8],
        tso in any::<bool>(),
    ) {
        let p = Params { mode: Mode::Speculative, ipv6, ws, sack, ts, seed, loss, dup, jitter, epoch_ms, commit_delay, len, budget, reverse, tso };
        let mut sim = run(&p);
        sim.guest.write_rate = write_rate;
        sim.inner_loss = inner_loss;
        sim.peer.rcv_buf = rcv_buf.min(budget);
        sim.peer.read_rate = read_rate;
        check(&p, &mut sim)?;
        if loss >= 10 && len > 100_000 && !tso {
            // Retransmission really happened on lossy links (with TSO there
            // may be too few frames for one to be lost).
            prop_assert!(sim.engine.stats().retransmits > 0);
        }
    }

    /// Peer -> guest data passes with rewritten ACKs that never go backwards.
    #[test]
    fn reverse_stream_is_exact(
        ipv6 in any::<bool>(),
        sack in any::<bool>(),
        seed in any::<u64>(),
        loss in 0u32..20,
        dup in 0u32..10,
        jitter in 0u64..20,
        epoch_ms in 1u64..30,
        commit_delay in 0u64..30,
        reverse in 1usize..100_000,
        len in 0usize..5_000,
    ) {
        let p = Params { mode: Mode::Speculative, ipv6, ws: true, sack, ts: true, seed, loss, dup, jitter, epoch_ms, commit_delay, len, budget: 131_072, reverse, tso: false };
        let mut sim = run(&p);
        check(&p, &mut sim)?;
    }

    /// Plain output commit and direct mode deliver the same streams.
    #[test]
    fn buffered_and_direct_streams_are_exact(
        direct in any::<bool>(),
        seed in any::<u64>(),
        loss in 0u32..10,
        epoch_ms in 1u64..30,
        len in 0usize..40_000,
    ) {
        let mode = if direct { Mode::Direct } else { Mode::Buffered };
        let p = Params { mode, ipv6: false, ws: true, sack: true, ts: true, seed, loss, dup: 0, jitter: 0, epoch_ms, commit_delay: 3, len, budget: 131_072, reverse: 1000, tso: false };
        let mut sim = run(&p);
        // Fallback modes keep no flow state and no timers.
        let done = sim.run_until(1_000_000, |s| s.guest.all_acked() && s.peer.all_acked() && s.peer.fin_rcvd && s.guest.fin_rcvd);
        prop_assert!(done);
        prop_assert!(sim.commit_violations.is_empty(), "{:?}", sim.commit_violations);
        prop_assert!(sim.peer.received == sim.guest.data);
        prop_assert!(sim.guest.received == sim.peer.data);
        prop_assert_eq!(sim.engine.poll_timeout(), None);
    }
}

/// A peer that stops reading: the window closes, memory stays within the
/// budget, zero-window probes keep the flow alive, and when the peer reads
/// again a window update reaches the guest and the transfer completes.
#[test]
fn zero_window_peer_keeps_memory_bounded() {
    let p = Params {
        mode: Mode::Speculative,
        ipv6: false,
        ws: true,
        sack: true,
        ts: true,
        seed: 7,
        loss: 5,
        dup: 0,
        jitter: 5,
        epoch_ms: 10,
        commit_delay: 5,
        len: 600_000,
        budget: 100_000,
        reverse: 0,
        tso: true,
    };
    let mut sim = run(&p);
    sim.peer.rcv_buf = 64 * 1024;
    sim.peer.read_rate = 0;
    sim.run_until(20_000, |_| false);
    assert!(sim.max_held <= p.budget + 1460, "held {}", sim.max_held);
    let st = sim.engine.stats();
    assert!(st.zero_window_probes > 0, "{st:?}");
    assert!(sim.peer.received.len() < p.len);
    assert!(sim.guest.violations.is_empty(), "{:?}", sim.guest.violations);
    // The guest's window is closed: it has sent at most budget + 64K.
    let sent = sim.guest.snd_nxt.wrapping_sub(sim.guest.isn) as usize;
    assert!(sent <= p.budget + 64 * 1024 + 1460, "guest sent {sent}");
    sim.peer.read_rate = 1 << 20;
    let ok = sim.run_until(400_000, |s| s.guest.all_acked() && s.peer.received.len() == p.len);
    assert!(ok, "{:?}", sim.engine.stats());
    assert!(sim.engine.stats().window_updates > 0);
    assert_eq!(sim.peer.received, sim.guest.data);
}

/// A connection the engine did not see from its SYN falls back to output
/// commit and still works.
#[test]
fn mid_stream_flow_falls_back_and_works() {
    let p = Params {
        mode: Mode::Speculative,
        ipv6: false,
        ws: true,
        sack: true,
        ts: true,
        seed: 3,
        loss: 3,
        dup: 2,
        jitter: 5,
        epoch_ms: 10,
        commit_delay: 5,
        len: 30_000,
        budget: 100_000,
        reverse: 5_000,
        tso: true,
    };
    let mut sim = run(&p);
    // Run the handshake in Direct mode (engine not in the path), then swap
    // in a fresh speculative engine: the flow is unknown to it.
    let cfg = sim.engine.config().clone();
    sim.engine = remora_speculate::Engine::new(remora_speculate::Config {
        mode: Mode::Direct,
        ..cfg.clone()
    })
    .expect("valid config");
    sim.guest.data.truncate(0);
    sim.guest.fin_wanted = false;
    let d = data(p.len, 3);
    assert!(sim.run_until(5_000, |s| s.guest.st == St::Established && s.peer.st == St::Established));
    sim.guest.data = d;
    sim.guest.fin_wanted = true;
    sim.engine = remora_speculate::Engine::new(cfg).expect("valid config");
    sim.guest.rto_ms = Some(300);
    let ok = sim.run_until(200_000, |s| {
        s.guest.all_acked() && s.peer.all_acked() && s.peer.fin_rcvd && s.guest.fin_rcvd
    });
    assert!(ok, "{:?}", sim.engine.stats());
    assert_eq!(sim.peer.received, sim.guest.data);
    let st = sim.engine.stats();
    assert_eq!(st.spec_acks, 0);
    assert!(st.fallback_frames > 0);
}

/// A fixed lossy scenario with its numbers printed (for inspection).
#[test]
fn lossy_bulk_transfer_stats() {
    let p = Params {
        mode: Mode::Speculative,
        ipv6: false,
        ws: true,
        sack: true,
        ts: true,
        seed: 11,
        loss: 10,
        dup: 5,
        jitter: 20,
        epoch_ms: 25,
        commit_delay: 10,
        len: 2_000_000,
        budget: 1 << 20,
        reverse: 10_000,
        tso: true,
    };
    let mut sim = run(&p);
    sim.peer.rcv_buf = 1 << 20;
    check(&p, &mut sim).unwrap();
    let st = sim.engine.stats();
    eprintln!("simulated {} ms, max held {}: {st:?}", sim.now, sim.max_held);
    assert!(st.retransmits > 0 && st.spec_acks > 1000);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Failover: the engine and the guest are snapshotted together when an
    /// epoch is sealed; the primary runs on and dies before the next epoch
    /// commits; the backup resumes from the snapshot. Both streams still
    /// arrive exact, and the guest never sees an ACK go backwards.
    #[test]
    fn failover_keeps_streams_exact(
        seed in any::<u64>(),
        loss in 0u32..15,
        dup in 0u32..10,
        jitter in 0u64..30,
        epoch_ms in 2u64..30,
        commit_delay in 0u64..30,
        len in 1usize..300_000,
        reverse in 0usize..50_000,
        fail_epoch in 0u64..80,
        fail_frac in 0u64..1000,
        sack in any::<bool>(),
        write_rate in proptest::option::of(50usize..2_000),
    ) {
        let p = Params { mode: Mode::Speculative, ipv6: false, ws: true, sack, ts: true, seed, loss, dup, jitter, epoch_ms, commit_delay, len, budget: 200_000, reverse, tso: false };
        let mut sim = run(&p);
        sim.guest.write_rate = write_rate;
        sim.peer.write_rate = write_rate.map(|r| r / 4 + 1);
        // Run until `fail_epoch` is sealed; snapshot engine + guest.
        let mut snap = None;
        while sim.now < 100_000 {
            let sealing = sim.now >= sim.next_seal;
            let epoch = sim.engine.current_epoch();
            sim.step();
            if sealing && epoch.0 == fail_epoch {
                // The snapshot is taken atomically with the seal (the step
                // above sealed at its end, after all of this ms's input).
                snap = Some((sim.engine.clone(), sim.guest.clone(), epoch, sim.now));
                break;
            }
        }
        let Some((eng, guest, epoch, t0)) = snap else { return Ok(()); };
        if std::env::var_os("SPEC_DEBUG").is_some() {
            eprintln!("failover at epoch {} held {} peer got {}/{} guest got {}/{}", epoch.0, eng.stats().bytes_held, sim.peer.received.len(), len, guest.received.len(), reverse);
        }
        // The primary runs on until some time before epoch+1 commits.
        let window = epoch_ms + commit_delay;
        let fail_at = t0 + (window * fail_frac / 1000);
        while sim.now < fail_at {
            // Never let epoch+1 commit on the primary.
            if sim.pending_commits.front().is_some_and(|c| c.1 > epoch && c.0 <= sim.now) {
                break;
            }
            sim.step();
        }
        // Failover: the backup resumes from the checkpoint of `epoch`.
        let now = std::time::Duration::from_millis(sim.now);
        sim.engine = eng;
        sim.guest = guest;
        sim.pending_commits.clear();
        sim.mark_committed(epoch);
        sim.seal_marks.clear();
        sim.engine.commit_epoch(now, epoch);
        sim.engine.resume_after_failover(now);
        sim.next_seal = sim.now + epoch_ms;
        check(&p, &mut sim)?;
    }
}

/// Per-frame jitter (5 ms one way + 0..1 ms: frames overtake each other)
/// and 1% duplication, no loss: the streams are exact, and reordering is
/// not mistaken for loss for long: the transfer takes at most 1.5x the
/// time it takes on the same link without jitter (simulated time, so the
/// bound is deterministic), and spurious recoveries are undone.
#[test]
fn jitter_and_duplication_are_not_loss() {
    let base = Params {
        mode: Mode::Speculative,
        ipv6: false,
        ws: true,
        sack: true,
        ts: true,
        seed: 7,
        loss: 0,
        dup: 0,
        jitter: 0,
        epoch_ms: 25,
        commit_delay: 5,
        len: 8_000_000,
        budget: 16 << 20,
        reverse: 0,
        tso: false,
    };
    // The time the peer has every byte (the close that follows is not
    // measured), then the usual checks.
    let go = |p: &Params| {
        let mut sim = run(p);
        sim.peer.rcv_buf = 4 << 20;
        assert!(
            sim.run_until(100_000, |s| s.peer.received.len() >= p.len),
            "transfer stalled"
        );
        let t = sim.now;
        check(p, &mut sim).unwrap();
        (t, sim.engine.stats())
    };
    let (t0, s0) = go(&base);
    assert_eq!(s0.retransmits, 0, "a clean link needs no retransmission");
    for (seed, jitter, dup) in [(7, 1, 0), (7, 0, 1), (7, 1, 1), (8, 1, 1), (9, 1, 1)] {
        let p = Params {
            jitter,
            dup,
            seed,
            ..base.clone()
        };
        let (t, s) = go(&p);
        eprintln!(
            "seed {seed} jitter {jitter} dup {dup}: {t} ms vs {t0} ms without; recoveries {} (undone {}), retransmits {} vs {}",
            s.fast_recoveries, s.spurious_recoveries, s.retransmits, s0.retransmits
        );
        assert!(
            t as f64 <= 1.5 * t0 as f64,
            "seed {seed}: jitter made the transfer {t} ms against {t0} ms: reordering taken for loss ({s:?})"
        );
        assert_eq!(
            s.spurious_recoveries, s.fast_recoveries,
            "seed {seed}: a recovery caused by reordering alone was not undone ({s:?})"
        );
        // RACK: once reordering is seen, its window (a quarter of the
        // minimum RTT, 2.5 ms here, against 1 ms of jitter) keeps reordered
        // segments from counting lost at all.
        assert!(
            s.retransmits * 200 <= s.segments_sent,
            "seed {seed}: {} retransmissions of {} segments for reordering alone ({s:?})",
            s.retransmits,
            s.segments_sent
        );
    }
}
