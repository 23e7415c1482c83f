//! Streaming aggregation of a trace: replays ALLOC and FREE records into the
//! set of blocks still live at the end, and keeps the small tables (stacks,
//! modules, process facts, drop counters) a report needs.
//!
//! **Invariant:** memory is proportional to the live blocks, the recently
//! freed addresses (see below) and the distinct stacks, never to the file.
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
//! than [`REORDER_WINDOW_NS`] of trace time, which bounds memory by the
//! addresses freed in that window (the allocator reuses addresses, so this
//! stays near the peak object count).
//!
//! A FREE that matches no live block is counted as *unmatched*; each ALLOC
//! that arrives older than its slot pairs with exactly one such free (it was
//! freed before the slot's event, in one order of arrival or the other), so
//! `frees of unknown blocks = unmatched - late allocs`: in exact mode these
//! are the frees of blocks allocated before tracing began.
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
//! A [`Snapshot`] asks for the blocks live at an earlier moment `T`: a block
//! was live at `T` when it was allocated at or before `T` and freed after
//! it. Such blocks are summed per stack when they die (so the snapshot costs
//! memory per distinct stack, not per block), and the ones still live at the
//! end are added when the snapshot is read. The moment must be known before
//! reading; `peak` and percentages need a first pass (see `main.rs`).

use std::collections::BTreeMap;
use std::io::Read;

use mtrace_format::{DecodeError, Decoder, DropReason, Ending, Header, Module, Record};

use crate::fxhash::FxHashMap;
use crate::memory::{MemoryStats, TimelinePoint};

/// How late (in trace time) an event may arrive and still be ordered right.
/// The tracer bounds its delay to tens of milliseconds; two seconds is a
/// wide margin.
pub const REORDER_WINDOW_NS: u64 = 2_000_000_000;

/// How often (in trace time) tombstones older than the window are swept.
const SWEEP_INTERVAL_NS: u64 = 1_000_000_000;

/// What one address was doing at its latest known event.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// A block allocated at `ts` and not freed (yet).
    Live(LiveBlock),
    /// The address was last freed at `ts`.
    Dead { ts: u64 },
}

/// A block live at the end of the trace (or at the current point of reading).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    pub allocated: FxHashMap<u64, (f64, f64)>,
    /// RSS and allocator statistics over time, with the live bytes beside.
    pub memory: MemoryStats,
    /// The moments asked for before reading.
    pub snapshots: Vec<Snapshot>,
    /// Live bytes of blocks recorded with certainty (exact integer sum).
    live_exact: u64,
    /// Live bytes of Poisson samples, sampling undone.
    live_sampled: f64,
    slots: FxHashMap<u64, Slot>,
    unmatched_frees: u64,
    late_allocs: u64,
    last_sweep_ts: u64,
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
            slots: FxHashMap::default(),
            unmatched_frees: 0,
            late_allocs: 0,
            last_sweep_ts: 0,
        }
    }

    /// True when every allocation and free was recorded (sample rate 1).
    pub fn exact(&self) -> bool {
        self.header.sample_rate <= 1
    }

    /// Frees of blocks this trace never saw allocated: in exact mode, blocks
    /// allocated before tracing began.
    pub fn frees_of_unknown(&self) -> u64 {
        self.unmatched_frees.saturating_sub(self.late_allocs)
    }

    /// Total events dropped by the tracer, over all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// The blocks live now, in no particular order.
    pub fn live_blocks(&self) -> impl Iterator<Item = &LiveBlock> + '_ {
        self.slots.values().filter_map(|s| match s {
            Slot::Live(b) => Some(b),
            Slot::Dead { .. } => None,
        })
    }

    /// The blocks live now with their addresses, in no particular order
    /// (the leak check matches them against the SCAN record).
    pub fn live_blocks_at(&self) -> impl Iterator<Item = (u64, &LiveBlock)> + '_ {
        self.slots.iter().filter_map(|(&addr, s)| match s {
            Slot::Live(b) => Some((addr, b)),
            Slot::Dead { .. } => None,
        })
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
                .add_block(b, rate, snap.born_after);
        }
        out
    }

    /// Per stack id, what is live at the end.
    pub fn live_by_stack(&self) -> FxHashMap<u64, SnapSums> {
        let rate = self.header.sample_rate;
        let mut out: FxHashMap<u64, SnapSums> = FxHashMap::default();
        for b in self.live_blocks() {
            out.entry(b.stack).or_default().add_block(b, rate, None);
        }
        out
    }

    /// Feeds one record.
    pub fn record(&mut self, rec: Record) {
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
                self.see_ts(m.ts);
                self.modules.push(m);
            }
            Record::Stack { id, frames } => {
                self.stacks.insert(id, frames.into_boxed_slice());
            }
            Record::Alloc {
                ts,
                addr,
                size,
                stack,
                sampled,
            } => {
                self.see_ts(ts);
                self.alloc(
                    addr,
                    LiveBlock {
                        ts,
                        size,
                        stack,
                        sampled,
                    },
                );
            }
            Record::Free { ts, addr } => {
                self.see_ts(ts);
                self.free(addr, ts);
            }
            Record::Dropped { reason, total } => {
                self.dropped.insert(reason, total);
            }
            Record::Stats { ts, fields } => {
                self.see_ts(ts);
                let live = self.live_bytes();
                self.memory
                    .stats(TimelinePoint::from_stats(ts, live, &fields));
            }
            Record::End { ts } => self.see_ts(ts),
            Record::Mark { ts, what, value } => {
                self.see_ts(ts);
                self.marks.push(Mark { ts, what, value });
            }
            Record::Mmap {
                ts,
                addr,
                len,
                stack,
            } => {
                self.see_ts(ts);
                self.mmap_events += 1;
                self.unmap(addr, len);
                if len > 0 {
                    self.mmaps.insert(addr, (addr.saturating_add(len), stack));
                }
            }
            Record::Munmap { ts, addr, len } => {
                self.see_ts(ts);
                self.unmap(addr, len);
            }
            // The exit leak scan: classified by `mtrace-analyze check`.
            Record::Scan {
                ts,
                live,
                unreachable,
            } => {
                self.see_ts(ts);
                self.scan = Some(Scan { live, unreachable });
            }
            Record::Code {
                ts,
                start,
                len,
                name,
            } => {
                self.see_ts(ts);
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

    fn see_ts(&mut self, ts: u64) {
        if ts > self.last_ts {
            self.last_ts = ts;
            self.memory
                .tick(ts, self.live_exact as f64 + self.live_sampled);
        }
        if self.last_ts - self.last_sweep_ts >= SWEEP_INTERVAL_NS {
            self.sweep();
        }
    }

    /// Drops tombstones older than the reorder window.
    fn sweep(&mut self) {
        self.last_sweep_ts = self.last_ts;
        let horizon = self.last_ts.saturating_sub(REORDER_WINDOW_NS);
        self.slots
            .retain(|_, s| !matches!(s, Slot::Dead { ts } if *ts < horizon));
    }

    fn alloc(&mut self, addr: u64, block: LiveBlock) {
        self.allocs += 1;
        let rate = self.header.sample_rate;
        let w = weight(block.size, block.sampled, rate);
        let a = self.allocated.entry(block.stack).or_default();
        a.0 += w.bytes;
        a.1 += w.objects;
        let slot = self.slots.entry(addr).or_insert(Slot::Dead { ts: 0 });
        match *slot {
            Slot::Live(old) if old.ts <= block.ts => {
                // The older block's free never arrived (lost, or dropped by
                // the tracer): the new block replaces it, and it counts as
                // freed when the new one came.
                self.lost_frees += 1;
                *slot = Slot::Live(block);
                self.died(&old, block.ts);
                self.born(&block);
            }
            Slot::Dead { ts } if ts <= block.ts => {
                *slot = Slot::Live(block);
                self.born(&block);
            }
            // The slot holds a later event: this block was freed before it,
            // by a free that was (or will be) counted as unmatched. That
            // later event's time is the best bound on when it died.
            Slot::Dead { ts } | Slot::Live(LiveBlock { ts, .. }) => {
                self.late_allocs += 1;
                self.in_snapshots(&block, ts);
            }
        }
    }

    /// A block became live: count it and move the peak.
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
    fn in_snapshots(&mut self, b: &LiveBlock, death: u64) {
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

    fn free(&mut self, addr: u64, ts: u64) {
        self.frees += 1;
        match self.slots.get_mut(&addr) {
            Some(slot @ Slot::Live(_)) => {
                let Slot::Live(b) = *slot else { unreachable!() };
                if b.ts < ts {
                    *slot = Slot::Dead { ts };
                    self.died(&b, ts);
                } else {
                    // Frees a block older than the live one.
                    self.unmatched_frees += 1;
                }
            }
            Some(Slot::Dead { ts: dead }) => {
                // A free after a free: its alloc is late, or a double free,
                // or the block predates the trace.
                self.unmatched_frees += 1;
                if *dead < ts {
                    *dead = ts;
                }
            }
            None => {
                self.unmatched_frees += 1;
                self.slots.insert(addr, Slot::Dead { ts });
            }
        }
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
/// Decoding and aggregation run on two threads: the decoder thread sends
/// records in order, in batches, and this thread feeds them to the
/// [`Trace`]. (Decoding itself is sequential: every record's time and
/// address are deltas from the previous one.)
pub fn read_trace_with<R: Read + Send>(
    reader: R,
    snapshots: Vec<Snapshot>,
) -> Result<Trace, DecodeError> {
    const BATCH: usize = 8192;
    enum Msg {
        Records(Vec<Record>, u64),
        End(Result<Ending, DecodeError>),
    }
    let mut dec = Decoder::new(reader)?;
    let mut trace = Trace::new(dec.header().clone());
    trace.snapshots = snapshots;
    let mut progress = Progress::new(dec.header().committed);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(8);
        scope.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let end = loop {
                match dec.next() {
                    Ok(Some(rec)) => {
                        batch.push(rec);
                        if batch.len() == BATCH {
                            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                            if tx.send(Msg::Records(full, dec.offset())).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => break Ok(dec.ending().clone()),
                    Err(e) => break Err(e),
                }
            };
            let _ = tx.send(Msg::Records(batch, dec.offset()));
            let _ = tx.send(Msg::End(end));
        });
        for msg in rx {
            match msg {
                Msg::Records(records, offset) => {
                    progress.show(offset);
                    for rec in records {
                        trace.record(rec);
                    }
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
    });
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

    #[test]
    fn huge_blocks_weigh_their_size() {
        let w = weight(1 << 30, true, 512 * 1024);
        assert!((w.bytes - (1u64 << 30) as f64).abs() < 1.0);
    }
}
