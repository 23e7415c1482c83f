//! The time dimension: RSS beside live bytes and the retention diagnosis,
//! the memory timeline, `--at` snapshots and growth between two moments or
//! two traces. Synthetic programs of known behaviour, built with
//! `mtrace_format::Encoder`, checked through the library and the binary.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{at, fake_symbols, TraceBuilder};
use mtrace_analyze::analysis::{read_trace, read_trace_with, Snapshot, Trace};
use mtrace_analyze::diff::{self, DiffReport};
use mtrace_analyze::report::{build_report, write_text, Moment, Report, ReportOptions};
use mtrace_analyze::timespec::TimeSpec;
use mtrace_format::stat;

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;
const MIB: u64 = 1 << 20;

// ---- synthetic programs ----

/// One event of a simulated program.
#[derive(Clone, Copy)]
enum Ev {
    Alloc { addr: u64, size: u64, stack: u64 },
    Free { addr: u64 },
}

/// Writes `events` (time, event) in time order with a STATS record every
/// 100 ms (at 50 ms past each tick), whose fields `stats(live, max_live)`
/// computes from the program's true live bytes.
fn simulate(
    mut b: TraceBuilder,
    mut events: Vec<(u64, Ev)>,
    end: u64,
    stats: impl Fn(u64, u64) -> Vec<(u64, u64)>,
) -> TraceBuilder {
    events.sort_by_key(|e| e.0);
    let mut sizes = std::collections::HashMap::new();
    let (mut live, mut max_live) = (0u64, 0u64);
    let mut next_stats = 50 * MS;
    let mut it = events.into_iter().peekable();
    loop {
        let next_ev = it.peek().map(|e| e.0);
        if next_stats <= end && next_ev.is_none_or(|t| next_stats < t) {
            b = b.stats_fields(next_stats, &stats(live, max_live));
            next_stats += 100 * MS;
            continue;
        }
        let Some((ts, ev)) = it.next() else { break };
        match ev {
            Ev::Alloc { addr, size, stack } => {
                live += size;
                max_live = max_live.max(live);
                sizes.insert(addr, size);
                b = b.alloc(ts, addr, size, stack);
            }
            Ev::Free { addr } => {
                live -= sizes.remove(&addr).unwrap();
                b = b.free(ts, addr);
            }
        }
    }
    b.end(end)
}

/// glibc's figures for a program whose arenas grew to its most live bytes
/// and never shrank (free memory kept in the arenas).
fn glibc_keeps_everything(live: u64, max_live: u64) -> Vec<(u64, u64)> {
    vec![
        (stat::RSS, 10 * MIB + max_live),
        (stat::ARENA, max_live),
        (stat::IN_USE, live),
        (stat::FREE_HELD, max_live - live),
        (stat::MMAPPED, 0),
        (stat::KEEPCOST, 4096),
    ]
}

fn stacks(b: TraceBuilder) -> TraceBuilder {
    use at::*;
    b.program("/work/svc", &["./svc"])
        .module("/work/svc", 0x5000_0000, 0x10_0000)
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
        .stack(2, &[NEW_IN_CACHE, CACHE_IN_MAIN, MAIN_IN_LIBC])
        .stack(3, &[VEC_GROW_IN_FILL, FILL_IN_MAIN, MAIN_IN_LIBC])
}

/// Four threads' worth of work allocate 400 MiB in 64 KiB blocks, then free
/// all but one block in a thousand: RSS stays high, live bytes are small,
/// glibc holds the rest as free memory.
fn retention_program() -> TraceBuilder {
    let mut ev = Vec::new();
    for j in 0..6400u64 {
        let addr = 0x1_0000_0000 + j * 0x10000;
        ev.push((
            j * (2 * S / 6400),
            Ev::Alloc {
                addr,
                size: 64 << 10,
                stack: 3,
            },
        ));
        if j % 1000 != 0 {
            ev.push((5 * S / 2 + j * (S / 6400), Ev::Free { addr }));
        }
    }
    simulate(
        stacks(TraceBuilder::new(1)),
        ev,
        5 * S,
        glibc_keeps_everything,
    )
}

/// A true leak: 300 MiB in 64 KiB blocks over five seconds, never freed.
/// glibc's arenas hold little free memory.
fn leaking_program() -> TraceBuilder {
    let ev = (0..4800u64)
        .map(|j| {
            let addr = 0x1_0000_0000 + j * 0x10000;
            (
                j * (5 * S / 4800),
                Ev::Alloc {
                    addr,
                    size: 64 << 10,
                    stack: 1,
                },
            )
        })
        .collect();
    simulate(stacks(TraceBuilder::new(1)), ev, 5 * S, |live, _| {
        vec![
            (stat::RSS, 10 * MIB + live),
            (stat::ARENA, live + MIB),
            (stat::IN_USE, live),
            (stat::FREE_HELD, MIB),
            (stat::MMAPPED, 0),
        ]
    })
}

/// A 400 MiB burst freed at once, then a leak of 100 MiB growing into the
/// arenas glibc kept: RSS is far above live bytes, glibc holds most of the
/// gap, and yet the program leaks.
fn retention_and_leak_program() -> TraceBuilder {
    let mut ev = Vec::new();
    for j in 0..6400u64 {
        let addr = 0x1_0000_0000 + j * 0x10000;
        ev.push((
            j * (S / 6400),
            Ev::Alloc {
                addr,
                size: 64 << 10,
                stack: 3,
            },
        ));
        ev.push((S + j * (S / 6400), Ev::Free { addr }));
    }
    for j in 0..1600u64 {
        let addr = 0x2_0000_0000 + j * 0x10000;
        ev.push((
            2 * S + j * (3 * S / 1600),
            Ev::Alloc {
                addr,
                size: 64 << 10,
                stack: 1,
            },
        ));
    }
    simulate(
        stacks(TraceBuilder::new(1)),
        ev,
        5 * S,
        glibc_keeps_everything,
    )
}

/// A server that fills a cache of 1,000,000 bytes in its first second and
/// leaks 300 bytes on each "disconnect", one every 100 ms for 100 s, with a
/// short-lived 4 KiB buffer per disconnect.
fn slow_leak_program(disconnects: u64) -> TraceBuilder {
    let mut ev = Vec::new();
    for i in 0..1000u64 {
        let addr = 0x10_0000 + i * 0x400;
        ev.push((
            (i + 1) * MS,
            Ev::Alloc {
                addr,
                size: 1000,
                stack: 2,
            },
        ));
    }
    for i in 0..disconnects {
        let t = i * 100 * MS + 50 * MS;
        ev.push((
            t,
            Ev::Alloc {
                addr: 0x100_0000 + i * 0x200,
                size: 300,
                stack: 1,
            },
        ));
        ev.push((
            t + MS,
            Ev::Alloc {
                addr: 0x200_0000,
                size: 4096,
                stack: 3,
            },
        ));
        ev.push((t + 11 * MS, Ev::Free { addr: 0x200_0000 }));
    }
    simulate(
        stacks(TraceBuilder::new(1)),
        ev,
        disconnects * 100 * MS,
        glibc_keeps_everything,
    )
}

/// Ten 1 MiB batches loaded in the first second and freed in the third,
/// beside a cache that grows a little before and after: the peak of live
/// bytes is in the middle.
fn peak_in_the_middle_program() -> TraceBuilder {
    let mut ev = Vec::new();
    for k in 1..=10u64 {
        let addr = 0x1_0000_0000 + k * 0x20_0000;
        ev.push((
            k * 100 * MS,
            Ev::Alloc {
                addr,
                size: MIB,
                stack: 3,
            },
        ));
        ev.push((2 * S + k * 100 * MS, Ev::Free { addr }));
    }
    for k in 0..5u64 {
        ev.push((
            50 * MS + k,
            Ev::Alloc {
                addr: 0x10_0000 + k * 0x100,
                size: 100,
                stack: 2,
            },
        ));
        ev.push((
            2500 * MS + k,
            Ev::Alloc {
                addr: 0x20_0000 + k * 0x100,
                size: 100,
                stack: 2,
            },
        ));
    }
    simulate(
        stacks(TraceBuilder::new(1)),
        ev,
        3500 * MS,
        glibc_keeps_everything,
    )
}

// ---- helpers ----

fn read(bytes: &[u8]) -> Trace {
    read_trace(bytes).expect("a readable trace")
}

fn text(r: &Report) -> String {
    let mut out = Vec::new();
    write_text(r, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// Resolves `spec` as the binary does: a first pass for the trace's length
/// and peak, then a pass with the snapshots.
fn resolve(bytes: &[u8], spec: &str) -> u64 {
    let first = read(bytes);
    spec.parse::<TimeSpec>()
        .unwrap()
        .resolve(first.last_ts, first.memory.live_peak_ts)
}

fn report_at(bytes: &[u8], spec: &str) -> Report {
    let ns = resolve(bytes, spec);
    let t = read_trace_with(bytes, vec![Snapshot::new(ns, None)]).unwrap();
    let opts = ReportOptions {
        at: Some(Moment {
            ns,
            label: spec.to_string(),
            snapshot: 0,
        }),
        ..ReportOptions::default()
    };
    build_report(&t, "trace.bin", &mut fake_symbols(), &opts)
}

fn window(bytes: &[u8], from: &str, to: &str) -> DiffReport {
    let (t1, t2) = (resolve(bytes, from), resolve(bytes, to));
    let t = read_trace_with(
        bytes,
        vec![Snapshot::new(t1, None), Snapshot::new(t2, Some(t1))],
    )
    .unwrap();
    let m = |ns, label: &str, snapshot| Moment {
        ns,
        label: label.to_string(),
        snapshot,
    };
    diff::window_diff(
        &t,
        "trace.bin",
        &mut fake_symbols(),
        &ReportOptions::default(),
        &m(t1, from, 0),
        &m(t2, to, 1),
    )
}

fn diff_text(r: &DiffReport) -> String {
    let mut out = Vec::new();
    diff::write_text(r, &mut out).unwrap();
    String::from_utf8(out).unwrap()
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

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mtrace-analyze-time-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtrace-analyze"))
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

// ---- RSS beside live bytes ----

#[test]
fn memory_kept_by_glibc_after_frees_is_diagnosed_as_retention() {
    let t = read(&retention_program().bytes());
    let r = build_report(
        &t,
        "trace.bin",
        &mut fake_symbols(),
        &ReportOptions::default(),
    );
    let m = &r.memory;
    assert_eq!(m.stats_records, 50);
    assert!(m.allocator_stats);
    assert_eq!(m.live_end, 7 * 65536);
    assert_eq!(m.rss_end, Some(410 * MIB));
    assert_eq!(m.free_held_end, Some(400 * MIB - 7 * 65536));
    assert_eq!(m.live_peak, 400 * MIB);
    assert!(!m.live_grows);
    let d = m.retention_diagnosis.as_deref().expect("a diagnosis");
    assert!(d.contains("Nothing is leaked"), "{d}");
    check_golden("retention.txt", &text(&r));
}

#[test]
fn a_true_leak_is_not_called_retention() {
    let t = read(&leaking_program().bytes());
    let r = build_report(
        &t,
        "trace.bin",
        &mut fake_symbols(),
        &ReportOptions::default(),
    );
    assert_eq!(r.memory.retention_diagnosis, None);
    assert!(r.memory.live_grows);
    let out = text(&r);
    assert!(!out.contains("Nothing is leaked"), "{out}");
    assert!(out.contains("  growth:    live bytes rose by"), "{out}");
}

#[test]
fn retention_with_a_leak_growing_into_it_is_not_called_harmless() {
    // RSS is far above live and glibc holds most of the gap, but the live
    // bytes grow: "nothing is leaked" would be wrong.
    let t = read(&retention_and_leak_program().bytes());
    let r = build_report(
        &t,
        "trace.bin",
        &mut fake_symbols(),
        &ReportOptions::default(),
    );
    let m = &r.memory;
    assert!(m.rss_end.unwrap() > 2 * m.live_end);
    assert!(m.free_held_end.unwrap() > 250 * MIB);
    assert!(m.live_grows);
    assert_eq!(m.retention_diagnosis, None);
}

#[test]
fn without_glibc_figures_the_report_says_so_instead_of_zeros() {
    // jemalloc or tcmalloc preloaded: STATS carry RSS only.
    let b = stacks(TraceBuilder::new(1))
        .alloc(10 * MS, 0x1000, 5 * MIB, 2)
        .stats_fields(100 * MS, &[(stat::RSS, 300 * MIB)])
        .end(200 * MS);
    let p = write_temp("jemalloc.bin", &b.bytes());
    let out = cli(&[p.to_str().unwrap()]);
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.contains(
            "  memory:    at end (0.100 s): RSS 300.0 MiB, live 5.0 MiB; \
             allocator statistics not available (not glibc malloc)\n"
        ),
        "{s}"
    );
    let v = json(&cli(&[p.to_str().unwrap(), "--format", "json"]));
    let m = &v["memory"];
    assert_eq!(m["rss_end"], 300 * MIB);
    assert_eq!(m["live_end"], 5 * MIB);
    assert_eq!(m["allocator_stats"], false);
    assert!(m["free_held_end"].is_null());
    assert!(m["arena_end"].is_null());
    assert!(m["retention_diagnosis"].is_null());
    // The fields the end-to-end tests read are still there.
    assert_eq!(v["totals"]["bytes"], 5 * MIB);
    assert_eq!(v["trace"]["mode"], "exact");
}

#[test]
fn cli_json_memory_of_the_retention_program() {
    let p = write_temp("retention.bin", &retention_program().bytes());
    let v = json(&cli(&[p.to_str().unwrap(), "--format", "json"]));
    let m = &v["memory"];
    assert_eq!(m["rss_peak"], 410 * MIB);
    assert_eq!(m["free_held_end"], 400 * MIB - 7 * 65536);
    assert_eq!(m["live_end"], 7 * 65536);
    assert!(m["retention_diagnosis"]
        .as_str()
        .unwrap()
        .contains("MALLOC_ARENA_MAX=2"));
    assert!(v["at"].is_null());
}

// ---- timeline ----

#[test]
fn timeline_table_json_and_svg() {
    let p = write_temp("timeline.bin", &retention_program().bytes());
    let path = p.to_str().unwrap();
    let out = cli(&["timeline", path, "--points", "11"]);
    assert!(out.status.success());
    check_golden("timeline.txt", &String::from_utf8(out.stdout).unwrap());

    let v = json(&cli(&["timeline", path, "--format", "json"]));
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 40, "--points defaults to 40");
    assert_eq!(points.last().unwrap()["rss"], 410 * MIB);
    assert_eq!(v["allocator_stats"], true);

    let svg_path = p.with_extension("svg");
    let out = cli(&[
        "timeline",
        path,
        "--format",
        "svg",
        "-o",
        svg_path.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    // Five series, each a line with its legend entry.
    assert_eq!(svg.matches("<polyline").count(), 5, "{svg}");
    for name in ["RSS", "live bytes", "allocator free", "arena", "mmapped"] {
        assert!(svg.contains(&format!(">{name}")), "{name}");
    }
    assert!(svg.contains("time since start (s)") && svg.contains(">MiB<"));
}

#[test]
fn a_trace_without_stats_still_has_a_live_bytes_timeline() {
    let mut b = stacks(TraceBuilder::new(1));
    for i in 0..30u64 {
        b = b.alloc(i * 50 * MS, 0x1000 + i * 0x100, 1000, 2);
    }
    let p = write_temp("nostats.bin", &b.end(1500 * MS).bytes());
    let v = json(&cli(&[
        "timeline",
        p.to_str().unwrap(),
        "--format",
        "json",
        "--points",
        "0",
    ]));
    let points = v["points"].as_array().unwrap();
    // Every 100 ms of trace time, and the end.
    assert_eq!(points.len(), 16);
    assert!(points.iter().all(|p| p["rss"].is_null()));
    assert_eq!(points.last().unwrap()["live"], 30_000.0);
}

// ---- --at and diff ----

#[test]
fn a_slow_leak_leads_the_growth_window_and_the_cache_leads_the_end() {
    let bytes = slow_leak_program(1000).bytes();
    // At the end, the cache holds the most.
    let r = build_report(
        &read(&bytes),
        "trace.bin",
        &mut fake_symbols(),
        &ReportOptions::default(),
    );
    assert_eq!(r.callers[0].function.as_deref(), Some("Cache::insert(int)"));
    assert_eq!(r.callers[0].bytes, 1_000_000);
    assert_eq!(r.callers[1].function.as_deref(), Some("leak_on_error"));
    assert_eq!(r.callers[1].bytes, 300_000);

    // From a quarter in to the end, only the leak grows, at 300 B per
    // 100 ms: 180,000 B per minute.
    let d = window(&bytes, "25%", "100%");
    assert_eq!(d.from.as_ref().unwrap().ns, 25 * S);
    assert_eq!(d.to.as_ref().unwrap().ns, 100 * S);
    let leak = &d.callers[0];
    assert_eq!(leak.function.as_deref(), Some("leak_on_error"));
    assert_eq!(leak.growth.growth_bytes, 750 * 300);
    assert_eq!(leak.growth.growth_objects, 750);
    assert_eq!(leak.growth.allocated_bytes, Some(750 * 300));
    assert_eq!(leak.growth.freed_bytes, Some(0));
    let rate = leak.growth.bytes_per_minute.unwrap();
    assert!((rate - 180_000.0).abs() < 1.0, "{rate}");
    assert!(
        d.callers
            .iter()
            .all(|c| c.function.as_deref() != Some("Cache::insert(int)")),
        "the cache did not grow in the window"
    );
    assert_eq!(d.totals.growth_bytes, 750 * 300);
    check_golden("window_diff.txt", &diff_text(&d));

    // The same through the binary.
    let p = write_temp("slow_leak.bin", &bytes);
    let v = json(&cli(&[
        "diff",
        p.to_str().unwrap(),
        "--from",
        "25%",
        "--to",
        "100%",
        "--format",
        "json",
    ]));
    assert_eq!(v["kind"], "window");
    assert_eq!(v["callers"][0]["growth_bytes"], 225_000);
    assert_eq!(v["callers"][0]["bytes_per_minute"], 180_000.0);
    assert_eq!(v["from"]["label"], "25%");
}

#[test]
fn a_window_over_the_cache_fill_shows_the_cache_first() {
    let d = window(&slow_leak_program(1000).bytes(), "0", "2s");
    assert_eq!(d.callers[0].function.as_deref(), Some("Cache::insert(int)"));
    assert_eq!(d.callers[0].growth.growth_bytes, 1_000_000);
    assert_eq!(d.callers[1].growth.growth_bytes, 20 * 300);
}

#[test]
fn at_peak_shows_the_blocks_live_in_the_middle() {
    let bytes = peak_in_the_middle_program().bytes();
    let t = read(&bytes);
    assert_eq!(t.memory.live_peak_ts, S);
    assert_eq!(t.memory.live_peak.round() as u64, 10 * MIB + 500);

    let r = report_at(&bytes, "peak");
    assert_eq!(r.at.as_ref().unwrap().ns, S);
    assert_eq!(r.totals.bytes, 10 * MIB + 500);
    assert_eq!(r.callers[0].function.as_deref(), Some("fill_table"));
    assert_eq!(r.callers[0].objects, 10);
    assert_eq!(r.callers[1].objects, 5);
    check_golden("at_peak.txt", &text(&r));

    // Half-way through the load, by seconds and by percentage.
    let r = report_at(&bytes, "0.55s");
    assert_eq!(r.callers[0].objects, 5);
    let r = report_at(&bytes, "50%");
    assert_eq!(r.at.as_ref().unwrap().ns, 1750 * MS);
    assert_eq!(r.callers[0].bytes, 10 * MIB);

    // And at the end only the cache is left.
    let r = report_at(&bytes, "end");
    assert_eq!(r.totals.bytes, 1000);

    let p = write_temp("peak.bin", &bytes);
    let v = json(&cli(&[
        p.to_str().unwrap(),
        "--at",
        "peak",
        "--format",
        "json",
    ]));
    assert_eq!(v["at"]["ns"], S);
    assert_eq!(v["totals"]["bytes"], 10 * MIB + 500);
    assert_eq!(v["memory"]["live_peak_ns"], S);
    let out = cli(&["report", p.to_str().unwrap(), "--at", "peak"]);
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.contains("  live peak: 10.0 MiB (10,486,260 bytes) at 1.000 s\n"),
        "{s}"
    );
    assert!(
        s.contains("Outstanding at 1.000 s (peak): 10,486,260 bytes in 15 objects"),
        "{s}"
    );
}

#[test]
fn diffing_two_runs_matches_callers_by_name_not_address() {
    // The second run is longer and its executable is loaded elsewhere
    // (ASLR): the same functions must still match.
    let old = slow_leak_program(400).bytes();
    let shift = 0x1234_0000u64;
    let new = {
        use at::*;
        let s = |a: u64| if a >> 28 == 5 { a + shift } else { a };
        let b = TraceBuilder::new(1)
            .program("/work/svc", &["./svc"])
            .module("/work/svc", 0x5000_0000 + shift, 0x10_0000)
            .stack(
                1,
                &[
                    s(MALLOC_IN_XMALLOC),
                    s(XMALLOC_IN_LEAK),
                    s(LEAK_IN_HANDLE),
                    s(HANDLE_IN_MAIN),
                    MAIN_IN_LIBC,
                ],
            )
            .stack(2, &[s(NEW_IN_CACHE), s(CACHE_IN_MAIN), MAIN_IN_LIBC])
            .stack(3, &[s(VEC_GROW_IN_FILL), s(FILL_IN_MAIN), MAIN_IN_LIBC]);
        let mut ev = Vec::new();
        for i in 0..1000u64 {
            ev.push((
                (i + 1) * MS,
                Ev::Alloc {
                    addr: 0x10_0000 + i * 0x400,
                    size: 1000,
                    stack: 2,
                },
            ));
        }
        for i in 0..900u64 {
            ev.push((
                i * 100 * MS + 50 * MS,
                Ev::Alloc {
                    addr: 0x100_0000 + i * 0x200,
                    size: 300,
                    stack: 1,
                },
            ));
        }
        simulate(b, ev, 90 * S, glibc_keeps_everything).bytes()
    };
    let (po, pn) = (write_temp("old.bin", &old), write_temp("new.bin", &new));
    let v = json(&cli(&[
        "diff",
        po.to_str().unwrap(),
        pn.to_str().unwrap(),
        "--format",
        "json",
    ]));
    assert_eq!(v["kind"], "traces");
    let callers = v["callers"].as_array().unwrap();
    // The module file does not exist, so callers are module+offset, which
    // is the same in both runs.
    assert_eq!(callers.len(), 1, "{callers:?}");
    assert_eq!(callers[0]["growth_bytes"], 500 * 300);
    assert_eq!(callers[0]["from_objects"], 400);
    assert_eq!(callers[0]["to_objects"], 900);
    assert_eq!(callers[0]["module"], "svc");
    assert!(callers[0]["bytes_per_minute"].is_null());

    // With names (the library and a symbolizer): the leak by name.
    let (o, n) = (read(&old), read(&slow_leak_program(900).bytes()));
    let d = diff::trace_diff(
        &o,
        "old.bin",
        &mut fake_symbols(),
        &n,
        "new.bin",
        &mut fake_symbols(),
        &ReportOptions::default(),
    );
    assert_eq!(d.callers.len(), 1);
    assert_eq!(d.callers[0].function.as_deref(), Some("leak_on_error"));
    check_golden("trace_diff.txt", &diff_text(&d));
}

#[test]
fn cli_time_errors_are_plain() {
    let p = write_temp("errors.bin", &slow_leak_program(10).bytes());
    let path = p.to_str().unwrap();
    let out = cli(&[path, "--at", "tomorrow"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read the time \"tomorrow\""), "{err}");
    let out = cli(&["diff", path, "--from", "80%", "--to", "20%"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must go forward in time"));
    let out = cli(&["diff", path, path, "--from", "20%"]);
    assert!(!out.status.success());
}

// ---- folded stacks and flamegraphs ----

#[test]
fn folded_stacks_for_each_metric() {
    use mtrace_analyze::flame::{folded, Metric};
    let t = read(&slow_leak_program(1000).bytes());
    let lines = folded(&t, &mut fake_symbols(), Metric::Outstanding, None);
    assert_eq!(
        lines,
        [
            (
                "__libc_start_call_main;Cache::insert(int);operator new(unsigned long)".to_string(),
                1_000_000
            ),
            (
                "__libc_start_call_main;main;handle_request;leak_on_error;xmalloc".to_string(),
                300_000
            ),
        ]
    );
    let lines = folded(&t, &mut fake_symbols(), Metric::Allocated, None);
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[1],
        (
            "__libc_start_call_main;main;fill_table;\
             std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(int const&)"
                .to_string(),
            1000 * 4096
        )
    );
    let lines = folded(&t, &mut fake_symbols(), Metric::Count, None);
    let counts: Vec<u64> = lines.iter().map(|l| l.1).collect();
    assert_eq!(counts, [1000, 1000, 1000]);
}

#[test]
fn cli_collapsed_and_flamegraph() {
    let p = write_temp("flame.bin", &peak_in_the_middle_program().bytes());
    let path = p.to_str().unwrap();
    // The module file does not exist: frames are module+offset, and the
    // address outside every module is bare.
    let out = cli(&[path, "--format", "collapsed", "--at", "peak"]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    let values: Vec<&str> = s.lines().filter_map(|l| l.rsplit(' ').next()).collect();
    assert_eq!(values, ["500", "10485760"], "{s}");
    assert!(
        s.starts_with("0x70005050;svc+0x7070;svc+0x6060 500\n"),
        "{s}"
    );

    let svg = p.with_extension("flame.svg");
    for metric in ["outstanding", "allocated", "count"] {
        let out = cli(&[
            "flamegraph",
            path,
            "-o",
            svg.to_str().unwrap(),
            "--metric",
            metric,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("</svg>"));
    }
    let out = cli(&[
        "flamegraph",
        path,
        "--format",
        "collapsed",
        "--metric",
        "count",
    ]);
    let s = String::from_utf8(out.stdout).unwrap();
    let total: u64 = s
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 20);
}
