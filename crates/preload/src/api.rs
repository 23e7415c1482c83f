//! Every symbol the traced program sees. This file is the whole surface
//! `libmtrace_rs.so` interposes; review it as one piece.
//!
//! Each allocation entry point has a hot path of one subtraction and one
//! predictable branch (the per-thread byte countdown), and each free a hot
//! path of one mask test on the pointer; everything else is in `#[cold]`
//! functions. Semantics are glibc's: return values, errno, alignment,
//! `malloc(0)`, `free(NULL)`, `realloc(NULL, n)`, `realloc(p, 0)` (frees p,
//! returns NULL), and failed allocations (NULL, nothing recorded).

use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::tracer::{self, Decision, FreeKind, Tls, HOT, TLS};
use crate::{detour, pool, real, sampled, sys, writer};

/// Charges `size` to the thread's countdown; true when no sample point was
/// reached (the overwhelmingly common case).
#[inline(always)]
fn countdown_ok(size: usize) -> bool {
    TLS.with(|t| {
        let c = t.countdown.get().wrapping_sub(size as i64);
        if c > 0 {
            t.countdown.set(c);
            true
        } else {
            false
        }
    })
}

/// In sampled mode a recorded block must be laid out as a sampled one (tagged
/// address, key in front, sampled.rs) so that its free is recognized; exact
/// mode records every free anyway.
#[inline]
fn align_for(d: Decision) -> bool {
    d != Decision::Skip && !tracer::exact()
}

/// A sampled block for the program, at an address whose low sixteen bits
/// are `TAG` (see sampled.rs): up to `pool::MAX` bytes, a block of the
/// pool's pages; beyond, an ordinary block 64 KiB larger is allocated, the
/// first such address inside it is handed out, and the block's own address is
/// kept in the word just before it for the free. A plain malloc, not
/// memalign: glibc's memalign splits chunks and fragments the heap, and cost
/// the sampled churn benchmark several percent. Null when the real allocator
/// fails.
unsafe fn sampled_alloc(size: usize) -> *mut c_void {
    // SAFETY: as the function's contract.
    unsafe { sampled_chunk(size, false) }
}

/// `sampled_alloc` for calloc: the program's `size` bytes are zero.
unsafe fn sampled_zeroed(size: usize) -> *mut c_void {
    // SAFETY: as sampled_alloc.
    unsafe { sampled_chunk(size, true) }
}

/// The tagged block behind `sampled_alloc`, zeroed when `zeroed`. A pool
/// block is cleared by hand, the program's bytes only: once the pool has
/// warmed up its blocks are recycled ones, which glibc would have cleared as
/// well. A larger one is cleared by the real calloc, which knows when its
/// memory is fresh from the kernel or the top of the heap and skips the
/// clearing (a sampled 1 MiB calloc cleared by hand faulted in all of its
/// pages).
unsafe fn sampled_chunk(size: usize, zeroed: bool) -> *mut c_void {
    if size <= pool::MAX {
        if let Some(p) = pool::place(size, sampled::TAG) {
            if zeroed {
                // SAFETY: a block of our own with `size` bytes from p.
                unsafe { core::ptr::write_bytes(p as *mut u8, 0, size) };
            }
            return p as *mut c_void;
        }
    }
    let Some(total) = size.checked_add(sampled::ALIGN + sampled::TAG) else {
        sys::set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    };
    // SAFETY: allocating.
    let chunk = unsafe {
        if zeroed {
            real::calloc(1, total)
        } else {
            real::malloc(total)
        }
    };
    if chunk.is_null() {
        return chunk;
    }
    let p = sampled::tagged_in(chunk as usize);
    // SAFETY: p - chunk is between TAG and ALIGN bytes (the chunk is
    // 16-aligned), so [p - 16, p + size) lies inside the chunk's `total`
    // bytes, and p - 8 is 8-aligned.
    unsafe { *((p - 8) as *mut usize) = chunk as usize };
    p as *mut c_void
}

/// Gives a block's chunk back: to the pool when it is a pool page (marked),
/// else to the real allocator (an ordinary block's own address, or a
/// sampled block's chunk).
///
/// # Safety
/// `chunk` is a live block of the real allocator, or a pool page's chunk
/// word, whose block nothing refers to any more.
#[inline]
unsafe fn free_chunk(chunk: usize) {
    if chunk & pool::MARK != 0 {
        // SAFETY: as the contract.
        unsafe { pool::give(chunk) }
    } else {
        // SAFETY: as the contract.
        unsafe { real::free(chunk as *mut c_void) }
    }
}

/// Bytes the program may use in the sampled block at `p` (what
/// `malloc_usable_size` reports, and what a realloc copies): a pool block's
/// size rounded up to 16, as glibc would report about, not the pages it
/// spans.
///
/// # Safety
/// `p` must be a live sampled block.
unsafe fn sampled_usable(p: *mut c_void) -> usize {
    // SAFETY: `p` is a live sampled block; `chunk` is the live chunk behind
    // it.
    unsafe {
        let chunk = sampled::chunk_of(p as usize);
        if chunk & pool::MARK != 0 {
            return pool::usable(chunk);
        }
        real::malloc_usable_size(chunk as *mut c_void).saturating_sub(p as usize - chunk)
    }
}

#[inline(always)]
fn is_free_candidate(p: *mut c_void) -> bool {
    (p as usize) & HOT.free_mask.load(Relaxed) == 0
}

/// An allocation entry point whose hot path is malloc's: find the thread's
/// state (initial-exec TLS, addressed from `fs`), subtract the size (in the
/// register `size`) from the countdown in place, and if it stays positive
/// jump to the real function (a conditional jump that patch.rs points
/// straight at it; until then it reaches a jump through the function's
/// pointer); otherwise add the size back and jump to `slow` with the
/// arguments untouched. Only `rax`, which carries no argument of these
/// functions, is used. Three instructions: the Rust version
/// compiles to more (a separate load and store of the countdown, and the
/// frame setup it cannot avoid, as the crate keeps frame pointers for the
/// frame-pointer unwinder; tail jumps leave no frame). The comparison is
/// unsigned: the slow path takes size >= countdown, including the absurd
/// sizes (>= 2^63) that must fail in the real function. The countdown wraps
/// for that instant and the addition restores it exactly (tracer.rs keeps it
/// non-negative otherwise); a signal handler that allocates in between sees
/// the charged countdown, which at worst moves its own sample point by the
/// interrupted allocation's size.
macro_rules! countdown_entry {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, size = $size:literal, real = $real:path, slow = $slow:path) => {
        countdown_entry!(@emit [], $(#[$doc])* $name($($arg: $ty),*) -> $ret,
            size = $size, real = $real, slow = $slow, relay_to = $slow);
    };
    // The aligned allocators: an alignment (in register `$align`) below
    // RELAY_ALIGN goes to `$to` without the countdown (detour.rs).
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, size = $size:literal, relay = $align:literal => $to:path, real = $real:path, slow = $slow:path) => {
        countdown_entry!(@emit
            [concat!("cmp ", $align, ", qword ptr [rip + {relay}]"), "jb {relay_to}"],
            $(#[$doc])* $name($($arg: $ty),*) -> $ret,
            size = $size, real = $real, slow = $slow, relay_to = $to);
    };
    (@emit [$($relay:expr),*], $(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, size = $size:literal, real = $real:path, slow = $slow:path, relay_to = $to:path) => {
        $(#[$doc])*
        #[cfg_attr(not(test), unsafe(no_mangle))]
        #[unsafe(naked)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(
                // (Keeps the relay operands used in every hook.)
                "/* {relay} {relay_to} */",
                $($relay,)*
                // The countdown is the first field of Tls (asserted in
                // tracer.rs), at the thread pointer plus this offset.
                "mov rax, qword ptr [rip + mtrace_rs_tls@GOTTPOFF]",
                concat!("sub qword ptr fs:[rax], ", $size),
                // ja rel32 to the real function (patch.rs): the jump
                // through its pointer below until patched.
                ".byte 0x0f, 0x87",
                ".long 3f - . - 4",
                concat!("add qword ptr fs:[rax], ", $size),
                "jmp {slow}",
                "3:",
                "jmp qword ptr [rip + {real}]",
                real = sym $real,
                slow = sym $slow,
                relay = sym RELAY_ALIGN,
                relay_to = sym $to,
            )
        }
    };
}

/// Alignments below this go from the aligned allocators' hooks to their
/// `*_relay` functions without the countdown: 0 (none) unless detour.rs has
/// made glibc's malloc charge the countdown itself, when it is 17. glibc's
/// `memalign` and `posix_memalign` hand an alignment of at most 16 to its
/// malloc, which would charge the allocation a second time; the relays call
/// that malloc themselves, so that a sample taken there is recorded with
/// the program's stack (the relay's own frame is the tracer's, which the
/// capture skips; glibc's `posix_memalign` would have stayed in the stack).
pub static RELAY_ALIGN: AtomicUsize = AtomicUsize::new(0);

/// posix_memalign with an alignment below `RELAY_ALIGN`: glibc's checks (a
/// power-of-two multiple of the pointer size), then its malloc, which
/// charges the countdown.
unsafe extern "C" fn posix_memalign_relay(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    let word = core::mem::size_of::<usize>();
    if align == 0 || !align.is_multiple_of(word) || !(align / word).is_power_of_two() {
        return libc::EINVAL;
    }
    // SAFETY: allocating.
    let p = unsafe { detour::charged_malloc(size) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's pointer for the result.
    unsafe { *out = p };
    0
}

/// memalign with an alignment below `RELAY_ALIGN`: glibc's malloc, as its
/// memalign would call it.
unsafe extern "C" fn memalign_relay(_align: usize, size: usize) -> *mut c_void {
    // SAFETY: allocating.
    unsafe { detour::charged_malloc(size) }
}

/// aligned_alloc with an alignment below `RELAY_ALIGN`: as memalign for a
/// power of two; anything else to glibc's aligned_alloc, uncharged (glibc
/// 2.36 hands it to its malloc, which charges it; later ones refuse it).
unsafe extern "C" fn aligned_alloc_relay(align: usize, size: usize) -> *mut c_void {
    if align.is_power_of_two() {
        // SAFETY: allocating.
        unsafe { detour::charged_malloc(size) }
    } else {
        // SAFETY: forwarding.
        unsafe { real::aligned_alloc(align, size) }
    }
}

countdown_entry! {
    /// # Safety
    /// As C's `malloc`.
    malloc(size: usize) -> *mut c_void, size = "rdi", real = real::MALLOC, slow = malloc_slow
}

#[cold]
#[inline(never)]
pub(crate) unsafe extern "C" fn malloc_slow(size: usize) -> *mut c_void {
    TLS.with(|t| {
        let d = tracer::decide(t, size);
        let p = if align_for(d) {
            // SAFETY: allocating.
            unsafe { sampled_alloc(size) }
        } else {
            // SAFETY: forwarding.
            unsafe { real::malloc(size) }
        };
        if d != Decision::Skip && !p.is_null() {
            // A tagged block is always marked.
            let _ = tracer::record_alloc(t, p, size, d);
        }
        p
    })
}

/// # Safety
/// As C's `calloc`.
///
/// Hot path as malloc's, after the multiplication: an overflow goes to the
/// slow path, which hands it to the real calloc to fail.
#[cfg_attr(not(test), unsafe(no_mangle))]
#[unsafe(naked)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    core::arch::naked_asm!(
        "mov rax, rdi",
        "mul rsi",
        "jo 2f",
        "mov rcx, qword ptr [rip + mtrace_rs_tls@GOTTPOFF]",
        "sub qword ptr fs:[rcx], rax",
        // ja rel32, as in `countdown_entry`.
        ".byte 0x0f, 0x87",
        ".long 3f - . - 4",
        "add qword ptr fs:[rcx], rax",
        "2:",
        "jmp {slow}",
        "3:",
        "jmp qword ptr [rip + {real}]",
        real = sym real::CALLOC,
        slow = sym calloc_checked,
    )
}

/// calloc's slow path, entered with calloc's arguments untouched.
#[cold]
#[inline(never)]
pub(crate) unsafe extern "C" fn calloc_checked(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        // SAFETY: the real calloc reports the overflow (NULL, ENOMEM).
        return unsafe { real::calloc(n, size) };
    };
    if countdown_ok(total) {
        // SAFETY: forwarding.
        return unsafe { real::calloc(n, size) };
    }
    // SAFETY: forwarding.
    unsafe { calloc_slow(n, size, total) }
}

#[cold]
#[inline(never)]
unsafe fn calloc_slow(n: usize, size: usize, total: usize) -> *mut c_void {
    TLS.with(|t| {
        let d = tracer::decide(t, total);
        let p = if align_for(d) {
            // SAFETY: allocating.
            unsafe { sampled_zeroed(total) }
        } else {
            // SAFETY: forwarding.
            unsafe { real::calloc(n, size) }
        };
        if d != Decision::Skip && !p.is_null() {
            // A tagged block is always marked.
            let _ = tracer::record_alloc(t, p, total, d);
        }
        p
    })
}

/// # Safety
/// As C's `free`.
///
/// Hot path: one test of the pointer against `tracer::HOT.free_mask` and a
/// conditional jump to the real `free` (patch.rs); the rare candidate (NULL, in sampled mode an
/// address whose low sixteen bits read 0x0000 or 0x0010, in exact mode every
/// pointer) jumps to the slow path.
#[cfg_attr(not(test), unsafe(no_mangle))]
#[unsafe(naked)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    core::arch::naked_asm!(
        "test qword ptr [rip + {mask}], rdi",
        // jnz rel32 to the real free (patch.rs), as in `countdown_entry`.
        ".byte 0x0f, 0x85",
        ".long 3f - . - 4",
        "jmp {slow}",
        "3:",
        "jmp qword ptr [rip + {real}]",
        mask = sym HOT,
        real = sym real::FREE,
        slow = sym free_slow,
    )
}

/// Also where glibc's own free jumps for NULL and the candidates once it
/// tests them itself (detour.rs): `real::FREE` then lies past that test,
/// and must not see NULL.
#[cold]
#[inline(never)]
pub(crate) unsafe extern "C" fn free_slow(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    let sampled_chunk = TLS.with(|t| match tracer::free_kind(t, p) {
        FreeKind::Plain => None,
        FreeKind::Recorded => {
            tracer::record_free(t, p, sys::now_ns());
            None
        }
        FreeKind::Sampled { record } => {
            if record {
                tracer::record_free(t, p, sys::now_ns());
            }
            // SAFETY: p was a live sampled block until just now.
            Some(unsafe { sampled::chunk_of(p as usize) })
        }
    });
    match sampled_chunk {
        // SAFETY: the chunk behind a sampled block just removed.
        Some(chunk) => unsafe { free_chunk(chunk) },
        // SAFETY: forwarding the program's own pointer, whatever it is.
        None => unsafe { real::free(p) },
    }
}

/// # Safety
/// As C's `realloc`.
///
/// Hot path: free's pointer test, then malloc's countdown; NULL, a candidate
/// for a sampled block, and a reached sample point go to the slow path. A
/// zero size leaves the countdown as it was, and the real realloc frees an
/// ordinary block just as the slow path would.
#[cfg_attr(not(test), unsafe(no_mangle))]
#[unsafe(naked)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    core::arch::naked_asm!(
        "test qword ptr [rip + {mask}], rdi",
        "jz 2f",
        "mov rax, qword ptr [rip + mtrace_rs_tls@GOTTPOFF]",
        "sub qword ptr fs:[rax], rsi",
        // ja rel32, as in `countdown_entry`.
        ".byte 0x0f, 0x87",
        ".long 3f - . - 4",
        "add qword ptr fs:[rax], rsi",
        "2:",
        "jmp {slow}",
        "3:",
        "jmp qword ptr [rip + {real}]",
        mask = sym HOT,
        real = sym real::REALLOC,
        slow = sym realloc_checked,
    )
}

/// realloc's slow path, entered with realloc's arguments untouched.
#[cold]
#[inline(never)]
unsafe extern "C" fn realloc_checked(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: realloc(NULL, n) is malloc(n).
        return unsafe { malloc(size) };
    }
    if !is_free_candidate(p) && size != 0 && countdown_ok(size) {
        // SAFETY: forwarding.
        return unsafe { real::realloc(p, size) };
    }
    // SAFETY: forwarding.
    unsafe { realloc_slow(p, size) }
}

#[cold]
#[inline(never)]
unsafe fn realloc_slow(p: *mut c_void, size: usize) -> *mut c_void {
    TLS.with(|t| {
        if size == 0 {
            // glibc frees p and returns NULL.
            let ts = sys::now_ns();
            return match tracer::free_kind(t, p) {
                FreeKind::Plain => {
                    // SAFETY: forwarding.
                    unsafe { real::realloc(p, 0) }
                }
                FreeKind::Recorded => {
                    // SAFETY: forwarding.
                    let q = unsafe { real::realloc(p, 0) };
                    tracer::record_free(t, p, ts);
                    q
                }
                FreeKind::Sampled { record } => {
                    if record {
                        tracer::record_free(t, p, ts);
                    }
                    // SAFETY: the chunk behind a sampled block just removed.
                    unsafe { free_chunk(sampled::chunk_of(p as usize)) };
                    core::ptr::null_mut()
                }
            };
        }
        if tracer::exact() {
            if !tracer::running() || t.guard.get() {
                // SAFETY: forwarding.
                return unsafe { real::realloc(p, size) };
            }
            let ts = sys::now_ns();
            // SAFETY: forwarding.
            let q = unsafe { real::realloc(p, size) };
            if !q.is_null() {
                tracer::record_free(t, p, ts);
                let _ = tracer::record_alloc(t, q, size, Decision::Exact);
            }
            return q;
        }
        // SAFETY: the sampled paths keep p valid until it is replaced.
        unsafe { realloc_sampled(t, p, size) }
    })
}

/// Sampled-mode realloc. A sampled block lives inside a chunk the real
/// allocator knows by another address, so it never goes to the real realloc:
/// it is moved by hand. A block that becomes sampled is moved into a sampled
/// chunk. The old block stops being a sampled one (its key cleared) before
/// its chunk is freed, so recycled memory never carries a key.
unsafe fn realloc_sampled(t: &Tls, p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: a non-null block the program holds.
    let old_sampled = unsafe { sampled::holds(p as u64) };
    let live = tracer::running() && !t.guard.get();
    let d = if live {
        tracer::decide(t, size)
    } else {
        Decision::Skip
    };
    if d == Decision::Skip && !old_sampled {
        // SAFETY: forwarding.
        return unsafe { real::realloc(p, size) };
    }
    let q = if d == Decision::Skip {
        // SAFETY: allocating.
        unsafe { real::malloc(size) }
    } else {
        // SAFETY: allocating.
        unsafe { sampled_alloc(size) }
    };
    if q.is_null() {
        // p stays live (and sampled, if it was).
        return q;
    }
    // SAFETY: p is a live block of at least `usable` bytes and q one of at
    // least `size`; they do not overlap.
    unsafe {
        let usable = if old_sampled {
            sampled_usable(p)
        } else {
            real::malloc_usable_size(p)
        };
        core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, usable.min(size));
    }
    let chunk = if old_sampled {
        // SAFETY: as above.
        unsafe { sampled::take(p as u64) };
        if live {
            tracer::record_free(t, p, sys::now_ns());
        }
        // SAFETY: p was a live sampled block until just now.
        unsafe { sampled::chunk_of(p as usize) }
    } else {
        p as usize
    };
    // SAFETY: the old block is no longer referenced; its chunk goes back.
    unsafe { free_chunk(chunk) };
    if d != Decision::Skip {
        // A tagged block is always marked.
        let _ = tracer::record_alloc(t, q, size, d);
    }
    q
}

/// # Safety
/// As C's `reallocarray`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: as realloc.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            sys::set_errno(libc::ENOMEM);
            core::ptr::null_mut()
        }
    }
}

/// Shared slow path of the aligned allocators. `valid` says whether the
/// alignment is one the real function accepts as-is, so that raising it to a
/// page cannot change the result; an invalid one is forwarded untouched for
/// the real function to reject. `alloc(align, size)` calls the real function.
///
/// A sampled aligned block is carved out of a chunk one alignment unit (at
/// least `sampled::ALIGN`, 64 KiB) larger: the program gets the first
/// multiple of that unit at least 16 bytes into the chunk, so its low
/// sixteen bits read 0x0000, and the chunk's address and the sampled key
/// sit in the two words before it, inside the chunk (sampled.rs).
#[cold]
#[inline(never)]
fn aligned_slow(
    size: usize,
    align: usize,
    valid: bool,
    mut alloc: impl FnMut(usize, usize) -> *mut c_void,
) -> *mut c_void {
    TLS.with(|t| {
        if !valid {
            return alloc(align, size);
        }
        let d = tracer::decide(t, size);
        let p = if align_for(d) {
            if align <= sampled::ALIGN && size <= pool::MAX - (sampled::ALIGN - sampled::TAG) {
                // A pool block with 64 KiB more in front: the program gets
                // its second 64 KiB.
                if let Some(p) = pool::place(size, sampled::ALIGN) {
                    return record_aligned(t, p as *mut c_void, size, d, align, &mut alloc);
                }
            }
            // The real function's own alignment: glibc's memalign with a
            // 64 KiB unit would split chunks and fragment the heap, and
            // valloc's cannot be asked for more than a page.
            let unit = align.max(sampled::ALIGN);
            let Some(total) = size.checked_add(unit + sampled::TAG) else {
                sys::set_errno(libc::ENOMEM);
                return core::ptr::null_mut();
            };
            let chunk = alloc(align, total);
            if chunk.is_null() {
                return chunk;
            }
            let p = (chunk as usize + sampled::TAG + unit - 1) & !(unit - 1);
            // SAFETY: [chunk, chunk + total) is ours; p is at least TAG and
            // at most unit + TAG bytes into it (the chunk is 8-aligned), so
            // [p - 16, p + size) lies in it, and p - 8 is 8-aligned.
            unsafe { *((p - 8) as *mut usize) = chunk as usize };
            p as *mut c_void
        } else {
            alloc(align, size)
        };
        if p.is_null() {
            return p;
        }
        record_aligned(t, p, size, d, align, &mut alloc)
    })
}

/// Records the aligned block `p` (non-null) if `d` says so, and returns the
/// block for the program.
fn record_aligned(
    t: &Tls,
    p: *mut c_void,
    size: usize,
    d: Decision,
    align: usize,
    alloc: &mut impl FnMut(usize, usize) -> *mut c_void,
) -> *mut c_void {
    if d != Decision::Skip && !tracer::record_alloc(t, p, size, d) {
        // Not marked as sampled: swap it for a plain block, whose free
        // needs no marking.
        let q = alloc(align, size);
        // SAFETY: the sampled block's chunk, never handed out.
        unsafe { free_chunk(sampled::chunk_of(p as usize)) };
        return q;
    }
    p
}

countdown_entry! {
/// # Safety
/// As C's `posix_memalign`.
    posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int, size = "rdx", relay = "rsi" => posix_memalign_relay, real = real::POSIX_MEMALIGN, slow = posix_memalign_checked
}

/// posix_memalign's slow path, entered with its arguments untouched.
#[cold]
#[inline(never)]
unsafe extern "C" fn posix_memalign_checked(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    if countdown_ok(size) {
        // SAFETY: forwarding.
        return unsafe { real::posix_memalign(out, align, size) };
    }
    let valid = align.is_power_of_two() && align.is_multiple_of(core::mem::size_of::<usize>());
    let mut rc = 0;
    let p = aligned_slow(size, align, valid, |a, n| {
        let mut p = core::ptr::null_mut();
        // SAFETY: forwarding, into a local.
        rc = unsafe { real::posix_memalign(&mut p, a, n) };
        if rc == 0 {
            p
        } else {
            core::ptr::null_mut()
        }
    });
    if rc == 0 {
        // SAFETY: on success posix_memalign stores through `out`, which the
        // caller passed for that purpose.
        unsafe { *out = p };
    }
    rc
}

countdown_entry! {
/// # Safety
/// As C's `aligned_alloc`.
    aligned_alloc(align: usize, size: usize) -> *mut c_void, size = "rsi", relay = "rdi" => aligned_alloc_relay, real = real::ALIGNED_ALLOC, slow = aligned_alloc_checked
}

/// aligned_alloc's slow path, entered with its arguments untouched.
#[cold]
#[inline(never)]
unsafe extern "C" fn aligned_alloc_checked(align: usize, size: usize) -> *mut c_void {
    if countdown_ok(size) {
        // SAFETY: forwarding.
        return unsafe { real::aligned_alloc(align, size) };
    }
    // glibc up to 2.37 makes aligned_alloc its memalign (the same
    // function), which takes any alignment; later ones refuse an alignment
    // that is not a power of two.
    let same = real::ALIGNED_ALLOC.load(Relaxed) == real::MEMALIGN.load(Relaxed);
    let unit = if same {
        memalign_unit(align)
    } else {
        align.is_power_of_two().then_some(align)
    };
    // SAFETY: forwarding.
    aligned_slow(size, unit.unwrap_or(align), unit.is_some(), |a, n| unsafe {
        real::aligned_alloc(a, n)
    })
}

/// The alignment glibc's memalign gives a request for `align`: malloc's 16
/// up to 16, the next power of two above; None beyond 2^63, which it
/// refuses (EINVAL). Sampled and exact mode record such blocks as glibc
/// makes them, rather than pass them on unrecorded.
fn memalign_unit(align: usize) -> Option<usize> {
    if align <= 16 {
        Some(16)
    } else {
        align.checked_next_power_of_two()
    }
}

countdown_entry! {
/// # Safety
/// As glibc's `memalign`.
    memalign(align: usize, size: usize) -> *mut c_void, size = "rsi", relay = "rdi" => memalign_relay, real = real::MEMALIGN, slow = memalign_checked
}

/// memalign's slow path, entered with its arguments untouched.
#[cold]
#[inline(never)]
unsafe extern "C" fn memalign_checked(align: usize, size: usize) -> *mut c_void {
    if countdown_ok(size) {
        // SAFETY: forwarding.
        return unsafe { real::memalign(align, size) };
    }
    let unit = memalign_unit(align);
    // SAFETY: forwarding.
    aligned_slow(size, unit.unwrap_or(align), unit.is_some(), |a, n| unsafe {
        real::memalign(a, n)
    })
}

countdown_entry! {
/// # Safety
/// As glibc's `valloc`.
    valloc(size: usize) -> *mut c_void, size = "rdi", real = real::VALLOC, slow = valloc_checked
}

/// valloc's slow path, entered with its arguments untouched.
#[cold]
#[inline(never)]
unsafe extern "C" fn valloc_checked(size: usize) -> *mut c_void {
    if countdown_ok(size) {
        // SAFETY: forwarding.
        return unsafe { real::valloc(size) };
    }
    // valloc's blocks are page-aligned already.
    // SAFETY: forwarding.
    aligned_slow(size, sampled::PAGE, true, |_, n| unsafe { real::valloc(n) })
}

countdown_entry! {
/// # Safety
/// As glibc's `pvalloc`.
    pvalloc(size: usize) -> *mut c_void, size = "rdi", real = real::PVALLOC, slow = pvalloc_checked
}

/// pvalloc's slow path, entered with its arguments untouched.
#[cold]
#[inline(never)]
unsafe extern "C" fn pvalloc_checked(size: usize) -> *mut c_void {
    if countdown_ok(size) {
        // SAFETY: forwarding.
        return unsafe { real::pvalloc(size) };
    }
    // SAFETY: forwarding.
    aligned_slow(size, sampled::PAGE, true, |_, n| unsafe {
        real::pvalloc(n)
    })
}

/// # Safety
/// As glibc's `malloc_usable_size`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if !p.is_null()
        && !tracer::exact()
        // SAFETY: a non-null block the program holds.
        && unsafe { sampled::holds(p as u64) }
    {
        // SAFETY: a live sampled block.
        return unsafe { sampled_usable(p) };
    }
    // SAFETY: forwarding.
    unsafe { real::malloc_usable_size(p) }
}

// ---------------------------------------------------------------------------
// Mappings (MTRACE_RS_MMAP=1): what the program maps itself, like a JVM's
// heap and metaspace or a service's big buffers. glibc's allocator maps its
// arenas through its internal mmap, which does not come here.

/// # Safety
/// As C's `mmap`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: forwarding.
    let p = unsafe { real::mmap(addr, len, prot, flags, fd, off) };
    if tracer::MMAP_TRACKING.load(Relaxed)
        && p != libc::MAP_FAILED
        && flags & libc::MAP_ANONYMOUS != 0
    {
        tracer::record_map(crate::ring::KIND_MMAP, p as u64, len as u64, sys::now_ns());
    }
    p
}

/// # Safety
/// As glibc's `mmap64` (the same function on 64-bit Linux).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: as mmap.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// # Safety
/// As C's `munmap`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    if tracer::MMAP_TRACKING.load(Relaxed) {
        tracer::record_map(
            crate::ring::KIND_MUNMAP,
            addr as u64,
            len as u64,
            sys::now_ns(),
        );
    }
    // SAFETY: forwarding.
    unsafe { real::munmap(addr, len) }
}

/// # Safety
/// As Linux's `mremap`; the optional fifth argument is passed through as is
/// (the real function reads it only with MREMAP_FIXED).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let ts = sys::now_ns();
    // SAFETY: forwarding.
    let q = unsafe { real::mremap(old, old_len, new_len, flags, new_addr) };
    if tracer::MMAP_TRACKING.load(Relaxed) && q != libc::MAP_FAILED {
        tracer::record_map(crate::ring::KIND_MUNMAP, old as u64, old_len as u64, ts);
        tracer::record_map(
            crate::ring::KIND_MMAP,
            q as u64,
            new_len as u64,
            sys::now_ns(),
        );
    }
    q
}

// ---------------------------------------------------------------------------
// Process events: the image is about to be replaced or to vanish, so what the
// writer has not copied yet is written now.

/// # Safety
/// As C's `execve`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    writer::before_exec();
    // SAFETY: forwarding.
    unsafe { real::execve(path, argv, envp) }
}

/// # Safety
/// As C's `execv`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    writer::before_exec();
    // SAFETY: forwarding.
    unsafe { real::execv(path, argv) }
}

/// # Safety
/// As C's `execvp`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    writer::before_exec();
    // SAFETY: forwarding.
    unsafe { real::execvp(file, argv) }
}

/// # Safety
/// As glibc's `execvpe`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    writer::before_exec();
    // SAFETY: forwarding.
    unsafe { real::execvpe(file, argv, envp) }
}

/// `execl`, `execlp` and `execle` are variadic, which stable Rust cannot
/// define, and glibc's versions call its internal `__execve`, which we cannot
/// interpose. So these three are naked: they save the argument registers
/// (and `al`, the vector-register count of a variadic call), flush, restore
/// them, and jump to the real function with the caller's stack untouched, so
/// arguments past the sixth are still where the caller put them.
macro_rules! variadic_exec {
    ($name:ident, $real:path) => {
        /// # Safety
        /// As C's function of this name.
        #[cfg_attr(not(test), unsafe(no_mangle))]
        #[unsafe(naked)]
        pub unsafe extern "C" fn $name() {
            core::arch::naked_asm!(
                "push rax",
                "push rdi",
                "push rsi",
                "push rdx",
                "push rcx",
                "push r8",
                "push r9",
                // 7 pushes after the return address: the stack is 16-byte
                // aligned for the call.
                "call {flush}",
                "pop r9",
                "pop r8",
                "pop rcx",
                "pop rdx",
                "pop rsi",
                "pop rdi",
                "pop rax",
                "jmp qword ptr [rip + {real}]",
                flush = sym exec_flush,
                real = sym $real,
            )
        }
    };
}

extern "C" fn exec_flush() {
    writer::before_exec();
}

variadic_exec!(execl, real::EXECL);
variadic_exec!(execlp, real::EXECLP);
variadic_exec!(execle, real::EXECLE);

/// `_Exit` is `_exit` under its C99 name (LLVM's tools, lld among them,
/// end with it).
///
/// # Safety
/// As C's `_Exit`.
#[cfg_attr(not(test), unsafe(no_mangle))]
#[allow(non_snake_case)]
pub unsafe extern "C" fn _Exit(status: c_int) -> ! {
    // SAFETY: the same function.
    unsafe { _exit(status) }
}

/// `_exit` skips atexit handlers and library destructors, so the tracer
/// finishes the file here (forked children of test runners end this way).
///
/// # Safety
/// As C's `_exit`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn _exit(status: c_int) -> ! {
    writer::finish();
    // SAFETY: exit_group ends the process; it does not return.
    unsafe {
        libc::syscall(libc::SYS_exit_group, status);
    }
    #[allow(clippy::empty_loop)]
    loop {}
}

// ---------------------------------------------------------------------------
// JVMTI agent entry points: `java -agentpath:/path/to/libmtrace_rs.so`.

/// # Safety
/// Called by the JVM with its JavaVM.
#[allow(non_snake_case)]
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn Agent_OnLoad(
    vm: *mut c_void,
    _options: *mut c_char,
    _reserved: *mut c_void,
) -> c_int {
    // SAFETY: the JVM's own JavaVM.
    unsafe { crate::jvmti::start(vm, false) }
}

/// # Safety
/// Called by the JVM with its JavaVM when an agent is attached at run time.
#[allow(non_snake_case)]
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn Agent_OnAttach(
    vm: *mut c_void,
    _options: *mut c_char,
    _reserved: *mut c_void,
) -> c_int {
    // SAFETY: the JVM's own JavaVM.
    unsafe { crate::jvmti::start(vm, true) }
}
