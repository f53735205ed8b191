//! Torture machinery shared by the fuzz, concurrency, crash and soak tests: a seeded
//! generator of lower stacks and operation sequences, the differential runner against kernel
//! overlayfs with its shrinker, whole-tree snapshots, and a watchdog for stalled operations.
//!
//! See `tests/fuzz_diff.rs` for how the fuzzer is driven and which environment variables run
//! it longer.
#![allow(dead_code)]

pub mod check;
pub mod ops;
pub mod rng;
pub mod spec;
pub mod tree;
pub mod watchdog;
