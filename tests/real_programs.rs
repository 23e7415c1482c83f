//! Programs nobody here wrote, traced in exact mode and at the default rate:
//! they must behave exactly as untraced (same stdout, stderr and exit
//! code), and the analyzer must read every trace they leave (one per
//! process: git and gcc run several). A tool that is not installed is
//! skipped with a message; scripts/test.sh installs them.

use mtrace_rs_tests::{have_command, run_bare, stderr, stdout, Scratch, Tracer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Builds the command to run, in a fresh working directory `cwd`.
type Build<'a> = &'a dyn Fn(&Path) -> Command;

/// Runs `build` bare, exact and at the default rate, each in its own working
/// directory, and compares. Returns the trace files of the traced runs.
fn behaves_as_untraced(scratch: &Scratch, name: &str, build: Build) -> Vec<PathBuf> {
    let bare_cwd = scratch.dir("bare");
    let bare = run_bare(&mut build(&bare_cwd));
    let modes = [
        ("exact", Tracer::exact(&scratch.dir("exact-traces"))),
        (
            "default",
            Tracer::default_rate(&scratch.dir("default-traces")),
        ),
    ];
    let mut traces = Vec::new();
    for (mode, tracer) in &modes {
        let cwd = scratch.dir(&format!("{mode}-cwd"));
        let traced = tracer.run(&mut build(&cwd));
        assert_same(&format!("{name} ({mode})"), &bare, &traced);
        let found = tracer.traces();
        assert!(!found.is_empty(), "{name} ({mode}): no trace file");
        traces.extend(found);
    }
    traces
}

fn assert_same(what: &str, bare: &Output, traced: &Output) {
    assert_eq!(
        stdout(traced),
        stdout(bare),
        "{what}: stdout differs; stderr:\n{}",
        stderr(traced)
    );
    assert_eq!(stderr(traced), stderr(bare), "{what}: stderr differs");
    assert_eq!(
        traced.status.code(),
        bare.status.code(),
        "{what}: exit status"
    );
    assert!(
        bare.status.success(),
        "{what}: fails even untraced: {bare:?}"
    );
}

/// Every trace reads: a complete one, or one that at least holds events,
/// or one whose process image was replaced by exec (the format calls that
/// cut off: the END record belongs to the image that exits; a child forked
/// only to exec allocates nothing before it).
fn all_traces_read(name: &str, traces: &[PathBuf]) {
    for trace in traces {
        let report = mtrace_rs_tests::analyze(trace);
        let allocs = report.trace()["allocs"].as_u64().unwrap_or(0);
        let exec = report.trace()["marks"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["what"] == "exec"));
        assert!(
            report.ending() == "clean" || allocs > 0 || exec,
            "{name}: {} ended {} with no allocations:\n{}",
            trace.display(),
            report.ending(),
            report.summary()
        );
    }
    eprintln!("{name}: {} trace files read", traces.len());
}

fn skip_without(tool: &str) -> bool {
    if have_command(tool) {
        return false;
    }
    eprintln!("skipped: {tool} is not installed (scripts/test.sh installs it)");
    true
}

#[test]
fn python3_runs_as_untraced() {
    // The Debian interpreter rather than a version-manager shim, so the
    // trace is of Python rather than of the shim's shell scripts.
    let python = if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    if skip_without("python3") {
        return;
    }
    let scratch = Scratch::new("python3");
    let script = "import json, hashlib\n\
                  d = {str(i): [i] * 10 for i in range(20000)}\n\
                  print(len(json.dumps(d)))\n\
                  print(hashlib.sha256(b'x' * 100000).hexdigest())\n\
                  print(sorted(set('mtrace-rs')))";
    let traces = behaves_as_untraced(&scratch, "python3", &|cwd| {
        let mut c = Command::new(python);
        c.current_dir(cwd).args(["-c", script]);
        c
    });
    all_traces_read("python3", &traces);
}

#[test]
fn git_init_add_commit_and_log_run_as_untraced() {
    if skip_without("git") {
        return;
    }
    let scratch = Scratch::new("git");
    let script = "git --version && git init -q repo && cd repo && printf 'hello\\n' > f \
                  && git add f && git -c user.name=t -c user.email=t@example.com commit -q -m first \
                  && git log --format=%s && git status --porcelain";
    let traces = behaves_as_untraced(&scratch, "git", &|cwd| {
        let mut c = Command::new("sh");
        c.current_dir(cwd)
            .args(["-c", script])
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
        c
    });
    all_traces_read("git", &traces);
}

#[test]
fn sqlite3_in_memory_queries_run_as_untraced() {
    if skip_without("sqlite3") {
        return;
    }
    let scratch = Scratch::new("sqlite3");
    let sql = "create table t(a integer primary key, b text);\
               with recursive c(x) as (select 1 union all select x + 1 from c where x < 20000)\
               insert into t(b) select printf('row %d', x) from c;\
               create index tb on t(b);\
               select count(*), sum(length(b)), max(b) from t;\
               delete from t where a % 3 = 0;\
               select count(*) from t;";
    let traces = behaves_as_untraced(&scratch, "sqlite3", &|cwd| {
        let mut c = Command::new("sqlite3");
        c.current_dir(cwd).args([":memory:", sql]);
        c
    });
    all_traces_read("sqlite3", &traces);
}

#[test]
fn gcc_compiles_a_file_as_untraced() {
    if skip_without("gcc") {
        return;
    }
    let scratch = Scratch::new("gcc");
    let source = scratch.path().join("small.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n#include <stdlib.h>\n\
         struct node { int v; struct node *next; };\n\
         int sum(struct node *n) { int s = 0; for (; n; n = n->next) s += n->v; return s; }\n\
         int main(void) { struct node *n = malloc(sizeof *n); n->v = 1; n->next = 0;\n\
         printf(\"%d\\n\", sum(n)); free(n); return 0; }\n",
    )
    .unwrap();
    let traces = behaves_as_untraced(&scratch, "gcc", &|cwd| {
        let mut c = Command::new("gcc");
        c.current_dir(cwd)
            .args(["-O2", "-g", "-c"])
            .arg(&source)
            .args(["-o", "small.o"]);
        c
    });
    for mode in ["bare", "exact-cwd", "default-cwd"] {
        let object = scratch.path().join(mode).join("small.o");
        assert!(
            object.is_file(),
            "gcc ({mode}) wrote no {}",
            object.display()
        );
    }
    all_traces_read("gcc", &traces);
}

#[test]
fn java_version_runs_as_untraced() {
    if skip_without("java") {
        return;
    }
    let scratch = Scratch::new("java");
    let traces = behaves_as_untraced(&scratch, "java", &|cwd| {
        let mut c = Command::new("java");
        c.current_dir(cwd).arg("-version");
        c
    });
    all_traces_read("java", &traces);
}
