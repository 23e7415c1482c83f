//! Helpers shared by the analyzer's tests: a builder of in-memory traces and
//! a synthetic symbolizer, so that no real process or ELF file is needed.

#![allow(dead_code)]

use std::collections::HashMap;

use mtrace_analyze::symbolize::{Frame, Symbolizer};
use mtrace_format::{mark, DropReason, Encoder, Header, Module, FLAG_CLEAN_END, HEADER_SIZE};

/// Builds a trace file record by record.
pub struct TraceBuilder {
    enc: Encoder,
    body: Vec<u8>,
    pub header: Header,
}

impl TraceBuilder {
    /// A trace with the given sample rate (1 = exact mode).
    pub fn new(sample_rate: u64) -> TraceBuilder {
        TraceBuilder {
            enc: Encoder::new(),
            body: Vec::new(),
            header: Header {
                version: mtrace_format::FORMAT_VERSION,
                committed: 0,
                flags: 0,
                pid: 1234,
                ppid: 1200,
                max_depth: 64,
                start_realtime_ns: 1_795_638_667_000_000_000,
                start_monotonic_ns: 1_000,
                sample_rate,
            },
        }
    }

    pub fn info(mut self, key: &str, value: &[u8]) -> Self {
        self.enc.info(&mut self.body, key.as_bytes(), value);
        self
    }

    pub fn program(self, exe: &str, args: &[&str]) -> Self {
        self.info("exe", exe.as_bytes())
            .info("cmdline", args.join("\0").as_bytes())
            .info("cwd", b"/tmp")
    }

    pub fn module(mut self, path: &str, start: u64, len: u64) -> Self {
        let m = Module {
            ts: 0,
            bias: start,
            path: path.as_bytes().to_vec(),
            build_id: Vec::new(),
            segments: vec![(start, len)],
        };
        self.enc.module(&mut self.body, &m);
        self
    }

    pub fn stack(mut self, id: u64, frames: &[u64]) -> Self {
        self.enc.stack(&mut self.body, id, frames);
        self
    }

    pub fn alloc(mut self, ts: u64, addr: u64, size: u64, stack: u64) -> Self {
        self.enc.alloc(&mut self.body, ts, addr, size, stack, false);
        self
    }

    pub fn sample(mut self, ts: u64, addr: u64, size: u64, stack: u64) -> Self {
        self.enc.alloc(&mut self.body, ts, addr, size, stack, true);
        self
    }

    pub fn free(mut self, ts: u64, addr: u64) -> Self {
        self.enc.free(&mut self.body, ts, addr);
        self
    }

    pub fn realloc(self, ts: u64, old: u64, new: u64, size: u64, stack: u64) -> Self {
        self.free(ts, old).alloc(ts, new, size, stack)
    }

    pub fn dropped(mut self, reason: DropReason, total: u64) -> Self {
        self.enc.dropped(&mut self.body, reason, total);
        self
    }

    pub fn stats(mut self, ts: u64) -> Self {
        self.enc.stats(&mut self.body, ts, &[(1, 4096), (2, 8192)]);
        self
    }

    /// A STATS record with these (field, value) pairs.
    pub fn stats_fields(mut self, ts: u64, fields: &[(u64, u64)]) -> Self {
        self.enc.stats(&mut self.body, ts, fields);
        self
    }

    pub fn forked(mut self, ts: u64) -> Self {
        self.enc.mark(&mut self.body, ts, mark::FORKED, 1200);
        self
    }

    pub fn end(mut self, ts: u64) -> Self {
        self.enc.end(&mut self.body, ts);
        self.header.flags |= FLAG_CLEAN_END;
        self
    }

    /// Appends raw bytes to the record stream (for damage).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.body.extend_from_slice(bytes);
        self
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut h = self.header.clone();
        h.committed = self.body.len() as u64;
        let mut out = vec![0u8; HEADER_SIZE];
        h.encode(&mut out);
        out.extend_from_slice(&self.body);
        out
    }
}

/// A symbolizer from a table: return address -> frames (function, file,
/// line, module), innermost inlined first. Unknown addresses have no name.
#[derive(Default)]
pub struct FakeSymbolizer {
    table: HashMap<u64, Vec<Frame>>,
}

impl FakeSymbolizer {
    pub fn with(mut self, ret: u64, frames: &[(&str, &str, u32, &str)]) -> Self {
        let n = frames.len();
        let frames = frames
            .iter()
            .enumerate()
            .map(|(i, &(function, file, line, module))| Frame {
                function: (!function.is_empty()).then(|| function.to_string()),
                file: (!file.is_empty()).then(|| file.to_string()),
                line: (line != 0).then_some(line),
                module: Some(module.to_string()),
                offset: ret & 0xffff,
                inlined: i + 1 < n,
            })
            .collect();
        self.table.insert(ret, frames);
        self
    }
}

impl Symbolizer for FakeSymbolizer {
    fn symbolize(&mut self, ret: u64) -> Vec<Frame> {
        self.table.get(&ret).cloned().unwrap_or_else(|| {
            vec![Frame {
                module: Some("unknown.so".into()),
                offset: ret & 0xffff,
                ..Frame::default()
            }]
        })
    }
}

/// Return addresses used by the synthetic program in the tests.
pub mod at {
    pub const MALLOC_IN_XMALLOC: u64 = 0x5000_1010;
    pub const XMALLOC_IN_LEAK: u64 = 0x5000_2020;
    pub const LEAK_IN_HANDLE: u64 = 0x5000_3030;
    pub const HANDLE_IN_MAIN: u64 = 0x5000_4040;
    pub const MAIN_IN_LIBC: u64 = 0x7000_5050;
    pub const NEW_IN_CACHE: u64 = 0x5000_6060;
    pub const CACHE_IN_MAIN: u64 = 0x5000_7070;
    pub const VEC_GROW_IN_FILL: u64 = 0x5000_8080;
    pub const FILL_IN_MAIN: u64 = 0x5000_9090;
    pub const NOWHERE: u64 = 0x6000_0123;
}

/// The synthetic program's symbols.
pub fn fake_symbols() -> FakeSymbolizer {
    use at::*;
    FakeSymbolizer::default()
        .with(MALLOC_IN_XMALLOC, &[("xmalloc", "util.c", 12, "leaky")])
        .with(XMALLOC_IN_LEAK, &[("leak_on_error", "leaky.c", 42, "leaky")])
        .with(LEAK_IN_HANDLE, &[("handle_request", "leaky.c", 80, "leaky")])
        .with(HANDLE_IN_MAIN, &[("main", "leaky.c", 120, "leaky")])
        .with(MAIN_IN_LIBC, &[("__libc_start_call_main", "", 0, "libc.so.6")])
        .with(
            NEW_IN_CACHE,
            &[("operator new(unsigned long)", "new_op.cc", 50, "libstdc++.so.6")],
        )
        .with(CACHE_IN_MAIN, &[("Cache::insert(int)", "/src/cache.cc", 7, "leaky")])
        .with(
            VEC_GROW_IN_FILL,
            &[
                (
                    "std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(int const&)",
                    "/usr/include/c++/12/bits/vector.tcc",
                    1287,
                    "leaky",
                ),
                ("fill_table", "table.cc", 33, "leaky"),
            ],
        )
        .with(FILL_IN_MAIN, &[("main", "leaky.c", 125, "leaky")])
}
