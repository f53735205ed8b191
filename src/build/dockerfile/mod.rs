//! Containerfile/Dockerfile parsing: bytes in, stages of typed instructions out, following
//! Docker's Dockerfile reference and BuildKit's frontend where the reference is silent.
//!
//! Three layers that do not leak into each other, as in BuildKit:
//!
//! - [`parser`]: lines, parser directives, comments, continuations, CRLF and BOM, and the
//!   word-level helpers (flags, JSON arrays, word splitting);
//! - [`instructions`]: one logical line into a typed [`Instruction`] with its flags checked;
//! - this module: instructions grouped into [`Stage`]s, global ARGs, stage references
//!   ([`stages`]) and the predefined ARGs ([`args`]).
//!
//! [`expand`] is environment replacement, used by the instruction layer and by the builder.
//!
//! Guarantees: [`parse`] never panics and ends in bounded time on any input; every
//! instruction carries the 1-based number of its first line and its joined text; every error
//! names its line (and the instruction where there is one). Limits for hostile input: a
//! logical line of [`MAX_LINE`] bytes, [`MAX_STAGES`] stages, [`MAX_INSTRUCTIONS`]
//! instructions, and [`expand::MAX_EXPANSION`] bytes per expanded word.
//!
//! Where this parser is stricter than Docker, on purpose: heredocs (`RUN <<EOF`) are refused
//! as unsupported rather than misread; instruction text must be valid UTF-8 (comments may hold
//! any bytes); a stage name used twice is an error (BuildKit only warns, and the later stage
//! wins); and the instruction-level cases listed in [`instructions`].
//!
//! ```
//! use layerfs::build::dockerfile::{self, Instruction};
//!
//! let df = dockerfile::parse(b"ARG V=3.20\nFROM alpine:$V AS base\nRUN echo hi\n").unwrap();
//! let scope = df.global_scope(&Default::default()).unwrap();
//! let base = df.stages[0].expanded_base(df.escape, &|k| scope.get(k).cloned()).unwrap();
//! assert_eq!(base, "alpine:3.20");
//! assert!(matches!(df.stages[0].instructions[0].value, Instruction::Run(_)));
//! ```

pub mod args;
pub mod expand;
pub mod instructions;
pub mod parser;
pub mod stages;

use std::collections::HashMap;

pub use expand::{ExpandError, Lookup, expand_word, expand_words};
pub use instructions::{
    Add, Arg, ArgDef, CommandLine, Copy, FromInstruction, HealthConfig, Healthcheck, Instruction,
    KeyValue, Mount, MountField, Onbuild, Run,
};
pub use parser::MAX_LINE;
pub use stages::SourceRef;

use instructions::Parsed;

/// The most stages one Dockerfile may define.
pub const MAX_STAGES: usize = 10_000;

/// The most instructions (FROM included) one Dockerfile may hold.
pub const MAX_INSTRUCTIONS: usize = 100_000;

/// A Dockerfile that failed to parse. `line` is 1-based; 0 means the error concerns the file
/// as a whole (no instructions, an unknown `--target`). Display gives `line N: message`; the
/// caller adds the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", located(.line, .message))]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn located(line: &usize, message: &str) -> String {
    if *line == 0 {
        message.to_string()
    } else {
        format!("line {line}: {message}")
    }
}

/// A value with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    /// 1-based line of the instruction's first line.
    pub line: usize,
    /// The instruction as written, continuations joined: for messages and for the history's
    /// `created_by`.
    pub text: String,
    pub value: T,
}

impl Located<Instruction> {
    /// [`Instruction::expand`], with errors located and naming the instruction.
    pub fn expand(
        &self,
        escape: char,
        lookup: Lookup<'_>,
    ) -> Result<Located<Instruction>, ParseError> {
        let value = self.value.expand(escape, lookup).map_err(|e| ParseError {
            line: self.line,
            message: format!("{}: {e}", self.value.keyword()),
        })?;
        Ok(Located {
            line: self.line,
            text: self.text.clone(),
            value,
        })
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\`, or `` ` `` by `# escape=`).
    pub escape: char,
    /// `# syntax=`, recorded; layerfs always uses its own parser.
    pub syntax: Option<String>,
    /// `# check=`, recorded.
    pub check: Option<String>,
    /// ARGs before the first FROM: the scope FROM lines are expanded in.
    pub global_args: Vec<Located<Arg>>,
    /// At least one.
    pub stages: Vec<Stage>,
}

/// One `FROM` and the instructions up to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Position in [`Dockerfile::stages`]; what `COPY --from=N` refers to.
    pub index: usize,
    /// `AS name`, lower-cased; unique in the file.
    pub name: Option<String>,
    /// The base image or stage, unexpanded (see [`Stage::expanded_base`]).
    pub base: String,
    /// `--platform`, unexpanded.
    pub platform: Option<String>,
    /// Line of the FROM.
    pub line: usize,
    /// Text of the FROM.
    pub text: String,
    pub instructions: Vec<Located<Instruction>>,
}

impl Stage {
    /// The name, or `stage-N` as BuildKit calls unnamed stages.
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("stage-{}", self.index),
        }
    }

    /// The base after replacement with the global scope (see [`Dockerfile::global_scope`]).
    pub fn expanded_base(&self, escape: char, global: Lookup<'_>) -> Result<String, ParseError> {
        let base = expand_word(&self.base, escape, global).map_err(|e| self.error(e))?;
        if base.is_empty() {
            return Err(self.error(format!("base name ({}) should not be blank", self.base)));
        }
        Ok(base)
    }

    /// `--platform` after replacement with the global scope.
    pub fn expanded_platform(
        &self,
        escape: char,
        global: Lookup<'_>,
    ) -> Result<Option<String>, ParseError> {
        let Some(p) = &self.platform else {
            return Ok(None);
        };
        let v = expand_word(p, escape, global).map_err(|e| self.error(e))?;
        if v.is_empty() {
            return Err(self.error(format!("empty platform value from expression {p}")));
        }
        Ok(Some(v))
    }

    fn error(&self, e: impl std::fmt::Display) -> ParseError {
        ParseError {
            line: self.line,
            message: format!("FROM: {e}"),
        }
    }
}

/// Parse a Dockerfile.
pub fn parse(text: &[u8]) -> Result<Dockerfile, ParseError> {
    let lines = parser::logical_lines(text)?;
    if lines.lines.is_empty() {
        return Err(ParseError {
            line: 0,
            message: "file with no instructions".into(),
        });
    }
    if let Some(l) = lines.lines.get(MAX_INSTRUCTIONS) {
        return Err(ParseError {
            line: l.line,
            message: format!("more than {MAX_INSTRUCTIONS} instructions"),
        });
    }
    let escape = lines.directives.escape;
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for l in lines.lines {
        let error = |message: String| ParseError {
            line: l.line,
            message,
        };
        match instructions::parse_instruction(&l.text, escape).map_err(error)? {
            Parsed::From(f) => {
                if stages.len() == MAX_STAGES {
                    return Err(error(format!("more than {MAX_STAGES} stages")));
                }
                if let Some(n) = &f.name {
                    if let Some(&j) = names.get(n) {
                        return Err(error(format!(
                            "duplicate stage name {n:?} (first defined on line {})",
                            stages[j].line
                        )));
                    }
                    names.insert(n.clone(), stages.len());
                }
                stages.push(Stage {
                    index: stages.len(),
                    name: f.name,
                    base: f.image,
                    platform: f.platform,
                    line: l.line,
                    text: l.text,
                    instructions: Vec::new(),
                });
            }
            Parsed::Instruction(Instruction::Arg(a)) if stages.is_empty() => {
                global_args.push(Located {
                    line: l.line,
                    text: l.text,
                    value: a,
                });
            }
            Parsed::Instruction(i) => {
                let Some(stage) = stages.last_mut() else {
                    return Err(error(format!(
                        "{} before the first FROM: only ARG may come before FROM",
                        i.keyword()
                    )));
                };
                stage.instructions.push(Located {
                    line: l.line,
                    text: l.text,
                    value: i,
                });
            }
        }
    }
    if stages.is_empty() {
        return Err(ParseError {
            line: 0,
            message: "dockerfile contains no stages to build (no FROM)".into(),
        });
    }
    Ok(Dockerfile {
        escape,
        syntax: lines.directives.syntax,
        check: lines.directives.check,
        global_args,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn lines_of(df: &Dockerfile) -> Vec<(usize, String)> {
        df.stages
            .iter()
            .flat_map(|s| {
                std::iter::once((s.line, s.text.clone()))
                    .chain(s.instructions.iter().map(|i| (i.line, i.text.clone())))
            })
            .collect()
    }

    #[test]
    fn whole_file() {
        let text = "# syntax=docker/dockerfile:1\n\
                    # escape=\\\n\
                    \n\
                    ARG GO=1.22 \\\n    DEBIAN=bookworm\n\
                    # build stage\n\
                    FROM --platform=$BUILDPLATFORM golang:${GO}-${DEBIAN} AS Build\n\
                    WORKDIR /src\n\
                    COPY go.mod go.sum ./\n\
                    RUN --mount=type=cache,target=/root/go/pkg \\\n    go mod download\n\
                    \n\
                    FROM scratch\n\
                    COPY --from=build /out/app /app\n\
                    ENTRYPOINT [\"/app\"]\n";
        let df = parse(text.as_bytes()).unwrap();
        assert_eq!(df.escape, '\\');
        assert_eq!(df.syntax.as_deref(), Some("docker/dockerfile:1"));
        assert_eq!(df.global_args.len(), 1);
        assert_eq!(df.global_args[0].line, 4);
        assert_eq!(df.global_args[0].text, "ARG GO=1.22     DEBIAN=bookworm");
        assert_eq!(df.stages.len(), 2);
        let s0 = &df.stages[0];
        assert_eq!(
            (s0.index, s0.name.as_deref(), s0.base.as_str()),
            (0, Some("build"), "golang:${GO}-${DEBIAN}")
        );
        assert_eq!(s0.platform.as_deref(), Some("$BUILDPLATFORM"));
        assert_eq!(
            lines_of(&df),
            vec![
                (
                    7,
                    "FROM --platform=$BUILDPLATFORM golang:${GO}-${DEBIAN} AS Build".into()
                ),
                (8, "WORKDIR /src".into()),
                (9, "COPY go.mod go.sum ./".into()),
                (
                    10,
                    "RUN --mount=type=cache,target=/root/go/pkg     go mod download".into()
                ),
                (13, "FROM scratch".into()),
                (14, "COPY --from=build /out/app /app".into()),
                (15, "ENTRYPOINT [\"/app\"]".into()),
            ]
        );
        let scope = df.global_scope(&Default::default()).unwrap();
        let g = |k: &str| scope.get(k).cloned();
        assert_eq!(
            df.stages[0].expanded_base(df.escape, &g).unwrap(),
            "golang:1.22-bookworm"
        );
        assert_eq!(
            df.stages[0].expanded_platform(df.escape, &g).unwrap(),
            Some(args::host_platform().to_string())
        );
    }

    /// The layout of BuildKit's `testfile-line` case: blank lines, comments and blank lines
    /// inside a continuation do not shift the line numbers.
    #[test]
    fn line_numbers_survive_blank_lines() {
        let mut text = String::from("# ESCAPE=\\\n\n\n\nFROM ubuntu\n\n\n# a comment\n\n\n");
        text.push_str("ENV GOPATH \\\n/go\n\n\n\n# comment\n");
        text.push_str("RUN apt-get update \\\n\t&& a \\\n\n\n    && b \\\n");
        for _ in 0..4 {
            text.push_str("\t&& c \\\n\n");
        }
        text.push_str("\t&& d \\\n\t&& e \\\n\t&& f \\\n\t&& g\n\n\n");
        let df = parse(text.as_bytes()).unwrap();
        let lines: Vec<usize> = lines_of(&df).iter().map(|(n, _)| *n).collect();
        assert_eq!(lines, vec![5, 11, 17]);
        assert_eq!(df.stages[0].instructions[0].text, "ENV GOPATH /go");
    }

    #[test]
    fn windows_style_backtick_file() {
        let text = "# escape=`\r\n\r\nFROM mcr.microsoft.com/windows/servercore\r\n\
                    COPY testfile.txt c:\\\r\n\
                    RUN dir c:\\ `\r\n    && echo done\r\n\
                    ENV P=c:\\Program` Files\r\n";
        let df = parse(text.as_bytes()).unwrap();
        assert_eq!(df.escape, '`');
        let ins = &df.stages[0].instructions;
        assert_eq!(ins[0].line, 4);
        assert_eq!(
            ins[0].value,
            Instruction::Copy(Copy {
                sources: vec!["testfile.txt".into()],
                dest: "c:\\".into(),
                ..Default::default()
            })
        );
        assert_eq!(ins[1].line, 5);
        assert_eq!(
            ins[1].value,
            Instruction::Run(Run {
                command: CommandLine::Shell("dir c:\\     && echo done".into()),
                ..Default::default()
            })
        );
        let env = ins[2].expand(df.escape, &|_| None).unwrap();
        assert_eq!(
            env.value,
            Instruction::Env(vec![KeyValue {
                key: "P".into(),
                value: "c:\\Program Files".into(),
                legacy: false,
            }])
        );
    }

    /// Errors name their line and, where there is one, the instruction.
    #[test]
    fn error_lines_table() {
        let cases: &[(&str, &str)] = &[
            ("", "file with no instructions"),
            ("# only a comment\n\n", "file with no instructions"),
            (
                "ARG A\n",
                "dockerfile contains no stages to build (no FROM)",
            ),
            (
                "RUN x\nFROM a",
                "line 1: RUN before the first FROM: only ARG may come before FROM",
            ),
            (
                "ARG A\n# c\nENV B=1\nFROM a",
                "line 3: ENV before the first FROM: only ARG may come before FROM",
            ),
            (
                "FROM a\n\nCOPY x\n",
                "line 3: COPY requires at least two arguments (sources and a destination), 1 given",
            ),
            (
                "FROM a\nRUN a \\\n  b\nFROB c",
                "line 4: unknown instruction: FROB",
            ),
            (
                "FROM a AS x\nFROM b AS X",
                "line 2: duplicate stage name \"x\" (first defined on line 1)",
            ),
            (
                "FROM a\nCOPY\t\n\t\tquux \\\n      bar",
                "line 2: COPY requires at least two arguments (sources and a destination), 0 given",
            ),
            (
                "# escape=`\n# escape=`\nFROM a",
                "line 2: only one escape parser directive can be used",
            ),
            (
                "FROM a\nRUN echo \"\\\n# comment inside\n  ok\"\nUSER",
                "line 5: USER requires exactly one argument",
            ),
            (
                "FROM a\nONBUILD ONBUILD RUN x",
                "line 2: Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text.as_bytes()).unwrap_err();
            assert_eq!(e.to_string(), *want, "{text:?}");
        }
        let df = parse(b"FROM a\nWORKDIR ${X:?set X}\n").unwrap();
        let e = df.stages[0].instructions[0]
            .expand('\\', &|_| None)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: WORKDIR: failed to process \"${X:?set X}\": X: set X"
        );
        let df = parse(b"ARG B\nFROM ${B}\n").unwrap();
        let e = df.stages[0].expanded_base('\\', &|_| None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: FROM: base name (${B}) should not be blank"
        );
    }

    #[test]
    fn onbuild_and_global_args() {
        let df = parse(b"ARG A=1 B\nARG C=${A}2\nFROM x\nARG A\nONBUILD RUN make\n").unwrap();
        let names: Vec<Vec<(String, Option<String>)>> = df
            .global_args
            .iter()
            .map(|a| {
                a.value
                    .defs
                    .iter()
                    .map(|d| (d.name.clone(), d.default.clone()))
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            vec![
                vec![("A".into(), Some("1".into())), ("B".into(), None)],
                vec![("C".into(), Some("${A}2".into()))],
            ]
        );
        assert_eq!(df.stages[0].instructions.len(), 2);
        let Instruction::Onbuild(o) = &df.stages[0].instructions[1].value else {
            panic!("not ONBUILD");
        };
        assert_eq!(o.expression, "RUN make");
    }

    #[test]
    fn limits() {
        let start = Instant::now();
        let many = "FROM a\n".repeat(20_000);
        let e = parse(many.as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "line 10001: more than 10000 stages");

        let many = format!("FROM a\n{}", "USER x\n".repeat(MAX_INSTRUCTIONS));
        let e = parse(many.as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "line {}: more than 100000 instructions",
                MAX_INSTRUCTIONS + 1
            )
        );

        let huge = format!("FROM a\nRUN {}\n", "x".repeat(2 << 20));
        let e = parse(huge.as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "line 2: instruction longer than 1024 KiB");

        let unterminated = format!("FROM a\nWORKDIR \"{}\n", "x ".repeat(100_000));
        let df = parse(unterminated.as_bytes()).unwrap();
        let e = df.stages[0].instructions[0]
            .expand('\\', &|_| None)
            .unwrap_err();
        assert!(e.message.contains("matching double-quote"), "{e}");

        let open = format!("FROM a\nUSER {}\n", "${".repeat(200_000));
        let df = parse(open.as_bytes()).unwrap();
        assert!(
            df.stages[0].instructions[0]
                .expand('\\', &|_| None)
                .is_err()
        );

        // Deeper than serde_json's recursion limit: refused like an array of non-strings.
        let json = format!("FROM a\nCMD {}\n", "[".repeat(500_000));
        let e = parse(json.as_bytes()).unwrap_err();
        assert!(e.message.contains("strings only"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
    }

    /// Random bytes, and random mixes of Dockerfile fragments: never a panic, always quick.
    #[test]
    fn random_input_never_panics() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces: &[&str] = &[
            "FROM ",
            "RUN ",
            "COPY ",
            "ADD ",
            "ENV ",
            "ARG ",
            "LABEL ",
            "ONBUILD ",
            "HEALTHCHECK ",
            "CMD ",
            "SHELL ",
            "EXPOSE ",
            "VOLUME ",
            "USER ",
            "WORKDIR ",
            "AS ",
            "--from=",
            "--mount=",
            "--chown=",
            "--platform=",
            "--interval=",
            "[",
            "]",
            "\"",
            "'",
            "\\",
            "`",
            "$",
            "${",
            "}",
            ":-",
            ":+",
            "?",
            "#",
            "%",
            "/",
            "=",
            ",",
            " ",
            "\t",
            "\n",
            "\r\n",
            "# escape=`\n",
            "<<",
            "EOF",
            "a",
            "0",
            "x y",
            "[\"a\"]",
            "NONE",
            "CMD",
            "\u{feff}",
            "é",
            "\u{a0}",
        ];
        let start = Instant::now();
        for round in 0..3000 {
            let mut text: Vec<u8> = Vec::new();
            let len = (rand() % 64) as usize;
            for _ in 0..len {
                if round % 3 == 0 {
                    text.push(rand() as u8);
                } else {
                    let p = pieces[(rand() % pieces.len() as u64) as usize];
                    text.extend_from_slice(p.as_bytes());
                }
            }
            if let Ok(df) = parse(&text) {
                let lookup = |k: &str| (k.len() % 2 == 0).then(|| k.repeat(3));
                let _ = df.global_scope(&Default::default());
                let _ = df.stages_needed(None, &lookup);
                for s in &df.stages {
                    let _ = s.expanded_base(df.escape, &lookup);
                    for i in &s.instructions {
                        let _ = i.expand(df.escape, &lookup);
                    }
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
    }
}
