//! Fuzzes the trace decoder (`mtrace_format::Decoder`). The `analyze`
//! target feeds the same inputs on through the analyzer's replay.
//!
//! Inputs are shaped as `decoder_input.rs` says.
//!
//! The first byte's upper bits choose how many bytes each `read` returns,
//! so records that straddle the decoder's buffer refills are decoded too; the records
//! must come out the same as when the file is read in one go (a differential
//! check of the refill logic). The batched decoder (`Decoder::next_batch`,
//! with its fast path for events whose bytes are all buffered) must yield
//! the same records, in the same order, and the same error, through the same
//! short reads. Nothing may panic, and no record count or allocation may
//! grow without bound.
#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use mtrace_format::{Batch, Decoder, Record};

#[path = "decoder_input.rs"]
mod decoder_input;

/// A reader that returns at most `chunk` bytes per call.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len()).min(self.chunk);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Every record up to the end or the first error, and the error's text.
fn decode<R: Read>(r: R) -> (Vec<Record>, Option<String>) {
    let mut out = Vec::new();
    let mut d = match Decoder::new(r) {
        Ok(d) => d,
        Err(e) => return (out, Some(e.to_string())),
    };
    loop {
        match d.next() {
            Ok(Some(rec)) => out.push(rec),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
}

/// The same as `decode`, through `next_batch` in batches of `max` events.
fn decode_batched<R: Read>(r: R, max: usize) -> (Vec<Record>, Option<String>) {
    let mut out = Vec::new();
    let mut d = match Decoder::new(r) {
        Ok(d) => d,
        Err(e) => return (out, Some(e.to_string())),
    };
    let mut batch = Batch::with_capacity(max);
    loop {
        let more = d.next_batch(&mut batch, max);
        let mut done = 0;
        for (at, rec) in batch.records.drain(..) {
            out.extend(batch.events[done..at].iter().map(|e| e.to_record()));
            done = at;
            out.push(rec);
        }
        out.extend(batch.events[done..].iter().map(|e| e.to_record()));
        batch.events.clear();
        match more {
            Ok(true) => {}
            Ok(false) => return (out, None),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = decoder_input::file(data) else {
        return;
    };
    let chunk = 1 + (data[0] >> 1) as usize;
    let whole = decode(&bytes[..]);
    let trickled = decode(Trickle {
        data: &bytes,
        chunk,
    });
    assert_eq!(
        whole, trickled,
        "short reads of {chunk} bytes decode differently"
    );
    let max = 1 + (data.len() % 64);
    let batched = decode_batched(
        Trickle {
            data: &bytes,
            chunk,
        },
        max,
    );
    assert_eq!(
        whole, batched,
        "batches of {max} events through short reads of {chunk} bytes decode differently"
    );
});
