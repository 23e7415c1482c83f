//! RSS beside live bytes: what the tracer's STATS records say about the
//! process (RSS) and glibc's allocator (`mallinfo2`: arena, free bytes held,
//! mmapped), set beside the bytes the program holds, over time.
//!
//! The question this module answers is DESIGN.md's third user's: RSS climbs,
//! is it a leak or the allocator? When RSS is far above the live bytes and
//! glibc reports most of the difference as free bytes in its arenas, the
//! program has given the memory back and glibc keeps it;
//! [`retention_diagnosis`] says so, with what helps. When the live bytes
//! themselves grow, it does not: that is the program's memory.
//!
//! **Invariant:** memory stays bounded on traces of any length: the
//! [`Timeline`] keeps at most [`Timeline::CAPACITY`] points, thinning itself
//! by halves as it fills, and the end and peaks are kept exactly beside it.

use mtrace_format::stat;
use serde::Serialize;

/// How often a trace without STATS records gets a live-bytes-only point.
const LIVE_ONLY_INTERVAL_NS: u64 = 100_000_000;

const MIB: f64 = 1024.0 * 1024.0;

/// RSS and allocator figures at one moment, with the live bytes the
/// analyzer had counted by then. Fields the record lacks are `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// ns since the trace started.
    pub ts_ns: u64,
    /// Live bytes (estimated in sampled mode).
    pub live: f64,
    pub rss: Option<u64>,
    /// mallinfo2 `arena`: bytes glibc obtained for its arenas.
    pub arena: Option<u64>,
    /// mallinfo2 `uordblks`: bytes in use inside the arenas.
    pub in_use: Option<u64>,
    /// mallinfo2 `fordblks`: free bytes glibc keeps in its arenas.
    pub free_held: Option<u64>,
    /// mallinfo2 `hblkhd`: bytes in blocks glibc mmap'd directly.
    pub mmapped: Option<u64>,
    /// mallinfo2 `keepcost`: releasable top-most free bytes.
    pub keepcost: Option<u64>,
}

impl TimelinePoint {
    /// The point for a STATS record read when `live` bytes were live.
    pub fn from_stats(ts: u64, live: f64, fields: &[(u64, u64)]) -> TimelinePoint {
        let mut p = TimelinePoint {
            ts_ns: ts,
            live,
            ..TimelinePoint::default()
        };
        for &(k, v) in fields {
            match k {
                stat::RSS => p.rss = Some(v),
                stat::ARENA => p.arena = Some(v),
                stat::IN_USE => p.in_use = Some(v),
                stat::FREE_HELD => p.free_held = Some(v),
                stat::MMAPPED => p.mmapped = Some(v),
                stat::KEEPCOST => p.keepcost = Some(v),
                // Fields of a newer tracer.
                _ => {}
            }
        }
        p
    }

    /// True when the record carried glibc's figures.
    pub fn has_allocator(&self) -> bool {
        self.arena.is_some()
            || self.in_use.is_some()
            || self.free_held.is_some()
            || self.mmapped.is_some()
    }
}

/// A bounded series of points, evenly thinned: it keeps every `stride`-th
/// point offered, and when full drops every other point and doubles the
/// stride. The latest point is kept besides, so the series always reaches
/// the end.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    points: Vec<TimelinePoint>,
    stride: u64,
    offered: u64,
    last: Option<TimelinePoint>,
}

impl Timeline {
    /// The most points kept (about 200 KiB).
    pub const CAPACITY: usize = 4096;

    /// Offers a point.
    pub fn push(&mut self, p: TimelinePoint) {
        if self.stride == 0 {
            self.stride = 1;
        }
        if self.offered.is_multiple_of(self.stride) {
            self.points.push(p);
            if self.points.len() >= Self::CAPACITY {
                let mut i = 0;
                self.points.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.stride *= 2;
            }
        }
        self.offered += 1;
        self.last = Some(p);
    }

    /// The kept points in time order, ending with the latest one.
    pub fn points(&self) -> Vec<TimelinePoint> {
        let mut v = self.points.clone();
        if let Some(l) = self.last {
            if v.last() != Some(&l) {
                v.push(l);
            }
        }
        v
    }

    /// True when no point was offered.
    pub fn is_empty(&self) -> bool {
        self.offered == 0
    }
}

/// Everything the trace says about memory over time.
#[derive(Clone, Debug, Default)]
pub struct MemoryStats {
    /// STATS records read.
    pub stats_records: u64,
    /// True when any STATS record carried glibc's allocator figures.
    pub allocator: bool,
    /// The latest STATS record.
    pub last: Option<TimelinePoint>,
    /// The STATS record with the highest RSS.
    pub rss_peak: Option<TimelinePoint>,
    /// The highest live bytes, and when (ns since the trace started).
    pub live_peak: f64,
    pub live_peak_ts: u64,
    /// Points at STATS records; in a trace without them, live bytes every
    /// 100 ms of trace time.
    pub timeline: Timeline,
    next_live_only: u64,
}

impl MemoryStats {
    /// Nothing seen yet.
    pub fn new() -> MemoryStats {
        MemoryStats::default()
    }

    /// A STATS record.
    pub fn stats(&mut self, p: TimelinePoint) {
        if self.stats_records == 0 {
            // Live-only points from before the first record would sit
            // beside RSS points as if RSS were zero: drop them.
            self.timeline = Timeline::default();
        }
        self.stats_records += 1;
        self.allocator |= p.has_allocator();
        self.last = Some(p);
        let higher = match self.rss_peak {
            Some(q) => p.rss > q.rss,
            None => true,
        };
        if p.rss.is_some() && higher {
            self.rss_peak = Some(p);
        }
        self.timeline.push(p);
    }

    /// Trace time moved on to `ts` with `live` bytes live.
    #[inline]
    pub fn tick(&mut self, ts: u64, live: f64) {
        if self.stats_records == 0 && ts >= self.next_live_only {
            self.timeline.push(TimelinePoint {
                ts_ns: ts,
                live,
                ..TimelinePoint::default()
            });
            self.next_live_only = MemoryStats::next_tick_after(ts);
        }
    }

    /// The time from which [`MemoryStats::tick`] may add its next point
    /// when the time moved on to `ts`: the start of the next interval.
    /// Whoever feeds the time in bigger steps (the two-thread reader calls
    /// `tick` only at the first event at or past it) misses no point.
    #[inline]
    pub fn next_tick_after(ts: u64) -> u64 {
        (ts / LIVE_ONLY_INTERVAL_NS)
            .saturating_add(1)
            .saturating_mul(LIVE_ONLY_INTERVAL_NS)
    }

    /// The live total changed to `live` at `ts`.
    #[inline]
    pub fn live_changed(&mut self, ts: u64, live: f64) {
        if live > self.live_peak {
            self.live_peak = live;
            self.live_peak_ts = ts;
        }
    }

    /// How much the live bytes rose at the end of the trace from their
    /// lowest point in its second half. Large for a leak (live bytes only
    /// go up); about zero for a program that peaks and frees, and for an
    /// allocator that keeps what was freed.
    pub fn live_growth(&self, duration_ns: u64) -> f64 {
        let points = self.timeline.points();
        let Some(last) = points.last() else {
            return 0.0;
        };
        let half = duration_ns / 2;
        let low = points
            .iter()
            .filter(|p| p.ts_ns >= half)
            .map(|p| p.live)
            .fold(last.live, f64::min);
        last.live - low
    }
}

/// True when the live bytes grew enough in the second half of the trace to
/// be the program's own growth ([`MemoryStats::live_growth`]): more than
/// 1 MiB and more than a tenth of what is live at the end.
pub fn live_grows(m: &MemoryStats, duration_ns: u64) -> bool {
    let g = m.live_growth(duration_ns);
    let end = m.last.map_or(0.0, |p| p.live);
    g > MIB && g > 0.1 * end
}

/// RSS is "far above" live bytes: more than twice, and by more than this.
pub const RETENTION_MIN_GAP: u64 = 64 << 20;

/// Where glibc holds freed memory: at `p`, RSS is more than twice the live
/// bytes, the gap is more than [`RETENTION_MIN_GAP`], and glibc's free bytes
/// cover at least half of the gap. Returns (gap, free held).
fn retained_at(p: &TimelinePoint) -> Option<(u64, u64)> {
    let rss = p.rss?;
    let free = p.free_held?;
    let live = p.live.max(0.0) as u64;
    let gap = rss.saturating_sub(live);
    (rss > live.saturating_mul(2) && gap > RETENTION_MIN_GAP && free.saturating_mul(2) >= gap)
        .then_some((gap, free))
}

/// The plain-words diagnosis when glibc, not the program, holds most of the
/// RSS, or `None` when the trace does not show that (or cannot: no
/// allocator figures), or when the live bytes grow (then it is a leak, not
/// retention).
pub fn retention_diagnosis(m: &MemoryStats, duration_ns: u64) -> Option<String> {
    if live_grows(m, duration_ns) {
        return None;
    }
    let (when, p) = [
        ("at the end of the trace", m.last),
        ("at the peak of RSS", m.rss_peak),
    ]
    .into_iter()
    .find_map(|(w, p)| p.filter(|p| retained_at(p).is_some()).map(|p| (w, p)))?;
    let (_, free) = retained_at(&p)?;
    let rss = p.rss.unwrap_or(0);
    Some(format!(
        "RSS ({}) is far above the bytes the program holds ({} live) {when} \
         ({:.3} s), and glibc malloc keeps {} of the difference as free memory \
         in its arenas. Nothing is leaked: the program freed this memory, but \
         glibc keeps freed chunks in its per-thread arenas instead of \
         returning them to the system. What helps: call malloc_trim(0) after \
         a burst of frees; set MALLOC_ARENA_MAX=2 to limit the number of \
         arenas; lower MALLOC_TRIM_THRESHOLD_ (e.g. 131072) so that free \
         returns memory sooner; or run with a different allocator such as \
         jemalloc (LD_PRELOAD=libjemalloc.so.2).",
        human_bytes(rss as f64),
        human_bytes(p.live),
        p.ts_ns as f64 / 1e9,
        human_bytes(free as f64),
    ))
}

/// `512.0 MiB`, `12.3 KiB`, `100 B`.
pub fn human_bytes(b: f64) -> String {
    let b = b.max(0.0);
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{} B", b.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(ts: u64, live: f64, rss: u64, free: Option<u64>) -> TimelinePoint {
        TimelinePoint {
            ts_ns: ts,
            live,
            rss: Some(rss),
            free_held: free,
            arena: free.map(|f| f + live as u64),
            ..TimelinePoint::default()
        }
    }

    #[test]
    fn the_timeline_thins_itself_evenly_and_keeps_the_end() {
        let mut t = Timeline::default();
        let n = 3 * Timeline::CAPACITY as u64 + 7;
        for i in 0..n {
            t.push(TimelinePoint {
                ts_ns: i,
                ..TimelinePoint::default()
            });
        }
        let p = t.points();
        assert!(p.len() <= Timeline::CAPACITY + 1, "{}", p.len());
        assert!(p.len() >= Timeline::CAPACITY / 2);
        assert_eq!(p[0].ts_ns, 0);
        assert_eq!(p.last().unwrap().ts_ns, n - 1);
        let step = p[1].ts_ns - p[0].ts_ns;
        assert!(p[..p.len() - 1]
            .windows(2)
            .all(|w| w[1].ts_ns - w[0].ts_ns == step));
    }

    #[test]
    fn retention_is_diagnosed_only_when_glibc_holds_the_gap() {
        let gib = 1u64 << 30;
        let mut m = MemoryStats::new();
        m.stats(point(1, 100.0 * MIB, 700 << 20, Some(300 << 20)));
        m.stats(point(2, 2.0 * MIB, 600 << 20, Some(590 << 20)));
        let d = retention_diagnosis(&m, 2).unwrap();
        assert!(d.contains("Nothing is leaked"), "{d}");
        assert!(d.contains("malloc_trim(0)") && d.contains("MALLOC_ARENA_MAX=2"));

        // Free bytes too small: the RSS is something else (mmap, stacks).
        let mut m = MemoryStats::new();
        m.stats(point(2, 2.0 * MIB, 600 << 20, Some(10 << 20)));
        assert_eq!(retention_diagnosis(&m, 2), None);
        // No allocator figures: nothing to say.
        let mut m = MemoryStats::new();
        m.stats(point(2, 2.0 * MIB, 600 << 20, None));
        assert_eq!(retention_diagnosis(&m, 2), None);
        // RSS close to live: a leak, not retention.
        let mut m = MemoryStats::new();
        m.stats(point(2, gib as f64, gib + (100 << 20), Some(90 << 20)));
        assert_eq!(retention_diagnosis(&m, 2), None);
    }

    #[test]
    fn growing_live_bytes_are_not_called_retention() {
        let mut m = MemoryStats::new();
        for i in 0..10u64 {
            m.stats(point(
                i * 10,
                (i * 20) as f64 * MIB,
                (i * 20 + 400) << 20,
                Some(300 << 20),
            ));
        }
        assert!(live_grows(&m, 90));
        assert_eq!(retention_diagnosis(&m, 90), None);
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(human_bytes(100.0), "100 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(512.0 * MIB), "512.0 MiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * MIB), "3.00 GiB");
    }
}
