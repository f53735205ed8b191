//! What each stage refers to, and which stages a build of a target needs, in build order.
//!
//! A stage depends on: its base, when the expanded FROM names an earlier stage (by exact,
//! lower-case name, as BuildKit looks it up); every `COPY --from=` naming a stage (by name,
//! case-insensitively, or by index); every `RUN --mount=...,from=` naming a stage; and the
//! `COPY --from`/`RUN --mount from=` of its base stage's ONBUILD triggers, which run in it.
//! A `--from` that is neither a stage name nor a number is an image reference; `scratch` is the
//! empty image. A `--from` may name a later stage, as BuildKit allows; a cycle is an error.
//! Like BuildKit, every stage's references are checked, not only the target's, so a broken
//! unused stage still fails the build.

use std::collections::BTreeMap;

use super::args::platform_args;
use super::expand::{Lookup, expand_word};
use super::{Dockerfile, Instruction, ParseError};

/// What a FROM or a `--from` refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    /// A stage of this Dockerfile, by index.
    Stage(usize),
    /// `scratch`: the empty filesystem.
    Scratch,
    /// An image reference, to be pulled.
    Image(String),
}

impl Dockerfile {
    /// The stage named `name` (stage names are case-insensitive).
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        let name = name.to_lowercase();
        self.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(name.as_str()))
    }

    /// What `COPY --from=from` refers to: a stage index, a stage name, or an image.
    pub fn resolve_copy_from(&self, from: &str) -> Result<SourceRef, String> {
        if let Ok(i) = from.parse::<i64>() {
            return match usize::try_from(i) {
                Ok(i) if i < self.stages.len() => Ok(SourceRef::Stage(i)),
                _ => Err(format!("invalid stage index {i}")),
            };
        }
        Ok(self.by_name(from))
    }

    /// What `RUN --mount=...,from=from` refers to: a stage name or an image (no indexes).
    pub fn resolve_mount_from(&self, from: &str) -> SourceRef {
        self.by_name(from)
    }

    fn by_name(&self, name: &str) -> SourceRef {
        match self.stage_index(name) {
            Some(i) => SourceRef::Stage(i),
            None if name == "scratch" => SourceRef::Scratch,
            None => SourceRef::Image(name.to_string()),
        }
    }

    /// What stage `stage`'s FROM refers to, its base expanded in the global scope.
    pub fn resolve_base(&self, stage: usize, global: Lookup<'_>) -> Result<SourceRef, ParseError> {
        let Some(st) = self.stages.get(stage) else {
            return Err(ParseError {
                line: 0,
                message: format!("no stage {stage}"),
            });
        };
        let base = st.expanded_base(self.escape, global)?;
        let earlier = self.stages[..stage]
            .iter()
            .position(|s| s.name.as_deref() == Some(base.as_str()));
        Ok(match earlier {
            Some(i) => SourceRef::Stage(i),
            None if base == "scratch" => SourceRef::Scratch,
            None => SourceRef::Image(base),
        })
    }

    /// The global scope FROM lines are expanded in: the predefined platform ARGs for this
    /// host, then the ARGs before the first FROM in order, each taking its value from
    /// `build_args` or else from its default expanded in the scope so far. Build args that no
    /// global ARG declares are left out (only the platform ARGs can be overridden unasked).
    pub fn global_scope(
        &self,
        build_args: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, ParseError> {
        let mut scope: BTreeMap<String, String> = platform_args()
            .into_iter()
            .map(|(k, v)| (k.to_string(), build_args.get(k).cloned().unwrap_or(v)))
            .collect();
        for arg in &self.global_args {
            for def in &arg.value.defs {
                let value = match (build_args.get(&def.name), &def.default) {
                    (Some(v), _) => v.clone(),
                    (None, Some(d)) => expand_word(d, self.escape, &|k| scope.get(k).cloned())
                        .map_err(|e| ParseError {
                            line: arg.line,
                            message: format!("ARG: {e}"),
                        })?,
                    (None, None) => continue,
                };
                scope.insert(def.name.clone(), value);
            }
        }
        Ok(scope)
    }

    /// The stages a build of `target` (a stage name; the last stage if `None`) needs, each
    /// after the stages it needs: the order to build them in. `global` is the global scope
    /// (see [`Dockerfile::global_scope`]), needed to expand FROM lines.
    pub fn stages_needed(
        &self,
        target: Option<&str>,
        global: Lookup<'_>,
    ) -> Result<Vec<usize>, ParseError> {
        let n = self.stages.len();
        let target = match target {
            None => n.checked_sub(1).ok_or_else(|| ParseError {
                line: 0,
                message: "no stages".into(),
            })?,
            Some(t) => self.stage_index(t).ok_or_else(|| ParseError {
                line: 0,
                message: format!("target stage {t:?} could not be found"),
            })?,
        };
        let bases = (0..n)
            .map(|i| self.resolve_base(i, global))
            .collect::<Result<Vec<_>, _>>()?;
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, stage) in self.stages.iter().enumerate() {
            if let SourceRef::Stage(b) = bases[i] {
                deps[i].push(b);
                // The base stage's ONBUILD triggers run at the start of this stage.
                for ins in &self.stages[b].instructions {
                    if let Instruction::Onbuild(o) = &ins.value {
                        self.refs(&o.instruction, ins.line, &mut deps[i])?;
                    }
                }
            }
            for ins in &stage.instructions {
                self.refs(&ins.value, ins.line, &mut deps[i])?;
            }
        }
        for d in &mut deps {
            d.sort_unstable();
            d.dedup();
        }
        let mut state = vec![0; n];
        let mut all = Vec::with_capacity(n);
        for start in 0..n {
            self.walk(start, &deps, &mut state, &mut all)?;
        }
        let mut order = Vec::new();
        self.walk(target, &deps, &mut vec![0; n], &mut order)?;
        Ok(order)
    }

    /// The stages one instruction reads from.
    fn refs(&self, ins: &Instruction, line: usize, out: &mut Vec<usize>) -> Result<(), ParseError> {
        match ins {
            Instruction::Copy(c) => {
                if let Some(from) = &c.from {
                    let r = self.resolve_copy_from(from).map_err(|message| ParseError {
                        line,
                        message: format!("COPY: {message}"),
                    })?;
                    if let SourceRef::Stage(j) = r {
                        out.push(j);
                    }
                }
            }
            Instruction::Run(r) => {
                for m in &r.mounts {
                    if let Some(SourceRef::Stage(j)) =
                        m.get("from").map(|f| self.resolve_mount_from(f))
                    {
                        out.push(j);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Depth-first from `start`, appending each stage after its dependencies; `state` is 0 for
    /// unseen, 1 on the current path, 2 done. Iterative: a chain of 10,000 stages must not
    /// overflow the stack.
    fn walk(
        &self,
        start: usize,
        deps: &[Vec<usize>],
        state: &mut [u8],
        order: &mut Vec<usize>,
    ) -> Result<(), ParseError> {
        if state[start] != 0 {
            return Ok(());
        }
        state[start] = 1;
        let mut stack = vec![(start, 0usize)];
        while let Some(top) = stack.last_mut() {
            let (v, k) = *top;
            match deps[v].get(k) {
                Some(&w) => {
                    top.1 += 1;
                    match state[w] {
                        0 => {
                            state[w] = 1;
                            stack.push((w, 0));
                        }
                        1 => {
                            let s = &self.stages[w];
                            return Err(ParseError {
                                line: s.line,
                                message: format!(
                                    "circular dependency detected on stage: {}",
                                    s.display_name()
                                ),
                            });
                        }
                        _ => {}
                    }
                }
                None => {
                    state[v] = 2;
                    order.push(v);
                    stack.pop();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    fn needed(text: &str, target: Option<&str>) -> Result<Vec<usize>, String> {
        let df = parse(text.as_bytes()).map_err(|e| e.to_string())?;
        let scope = df
            .global_scope(&BTreeMap::new())
            .map_err(|e| e.to_string())?;
        df.stages_needed(target, &|k| scope.get(k).cloned())
            .map_err(|e| e.to_string())
    }

    /// Dockerfile, target, the stages built in order (or the error).
    #[test]
    fn target_resolution_table() {
        let multi = "FROM alpine AS base\n\
                     FROM base AS deps\nRUN make deps\n\
                     FROM golang AS tools\n\
                     FROM deps AS build\nCOPY --from=tools /go/bin/x /x\n\
                     FROM scratch AS final\nCOPY --from=build /out /\n\
                     FROM base AS test\nRUN --mount=type=bind,from=Tools,target=/t check\n";
        /// Dockerfile, target, stages in build order or the error.
        type Case<'a> = (&'a str, Option<&'a str>, Result<&'a [usize], &'a str>);
        let cases: &[Case] = &[
            ("FROM a\nRUN x\nFROM b\n", None, Ok(&[1])),
            ("FROM a\nFROM b\n", None, Ok(&[1])),
            (multi, None, Ok(&[0, 2, 5])),
            (multi, Some("final"), Ok(&[0, 1, 2, 3, 4])),
            (multi, Some("FINAL"), Ok(&[0, 1, 2, 3, 4])),
            (multi, Some("deps"), Ok(&[0, 1])),
            (multi, Some("test"), Ok(&[0, 2, 5])),
            (
                multi,
                Some("nope"),
                Err("target stage \"nope\" could not be found"),
            ),
            ("FROM a\nFROM b\nCOPY --from=0 / /\n", None, Ok(&[0, 1])),
            ("FROM a\nFROM b\nCOPY --from=+0 / /\n", None, Ok(&[0, 1])),
            (
                "FROM a\nFROM b\nCOPY --from=nginx:latest / /\n",
                None,
                Ok(&[1]),
            ),
            (
                "FROM a\nFROM b\nCOPY --from=2 / /\n",
                None,
                Err("line 3: COPY: invalid stage index 2"),
            ),
            (
                "FROM a\nFROM b\nCOPY --from=-1 / /\n",
                None,
                Err("line 3: COPY: invalid stage index -1"),
            ),
            // A later stage may be copied from; FROM only sees earlier stages.
            (
                "FROM a AS one\nCOPY --from=two / /\nFROM b AS two\n",
                Some("one"),
                Ok(&[1, 0]),
            ),
            ("FROM two AS one\nFROM b AS two\n", Some("one"), Ok(&[0])),
            (
                "FROM a AS x\nCOPY --from=x / /\n",
                None,
                Err("line 1: circular dependency detected on stage: x"),
            ),
            (
                "FROM a AS one\nCOPY --from=two / /\nFROM one AS two\n",
                None,
                Err("line 1: circular dependency detected on stage: one"),
            ),
            // Broken references are errors even in stages the target does not need.
            (
                "FROM a\nCOPY --from=7 / /\nFROM b\n",
                None,
                Err("line 2: COPY: invalid stage index 7"),
            ),
            // FROM lines expand with the global ARGs.
            (
                "ARG B=builder\nFROM a AS builder\nFROM ${B}\n",
                None,
                Ok(&[0, 1]),
            ),
            (
                "ARG B\nFROM a AS builder\nFROM ${B:-builder}\n",
                None,
                Ok(&[0, 1]),
            ),
            ("FROM a AS builder\nFROM Builder\n", None, Ok(&[1])),
            (
                "FROM a AS builder\nFROM $NOPE\n",
                None,
                Err("line 2: FROM: base name ($NOPE) should not be blank"),
            ),
            // ONBUILD triggers of a base stage run in the stage built on it.
            (
                "FROM a AS src\nFROM b AS lib\nONBUILD COPY --from=src / /\nFROM lib\n",
                None,
                Ok(&[0, 1, 2]),
            ),
            (
                "FROM a AS src\nFROM b AS lib\nONBUILD COPY --from=src / /\n",
                Some("lib"),
                Ok(&[1]),
            ),
        ];
        for (text, target, want) in cases {
            let got = needed(text, *target);
            match want {
                Ok(w) => assert_eq!(got, Ok(w.to_vec()), "{text:?} {target:?}"),
                Err(e) => assert_eq!(got, Err(e.to_string()), "{text:?} {target:?}"),
            }
        }
    }

    #[test]
    fn references() {
        let df = parse(b"FROM a AS build\nFROM scratch\nFROM build\n").unwrap();
        assert_eq!(df.resolve_copy_from("build"), Ok(SourceRef::Stage(0)));
        assert_eq!(df.resolve_copy_from("BUILD"), Ok(SourceRef::Stage(0)));
        assert_eq!(df.resolve_copy_from("1"), Ok(SourceRef::Stage(1)));
        assert_eq!(df.resolve_copy_from("scratch"), Ok(SourceRef::Scratch));
        assert_eq!(
            df.resolve_copy_from("alpine:3"),
            Ok(SourceRef::Image("alpine:3".into()))
        );
        assert_eq!(df.resolve_mount_from("0"), SourceRef::Image("0".into()));
        let none = |_: &str| None;
        assert_eq!(df.resolve_base(0, &none), Ok(SourceRef::Image("a".into())));
        assert_eq!(df.resolve_base(1, &none), Ok(SourceRef::Scratch));
        assert_eq!(df.resolve_base(2, &none), Ok(SourceRef::Stage(0)));
        assert_eq!(df.stage_index("Build"), Some(0));
        assert_eq!(df.stages[1].display_name(), "stage-1");
    }

    #[test]
    fn global_scope_rules() {
        let df = parse(
            b"ARG A=1 B C=${A}${B:-x}\nARG A=${A}0 D=$TARGETOS\nARG TARGETARCH\nFROM a\nARG E=e\n",
        )
        .unwrap();
        let none = BTreeMap::new();
        let scope = df.global_scope(&none).unwrap();
        assert_eq!(scope.get("A").map(String::as_str), Some("10"));
        assert_eq!(scope.get("B"), None);
        assert_eq!(scope.get("C").map(String::as_str), Some("1x"));
        assert_eq!(scope.get("D").map(String::as_str), Some("linux"));
        assert_eq!(scope.get("E"), None, "stage ARGs are not global");
        assert!(scope.contains_key("TARGETARCH"));

        let given: BTreeMap<String, String> =
            [("B", "b"), ("A", "9"), ("TARGETOS", "plan9"), ("Z", "z")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let scope = df.global_scope(&given).unwrap();
        assert_eq!(scope.get("A").map(String::as_str), Some("9"));
        assert_eq!(scope.get("C").map(String::as_str), Some("9b"));
        assert_eq!(scope.get("D").map(String::as_str), Some("plan9"));
        assert_eq!(scope.get("Z"), None, "undeclared build args stay out");

        // Blanks split ARG words even inside ${...}, as in Docker: quote them.
        let df = parse(b"ARG A=\"${B:?B is required}\"\nFROM a\n").unwrap();
        let e = df.global_scope(&none).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 1: ARG: failed to process \"\\\"${B:?B is required}\\\"\": B: B is required"
        );
    }

    #[test]
    fn long_chains_do_not_overflow() {
        let mut text = String::from("FROM a AS s0\n");
        for i in 1..10_000 {
            text.push_str(&format!("FROM s{} AS s{i}\n", i - 1));
        }
        let order = needed(&text, None).unwrap();
        assert_eq!(order.len(), 10_000);
        assert_eq!(order.first(), Some(&0));
        assert_eq!(order.last(), Some(&9_999));
    }
}
