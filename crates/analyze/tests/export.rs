//! The pprof export and the churn view: synthetic programs of known
//! behaviour, read back (the profile decoded with prost, and with Go's
//! `pprof` when it is installed) and compared with golden text.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{at, fake_symbols, TraceBuilder};
use mtrace_analyze::analysis::{read_trace, read_trace_with, Snapshot};
use mtrace_analyze::churn::{self, build_churn, read_churn, ChurnSort};
use mtrace_analyze::pprof::{build_profile, read_pprof, write_pprof, SAMPLE_TYPES};
use mtrace_analyze::report::ReportOptions;

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// The stacks of the synthetic program (innermost first).
fn with_stacks(b: TraceBuilder) -> TraceBuilder {
    use at::*;
    b.program("/work/svc", &["svc", "--port", "80"])
        .module("/work/svc", 0x5000_0000, 0x10_0000)
        .module("/lib/x86_64-linux-gnu/libc.so.6", 0x7000_0000, 0x10_0000)
        // 1: the leak on the error path, through xmalloc.
        .stack(
            1,
            &[
                MALLOC_IN_XMALLOC,
                XMALLOC_IN_LEAK,
                LEAK_IN_HANDLE,
                HANDLE_IN_MAIN,
                MAIN_IN_LIBC,
            ],
        )
        // 2: a cache filled once.
        .stack(2, &[NEW_IN_CACHE, CACHE_IN_MAIN, MAIN_IN_LIBC])
        // 3: a vector grown in a loop, inlined into fill_table.
        .stack(3, &[VEC_GROW_IN_FILL, FILL_IN_MAIN, MAIN_IN_LIBC])
}

/// Leaks 300 B per request from stack 1, fills a cache of 50 x 10,000 B
/// from stack 2 and churns 1,000 short-lived vectors from stack 3, of
/// which 100 are still live at the end.
fn program() -> Vec<u8> {
    let mut b = with_stacks(TraceBuilder::new(1));
    for i in 0..50u64 {
        b = b.alloc(MS + i * US, 0x2000_0000 + i * 0x4000, 10_000, 2);
    }
    for i in 0..1000u64 {
        let t = 10 * MS + i * MS;
        let addr = 0x1000_0000 + (i % 4) * 0x1000;
        b = b.alloc(t, addr, 64 << (i % 4), 3);
        if i < 900 {
            b = b.free(t + 50 * US + (i % 10) * 50 * US, addr);
        } else {
            // Keep the last hundred: distinct addresses so none is lost.
            b = b.free(t + 2 * MS, addr);
            b = b.alloc(t + 2 * MS, 0x3000_0000 + i * 0x100, 128, 3);
        }
        if i % 10 == 0 {
            b = b.alloc(t + 100 * US, 0x4000_0000 + i * 0x200, 300, 1);
        }
    }
    b.end(1100 * MS).bytes()
}

// ---- pprof ----

#[test]
fn pprof_round_trip_keeps_totals_names_and_inlined_frames() {
    let trace = read_trace(&program()[..]).unwrap();
    let mut sym = fake_symbols();
    let profile = build_profile(&trace, &mut sym, None);
    let mut gz = Vec::new();
    write_pprof(&profile, &mut gz).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzipped");
    let p = read_pprof(&gz).unwrap();
    assert_eq!(p, profile);

    let s = |i: i64| p.string_table[i as usize].as_str();
    assert_eq!(s(0), "");
    let types: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| (s(t.r#type), s(t.unit)))
        .collect();
    assert_eq!(types, SAMPLE_TYPES);
    assert_eq!(s(p.default_sample_type), "inuse_space");

    // Totals per sample type: alloc over the whole trace, inuse at the end.
    let total = |k: usize| p.sample.iter().map(|x| x.value[k]).sum::<i64>();
    let allocated_bytes =
        50 * 10_000 + (0..1000).map(|i| 64i64 << (i % 4)).sum::<i64>() + 100 * 128 + 100 * 300;
    assert_eq!(total(0), 50 + 1000 + 100 + 100);
    assert_eq!(total(1), allocated_bytes);
    assert_eq!(total(2), 50 + 100 + 100);
    assert_eq!(total(3), 50 * 10_000 + 100 * 128 + 100 * 300);

    // The leak's sample: five locations, leaf first, named from the
    // symbolizer, with file names.
    let fname = |loc: u64, line: usize| {
        let l = &p.location[loc as usize - 1];
        let f = &p.function[l.line[line].function_id as usize - 1];
        (
            s(f.name).to_string(),
            s(f.filename).to_string(),
            l.line[line].line,
        )
    };
    let leak = p.sample.iter().find(|x| x.value[3] == 30_000).unwrap();
    assert_eq!(leak.location_id.len(), 5);
    assert_eq!(
        fname(leak.location_id[0], 0),
        ("xmalloc".into(), "util.c".into(), 12)
    );
    assert_eq!(
        fname(leak.location_id[1], 0),
        ("leak_on_error".into(), "leaky.c".into(), 42)
    );
    // An inlined frame is one location with two lines, the inlined
    // function first.
    let vec = p.sample.iter().find(|x| x.value[0] == 1100).unwrap();
    let loc = &p.location[vec.location_id[0] as usize - 1];
    assert_eq!(loc.line.len(), 2);
    assert!(fname(loc.id, 0).0.starts_with("std::vector<int"));
    assert_eq!(
        fname(loc.id, 1),
        ("fill_table".into(), "table.cc".into(), 33)
    );
    // Addresses are inside the call (return address - 1), in the module's
    // mapping; the main program's mapping comes first.
    assert_eq!(loc.address, at::VEC_GROW_IN_FILL - 1);
    assert_eq!(loc.mapping_id, 1);
    let m = &p.mapping[0];
    assert_eq!(s(m.filename), "/work/svc");
    assert_eq!((m.memory_start, m.memory_limit), (0x5000_0000, 0x5010_0000));
    assert!(m.has_functions && m.has_inline_frames);
    assert_eq!(s(p.mapping[1].filename), "/lib/x86_64-linux-gnu/libc.so.6");
    let libc_loc = p
        .location
        .iter()
        .find(|l| l.address == at::MAIN_IN_LIBC - 1)
        .unwrap();
    assert_eq!(libc_loc.mapping_id, 2);
    // Functions are interned once.
    let mut names: Vec<_> = p.function.iter().map(|f| (f.name, f.filename)).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), p.function.len());
    assert!(p.comment.iter().any(|&c| s(c).contains("exact mode")));
}

#[test]
fn pprof_at_a_moment_uses_the_snapshot_for_inuse() {
    // At 5 ms only the cache (50 x 10,000 B) was live.
    let trace = read_trace_with(&program()[..], vec![Snapshot::new(5 * MS, None)]).unwrap();
    let p = build_profile(&trace, &mut fake_symbols(), Some(0));
    let inuse: i64 = p.sample.iter().map(|x| x.value[3]).sum();
    let objects: i64 = p.sample.iter().map(|x| x.value[2]).sum();
    assert_eq!((inuse, objects), (500_000, 50));
    let s = |i: i64| p.string_table[i as usize].as_str();
    assert!(p.comment.iter().any(|&c| s(c).contains("at 0.005 s")));
}

#[test]
fn pprof_gives_unrecorded_stacks_one_location() {
    let bytes = TraceBuilder::new(1)
        .alloc(10, 0x1000, 100, 0)
        .alloc(20, 0x2000, 50, 77)
        .end(30)
        .bytes();
    let trace = read_trace(&bytes[..]).unwrap();
    let p = build_profile(&trace, &mut fake_symbols(), None);
    assert_eq!(p.sample.len(), 2);
    assert_eq!(p.location.len(), 1);
    assert!(p.sample.iter().all(|x| x.location_id == vec![1]));
    let f = &p.function[0];
    assert_eq!(p.string_table[f.name as usize], "<stack not recorded>");
}

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mtrace-analyze"))
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mtrace-analyze-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `report --format pprof -o` writes a profile that decodes; Go's pprof
/// reads it too when it is installed (`apt-get install golang-go`).
#[test]
fn pprof_from_the_command_line_opens_in_go_pprof() {
    let trace = temp("cli.bin");
    std::fs::write(&trace, program()).unwrap();
    let out = temp("heap.pb.gz");
    let run = Command::new(exe())
        .args(["report", "--format", "pprof", "-o"])
        .arg(&out)
        .arg(&trace)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let p = read_pprof(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(p.sample.iter().map(|x| x.value[3]).sum::<i64>(), 542_800);
    // The flamegraph command takes the same format and --at.
    let at = temp("at.pb.gz");
    let run = Command::new(exe())
        .args(["flamegraph", "--format", "pprof", "--at", "5ms", "-o"])
        .arg(&at)
        .arg(&trace)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let p = read_pprof(&std::fs::read(&at).unwrap()).unwrap();
    assert_eq!(p.sample.iter().map(|x| x.value[3]).sum::<i64>(), 500_000);

    let go = Command::new("go").args(["tool", "pprof", "-h"]).output();
    if !go.is_ok_and(|o| o.status.success() || !o.stderr.is_empty()) {
        eprintln!("skipped: Go's pprof is not installed (apt-get install golang-go)");
        return;
    }
    let top = Command::new("go")
        .args(["tool", "pprof", "-top", "-sample_index=inuse_space"])
        .arg(&out)
        .env("PPROF_TMPDIR", std::env::temp_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{top:?}");
    // Frames without symbols show as module+offset; the total is exact.
    assert!(
        text.contains("530.08kB total") || text.contains("542800"),
        "{text}"
    );
    let raw = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&out)
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&raw.stdout);
    for t in [
        "alloc_objects/count",
        "alloc_space/bytes",
        "inuse_objects/count",
        "inuse_space/bytes",
    ] {
        assert!(raw.contains(t), "{t} missing:\n{raw}");
    }
    assert!(raw.contains("/work/svc"), "{raw}");
}

// ---- churn ----

fn churn_text(bytes: &[u8], sort: ChurnSort) -> (churn::ChurnReport, String) {
    let c = read_churn(bytes).unwrap();
    let r = build_churn(
        &c,
        "trace.bin",
        &mut fake_symbols(),
        &ReportOptions::default(),
        sort,
    );
    let mut out = Vec::new();
    churn::write_text(&r, &mut out).unwrap();
    (r, String::from_utf8(out).unwrap())
}

#[test]
fn churn_ranks_callers_and_measures_lifetimes() {
    let (r, text) = churn_text(&program(), ChurnSort::Count);
    check_golden("churn.txt", &text);
    assert_eq!(r.allocations, 1250);
    let fill = &r.callers[0];
    assert_eq!(fill.function.as_deref(), Some("fill_table"));
    assert_eq!(fill.allocations, 1100);
    assert_eq!(fill.freed, 1000);
    // 900 blocks live 50..500 us (90 each of 50, 100, .. 500), 100 live
    // 2 ms: the median is the 500th, at 300 us.
    assert_eq!(fill.short_lived, 900);
    let life = fill.lifetime_ns.as_ref().unwrap();
    assert!((298 * US..=302 * US).contains(&life.p50), "{life:?}");
    assert!((1990 * US..=2010 * US).contains(&life.p99), "{life:?}");
    let size = fill.size.as_ref().unwrap();
    assert_eq!((size.p50, size.p99), (128, 512));
    // The leak's blocks never die.
    let leak = r
        .callers
        .iter()
        .find(|c| c.function.as_deref() == Some("leak_on_error"))
        .unwrap();
    assert_eq!((leak.allocations, leak.freed), (100, 0));
    assert!(leak.lifetime_ns.is_none());

    let (r, _) = churn_text(&program(), ChurnSort::Bytes);
    assert_eq!(r.callers[0].function.as_deref(), Some("Cache::insert(int)"));
}

#[test]
fn churn_pairs_a_free_that_arrives_before_its_alloc() {
    // The writer merges per-thread rings in batches: thread B's free of a
    // block can come before thread A's alloc of it.
    let bytes = with_stacks(TraceBuilder::new(1))
        .free(20 * US, 0x1000)
        .alloc(10 * US, 0x1000, 64, 3)
        .alloc(30 * US, 0x1000, 64, 3)
        .free(3 * S, 0x1000)
        .end(4 * S)
        .bytes();
    let (r, _) = churn_text(&bytes, ChurnSort::Count);
    let c = &r.callers[0];
    assert_eq!((c.allocations, c.freed, c.short_lived), (2, 2, 1));
    assert_eq!(r.unpaired_frees, 0);
    let life = c.lifetime_ns.as_ref().unwrap();
    assert!(
        life.p50 <= 10 * US + 100 && life.p99 >= 2_990 * MS,
        "{life:?}"
    );
}

#[test]
fn churn_in_sampled_mode_counts_what_samples_stand_for() {
    let rate = 4096;
    let mut b = with_stacks(TraceBuilder::new(rate));
    for i in 0..100u64 {
        b = b
            .sample(i * MS, 0x1000 + i * 0x100, 64, 3)
            .free(i * MS + 10 * US, 0x1000 + i * 0x100);
    }
    let (r, text) = churn_text(&b.end(S).bytes(), ChurnSort::Count);
    let w = mtrace_analyze::analysis::weight(64, true, rate).objects;
    let c = &r.callers[0];
    assert_eq!(c.allocations, (100.0 * w).round() as u64);
    assert!(c.estimated && c.short_lived_share > 0.99);
    assert!(text.contains("~"), "{text}");
}

#[test]
fn churn_from_the_command_line_as_json() {
    let trace = temp("churn.bin");
    std::fs::write(&trace, program()).unwrap();
    let run = Command::new(exe())
        .args([
            "churn",
            "--format",
            "json",
            "--sort",
            "short-lived",
            "--top",
            "2",
        ])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["sort"], "short_lived");
    assert_eq!(v["callers"].as_array().unwrap().len(), 2);
    assert_eq!(v["callers"][0]["short_lived"], 900);
    assert_eq!(v["allocations"], 1250);
    // Not a trace: one line, exit 2.
    std::fs::write(&trace, b"hello").unwrap();
    let run = Command::new(exe())
        .arg("churn")
        .arg(&trace)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&run.stderr).lines().count(), 1);
}

/// Compares with `tests/golden/NAME`; `UPDATE_GOLDEN=1` rewrites the file.
fn check_golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert!(
        expected == actual,
        "{} differs (UPDATE_GOLDEN=1 to accept):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn churn_takes_a_time_stamp_at_the_end_of_time() {
    // Found by the `analyze` fuzz target: an END record whose time delta
    // wraps to u64::MAX overflowed the report's memory timeline. The churn
    // view keeps its own times and reads such a file.
    let bytes = TraceBuilder::new(1)
        .alloc(10, 0x1000, 8, 0)
        .raw(&[mtrace_format::tag::END, 0x15])
        .bytes();
    let c = read_churn(&bytes[..]).unwrap();
    assert_eq!(c.trace.last_ts, u64::MAX);
}
