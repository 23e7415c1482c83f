//! `mtrace-analyze timeline`: RSS, live bytes and glibc's figures over time,
//! as a table (text or JSON) or as an SVG line plot.
//!
//! The points are the [`Timeline`](crate::memory::Timeline) kept while
//! reading (one per STATS record, thinned evenly on long traces); the table
//! picks `--points` of them evenly spread in time, the plot draws them all.
//! The SVG is written by hand: a few hundred lines of markup do not justify
//! a plotting dependency, and the file opens in any browser.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde::Serialize;

use crate::analysis::Trace;
use crate::memory::TimelinePoint;
use crate::report::{seconds, thousands};

const MIB: f64 = 1024.0 * 1024.0;

/// The timeline as `--format json` writes it.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineOut {
    pub path: String,
    pub exe: String,
    pub pid: u32,
    pub duration_ns: u64,
    /// True in sampled mode: `live` is an estimate.
    pub estimated: bool,
    pub stats_records: u64,
    /// True when the points carry glibc's figures (else those are `null`).
    pub allocator_stats: bool,
    pub rss_peak: Option<u64>,
    pub rss_peak_ns: Option<u64>,
    pub live_peak: u64,
    pub live_peak_ns: u64,
    pub points: Vec<TimelinePoint>,
}

/// The timeline of `trace` with at most `rows` points (0 = all kept points).
pub fn build(trace: &Trace, path: &str, rows: usize) -> TimelineOut {
    let m = &trace.memory;
    let all = m.timeline.points();
    TimelineOut {
        path: path.to_string(),
        exe: trace.exe.clone().unwrap_or_default(),
        pid: trace.header.pid,
        duration_ns: trace.last_ts,
        estimated: !trace.exact(),
        stats_records: m.stats_records,
        allocator_stats: m.allocator,
        rss_peak: m.rss_peak.and_then(|p| p.rss),
        rss_peak_ns: m.rss_peak.map(|p| p.ts_ns),
        live_peak: m.live_peak.max(0.0).round() as u64,
        live_peak_ns: m.live_peak_ts,
        points: if rows == 0 {
            all
        } else {
            downsample(&all, rows)
        },
    }
}

/// At most `n` points evenly spread in time, always with the first and the
/// last: for each of `n` evenly spaced moments, the nearest point.
pub fn downsample(points: &[TimelinePoint], n: usize) -> Vec<TimelinePoint> {
    if points.len() <= n || n == 0 {
        return points.to_vec();
    }
    if n == 1 {
        return vec![points[points.len() - 1]];
    }
    let (t0, t1) = (points[0].ts_ns, points[points.len() - 1].ts_ns);
    let mut out: Vec<TimelinePoint> = Vec::with_capacity(n);
    let mut last_idx = None;
    for i in 0..n {
        let target = t0 + ((t1 - t0) as f64 * i as f64 / (n - 1) as f64).round() as u64;
        let j = points.partition_point(|p| p.ts_ns < target);
        // The nearer of the points either side of the target.
        let j = if j == points.len()
            || (j > 0 && target - points[j - 1].ts_ns < points[j].ts_ns - target)
        {
            j - 1
        } else {
            j
        };
        if last_idx != Some(j) {
            out.push(points[j]);
            last_idx = Some(j);
        }
    }
    out
}

fn mib(v: Option<u64>) -> String {
    match v {
        Some(v) => format!("{:.1}", v as f64 / MIB),
        None => "-".to_string(),
    }
}

/// Writes the table.
pub fn write_text(t: &TimelineOut, out: &mut dyn Write) -> io::Result<()> {
    let mut s = String::new();
    let exe = if t.exe.is_empty() { "?" } else { &t.exe };
    let _ = writeln!(s, "mtrace-rs memory timeline for {exe} (pid {})", t.pid);
    let _ = writeln!(
        s,
        "  {} over {}, {} shown",
        if t.stats_records == 0 {
            "no statistics records (live bytes only)".to_string()
        } else {
            format!("{} statistics records", thousands(t.stats_records))
        },
        seconds(t.duration_ns),
        thousands(t.points.len() as u64),
    );
    if t.stats_records > 0 && !t.allocator_stats {
        let _ = writeln!(s, "  allocator statistics not available (not glibc malloc)");
    }
    if let (Some(r), Some(ns)) = (t.rss_peak, t.rss_peak_ns) {
        let _ = writeln!(
            s,
            "  RSS peak:  {:.1} MiB at {}",
            r as f64 / MIB,
            seconds(ns)
        );
    }
    let tilde = if t.estimated { "~" } else { "" };
    let _ = writeln!(
        s,
        "  live peak: {tilde}{:.1} MiB at {}",
        t.live_peak as f64 / MIB,
        seconds(t.live_peak_ns)
    );
    let live = if t.estimated { "live~" } else { "live" };
    let _ = writeln!(
        s,
        "\n{:>10}  {:>10}  {:>10}  {:>16}  {:>11}  {:>13}",
        "time (s)",
        "RSS (MiB)",
        format!("{live} (MiB)"),
        "alloc free (MiB)",
        "arena (MiB)",
        "mmapped (MiB)"
    );
    for p in &t.points {
        let _ = writeln!(
            s,
            "{:>10.3}  {:>10}  {:>10.1}  {:>16}  {:>11}  {:>13}",
            p.ts_ns as f64 / 1e9,
            mib(p.rss),
            p.live / MIB,
            mib(p.free_held),
            mib(p.arena),
            mib(p.mmapped),
        );
    }
    out.write_all(s.as_bytes())
}

/// Writes the timeline as one JSON object and a newline.
pub fn write_json(t: &TimelineOut, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer(&mut *out, t)?;
    writeln!(out)
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving at most
/// about `max_ticks` ticks over `range`.
fn tick_step(range: f64, max_ticks: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / max_ticks;
    let pow = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * pow >= raw {
            return m * pow;
        }
    }
    10.0 * pow
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of the plot.
struct Series {
    name: &'static str,
    color: &'static str,
    dash: bool,
    get: fn(&TimelinePoint) -> Option<f64>,
}

const SERIES: [Series; 5] = [
    Series {
        name: "RSS",
        color: "#d62728",
        dash: false,
        get: |p| p.rss.map(|v| v as f64),
    },
    Series {
        name: "live bytes",
        color: "#1f77b4",
        dash: false,
        get: |p| Some(p.live),
    },
    Series {
        name: "allocator free (fordblks)",
        color: "#ff7f0e",
        dash: false,
        get: |p| p.free_held.map(|v| v as f64),
    },
    Series {
        name: "arena",
        color: "#2ca02c",
        dash: true,
        get: |p| p.arena.map(|v| v as f64),
    },
    Series {
        name: "mmapped",
        color: "#9467bd",
        dash: true,
        get: |p| p.mmapped.map(|v| v as f64),
    },
];

/// Writes an SVG line plot of the timeline: MiB against seconds.
pub fn write_svg(t: &TimelineOut, out: &mut dyn Write) -> io::Result<()> {
    let (w, h) = (960.0, 520.0);
    let (left, right, top, bottom) = (80.0, 30.0, 70.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let points = &t.points;
    let t_max = (points.last().map_or(0, |p| p.ts_ns).max(t.duration_ns) as f64 / 1e9).max(1e-3);
    let shown: Vec<&Series> = SERIES
        .iter()
        .filter(|s| points.iter().any(|p| (s.get)(p).is_some()))
        .collect();
    let y_max_bytes = points
        .iter()
        .flat_map(|p| shown.iter().filter_map(move |s| (s.get)(p)))
        .fold(0.0, f64::max);
    let y_step = tick_step((y_max_bytes / MIB).max(1e-3), 6.0);
    let y_max = ((y_max_bytes / MIB) / y_step).ceil().max(1.0) * y_step;
    let x_step = tick_step(t_max, 10.0);
    let x_max = (t_max / x_step).ceil().max(1.0) * x_step;
    let x = |secs: f64| left + secs / x_max * pw;
    let y = |mib: f64| top + ph - mib / y_max * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let exe = if t.exe.is_empty() { "?" } else { &t.exe };
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">Memory of {} (pid {})</text>"#,
        esc(exe),
        t.pid
    );
    // Grid and tick labels.
    let mut v = 0.0;
    while v <= y_max + y_step / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0,
            fmt_tick(v, y_step)
        );
        v += y_step;
    }
    let mut v = 0.0;
    while v <= x_max + x_step / 2.0 {
        let xx = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 18.0,
            fmt_tick(v, x_step)
        );
        v += x_step;
    }
    // Axes and their titles.
    let _ = writeln!(
        s,
        r#"<path d="M{left},{top} V{:.1} H{:.1}" fill="none" stroke="black"/>"#,
        top + ph,
        left + pw
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since start (s)</text>"#,
        left + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">MiB</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    // The lines, dashed ones underneath: a new segment wherever a series
    // has no value.
    let mut order = shown.clone();
    order.sort_by_key(|s| !s.dash);
    for ser in &order {
        let mut segments: Vec<Vec<String>> = vec![Vec::new()];
        for p in points {
            match (ser.get)(p) {
                Some(v) => segments.last_mut().unwrap_or(&mut Vec::new()).push(format!(
                    "{:.1},{:.1}",
                    x(p.ts_ns as f64 / 1e9),
                    y(v / MIB)
                )),
                None => segments.push(Vec::new()),
            }
        }
        let dash = if ser.dash {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        for seg in segments.iter().filter(|s| !s.is_empty()) {
            if seg.len() == 1 {
                let (cx, cy) = seg[0].split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    s,
                    r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{}"/>"#,
                    ser.color
                );
            } else {
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
                    ser.color,
                    seg.join(" ")
                );
            }
        }
    }
    // Legend, in a row above the plot.
    let mut lx = left;
    for ser in &shown {
        let dash = if ser.dash {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="45" x2="{:.1}" y2="45" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="49">{}</text>"#,
            lx + 24.0,
            ser.color,
            lx + 30.0,
            esc(ser.name)
        );
        lx += 44.0 + 6.2 * ser.name.len() as f64;
    }
    if t.stats_records > 0 && !t.allocator_stats {
        let _ = writeln!(
            s,
            r##"<text x="{lx:.1}" y="49" fill="#666">allocator statistics not available (not glibc malloc)</text>"##
        );
    } else if t.stats_records == 0 {
        let _ = writeln!(
            s,
            r##"<text x="{lx:.1}" y="49" fill="#666">RSS not recorded (no statistics in the trace)</text>"##
        );
    }
    let _ = writeln!(s, "</svg>");
    out.write_all(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(n: u64) -> Vec<TimelinePoint> {
        (0..n)
            .map(|i| TimelinePoint {
                ts_ns: i * 100,
                ..TimelinePoint::default()
            })
            .collect()
    }

    #[test]
    fn downsampling_spreads_rows_evenly_and_keeps_both_ends() {
        let d = downsample(&pts(1000), 11);
        let ts: Vec<u64> = d.iter().map(|p| p.ts_ns).collect();
        assert_eq!(
            ts,
            [0, 10000, 20000, 30000, 40000, 50000, 59900, 69900, 79900, 89900, 99900]
        );
        assert_eq!(downsample(&pts(5), 40).len(), 5);
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(100.0, 10.0), 10.0);
        assert_eq!(tick_step(7.3, 6.0), 2.0);
        assert_eq!(tick_step(0.3, 10.0), 0.05);
        assert_eq!(fmt_tick(0.15, 0.05), "0.15");
    }
}
