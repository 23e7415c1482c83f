//! The fast stack unwinder: DWARF call frame information turned into tiny
//! per-thread cached rules, the way libunwind's cached unwinding and the
//! `framehop` crate do it, but allocation-free inside the hooks.
//!
//! libgcc's `_Unwind_Backtrace` re-reads and re-interprets the CFI of every
//! frame on every capture (400-650 ns per stack). Almost every frame of
//! compiled x86_64 code obeys one of a handful of rules, "CFA = rsp + k" or
//! "CFA = rbp + k", the return address at CFA - 8, rbp either untouched or
//! saved at CFA + j, so a rule fits in one `u64`. The first time a thread
//! meets a pc it evaluates the CFI with gimli (from the loaded image's own
//! `.eh_frame_hdr` and `.eh_frame`, nothing read from disk) and stores the
//! rule in its direct-mapped cache; after that a frame costs a hash, a
//! compare and one or two loads.
//!
//! Pieces:
//! - The module table (`Table`): every loaded object's address range and its
//!   in-memory unwind sections, sorted, immutable once published. `refresh`
//!   builds a new one (at start-up and whenever the writer sees `dlopen` or
//!   `dlclose`) and swaps the pointer; old tables are leaked, never freed, so
//!   a hook that still holds one reads valid memory.
//! - The per-thread cache (`ThreadCache`): an anonymous mapping made once per
//!   thread in the slow path (no heap), holding the thread's stack bounds, the
//!   rule entries, and gimli's evaluation context with fixed-size storage. It
//!   is unmapped by a pthread key destructor when the thread exits. A cache
//!   filled under an older table is wiped when the table changes.
//! - The walk (`capture`): starts from its own registers (rip, rsp, rbp read
//!   with inline asm), drops the tracer's own frames, and returns the
//!   program's return addresses innermost first: the contract of
//!   `stacks::capture_dwarf`, with the same addresses.
//!
//! What a rule cannot express (a CFA given by an expression, as in PLT stubs
//! and signal trampolines, or registers saved in other registers), a pc in a
//! loaded object the table does not know yet, or a capture that runs on a
//! signal stack, ends in libgcc's unwinder for that capture: slower, never
//! wrong. A pc in no loaded object at all is JIT code (the JVM): the walk
//! takes frame-pointer steps while rbp points into the stack above the
//! current frame, which is how `-XX:+PreserveFramePointer` frames are
//! crossed.
//!
//! Invariant: every stack read is 8-byte aligned and lies between the
//! capture's own stack pointer and the top of the thread's stack, so a bad
//! rule or garbage in rbp ends the walk instead of faulting. Nothing on the
//! capture path allocates, blocks, or panics; the per-thread set-up runs as
//! tracer-internal code (its allocations are untraced).

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, EndianSlice, LittleEndian, Pointer, Register,
    RegisterRule, UnwindContext, UnwindContextStorage, UnwindSection, UnwindTableRow, X86_64,
};

use crate::config::MAX_DEPTH;
use crate::{stacks, sys, tracer};

type Slice = EndianSlice<'static, LittleEndian>;

// ---------------------------------------------------------------------------
// Rules

/// A rule packed into a `u64`:
/// bits 0..8 the kind, bit 8 "rbp was saved at CFA + bp_off",
/// bits 16..32 `bp_off` (i16), bits 32..64 `cfa_off` (i32).
/// Zero is never a stored rule: an empty cache slot has pc 0.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Rule(u64);

/// The outermost frame (return address undefined), or a pc inside a known
/// object that no FDE covers: libgcc stops there too, after reporting it.
const K_END: u64 = 1;
/// Something the packed rules cannot express: use libgcc for this capture.
const K_FALLBACK: u64 = 2;
/// CFA = rsp + cfa_off.
const K_RSP: u64 = 3;
/// CFA = rbp + cfa_off.
const K_RBP: u64 = 4;
/// In no loaded object: JIT code, crossed with a frame-pointer step.
const K_JIT: u64 = 5;
const F_BP_SAVED: u64 = 1 << 8;

impl Rule {
    const END: Rule = Rule(K_END);
    const FALLBACK: Rule = Rule(K_FALLBACK);
    const JIT: Rule = Rule(K_JIT);

    /// `bp_off`: where rbp was saved, relative to the CFA. When it was not
    /// saved the slot is the return address's (CFA - 8): the walk loads it
    /// anyway and keeps rbp.
    fn cfa(kind: u64, cfa_off: i64, bp_off: Option<i64>) -> Rule {
        let (Ok(cfa_off), Ok(bp)) = (i32::try_from(cfa_off), i16::try_from(bp_off.unwrap_or(-8)))
        else {
            return Rule::FALLBACK;
        };
        if cfa_off % 8 != 0 || bp % 8 != 0 {
            return Rule::FALLBACK;
        }
        let saved = if bp_off.is_some() { F_BP_SAVED } else { 0 };
        Rule(kind | saved | ((bp as u16 as u64) << 16) | ((cfa_off as u32 as u64) << 32))
    }

    #[inline(always)]
    fn kind(self) -> u64 {
        self.0 & 0xff
    }

    #[inline(always)]
    fn cfa_off(self) -> i64 {
        (self.0 >> 32) as u32 as i32 as i64
    }

    #[inline(always)]
    fn bp_saved(self) -> bool {
        self.0 & F_BP_SAVED != 0
    }

    /// Where rbp is loaded from, relative to the CFA (see `cfa`).
    #[inline(always)]
    fn bp_slot(self) -> i64 {
        (self.0 >> 16) as u16 as i16 as i64
    }
}

/// Translates one row of the CFI table into a rule (after framehop's
/// `translate_into_unwind_rule`).
fn translate<S: UnwindContextStorage<usize>>(row: &UnwindTableRow<usize, S>) -> Rule {
    match row.register(X86_64::RA) {
        RegisterRule::Undefined => return Rule::END,
        RegisterRule::Offset(-8) => {}
        _ => return Rule::FALLBACK,
    }
    let bp_off = match row.register(X86_64::RBP) {
        RegisterRule::Undefined | RegisterRule::SameValue => None,
        RegisterRule::Offset(o) => Some(o),
        _ => return Rule::FALLBACK,
    };
    match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
            Rule::cfa(K_RSP, offset, bp_off)
        }
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
            Rule::cfa(K_RBP, offset, bp_off)
        }
        _ => Rule::FALLBACK,
    }
}

// ---------------------------------------------------------------------------
// The module table

/// One loaded object: its mapped range and unwind sections, in its own
/// memory.
#[derive(Clone, Copy)]
struct Module {
    lo: u64,
    hi: u64,
    hdr: &'static [u8],
    eh_frame: &'static [u8],
}

struct Table {
    /// Bumped on every refresh; per-thread caches remember the one they hold.
    generation: u64,
    /// Sorted by `lo`.
    modules: &'static [Module],
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Our own library's range: its frames are cut from the top of each stack.
static SELF_LO: AtomicUsize = AtomicUsize::new(0);
static SELF_HI: AtomicUsize = AtomicUsize::new(0);
/// `MTRACE_RS_UNWIND=libgcc`: every capture goes to `_Unwind_Backtrace`.
static LIBGCC_ONLY: AtomicBool = AtomicBool::new(true);
static THREAD_KEY: AtomicUsize = AtomicUsize::new(usize::MAX);
/// glibc's `_dl_find_object` (2.35 and later), or 0.
static DL_FIND_OBJECT: AtomicUsize = AtomicUsize::new(0);
/// Captures handed to libgcc by the fast walk (not counting `libgcc` mode):
/// shared, but touched only on that slow path.
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many captures the fast walk handed to libgcc so far.
pub fn fallbacks() -> u64 {
    FALLBACKS.load(Relaxed)
}

/// Sets the unwinder up: learns the loaded objects and our own range, and
/// chooses libgcc for every capture when `libgcc_only`. Call once, as
/// tracer-internal code, before tracing starts.
pub fn init(libgcc_only: bool) {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the
    // global scope. The result is a function pointer or null.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_dl_find_object".as_ptr()) };
    DL_FIND_OBJECT.store(f as usize, Relaxed);
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `thread_exit` matches the destructor signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } == 0 {
        THREAD_KEY.store(key as usize, Relaxed);
    }
    refresh();
    let me = init as *const () as u64;
    if let Some(t) = table() {
        if let Some(m) = find(t.modules, me) {
            SELF_LO.store(m.lo as usize, Relaxed);
            SELF_HI.store(m.hi as usize, Relaxed);
        }
    }
    LIBGCC_ONLY.store(libgcc_only || table().is_none(), Release);
}

fn table() -> Option<&'static Table> {
    let p = TABLE.load(Acquire);
    // SAFETY: published tables are leaked boxes, never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Rescans the loaded objects and publishes a new table. Runs on the writer
/// thread (or in start-up), as tracer-internal code: it allocates.
pub fn refresh() {
    unsafe extern "C" fn cb(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> i32 {
        // SAFETY: `data` is the Vec below; `info` is valid for the call.
        let (out, info) = unsafe { (&mut *(data as *mut Vec<Module>), &*info) };
        if let Some(m) = module_of(info) {
            out.push(m);
        }
        0
    }
    let mut mods: Vec<Module> = Vec::with_capacity(64);
    // SAFETY: `cb` matches the callback type and only touches `mods`.
    unsafe { libc::dl_iterate_phdr(Some(cb), &mut mods as *mut Vec<Module> as *mut c_void) };
    mods.sort_by_key(|m| m.lo);
    let t = Table {
        generation: GENERATION.fetch_add(1, Relaxed) + 1,
        modules: Vec::leak(mods),
    };
    TABLE.store(Box::into_raw(Box::new(t)), Release);
}

/// The unwind sections of a loaded object, from its program headers:
/// PT_GNU_EH_FRAME is `.eh_frame_hdr`, whose `eh_frame_ptr` gives
/// `.eh_frame`'s start; `.eh_frame` ends at the latest at the end of the
/// PT_LOAD segment that holds it.
fn module_of(info: &libc::dl_phdr_info) -> Option<Module> {
    let bias = info.dlpi_addr;
    // SAFETY: dlpi_phdr has dlpi_phnum entries.
    let phdrs = unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    let mut hdr = None;
    for ph in phdrs {
        let start = bias.wrapping_add(ph.p_vaddr);
        if ph.p_type == libc::PT_LOAD {
            lo = lo.min(start);
            hi = hi.max(start + ph.p_memsz);
        } else if ph.p_type == libc::PT_GNU_EH_FRAME {
            hdr = Some((start, ph.p_memsz));
        }
    }
    let (hdr_addr, hdr_len) = hdr?;
    if lo >= hi || hdr_len < 4 {
        return None;
    }
    // SAFETY: PT_GNU_EH_FRAME lies inside a loaded, readable segment.
    let hdr = unsafe { core::slice::from_raw_parts(hdr_addr as *const u8, hdr_len as usize) };
    let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr);
    let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8).ok()?;
    let Pointer::Direct(eh_addr) = parsed.eh_frame_ptr() else {
        return None;
    };
    let seg_end = phdrs
        .iter()
        .filter(|ph| ph.p_type == libc::PT_LOAD)
        .map(|ph| (bias.wrapping_add(ph.p_vaddr), ph.p_memsz))
        .find(|&(s, len)| eh_addr >= s && eh_addr < s + len)
        .map(|(s, len)| s + len)?;
    // SAFETY: [eh_addr, seg_end) is inside the loaded segment that holds it.
    let eh_frame =
        unsafe { core::slice::from_raw_parts(eh_addr as *const u8, (seg_end - eh_addr) as usize) };
    Some(Module {
        lo,
        hi,
        hdr,
        eh_frame,
    })
}

fn find(mods: &[Module], pc: u64) -> Option<&Module> {
    let i = mods.partition_point(|m| m.lo <= pc);
    let m = mods.get(i.checked_sub(1)?)?;
    (pc < m.hi).then_some(m)
}

// ---------------------------------------------------------------------------
// The per-thread cache

/// gimli's row storage, fixed-size: 16 register rules a row (x86_64 code
/// saves at most the 6 callee-saved registers and the return address) and 3
/// remembered states. More makes gimli fail, and the capture uses libgcc.
struct SmallStorage;
impl UnwindContextStorage<usize> for SmallStorage {
    type Rules = [(Register, RegisterRule<usize>); 16];
    type Stack = [UnwindTableRow<usize, Self>; 4];
}

const CACHE_BITS: u32 = 11;
const CACHE_SLOTS: usize = 1 << CACHE_BITS;

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    pc: u64,
    rule: Rule,
}

#[repr(C)]
struct ThreadCache {
    generation: u64,
    stack_lo: usize,
    stack_hi: usize,
    entries: [Entry; CACHE_SLOTS],
    ctx: UnwindContext<usize, SmallStorage>,
    /// The stack reads of the walk in progress, for the memo.
    reads: [(u64, u64); MEMO_READS],
    nreads: usize,
    memo: [Memo; MEMO_SETS * MEMO_WAYS],
    memo_clock: u32,
}

/// A whole walk, memoized exactly. The walk is a pure function of its start
/// registers (ip, sp, bp), the depth asked for, the rules (fixed for one
/// module-table generation) and the stack words it reads; a memo holds all of
/// those and the interned stack id it produced. If every recorded word still
/// holds its recorded value, the walk would read the same words in the same
/// order and produce the same stack, so its id is returned without walking
/// or interning again: two loads and compares per frame instead of a rule
/// lookup, and no hashing of the stack. (Programs allocate from few call
/// paths, over and over, at the same stack depths.)
#[derive(Clone, Copy)]
#[repr(C)]
struct Memo {
    sp: u64,
    bp: u64,
    generation: u64,
    depth: u32,
    id: u32,
    nreads: u32,
    used: u32,
    reads: [(u64, u64); MEMO_READS],
}

/// Two reads a frame (return address, saved rbp) for up to 64 frames.
const MEMO_READS: usize = 128;
const MEMO_SETS: usize = 32;
const MEMO_WAYS: usize = 4;

// The calling thread's cache pointer: 0 not yet made, 1 cannot be made
// (use libgcc), otherwise the mapping. Zeroed initial-exec TLS, like the
// tracer's own `Tls`.
core::arch::global_asm!(
    ".section .tbss,\"awT\",@nobits",
    ".p2align 3",
    ".globl mtrace_rs_unwind_tls",
    ".hidden mtrace_rs_unwind_tls",
    ".type mtrace_rs_unwind_tls, @object",
    ".size mtrace_rs_unwind_tls, 8",
    "mtrace_rs_unwind_tls:",
    ".zero 8",
    ".text",
);

#[inline(always)]
fn tls_slot() -> *mut usize {
    let p: *mut usize;
    // SAFETY: the initial-exec TLS access sequence for `mtrace_rs_unwind_tls`
    // (see `tracer::TlsKey`).
    unsafe {
        core::arch::asm!(
            "mov {p}, qword ptr [rip + mtrace_rs_unwind_tls@GOTTPOFF]",
            "add {p}, qword ptr fs:[0]",
            p = out(reg) p,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    p
}

const NO_CACHE: usize = 1;

#[inline(always)]
fn thread_cache() -> Option<&'static mut ThreadCache> {
    // SAFETY: the slot is this thread's 8 bytes of TLS.
    let v = unsafe { *tls_slot() };
    if v > NO_CACHE {
        // SAFETY: a mapping made by `make_cache` for this thread, used only
        // by it, and not re-entered: the tracer's guard keeps captures on one
        // thread from nesting.
        return Some(unsafe { &mut *(v as *mut ThreadCache) });
    }
    if v == NO_CACHE {
        return None;
    }
    make_cache()
}

#[cold]
#[inline(never)]
fn make_cache() -> Option<&'static mut ThreadCache> {
    let slot = tls_slot();
    // Mark first: whatever happens below, this thread tries once.
    // SAFETY: this thread's TLS slot.
    unsafe { *slot = NO_CACHE };
    let (lo, hi) = stack_bounds()?;
    let p = sys::map_anon(core::mem::size_of::<ThreadCache>()) as *mut ThreadCache;
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a fresh, zeroed, writable mapping of the right size;
    // all-zero is valid for every field but `ctx`, which is written here.
    let c = unsafe {
        core::ptr::addr_of_mut!((*p).ctx).write(UnwindContext::new_in());
        (*p).stack_lo = lo;
        (*p).stack_hi = hi;
        &mut *p
    };
    let key = THREAD_KEY.load(Relaxed);
    if key != usize::MAX {
        // SAFETY: a key from pthread_key_create; the destructor unmaps `p`.
        // As tracer-internal code: glibc may allocate for high key numbers.
        tracer::with_internal(|| unsafe {
            libc::pthread_setspecific(key as libc::pthread_key_t, p as *const c_void)
        });
    }
    // SAFETY: this thread's TLS slot.
    unsafe { *slot = p as usize };
    Some(c)
}

/// The calling thread's stack bounds as the unwinder knows them (for the
/// frame-pointer walk of `MTRACE_RS_UNWIND=fp`).
pub fn thread_stack() -> Option<(usize, usize)> {
    thread_cache().map(|c| (c.stack_lo, c.stack_hi))
}

/// The calling thread's stack, [lo, hi): the mapping in /proc/self/maps
/// that holds the stack pointer.
///
/// Not `pthread_getattr_np`: it holds the thread's own lock while it calls
/// malloc, so calling it from a malloc hook deadlocks (the JVM calls it on
/// every new thread). Reading the maps takes raw system calls only. Where
/// the kernel merged the stack with an adjacent mapping of the same
/// protection, `hi` lies beyond the real top: still mapped, readable memory.
fn stack_bounds() -> Option<(usize, usize)> {
    // An address in this frame: on the thread's stack.
    let probe = 0u8;
    let sp = core::hint::black_box(&probe) as *const u8 as usize;
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 4096];
    let mut have = 0usize;
    let mut found = None;
    'read: loop {
        // SAFETY: reads into the free tail of `buf`.
        let n = unsafe {
            libc::read(
                fd,
                buf.as_mut_ptr().add(have) as *mut c_void,
                buf.len() - have,
            )
        };
        if n <= 0 {
            break;
        }
        have += n as usize;
        let mut start = 0;
        while let Some(nl) = buf[start..have].iter().position(|&b| b == b'\n') {
            if let Some((lo, hi)) = parse_range(&buf[start..start + nl]) {
                if sp >= lo && sp < hi {
                    found = Some((lo, hi));
                    break 'read;
                }
            }
            start += nl + 1;
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            break; // a line longer than the buffer: give up
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    found
}

/// "start-end ..." in hex, from a /proc/self/maps line.
fn parse_range(line: &[u8]) -> Option<(usize, usize)> {
    let mut v = [0usize; 2];
    let mut i = 0;
    for (k, sep) in [b'-', b' '].into_iter().enumerate() {
        let mut n = 0usize;
        let mut digits = 0;
        while i < line.len() && line[i] != sep {
            let d = (line[i] as char).to_digit(16)? as usize;
            n = n.checked_mul(16)?.checked_add(d)?;
            i += 1;
            digits += 1;
        }
        if digits == 0 || i >= line.len() {
            return None;
        }
        i += 1;
        v[k] = n;
    }
    Some((v[0], v[1]))
}

unsafe extern "C" fn thread_exit(arg: *mut c_void) {
    let slot = tls_slot();
    // SAFETY: this thread's TLS slot; `arg` is the thread's cache mapping,
    // which nothing uses once the slot no longer points at it (the thread
    // makes a new one if it allocates again in a later destructor).
    unsafe {
        if *slot == arg as usize {
            *slot = 0;
        }
        libc::munmap(arg, core::mem::size_of::<ThreadCache>());
    }
}

#[inline(always)]
fn slot_of(pc: u64) -> usize {
    // A shift and an xor, not a multiply: the hash is on the walk's
    // critical path (load return address, hash, load rule, load the next).
    (pc ^ (pc >> CACHE_BITS)) as usize & (CACHE_SLOTS - 1)
}

#[cold]
#[inline(never)]
fn compute(c: &mut ThreadCache, t: &Table, pc: u64) -> Rule {
    let Some(m) = find(t.modules, pc) else {
        return if in_loader(pc) {
            // Loaded after the table was built; the next refresh knows it.
            Rule::FALLBACK
        } else {
            Rule::JIT
        };
    };
    let bases = BaseAddresses::default()
        .set_eh_frame_hdr(m.hdr.as_ptr() as u64)
        .set_eh_frame(m.eh_frame.as_ptr() as u64);
    let Ok(hdr) = EhFrameHdr::new(m.hdr, LittleEndian).parse(&bases, 8) else {
        return Rule::FALLBACK;
    };
    let Some(table) = hdr.table() else {
        return Rule::FALLBACK;
    };
    let eh: EhFrame<Slice> = EhFrame::new(m.eh_frame, LittleEndian);
    match table.unwind_info_for_address(&eh, &bases, &mut c.ctx, pc, EhFrame::cie_from_offset) {
        Ok(row) => translate(row),
        Err(gimli::Error::NoUnwindInfoForAddress) => Rule::END,
        Err(_) => Rule::FALLBACK,
    }
}

/// Whether the dynamic loader knows an object at `pc` (lock-free, via
/// `_dl_find_object`). Without that function, nothing is known.
fn in_loader(pc: u64) -> bool {
    let f = DL_FIND_OBJECT.load(Relaxed);
    if f == 0 {
        return false;
    }
    type FindObject = unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32;
    // SAFETY: `f` is glibc's `_dl_find_object`, found by dlsym.
    let f: FindObject = unsafe { core::mem::transmute::<usize, FindObject>(f) };
    // struct dl_find_object is 12 words in glibc 2.35-2.40; leave room.
    let mut out = [0u64; 32];
    // SAFETY: `out` is larger than `struct dl_find_object`.
    unsafe { f(pc as *mut c_void, out.as_mut_ptr() as *mut c_void) == 0 }
}

// ---------------------------------------------------------------------------
// The walk

/// Fills `out` with the calling program's return addresses, innermost first,
/// the tracer's own frames removed; returns the count. Same contract and
/// same addresses as `stacks::capture_dwarf`, which it falls back to when
/// the cached rules cannot do the walk.
#[inline(never)]
pub fn capture(out: &mut [u64]) -> usize {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers; `ip` is the address of the next
    // instruction, whose CFI row describes this very frame with this rsp.
    unsafe {
        core::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    if !LIBGCC_ONLY.load(Acquire) {
        if let (Some(c), Some(t)) = (thread_cache(), table()) {
            if let Some(n) = walk(c, t, ip, sp, bp, out) {
                return n;
            }
        }
        FALLBACKS.fetch_add(1, Relaxed);
    }
    stacks::capture_dwarf(out)
}

/// Captures the calling program's stack, at most `depth` frames, and
/// returns its interned id (`intern` turns frames into an id), using the memo
/// of whole walks when the stack is one seen before. A memo hit touches no
/// frame buffer at all: the buffer is made (and zeroed) only for a walk.
#[inline(never)]
pub fn capture_interned(depth: usize, intern: impl FnOnce(&[u64]) -> u32) -> u32 {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers, as in `capture`.
    unsafe {
        core::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    let _ = ip;
    let depth = depth.clamp(1, MAX_DEPTH);
    if !LIBGCC_ONLY.load(Acquire) {
        if let (Some(c), Some(t)) = (thread_cache(), table()) {
            let set = memo_set(sp, bp);
            if let Some(id) = memo_lookup(c, t, set, sp, bp, depth) {
                return id;
            }
            return walk_and_intern(c, t, ip, sp, bp, depth, set, intern);
        }
    }
    capture_dwarf_and_intern(depth, intern)
}

/// A memo miss: walks (or falls back to libgcc), interns, and remembers the
/// walk.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn walk_and_intern(
    c: &mut ThreadCache,
    t: &'static Table,
    ip: u64,
    sp: u64,
    bp: u64,
    depth: usize,
    set: usize,
    intern: impl FnOnce(&[u64]) -> u32,
) -> u32 {
    let mut frames = [0u64; MAX_DEPTH];
    let out = &mut frames[..depth];
    if let Some(n) = walk(c, t, ip, sp, bp, out) {
        let id = intern(&out[..n]);
        memo_store(c, t, set, sp, bp, depth, id);
        return id;
    }
    FALLBACKS.fetch_add(1, Relaxed);
    capture_dwarf_and_intern(depth, intern)
}

#[inline(never)]
fn capture_dwarf_and_intern(depth: usize, intern: impl FnOnce(&[u64]) -> u32) -> u32 {
    let mut frames = [0u64; MAX_DEPTH];
    let n = stacks::capture_dwarf(&mut frames[..depth]);
    intern(&frames[..n])
}

#[inline(always)]
fn memo_set(sp: u64, bp: u64) -> usize {
    (((sp >> 4) ^ (bp >> 3)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 59) as usize % MEMO_SETS
}

/// The id of a memoized walk whose recorded reads all still hold.
#[inline(always)]
fn memo_lookup(
    c: &mut ThreadCache,
    t: &Table,
    set: usize,
    sp: u64,
    bp: u64,
    depth: usize,
) -> Option<u32> {
    'ways: for w in 0..MEMO_WAYS {
        let m = &c.memo[set * MEMO_WAYS + w];
        if m.id == 0
            || m.sp != sp
            || m.bp != bp
            || m.depth as usize != depth
            || m.generation != t.generation
        {
            continue;
        }
        for &(addr, value) in &m.reads[..m.nreads as usize] {
            // SAFETY: `addr` was read by a walk from this same stack pointer
            // on this thread: an aligned word in [sp, stack top), which is
            // still this thread's live stack now that sp is the same.
            if unsafe { core::ptr::read_volatile(addr as *const u64) } != value {
                continue 'ways;
            }
        }
        c.memo_clock = c.memo_clock.wrapping_add(1);
        let clock = c.memo_clock;
        let m = &mut c.memo[set * MEMO_WAYS + w];
        m.used = clock;
        return Some(m.id);
    }
    None
}

/// Remembers the walk just done (its reads are in `c.reads`), replacing the
/// least recently used way of its set.
fn memo_store(c: &mut ThreadCache, t: &Table, set: usize, sp: u64, bp: u64, depth: usize, id: u32) {
    if id == 0 || c.nreads > MEMO_READS {
        return;
    }
    let base = set * MEMO_WAYS;
    let victim = (0..MEMO_WAYS)
        .min_by_key(|&w| c.memo[base + w].used)
        .unwrap_or(0);
    c.memo_clock = c.memo_clock.wrapping_add(1);
    let n = c.nreads;
    let m = &mut c.memo[base + victim];
    m.sp = sp;
    m.bp = bp;
    m.generation = t.generation;
    m.depth = depth as u32;
    m.id = id;
    m.nreads = n as u32;
    m.used = c.memo_clock;
    m.reads[..n].copy_from_slice(&c.reads[..n]);
}

/// The cached walk; `None` when it must be done by libgcc.
///
/// The loop is one dependent chain per frame (load the return address, hash
/// it, load the rule, add): the common rules take no data-dependent branch,
/// and rbp is always loaded (from the return-address slot when the rule
/// leaves it alone) and then selected.
#[inline(always)]
fn walk(
    c: &mut ThreadCache,
    t: &'static Table,
    ip: u64,
    mut sp: u64,
    mut bp: u64,
    out: &mut [u64],
) -> Option<usize> {
    let hi = c.stack_hi as u64;
    // On a signal stack (or a stack we do not know): libgcc.
    if sp < c.stack_lo as u64 || sp >= hi || sp & 7 != 0 || out.is_empty() {
        return None;
    }
    if c.generation != t.generation {
        c.entries.fill(Entry {
            pc: 0,
            rule: Rule(0),
        });
        c.generation = t.generation;
    }
    c.nreads = 0;
    // Every read lies in [lo, hi - 8], 8-aligned: the part of this thread's
    // stack at and above the capture's own frame, all of it mapped.
    let lo = sp;
    let span = hi - 8 - lo;
    let (self_lo, self_hi) = (SELF_LO.load(Relaxed) as u64, SELF_HI.load(Relaxed) as u64);
    let mut n = 0;
    // The cache is keyed by the frame's address as found (the return address,
    // or `ip` for the first frame); the rule is that of `ra - 1`, inside the
    // call instruction, as in libgcc.
    let mut lookup = ip;
    let mut skipping = true;
    let mut crossed_jit = false;
    // The stack word the current rbp was restored from, not yet among the
    // reads the memo checks; (0, 0) when it is the starting register (part
    // of the memo's key) or already recorded. It is recorded only when a
    // frame uses rbp: a program built without frame pointers leaves
    // arbitrary values in rbp, which the hooks' first frame saves, and a
    // walk that checked them would never be found in the memo again.
    let mut bp_src = (0u64, 0u64);
    loop {
        let e = c.entries[slot_of(lookup)];
        let r = if e.pc == lookup {
            e.rule
        } else {
            miss(c, t, lookup, lookup != ip)
        };
        let k = r.kind();
        if (k == K_RBP || k == K_JIT) && bp_src.0 != 0 {
            if c.nreads < MEMO_READS {
                c.reads[c.nreads] = bp_src;
            }
            c.nreads += 1;
            bp_src = (0, 0);
        }
        let (cfa, bp_at) = if k.wrapping_sub(K_RSP) <= K_RBP - K_RSP {
            let base = if k == K_RBP { bp } else { sp };
            let cfa = base.wrapping_add(r.cfa_off() as u64);
            (cfa, cfa.wrapping_add(r.bp_slot() as u64))
        } else if k == K_JIT {
            // One frame-pointer step: [rbp] = caller's rbp, [rbp+8] = ra.
            crossed_jit = true;
            (bp.wrapping_add(16), bp)
        } else if k == K_END {
            break;
        } else {
            // K_FALLBACK. After frame-pointer steps through JIT code the pc
            // may be garbage read from a frame without a frame pointer: keep
            // what we have (libgcc would stop at the first JIT frame anyway).
            // Otherwise libgcc does it all.
            return crossed_jit.then_some(n);
        };
        let ra_at = cfa.wrapping_sub(8);
        // The caller's frame lies above this one (the walk always moves up
        // the stack, so it ends), and both loads are in bounds.
        let ok = (cfa > sp)
            & (ra_at.wrapping_sub(lo) <= span)
            & (bp_at.wrapping_sub(lo) <= span)
            & ((cfa | bp_at) & 7 == 0);
        if !ok {
            break;
        }
        // SAFETY: both addresses were checked above: aligned words inside
        // the live part of the current thread's stack.
        let (ra, saved_bp) = unsafe {
            (
                core::ptr::read_volatile(ra_at as *const u64),
                core::ptr::read_volatile(bp_at as *const u64),
            )
        };
        if c.nreads < MEMO_READS {
            c.reads[c.nreads] = (ra_at, ra);
        }
        c.nreads += 1;
        if ra == 0 {
            break;
        }
        sp = cfa;
        if r.bp_saved() || k == K_JIT {
            bp = saved_bp;
            bp_src = (bp_at, saved_bp);
        }
        lookup = ra;
        if skipping {
            if ra >= self_lo && ra < self_hi {
                continue;
            }
            skipping = false;
        }
        out[n] = ra;
        n += 1;
        if n >= out.len() {
            break;
        }
    }
    Some(n)
}

/// A cache miss: computes the rule and fills the slot.
#[cold]
#[inline(never)]
fn miss(c: &mut ThreadCache, t: &Table, pc: u64, is_return_address: bool) -> Rule {
    let r = compute(c, t, pc - is_return_address as u64);
    c.entries[slot_of(pc)] = Entry { pc, rule: r };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPTH: usize = 64;

    #[inline(never)]
    fn both() -> (Vec<u64>, Vec<u64>) {
        let mut fast = [0u64; DEPTH];
        let nf = capture(&mut fast);
        let mut slow = [0u64; DEPTH];
        let ns = stacks::capture_dwarf(&mut slow);
        core::hint::black_box(());
        (fast[..nf].to_vec(), slow[..ns].to_vec())
    }

    #[inline(never)]
    fn chain(k: u32) -> (Vec<u64>, Vec<u64>) {
        let r = if k == 0 {
            both()
        } else {
            chain(core::hint::black_box(k - 1))
        };
        core::hint::black_box(k);
        r
    }

    #[inline(never)]
    fn other(k: u32) -> (Vec<u64>, Vec<u64>) {
        let r = chain(core::hint::black_box(k));
        core::hint::black_box(&r);
        r
    }

    fn setup() {
        init(false);
        assert!(!LIBGCC_ONLY.load(Relaxed));
        // In the test binary "self" is everything: cut nothing.
        SELF_LO.store(0, Relaxed);
        SELF_HI.store(0, Relaxed);
    }

    /// libgcc's first frame is the return into `capture_dwarf`'s caller
    /// (`both`) at the second call site; ours is the return into `both` at
    /// the first. From the frame after that, the two must be identical.
    fn check(fast: &[u64], slow: &[u64]) {
        assert!(fast.len() >= 8, "fast walk too short: {fast:x?}");
        assert_eq!(&fast[1..], &slow[2..], "fast {fast:x?}\nlibgcc {slow:x?}");
        assert!(slow[1] > fast[0] && slow[1] - fast[0] < 256);
    }

    #[test]
    fn the_fast_walk_agrees_with_libgcc() {
        setup();
        for _ in 0..3 {
            // Cold, then warm cache.
            let (f, s) = other(6);
            check(&f, &s);
            let (f, s) = chain(11);
            check(&f, &s);
        }
        assert_eq!(fallbacks(), 0);
    }

    #[test]
    fn the_fast_walk_agrees_with_libgcc_on_new_threads() {
        setup();
        let h = std::thread::spawn(|| {
            let (f, s) = other(3);
            check(&f, &s);
            refresh();
            let (f, s) = chain(9);
            check(&f, &s);
        });
        h.join().unwrap();
    }

    #[test]
    fn rules_round_trip() {
        let r = Rule::cfa(K_RSP, 0x1_0008, Some(-16));
        let got = (r.kind(), r.cfa_off(), r.bp_saved(), r.bp_slot());
        assert_eq!(got, (K_RSP, 0x1_0008, true, -16));
        let r = Rule::cfa(K_RBP, 16, None);
        let got = (r.kind(), r.cfa_off(), r.bp_saved(), r.bp_slot());
        assert_eq!(got, (K_RBP, 16, false, -8));
        assert_eq!(Rule::cfa(K_RSP, 12, None), Rule::FALLBACK);
        assert_eq!(Rule::cfa(K_RSP, 1 << 40, None), Rule::FALLBACK);
    }

    #[inline(never)]
    fn bench_at(k: u32, f: fn(&mut [u64]) -> usize, iters: u32) -> (f64, usize) {
        if k > 0 {
            let r = bench_at(core::hint::black_box(k - 1), f, iters);
            core::hint::black_box(k);
            return r;
        }
        let mut buf = [0u64; DEPTH];
        let mut n = f(&mut buf);
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            n = f(core::hint::black_box(&mut buf));
        }
        (t0.elapsed().as_nanos() as f64 / iters as f64, n)
    }

    /// `cargo test --release -p mtrace-preload -- --ignored --nocapture bench`
    #[test]
    #[ignore]
    fn bench_capture() {
        setup();
        for extra in [0u32, 5, 10] {
            let (fast, nf) = bench_at(extra, capture, 200_000);
            let (slow, ns) = bench_at(extra, stacks::capture_dwarf, 200_000);
            println!(
                "depth {nf:3}: fast {fast:6.1} ns/capture, libgcc {slow:6.1} ns/capture (depth {ns})"
            );
        }
    }
}
