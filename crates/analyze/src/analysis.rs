//! Streaming aggregation of a trace: replays ALLOC and FREE records into the
//! set of blocks still live at the end, and keeps the small tables (stacks,
//! modules, process facts, drop counters) a report needs.
//!
//! **Invariant:** memory is proportional to the live blocks, the recent
//! unmatched frees (see below) and the distinct stacks, never to the file.
//!
//! # Events that arrive out of order
//!
//! The tracer's writer merges per-thread rings in batches sorted by time
//! stamp, so across batches an event can arrive late: a free on thread B may
//! come before the alloc on thread A that it frees. Time stamps are right,
//! and for one address `alloc.ts < free.ts < next alloc.ts` always holds. So
//! the analyzer keeps, per address, the *latest* event by time stamp: a live
//! block, or a "dead" marker (a tombstone) remembering when the address was
//! last freed. An event older than what the slot holds is history that
//! already happened: an older ALLOC is a block that was born and died, an
//! older FREE frees such a block. Tombstones are evicted once they are older
//! than [`REORDER_WINDOW_NS`] of trace time.
//!
//! ## Which frees leave a tombstone
//!
//! Only a FREE that matches no live block does. A FREE that frees the live
//! block of its address removes it and leaves nothing: a tombstone there
//! would only ever be consulted by a late ALLOC older than that free, and
//! such a block's own FREE either came already (unmatched, so it left its
//! tombstone, which marks the late ALLOC as dead) or is still to come (then
//! the late ALLOC is live until it does, and the pair nets out). The one
//! difference from burying every free is a block whose FREE never arrives
//! (dropped by the tracer, which the report counts) and whose ALLOC arrives
//! late: it stays outstanding instead of being inferred dead. In exact mode
//! nothing is dropped, and the tombstones are then only the frees that
//! arrive before their allocations and the frees of blocks allocated before
//! tracing began: on the 40 M-event churn trace, the tombstone table went
//! from 560 k entries to a handful, the analyzer from 1.02 to 0.87 s and
//! from 77 to 52 MB.
//!
//! A FREE that matches no live block is counted as *unmatched*; each ALLOC
//! that arrives older than its slot pairs with exactly one such free (it was
//! freed before the slot's event, in one order of arrival or the other), and
//! so does each live block replaced by a later ALLOC at its address (the
//! writer drained the next allocation a batch before the free), unless
//! that free was lost. So `frees of unknown blocks = unmatched - late
//! allocs - replaced`, and the replaced blocks beyond the unmatched frees
//! are the lost frees; in exact mode nothing is lost, and the frees of
//! unknown blocks are those of blocks allocated before tracing began. (The
//! pairing is by count, not per address: with lost frees and such frees in
//! one trace, each figure is low by the smaller of the two.)
//!
//! # Time
//!
//! Besides the live set at the end, the replay keeps a running total of live
//! bytes (estimated in sampled mode), its peak, and the memory
//! [`Timeline`](crate::memory::Timeline) of STATS records (RSS and glibc's figures beside the live
//! bytes at that moment). Because an event can arrive up to the writer's
//! delay late, the live total read at a STATS record can lag by the events
//! of those few tens of milliseconds.
//!
//! # Speed
//!
//! A big exact-mode trace is tens of millions of events, and the time goes
//! to the per-address state (live blocks and tombstones). The
//! state is split by address into two shards, one per thread while reading
//! ([`read_trace_with`]); each keeps its live blocks and its tombstones in
//! two open-addressing maps ([`AddrMap`]) that a batch of events prefetches
//! a few events ahead. An allocation later than every tombstone (nearly all
//! of them: events come almost in time order) does not look at the
//! tombstones at all.
//!
//! What follows from each event besides its address's state is of two
//! kinds. Counts and sums (events, what each stack allocated) do not depend
//! on the order, and in an exact trace read without snapshots the shards
//! keep them. The running total of live bytes, its peak and the time line
//! do depend on it: the shards leave each event's change to the total, and
//! one pass in stream order adds them up (`Trace::merge_exact`). Sampled
//! traces (whose estimates are floating-point sums, so order-sensitive in
//! their last bits) and snapshots go the general way, an outcome per event
//! applied in stream order (`Trace::merge`).
//!
//! A [`Snapshot`] asks for the blocks live at an earlier moment `T`: a block
//! was live at `T` when it was allocated at or before `T` and freed after
//! it. Such blocks are summed per stack when they die (so the snapshot costs
//! memory per distinct stack, not per block), and the ones still live at the
//! end are added when the snapshot is read. The moment must be known before
//! reading; `peak` and percentages need a first pass (see `main.rs`).

use std::collections::BTreeMap;
use std::io::Read;

use mtrace_format::{
    Batch, DecodeError, Decoder, DropReason, Ending, Event, EventKind, Header, Module, Record,
};

use crate::addrmap::AddrMap;
use crate::fxhash::FxHashMap;
use crate::memory::{MemoryStats, TimelinePoint};

/// How late (in trace time) an event may arrive and still be ordered right.
/// The tracer bounds its delay to tens of milliseconds; two seconds is a
/// wide margin.
pub const REORDER_WINDOW_NS: u64 = 2_000_000_000;

/// How often (in trace time) tombstones older than the window are swept.
const SWEEP_INTERVAL_NS: u64 = 1_000_000_000;

/// How many events ahead [`Trace::events`] asks for the cache lines of an
/// address's entries.
const PREFETCH_AHEAD: usize = 8;

/// How many events ahead a shard asks for the events' own cache lines.
const EVENTS_AHEAD: usize = 32;

/// A block live at the end of the trace (or at the current point of reading).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveBlock {
    /// When it was allocated, ns since the trace started.
    pub ts: u64,
    /// Requested size in bytes.
    pub size: u64,
    /// Stack id; 0 = unknown.
    pub stack: u64,
    /// True for a Poisson sample, false for a block recorded with certainty.
    pub sampled: bool,
}

/// A [`LiveBlock`] as the shards keep it: 24 bytes, so that an address's
/// entry in the live map (key and block) is 32 and two share a cache line
/// without straddling one (a 40-byte entry straddled two lines in three of
/// eight buckets). The sampled flag is the size's top bit; a size of 2^63
/// bytes or more (only a damaged trace has one) is kept as 2^63 - 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    ts: u64,
    size_sampled: u64,
    stack: u64,
}

const SAMPLED_BIT: u64 = 1 << 63;

impl Slot {
    #[inline(always)]
    fn of(ts: u64, size: u64, stack: u64, sampled: bool) -> Slot {
        Slot {
            ts,
            size_sampled: size.min(SAMPLED_BIT - 1) | if sampled { SAMPLED_BIT } else { 0 },
            stack,
        }
    }

    #[inline(always)]
    fn block(self) -> LiveBlock {
        LiveBlock {
            ts: self.ts,
            size: self.size_sampled & !SAMPLED_BIT,
            stack: self.stack,
            sampled: self.size_sampled & SAMPLED_BIT != 0,
        }
    }
}

/// Sums of recorded blocks once sampling is undone: one stack's or one
/// group's share of a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    /// Estimated bytes.
    pub bytes: f64,
    /// Estimated objects.
    pub objects: f64,
    /// Estimated variance of `bytes`.
    pub var: f64,
    /// Recorded events behind the estimate.
    pub samples: u64,
    /// True when any part is scaled up from Poisson samples.
    pub estimated: bool,
}

impl Sums {
    /// The sums of one block.
    pub fn of(b: &LiveBlock, rate: u64) -> Sums {
        let w = weight(b.size, b.sampled, rate);
        Sums {
            bytes: w.bytes,
            objects: w.objects,
            var: w.bytes_var,
            samples: 1,
            estimated: b.sampled && rate > 1,
        }
    }

    /// Adds another sum.
    pub fn add(&mut self, o: &Sums) {
        self.bytes += o.bytes;
        self.objects += o.objects;
        self.var += o.var;
        self.samples += o.samples;
        self.estimated |= o.estimated;
    }
}

/// One stack's part of a [`Snapshot`]: everything live at the moment, and
/// the part of it allocated after the snapshot's `born_after` time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SnapSums {
    pub live: Sums,
    pub born_after: Sums,
}

impl SnapSums {
    fn add_block(&mut self, b: &LiveBlock, rate: u64, born_after: Option<u64>) {
        let s = Sums::of(b, rate);
        self.live.add(&s);
        if born_after.is_some_and(|t| b.ts > t) {
            self.born_after.add(&s);
        }
    }

    /// Adds another stack's or group's sums.
    pub fn add(&mut self, o: &SnapSums) {
        self.live.add(&o.live);
        self.born_after.add(&o.born_after);
    }
}

/// What was live at one moment of the trace, per stack id. Ask for it before
/// reading ([`read_trace_with`]); read it with [`Trace::snapshot`].
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The moment, ns since the trace started.
    pub at: u64,
    /// Also sum separately the blocks allocated after this time (the growth
    /// window's start in a diff).
    pub born_after: Option<u64>,
    /// Blocks live at `at` that died later, summed per stack id.
    died_later: FxHashMap<u64, SnapSums>,
}

impl Snapshot {
    /// A snapshot at `at`, splitting off blocks born after `born_after`.
    pub fn new(at: u64, born_after: Option<u64>) -> Snapshot {
        Snapshot {
            at,
            born_after,
            died_later: FxHashMap::default(),
        }
    }
}

/// How the trace file ended, as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEnding {
    /// The tracer wrote its END record.
    Clean,
    /// No END record: the process was killed or exited abruptly.
    CutOff,
    /// The file is shorter than its header says.
    Truncated { expected: u64, read: u64 },
    /// A damaged record stopped the reading; what came before it was used.
    Corrupt { detail: String },
}

impl TraceEnding {
    /// The short name used in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            TraceEnding::Clean => "clean",
            TraceEnding::CutOff => "cut_off",
            TraceEnding::Truncated { .. } => "truncated",
            TraceEnding::Corrupt { .. } => "corrupt",
        }
    }

    /// A human sentence for the ending, without the "file:" prefix.
    pub fn describe(&self) -> String {
        match self {
            TraceEnding::Clean => "ended cleanly".into(),
            TraceEnding::CutOff => "cut off without a clean end: the process was killed or \
                 exited abruptly; read up to the last whole record"
                .into(),
            TraceEnding::Truncated { expected, read } => format!(
                "truncated: the header promises {expected} bytes of records, \
                 the file holds {read}; read up to the last whole record"
            ),
            TraceEnding::Corrupt { detail } => {
                format!("{detail}; the report covers the records before it")
            }
        }
    }
}

/// A process event from a MARK record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub ts: u64,
    pub what: u64,
    pub value: u64,
}

/// The tracer's leak scan at exit: which live blocks nothing pointed to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Blocks live when the scan ran.
    pub live: u64,
    /// Addresses of the unreachable ones, ascending.
    pub unreachable: Vec<u64>,
}

impl Scan {
    pub fn is_unreachable(&self, addr: u64) -> bool {
        self.unreachable.binary_search(&addr).is_ok()
    }
}

/// Everything the analyzer keeps from one trace.
#[derive(Debug)]
pub struct Trace {
    pub header: Header,
    /// INFO "exe".
    pub exe: Option<String>,
    /// INFO "cmdline", split at NUL bytes.
    pub cmdline: Vec<String>,
    /// INFO "cwd".
    pub cwd: Option<String>,
    /// INFO "malloc_owner": an object that defined malloc ahead of the
    /// tracer, so the program's allocations were not traced.
    pub malloc_owner: Option<String>,
    /// Every MODULE record, in file order (later ones win on overlap).
    pub modules: Vec<Module>,
    /// The leak scan at exit (SCAN record), when the tracer ran one.
    pub scan: Option<Scan>,
    /// Anonymous mappings the program holds (MMAP minus MUNMAP records):
    /// start -> (end, stack id). Present only with MTRACE_RS_MMAP=1.
    pub mmaps: std::collections::BTreeMap<u64, (u64, u64)>,
    /// MMAP records read.
    pub mmap_events: u64,
    /// Generated code (CODE records: JIT-compiled methods, VM stubs), in
    /// file order (later ones win on overlap).
    pub code: Vec<crate::symbolize::CodeRange>,
    /// Stack id -> return addresses, innermost first.
    pub stacks: FxHashMap<u64, Box<[u64]>>,
    /// ALLOC and SAMPLE records read.
    pub allocs: u64,
    /// FREE records read.
    pub frees: u64,
    /// An ALLOC for an address whose block was still live with an older
    /// time stamp: the older block's free was lost.
    pub lost_frees: u64,
    /// Latest running total per drop reason.
    pub dropped: BTreeMap<DropReason, u64>,
    pub marks: Vec<Mark>,
    /// The latest time stamp seen, ns since the trace started.
    pub last_ts: u64,
    /// How reading ended; `None` while reading.
    pub ending: Option<TraceEnding>,
    /// Per stack id: (bytes, objects) ever allocated, sampling undone.
    /// Filled in when the reading ends ([`Trace::finish`]).
    pub allocated: FxHashMap<u64, (f64, f64)>,
    /// RSS and allocator statistics over time, with the live bytes beside.
    pub memory: MemoryStats,
    /// The moments asked for before reading.
    pub snapshots: Vec<Snapshot>,
    /// Live bytes of blocks recorded with certainty (exact integer sum).
    live_exact: u64,
    /// Live bytes of Poisson samples, sampling undone.
    live_sampled: f64,
    /// The per-address state, split by address ([`helper_owns`]): shard 1
    /// holds the addresses the decoding thread handles while reading.
    shards: [Shard; 2],
    /// Shard 1's share of the addresses, in 256ths.
    split: u8,
    /// What each stack allocated, summed as the records come.
    per_stack: PerStack,
    unmatched_frees: u64,
    late_allocs: u64,
}

impl Trace {
    /// An empty trace for a file with this header.
    pub fn new(header: Header) -> Trace {
        Trace {
            header,
            exe: None,
            cmdline: Vec::new(),
            cwd: None,
            malloc_owner: None,
            modules: Vec::new(),
            code: Vec::new(),
            scan: None,
            mmaps: std::collections::BTreeMap::new(),
            mmap_events: 0,
            stacks: FxHashMap::default(),
            allocs: 0,
            frees: 0,
            lost_frees: 0,
            dropped: BTreeMap::new(),
            marks: Vec::new(),
            last_ts: 0,
            ending: None,
            allocated: FxHashMap::default(),
            memory: MemoryStats::new(),
            snapshots: Vec::new(),
            live_exact: 0,
            live_sampled: 0.0,
            shards: [Shard::default(), Shard::default()],
            split: 0,
            per_stack: PerStack::default(),
            unmatched_frees: 0,
            late_allocs: 0,
        }
    }

    /// True when the trace stops at an exec: no END record, and the EXEC
    /// mark the tracer writes just before the exec is its last event (an
    /// exec that fails goes on and ends the trace later). The new image has
    /// a trace of its own.
    pub fn ended_at_exec(&self) -> bool {
        matches!(self.ending, None | Some(TraceEnding::CutOff))
            && self
                .marks
                .last()
                .is_some_and(|m| m.what == mtrace_format::mark::EXEC && m.ts >= self.last_ts)
    }

    /// True when every allocation and free was recorded (sample rate 1).
    pub fn exact(&self) -> bool {
        self.header.sample_rate <= 1
    }

    /// Frees of blocks this trace never saw allocated: in exact mode, blocks
    /// allocated before tracing began.
    pub fn frees_of_unknown(&self) -> u64 {
        self.unmatched_frees
            .saturating_sub(self.late_allocs)
            .saturating_sub(self.lost_frees)
    }

    /// Blocks replaced by a later allocation at their address whose free
    /// never arrived (see the module documentation): the replacements not
    /// paired with an unmatched free.
    pub fn lost_frees_net(&self) -> u64 {
        self.lost_frees
            .saturating_sub(self.unmatched_frees.saturating_sub(self.late_allocs))
    }

    /// Total events dropped by the tracer, over all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// The blocks live now, in no particular order.
    pub fn live_blocks(&self) -> impl Iterator<Item = LiveBlock> + '_ {
        self.shards
            .iter()
            .flat_map(|s| s.live.values().map(|v| v.block()))
    }

    /// The blocks live now with their addresses, in no particular order
    /// (the leak check matches them against the SCAN record).
    pub fn live_blocks_at(&self) -> impl Iterator<Item = (u64, LiveBlock)> + '_ {
        self.shards
            .iter()
            .flat_map(|s| s.live.iter().map(|(a, v)| (a, v.block())))
    }

    /// Fills in what is summed while reading ([`Trace::allocated`]); the
    /// readers ([`read_trace_with`]) call it when the reading ends, and it
    /// may be called again after more records.
    pub fn finish(&mut self) {
        let exact = self.exact();
        // The two-thread reader of an exact trace sums on the shards.
        let mut all: FxHashMap<u64, Allocated> = FxHashMap::default();
        let tables = [
            &self.per_stack,
            &self.shards[0].per_stack,
            &self.shards[1].per_stack,
        ];
        for (id, a) in tables.into_iter().flat_map(|t| t.iter()) {
            all.entry(id).or_default().add(a);
        }
        self.allocated = all
            .into_iter()
            .map(|(id, a)| {
                let sums = if exact {
                    (a.bytes as f64, a.objects as f64)
                } else {
                    (a.est_bytes, a.est_objects)
                };
                (id, sums)
            })
            .collect();
    }

    /// Feeds events (ALLOC, SAMPLE and FREE records) in stream order.
    pub fn events(&mut self, events: &[Event]) {
        for (k, e) in events.iter().enumerate() {
            if let Some(next) = events.get(k + PREFETCH_AHEAD) {
                self.shards[self.shard_of(next.addr)].prefetch(next);
            }
            for s in &mut self.shards {
                s.see_ts(e.ts);
            }
            let o = self.shards[self.shard_of(e.addr)].event(e);
            self.apply(e, o);
        }
    }

    /// Feeds a batch: its events with its other records in between.
    pub fn batch(&mut self, batch: &mut Batch) {
        let mut done = 0;
        for (at, rec) in batch.records.drain(..) {
            let at = at.clamp(done, batch.events.len());
            self.events(&batch.events[done..at]);
            done = at;
            self.record(rec);
        }
        self.events(&batch.events[done..]);
        batch.events.clear();
    }

    /// The shard that holds `addr`.
    #[inline(always)]
    fn shard_of(&self, addr: u64) -> usize {
        usize::from(helper_owns(addr, self.split))
    }

    /// Feeds a batch whose events the shards have already seen, with what
    /// happened to each (`plan.outcomes`): the running totals, the counters
    /// and the other records, in stream order.
    fn merge(&mut self, batch: &mut Batch, plan: &Plan) {
        let mut next = [0usize; 2];
        let mut done = 0;
        let n = batch.events.len();
        let events = std::mem::take(&mut batch.events);
        let mut apply = |trace: &mut Trace, events: &[Event]| {
            for e in events {
                let h = trace.shard_of(e.addr);
                let o = plan.outcomes[h].get(next[h]).copied().unwrap_or_default();
                next[h] += 1;
                trace.apply(e, o);
            }
        };
        for (at, rec) in batch.records.drain(..) {
            let at = at.clamp(done, n);
            apply(self, &events[done..at]);
            done = at;
            self.record_global(rec);
        }
        apply(self, &events[done..]);
        batch.events = events;
        batch.events.clear();
    }

    /// [`Trace::merge`] for an exact trace without snapshots: the shards
    /// have already counted the events and summed them per stack, and left
    /// each event's change to the live total in `plan.deltas`; what is left
    /// in stream order is the running total, its peak, the time line's
    /// points (`plan.ticks`) and the other records.
    fn merge_exact(&mut self, batch: &mut Batch, plan: &Plan) {
        for t in &plan.tally {
            self.allocs += t.allocs;
            self.frees += t.frees;
            self.lost_frees += t.lost_frees;
            self.late_allocs += t.late_allocs;
            self.unmatched_frees += t.unmatched_frees;
        }
        let n = batch.events.len();
        let mut records = std::mem::take(&mut batch.records);
        let stops: Vec<(usize, Option<u64>)> = records
            .iter()
            .map(|(at, rec)| (*at, record_ts(rec)))
            .collect();
        let mut ticks = plan.ticks.iter().peekable();
        let mut done = 0;
        let mut segment = |trace: &mut Trace, from: usize, to: usize| {
            let mut k = from;
            while k < to {
                // The time moves on to a new interval before the event's
                // own change.
                while let Some(&&(_, ts)) = ticks.peek().filter(|t| t.0 as usize <= k) {
                    trace.global_ts(ts);
                    ticks.next();
                }
                let end = ticks.peek().map_or(to, |t| (t.0 as usize).clamp(k + 1, to));
                trace.scan_deltas(k, end, &batch.events, &stops, plan);
                k = end;
            }
        };
        for (at, rec) in records.drain(..) {
            let at = at.clamp(done, n);
            segment(self, done, at);
            done = at;
            self.record_global(rec);
        }
        segment(self, done, n);
        batch.records = records;
        if plan.clock.last_ts > self.last_ts {
            self.last_ts = plan.clock.last_ts;
        }
        batch.events.clear();
    }

    /// Applies the changes to the live total of the batch's events `from..to`
    /// and moves the peak.
    #[inline(always)]
    fn scan_deltas(
        &mut self,
        from: usize,
        to: usize,
        events: &[Event],
        stops: &[(usize, Option<u64>)],
        plan: &Plan,
    ) {
        let mut live = self.live_exact;
        let mut best = live;
        let mut best_k = None;
        for (k, &d) in plan.deltas[from..to].iter().enumerate() {
            live = live.wrapping_add(d);
            if live > best {
                best = live;
                best_k = Some(k);
            }
        }
        self.live_exact = live;
        if let Some(k) = best_k {
            if best as f64 > self.memory.live_peak {
                // The time then: the latest of everything up to it.
                let k = from + k;
                let c = k / CHECKPOINT;
                let chunk = c * CHECKPOINT;
                let mut ts = plan.maxts.get(c).copied().unwrap_or(0);
                for e in events.get(chunk..=k).unwrap_or_default() {
                    ts = ts.max(e.ts);
                }
                for &(at, rts) in stops {
                    if at > chunk && at <= k {
                        ts = ts.max(rts.unwrap_or(0));
                    }
                }
                self.memory.live_changed(ts, best as f64);
            }
        }
    }

    /// What an event did, once its shard said how it went.
    #[inline(always)]
    fn apply(&mut self, e: &Event, o: Outcome) {
        self.global_ts(e.ts);
        let block = LiveBlock {
            ts: e.ts,
            size: e.size,
            stack: e.stack,
            sampled: e.kind == EventKind::Sample,
        };
        if e.kind == EventKind::Free {
            self.frees += 1;
        } else {
            self.allocs += 1;
            let rate = self.header.sample_rate;
            let a = self.per_stack.get(e.stack);
            if rate <= 1 {
                // Every block weighs its size: exact integer sums.
                a.bytes += u128::from(e.size);
                a.objects += 1;
            } else {
                let w = weight(e.size, block.sampled, rate);
                a.est_bytes += w.bytes;
                a.est_objects += w.objects;
            }
        }
        match o {
            Outcome::Born => self.born(&block),
            Outcome::Died(old) => self.died(&old.block(), e.ts),
            Outcome::Replaced(old) => {
                // The older block's free never arrived (lost, or dropped by
                // the tracer): the new block replaces it, and it counts as
                // freed when the new one came.
                self.lost_frees += 1;
                self.died(&old.block(), e.ts);
                self.born(&block);
            }
            Outcome::Late(ts) => {
                self.late_allocs += 1;
                self.in_snapshots(&block, ts);
            }
            Outcome::Unmatched => self.unmatched_frees += 1,
            Outcome::Unknown => {}
        }
    }

    /// Live bytes now (at the point of reading), estimated in sampled mode.
    pub fn live_bytes(&self) -> f64 {
        self.live_exact as f64 + self.live_sampled
    }

    /// Per stack id, what was live at the moment of snapshot `i`.
    pub fn snapshot(&self, i: usize) -> FxHashMap<u64, SnapSums> {
        let snap = &self.snapshots[i];
        let rate = self.header.sample_rate;
        let mut out = snap.died_later.clone();
        for b in self.live_blocks().filter(|b| b.ts <= snap.at) {
            out.entry(b.stack)
                .or_default()
                .add_block(&b, rate, snap.born_after);
        }
        out
    }

    /// Per stack id, what is live at the end.
    pub fn live_by_stack(&self) -> FxHashMap<u64, SnapSums> {
        let rate = self.header.sample_rate;
        let mut out: FxHashMap<u64, SnapSums> = FxHashMap::default();
        for b in self.live_blocks() {
            out.entry(b.stack).or_default().add_block(&b, rate, None);
        }
        out
    }

    /// Feeds one record.
    pub fn record(&mut self, rec: Record) {
        if let Some(ts) = record_ts(&rec) {
            for s in &mut self.shards {
                s.see_ts(ts);
            }
        }
        self.record_global(rec);
    }

    /// Feeds one record whose time the shards have already seen.
    fn record_global(&mut self, rec: Record) {
        match rec {
            Record::Info { key, value } => match &key[..] {
                b"exe" => self.exe = Some(String::from_utf8_lossy(&value).into_owned()),
                b"cwd" => self.cwd = Some(String::from_utf8_lossy(&value).into_owned()),
                b"malloc_owner" => {
                    self.malloc_owner = Some(String::from_utf8_lossy(&value).into_owned())
                }
                b"cmdline" => {
                    let v = value.strip_suffix(b"\0").unwrap_or(&value);
                    self.cmdline = v
                        .split(|&b| b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                }
                // Keys this analyzer does not know are for newer analyzers.
                _ => {}
            },
            Record::Module(m) => {
                self.global_ts(m.ts);
                self.modules.push(m);
            }
            Record::Stack { id, frames } => {
                self.stacks.insert(id, frames.into_boxed_slice());
            }
            Record::Alloc { .. } | Record::Free { .. } => {
                let e = Event::of_record(&rec).unwrap_or_default();
                let o = self.shards[self.shard_of(e.addr)].event(&e);
                self.apply(&e, o);
            }
            Record::Dropped { reason, total } => {
                self.dropped.insert(reason, total);
            }
            Record::Stats { ts, fields } => {
                self.global_ts(ts);
                let live = self.live_bytes();
                self.memory
                    .stats(TimelinePoint::from_stats(ts, live, &fields));
            }
            Record::End { ts } => self.global_ts(ts),
            Record::Mark { ts, what, value } => {
                self.global_ts(ts);
                self.marks.push(Mark { ts, what, value });
            }
            Record::Mmap {
                ts,
                addr,
                len,
                stack,
            } => {
                self.global_ts(ts);
                self.mmap_events += 1;
                self.unmap(addr, len);
                if len > 0 {
                    self.mmaps.insert(addr, (addr.saturating_add(len), stack));
                }
            }
            Record::Munmap { ts, addr, len } => {
                self.global_ts(ts);
                self.unmap(addr, len);
            }
            // The exit leak scan: classified by `mtrace-analyze check`.
            Record::Scan {
                ts,
                live,
                unreachable,
            } => {
                self.global_ts(ts);
                self.scan = Some(Scan { live, unreachable });
            }
            Record::Code {
                ts,
                start,
                len,
                name,
            } => {
                self.global_ts(ts);
                self.code.push(crate::symbolize::CodeRange {
                    start,
                    len,
                    name: String::from_utf8_lossy(&name).into_owned(),
                });
            }
        }
    }

    /// Removes [addr, addr + len) from the held mappings, splitting the ones
    /// that straddle it (munmap may unmap part of a mapping).
    fn unmap(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        let hit: Vec<(u64, (u64, u64))> = self
            .mmaps
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > addr)
            .map(|(&s, &v)| (s, v))
            .collect();
        for (s, (e, stack)) in hit {
            self.mmaps.remove(&s);
            if s < addr {
                self.mmaps.insert(s, (addr, stack));
            }
            if e > end {
                self.mmaps.insert(end, (e, stack));
            }
        }
    }

    /// Bytes of anonymous mappings held at the end, per stack id.
    pub fn mapped_by_stack(&self) -> FxHashMap<u64, Sums> {
        let mut out: FxHashMap<u64, Sums> = FxHashMap::default();
        for (&s, &(e, stack)) in &self.mmaps {
            let sums = out.entry(stack).or_default();
            sums.bytes += (e - s) as f64;
            sums.objects += 1.0;
            sums.samples += 1;
        }
        out
    }

    /// Trace time at a timed record: the running totals' side (the shards
    /// see it too).
    #[inline(always)]
    fn global_ts(&mut self, ts: u64) {
        if ts > self.last_ts {
            self.last_ts = ts;
            self.memory
                .tick(ts, self.live_exact as f64 + self.live_sampled);
        }
    }

    /// A block became live: count it and move the peak.
    #[inline(always)]
    fn born(&mut self, b: &LiveBlock) {
        if b.sampled && self.header.sample_rate > 1 {
            self.live_sampled += weight(b.size, true, self.header.sample_rate).bytes;
        } else {
            self.live_exact += b.size;
        }
        let live = self.live_bytes();
        self.memory.live_changed(b.ts.max(self.last_ts), live);
    }

    /// A live block died at `ts`.
    #[inline(always)]
    fn died(&mut self, b: &LiveBlock, ts: u64) {
        if b.sampled && self.header.sample_rate > 1 {
            self.live_sampled -= weight(b.size, true, self.header.sample_rate).bytes;
            if self.live_sampled < 0.0 {
                // Rounding of many additions and subtractions.
                self.live_sampled = 0.0;
            }
        } else {
            self.live_exact = self.live_exact.saturating_sub(b.size);
        }
        self.in_snapshots(b, ts);
    }

    /// Adds a block that lived until `death` to every snapshot it was live
    /// in.
    #[inline(always)]
    fn in_snapshots(&mut self, b: &LiveBlock, death: u64) {
        if self.snapshots.is_empty() {
            return;
        }
        let rate = self.header.sample_rate;
        for s in &mut self.snapshots {
            if b.ts <= s.at && death > s.at {
                s.died_later
                    .entry(b.stack)
                    .or_default()
                    .add_block(b, rate, s.born_after);
            }
        }
    }
}

/// What an event did to its address, as its [`Shard`] saw it; the rest
/// (running totals, counters, snapshots) follows from it in stream order.
#[derive(Clone, Copy, Debug, Default)]
enum Outcome {
    /// Not decided (a placeholder; a shard gives every event its own).
    #[default]
    Unknown,
    /// An allocation became the address's live block.
    Born,
    /// A free ended this live block.
    Died(Slot),
    /// An allocation replaced this older live block, whose free was lost.
    Replaced(Slot),
    /// An allocation older than the address's latest event, at this time:
    /// the block was born and died before it.
    Late(u64),
    /// A free that matched no live block.
    Unmatched,
}

/// The per-address state of some of the addresses: their live blocks and
/// their tombstones (see the module documentation). Each shard keeps its own
/// copy of the trace time, which decides when its tombstones are swept.
#[derive(Clone, Debug)]
struct Shard {
    /// Per address, its latest event when that was an allocation: the
    /// block, live (or so it seems: its free may still arrive).
    live: AddrMap<Slot>,
    /// Per address, its latest event when that was a free: when (the
    /// tombstone). An address in `live` may keep a stale entry here (it
    /// saves a removal per allocation): `live` comes first.
    dead: AddrMap<u64>,
    /// No tombstone in `dead` is later than this.
    dead_max_ts: u64,
    last_ts: u64,
    last_sweep_ts: u64,
    /// What each stack allocated, when the shard sums it (the two-thread
    /// reader of an exact trace: [`Shard::run`]).
    per_stack: PerStack,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            // Small (the live blocks) and busy: mostly empty, so that probe
            // runs stay short (measured: 30% full beats 50% and 75%).
            live: AddrMap::new(30),
            // The unmatched frees of the reorder window: few, dense.
            dead: AddrMap::new(75),
            dead_max_ts: 0,
            last_ts: 0,
            last_sweep_ts: 0,
            per_stack: PerStack::default(),
        }
    }
}

impl Shard {
    /// Trace time at a timed record (of any address).
    #[inline(always)]
    fn see_ts(&mut self, ts: u64) {
        if ts > self.last_ts {
            self.last_ts = ts;
        }
        if self.last_ts - self.last_sweep_ts >= SWEEP_INTERVAL_NS {
            self.sweep();
        }
    }

    /// Drops tombstones older than the reorder window.
    #[cold]
    #[inline(never)]
    fn sweep(&mut self) {
        self.last_sweep_ts = self.last_ts;
        let horizon = self.last_ts.saturating_sub(REORDER_WINDOW_NS);
        self.dead.retain(|_, &ts| ts >= horizon);
    }

    /// Asks for the cache line `e` will need. (Only the live map's: the
    /// tombstones are the few unmatched frees of the reorder window, a
    /// table small enough to stay in the cache.)
    #[inline(always)]
    fn prefetch(&self, e: &Event) {
        self.live.prefetch(e.addr);
    }

    /// Feeds an event of one of this shard's addresses.
    #[inline(always)]
    fn event(&mut self, e: &Event) -> Outcome {
        match e.kind {
            EventKind::Free => self.free(e.addr, e.ts),
            kind => self.alloc(
                e.addr,
                Slot::of(e.ts, e.size, e.stack, kind == EventKind::Sample),
            ),
        }
    }

    /// Feeds this shard's events of a batch (`plan.shard[i]`: indices into
    /// `events`), sweeping where `plan` says, and writes what each did into
    /// `plan.outcomes[i]`, in the same order. With `EXACT` (an exact trace
    /// read without snapshots) the shard does more of the work itself: it
    /// counts its events into `plan.tally[i]`, sums what each stack
    /// allocated, and writes each event's change to the live total into
    /// `plan.deltas` at the event's index, instead of an outcome.
    fn run<const EXACT: bool>(&mut self, events: &[Event], plan: &mut Plan, i: usize) {
        let Plan {
            shard,
            count,
            outcomes,
            sweeps,
            clock,
            deltas,
            tally,
            ..
        } = plan;
        let mine = shard[i].get(..count[i]).unwrap_or_default();
        let outcomes = &mut outcomes[i];
        outcomes.clear();
        let deltas = &mut deltas[..];
        // Counted here, stored once.
        let mut t = Tally::default();
        let mut from = 0;
        let mut sweeps = sweeps.iter();
        loop {
            // The events before the next sweep (all that are left after
            // the last one).
            let sweep = sweeps.next();
            let to = match sweep {
                Some(&(at, _)) => from + mine[from..].partition_point(|&k| k < at),
                None => mine.len(),
            };
            for (j, &k) in mine[from..to].iter().enumerate() {
                let k = k as usize;
                if let Some(&next) = mine.get(from + j + PREFETCH_AHEAD) {
                    if let Some(next) = events.get(next as usize) {
                        self.prefetch(next);
                    }
                }
                // The events themselves, further ahead (for shard 0 another
                // core decoded them): the table's prefetch above reads one.
                // (A prefetch past the end is a hint like any other.)
                crate::addrmap::prefetch_ptr(events.as_ptr().wrapping_add(k + EVENTS_AHEAD));
                match events.get(k) {
                    Some(e) => {
                        if EXACT {
                            let d = self.exact_event(e, &mut t);
                            if let Some(slot) = deltas.get_mut(k) {
                                *slot = d;
                            }
                        } else {
                            outcomes.push(self.event(e));
                        }
                    }
                    None if !EXACT => outcomes.push(Outcome::Unknown),
                    None => {}
                }
            }
            from = to;
            match sweep {
                Some(&(_, ts)) => self.sweep_at(ts),
                None => break,
            }
        }
        // Every event is a free or an allocation: only the frees were
        // counted.
        t.allocs = mine.len() as u64 - t.frees;
        tally[i] = t;
        self.last_ts = clock.last_ts;
        self.last_sweep_ts = clock.last_sweep_ts;
    }

    /// [`Shard::event`], and what [`Trace::apply`] does with the outcome
    /// in an exact trace, except for the running total: counted into `t`,
    /// summed per stack; returns the change to the live total (two's
    /// complement). The common cases, a free of the address's live block
    /// and an allocation at an address without one, take one probe of the
    /// live map and no [`Outcome`].
    #[inline(always)]
    fn exact_event(&mut self, e: &Event, t: &mut Tally) -> u64 {
        if e.kind == EventKind::Free {
            t.frees += 1;
            if let Some(b) = self.live.take_if(e.addr, |b| b.ts < e.ts) {
                return b.block().size.wrapping_neg();
            }
        } else {
            let a = self.per_stack.get(e.stack);
            a.bytes += u128::from(e.size);
            a.objects += 1;
            let block = Slot::of(e.ts, e.size, e.stack, e.kind == EventKind::Sample);
            // Later than every tombstone: they need no look (`alloc`).
            if e.ts >= self.dead_max_ts && self.live.insert_new(e.addr, block) {
                return e.size;
            }
        }
        let o = self.event(e);
        exact_effect(e, o, t)
    }
}

/// The change to the live total of an event of an exact trace, given what
/// its shard said it did ([`Shard::exact_event`]), counting the rarer
/// outcomes into `t`.
#[inline(never)]
fn exact_effect(e: &Event, o: Outcome, t: &mut Tally) -> u64 {
    match o {
        Outcome::Born => e.size,
        Outcome::Died(old) => old.block().size.wrapping_neg(),
        Outcome::Replaced(old) => {
            t.lost_frees += 1;
            e.size.wrapping_sub(old.block().size)
        }
        Outcome::Late(_) => {
            t.late_allocs += 1;
            0
        }
        Outcome::Unmatched => {
            t.unmatched_frees += 1;
            0
        }
        Outcome::Unknown => 0,
    }
}

impl Shard {
    /// The sweep [`Shard::see_ts`] makes when the time is `ts`.
    fn sweep_at(&mut self, ts: u64) {
        self.last_ts = ts;
        self.sweep();
    }

    #[inline(always)]
    fn alloc(&mut self, addr: u64, block: Slot) -> Outcome {
        let dead = &self.dead;
        let dead_max_ts = self.dead_max_ts;
        self.live.update(
            addr,
            |slot| {
                let old = *slot;
                if old.ts <= block.ts {
                    *slot = block;
                    (false, Outcome::Replaced(old))
                } else {
                    // The live block is later: this one was freed before
                    // it, by a free that was (or will be) counted as
                    // unmatched. That later event's time is the best bound
                    // on when it died.
                    (false, Outcome::Late(old.ts))
                }
            },
            || {
                // Events come nearly in time order: a block allocated after
                // every free so far needs no look at the tombstones.
                if block.ts < dead_max_ts {
                    if let Some(ts) = dead.get(addr).filter(|&ts| ts > block.ts) {
                        return (None, Outcome::Late(ts));
                    }
                }
                // The tombstone, if any, stays behind the live block.
                (Some(block), Outcome::Born)
            },
        )
    }

    #[inline(always)]
    fn free(&mut self, addr: u64, ts: u64) -> Outcome {
        let o = self.live.update(
            addr,
            |b| {
                if b.ts < ts {
                    (true, Outcome::Died(*b))
                } else {
                    // Frees a block older than the live one.
                    (false, Outcome::Unmatched)
                }
            },
            || (None, Outcome::Unknown),
        );
        match o {
            // No tombstone for a matched free: see "Which frees leave a
            // tombstone" in the module documentation.
            Outcome::Died(_) => {}
            Outcome::Unknown => {
                // A free after a free (its alloc is late, or a double free,
                // or the block predates the trace), or of an address never
                // seen.
                match self.dead.get_mut(addr) {
                    Some(dead) => {
                        if *dead < ts {
                            *dead = ts;
                            self.dead_max_ts = self.dead_max_ts.max(ts);
                        }
                    }
                    None => self.bury(addr, ts),
                }
                return Outcome::Unmatched;
            }
            _ => {}
        }
        o
    }

    /// Sets the tombstone of `addr` to `ts`.
    #[inline(always)]
    fn bury(&mut self, addr: u64, ts: u64) {
        self.dead.insert(addr, ts);
        self.dead_max_ts = self.dead_max_ts.max(ts);
    }
}

/// The trace time as the shards see it ([`Shard::see_ts`]): when it
/// sweeps.
#[derive(Clone, Copy, Debug, Default)]
struct Clock {
    last_ts: u64,
    last_sweep_ts: u64,
    /// The time line's next interval (see [`Plan::ticks`]).
    next_tick: u64,
}

/// How the two shards share a batch while reading: which events each
/// takes, and before which event each sweep falls (the same for both: they
/// see the same times). Worked out once, on the decoding thread, so that
/// neither shard looks at the other's events.
#[derive(Clone, Debug, Default)]
struct Plan {
    /// Indices of the events of shard 0 and of shard 1: the first
    /// `count[i]` of `shard[i]` (the lists keep their length from batch to
    /// batch, so that they are not cleared each time).
    shard: [Vec<u32>; 2],
    count: [usize; 2],
    /// What each of those events did, in the same order (each shard writes
    /// its own: no cache line is written by both threads).
    outcomes: [Vec<Outcome>; 2],
    /// (index of the event before which a sweep happens, the time then).
    sweeps: Vec<(u32, u64)>,
    /// The time after the batch.
    clock: Clock,
    /// With an exact trace read without snapshots ([`Shard::run`]'s
    /// `EXACT`): each event's change to the live total, by index.
    deltas: Vec<u64>,
    /// What each shard counted of its events (with `EXACT`).
    tally: [Tally; 2],
    /// (index of an event that moves the time into a new interval of the
    /// time line ([`MemoryStats::next_tick_after`]), its time) (with
    /// `EXACT`).
    ticks: Vec<(u32, u64)>,
    /// The latest time before event `j * CHECKPOINT`, for each `j` (with
    /// `EXACT`).
    maxts: Vec<u64>,
}

/// What [`Plan::maxts`] keeps one time for: events.
const CHECKPOINT: usize = 256;

/// A shard's counts of one batch's events, for [`Trace`]'s counters.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    allocs: u64,
    frees: u64,
    lost_frees: u64,
    late_allocs: u64,
    unmatched_frees: u64,
}

impl Plan {
    /// Plans `batch` from `clock` (the time after the batch before), in one
    /// pass over its events.
    fn make(&mut self, batch: &Batch, clock: Clock, split: u8, exact: bool) {
        let events = &batch.events;
        let n = events.len();
        self.sweeps.clear();
        self.ticks.clear();
        self.maxts.clear();
        if exact && self.deltas.len() < n {
            // Every index is written by its shard before it is read.
            self.deltas.resize(n, 0);
        }
        // Both lists written for every event, the right one advanced: no
        // branch to mispredict.
        for list in &mut self.shard {
            if list.len() < n {
                list.resize(n, 0);
            }
        }
        let (zero, one) = self.shard.split_at_mut(1);
        let (zero, one) = (&mut zero[0][..], &mut one[0][..]);
        let sweeps = &mut self.sweeps;
        let ticks = &mut self.ticks;
        let maxts = &mut self.maxts;
        let mut c = clock;
        // The time moves on to `ts` before the event (or record) at `at`;
        // a sweep falls there when it moved a sweep interval on. (The
        // interval can only be crossed when the time moves.) A record
        // moves the time line on itself (`Trace::record_global`).
        let mut see = |ts: u64, at: usize, event: bool| {
            if exact && event && at.is_multiple_of(CHECKPOINT) {
                maxts.push(c.last_ts);
            }
            if ts > c.last_ts {
                if exact && ts >= c.next_tick {
                    if event {
                        ticks.push((at as u32, ts));
                    }
                    c.next_tick = MemoryStats::next_tick_after(ts);
                }
                c.last_ts = ts;
                if ts - c.last_sweep_ts >= SWEEP_INTERVAL_NS {
                    c.last_sweep_ts = ts;
                    sweeps.push((at as u32, ts));
                }
            }
        };
        let (mut a, mut b) = (0usize, 0usize);
        let mut done = 0;
        let records = batch.records.iter().map(|(at, rec)| (*at, record_ts(rec)));
        for (at, ts) in records.chain(std::iter::once((n, None))) {
            let at = at.clamp(done, n);
            for (k, e) in events[done..at].iter().enumerate() {
                let k = done + k;
                see(e.ts, k, true);
                let h = usize::from(helper_owns(e.addr, split));
                zero[a] = k as u32;
                one[b] = k as u32;
                a += 1 - h;
                b += h;
            }
            done = at;
            if let Some(ts) = ts {
                see(ts, at, false);
            }
        }
        self.clock = c;
        self.count = [a, b];
    }
}

/// True when `addr` belongs to shard 1, which holds `split` 256ths of the
/// addresses. (A hash of its own: the maps' buckets come from the top bits
/// of another.)
#[inline(always)]
fn helper_owns(addr: u64, split: u8) -> bool {
    let h = (addr ^ (addr >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    ((h >> 32) as u8) < split
}

/// The time a record feeds to the trace's clock, for those that have one.
fn record_ts(rec: &Record) -> Option<u64> {
    match rec {
        Record::Module(m) => Some(m.ts),
        Record::Alloc { ts, .. }
        | Record::Free { ts, .. }
        | Record::Stats { ts, .. }
        | Record::End { ts }
        | Record::Mark { ts, .. }
        | Record::Mmap { ts, .. }
        | Record::Munmap { ts, .. }
        | Record::Scan { ts, .. }
        | Record::Code { ts, .. } => Some(*ts),
        Record::Info { .. } | Record::Stack { .. } | Record::Dropped { .. } => None,
    }
}

/// What one stack allocated, summed as the records come.
#[derive(Clone, Copy, Debug, Default)]
struct Allocated {
    /// Exact mode: bytes, summed as integers.
    bytes: u128,
    /// Exact mode: blocks.
    objects: u64,
    /// Sampled mode: bytes, sampling undone.
    est_bytes: f64,
    /// Sampled mode: objects, sampling undone.
    est_objects: f64,
    /// True once an allocation from this stack was read.
    seen: bool,
}

impl Allocated {
    /// Adds another part's sums.
    fn add(&mut self, o: &Allocated) {
        self.bytes += o.bytes;
        self.objects += o.objects;
        self.est_bytes += o.est_bytes;
        self.est_objects += o.est_objects;
        self.seen |= o.seen;
    }
}

/// [`Allocated`] per stack id. The tracer hands ids out densely from 1, so
/// they index a table directly; an id far beyond the number of stacks seen
/// (only a damaged or hand-made trace has one) goes to a map instead, which
/// keeps memory proportional to the distinct stacks.
#[derive(Clone, Debug, Default)]
struct PerStack {
    dense: Vec<Allocated>,
    sparse: FxHashMap<u64, Allocated>,
    /// Distinct ids seen.
    seen: usize,
}

impl PerStack {
    #[inline(always)]
    fn get(&mut self, id: u64) -> &mut Allocated {
        match usize::try_from(id) {
            Ok(i) if i < self.dense.len() => {
                if !self.dense[i].seen {
                    self.dense[i].seen = true;
                    self.seen += 1;
                }
                &mut self.dense[i]
            }
            _ => self.get_slow(id),
        }
    }

    #[cold]
    #[inline(never)]
    fn get_slow(&mut self, id: u64) -> &mut Allocated {
        let limit = 4096 + 4 * self.seen;
        match usize::try_from(id) {
            Ok(i) if i < limit => {
                self.dense.resize(i + 1, Allocated::default());
                // Ids kept in the map until now move into the table.
                let moved: Vec<u64> = self.sparse.keys().copied().filter(|&k| k <= id).collect();
                for k in moved {
                    if let Some(a) = self.sparse.remove(&k) {
                        self.dense[k as usize] = a;
                    }
                }
                if !self.dense[i].seen {
                    self.dense[i].seen = true;
                    self.seen += 1;
                }
                &mut self.dense[i]
            }
            _ => {
                if !self.sparse.contains_key(&id) {
                    self.seen += 1;
                }
                let a = self.sparse.entry(id).or_default();
                a.seen = true;
                a
            }
        }
    }

    /// The stacks seen, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (u64, &Allocated)> + '_ {
        self.dense
            .iter()
            .enumerate()
            .filter(|(_, a)| a.seen)
            .map(|(i, a)| (i as u64, a))
            .chain(self.sparse.iter().map(|(&k, a)| (k, a)))
    }
}

/// Reads a whole trace. Fails only when the file is not a readable trace at
/// all (empty, foreign, newer version, unreadable header); damage later in
/// the stream ends the reading with [`TraceEnding::Corrupt`] and keeps what
/// was read before it.
pub fn read_trace<R: Read + Send>(reader: R) -> Result<Trace, DecodeError> {
    read_trace_with(reader, Vec::new())
}

/// Reads a whole trace like [`read_trace`], also summing what was live at
/// each of `snapshots`' moments.
///
/// Two threads share the work. The decoding thread decodes a batch of
/// records ([`Decoder::next_batch`]: events in a compact form), splits its
/// events by address between two shards, feeds its own
/// shard's events and passes the batch on; this thread feeds the other
/// shard's events, then walks the batch in stream order to apply what each
/// event did (running totals, peak, timeline, snapshots) and the other
/// records. (For an exact trace read without snapshots the shards also
/// count the events and sum them per stack, and the walk in stream order
/// only adds up each event's change to the live total: see "Speed" in the
/// module documentation.) Every address's events are seen by one shard in
/// stream order, and everything else in stream order, so the result is the
/// one [`Trace::record`] gives record by record (a test checks it).
/// (Decoding itself is sequential: every record's time and address are
/// deltas from the previous one.)
pub fn read_trace_with<R: Read + Send>(
    reader: R,
    snapshots: Vec<Snapshot>,
) -> Result<Trace, DecodeError> {
    read_trace_watched(reader, snapshots, &mut |_| {})
}

/// Reads a whole trace like [`read_trace_with`], showing the trace read so
/// far to `watch` after each batch of records (on this thread, between
/// batches), so the caller can start work that needs only the start of the
/// trace (the modules and the first stacks) while the rest is read. `watch`
/// runs once per few thousand records: it should return at once when it
/// has nothing to do.
pub fn read_trace_watched<R: Read + Send>(
    reader: R,
    snapshots: Vec<Snapshot>,
    watch: &mut dyn FnMut(&Trace),
) -> Result<Trace, DecodeError> {
    /// Events per batch: a batch (40 bytes an event) stays well inside the
    /// second-level cache.
    const BATCH: usize = 8192;
    /// The decoding thread's share of the addresses, in 256ths: decoding
    /// costs it about as much as the running totals cost the other thread.
    const SPLIT: u8 = 80;
    /// The same when the shards do most of the in-order work
    /// ([`Shard::run`]'s `EXACT`).
    const SPLIT_EXACT: u8 = 28;
    type Work = (Batch, Plan);
    // One message per batch of thousands of events: moving its few hundred
    // bytes costs nothing next to boxing it.
    #[allow(clippy::large_enum_variant)]
    enum Msg {
        Batch(Work, u64),
        End(Result<Ending, DecodeError>),
    }
    let mut dec = Decoder::new(reader)?;
    let mut trace = Trace::new(dec.header().clone());
    let exact = trace.exact() && snapshots.is_empty();
    let split = if exact { SPLIT_EXACT } else { SPLIT };
    trace.snapshots = snapshots;
    trace.split = split;
    let mut helper = std::mem::take(&mut trace.shards[1]);
    let mut progress = Progress::new(dec.header().committed);
    let helper = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(4);
        // Emptied batches go back to the decoder to be filled again.
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Work>();
        let thread = scope.spawn(move || {
            let mut clock = Clock::default();
            loop {
                let (mut batch, mut plan) = back_rx
                    .try_recv()
                    .unwrap_or_else(|_| (Batch::with_capacity(BATCH), Plan::default()));
                let more = dec.next_batch(&mut batch, BATCH);
                plan.make(&batch, clock, split, exact);
                clock = plan.clock;
                if exact {
                    helper.run::<true>(&batch.events, &mut plan, 1);
                } else {
                    helper.run::<false>(&batch.events, &mut plan, 1);
                }
                let msg = Msg::Batch((batch, plan), dec.offset());
                if tx.send(msg).is_err() {
                    break;
                }
                let end = match more {
                    Ok(true) => continue,
                    Ok(false) => Ok(dec.ending().clone()),
                    Err(e) => Err(e),
                };
                let _ = tx.send(Msg::End(end));
                break;
            }
            helper
        });
        for msg in rx {
            match msg {
                Msg::Batch((mut batch, mut plan), offset) => {
                    progress.show(offset);
                    if exact {
                        trace.shards[0].run::<true>(&batch.events, &mut plan, 0);
                        trace.merge_exact(&mut batch, &plan);
                    } else {
                        trace.shards[0].run::<false>(&batch.events, &mut plan, 0);
                        trace.merge(&mut batch, &plan);
                    }
                    watch(&trace);
                    // The decoder may have finished: then the batch is
                    // simply dropped.
                    let _ = back_tx.send((batch, plan));
                }
                Msg::End(Ok(ending)) => {
                    trace.ending = Some(match ending {
                        Ending::Clean => TraceEnding::Clean,
                        Ending::Truncated { expected, read } => {
                            TraceEnding::Truncated { expected, read }
                        }
                        Ending::CutOff | Ending::Reading => TraceEnding::CutOff,
                    });
                }
                Msg::End(Err(e)) => {
                    trace.ending = Some(TraceEnding::Corrupt {
                        detail: e.to_string(),
                    });
                }
            }
        }
        thread.join()
    });
    match helper {
        Ok(shard) => trace.shards[1] = shard,
        // The decoding thread panicked (it cannot): say so as a damaged
        // trace rather than lose what was read.
        Err(_) => {
            trace.ending = Some(TraceEnding::Corrupt {
                detail: "the decoding thread failed".into(),
            })
        }
    }
    trace.finish();
    progress.done();
    Ok(trace)
}

/// A progress line on stderr while a big trace is read, only when stderr is
/// a terminal (never in CI logs or pipes).
struct Progress {
    total: u64,
    shown: Option<u64>,
    on: bool,
}

impl Progress {
    fn new(total: u64) -> Progress {
        use std::io::IsTerminal;
        let on = total >= 64 << 20 && std::io::stderr().is_terminal();
        Progress {
            total,
            shown: None,
            on,
        }
    }

    fn show(&mut self, at: u64) {
        if !self.on {
            return;
        }
        let pct = at.saturating_mul(100) / self.total.max(1);
        if self.shown != Some(pct) {
            self.shown = Some(pct);
            eprint!(
                "\rreading the trace: {} of {} MiB ({pct}%)",
                at >> 20,
                self.total >> 20
            );
        }
    }

    fn done(&mut self) {
        if self.on && self.shown.is_some() {
            eprint!("\r{:60}\r", "");
        }
    }
}

/// What one recorded block stands for once sampling is undone.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Weight {
    /// Estimated bytes.
    pub bytes: f64,
    /// Estimated objects.
    pub objects: f64,
    /// Estimated variance of `bytes` (0 for a block recorded with certainty).
    pub bytes_var: f64,
}

/// Undoes Poisson sampling for one recorded block.
///
/// The tracer samples by bytes as jemalloc does (`src/prof.c`,
/// `prof_sample_event`): a geometric countdown with mean `rate` bytes, so each
/// byte is sampled independently with probability `1/rate` and a block of
/// `size` bytes is caught with probability `p = 1 - exp(-size/rate)`. Weighting
/// each caught block by `1/p` (the Horvitz–Thompson estimator) makes the sums
/// unbiased: a sample stands for `size/p` bytes and `1/p` objects. Blocks
/// recorded with certainty (exact mode, or at least `rate` bytes) weigh 1.
///
/// The variance of that estimator under Poisson sampling is estimated from
/// the sample itself as `sum over samples of (1 - p) * (size/p)^2` (Särndal,
/// Swensson & Wretman, *Model Assisted Survey Sampling*, eq. 3.3.7). For many
/// samples of equal size with small `p`, the relative error reduces to the
/// familiar `1/sqrt(samples)`.
pub fn weight(size: u64, sampled: bool, rate: u64) -> Weight {
    if !sampled || rate <= 1 {
        return Weight {
            bytes: size as f64,
            objects: 1.0,
            bytes_var: 0.0,
        };
    }
    if size == 0 {
        // A zero-byte block cannot be caught by a byte countdown; if one is
        // recorded anyway, count it once.
        return Weight {
            bytes: 0.0,
            objects: 1.0,
            bytes_var: 0.0,
        };
    }
    // -expm1(-x) is 1 - exp(-x) without cancellation for small x.
    let p = -(-(size as f64) / rate as f64).exp_m1();
    let bytes = size as f64 / p;
    Weight {
        bytes,
        objects: 1.0 / p,
        bytes_var: (1.0 - p) * bytes * bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_of_a_sample_is_size_over_probability() {
        let w = weight(100, true, 1000);
        let p = 1.0 - (-0.1f64).exp();
        assert!((w.bytes - 100.0 / p).abs() < 1e-9);
        assert!((w.objects - 1.0 / p).abs() < 1e-12);
        assert_eq!(weight(100, false, 1000).bytes, 100.0);
        assert_eq!(weight(100, true, 1).bytes, 100.0);
        assert_eq!(weight(0, true, 1000).objects, 1.0);
    }

    /// A trace whose events come out of order in every way the module
    /// documentation names, over more than the reorder window; with STATS
    /// records now and then when `stats` (else the time line's points are
    /// the analyzer's own, every 100 ms).
    fn shuffled_trace(rate: u64, stats: bool) -> Vec<u8> {
        use mtrace_format::{Encoder, FLAG_CLEAN_END, HEADER_SIZE};
        let mut enc = Encoder::new();
        let mut body = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut pending: Vec<(bool, u64, u64, u64, u64)> = Vec::new();
        let mut ts = 0u64;
        for i in 0..60_000u64 {
            // Now and then two events in the same nanosecond.
            if rnd() % 8 != 0 {
                ts += 1 + rnd() % 200_000;
            }
            let r = rnd();
            if live.len() < 500 || r % 2 == 0 {
                let addr = if r % 997 == 0 { 0 } else { (rnd() % 3000) * 16 };
                let size = if r % 50 == 0 {
                    1 << 20
                } else {
                    16 + rnd() % 300
                };
                pending.push((true, ts, addr, size, 1 + rnd() % 20));
                live.push((addr, ts));
            } else {
                let k = (rnd() % live.len() as u64) as usize;
                let (addr, _) = live.swap_remove(k);
                pending.push((false, ts, addr, 0, 0));
            }
            if i % 777 == 0 {
                // A free of a block from before the trace.
                pending.push((false, ts, 0x7000_0000 + i * 16, 0, 0));
            }
            // Writer batches: flushed in a shuffled order now and then.
            if pending.len() >= 40 || i % 5000 == 0 {
                let n = pending.len();
                for j in 0..n {
                    let k = j + (rnd() as usize % (n - j));
                    pending.swap(j, k);
                }
                for (alloc, ts, addr, size, stack) in pending.drain(..) {
                    if alloc {
                        enc.alloc(&mut body, ts, addr, size, stack, rate > 1 && size < rate);
                    } else {
                        enc.free(&mut body, ts, addr);
                    }
                }
                if stats && i % 3000 == 0 {
                    enc.stats(&mut body, ts, &[(mtrace_format::stat::RSS, i)]);
                }
            }
        }
        enc.end(&mut body, ts + 1);
        let h = Header {
            version: mtrace_format::FORMAT_VERSION,
            committed: body.len() as u64,
            flags: FLAG_CLEAN_END,
            sample_rate: rate,
            ..Header::default()
        };
        let mut out = vec![0u8; HEADER_SIZE];
        h.encode(&mut out);
        out.extend_from_slice(&body);
        out
    }

    /// Everything a report reads from a trace, in a comparable form.
    fn summary(t: &Trace) -> String {
        let mut live: Vec<(u64, LiveBlock)> = t.live_blocks_at().collect();
        live.sort_by_key(|&(a, b)| (a, b.ts));
        let mut allocated: Vec<_> = t.allocated.iter().collect();
        allocated.sort_by(|a, b| a.0.cmp(b.0));
        let snaps: Vec<Vec<_>> = (0..t.snapshots.len())
            .map(|i| {
                let mut v: Vec<(u64, SnapSums)> = t.snapshot(i).into_iter().collect();
                v.sort_by_key(|e| e.0);
                v
            })
            .collect();
        format!(
            "{live:?} {allocated:?} {} {} {} {} {} {} {:?} {} {} {:?} {snaps:?}",
            t.allocs,
            t.frees,
            t.lost_frees,
            t.frees_of_unknown(),
            t.late_allocs,
            t.last_ts,
            t.live_bytes(),
            t.memory.live_peak,
            t.memory.live_peak_ts,
            t.memory.timeline.points(),
        )
    }

    #[test]
    fn reading_on_two_threads_equals_feeding_records_one_by_one() {
        // An exact trace without snapshots is read the other way (the
        // shards do more of the work: `Shard::run`'s `EXACT`).
        let cases = [
            (1, true, true),
            (4096, true, true),
            (1, false, true),
            (1, false, false),
        ];
        for (rate, with_snaps, stats) in cases {
            let bytes = shuffled_trace(rate, stats);
            let snaps = || {
                if !with_snaps {
                    return Vec::new();
                }
                vec![
                    Snapshot::new(2_000_000_000, None),
                    Snapshot::new(4_000_000_000, Some(1)),
                ]
            };
            let read = read_trace_with(&bytes[..], snaps()).unwrap();
            let mut dec = Decoder::new(&bytes[..]).unwrap();
            let mut fed = Trace::new(dec.header().clone());
            fed.snapshots = snaps();
            while let Some(rec) = dec.next().unwrap() {
                fed.record(rec);
            }
            fed.finish();
            assert!(
                read.late_allocs > 0 && read.lost_frees > 0,
                "{}",
                summary(&read)
            );
            assert!(read.unmatched_frees > 0 && read.live_blocks().count() > 100);
            assert_eq!(
                summary(&read),
                summary(&fed),
                "rate {rate}, snapshots {with_snaps}, stats {stats}"
            );
            let points = read.memory.timeline.points().len();
            assert!(stats || points > 50, "{points} points");
            assert_eq!(read.ending, Some(TraceEnding::Clean));
        }
    }

    /// The tracer's real pattern of disorder, simulated: threads push their
    /// events into their own rings in time order; the writer drains the
    /// rings one after another while the threads go on (so a free can be
    /// drained a batch before the allocation it frees, and an address's
    /// next allocation before the free of its previous block), and sorts
    /// each batch by time. Blocks move between threads, addresses are
    /// reused as soon as they are freed, as an allocator does. Whatever the
    /// order of arrival, the blocks outstanding at the end must be exactly
    /// the ones never freed, and no free may be taken for one of a block
    /// from before the trace.
    #[test]
    fn blocks_outstanding_at_the_end_are_exact_whatever_the_writer_order() {
        use mtrace_format::{Encoder, FLAG_CLEAN_END, HEADER_SIZE};
        const THREADS: usize = 4;
        fn rnd(x: &mut u64) -> u64 {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..20 {
            let mut enc = Encoder::new();
            let mut body = Vec::new();
            // (ts, is_alloc, addr, size)
            let mut rings: Vec<Vec<(u64, bool, u64, u64)>> = vec![Vec::new(); THREADS];
            let mut free_addrs: Vec<u64> = (1..=64).map(|k| k * 64).collect();
            let mut live: Vec<(u64, u64)> = Vec::new();
            let mut ts = 0u64;
            let step = |x: &mut u64,
                        rings: &mut Vec<Vec<(u64, bool, u64, u64)>>,
                        free_addrs: &mut Vec<u64>,
                        live: &mut Vec<(u64, u64)>,
                        ts: &mut u64| {
                *ts += 1 + rnd(x) % 1000;
                let t = (rnd(x) % THREADS as u64) as usize;
                if !free_addrs.is_empty() && (live.is_empty() || rnd(x).is_multiple_of(2)) {
                    let k = (rnd(x) % free_addrs.len() as u64) as usize;
                    let addr = free_addrs.swap_remove(k);
                    let size = 1 + rnd(x) % 500;
                    rings[t].push((*ts, true, addr, size));
                    live.push((addr, size));
                } else {
                    let k = (rnd(x) % live.len() as u64) as usize;
                    let (addr, _) = live.swap_remove(k);
                    rings[t].push((*ts, false, addr, 0));
                    free_addrs.push(addr);
                }
            };
            for _cycle in 0..400 {
                let mut batch = Vec::new();
                let mut order: Vec<usize> = (0..THREADS).collect();
                for j in 0..THREADS {
                    let k = j + (rnd(&mut x) as usize % (THREADS - j));
                    order.swap(j, k);
                }
                for &r in &order {
                    // The threads go on while the writer drains.
                    for _ in 0..rnd(&mut x) % 6 {
                        step(&mut x, &mut rings, &mut free_addrs, &mut live, &mut ts);
                    }
                    batch.append(&mut rings[r]);
                }
                batch.sort_by_key(|&(ts, alloc, _, _)| (ts, alloc));
                for (ts, alloc, addr, size) in batch {
                    if alloc {
                        enc.alloc(&mut body, ts, addr, size, 1, false);
                    } else {
                        enc.free(&mut body, ts, addr);
                    }
                }
            }
            let mut rest: Vec<_> = rings.iter_mut().flat_map(|r| r.drain(..)).collect();
            rest.sort_by_key(|&(ts, alloc, _, _)| (ts, alloc));
            for (ts, alloc, addr, size) in rest {
                if alloc {
                    enc.alloc(&mut body, ts, addr, size, 1, false);
                } else {
                    enc.free(&mut body, ts, addr);
                }
            }
            enc.end(&mut body, ts + 1);
            let h = Header {
                version: mtrace_format::FORMAT_VERSION,
                committed: body.len() as u64,
                flags: FLAG_CLEAN_END,
                sample_rate: 1,
                ..Header::default()
            };
            let mut bytes = vec![0u8; HEADER_SIZE];
            h.encode(&mut bytes);
            bytes.extend_from_slice(&body);

            let t = read_trace(&bytes[..]).unwrap();
            let mut got: Vec<(u64, u64)> = t.live_blocks_at().map(|(a, b)| (a, b.size)).collect();
            got.sort_unstable();
            live.sort_unstable();
            assert_eq!(got, live, "round {round}: outstanding blocks");
            assert_eq!(t.frees_of_unknown(), 0, "round {round}");
            assert_eq!(t.lost_frees_net(), 0, "round {round}");
            assert_eq!(
                t.live_bytes() as u64,
                live.iter().map(|b| b.1).sum::<u64>(),
                "round {round}"
            );
        }
    }

    #[test]
    fn huge_blocks_weigh_their_size() {
        let w = weight(1 << 30, true, 512 * 1024);
        assert!((w.bytes - (1u64 << 30) as f64).abs() < 1.0);
    }
}
