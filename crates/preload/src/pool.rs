//! Pages of our own for small sampled blocks.
//!
//! A sampled block must sit at a tagged address (sampled.rs), so glibc was
//! asked for a chunk one page larger than the block. Such a chunk is past
//! glibc's thread cache and its small bins: its malloc and free went through
//! the large bins and consolidation, and on the churn benchmark glibc's own
//! functions took about 1.5% more time than bare. A block of at most
//! [`MAX`] bytes now gets a page of this pool instead: the program's address
//! is the page plus `TAG`, the key is the page's first word and the page's
//! address, with [`MARK`] set, its second (where `sampled::chunk_of` looks),
//! so that the free hands the page back here instead of to glibc.
//!
//! The free pages form a lock-free stack (nothing to hold across `fork`):
//! the head is a page address with a 28-bit generation in the bits a page
//! address leaves unused (its low 12 and the top 16 of a user-space
//! address), so that a pop that read a stale `next` fails its
//! compare-and-swap unless 2^28 pushes and pops happened in between; a
//! free page's `next` is its second word. Pages are mapped `REFILL` at a time and
//! never unmapped: the pool holds at most as many pages as there were small
//! sampled blocks live at once (each one took a page of glibc's heap
//! before).

use core::sync::atomic::{AtomicUsize, Ordering::*};

use crate::real;
use crate::sampled::{ALIGN, TAG};

/// The largest block a pool page holds.
pub const MAX: usize = ALIGN - TAG;

/// Set in a chunk word that names a pool page (glibc's chunks are 16-byte
/// aligned: the bit is never set in theirs).
pub const MARK: usize = 1;

/// Pages mapped at once.
const REFILL: usize = 16;

/// The bits of a head that hold the page: a user-space address below 2^47.
const PAGE_BITS: usize = 0x0000_7fff_ffff_f000;

/// The free pages: top page, with a generation (see the module docs).
static HEAD: AtomicUsize = AtomicUsize::new(0);

/// `page` with the generation after the one in `head`.
#[inline]
fn next_head(head: usize, page: usize) -> usize {
    let gen = (head & 0xfff) | ((head >> 48) << 12);
    let gen = gen.wrapping_add(1) & 0x0fff_ffff;
    page | (gen & 0xfff) | ((gen >> 12) << 48)
}

/// The word of `page` that links it to the next free page (its chunk word
/// while it holds a block).
///
/// # Safety
/// `page` is a pool page (mapped for good).
unsafe fn link(page: usize) -> &'static AtomicUsize {
    // SAFETY: as the contract; 8-aligned.
    unsafe { &*((page + 8) as *const AtomicUsize) }
}

/// Pushes the chain `first ..= last` (linked already) onto the free stack.
///
/// # Safety
/// The pages are pool pages no block uses.
unsafe fn push_chain(first: usize, last: usize) {
    let mut head = HEAD.load(Relaxed);
    loop {
        // SAFETY: as the contract.
        unsafe { link(last) }.store(head & PAGE_BITS, Relaxed);
        let new = next_head(head, first);
        match HEAD.compare_exchange_weak(head, new, Release, Relaxed) {
            Ok(_) => return,
            Err(h) => head = h,
        }
    }
}

/// A free page, or `None` when the stack is empty.
fn pop() -> Option<usize> {
    let mut head = HEAD.load(Acquire);
    loop {
        let page = head & PAGE_BITS;
        if page == 0 {
            return None;
        }
        // SAFETY: a pool page stays mapped; if another thread took it
        // meanwhile, the word read is stale and the exchange below fails
        // (the generation moved on).
        let next = unsafe { link(page) }.load(Relaxed) & PAGE_BITS;
        let new = next_head(head, next);
        match HEAD.compare_exchange_weak(head, new, Acquire, Acquire) {
            Ok(_) => return Some(page),
            Err(h) => head = h,
        }
    }
}

/// Maps `REFILL` pages, keeps one and frees the others; `None` when the
/// system refuses memory.
fn refill() -> Option<usize> {
    let len = REFILL * ALIGN;
    // SAFETY: a fresh private anonymous mapping, through the real mmap so
    // that it is not taken for one of the program's.
    let base = unsafe {
        real::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base as usize;
    if (base + len - 1) & !PAGE_BITS & !(ALIGN - 1) != 0 {
        // Above 2^47 (only where the program asked for such addresses):
        // no room for the generation. Leave these blocks to glibc.
        // SAFETY: the mapping just made, unused.
        unsafe { real::munmap(base as *mut libc::c_void, len) };
        return None;
    }
    let first = base + ALIGN;
    let last = base + (REFILL - 1) * ALIGN;
    let mut page = first;
    while page < last {
        // SAFETY: pages of the mapping just made.
        unsafe { link(page) }.store(page + ALIGN, Relaxed);
        page += ALIGN;
    }
    // SAFETY: the mapping's pages but the first, linked above, unused.
    unsafe { push_chain(first, last) };
    Some(base)
}

/// A page for a sampled block of at most [`MAX`] bytes; `None` when the
/// system refuses memory (the caller then asks glibc).
pub fn take() -> Option<usize> {
    pop().or_else(refill)
}

/// Gives back a page from [`take`] whose block was freed (its key cleared).
///
/// # Safety
/// `page` came from [`take`] and nothing refers to its block any more.
pub unsafe fn give(page: usize) {
    // SAFETY: as the contract.
    unsafe { push_chain(page, page) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_reused_and_distinct_while_held() {
        let held: Vec<usize> = (0..3 * REFILL).map(|_| take().unwrap()).collect();
        let mut sorted = held.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), held.len(), "a page handed out twice");
        assert!(held.iter().all(|p| p % ALIGN == 0));
        for &p in &held {
            // SAFETY: our pages, no longer used.
            unsafe { give(p) };
        }
        let again: Vec<usize> = (0..held.len()).map(|_| take().unwrap()).collect();
        let mut a = again.clone();
        a.sort_unstable();
        assert_eq!(
            a, sorted,
            "freed pages come back before new ones are mapped"
        );
        for &p in &again {
            // SAFETY: as above.
            unsafe { give(p) };
        }
        // (One test: the pool is global, and tests run in parallel.)
        threads_never_share_a_page();
    }

    fn threads_never_share_a_page() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let mut mine = Vec::new();
                    for round in 0..2000usize {
                        let p = take().unwrap();
                        // The block's words are ours alone while held.
                        // SAFETY: a page just taken.
                        unsafe { *((p + TAG) as *mut usize) = round };
                        mine.push(p);
                        if round % 3 == 0 {
                            let q = mine.swap_remove(round % mine.len());
                            // SAFETY: our page, held by no one else.
                            unsafe { give(q) };
                        }
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<usize> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "two threads held the same page");
        for p in all {
            // SAFETY: as above.
            unsafe { give(p) };
        }
    }
}
