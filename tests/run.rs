//! The container runner against the real runtime (runc): a busybox rootfs, one container per
//! test, each with its own runtime state directory. After every run the test checks that
//! nothing is left: no container in `runc list`, no bundle, no mount under the state
//! directory, no stub in the rootfs.
//!
//! Needs root, runc and /bin/busybox (static). Without them a test is skipped with a message,
//! except when `CI=true`, where it fails.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layerfs::run::{
    self, Network, Output, RunError, RunOutcome, RunSpec, Runtime, Stream, resolve_user,
};

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "id", "ip", "mkdir", "touch", "hostname", "sleep", "grep", "pwd",
    "test", "kill", "true", "env",
];

/// A test's runtime (with a private state dir) and a scratch dir; `None` (after a message)
/// when the machine cannot run containers and this is not CI.
struct Fixture {
    tmp: tempfile::TempDir,
    rt: Runtime,
}

fn fixture() -> Option<Fixture> {
    let why = if layerfs::sys::geteuid() != 0 {
        Some("needs root".to_string())
    } else if !Path::new(BUSYBOX).is_file() {
        Some(format!("needs {BUSYBOX} (busybox-static)"))
    } else {
        Runtime::find(None).err().map(|e| e.to_string())
    };
    if let Some(why) = why {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("container runner tests cannot run ({why}), and CI=true: refusing to skip");
        }
        eprintln!("skipping: {why}");
        return None;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = Runtime::find(None)
        .expect("runtime")
        .with_state_dir(tmp.path().join("state"));
    Some(Fixture { tmp, rt })
}

impl Fixture {
    /// A busybox rootfs; `with_etc` adds /etc/passwd and /etc/group with `app` and `extra`.
    fn rootfs(&self, name: &str, with_etc: bool) -> PathBuf {
        let root = self.tmp.path().join(name);
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        if with_etc {
            fs::create_dir(root.join("etc")).unwrap();
            fs::write(
                root.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
            )
            .unwrap();
            fs::write(
                root.join("etc/group"),
                "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
            )
            .unwrap();
        }
        root
    }

    /// Run and collect the output lines; checks that nothing is left behind.
    fn run(&self, spec: &RunSpec) -> (Result<RunOutcome, RunError>, Lines) {
        let lines = Lines::default();
        let sink = lines.clone();
        let out = Output::Lines(Box::new(move |s, l| {
            sink.0
                .lock()
                .unwrap()
                .push((s, String::from_utf8_lossy(l).into_owned()))
        }));
        let res = run::run(&self.rt, spec, out);
        self.assert_clean();
        (res, lines)
    }

    /// Run a shell command as root with no network; the status and the lines.
    fn sh(&self, rootfs: &Path, script: &str) -> (i32, Lines) {
        let spec = RunSpec::new(rootfs, sh(script));
        let (res, lines) = self.run(&spec);
        (res.expect("run").status.code(), lines)
    }

    /// No container known to the runtime, no bundle, no mount under the state dir.
    fn assert_clean(&self) {
        let out = Command::new(self.rt.program())
            .arg("--root")
            .arg(self.rt.runtime_root())
            .args(["list", "-q"])
            .output()
            .expect("runc list");
        assert!(out.status.success(), "runc list: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "",
            "containers left"
        );
        let bundles = self.rt.state_dir().join("bundles");
        let left: Vec<_> = fs::read_dir(&bundles)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "bundles left: {left:?}");
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let state = self.rt.state_dir().to_string_lossy().into_owned();
        assert!(
            !mountinfo.contains(&state),
            "mounts left under {state}:\n{mountinfo}"
        );
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(Stream, String)>>>);

impl Lines {
    fn of(&self, stream: Stream) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l.clone())
            .collect()
    }
    fn out(&self) -> Vec<String> {
        self.of(Stream::Stdout)
    }
    fn err(&self) -> Vec<String> {
        self.of(Stream::Stderr)
    }
}

/// Every path of a tree with its type, mode, owner, size, mtime and link target.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let link = fs::read_link(&p).ok();
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                format!(
                    "{:o} {}:{} {} {}.{} {link:?}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    if m.is_dir() { 0 } else { m.size() },
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    let m = fs::metadata(root).unwrap();
    out.insert(
        PathBuf::new(),
        format!("{:o} {}.{}", m.mode(), m.mtime(), m.mtime_nsec()),
    );
    walk(root, root, &mut out);
    out
}

#[test]
fn output_lines_and_exit_status() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let (code, lines) = f.sh(
        &root,
        "echo out; echo err >&2; echo out2; echo err2 >&2; printf 'no newline'; exit 3",
    );
    assert_eq!(code, 3);
    assert_eq!(lines.out(), ["out", "out2", "no newline"]);
    assert_eq!(lines.err(), ["err", "err2"]);
    let (code, _) = f.sh(&root, "true");
    assert_eq!(code, 0);
}

#[test]
fn stderr_lines_arrive_live_and_last() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let spec = RunSpec::new(
        &root,
        sh("echo progress >&2; sleep 1; echo last >&2; exit 1"),
    );
    let start = Instant::now();
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let sink = arrivals.clone();
    let out = Output::Lines(Box::new(move |s, l| {
        let line = String::from_utf8_lossy(l).into_owned();
        sink.lock().unwrap().push((s, line, start.elapsed()));
    }));
    let res = run::run(&f.rt, &spec, out).unwrap();
    f.assert_clean();
    assert_eq!(res.status.code(), 1);
    let arrivals = arrivals.lock().unwrap();
    let lines: Vec<_> = arrivals.iter().map(|(s, l, _)| (*s, l.as_str())).collect();
    assert_eq!(
        lines,
        [(Stream::Stderr, "progress"), (Stream::Stderr, "last")]
    );
    // Held back at most briefly, not until the next line a second later.
    assert!(
        arrivals[0].2 < Duration::from_millis(800),
        "{:?}",
        arrivals[0].2
    );
}

#[test]
fn inherited_output() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let spec = RunSpec::new(
        &root,
        sh("echo 'inherited output reaches the test stdout'; exit 5"),
    );
    let res = run::run(&f.rt, &spec, Output::Inherit).unwrap();
    assert_eq!(res.status.code(), 5);
    f.assert_clean();
}

#[test]
fn env_cwd_and_hostname() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let mut spec = RunSpec::new(
        &root,
        sh("echo $FOO; pwd; echo $PATH; echo $HOME; echo $HOSTNAME; hostname; cat /etc/hostname"),
    );
    spec.env = vec!["FOO=bar baz".into()];
    spec.cwd = "/work/dir".into();
    spec.hostname = "builder-1".into();
    let (res, lines) = f.run(&spec);
    let res = res.unwrap();
    assert_eq!(res.status.code(), 0);
    assert!(res.created_cwd);
    assert_eq!(
        lines.out(),
        [
            "bar baz",
            "/work/dir",
            run::DEFAULT_PATH,
            "/root",
            "builder-1",
            "builder-1",
            "builder-1"
        ]
    );
    // WORKDIR semantics: the created directory stays.
    assert!(root.join("work/dir").is_dir());

    // A cwd created for this run only goes away again, and an existing one is no news.
    spec.cwd = "/tmp/only-now".into();
    spec.create_cwd = false;
    spec.env = vec!["PATH=/bin".into(), "HOME=/h".into()];
    spec.args = sh("pwd; echo $PATH $HOME");
    let (res, lines) = f.run(&spec);
    assert!(!res.unwrap().created_cwd);
    assert_eq!(lines.out(), ["/tmp/only-now", "/bin /h"]);
    assert!(!root.join("tmp").exists());
    spec.cwd = "/work".into();
    spec.create_cwd = true;
    assert!(!f.run(&spec).0.unwrap().created_cwd);
}

#[test]
fn user_ids_and_groups() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let user = resolve_user(&root, "app").unwrap();
    assert_eq!(
        (user.uid, user.gid, user.additional_gids.clone()),
        (1000, 1000, vec![2000])
    );
    let mut spec = RunSpec::new(&root, sh("id -u; id -g; id -G; echo $HOME"));
    spec.user = user;
    let (res, lines) = f.run(&spec);
    assert_eq!(res.unwrap().status.code(), 0, "{:?}", lines.err());
    assert_eq!(lines.out(), ["1000", "1000", "1000 2000", "/home/app"]);
    // Docker's rules: an unknown name fails, an unknown uid runs with gid 0.
    assert!(resolve_user(&root, "nobody").is_err());
    spec.user = resolve_user(&root, "4242").unwrap();
    spec.args = sh("id -u; id -g");
    assert_eq!(f.run(&spec).1.out(), ["4242", "0"]);
}

#[test]
fn capabilities_are_dockers_default() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let (code, lines) = f.sh(
        &root,
        "grep -E '^Cap(Eff|Prm|Bnd|Inh|Amb)' /proc/self/status",
    );
    assert_eq!(code, 0);
    assert_eq!(
        lines.out(),
        [
            "CapInh:\t0000000000000000",
            "CapPrm:\t00000000a80425fb",
            "CapEff:\t00000000a80425fb",
            "CapBnd:\t00000000a80425fb",
            "CapAmb:\t0000000000000000"
        ]
    );
    // No device of the host but the defaults: the device cgroup refuses the rest even to a
    // root with CAP_MKNOD.
    let (code, lines) = f.sh(
        &root,
        "busybox mknod /tmp-sda b 8 0 && cat /tmp-sda >/dev/null; echo $?; echo x >/dev/null && echo null-ok",
    );
    assert_eq!(code, 0, "{:?}", lines.err());
    assert_eq!(lines.out(), ["1", "null-ok"]);
}

#[test]
fn network_none_has_only_loopback_up() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let (code, lines) = f.sh(
        &root,
        "ls /sys/class/net; cat /sys/class/net/lo/flags; ip -o link | grep -c LOOPBACK,UP",
    );
    assert_eq!(code, 0, "{:?}", lines.err());
    // flags 0x9: IFF_UP | IFF_LOOPBACK (lo's operstate reads "unknown" even when up).
    assert_eq!(lines.out(), ["lo", "0x9", "1"]);
    let (_, lines) = f.sh(&root, "cat /etc/resolv.conf");
    assert!(lines.out().iter().all(|l| !l.contains("nameserver")));
}

#[test]
fn network_host_sees_the_host() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let mut spec = RunSpec::new(&root, sh("ls /sys/class/net; cat /etc/resolv.conf"));
    spec.network = Network::Host;
    let (res, lines) = f.run(&spec);
    assert_eq!(res.unwrap().status.code(), 0, "{:?}", lines.err());
    let mut host: Vec<String> = fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    host.sort();
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut expected = host.clone();
    expected.extend(host_resolv.lines().map(String::from));
    assert_eq!(lines.out(), expected);
    assert!(
        host.len() > 1,
        "the host has only {host:?}: this test shows nothing"
    );
}

#[test]
fn only_generated_files_of_the_host_and_read_only() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let (code, lines) = f.sh(
        &root,
        "grep -q localhost /etc/hosts && echo hosts-ok; \
         for p in /etc/hosts /etc/resolv.conf /etc/hostname; do \
           (echo x >> $p) 2>/dev/null && echo writable $p; done; \
         test -e /work || echo no-work; test -e /usr || echo no-usr; ls /; \
         echo y > /sys/x 2>/dev/null || echo sys-ro; \
         (echo 1 > /proc/sys/kernel/domainname) 2>/dev/null || echo proc-sys-ro",
    );
    assert_eq!(code, 0, "{:?}", lines.err());
    assert_eq!(
        lines.out(),
        [
            "hosts-ok",
            "no-work",
            "no-usr",
            "bin",
            "dev",
            "etc",
            "proc",
            "sys",
            "sys-ro",
            "proc-sys-ro"
        ]
    );
}

#[test]
fn no_stubs_left_in_a_bare_rootfs() {
    let Some(f) = fixture() else { return };
    // No /etc, /proc, /dev or /sys: all mount targets are stubs for the run only.
    let root = f.rootfs("r", false);
    let before = tree(&root);
    let (code, lines) = f.sh(&root, "ls / /etc");
    assert_eq!(code, 0, "{:?}", lines.err());
    assert_eq!(tree(&root), before);

    // Files the command creates are exactly what is left, also inside a stub directory.
    let (code, lines) = f.sh(
        &root,
        "mkdir /new && echo hi > /new/f && touch /etc/created",
    );
    assert_eq!(code, 0, "{:?}", lines.err());
    let after = tree(&root);
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(
        added,
        [
            Path::new("etc"),
            Path::new("etc/created"),
            Path::new("new"),
            Path::new("new/f")
        ]
    );
    assert_eq!(fs::read_to_string(root.join("new/f")).unwrap(), "hi\n");
    let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(gone.is_empty(), "{gone:?}");
}

#[test]
fn no_stubs_left_with_an_existing_etc() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let before = tree(&root);
    let (code, _) = f.sh(&root, "true");
    assert_eq!(code, 0);
    assert_eq!(tree(&root), before);
}

#[test]
fn runtime_failure_is_a_clear_error() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    let spec = RunSpec::new(&root, vec!["/nonexistent-command".into()]);
    let before = tree(&root);
    let (res, lines) = f.run(&spec);
    let e = res.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RunError::Runtime(_)), "{e:?}");
    assert!(msg.contains("/nonexistent-command"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    // The runtime's message is the error, not also a line of the command's output.
    assert_eq!(lines.err(), Vec::<String>::new());
    assert_eq!(tree(&root), before);
}

#[test]
fn killed_command_reports_the_signal_and_is_cleaned_up() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    // SIGKILL from the host: the command is the PID 1 of its namespace, which ignores a
    // signal sent from inside (`kill -9 $$` would do nothing).
    let spec = RunSpec::new(&root, sh("sleep 30 & echo started; wait"));
    let exe = fs::canonicalize(root.join("bin/busybox")).unwrap();
    let lines = Lines::default();
    let sink = lines.clone();
    let out = Output::Lines(Box::new(move |s, l| {
        for pid in processes_running(&exe) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        sink.0
            .lock()
            .unwrap()
            .push((s, String::from_utf8_lossy(l).into_owned()));
    }));
    let status = run::run(&f.rt, &spec, out).unwrap().status;
    f.assert_clean();
    assert_eq!((status.code(), status.signal()), (137, Some(9)));
    assert_eq!(lines.out(), ["started"]);
    assert_no_process_in(&root);
}

#[test]
fn panicking_callback_still_cleans_up() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", false);
    let before = tree(&root);
    let spec = RunSpec::new(&root, sh("echo first; sleep 60"));
    let start = Instant::now();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run::run(
            &f.rt,
            &spec,
            Output::Lines(Box::new(|_, _| panic!("callback gives up"))),
        )
    }));
    assert!(res.is_err(), "the panic must reach the caller");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    f.assert_clean();
    assert_no_process_in(&root);
    assert_eq!(tree(&root), before);
}

#[test]
fn stale_leftovers_of_a_dead_process_are_swept() {
    let Some(f) = fixture() else { return };
    let root = f.rootfs("r", true);
    // A bundle of a process that is gone (a child that has exited).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = f.rt.state_dir().join(format!("bundles/layerfs-{dead}-0"));
    fs::create_dir_all(&stale).unwrap();
    fs::write(stale.join("config.json"), "{}").unwrap();
    let (code, _) = f.sh(&root, "true");
    assert_eq!(code, 0);
    assert!(!stale.exists());
}

#[test]
fn runs_on_a_layerfs_mount() {
    let Some(f) = fixture() else { return };
    if !common::can_mount() {
        return;
    }
    let lower = f.rootfs("lower", true);
    let upper = f.tmp.path().join("upper");
    let work = f.tmp.path().join("work");
    let mnt = f.tmp.path().join("mnt");
    let mut m = common::layerfs_stack(&[&lower], Some((&upper, &work)), &mnt, &["allow_other"]);
    let mut spec = RunSpec::new(&m.path, sh("echo hi > /f; mkdir -p /home/app/x; id -u"));
    spec.cwd = "/home".into();
    let (res, lines) = f.run(&spec);
    assert_eq!(res.unwrap().status.code(), 0, "{:?}", lines.err());
    // A non-root user through FUSE (allow_other).
    spec.user = resolve_user(&m.path, "app").unwrap();
    spec.args = sh("id -u; ls /home/app");
    spec.cwd = "/".into();
    let (res, lines) = f.run(&spec);
    assert_eq!(res.unwrap().status.code(), 0, "{:?}", lines.err());
    assert_eq!(lines.out(), ["1000", "x"]);
    m.unmount();
    // The upper holds what the commands wrote and the kept WORKDIR, and no stub. /etc, where
    // the stubs for /etc/hosts and friends went, stays copied up, empty, with its times put
    // back: a directory the diff sees unchanged from the lower.
    let mut names: Vec<_> = tree(&upper)
        .into_keys()
        .filter(|p| p != Path::new(""))
        .collect();
    names.sort();
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&upper.join("etc")), mtime(&lower.join("etc")));
    assert_eq!(
        names,
        [
            Path::new("etc"),
            Path::new("f"),
            Path::new("home"),
            Path::new("home/app"),
            Path::new("home/app/x")
        ]
    );
}

/// Pids of the processes whose executable is the file `exe` (by device and inode: the path a
/// container's `/proc/PID/exe` shows is the one inside the container).
fn processes_running(exe: &Path) -> Vec<u32> {
    let want = fs::metadata(exe).unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            fs::metadata(format!("/proc/{pid}/exe"))
                .is_ok_and(|m| (m.dev(), m.ino()) == (want.dev(), want.ino()))
        })
        .collect()
}

/// No process runs the rootfs's busybox any more.
fn assert_no_process_in(root: &Path) {
    let exe = fs::canonicalize(root.join("bin/busybox")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = processes_running(&exe);
        if running.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes left: {running:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn busybox_is_static() {
    // The rootfs holds nothing but busybox: a dynamic one would fail every test above.
    let Some(_f) = fixture() else { return };
    let m = fs::metadata(BUSYBOX).unwrap();
    assert!(m.permissions().mode() & 0o111 != 0);
    let out = Command::new("ldd").arg(BUSYBOX).output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("not a dynamic"),
            "{BUSYBOX} is dynamic: {text}"
        );
    }
}
