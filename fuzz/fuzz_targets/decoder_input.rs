//! How a fuzz input becomes a trace file, shared by the `decoder` and
//! `analyze` targets.
//!
//! The first input byte chooses the shape of the file:
//! - bit 0 set: the rest of the input is a whole file, header page included
//!   (for foreign, truncated and damaged headers);
//! - bit 0 clear: the input after a 17-byte prefix is the record stream, put
//!   behind a valid header built from the prefix (version, committed length,
//!   sample rate), so that mutations land in the records instead of in the
//!   4 KiB header page of zeros.

use mtrace_format::{Header, HEADER_SIZE};

/// The trace file an input stands for (see the module documentation).
pub fn file(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    if mode & 1 == 1 {
        return Some(rest.to_vec());
    }
    if rest.len() < 16 {
        return None;
    }
    let (prefix, stream) = rest.split_at(16);
    let committed = u64::from_le_bytes(prefix[0..8].try_into().unwrap());
    // Mostly the honest length; sometimes more (a truncated file) or less
    // (a writer that had not committed its last batch).
    let committed = match committed % 4 {
        0 | 1 => stream.len() as u64,
        2 => committed >> 2,
        _ => (stream.len() as u64).saturating_sub(committed >> 60),
    };
    let h = Header {
        version: 1 + (prefix[8] as u32 % 2),
        committed,
        flags: prefix[9] as u32 & 1,
        pid: 1,
        ppid: 0,
        max_depth: 64,
        start_realtime_ns: 0,
        start_monotonic_ns: 0,
        sample_rate: u64::from_le_bytes(prefix[8..16].try_into().unwrap()) >> 8,
    };
    let mut out = vec![0u8; HEADER_SIZE];
    h.encode(&mut out);
    out.extend_from_slice(stream);
    Some(out)
}
