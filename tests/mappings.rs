//! MTRACE_RS_MMAP=1: the anonymous mappings a program makes itself are
//! reported by caller with exact sizes, partial unmaps and mremap included,
//! and file mappings are left out.

use mtrace_rs_tests::{analyze, compile, run_bare, stdout, Scratch, Tracer};
use std::process::Command;

const MIB: u64 = 1 << 20;

#[test]
fn anonymous_mappings_held_at_exit_are_reported_by_caller() {
    let scratch = Scratch::new("mappings");
    let exe = compile("tests/programs/mappings.c", scratch.path());
    let bare = run_bare(&mut Command::new(&exe));
    let tracer = Tracer::exact(&scratch.dir("traces")).env("MTRACE_RS_MMAP", "1");
    let traced = tracer.run(&mut Command::new(&exe));
    assert_eq!(
        (traced.status.code(), stdout(&traced)),
        (bare.status.code(), stdout(&bare))
    );
    let report = analyze(&tracer.only_trace());
    let mmap = &report.json["mmap"];
    assert_eq!(mmap["bytes"], 63 * MIB, "{mmap}");
    // The arena is two mappings after the hole; the table one.
    assert_eq!(mmap["mappings"], 3, "{mmap}");
    let by = |f: &str| {
        mmap["callers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["function"].as_str().is_some_and(|n| n.contains(f)))
            .map(|c| (c["bytes"].as_u64().unwrap(), c["objects"].as_u64().unwrap()))
    };
    assert_eq!(by("reserve_arena"), Some((60 * MIB, 2)), "{mmap}");
    assert_eq!(
        by("grow_table"),
        Some((3 * MIB, 1)),
        "the mremap moves it: {mmap}"
    );
    assert_eq!(by("scratch_buffer"), None, "{mmap}");
}

#[test]
fn without_the_variable_no_mappings_are_recorded() {
    let scratch = Scratch::new("mappings-off");
    let exe = compile("tests/programs/mappings.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let traced = tracer.run(&mut Command::new(&exe));
    assert!(traced.status.success());
    let report = analyze(&tracer.only_trace());
    assert!(report.json["mmap"].is_null(), "{}", report.json["mmap"]);
}
