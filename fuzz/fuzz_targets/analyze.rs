//! Fuzzes the analyzer's replay of a trace (`mtrace_analyze::analysis`):
//! whatever the decoder yields, reading must end with a trace (or a one-line
//! error for a file that is not one), never a panic. Inputs are shaped as
//! for the `decoder` target, whose corpus this one shares.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "decoder_input.rs"]
mod decoder_input;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = decoder_input::file(data) else {
        return;
    };
    if let Ok(trace) = mtrace_analyze::analysis::read_trace(&bytes[..]) {
        let _ = trace.live_by_stack();
        let _ = mtrace_analyze::report::memory_out(&trace);
    }
});
