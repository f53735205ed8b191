//! `layerfs pull`, `push`, `login` and `logout`: the registry commands, thin over
//! `registry::{pull, push, auth}`. Pull and push print the manifest digest on stdout and draw
//! a bar per blob on a terminal.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::ArgAction;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{human, open_store, parse_size};
use crate::oci::compress::Limits;
use crate::registry::auth::{self, Credentials};
use crate::registry::pull::{self, PullOptions};
use crate::registry::{self, Bar, Client, Options, Platform, Reference, push};
use crate::sys;

/// How to reach the registry (shared by pull, push and login).
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Verify the registry's TLS certificate; `--tls-verify=false` talks plain HTTP (the
    /// value takes `=`, so `--tls-verify` before a positional argument reads no value).
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set
    )]
    pub tls_verify: bool,
    /// CA certificates (`*.crt`) and a client certificate (`NAME.cert` + `NAME.key`) for
    /// the registry [default: /etc/containers/certs.d/HOST[:PORT] when present].
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// The auth file to use [default: $REGISTRY_AUTH_FILE, then
    /// $XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json].
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// `[docker://]HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`.
    pub source: String,
    /// Name the image in the store [default: HOST[:PORT]/REPO:TAG].
    #[arg(long, value_name = "REF")]
    pub name: Option<String>,
    /// For an image index: which image [default: this host's, linux/amd64 here].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// Credentials [default: from the auth files].
    #[arg(long, value_name = "USER:PASS")]
    pub creds: Option<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Blobs downloaded at once.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub jobs: usize,
    /// Refuse layers larger than this uncompressed (0: no limit).
    #[arg(long, value_name = "SIZE", default_value = "256G", value_parser = parse_size)]
    pub max_size: u64,
    /// Refuse layers that decompress more than N:1 past the first 16 MiB (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub max_ratio: u64,
}

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The stored image (name or manifest digest).
    pub image: String,
    /// `[docker://]HOST[:PORT]/REPO[:TAG]` (`latest` when no tag).
    pub destination: String,
    /// Credentials [default: from the auth files].
    #[arg(long, value_name = "USER:PASS")]
    pub creds: Option<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Blobs uploaded at once.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub jobs: usize,
}

#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// `HOST[:PORT]` of the registry.
    pub registry: String,
    #[arg(short, long, value_name = "USER")]
    pub username: String,
    #[arg(
        short,
        long,
        value_name = "PASSWORD",
        required_unless_present = "password_stdin",
        conflicts_with = "password_stdin"
    )]
    pub password: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(clap::Args, Debug)]
pub struct LogoutArgs {
    /// `HOST[:PORT]` of the registry.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub registry: Option<String>,
    /// Remove every registry's credentials from the auth file.
    #[arg(long)]
    pub all: bool,
    /// The auth file [default: $REGISTRY_AUTH_FILE or $XDG_RUNTIME_DIR/containers/auth.json].
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,
}

pub(super) fn options(remote: &RemoteArgs, creds: Option<&str>) -> Result<Options> {
    Ok(Options {
        tls_verify: remote.tls_verify,
        cert_dir: remote.cert_dir.clone(),
        creds: creds.map(Credentials::parse).transpose()?,
        authfile: remote.authfile.clone(),
        retries: None,
    })
}

/// indicatif bars, one per blob, on a terminal; nothing otherwise.
struct Bars {
    multi: Option<MultiProgress>,
}

struct ShownBar {
    bar: ProgressBar,
    label: String,
}

struct HiddenBar;

impl Bar for HiddenBar {
    fn inc(&self, _: u64) {}
    fn set(&self, _: u64) {}
    fn note(&self, _: &str) {}
    fn finish(&self, _: &str) {}
}

impl Bar for ShownBar {
    fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
    fn set(&self, done: u64) {
        self.bar.set_position(done);
    }
    fn note(&self, note: &str) {
        self.bar.set_message(format!("{} {note}", self.label));
    }
    fn finish(&self, note: &str) {
        self.note(note);
        self.bar.finish();
    }
}

impl Bars {
    fn new(quiet: bool) -> Bars {
        let shown = !quiet && std::io::stderr().is_terminal();
        Bars {
            multi: shown.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }
}

impl registry::Progress for Bars {
    fn start(&self, label: &str, size: u64, done: u64) -> Box<dyn Bar> {
        let Some(m) = &self.multi else {
            return Box::new(HiddenBar);
        };
        let bar = m.add(ProgressBar::new(size));
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:23} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        bar.set_position(done);
        bar.set_message(label.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Box::new(ShownBar {
            bar,
            label: label.to_string(),
        })
    }
}

fn say(quiet: bool, msg: &str) {
    log::info!("{msg}");
    if !quiet && std::io::stderr().is_terminal() {
        eprintln!("{msg}");
    }
}

pub(super) fn run_pull(root: &Option<PathBuf>, quiet: bool, a: PullArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let reference = Reference::parse(&a.source)?;
    let platform = match &a.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let store = open_store(root)?;
    let opts = options(&a.remote, a.creds.as_deref())?;
    let started = Instant::now();
    let client = Client::new(&reference, &opts, false)?;
    let bars = Bars::new(quiet);
    let pulled = pull::pull(
        &store,
        &client,
        &PullOptions {
            name: a.name.clone(),
            platform,
            limits: Limits {
                max_size: a.max_size,
                max_ratio: a.max_ratio,
            },
            jobs: a.jobs,
        },
        &bars,
    )
    .with_context(|| format!("pulling {reference}"))?;
    say(
        quiet,
        &format!(
            "pulled {} as {}: {} layers, {} fetched, {} in {:.1}s",
            reference,
            pulled.name,
            pulled.layers,
            pulled.fetched,
            human(pulled.bytes),
            started.elapsed().as_secs_f64()
        ),
    );
    println!("{}", pulled.manifest);
    Ok(())
}

pub(super) fn run_push(root: &Option<PathBuf>, quiet: bool, a: PushArgs) -> Result<()> {
    sys::raise_nofile_limit();
    let dest = Reference::parse(&a.destination)?;
    let store = open_store(root)?;
    let opts = options(&a.remote, a.creds.as_deref())?;
    let started = Instant::now();
    let client = Client::new(&dest, &opts, true)?;
    let bars = Bars::new(quiet);
    let pushed = push::push(&store, &client, &a.image, a.jobs, &bars)
        .with_context(|| format!("pushing {} to {dest}", a.image))?;
    say(
        quiet,
        &format!(
            "pushed {} to {dest}: {} blobs uploaded ({}), {} mounted, {} already there, in {:.1}s",
            a.image,
            pushed.uploaded,
            human(pushed.bytes),
            pushed.mounted,
            pushed.existed,
            started.elapsed().as_secs_f64()
        ),
    );
    println!("{}", pushed.manifest);
    Ok(())
}

/// `HOST[:PORT]` (a `docker://` or `https://` in front and a path after are dropped).
fn registry_host(arg: &str) -> Result<String> {
    let s = ["docker://", "https://", "http://"]
        .iter()
        .find_map(|p| arg.strip_prefix(p))
        .unwrap_or(arg);
    let host = s.split('/').next().unwrap_or("");
    // Validate as the domain of a reference.
    let r = Reference::parse(&format!("{host}/x"))
        .map_err(|_| anyhow::anyhow!("bad registry {arg:?}: want HOST[:PORT]"))?;
    Ok(r.registry)
}

pub(super) fn run_login(a: LoginArgs) -> Result<()> {
    let host = registry_host(&a.registry)?;
    let password = match (&a.password, a.password_stdin) {
        (Some(p), _) => p.clone(),
        (None, true) => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => bail!("give --password or --password-stdin"),
    };
    if password.is_empty() {
        bail!("empty password");
    }
    let creds = Credentials {
        username: a.username.clone(),
        password,
    };
    let mut opts = options(&a.remote, None)?;
    opts.creds = Some(creds.clone());
    let reference = Reference::parse(&format!("{host}/x"))?;
    let client = Client::new(&reference, &opts, false)?;
    client.check_login()?;
    let path = auth::primary_auth_file(a.remote.authfile.as_deref());
    auth::store_login(&path, &host, &creds)?;
    eprintln!("Login Succeeded ({host}, saved in {})", path.display());
    Ok(())
}

pub(super) fn run_logout(a: LogoutArgs) -> Result<()> {
    let path = auth::primary_auth_file(a.authfile.as_deref());
    let host = a.registry.as_deref().map(registry_host).transpose()?;
    let removed = auth::remove_login(&path, host.as_deref())?;
    match (&host, removed) {
        (Some(h), 0) => bail!("not logged in to {h} (in {})", path.display()),
        (Some(h), _) => eprintln!("Removed login credentials for {h}"),
        (None, n) => eprintln!("Removed {n} login(s) from {}", path.display()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn flags_parse() {
        let cli =
            Cli::try_parse_from(["layerfs", "pull", "localhost:5000/a", "--tls-verify=false"])
                .unwrap();
        let Command::Pull(a) = cli.command else {
            panic!()
        };
        assert!(!a.remote.tls_verify);
        let cli =
            Cli::try_parse_from(["layerfs", "push", "img", "localhost:5000/a", "--tls-verify"])
                .unwrap();
        let Command::Push(a) = cli.command else {
            panic!()
        };
        assert!(a.remote.tls_verify);
        assert!(Cli::try_parse_from(["layerfs", "login", "h:1", "-u", "me"]).is_err());
        assert!(
            Cli::try_parse_from([
                "layerfs",
                "login",
                "h:1",
                "-u",
                "me",
                "-p",
                "x",
                "--password-stdin"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["layerfs", "logout"]).is_err());
        // Build takes the registry options for its cache; a bare --tls-verify does not eat
        // the context.
        let cli = Cli::try_parse_from([
            "layerfs",
            "build",
            "--cache-from",
            "localhost:5000/c",
            "--cache-from",
            "docker://localhost:5001/d",
            "--cache-to",
            "localhost:5000/c",
            "--tls-verify",
            "ctx",
        ])
        .unwrap();
        let Command::Build(a) = cli.command else {
            panic!()
        };
        assert!(a.remote.tls_verify);
        assert_eq!(a.cache_from.len(), 2);
        assert_eq!(a.cache_to, ["localhost:5000/c"]);
        assert_eq!(a.context, std::path::Path::new("ctx"));
        let cli = Cli::try_parse_from([
            "layerfs",
            "build",
            "--tls-verify=false",
            "--creds",
            "u:p",
            "ctx",
        ])
        .unwrap();
        let Command::Build(a) = cli.command else {
            panic!()
        };
        assert!(!a.remote.tls_verify);
        assert_eq!(a.creds.as_deref(), Some("u:p"));
        assert!(Cli::try_parse_from(["layerfs", "logout", "--all"]).is_ok());
        assert_eq!(
            registry_host("docker://localhost:5000/x").unwrap(),
            "localhost:5000"
        );
        assert_eq!(registry_host("https://quay.io").unwrap(), "quay.io");
        assert!(registry_host("not a host").is_err());
    }
}
