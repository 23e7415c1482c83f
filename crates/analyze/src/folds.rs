//! Allocator wrappers: functions that only pass an allocation on, and that a
//! report by caller skips to find the function that really asked for memory.
//!
//! A pattern matches a demangled function name in one of two ways:
//! - with `*` (any run of characters) or `?` (one character) it is a glob that
//!   must match the whole name: `std::vector<*>::_M_*`;
//! - without them it matches the name itself, or a longer name that continues
//!   with `(`, `<` or `:` after it, so `malloc` folds `malloc` but not
//!   `malloc_leaker`, and `std::allocator` folds
//!   `std::allocator<char>::allocate(unsigned long)`.
//!
//! Frames without a function name are never folded: they may well be the
//! caller the user is looking for.

/// The default wrapper patterns, in one place. Add to them with `--fold`,
/// remove them all with `--no-default-folds`.
pub const DEFAULT_FOLDS: &[&str] = &[
    // C allocation functions and glibc's internal names for them.
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "aligned_alloc",
    "posix_memalign",
    "valloc",
    "pvalloc",
    "strdup",
    "strndup",
    "__strdup",
    "__strndup",
    "__libc_*",
    "_int_malloc",
    "_int_realloc",
    "tcache_init",
    // Common application wrappers (binutils/gcc libiberty, git, GLib).
    "xmalloc",
    "xcalloc",
    "xrealloc",
    "xstrdup",
    "xstrndup",
    "xmemdup",
    "g_malloc",
    "g_malloc0",
    "g_malloc_n",
    "g_malloc0_n",
    "g_realloc",
    "g_realloc_n",
    "g_try_malloc",
    "g_strdup",
    "g_strndup",
    "g_memdup",
    "g_memdup2",
    // C++ operators and the standard library's allocation plumbing.
    "operator new",
    "operator new[]",
    // Everything in the C++ standard library: containers, strings, streams
    // and their allocators allocate on behalf of the user code that called
    // them, which is the caller worth naming.
    "std::*",
    "__gnu_cxx::*",
    "__cxxabiv1::*",
    // HotSpot.
    "os::malloc",
    "os::realloc",
    "AllocateHeap",
    "ReallocateHeap",
    // Java's native memory entry points: the caller worth naming is the Java
    // method above them (JIT frames are named from CODE records or a perf
    // map).
    "Unsafe_AllocateMemory0",
    "Unsafe_ReallocateMemory0",
    "jdk.internal.misc.Unsafe.*",
    "sun.misc.Unsafe.*",
    "java.nio.DirectByteBuffer.<init>",
    "java.nio.ByteBuffer.allocateDirect",
    // Rust's global allocator and collections' growth paths.
    "__rust_alloc",
    "__rust_alloc_zeroed",
    "__rust_realloc",
    "__rdl_alloc",
    "__rdl_alloc_zeroed",
    "__rdl_realloc",
    "__rg_alloc",
    "__rg_alloc_zeroed",
    "__rg_realloc",
    "alloc::alloc",
    "alloc::raw_vec",
    "<alloc::alloc::Global as core::alloc::Allocator>::*",
    "std::sys::alloc*",
    "std::sys::pal::unix::alloc*",
];

/// A set of wrapper patterns.
#[derive(Clone, Debug, Default)]
pub struct Folds {
    patterns: Vec<String>,
}

impl Folds {
    /// The default patterns, [`DEFAULT_FOLDS`].
    pub fn with_defaults() -> Folds {
        Folds {
            patterns: DEFAULT_FOLDS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// No patterns: every frame counts as a caller.
    pub fn none() -> Folds {
        Folds::default()
    }

    /// Adds a pattern.
    pub fn add(&mut self, pattern: &str) {
        self.patterns.push(pattern.to_string());
    }

    /// True when a frame in `function` is an allocator wrapper.
    pub fn is_wrapper(&self, function: &str) -> bool {
        // glibc's debug info names some functions by their internal hidden
        // alias (`__GI___strdup` for `__strdup`): match the public name.
        let public = function.strip_prefix("__GI_").unwrap_or(function);
        // Demangled template functions carry their return type in front
        // ("void std::vector<int>::_M_realloc_insert<...>(...)"): match the
        // qualified name after it too.
        let qualified = without_return_type(public);
        self.patterns
            .iter()
            .any(|p| matches(p, public) || qualified.is_some_and(|q| matches(p, q)))
    }
}

/// Matches one pattern against a name, see the module documentation.
pub fn matches(pattern: &str, name: &str) -> bool {
    if pattern.contains(['*', '?']) {
        return glob(pattern.as_bytes(), name.as_bytes());
    }
    match name.strip_prefix(pattern) {
        Some(rest) => rest.is_empty() || rest.starts_with(['(', '<', ':']),
        None => false,
    }
}

/// The name after a leading return type: the text after the first space at
/// template depth 0 that comes before the parameter list, if any.
fn without_return_type(name: &str) -> Option<&str> {
    let mut depth = 0i32;
    for (i, c) in name.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            '(' if depth == 0 => return None,
            ' ' if depth == 0 => return Some(&name[i + 1..]),
            _ => {}
        }
    }
    None
}

/// Anchored glob with `*` and `?`, iterative with one backtrack point (the
/// classic algorithm: linear for patterns with a single `*`, never
/// exponential).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_patterns_match_whole_names_or_qualified_continuations() {
        assert!(matches("malloc", "malloc"));
        assert!(!matches("malloc", "malloc_leaker"));
        assert!(!matches("malloc", "xmalloc"));
        assert!(matches("operator new", "operator new(unsigned long)"));
        assert!(!matches("operator new", "operator new[](unsigned long)"));
        assert!(matches("operator new[]", "operator new[](unsigned long)"));
        assert!(matches(
            "std::allocator",
            "std::allocator<char>::allocate(unsigned long)"
        ));
        assert!(matches("alloc::raw_vec", "alloc::raw_vec::finish_grow"));
    }

    #[test]
    fn cpp_library_frames_fold_even_with_a_return_type() {
        let f = Folds::with_defaults();
        assert!(f.is_wrapper("void std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(__gnu_cxx::__normal_iterator<int*, std::vector<int, std::allocator<int> > >, int const&)"));
        assert!(f.is_wrapper("std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >::push_back(char)"));
        assert!(!f.is_wrapper("leak_string()"));
        assert!(!f.is_wrapper("void encode(std::vector<int>&)"));
    }

    #[test]
    fn globs_match_the_whole_name() {
        assert!(matches("__libc_*", "__libc_malloc"));
        assert!(matches(
            "std::vector<*>::_M_*",
            "std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(int const&)"
        ));
        assert!(!matches(
            "std::vector<*>::_M_*",
            "std::vector<int>::push_back(int)"
        ));
        assert!(matches("*leak*", "leak_on_error"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "abbc"));
    }

    #[test]
    fn defaults_fold_wrappers_and_keep_callers() {
        let f = Folds::with_defaults();
        for w in [
            "malloc",
            "operator new(unsigned long)",
            "g_malloc0",
            "__rust_alloc",
        ] {
            assert!(f.is_wrapper(w), "{w}");
        }
        for c in ["main", "leak_on_error", "malloc_leaker"] {
            assert!(!f.is_wrapper(c), "{c}");
        }
        assert!(!Folds::none().is_wrapper("malloc"));
    }
}
