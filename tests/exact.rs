//! Exact mode (`MTRACE_RS_SAMPLE_BYTES=1`): known leaks at distinct call
//! sites, made by several threads amid heavy churn, must be reported to the
//! byte and the object at the function that allocated them.

use mtrace_rs_tests::{compile, stdout, Report, Scratch, Tracer};
use std::collections::BTreeMap;
use std::process::Command;

/// Checks that the program's own module holds exactly `expected` (function
/// -> (bytes, objects)) and that the totals add up. Allocations by libc or
/// libstdc++ themselves (stdio buffers, thread bookkeeping) are allowed, but
/// only outside the program's module.
fn assert_leaks(report: &Report, program: &str, expected: &BTreeMap<&str, (u64, u64)>) {
    let summary = report.summary();
    assert_eq!(report.trace()["mode"], "exact", "{summary}");
    assert_eq!(report.trace()["sample_rate"], 1, "{summary}");
    assert_eq!(report.ending(), "clean", "{summary}");
    assert_eq!(report.dropped(), 0, "exact mode dropped events: {summary}");

    for (function, &(bytes, objects)) in expected {
        let caller = report
            .caller(function)
            .unwrap_or_else(|| panic!("{function} is not in the report:\n{summary}"));
        assert_eq!(
            (caller["bytes"].as_u64(), caller["objects"].as_u64()),
            (Some(bytes), Some(objects)),
            "{function}: (bytes, objects) wrong:\n{summary}"
        );
        assert_eq!(
            caller["estimated"], false,
            "{function} is exact:\n{summary}"
        );
        assert!(
            caller["stack"].as_array().is_some_and(|s| !s.is_empty()),
            "{function} has no stack:\n{summary}"
        );
    }

    // Nothing else the program allocated is outstanding: its churn was all
    // freed, and wrappers (strdup, operator new, std::vector) fold into the
    // leaking function instead of showing up on their own.
    let ours = report.callers_in_module(program);
    for caller in &ours {
        let f = caller["function"].as_str().unwrap_or("");
        assert!(
            expected
                .keys()
                .any(|name| mtrace_rs_tests::function_is(f, name)),
            "unexpected outstanding caller {f} in {program}:\n{summary}"
        );
    }
    assert_eq!(ours.len(), expected.len(), "{summary}");

    let ours_bytes: u64 = expected.values().map(|v| v.0).sum();
    let ours_objects: u64 = expected.values().map(|v| v.1).sum();
    let all_bytes: u64 = report
        .callers()
        .iter()
        .map(|c| c["bytes"].as_u64().unwrap())
        .sum();
    let all_objects: u64 = report
        .callers()
        .iter()
        .map(|c| c["objects"].as_u64().unwrap())
        .sum();
    assert_eq!(
        report.total_bytes(),
        all_bytes,
        "totals.bytes is the sum of callers:\n{summary}"
    );
    assert_eq!(
        report.total_objects(),
        all_objects,
        "totals.objects:\n{summary}"
    );
    assert!(report.total_bytes() >= ours_bytes, "{summary}");
    assert!(report.total_objects() >= ours_objects, "{summary}");
    assert_eq!(report.json["totals"]["estimated"], false, "{summary}");
}

#[test]
fn c_leaks_at_six_sites_on_four_threads_are_exact_per_function() {
    let scratch = Scratch::new("exact-c");
    let exe = compile("tests/programs/leaks.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "done\n");

    // Four threads each leak the per-thread figures in leaks.c.
    let expected = BTreeMap::from([
        ("leak_a", (4 * 10 * 100, 4 * 10)),
        ("leak_b", (4 * 3 * 1000, 4 * 3)),
        ("leak_c", (4 * 777, 4)),
        ("leak_d", (4 * 5 * 320, 4 * 5)),
        ("leak_e", (4 * 2 * 11, 4 * 2)),
        ("leak_f", (4 * (300 + 256), 4 * 2)),
        ("leak_main_once", (4242, 1)),
    ]);
    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    assert_leaks(&report, "leaks", &expected);
}

#[test]
fn cpp_new_vector_string_and_exception_path_leaks_are_reported_at_the_caller() {
    let scratch = Scratch::new("exact-cpp");
    let exe = compile("tests/programs/leaks_cpp.cpp", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert!(out.status.success(), "{out:?}");

    // Growth-policy sizes come from the program itself ("expect f bytes n").
    let mut expected = BTreeMap::from([
        ("make_foo", (2 * 5 * 48, 2 * 5)),
        ("make_array", (2 * 3 * 100, 2 * 3)),
        ("make_aligned", (2 * 2 * 192, 2 * 2)),
        ("encode_frame", (2 * 7 * 64, 2 * 7)),
    ]);
    let text = stdout(&out);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let ["expect", name, bytes, objects] = f[..] {
            let site = match name {
                "leak_vector" => "leak_vector",
                "leak_string" => "leak_string",
                other => panic!("unknown site {other}"),
            };
            expected.insert(site, (bytes.parse().unwrap(), objects.parse().unwrap()));
        }
    }
    assert_eq!(
        expected.len(),
        6,
        "the program printed its expectations:\n{text}"
    );

    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    assert_leaks(&report, "leaks_cpp", &expected);
}

#[test]
fn a_single_threaded_program_has_its_main_thread_allocations_recorded() {
    // Found while writing these tests: with no other thread ever started,
    // the main thread's allocations were neither recorded nor counted as
    // dropped.
    let scratch = Scratch::new("single-thread");
    let exe = compile("tests/programs/exit_code.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    let summary = report.summary();
    assert_eq!(report.held_by("leak_config"), (123, 1), "{summary}");
    // strdup + free, and stdout's buffer: at least three allocations.
    assert!(
        report.trace()["allocs"].as_u64().unwrap_or(0) >= 3,
        "{summary}"
    );
}
