//! RSS beside live bytes: a program that frees almost everything it
//! allocated while glibc keeps the memory in its arenas must get the
//! analyzer's retention diagnosis (nothing leaked; what helps, including
//! `malloc_trim`), and a program that truly leaks the same amount must not.
//! Both run at the default sampling rate, as in production, so the live
//! bytes are estimates; the tracer records RSS and glibc's figures every
//! 50 ms.

use mtrace_rs_tests::{analyze, analyze_raw, compile, run_bare, stdout, Report, Scratch, Tracer};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// What tests/programs/retention.c allocates: 4 threads x 80 MiB.
const ALLOCATED: u64 = 4 * 80 * MIB;

/// Runs retention.c in `mode` (`retain` or `leak`) untraced and traced at
/// the default rate; returns the trace, the report, and the bytes the
/// program says it kept.
fn run_retention(scratch: &Scratch, exe: &Path, mode: &str) -> (PathBuf, Report, u64) {
    run_retention_with(
        exe,
        mode,
        Tracer::default_rate(&scratch.dir(mode)).env("MTRACE_RS_STATS_MS", "50"),
    )
}

/// As `run_retention`, under `tracer`.
fn run_retention_with(exe: &Path, mode: &str, tracer: Tracer) -> (PathBuf, Report, u64) {
    let untraced = run_bare(Command::new(exe).arg(mode));
    let traced = tracer.run(Command::new(exe).arg(mode));
    assert!(untraced.status.success(), "untraced {mode}: {untraced:?}");
    assert_eq!(
        (traced.status.code(), stdout(&traced)),
        (untraced.status.code(), stdout(&untraced)),
        "retention {mode}: the traced run differs; stderr:\n{}",
        mtrace_rs_tests::stderr(&traced)
    );
    // "allocated N blocks, kept M blocks B bytes"
    let text = stdout(&traced);
    let kept: u64 = text
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("retention {mode} printed {text:?}"));
    let trace = tracer.only_trace();
    let report = analyze(&trace);
    assert_eq!(report.ending(), "clean", "{}", report.summary());
    (trace, report, kept)
}

fn memory_u64(report: &Report, key: &str) -> u64 {
    report.json["memory"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("memory.{key} missing: {}", report.json["memory"]))
}

#[test]
fn freed_memory_kept_by_glibc_arenas_is_diagnosed_as_retention_with_malloc_trim_advice() {
    let scratch = Scratch::new("retention-retain");
    let exe = compile("tests/programs/retention.c", scratch.path());
    let (trace, report, kept) = run_retention(&scratch, &exe, "retain");
    let memory = &report.json["memory"];
    assert!(kept < ALLOCATED / 500, "kept {kept} bytes: {memory}");

    assert_eq!(memory["allocator_stats"], true, "glibc figures: {memory}");
    assert!(
        memory_u64(&report, "stats_records") >= 3,
        "the 300 ms pause at 50 ms intervals leaves several STATS records: {memory}"
    );
    // The freed memory is still resident and glibc says it holds it free;
    // the program holds next to nothing (an estimate: a few samples at
    // most among the survivors).
    let rss = memory_u64(&report, "rss_end");
    let free = memory_u64(&report, "free_held_end");
    let live = memory_u64(&report, "live_end");
    assert!(rss > ALLOCATED / 2, "RSS stays high: {memory}");
    assert!(
        free > ALLOCATED / 2,
        "glibc holds the freed bytes: {memory}"
    );
    assert!(live < rss / 10, "live bytes are small: {memory}");

    let diagnosis = memory["retention_diagnosis"]
        .as_str()
        .unwrap_or_else(|| panic!("no retention diagnosis: {memory}"));
    assert!(diagnosis.contains("malloc_trim"), "{diagnosis}");

    let text = analyze_raw(&trace, &[] as &[&str]);
    text.assert_no_panic("retention text report");
    assert!(text.status.success(), "{}", text.stderr);
    assert!(
        text.stdout.contains("malloc_trim"),
        "the text report says what helps:\n{}",
        text.stdout
    );
}

#[test]
fn a_true_leak_of_the_same_size_is_not_called_retention() {
    let scratch = Scratch::new("retention-leak");
    let exe = compile("tests/programs/retention.c", scratch.path());
    let (trace, report, kept) = run_retention(&scratch, &exe, "leak");
    let memory = &report.json["memory"];
    assert!(kept >= ALLOCATED, "kept {kept} bytes: {memory}");

    assert!(
        memory["retention_diagnosis"].is_null(),
        "a leak diagnosed as allocator retention: {memory}"
    );
    // The leak is where the program allocated it: an estimate from about
    // 600 samples, so within a few percent; 20% is far outside chance.
    let (bytes, _) = report.held_by("alloc_block");
    let (lo, hi) = (kept * 8 / 10, kept * 12 / 10);
    assert!(
        (lo..=hi).contains(&bytes),
        "alloc_block holds ~{bytes} bytes, the program kept {kept}:\n{}",
        report.summary()
    );
    let live = memory_u64(&report, "live_end");
    assert!((lo..=hi).contains(&live), "live bytes {live}: {memory}");

    let text = analyze_raw(&trace, &[] as &[&str]);
    text.assert_no_panic("leak text report");
    assert!(
        !text.stdout.contains("malloc_trim"),
        "the text report gives retention advice for a leak:\n{}",
        text.stdout
    );
}

/// At the default interval the records keep to 0.1% of a core, so after the
/// frees, with glibc's free lists a million chunks long, the next one may be
/// seconds away; the record written at exit still shows the memory as the
/// program left it, and the diagnosis holds.
#[test]
fn retention_is_diagnosed_from_the_record_at_exit_at_the_default_interval() {
    let scratch = Scratch::new("retention-default");
    let exe = compile("tests/programs/retention.c", scratch.path());
    let tracer = Tracer::default_rate(&scratch.dir("retain")).without("MTRACE_RS_STATS_MS");
    let (_, report, kept) = run_retention_with(&exe, "retain", tracer);
    let memory = &report.json["memory"];
    assert!(kept < ALLOCATED / 500, "kept {kept} bytes: {memory}");
    // The last record is the one at exit, after the 300 ms pause.
    let end = memory_u64(&report, "end_ns");
    assert!(
        end >= 300_000_000,
        "the last record is before the frees: {memory}"
    );
    assert!(
        memory_u64(&report, "free_held_end") > ALLOCATED / 2,
        "glibc holds the freed bytes: {memory}"
    );
    let diagnosis = memory["retention_diagnosis"]
        .as_str()
        .unwrap_or_else(|| panic!("no retention diagnosis: {memory}"));
    assert!(diagnosis.contains("malloc_trim"), "{diagnosis}");
}
