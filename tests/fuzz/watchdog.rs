//! A watchdog for tests that drive a FUSE mount: every operation runs under [`Watchdog::op`];
//! if one takes longer than the limit, the watchdog records what was stalled, dumps the stacks
//! of the watched daemons (all threads with gdb when it is installed, plus the kernel stacks
//! from /proc), and aborts the watched FUSE connections so the stalled system calls return
//! (ENOTCONN) and the test can fail with the report instead of hanging. Requests a daemon took
//! over FUSE-over-io_uring survive the abort, so if the operation is still stalled two seconds
//! later the watched daemons are killed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Target {
    mnt: PathBuf,
    /// FUSE connection number (the mount's anonymous device minor).
    conn: Option<u64>,
    daemon: Option<u32>,
}

#[derive(Default)]
struct State {
    running: HashMap<u64, (Instant, String)>,
    next: u64,
    fired: Option<String>,
    targets: Vec<Target>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    limit: Duration,
}

/// See the module documentation.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stacks of a daemon: every thread's user stack (gdb, when installed) and kernel stack.
pub fn dump_stacks(pid: u32) -> String {
    let mut out = format!("==== daemon {pid} ====\n");
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for l in s
            .lines()
            .filter(|l| l.starts_with("State") || l.starts_with("Threads"))
        {
            out.push_str(l);
            out.push('\n');
        }
    }
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
            out.push_str(&format!(
                "-- task {tid} {} wchan={wchan}\n{stack}",
                comm.trim()
            ));
        }
    }
    match Command::new("timeout")
        .args(["120", "gdb", "-p", &pid.to_string(), "-batch", "-nx"])
        .args(["-ex", "set pagination off", "-ex", "thread apply all bt"])
        .output()
    {
        Ok(o) if o.status.success() => {
            out.push_str("---- gdb: thread apply all bt ----\n");
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        Ok(o) => out.push_str(&format!(
            "(gdb failed or is not installed: {})\n",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => out.push_str(&format!("(no gdb: {e})\n")),
    }
    out
}

/// Abort a FUSE connection: every pending and future request on it fails with ENOTCONN.
/// Uses the fusectl filesystem (mounted here first if the machine has not), else a forced
/// unmount, whose first step aborts the connection.
pub fn abort_connection(conn: Option<u64>, mnt: &Path) -> Result<&'static str, String> {
    let dir = Path::new("/sys/fs/fuse/connections");
    if let Some(c) = conn {
        if !dir.join(c.to_string()).exists() {
            let _ = Command::new("mount")
                .args(["-t", "fusectl", "fusectl"])
                .arg(dir)
                .output();
        }
        if std::fs::write(dir.join(format!("{c}/abort")), "1").is_ok() {
            return Ok("fusectl abort");
        }
    }
    // `-c`: no canonicalizing stat of the (stalled) mountpoint.
    match Command::new("timeout")
        .args(["20", "umount", "-f", "-c"])
        .arg(mnt)
        .output()
    {
        Ok(_) => Ok("umount -f"),
        Err(e) => Err(format!("no way to abort: {e}")),
    }
}

/// The FUSE connection number of the filesystem mounted at `mnt`.
pub fn connection_of(mnt: &Path) -> Option<u64> {
    let dev = std::fs::metadata(mnt).ok()?.dev();
    (layerfs::sys::dev_major(dev) == 0).then(|| layerfs::sys::dev_minor(dev) as u64)
}

fn fire(shared: &Shared, what: String, elapsed: Duration) {
    let targets: Vec<(PathBuf, Option<u64>, Option<u32>)> = shared
        .lock()
        .targets
        .iter()
        .map(|t| (t.mnt.clone(), t.conn, t.daemon))
        .collect();
    let mut report = format!(
        "operation stalled for {:.0} s (limit {} s): {what}\n",
        elapsed.as_secs_f64(),
        shared.limit.as_secs()
    );
    let mut dumps = String::new();
    for (_, _, daemon) in &targets {
        if let Some(pid) = daemon {
            dumps.push_str(&dump_stacks(*pid));
        }
    }
    let file = std::env::temp_dir().join(format!(
        "layerfs-stall-{}-{}.txt",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    ));
    let _ = std::fs::write(&file, &dumps);
    report.push_str(&format!("daemon stacks saved to {}\n", file.display()));
    for line in dumps.lines().take(400) {
        report.push_str(line);
        report.push('\n');
    }
    // Record the report before aborting: the stalled operation returns as soon as the
    // connection is aborted, and its caller then asks for the report.
    report.push_str("aborting the FUSE connections of the watched mounts\n");
    shared.lock().fired.get_or_insert(report.clone());
    for (mnt, conn, _) in &targets {
        let r = abort_connection(*conn, mnt);
        let line = format!(
            "aborted FUSE connection {conn:?} of {}: {r:?}\n",
            mnt.display()
        );
        report.push_str(&line);
        if let Some(f) = shared.lock().fired.as_mut() {
            f.push_str(&line);
        }
    }
    // Over FUSE-over-io_uring, a request the daemon already took from its ring is not ended by
    // the abort; it ends when the daemon exits. Give the abort a moment, then kill.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !shared.lock().running.is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !shared.lock().running.is_empty() {
        for (_, _, daemon) in &targets {
            if let Some(pid) = daemon {
                let r = layerfs::sys::kill(*pid as i32, libc::SIGKILL);
                let line = format!("still stalled after the abort: killed daemon {pid}: {r:?}\n");
                report.push_str(&line);
                if let Some(f) = shared.lock().fired.as_mut() {
                    f.push_str(&line);
                }
            }
        }
    }
    eprintln!("{report}");
}

impl Watchdog {
    /// Start watching; operations may take up to `limit`.
    pub fn start(limit: Duration) -> Watchdog {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            limit,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                while !s.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let stalled = {
                        let st = s.lock();
                        if st.fired.is_some() {
                            None
                        } else {
                            st.running
                                .values()
                                .find(|(t, _)| t.elapsed() > s.limit)
                                .map(|(t, w)| (w.clone(), t.elapsed()))
                        }
                    };
                    if let Some((what, elapsed)) = stalled {
                        fire(&s, what, elapsed);
                    }
                }
            })
            .expect("start watchdog thread");
        Watchdog {
            shared,
            thread: Some(thread),
        }
    }

    /// Watch a mount (its connection is looked up now, while it answers).
    pub fn watch_mount(&self, mnt: &Path, daemon: Option<u32>) {
        let conn = connection_of(mnt);
        self.shared.lock().targets.push(Target {
            mnt: mnt.to_path_buf(),
            conn,
            daemon,
        });
    }

    /// Stop watching every mount (they are about to go away).
    pub fn clear_mounts(&self) {
        self.shared.lock().targets.clear();
    }

    /// Run `f` as one watched operation described by `what`.
    pub fn op<T>(&self, what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
        let token = {
            let mut st = self.shared.lock();
            st.next += 1;
            let t = st.next;
            st.running.insert(t, (Instant::now(), what()));
            t
        };
        let out = f();
        self.shared.lock().running.remove(&token);
        out
    }

    /// The stall report, if the watchdog fired.
    pub fn fired(&self) -> Option<String> {
        self.shared.lock().fired.clone()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Facts about a running daemon.
pub mod procinfo {
    /// `(VmRSS, VmHWM)` in KiB.
    pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Number of open file descriptors.
    pub fn fd_count(pid: u32) -> Option<usize> {
        Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
    }

    /// Whether the process exists and is not a zombie.
    pub fn alive(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    }
}
