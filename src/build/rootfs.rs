//! A container root for a build step or `layerfs run`: a layerfs mount of an image's layers
//! (and a writable upper), served by a `layerfs mount --foreground` child process.
//!
//! A child process rather than a fork of this one: the builder has threads (output readers),
//! and the mount daemon wants its own signal mask, umask and process. The child is ours, so
//! unmounting waits for exactly that daemon to exit before the upper is read.
//!
//! Invariants: a [`MountedRoot`] is unmounted and its daemon gone when `unmount` returns or
//! the value is dropped (lazily detached and killed if it will not go), so a failing step
//! leaves no mount behind. The layers it stacks are held by a store lease while it lives.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::store::images::{self, Lease, LeaseRecord};
use crate::store::{Store, layers};
use crate::sys;

/// How long a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// A mounted container root.
pub struct MountedRoot {
    path: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    lease: Option<Lease>,
    store_root: PathBuf,
}

/// What to stack.
pub struct RootSpec<'a> {
    /// Layers bottom first (as an image lists them).
    pub layers: &'a [Digest],
    /// Upper and work directories; `None` mounts read-only.
    pub upper: Option<(&'a Path, &'a Path)>,
    pub mountpoint: &'a Path,
    /// Extra `-o` options.
    pub options: &'a [&'a str],
    /// Recorded in the store lease.
    pub container: Option<String>,
}

impl MountedRoot {
    pub fn mount(store: &Store, spec: &RootSpec<'_>) -> Result<MountedRoot> {
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding the layerfs binary", e))?;
        let lease = if spec.layers.is_empty() {
            None
        } else {
            Some(images::take_lease(
                store,
                &LeaseRecord {
                    mountpoint: spec.mountpoint.display().to_string(),
                    container: spec.container.clone(),
                    diff_ids: spec.layers.iter().map(Digest::to_string).collect(),
                },
            )?)
        };
        std::fs::create_dir_all(spec.mountpoint)
            .map_err(|e| Error::io(format!("creating {}", spec.mountpoint.display()), e))?;
        let log = spec.mountpoint.with_extension("log");
        let mut cmd = Command::new(exe);
        cmd.arg("mount");
        for id in spec.layers.iter().rev() {
            cmd.arg("--lower").arg(layers::path(store, id));
            // A layer that hides everything below ends the stack (as `mount --image`).
            if layers::root_is_opaque(store, id)? {
                break;
            }
        }
        if let Some((u, w)) = spec.upper {
            cmd.arg("--upper").arg(u).arg("--work").arg(w);
        }
        let mut opts = vec![format!("log={}", log.display())];
        opts.extend(spec.options.iter().map(|o| o.to_string()));
        if spec.upper.is_some() {
            // A step's upper is diffed right after; syncing each copy-up would be wasted.
            opts.push("volatile".into());
        }
        cmd.arg("-o").arg(opts.join(","));
        cmd.arg("--foreground").arg(spec.mountpoint);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env_remove("RUST_LOG");
        let child = cmd
            .spawn()
            .map_err(|e| Error::io("starting the layerfs mount", e))?;
        let mut root = MountedRoot {
            path: spec.mountpoint.to_path_buf(),
            child: Some(child),
            log,
            lease,
            store_root: store.root().to_path_buf(),
        };
        let start = Instant::now();
        loop {
            if fsutil::is_mounted(&root.path) {
                return Ok(root);
            }
            let exited = root
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                root.child = None;
                return Err(Error::invalid(format!(
                    "mounting {} failed ({status}): {}",
                    root.path.display(),
                    root.last_log_line()
                )));
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                return Err(Error::invalid(format!(
                    "mounting {} timed out: {}",
                    root.path.display(),
                    root.last_log_line()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root, opened (every access inside goes through it with `openat2`).
    pub fn open(&self) -> Result<OwnedFd> {
        sys::open_dir_path(&self.path)
            .map_err(|e| Error::io(format!("opening {}", self.path.display()), e))
    }

    fn last_log_line(&self) -> String {
        std::fs::read_to_string(&self.log)
            .ok()
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "no log".into())
    }

    /// Unmount and wait for the daemon to exit.
    pub fn unmount(mut self) -> Result<()> {
        self.finish(false)
    }

    fn finish(&mut self, forced: bool) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        let started = Instant::now();
        if fsutil::is_mounted(&self.path) {
            let mut tries = 0;
            loop {
                match sys::umount(&self.path, false) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 250 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        result = Err(Error::io(format!("unmounting {}", self.path.display()), e));
                        let _ = sys::umount(&self.path, true);
                        break;
                    }
                    Ok(()) => break,
                }
            }
        }
        let unmounted = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(if forced { 2 } else { 20 });
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        log::debug!(
            "unmount {:?}, daemon exit {:?}",
            unmounted - started,
            unmounted.elapsed()
        );
        let _ = std::fs::remove_file(&self.log);
        if let Some(lease) = self.lease.take() {
            match Store::open(&self.store_root) {
                Ok(store) => lease.release(&store),
                Err(e) => log::debug!("lease left for gc: {e}"),
            }
        }
        result
    }
}

impl Drop for MountedRoot {
    fn drop(&mut self) {
        if let Err(e) = self.finish(true) {
            log::warn!("{e}");
        }
    }
}

/// Give an empty upper the attributes of the image's top layer root, so the mount's `/`
/// looks as in the image (the upper's root is what the mount shows as `/`).
pub fn prepare_upper(store: &Store, upper: &Path, layers: &[Digest]) -> Result<()> {
    let Some(top) = layers.last() else {
        return Ok(());
    };
    let layer = store.dir(format!("layers/{}", top.hex()).as_bytes())?;
    let up = sys::open_dir_path(upper).map_err(|e| Error::io("opening the step's upper", e))?;
    images::copy_root_attrs(layer.as_fd(), up.as_fd())
        .map_err(|e| Error::io("preparing the step's upper", e))
}
