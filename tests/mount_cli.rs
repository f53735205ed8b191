//! Mounting as users and mount programs drive it: the fuse-overlayfs command line, daemon
//! hand-off, errors that mount nothing, and every way to unmount.

mod common;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn stack(root: &Path) {
    wfile(root.join("top/a"), "a\n");
    wfile(root.join("bot/b"), "b\n");
    mkdirp(root.join("u"));
    mkdirp(root.join("w"));
    mkdirp(root.join("m"));
}

#[test]
fn fuse_overlayfs_form_as_a_mount_program() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    stack(d.path());
    // Relative lowerdirs through a symlink, resolved against the caller's cwd, as
    // containers-storage passes them ("l/XXXX").
    mkdirp(d.path().join("l"));
    symlink(d.path().join("top"), d.path().join("l/T"));
    let opts = format!(
        "lowerdir=l/T:{},,upperdir={},workdir={},volatile,context=\"system_u:object_r:container_file_t:s0:c1,c2\"",
        d.path().join("bot").display(),
        d.path().join("u").display(),
        d.path().join("w").display()
    );
    let start = Instant::now();
    let mut child = Command::new(bin())
        .current_dir(d.path())
        .args(["-o", &opts, "overlay"])
        .arg(d.path().join("m"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The pipe reaches EOF only when both the parent and the daemon closed it.
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status}: {err}");
    assert!(err.is_empty(), "stderr: {err}");
    assert!(start.elapsed() < Duration::from_secs(20));
    let mnt = fs::canonicalize(d.path().join("m")).unwrap();
    assert!(is_mounted(&mnt), "live when the parent exits");
    // As a mount program run by root, setuid programs work (fuse-overlayfs does the same).
    let opts = mount_options(&mnt);
    assert!(!opts.contains("nosuid") && opts.contains("nodev"), "{opts}");
    let mut m = Mount {
        daemon: daemon_pid(&mnt),
        path: mnt,
    };
    assert!(m.daemon.is_some());
    assert_eq!(fs::read_to_string(m.p("a")).unwrap(), "a\n");
    assert_eq!(fs::read_to_string(m.p("b")).unwrap(), "b\n");
    fs::write(m.p("c"), "c\n").unwrap();
    assert_eq!(fs::read_to_string(d.path().join("u/c")).unwrap(), "c\n");
    // fusermount3 -u ends the daemon.
    let pid = m.daemon.take().unwrap();
    run(Command::new("fusermount3").arg("-u").arg(&m.path));
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "daemon exits after fusermount3 -u"
    );
    assert!(!is_mounted(&m.path));
}

#[test]
fn bad_invocations_fail_with_one_line_and_mount_nothing() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    stack(d.path());
    let p = |s: &str| d.path().join(s).display().to_string();
    wfile(d.path().join("full/x"), "x");
    mkdirp(d.path().join("bot/inner"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["-o".into(), format!("lowerdir={}", p("missing")), p("m")],
            "missing",
        ),
        (
            vec![
                "-o".into(),
                format!("lowerdir={},upperdir={}", p("top"), p("u")),
                p("m"),
            ],
            "without a work",
        ),
        (
            vec![
                "-o".into(),
                format!("lowerdir={},bogus_option", p("top")),
                p("m"),
            ],
            "bogus_option",
        ),
        (
            vec!["-o".into(), format!("lowerdir={}", p("top")), p("full")],
            "not an empty directory",
        ),
        (
            vec![
                "-o".into(),
                format!("lowerdir={}", p("bot")),
                p("bot/inner"),
            ],
            "inside lower",
        ),
        (
            vec![
                "-o".into(),
                format!("lowerdir={},uidmapping=1:2", p("top")),
                p("m"),
            ],
            "mapping",
        ),
        (
            vec!["mount".into(), "--lower".into(), p("missing"), p("m")],
            "missing",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line, got {err:?}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should mention {needle:?}"
        );
        assert!(
            !is_mounted(&d.path().join("m")),
            "{args:?} mounted something"
        );
    }
}

#[test]
fn work_dir_on_another_filesystem_is_refused() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    stack(d.path());
    let tmpfs = d.path().join("tmpfs");
    mkdirp(&tmpfs);
    run(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&tmpfs));
    let out = Command::new(bin())
        .arg("mount")
        .arg("--lower")
        .arg(d.path().join("top"))
        .arg("--upper")
        .arg(d.path().join("u"))
        .arg("--work")
        .arg(&tmpfs)
        .arg(d.path().join("m"))
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&tmpfs).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("same filesystem"), "{err}");
    assert!(!is_mounted(&d.path().join("m")));
}

#[test]
fn version_prints_one_line() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(s.lines().count(), 1, "{s:?}");
    assert!(s.starts_with("layerfs "));
}

/// Start a foreground mount (a child we can wait for) and wait until it is live.
fn foreground(d: &Path) -> std::process::Child {
    let child = Command::new(bin())
        .arg("mount")
        .arg("--foreground")
        .arg("--lower")
        .arg(d.join("top"))
        .arg(d.join("m"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !is_mounted(&d.join("m")) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "mount did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn wait_exit(child: &mut std::process::Child) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_way_to_unmount_ends_the_daemon_cleanly() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    stack(d.path());
    let mnt = fs::canonicalize(d.path().join("m")).unwrap();
    type Stop<'a> = Box<dyn Fn(&mut std::process::Child) + 'a>;
    let ways: Vec<(&str, Stop)> = vec![
        ("SIGTERM", Box::new(|c| unsafe_free_kill(c.id(), "TERM"))),
        ("SIGINT", Box::new(|c| unsafe_free_kill(c.id(), "INT"))),
        (
            "umount",
            Box::new(|_| drop(run(Command::new("umount").arg(&mnt)))),
        ),
        (
            "fusermount3 -u",
            Box::new(|_| drop(run(Command::new("fusermount3").arg("-u").arg(&mnt)))),
        ),
        (
            "layerfs umount",
            Box::new(|_| drop(run(Command::new(bin()).arg("umount").arg(&mnt)))),
        ),
    ];
    for (what, stop) in ways {
        let mut child = foreground(d.path());
        assert_eq!(fs::read_to_string(mnt.join("a")).unwrap(), "a\n");
        stop(&mut child);
        assert_eq!(wait_exit(&mut child), 0, "{what}: exit status");
        assert!(!is_mounted(&mnt), "{what}: still mounted");
    }
}

fn unsafe_free_kill(pid: u32, sig: &str) {
    run(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string()));
}

#[test]
fn an_ending_daemon_never_unmounts_a_newer_mount_at_the_same_path() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    stack(d.path());
    let mnt = fs::canonicalize(d.path().join("m")).unwrap();
    let old = layerfs_stack(&[&d.path().join("top")], None, &mnt, &[]);
    let old_pid = old.daemon.expect("daemon");
    std::mem::forget(old);
    // Freeze the old daemon, unmount it, mount a new one at the same path, then let the old
    // one see its connection gone and exit.
    unsafe_free_kill(old_pid, "STOP");
    // A plain umount would wait for the frozen daemon to answer; detach instead.
    run(Command::new("umount").arg("-l").arg(&mnt));
    let new = layerfs_stack(&[&d.path().join("bot")], None, &mnt, &[]);
    unsafe_free_kill(old_pid, "CONT");
    assert!(
        wait_gone(old_pid, Duration::from_secs(10)),
        "old daemon exits"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        is_mounted(&mnt),
        "the new mount survived the old daemon's exit"
    );
    assert_eq!(fs::read_to_string(new.p("b")).unwrap(), "b\n");
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); the name's closing parenthesis ends field 2.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn the_daemon_stops_polling_when_requests_stop() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    stack(d.path());
    let top = d.path().join("top");
    let mut m = layerfs_stack(&[&top], None, &d.path().join("m"), &[]);
    let pid = m.daemon.expect("daemon pid");
    // A burst of requests (each name is a fresh lookup) switches the loop to polling.
    for i in 0..3000 {
        assert!(fs::symlink_metadata(m.p(&format!("missing-{i}"))).is_err());
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(pid) - before;
    // A loop still polling would use about 200 ticks (two seconds) here.
    assert!(
        spent < 40,
        "idle daemon used {spent} clock ticks of CPU in 2 s: still busy polling"
    );
    assert_eq!(fs::read(m.p("a")).unwrap(), b"a\n");
    m.unmount();
}
