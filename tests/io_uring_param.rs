//! FUSE-over-io_uring as the default transport: a root mount turns the fuse module's
//! `enable_uring` on when the kernel has it off, `io_uring=off` leaves it alone, a mount that
//! cannot use the rings serves over `/dev/fuse`, a rootless mount says how to turn it on, and
//! aborting the connection or killing the daemon ends requests the daemon was serving.
//!
//! Every test here changes a host setting (the parameter, `/dev/fuse`'s mode, the io_uring
//! sysctl): they take one lock so they never overlap, and put each setting back when done.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

static HOST: Mutex<()> = Mutex::new(());

fn host() -> MutexGuard<'static, ()> {
    HOST.lock().unwrap_or_else(|p| p.into_inner())
}

/// A host setting file, put back as it was on drop.
struct Saved {
    path: PathBuf,
    value: String,
}

impl Saved {
    fn set(path: &str, value: &str) -> Saved {
        let saved = Saved {
            path: PathBuf::from(path),
            value: fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}")),
        };
        fs::write(path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        saved
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        let _ = fs::write(&self.path, self.value.trim());
    }
}

fn param() -> String {
    fs::read_to_string(PARAM).unwrap().trim().to_string()
}

/// Whether these tests can run: root, /dev/fuse, and a kernel with the parameter (a kernel
/// without it is covered by the decision table in `mount::uring_param`).
fn ready() -> bool {
    if !can_mount() {
        return false;
    }
    if !Path::new(PARAM).exists() {
        eprintln!("skipping: this kernel has no {PARAM}");
        return false;
    }
    true
}

fn ring_threads(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("layerfs-ring-"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn lower(d: &Path) -> PathBuf {
    let low = d.join("low");
    for i in 0..20 {
        wfile(low.join(format!("f{i}")), format!("lower {i}\n"));
    }
    low
}

/// Mount with exactly these options (the suite-wide LAYERFS_TEST_MOUNT_OPTS would change what
/// is tested), returning the mount and what the command said on stderr.
fn mount_plain(args: &[&str], mnt: &Path) -> (Mount, String) {
    mkdirp(mnt);
    let out = Command::new(bin())
        .args(args)
        .arg(mnt)
        .output()
        .expect("run layerfs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {stderr}");
    let mnt = fs::canonicalize(mnt).unwrap();
    let daemon = daemon_pid(&mnt);
    (Mount { path: mnt, daemon }, stderr)
}

#[test]
fn a_root_mount_turns_the_parameter_on_and_serves_over_the_rings() {
    if !ready() {
        return;
    }
    let _host = host();
    let _saved = Saved::set(PARAM, "N");
    let d = tempfile::tempdir().unwrap();
    let low = lower(d.path());
    let low_s = low.to_str().unwrap();
    let (m, said) = mount_plain(&["mount", "--lower", low_s], &d.path().join("m"));
    assert_eq!(param(), "Y", "the mount did not turn the parameter on");
    assert!(
        said.contains("turned on FUSE-over-io_uring") && said.contains("io_uring=off"),
        "one line saying so, and how to keep it off: {said:?}"
    );
    assert_eq!(said.trim_end().lines().count(), 1, "{said:?}");
    let pid = m.daemon.expect("daemon");
    assert!(
        ring_threads(pid) > 0,
        "no ring threads: not served over io_uring"
    );
    for i in 0..20 {
        assert_eq!(
            fs::read_to_string(m.p(&format!("f{i}"))).unwrap(),
            format!("lower {i}\n")
        );
    }
    drop(m);

    // The fuse-overlayfs command line (podman's mount program) does the same.
    fs::write(PARAM, "N").unwrap();
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    mkdirp(&u);
    mkdirp(&w);
    let opts = format!(
        "lowerdir={low_s},upperdir={},workdir={}",
        u.display(),
        w.display()
    );
    let (m, _) = mount_plain(&["-o", &opts], &d.path().join("m2"));
    assert_eq!(param(), "Y");
    fs::write(m.p("new"), "x").unwrap();
    assert!(ring_threads(m.daemon.expect("daemon")) > 0);
}

#[test]
fn io_uring_off_leaves_the_parameter_as_it_was() {
    if !ready() {
        return;
    }
    let _host = host();
    let d = tempfile::tempdir().unwrap();
    let low = lower(d.path());
    for value in ["N", "Y"] {
        let _saved = Saved::set(PARAM, value);
        let (m, said) = mount_plain(
            &[
                "mount",
                "--lower",
                low.to_str().unwrap(),
                "-o",
                "io_uring=off",
            ],
            &d.path().join(format!("m{value}")),
        );
        assert_eq!(param(), value);
        assert_eq!(said, "", "nothing to say");
        assert_eq!(ring_threads(m.daemon.expect("daemon")), 0);
        assert_eq!(fs::read_to_string(m.p("f3")).unwrap(), "lower 3\n");
    }
}

#[test]
fn a_mount_that_cannot_use_the_rings_serves_over_dev_fuse() {
    if !ready() || !Path::new(IO_URING_DISABLED).exists() {
        return;
    }
    let _host = host();
    let _param = Saved::set(PARAM, "Y");
    // io_uring_disabled=2: no process may create a ring.
    let _disabled = Saved::set(IO_URING_DISABLED, "2");
    let d = tempfile::tempdir().unwrap();
    let low = lower(d.path());
    let log = d.path().join("daemon.log");
    let opts = format!("log={}", log.display());
    let (m, said) = mount_plain(
        &["mount", "--lower", low.to_str().unwrap(), "-o", &opts],
        &d.path().join("m"),
    );
    assert_eq!(ring_threads(m.daemon.expect("daemon")), 0);
    for i in 0..20 {
        assert_eq!(
            fs::read_to_string(m.p(&format!("f{i}"))).unwrap(),
            format!("lower {i}\n")
        );
    }
    // Said before the daemon's stderr moves to the log file, so in either.
    let said = fs::read_to_string(&log).unwrap_or_default() + &said;
    assert!(
        said.contains("io_uring offered by the kernel but unusable here"),
        "the fallback is logged: {said:?}"
    );
}

/// Run `cat FILE` in a thread; the returned receiver gets its result.
fn cat_in_background(file: PathBuf) -> std::sync::mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fs::read_to_string(&file));
    });
    rx
}

fn fuse_connection(mnt: &Path) -> String {
    let want = mnt.to_str().unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(want))
        .expect("mounted");
    let dev = line.split(' ').nth(2).unwrap();
    dev.split(':').nth(1).unwrap().to_string()
}

/// A request the daemon is serving over a ring, stuck in the layer below (a FUSE mount whose
/// daemon is stopped), ends when the connection is aborted and when the daemon is killed
/// (its rings go with it).
#[test]
fn abort_or_kill_ends_requests_in_the_daemons_hands() {
    if !ready() {
        return;
    }
    let _host = host();
    let _param = Saved::set(PARAM, "Y");
    let d = tempfile::tempdir().unwrap();
    let low = lower(d.path());
    for how in ["abort", "kill"] {
        // Below over /dev/fuse: a stopped daemon there leaves the top daemon's call waiting
        // on a request that was never read, which a SIGKILL can end (one read by a ring is
        // "in userspace" and waits uninterruptibly for its answer, whoever is killed).
        let (below, _) = mount_plain(
            &[
                "mount",
                "--lower",
                low.to_str().unwrap(),
                "-o",
                "io_uring=off",
            ],
            &d.path().join(format!("below-{how}")),
        );
        let (top, _) = mount_plain(
            &["mount", "--lower", below.path.to_str().unwrap()],
            &d.path().join(format!("top-{how}")),
        );
        let top_pid = top.daemon.expect("daemon");
        assert!(ring_threads(top_pid) > 0);
        let below_pid = below.daemon.expect("daemon") as i32;
        run(Command::new("kill").args(["-STOP", &below_pid.to_string()]));
        let result = cat_in_background(top.p("f7"));
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            result.try_recv().is_err(),
            "the read finished while the layer below was stopped"
        );
        let start = Instant::now();
        match how {
            "abort" => fs::write(
                format!(
                    "/sys/fs/fuse/connections/{}/abort",
                    fuse_connection(&top.path)
                ),
                "1",
            )
            .unwrap(),
            _ => {
                run(Command::new("kill").args(["-KILL", &top_pid.to_string()]));
            }
        }
        let got = result.recv_timeout(Duration::from_secs(10));
        run(Command::new("kill").args(["-CONT", &below_pid.to_string()]));
        let got = got.unwrap_or_else(|_| panic!("{how}: the read did not end within 10 s"));
        assert!(got.is_err(), "{how}: the read should fail, got {got:?}");
        eprintln!("{how}: the read ended after {:?}: {got:?}", start.elapsed());
        drop(top);
        assert!(
            wait_gone(top_pid, Duration::from_secs(10)),
            "{how}: daemon left"
        );
    }
}

/// A mount in a user namespace whose root is not the host's (as rootless podman's) cannot set
/// the parameter: it says once how to, and serves over /dev/fuse.
#[test]
fn a_rootless_mount_says_how_to_turn_it_on() {
    if !ready() {
        return;
    }
    let _host = host();
    let _param = Saved::set(PARAM, "N");
    let mode = fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
    let _fuse_mode = RestoreMode(mode);
    fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
    let d = tempfile::tempdir().unwrap();
    chmod(d.path(), 0o755);
    let low = lower(d.path());
    let mnt = d.path().join("m");
    mkdirp(&mnt);
    chmod(&mnt, 0o777);
    // uid 100000 makes a user namespace of its own, mounts, reads, unmounts.
    let script = format!(
        "{bin} mount --lower {low} {mnt} && cat {mnt}/f4 && umount {mnt}",
        bin = bin(),
        low = low.display(),
        mnt = mnt.display()
    );
    let out = Command::new("setpriv")
        .args(["--reuid=100000", "--regid=100000", "--clear-groups"])
        .args([
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
        ])
        .arg(&script)
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "lower 4\n");
    assert_eq!(param(), "N", "a rootless mount changed the host");
    assert!(
        stderr.contains("One-time host set-up") && stderr.contains("modprobe.d"),
        "{stderr:?}"
    );
    assert_eq!(
        stderr.matches("One-time host set-up").count(),
        1,
        "said once"
    );
}

struct RestoreMode(u32);

impl Drop for RestoreMode {
    fn drop(&mut self) {
        let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.0));
    }
}
