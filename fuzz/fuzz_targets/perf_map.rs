//! Fuzzes the perf-map reader (`mtrace_analyze::symbolize::read_perf_map`)
//! and the JIT-code lookup built from what it read.
//!
//! The input is the text of a `/tmp/perf-<pid>.map`. Every range read is
//! looked up at its first and last byte and just outside it (with
//! wrapping arithmetic: a hostile map may put a range at the top of the
//! address space). Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtrace_analyze::symbolize::{read_perf_map, ElfSymbolizer, Symbolizer};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ranges = read_perf_map(text);
    for r in &ranges {
        assert!(!r.name.is_empty());
        assert_eq!(r.name, r.name.trim());
    }
    let mut sym = ElfSymbolizer::new(&[], Vec::new()).with_code(&ranges);
    for r in ranges.iter().take(64) {
        for addr in [
            r.start,
            r.start.wrapping_add(1),
            r.start.wrapping_add(r.len),
            r.start.wrapping_add(r.len).wrapping_add(1),
            r.start.wrapping_sub(1),
        ] {
            let frames = sym.symbolize(addr);
            assert!(!frames.is_empty());
        }
    }
    let _ = sym.symbolize(0);
    let _ = sym.symbolize(u64::MAX);
});
