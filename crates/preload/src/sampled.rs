//! The set of live sampled blocks, for sampled mode, and how sampled blocks
//! are laid out so that a free recognizes them from the address.
//!
//! A free must tell a sampled block from the millions of unsampled ones
//! without a shared lookup. A sampled block is therefore placed where glibc
//! rarely puts one, at an address whose low sixteen bits read 0x0010 (`TAG`
//! past a multiple of `ALIGN`, 64 KiB): a block of up to 128 KiB less 16
//! bytes gets pages of the tracer's own (pool.rs: glibc never sees it), each
//! block starting on a 64 KiB boundary; a larger one the first such address
//! in a block the tracer allocates 64 KiB larger. Aligned allocations that
//! need more than 16-byte alignment get an address on a 64 KiB boundary,
//! low bits 0x0000, one such unit into their chunk (for a pool block, the
//! second 64 KiB of a 128 KiB one). Either way the two words before the
//! program's address belong to the chunk: the word at `p - 8` holds the
//! chunk's own address (for a pool block, its chunk word), the one at
//! `p - 16` a key (below). `free` looks further only when
//! `ptr & CANDIDATE_MASK == 0`, which an ordinary 16-aligned pointer meets
//! about once in 2048 frees. (With 4 KiB, once in 128: on the churn
//! benchmark five in six candidates were ordinary blocks, each a branch
//! mispredicted and a call into the slow path, about 12 ns.)
//!
//! Why not hand out the aligned address, as jemalloc does with its own
//! arenas: once a sampled block goes back to glibc its aligned chunk is
//! recycled for ordinary blocks of the same size, and a program that keeps
//! allocating that size would then send every free down the slow path (we
//! measured 188,000 slow frees in 200,000 on a malloc(64)/free loop with
//! page-aligned chunks). The recycled chunk hands out its aligned start,
//! which the 0x0010 tag does not match.
//!
//! Which candidates are sampled blocks: the key word holds `KEY ^ p`, where
//! `KEY` is a random number drawn at start-up with its top bit set (so the
//! key is never zero, and never equals a user-space address). For a tagged
//! candidate that is not ours the word is the first of the same page; for an
//! aligned one from glibc it is glibc's chunk header; both are mapped,
//! so reading it is safe, and a chance match with program data has
//! probability 2^-63. The key is cleared before the chunk goes back to the
//! allocator, so recycled memory never carries one. This costs a free
//! nothing beyond the cache line glibc's own free touches: the first design
//! kept every sampled block in a hash set, and its lookups (a cache miss
//! each) and first writes (a copy-on-write fault of the zero page, with a
//! TLB shootdown) were a quarter of the sampled-mode cost on the churn
//! benchmark.
//!
//! Under another allocator (jemalloc, tcmalloc) a foreign 64 KiB-aligned
//! pointer may start a mapping, with nothing mapped before it, so aligned
//! sampled blocks are looked up instead in a lock-free open-addressing hash
//! set of the addresses the program holds, in one anonymous mapping: insert
//! claims an empty or tombstone slot by CAS, remove swaps the address for a
//! tombstone. An address is unique while its block is live, and it is
//! inserted before the block is handed to the program and removed before the
//! block is given back to the allocator, so no two live entries ever hold
//! the same address.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

use crate::sys;
use crate::tracer::HOT;

const BITS: u32 = 20;
const SLOTS: usize = 1 << BITS;
const MAX_PROBES: usize = 4096;
const EMPTY: u64 = 0;
const TOMB: u64 = 1;

/// Sampled blocks' addresses are this many bytes apart, plus `TAG` for
/// the blocks that need no more than 16-byte alignment.
pub const ALIGN: usize = 1 << 16;
/// The page size the pool and `valloc` work in.
pub const PAGE: usize = 4096;
/// Offset of the program's address into a sampled chunk (for blocks that
/// need no more than 16-byte alignment).
pub const TAG: usize = 16;
/// `free(p)` must look `p` up when `p & CANDIDATE_MASK == 0`: low sixteen
/// bits 0x0000 (aligned sampled blocks) or 0x0010 (the others).
pub const CANDIDATE_MASK: usize = (ALIGN - 1) & !TAG;

/// Whether `p`, a candidate, is told by its key word rather than the set.
#[inline]
fn keyed(p: u64) -> bool {
    p & TAG as u64 != 0 || HOT.aligned_keyed.load(Relaxed)
}

/// True when `p` may be a sampled block (its low bits say so).
#[inline]
pub fn is_candidate(p: usize) -> bool {
    p & CANDIDATE_MASK == 0
}

/// The first address with the tag's low bits at least `TAG` bytes into the
/// block at `chunk` (16-aligned), leaving room for the chunk's address in the
/// word before it: at most `ALIGN` bytes in.
#[inline]
pub fn tagged_in(chunk: usize) -> usize {
    ((chunk + ALIGN - 1) & !(ALIGN - 1)) + TAG
}

/// The chunk word of the program's sampled block `p`, stored in the word
/// before it: the address the real allocator knows, or a pool block's word
/// with `pool::MARK` set (api.rs gives either back with `free_chunk`).
///
/// # Safety
/// `p` must be a live sampled block (or one just taken out).
#[inline]
pub unsafe fn chunk_of(p: usize) -> usize {
    // SAFETY: a sampled block has its chunk's address in the word before it
    // (api::sampled_alloc, api::aligned_slow), inside the chunk, still
    // allocated.
    unsafe { *((p - 8) as *const usize) }
}

static SET: AtomicUsize = AtomicUsize::new(0);

/// A random key with its top bit set: from the kernel when it answers, from
/// the clock and addresses otherwise (it only has to be unguessable by
/// accident).
fn draw_key() -> u64 {
    let mut k = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into `k`.
    let n = unsafe { libc::getrandom((&raw mut k).cast(), 8, libc::GRND_NONBLOCK) };
    if n != 8 {
        let mut z = sys::now_ns() ^ (&raw const k as u64).rotate_left(32);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        k = z ^ (z >> 31);
    }
    k | 1 << 63
}

pub fn init() -> bool {
    // Called from the constructor (and by unit tests, concurrently).
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        HOT.key.store(draw_key(), Relaxed);
        HOT.aligned_keyed
            .store(crate::real::next_is_glibc(), Relaxed);
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
fn insert(addr: u64) -> bool {
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

/// The slot holding `addr`, if `addr` is a live aligned sampled block.
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

/// The key a sampled block at `p` carries; `None` before the key is drawn
/// (exact mode, or sampled mode not started), when no block is marked.
#[inline]
fn key_for(p: u64) -> Option<u64> {
    let key = HOT.key.load(Relaxed);
    (key != 0).then_some(key ^ p)
}

/// The key word of a keyed candidate.
///
/// # Safety
/// `p` is a candidate for which `keyed(p)` holds and a pointer the program
/// hands to free, realloc or malloc_usable_size, or a sampled block: `p - 16`
/// is then the start of the same page, glibc's chunk header, or inside the
/// tracer's own chunk.
#[inline]
unsafe fn key_word(p: u64) -> &'static AtomicU64 {
    // SAFETY: as the function's contract; the address is 16-aligned.
    unsafe { &*((p - TAG as u64) as *const AtomicU64) }
}

/// Marks the block the program is about to get at `p` (from
/// `sampled_alloc` or an aligned allocation) as sampled. False when it
/// cannot be marked (the aligned set, under another allocator, is full).
///
/// # Safety
/// `p` is a block just allocated for sampling, with `[p - 16, p)` inside its
/// chunk.
pub unsafe fn mark(p: u64) -> bool {
    if keyed(p) {
        // The key is drawn at init, before tracing can start: never None
        // for a block recorded in sampled mode.
        key_for(p).is_some_and(|key| {
            // SAFETY: as the contract.
            unsafe { key_word(p) }.store(key, Release);
            true
        })
    } else {
        insert(p)
    }
}

/// True if `p`, which the program holds, is a live sampled block.
///
/// # Safety
/// `p` is a pointer the program passes to free, realloc or
/// malloc_usable_size: non-null, into mapped memory.
pub unsafe fn holds(p: u64) -> bool {
    if !is_candidate(p as usize) {
        return false;
    }
    if keyed(p) {
        // SAFETY: as the contract.
        key_for(p).is_some_and(|key| unsafe { key_word(p) }.load(Acquire) == key)
    } else {
        find(p).is_some()
    }
}

/// Takes `p` out of the sampled blocks if it is one; true if it was. The
/// caller then gives `chunk_of(p)` back to the allocator.
///
/// # Safety
/// As [`holds`].
pub unsafe fn take(p: u64) -> bool {
    if !is_candidate(p as usize) {
        return false;
    }
    if keyed(p) {
        key_for(p).is_some_and(|key| {
            // SAFETY: as the contract.
            let w = unsafe { key_word(p) };
            // A plain load first: most candidates are ordinary blocks, and
            // a locked compare-and-swap takes the cache line exclusively
            // even when it fails.
            w.load(Relaxed) == key && w.compare_exchange(key, 0, AcqRel, Relaxed).is_ok()
        })
    } else {
        find(p).is_some_and(|sl| sl.compare_exchange(p, TOMB, AcqRel, Relaxed).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aligned_set_inserts_finds_and_reuses_tombstones() {
        assert!(init());
        let a = 0x7f00_0000_1000u64;
        assert!(find(a).is_none());
        assert!(insert(a));
        assert!(find(a).is_some());
        assert!(insert(a + 4096));
        let sl = find(a).unwrap();
        assert!(sl.compare_exchange(a, TOMB, AcqRel, Relaxed).is_ok());
        assert!(find(a).is_none());
        assert!(find(a + 4096).is_some());
        // The tombstone is reused.
        assert!(insert(a));
        assert!(find(a).is_some());
    }

    #[test]
    fn tagged_blocks_carry_a_key() {
        assert!(init());
        let page = vec![0u64; 3 * ALIGN / 8];
        let base = (page.as_ptr() as usize + ALIGN - 1) & !(ALIGN - 1);
        let p = (base + TAG) as u64;
        // SAFETY: [base, base + 2 * ALIGN) lies inside `page`.
        unsafe {
            assert!(!holds(p));
            assert!(mark(p));
            assert!(holds(p));
            assert_ne!(*(base as *const u64), 0);
            assert!(take(p));
            assert_eq!(*(base as *const u64), 0, "the key is cleared");
            assert!(!holds(p));
            assert!(!take(p));
            // Not candidates, whatever their key word holds: an address 16
            // bytes on, and one with the tag's low twelve bits only.
            assert!(!holds(p + 16));
            let q = p + PAGE as u64;
            assert!(mark(q));
            assert!(!holds(q) && !take(q), "0x1010 is not a candidate");
            *((q - 16) as *mut u64) = 0;
            // An aligned block under glibc (this test's allocator) is keyed
            // too.
            let q = (base + ALIGN) as u64;
            assert!(HOT.aligned_keyed.load(Relaxed));
            assert!(!holds(q));
            assert!(mark(q));
            assert!(holds(q));
            assert!(take(q));
            assert!(!holds(q));
        }
        drop(page);
    }
}
