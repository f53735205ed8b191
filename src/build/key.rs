//! Cache keys of build steps, and the `created_by` text of their history entries.
//!
//! A step's key is a digest of: the state it starts from ([`super::image::ImageState::
//! state_digest`]: the layers by diffID and the runtime config, so ENV, WORKDIR, USER and SHELL
//! are in it), the instruction after substitution, the platform, and what else reaches the
//! result: for RUN the build args in its environment and its network mode; for COPY/ADD the
//! digest of the selected sources (names, types, contents, link targets, modes after
//! `--chmod`, owners after `--chown`; never mtimes or the context's owners); for COPY --from
//! the state of the stage or image copied from. Nothing about how the context reached us
//! (sizes, times) enters a key.
//!
//! Because a key starts from the parent's *result*, a step that runs again and produces the
//! same layer and config as before leaves every later key unchanged (early cut-off).

use std::collections::BTreeMap;

use super::dockerfile::{CommandLine, Instruction};
use crate::digest::{Digest, Hasher};

/// Bumped when what enters a key changes meaning; old entries then simply miss.
const KEY_VERSION: &[u8] = b"layerfs build step v1\0";

/// Everything a step's key is made of.
#[derive(Clone, Debug, Default)]
pub struct KeyInputs<'a> {
    pub parent_state: Option<&'a Digest>,
    /// The instruction after substitution (see [`instruction_identity`]).
    pub instruction: &'a str,
    pub platform: &'a str,
    /// RUN: build args in its environment, by name.
    pub args: BTreeMap<String, String>,
    /// COPY/ADD: digest of the selected sources.
    pub sources: Option<&'a Digest>,
    /// COPY --from: the state copied from.
    pub from_state: Option<&'a Digest>,
    /// RUN: `none` or `host`.
    pub network: Option<&'a str>,
}

fn field(h: &mut Hasher, tag: &[u8], value: &[u8]) {
    h.update(tag);
    h.update(&(value.len() as u64).to_be_bytes());
    h.update(value);
}

/// The key of a step.
pub fn step_key(k: &KeyInputs<'_>) -> Digest {
    let mut h = Hasher::default();
    h.update(KEY_VERSION);
    field(
        &mut h,
        b"parent",
        k.parent_state
            .map(|d| d.0.to_vec())
            .unwrap_or_default()
            .as_slice(),
    );
    field(&mut h, b"instruction", k.instruction.as_bytes());
    field(&mut h, b"platform", k.platform.as_bytes());
    for (name, value) in &k.args {
        field(&mut h, b"arg", name.as_bytes());
        field(&mut h, b"value", value.as_bytes());
    }
    if let Some(s) = k.sources {
        field(&mut h, b"sources", &s.0);
    }
    if let Some(s) = k.from_state {
        field(&mut h, b"from", &s.0);
    }
    if let Some(n) = k.network {
        field(&mut h, b"network", n.as_bytes());
    }
    h.finish()
}

/// The identity of an expanded instruction for its key: every field the parser produced.
/// Its `Debug` form is used because it covers every field of every instruction by
/// construction (a new flag can never be left out of keys); it changes only with the parser's
/// types, which is a new layerfs version, and then entries miss instead of being wrong.
pub fn instruction_identity(ins: &Instruction) -> String {
    format!("{ins:?}")
}

fn json_words(words: &[String]) -> String {
    serde_json::to_string(words).unwrap_or_default()
}

/// The argv a RUN executes: exec form as is, shell form through the stage's shell.
pub fn run_argv(command: &CommandLine, shell: &[String]) -> Vec<String> {
    match command {
        CommandLine::Exec(words) => words.clone(),
        CommandLine::Shell(line) => {
            let mut argv = shell.to_vec();
            argv.push(line.clone());
            argv
        }
    }
}

/// `created_by` of a history entry, as Docker writes it (`RUN |1 V=2 /bin/sh -c make`,
/// `COPY src /app`, `ENV A=b`, `CMD ["node","server.js"]`).
pub fn created_by(
    ins: &Instruction,
    shell: &[String],
    run_args: &BTreeMap<String, String>,
) -> String {
    match ins {
        Instruction::Run(r) => {
            let mut out = String::from("RUN ");
            if !run_args.is_empty() {
                out.push_str(&format!("|{} ", run_args.len()));
                for (k, v) in run_args {
                    out.push_str(&format!("{k}={v} "));
                }
            }
            out.push_str(&run_argv(&r.command, shell).join(" "));
            out
        }
        Instruction::Cmd(c) => format!("CMD {}", json_words(&run_argv(c, shell))),
        Instruction::Entrypoint(c) => format!("ENTRYPOINT {}", json_words(&run_argv(c, shell))),
        Instruction::Shell(words) => format!("SHELL {}", json_words(words)),
        Instruction::Copy(c) => {
            let mut out = String::from("COPY ");
            if let Some(f) = &c.from {
                out.push_str(&format!("--from={f} "));
            }
            if let Some(o) = &c.chown {
                out.push_str(&format!("--chown={o} "));
            }
            if let Some(m) = &c.chmod {
                out.push_str(&format!("--chmod={m} "));
            }
            out.push_str(&c.sources.join(" "));
            out.push(' ');
            out.push_str(&c.dest);
            out
        }
        Instruction::Add(a) => {
            let mut out = String::from("ADD ");
            if let Some(o) = &a.chown {
                out.push_str(&format!("--chown={o} "));
            }
            if let Some(m) = &a.chmod {
                out.push_str(&format!("--chmod={m} "));
            }
            out.push_str(&a.sources.join(" "));
            out.push(' ');
            out.push_str(&a.dest);
            out
        }
        Instruction::Env(kvs) => format!(
            "ENV {}",
            kvs.iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Instruction::Label(kvs) => format!(
            "LABEL {}",
            kvs.iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Instruction::Arg(a) => format!(
            "ARG {}",
            a.defs
                .iter()
                .map(|d| match &d.default {
                    Some(v) => format!("{}={v}", d.name),
                    None => d.name.clone(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Instruction::Workdir(w) => format!("WORKDIR {w}"),
        Instruction::User(u) => format!("USER {u}"),
        Instruction::Expose(p) => format!("EXPOSE {}", p.join(" ")),
        Instruction::Volume(v) => format!("VOLUME {}", json_words(v)),
        Instruction::StopSignal(s) => format!("STOPSIGNAL {s}"),
        Instruction::Healthcheck(_) => "HEALTHCHECK".to_string(),
        Instruction::Onbuild(o) => format!("ONBUILD {}", o.expression),
        Instruction::Maintainer(m) => format!("MAINTAINER {m}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn keys_change_with_each_input_and_only_then() {
        let parent = d("parent");
        let src = d("sources");
        let from = d("stage");
        let base = KeyInputs {
            parent_state: Some(&parent),
            instruction: "COPY . /app",
            platform: "linux/amd64",
            sources: Some(&src),
            ..KeyInputs::default()
        };
        let k = step_key(&base);
        assert_eq!(k, step_key(&base.clone()), "deterministic");
        let other_parent = d("other");
        let other_src = d("changed");
        let mut args = BTreeMap::new();
        args.insert("V".to_string(), "1".to_string());
        let variants: Vec<(&str, KeyInputs<'_>)> = vec![
            (
                "parent",
                KeyInputs {
                    parent_state: Some(&other_parent),
                    ..base.clone()
                },
            ),
            (
                "no parent",
                KeyInputs {
                    parent_state: None,
                    ..base.clone()
                },
            ),
            (
                "instruction",
                KeyInputs {
                    instruction: "COPY . /srv",
                    ..base.clone()
                },
            ),
            (
                "platform",
                KeyInputs {
                    platform: "linux/arm64",
                    ..base.clone()
                },
            ),
            (
                "sources",
                KeyInputs {
                    sources: Some(&other_src),
                    ..base.clone()
                },
            ),
            (
                "no sources",
                KeyInputs {
                    sources: None,
                    ..base.clone()
                },
            ),
            (
                "from",
                KeyInputs {
                    from_state: Some(&from),
                    ..base.clone()
                },
            ),
            (
                "args",
                KeyInputs {
                    args: args.clone(),
                    ..base.clone()
                },
            ),
            (
                "network",
                KeyInputs {
                    network: Some("host"),
                    ..base.clone()
                },
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        seen.insert(k);
        for (what, v) in variants {
            assert!(seen.insert(step_key(&v)), "{what} did not change the key");
        }
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let p = d("p");
        let a = KeyInputs {
            parent_state: Some(&p),
            instruction: "ab",
            platform: "c",
            ..KeyInputs::default()
        };
        let b = KeyInputs {
            instruction: "a",
            platform: "bc",
            ..a.clone()
        };
        assert_ne!(step_key(&a), step_key(&b));
    }

    #[test]
    fn created_by_as_docker_writes_it() {
        use crate::build::dockerfile::parse;
        let df = parse(
            b"FROM scratch\nRUN make all\nRUN [\"a\",\"b\"]\nCMD node s.js\nCOPY --chown=1:2 a b /d/\nENV A=1 B=2\n",
        )
        .unwrap();
        let sh = vec!["/bin/sh".to_string(), "-c".to_string()];
        let mut args = BTreeMap::new();
        args.insert("V".to_string(), "2".to_string());
        let got: Vec<String> = df.stages[0]
            .instructions
            .iter()
            .map(|i| created_by(&i.value, &sh, &args))
            .collect();
        assert_eq!(
            got,
            [
                "RUN |1 V=2 /bin/sh -c make all",
                "RUN |1 V=2 a b",
                "CMD [\"/bin/sh\",\"-c\",\"node s.js\"]",
                "COPY --chown=1:2 a b /d/",
                "ENV A=1 B=2",
            ]
        );
    }
}
