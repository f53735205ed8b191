//! The instruction layer: one logical line in, one typed instruction out, with its flags
//! checked, following BuildKit's `frontend/dockerfile/instructions`.
//!
//! Arguments are kept as written (quotes and `$VAR` included) wherever Docker applies
//! environment replacement later; [`Instruction::expand`] applies it to exactly the fields
//! Docker expands: ADD/COPY sources, destination, `--chown`, `--chmod` (and ADD's
//! `--checksum`), ENV and LABEL keys and values, ARG defaults, EXPOSE, USER, VOLUME, WORKDIR,
//! STOPSIGNAL and the values of RUN `--mount` fields. RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK,
//! ONBUILD and MAINTAINER are never expanded (the shell, or the child build, does that), and
//! FROM is expanded with the global ARGs only (see [`super::Stage`]).
//!
//! How arguments split, as in Docker: FROM, EXPOSE and the shell form of ADD, COPY and VOLUME
//! split on blanks with no regard for quotes (use the JSON form for paths with spaces); ENV,
//! LABEL and ARG split on blanks outside quotes; RUN, CMD, ENTRYPOINT, WORKDIR, USER,
//! STOPSIGNAL and MAINTAINER take the rest of the line as one string. A JSON array of strings
//! selects the exec/JSON form; a line that is not a parseable JSON array is the shell form; a
//! parseable array that holds anything but strings is an error.
//!
//! Stricter than Docker, on purpose: an unknown flag is an error on every instruction (Docker
//! ignores flags on STOPSIGNAL and HEALTHCHECK NONE), CMD/ENTRYPOINT/RUN need a command
//! (`CMD []` and `ENTRYPOINT []` stay valid), ONBUILD's trigger is parsed and validated now
//! rather than in the child build, and heredocs (`RUN <<EOF`) are refused as unsupported
//! instead of being misread as the lines that follow.

use std::time::Duration;

use super::expand::{ExpandError, Lookup, expand_word, expand_words};
use super::parser::{Json, has_heredoc, parse_json, parse_words, split_blanks, split_command};

/// A command as RUN, CMD, ENTRYPOINT or HEALTHCHECK CMD give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// Shell form: run with the stage's SHELL (`/bin/sh -c` by default).
    Shell(String),
    /// Exec (JSON) form: run as is.
    Exec(Vec<String>),
}

impl Default for CommandLine {
    fn default() -> Self {
        CommandLine::Shell(String::new())
    }
}

/// `FROM [--platform=P] IMAGE [AS name]`: starts a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromInstruction {
    /// Image reference or stage name, unexpanded.
    pub image: String,
    /// `--platform`, unexpanded.
    pub platform: Option<String>,
    /// `AS name`, lower-cased and validated.
    pub name: Option<String>,
}

/// Every instruction but FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Run(Run),
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    /// `SHELL ["exe", "arg", ...]`, JSON only, never empty.
    Shell(Vec<String>),
    Copy(Copy),
    Add(Add),
    /// `ENV k=v ...` or the legacy `ENV k v with spaces`.
    Env(Vec<KeyValue>),
    Arg(Arg),
    /// `WORKDIR path` (the rest of the line).
    Workdir(String),
    /// `USER user[:group]` (the rest of the line; see [`split_user`]).
    User(String),
    Label(Vec<KeyValue>),
    /// `EXPOSE port[/proto] ...` as written; see [`exposed_ports`] once expanded.
    Expose(Vec<String>),
    /// `VOLUME ["/a", ...]` or `VOLUME /a /b`; no entry is empty.
    Volume(Vec<String>),
    StopSignal(String),
    Healthcheck(Healthcheck),
    Onbuild(Onbuild),
    Maintainer(String),
}

/// `RUN [--mount=...] [--network=...] [--security=...] [--device=...] command`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Run {
    pub command: CommandLine,
    /// One entry per `--mount`, in order.
    pub mounts: Vec<Mount>,
    /// `--network`: `default`, `none` or `host`.
    pub network: Option<String>,
    /// `--security`: `sandbox` or `insecure`.
    pub security: Option<String>,
    /// `--device` values as written.
    pub devices: Vec<String>,
}

/// One `--mount` value: CSV fields `key=value` or bare `key` (like `ro`). Keys are
/// lower-cased; their meaning (type, target, from, ...) is the RUN implementation's business.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    pub fields: Vec<MountField>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountField {
    pub key: String,
    pub value: Option<String>,
}

impl Mount {
    /// The value of the last field named `key` (later fields win, as in BuildKit).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|f| f.key == key)
            .and_then(|f| f.value.as_deref())
    }
}

/// `COPY [--from=] [--chown=] [--chmod=] [--link] [--parents] [--exclude=]... src... dest`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Copy {
    pub sources: Vec<String>,
    pub dest: String,
    /// A stage name, a stage index, or an image reference; never expanded.
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub excludes: Vec<String>,
    /// Written in the JSON form.
    pub json: bool,
}

/// `ADD [--chown=] [--chmod=] [--link] [--checksum=] [--keep-git-dir] [--unpack]
/// [--exclude=]... src... dest`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Add {
    pub sources: Vec<String>,
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub checksum: Option<String>,
    pub keep_git_dir: Option<bool>,
    pub unpack: Option<bool>,
    pub excludes: Vec<String>,
    pub json: bool,
}

/// One ENV or LABEL pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Written as `KEY value` rather than `KEY=value`.
    pub legacy: bool,
}

/// `ARG name[=default] ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub defs: Vec<ArgDef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDef {
    pub name: String,
    /// The default as written (`None` for a bare `ARG name`; `Some("")` for `ARG name=`).
    pub default: Option<String>,
}

/// `HEALTHCHECK NONE` or `HEALTHCHECK [options] CMD command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// Disable any healthcheck inherited from the base image.
    None,
    Check(HealthConfig),
}

/// Durations and retries of zero mean "not set": the image config inherits the default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthConfig {
    pub command: CommandLine,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub start_interval: Duration,
    pub retries: u32,
}

impl HealthConfig {
    /// The image config's `Test`: `["CMD", args...]` or `["CMD-SHELL", command]`.
    pub fn test(&self) -> Vec<String> {
        match &self.command {
            CommandLine::Exec(v) => std::iter::once("CMD".to_string())
                .chain(v.iter().cloned())
                .collect(),
            CommandLine::Shell(s) => vec!["CMD-SHELL".to_string(), s.clone()],
        }
    }
}

/// `ONBUILD <instruction>`: a trigger for builds that use this image as their base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Onbuild {
    /// The trigger's text, as stored in the image config's `OnBuild`.
    pub expression: String,
    /// The trigger, parsed (never FROM, MAINTAINER or ONBUILD).
    pub instruction: Box<Instruction>,
}

/// A parsed logical line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    From(FromInstruction),
    Instruction(Instruction),
}

/// `user[:group]` into its parts.
pub fn split_user(user: &str) -> (&str, Option<&str>) {
    match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    }
}

impl Instruction {
    /// The keyword, upper-case, for messages.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::Run(_) => "RUN",
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Shell(_) => "SHELL",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Env(_) => "ENV",
            Instruction::Arg(_) => "ARG",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Label(_) => "LABEL",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Volume(_) => "VOLUME",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Onbuild(_) => "ONBUILD",
            Instruction::Maintainer(_) => "MAINTAINER",
        }
    }

    /// Apply environment replacement to the fields Docker expands (see the module doc).
    /// EXPOSE is also split into words, as Docker does.
    pub fn expand(&self, escape: char, lookup: Lookup<'_>) -> Result<Instruction, ExpandError> {
        let w = |s: &str| expand_word(s, escape, lookup);
        let opt = |s: &Option<String>| s.as_deref().map(w).transpose();
        let all = |v: &[String]| v.iter().map(|s| w(s)).collect::<Result<Vec<_>, _>>();
        let kvs = |v: &[KeyValue]| {
            v.iter()
                .map(|kv| {
                    Ok(KeyValue {
                        key: w(&kv.key)?,
                        value: w(&kv.value)?,
                        legacy: kv.legacy,
                    })
                })
                .collect::<Result<Vec<_>, ExpandError>>()
        };
        Ok(match self {
            Instruction::Run(r) => Instruction::Run(Run {
                mounts: r
                    .mounts
                    .iter()
                    .map(|m| {
                        let fields = m
                            .fields
                            .iter()
                            .map(|f| {
                                Ok(MountField {
                                    key: f.key.clone(),
                                    value: opt(&f.value)?,
                                })
                            })
                            .collect::<Result<_, ExpandError>>()?;
                        Ok(Mount { fields })
                    })
                    .collect::<Result<_, ExpandError>>()?,
                ..r.clone()
            }),
            Instruction::Copy(c) => Instruction::Copy(Copy {
                sources: all(&c.sources)?,
                dest: w(&c.dest)?,
                chown: opt(&c.chown)?,
                chmod: opt(&c.chmod)?,
                ..c.clone()
            }),
            Instruction::Add(a) => Instruction::Add(Add {
                sources: all(&a.sources)?,
                dest: w(&a.dest)?,
                chown: opt(&a.chown)?,
                chmod: opt(&a.chmod)?,
                checksum: opt(&a.checksum)?,
                ..a.clone()
            }),
            Instruction::Env(v) => Instruction::Env(kvs(v)?),
            Instruction::Label(v) => Instruction::Label(kvs(v)?),
            // Docker expands an ARG's default, never its name.
            Instruction::Arg(a) => Instruction::Arg(Arg {
                defs: a
                    .defs
                    .iter()
                    .map(|d| {
                        Ok(ArgDef {
                            name: d.name.clone(),
                            default: opt(&d.default)?,
                        })
                    })
                    .collect::<Result<_, ExpandError>>()?,
            }),
            Instruction::Workdir(p) => Instruction::Workdir(w(p)?),
            Instruction::User(u) => Instruction::User(w(u)?),
            Instruction::StopSignal(s) => Instruction::StopSignal(w(s)?),
            Instruction::Volume(v) => Instruction::Volume(all(v)?),
            Instruction::Expose(v) => {
                let mut out = Vec::new();
                for p in v {
                    out.extend(expand_words(p, escape, lookup)?);
                }
                Instruction::Expose(out)
            }
            Instruction::Cmd(_)
            | Instruction::Entrypoint(_)
            | Instruction::Shell(_)
            | Instruction::Healthcheck(_)
            | Instruction::Onbuild(_)
            | Instruction::Maintainer(_) => self.clone(),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Str,
    Strs,
}

enum FlagValue {
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
}

/// Flags given to one instruction, checked against what it accepts.
struct Flags(Vec<(&'static str, FlagValue)>);

impl Flags {
    fn parse(instr: &str, raw: &[String], spec: &[(&'static str, Kind)]) -> Result<Flags, String> {
        let mut out: Vec<(&'static str, FlagValue)> = Vec::new();
        for arg in raw {
            let (flag, value) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v)),
                None => (arg.as_str(), None),
            };
            let Some(&(name, kind)) = flag
                .strip_prefix("--")
                .and_then(|n| spec.iter().find(|(s, _)| *s == n))
            else {
                return Err(format!("{instr}: unknown flag: {flag}"));
            };
            let slot = out.iter_mut().find(|(n, _)| *n == name);
            if slot.is_some() && kind != Kind::Strs {
                return Err(format!("{instr}: duplicate flag specified: {flag}"));
            }
            let missing = || format!("{instr}: missing a value on flag: {flag}");
            let v = match kind {
                Kind::Bool => match value.map(str::to_ascii_lowercase).as_deref() {
                    None | Some("true") => FlagValue::Bool(true),
                    Some("false") => FlagValue::Bool(false),
                    Some("") => return Err(missing()),
                    Some(v) => {
                        return Err(format!(
                            "{instr}: expecting boolean value for flag {flag}, not: {v}"
                        ));
                    }
                },
                Kind::Str => FlagValue::Str(value.ok_or_else(missing)?.to_string()),
                Kind::Strs => {
                    let v = value.ok_or_else(missing)?.to_string();
                    if let Some((_, FlagValue::Strs(list))) = slot {
                        list.push(v);
                        continue;
                    }
                    FlagValue::Strs(vec![v])
                }
            };
            out.push((name, v));
        }
        Ok(Flags(out))
    }

    fn get(&self, name: &str) -> Option<&FlagValue> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some(FlagValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn str(&self, name: &str) -> Option<String> {
        match self.get(name) {
            Some(FlagValue::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn strs(&self, name: &str) -> Vec<String> {
        match self.get(name) {
            Some(FlagValue::Strs(v)) => v.clone(),
            _ => Vec::new(),
        }
    }
}

fn no_flags(instr: &str, raw: &[String]) -> Result<(), String> {
    Flags::parse(instr, raw, &[]).map(|_| ())
}

const NOT_STRINGS: &str = "when using JSON array syntax, arrays must be comprised of strings only";

fn command_line(instr: &str, rest: &str) -> Result<Option<CommandLine>, String> {
    if rest.is_empty() {
        return Ok(None);
    }
    match parse_json(rest) {
        Json::Strings(v) => Ok(Some(CommandLine::Exec(v))),
        Json::NotStrings => Err(format!("{instr}: {NOT_STRINGS}")),
        Json::NotJson => Ok(Some(CommandLine::Shell(rest.to_string()))),
    }
}

fn json_or_blanks(instr: &str, rest: &str) -> Result<(Vec<String>, bool), String> {
    match parse_json(rest) {
        Json::Strings(v) => Ok((v, true)),
        Json::NotStrings => Err(format!("{instr}: {NOT_STRINGS}")),
        Json::NotJson => Ok((split_blanks(rest), false)),
    }
}

fn heredoc_error(instr: &str) -> String {
    format!("{instr}: heredocs (<<EOF) are not supported")
}

fn at_least_one(instr: &str) -> String {
    format!("{instr} requires at least one argument")
}

fn exactly_one(instr: &str, rest: &str) -> Result<String, String> {
    if rest.is_empty() {
        return Err(format!("{instr} requires exactly one argument"));
    }
    Ok(rest.to_string())
}

/// `^[a-z][a-z0-9-_.]*$`, Docker's rule for stage names (after lower-casing).
pub fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// Parse one logical line. Errors are messages without the line number.
pub fn parse_instruction(text: &str, escape: char) -> Result<Parsed, String> {
    let (cmd, flags, rest) = split_command(text, escape);
    let rest = rest.as_str();
    let upper = cmd.to_ascii_uppercase();
    let instr = upper.as_str();
    let i = match instr {
        "FROM" => {
            let f = Flags::parse(instr, &flags, &[("platform", Kind::Str)])?;
            let args = split_blanks(rest);
            let name = match args.as_slice() {
                [_] => None,
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => {
                    let lower = name.to_lowercase();
                    if !valid_stage_name(&lower) {
                        return Err(format!(
                            "invalid name for build stage: {name:?}, name can't start with a \
                             number or contain symbols"
                        ));
                    }
                    Some(lower)
                }
                _ => return Err("FROM requires either one or three arguments".into()),
            };
            return Ok(Parsed::From(FromInstruction {
                image: args[0].clone(),
                platform: f.str("platform"),
                name,
            }));
        }
        "RUN" => {
            let f = Flags::parse(
                instr,
                &flags,
                &[
                    ("mount", Kind::Strs),
                    ("network", Kind::Str),
                    ("security", Kind::Str),
                    ("device", Kind::Strs),
                ],
            )?;
            let network = f.str("network");
            if let Some(n) = network
                .as_deref()
                .filter(|n| !matches!(*n, "default" | "none" | "host"))
            {
                return Err(format!("RUN: invalid network mode {n:?}"));
            }
            let security = f.str("security");
            if let Some(s) = security
                .as_deref()
                .filter(|s| !matches!(*s, "sandbox" | "insecure"))
            {
                return Err(format!("RUN: security {s:?} is not valid"));
            }
            let mounts = f
                .strs("mount")
                .iter()
                .map(|m| parse_mount(m).map_err(|e| format!("RUN: --mount={m}: {e}")))
                .collect::<Result<_, _>>()?;
            let command = match command_line(instr, rest)? {
                Some(CommandLine::Shell(s)) if has_heredoc(&s) => return Err(heredoc_error(instr)),
                Some(CommandLine::Exec(v)) if v.is_empty() => return Err(at_least_one(instr)),
                Some(c) => c,
                None => return Err(at_least_one(instr)),
            };
            Instruction::Run(Run {
                command,
                mounts,
                network,
                security,
                devices: f.strs("device"),
            })
        }
        "CMD" | "ENTRYPOINT" => {
            no_flags(instr, &flags)?;
            let c = command_line(instr, rest)?.ok_or_else(|| at_least_one(instr))?;
            if instr == "CMD" {
                Instruction::Cmd(c)
            } else {
                Instruction::Entrypoint(c)
            }
        }
        "SHELL" => {
            no_flags(instr, &flags)?;
            match parse_json(rest) {
                _ if rest.is_empty() => return Err(at_least_one(instr)),
                Json::Strings(v) if v.is_empty() => return Err(at_least_one(instr)),
                Json::Strings(v) => Instruction::Shell(v),
                Json::NotStrings => return Err(format!("SHELL: {NOT_STRINGS}")),
                Json::NotJson => {
                    return Err("SHELL requires the arguments to be in JSON form".into());
                }
            }
        }
        "COPY" | "ADD" => {
            let copy = instr == "COPY";
            let spec: &[(&'static str, Kind)] = if copy {
                &[
                    ("chown", Kind::Str),
                    ("chmod", Kind::Str),
                    ("from", Kind::Str),
                    ("link", Kind::Bool),
                    ("parents", Kind::Bool),
                    ("exclude", Kind::Strs),
                ]
            } else {
                &[
                    ("chown", Kind::Str),
                    ("chmod", Kind::Str),
                    ("link", Kind::Bool),
                    ("checksum", Kind::Str),
                    ("keep-git-dir", Kind::Bool),
                    ("unpack", Kind::Bool),
                    ("exclude", Kind::Strs),
                ]
            };
            let f = Flags::parse(instr, &flags, spec)?;
            let (mut args, json) = json_or_blanks(instr, rest)?;
            if args.len() < 2 {
                return Err(format!(
                    "{instr} requires at least two arguments (sources and a destination), \
                     {} given",
                    args.len()
                ));
            }
            if !json && args.iter().any(|a| has_heredoc(a)) {
                return Err(heredoc_error(instr));
            }
            let dest = args.pop().unwrap_or_default();
            if copy {
                let from = f.str("from");
                if let Some(fr) = from.as_deref() {
                    // BuildKit's rule: a --from that expansion would change is refused.
                    if expand_word(fr, escape, &|_| None).ok().as_deref() != Some(fr) {
                        return Err(
                            "COPY: --from does not support variable expansion; define a stage \
                             with FROM using a global ARG instead"
                                .into(),
                        );
                    }
                }
                Instruction::Copy(Copy {
                    sources: args,
                    dest,
                    from,
                    chown: f.str("chown"),
                    chmod: f.str("chmod"),
                    link: f.bool("link").unwrap_or(false),
                    parents: f.bool("parents").unwrap_or(false),
                    excludes: f.strs("exclude"),
                    json,
                })
            } else {
                Instruction::Add(Add {
                    sources: args,
                    dest,
                    chown: f.str("chown"),
                    chmod: f.str("chmod"),
                    link: f.bool("link").unwrap_or(false),
                    checksum: f.str("checksum"),
                    keep_git_dir: f.bool("keep-git-dir"),
                    unpack: f.bool("unpack"),
                    excludes: f.strs("exclude"),
                    json,
                })
            }
        }
        "ENV" | "LABEL" => {
            no_flags(instr, &flags)?;
            let kvs = key_values(instr, rest, escape)?;
            if instr == "ENV" {
                Instruction::Env(kvs)
            } else {
                Instruction::Label(kvs)
            }
        }
        "ARG" => {
            no_flags(instr, &flags)?;
            let words = parse_words(rest, escape);
            if words.is_empty() {
                return Err(at_least_one(instr));
            }
            let mut defs = Vec::with_capacity(words.len());
            for word in words {
                let (name, default) = match word.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (word, None),
                };
                if name.is_empty() {
                    return Err("ARG names can not be blank".into());
                }
                defs.push(ArgDef { name, default });
            }
            Instruction::Arg(Arg { defs })
        }
        "WORKDIR" | "USER" | "STOPSIGNAL" | "MAINTAINER" => {
            no_flags(instr, &flags)?;
            let v = exactly_one(instr, rest)?;
            match instr {
                "WORKDIR" => Instruction::Workdir(v),
                "USER" => Instruction::User(v),
                "STOPSIGNAL" => Instruction::StopSignal(v),
                _ => Instruction::Maintainer(v),
            }
        }
        "EXPOSE" => {
            no_flags(instr, &flags)?;
            let ports = split_blanks(rest);
            if ports.is_empty() {
                return Err(at_least_one(instr));
            }
            Instruction::Expose(ports)
        }
        "VOLUME" => {
            no_flags(instr, &flags)?;
            let (vols, _) = json_or_blanks(instr, rest)?;
            if vols.is_empty() {
                return Err(at_least_one(instr));
            }
            let vols: Vec<String> = vols.iter().map(|v| v.trim().to_string()).collect();
            if vols.iter().any(String::is_empty) {
                return Err("VOLUME specified can not be an empty string".into());
            }
            Instruction::Volume(vols)
        }
        "HEALTHCHECK" => Instruction::Healthcheck(healthcheck(&flags, rest)?),
        "ONBUILD" => {
            no_flags(instr, &flags)?;
            if rest.is_empty() {
                return Err(at_least_one(instr));
            }
            let (inner, _, _) = split_command(rest, escape);
            let inner = inner.to_ascii_uppercase();
            match inner.as_str() {
                "ONBUILD" => {
                    return Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into());
                }
                "FROM" | "MAINTAINER" => {
                    return Err(format!("{inner} isn't allowed as an ONBUILD trigger"));
                }
                _ => {}
            }
            match parse_instruction(rest, escape).map_err(|e| format!("ONBUILD: {e}"))? {
                Parsed::Instruction(i) => Instruction::Onbuild(Onbuild {
                    expression: rest.to_string(),
                    instruction: Box::new(i),
                }),
                Parsed::From(_) => return Err("FROM isn't allowed as an ONBUILD trigger".into()),
            }
        }
        _ => return Err(format!("unknown instruction: {cmd}")),
    };
    Ok(Parsed::Instruction(i))
}

/// ENV and LABEL: `k=v k2="v 2"`, or the legacy `k rest of the line`.
fn key_values(instr: &str, rest: &str, escape: char) -> Result<Vec<KeyValue>, String> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Err(at_least_one(instr));
    };
    let mut out = Vec::new();
    if !first.contains('=') {
        let Some((key, value)) = rest.split_once(is_blank) else {
            return Err(format!("{instr} must have two arguments"));
        };
        out.push(KeyValue {
            key: key.to_string(),
            value: value.trim_start_matches(is_blank).to_string(),
            legacy: true,
        });
    } else {
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(format!(
                    "{instr}: syntax error - can't find = in {word:?}. Must be of the form: \
                     name=value"
                ));
            };
            out.push(KeyValue {
                key: key.to_string(),
                value: value.to_string(),
                legacy: false,
            });
        }
    }
    if out.iter().any(|kv| kv.key.is_empty()) {
        return Err(format!("{instr} names can not be blank"));
    }
    Ok(out)
}

fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0b' | '\x0c' | '\r')
}

fn healthcheck(flags: &[String], rest: &str) -> Result<Healthcheck, String> {
    const H: &str = "HEALTHCHECK";
    if rest.is_empty() {
        return Err(at_least_one(H));
    }
    let (typ, cmd) = match rest.split_once(char::is_whitespace) {
        Some((t, c)) => (t, c.trim_start()),
        None => (rest, ""),
    };
    match typ.to_ascii_uppercase().as_str() {
        "NONE" => {
            no_flags(H, flags)?;
            if !cmd.is_empty() {
                return Err("HEALTHCHECK NONE takes no arguments".into());
            }
            Ok(Healthcheck::None)
        }
        "CMD" => {
            let f = Flags::parse(
                H,
                flags,
                &[
                    ("interval", Kind::Str),
                    ("timeout", Kind::Str),
                    ("start-period", Kind::Str),
                    ("start-interval", Kind::Str),
                    ("retries", Kind::Str),
                ],
            )?;
            let command = match command_line(H, cmd)? {
                Some(CommandLine::Exec(v)) if v.is_empty() => None,
                c => c,
            }
            .ok_or("Missing command after HEALTHCHECK CMD")?;
            let interval = |name: &str| -> Result<Duration, String> {
                match f.str(name) {
                    None => Ok(Duration::ZERO),
                    Some(v) => health_interval(name, &v),
                }
            };
            let retries = match f.str("retries") {
                None => 0,
                Some(v) => match v.parse::<i64>() {
                    Ok(n) if n < 0 => {
                        return Err(format!("HEALTHCHECK: --retries cannot be negative ({n})"));
                    }
                    Ok(n) if n <= i64::from(i32::MAX) => n as u32,
                    _ => return Err(format!("HEALTHCHECK: invalid --retries value {v:?}")),
                },
            };
            Ok(Healthcheck::Check(HealthConfig {
                command,
                interval: interval("interval")?,
                timeout: interval("timeout")?,
                start_period: interval("start-period")?,
                start_interval: interval("start-interval")?,
                retries,
            }))
        }
        _ => Err(format!(
            "Unknown type {:?} in HEALTHCHECK (try CMD)",
            typ.to_ascii_uppercase()
        )),
    }
}

/// A HEALTHCHECK duration: Go syntax (`1m30s`, `1.5h`, `250ms`), zero meaning "not set",
/// otherwise at least 1ms.
fn health_interval(name: &str, v: &str) -> Result<Duration, String> {
    let nanos = go_duration(v).map_err(|e| format!("HEALTHCHECK: --{name}: {e}"))?;
    if nanos == 0 {
        return Ok(Duration::ZERO);
    }
    if nanos < 1_000_000 {
        return Err(format!(
            "HEALTHCHECK: Interval {name:?} cannot be less than 1ms"
        ));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Go's `time.ParseDuration`, in nanoseconds.
fn go_duration(orig: &str) -> Result<i128, String> {
    let invalid = || format!("time: invalid duration {orig:?}");
    let (neg, mut s) = match orig.as_bytes().first() {
        Some(b'-') => (true, &orig[1..]),
        Some(b'+') => (false, &orig[1..]),
        _ => (false, orig),
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = s.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("time: missing unit in duration {orig:?}")),
            u => return Err(format!("time: unknown unit {u:?} in duration {orig:?}")),
        };
        // Digits beyond what fits are an overflow, as in Go.
        let whole: i128 = if int.is_empty() {
            0
        } else if int.len() > 20 {
            return Err(invalid());
        } else {
            int.parse().map_err(|_| invalid())?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(invalid)?;
        let mut f_scale = scale;
        for d in frac.bytes().take(30) {
            f_scale /= 10;
            part += i128::from(d - b'0') * f_scale;
        }
        total += part;
        if total > i128::from(i64::MAX) {
            return Err(invalid());
        }
        s = next;
    }
    Ok(if neg { -total } else { total })
}

/// Split a `--mount` value into CSV fields (Go's encoding/csv rules: `"` quotes a whole field,
/// `""` inside quotes is a quote, a bare `"` elsewhere is an error).
fn parse_mount(spec: &str) -> Result<Mount, String> {
    let mut fields = Vec::new();
    if !spec.is_empty() {
        let mut chars = spec.chars().peekable();
        loop {
            let mut field = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err("extraneous or missing \" in quoted-field".into()),
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => field.push(c),
                    }
                }
                if !matches!(chars.peek(), None | Some(',')) {
                    return Err("extraneous or missing \" in quoted-field".into());
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    if c == '"' {
                        return Err("bare \" in non-quoted-field".into());
                    }
                    field.push(c);
                    chars.next();
                }
            }
            fields.push(field);
            if chars.next().is_none() {
                break;
            }
        }
    }
    let mut out = Vec::with_capacity(fields.len());
    for field in fields {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_lowercase(), Some(v.to_string())),
            None => (field.to_lowercase(), None),
        };
        let dollar_inside = |v: &String| v.find('$').is_some_and(|i| i + 1 != v.len());
        if key == "from" && value.as_ref().is_some_and(dollar_inside) {
            return Err(
                "'from' doesn't support variable expansion, define alias stage instead".into(),
            );
        }
        out.push(MountField { key, value });
    }
    Ok(Mount { fields: out })
}

/// The most ports one EXPOSE may produce (ranges multiply).
const MAX_PORTS: usize = 1 << 20;

/// Turn expanded EXPOSE words (`80`, `80/udp`, `8000-8010/tcp`, even Docker's tolerated
/// `ip:host:container/proto`) into the image config's `port/proto` keys, as BuildKit does.
pub fn exposed_ports(words: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for raw in words {
        let bad = |why: &str| format!("EXPOSE: invalid port {raw:?}: {why}");
        let parts: Vec<&str> = raw.split(':').collect();
        let (host_port, container) = match parts.as_slice() {
            [c] => (None, *c),
            [.., h, c] => (Some(*h), *c),
            [] => (None, ""),
        };
        let (port, proto) = container.split_once('/').unwrap_or((container, ""));
        if port.is_empty() {
            return Err(bad("no port specified"));
        }
        let proto = match proto.to_ascii_lowercase().as_str() {
            "" => "tcp".to_string(),
            p @ ("tcp" | "udp" | "sctp") => p.to_string(),
            _ => return Err(bad(&format!("invalid proto: {proto}"))),
        };
        let (start, end) = port_range(port).map_err(|e| bad(&e))?;
        if let Some(h) = host_port.filter(|h| !h.is_empty()) {
            let (hs, he) = port_range(h).map_err(|e| bad(&e))?;
            if he - hs != end - start && end != start {
                return Err(bad("the host and container ranges differ"));
            }
        }
        if out.len() + usize::from(end - start) + 1 > MAX_PORTS {
            return Err("EXPOSE: too many ports".into());
        }
        out.extend((start..=end).map(|p| format!("{p}/{proto}")));
    }
    Ok(out)
}

fn port_range(s: &str) -> Result<(u16, u16), String> {
    let num = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port number (0-65535)"))
    };
    match s.split_once('-') {
        None => num(s).map(|p| (p, p)),
        Some((a, b)) if a == b => num(a).map(|p| (p, p)),
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if b < a {
                return Err(format!("invalid port range: {s}"));
            }
            Ok((a, b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> String {
        v.to_string()
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|i| i.to_string()).collect()
    }

    fn sh(c: &str) -> CommandLine {
        CommandLine::Shell(s(c))
    }

    fn exec(items: &[&str]) -> CommandLine {
        CommandLine::Exec(v(items))
    }

    fn kv(k: &str, val: &str, legacy: bool) -> KeyValue {
        KeyValue {
            key: s(k),
            value: s(val),
            legacy,
        }
    }

    fn run(command: CommandLine) -> Instruction {
        Instruction::Run(Run {
            command,
            ..Default::default()
        })
    }

    fn copy(sources: Vec<String>, dest: String) -> Instruction {
        Instruction::Copy(Copy {
            sources,
            dest,
            ..Default::default()
        })
    }

    fn instr(text: &str) -> Result<Instruction, String> {
        match parse_instruction(text, '\\')? {
            Parsed::Instruction(i) => Ok(i),
            Parsed::From(f) => Err(format!("unexpected FROM {f:?}")),
        }
    }

    fn mount(fields: &[(&str, Option<&str>)]) -> Mount {
        Mount {
            fields: fields
                .iter()
                .map(|(k, v)| MountField {
                    key: s(k),
                    value: v.map(s),
                })
                .collect(),
        }
    }

    /// Each instruction in each of its forms, next to its parse.
    #[test]
    fn instruction_table() {
        let cases: Vec<(&str, Instruction)> = vec![
            ("RUN echo hi", run(sh("echo hi"))),
            ("run  echo   hi ", run(sh("echo   hi"))),
            ("RUN [\"ls\", \"-la\"]", run(exec(&["ls", "-la"]))),
            ("RUN [\"echo\", \"'1234'\"]", run(exec(&["echo", "'1234'"]))),
            ("RUN ['a', 'b']", run(sh("['a', 'b']"))),
            (
                "RUN --network=none --security=insecure --mount=type=cache,target=/root/.cache,ro --mount=type=secret,id=x \"--device=a b\" make",
                Instruction::Run(Run {
                    command: sh("\"--device=a b\" make"),
                    mounts: vec![
                        mount(&[
                            ("type", Some("cache")),
                            ("target", Some("/root/.cache")),
                            ("ro", None),
                        ]),
                        mount(&[("type", Some("secret")), ("id", Some("x"))]),
                    ],
                    network: Some(s("none")),
                    security: Some(s("insecure")),
                    devices: vec![],
                }),
            ),
            (
                "RUN --device=nvidia.com/gpu=all --mount=type=bind,\\\"source=a,b\\\" x",
                Instruction::Run(Run {
                    command: sh("x"),
                    mounts: vec![mount(&[("type", Some("bind")), ("source", Some("a,b"))])],
                    devices: v(&["nvidia.com/gpu=all"]),
                    ..Default::default()
                }),
            ),
            ("CMD [\"a\", \"b\"]", Instruction::Cmd(exec(&["a", "b"]))),
            ("CMD []", Instruction::Cmd(exec(&[]))),
            ("CMD [\"\"]", Instruction::Cmd(exec(&[""]))),
            (
                "CMD echo 'test' | wc -",
                Instruction::Cmd(sh("echo 'test' | wc -")),
            ),
            (
                "CMD '[\"echo\", \"JSON in a string\"]'",
                Instruction::Cmd(sh("'[\"echo\", \"JSON in a string\"]'")),
            ),
            (
                "CMD [\"echo\", \"unterminated\"",
                Instruction::Cmd(sh("[\"echo\", \"unterminated\"")),
            ),
            (
                "ENTRYPOINT /usr/sbin/nginx -g 'daemon off;'",
                Instruction::Entrypoint(sh("/usr/sbin/nginx -g 'daemon off;'")),
            ),
            (
                "entrypoint [\"/bin/tini\", \"--\"]",
                Instruction::Entrypoint(exec(&["/bin/tini", "--"])),
            ),
            ("ENTRYPOINT []", Instruction::Entrypoint(exec(&[]))),
            (
                "SHELL [\"powershell\", \"-command\"]",
                Instruction::Shell(v(&["powershell", "-command"])),
            ),
            ("COPY . /app", copy(v(&["."]), s("/app"))),
            ("COPY\t.\t/go/src", copy(v(&["."]), s("/go/src"))),
            ("COPY a b c /dst/", copy(v(&["a", "b", "c"]), s("/dst/"))),
            (
                "COPY [\"test file\", \"/tmp/a b\"]",
                Instruction::Copy(Copy {
                    sources: v(&["test file"]),
                    dest: s("/tmp/a b"),
                    json: true,
                    ..Default::default()
                }),
            ),
            ("COPY \"a b\" /c", copy(v(&["\"a", "b\""]), s("/c"))),
            (
                "COPY --from=build --chown=app:app --chmod=0755 --link --parents --exclude=*.md --exclude=x /out/bin /usr/bin/",
                Instruction::Copy(Copy {
                    sources: v(&["/out/bin"]),
                    dest: s("/usr/bin/"),
                    from: Some(s("build")),
                    chown: Some(s("app:app")),
                    chmod: Some(s("0755")),
                    link: true,
                    parents: true,
                    excludes: v(&["*.md", "x"]),
                    json: false,
                }),
            ),
            ("COPY --link=false a b", copy(v(&["a"]), s("b"))),
            (
                "COPY --link=TRUE a b",
                Instruction::Copy(Copy {
                    sources: v(&["a"]),
                    dest: s("b"),
                    link: true,
                    ..Default::default()
                }),
            ),
            (
                "COPY --from=0 a b",
                Instruction::Copy(Copy {
                    sources: v(&["a"]),
                    dest: s("b"),
                    from: Some(s("0")),
                    ..Default::default()
                }),
            ),
            (
                "ADD --chown=1:2 --checksum=sha256:abc --keep-git-dir --unpack=false https://x/y.tgz /",
                Instruction::Add(Add {
                    sources: v(&["https://x/y.tgz"]),
                    dest: s("/"),
                    chown: Some(s("1:2")),
                    checksum: Some(s("sha256:abc")),
                    keep_git_dir: Some(true),
                    unpack: Some(false),
                    ..Default::default()
                }),
            ),
            (
                "ADD [ \"vimrc\", \"/tmp\" ]",
                Instruction::Add(Add {
                    sources: v(&["vimrc"]),
                    dest: s("/tmp"),
                    json: true,
                    ..Default::default()
                }),
            ),
            (
                "ENV name value",
                Instruction::Env(vec![kv("name", "value", true)]),
            ),
            (
                "ENV SCUBA 1 DUBA 3",
                Instruction::Env(vec![kv("SCUBA", "1 DUBA 3", true)]),
            ),
            (
                "ENV SCUBA \"1 DUBA 3\"",
                Instruction::Env(vec![kv("SCUBA", "\"1 DUBA 3\"", true)]),
            ),
            (
                "ENV name=value",
                Instruction::Env(vec![kv("name", "value", false)]),
            ),
            (
                "ENV name=value name2=value2",
                Instruction::Env(vec![
                    kv("name", "value", false),
                    kv("name2", "value2", false),
                ]),
            ),
            (
                "ENV name=\"value value1\"",
                Instruction::Env(vec![kv("name", "\"value value1\"", false)]),
            ),
            (
                "ENV name=value\\ value2",
                Instruction::Env(vec![kv("name", "value\\ value2", false)]),
            ),
            (
                "ENV name='a\\'b''",
                Instruction::Env(vec![kv("name", "'a\\'b''", false)]),
            ),
            (
                "ENV a= b=\"\"",
                Instruction::Env(vec![kv("a", "", false), kv("b", "\"\"", false)]),
            ),
            ("ENV a=b=c", Instruction::Env(vec![kv("a", "b=c", false)])),
            (
                "LABEL maintainer docker <docker@docker.io>",
                Instruction::Label(vec![kv("maintainer", "docker <docker@docker.io>", true)]),
            ),
            (
                "LABEL \"com.example.vendor\"=\"ACME\" version=1.0",
                Instruction::Label(vec![
                    kv("\"com.example.vendor\"", "\"ACME\"", false),
                    kv("version", "1.0", false),
                ]),
            ),
            (
                "ARG foo bar=baz",
                Instruction::Arg(Arg {
                    defs: vec![
                        ArgDef {
                            name: s("foo"),
                            default: None,
                        },
                        ArgDef {
                            name: s("bar"),
                            default: Some(s("baz")),
                        },
                    ],
                }),
            ),
            (
                "ARG abc=\"123 456\" def",
                Instruction::Arg(Arg {
                    defs: vec![
                        ArgDef {
                            name: s("abc"),
                            default: Some(s("\"123 456\"")),
                        },
                        ArgDef {
                            name: s("def"),
                            default: None,
                        },
                    ],
                }),
            ),
            (
                "ARG empty=",
                Instruction::Arg(Arg {
                    defs: vec![ArgDef {
                        name: s("empty"),
                        default: Some(s("")),
                    }],
                }),
            ),
            ("WORKDIR /a b", Instruction::Workdir(s("/a b"))),
            ("USER docker:root", Instruction::User(s("docker:root"))),
            (
                "EXPOSE 9000 5000/udp  6000",
                Instruction::Expose(v(&["9000", "5000/udp", "6000"])),
            ),
            (
                "VOLUME [\"/test\", \"/test2\"]",
                Instruction::Volume(v(&["/test", "/test2"])),
            ),
            (
                "VOLUME /test3 /test4",
                Instruction::Volume(v(&["/test3", "/test4"])),
            ),
            ("VOLUME [\" /x \"]", Instruction::Volume(v(&["/x"]))),
            ("STOPSIGNAL SIGKILL", Instruction::StopSignal(s("SIGKILL"))),
            (
                "MAINTAINER Erik \\\\Hollensbe <erik@hollensbe.org>\\\"",
                Instruction::Maintainer(s("Erik \\\\Hollensbe <erik@hollensbe.org>\\\"")),
            ),
            (
                "HEALTHCHECK NONE",
                Instruction::Healthcheck(Healthcheck::None),
            ),
            (
                "healthcheck none",
                Instruction::Healthcheck(Healthcheck::None),
            ),
            (
                "HEALTHCHECK --interval=5s --timeout=3s --retries=3 CMD /app/check.sh --quiet",
                Instruction::Healthcheck(Healthcheck::Check(HealthConfig {
                    command: sh("/app/check.sh --quiet"),
                    interval: Duration::from_secs(5),
                    timeout: Duration::from_secs(3),
                    retries: 3,
                    ..Default::default()
                })),
            ),
            (
                "HEALTHCHECK   CMD   a b",
                Instruction::Healthcheck(Healthcheck::Check(HealthConfig {
                    command: sh("a b"),
                    ..Default::default()
                })),
            ),
            (
                "HEALTHCHECK --start-period=1m30s --start-interval=1.5s --interval=0s --timeout=0s --retries=0 cmd [\"foo\"]",
                Instruction::Healthcheck(Healthcheck::Check(HealthConfig {
                    command: exec(&["foo"]),
                    start_period: Duration::from_secs(90),
                    start_interval: Duration::from_millis(1500),
                    ..Default::default()
                })),
            ),
            (
                "ONBUILD RUN [\"echo\", \"test\"]",
                Instruction::Onbuild(Onbuild {
                    expression: s("RUN [\"echo\", \"test\"]"),
                    instruction: Box::new(run(exec(&["echo", "test"]))),
                }),
            ),
            (
                "onbuild  copy --from=x . /",
                Instruction::Onbuild(Onbuild {
                    expression: s("copy --from=x . /"),
                    instruction: Box::new(Instruction::Copy(Copy {
                        sources: v(&["."]),
                        dest: s("/"),
                        from: Some(s("x")),
                        ..Default::default()
                    })),
                }),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(instr(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn from_table() {
        let f = |image: &str, platform: Option<&str>, name: Option<&str>| {
            Ok(Parsed::From(FromInstruction {
                image: s(image),
                platform: platform.map(s),
                name: name.map(s),
            }))
        };
        let cases: Vec<(&str, Result<Parsed, String>)> = vec![
            ("FROM ubuntu:14.04", f("ubuntu:14.04", None, None)),
            ("from\tbusybox", f("busybox", None, None)),
            (
                "FROM golang:1.22 AS Build-1.x_y",
                f("golang:1.22", None, Some("build-1.x_y")),
            ),
            ("FROM a as b", f("a", None, Some("b"))),
            (
                "FROM --platform=$BUILDPLATFORM ${IMG:-alpine} AS b",
                f("${IMG:-alpine}", Some("$BUILDPLATFORM"), Some("b")),
            ),
            (
                "FROM",
                Err(s("FROM requires either one or three arguments")),
            ),
            (
                "FROM a b",
                Err(s("FROM requires either one or three arguments")),
            ),
            (
                "FROM a AS b c",
                Err(s("FROM requires either one or three arguments")),
            ),
            (
                "FROM a IS b",
                Err(s("FROM requires either one or three arguments")),
            ),
            (
                "FROM a AS 1st",
                Err(s(
                    "invalid name for build stage: \"1st\", name can't start with a number or contain symbols",
                )),
            ),
            (
                "FROM a AS b/c",
                Err(s(
                    "invalid name for build stage: \"b/c\", name can't start with a number or contain symbols",
                )),
            ),
            (
                "FROM --plaform=x a",
                Err(s("FROM: unknown flag: --plaform")),
            ),
            (
                "FROM --platform a",
                Err(s("FROM: missing a value on flag: --platform")),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_instruction(text, '\\'), want, "{text}");
        }
    }

    #[test]
    fn error_table() {
        let cases: &[(&str, &str)] = &[
            ("FOO bar", "unknown instruction: FOO"),
            ("foo bar", "unknown instruction: foo"),
            ("RUN", "RUN requires at least one argument"),
            ("RUN []", "RUN requires at least one argument"),
            (
                "RUN --network=bridge x",
                "RUN: invalid network mode \"bridge\"",
            ),
            (
                "RUN --security=root x",
                "RUN: security \"root\" is not valid",
            ),
            (
                "RUN --network=host --network=none x",
                "RUN: duplicate flag specified: --network",
            ),
            ("RUN --frobnicate x", "RUN: unknown flag: --frobnicate"),
            (
                "RUN --mount=from=$X,target=/t x",
                "RUN: --mount=from=$X,target=/t: 'from' doesn't support variable expansion, define alias stage instead",
            ),
            (
                "RUN --mount=type=bind,src=\\\"a\\\" x",
                "RUN: --mount=type=bind,src=\"a\": bare \" in non-quoted-field",
            ),
            (
                "RUN [\"a\", 1]",
                "RUN: when using JSON array syntax, arrays must be comprised of strings only",
            ),
            (
                "CMD [ \"echo\", [ \"nested json\" ] ]",
                "CMD: when using JSON array syntax, arrays must be comprised of strings only",
            ),
            ("RUN cat <<EOF", "RUN: heredocs (<<EOF) are not supported"),
            ("COPY <<EOF /x", "COPY: heredocs (<<EOF) are not supported"),
            ("CMD", "CMD requires at least one argument"),
            ("CMD --doit [ \"a\" ]", "CMD: unknown flag: --doit"),
            ("ENTRYPOINT", "ENTRYPOINT requires at least one argument"),
            ("SHELL", "SHELL requires at least one argument"),
            ("SHELL []", "SHELL requires at least one argument"),
            (
                "SHELL powershell -command",
                "SHELL requires the arguments to be in JSON form",
            ),
            (
                "COPY",
                "COPY requires at least two arguments (sources and a destination), 0 given",
            ),
            (
                "COPY a",
                "COPY requires at least two arguments (sources and a destination), 1 given",
            ),
            (
                "ADD [\"a\"]",
                "ADD requires at least two arguments (sources and a destination), 1 given",
            ),
            (
                "COPY --from=$X a b",
                "COPY: --from does not support variable expansion; define a stage with FROM using a global ARG instead",
            ),
            ("ADD --from=x a b", "ADD: unknown flag: --from"),
            ("COPY --chown a b", "COPY: missing a value on flag: --chown"),
            ("COPY --link= a b", "COPY: missing a value on flag: --link"),
            (
                "COPY --link=yes a b",
                "COPY: expecting boolean value for flag --link, not: yes",
            ),
            ("ENV", "ENV requires at least one argument"),
            ("ENV name", "ENV must have two arguments"),
            (
                "ENV a=b c",
                "ENV: syntax error - can't find = in \"c\". Must be of the form: name=value",
            ),
            ("ENV =x", "ENV names can not be blank"),
            ("LABEL", "LABEL requires at least one argument"),
            ("LABEL =x", "LABEL names can not be blank"),
            ("ARG", "ARG requires at least one argument"),
            ("ARG =x", "ARG names can not be blank"),
            ("WORKDIR", "WORKDIR requires exactly one argument"),
            ("USER", "USER requires exactly one argument"),
            ("STOPSIGNAL", "STOPSIGNAL requires exactly one argument"),
            ("MAINTAINER", "MAINTAINER requires exactly one argument"),
            (
                "MAINTAINER --boo joe@example.com",
                "MAINTAINER: unknown flag: --boo",
            ),
            ("EXPOSE", "EXPOSE requires at least one argument"),
            ("VOLUME", "VOLUME requires at least one argument"),
            ("VOLUME []", "VOLUME requires at least one argument"),
            (
                "VOLUME [\"/a\", \"\"]",
                "VOLUME specified can not be an empty string",
            ),
            ("HEALTHCHECK", "HEALTHCHECK requires at least one argument"),
            ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
            (
                "HEALTHCHECK CMD []",
                "Missing command after HEALTHCHECK CMD",
            ),
            ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
            (
                "HEALTHCHECK CONNECT TCP 7000",
                "Unknown type \"CONNECT\" in HEALTHCHECK (try CMD)",
            ),
            (
                "HEALTHCHECK --interval=50ns CMD x",
                "HEALTHCHECK: Interval \"interval\" cannot be less than 1ms",
            ),
            (
                "HEALTHCHECK --timeout=-1s CMD x",
                "HEALTHCHECK: Interval \"timeout\" cannot be less than 1ms",
            ),
            (
                "HEALTHCHECK --interval=5 CMD x",
                "HEALTHCHECK: --interval: time: missing unit in duration \"5\"",
            ),
            (
                "HEALTHCHECK --interval=5d CMD x",
                "HEALTHCHECK: --interval: time: unknown unit \"d\" in duration \"5d\"",
            ),
            (
                "HEALTHCHECK --interval=abc CMD x",
                "HEALTHCHECK: --interval: time: invalid duration \"abc\"",
            ),
            (
                "HEALTHCHECK --retries=-1 CMD x",
                "HEALTHCHECK: --retries cannot be negative (-1)",
            ),
            (
                "HEALTHCHECK --retries=3x CMD x",
                "HEALTHCHECK: invalid --retries value \"3x\"",
            ),
            (
                "HEALTHCHECK --retries=9999999999 CMD x",
                "HEALTHCHECK: invalid --retries value \"9999999999\"",
            ),
            (
                "HEALTHCHECK --frequency=1s CMD x",
                "HEALTHCHECK: unknown flag: --frequency",
            ),
            ("ONBUILD", "ONBUILD requires at least one argument"),
            (
                "ONBUILD ONBUILD RUN touch foobar",
                "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
            ),
            (
                "ONBUILD FROM scratch",
                "FROM isn't allowed as an ONBUILD trigger",
            ),
            (
                "ONBUILD maintainer me",
                "MAINTAINER isn't allowed as an ONBUILD trigger",
            ),
            (
                "ONBUILD COPY a",
                "ONBUILD: COPY requires at least two arguments (sources and a destination), 1 given",
            ),
            ("ONBUILD FROB x", "ONBUILD: unknown instruction: FROB"),
        ];
        for (text, want) in cases {
            assert_eq!(instr(text), Err(s(want)), "{text}");
        }
    }

    #[test]
    fn go_durations() {
        let ok: &[(&str, i128)] = &[
            ("0", 0),
            ("5s", 5_000_000_000),
            ("1.5h", 5_400_000_000_000),
            ("1h2m3s4ms5us6ns", 3_723_004_005_006),
            (".5s", 500_000_000),
            ("2.s", 2_000_000_000),
            ("100\u{b5}s", 100_000),
            ("100\u{3bc}s", 100_000),
            ("-1m", -60_000_000_000),
            ("+3ms", 3_000_000),
        ];
        for (input, want) in ok {
            assert_eq!(go_duration(input), Ok(*want), "{input}");
        }
        for bad in [
            "",
            "-",
            "s",
            ".s",
            "1",
            "1x",
            "1.2.3s",
            "9999999999999999999999h",
            "3000000h",
        ] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
    }

    /// Expansion touches exactly the fields Docker expands.
    #[test]
    fn expansion_applies_where_docker_does() {
        let vars = |k: &str| match k {
            "X" => Some(s("ex")),
            "P" => Some(s("80 443/udp")),
            _ => None,
        };
        let cases: &[(&str, Instruction)] = &[
            ("RUN echo $X", instr("RUN echo $X").unwrap()),
            ("CMD [\"$X\"]", instr("CMD [\"$X\"]").unwrap()),
            ("ENTRYPOINT $X", instr("ENTRYPOINT $X").unwrap()),
            ("SHELL [\"$X\"]", instr("SHELL [\"$X\"]").unwrap()),
            ("MAINTAINER $X", instr("MAINTAINER $X").unwrap()),
            ("HEALTHCHECK CMD $X", instr("HEALTHCHECK CMD $X").unwrap()),
            ("ONBUILD WORKDIR $X", instr("ONBUILD WORKDIR $X").unwrap()),
            (
                "RUN --mount=type=cache,target=/c/$X,ro echo $X",
                Instruction::Run(Run {
                    command: sh("echo $X"),
                    mounts: vec![mount(&[
                        ("type", Some("cache")),
                        ("target", Some("/c/ex")),
                        ("ro", None),
                    ])],
                    ..Default::default()
                }),
            ),
            (
                "COPY --from=a --chown=$X --chmod=${M:-644} $X '${X}' /d/$X",
                Instruction::Copy(Copy {
                    sources: v(&["ex", "${X}"]),
                    dest: s("/d/ex"),
                    from: Some(s("a")),
                    chown: Some(s("ex")),
                    chmod: Some(s("644")),
                    ..Default::default()
                }),
            ),
            (
                "COPY [\"$X\", \"a b\", \"/d/${X}\"]",
                Instruction::Copy(Copy {
                    sources: v(&["ex", "a b"]),
                    dest: s("/d/ex"),
                    json: true,
                    ..Default::default()
                }),
            ),
            (
                "ADD --checksum=$X --chown=$X $X /",
                Instruction::Add(Add {
                    sources: v(&["ex"]),
                    dest: s("/"),
                    chown: Some(s("ex")),
                    checksum: Some(s("ex")),
                    ..Default::default()
                }),
            ),
            (
                "ENV $X=\"a $X\" b='$X'",
                Instruction::Env(vec![kv("ex", "a ex", false), kv("b", "$X", false)]),
            ),
            (
                "ENV K \"a $X\"  b",
                Instruction::Env(vec![kv("K", "a ex  b", true)]),
            ),
            ("LABEL l=$X", Instruction::Label(vec![kv("l", "ex", false)])),
            (
                "ARG $X=$X",
                Instruction::Arg(Arg {
                    defs: vec![ArgDef {
                        name: s("$X"),
                        default: Some(s("ex")),
                    }],
                }),
            ),
            ("WORKDIR /$X/\\$X", Instruction::Workdir(s("/ex/$X"))),
            ("USER $X:${G:-staff}", Instruction::User(s("ex:staff"))),
            ("STOPSIGNAL SIG$X", Instruction::StopSignal(s("SIGex"))),
            (
                "VOLUME [\"/$X\", \"/b\"]",
                Instruction::Volume(v(&["/ex", "/b"])),
            ),
            (
                "EXPOSE $P 8080",
                Instruction::Expose(v(&["80", "443/udp", "8080"])),
            ),
        ];
        for (text, want) in cases {
            let got = instr(text).unwrap().expand('\\', &vars);
            assert_eq!(got.as_ref(), Ok(want), "{text}");
        }
        // Shell-form COPY splits on blanks before expansion, so a quoted path with a space
        // becomes two words with one quote each, and expanding those is an error, as in Docker:
        let e = instr("COPY \"a b\" /c")
            .unwrap()
            .expand('\\', &vars)
            .unwrap_err();
        assert!(e.message.contains("matching double-quote"), "{e}");
    }

    #[test]
    fn ports() {
        let ok: &[(&[&str], &[&str])] = &[
            (&["80"], &["80/tcp"]),
            (&["80/UDP", "53/sctp"], &["80/udp", "53/sctp"]),
            (&["8000-8002"], &["8000/tcp", "8001/tcp", "8002/tcp"]),
            (&["7-7/udp"], &["7/udp"]),
            (&["127.0.0.1:8080:80"], &["80/tcp"]),
            (&["8080:80"], &["80/tcp"]),
        ];
        for (input, want) in ok {
            assert_eq!(exposed_ports(&v(input)), Ok(v(want)), "{input:?}");
        }
        for bad in [
            "",
            "/tcp",
            "80/http",
            "x",
            "70000",
            "90-80",
            "8000-8001:80-90",
        ] {
            assert!(exposed_ports(&v(&[bad])).is_err(), "{bad}");
        }
        let many = v(&["0-65535"; 20]);
        assert_eq!(exposed_ports(&many), Err(s("EXPOSE: too many ports")));
    }

    #[test]
    fn users_and_mounts() {
        assert_eq!(split_user("app"), ("app", None));
        assert_eq!(split_user("app:staff"), ("app", Some("staff")));
        let m = parse_mount("type=cache,TARGET=/a,target=/b,ro").unwrap();
        assert_eq!(m.get("target"), Some("/b"));
        assert_eq!(m.get("ro"), None);
        assert_eq!(parse_mount("").unwrap(), Mount::default());
        assert_eq!(
            parse_mount("a=1,").unwrap(),
            mount(&[("a", Some("1")), ("", None)])
        );
        assert!(parse_mount("\"a=1\"x").is_err());
        assert!(parse_mount("\"a=1").is_err());
        assert!(parse_mount("from=a$").is_ok());
    }
}
