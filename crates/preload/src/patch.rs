//! Points the allocation hooks' hot-path jumps straight at the real
//! functions, once they are known.
//!
//! Each hook's hot path ends in a conditional jump with a 32-bit
//! displacement (`ja` after the countdown, `jnz` after free's pointer test;
//! api.rs). As built, it lands on `jmp [pointer]`, an indirect jump through
//! the hook's `real.rs` pointer, a few bytes on: correct from the first call,
//! before the real functions are resolved. Once they are, the constructor
//! rewrites each displacement so that the conditional jump reaches the real
//! function itself: one taken direct branch on the hot path instead of a
//! not-taken one and an indirect jump. Same-core pairs of the 1-thread
//! churn (benches/pair.py --same-core) put free's test and branch alone at
//! about 0.3% of the run's CPU time, the malloc family's countdown at
//! about as much, most of it the branches.
//!
//! The rewrite is skipped, and the hooks keep their indirect jumps, which
//! behave the same, whenever it cannot be done safely: another thread is
//! running (it could be executing a displacement as it changes; the
//! constructor normally runs before the program has threads), the system
//! refuses to make our code writable (a W^X policy), a hook's bytes are not
//! the shape expected, or the real function lies beyond a 32-bit
//! displacement. The code pages become private copies, a few KiB.

use core::sync::atomic::{AtomicPtr, Ordering::*};

use crate::{api, real};

/// How far into a hook its hot-path jump may start.
const SCAN: usize = 48;

/// The address of the displacement of `hook`'s hot-path jump, when the jump
/// is where and what api.rs puts there: `0f 85` or `0f 87`, then a
/// displacement to `ff 25` (`jmp [rip + d]`) through `slot`.
///
/// # Safety
/// `hook` is the address of one of api.rs's hooks (readable code).
unsafe fn site(hook: usize, slot: &AtomicPtr<()>) -> Option<usize> {
    let slot = slot as *const AtomicPtr<()> as usize;
    for i in 0..SCAN {
        let at = hook + i;
        // SAFETY: within the hook's code and the trampoline just after it
        // (every hook is longer than `SCAN` bytes together with what follows
        // it in the text section).
        let (b0, b1) = unsafe { (*(at as *const u8), *((at + 1) as *const u8)) };
        if b0 != 0x0f || (b1 != 0x85 && b1 != 0x87) {
            continue;
        }
        // SAFETY: as above.
        let rel = unsafe { ((at + 2) as *const i32).read_unaligned() };
        let target = (at + 6).wrapping_add(rel as isize as usize);
        if target <= at || target > hook + SCAN {
            continue;
        }
        // SAFETY: `target` is inside the hook, checked just above.
        let (t0, t1) = unsafe { (*(target as *const u8), *((target + 1) as *const u8)) };
        if t0 != 0xff || t1 != 0x25 {
            continue;
        }
        // SAFETY: as above.
        let disp = unsafe { ((target + 2) as *const i32).read_unaligned() };
        if (target + 6).wrapping_add(disp as isize as usize) == slot {
            return Some(at + 2);
        }
    }
    None
}

/// The hooks and the pointers their trampolines jump through.
fn hooks() -> [(usize, &'static AtomicPtr<()>); 9] {
    [
        (api::malloc as *const () as usize, &real::MALLOC),
        (api::free as *const () as usize, &real::FREE),
        (api::calloc as *const () as usize, &real::CALLOC),
        (api::realloc as *const () as usize, &real::REALLOC),
        (
            api::posix_memalign as *const () as usize,
            &real::POSIX_MEMALIGN,
        ),
        (
            api::aligned_alloc as *const () as usize,
            &real::ALIGNED_ALLOC,
        ),
        (api::memalign as *const () as usize, &real::MEMALIGN),
        (api::valloc as *const () as usize, &real::VALLOC),
        (api::pvalloc as *const () as usize, &real::PVALLOC),
    ]
}

/// The displacement that makes the jump whose displacement is at `site`
/// reach `target`, if one fits.
fn displacement(site: usize, target: usize) -> Option<i32> {
    let d = (target as i64).wrapping_sub(site as i64 + 4);
    i32::try_from(d).ok()
}

/// Whether the process has one thread, by /proc/self/stat (field 20).
pub fn single_threaded() -> bool {
    let mut buf = [0u8; 1024];
    let Some(text) = crate::sys::read_small(c"/proc/self/stat", &mut buf) else {
        return false;
    };
    // The command name (field 2) may hold spaces and parentheses: the fields
    // after it start past the last ')'.
    let Some(close) = text.iter().rposition(|&b| b == b')') else {
        return false;
    };
    // Fields 3, 4, ...: num_threads is the 18th of them.
    text[close + 1..]
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .nth(17)
        == Some(b"1")
}

/// Rewrites every hook it can; returns how many now jump straight to their
/// real function. Call once, from the constructor, after `real::init`.
pub fn apply() -> usize {
    if !single_threaded() {
        return 0;
    }
    // Each hook's jump: the address of its displacement and the new one.
    let mut sites: Vec<(usize, [u8; 4])> = Vec::new();
    for (hook, slot) in hooks() {
        // SAFETY: `hook` is one of our hooks.
        let Some(at) = (unsafe { site(hook, slot) }) else {
            continue;
        };
        let target = slot.load(Acquire) as usize;
        if let Some(d) = displacement(at, target) {
            sites.push((at, d.to_le_bytes()));
        }
    }
    if sites.is_empty() {
        return 0;
    }
    let edits: Vec<(usize, &[u8])> = sites.iter().map(|(at, b)| (*at, &b[..])).collect();
    // SAFETY: one thread, checked above; our own code.
    if !unsafe { write_code(&edits) } {
        return 0;
    }
    sites.len()
}

/// Writes each `(address, bytes)` of `edits` into the executable code of a
/// loaded object: its pages are made writable for the while and put back to
/// read and execute, and Valgrind, when the process runs under it, is told
/// to drop what it translated from the old bytes. False when the system
/// refuses to make the pages writable (a W^X policy); nothing is written
/// then.
///
/// # Safety
/// One thread; the bytes are whole instructions or displacements that no
/// other code is running.
pub unsafe fn write_code(edits: &[(usize, &[u8])]) -> bool {
    let page = crate::sampled::PAGE;
    let lo = edits.iter().map(|e| e.0).min().unwrap_or(0) & !(page - 1);
    let hi = edits
        .iter()
        .map(|e| e.0 + e.1.len())
        .max()
        .unwrap_or(0)
        .next_multiple_of(page);
    let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    // SAFETY: pages of a loaded object's text, made writable and put back
    // to read and execute (what text pages are).
    unsafe {
        if libc::mprotect(lo as *mut libc::c_void, hi - lo, rwx) != 0 {
            return false;
        }
        for &(at, bytes) in edits {
            for (i, b) in bytes.iter().enumerate() {
                core::ptr::write_volatile((at + i) as *mut u8, *b);
            }
        }
        libc::mprotect(
            lo as *mut libc::c_void,
            hi - lo,
            libc::PROT_READ | libc::PROT_EXEC,
        );
    }
    // Under Valgrind, code that has run is run from its translations: glibc's
    // free may have run before the constructor (another library's
    // constructor frees a block), and our hooks have.
    crate::sys::discard_translations(lo, hi - lo);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_has_its_jump_where_the_patch_looks() {
        for (hook, slot) in hooks() {
            // SAFETY: our hooks.
            let at = unsafe { site(hook, slot) };
            assert!(at.is_some(), "hook at {hook:#x}: no jump found");
            let at = at.unwrap();
            assert!(at > hook && at < hook + SCAN);
        }
        // A pointer no hook jumps through is not found.
        static OTHER: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());
        // SAFETY: as above.
        let found = unsafe { site(api::free as *const () as usize, &OTHER) };
        assert_eq!(found, None);
    }

    #[test]
    fn displacements_are_checked_for_range() {
        assert_eq!(displacement(0x1000, 0x2000), Some(0x2000 - 0x1004));
        assert_eq!(displacement(0x2000, 0x1000), Some(0x1000 - 0x2004));
        assert_eq!(displacement(0x1000, 0x1000 + (1 << 32)), None);
        assert_eq!(displacement(0x1_0000_0000, 0), None);
    }

    #[test]
    fn a_second_thread_is_seen() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv().ok());
        assert!(!single_threaded());
        drop(tx);
        other.join().unwrap();
    }
}
