//! The container runner that `layerfs build` (one `RUN` step) and `layerfs run` share: run a
//! command in a root filesystem that is already mounted (in real use a layerfs mount of an
//! image's layers with a fresh writable upper) through an OCI runtime, runc or crun.
//!
//! One [`run`] call:
//!
//! 1. creates every mount target the runtime needs on the rootfs that is missing (and the cwd),
//!    recording what it created (`stubs`);
//! 2. makes a private bundle `<state>/bundles/<id>` (mode 0700) holding `config.json` (built
//!    with `oci-spec`, see `spec` for what the container may see and do) and the generated
//!    /etc/hosts, /etc/resolv.conf and /etc/hostname;
//! 3. runs `runtime run --bundle B ID` in the foreground, streaming the command's output;
//! 4. cleans up on every path, including an unwinding panic in the caller's output callback:
//!    `runtime delete --force` (no container, process or cgroup is left), the bundle is
//!    removed, and so is every stub that is still empty, so the rootfs holds exactly what the
//!    command wrote. Mounts live only in the container's mount namespace: none is left on
//!    the host.
//!
//! The status is the command's: a command that exits 3 gives `Ok` with code 3; only a failure
//! of the runtime itself (bad spec, command not found, ...) is an `Err`, with the runtime's
//! one-line reason. Like `docker run`, a command killed by signal N reads as code 128+N.
//!
//! What the caller owns: SIGINT/SIGTERM handling (the runtime is in our process group, so a
//! Ctrl-C reaches it and it forwards the signal to the command; a caller that dies on it
//! skips the clean-up, and the next run sweeps what it left, see `runtime`).

mod runtime;
mod spec;
mod stubs;
mod user;

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use runtime::{Runtime, RuntimeKind};
pub use spec::{DEFAULT_CAPS, DEFAULT_PATH};
pub use user::{
    GroupEntry, PasswdEntry, User, parse_group, parse_passwd, resolve_in, resolve_user,
    resolve_user_at,
};

use crate::error::show;
use crate::{fsutil, sys};

/// Name of the runtime's JSON log in the bundle.
const LOG_NAME: &str = "runtime.log";

/// How long the latest stderr line is held back (see [`run`]) when no other line follows.
const HOLD: Duration = Duration::from_millis(50);

/// Longest line handed to the output callback; a longer one arrives in pieces of this size
/// (a command printing megabytes without a newline must not grow our memory without bound).
pub const MAX_LINE: usize = 64 * 1024;

/// Why a run could not happen or the runtime failed. The command's own failure is not an
/// error: it is the [`ExitStatus`] of an `Ok`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable runtime binary.
    #[error("{0}")]
    NoRuntime(String),
    /// The runtime failed (its one-line reason, from its log).
    #[error("container runtime failed: {0}")]
    Runtime(String),
    /// A `USER` that cannot be resolved in the image.
    #[error("user \"{spec}\": {reason}")]
    User { spec: String, reason: String },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A spec layerfs refuses to run.
    #[error("{0}")]
    Invalid(String),
}

impl RunError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        RunError::Io {
            context: context.into(),
            source,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        RunError::Invalid(message.into())
    }
}

impl From<RunError> for crate::error::Error {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Io { context, source } => crate::error::Error::io(context, source),
            other => crate::error::Error::invalid(other.to_string()),
        }
    }
}

/// The container's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// Its own network namespace with only the loopback interface, up (`--network none`).
    None,
    /// The host's network namespace.
    Host,
}

/// What to run and how.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// The container's root, already mounted or populated.
    pub rootfs: PathBuf,
    /// argv; the builder has already applied `/bin/sh -c` or `SHELL`.
    pub args: Vec<String>,
    /// `K=V` entries; `PATH`, `HOSTNAME` and `HOME` are added when absent.
    pub env: Vec<String>,
    /// Absolute working directory inside the rootfs; created when missing.
    pub cwd: String,
    /// Keep a cwd this run had to create (Docker's `WORKDIR`/`-w` semantics: the directory
    /// becomes part of the container). When false, a created cwd is removed after the run if
    /// it is still empty, like the runtime's stubs.
    pub create_cwd: bool,
    /// Resolved ids (see [`resolve_user`]).
    pub user: User,
    pub network: Network,
    pub hostname: String,
    /// A terminal for the command (`layerfs run -t`): not supported yet, refused.
    pub tty: bool,
}

impl RunSpec {
    /// A spec with the defaults of a build step: root, cwd `/` (kept if created), no
    /// network, hostname `layerfs`, no extra environment.
    pub fn new(rootfs: impl Into<PathBuf>, args: Vec<String>) -> RunSpec {
        RunSpec {
            rootfs: rootfs.into(),
            args,
            env: Vec::new(),
            cwd: "/".into(),
            create_cwd: true,
            user: User::root(),
            network: Network::None,
            hostname: "layerfs".into(),
            tty: false,
        }
    }

    fn validate(&self) -> Result<(), RunError> {
        if self.tty {
            return Err(RunError::invalid(
                "a terminal for the container (-t) is not supported yet",
            ));
        }
        if self.args.is_empty() || self.args[0].is_empty() {
            return Err(RunError::invalid("no command to run"));
        }
        let nul = |s: &str| s.contains('\0');
        if self.args.iter().any(|a| nul(a)) {
            return Err(RunError::invalid("a command argument contains a NUL byte"));
        }
        for e in &self.env {
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() && !nul(e) => {}
                _ => {
                    return Err(RunError::invalid(format!(
                        "environment entry {e:?} is not KEY=VALUE"
                    )));
                }
            }
        }
        if !self.cwd.starts_with('/') || nul(&self.cwd) {
            return Err(RunError::invalid(format!(
                "working directory {:?} is not an absolute path",
                self.cwd
            )));
        }
        let h = &self.hostname;
        if h.is_empty()
            || h.len() > 64
            || h.starts_with(['-', '.'])
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(RunError::invalid(format!(
                "hostname {h:?} is not a valid host name (letters, digits, '-', '.'; at most 64)"
            )));
        }
        Ok(())
    }
}

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The callback of [`Output::Lines`].
pub type LineSink = Box<dyn FnMut(Stream, &[u8]) + Send>;

/// Where the command's output goes.
pub enum Output {
    /// To this process's stdout and stderr, as they are (a runtime failure message shows
    /// there too, besides being the `Err`).
    Inherit,
    /// Line by line (without the newline; see [`MAX_LINE`]) to a callback, in order within
    /// each stream, as the command writes them (a stderr line may wait up to 50 ms when
    /// nothing follows it). Runs on the calling thread.
    Lines(LineSink),
}

/// The exit status of the command, as the runtime reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus(i32);

impl ExitStatus {
    /// The exit code; 128+N for a command killed by signal N.
    pub fn code(self) -> i32 {
        self.0
    }

    pub fn success(self) -> bool {
        self.0 == 0
    }

    /// The signal that killed the command, read from a code above 128 as runc and shells
    /// report it (a command that itself exits with 128+N reads the same).
    pub fn signal(self) -> Option<i32> {
        (129..=128 + 64).contains(&self.0).then(|| self.0 - 128)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.signal() {
            Some(sig) => write!(f, "exit code {} (signal {sig})", self.0),
            None => write!(f, "exit code {}", self.0),
        }
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// The cwd (or some of its parents) did not exist and was created, and is kept
    /// ([`RunSpec::create_cwd`]).
    pub created_cwd: bool,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Run `spec` with `rt`, sending the output to `output`; see the module doc.
pub fn run(rt: &Runtime, spec: &RunSpec, output: Output) -> Result<RunOutcome, RunError> {
    spec.validate()?;
    let rootfs = std::fs::canonicalize(&spec.rootfs)
        .map_err(|e| RunError::io(format!("rootfs {}", show(&spec.rootfs)), e))?;
    let root = sys::open_dir_path(&rootfs)
        .map_err(|e| RunError::io(format!("open rootfs {}", show(&rootfs)), e))?;
    rt.prepare_dirs()?;
    rt.sweep_stale();
    let bundles_path = rt.bundles_dir();
    let bundles = sys::open_dir_path(&bundles_path)
        .map_err(|e| RunError::io(format!("open {}", bundles_path.display()), e))?;
    let mut c = Container {
        rt,
        id: String::new(),
        bundles,
        root,
        stubs: stubs::Created::default(),
        temp_cwd: stubs::Created::default(),
        child: None,
        done: false,
    };
    // A fresh id: an existing bundle of that name (left by a reused pid) is never taken over.
    loop {
        let id = format!(
            "layerfs-{}-{}",
            sys::getpid(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        match sys::mkdir_at(c.bundles.as_fd(), id.as_bytes(), 0o700) {
            Ok(()) => {
                c.id = id;
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => {
                return Err(RunError::io(
                    format!("create bundle {}", bundles_path.join(&id).display()),
                    e,
                ));
            }
        }
    }
    let bundle_path = bundles_path.join(&c.id);
    let bundle = sys::open_at(
        c.bundles.as_fd(),
        c.id.as_bytes(),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| RunError::io(format!("open {}", bundle_path.display()), e))?;

    for (target, is_dir) in spec::MOUNT_TARGETS {
        let kind = if is_dir {
            stubs::Kind::Dir
        } else {
            stubs::Kind::File
        };
        stubs::ensure(c.root.as_fd(), target, kind, &mut c.stubs)
            .map_err(|e| RunError::io(format!("prepare mount target {target} in the rootfs"), e))?;
    }
    // Recorded as temporary until it is known to have worked: a half-made cwd goes away.
    stubs::ensure(c.root.as_fd(), &spec.cwd, stubs::Kind::Dir, &mut c.temp_cwd).map_err(|e| {
        RunError::io(
            format!("create working directory {} in the rootfs", spec.cwd),
            e,
        )
    })?;
    let created_cwd = spec.create_cwd && !c.temp_cwd.is_empty();
    if spec.create_cwd {
        c.temp_cwd = stubs::Created::default();
    }

    write_bundle(&bundle, &bundle_path, spec, &rootfs, &c.id)?;

    let mut cmd = rt.run_command(&bundle_path, &c.id, &bundle_path.join(LOG_NAME));
    let lines = match output {
        Output::Inherit => {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
            None
        }
        Output::Lines(f) => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            Some(f)
        }
    };
    let child = c.child.insert(
        cmd.spawn()
            .map_err(|e| RunError::io(format!("start {}", rt.program().display()), e))?,
    );
    // The latest stderr line is held back until the next line or for HOLD: the runtime prints
    // its own failure message there as it exits (and in its log, in either order), and that
    // message is the `Err`, not a line of the command's output.
    let mut pending: Option<Vec<u8>> = None;
    let mut callback = None;
    if let Some(mut cb) = lines {
        let (tx, rx) = mpsc::sync_channel::<(Stream, Vec<u8>)>(256);
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || read_lines(out, Stream::Stdout, tx));
        }
        if let Some(err) = child.stderr.take() {
            let tx = tx.clone();
            std::thread::spawn(move || read_lines(err, Stream::Stderr, tx));
        }
        drop(tx);
        let flush = |cb: &mut LineSink, pending: &mut Option<Vec<u8>>| {
            if let Some(line) = pending.take() {
                if !is_runtime_error_line(bundle.as_fd(), &line) {
                    cb(Stream::Stderr, &line);
                }
            }
        };
        // Ends when both pipes are closed: the runtime and every process of the container
        // (the PID namespace dies with its first process) have exited.
        loop {
            match rx.recv_timeout(HOLD) {
                Ok((stream, line)) => {
                    flush(&mut cb, &mut pending);
                    match stream {
                        Stream::Stderr => pending = Some(line),
                        Stream::Stdout => cb(stream, &line),
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => flush(&mut cb, &mut pending),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        callback = Some(cb);
    }
    let status = child
        .wait()
        .map_err(|e| RunError::io(format!("wait for {}", rt.program().display()), e))?;
    let log = runtime::read_log(bundle.as_fd())
        .map_err(|e| RunError::io(format!("read {}", bundle_path.join(LOG_NAME).display()), e))?;
    if let (Some(cb), Some(line)) = (callback.as_mut(), pending.take()) {
        let failure = runtime::last_error(&log);
        if failure.is_none_or(|msg| msg != runtime::one_line(&String::from_utf8_lossy(&line))) {
            cb(Stream::Stderr, &line);
        }
    }
    let result = match (runtime::last_error(&log), status.code()) {
        (Some(msg), _) => Err(RunError::Runtime(msg)),
        (None, Some(code)) => Ok(ExitStatus(code)),
        (None, None) => Err(RunError::Runtime(format!(
            "{} ended without an exit code ({status})",
            rt.program().display()
        ))),
    };
    drop(bundle);
    c.done = true;
    let cleaned = c.cleanup();
    let status = result?;
    cleaned?;
    Ok(RunOutcome {
        status,
        created_cwd,
    })
}

/// Write config.json and the generated /etc files into the bundle.
fn write_bundle(
    bundle: &OwnedFd,
    bundle_path: &Path,
    spec: &RunSpec,
    rootfs: &Path,
    id: &str,
) -> Result<(), RunError> {
    let host_resolv = match spec.network {
        Network::Host => match std::fs::read("/etc/resolv.conf") {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(RunError::io("read the host's /etc/resolv.conf", e)),
        },
        Network::None => Vec::new(),
    };
    let files = [
        ("hosts", spec::hosts_file(&spec.hostname).into_bytes()),
        ("hostname", spec::hostname_file(&spec.hostname).into_bytes()),
        (
            "resolv.conf",
            spec::resolv_conf_file(spec.network, &host_resolv),
        ),
    ];
    for (name, data) in &files {
        write_new(bundle.as_fd(), name, data, 0o644)
            .map_err(|e| RunError::io(format!("write {}", bundle_path.join(name).display()), e))?;
    }
    let (hosts, hostname, resolv_conf) = (
        bundle_path.join("hosts"),
        bundle_path.join("hostname"),
        bundle_path.join("resolv.conf"),
    );
    let paths = spec::BundleFiles {
        hosts: &hosts,
        resolv_conf: &resolv_conf,
        hostname: &hostname,
    };
    let oci = spec::build(spec, rootfs, id, &paths, spec::Limits::current())?;
    let json = serde_json::to_vec_pretty(&oci)
        .map_err(|e| RunError::invalid(format!("serialize the runtime spec: {e}")))?;
    write_new(bundle.as_fd(), "config.json", &json, 0o600).map_err(|e| {
        RunError::io(
            format!("write {}", bundle_path.join("config.json").display()),
            e,
        )
    })
}

fn write_new(dir: BorrowedFd<'_>, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
    let fd = sys::open_at(
        dir,
        name.as_bytes(),
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        mode,
    )?;
    std::fs::File::from(fd).write_all(data)
}

/// Whether a stderr line is the runtime's own failure message: the runtime writes it to its
/// log (read here) before it prints it on stderr, which is the container's stderr too. The
/// caller gets it once, as the `Err`, not also as a line of the command's output.
fn is_runtime_error_line(bundle: BorrowedFd<'_>, line: &[u8]) -> bool {
    match sys::stat_at_opt(bundle, LOG_NAME.as_bytes()) {
        Ok(Some(st)) if st.size > 0 => {}
        _ => return false,
    }
    let Ok(log) = runtime::read_log(bundle) else {
        return false;
    };
    runtime::last_error(&log)
        .is_some_and(|msg| msg == runtime::one_line(&String::from_utf8_lossy(line)))
}

/// Read `r` to its end, sending each line (without its newline, split at [`MAX_LINE`]).
/// Stops early when the receiver is gone.
fn read_lines(mut r: impl Read, stream: Stream, tx: mpsc::SyncSender<(Stream, Vec<u8>)>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut line = Vec::new();
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                if tx.send((stream, std::mem::take(&mut line))).is_err() {
                    return;
                }
                continue;
            }
            line.push(b);
            if line.len() >= MAX_LINE && tx.send((stream, std::mem::take(&mut line))).is_err() {
                return;
            }
        }
    }
    if !line.is_empty() {
        let _ = tx.send((stream, line));
    }
}

/// One container's resources, released by [`Container::cleanup`] on every path: run at the
/// end of [`run`], or by `Drop` on an early return or an unwinding panic.
struct Container<'a> {
    rt: &'a Runtime,
    /// Empty until the bundle directory exists.
    id: String,
    bundles: OwnedFd,
    root: OwnedFd,
    stubs: stubs::Created,
    temp_cwd: stubs::Created,
    child: Option<Child>,
    done: bool,
}

impl Container<'_> {
    /// Stop and delete the container, remove the bundle and the stubs. Every step runs even
    /// when an earlier one failed; the first failure is returned.
    fn cleanup(&mut self) -> Result<(), RunError> {
        let mut first: Option<RunError> = None;
        let mut keep = |r: Result<(), RunError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if self.id.is_empty() {
            return Ok(());
        }
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // Still running: we are unwinding or bailing out mid-run. Killing the
                // container makes the runtime return; kill the runtime too if it does not.
                keep(self.rt.delete(&self.id));
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }
        keep(self.rt.delete(&self.id));
        keep(
            fsutil::remove_tree(self.bundles.as_fd(), self.id.as_bytes())
                .map(drop)
                .or_else(|e| {
                    if e.raw_os_error() == Some(libc::ENOENT) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| {
                    RunError::io(
                        format!(
                            "remove bundle {}",
                            self.rt.bundles_dir().join(&self.id).display()
                        ),
                        e,
                    )
                }),
        );
        // The cwd may lie under a stub (a cwd in /etc of an image without /etc): it goes first.
        for created in [&mut self.temp_cwd, &mut self.stubs] {
            keep(
                created
                    .remove_stubs(self.root.as_fd())
                    .map(drop)
                    .map_err(|e| RunError::io("remove mount stubs from the rootfs", e)),
            );
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            if let Err(e) = self.cleanup() {
                log::warn!("cleaning up container {}: {e}", self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_and_cap() {
        let mut data = b"a\n\nbc\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE + 3));
        let (tx, rx) = mpsc::sync_channel(16);
        read_lines(&data[..], Stream::Stdout, tx);
        let got: Vec<Vec<u8>> = rx.iter().map(|(_, l)| l).collect();
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], b"a");
        assert_eq!(got[1], b"");
        assert_eq!(got[2], b"bc");
        assert_eq!(got[3].len(), MAX_LINE);
        assert_eq!(got[4], b"xxx");
    }

    #[test]
    fn validation() {
        let ok = RunSpec::new("/r", vec!["true".into()]);
        assert!(ok.validate().is_ok());
        let bad = |f: &dyn Fn(&mut RunSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(!e.contains('\n'));
            e
        };
        assert!(bad(&|s| s.args.clear()).contains("no command"));
        assert!(bad(&|s| s.env.push("NOEQUALS".into())).contains("KEY=VALUE"));
        assert!(bad(&|s| s.env.push("=v".into())).contains("KEY=VALUE"));
        assert!(bad(&|s| s.cwd = "rel".into()).contains("absolute"));
        assert!(bad(&|s| s.hostname = "a b".into()).contains("hostname"));
        assert!(bad(&|s| s.hostname = "x".repeat(65)).contains("hostname"));
        assert!(bad(&|s| s.tty = true).contains("not supported"));
        assert!(bad(&|s| s.args.push("a\0b".into())).contains("NUL"));
    }

    #[test]
    fn exit_status_reads_signals() {
        assert_eq!(ExitStatus(3).signal(), None);
        assert_eq!(ExitStatus(137).signal(), Some(9));
        assert_eq!(ExitStatus(128).signal(), None);
        assert_eq!(ExitStatus(137).to_string(), "exit code 137 (signal 9)");
        assert!(ExitStatus(0).success());
    }
}
