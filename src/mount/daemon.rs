//! Running a mount: daemonize, mount, serve, and end cleanly.
//!
//! `layerfs mount` (and the fuse-overlayfs form) returns only once the mount is live: the
//! parent forks a daemon, waits on a pipe for the daemon's verdict, checks that the mount shows
//! in `/proc/self/mountinfo`, and exits 0. The daemon detaches (`setsid`, `chdir /`), points its
//! inherited stdio at /dev/null once mounted, and serves until the filesystem is unmounted
//! (`fusermount3 -u`, `umount`, `layerfs umount`) or it receives SIGTERM/SIGINT/SIGHUP, which
//! unmount it; either way it exits 0. Errors before the mount is live reach the caller as one
//! line on stderr and exit status 1, and nothing stays mounted.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fuser::{Config, MountOption, SessionACL};

use crate::fsutil;
use crate::mount::busypoll;
use crate::mount::fuse::{FuseOptions, LayerFs};
use crate::mount::{uring, uring_param};
use crate::sys;
use crate::union::{Union, UnionConfig};

/// Everything needed to mount, validated.
#[derive(Debug, Clone)]
pub struct MountPlan {
    pub union: UnionConfig,
    pub mountpoint: PathBuf,
    pub fuse: FuseOptions,
    pub allow_other: bool,
    pub allow_root: bool,
    pub read_only: bool,
    pub suid: bool,
    pub dev: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub threads: Option<usize>,
    /// How long the event loop keeps polling `/dev/fuse` after a request (zero: never).
    pub busy_poll: Duration,
    pub foreground: bool,
    pub log_file: Option<PathBuf>,
}

impl MountPlan {
    fn fuser_config(&self) -> Config {
        let mut opts = vec![MountOption::FSName("layerfs".into())];
        if self.fuse.default_permissions {
            opts.push(MountOption::DefaultPermissions);
        }
        opts.push(if self.suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        });
        opts.push(if self.dev {
            MountOption::Dev
        } else {
            MountOption::NoDev
        });
        if self.read_only {
            opts.push(MountOption::RO);
        }
        if self.noexec {
            opts.push(MountOption::NoExec);
        }
        if self.noatime {
            opts.push(MountOption::NoAtime);
        }
        let mut config = Config::default();
        config.mount_options = opts;
        config.acl = if self.allow_other {
            SessionACL::All
        } else if self.allow_root {
            SessionACL::RootAndOwner
        } else {
            SessionACL::Owner
        };
        // One event loop: requests mostly come one at a time from blocking callers, and a second
        // loop costs cross-core wake-ups; slow requests (copy-up) run on their own threads.
        config.n_threads = Some(self.threads.unwrap_or(1));
        config.clone_fd = true;
        config
    }
}

/// Mount according to `plan`; returns when the mount is live (daemon mode) or unmounted
/// (foreground).
pub fn mount(plan: MountPlan) -> Result<()> {
    // Before the fork, so that what it says reaches the caller's stderr.
    uring_param::prepare(plan.fuse.io_uring);
    // Opening the layers first means a bad stack fails here, before any fork.
    let union = Arc::new(Union::new(&plan.union)?);
    sys::raise_nofile_limit();
    if plan.foreground {
        return serve(union, &plan, None);
    }
    let (rx, tx) = sys::pipe().context("pipe")?;
    match sys::fork().context("fork")? {
        sys::Forked::Parent { child } => {
            drop(tx);
            let mut verdict = String::new();
            let _ = std::fs::File::from(rx).read_to_string(&mut verdict);
            if verdict.trim_end() == "ok" {
                if !fsutil::is_mounted(&plan.mountpoint) {
                    bail!(
                        "the daemon reported success but {} is not mounted",
                        plan.mountpoint.display()
                    );
                }
                return Ok(());
            }
            let status = sys::waitpid(child).unwrap_or(1);
            let msg = verdict.trim();
            if msg.is_empty() {
                bail!("the layerfs daemon exited (status {status}) before the mount was live");
            }
            bail!("{}", msg.trim_start_matches("error: "));
        }
        sys::Forked::Child => {
            drop(rx);
            let _ = sys::setsid();
            let _ = std::env::set_current_dir("/");
            let code = match serve(union, &plan, Some(tx)) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
    }
}

/// Mount `/dev/fuse` ourselves (as root) so that the session never unmounts anything by path
/// when it ends: fuser's own mount does, and that can take down a newer mount made at the same
/// path after ours was unmounted.
fn mount_dev_fuse(union: &Union, plan: &MountPlan) -> std::io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let root_mode = sys::fstat(union.layers()[0].root.as_fd())?.mode;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        root_mode & sys::S_IFMT,
        sys::getuid(),
        sys::getgid()
    );
    if plan.fuse.default_permissions {
        data.push_str(",default_permissions");
    }
    if plan.allow_other || plan.allow_root {
        data.push_str(",allow_other");
    }
    let flags = sys::MountFlags {
        read_only: plan.read_only,
        nosuid: !plan.suid,
        nodev: !plan.dev,
        noexec: plan.noexec,
        noatime: plan.noatime,
    };
    sys::mount_fuse("layerfs", &plan.mountpoint, "fuse.layerfs", flags, &data)?;
    Ok(OwnedFd::from(dev))
}

fn serve(union: Arc<Union>, plan: &MountPlan, notify: Option<OwnedFd>) -> Result<()> {
    let signals = sys::SignalSet::block(&[sys::SIGTERM, sys::SIGINT, sys::SIGHUP])
        .context("blocking signals")?;
    // Objects are created with exactly the mode the kernel asked for (it applied the caller's
    // umask already).
    sys::umask(0);
    crate::mount::heap::fix_large_blocks();
    let config = plan.fuser_config();
    let fs = LayerFs::new(union.clone(), plan.fuse.clone());
    let io_uring_granted = fs.io_uring_granted();
    let notifier_slot = fs.notifier_slot();
    let reader = fs.reader();
    let session = if sys::geteuid() == 0 {
        mount_dev_fuse(&union, plan).and_then(|fd| {
            let acl = config.acl;
            if !plan.busy_poll.is_zero() && config.n_threads == Some(1) {
                match fd.try_clone() {
                    Ok(dup) => busypoll::start(dup, plan.busy_poll)?,
                    Err(e) => log::warn!("busy poll off: {e}"),
                }
            }
            fuser::Session::from_fd(fs, fd, acl, config.clone())
        })
    } else {
        // Unprivileged: fusermount3 does the mount.
        fuser::Session::new(fs, &plan.mountpoint, &config)
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("mounting {}: {e}", plan.mountpoint.display());
            if let Some(tx) = notify {
                let _ = std::fs::File::from(tx).write_all(format!("error: {msg}\n").as_bytes());
            }
            bail!(msg);
        }
    };
    let _ = notifier_slot.set(session.notifier());
    // With FUSE-over-io_uring granted, requests go to the rings once every queue is registered.
    // If that fails, they keep coming through /dev/fuse, served as before.
    let rings = if io_uring_granted.load(Ordering::Relaxed) {
        match uring::Rings::start(&session, uring::DEFAULT_DEPTH, uring::PAYLOAD_LEN, reader) {
            Ok(rings) => {
                busypoll::turn_off();
                log::info!("io_uring on");
                Some(rings)
            }
            Err(e) => {
                log::warn!("io_uring off: {e}");
                if let Err(e) = uring::give_up(&session) {
                    bail!(
                        "{}: io_uring failed and cannot be turned off: {e}",
                        plan.mountpoint.display()
                    );
                }
                None
            }
        }
    } else {
        log::info!("io_uring off (not offered by the kernel or not asked for)");
        None
    };
    let mnt = plan.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = signals.wait() {
                log::info!("signal {sig}: unmounting {}", mnt.display());
                if let Err(e) = unmount(&mnt, false).or_else(|_| unmount(&mnt, true)) {
                    log::warn!("unmount {}: {e:#}", mnt.display());
                }
            }
        })
        .context("starting the signal thread")?;
    if let Some(tx) = notify {
        let _ = std::fs::File::from(tx).write_all(b"ok\n");
        let _ = sys::stdio_to_devnull();
        if let Some(path) = &plan.log_file {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => {
                    let _ = sys::stderr_to(&f);
                }
                Err(e) => log::warn!("log file {}: {e}", path.display()),
            }
        }
    }
    log::info!("serving {}", plan.mountpoint.display());
    session
        .run()
        .with_context(|| format!("serving {}", plan.mountpoint.display()))?;
    if let Some(rings) = rings {
        rings.join(Duration::from_secs(2));
    }
    log::info!("{} unmounted", plan.mountpoint.display());
    Ok(())
}

/// Unmount directly when privileged, else through `fusermount3 -u`.
fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    match sys::umount(mountpoint, lazy) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let out = cmd
                .arg("--")
                .arg(mountpoint)
                .output()
                .context("running fusermount3")?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("unmounting {}", mountpoint.display())),
    }
}

/// `layerfs umount MOUNTPOINT`.
pub fn umount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let mnt = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    if !fsutil::is_mounted(&mnt) {
        bail!("{} is not mounted", mnt.display());
    }
    unmount(&mnt, lazy)
}
