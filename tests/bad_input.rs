//! The analyzer on files that are not whole traces: empty, foreign, from a
//! newer format, truncated, corrupted. It must answer with a one-line error
//! and exit code 2, or with a report that says how the file ends, and never
//! panic.

use mtrace_rs_tests::{analyze_raw, compile, Analysis, Scratch, Tracer};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn json_args() -> [&'static str; 2] {
    ["--format", "json"]
}

/// A rejected file: exit code 2, one line on stderr naming the file.
fn assert_rejected(a: &Analysis, what: &str, file: &Path) {
    a.assert_no_panic(what);
    assert_eq!(
        a.code(),
        2,
        "{what}: exit code; stdout:\n{}\nstderr:\n{}",
        a.stdout,
        a.stderr
    );
    let lines: Vec<&str> = a.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected a one-line error, got:\n{}",
        a.stderr
    );
    assert!(
        lines[0].starts_with("mtrace-analyze: "),
        "{what}: {}",
        lines[0]
    );
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        lines[0].contains(&*name),
        "{what}: the error should name the file: {}",
        lines[0]
    );
}

/// Where the whole records of a trace end: the header's `committed` field
/// (bytes 16..24, crates/format) past the 4096-byte header. The file itself
/// may be longer (the tracer grows its mapping in chunks), and damage past
/// this point would never be read.
fn records_end(bytes: &[u8]) -> usize {
    let committed = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    assert!(
        4096 + committed <= bytes.len(),
        "committed {committed} beyond the file"
    );
    4096 + committed
}

/// A real exact-mode trace of leaks.c (a few MB of events), for damaging.
fn real_trace(scratch: &Scratch) -> PathBuf {
    let exe = compile("tests/programs/leaks.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert!(out.status.success(), "{out:?}");
    tracer.only_trace()
}

#[test]
fn empty_random_and_foreign_files_get_a_one_line_error_and_exit_2() {
    let scratch = Scratch::new("bad-files");
    let dir = scratch.path();

    let empty = dir.join("empty.bin");
    fs::write(&empty, b"").unwrap();
    assert_rejected(&analyze_raw(&empty, &json_args()), "an empty file", &empty);
    assert_rejected(
        &analyze_raw(&empty, &[] as &[&str]),
        "an empty file (text)",
        &empty,
    );

    // Deterministic noise, 64 KiB.
    let mut x: u64 = 0x243f6a8885a308d3;
    let noise: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let random = dir.join("random.bin");
    fs::write(&random, &noise).unwrap();
    assert_rejected(&analyze_raw(&random, &json_args()), "random bytes", &random);

    let elf = dir.join("elf.bin");
    fs::copy(&mtrace_rs_tests::artifacts().analyzer, &elf).unwrap();
    assert_rejected(&analyze_raw(&elf, &json_args()), "an executable", &elf);

    // The right magic but a header cut short.
    let short = dir.join("short-header.bin");
    fs::write(&short, b"MTRACERS\x01\x00\x00\x00").unwrap();
    assert_rejected(
        &analyze_raw(&short, &json_args()),
        "a 12-byte header",
        &short,
    );

    let missing = dir.join("missing.bin");
    let a = analyze_raw(&missing, &json_args());
    a.assert_no_panic("a missing file");
    assert_ne!(a.code(), 0, "a missing file: {a:?}");
}

#[test]
fn a_trace_from_a_newer_format_version_is_refused_by_name() {
    let scratch = Scratch::new("newer-version");
    let real = real_trace(&scratch);
    let mut bytes = fs::read(&real).unwrap();
    // Bytes 8..12 hold the format version (crates/format).
    bytes[8..12].copy_from_slice(&999u32.to_le_bytes());
    let newer = scratch.path().join("newer.bin");
    fs::write(&newer, &bytes).unwrap();
    let a = analyze_raw(&newer, &json_args());
    assert_rejected(&a, "format version 999", &newer);
    assert!(
        a.stderr.contains("999"),
        "the error should say which version: {}",
        a.stderr
    );
}

#[test]
fn a_trace_truncated_in_the_middle_reports_what_was_read_and_says_truncated() {
    let scratch = Scratch::new("truncated");
    let real = real_trace(&scratch);
    let bytes = fs::read(&real).unwrap();
    let end = records_end(&bytes);
    assert!(
        end > 64 * 1024,
        "the trace is too small to cut: {end} bytes"
    );

    // Cut at several points, including mid-record at odd offsets.
    for fraction in [0.3, 0.5, 0.77] {
        let cut = (end as f64 * fraction) as usize | 1;
        let path = scratch.path().join(format!("cut-{cut}.bin"));
        fs::write(&path, &bytes[..cut]).unwrap();
        let what = format!("a trace cut at {cut} of {} bytes", bytes.len());
        let a = analyze_raw(&path, &json_args());
        a.assert_no_panic(&what);
        assert!(
            matches!(a.code(), 0 | 2),
            "{what}: exit code {}; {}",
            a.code(),
            a.stderr
        );
        let report = a
            .json()
            .unwrap_or_else(|| panic!("{what}: no report:\n{a:?}"));
        assert_eq!(
            report.ending(),
            "truncated",
            "{what}:\n{}",
            report.summary()
        );
        assert!(
            report.trace()["allocs"].as_u64().unwrap_or(0) > 0,
            "{what}: nothing read"
        );

        // The text report must also survive it.
        let text = analyze_raw(&path, &[] as &[&str]);
        text.assert_no_panic(&what);
        assert!(
            matches!(text.code(), 0 | 2),
            "{what} (text): {}",
            text.stderr
        );
    }
}

#[test]
fn corrupted_bytes_in_a_trace_never_make_the_analyzer_panic() {
    let scratch = Scratch::new("corrupt");
    let real = real_trace(&scratch);
    let bytes = fs::read(&real).unwrap();
    let len = records_end(&bytes);

    // A run of 0xff bytes three quarters in, where events dominate: every
    // varint that reads into it overflows, so the decoder must notice.
    let mut run = bytes.clone();
    let at = len * 3 / 4;
    run[at..at + 256].fill(0xff);
    let path = scratch.path().join("ff-run.bin");
    fs::write(&path, &run).unwrap();
    let a = analyze_raw(&path, &json_args());
    a.assert_no_panic("a run of 0xff bytes");
    assert_eq!(
        a.code(),
        2,
        "a run of 0xff bytes: stdout:\n{}\nstderr:\n{}",
        a.stdout,
        a.stderr
    );
    if let Some(report) = a.json() {
        assert_eq!(report.ending(), "corrupt", "{}", report.summary());
    } else {
        assert_eq!(a.stderr.lines().count(), 1, "{}", a.stderr);
    }

    // Single flipped bytes may or may not be detectable (a changed size is
    // still a size), but they must never crash the analyzer.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..24 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let pos = 4096 + (x as usize % (len - 4096));
        let mut damaged = bytes.clone();
        damaged[pos] ^= 1 << (i % 8);
        let path = scratch.path().join(format!("flip-{pos}.bin"));
        fs::write(&path, &damaged).unwrap();
        let what = format!("bit {} flipped at offset {pos}", i % 8);
        let a = analyze_raw(&path, &json_args());
        a.assert_no_panic(&what);
        assert!(
            matches!(a.code(), 0 | 2),
            "{what}: exit code {}: {}",
            a.code(),
            a.stderr
        );
        if a.code() == 0 {
            assert!(
                a.json().is_some(),
                "{what}: exit 0 without a report:\n{}",
                a.stdout
            );
        }
        fs::remove_file(&path).unwrap();
    }

    // Flips inside the header are either caught or harmless too.
    for pos in [0usize, 8, 12, 16, 20, 28, 36, 56, 63] {
        let mut damaged = bytes.clone();
        damaged[pos] ^= 0x80;
        let path = scratch.path().join(format!("header-{pos}.bin"));
        fs::write(&path, &damaged).unwrap();
        let a = analyze_raw(&path, &json_args());
        a.assert_no_panic(&format!("header byte {pos} flipped"));
        assert!(matches!(a.code(), 0 | 2), "header byte {pos}: {}", a.stderr);
        fs::remove_file(&path).unwrap();
    }
}
