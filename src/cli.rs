//! Command line: clap definitions, the fuse-overlayfs compatible form, and their translation
//! into validated plans (`MountPlan`). Errors here are `anyhow` with a one-line message;
//! exit codes: 0 success, 1 failure, 2 bad usage.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Parser, Subcommand};

use crate::daemon::{self, MountPlan};
use crate::fuse::{FuseOptions, IdMap};
use crate::sys;
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

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a union of layers.
    Mount(MountArgs),
    /// Unmount a layerfs mount (the daemon exits cleanly).
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if files are still open (MNT_DETACH).
        #[arg(short, long)]
        lazy: bool,
    },
    /// Check an upper directory (and its work directory) against the on-disk format; exit 0
    /// when clean, 1 when problems are left.
    Fsck(FsckArgs),
}

#[derive(clap::Args, Debug, Default)]
pub struct FsckArgs {
    /// The upper directory to check.
    pub upper: PathBuf,
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

#[derive(clap::Args, Debug, Default)]
pub struct MountArgs {
    /// A read-only layer; repeat, top layer first (as in lowerdir=).
    #[arg(long = "lower", value_name = "DIR")]
    pub lowers: Vec<PathBuf>,
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
    pub suid: bool,
    pub dev: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    pub timeout: Option<Duration>,
    pub threads: Option<usize>,
    pub debug: bool,
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

fn parse_u32(key: &str, v: &str) -> Result<u32> {
    v.parse()
        .with_context(|| format!("bad value for mount option {key}: {v:?}"))
}

/// Options accepted for compatibility and deliberately ignored (logged).
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
                    ("suid", None) => o.suid = true,
                    ("nosuid", None) => o.suid = false,
                    ("dev", None) => o.dev = true,
                    ("nodev", None) => o.dev = false,
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
                    ("debug", None) => o.debug = true,
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
    };
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
        read_only: opts.read_only,
        suid: opts.suid,
        dev: opts.dev,
        noexec: opts.noexec,
        noatime: opts.noatime,
        threads: opts.threads,
        foreground: foreground || opts.debug,
    })
}

const SUBCOMMANDS: &[&str] = &["mount", "umount", "fsck", "help"];

/// Whether argv is the fuse-overlayfs form (`layerfs [SOURCE] MOUNTPOINT -o ...`).
fn is_compat_form(args: &[OsString]) -> bool {
    let Some(first) = args.get(1) else {
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
    let parsed = MountOptions::parse(&opts)?;
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
    match run(cli) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// `layerfs fsck`: print each finding and a summary; 0 when nothing is left to fix.
fn fsck(a: FsckArgs) -> Result<i32> {
    let cfg = crate::fsck::FsckConfig {
        upper: a.upper,
        lowers: a.lowers,
        work: a.work,
        repair: a.repair,
    };
    let report = crate::fsck::check_upper(&cfg)?;
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

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Mount(m) => {
            let opts = MountOptions::parse(&m.options)?;
            let plan = plan_mount(
                &m.lowers,
                m.upper.as_deref(),
                m.work.as_deref(),
                &m.mountpoint,
                opts,
                m.foreground,
            )?;
            daemon::mount(plan).map(|()| 0)
        }
        Command::Umount { mountpoint, lazy } => daemon::umount(&mountpoint, lazy).map(|()| 0),
        Command::Fsck(a) => fsck(a),
    }
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
    fn bad_options_fail() {
        assert!(MountOptions::parse(&["bogus".into()]).is_err());
        assert!(MountOptions::parse(&["squash_to_uid=x".into()]).is_err());
        assert!(MountOptions::parse(&["uidmapping=1:2".into()]).is_err());
        assert!(MountOptions::parse(&["threads=0".into()]).is_err());
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
    }
}
