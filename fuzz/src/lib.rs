//! The checks behind the fuzz targets, one function per target. Each takes the raw input,
//! runs the parser and asserts what must hold (round trips, refusals are errors and never
//! panics, issued tokens verify). The workspace crates include these modules in their
//! `tests/fuzz_corpus.rs` to replay `fuzz/corpus/<target>/` with a plain `cargo test`.

#[cfg(feature = "broker")]
pub mod broker;
pub mod filter;
pub mod imds;
