//! Incremental frame decoder.

use std::collections::VecDeque;

use crc32fast::Hasher;

use crate::error::ProtoError;
use crate::wire::{parse_header, Kind, Message, PayloadSum, HEADER_LEN, TRAILER_LEN};

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An intact message, and its payload's crc and length (the backup
    /// combines them into the checkpoint digest).
    Message { msg: Message, sum: PayloadSum },
    /// A frame whose header was intact but whose payload failed its crc: the
    /// message is lost, the stream is still in sync. `kind` is trustworthy
    /// (the header crc covers it).
    Corrupt { kind: Kind, len: u32 },
}

enum State {
    Header,
    Payload {
        kind: Kind,
        len: usize,
        buf: Vec<u8>,
        hasher: Hasher,
    },
    Trailer {
        kind: Kind,
        buf: Vec<u8>,
        hasher: Hasher,
    },
}

/// Incremental decoder: [`Decoder::feed`] bytes as they arrive, in pieces of
/// any size, then take the frames with [`Decoder::next`].
///
/// `feed` parses at once: page data is copied exactly once, from the slice
/// fed straight into the payload buffer that the [`Frame`] hands out (the
/// payload buffer is allocated at its final size as soon as the header is
/// read; the crc is computed on the way). What it holds is therefore the
/// frames completed by the bytes fed so far (no more than those bytes) plus
/// the one frame in progress: call `next` until it returns `Ok(None)` after
/// every `feed` and the decoder never holds more than one read plus one
/// message.
///
/// A bad magic, a bad header crc, an unknown kind, nonzero flags, an
/// oversize length or a malformed payload are fatal: `next` returns the
/// frames before it, then the error, on every call from then on; later
/// input is ignored. A payload whose crc is wrong comes out as
/// [`Frame::Corrupt`].
pub struct Decoder {
    header: [u8; HEADER_LEN],
    header_have: usize,
    trailer: [u8; TRAILER_LEN],
    trailer_have: usize,
    state: State,
    ready: VecDeque<Frame>,
    fatal: Option<ProtoError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            header: [0; HEADER_LEN],
            header_have: 0,
            trailer: [0; TRAILER_LEN],
            trailer_have: 0,
            state: State::Header,
            ready: VecDeque::new(),
            fatal: None,
        }
    }

    /// True if part of a frame has been fed but not completed (a stream that
    /// ends now is truncated).
    pub fn in_frame(&self) -> bool {
        self.header_have > 0 || !matches!(self.state, State::Header)
    }

    /// True once a fatal error was found.
    pub fn is_failed(&self) -> bool {
        self.fatal.is_some()
    }

    /// Takes more input. Every byte is consumed (copied into the frame in
    /// progress or dropped after a fatal error).
    pub fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() && self.fatal.is_none() {
            match &mut self.state {
                State::Header => {
                    let take = (HEADER_LEN - self.header_have).min(input.len());
                    self.header[self.header_have..self.header_have + take].copy_from_slice(&input[..take]);
                    self.header_have += take;
                    input = &input[take..];
                    if self.header_have == HEADER_LEN {
                        self.header_have = 0;
                        match parse_header(&self.header) {
                            Ok((kind, len)) => {
                                let len = len as usize;
                                let buf = Vec::with_capacity(len);
                                self.state = if len == 0 {
                                    State::Trailer {
                                        kind,
                                        buf,
                                        hasher: Hasher::new(),
                                    }
                                } else {
                                    State::Payload {
                                        kind,
                                        len,
                                        buf,
                                        hasher: Hasher::new(),
                                    }
                                };
                            }
                            Err(e) => self.fatal = Some(e),
                        }
                    }
                }
                State::Payload { kind, len, buf, hasher } => {
                    let take = (*len - buf.len()).min(input.len());
                    let (chunk, rest) = input.split_at(take);
                    hasher.update(chunk);
                    buf.extend_from_slice(chunk);
                    input = rest;
                    if buf.len() == *len {
                        let kind = *kind;
                        let buf = std::mem::take(buf);
                        let hasher = std::mem::take(hasher);
                        self.state = State::Trailer { kind, buf, hasher };
                    }
                }
                State::Trailer { .. } => {
                    let take = (TRAILER_LEN - self.trailer_have).min(input.len());
                    self.trailer[self.trailer_have..self.trailer_have + take].copy_from_slice(&input[..take]);
                    self.trailer_have += take;
                    input = &input[take..];
                    if self.trailer_have == TRAILER_LEN {
                        self.trailer_have = 0;
                        if let State::Trailer { kind, buf, hasher } = std::mem::replace(&mut self.state, State::Header)
                        {
                            self.complete(kind, buf, hasher);
                        }
                    }
                }
            }
        }
    }

    fn complete(&mut self, kind: Kind, buf: Vec<u8>, hasher: Hasher) {
        let stored = u32::from_le_bytes(self.trailer);
        let crc = hasher.finalize();
        // The length is at most MAX_PAYLOAD, checked with the header.
        let len = buf.len() as u32;
        if stored != crc {
            self.ready.push_back(Frame::Corrupt { kind, len });
            return;
        }
        match Message::decode(kind, buf) {
            Ok(msg) => self.ready.push_back(Frame::Message {
                msg,
                sum: PayloadSum { crc, len },
            }),
            Err(e) => self.fatal = Some(e),
        }
    }

    /// The next complete frame: `Ok(None)` when more input is needed,
    /// `Err` (for good) once the stream turned out unusable.
    #[allow(clippy::should_implement_trait)] // a Result-returning next, not an Iterator
    pub fn next(&mut self) -> Result<Option<Frame>, ProtoError> {
        if let Some(f) = self.ready.pop_front() {
            return Ok(Some(f));
        }
        match &self.fatal {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{build_header, MAX_PAYLOAD};

    fn frames(msgs: &[Message]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            m.encode(&mut out).unwrap();
        }
        out
    }

    fn drain(d: &mut Decoder) -> Result<Vec<Frame>, ProtoError> {
        let mut v = Vec::new();
        while let Some(f) = d.next()? {
            v.push(f);
        }
        Ok(v)
    }

    fn msgs_of(frames: Vec<Frame>) -> Vec<Message> {
        frames
            .into_iter()
            .map(|f| match f {
                Frame::Message { msg, .. } => msg,
                Frame::Corrupt { .. } => panic!("corrupt"),
            })
            .collect()
    }

    fn sample() -> Vec<Message> {
        vec![
            Message::Welcome { version: 1 },
            Message::Refuse { reason: String::new() },
            Message::CkptState {
                bytes: (0..=255).collect(),
            },
            Message::Heartbeat { sent_at_ns: 7 },
            Message::CkptDisk {
                disk: 1,
                offset: 512,
                data: vec![9; 1000],
            },
        ]
    }

    #[test]
    fn every_split_point() {
        let msgs = sample();
        let bytes = frames(&msgs);
        for cut in 0..=bytes.len() {
            let mut d = Decoder::new();
            d.feed(&bytes[..cut]);
            let mut got = drain(&mut d).unwrap();
            d.feed(&bytes[cut..]);
            got.extend(drain(&mut d).unwrap());
            assert_eq!(msgs_of(got), msgs, "cut at {cut}");
            assert!(!d.in_frame());
        }
    }

    #[test]
    fn byte_by_byte() {
        let msgs = sample();
        let bytes = frames(&msgs);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.feed(std::slice::from_ref(b));
            got.extend(drain(&mut d).unwrap());
        }
        assert_eq!(msgs_of(got), msgs);
    }

    #[test]
    fn corrupt_payload_is_skipped() {
        let msgs = sample();
        let mut bytes = frames(&msgs);
        // Inside the third message's payload.
        let mut first_two = Vec::new();
        msgs[0].encode(&mut first_two).unwrap();
        msgs[1].encode(&mut first_two).unwrap();
        bytes[first_two.len() + HEADER_LEN + 3] ^= 0x40;
        let mut d = Decoder::new();
        d.feed(&bytes);
        let got = drain(&mut d).unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(
            got[2],
            Frame::Corrupt {
                kind: Kind::CkptState,
                len: 256
            }
        );
        assert!(matches!(
            &got[3],
            Frame::Message {
                msg: Message::Heartbeat { sent_at_ns: 7 },
                ..
            }
        ));
    }

    #[test]
    fn corrupt_trailer_is_corrupt() {
        let mut bytes = frames(&[Message::Ack { seq: 3 }]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(
            drain(&mut d).unwrap(),
            vec![Frame::Corrupt {
                kind: Kind::Ack,
                len: 8
            }]
        );
    }

    #[test]
    fn header_corruption_is_fatal() {
        let one = frames(&[Message::Ack { seq: 3 }]);
        for i in 0..HEADER_LEN {
            let mut bytes = frames(&[Message::Heartbeat { sent_at_ns: 1 }]);
            bytes.extend_from_slice(&one);
            let at = bytes.len() - one.len() + i;
            bytes[at] ^= 0x10;
            let mut d = Decoder::new();
            d.feed(&bytes);
            assert!(matches!(
                d.next(),
                Ok(Some(Frame::Message {
                    msg: Message::Heartbeat { .. },
                    ..
                }))
            ));
            let e = d.next().unwrap_err();
            assert!(e.is_fatal());
            assert!(
                matches!(e, ProtoError::BadMagic(_) | ProtoError::HeaderCrc { .. }),
                "{e}"
            );
            // Sticky.
            assert_eq!(d.next().unwrap_err(), e);
        }
    }

    #[test]
    fn oversize_is_fatal() {
        let mut bytes = build_header(Kind::CkptState, MAX_PAYLOAD + 1).to_vec();
        bytes.extend_from_slice(&[0; 100]);
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(
            d.next(),
            Err(ProtoError::Oversize {
                len: u64::from(MAX_PAYLOAD) + 1
            })
        );
    }

    #[test]
    fn unknown_kind_and_flags_are_fatal() {
        let mut h = build_header(Kind::Ack, 0);
        h[4] = 99;
        let crc = crc32fast::hash(&h[..12]);
        h[12..].copy_from_slice(&crc.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&h);
        assert_eq!(d.next(), Err(ProtoError::UnknownKind(99)));

        let mut h = build_header(Kind::Ack, 0);
        h[5] = 1;
        let crc = crc32fast::hash(&h[..12]);
        h[12..].copy_from_slice(&crc.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&h);
        assert_eq!(d.next(), Err(ProtoError::UnsupportedHeader { flags: 1, reserved: 0 }));
    }

    #[test]
    fn malformed_payload_is_fatal() {
        // An Ack with 7 bytes of payload and a good crc.
        let mut bytes = build_header(Kind::Ack, 7).to_vec();
        bytes.extend_from_slice(&[1; 7]);
        bytes.extend_from_slice(&crc32fast::hash(&[1; 7]).to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert!(matches!(d.next(), Err(ProtoError::Malformed { kind: Kind::Ack, .. })));
    }

    #[test]
    fn in_frame_tracks_partial_frames() {
        let bytes = frames(&[Message::Ack { seq: 3 }]);
        let mut d = Decoder::new();
        assert!(!d.in_frame());
        d.feed(&bytes[..1]);
        assert!(d.in_frame());
        d.feed(&bytes[1..HEADER_LEN + 8]);
        assert!(d.in_frame());
        d.feed(&bytes[HEADER_LEN + 8..]);
        assert!(!d.in_frame());
    }
}
