//! The real allocator: the next definition of each allocation function after
//! ours in the symbol lookup order (glibc, or jemalloc/tcmalloc preloaded
//! after us).
//!
//! Each entry starts as a bootstrap function that resolves every entry with
//! `dlsym(RTLD_NEXT, ...)` and then calls through; afterwards the pointers hold
//! the real functions, so a call costs one load and one indirect call, with no
//! "initialized?" test. `dlsym` may itself allocate (it does on errors): calls
//! that arrive while resolution is under way go to glibc's `__libc_*` entry
//! points, which exist in every glibc and need no lookup. This sidesteps the
//! classic dlsym/calloc bootstrap trap without a static arena whose blocks
//! would later reach the real `free`.

// Every forwarding function below has exactly the safety contract of the C
// function of the same name; repeating it on each would say nothing more.
#![allow(clippy::missing_safety_doc)]

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering::*};

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
type UsableFn = unsafe extern "C" fn(*mut c_void) -> usize;
type ExecveFn = unsafe extern "C" fn(
    *const libc::c_char,
    *const *const libc::c_char,
    *const *const libc::c_char,
) -> c_int;
type ExecvFn = unsafe extern "C" fn(*const libc::c_char, *const *const libc::c_char) -> c_int;
type MmapFn =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
type MunmapFn = unsafe extern "C" fn(*mut c_void, usize) -> c_int;
type MremapFn = unsafe extern "C" fn(*mut c_void, usize, usize, c_int, *mut c_void) -> *mut c_void;

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn __libc_valloc(size: usize) -> *mut c_void;
    fn __libc_pvalloc(size: usize) -> *mut c_void;
}

macro_rules! real_fns {
    ($( $slot:ident : $ty:ty = $boot:ident ( $($arg:ident : $aty:ty),* ) -> $ret:ty, $name:literal, $fallback:expr ;)*) => {
        $(
            pub(crate) static $slot: AtomicPtr<()> = AtomicPtr::new($boot as $ty as *mut ());

            unsafe extern "C" fn $boot($($arg: $aty),*) -> $ret {
                if RESOLVING.load(Acquire) {
                    // SAFETY: glibc's own entry points, called with the
                    // caller's arguments unchanged.
                    return unsafe { $fallback };
                }
                resolve();
                // SAFETY: `resolve` stored a function of this type.
                let f: $ty = unsafe { core::mem::transmute::<*mut (), $ty>($slot.load(Acquire)) };
                // SAFETY: forwarding the caller's arguments.
                unsafe { f($($arg),*) }
            }
        )*

        /// Looks up every real function once. Entries that cannot be found
        /// (an allocator that lacks e.g. `pvalloc`) keep a glibc fallback.
        #[cold]
        fn resolve() {
            if RESOLVED.load(Acquire) {
                return;
            }
            RESOLVING.store(true, Release);
            $(
                // SAFETY: dlsym with a NUL-terminated name.
                let p = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!($name, "\0").as_ptr() as *const libc::c_char) };
                if !p.is_null() {
                    $slot.store(p as *mut (), Release);
                }
            )*
            RESOLVED.store(true, Release);
            RESOLVING.store(false, Release);
        }
    };
}

static RESOLVING: AtomicBool = AtomicBool::new(false);
static RESOLVED: AtomicBool = AtomicBool::new(false);

real_fns! {
    MALLOC: MallocFn = boot_malloc(size: usize) -> *mut c_void, "malloc", __libc_malloc(size);
    FREE: FreeFn = boot_free(p: *mut c_void) -> (), "free", __libc_free(p);
    CALLOC: CallocFn = boot_calloc(n: usize, size: usize) -> *mut c_void, "calloc", __libc_calloc(n, size);
    REALLOC: ReallocFn = boot_realloc(p: *mut c_void, size: usize) -> *mut c_void, "realloc", __libc_realloc(p, size);
    MEMALIGN: MemalignFn = boot_memalign(align: usize, size: usize) -> *mut c_void, "memalign", __libc_memalign(align, size);
    ALIGNED_ALLOC: MemalignFn = boot_aligned_alloc(align: usize, size: usize) -> *mut c_void, "aligned_alloc", __libc_memalign(align, size);
    POSIX_MEMALIGN: PosixMemalignFn = boot_posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int, "posix_memalign", fallback_posix_memalign(out, align, size);
    VALLOC: MallocFn = boot_valloc(size: usize) -> *mut c_void, "valloc", __libc_valloc(size);
    PVALLOC: MallocFn = boot_pvalloc(size: usize) -> *mut c_void, "pvalloc", __libc_pvalloc(size);
    USABLE: UsableFn = boot_usable(p: *mut c_void) -> usize, "malloc_usable_size", usable_unknown(p);
    EXECVE: ExecveFn = boot_execve(path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int, "execve", libc::syscall(libc::SYS_execve, path, argv, envp) as c_int;
    EXECV: ExecvFn = boot_execv(path: *const libc::c_char, argv: *const *const libc::c_char) -> c_int, "execv", libc::syscall(libc::SYS_execve, path, argv, core::ptr::null::<*const libc::c_char>()) as c_int;
    EXECVP: ExecvFn = boot_execvp(path: *const libc::c_char, argv: *const *const libc::c_char) -> c_int, "execvp", libc::syscall(libc::SYS_execve, path, argv, core::ptr::null::<*const libc::c_char>()) as c_int;
    MMAP: MmapFn = boot_mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: libc::off_t) -> *mut c_void, "mmap", libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void;
    MUNMAP: MunmapFn = boot_munmap(addr: *mut c_void, len: usize) -> c_int, "munmap", libc::syscall(libc::SYS_munmap, addr, len) as c_int;
    MREMAP: MremapFn = boot_mremap(old: *mut c_void, old_len: usize, new_len: usize, flags: c_int, new_addr: *mut c_void) -> *mut c_void, "mremap", libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) as *mut c_void;
    EXECVPE: ExecveFn = boot_execvpe(path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int, "execvpe", libc::syscall(libc::SYS_execve, path, argv, envp) as c_int;
}

unsafe fn fallback_posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    // SAFETY: glibc's memalign with a valid alignment.
    let p = unsafe { __libc_memalign(align, size) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passed a writable pointer, as posix_memalign requires.
    unsafe { *out = p };
    0
}

macro_rules! call {
    ($slot:ident : $ty:ty) => {{
        // The slot always holds a function of this type: its bootstrap
        // function or the resolved real one (the caller's unsafe block
        // covers the transmute).
        core::mem::transmute::<*mut (), $ty>($slot.load(Relaxed))
    }};
}

/// The variadic exec functions, forwarded by register-preserving naked
/// functions in api.rs; resolved in `init` (an exec before the constructor
/// ran is not possible for a preloaded library).
pub(crate) static EXECL: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());
pub(crate) static EXECLP: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());
pub(crate) static EXECLE: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Makes sure the real functions are resolved (called from the constructor so
/// that the first hook call does not pay for it).
pub fn init() {
    resolve();
    for (slot, name) in [
        (&EXECL, c"execl"),
        (&EXECLP, c"execlp"),
        (&EXECLE, c"execle"),
    ] {
        // SAFETY: dlsym with a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        slot.store(p as *mut (), Release);
    }
}

#[inline(always)]
pub unsafe fn malloc(size: usize) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(MALLOC: MallocFn)(size) }
}
#[inline(always)]
pub unsafe fn free(p: *mut c_void) {
    // SAFETY: forwarding.
    unsafe { call!(FREE: FreeFn)(p) }
}
#[inline(always)]
pub unsafe fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(CALLOC: CallocFn)(n, size) }
}
#[inline(always)]
pub unsafe fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(REALLOC: ReallocFn)(p, size) }
}
#[inline(always)]
pub unsafe fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(MEMALIGN: MemalignFn)(align, size) }
}
#[inline(always)]
pub unsafe fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(ALIGNED_ALLOC: MemalignFn)(align, size) }
}
#[inline(always)]
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    // SAFETY: forwarding.
    unsafe { call!(POSIX_MEMALIGN: PosixMemalignFn)(out, align, size) }
}
#[inline(always)]
pub unsafe fn valloc(size: usize) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(VALLOC: MallocFn)(size) }
}
#[inline(always)]
pub unsafe fn pvalloc(size: usize) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(PVALLOC: MallocFn)(size) }
}
#[inline(always)]
pub unsafe fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: forwarding.
    unsafe { call!(USABLE: UsableFn)(p) }
}
pub unsafe fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(MMAP: MmapFn)(addr, len, prot, flags, fd, off) }
}
pub unsafe fn munmap(addr: *mut c_void, len: usize) -> c_int {
    // SAFETY: forwarding.
    unsafe { call!(MUNMAP: MunmapFn)(addr, len) }
}
pub unsafe fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    // SAFETY: forwarding.
    unsafe { call!(MREMAP: MremapFn)(old, old_len, new_len, flags, new_addr) }
}
pub unsafe fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { call!(EXECVE: ExecveFn)(path, argv, envp) }
}
pub unsafe fn execv(path: *const libc::c_char, argv: *const *const libc::c_char) -> c_int {
    // SAFETY: forwarding.
    unsafe { call!(EXECV: ExecvFn)(path, argv) }
}
pub unsafe fn execvp(file: *const libc::c_char, argv: *const *const libc::c_char) -> c_int {
    // SAFETY: forwarding.
    unsafe { call!(EXECVP: ExecvFn)(file, argv) }
}
pub unsafe fn execvpe(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding.
    unsafe { call!(EXECVPE: ExecveFn)(file, argv, envp) }
}

/// glibc exports no internal alias for `malloc_usable_size`; while resolution
/// is under way on another thread (a window of microseconds at start-up) the
/// honest answer is "no usable bytes beyond none known".
unsafe fn usable_unknown(_p: *mut c_void) -> usize {
    0
}

/// True when the next allocator is glibc's own (so `mallinfo2` describes the
/// heap we trace), false for jemalloc, tcmalloc and others. Asked of the
/// loader (which object holds the real `malloc`), not by comparing with
/// `__libc_malloc`: tcmalloc defines `__libc_malloc` too.
pub fn next_is_glibc() -> bool {
    static KNOWN: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
    match KNOWN.load(Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let yes = ask_loader_if_glibc();
    KNOWN.store(if yes { 1 } else { 2 }, Relaxed);
    yes
}

fn ask_loader_if_glibc() -> bool {
    resolve();
    let mut info: libc::Dl_info = libc::Dl_info {
        dli_fname: core::ptr::null(),
        dli_fbase: core::ptr::null_mut(),
        dli_sname: core::ptr::null(),
        dli_saddr: core::ptr::null_mut(),
    };
    // SAFETY: dladdr fills `info` for an address in a loaded object.
    if unsafe { libc::dladdr(MALLOC.load(Relaxed) as *const c_void, &mut info) } == 0 {
        return false;
    }
    // SAFETY: dli_fname is a NUL-terminated path (or null).
    let path = unsafe { crate::sys::cstr_bytes(info.dli_fname) };
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    name.starts_with(b"libc.so") || name.starts_with(b"libc-")
}
