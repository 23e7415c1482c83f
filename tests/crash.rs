//! A traced process killed with SIGKILL leaves a readable trace: everything
//! up to the last whole record, with at most about 100 ms of events missing.

use mtrace_rs_tests::{compile, Scratch, Tracer};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The program must have leaked at least this many objects before the kill,
/// so the check below means something.
const LEAKS_BEFORE_KILL: u64 = 500;
/// Events this old at the time of the kill must be in the file. The tracer
/// promises about 100 ms; the margin absorbs a noisy machine.
const GRACE: Duration = Duration::from_millis(200);

#[test]
fn sigkill_mid_run_leaves_a_cut_off_trace_with_everything_but_the_last_moments() {
    let scratch = Scratch::new("sigkill");
    let exe = compile("tests/programs/steady_leak.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let mut child = tracer
        .apply(&mut Command::new(&exe))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn steady_leak");

    // Progress lines ("leaked N") with the time we read them. A line read
    // at time t was printed no later than t, so "leaked N" read before
    // kill - GRACE proves N leaks happened at least GRACE before the kill.
    let (tx, rx) = mpsc::channel();
    let pipe = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let n: u64 = line
                .strip_prefix("leaked ")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if tx.send((Instant::now(), n)).is_err() {
                break;
            }
        }
    });
    let mut progress: Vec<(Instant, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.last().map_or(0, |p| p.1) < LEAKS_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "steady_leak made no progress: {progress:?}"
        );
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(p) => progress.push(p),
            Err(e) => panic!("steady_leak stopped printing ({e}): {:?}", child.try_wait()),
        }
    }
    // Let it run on for a moment, then kill it without warning.
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    child.kill().expect("SIGKILL");
    let status = child.wait().unwrap();
    reader.join().unwrap();
    progress.extend(rx.try_iter());
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    let proven = progress
        .iter()
        .filter(|(t, _)| *t + GRACE <= killed_at)
        .map(|p| p.1)
        .max()
        .unwrap_or(0);
    assert!(proven >= LEAKS_BEFORE_KILL, "progress: {progress:?}");

    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    let summary = report.summary();
    assert_eq!(report.ending(), "cut_off", "{summary}");
    let (bytes, objects) = report.held_by("leak_steady");
    assert!(
        objects >= proven,
        "the trace has {objects} leaks at leak_steady, but {proven} had happened {GRACE:?} before the kill:\n{summary}"
    );
    assert_eq!(bytes, objects * 1000, "{summary}");
    // The kill may fall between churn's malloc and its free: one block at
    // most can be outstanding there.
    assert!(report.held_by("churn").1 <= 1, "{summary}");
}
