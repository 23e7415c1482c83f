//! Churn: the callers that allocate most often and most bytes in total, and
//! how long their blocks live. Temporary allocations cost time (every one is
//! a malloc and a free) and fragment the heap even when nothing leaks; this
//! view finds them, as heaptrack's "temporary allocations" and jemalloc's
//! lifetime statistics do.
//!
//! Each caller gets its allocation count and bytes (sampling undone), its
//! rate, the distribution of its block sizes (p50, p99) and of the lifetimes
//! of the blocks it freed (p50, p90, p99), and the share of its blocks freed
//! within [`SHORT_LIVED_NS`] (1 ms). Distributions are HdrHistograms with two
//! significant digits, so a percentile is within 1% of the exact value. In
//! sampled mode each sample counts for the objects it stands for.
//!
//! The module streams the decoder itself (the report's replay in
//! [`crate::analysis`] keeps no lifetimes). Records other than ALLOC and FREE
//! go to an ordinary [`Trace`], which then holds stacks, modules and process
//! facts for symbolizing and grouping but no blocks.
//!
//! **Invariant:** memory is proportional to the live blocks (one birth time,
//! size and stack per address) plus two histograms per distinct allocating
//! stack (a few KiB to about 25 KiB each, growing with the longest lifetime
//! and largest size seen), never to the file's size.
//!
//! Events can arrive out of order (see [`crate::analysis`]): a FREE that finds
//! no older live block is kept for [`REORDER_WINDOW_NS`] of trace time, and an
//! ALLOC that arrives later and is older than it pairs with it.

use std::io::{self, Read, Write};

use hdrhistogram::Histogram;
use mtrace_format::{DecodeError, Decoder, Ending, Record};
use serde::Serialize;

use crate::analysis::{weight, Mark, Trace, TraceEnding, REORDER_WINDOW_NS};
use crate::fxhash::FxHashMap;
use crate::report::{
    count, frame_name, key_of, locate, seconds, thousands, Key, ReportOptions, SymCache,
};
use crate::symbolize::{CodeRange, Symbolizer};

/// Blocks freed within this long after their allocation count as
/// short-lived.
pub const SHORT_LIVED_NS: u64 = 1_000_000;

/// How often (in trace time) unpaired frees older than the reorder window
/// are dropped.
const SWEEP_INTERVAL_NS: u64 = 1_000_000_000;

/// Significant digits of the histograms.
const SIGFIG: u8 = 2;

/// What the callers are ranked by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChurnSort {
    /// Allocations made.
    Count,
    /// Bytes allocated.
    Bytes,
    /// Blocks freed within [`SHORT_LIVED_NS`].
    ShortLived,
}

/// One stack's allocations and the lifetimes of its freed blocks.
#[derive(Clone, Debug)]
struct StackChurn {
    objects: f64,
    bytes: f64,
    samples: u64,
    freed: f64,
    short: f64,
    lifetimes: Dist,
    sizes: Dist,
}

/// A distribution: the histogram, and the exact extremes that percentiles
/// are clamped to (a stack that always allocates 10,000 bytes shows 10,000,
/// not the edge of the histogram bucket holding it).
#[derive(Clone, Debug)]
struct Dist {
    h: Histogram<u64>,
    min: u64,
    max: u64,
}

impl Dist {
    fn new() -> Dist {
        Dist {
            h: Histogram::new(SIGFIG).expect("2 significant digits are valid"),
            min: u64::MAX,
            max: 0,
        }
    }

    fn record(&mut self, v: u64, n: u64) {
        // An auto-resizing histogram takes every u64 value.
        let _ = self.h.record_n(v, n);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    fn add(&mut self, o: &Dist) {
        // Auto-resizing histograms of the same precision always add.
        let _ = self.h.add(&o.h);
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    fn percentiles(&self) -> Option<Percentiles> {
        let q = |q: f64| {
            self.h
                .median_equivalent(self.h.value_at_quantile(q))
                .clamp(self.min, self.max)
        };
        (!self.h.is_empty()).then(|| Percentiles {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
        })
    }
}

impl StackChurn {
    fn new() -> StackChurn {
        StackChurn {
            objects: 0.0,
            bytes: 0.0,
            samples: 0,
            freed: 0.0,
            short: 0.0,
            lifetimes: Dist::new(),
            sizes: Dist::new(),
        }
    }

    fn add(&mut self, o: &StackChurn) {
        self.objects += o.objects;
        self.bytes += o.bytes;
        self.samples += o.samples;
        self.freed += o.freed;
        self.short += o.short;
        self.lifetimes.add(&o.lifetimes);
        self.sizes.add(&o.sizes);
    }
}

/// A block live at the point of reading.
#[derive(Clone, Copy, Debug)]
struct Born {
    ts: u64,
    size: u64,
    stack: u64,
    sampled: bool,
}

/// A trace read for its churn.
pub struct Churn {
    /// Stacks, modules and process facts (no blocks: see the module docs).
    pub trace: Trace,
    /// Time of the first ALLOC or FREE, ns since the trace started.
    pub first_event_ns: u64,
    /// FREE records that paired with no ALLOC (blocks allocated before the
    /// trace began, or whose ALLOC was dropped).
    pub unpaired_frees: u64,
    per_stack: FxHashMap<u64, StackChurn>,
    live: FxHashMap<u64, Born>,
    /// Frees that came before the ALLOC they free: address -> earliest time.
    early_frees: FxHashMap<u64, u64>,
    last_sweep_ts: u64,
}

impl Churn {
    fn new(trace: Trace) -> Churn {
        Churn {
            trace,
            first_event_ns: u64::MAX,
            unpaired_frees: 0,
            per_stack: FxHashMap::default(),
            live: FxHashMap::default(),
            early_frees: FxHashMap::default(),
            last_sweep_ts: 0,
        }
    }

    /// An ALLOC or FREE at `ts`.
    fn see(&mut self, ts: u64) {
        self.first_event_ns = self.first_event_ns.min(ts);
        self.touch(ts);
    }

    /// Any record stamped `ts`.
    fn touch(&mut self, ts: u64) {
        self.trace.last_ts = self.trace.last_ts.max(ts);
        if self.trace.last_ts - self.last_sweep_ts >= SWEEP_INTERVAL_NS {
            self.last_sweep_ts = self.trace.last_ts;
            let horizon = self.trace.last_ts.saturating_sub(REORDER_WINDOW_NS);
            let before = self.early_frees.len();
            self.early_frees.retain(|_, ts| *ts >= horizon);
            self.unpaired_frees += (before - self.early_frees.len()) as u64;
        }
    }

    fn alloc(&mut self, addr: u64, b: Born) {
        self.trace.allocs += 1;
        let rate = self.trace.header.sample_rate;
        let w = weight(b.size, b.sampled, rate);
        let s = self
            .per_stack
            .entry(b.stack)
            .or_insert_with(StackChurn::new);
        s.objects += w.objects;
        s.bytes += w.bytes;
        s.samples += 1;
        s.sizes.record(b.size, times(w.objects));
        if let Some(&freed) = self.early_frees.get(&addr) {
            if freed >= b.ts {
                // Its free arrived first.
                self.early_frees.remove(&addr);
                self.died(&b, freed);
                return;
            }
        }
        match self.live.get(&addr) {
            // A newer block holds the address: this one died before it,
            // by a free that is not known (yet).
            Some(old) if old.ts > b.ts => {}
            Some(_) => {
                // The older block's free was lost: its lifetime is unknown.
                self.trace.lost_frees += 1;
                self.live.insert(addr, b);
            }
            None => {
                self.live.insert(addr, b);
            }
        }
    }

    fn free(&mut self, addr: u64, ts: u64) {
        self.trace.frees += 1;
        match self.live.get(&addr) {
            Some(b) if b.ts <= ts => {
                let b = *b;
                self.live.remove(&addr);
                self.died(&b, ts);
            }
            _ => {
                let e = self.early_frees.entry(addr).or_insert(ts);
                *e = (*e).min(ts);
            }
        }
    }

    fn died(&mut self, b: &Born, ts: u64) {
        let w = weight(b.size, b.sampled, self.trace.header.sample_rate).objects;
        let Some(s) = self.per_stack.get_mut(&b.stack) else {
            return;
        };
        let life = ts - b.ts;
        s.lifetimes.record(life, times(w));
        s.freed += w;
        if life <= SHORT_LIVED_NS {
            s.short += w;
        }
    }
}

/// How many times a recorded block counts in a histogram: the objects it
/// stands for, at least once.
fn times(objects: f64) -> u64 {
    (objects.round() as u64).max(1)
}

/// Reads a trace for its churn. Fails only when the file is not a readable
/// trace at all; damage later ends the reading with
/// [`TraceEnding::Corrupt`] and keeps what came before it.
pub fn read_churn<R: Read>(reader: R) -> Result<Churn, DecodeError> {
    let mut dec = Decoder::new(reader)?;
    let mut c = Churn::new(Trace::new(dec.header().clone()));
    loop {
        match dec.next() {
            Ok(Some(rec)) => match rec {
                Record::Alloc {
                    ts,
                    addr,
                    size,
                    stack,
                    sampled,
                } => {
                    c.see(ts);
                    c.alloc(
                        addr,
                        Born {
                            ts,
                            size,
                            stack,
                            sampled,
                        },
                    );
                }
                Record::Free { ts, addr } => {
                    c.see(ts);
                    c.free(addr, ts);
                }
                // Statistics and the leak scan say nothing about churn.
                Record::Stats { .. } | Record::Scan { .. } => {}
                // Timed records are kept here rather than through
                // `Trace::record`, whose memory timeline this view does not
                // need.
                Record::End { ts } => c.touch(ts),
                Record::Module(m) => {
                    c.touch(m.ts);
                    c.trace.modules.push(m);
                }
                Record::Mark { ts, what, value } => {
                    c.touch(ts);
                    c.trace.marks.push(Mark { ts, what, value });
                }
                Record::Code {
                    ts,
                    start,
                    len,
                    name,
                } => {
                    c.touch(ts);
                    c.trace.code.push(CodeRange {
                        start,
                        len,
                        name: String::from_utf8_lossy(&name).into_owned(),
                    });
                }
                other => c.trace.record(other),
            },
            Ok(None) => {
                c.trace.ending = Some(match dec.ending() {
                    Ending::Clean => TraceEnding::Clean,
                    Ending::Truncated { expected, read } => TraceEnding::Truncated {
                        expected: *expected,
                        read: *read,
                    },
                    Ending::CutOff | Ending::Reading => TraceEnding::CutOff,
                });
                break;
            }
            Err(e) => {
                c.trace.ending = Some(TraceEnding::Corrupt {
                    detail: e.to_string(),
                });
                break;
            }
        }
    }
    if c.first_event_ns == u64::MAX {
        c.first_event_ns = 0;
    }
    Ok(c)
}

/// Percentiles of a distribution.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
}

/// One caller's churn.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnCaller {
    pub rank: usize,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub offset: u64,
    /// Allocations (estimated in sampled mode).
    pub allocations: u64,
    /// Bytes allocated (estimated in sampled mode).
    pub bytes: u64,
    /// Allocations per second of the trace's event span.
    pub allocations_per_second: f64,
    /// Blocks freed during the trace.
    pub freed: u64,
    /// Blocks freed within 1 ms of their allocation.
    pub short_lived: u64,
    /// `short_lived / allocations`.
    pub short_lived_share: f64,
    /// Block sizes in bytes.
    pub size: Option<Percentiles>,
    /// Lifetimes of the freed blocks, in ns.
    pub lifetime_ns: Option<Percentiles>,
    /// Recorded events behind the figures.
    pub samples: u64,
    /// True when scaled up from Poisson samples.
    pub estimated: bool,
}

/// The churn report.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    pub path: String,
    pub exe: String,
    pub pid: u32,
    pub mode: &'static str,
    pub sample_rate: u64,
    /// From the first to the last event, ns.
    pub span_ns: u64,
    pub sort: ChurnSort,
    pub allocations: u64,
    pub bytes: u64,
    pub freed: u64,
    pub short_lived: u64,
    pub unpaired_frees: u64,
    pub lost_frees: u64,
    /// Callers before `top` and `min_bytes` were applied.
    pub groups: usize,
    pub callers: Vec<ChurnCaller>,
}

/// Groups the per-stack churn into callers and ranks them.
pub fn build_churn(
    churn: &Churn,
    path: &str,
    sym: &mut dyn Symbolizer,
    opts: &ReportOptions,
    sort: ChurnSort,
) -> ChurnReport {
    let trace = &churn.trace;
    let mut cache = SymCache::new(sym);
    let mut groups: FxHashMap<Key, (StackChurn, u64, f64)> = FxHashMap::default();
    let mut ids: Vec<u64> = churn.per_stack.keys().copied().collect();
    ids.sort_unstable();
    let mut total = StackChurn::new();
    for id in ids {
        let s = &churn.per_stack[&id];
        total.objects += s.objects;
        total.bytes += s.bytes;
        total.freed += s.freed;
        total.short += s.short;
        let key = key_of(trace, id, &mut cache, opts, false);
        let g = groups
            .entry(key)
            .or_insert_with(|| (StackChurn::new(), id, f64::MIN));
        g.0.add(s);
        if s.objects > g.2 {
            g.1 = id;
            g.2 = s.objects;
        }
    }
    let n_groups = groups.len();
    let span_ns = trace.last_ts.saturating_sub(churn.first_event_ns);
    let estimated = !trace.exact();
    let mut callers: Vec<ChurnCaller> = groups
        .into_iter()
        .filter(|(_, (s, _, _))| s.bytes.round() as u64 >= opts.min_bytes)
        .map(|(key, (s, rep, _))| {
            let loc = locate(trace, &key, rep, &mut cache, opts);
            let allocations = s.objects.round() as u64;
            ChurnCaller {
                rank: 0,
                function: loc.function,
                file: loc.file,
                line: loc.line,
                module: loc.module,
                offset: loc.offset,
                allocations,
                bytes: s.bytes.round() as u64,
                allocations_per_second: if span_ns == 0 {
                    0.0
                } else {
                    s.objects / (span_ns as f64 / 1e9)
                },
                freed: s.freed.round() as u64,
                short_lived: s.short.round() as u64,
                short_lived_share: if s.objects > 0.0 {
                    s.short / s.objects
                } else {
                    0.0
                },
                size: s.sizes.percentiles(),
                lifetime_ns: s.lifetimes.percentiles(),
                samples: s.samples,
                estimated: estimated && s.samples > 0,
            }
        })
        .collect();
    let measure = |c: &ChurnCaller| match sort {
        ChurnSort::Count => (c.allocations, c.bytes),
        ChurnSort::Bytes => (c.bytes, c.allocations),
        ChurnSort::ShortLived => (c.short_lived, c.allocations),
    };
    callers.sort_by(|a, b| {
        measure(b).cmp(&measure(a)).then_with(|| {
            frame_name(&a.function, &a.module, a.offset).cmp(&frame_name(
                &b.function,
                &b.module,
                b.offset,
            ))
        })
    });
    callers.truncate(opts.top);
    for (i, c) in callers.iter_mut().enumerate() {
        c.rank = i + 1;
    }
    ChurnReport {
        path: path.to_string(),
        exe: trace.exe.clone().unwrap_or_default(),
        pid: trace.header.pid,
        mode: if trace.exact() { "exact" } else { "sampled" },
        sample_rate: trace.header.sample_rate,
        span_ns,
        sort,
        allocations: total.objects.round() as u64,
        bytes: total.bytes.round() as u64,
        freed: total.freed.round() as u64,
        short_lived: total.short.round() as u64,
        unpaired_frees: churn.unpaired_frees + churn.early_frees.len() as u64,
        lost_frees: trace.lost_frees,
        groups: n_groups,
        callers,
    }
}

/// The short-lived threshold as the text says it.
const SHORT_LIVED_TEXT: &str = "1 ms";

/// A duration for people: `850 ns`, `12.5 µs`, `3.2 ms`, `1.250 s`.
pub fn duration(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => seconds(ns),
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0%".into()
    } else {
        format!("{:.0}%", part as f64 * 100.0 / whole as f64)
    }
}

/// Writes the report as text.
pub fn write_text(r: &ChurnReport, out: &mut dyn Write) -> io::Result<()> {
    use std::fmt::Write as _;
    let mut s = String::new();
    let exe = if r.exe.is_empty() { "?" } else { &r.exe };
    let t = if r.mode == "exact" { "" } else { "~" };
    let _ = writeln!(s, "mtrace-rs churn report for {exe} (pid {})", r.pid);
    let mode = if r.mode == "exact" {
        "exact mode".to_string()
    } else {
        format!(
            "sampled mode (one sample per {} bytes; ~ marks estimates)",
            thousands(r.sample_rate)
        )
    };
    let _ = writeln!(
        s,
        "  trace:     {}: {mode}, events over {}",
        r.path,
        seconds(r.span_ns)
    );
    let rate = if r.span_ns == 0 {
        String::new()
    } else {
        format!(
            " ({t}{:.1}/s)",
            r.allocations as f64 / (r.span_ns as f64 / 1e9)
        )
    };
    let _ = writeln!(
        s,
        "  allocated: {t}{}{rate}, {t}{} bytes; {t}{} freed, {t}{} ({}) within {}",
        count(r.allocations, "block", "blocks"),
        thousands(r.bytes),
        thousands(r.freed),
        thousands(r.short_lived),
        percent(r.short_lived, r.allocations),
        SHORT_LIVED_TEXT
    );
    if r.unpaired_frees > 0 || r.lost_frees > 0 {
        let _ = writeln!(
            s,
            "  unpaired:  {} of blocks allocated before the trace or whose \
             allocation was dropped; {} lost (lifetime unknown)",
            count(r.unpaired_frees, "free", "frees"),
            count(r.lost_frees, "free", "frees"),
        );
    }
    let by = match r.sort {
        ChurnSort::Count => "allocation count".to_string(),
        ChurnSort::Bytes => "bytes allocated".to_string(),
        ChurnSort::ShortLived => format!("blocks freed within {}", SHORT_LIVED_TEXT),
    };
    let _ = writeln!(
        s,
        "Callers by {by}: {} shown of {}",
        r.callers.len(),
        r.groups
    );
    for c in &r.callers {
        let t = if c.estimated { "~" } else { "" };
        s.push('\n');
        let name = frame_name(&c.function, &c.module, c.offset);
        let place = match (&c.file, c.line) {
            (Some(f), Some(l)) => format!(" ({}:{l})", f.rsplit('/').next().unwrap_or(f)),
            _ => String::new(),
        };
        let module = match &c.module {
            Some(m) if !m.is_empty() => format!("  [{m}]"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "  #{:<2} {t}{} ({t}{:.1}/s), {t}{} B  {name}{place}{module}",
            c.rank,
            count(c.allocations, "allocation", "allocations"),
            c.allocations_per_second,
            thousands(c.bytes),
        );
        let size = match &c.size {
            Some(p) => format!(
                "size p50 {} B, p99 {} B",
                thousands(p.p50),
                thousands(p.p99)
            ),
            None => "size -".into(),
        };
        let life = match &c.lifetime_ns {
            Some(p) => format!(
                "lifetime p50 {}, p90 {}, p99 {}",
                duration(p.p50),
                duration(p.p90),
                duration(p.p99)
            ),
            None => "none freed".into(),
        };
        let _ = writeln!(
            s,
            "        {size}; {life}; {} freed within {}, {t}{} still live",
            percent(c.short_lived, c.allocations),
            SHORT_LIVED_TEXT,
            thousands(c.allocations.saturating_sub(c.freed)),
        );
    }
    out.write_all(s.as_bytes())
}

/// Writes the report as JSON.
pub fn write_json(r: &ChurnReport, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, r).map_err(io::Error::other)?;
    writeln!(out)
}
