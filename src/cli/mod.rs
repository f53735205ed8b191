//! Command line: clap definitions and the dispatch of each command to its family's file.
//!
//! - `mount.rs`: `mount`, `umount`, the fuse-overlayfs compatible form, `-o` options;
//! - `store.rs`: `import`, `diff`, `commit`, `images`, `layers`, `history`, `rm`, `gc`;
//! - `fsck.rs`: `fsck` of an upper or of the store;
//! - `build.rs`: `build`, `run` and `cache`;
//! - `registry.rs`: `pull`, `push`, `login`, `logout`.
//!
//! Errors here are `anyhow` with a one-line message; exit codes: 0 success, 1 failure,
//! 2 bad usage.

use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::build::progress::human;
use crate::mount::daemon;
use crate::oci::compress::Compression;
use crate::store::{self, Store};

mod build;
mod fsck;
mod mount;
mod registry;
mod store_cmds;

pub use fsck::FsckArgs;
pub use mount::{LowerDirs, MountArgs, MountOptions, plan_mount, split_lowerdirs, split_options};
pub use store_cmds::{CommitArgs, DiffArgs, ImportArgs};

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
    /// Build an image from a Containerfile, reusing every cached step; prints the manifest
    /// digest. Exit 1: a step failed; 2: bad usage or a Containerfile error.
    Build(build::BuildArgs),
    /// Run a command in a new container of an image (stdio attached, exit status passed on).
    Run(build::RunArgs),
    /// The build cache.
    Cache {
        #[command(subcommand)]
        command: build::CacheCommand,
    },
    /// Copy an image from a registry into the store (every blob checked against its digest
    /// and size); prints the manifest digest.
    Pull(registry::PullArgs),
    /// Copy a stored image to a registry; prints the manifest digest.
    Push(registry::PushArgs),
    /// Check credentials with a registry and save them in the auth file.
    Login(registry::LoginArgs),
    /// Remove a registry's credentials from the auth file.
    Logout(registry::LogoutArgs),
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
    // One line: the chain joined, newlines flattened. A cause its error already printed
    // (`Error::Io` shows its source) is not repeated.
    let mut msg = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if msg.ends_with(&s) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s);
    }
    eprintln!("layerfs: {}", msg.replace('\n', " "));
    1
}

/// Entry point of the binary.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
    if mount::is_compat_form(&args) {
        let debug = args.iter().any(|a| a == "-d" || a == "--debug");
        init_logging(0, debug);
        return match mount::parse_compat(&args).and_then(daemon::mount) {
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
    let cli = match cli.command {
        Command::Build(a) => return build::run_build(&cli.root, cli.quiet, a),
        Command::Run(a) => {
            return match build::run_run(&cli.root, a) {
                Ok(code) => code,
                Err(e) => {
                    fail(&e);
                    // As podman: the container never ran.
                    125
                }
            };
        }
        command => Cli { command, ..cli },
    };
    if let Command::Fsck(a) = cli.command {
        return match fsck::fsck(&cli.root, a) {
            Ok(code) => code,
            Err(e) => fail(&e),
        };
    }
    match run(cli) {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
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
    let root = &cli.root;
    match cli.command {
        Command::Mount(m) => mount::run_mount(root, m),
        Command::Umount { mountpoint, lazy } => mount::run_umount(root, &mountpoint, lazy),
        Command::Import(a) => store_cmds::run_import(root, quiet, a),
        Command::Diff(a) => store_cmds::run_diff(quiet, a),
        Command::Commit(a) => store_cmds::run_commit(root, quiet, a),
        Command::Images { json } => store_cmds::run_images(root, json),
        Command::Layers { json } => store_cmds::run_layers(root, json),
        Command::History { reference, json } => store_cmds::run_history(root, &reference, json),
        Command::Rm {
            reference,
            container,
        } => store_cmds::run_rm(root, reference.as_deref(), container.as_deref()),
        // Answered in `main`, where its exit code (1: problems left) is chosen.
        Command::Fsck(a) => fsck::fsck(root, a).map(drop),
        Command::Gc => store_cmds::run_gc(root),
        Command::Cache { command } => build::run_cache(root, command),
        Command::Pull(a) => registry::run_pull(root, quiet, a),
        Command::Push(a) => registry::run_push(root, quiet, a),
        Command::Login(a) => registry::run_login(a),
        Command::Logout(a) => registry::run_logout(a),
        // Answered in `main`, where their exit codes are chosen.
        Command::Build(_) | Command::Run(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
}
