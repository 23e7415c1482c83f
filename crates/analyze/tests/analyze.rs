//! Data-driven tests of the analyzer: small traces built in memory with
//! `mtrace_format::Encoder`, checked through the library (with a synthetic
//! symbolizer) and through the `mtrace-analyze` binary.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{at, fake_symbols, TraceBuilder};
use mtrace_analyze::analysis::{read_trace, weight, Trace, TraceEnding};
use mtrace_analyze::folds::Folds;
use mtrace_analyze::report::{build_report, write_text, GroupBy, Report, ReportOptions, NO_STACK};
use mtrace_format::{DropReason, HEADER_SIZE};

fn read(bytes: &[u8]) -> Trace {
    read_trace(bytes).expect("a readable trace")
}

fn report(trace: &Trace, opts: &ReportOptions) -> Report {
    build_report(trace, "trace.bin", &mut fake_symbols(), opts)
}

fn live(trace: &Trace) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = trace.live_blocks().map(|b| (b.size, b.stack)).collect();
    v.sort();
    v
}

/// The synthetic program of the golden test: a leak through xmalloc on an
/// error path, a C++ cache holding objects, a vector that grew, and an
/// allocation whose stack never made it into the file.
fn leaky_program() -> TraceBuilder {
    use at::*;
    TraceBuilder::new(1)
        .program("/work/leaky", &["./leaky", "--requests", "3"])
        .forked(500)
        .module("/work/leaky", 0x5000_0000, 0x10_0000)
        .stack(
            1,
            &[
                MALLOC_IN_XMALLOC,
                XMALLOC_IN_LEAK,
                LEAK_IN_HANDLE,
                HANDLE_IN_MAIN,
                MAIN_IN_LIBC,
            ],
        )
        .alloc(1_000, 0x1000, 100, 1)
        .alloc(2_000, 0x2000, 100, 1)
        .alloc(3_000, 0x3000, 100, 1)
        .stack(2, &[NEW_IN_CACHE, CACHE_IN_MAIN, MAIN_IN_LIBC])
        .alloc(4_000, 0x4000, 48, 2)
        .alloc(5_000, 0x5000, 48, 2)
        .free(6_000, 0x1000)
        // Stack 3 is written after the event that uses it (stacks are
        // written asynchronously).
        .alloc(7_000, 0x6000, 4_096, 3)
        .stack(3, &[VEC_GROW_IN_FILL, FILL_IN_MAIN, MAIN_IN_LIBC])
        .realloc(8_000, 0x6000, 0x7000, 8_192, 3)
        .stack(4, &[XMALLOC_IN_LEAK, HANDLE_IN_MAIN, MAIN_IN_LIBC])
        .alloc(9_000, 0x8000, 64, 4)
        .alloc(9_500, 0x9000, 10, 99)
        .stack(5, &[NOWHERE, HANDLE_IN_MAIN])
        .alloc(9_600, 0xa000, 7, 5)
        .free(9_700, 0xdead_0000)
        .dropped(DropReason::RingFull, 3)
        .dropped(DropReason::RingFull, 5)
        .stats(9_800)
        .end(1_234_567_890)
}

#[test]
fn exact_accounting_counts_allocs_frees_reallocs_and_unknown_frees() {
    let t = read(&leaky_program().bytes());
    assert_eq!(t.allocs, 10);
    assert_eq!(t.frees, 3);
    assert_eq!(t.frees_of_unknown(), 1);
    assert_eq!(t.lost_frees, 0);
    assert_eq!(t.ending, Some(TraceEnding::Clean));
    assert_eq!(t.cmdline, ["./leaky", "--requests", "3"]);
    assert_eq!(t.dropped_total(), 5, "the latest running total counts");
    assert_eq!(
        live(&t),
        [
            (7, 5),
            (10, 99),
            (48, 2),
            (48, 2),
            (64, 4),
            (100, 1),
            (100, 1),
            (8_192, 3)
        ]
    );
}

#[test]
fn a_free_that_arrives_before_its_alloc_still_frees_it() {
    // Thread B's free (ts 20) is in an earlier batch than thread A's alloc
    // (ts 10) of the same address.
    let t = read(
        &TraceBuilder::new(1)
            .free(20, 0x1000)
            .alloc(10, 0x1000, 64, 1)
            .end(30)
            .bytes(),
    );
    assert_eq!(live(&t), []);
    assert_eq!(t.frees_of_unknown(), 0);
}

#[test]
fn a_late_alloc_older_than_the_addresss_next_life_stays_dead() {
    // alloc1 (ts 1) arrives after its free (ts 2) and after the address's
    // next allocation (ts 3): only the block from ts 3 is live.
    let t = read(
        &TraceBuilder::new(1)
            .free(2, 0x1000)
            .alloc(3, 0x1000, 32, 2)
            .alloc(1, 0x1000, 16, 1)
            .end(4)
            .bytes(),
    );
    assert_eq!(live(&t), [(32, 2)]);
    assert_eq!(t.frees_of_unknown(), 0);

    // Same story, with the free of the old block arriving last.
    let t = read(
        &TraceBuilder::new(1)
            .alloc(3, 0x1000, 32, 2)
            .alloc(1, 0x1000, 16, 1)
            .free(2, 0x1000)
            .end(4)
            .bytes(),
    );
    assert_eq!(live(&t), [(32, 2)]);
    assert_eq!(t.frees_of_unknown(), 0);

    // And after the second block's own free, the late alloc must not
    // resurrect the address.
    let t = read(
        &TraceBuilder::new(1)
            .alloc(3, 0x1000, 32, 2)
            .free(4, 0x1000)
            .alloc(1, 0x1000, 16, 1)
            .free(2, 0x1000)
            .end(5)
            .bytes(),
    );
    assert_eq!(live(&t), []);
    assert_eq!(t.frees_of_unknown(), 0);
}

#[test]
fn an_alloc_over_a_live_block_means_its_free_was_lost() {
    let t = read(
        &TraceBuilder::new(1)
            .alloc(1, 0x1000, 16, 1)
            .alloc(5, 0x1000, 32, 2)
            .end(6)
            .bytes(),
    );
    assert_eq!(live(&t), [(32, 2)]);
    assert_eq!(t.lost_frees, 1);
}

#[test]
fn frees_of_blocks_from_before_tracing_are_counted_and_forgotten() {
    let mut b = TraceBuilder::new(1);
    // Ten seconds of frees of unknown blocks: the tombstones of old ones are
    // swept, the count stays.
    for i in 0..10_000u64 {
        b = b.free(i * 1_000_000, 0x10_0000 + i * 16);
    }
    let t = read(
        &b.alloc(10_000_000_000, 0x10_0000, 8, 1)
            .end(10_000_000_001)
            .bytes(),
    );
    assert_eq!(t.frees_of_unknown(), 10_000);
    assert_eq!(live(&t), [(8, 1)]);
}

#[test]
fn sampled_blocks_are_scaled_by_their_sampling_probability() {
    let rate = 512 * 1024;
    let t = read(
        &TraceBuilder::new(rate)
            .stack(1, &[at::XMALLOC_IN_LEAK, at::HANDLE_IN_MAIN])
            .sample(1, 0x1000, 1_000, 1)
            .sample(2, 0x2000, 1_000, 1)
            .sample(3, 0x3000, 4_000, 1)
            // A block as large as the rate is recorded with certainty.
            .alloc(4, 0x4000, 1 << 20, 1)
            .sample(5, 0x5000, 100, 1)
            .free(6, 0x5000)
            .end(7)
            .bytes(),
    );
    let r = report(&t, &ReportOptions::default());
    let p = |s: f64| 1.0 - (-s / rate as f64).exp();
    let bytes = 2.0 * 1_000.0 / p(1_000.0) + 4_000.0 / p(4_000.0) + (1 << 20) as f64;
    let objects = 2.0 / p(1_000.0) + 1.0 / p(4_000.0) + 1.0;
    assert_eq!(r.totals.bytes, bytes.round() as u64);
    assert_eq!(r.totals.objects, objects.round() as u64);
    assert!(r.totals.estimated);
    assert_eq!(r.trace.mode, "sampled");
    let c = &r.callers[0];
    assert_eq!(c.function.as_deref(), Some("leak_on_error"));
    assert_eq!(c.samples, 4);
    assert!(c.estimated);
    let var: f64 = [1_000.0, 1_000.0, 4_000.0]
        .iter()
        .map(|&s| (1.0 - p(s)) * (s / p(s)).powi(2))
        .sum();
    let want = var.sqrt() / bytes;
    let got = c.rel_error.unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    assert!((weight(1_000, true, rate).bytes - 1_000.0 / p(1_000.0)).abs() < 1e-6);
}

#[test]
fn exact_mode_reports_have_no_estimates() {
    let r = report(&read(&leaky_program().bytes()), &ReportOptions::default());
    assert!(!r.totals.estimated);
    assert!(r
        .callers
        .iter()
        .all(|c| !c.estimated && c.rel_error.is_none()));
}

#[test]
fn grouping_by_function_folds_allocator_wrappers() {
    let t = read(&leaky_program().bytes());
    let r = report(&t, &ReportOptions::default());
    let names: Vec<(&str, u64, u64)> = r
        .callers
        .iter()
        .map(|c| (c.function.as_deref().unwrap_or("?"), c.bytes, c.objects))
        .collect();
    assert_eq!(
        names,
        [
            ("fill_table", 8_192, 1),
            // Stacks 1 and 4 both allocate in leak_on_error: one group.
            ("leak_on_error", 264, 3),
            ("Cache::insert(int)", 96, 2),
            (NO_STACK, 10, 1),
            ("?", 7, 1),
        ]
    );
    assert_eq!(r.groups, 5);
    let fill = &r.callers[0];
    assert_eq!(fill.file.as_deref(), Some("table.cc"));
    assert_eq!(fill.line, Some(33));
    assert!(fill.stack[0].inlined, "the vector growth is inlined");
    assert!(!fill.stack[1].inlined);
    let leak = &r.callers[1];
    assert_eq!(leak.stack.len(), 5, "the stack holding the most bytes");
    assert_eq!(leak.line, Some(42));
    assert_eq!(leak.samples, 3);
    assert!((leak.share - 264.0 / 8_569.0).abs() < 1e-12);
    assert_eq!(r.callers[4].module.as_deref(), Some("unknown.so"));
    assert_eq!(r.totals.bytes, 8_569);
    assert_eq!(r.totals.objects, 8);
}

#[test]
fn without_default_folds_the_wrapper_itself_is_the_caller() {
    let t = read(&leaky_program().bytes());
    let opts = ReportOptions {
        folds: Folds::none(),
        ..ReportOptions::default()
    };
    let r = report(&t, &opts);
    let names: Vec<&str> = r
        .callers
        .iter()
        .filter_map(|c| c.function.as_deref())
        .collect();
    assert!(names.contains(&"xmalloc"), "{names:?}");
    assert!(names.contains(&"operator new(unsigned long)"), "{names:?}");

    // And a user pattern folds a function of the program.
    let mut folds = Folds::with_defaults();
    folds.add("leak_on_*");
    let r = report(
        &t,
        &ReportOptions {
            folds,
            ..ReportOptions::default()
        },
    );
    assert!(r
        .callers
        .iter()
        .any(|c| c.function.as_deref() == Some("handle_request")));
}

#[test]
fn grouping_by_stack_keeps_stacks_apart_and_top_and_min_bytes_filter() {
    let t = read(&leaky_program().bytes());
    let r = report(
        &t,
        &ReportOptions {
            by: GroupBy::Stack,
            ..ReportOptions::default()
        },
    );
    assert_eq!(r.groups, 6);
    let leak: Vec<u64> = r
        .callers
        .iter()
        .filter(|c| c.function.as_deref() == Some("leak_on_error"))
        .map(|c| c.bytes)
        .collect();
    assert_eq!(leak, [200, 64]);

    let r = report(
        &t,
        &ReportOptions {
            top: 2,
            min_bytes: 50,
            ..ReportOptions::default()
        },
    );
    assert_eq!(r.callers.len(), 2);
    let r = report(
        &t,
        &ReportOptions {
            min_bytes: 50,
            ..ReportOptions::default()
        },
    );
    assert_eq!(r.callers.len(), 3);
    assert_eq!(r.callers.last().unwrap().rank, 3);
}

#[test]
fn golden_text_report() {
    let t = read(&leaky_program().bytes());
    let r = report(&t, &ReportOptions::default());
    let mut out = Vec::new();
    write_text(&r, &mut out).unwrap();
    check_golden("leaky.txt", &String::from_utf8(out).unwrap());

    let t = read(
        &TraceBuilder::new(512 * 1024)
            .program("/work/svc", &["svc"])
            .stack(1, &[at::NEW_IN_CACHE, at::CACHE_IN_MAIN])
            .sample(1, 0x1000, 10_000, 1)
            .sample(2, 0x2000, 20_000, 1)
            .alloc(3, 0x3000, 1 << 20, 1)
            .stack(2, &[at::XMALLOC_IN_LEAK])
            .sample(4, 0x4000, 300_000, 2)
            .bytes(),
    );
    let r = report(&t, &ReportOptions::default());
    let mut out = Vec::new();
    write_text(&r, &mut out).unwrap();
    check_golden("sampled_cut_off.txt", &String::from_utf8(out).unwrap());
}

/// Compares with `tests/golden/NAME`; `UPDATE_GOLDEN=1` rewrites the file.
fn check_golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert!(
        expected == actual,
        "{} differs (UPDATE_GOLDEN=1 to accept):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

// ---- endings ----

#[test]
fn a_trace_without_end_is_cut_off() {
    let t = read(&TraceBuilder::new(1).alloc(1, 0x10, 5, 1).bytes());
    assert_eq!(t.ending, Some(TraceEnding::CutOff));
    assert_eq!(live(&t), [(5, 1)]);
}

#[test]
fn a_file_shorter_than_its_header_says_is_truncated() {
    let bytes = leaky_program().bytes();
    let t = read(&bytes[..bytes.len() - 20]);
    assert!(
        matches!(t.ending, Some(TraceEnding::Truncated { .. })),
        "{:?}",
        t.ending
    );
    assert!(t.allocs > 0);
}

#[test]
fn damage_mid_stream_keeps_what_came_before() {
    let t = read(
        &TraceBuilder::new(1)
            .alloc(1, 0x10, 5, 1)
            .raw(&[0xee, 1, 2, 3])
            .bytes(),
    );
    match &t.ending {
        Some(TraceEnding::Corrupt { detail }) => {
            assert!(detail.contains("unknown record tag 0xee"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(live(&t), [(5, 1)]);
}

#[test]
fn unreadable_files_are_errors() {
    assert!(read_trace(&b""[..]).is_err());
    assert!(read_trace(&b"\x7fELF\x02\x01\x01\x00"[..]).is_err());
    let mut bytes = leaky_program().bytes();
    bytes[8] = 9;
    assert!(read_trace(&bytes[..]).is_err());
}

// ---- the binary ----

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mtrace-analyze-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtrace-analyze"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_json_report() {
    let p = write_temp("json.bin", &leaky_program().bytes());
    let out = cli(&[p.to_str().unwrap(), "--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tr = &v["trace"];
    assert_eq!(tr["pid"], 1234);
    assert_eq!(tr["ppid"], 1200);
    assert_eq!(tr["exe"], "/work/leaky");
    assert_eq!(tr["cmdline"][1], "--requests");
    assert_eq!(tr["mode"], "exact");
    assert_eq!(tr["sample_rate"], 1);
    assert_eq!(tr["ending"], "clean");
    assert!(tr["ending_detail"].is_null());
    assert_eq!(tr["allocs"], 10);
    assert_eq!(tr["frees"], 3);
    assert_eq!(tr["frees_of_unknown"], 1);
    assert_eq!(tr["stacks"], 5);
    assert_eq!(tr["duration_ns"], 1_234_567_890);
    assert_eq!(tr["marks"][0]["what"], "forked");
    assert_eq!(tr["dropped"]["total"], 5);
    assert_eq!(v["totals"]["bytes"], 8_569);
    assert_eq!(v["totals"]["objects"], 8);
    assert_eq!(v["totals"]["estimated"], false);
    // The module file does not exist: frames fall back to module+offset.
    let c = &v["callers"][0];
    assert_eq!(c["rank"], 1);
    assert_eq!(c["bytes"], 8_192);
    assert_eq!(c["module"], "leaky");
    assert!(c["function"].is_null());
    assert_eq!(c["stack"][0]["address"], "0x50008080");
    assert!(c["rel_error"].is_null());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("/work/leaky").count(), 1, "{stderr}");
}

#[test]
fn cli_report_subcommand_and_default_are_the_same() {
    let p = write_temp("same.bin", &leaky_program().bytes());
    let a = cli(&[p.to_str().unwrap()]);
    let b = cli(&["report", p.to_str().unwrap(), "--by", "stack", "--top", "3"]);
    assert!(a.status.success() && b.status.success());
    let text = String::from_utf8(a.stdout).unwrap();
    assert!(text.starts_with("mtrace-rs report for /work/leaky (pid 1234, parent 1200)\n"));
    // /work/leaky does not exist, so each unnamed first frame is its own
    // caller.
    assert!(
        text.contains("Outstanding at end: 8,569 bytes in 8 objects from 6 callers"),
        "{text}"
    );
    let text = String::from_utf8(b.stdout).unwrap();
    assert!(text.contains("from 6 callers"), "{text}");
}

#[test]
fn cli_exit_codes_for_bad_files() {
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("empty.bin", Vec::new(), "empty"),
        (
            "foreign.bin",
            b"\x7fELF\x02\x01\x01\x00junk".to_vec(),
            "not an mtrace-rs trace",
        ),
        (
            "future.bin",
            {
                let mut b = leaky_program().bytes();
                b[8] = 9;
                b
            },
            "version 9",
        ),
    ];
    for (name, bytes, msg) in cases {
        let p = write_temp(name, &bytes);
        let out = cli(&[p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with(&format!("mtrace-analyze: {}: ", p.display())),
            "{err}"
        );
        assert!(err.contains(msg), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let out = cli(&["/nonexistent/trace.bin"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn cli_corrupt_file_reports_what_was_read_and_exits_2() {
    let p = write_temp(
        "corrupt.bin",
        &TraceBuilder::new(1)
            .alloc(1, 0x10, 5, 1)
            .raw(&[0xee, 1, 2, 3])
            .bytes(),
    );
    let out = cli(&[p.to_str().unwrap(), "--format", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["trace"]["ending"], "corrupt");
    assert!(v["trace"]["ending_detail"]
        .as_str()
        .unwrap()
        .contains(&format!("byte {}", HEADER_SIZE + 5)));
    assert_eq!(v["totals"]["bytes"], 5);
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
}

#[test]
fn cli_cut_off_and_truncated_files_succeed_with_a_note() {
    let p = write_temp(
        "cut.bin",
        &TraceBuilder::new(1).alloc(1, 0x10, 5, 1).bytes(),
    );
    let out = cli(&[p.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("file:      cut off"));
    let bytes = leaky_program().bytes();
    let p = write_temp("trunc.bin", &bytes[..bytes.len() - 20]);
    let out = cli(&[p.to_str().unwrap(), "--format", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["trace"]["ending"], "truncated");
}
