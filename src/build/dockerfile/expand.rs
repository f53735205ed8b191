//! Environment replacement in Dockerfile words, with the semantics of BuildKit's shell lexer
//! (`frontend/dockerfile/shell/lex.go`).
//!
//! What a word may contain:
//!
//! - `$NAME` and `${NAME}`; a name is letters, digits and `_`, or a run of digits, or one of
//!   the special parameters `@ * # ? - $ ! 0` (never set in a Dockerfile, so they expand to
//!   nothing unless the lookup knows them). A `$` followed by anything else is literal.
//! - `${NAME:-word}` / `${NAME-word}`: `word` when NAME is unset (or, with `:`, empty);
//!   `${NAME:+word}` / `${NAME+word}`: `word` when NAME is set (and, with `:`, not empty);
//!   `${NAME:?msg}` / `${NAME?msg}`: an error unless NAME is set (and, with `:`, not empty).
//! - `${NAME#pat}`, `${NAME##pat}`, `${NAME%pat}`, `${NAME%%pat}`: remove the shortest/longest
//!   prefix/suffix matching a glob (`*`, `?`, `\` escapes); `${NAME/pat/repl}` and
//!   `${NAME//pat/repl}`: replace the first/every longest leftmost match. Like BuildKit,
//!   `:#`, `:%` and `=` are refused, and `*`/`?` do not match a newline.
//! - The escape character (`\` or the file's `# escape=`) makes the next character literal; a
//!   trailing one is dropped. Inside single quotes everything is literal; inside double quotes
//!   `$` still expands and the escape character only escapes `"`, `$` and itself.
//!
//! [`expand_word`] gives one string (quotes removed, spaces kept); [`expand_words`] also splits
//! on unquoted whitespace, after expansion, as BuildKit's `ProcessWords` does.
//!
//! Guarantees: the result of one call never exceeds [`MAX_EXPANSION`] bytes, `${...}` nests at
//! most [`MAX_NESTING`] deep and glob matching runs in bounded work, so hostile input ends in
//! an error, not a hang or a stack overflow. Known differences from BuildKit: the replacement
//! text of `${NAME//pat/repl}` is literal (Go treats `$1` in it as a regexp group), and a
//! `${...}` with a modifier inside a word split by [`expand_words`] keeps the text before it
//! (BuildKit's shared word buffer loses it).

use std::mem;

/// How a variable is looked up: `None` when it is not set.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The largest result of one expansion, in bytes.
pub const MAX_EXPANSION: usize = 1 << 20;

/// How deeply `${...}` may nest (`${A:-${B:-${C}}}` is 3).
pub const MAX_NESTING: usize = 64;

/// Work allowed for glob matching in one expansion, in pattern states visited: a 1 MiB value
/// against a 16-element pattern, while a hostile pattern fails in tens of milliseconds.
const MATCH_BUDGET: u64 = 1 << 24;

/// An expansion failed: bad syntax, `${NAME?}` on an unset name, or a limit was hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExpandError {
    pub message: String,
}

/// Expand `word` into one string.
pub fn expand_word(word: &str, escape: char, lookup: Lookup<'_>) -> Result<String, ExpandError> {
    run(word, escape, lookup, false).map(|(s, _)| s)
}

/// Expand `word` and split the result into words on unquoted whitespace.
pub fn expand_words(
    word: &str,
    escape: char,
    lookup: Lookup<'_>,
) -> Result<Vec<String>, ExpandError> {
    run(word, escape, lookup, true).map(|(_, w)| w)
}

fn run(
    word: &str,
    escape: char,
    lookup: Lookup<'_>,
    split: bool,
) -> Result<(String, Vec<String>), ExpandError> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        escape,
        lookup,
        depth: 0,
        budget: MATCH_BUDGET,
    };
    let mut words = Words::default();
    match lexer.process(None, false, split.then_some(&mut words)) {
        Ok(s) => Ok((s, words.finish())),
        Err(m) => Err(ExpandError {
            message: format!("failed to process {}: {m}", short(word)),
        }),
    }
}

/// A word quoted for an error message, cut short: the word may be a megabyte long.
fn short(word: &str) -> String {
    const MAX: usize = 80;
    match word.char_indices().nth(MAX) {
        Some((i, _)) => format!("{:?}...", &word[..i]),
        None => format!("{word:?}"),
    }
}

/// Word splitting state; mirrors BuildKit: expanded text splits on whitespace, quoted or
/// escaped text never does.
#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.buf.is_empty() {
                self.words.push(mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.buf.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(mem::take(&mut self.buf));
        }
        self.words
    }
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    lookup: Lookup<'a>,
    depth: usize,
    budget: u64,
}

type Res<T> = Result<T, String>;

fn append(out: &mut String, s: &str) -> Res<()> {
    if out.len() + s.len() > MAX_EXPANSION {
        return Err(format!(
            "the expansion is larger than {} KiB",
            MAX_EXPANSION >> 10
        ));
    }
    out.push_str(s);
    Ok(())
}

fn append_char(out: &mut String, c: char) -> Res<()> {
    append(out, c.encode_utf8(&mut [0; 4]))
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
    }

    /// Read up to `stop` (consumed) or the end. `raw_escapes` keeps escape characters in the
    /// result: glob patterns need them to tell `\*` from `*`.
    fn process(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
        mut words: Option<&mut Words>,
    ) -> Res<String> {
        let mut result = String::new();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.pos += 1;
                return Ok(result);
            }
            match ch {
                '$' => {
                    let t = self.dollar()?;
                    if let Some(w) = words.as_deref_mut() {
                        w.add_string(&t);
                    }
                    append(&mut result, &t)?;
                }
                '\'' | '"' | '<' => {
                    let t = match ch {
                        '\'' => self.single_quote()?,
                        '"' => self.double_quote(raw_escapes)?,
                        _ => self.possible_heredoc(),
                    };
                    if let Some(w) = words.as_deref_mut() {
                        w.add_raw_string(&t);
                    }
                    append(&mut result, &t)?;
                }
                _ => {
                    self.pos += 1;
                    if ch == self.escape {
                        if raw_escapes {
                            if let Some(w) = words.as_deref_mut() {
                                w.add_raw_char(ch);
                            }
                            append_char(&mut result, ch)?;
                        }
                        let Some(c) = self.next() else { break };
                        if let Some(w) = words.as_deref_mut() {
                            w.add_raw_char(c);
                        }
                        append_char(&mut result, c)?;
                    } else {
                        if let Some(w) = words.as_deref_mut() {
                            w.add_char(ch);
                        }
                        append_char(&mut result, ch)?;
                    }
                }
            }
        }
        match stop {
            Some(s) => Err(format!(
                "unexpected end of statement while looking for matching {s}"
            )),
            None => Ok(result),
        }
    }

    fn single_quote(&mut self) -> Res<String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => return Ok(out),
                Some(c) => append_char(&mut out, c)?,
            }
        }
    }

    fn double_quote(&mut self, raw_escapes: bool) -> Res<String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.dollar()?;
                    append(&mut out, &v)?;
                }
                Some(mut ch) => {
                    self.pos += 1;
                    if ch == self.escape {
                        if raw_escapes {
                            append_char(&mut out, ch)?;
                        }
                        match self.peek() {
                            // The loop reports the missing quote.
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.escape => {
                                self.pos += 1;
                                ch = c;
                            }
                            // Any other escape stays as written, as in sh.
                            Some(_) => {}
                        }
                    }
                    append_char(&mut out, ch)?;
                }
            }
        }
    }

    /// `<<` and the blanks after it stick to the next word, so that a heredoc marker such as
    /// `<< EOF` splits as one word, as BuildKit does.
    fn possible_heredoc(&mut self) -> String {
        self.pos += 1;
        let mut out = String::from("<");
        if self.peek() == Some('<') {
            self.pos += 1;
            out.push('<');
            while let Some(c @ (' ' | '\t' | '\r')) = self.peek() {
                out.push(c);
                self.pos += 1;
            }
        }
        out
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_numeric() {
                while let Some(d) = self.peek().filter(|c| c.is_numeric()) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!') {
                self.pos += 1;
                name.push(ch);
                return name;
            }
            if !ch.is_alphanumeric() && ch != '_' {
                break;
            }
            self.pos += 1;
            name.push(ch);
        }
        name
    }

    fn nested(&mut self, stop: char, raw_escapes: bool, missing: &str) -> Res<String> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(format!("${{...}} nested more than {MAX_NESTING} deep"));
        }
        let r = self.process(Some(stop), raw_escapes, None).map_err(|e| {
            if self.peek().is_none() {
                missing.to_string()
            } else {
                e
            }
        });
        self.depth -= 1;
        r
    }

    fn dollar(&mut self) -> Res<String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(self.get(&name).unwrap_or_default());
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.name();
        let mut ch = self.next();
        let mut modifier: String = ch.into_iter().collect();
        let unsupported = |m: &str| format!("unsupported modifier ({m}) in substitution");
        let mut null_is_unset = false;
        match ch {
            None => return Err("syntax error: missing '}'".into()),
            Some('}') => return Ok(self.get(&name).unwrap_or_default()),
            Some('/') => return self.replace(&name),
            Some(':') => {
                null_is_unset = true;
                ch = self.next();
                modifier.extend(ch);
            }
            Some('+' | '-' | '?' | '#' | '%') => {}
            _ => return Err(unsupported(&modifier)),
        }
        let pattern = matches!(ch, Some('#' | '%'));
        if null_is_unset && pattern {
            return Err(unsupported(&modifier));
        }
        // BuildKit reads the word before deciding that an operator after `:` is unknown.
        let word = self.nested('}', pattern, "syntax error: missing '}'")?;
        let value = self.get(&name);
        let empty_is_unset = |v: &Option<String>| match v {
            None => true,
            Some(v) => null_is_unset && v.is_empty(),
        };
        match ch {
            Some('-') => Ok(if empty_is_unset(&value) {
                word
            } else {
                value.unwrap_or_default()
            }),
            Some('+') => Ok(if empty_is_unset(&value) {
                String::new()
            } else {
                word
            }),
            Some('?') => match value {
                None => Err(format!(
                    "{name}: {}",
                    if word.is_empty() {
                        "is not allowed to be unset"
                    } else {
                        &word
                    }
                )),
                Some(v) if null_is_unset && v.is_empty() => Err(format!(
                    "{name}: {}",
                    if word.is_empty() {
                        "is not allowed to be empty"
                    } else {
                        &word
                    }
                )),
                Some(v) => Ok(v),
            },
            Some(op @ ('#' | '%')) => {
                let (longest, pat) = match word.strip_prefix(op) {
                    Some(p) => (true, p),
                    None => (false, word.as_str()),
                };
                let toks = compile(pat)?;
                let value: Vec<char> = value.unwrap_or_default().chars().collect();
                Ok(if op == '#' {
                    match prefix_end(&toks, &value, longest, &mut self.budget)? {
                        Some(end) => value[end..].iter().collect(),
                        None => value.iter().collect(),
                    }
                } else {
                    let rtoks: Vec<Tok> = toks.iter().rev().copied().collect();
                    let rvalue: Vec<char> = value.iter().rev().copied().collect();
                    let keep = match prefix_end(&rtoks, &rvalue, longest, &mut self.budget)? {
                        Some(end) => value.len() - end,
                        None => value.len(),
                    };
                    value[..keep].iter().collect()
                })
            }
            _ => Err(unsupported(&modifier)),
        }
    }

    fn replace(&mut self, name: &str) -> Res<String> {
        let all = self.peek() == Some('/');
        if all {
            self.pos += 1;
        }
        let pattern = self.nested('/', true, "syntax error: missing '/' in ${}")?;
        let replacement = self.nested('}', true, "syntax error: missing '}'")?;
        let value: Vec<char> = self.get(name).unwrap_or_default().chars().collect();
        let toks = compile(&pattern)?;
        let mut out = String::new();
        let mut last_end = 0;
        let mut search = 0;
        while search <= value.len() {
            let Some((start, end)) = find(&toks, &value, search, &mut self.budget)? else {
                break;
            };
            append(&mut out, &value[last_end..start].iter().collect::<String>())?;
            // Go's regexp skips an empty match right after the previous match.
            if end > last_end || start == 0 {
                append(&mut out, &replacement)?;
            }
            last_end = end;
            if !all {
                break;
            }
            search = if end > search { end } else { search + 1 };
        }
        append(&mut out, &value[last_end..].iter().collect::<String>())?;
        Ok(out)
    }
}

/// One element of a glob pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `?`: any one character but a newline.
    One,
    /// `*`: any run of characters without a newline.
    Star,
}

/// Parse a glob. Only `\*`, `\?` and `\\` are escapes; `\}` and `\/` stand for the plain
/// character (they were escaped to get past the end of `${...}`); any other `\` is an error.
fn compile(pattern: &str) -> Res<Vec<Tok>> {
    let bad = |why: String| format!("invalid pattern ({pattern}) in substitution: {why}");
    let mut out = Vec::new();
    let mut it = pattern.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '*' => out.push(Tok::Star),
            '?' => out.push(Tok::One),
            '\\' => match it.peek().copied() {
                Some('}' | '/') => {}
                Some(n @ ('*' | '?' | '\\')) => {
                    it.next();
                    out.push(Tok::Lit(n));
                }
                Some(n) => return Err(bad(format!("invalid escape '\\{n}'"))),
                None => return Err(bad("invalid escape at the end".into())),
            },
            c => out.push(Tok::Lit(c)),
        }
    }
    Ok(out)
}

/// NFA states: for each position in the pattern, the earliest start of a match attempt that
/// reached it (earliest wins: leftmost matches are preferred).
type States = Vec<Option<usize>>;

fn keep_min(slot: &mut Option<usize>, start: usize) {
    if slot.is_none_or(|s| start < s) {
        *slot = Some(start);
    }
}

/// A `*` can match nothing: whoever reaches it also reaches the element after it.
fn close(toks: &[Tok], st: &mut States) {
    for (i, t) in toks.iter().enumerate() {
        if let (Tok::Star, Some(s)) = (t, st[i]) {
            keep_min(&mut st[i + 1], s);
        }
    }
}

fn step(toks: &[Tok], cur: &States, c: char, next: &mut States, budget: &mut u64) -> Res<()> {
    let cost = toks.len() as u64 + 1;
    if *budget < cost {
        return Err("the pattern needs too much work to match".into());
    }
    *budget -= cost;
    next.iter_mut().for_each(|s| *s = None);
    for (i, t) in toks.iter().enumerate() {
        let Some(s) = cur[i] else { continue };
        match *t {
            Tok::Lit(l) if l == c => keep_min(&mut next[i + 1], s),
            Tok::One if c != '\n' => keep_min(&mut next[i + 1], s),
            Tok::Star if c != '\n' => keep_min(&mut next[i], s),
            _ => {}
        }
    }
    close(toks, next);
    Ok(())
}

/// End of the shortest (or longest) prefix of `value` that the pattern matches.
fn prefix_end(toks: &[Tok], value: &[char], longest: bool, budget: &mut u64) -> Res<Option<usize>> {
    let m = toks.len();
    let mut cur: States = vec![None; m + 1];
    let mut next = cur.clone();
    cur[0] = Some(0);
    close(toks, &mut cur);
    let mut best = None;
    for pos in 0..=value.len() {
        if cur[m].is_some() {
            best = Some(pos);
            if !longest {
                break;
            }
        }
        if pos == value.len() || cur.iter().all(Option::is_none) {
            break;
        }
        step(toks, &cur, value[pos], &mut next, budget)?;
        mem::swap(&mut cur, &mut next);
    }
    Ok(best)
}

/// The leftmost match starting at or after `from`, longest among those: what Go's regexp
/// finds for a glob whose stars are greedy.
fn find(
    toks: &[Tok],
    value: &[char],
    from: usize,
    budget: &mut u64,
) -> Res<Option<(usize, usize)>> {
    let m = toks.len();
    let mut cur: States = vec![None; m + 1];
    let mut next = cur.clone();
    let mut best: Option<(usize, usize)> = None;
    let mut pos = from;
    loop {
        if best.is_none() {
            keep_min(&mut cur[0], pos);
            close(toks, &mut cur);
        }
        if let Some(s) = cur[m] {
            match best {
                Some((bs, _)) if s > bs => {}
                _ => best = Some((s, pos)),
            }
        }
        if let Some((bs, _)) = best {
            // Attempts that started later can no longer win.
            cur.iter_mut()
                .filter(|s| s.is_some_and(|s| s > bs))
                .for_each(|s| *s = None);
            if cur.iter().all(Option::is_none) {
                break;
            }
        }
        if pos == value.len() {
            break;
        }
        step(toks, &cur, value[pos], &mut next, budget)?;
        mem::swap(&mut cur, &mut next);
        pos += 1;
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn word(w: &str, vars: &HashMap<String, String>) -> Result<String, ExpandError> {
        expand_word(w, '\\', &|k| vars.get(k).cloned())
    }

    /// BuildKit's `envVarTest` cases (PWD=/home, SHELL=bash, KOREAN=한국어, NULL=""), plus the
    /// digits and special parameters that are never set.
    #[test]
    fn single_word_table() {
        let vars = env(&[
            ("PWD", "/home"),
            ("SHELL", "bash"),
            ("KOREAN", "한국어"),
            ("NULL", ""),
        ]);
        let cases: &[(&str, Option<&str>)] = &[
            ("hello", Some("hello")),
            ("he'll'o", Some("hello")),
            ("he'llo", None),
            ("he\\'llo", Some("he'llo")),
            ("he\\\\'llo", None),
            ("abc\\tdef", Some("abctdef")),
            ("\"abc\\tdef\"", Some("abc\\tdef")),
            ("\"abc\\\\tdef\"", Some("abc\\tdef")),
            ("'abc\\tdef'", Some("abc\\tdef")),
            ("hello\\", Some("hello")),
            ("hello\\\\", Some("hello\\")),
            ("\"hello", None),
            ("\"hello\\\"", None),
            ("\"hel'lo\"", Some("hel'lo")),
            ("'hello", None),
            ("'hello\\'", Some("hello\\")),
            ("'hello\\there'", Some("hello\\there")),
            ("'hello\\\\there'", Some("hello\\\\there")),
            ("\"''\"", Some("''")),
            ("$.", Some("$.")),
            ("he$1x", Some("hex")),
            ("he$.x", Some("he$.x")),
            ("he$pwd.", Some("he.")),
            ("he$PWD", Some("he/home")),
            ("he\\$PWD", Some("he$PWD")),
            ("he\\\\$PWD", Some("he\\/home")),
            ("\"he\\$PWD\"", Some("he$PWD")),
            ("\"he\\\\$PWD\"", Some("he\\/home")),
            ("\\${}", Some("${}")),
            ("\\${}aaa", Some("${}aaa")),
            ("he\\${}", Some("he${}")),
            ("${}", None),
            ("${}aaa", None),
            ("he${}", None),
            ("he${hi}", Some("he")),
            ("he${hi}xx", Some("hexx")),
            ("he${PWD}", Some("he/home")),
            ("he${.}", None),
            ("he${XXX:-000}xx", Some("he000xx")),
            ("he${PWD:-000}xx", Some("he/homexx")),
            ("he${XXX:-$PWD}xx", Some("he/homexx")),
            ("he${XXX:-${PWD:-yyy}}xx", Some("he/homexx")),
            ("he${XXX:-${YYY:-yyy}}xx", Some("heyyyxx")),
            ("he${XXX:YYY}", None),
            ("he${XXX?}", None),
            ("he${XXX:?}", None),
            ("he${PWD?}", Some("he/home")),
            ("he${PWD:?}", Some("he/home")),
            ("he${NULL?}", Some("he")),
            ("he${NULL:?}", None),
            ("he${XXX:+${PWD}}xx", Some("hexx")),
            ("he${PWD:+${XXX}}xx", Some("hexx")),
            ("he${PWD:+${SHELL}}xx", Some("hebashxx")),
            ("he${XXX:+000}xx", Some("hexx")),
            ("he${PWD:+000}xx", Some("he000xx")),
            ("'he${XX}'", Some("he${XX}")),
            ("\"he${PWD}\"", Some("he/home")),
            ("\"he'$PWD'\"", Some("he'/home'")),
            ("\"$PWD\"", Some("/home")),
            ("'$PWD'", Some("$PWD")),
            ("'\\$PWD'", Some("\\$PWD")),
            ("'\"hello\"'", Some("\"hello\"")),
            ("he${PWD", None),
            ("he${PWD:=000}xx", None),
            ("he${PWD:+${PWD}:}xx", Some("he/home:xx")),
            ("he${XXX:-\\$PWD:}xx", Some("he$PWD:xx")),
            ("he${XXX:-\\${PWD}z}xx", Some("he${PWDz}xx")),
            ("안녕$KOREAN", Some("안녕한국어")),
            ("안'녕'하세요", Some("안녕하세요")),
            ("${{aaa}", None),
            ("${aaa}}", Some("}")),
            ("${aaa", None),
            ("${{aaa:-bbb}", None),
            ("${aaa:-bbb}}", Some("bbb}")),
            ("${aaa:-bbb", None),
            ("${aaa:-bbb}", Some("bbb")),
            ("${aaa:-${bbb:-ccc}}", Some("ccc")),
            ("${aaa:-bbb ${foo}", None),
            ("${aaa:-bbb {foo}", Some("bbb {foo")),
            ("${:}", None),
            ("${:-bbb}", None),
            ("${:+bbb}", None),
            ("$1", Some("")),
            ("${999:-bbb}aaa", Some("bbbaaa")),
            ("$999aaa", Some("aaa")),
            ("${001:+bbb}aaa", Some("aaa")),
            ("$@@@", Some("@@")),
            ("${@:-bbb}aaa", Some("bbbaaa")),
            ("${*:+bbb}", Some("")),
            ("${#:-bbb}", Some("bbb")),
            ("${?}", Some("")),
            ("${-:-bbb}", Some("bbb")),
            ("$$", Some("")),
            ("${!:-bbb}", Some("bbb")),
            ("$0", Some("")),
        ];
        for (input, want) in cases {
            let got = word(input, &vars);
            match want {
                Some(w) => assert_eq!(got.as_deref(), Ok(*w), "{input}"),
                None => assert!(got.is_err(), "{input}: want an error, got {got:?}"),
            }
        }
    }

    /// Unset versus empty for each operator, with and without `:`.
    #[test]
    fn unset_versus_empty() {
        let vars = env(&[("E", ""), ("S", "set")]);
        let cases: &[(&str, &str)] = &[
            ("${U-d}", "d"),
            ("${E-d}", ""),
            ("${S-d}", "set"),
            ("${U:-d}", "d"),
            ("${E:-d}", "d"),
            ("${S:-d}", "set"),
            ("${U+a}", ""),
            ("${E+a}", "a"),
            ("${S+a}", "a"),
            ("${U:+a}", ""),
            ("${E:+a}", ""),
            ("${S:+a}", "a"),
            ("${E?}", ""),
            ("${S:?}", "set"),
        ];
        for (input, want) in cases {
            assert_eq!(word(input, &vars).as_deref(), Ok(*want), "{input}");
        }
        let e = word("${U?please set U}", &vars).unwrap_err();
        assert_eq!(
            e.message,
            "failed to process \"${U?please set U}\": U: please set U"
        );
        let e = word("${E:?}", &vars).unwrap_err();
        assert!(e.message.ends_with("E: is not allowed to be empty"), "{e}");
        let e = word("${U:?}", &vars).unwrap_err();
        assert!(e.message.ends_with("U: is not allowed to be unset"), "{e}");
    }

    /// BuildKit's pattern cases for `#`, `%` and `/`.
    #[test]
    fn pattern_operators() {
        /// Input, variables, result (`None`: an error).
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            (
                "${FOO#()[]{\\}^$.\\*\\?|\\\\}",
                &[("FOO", "()[]{}^$.*?|\\x")],
                Some("x"),
            ),
            ("${FOO%%\\**}", &[("FOO", "xx**")], Some("xx")),
            ("${FOO#*x*y}", &[("FOO", "xxyy")], Some("y")),
            ("${FOO#*}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO#$BAR}", &[("FOO", "xxyy"), ("BAR", "x")], Some("xyy")),
            ("${FOO#$BAR}", &[("FOO", "xxyy"), ("BAR", "")], Some("xxyy")),
            ("${FOO#}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO##*x}", &[("FOO", "xxyy")], Some("yy")),
            ("${FOO##}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO#?\\?}", &[("FOO", "???y")], Some("?y")),
            (
                "${ABC:-.}${FOO%x}${ABC:-.}",
                &[("FOO", "xxyy")],
                Some(".xxyy."),
            ),
            ("${FOO%%\\**\\*}", &[("FOO", "a***yy*")], Some("a")),
            ("${FOO%}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO%y*}", &[("FOO", "xxyy")], Some("xxy")),
            ("${FOO%%y*}", &[("FOO", "xxyy")], Some("xx")),
            (
                "${FOO%%$BAR}",
                &[("FOO", "xxyy"), ("BAR", "")],
                Some("xxyy"),
            ),
            ("${FOO:#}", &[], None),
            ("${FOO:##}", &[], None),
            ("${FOO:%}", &[], None),
            ("${FOO:%%}", &[], None),
            ("${FOO#\\q}", &[("FOO", "q")], None),
            (
                "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
                &[("FOO", "/foo*/*/*.txt"), ("NEEDLE", "\\*/")],
                Some("/foo.*/*.txt - /foo..*.txt"),
            ),
            (
                "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
                &[("FOO", "/tmp/tmp/bar.txt"), ("NEEDLE", "/tmp")],
                Some("/tmp/bar.txt - /bar.txt"),
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
                &[
                    ("FOO", "/a/foo/b/c.txt"),
                    ("NEEDLE", "/?/"),
                    ("REPLACEMENT", "/"),
                ],
                Some("/foo/b/c.txt - /foo/c.txt"),
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT}",
                &[
                    ("FOO", "http://google.de"),
                    ("NEEDLE", "http://"),
                    ("REPLACEMENT", "https://"),
                ],
                Some("https://google.de"),
            ),
            (
                "${FOO//\\//\\/}",
                &[("FOO", "/tmp/foo.txt")],
                Some("\\/tmp\\/foo.txt"),
            ),
            (
                "${FOO/$BAR/ww}",
                &[("FOO", "xxyy"), ("BAR", "")],
                Some("wwxxyy"),
            ),
            ("${FOO//ww}", &[("FOO", "xxyy")], None),
            ("${FOO//}", &[("FOO", "xxyy")], None),
            ("${FOO///}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO///}", &[], Some("")),
            ("${FOO//*/x}", &[("FOO", "abc")], Some("x")),
            ("${FOO//b*/x}", &[("FOO", "abcabc")], Some("ax")),
            ("${FOO//?/x}", &[("FOO", "ab\nc")], Some("xx\nx")),
            ("${FOO/x*/-}", &[("FOO", "axb\nxc")], Some("a-\nxc")),
        ];
        for (input, vars, want) in cases {
            let got = word(input, &env(vars));
            match want {
                Some(w) => assert_eq!(got.as_deref(), Ok(*w), "{input}"),
                None => assert!(got.is_err(), "{input}: want an error, got {got:?}"),
            }
        }
    }

    /// BuildKit's `wordsTest` cases: splitting happens after expansion, quotes protect.
    #[test]
    fn word_splitting_table() {
        let vars = env(&[
            ("hi", "hi"),
            ("space", "abc  def"),
            ("leading", "  ab c"),
            ("trailing", "ab c   "),
        ]);
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("hello", Some(&["hello"])),
            ("hello${hi}bye", Some(&["hellohibye"])),
            ("hello${space}bye", Some(&["helloabc", "defbye"])),
            ("hello\"${space}\"bye", Some(&["helloabc  defbye"])),
            ("hello \"${space}\"bye", Some(&["hello", "abc  defbye"])),
            ("hello${leading}def", Some(&["hello", "ab", "cdef"])),
            ("hello\"${leading}\" def", Some(&["hello  ab c", "def"])),
            ("hello\"${leading}\"", Some(&["hello  ab c"])),
            ("hello${leading}", Some(&["hello", "ab", "c"])),
            ("hello${trailing}", Some(&["helloab", "c"])),
            ("hello${trailing}d", Some(&["helloab", "c", "d"])),
            ("hello\"${trailing}\"d", Some(&["helloab c   d"])),
            ("hel\"lo${trailing}\"", Some(&["helloab c   "])),
            ("hello\" there  \"", Some(&["hello there  "])),
            ("hello there     ", Some(&["hello", "there"])),
            ("hello\\ there", Some(&["hello there"])),
            ("hello\" there", None),
            ("hello\\\" there", Some(&["hello\"", "there"])),
            ("hello\"\\\\there\"", Some(&["hello\\there"])),
            ("hello\"\\there\"", Some(&["hello\\there"])),
            ("hello'\\\\there'", Some(&["hello\\\\there"])),
            ("hello'\\there'", Some(&["hello\\there"])),
            ("hello'$there'", Some(&["hello$there"])),
            ("80 ${X:-443}/tcp", Some(&["80", "443/tcp"])),
            ("a${X:-b}c", Some(&["abc"])),
            ("cat << EOF", Some(&["cat", "<< EOF"])),
            ("", Some(&[])),
            ("\"\"", Some(&[])),
        ];
        for (input, want) in cases {
            let got = expand_words(input, '\\', &|k| vars.get(k).cloned());
            match want {
                Some(w) => {
                    let w: Vec<String> = w.iter().map(|s| s.to_string()).collect();
                    assert_eq!(got, Ok(w), "{input}");
                }
                None => assert!(got.is_err(), "{input}: want an error, got {got:?}"),
            }
        }
    }

    #[test]
    fn backtick_escape() {
        let vars = env(&[("X", "x")]);
        let w = |s: &str| expand_word(s, '`', &|k| vars.get(k).cloned());
        assert_eq!(w("c:\\dir\\$X").as_deref(), Ok("c:\\dir\\x"));
        assert_eq!(w("`$X").as_deref(), Ok("$X"));
        assert_eq!(w("\"a`\"b\"").as_deref(), Ok("a\"b"));
        assert_eq!(w("a``b").as_deref(), Ok("a`b"));
    }

    #[test]
    fn limits_end_in_errors() {
        let big = "x".repeat(300 << 10);
        let vars = env(&[("BIG", &big)]);
        assert!(word("$BIG$BIG$BIG", &vars).is_ok());
        let e = word("$BIG$BIG$BIG$BIG", &vars).unwrap_err();
        assert!(e.message.contains("larger than 1024 KiB"), "{e}");
        let e = expand_words("$BIG $BIG $BIG $BIG", '\\', &|k| vars.get(k).cloned());
        assert!(e.is_err());

        let deep = format!("{}x{}", "${A:-".repeat(100_000), "}".repeat(100_000));
        let e = word(&deep, &vars).unwrap_err();
        assert!(
            e.message.contains("nested more than 64 deep"),
            "{}",
            e.message
        );
        assert!(e.message.len() < 300, "the message quotes a short prefix");
        let ok = format!("{}x{}", "${A:-".repeat(64), "}".repeat(64));
        assert_eq!(word(&ok, &vars).as_deref(), Ok("x"));

        for bad in [
            "${", "${A:-", "${A:-'", "${A:-\"", "${A/", "${A/x", "'", "\"", "${A",
        ] {
            assert!(word(bad, &vars).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostile_patterns_stop() {
        let start = std::time::Instant::now();
        let value = "a".repeat(1 << 20);
        // Never matches (no `b`) and starts and ends with `*`, so from either end every
        // position is tried against 4,000 live states.
        let pattern = format!("*{}b*", "a*".repeat(2000));
        let vars = env(&[("V", &value), ("P", &pattern)]);
        for op in ["#", "%%", "//"] {
            let input = if op.starts_with('/') {
                format!("${{V{op}$P/x}}")
            } else {
                format!("${{V{op}$P}}")
            };
            let e = word(&input, &vars)
                .map(|r| format!("{op}: {}", r.len()))
                .unwrap_err();
            assert!(e.message.contains("too much work"), "{op}: {e}");
        }
        assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
    }
}
