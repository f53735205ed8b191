//! `layerfs mount` and `umount`, the fuse-overlayfs compatible command line podman and
//! buildah call as their mount program, and the `-o` options both share, validated into a
//! `MountPlan` before anything is mounted.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{open_store, parse_size};
use crate::mount::daemon::{self, MountPlan};
use crate::mount::fuse::FuseOptions;
use crate::store::images::{self, LeaseRecord};
use crate::store::{self, Store, layers};
use crate::sys::{self, LockKind};
use crate::union::UnionConfig;
use crate::union::idmap::{IdMap, IdView};

#[derive(clap::Args, Debug, Default)]
pub struct MountArgs {
    /// A read-only layer; repeat, top layer first (as in lowerdir=).
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// A data-only lower layer, below every other (the kernel's `lowerdir=l::DIR`): not part
    /// of the merged tree, only where lower metacopy files' absolute redirects lead; repeat.
    #[arg(long = "data-lower", value_name = "DIR")]
    pub data_lowers: Vec<PathBuf>,
    /// Stack the layers of a stored image (below any --lower); repeat, top image first.
    #[arg(long = "image", value_name = "REF")]
    pub images: Vec<String>,
    /// Use (create on first use) the store container NAME as the upper and work directories.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["upper", "work"])]
    pub container: Option<String>,
    /// Writable layer.
    #[arg(long, value_name = "DIR", requires = "work")]
    pub upper: Option<PathBuf>,
    /// Work directory on the same filesystem as --upper.
    #[arg(long, value_name = "DIR", requires = "upper")]
    pub work: Option<PathBuf>,
    /// Mount options (comma separated; fuse-overlayfs options accepted).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Stay attached to the terminal instead of daemonizing.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Where to mount.
    pub mountpoint: PathBuf,
}

/// Parsed `-o` options.
#[derive(Debug, Default, PartialEq)]
pub struct MountOptions {
    pub lowerdirs: Vec<PathBuf>,
    /// Data-only lower layers (after `::` in `lowerdir=`).
    pub data_lowerdirs: Vec<PathBuf>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub fsync: Option<bool>,
    /// `redirect_dir=on`: rename lower and merged directories with a redirect.
    pub redirect_dir: Option<bool>,
    /// `metacopy=on`: copy only the metadata of lower files where the data is not changed.
    pub metacopy: Option<bool>,
    pub read_only: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: Option<bool>,
    pub suid: Option<bool>,
    pub dev: Option<bool>,
    pub noexec: bool,
    pub noatime: bool,
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    pub timeout: Option<Duration>,
    pub threads: Option<usize>,
    pub busy_poll_us: Option<u32>,
    pub passthrough: Option<bool>,
    pub io_uring: Option<bool>,
    pub cache_dirs: Option<bool>,
    pub readdirplus: Option<crate::mount::fuse::ReaddirPlus>,
    pub readdirplus_budget: Option<Duration>,
    pub prefetch: Option<bool>,
    pub cache_small_files: Option<u64>,
    pub debug: bool,
    /// Where the daemon writes its log (stderr is closed once it is up).
    pub log_file: Option<PathBuf>,
}

/// Split an option string on commas, keeping commas inside double quotes (SELinux contexts
/// such as `context="system_u:object_r:container_file_t:s0:c1,c2"`).
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

/// The layers a `lowerdir=` value names.
#[derive(Debug, Default, PartialEq)]
pub struct LowerDirs {
    pub lowers: Vec<PathBuf>,
    /// After `::`: the kernel's data-only layers.
    pub data_only: Vec<PathBuf>,
}

/// Split a `lowerdir=` value as the kernel does: `:` separates layers, `::` starts the
/// data-only ones (`l1:l2::d1::d2`), `\:` is a literal colon; empty items are skipped. A
/// single `:` after a `::` is refused, as the kernel refuses it.
pub fn split_lowerdirs(s: &str) -> Result<LowerDirs> {
    let mut out = LowerDirs::default();
    let mut cur = String::new();
    let mut data_only = false;
    let mut chars = s.chars().peekable();
    let finish = |item: String, data_only: bool, out: &mut LowerDirs| {
        if !item.is_empty() {
            let list = if data_only {
                &mut out.data_only
            } else {
                &mut out.lowers
            };
            list.push(PathBuf::from(item));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(':') | Some('\\')) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' => {
                finish(std::mem::take(&mut cur), data_only, &mut out);
                if chars.peek() == Some(&':') {
                    chars.next();
                    data_only = true;
                } else if data_only {
                    bail!("lowerdir={s}: a lower layer cannot follow data-only layers (after ::)");
                }
            }
            _ => cur.push(c),
        }
    }
    finish(cur, data_only, &mut out);
    Ok(out)
}

fn parse_switch(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "1" | "yes" => Ok(true),
        "off" | "0" | "no" => Ok(false),
        _ => bail!("bad value for mount option {key}: {v:?} (on or off)"),
    }
}

fn parse_u32(key: &str, v: &str) -> Result<u32> {
    v.parse()
        .with_context(|| format!("bad value for mount option {key}: {v:?}"))
}

/// Options accepted for compatibility and deliberately ignored (logged).
/// Microseconds the daemon keeps polling for the next request after one arrived: long enough to
/// bridge the caller's work between two requests, short enough that an idle mount costs nothing.
const DEFAULT_BUSY_POLL_US: u32 = 200;

const IGNORED_OPTIONS: &[&str] = &[
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "xattr_permissions",
    "noacl",
    "acl",
    "max_idle_threads",
    "plugins",
    "index",
    "xino",
    "userxattr",
    "nfs_export",
    "static_nlink",
    "threaded",
    "writeback",
    "noxattrs",
    "fsname",
    "subtype",
    "rw",
    "exec",
    "async",
    "relatime",
    "nodiratime",
    "auto_unmount",
];

impl MountOptions {
    /// Parse every `-o` argument (each may hold several comma-separated options).
    pub fn parse(args: &[String]) -> Result<MountOptions> {
        let mut o = MountOptions::default();
        // The last `redirect_dir=` value given, and whether `userxattr` was: both conflict
        // with `metacopy=on`, as in the kernel, whatever their order.
        let mut redirect_arg: Option<String> = None;
        let mut userxattr = false;
        for arg in args {
            for opt in split_options(arg) {
                let (key, val) = match opt.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (opt.as_str(), None),
                };
                match (key, val) {
                    ("lowerdir", Some(v)) => {
                        let dirs = split_lowerdirs(v)?;
                        o.lowerdirs.extend(dirs.lowers);
                        o.data_lowerdirs.extend(dirs.data_only);
                    }
                    ("upperdir", Some(v)) => o.upperdir = Some(PathBuf::from(v)),
                    ("workdir", Some(v)) => o.workdir = Some(PathBuf::from(v)),
                    ("volatile", None) => o.fsync = Some(false),
                    ("fsync", Some(v)) => o.fsync = Some(v != "0"),
                    ("ro", None) => o.read_only = true,
                    ("allow_other", None) => o.allow_other = true,
                    ("allow_root", None) => o.allow_root = true,
                    ("default_permissions", None) => o.default_permissions = Some(true),
                    ("suid", None) => o.suid = Some(true),
                    ("nosuid", None) => o.suid = Some(false),
                    ("dev", None) => o.dev = Some(true),
                    ("nodev", None) => o.dev = Some(false),
                    ("noexec", None) => o.noexec = true,
                    ("noatime", None) => o.noatime = true,
                    ("squash_to_root", None) => {
                        o.squash_uid = Some(0);
                        o.squash_gid = Some(0);
                    }
                    ("squash_to_uid", Some(v)) => o.squash_uid = Some(parse_u32(key, v)?),
                    ("squash_to_gid", Some(v)) => o.squash_gid = Some(parse_u32(key, v)?),
                    ("uidmapping", Some(v)) => {
                        o.uid_map = IdMap::parse(v).map_err(anyhow::Error::msg)?
                    }
                    ("gidmapping", Some(v)) => {
                        o.gid_map = IdMap::parse(v).map_err(anyhow::Error::msg)?
                    }
                    ("timeout", Some(v)) => {
                        let secs: f64 = v
                            .parse()
                            .ok()
                            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                            .with_context(|| {
                                format!("bad value for mount option timeout: {v:?}")
                            })?;
                        o.timeout = Some(Duration::from_secs_f64(secs));
                    }
                    ("threads", Some(v)) => {
                        let n = parse_u32(key, v)? as usize;
                        if n == 0 || n > 64 {
                            bail!("bad value for mount option threads: {v:?} (1-64)");
                        }
                        o.threads = Some(n);
                    }
                    ("busy_poll", Some(v)) => {
                        let us = parse_u32(key, v)?;
                        if us > 100_000 {
                            bail!("bad value for mount option busy_poll: {v:?} (0-100000 us)");
                        }
                        o.busy_poll_us = Some(us);
                    }
                    ("debug", None) => o.debug = true,
                    ("passthrough", Some(v)) => o.passthrough = Some(parse_switch(key, v)?),
                    ("io_uring", Some(v)) => o.io_uring = Some(parse_switch(key, v)?),
                    // The kernel's values: `on` writes redirects; `off`, `follow` and
                    // `nofollow` do not. Redirects on disk are followed in every case (as the
                    // kernel does by default, `redirect_always_follow`).
                    ("redirect_dir", Some(v)) => {
                        redirect_arg = Some(v.to_string());
                        o.redirect_dir = Some(match v {
                            "on" => true,
                            "off" | "follow" | "nofollow" => false,
                            _ => bail!(
                                "bad value for mount option redirect_dir: {v:?} (on, off, follow, nofollow)"
                            ),
                        })
                    }
                    // As the kernel's: `on` copies only metadata where it can and turns
                    // `redirect_dir=on` on (a moved metacopy file records where its data is);
                    // metacopy files on disk are read either way.
                    ("metacopy", Some(v)) => {
                        o.metacopy = Some(match v {
                            "on" => true,
                            "off" => false,
                            _ => bail!("bad value for mount option metacopy: {v:?} (on or off)"),
                        })
                    }
                    ("userxattr", None) => {
                        userxattr = true;
                        log::info!("ignoring mount option {opt} (the xattr namespace is probed)");
                    }
                    ("cache_dirs", Some(v)) => o.cache_dirs = Some(parse_switch(key, v)?),
                    ("prefetch", Some(v)) => o.prefetch = Some(parse_switch(key, v)?),
                    ("cache_small_files", Some(v)) => {
                        o.cache_small_files = Some(parse_size(v).map_err(|_| {
                            anyhow::anyhow!("bad value for mount option {key}: {v:?}")
                        })?)
                    }
                    ("readdirplus_budget_ms", Some(v)) => {
                        let ms = parse_u32(key, v)?;
                        if ms > 60_000 {
                            bail!(
                                "bad value for mount option readdirplus_budget_ms: {v:?} (0-60000)"
                            );
                        }
                        o.readdirplus_budget = Some(Duration::from_millis(ms.into()));
                    }
                    ("readdirplus", Some(v)) => {
                        use crate::mount::fuse::ReaddirPlus;
                        o.readdirplus = Some(match v {
                            "always" => ReaddirPlus::Always,
                            "auto" => ReaddirPlus::Auto,
                            "off" => ReaddirPlus::Off,
                            _ => bail!(
                                "bad value for mount option readdirplus: {v:?} (always, auto or off)"
                            ),
                        })
                    }
                    ("log", Some(v)) => o.log_file = Some(PathBuf::from(v)),
                    (k, _) if IGNORED_OPTIONS.contains(&k) => {
                        log::info!("ignoring mount option {opt}");
                    }
                    _ => bail!("unknown mount option {opt:?}"),
                }
            }
        }
        if o.metacopy == Some(true) {
            // The kernel's refusals, in its words.
            if let (Some(false), Some(v)) = (o.redirect_dir, &redirect_arg) {
                bail!("conflicting options: metacopy=on,redirect_dir={v}");
            }
            if userxattr {
                bail!("conflicting options: userxattr,metacopy=on");
            }
        }
        Ok(o)
    }
}

/// Absolute, symlink-free form of a directory given on the command line.
fn canonical_dir(p: &Path, what: &str) -> Result<PathBuf> {
    let c =
        std::fs::canonicalize(p).with_context(|| format!("{what} directory {}", p.display()))?;
    if !c.is_dir() {
        bail!("{what} directory {}: not a directory", p.display());
    }
    Ok(c)
}

/// Turn parsed arguments into a validated plan; nothing is mounted or changed on error.
pub fn plan_mount(
    lowers: &[PathBuf],
    upper: Option<&Path>,
    work: Option<&Path>,
    mountpoint: &Path,
    opts: MountOptions,
    foreground: bool,
) -> Result<MountPlan> {
    let mut all_lowers: Vec<PathBuf> = lowers.to_vec();
    all_lowers.extend(opts.lowerdirs.iter().cloned());
    let upper = upper.map(Path::to_path_buf).or(opts.upperdir.clone());
    let work = work.map(Path::to_path_buf).or(opts.workdir.clone());
    let lowers: Vec<PathBuf> = all_lowers
        .iter()
        .map(|l| canonical_dir(l, "lower"))
        .collect::<Result<_>>()?;
    let data_lowers: Vec<PathBuf> = opts
        .data_lowerdirs
        .iter()
        .map(|l| canonical_dir(l, "data-only lower"))
        .collect::<Result<_>>()?;
    if !data_lowers.is_empty() && lowers.is_empty() {
        bail!("data-only lower layers need at least one lower layer above them");
    }
    let upper = match (upper, work) {
        (Some(u), Some(w)) => Some((canonical_dir(&u, "upper")?, canonical_dir(&w, "work")?)),
        (Some(u), None) => bail!(
            "upper directory {} given without a work directory",
            u.display()
        ),
        (None, Some(w)) => bail!(
            "work directory {} given without an upper directory",
            w.display()
        ),
        (None, None) => None,
    };
    if lowers.is_empty() && upper.is_none() {
        bail!("nothing to mount: give lower directories (--lower or -o lowerdir=)");
    }
    let mnt = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    let mut entries =
        std::fs::read_dir(&mnt).with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    if entries.next().is_some() {
        bail!("mountpoint {} is not an empty directory", mnt.display());
    }
    let mut layer_dirs: Vec<(&str, &Path)> = lowers
        .iter()
        .map(|l| ("lower", l.as_path()))
        .chain(data_lowers.iter().map(|l| ("data-only lower", l.as_path())))
        .collect();
    if let Some((u, w)) = &upper {
        layer_dirs.push(("upper", u));
        layer_dirs.push(("work", w));
    }
    for (what, dir) in &layer_dirs {
        if mnt.starts_with(dir) {
            bail!(
                "mountpoint {} is inside {what} directory {}",
                mnt.display(),
                dir.display()
            );
        }
    }
    let root = sys::geteuid() == 0;
    let default_permissions = opts.default_permissions.unwrap_or(true);
    let fuse = FuseOptions {
        ttl: opts.timeout.unwrap_or(FuseOptions::default().ttl),
        ids: IdView {
            squash_uid: opts.squash_uid,
            squash_gid: opts.squash_gid,
            uid_map: opts.uid_map.clone(),
            gid_map: opts.gid_map.clone(),
        },
        default_permissions,
        passthrough: opts.passthrough.unwrap_or(true),
        io_uring: opts.io_uring.unwrap_or(true),
        cache_dirs: opts.cache_dirs.unwrap_or(true),
        readdirplus: opts
            .readdirplus
            .unwrap_or(crate::mount::fuse::ReaddirPlus::Auto),
        readdirplus_budget: opts
            .readdirplus_budget
            .unwrap_or(FuseOptions::default().readdirplus_budget),
        prefetch: opts.prefetch.unwrap_or(true),
        cache_small_files: opts
            .cache_small_files
            .unwrap_or(crate::mount::fuse::DEFAULT_CACHE_SMALL_FILES),
    };
    // Without an upper nothing can change, and the kernel should know it (as with kernel
    // overlayfs, which makes such a mount read-only): on a writable FUSE mount every read marks
    // the file's atime stale, so the next stat of it is a GETATTR round trip.
    let read_only = opts.read_only || upper.is_none();
    let metacopy = opts.metacopy.unwrap_or(false);
    Ok(MountPlan {
        union: UnionConfig {
            lowers,
            upper,
            fsync: opts.fsync.unwrap_or(true),
            // metacopy=on turns redirect_dir on, as in the kernel (an explicit other value was
            // refused when parsing).
            redirect_dir: opts.redirect_dir.unwrap_or(false) || metacopy,
            metacopy,
            data_lowers,
        },
        mountpoint: mnt,
        fuse,
        allow_other: opts.allow_other || root,
        allow_root: opts.allow_root,
        read_only,
        suid: opts.suid.unwrap_or(false),
        dev: opts.dev.unwrap_or(false),
        noexec: opts.noexec,
        noatime: opts.noatime,
        threads: opts.threads,
        busy_poll: Duration::from_micros(u64::from(
            opts.busy_poll_us.unwrap_or(DEFAULT_BUSY_POLL_US),
        )),
        foreground: foreground || opts.debug,
        log_file: opts.log_file.clone(),
    })
}

const SUBCOMMANDS: &[&str] = &[
    "mount", "umount", "import", "diff", "commit", "images", "layers", "history", "rm", "gc",
    "fsck", "build", "run", "cache", "pull", "push", "login", "logout", "help",
];

/// Whether argv is the fuse-overlayfs form (`layerfs [SOURCE] MOUNTPOINT -o ...`).
pub(super) fn is_compat_form(args: &[OsString]) -> bool {
    // Skip our global options: `layerfs --root R diff U -o F` is not the compat form.
    let mut i = 1;
    while let Some(a) = args.get(i) {
        let a = a.as_bytes();
        if a == b"--root" {
            i += 2;
        } else if a.starts_with(b"--root=")
            || a == b"--quiet"
            || a == b"--verbose"
            || (a.len() > 1 && a[0] == b'-' && a[1..].iter().all(|&c| c == b'v' || c == b'q'))
        {
            i += 1;
        } else {
            break;
        }
    }
    let Some(first) = args.get(i) else {
        return false;
    };
    let first = first.as_bytes();
    if SUBCOMMANDS.iter().any(|s| s.as_bytes() == first) {
        return false;
    }
    if matches!(first, b"--version" | b"-V" | b"--help" | b"-h") {
        return false;
    }
    args.iter().skip(1).any(|a| a.as_bytes().starts_with(b"-o"))
}

/// Parse the fuse-overlayfs command line: `[-f] [-d] -o OPTS [SOURCE] MOUNTPOINT`.
pub(super) fn parse_compat(args: &[OsString]) -> Result<MountPlan> {
    let mut opts = Vec::new();
    let mut positional = Vec::new();
    let mut foreground = false;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        match a.as_str() {
            "-o" => {
                i += 1;
                let v = args.get(i).context("-o needs an argument")?;
                opts.push(
                    v.to_str()
                        .context("mount options must be UTF-8")?
                        .to_owned(),
                );
            }
            "-f" | "--foreground" => foreground = true,
            "-d" | "--debug" => {
                foreground = true;
                opts.push("debug".into());
            }
            s if s.starts_with("-o") => opts.push(s[2..].to_owned()),
            s if s.starts_with('-') && s.len() > 1 => bail!("unknown argument {s:?}"),
            _ => positional.push(PathBuf::from(&args[i])),
        }
        i += 1;
    }
    let mountpoint = match positional.as_slice() {
        [m] | [_, m] => m.clone(),
        [] => bail!("missing mountpoint"),
        _ => bail!("too many arguments: want [SOURCE] MOUNTPOINT"),
    };
    let mut parsed = MountOptions::parse(&opts)?;
    // As a mount program, behave like fuse-overlayfs run by root: setuid programs in
    // containers work unless the caller says nosuid.
    if parsed.suid.is_none() && sys::geteuid() == 0 {
        parsed.suid = Some(true);
    }
    plan_mount(&[], None, None, &mountpoint, parsed, foreground)
}

/// `layerfs umount`: returns once the mount is gone and, unless lazy, once its daemon has let
/// go of the store, so that a `layerfs rm --container` or `gc` right after sees it gone.
pub(super) fn run_umount(root: &Option<PathBuf>, mountpoint: &Path, lazy: bool) -> Result<()> {
    let mnt = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    let root = root.clone().unwrap_or_else(store::default_root);
    // Only a store that exists: unmounting creates nothing. A mount made without the store
    // (or with another one) holds no lease here, and there is nothing to wait for.
    let leases = if lazy || !root.join("mounts").is_dir() {
        Vec::new()
    } else {
        let want = mnt.display().to_string();
        Store::open(&root)
            .and_then(|store| images::live_leases(&store))
            .map(|leases| {
                leases
                    .into_iter()
                    .filter(|(_, rec)| rec.mountpoint == want)
                    .collect()
            })
            .unwrap_or_else(|e| {
                log::warn!("not waiting for the mount daemon: {e}");
                Vec::new()
            })
    };
    daemon::umount(&mnt, lazy)?;
    for (fd, _) in leases {
        if !images::wait_released(fd.as_fd(), Duration::from_secs(10))? {
            log::warn!(
                "{} is unmounted but its daemon still holds its store lease",
                mnt.display()
            );
        }
    }
    Ok(())
}

pub(super) fn run_mount(root: &Option<PathBuf>, m: MountArgs) -> Result<()> {
    let mut opts = MountOptions::parse(&m.options)?;
    // --data-lower layers, then those of lowerdir= (each list top first).
    let mut data_lowers = m.data_lowers.clone();
    data_lowers.append(&mut opts.data_lowerdirs);
    opts.data_lowerdirs = data_lowers;
    let mut lowers = m.lowers.clone();
    let (mut upper, mut work) = (m.upper.clone(), m.work.clone());
    let mut store_state = None;
    if !m.images.is_empty() || m.container.is_some() {
        let store = open_store(root)?;
        if m.container.is_some() && m.images.len() > 1 {
            bail!("--container takes at most one --image");
        }
        let mut imgs = Vec::new();
        let mut ids = Vec::new();
        {
            let _lock = store.lock(LockKind::Shared)?;
            let mut cut = false;
            for r in &m.images {
                let img = images::resolve(&store, r)?;
                for id in img.diff_ids()?.iter().rev() {
                    if !layers::exists(&store, id)? {
                        bail!("layer {id} of image {r} is missing from the store");
                    }
                    if !cut {
                        lowers.push(layers::path(&store, id));
                        ids.push(id.to_string());
                        // A layer that hides everything below ends the stack.
                        cut = layers::root_is_opaque(&store, id)?;
                    }
                }
                imgs.push(img);
            }
        }
        if let Some(c) = &m.container {
            let dirs = images::ensure_container(&store, c, imgs.first())?;
            upper = Some(dirs.upper);
            work = Some(dirs.work);
        }
        store_state = Some((store, ids));
    }
    let plan = plan_mount(
        &lowers,
        upper.as_deref(),
        work.as_deref(),
        &m.mountpoint,
        opts,
        m.foreground,
    )?;
    // The lease's descriptor is inherited by the mount daemon: its layers stay live for gc
    // until the daemon exits.
    let lease = match &store_state {
        Some((store, ids)) => Some(images::take_lease(
            store,
            &LeaseRecord {
                mountpoint: plan.mountpoint.display().to_string(),
                container: m.container.clone(),
                diff_ids: ids.clone(),
            },
        )?),
        None => None,
    };
    let res = daemon::mount(plan);
    drop(lease);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_keeps_quoted_commas() {
        assert_eq!(
            split_options("lowerdir=a,context=\"s0:c1,c2\",,volatile"),
            ["lowerdir=a", "context=\"s0:c1,c2\"", "volatile"]
        );
    }
    #[test]
    fn lowerdirs_split_with_escapes() {
        let dirs = |l: &[&str], d: &[&str]| LowerDirs {
            lowers: l.iter().map(PathBuf::from).collect(),
            data_only: d.iter().map(PathBuf::from).collect(),
        };
        for (value, want) in [
            ("l/A:l/B\\:c", dirs(&["l/A", "l/B:c"], &[])),
            ("l/A:l/B\\:c::/abs", dirs(&["l/A", "l/B:c"], &["/abs"])),
            ("a:b::d1::d2", dirs(&["a", "b"], &["d1", "d2"])),
            ("a::d\\:1", dirs(&["a"], &["d:1"])),
            ("a:", dirs(&["a"], &[])),
            ("a::", dirs(&["a"], &[])),
            ("", dirs(&[], &[])),
        ] {
            assert_eq!(split_lowerdirs(value).unwrap(), want, "{value}");
        }
        for bad in ["a::d1:d2", "a::d:"] {
            assert!(split_lowerdirs(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn parse_podman_options() -> Result<()> {
        let o = MountOptions::parse(&[
            "lowerdir=l/X:l/Y,upperdir=/u/diff,workdir=/u/work,volatile,context=\"a,b\"".into(),
            "uidmapping=0:1000:1,squash_to_uid=5,fsync=0,xattr_permissions=2".into(),
        ])?;
        assert_eq!(o.lowerdirs.len(), 2);
        assert_eq!(o.upperdir.as_deref(), Some(Path::new("/u/diff")));
        assert_eq!(o.fsync, Some(false));
        assert_eq!(o.squash_uid, Some(5));
        assert_eq!(o.uid_map.to_shown(0), 1000);
        assert_eq!(o.uid_map.to_disk(1000), Some(0));
        Ok(())
    }
    #[test]
    fn bad_options_fail() {
        assert!(MountOptions::parse(&["bogus".into()]).is_err());
        assert!(MountOptions::parse(&["squash_to_uid=x".into()]).is_err());
        assert!(MountOptions::parse(&["uidmapping=1:2".into()]).is_err());
        assert!(MountOptions::parse(&["threads=0".into()]).is_err());
        assert!(MountOptions::parse(&["busy_poll=100001".into()]).is_err());
        assert!(MountOptions::parse(&["busy_poll=-1".into()]).is_err());
        assert_eq!(
            MountOptions::parse(&["busy_poll=0".into()])
                .unwrap()
                .busy_poll_us,
            Some(0)
        );
        assert!(MountOptions::parse(&["cache_small_files=lots".into()]).is_err());
        assert_eq!(
            MountOptions::parse(&["cache_small_files=128K".into()])
                .unwrap()
                .cache_small_files,
            Some(128 << 10)
        );
    }
    #[test]
    fn redirect_dir_values() {
        for (v, want) in [
            ("on", Some(true)),
            ("off", Some(false)),
            ("follow", Some(false)),
            ("nofollow", Some(false)),
        ] {
            let o = MountOptions::parse(&[format!("redirect_dir={v}")]).unwrap();
            assert_eq!(o.redirect_dir, want, "{v}");
        }
        assert_eq!(MountOptions::parse(&[]).unwrap().redirect_dir, None);
        assert!(MountOptions::parse(&["redirect_dir=yes".into()]).is_err());
    }
    #[test]
    fn metacopy_values_and_the_kernels_refusals() {
        let parse = |opts: &[&str]| {
            MountOptions::parse(&opts.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        };
        // (options, metacopy, redirect_dir) as parsed; the plan turns redirect_dir on with
        // metacopy=on.
        for (opts, metacopy, redirect) in [
            (&["metacopy=on"][..], Some(true), None),
            (&["metacopy=off"], Some(false), None),
            (&["metacopy=on,redirect_dir=on"], Some(true), Some(true)),
            (
                &["redirect_dir=off", "metacopy=off"],
                Some(false),
                Some(false),
            ),
            (
                &["metacopy=on,redirect_dir=off,metacopy=off"],
                Some(false),
                Some(false),
            ),
            (
                &["redirect_dir=off,redirect_dir=on,metacopy=on"],
                Some(true),
                Some(true),
            ),
            (&[], None, None),
        ] {
            let o = parse(opts).unwrap();
            assert_eq!(
                (o.metacopy, o.redirect_dir),
                (metacopy, redirect),
                "{opts:?}"
            );
        }
        for (opts, msg) in [
            (
                &["metacopy=on,redirect_dir=off"][..],
                "conflicting options: metacopy=on,redirect_dir=off",
            ),
            (
                &["redirect_dir=follow", "metacopy=on"],
                "conflicting options: metacopy=on,redirect_dir=follow",
            ),
            (
                &["metacopy=on,redirect_dir=nofollow"],
                "conflicting options: metacopy=on,redirect_dir=nofollow",
            ),
            (
                &["userxattr,metacopy=on"],
                "conflicting options: userxattr,metacopy=on",
            ),
            (&["metacopy=yes"], "metacopy"),
            (&["metacopy"], "metacopy"),
        ] {
            let e = parse(opts).unwrap_err().to_string();
            assert!(e.contains(msg), "{opts:?}: {e}");
        }
    }

    #[test]
    fn compat_form_detection() {
        let v = |s: &[&str]| s.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(is_compat_form(&v(&["layerfs", "-o", "lowerdir=a", "/m"])));
        assert!(is_compat_form(&v(&[
            "layerfs",
            "overlay",
            "/m",
            "-olowerdir=a"
        ])));
        assert!(!is_compat_form(&v(&[
            "layerfs", "mount", "--lower", "a", "/m", "-o", "ro"
        ])));
        assert!(!is_compat_form(&v(&["layerfs", "--version"])));
        assert!(!is_compat_form(&v(&[
            "layerfs", "--root", "/s", "diff", "/u", "-o", "f"
        ])));
        assert!(!is_compat_form(&v(&[
            "layerfs", "-q", "diff", "/u", "-o", "-"
        ])));
        assert!(is_compat_form(&v(&[
            "layerfs",
            "-v",
            "/m",
            "-o",
            "lowerdir=a"
        ])));
    }
}
