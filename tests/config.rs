//! Configuration and the trace file itself: a bad `MTRACE_RS_*` value or an
//! unusable output path disables tracing with one line on stderr and
//! changes nothing else; trace files are private, never overwrite and never
//! follow a symlink.

use mtrace_rs_tests::{compile, run_bare, stderr, stdout, trace_files, Scratch, Tracer};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::{Command, Output};

/// The program's output and exit code (3) must be as untraced, with exactly
/// one `mtrace-rs:` line on stderr mentioning `names`.
fn assert_fails_open(what: &str, bare: &Output, traced: &Output, names: &str) {
    assert_eq!(
        stdout(traced),
        stdout(bare),
        "{what}: stdout changed; stderr:\n{}",
        stderr(traced)
    );
    assert_eq!(
        traced.status.code(),
        Some(3),
        "{what}: exit code changed; {traced:?}"
    );
    let err = stderr(traced);
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("mtrace-rs:"))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "{what}: expected one 'mtrace-rs:' line on stderr, got:\n{err}"
    );
    assert!(
        ours[0].contains(names),
        "{what}: the message should name {names}: {}",
        ours[0]
    );
    // Nothing but the tracer's line was added to stderr.
    assert_eq!(
        err.lines().count(),
        1 + stderr(bare).lines().count(),
        "{what}:\n{err}"
    );
}

#[test]
fn bad_env_values_disable_tracing_with_one_line_and_change_nothing_else() {
    let scratch = Scratch::new("bad-env");
    let exe = compile("tests/programs/exit_code.c", scratch.path());
    let bare = run_bare(&mut Command::new(&exe));
    assert_eq!(bare.status.code(), Some(3));

    let cases = [
        ("MTRACE_RS_SAMPLE_BYTES", "banana"),
        ("MTRACE_RS_SAMPLE_BYTES", "-5"),
        ("MTRACE_RS_DEPTH", "deep"),
        ("MTRACE_RS_SEED", "not-a-number"),
    ];
    for (i, (var, value)) in cases.iter().enumerate() {
        let tracer = Tracer::exact(&scratch.dir(&format!("case{i}"))).env(var, value);
        let traced = tracer.run(&mut Command::new(&exe));
        assert_fails_open(&format!("{var}={value}"), &bare, &traced, var);
        assert!(
            tracer.traces().is_empty(),
            "{var}={value}: tracing should be off"
        );
    }
}

#[test]
fn unwritable_output_path_fails_open_with_one_line() {
    let scratch = Scratch::new("bad-out");
    let exe = compile("tests/programs/exit_code.c", scratch.path());
    let bare = run_bare(&mut Command::new(&exe));
    let missing = scratch.path().join("no-such-dir").join("t.%p.bin");
    let tracer =
        Tracer::exact(&scratch.dir("traces")).env("MTRACE_RS_OUT", missing.to_str().unwrap());
    let traced = tracer.run(&mut Command::new(&exe));
    // The message should say what failed; the variable or the path will do.
    let err = stderr(&traced);
    let names = if err.contains("MTRACE_RS_OUT") {
        "MTRACE_RS_OUT"
    } else {
        "no-such-dir"
    };
    assert_fails_open(
        "MTRACE_RS_OUT in a missing directory",
        &bare,
        &traced,
        names,
    );
}

#[test]
fn trace_files_are_private_and_never_overwrite_or_follow_symlinks() {
    let scratch = Scratch::new("file-safety");
    let exe = compile("tests/programs/exit_code.c", scratch.path());
    let dir = scratch.dir("traces");
    // A fixed name without %p: an existing file and a symlink to a victim
    // sit where the tracer would write.
    let existing = dir.join("trace.fixed.bin");
    fs::write(&existing, "precious").unwrap();
    let victim = scratch.path().join("victim");
    fs::write(&victim, "do not touch").unwrap();
    symlink(&victim, dir.join("trace.fixed.1.bin")).unwrap();

    let tracer = Tracer::exact(&dir).env("MTRACE_RS_OUT", existing.to_str().unwrap());
    let out = tracer.run(&mut Command::new(&exe));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(fs::read_to_string(&existing).unwrap(), "precious");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "do not touch");

    // The tracer picked another name: a regular file, mode 0600.
    let written: Vec<_> = trace_files(&dir)
        .into_iter()
        .filter(|p| p != &existing && !p.is_symlink())
        .collect();
    assert_eq!(written.len(), 1, "{:?}", trace_files(&dir));
    let meta = fs::symlink_metadata(&written[0]).unwrap();
    assert!(meta.is_file());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "{}",
        written[0].display()
    );
    let report = mtrace_rs_tests::analyze(&written[0]);
    assert_eq!(
        report.held_by("leak_config"),
        (123, 1),
        "{}",
        report.summary()
    );
}

/// Wake-ups of the writer thread during one idle second of `tracer`'s run.
fn writer_wakeups(tracer: &Tracer, exe: &std::path::Path) -> u64 {
    let out = tracer.run(&mut Command::new(exe));
    assert!(out.status.success(), "writer_pace failed: {out:?}");
    let text = stdout(&out);
    text.trim()
        .strip_prefix("writer ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no writer thread seen: {text:?}"))
}

#[test]
fn the_writer_wakes_every_50_ms_sampled_and_every_10_ms_exact() {
    let scratch = Scratch::new("writer-pace");
    let exe = compile("tests/programs/writer_pace.c", scratch.path());
    // Each cycle is one sleep on a futex: one voluntary switch. A busy
    // machine can only delay the timer, so the upper bounds are firm; the
    // lower ones (100 expected) leave room for a loaded host, whose writer
    // may run late (never early).
    let sampled = writer_wakeups(&Tracer::default_rate(&scratch.dir("s")), &exe);
    assert!(
        sampled <= 30,
        "sampled: {sampled} wake-ups in 1 s (50 ms pace)"
    );
    let exact = writer_wakeups(&Tracer::exact(&scratch.dir("e")), &exe);
    assert!(exact >= 40, "exact: {exact} wake-ups in 1 s (10 ms pace)");
    // An explicit MTRACE_RS_FLUSH_MS holds in either mode.
    let slow = Tracer::exact(&scratch.dir("x")).env("MTRACE_RS_FLUSH_MS", "200");
    let slow = writer_wakeups(&slow, &exe);
    assert!(slow <= 8, "exact at 200 ms: {slow} wake-ups in 1 s");
    let fast = Tracer::default_rate(&scratch.dir("f")).env("MTRACE_RS_FLUSH_MS", "10");
    let fast = writer_wakeups(&fast, &exe);
    assert!(fast >= 40, "sampled at 10 ms: {fast} wake-ups in 1 s");
}
