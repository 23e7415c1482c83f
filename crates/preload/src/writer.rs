//! The writer: a thread of the tracer's own that drains the rings every few
//! milliseconds, adds new stacks, module maps, drop counts and process
//! statistics, and appends it all to the trace file.
//!
//! The writer is the only code that allocates (its buffers, through the real
//! allocator: its thread is marked internal, so its own allocations are not
//! traced). It runs one "cycle" at a time under `BUSY`, a flag that the
//! exec and exit paths take too, so that they can flush synchronously.
//!
//! Crash safety: records are written into the file with `pwrite`, then the
//! header's `committed` length is stored with release through a shared
//! mapping of the file. A SIGKILL leaves both in the page cache; the decoder
//! reads up to `committed`. Space is reserved with `posix_fallocate` before
//! it is mapped, so a full disk is an error we count, never a SIGBUS in the
//! traced program.
//!
//! Why `pwrite` and not a copy into the mapping, which is what the header
//! gets: each page a copy reached for the first time was a page fault in the
//! file (a page-cache page found or zeroed, `ext4_page_mkwrite`), about
//! 10 us each, 100 us of a writer cycle that encodes 40 kB on the sampled
//! churn benchmark and a third of the writer thread's time; `pwrite` puts
//! the same bytes in the same page cache in one call. The mapping stays for
//! the header, for the exit leak scan, which reads the records back, and
//! for the records themselves when the descriptor is no longer ours: a
//! program may close every descriptor (daemons do, and so does a fork child
//! before it execs), and another file may then get its number. Each append
//! checks the descriptor's device and inode first; when they are not the
//! trace file's, the file is opened again by its absolute path (and kept if
//! it is the same file), and failing that the records are copied into the
//! mapping, as far as the space already reserved goes. The trace file's
//! descriptor is moved to a number of at least `HIGH_FD` where the limit
//! allows, out of the way of the program's own, which also leaves the
//! numbers the program's opens return as they would be untraced.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering::*};

use mtrace_format::{self as fmt, DropReason, Encoder, Header, Module, HEADER_SIZE};

use crate::config::{self, Config};
use crate::ring::{self, Event};
use crate::sys::{self, StackBuf};
use crate::{real, stacks, tracer};

struct Writer {
    fd: c_int,
    /// Device and inode of the trace file: a program that closes every
    /// descriptor (daemons do) may get our number back for a file of its own,
    /// which we must never grow or truncate.
    ident: (u64, u64),
    /// The trace file's absolute path, to open it again if the program
    /// closes our descriptor; `None` once that failed.
    path: Option<std::ffi::CString>,
    map: *mut u8,
    /// Bytes of the file that are mapped (and reserved on disk).
    map_len: usize,
    /// Bytes of the record stream written so far.
    pos: usize,
    /// File offset up to which pages written through the mapping were
    /// released (the header page stays mapped).
    released: usize,
    enc: Encoder,
    buf: Vec<u8>,
    events: Vec<Event>,
    /// The other half of the merge in `order_events`.
    scratch: Vec<Event>,
    /// Run boundaries for `order_events`.
    runs: Vec<usize>,
    start_mono: u64,
    stacks_done: u32,
    modules: Vec<(u64, Vec<u8>)>,
    dl_adds: u64,
    dl_subs: u64,
    drops_written: [u64; 8],
    stats_ms: u64,
    stats_ms_set: bool,
    flush_ms: u64,
    /// When the next STATS record is due (monotonic ns).
    next_stats: u64,
    /// The last cycle: a STATS record is due whatever the interval, so that
    /// the trace ends with the memory as the program left it.
    last_cycle: bool,
    broken: bool,
}

/// The most of one core's time the STATS records may take by default, as a
/// divisor of the interval: unless `MTRACE_RS_STATS_MS` was set, a record is
/// due `STATS_DUTY` times its own cost after the last one, if that is later
/// than 100 ms. glibc's `mallinfo2` walks every free chunk of every arena
/// and holds each arena's lock while it does, so on a fragmented heap one
/// call takes hundreds of microseconds during which the program's threads
/// wait for their arena (on the sampled churn benchmark 0.4 ms a call: at
/// 100 ms, 0.4% of a core and about 0.5% of the run's wall time; on a heap
/// of a million free small blocks, milliseconds). At 1000, the records cost
/// at most 0.1% of a core, and a heap that cheap to walk still gets one
/// every 100 ms. An interval the user set is kept to: they asked for it.
const STATS_DUTY: u64 = 1000;

static WRITER: AtomicPtr<Writer> = AtomicPtr::new(core::ptr::null_mut());
/// `Config::writer_stall_ms`, for the writer thread's loop.
static STALL_MS: AtomicU64 = AtomicU64::new(0);
/// Held by whoever runs a writer cycle.
static BUSY: AtomicBool = AtomicBool::new(false);
/// Tells the writer thread to stop.
static STOP: AtomicBool = AtomicBool::new(false);
/// Events that could not be written, counted into DropReason::WriteFailed.
static WRITE_FAILED: AtomicU64 = AtomicU64::new(0);
/// The process whose file the writer writes. A `vfork` child shares our
/// memory but is another process: it must neither write into nor finish its
/// parent's file.
static OWNER_PID: AtomicU32 = AtomicU32::new(0);
/// The object that defines malloc ahead of us, when one does (see
/// `warn_if_shadowed` in lib.rs): written into the trace so the analyzer can
/// say the process was not really traced.
static MALLOC_OWNER: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Records who owns malloc (start-up only, not a hook path).
pub fn set_malloc_owner(path: &[u8]) {
    if let Ok(mut o) = MALLOC_OWNER.lock() {
        *o = path.to_vec();
    }
}

/// MTRACE_RS_LEAK_SCAN.
static LEAK_SCAN: AtomicBool = AtomicBool::new(false);

fn is_owner() -> bool {
    OWNER_PID.load(Relaxed) == sys::getpid()
}

fn lock() {
    while BUSY
        .compare_exchange_weak(false, true, Acquire, Relaxed)
        .is_err()
    {
        sys::yield_now();
    }
}

fn try_lock() -> bool {
    BUSY.compare_exchange(false, true, Acquire, Relaxed).is_ok()
}

fn unlock() {
    BUSY.store(false, Release);
}

/// Creates the trace file and the writer thread. False (with a message on
/// stderr) when tracing cannot start.
pub fn start(cfg: &Config, ppid: u32, forked: bool) -> bool {
    STALL_MS.store(cfg.writer_stall_ms, Relaxed);
    let pid = sys::getpid();
    let Some((fd, path)) = create_file(cfg, pid) else {
        return false;
    };
    let start_mono = sys::now_ns();
    let header = Header {
        version: fmt::FORMAT_VERSION,
        committed: 0,
        flags: 0,
        pid,
        ppid,
        max_depth: cfg.depth as u32,
        start_realtime_ns: sys::realtime_ns(),
        start_monotonic_ns: start_mono,
        sample_rate: cfg.sample_bytes,
    };
    let mut w = Box::new(Writer {
        fd,
        ident: file_ident(fd).unwrap_or((0, 0)),
        path: absolute(path.as_bytes()),
        map: core::ptr::null_mut(),
        map_len: 0,
        pos: 0,
        released: HEADER_SIZE,
        enc: Encoder::new(),
        buf: Vec::with_capacity(1 << 20),
        events: Vec::with_capacity(1 << 16),
        scratch: Vec::with_capacity(1 << 16),
        runs: Vec::with_capacity(64),
        start_mono,
        stacks_done: 0,
        modules: Vec::new(),
        dl_adds: u64::MAX,
        dl_subs: u64::MAX,
        drops_written: [0; 8],
        stats_ms: cfg.stats_ms,
        stats_ms_set: cfg.stats_ms_set,
        flush_ms: cfg.flush_ms,
        next_stats: 0,
        last_cycle: false,
        broken: false,
    });
    if !w.reserve(1 << 20) {
        warn_path(b"cannot map the trace file ", path.as_bytes());
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        return false;
    }
    // SAFETY: the mapping is at least HEADER_SIZE bytes long.
    header.encode(unsafe { core::slice::from_raw_parts_mut(w.map, HEADER_SIZE) });
    w.write_info(forked, ppid);
    let w = Box::into_raw(w);
    LEAK_SCAN.store(cfg.leak_scan, Relaxed);
    OWNER_PID.store(pid, Relaxed);
    WRITER.store(w, Release);
    STOP.store(false, Release);
    BUSY.store(false, Release);
    spawn_thread()
}

fn warn_path(what: &[u8], path: &[u8]) {
    let e = sys::errno();
    // SAFETY: strerror returns a static or thread-local string.
    let msg = unsafe { sys::cstr_bytes(libc::strerror(e)) };
    sys::warn(&[what, path, b": ", msg, b"; tracing disabled"]);
}

/// Opens a new trace file: mode 0600, never following a symlink, never
/// overwriting; on a name clash (an exec'd image has the pid of the image that
/// exec'd it) a `.N` suffix is added.
fn create_file(cfg: &Config, pid: u32) -> Option<(c_int, StackBuf<{ config::MAX_PATH + 32 }>)> {
    for attempt in 0..1000 {
        let mut path = StackBuf::new();
        config::expand_out(cfg, pid, attempt, &mut path);
        if path.full() {
            sys::warn(&[b"the trace path is too long; tracing disabled"]);
            return None;
        }
        // SAFETY: a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                path.as_cstr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd >= 0 {
            return Some((move_high(fd), path));
        }
        if sys::errno() != libc::EEXIST {
            warn_path(b"cannot create trace file ", path.as_bytes());
            return None;
        }
    }
    sys::warn(&[b"no free trace file name after 1000 attempts; tracing disabled"]);
    None
}

/// `path` made absolute against the current directory (a daemon changes
/// directory before it closes its descriptors).
fn absolute(path: &[u8]) -> Option<std::ffi::CString> {
    let mut full = Vec::new();
    if path.first() != Some(&b'/') {
        let cwd = std::env::current_dir().ok()?;
        full.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(cwd.as_os_str()));
        full.push(b'/');
    }
    full.extend_from_slice(path);
    std::ffi::CString::new(full).ok()
}

/// The lowest number the trace file's descriptor is moved to (see the
/// module's docs).
const HIGH_FD: c_int = 512;

/// `fd` moved to a number of at least `HIGH_FD`, or left as it is when the
/// descriptor limit is lower.
fn move_high(fd: c_int) -> c_int {
    // SAFETY: duplicating and closing our own descriptor.
    unsafe {
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, HIGH_FD);
        if high < 0 {
            return fd;
        }
        libc::close(fd);
        high
    }
}

fn spawn_thread() -> bool {
    // SAFETY: plain pthread calls with valid arguments; the attribute object
    // lives across pthread_create.
    unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, 1 << 20);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut th: libc::pthread_t = 0;
        let rc = libc::pthread_create(&mut th, &attr, thread_main, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if rc != 0 {
            sys::warn(&[b"cannot start the writer thread; tracing disabled"]);
            return false;
        }
    }
    true
}

extern "C" fn thread_main(_: *mut c_void) -> *mut c_void {
    tracer::mark_internal();
    // The program's signals are the program's: none is delivered to us.
    // SAFETY: a full set, applied to this thread only.
    unsafe {
        let mut set: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, core::ptr::null_mut());
        libc::prctl(
            libc::PR_SET_NAME,
            c"mtrace-writer".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    loop {
        if STOP.load(Acquire) {
            return core::ptr::null_mut();
        }
        let stall = STALL_MS.load(Relaxed);
        if stall > 0 {
            let ts = libc::timespec {
                tv_sec: (stall / 1000) as libc::time_t,
                tv_nsec: (stall % 1000 * 1_000_000) as libc::c_long,
            };
            // SAFETY: a plain sleep of this thread.
            unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
        }
        let mut busy = false;
        let mut pace = 10;
        if try_lock() {
            if STOP.load(Acquire) {
                unlock();
                return core::ptr::null_mut();
            }
            if let Some(w) = writer() {
                busy = w.cycle() > ring::capacity() / 4;
                pace = w.flush_ms;
            }
            unlock();
        }
        if !busy {
            ring::writer_sleep(pace);
        }
    }
}

fn writer() -> Option<&'static mut Writer> {
    let w = WRITER.load(Acquire);
    // SAFETY: the writer is only touched under BUSY, which the caller holds.
    (!w.is_null()).then(|| unsafe { &mut *w })
}

/// Flushes synchronously before an exec replaces the image.
pub fn before_exec() {
    if !tracer::running() || !is_owner() {
        return;
    }
    lock();
    if let Some(w) = writer() {
        w.cycle();
        let ts = sys::now_ns();
        let rel = ts.saturating_sub(w.start_mono);
        let mut buf = core::mem::take(&mut w.buf);
        buf.clear();
        w.enc.mark(&mut buf, rel, fmt::mark::EXEC, 0);
        w.append(&buf);
        w.buf = buf;
        w.shrink_to_data();
    }
    unlock();
}

/// Records a range of generated code (from the JVMTI agent) right away, so
/// that it is in the file before the JVM can be killed.
pub fn code(start: u64, len: u64, name: &[u8]) {
    if !tracer::running() || !is_owner() {
        return;
    }
    lock();
    if let Some(w) = writer() {
        let ts = sys::now_ns().saturating_sub(w.start_mono);
        let mut buf = Vec::with_capacity(32 + name.len());
        w.enc.code(&mut buf, ts, start, len, name);
        w.append(&buf);
    }
    unlock();
}

/// Writes everything and the END record; after this, hooks stop recording.
/// Runs from the library destructor and from `_exit`.
pub fn finish() {
    if !is_owner() {
        return;
    }
    if tracer::HOT
        .state
        .compare_exchange(tracer::RUNNING, tracer::FINISHED, AcqRel, Relaxed)
        .is_err()
    {
        return;
    }
    let sp = crate::leakscan::current_sp();
    STOP.store(true, Release);
    lock();
    if let Some(w) = writer() {
        w.last_cycle = true;
        w.cycle();
        if LEAK_SCAN.load(Relaxed) && tracer::exact() {
            tracer::with_internal(|| w.leak_scan(sp));
        }
        w.close();
    }
    // BUSY stays held: nothing may write to the closed file.
}

/// `pthread_atfork` prepare: wait until the writer is between cycles, so that
/// the child does not inherit it halfway through the loader's or the
/// allocator's locks.
pub extern "C" fn fork_prepare() {
    if tracer::running() {
        lock();
    }
}

pub extern "C" fn fork_parent() {
    if tracer::running() {
        unlock();
    }
}

/// In the child: only this thread exists. Events queued before the fork are
/// the parent's; the child gets a new file and a new writer thread.
pub extern "C" fn fork_child(cfg: &Config) {
    if !tracer::running() {
        return;
    }
    ring::reset_after_fork(tracer::current_ring());
    for d in &tracer::DROPS {
        d.store(0, Relaxed);
    }
    // The parent's writer state stays where it was (it may be mid-cycle);
    // the child starts from scratch.
    WRITER.store(core::ptr::null_mut(), Release);
    BUSY.store(false, Release);
    let ok = tracer::with_internal(|| start(cfg, sys::getppid(), true));
    if !ok {
        tracer::HOT.state.store(tracer::FINISHED, Release);
    }
}

impl Writer {
    /// Makes sure `extra` more bytes fit after `pos`, growing the file and the
    /// mapping. False when the disk or the address space refuses.
    fn reserve(&mut self, extra: usize) -> bool {
        let need = HEADER_SIZE + self.pos + extra;
        if need <= self.map_len {
            return true;
        }
        let mut len = self.map_len.max(HEADER_SIZE + (1 << 20));
        while len < need {
            len = len.saturating_mul(2).min(len + (256 << 20));
        }
        if !self.ensure_fd() {
            return false;
        }
        // SAFETY: fd is our open file; the mapping calls replace only our own
        // mapping.
        unsafe {
            if libc::posix_fallocate(self.fd, 0, len as libc::off_t) != 0 {
                return false;
            }
            let p = if self.map.is_null() {
                libc::mmap(
                    core::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.fd,
                    0,
                )
            } else {
                libc::mremap(
                    self.map as *mut c_void,
                    self.map_len,
                    len,
                    libc::MREMAP_MAYMOVE,
                )
            };
            if p == libc::MAP_FAILED {
                return false;
            }
            // The first megabyte without readahead: a fault in a fallocated
            // file reads ahead by zeroing a large folio of pages, 0.3 ms of
            // the start-up of every traced process, which needs only the
            // header page. Past it, readahead again, for the exit leak scan
            // that reads the records back.
            let advice = if self.map.is_null() {
                libc::MADV_RANDOM
            } else {
                libc::MADV_NORMAL
            };
            libc::madvise(p, len, advice);
            self.map = p as *mut u8;
        }
        self.map_len = len;
        true
    }

    /// Copies whole records into the file and publishes the new length.
    fn append(&mut self, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return true;
        }
        if self.broken || !self.reserve(bytes.len()) {
            if !self.broken {
                sys::warn(&[b"writing the trace file failed (disk full?); later events are counted as dropped"]);
            }
            self.broken = true;
            return false;
        }
        let off = HEADER_SIZE + self.pos;
        if !self.ensure_fd() || !self.write_at(bytes, off) {
            // SAFETY: `reserve` made [off, off + len) part of the mapping.
            unsafe {
                core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.map.add(off), bytes.len());
            }
            self.release_written_pages(off + bytes.len());
        }
        self.pos += bytes.len();
        self.header_u64(fmt::COMMITTED_OFFSET)
            .store(self.pos as u64, Release);
        true
    }

    /// Takes pages written through the mapping, up to file offset `end`,
    /// out of our page tables. They stay in the page cache (and reach the
    /// disk) as before, but no longer count in the traced process's RSS.
    fn release_written_pages(&mut self, end: usize) {
        const CHUNK: usize = 4 << 20;
        let end = end & !(4096 - 1);
        if end < self.released + CHUNK {
            return;
        }
        // SAFETY: [released, end) is inside our shared file mapping and holds
        // only whole records already written; MADV_DONTNEED on a shared
        // mapping drops our mapping of the pages, not their contents.
        unsafe {
            libc::madvise(
                self.map.add(self.released) as *mut c_void,
                end - self.released,
                libc::MADV_DONTNEED,
            );
        }
        self.released = end;
    }

    /// Whether `fd` is the trace file. When the program closed it (or put
    /// another file on its number), the file is opened again by its path
    /// and kept if it is the same file, by device and inode; once that
    /// fails it is not tried again.
    fn ensure_fd(&mut self) -> bool {
        if file_ident(self.fd) == Some(self.ident) {
            return true;
        }
        let Some(path) = self.path.take() else {
            return false;
        };
        // SAFETY: a NUL-terminated path; the descriptor is ours if it opens.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return false;
        }
        if file_ident(fd) != Some(self.ident) {
            // SAFETY: the descriptor just opened.
            unsafe { libc::close(fd) };
            return false;
        }
        // The old number is the program's now: not closed.
        self.fd = move_high(fd);
        self.path = Some(path);
        true
    }

    /// Writes all of `bytes` at file offset `off` (inside the reserved
    /// length); false on an error other than an interruption.
    fn write_at(&self, mut bytes: &[u8], mut off: usize) -> bool {
        while !bytes.is_empty() {
            // SAFETY: a write from our buffer into our descriptor.
            let n = unsafe {
                libc::pwrite(
                    self.fd,
                    bytes.as_ptr() as *const c_void,
                    bytes.len(),
                    off as libc::off_t,
                )
            };
            if n < 0 {
                if sys::errno() == libc::EINTR {
                    continue;
                }
                return false;
            }
            if n == 0 {
                return false;
            }
            bytes = &bytes[n as usize..];
            off += n as usize;
        }
        true
    }

    fn header_u64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: the header page is mapped for the writer's lifetime and the
        // offset is 8-aligned.
        unsafe { &*(self.map.add(off) as *const AtomicU64) }
    }

    fn write_info(&mut self, forked: bool, ppid: u32) {
        let mut buf = Vec::new();
        let exe = std::fs::read_link("/proc/self/exe")
            .map(|p| p.into_os_string())
            .unwrap_or_default();
        self.enc.info(
            &mut buf,
            b"exe",
            std::os::unix::ffi::OsStrExt::as_bytes(exe.as_os_str()),
        );
        let mut cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
        if cmdline.last() == Some(&0) {
            cmdline.pop();
        }
        self.enc.info(&mut buf, b"cmdline", &cmdline);
        if let Ok(cwd) = std::env::current_dir() {
            self.enc.info(
                &mut buf,
                b"cwd",
                std::os::unix::ffi::OsStrExt::as_bytes(cwd.as_os_str()),
            );
        }
        self.enc.info(
            &mut buf,
            b"tracer",
            concat!("mtrace-rs ", env!("CARGO_PKG_VERSION")).as_bytes(),
        );
        if let Ok(owner) = MALLOC_OWNER.lock() {
            if !owner.is_empty() {
                self.enc.info(&mut buf, b"malloc_owner", &owner);
            }
        }
        if forked {
            self.enc.mark(&mut buf, 0, fmt::mark::FORKED, ppid as u64);
        }
        self.append(&buf);
    }

    /// Runs the exit leak scan over what the file holds and records which
    /// live blocks were unreachable.
    fn leak_scan(&mut self, stack_from: u64) {
        if self.map.is_null() || self.broken {
            return;
        }
        // SAFETY: the mapping covers the header and `pos` bytes of records,
        // and nothing writes to it while we hold BUSY.
        let file = unsafe { core::slice::from_raw_parts(self.map, HEADER_SIZE + self.pos) };
        let (live, maps) = crate::leakscan::replay(file);
        let lost = crate::leakscan::unreachable(&live, &maps, stacks::self_range(), stack_from);
        let ts = sys::now_ns().saturating_sub(self.start_mono);
        let mut buf = Vec::with_capacity(16 + lost.len() * 3);
        self.enc.scan(&mut buf, ts, live.len() as u64, &lost);
        self.append(&buf);
    }

    /// Cuts the file down to its data and drops the mapping; the next append
    /// (if exec fails and the program goes on) maps it again.
    fn shrink_to_data(&mut self) {
        if self.map.is_null() {
            return;
        }
        let ours = self.ensure_fd();
        // SAFETY: our mapping and descriptor; the mapping is dropped before
        // the file shrinks, so no page beyond the end stays mapped.
        unsafe {
            libc::munmap(self.map as *mut c_void, self.map_len);
            if ours {
                libc::ftruncate(self.fd, (HEADER_SIZE + self.pos) as libc::off_t);
            }
        }
        self.map = core::ptr::null_mut();
        self.map_len = 0;
    }

    fn close(&mut self) {
        let ts = sys::now_ns().saturating_sub(self.start_mono);
        let mut buf = Vec::new();
        self.enc.end(&mut buf, ts);
        if self.append(&buf) {
            let flags = self.header_u64(fmt::FLAGS_OFFSET);
            flags.fetch_or(fmt::FLAG_CLEAN_END as u64, Release);
        }
        let ours = self.ensure_fd();
        // SAFETY: our mapping and, if it is still ours, our descriptor;
        // nothing uses them afterwards.
        unsafe {
            libc::munmap(self.map as *mut c_void, self.map_len);
            if ours {
                libc::ftruncate(self.fd, (HEADER_SIZE + self.pos) as libc::off_t);
                libc::close(self.fd);
            }
        }
        self.map = core::ptr::null_mut();
        self.broken = true;
    }

    /// One pass: everything queued so far goes into the file. Returns the
    /// number of events written.
    fn cycle(&mut self) -> usize {
        let mut buf = core::mem::take(&mut self.buf);
        let mut events = core::mem::take(&mut self.events);
        buf.clear();
        events.clear();
        ring::for_each(|r| {
            ring::drain_and_recycle(r, &mut events);
        });
        order_events(&mut events, &mut self.scratch, &mut self.runs);
        self.modules(&mut buf);
        self.stacks(&mut buf);
        for e in &events {
            let ts = e.ts.saturating_sub(self.start_mono);
            match e.kind {
                ring::KIND_FREE => self.enc.free(&mut buf, ts, e.addr),
                ring::KIND_MMAP => self.enc.mmap(&mut buf, ts, e.addr, e.size, e.stack as u64),
                ring::KIND_MUNMAP => self.enc.munmap(&mut buf, ts, e.addr, e.size),
                k => self.enc.alloc(
                    &mut buf,
                    ts,
                    e.addr,
                    e.size,
                    e.stack as u64,
                    k == ring::KIND_SAMPLE,
                ),
            }
        }
        self.stats(&mut buf);
        self.drops(&mut buf);
        if !self.append(&buf) {
            WRITE_FAILED.fetch_add(events.len() as u64, Relaxed);
        }
        let n = events.len();
        self.buf = buf;
        self.events = events;
        n
    }

    fn stacks(&mut self, buf: &mut Vec<u8>) {
        let last = stacks::last_id();
        let mut frames = Vec::with_capacity(64);
        while self.stacks_done < last {
            let id = self.stacks_done + 1;
            let Some(it) = stacks::get(id) else { break };
            frames.clear();
            frames.extend(it);
            self.enc.stack(buf, id as u64, &frames);
            self.stacks_done = id;
        }
    }

    fn drops(&mut self, buf: &mut Vec<u8>) {
        let failed = WRITE_FAILED.load(Relaxed);
        for r in DropReason::ALL {
            let i = r.code() as usize & 7;
            let mut v = tracer::DROPS[i].load(Relaxed);
            if r == DropReason::WriteFailed {
                v += failed;
            }
            if v != self.drops_written[i] {
                self.enc.dropped(buf, r, v);
                self.drops_written[i] = v;
            }
        }
    }

    fn stats(&mut self, buf: &mut Vec<u8>) {
        if self.stats_ms == 0 {
            return;
        }
        let now = sys::now_ns();
        if now < self.next_stats && !self.last_cycle {
            return;
        }
        let mut fields = [(0u64, 0u64); 6];
        let mut n = 0;
        if let Some(rss) = rss_bytes() {
            fields[n] = (fmt::stat::RSS, rss);
            n += 1;
        }
        if real::next_is_glibc() {
            // SAFETY: mallinfo2 only reads glibc's arena statistics.
            let mi = unsafe { libc::mallinfo2() };
            for (k, v) in [
                (fmt::stat::ARENA, mi.arena),
                (fmt::stat::IN_USE, mi.uordblks),
                (fmt::stat::FREE_HELD, mi.fordblks),
                (fmt::stat::MMAPPED, mi.hblkhd),
                (fmt::stat::KEEPCOST, mi.keepcost),
            ] {
                fields[n] = (k, v as u64);
                n += 1;
            }
        }
        let mut interval = self.stats_ms * 1_000_000;
        if !self.stats_ms_set {
            let took = sys::now_ns().saturating_sub(now);
            interval = interval.max(took.saturating_mul(STATS_DUTY));
        }
        self.next_stats = now + interval;
        self.enc
            .stats(buf, now.saturating_sub(self.start_mono), &fields[..n]);
    }

    /// Records modules loaded since the last look (dlopen, or all at start).
    fn modules(&mut self, buf: &mut Vec<u8>) {
        struct Scan<'a> {
            w: &'a mut Writer,
            found: Vec<Module>,
            first: bool,
            changed: bool,
            index: usize,
        }
        unsafe extern "C" fn cb(
            info: *mut libc::dl_phdr_info,
            _size: usize,
            data: *mut c_void,
        ) -> c_int {
            // SAFETY: `data` is the Scan below; `info` is valid for the call.
            let (s, info) = unsafe { (&mut *(data as *mut Scan), &*info) };
            if s.first {
                s.first = false;
                if info.dlpi_adds == s.w.dl_adds && info.dlpi_subs == s.w.dl_subs {
                    return 1; // nothing loaded or unloaded since the last look
                }
                s.w.dl_adds = info.dlpi_adds;
                s.w.dl_subs = info.dlpi_subs;
                s.changed = true;
            }
            // SAFETY: dlpi_name is a NUL-terminated string (or null).
            let mut path = unsafe { sys::cstr_bytes(info.dlpi_name) }.to_vec();
            s.index += 1;
            if path.is_empty() && s.index == 1 {
                // The main program comes first, with an empty name.
                path = std::fs::read_link("/proc/self/exe")
                    .map(|p| std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec())
                    .unwrap_or_default();
            }
            let bias = info.dlpi_addr;
            if s.w.modules.iter().any(|(b, p)| *b == bias && *p == path) {
                return 0;
            }
            let mut m = Module {
                ts: 0,
                bias,
                path,
                build_id: Vec::new(),
                segments: Vec::new(),
            };
            for i in 0..info.dlpi_phnum as usize {
                // SAFETY: dlpi_phdr has dlpi_phnum entries.
                let ph = unsafe { &*info.dlpi_phdr.add(i) };
                if ph.p_type == libc::PT_LOAD {
                    m.segments.push((bias.wrapping_add(ph.p_vaddr), ph.p_memsz));
                } else if ph.p_type == libc::PT_NOTE && m.build_id.is_empty() {
                    // SAFETY: a PT_NOTE segment of a loaded object is mapped.
                    let notes = unsafe {
                        core::slice::from_raw_parts(
                            bias.wrapping_add(ph.p_vaddr) as *const u8,
                            ph.p_memsz as usize,
                        )
                    };
                    m.build_id = build_id(notes).to_vec();
                }
            }
            s.found.push(m);
            0
        }
        let mut scan = Scan {
            w: self,
            found: Vec::new(),
            first: true,
            changed: false,
            index: 0,
        };
        // SAFETY: `cb` matches the callback type and only uses `scan`.
        unsafe { libc::dl_iterate_phdr(Some(cb), &mut scan as *mut Scan as *mut c_void) };
        let Scan { found, changed, .. } = scan;
        if !changed {
            return;
        }
        // New or removed objects: the unwinder needs their unwind tables.
        crate::unwind::refresh();
        let ts = sys::now_ns().saturating_sub(self.start_mono);
        for mut m in found {
            m.ts = ts;
            self.enc.module(buf, &m);
            self.modules.push((m.bias, m.path));
        }
    }
}

/// The GNU build-id in a PT_NOTE segment, or empty.
fn build_id(mut notes: &[u8]) -> &[u8] {
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let namesz = u32::from_ne_bytes([notes[0], notes[1], notes[2], notes[3]]) as usize;
        let descsz = u32::from_ne_bytes([notes[4], notes[5], notes[6], notes[7]]) as usize;
        let ty = u32::from_ne_bytes([notes[8], notes[9], notes[10], notes[11]]);
        let name_end = 12 + align4(namesz);
        let desc_end = name_end + align4(descsz);
        if desc_end > notes.len() {
            break;
        }
        if ty == 3 && namesz == 4 && &notes[12..16] == b"GNU\0" {
            return &notes[name_end..name_end + descsz];
        }
        notes = &notes[desc_end..];
    }
    &[]
}

fn file_ident(fd: c_int) -> Option<(u64, u64)> {
    // SAFETY: fstat fills a local struct.
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some((st.st_dev, st.st_ino))
    }
}

/// The order events are written in: by time, frees before allocations at
/// equal times (an address is freed before it can be handed out again).
#[inline]
fn order_key(e: &Event) -> u128 {
    let alloc_like = e.kind != ring::KIND_FREE && e.kind != ring::KIND_MUNMAP;
    (e.ts as u128) << 1 | alloc_like as u128
}

/// Puts `events` in `order_key` order. Rings are drained one after another
/// and each thread stamps its events in program order, so the events arrive
/// as a few runs already in order, one per ring: the runs are found and
/// merged pairwise through `scratch`, O(n log runs), instead of sorted from
/// scratch (a full sort was a quarter of exact mode's cost on the churn
/// benchmark, callgrind). Many runs (many threads, or events out of order
/// within a ring) fall back to a sort.
fn order_events(events: &mut Vec<Event>, scratch: &mut Vec<Event>, runs: &mut Vec<usize>) {
    const MAX_RUNS: usize = 256;
    runs.clear();
    runs.push(0);
    for i in 1..events.len() {
        if order_key(&events[i]) < order_key(&events[i - 1]) {
            if runs.len() == MAX_RUNS {
                events.sort_unstable_by_key(order_key);
                return;
            }
            runs.push(i);
        }
    }
    runs.push(events.len());
    while runs.len() > 2 {
        scratch.clear();
        scratch.reserve(events.len());
        let mut merged = 1;
        let mut k = 0;
        while k + 1 < runs.len() {
            let (a, b) = (runs[k], runs[k + 1]);
            let c = if k + 2 < runs.len() { runs[k + 2] } else { b };
            merge_into(scratch, &events[a..b], &events[b..c]);
            runs[merged] = c;
            merged += 1;
            k += 2;
        }
        runs.truncate(merged);
        core::mem::swap(events, scratch);
    }
}

/// Appends the merge of two runs in `order_key` order to `out` (ties keep
/// `x`'s events first).
fn merge_into(out: &mut Vec<Event>, x: &[Event], y: &[Event]) {
    let (mut i, mut j) = (0, 0);
    while i < x.len() && j < y.len() {
        if order_key(&y[j]) < order_key(&x[i]) {
            out.push(y[j]);
            j += 1;
        } else {
            out.push(x[i]);
            i += 1;
        }
    }
    out.extend_from_slice(&x[i..]);
    out.extend_from_slice(&y[j..]);
}

fn rss_bytes() -> Option<u64> {
    // /proc/self/statm: size resident shared text lib data dt, in pages.
    let mut b = [0u8; 128];
    let s = sys::read_small(c"/proc/self/statm", &mut b)?;
    let field = s.split(|&c| c == b' ').nth(1)?;
    let pages = config::parse_u64(field)?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Some(pages * page)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: u64, kind: u32, addr: u64) -> Event {
        Event {
            ts,
            addr,
            size: 1,
            stack: 0,
            kind,
        }
    }

    /// Runs of every shape (one per "ring", ties between rings, frees and
    /// allocations at one time stamp, a ring out of order, more runs than
    /// the merge takes) come out in the order a full sort gives.
    #[test]
    fn merged_runs_come_out_as_sorted() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut scratch, mut runs) = (Vec::new(), Vec::new());
        for case in 0..400 {
            let nruns = match case % 4 {
                0 => 1,
                1 => 2,
                2 => 1 + (next() % 9) as usize,
                _ => 200 + (next() % 200) as usize,
            };
            let mut events = Vec::new();
            for r in 0..nruns {
                let mut ts = next() % 50;
                for k in 0..(next() % 40) {
                    ts += next() % 3;
                    let kind = if next() % 2 == 0 {
                        ring::KIND_FREE
                    } else {
                        ring::KIND_ALLOC
                    };
                    events.push(ev(ts, kind, (r as u64) << 32 | k));
                }
                if case % 7 == 0 && !events.is_empty() {
                    // Not every ring is in order.
                    let i = (next() as usize) % events.len();
                    events[i].ts = next() % 100;
                }
            }
            let mut want = events.clone();
            want.sort_by_key(order_key);
            order_events(&mut events, &mut scratch, &mut runs);
            let keys = |v: &[Event]| v.iter().map(order_key).collect::<Vec<_>>();
            assert_eq!(keys(&events), keys(&want), "case {case}");
            let mut got = events.clone();
            got.sort_by_key(|e| (e.addr, e.ts));
            want.sort_by_key(|e| (e.addr, e.ts));
            assert_eq!(got, want, "case {case}: events lost or duplicated");
        }
    }
}
