//! The leak check for CI (`mtrace-analyze check` and `run`): which blocks
//! each traced process left outstanding when it exited, whether anything
//! still pointed to them, and whether that fails the build.
//!
//! A trace's verdict depends on how the process ended:
//! - **exited** (the tracer wrote END): every block still live is a leak
//!   candidate. With a SCAN record (the tracer's conservative mark phase at
//!   exit, `MTRACE_RS_LEAK_SCAN=1`) each block is *definitely lost* (nothing
//!   pointed to it) or *reachable* (still referenced from globals, the
//!   exiting thread's stack or another reachable block), as LeakSanitizer
//!   and valgrind say; only definitely lost blocks count unless
//!   `include_reachable`. Without a SCAN every block counts, with
//!   reachability *unknown*.
//! - **killed** (no END, the last process event is not an exec): the
//!   process died by a signal or an abrupt `_exit`; its outstanding blocks
//!   are shown but are not leaks of a clean exit, and fail the check only
//!   with `fail_on_killed`.
//! - **exec'd** (no END after an EXEC mark): the image was replaced by
//!   another program, which writes its own trace; nothing to check.
//! - **damaged** (truncated or corrupt): an error, the check cannot vouch
//!   for it.
//!
//! Blocks are summed per stack (no symbols needed), each stack with
//! outstanding blocks is symbolized once to test the suppressions
//! ([`crate::suppress`]), and the rest are grouped as the report groups them
//! (by allocating function or by stack, [`crate::report`]).
//!
//! **Invariant:** the check holds one trace at a time: per process it keeps
//! only the grouped findings, so a test suite of thousands of processes
//! costs no more memory than its largest trace.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde::Serialize;

use crate::analysis::{Sums, Trace, TraceEnding};
use crate::fxhash::FxHashMap;
use crate::report::{
    count, frame_name, frame_place, group_stacks, locate, thousands, FrameOut, ReportOptions,
    SymCache,
};
use crate::suppress::{Origin, Suppressions};
use crate::symbolize::{Frame, Symbolizer};

/// Exit code: no leaks over the thresholds.
pub const EXIT_CLEAN: u8 = 0;
/// Exit code: a usage error, no traces found, or a trace that could not be
/// read or is damaged (also clap's code for usage errors).
pub const EXIT_ERROR: u8 = 2;
/// Exit code: leaks over the thresholds.
pub const EXIT_LEAKS: u8 = 23;
/// Exit code: no leaks, but a traced process was killed by a signal and
/// `--fail-on-killed` was given.
pub const EXIT_KILLED: u8 = 24;

/// What the check fails on.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Also count reachable blocks as leaks.
    pub include_reachable: bool,
    /// Fail only when leaked bytes exceed this.
    pub max_bytes: Option<u64>,
    /// Fail only when leaked objects exceed this.
    pub max_objects: Option<u64>,
    /// Apply the thresholds to the sum over all processes instead of to
    /// each process.
    pub total: bool,
    /// A process killed by a signal fails the check.
    pub fail_on_killed: bool,
    pub suppressions: Suppressions,
    /// Grouping and allocator-wrapper folding (`top` and `min_bytes` limit
    /// the groups shown in text and JUnit, not what counts).
    pub report: ReportOptions,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            include_reachable: false,
            max_bytes: None,
            max_objects: None,
            total: false,
            fail_on_killed: false,
            suppressions: Suppressions::with_defaults(),
            report: ReportOptions::default(),
        }
    }
}

impl CheckOptions {
    /// True when `a` is over the thresholds: with neither given, any leak
    /// (one object, even of zero bytes); otherwise each given limit.
    pub fn over(&self, a: Amount) -> bool {
        match (self.max_bytes, self.max_objects) {
            (None, None) => a.objects > 0 || a.bytes > 0,
            (b, o) => b.is_some_and(|m| a.bytes > m) || o.is_some_and(|m| a.objects > m),
        }
    }
}

/// Bytes and objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Amount {
    pub bytes: u64,
    pub objects: u64,
}

impl Amount {
    fn of(s: &Sums) -> Amount {
        Amount {
            bytes: s.bytes.round() as u64,
            objects: s.objects.round() as u64,
        }
    }

    pub fn add(&mut self, o: Amount) {
        self.bytes += o.bytes;
        self.objects += o.objects;
    }

    pub fn is_zero(&self) -> bool {
        self.bytes == 0 && self.objects == 0
    }

    /// `100 bytes in 2 objects`.
    pub fn describe(&self) -> String {
        format!(
            "{} in {}",
            count(self.bytes, "byte", "bytes"),
            count(self.objects, "object", "objects")
        )
    }
}

/// Whether anything pointed to a block at exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// The leak scan found no pointer to it.
    DefinitelyLost,
    /// No leak scan ran (or the process was killed): it may or may not be
    /// referenced.
    Unknown,
    /// The leak scan found a pointer to it.
    Reachable,
}

impl Reach {
    /// The words used in text.
    pub fn describe(self) -> &'static str {
        match self {
            Reach::DefinitelyLost => "definitely lost",
            Reach::Unknown => "leaked (reachability unknown)",
            Reach::Reachable => "still reachable",
        }
    }

    const ALL: [Reach; 3] = [Reach::DefinitelyLost, Reach::Unknown, Reach::Reachable];
}

/// How a traced process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The tracer wrote its END record: a normal exit.
    Exited,
    /// No END record: killed by a signal (or an abrupt exit).
    Killed,
    /// The image exec'd another program (which has its own trace).
    Exec,
    /// Its malloc was not the interposed one (an allocator linked into the
    /// program, as rustc does with jemalloc, or one preloaded first): the
    /// tracer said so in the trace (INFO malloc_owner).
    Untraced,
    /// The file is truncated or corrupt.
    Damaged,
}

/// The outcome for one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Nothing over the thresholds.
    Pass,
    /// Leaks over the thresholds (per process, or in total).
    Leaked,
    /// Killed; a failure only with `fail_on_killed`.
    Killed,
    /// Replaced by exec: not checked.
    Exec,
    /// Nothing was traced: not checked, and said so.
    Untraced,
    /// Damaged trace.
    Error,
}

/// One group of outstanding blocks: one allocating function (or stack) and
/// one reachability.
#[derive(Clone, Debug, Serialize)]
pub struct Leak {
    pub reach: Reach,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub bytes: u64,
    pub objects: u64,
    /// True when this group counts against the thresholds.
    pub counted: bool,
    /// The stack holding the most bytes of the group, innermost first.
    pub stack: Vec<FrameOut>,
    #[serde(skip)]
    pub offset: u64,
}

impl Leak {
    /// The allocating function as text.
    pub fn name(&self) -> String {
        let name = frame_name(&self.function, &self.module, self.offset);
        match (&self.file, self.line) {
            (Some(f), Some(l)) => format!("{name} ({}:{l})", basename(f)),
            _ => name,
        }
    }
}

/// The check of one trace.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessCheck {
    pub path: String,
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub cmdline: Vec<String>,
    pub status: Status,
    /// The object that defined malloc ahead of the tracer, if one did.
    pub malloc_owner: Option<String>,
    /// Why a trace is damaged, or other facts worth saying about it.
    pub notes: Vec<String>,
    /// True when the trace holds the tracer's leak scan.
    pub scanned: bool,
    /// True in exact mode (sample rate 1); otherwise figures are estimates.
    pub exact: bool,
    /// Events the tracer dropped (lost frees can look like leaks).
    pub dropped: u64,
    pub duration_ns: u64,
    pub definitely_lost: Amount,
    pub reachable: Amount,
    pub unknown: Amount,
    /// Outstanding blocks that matched a suppression.
    pub suppressed: Amount,
    /// What counts against the thresholds.
    pub counted: Amount,
    pub verdict: Verdict,
    /// Unsuppressed groups: counted ones first, then by bytes.
    pub leaks: Vec<Leak>,
    #[serde(skip)]
    pub start_realtime_ns: u64,
}

impl ProcessCheck {
    /// `suite[1234] ./suite --leak`: the exe's basename, the pid and the
    /// command line, the JUnit test case name.
    pub fn title(&self) -> String {
        let exe = if self.exe.is_empty() {
            self.cmdline.first().map(|a| basename(a)).unwrap_or("?")
        } else {
            basename(&self.exe)
        };
        let mut t = format!("{exe}[{}]", self.pid);
        if !self.cmdline.is_empty() {
            t.push(' ');
            t.push_str(&self.cmdline.join(" "));
        }
        t
    }

    /// True when this process fails the check.
    pub fn failed(&self, opts: &CheckOptions) -> bool {
        match self.verdict {
            Verdict::Leaked | Verdict::Error => true,
            Verdict::Killed => opts.fail_on_killed,
            Verdict::Pass | Verdict::Exec | Verdict::Untraced => false,
        }
    }
}

/// A suppression's use over the whole check.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Used {
    /// `leak:PATTERN`.
    pub suppression: String,
    /// `built-in` or `FILE:LINE`.
    pub source: String,
    /// Stacks (per process) it suppressed.
    pub stacks: u64,
    pub objects: u64,
    pub bytes: u64,
}

/// A file that is not a readable trace.
#[derive(Clone, Debug, Serialize)]
pub struct Unreadable {
    pub path: String,
    pub error: String,
}

/// The whole check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// The exit code of `check`, see [`EXIT_LEAKS`] and friends.
    pub exit_code: u8,
    /// `clean`, `leaks`, `killed` or `error`.
    pub result: &'static str,
    pub processes: Vec<ProcessCheck>,
    pub unreadable: Vec<Unreadable>,
    /// Leaks counted over all exited processes.
    pub counted: Amount,
    /// Suppressions that matched, in list order.
    pub suppressions_used: Vec<Used>,
    pub include_reachable: bool,
    pub max_bytes: Option<u64>,
    pub max_objects: Option<u64>,
    /// `per_process` or `total`.
    pub threshold_scope: &'static str,
}

/// Builds a check from traces one at a time.
pub struct Checker {
    pub opts: CheckOptions,
    processes: Vec<ProcessCheck>,
    unreadable: Vec<Unreadable>,
    used: Vec<Used>,
}

impl Checker {
    pub fn new(opts: CheckOptions) -> Checker {
        let used = opts
            .suppressions
            .list
            .iter()
            .map(|s| Used {
                suppression: s.text(),
                source: match &s.origin {
                    Origin::Default { why } => format!("built-in: {why}"),
                    Origin::File { path, line } => format!("{path}:{line}"),
                },
                ..Used::default()
            })
            .collect();
        Checker {
            opts,
            processes: Vec::new(),
            unreadable: Vec::new(),
            used,
        }
    }

    /// Checks one trace read from `path`.
    pub fn add(&mut self, trace: &Trace, path: &str, sym: &mut dyn Symbolizer) {
        let p = check_trace(trace, path, sym, &self.opts, &mut self.used);
        self.processes.push(p);
    }

    /// Records a file that could not be read as a trace.
    pub fn add_unreadable(&mut self, path: &str, error: &str) {
        self.unreadable.push(Unreadable {
            path: path.to_string(),
            error: error.to_string(),
        });
    }

    /// Applies the thresholds and orders the processes (by start time).
    pub fn finish(self) -> CheckResult {
        let Checker {
            opts,
            mut processes,
            unreadable,
            used,
        } = self;
        processes.sort_by_key(|p| (p.start_realtime_ns, p.pid));
        let mut counted = Amount::default();
        for p in processes.iter().filter(|p| p.status == Status::Exited) {
            counted.add(p.counted);
        }
        let total_over = opts.over(counted);
        for p in &mut processes {
            p.verdict = match p.status {
                Status::Exited => {
                    let over = if opts.total {
                        total_over && !p.counted.is_zero()
                    } else {
                        opts.over(p.counted)
                    };
                    if over {
                        Verdict::Leaked
                    } else {
                        Verdict::Pass
                    }
                }
                Status::Killed => Verdict::Killed,
                Status::Exec => Verdict::Exec,
                Status::Untraced => Verdict::Untraced,
                Status::Damaged => Verdict::Error,
            };
        }
        let leaked = processes.iter().any(|p| p.verdict == Verdict::Leaked);
        let killed = opts.fail_on_killed && processes.iter().any(|p| p.verdict == Verdict::Killed);
        let error = !unreadable.is_empty()
            || processes.is_empty()
            || processes.iter().any(|p| p.verdict == Verdict::Error);
        // Leaks are the finding CI is run for: they win over a killed
        // process, which wins over a damaged trace.
        let (exit_code, result) = if leaked {
            (EXIT_LEAKS, "leaks")
        } else if killed {
            (EXIT_KILLED, "killed")
        } else if error {
            (EXIT_ERROR, "error")
        } else {
            (EXIT_CLEAN, "clean")
        };
        CheckResult {
            exit_code,
            result,
            processes,
            unreadable,
            counted,
            suppressions_used: used.into_iter().filter(|u| u.stacks > 0).collect(),
            include_reachable: opts.include_reachable,
            max_bytes: opts.max_bytes,
            max_objects: opts.max_objects,
            threshold_scope: if opts.total { "total" } else { "per_process" },
        }
    }
}

/// How the trace ended, with a note for damage.
fn status_of(trace: &Trace) -> (Status, Option<String>) {
    match trace.ending.clone().unwrap_or(TraceEnding::CutOff) {
        TraceEnding::Clean if trace.malloc_owner.is_some() => (Status::Untraced, None),
        TraceEnding::Clean => (Status::Exited, None),
        TraceEnding::CutOff => {
            if trace.ended_at_exec() {
                (Status::Exec, None)
            } else {
                (Status::Killed, None)
            }
        }
        e @ (TraceEnding::Truncated { .. } | TraceEnding::Corrupt { .. }) => {
            (Status::Damaged, Some(e.describe()))
        }
    }
}

/// Every frame of a stack (inlined frames expanded, innermost first) and
/// the index of the allocating frame: the first that is not a wrapper, else
/// the outermost.
fn stack_frames(
    stack: &[u64],
    cache: &mut SymCache,
    opts: &ReportOptions,
) -> (Vec<Frame>, Option<usize>) {
    let mut frames = Vec::new();
    for &ret in stack {
        frames.extend(cache.frames(ret).iter().cloned());
    }
    let alloc = frames
        .iter()
        .position(|f| match &f.function {
            Some(name) => !opts.folds.is_wrapper(name),
            None => true,
        })
        .or_else(|| frames.len().checked_sub(1));
    (frames, alloc)
}

/// Checks one trace; `used` is indexed like `opts.suppressions.list`.
/// Thresholds are applied later ([`Checker::finish`]).
pub fn check_trace(
    trace: &Trace,
    path: &str,
    sym: &mut dyn Symbolizer,
    opts: &CheckOptions,
    used: &mut [Used],
) -> ProcessCheck {
    let (status, note) = status_of(trace);
    let mut notes: Vec<String> = note.into_iter().collect();
    let rate = trace.header.sample_rate;
    if !trace.exact() {
        notes.push(format!(
            "sampled mode (one sample per {} bytes): leak figures are estimates and small \
             leaks may be missed; run with MTRACE_RS_SAMPLE_BYTES=1",
            thousands(rate)
        ));
    }
    if trace.dropped_total() > 0 {
        notes.push(format!(
            "the tracer dropped {} events: a lost free shows as a leak",
            thousands(trace.dropped_total())
        ));
    }
    let scan = if status == Status::Exited {
        trace.scan.as_ref()
    } else {
        None
    };
    if status == Status::Exited && scan.is_none() {
        notes.push(
            "no leak scan in the trace (MTRACE_RS_LEAK_SCAN=1 was not set, or the process \
             ended through _exit): every outstanding block counts, reachable or not"
                .into(),
        );
    }

    // Step 1: sum live blocks per reachability and stack.
    let mut per: [FxHashMap<u64, Sums>; 3] = Default::default();
    let mut live = 0u64;
    if matches!(status, Status::Exited | Status::Killed) {
        for (addr, b) in trace.live_blocks_at() {
            live += 1;
            let reach = match scan {
                Some(s) if s.is_unreachable(addr) => Reach::DefinitelyLost,
                Some(_) => Reach::Reachable,
                None => Reach::Unknown,
            };
            per[reach_index(reach)]
                .entry(b.stack)
                .or_default()
                .add(&Sums::of(&b, rate));
        }
    }
    if let Some(s) = scan {
        if s.live != live {
            notes.push(format!(
                "the leak scan saw {} live blocks, the trace has {}",
                thousands(s.live),
                thousands(live)
            ));
        }
    }

    // Step 2: suppressions, decided once per stack.
    let mut cache = SymCache::new(sym);
    let mut decided: FxHashMap<u64, Option<usize>> = FxHashMap::default();
    let mut suppressed = Amount::default();
    let mut kept: [FxHashMap<u64, Sums>; 3] = Default::default();
    let mut counted_stacks: FxHashMap<(usize, u64), ()> = FxHashMap::default();
    for (ri, map) in per.iter().enumerate() {
        let mut ids: Vec<u64> = map.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let sums = map[&id];
            let hit = *decided.entry(id).or_insert_with(|| {
                let stack = trace.stacks.get(&id).filter(|_| id != 0)?;
                let (frames, alloc) = stack_frames(stack, &mut cache, &opts.report);
                opts.suppressions.find(&frames, alloc)
            });
            match hit {
                Some(i) => {
                    let a = Amount::of(&sums);
                    suppressed.add(a);
                    if let Some(u) = used.get_mut(i) {
                        if counted_stacks.insert((i, id), ()).is_none() {
                            u.stacks += 1;
                        }
                        u.objects += a.objects;
                        u.bytes += a.bytes;
                    }
                }
                None => {
                    kept[ri].insert(id, sums);
                }
            }
        }
    }

    // Step 3: group what is left.
    let mut amounts = [Amount::default(); 3];
    let mut leaks = Vec::new();
    for reach in Reach::ALL {
        let ri = reach_index(reach);
        let counted =
            status == Status::Exited && (reach != Reach::Reachable || opts.include_reachable);
        let mut groups = group_stacks(
            trace,
            &kept[ri],
            |s| s.bytes,
            &mut cache,
            &opts.report,
            false,
        );
        groups.sort_by(|a, b| b.1.bytes.total_cmp(&a.1.bytes).then_with(|| a.0.cmp(&b.0)));
        for (key, sums, rep) in groups {
            let a = Amount::of(&sums);
            amounts[ri].add(a);
            let loc = locate(trace, &key, rep, &mut cache, &opts.report);
            leaks.push(Leak {
                reach,
                function: loc.function,
                file: loc.file,
                line: loc.line,
                module: loc.module,
                bytes: a.bytes,
                objects: a.objects,
                counted,
                stack: loc.stack,
                offset: loc.offset,
            });
        }
    }
    leaks.sort_by(|a, b| {
        b.counted
            .cmp(&a.counted)
            .then(a.reach.cmp(&b.reach))
            .then(b.bytes.cmp(&a.bytes))
    });
    let mut counted = Amount::default();
    if status == Status::Exited {
        counted.add(amounts[reach_index(Reach::DefinitelyLost)]);
        counted.add(amounts[reach_index(Reach::Unknown)]);
        if opts.include_reachable {
            counted.add(amounts[reach_index(Reach::Reachable)]);
        }
    }
    ProcessCheck {
        path: path.to_string(),
        pid: trace.header.pid,
        ppid: trace.header.ppid,
        exe: trace.exe.clone().unwrap_or_default(),
        cmdline: trace.cmdline.clone(),
        status,
        malloc_owner: trace.malloc_owner.clone(),
        notes,
        scanned: scan.is_some(),
        exact: trace.exact(),
        dropped: trace.dropped_total(),
        duration_ns: trace.last_ts,
        definitely_lost: amounts[reach_index(Reach::DefinitelyLost)],
        reachable: amounts[reach_index(Reach::Reachable)],
        unknown: amounts[reach_index(Reach::Unknown)],
        suppressed,
        counted,
        verdict: Verdict::Pass,
        leaks,
        start_realtime_ns: trace.header.start_realtime_ns,
    }
}

fn reach_index(r: Reach) -> usize {
    match r {
        Reach::DefinitelyLost => 0,
        Reach::Unknown => 1,
        Reach::Reachable => 2,
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// One line on a process: what it is and what was found.
pub fn process_summary(p: &ProcessCheck, opts: &CheckOptions) -> String {
    let mut parts = Vec::new();
    match p.status {
        Status::Exited => {
            if !p.definitely_lost.is_zero() {
                parts.push(format!("{} definitely lost", p.definitely_lost.describe()));
            }
            if !p.unknown.is_zero() {
                parts.push(format!(
                    "{} leaked (no leak scan: reachability unknown)",
                    p.unknown.describe()
                ));
            }
            if !p.reachable.is_zero() {
                let how = if opts.include_reachable {
                    "counted"
                } else {
                    "not counted"
                };
                parts.push(format!(
                    "{} still reachable ({how})",
                    p.reachable.describe()
                ));
            }
            if parts.is_empty() {
                parts.push("no leaks".into());
            }
        }
        Status::Killed => {
            let mut out = p.unknown;
            out.add(p.definitely_lost);
            out.add(p.reachable);
            parts.push(format!(
                "killed by a signal (no clean exit); {} outstanding, not checked as leaks",
                out.describe()
            ));
        }
        Status::Exec => parts.push("replaced by exec (the new image has its own trace)".into()),
        Status::Untraced => parts.push(format!(
            "NOT TRACED: malloc is defined by {} ahead of libmtrace_rs.so (an allocator linked \
             into the program, or one preloaded first); not checked",
            p.malloc_owner.as_deref().unwrap_or("another object")
        )),
        Status::Damaged => parts.push("damaged trace".into()),
    }
    if !p.suppressed.is_zero() {
        parts.push(format!("{} suppressed", p.suppressed.describe()));
    }
    parts.join("; ")
}

/// Writes the stacks of a process's leaks, at most `top` groups.
pub fn write_leaks(s: &mut String, p: &ProcessCheck, top: usize, indent: &str) {
    for (i, l) in p.leaks.iter().enumerate() {
        if i >= top {
            let rest = &p.leaks[i..];
            let mut a = Amount::default();
            for l in rest {
                a.add(Amount {
                    bytes: l.bytes,
                    objects: l.objects,
                });
            }
            let _ = writeln!(
                s,
                "{indent}... and {} more holding {} (see --top)",
                count(rest.len() as u64, "group", "groups"),
                a.describe()
            );
            break;
        }
        let how = if p.status == Status::Killed {
            "outstanding when killed".to_string()
        } else if l.counted {
            l.reach.describe().to_string()
        } else {
            format!("{} (not counted)", l.reach.describe())
        };
        let module = match &l.module {
            Some(m) if !m.is_empty() => format!("  [{m}]"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{indent}{} {how} in {}{module}",
            Amount {
                bytes: l.bytes,
                objects: l.objects
            }
            .describe(),
            l.name()
        );
        for f in &l.stack {
            let name = frame_name(&f.function, &f.module, f.offset);
            let place = frame_place(&f.file, f.line, &f.module);
            let inl = if f.inlined { "  (inlined)" } else { "" };
            let _ = writeln!(s, "{indent}    {name:<28} {place}{inl}");
        }
    }
}

/// Writes the human report (for stderr).
pub fn write_text(r: &CheckResult, opts: &CheckOptions, out: &mut dyn Write) -> io::Result<()> {
    let mut s = String::new();
    let n = r.processes.len();
    let _ = writeln!(
        s,
        "mtrace-analyze check: {} traced",
        count(n as u64, "process", "processes")
    );
    for u in &r.unreadable {
        let _ = writeln!(s, "\nERROR  {}: {}", u.path, u.error);
    }
    for p in &r.processes {
        let tag = match p.verdict {
            Verdict::Pass => "ok    ",
            Verdict::Leaked => "LEAK  ",
            Verdict::Killed if opts.fail_on_killed => "KILLED",
            Verdict::Killed => "killed",
            Verdict::Exec => "exec  ",
            Verdict::Untraced => "untraced",
            Verdict::Error => "ERROR ",
        };
        let interesting = !matches!(p.verdict, Verdict::Pass | Verdict::Exec)
            || p.status == Status::Untraced
            || p.leaks.iter().any(|l| l.counted);
        if interesting {
            s.push('\n');
        }
        let _ = writeln!(s, "{tag} {}: {}", p.title(), process_summary(p, opts));
        if interesting {
            let _ = writeln!(s, "       trace: {}", p.path);
            for note in &p.notes {
                let _ = writeln!(s, "       note: {note}");
            }
            let shown: Vec<&Leak> = p
                .leaks
                .iter()
                .filter(|l| l.counted || p.status == Status::Killed || opts.include_reachable)
                .collect();
            if !shown.is_empty() {
                let sub = ProcessCheck {
                    leaks: shown.into_iter().cloned().collect(),
                    ..p.clone()
                };
                write_leaks(&mut s, &sub, opts.report.top, "       ");
            }
        }
    }
    if !r.suppressions_used.is_empty() {
        let _ = writeln!(s, "\nSuppressions used:");
        let _ = writeln!(
            s,
            "  {:>7} {:>9} {:>13}  suppression",
            "stacks", "objects", "bytes"
        );
        for u in &r.suppressions_used {
            let _ = writeln!(
                s,
                "  {:>7} {:>9} {:>13}  {}  ({})",
                thousands(u.stacks),
                thousands(u.objects),
                thousands(u.bytes),
                u.suppression,
                u.source
            );
        }
    }
    s.push('\n');
    let _ = writeln!(s, "{}", result_line(r, opts));
    out.write_all(s.as_bytes())
}

/// The last line of the report: the verdict and the exit code.
pub fn result_line(r: &CheckResult, opts: &CheckOptions) -> String {
    let by = |v: Verdict| r.processes.iter().filter(|p| p.verdict == v).count() as u64;
    let mut parts = vec![format!(
        "{} checked",
        count(r.processes.len() as u64, "process", "processes")
    )];
    let leaked = by(Verdict::Leaked);
    if leaked > 0 {
        parts.push(format!("{leaked} leaked"));
    }
    let killed = by(Verdict::Killed);
    if killed > 0 {
        parts.push(format!(
            "{killed} killed{}",
            if opts.fail_on_killed {
                ""
            } else {
                " (not failing, see --fail-on-killed)"
            }
        ));
    }
    let exec = by(Verdict::Exec);
    if exec > 0 {
        parts.push(format!("{exec} exec'd"));
    }
    let bad = by(Verdict::Error) + r.unreadable.len() as u64;
    if bad > 0 {
        parts.push(format!("{bad} unreadable or damaged"));
    }
    let limit = match (opts.max_bytes, opts.max_objects) {
        (None, None) => "any leak fails".to_string(),
        (b, o) => {
            let mut l = Vec::new();
            if let Some(b) = b {
                l.push(format!("more than {}", count(b, "byte", "bytes")));
            }
            if let Some(o) = o {
                l.push(format!("more than {}", count(o, "object", "objects")));
            }
            format!("{} fail", l.join(" or "))
        }
    };
    let scope = if opts.total {
        "in total"
    } else {
        "per process"
    };
    let what = if opts.include_reachable {
        "leaked or reachable"
    } else {
        "leaked"
    };
    let verdict = match r.exit_code {
        EXIT_LEAKS => "LEAKS FOUND",
        EXIT_KILLED => "KILLED PROCESS",
        EXIT_ERROR if r.processes.is_empty() && r.unreadable.is_empty() => "NO TRACES",
        EXIT_ERROR => "ERROR",
        _ => "no leaks",
    };
    format!(
        "{verdict} (exit {}): {}; {what} {} ({scope}; {limit})",
        r.exit_code,
        parts.join(", "),
        r.counted.describe()
    )
}

/// Writes the result as one JSON object and a newline.
pub fn write_json(r: &CheckResult, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, r)?;
    writeln!(out)
}
