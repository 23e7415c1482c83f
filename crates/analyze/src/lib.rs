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
//!   JSON.
//!
//! **Invariant:** the analyzer streams: memory is proportional to live blocks
//! and distinct stacks, never to the file's size. **Invariant:** no input
//! makes it panic; damage ends the reading with what was read before it.

pub mod analysis;
pub mod folds;
pub mod fxhash;
pub mod report;
pub mod symbolize;
