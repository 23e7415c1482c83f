//! Per-thread event rings and the pool that owns them.
//!
//! Each traced thread owns one single-producer single-consumer ring: the
//! thread's hooks push, the writer thread pops. This is Lamport's bounded
//! ring buffer ("Proving the correctness of multiprocess programs", 1977)
//! with the C11 acquire/release pairing used by crossbeam's and folly's SPSC
//! queues: the producer publishes a slot by storing `tail` with release, the
//! consumer frees slots by storing `head` with release. No atomic is shared
//! between two producing threads, so hooks on different threads never
//! contend.
//!
//! Rings live in anonymous mappings (never the heap: the heap is what we
//! trace) and are never unmapped. They are linked into one lock-free list
//! (a Treiber stack that only grows); a ring whose thread exited is drained
//! by the writer and then handed to the next new thread.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering::*};

use crate::sys;

/// One event as the hooks produce it; the writer encodes it compactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds: after the real allocation returned, or
    /// before the real free ran, so that for one address alloc < free < the
    /// next alloc holds across threads.
    pub ts: u64,
    pub addr: u64,
    pub size: u64,
    pub stack: u32,
    pub kind: u32,
}

pub const KIND_ALLOC: u32 = 1;
pub const KIND_SAMPLE: u32 = 2;
pub const KIND_FREE: u32 = 3;
/// An anonymous mapping (`size` is its length).
pub const KIND_MMAP: u32 = 4;
/// An unmapped range (`size` is its length).
pub const KIND_MUNMAP: u32 = 5;

/// Slots per ring as mapped: 32 Ki events, 1 MiB of address space, touched
/// only as far as the ring has ever filled. Exact mode uses them all.
pub const CAP: usize = 1 << 15;

/// Slots a ring uses in sampled mode: 8 Ki events, 256 KiB. A ring of 1 MiB
/// went round once every half second or so on the churn and did not fit the
/// core's second-level cache beside the program's data, so a push wrote a
/// line fetched from memory; at 256 KiB it stays there. Same-core pairs
/// (benches/pair.py --same-core) put the whole run's CPU time 0.3-0.45%
/// lower with 2, 4 or 8 Ki slots than with 32 Ki in variant builds, 0.15%
/// for the build that made it per mode. 8 Ki slots still hold more than
/// 100 ms of the churn's sampled events.
pub const SAMPLED_CAP: usize = 1 << 13;

/// The number of slots rings use, set once when tracing starts.
static CAPACITY: AtomicUsize = AtomicUsize::new(CAP);

/// Sets the slots rings made from now on use: a power of two, at most `CAP`.
/// Called before any ring is made (tracer::configure).
pub fn set_capacity(cap: usize) {
    debug_assert!(cap.is_power_of_two() && cap <= CAP);
    CAPACITY.store(cap.clamp(2, CAP), Relaxed);
}

/// The slots a ring uses.
pub fn capacity() -> usize {
    CAPACITY.load(Relaxed)
}

/// `Ring::state` values.
pub const FREE: u32 = 0;
pub const OWNED: u32 = 1;
/// The owning thread exited; the writer drains the ring, then frees it.
pub const RELEASED: u32 = 2;

#[repr(C, align(64))]
struct Padded<T>(T);

#[repr(C)]
struct Producer {
    /// Index of the next slot the producer fills. Written only by the owner.
    tail: AtomicUsize,
    /// The producer's last view of `head`, so that a push reads the shared
    /// `head` line only when the ring looks full. Only the owner touches it
    /// (and a fork child's handler, before any other code runs).
    head_cache: UnsafeCell<usize>,
    /// The slots in use less one (`capacity()` when the ring was made): on
    /// the line a push reads anyway.
    mask: AtomicUsize,
}

#[repr(C)]
pub struct Ring {
    /// Index of the next slot the consumer reads. Written only by the writer.
    head: Padded<AtomicUsize>,
    /// The producer's line: `tail` and its view of `head`, one line for a
    /// push to touch besides its slot.
    producer: Padded<Producer>,
    /// FREE, OWNED or RELEASED.
    pub state: AtomicU32,
    /// The thread that owns the ring (diagnostics).
    pub tid: AtomicU32,
    /// Next ring in the pool list; set once before the ring is published.
    next: *mut Ring,
    /// Cache-line aligned: two events a line, none across two lines.
    slots: Padded<[UnsafeCell<Event>; CAP]>,
}

// SAFETY: the ring is shared between exactly one producer (the owning thread)
// and one consumer (the writer); the SPSC protocol above orders every slot
// access, and the plain fields are written only before publication.
unsafe impl Sync for Ring {}

impl Ring {
    /// Pushes one event; false when the ring is full.
    ///
    /// # Safety
    /// Only the thread that owns the ring may push.
    #[inline]
    pub unsafe fn push(&self, ev: Event) -> bool {
        let tail = self.producer.0.tail.load(Relaxed);
        let mask = self.producer.0.mask.load(Relaxed);
        let cap = mask + 1;
        // SAFETY: `head_cache` is touched only by the producer.
        let cache = unsafe { &mut *self.producer.0.head_cache.get() };
        if tail.wrapping_sub(*cache) >= cap {
            *cache = self.head.0.load(Acquire);
            if tail.wrapping_sub(*cache) >= cap {
                return false;
            }
        }
        // SAFETY: slot `tail` is outside the consumer's window [head, tail)
        // and inside the ring (masked), so no one else reads or writes it.
        unsafe { *self.slots.0[tail & mask].get() = ev };
        self.producer.0.tail.store(tail.wrapping_add(1), Release);
        // The line of the push after next (a new one every other push):
        // asked for now, in the state a write needs, so that the write finds
        // it rather than waiting on memory (the slot was last used a ring's
        // length of events ago, and the writer read it since). Sampled
        // pushes run far apart, long enough for it to arrive.
        sys::prefetch_write(self.slots.0[tail.wrapping_add(2) & mask].get());
        // Half full by our last view of the consumer: make sure it is
        // awake, rather than letting the ring fill while it sleeps. (The
        // view is refreshed first so a stale one does not wake it for
        // nothing; a sleeping writer is woken by one producer only.)
        if tail.wrapping_sub(*cache) == cap / 2 {
            *cache = self.head.0.load(Acquire);
            if tail.wrapping_sub(*cache) >= cap / 2 {
                wake_writer();
            }
        }
        true
    }

    /// Pops everything available into `out`. Only the writer calls this.
    pub fn drain(&self, out: &mut Vec<Event>) -> usize {
        let head = self.head.0.load(Relaxed);
        let tail = self.producer.0.tail.load(Acquire);
        let mask = self.producer.0.mask.load(Relaxed);
        let n = tail.wrapping_sub(head);
        debug_assert!(n <= mask + 1, "ring overrun: head {head} tail {tail}");
        for i in 0..n {
            // SAFETY: slots in [head, tail) were published by the producer's
            // release store of `tail`, and the producer does not touch them
            // until we move `head` past them.
            out.push(unsafe { *self.slots.0[head.wrapping_add(i) & mask].get() });
        }
        self.head.0.store(tail, Release);
        n
    }

    /// Throws away queued events without reading them (in a fork child: they
    /// belong to the parent, whose writer records them).
    pub fn discard(&self) {
        let tail = self.producer.0.tail.load(Acquire);
        self.head.0.store(tail, Release);
        // SAFETY: called while no thread is pushing (the fork child handler
        // runs before any other code in the child).
        unsafe { *self.producer.0.head_cache.get() = tail };
    }
}

const _: () = assert!(core::mem::offset_of!(Ring, slots) % 64 == 0);
const _: () = assert!(64 % core::mem::size_of::<Event>() == 0);

static POOL: AtomicPtr<Ring> = AtomicPtr::new(core::ptr::null_mut());

/// The futex word the writer sleeps on between cycles.
static WAKE: AtomicU32 = AtomicU32::new(0);
/// True while the writer sleeps (so producers know a wake-up is needed).
static SLEEPING: AtomicBool = AtomicBool::new(false);

/// Wakes the writer if it sleeps: one system call, made by the first
/// producer that finds its ring half full, never by the others.
#[cold]
pub fn wake_writer() {
    if SLEEPING.swap(false, AcqRel) {
        WAKE.fetch_add(1, Release);
        // SAFETY: a futex wake on our own word.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                WAKE.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
    }
}

/// The writer's sleep between cycles: at most `ms`, less when a producer
/// wakes it.
pub fn writer_sleep(ms: u64) {
    let seen = WAKE.load(Acquire);
    SLEEPING.store(true, Release);
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as i64,
        tv_nsec: ((ms % 1000) * 1_000_000) as i64,
    };
    // SAFETY: a futex wait on our own word with a valid relative timeout; it
    // returns at once if a producer bumped the word since `seen`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            WAKE.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            seen,
            &ts as *const libc::timespec,
        );
    }
    SLEEPING.store(false, Release);
}

/// A ring for the calling thread: a free one from the pool, or a new mapping.
/// Null only when the system refuses memory.
pub fn acquire(tid: u32) -> *mut Ring {
    let mut r = POOL.load(Acquire);
    while !r.is_null() {
        // SAFETY: rings in the pool are never unmapped.
        let ring = unsafe { &*r };
        if ring
            .state
            .compare_exchange(FREE, OWNED, AcqRel, Relaxed)
            .is_ok()
        {
            ring.tid.store(tid, Relaxed);
            return r;
        }
        r = ring.next;
    }
    let p = sys::map_anon(core::mem::size_of::<Ring>()) as *mut Ring;
    if p.is_null() {
        return p;
    }
    // SAFETY: a fresh zeroed mapping is a valid empty ring (all-zero atomics,
    // zeroed events); we own it until it is published below.
    unsafe {
        (*p).producer.0.mask.store(capacity() - 1, Relaxed);
        (*p).state.store(OWNED, Relaxed);
        (*p).tid.store(tid, Relaxed);
        let mut head = POOL.load(Relaxed);
        loop {
            (*p).next = head;
            match POOL.compare_exchange_weak(head, p, Release, Relaxed) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
    }
    p
}

/// Marks the ring as no longer owned; the writer frees it once drained.
pub fn release(r: &Ring) {
    r.state.store(RELEASED, Release);
}

/// Calls `f` on every ring in the pool.
pub fn for_each(mut f: impl FnMut(&Ring)) {
    let mut r = POOL.load(Acquire);
    while !r.is_null() {
        // SAFETY: rings in the pool are never unmapped.
        let ring = unsafe { &*r };
        f(ring);
        r = ring.next;
    }
}

/// The writer's step for one ring: drain it and recycle it if its thread is
/// gone. Returns the number of events drained.
pub fn drain_and_recycle(ring: &Ring, out: &mut Vec<Event>) -> usize {
    let released = ring.state.load(Acquire) == RELEASED;
    let n = ring.drain(out);
    if released {
        // Everything the thread pushed before releasing is drained now.
        let _ = ring.state.compare_exchange(RELEASED, FREE, AcqRel, Relaxed);
    }
    n
}

/// In a fork child: only `keep` (the forking thread's ring) survives; every
/// other ring's thread does not exist in the child.
pub fn reset_after_fork(keep: *mut Ring) {
    for_each(|ring| {
        ring.discard();
        if !core::ptr::eq(ring, keep) {
            ring.state.store(FREE, Release);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_threads_push_while_one_drains_and_nothing_is_lost_or_reordered() {
        const THREADS: u32 = 6;
        const PER: u64 = 200_000;
        let producers: Vec<_> = (0..THREADS)
            .map(|t| {
                std::thread::spawn(move || {
                    let r = acquire(t);
                    for i in 0..PER {
                        let ev = Event {
                            ts: i,
                            addr: t as u64,
                            size: i,
                            stack: 0,
                            kind: KIND_ALLOC,
                        };
                        // SAFETY: this thread owns `r`.
                        while !unsafe { (*r).push(ev) } {
                            std::thread::yield_now();
                        }
                    }
                    // SAFETY: rings are never unmapped.
                    release(unsafe { &*r });
                })
            })
            .collect();
        let mut next = [0u64; THREADS as usize];
        let mut buf = Vec::new();
        let mut done = false;
        while !done {
            done = producers.iter().all(|p| p.is_finished());
            for_each(|ring| {
                buf.clear();
                drain_and_recycle(ring, &mut buf);
                for ev in &buf {
                    let t = ev.addr as usize;
                    assert_eq!(ev.ts, next[t], "thread {t} events out of order");
                    next[t] += 1;
                }
            });
        }
        for p in producers {
            p.join().unwrap();
        }
        for_each(|ring| {
            buf.clear();
            drain_and_recycle(ring, &mut buf);
            for ev in &buf {
                next[ev.addr as usize] += 1;
            }
        });
        assert!(next.iter().all(|&n| n == PER), "{next:?}");
    }
}
