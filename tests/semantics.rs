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

/// patch.rs points each hook's hot-path jump straight at the real function
/// when the constructor runs single-threaded: under the tracer, every hook the
/// program calls is ours and its jump lands in libc, in every mode (malloc's
/// and calloc's on the way past glibc's rewritten code where detour.rs
/// rewrote it); and the program's allocations through every hook work.
#[test]
fn every_hook_jumps_straight_to_libc_once_patched() {
    let scratch = Scratch::new("hook-jumps");
    let exe = compile("tests/programs/hook_jumps.c", scratch.path());
    let bare = run_bare(&mut Command::new(&exe));
    assert!(bare.status.success(), "{}", stdout(&bare));
    for (mode, tracer) in [
        ("default", Tracer::default_rate(&scratch.dir("default"))),
        (
            "detour off",
            Tracer::default_rate(&scratch.dir("off")).env("MTRACE_RS_DETOUR", "0"),
        ),
        ("exact", Tracer::exact(&scratch.dir("exact"))),
    ] {
        let out = tracer.run(&mut Command::new(&exe));
        let text = stdout(&out);
        assert!(out.status.success(), "{mode}: {text}\n{}", stderr(&out));
        assert!(text.contains("sum 1000"), "{mode}: {text}");
        let hooks: Vec<&str> = text.lines().filter(|l| l.contains(" -> ")).collect();
        assert_eq!(hooks.len(), 9, "{mode}: {text}");
        for line in hooks {
            let (hook, target) = line.split_once(" -> ").unwrap();
            assert!(hook.contains("libmtrace_rs.so"), "{mode}: {line}");
            // Where detour.rs made glibc's malloc and calloc charge the
            // countdown (sampled mode, glibc 2.36 as Debian builds it),
            // their hooks, which charged it already, go past that through a
            // copy of glibc's prologue in our library.
            let detoured =
                mode == "default" && (hook.starts_with("malloc ") || hook.starts_with("calloc "));
            assert!(
                target.contains("libc.so") || (detoured && target.contains("libmtrace_rs.so")),
                "{mode}: not patched: {line}"
            );
        }
    }
}
