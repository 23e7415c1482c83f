//! Stack capture and interning.
//!
//! A recorded allocation captures its caller's return addresses and turns
//! them into a small id: identical stacks share one id, and the writer puts
//! each stack into the file once. The table is lock-free and lives in
//! anonymous mappings reserved up front, so interning never allocates:
//!
//! - `slots`: open addressing on the stack's 64-bit hash. A slot holds
//!   (hash, id); an inserter claims an empty slot by CAS on `hash`, copies the
//!   frames into the arena, then publishes `id` with release. A reader that
//!   meets a claimed slot whose id is not yet published moves on, so at worst
//!   a stack gets two ids (harmless: the analyzer groups by content).
//! - `arena`: frames, bump-allocated, each stack as `[len, frame0, ...]`.
//! - `index`: id -> arena offset + 1, published with release after the frames
//!   are written; the writer emits ids in order and waits for a zero entry.
//!
//! When any part is full, the event keeps stack id 0 ("unknown") and the
//! drop is counted.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::*};

use crate::config::MAX_DEPTH;
use crate::sys;

const SLOT_BITS: u32 = 21;
const SLOTS: usize = 1 << SLOT_BITS;
const MAX_PROBES: usize = 256;
/// Ids are `u32` in events; this many fit the index mapping.
pub const MAX_IDS: usize = 1 << 22;
/// Arena size in u64 words (1 GiB of address space, touched as used).
const ARENA_WORDS: usize = 1 << 27;

#[repr(C)]
struct Slot {
    hash: AtomicU64,
    id: AtomicU32,
    _pad: u32,
}

struct Table {
    slots: *mut Slot,
    arena: *mut AtomicU64,
    index: *mut AtomicU64,
}

static TABLE_SLOTS: AtomicUsize = AtomicUsize::new(0);
static TABLE_ARENA: AtomicUsize = AtomicUsize::new(0);
static TABLE_INDEX: AtomicUsize = AtomicUsize::new(0);
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);
/// The last id handed out; ids start at 1.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Reserves the table's mappings (once). False when the system refuses
/// memory.
pub fn init() -> bool {
    // Called from the constructor (and by unit tests, concurrently).
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(map_tables);
    TABLE_SLOTS.load(Acquire) != 0
}

fn map_tables() {
    let slots = sys::map_anon(SLOTS * core::mem::size_of::<Slot>());
    let arena = sys::map_anon(ARENA_WORDS * 8);
    let index = sys::map_anon(MAX_IDS * 8);
    if slots.is_null() || arena.is_null() || index.is_null() {
        return;
    }
    TABLE_ARENA.store(arena as usize, Release);
    TABLE_INDEX.store(index as usize, Release);
    TABLE_SLOTS.store(slots as usize, Release);
}

fn table() -> Option<Table> {
    let slots = TABLE_SLOTS.load(Acquire);
    if slots == 0 {
        return None;
    }
    Some(Table {
        slots: slots as *mut Slot,
        arena: TABLE_ARENA.load(Acquire) as *mut AtomicU64,
        index: TABLE_INDEX.load(Acquire) as *mut AtomicU64,
    })
}

#[inline]
fn hash(frames: &[u64]) -> u64 {
    // FxHash-style mixing; the final avalanche spreads low-entropy addresses.
    let mut h: u64 = frames.len() as u64;
    for &f in frames {
        h = (h.rotate_left(5) ^ f).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h | 1
}

/// The outcome of interning.
pub enum Interned {
    Id(u32),
    /// The table is full; the stack is lost (id 0).
    Full,
}

/// Interns `frames` (non-empty, at most MAX_DEPTH).
pub fn intern(frames: &[u64]) -> Interned {
    let Some(t) = table() else {
        return Interned::Full;
    };
    let h = hash(frames);
    let mut i = (h as usize) & (SLOTS - 1);
    for _ in 0..MAX_PROBES {
        // SAFETY: `i` is masked into the slot mapping.
        let slot = unsafe { &*t.slots.add(i) };
        let sh = slot.hash.load(Acquire);
        if sh == 0 {
            if slot.hash.compare_exchange(0, h, AcqRel, Acquire).is_ok() {
                return match store(&t, frames) {
                    Some(id) => {
                        slot.id.store(id, Release);
                        Interned::Id(id)
                    }
                    None => Interned::Full,
                };
            }
            // Lost the race for this slot; look at what won it.
            if slot.hash.load(Acquire) == h {
                if let Some(id) = matches(&t, slot, frames) {
                    return Interned::Id(id);
                }
            }
        } else if sh == h {
            if let Some(id) = matches(&t, slot, frames) {
                return Interned::Id(id);
            }
        }
        i = (i + 1) & (SLOTS - 1);
    }
    Interned::Full
}

fn matches(t: &Table, slot: &Slot, frames: &[u64]) -> Option<u32> {
    let id = slot.id.load(Acquire);
    if id == 0 {
        return None;
    }
    let stored = get_in(t, id)?;
    let mut k = 0;
    for f in stored {
        if k >= frames.len() || f != frames[k] {
            return None;
        }
        k += 1;
    }
    (k == frames.len()).then_some(id)
}

/// Copies the frames into the arena and publishes a new id.
fn store(t: &Table, frames: &[u64]) -> Option<u32> {
    let words = frames.len() + 1;
    let off = ARENA_USED.fetch_add(words, Relaxed);
    if off + words > ARENA_WORDS {
        return None;
    }
    let id = NEXT_ID.fetch_add(1, Relaxed) + 1;
    if id as usize >= MAX_IDS {
        return None;
    }
    // SAFETY: [off, off + words) was reserved for us by the fetch_add and is
    // inside the arena mapping; `id` is inside the index mapping.
    unsafe {
        (*t.arena.add(off)).store(frames.len() as u64, Relaxed);
        for (k, &f) in frames.iter().enumerate() {
            (*t.arena.add(off + 1 + k)).store(f, Relaxed);
        }
        (*t.index.add(id as usize)).store(off as u64 + 1, Release);
    }
    Some(id)
}

/// An iterator over a stored stack's frames.
pub struct Frames {
    arena: *mut AtomicU64,
    at: usize,
    end: usize,
}

impl Iterator for Frames {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.at >= self.end {
            return None;
        }
        // SAFETY: [at, end) lies inside a published arena entry.
        let v = unsafe { (*self.arena.add(self.at)).load(Relaxed) };
        self.at += 1;
        Some(v)
    }
}

fn get_in(t: &Table, id: u32) -> Option<Frames> {
    if id == 0 || id as usize >= MAX_IDS {
        return None;
    }
    // SAFETY: `id` is inside the index mapping.
    let off = unsafe { (*t.index.add(id as usize)).load(Acquire) };
    if off == 0 {
        return None;
    }
    let off = off as usize - 1;
    // SAFETY: a published index entry points at a whole arena entry.
    let len = unsafe { (*t.arena.add(off)).load(Relaxed) } as usize;
    Some(Frames {
        arena: t.arena,
        at: off + 1,
        end: off + 1 + len.min(MAX_DEPTH),
    })
}

/// The frames of a published id; `None` while its inserter is still copying.
pub fn get(id: u32) -> Option<Frames> {
    get_in(&table()?, id)
}

/// The highest id handed out so far.
pub fn last_id() -> u32 {
    NEXT_ID.load(Acquire).min(MAX_IDS as u32 - 1)
}

// ---------------------------------------------------------------------------
// Capture

extern "C" {
    fn _Unwind_Backtrace(
        trace: extern "C" fn(ctx: *mut c_void, arg: *mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_int;
    fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
}

/// Our own code's address range: frames in it are the tracer's, not the
/// program's, and are cut from the top of every stack.
static SELF_LO: AtomicUsize = AtomicUsize::new(0);
static SELF_HI: AtomicUsize = AtomicUsize::new(0);

pub fn set_self_range(lo: usize, hi: usize) {
    SELF_LO.store(lo, Relaxed);
    SELF_HI.store(hi, Relaxed);
}

/// This library's mapped range.
pub fn self_range() -> (u64, u64) {
    (SELF_LO.load(Relaxed) as u64, SELF_HI.load(Relaxed) as u64)
}

#[inline]
fn is_self(ip: u64) -> bool {
    let ip = ip as usize;
    ip >= SELF_LO.load(Relaxed) && ip < SELF_HI.load(Relaxed)
}

struct Collect<'a> {
    out: &'a mut [u64],
    n: usize,
    skipping: bool,
}

extern "C" fn collect(ctx: *mut c_void, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Collect` passed to `_Unwind_Backtrace` below,
    // alive for the whole walk.
    let c = unsafe { &mut *(arg as *mut Collect) };
    // SAFETY: `ctx` is the unwinder's context for this frame.
    let ip = unsafe { _Unwind_GetIP(ctx) } as u64;
    if ip == 0 {
        return 5; // _URC_END_OF_STACK
    }
    if c.skipping && is_self(ip) {
        return 0;
    }
    c.skipping = false;
    if c.n >= c.out.len() {
        return 5;
    }
    c.out[c.n] = ip;
    c.n += 1;
    0 // _URC_NO_REASON: go on
}

/// Fills `out` with the calling program's return addresses, innermost first,
/// the tracer's own frames removed. Returns the count.
#[inline(never)]
pub fn capture_dwarf(out: &mut [u64]) -> usize {
    let mut c = Collect {
        out,
        n: 0,
        skipping: true,
    };
    // SAFETY: `collect` only writes into `c`, which outlives the call.
    unsafe { _Unwind_Backtrace(collect, &mut c as *mut Collect as *mut c_void) };
    c.n
}

/// Frame-pointer walk for code built with frame pointers (and JIT code run
/// with -XX:+PreserveFramePointer). Every load is checked against the
/// thread's stack bounds, so a frame without a frame pointer ends the walk
/// instead of faulting.
#[inline(never)]
pub fn capture_fp(out: &mut [u64], stack_lo: usize, stack_hi: usize) -> usize {
    let mut fp: usize;
    // SAFETY: reading rbp has no side effects; this function is compiled with
    // frame pointers (the crate forces them), so rbp is our frame.
    unsafe {
        core::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags))
    };
    let mut n = 0;
    let mut skipping = true;
    while n < out.len() {
        if fp < stack_lo || fp + 16 > stack_hi || !fp.is_multiple_of(8) {
            break;
        }
        // SAFETY: [fp, fp + 16) is inside the current thread's stack.
        let (next, ip) = unsafe { (*(fp as *const usize), *((fp + 8) as *const usize)) };
        if ip == 0 {
            break;
        }
        if !(skipping && is_self(ip as u64)) {
            skipping = false;
            out[n] = ip as u64;
            n += 1;
        }
        if next <= fp {
            break;
        }
        fp = next;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_stacks_share_an_id_and_different_ones_do_not() {
        assert!(init());
        let a = [0x1000u64, 0x2000, 0x3000];
        let b = [0x1000u64, 0x2000, 0x3001];
        let Interned::Id(ia) = intern(&a) else {
            panic!("full")
        };
        let Interned::Id(ib) = intern(&b) else {
            panic!("full")
        };
        let Interned::Id(ia2) = intern(&a) else {
            panic!("full")
        };
        assert_eq!(ia, ia2);
        assert_ne!(ia, ib);
        assert_eq!(get(ia).unwrap().collect::<Vec<_>>(), a);
        assert_eq!(get(ib).unwrap().collect::<Vec<_>>(), b);
    }

    #[test]
    fn concurrent_interning_agrees_on_content() {
        assert!(init());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..2000u64)
                        .map(|i| {
                            let f = [0x7000 + i, 0x9000 + i * 3, 0x42];
                            match intern(&f) {
                                Interned::Id(id) => (i, id),
                                Interned::Full => panic!("full"),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for t in threads {
            for (i, id) in t.join().unwrap() {
                let f: Vec<u64> = get(id).unwrap().collect();
                assert_eq!(f, vec![0x7000 + i, 0x9000 + i * 3, 0x42]);
            }
        }
    }
}
