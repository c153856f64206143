//! Checkpoint deltas of the engine's state, for replication to a backup.
//!
//! The primary calls [`Engine::checkpoint`] right after
//! [`Engine::seal_epoch`], inside the VM pause. The first checkpoint (after
//! [`Engine::new`] or [`Engine::reset_checkpoint_base`]) is a full *base*;
//! every later one is a *delta* relative to the previous checkpoint. The
//! cost of a delta is O(changed flows + bytes appended to held streams since
//! the previous checkpoint + raw frames sealed since then): held bytes that
//! the replica already has are never copied again.
//!
//! Change tracking: every mutable access to a flow goes through
//! [`FlowTable`], which marks the flow dirty (and queues its key) the first
//! time after a checkpoint; removals of flows the replica knows are queued
//! too. Each flow counts the bytes ever appended to its held stream, so a
//! delta carries exactly the tail the replica lacks and how many bytes to
//! drop from the front (acknowledged by the peer).
//!
//! Wire format of [`EngineDelta::encode`]: `b"RSPD"`, version (u16 LE),
//! header length (u64 LE), the header (bincode 2, standard config: every
//! field but byte payloads), then the data section: the appended stream bytes
//! and raw frames, back to back, referenced from the header by offset and
//! length in a fixed order. Byte payloads are therefore copied, never
//! decoded element by element, and are allocated only once their lengths
//! are checked against the input's (other sequences read from the input
//! preallocate at most serde's cautious 1 MiB).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Item};
use crate::flow::{Flow, FlowKey};
use crate::{Config, ConfigError, EpochId, Stats};

// ---------------------------------------------------------------------------
// Bookkeeping and change tracking (primary side).

/// Checkpoint bookkeeping kept inside engine state: equal to any other
/// (so `==` on the engine compares state only), not printed by `Debug`
/// (so the `Debug` output of equal engines is equal up to the order of
/// flows) and never serialised.
#[derive(Clone, Default)]
pub(crate) struct NotState<T>(pub T);

impl<T> std::fmt::Debug for NotState<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("_")
    }
}

impl<T> PartialEq for NotState<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for NotState<T> {}

/// Per-flow checkpoint marks.
#[derive(Clone, Debug, Default)]
pub(crate) struct FlowMark {
    /// The replica has this flow (it was in a checkpoint since the base).
    pub sent: bool,
    /// Changed since the last checkpoint (its key is in the dirty list).
    pub dirty: bool,
    /// Bytes ever appended to the held stream (a running count: only
    /// differences matter; re-based at every full capture).
    pub pushed: u64,
    /// `pushed` and the held length at the last checkpoint.
    pub ckpt_pushed: u64,
    pub ckpt_len: u64,
    /// The flow's live entry in the timer heap: never later than its next
    /// deadline (entries are not moved when a deadline moves later).
    pub sched: Option<Duration>,
    /// Mutably accessed since the timers were last synchronised (its key
    /// is in `Timers::touched`).
    pub timer_touched: bool,
}

/// Engine-wide checkpoint marks.
#[derive(Clone, Debug, Default)]
pub(crate) struct EngineMark {
    /// Sequence number of the next checkpoint; `None`: the next one is a base.
    pub next_seq: Option<u64>,
    /// Sealed epochs with a smaller id are in the replica already.
    pub sealed_sent: u64,
    /// Identifies the base the next deltas build on: how many bases this
    /// engine took (kept across `reset_checkpoint_base`) and its epoch
    /// counter at the base. Sequence numbers restart at 0 with every base,
    /// so without it a replica holding an older base would apply the
    /// deltas of a newer base it never received (a lost base).
    pub base_id: [u64; 2],
}

#[derive(Clone, Debug, Default)]
pub(crate) struct TableMark {
    /// Changes are tracked (a base was taken; the next checkpoint is a delta).
    /// Off otherwise, so that an engine never checkpointed keeps no lists.
    track: bool,
    /// Flows marked dirty since the last checkpoint (may hold stale keys).
    dirty: Vec<FlowKey>,
    /// Keys of flows the replica has that were removed since.
    removed: Vec<FlowKey>,
}

/// The flows' deadlines: a min-heap with lazy deletion. Every flow with a
/// deadline has one live entry (`FlowMark::sched`) no later than it; other
/// entries (of removed flows, or superseded by an earlier one) are stale
/// and dropped when they reach the top. After `sync`, the top entry is
/// live and exact: the earliest deadline of all flows.
#[derive(Clone, Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Duration, FlowKey)>>,
    /// Flows accessed mutably (other than through `FlowMut`) since the
    /// last `sync`.
    touched: Vec<FlowKey>,
    /// The flow re-filed last, if its entry is exact: the top needs no
    /// lookup of it (the common case of one busy flow).
    exact: Option<(Duration, FlowKey)>,
    /// `Config::idle_timeout` (part of every established flow's deadline).
    pub idle: Duration,
    /// Flow deadlines evaluated (diagnostics: the cost of timer upkeep).
    pub work: u64,
}

impl Timers {
    /// Files a flow's deadline after a change: an earlier deadline gets a
    /// new entry; a later one (or none) re-files the flow at once only if
    /// its entry is the top, else when that entry reaches the top.
    fn refile(&mut self, f: &mut Flow) {
        self.work += 1;
        let k = f.key;
        let d = f.next_deadline(self.idle);
        let m = &mut f.mark.0;
        match (d, m.sched) {
            (Some(d), s) if s.is_none_or(|s| d < s) => {
                m.sched = Some(d);
                self.heap.push(Reverse((d, k)));
            }
            (d, Some(s)) if d != Some(s) && self.heap.peek() == Some(&Reverse((s, k))) => {
                self.heap.pop();
                m.sched = d;
                if let Some(d) = d {
                    self.heap.push(Reverse((d, k)));
                }
            }
            _ => {}
        }
        self.exact = d.filter(|d| m.sched == Some(*d)).map(|d| (d, k));
    }

    /// A flow leaves the table (or is replaced): its entries become stale.
    fn forget(&mut self, k: &FlowKey) {
        if self.exact.is_some_and(|(_, e)| e == *k) {
            self.exact = None;
        }
    }
}

/// Mutable access to a flow; its deadline is re-filed in the timer heap
/// when the access ends (no second lookup of the flow).
pub(crate) struct FlowMut<'a> {
    flow: &'a mut Flow,
    timers: &'a mut Timers,
}

impl std::ops::Deref for FlowMut<'_> {
    type Target = Flow;
    fn deref(&self) -> &Flow {
        self.flow
    }
}

impl std::ops::DerefMut for FlowMut<'_> {
    fn deref_mut(&mut self) -> &mut Flow {
        self.flow
    }
}

impl Drop for FlowMut<'_> {
    fn drop(&mut self) {
        self.timers.refile(self.flow);
    }
}

/// The flow table: a map whose mutable accessors record what changed (for
/// checkpoints and for the timer heap).
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct FlowTable {
    /// foldhash: several times cheaper than SipHash per frame, and still
    /// seeded at random per table (flow keys come from the network).
    map: HashMap<FlowKey, Flow, foldhash::fast::RandomState>,
    mark: NotState<TableMark>,
    pub(crate) timers: NotState<Timers>,
}

/// Flows sorted by key, so that equal engines print the same.
impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut v: Vec<_> = self.map.iter().collect();
        v.sort_by_key(|(k, _)| **k);
        f.debug_map().entries(v).finish()
    }
}

impl FlowTable {
    fn touch_ckpt(m: &mut TableMark, f: &mut Flow) {
        if m.track && !f.mark.0.dirty {
            f.mark.0.dirty = true;
            m.dirty.push(f.key);
        }
    }

    fn touch(m: &mut TableMark, t: &mut Timers, f: &mut Flow) {
        Self::touch_ckpt(m, f);
        if !f.mark.0.timer_touched {
            f.mark.0.timer_touched = true;
            t.touched.push(f.key);
        }
    }

    fn note_removed(m: &mut TableMark, f: &Flow) {
        if m.track && f.mark.0.sent {
            m.removed.push(f.key);
        }
    }

    pub(crate) fn get(&self, k: &FlowKey) -> Option<&Flow> {
        self.map.get(k)
    }

    pub(crate) fn contains_key(&self, k: &FlowKey) -> bool {
        self.map.contains_key(k)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Flow> {
        self.map.values()
    }

    /// Mutable access; the flow goes into the next delta, and its
    /// deadline is re-filed when the access ends.
    pub(crate) fn get_mut(&mut self, k: &FlowKey) -> Option<FlowMut<'_>> {
        let f = self.map.get_mut(k)?;
        Self::touch_ckpt(&mut self.mark.0, f);
        Some(FlowMut {
            flow: f,
            timers: &mut self.timers.0,
        })
    }

    /// Mutable access to the flows matching `pred`; they go into the next delta.
    pub(crate) fn values_mut_where(&mut self, pred: impl Fn(&Flow) -> bool) -> impl Iterator<Item = &mut Flow> {
        let m = &mut self.mark.0;
        let t = &mut self.timers.0;
        self.map.values_mut().filter_map(move |f| {
            if !pred(f) {
                return None;
            }
            Self::touch(m, t, f);
            Some(f)
        })
    }

    pub(crate) fn insert(&mut self, k: FlowKey, mut f: Flow) {
        f.mark = NotState::default();
        self.timers.0.forget(&k);
        Self::touch(&mut self.mark.0, &mut self.timers.0, &mut f);
        if let Some(old) = self.map.insert(k, f) {
            Self::note_removed(&mut self.mark.0, &old);
        }
    }

    pub(crate) fn remove(&mut self, k: &FlowKey) -> Option<Flow> {
        let f = self.map.remove(k)?;
        Self::note_removed(&mut self.mark.0, &f);
        self.timers.0.forget(k);
        Some(f)
    }

    /// Brings the timer heap up to date with the flows touched since the
    /// last call (O(touched · log n)), then drops stale or early entries
    /// from its top so that [`FlowTable::next_deadline`] is exact.
    pub(crate) fn sync_timers(&mut self, cfg: &Config) {
        let t = &mut self.timers.0;
        let mut touched = std::mem::take(&mut t.touched);
        for k in touched.drain(..) {
            if let Some(f) = self.map.get_mut(&k) {
                f.mark.0.timer_touched = false;
                t.refile(f);
            }
        }
        t.touched = touched;
        while let Some(&Reverse((s, k))) = t.heap.peek() {
            if t.exact == Some((s, k)) {
                break;
            }
            let Some(f) = self.map.get_mut(&k).filter(|f| f.mark.0.sched == Some(s)) else {
                t.heap.pop();
                continue;
            };
            t.work += 1;
            let d = f.next_deadline(t.idle);
            if d == Some(s) {
                t.exact = Some((s, k));
                break;
            }
            // The deadline moved later (or went): re-file the flow.
            t.heap.pop();
            f.mark.0.sched = d;
            if let Some(d) = d {
                t.heap.push(Reverse((d, k)));
            }
        }
        // Stale entries are dropped only when they reach the top: rebuild
        // when they outnumber the live ones (amortised O(1) per push).
        if t.heap.len() > 2 * self.map.len() + 64 {
            self.rebuild_timers(cfg);
        }
    }

    /// Rebuilds the timer heap from all flows (O(n); after a failover, and
    /// to drop stale entries).
    pub(crate) fn rebuild_timers(&mut self, cfg: &Config) {
        let t = &mut self.timers.0;
        t.touched.clear();
        t.exact = None;
        t.idle = cfg.idle_timeout;
        let mut v = Vec::with_capacity(self.map.len());
        for (k, f) in &mut self.map {
            t.work += 1;
            f.mark.0.timer_touched = false;
            f.mark.0.sched = f.next_deadline(t.idle);
            if let Some(d) = f.mark.0.sched {
                v.push(Reverse((d, *k)));
            }
        }
        t.heap = BinaryHeap::from(v);
    }

    /// The earliest deadline of all flows (exact after `sync_timers`).
    pub(crate) fn next_deadline(&self) -> Option<Duration> {
        self.timers.0.heap.peek().map(|Reverse((d, _))| *d)
    }

    /// Removes the live heap entries due at `now` and returns their flows
    /// (which may turn out not to be due: their deadline moved later).
    pub(crate) fn pop_due(&mut self, now: Duration) -> Vec<FlowKey> {
        let t = &mut self.timers.0;
        let mut due = Vec::new();
        while let Some(&Reverse((s, k))) = t.heap.peek() {
            if s > now {
                break;
            }
            t.heap.pop();
            t.work += 1;
            if let Some(f) = self.map.get_mut(&k) {
                if f.mark.0.sched == Some(s) {
                    f.mark.0.sched = None;
                    due.push(k);
                }
            }
        }
        due
    }
}

// ---------------------------------------------------------------------------
// The delta.

/// A range of the delta's data section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Chunk {
    off: u64,
    len: u64,
}

/// One flow in a delta: its metadata (everything but the held bytes) and
/// how its held stream changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FlowDelta {
    /// The flow's metadata (its `buf` is empty here).
    meta: Flow,
    /// New to the replica (or a base): `append` is the whole held stream.
    full: bool,
    /// Bytes to drop from the front of the replica's stream (acknowledged
    /// by the peer), before appending.
    drop_front: u64,
    /// Bytes appended to the stream since the last checkpoint (and not yet
    /// acknowledged).
    append: Chunk,
    /// Length of the held stream afterwards (checked by the replica).
    held: u64,
}

/// Everything in a delta but the byte payloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    base: bool,
    /// The base this checkpoint is (or builds on): see `EngineMark::base_id`.
    base_id: [u64; 2],
    current: u64,
    global_reserved: u64,
    global_held: u64,
    global_blocked: bool,
    spec_flows: u64,
    buffered_bytes: u64,
    next_flow_id: u64,
    stats: Stats,
    /// The unsealed epoch's items, whole (empty right after `seal_epoch`).
    current_items: Vec<Item<Chunk>>,
    /// The replica drops its sealed epochs below this id (committed).
    keep_sealed_from: u64,
    /// Sealed epochs the replica does not have yet (all of them in a base).
    sealed: Vec<(u64, Vec<Item<Chunk>>)>,
    /// Flows the replica has that no longer exist.
    removed: Vec<FlowKey>,
    /// Flows new or changed since the last checkpoint (all in a base).
    flows: Vec<FlowDelta>,
}

impl Head {
    /// The data-section chunks in their canonical order.
    fn chunks(&self) -> impl Iterator<Item = Chunk> + '_ {
        let raw = |i: &Item<Chunk>| match i {
            Item::Raw(c) => Some(*c),
            _ => None,
        };
        self.flows
            .iter()
            .map(|f| f.append)
            .chain(self.current_items.iter().filter_map(raw))
            .chain(
                self.sealed
                    .iter()
                    .flat_map(move |(_, items)| items.iter().filter_map(raw)),
            )
    }
}

/// One checkpoint of an engine's state: a full base or a delta relative to
/// the previous checkpoint. Produced by [`Engine::checkpoint`], carried with
/// [`EngineDelta::encode`] / [`EngineDelta::decode`], applied by an
/// [`EngineReplica`].
///
/// Contents: the sequence number (0 for a base, +1 per checkpoint since);
/// the engine-level fields (epoch counter, global reservation and held
/// counters, speculated-flow count, buffered bytes, statistics); the items
/// of sealed epochs the replica does not have (raw frames included) and the
/// first sealed epoch still uncommitted (the replica drops the ones the
/// primary committed); for every new or changed flow its metadata, the bytes
/// appended to its held stream since the previous checkpoint and how many
/// bytes the peer's ACKs dropped from the front; the keys of removed flows.
/// Frames waiting in [`Engine::poll_transmit`] are not included: they are
/// output already produced, like frames on the wire (see the README).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineDelta {
    head: Head,
    data: Vec<u8>,
}

const MAGIC: [u8; 4] = *b"RSPD";
const VERSION: u16 = 2;
const PREFIX: usize = 4 + 2 + 8;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Errors of [`EngineDelta::decode`] and [`EngineReplica::apply`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    #[error("truncated engine delta")]
    Truncated,
    #[error("not an engine delta (bad magic)")]
    BadMagic,
    #[error("unsupported engine delta version {0}")]
    Version(u16),
    #[error("malformed engine delta: {0}")]
    Malformed(String),
    #[error("engine delta {got} out of order (expected {expected:?}, or a base)")]
    OutOfOrder { expected: Option<u64>, got: u64 },
    #[error("engine delta builds on base {got:?}, the replica has base {expected:?} (a base was lost)")]
    OtherBase { expected: [u64; 2], got: [u64; 2] },
    #[error("engine delta does not fit the replica: {0}")]
    Mismatch(String),
}

fn push_bytes(data: &mut Vec<u8>, a: &[u8], b: &[u8]) -> Chunk {
    let off = data.len() as u64;
    data.extend_from_slice(a);
    data.extend_from_slice(b);
    Chunk {
        off,
        len: (a.len() + b.len()) as u64,
    }
}

/// Copies `buf[skip..]` to the data section.
fn push_tail(data: &mut Vec<u8>, buf: &VecDeque<u8>, skip: usize) -> Chunk {
    let (a, b) = buf.as_slices();
    if skip <= a.len() {
        push_bytes(data, &a[skip..], b)
    } else {
        push_bytes(data, &[], &b[(skip - a.len()).min(b.len())..])
    }
}

fn raw_chunk(data: &mut Vec<u8>, i: &Item) -> Item<Chunk> {
    i.map_raw(|f| push_bytes(data, f, &[]))
}

/// How the replica's copy of a flow's held stream must change: bytes to
/// drop from its front, and the offset in the primary's stream from which
/// the bytes are new to it (0 if `full`: the replica gets all).
fn stream_change(f: &Flow, full: bool) -> (u64, u64) {
    if full {
        return (0, 0);
    }
    // Stream positions in "bytes ever appended" coordinates: the replica
    // holds [old_start, ckpt_pushed), the primary now [new_start, pushed);
    // the stream only grows at the end and shrinks at the front.
    let held = f.buf.len() as u64;
    let m = &f.mark.0;
    debug_assert!(m.pushed >= held && m.ckpt_pushed >= m.ckpt_len);
    let new_start = m.pushed.saturating_sub(held);
    let old_start = m.ckpt_pushed.saturating_sub(m.ckpt_len);
    let drop_front = new_start.saturating_sub(old_start).min(m.ckpt_len);
    let skip = m.ckpt_pushed.saturating_sub(new_start).min(held);
    (drop_front, skip)
}

/// A flow goes into the next checkpoint (full or as a delta).
fn capture_needed(f: &Flow, base: bool) -> Option<bool> {
    let full = base || !f.mark.0.sent;
    (full || f.mark.0.dirty).then_some(full)
}

/// Captures one flow: its metadata and the part of its held stream the
/// replica lacks (all of it if `full`). Resets its marks.
fn capture_flow(f: &mut Flow, full: bool, data: &mut Vec<u8>) -> FlowDelta {
    let held = f.buf.len() as u64;
    let (drop_front, skip) = stream_change(f, full);
    let m = &mut f.mark.0;
    if full {
        m.pushed = held;
    }
    m.ckpt_pushed = m.pushed;
    m.ckpt_len = held;
    m.sent = true;
    m.dirty = false;
    let append = push_tail(data, &f.buf, skip as usize);
    let buf = std::mem::take(&mut f.buf);
    let mut meta = f.clone();
    f.buf = buf;
    meta.mark = NotState::default();
    FlowDelta {
        meta,
        full,
        drop_front,
        append,
        held,
    }
}

impl Engine {
    /// Captures the engine's state for the checkpoint of the epoch just
    /// sealed: call it right after [`Engine::seal_epoch`], inside the same
    /// pause of the VM.
    ///
    /// The first call after [`Engine::new`] or
    /// [`Engine::reset_checkpoint_base`] returns a full base (every flow
    /// with all its held bytes); each later call returns a delta relative
    /// to the previous one, costing O(changed flows + bytes appended to held
    /// streams since + raw frames sealed since). The appended bytes are
    /// copied into the delta (one copy of new data only). Deltas must reach
    /// the replica in order, none lost; after a lost one (or for a new
    /// backup) call [`Engine::reset_checkpoint_base`].
    pub fn checkpoint(&mut self) -> EngineDelta {
        self.checkpoint_with(Vec::new())
    }

    /// [`Engine::checkpoint`] copying the new bytes into `buf` (cleared
    /// first): a buffer recycled from an earlier delta
    /// ([`EngineDelta::into_buffer`]) has its pages mapped already, so the
    /// copy inside the pause takes no page faults.
    pub fn checkpoint_with(&mut self, buf: Vec<u8>) -> EngineDelta {
        let base = self.ckpt.0.next_seq.is_none();
        let seq = self.ckpt.0.next_seq.unwrap_or(0);
        let from = if base { 0 } else { self.ckpt.0.sealed_sent };
        let base_id = if base {
            [self.ckpt.0.base_id[0].wrapping_add(1), self.current]
        } else {
            self.ckpt.0.base_id
        };
        let tm = &mut self.flows.mark.0;
        let removed = if base {
            tm.track = true;
            tm.dirty.clear();
            tm.removed.clear();
            Vec::new()
        } else {
            std::mem::take(&mut tm.removed)
        };
        let dirty = std::mem::take(&mut tm.dirty);
        // The flows to capture: all for a base, else the dirty ones (each
        // once: the dirty list may repeat keys of replaced flows).
        let keys: Vec<FlowKey> = if base {
            self.flows.map.keys().copied().collect()
        } else {
            dirty
        };
        // Size the data section first (one allocation, no regrowth).
        let raw_len = |items: &[Item]| -> usize {
            items
                .iter()
                .map(|i| match i {
                    Item::Raw(f) => f.len(),
                    _ => 0,
                })
                .sum()
        };
        let mut size = raw_len(&self.current_items);
        for (id, items) in &self.sealed {
            if *id >= from {
                size += raw_len(items);
            }
        }
        for k in &keys {
            if let Some(f) = self.flows.map.get(k) {
                if let Some(full) = capture_needed(f, base) {
                    size += f.buf.len() - stream_change(f, full).1 as usize;
                }
            }
        }
        let mut data = buf;
        data.clear();
        data.reserve(size);
        let mut flows = Vec::new();
        for k in &keys {
            if let Some(f) = self.flows.map.get_mut(k) {
                if let Some(full) = capture_needed(f, base) {
                    flows.push(capture_flow(f, full, &mut data));
                }
            }
        }
        let mut keys = keys;
        keys.clear();
        self.flows.mark.0.dirty = keys;
        let current_items = self.current_items.iter().map(|i| raw_chunk(&mut data, i)).collect();
        let keep_sealed_from = self.sealed.front().map_or(self.current, |(id, _)| *id);
        let sealed = self
            .sealed
            .iter()
            .filter(|(id, _)| *id >= from)
            .map(|(id, items)| (*id, items.iter().map(|i| raw_chunk(&mut data, i)).collect()))
            .collect();
        self.ckpt.0 = EngineMark {
            next_seq: Some(seq.wrapping_add(1)),
            sealed_sent: self.current,
            base_id,
        };
        EngineDelta {
            head: Head {
                seq,
                base,
                base_id,
                current: self.current,
                global_reserved: self.global_reserved,
                global_held: self.global_held,
                global_blocked: self.global_blocked,
                spec_flows: self.spec_flows as u64,
                buffered_bytes: self.buffered_bytes,
                next_flow_id: self.next_flow_id,
                stats: self.stats.clone(),
                current_items,
                keep_sealed_from,
                sealed,
                removed,
                flows,
            },
            data,
        }
    }

    /// Makes the next [`Engine::checkpoint`] a full base (when a new backup
    /// connects, or a delta did not reach it). Until then no changes are
    /// tracked, so a primary running without a backup may call this and
    /// stop checkpointing.
    pub fn reset_checkpoint_base(&mut self) {
        self.ckpt.0 = EngineMark {
            base_id: self.ckpt.0.base_id,
            ..EngineMark::default()
        };
        self.flows.mark.0 = TableMark::default();
    }
}

impl EngineDelta {
    /// Sequence number: 0 for a base, then +1 per checkpoint.
    pub fn seq(&self) -> u64 {
        self.head.seq
    }

    /// A full base (replaces all state of a replica).
    pub fn is_base(&self) -> bool {
        self.head.base
    }

    /// The last epoch sealed when the delta was taken (`None` if none was).
    pub fn epoch(&self) -> Option<EpochId> {
        self.head.current.checked_sub(1).map(EpochId)
    }

    /// Number of flows with new metadata in this delta.
    pub fn flows_changed(&self) -> usize {
        self.head.flows.len()
    }

    /// Number of flows removed since the previous checkpoint.
    pub fn flows_removed(&self) -> usize {
        self.head.removed.len()
    }

    /// Bytes of held streams and raw frames carried.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// The data section: the wire form is [`EngineDelta::encode_head`]
    /// followed by these bytes (for a vectored write without a copy).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The buffer holding the data section, for reuse with
    /// [`Engine::checkpoint_with`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.data
    }

    /// The wire form (see the crate's README): `encode_head()` + `data()`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PREFIX + 64 + 100 * self.head.flows.len() + self.data.len());
        self.encode_head_into(&mut v);
        v.extend_from_slice(&self.data);
        v
    }

    /// The wire form up to the data section.
    pub fn encode_head(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_head_into(&mut v);
        v
    }

    /// Appends the wire form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_head_into(out);
        out.extend_from_slice(&self.data);
    }

    fn encode_head_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        // Serialising plain data into a Vec cannot fail: every sequence has
        // a known length, and the writer does not fail.
        let n = bincode::serde::encode_into_std_write(&self.head, out, bincode_config())
            .expect("serialising an engine delta cannot fail");
        out[start + 6..start + PREFIX].copy_from_slice(&(n as u64).to_le_bytes());
    }

    /// Parses the wire form. Never panics; byte payloads are checked
    /// against the input's length before they are allocated. The content is checked
    /// for structure only; whether it fits a replica is checked by
    /// [`EngineReplica::apply`]. Corruption that keeps the structure valid is
    /// not detected: the transport must checksum.
    pub fn decode(bytes: &[u8]) -> Result<EngineDelta, DeltaError> {
        let prefix = bytes.get(..PREFIX).ok_or(DeltaError::Truncated)?;
        if prefix[..4] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        let version = u16::from_le_bytes([prefix[4], prefix[5]]);
        if version != VERSION {
            return Err(DeltaError::Version(version));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&prefix[6..PREFIX]);
        let head_len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| DeltaError::Truncated)?;
        let rest = &bytes[PREFIX..];
        if head_len > rest.len() {
            return Err(DeltaError::Truncated);
        }
        let (head_bytes, data) = rest.split_at(head_len);
        let (head, used): (Head, usize) =
            bincode::serde::decode_from_slice(head_bytes, bincode_config()).map_err(|e| match e {
                bincode::error::DecodeError::UnexpectedEnd { .. } => DeltaError::Truncated,
                e => DeltaError::Malformed(e.to_string()),
            })?;
        if used != head_len {
            return Err(DeltaError::Malformed("trailing bytes after the header".into()));
        }
        // The data section is exactly the chunks, back to back, in order.
        let mut off: u64 = 0;
        for c in head.chunks() {
            if c.off != off {
                return Err(DeltaError::Malformed("data chunks out of place".into()));
            }
            off = off.checked_add(c.len).ok_or(DeltaError::Truncated)?;
            if off > data.len() as u64 {
                return Err(DeltaError::Truncated);
            }
        }
        if off != data.len() as u64 {
            return Err(DeltaError::Malformed("trailing bytes after the data".into()));
        }
        Ok(EngineDelta {
            head,
            data: data.to_vec(),
        })
    }

    /// The bytes of a chunk (checked at decode; empty if out of range).
    fn bytes(&self, c: Chunk) -> &[u8] {
        usize::try_from(c.off)
            .ok()
            .zip(usize::try_from(c.len).ok())
            .and_then(|(o, l)| self.data.get(o..o.checked_add(l)?))
            .unwrap_or(&[])
    }

    fn items(&self, items: &[Item<Chunk>]) -> Vec<Item> {
        items.iter().map(|i| i.map_raw(|c| self.bytes(*c).to_vec())).collect()
    }
}

// ---------------------------------------------------------------------------
// Backup side.

/// The engine state a backup keeps, built from checkpoints: a base, then
/// deltas in order. Applying a delta costs O(its size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineReplica {
    seq: Option<u64>,
    /// The base the replica's state builds on.
    base_id: [u64; 2],
    /// The replicated state (its configuration is a placeholder: the real
    /// one is given to [`EngineReplica::to_engine`]).
    engine: Engine,
}

impl Default for EngineReplica {
    fn default() -> Self {
        Self::new()
    }
}

fn mismatch<T>(msg: impl Into<String>) -> Result<T, DeltaError> {
    Err(DeltaError::Mismatch(msg.into()))
}

impl EngineReplica {
    /// An empty replica (waiting for a base).
    pub fn new() -> Self {
        EngineReplica {
            seq: None,
            base_id: [0; 2],
            engine: Engine::new_unchecked(Config::default()),
        }
    }

    /// Sequence number of the last checkpoint applied.
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// The last epoch sealed on the primary at the last checkpoint applied
    /// (the epoch to commit after a failover).
    pub fn epoch(&self) -> Option<EpochId> {
        self.seq?;
        self.engine.current.checked_sub(1).map(EpochId)
    }

    /// Bytes held in replicated flows.
    pub fn bytes_held(&self) -> u64 {
        self.engine.global_held
    }

    /// Applies a checkpoint: a base replaces everything; a delta must have
    /// the sequence number following the last one applied. All or nothing:
    /// on error the replica is unchanged.
    pub fn apply(&mut self, d: &EngineDelta) -> Result<(), DeltaError> {
        self.check(d)?;
        let h = &d.head;
        let e = &mut self.engine;
        let flows = &mut e.flows.map;
        if h.base {
            flows.clear();
            e.sealed.clear();
        }
        for k in &h.removed {
            flows.remove(k);
        }
        for fd in &h.flows {
            let append = d.bytes(fd.append);
            match flows.get_mut(&fd.meta.key) {
                Some(f) if !fd.full => {
                    let mut buf = std::mem::take(&mut f.buf);
                    buf.drain(..(fd.drop_front as usize).min(buf.len()));
                    buf.extend(append);
                    *f = fd.meta.clone();
                    f.buf = buf;
                }
                _ => {
                    let mut f = fd.meta.clone();
                    // Room to grow like the primary's (by doubling), so
                    // that the next deltas do not reallocate at once.
                    let mut buf = VecDeque::with_capacity(append.len().max(4096).next_power_of_two());
                    buf.extend(append);
                    f.buf = buf;
                    flows.insert(f.key, f);
                }
            }
        }
        e.current = h.current;
        e.global_reserved = h.global_reserved;
        e.global_held = h.global_held;
        e.global_blocked = h.global_blocked;
        e.spec_flows = h.spec_flows as usize;
        e.buffered_bytes = h.buffered_bytes;
        e.next_flow_id = h.next_flow_id;
        e.stats = h.stats.clone();
        e.current_items = d.items(&h.current_items);
        while e.sealed.front().is_some_and(|(id, _)| *id < h.keep_sealed_from) {
            e.sealed.pop_front();
        }
        for (id, items) in &h.sealed {
            e.sealed.push_back((*id, d.items(items)));
        }
        self.seq = Some(h.seq);
        self.base_id = h.base_id;
        Ok(())
    }

    /// Everything `apply` could trip on, checked before anything changes.
    fn check(&self, d: &EngineDelta) -> Result<(), DeltaError> {
        let h = &d.head;
        let e = &self.engine;
        if h.base {
            if h.seq != 0 {
                return Err(DeltaError::Malformed(format!("base with sequence number {}", h.seq)));
            }
            if !h.removed.is_empty() || h.flows.iter().any(|f| !f.full) {
                return Err(DeltaError::Malformed("base with incremental parts".into()));
            }
        } else {
            let expected = self.seq.and_then(|s| s.checked_add(1));
            if expected != Some(h.seq) {
                return Err(DeltaError::OutOfOrder { expected, got: h.seq });
            }
            if h.base_id != self.base_id {
                return Err(DeltaError::OtherBase {
                    expected: self.base_id,
                    got: h.base_id,
                });
            }
            if h.current < e.current {
                return mismatch(format!("epoch counter {} behind {}", h.current, e.current));
            }
        }
        if usize::try_from(h.spec_flows).is_err() {
            return Err(DeltaError::Malformed("speculated flow count".into()));
        }
        let mut removed = HashSet::with_capacity(h.removed.len());
        for k in &h.removed {
            if !removed.insert(*k) || !e.flows.map.contains_key(k) {
                return mismatch(format!("removal of unknown flow {k:?}"));
            }
        }
        let mut seen = HashSet::with_capacity(h.flows.len());
        for fd in &h.flows {
            let k = fd.meta.key;
            if !seen.insert(k) {
                return Err(DeltaError::Malformed(format!("flow {k:?} twice")));
            }
            if usize::try_from(fd.held).is_err() || usize::try_from(fd.drop_front).is_err() {
                return Err(DeltaError::Malformed("held length".into()));
            }
            let old = if fd.full {
                0
            } else {
                match e.flows.map.get(&k) {
                    Some(f) if !removed.contains(&k) => f.buf.len() as u64,
                    _ => return mismatch(format!("update of unknown flow {k:?}")),
                }
            };
            let Some(kept) = old.checked_sub(fd.drop_front) else {
                return mismatch(format!("flow {k:?}: drops {} of {old} bytes", fd.drop_front));
            };
            if kept.checked_add(fd.append.len) != Some(fd.held) {
                return mismatch(format!("flow {k:?}: held length does not add up"));
            }
        }
        let mut last = if h.base {
            None
        } else {
            e.sealed
                .back()
                .map(|(id, _)| *id)
                .filter(|id| *id >= h.keep_sealed_from)
        };
        for (id, _) in &h.sealed {
            if last.is_some_and(|l| *id <= l) || *id >= h.current {
                return mismatch(format!("sealed epoch {id} out of order"));
            }
            last = Some(*id);
        }
        Ok(())
    }

    /// The engine as the primary had it at the last checkpoint applied,
    /// with configuration `cfg` (its mode and budgets should match the
    /// primary's). Its output queue is empty. Then `commit_epoch(now,
    /// epoch())` and `resume_after_failover(now)`. Before any checkpoint:
    /// `Engine::new(cfg)`. The first checkpoint of the new engine is a base.
    /// Refuses an inconsistent `cfg` (see [`Config::validate`]).
    pub fn to_engine(&self, cfg: Config) -> Result<Engine, ConfigError> {
        cfg.validate()?;
        Ok(self.clone().into_engine_unchecked(cfg))
    }

    /// [`EngineReplica::to_engine`] without copying the held bytes.
    pub fn into_engine(self, cfg: Config) -> Result<Engine, ConfigError> {
        cfg.validate()?;
        Ok(self.into_engine_unchecked(cfg))
    }

    fn into_engine_unchecked(self, cfg: Config) -> Engine {
        let mut e = self.engine;
        e.cfg = cfg;
        e.out.clear();
        e.reset_checkpoint_base();
        e.flows.rebuild_timers(&e.cfg);
        e
    }
}
