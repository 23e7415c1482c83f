//! Processes and threads: a forked child and an exec'd program each get a
//! trace file of their own, and threads that exit before main does still
//! have their leaks reported.

use mtrace_rs_tests::{basename, compile, stdout, traces_of_pid, Report, Scratch, Tracer};
use std::process::Command;

/// The pid a program printed on a line "`tag` <pid>".
fn printed_pid(text: &str, tag: &str) -> u32 {
    text.lines()
        .find_map(|l| l.strip_prefix(tag)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{tag}' line in:\n{text}"))
}

fn exe_name(report: &Report) -> String {
    basename(report.trace()["exe"].as_str().unwrap_or("")).to_string()
}

#[test]
fn fork_and_exec_each_write_their_own_trace_with_their_own_leaks() {
    let scratch = Scratch::new("fork-exec");
    let exe = compile("tests/programs/fork_exec.c", scratch.path());
    let target = compile("tests/programs/exec_target.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(Command::new(&exe).arg(&target));
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let parent = printed_pid(&text, "parent ");
    let child = printed_pid(&text, "child ");
    assert_eq!(printed_pid(&text, "exec "), parent, "exec keeps the pid");

    let all = tracer.traces();
    assert_eq!(all.len(), 3, "parent, child and exec'd program: {all:?}");

    // The child: its own pid in the name and the header, the parent as
    // ppid, its own leak and none of the parent's.
    let child_traces = traces_of_pid(tracer.dir(), child);
    assert_eq!(child_traces.len(), 1, "{all:?}");
    let report = mtrace_rs_tests::analyze(&child_traces[0]);
    let summary = report.summary();
    assert_eq!(report.pid(), u64::from(child), "{summary}");
    assert_eq!(report.trace()["ppid"], parent, "{summary}");
    assert_eq!(report.held_by("leak_in_child"), (111, 1), "{summary}");
    assert_eq!(
        report.held_by("leak_parent_before_fork"),
        (0, 0),
        "{summary}"
    );
    assert_eq!(
        report.held_by("leak_parent_after_fork"),
        (0, 0),
        "{summary}"
    );

    // The parent's pid names two files: the image before exec and after.
    let same_pid = traces_of_pid(tracer.dir(), parent);
    assert_eq!(same_pid.len(), 2, "{all:?}");
    let reports: Vec<Report> = same_pid
        .iter()
        .map(|t| mtrace_rs_tests::analyze(t))
        .collect();
    let before = reports.iter().find(|r| exe_name(r) == "fork_exec");
    let after = reports.iter().find(|r| exe_name(r) == "exec_target");
    let (Some(before), Some(after)) = (before, after) else {
        panic!("expected one fork_exec and one exec_target trace: {reports:#?}");
    };

    let summary = before.summary();
    assert_eq!(before.pid(), u64::from(parent), "{summary}");
    // Not "killed or exited abruptly": the image before an exec ends at it.
    assert_eq!(before.ending(), "cut_off", "{summary}");
    let detail = before.trace()["ending_detail"].as_str().unwrap_or("");
    assert!(detail.starts_with("ended at exec"), "{detail:?}\n{summary}");
    assert_eq!(after.ending(), "clean", "{}", after.summary());
    assert_eq!(
        before.held_by("leak_parent_before_fork"),
        (333, 1),
        "{summary}"
    );
    assert_eq!(
        before.held_by("leak_parent_after_fork"),
        (444, 1),
        "{summary}"
    );
    assert_eq!(before.held_by("leak_in_child"), (0, 0), "{summary}");

    let summary = after.summary();
    assert_eq!(after.pid(), u64::from(parent), "{summary}");
    assert_eq!(after.ending(), "clean", "{summary}");
    assert_eq!(after.held_by("leak_after_exec"), (222, 1), "{summary}");
    assert!(after.callers_in_module("fork_exec").is_empty(), "{summary}");
}

#[test]
fn threads_that_exit_before_main_still_have_their_leaks_reported() {
    let scratch = Scratch::new("threads-exit");
    let exe = compile("tests/programs/threads_exit.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert!(out.status.success(), "{out:?}");

    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    let summary = report.summary();
    assert_eq!(report.ending(), "clean", "{summary}");
    assert_eq!(
        report.held_by("leak_in_joined_thread"),
        (555, 1),
        "{summary}"
    );
    assert_eq!(
        report.held_by("leak_in_short_thread"),
        (20 * 10, 20),
        "{summary}"
    );
    assert_eq!(
        report.held_by("leak_in_detached_thread"),
        (4321, 1),
        "{summary}"
    );

    // A thread-specific-data destructor runs during thread exit, possibly
    // after the tracer's own per-thread clean-up: its 20 leaks must be
    // either reported or counted as dropped, never silently lost.
    let (bytes, objects) = report.held_by("leak_in_key_destructor");
    assert_eq!(bytes, objects * 66, "{summary}");
    assert!(
        objects == 20 || report.dropped() >= 20 - objects,
        "{objects} of 20 destructor leaks reported and only {} events dropped:\n{summary}",
        report.dropped()
    );
}

/// A daemon-like program changes directory, closes every descriptor, then
/// puts a file of its own on every number the trace file may have had, and
/// goes on allocating past the room the trace file had: the tracer writes
/// nothing into the program's file (it checks that its descriptor is still
/// the trace file before each write) and opens its file again by its path
/// (a relative one here, made absolute when the file was created), so the
/// leaks from before and after the closing are both in the trace and
/// nothing is dropped.
#[test]
fn a_program_that_closes_every_descriptor_keeps_its_file_and_its_trace() {
    let scratch = Scratch::new("close-fds");
    let exe = compile("tests/programs/close_fds.c", scratch.path());
    let own = scratch.path().join("own.txt");
    let traces = scratch.dir("traces");
    let tracer = Tracer::exact(&traces).env("MTRACE_RS_OUT", "trace.%p.bin");
    let out = tracer.run(Command::new(&exe).arg(&own).current_dir(&traces));
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("own file intact"), "{text}");
    assert_eq!(std::fs::metadata(&own).unwrap().len(), 65536);

    let report = mtrace_rs_tests::analyze(&tracer.only_trace());
    let summary = report.summary();
    assert_eq!(
        report.held_by("leak_before_closing"),
        (5000, 10),
        "{summary}"
    );
    assert_eq!(
        report.held_by("leak_after_closing"),
        (100_000, 100),
        "{summary}"
    );
    assert_eq!(report.dropped(), 0, "{summary}");
    assert_eq!(report.ending(), "clean", "{summary}");
}
