//! The `mtrace-analyze` command line. `main` calls [`run`]; errors print with
//! their chain, a closed stdout (`| head`) is success.
//!
//! Exit codes: 0 report written; 2 the file is not a readable trace (one line
//! on stderr), or it is damaged part-way (the report of what was read, and a
//! warning on stderr); clap's own usage errors also exit with 2.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use mtrace_analyze::analysis::{read_trace, TraceEnding};
use mtrace_analyze::folds::Folds;
use mtrace_analyze::report::{build_report, write_json, write_text, GroupBy, ReportOptions};
use mtrace_analyze::symbolize::{ElfSymbolizer, Symbolizer};

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
    /// Memory outstanding (live) at the end of the trace, by caller.
    Report(ReportArgs),
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The trace file written by libmtrace_rs.so.
    #[arg(value_name = "TRACE", required = true)]
    trace: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Group by the allocating function (wrappers folded) or by whole stack.
    #[arg(long, value_enum, default_value_t = By::Function)]
    by: By,
    /// Show at most N groups.
    #[arg(long, value_name = "N", default_value_t = 20)]
    top: usize,
    /// Hide groups holding fewer than N bytes.
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
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
        None => report(cli.report),
    }
}

fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let path = args.trace.context("no trace file given")?;
    let shown = path.display().to_string();
    let trace = match File::open(&path)
        .map_err(|e| e.to_string())
        .and_then(|f| read_trace(f).map_err(|e| e.to_string()))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("mtrace-analyze: {shown}: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut folds = if args.no_default_folds {
        Folds::none()
    } else {
        Folds::with_defaults()
    };
    for f in &args.fold {
        folds.add(f);
    }
    let opts = ReportOptions {
        by: match args.by {
            By::Function => GroupBy::Function,
            By::Stack => GroupBy::Stack,
        },
        top: args.top,
        min_bytes: args.min_bytes,
        folds,
    };
    let mut sym = ElfSymbolizer::new(&trace.modules, args.debug_dir).with_exe(trace.exe.as_deref());
    let report = build_report(&trace, &shown, &mut sym, &opts);
    for w in sym.take_warnings() {
        eprintln!("mtrace-analyze: warning: {w}");
    }
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    match args.format {
        Format::Text => write_text(&report, &mut out),
        Format::Json => write_json(&report, &mut out),
    }
    .and_then(|()| out.flush())
    .context("writing the report")?;
    if let Some(TraceEnding::Corrupt { detail }) = &trace.ending {
        eprintln!(
            "mtrace-analyze: warning: {shown}: {detail}; the report covers only the records before it"
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
