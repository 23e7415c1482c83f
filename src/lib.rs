//! Helpers for the end-to-end tests in `tests/`: compile a small C or C++
//! program, run it under `libmtrace_rs.so`, and read the analyzer's JSON.
//!
//! The tests drive the release artifacts (`libmtrace_rs.so` and
//! `mtrace-analyze` in `target/release`), built by `scripts/test.sh` before
//! `cargo test`: a test binary cannot build a cdylib of its own workspace, and
//! the release build is what users preload. Each test works in its own
//! scratch directory, so tests run in parallel and a failing one leaves its
//! programs and traces behind for inspection (the path is printed).

use serde_json::Value;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a test says when the release artifacts are missing.
pub const MISSING_ARTIFACTS: &str = "run scripts/test.sh (it builds the release artifacts first)";

/// Every variable the tracer reads starts with this; tests clear inherited
/// ones so a developer's shell cannot change what a test sees.
const TRACER_VAR_PREFIX: &str = "MTRACE_RS_";

/// The fixed seed the tests sample with, so sampled runs repeat.
pub const SEED: &str = "12345";

/// How long one traced or untraced program may run before the test kills it
/// and fails: a hang in the tracer must fail one test, not stall CI. Far
/// above what any test program needs; `MTRACE_RS_TEST_TIMEOUT_SECS`
/// overrides it.
pub fn run_timeout() -> Duration {
    let secs = std::env::var("MTRACE_RS_TEST_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

/// The workspace root (this package lives there).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (relative to the
/// workspace root, as cargo reads it), else `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// The two release artifacts under test.
#[derive(Debug)]
pub struct Artifacts {
    /// `libmtrace_rs.so`, to put in `LD_PRELOAD`.
    pub preload: PathBuf,
    /// The `mtrace-analyze` binary.
    pub analyzer: PathBuf,
}

/// The release artifacts; panics with instructions when they are missing.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        let release = target_dir().join("release");
        let a = Artifacts {
            preload: release.join("libmtrace_rs.so"),
            analyzer: release.join("mtrace-analyze"),
        };
        for path in [&a.preload, &a.analyzer] {
            assert!(
                path.is_file(),
                "{} is missing: {MISSING_ARTIFACTS}",
                path.display()
            );
        }
        a
    })
}

/// A scratch directory for one test, under the system temp directory.
/// Removed when the test passes, kept (and its path printed) when it fails.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A new empty directory whose name starts with `name`.
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir()
            .join("mtrace-rs-tests")
            .join(format!("{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory, created on first use.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.path.join(name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failing test's files in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The directory of the test programs (`tests/programs`).
pub fn programs_dir() -> PathBuf {
    workspace_root().join("tests").join("programs")
}

/// Compiles `source` (a path relative to the workspace root, e.g.
/// `tests/programs/leaks.c` or `examples/leaky.c`) into `out_dir` and
/// returns the executable, named after the source file.
///
/// `-g -O2` is how people build what they profile. Sibling-call
/// optimization is off because `return malloc(n)` compiled into a jump would
/// hide the calling function from any unwinder; the programs also mark their
/// call sites `noipa` (see tests/programs/common.h).
pub fn compile(source: &str, out_dir: &Path) -> PathBuf {
    compile_with(source, out_dir, "", &[])
}

/// As [`compile`], with more compiler or linker flags, into an executable
/// whose name is the source's stem followed by `suffix`.
pub fn compile_with(source: &str, out_dir: &Path, suffix: &str, flags: &[&str]) -> PathBuf {
    let src = workspace_root().join(source);
    let stem = src
        .file_stem()
        .and_then(OsStr::to_str)
        .expect("source file name");
    let exe = out_dir.join(format!("{stem}{suffix}"));
    let cpp = matches!(src.extension().and_then(OsStr::to_str), Some("cpp" | "cc"));
    let mut cmd = Command::new(if cpp { "c++" } else { "cc" });
    cmd.args([
        "-g",
        "-O2",
        "-Wall",
        "-pthread",
        "-fno-optimize-sibling-calls",
    ])
    .arg(if cpp { "-std=c++17" } else { "-std=gnu11" })
    .args(flags)
    .arg("-I")
    .arg(programs_dir())
    .arg("-o")
    .arg(&exe)
    .arg(&src);
    bare(&mut cmd);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run the C compiler: {e}"));
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Removes the tracer from a command's environment: no `LD_PRELOAD`, no
/// inherited `MTRACE_RS_*`.
pub fn bare(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("LD_PRELOAD");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with(TRACER_VAR_PREFIX) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// How a command is traced: where its trace files go and which `MTRACE_RS_*`
/// variables it gets.
#[derive(Clone, Debug)]
pub struct Tracer {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Tracer {
    /// Traces into `dir` (created if missing) with the tracer's defaults
    /// (sampled at 512 KiB), but a fixed seed.
    pub fn default_rate(dir: &Path) -> Tracer {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let out = dir.join("trace.%p.bin").to_string_lossy().into_owned();
        Tracer {
            dir: dir.to_path_buf(),
            env: vec![
                ("MTRACE_RS_OUT".into(), out),
                ("MTRACE_RS_SEED".into(), SEED.into()),
            ],
        }
    }

    /// Exact mode: every allocation and free recorded.
    pub fn exact(dir: &Path) -> Tracer {
        Tracer::default_rate(dir).env("MTRACE_RS_SAMPLE_BYTES", "1")
    }

    /// Sampled at a mean of `rate` bytes, with the fixed seed.
    pub fn sampled(dir: &Path, rate: u64) -> Tracer {
        Tracer::default_rate(dir).env("MTRACE_RS_SAMPLE_BYTES", &rate.to_string())
    }

    /// Sets (or replaces) one variable. Set `MTRACE_RS_OUT` here, not on the
    /// command: [`Tracer::apply`] replaces the command's tracer variables.
    pub fn env(mut self, key: &str, value: &str) -> Tracer {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    /// Removes one variable, so the tracer uses its default.
    pub fn without(mut self, key: &str) -> Tracer {
        self.env.retain(|(k, _)| k != key);
        self
    }

    /// Where the trace files go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Puts the tracer into `cmd`'s environment.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        bare(cmd);
        cmd.env("LD_PRELOAD", &artifacts().preload);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `cmd` traced to completion, stdin closed, output captured.
    pub fn run(&self, cmd: &mut Command) -> Output {
        run(self.apply(cmd))
    }

    /// The trace files written so far, sorted by name.
    pub fn traces(&self) -> Vec<PathBuf> {
        trace_files(&self.dir)
    }

    /// The one trace file; panics if there is not exactly one.
    pub fn only_trace(&self) -> PathBuf {
        let traces = self.traces();
        assert_eq!(
            traces.len(),
            1,
            "expected one trace file in {}: {traces:?}",
            self.dir.display()
        );
        traces.into_iter().next().unwrap()
    }
}

/// Runs `cmd` to completion with stdin closed and output captured. Panics
/// if it runs longer than [`run_timeout`], after killing its process group
/// (the program and anything it started).
pub fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, run_timeout())
}

/// [`run`] with an explicit time limit.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if Instant::now() > deadline {
            // SIGKILL to the program, then to its whole process group, so
            // the pipes close and the drains end. `--` keeps procps kill from
            // reading the negative group id as an option.
            let _ = child.kill();
            let group = format!("-{}", child.id());
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &group])
                .status();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!("{cmd:?} still ran after {timeout:?}: killed; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Runs `cmd` without the tracer.
pub fn run_bare(cmd: &mut Command) -> Output {
    run(bare(cmd))
}

/// mtrace-rs trace files (`trace.PID[.N].bin`) in `dir`, sorted.
pub fn trace_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(OsStr::to_str).unwrap_or("");
            name.starts_with("trace.") && name.ends_with(".bin")
        })
        .collect();
    files.sort();
    files
}

/// The trace files of process `pid` in `dir`.
pub fn traces_of_pid(dir: &Path, pid: u32) -> Vec<PathBuf> {
    let prefix = format!("trace.{pid}.");
    trace_files(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect()
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One run of `mtrace-analyze`, whatever its outcome.
#[derive(Debug)]
pub struct Analysis {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Analysis {
    /// Panics if the analyzer panicked or died of a signal (the release
    /// profile aborts on panic, so a panic shows as SIGABRT).
    pub fn assert_no_panic(&self, what: &str) {
        assert!(
            self.status.code().is_some(),
            "mtrace-analyze died of a signal on {what} ({}); stderr:\n{}",
            self.status,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "mtrace-analyze panicked on {what}; stderr:\n{}",
            self.stderr
        );
    }

    /// The exit code (after [`Analysis::assert_no_panic`]).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// stdout parsed as one JSON object, if it is one.
    pub fn json(&self) -> Option<Report> {
        serde_json::from_str::<Value>(&self.stdout)
            .ok()
            .filter(Value::is_object)
            .map(|json| Report { json })
    }
}

/// Runs `mtrace-analyze` on `trace` with extra `args`.
pub fn analyze_raw<S: AsRef<OsStr>>(trace: &Path, args: &[S]) -> Analysis {
    let mut cmd = Command::new(&artifacts().analyzer);
    cmd.arg(trace).args(args);
    let out = run_bare(&mut cmd);
    Analysis {
        status: out.status,
        stdout: stdout(&out),
        stderr: stderr(&out),
    }
}

/// The JSON report of `trace`, every caller included. Panics if the
/// analyzer fails, panics, or prints something that is not JSON.
pub fn analyze(trace: &Path) -> Report {
    let a = analyze_raw(trace, &["--format", "json", "--top", "100000"]);
    a.assert_no_panic(&trace.display().to_string());
    assert!(
        a.status.success(),
        "mtrace-analyze {} failed ({}); stderr:\n{}",
        trace.display(),
        a.status,
        a.stderr
    );
    a.json().unwrap_or_else(|| {
        panic!(
            "mtrace-analyze {} printed no JSON object:\n{}",
            trace.display(),
            a.stdout
        )
    })
}

/// The analyzer's JSON report (see the analyzer's `--format json`).
#[derive(Clone, Debug)]
pub struct Report {
    pub json: Value,
}

/// Whether the analyzer's `function` names the function `name`: the same,
/// or the same followed by a C++ parameter list (`make_foo()`).
pub fn function_is(function: &str, name: &str) -> bool {
    function == name || (function.starts_with(name) && function[name.len()..].starts_with('('))
}

/// The last path component, for fields that may hold a full path.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl Report {
    /// The `trace` section.
    pub fn trace(&self) -> &Value {
        &self.json["trace"]
    }

    /// How the trace ended: "clean", "cut_off", "truncated" or "corrupt".
    pub fn ending(&self) -> &str {
        self.trace()["ending"].as_str().unwrap_or("<missing>")
    }

    /// The traced process's pid.
    pub fn pid(&self) -> u64 {
        self.trace()["pid"].as_u64().expect("trace.pid")
    }

    /// Total events dropped by the tracer.
    pub fn dropped(&self) -> u64 {
        self.trace()["dropped"]["total"].as_u64().unwrap_or(0)
    }

    /// Outstanding bytes over all callers.
    pub fn total_bytes(&self) -> u64 {
        self.json["totals"]["bytes"].as_u64().expect("totals.bytes")
    }

    /// Outstanding objects over all callers.
    pub fn total_objects(&self) -> u64 {
        self.json["totals"]["objects"]
            .as_u64()
            .expect("totals.objects")
    }

    /// Every caller, largest first.
    pub fn callers(&self) -> &[Value] {
        self.json["callers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The caller whose allocating function is `name`.
    pub fn caller(&self, name: &str) -> Option<&Value> {
        self.callers()
            .iter()
            .find(|c| c["function"].as_str().is_some_and(|f| function_is(f, name)))
    }

    /// Outstanding (bytes, objects) at `name`; (0, 0) when it holds nothing.
    pub fn held_by(&self, name: &str) -> (u64, u64) {
        self.caller(name).map_or((0, 0), |c| {
            (
                c["bytes"].as_u64().unwrap_or(0),
                c["objects"].as_u64().unwrap_or(0),
            )
        })
    }

    /// Callers whose allocating function lives in the module named `module`
    /// (matched on the basename).
    pub fn callers_in_module(&self, module: &str) -> Vec<&Value> {
        self.callers()
            .iter()
            .filter(|c| c["module"].as_str().is_some_and(|m| basename(m) == module))
            .collect()
    }

    /// A one-line-per-caller summary for assertion messages.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "trace: ending={} mode={} allocs={} frees={} dropped={}\n",
            self.ending(),
            self.trace()["mode"],
            self.trace()["allocs"],
            self.trace()["frees"],
            self.trace()["dropped"],
        );
        for c in self.callers() {
            s += &format!(
                "  {} bytes {} objects {} in {} ({})\n",
                c["function"], c["bytes"], c["objects"], c["module"], c["file"]
            );
        }
        s
    }
}

/// Whether a command is on `PATH`.
pub fn have_command(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "still ran after")]
    fn a_program_that_outlives_the_timeout_is_killed_with_its_children() {
        // The background sleep holds the pipes open: unless the whole
        // process group is killed, reading the output would never end.
        run_with_timeout(
            Command::new("sh").args(["-c", "sleep 100 & sleep 100"]),
            Duration::from_millis(500),
        );
    }
}
