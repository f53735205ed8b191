//! Concurrency: several workers (threads making real system calls through the mount) run
//! random operations on one layerfs mount at once for a fixed time. Each worker owns some
//! files (lower files at first, so they are copied up under contention) and checks every read
//! of them against its own model; all of them fight over a shared area: creates, unlinks,
//! renames of files and of lower directories (whole-tree copy-ups) across directories, mkdir,
//! rmdir, links, symlinks, listings; once a second the kernel is made to drop its cached
//! inodes, so FORGETs race with lookups.
//!
//! Checks: no operation stalls for more than 30 s (a watchdog dumps the daemon's stacks, with
//! gdb when installed, and aborts the connection); no operation fails with an errno the
//! operation cannot legitimately return; the daemon is alive at the end; no write to an owned
//! file is lost; the tree can be walked and every listed name stat'ed; after unmount, kernel
//! overlayfs shows the upper as layerfs showed it, and `layerfs fsck` finds nothing.
//!
//! `LAYERFS_CONC_SECS` sets the duration (default 20), `LAYERFS_CONC_WORKERS` the number of
//! workers (default 6), `LAYERFS_CONC_SEED` the seed, `LAYERFS_CONC_THREADS` the daemon's
//! session threads (`-o threads=N`; default: the mount's default).

mod common;
mod fuzz;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fuzz::rng::Rng;
use fuzz::watchdog::{Watchdog, procinfo};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const OWNED: usize = 8;
const SHARED_NAMES: &[&str] = &["a", "b", "c", "d", "L0", "L1", "L2"];

fn owned_initial(t: usize, i: usize) -> Vec<u8> {
    format!("worker {t} file {i}\n")
        .repeat(1 + i * 50)
        .into_bytes()
}

fn lower_stack(low: &Path, workers: usize) {
    for t in 0..workers {
        for i in 0..OWNED / 2 {
            wfile(low.join(format!("own/{t}/f{i}")), owned_initial(t, i));
        }
        mkdirp(low.join(format!("own/{t}")));
    }
    for k in 0..3 {
        for j in 0..40 {
            wfile(
                low.join(format!("shared/L{k}/sub{}/f{j}", j % 4)),
                format!("shared {k} {j}\n").repeat(j + 1),
            );
        }
    }
    wfile(low.join("shared/a"), "lower a");
}

/// Errnos an operation may legitimately return when others race with it.
fn expected(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOENT
            | libc::EEXIST
            | libc::ENOTEMPTY
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::EINVAL
            | libc::ENODATA
            | libc::EPERM
            | libc::EMLINK
    )
}

#[derive(Default)]
struct Tally {
    ops: u64,
    errors: BTreeMap<i32, u64>,
    unexpected: Vec<String>,
}

fn shared_path(rng: &mut Rng, root: &Path) -> PathBuf {
    let mut p = root.join("shared");
    for _ in 0..1 + rng.below(3) {
        p = p.join(*rng.pick(SHARED_NAMES));
    }
    p
}

/// One operation on the shared area; returns what it was and its result.
fn shared_op(rng: &mut Rng, root: &Path) -> (String, std::io::Result<()>) {
    let a = shared_path(rng, root);
    let b = shared_path(rng, root);
    let show = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    match rng.weighted(&[10, 8, 6, 5, 14, 6, 5, 3, 3, 3]) {
        0 => (
            format!("create {}", show(&a)),
            fs::File::create(&a).and_then(|mut f| f.write_all(b"shared data")),
        ),
        1 => (format!("unlink {}", show(&a)), fs::remove_file(&a)),
        2 => (format!("mkdir {}", show(&a)), fs::create_dir(&a)),
        3 => (format!("rmdir {}", show(&a)), fs::remove_dir(&a)),
        4 => (
            format!("rename {} {}", show(&a), show(&b)),
            fs::rename(&a, &b),
        ),
        5 => (
            format!("readdir {}", show(&a)),
            fs::read_dir(&a).and_then(|mut r| r.try_for_each(|e| e.map(drop))),
        ),
        6 => (
            format!("stat {}", show(&a)),
            fs::symlink_metadata(&a).map(drop),
        ),
        7 => (
            format!("link {} {}", show(&a), show(&b)),
            fs::hard_link(&a, &b),
        ),
        8 => (
            format!("symlink {}", show(&a)),
            std::os::unix::fs::symlink("target", &a),
        ),
        _ => (format!("read {}", show(&a)), fs::read(&a).map(drop)),
    }
}

/// A worker's model of its owned files: name -> content.
type Model = BTreeMap<String, Vec<u8>>;

/// One operation on the worker's own files, checked against its model.
fn owned_op(
    rng: &mut Rng,
    root: &Path,
    t: usize,
    model: &mut Model,
) -> (String, Result<(), String>) {
    let dir = root.join(format!("own/{t}"));
    let i = rng.below(OWNED as u64) as usize;
    let name = format!("f{i}");
    let p = dir.join(&name);
    let io = |r: std::io::Result<()>| r.map_err(|e| e.to_string());
    match rng.weighted(&[30, 10, 10, 10, 10, 30]) {
        0 => {
            // pwrite at an offset.
            let Some(cur) = model.get_mut(&name) else {
                let data = format!("new {t} {i}").into_bytes();
                let r = io(fs::write(&p, &data));
                if r.is_ok() {
                    model.insert(name.clone(), data);
                }
                return (format!("write {name}"), r);
            };
            let off = rng.below(cur.len() as u64 + 100) as usize;
            let data: Vec<u8> = (0..1 + rng.below(5000))
                .map(|k| (k as u8).wrapping_add(t as u8 * 31))
                .collect();
            let r = io(fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.write_all_at(&data, off as u64)));
            if r.is_ok() {
                if cur.len() < off + data.len() {
                    cur.resize(off + data.len(), 0);
                }
                cur[off..off + data.len()].copy_from_slice(&data);
            }
            (format!("pwrite {name} @{off}"), r)
        }
        1 => {
            let len = rng.below(20000) as usize;
            if !model.contains_key(&name) {
                return (String::from("noop"), Ok(()));
            }
            let r = io(fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(len as u64)));
            if r.is_ok() {
                if let Some(cur) = model.get_mut(&name) {
                    cur.resize(len, 0);
                }
            }
            (format!("truncate {name} {len}"), r)
        }
        2 => {
            // Rename away and back.
            if !model.contains_key(&name) {
                return (String::from("noop"), Ok(()));
            }
            let tmp = dir.join("moving");
            let r = io(fs::rename(&p, &tmp).and_then(|()| fs::rename(&tmp, &p)));
            (format!("rename {name} away and back"), r)
        }
        3 => {
            let r = if model.contains_key(&name) {
                io(fs::remove_file(&p))
            } else {
                let data = owned_initial(t, i + 100);
                let r = io(fs::write(&p, &data));
                if r.is_ok() {
                    model.insert(name.clone(), data);
                }
                return (format!("create {name}"), r);
            };
            if r.is_ok() {
                model.remove(&name);
            }
            (format!("unlink {name}"), r)
        }
        4 => {
            // The directory lists exactly the owned files.
            let r = fs::read_dir(&dir).map(|rd| {
                let mut names: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                names
            });
            let want: Vec<String> = model.keys().cloned().collect();
            let r = match r {
                Ok(names) if names == want => Ok(()),
                Ok(names) => Err(format!("listing {names:?}, model {want:?}")),
                Err(e) => Err(e.to_string()),
            };
            (format!("list own/{t}"), r)
        }
        _ => {
            let got = fs::read(&p);
            let r = match (got, model.get(&name)) {
                (Ok(g), Some(w)) if &g == w => Ok(()),
                (Ok(g), Some(w)) => Err(format!(
                    "content differs: {} bytes, model {} bytes",
                    g.len(),
                    w.len()
                )),
                (Err(e), None) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                (Ok(_), None) => Err("exists, model says removed".into()),
                (Err(e), _) => Err(e.to_string()),
            };
            (format!("read {name}"), r)
        }
    }
}

#[test]
fn workers_race_on_one_mount() {
    if !can_mount() {
        return;
    }
    let secs = env_u64("LAYERFS_CONC_SECS", 20);
    let workers = env_u64("LAYERFS_CONC_WORKERS", 6) as usize;
    let seed = env_u64("LAYERFS_CONC_SEED", 1);
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    lower_stack(&low, workers);
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let threads = std::env::var("LAYERFS_CONC_THREADS").ok();
    let opts: Vec<String> = threads.iter().map(|t| format!("threads={t}")).collect();
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let mut m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &opts);
    let pid = m.daemon.expect("daemon pid");
    let wd = Arc::new(Watchdog::start(Duration::from_secs(30)));
    wd.watch_mount(&m.path, Some(pid));
    let fds_start = procinfo::fd_count(pid).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let handles: Vec<_> = (0..workers)
        .map(|t| {
            let root = m.path.clone();
            let wd = wd.clone();
            let tally = tally.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed.wrapping_mul(1000) + t as u64);
                let mut model: Model = (0..OWNED / 2)
                    .map(|i| (format!("f{i}"), owned_initial(t, i)))
                    .collect();
                let mut mine = Tally::default();
                let mut last_drop = Instant::now();
                while Instant::now() < deadline && wd.fired().is_none() {
                    if t == 0 && last_drop.elapsed() > Duration::from_secs(1) {
                        // Make the kernel forget cached inodes: FORGETs race with lookups.
                        let _ = fs::write("/proc/sys/vm/drop_caches", "2");
                        last_drop = Instant::now();
                    }
                    if rng.chance(50) {
                        let (what, r) = wd.op(
                            || format!("worker {t}: own op"),
                            || owned_op(&mut rng, &root, t, &mut model),
                        );
                        mine.ops += 1;
                        if let Err(e) = r {
                            mine.unexpected.push(format!("worker {t}: {what}: {e}"));
                        }
                    } else {
                        let (what, r) = wd.op(
                            || format!("worker {t}: shared op"),
                            || shared_op(&mut rng, &root),
                        );
                        mine.ops += 1;
                        if let Err(e) = r {
                            let errno = e.raw_os_error().unwrap_or(-1);
                            *mine.errors.entry(errno).or_default() += 1;
                            if !expected(errno) {
                                mine.unexpected.push(format!("worker {t}: {what}: {e}"));
                            }
                        }
                    }
                    if mine.unexpected.len() > 10 {
                        break;
                    }
                }
                let mut all = tally.lock().unwrap();
                all.ops += mine.ops;
                for (k, v) in mine.errors {
                    *all.errors.entry(k).or_default() += v;
                }
                all.unexpected.extend(mine.unexpected);
                model
            })
        })
        .collect();
    let models: Vec<Model> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    if let Some(report) = wd.fired() {
        panic!("an operation stalled:\n{report}");
    }
    assert!(procinfo::alive(pid), "the daemon is alive after the run");
    let tally = Arc::try_unwrap(tally)
        .ok()
        .expect("workers done")
        .into_inner()
        .unwrap();
    eprintln!(
        "concurrency: {workers} workers, {secs} s: {} operations; errors by errno {:?}; daemon fds {} at start, {} at end",
        tally.ops,
        tally.errors,
        fds_start,
        procinfo::fd_count(pid).unwrap_or(0)
    );
    assert!(
        tally.unexpected.is_empty(),
        "unexpected results:\n{}",
        tally.unexpected.join("\n")
    );
    // No lost writes: every owned file holds what its worker wrote last.
    for (t, model) in models.iter().enumerate() {
        for (name, want) in model {
            let got = fs::read(m.p(&format!("own/{t}/{name}"))).unwrap();
            assert!(
                &got == want,
                "own/{t}/{name}: {} bytes, written {}",
                got.len(),
                want.len()
            );
        }
    }
    let view = wd.op(|| "final walk".into(), || snapshot(&m.path));
    wd.clear_mounts();
    m.unmount();
    assert!(
        wait_gone(pid, Duration::from_secs(20)),
        "daemon exits on unmount"
    );
    let k = kernel(
        &[&low],
        Some((&u, &d.path().join("w2"))),
        &d.path().join("km"),
        "index=off",
    );
    assert_same(&view, &snapshot(&k.path), "kernel overlayfs on the upper");
    drop(k);
    let out = Command::new(bin())
        .arg("fsck")
        .arg(&u)
        .arg("--lower")
        .arg(&low)
        .arg("--work")
        .arg(&w)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck of the upper:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Whether every thread of `pid` is in the stopped state.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The state follows the parenthesized command name, which may contain spaces.
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state == 'T' || state == 't')
    })
}

/// The watchdog itself: a stopped daemon stalls an operation; the watchdog reports it with the
/// daemon's stacks and aborts the connection, so the operation returns instead of hanging.
#[test]
fn watchdog_reports_and_unblocks_a_stalled_operation() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    wfile(low.join("f"), "f");
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let mut m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &["timeout=0"]);
    let pid = m.daemon.expect("daemon pid");
    let wd = Watchdog::start(Duration::from_secs(2));
    wd.watch_mount(&m.path, Some(pid));
    layerfs::sys::kill(pid as i32, libc::SIGSTOP).unwrap();
    // SIGSTOP takes effect asynchronously: a ring thread that is still awake would answer the
    // stat first (it did under CI). Wait until every thread of the daemon is stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = wd.op(
        || "stat f on a stopped daemon".into(),
        || fs::metadata(m.p("f")),
    );
    let report = wd.fired().expect("the watchdog fired");
    let _ = layerfs::sys::kill(pid as i32, libc::SIGKILL);
    let _ = layerfs::sys::kill(pid as i32, libc::SIGCONT);
    assert!(
        r.is_err(),
        "the stalled stat returned an error once aborted"
    );
    assert!(report.contains("stat f on a stopped daemon"), "{report}");
    assert!(report.contains(&format!("==== daemon {pid}")), "{report}");
    assert!(report.contains("aborting the FUSE connections"), "{report}");
    wait_gone(pid, Duration::from_secs(10));
    m.daemon = None;
    let _ = Command::new("umount").arg("-l").arg(&m.path).status();
}
