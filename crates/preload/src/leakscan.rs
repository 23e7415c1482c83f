//! The leak scan at exit (`MTRACE_RS_LEAK_SCAN=1`, exact mode): which of the
//! blocks still allocated are unreachable, as LeakSanitizer and valgrind's
//! "definitely lost" mean it.
//!
//! It runs in `writer::finish`, after the program's exit handlers and after
//! the last events are in the file, on the exiting thread:
//! 1. the live blocks come from replaying our own trace (the mapped file),
//!    with the same tolerance of cross-thread reordering as the analyzer;
//! 2. roots are the writable segments of every loaded object except this
//!    library, the exiting thread's stack from the current stack pointer up,
//!    and the mapping that holds its thread pointer (static TLS and the
//!    thread descriptor);
//! 3. a conservative mark phase follows every aligned word that points into
//!    (not only at the start of) a live block, transitively through the
//!    contents of marked blocks.
//!
//! Only memory that /proc/self/maps lists as readable is ever read, so a
//! block whose free we missed (and that the allocator unmapped) cannot fault.
//! Limits, said in README.md: other threads' stacks and registers are not
//! scanned (a pointer held only there counts as unreachable), nor is memory
//! allocated before tracing started.
//!
//! This is not a hook path: it allocates (as tracer-internal code) and reads
//! files.

use std::collections::HashMap;

use mtrace_format::{Decoder, Record};

/// An address range as (start, length).
pub type Range = (u64, u64);

/// Replays the trace in `file`: the blocks live at its end, sorted by
/// address, as (start, size); and the anonymous mappings the program made
/// itself and still holds (recorded with MTRACE_RS_MMAP=1), as (start, len).
pub fn replay(file: &[u8]) -> (Vec<Range>, Vec<Range>) {
    let Ok(mut d) = Decoder::new(file) else {
        return (Vec::new(), Vec::new());
    };
    let mut maps: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    // addr -> (alloc ts, size) for live blocks; addr -> free ts for frees
    // whose allocation has not been seen (it was in a later batch).
    let mut live: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut early_free: HashMap<u64, u64> = HashMap::new();
    while let Ok(Some(r)) = d.next() {
        match r {
            Record::Alloc { ts, addr, size, .. } => {
                if let Some(&fts) = early_free.get(&addr) {
                    early_free.remove(&addr);
                    if fts > ts {
                        continue; // born and freed
                    }
                }
                match live.get(&addr) {
                    Some(&(old, _)) if old > ts => {} // a later block holds the address
                    _ => {
                        live.insert(addr, (ts, size));
                    }
                }
            }
            Record::Free { ts, addr } => match live.get(&addr) {
                Some(&(ats, _)) if ats < ts => {
                    live.remove(&addr);
                }
                _ => {
                    early_free.insert(addr, ts);
                }
            },
            Record::Mmap { addr, len, .. } => {
                unmap(&mut maps, addr, len);
                maps.insert(addr, addr.saturating_add(len));
            }
            Record::Munmap { addr, len, .. } => unmap(&mut maps, addr, len),
            _ => {}
        }
    }
    let mut v: Vec<(u64, u64)> = live.into_iter().map(|(a, (_, s))| (a, s)).collect();
    v.sort_unstable();
    (v, maps.into_iter().map(|(s, e)| (s, e - s)).collect())
}

/// Removes [addr, addr + len) from `maps` (start -> end), splitting ranges.
fn unmap(maps: &mut std::collections::BTreeMap<u64, u64>, addr: u64, len: u64) {
    let end = addr.saturating_add(len);
    let hit: Vec<(u64, u64)> = maps
        .range(..end)
        .rev()
        .take_while(|(_, &e)| e > addr)
        .map(|(&s, &e)| (s, e))
        .collect();
    for (s, e) in hit {
        maps.remove(&s);
        if s < addr {
            maps.insert(s, addr);
        }
        if e > end {
            maps.insert(end, e);
        }
    }
}

/// The caller's stack pointer (roughly: an address in its frame).
#[inline(always)]
pub fn current_sp() -> u64 {
    let sp: u64;
    // SAFETY: reads rsp.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}

/// Readable address ranges from /proc/self/maps, sorted, one per mapping.
fn readable_mappings() -> Vec<(u64, u64)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        if !perms.starts_with('r') {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
            out.push((a, b));
        }
    }
    out.sort_unstable();
    out
}

/// Readable address ranges with adjacent mappings merged: a segment often
/// spans several (.data from the file, .bss anonymous after it).
fn readable_ranges(mappings: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(mappings.len());
    for &(a, b) in mappings {
        match merged.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => merged.push((a, b)),
        }
    }
    merged
}

fn is_readable(ranges: &[(u64, u64)], start: u64, len: u64) -> bool {
    let i = ranges.partition_point(|&(a, _)| a <= start);
    i > 0 && {
        let (_, b) = ranges[i - 1];
        start.checked_add(len).is_some_and(|end| end <= b)
    }
}

/// Writable segments of every loaded object but `skip` (this library).
fn data_segments(skip: (u64, u64)) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    crate::sys::each_object(|info, phdrs| {
        for ph in phdrs {
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W != 0 {
                let start = info.dlpi_addr.wrapping_add(ph.p_vaddr);
                if start < skip.0 || start >= skip.1 {
                    out.push((start, ph.p_memsz));
                }
            }
        }
        false
    });
    out
}

/// Marks every live block reachable from the roots; returns the addresses
/// of the unreachable ones, ascending. `stack_from` is the stack pointer of
/// the tracer's entry frame: the scanner's own frames below it hold the
/// addresses it is looking at and must not count as roots.
pub fn unreachable(
    live: &[(u64, u64)],
    maps: &[(u64, u64)],
    self_range: (u64, u64),
    stack_from: u64,
) -> Vec<u64> {
    if live.is_empty() {
        return Vec::new();
    }
    let mappings = readable_mappings();
    let readable = readable_ranges(&mappings);
    let mut roots = data_segments(self_range);
    // The program's own anonymous mappings (MTRACE_RS_MMAP=1): memory it
    // manages itself, such as Python's object arenas, holds pointers into
    // malloc'd blocks. glibc's arenas are mapped through its internal mmap
    // and are not among them (their free chunks would hold stale pointers).
    // Only the readable parts are taken (a reservation may be PROT_NONE).
    for &(s, len) in maps {
        let e = s.saturating_add(len);
        let i = mappings.partition_point(|&(_, b)| b <= s);
        for &(a, b) in &mappings[i..] {
            if a >= e {
                break;
            }
            let (lo, hi) = (a.max(s), b.min(e));
            if hi > lo {
                roots.push((lo, hi - lo));
            }
        }
    }
    let sp = stack_from;
    // The exiting thread's stack, from here up to the end of its mapping.
    let i = mappings.partition_point(|&(a, _)| a <= sp);
    if i > 0 && mappings[i - 1].1 > sp {
        roots.push((sp & !7, mappings[i - 1].1 - (sp & !7)));
    }
    // Static TLS and the thread descriptor live in the mapping that holds
    // the thread pointer.
    let tp: u64;
    // SAFETY: reads %fs:0, the thread pointer.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly))
    };
    let j = mappings.partition_point(|&(a, _)| a <= tp);
    if j > 0 && mappings[j - 1].1 > tp {
        let (a, b) = mappings[j - 1];
        if b - a <= 64 << 20 {
            roots.push((a, b - a));
        }
    }
    let lo = live[0].0;
    let hi = live.iter().map(|&(a, s)| a + s.max(1)).max().unwrap_or(lo);
    let mut marked = vec![false; live.len()];
    let mut work: Vec<usize> = Vec::new();
    let visit = |start: u64, len: u64, marked: &mut Vec<bool>, work: &mut Vec<usize>| {
        if !is_readable(&readable, start, len) {
            return;
        }
        let mut p = (start + 7) & !7;
        while p + 8 <= start + len {
            // SAFETY: [p, p + 8) lies inside a mapping /proc/self/maps lists
            // as readable; a volatile read, since the memory is not ours.
            let v = unsafe { core::ptr::read_volatile(p as *const u64) };
            p += 8;
            if v < lo || v >= hi {
                continue;
            }
            let k = live.partition_point(|&(a, _)| a <= v);
            if k == 0 {
                continue;
            }
            let (a, s) = live[k - 1];
            if v < a + s.max(1) && !marked[k - 1] {
                marked[k - 1] = true;
                work.push(k - 1);
            }
        }
    };
    for &(start, len) in &roots {
        visit(start, len, &mut marked, &mut work);
    }
    while let Some(k) = work.pop() {
        let (a, s) = live[k];
        visit(a, s, &mut marked, &mut work);
    }
    live.iter()
        .zip(&marked)
        .filter(|(_, &m)| !m)
        .map(|(&(a, _), _)| a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_held_by_globals_and_by_other_blocks_are_reachable() {
        // Real heap blocks: one held by a static, one only by the first
        // block, one by nothing.
        static mut HOLDER: usize = 0;
        let a = Box::into_raw(Box::new([0u64; 4]));
        let b = Box::into_raw(Box::new([0u64; 4]));
        let c = Box::into_raw(Box::new([7u64; 4]));
        // SAFETY: single-threaded test; the blocks are ours.
        unsafe {
            HOLDER = a as usize;
            (*a)[2] = b as u64 + 8; // an interior pointer
        }
        let mut live = vec![(a as u64, 32), (b as u64, 32), (c as u64, 32)];
        live.sort_unstable();
        let c_addr = c as u64;
        // Forget c's address on our own stack as far as we can.
        let lost = unreachable(&live, &[], (0, 0), current_sp());
        // SAFETY: reading the static keeps it alive to the scan.
        assert_ne!(unsafe { core::ptr::read_volatile(&raw const HOLDER) }, 0);
        assert!(!lost.contains(&(a as u64)));
        assert!(!lost.contains(&(b as u64)));
        // `c` may still sit in a register spilled to this stack frame; the
        // scan is conservative, so only check the two that must be found.
        let _ = c_addr;
    }

    #[test]
    fn readable_ranges_cover_the_stack() {
        let x = 5u64;
        let r = readable_ranges(&readable_mappings());
        assert!(is_readable(&r, &x as *const u64 as u64, 8));
        assert!(!is_readable(&r, 8, 8));
    }
}
