//! The outstanding-memory report: the blocks live at the end of a trace,
//! grouped by allocating function (wrappers folded away) or by stack, with
//! estimates undone from sampling, rendered as text or JSON.
//!
//! Aggregation happens in two steps so that symbolization stays small: live
//! blocks are first summed per stack id (no symbols needed), then each stack
//! that holds memory is symbolized only as far as its first non-wrapper frame
//! to find its group; full stacks are symbolized only for the groups shown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write};

use mtrace_format::mark;
use serde::Serialize;

use crate::analysis::{SnapSums, Sums, Trace, TraceEnding};
use crate::folds::Folds;
use crate::fxhash::FxHashMap;
use crate::memory::{self, human_bytes};
use crate::symbolize::{Frame, Symbolizer};

/// The label of a group whose stack was never written to the file (or whose
/// events carry stack id 0).
pub const NO_STACK: &str = "<stack not recorded>";

/// How to group live blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// By the first frame that is not an allocator wrapper.
    Function,
    /// By the whole stack.
    Stack,
}

/// What to report.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    pub by: GroupBy,
    /// Show at most this many groups.
    pub top: usize,
    /// Hide groups holding fewer bytes.
    pub min_bytes: u64,
    pub folds: Folds,
    /// Report what was outstanding at this moment instead of at the end.
    pub at: Option<Moment>,
}

/// A moment of the trace asked for on the command line, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Moment {
    /// ns since the trace started.
    pub ns: u64,
    /// How the user named it (`2.5s`, `50%`, `peak`).
    pub label: String,
    /// Index of the trace's [`Snapshot`](crate::analysis::Snapshot) for it.
    pub snapshot: usize,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            by: GroupBy::Function,
            top: 20,
            min_bytes: 0,
            folds: Folds::with_defaults(),
            at: None,
        }
    }
}

/// The whole report; its JSON form is the `--format json` output.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub trace: TraceSummary,
    /// The moment reported on; `null` for the end of the trace.
    pub at: Option<AtOut>,
    /// RSS beside live bytes.
    pub memory: MemoryOut,
    pub totals: Totals,
    pub callers: Vec<Caller>,
    /// Groups before `--top` and `--min-bytes`.
    #[serde(skip)]
    pub groups: usize,
    /// Anonymous mappings held at the end, by caller (MTRACE_RS_MMAP=1);
    /// `null` when the trace has none recorded.
    pub mmap: Option<MmapOut>,
}

/// Anonymous memory the program mapped itself and still held.
#[derive(Clone, Debug, Serialize)]
pub struct MmapOut {
    pub bytes: u64,
    pub mappings: u64,
    pub callers: Vec<Caller>,
}

/// Facts about the traced process and the file.
#[derive(Clone, Debug, Serialize)]
pub struct TraceSummary {
    pub path: String,
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub cmdline: Vec<String>,
    pub mode: &'static str,
    pub sample_rate: u64,
    pub duration_ns: u64,
    pub ending: &'static str,
    pub ending_detail: Option<String>,
    pub allocs: u64,
    pub frees: u64,
    pub frees_of_unknown: u64,
    pub stacks: u64,
    pub marks: Vec<MarkOut>,
    pub dropped: DroppedOut,
    #[serde(skip)]
    pub start_realtime_ns: u64,
    #[serde(skip)]
    pub lost_frees: u64,
}

/// The moment a report is about.
#[derive(Clone, Debug, Serialize)]
pub struct AtOut {
    /// ns since the trace started.
    pub ns: u64,
    /// As given on the command line.
    pub label: String,
}

/// RSS beside live bytes, from the tracer's STATS records. Allocator
/// figures are `null` when the trace has none (an allocator other than
/// glibc malloc); RSS figures are `null` when the trace has no STATS.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryOut {
    pub stats_records: u64,
    /// True when STATS records carry glibc's mallinfo2 figures.
    pub allocator_stats: bool,
    /// When the `*_end` figures were taken: the last STATS record (the end
    /// of the trace when there is none).
    pub end_ns: u64,
    pub rss_end: Option<u64>,
    /// Live bytes at `end_ns` (estimated in sampled mode).
    pub live_end: u64,
    pub free_held_end: Option<u64>,
    pub arena_end: Option<u64>,
    pub in_use_end: Option<u64>,
    pub mmapped_end: Option<u64>,
    /// The highest RSS of any STATS record, and when.
    pub rss_peak: Option<u64>,
    pub rss_peak_ns: Option<u64>,
    pub live_at_rss_peak: Option<u64>,
    pub free_held_at_rss_peak: Option<u64>,
    /// The most bytes live at any moment, and when.
    pub live_peak: u64,
    pub live_peak_ns: u64,
    /// Live bytes at the end minus their lowest in the second half.
    pub live_growth_second_half: i64,
    /// True when that growth is large enough to be the program's own.
    pub live_grows: bool,
    /// Plain words when glibc holds most of the RSS as freed memory.
    pub retention_diagnosis: Option<String>,
}

/// A MARK record.
#[derive(Clone, Debug, Serialize)]
pub struct MarkOut {
    pub ts: u64,
    /// `"forked"`, `"exec"`, or the number for a kind this analyzer does not
    /// know.
    pub what: serde_json::Value,
    pub value: u64,
}

/// Events the tracer could not record.
#[derive(Clone, Debug, Serialize)]
pub struct DroppedOut {
    pub total: u64,
    pub by_reason: BTreeMap<String, u64>,
}

/// Everything outstanding at the end.
#[derive(Clone, Debug, Serialize)]
pub struct Totals {
    pub bytes: u64,
    pub objects: u64,
    pub estimated: bool,
}

/// One group of outstanding blocks.
#[derive(Clone, Debug, Serialize)]
pub struct Caller {
    pub rank: usize,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub bytes: u64,
    pub objects: u64,
    /// Recorded events behind the estimate.
    pub samples: u64,
    pub share: f64,
    pub estimated: bool,
    /// One standard error relative to `bytes` (a 68% interval), when
    /// estimated.
    pub rel_error: Option<f64>,
    /// A representative stack, innermost first, inlined frames expanded.
    pub stack: Vec<FrameOut>,
    /// Module offset of the top location (names it when the function is
    /// unknown).
    #[serde(skip)]
    pub offset: u64,
}

/// One frame of a reported stack.
#[derive(Clone, Debug, Serialize)]
pub struct FrameOut {
    /// The return address as recorded.
    pub address: String,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub inlined: bool,
    #[serde(skip)]
    pub offset: u64,
}

/// Something that can be summed over the stacks of a group.
pub(crate) trait Additive: Copy + Default {
    fn add_to(&mut self, o: &Self);
}

impl Additive for Sums {
    fn add_to(&mut self, o: &Self) {
        self.add(o);
    }
}

impl Additive for SnapSums {
    fn add_to(&mut self, o: &Self) {
        self.add(o);
    }
}

impl<A: Additive, B: Additive> Additive for (A, B) {
    fn add_to(&mut self, o: &Self) {
        self.0.add_to(&o.0);
        self.1.add_to(&o.1);
    }
}

/// What a group is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Key {
    NoStack,
    Stack(u64),
    /// Function name and module; an unnamed frame is keyed by its module
    /// offset so that different unknown functions stay apart.
    Function {
        function: Option<String>,
        module: Option<String>,
        offset: Option<u64>,
    },
    /// A whole stack by its symbolized frame names, which stay the same from
    /// one run of a program to the next (stack ids and addresses do not).
    Frames(Vec<String>),
}

/// Caches symbolized addresses so each is resolved once.
pub(crate) struct SymCache<'a> {
    sym: &'a mut dyn Symbolizer,
    cache: FxHashMap<u64, Vec<Frame>>,
}

impl<'a> SymCache<'a> {
    pub(crate) fn new(sym: &'a mut dyn Symbolizer) -> SymCache<'a> {
        SymCache {
            sym,
            cache: FxHashMap::default(),
        }
    }

    pub(crate) fn frames(&mut self, ret: u64) -> &[Frame] {
        let sym = &mut *self.sym;
        self.cache.entry(ret).or_insert_with(|| sym.symbolize(ret))
    }

    /// The first frame of a stack that is not a wrapper, as (address index,
    /// frame). When everything folds (a stack cut short above the allocator,
    /// e.g. at JIT code the unwinder could not cross) the outermost frame is
    /// the most telling one left.
    fn key_frame(&mut self, stack: &[u64], folds: &Folds) -> Option<(usize, Frame)> {
        for (i, &ret) in stack.iter().enumerate() {
            for f in self.frames(ret) {
                match &f.function {
                    Some(name) if folds.is_wrapper(name) => continue,
                    _ => return Some((i, f.clone())),
                }
            }
        }
        let i = stack.len().checked_sub(1)?;
        self.frames(stack[i]).last().cloned().map(|f| (i, f))
    }

    /// Every frame of a stack, outermost first, inlined frames expanded,
    /// named as in text (function, else `module+0xoffset`).
    pub(crate) fn names_outermost_first(&mut self, stack: &[u64]) -> Vec<String> {
        let mut names = Vec::new();
        for &ret in stack.iter().rev() {
            // Within one address the innermost inlined frame comes first.
            for f in self.frames(ret).iter().rev() {
                names.push(frame_name(&f.function, &f.module, f.offset));
            }
        }
        names
    }
}

/// The group key of one stack id. `portable` keys whole stacks by their
/// symbolized frames instead of their id, to match them across traces.
pub(crate) fn key_of(
    trace: &Trace,
    id: u64,
    cache: &mut SymCache,
    opts: &ReportOptions,
    portable: bool,
) -> Key {
    let frames = trace.stacks.get(&id).filter(|_| id != 0);
    match (frames, opts.by) {
        (None, _) => Key::NoStack,
        (Some(f), GroupBy::Stack) if portable => {
            let mut names = cache.names_outermost_first(f);
            names.reverse();
            Key::Frames(names)
        }
        (Some(_), GroupBy::Stack) => Key::Stack(id),
        (Some(f), GroupBy::Function) => match cache.key_frame(f, &opts.folds) {
            None => Key::NoStack,
            Some((_, fr)) => Key::Function {
                offset: fr.function.is_none().then_some(fr.offset),
                function: fr.function,
                module: fr.module,
            },
        },
    }
}

/// Groups per-stack sums by `opts.by`: (key, sums, representative stack),
/// the representative being the stack with the largest `rank`.
pub(crate) fn group_stacks<T: Additive>(
    trace: &Trace,
    per_stack: &FxHashMap<u64, T>,
    rank: impl Fn(&T) -> f64,
    cache: &mut SymCache,
    opts: &ReportOptions,
    portable: bool,
) -> Vec<(Key, T, u64)> {
    let mut groups: FxHashMap<Key, (T, u64, f64)> = FxHashMap::default();
    let mut stack_ids: Vec<u64> = per_stack.keys().copied().collect();
    stack_ids.sort_unstable();
    for id in stack_ids {
        let agg = per_stack[&id];
        let key = key_of(trace, id, cache, opts, portable);
        let g = groups.entry(key).or_insert((T::default(), id, f64::MIN));
        g.0.add_to(&agg);
        if rank(&agg) > g.2 {
            g.1 = id;
            g.2 = rank(&agg);
        }
    }
    groups
        .into_iter()
        .map(|(k, (a, rep, _))| (k, a, rep))
        .collect()
}

/// Where a group allocates and its representative stack.
#[derive(Clone, Debug, Default)]
pub(crate) struct Location {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub offset: u64,
    pub stack: Vec<FrameOut>,
}

/// Symbolizes a group's location from its representative stack.
pub(crate) fn locate(
    trace: &Trace,
    key: &Key,
    rep: u64,
    cache: &mut SymCache,
    opts: &ReportOptions,
) -> Location {
    let mut loc = Location::default();
    match (key, trace.stacks.get(&rep).filter(|_| rep != 0)) {
        (Key::NoStack, _) | (_, None) => loc.function = Some(NO_STACK.to_string()),
        (_, Some(stack)) => {
            if let Some((_, f)) = cache.key_frame(stack, &opts.folds) {
                loc.function = f.function;
                loc.file = f.file;
                loc.line = f.line;
                loc.module = f.module;
                loc.offset = f.offset;
            }
            for &ret in stack.iter() {
                for f in cache.frames(ret) {
                    loc.stack.push(FrameOut {
                        address: format!("{ret:#x}"),
                        function: f.function.clone(),
                        file: f.file.clone(),
                        line: f.line,
                        module: f.module.clone(),
                        inlined: f.inlined,
                        offset: f.offset,
                    });
                }
            }
        }
    }
    loc
}

/// Builds the report for a trace read from `path`: what is outstanding at
/// the end, or at `opts.at`.
pub fn build_report(
    trace: &Trace,
    path: &str,
    sym: &mut dyn Symbolizer,
    opts: &ReportOptions,
) -> Report {
    // Step 1: sum live blocks per stack id.
    let per_stack: FxHashMap<u64, Sums> = match &opts.at {
        Some(m) if m.snapshot < trace.snapshots.len() => trace
            .snapshot(m.snapshot)
            .into_iter()
            .map(|(k, v)| (k, v.live))
            .collect(),
        _ => trace
            .live_by_stack()
            .into_iter()
            .map(|(k, v)| (k, v.live))
            .collect(),
    };
    let mut total = Sums::default();
    for a in per_stack.values() {
        total.add(a);
    }

    // Step 2: group stacks.
    let mut cache = SymCache::new(sym);
    let (callers, n_groups) = rank_callers(trace, &per_stack, &total, &mut cache, opts);

    // Anonymous mappings (MTRACE_RS_MMAP=1), grouped the same way.
    let mmap = (trace.mmap_events > 0).then(|| {
        let per_stack = trace.mapped_by_stack();
        let mut total = Sums::default();
        for a in per_stack.values() {
            total.add(a);
        }
        let (callers, _) = rank_callers(trace, &per_stack, &total, &mut cache, opts);
        MmapOut {
            bytes: total.bytes.round() as u64,
            mappings: trace.mmaps.len() as u64,
            callers,
        }
    });

    Report {
        trace: summarize(trace, path),
        at: opts.at.as_ref().map(|m| AtOut {
            ns: m.ns,
            label: m.label.clone(),
        }),
        memory: memory_out(trace),
        totals: Totals {
            bytes: total.bytes.round() as u64,
            objects: total.objects.round() as u64,
            estimated: total.estimated,
        },
        callers,
        groups: n_groups,
        mmap,
    }
}

/// Groups per-stack sums by caller and ranks them (`--top`, `--min-bytes`);
/// also returns the number of groups before the cut.
fn rank_callers(
    trace: &Trace,
    per_stack: &FxHashMap<u64, Sums>,
    total: &Sums,
    cache: &mut SymCache,
    opts: &ReportOptions,
) -> (Vec<Caller>, usize) {
    let mut groups = group_stacks(trace, per_stack, |a| a.bytes, cache, opts, false);
    let n_groups = groups.len();
    groups.sort_by(|a, b| b.1.bytes.total_cmp(&a.1.bytes).then_with(|| a.0.cmp(&b.0)));
    let mut callers = Vec::new();
    for (key, agg, rep) in groups {
        if callers.len() >= opts.top {
            break;
        }
        if agg.bytes.round() < opts.min_bytes as f64 {
            continue;
        }
        let rel_error = (agg.estimated && agg.bytes > 0.0).then(|| agg.var.sqrt() / agg.bytes);
        let share = if total.bytes > 0.0 {
            agg.bytes / total.bytes
        } else {
            0.0
        };
        let loc = locate(trace, &key, rep, cache, opts);
        callers.push(Caller {
            rank: callers.len() + 1,
            function: loc.function,
            file: loc.file,
            line: loc.line,
            module: loc.module,
            bytes: agg.bytes.round() as u64,
            objects: agg.objects.round() as u64,
            samples: agg.samples,
            share,
            estimated: agg.estimated,
            rel_error,
            stack: loc.stack,
            offset: loc.offset,
        });
    }
    (callers, n_groups)
}

/// The `memory` part of the report.
pub fn memory_out(trace: &Trace) -> MemoryOut {
    let m = &trace.memory;
    let alloc = |v: Option<u64>| if m.allocator { v } else { None };
    let last = m.last;
    let peak = m.rss_peak;
    let live_end = match last {
        Some(p) => p.live,
        None => trace.live_bytes(),
    };
    MemoryOut {
        stats_records: m.stats_records,
        allocator_stats: m.allocator,
        end_ns: last.map_or(trace.last_ts, |p| p.ts_ns),
        rss_end: last.and_then(|p| p.rss),
        live_end: live_end.max(0.0).round() as u64,
        free_held_end: last.and_then(|p| alloc(p.free_held)),
        arena_end: last.and_then(|p| alloc(p.arena)),
        in_use_end: last.and_then(|p| alloc(p.in_use)),
        mmapped_end: last.and_then(|p| alloc(p.mmapped)),
        rss_peak: peak.and_then(|p| p.rss),
        rss_peak_ns: peak.map(|p| p.ts_ns),
        live_at_rss_peak: peak.map(|p| p.live.max(0.0).round() as u64),
        free_held_at_rss_peak: peak.and_then(|p| alloc(p.free_held)),
        live_peak: m.live_peak.max(0.0).round() as u64,
        live_peak_ns: m.live_peak_ts,
        live_growth_second_half: m.live_growth(trace.last_ts).round() as i64,
        live_grows: memory::live_grows(m, trace.last_ts),
        retention_diagnosis: memory::retention_diagnosis(m, trace.last_ts),
    }
}

pub(crate) fn summarize(trace: &Trace, path: &str) -> TraceSummary {
    let h = &trace.header;
    let ending = trace.ending.clone().unwrap_or(TraceEnding::CutOff);
    TraceSummary {
        path: path.to_string(),
        pid: h.pid,
        ppid: h.ppid,
        exe: trace.exe.clone().unwrap_or_default(),
        cmdline: trace.cmdline.clone(),
        mode: if trace.exact() { "exact" } else { "sampled" },
        sample_rate: h.sample_rate,
        duration_ns: trace.last_ts,
        ending: ending.name(),
        ending_detail: if trace.ended_at_exec() {
            Some(
                "ended at exec: the program replaced itself with another, which has a \
                 trace file of its own"
                    .to_string(),
            )
        } else {
            (ending != TraceEnding::Clean).then(|| ending.describe())
        },
        allocs: trace.allocs,
        frees: trace.frees,
        frees_of_unknown: trace.frees_of_unknown(),
        stacks: trace.stacks.len() as u64,
        marks: trace
            .marks
            .iter()
            .map(|m| MarkOut {
                ts: m.ts,
                what: match m.what {
                    mark::FORKED => "forked".into(),
                    mark::EXEC => "exec".into(),
                    n => n.into(),
                },
                value: m.value,
            })
            .collect(),
        dropped: DroppedOut {
            total: trace.dropped_total(),
            by_reason: trace
                .dropped
                .iter()
                .map(|(r, n)| (r.describe(), *n))
                .collect(),
        },
        start_realtime_ns: h.start_realtime_ns,
        lost_frees: trace.lost_frees_net(),
    }
}

/// Writes the report as one JSON object and a newline.
pub fn write_json(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer(&mut *out, report)?;
    writeln!(out)
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&[u8]> = digits.rchunks(3).rev().collect();
    String::from_utf8(groups.join(&b","[..])).unwrap_or_default()
}

/// Nanoseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `1 object`, `2 objects`, `1,000 objects`.
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", thousands(n), if n == 1 { one } else { many })
}

pub(crate) fn seconds(ns: u64) -> String {
    format!("{:.3} s", ns as f64 / 1e9)
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// How a frame is named in text: its function, else `module+0xoffset`, else
/// the bare address.
pub(crate) fn frame_name(
    function: &Option<String>,
    module: &Option<String>,
    offset: u64,
) -> String {
    match (function, module) {
        (Some(f), _) => f.clone(),
        (None, Some(m)) if !m.is_empty() => format!("{m}+{offset:#x}"),
        (None, Some(_)) => format!("[unnamed]+{offset:#x}"),
        (None, None) => format!("{offset:#x}"),
    }
}

/// Where a frame is in text: `file.c:42`, else the module.
pub(crate) fn frame_place(
    file: &Option<String>,
    line: Option<u32>,
    module: &Option<String>,
) -> String {
    match (file, line) {
        (Some(f), Some(l)) => format!("{}:{l}", basename(f)),
        (Some(f), None) => basename(f).to_string(),
        (None, _) => module.clone().unwrap_or_default(),
    }
}

/// One moment's memory figures in text.
fn memory_state(
    rss: Option<u64>,
    live: u64,
    free: Option<u64>,
    extra: &[(&str, Option<u64>)],
) -> String {
    let mut parts = Vec::new();
    if let Some(r) = rss {
        parts.push(format!("RSS {}", human_bytes(r as f64)));
    }
    parts.push(format!("live {}", human_bytes(live as f64)));
    if let Some(f) = free {
        parts.push(format!("allocator free {}", human_bytes(f as f64)));
    }
    let extra: Vec<String> = extra
        .iter()
        .filter_map(|(n, v)| v.map(|v| format!("{n} {}", human_bytes(v as f64))))
        .collect();
    let mut out = parts.join(", ");
    if !extra.is_empty() {
        let _ = write!(out, " ({})", extra.join(", "));
    }
    out
}

/// The header lines on memory: RSS beside live bytes at the end and at the
/// peak of RSS, the peak of live bytes, and the diagnosis paragraph.
fn write_memory(s: &mut String, m: &MemoryOut, sampled: bool) {
    let tilde = if sampled { "~" } else { "" };
    if m.stats_records == 0 {
        let _ = writeln!(
            s,
            "  memory:    RSS not recorded (no statistics records in the trace)"
        );
    } else {
        let mut end = format!(
            "at end ({}): {}",
            seconds(m.end_ns),
            memory_state(
                m.rss_end,
                m.live_end,
                m.free_held_end,
                &[("arena", m.arena_end), ("mmapped", m.mmapped_end)]
            )
        );
        if !m.allocator_stats {
            end.push_str("; allocator statistics not available (not glibc malloc)");
        }
        let _ = writeln!(s, "  memory:    {end}");
        if let (Some(ns), Some(live)) = (m.rss_peak_ns, m.live_at_rss_peak) {
            if ns != m.end_ns {
                let _ = writeln!(
                    s,
                    "             at RSS peak ({}): {}",
                    seconds(ns),
                    memory_state(m.rss_peak, live, m.free_held_at_rss_peak, &[])
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "  live peak: {tilde}{} ({tilde}{}) at {}",
        human_bytes(m.live_peak as f64),
        count(m.live_peak, "byte", "bytes"),
        seconds(m.live_peak_ns)
    );
    if m.live_grows {
        let _ = writeln!(
            s,
            "  growth:    live bytes rose by {tilde}{} from their low in the second half \
             of the trace to its end (see `mtrace-analyze diff TRACE --from 50%`)",
            human_bytes(m.live_growth_second_half as f64)
        );
    }
    if let Some(d) = &m.retention_diagnosis {
        s.push('\n');
        for line in wrap(&format!("Diagnosis: {d}"), 78) {
            let _ = writeln!(s, "{line}");
        }
        s.push('\n');
    }
}

/// Greedy word wrap.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Writes the human-readable report.
pub fn write_text(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    let mut s = String::new();
    let t = &report.trace;
    let exe = if t.exe.is_empty() { "?" } else { &t.exe };
    let _ = writeln!(
        s,
        "mtrace-rs report for {exe} (pid {}, parent {})",
        t.pid, t.ppid
    );
    if !t.cmdline.is_empty() {
        let _ = writeln!(s, "  command:   {}", t.cmdline.join(" "));
    }
    let mode = if t.mode == "exact" {
        "exact mode (every allocation and free)".to_string()
    } else {
        format!(
            "sampled mode (about one sample per {} bytes allocated; \
             ~ marks estimates)",
            thousands(t.sample_rate)
        )
    };
    let _ = writeln!(
        s,
        "  recorded:  {} for {}, {mode}",
        utc(t.start_realtime_ns),
        seconds(t.duration_ns)
    );
    let dropped = if t.dropped.total == 0 {
        "none".to_string()
    } else {
        let reasons: Vec<String> = t
            .dropped
            .by_reason
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r}: {}", thousands(*n)))
            .collect();
        format!(
            "{} events ({})",
            thousands(t.dropped.total),
            reasons.join("; ")
        )
    };
    let _ = writeln!(
        s,
        "  events:    {} allocations, {} frees, {} stacks; dropped: {dropped}",
        thousands(t.allocs),
        thousands(t.frees),
        thousands(t.stacks)
    );
    if t.frees_of_unknown > 0 || t.lost_frees > 0 {
        let mut parts = Vec::new();
        if t.frees_of_unknown > 0 {
            parts.push(format!(
                "{} of blocks allocated before tracing or never recorded (ignored)",
                count(t.frees_of_unknown, "free", "frees")
            ));
        }
        if t.lost_frees > 0 {
            parts.push(format!(
                "{} allocated again at the same address without a recorded free",
                count(t.lost_frees, "block", "blocks")
            ));
        }
        let _ = writeln!(s, "  unmatched: {}", parts.join("; "));
    }
    if !t.marks.is_empty() {
        let marks: Vec<String> = t
            .marks
            .iter()
            .map(|m| match m.what.as_str() {
                Some("forked") => format!("forked from pid {} at {}", t.ppid, seconds(m.ts)),
                Some("exec") => format!("exec at {}", seconds(m.ts)),
                _ => format!("event {} ({}) at {}", m.what, m.value, seconds(m.ts)),
            })
            .collect();
        let _ = writeln!(s, "  process:   {}", marks.join("; "));
    }
    let _ = writeln!(
        s,
        "  file:      {}",
        t.ending_detail.as_deref().unwrap_or("ended cleanly")
    );
    write_memory(&mut s, &report.memory, t.mode != "exact");
    let tilde = if report.totals.estimated { "~" } else { "" };
    let when = match &report.at {
        None => "end".to_string(),
        Some(a) if a.label.ends_with('s') || a.label.parse::<f64>().is_ok() => seconds(a.ns),
        Some(a) => format!("{} ({})", seconds(a.ns), a.label),
    };
    if report.totals.objects == 0 && report.totals.bytes == 0 {
        let _ = writeln!(s, "Outstanding at {when}: nothing");
    } else {
        let _ = writeln!(
            s,
            "Outstanding at {when}: {tilde}{} in {tilde}{} from {}",
            count(report.totals.bytes, "byte", "bytes"),
            count(report.totals.objects, "object", "objects"),
            count(report.groups as u64, "caller", "callers"),
        );
    }
    if report.callers.iter().any(|c| c.estimated) {
        let _ = writeln!(
            s,
            "  (~: scaled up from Poisson samples; ±: one standard error, a 68% interval, \
             from the Horvitz-Thompson variance of the samples)"
        );
    }
    for c in &report.callers {
        s.push('\n');
        let tilde = if c.estimated { "~" } else { "" };
        let err = match c.rel_error {
            Some(e) => format!(" ±{:.0}%", e * 100.0),
            None => String::new(),
        };
        let samples = if c.estimated {
            format!(" ({})", count(c.samples, "sample", "samples"))
        } else {
            String::new()
        };
        let name = frame_name(&c.function, &c.module, c.offset);
        let place = match (&c.file, c.line) {
            (Some(f), Some(l)) => format!(" ({}:{l})", basename(f)),
            _ => String::new(),
        };
        let module = match &c.module {
            Some(m) if !m.is_empty() => format!("  [{m}]"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "  #{:<2} {tilde}{} B{err}  {:.1}%  {tilde}{}{samples}  {name}{place}{module}",
            c.rank,
            thousands(c.bytes),
            c.share * 100.0,
            count(c.objects, "object", "objects"),
        );
        for f in &c.stack {
            let name = frame_name(&f.function, &f.module, f.offset);
            let place = frame_place(&f.file, f.line, &f.module);
            let inl = if f.inlined { "  (inlined)" } else { "" };
            let _ = writeln!(s, "        {name:<24} {place}{inl}");
        }
    }
    let shown: u64 = report.callers.iter().map(|c| c.bytes).sum();
    let hidden = report.groups.saturating_sub(report.callers.len());
    if hidden > 0 {
        let _ = writeln!(
            s,
            "\n  ... and {} more holding {}{} (see --top and --min-bytes)",
            count(hidden as u64, "caller", "callers"),
            tilde,
            count(report.totals.bytes.saturating_sub(shown), "byte", "bytes")
        );
    }
    if let Some(m) = &report.mmap {
        let _ = writeln!(
            s,
            "\nAnonymous mmap held at end: {} in {}",
            count(m.bytes, "byte", "bytes"),
            count(m.mappings, "mapping", "mappings")
        );
        for c in &m.callers {
            let name = c.function.as_deref().unwrap_or("?");
            let _ = writeln!(
                s,
                "  {:>14} B  {}  {name}",
                thousands(c.bytes),
                count(c.objects, "mapping", "mappings")
            );
        }
    }
    out.write_all(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_and_dates() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(123_456_789), "123,456,789");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29 00:00:00 UTC");
    }
}
