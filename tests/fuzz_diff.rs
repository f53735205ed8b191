//! Differential fuzzing of layerfs against kernel overlayfs.
//!
//! Each seed gives a random lower stack (2-4 layers of files, directories, symlinks, fifos,
//! whiteouts, xattr whiteouts and opaque directories) and a random sequence of operations
//! (see `fuzz::ops::Op`). The sequence runs on a layerfs mount and on a kernel overlayfs mount
//! (`fuzz::check::KERNEL_OPTS`, documented there) over identical copies of the stack; every
//! return code and what reads observed must match, then the final trees, then what layerfs
//! left on disk (remounted by layerfs, and mounted by the kernel). A failing case is shrunk
//! (delta debugging over the operations, then the lower entries) and printed as a Rust test
//! to paste below.
//!
//! CI runs a fixed range of seeds. For longer runs:
//! * `LAYERFS_FUZZ_SECS=N`: keep going with new seeds for N seconds;
//! * `LAYERFS_FUZZ_SEEDS=N`, `LAYERFS_FUZZ_START=S`: seeds S..S+N;
//! * `LAYERFS_FUZZ_SEED=S`: only seed S (to reproduce);
//! * `LAYERFS_FUZZ_OPS=N`: operations per sequence (default 40);
//! * `LAYERFS_FUZZ_SHRINK_SECS=N`: time allowed for shrinking one failure (default 300).
//!
//! Not covered: `O_TMPFILE` (fuser has no such request), lower hard links (a documented
//! divergence: layerfs breaks the group on copy-up), timestamps, and reads through a
//! descriptor opened before a copy-up (layerfs deliberately shows the new data there).

mod common;
mod fuzz;

use std::time::{Duration, Instant};

use common::can_mount;
use fuzz::check::{self, Case, Stats};
use fuzz::watchdog::Watchdog;

/// Seeds CI runs (about two minutes on the CI machine).
const CI_SEEDS: u64 = 100;
const DEFAULT_OPS: usize = 40;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn fuzz_against_kernel_overlayfs() {
    if !can_mount() {
        return;
    }
    let n_ops = env_u64("LAYERFS_FUZZ_OPS").map_or(DEFAULT_OPS, |n| n as usize);
    let start = env_u64("LAYERFS_FUZZ_START").unwrap_or(0);
    let secs = env_u64("LAYERFS_FUZZ_SECS");
    let (first, count) = match (env_u64("LAYERFS_FUZZ_SEED"), env_u64("LAYERFS_FUZZ_SEEDS")) {
        (Some(s), _) => (s, 1),
        (None, Some(n)) => (start, n),
        (None, None) if secs.is_some() => (start, u64::MAX),
        (None, None) => (start, CI_SEEDS),
    };
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
    let shrink_budget = Duration::from_secs(env_u64("LAYERFS_FUZZ_SHRINK_SECS").unwrap_or(300));
    let wd = Watchdog::start(Duration::from_secs(30));
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    let t0 = Instant::now();
    let mut seed = first;
    while seed - first < count && deadline.is_none_or(|d| Instant::now() < d) {
        let case = Case::generate(seed, n_ops);
        if let Err(f) = check::run_case(&case.stack, &case.ops, &wd, &mut stats, None) {
            eprintln!("seed {seed} failed ({}): {}\nshrinking...", f.sig, f.detail);
            let (small, trials) = check::shrink(&case, &f.sig, &wd, shrink_budget, None);
            let mut st = Stats::default();
            let detail = match check::run_case(&small.stack, &small.ops, &wd, &mut st, None) {
                Err(f2) => f2.detail,
                Ok(()) => "(the shrunk case passed when rerun: flaky)".into(),
            };
            let text = format!(
                "==== seed {seed}: {} ({} ops -> {} ops, {} lower entries, {trials} trials)\n{detail}\n{}",
                f.sig,
                case.ops.len(),
                small.ops.len(),
                small.stack.len(),
                check::reproducer(&small, &f.sig)
            );
            eprintln!("{text}");
            failures.push(text);
            if failures.len() >= 5 {
                break;
            }
        }
        seed += 1;
    }
    eprintln!(
        "fuzz: seeds {first}..{seed}: {} sequences and {} operations passed ({} answered an error on both) in {:.0} s; {} failed",
        stats.cases,
        stats.ops,
        stats.errors_equal,
        t0.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} fuzz failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
