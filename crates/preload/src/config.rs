//! Configuration from `MTRACE_RS_*` environment variables, read once in the
//! library constructor without allocating.
//!
//! A bad value is reported on stderr in one line and disables tracing: the
//! program runs on untraced rather than traced in a way the user did not ask
//! for. Unknown `MTRACE_RS_*` names are reported too (a typo would otherwise
//! silently trace with defaults), but do not disable tracing.

use crate::sys::{cstr_bytes, warn, StackBuf};

/// Longest output path template we accept.
pub const MAX_PATH: usize = 1024;
/// Deepest stack we capture; it bounds the per-call stack buffer.
pub const MAX_DEPTH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwind {
    /// DWARF call frame information, cached per thread as compact rules
    /// (`unwind.rs`), with libgcc's unwinder for what the rules cannot
    /// express: right for any code that has unwind tables.
    Dwarf,
    /// Every stack through libgcc's `_Unwind_Backtrace` (slow; for
    /// comparison with `dwarf`).
    Libgcc,
    /// Frame-pointer chain: fast, right only where every frame keeps frame
    /// pointers.
    FramePointers,
}

#[derive(Clone, Copy)]
pub struct Config {
    /// Output path template (`%p` = pid, `%%` = `%`), NUL-free.
    pub out: [u8; MAX_PATH],
    pub out_len: usize,
    /// Mean bytes between samples; 1 = exact mode.
    pub sample_bytes: u64,
    pub depth: usize,
    pub seed: Option<u64>,
    /// How often the writer thread drains the rings: at most this much of
    /// the newest events is lost to a SIGKILL.
    pub flush_ms: u64,
    /// How often the writer records RSS and allocator statistics; 0 = never.
    pub stats_ms: u64,
    /// Whether `stats_ms` was asked for (MTRACE_RS_STATS_MS), and is then
    /// kept to even when the records cost more than the default allows.
    pub stats_ms_set: bool,
    pub unwind: Unwind,
    /// Scan for unreachable blocks at exit (exact mode only).
    pub leak_scan: bool,
    /// Record the program's anonymous mmap/munmap/mremap.
    pub mmap: bool,
    /// Let glibc's free tell sampled blocks apart itself (detour.rs).
    pub detour: bool,
    /// For the tests only: the writer thread sleeps this long before each
    /// of its cycles, as a writer held up by a slow disk would.
    pub writer_stall_ms: u64,
}

pub const DEFAULT_SAMPLE_BYTES: u64 = 512 * 1024;
/// The writer's default pace in exact mode, where every event counts.
pub const FLUSH_MS_EXACT: u64 = 10;
/// The writer's default pace in sampled mode: each wake-up costs a context
/// switch on a core the program may be using, and losing the last 50 ms of
/// samples to a SIGKILL changes no estimate (ARCHITECTURE.md, performance).
pub const FLUSH_MS_SAMPLED: u64 = 50;

impl Config {
    pub const fn default() -> Config {
        let mut out = [0u8; MAX_PATH];
        let d = b"mtrace-rs.%p.bin";
        let mut i = 0;
        while i < d.len() {
            out[i] = d[i];
            i += 1;
        }
        Config {
            out,
            out_len: d.len(),
            sample_bytes: DEFAULT_SAMPLE_BYTES,
            depth: 64,
            seed: None,
            flush_ms: FLUSH_MS_SAMPLED,
            writer_stall_ms: 0,
            stats_ms: 100,
            stats_ms_set: false,
            unwind: Unwind::Dwarf,
            leak_scan: false,
            mmap: false,
            detour: true,
        }
    }

    pub fn exact(&self) -> bool {
        self.sample_bytes == 1
    }

    /// Reads the environment. `None` means a value was bad (already reported)
    /// and tracing must stay off.
    pub fn from_env() -> Option<Config> {
        let mut c = Config::default();
        let mut ok = true;
        let mut flush_set = false;
        if let Some(v) = getenv(b"MTRACE_RS_OUT\0") {
            if v.is_empty() || v.len() >= MAX_PATH {
                bad(
                    b"MTRACE_RS_OUT",
                    v,
                    b"expected a path template of 1 to 1023 bytes",
                );
                ok = false;
            } else {
                c.out[..v.len()].copy_from_slice(v);
                c.out_len = v.len();
            }
        }
        if let Some(v) = getenv(b"MTRACE_RS_SAMPLE_BYTES\0") {
            match parse_bytes(v) {
                Some(n) if n >= 1 => c.sample_bytes = n,
                _ => {
                    bad(
                        b"MTRACE_RS_SAMPLE_BYTES",
                        v,
                        b"expected a positive number of bytes such as 524288 or 512k (1 = record every allocation)",
                    );
                    ok = false;
                }
            }
        }
        if let Some(v) = getenv(b"MTRACE_RS_DEPTH\0") {
            match parse_u64(v) {
                Some(n) if (1..=MAX_DEPTH as u64).contains(&n) => c.depth = n as usize,
                _ => {
                    bad(
                        b"MTRACE_RS_DEPTH",
                        v,
                        b"expected a number of frames from 1 to 256",
                    );
                    ok = false;
                }
            }
        }
        if let Some(v) = getenv(b"MTRACE_RS_SEED\0") {
            match parse_u64(v) {
                Some(n) => c.seed = Some(n),
                None => {
                    bad(b"MTRACE_RS_SEED", v, b"expected an unsigned integer");
                    ok = false;
                }
            }
        }
        if let Some(v) = getenv(b"MTRACE_RS_FLUSH_MS\0") {
            match parse_u64(v) {
                Some(n) if (1..=1000).contains(&n) => {
                    c.flush_ms = n;
                    flush_set = true;
                }
                _ => {
                    bad(
                        b"MTRACE_RS_FLUSH_MS",
                        v,
                        b"expected milliseconds from 1 to 1000",
                    );
                    ok = false;
                }
            }
        }
        if let Some(v) = getenv(b"MTRACE_RS_TEST_WRITER_STALL_MS\0") {
            match parse_u64(v) {
                Some(n) if n <= 1000 => c.writer_stall_ms = n,
                _ => {
                    bad(
                        b"MTRACE_RS_TEST_WRITER_STALL_MS",
                        v,
                        b"expected milliseconds from 0 to 1000",
                    );
                    ok = false;
                }
            }
        }
        if let Some(v) = getenv(b"MTRACE_RS_STATS_MS\0") {
            match parse_u64(v) {
                Some(n) if n <= 3_600_000 => {
                    c.stats_ms = n;
                    c.stats_ms_set = true;
                }
                _ => {
                    bad(b"MTRACE_RS_STATS_MS", v, b"expected milliseconds (0 = off)");
                    ok = false;
                }
            }
        }
        if let Some(v) = getenv(b"MTRACE_RS_UNWIND\0") {
            match v {
                b"dwarf" => c.unwind = Unwind::Dwarf,
                b"fp" => c.unwind = Unwind::FramePointers,
                b"libgcc" => c.unwind = Unwind::Libgcc,
                _ => {
                    bad(b"MTRACE_RS_UNWIND", v, b"expected dwarf, fp or libgcc");
                    ok = false;
                }
            }
        }
        switch(b"MTRACE_RS_LEAK_SCAN\0", &mut c.leak_scan, &mut ok);
        switch(b"MTRACE_RS_MMAP\0", &mut c.mmap, &mut ok);
        switch(b"MTRACE_RS_DETOUR\0", &mut c.detour, &mut ok);
        if !flush_set && c.exact() {
            c.flush_ms = FLUSH_MS_EXACT;
        }
        warn_unknown();
        ok.then_some(c)
    }
}

/// A variable of 0 or 1 (`var` NUL-terminated) into `into`, if set; any
/// other value is reported and clears `ok`.
fn switch(var: &[u8], into: &mut bool, ok: &mut bool) {
    if let Some(v) = getenv(var) {
        match v {
            b"1" => *into = true,
            b"0" => *into = false,
            _ => {
                bad(&var[..var.len() - 1], v, b"expected 0 or 1");
                *ok = false;
            }
        }
    }
}

/// Every variable we read, for the typo check.
const KNOWN: [&[u8]; 12] = [
    b"MTRACE_RS_MMAP",
    b"MTRACE_RS_DETOUR",
    b"MTRACE_RS_LEAK_SCAN",
    b"MTRACE_RS_OUT",
    b"MTRACE_RS_SAMPLE_BYTES",
    b"MTRACE_RS_DEPTH",
    b"MTRACE_RS_SEED",
    b"MTRACE_RS_FLUSH_MS",
    b"MTRACE_RS_STATS_MS",
    b"MTRACE_RS_UNWIND",
    b"MTRACE_RS_TEST_WRITER_STALL_MS",
    // Read by `mtrace-analyze run`, not by the library.
    b"MTRACE_RS_LIB",
];

fn warn_unknown() {
    extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: environ is a NULL-terminated array of NUL-terminated strings;
    // we only read it, in the constructor, before the program's main runs.
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return;
        }
        while !(*p).is_null() {
            let entry = cstr_bytes(*p);
            p = p.add(1);
            if !entry.starts_with(b"MTRACE_RS_") {
                continue;
            }
            let name = match entry.iter().position(|&b| b == b'=') {
                Some(i) => &entry[..i],
                None => entry,
            };
            if !KNOWN.contains(&name) {
                warn(&[
                    b"unknown variable ",
                    name,
                    b" ignored (see README.md for the MTRACE_RS_* variables)",
                ]);
            }
        }
    }
}

fn bad(name: &[u8], value: &[u8], expected: &[u8]) {
    warn(&[name, b"=", value, b": ", expected, b"; tracing disabled"]);
}

fn getenv(name_nul: &[u8]) -> Option<&'static [u8]> {
    // SAFETY: `name_nul` is NUL-terminated; getenv returns a pointer into the
    // environment or NULL.
    unsafe {
        let p = libc::getenv(name_nul.as_ptr() as *const libc::c_char);
        if p.is_null() {
            None
        } else {
            Some(cstr_bytes(p))
        }
    }
}

pub fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(n)
}

/// A byte count with an optional k/m/g suffix (powers of 1024).
pub fn parse_bytes(v: &[u8]) -> Option<u64> {
    let (digits, mult) = match v.last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&v[..v.len() - 1], 1 << 20),
        b'g' | b'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    parse_u64(digits)?.checked_mul(mult)
}

/// Expands the output template for `pid`: `%p` becomes the pid, `%%` a
/// percent sign; `attempt` > 0 adds `.N` before a `.bin` suffix (or at the
/// end), so an exec'd program never overwrites the file of the image that
/// exec'd it (same pid).
pub fn expand_out(c: &Config, pid: u32, attempt: u32, out: &mut StackBuf<{ MAX_PATH + 32 }>) {
    let t = &c.out[..c.out_len];
    let (stem, ext): (&[u8], &[u8]) = if attempt > 0 && t.ends_with(b".bin") {
        (&t[..t.len() - 4], b".bin")
    } else {
        (t, b"")
    };
    let mut i = 0;
    while i < stem.len() {
        if stem[i] == b'%' && i + 1 < stem.len() {
            match stem[i + 1] {
                b'p' => {
                    out.push_u64(pid as u64);
                    i += 2;
                    continue;
                }
                b'%' => {
                    out.push(b"%");
                    i += 2;
                    continue;
                }
                _ => {}
            }
        }
        out.push(&stem[i..i + 1]);
        i += 1;
    }
    if attempt > 0 {
        out.push(b".").push_u64(attempt as u64);
    }
    out.push(ext);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_suffixes() {
        assert_eq!(parse_bytes(b"1"), Some(1));
        assert_eq!(parse_bytes(b"512k"), Some(524288));
        assert_eq!(parse_bytes(b"2M"), Some(2 << 20));
        assert_eq!(parse_bytes(b"banana"), None);
        assert_eq!(parse_bytes(b""), None);
        assert_eq!(parse_bytes(b"99999999999999999999g"), None);
    }

    #[test]
    fn templates_expand_pid_and_attempts() {
        let mut c = Config::default();
        let t = b"/tmp/app.%p.bin";
        c.out[..t.len()].copy_from_slice(t);
        c.out_len = t.len();
        let mut b = StackBuf::new();
        expand_out(&c, 42, 0, &mut b);
        assert_eq!(b.as_bytes(), b"/tmp/app.42.bin");
        let mut b = StackBuf::new();
        expand_out(&c, 42, 2, &mut b);
        assert_eq!(b.as_bytes(), b"/tmp/app.42.2.bin");
        let t = b"x%%y%q";
        c.out[..t.len()].copy_from_slice(t);
        c.out_len = t.len();
        let mut b = StackBuf::new();
        expand_out(&c, 7, 1, &mut b);
        assert_eq!(b.as_bytes(), b"x%y%q.1");
    }
}
