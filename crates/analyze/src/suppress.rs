//! Leak suppressions in LeakSanitizer's format, and the built-in ones.
//!
//! A suppressions file holds one `leak:PATTERN` per line; blank lines and
//! lines starting with `#` are ignored. As in LeakSanitizer
//! (`sanitizer_common/sanitizer_suppressions.cpp`, `TemplateMatch`), a
//! pattern matches a string when it occurs anywhere in it (substring), `*`
//! stands for any run of characters, a leading `^` anchors the pattern at
//! the start and a trailing `$` at the end. A leak is suppressed when the
//! pattern matches the function name, the module's basename or the source
//! file path of *any* frame of its allocation stack (inlined frames
//! included).
//!
//! The built-in suppressions ([`DEFAULT_SUPPRESSIONS`], documented in
//! `crates/analyze/SUPPRESSIONS.md`) cover memory that the C runtime, the C++
//! runtime and the JVM allocate once and by design never free. Some of them
//! match only the *allocating* frame (the first frame that is not an
//! allocator wrapper) instead of any frame: "anything allocated by code in
//! libjvm.so" is the JVM's own business, but "anything with libjvm.so
//! somewhere below it" would be every allocation a Java program makes
//! through native code.

use std::fmt;

use crate::symbolize::Frame;

/// Which frames of a stack a suppression looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every frame, as LeakSanitizer does: the rule for suppression files.
    AnyFrame,
    /// Only the allocating frame: the first frame that is not an allocator
    /// wrapper (see [`crate::folds`]).
    Allocator,
}

/// Where a suppression comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in list; the text says what the memory is.
    Default { why: &'static str },
    /// A line of a suppressions file.
    File { path: String, line: usize },
}

/// One suppression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suppression {
    /// The pattern after `leak:`.
    pub pattern: String,
    pub scope: Scope,
    pub origin: Origin,
}

impl Suppression {
    /// The suppression as a line of a suppressions file (`leak:PATTERN`).
    pub fn text(&self) -> String {
        format!("leak:{}", self.pattern)
    }

    /// True when the suppression matches a stack: `frames` are the
    /// symbolized frames of every address, innermost first, and
    /// `allocator` the index in `frames` of the allocating frame.
    pub fn matches(&self, frames: &[Frame], allocator: Option<usize>) -> bool {
        match self.scope {
            Scope::AnyFrame => frames.iter().any(|f| self.matches_frame(f)),
            Scope::Allocator => allocator
                .and_then(|i| frames.get(i))
                .is_some_and(|f| self.matches_frame(f)),
        }
    }

    fn matches_frame(&self, f: &Frame) -> bool {
        let p = &self.pattern;
        f.function.as_deref().is_some_and(|s| template_match(p, s))
            || f.module.as_deref().is_some_and(|s| template_match(p, s))
            || f.file.as_deref().is_some_and(|s| template_match(p, s))
    }
}

/// A built-in suppression: pattern, scope, and what the memory is.
pub struct DefaultSuppression {
    pub pattern: &'static str,
    pub scope: Scope,
    pub why: &'static str,
}

/// The built-in suppressions, in one place. Each is memory the runtime
/// allocates once (per process or per thread) and never frees by design, so
/// it is outstanding at every exit of every program. Keep
/// `crates/analyze/SUPPRESSIONS.md` in step (a test checks it names each
/// pattern). Turn them off with `--no-default-suppressions`.
///
/// Deliberately absent: `fopen` and `opendir` (an unclosed `FILE` or `DIR`
/// is the program's leak), `strdup` and friends, `getaddrinfo` (the caller
/// must call `freeaddrinfo`), and whole libraries such as libc.so.6 (every
/// leak passes through libc).
pub const DEFAULT_SUPPRESSIONS: &[DefaultSuppression] = &[
    // ld.so: thread-local storage and the dynamic thread vector. The main
    // thread's TLS block lives until exit; a thread's is freed when it is
    // joined, so a leak here is a thread still running at exit.
    DefaultSuppression {
        pattern: "_dl_allocate_tls",
        scope: Scope::AnyFrame,
        why: "ld.so: static TLS blocks of threads alive at exit",
    },
    DefaultSuppression {
        pattern: "allocate_dtv",
        scope: Scope::AnyFrame,
        why: "ld.so: dynamic thread vectors",
    },
    DefaultSuppression {
        pattern: "_dl_resize_dtv",
        scope: Scope::AnyFrame,
        why: "ld.so: dynamic thread vectors grown by dlopen of TLS libraries",
    },
    DefaultSuppression {
        pattern: "_dl_update_slotinfo",
        scope: Scope::AnyFrame,
        why: "ld.so: TLS of dlopen'ed libraries",
    },
    DefaultSuppression {
        pattern: "_dl_init_paths",
        scope: Scope::AnyFrame,
        why: "ld.so: the library search path, built once",
    },
    DefaultSuppression {
        pattern: "_dl_new_object",
        scope: Scope::AnyFrame,
        why: "ld.so: link maps of loaded libraries",
    },
    DefaultSuppression {
        pattern: "_dl_map_object",
        scope: Scope::AnyFrame,
        why: "ld.so: loading a library",
    },
    // glibc stdio: the buffer of stdin, stdout and stderr is allocated on
    // first use and never freed (glibc frees it only under valgrind's
    // __libc_freeres).
    DefaultSuppression {
        pattern: "_IO_file_doallocate",
        scope: Scope::AnyFrame,
        why: "glibc stdio: stream buffers, allocated on first use",
    },
    // glibc locale data loaded by setlocale, kept for the process's life.
    DefaultSuppression {
        pattern: "_nl_find_locale",
        scope: Scope::AnyFrame,
        why: "glibc: locale data loaded by setlocale",
    },
    DefaultSuppression {
        pattern: "_nl_intern_locale_data",
        scope: Scope::AnyFrame,
        why: "glibc: locale data loaded by setlocale",
    },
    DefaultSuppression {
        pattern: "_nl_load_locale_from_archive",
        scope: Scope::AnyFrame,
        why: "glibc: locale archive mapped by setlocale",
    },
    DefaultSuppression {
        pattern: "^setlocale$",
        scope: Scope::AnyFrame,
        why: "glibc: locale names kept by setlocale",
    },
    DefaultSuppression {
        pattern: "_nl_init_domain_conv",
        scope: Scope::AnyFrame,
        why: "glibc gettext: message catalog conversion state",
    },
    DefaultSuppression {
        pattern: "_nl_load_domain",
        scope: Scope::AnyFrame,
        why: "glibc gettext: loaded message catalogs",
    },
    DefaultSuppression {
        pattern: "__gconv_open",
        scope: Scope::Allocator,
        why: "glibc iconv: cached conversion modules",
    },
    DefaultSuppression {
        pattern: "__nss_database_get",
        scope: Scope::AnyFrame,
        why: "glibc NSS: the parsed nsswitch.conf",
    },
    DefaultSuppression {
        pattern: "__nss_module_get",
        scope: Scope::AnyFrame,
        why: "glibc NSS: loaded NSS modules",
    },
    DefaultSuppression {
        pattern: "__libc_dlopen_mode",
        scope: Scope::AnyFrame,
        why: "glibc: libraries glibc loads for itself (NSS, iconv, libgcc_s)",
    },
    DefaultSuppression {
        pattern: "__res_context_get",
        scope: Scope::AnyFrame,
        why: "glibc resolver: per-thread resolver state",
    },
    // libstdc++: the per-thread exception globals and the emergency
    // exception-allocation pool, allocated at start-up.
    DefaultSuppression {
        pattern: "__cxa_get_globals",
        scope: Scope::AnyFrame,
        why: "libstdc++: per-thread exception globals",
    },
    DefaultSuppression {
        pattern: "^(anonymous namespace)::pool::pool",
        scope: Scope::AnyFrame,
        why: "libstdc++: the emergency exception pool (eh_alloc.cc)",
    },
    DefaultSuppression {
        pattern: "eh_alloc.cc",
        scope: Scope::Allocator,
        why: "libstdc++: the emergency exception pool (eh_alloc.cc)",
    },
    DefaultSuppression {
        pattern: "std::locale::_Impl::_Impl",
        scope: Scope::AnyFrame,
        why: "libstdc++: the classic and global std::locale",
    },
    DefaultSuppression {
        pattern: "std::ios_base::Init::Init",
        scope: Scope::AnyFrame,
        why: "libstdc++: the standard streams (cout, cin, ...)",
    },
    // The JVM: HotSpot never frees its own structures at exit (metadata,
    // code cache bookkeeping, thread structures, the launcher's arguments).
    // Only the allocating frame counts, so that a leak in a JNI library
    // called from Java is still reported.
    DefaultSuppression {
        pattern: "^libjvm.so$",
        scope: Scope::Allocator,
        why: "HotSpot: the JVM's own structures, never freed at exit",
    },
    DefaultSuppression {
        pattern: "^libjli.so$",
        scope: Scope::Allocator,
        why: "the java launcher: arguments and settings",
    },
];

/// An ordered list of suppressions: user files first, then the built-ins,
/// the first match wins (and is the one counted as used).
#[derive(Clone, Debug, Default)]
pub struct Suppressions {
    pub list: Vec<Suppression>,
}

/// A line of a suppressions file that is not a suppression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub path: String,
    pub line: usize,
    pub what: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path, self.line, self.what)
    }
}

impl std::error::Error for ParseError {}

impl Suppressions {
    /// No suppressions.
    pub fn none() -> Suppressions {
        Suppressions::default()
    }

    /// The built-in list, [`DEFAULT_SUPPRESSIONS`].
    pub fn with_defaults() -> Suppressions {
        let mut s = Suppressions::none();
        s.add_defaults();
        s
    }

    /// Appends the built-in list.
    pub fn add_defaults(&mut self) {
        self.list
            .extend(DEFAULT_SUPPRESSIONS.iter().map(|d| Suppression {
                pattern: d.pattern.to_string(),
                scope: d.scope,
                origin: Origin::Default { why: d.why },
            }));
    }

    /// Appends the suppressions of a file's text; `path` names it in
    /// errors. Only `leak:` suppressions are understood: a sanitizer's other
    /// kinds (`race:`, `called_from_lib:`, ...) are errors rather than rules
    /// silently ignored.
    pub fn add_file(&mut self, path: &str, text: &str) -> Result<(), ParseError> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |what: String| ParseError {
                path: path.to_string(),
                line: i + 1,
                what,
            };
            let Some((kind, pattern)) = line.split_once(':') else {
                return Err(err(format!(
                    "`{line}` is not a suppression: expected `leak:PATTERN`"
                )));
            };
            if kind.trim() != "leak" {
                return Err(err(format!(
                    "`{}:` suppressions are not understood, only `leak:PATTERN`",
                    kind.trim()
                )));
            }
            let pattern = pattern.trim();
            if pattern.is_empty() {
                return Err(err("an empty pattern would suppress every leak".into()));
            }
            self.list.push(Suppression {
                pattern: pattern.to_string(),
                scope: Scope::AnyFrame,
                origin: Origin::File {
                    path: path.to_string(),
                    line: i + 1,
                },
            });
        }
        Ok(())
    }

    /// The index of the first suppression matching a stack.
    pub fn find(&self, frames: &[Frame], allocator: Option<usize>) -> Option<usize> {
        self.list.iter().position(|s| s.matches(frames, allocator))
    }
}

/// LeakSanitizer's `TemplateMatch`: `*` is any run of characters, a leading
/// `^` anchors at the start, a trailing `$` at the end, and otherwise the
/// pattern may match anywhere in `s`.
pub fn template_match(pattern: &str, s: &str) -> bool {
    let (anchor_start, p) = match pattern.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let (anchor_end, p) = match p.strip_suffix('$') {
        Some(rest) => (true, rest),
        None => (false, p),
    };
    let pieces: Vec<&str> = p.split('*').collect();
    let mut pos = 0usize;
    for (i, piece) in pieces.iter().enumerate() {
        let first = i == 0;
        let last = i + 1 == pieces.len();
        if first && anchor_start {
            if !s.starts_with(piece) {
                return false;
            }
            pos = piece.len();
            if last && anchor_end {
                return pos == s.len();
            }
            continue;
        }
        if last && anchor_end {
            // The last piece must end the string, after what matched so far.
            return s.len() >= pos + piece.len() && s[pos..].ends_with(piece);
        }
        match s[pos..].find(piece) {
            Some(at) => pos += at + piece.len(),
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_match_is_lsans() {
        assert!(template_match("leak", "my_leaky_fn"));
        assert!(template_match("foo*bar", "xfoo_and_barx"));
        assert!(!template_match("foo*bar", "barfoo"));
        assert!(template_match("^foo", "foobar"));
        assert!(!template_match("^foo", "xfoo"));
        assert!(template_match("bar$", "foobar"));
        assert!(!template_match("bar$", "barx"));
        assert!(template_match("^libjvm.so$", "libjvm.so"));
        assert!(!template_match("^libjvm.so$", "libjvm.so.1"));
        assert!(template_match("^a*c$", "abc"));
        assert!(!template_match("^a*c$", "abcd"));
        assert!(template_match("*", "anything"));
        // A trailing `$` must not overlap what the earlier pieces consumed.
        assert!(!template_match("^ab*b$", "ab"));
        assert!(template_match("^ab*b$", "abb"));
    }

    #[test]
    fn files_parse_with_comments_and_name_bad_lines() {
        let mut s = Suppressions::none();
        s.add_file("s.txt", "# comment\n\nleak:foo\n  leak: bar*baz  \n")
            .unwrap();
        assert_eq!(s.list.len(), 2);
        assert_eq!(s.list[1].pattern, "bar*baz");
        assert_eq!(
            s.list[1].origin,
            Origin::File {
                path: "s.txt".into(),
                line: 4
            }
        );
        let e = s.add_file("s.txt", "leak:x\nrace:y\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.txt:2: `race:` suppressions are not understood, only `leak:PATTERN`"
        );
        assert!(s.add_file("s.txt", "leak:\n").is_err());
        assert!(s.add_file("s.txt", "foo\n").is_err());
    }
}
