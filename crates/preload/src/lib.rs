//! `libmtrace_rs.so`: an allocation tracer loaded with `LD_PRELOAD`.
//!
//! Read `api.rs` first: it is every symbol the traced program sees. Behind
//! it, `tracer.rs` decides what to record (per-thread Poisson sampling by
//! bytes, or everything in exact mode), `stacks.rs` captures and interns
//! call stacks, `ring.rs` carries events to the writer thread without locks,
//! and `writer.rs` appends them to the mmap'd trace file defined by the
//! `mtrace-format` crate. `real.rs` reaches the real allocator, `sys.rs` is the
//! thin system-call layer, `config.rs` reads `MTRACE_RS_*`.
//!
//! Invariant: nothing reachable from an exported allocation hook allocates,
//! takes a blocking lock, or panics; tracing fails open (on any internal
//! error the program runs on untraced and the reason goes to stderr once).

// The library's start-up and shut-down are compiled out of unit tests.
#![cfg_attr(test, allow(dead_code))]

pub mod api;
pub mod config;
pub mod detour;
pub mod jvmti;
pub mod leakscan;
pub mod patch;
pub mod pool;
pub mod real;
pub mod ring;
pub mod sampled;
pub mod stacks;
pub mod sys;
pub mod tracer;
pub mod unwind;
pub mod writer;

pub use api::{
    _Exit, _exit, aligned_alloc, calloc, execl, execle, execlp, execv, execve, execvp, execvpe,
    free, malloc, malloc_usable_size, memalign, mmap, mmap64, mremap, munmap, posix_memalign,
    pvalloc, realloc, reallocarray, valloc, Agent_OnAttach, Agent_OnLoad,
};

use core::sync::atomic::{AtomicUsize, Ordering::*};

use config::Config;

/// The configuration, kept for fork children (which open their own file).
static mut CONFIG: Config = Config::default();

const RTLD_DL_SYMENT: libc::c_int = 1;

extern "C" {
    fn dladdr1(
        addr: *const libc::c_void,
        info: *mut libc::Dl_info,
        extra: *mut *mut libc::c_void,
        flags: libc::c_int,
    ) -> libc::c_int;
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> libc::c_int;
}

/// Runs from `.init_array` when the library is loaded, before `main`.
extern "C" fn init() {
    real::init();
    tracer::with_internal(|| {
        let Some(cfg) = Config::from_env() else {
            tracer::HOT.state.store(tracer::FINISHED, Release);
            return;
        };
        // SAFETY: written once here, before any thread of ours exists; read
        // only by the fork-child handler afterwards.
        unsafe { CONFIG = cfg };
        set_self_range();
        warn_if_shadowed();
        // Before the writer thread exists: patching needs a single thread.
        if cfg.detour && !cfg.exact() && real::next_is_glibc() && patch::single_threaded() {
            detour::free();
            detour::malloc();
            detour::calloc();
        }
        patch::apply();
        if !stacks::init() || (!cfg.exact() && !sampled::init()) {
            sys::warn(&[b"cannot reserve memory for the tracer's tables; tracing disabled"]);
            tracer::HOT.state.store(tracer::FINISHED, Release);
            return;
        }
        unwind::init(cfg.unwind == config::Unwind::Libgcc);
        tracer::configure(cfg.sample_bytes, cfg.depth, cfg.seed, cfg.unwind);
        tracer::MMAP_TRACKING.store(cfg.mmap, Relaxed);
        tracer::init_exit_key();
        tracer::start();
        if !writer::start(&cfg, sys::getppid(), false) {
            tracer::HOT.state.store(tracer::FINISHED, Release);
            return;
        }
        // SAFETY: registering plain functions with no arguments.
        unsafe {
            pthread_atfork(
                Some(writer::fork_prepare),
                Some(writer::fork_parent),
                Some(fork_child),
            )
        };
    });
}

extern "C" fn fork_child() {
    // SAFETY: CONFIG is not written after init.
    let cfg = unsafe { *core::ptr::addr_of!(CONFIG) };
    writer::fork_child(&cfg);
}

/// Runs from `.fini_array` at normal exit, after the program's own exit
/// handlers and destructors.
extern "C" fn fini() {
    writer::finish();
}

// Not in unit tests: the test harness must not trace itself.
#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

#[cfg(not(test))]
#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = fini;

/// Says so when another allocator takes `malloc` ahead of us: one preloaded
/// before us (`LD_PRELOAD="libjemalloc.so.2 libmtrace_rs.so"`) or linked
/// into the executable itself (rustc links jemalloc): every call goes there
/// and the trace would silently stay empty. The loader is asked which object
/// the program's `malloc` resolves to; an executable that merely takes
/// malloc's address exports a canonical PLT entry under that name, which
/// `dladdr` does not name `malloc` (it is not a definition), so it is not
/// mistaken for an allocator.
fn warn_if_shadowed() {
    let (lo, hi) = stacks::self_range();
    // SAFETY: dlsym and dladdr read the loader's tables; the name is
    // NUL-terminated and `info` is a local.
    unsafe {
        let found = libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr());
        if found.is_null() || (found as u64 >= lo && (found as u64) < hi) {
            return;
        }
        let mut info: libc::Dl_info = core::mem::zeroed();
        let mut sym: *const libc::Elf64_Sym = core::ptr::null();
        if dladdr1(
            found,
            &mut info,
            &mut sym as *mut _ as *mut *mut libc::c_void,
            RTLD_DL_SYMENT,
        ) == 0
            || sym.is_null()
            || (*sym).st_shndx == 0
            || sys::cstr_bytes(info.dli_sname) != b"malloc"
        {
            // Not a definition of malloc: a canonical PLT entry (undefined,
            // with the PLT slot as its value) or something else entirely.
            return;
        }
        let who = sys::cstr_bytes(info.dli_fname);
        let base = who.rsplit(|&b| b == b'/').next().unwrap_or(who);
        if base.starts_with(b"libc.so") {
            return;
        }
        writer::set_malloc_owner(who);
        sys::warn(&[
            b"malloc is taken by ",
            if who.is_empty() { b"the executable" } else { who },
            b" ahead of libmtrace_rs.so: its allocations are not traced (list libmtrace_rs.so first in LD_PRELOAD; a program that links its own allocator cannot be traced)",
        ]);
    }
}

/// Finds this library's mapped range, so that stacks can drop its frames.
fn set_self_range() {
    static LO: AtomicUsize = AtomicUsize::new(0);
    let me = set_self_range as *const () as usize;
    sys::each_object(|info, phdrs| {
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for ph in phdrs.iter().filter(|ph| ph.p_type == libc::PT_LOAD) {
            let s = (info.dlpi_addr + ph.p_vaddr) as usize;
            lo = lo.min(s);
            hi = hi.max(s + ph.p_memsz as usize);
        }
        let found = me >= lo && me < hi;
        if found {
            stacks::set_self_range(lo, hi);
            LO.store(lo, Relaxed);
        }
        found
    });
}
