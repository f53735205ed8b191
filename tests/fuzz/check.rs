//! Running one fuzz case on both filesystems, comparing, shrinking a failure, and printing a
//! reproducer.
//!
//! A case is a lower stack and a sequence of operations. [`run_case`] builds the stack twice,
//! mounts layerfs over one copy (with an upper) and kernel overlayfs over the other
//! ([`KERNEL_OPTS`]), runs every operation on both and compares each outcome, then compares the
//! final trees, then checks what layerfs left on disk: the daemon exits on unmount, a remounted
//! layerfs shows the same tree, and kernel overlayfs mounting layerfs's upper (fresh work dir,
//! [`KERNEL_UPPER_OPTS`]) shows the same tree too.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, Mount};

use super::ops::{self, Op, Outcome};
use super::rng::Rng;
use super::spec::Stack;
use super::tree::{self, Tree};
use super::watchdog::{Watchdog, procinfo};

/// Kernel overlayfs options for the reference mount. `redirect_dir=on` lets the kernel rename
/// lower and merged directories (without it, rename(2) of such a directory fails with EXDEV,
/// which layerfs never answers: it copies the tree up instead); `index=on` is the kernel's
/// most complete mode (the one podman users get) and matters only for lower hard links, which
/// the generated lowers never contain; `metacopy=off` because layerfs never writes metacopy
/// uppers and its on-disk result is compared below.
pub const KERNEL_OPTS: &str = "redirect_dir=on,index=on,metacopy=off";

/// Kernel options to mount layerfs's upper in copy-tree mode: layerfs then writes no
/// redirects, so the kernel must not need to follow any (`nofollow` makes a stray one show as
/// a difference).
pub const KERNEL_UPPER_OPTS: &str = "redirect_dir=nofollow,index=off,metacopy=off";

/// Kernel options to mount layerfs's upper written with `redirect_dir=on`.
pub const KERNEL_UPPER_REDIRECT_OPTS: &str = "redirect_dir=on,index=off,metacopy=off";

/// Kernel overlayfs options for the reference mount, and to mount layerfs's upper, when
/// layerfs runs with `-o metacopy=on`: the kernel's metadata-only copy-up (which turns
/// `redirect_dir=on` on), without the inode index, which layerfs does not keep (with it the
/// kernel copies and links hard-linked files differently).
pub const KERNEL_METACOPY_OPTS: &str = "metacopy=on,redirect_dir=on,index=off";

/// How layerfs renames lower and merged directories in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The default: the tree is copied up.
    CopyTree,
    /// `-o redirect_dir=on`: a redirect is recorded, as the kernel reference does.
    Redirect,
    /// `-o metacopy=on`: metadata-only copy-up (and directory redirects), against the kernel
    /// with `metacopy=on` ([`KERNEL_METACOPY_OPTS`]).
    Metacopy,
}

impl Mode {
    fn layerfs_opts(self) -> &'static [&'static str] {
        match self {
            Mode::CopyTree => &[],
            Mode::Redirect => &["-o", "redirect_dir=on"],
            Mode::Metacopy => &["-o", "metacopy=on"],
        }
    }
    fn kernel_opts(self) -> &'static str {
        match self {
            Mode::CopyTree | Mode::Redirect => KERNEL_OPTS,
            Mode::Metacopy => KERNEL_METACOPY_OPTS,
        }
    }
    fn kernel_upper_opts(self) -> &'static str {
        match self {
            Mode::CopyTree => KERNEL_UPPER_OPTS,
            Mode::Redirect => KERNEL_UPPER_REDIRECT_OPTS,
            Mode::Metacopy => KERNEL_METACOPY_OPTS,
        }
    }
}

/// One fuzz case.
#[derive(Clone, Debug)]
pub struct Case {
    pub seed: u64,
    pub stack: Stack,
    pub ops: Vec<Op>,
}

impl Case {
    /// The case for `seed`: a random stack and `n` random operations over it.
    pub fn generate(seed: u64, n: usize) -> Case {
        let mut rng = Rng::new(seed);
        let stack = Stack::generate(&mut rng);
        let ops = ops::generate(&mut rng, &stack, n);
        Case { seed, stack, ops }
    }
}

/// Why a case failed. `sig` groups failures when shrinking (a shrunk case must fail the same
/// way); `detail` is the full story.
#[derive(Clone, Debug)]
pub struct Failure {
    pub sig: String,
    pub detail: String,
}

fn fail(sig: impl Into<String>, detail: impl Into<String>) -> Failure {
    Failure {
        sig: sig.into(),
        detail: detail.into(),
    }
}

/// Counters over a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub cases: u64,
    pub ops: u64,
    pub errors_equal: u64,
}

fn mount_layerfs(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    mnt: &Path,
    mode: Mode,
) -> Result<Mount, String> {
    common::mkdirp(upper);
    common::mkdirp(work);
    common::mkdirp(mnt);
    let mut args: Vec<OsString> = vec!["mount".into()];
    for l in lowers {
        args.push("--lower".into());
        args.push(l.into());
    }
    args.extend(mode.layerfs_opts().iter().map(OsString::from));
    args.extend([
        "--upper".into(),
        upper.into(),
        "--work".into(),
        work.into(),
        mnt.into(),
    ]);
    spawn_mount(&args, mnt)
}

/// Run `layerfs ARGS` (a mount of `mnt`) and hold the mount.
pub fn spawn_mount(args: &[OsString], mnt: &Path) -> Result<Mount, String> {
    let out = Command::new(common::bin())
        .args(args)
        .output()
        .map_err(|e| format!("spawn layerfs: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "layerfs mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mnt = std::fs::canonicalize(mnt).map_err(|e| e.to_string())?;
    let daemon = common::daemon_pid(&mnt);
    Ok(Mount { path: mnt, daemon })
}

/// Unmount layerfs and check its daemon ends.
fn unmount_layerfs(m: &mut Mount) -> Result<(), Failure> {
    let pid = m.daemon.take();
    if let Some(pid) = pid {
        if !procinfo::alive(pid) {
            let _ = Command::new("umount").arg("-l").arg(&m.path).status();
            return Err(fail("daemon died", format!("layerfs daemon {pid} died")));
        }
    }
    // EBUSY for a moment is a test artifact, not a finding: another test thread forked a
    // child while this case's descriptors were open, and the child holds copies until it
    // execs. The system call is made directly, so this unmount forks no child of its own.
    let mut st = layerfs::sys::umount(&m.path, false);
    for _ in 0..100 {
        match &st {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
                st = layerfs::sys::umount(&m.path, false);
            }
            _ => break,
        }
    }
    if let Err(e) = st {
        let _ = Command::new("umount").arg("-l").arg(&m.path).status();
        return Err(fail("umount", format!("umount {}: {e}", m.path.display())));
    }
    if let Some(pid) = pid {
        if !common::wait_gone(pid, Duration::from_secs(20)) {
            // Where each of its threads is, so the finding explains itself.
            let stacks = super::watchdog::dump_stacks(pid);
            return Err(fail(
                "daemon hangs",
                format!("daemon {pid} still running 20 s after umount; its threads:\n{stacks}"),
            ));
        }
    }
    Ok(())
}

fn snap(root: &Path, who: &str) -> Result<Tree, Failure> {
    tree::snapshot(root).map_err(|e| fail(format!("walk {who}"), format!("walking {who}: {e}")))
}

fn compare(a: &Tree, b: &Tree, labels: (&str, &str), stage: &str) -> Result<(), Failure> {
    match tree::diff(a, b, labels, 25) {
        None => Ok(()),
        Some(d) => Err(fail(
            format!("tree {stage}"),
            format!("trees differ {stage}:\n{d}"),
        )),
    }
}

/// An extra check of layerfs's upper after the run (fsck), given upper, work and lowers.
pub type UpperCheck = fn(&Path, &Path, &[PathBuf]) -> Result<(), String>;

/// Run one case. Mount failures of the kernel reference panic (the test machinery is
/// broken); everything layerfs does wrong is a [`Failure`].
pub fn run_case(
    stack: &Stack,
    ops: &[Op],
    wd: &Watchdog,
    stats: &mut Stats,
    upper_check: Option<UpperCheck>,
    mode: Mode,
) -> Result<(), Failure> {
    let d = tempfile::Builder::new()
        .prefix("lfs-fuzz.")
        .tempdir()
        .expect("tempdir");
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let la = stack.build(&a);
    let lb = stack.build(&b);
    let (ua, wa) = (a.join("u"), a.join("w"));
    let mut ours =
        mount_layerfs(&la, &ua, &wa, &a.join("m"), mode).map_err(|e| fail("mount", e))?;
    wd.watch_mount(&ours.path, ours.daemon);
    let lbr: Vec<&Path> = lb.iter().map(PathBuf::as_path).collect();
    let theirs = common::kernel(
        &lbr,
        Some((&b.join("u"), &b.join("w"))),
        &b.join("m"),
        mode.kernel_opts(),
    );
    let labels = ("layerfs:", "kernel:");
    let result = (|| {
        let v0 = snap(&ours.path, "layerfs")?;
        let k0 = snap(&theirs.path, "kernel")?;
        compare(&v0, &k0, labels, "before any operation")?;
        let mut cx = ops::Ctx::new(&ours.path);
        let mut cy = ops::Ctx::new(&theirs.path);
        for (i, op) in ops.iter().enumerate() {
            let x: Outcome = wd.op(
                || format!("layerfs: {}", op.to_rust()),
                || op.apply(&mut cx),
            );
            let y: Outcome = op.apply(&mut cy);
            stats.ops += 1;
            if std::env::var_os("LAYERFS_FUZZ_VERBOSE").is_some() {
                eprintln!("  #{i} {} -> {}", op.to_rust(), show(&x));
            }
            if x.is_err() {
                stats.errors_equal += 1;
            }
            if x != y {
                let detail = format!(
                    "operation #{i} {} returned differently:\n      layerfs: {}\n      kernel:  {}",
                    op.to_rust(),
                    show(&x),
                    show(&y)
                );
                let sig = match known_bug(&ops[..=i], &x, &y) {
                    Some(bug) => format!("known: {bug}"),
                    None => format!("outcome {}", op.name()),
                };
                return Err(fail(sig, detail));
            }
        }
        drop((cx, cy));
        let view = snap(&ours.path, "layerfs")?;
        let kview = snap(&theirs.path, "kernel")?;
        compare(&view, &kview, labels, "after the operations")?;
        Ok(view)
    })();
    wd.clear_mounts();
    if let Some(stall) = wd.fired() {
        return Err(fail("stall", stall));
    }
    let view = result?;
    drop(theirs);
    unmount_layerfs(&mut ours)?;
    drop(ours);
    if mode == Mode::Metacopy {
        // The same operations leave the same metacopy files, with the same data redirects.
        let (x, y) = (metacopy_files(&ua)?, metacopy_files(&b.join("u"))?);
        if x != y {
            return Err(fail(
                "metacopy files",
                format!("metacopy files in the uppers differ:\n  layerfs: {x:?}\n  kernel:  {y:?}"),
            ));
        }
    }
    // What layerfs left on disk must read back the same, by layerfs and by the kernel.
    let mut again =
        mount_layerfs(&la, &ua, &wa, &a.join("m"), mode).map_err(|e| fail("remount", e))?;
    let r = snap(&again.path, "layerfs remounted")
        .and_then(|t| compare(&view, &t, ("before:", "after:"), "after a layerfs remount"));
    unmount_layerfs(&mut again)?;
    r?;
    let lar: Vec<&Path> = la.iter().map(PathBuf::as_path).collect();
    let k = common::kernel(
        &lar,
        Some((&ua, &a.join("w2"))),
        &a.join("km"),
        mode.kernel_upper_opts(),
    );
    let kt = snap(&k.path, "kernel over layerfs's upper")?;
    drop(k);
    compare(
        &view,
        &kt,
        ("layerfs:", "kernel:"),
        "with kernel overlayfs mounting layerfs's upper",
    )?;
    if let Some(check) = upper_check {
        check(&ua, &wa, &la).map_err(|e| fail("upper check", e))?;
    }
    stats.cases += 1;
    Ok(())
}

/// The metacopy files of an upper (`trusted.overlay.metacopy` on a regular file), each with
/// its data redirect, if any.
fn metacopy_files(upper: &Path) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![upper.to_path_buf()];
    let walk = |e: std::io::Error| fail("walk upper", e.to_string());
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(walk)? {
            let p = e.map_err(walk)?.path();
            let ft = std::fs::symlink_metadata(&p).map_err(walk)?.file_type();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() && common::getxattr(&p, "trusted.overlay.metacopy").is_some() {
                let r = common::getxattr(&p, "trusted.overlay.redirect").unwrap_or_default();
                let rel = p.strip_prefix(upper).unwrap_or(&p).as_os_str().as_bytes();
                out.insert(rel.escape_ascii().to_string(), r.escape_ascii().to_string());
            }
        }
    }
    Ok(out)
}

/// Known divergences of layerfs from the kernel, reproduced by ignored tests in
/// `tests/fuzz_diff.rs`. An operation whose outcome differs is put down to one of them when the
/// sequence up to it has that shape, so a run keeps finding new bugs instead of the same one
/// again (set `LAYERFS_FUZZ_STRICT=1` to turn this off).
pub const KNOWN_BUGS: &[&str] = &[STALE_HANDLE];

/// See `stale_read_handle_after_copy_up_and_unlink` in `tests/fuzz_diff.rs`: with FUSE
/// passthrough the kernel reads a file opened before its copy-up from the lower file itself.
pub const STALE_HANDLE: &str = "a read-only descriptor opened before a copy-up keeps reading the \
                                lower file (FUSE passthrough)";

/// The known bug a failing sequence (ending with the differing operation, whose outcomes on
/// layerfs and the kernel are `ours` and `theirs`) matches, if any.
pub fn known_bug(ops: &[Op], ours: &Outcome, theirs: &Outcome) -> Option<&'static str> {
    if std::env::var_os("LAYERFS_FUZZ_STRICT").is_some() {
        return None;
    }
    let (last, before) = ops.split_last()?;
    // Only reads: fstat, writes and truncation through such a descriptor follow the copy.
    if !matches!(last, Op::FdRead(..)) || ours.is_err() || theirs.is_err() {
        return None;
    }
    // A read-only descriptor still open, and a name removed since it was opened.
    let mut ro_open_since: [Option<usize>; ops::SLOTS] = [None; ops::SLOTS];
    for (i, op) in before.iter().enumerate() {
        match op {
            Op::Open(s, _, 0) => ro_open_since[*s as usize % ops::SLOTS] = Some(i),
            Op::Open(s, ..) | Op::Close(s) => ro_open_since[*s as usize % ops::SLOTS] = None,
            _ => {}
        }
    }
    let removal = |op: &Op| {
        matches!(
            op,
            Op::Unlink(..) | Op::UnlinkedWrite(..) | Op::Rename(..) | Op::Rmdir(..)
        )
    };
    ro_open_since
        .iter()
        .flatten()
        .any(|&j| ops[j + 1..].iter().any(removal))
        .then_some(STALE_HANDLE)
}

fn show(o: &Outcome) -> String {
    match o {
        Ok(s) if s.is_empty() => "ok".into(),
        Ok(s) => format!("ok: {s}"),
        Err(e) => format!("{} ({e})", std::io::Error::from_raw_os_error(*e)),
    }
}

/// Whether `stack`/`ops` fail with signature `sig` (panics of the machinery count as no).
fn fails_same(
    stack: &Stack,
    ops: &[Op],
    sig: &str,
    wd: &Watchdog,
    check: Option<UpperCheck>,
    mode: Mode,
) -> bool {
    let mut st = Stats::default();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_case(stack, ops, wd, &mut st, check, mode)
    }));
    matches!(r, Ok(Err(f)) if f.sig == sig)
}

/// Shrink a failing case: delta debugging over the operations, then single operations, then
/// lower entries, within `budget`. Returns the smaller case and the number of trials.
pub fn shrink(
    case: &Case,
    sig: &str,
    wd: &Watchdog,
    budget: Duration,
    check: Option<UpperCheck>,
    mode: Mode,
) -> (Case, usize) {
    let start = Instant::now();
    let mut trials = 0;
    let mut ops = case.ops.clone();
    let stack = case.stack.clone();
    let mut n = 2usize;
    while ops.len() >= 2 && start.elapsed() < budget {
        let chunk = ops.len().div_ceil(n);
        let mut reduced = false;
        let parts = n;
        for i in 0..parts {
            let (lo, hi) = (i * chunk, ((i + 1) * chunk).min(ops.len()));
            if lo >= hi {
                continue;
            }
            let mut cand = ops[..lo].to_vec();
            cand.extend_from_slice(&ops[hi..]);
            trials += 1;
            if fails_same(&stack, &cand, sig, wd, check, mode) {
                ops = cand;
                n = (n - 1).max(2);
                reduced = true;
                break;
            }
        }
        if !reduced {
            if n >= ops.len() {
                break;
            }
            n = (n * 2).min(ops.len());
        }
    }
    let mut i = 0;
    while i < ops.len() && start.elapsed() < budget {
        let mut cand = ops.clone();
        cand.remove(i);
        trials += 1;
        if fails_same(&stack, &cand, sig, wd, check, mode) {
            ops = cand;
        } else {
            i += 1;
        }
    }
    let mut stack = stack;
    let mut k = stack.len();
    while k > 0 && start.elapsed() < budget {
        k -= 1;
        if k >= stack.len() {
            continue;
        }
        let cand = stack.without(k);
        trials += 1;
        if fails_same(&cand, &ops, sig, wd, check, mode) {
            stack = cand;
        }
    }
    (
        Case {
            seed: case.seed,
            stack,
            ops,
        },
        trials,
    )
}

/// A test to paste into `tests/fuzz_diff.rs` that replays `case`.
pub fn reproducer(case: &Case, sig: &str) -> String {
    let mut s = format!(
        "#[test]\n#[ignore = \"bug: {sig} (fuzz seed {})\"]\nfn fuzz_seed_{}() {{\n",
        case.seed, case.seed
    );
    s.push_str("    use fuzz::ops::Op::*;\n    use fuzz::spec::{Kind::*, Stack, p};\n");
    let stack = case
        .stack
        .to_rust()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    s.push_str(&format!("    let stack = {};\n", stack.trim_start()));
    s.push_str("    let ops = vec![\n");
    for op in &case.ops {
        s.push_str(&format!("        {},\n", op.to_rust()));
    }
    s.push_str("    ];\n    fuzz::check::replay(&stack, &ops);\n}\n");
    s
}

/// Run a case and panic with its failure (for reproducer tests).
pub fn replay(stack: &Stack, ops: &[Op]) {
    if !common::can_mount() {
        return;
    }
    let wd = Watchdog::start(Duration::from_secs(30));
    let mut st = Stats::default();
    if let Err(f) = run_case(stack, ops, &wd, &mut st, None, Mode::CopyTree) {
        panic!("{}: {}", f.sig, f.detail);
    }
}
