//! Fuzzes the suppressions parser (`Suppressions::add_file`) and the
//! LeakSanitizer-style matcher (`template_match`) on what it parsed.
//!
//! The input is text: it is parsed as a suppressions file, and every pattern
//! that parses is matched against every line of the input (so the subjects
//! share the patterns' odd characters: `*`, `^`, `$`, multi-byte UTF-8).
//! Nothing may panic, and matching must stay fast on patterns with many
//! stars (libFuzzer's -timeout catches a blow-up).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtrace_analyze::suppress::{template_match, Suppressions};
use mtrace_analyze::symbolize::Frame;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut s = Suppressions::none();
    let parsed = s.add_file("fuzz.supp", text);
    if let Err(e) = &parsed {
        // The error names the file and a line that exists.
        assert!(e.line >= 1 && e.line <= text.lines().count(), "{e}");
        let _ = e.to_string();
    }
    let subjects: Vec<&str> = text.lines().take(16).collect();
    for sup in s.list.iter().take(16) {
        assert!(!sup.pattern.is_empty());
        for subject in &subjects {
            let _ = template_match(&sup.pattern, subject);
        }
        let _ = sup.text();
    }
    let frames: Vec<Frame> = subjects
        .iter()
        .map(|&l| Frame {
            function: Some(l.to_string()),
            file: Some(l.to_string()),
            module: Some(l.to_string()),
            ..Frame::default()
        })
        .collect();
    let _ = s.find(&frames, Some(0));
    let _ = s.find(&frames, frames.len().checked_sub(1));
});
