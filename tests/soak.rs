//! Soak: a mount whose tree is walked and stat'ed over and over keeps its daemon's memory flat
//! and its file descriptors bounded, whatever the size of the tree.
//!
//! The mount uses `-o timeout=0`, so the kernel caches no entry and every `lstat` of a path
//! reaches the daemon as one LOOKUP per component: the lookups really run in layerfs. Between
//! rounds the kernel is also told to drop its cached inodes, so the daemon gets FORGETs and
//! must release what it no longer needs.
//!
//! Memory: VmRSS is sampled after mounting, after the first full walk, after every round
//! (random lstats, a full walk, a forget storm) and at the end. Warm-up ends with the first
//! round (every name looked up, forgotten, looked up again); the end must stay within 1.5x of
//! the warm-up value plus 8 MiB of allocator slack. A leak of even 16 bytes per lookup would
//! add over 30 MiB over the long run's two million lookups; measured traces plateau instead. Descriptors: the daemon holds its layer roots, work dir and FUSE channels; the
//! count may not grow by more than 8 over the run, and stays under 64.
//!
//! CI runs the light variant (5,000 files, 100,000 lookups); `soak_50k_files_1m_lookups` is the
//! long one (`cargo test --test soak -- --ignored`).

mod common;
mod fuzz;

use std::fs;
use std::path::Path;
use std::time::Instant;

use common::*;
use fuzz::rng::Rng;
use fuzz::watchdog::procinfo;
use layerfs::union::DIR_FDS_MAX;

struct Sample {
    rss: u64,
    hwm: u64,
    fds: usize,
}

fn sample(pid: u32) -> Sample {
    let (rss, hwm) = procinfo::rss_kib(pid).expect("daemon status");
    Sample {
        rss,
        hwm,
        fds: procinfo::fd_count(pid).expect("daemon fds"),
    }
}

/// Walk the whole tree (readdir + lstat of every entry); returns the number of entries.
fn walk(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("readdir") {
            let p = e.expect("entry").path();
            let md = fs::symlink_metadata(&p).expect("lstat");
            n += 1;
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    n
}

/// Random lstats between two full walks.
const ROUND: u64 = 20_000;

fn soak(files: usize, stats: u64) {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot) = (d.path().join("top"), d.path().join("bot"));
    let dirs = files.div_ceil(100);
    // Half the files in the bottom layer, a quarter in the top one, a quarter through the
    // mount (in the upper).
    for i in 0..files {
        let rel = format!("d{}/f{i}", i / 100);
        match i % 4 {
            0 | 1 => wfile(bot.join(&rel), "b"),
            2 => wfile(top.join(&rel), "t"),
            _ => {}
        }
    }
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(
        &[&top, &bot],
        Some((&u, &w)),
        &d.path().join("m"),
        &["timeout=0"],
    );
    let pid = m.daemon.expect("daemon pid");
    for i in (3..files).step_by(4) {
        fs::write(m.p(&format!("d{}/f{i}", i / 100)), "u").unwrap();
    }
    let start = sample(pid);
    let t0 = Instant::now();
    assert_eq!(walk(&m.path), files + dirs, "every file is listed");
    let walked = sample(pid);
    let mut rng = Rng::new(files as u64);
    let mut max_fds = walked.fds;
    let mut done = 0u64;
    let mut walks = 1;
    let mut rss_trace = Vec::new();
    while done < stats {
        for _ in 0..stats.min(ROUND) {
            let i = rng.below(files as u64) as usize;
            let p = m.p(&format!("d{}/f{i}", i / 100));
            fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            done += 1;
        }
        // A full walk and a forget storm between rounds.
        walk(&m.path);
        walks += 1;
        let _ = fs::write("/proc/sys/vm/drop_caches", "2");
        let now = sample(pid);
        max_fds = max_fds.max(now.fds);
        rss_trace.push(now.rss);
    }
    let end = sample(pid);
    // Warm-up ends after the first round: every name looked up, forgotten and looked up again,
    // so the daemon's tables and the allocator's arenas have reached their working size.
    let warm_rss = rss_trace.first().copied().unwrap_or(walked.rss);
    eprintln!("soak: VmRSS KiB after each round of {ROUND} lstats: {rss_trace:?}");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "soak: {files} files, {done} random lstats (2 lookups each) and {walks} full walks in \
         {secs:.0} s; daemon VmRSS {} KiB after mount, {} KiB after the first walk, {warm_rss} \
         KiB after warm-up, {} KiB at end (VmHWM {} KiB); fds {} after mount, {} after the first \
         walk, {} at most, {} at end",
        start.rss, walked.rss, end.rss, end.hwm, start.fds, walked.fds, max_fds, end.fds
    );
    assert!(
        end.rss <= warm_rss * 3 / 2 + 8192,
        "daemon memory grew: {warm_rss} KiB after warm-up, {} KiB at end",
        end.rss
    );
    // The union keeps up to DIR_FDS_MAX parent directories open between requests.
    assert!(
        max_fds <= start.fds + DIR_FDS_MAX + 8,
        "daemon descriptors grew: {} after mount, {max_fds} at most",
        start.fds
    );
    assert!(procinfo::alive(pid));
}

#[test]
fn soak_5k_files_100k_lookups() {
    soak(5_000, 100_000);
}

#[test]
#[ignore = "long soak (minutes): run with --ignored"]
fn soak_50k_files_1m_lookups() {
    soak(50_000, 1_000_000);
}

/// For investigations: `LAYERFS_SOAK_FILES` files, `LAYERFS_SOAK_STATS` lookups.
#[test]
#[ignore = "configurable soak for investigations"]
fn soak_configured() {
    let get = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    soak(
        get("LAYERFS_SOAK_FILES", 5_000) as usize,
        get("LAYERFS_SOAK_STATS", 100_000),
    );
}

/// After the kernel forgets the inodes of a walk, the daemon's memory goes back down: the
/// nodes are freed, and the heap pages they used are returned to the system (glibc keeps
/// freed memory in per-thread heaps otherwise, and RSS stayed at its peak).
#[test]
fn forgotten_inodes_give_their_memory_back() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let lower = d.path().join("l");
    let files = 30_000;
    for i in 0..files {
        wfile(
            lower.join(format!("d{}/file-with-a-longer-name-{i}", i / 100)),
            "x",
        );
    }
    let m = layerfs_stack(&[&lower], None, &d.path().join("m"), &[]);
    let pid = m.daemon.expect("daemon pid");
    let start = sample(pid);
    assert_eq!(walk(&m.path), files + files / 100);
    let walked = sample(pid);
    let grown = walked.rss.saturating_sub(start.rss);
    assert!(
        grown >= 4096,
        "a walk of {files} files should take memory: {} KiB -> {} KiB",
        start.rss,
        walked.rss
    );
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
    let target = start.rss + grown / 2;
    let until = Instant::now() + std::time::Duration::from_secs(10);
    let mut now = sample(pid);
    while now.rss > target && Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
        now = sample(pid);
    }
    assert!(
        now.rss <= target,
        "daemon memory after the kernel forgot {files} inodes: {} KiB after mount, {} KiB \
         after the walk, still {} KiB",
        start.rss,
        walked.rss,
        now.rss
    );
}
