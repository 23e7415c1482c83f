//! The `mtrace-analyze` command line. `main` calls [`run`]; errors print with
//! their chain, a closed stdout (`| head`) is success.
//!
//! Exit codes: 0 report written; 2 the file is not a readable trace (one line
//! on stderr), or it is damaged part-way (the report of what was read, and a
//! warning on stderr); clap's own usage errors also exit with 2. `check` and
//! `run` have their own codes ([`CHECK_EXIT_CODES`]): 0 clean, 23 leaks, 24
//! a killed process with `--fail-on-killed`, 2 errors, and for `run` the
//! command's own failure status.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};

use mtrace_analyze::analysis::{read_trace_watched, Snapshot, Trace, TraceEnding};
use mtrace_analyze::check::{self, CheckOptions, Checker, EXIT_ERROR, EXIT_LEAKS};
use mtrace_analyze::churn;
use mtrace_analyze::diff;
use mtrace_analyze::flame;
use mtrace_analyze::folds::Folds;
use mtrace_analyze::pprof;
use mtrace_analyze::report::{
    build_report, write_json, write_text, GroupBy, Moment, ReportOptions,
};
use mtrace_analyze::suppress::Suppressions;
use mtrace_analyze::symbolize::{ElfSymbolizer, Preloader, Symbolizer};
use mtrace_analyze::timeline;
use mtrace_analyze::timespec::{TimeSpec, TimeSpecError};

/// Reads an mtrace-rs trace and reports who holds memory.
///
/// `mtrace-analyze TRACE` is short for `mtrace-analyze report TRACE`.
#[derive(Parser, Debug)]
#[command(
    name = "mtrace-analyze",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    report: ReportArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Memory outstanding (live) at the end of the trace (or at --at), by
    /// caller, with RSS beside live bytes.
    Report(ReportArgs),
    /// RSS, live bytes and glibc's free, arena and mmapped bytes over time:
    /// a table, JSON, or an SVG plot.
    Timeline(TimelineArgs),
    /// Callers ranked by growth of outstanding memory: between two moments
    /// of one trace (--from, --to), or from one trace to another (OLD NEW).
    Diff(DiffArgs),
    /// A flamegraph (SVG, drawn with inferno) of outstanding bytes,
    /// allocated bytes or allocation count by stack.
    Flamegraph(FlameArgs),
    /// Temporary allocations: callers ranked by allocation count or bytes
    /// allocated, with their sizes and the lifetimes of their blocks
    /// (p50/p90/p99, share freed within 1 ms).
    Churn(ChurnArgs),
    /// The CI leak check: fail when traced processes exited with leaked
    /// blocks (definitely lost per the tracer's leak scan; everything
    /// outstanding when the trace has no scan).
    #[command(after_help = CHECK_EXIT_CODES)]
    Check(CheckArgs),
    /// Run a command (and every process it forks or execs) under the tracer
    /// in exact mode with the leak scan, then check its traces.
    #[command(after_help = RUN_EXIT_CODES)]
    Run(RunArgs),
}

/// The exit codes of `check`, shown in its --help.
const CHECK_EXIT_CODES: &str = "\
Exit codes:
  0   no leaks over the thresholds
  23  leaks over the thresholds
  24  no leaks, but a process was killed by a signal (only with --fail-on-killed)
  2   usage error, no traces, or a trace that is unreadable or damaged
      (leaks, then a killed process, take precedence over damaged traces)";

/// The exit codes of `run`, shown in its --help.
const RUN_EXIT_CODES: &str = "\
Exit codes:
  23  leaks over the thresholds (wins over everything else)
  N   the command failed: its exit status, or 128+SIGNAL when a signal killed it
  24  the command succeeded, no leaks, but a traced process was killed by a
      signal (only with --fail-on-killed)
  2   usage error, the library was not found, the command could not be
      started, no traces were written, or a trace is damaged
  0   the command succeeded and no leaks were found

The command's environment gets LD_PRELOAD (the library appended to any
existing LD_PRELOAD), MTRACE_RS_SAMPLE_BYTES=1, MTRACE_RS_LEAK_SCAN=1, MTRACE_RS_MMAP=1 and
MTRACE_RS_OUT=DIR/trace.%p.bin.";

/// What the leak check fails on and how it reports (shared by `check` and
/// `run`).
#[derive(Args, Debug)]
struct CheckOpts {
    /// Also fail on blocks still reachable at exit (referenced from globals,
    /// the stack or other reachable blocks), as valgrind's
    /// --errors-for-leak-kinds=all.
    #[arg(long)]
    include_reachable: bool,
    /// Fail only when more than N bytes leaked (per process, or in total
    /// with --total). Without --max-bytes and --max-objects any leak fails.
    #[arg(long, value_name = "N")]
    max_bytes: Option<u64>,
    /// Fail only when more than N objects leaked.
    #[arg(long, value_name = "N")]
    max_objects: Option<u64>,
    /// Apply the thresholds to each process (the default).
    #[arg(long, conflicts_with = "total")]
    per_process: bool,
    /// Apply the thresholds to the sum over all processes.
    #[arg(long)]
    total: bool,
    /// Fail (exit 24) when a traced process was killed by a signal.
    #[arg(long)]
    fail_on_killed: bool,
    /// LeakSanitizer-style suppressions: `leak:PATTERN` lines matched
    /// against the function, module or source file of any frame (`*`
    /// wildcard, `^`/`$` anchors, otherwise a substring); `#` comments.
    /// May be given more than once.
    #[arg(long, value_name = "FILE")]
    suppressions: Vec<PathBuf>,
    /// Do not apply the built-in suppressions (one-time allocations of
    /// glibc, ld.so, libstdc++ and the JVM; see SUPPRESSIONS.md).
    #[arg(long)]
    no_default_suppressions: bool,
    /// Write a JUnit XML report (one test case per traced process).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Write the result as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also print the result on standard output: json, or none (the human
    /// report always goes to standard error).
    #[arg(long, value_enum, default_value_t = CheckFormat::None)]
    format: CheckFormat,
    /// Group leaks by the allocating function (wrappers folded) or by whole
    /// stack.
    #[arg(long, value_enum, default_value_t = By::Function)]
    by: By,
    /// Show at most N leak groups per process in text and JUnit.
    #[arg(long, value_name = "N", default_value_t = 20)]
    top: usize,
    /// Also treat functions matching PATTERN as allocator wrappers.
    #[arg(long, value_name = "PATTERN")]
    fold: Vec<String>,
    /// Do not fold the built-in allocator wrappers.
    #[arg(long)]
    no_default_folds: bool,
    /// Also look for separate debug files here.
    #[arg(long, value_name = "DIR")]
    debug_dir: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CheckFormat {
    None,
    Json,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Trace files, or directories whose *.bin files are all checked.
    #[arg(value_name = "DIR|TRACE", required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    opts: CheckOpts,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    opts: CheckOpts,
    /// Write the traces here (created if needed; traces already there are
    /// not checked) and keep them. Default: a fresh directory
    /// $TMPDIR/mtrace-run.XXXXXX, removed after a clean result.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The tracer library. Default: $MTRACE_RS_LIB, else libmtrace_rs.so
    /// next to this executable, else ../lib/libmtrace_rs.so from it.
    #[arg(long, value_name = "PATH")]
    lib: Option<PathBuf>,
    /// Keep the default trace directory even when the result is clean.
    #[arg(long)]
    keep: bool,
    /// The command to run, after `--`.
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

/// How callers are grouped and filtered.
#[derive(Args, Debug)]
struct Grouping {
    /// Group by the allocating function (wrappers folded) or by whole stack.
    #[arg(long, value_enum, default_value_t = By::Function)]
    by: By,
    /// Show at most N groups.
    #[arg(long, value_name = "N", default_value_t = 20)]
    top: usize,
    /// Hide groups holding (or, in a diff, changing by) fewer than N bytes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    min_bytes: u64,
    /// Also treat functions matching PATTERN as allocator wrappers (a name,
    /// matched with its template/argument list, or a glob with * and ?).
    #[arg(long, value_name = "PATTERN")]
    fold: Vec<String>,
    /// Do not fold the built-in allocator wrappers (malloc, operator new,
    /// std::allocator, ...).
    #[arg(long)]
    no_default_folds: bool,
    /// Also look for separate debug files here (by build-id as
    /// DIR/.build-id/xx/rest.debug or DIR/xx/rest.debug, or by debuglink
    /// name).
    #[arg(long, value_name = "DIR")]
    debug_dir: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The trace file written by libmtrace_rs.so.
    #[arg(value_name = "TRACE", required = true)]
    trace: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Report what was outstanding at this moment instead of at the end:
    /// seconds from the start (2.5, 2.5s, 500ms, 3min), a percentage of the
    /// trace (50%), or peak (the moment of peak live bytes).
    #[arg(long, value_name = "TIME")]
    at: Option<TimeArg>,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    grouping: Grouping,
}

#[derive(Args, Debug)]
struct TimelineArgs {
    /// The trace file written by libmtrace_rs.so.
    #[arg(value_name = "TRACE")]
    trace: PathBuf,
    /// Output format: a table, JSON, or an SVG line plot.
    #[arg(long, value_enum, default_value_t = TimelineFormat::Text)]
    format: TimelineFormat,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Rows of the table (text and JSON), evenly spread in time; 0 for every
    /// point kept. The SVG draws every point.
    #[arg(long, value_name = "N", default_value_t = 40)]
    points: usize,
}

#[derive(Args, Debug)]
struct DiffArgs {
    /// One trace (compare two moments of it with --from and --to) or two
    /// traces of the same program, OLD NEW (compare what each holds at its
    /// end).
    #[arg(value_name = "TRACE", required = true, num_args = 1..=2)]
    traces: Vec<PathBuf>,
    /// Start of the window (default: the start of the trace). Seconds from
    /// the start, a percentage of the trace, or peak.
    #[arg(long, value_name = "TIME")]
    from: Option<TimeArg>,
    /// End of the window (default: the end of the trace).
    #[arg(long, value_name = "TIME")]
    to: Option<TimeArg>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
    format: DiffFormat,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    grouping: Grouping,
}

#[derive(Args, Debug)]
struct FlameArgs {
    /// The trace file written by libmtrace_rs.so.
    #[arg(value_name = "TRACE")]
    trace: PathBuf,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// What the widths measure.
    #[arg(long, value_enum, default_value_t = FlameMetric::Outstanding)]
    metric: FlameMetric,
    /// For --metric outstanding: what was outstanding at this moment (see
    /// `report --at`) instead of at the end.
    #[arg(long, value_name = "TIME")]
    at: Option<TimeArg>,
    /// svg, collapsed for other flamegraph tools, or pprof (a gzipped
    /// profile.proto with every metric; needs -o or a pipe).
    #[arg(long, value_enum, default_value_t = FlameFormat::Svg)]
    format: FlameFormat,
    /// Also look for separate debug files here.
    #[arg(long, value_name = "DIR")]
    debug_dir: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct ChurnArgs {
    /// The trace file written by libmtrace_rs.so.
    #[arg(value_name = "TRACE")]
    trace: PathBuf,
    /// Rank callers by allocation count, bytes allocated, or blocks freed
    /// within 1 ms.
    #[arg(long, value_enum, default_value_t = ChurnSortArg::Count)]
    sort: ChurnSortArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
    format: DiffFormat,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    grouping: Grouping,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ChurnSortArg {
    Count,
    Bytes,
    ShortLived,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FlameMetric {
    Outstanding,
    Allocated,
    Count,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FlameFormat {
    Svg,
    Collapsed,
    Pprof,
}

/// A moment as typed, and what it means.
#[derive(Clone, Debug)]
struct TimeArg {
    text: String,
    spec: TimeSpec,
}

impl FromStr for TimeArg {
    type Err = TimeSpecError;
    fn from_str(s: &str) -> Result<TimeArg, TimeSpecError> {
        Ok(TimeArg {
            text: s.trim().to_string(),
            spec: s.parse()?,
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
    /// Folded stacks (`frame;frame;frame bytes`) of the outstanding bytes,
    /// for flamegraph tools.
    Collapsed,
    /// A gzipped profile.proto (alloc_objects, alloc_space, inuse_objects,
    /// inuse_space) for pprof, Pyroscope, Parca and speedscope; needs -o
    /// FILE or a pipe.
    Pprof,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DiffFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TimelineFormat {
    Text,
    Json,
    Svg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum By {
    Function,
    Stack,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtrace-analyze: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Report(args)) => report(args),
        Some(Command::Timeline(args)) => timeline_cmd(args),
        Some(Command::Diff(args)) => diff_cmd(args),
        Some(Command::Flamegraph(args)) => flamegraph_cmd(args),
        Some(Command::Churn(args)) => churn_cmd(args),
        Some(Command::Check(args)) => check_cmd(args),
        Some(Command::Run(args)) => run_cmd(args),
        None => report(cli.report),
    }
}

/// A trace that could not be read at all: said on one line, exit code 2.
struct Unreadable;

/// Reads a trace, with the snapshots asked for; an unreadable file is said
/// on stderr.
fn load(path: &Path, snapshots: Vec<Snapshot>) -> Result<Trace, Unreadable> {
    load_preloading(path, snapshots, None).map(|(t, _)| t)
}

/// Reads a trace like [`load`]; with `debug_dirs`, also loads the debug info
/// of the modules that its first stacks use while the rest is read, for
/// [`new_symbolizer`].
fn load_preloading(
    path: &Path,
    snapshots: Vec<Snapshot>,
    debug_dirs: Option<&[PathBuf]>,
) -> Result<(Trace, Option<Preloader>), Unreadable> {
    File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| read_preloading(f, snapshots, debug_dirs).map_err(|e| e.to_string()))
        .map_err(|e| {
            eprintln!("mtrace-analyze: {}: {e}", path.display());
            Unreadable
        })
}

/// Reads a trace; with `debug_dirs`, starts a [`Preloader`] as soon as the
/// trace read so far has modules and stacks, so that the modules they use
/// are loaded by the time the reading ends.
fn read_preloading(
    file: File,
    snapshots: Vec<Snapshot>,
    debug_dirs: Option<&[PathBuf]>,
) -> Result<(Trace, Option<Preloader>), mtrace_format::DecodeError> {
    let mut preloader = None;
    let mut watch = |t: &Trace| {
        if let Some(dirs) = debug_dirs {
            if preloader.is_none() && !t.modules.is_empty() && !t.stacks.is_empty() {
                let returns = t.stacks.values().flat_map(|s| s.iter().copied()).collect();
                preloader = Some(Preloader::start(&t.modules, returns, dirs.to_vec()));
            }
        }
    };
    let trace = read_trace_watched(file, snapshots, &mut watch)?;
    Ok((trace, preloader))
}

/// Resolves moments against the trace at `path`, reading it once first
/// when one of them needs the trace's length or peak.
fn resolve(path: &Path, specs: &[&TimeSpec]) -> Result<Vec<u64>, Unreadable> {
    if specs.iter().any(|s| s.needs_first_pass()) {
        let t = load(path, Vec::new())?;
        Ok(specs
            .iter()
            .map(|s| s.resolve(t.last_ts, t.memory.live_peak_ts))
            .collect())
    } else {
        Ok(specs.iter().map(|s| s.resolve(u64::MAX, 0)).collect())
    }
}

fn options(g: &Grouping) -> ReportOptions {
    let mut folds = if g.no_default_folds {
        Folds::none()
    } else {
        Folds::with_defaults()
    };
    for f in &g.fold {
        folds.add(f);
    }
    ReportOptions {
        by: match g.by {
            By::Function => GroupBy::Function,
            By::Stack => GroupBy::Stack,
        },
        top: g.top,
        min_bytes: g.min_bytes,
        folds,
        at: None,
    }
}

fn symbolizer(trace: &Trace, g: &Grouping, preloaded: Option<Preloader>) -> ElfSymbolizer {
    new_symbolizer(trace, g.debug_dir.clone(), preloaded)
}

/// A symbolizer for `trace`: its modules (with those `preloaded` loaded),
/// its CODE records, and the JVM's perf map `/tmp/perf-<pid>.map` when one
/// exists (written by `jcmd PID Compiler.perfmap` or
/// `-XX:+DumpPerfMapAtExit`).
fn new_symbolizer(
    trace: &Trace,
    debug_dirs: Vec<std::path::PathBuf>,
    preloaded: Option<Preloader>,
) -> ElfSymbolizer {
    let perf_map = std::fs::read_to_string(format!("/tmp/perf-{}.map", trace.header.pid))
        .map(|t| mtrace_analyze::symbolize::read_perf_map(&t))
        .unwrap_or_default();
    let sym = ElfSymbolizer::new(&trace.modules, debug_dirs)
        .with_exe(trace.exe.as_deref())
        .with_code(&perf_map)
        .with_code(&trace.code);
    match preloaded {
        Some(p) => sym.with_preloaded(p),
        None => sym,
    }
}

fn print_warnings(sym: &mut dyn Symbolizer) {
    for w in sym.take_warnings() {
        eprintln!("mtrace-analyze: warning: {w}");
    }
}

/// Standard output, or the file of `-o`.
fn output(path: &Option<PathBuf>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match path {
        Some(p) => Box::new(BufWriter::new(
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(io::stdout().lock())),
    })
}

/// The exit code once the output is written: 2 with a warning when the
/// trace was damaged part-way.
fn finish(traces: &[(&Trace, &str)]) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for (t, shown) in traces {
        if let Some(TraceEnding::Corrupt { detail }) = &t.ending {
            eprintln!(
                "mtrace-analyze: warning: {shown}: {detail}; the report covers only the records before it"
            );
            code = ExitCode::from(2);
        }
    }
    code
}

fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let path = args.trace.context("no trace file given")?;
    let shown = path.display().to_string();
    let mut opts = options(&args.grouping);
    let Ok((trace, at, preloaded)) = load_at(&path, args.at.as_ref(), &args.grouping.debug_dir)
    else {
        return Ok(ExitCode::from(2));
    };
    opts.at = at;
    let mut sym = symbolizer(&trace, &args.grouping, preloaded);
    binary_needs_file(matches!(args.format, Format::Pprof), &args.output)?;
    let mut out = output(&args.output)?;
    match args.format {
        Format::Text | Format::Json => {
            let report = build_report(&trace, &shown, &mut sym, &opts);
            print_warnings(&mut sym);
            match args.format {
                Format::Json => write_json(&report, &mut out),
                _ => write_text(&report, &mut out),
            }
        }
        Format::Collapsed => {
            let snapshot = opts.at.as_ref().map(|m| m.snapshot);
            let lines = flame::folded(&trace, &mut sym, flame::Metric::Outstanding, snapshot);
            print_warnings(&mut sym);
            flame::write_folded(&lines, &mut out)
        }
        Format::Pprof => {
            let snapshot = opts.at.as_ref().map(|m| m.snapshot);
            write_pprof(&trace, &mut sym, snapshot, &args.output, &mut out)
        }
    }
    .and_then(|()| out.flush())
    .context("writing the report")?;
    Ok(finish(&[(&trace, &shown)]))
}

/// Loads a trace with a snapshot at `at`, if given: the trace, the
/// resolved moment, and the modules being loaded for its symbolizer (with
/// `debug_dirs`).
fn load_at(
    path: &Path,
    at: Option<&TimeArg>,
    debug_dirs: &[PathBuf],
) -> Result<(Trace, Option<Moment>, Option<Preloader>), Unreadable> {
    match at {
        None => {
            let (t, p) = load_preloading(path, Vec::new(), Some(debug_dirs))?;
            Ok((t, None, p))
        }
        Some(at) => {
            let ns = resolve(path, &[&at.spec])?[0];
            let (t, p) = load_preloading(path, vec![Snapshot::new(ns, None)], Some(debug_dirs))?;
            let m = Moment {
                ns: ns.min(t.last_ts),
                label: at.text.clone(),
                snapshot: 0,
            };
            Ok((t, Some(m), p))
        }
    }
}

fn flamegraph_cmd(args: FlameArgs) -> anyhow::Result<ExitCode> {
    let shown = args.trace.display().to_string();
    let metric = match args.metric {
        FlameMetric::Outstanding => flame::Metric::Outstanding,
        FlameMetric::Allocated => flame::Metric::Allocated,
        FlameMetric::Count => flame::Metric::Count,
    };
    if args.at.is_some() && metric != flame::Metric::Outstanding {
        bail!("--at applies to --metric outstanding only");
    }
    let Ok((trace, at, preloaded)) = load_at(&args.trace, args.at.as_ref(), &args.debug_dir) else {
        return Ok(ExitCode::from(2));
    };
    let mut sym = new_symbolizer(&trace, args.debug_dir.clone(), preloaded);
    let lines = flame::folded(&trace, &mut sym, metric, at.as_ref().map(|m| m.snapshot));
    print_warnings(&mut sym);
    let exe = trace.exe.clone().unwrap_or_else(|| shown.clone());
    let title = match (metric, &at) {
        (flame::Metric::Outstanding, None) => format!("Bytes outstanding at the end: {exe}"),
        (flame::Metric::Outstanding, Some(m)) => format!(
            "Bytes outstanding at {:.3} s ({}): {exe}",
            m.ns as f64 / 1e9,
            m.label
        ),
        (flame::Metric::Allocated, _) => format!("Bytes allocated: {exe}"),
        (flame::Metric::Count, _) => format!("Allocations: {exe}"),
    };
    binary_needs_file(matches!(args.format, FlameFormat::Pprof), &args.output)?;
    let mut out = output(&args.output)?;
    match args.format {
        FlameFormat::Svg => flame::write_flamegraph(&lines, metric, &title, &mut out),
        FlameFormat::Collapsed => flame::write_folded(&lines, &mut out),
        FlameFormat::Pprof => write_pprof(
            &trace,
            &mut sym,
            at.as_ref().map(|m| m.snapshot),
            &args.output,
            &mut out,
        ),
    }
    .and_then(|()| out.flush())
    .context("writing the flamegraph")?;
    Ok(finish(&[(&trace, &shown)]))
}

/// Refuses to write a binary format to a terminal.
fn binary_needs_file(binary: bool, path: &Option<PathBuf>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if binary && path.is_none() && io::stdout().is_terminal() {
        bail!("--format pprof writes a binary file: give -o FILE (e.g. -o heap.pb.gz)");
    }
    Ok(())
}

/// Writes the pprof profile and says where it went.
fn write_pprof(
    trace: &Trace,
    sym: &mut ElfSymbolizer,
    snapshot: Option<usize>,
    path: &Option<PathBuf>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let profile = pprof::build_profile(trace, sym, snapshot);
    print_warnings(sym);
    pprof::write_pprof(&profile, out)?;
    if let Some(p) = path {
        eprintln!(
            "mtrace-analyze: wrote {} ({} samples, {} locations); open it with \
             `go tool pprof -http=: {}` or in Pyroscope, Parca or speedscope",
            p.display(),
            profile.sample.len(),
            profile.location.len(),
            p.display()
        );
    }
    Ok(())
}

fn churn_cmd(args: ChurnArgs) -> anyhow::Result<ExitCode> {
    let shown = args.trace.display().to_string();
    let read = File::open(&args.trace)
        .map_err(|e| e.to_string())
        .and_then(|f| churn::read_churn(f).map_err(|e| e.to_string()));
    let c = match read {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mtrace-analyze: {shown}: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let opts = options(&args.grouping);
    let sort = match args.sort {
        ChurnSortArg::Count => churn::ChurnSort::Count,
        ChurnSortArg::Bytes => churn::ChurnSort::Bytes,
        ChurnSortArg::ShortLived => churn::ChurnSort::ShortLived,
    };
    let mut sym = symbolizer(&c.trace, &args.grouping, None);
    let report = churn::build_churn(&c, &shown, &mut sym, &opts, sort);
    print_warnings(&mut sym);
    let mut out = output(&args.output)?;
    match args.format {
        DiffFormat::Text => churn::write_text(&report, &mut out),
        DiffFormat::Json => churn::write_json(&report, &mut out),
    }
    .and_then(|()| out.flush())
    .context("writing the churn report")?;
    Ok(finish(&[(&c.trace, &shown)]))
}

fn timeline_cmd(args: TimelineArgs) -> anyhow::Result<ExitCode> {
    let shown = args.trace.display().to_string();
    let Ok(trace) = load(&args.trace, Vec::new()) else {
        return Ok(ExitCode::from(2));
    };
    let mut out = output(&args.output)?;
    match args.format {
        TimelineFormat::Text => {
            timeline::write_text(&timeline::build(&trace, &shown, args.points), &mut out)
        }
        TimelineFormat::Json => {
            timeline::write_json(&timeline::build(&trace, &shown, args.points), &mut out)
        }
        TimelineFormat::Svg => timeline::write_svg(&timeline::build(&trace, &shown, 0), &mut out),
    }
    .and_then(|()| out.flush())
    .context("writing the timeline")?;
    Ok(finish(&[(&trace, &shown)]))
}

fn diff_cmd(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let opts = options(&args.grouping);
    let report;
    let code;
    if let [old_path, new_path] = &args.traces[..] {
        if args.from.is_some() || args.to.is_some() {
            bail!(
                "--from and --to compare two moments of one trace; with two traces, give neither"
            );
        }
        let dirs = Some(&args.grouping.debug_dir[..]);
        let (Ok((old, old_pre)), Ok((new, new_pre))) = (
            load_preloading(old_path, Vec::new(), dirs),
            load_preloading(new_path, Vec::new(), dirs),
        ) else {
            return Ok(ExitCode::from(2));
        };
        let (old_shown, new_shown) = (
            old_path.display().to_string(),
            new_path.display().to_string(),
        );
        let mut old_sym = symbolizer(&old, &args.grouping, old_pre);
        let mut new_sym = symbolizer(&new, &args.grouping, new_pre);
        report = diff::trace_diff(
            &old,
            &old_shown,
            &mut old_sym,
            &new,
            &new_shown,
            &mut new_sym,
            &opts,
        );
        print_warnings(&mut old_sym);
        print_warnings(&mut new_sym);
        code = finish(&[(&old, &old_shown), (&new, &new_shown)]);
    } else {
        let path = &args.traces[0];
        let shown = path.display().to_string();
        let start = TimeArg {
            text: "start".into(),
            spec: TimeSpec::Start,
        };
        let end = TimeArg {
            text: "end".into(),
            spec: TimeSpec::End,
        };
        let from = args.from.as_ref().unwrap_or(&start);
        let to = args.to.as_ref().unwrap_or(&end);
        let Ok(ns) = resolve(path, &[&from.spec, &to.spec]) else {
            return Ok(ExitCode::from(2));
        };
        let (t1, t2) = (ns[0], ns[1]);
        if t1 > t2 {
            bail!(
                "--from {} is after --to {}: the window must go forward in time",
                from.text,
                to.text
            );
        }
        let snaps = vec![Snapshot::new(t1, None), Snapshot::new(t2, Some(t1))];
        let Ok((trace, preloaded)) = load_preloading(path, snaps, Some(&args.grouping.debug_dir))
        else {
            return Ok(ExitCode::from(2));
        };
        let end_ns = trace.last_ts;
        let moment = |ns: u64, a: &TimeArg, i| Moment {
            ns: ns.min(end_ns),
            label: a.text.clone(),
            snapshot: i,
        };
        let mut sym = symbolizer(&trace, &args.grouping, preloaded);
        report = diff::window_diff(
            &trace,
            &shown,
            &mut sym,
            &opts,
            &moment(t1, from, 0),
            &moment(t2, to, 1),
        );
        print_warnings(&mut sym);
        code = finish(&[(&trace, &shown)]);
    }
    let mut out = output(&args.output)?;
    match args.format {
        DiffFormat::Text => diff::write_text(&report, &mut out),
        DiffFormat::Json => diff::write_json(&report, &mut out),
    }
    .and_then(|()| out.flush())
    .context("writing the growth report")?;
    Ok(code)
}

/// The check's options from the command line; a bad suppressions file is
/// an error.
fn check_options(o: &CheckOpts) -> anyhow::Result<CheckOptions> {
    let mut suppressions = Suppressions::none();
    for path in &o.suppressions {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading suppressions {}", path.display()))?;
        suppressions.add_file(&path.display().to_string(), &text)?;
    }
    if !o.no_default_suppressions {
        suppressions.add_defaults();
    }
    let grouping = Grouping {
        by: o.by,
        top: o.top,
        min_bytes: 0,
        fold: o.fold.clone(),
        no_default_folds: o.no_default_folds,
        debug_dir: o.debug_dir.clone(),
    };
    Ok(CheckOptions {
        include_reachable: o.include_reachable,
        max_bytes: o.max_bytes,
        max_objects: o.max_objects,
        total: o.total,
        fail_on_killed: o.fail_on_killed,
        suppressions,
        report: options(&grouping),
    })
}

/// The trace files named by the arguments: files as given, directories as
/// their `*.bin` files, sorted.
fn trace_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "bin") && f.is_file())
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// Checks `files` and writes the reports; the check's exit code.
fn check_files(files: &[PathBuf], o: &CheckOpts, opts: CheckOptions) -> anyhow::Result<u8> {
    let mut checker = Checker::new(opts);
    // The same missing binary would be named once per trace.
    let mut warned = std::collections::HashSet::new();
    for path in files {
        let shown = path.display().to_string();
        let read = File::open(path).map_err(|e| e.to_string()).and_then(|f| {
            read_preloading(f, Vec::new(), Some(&o.debug_dir)).map_err(|e| e.to_string())
        });
        match read {
            Ok((trace, preloaded)) => {
                let mut sym = new_symbolizer(&trace, o.debug_dir.clone(), preloaded);
                checker.add(&trace, &shown, &mut sym);
                for w in sym.take_warnings() {
                    if warned.insert(w.clone()) {
                        eprintln!("mtrace-analyze: warning: {w}");
                    }
                }
            }
            Err(e) => checker.add_unreadable(&shown, &e),
        }
    }
    let opts = checker.opts.clone();
    let result = checker.finish();
    {
        let mut err = io::stderr().lock();
        check::write_text(&result, &opts, &mut err).context("writing the report")?;
    }
    if let Some(p) = &o.junit {
        let mut f =
            BufWriter::new(File::create(p).with_context(|| format!("creating {}", p.display()))?);
        mtrace_analyze::junit::write_junit(&result, &opts, &mut f)
            .and_then(|()| f.flush())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &o.json {
        let mut f =
            BufWriter::new(File::create(p).with_context(|| format!("creating {}", p.display()))?);
        check::write_json(&result, &mut f)
            .and_then(|()| f.flush())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let CheckFormat::Json = o.format {
        let mut out = io::stdout().lock();
        check::write_json(&result, &mut out)
            .and_then(|()| out.flush())
            .context("writing the result")?;
    }
    Ok(result.exit_code)
}

fn check_cmd(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let opts = match check_options(&args.opts) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mtrace-analyze: {e:#}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    let files = match trace_files(&args.paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mtrace-analyze: {e:#}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    if files.is_empty() {
        eprintln!(
            "mtrace-analyze: no traces: no *.bin files in {}",
            args.paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::from(EXIT_ERROR));
    }
    Ok(ExitCode::from(check_files(&files, &args.opts, opts)?))
}

/// The tracer library for `run`: `--lib`, else `$MTRACE_RS_LIB`, else
/// `libmtrace_rs.so` next to this executable, else `../lib/libmtrace_rs.so`
/// from its directory.
fn find_library(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let absolute = |p: &Path| -> anyhow::Result<PathBuf> {
        std::fs::canonicalize(p).with_context(|| format!("the tracer library {}", p.display()))
    };
    if let Some(p) = given {
        return absolute(p);
    }
    if let Some(p) = std::env::var_os("MTRACE_RS_LIB").filter(|v| !v.is_empty()) {
        return absolute(Path::new(&p)).context("from MTRACE_RS_LIB");
    }
    let mut tried = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        for cand in [
            dir.join("libmtrace_rs.so"),
            dir.join("../lib/libmtrace_rs.so"),
        ] {
            if cand.is_file() {
                return absolute(&cand);
            }
            tried.push(cand.display().to_string());
        }
    }
    bail!(
        "libmtrace_rs.so not found (looked for {}); build it with \
         `cargo build --release -p mtrace-preload`, or name it with --lib or MTRACE_RS_LIB",
        tried.join(" and ")
    )
}

/// A fresh directory `$TMPDIR/mtrace-run.XXXXXX`, mode 0700.
fn fresh_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ ((std::process::id() as u64) << 32);
    for i in 0..100u64 {
        // A small mix so that names do not follow each other.
        let n = (seed.wrapping_add(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 1_000_000;
        let dir = base.join(format!("mtrace-run.{n:06}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not create a fresh directory in {}", base.display())
}

fn run_cmd(args: RunArgs) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::ExitStatusExt;
    let fail = |e: anyhow::Error| {
        eprintln!("mtrace-analyze: {e:#}");
        Ok(ExitCode::from(EXIT_ERROR))
    };
    let opts = match check_options(&args.opts) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let lib = match find_library(args.lib.as_deref()) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let (dir, temporary) = match &args.out_dir {
        Some(d) => match std::fs::create_dir_all(d).and_then(|()| std::fs::canonicalize(d)) {
            Ok(d) => (d, false),
            Err(e) => {
                return fail(anyhow::Error::new(e).context(format!("creating {}", d.display())))
            }
        },
        None => match fresh_dir() {
            Ok(d) => (d, true),
            Err(e) => return fail(e),
        },
    };
    // Traces already in the directory belong to an earlier run.
    let before: std::collections::HashSet<PathBuf> = trace_files(std::slice::from_ref(&dir))
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut preload = OsString::new();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(old);
        preload.push(":");
    }
    preload.push(&lib);
    let mut out = dir.clone().into_os_string();
    out.push("/trace.%p.bin");
    let started = std::time::Instant::now();
    let status = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("MTRACE_RS_SAMPLE_BYTES", "1")
        .env("MTRACE_RS_LEAK_SCAN", "1")
        // The program's own mappings are roots of the scan (Python's arenas).
        .env("MTRACE_RS_MMAP", "1")
        .env("MTRACE_RS_OUT", out)
        .status();
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return fail(anyhow::Error::new(e).context(format!(
                "cannot run {}",
                Path::new(&args.command[0]).display()
            )))
        }
    };
    let elapsed = started.elapsed();
    let cmd_code: u8 = match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).min(255) as u8,
        (None, None) => 1,
    };
    let shown_cmd = Path::new(&args.command[0]).display().to_string();
    let how = match (status.code(), status.signal()) {
        (Some(0), _) => "succeeded".to_string(),
        (Some(c), _) => format!("failed with exit status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => "failed".to_string(),
    };
    eprintln!(
        "mtrace-analyze run: {shown_cmd} {how} after {:.2} s; traces in {}",
        elapsed.as_secs_f64(),
        dir.display()
    );
    let files: Vec<PathBuf> = match trace_files(std::slice::from_ref(&dir)) {
        Ok(f) => f.into_iter().filter(|f| !before.contains(f)).collect(),
        Err(e) => return fail(e),
    };
    let check_code = if files.is_empty() {
        eprintln!(
            "mtrace-analyze: no traces were written to {}: was {} loaded? (a statically \
             linked or setuid program ignores LD_PRELOAD)",
            dir.display(),
            lib.display()
        );
        EXIT_ERROR
    } else {
        check_files(&files, &args.opts, opts)?
    };
    let code = if check_code == EXIT_LEAKS {
        EXIT_LEAKS
    } else if cmd_code != 0 {
        cmd_code
    } else {
        check_code
    };
    if temporary && code == 0 && !args.keep {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("mtrace-analyze: warning: removing {}: {e}", dir.display());
        }
    } else if code != 0 || args.keep {
        eprintln!("mtrace-analyze run: traces kept in {}", dir.display());
    }
    if code != 0 && cmd_code != 0 && code != EXIT_LEAKS {
        eprintln!("mtrace-analyze run: exit {code}: the command's own status");
    }
    Ok(ExitCode::from(code))
}
