//! FUSE-over-io_uring: with the fuse module's `enable_uring` on, requests are served by the
//! per-CPU ring threads, and everything still behaves as over `/dev/fuse`. scripts/test.sh
//! turns the parameter on for the test run; without it (or with the whole suite forced to
//! `io_uring=off`) these tests say so and return.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

fn rings_available() -> bool {
    if !can_mount() {
        return false;
    }
    let forced_off = std::env::var("LAYERFS_TEST_MOUNT_OPTS")
        .map(|o| o.contains("io_uring=off"))
        .unwrap_or(false);
    let enabled = fs::read_to_string(PARAM)
        .map(|v| v.trim() == "Y")
        .unwrap_or(false);
    if forced_off || !enabled {
        eprintln!("skipping: FUSE-over-io_uring is off ({PARAM} or LAYERFS_TEST_MOUNT_OPTS)");
        if std::env::var("CI").as_deref() == Ok("true") && !forced_off && Path::new(PARAM).exists()
        {
            panic!("CI=true and {PARAM} exists but is not Y: scripts/test.sh should turn it on");
        }
    }
    enabled && !forced_off
}

/// The `/proc` directories of the daemon's ring threads.
fn ring_threads(pid: u32) -> Vec<std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| task.unwrap().path())
        .filter(|dir| {
            fs::read_to_string(dir.join("comm"))
                .unwrap_or_default()
                .starts_with("layerfs-ring-")
        })
        .collect()
}

/// Voluntary context switches of the daemon's ring threads, and how many there are.
fn ring_switches(pid: u32) -> (u64, usize) {
    let threads = ring_threads(pid);
    let mut total = 0;
    for dir in &threads {
        let status = fs::read_to_string(dir.join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                total += v.trim().parse::<u64>().unwrap();
            }
        }
    }
    (total, threads.len())
}

fn possible_cpus() -> usize {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let last = s.trim().rsplit('-').next().unwrap();
    last.parse::<usize>().unwrap() + 1
}

#[test]
fn requests_are_served_by_one_ring_thread_per_cpu() {
    if !rings_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    for i in 0..50 {
        wfile(low.join(format!("dir/f{i}")), format!("lower {i}"));
    }
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &[]);
    let pid = m.daemon.expect("daemon pid");
    let (before, threads) = ring_switches(pid);
    assert_eq!(threads, possible_cpus(), "one ring thread per possible CPU");
    for i in 0..200 {
        let p = m.p(&format!("new{i}"));
        fs::write(&p, format!("new {i}")).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), format!("new {i}"));
    }
    for i in 0..50 {
        let p = m.p(&format!("dir/f{i}"));
        assert_eq!(fs::read_to_string(&p).unwrap(), format!("lower {i}"));
        fs::rename(&p, m.p(&format!("dir/g{i}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(m.p("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..50).map(|i| format!("g{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    let (after, _) = ring_switches(pid);
    // Over /dev/fuse the ring threads would sleep through all of this.
    assert!(
        after >= before + 400,
        "ring threads woke {} times for ~1,000 requests",
        after - before
    );
}

#[test]
fn io_uring_off_starts_no_rings() {
    if !rings_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    wfile(low.join("f"), "f");
    let m = layerfs_stack(&[&low], None, &d.path().join("m"), &["io_uring=off"]);
    assert_eq!(fs::read_to_string(m.p("f")).unwrap(), "f");
    assert_eq!(ring_switches(m.daemon.unwrap()).1, 0);
}

/// Scheduling policy (0 normal, 5 SCHED_IDLE) of each of the daemon's ring threads.
fn ring_policies(pid: u32) -> Vec<u32> {
    ring_threads(pid)
        .iter()
        .map(|dir| {
            let stat = fs::read_to_string(dir.join("stat")).unwrap();
            // Fields after the command name start with field 3 (state); policy is field 41.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(41 - 3).unwrap().parse().unwrap()
        })
        .collect()
}

/// Busy loops that compete for every CPU, ended (by pid) when dropped.
struct CpuHogs(Vec<std::process::Child>);

impl CpuHogs {
    fn start(n: usize) -> CpuHogs {
        CpuHogs(
            (0..n)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A ring thread in SCHED_IDLE gets a CPU only when no other work wants one: with other work
/// running, every request waited for a scheduler tick (3,000 cold 4 KiB reads: 9-12 s instead
/// of 0.4 s over `/dev/fuse`). While other work competes for the CPUs, ring threads serve in
/// the normal class.
#[test]
fn ring_threads_serve_in_the_normal_class_while_other_work_competes() {
    if !rings_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    wfile(low.join("f"), "f");
    let m = layerfs_stack(&[&low], None, &d.path().join("m"), &[]);
    let pid = m.daemon.unwrap();
    let cpus = possible_cpus();
    let _hogs = CpuHogs::start(2 * cpus);
    let mut policies = Vec::new();
    for round in 0..100 {
        // Requests from every CPU, so every ring thread wakes with the hogs running.
        std::thread::scope(|s| {
            for cpu in 0..cpus {
                let m = &m;
                s.spawn(move || {
                    let mut set = nix::sched::CpuSet::new();
                    if set.set(cpu).is_err()
                        || nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                            .is_err()
                    {
                        return; // an offline CPU: its queue gets no requests
                    }
                    for i in 0..20 {
                        let _ = fs::metadata(m.p(&format!("missing-{round}-{cpu}-{i}")));
                    }
                });
            }
        });
        policies = ring_policies(pid);
        if policies.iter().all(|&p| p == 0) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("ring threads' policies with every CPU busy: {policies:?} (5 = SCHED_IDLE)");
}

/// Requests and replies of the largest sizes go through an entry's payload buffer: 1 MiB
/// writes and reads served by the daemon (no passthrough), and a listing of 3,000 names.
#[test]
fn large_requests_and_replies_fit_the_ring_buffers() {
    if !rings_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    for i in 0..3000 {
        wfile(low.join(format!("big/{i:05}-{}", "x".repeat(40))), "");
    }
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(
        &[&low],
        Some((&u, &w)),
        &d.path().join("m"),
        &["passthrough=off"],
    );
    let chunk: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
    {
        let mut f = fs::File::create(m.p("data")).unwrap();
        for _ in 0..3 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    // O_DIRECT keeps the reads out of the page cache: 1 MiB READs served by the daemon.
    let copy = d.path().join("copy");
    run(std::process::Command::new("dd")
        .arg(format!("if={}", m.p("data").display()))
        .arg(format!("of={}", copy.display()))
        .args(["bs=1M", "iflag=direct", "status=none"]));
    let back = fs::read(&copy).unwrap();
    assert_eq!(back.len(), 3 << 20);
    for (i, part) in back.chunks(1 << 20).enumerate() {
        assert!(part == chunk, "MiB {i} read back differs");
    }
    assert_eq!(fs::read_dir(m.p("big")).unwrap().count(), 3000);
    assert_eq!(
        fs::read(u.join("data")).unwrap().len(),
        3 << 20,
        "the upper holds what was written"
    );
}

/// Replies sent from other threads (a copy-up runs on a worker) and many requests in flight
/// at once (more than one ring's entries) all come back.
#[test]
fn concurrent_requests_and_worker_replies() {
    if !rings_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    for t in 0..16 {
        wfile(low.join(format!("t{t}/big")), vec![b'a'; 4 << 20]);
    }
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(&[&low], Some((&u, &w)), &d.path().join("m"), &[]);
    std::thread::scope(|s| {
        for t in 0..16 {
            let m = &m;
            s.spawn(move || {
                let big = m.p(&format!("t{t}/big"));
                let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
                f.write_all_at(b"b", 0).unwrap();
                drop(f);
                for i in 0..100 {
                    let p = m.p(&format!("t{t}/f{i}"));
                    fs::write(&p, [t as u8; 10]).unwrap();
                    assert_eq!(fs::metadata(&p).unwrap().len(), 10);
                }
                let data = fs::read(&big).unwrap();
                assert_eq!(data.len(), 4 << 20);
                assert_eq!(data[0], b'b');
                assert!(data[1..].iter().all(|&c| c == b'a'));
            });
        }
    });
    assert_eq!(fs::read_dir(m.p("t3")).unwrap().count(), 101);
}
