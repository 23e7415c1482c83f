//! The thin system layer: raw syscalls and libc calls that the tracer uses
//! from inside allocation hooks.
//!
//! Contract: nothing here allocates, takes a lock, or panics, and every
//! function is safe to call from any thread at any time after libc has
//! relocated. Errors come back as return values; callers decide what failure
//! means.

use core::ffi::c_void;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clocks we pass exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `prefetchw`: starts fetching the line holding `p` in the state a write
/// needs. A hint: it never faults (any address will do), and it is a no-op
/// on processors without it.
#[inline(always)]
pub fn prefetch_write<T>(p: *const T) {
    // SAFETY: prefetchw changes no architectural state and never faults.
    unsafe {
        core::arch::asm!("prefetchw [{}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
}

/// Nanoseconds on CLOCK_MONOTONIC (the vDSO makes this a few tens of
/// nanoseconds, without a system call).
#[inline]
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Nanoseconds since the Unix epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

pub fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

pub fn getppid() -> u32 {
    // SAFETY: getppid has no preconditions.
    unsafe { libc::getppid() as u32 }
}

pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Anonymous private memory, zeroed, not backed by swap reservations: pages
/// cost nothing until touched. Null on failure.
pub fn map_anon(len: usize) -> *mut u8 {
    // SAFETY: an anonymous mapping at an address of the kernel's choosing
    // touches no existing memory.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        core::ptr::null_mut()
    } else {
        p as *mut u8
    }
}

/// The calling thread's errno.
#[inline]
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

#[inline]
pub fn set_errno(v: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = v };
}

/// The start of a small file (a /proc one-liner) read into `buf` with raw
/// system calls, no allocation: at most `buf.len()` bytes from one read.
/// `None` when it cannot be opened or read.
pub fn read_small<'b>(path: &core::ffi::CStr, buf: &'b mut [u8]) -> Option<&'b [u8]> {
    // SAFETY: a NUL-terminated path; reads into `buf`, within its length;
    // the descriptor is closed before returning.
    let n = unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr() as *mut c_void, buf.len());
        libc::close(fd);
        n
    };
    (n > 0).then(|| &buf[..n as usize])
}

/// Writes all of `bytes` to `fd`, retrying on EINTR and short writes.
pub fn write_all(fd: i32, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr() as *const c_void, bytes.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// A fixed-capacity byte buffer on the stack, for building messages and paths
/// without allocating. Bytes past the capacity are silently cut.
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub const fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let room = N - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    pub fn push_u64(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// True when something was cut because the buffer was full (one byte is
    /// kept free for a NUL terminator).
    pub fn full(&self) -> bool {
        self.len >= N - 1
    }

    /// The contents as a NUL-terminated C string pointer (the last byte is
    /// overwritten if the buffer is full).
    pub fn as_cstr(&mut self) -> *const libc::c_char {
        let end = self.len.min(N - 1);
        self.buf[end] = 0;
        self.buf.as_ptr() as *const libc::c_char
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// One line to stderr, prefixed with "mtrace-rs: ", without allocating.
pub fn warn(parts: &[&[u8]]) {
    let mut line = StackBuf::<1024>::new();
    line.push(b"mtrace-rs: ");
    for p in parts {
        line.push(p);
    }
    line.push(b"\n");
    write_all(2, line.as_bytes());
}

/// Length of a NUL-terminated C string.
///
/// # Safety
/// `s` must point to a NUL-terminated string.
pub unsafe fn cstr_bytes<'a>(s: *const libc::c_char) -> &'a [u8] {
    if s.is_null() {
        return &[];
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { core::slice::from_raw_parts(s as *const u8, libc::strlen(s)) }
}

/// Sleeps for `ms` milliseconds (the writer's pace).
pub fn sleep_ms(ms: u64) {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as i64,
        tv_nsec: ((ms % 1000) * 1_000_000) as i64,
    };
    // SAFETY: `ts` is valid; a null remainder pointer is allowed.
    unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
}

/// Gives up the CPU once (used while waiting for the writer to make room).
pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
}

/// Calls `f` with each loaded object's headers and its program headers, in
/// the loader's order, until `f` returns true.
pub fn each_object(mut f: impl FnMut(&libc::dl_phdr_info, &[libc::Elf64_Phdr]) -> bool) {
    type Each<'a> = &'a mut dyn FnMut(&libc::dl_phdr_info, &[libc::Elf64_Phdr]) -> bool;
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _: usize,
        data: *mut c_void,
    ) -> libc::c_int {
        // SAFETY: `info` is valid for the call, with `dlpi_phnum` program
        // headers at `dlpi_phdr`; `data` is the closure below.
        let (info, f) = unsafe { (&*info, &mut *(data as *mut Each)) };
        let phdrs = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        f(info, phdrs) as libc::c_int
    }
    let mut each: Each = &mut f;
    // SAFETY: the callback only hands the loader's headers to `f`.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&raw mut each).cast()) };
}

/// Tells Valgrind, when the process runs under it, that the code in
/// `[addr, addr + len)` was rewritten, so that it drops what it translated
/// from the old bytes (its `VALGRIND_DISCARD_TRANSLATIONS` client request).
/// Run natively, the sequence changes nothing: four rotations of a register
/// by 128 bits in all, and an exchange of a register with itself.
pub fn discard_translations(addr: usize, len: usize) {
    const VG_USERREQ_DISCARD_TRANSLATIONS: u64 = 0x1002;
    let args: [u64; 6] = [
        VG_USERREQ_DISCARD_TRANSLATIONS,
        addr as u64,
        len as u64,
        0,
        0,
        0,
    ];
    // SAFETY: reads `args` (under Valgrind) and changes no register but
    // rdx (the request's result) and the flags.
    unsafe {
        core::arch::asm!(
            "rol rdi, 3",
            "rol rdi, 13",
            "rol rdi, 61",
            "rol rdi, 51",
            "xchg rbx, rbx",
            in("rax") args.as_ptr(),
            inout("rdx") 0u64 => _,
            inout("rdi") 0u64 => _,
            options(nostack, readonly),
        );
    }
}
