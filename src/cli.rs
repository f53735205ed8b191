//! Command line: clap definitions, the fuse-overlayfs compatible form, and their translation
//! into validated plans (`MountPlan`). Errors here are `anyhow` with a one-line message;
//! exit codes: 0 success, 1 failure, 2 bad usage.

use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::daemon::{self, MountPlan};
use crate::digest::Digest;
use crate::fuse::{FuseOptions, IdMap};
use crate::oci::compress::{Codec, Compression, Limits};
use crate::oci::export;
use crate::store::images::{self, LeaseRecord};
use crate::store::{self, Store, layers, ops};
use crate::sys::{self, LockKind};
use crate::union::UnionConfig;

/// Exit code for bad usage.
pub const EXIT_USAGE: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "layerfs",
    version,
    about = "FUSE union filesystem for container layers, with diff and commit",
    long_about = None,
)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Layer store [default: /var/lib/layerfs as root, $XDG_DATA_HOME/layerfs otherwise].
    #[arg(long, global = true, env = "LAYERFS_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// No progress bars (there are none unless stderr is a terminal anyway).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a union of layers.
    Mount(MountArgs),
    /// Unmount a layerfs mount; returns once its daemon has let go of the store (unless lazy).
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if files are still open (MNT_DETACH).
        #[arg(short, long)]
        lazy: bool,
    },
    /// Import an OCI layer tar (plain, gzip or zstd) or an OCI image layout; prints the
    /// diffID of each layer.
    Import(ImportArgs),
    /// Write the OCI layer tar of an upper directory; prints the diffID, then (compressed
    /// only) the blob digest. With `-o -` the tar goes to stdout and the digests to stderr.
    Diff(DiffArgs),
    /// Diff an upper (or a container's) into a new layer on top of an image; prints the diffID.
    Commit(CommitArgs),
    /// List images.
    Images {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List stored layers.
    Layers {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One row per layer of an image: diffID, size, created, created by / message.
    History {
        /// Image name or manifest digest.
        reference: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image name (its blobs and layers go at the next gc), or a container.
    Rm {
        /// Image name or manifest digest.
        #[arg(required_unless_present = "container", conflicts_with = "container")]
        reference: Option<String>,
        /// Remove this container's upper and work directories instead (not while mounted).
        #[arg(long, value_name = "NAME")]
        container: Option<String>,
    },
    /// Remove blobs and layers that no image, container or mount uses.
    Gc,
    /// Check an upper directory (and its work directory) against the on-disk format; exit 0
    /// when clean, 1 when problems are left.
    Fsck(FsckArgs),
}

#[derive(clap::Args, Debug, Default)]
pub struct FsckArgs {
    /// The upper directory to check.
    #[arg(required_unless_present = "store")]
    pub upper: Option<PathBuf>,
    /// Check the layer store (--root) instead: index, blob digests, layer directories,
    /// leftovers of killed commands.
    #[arg(long, conflicts_with_all = ["upper", "lowers", "work"])]
    pub store: bool,
    /// The lowers it is mounted over, top first (finds whiteouts that hide nothing).
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
    /// Its work directory (finds leftovers of interrupted operations).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Repair what can be repaired without losing data (refused while the upper is in use).
    #[arg(long)]
    pub repair: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    None,
    Gzip,
    Zstd,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::None => Compression::None,
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

/// `1024`, `64K`, `16M`, `256G`, `1T` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// Layer tar (`-` for standard input); compression is detected from the content.
    #[arg(required_unless_present = "oci", conflicts_with = "oci")]
    pub file: Option<PathBuf>,
    /// Import an image from an OCI image layout instead (skopeo/umoci/podman write them).
    #[arg(long, value_name = "DIR[:TAG]")]
    pub oci: Option<String>,
    /// Name the result: a one-layer image (or --parent plus this layer). A layer no image
    /// names is removed by the next gc.
    #[arg(long, value_name = "REF")]
    pub name: Option<String>,
    /// Put the layer on top of this image.
    #[arg(long, value_name = "REF", conflicts_with = "oci")]
    pub parent: Option<String>,
    /// Refuse layers larger than this uncompressed (0: no limit).
    #[arg(long, value_name = "SIZE", default_value = "256G", value_parser = parse_size)]
    pub max_size: u64,
    /// Refuse layers that decompress more than N:1 past the first 16 MiB (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub max_ratio: u64,
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// Upper directory (kernel overlayfs format).
    pub upper: PathBuf,
    /// Write the tar here (`-`: stdout); without it only the digests are computed.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "none")]
    pub compression: CompressionArg,
    /// Compression level (gzip 1-9, default 1; zstd 1-19, default 3).
    #[arg(long, value_name = "N")]
    pub level: Option<u32>,
    /// Clamp file times to at most this (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "N")]
    pub source_date_epoch: Option<i64>,
}

#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// Upper directory to commit.
    #[arg(required_unless_present = "container", conflicts_with = "container")]
    pub upper: Option<PathBuf>,
    /// Commit the upper of this store container.
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    /// The image the upper was made on (`scratch`: none).
    #[arg(long, value_name = "REF")]
    pub from: String,
    /// Name of the new image.
    #[arg(long, value_name = "NEWREF")]
    pub name: String,
    /// Comment recorded in the image history.
    #[arg(short, long, value_name = "TEXT")]
    pub message: Option<String>,
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: CompressionArg,
    /// Compression level (gzip 1-9, default 1; zstd 1-19, default 3).
    #[arg(long, value_name = "N")]
    pub level: Option<u32>,
    /// Clamp file times (and the image's creation time) to this (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "N")]
    pub source_date_epoch: Option<i64>,
}

#[derive(clap::Args, Debug, Default)]
pub struct MountArgs {
    /// A read-only layer; repeat, top layer first (as in lowerdir=).
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
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
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub fsync: Option<bool>,
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
    pub readdirplus: Option<crate::fuse::ReaddirPlus>,
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

/// Split a `lowerdir=` value: `:` separates, `\:` is a literal colon, empty items are skipped.
pub fn split_lowerdirs(s: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(':') | Some('\\')) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
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
    "redirect_dir",
    "index",
    "xino",
    "metacopy",
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
        for arg in args {
            for opt in split_options(arg) {
                let (key, val) = match opt.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (opt.as_str(), None),
                };
                match (key, val) {
                    ("lowerdir", Some(v)) => o.lowerdirs.extend(split_lowerdirs(v)),
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
                        use crate::fuse::ReaddirPlus;
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
    let mut layer_dirs: Vec<(&str, &Path)> =
        lowers.iter().map(|l| ("lower", l.as_path())).collect();
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
        ids: crate::fuse::IdView {
            squash_uid: opts.squash_uid,
            squash_gid: opts.squash_gid,
            uid_map: opts.uid_map.clone(),
            gid_map: opts.gid_map.clone(),
        },
        default_permissions,
        passthrough: opts.passthrough.unwrap_or(true),
        io_uring: opts.io_uring.unwrap_or(true),
        cache_dirs: opts.cache_dirs.unwrap_or(true),
        readdirplus: opts.readdirplus.unwrap_or(crate::fuse::ReaddirPlus::Auto),
        readdirplus_budget: opts
            .readdirplus_budget
            .unwrap_or(FuseOptions::default().readdirplus_budget),
        prefetch: opts.prefetch.unwrap_or(true),
        cache_small_files: opts
            .cache_small_files
            .unwrap_or(crate::fuse::DEFAULT_CACHE_SMALL_FILES),
    };
    // Without an upper nothing can change, and the kernel should know it (as with kernel
    // overlayfs, which makes such a mount read-only): on a writable FUSE mount every read marks
    // the file's atime stale, so the next stat of it is a GETATTR round trip.
    let read_only = opts.read_only || upper.is_none();
    Ok(MountPlan {
        union: UnionConfig {
            lowers,
            upper,
            fsync: opts.fsync.unwrap_or(true),
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
    "fsck", "help",
];

/// Whether argv is the fuse-overlayfs form (`layerfs [SOURCE] MOUNTPOINT -o ...`).
fn is_compat_form(args: &[OsString]) -> bool {
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
fn parse_compat(args: &[OsString]) -> Result<MountPlan> {
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

fn init_logging(verbose: u8, debug: bool) {
    let level = match (verbose, debug) {
        (_, true) | (2.., _) => "debug",
        (1, _) => "info",
        _ => "warn",
    };
    let env = env_logger::Env::default().default_filter_or(level);
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// Print a one-line error and return the exit code.
fn fail(e: &anyhow::Error) -> i32 {
    // One line: the chain joined, newlines flattened.
    let msg = format!("{e:#}").replace('\n', " ");
    eprintln!("layerfs: {msg}");
    1
}

/// Entry point of the binary.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
    if is_compat_form(&args) {
        let debug = args.iter().any(|a| a == "-d" || a == "--debug");
        init_logging(0, debug);
        return match parse_compat(&args).and_then(daemon::mount) {
            Ok(()) => 0,
            Err(e) => fail(&e),
        };
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    init_logging(cli.verbose, false);
    if let Command::Fsck(a) = cli.command {
        return match fsck(&cli.root, a) {
            Ok(code) => code,
            Err(e) => fail(&e),
        };
    }
    match run(cli) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// `layerfs fsck`: print each finding and a summary; 0 when nothing is left to fix.
fn fsck(root: &Option<PathBuf>, a: FsckArgs) -> Result<i32> {
    let report = match a.upper {
        Some(upper) if !a.store => crate::fsck::check_upper(&crate::fsck::FsckConfig {
            upper,
            lowers: a.lowers,
            work: a.work,
            repair: a.repair,
        })?,
        _ => {
            let root = root.clone().unwrap_or_else(crate::store::default_root);
            crate::fsck::check_store(&root, a.repair)?
        }
    };
    for f in &report.findings {
        println!("{f}");
    }
    println!(
        "{} entries checked, {} problems found, {} repaired",
        report.entries,
        report.problems(),
        report.repaired()
    );
    Ok(if report.clean() { 0 } else { 1 })
}

/// `layerfs umount`: returns once the mount is gone and, unless lazy, once its daemon has let
/// go of the store, so that a `layerfs rm --container` or `gc` right after sees it gone.
fn run_umount(root: &Option<PathBuf>, mountpoint: &Path, lazy: bool) -> Result<()> {
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

fn open_store(root: &Option<PathBuf>) -> Result<Store> {
    let root = root.clone().unwrap_or_else(store::default_root);
    Ok(Store::open(&root)?)
}

/// A progress bar on stderr when it is a terminal and not `--quiet`; hidden otherwise.
fn progress_bar(quiet: bool, total: Option<u64>, msg: &'static str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::new(n),
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {msg} {bytes} {bytes_per_sec} {elapsed}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.with_message(msg)
}

/// Counts bytes read into a progress bar.
struct ProgressReader<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// `1.5 MB` style sizes (powers of 1000, as `docker images`).
fn human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The 12 hex digits of a `sha256:` digest string, for tables.
fn short(d: &str) -> &str {
    d.get(7..19).unwrap_or(d)
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Mount(m) => run_mount(&cli.root, m),
        Command::Umount { mountpoint, lazy } => run_umount(&cli.root, &mountpoint, lazy),
        Command::Import(a) => run_import(&cli.root, quiet, a),
        Command::Diff(a) => run_diff(quiet, a),
        Command::Commit(a) => run_commit(&cli.root, quiet, a),
        Command::Images { json } => run_images(&cli.root, json),
        Command::Layers { json } => run_layers(&cli.root, json),
        Command::History { reference, json } => run_history(&cli.root, &reference, json),
        Command::Rm {
            reference,
            container,
        } => {
            let store = open_store(&cli.root)?;
            if let Some(name) = container {
                let freed = images::remove_container(&store, &name)?;
                println!("removed container {name}: freed {}", human(freed));
                return Ok(());
            }
            let _lock = store.lock(LockKind::Exclusive)?;
            for name in images::untag(&store, reference.as_deref().unwrap_or_default())? {
                println!("untagged: {name}");
            }
            Ok(())
        }
        // Answered in `main`, where its exit code (1: problems left) is chosen.
        Command::Fsck(a) => fsck(&cli.root, a).map(drop),
        Command::Gc => {
            let store = open_store(&cli.root)?;
            let r = store::gc::gc(&store)?;
            println!(
                "removed {} blobs, {} layers, {} staging dirs, {} stale mount leases; freed {} ({} bytes)",
                r.blobs,
                r.layers,
                r.tmp,
                r.leases,
                human(r.bytes_freed),
                r.bytes_freed
            );
            Ok(())
        }
    }
}

fn run_mount(root: &Option<PathBuf>, m: MountArgs) -> Result<()> {
    let opts = MountOptions::parse(&m.options)?;
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

fn limits(max_size: u64, max_ratio: u64) -> Limits {
    Limits {
        max_size,
        max_ratio,
    }
}

fn run_import(root: &Option<PathBuf>, quiet: bool, a: ImportArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let store = open_store(root)?;
    let lim = limits(a.max_size, a.max_ratio);
    let imported = if let Some(spec) = &a.oci {
        let (dir, tag) = ops::split_layout_ref(spec);
        let bar = progress_bar(quiet, None, "importing");
        let r = ops::import_layout(&store, &dir, tag.as_deref(), a.name.as_deref(), lim, &|n| {
            bar.inc(n)
        });
        bar.finish_and_clear();
        r?
    } else {
        let file = a.file.clone().context("give a layer tar or --oci DIR")?;
        let (input, total): (Box<dyn Read>, Option<u64>) = if file.as_os_str() == "-" {
            (Box::new(std::io::stdin().lock()), None)
        } else {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len)
        };
        let bar = progress_bar(quiet, total, "importing");
        let input = ProgressReader {
            inner: input,
            bar: bar.clone(),
        };
        let created_by = format!(
            "layerfs import {}",
            Path::new(file.file_name().unwrap_or(file.as_os_str())).display()
        );
        let r = ops::import_tar(
            &store,
            input,
            a.name.as_deref(),
            a.parent.as_deref(),
            &created_by,
            lim,
            &|_| {},
        );
        bar.finish_and_clear();
        r?
    };
    for id in &imported.diff_ids {
        println!("{id}");
    }
    if let Some(m) = imported.manifest {
        log::info!("image manifest {m}");
    }
    Ok(())
}

fn run_diff(quiet: bool, a: DiffArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let to_stdout = a.output.as_deref() == Some(Path::new("-"));
    if to_stdout && std::io::stdout().is_terminal() {
        bail!("refusing to write a tar to a terminal: redirect stdout or use -o FILE");
    }
    let out = match a.output {
        None => ops::Output::Discard,
        Some(_) if to_stdout => ops::Output::Stdout,
        Some(p) => ops::Output::File(p),
    };
    let compression: Compression = a.compression.into();
    let codec = Codec::new(compression, a.level)?;
    let bar = progress_bar(quiet, None, "diff");
    let opts = export::Options {
        source_date_epoch: a.source_date_epoch,
    };
    let r = ops::diff(&a.upper, out, codec, opts, &|n| bar.inc(n));
    bar.finish_and_clear();
    let d = r?;
    let mut lines = vec![d.diff_id.to_string()];
    if compression != Compression::None {
        lines.push(d.blob.to_string());
    }
    for l in lines {
        if to_stdout {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    }
    Ok(())
}

fn run_commit(root: &Option<PathBuf>, quiet: bool, a: CommitArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let store = open_store(root)?;
    let upper = match (&a.upper, &a.container) {
        (Some(u), _) => u.clone(),
        (None, Some(c)) => {
            store::validate_container(c)?;
            if images::container_record(&store, c)?.is_none() {
                bail!("no container {c} in the store");
            }
            store.root().join("containers").join(c).join("upper")
        }
        (None, None) => bail!("give an upper directory or --container"),
    };
    let from = (a.from != "scratch").then_some(a.from.as_str());
    let bar = progress_bar(quiet, None, "commit");
    let opts = export::Options {
        source_date_epoch: a.source_date_epoch,
    };
    let r = ops::commit(
        &store,
        &upper,
        from,
        &a.name,
        a.message.as_deref(),
        Codec::new(a.compression.into(), a.level)?,
        opts,
        &|n| bar.inc(n),
    );
    bar.finish_and_clear();
    let c = r?;
    println!("{}", c.diffed.diff_id);
    log::info!("image {} manifest {}", a.name, c.manifest);
    Ok(())
}

fn created_of(config: &serde_json::Value) -> String {
    config
        .get("created")
        .and_then(|v| v.as_str())
        .unwrap_or("-")
        .to_string()
}

fn run_images(root: &Option<PathBuf>, json: bool) -> Result<()> {
    let store = open_store(root)?;
    let _lock = store.lock(LockKind::Shared)?;
    let mut rows = Vec::new();
    for (name, desc) in images::list(&store)? {
        let img = images::load(&store, Some(name.clone()), &desc)?;
        let size: u64 = img.manifest.layers.iter().map(|l| l.size).sum();
        let ids: Vec<String> = img.diff_ids()?.iter().map(Digest::to_string).collect();
        rows.push(serde_json::json!({
            "name": name,
            "manifest": img.manifest_digest.to_string(),
            "layers": ids,
            "size": size,
            "created": created_of(&img.config),
        }));
    }
    if json {
        return print_json(&serde_json::Value::Array(rows));
    }
    println!(
        "{:<32} {:<12} {:>6} {:>10}  CREATED",
        "NAME", "MANIFEST", "LAYERS", "SIZE"
    );
    for r in rows {
        println!(
            "{:<32} {:<12} {:>6} {:>10}  {}",
            r["name"].as_str().unwrap_or("-"),
            short(r["manifest"].as_str().unwrap_or("-")),
            r["layers"].as_array().map_or(0, Vec::len),
            human(r["size"].as_u64().unwrap_or(0)),
            r["created"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

fn run_layers(root: &Option<PathBuf>, json: bool) -> Result<()> {
    let store = open_store(root)?;
    let _lock = store.lock(LockKind::Shared)?;
    let mut users: std::collections::HashMap<Digest, Vec<String>> = Default::default();
    for (name, desc) in images::list(&store)? {
        let img = images::load(&store, Some(name.clone()), &desc)?;
        for id in img.diff_ids()? {
            users.entry(id).or_default().push(name.clone());
        }
    }
    let mut rows = Vec::new();
    for id in layers::list(&store)? {
        let meta = layers::meta(&store, &id);
        rows.push(serde_json::json!({
            "diff_id": id.to_string(),
            "size": meta.as_ref().map(|m| m.size),
            "created": meta.as_ref().map(|m| m.created.clone()),
            "images": users.get(&id).cloned().unwrap_or_default(),
        }));
    }
    if json {
        return print_json(&serde_json::Value::Array(rows));
    }
    println!(
        "{:<12} {:>10}  {:<20}  IMAGES",
        "DIFF ID", "SIZE", "CREATED"
    );
    for r in rows {
        let imgs: Vec<&str> = r["images"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<12} {:>10}  {:<20}  {}",
            short(r["diff_id"].as_str().unwrap_or("-")),
            r["size"].as_u64().map_or("-".to_string(), human),
            r["created"].as_str().unwrap_or("-"),
            if imgs.is_empty() {
                "-".to_string()
            } else {
                imgs.join(", ")
            }
        );
    }
    Ok(())
}

fn run_history(root: &Option<PathBuf>, reference: &str, json: bool) -> Result<()> {
    let store = open_store(root)?;
    let _lock = store.lock(LockKind::Shared)?;
    let img = images::resolve(&store, reference)?;
    let ids = img.diff_ids()?;
    let history: Vec<serde_json::Value> = img
        .config
        .get("history")
        .and_then(|h| h.as_array())
        .map(|h| {
            h.iter()
                .filter(|e| {
                    !e.get("empty_layer")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let h = history.get(i);
        let field = |k: &str| {
            h.and_then(|e| e.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        rows.push(serde_json::json!({
            "diff_id": id.to_string(),
            "digest": img.manifest.layers[i].digest,
            "size": img.manifest.layers[i].size,
            "created": field("created"),
            "created_by": field("created_by"),
            "comment": field("comment"),
        }));
    }
    // Newest first, as `docker history`.
    rows.reverse();
    if json {
        return print_json(&serde_json::Value::Array(rows));
    }
    println!(
        "{:<12} {:>10}  {:<20}  CREATED BY / COMMENT",
        "DIFF ID", "SIZE", "CREATED"
    );
    for r in rows {
        let by = r["created_by"].as_str().unwrap_or("");
        let msg = match r["comment"].as_str() {
            Some(c) if !by.is_empty() => format!("{by}: {c}"),
            Some(c) => c.to_string(),
            None => by.to_string(),
        };
        println!(
            "{:<12} {:>10}  {:<20}  {}",
            short(r["diff_id"].as_str().unwrap_or("-")),
            human(r["size"].as_u64().unwrap_or(0)),
            r["created"].as_str().unwrap_or("-"),
            msg.replace('\n', " ")
        );
    }
    Ok(())
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
        assert_eq!(
            split_lowerdirs("l/A:l/B\\:c::/abs"),
            [
                PathBuf::from("l/A"),
                PathBuf::from("l/B:c"),
                PathBuf::from("/abs")
            ]
        );
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
        assert_eq!(o.uid_map, IdMap(vec![(0, 1000, 1)]));
        Ok(())
    }

    #[test]
    fn sizes_and_subcommands_parse() {
        assert_eq!(parse_size("256G"), Ok(256 << 30));
        assert_eq!(parse_size("10"), Ok(10));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        let cli = Cli::try_parse_from([
            "layerfs",
            "--root",
            "/s",
            "commit",
            "--container",
            "c",
            "--from",
            "scratch",
            "--name",
            "n",
        ])
        .unwrap();
        assert_eq!(cli.root.as_deref(), Some(Path::new("/s")));
        assert!(
            Cli::try_parse_from([
                "layerfs",
                "commit",
                "/u",
                "--container",
                "c",
                "--from",
                "a",
                "--name",
                "n"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["layerfs", "import"]).is_err());
        assert!(
            Cli::try_parse_from([
                "layerfs",
                "mount",
                "--container",
                "c",
                "--upper",
                "u",
                "--work",
                "w",
                "/m"
            ])
            .is_err()
        );
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
