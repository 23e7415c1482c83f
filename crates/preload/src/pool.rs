//! Blocks of our own for sampled blocks of up to 128 KiB.
//!
//! A sampled block must sit at a tagged address (sampled.rs), so glibc was
//! asked for a chunk larger than the block. Such a chunk is past glibc's
//! thread cache and its small bins, and padding the program never uses: its
//! malloc and free went through the large bins and consolidation, and
//! calloc cleared the padding too. A block of at most [`MAX`] bytes gets a
//! block of this pool instead: as many whole pages as it needs with the two
//! words in front, rounded up to a power of two (`CLASSES` size classes of
//! 1, 2, 4, 8, 16 and 32 pages; pages a block does not use cost address
//! space, not memory, and coarse classes reuse a block sooner, while it is
//! still in the cache), starting on a 64 KiB boundary (`ALIGN`, the tag's
//! unit: each block has 64 KiB of address space at least). The program's
//! address is the block's first page plus `TAG`, the key is the page's
//! first word and the chunk word (the page, the class, [`MARK`] and the
//! program's size) its second (where `sampled::chunk_of` looks), so that
//! the free hands the block back here instead of to glibc. An aligned
//! sampled block gets the second 64 KiB of a 32-page block, its two words
//! at the end of the first. glibc never sees these blocks, and its heap is
//! the one the program would have without the tracer, less the sampled
//! blocks.
//!
//! Each class's free blocks form a lock-free stack (nothing to hold across
//! `fork`): the head is a page address with a 28-bit generation in the bits
//! a page address leaves unused (its low 12 and the top 16 of a user-space
//! address), so that a pop that read a stale `next` fails its
//! compare-and-swap unless 2^28 pushes and pops happened in between; a free
//! block's `next` is its second word. Blocks are mapped 1 MiB of address
//! space (or one block) at a time and never unmapped: a take uses a free
//! block up to `SPARE_CLASSES` classes larger before it maps more, so the
//! pool holds about as many blocks as there were sampled blocks live at
//! once (each took as much of glibc's heap, and more, before). Pool blocks
//! are not in glibc's statistics (mallinfo2).
//!
//! In front of the shared stacks, each thread keeps up to [`CACHE_DEPTH`]
//! blocks it freed of each class (`Tls::pool_cache`) and takes them back
//! first, the last freed first: no atomic instruction, and no read of the
//! block's first line, which the shared stack's pop needs for the link and
//! which has usually left the caches by then. A free that finds its class's
//! cache full pushes its own block, whose first line it has just read, onto
//! the thread's set: pushing an older cached block instead wrote that
//! block's cold line before a locked instruction, which waits for the
//! write (a variant timed with the TSC put such a give at about 290 cycles
//! on the churn, against about 25 for a cached one). The cached blocks go
//! to the thread's set when the thread exits.

#[cfg(test)]
use core::cell::Cell;
use core::sync::atomic::{AtomicUsize, Ordering::*};

use crate::real;
use crate::sampled::{ALIGN, PAGE, TAG};
use crate::tracer::{Tls, TLS};

/// Size classes: a block of class `k` spans `2^k` pages, 1 to 32.
pub const CLASSES: usize = 6;

/// Free blocks a thread keeps per class. Takes and frees of a class come
/// in about equal numbers, in random order; with room for `d` blocks a take
/// finds the cache empty about once in `d + 1`. The blocks hold address
/// space (at most 4 x 252 KiB a thread) and only the pages the program
/// used in them.
pub const CACHE_DEPTH: usize = 4;

/// The largest block the pool holds: 128 KiB less the two words in front
/// (an aligned one, 64 KiB in, may have 64 KiB).
pub const MAX: usize = (1 << (CLASSES - 1)) * PAGE - TAG;
const _: () = assert!(MAX + TAG >= 2 * ALIGN);

/// Set in a chunk word that names a pool block (glibc's chunks are 16-byte
/// aligned: the bit is never set in theirs); the class sits in the bits
/// above it, the block's first page in the rest.
pub const MARK: usize = 1;

/// The bits of a head that hold the page: a user-space address below 2^47.
const PAGE_BITS: usize = 0x0000_7fff_ffff_f000;

/// Address space mapped at once for a class (at least one block).
const REFILL_BYTES: usize = 16 * ALIGN;

/// How many classes up a take may look before it maps more: a free block
/// of twice the pages needed is used rather than a new one, so that the
/// pool keeps about the peak of the sampled blocks live at once, not that
/// peak for each class separately.
const SPARE_CLASSES: usize = 1;

/// A class's free blocks: first page, with a generation (see the module
/// docs). One cache line each, so that two threads taking blocks of
/// different sizes do not pass a line back and forth.
#[repr(align(64))]
struct Head(AtomicUsize);

/// Sets of heads: a thread takes from and gives to its own set
/// (`Tls::pool_home`, assigned in turn), so that two threads sampling
/// blocks of the same sizes do not pass a head's cache line back and forth
/// on every take and give; when its own set has none of a class it takes
/// another set's before mapping more. (perf put a take at about 90 ns on
/// the churn benchmark either way: it is the read of the block's cold first
/// line, which glibc's malloc would have read as well.)
pub const SETS: usize = 4;

static HEADS: [[Head; CLASSES]; SETS] =
    [const { [const { Head(AtomicUsize::new(0)) }; CLASSES] }; SETS];

/// The class of a block of `size` bytes (at most [`MAX`]): the power of
/// two of the pages it needs with the two words in front, rounded up.
#[inline]
fn class_of(size: usize) -> usize {
    let pages = (size + TAG).div_ceil(PAGE).max(1);
    (usize::BITS - (pages - 1).leading_zeros()) as usize
}

/// The bytes a block of class `class` spans.
#[inline]
fn span(class: usize) -> usize {
    PAGE << class
}

/// The distance between two blocks of class `class`: its span, at least
/// `ALIGN`, so that every block starts on a multiple of `ALIGN`.
#[inline]
fn stride(class: usize) -> usize {
    span(class).max(ALIGN)
}

/// The class a chunk word names.
#[inline]
fn class_in(word: usize) -> usize {
    (word & (PAGE - 1)) >> 1 & 0xf
}

/// The chunk word of the block of class `class` at `page`.
#[inline]
fn word(page: usize, class: usize) -> usize {
    page | class << 1 | MARK
}

/// Where a chunk word keeps the program's size, in 16-byte units (13
/// bits: up to 128 KiB), above the page's bits.
const SIZE_SHIFT: u32 = 47;
const SIZE_UNITS: usize = 0x1fff;
const _: () = assert!(MAX.div_ceil(16) <= SIZE_UNITS);

/// `word` saying that the program asked for `size` bytes (at most [`MAX`]).
#[inline]
fn with_size(word: usize, size: usize) -> usize {
    (word & !(SIZE_UNITS << SIZE_SHIFT)) | size.div_ceil(16) << SIZE_SHIFT
}

/// Bytes the program may use in the pool block whose chunk word is `word`:
/// its size rounded up to 16, as glibc would report about (the block may
/// hold more, but a program that used it would have realloc copy it, and
/// most of it is cold).
#[inline]
pub fn usable(word: usize) -> usize {
    (word >> SIZE_SHIFT & SIZE_UNITS) << 4
}

/// The end of the pool block whose chunk word is `word`.
#[cfg(test)]
fn end(word: usize) -> usize {
    (word & PAGE_BITS) + span(class_in(word))
}

/// `page` with the generation after the one in `head`.
#[inline]
fn next_head(head: usize, page: usize) -> usize {
    let gen = (head & 0xfff) | ((head >> 48) << 12);
    let gen = gen.wrapping_add(1) & 0x0fff_ffff;
    page | (gen & 0xfff) | ((gen >> 12) << 48)
}

/// The word of a block (at `page`, its first) that links it to the next
/// free block of its class (its chunk word while it holds a block).
///
/// # Safety
/// `page` starts a pool block (mapped for good).
unsafe fn link(page: usize) -> &'static AtomicUsize {
    // SAFETY: as the contract; 8-aligned.
    unsafe { &*((page + 8) as *const AtomicUsize) }
}

/// Pushes the chain `first ..= last` (linked already) onto a class's stack.
///
/// # Safety
/// The blocks are pool blocks of that class no block uses.
unsafe fn push_chain(head_of: &AtomicUsize, first: usize, last: usize) {
    let mut head = head_of.load(Relaxed);
    loop {
        // SAFETY: as the contract.
        unsafe { link(last) }.store(head & PAGE_BITS, Relaxed);
        let new = next_head(head, first);
        match head_of.compare_exchange_weak(head, new, Release, Relaxed) {
            Ok(_) => return,
            Err(h) => head = h,
        }
    }
}

/// A free block of a class, or `None` when its stack is empty.
fn pop(head_of: &AtomicUsize) -> Option<usize> {
    let mut head = head_of.load(Acquire);
    loop {
        let page = head & PAGE_BITS;
        if page == 0 {
            return None;
        }
        // SAFETY: a pool block stays mapped; if another thread took it
        // meanwhile, the word read is stale and the exchange below fails
        // (the generation moved on).
        let next = unsafe { link(page) }.load(Relaxed) & PAGE_BITS;
        let new = next_head(head, next);
        match head_of.compare_exchange_weak(head, new, Acquire, Acquire) {
            Ok(_) => {
                // The next pop of this class reads the next block's first
                // line (its link) and then writes it (the key, the chunk
                // word, the program's first bytes): start fetching it now.
                // perf put a take at about 70 ns without this, nearly all
                // of it that line's miss, and at about 57 ns with it (the
                // line may leave the core's caches before the next take):
                // the thread's cached block, tried first, is what avoids
                // the read.
                if next != 0 {
                    crate::sys::prefetch_write(next as *const u8);
                }
                return Some(page);
            }
            Err(h) => head = h,
        }
    }
}

/// Maps blocks of a class (`REFILL_BYTES` or one block, whichever is
/// larger), keeps one and frees the others into set `set`; `None` when the
/// system refuses memory.
fn refill(class: usize, set: usize) -> Option<usize> {
    let stride = stride(class);
    let count = (REFILL_BYTES / stride).max(1);
    let len = count * stride;
    // Room to start on a multiple of ALIGN; the ends are given back.
    let mapped = len + ALIGN - PAGE;
    // SAFETY: a fresh private anonymous mapping, through the real mmap so
    // that it is not taken for one of the program's.
    let raw = unsafe {
        real::mmap(
            core::ptr::null_mut(),
            mapped,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let raw = raw as usize;
    let base = (raw + ALIGN - 1) & !(ALIGN - 1);
    // SAFETY: the parts of the mapping just made before `base` and after
    // `base + len`, unused.
    unsafe {
        if base > raw {
            real::munmap(raw as *mut libc::c_void, base - raw);
        }
        if raw + mapped > base + len {
            real::munmap((base + len) as *mut libc::c_void, raw + mapped - base - len);
        }
    }
    if (base + len - 1) & !PAGE_BITS & !(PAGE - 1) != 0 {
        // Above 2^47 (only where the program asked for such addresses):
        // no room for the generation. Leave these blocks to glibc.
        // SAFETY: the mapping just made, unused.
        unsafe { real::munmap(base as *mut libc::c_void, len) };
        return None;
    }
    if count > 1 {
        let first = base + stride;
        let last = base + (count - 1) * stride;
        let mut page = first;
        while page < last {
            // SAFETY: blocks of the mapping just made.
            unsafe { link(page) }.store(page + stride, Relaxed);
            page += stride;
        }
        // SAFETY: the mapping's blocks but the first, linked above, unused.
        unsafe { push_chain(&HEADS[set][class].0, first, last) };
    }
    Some(base)
}

/// A block for a sampled block of `size` bytes placed `front` bytes into it
/// (`TAG`, or `ALIGN` for an aligned block), with its chunk word, which
/// keeps `size`, in the word before the program's address: that address,
/// or `None` when the system refuses memory (the caller then asks glibc).
/// `size + front - TAG` is at most [`MAX`].
pub fn place(size: usize, front: usize) -> Option<usize> {
    let (page, word) = take(size + front - TAG)?;
    let p = page + front;
    // SAFETY: a block of our own, at least `size + front` bytes from `page`
    // (its class counts the two words in front); p - 8 lies in it, and is
    // 8-aligned.
    unsafe { *((p - 8) as *mut usize) = with_size(word, size) };
    Some(p)
}

/// A block for a sampled block of `size` bytes (at most [`MAX`]), as its
/// first page and its chunk word; `None` when the system refuses memory.
///
/// Per class, up to `SPARE_CLASSES` above the one needed: the block this
/// thread freed last of those it keeps (its cache: no atomic instruction,
/// and no read of the block, whose first line may have left the caches
/// since), then this thread's set, then the others'.
fn take(size: usize) -> Option<(usize, usize)> {
    let class = class_of(size);
    let last = (class + SPARE_CLASSES).min(CLASSES - 1);
    TLS.with(|t| {
        let set = t.pool_home() % SETS;
        let free = |c: usize| {
            cached(t, c)
                .or_else(|| (0..SETS).find_map(|i| pop(&HEADS[(set + i) % SETS][c].0)))
                .map(|page| (page, word(page, c)))
        };
        (class..=last).find_map(free).or_else(|| {
            let page = refill(class, set)?;
            Some((page, word(page, class)))
        })
    })
}

/// Takes the thread's last cached block of `class`, if any. The cache is
/// read and changed with the thread's guard up, so that an allocation by a
/// signal handler in between is not sampled (tracer::decide) and a free by
/// one goes to the shared stacks (`give`): the cache is this thread's
/// alone, and plain loads and stores keep it so.
fn cached(t: &Tls, class: usize) -> Option<usize> {
    let (cells, count) = t.pool_cache(class);
    let n = count.get() as usize;
    if n == 0 || t.guard.get() {
        return None;
    }
    t.guard.set(true);
    let page = cells[n - 1].replace(0);
    count.set(n as u8 - 1);
    t.guard.set(false);
    (page != 0).then_some(page)
}

/// Gives back a block from [`place`], by its chunk word, whose program block
/// was freed (its key cleared): into the thread's cache of its class, or,
/// when that is full, onto the thread's set.
///
/// # Safety
/// `word` came from [`place`] and nothing refers to its block any more.
pub unsafe fn give(word: usize) {
    let page = word & PAGE_BITS;
    let class = class_in(word);
    TLS.with(|t| {
        // Not inside tracer code (a signal handler's free), and not on a
        // thread whose exit would not give its cache back.
        if !t.guard.get() && t.exit_hooked() {
            let (cells, count) = t.pool_cache(class);
            t.guard.set(true);
            let n = count.get() as usize;
            let kept = n < cells.len();
            if kept {
                cells[n].set(page);
                count.set(n as u8 + 1);
            }
            t.guard.set(false);
            if kept {
                return;
            }
        }
        let head = &HEADS[t.pool_home() % SETS][class].0;
        // SAFETY: as the contract.
        unsafe { push_chain(head, page, page) };
    })
}

/// Gives the thread's cached blocks to its set (at thread exit).
pub fn release_cache(t: &Tls) {
    let heads = &HEADS[t.pool_home() % SETS];
    for (class, head) in heads.iter().enumerate() {
        let (cells, count) = t.pool_cache(class);
        for cell in &cells[..count.get() as usize] {
            let page = cell.replace(0);
            if page != 0 {
                // SAFETY: a free block of this class, cached until now.
                unsafe { push_chain(&head.0, page, page) };
            }
        }
        count.set(0);
    }
}

/// The thread's cached blocks of `class`, oldest first (tests).
#[cfg(test)]
fn cached_blocks(t: &Tls, class: usize) -> Vec<usize> {
    let (cells, count) = t.pool_cache(class);
    cells[..count.get() as usize]
        .iter()
        .map(Cell::get)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_size_up_to_max() {
        assert_eq!(class_of(0), 0);
        assert_eq!(class_of(PAGE - TAG), 0);
        assert_eq!(class_of(PAGE - TAG + 1), 1);
        assert_eq!(class_of(2 * PAGE - TAG), 1);
        assert_eq!(class_of(2 * PAGE - TAG + 1), 2);
        assert_eq!(class_of(4 * PAGE - TAG), 2);
        assert_eq!(class_of(4 * PAGE - TAG + 1), 3);
        assert_eq!(class_of(ALIGN), CLASSES - 1, "an aligned block's front");
        assert_eq!(class_of(MAX), CLASSES - 1);
        for size in [1, 100, PAGE - TAG, PAGE, 3 * PAGE + 5, ALIGN, MAX] {
            let c = class_of(size);
            let w = word(0x7000_0000_0000, c);
            let room = end(w) - (0x7000_0000_0000 + TAG);
            assert!(room >= size, "size {size}");
            assert!(room < 2 * (size + TAG) + PAGE, "size {size}");
            assert_eq!(w & MARK, MARK);
            let sized = with_size(w, size);
            assert_eq!(usable(sized), size.div_ceil(16) * 16, "size {size}");
            assert_eq!(end(sized), end(w), "the size leaves the block as it was");
            assert_eq!(class_in(sized), c);
            assert_eq!(
                usable(with_size(sized, 1)),
                16,
                "a new size replaces the old"
            );
        }
    }

    #[test]
    fn blocks_are_reused_and_distinct_while_held() {
        // A free block a class larger is used before more is mapped (class
        // 3, 5-8 pages, is used nowhere else in the tests; class 4 only
        // here, before any class-5 block is free to stand in for it).
        let (big, w) = take(16 * PAGE - TAG).unwrap();
        assert_eq!(end(w) - big, 16 * PAGE, "a class-4 block is 16 pages");
        // SAFETY: our block, no longer used.
        unsafe { give(w) };
        let size = 6 * PAGE;
        assert_eq!(class_of(size), 3);
        let (p, w) = take(size).unwrap();
        assert_eq!(p, big, "the class-4 block serves a class-3 request");
        assert_eq!(
            end(w),
            big + 16 * PAGE,
            "its chunk word keeps its own class"
        );
        // SAFETY: as above.
        unsafe { give(w) };
        for size in [64, PAGE - TAG, 5000, 3 * PAGE, MAX] {
            let n = 3 * REFILL_BYTES / ALIGN;
            let held: Vec<(usize, usize)> = (0..n).map(|_| take(size).unwrap()).collect();
            let mut sorted: Vec<usize> = held.iter().map(|h| h.0).collect();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), held.len(), "a block handed out twice");
            let span = span(class_of(size));
            assert!(
                sorted.windows(2).all(|w| w[1] - w[0] >= span),
                "blocks of {size} bytes overlap"
            );
            for &(p, w) in &held {
                assert_eq!(p % ALIGN, 0, "blocks start on the tag's boundary");
                assert!(crate::sampled::is_candidate(p + TAG));
                assert_eq!(w & PAGE_BITS, p);
                assert!(end(w) - (p + TAG) >= size);
                // The whole block is ours to write.
                // SAFETY: a block just taken, up to `end` from p + TAG.
                unsafe { core::ptr::write_bytes((p + TAG) as *mut u8, 0xa5, end(w) - (p + TAG)) };
            }
            for &(_, w) in &held {
                // SAFETY: our blocks, no longer used.
                unsafe { give(w) };
            }
            let again: Vec<usize> = (0..held.len()).map(|_| take(size).unwrap().0).collect();
            let mut a = again.clone();
            a.sort_unstable();
            assert_eq!(
                a, sorted,
                "freed blocks come back before new ones are mapped"
            );
            for &p in &again {
                // SAFETY: as above.
                unsafe { give(word(p, class_of(size))) };
            }
        }
        // (One test: the pool is global, and tests run in parallel.)
        a_thread_takes_back_the_block_it_freed_last_without_the_shared_stack();
        threads_never_share_a_block();
    }

    fn a_thread_takes_back_the_block_it_freed_last_without_the_shared_stack() {
        std::thread::spawn(|| {
            TLS.with(|t| {
                // (Run from the one test that takes blocks.)
                let size = 3 * PAGE;
                let c = class_of(size);
                assert_eq!(c, 2);
                let n = CACHE_DEPTH + 2;
                let held: Vec<(usize, usize)> = (0..n).map(|_| take(size).unwrap()).collect();
                // Without the exit hook the cache is not used.
                // SAFETY: our block, no longer used.
                unsafe { give(held[0].1) };
                assert!(cached_blocks(t, c).is_empty());
                let (a2, w0) = take(size).unwrap();
                assert_eq!(a2, held[0].0, "from the shared stack");
                t.fake_exit_hook(true);
                let mut held = held;
                held[0].1 = w0;
                for &(_, w) in &held {
                    // SAFETY: as above.
                    unsafe { give(w) };
                }
                let pages: Vec<usize> = held.iter().map(|b| b.0).collect();
                assert_eq!(
                    cached_blocks(t, c),
                    pages[..CACHE_DEPTH],
                    "the first CACHE_DEPTH frees are cached, the rest shared"
                );
                // The last cached first, then the shared stack's top: the
                // last block freed.
                for want in (0..CACHE_DEPTH).rev() {
                    let (p, w) = take(size).unwrap();
                    assert_eq!((p, w & PAGE_BITS), (pages[want], pages[want]));
                }
                assert!(cached_blocks(t, c).is_empty());
                assert_eq!(take(size).unwrap().0, pages[n - 1], "the overflow, shared");
                assert_eq!(take(size).unwrap().0, pages[n - 2]);
                // A free inside tracer code (a signal handler's) bypasses
                // the cache, and so does a take.
                t.guard.set(true);
                // SAFETY: as above.
                unsafe { give(word(pages[0], c)) };
                assert!(cached_blocks(t, c).is_empty());
                t.guard.set(false);
                for &p in &pages[1..] {
                    // SAFETY: as above.
                    unsafe { give(word(p, c)) };
                }
                assert_eq!(cached_blocks(t, c).len(), CACHE_DEPTH);
                release_cache(t);
                assert!(cached_blocks(t, c).is_empty());
                let mut back: Vec<usize> = (0..n).map(|_| take(size).unwrap().0).collect();
                back.sort_unstable();
                let mut want = pages.clone();
                want.sort_unstable();
                assert_eq!(back, want, "all on the shared stack at exit");
                t.fake_exit_hook(false);
                for p in back {
                    // SAFETY: as above.
                    unsafe { give(word(p, c)) };
                }
            })
        })
        .join()
        .unwrap();
    }

    fn threads_never_share_a_block() {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for round in 0..2000usize {
                        let size = if round % 2 == 0 { 100 } else { 2 * PAGE + t };
                        let (p, w) = take(size).unwrap();
                        // The block's words are ours alone while held.
                        // SAFETY: a block just taken.
                        unsafe { *((p + TAG) as *mut usize) = round };
                        mine.push((p, w));
                        if round % 3 == 0 {
                            let q = mine.swap_remove(round % mine.len());
                            // SAFETY: our block, held by no one else.
                            unsafe { give(q.1) };
                        }
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<(usize, usize)> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup_by_key(|b| b.0);
        assert_eq!(all.len(), n, "two threads held the same block");
        for (_, w) in all {
            // SAFETY: as above.
            unsafe { give(w) };
        }
    }
}
