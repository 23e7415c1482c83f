//! Java under the tracer, on java 17 and JDK 25 (each where installed): the
//! JVM runs exactly as untraced (same stdout, stderr and exit code) with
//! many threads, forked helpers and `jcmd` attaching, and in exact mode with
//! the agent (`-agentpath:libmtrace_rs.so`) and `-XX:+PreserveFramePointer`
//! the analyzer names the Java method behind a native leak, to the byte and
//! the object. The programs are tests/programs/*.java, compiled with the
//! JDK's own javac at test time; a JDK that is not installed is skipped
//! with a message.

use mtrace_rs_tests::{
    analyze, artifacts, bare, programs_dir, run, stderr, stdout, traces_of_pid, Report, Scratch,
    Tracer,
};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One installed JDK.
#[derive(Debug)]
struct Jdk {
    home: PathBuf,
    major: u32,
}

impl Jdk {
    /// The JDK (with javac) of feature version `major`, looked for in
    /// `JAVA_HOME`, under /usr/lib/jvm, and behind the `java` on PATH.
    fn find(major: u32) -> Option<Jdk> {
        let mut homes: Vec<PathBuf> = Vec::new();
        if let Some(home) = std::env::var_os("JAVA_HOME") {
            homes.push(home.into());
        }
        if let Ok(dir) = fs::read_dir("/usr/lib/jvm") {
            let mut found: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
            found.sort();
            homes.extend(found);
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if let Ok(java) = fs::canonicalize(dir.join("java")) {
                    if let Some(home) = java.parent().and_then(Path::parent) {
                        homes.push(home.to_path_buf());
                    }
                }
            }
        }
        homes
            .into_iter()
            .filter_map(|h| fs::canonicalize(h).ok())
            .filter(|h| h.join("bin/java").is_file() && h.join("bin/javac").is_file())
            .find_map(|home| {
                let found = Jdk::major_of(&home)?;
                (found == major).then_some(Jdk { home, major })
            })
    }

    /// The feature version from the JDK's `release` file
    /// (`JAVA_VERSION="17.0.15"`).
    fn major_of(home: &Path) -> Option<u32> {
        let release = fs::read_to_string(home.join("release")).ok()?;
        let version = release
            .lines()
            .find_map(|l| l.strip_prefix("JAVA_VERSION="))?
            .trim_matches('"');
        let first = version.split(['.', '-', '+']).next()?;
        match first.parse().ok()? {
            1 => version.split('.').nth(1)?.parse().ok(), // 1.8.0
            n => Some(n),
        }
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.home.join("bin").join(name)
    }

    /// Compiles tests/programs/`class`.java into a directory of its own
    /// and returns that directory (the class path).
    fn compile(&self, class: &str, scratch: &Scratch) -> PathBuf {
        let out = scratch.dir(&format!("classes-{}", self.major));
        let mut cmd = Command::new(self.tool("javac"));
        cmd.arg("-nowarn")
            .arg("-d")
            .arg(&out)
            .arg(programs_dir().join(format!("{class}.java")));
        let result = run(bare(&mut cmd));
        assert!(
            result.status.success(),
            "javac {class}.java (JDK {}) failed:\n{}",
            self.major,
            stderr(&result)
        );
        out
    }

    /// `java` running `class` from `classes` with `flags`, in `cwd`. JDK 23
    /// and later print a warning on the first use of sun.misc.Unsafe's
    /// memory methods unless told they are allowed.
    fn java(&self, classes: &Path, flags: &[String], class: &str, cwd: &Path) -> Command {
        let mut cmd = Command::new(self.tool("java"));
        if self.major >= 23 {
            cmd.arg("--sun-misc-unsafe-memory-access=allow");
        }
        cmd.current_dir(cwd)
            .args(flags)
            .arg("-cp")
            .arg(classes)
            .arg(class);
        cmd
    }
}

/// The JDK of version `major`, or `None` after saying why the test skips.
fn jdk_or_skip(major: u32) -> Option<Jdk> {
    let jdk = Jdk::find(major);
    if jdk.is_none() {
        eprintln!(
            "skipped: no JDK {major} with javac under JAVA_HOME, /usr/lib/jvm or PATH \
             (scripts/test.sh installs the default JDK)"
        );
    }
    jdk
}

/// The flags that give the deepest stacks: the tracer as a JVMTI agent
/// (names JIT-compiled methods as they are compiled) and frame pointers kept
/// in JIT code (the unwinder crosses it).
fn agent_flags() -> Vec<String> {
    vec![
        format!("-agentpath:{}", artifacts().preload.display()),
        "-XX:+PreserveFramePointer".into(),
    ]
}

/// Flags that make a small method's native allocations attributable: the
/// method stays a frame of its own (C2 would inline it into its caller),
/// and -Xbatch makes each thread wait for the compilation it triggered, so
/// a method called thousands of times is compiled before the test's leaks
/// happen (an interpreted frame shows as "[jvm] Interpreter", nameless).
fn compiled_method_flags(method: &str) -> Vec<String> {
    vec![
        "-Xbatch".into(),
        "-XX:CompileCommand=quiet".into(),
        format!("-XX:CompileCommand=dontinline,{method}"),
    ]
}

fn assert_same(what: &str, untraced: &Output, traced: &Output) {
    assert_eq!(
        stdout(traced),
        stdout(untraced),
        "{what}: stdout differs; stderr:\n{}",
        stderr(traced)
    );
    assert_eq!(stderr(traced), stderr(untraced), "{what}: stderr differs");
    assert_eq!(
        traced.status.code(),
        untraced.status.code(),
        "{what}: exit status ({:?} untraced, {:?} traced)",
        untraced.status,
        traced.status
    );
}

/// The trace of the JVM the test started itself (not of a helper it ran):
/// the one whose parent is this test process.
fn own_trace(tracer: &Tracer) -> (PathBuf, Report) {
    let me = u64::from(std::process::id());
    let mine: Vec<(PathBuf, Report)> = tracer
        .traces()
        .into_iter()
        .map(|t| {
            let r = analyze(&t);
            (t, r)
        })
        .filter(|(_, r)| r.trace()["ppid"].as_u64() == Some(me))
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "expected one trace of the JVM in {}: {:?}",
        tracer.dir().display(),
        tracer.traces()
    );
    mine.into_iter().next().unwrap()
}

/// The callers whose function names `method` (e.g. `encodeOnDisconnect`).
fn callers_naming<'r>(report: &'r Report, method: &str) -> Vec<&'r serde_json::Value> {
    report
        .callers()
        .iter()
        .filter(|c| c["function"].as_str().is_some_and(|f| f.contains(method)))
        .collect()
}

/// "word <bytes> <objects>" from the program's output.
fn printed_figures(out: &str, word: &str) -> (u64, u64) {
    out.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [w, bytes, objects] if w == word => {
                    Some((bytes.parse().ok()?, objects.parse().ok()?))
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no \"{word} <bytes> <objects>\" line in:\n{out}"))
}

/// Asserts the one caller named after `method` holds exactly `expected`
/// (bytes, objects), with the JVM's native allocation frames folded into it.
fn assert_held_by_method(what: &str, report: &Report, method: &str, expected: (u64, u64)) {
    let summary = report.summary();
    assert_eq!(report.trace()["mode"], "exact", "{what}:\n{summary}");
    assert_eq!(report.ending(), "clean", "{what}:\n{summary}");
    assert_eq!(report.dropped(), 0, "{what}: dropped events:\n{summary}");
    let found = callers_naming(report, method);
    assert_eq!(
        found.len(),
        1,
        "{what}: expected one caller naming {method} (interpreted frames show as \
         \"[jvm] Interpreter\"):\n{summary}"
    );
    let caller = found[0];
    assert_eq!(
        (caller["bytes"].as_u64(), caller["objects"].as_u64()),
        (Some(expected.0), Some(expected.1)),
        "{what}: {method} (bytes, objects):\n{summary}"
    );
    assert_eq!(caller["estimated"], false, "{what}:\n{summary}");
    // The walk went from malloc through libjvm.so's Unsafe entry into JIT
    // code: the folded frames are still in the stack.
    let stack: Vec<&str> = caller["stack"]
        .as_array()
        .map(|s| s.iter().filter_map(|f| f["function"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        stack.iter().any(|f| f.contains("allocateMemory")),
        "{what}: no Unsafe allocation frame under {method}: {stack:?}"
    );
}

// 1(a): native memory leaked through sun.misc.Unsafe on one path.

/// What OffHeapLeak.java leaks: 4 threads x 25 blocks of
/// 1024 + 64 * thread + 8 * i bytes.
fn off_heap_leak_expected() -> (u64, u64) {
    let bytes = (0..4u64)
        .flat_map(|t| (0..25u64).map(move |i| 1024 + 64 * t + 8 * i))
        .sum();
    (bytes, 100)
}

fn unsafe_leak_is_named_exactly(major: u32) {
    let Some(jdk) = jdk_or_skip(major) else {
        return;
    };
    let scratch = Scratch::new(&format!("jvm{major}-offheap"));
    let classes = jdk.compile("OffHeapLeak", &scratch);
    let flags = compiled_method_flags("OffHeapLeak::encodeOnDisconnect");

    let cwd = scratch.dir("cwd");
    let untraced = run(bare(&mut jdk.java(&classes, &flags, "OffHeapLeak", &cwd)));
    assert!(untraced.status.success(), "untraced: {untraced:?}");

    let tracer = Tracer::exact(&scratch.dir("traces"));
    let traced_flags = [agent_flags(), flags].concat();
    let traced = tracer.run(&mut jdk.java(&classes, &traced_flags, "OffHeapLeak", &cwd));
    let what = format!("OffHeapLeak on JDK {major}");
    assert_same(&what, &untraced, &traced);

    let expected = off_heap_leak_expected();
    assert_eq!(printed_figures(&stdout(&traced), "leaked"), expected);
    let report = analyze(&tracer.only_trace());
    assert_held_by_method(&what, &report, "encodeOnDisconnect", expected);
    // The path that frees holds nothing.
    assert!(
        callers_naming(&report, "encodeOnMessage").is_empty(),
        "{what}: encodeOnMessage frees all it allocates:\n{}",
        report.summary()
    );
}

#[test]
fn unsafe_leak_on_disconnect_is_named_with_exact_bytes_and_count_on_java_17() {
    unsafe_leak_is_named_exactly(17);
}

#[test]
fn unsafe_leak_on_disconnect_is_named_with_exact_bytes_and_count_on_jdk_25() {
    unsafe_leak_is_named_exactly(25);
}

// 1(b): direct ByteBuffers kept.

fn kept_direct_buffers_are_exact(major: u32) {
    let Some(jdk) = jdk_or_skip(major) else {
        return;
    };
    let scratch = Scratch::new(&format!("jvm{major}-direct"));
    let classes = jdk.compile("DirectBuffers", &scratch);
    let flags = [
        vec!["-XX:MaxDirectMemorySize=1g".to_string()],
        compiled_method_flags("DirectBuffers::openChannelBuffer"),
    ]
    .concat();

    let cwd = scratch.dir("cwd");
    let untraced = run(bare(&mut jdk.java(&classes, &flags, "DirectBuffers", &cwd)));
    assert!(untraced.status.success(), "untraced: {untraced:?}");

    let tracer = Tracer::exact(&scratch.dir("traces"));
    let traced_flags = [agent_flags(), flags].concat();
    let traced = tracer.run(&mut jdk.java(&classes, &traced_flags, "DirectBuffers", &cwd));
    let what = format!("DirectBuffers on JDK {major}");
    assert_same(&what, &untraced, &traced);

    // 4 threads x 16 buffers of 65536 + 4096 * thread + 8 * i bytes, all
    // multiples of 8, so malloc is asked for exactly the capacity.
    let capacity: u64 = (0..4u64)
        .flat_map(|t| (0..16u64).map(move |i| 65536 + 4096 * t + 8 * i))
        .sum();
    assert_eq!(
        printed_figures(&stdout(&traced), "kept"),
        (capacity, 64),
        "{what}"
    );
    let report = analyze(&tracer.only_trace());
    assert_held_by_method(&what, &report, "openChannelBuffer", (capacity, 64));
}

#[test]
fn kept_direct_byte_buffers_are_exact_at_their_java_caller_on_java_17() {
    kept_direct_buffers_are_exact(17);
}

#[test]
fn kept_direct_byte_buffers_are_exact_at_their_java_caller_on_jdk_25() {
    kept_direct_buffers_are_exact(25);
}

// 1(c): sampled mode, many threads started and ended.

fn thread_churn_runs_as_untraced(major: u32) {
    let Some(jdk) = jdk_or_skip(major) else {
        return;
    };
    let scratch = Scratch::new(&format!("jvm{major}-threads"));
    let classes = jdk.compile("ThreadChurn", &scratch);
    let cwd = scratch.dir("cwd");
    let untraced = run(bare(&mut jdk.java(&classes, &[], "ThreadChurn", &cwd)));
    assert_eq!(untraced.status.code(), Some(7), "untraced: {untraced:?}");

    // The default rate, as in production: plain, and with the agent and
    // frame pointers (the unwinder then walks through JIT frames).
    for (name, flags) in [("plain", vec![]), ("agent", agent_flags())] {
        let tracer = Tracer::default_rate(&scratch.dir(&format!("traces-{name}")));
        let traced = tracer.run(&mut jdk.java(&classes, &flags, "ThreadChurn", &cwd));
        let what = format!("ThreadChurn on JDK {major} ({name}, sampled)");
        assert_same(&what, &untraced, &traced);
        let report = analyze(&tracer.only_trace());
        assert_eq!(report.trace()["mode"], "sampled", "{what}");
        assert_eq!(report.ending(), "clean", "{what}:\n{}", report.summary());
        assert!(
            report.trace()["allocs"].as_u64().unwrap_or(0) > 0,
            "{what}: nothing sampled:\n{}",
            report.summary()
        );
    }
}

#[test]
fn many_threads_started_and_ended_run_as_untraced_when_sampled_on_java_17() {
    thread_churn_runs_as_untraced(17);
}

#[test]
fn many_threads_started_and_ended_run_as_untraced_when_sampled_on_jdk_25() {
    thread_churn_runs_as_untraced(25);
}

// 1(d): the JVM starts helper processes.

fn forked_helpers_are_traced(major: u32) {
    let Some(jdk) = jdk_or_skip(major) else {
        return;
    };
    let scratch = Scratch::new(&format!("jvm{major}-fork"));
    let classes = jdk.compile("ForkHelper", &scratch);
    let cwd = scratch.dir("cwd");
    // The default launch mechanism (posix_spawn of jspawnhelper, which
    // execs the command) and fork + exec.
    for mechanism in ["default", "FORK"] {
        let flags: Vec<String> = match mechanism {
            "default" => vec![],
            m => vec![format!("-Djdk.lang.Process.launchMechanism={m}")],
        };
        let untraced = run(bare(&mut jdk.java(&classes, &flags, "ForkHelper", &cwd)));
        assert_eq!(untraced.status.code(), Some(5), "untraced: {untraced:?}");
        assert!(
            stdout(&untraced).contains("helper said: from the helper"),
            "{untraced:?}"
        );

        let tracer = Tracer::default_rate(&scratch.dir(&format!("traces-{mechanism}")));
        let traced = tracer.run(&mut jdk.java(&classes, &flags, "ForkHelper", &cwd));
        let what = format!("ForkHelper on JDK {major} ({mechanism} launch)");
        assert_same(&what, &untraced, &traced);

        // Every file reads; the JVM's ends cleanly; each helper that ran
        // to its exit has a clean file of its own (the images that exec'd
        // it, jspawnhelper or the forked JVM, end at the exec).
        let (_, jvm) = own_trace(&tracer);
        assert_eq!(jvm.ending(), "clean", "{what}:\n{}", jvm.summary());
        let jvm_pid = jvm.pid();
        let mut helpers = Vec::new();
        for trace in tracer.traces() {
            let report = analyze(&trace);
            let exe = report.trace()["exe"].as_str().unwrap_or("").to_string();
            if report.trace()["ppid"].as_u64() == Some(jvm_pid) && report.ending() == "clean" {
                helpers.push(mtrace_rs_tests::basename(&exe).to_string());
            }
        }
        helpers.sort();
        assert_eq!(
            helpers,
            ["echo", "false", "true"],
            "{what}: helper traces in {}",
            tracer.dir().display()
        );
    }
}

#[test]
fn helpers_started_by_the_jvm_are_traced_and_its_exit_code_kept_on_java_17() {
    forked_helpers_are_traced(17);
}

#[test]
fn helpers_started_by_the_jvm_are_traced_and_its_exit_code_kept_on_jdk_25() {
    forked_helpers_are_traced(25);
}

// 1(e): jcmd attaches to a traced JVM.

/// A spawned WaitForAttach JVM, killed with its process group if the test
/// ends before it does.
struct Waiting {
    child: Child,
    pid: u32,
    reader: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Waiting {
    /// Starts WaitForAttach (traced when `tracer` is given) and waits for
    /// its "ready" line.
    fn start(jdk: &Jdk, classes: &Path, cwd: &Path, tracer: Option<&Tracer>) -> Waiting {
        use std::os::unix::process::CommandExt;
        let flags = if tracer.is_some() {
            agent_flags()
        } else {
            vec![]
        };
        let mut cmd = jdk.java(classes, &flags, "WaitForAttach", cwd);
        match tracer {
            Some(t) => t.apply(&mut cmd),
            None => bare(&mut cmd),
        };
        let child = cmd
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the JVM");
        let mut w = Waiting {
            child,
            pid: 0,
            reader: None,
        };
        // "pid N", then "ready". A reader thread, so a JVM that never gets
        // there fails the test instead of blocking it.
        let out = w.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        w.reader = Some(std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(out).lines() {
                let line = line.unwrap_or_default();
                if line == "ready" {
                    let _ = tx.send(lines.clone());
                }
                lines.push(line);
            }
            lines
        }));
        let before = rx
            .recv_timeout(mtrace_rs_tests::run_timeout())
            .unwrap_or_else(|_| {
                panic!(
                    "WaitForAttach (JDK {}, traced: {}) never printed \"ready\"",
                    jdk.major,
                    tracer.is_some()
                )
            });
        w.pid = before
            .iter()
            .find_map(|l| l.strip_prefix("pid ")?.parse().ok())
            .unwrap_or_else(|| panic!("no pid line: {before:?}"));
        w
    }

    /// The signals the process has handlers for (`SigCgt` in
    /// /proc/PID/status).
    fn caught_signals(&self) -> String {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_else(|e| panic!("read /proc/{}/status: {e}", self.pid));
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    }

    /// Sends the line that lets the JVM exit; returns its exit status,
    /// stdout lines and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        let mut stdin = self.child.stdin.take().unwrap();
        let _ = stdin.write_all(b"go\n");
        drop(stdin);
        let deadline = Instant::now() + mtrace_rs_tests::run_timeout();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the JVM") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "WaitForAttach (pid {}) did not exit after \"go\"",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let lines = self.reader.take().unwrap().join().expect("stdout reader");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status, lines, err)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &group])
                .status();
            let _ = self.child.wait();
        }
    }
}

fn jcmd_attaches(major: u32) {
    let Some(jdk) = jdk_or_skip(major) else {
        return;
    };
    let scratch = Scratch::new(&format!("jvm{major}-jcmd"));
    let classes = jdk.compile("WaitForAttach", &scratch);
    let cwd = scratch.dir("cwd");

    // The JVM's own signal handlers, untraced: HotSpot owns SIGSEGV, SIGBUS,
    // SIGQUIT (jcmd's attach request) and more, and the tracer (preloaded
    // and as an agent) must install none of its own.
    let untraced = Waiting::start(&jdk, &classes, &cwd, None);
    let untraced_signals = untraced.caught_signals();
    let (status, _, _) = untraced.finish();
    assert_eq!(status.code(), Some(3), "untraced WaitForAttach");

    let tracer = Tracer::default_rate(&scratch.dir("traces"));
    let jvm = Waiting::start(&jdk, &classes, &cwd, Some(&tracer));
    let pid = jvm.pid;
    let traced_signals = jvm.caught_signals();
    let jcmd = run(bare(
        Command::new(jdk.tool("jcmd"))
            .current_dir(&cwd)
            .arg(pid.to_string())
            .arg("VM.version"),
    ));
    // Let the JVM exit whatever jcmd said, so its trace can be read.
    let (status, lines, err) = jvm.finish();

    let jcmd_out = stdout(&jcmd);
    assert!(
        jcmd.status.success() && jcmd_out.contains(&format!("JDK {major}.")),
        "jcmd {pid} VM.version on the traced JVM (JDK {major}) failed ({}):\n{jcmd_out}\n{}\n\
         JVM stderr:\n{err}",
        jcmd.status,
        stderr(&jcmd)
    );
    assert_eq!(
        traced_signals, untraced_signals,
        "the traced JVM catches other signals than the untraced one (SigCgt)"
    );
    assert_eq!(status.code(), Some(3), "JVM exit; stderr:\n{err}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("got go"),
        "{lines:?}"
    );
    assert!(err.is_empty(), "the JVM printed on stderr:\n{err}");

    let traces = traces_of_pid(tracer.dir(), pid);
    assert_eq!(traces.len(), 1, "{traces:?}");
    let report = analyze(&traces[0]);
    assert_eq!(report.ending(), "clean", "{}", report.summary());
}

#[test]
fn jcmd_attaches_to_a_traced_jvm_that_keeps_its_own_signal_handlers_on_java_17() {
    jcmd_attaches(17);
}

#[test]
fn jcmd_attaches_to_a_traced_jvm_that_keeps_its_own_signal_handlers_on_jdk_25() {
    jcmd_attaches(25);
}
