//! Offline symbolization: turns the return addresses of a stack into
//! functions, source lines and modules, using the binaries and debug files on
//! disk (the traced process recorded only module maps and build-ids).
//!
//! The [`Symbolizer`] trait keeps the report independent of ELF files, so
//! tests can aggregate with a synthetic symbolizer. [`ElfSymbolizer`] is the
//! real one: for each module it opens the file once (checking the recorded
//! build-id), finds separate debug info, and asks `addr2line` (gimli) for
//! function, file, line and inlined frames, falling back to the ELF symbol
//! table (`.symtab`, else `.dynsym`) for the function name.
//!
//! **Invariant:** one loaded context per module, loaded on first use or
//! ahead of it by a [`Preloader`] (only modules that recorded stacks use,
//! so loading ahead gives the lookups the same files; a failed preload is
//! dropped and retried on first use, where its warning is said); the files
//! are memory-mapped by `addr2line`, not read into memory.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use mtrace_format::Module;
use object::{Object, ObjectSection};

/// One symbolized frame. An address can expand to several: the inlined
/// functions first (innermost), then the function that holds the code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// Demangled function name, `None` when unknown.
    pub function: Option<String>,
    /// Source file as recorded in the debug info.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Basename of the module (`libc.so.6`), `None` when the address lies in
    /// no recorded module.
    pub module: Option<String>,
    /// The address relative to the module's load bias (for `module+0x..`).
    pub offset: u64,
    /// True for a frame inlined into the next one.
    pub inlined: bool,
}

/// Resolves return addresses.
pub trait Symbolizer {
    /// The frames for return address `ret` as recorded in a stack (the
    /// symbolizer looks up `ret - 1`, inside the call instruction), innermost
    /// inlined frame first. Never empty.
    fn symbolize(&mut self, ret: u64) -> Vec<Frame>;

    /// Warnings collected so far (missing files, build-id mismatches), each
    /// said once; the caller prints them.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// Demangles a Rust (legacy or v0) or C++ symbol; other names pass through.
pub fn demangle(name: &str) -> String {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        // `{:#}` leaves out the hash suffix.
        return format!("{d:#}");
    }
    if name.starts_with("_Z") {
        if let Ok(sym) = cpp_demangle::Symbol::new(name) {
            if let Ok(d) = sym.demangle(&Default::default()) {
                return d;
            }
        }
    }
    name.to_string()
}

/// The basename of a module path, or the path itself when it has none.
pub fn module_name(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    match s.rsplit_once('/') {
        Some((_, base)) if !base.is_empty() => base.to_string(),
        _ => s.into_owned(),
    }
}

enum LoadState {
    NotTried,
    /// `primary` holds the DWARF (the binary or its separate debug file);
    /// `secondary` is the binary's own symbol table when `primary` is a
    /// debug file.
    Loaded {
        primary: Box<addr2line::Loader>,
        secondary: Option<Box<addr2line::Loader>>,
    },
    /// No usable file: addresses show as `module+0xoffset`.
    Unavailable,
}

struct ModuleEntry {
    module: Module,
    name: String,
    state: LoadState,
}

/// A range of generated code with its name: from the trace's CODE records
/// (the JVMTI agent) or a perf map (`/tmp/perf-<pid>.map`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeRange {
    pub start: u64,
    pub len: u64,
    pub name: String,
}

/// Reads a perf map: lines of `START SIZE name` with hexadecimal START and
/// SIZE, as written by `jcmd PID Compiler.perfmap`, `-XX:+DumpPerfMapAtExit`,
/// perf-map-agent and node's `--perf-basic-prof`. Bad lines are skipped.
pub fn read_perf_map(text: &str) -> Vec<CodeRange> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let start = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
            let len = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
            let name = parts.next()?.trim().to_string();
            (!name.is_empty()).then_some(CodeRange { start, len, name })
        })
        .collect()
}

/// Symbolizes with the ELF files named in the trace's MODULE records.
pub struct ElfSymbolizer {
    modules: Vec<ModuleEntry>,
    /// Generated code, sorted by start; consulted for addresses in no module.
    code: Vec<CodeRange>,
    /// The executable's path (INFO "exe"), for a main-program module that
    /// was recorded without a path.
    exe: Option<PathBuf>,
    debug_dirs: Vec<PathBuf>,
    warnings: Vec<String>,
}

impl ElfSymbolizer {
    /// A symbolizer for these modules (in file order: a later record wins
    /// where ranges overlap) that also looks for debug files in `debug_dirs`.
    pub fn new(modules: &[Module], debug_dirs: Vec<PathBuf>) -> ElfSymbolizer {
        ElfSymbolizer {
            modules: modules
                .iter()
                .map(|m| ModuleEntry {
                    name: module_name(&m.path),
                    module: m.clone(),
                    state: LoadState::NotTried,
                })
                .collect(),
            code: Vec::new(),
            exe: None,
            debug_dirs,
            warnings: Vec::new(),
        }
    }

    /// Adds generated-code ranges (later ones win where they overlap: the
    /// JIT reuses addresses after it unloads code).
    pub fn with_code(mut self, ranges: &[CodeRange]) -> ElfSymbolizer {
        // A stable sort keeps file order among equal starts; the lookup
        // takes the last range that contains the address.
        self.code.extend(ranges.iter().cloned());
        self.code.sort_by_key(|r| r.start);
        self
    }

    /// The name of the generated code holding `pc`, if any.
    fn find_code(&self, pc: u64) -> Option<&CodeRange> {
        let end = self.code.partition_point(|r| r.start <= pc);
        // Ranges are short and rarely nested: look back a little for one
        // that contains pc, preferring the latest start.
        self.code[..end]
            .iter()
            .rev()
            .take(64)
            .find(|r| pc - r.start < r.len.max(1))
    }

    /// Uses `exe` for a module recorded without a path whose build-id
    /// matches it (`dl_iterate_phdr` names the main program "").
    pub fn with_exe(mut self, exe: Option<&str>) -> ElfSymbolizer {
        self.exe = exe.filter(|e| !e.is_empty()).map(PathBuf::from);
        self
    }

    /// The latest module whose segments contain `addr`.
    fn find_module(&self, addr: u64) -> Option<usize> {
        self.modules.iter().rposition(|e| {
            e.module
                .segments
                .iter()
                .any(|&(start, len)| addr >= start && addr - start < len)
        })
    }

    /// Installs the modules `preloader` loaded (waiting for it to finish)
    /// into the entries with the same path, bias and build-id that were
    /// not loaded yet. What it failed to load is left to load on first use,
    /// with its warning then, as without preloading.
    pub fn with_preloaded(mut self, preloader: Preloader) -> ElfSymbolizer {
        if preloader.debug_dirs != self.debug_dirs {
            return self;
        }
        // A panicked preloader (it cannot) only costs the loading time.
        let loaded = preloader.thread.join().unwrap_or_default();
        for (module, (primary, secondary)) in loaded {
            let entry = self.modules.iter_mut().rev().find(|e| {
                matches!(e.state, LoadState::NotTried)
                    && e.module.path == module.path
                    && e.module.bias == module.bias
                    && e.module.build_id == module.build_id
            });
            if let Some(e) = entry {
                e.state = LoadState::Loaded { primary, secondary };
            }
        }
        self
    }

    fn load(&mut self, idx: usize) {
        if self.modules[idx].module.path.is_empty() && !self.modules[idx].module.build_id.is_empty()
        {
            if let Some(exe) = &self.exe {
                let same = elf_facts(exe)
                    .is_ok_and(|f| f.build_id.as_ref() == Some(&self.modules[idx].module.build_id));
                if same {
                    let entry = &mut self.modules[idx];
                    entry.module.path = exe.as_os_str().as_encoded_bytes().to_vec();
                    entry.name = module_name(&entry.module.path);
                }
            }
        }
        let entry = &self.modules[idx];
        let path_bytes = &entry.module.path;
        let state = if is_pseudo(path_bytes) {
            LoadState::Unavailable
        } else {
            match open_module(&entry.module, &self.debug_dirs) {
                Ok((primary, secondary)) => LoadState::Loaded { primary, secondary },
                Err(why) => {
                    self.warnings.push(format!(
                        "{}: {why}; its frames show as {}+0xoffset",
                        String::from_utf8_lossy(path_bytes),
                        entry.name
                    ));
                    LoadState::Unavailable
                }
            }
        };
        self.modules[idx].state = state;
    }
}

impl Symbolizer for ElfSymbolizer {
    fn symbolize(&mut self, ret: u64) -> Vec<Frame> {
        let pc = ret.saturating_sub(1);
        let Some(idx) = self.find_module(pc) else {
            if let Some(r) = self.find_code(pc) {
                return vec![Frame {
                    function: Some(r.name.clone()),
                    module: Some("jit".to_string()),
                    offset: ret - r.start,
                    ..Frame::default()
                }];
            }
            return vec![Frame {
                offset: ret,
                ..Frame::default()
            }];
        };
        if let LoadState::NotTried = self.modules[idx].state {
            self.load(idx);
        }
        let entry = &self.modules[idx];
        let probe = pc.wrapping_sub(entry.module.bias);
        let base = Frame {
            module: Some(entry.name.clone()),
            offset: ret.wrapping_sub(entry.module.bias),
            ..Frame::default()
        };
        let LoadState::Loaded { primary, secondary } = &entry.state else {
            return vec![base];
        };
        let mut out: Vec<Frame> = Vec::new();
        if let Ok(mut frames) = primary.find_frames(probe) {
            while let Ok(Some(f)) = frames.next() {
                let function = f
                    .function
                    .as_ref()
                    .and_then(|n| n.raw_name().ok())
                    .map(|n| demangle(&n));
                let (file, line) = match &f.location {
                    Some(loc) => (loc.file.map(str::to_string), loc.line),
                    None => (None, None),
                };
                out.push(Frame {
                    function,
                    file,
                    line,
                    inlined: true,
                    ..base.clone()
                });
            }
        }
        if let Some(last) = out.last_mut() {
            last.inlined = false;
        } else {
            out.push(base);
        }
        // The outermost frame is the real function: name it from the symbol
        // table when the DWARF did not (no debug info, or a unit without
        // subprograms).
        let last = out.last_mut().expect("at least one frame");
        if last.function.is_none() {
            let sym = primary
                .find_symbol(probe)
                .or_else(|| secondary.as_ref().and_then(|s| s.find_symbol(probe)));
            last.function = sym.map(demangle);
        }
        out
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

/// Loads, on a thread of its own, the modules that the stacks known so far
/// use, for [`ElfSymbolizer::with_preloaded`]: the start of a trace already
/// names the modules and the first stacks (nearly every stack passes through
/// the same few libraries), so their debug info can be loaded while the rest
/// of the trace is read.
pub struct Preloader {
    debug_dirs: Vec<PathBuf>,
    thread: std::thread::JoinHandle<Vec<(Module, Loaded)>>,
}

impl Preloader {
    /// Starts loading each of `modules` (in file order, as for
    /// [`ElfSymbolizer::new`]) that holds one of the return addresses
    /// `returns` and names a file (not the main program recorded without a
    /// path, nor the vdso), looking for debug files in `debug_dirs` as well.
    pub fn start(modules: &[Module], returns: Vec<u64>, debug_dirs: Vec<PathBuf>) -> Preloader {
        let modules = modules.to_vec();
        let dirs = debug_dirs.clone();
        let thread = std::thread::spawn(move || {
            let mut used = vec![false; modules.len()];
            for ret in returns {
                let pc = ret.saturating_sub(1);
                // The module `ElfSymbolizer::find_module` picks.
                if let Some(i) = modules.iter().rposition(|m| {
                    m.segments
                        .iter()
                        .any(|&(start, len)| pc >= start && pc - start < len)
                }) {
                    used[i] = true;
                }
            }
            modules
                .into_iter()
                .zip(used)
                .filter(|(m, used)| *used && !is_pseudo(&m.path))
                .filter_map(|(m, _)| {
                    let loaded = open_module(&m, &dirs).ok()?;
                    Some((m, loaded))
                })
                .collect()
        });
        Preloader { debug_dirs, thread }
    }
}

/// True for a module with no file to read: the main program recorded
/// without a path, `[vdso]` and the like.
fn is_pseudo(path: &[u8]) -> bool {
    path.is_empty()
        || path.starts_with(b"[")
        || path.starts_with(b"linux-vdso")
        || path.starts_with(b"linux-gate")
}

/// Facts about one ELF file on disk, read without mapping it.
struct ElfFacts {
    build_id: Option<Vec<u8>>,
    has_dwarf: bool,
    debuglink: Option<String>,
}

fn elf_facts(path: &Path) -> Result<ElfFacts, String> {
    let file = File::open(path).map_err(|e| format!("cannot open the file ({e})"))?;
    // A read cache parses only the headers and notes we ask for, so checking
    // a large library does not read it whole (and needs no unsafe mmap).
    let cache = object::ReadCache::new(file);
    let obj = object::File::parse(&cache).map_err(|e| format!("not a readable ELF file ({e})"))?;
    let build_id = obj.build_id().ok().flatten().map(<[u8]>::to_vec);
    let has_dwarf = obj
        .section_by_name(".debug_info")
        .is_some_and(|s| s.size() > 0);
    let debuglink = obj
        .gnu_debuglink()
        .ok()
        .flatten()
        .map(|(name, _crc)| String::from_utf8_lossy(name).into_owned());
    Ok(ElfFacts {
        build_id,
        has_dwarf,
        debuglink,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Loaded = (Box<addr2line::Loader>, Option<Box<addr2line::Loader>>);

/// Opens a module's file and, when it has no DWARF, its separate debug file.
fn open_module(module: &Module, debug_dirs: &[PathBuf]) -> Result<Loaded, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(&module.path));
    let facts = elf_facts(path)?;
    let recorded = (!module.build_id.is_empty()).then_some(&module.build_id[..]);
    if let (Some(want), Some(have)) = (recorded, facts.build_id.as_deref()) {
        if want != have {
            return Err(format!(
                "build-id {} differs from the traced one {} (the file changed after tracing)",
                hex(have),
                hex(want)
            ));
        }
    }
    let load = |p: &Path| {
        addr2line::Loader::new(p)
            .map(Box::new)
            .map_err(|e| format!("cannot load {} ({e})", p.display()))
    };
    let binary = load(path)?;
    if facts.has_dwarf {
        return Ok((binary, None));
    }
    let build_id = recorded.map(<[u8]>::to_vec).or(facts.build_id);
    for candidate in debug_candidates(
        path,
        build_id.as_deref(),
        facts.debuglink.as_deref(),
        debug_dirs,
    ) {
        let Ok(dbg) = elf_facts(&candidate) else {
            continue;
        };
        let matches = match (build_id.as_deref(), dbg.build_id.as_deref()) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        };
        if matches && dbg.has_dwarf {
            if let Ok(primary) = load(&candidate) {
                return Ok((primary, Some(binary)));
            }
        }
    }
    Ok((binary, None))
}

/// Where separate debug info may be, in the order gdb looks: by build-id
/// under `/usr/lib/debug/.build-id` and each `--debug-dir`, then by the
/// `.gnu_debuglink` name next to the file, in its `.debug` directory, under
/// `/usr/lib/debug` and in each `--debug-dir`.
fn debug_candidates(
    path: &Path,
    build_id: Option<&[u8]>,
    debuglink: Option<&str>,
    debug_dirs: &[PathBuf],
) -> Vec<PathBuf> {
    let mut roots: Vec<Cow<'_, Path>> = vec![Cow::Borrowed(Path::new("/usr/lib/debug"))];
    roots.extend(debug_dirs.iter().map(|d| Cow::Borrowed(d.as_path())));
    let mut out = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() >= 2) {
        let (head, rest) = (hex(&id[..1]), hex(&id[1..]));
        for root in &roots {
            out.push(
                root.join(".build-id")
                    .join(&head)
                    .join(format!("{rest}.debug")),
            );
        }
        for dir in debug_dirs {
            out.push(dir.join(&head).join(format!("{rest}.debug")));
        }
    }
    if let Some(link) = debuglink {
        let dir = path.parent().unwrap_or(Path::new("/"));
        out.push(dir.join(link));
        out.push(dir.join(".debug").join(link));
        let rel = dir.strip_prefix("/").unwrap_or(dir);
        out.push(Path::new("/usr/lib/debug").join(rel).join(link));
        for d in debug_dirs {
            out.push(d.join(link));
        }
    }
    out.retain(|p| p != path);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_cpp_and_rust() {
        assert_eq!(demangle("_Znwm"), "operator new(unsigned long)");
        assert_eq!(
            demangle("_ZN3std2io5stdio6_print17h0123456789abcdefE"),
            "std::io::stdio::_print"
        );
        assert_eq!(demangle("leak_on_error"), "leak_on_error");
    }

    #[test]
    fn module_names_are_basenames() {
        assert_eq!(module_name(b"/usr/lib/libc.so.6"), "libc.so.6");
        assert_eq!(module_name(b"[vdso]"), "[vdso]");
        assert_eq!(module_name(b""), "");
    }

    #[test]
    fn addresses_outside_modules_keep_the_address() {
        let mut s = ElfSymbolizer::new(&[], Vec::new());
        let f = s.symbolize(0x1234);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].module, None);
        assert_eq!(f[0].offset, 0x1234);
    }

    /// A module whose file does not exist.
    fn gone_module() -> Module {
        Module {
            ts: 0,
            bias: 0x1000,
            path: b"/nonexistent/libgone.so".to_vec(),
            build_id: vec![1, 2, 3],
            segments: vec![(0x1000, 0x1000)],
        }
    }

    #[test]
    fn missing_files_fall_back_to_module_offsets_with_one_warning() {
        let m = gone_module();
        let mut s = ElfSymbolizer::new(&[m], Vec::new());
        let a = s.symbolize(0x1100);
        let b = s.symbolize(0x1200);
        assert_eq!(a[0].module.as_deref(), Some("libgone.so"));
        assert_eq!(a[0].function, None);
        assert_eq!(a[0].offset, 0x100);
        assert_eq!(b[0].offset, 0x200);
        assert_eq!(s.take_warnings().len(), 1);
    }

    #[test]
    fn jit_code_names_addresses_outside_every_module() {
        let map = read_perf_map(
            "7f00001000 40 LOffHeapLeak;::encodeOnDisconnect\n\
             bad line\n\
             7f00002000 20 Interpreter\n",
        );
        assert_eq!(map.len(), 2);
        let later = CodeRange {
            start: 0x7f_0000_1000,
            len: 0x10,
            name: "recompiled".into(),
        };
        let mut s = ElfSymbolizer::new(&[], Vec::new())
            .with_code(&map)
            .with_code(&[later]);
        let f = &s.symbolize(0x7f_0000_1008)[0];
        assert_eq!(f.function.as_deref(), Some("recompiled"));
        assert_eq!(f.module.as_deref(), Some("jit"));
        let f = &s.symbolize(0x7f_0000_1030)[0];
        assert_eq!(
            f.function.as_deref(),
            Some("LOffHeapLeak;::encodeOnDisconnect")
        );
        assert_eq!(s.symbolize(0x7f_0000_3000)[0].function, None);
    }

    /// The running test binary as a module, from `/proc/self/maps`.
    fn this_test_binary() -> Module {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut segments = Vec::new();
        let mut lowest = u64::MAX;
        for line in maps.lines() {
            if !line.ends_with(exe.to_str().unwrap()) {
                continue;
            }
            let range = line.split(' ').next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            let off = u64::from_str_radix(line.split(' ').nth(2).unwrap(), 16).unwrap();
            lowest = lowest.min(a - off);
            segments.push((a, b - a));
        }
        // A PIE is linked at 0, so the lowest mapping minus its file offset
        // is the load bias.
        Module {
            ts: 0,
            bias: lowest,
            path: exe.as_os_str().as_encoded_bytes().to_vec(),
            build_id: Vec::new(),
            segments,
        }
    }

    #[test]
    fn symbolizes_this_test_binary() {
        // This very function's address, found through the module map of the
        // running test, must come back with its name and this file.
        let here = symbolizes_this_test_binary as *const () as usize as u64;
        let mut s = ElfSymbolizer::new(&[this_test_binary()], Vec::new());
        let frames = s.symbolize(here + 1);
        let f = frames.last().unwrap();
        assert!(
            f.function
                .as_deref()
                .is_some_and(|n| n.contains("symbolizes_this_test_binary")),
            "{frames:?}"
        );
        assert!(
            f.file
                .as_deref()
                .is_some_and(|p| p.ends_with("symbolize.rs")),
            "{frames:?}"
        );
    }

    #[test]
    fn preloaded_modules_symbolize_alike_and_failures_still_warn() {
        let here =
            preloaded_modules_symbolize_alike_and_failures_still_warn as *const () as usize as u64;
        let gone = gone_module();
        let unused = Module {
            path: b"/nonexistent/libunused.so".to_vec(),
            segments: vec![(0x4000, 0x1000)],
            ..gone.clone()
        };
        let modules = [this_test_binary(), gone, unused];
        let returns = vec![here + 1, 0x1100, 0x9999];
        let p = Preloader::start(&modules, returns, Vec::new());
        let mut pre = ElfSymbolizer::new(&modules, Vec::new()).with_preloaded(p);
        assert!(matches!(pre.modules[0].state, LoadState::Loaded { .. }));
        assert!(matches!(pre.modules[1].state, LoadState::NotTried));
        assert!(matches!(pre.modules[2].state, LoadState::NotTried));
        let mut plain = ElfSymbolizer::new(&modules, Vec::new());
        for ret in [here + 1, 0x1100, 0x1200] {
            assert_eq!(pre.symbolize(ret), plain.symbolize(ret));
        }
        let warnings = pre.take_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings, plain.take_warnings());
    }
}
