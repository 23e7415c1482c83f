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
