//! Differential fuzzing of layerfs against kernel overlayfs.
//!
//! Each seed gives a random lower stack (2-4 layers of files, directories, symlinks, fifos,
//! whiteouts, xattr whiteouts and opaque directories) and a random sequence of operations
//! (see `fuzz::ops::Op`). The sequence runs on a layerfs mount and on a kernel overlayfs mount
//! (`fuzz::check::KERNEL_OPTS`, documented there) over identical copies of the stack; every
//! return code and what reads observed must match, then the final trees, then what layerfs
//! left on disk (remounted by layerfs, mounted by the kernel, and `layerfs fsck` finds nothing
//! to complain about; with `redirect_dir=on` and `metacopy=on`, `layerfs diff --lower` of the
//! upper, extracted as a layer over the same lowers, shows the same tree as the upper). A failing case is shrunk
//! (delta debugging over the operations, then the lower entries) and printed as a Rust test
//! to paste below.
//!
//! CI runs a fixed range of seeds. For longer runs:
//! * `LAYERFS_FUZZ_SECS=N`: keep going with new seeds for N seconds;
//! * `LAYERFS_FUZZ_SEEDS=N`, `LAYERFS_FUZZ_START=S`: seeds S..S+N;
//! * `LAYERFS_FUZZ_SEED=S`: only seed S (to reproduce);
//! * `LAYERFS_FUZZ_OPS=N`: operations per sequence (default 60);
//! * `LAYERFS_FUZZ_SHRINK_SECS=N`: time allowed for shrinking one failure (default 300).
//!
//! Not covered: `O_TMPFILE` (fuser has no such request), lower hard links (a documented
//! divergence: layerfs breaks the group on copy-up), timestamps, and reads through a
//! descriptor opened before a copy-up (layerfs deliberately shows the new data there).

mod common;
mod fuzz;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::can_mount;
use fuzz::check::{self, Case, Mode, Stats};
use fuzz::watchdog::Watchdog;

/// Seeds CI runs (about two minutes on the 2-core CI machine).
const CI_SEEDS: u64 = 400;
/// Seeds CI runs with `-o redirect_dir=on` (the same seeds' first part: the generated
/// operations rename lower and merged directories often).
const CI_SEEDS_REDIRECT: u64 = 150;
/// Seeds CI runs with `-o metacopy=on` (chmod, chown, utimens, xattr changes, renames and
/// links of lower files then copy metadata only, and the writes after them the data).
const CI_SEEDS_METACOPY: u64 = 150;
const DEFAULT_OPS: usize = 60;

/// `layerfs fsck` must find nothing in the upper layerfs left behind.
fn fsck_clean(upper: &Path, work: &Path, lowers: &[PathBuf]) -> Result<(), String> {
    let mut cmd = Command::new(common::bin());
    cmd.arg("fsck").arg(upper).arg("--work").arg(work);
    for l in lowers {
        cmd.arg("--lower").arg(l);
    }
    let out = cmd.output().map_err(|e| format!("running fsck: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "layerfs fsck found problems in the upper:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A read-only layerfs mount of `layers` (top first), with mount options `opts`, and its
/// tree.
fn ro_tree(layers: &[&Path], mnt: &Path, opts: &[&str]) -> Result<fuzz::tree::Tree, String> {
    common::mkdirp(mnt);
    let mut args: Vec<std::ffi::OsString> = vec!["mount".into()];
    for l in layers {
        args.push("--lower".into());
        args.push(l.into());
    }
    args.extend(opts.iter().map(std::ffi::OsString::from));
    args.push(mnt.into());
    let m = check::spawn_mount(&args, mnt)?;
    fuzz::tree::snapshot(&m.path)
}

/// [`fsck_clean`], then: `layerfs diff --lower` of the upper (redirects resolved against the
/// lowers), extracted as a layer over the same lowers, shows the tree the upper shows over
/// them.
fn fsck_and_diff_clean(upper: &Path, work: &Path, lowers: &[PathBuf]) -> Result<(), String> {
    diff_clean(upper, work, lowers, &[])
}

/// [`fsck_and_diff_clean`] for an upper with metacopy files: stacked as a lower to be
/// compared, it is read with `-o metacopy=on` (metacopy files of lower layers are followed
/// only then, as in the kernel).
fn fsck_and_metacopy_diff_clean(
    upper: &Path,
    work: &Path,
    lowers: &[PathBuf],
) -> Result<(), String> {
    diff_clean(upper, work, lowers, &["-o", "metacopy=on"])
}

fn diff_clean(upper: &Path, work: &Path, lowers: &[PathBuf], opts: &[&str]) -> Result<(), String> {
    use std::os::fd::AsFd;
    fsck_clean(upper, work, lowers)?;
    let d = tempfile::Builder::new()
        .prefix("lfs-fuzz-diff.")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let tar = d.path().join("layer.tar");
    let mut cmd = Command::new(common::bin());
    cmd.arg("diff").arg(upper).arg("-o").arg(&tar);
    for l in lowers {
        cmd.arg("--lower").arg(l);
    }
    let out = cmd.output().map_err(|e| format!("running diff: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "layerfs diff --lower failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let layer = d.path().join("layer");
    std::fs::create_dir(&layer).map_err(|e| e.to_string())?;
    let fd = layerfs::sys::open_dir_path(&layer).map_err(|e| e.to_string())?;
    let formats = layerfs::oci::import::probe_formats(fd.as_fd());
    let bytes = std::fs::read(&tar).map_err(|e| e.to_string())?;
    let mut r = layerfs::oci::tarfmt::TarReader::new(&bytes[..]);
    layerfs::oci::import::extract(&mut r, fd.as_fd(), formats, &|_| {})
        .map_err(|e| format!("extracting the diff: {e}"))?;
    let with = |top: &Path| -> Vec<PathBuf> {
        std::iter::once(top.to_path_buf())
            .chain(lowers.iter().cloned())
            .collect()
    };
    let (up, lay) = (with(upper), with(&layer));
    let up: Vec<&Path> = up.iter().map(PathBuf::as_path).collect();
    let lay: Vec<&Path> = lay.iter().map(PathBuf::as_path).collect();
    let want = ro_tree(&up, &d.path().join("m1"), opts)?;
    let got = ro_tree(&lay, &d.path().join("m2"), opts)?;
    match fuzz::tree::diff(&want, &got, ("upper:", "diff:"), 25) {
        None => Ok(()),
        Some(x) => Err(format!(
            "the diff's layer over the lowers shows another tree:\n{x}"
        )),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn fuzz_against_kernel_overlayfs() {
    fuzz(Mode::CopyTree, CI_SEEDS);
}

/// The same with layerfs renaming directories by redirect (`-o redirect_dir=on`), as the
/// kernel reference does: the upper layerfs leaves is mounted by the kernel with
/// `redirect_dir=on`.
#[test]
fn fuzz_against_kernel_overlayfs_redirect_dir() {
    fuzz(Mode::Redirect, CI_SEEDS_REDIRECT);
}

/// The same with metadata-only copy-up (`-o metacopy=on`) against the kernel with
/// `metacopy=on`: the upper layerfs leaves is mounted by the kernel in that mode, and its
/// `diff --lower` (metacopy files written with their data from the lowers) must show the
/// same tree.
#[test]
fn fuzz_against_kernel_overlayfs_metacopy() {
    fuzz(Mode::Metacopy, CI_SEEDS_METACOPY);
}

fn fuzz(mode: Mode, ci_seeds: u64) {
    if !can_mount() {
        return;
    }
    // In redirect and metacopy modes the upper's diff, resolved against the lowers, is checked too.
    let upper_check: check::UpperCheck = match mode {
        Mode::CopyTree => fsck_clean,
        Mode::Redirect => fsck_and_diff_clean,
        Mode::Metacopy => fsck_and_metacopy_diff_clean,
    };
    let n_ops = env_u64("LAYERFS_FUZZ_OPS").map_or(DEFAULT_OPS, |n| n as usize);
    let start = env_u64("LAYERFS_FUZZ_START").unwrap_or(0);
    let secs = env_u64("LAYERFS_FUZZ_SECS");
    let (first, count) = match (env_u64("LAYERFS_FUZZ_SEED"), env_u64("LAYERFS_FUZZ_SEEDS")) {
        (Some(s), _) => (s, 1),
        (None, Some(n)) => (start, n),
        (None, None) if secs.is_some() => (start, u64::MAX),
        (None, None) => (start, ci_seeds),
    };
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
    let shrink_budget = Duration::from_secs(env_u64("LAYERFS_FUZZ_SHRINK_SECS").unwrap_or(300));
    let wd = Watchdog::start(Duration::from_secs(30));
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    let mut known = 0;
    let t0 = Instant::now();
    let mut seed = first;
    while seed - first < count && deadline.is_none_or(|d| Instant::now() < d) {
        let case = Case::generate(seed, n_ops);
        if let Err(f) = check::run_case(
            &case.stack,
            &case.ops,
            &wd,
            &mut stats,
            Some(upper_check),
            mode,
        ) {
            if f.sig.starts_with("known: ") {
                eprintln!("seed {seed}: {} ({})", f.sig, f.detail);
                known += 1;
                seed += 1;
                continue;
            }
            eprintln!("seed {seed} failed ({}): {}\nshrinking...", f.sig, f.detail);
            let (small, trials) =
                check::shrink(&case, &f.sig, &wd, shrink_budget, Some(upper_check), mode);
            let mut st = Stats::default();
            let detail = match check::run_case(
                &small.stack,
                &small.ops,
                &wd,
                &mut st,
                Some(upper_check),
                mode,
            ) {
                Err(f2) => f2.detail,
                Ok(()) => "(the shrunk case passed when rerun: flaky)".into(),
            };
            let text = format!(
                "==== {mode:?} seed {seed}: {} ({} ops -> {} ops, {} lower entries, {trials} trials)\n{detail}\n{}",
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
        "fuzz ({mode:?}): seeds {first}..{seed}: {} sequences passed, {} operations run ({} answered the same error on both) in {:.0} s; {known} stopped at a known bug; {} failed",
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

/// A seed names one case forever: reproducers and CI ranges rely on it.
#[test]
fn cases_are_reproducible_from_their_seed() {
    for seed in [0, 7, 12345] {
        let (a, b) = (Case::generate(seed, 50), Case::generate(seed, 50));
        assert_eq!(a.stack, b.stack);
        assert_eq!(a.ops, b.ops);
        assert!(check::reproducer(&a, "x").contains(&format!("fn fuzz_seed_{seed}()")));
    }
    assert_ne!(Case::generate(1, 50).ops, Case::generate(2, 50).ops);
}

// ---- Bugs the fuzzer found, shrunk (ignored until fixed in the core) -------------------------

/// Seed 1150 (shrunk): a read-only descriptor opened on a lower file, then the file is copied
/// up by `open(O_TRUNC)` and its name removed. Kernel overlayfs moves the old descriptor to the
/// upper copy (reads see 0 bytes); layerfs cannot reopen the copy by path once it is unlinked
/// and keeps reading the stale lower file (`Union::file_fd` falls back to the old descriptor).
#[test]
#[ignore = "limit: with FUSE passthrough an already-open lower file is read by the kernel directly (passes with -o passthrough=off, see tests/write_path.rs)"]
fn stale_read_handle_after_copy_up_and_unlink() {
    use fuzz::ops::Op::*;
    use fuzz::spec::{Kind::*, Stack, p};
    let stack = Stack {
        layers: vec![
            vec![(
                p(b"a"),
                File {
                    len: 2368,
                    fill: 154,
                    mode: 0o644,
                    owner: 1000,
                    xattrs: 0,
                },
            )],
            vec![],
        ],
    };
    let ops = vec![
        Open(2, p(b"a"), 0),
        OpenTrunc(p(b"a")),
        Unlink(p(b"a")),
        FdRead(2),
    ];
    fuzz::check::replay(&stack, &ops);
}

/// Seed 1149 (shrunk): with a read-only descriptor of a lower file open, open it `O_RDWR`
/// (copy-up), unlink it, write past the old end through the new descriptor: `fstat` and reads
/// through that descriptor see the old size. `fstat` sends GETATTR without a handle; the union
/// cannot stat the unlinked node by path, so `LayerFs::getattr` falls back to
/// `open_handle_of`, which picks any handle of the inode (hash-map order) and may pick the stale
/// read-only one, whose descriptor is still the lower file: the reply carries the lower size,
/// and the kernel then cuts reads there. The pick is random, so this runs the scenario on eight
/// files, each with three stale handles.
#[test]
fn fstat_of_unlinked_copy_uses_stale_handle() {
    use fuzz::ops::Op::*;
    use fuzz::spec::{Kind::*, Stack, p};
    let names: Vec<Vec<u8>> = (0..8).map(|i| format!("f{i}").into_bytes()).collect();
    let file = File {
        len: 62,
        fill: 41,
        mode: 0o640,
        owner: 2000,
        xattrs: 0,
    };
    let stack = Stack {
        layers: vec![
            vec![],
            names.iter().map(|n| (n.clone(), file.clone())).collect(),
        ],
    };
    let mut ops = Vec::new();
    for n in &names {
        ops.extend([Open(0, p(n), 0), Open(1, p(n), 0), Open(2, p(n), 0)]);
        ops.push(UnlinkedWrite(p(n), 47, 28, 52));
    }
    fuzz::check::replay(&stack, &ops);
}

/// Seed 10114 (shrunk, then simplified by hand): `fstat` of an open fifo after its name is
/// removed answers ENOENT. The kernel sends GETATTR without a handle (the attributes were
/// invalidated by the unlink); `Union::getattr` has no path for an unlinked node, and
/// `LayerFs::getattr` falls back to an open handle of the inode, but a fifo is opened by the
/// kernel's pipe code, never through FUSE `open`, so there is none. Kernel overlayfs answers
/// from the (still existing) upper inode.
#[test]
fn fstat_of_unlinked_open_fifo() {
    use fuzz::ops::Op::*;
    use fuzz::spec::{Stack, p};
    let stack = Stack {
        layers: vec![vec![], vec![]],
    };
    let ops = vec![
        Mkfifo(p(b"a")),
        Open(1, p(b"a"), 3),
        Unlink(p(b"a")),
        FdStat(1),
    ];
    fuzz::check::replay(&stack, &ops);
}
