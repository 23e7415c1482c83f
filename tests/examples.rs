//! The bundled examples do what examples/README.md and the README say: the
//! demo's leaks come out as stated, and the churn benchmark holds nothing at
//! the end.

use mtrace_rs_tests::{compile, stdout, Scratch, Tracer};
use std::process::Command;

#[test]
fn leaky_demo_reports_read_body_and_remember_client_as_documented() {
    let scratch = Scratch::new("leaky");
    let exe = compile("examples/leaky.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "handled 280 requests, 40 failed to parse, 28 clients remembered\n"
    );

    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    let summary = report.summary();
    // The figures stated at the top of examples/leaky.c.
    assert_eq!(report.held_by("read_body"), (20480, 40), "{summary}");
    assert_eq!(report.held_by("remember_client"), (728, 56), "{summary}");
    let ours = report.callers_in_module("leaky");
    assert_eq!(ours.len(), 2, "only the two documented leaks:\n{summary}");
    // The biggest holder is the demo's bug.
    let top = &report.callers()[0];
    assert!(mtrace_rs_tests::function_is(
        top["function"].as_str().unwrap_or(""),
        "read_body"
    ));
    assert_eq!(top["rank"], 1, "{summary}");

    // The default text report names it too.
    let text = mtrace_rs_tests::analyze_raw(&tracer.only_trace(), &[] as &[&str]);
    text.assert_no_panic("the text report");
    assert!(text.status.success(), "{}", text.stderr);
    assert!(text.stdout.contains("read_body"), "{}", text.stdout);
}

#[test]
fn churn_benchmark_runs_traced_and_leaves_nothing_outstanding() {
    let scratch = Scratch::new("churn");
    let exe = compile("examples/churn.c", scratch.path());
    let bare = mtrace_rs_tests::run_bare(Command::new(&exe).args(["2", "20000"]));
    assert!(bare.status.success(), "{bare:?}");
    for (mode, tracer) in [
        ("exact", Tracer::exact(&scratch.dir("exact"))),
        (
            "sampled-4096",
            Tracer::sampled(&scratch.dir("sampled"), 4096),
        ),
    ] {
        let out = tracer.run(Command::new(&exe).args(["2", "20000"]));
        assert_eq!(stdout(&out), stdout(&bare), "{mode}: the checksum differs");
        assert!(out.status.success(), "{mode}: {out:?}");
        let report = mtrace_rs_tests::analyze(&tracer.only_trace());
        assert_eq!(report.ending(), "clean", "{mode}:\n{}", report.summary());
        assert!(
            report.callers_in_module("churn").is_empty(),
            "{mode}: churn frees everything it allocates:\n{}",
            report.summary()
        );
    }
}
