//! Session behaviour: handshake, refusals, ordering, timeouts, shutdown,
//! primary-side bookkeeping, the two-thread split, and a benchmark.

mod common;

use std::time::{Duration, Instant};

use common::*;
use remora_proto::{
    BackupConfig, BackupEvent, BackupSession, CkptCounts, Decoder, DeviceIdentity, Frame, Message, OutputMode,
    PagesPayload, PrimaryConfig, PrimaryEvent, PrimarySession, ProtoError, PAGE_SIZE,
};

const T0: Duration = Duration::from_secs(1000);

fn ms(n: u64) -> Duration {
    T0 + Duration::from_millis(n)
}

fn decode_all(bytes: &[u8]) -> Vec<Message> {
    let mut d = Decoder::new();
    d.feed(bytes);
    let mut v = Vec::new();
    while let Some(f) = d.next().unwrap() {
        match f {
            Frame::Message { msg, .. } => v.push(msg),
            Frame::Corrupt { .. } => panic!("corrupt"),
        }
    }
    v
}

fn encode(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out).unwrap();
    }
    out
}

fn hello() -> Message {
    Message::Hello {
        version: 1,
        vm: identity(),
        output: OutputMode::Buffered,
        epoch_ms: 30,
    }
}

/// A hand-made checkpoint: Begin with `counts`, then `body`, then End with
/// the right digest (or `digest`).
fn ckpt(seq: u64, counts: CkptCounts, body: &[Message], digest: Option<u32>) -> Vec<u8> {
    let mut msgs = vec![Message::CkptBegin {
        seq,
        epoch: seq * 10,
        pages: counts.pages,
        state_len: counts.state_len,
        engines: counts.engines,
        disk_writes: counts.disk_writes,
    }];
    msgs.extend_from_slice(body);
    let mut h = crc32fast::Hasher::new();
    let mut out = Vec::new();
    for m in &msgs {
        let start = out.len();
        m.encode(&mut out).unwrap();
        h.update(&out[start + 16..out.len() - 4]);
    }
    let digest = digest.unwrap_or(h.finalize());
    Message::CkptEnd { seq, digest }.encode(&mut out).unwrap();
    out
}

fn state_only(seq: u64) -> Vec<u8> {
    ckpt(
        seq,
        CkptCounts {
            state_len: 3,
            ..CkptCounts::default()
        },
        &[Message::CkptState { bytes: vec![1, 2, 3] }],
        None,
    )
}

fn connected_backup() -> BackupSession {
    let mut b = backup();
    b.handle_input(T0, &encode(&[hello()]));
    assert_eq!(
        backup_events(&mut b),
        vec![BackupEvent::Connected {
            output: OutputMode::Buffered,
            epoch_ms: 30
        }]
    );
    assert_eq!(
        decode_all(&b.poll_output().unwrap()),
        vec![Message::Welcome { version: 1 }]
    );
    b
}

fn protocol_error(b: &mut BackupSession) -> String {
    let ev = backup_events(b);
    match ev.last() {
        Some(BackupEvent::ProtocolError { why }) => why.clone(),
        _ => panic!("no protocol error: {ev:?}"),
    }
}

#[test]
fn identity_mismatch_is_refused_with_the_first_difference() {
    let disk = |size| DeviceIdentity::Disk {
        size_bytes: size,
        read_only: false,
        id: [b'x'; 20],
    };
    let prim = remora_proto::VmIdentity {
        mem_mib: 128,
        vcpus: 1,
        devices: vec![disk(64 << 20)],
    };
    let back = remora_proto::VmIdentity {
        mem_mib: 128,
        vcpus: 1,
        devices: vec![disk(32 << 20)],
    };
    let mut p = PrimarySession::new(PrimaryConfig::new(prim, OutputMode::Speculative, 25)).unwrap();
    let mut b = BackupSession::new(BackupConfig::new(back));
    b.handle_input(T0, &p.poll_output().unwrap());
    let reason = "disk 0 size differs: primary 67108864 bytes, backup 33554432 bytes".to_string();
    assert_eq!(
        backup_events(&mut b),
        vec![BackupEvent::Refused { reason: reason.clone() }]
    );
    assert!(b.is_closed());
    backup_to_primary(&mut b, &mut p, T0);
    assert_eq!(primary_events(&mut p), vec![PrimaryEvent::Refused { reason }]);
    assert!(p.is_closed());
    // A closed backup neither times out nor takes over.
    assert_eq!(b.poll_timeout(), None);
    b.handle_eof();
    assert_eq!(backup_events(&mut b), vec![]);
}

#[test]
fn other_protocol_version_is_refused() {
    let mut b = backup();
    let mut out = Vec::new();
    // Header of a Hello whose payload is a version-2 body.
    let mut body = 2u32.to_le_bytes().to_vec();
    body.extend_from_slice(&[0xab; 40]);
    let h = remora_proto::wire::build_header(remora_proto::Kind::Hello, body.len() as u32);
    out.extend_from_slice(&h);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    b.handle_input(T0, &out);
    let reason = "unsupported protocol version 2 (this backup speaks 1)".to_string();
    assert_eq!(
        backup_events(&mut b),
        vec![BackupEvent::Refused { reason: reason.clone() }]
    );
    assert_eq!(decode_all(&b.poll_output().unwrap()), vec![Message::Refuse { reason }]);
}

#[test]
fn first_message_must_be_hello() {
    let mut b = backup();
    b.handle_input(T0, &encode(&[Message::Heartbeat { sent_at_ns: 1 }]));
    assert!(protocol_error(&mut b).contains("expected Hello"));
}

#[test]
fn seq_out_of_order_is_fatal() {
    // A gap.
    let mut b = connected_backup();
    b.handle_input(T0, &state_only(1));
    assert!(matches!(&backup_events(&mut b)[..], [BackupEvent::Checkpoint(c)] if c.seq == 1));
    b.handle_input(T0, &state_only(3));
    assert_eq!(protocol_error(&mut b), "checkpoint 3 out of order: expected 2");
    assert!(b.is_closed());
    let out = decode_all(&b.poll_output().unwrap());
    assert!(
        matches!(&out[..], [Message::Refuse { reason }] if reason.contains("out of order")),
        "{out:?}"
    );

    // A repeat.
    let mut b = connected_backup();
    b.handle_input(T0, &state_only(1));
    b.handle_input(T0, &state_only(1));
    assert_eq!(protocol_error(&mut b), "checkpoint 1 out of order: expected 2");

    // Not starting at 1.
    let mut b = connected_backup();
    b.handle_input(T0, &state_only(2));
    assert_eq!(protocol_error(&mut b), "checkpoint 2 out of order: expected 1");
}

#[test]
fn precopy_after_the_first_checkpoint_is_an_error() {
    let p0 = page(1);
    let pages = PagesPayload::from_pages([(0u64, &p0)]).unwrap();
    let mut b = connected_backup();
    b.handle_input(T0, &encode(&[Message::PrecopyPages { pages: pages.clone() }]));
    assert!(matches!(&backup_events(&mut b)[..], [BackupEvent::PrecopyPages(p)] if p.len() == 1));
    b.handle_input(T0, &state_only(1));
    b.handle_input(T0, &encode(&[Message::PrecopyPages { pages }]));
    assert_eq!(protocol_error(&mut b), "PrecopyPages after the first checkpoint began");

    let mut b = connected_backup();
    b.handle_input(T0, &state_only(1));
    b.handle_input(
        T0,
        &encode(&[Message::PrecopyDisk {
            disk: 0,
            offset: 0,
            data: vec![1],
        }]),
    );
    assert_eq!(protocol_error(&mut b), "PrecopyDisk after the first checkpoint began");

    // The sender does not let the driver do it either.
    let mut p = primary();
    send(
        p.sender(),
        1,
        &Spec {
            epoch: 1,
            pages: vec![],
            state: vec![1],
            engines: vec![],
            disk: vec![],
        },
    );
    assert!(matches!(p.precopy_pages([(0u64, &p0)]), Err(ProtoError::Misuse(_))));
    assert!(matches!(p.precopy_done(1), Err(ProtoError::Misuse(_))));
}

#[test]
fn messages_outside_their_place_are_fatal() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (encode(&[hello()]), "second Hello"),
        (
            encode(&[Message::Ack { seq: 1 }]),
            "Ack is not a message from the primary",
        ),
        (
            encode(&[Message::CkptState { bytes: vec![1] }]),
            "CkptState outside a checkpoint",
        ),
        (
            encode(&[Message::CkptEnd { seq: 1, digest: 0 }]),
            "CkptEnd 1 outside a checkpoint",
        ),
    ];
    for (bytes, why) in cases {
        let mut b = connected_backup();
        b.handle_input(T0, &bytes);
        assert_eq!(protocol_error(&mut b), why);
    }
    // Begin inside a checkpoint.
    let mut b = connected_backup();
    let mut s = encode(&[Message::CkptBegin {
        seq: 1,
        epoch: 0,
        pages: 0,
        state_len: 0,
        engines: 0,
        disk_writes: 0,
    }]);
    s.extend(state_only(1));
    b.handle_input(T0, &s);
    assert_eq!(protocol_error(&mut b), "CkptBegin 1 inside a checkpoint");
}

#[test]
fn inconsistent_checkpoints_are_refused_then_resent() {
    let c = |pages, state_len, engines, disk_writes| CkptCounts {
        pages,
        state_len,
        engines,
        disk_writes,
    };
    let p0 = page(5);
    let one_page = Message::CkptPages {
        pages: PagesPayload::from_pages([(0x3000u64, &p0)]).unwrap(),
    };
    let unaligned = Message::CkptPages {
        pages: PagesPayload::from_pages([(0x3001u64, &p0)]).unwrap(),
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            ckpt(1, c(2, 0, 0, 0), std::slice::from_ref(&one_page), None),
            "incomplete",
        ),
        (
            ckpt(1, c(0, 0, 0, 0), std::slice::from_ref(&one_page), None),
            "more pages than the 0 declared",
        ),
        (
            ckpt(1, c(1, 0, 0, 0), &[unaligned], None),
            "page at unaligned gpa 0x3001",
        ),
        (
            ckpt(1, c(1, 0, 0, 0), std::slice::from_ref(&one_page), Some(7)),
            "digest mismatch",
        ),
        (
            ckpt(1, c(1 << 20, 0, 0, 0), &[], None),
            "declares 1048576 pages, the guest has 16384",
        ),
        (
            ckpt(1, c(0, 1, 0, 0), &[Message::CkptState { bytes: vec![1, 2] }], None),
            "more state than the 1 bytes declared",
        ),
        (
            ckpt(1, c(0, 0, 1, 0), &[Message::CkptEngine { net: 2, bytes: vec![] }], None),
            "engine delta for net 2, the VM has 2 net devices",
        ),
        (
            ckpt(
                1,
                c(0, 0, 0, 1),
                &[Message::CkptDisk {
                    disk: 2,
                    offset: 0,
                    data: vec![1],
                }],
                None,
            ),
            "write to disk 2, the VM has 2 disks",
        ),
        (
            ckpt(
                1,
                c(0, 0, 0, 1),
                &[Message::CkptDisk {
                    disk: 1,
                    offset: DISK_SIZE - 1,
                    data: vec![1, 2],
                }],
                None,
            ),
            "beyond the end of disk 1",
        ),
    ];
    for (bytes, why) in cases {
        let mut b = connected_backup();
        b.handle_input(T0, &bytes);
        let ev = backup_events(&mut b);
        assert!(
            matches!(&ev[..], [BackupEvent::CheckpointRefused { seq: 1, reason }] if reason.contains(why)),
            "{why}: {ev:?}"
        );
        let out = decode_all(&b.poll_output().unwrap());
        assert!(
            matches!(&out[..], [Message::Nack { seq: 1, reason }] if reason.contains(why)),
            "{out:?}"
        );
        // The retransmission is accepted.
        b.handle_input(T0, &state_only(1));
        assert!(matches!(&backup_events(&mut b)[..], [BackupEvent::Checkpoint(c)] if c.seq == 1));
        b.handle_input(T0, &state_only(2));
        assert!(matches!(&backup_events(&mut b)[..], [BackupEvent::Checkpoint(c)] if c.seq == 2));
    }
}

#[test]
fn read_only_disk_writes_are_refused() {
    let mut id = identity();
    id.devices[1] = DeviceIdentity::Disk {
        size_bytes: DISK_SIZE,
        read_only: true,
        id: [0; 20],
    };
    let mut b = BackupSession::new(BackupConfig::new(id.clone()));
    b.handle_input(
        T0,
        &encode(&[Message::Hello {
            version: 1,
            vm: id,
            output: OutputMode::Buffered,
            epoch_ms: 1,
        }]),
    );
    let counts = CkptCounts {
        disk_writes: 1,
        ..CkptCounts::default()
    };
    b.handle_input(
        T0,
        &ckpt(
            1,
            counts,
            &[Message::CkptDisk {
                disk: 0,
                offset: 0,
                data: vec![1],
            }],
            None,
        ),
    );
    let ev = backup_events(&mut b);
    assert!(
        matches!(&ev[..], [_, BackupEvent::CheckpointRefused { seq: 1, reason }] if reason == "write to read-only disk 0"),
        "{ev:?}"
    );
}

/// Checkpoints 2 and 3 are in flight when 1 is refused: they are skipped
/// silently, and the primary's go-back-N resend is accepted.
#[test]
fn go_back_n_after_a_refusal() {
    let mut p = primary();
    let mut b = backup();
    b.handle_input(T0, &p.poll_output().unwrap());
    backup_to_primary(&mut b, &mut p, T0);
    let spec = |e| Spec {
        epoch: e,
        pages: vec![(e << 12, e as u32)],
        state: bytes(e as u32, 100),
        engines: vec![],
        disk: vec![],
    };
    let specs = [spec(1), spec(2), spec(3)];
    for (i, s) in specs.iter().enumerate() {
        send(p.sender(), i as u64 + 1, s);
    }
    let mut s = p.poll_output().unwrap();
    // A payload byte of checkpoint 1's page (after Begin's 64-byte frame).
    s[64 + 16 + 100] ^= 1;
    b.handle_input(ms(1), &s);
    let ev = backup_events(&mut b);
    assert!(
        matches!(
            &ev[..],
            [
                BackupEvent::Connected { .. },
                BackupEvent::CheckpointRefused { seq: 1, .. }
            ]
        ),
        "{ev:?}"
    );
    backup_to_primary(&mut b, &mut p, ms(1));
    let ev = primary_events(&mut p);
    assert!(
        matches!(&ev[..], [PrimaryEvent::Welcomed, PrimaryEvent::Nacked { seq: 1, .. }]),
        "{ev:?}"
    );
    assert_eq!(p.unacked().collect::<Vec<_>>(), vec![1, 2, 3]);
    // Only the Nacked seq may be rewound to, and only once per Nack.
    assert!(matches!(
        p.begin_checkpoint(2, 0, CkptCounts::default()),
        Err(ProtoError::Misuse(_))
    ));
    for (i, s) in specs.iter().enumerate() {
        send(p.sender(), i as u64 + 1, s);
    }
    assert!(matches!(
        p.begin_checkpoint(1, 0, CkptCounts::default()),
        Err(ProtoError::Misuse(_))
    ));
    b.handle_input(ms(2), &p.poll_output().unwrap());
    let ev = backup_events(&mut b);
    assert_eq!(ev.len(), 3);
    for (i, e) in ev.iter().enumerate() {
        let BackupEvent::Checkpoint(c) = e else { panic!("{e:?}") };
        specs[i].check(i as u64 + 1, c);
        b.ack(c.seq).unwrap();
    }
    backup_to_primary(&mut b, &mut p, ms(2));
    assert_eq!(
        primary_events(&mut p),
        vec![
            PrimaryEvent::Acked { seq: 1 },
            PrimaryEvent::Acked { seq: 2 },
            PrimaryEvent::Acked { seq: 3 }
        ]
    );
    assert_eq!(p.lag(), 0);
}

/// A corrupt message makes the backup Nack at once, before the primary has
/// even ended the checkpoint.
#[test]
fn nack_before_the_end() {
    let mut p = primary();
    let mut b = backup();
    b.handle_input(T0, &p.poll_output().unwrap());
    backup_to_primary(&mut b, &mut p, T0);
    let counts = CkptCounts {
        pages: 2,
        ..CkptCounts::default()
    };
    p.begin_checkpoint(1, 1, counts).unwrap();
    let (a, c) = (page(1), page(2));
    p.pages([(0u64, &a)]).unwrap();
    let mut s = p.poll_output().unwrap();
    let n = s.len();
    s[n - 5] ^= 0x80;
    b.handle_input(ms(1), &s);
    backup_to_primary(&mut b, &mut p, ms(1));
    let ev = primary_events(&mut p);
    assert!(
        matches!(&ev[..], [PrimaryEvent::Welcomed, PrimaryEvent::Nacked { seq: 1, .. }]),
        "{ev:?}"
    );
    // The driver finishes the open checkpoint, then resends it.
    p.pages([(4096u64, &c)]).unwrap();
    p.end_checkpoint().unwrap();
    p.begin_checkpoint(1, 1, counts).unwrap();
    p.pages([(0u64, &a), (4096u64, &c)]).unwrap();
    p.end_checkpoint().unwrap();
    b.handle_input(ms(2), &p.poll_output().unwrap());
    let ev = backup_events(&mut b);
    assert!(
        matches!(&ev[..], [BackupEvent::Connected { .. }, BackupEvent::CheckpointRefused { seq: 1, .. }, BackupEvent::Checkpoint(c)] if c.page_count() == 2),
        "{ev:?}"
    );
}

/// Every single-byte flip of a small stream, exhaustively.
#[test]
fn every_flip_of_a_small_stream() {
    let specs = [
        Spec {
            epoch: 9,
            pages: vec![(0x5000, 3)],
            state: bytes(1, 40),
            engines: vec![(1, bytes(2, 9))],
            disk: vec![],
        },
        Spec {
            epoch: 10,
            pages: vec![],
            state: bytes(3, 5),
            engines: vec![],
            disk: vec![(0, 512, bytes(4, 20))],
        },
    ];
    let mut p = primary();
    for (i, s) in specs.iter().enumerate() {
        send(p.sender(), i as u64 + 1, s);
    }
    let clean = p.poll_output().unwrap();
    let mut fatal = 0;
    let mut refused = 0;
    for pos in 0..clean.len() {
        let mut s = clean.clone();
        s[pos] ^= 0x04;
        let mut b = backup();
        b.handle_input(T0, &s);
        let mut ok = 0;
        let mut resend_from = None;
        for e in backup_events(&mut b) {
            match e {
                BackupEvent::Connected { .. } => {}
                BackupEvent::Checkpoint(c) => {
                    specs[c.seq as usize - 1].check(c.seq, &c);
                    ok += 1;
                }
                BackupEvent::CheckpointRefused { seq, .. } => {
                    assert!(resend_from.is_none());
                    resend_from = Some(seq);
                }
                BackupEvent::ProtocolError { .. } => fatal += 1,
                e => panic!("flip at {pos}: {e:?}"),
            }
        }
        if let Some(seq) = resend_from {
            refused += 1;
            let mut q = primary();
            q.poll_output();
            for (i, s) in specs.iter().enumerate() {
                send(q.sender(), i as u64 + 1, s);
            }
            // Only the resent part: skip what the backup already has.
            let mut again = Vec::new();
            let all = q.poll_output().unwrap();
            let mut d = Decoder::new();
            d.feed(&all);
            let mut cur = 0;
            while let Some(Frame::Message { msg, .. }) = d.next().unwrap() {
                if let Message::CkptBegin { seq: s, .. } = msg {
                    cur = s;
                }
                if cur >= seq {
                    msg.encode(&mut again).unwrap();
                }
            }
            b.handle_input(T0, &again);
            for e in backup_events(&mut b) {
                let BackupEvent::Checkpoint(c) = e else {
                    panic!("flip at {pos}: {e:?}")
                };
                specs[c.seq as usize - 1].check(c.seq, &c);
                ok += 1;
            }
            assert_eq!(ok, 2, "flip at {pos}");
        } else if !b.is_closed() {
            assert_eq!(ok, 2, "flip at {pos}: nothing happened");
        }
    }
    assert!(fatal > 0 && refused > 0);
}

#[test]
fn backup_heartbeats_and_primary_timeout() {
    let mut b = backup();
    assert_eq!(b.poll_timeout(), Some(Duration::ZERO));
    b.handle_timeout(T0);
    // Waiting for Hello: only the liveness deadline.
    assert_eq!(b.poll_timeout(), Some(ms(100)));
    b.handle_input(ms(10), &encode(&[hello()]));
    b.poll_output();
    backup_events(&mut b);
    assert_eq!(b.poll_timeout(), Some(ms(30)));
    b.handle_timeout(ms(29));
    assert_eq!(b.poll_output(), None);
    b.handle_timeout(ms(30));
    let hb = (ms(30)).as_nanos() as u64;
    assert_eq!(
        decode_all(&b.poll_output().unwrap()),
        vec![Message::Heartbeat { sent_at_ns: hb }]
    );
    assert_eq!(b.poll_timeout(), Some(ms(50)));
    // The primary's heartbeat keeps it alive.
    b.handle_input(ms(60), &encode(&[Message::Heartbeat { sent_at_ns: 5 }]));
    b.handle_timeout(ms(159));
    assert!(backup_events(&mut b).is_empty());
    assert_eq!(b.poll_timeout(), Some(ms(160).min(ms(179))));
    b.handle_timeout(ms(160));
    let ev = backup_events(&mut b);
    assert!(
        matches!(&ev[..], [BackupEvent::PrimaryLost { why }] if why.contains("100ms")),
        "{ev:?}"
    );
    assert!(b.is_closed());
    assert_eq!(b.poll_timeout(), None);
    // The driver may still learn it cannot ack any more.
    assert_eq!(b.ack(1), Err(ProtoError::Closed));
}

#[test]
fn primary_heartbeats_and_backup_timeout() {
    let mut p = primary();
    assert_eq!(p.poll_timeout(), Some(Duration::ZERO));
    p.handle_timeout(T0);
    assert_eq!(p.poll_timeout(), Some(ms(20)));
    // The Hello is still unsent: it counts as sent now.
    p.output().clear();
    p.handle_timeout(ms(20));
    let hb = ms(20).as_nanos() as u64;
    assert_eq!(
        decode_all(&p.poll_output().unwrap()),
        vec![Message::Heartbeat { sent_at_ns: hb }]
    );
    // Sending checkpoint data postpones the heartbeat.
    p.handle_timeout(ms(30));
    p.begin_checkpoint(1, 1, CkptCounts::default()).unwrap();
    p.end_checkpoint().unwrap();
    p.output().clear();
    p.handle_timeout(ms(49));
    assert!(p.output().is_empty());
    // Backup bytes keep the receiver happy ...
    p.handle_input(ms(50), &encode(&[Message::Welcome { version: 1 }]));
    p.handle_timeout(ms(149));
    assert_eq!(primary_events(&mut p), vec![PrimaryEvent::Welcomed]);
    // ... silence for 100 ms does not.
    p.handle_timeout(ms(150));
    let ev = primary_events(&mut p);
    assert!(
        matches!(&ev[..], [PrimaryEvent::BackupLost { why }] if why.contains("no bytes")),
        "{ev:?}"
    );
    assert!(p.is_closed());
}

#[test]
fn shutdown_means_no_takeover() {
    let mut p = primary();
    let mut b = backup();
    p.shutdown("guest powered off").unwrap();
    assert_eq!(p.shutdown("again"), Err(ProtoError::Closed));
    assert_eq!(p.begin_checkpoint(1, 0, CkptCounts::default()), Err(ProtoError::Closed));
    b.handle_input(T0, &p.poll_output().unwrap());
    assert_eq!(
        backup_events(&mut b),
        vec![
            BackupEvent::Connected {
                output: OutputMode::Speculative,
                epoch_ms: 25
            },
            BackupEvent::Shutdown {
                reason: "guest powered off".into()
            }
        ]
    );
    b.handle_eof();
    b.handle_timeout(ms(10_000));
    assert!(backup_events(&mut b).is_empty());
}

#[test]
fn eof_loses_the_peer() {
    let mut b = connected_backup();
    let s = state_only(1);
    b.handle_input(T0, &s[..s.len() - 3]);
    b.handle_eof();
    let ev = backup_events(&mut b);
    assert!(
        matches!(&ev[..], [BackupEvent::PrimaryLost { why }] if why.contains("during checkpoint 1")),
        "{ev:?}"
    );
    let mut p = primary();
    p.handle_eof();
    assert!(matches!(&primary_events(&mut p)[..], [PrimaryEvent::BackupLost { .. }]));
}

#[test]
fn backup_ack_must_follow_delivery() {
    let mut b = connected_backup();
    assert!(matches!(b.ack(1), Err(ProtoError::Misuse(_))));
    b.handle_input(T0, &state_only(1));
    b.handle_input(T0, &state_only(2));
    assert_eq!(backup_events(&mut b).len(), 2);
    assert!(matches!(b.ack(2), Err(ProtoError::Misuse(_))));
    b.ack(1).unwrap();
    assert!(matches!(b.ack(1), Err(ProtoError::Misuse(_))));
    b.ack(2).unwrap();
    assert_eq!(
        decode_all(&b.poll_output().unwrap()),
        vec![Message::Ack { seq: 1 }, Message::Ack { seq: 2 }]
    );
    assert_eq!((b.delivered(), b.acked()), (2, 2));
}

#[test]
fn primary_sender_checks_its_driver() {
    let mut p = primary();
    let pg = page(0);
    assert!(matches!(p.pages([(0u64, &pg)]), Err(ProtoError::Misuse(_))));
    assert!(matches!(p.end_checkpoint(), Err(ProtoError::Misuse(_))));
    assert!(matches!(
        p.begin_checkpoint(2, 0, CkptCounts::default()),
        Err(ProtoError::Misuse(_))
    ));
    let counts = CkptCounts {
        pages: 1,
        state_len: 2,
        engines: 1,
        disk_writes: 1,
    };
    p.begin_checkpoint(1, 0, counts).unwrap();
    assert!(matches!(p.begin_checkpoint(2, 0, counts), Err(ProtoError::Misuse(_))));
    let before = p.output().len();
    assert!(matches!(
        p.pages([(0u64, &pg), (4096, &pg)]),
        Err(ProtoError::Misuse(_))
    ));
    assert_eq!(p.output().len(), before, "nothing written for the refused message");
    assert!(matches!(p.state(&[1, 2, 3]), Err(ProtoError::Misuse(_))));
    assert!(matches!(p.end_checkpoint(), Err(ProtoError::Misuse(_))));
    p.pages([(0u64, &pg)]).unwrap();
    p.state(&[1, 2]).unwrap();
    p.engine(0, b"delta").unwrap();
    assert!(matches!(p.engine(0, b"delta"), Err(ProtoError::Misuse(_))));
    p.disk_write(0, 0, b"x").unwrap();
    assert!(matches!(p.disk_write(0, 0, b"x"), Err(ProtoError::Misuse(_))));
    assert_eq!(p.end_checkpoint(), Ok(1));
    assert_eq!(p.unacked().collect::<Vec<_>>(), vec![1]);
    assert_eq!(p.lag(), 1);
}

#[test]
fn primary_receiver_checks_the_backup() {
    // An Ack for a checkpoint never sent.
    let mut p = primary();
    p.handle_input(T0, &encode(&[Message::Welcome { version: 1 }, Message::Ack { seq: 1 }]));
    let ev = primary_events(&mut p);
    assert!(
        matches!(&ev[..], [PrimaryEvent::Welcomed, PrimaryEvent::BackupLost { why }] if why.contains("Ack 1")),
        "{ev:?}"
    );
    // Ack before Welcome.
    let mut p = primary();
    p.handle_input(T0, &encode(&[Message::Ack { seq: 1 }]));
    assert!(
        matches!(&primary_events(&mut p)[..], [PrimaryEvent::BackupLost { why }] if why.contains("expected Welcome"))
    );
    // A corrupt Ack is ignored (the next one covers it); Acks are cumulative.
    let mut p = primary();
    for seq in 1..=3 {
        p.begin_checkpoint(seq, seq, CkptCounts::default()).unwrap();
        p.end_checkpoint().unwrap();
    }
    let mut s = encode(&[Message::Welcome { version: 1 }, Message::Ack { seq: 1 }]);
    let n = s.len();
    s[n - 6] ^= 1;
    s.extend(encode(&[Message::Ack { seq: 3 }]));
    p.handle_input(T0, &s);
    assert_eq!(
        primary_events(&mut p),
        vec![PrimaryEvent::Welcomed, PrimaryEvent::Acked { seq: 3 }]
    );
    assert_eq!(p.lag(), 0);
    // A corrupt Nack is fatal: the backup would wait for a resend forever.
    let mut s = encode(&[Message::Nack {
        seq: 1,
        reason: "x".into(),
    }]);
    s[20] ^= 1;
    p.handle_input(T0, &s);
    assert!(matches!(&primary_events(&mut p)[..], [PrimaryEvent::BackupLost { .. }]));
}

/// A sender thread and a reader thread, sharing only the session's halves.
#[test]
fn split_across_threads() {
    use std::sync::mpsc;
    let p = primary();
    let (mut tx, mut rx) = p.split();
    let (to_backup, from_primary) = mpsc::channel::<Vec<u8>>();
    let (to_primary, from_backup) = mpsc::channel::<Vec<u8>>();
    const N: u64 = 50;
    let sender = std::thread::spawn(move || {
        to_backup.send(tx.poll_output().unwrap()).unwrap();
        for seq in 1..=N {
            // At most 3 checkpoints in flight.
            while tx.lag() >= 3 {
                std::thread::yield_now();
            }
            let spec = Spec {
                epoch: seq,
                pages: vec![(seq << 12, seq as u32)],
                state: bytes(seq as u32, 64),
                engines: vec![],
                disk: vec![],
            };
            send(&mut tx, seq, &spec);
            to_backup.send(tx.poll_output().unwrap()).unwrap();
        }
        while tx.lag() > 0 {
            std::thread::yield_now();
        }
        tx.unacked().count()
    });
    let reader = std::thread::spawn(move || {
        let mut events = Vec::new();
        for bytes in from_backup {
            rx.handle_input(T0, &bytes);
            events.extend(std::iter::from_fn(|| rx.poll_event()));
        }
        events
    });
    let mut b = backup();
    let mut got = 0;
    for bytes in from_primary {
        b.handle_input(T0, &bytes);
        for e in backup_events(&mut b) {
            if let BackupEvent::Checkpoint(c) = e {
                got += 1;
                assert_eq!(c.seq, got);
                b.ack(c.seq).unwrap();
            }
        }
        if let Some(out) = b.poll_output() {
            to_primary.send(out).unwrap();
        }
    }
    drop(to_primary);
    assert_eq!(sender.join().unwrap(), 0);
    let events = reader.join().unwrap();
    assert_eq!(events.len() as u64, N + 1);
    assert_eq!(events[0], PrimaryEvent::Welcomed);
    assert_eq!(events[N as usize], PrimaryEvent::Acked { seq: N });
}

/// `cargo test -p remora-proto --release -- --ignored --nocapture bench`
#[test]
#[ignore]
fn bench_pages_256mib() {
    const PAGES_PER_CKPT: usize = 4096; // 16 MiB
    const CKPTS: u64 = 16; // 256 MiB
    let staging: Vec<(u64, [u8; PAGE_SIZE])> = (0..PAGES_PER_CKPT)
        .map(|i| ((i as u64) << 12, page(i as u32)))
        .collect();
    let mut id = identity();
    id.mem_mib = 1024;
    let mut p = PrimarySession::new(PrimaryConfig::new(id.clone(), OutputMode::Speculative, 25)).unwrap();
    let mut b = BackupSession::new(BackupConfig::new(id));
    b.handle_input(T0, &p.poll_output().unwrap());
    let mut encode_t = Duration::ZERO;
    let mut decode_t = Duration::ZERO;
    let mut pages_seen = 0usize;
    for seq in 1..=CKPTS {
        let counts = CkptCounts {
            pages: PAGES_PER_CKPT as u64,
            ..CkptCounts::default()
        };
        let t = Instant::now();
        p.begin_checkpoint(seq, seq, counts).unwrap();
        p.pages(staging.iter().map(|(g, pg)| (*g, pg))).unwrap();
        p.end_checkpoint().unwrap();
        encode_t += t.elapsed();
        let t = Instant::now();
        for chunk in p.output().chunks(1 << 20) {
            b.handle_input(T0, chunk);
            while let Some(e) = b.poll_event() {
                if let BackupEvent::Checkpoint(c) = e {
                    pages_seen += c.page_count();
                    b.ack(c.seq).unwrap();
                }
            }
        }
        decode_t += t.elapsed();
        p.output().clear();
    }
    assert_eq!(pages_seen, PAGES_PER_CKPT * CKPTS as usize);
    let mb = (PAGES_PER_CKPT as f64 * CKPTS as f64 * PAGE_SIZE as f64) / 1e6;
    println!(
        "pages: {mb:.0} MB; encode {:.0} MB/s ({encode_t:?}), decode+verify {:.0} MB/s ({decode_t:?})",
        mb / encode_t.as_secs_f64(),
        mb / decode_t.as_secs_f64()
    );
}

/// Heartbeats may fall between the messages of a checkpoint: they are not
/// part of it (nor of its digest).
#[test]
fn heartbeats_inside_a_checkpoint() {
    let mut p = primary();
    let mut b = backup();
    p.handle_timeout(T0);
    let counts = CkptCounts {
        pages: 1,
        state_len: 4,
        ..CkptCounts::default()
    };
    p.begin_checkpoint(1, 7, counts).unwrap();
    p.handle_timeout(ms(20));
    let pg = page(9);
    p.pages([(0x8000u64, &pg)]).unwrap();
    p.handle_timeout(ms(40));
    p.state(&[1, 2, 3, 4]).unwrap();
    p.handle_timeout(ms(60));
    p.end_checkpoint().unwrap();
    let s = p.poll_output().unwrap();
    let kinds: Vec<_> = decode_all(&s).iter().map(Message::kind).collect();
    use remora_proto::Kind::*;
    assert_eq!(
        kinds,
        vec![Hello, CkptBegin, Heartbeat, CkptPages, Heartbeat, CkptState, Heartbeat, CkptEnd]
    );
    b.handle_input(T0, &s);
    let ev = backup_events(&mut b);
    let want = Spec {
        epoch: 7,
        pages: vec![(0x8000, 9)],
        state: vec![1, 2, 3, 4],
        engines: vec![],
        disk: vec![],
    };
    match &ev[..] {
        [BackupEvent::Connected { .. }, BackupEvent::Checkpoint(c)] => want.check(1, c),
        _ => panic!("{ev:?}"),
    }
}

/// A backup that builds its standby VM from the Hello configures memory,
/// vCPUs and disk ids as 0; the rest is still compared.
#[test]
fn zeros_in_the_backup_identity_accept_the_primary() {
    let mut any = identity();
    any.mem_mib = 0;
    any.vcpus = 0;
    for d in &mut any.devices {
        if let DeviceIdentity::Disk { id, .. } = d {
            *id = [0; 20];
        }
    }
    let mut b = BackupSession::new(BackupConfig::new(any.clone()));
    assert_eq!(b.primary_identity(), None);
    b.handle_input(T0, &encode(&[hello()]));
    assert!(matches!(&backup_events(&mut b)[..], [BackupEvent::Connected { .. }]));
    assert_eq!(b.primary_identity(), Some(&identity()));
    // The guest's page count comes from the Hello.
    let p0 = page(1);
    let pages = remora_proto::PagesPayload::from_pages([(0x1000u64, &p0)]).unwrap();
    let counts = CkptCounts {
        pages: 1,
        ..CkptCounts::default()
    };
    b.handle_input(T0, &ckpt(1, counts, &[Message::CkptPages { pages }], None));
    assert!(matches!(&backup_events(&mut b)[..], [BackupEvent::Checkpoint(c)] if c.page_count() == 1));

    // Devices still count.
    any.devices.pop();
    let mut b = BackupSession::new(BackupConfig::new(any));
    b.handle_input(T0, &encode(&[hello()]));
    let ev = backup_events(&mut b);
    assert!(
        matches!(&ev[..], [BackupEvent::Refused { reason }] if reason.starts_with("device count differs")),
        "{ev:?}"
    );
}
