//! The OCI runtime binary (runc or crun) and how layerfs calls it.
//!
//! layerfs keeps its containers apart from anybody else's: the runtime's state lives under our
//! own state directory (`--root <state>/runc`), bundles under `<state>/bundles/<id>`, and every
//! container id is `layerfs-<pid>-<n>`, so a container is traced back to the process that ran
//! it. A process that died without cleaning up (SIGKILL) leaves its containers and bundles
//! behind; the next run sweeps those whose process is gone.
//!
//! The runtime logs to a JSON file in the bundle (`--log`, `--log-format json`): its last
//! error-level entry is the one-line reason a run failed, told apart from the command's own
//! exit status.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::RunError;
use crate::{fsutil, sys};

/// Which runtime a binary is: they take the same commands, and differ in details noted where
/// they matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    Runc,
    Crun,
}

/// An OCI runtime binary and the state directory layerfs gives it.
#[derive(Clone, Debug)]
pub struct Runtime {
    program: PathBuf,
    kind: RuntimeKind,
    state_dir: PathBuf,
}

/// Where binaries are looked for after `$PATH` (root's sbin directories are often missing from
/// a user's or a CI job's PATH).
const FALLBACK_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn default_state_dir() -> PathBuf {
    if sys::geteuid() == 0 {
        return PathBuf::from("/run/layerfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if Path::new(&d).is_absolute() => Path::new(&d).join("layerfs"),
        _ => PathBuf::from(format!("/tmp/layerfs-{}", sys::geteuid())),
    }
}

impl Runtime {
    /// The runtime to use: `explicit` (a path, or a bare name looked up like a command), else
    /// `runc`, else `crun`, on `$PATH` and the usual sbin directories.
    pub fn find(explicit: Option<&Path>) -> Result<Runtime, RunError> {
        let program = match explicit {
            Some(p) if p.as_os_str().as_bytes().contains(&b'/') => {
                if !is_executable(p) {
                    return Err(RunError::NoRuntime(format!(
                        "OCI runtime {} is not an executable file",
                        p.display()
                    )));
                }
                p.to_path_buf()
            }
            Some(name) => search_path(&name.to_string_lossy()).ok_or_else(|| {
                RunError::NoRuntime(format!(
                    "OCI runtime {} not found on PATH",
                    name.display()
                ))
            })?,
            None => search_path("runc")
                .or_else(|| search_path("crun"))
                .ok_or_else(|| {
                    RunError::NoRuntime(
                        "no OCI runtime found: install runc (or crun), or name one with --runtime PATH"
                            .into(),
                    )
                })?,
        };
        let kind = match program.file_name() {
            Some(n) if n.as_bytes().starts_with(b"crun") => RuntimeKind::Crun,
            _ => RuntimeKind::Runc,
        };
        Ok(Runtime {
            program,
            kind,
            state_dir: default_state_dir(),
        })
    }

    /// Keep runtime state and bundles under `dir` instead of `/run/layerfs`.
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Runtime {
        self.state_dir = dir.into();
        self
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    pub fn kind(&self) -> RuntimeKind {
        self.kind
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The runtime's own state directory (its `--root`): `runc --root THIS list` shows what
    /// layerfs has running.
    pub fn runtime_root(&self) -> PathBuf {
        self.state_dir.join(match self.kind {
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
        })
    }

    /// Where bundles are made.
    pub(super) fn bundles_dir(&self) -> PathBuf {
        self.state_dir.join("bundles")
    }

    /// Create the state directories (mode 0700: bundles hold the container's config).
    pub(super) fn prepare_dirs(&self) -> Result<(), RunError> {
        for d in [self.runtime_root(), self.bundles_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| RunError::io(format!("create {}", d.display()), e))?;
        }
        Ok(())
    }

    /// The runtime command with the global options every call shares.
    fn command(&self, log: Option<&Path>) -> Command {
        let mut c = Command::new(&self.program);
        let mut root = OsString::from("--root=");
        root.push(self.runtime_root());
        c.arg(root);
        if let Some(log) = log {
            let mut l = OsString::from("--log=");
            l.push(log);
            c.arg(l).arg("--log-format=json");
        }
        c.stdin(Stdio::null());
        c
    }

    /// `runtime run --bundle BUNDLE ID`, logging to `log`.
    pub(super) fn run_command(&self, bundle: &Path, id: &str, log: &Path) -> Command {
        let mut c = self.command(Some(log));
        c.arg("run").arg("--bundle").arg(bundle).arg(id);
        c
    }

    /// Whether the runtime still has state for container `id`.
    pub(super) fn has_container(&self, id: &str) -> bool {
        std::fs::symlink_metadata(self.runtime_root().join(id)).is_ok()
    }

    /// `runtime delete --force ID`: kill whatever runs and drop the state. A container that is
    /// already gone is not an error.
    pub(super) fn delete(&self, id: &str) -> Result<(), RunError> {
        if !self.has_container(id) {
            return Ok(());
        }
        let out = self
            .command(None)
            .args(["delete", "--force", id])
            .output()
            .map_err(|e| RunError::io(format!("run {} delete", self.program.display()), e))?;
        if out.status.success() || !self.has_container(id) {
            return Ok(());
        }
        Err(RunError::Runtime(format!(
            "delete container {id}: {}",
            one_line(&String::from_utf8_lossy(&out.stderr))
        )))
    }

    /// Remove the containers and bundles of layerfs processes that no longer exist (killed
    /// before their clean-up could run). Best effort: a failure here must not stop a new run.
    pub(super) fn sweep_stale(&self) {
        let me = sys::getpid();
        let stale = |name: &[u8]| owner_pid(name).is_some_and(|p| p != me && !process_exists(p));
        for (dir, is_bundle) in [(self.runtime_root(), false), (self.bundles_dir(), true)] {
            let Ok(fd) = sys::open_dir_path(&dir) else {
                continue;
            };
            let Ok(entries) = sys::open_dir_beneath(fd.as_fd(), b"").and_then(sys::read_dir_all)
            else {
                continue;
            };
            for e in entries.iter().filter(|e| stale(&e.name)) {
                let Ok(id) = std::str::from_utf8(&e.name) else {
                    continue;
                };
                let deleted = self.delete(id);
                if is_bundle && deleted.is_ok() {
                    let _ = fsutil::remove_tree(fd.as_fd(), &e.name);
                }
                log::info!("removed the leftovers of container {id}: its layerfs process is gone");
            }
        }
    }
}

/// The pid a container id was made by (`layerfs-<pid>-<n>`).
pub(super) fn owner_pid(id: &[u8]) -> Option<i32> {
    let rest = id.strip_prefix(b"layerfs-")?;
    let pid = rest.split(|&b| b == b'-').next()?;
    std::str::from_utf8(pid).ok()?.parse().ok()
}

/// Whether a process exists (`kill(pid, 0)`; EPERM means it does, owned by someone else).
pub(super) fn process_exists(pid: i32) -> bool {
    pid > 0
        && match sys::kill(pid, 0) {
            Ok(()) => true,
            Err(e) => e.raw_os_error() == Some(libc::EPERM),
        }
}

/// Collapse a message to one line.
pub(super) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The last error-level message of a runtime JSON log (`{"level":"error","msg":...}` per line).
pub(super) fn last_error(log: &[u8]) -> Option<String> {
    log.split(|&b| b == b'\n')
        .rev()
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal" | "panic")))
        .find_map(|v| v["msg"].as_str().map(one_line))
}

/// Read the runtime log of a bundle (empty if none was written).
pub(super) fn read_log(bundle: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    match fsutil::read_small(bundle, super::LOG_NAME.as_bytes(), 1 << 20) {
        Ok(v) => Ok(v),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_errors() {
        let log = br#"{"level":"warning","msg":"w","time":"t"}
{"level":"error","msg":"runc run failed: unable to start container process: exec: \"x\": executable file not found in $PATH","time":"t"}
not json
"#;
        assert_eq!(
            last_error(log).unwrap(),
            "runc run failed: unable to start container process: exec: \"x\": executable file not found in $PATH"
        );
        assert_eq!(last_error(b""), None);
        assert_eq!(
            last_error(br#"{"level":"error","msg":"a\nb"}"#).unwrap(),
            "a b"
        );
    }

    #[test]
    fn ids_name_their_process() {
        assert_eq!(owner_pid(b"layerfs-123-4"), Some(123));
        assert_eq!(owner_pid(b"other-123-4"), None);
        assert_eq!(owner_pid(b"layerfs-x-4"), None);
        assert!(process_exists(sys::getpid()));
    }

    #[test]
    fn explicit_runtime_must_be_executable() {
        let e = Runtime::find(Some(Path::new("/nonexistent/runc"))).unwrap_err();
        assert!(e.to_string().contains("not an executable"), "{e}");
        let e = Runtime::find(Some(Path::new("no-such-runtime-xyz"))).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        let rt = Runtime::find(Some(Path::new("/bin/sh"))).unwrap();
        assert_eq!(rt.kind(), RuntimeKind::Runc);
    }
}
