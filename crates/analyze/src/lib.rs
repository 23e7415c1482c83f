//! `mtrace-analyze`: reads a trace written by `libmtrace_rs.so` and says which
//! callers hold how much memory.
//!
//! The pipeline, one module each:
//! - [`analysis`] streams the records (through `mtrace_format::Decoder`) into
//!   the set of blocks live at the end, tolerating events that arrive out of
//!   order, and undoes Poisson sampling ([`analysis::weight`]).
//! - [`symbolize`] resolves return addresses offline from the binaries and
//!   debug files on disk, behind the [`symbolize::Symbolizer`] trait.
//! - [`folds`] names the allocator wrappers skipped to find the allocating
//!   function.
//! - [`report`] groups live blocks by function or stack and renders text or
//!   JSON, with RSS beside live bytes in the header.
//! - [`memory`] keeps the STATS records (RSS, glibc's mallinfo2 figures) as a
//!   bounded timeline beside the live bytes, and says when glibc, not the
//!   program, holds the memory; [`timeline`] renders it as a table or SVG.
//! - [`timespec`] reads moments (`2.5s`, `50%`, `peak`); snapshots of what
//!   was live at a moment are taken while streaming
//!   ([`analysis::Snapshot`]); [`diff`] ranks callers by growth between two
//!   moments or two traces.
//! - [`flame`] writes folded stacks and flamegraphs (inferno); [`pprof`]
//!   writes a gzipped `profile.proto` for pprof, Pyroscope, Parca and
//!   speedscope.
//! - [`churn`] ranks callers by how often and how much they allocate, with
//!   per-caller lifetime and size distributions (hdrhistogram), streaming the
//!   records itself.
//! - [`check`] is the CI leak check: per process, outstanding blocks at exit
//!   split by the tracer's leak scan into definitely lost and reachable,
//!   filtered by [`suppress`]ions, with thresholds and exit codes;
//!   [`junit`] writes it as JUnit XML.
//!
//! **Invariant:** the analyzer streams: memory is proportional to live blocks
//! and distinct stacks, never to the file's size. **Invariant:** no input
//! makes it panic; damage ends the reading with what was read before it.

pub mod addrmap;
pub mod analysis;
pub mod check;
pub mod churn;
pub mod diff;
pub mod flame;
pub mod folds;
pub mod fxhash;
pub mod junit;
pub mod memory;
pub mod pprof;
pub mod report;
pub mod suppress;
pub mod symbolize;
pub mod timeline;
pub mod timespec;
