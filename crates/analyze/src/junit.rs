//! The leak check as JUnit XML, the format CI systems (GitHub Actions test
//! reporters, GitLab, Jenkins) show as test results: one test case per
//! traced process, a leak as a `<failure>` with the stacks, a killed
//! process or a damaged trace as an `<error>`, an exec'd image as a passing
//! case with a note.
//!
//! The schema followed is the common subset of Ant's and Jenkins's
//! (`testsuites/testsuite/testcase` with `failure`, `error`,
//! `system-out`). Text is escaped for XML 1.0, which cannot carry most
//! control characters at all: they become U+FFFD.

use std::fmt::Write as _;
use std::io::{self, Write};

use crate::check::{
    process_summary, write_leaks, CheckOptions, CheckResult, ProcessCheck, Status, Verdict,
};

/// The suite's name in the XML.
pub const SUITE: &str = "mtrace-rs leak check";

/// Escapes text for an XML element: line breaks stay as they are.
pub fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c => out.push_str(&escape(c.encode_utf8(&mut [0; 4]))),
        }
    }
    out
}

/// Escapes text for an XML attribute (line breaks as character references,
/// so that they survive attribute normalization).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn leak_text(p: &ProcessCheck, opts: &CheckOptions, all: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}: {}", p.title(), process_summary(p, opts));
    let _ = writeln!(s, "trace: {}", p.path);
    for n in &p.notes {
        let _ = writeln!(s, "note: {n}");
    }
    let shown = ProcessCheck {
        leaks: p
            .leaks
            .iter()
            .filter(|l| all || l.counted)
            .cloned()
            .collect(),
        ..p.clone()
    };
    write_leaks(&mut s, &shown, opts.report.top, "  ");
    s
}

/// Writes the JUnit XML document.
pub fn write_junit(r: &CheckResult, opts: &CheckOptions, out: &mut dyn Write) -> io::Result<()> {
    let tests = r.processes.len() + r.unreadable.len();
    let failures = r
        .processes
        .iter()
        .filter(|p| p.verdict == Verdict::Leaked)
        .count();
    let errors = r
        .processes
        .iter()
        .filter(|p| {
            p.verdict == Verdict::Error || (p.verdict == Verdict::Killed && opts.fail_on_killed)
        })
        .count()
        + r.unreadable.len();
    let time: f64 = r.processes.iter().map(|p| p.duration_ns as f64 / 1e9).sum();
    let mut s = String::new();
    s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuites name=\"{SUITE}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{time:.3}\">"
    );
    let _ = writeln!(
        s,
        "  <testsuite name=\"{SUITE}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"0\" time=\"{time:.3}\">"
    );
    for u in &r.unreadable {
        let _ = writeln!(
            s,
            "    <testcase classname=\"mtrace-rs\" name=\"{}\" time=\"0\">",
            escape(&u.path)
        );
        let _ = writeln!(
            s,
            "      <error type=\"unreadable\" message=\"{}\"/>",
            escape(&u.error)
        );
        s.push_str("    </testcase>\n");
    }
    for p in &r.processes {
        let exe = if p.exe.is_empty() { "?" } else { &p.exe };
        let _ = writeln!(
            s,
            "    <testcase classname=\"mtrace-rs.{}\" name=\"{}\" time=\"{:.3}\">",
            escape(exe.rsplit('/').next().unwrap_or(exe)),
            escape(&p.title()),
            p.duration_ns as f64 / 1e9
        );
        match (p.verdict, p.status) {
            (Verdict::Leaked, _) => {
                let text = leak_text(p, opts, false);
                let _ = writeln!(
                    s,
                    "      <failure type=\"leak\" message=\"{}\">{}</failure>",
                    escape(&text),
                    escape_text(&text)
                );
            }
            (Verdict::Killed, _) => {
                let text = leak_text(p, opts, true);
                let tag = if opts.fail_on_killed {
                    "error"
                } else {
                    "system-out"
                };
                if tag == "error" {
                    let _ = writeln!(
                        s,
                        "      <error type=\"killed\" message=\"{}\">{}</error>",
                        escape(&text),
                        escape_text(&text)
                    );
                } else {
                    let _ = writeln!(s, "      <system-out>{}</system-out>", escape_text(&text));
                }
            }
            (Verdict::Error, _) => {
                let text = leak_text(p, opts, true);
                let _ = writeln!(
                    s,
                    "      <error type=\"damaged\" message=\"{}\">{}</error>",
                    escape(&text),
                    escape_text(&text)
                );
            }
            (Verdict::Untraced, _) => {
                let text = leak_text(p, opts, true);
                let _ = writeln!(
                    s,
                    "      <skipped message=\"{}\"/>",
                    escape("not traced: the program's malloc is not the interposed one")
                );
                let _ = writeln!(s, "      <system-out>{}</system-out>", escape_text(&text));
            }
            (Verdict::Pass | Verdict::Exec, status) => {
                let interesting = status == Status::Exec
                    || !p.leaks.is_empty()
                    || !p.suppressed.is_zero()
                    || !p.notes.is_empty();
                if interesting {
                    let text = leak_text(p, opts, true);
                    let _ = writeln!(s, "      <system-out>{}</system-out>", escape_text(&text));
                }
            }
        }
        s.push_str("    </testcase>\n");
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    out.write_all(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(
            escape("a<b & \"c\" 'd'>\n\u{1}"),
            "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;&#10;\u{fffd}"
        );
    }
}
