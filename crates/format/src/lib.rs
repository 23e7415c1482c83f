//! The mtrace-rs trace file format, shared by the tracer (`libmtrace_rs.so`,
//! which encodes) and `mtrace-analyze` (which decodes).
//!
//! A trace is one file per traced process. It starts with a fixed 4096-byte
//! header page, followed by a stream of variable-length records. The tracer
//! writes records with `pwrite` and the header through a shared mapping, so
//! whatever it has written is in the page cache when the process is killed;
//! the header's `committed` field says how many bytes of the record stream
//! are whole, and the decoder never reads past it. A file that ends without
//! an [`Record::End`] record was cut off (the process was killed or called
//! `_exit` before the tracer could finish), and the decoder says so instead
//! of failing.
//!
//! ```text
//! header page (little-endian, offsets in bytes)
//!   0  [u8; 8]  magic "MTRACERS"
//!   8  u32      format version (FORMAT_VERSION)
//!  12  u32      header size (4096): the record stream starts here
//!  16  u64      committed: bytes of the record stream that hold whole records;
//!               the writer stores it (release) after each batch it copies in
//!  24  u32      flags: bit 0 = the END record was written (clean finish)
//!  28  u32      pid
//!  32  u32      parent pid
//!  36  u32      maximum stack depth the tracer captures
//!  40  u64      start time, nanoseconds since the Unix epoch (CLOCK_REALTIME)
//!  48  u64      start time on CLOCK_MONOTONIC, in nanoseconds: the origin of
//!               every event time stamp in the stream
//!  56  u64      sample rate: mean bytes between samples; 1 = exact mode
//!  64  ..4096   zero
//!
//! record stream: each record is a tag byte, then fields. `uv` is an unsigned
//! LEB128 varint, `sv` a zigzag-encoded signed varint, `bytes` is `uv` length
//! followed by that many bytes. Event time stamps (`dt`) and addresses (`da`)
//! are deltas against the previous timed record / previous event address, so
//! a typical exact-mode event costs 6 to 10 bytes.
//!   0x00  never written: zero padding after the committed end
//!   0x01  INFO     key: bytes, value: bytes      (executable, command line, ...)
//!   0x02  MODULE   dt: sv, load bias: uv, path: bytes, build id: bytes,
//!                  nsegs: uv, nsegs x (start: uv, len: uv) absolute ranges
//!   0x03  STACK    id: uv, nframes: uv, first: uv, then nframes-1 x delta: sv
//!                  (return addresses, innermost first; id 0 = unknown stack)
//!   0x04  ALLOC    dt: sv, da: sv, size: uv, stack: uv   recorded with weight 1
//!                  (exact mode, or a block at least as large as the rate)
//!   0x05  SAMPLE   dt: sv, da: sv, size: uv, stack: uv   a Poisson sample
//!                  that stands for size / (1 - exp(-size / rate)) bytes
//!   0x06  FREE     dt: sv, da: sv
//!   0x07  DROPPED  reason: uv, total: uv   running total; the last one counts
//!   0x08  STATS    dt: sv, n: uv, n x (field: uv, value: uv)
//!   0x09  END      dt: sv                 the tracer finished cleanly
//!   0x0a  MARK     dt: sv, what: uv, value: uv  process events (fork, exec)
//!   0x0b  CODE     dt: sv, start: uv, len: uv, name: bytes   (version 2)
//!                  generated code (a JIT-compiled Java method, a JVM stub)
//!                  at [start, start + len) from this time on
//!   0x0c  SCAN     dt: sv, live: uv, n: uv, n x addr delta: sv   (version 2)
//!                  the leak scan at exit: of `live` blocks live then, the `n`
//!                  listed (ascending addresses, first delta from 0) were
//!                  unreachable (no pointer to them from data segments, the
//!                  exiting thread's stack and TLS, or reachable blocks);
//!                  the others were reachable
//!   0x0d  MMAP     dt: sv, da: sv, len: uv, stack: uv   (version 2)
//!                  an anonymous mapping the program made (MTRACE_RS_MMAP=1)
//!   0x0e  MUNMAP   dt: sv, da: sv, len: uv             (version 2)
//!                  a range the program unmapped (any kind of mapping)
//! ```
//!
//! Compatibility: a decoder reads every version from `MIN_READABLE_VERSION` to
//! `FORMAT_VERSION`; a new record kind needs a new version.

use std::fmt;
use std::io::{self, Read};

/// The first eight bytes of every trace.
pub const MAGIC: [u8; 8] = *b"MTRACERS";
/// The version this crate writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this crate reads.
pub const MIN_READABLE_VERSION: u32 = 1;
/// Size of the fixed header page; the record stream starts at this offset.
pub const HEADER_SIZE: usize = 4096;
/// Byte offset of the `committed` field inside the header.
pub const COMMITTED_OFFSET: usize = 16;
/// Byte offset of the `flags` field inside the header.
pub const FLAGS_OFFSET: usize = 24;
/// Header flag: the END record was written.
pub const FLAG_CLEAN_END: u32 = 1;

/// Record tags, see the module documentation for their fields.
pub mod tag {
    pub const INFO: u8 = 0x01;
    pub const MODULE: u8 = 0x02;
    pub const STACK: u8 = 0x03;
    pub const ALLOC: u8 = 0x04;
    pub const SAMPLE: u8 = 0x05;
    pub const FREE: u8 = 0x06;
    pub const DROPPED: u8 = 0x07;
    pub const STATS: u8 = 0x08;
    pub const END: u8 = 0x09;
    pub const MARK: u8 = 0x0a;
    pub const CODE: u8 = 0x0b;
    pub const SCAN: u8 = 0x0c;
    pub const MMAP: u8 = 0x0d;
    pub const MUNMAP: u8 = 0x0e;
}

/// Why events were dropped; the numbers are part of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A thread's ring was full and the writer did not catch up in time.
    RingFull,
    /// An allocation hook ran again inside the tracer on the same thread (a
    /// signal handler that allocates, or an allocator that calls back).
    Reentrant,
    /// An event happened before the tracer was ready or after it finished.
    NotRunning,
    /// A thread allocated after its thread-exit clean-up had run.
    ThreadExited,
    /// The stack table was full: the event was kept, its stack was not.
    StackTableFull,
    /// The table of sampled addresses was full: a sampled block went
    /// unrecorded.
    SampleTableFull,
    /// Writing the trace file failed (disk full, ...).
    WriteFailed,
    /// A reason this decoder does not know (written by a newer tracer).
    Other(u64),
}

impl DropReason {
    /// The code stored in the file.
    pub fn code(self) -> u64 {
        match self {
            DropReason::RingFull => 1,
            DropReason::Reentrant => 2,
            DropReason::NotRunning => 3,
            DropReason::ThreadExited => 4,
            DropReason::StackTableFull => 5,
            DropReason::SampleTableFull => 6,
            DropReason::WriteFailed => 7,
            DropReason::Other(c) => c,
        }
    }

    /// The reason for a code read from a file.
    pub fn from_code(code: u64) -> DropReason {
        match code {
            1 => DropReason::RingFull,
            2 => DropReason::Reentrant,
            3 => DropReason::NotRunning,
            4 => DropReason::ThreadExited,
            5 => DropReason::StackTableFull,
            6 => DropReason::SampleTableFull,
            7 => DropReason::WriteFailed,
            c => DropReason::Other(c),
        }
    }

    /// Every reason the tracer writes, in code order.
    pub const ALL: [DropReason; 7] = [
        DropReason::RingFull,
        DropReason::Reentrant,
        DropReason::NotRunning,
        DropReason::ThreadExited,
        DropReason::StackTableFull,
        DropReason::SampleTableFull,
        DropReason::WriteFailed,
    ];

    /// A short human description.
    pub fn describe(self) -> String {
        match self {
            DropReason::RingFull => "ring full (writer fell behind)".into(),
            DropReason::Reentrant => {
                "re-entered the tracer (signal handler or allocator callback)".into()
            }
            DropReason::NotRunning => "before the tracer started or after it finished".into(),
            DropReason::ThreadExited => "after the thread's exit clean-up".into(),
            DropReason::StackTableFull => "stack table full (event kept, stack lost)".into(),
            DropReason::SampleTableFull => "sampled-address table full".into(),
            DropReason::WriteFailed => "writing the trace file failed".into(),
            DropReason::Other(c) => format!("unknown reason {c}"),
        }
    }
}

/// Fields of a STATS record; the numbers are part of the format.
pub mod stat {
    /// Resident set size in bytes.
    pub const RSS: u64 = 1;
    /// Bytes the allocator has obtained from the system for its arenas
    /// (mallinfo2 `arena`).
    pub const ARENA: u64 = 2;
    /// Bytes in use inside the arenas (mallinfo2 `uordblks`).
    pub const IN_USE: u64 = 3;
    /// Free bytes the allocator keeps in its arenas (mallinfo2 `fordblks`).
    pub const FREE_HELD: u64 = 4;
    /// Bytes in blocks the allocator mmap'd directly (mallinfo2 `hblkhd`).
    pub const MMAPPED: u64 = 5;
    /// Releasable top-most free bytes (mallinfo2 `keepcost`).
    pub const KEEPCOST: u64 = 6;
}

/// What a MARK record says happened.
pub mod mark {
    /// This process was forked from the parent named in the header.
    pub const FORKED: u64 = 1;
    /// The process is about to exec another program (value unused).
    pub const EXEC: u64 = 2;
}

/// The fixed part of a trace file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// Bytes of whole records after the header page.
    pub committed: u64,
    pub flags: u32,
    pub pid: u32,
    pub ppid: u32,
    pub max_depth: u32,
    pub start_realtime_ns: u64,
    pub start_monotonic_ns: u64,
    /// Mean bytes between samples; 1 means every allocation is recorded.
    pub sample_rate: u64,
}

impl Header {
    /// Writes the header into the first [`HEADER_SIZE`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_SIZE];
        out.fill(0);
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.committed.to_le_bytes());
        out[24..28].copy_from_slice(&self.flags.to_le_bytes());
        out[28..32].copy_from_slice(&self.pid.to_le_bytes());
        out[32..36].copy_from_slice(&self.ppid.to_le_bytes());
        out[36..40].copy_from_slice(&self.max_depth.to_le_bytes());
        out[40..48].copy_from_slice(&self.start_realtime_ns.to_le_bytes());
        out[48..56].copy_from_slice(&self.start_monotonic_ns.to_le_bytes());
        out[56..64].copy_from_slice(&self.sample_rate.to_le_bytes());
    }

    /// Reads a header, saying exactly what is wrong with a file that is not
    /// one of ours.
    pub fn decode(bytes: &[u8]) -> Result<Header, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.len() < 8 || bytes[0..8] != MAGIC {
            return Err(DecodeError::NotATrace);
        }
        if bytes.len() < 64 {
            return Err(DecodeError::TruncatedHeader {
                len: bytes.len() as u64,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if !(MIN_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(DecodeError::Version { found: version });
        }
        let header_size = u32_at(12);
        if header_size as usize != HEADER_SIZE {
            return Err(DecodeError::Corrupt {
                offset: 12,
                what: format!("header size {header_size}, expected {HEADER_SIZE}"),
            });
        }
        Ok(Header {
            version,
            committed: u64_at(16),
            flags: u32_at(24),
            pid: u32_at(28),
            ppid: u32_at(32),
            max_depth: u32_at(36),
            start_realtime_ns: u64_at(40),
            start_monotonic_ns: u64_at(48),
            sample_rate: u64_at(56),
        })
    }

    /// True when the tracer wrote its END record.
    pub fn clean_end(&self) -> bool {
        self.flags & FLAG_CLEAN_END != 0
    }
}

/// One decoded record. Times are nanoseconds since the trace started and
/// addresses are absolute.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Info {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Module(Module),
    Stack {
        id: u64,
        frames: Vec<u64>,
    },
    /// An allocation. `sampled` is false when the block was recorded with
    /// certainty (exact mode or a block at least as large as the rate).
    Alloc {
        ts: u64,
        addr: u64,
        size: u64,
        stack: u64,
        sampled: bool,
    },
    Free {
        ts: u64,
        addr: u64,
    },
    Dropped {
        reason: DropReason,
        total: u64,
    },
    Stats {
        ts: u64,
        fields: Vec<(u64, u64)>,
    },
    End {
        ts: u64,
    },
    Mark {
        ts: u64,
        what: u64,
        value: u64,
    },
    /// Generated code without a file: a JIT-compiled method or a VM stub.
    Code {
        ts: u64,
        start: u64,
        len: u64,
        name: Vec<u8>,
    },
    /// An anonymous mapping made by the program.
    Mmap {
        ts: u64,
        addr: u64,
        len: u64,
        stack: u64,
    },
    /// A range unmapped by the program.
    Munmap {
        ts: u64,
        addr: u64,
        len: u64,
    },
    /// The leak scan at exit: `unreachable` lists the addresses (ascending)
    /// of the blocks nothing pointed to, out of `live` blocks live then.
    Scan {
        ts: u64,
        live: u64,
        unreachable: Vec<u64>,
    },
}

/// A loaded object (the executable, a shared library, the vdso).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Module {
    pub ts: u64,
    /// The load bias: a file's virtual address plus `bias` is where it is
    /// mapped in the process.
    pub bias: u64,
    pub path: Vec<u8>,
    pub build_id: Vec<u8>,
    /// Mapped address ranges (start, length), absolute.
    pub segments: Vec<(u64, u64)>,
}

/// What an [`Event`] is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventKind {
    /// An ALLOC record: a block recorded with certainty.
    #[default]
    Alloc,
    /// A SAMPLE record: a Poisson sample.
    Sample,
    /// A FREE record (`size` and `stack` are 0).
    Free,
}

/// An ALLOC, SAMPLE or FREE record in a compact, copyable form: what
/// [`Decoder::next_batch`] yields for the records that make up nearly all
/// of a trace. The fields mean what they mean in [`Record::Alloc`] and
/// [`Record::Free`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts: u64,
    pub addr: u64,
    /// Requested size; 0 for a free.
    pub size: u64,
    /// Stack id; 0 for a free.
    pub stack: u64,
    pub kind: EventKind,
}

impl Event {
    /// An ALLOC or FREE record as an event; `None` for other records.
    pub fn of_record(rec: &Record) -> Option<Event> {
        match *rec {
            Record::Alloc {
                ts,
                addr,
                size,
                stack,
                sampled,
            } => Some(Event {
                ts,
                addr,
                size,
                stack,
                kind: if sampled {
                    EventKind::Sample
                } else {
                    EventKind::Alloc
                },
            }),
            Record::Free { ts, addr } => Some(Event {
                ts,
                addr,
                size: 0,
                stack: 0,
                kind: EventKind::Free,
            }),
            _ => None,
        }
    }

    /// The same event as a [`Record`].
    pub fn to_record(&self) -> Record {
        match self.kind {
            EventKind::Free => Record::Free {
                ts: self.ts,
                addr: self.addr,
            },
            kind => Record::Alloc {
                ts: self.ts,
                addr: self.addr,
                size: self.size,
                stack: self.stack,
                sampled: kind == EventKind::Sample,
            },
        }
    }
}

/// Records in stream order, as [`Decoder::next_batch`] fills them in:
/// events in `events`, every other record in `records` with the number of
/// events that come before it. Reused from batch to batch (clear it, or let
/// `next_batch` append).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// (index in `events` of the first event after the record, record).
    pub records: Vec<(usize, Record)>,
}

impl Batch {
    /// An empty batch with room for `events` events.
    pub fn with_capacity(events: usize) -> Batch {
        Batch {
            events: Vec::with_capacity(events),
            records: Vec::new(),
        }
    }

    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.events.clear();
        self.records.clear();
    }

    /// True when the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.records.is_empty()
    }
}

/// What can be wrong with a trace.
#[derive(Debug)]
pub enum DecodeError {
    /// Reading the file failed.
    Io(io::Error),
    /// The file has no bytes at all.
    Empty,
    /// The file does not start with the mtrace-rs magic.
    NotATrace,
    /// The file is an mtrace-rs trace but its header page is cut short.
    TruncatedHeader { len: u64 },
    /// Written by a format version this decoder cannot read.
    Version { found: u32 },
    /// A record that cannot be right: the stream is damaged here.
    Corrupt { offset: u64, what: String },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Io(e) => write!(f, "reading the trace failed: {e}"),
            DecodeError::Empty => write!(f, "the file is empty, not an mtrace-rs trace"),
            DecodeError::NotATrace => {
                write!(
                    f,
                    "not an mtrace-rs trace (the file does not start with MTRACERS)"
                )
            }
            DecodeError::TruncatedHeader { len } => write!(
                f,
                "an mtrace-rs trace whose header is cut off after {len} bytes (of {HEADER_SIZE})"
            ),
            DecodeError::Version { found } => write!(
                f,
                "written by trace format version {found}, this analyzer reads \
                 {MIN_READABLE_VERSION}-{FORMAT_VERSION}"
            ),
            DecodeError::Corrupt { offset, what } => {
                write!(f, "corrupt trace at byte {offset}: {what}")
            }
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for DecodeError {
    fn from(e: io::Error) -> Self {
        DecodeError::Io(e)
    }
}

/// Appends an unsigned LEB128 varint.
#[inline]
pub fn put_uv(out: &mut Vec<u8>, v: u64) {
    let mut tmp = [0u8; 10];
    let n = uv_into(&mut tmp, v);
    out.extend_from_slice(&tmp[..n]);
}

/// Writes `v` as a varint at the start of `buf`; returns its length.
#[inline(always)]
fn uv_into(buf: &mut [u8; 10], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        buf[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    buf[i] = v as u8;
    i + 1
}

/// Appends a zigzag-encoded signed varint.
#[inline]
pub fn put_sv(out: &mut Vec<u8>, v: i64) {
    put_uv(out, zig(v));
}

#[inline(always)]
fn zig(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// A tag byte and up to four varints written straight into the buffer's
/// spare capacity: the encoder's hot path for events (a `Vec::push` per
/// byte, or a copy through `memcpy`, costs more than the encoding).
#[inline(always)]
fn put_record(out: &mut Vec<u8>, tag: u8, fields: &[u64]) {
    // A tag and four 10-byte varints at most.
    out.reserve(41);
    let spare = out.spare_capacity_mut();
    spare[0].write(tag);
    let mut n = 1;
    for &f in fields.iter().take(4) {
        let mut v = f;
        while v >= 0x80 {
            spare[n].write((v as u8) | 0x80);
            v >>= 7;
            n += 1;
        }
        spare[n].write(v as u8);
        n += 1;
    }
    let len = out.len() + n;
    // SAFETY: the first `n` bytes of the spare capacity were written above
    // (n <= 41 <= the reserved room).
    unsafe { out.set_len(len) };
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_uv(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Encodes records into a byte buffer, keeping the delta state (last time
/// stamp, last address) that makes events small. One encoder per file: the
/// decoder replays the same state from the start of the stream.
#[derive(Debug, Default)]
pub struct Encoder {
    last_ts: u64,
    last_addr: u64,
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::default()
    }

    fn dt(&mut self, out: &mut Vec<u8>, ts: u64) {
        put_sv(out, ts.wrapping_sub(self.last_ts) as i64);
        self.last_ts = ts;
    }

    pub fn info(&mut self, out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
        out.push(tag::INFO);
        put_bytes(out, key);
        put_bytes(out, value);
    }

    pub fn module(&mut self, out: &mut Vec<u8>, m: &Module) {
        out.push(tag::MODULE);
        self.dt(out, m.ts);
        put_uv(out, m.bias);
        put_bytes(out, &m.path);
        put_bytes(out, &m.build_id);
        put_uv(out, m.segments.len() as u64);
        for &(start, len) in &m.segments {
            put_uv(out, start);
            put_uv(out, len);
        }
    }

    pub fn stack(&mut self, out: &mut Vec<u8>, id: u64, frames: &[u64]) {
        out.push(tag::STACK);
        put_uv(out, id);
        put_uv(out, frames.len() as u64);
        let mut prev = 0u64;
        for (i, &f) in frames.iter().enumerate() {
            if i == 0 {
                put_uv(out, f);
            } else {
                put_sv(out, f.wrapping_sub(prev) as i64);
            }
            prev = f;
        }
    }

    pub fn alloc(
        &mut self,
        out: &mut Vec<u8>,
        ts: u64,
        addr: u64,
        size: u64,
        stack: u64,
        sampled: bool,
    ) {
        let dt = zig(ts.wrapping_sub(self.last_ts) as i64);
        let da = zig(addr.wrapping_sub(self.last_addr) as i64);
        self.last_ts = ts;
        self.last_addr = addr;
        let tag = if sampled { tag::SAMPLE } else { tag::ALLOC };
        put_record(out, tag, &[dt, da, size, stack]);
    }

    pub fn free(&mut self, out: &mut Vec<u8>, ts: u64, addr: u64) {
        let dt = zig(ts.wrapping_sub(self.last_ts) as i64);
        let da = zig(addr.wrapping_sub(self.last_addr) as i64);
        self.last_ts = ts;
        self.last_addr = addr;
        put_record(out, tag::FREE, &[dt, da]);
    }

    pub fn dropped(&mut self, out: &mut Vec<u8>, reason: DropReason, total: u64) {
        out.push(tag::DROPPED);
        put_uv(out, reason.code());
        put_uv(out, total);
    }

    pub fn stats(&mut self, out: &mut Vec<u8>, ts: u64, fields: &[(u64, u64)]) {
        out.push(tag::STATS);
        self.dt(out, ts);
        put_uv(out, fields.len() as u64);
        for &(k, v) in fields {
            put_uv(out, k);
            put_uv(out, v);
        }
    }

    pub fn end(&mut self, out: &mut Vec<u8>, ts: u64) {
        out.push(tag::END);
        self.dt(out, ts);
    }

    pub fn mark(&mut self, out: &mut Vec<u8>, ts: u64, what: u64, value: u64) {
        out.push(tag::MARK);
        self.dt(out, ts);
        put_uv(out, what);
        put_uv(out, value);
    }

    pub fn mmap(&mut self, out: &mut Vec<u8>, ts: u64, addr: u64, len: u64, stack: u64) {
        let dt = zig(ts.wrapping_sub(self.last_ts) as i64);
        let da = zig(addr.wrapping_sub(self.last_addr) as i64);
        self.last_ts = ts;
        self.last_addr = addr;
        put_record(out, tag::MMAP, &[dt, da, len, stack]);
    }

    pub fn munmap(&mut self, out: &mut Vec<u8>, ts: u64, addr: u64, len: u64) {
        let dt = zig(ts.wrapping_sub(self.last_ts) as i64);
        let da = zig(addr.wrapping_sub(self.last_addr) as i64);
        self.last_ts = ts;
        self.last_addr = addr;
        put_record(out, tag::MUNMAP, &[dt, da, len]);
    }

    /// `unreachable` must be sorted ascending.
    pub fn scan(&mut self, out: &mut Vec<u8>, ts: u64, live: u64, unreachable: &[u64]) {
        out.push(tag::SCAN);
        self.dt(out, ts);
        put_uv(out, live);
        put_uv(out, unreachable.len() as u64);
        let mut prev = 0u64;
        for &a in unreachable {
            put_sv(out, a.wrapping_sub(prev) as i64);
            prev = a;
        }
    }

    pub fn code(&mut self, out: &mut Vec<u8>, ts: u64, start: u64, len: u64, name: &[u8]) {
        out.push(tag::CODE);
        self.dt(out, ts);
        put_uv(out, start);
        put_uv(out, len);
        put_bytes(out, name);
    }
}

/// How the record stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Not at the end yet.
    Reading,
    /// The tracer wrote its END record: the trace is complete.
    Clean,
    /// The stream stops without an END record: the process was killed, called
    /// `_exit`, or exec'd before the tracer finished. Everything up to the last
    /// whole record was read.
    CutOff,
    /// The file is shorter than its header says: it was truncated after the
    /// tracer wrote it. Records up to `read` bytes were read.
    Truncated { expected: u64, read: u64 },
}

/// Largest single record the decoder accepts; longer means corruption. It
/// bounds the decoder's memory on hostile input.
const MAX_RECORD: usize = 1 << 20;
/// Bytes the decoder asks its reader for at a time: small enough that the
/// buffer stays in the second-level cache beside what the reader of the
/// records keeps there.
const READ_CHUNK: usize = 64 << 10;
/// Largest stack the decoder accepts.
const MAX_FRAMES: u64 = 4096;
/// Bytes of the stream after which [`Decoder::next_batch`] ends a batch
/// that holds records other than events (it bounds a batch's memory).
pub const BATCH_BYTES: usize = 1 << 20;
/// Bytes the fast event loop wants in the buffer before it decodes a record
/// there: more than an event record can take (a tag and four varints of at
/// most 10 bytes).
const FAST_WINDOW: usize = 48;

/// A varint read from a window that surely holds it; `None` for one the
/// general parser must judge (longer than 8 bytes here: those are rare,
/// and the general parser also rejects the malformed ones).
///
/// Eight bytes are loaded at once; the first byte without its high bit
/// ends the varint, and the 7-bit groups before it are packed together
/// with shifts and masks: no branch depends on the length.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn uv_fast(w: &[u8; FAST_WINDOW], i: &mut usize) -> Option<u64> {
    let at = *i;
    let bytes: [u8; 8] = w.get(at..at + 8)?.try_into().ok()?;
    let word = u64::from_le_bytes(bytes);
    // High bit clear = last byte of the varint.
    let ends = !word & 0x8080_8080_8080_8080;
    if ends == 0 {
        return None;
    }
    let bits = ends.trailing_zeros() + 1; // 8, 16, ... 64
    *i = at + (bits / 8) as usize;
    Some(pack7(word, bits))
}

/// The 7-bit groups of the low `bits` bits (8 to 64) of `word`, a varint's
/// bytes, packed together with shifts and masks: pairs, then quads, then
/// the two halves (no branch depends on the length).
#[inline(always)]
fn pack7(word: u64, bits: u32) -> u64 {
    let x = if bits >= 64 {
        word
    } else {
        word & ((1u64 << bits) - 1)
    } & 0x7f7f_7f7f_7f7f_7f7f;
    let x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
    let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
    (x & 0x0000_0000_0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4)
}

/// Bit `k` set when byte `k` of the window ends a varint (its high bit is
/// clear): three SSE2 byte-mask moves, so that the ends of all the varints
/// of a record are known at once instead of one after the other.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn varint_ends(w: &[u8; FAST_WINDOW]) -> u64 {
    use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_movemask_epi8};
    const _: () = assert!(FAST_WINDOW == 48);
    // SAFETY: SSE2 is part of x86-64; the three unaligned 16-byte loads
    // read exactly the window's 48 bytes.
    let high = unsafe {
        let p = w.as_ptr() as *const __m128i;
        let a = _mm_movemask_epi8(_mm_loadu_si128(p)) as u32 as u64;
        let b = _mm_movemask_epi8(_mm_loadu_si128(p.add(1))) as u32 as u64;
        let c = _mm_movemask_epi8(_mm_loadu_si128(p.add(2))) as u32 as u64;
        a | (b << 16) | (c << 32)
    };
    !high & 0xffff_ffff_ffff
}

/// The varint that starts at `start` and ends at `end` (at most 8 bytes
/// long), its 7-bit groups packed: with BMI2's `pext` when `PEXT`, else by
/// shifts and masks.
#[inline(always)]
fn varint_at<const PEXT: bool>(w: &[u8; FAST_WINDOW], start: usize, end: usize) -> u64 {
    let bytes: [u8; 8] = match w.get(start..start + 8) {
        Some(b) => b.try_into().expect("8 bytes"),
        None => return 0,
    };
    let word = u64::from_le_bytes(bytes);
    let bits = ((end + 1 - start) * 8) as u32; // 8..=64
    #[cfg(target_arch = "x86_64")]
    if PEXT {
        // SAFETY: only instantiated with PEXT from code compiled for BMI2
        // (fast_events_bmi2).
        return unsafe {
            use core::arch::x86_64::{_bzhi_u64, _pext_u64};
            _pext_u64(word, _bzhi_u64(0x7f7f_7f7f_7f7f_7f7f, bits))
        };
    }
    pack7(word, bits)
}

/// True when `pext` is there and fast: BMI2 on Intel, or on an AMD CPU
/// with AVX-512 (Zen 4 and later; Zen 1 and 2 run `pext` in microcode,
/// slower than the shifts it replaces). Asked once.
#[cfg(target_arch = "x86_64")]
fn fast_pext() -> bool {
    use std::sync::OnceLock;
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(|| {
        if !std::arch::is_x86_feature_detected!("bmi2") {
            return false;
        }
        let id = core::arch::x86_64::__cpuid(0);
        let intel = (id.ebx, id.edx, id.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        intel || std::arch::is_x86_feature_detected!("avx512f")
    })
}

/// Where the fast event loop is in the buffer and the stream.
struct FastState {
    pos: usize,
    ts: u64,
    addr: u64,
    n: u64,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi1,bmi2")]
unsafe fn fast_events_bmi2(buf: &[u8], st: &mut FastState, events: &mut Vec<Event>, max: usize) {
    fast_events_with::<true>(buf, st, events, max)
}

/// The loop of [`Decoder::fast_events`]; `PEXT` packs varints with `pext`
/// (only from [`fast_events_bmi2`]).
///
/// On x86-64 the ends of a record's varints come from one byte mask of the
/// window ([`varint_ends`]); a record with a varint longer than 8 bytes, or
/// not wholly in the window, is left to the general parser.
#[inline(always)]
fn fast_events_with<const PEXT: bool>(
    buf: &[u8],
    st: &mut FastState,
    events: &mut Vec<Event>,
    max: usize,
) {
    let mut pos = st.pos;
    let mut ts = st.ts;
    let mut addr = st.addr;
    let had = events.len();
    // Written straight into the spare capacity: no capacity check per event.
    let room = max.saturating_sub(had);
    let spare = events.spare_capacity_mut();
    let room = room.min(spare.len());
    let mut n = 0usize;
    while n < room {
        let Some(w) = buf.get(pos..pos + FAST_WINDOW) else {
            break;
        };
        let w: &[u8; FAST_WINDOW] = w.try_into().expect("a window of FAST_WINDOW bytes");
        let kind = match w[0] {
            tag::ALLOC => EventKind::Alloc,
            tag::SAMPLE => EventKind::Sample,
            tag::FREE => EventKind::Free,
            _ => break,
        };
        let Some((dt, da, size, stack, len)) = event_fields::<PEXT>(w, kind == EventKind::Free)
        else {
            break;
        };
        ts = ts.wrapping_add(unzig(dt) as u64);
        addr = addr.wrapping_add(unzig(da) as u64);
        spare[n].write(Event {
            ts,
            addr,
            size,
            stack,
            kind,
        });
        pos += len;
        n += 1;
    }
    // SAFETY: the first `n` spare slots were just written.
    unsafe { events.set_len(had + n) };
    st.pos = pos;
    st.ts = ts;
    st.addr = addr;
    st.n += n as u64;
}

/// The varints of the event record at the start of `w` (two for a free,
/// four otherwise) and the record's length; `None` when one is longer than
/// 8 bytes or runs past the window.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn event_fields<const PEXT: bool>(
    w: &[u8; FAST_WINDOW],
    free: bool,
) -> Option<(u64, u64, u64, u64, usize)> {
    // Byte 0 is the tag; the varints' last bytes are the set bits after it.
    let m0 = varint_ends(w) & !1;
    let e0 = m0.trailing_zeros() as usize;
    let m1 = m0 & m0.wrapping_sub(1);
    let e1 = m1.trailing_zeros() as usize;
    let (e2, e3) = if free {
        (e1, e1)
    } else {
        let m2 = m1 & m1.wrapping_sub(1);
        let m3 = m2 & m2.wrapping_sub(1);
        (m2.trailing_zeros() as usize, m3.trailing_zeros() as usize)
    };
    // No end in the window: trailing_zeros is 64. Each varint at most 8
    // bytes: the general parser judges longer ones.
    if e3 >= 64 || e0 > 8 || e1 - e0 > 8 || e2 - e1 > 8 || e3 - e2 > 8 {
        return None;
    }
    let dt = varint_at::<PEXT>(w, 1, e0);
    let da = varint_at::<PEXT>(w, e0 + 1, e1);
    let (size, stack) = if free {
        (0, 0)
    } else {
        (
            varint_at::<PEXT>(w, e1 + 1, e2),
            varint_at::<PEXT>(w, e2 + 1, e3),
        )
    };
    Some((dt, da, size, stack, e3 + 1))
}

/// As the x86-64 version, one varint after the other.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn event_fields<const PEXT: bool>(
    w: &[u8; FAST_WINDOW],
    free: bool,
) -> Option<(u64, u64, u64, u64, usize)> {
    let mut i = 1;
    let dt = uv_fast(w, &mut i)?;
    let da = uv_fast(w, &mut i)?;
    let (size, stack) = if free {
        (0, 0)
    } else {
        (uv_fast(w, &mut i)?, uv_fast(w, &mut i)?)
    };
    Some((dt, da, size, stack, i))
}

/// A streaming decoder: reads the header, then yields records one by one from
/// any reader, holding at most one read buffer in memory.
pub struct Decoder<R> {
    reader: R,
    header: Header,
    buf: Vec<u8>,
    /// Start of unread bytes in `buf`.
    pos: usize,
    /// Offset in the record stream of `buf[0]`.
    buf_base: u64,
    /// Bytes of the record stream that may be read (from the header, or the
    /// whole file when the header was never updated).
    limit: u64,
    /// Bytes of the record stream obtained from the reader so far.
    fetched: u64,
    eof: bool,
    ending: Ending,
    last_ts: u64,
    last_addr: u64,
    records: u64,
}

impl<R: Read> Decoder<R> {
    /// Reads and checks the header.
    pub fn new(mut reader: R) -> Result<Decoder<R>, DecodeError> {
        let mut head = vec![0u8; HEADER_SIZE];
        let n = read_full(&mut reader, &mut head)?;
        head.truncate(n);
        let header = Header::decode(&head)?;
        if n < HEADER_SIZE {
            return Err(DecodeError::TruncatedHeader { len: n as u64 });
        }
        let limit = header.committed;
        Ok(Decoder {
            reader,
            header,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            buf_base: 0,
            limit,
            fetched: 0,
            eof: false,
            ending: Ending::Reading,
            last_ts: 0,
            last_addr: 0,
            records: 0,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// How the stream ended; [`Ending::Reading`] until `next` returned `None`.
    pub fn ending(&self) -> &Ending {
        &self.ending
    }

    /// Bytes of the record stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.buf_base + self.pos as u64
    }

    /// Records decoded so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Makes at least `need` unread bytes available, unless the stream ends
    /// first. Returns the number available.
    fn fill(&mut self, need: usize) -> Result<usize, DecodeError> {
        let avail = self.buf.len() - self.pos;
        if avail >= need || self.eof {
            return Ok(avail);
        }
        // Move the unread tail to the front, then read more.
        self.buf.drain(..self.pos);
        self.buf_base += self.pos as u64;
        self.pos = 0;
        let want = need.max(READ_CHUNK);
        let room =
            (self.limit - self.fetched).min(want.saturating_sub(self.buf.len()) as u64) as usize;
        let old = self.buf.len();
        self.buf.resize(old + room, 0);
        let mut filled = old;
        while filled < old + room {
            let n = read_some(&mut self.reader, &mut self.buf[filled..old + room])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        self.buf.truncate(filled);
        self.fetched += (filled - old) as u64;
        if filled < old + room || self.fetched == self.limit {
            self.eof = true;
        }
        Ok(self.buf.len() - self.pos)
    }

    fn finish(&mut self, ending: Ending) -> Result<Option<Record>, DecodeError> {
        self.ending = ending;
        Ok(None)
    }

    /// The next record, `None` at the end of the readable stream (see
    /// [`Decoder::ending`] for how it ended), or an error naming the offset
    /// of a damaged record.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Record>, DecodeError> {
        if self.ending != Ending::Reading {
            return Ok(None);
        }
        // Most records are small: ask for a generous window, and retry with
        // a bigger one only for the rare long record.
        let mut want = 64usize;
        loop {
            let avail = self.fill(want)?;
            if avail == 0 {
                return self.end_of_stream();
            }
            let start = self.pos;
            let window = &self.buf[start..start + avail];
            match parse(window, &mut self.last_ts, &mut self.last_addr) {
                Parsed::Record(rec, used) => {
                    self.pos += used;
                    self.records += 1;
                    if let Record::End { .. } = rec {
                        self.ending = Ending::Clean;
                    }
                    return Ok(Some(rec));
                }
                Parsed::Padding => return self.end_of_stream(),
                Parsed::NeedMore => {
                    if avail < want || self.eof {
                        // The stream ends inside a record: a cut-off tail.
                        return self.end_of_stream();
                    }
                    if want >= MAX_RECORD {
                        return Err(DecodeError::Corrupt {
                            offset: HEADER_SIZE as u64 + self.offset(),
                            what: format!("a record longer than {MAX_RECORD} bytes"),
                        });
                    }
                    want = (want * 16).min(MAX_RECORD);
                }
                Parsed::Bad(what) => {
                    return Err(DecodeError::Corrupt {
                        offset: HEADER_SIZE as u64 + self.offset(),
                        what,
                    })
                }
            }
        }
    }

    /// Decodes records into `batch` (appending) until it holds `max` events
    /// or about [`BATCH_BYTES`] of the stream were read, the stream ends or
    /// a damaged record is met. Returns `Ok(true)` while more may follow,
    /// `Ok(false)` at the end of the readable stream (see
    /// [`Decoder::ending`]), or the error [`Decoder::next`] would return,
    /// with everything before the damaged record in `batch`.
    ///
    /// The same records as [`Decoder::next`], faster: events whose bytes
    /// are all in the read buffer are decoded by a loop that does nothing
    /// else, and go into `batch.events` without building a [`Record`].
    pub fn next_batch(&mut self, batch: &mut Batch, max: usize) -> Result<bool, DecodeError> {
        if self.ending != Ending::Reading {
            return Ok(false);
        }
        let start = self.offset();
        loop {
            // An END record ends the stream, whatever bytes follow it.
            if self.ending != Ending::Reading {
                return Ok(false);
            }
            self.fast_events(&mut batch.events, max);
            if batch.events.len() >= max {
                return Ok(true);
            }
            // A record of another kind, an event near the end of the
            // buffer, the end of the stream or an error: the general way.
            match self.next()? {
                None => return Ok(false),
                Some(rec @ (Record::Alloc { .. } | Record::Free { .. })) => {
                    batch.events.extend(Event::of_record(&rec))
                }
                Some(rec) => {
                    batch.records.push((batch.events.len(), rec));
                    if self.offset() - start >= BATCH_BYTES as u64 {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Decodes ALLOC, SAMPLE and FREE records while their bytes are surely
    /// all in the buffer, stopping at any other record, at a varint it
    /// would have to reject (the general parser then says why), or when
    /// `events` holds `max`.
    fn fast_events(&mut self, events: &mut Vec<Event>, max: usize) {
        events.reserve(max.saturating_sub(events.len()));
        let mut st = FastState {
            pos: self.pos,
            ts: self.last_ts,
            addr: self.last_addr,
            n: 0,
        };
        #[cfg(target_arch = "x86_64")]
        if fast_pext() {
            // SAFETY: the CPU has BMI2 (checked by fast_pext).
            unsafe { fast_events_bmi2(&self.buf, &mut st, events, max) };
        } else {
            fast_events_with::<false>(&self.buf, &mut st, events, max);
        }
        #[cfg(not(target_arch = "x86_64"))]
        fast_events_with::<false>(&self.buf, &mut st, events, max);
        self.pos = st.pos;
        self.last_ts = st.ts;
        self.last_addr = st.addr;
        self.records += st.n;
    }

    fn end_of_stream(&mut self) -> Result<Option<Record>, DecodeError> {
        let read = self.offset();
        if self.fetched < self.limit && self.eof {
            return self.finish(Ending::Truncated {
                expected: self.limit,
                read,
            });
        }
        self.finish(Ending::CutOff)
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = read_some(r, &mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn read_some<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

enum Parsed {
    Record(Record, usize),
    Padding,
    NeedMore,
    Bad(String),
}

/// A cursor over a window of the stream. Every read returns `None` when the
/// window ends, which the caller turns into "need more bytes".
struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cur<'_> {
    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.i)?;
        self.i += 1;
        Some(v)
    }

    /// `Some(Err)` for a varint longer than 10 bytes.
    fn uv(&mut self) -> Option<Result<u64, String>> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Some(Err("varint overflows 64 bits".into()));
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(Ok(v));
            }
        }
        Some(Err("varint longer than 10 bytes".into()))
    }

    fn bytes(&mut self) -> Option<Result<Vec<u8>, String>> {
        let n = match self.uv()? {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        if n > MAX_RECORD as u64 {
            return Some(Err(format!("a string of {n} bytes")));
        }
        let n = n as usize;
        let s = self.b.get(self.i..self.i + n)?;
        self.i += n;
        Some(Ok(s.to_vec()))
    }
}

#[inline(always)]
fn unzig(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn parse(window: &[u8], last_ts: &mut u64, last_addr: &mut u64) -> Parsed {
    let mut c = Cur { b: window, i: 0 };
    // Parse into locals and commit the delta state only when the whole
    // record is in the window, so that a retry with more bytes starts over.
    let mut ts = *last_ts;
    let mut addr = *last_addr;
    macro_rules! uv {
        () => {
            match c.uv() {
                None => return Parsed::NeedMore,
                Some(Err(e)) => return Parsed::Bad(e),
                Some(Ok(v)) => v,
            }
        };
    }
    macro_rules! bytes {
        () => {
            match c.bytes() {
                None => return Parsed::NeedMore,
                Some(Err(e)) => return Parsed::Bad(e),
                Some(Ok(v)) => v,
            }
        };
    }
    macro_rules! dt {
        () => {{
            ts = ts.wrapping_add(unzig(uv!()) as u64);
            ts
        }};
    }
    macro_rules! da {
        () => {{
            addr = addr.wrapping_add(unzig(uv!()) as u64);
            addr
        }};
    }
    let Some(t) = c.byte() else {
        return Parsed::NeedMore;
    };
    let rec = match t {
        0 => return Parsed::Padding,
        tag::INFO => {
            let key = bytes!();
            let value = bytes!();
            Record::Info { key, value }
        }
        tag::MODULE => {
            let ts = dt!();
            let bias = uv!();
            let path = bytes!();
            let build_id = bytes!();
            let n = uv!();
            if n > 4096 {
                return Parsed::Bad(format!("a module with {n} segments"));
            }
            let mut segments = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let start = uv!();
                let len = uv!();
                segments.push((start, len));
            }
            Record::Module(Module {
                ts,
                bias,
                path,
                build_id,
                segments,
            })
        }
        tag::STACK => {
            let id = uv!();
            let n = uv!();
            if n > MAX_FRAMES {
                return Parsed::Bad(format!("a stack of {n} frames"));
            }
            let mut frames = Vec::with_capacity(n as usize);
            let mut prev = 0u64;
            for i in 0..n {
                let v = uv!();
                prev = if i == 0 {
                    v
                } else {
                    prev.wrapping_add(unzig(v) as u64)
                };
                frames.push(prev);
            }
            Record::Stack { id, frames }
        }
        tag::ALLOC | tag::SAMPLE => {
            let ts = dt!();
            let addr = da!();
            let size = uv!();
            let stack = uv!();
            Record::Alloc {
                ts,
                addr,
                size,
                stack,
                sampled: t == tag::SAMPLE,
            }
        }
        tag::FREE => {
            let ts = dt!();
            let addr = da!();
            Record::Free { ts, addr }
        }
        tag::MMAP => {
            let ts = dt!();
            let addr = da!();
            let len = uv!();
            let stack = uv!();
            Record::Mmap {
                ts,
                addr,
                len,
                stack,
            }
        }
        tag::MUNMAP => {
            let ts = dt!();
            let addr = da!();
            let len = uv!();
            Record::Munmap { ts, addr, len }
        }
        tag::DROPPED => {
            let reason = DropReason::from_code(uv!());
            let total = uv!();
            Record::Dropped { reason, total }
        }
        tag::STATS => {
            let ts = dt!();
            let n = uv!();
            if n > 256 {
                return Parsed::Bad(format!("a stats record with {n} fields"));
            }
            let mut fields = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let k = uv!();
                let v = uv!();
                fields.push((k, v));
            }
            Record::Stats { ts, fields }
        }
        tag::END => Record::End { ts: dt!() },
        tag::MARK => {
            let ts = dt!();
            let what = uv!();
            let value = uv!();
            Record::Mark { ts, what, value }
        }
        tag::CODE => {
            let ts = dt!();
            let start = uv!();
            let len = uv!();
            let name = bytes!();
            Record::Code {
                ts,
                start,
                len,
                name,
            }
        }
        tag::SCAN => {
            let ts = dt!();
            let live = uv!();
            let n = uv!();
            // Each entry takes at least one byte: a count beyond the record
            // limit is corruption, not a reason to allocate.
            if n > MAX_RECORD as u64 {
                return Parsed::Bad(format!("a scan listing {n} blocks"));
            }
            let mut unreachable = Vec::with_capacity(n.min(4096) as usize);
            let mut prev = 0u64;
            for _ in 0..n {
                prev = prev.wrapping_add(unzig(uv!()) as u64);
                unreachable.push(prev);
            }
            Record::Scan {
                ts,
                live,
                unreachable,
            }
        }
        other => return Parsed::Bad(format!("unknown record tag 0x{other:02x}")),
    };
    *last_ts = ts;
    *last_addr = addr;
    Parsed::Record(rec, c.i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns at most `self.1` bytes a call, so that records
    /// straddle every read-buffer boundary.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn header() -> Header {
        Header {
            version: FORMAT_VERSION,
            committed: 0,
            flags: 0,
            pid: 42,
            ppid: 1,
            max_depth: 64,
            start_realtime_ns: 1_700_000_000_000_000_000,
            start_monotonic_ns: 5,
            sample_rate: 1,
        }
    }

    fn file(records: &[Record], clean: bool) -> Vec<u8> {
        let mut enc = Encoder::new();
        let mut body = Vec::new();
        for r in records {
            match r {
                Record::Info { key, value } => enc.info(&mut body, key, value),
                Record::Module(m) => enc.module(&mut body, m),
                Record::Stack { id, frames } => enc.stack(&mut body, *id, frames),
                Record::Alloc {
                    ts,
                    addr,
                    size,
                    stack,
                    sampled,
                } => enc.alloc(&mut body, *ts, *addr, *size, *stack, *sampled),
                Record::Free { ts, addr } => enc.free(&mut body, *ts, *addr),
                Record::Dropped { reason, total } => enc.dropped(&mut body, *reason, *total),
                Record::Stats { ts, fields } => enc.stats(&mut body, *ts, fields),
                Record::End { ts } => enc.end(&mut body, *ts),
                Record::Mark { ts, what, value } => enc.mark(&mut body, *ts, *what, *value),
                Record::Code {
                    ts,
                    start,
                    len,
                    name,
                } => enc.code(&mut body, *ts, *start, *len, name),
                Record::Scan {
                    ts,
                    live,
                    unreachable,
                } => enc.scan(&mut body, *ts, *live, unreachable),
                Record::Mmap {
                    ts,
                    addr,
                    len,
                    stack,
                } => enc.mmap(&mut body, *ts, *addr, *len, *stack),
                Record::Munmap { ts, addr, len } => enc.munmap(&mut body, *ts, *addr, *len),
            }
        }
        let mut h = header();
        h.committed = body.len() as u64;
        h.flags = if clean { FLAG_CLEAN_END } else { 0 };
        let mut out = vec![0u8; HEADER_SIZE];
        h.encode(&mut out);
        out.extend_from_slice(&body);
        out
    }

    fn sample_records() -> Vec<Record> {
        vec![
            Record::Info {
                key: b"exe".to_vec(),
                value: b"/bin/true".to_vec(),
            },
            Record::Module(Module {
                ts: 3,
                bias: 0x5555_0000_0000,
                path: b"/bin/true".to_vec(),
                build_id: vec![1, 2, 3, 4],
                segments: vec![(0x5555_0000_0000, 4096), (0x5555_0000_1000, 8192)],
            }),
            Record::Stack {
                id: 1,
                frames: vec![0x5555_0000_1234, 0x7fff_0000_0010, 0x5555_0000_0100],
            },
            Record::Alloc {
                ts: 10,
                addr: 0x1000_0010,
                size: 100,
                stack: 1,
                sampled: false,
            },
            Record::Alloc {
                ts: 12,
                addr: 0x1000_0090,
                size: 1 << 40,
                stack: 1,
                sampled: true,
            },
            Record::Free {
                ts: 11,
                addr: 0x1000_0010,
            },
            Record::Dropped {
                reason: DropReason::RingFull,
                total: 7,
            },
            Record::Stats {
                ts: 20,
                fields: vec![(stat::RSS, 1 << 30), (stat::ARENA, 5)],
            },
            Record::Mark {
                ts: 21,
                what: mark::FORKED,
                value: 9,
            },
            Record::Scan {
                ts: 29,
                live: 12,
                unreachable: vec![0x1000_0090, 0x5555_0000_0000],
            },
            Record::End { ts: 30 },
        ]
    }

    fn decode_all(bytes: &[u8]) -> Result<(Vec<Record>, Ending), DecodeError> {
        let mut d = Decoder::new(bytes)?;
        let mut out = Vec::new();
        while let Some(r) = d.next()? {
            out.push(r);
        }
        Ok((out, d.ending().clone()))
    }

    #[test]
    fn round_trip_every_record_kind() {
        let recs = sample_records();
        let (back, ending) = decode_all(&file(&recs, true)).unwrap();
        assert_eq!(back, recs);
        assert_eq!(ending, Ending::Clean);
    }

    #[test]
    fn exact_mode_events_fit_in_a_few_bytes() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.alloc(&mut out, 1_000, 0x5555_5555_0000, 48, 1, false);
        let first = out.len();
        enc.alloc(&mut out, 1_200, 0x5555_5555_0040, 48, 17, false);
        enc.free(&mut out, 1_300, 0x5555_5555_0000);
        assert!(
            out.len() - first <= 12,
            "{} bytes for two events",
            out.len() - first
        );
    }

    #[test]
    fn a_cut_off_tail_is_read_up_to_the_last_whole_record() {
        let recs = sample_records();
        let mut bytes = file(&recs[..6], false);
        // The writer had committed the whole body but the process died
        // mid-copy of the next record: simulate by claiming two more bytes
        // that hold only the start of an ALLOC record.
        let committed = (bytes.len() - HEADER_SIZE + 2) as u64;
        bytes[COMMITTED_OFFSET..COMMITTED_OFFSET + 8].copy_from_slice(&committed.to_le_bytes());
        bytes.extend_from_slice(&[tag::ALLOC, 0x80]);
        let (back, ending) = decode_all(&bytes).unwrap();
        assert_eq!(back, recs[..6].to_vec());
        assert_eq!(ending, Ending::CutOff);
    }

    #[test]
    fn zero_padding_after_the_data_ends_the_stream() {
        let recs = sample_records();
        let mut bytes = file(&recs[..4], false);
        let committed = (bytes.len() - HEADER_SIZE + 4096) as u64;
        bytes[COMMITTED_OFFSET..COMMITTED_OFFSET + 8].copy_from_slice(&committed.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4096]);
        let (back, ending) = decode_all(&bytes).unwrap();
        assert_eq!(back, recs[..4].to_vec());
        assert_eq!(ending, Ending::CutOff);
    }

    #[test]
    fn a_file_shorter_than_its_header_says_is_truncated() {
        let recs = sample_records();
        let bytes = file(&recs, true);
        let cut = &bytes[..bytes.len() - 5];
        let (back, ending) = decode_all(cut).unwrap();
        assert!(back.len() < recs.len());
        assert_eq!(back[..], recs[..back.len()]);
        assert!(matches!(ending, Ending::Truncated { .. }), "{ending:?}");
    }

    #[test]
    fn foreign_empty_and_future_files_are_named() {
        assert!(matches!(Decoder::new(&b""[..]), Err(DecodeError::Empty)));
        assert!(matches!(
            Decoder::new(&b"\x7fELF\x02\x01\x01"[..]),
            Err(DecodeError::NotATrace)
        ));
        let mut bytes = file(&sample_records(), true);
        assert!(matches!(
            Decoder::new(&bytes[..100]),
            Err(DecodeError::TruncatedHeader { len: 100 })
        ));
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        let err = Decoder::new(&bytes[..]).err().unwrap();
        assert_eq!(
            err.to_string(),
            "written by trace format version 7, this analyzer reads 1-2"
        );
    }

    #[test]
    fn garbage_in_the_stream_is_reported_with_its_offset() {
        let mut bytes = file(&sample_records(), true);
        bytes[HEADER_SIZE] = 0xee;
        let err = decode_all(&bytes).err().unwrap();
        assert_eq!(
            err.to_string(),
            "corrupt trace at byte 4096: unknown record tag 0xee"
        );
    }

    #[test]
    fn records_spanning_read_buffers_decode() {
        // Many records, fed one byte at a time through a reader that returns
        // short reads, exercise every buffer-boundary path.
        let mut recs = Vec::new();
        for i in 0..5000u64 {
            recs.push(Record::Alloc {
                ts: i * 3,
                addr: 0x4000 + i * 32,
                size: i,
                stack: i % 7,
                sampled: i % 2 == 0,
            });
            recs.push(Record::Stack {
                id: i + 10,
                frames: (0..(i % 70)).map(|k| 0x7000 + k * i).collect(),
            });
        }
        recs.push(Record::End { ts: 99_999 });
        let bytes = file(&recs, true);
        let mut d = Decoder::new(Trickle(&bytes, 3)).unwrap();
        let mut back = Vec::new();
        while let Some(r) = d.next().unwrap() {
            back.push(r);
        }
        assert_eq!(back, recs);
    }

    /// Decodes through `next_batch` with batches of at most `max` events,
    /// flattened back into records.
    fn decode_batched<R: Read>(
        reader: R,
        max: usize,
    ) -> Result<(Vec<Record>, Ending), (Vec<Record>, String)> {
        let mut d = Decoder::new(reader).map_err(|e| (Vec::new(), e.to_string()))?;
        let mut out = Vec::new();
        let mut batch = Batch::default();
        loop {
            batch.clear();
            let more = d.next_batch(&mut batch, max);
            let mut i = 0;
            for (at, rec) in batch.records.drain(..) {
                out.extend(batch.events[i..at].iter().map(Event::to_record));
                out.push(rec);
                i = at;
            }
            out.extend(batch.events[i..].iter().map(Event::to_record));
            match more {
                Ok(true) => {}
                Ok(false) => return Ok((out, d.ending().clone())),
                Err(e) => return Err((out, e.to_string())),
            }
        }
    }

    /// What `next` yields, with the records read before an error.
    fn decode_plain(bytes: &[u8]) -> Result<(Vec<Record>, Ending), (Vec<Record>, String)> {
        let mut d = Decoder::new(bytes).map_err(|e| (Vec::new(), e.to_string()))?;
        let mut out = Vec::new();
        loop {
            match d.next() {
                Ok(Some(r)) => out.push(r),
                Ok(None) => return Ok((out, d.ending().clone())),
                Err(e) => return Err((out, e.to_string())),
            }
        }
    }

    #[test]
    fn batches_hold_the_same_records_as_next() {
        let mut recs = sample_records();
        recs.pop();
        for i in 0..3000u64 {
            recs.push(Record::Alloc {
                ts: 100 + i * 7 % 13,
                addr: 0x7f00_0000_0000u64.wrapping_add(i.wrapping_mul(0x9e37_79b9)),
                size: if i % 100 == 0 { u64::MAX - i } else { i * 5 },
                stack: if i % 50 == 0 { u64::MAX } else { i % 9 },
                sampled: i % 3 == 0,
            });
            recs.push(Record::Free {
                ts: if i % 7 == 0 { 0 } else { 200 + i },
                addr: 0x1000 + i * 48,
            });
            if i % 500 == 0 {
                recs.push(Record::Stats {
                    ts: 300 + i,
                    fields: vec![(stat::RSS, i)],
                });
            }
        }
        recs.push(Record::End { ts: 1 << 40 });
        let bytes = file(&recs, true);
        let mut damaged = bytes.clone();
        let at = bytes.len() - 3000;
        damaged[at] = 0xee;
        // A varint of 11 bytes inside an event.
        let mut long = file(&recs[..20], false);
        long.extend_from_slice(&[tag::FREE, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80]);
        long.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0, 0, 0, 0]);
        long.extend_from_slice(&[0u8; 64]);
        let committed = (long.len() - HEADER_SIZE) as u64;
        long[COMMITTED_OFFSET..COMMITTED_OFFSET + 8].copy_from_slice(&committed.to_le_bytes());
        let cut = &bytes[..bytes.len() - 5000];
        for input in [&bytes[..], &damaged[..], &long[..], cut] {
            let plain = decode_plain(input);
            for max in [1, 7, 4096] {
                assert_eq!(decode_batched(input, max), plain, "max {max}");
            }
        }
        assert_eq!(decode_plain(&bytes).unwrap().0, recs);
        assert!(decode_plain(&damaged).is_err());
        assert!(decode_plain(&long).is_err());
    }

    #[test]
    fn the_fast_event_reader_agrees_with_the_general_one() {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "bmi1,bmi2")]
        unsafe fn fields_pext(
            w: &[u8; FAST_WINDOW],
            free: bool,
        ) -> Option<(u64, u64, u64, u64, usize)> {
            event_fields::<true>(w, free)
        }
        let mut values = vec![0u64, 1, 127, 128, 300, u64::MAX, u64::MAX - 1];
        for shift in 0..64 {
            values.push(1u64 << shift);
            values.push((1u64 << shift) - 1);
            values.push((1u64 << shift).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let mut checked = 0;
        for (k, &v) in values.iter().enumerate() {
            let other = values[(k * 7 + 3) % values.len()];
            for (free, fields) in [(true, vec![v, other]), (false, vec![other, 5, v, other])] {
                let mut bytes = vec![tag::ALLOC];
                for &f in &fields {
                    put_uv(&mut bytes, f);
                }
                let n = bytes.len();
                let longest = fields.iter().map(|&f| uv_len(f)).max().unwrap();
                bytes.resize(FAST_WINDOW, 0xff);
                let w: &[u8; FAST_WINDOW] = bytes[..].try_into().unwrap();
                let want = (longest <= 8).then(|| {
                    let mut f = fields.clone();
                    f.resize(4, 0);
                    (f[0], f[1], f[2], f[3], n)
                });
                assert_eq!(event_fields::<false>(w, free), want, "{fields:x?}");
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("bmi2") {
                    // SAFETY: the CPU has BMI1 and BMI2.
                    assert_eq!(unsafe { fields_pext(w, free) }, want, "{fields:x?}");
                }
                checked += 1;
            }
        }
        assert!(checked > 300);
    }

    fn uv_len(v: u64) -> usize {
        let mut b = Vec::new();
        put_uv(&mut b, v);
        b.len()
    }

    #[test]
    fn batches_read_through_short_reads() {
        let mut recs = Vec::new();
        for i in 0..5000u64 {
            recs.push(Record::Alloc {
                ts: i * 3,
                addr: 0x4000 + i * 32,
                size: i,
                stack: i % 7,
                sampled: i % 2 == 0,
            });
            recs.push(Record::Free {
                ts: i * 3 + 1,
                addr: 0x4000 + i * 16,
            });
        }
        recs.push(Record::End { ts: 99_999 });
        let bytes = file(&recs, true);
        let (back, ending) = decode_batched(Trickle(&bytes, 5), 100).unwrap();
        assert_eq!(back, recs);
        assert_eq!(ending, Ending::Clean);
    }

    /// Bytes after an END record (inside the committed length: a damaged
    /// or hand-made file) are not records, for the batched decoder as for
    /// `next` (found by the decoder fuzz target).
    #[test]
    fn batches_stop_at_the_end_record() {
        let mut recs = Vec::new();
        for i in 0..200u64 {
            recs.push(Record::Alloc {
                ts: i,
                addr: 0x4000 + i * 16,
                size: 4,
                stack: 4,
                sampled: false,
            });
            if i == 60 {
                recs.push(Record::End { ts: i });
            }
        }
        let bytes = file(&recs, true);
        let (plain, _) = decode_plain(&bytes).unwrap();
        assert_eq!(plain.len(), 62);
        for max in [1, 7, 61, 62, 100, 1000] {
            let (back, ending) = decode_batched(&bytes[..], max).unwrap();
            assert_eq!(back, plain, "batches of {max}");
            assert_eq!(ending, Ending::Clean);
        }
    }

    #[test]
    fn hostile_lengths_do_not_allocate_unbounded_memory() {
        let mut body = vec![tag::INFO];
        put_uv(&mut body, u64::MAX / 2);
        let mut h = header();
        h.committed = body.len() as u64;
        let mut bytes = vec![0u8; HEADER_SIZE];
        h.encode(&mut bytes);
        bytes.extend_from_slice(&body);
        assert!(matches!(
            decode_all(&bytes),
            Err(DecodeError::Corrupt { .. })
        ));
    }
}
