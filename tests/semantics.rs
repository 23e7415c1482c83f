//! The tracer keeps glibc's allocation semantics: tests/programs/semantics.c
//! prints what every entry point returns, sets in errno and guarantees about
//! alignment and contents; traced runs must print exactly what the bare run
//! prints and exit the same way.

use mtrace_rs_tests::{compile, run_bare, stderr, stdout, Scratch, Tracer};
use std::process::Command;

#[test]
fn glibc_semantics_are_identical_bare_exact_and_sampled_every_64_bytes() {
    let scratch = Scratch::new("semantics");
    let exe = compile("tests/programs/semantics.c", scratch.path());

    let bare = run_bare(&mut Command::new(&exe));
    assert!(
        bare.status.success(),
        "the program fails even untraced:\n{}",
        stdout(&bare)
    );
    let bare_text = stdout(&bare);
    assert!(bare_text.contains("failures: 0"));

    // A 64-byte mean rate samples nearly every allocation, so the sampled
    // paths (and frees of sampled blocks, realloc of sampled blocks) run
    // for almost every call instead of one in thousands.
    let modes = [
        ("exact", Tracer::exact(&scratch.dir("exact"))),
        ("sampled-64", Tracer::sampled(&scratch.dir("sampled"), 64)),
        ("default", Tracer::default_rate(&scratch.dir("default"))),
    ];
    for (name, tracer) in &modes {
        let out = tracer.run(&mut Command::new(&exe));
        let text = stdout(&out);
        if text != bare_text {
            let diff: Vec<String> = bare_text
                .lines()
                .zip(text.lines())
                .filter(|(a, b)| a != b)
                .map(|(a, b)| format!("  bare:   {a}\n  traced: {b}"))
                .collect();
            panic!(
                "{name}: output differs from the bare run:\n{}\n(traced output {} lines, bare {}); stderr:\n{}",
                diff.join("\n"),
                text.lines().count(),
                bare_text.lines().count(),
                stderr(&out)
            );
        }
        assert_eq!(
            out.status.code(),
            bare.status.code(),
            "{name}: exit status; {out:?}"
        );
        assert!(
            !stderr(&out).contains("mtrace-rs:"),
            "{name}: the tracer complained:\n{}",
            stderr(&out)
        );

        // The trace of all that is readable and complete.
        let report = mtrace_rs_tests::analyze(&tracer.only_trace());
        assert_eq!(report.ending(), "clean", "{name}:\n{}", report.summary());
        assert!(
            report.trace()["allocs"].as_u64().unwrap_or(0) > 0,
            "{name}: no allocations"
        );
    }
}
