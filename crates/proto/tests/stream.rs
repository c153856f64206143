//! Property tests: random checkpoint streams, split at random boundaries,
//! with one byte flipped, or cut short.

mod common;

use std::time::Duration;

use common::*;
use proptest::collection::vec;
use proptest::prelude::*;
use remora_proto::{BackupEvent, BackupSession, Kind, PrimaryEvent, PrimarySession, PAGE_SIZE};

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<u64>(),
        vec((0u64..16384, any::<u32>()), 0..10),
        vec(any::<u8>(), 0..2000),
        vec((0u32..2, vec(any::<u8>(), 0..200)), 0..3),
        vec((0u32..2, 0u64..(DISK_SIZE - 4096), vec(any::<u8>(), 0..600)), 0..3),
    )
        .prop_map(|(epoch, pages, state, engines, disk)| Spec {
            epoch,
            pages: pages.into_iter().map(|(i, s)| (i << 12, s)).collect(),
            state,
            engines,
            disk,
        })
}

/// Hello, a little precopy, then checkpoints 1..=n.
fn stream(p: &mut PrimarySession, specs: &[Spec], per_message: usize) -> Vec<u8> {
    p.set_pages_per_message(per_message);
    let pre: Vec<(u64, [u8; PAGE_SIZE])> = (0..3u32).map(|i| (u64::from(i) << 12, page(1000 + i))).collect();
    p.precopy_pages(pre.iter().map(|(g, p)| (*g, p))).unwrap();
    p.precopy_disk(1, 4096, &bytes(7, 300)).unwrap();
    p.precopy_done(1).unwrap();
    for (i, s) in specs.iter().enumerate() {
        send(p.sender(), i as u64 + 1, s);
    }
    p.poll_output().unwrap()
}

/// Where each frame of a clean stream lies, and which checkpoint it belongs
/// to.
#[derive(Debug)]
struct FrameAt {
    start: usize,
    payload: usize,
    end: usize,
    kind: Kind,
    seq: Option<u64>,
}

fn walk(s: &[u8]) -> Vec<FrameAt> {
    let mut v = Vec::new();
    let mut pos = 0;
    let mut cur = None;
    while pos < s.len() {
        let kind = Kind::from_u8(s[pos + 4]).unwrap();
        let len = u32::from_le_bytes(s[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let end = pos + 16 + len + 4;
        if kind == Kind::CkptBegin {
            cur = Some(u64::from_le_bytes(s[pos + 16..pos + 24].try_into().unwrap()));
        }
        v.push(FrameAt {
            start: pos,
            payload: pos + 16,
            end,
            kind,
            seq: if kind.is_checkpoint() { cur } else { None },
        });
        if kind == Kind::CkptEnd {
            cur = None;
        }
        pos = end;
    }
    v
}

/// Drives the backup side: checks and acks every delivered checkpoint in
/// order. Collects the other events.
struct BackupDriver {
    b: BackupSession,
    next: u64,
    refused: Vec<u64>,
    fatal: Option<String>,
    lost: Option<String>,
}

impl BackupDriver {
    fn new() -> Self {
        BackupDriver {
            b: backup(),
            next: 1,
            refused: Vec::new(),
            fatal: None,
            lost: None,
        }
    }

    fn feed(&mut self, now: Duration, data: &[u8], specs: &[Spec]) {
        self.b.handle_input(now, data);
        for e in backup_events(&mut self.b) {
            match e {
                BackupEvent::Connected { output, epoch_ms } => {
                    assert_eq!(output, remora_proto::OutputMode::Speculative);
                    assert_eq!(epoch_ms, 25);
                }
                BackupEvent::PrecopyPages(_) | BackupEvent::PrecopyDisk(_) | BackupEvent::PrecopyDone { .. } => {
                    assert_eq!(self.next, 1, "precopy after a checkpoint");
                }
                BackupEvent::Checkpoint(c) => {
                    assert_eq!(c.seq, self.next, "checkpoints in order");
                    specs[(c.seq - 1) as usize].check(c.seq, &c);
                    // A protocol error later in the same input may have
                    // closed the session already.
                    match self.b.ack(c.seq) {
                        Ok(()) => {}
                        Err(remora_proto::ProtoError::Closed) => assert!(self.b.is_closed()),
                        Err(e) => panic!("ack({}): {e}", c.seq),
                    }
                    self.next += 1;
                }
                BackupEvent::CheckpointRefused { seq, .. } => self.refused.push(seq),
                BackupEvent::ProtocolError { why } => self.fatal = Some(why),
                BackupEvent::PrimaryLost { why } => self.lost = Some(why),
                e => panic!("unexpected {e:?}"),
            }
        }
    }

    fn feed_chunked(&mut self, data: &[u8], chunk: usize, specs: &[Spec]) {
        for c in data.chunks(chunk.max(1)) {
            self.feed(Duration::from_millis(1), c, specs);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every checkpoint arrives exactly, in order, however the stream is
    /// split; every ack reaches the primary.
    #[test]
    fn checkpoints_arrive_exactly(
        specs in vec(spec(), 1..6),
        cuts in vec(1usize..6000, 1..40),
        per in 1usize..5,
    ) {
        let mut p = primary();
        let s = stream(&mut p, &specs, per);
        let mut d = BackupDriver::new();
        let now = Duration::from_millis(1);
        let (mut pos, mut i) = (0, 0);
        while pos < s.len() {
            let n = cuts[i % cuts.len()].min(s.len() - pos);
            d.feed(now, &s[pos..pos + n], &specs);
            backup_to_primary(&mut d.b, &mut p, now);
            pos += n;
            i += 1;
        }
        prop_assert_eq!(d.next, specs.len() as u64 + 1);
        prop_assert!(d.refused.is_empty() && d.fatal.is_none());
        let mut want = vec![PrimaryEvent::Welcomed];
        want.extend((1..=specs.len() as u64).map(|seq| PrimaryEvent::Acked { seq }));
        prop_assert_eq!(primary_events(&mut p), want);
        prop_assert_eq!(p.unacked().count(), 0);
        prop_assert_eq!(p.lag(), 0);
    }

    /// One flipped byte: a header flip is a fatal protocol error; a payload
    /// flip in a checkpoint refuses that checkpoint, and after the primary's
    /// go-back-N retransmission every checkpoint arrives; never a
    /// checkpoint that differs from what was sent.
    #[test]
    fn one_flipped_byte(
        specs in vec(spec(), 1..5),
        by_frame in any::<bool>(),
        which in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        chunk in 1usize..4000,
        per in 1usize..4,
    ) {
        let mut p = primary();
        let mut s = stream(&mut p, &specs, per);
        let frames = walk(&s);
        // Uniform over bytes hits mostly pages: half the cases pick a frame
        // first (headers, Begin, End, state, engine, disk, Hello).
        let pos = if by_frame {
            let f = &frames[which.index(frames.len())];
            f.start + at.index(f.end - f.start)
        } else {
            at.index(s.len())
        };
        s[pos] ^= xor;
        let f = frames.iter().find(|f| f.start <= pos && pos < f.end).unwrap();
        let expect_refused = if pos < f.payload { None } else { f.seq };

        let mut d = BackupDriver::new();
        d.feed_chunked(&s, chunk, &specs);
        let now = Duration::from_millis(2);
        backup_to_primary(&mut d.b, &mut p, now);
        match expect_refused {
            None => {
                // Header, Hello or precopy: fatal.
                prop_assert!(d.fatal.is_some(), "flip at {} in {:?}: no protocol error", pos, f);
                prop_assert!(d.refused.is_empty());
                prop_assert!(d.b.is_closed());
                // The backup told the primary why.
                let ev = primary_events(&mut p);
                prop_assert!(ev.iter().any(|e| matches!(e, PrimaryEvent::Refused { .. })), "{:?}", ev);
            }
            Some(bad) => {
                prop_assert!(d.fatal.is_none(), "flip at {} in {:?}: {:?}", pos, f, d.fatal);
                prop_assert_eq!(&d.refused, &vec![bad]);
                prop_assert_eq!(d.next, bad, "later checkpoints were held back");
                let ev = primary_events(&mut p);
                let nacked: Vec<u64> = ev.iter().filter_map(|e| match e {
                    PrimaryEvent::Nacked { seq, .. } => Some(*seq),
                    _ => None,
                }).collect();
                prop_assert_eq!(nacked, vec![bad]);
                // Go-back-N from the refused one.
                for seq in bad..=specs.len() as u64 {
                    send(p.sender(), seq, &specs[(seq - 1) as usize]);
                }
                let again = p.poll_output().unwrap();
                d.feed_chunked(&again, chunk, &specs);
                backup_to_primary(&mut d.b, &mut p, now);
                prop_assert!(d.fatal.is_none(), "{:?}", d.fatal);
                prop_assert_eq!(d.next, specs.len() as u64 + 1);
                prop_assert_eq!(d.refused.len(), 1);
                prop_assert_eq!(p.lag(), 0);
            }
        }
    }

    /// A stream cut anywhere delivers exactly the checkpoints whose End
    /// arrived, never a partial one; the end of the stream is a lost primary.
    #[test]
    fn truncated_stream(
        specs in vec(spec(), 1..4),
        at in any::<prop::sample::Index>(),
        chunk in 1usize..4000,
    ) {
        let mut p = primary();
        let s = stream(&mut p, &specs, 2);
        let cut = at.index(s.len() + 1);
        let complete = walk(&s).iter().filter(|f| f.kind == Kind::CkptEnd && f.end <= cut).count() as u64;
        let mut d = BackupDriver::new();
        d.feed_chunked(&s[..cut], chunk, &specs);
        prop_assert_eq!(d.next, complete + 1);
        prop_assert!(d.fatal.is_none() && d.refused.is_empty());
        d.b.handle_eof();
        d.feed(Duration::from_millis(3), &[], &specs);
        prop_assert!(d.lost.is_some());
        prop_assert_eq!(d.next, complete + 1);
    }
}

/// Every cut position of a small stream.
#[test]
fn truncated_everywhere() {
    let specs = vec![
        Spec {
            epoch: 1,
            pages: vec![(0x1000, 1)],
            state: bytes(1, 50),
            engines: vec![(0, bytes(2, 10))],
            disk: vec![],
        },
        Spec {
            epoch: 2,
            pages: vec![(0x2000, 2)],
            state: bytes(3, 20),
            engines: vec![],
            disk: vec![(1, 0, bytes(4, 30))],
        },
    ];
    let mut p = primary();
    let s = stream(&mut p, &specs, 1);
    let ends: Vec<usize> = walk(&s)
        .iter()
        .filter(|f| f.kind == Kind::CkptEnd)
        .map(|f| f.end)
        .collect();
    for cut in 0..=s.len() {
        let mut d = BackupDriver::new();
        d.feed(Duration::from_millis(1), &s[..cut], &specs);
        let complete = ends.iter().filter(|&&e| e <= cut).count() as u64;
        assert_eq!(d.next, complete + 1, "cut at {cut}");
        assert!(d.fatal.is_none() && d.refused.is_empty());
        d.b.handle_eof();
        d.feed(Duration::from_millis(2), &[], &specs);
        assert!(d.lost.is_some(), "cut at {cut}");
    }
}
