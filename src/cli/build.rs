//! `layerfs build`, `layerfs run` and `layerfs cache`: the builder and the runner for a person.
//!
//! Exit codes: build 0 success, 1 failed build, 2 bad usage or a Containerfile error; run
//! passes the container's exit status on (125 when layerfs itself failed, as podman does).

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use super::registry::RemoteArgs;
use super::{human, open_store, print_json, short};
use crate::build::builder::{self, BuildError, BuildOptions};
use crate::build::cache;
use crate::build::image::ImageState;
use crate::build::progress::{Mode, Progress};
use crate::build::remote;
use crate::build::rootfs::{MountedRoot, RootSpec};
use crate::run::{self, Network, Output, RunSpec, Runtime};
use crate::store::images;
use crate::sys::LockKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    None,
    Host,
}

impl From<NetworkArg> for Network {
    fn from(n: NetworkArg) -> Self {
        match n {
            NetworkArg::None => Network::None,
            NetworkArg::Host => Network::Host,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    Auto,
    Plain,
    /// Docker's name for the terminal display; plain lines here.
    Tty,
    Json,
    /// Docker's name for its JSON stream.
    Rawjson,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Name the image (repeat for several names).
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tags: Vec<String>,
    /// The Containerfile [default: CONTEXT/Containerfile, then CONTEXT/Dockerfile].
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A build argument (`KEY` alone takes the value from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Build this stage (and what it needs) instead of the last one.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Run every step, ignoring the cache (results still update it).
    #[arg(long)]
    pub no_cache: bool,
    /// Ignore the cache for the steps of this stage (repeat).
    #[arg(long = "no-cache-filter", value_name = "STAGE")]
    pub no_cache_filter: Vec<String>,
    /// Network of RUN steps: none (loopback only) or host.
    #[arg(long, value_enum, default_value = "none")]
    pub network: NetworkArg,
    /// How progress is shown (plain lines on stderr, or JSON events on stdout).
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressArg,
    /// Clamp file times and set every creation time to this (seconds since the epoch): two
    /// builds give the same image digest.
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "N")]
    pub source_date_epoch: Option<i64>,
    /// The OCI runtime [default: runc, then crun, on PATH].
    #[arg(long, value_name = "PATH")]
    pub runtime: Option<PathBuf>,
    /// At a local cache miss, pull the step's entry from this cache repository if it has
    /// one (repeat: asked in order).
    #[arg(long = "cache-from", value_name = "[docker://]HOST/REPO")]
    pub cache_from: Vec<String>,
    /// After the build, push its cache entries and build record to this repository.
    #[arg(long = "cache-to", value_name = "[docker://]HOST/REPO")]
    pub cache_to: Vec<String>,
    /// Credentials for the cache registries [default: from the auth files].
    #[arg(long, value_name = "USER:PASS")]
    pub creds: Option<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The build context directory.
    pub context: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Remove the container's upper when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Keep the container's upper as store container NAME (`layerfs commit --container`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Set an environment variable (`KEY` alone takes it from this environment).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (name or uid, optionally :group) inside the container.
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,
    /// Network: none (loopback only) or host.
    #[arg(long, value_enum, default_value = "none")]
    pub network: NetworkArg,
    /// The OCI runtime [default: runc, then crun, on PATH].
    #[arg(long, value_name = "PATH")]
    pub runtime: Option<PathBuf>,
    /// Image name or manifest digest.
    pub image: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// List build cache entries: key, layer size, when it was made, step.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Drop entries no recorded last build uses (--all: every entry); `gc` then frees their
    /// layers.
    Prune {
        #[arg(long)]
        all: bool,
    },
}

/// `KEY=VALUE`, or `KEY` with the value from the environment (skipped when unset).
fn key_values(items: &[String], what: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            Some(_) => bail!("bad {what} {item:?}: want KEY=VALUE"),
            None => {
                if let Ok(v) = std::env::var(item) {
                    out.push((item.clone(), v));
                }
            }
        }
    }
    Ok(out)
}

/// `layerfs build`; returns the exit code.
pub(super) fn run_build(root: &Option<PathBuf>, quiet: bool, a: BuildArgs) -> i32 {
    let mode = match (quiet, a.progress) {
        (_, ProgressArg::Json | ProgressArg::Rawjson) => Mode::Json,
        (true, _) => Mode::Quiet,
        _ => Mode::Plain,
    };
    let result = (|| -> std::result::Result<builder::Built, BuildError> {
        let build_args: BTreeMap<String, String> = key_values(&a.build_args, "--build-arg")
            .map_err(|e| BuildError::Containerfile(e.to_string()))?
            .into_iter()
            .collect();
        let usage = |e: String| BuildError::Containerfile(e);
        let repos = |args: &[String]| {
            args.iter()
                .map(|a| remote::parse_repository(a).map_err(|e| usage(e.to_string())))
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        let cache_from = repos(&a.cache_from)?;
        let cache_to = repos(&a.cache_to)?;
        let registry_opts = super::registry::options(&a.remote, a.creds.as_deref())
            .map_err(|e| usage(format!("{e:#}")))?;
        let store = open_store(root)
            .map_err(|e| BuildError::Failed(crate::error::Error::invalid(format!("{e:#}"))))?;
        crate::sys::raise_nofile_limit();
        let opts = BuildOptions {
            context: a.context.clone(),
            file: a.file.clone(),
            tags: a.tags.clone(),
            build_args,
            target: a.target.clone(),
            no_cache: a.no_cache,
            no_cache_filter: a.no_cache_filter.clone(),
            network: a.network.into(),
            source_date_epoch: a.source_date_epoch,
            runtime: a.runtime.clone(),
            cache_from,
            cache_to,
            registry: registry_opts,
        };
        builder::build(&store, &opts, Progress::new(mode))
    })();
    match result {
        Ok(built) => {
            if mode != Mode::Json {
                println!("{}", built.manifest);
            }
            0
        }
        Err(BuildError::Containerfile(msg)) => {
            eprintln!("layerfs: {}", msg.replace('\n', " "));
            super::EXIT_USAGE
        }
        Err(BuildError::Failed(e)) => {
            eprintln!("layerfs: {}", e.to_string().replace('\n', " "));
            1
        }
    }
}

/// `layerfs run`; returns the container's exit status.
pub(super) fn run_run(root: &Option<PathBuf>, a: RunArgs) -> Result<i32> {
    let store = open_store(root)?;
    let img = {
        let _lock = store.lock(LockKind::Shared)?;
        images::resolve(&store, &a.image)?
    };
    let state = ImageState::of_image(&img)?;
    let ids = state.diff_ids()?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => format!(
            "run-{}",
            &crate::digest::Digest::of(
                format!("{}-{}", crate::sys::getpid(), crate::store::time::now()).as_bytes()
            )
            .hex()[..12]
        ),
    };
    let dirs = images::ensure_container(&store, &name, Some(&img))?;
    let staging = store.staging()?;
    let mnt = staging.path().join("root");
    let result = (|| -> Result<i32> {
        let mounted = MountedRoot::mount(
            &store,
            &RootSpec {
                layers: &ids,
                upper: Some((&dirs.upper, &dirs.work)),
                mountpoint: &mnt,
                options: &[],
                container: Some(name.clone()),
            },
        )?;
        let config = &state.config;
        let mut argv: Vec<String> = config.entrypoint.clone().unwrap_or_default();
        if a.command.is_empty() {
            argv.extend(config.cmd.clone().unwrap_or_default());
        } else {
            argv.extend(a.command.iter().cloned());
        }
        if argv.is_empty() {
            bail!("image {} has no CMD or ENTRYPOINT: give a command", a.image);
        }
        let rootfd = mounted.open()?;
        let user_spec = a.user.clone().unwrap_or_else(|| config.user.clone());
        let user =
            run::resolve_user_at(rootfd.as_fd(), &user_spec).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut env = config.clone();
        for (k, v) in key_values(&a.env, "--env")? {
            env.env_set(&k, &v);
        }
        let mut spec = RunSpec::new(mounted.path(), argv);
        spec.env = env.env;
        spec.cwd = a
            .workdir
            .clone()
            .or_else(|| (!config.working_dir.is_empty()).then(|| config.working_dir.clone()))
            .unwrap_or_else(|| "/".into());
        spec.user = user;
        spec.network = a.network.into();
        let rt = Runtime::find(a.runtime.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        drop(rootfd);
        let outcome = run::run(&rt, &spec, Output::Inherit).map_err(|e| anyhow::anyhow!("{e}"))?;
        mounted.unmount()?;
        Ok(outcome.status.code())
    })();
    drop(staging);
    if a.rm {
        if let Err(e) = images::remove_container(&store, &name) {
            log::warn!("removing container {name}: {e}");
        }
    }
    result
}

pub(super) fn run_cache(root: &Option<PathBuf>, c: CacheCommand) -> Result<()> {
    let store = open_store(root)?;
    match c {
        CacheCommand::Ls { json } => {
            let mut entries = cache::list(&store)?;
            entries.sort_by_key(|e| std::cmp::Reverse(e.created));
            if json {
                return print_json(&serde_json::to_value(&entries).context("encoding entries")?);
            }
            println!("{:<12} {:>10}  {:<20}  STEP", "KEY", "LAYER", "LAST USED");
            for e in entries {
                println!(
                    "{:<12} {:>10}  {:<20}  {}",
                    short(&e.key),
                    e.layer.as_ref().map_or("-".to_string(), |l| human(l.size)),
                    crate::store::time::rfc3339(e.created),
                    e.history.created_by.replace('\n', " ")
                );
            }
            Ok(())
        }
        CacheCommand::Prune { all } => {
            let p = cache::prune(&store, all)?;
            println!(
                "removed {} cache entries, {} build records, {} source listings (layers go at the next gc)",
                p.entries, p.records, p.manifests
            );
            Ok(())
        }
    }
}
