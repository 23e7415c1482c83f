//! The tracer's logic behind the hooks: per-thread state, the sampling
//! decision, and turning an allocation or free into an event.
//!
//! Hot path (in `api.rs`): subtract the size from the thread's byte
//! countdown and branch. Everything here is the slow path, entered when the
//! countdown runs out, for a free of a tagged address in sampled mode, or always in
//! exact mode.
//!
//! Sampling follows jemalloc (`src/prof.c`, `prof_sample_new_event_wait`):
//! the bytes a thread allocates form a Poisson process with mean distance
//! `rate` between sample points; a block that contains a sample point is
//! recorded. The countdown holds the bytes to the next point, drawn from the
//! exponential distribution. A block of `size` bytes is then recorded with
//! probability `p = 1 - exp(-size / rate)`, independently of every other
//! block, and the analyzer's estimate `size / p` per recorded block is
//! unbiased (Horvitz–Thompson). Blocks of at least `rate` bytes are recorded
//! always, with weight 1, and do not move the countdown, so small blocks
//! still form the same Poisson process.
//!
//! Invariant: nothing here allocates, blocks, or panics. A hook that runs
//! while this thread is already inside the tracer (a signal handler that
//! allocates, an unwinder that allocates) is forwarded untraced and counted.

use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};

use mtrace_format::DropReason;

use crate::config::{Unwind, MAX_DEPTH};
use crate::ring::{self, Event, Ring};
use crate::{sampled, stacks, sys};

/// Tracing has not started (or is disabled): hooks only forward.
pub const OFF: u8 = 0;
pub const RUNNING: u8 = 1;
/// The final flush ran; later events cannot reach the file.
pub const FINISHED: u8 = 2;

/// The settings the hooks and a sample read, in one cache line. The free
/// hook reads `free_mask` on every call, so the line stays in the core's
/// first-level cache, and a sample, tens of microseconds after the last one,
/// finds the rest there too; as separate statics they were three more lines
/// to fetch per sample, among callgrind's 30 first-level misses a sample.
/// Written only when tracing starts and stops.
#[repr(C, align(64))]
pub struct Hot {
    /// `free(p)` takes the slow path when `p & free_mask == 0`: all ones
    /// before tracing runs (only NULL), `sampled::CANDIDATE_MASK` in sampled
    /// mode, zero in exact mode. First: the hooks' assembly reads it at the
    /// struct's address.
    pub free_mask: AtomicUsize,
    pub rate: AtomicU64,
    /// The sampled blocks' key (sampled.rs).
    pub key: AtomicU64,
    pub depth: AtomicUsize,
    /// OFF, RUNNING or FINISHED.
    pub state: AtomicU8,
    pub exact: AtomicBool,
    /// Whether aligned candidates are told by their key (sampled.rs).
    pub aligned_keyed: AtomicBool,
    pub fp_unwind: AtomicBool,
}

pub static HOT: Hot = Hot {
    free_mask: AtomicUsize::new(usize::MAX),
    rate: AtomicU64::new(1),
    key: AtomicU64::new(0),
    depth: AtomicUsize::new(64),
    state: AtomicU8::new(OFF),
    exact: AtomicBool::new(false),
    aligned_keyed: AtomicBool::new(false),
    fp_unwind: AtomicBool::new(false),
};
const _: () = assert!(core::mem::offset_of!(Hot, free_mask) == 0);
const _: () = assert!(core::mem::size_of::<Hot>() == 64);
static SEED: AtomicU64 = AtomicU64::new(0);
static SEEDED: AtomicBool = AtomicBool::new(false);
static THREAD_SEQ: AtomicU64 = AtomicU64::new(0);
/// MTRACE_RS_MMAP: record the program's anonymous mappings.
pub static MMAP_TRACKING: AtomicBool = AtomicBool::new(false);
static EXIT_KEY: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Drop counters, indexed by `DropReason::code()`.
pub static DROPS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

pub fn count_drop(r: DropReason) {
    DROPS[(r.code() as usize) & 7].fetch_add(1, Relaxed);
}

/// Per-thread state. Starts as a sentinel (all zero: countdown 0, not
/// initialized) that sends the first allocation to the slow path, which
/// initializes it. All-zero bytes must be a valid value of every field: the
/// state lives in zero-initialized static TLS (see `TlsKey`).
#[repr(C)]
pub struct Tls {
    pub countdown: Cell<i64>,
    /// Bytes to the next sample point beyond `countdown`; the countdown is
    /// capped at the rate so that any block of at least `rate` bytes reaches
    /// the slow path without a second test on the hot path.
    extra: Cell<i64>,
    rng: Cell<u64>,
    ring: Cell<*mut Ring>,
    /// True while this thread runs tracer code.
    pub guard: Cell<bool>,
    /// The writer thread: never traced.
    internal: Cell<bool>,
    ready: Cell<bool>,
    /// Which of the pool's sets of free blocks this thread takes from and
    /// gives to first (pool.rs).
    pool_home: Cell<u8>,
    /// Pool blocks of each class this thread freed, kept for its next takes
    /// of that class (pool.rs): a stack of `pool_cached[class]` entries.
    pool_cache: [[Cell<usize>; crate::pool::CACHE_DEPTH]; crate::pool::CLASSES],
    pool_cached: [Cell<u8>; crate::pool::CLASSES],
    /// Whether `thread_exit` will run when the thread ends (its ring was
    /// registered with the exit key), to give the cached blocks back.
    exit_hooked: Cell<bool>,
}

/// Bytes reserved for `Tls` in the TLS segment.
const TLS_BYTES: usize = 320;
const _: () =
    assert!(core::mem::size_of::<Tls>() <= TLS_BYTES && core::mem::align_of::<Tls>() <= 64);

// The per-thread state is a block of zeroed static TLS that we declare
// ourselves, so that the hooks reach it with the initial-exec model: one
// GOT load and one %fs-relative add, instead of std's `thread_local!` which
// in a shared library calls `__tls_get_addr` on every access. Initial-exec is
// right for a library loaded with LD_PRELOAD: glibc places it in the static
// TLS block of every thread (and refuses to dlopen it where that block has no
// room, rather than misbehave).
core::arch::global_asm!(
    ".section .tbss,\"awT\",@nobits",
    ".p2align 6",
    ".globl mtrace_rs_tls",
    ".hidden mtrace_rs_tls",
    ".type mtrace_rs_tls, @object",
    ".size mtrace_rs_tls, {bytes}",
    "mtrace_rs_tls:",
    ".zero {bytes}",
    ".text",
    bytes = const TLS_BYTES,
);

/// The handle to the calling thread's `Tls`, shaped like `LocalKey`.
pub struct TlsKey;
pub static TLS: TlsKey = TlsKey;

impl TlsKey {
    #[inline(always)]
    pub fn with<R>(&self, f: impl FnOnce(&Tls) -> R) -> R {
        let p: *const Tls;
        // SAFETY: the initial-exec TLS access sequence for `mtrace_rs_tls`:
        // the GOT slot holds its offset from the thread pointer, and %fs:0
        // holds the thread pointer itself.
        unsafe {
            core::arch::asm!(
                "mov {p}, qword ptr [rip + mtrace_rs_tls@GOTTPOFF]",
                "add {p}, qword ptr fs:[0]",
                p = out(reg) p,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        // SAFETY: the block is TLS_BYTES of this thread's zero-initialized
        // memory, alive as long as the thread, and all-zero is a valid Tls.
        // `Tls` is only mutated through `Cell`s, on this thread.
        f(unsafe { &*p })
    }
}

impl Tls {
    /// The calling thread's set in the pool (0 until the thread samples).
    #[inline]
    pub fn pool_home(&self) -> usize {
        self.pool_home.get() as usize
    }

    /// The thread's cached free pool blocks of `class` (pool.rs), and how
    /// many of them are in use.
    #[inline]
    pub fn pool_cache(&self, class: usize) -> (&[Cell<usize>], &Cell<u8>) {
        (&self.pool_cache[class], &self.pool_cached[class])
    }

    /// Whether the thread's exit will run `thread_exit`, which gives its
    /// cached pool blocks back.
    #[inline]
    pub fn exit_hooked(&self) -> bool {
        self.exit_hooked.get()
    }

    /// Makes `exit_hooked` say `hooked` on a test thread, which has no ring.
    #[cfg(test)]
    pub fn fake_exit_hook(&self, hooked: bool) {
        self.exit_hooked.set(hooked);
    }
}

/// Settings copied out of the config when tracing starts.
pub fn configure(rate: u64, depth: usize, seed: Option<u64>, unwind: Unwind) {
    HOT.rate.store(rate.max(1), Relaxed);
    HOT.exact.store(rate <= 1, Relaxed);
    ring::set_capacity(if rate <= 1 {
        ring::CAP
    } else {
        ring::SAMPLED_CAP
    });
    HOT.depth.store(depth.clamp(1, MAX_DEPTH), Relaxed);
    if let Some(s) = seed {
        SEED.store(s, Relaxed);
        SEEDED.store(true, Relaxed);
    }
    HOT.fp_unwind
        .store(unwind == Unwind::FramePointers, Relaxed);
}

pub fn start() {
    HOT.free_mask.store(
        if HOT.exact.load(Relaxed) {
            0
        } else {
            sampled::CANDIDATE_MASK
        },
        Release,
    );
    HOT.state.store(RUNNING, Release);
}

pub fn exact() -> bool {
    HOT.exact.load(Relaxed)
}

pub fn rate() -> u64 {
    HOT.rate.load(Relaxed)
}

pub fn running() -> bool {
    HOT.state.load(Acquire) == RUNNING
}

/// Marks the calling thread as the tracer's own (the writer).
pub fn mark_internal() {
    TLS.with(|t| {
        t.internal.set(true);
        t.guard.set(true);
        t.countdown.set(i64::MAX / 4);
    });
}

/// Registers the thread-exit destructor key.
pub fn init_exit_key() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `thread_exit` matches the destructor signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } == 0 {
        EXIT_KEY.store(key as usize, Relaxed);
    }
}

/// Runs when a traced thread exits: hands its ring back to the writer, which
/// drains what the thread left and recycles the ring. If the thread allocates
/// again in a later destructor, it takes a ring again (glibc runs
/// destructors up to four rounds).
unsafe extern "C" fn thread_exit(arg: *mut libc::c_void) {
    TLS.with(|t| {
        crate::pool::release_cache(t);
        t.exit_hooked.set(false);
        if t.ring.get() == arg as *mut Ring {
            t.ring.set(core::ptr::null_mut());
        }
    });
    if !arg.is_null() {
        // SAFETY: the value is a ring from `ring::acquire`; rings are never
        // unmapped.
        ring::release(unsafe { &*(arg as *const Ring) });
    }
}

/// The calling thread's ring, after a fork (for `ring::reset_after_fork`).
pub fn current_ring() -> *mut Ring {
    TLS.with(|t| t.ring.get())
}

fn next_rand(t: &Tls) -> u64 {
    // xorshift64*: fast, and good enough to drive an exponential draw.
    let mut x = t.rng.get();
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t.rng.set(x);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Bytes to the next sample point: exponential with mean `rate`.
fn draw(t: &Tls) -> i64 {
    // Both conversions go through i64 (exact here: the rate is capped below
    // 2^63, the numerator is below 2^53), which x86-64 converts in one
    // instruction; from u64 it takes a sequence with two constants, on one
    // more line of read-only data to miss on each sample.
    let rate = HOT.rate.load(Relaxed).min(i64::MAX as u64) as i64 as f64;
    // u in (0, 1]: never ln(0).
    let u = (((next_rand(t) >> 11) + 1) as i64) as f64 * (1.0 / (1u64 << 53) as f64);
    let d = -ln_unit(u) * rate;
    (d as i64).max(1)
}

/// `ln(u)` for `u` in `[2^-53, 1]`, to a few units in the last place,
/// without libm: its `log` reads a table of 2 KiB, a cache miss or two on
/// each of sampled mode's draws, which run far apart with the program's own
/// data in between. `u = m 2^e` with `m` in `[1/√2, √2)`, and
/// `ln m = 2 atanh s` with `s = (m - 1)/(m + 1)`, `|s| < 0.172`, whose series
/// to `s^17` leaves an error below `2 s^19 / 19 < 4e-16` of the result.
fn ln_unit(u: f64) -> f64 {
    const LN2: f64 = core::f64::consts::LN_2;
    const SQRT2: f64 = core::f64::consts::SQRT_2;
    let bits = u.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if m >= SQRT2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let series = 1.0
        + z * (1.0 / 3.0
            + z * (1.0 / 5.0
                + z * (1.0 / 7.0
                    + z * (1.0 / 9.0
                        + z * (1.0 / 11.0
                            + z * (1.0 / 13.0 + z * (1.0 / 15.0 + z * (1.0 / 17.0))))))));
    e as f64 * LN2 + 2.0 * s * series
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cold]
fn init_thread(t: &Tls) {
    let seq = THREAD_SEQ.fetch_add(1, Relaxed);
    let seed = if SEEDED.load(Relaxed) {
        splitmix(SEED.load(Relaxed) ^ splitmix(seq))
    } else {
        splitmix(sys::now_ns() ^ ((sys::gettid() as u64) << 32) ^ (t as *const Tls as u64))
    };
    t.rng.set(seed | 1);
    t.pool_home.set((seq % crate::pool::SETS as u64) as u8);
    set_remaining(t, draw(t));
    t.ready.set(true);
}

/// Splits the bytes left to the next sample point into the capped countdown
/// and the rest.
fn set_remaining(t: &Tls, total: i64) {
    let cap = HOT.rate.load(Relaxed).min(i64::MAX as u64 / 4) as i64;
    let c = total.min(cap);
    t.countdown.set(c);
    t.extra.set(total - c);
}

/// What to do with an allocation that reached the slow path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Decision {
    /// Forward untraced.
    Skip,
    /// Record as a Poisson sample (sampled mode, small block).
    Sample,
    /// Record with weight 1 (exact mode, or a block of at least `rate`).
    Exact,
}

/// Decides for an allocation of `size` bytes whose hot-path countdown check
/// failed (the countdown was not yet charged).
pub fn decide(t: &Tls, size: usize) -> Decision {
    if HOT.state.load(Acquire) != RUNNING {
        // Before the constructor has run, check again on every allocation
        // (only start-up code runs then, and exact mode must not miss the
        // first allocations after it); once tracing is disabled or finished,
        // never again.
        t.countdown.set(if HOT.state.load(Relaxed) == OFF {
            0
        } else {
            i64::MAX / 4
        });
        return Decision::Skip;
    }
    if t.guard.get() {
        if !t.internal.get() {
            count_drop(DropReason::Reentrant);
        }
        return Decision::Skip;
    }
    if HOT.exact.load(Relaxed) {
        return Decision::Exact;
    }
    if !t.ready.get() {
        init_thread(t);
        // The fresh countdown may cover this block: charge it normally.
        let c = t.countdown.get().wrapping_sub(size as i64);
        if c > 0 && (size as u64) < HOT.rate.load(Relaxed) {
            t.countdown.set(c);
            return Decision::Skip;
        }
    }
    if size as u64 >= HOT.rate.load(Relaxed) {
        return Decision::Exact;
    }
    let mut total = t.countdown.get() + t.extra.get() - size as i64;
    if total > 0 {
        set_remaining(t, total);
        return Decision::Skip;
    }
    // A sample point falls inside this block. The process is memoryless: the
    // next point lies an exponential draw beyond this one; add draws until it
    // lies beyond the block's end (the block is recorded once however many
    // points it holds).
    // (Bounded: the countdown never holds less than minus one block.)
    total = total.max(-(HOT.rate.load(Relaxed) as i64));
    while total <= 0 {
        total += draw(t);
    }
    set_remaining(t, total);
    Decision::Sample
}

/// Records an allocation the caller just made. `ptr` is non-null. False
/// only when a sampled block could not be marked as one (an aligned block
/// under another allocator, with the aligned set full): the caller must then
/// not hand it out.
pub fn record_alloc(t: &Tls, ptr: *mut libc::c_void, size: usize, d: Decision) -> bool {
    let errno = sys::errno();
    t.guard.set(true);
    if d == Decision::Sample || (d == Decision::Exact && !HOT.exact.load(Relaxed)) {
        // Sampled mode: mark the block so that its free is recognized.
        // SAFETY: the block was just allocated for sampling (api.rs).
        if !unsafe { sampled::mark(ptr as u64) } {
            count_drop(DropReason::SampleTableFull);
            t.guard.set(false);
            sys::set_errno(errno);
            return false;
        }
    }
    let stack = capture_stack();
    let kind = if d == Decision::Sample {
        ring::KIND_SAMPLE
    } else {
        ring::KIND_ALLOC
    };
    push(
        t,
        Event {
            ts: sys::now_ns(),
            addr: ptr as u64,
            size: size as u64,
            stack,
            kind,
        },
    );
    t.guard.set(false);
    sys::set_errno(errno);
    true
}

/// What a free of `ptr` means for the tracer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FreeKind {
    /// Not recorded: give `ptr` to the real free as it is.
    Plain,
    /// Record it (exact mode): `ptr` is the allocator's own address.
    Recorded,
    /// A sampled block, now no longer marked as one: give back its chunk,
    /// `sampled::chunk_of(ptr)` (to the real allocator, or to the pool for
    /// a pool page), and record the free if `record`.
    Sampled { record: bool },
}

/// Classifies a free of `ptr`; in sampled mode a sampled block is unmarked
/// (its key cleared). Call before the real free.
pub fn free_kind(t: &Tls, ptr: *mut libc::c_void) -> FreeKind {
    if ptr.is_null() {
        return FreeKind::Plain;
    }
    if HOT.exact.load(Relaxed) {
        return if free_is_recorded(t, ptr) {
            FreeKind::Recorded
        } else {
            FreeKind::Plain
        };
    }
    // SAFETY: a non-null pointer the program hands back to the allocator.
    if unsafe { sampled::take(ptr as u64) } {
        // However the tracer stands, the block must go back at its chunk
        // address; whether its free can be recorded is another matter.
        let record = HOT.state.load(Acquire) == RUNNING && !t.guard.get();
        if !record && !t.internal.get() {
            count_drop(DropReason::Reentrant);
        }
        return FreeKind::Sampled { record };
    }
    FreeKind::Plain
}

/// Whether a free of `ptr` must be recorded in exact mode.
fn free_is_recorded(t: &Tls, ptr: *mut libc::c_void) -> bool {
    if ptr.is_null() || HOT.state.load(Acquire) != RUNNING {
        return false;
    }
    if t.guard.get() {
        if !t.internal.get() && HOT.exact.load(Relaxed) {
            count_drop(DropReason::Reentrant);
        }
        return false;
    }
    true
}

/// Records an anonymous mapping or an unmapping (MTRACE_RS_MMAP=1). Our own
/// mappings (rings, tables) are made under the guard and not recorded.
pub fn record_map(kind: u32, addr: u64, len: u64, ts: u64) {
    if HOT.state.load(Acquire) != RUNNING {
        return;
    }
    TLS.with(|t| {
        if t.guard.get() {
            return;
        }
        let errno = sys::errno();
        t.guard.set(true);
        let stack = if kind == ring::KIND_MMAP {
            capture_stack()
        } else {
            0
        };
        push(
            t,
            Event {
                ts,
                addr,
                size: len,
                stack,
                kind,
            },
        );
        t.guard.set(false);
        sys::set_errno(errno);
    });
}

/// Records a free; `ts` was read before the real free ran.
pub fn record_free(t: &Tls, ptr: *mut libc::c_void, ts: u64) {
    let errno = sys::errno();
    t.guard.set(true);
    push(
        t,
        Event {
            ts,
            addr: ptr as u64,
            size: 0,
            stack: 0,
            kind: ring::KIND_FREE,
        },
    );
    t.guard.set(false);
    sys::set_errno(errno);
}

fn capture_stack() -> u32 {
    let depth = HOT.depth.load(Relaxed).min(MAX_DEPTH);
    if HOT.fp_unwind.load(Relaxed) {
        // The buffer is zeroed on every capture: size it to the depth asked
        // for (zeroing 2 KiB for 64 frames cost more than the rest of the
        // event).
        return if depth <= 64 {
            capture_fp_into::<64>(depth)
        } else {
            capture_fp_into::<MAX_DEPTH>(depth)
        };
    }
    crate::unwind::capture_interned(depth, intern)
}

#[inline(always)]
fn capture_fp_into<const N: usize>(depth: usize) -> u32 {
    let mut frames = [0u64; N];
    let depth = depth.min(N);
    let n = match crate::unwind::thread_stack() {
        Some((lo, hi)) => stacks::capture_fp(&mut frames[..depth], lo, hi),
        None => 0,
    };
    intern(&frames[..n])
}

fn intern(frames: &[u64]) -> u32 {
    if frames.is_empty() {
        return 0;
    }
    match stacks::intern(frames) {
        stacks::Interned::Id(id) => id,
        stacks::Interned::Full => {
            count_drop(DropReason::StackTableFull);
            0
        }
    }
}

/// How long a thread waits for room in its ring before it drops the event:
/// the writer drains every few milliseconds, so only a stalled writer makes
/// this run out. Sampled mode waits as exact mode does: a dropped free is a
/// block the report would call leaked, and a ring fills only when the
/// writer cannot keep up (a high sampling rate on a loaded machine: the
/// high-rate run of tests/sampled.rs dropped 2,106 events, frees among them,
/// when it shared two cores with the rest of the suite).
const FULL_RING_YIELDS: u32 = 200_000;

fn push(t: &Tls, ev: Event) {
    let mut r = t.ring.get();
    if r.is_null() {
        r = ring::acquire(sys::gettid());
        if r.is_null() {
            count_drop(DropReason::RingFull);
            return;
        }
        t.ring.set(r);
        let key = EXIT_KEY.load(Relaxed);
        if key != usize::MAX {
            // SAFETY: a key created by pthread_key_create; the value is our
            // ring, handed to `thread_exit` when the thread ends.
            let rc = unsafe {
                libc::pthread_setspecific(key as libc::pthread_key_t, r as *const libc::c_void)
            };
            t.exit_hooked.set(rc == 0);
        }
    }
    // SAFETY: the ring belongs to this thread.
    let ring = unsafe { &*r };
    // SAFETY: only this thread pushes into its ring.
    if unsafe { ring.push(ev) } {
        return;
    }
    ring::wake_writer();
    for _ in 0..FULL_RING_YIELDS {
        if HOT.state.load(Relaxed) != RUNNING {
            break;
        }
        sys::yield_now();
        // SAFETY: as above.
        if unsafe { ring.push(ev) } {
            return;
        }
    }
    count_drop(DropReason::RingFull);
}

/// Runs `f` as tracer code on the calling thread: its allocations pass
/// straight to the real allocator, untraced and uncounted.
pub fn with_internal<R>(f: impl FnOnce() -> R) -> R {
    let (guard, internal) = TLS.with(|t| {
        let saved = (t.guard.get(), t.internal.get());
        t.guard.set(true);
        t.internal.set(true);
        saved
    });
    let r = f();
    TLS.with(|t| {
        t.guard.set(guard);
        t.internal.set(internal);
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_unit_matches_libm_over_the_draws_range() {
        let check = |u: f64| {
            let (a, b) = (ln_unit(u), u.ln());
            let err = if b == 0.0 {
                a.abs()
            } else {
                ((a - b) / b).abs()
            };
            assert!(err < 1e-14, "ln({u:e}) = {a:e}, libm {b:e}");
        };
        check(1.0);
        check(1.0 - f64::EPSILON / 2.0);
        check(1.0 / (1u64 << 53) as f64);
        check(core::f64::consts::FRAC_1_SQRT_2);
        check(f64::from_bits(
            core::f64::consts::FRAC_1_SQRT_2.to_bits() - 1,
        ));
        check(0.5);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The draws' own values, then spread over the exponents (small
            // u are rare but drawn).
            check(((x >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64));
            check(f64::from_bits((x >> 12) | ((1023 - (x % 53)) << 52)).min(1.0));
        }
    }
}
