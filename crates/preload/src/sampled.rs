//! The set of live sampled blocks, for sampled mode, and how sampled blocks
//! are laid out so that a free recognizes them from the address.
//!
//! A free must tell a sampled block from the millions of unsampled ones
//! without a shared lookup. A sampled block is therefore placed where glibc
//! rarely puts one: the tracer allocates a block one page larger and hands
//! the program the first address in it whose low twelve bits read 0x010
//! (`TAG`), keeping the block's own address in the word before it. (Aligned allocations that need more than 16-byte alignment get the
//! page-aligned address itself, low bits 0x000.) `free` looks at the set only
//! when `ptr & CANDIDATE_MASK == 0`, which an ordinary pointer meets about
//! once in 128 frees.
//!
//! Why not hand out the page-aligned address, as jemalloc does with its own
//! arenas: once a sampled block goes back to glibc its page-aligned chunk is
//! recycled for ordinary blocks of the same size, and a program that keeps
//! allocating that size would then send every free down the slow path (we
//! measured 188,000 slow frees in 200,000 on a malloc(64)/free loop). The
//! recycled chunk hands out its page-aligned start, which the 0x010 tag does
//! not match.
//!
//! The set is a lock-free open-addressing hash set of the addresses the
//! program holds, in one anonymous mapping: insert claims an empty or
//! tombstone slot by CAS, remove swaps the address for a tombstone. An address
//! is unique while its block is live, and it is inserted before the block is
//! handed to the program and removed before the block is given back to the
//! allocator, so no two live entries ever hold the same address.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

use crate::sys;

const BITS: u32 = 20;
const SLOTS: usize = 1 << BITS;
const MAX_PROBES: usize = 4096;
const EMPTY: u64 = 0;
const TOMB: u64 = 1;

/// Sampled chunks are aligned to this.
pub const ALIGN: usize = 4096;
/// Offset of the program's address into a sampled chunk (for blocks that
/// need no more than 16-byte alignment).
pub const TAG: usize = 16;
/// `free(p)` must look `p` up when `p & CANDIDATE_MASK == 0`: low twelve
/// bits 0x000 (aligned sampled blocks) or 0x010 (the others).
pub const CANDIDATE_MASK: usize = (ALIGN - 1) & !TAG;

/// True when `p` may be a sampled block (its low bits say so).
#[inline]
pub fn is_candidate(p: usize) -> bool {
    p & CANDIDATE_MASK == 0
}

/// The first address with the tag's low bits at least `TAG` bytes into the
/// block at `chunk` (16-aligned), leaving room for the chunk's address in the
/// word before it.
#[inline]
pub fn tagged_in(chunk: usize) -> usize {
    ((chunk + ALIGN - 1) & !(ALIGN - 1)) + TAG
}

/// The address the real allocator knows for the program's sampled block
/// `p`: stored in the word before a tagged block, `p` itself for an aligned
/// one.
///
/// # Safety
/// `p` must be a live sampled block (in the set, or just removed from it).
#[inline]
pub unsafe fn chunk_of(p: usize) -> usize {
    if p & TAG != 0 {
        // SAFETY: a tagged block has its chunk's address in the word before
        // it (api::sampled_alloc), inside the chunk, still allocated.
        unsafe { *((p - 8) as *const usize) }
    } else {
        p
    }
}

static SET: AtomicUsize = AtomicUsize::new(0);

pub fn init() -> bool {
    // Called from the constructor (and by unit tests, concurrently).
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let p = sys::map_anon(SLOTS * 8);
        if !p.is_null() {
            SET.store(p as usize, Release);
        }
    });
    SET.load(Acquire) != 0
}

#[inline]
fn slot(i: usize) -> Option<&'static AtomicU64> {
    let base = SET.load(Acquire);
    if base == 0 {
        return None;
    }
    // SAFETY: the mapping holds SLOTS atomics and is never unmapped; `i` is
    // masked by the callers.
    Some(unsafe { &*(base as *const AtomicU64).add(i & (SLOTS - 1)) })
}

#[inline]
fn start(addr: u64) -> usize {
    ((addr >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BITS)) as usize
}

/// Adds a live sampled block. False when the set is full.
pub fn insert(addr: u64) -> bool {
    let s = start(addr);
    for k in 0..MAX_PROBES {
        let Some(sl) = slot(s + k) else { return false };
        let v = sl.load(Relaxed);
        if (v == EMPTY || v == TOMB) && sl.compare_exchange(v, addr, AcqRel, Relaxed).is_ok() {
            return true;
        }
    }
    false
}

/// The slot holding `addr`, if `addr` is a live sampled block.
fn find(addr: u64) -> Option<&'static AtomicU64> {
    let s = start(addr);
    for k in 0..MAX_PROBES {
        let sl = slot(s + k)?;
        let v = sl.load(Acquire);
        if v == EMPTY {
            return None;
        }
        if v == addr {
            return Some(sl);
        }
    }
    None
}

/// Removes `addr` if it is a live sampled block; true if it was.
pub fn remove(addr: u64) -> bool {
    find(addr).is_some_and(|sl| sl.compare_exchange(addr, TOMB, AcqRel, Relaxed).is_ok())
}

/// True if `addr` is a live sampled block.
pub fn contains(addr: u64) -> bool {
    find(addr).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove() {
        assert!(init());
        let a = 0x7f00_0000_1000u64;
        assert!(!contains(a));
        assert!(insert(a));
        assert!(contains(a));
        assert!(insert(a + 4096));
        assert!(remove(a));
        assert!(!contains(a));
        assert!(!remove(a));
        assert!(contains(a + 4096));
        // The tombstone is reused.
        assert!(insert(a));
        assert!(contains(a));
    }
}
