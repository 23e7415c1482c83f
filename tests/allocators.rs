//! Other allocators: with jemalloc or tcmalloc as the program's malloc, the
//! tracer goes first in `LD_PRELOAD` (`libmtrace_rs.so <allocator>.so`), its
//! hooks forward to the next `malloc` (the allocator's, through
//! `RTLD_NEXT`), the program behaves as it does on that allocator alone, and
//! exact mode counts its leaks to the byte. glibc's `mallinfo2` describes
//! none of that memory, so the report must say the allocator's statistics
//! are not available rather than print glibc's zeros. scripts/test.sh
//! installs both allocators; a missing one is skipped with a message.

use mtrace_rs_tests::{
    analyze, analyze_raw, artifacts, compile, run, run_bare, stderr, stdout, Report, Scratch,
    Tracer,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
const TCMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4";

/// The leaks of tests/programs/leaks.c (the figures of tests/exact.rs):
/// function -> (bytes, objects).
fn expected_leaks() -> BTreeMap<&'static str, (u64, u64)> {
    BTreeMap::from([
        ("leak_a", (4 * 10 * 100, 4 * 10)),
        ("leak_b", (4 * 3 * 1000, 4 * 3)),
        ("leak_c", (4 * 777, 4)),
        ("leak_d", (4 * 5 * 320, 4 * 5)),
        ("leak_e", (4 * 2 * 11, 4 * 2)),
        ("leak_f", (4 * (300 + 256), 4 * 2)),
        ("leak_main_once", (4242, 1)),
    ])
}

fn skip_without(allocator: &str) -> bool {
    if Path::new(allocator).exists() {
        return false;
    }
    eprintln!("skipped: {allocator} is not installed (scripts/test.sh installs it)");
    true
}

/// Runs `exe` traced by `tracer`, with `LD_PRELOAD` set to `preload` (a
/// space-separated list naming the tracer and the allocator).
fn run_preloaded(tracer: &Tracer, exe: &Path, preload: &str) -> Output {
    let mut cmd = Command::new(exe);
    tracer.apply(&mut cmd);
    cmd.env("LD_PRELOAD", preload);
    run(&mut cmd)
}

/// The program on the allocator alone, untraced: what the traced run must
/// match.
fn run_on_allocator_alone(exe: &Path, allocator: &str) -> Output {
    let mut cmd = Command::new(exe);
    mtrace_rs_tests::bare(&mut cmd).env("LD_PRELOAD", allocator);
    run(&mut cmd)
}

fn assert_same(what: &str, untraced: &Output, traced: &Output) {
    assert!(
        untraced.status.success(),
        "{what}: fails even untraced: {untraced:?}"
    );
    assert_eq!(
        stdout(traced),
        stdout(untraced),
        "{what}: stdout differs; stderr:\n{}",
        stderr(traced)
    );
    assert_eq!(stderr(traced), stderr(untraced), "{what}: stderr differs");
    assert_eq!(traced.status.code(), untraced.status.code(), "{what}: exit");
}

fn assert_exact_leaks(what: &str, report: &Report) {
    let summary = report.summary();
    assert_eq!(report.trace()["mode"], "exact", "{what}:\n{summary}");
    assert_eq!(report.ending(), "clean", "{what}:\n{summary}");
    assert_eq!(report.dropped(), 0, "{what}: dropped events:\n{summary}");
    let expected = expected_leaks();
    for (function, &(bytes, objects)) in &expected {
        assert_eq!(
            report.held_by(function),
            (bytes, objects),
            "{what}: {function} (bytes, objects):\n{summary}"
        );
    }
    // The churn in leaks.c frees everything it allocates: nothing else of
    // the program's own is outstanding.
    for caller in report.callers_in_module("leaks") {
        let f = caller["function"].as_str().unwrap_or("");
        assert!(
            expected
                .keys()
                .any(|name| mtrace_rs_tests::function_is(f, name)),
            "{what}: unexpected outstanding caller {f}:\n{summary}"
        );
    }
}

/// The memory section says the allocator's statistics are missing instead
/// of reporting glibc's (empty) arenas as zeros.
fn assert_no_allocator_stats(what: &str, report: &Report, trace: &Path) {
    let memory = &report.json["memory"];
    assert!(
        memory["stats_records"].as_u64().unwrap_or(0) > 0,
        "{what}: no STATS record at all: {memory}"
    );
    assert_eq!(
        memory["allocator_stats"], false,
        "{what}: glibc's mallinfo2 figures reported for another allocator: {memory}"
    );
    assert!(
        memory["free_held_end"].is_null(),
        "{what}: free bytes held by glibc shown for another allocator: {memory}"
    );
    assert!(memory["retention_diagnosis"].is_null(), "{what}: {memory}");
    let text = analyze_raw(trace, &[] as &[&str]);
    text.assert_no_panic(what);
    assert!(
        text.stdout.contains("allocator statistics not available"),
        "{what}: the text report does not say the allocator's statistics are missing:\n{}",
        text.stdout
    );
}

fn leaks_are_exact_with(allocator: &str, name: &str) {
    if skip_without(allocator) {
        return;
    }
    let scratch = Scratch::new(&format!("allocator-{name}"));
    let exe = compile("tests/programs/leaks.c", scratch.path());
    let untraced = run_on_allocator_alone(&exe, allocator);

    let tracer = Tracer::exact(&scratch.dir("traces"));
    let preload = format!("{} {allocator}", artifacts().preload.display());
    let traced = run_preloaded(&tracer, &exe, &preload);
    let what = format!("leaks on {name} (LD_PRELOAD=\"{preload}\")");
    assert_same(&what, &untraced, &traced);
    assert_eq!(stdout(&traced), "done\n");

    let trace = tracer.only_trace();
    let report = analyze(&trace);
    assert_exact_leaks(&what, &report);
    assert_no_allocator_stats(&what, &report, &trace);
}

#[test]
fn leaks_are_exact_on_jemalloc_with_the_tracer_first() {
    leaks_are_exact_with(JEMALLOC, "jemalloc");
}

#[test]
fn leaks_are_exact_on_tcmalloc_with_the_tracer_first() {
    // tcmalloc exports `__libc_malloc` too (gperftools overrides glibc's
    // internal names), so a check "is the next malloc glibc's?" that
    // compares against `__libc_malloc` is fooled by it.
    leaks_are_exact_with(TCMALLOC, "tcmalloc");
}

/// The other order, `LD_PRELOAD="<allocator>.so libmtrace_rs.so"`: the
/// allocator's `malloc` comes first in symbol lookup, so the program's
/// calls never reach the tracer's hooks. Observed, not asserted: what the
/// run and the trace look like, printed for whoever reads the test log.
fn allocator_first_is_reported(allocator: &str, name: &str) {
    if skip_without(allocator) {
        return;
    }
    let scratch = Scratch::new(&format!("allocator-first-{name}"));
    let exe = compile("tests/programs/leaks.c", scratch.path());
    let untraced = run_bare(&mut Command::new(&exe));
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let preload = format!("{allocator} {}", artifacts().preload.display());
    let traced = run_preloaded(&tracer, &exe, &preload);
    eprintln!(
        "LD_PRELOAD=\"{preload}\": exit {:?} (untraced {:?}), stdout {:?}, stderr {:?}",
        traced.status.code(),
        untraced.status.code(),
        stdout(&traced),
        stderr(&traced)
    );
    for trace in tracer.traces() {
        let report = analyze(&trace);
        let held: Vec<String> = expected_leaks()
            .keys()
            .map(|f| format!("{f}={:?}", report.held_by(f)))
            .collect();
        eprintln!(
            "  {}: allocs {} frees {}, allocator_stats {}, leaks seen: {}",
            trace.display(),
            report.trace()["allocs"],
            report.trace()["frees"],
            report.json["memory"]["allocator_stats"],
            held.join(" ")
        );
    }
}

#[test]
fn jemalloc_before_the_tracer_is_observed() {
    allocator_first_is_reported(JEMALLOC, "jemalloc");
}

#[test]
fn tcmalloc_before_the_tracer_is_observed() {
    allocator_first_is_reported(TCMALLOC, "tcmalloc");
}

/// The benchmark's churn (benches/churn.c: malloc, calloc, realloc,
/// posix_memalign, aligned_alloc and memalign on two threads, with a
/// checksum of the bytes it keeps) on the allocator, untraced and sampled
/// every 64 bytes, so that nearly every block, aligned ones included, is a
/// sampled block. Under another allocator a page-aligned pointer's previous
/// page may be unmapped, so aligned sampled blocks are recognized through the
/// tracer's set rather than a key in front of them; every free and realloc
/// of them must behave as on the allocator alone, and the program frees
/// everything, so nothing may be left outstanding.
fn sampled_churn_with(allocator: Option<&str>, name: &str) {
    if allocator.is_some_and(skip_without) {
        return;
    }
    let scratch = Scratch::new(&format!("allocator-churn-{name}"));
    let exe = compile("benches/churn.c", scratch.path());
    let args = ["2", "200000"];
    let untraced = match allocator {
        Some(a) => {
            let mut cmd = Command::new(&exe);
            mtrace_rs_tests::bare(&mut cmd)
                .args(args)
                .env("LD_PRELOAD", a);
            run(&mut cmd)
        }
        None => run_bare(Command::new(&exe).args(args)),
    };
    let tracer = Tracer::sampled(&scratch.dir("traces"), 64);
    let preload = match allocator {
        Some(a) => format!("{} {a}", artifacts().preload.display()),
        None => artifacts().preload.display().to_string(),
    };
    let mut cmd = Command::new(&exe);
    cmd.args(args);
    tracer.apply(&mut cmd);
    cmd.env("LD_PRELOAD", &preload);
    let traced = run(&mut cmd);
    let what = format!("churn on {name}, sampled every 64 bytes");
    assert_same(&what, &untraced, &traced);
    let report = analyze(&tracer.only_trace());
    let summary = report.summary();
    assert_eq!(report.ending(), "clean", "{what}:\n{summary}");
    assert!(
        report.trace()["allocs"].as_u64().unwrap_or(0) > 100_000,
        "{what}: too few sampled blocks:\n{summary}"
    );
    // Sampling every 64 bytes asks exact mode's event rate of sampled mode,
    // whose producers drop rather than wait when the writer falls behind (it
    // shares two cores with the program's threads); nothing else may drop,
    // and each dropped free can leave at most one block outstanding.
    let dropped = report.dropped();
    for (reason, _) in report.trace()["dropped"]["by_reason"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert!(
            reason.starts_with("ring full"),
            "{what}: dropped for {reason}:\n{summary}"
        );
    }
    let left: u64 = report
        .callers_in_module("churn")
        .iter()
        .map(|c| c["samples"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        left <= dropped,
        "{what}: the churn frees everything, yet {left} sampled blocks are outstanding with {dropped} events dropped:\n{summary}"
    );
}

#[test]
fn sampled_churn_is_unchanged_on_glibc() {
    sampled_churn_with(None, "glibc");
}

#[test]
fn sampled_churn_is_unchanged_on_jemalloc() {
    sampled_churn_with(Some(JEMALLOC), "jemalloc");
}

#[test]
fn sampled_churn_is_unchanged_on_tcmalloc() {
    sampled_churn_with(Some(TCMALLOC), "tcmalloc");
}
