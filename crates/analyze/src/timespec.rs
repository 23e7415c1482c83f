//! Moments of a trace as the command line names them: seconds from the
//! start (`2.5`, `2.5s`, `500ms`, `3min`, `1h`), a share of the trace's
//! duration (`50%`), `peak` (the moment the live bytes were highest),
//! `start` or `end`.

use std::fmt;

/// A moment, not yet resolved against a trace.
#[derive(Clone, Debug, PartialEq)]
pub enum TimeSpec {
    /// ns since the trace started.
    Ns(u64),
    /// A share of the duration, 0 to 100.
    Percent(f64),
    /// The moment of peak live bytes.
    Peak,
    Start,
    End,
}

/// A moment the command line could not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeSpecError(pub String);

impl fmt::Display for TimeSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot read the time {:?}: give seconds from the start (2.5, 2.5s, 500ms, \
             3min, 1h), a percentage of the trace (50%), peak, start or end",
            self.0
        )
    }
}

impl std::error::Error for TimeSpecError {}

impl std::str::FromStr for TimeSpec {
    type Err = TimeSpecError;

    fn from_str(s: &str) -> Result<TimeSpec, TimeSpecError> {
        let err = || TimeSpecError(s.to_string());
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "peak" => return Ok(TimeSpec::Peak),
            "start" => return Ok(TimeSpec::Start),
            "end" => return Ok(TimeSpec::End),
            _ => {}
        }
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| err())?;
            if !(0.0..=100.0).contains(&v) {
                return Err(err());
            }
            return Ok(TimeSpec::Percent(v));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let v: f64 = num.parse().map_err(|_| err())?;
        let scale = match unit.trim() {
            "" | "s" | "sec" => 1e9,
            "ms" => 1e6,
            "us" => 1e3,
            "ns" => 1.0,
            "m" | "min" => 60e9,
            "h" => 3600e9,
            _ => return Err(err()),
        };
        let ns = v * scale;
        if !ns.is_finite() || ns < 0.0 || ns > u64::MAX as f64 {
            return Err(err());
        }
        Ok(TimeSpec::Ns(ns.round() as u64))
    }
}

impl TimeSpec {
    /// True when resolving needs the whole trace read first (its duration
    /// or its peak).
    pub fn needs_first_pass(&self) -> bool {
        matches!(self, TimeSpec::Percent(_) | TimeSpec::Peak | TimeSpec::End)
    }

    /// The moment in ns since the start, for a trace of `duration` ns whose
    /// live bytes peaked at `peak`. Times past the end are the end.
    pub fn resolve(&self, duration: u64, peak: u64) -> u64 {
        match *self {
            TimeSpec::Ns(ns) => ns.min(duration),
            TimeSpec::Percent(p) => (duration as f64 * p / 100.0).round() as u64,
            TimeSpec::Peak => peak,
            TimeSpec::Start => 0,
            TimeSpec::End => duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seconds_percentages_and_names() {
        let p = |s: &str| s.parse::<TimeSpec>();
        assert_eq!(p("2.5"), Ok(TimeSpec::Ns(2_500_000_000)));
        assert_eq!(p("2.5s"), Ok(TimeSpec::Ns(2_500_000_000)));
        assert_eq!(p("500ms"), Ok(TimeSpec::Ns(500_000_000)));
        assert_eq!(p("3min"), Ok(TimeSpec::Ns(180_000_000_000)));
        assert_eq!(p("50%"), Ok(TimeSpec::Percent(50.0)));
        assert_eq!(p("Peak"), Ok(TimeSpec::Peak));
        assert!(p("150%").is_err());
        assert!(p("-1").is_err());
        assert!(p("soon").is_err());
        assert!(p("2.5 weeks").is_err());
        assert_eq!(TimeSpec::Percent(25.0).resolve(100, 7), 25);
        assert_eq!(TimeSpec::Ns(500).resolve(100, 7), 100);
        assert_eq!(TimeSpec::Peak.resolve(100, 7), 7);
    }
}
