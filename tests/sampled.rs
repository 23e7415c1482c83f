//! Sampled mode: Poisson sampling by bytes with a fixed seed. The corrected
//! estimate of a leak must be close to the truth, churned memory must come
//! out as nothing outstanding, and blocks at least as large as the rate must
//! be exact.

use mtrace_rs_tests::{compile, stdout, Scratch, Tracer};
use std::process::Command;

/// How far an estimate may be from the truth. The leak in sampled.c is
/// 2,000,000 bytes in 100-byte objects; at a 4096-byte rate that is about
/// 490 samples, whose relative standard error is 1/sqrt(490) = 4.5%. 25% is
/// more than five standard errors: a failure means bias, not bad luck.
const TOLERANCE: f64 = 0.25;

#[test]
fn sampled_estimate_of_a_small_object_leak_is_within_25_percent_and_churn_nets_to_zero() {
    let scratch = Scratch::new("sampled");
    let exe = compile("tests/programs/sampled.c", scratch.path());
    let tracer = Tracer::sampled(&scratch.dir("traces"), 4096);
    assert_sampled_trace(&tracer, &exe);
}

/// A writer held up (by a slow disk, or a loaded machine: this run at a
/// high rate once dropped 2,106 events when it shared two cores with the
/// rest of the suite) lets the rings fill. The program's threads then wait
/// for room, as in exact mode, rather than drop events: a dropped free
/// would be a block the report calls leaked. With the old behaviour this
/// stall dropped about 21,000 events and the churned sites held blocks.
#[test]
fn a_stalled_writer_makes_sampled_mode_wait_for_room_and_drop_nothing() {
    let scratch = Scratch::new("sampled-stall");
    let exe = compile("tests/programs/sampled.c", scratch.path());
    let tracer =
        Tracer::sampled(&scratch.dir("traces"), 4096).env("MTRACE_RS_TEST_WRITER_STALL_MS", "30");
    assert_sampled_trace(&tracer, &exe);
}

/// sampled.c's trace at a 4096-byte rate: the leak estimated within the
/// tolerance, the churned sites netted to nothing, no event dropped.
fn assert_sampled_trace(tracer: &Tracer, exe: &std::path::Path) {
    let out = tracer.run(&mut Command::new(exe));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "leaked 20000 x 100 bytes\n");

    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    let summary = report.summary();
    assert_eq!(report.trace()["mode"], "sampled", "{summary}");
    assert_eq!(report.trace()["sample_rate"], 4096, "{summary}");
    assert_eq!(report.ending(), "clean", "{summary}");
    assert_eq!(report.dropped(), 0, "{summary}");

    let leak = report
        .caller("leak_small")
        .unwrap_or_else(|| panic!("no leak_small:\n{summary}"));
    let bytes = leak["bytes"].as_u64().unwrap() as f64;
    let objects = leak["objects"].as_u64().unwrap() as f64;
    let samples = leak["samples"].as_u64().unwrap();
    assert!(
        samples >= 100,
        "too few samples ({samples}) for the tolerance:\n{summary}"
    );
    assert_eq!(leak["estimated"], true, "{summary}");
    let truth = 2_000_000.0;
    assert!(
        (bytes - truth).abs() <= TOLERANCE * truth,
        "leak_small estimated {bytes} bytes, truth {truth}:\n{summary}"
    );
    assert!(
        (objects - 20_000.0).abs() <= TOLERANCE * 20_000.0,
        "leak_small estimated {objects} objects, truth 20000:\n{summary}"
    );

    // churn_site allocated ~64 MB and handoff_alloc ~32 MB, all of it freed
    // (half of the latter by another thread): any sample left outstanding
    // there is a free the tracer failed to match to its sampled block.
    for site in ["churn_site", "handoff_alloc"] {
        assert_eq!(
            report.held_by(site),
            (0, 0),
            "{site} holds nothing:\n{summary}"
        );
    }
}

#[test]
fn four_one_mib_leaks_at_the_default_rate_are_exact_not_estimated() {
    let scratch = Scratch::new("big-blocks");
    let exe = compile("tests/programs/big_blocks.c", scratch.path());
    // No MTRACE_RS_SAMPLE_BYTES: the default 512 KiB rate, as in production.
    let tracer = Tracer::default_rate(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert!(out.status.success(), "{out:?}");

    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    let summary = report.summary();
    assert_eq!(report.trace()["mode"], "sampled", "{summary}");
    assert_eq!(report.trace()["sample_rate"], 524_288, "{summary}");
    assert_eq!(report.held_by("leak_big"), (4_194_304, 4), "{summary}");
    // A block of exactly the rate is "at least as large as the rate".
    assert_eq!(report.held_by("leak_at_rate"), (1_048_576, 2), "{summary}");
    assert_eq!(report.held_by("churn_big"), (0, 0), "{summary}");
    assert_eq!(report.held_by("churn_small"), (0, 0), "{summary}");
}

/// detour.rs: in sampled mode under a glibc whose free starts as expected,
/// glibc's own free tests for sampled blocks and the program's PLT calls go
/// straight to it. Whichever way a free arrives (the PLT, a pointer to free
/// taken at run time, which reaches our hook), and whatever it frees (a
/// sampled block, a 64 KiB-aligned ordinary block that the test sends to
/// the slow path, NULL), the trace must come out exact; and with
/// MTRACE_RS_DETOUR=0, or in exact mode, glibc's code is left alone.
#[test]
fn glibc_free_rewritten_for_sampled_mode_frees_every_way_and_traces_exactly() {
    let scratch = Scratch::new("detour");
    // Lazy binding (the PLT slot for free not bound yet when the tracer
    // starts) and immediate binding (bound to the tracer's hook by then).
    let lazy = compile("tests/programs/detour.c", scratch.path());
    let now = mtrace_rs_tests::compile_with(
        "tests/programs/detour.c",
        scratch.path(),
        "-now",
        &["-Wl,-z,now"],
    );
    for exe in [lazy, now] {
        detour_traces_exactly(&exe, &scratch);
    }
}

fn detour_traces_exactly(exe: &std::path::Path, scratch: &Scratch) {
    let tag = exe.file_name().unwrap().to_string_lossy().into_owned();
    let bare = mtrace_rs_tests::run_bare(&mut Command::new(exe));
    assert!(bare.status.success(), "{bare:?}");
    let bare_text = stdout(&bare);
    let entry = |text: &str| text.lines().next().unwrap_or("").to_string();
    // The shape detour.rs looks for: a call, a 7-byte nop, then
    // `test %rdi,%rdi; je rel32` at glibc's free.
    let bare_entry = entry(&bare_text);
    let b: Vec<&str> = bare_entry.split(' ').skip(1).collect();
    let expected_shape = b.len() == 21
        && b[0] == "e8"
        && b[5..12] == ["0f", "1f", "80", "00", "00", "00", "00"]
        && b[12..17] == ["48", "85", "ff", "0f", "84"];
    for (mode, tracer, rewritten) in [
        (
            "default",
            Tracer::default_rate(&scratch.dir(&format!("{tag}-default"))),
            expected_shape,
        ),
        (
            "detour off",
            Tracer::default_rate(&scratch.dir(&format!("{tag}-off"))).env("MTRACE_RS_DETOUR", "0"),
            false,
        ),
        (
            "exact",
            Tracer::exact(&scratch.dir(&format!("{tag}-exact"))),
            false,
        ),
    ] {
        let name = format!("{tag}, {mode}");
        let out = tracer.run(&mut Command::new(exe));
        assert!(out.status.success(), "{name}: {out:?}");
        let text = stdout(&out);
        assert!(text.ends_with("aligned 200\n"), "{name}: {text}");
        let e = entry(&text);
        let line = |prefix: &str| line_of(&text, prefix);
        let (malloc, calloc) = (line("malloc: "), line("calloc: "));
        for what in ["huge", "overflow", "huge calloc"] {
            assert_eq!(line(&format!("{what}: ")), "NULL ENOMEM", "{name}: {what}");
        }
        // The program's PLT slots: glibc's functions once rewritten, our
        // hooks otherwise.
        let owner = if rewritten {
            "libc.so"
        } else {
            "libmtrace_rs.so"
        };
        for f in ["free", "malloc", "calloc"] {
            let slot = line(&format!("{f} slot: "));
            assert!(slot.contains(owner), "{name}: {f}'s PLT slot: {text}");
        }
        if rewritten {
            assert!(
                e.ends_with(" 40 f7 c7 ef ff 00 00 74 f0"),
                "{name}: glibc's free not rewritten: {e}"
            );
            // Its checks replaced by `sub %rbx,%fs:off; jbe; nopl`.
            assert!(
                malloc.starts_with("41 54 55 53 48 89 fb 48 83 ec 10 64 48 29 1c 25 ")
                    && malloc.ends_with(" 0f 1f 80 00 00 00 00"),
                "{name}: glibc's malloc not rewritten: {malloc}"
            );
            // The checks of the product replaced by `mov %rax,%rbx; jo`,
            // the countdown and 16 bytes of nops.
            assert!(
                calloc
                    .starts_with("41 55 48 89 f8 41 54 55 53 48 83 ec 18 48 f7 e6 48 89 c3 0f 80 ")
                    && calloc.contains(" 64 48 29 1c 25 ")
                    && calloc.ends_with(" 0f 1f 80 00 00 00 00"),
                "{name}: glibc's calloc not rewritten: {calloc}"
            );
        } else {
            assert_eq!(e, bare_entry, "{name}: glibc's free changed");
            for (f, now) in [("malloc", &malloc), ("calloc", &calloc)] {
                let bare = line_of(&bare_text, &format!("{f}: "));
                assert_eq!(now, &bare, "{name}: glibc's {f} changed");
            }
        }
        let report = mtrace_rs_tests::analyze(&tracer.only_trace());
        assert_detour_trace(&report, &name);
    }
    if expected_shape {
        same_samples_with_and_without_detours(exe, scratch, &tag);
    }
}

/// The rewritten malloc, calloc and free must charge the countdown exactly
/// as the hooks do: with the same seed, a rate at which detour.c takes about a
/// thousand samples must take the same ones with and without the rewrite
/// (the same sampled allocations and frees, by caller). A way to malloc
/// charged twice (glibc's memalign and realloc call its malloc) or not at
/// all would move every sample point after it.
fn same_samples_with_and_without_detours(exe: &std::path::Path, scratch: &Scratch, tag: &str) {
    let churn = |detour: &str| {
        let tracer = Tracer::sampled(&scratch.dir(&format!("{tag}-seeded-{detour}")), 65536)
            .env("MTRACE_RS_SEED", "7")
            .env("MTRACE_RS_DETOUR", detour);
        let out = tracer.run(&mut Command::new(exe));
        assert!(
            out.status.success(),
            "{tag}, seeded, detour {detour}: {out:?}"
        );
        let a = Command::new(&mtrace_rs_tests::artifacts().analyzer)
            .args(["churn", "--format", "json", "--top", "1000"])
            .arg(tracer.only_trace())
            .output()
            .expect("mtrace-analyze churn");
        let json: serde_json::Value =
            serde_json::from_slice(&a.stdout).expect("churn report as JSON");
        let callers: Vec<(String, u64, u64, u64)> = json["callers"]
            .as_array()
            .expect("callers")
            .iter()
            .map(|c| {
                let n = |k: &str| c[k].as_u64().unwrap_or(u64::MAX);
                let f = c["function"].as_str().unwrap_or("?").to_string();
                (f, n("samples"), n("allocations"), n("bytes"))
            })
            .collect();
        (json["allocations"].clone(), json["freed"].clone(), callers)
    };
    let (on, off) = (churn("1"), churn("0"));
    assert!(on.2.len() >= 5, "{tag}: too few callers sampled: {on:?}");
    assert_eq!(
        on, off,
        "{tag}: samples differ with the rewrite (left) and without"
    );
}

/// The rest of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or("")
        .to_string()
}

/// What detour.c's trace must hold: its leak exact, its churn netted out.
fn assert_detour_trace(report: &mtrace_rs_tests::Report, name: &str) {
    let summary = report.summary();
    assert_eq!(report.ending(), "clean", "{name}: {summary}");
    assert_eq!(
        report.held_by("leak_big"),
        (3 << 20, 3),
        "{name}: {summary}"
    );
    // dlsym's malloc, realloc(NULL), memalign(16), aligned_alloc(16),
    // posix_memalign(8), memalign(0) and memalign(24): at the program's own
    // frame, not glibc's, and the last two recorded at all (they were
    // passed on unrecorded, as alignments that are not powers of two).
    assert_eq!(
        report.held_by("leak_other_ways"),
        (7 << 20, 7),
        "{name}: {summary}"
    );
    assert_eq!(
        report.held_by("leak_calloc"),
        (2 << 20, 2),
        "{name}: {summary}"
    );
    for site in [
        "churn_big",
        "churn_big_pointer",
        "churn_aligned",
        "churn_small",
        "churn_other_ways",
    ] {
        assert_eq!(report.held_by(site), (0, 0), "{name}: {site}: {summary}");
    }
}

/// Valgrind runs translations of the code it has seen, so glibc's free,
/// once run, would stay unrewritten under it, and the program's frees (sent
/// straight to glibc's free by detour.rs) would give sampled blocks to
/// glibc. The rewrite tells Valgrind to drop its translations; here another
/// library's constructor frees a block before the tracer's runs, and the
/// trace must still come out exact.
#[test]
fn under_valgrind_glibc_free_rewritten_after_it_ran_still_traces_exactly() {
    if !mtrace_rs_tests::have_command("valgrind") {
        eprintln!("skipped: valgrind is not installed (scripts/test.sh installs it)");
        return;
    }
    let scratch = Scratch::new("detour-valgrind");
    let exe = compile("tests/programs/detour.c", scratch.path());
    let early = mtrace_rs_tests::compile_with(
        "tests/programs/early_free.c",
        scratch.path(),
        ".so",
        &["-shared", "-fPIC"],
    );
    let traces = scratch.dir("traces");
    let preload = &mtrace_rs_tests::artifacts().preload;
    // LD_PRELOAD goes to the program through env, not to Valgrind's own
    // launcher.
    let out = mtrace_rs_tests::run_bare(
        Command::new("valgrind")
            .args(["-q", "--tool=none", "--trace-children=yes", "env"])
            .arg(format!(
                "LD_PRELOAD={} {}",
                preload.display(),
                early.display()
            ))
            .arg(format!("MTRACE_RS_OUT={}/trace.%p.bin", traces.display()))
            .arg(&exe),
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(text.ends_with("aligned 200\n"), "{text}");
    let reports: Vec<_> = std::fs::read_dir(&traces)
        .unwrap()
        .map(|e| mtrace_rs_tests::analyze(&e.unwrap().path()))
        .filter(|r| r.held_by("leak_big").1 > 0)
        .collect();
    assert_eq!(reports.len(), 1, "one trace of the program: {text}");
    assert_detour_trace(&reports[0], "under valgrind");
}
