//! Crash safety: SIGKILL the daemon at random points of a copy-up of big files, of a rename of
//! a big lower directory (a whole-tree copy-up), and of a create/unlink storm; then check what
//! is on disk:
//!
//! * `layerfs fsck` finds nothing but work-dir leftovers, repairs them, and is clean after;
//! * nothing partially copied is visible: an upper copy of a file is absent or complete;
//! * no name comes back that was deleted, and no acknowledged change is lost;
//! * kernel overlayfs mounting the upper shows what a remounted layerfs shows.
//!
//! Kill points are random (seeded: `LAYERFS_CRASH_SEED`) within the duration of an
//! uninterrupted run of the same operation, measured first; the test reports how many kills
//! landed while the operation was still running, and asserts nothing about timing.

mod common;
mod fuzz;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fuzz::rng::Rng;

fn seed() -> u64 {
    std::env::var("LAYERFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6)
}

/// SIGKILL the daemon of `m` and detach the dead mount.
fn kill_daemon(m: &mut Mount) {
    let pid = m.daemon.take().expect("daemon pid");
    layerfs::sys::kill(pid as i32, layerfs::sys::SIGKILL).expect("kill daemon");
    assert!(wait_gone(pid, Duration::from_secs(10)), "daemon gone");
    let _ = Command::new("umount").arg("-l").arg(&m.path).status();
}

fn fsck_run(upper: &Path, work: &Path, lowers: &[&Path], repair: bool) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("fsck").arg(upper).arg("--work").arg(work);
    for l in lowers {
        cmd.arg("--lower").arg(l);
    }
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().expect("run fsck");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The checks every crash ends with; returns the tree layerfs shows after remounting.
fn after_crash(lowers: &[&Path], u: &Path, w: &Path, d: &Path, what: &str) -> Tree {
    let (_, out) = fsck_run(u, w, lowers, false);
    let bad: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(": ") && !l.contains("leftover of an interrupted operation"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: fsck finds more than work-dir leftovers:\n{out}"
    );
    let (code, out) = fsck_run(u, w, lowers, true);
    assert_eq!(code, 0, "{what}: fsck --repair leaves problems:\n{out}");
    let (code, out) = fsck_run(u, w, lowers, false);
    assert_eq!(code, 0, "{what}: fsck not clean after repair:\n{out}");
    let view = {
        let m = layerfs_stack(lowers, Some((u, w)), &d.join("m2"), &[]);
        snapshot(&m.path)
    };
    let w2 = d.join(format!("kw{}", std::process::id()));
    let _ = fs::remove_dir_all(&w2);
    let k = kernel(
        lowers,
        Some((u, &w2)),
        &d.join("km"),
        "redirect_dir=nofollow,index=off",
    );
    assert_same(
        &view,
        &snapshot(&k.path),
        &format!("{what}: kernel on the upper"),
    );
    drop(k);
    let _ = fs::remove_dir_all(&w2);
    view
}

fn fresh(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    mkdirp(dir);
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

#[test]
fn killed_during_copy_up_of_big_files() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    let files: Vec<(String, Vec<u8>)> = (0..4u8)
        .map(|i| {
            (
                format!("big{i}"),
                pattern(i * 37, (16 << 20) + i as usize * 4099),
            )
        })
        .collect();
    for (name, data) in &files {
        wfile(low.join("dir").join(name), data);
    }
    let (u, w, mnt) = (d.path().join("u"), d.path().join("w"), d.path().join("m"));
    let mut rng = Rng::new(seed());
    let mut full = Duration::ZERO;
    let mut mid_copy = 0;
    let rounds = 6;
    for round in 0..rounds {
        fresh(&u);
        fresh(&w);
        let mut m = layerfs_stack(&[&low], Some((&u, &w)), &mnt, &[]);
        let failed = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let writers: Vec<_> = files
            .iter()
            .map(|(name, _)| {
                let p = m.p(&format!("dir/{name}"));
                let failed = failed.clone();
                std::thread::spawn(move || {
                    // Opening for write copies the file up; then overwrite its head.
                    let r = fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .and_then(|f| f.write_all_at(b"NEW", 0));
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        if round == 0 {
            // Calibration: let it finish.
            for t in writers {
                t.join().unwrap();
            }
            full = start.elapsed();
            assert!(
                !failed.load(Ordering::Relaxed),
                "uninterrupted copy-up works"
            );
            drop(m);
        } else {
            let at = full.mul_f64(rng.below(1000) as f64 / 1000.0);
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            kill_daemon(&mut m);
            for t in writers {
                t.join().unwrap();
            }
            if failed.load(Ordering::Relaxed) {
                mid_copy += 1;
            }
            drop(m);
        }
        // Every upper copy present is complete: the lower's bytes, the head maybe rewritten.
        for (name, data) in &files {
            let Ok(got) = fs::read(u.join("dir").join(name)) else {
                continue;
            };
            assert_eq!(
                got.len(),
                data.len(),
                "round {round}: {name} copied up whole"
            );
            assert!(
                got[3..] == data[3..] && (got[..3] == data[..3] || &got[..3] == b"NEW"),
                "round {round}: {name} holds the lower's data"
            );
        }
        let view = after_crash(&[&low], &u, &w, d.path(), &format!("round {round}"));
        for (name, data) in &files {
            let key = format!("dir/{name}").into_bytes();
            let info = view.entries.get(&key).expect("file still visible");
            assert!(
                info.data.starts_with(&format!("{} ", data.len())),
                "{info:?}"
            );
        }
    }
    eprintln!(
        "copy-up: uninterrupted run {:.0} ms; {mid_copy} of {} kills landed while a copy-up was running",
        full.as_secs_f64() * 1000.0,
        rounds - 1
    );
}

/// A lower directory big enough that copying it up takes a while: `n` files in a few
/// subdirectories.
/// Files in the big lower directory.
const N_TREE: usize = 1500;

fn big_lower_dir(root: &Path, n: usize) {
    for i in 0..n {
        wfile(
            root.join(format!("tree/s{}/f{i}", i % 8)),
            pattern(i as u8, 16384 + i * 13),
        );
    }
    wfile(root.join("tree/top"), "top");
}

#[test]
fn killed_during_rename_of_a_big_lower_directory() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    big_lower_dir(&low, N_TREE);
    let (u, w, mnt) = (d.path().join("u"), d.path().join("w"), d.path().join("m"));
    let mut rng = Rng::new(seed() ^ 0xd1);
    let mut full = Duration::ZERO;
    let mut mid_rename = 0;
    let rounds = 5;
    for round in 0..rounds {
        fresh(&u);
        fresh(&w);
        let mut m = layerfs_stack(&[&low], Some((&u, &w)), &mnt, &[]);
        // Before the rename: some files changed (copied up), one subdirectory deleted and
        // made again. (Deleted files inside the renamed tree come back after a crash: see
        // `killed_while_a_renamed_tree_is_copied_deleted_files_come_back` below; left out here
        // so this test keeps guarding everything else.)
        fs::write(m.p("tree/s1/f1"), "changed").unwrap();
        fs::write(m.p("tree/s2/f2"), "changed too").unwrap();
        fs::write(m.p("tree/new"), "new").unwrap();
        let before = snapshot(&m.p("tree"));
        let (from, to) = (m.p("tree"), m.p("renamed"));
        let start = Instant::now();
        let t = std::thread::spawn(move || fs::rename(from, to).is_ok());
        let ok = if round == 0 {
            let ok = t.join().unwrap();
            full = start.elapsed();
            assert!(ok, "uninterrupted rename works");
            drop(m);
            true
        } else {
            let at = full.mul_f64(rng.below(1000) as f64 / 1000.0);
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            kill_daemon(&mut m);
            let ok = t.join().unwrap();
            if !ok {
                mid_rename += 1;
            }
            drop(m);
            ok
        };
        let view = after_crash(&[&low], &u, &w, d.path(), &format!("round {round}"));
        let has = |p: &str| view.entries.contains_key(p.as_bytes());
        assert!(
            has("tree") != has("renamed"),
            "round {round}: exactly one of the old and new names (rename acknowledged: {ok})"
        );
        if ok {
            assert!(
                has("renamed"),
                "round {round}: an acknowledged rename stays"
            );
        }
        let name = if has("tree") { "tree" } else { "renamed" };
        // The directory shows exactly what it showed before: no deleted name comes back.
        let prefix = format!("{name}/");
        let now = Tree {
            entries: view
                .entries
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(prefix.as_bytes())
                        .map(|rest| (rest.to_vec(), v.clone()))
                })
                .collect::<BTreeMap<_, _>>(),
            links: Default::default(),
        };
        assert_same(
            &before,
            &now,
            &format!("round {round}: {name} after the crash"),
        );
    }
    eprintln!(
        "rename: uninterrupted run {:.0} ms; {mid_rename} of {} kills landed before the rename returned",
        full.as_secs_f64() * 1000.0,
        rounds - 1
    );
}

/// What one storm worker did to one name, acknowledged or in flight.
#[derive(Clone, Debug, PartialEq)]
enum State {
    /// As the lower has it (never touched).
    Lower,
    Gone,
    Data(Vec<u8>),
}

#[test]
fn killed_during_a_create_unlink_storm() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    let workers = 4usize;
    let per = 60usize;
    let name = |t: usize, i: usize| format!("d{}/w{t}-{i}", i % 3);
    for t in 0..workers {
        for i in (0..per).step_by(2) {
            wfile(low.join(name(t, i)), format!("lower {t} {i}"));
        }
    }
    let (u, w, mnt) = (d.path().join("u"), d.path().join("w"), d.path().join("m"));
    let mut rng = Rng::new(seed() ^ 0x5707);
    let rounds = 5;
    let mut acked = 0usize;
    for round in 0..rounds {
        fresh(&u);
        fresh(&w);
        let mut m = layerfs_stack(&[&low], Some((&u, &w)), &mnt, &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..workers)
            .map(|t| {
                let root = m.path.clone();
                let stop = stop.clone();
                let killed = killed.clone();
                let mut r = Rng::new(seed() ^ (round as u64) << 8 ^ t as u64);
                std::thread::spawn(move || {
                    // Per name: last acknowledged state, and the state in flight at the end.
                    let mut states: BTreeMap<usize, State> = BTreeMap::new();
                    let mut in_flight: Option<(usize, State)> = None;
                    let mut n = 0u64;
                    let mut error = None;
                    while !stop.load(Ordering::Relaxed) {
                        let i = r.below(per as u64) as usize;
                        let p = root.join(name(t, i));
                        let want = if r.chance(50) {
                            State::Gone
                        } else {
                            n += 1;
                            State::Data(format!("{t} {i} {n}").into_bytes())
                        };
                        in_flight = Some((i, want.clone()));
                        let res = match &want {
                            // ENOENT means "already gone" only while the mount is alive:
                            // once its dead mount is detached, the path names a directory
                            // of the bare mount point, where nothing exists either.
                            State::Gone => match fs::remove_file(&p) {
                                Err(e)
                                    if e.raw_os_error() == Some(libc::ENOENT)
                                        && !killed.load(Ordering::SeqCst) =>
                                {
                                    Ok(())
                                }
                                other => other,
                            },
                            State::Data(data) => {
                                fs::File::create(&p).and_then(|mut f| f.write_all(data))
                            }
                            State::Lower => unreachable!(),
                        };
                        match res {
                            Ok(()) => {
                                states.insert(i, want);
                                in_flight = None;
                            }
                            // The daemon is gone (or its dead mount already detached):
                            // any error then; before the kill, none is allowed.
                            Err(e) => {
                                if !killed.load(Ordering::SeqCst) {
                                    error = Some(format!("{e}"));
                                }
                                break;
                            }
                        }
                    }
                    (states, in_flight, error)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + rng.below(700)));
        killed.store(true, Ordering::SeqCst);
        kill_daemon(&mut m);
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        drop(m);
        let view = after_crash(&[&low], &u, &w, d.path(), &format!("round {round}"));
        for (t, (states, in_flight, error)) in results.iter().enumerate() {
            assert!(
                error.is_none(),
                "round {round}: worker {t} failed before the kill: {error:?}"
            );
            for i in 0..per {
                let lower = (i % 2 == 0).then(|| format!("lower {t} {i}").into_bytes());
                let last = states.get(&i).cloned().unwrap_or(State::Lower);
                let mut allowed = vec![last.clone()];
                if let Some((j, s)) = in_flight {
                    if *j == i {
                        allowed.push(s.clone());
                        // create = open(O_TRUNC) then write: the kill may fall in between.
                        allowed.push(State::Data(Vec::new()));
                    }
                }
                let key = name(t, i);
                let shown = view.entries.get(key.as_bytes());
                let ok = allowed.iter().any(|s| match (s, shown) {
                    (State::Gone, None) => true,
                    (State::Lower, None) => lower.is_none(),
                    (State::Lower, Some(info)) => {
                        lower.as_ref().is_some_and(|l| info.data == digest(l))
                    }
                    (State::Data(data), Some(info)) => info.data == digest(data),
                    _ => false,
                });
                assert!(
                    ok,
                    "round {round}: {key} shows {shown:?}; acknowledged {last:?}, allowed {allowed:?}"
                );
            }
            acked += states.len();
        }
    }
    eprintln!("storm: {rounds} kills, {acked} names with acknowledged changes checked");
}

/// How `common::snapshot` describes a file with this content.
fn digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{} {:x}", data.len(), sha2::Sha256::digest(data))
}

// ---- Bugs found by crashing (fixed; kept as regression tests) --------------------------------

/// Kill the daemon of `m` as soon as `cond` holds (polled), or give up when `done` is set.
fn kill_when(m: &mut Mount, done: &AtomicBool, cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while !done.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
        if cond() {
            kill_daemon(m);
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Renaming a lower directory copies its tree up (`Union::copy_up_tree`). `copy_tree_locked`
/// first unlinks the upper whiteouts of the directory ("the directory becomes
/// self-contained"), then copies every entry, and only `copy_up_tree` marks the directory
/// opaque at the very end. Killed in between (the whole copy: seconds for a big tree), the
/// upper holds a non-opaque directory without its whiteouts: every file deleted there before
/// comes back. Kernel overlayfs never drops a whiteout before the directory that makes it
/// unnecessary is in place. (Fixed: the whiteouts now go only after the directory is opaque.)
/// The kill here lands as soon as the copy has started (a copied subdirectory appears in the
/// upper), the window in which the whiteouts used to be gone.
#[test]
fn killed_while_a_renamed_tree_is_copied_deleted_files_come_back() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    big_lower_dir(&low, 400);
    wfile(low.join("tree/gone"), "deleted before the rename");
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let mut m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &[]);
    fs::remove_file(m.p("tree/gone")).unwrap();
    assert!(
        fs::symlink_metadata(u.join("tree/gone")).is_ok(),
        "whiteout in the upper"
    );
    let done = Arc::new(AtomicBool::new(false));
    let (from, to, flag) = (m.p("tree"), m.p("moved"), done.clone());
    let t = std::thread::spawn(move || {
        let r = fs::rename(from, to);
        flag.store(true, Ordering::Relaxed);
        r.is_ok()
    });
    let killed = kill_when(&mut m, &done, || {
        (0..8).any(|i| fs::symlink_metadata(u.join(format!("tree/s{i}"))).is_ok())
    });
    let renamed = t.join().unwrap();
    drop(m);
    assert!(killed, "the kill landed before the rename finished");
    let m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &[]);
    let dir = if renamed { "moved" } else { "tree" };
    assert!(
        !m.p(&format!("{dir}/gone")).exists(),
        "{dir}/gone was deleted before the crash and must stay deleted"
    );
}

/// Renaming a directory over an upper directory that is empty in the union but still holds
/// whiteouts: `Union::rename` empties the target with `remove_contents` and only then renames
/// over it. Killed in between, the target is a non-opaque directory with fewer whiteouts: the
/// lower files they hid come back. (The kernel swaps in an empty opaque directory atomically,
/// `ovl_clear_empty`.) The kill here waits for the first whiteout to disappear.
#[test]
fn killed_while_renaming_over_an_emptied_merged_dir_files_come_back() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    for i in 0..5000 {
        wfile(low.join(format!("target/f{i}")), "lower");
    }
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let mut m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &[]);
    for i in 0..5000 {
        fs::remove_file(m.p(&format!("target/f{i}"))).unwrap();
    }
    fs::create_dir(m.p("src")).unwrap();
    fs::write(m.p("src/new"), "new").unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (from, to, flag) = (m.p("src"), m.p("target"), done.clone());
    let t = std::thread::spawn(move || {
        let r = fs::rename(from, to);
        flag.store(true, Ordering::Relaxed);
        r.is_ok()
    });
    let upper_target = u.join("target");
    let killed = kill_when(&mut m, &done, || {
        fs::read_dir(&upper_target).map_or(true, |r| r.count() < 5000)
    });
    let renamed = t.join().unwrap();
    drop(m);
    assert!(killed, "the kill landed before the rename finished");
    let m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &[]);
    let shown: Vec<_> = fs::read_dir(m.p("target"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        shown.len() <= 1,
        "target shows {} entries (renamed: {renamed}); it must show nothing (old) or `new`",
        shown.len()
    );
}
