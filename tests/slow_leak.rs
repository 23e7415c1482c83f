//! Growth over time on a real program (tests/programs/slow_leak.c): a slow
//! leak of 300 B per disconnect at a steady rate beside a 1 MiB cache filled
//! once at start. At the end the cache holds the most; in the window from
//! 25% to the end the leak grows and the cache does not, at the rate the
//! program leaks; and `--at peak` finds the 4 MiB burst in the middle.

use mtrace_rs_tests::{analyze, artifacts, compile, Scratch, Tracer};
use std::process::Command;

fn json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(&artifacts().analyzer)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(callers: &'a serde_json::Value, f: &str) -> Option<&'a serde_json::Value> {
    callers
        .as_array()?
        .iter()
        .find(|c| c["function"].as_str() == Some(f))
}

#[test]
fn a_slow_leak_shows_first_in_the_growth_window_and_the_cache_at_the_end() {
    let scratch = Scratch::new("slow-leak");
    let exe = compile("tests/programs/slow_leak.c", scratch.path());
    let tracer = Tracer::exact(&scratch.dir("traces"));
    let out = tracer.run(&mut Command::new(&exe));
    assert!(out.status.success(), "{out:?}");
    let trace = tracer.only_trace();
    let path = trace.to_str().unwrap();

    // At the end: the cache first, then the 600 leaked blocks.
    let report = analyze(&trace);
    let callers = &report.json["callers"];
    assert_eq!(callers[0]["function"], "fill_cache", "{callers}");
    assert_eq!(callers[0]["bytes"], 64 * 16384);
    let leak = find(callers, "on_disconnect").expect("on_disconnect at the end");
    assert_eq!(
        (leak["bytes"].as_u64(), leak["objects"].as_u64()),
        (Some(180_000), Some(600))
    );

    // From 25% on: the leak first, growing by what the program leaked in
    // that window, the cache not at all.
    let d = json(&[
        "diff", path, "--from", "25%", "--to", "100%", "--format", "json",
    ]);
    let rows = d["callers"].as_array().unwrap_or_else(|| panic!("{d}"));
    let first = &rows[0];
    assert_eq!(first["function"], "on_disconnect", "{d}");
    let grown = first["growth_bytes"].as_i64().unwrap();
    // About 75% of 600 disconnects (start-up before the first one shifts
    // the window a little).
    assert!((100_000..=160_000).contains(&grown), "grew {grown}: {d}");
    let rate = first["bytes_per_minute"].as_f64().unwrap();
    let secs = report.json["trace"]["duration_ns"].as_f64().unwrap() / 1e9;
    // 180,000 bytes over the trace's duration, per minute, within 30%
    // (the first 25% include start-up and the cache fill).
    let expected = 180_000.0 / secs * 60.0;
    assert!(
        (rate / expected - 1.0).abs() < 0.3,
        "rate {rate} vs {expected}: {d}"
    );
    assert!(
        find(&d["callers"], "fill_cache").is_none_or(|c| c["growth_bytes"] == 0),
        "{d}"
    );

    // At the peak of live bytes: the 4 MiB index burst.
    let at = json(&[path, "--at", "peak", "--format", "json"]);
    let index = find(&at["callers"], "build_index").unwrap_or_else(|| panic!("{at}"));
    assert_eq!(index["bytes"], 64 * 65536, "{at}");
}
