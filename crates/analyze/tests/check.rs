//! Tests of the CI leak check (`mtrace-analyze check` and `run`): synthetic
//! traces with and without the tracer's SCAN record, checked through the
//! library (with a synthetic symbolizer) and through the binary (exit codes,
//! JUnit XML, JSON), and one end-to-end run of a small C test suite under
//! the real tracer when it is built.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::FakeSymbolizer;
use mtrace_analyze::analysis::read_trace;
use mtrace_analyze::check::{
    CheckOptions, CheckResult, Checker, Reach, Status, Verdict, EXIT_CLEAN, EXIT_ERROR,
    EXIT_KILLED, EXIT_LEAKS,
};
use mtrace_analyze::junit::write_junit;
use mtrace_analyze::suppress::{Suppressions, DEFAULT_SUPPRESSIONS};
use mtrace_format::{mark, Encoder, Header, Module, FLAG_CLEAN_END, HEADER_SIZE};

/// Builds a trace file; unlike the shared builder it can write SCAN.
struct T {
    enc: Encoder,
    body: Vec<u8>,
    header: Header,
}

// Return addresses of the synthetic program.
const LEAK_FN: u64 = 0x5000_1000; // leak_unreachable in suite.c
const KEEP_FN: u64 = 0x5000_2000; // leak_reachable in suite.c
const MAIN_FN: u64 = 0x5000_3000; // main in suite.c
const STDIO_FN: u64 = 0x7000_1000; // _IO_file_doallocate in libc.so.6
const JVM_FN: u64 = 0x7100_1000; // Arena::grow in libjvm.so
const JNI_FN: u64 = 0x7200_1000; // Java_Foo_leak in libfoo.so (called from libjvm)
const CALL_STUB: u64 = 0x7100_2000; // JavaCalls::call_helper in libjvm.so

fn symbols() -> FakeSymbolizer {
    FakeSymbolizer::default()
        .with(
            LEAK_FN,
            &[("leak_unreachable", "/src/suite.c", 12, "suite")],
        )
        .with(KEEP_FN, &[("leak_reachable", "/src/suite.c", 20, "suite")])
        .with(MAIN_FN, &[("main", "/src/suite.c", 40, "suite")])
        .with(
            STDIO_FN,
            &[("_IO_file_doallocate", "filedoalloc.c", 101, "libc.so.6")],
        )
        .with(
            JVM_FN,
            &[("Arena::grow(unsigned long)", "", 0, "libjvm.so")],
        )
        .with(JNI_FN, &[("Java_Foo_leak", "foo.c", 7, "libfoo.so")])
        .with(CALL_STUB, &[("JavaCalls::call_helper", "", 0, "libjvm.so")])
}

impl T {
    fn new(pid: u32) -> T {
        T {
            enc: Encoder::new(),
            body: Vec::new(),
            header: Header {
                version: mtrace_format::FORMAT_VERSION,
                committed: 0,
                flags: 0,
                pid,
                ppid: 1,
                max_depth: 64,
                start_realtime_ns: 1_795_638_667_000_000_000 + pid as u64,
                start_monotonic_ns: 1_000,
                sample_rate: 1,
            },
        }
        .program("/src/suite", &["./suite", "--case"])
        .module("/src/suite", 0x5000_0000)
        .module("/lib/libc.so.6", 0x7000_0000)
        .module("/jdk/lib/server/libjvm.so", 0x7100_0000)
        .module("/app/libfoo.so", 0x7200_0000)
        .stack(1, &[LEAK_FN, MAIN_FN])
        .stack(2, &[KEEP_FN, MAIN_FN])
        .stack(3, &[STDIO_FN, MAIN_FN])
        .stack(4, &[JVM_FN, CALL_STUB])
        .stack(5, &[JNI_FN, CALL_STUB])
    }

    fn program(mut self, exe: &str, args: &[&str]) -> T {
        self.enc.info(&mut self.body, b"exe", exe.as_bytes());
        self.enc
            .info(&mut self.body, b"cmdline", args.join("\0").as_bytes());
        self
    }

    fn module(mut self, path: &str, start: u64) -> T {
        let m = Module {
            ts: 0,
            bias: start,
            path: path.as_bytes().to_vec(),
            build_id: Vec::new(),
            segments: vec![(start, 0x10_0000)],
        };
        self.enc.module(&mut self.body, &m);
        self
    }

    fn stack(mut self, id: u64, frames: &[u64]) -> T {
        self.enc.stack(&mut self.body, id, frames);
        self
    }

    fn alloc(mut self, ts: u64, addr: u64, size: u64, stack: u64) -> T {
        self.enc.alloc(&mut self.body, ts, addr, size, stack, false);
        self
    }

    fn free(mut self, ts: u64, addr: u64) -> T {
        self.enc.free(&mut self.body, ts, addr);
        self
    }

    fn scan(mut self, ts: u64, live: u64, unreachable: &[u64]) -> T {
        self.enc.scan(&mut self.body, ts, live, unreachable);
        self
    }

    fn exec(mut self, ts: u64) -> T {
        self.enc.mark(&mut self.body, ts, mark::EXEC, 0);
        self
    }

    fn end(mut self, ts: u64) -> T {
        self.enc.end(&mut self.body, ts);
        self.header.flags |= FLAG_CLEAN_END;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut h = self.header.clone();
        h.committed = self.body.len() as u64;
        let mut out = vec![0u8; HEADER_SIZE];
        h.encode(&mut out);
        out.extend_from_slice(&self.body);
        out
    }
}

/// A process that leaks 3 x 100 bytes nothing points to and keeps 200
/// bytes in a global, frees 300, and ran the leak scan.
fn leaky_scanned(pid: u32) -> T {
    T::new(pid)
        .alloc(10, 0x1000, 100, 1)
        .alloc(11, 0x1100, 100, 1)
        .alloc(12, 0x1200, 100, 1)
        .alloc(13, 0x2000, 200, 2)
        .alloc(14, 0x3000, 300, 2)
        .free(15, 0x3000)
        .scan(20, 4, &[0x1000, 0x1100, 0x1200])
        .end(21)
}

/// A process that keeps 200 bytes in a global and ran the scan.
fn reachable_only(pid: u32) -> T {
    T::new(pid)
        .alloc(10, 0x2000, 200, 2)
        .scan(20, 1, &[])
        .end(21)
}

fn clean(pid: u32) -> T {
    T::new(pid)
        .alloc(10, 0x2000, 300, 2)
        .free(11, 0x2000)
        .scan(20, 0, &[])
        .end(21)
}

/// Killed by a signal: 400 bytes outstanding, no END.
fn killed(pid: u32) -> T {
    T::new(pid).alloc(10, 0x4000, 400, 1)
}

fn check_with(traces: &[T], opts: CheckOptions) -> CheckResult {
    let mut c = Checker::new(opts);
    for (i, t) in traces.iter().enumerate() {
        let trace = read_trace(&t.bytes()[..]).unwrap();
        c.add(&trace, &format!("trace.{i}.bin"), &mut symbols());
    }
    c.finish()
}

fn check(traces: &[T]) -> CheckResult {
    check_with(traces, CheckOptions::default())
}

#[test]
fn definitely_lost_and_reachable_are_told_apart_by_the_scan() {
    let r = check(&[leaky_scanned(100)]);
    let p = &r.processes[0];
    assert_eq!(p.status, Status::Exited);
    assert!(p.scanned);
    assert_eq!(
        (p.definitely_lost.bytes, p.definitely_lost.objects),
        (300, 3)
    );
    assert_eq!((p.reachable.bytes, p.reachable.objects), (200, 1));
    assert_eq!(p.unknown.objects, 0);
    assert_eq!((p.counted.bytes, p.counted.objects), (300, 3));
    assert_eq!(p.verdict, Verdict::Leaked);
    assert_eq!(r.exit_code, EXIT_LEAKS);
    let lost = &p.leaks[0];
    assert_eq!(lost.reach, Reach::DefinitelyLost);
    assert_eq!(lost.function.as_deref(), Some("leak_unreachable"));
    assert!(lost.counted);
    assert_eq!(lost.stack.len(), 2);
    let kept = &p.leaks[1];
    assert_eq!(kept.reach, Reach::Reachable);
    assert_eq!(kept.function.as_deref(), Some("leak_reachable"));
    assert!(!kept.counted);
}

#[test]
fn reachable_memory_passes_unless_included() {
    let r = check(&[reachable_only(100)]);
    assert_eq!(r.processes[0].verdict, Verdict::Pass);
    assert_eq!(r.exit_code, EXIT_CLEAN);
    let opts = CheckOptions {
        include_reachable: true,
        ..CheckOptions::default()
    };
    let r = check_with(&[reachable_only(100)], opts);
    assert_eq!(r.processes[0].verdict, Verdict::Leaked);
    assert_eq!(r.processes[0].counted.bytes, 200);
    assert_eq!(r.exit_code, EXIT_LEAKS);
}

#[test]
fn without_a_scan_everything_outstanding_is_a_leak_of_unknown_reachability() {
    let t = T::new(100).alloc(10, 0x2000, 200, 2).end(21);
    let r = check(&[t]);
    let p = &r.processes[0];
    assert!(!p.scanned);
    assert_eq!((p.unknown.bytes, p.unknown.objects), (200, 1));
    assert_eq!(p.counted.bytes, 200);
    assert_eq!(p.leaks[0].reach, Reach::Unknown);
    assert!(
        p.notes.iter().any(|n| n.contains("no leak scan")),
        "{:?}",
        p.notes
    );
    assert_eq!(r.exit_code, EXIT_LEAKS);
}

#[test]
fn a_killed_process_is_reported_with_its_blocks_but_is_not_a_leak() {
    let r = check(&[killed(100), clean(101)]);
    let k = &r.processes[0];
    assert_eq!(k.status, Status::Killed);
    assert_eq!(k.verdict, Verdict::Killed);
    assert_eq!((k.unknown.bytes, k.unknown.objects), (400, 1));
    assert_eq!(k.counted.objects, 0);
    assert_eq!(r.counted.objects, 0);
    assert_eq!(r.exit_code, EXIT_CLEAN);
    let opts = CheckOptions {
        fail_on_killed: true,
        ..CheckOptions::default()
    };
    let r = check_with(&[killed(100), clean(101)], opts);
    assert_eq!(r.exit_code, EXIT_KILLED);
    // Leaks win over a killed process.
    let opts = CheckOptions {
        fail_on_killed: true,
        ..CheckOptions::default()
    };
    assert_eq!(
        check_with(&[killed(100), leaky_scanned(101)], opts).exit_code,
        EXIT_LEAKS
    );
}

#[test]
fn an_image_replaced_by_exec_is_not_checked() {
    let t = T::new(100).alloc(10, 0x4000, 400, 1).exec(30);
    let r = check(&[t]);
    assert_eq!(r.processes[0].status, Status::Exec);
    assert_eq!(r.processes[0].verdict, Verdict::Exec);
    assert_eq!(r.exit_code, EXIT_CLEAN);
}

// Regression: rustc links jemalloc, so under the tracer its processes
// recorded nothing and passed the check as clean. The tracer now writes who
// owns malloc, and the check says the process was not traced.
#[test]
fn a_process_whose_malloc_is_not_ours_is_reported_as_not_traced() {
    let mut t = T::new(100);
    let owner = b"/usr/bin/rustc";
    t.enc.info(&mut t.body, b"malloc_owner", owner);
    let t = t.end(30);
    let r = check(&[t]);
    assert_eq!(r.processes[0].status, Status::Untraced);
    assert_eq!(r.processes[0].verdict, Verdict::Untraced);
    assert_eq!(
        r.processes[0].malloc_owner.as_deref(),
        Some("/usr/bin/rustc")
    );
    assert_eq!(r.exit_code, EXIT_CLEAN);
}

#[test]
fn thresholds_per_process_and_in_total() {
    let opts = |b: Option<u64>, o: Option<u64>, total: bool| CheckOptions {
        max_bytes: b,
        max_objects: o,
        total,
        ..CheckOptions::default()
    };
    let two = || [leaky_scanned(100), leaky_scanned(101)];
    // 300 bytes in 3 objects per process, 600 in 6 in total.
    assert_eq!(
        check_with(&two(), opts(Some(300), None, false)).exit_code,
        EXIT_CLEAN
    );
    assert_eq!(
        check_with(&two(), opts(Some(299), None, false)).exit_code,
        EXIT_LEAKS
    );
    assert_eq!(
        check_with(&two(), opts(None, Some(3), false)).exit_code,
        EXIT_CLEAN
    );
    assert_eq!(
        check_with(&two(), opts(None, Some(2), false)).exit_code,
        EXIT_LEAKS
    );
    assert_eq!(
        check_with(&two(), opts(Some(1000), Some(2), false)).exit_code,
        EXIT_LEAKS
    );
    let total = check_with(&two(), opts(Some(300), None, true));
    assert_eq!(total.exit_code, EXIT_LEAKS);
    assert_eq!(total.counted.bytes, 600);
    assert!(total.processes.iter().all(|p| p.verdict == Verdict::Leaked));
    assert_eq!(
        check_with(&two(), opts(Some(600), None, true)).exit_code,
        EXIT_CLEAN
    );
    // A process that leaks nothing passes even when the total fails.
    let r = check_with(
        &[leaky_scanned(100), clean(101)],
        opts(Some(10), None, true),
    );
    assert_eq!(r.processes[1].verdict, Verdict::Pass);
}

fn with_file(text: &str) -> CheckOptions {
    let mut s = Suppressions::none();
    s.add_file("supp.txt", text).unwrap();
    s.add_defaults();
    CheckOptions {
        suppressions: s,
        ..CheckOptions::default()
    }
}

#[test]
fn suppressions_match_function_module_and_file_of_any_frame() {
    for (rule, matched) in [
        ("leak:leak_unreachable", true),
        ("leak:unreach", true),     // substring, as LSan
        ("leak:leak_*able", true),  // wildcard
        ("leak:^leak_un*e$", true), // anchors
        ("leak:^unreach", false),
        ("leak:main", true),         // an outer frame
        ("leak:suite", true),        // the module
        ("leak:/src/suite.c", true), // the source file
        ("leak:other.c", false),
    ] {
        let r = check_with(&[leaky_scanned(100)], with_file(rule));
        let p = &r.processes[0];
        if matched {
            // `main` and the module match the reachable stack too.
            assert_eq!(p.definitely_lost.objects, 0, "{rule}");
            assert!(p.suppressed.objects >= 3, "{rule}");
            assert_eq!(r.exit_code, EXIT_CLEAN, "{rule}");
            let used = &r.suppressions_used[0];
            assert_eq!(used.suppression, rule, "{rule}");
            assert_eq!(used.source, "supp.txt:1");
        } else {
            assert_eq!(p.definitely_lost.objects, 3, "{rule}");
            assert!(r.suppressions_used.is_empty(), "{rule}");
        }
    }
}

#[test]
fn used_suppressions_count_stacks_objects_and_bytes() {
    let opts = with_file("# ours\nleak:leak_unreachable\nleak:leak_reachable\nleak:never\n");
    let r = check_with(&[leaky_scanned(100), leaky_scanned(101)], opts);
    let used: Vec<(&str, u64, u64, u64)> = r
        .suppressions_used
        .iter()
        .map(|u| (u.suppression.as_str(), u.stacks, u.objects, u.bytes))
        .collect();
    // Stack 2 holds the reachable block (and the freed one).
    assert_eq!(
        used,
        [
            ("leak:leak_unreachable", 2, 6, 600),
            ("leak:leak_reachable", 2, 2, 400),
        ]
    );
    assert_eq!(r.exit_code, EXIT_CLEAN);
}

#[test]
fn default_suppressions_cover_stdio_buffers_and_the_jvm_but_not_jni_leaks() {
    let t = || {
        T::new(100)
            .alloc(10, 0x1000, 1024, 3) // stdout's buffer
            .alloc(11, 0x2000, 64, 4) // HotSpot's own arena
            .alloc(12, 0x3000, 32, 5) // a JNI library called from Java
            .scan(20, 3, &[0x1000, 0x2000, 0x3000])
            .end(21)
    };
    let r = check(&[t()]);
    let p = &r.processes[0];
    assert_eq!(
        (p.definitely_lost.bytes, p.definitely_lost.objects),
        (32, 1)
    );
    assert_eq!(p.leaks[0].function.as_deref(), Some("Java_Foo_leak"));
    assert_eq!((p.suppressed.bytes, p.suppressed.objects), (1088, 2));
    let used: Vec<&str> = r
        .suppressions_used
        .iter()
        .map(|u| u.suppression.as_str())
        .collect();
    assert_eq!(used, ["leak:_IO_file_doallocate", "leak:^libjvm.so$"]);
    assert!(r.suppressions_used[0].source.starts_with("built-in: "));
    let none = CheckOptions {
        suppressions: Suppressions::none(),
        ..CheckOptions::default()
    };
    let r = check_with(&[t()], none);
    assert_eq!(r.processes[0].definitely_lost.bytes, 1024 + 64 + 32);
    assert!(r.suppressions_used.is_empty());
}

#[test]
fn suppressions_md_lists_every_default() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/SUPPRESSIONS.md")).unwrap();
    for d in DEFAULT_SUPPRESSIONS {
        assert!(
            doc.contains(&format!("`leak:{}`", d.pattern)),
            "SUPPRESSIONS.md does not list leak:{}",
            d.pattern
        );
    }
}

/// Parses JUnit XML with quick-xml and returns (testcase names, failures,
/// errors); panics on malformed XML.
fn parse_junit(xml: &str) -> (Vec<String>, usize, usize, String) {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut names, mut failures, mut errors) = (Vec::new(), 0, 0);
    let mut failure_message = String::new();
    let mut depth = 0i32;
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) | Event::Empty(e) => {
                let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                let attr = |k: &str| {
                    e.attributes()
                        .map(|a| a.unwrap())
                        .find(|a| a.key.as_ref() == k.as_bytes())
                        .map(|a| {
                            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .unwrap()
                                .into_owned()
                        })
                };
                match name.as_str() {
                    "testcase" => names.push(attr("name").unwrap()),
                    "failure" => {
                        failures += 1;
                        failure_message = attr("message").unwrap();
                    }
                    "error" => errors += 1,
                    _ => {}
                }
                depth += 1;
            }
            Event::End(_) => depth -= 1,
            Event::Eof => break,
            _ => {}
        }
    }
    let _ = depth;
    (names, failures, errors, failure_message)
}

#[test]
fn junit_xml_is_well_formed_with_one_case_per_process() {
    let opts = CheckOptions {
        fail_on_killed: true,
        ..CheckOptions::default()
    };
    let weird = T::new(102)
        .program("/src/a&b<c>", &["./a&b<c>", "\"quoted\"", "\u{1}"])
        .end(21);
    let r = check_with(&[leaky_scanned(100), killed(101), weird], opts.clone());
    let mut out = Vec::new();
    write_junit(&r, &opts, &mut out).unwrap();
    let xml = String::from_utf8(out).unwrap();
    let (names, failures, errors, message) = parse_junit(&xml);
    assert_eq!(names.len(), 3, "{xml}");
    assert_eq!(names[0], "suite[100] ./suite --case");
    assert_eq!(names[2], "a&b<c>[102] ./a&b<c> \"quoted\" \u{fffd}");
    assert_eq!((failures, errors), (1, 1));
    assert!(
        message.contains("300 bytes in 3 objects definitely lost"),
        "{message}"
    );
    assert!(message.contains("leak_unreachable"), "{message}");
    assert!(
        message.contains("main "),
        "the stack is in the message: {message}"
    );
}

// ---- through the binary ----

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mtrace-analyze")
}

fn cli(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mtrace-check-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_traces(dir: &Path, traces: &[T]) {
    for t in traces {
        std::fs::write(dir.join(format!("trace.{}.bin", t.header.pid)), t.bytes()).unwrap();
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[test]
fn cli_exit_codes() {
    let d = temp_dir("codes");
    write_traces(&d, &[clean(100), reachable_only(101)]);
    let ds = d.to_str().unwrap();
    let o = cli(&["check", ds]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), EXIT_CLEAN as i32, "{err}");
    assert!(err.contains("no leaks (exit 0)"), "{err}");
    assert_eq!(
        code(&cli(&["check", "--include-reachable", ds])),
        EXIT_LEAKS as i32
    );

    write_traces(&d, &[leaky_scanned(102), killed(103)]);
    let o = cli(&["check", ds]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), EXIT_LEAKS as i32, "{err}");
    assert!(
        err.contains("LEAK   suite[102] ./suite --case: 300 bytes in 3 objects definitely lost"),
        "{err}"
    );
    // No symbols for the synthetic modules: frames are named by module.
    assert!(
        err.contains("definitely lost in suite+0x1000  [suite]"),
        "{err}"
    );
    assert!(err.contains("killed suite[103]"), "{err}");
    assert!(err.contains("LEAKS FOUND (exit 23)"), "{err}");
    assert_eq!(
        code(&cli(&["check", "--max-bytes", "300", ds])),
        EXIT_CLEAN as i32
    );
    // One file at a time.
    let one = d.join("trace.103.bin");
    let one = one.to_str().unwrap();
    assert_eq!(code(&cli(&["check", one])), EXIT_CLEAN as i32);
    assert_eq!(
        code(&cli(&["check", "--fail-on-killed", one])),
        EXIT_KILLED as i32
    );

    // Errors: no traces, a file that is no trace, a bad suppressions file.
    let empty = temp_dir("empty");
    assert_eq!(
        code(&cli(&["check", empty.to_str().unwrap()])),
        EXIT_ERROR as i32
    );
    let junk = empty.join("junk.bin");
    std::fs::write(&junk, b"not a trace").unwrap();
    let o = cli(&["check", junk.to_str().unwrap()]);
    assert_eq!(code(&o), EXIT_ERROR as i32);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an mtrace-rs trace"));
    let supp = empty.join("supp.txt");
    std::fs::write(&supp, "race:foo\n").unwrap();
    let o = cli(&["check", "--suppressions", supp.to_str().unwrap(), one]);
    assert_eq!(code(&o), EXIT_ERROR as i32);
    assert!(String::from_utf8_lossy(&o.stderr).contains("supp.txt:1: `race:`"));
    let o = cli(&["check", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("23  leaks over the thresholds"));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn cli_suppressions_json_and_junit_files() {
    let d = temp_dir("files");
    write_traces(&d, &[leaky_scanned(100), clean(101)]);
    let supp = d.join("supp.txt");
    // The synthetic modules have no symbols on disk: match the module.
    std::fs::write(&supp, "# the known one\nleak:^sui*e$\n").unwrap();
    let (junit, json) = (d.join("out.xml"), d.join("out.json"));
    let o = cli(&[
        "check",
        "--suppressions",
        supp.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--format",
        "json",
        d.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), EXIT_CLEAN as i32, "{err}");
    assert!(err.contains("Suppressions used:"), "{err}");
    assert!(err.contains("leak:^sui*e$"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v, file);
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["processes"].as_array().unwrap().len(), 2);
    // Both stacks of the leaky process: 3 lost blocks and 1 reachable.
    assert_eq!(v["suppressions_used"][0]["stacks"], 2);
    assert_eq!(v["suppressions_used"][0]["objects"], 4);
    assert_eq!(v["suppressions_used"][0]["bytes"], 500);
    let (names, failures, errors, _) = parse_junit(&std::fs::read_to_string(&junit).unwrap());
    assert_eq!((names.len(), failures, errors), (2, 0, 0));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn cli_run_without_a_library_says_where_it_looked() {
    let o = Command::new(bin())
        .args(["run", "--lib", "/nonexistent/libmtrace_rs.so", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&o), EXIT_ERROR as i32);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/libmtrace_rs.so"));
}

// ---- end to end ----

/// A small C test suite: a runner forks one child per test; one leaks
/// 3 x 100 bytes nothing points to, one keeps 200 bytes in a global, one is
/// clean, one kills itself with SIGKILL holding 400 bytes.
const SUITE_C: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

void *volatile global_keep;

__attribute__((noinline)) void leak_unreachable(void) {
    for (int i = 0; i < 3; i++) {
        char *volatile p = malloc(100);
        memset(p, 1, 100);
        p = NULL;
    }
}

__attribute__((noinline)) void leak_reachable(void) {
    global_keep = malloc(200);
    memset(global_keep, 2, 200);
}

__attribute__((noinline)) void clean(void) {
    char *volatile p = malloc(300);
    memset(p, 3, 300);
    free(p);
}

__attribute__((noinline)) void killed(void) {
    char *volatile p = malloc(400);
    memset(p, 4, 400);
    /* Give the tracer's writer time to put the event in the file. */
    usleep(300000);
    kill(getpid(), SIGKILL);
}

int main(void) {
    void (*tests[])(void) = {leak_unreachable, leak_reachable, clean, killed};
    for (int i = 0; i < 4; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            tests[i]();
            exit(0);
        }
        int st;
        waitpid(pid, &st, 0);
    }
    return 0;
}
"#;

fn release_lib() -> Option<PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/libmtrace_rs.so");
    lib.is_file().then_some(lib)
}

#[test]
fn end_to_end_run_of_a_forking_c_suite() {
    let Some(lib) = release_lib() else {
        eprintln!("skipped: target/release/libmtrace_rs.so is not built");
        return;
    };
    let d = temp_dir("e2e");
    let src = d.join("suite.c");
    std::fs::write(&src, SUITE_C).unwrap();
    let exe = d.join("suite");
    let cc = Command::new("cc")
        .args(["-g", "-O1", "-fno-omit-frame-pointer", "-o"])
        .arg(&exe)
        .arg(&src)
        .output();
    match cc {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("skipped: no working C compiler (cc)");
            return;
        }
    }
    let traces = d.join("traces");
    let json = d.join("out.json");
    let o = Command::new(bin())
        .arg("run")
        .arg("--lib")
        .arg(&lib)
        .arg("--out-dir")
        .arg(&traces)
        .arg("--json")
        .arg(&json)
        .arg("--")
        .arg(&exe)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), EXIT_LEAKS as i32, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 5, "the runner and four tests: {err}");
    let status: Vec<(&str, &str)> = procs
        .iter()
        .map(|p| {
            (
                p["status"].as_str().unwrap(),
                p["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    // Ordered by start: the runner, then the tests in order.
    assert_eq!(
        status,
        [
            ("exited", "pass"),
            ("exited", "leaked"),
            ("exited", "pass"),
            ("exited", "pass"),
            ("killed", "killed"),
        ],
        "{err}"
    );
    let amount = |p: &serde_json::Value, k: &str| {
        (
            p[k]["bytes"].as_u64().unwrap(),
            p[k]["objects"].as_u64().unwrap(),
        )
    };
    assert_eq!(amount(&procs[1], "definitely_lost"), (300, 3), "{err}");
    assert_eq!(
        procs[1]["leaks"][0]["function"].as_str(),
        Some("leak_unreachable"),
        "{err}"
    );
    assert_eq!(amount(&procs[2], "reachable"), (200, 1), "{err}");
    assert_eq!(amount(&procs[2], "definitely_lost"), (0, 0), "{err}");
    assert_eq!(amount(&procs[3], "definitely_lost"), (0, 0), "{err}");
    assert_eq!(amount(&procs[3], "reachable"), (0, 0), "{err}");
    assert_eq!(amount(&procs[4], "unknown"), (400, 1), "{err}");

    // With the leak suppressed and a killed process failing: exit 24.
    let supp = d.join("supp.txt");
    std::fs::write(&supp, "leak:leak_unreachable\n").unwrap();
    let o = Command::new(bin())
        .arg("check")
        .arg("--suppressions")
        .arg(&supp)
        .arg("--fail-on-killed")
        .arg(&traces)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), EXIT_KILLED as i32, "{err}");
    assert!(err.contains("leak:leak_unreachable"), "{err}");
    // Reachable memory fails with --include-reachable.
    let o = Command::new(bin())
        .args(["check", "--suppressions"])
        .arg(&supp)
        .arg("--include-reachable")
        .arg(&traces)
        .output()
        .unwrap();
    assert_eq!(code(&o), EXIT_LEAKS as i32);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn run_passes_on_the_commands_failure_status() {
    let Some(lib) = release_lib() else {
        eprintln!("skipped: target/release/libmtrace_rs.so is not built");
        return;
    };
    // A failed run keeps its traces: keep them where the test cleans up.
    let d = temp_dir("status");
    let o = Command::new(bin())
        .arg("run")
        .arg("--lib")
        .arg(&lib)
        .arg("--out-dir")
        .arg(d.join("exit"))
        .args(["--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 7, "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(bin())
        .arg("run")
        .arg("--lib")
        .arg(&lib)
        .arg("--out-dir")
        .arg(d.join("signal"))
        .args(["--", "sh", "-c", "kill -TERM $$"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 128 + 15, "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&d);
}
