//! Growth: which callers' outstanding memory grew, either between two
//! moments of one trace (`diff TRACE --from T1 --to T2`) or from one trace
//! to another of the same program (`diff OLD NEW`).
//!
//! Within a trace, growth is `live(T2) - live(T1)` per group, which is the
//! bytes allocated in the window and still live at T2 minus the bytes live
//! at T1 and freed by T2; both parts are shown. Dividing by the window gives
//! a rate in bytes per minute, which is what tells a slow steady leak (a
//! rate that holds over any window) from a cache that grew once (no growth
//! in a window after it filled).
//!
//! Across traces, groups are matched by symbolized names (the allocating
//! function, or with `--by stack` the names of every frame), never by
//! addresses or stack ids, which change from run to run.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde::Serialize;

use crate::analysis::{SnapSums, Sums, Trace};
use crate::fxhash::FxHashMap;
use crate::report::{
    count, frame_name, frame_place, group_stacks, locate, seconds, summarize, thousands, AtOut,
    FrameOut, Key, Moment, ReportOptions, SymCache, TraceSummary,
};
use crate::symbolize::Symbolizer;

/// A growth report; its JSON form is the `diff --format json` output.
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    /// `"window"` (two moments of one trace) or `"traces"` (two traces).
    pub kind: &'static str,
    /// The trace (for `"traces"`, the new one).
    pub trace: TraceSummary,
    /// The old trace, for `"traces"`.
    pub old_trace: Option<TraceSummary>,
    /// The window's start and end, for `"window"`.
    pub from: Option<AtOut>,
    pub to: Option<AtOut>,
    pub totals: Growth,
    pub callers: Vec<DiffCaller>,
    /// Groups whose outstanding memory changed, before `--top`.
    pub groups: usize,
}

/// Growth of everything, or of one group.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Growth {
    /// Outstanding at the start (T1, or the old trace's end).
    pub from_bytes: u64,
    pub from_objects: u64,
    /// Outstanding at the end (T2, or the new trace's end).
    pub to_bytes: u64,
    pub to_objects: u64,
    /// `to - from`.
    pub growth_bytes: i64,
    pub growth_objects: i64,
    /// `growth_bytes` per minute of the window; `null` across traces.
    pub bytes_per_minute: Option<f64>,
    /// In a window: allocated in it and still live at its end.
    pub allocated_bytes: Option<u64>,
    pub allocated_objects: Option<u64>,
    /// In a window: live at its start and freed by its end.
    pub freed_bytes: Option<u64>,
    pub freed_objects: Option<u64>,
    pub estimated: bool,
}

/// One group's growth.
#[derive(Clone, Debug, Serialize)]
pub struct DiffCaller {
    pub rank: usize,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    #[serde(flatten)]
    pub growth: Growth,
    /// A representative stack, innermost first.
    pub stack: Vec<FrameOut>,
    #[serde(skip)]
    pub offset: u64,
}

fn round(v: f64) -> u64 {
    v.max(0.0).round() as u64
}

impl Growth {
    fn new(from: &Sums, to: &Sums, window_ns: Option<u64>) -> Growth {
        let growth = to.bytes - from.bytes;
        Growth {
            from_bytes: round(from.bytes),
            from_objects: round(from.objects),
            to_bytes: round(to.bytes),
            to_objects: round(to.objects),
            growth_bytes: round(to.bytes) as i64 - round(from.bytes) as i64,
            growth_objects: round(to.objects) as i64 - round(from.objects) as i64,
            bytes_per_minute: window_ns
                .filter(|&w| w > 0)
                .map(|w| growth * 60e9 / w as f64),
            allocated_bytes: None,
            allocated_objects: None,
            freed_bytes: None,
            freed_objects: None,
            estimated: from.estimated || to.estimated,
        }
    }

    /// Growth within a window: `from` is the snapshot at T1, `to` the one
    /// at T2 with the blocks born after T1 split off.
    fn window(from: &Sums, to: &SnapSums, window_ns: u64) -> Growth {
        let mut g = Growth::new(from, &to.live, Some(window_ns));
        let survivors = to.live.bytes - to.born_after.bytes;
        let survivor_objects = to.live.objects - to.born_after.objects;
        g.allocated_bytes = Some(round(to.born_after.bytes));
        g.allocated_objects = Some(round(to.born_after.objects));
        g.freed_bytes = Some(round(from.bytes - survivors));
        g.freed_objects = Some(round(from.objects - survivor_objects));
        g
    }
}

/// Growth between snapshots `from` and `to` of one trace (see
/// [`Snapshot`](crate::analysis::Snapshot); `to` must split off the blocks
/// born after `from`'s moment).
pub fn window_diff(
    trace: &Trace,
    path: &str,
    sym: &mut dyn Symbolizer,
    opts: &ReportOptions,
    from: &Moment,
    to: &Moment,
) -> DiffReport {
    let window = to.ns.saturating_sub(from.ns);
    let a = trace.snapshot(from.snapshot);
    let b = trace.snapshot(to.snapshot);
    // One table of (live at T1, snapshot at T2) per stack.
    let mut per_stack: FxHashMap<u64, (SnapSums, SnapSums)> = FxHashMap::default();
    for (id, s) in a {
        per_stack.entry(id).or_default().0 = s;
    }
    for (id, s) in b {
        per_stack.entry(id).or_default().1 = s;
    }
    let mut cache = SymCache::new(sym);
    let groups = group_stacks(
        trace,
        &per_stack,
        |(f, t)| t.live.bytes - f.live.bytes,
        &mut cache,
        opts,
        false,
    );
    let mut total = (SnapSums::default(), SnapSums::default());
    let mut rows = Vec::new();
    for (key, (f, t), rep) in groups {
        total.0.add(&f);
        total.1.add(&t);
        rows.push((key, Growth::window(&f.live, &t, window), rep));
    }
    let totals = Growth::window(&total.0.live, &total.1, window);
    let (callers, groups) = rank(
        rows,
        opts,
        |key, rep, cache| locate(trace, key, rep, cache, opts),
        &mut cache,
    );
    DiffReport {
        kind: "window",
        trace: summarize(trace, path),
        old_trace: None,
        from: Some(AtOut {
            ns: from.ns,
            label: from.label.clone(),
        }),
        to: Some(AtOut {
            ns: to.ns,
            label: to.label.clone(),
        }),
        totals,
        callers,
        groups,
    }
}

/// Growth of what is outstanding at the end, from trace `old` to `new`.
#[allow(clippy::too_many_arguments)]
pub fn trace_diff(
    old: &Trace,
    old_path: &str,
    old_sym: &mut dyn Symbolizer,
    new: &Trace,
    new_path: &str,
    new_sym: &mut dyn Symbolizer,
    opts: &ReportOptions,
) -> DiffReport {
    let ends = |t: &Trace| -> FxHashMap<u64, Sums> {
        t.live_by_stack()
            .into_iter()
            .map(|(k, v)| (k, v.live))
            .collect()
    };
    let mut old_cache = SymCache::new(old_sym);
    let mut new_cache = SymCache::new(new_sym);
    let old_groups = group_stacks(old, &ends(old), |s| s.bytes, &mut old_cache, opts, true);
    let new_groups = group_stacks(new, &ends(new), |s| s.bytes, &mut new_cache, opts, true);
    // Per key: (old sums, new sums, representative in new, in old).
    let mut merged: FxHashMap<Key, (Sums, Sums, Option<u64>, Option<u64>)> = FxHashMap::default();
    for (k, s, rep) in old_groups {
        let m = merged.entry(k).or_default();
        m.0 = s;
        m.3 = Some(rep);
    }
    for (k, s, rep) in new_groups {
        let m = merged.entry(k).or_default();
        m.1 = s;
        m.2 = Some(rep);
    }
    let mut total = (Sums::default(), Sums::default());
    let mut rows = Vec::new();
    for (key, (o, n, rep_new, rep_old)) in merged {
        total.0.add(&o);
        total.1.add(&n);
        // Locations come from the trace that has the group, the new one
        // first; the representative id is tagged with which trace it is of.
        let rep = match (rep_new, rep_old) {
            (Some(r), _) => (r, true),
            (None, Some(r)) => (r, false),
            (None, None) => (0, true),
        };
        rows.push((key, Growth::new(&o, &n, None), rep));
    }
    let totals = Growth::new(&total.0, &total.1, None);
    let mut caches = (old_cache, new_cache);
    let (callers, groups) = rank(
        rows,
        opts,
        |key, (rep, in_new), caches: &mut (SymCache, SymCache)| {
            if in_new {
                locate(new, key, rep, &mut caches.1, opts)
            } else {
                locate(old, key, rep, &mut caches.0, opts)
            }
        },
        &mut caches,
    );
    DiffReport {
        kind: "traces",
        trace: summarize(new, new_path),
        old_trace: Some(summarize(old, old_path)),
        from: None,
        to: None,
        totals,
        callers,
        groups,
    }
}

/// Orders groups by growth (largest first), drops the unchanged ones, and
/// keeps `opts.top` of those at least `opts.min_bytes` in size of change.
fn rank<R: Copy, C>(
    mut rows: Vec<(Key, Growth, R)>,
    opts: &ReportOptions,
    mut locate: impl FnMut(&Key, R, &mut C) -> crate::report::Location,
    ctx: &mut C,
) -> (Vec<DiffCaller>, usize) {
    rows.retain(|(_, g, _)| g.growth_bytes != 0 || g.growth_objects != 0);
    rows.sort_by(|a, b| {
        b.1.growth_bytes
            .cmp(&a.1.growth_bytes)
            .then_with(|| b.1.growth_objects.cmp(&a.1.growth_objects))
            .then_with(|| a.0.cmp(&b.0))
    });
    let n = rows.len();
    let mut callers = Vec::new();
    for (key, growth, rep) in rows {
        if callers.len() >= opts.top {
            break;
        }
        if growth.growth_bytes.unsigned_abs() < opts.min_bytes {
            continue;
        }
        let loc = locate(&key, rep, ctx);
        callers.push(DiffCaller {
            rank: callers.len() + 1,
            function: loc.function,
            file: loc.file,
            line: loc.line,
            module: loc.module,
            growth,
            stack: loc.stack,
            offset: loc.offset,
        });
    }
    (callers, n)
}

/// Writes the growth report as one JSON object and a newline.
pub fn write_json(report: &DiffReport, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer(&mut *out, report)?;
    writeln!(out)
}

fn signed(n: i64) -> String {
    if n < 0 {
        format!("-{}", thousands(n.unsigned_abs()))
    } else {
        format!("+{}", thousands(n as u64))
    }
}

fn rate(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{} B/min", signed(r.round() as i64)),
        None => String::new(),
    }
}

fn moment(a: &AtOut) -> String {
    if a.label.ends_with('s') || a.label.parse::<f64>().is_ok() {
        seconds(a.ns)
    } else {
        format!("{} ({})", seconds(a.ns), a.label)
    }
}

fn describe(t: &TraceSummary) -> String {
    let exe = if t.exe.is_empty() { "?" } else { &t.exe };
    format!(
        "{}: {exe} (pid {}), {} mode, {}",
        t.path,
        t.pid,
        t.mode,
        seconds(t.duration_ns)
    )
}

/// Writes the human-readable growth report.
pub fn write_text(report: &DiffReport, out: &mut dyn Write) -> io::Result<()> {
    let mut s = String::new();
    let tilde = if report.totals.estimated { "~" } else { "" };
    let g = &report.totals;
    match (&report.old_trace, &report.from, &report.to) {
        (Some(old), _, _) => {
            let _ = writeln!(s, "mtrace-rs growth from one trace to another");
            let _ = writeln!(s, "  old:       {}", describe(old));
            let _ = writeln!(s, "  new:       {}", describe(&report.trace));
            let _ = writeln!(
                s,
                "  outstanding at the end: {tilde}{} bytes in the old trace, {tilde}{} in the new",
                thousands(g.from_bytes),
                thousands(g.to_bytes)
            );
        }
        (None, Some(from), Some(to)) => {
            let t = &report.trace;
            let exe = if t.exe.is_empty() { "?" } else { &t.exe };
            let _ = writeln!(
                s,
                "mtrace-rs growth report for {exe} (pid {}, parent {})",
                t.pid, t.ppid
            );
            let _ = writeln!(s, "  trace:     {}", describe(t));
            let _ = writeln!(
                s,
                "  window:    {} to {}: {}",
                moment(from),
                moment(to),
                seconds(to.ns.saturating_sub(from.ns))
            );
            let _ = writeln!(
                s,
                "  live:      {tilde}{} bytes at {}, {tilde}{} bytes at {}",
                thousands(g.from_bytes),
                seconds(from.ns),
                thousands(g.to_bytes),
                seconds(to.ns)
            );
        }
        _ => {}
    }
    let r = rate(g.bytes_per_minute);
    let _ = writeln!(
        s,
        "Growth of outstanding memory: {tilde}{} bytes, {tilde}{} objects{} from {}",
        signed(g.growth_bytes),
        signed(g.growth_objects),
        if r.is_empty() {
            String::new()
        } else {
            format!(" ({tilde}{r})")
        },
        count(report.groups as u64, "changed caller", "changed callers")
    );
    for c in &report.callers {
        s.push('\n');
        let tilde = if c.growth.estimated { "~" } else { "" };
        let name = frame_name(&c.function, &c.module, c.offset);
        let place = match (&c.file, c.line) {
            (Some(f), Some(l)) => format!(" ({}:{l})", f.rsplit('/').next().unwrap_or(f)),
            _ => String::new(),
        };
        let module = match &c.module {
            Some(m) if !m.is_empty() => format!("  [{m}]"),
            _ => String::new(),
        };
        let r = rate(c.growth.bytes_per_minute);
        let r = if r.is_empty() {
            String::new()
        } else {
            format!("  {tilde}{r}")
        };
        let _ = writeln!(
            s,
            "  #{:<2} {tilde}{} B  {tilde}{} objects{r}  {name}{place}{module}",
            c.rank,
            signed(c.growth.growth_bytes),
            signed(c.growth.growth_objects),
        );
        match (c.growth.allocated_bytes, c.growth.freed_bytes) {
            (Some(a), Some(f)) => {
                let _ = writeln!(
                    s,
                    "        {tilde}{} B in {tilde}{} allocated in the window and still live; \
                     {tilde}{} B in {tilde}{} live at its start and freed since",
                    thousands(a),
                    count(c.growth.allocated_objects.unwrap_or(0), "object", "objects"),
                    thousands(f),
                    count(c.growth.freed_objects.unwrap_or(0), "object", "objects"),
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "        {tilde}{} B in {tilde}{} before, {tilde}{} B in {tilde}{} after",
                    thousands(c.growth.from_bytes),
                    count(c.growth.from_objects, "object", "objects"),
                    thousands(c.growth.to_bytes),
                    count(c.growth.to_objects, "object", "objects"),
                );
            }
        }
        for f in &c.stack {
            let name = frame_name(&f.function, &f.module, f.offset);
            let place = frame_place(&f.file, f.line, &f.module);
            let inl = if f.inlined { "  (inlined)" } else { "" };
            let _ = writeln!(s, "        {name:<24} {place}{inl}");
        }
    }
    let hidden = report.groups.saturating_sub(report.callers.len());
    if hidden > 0 {
        let _ = writeln!(
            s,
            "\n  ... and {} more (see --top and --min-bytes)",
            count(hidden as u64, "changed caller", "changed callers")
        );
    }
    out.write_all(s.as_bytes())
}
