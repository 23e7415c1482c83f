//! pprof export: a trace as a gzipped `profile.proto`, the format of Go's
//! heap profiles, read by `go tool pprof`, Pyroscope, Parca and speedscope.
//!
//! The profile has one sample per recorded stack with four values, as a Go
//! heap profile: `alloc_objects/count`, `alloc_space/bytes` (everything the
//! stack allocated over the whole trace) and `inuse_objects/count`,
//! `inuse_space/bytes` (what it held at the end, or at `--at`); the default
//! view is `inuse_space`. Sampling is undone before export and the values
//! rounded, so a sampled trace's values are estimates, as in Go.
//!
//! Symbols are resolved here, not by pprof: every module becomes a
//! mapping (with its file name and build-id, so a viewer can fetch debug
//! files by build-id), every distinct return address a location whose
//! `address` is the return address minus one (inside the call instruction,
//! the address that was symbolized), and every function a function with its
//! source file. An address in inlined code is one location with several
//! lines, the innermost inlined function first and the function that holds
//! the code last, as profile.proto prescribes. Since the names are already
//! there, the mappings say `has_functions` and pprof does not symbolize
//! again.
//!
//! The messages below are the part of `profile.proto`
//! (<https://github.com/google/pprof/blob/main/proto/profile.proto>) that
//! the export writes, derived with prost, with the field numbers of the
//! original; fields not written are left out, which protobuf readers
//! accept.

use std::collections::BTreeSet;
use std::io::{self, Write};

use prost::Message;

use crate::analysis::Trace;
use crate::fxhash::FxHashMap;
use crate::report::{frame_name, SymCache, NO_STACK};
use crate::symbolize::{module_name, Symbolizer};

/// The messages of `profile.proto` (package `perftools.profiles`).
pub mod proto {
    /// The whole profile.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        /// What each value of a sample measures.
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        /// Every string of the profile; entry 0 is "".
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        /// Free-form notes, as indices into the string table.
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        /// Index into the string table of the default sample type's name.
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    /// A measure and its unit (string table indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    /// One stack and its values.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Location ids, the leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        /// One value per sample type.
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }

    /// A mapped object file.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    /// An address and the source lines it stands for.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// 0 when the address is in no known mapping.
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// The innermost inlined function first, the caller last.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    /// A function and a line in it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    /// A function (string table indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

use proto::{Function, Line, Location, Mapping, Profile, Sample, ValueType};

/// The sample types, in value order, as Go's heap profiles name them.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
];

/// Builds a profile's tables: strings, functions and locations each
/// interned once.
struct Builder {
    p: Profile,
    strings: FxHashMap<String, i64>,
    functions: FxHashMap<(i64, i64), u64>,
    locations: FxHashMap<u64, u64>,
    /// (start, limit, mapping id) of every module, in file order.
    ranges: Vec<(u64, u64, u64)>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let (name, file) = (self.string(name), self.string(file));
        if let Some(&id) = self.functions.get(&(name, file)) {
            return id;
        }
        let id = self.p.function.len() as u64 + 1;
        self.p.function.push(Function {
            id,
            name,
            system_name: name,
            filename: file,
        });
        self.functions.insert((name, file), id);
        id
    }

    /// The mapping of a code address: the latest module containing it.
    fn mapping_of(&self, pc: u64) -> u64 {
        self.ranges
            .iter()
            .rev()
            .find(|&&(start, limit, _)| pc >= start && pc < limit)
            .map_or(0, |r| r.2)
    }

    fn location(&mut self, ret: u64, cache: &mut SymCache) -> u64 {
        if let Some(&id) = self.locations.get(&ret) {
            return id;
        }
        let pc = ret.saturating_sub(1);
        let mut lines = Vec::new();
        for f in cache.frames(ret) {
            let name = frame_name(&f.function, &f.module, f.offset);
            let file = f.file.as_deref().unwrap_or("");
            let function_id = self.function(&name, file);
            lines.push(Line {
                function_id,
                line: f.line.map_or(0, i64::from),
            });
        }
        let id = self.p.location.len() as u64 + 1;
        let mapping_id = self.mapping_of(pc);
        self.p.location.push(Location {
            id,
            mapping_id,
            address: pc,
            line: lines,
        });
        self.locations.insert(ret, id);
        id
    }

    /// The location standing for a stack that was not recorded.
    fn no_stack(&mut self) -> u64 {
        // Address 0 is never a return address, so it keys this one.
        if let Some(&id) = self.locations.get(&0) {
            return id;
        }
        let function_id = self.function(NO_STACK, "");
        let id = self.p.location.len() as u64 + 1;
        self.p.location.push(Location {
            id,
            mapping_id: 0,
            address: 0,
            line: vec![Line {
                function_id,
                line: 0,
            }],
        });
        self.locations.insert(0, id);
        id
    }
}

/// Builds the profile of a trace. `snapshot` selects what was in use at a
/// snapshot (`--at`) instead of at the end; the `alloc_*` values always
/// cover the whole trace.
pub fn build_profile(trace: &Trace, sym: &mut dyn Symbolizer, snapshot: Option<usize>) -> Profile {
    let mut b = Builder {
        p: Profile::default(),
        strings: FxHashMap::default(),
        functions: FxHashMap::default(),
        locations: FxHashMap::default(),
        ranges: Vec::new(),
    };
    b.string("");
    for (t, u) in SAMPLE_TYPES {
        let vt = ValueType {
            r#type: b.string(t),
            unit: b.string(u),
        };
        b.p.sample_type.push(vt);
    }
    b.p.default_sample_type = b.string("inuse_space");
    b.p.period_type = Some(ValueType {
        r#type: b.string("space"),
        unit: b.string("bytes"),
    });
    b.p.period = trace.header.sample_rate.max(1) as i64;
    b.p.time_nanos = trace.header.start_realtime_ns as i64;
    b.p.duration_nanos = trace.last_ts as i64;

    // The main program first: pprof takes the first mapping for it.
    let exe = trace.exe.as_deref().unwrap_or("").as_bytes();
    let mut order: Vec<usize> = (0..trace.modules.len()).collect();
    order.sort_by_key(|&i| {
        let p = &trace.modules[i].path[..];
        !(p.is_empty() || p == exe)
    });
    let mut mappings = Vec::new();
    let mut ranges = Vec::new();
    for i in order {
        let m = &trace.modules[i];
        let Some(start) = m.segments.iter().map(|s| s.0).min() else {
            continue;
        };
        let limit = m
            .segments
            .iter()
            .map(|s| s.0.saturating_add(s.1))
            .max()
            .unwrap_or(start);
        let path = if m.path.is_empty() { exe } else { &m.path[..] };
        let filename = b.string(&String::from_utf8_lossy(path));
        let build_id = b.string(
            &m.build_id
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
        );
        let pseudo = module_name(path).starts_with('[') || path.starts_with(b"linux-");
        let id = mappings.len() as u64 + 1;
        mappings.push(Mapping {
            id,
            memory_start: start,
            memory_limit: limit,
            // The file offset of the lowest segment is not recorded; for
            // the usual ELF layout (first segment at offset 0, linked at
            // its virtual address) `start - bias` is that segment's
            // virtual address, which pprof uses the same way.
            file_offset: start.wrapping_sub(m.bias),
            filename,
            build_id,
            has_functions: !pseudo,
            has_filenames: !pseudo,
            has_line_numbers: !pseudo,
            has_inline_frames: !pseudo,
        });
        ranges.push((i, (start, limit, id)));
    }
    // Lookups go in file order, so that a later module wins on overlap.
    ranges.sort_by_key(|r| r.0);
    b.ranges = ranges.into_iter().map(|r| r.1).collect();
    b.p.mapping = mappings;

    let live = match snapshot {
        Some(i) if i < trace.snapshots.len() => trace.snapshot(i),
        _ => trace.live_by_stack(),
    };
    let ids: BTreeSet<u64> = trace.allocated.keys().chain(live.keys()).copied().collect();
    let mut cache = SymCache::new(sym);
    for id in ids {
        let (ab, ao) = trace.allocated.get(&id).copied().unwrap_or_default();
        let (ib, io) = live
            .get(&id)
            .map_or((0.0, 0.0), |s| (s.live.bytes, s.live.objects));
        let value: Vec<i64> = [ao, ab, io, ib]
            .iter()
            .map(|v| v.round().max(0.0) as i64)
            .collect();
        if value.iter().all(|&v| v == 0) {
            continue;
        }
        let location_id = match trace.stacks.get(&id).filter(|_| id != 0) {
            Some(frames) if !frames.is_empty() => frames
                .iter()
                .map(|&ret| b.location(ret, &mut cache))
                .collect(),
            _ => vec![b.no_stack()],
        };
        b.p.sample.push(Sample { location_id, value });
    }

    let mut comments = vec![format!(
        "mtrace-rs heap profile of {} (pid {})",
        trace.exe.as_deref().unwrap_or("?"),
        trace.header.pid
    )];
    comments.push(if trace.exact() {
        "exact mode: every allocation and free recorded".to_string()
    } else {
        format!(
            "sampled mode, one sample per {} bytes on average: values are estimates",
            trace.header.sample_rate
        )
    });
    if let Some(s) = snapshot.and_then(|i| trace.snapshots.get(i)) {
        comments.push(format!(
            "inuse_* at {:.3} s into the trace; alloc_* over the whole trace",
            s.at.min(trace.last_ts) as f64 / 1e9
        ));
    }
    for c in comments {
        let i = b.string(&c);
        b.p.comment.push(i);
    }
    b.p
}

/// Writes a profile gzipped, as pprof reads it.
pub fn write_pprof(profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&profile.encode_to_vec())?;
    gz.finish()?.flush()
}

/// Reads a gzipped (or plain) profile back: for tests and tools.
pub fn read_pprof(bytes: &[u8]) -> io::Result<Profile> {
    let plain;
    let data = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut v)?;
        plain = v;
        &plain[..]
    } else {
        bytes
    };
    Profile::decode(data).map_err(io::Error::other)
}
