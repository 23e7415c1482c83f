//! Sampled mode under glibc: glibc's own `free` tells the candidates for a
//! sampled block apart, glibc's own `malloc` and `calloc` charge the
//! sampling countdown, and the program calls them directly.
//!
//! Interposition has a price of its own, whatever the hook does: each call
//! takes one more jump, into the preloaded object and on to glibc. Same-core
//! pairs of the 1-thread churn (benches/pair.py) put it at 0.6-0.7% of the
//! run's CPU time for a forwarder that does nothing else, a third of it
//! free's (the churn frees a block in 83 iterations of 100) and half of it
//! malloc's.
//!
//! **free.** Its whole job in sampled mode is one test of the pointer, and
//! glibc's free starts with a test of the pointer too (`if (mem == 0)
//! return;`), so the two can be one: where glibc's first bytes are the shape
//! we know, they are rewritten from
//!
//! ```text
//!     test %rdi,%rdi ; je <ret>           48 85 ff  0f 84 rel32
//! ```
//!
//! to
//!
//! ```text
//!     test $0xffef,%edi ; je <pad>        40 f7 c7 ef ff 00 00  74 f0
//! ```
//!
//! where `<pad>`, the seven bytes of padding just before the function
//! (after a call to glibc's assertion handler, which does not return),
//! becomes `jmp rel32` to `api::free_slow`. The test is the free hook's
//! (`sampled::CANDIDATE_MASK`): NULL and the candidates (an ordinary block
//! once in 2048) go to the slow path, which returns for NULL and forwards an
//! ordinary block past the test (`real::FREE` then holds the instruction
//! after it); everything else runs glibc's free as before, with no
//! instruction more.
//!
//! **malloc.** Its hook charges the size to the thread's countdown and goes
//! on to glibc's malloc, which starts with two checks of its own after its
//! prologue: `__malloc_initialized` (set by its first call, never cleared)
//! and a size of 2^63 or more (ENOMEM). Those 22 bytes become the hook's
//! countdown, `sub %rbx,%fs:off; jbe <stub>` and a 7-byte nop (the hook's
//! three instructions in place of glibc's four). The stub (`malloc_sample`)
//! puts the charge back, takes glibc's frame down and goes to the hook's
//! slow path, whose size check a size of 2^63 or more reaches as well (it
//! always takes the slow path). The calls that must not charge the countdown
//! (the hook's own, which charged it already, and the tracer's) go to
//! `malloc_unsampled`, the prologue and the size check again, then glibc
//! past the rewritten bytes (`real::MALLOC`). glibc calls its malloc itself
//! from `memalign` and `posix_memalign` (an alignment of at most 16) and
//! from `realloc`: the aligned hooks then hand those alignments to their
//! relays uncharged (`api::RELAY_ALIGN`), which call glibc's malloc from the
//! tracer's frame (so that a sample keeps the program's stack), and realloc
//! of NULL goes to the malloc hook as before. What glibc's realloc still
//! does itself, calling malloc when `mremap` fails on a mapped block or an
//! arena is out of memory, is charged twice: a higher chance of a sample
//! for those rare blocks.
//!
//! **calloc.** The same: after its prologue (which multiplies the two
//! arguments) glibc checks the product (an overflow, 2^63 or more) and
//! `__malloc_initialized`, 40 bytes that become `mov %rax,%rbx; jo <fail>`,
//! the countdown (which sends 2^63 or more to the slow path, and on to
//! glibc's checks) and 16 bytes of nops. glibc does not call its calloc
//! itself.
//!
//! Then the PLT slots for `free`, `malloc` and `calloc` of the objects
//! loaded at start-up are pointed at glibc's functions instead of our hooks
//! (`rebind`). The hooks stay, and stay right, for whatever still reaches
//! them: free's test is the same, and it jumps past glibc's; malloc's and
//! calloc's charge the countdown and go past glibc's. That is objects loaded
//! later, an object that takes the function's address (it calls through
//! that address's GOT slot, which must hold the same address in every
//! object), and function pointers taken before; objects of another
//! namespace (`LD_AUDIT`, `dlmopen`), which may have a C library of their
//! own, are left alone.
//!
//! Nothing is rewritten unless every condition holds: sampled mode (exact
//! mode sees every call), glibc is the next allocator and the program's
//! function is ours, one thread, the bytes are what we expect (glibc 2.36
//! as Debian 12 builds it), the jumps reach, the system lets us write the
//! code (W^X policies may not), and `MTRACE_RS_DETOUR` is not 0. Otherwise
//! the interposed hooks do the work, as everywhere else. Under Valgrind,
//! which runs its own translations of code that has run, the rewrite asks
//! it to drop them (`sys::discard_translations`): glibc's free may have run
//! before the tracer's constructor (another library's constructor frees a
//! block).

use core::ffi::c_void;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::*};

use crate::{api, real, sampled, sys};

/// The test's immediate is the free hook's mask (zero-extended to 32 bits).
const _: () = assert!(sampled::CANDIDATE_MASK == 0xffef);

/// glibc's free: `test %rdi,%rdi; je rel32` (its NULL check), preceded by
/// `call rel32` (the assertion handler of the function before it) and a
/// 7-byte `nopl 0x0(%rax)` of padding, in hex; `??` is any byte.
const FREE_BEFORE: &str = "e8 ?? ?? ?? ?? 0f 1f 80 00 00 00 00 48 85 ff 0f 84 ?? ?? ?? ??";
/// Where glibc's entry is in `FREE_BEFORE`.
const FREE_AT: usize = 12;
/// The bytes of the new test at the entry (9, as many as it replaces):
/// `test $0xffef,%edi; je -16`, the test with an empty REX prefix (`40`),
/// which makes it 7 bytes long and the two instructions fill the 9 with no
/// `nop` to run (a 16-bit test and a `nop` did, once a free).
const FREE_TEST: [u8; 9] = [0x40, 0xf7, 0xc7, 0xef, 0xff, 0x00, 0x00, 0x74, 0xf0];

/// Whether `code` is `pattern`: bytes in hex, separated by spaces, `??`
/// for any byte.
fn matches(code: &[u8], pattern: &str) -> bool {
    let mut want = pattern.split(' ');
    code.iter().all(|&b| {
        want.next()
            .is_some_and(|w| w == "??" || u8::from_str_radix(w, 16) == Ok(b))
    }) && want.next().is_none()
}

/// How many bytes `pattern` (as for [`matches`]) describes.
fn pattern_len(pattern: &str) -> usize {
    pattern.split(' ').count()
}

/// The executable segment of a loaded object holding `addr`, as
/// `(start, end)`.
fn exec_segment(addr: usize) -> Option<(usize, usize)> {
    let mut found = None;
    sys::each_object(|info, phdrs| {
        found = phdrs
            .iter()
            .filter(|ph| ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0)
            .map(|ph| {
                let s = (info.dlpi_addr + ph.p_vaddr) as usize;
                (s, s + ph.p_memsz as usize)
            })
            .find(|&(s, e)| addr >= s && addr < e);
        found.is_some()
    });
    found
}

/// Rewrites glibc's free as above; true if it did. The caller checks the
/// mode, the allocator and the thread count.
pub fn free() -> bool {
    let hook = api::free as *const () as usize;
    // SAFETY: dlsym with a NUL-terminated name.
    let bound = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"free".as_ptr()) } as usize;
    if bound != hook {
        // The program's free is not ours (another allocator ahead of us, or
        // an executable that takes free's address): leave it all alone.
        return false;
    }
    let entry = real::FREE.load(Acquire) as usize;
    let start = entry.wrapping_sub(FREE_AT);
    let Some((lo, hi)) = exec_segment(entry) else {
        return false;
    };
    if start < lo || entry + 16 > hi {
        return false;
    }
    // SAFETY: inside the executable segment, checked just above.
    let code = unsafe { core::slice::from_raw_parts(start as *const u8, pattern_len(FREE_BEFORE)) };
    if !matches(code, FREE_BEFORE) {
        return false;
    }
    // The NULL check's target must be a bare `ret`: NULL then costs the
    // slow path nothing it would not have done.
    let rel = i32::from_le_bytes([code[17], code[18], code[19], code[20]]);
    let ret = (entry + 9).wrapping_add(rel as isize as usize);
    // SAFETY: glibc's code, in its segment.
    if ret < lo || ret >= hi || unsafe { *(ret as *const u8) } != 0xc3 {
        return false;
    }
    let pad = entry - 7;
    let slow = api::free_slow as *const () as usize;
    let Ok(d) = i32::try_from((slow as i64).wrapping_sub(pad as i64 + 5)) else {
        return false;
    };
    let mut jump = [0xe9, 0, 0, 0, 0, 0xcc, 0xcc];
    jump[1..5].copy_from_slice(&d.to_le_bytes());
    // SAFETY: one thread (the caller's check); the padding is not run, and
    // nothing runs glibc's free while it changes.
    if !unsafe { crate::patch::write_code(&[(pad, &jump), (entry, &FREE_TEST)]) } {
        return false;
    }
    real::FREE.store((entry + FREE_TEST.len()) as *mut (), Release);
    rebind(b"free", hook, entry);
    true
}

/// glibc's malloc (`__libc_malloc`), its first 33 bytes in hex as for
/// [`matches`]: the prologue (`push %r12; push %rbp; push %rbx; mov
/// %rdi,%rbx; sub $0x10,%rsp`), then its two checks, `cmpb
/// $0,__malloc_initialized(%rip); je <init>` and `test %rbx,%rbx; js <fail>`
/// (a size of 2^63 or more fails with ENOMEM).
const MALLOC_START: &str = "41 54 55 53 48 89 fb 48 83 ec 10 \
    80 3d ?? ?? ?? ?? 00 0f 84 ?? ?? ?? ?? 48 85 db 0f 88 ?? ?? ?? ??";

/// glibc's calloc (`__libc_calloc`), its first 56 bytes: the prologue
/// (`push %r13; mov %rdi,%rax; push %r12; push %rbp; push %rbx; sub
/// $0x18,%rsp; mul %rsi`), then its checks of the product: `mov %rax,%rbx;
/// seto %al; test %rbx,%rbx; js <fail>; movzbl %al,%eax; test %rax,%rax;
/// jne <fail>` (an overflow, or 2^63 or more), and `cmpb
/// $0,__malloc_initialized(%rip); je <init>`.
const CALLOC_START: &str = "41 55 48 89 f8 41 54 55 53 48 83 ec 18 48 f7 e6 \
    48 89 c3 0f 90 c0 48 85 db 0f 88 ?? ?? ?? ?? 0f b6 c0 48 85 c0 0f 85 ?? ?? ?? ?? \
    80 3d ?? ?? ?? ?? 00 0f 84 ?? ?? ?? ??";

/// Where glibc's malloc and calloc go on after their checks (their entry
/// plus the pattern's length), and where their size checks send a size of
/// 2^63 or more (or calloc's overflow).
static MALLOC_GO_ON: AtomicUsize = AtomicUsize::new(0);
static MALLOC_FAIL: AtomicUsize = AtomicUsize::new(0);
static CALLOC_GO_ON: AtomicUsize = AtomicUsize::new(0);
static CALLOC_FAIL: AtomicUsize = AtomicUsize::new(0);
/// glibc's malloc entry, once rewritten: the calls that should charge the
/// countdown (`charged_malloc`).
static MALLOC_CHARGED: AtomicUsize = AtomicUsize::new(0);

/// Allocates through glibc's rewritten malloc, which charges the countdown
/// and may take a sample, as a call from the program would. Only once
/// `malloc` has rewritten it (the aligned allocators' relays, reached only
/// then).
///
/// # Safety
/// As C's `malloc`.
pub unsafe fn charged_malloc(size: usize) -> *mut c_void {
    let f = MALLOC_CHARGED.load(Acquire);
    debug_assert!(f != 0);
    // SAFETY: glibc's malloc entry.
    unsafe { core::mem::transmute::<usize, unsafe extern "C" fn(usize) -> *mut c_void>(f)(size) }
}

/// glibc's malloc as it was, for the calls that must not charge the
/// countdown (the hook's, after it charged it, and the tracer's own): the
/// prologue and the size check here, the rest in glibc past the rewritten
/// bytes. (`__malloc_initialized` is set before the rewrite and stays set.)
#[unsafe(naked)]
unsafe extern "C" fn malloc_unsampled(size: usize) -> *mut c_void {
    core::arch::naked_asm!(
        "push r12",
        "push rbp",
        "push rbx",
        "mov rbx, rdi",
        "sub rsp, 16",
        "test rbx, rbx",
        "js 2f",
        "jmp qword ptr [rip + {go_on}]",
        "2:",
        "jmp qword ptr [rip + {fail}]",
        go_on = sym MALLOC_GO_ON,
        fail = sym MALLOC_FAIL,
    )
}

/// glibc's calloc as it was, as `malloc_unsampled` is malloc.
#[unsafe(naked)]
unsafe extern "C" fn calloc_unsampled(n: usize, size: usize) -> *mut c_void {
    core::arch::naked_asm!(
        "push r13",
        "mov rax, rdi",
        "push r12",
        "push rbp",
        "push rbx",
        "sub rsp, 24",
        "mul rsi",
        "mov rbx, rax",
        "seto al",
        "test rbx, rbx",
        "js 2f",
        "movzx eax, al",
        "test rax, rax",
        "jne 2f",
        "jmp qword ptr [rip + {go_on}]",
        "2:",
        "jmp qword ptr [rip + {fail}]",
        go_on = sym CALLOC_GO_ON,
        fail = sym CALLOC_FAIL,
    )
}

/// Where glibc's rewritten malloc goes when its countdown reaches the
/// sample point (or the size is absurd): the countdown is put back, glibc's
/// frame taken down, and the hook's slow path called as the program called
/// malloc (`rdi` is still the size; glibc's prologue only copied it).
#[unsafe(naked)]
unsafe extern "C" fn malloc_sample() {
    core::arch::naked_asm!(
        "mov rax, qword ptr [rip + mtrace_rs_tls@GOTTPOFF]",
        "add qword ptr fs:[rax], rbx",
        "add rsp, 16",
        "pop rbx",
        "pop rbp",
        "pop r12",
        "jmp {slow}",
        slow = sym api::malloc_slow,
    )
}

/// calloc's, as `malloc_sample` is malloc's (`rdi` and `rsi` are still the
/// program's: the prologue copied one and multiplied by the other).
#[unsafe(naked)]
unsafe extern "C" fn calloc_sample() {
    core::arch::naked_asm!(
        "mov rax, qword ptr [rip + mtrace_rs_tls@GOTTPOFF]",
        "add qword ptr fs:[rax], rbx",
        "add rsp, 24",
        "pop rbx",
        "pop rbp",
        "pop r12",
        "pop r13",
        "jmp {slow}",
        slow = sym api::calloc_checked,
    )
}

/// The offset of the thread's countdown from the thread pointer, as the
/// hooks load it.
#[unsafe(naked)]
extern "C" fn countdown_offset() -> isize {
    core::arch::naked_asm!("mov rax, qword ptr [rip + mtrace_rs_tls@GOTTPOFF]", "ret")
}

/// `rel32` for a jump whose displacement ends at `end` to reach `to`.
fn rel32(end: usize, to: usize) -> Option<[u8; 4]> {
    i32::try_from((to as i64).wrapping_sub(end as i64))
        .ok()
        .map(i32::to_le_bytes)
}

/// The countdown in glibc's code at `at`: `sub %rbx,%fs:off` (the size in
/// `rbx`, charged in place as the hooks do) and `jbe rel32` to `stub` (the
/// sample point reached, or a size of 2^63 or more), 15 bytes.
fn countdown_at(at: usize, off: i32, stub: usize) -> Option<Vec<u8>> {
    let mut b = vec![0x64, 0x48, 0x29, 0x1c, 0x25];
    b.extend_from_slice(&off.to_le_bytes());
    b.extend_from_slice(&[0x0f, 0x86]);
    b.extend_from_slice(&rel32(at + 15, stub)?);
    Some(b)
}

/// A multi-byte `nop` of 2 to 9 bytes (the forms the manuals recommend);
/// longer gaps take several.
fn nops(mut len: usize) -> Vec<u8> {
    const NOPS: [&[u8]; 8] = [
        &[0x66, 0x90],
        &[0x0f, 0x1f, 0x00],
        &[0x0f, 0x1f, 0x40, 0x00],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
        &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    ];
    let mut out = Vec::new();
    while len > 0 {
        let n = if len == 1 { 1 } else { len.min(9) };
        // Never leave a single byte: 10 is 5 and 5, not 9 and 1.
        let n = if len - n == 1 { n - 1 } else { n };
        if n == 1 {
            out.push(0x90);
        } else {
            out.extend_from_slice(NOPS[n - 2]);
        }
        len -= n;
    }
    out
}

/// One of glibc's allocators, rewritten to charge the countdown itself.
struct Rewrite {
    name: &'static core::ffi::CStr,
    /// Our hook for it, and the pointer it and the tracer call through.
    hook: usize,
    real: &'static AtomicPtr<()>,
    /// Its first bytes, and where the checks to replace start in them
    /// (they run to the pattern's end).
    pattern: &'static str,
    checks: usize,
    /// Where in the pattern a `rel32` gives the failure path's address, and
    /// where another that must give the same one is, if any.
    fail_rel: usize,
    same_fail: Option<usize>,
    /// What replaces the checks, from their address, the countdown's
    /// offset and the failure path.
    new: fn(usize, i32, usize) -> Option<Vec<u8>>,
    /// Our copy of the prologue and checks, and where it goes on.
    unsampled: usize,
    go_on: &'static AtomicUsize,
    fail: &'static AtomicUsize,
}

impl Rewrite {
    /// Rewrites the function as above; its entry if done.
    fn apply(&self) -> Option<usize> {
        // SAFETY: dlsym with a NUL-terminated name.
        let bound = unsafe { libc::dlsym(libc::RTLD_DEFAULT, self.name.as_ptr()) } as usize;
        if bound != self.hook {
            return None;
        }
        let entry = self.real.load(Acquire) as usize;
        let len = pattern_len(self.pattern);
        let (_, hi) = exec_segment(entry)?;
        if entry + len > hi {
            return None;
        }
        // SAFETY: inside the executable segment, checked just above.
        let code = unsafe { core::slice::from_raw_parts(entry as *const u8, len) };
        if !matches(code, self.pattern) {
            return None;
        }
        let target = |r: usize| {
            let rel = i32::from_le_bytes([code[r], code[r + 1], code[r + 2], code[r + 3]]);
            (entry + r + 4).wrapping_add(rel as isize as usize)
        };
        let fail = target(self.fail_rel);
        if self.same_fail.is_some_and(|r| target(r) != fail) {
            return None;
        }
        let off = i32::try_from(countdown_offset()).ok()?;
        let at = entry + self.checks;
        let new = (self.new)(at, off, fail)?;
        if new.len() != len - self.checks {
            return None;
        }
        // The check of `__malloc_initialized` goes: glibc's first malloc
        // sets it, and nothing clears it.
        // SAFETY: a real allocation, freed at once.
        unsafe { real::free(real::malloc(1)) };
        self.go_on.store(entry + len, Release);
        self.fail.store(fail, Release);
        // The hook and the tracer call past the countdown from now on.
        self.real.store(self.unsampled as *mut (), Release);
        // SAFETY: one thread (the caller's check); nothing runs the
        // function while it changes.
        if !unsafe { crate::patch::write_code(&[(at, &new)]) } {
            self.real.store(entry as *mut (), Release);
            return None;
        }
        rebind(self.name.to_bytes(), self.hook, entry);
        Some(entry)
    }
}

/// glibc's malloc charges the countdown itself, and the program calls it
/// directly: its two checks become the hook's countdown (see the module's
/// documentation); true if done. The caller checks the mode, the allocator
/// and the thread count.
pub fn malloc() -> bool {
    let rewrite = Rewrite {
        name: c"malloc",
        hook: api::malloc as *const () as usize,
        real: &real::MALLOC,
        pattern: MALLOC_START,
        checks: 11,
        fail_rel: 29,
        same_fail: None,
        // The countdown and a 7-byte nop, for glibc's 22 bytes.
        new: |at, off, _| {
            let mut b = countdown_at(at, off, malloc_sample as *const () as usize)?;
            b.extend(nops(7));
            Some(b)
        },
        unsampled: malloc_unsampled as *const () as usize,
        go_on: &MALLOC_GO_ON,
        fail: &MALLOC_FAIL,
    };
    let Some(entry) = rewrite.apply() else {
        return false;
    };
    MALLOC_CHARGED.store(entry, Release);
    api::RELAY_ALIGN.store(MALLOC_RELAY, Release);
    true
}

/// The same for glibc's calloc, whose checks of the product become `mov
/// %rax,%rbx; jo <fail>` (an overflow) and the countdown (which sends 2^63
/// or more to the hook's slow path, and on to glibc's checks).
pub fn calloc() -> bool {
    Rewrite {
        name: c"calloc",
        hook: api::calloc as *const () as usize,
        real: &real::CALLOC,
        pattern: CALLOC_START,
        checks: 16,
        fail_rel: 27,
        same_fail: Some(39),
        // mov %rax,%rbx (3), jo (6), the countdown (15), 16 bytes of nops,
        // for glibc's 40.
        new: |at, off, fail| {
            let mut b = vec![0x48, 0x89, 0xc3, 0x0f, 0x80];
            b.extend_from_slice(&rel32(at + 9, fail)?);
            b.extend(countdown_at(
                at + 9,
                off,
                calloc_sample as *const () as usize,
            )?);
            b.extend(nops(16));
            Some(b)
        },
        unsampled: calloc_unsampled as *const () as usize,
        go_on: &CALLOC_GO_ON,
        fail: &CALLOC_FAIL,
    }
    .apply()
    .is_some()
}

/// glibc's `memalign` (and `aligned_alloc`, the same function in 2.36) and
/// `posix_memalign` hand an alignment of at most 16 (`MALLOC_ALIGNMENT`)
/// to its malloc: once that charges the countdown, the hooks pass them on
/// uncharged (`api::RELAY_ALIGN`).
const MALLOC_RELAY: usize = 17;

#[repr(C)]
struct Dyn {
    tag: i64,
    val: u64,
}

#[repr(C)]
struct Rela {
    offset: u64,
    info: u64,
    addend: i64,
}

#[repr(C)]
struct Sym {
    name: u32,
    info: u8,
    other: u8,
    shndx: u16,
    value: u64,
    size: u64,
}

const DT_NULL: i64 = 0;
const DT_PLTRELSZ: i64 = 2;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const DT_JMPREL: i64 = 23;
const R_X86_64_JUMP_SLOT: u32 = 7;

/// The public head of glibc's `struct link_map`.
#[repr(C)]
struct LinkMap {
    addr: usize,
    name: *const libc::c_char,
    ld: *const Dyn,
    next: *const LinkMap,
    prev: *const LinkMap,
}

extern "C" {
    fn dlinfo(handle: *mut c_void, request: libc::c_int, info: *mut c_void) -> libc::c_int;
}

/// The dynamic sections of the objects in the program's own namespace (the
/// link map of the main program, in load order): an object loaded into
/// another (an `LD_AUDIT` module, `dlmopen`) may have a C library of its own,
/// whose `free` is not the one we rewrote.
fn base_namespace() -> Vec<usize> {
    let mut out = Vec::new();
    // SAFETY: dlopen(NULL) gives the main program's handle (no load), and
    // dlinfo its link map, a list the loader keeps for the process's life.
    unsafe {
        let main = libc::dlopen(core::ptr::null(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if main.is_null() {
            return out;
        }
        let mut lm: *const LinkMap = core::ptr::null();
        if dlinfo(main, libc::RTLD_DI_LINKMAP, (&raw mut lm).cast()) == 0 {
            while !lm.is_null() {
                out.push((*lm).ld as usize);
                lm = (*lm).next;
            }
        }
        libc::dlclose(main);
    }
    out
}

/// Whether a PLT slot holding `value` is not bound yet: lazy binding leaves
/// it pointing at the `push` of its own PLT entry, whose operand is the
/// slot's relocation index (`68 imm32`, after `endbr64` where the object is
/// built for CET).
///
/// # Safety
/// `value` lies inside the object's loaded segments.
unsafe fn unbound(value: usize, index: usize, hi: usize) -> bool {
    let Ok(index) = u32::try_from(index) else {
        return false;
    };
    let at = |p: usize, n: usize| {
        // SAFETY: checked against the object's end; its segments are mapped.
        (p + n <= hi).then(|| unsafe { core::slice::from_raw_parts(p as *const u8, n) })
    };
    let push = |p: usize| at(p, 5).is_some_and(|b| b[0] == 0x68 && b[1..5] == index.to_le_bytes());
    push(value) || (at(value, 4) == Some(&[0xf3, 0x0f, 0x1e, 0xfa]) && push(value + 4))
}

/// Points the PLT slots for `name` of every object of the program's own
/// namespace at `to`, where they hold `hook` (bound to us already) or are
/// not bound yet (lazy binding would bind them to us, first in the lookup
/// order). Objects loaded later keep binding to the hook, as do the GOT
/// slots of objects that take the function's address (`GLOB_DAT`: that
/// address must stay the same in every object). Returns the number of slots
/// rewritten.
fn rebind(name: &'static [u8], hook: usize, to: usize) -> usize {
    struct Job {
        name: &'static [u8],
        hook: usize,
        to: usize,
        me: usize,
        base: Vec<usize>,
    }
    /// # Safety
    /// `info` and `phdrs` describe a loaded object.
    unsafe fn rebind_in(info: &libc::dl_phdr_info, phdrs: &[libc::Elf64_Phdr], job: &Job) -> usize {
        let base = info.dlpi_addr as usize;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        let mut dynamic = 0usize;
        let mut relro = (0usize, 0usize);
        // A slot is written only in a writable segment (RELRO ones are, until
        // the loader protects them): never into text of an object that
        // relocates its code.
        let writable = |slot: usize| {
            phdrs.iter().any(|ph| {
                let s = base + ph.p_vaddr as usize;
                ph.p_type == libc::PT_LOAD
                    && ph.p_flags & libc::PF_W != 0
                    && slot >= s
                    && slot + 8 <= s + ph.p_memsz as usize
            })
        };
        for ph in phdrs {
            let s = base + ph.p_vaddr as usize;
            match ph.p_type {
                libc::PT_LOAD => {
                    lo = lo.min(s);
                    hi = hi.max(s + ph.p_memsz as usize);
                }
                libc::PT_DYNAMIC => dynamic = s,
                libc::PT_GNU_RELRO => relro = (s, s + ph.p_memsz as usize),
                _ => {}
            }
        }
        // Not our own object (its slots reach the hook by design), nor one
        // without dynamic linking, nor one of another namespace.
        if dynamic == 0 || (job.me >= lo && job.me < hi) || !job.base.contains(&dynamic) {
            return 0;
        }
        // The loader has relocated the pointers in the dynamic section on
        // x86-64; an offset below the base is taken as not relocated.
        let at = |v: u64| {
            let v = v as usize;
            if v < base {
                base + v
            } else {
                v
            }
        };
        let (mut jmprel, mut relsz, mut symtab, mut strtab) = (0, 0, 0, 0);
        let mut d = dynamic as *const Dyn;
        // SAFETY: the dynamic section ends with DT_NULL.
        unsafe {
            while (*d).tag != DT_NULL {
                match (*d).tag {
                    DT_JMPREL => jmprel = at((*d).val),
                    DT_PLTRELSZ => relsz = (*d).val as usize,
                    DT_SYMTAB => symtab = at((*d).val),
                    DT_STRTAB => strtab = at((*d).val),
                    _ => {}
                }
                d = d.add(1);
            }
        }
        if jmprel == 0 || symtab == 0 || strtab == 0 {
            return 0;
        }
        let mut done = 0;
        for i in 0..relsz / core::mem::size_of::<Rela>() {
            // SAFETY: DT_PLTRELSZ bytes of Elf64_Rela at DT_JMPREL.
            let r = unsafe { &*(jmprel as *const Rela).add(i) };
            if r.info as u32 != R_X86_64_JUMP_SLOT {
                continue;
            }
            // SAFETY: the relocation's symbol, in the object's symbol table,
            // and its name in the string table.
            let sym_name = unsafe {
                let sym = &*(symtab as *const Sym).add((r.info >> 32) as usize);
                crate::sys::cstr_bytes((strtab + sym.name as usize) as *const libc::c_char)
            };
            if sym_name != job.name {
                continue;
            }
            let slot = base + r.offset as usize;
            if !writable(slot) {
                continue;
            }
            // SAFETY: the PLT slot of a loaded object, 8-aligned.
            let now = unsafe { (slot as *const usize).read_volatile() };
            // SAFETY: `now` is checked to lie in the object first.
            if now != job.hook && !(now >= lo && now < hi && unsafe { unbound(now, i, hi) }) {
                continue;
            }
            let page = sampled::PAGE;
            let in_relro = slot >= relro.0 && slot < relro.1;
            let p = (slot & !(page - 1)) as *mut libc::c_void;
            // SAFETY: the slot's page is made writable for the store when
            // the loader made it read-only (RELRO), and put back after.
            unsafe {
                if in_relro && libc::mprotect(p, page, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                    continue;
                }
                (slot as *mut usize).write_volatile(job.to);
                if in_relro {
                    libc::mprotect(p, page, libc::PROT_READ);
                }
            }
            done += 1;
        }
        done
    }
    let job = Job {
        name,
        hook,
        to,
        me: rebind as *const () as usize,
        base: base_namespace(),
    };
    let mut done = 0;
    sys::each_object(|info, phdrs| {
        // SAFETY: the object's headers, as the loader gives them.
        done += unsafe { rebind_in(info, phdrs, &job) };
        false
    });
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_byte_for_byte_with_wildcards() {
        let pat = "01 ?? 0f";
        assert!(matches(&[1, 9, 15], pat));
        assert!(!matches(&[1, 9, 4], pat));
        assert!(!matches(&[1, 9], pat));
        assert!(!matches(&[1, 9, 15, 0], pat));
        assert_eq!(pattern_len(FREE_BEFORE), FREE_AT + 9);
    }

    #[test]
    fn an_unbound_slot_points_at_its_own_push() {
        let plt = [0x68u8, 5, 0, 0, 0, 0xe9, 0, 0, 0, 0];
        let cet = [0xf3u8, 0x0f, 0x1e, 0xfa, 0x68, 5, 0, 0, 0, 0xf2];
        let code = [0x55u8, 0x48, 0x89, 0xe5, 0x68, 5, 0, 0, 0, 0xc3];
        let end = |b: &[u8]| b.as_ptr() as usize + b.len();
        // SAFETY: each slice is readable up to `end`.
        unsafe {
            assert!(unbound(plt.as_ptr() as usize, 5, end(&plt)));
            assert!(
                !unbound(plt.as_ptr() as usize, 6, end(&plt)),
                "another slot's"
            );
            assert!(unbound(cet.as_ptr() as usize, 5, end(&cet)));
            assert!(
                !unbound(code.as_ptr() as usize, 5, end(&code)),
                "a function"
            );
            assert!(
                !unbound(plt.as_ptr() as usize, 5, plt.as_ptr() as usize + 4),
                "past the end"
            );
        }
    }

    #[test]
    fn nops_fill_a_gap_exactly_without_single_bytes() {
        for len in 1..40 {
            let b = nops(len);
            assert_eq!(b.len(), len);
            // Walk the instructions: each starts with 66 or 0f (or is the
            // lone 90 of a 1-byte gap).
            let mut i = 0;
            while i < b.len() {
                let n = match b[i..] {
                    [0x90] => 1,
                    [0x66, 0x90, ..] => 2,
                    [0x0f, 0x1f, 0x00, ..] => 3,
                    [0x0f, 0x1f, 0x40, ..] => 4,
                    [0x0f, 0x1f, 0x44, ..] => 5,
                    [0x66, 0x0f, 0x1f, 0x44, ..] => 6,
                    [0x0f, 0x1f, 0x80, ..] => 7,
                    [0x0f, 0x1f, 0x84, ..] => 8,
                    [0x66, 0x0f, 0x1f, 0x84, ..] => 9,
                    _ => panic!("{len}: not a nop at {i}: {b:02x?}"),
                };
                assert!(n > 1 || len == 1, "{len}: a 1-byte nop: {b:02x?}");
                i += n;
            }
            assert_eq!(i, len);
        }
        assert_eq!(nops(7), [0x0f, 0x1f, 0x80, 0, 0, 0, 0]);
    }

    #[test]
    fn the_countdown_is_a_sub_from_fs_and_a_jbe_to_the_stub() {
        let at = 0x1000;
        let b = countdown_at(at, -0x1c0, 0x2000).unwrap();
        assert_eq!(
            b[..9],
            [0x64, 0x48, 0x29, 0x1c, 0x25, 0x40, 0xfe, 0xff, 0xff]
        );
        assert_eq!(b[9..11], [0x0f, 0x86]);
        let rel = i32::from_le_bytes([b[11], b[12], b[13], b[14]]);
        assert_eq!(at as i64 + 15 + rel as i64, 0x2000);
        assert_eq!(countdown_at(0, 0, 1 << 40), None, "out of reach");
        assert_eq!(pattern_len(MALLOC_START), 33);
        assert_eq!(pattern_len(CALLOC_START), 56);
    }

    #[test]
    fn the_new_test_jumps_back_to_the_padding() {
        // je rel8 at entry + 7, two bytes long: its target is 7 bytes before
        // the entry, where the padding's jump is.
        let rel = FREE_TEST[8] as i8 as isize;
        assert_eq!(7 + 2 + rel, -7);
        // The test's immediate is the mask, zero-extended to 32 bits.
        let imm = u32::from_le_bytes([FREE_TEST[3], FREE_TEST[4], FREE_TEST[5], FREE_TEST[6]]);
        assert_eq!(imm as usize, sampled::CANDIDATE_MASK);
        assert_eq!(FREE_TEST.len(), 9, "as long as glibc's test and je");
    }
}
