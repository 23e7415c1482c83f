//! Folded stacks (`frame;frame;frame value`, outermost frame first, the
//! format of Brendan Gregg's `stackcollapse` scripts) for flamegraph tools,
//! and flamegraph SVGs drawn from them with the `inferno` crate.
//!
//! Stacks are symbolized whole (every frame, inlined ones expanded, wrappers
//! kept: in a memory flamegraph the allocator frames are the tips); stack
//! ids that symbolize alike are summed into one line.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::analysis::Trace;
use crate::fxhash::FxHashMap;
use crate::report::{SymCache, NO_STACK};
use crate::symbolize::Symbolizer;

/// What a flamegraph measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Bytes outstanding at the end (or at the snapshot asked for).
    Outstanding,
    /// Bytes ever allocated.
    Allocated,
    /// Allocations made.
    Count,
}

impl Metric {
    /// The unit inferno shows in tooltips.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Outstanding | Metric::Allocated => "bytes",
            Metric::Count => "allocations",
        }
    }
}

/// The folded lines for `metric`, sorted, each value rounded (sampling
/// undone). `snapshot` selects what was outstanding at a snapshot instead
/// of at the end.
pub fn folded(
    trace: &Trace,
    sym: &mut dyn Symbolizer,
    metric: Metric,
    snapshot: Option<usize>,
) -> Vec<(String, u64)> {
    let per_stack: FxHashMap<u64, f64> = match metric {
        Metric::Outstanding => {
            let live = match snapshot {
                Some(i) if i < trace.snapshots.len() => trace.snapshot(i),
                _ => trace.live_by_stack(),
            };
            live.into_iter().map(|(k, v)| (k, v.live.bytes)).collect()
        }
        Metric::Allocated => trace.allocated.iter().map(|(k, v)| (*k, v.0)).collect(),
        Metric::Count => trace.allocated.iter().map(|(k, v)| (*k, v.1)).collect(),
    };
    let mut cache = SymCache::new(sym);
    let mut lines: BTreeMap<String, f64> = BTreeMap::new();
    for (id, v) in per_stack {
        if v <= 0.0 {
            continue;
        }
        let line = match trace.stacks.get(&id).filter(|_| id != 0) {
            None => NO_STACK.to_string(),
            Some(frames) => cache
                .names_outermost_first(frames)
                .iter()
                // `;` separates frames; a name must not contain one.
                .map(|n| n.replace(';', ":"))
                .collect::<Vec<_>>()
                .join(";"),
        };
        *lines.entry(line).or_default() += v;
    }
    lines
        .into_iter()
        .map(|(l, v)| (l, v.round() as u64))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Writes folded lines, one `stack value` per line.
pub fn write_folded(lines: &[(String, u64)], out: &mut dyn Write) -> io::Result<()> {
    for (l, v) in lines {
        writeln!(out, "{l} {v}")?;
    }
    Ok(())
}

/// Draws a flamegraph of folded lines as SVG.
pub fn write_flamegraph(
    lines: &[(String, u64)],
    metric: Metric,
    title: &str,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.count_name = metric.unit().to_string();
    opts.colors =
        inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    let text: Vec<String> = lines.iter().map(|(l, v)| format!("{l} {v}")).collect();
    if text.is_empty() {
        // inferno refuses an empty profile; draw one saying so.
        let empty = [format!("{NO_STACK} (nothing to show) 1")];
        return inferno::flamegraph::from_lines(&mut opts, empty.iter().map(|s| s.as_str()), out)
            .map_err(io::Error::other);
    }
    inferno::flamegraph::from_lines(&mut opts, text.iter().map(|s| s.as_str()), out)
        .map_err(io::Error::other)
}
