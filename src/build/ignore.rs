//! `.dockerignore` / `.containerignore` rules, matched as Docker matches them.
//!
//! Pure logic: nothing here touches the filesystem. [`IgnoreRules::parse`] turns the text of an
//! ignore file into rules; [`IgnoreRules::matches`] says whether a context path is excluded;
//! [`IgnoreRules::may_include_below`] says whether a walk must still descend into an excluded
//! directory because an exception could re-include something under it.
//!
//! # The rules (Docker's ignore file reader and moby/patternmatcher)
//!
//! - One pattern per line; a trailing `\r` is dropped; a UTF-8 byte order mark at the start of
//!   the file is dropped. A line whose first byte is `#` is a comment (`  # x` is a pattern).
//! - Surrounding whitespace (Unicode `White_Space`) is trimmed; blank lines are skipped.
//! - `!` makes a line an exception (re-include). Whitespace after `!` is trimmed too.
//! - The pattern is cleaned like Go's `filepath.Clean` (`a//b/./c/..` is `a/b`, `foo/` is `foo`),
//!   then one leading `/` is removed: patterns are relative to the context root, so `/foo` and
//!   `foo` are the same. Docker cleans and trims twice (once reading the file, once compiling
//!   the patterns) and this module does the same, so `/ foo` means `foo` and `/!foo` is an
//!   exception for `foo`, as in Docker.
//! - `*` matches any run of characters but `/`; `?` one character but `/`; `[...]` a character
//!   class with ranges (`[a-z]`) and `^` negation (`[^a]`; `!` does *not* negate, as in Go);
//!   `\` escapes the next character, in and out of classes. Classes may match `/`, as Go's
//!   do. Characters are Unicode scalars; bytes that are not valid UTF-8 count one each.
//! - `**` matches any number of directories, including none: `**/x` matches `x` and `a/b/x`;
//!   a trailing `**` matches everything below (`dir/**` matches `dir/a/b`, not `dir`). A
//!   pattern that starts with `**` and has no other special character matches every path that
//!   *ends with* the rest (so `**.go` excludes every `.go` file), Docker's suffix fast path.
//! - A pattern excludes a path when it matches the path or any of its parent directories
//!   (`foo` excludes `foo/bar`). The last line that matches decides: `!` lines re-include,
//!   others exclude; no match means included. The context root itself is never excluded.
//! - Malformed patterns are errors naming the line: an unterminated `[`, an unescaped `-` or
//!   `]` where a class needs a character, a trailing `\`, a range out of order (`[z-a]`, which
//!   Docker rejects when it compiles the pattern), and a `!` with no pattern.
//!
//! Deliberate differences from Docker, all in corners where Docker's pattern-to-regexp
//! translation misbehaves: `*`/`?` inside a class are literal (Docker turns them into broken
//! regexps); `^` outside a class is literal (Docker makes it an anchor when the pattern has
//! other wildcards); `\` before a letter is that letter (`\d` is a digit class to Docker);
//! `**` also matches names with a newline; non-UTF-8 patterns work (Docker fails to compile
//! them). Matching walks a small automaton, so no pattern can make it take exponential time.
//!
//! Docker's walker (BuildKit's fsutil) checks a path's patterns against only the path itself
//! once the parent's results are known, which in rare orderings (`a`, `!a/c`, `a`) lets `a/c`
//! through although the last matching line excludes it. This module follows the documented
//! rule (last matching line wins, parents included) everywhere, so selection and walks agree.
//!
//! # The build file and the ignore file themselves
//!
//! Patterns may exclude the Containerfile and the ignore file. As in Docker, that only hides
//! them from COPY/ADD: the builder reads both outside the rules (the ignore file is found with
//! [`ignore_file_candidates`], read before any rule exists; the Containerfile is read by path).
//!
//! # Which ignore file applies
//!
//! [`ignore_file_candidates`] lists, in order of preference: `<build file>.dockerignore` and
//! `<build file>.containerignore` next to the build file (BuildKit reads the first, buildah
//! both with that preference), then `.containerignore` and `.dockerignore` at the context root
//! (podman and buildah read `.containerignore` first; Docker knows only `.dockerignore`). The
//! first that exists is the only one used. [`choose_ignore_file`] is the same choice as a pure
//! function over "which files exist".

use std::fmt;

use crate::error::ShowPath;

/// The name Docker looks for at the root of the context.
pub const DOCKERIGNORE: &[u8] = b".dockerignore";
/// The name podman and buildah look for first.
pub const CONTAINERIGNORE: &[u8] = b".containerignore";

/// Where an ignore file may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IgnoreFileLocation {
    /// This name in the directory that holds the build file.
    BesideBuildFile(Vec<u8>),
    /// This name at the root of the build context.
    ContextRoot(&'static [u8]),
}

impl fmt::Display for IgnoreFileLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreFileLocation::BesideBuildFile(name) => write!(f, "{}", ShowPath(name)),
            IgnoreFileLocation::ContextRoot(name) => write!(f, "{}", ShowPath(name)),
        }
    }
}

/// The places an ignore file is looked for, best first. `build_file_name` is the base name of
/// the Containerfile (`Containerfile`, `app.Dockerfile`), when there is one.
pub fn ignore_file_candidates(build_file_name: Option<&[u8]>) -> Vec<IgnoreFileLocation> {
    let mut out = Vec::with_capacity(4);
    if let Some(name) = build_file_name.filter(|n| !n.is_empty()) {
        for suffix in [DOCKERIGNORE, CONTAINERIGNORE] {
            out.push(IgnoreFileLocation::BesideBuildFile([name, suffix].concat()));
        }
    }
    out.push(IgnoreFileLocation::ContextRoot(CONTAINERIGNORE));
    out.push(IgnoreFileLocation::ContextRoot(DOCKERIGNORE));
    out
}

/// The ignore file that applies, given which candidate files exist.
pub fn choose_ignore_file(
    build_file_name: Option<&[u8]>,
    mut exists: impl FnMut(&IgnoreFileLocation) -> bool,
) -> Option<IgnoreFileLocation> {
    ignore_file_candidates(build_file_name)
        .into_iter()
        .find(|c| exists(c))
}

/// A line of an ignore file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {}: {reason}", Quoted(.pattern))]
pub struct IgnoreError {
    /// 1-based line number.
    pub line: usize,
    /// The line as written (trimmed).
    pub pattern: Vec<u8>,
    pub reason: String,
}

/// A byte string in double quotes, non-UTF-8 bytes escaped.
struct Quoted<'a>(&'a [u8]);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", ShowPath(self.0))
    }
}

/// Parsed ignore rules, in file order.
#[derive(Clone, Debug, Default)]
pub struct IgnoreRules {
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    /// A `!` line: re-includes what it matches.
    exception: bool,
    /// The pattern after cleaning, without `!`.
    pattern: Vec<u8>,
    line: usize,
    matcher: Matcher,
}

impl IgnoreRules {
    /// Parse the text of an ignore file.
    pub fn parse(text: &[u8]) -> Result<IgnoreRules, IgnoreError> {
        let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
        let mut rules = Vec::new();
        for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = index + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.first() == Some(&b'#') {
                continue;
            }
            let written = trim_space(raw);
            if written.is_empty() {
                continue;
            }
            let error = |reason: String| IgnoreError {
                line,
                pattern: written.to_vec(),
                reason,
            };
            let (exception, pattern) = normalize_line(written)
                .ok_or_else(|| error("'!' must be followed by a pattern".into()))?;
            let matcher = Matcher::compile(&pattern).map_err(error)?;
            rules.push(Rule {
                exception,
                pattern,
                line,
                matcher,
            });
        }
        Ok(IgnoreRules { rules })
    }

    /// True when there are no rules at all (nothing is excluded).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any `!` line exists.
    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.exception)
    }

    /// The cleaned patterns in file order: (line, is an exception, pattern).
    pub fn patterns(&self) -> impl Iterator<Item = (usize, bool, &[u8])> {
        self.rules
            .iter()
            .map(|r| (r.line, r.exception, r.pattern.as_slice()))
    }

    /// Whether `path` (relative to the context root, `/`-separated, no `.`/`..` components) is
    /// excluded from the context.
    pub fn matches(&self, path: &[u8]) -> bool {
        self.deciding_rule(path).is_some_and(|r| !r.exception)
    }

    /// The line that decides `path`'s fate, and whether it is an exception: for messages such
    /// as "excluded by .dockerignore line 3".
    pub fn deciding_line(&self, path: &[u8]) -> Option<(usize, bool)> {
        self.deciding_rule(path).map(|r| (r.line, r.exception))
    }

    fn deciding_rule(&self, path: &[u8]) -> Option<&Rule> {
        if is_root(path) {
            return None;
        }
        self.rules
            .iter()
            .rev()
            .find(|r| r.matcher.matches_or_parent(path))
    }

    /// Whether a walk must look inside the directory `dir`: true unless `dir` is excluded and
    /// no exception after the line that excludes it could match anything below it. Never
    /// false when something below `dir` is included (it may be true when nothing is).
    pub fn may_include_below(&self, dir: &[u8]) -> bool {
        self.may_include_below_matched(&self.matched(dir), dir)
    }

    /// Which rules match `path` or one of its parent directories, from scratch.
    pub fn matched(&self, path: &[u8]) -> Matched {
        let root = is_root(path);
        Matched(
            self.rules
                .iter()
                .map(|r| !root && r.matcher.matches_or_parent(path))
                .collect(),
        )
    }

    /// Which rules match `path`, an entry of the directory `parent` was computed for: a rule
    /// matches when it matched the directory (or its parents) or matches `path` itself. A walk
    /// carries this down instead of matching every entry's parents again.
    pub fn matched_child(&self, parent: &Matched, path: &[u8]) -> Matched {
        Matched(
            self.rules
                .iter()
                .enumerate()
                .map(|(i, r)| parent.0.get(i).copied().unwrap_or(false) || r.matcher.matches(path))
                .collect(),
        )
    }

    /// Whether a path with these matches is excluded: the last matching rule decides.
    pub fn excluded(&self, matched: &Matched) -> bool {
        self.last_matching(matched)
            .is_some_and(|i| !self.rules[i].exception)
    }

    fn last_matching(&self, matched: &Matched) -> Option<usize> {
        matched.0.iter().rposition(|&m| m)
    }

    /// [`IgnoreRules::may_include_below`] for a directory whose matches are known.
    pub fn may_include_below_matched(&self, matched: &Matched, dir: &[u8]) -> bool {
        let Some(last) = self.last_matching(matched) else {
            return true;
        };
        if self.rules[last].exception || is_root(dir) {
            return true;
        }
        // Any path below `dir` matches every rule that matches `dir`, so only an exception
        // after `last` that can match a path starting with `dir/` can re-include something.
        let mut prefix = Vec::with_capacity(dir.len() + 1);
        prefix.extend_from_slice(dir);
        prefix.push(b'/');
        self.rules[last + 1..]
            .iter()
            .any(|r| r.exception && r.matcher.may_match_with_prefix(&prefix))
    }
}

/// The rules (by index) that match a path or one of its parent directories; see
/// [`IgnoreRules::matched_child`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matched(Vec<bool>);

fn is_root(path: &[u8]) -> bool {
    path.is_empty() || path == b"."
}

/// Turn a trimmed, non-empty line into (is an exception, pattern), exactly as Docker's two
/// passes do; `None` for a `!` without a pattern.
fn normalize_line(written: &[u8]) -> Option<(bool, Vec<u8>)> {
    // Pass 1, reading the file: strip `!`, trim, clean, drop one leading `/`, put `!` back.
    let (invert, rest) = match written.strip_prefix(b"!") {
        Some(rest) => (true, trim_space(rest)),
        None => (false, written),
    };
    let mut cleaned = if rest.is_empty() {
        Vec::new()
    } else {
        clean_path(rest)
    };
    if cleaned.len() > 1 && cleaned[0] == b'/' {
        cleaned.remove(0);
    }
    let mut line = Vec::with_capacity(cleaned.len() + 1);
    if invert {
        line.push(b'!');
    }
    line.extend_from_slice(&cleaned);
    // Pass 2, compiling: trim, clean, then a leading `!` marks an exception.
    let pattern = clean_path(trim_space(&line));
    match pattern.strip_prefix(b"!") {
        Some([]) => None,
        Some(rest) => Some((true, rest.to_vec())),
        None => Some((false, pattern)),
    }
}

/// Go's `filepath.Clean` on bytes: the shortest equivalent path, lexically. Empty becomes `.`;
/// `..` at the root of an absolute path is dropped; leading `..` of a relative path are kept.
pub fn clean_path(path: &[u8]) -> Vec<u8> {
    if path.is_empty() {
        return b".".to_vec();
    }
    let rooted = path[0] == b'/';
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if parts.last().is_some_and(|last| *last != b"..") {
                    parts.pop();
                } else if !rooted {
                    parts.push(b"..");
                }
            }
            name => parts.push(name),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    if rooted {
        out.push(b'/');
    }
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(part);
    }
    if out.is_empty() {
        out.push(b'.');
    }
    out
}

/// Trim Unicode white space at both ends, like Go's `strings.TrimSpace` (bytes that are not
/// valid UTF-8 are never space).
fn trim_space(mut s: &[u8]) -> &[u8] {
    while let Some((c, len)) = first_char(s) {
        if !c.is_whitespace() {
            break;
        }
        s = &s[len..];
    }
    while let Some((c, len)) = last_char(s) {
        if !c.is_whitespace() {
            break;
        }
        s = &s[..s.len() - len];
    }
    s
}

fn first_char(s: &[u8]) -> Option<(char, usize)> {
    (1..=s.len().min(4)).find_map(|n| {
        let c = std::str::from_utf8(&s[..n]).ok()?.chars().next()?;
        Some((c, n))
    })
}

fn last_char(s: &[u8]) -> Option<(char, usize)> {
    (1..=s.len().min(4)).find_map(|n| {
        let c = std::str::from_utf8(&s[s.len() - n..])
            .ok()?
            .chars()
            .next()?;
        Some((c, n))
    })
}

// ---------------------------------------------------------------------------------------------
// Patterns

/// How one ignore pattern matches a path.
#[derive(Clone, Debug)]
enum Matcher {
    /// `**` followed by plain characters: the path ends with them (or, when they start with
    /// `/`, is them without it). Docker's fast path, kept for its looser meaning of `**x`.
    Suffix(Vec<u8>),
    Glob(Glob),
}

impl Matcher {
    fn compile(pattern: &[u8]) -> Result<Matcher, String> {
        if let Some(rest) = pattern.strip_prefix(b"**")
            && !rest.iter().any(|b| b"*?[]\\".contains(b))
        {
            return Ok(Matcher::Suffix(rest.to_vec()));
        }
        Glob::compile(pattern, Dialect::Ignore).map(Matcher::Glob)
    }

    fn matches(&self, path: &[u8]) -> bool {
        match self {
            Matcher::Suffix(suffix) => {
                path.ends_with(suffix) || suffix.first() == Some(&b'/') && path == &suffix[1..]
            }
            Matcher::Glob(glob) => glob.matches(path),
        }
    }

    /// The path or one of its parent directories matches.
    fn matches_or_parent(&self, path: &[u8]) -> bool {
        self.matches(path)
            || path
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'/' && self.matches(&path[..i]))
    }

    /// Whether some path starting with `prefix` could match (may say yes when none does).
    fn may_match_with_prefix(&self, prefix: &[u8]) -> bool {
        match self {
            Matcher::Suffix(_) => true,
            Matcher::Glob(glob) => glob.may_match_with_prefix(prefix),
        }
    }
}

/// Which rules a [`Glob`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    /// Ignore files: `**` spans directories; a class range out of order is an error.
    Ignore,
    /// Go's `filepath.Match` (COPY sources): `**` is two `*`; `[z-a]` matches nothing.
    PathMatch,
}

/// A compiled wildcard pattern: Go's `filepath.Match` syntax, with Docker's `**` in ignore
/// files. Matching runs an automaton over the characters of the name, in time proportional to
/// the name's length times the pattern's.
#[derive(Clone, Debug)]
pub struct Glob {
    tokens: Vec<Token>,
}

/// One character of a pattern or a path: a Unicode scalar value, or `STRAY_BYTE + b` for a
/// byte `b` that is not part of valid UTF-8 (so such names still match, byte for byte).
type Unit = u32;
const STRAY_BYTE: Unit = 0x11_0000;
const SLASH: Unit = b'/' as Unit;

#[derive(Clone, Debug)]
enum Token {
    /// This character.
    Char(Unit),
    /// `?`: one character but `/`.
    AnyChar,
    /// `*`: any run of characters but `/`.
    Star,
    /// `**` (followed by more pattern): nothing, or anything ending in `/`.
    AnyDirs,
    /// `**` at the end: anything.
    AnyTail,
    Class(Class),
}

#[derive(Clone, Debug)]
struct Class {
    negated: bool,
    ranges: Vec<(Unit, Unit)>,
}

impl Class {
    fn contains(&self, c: Unit) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != self.negated
    }
}

fn units(bytes: &[u8]) -> Vec<Unit> {
    let mut out = Vec::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.extend(chunk.valid().chars().map(|c| c as Unit));
        out.extend(chunk.invalid().iter().map(|&b| STRAY_BYTE + Unit::from(b)));
    }
    out
}

fn show_unit(c: Unit) -> String {
    match char::from_u32(c) {
        Some(ch) => ch.to_string(),
        None => format!("\\x{:02x}", c.wrapping_sub(STRAY_BYTE)),
    }
}

const STAR: Unit = b'*' as Unit;
const QUESTION: Unit = b'?' as Unit;
const BACKSLASH: Unit = b'\\' as Unit;
const OPEN: Unit = b'[' as Unit;
const CLOSE: Unit = b']' as Unit;
const CARET: Unit = b'^' as Unit;
const DASH: Unit = b'-' as Unit;

/// Whether a path component uses wildcards (`*`, `?` or `[` not escaped by `\`).
pub fn has_wildcards(component: &[u8]) -> bool {
    let mut i = 0;
    while i < component.len() {
        match component[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

impl Glob {
    /// A pattern for one path component with Go's `filepath.Match` rules (COPY sources).
    pub fn path_match(pattern: &[u8]) -> Result<Glob, String> {
        Glob::compile(pattern, Dialect::PathMatch)
    }

    fn compile(pattern: &[u8], dialect: Dialect) -> Result<Glob, String> {
        let u = units(pattern);
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < u.len() {
            let c = u[i];
            i += 1;
            let token = match c {
                STAR if dialect == Dialect::Ignore && u.get(i) == Some(&STAR) => {
                    i += 1;
                    // `**/` is `**`: the slash is part of "any number of directories".
                    if u.get(i) == Some(&SLASH) {
                        i += 1;
                    }
                    if i == u.len() {
                        Token::AnyTail
                    } else {
                        Token::AnyDirs
                    }
                }
                STAR => Token::Star,
                QUESTION => Token::AnyChar,
                BACKSLASH => {
                    let escaped = *u.get(i).ok_or("a trailing '\\' escapes nothing")?;
                    i += 1;
                    Token::Char(escaped)
                }
                OPEN => {
                    let (class, next) = parse_class(&u, i, dialect)?;
                    i = next;
                    Token::Class(class)
                }
                other => Token::Char(other),
            };
            tokens.push(token);
        }
        Ok(Glob { tokens })
    }

    /// Whether the whole of `name` matches.
    pub fn matches(&self, name: &[u8]) -> bool {
        let end = 2 * self.tokens.len();
        self.run(name).is_some_and(|states| states[end])
    }

    /// Whether some string that starts with `prefix` could match.
    fn may_match_with_prefix(&self, prefix: &[u8]) -> bool {
        self.run(prefix).is_some()
    }

    /// The automaton's states after reading `input`, `None` once none is left. State `2p` is
    /// "before token p"; state `2p+1` is "inside the `**` at p, before its closing `/`".
    fn run(&self, input: &[u8]) -> Option<Vec<bool>> {
        let n = self.tokens.len();
        let mut states = vec![false; 2 * n + 2];
        states[0] = true;
        self.close(&mut states);
        let mut next = vec![false; 2 * n + 2];
        for c in units(input) {
            next.iter_mut().for_each(|s| *s = false);
            let mut alive = false;
            for pos in 0..n {
                let mut set = |state: usize| {
                    next[state] = true;
                    alive = true;
                };
                if states[2 * pos + 1] {
                    set(2 * pos + 1);
                    if c == SLASH {
                        set(2 * pos + 2);
                    }
                }
                if !states[2 * pos] {
                    continue;
                }
                match &self.tokens[pos] {
                    Token::Char(want) if *want == c => set(2 * pos + 2),
                    Token::AnyChar if c != SLASH => set(2 * pos + 2),
                    Token::Star if c != SLASH => set(2 * pos),
                    Token::AnyTail => set(2 * pos),
                    Token::AnyDirs => {
                        set(2 * pos + 1);
                        if c == SLASH {
                            set(2 * pos + 2);
                        }
                    }
                    Token::Class(class) if class.contains(c) => set(2 * pos + 2),
                    _ => {}
                }
            }
            if !alive {
                return None;
            }
            self.close(&mut next);
            std::mem::swap(&mut states, &mut next);
        }
        Some(states)
    }

    /// Follow the moves that read nothing: `*` and `**` may match the empty string.
    fn close(&self, states: &mut [bool]) {
        for (pos, token) in self.tokens.iter().enumerate() {
            if states[2 * pos] && matches!(token, Token::Star | Token::AnyDirs | Token::AnyTail) {
                states[2 * pos + 2] = true;
            }
        }
    }
}

/// Parse a class whose `[` was just read; `i` is the index after it. Go's grammar: an optional
/// `^`, then one or more characters or `lo-hi` ranges, each possibly `\`-escaped, then `]`.
fn parse_class(u: &[Unit], mut i: usize, dialect: Dialect) -> Result<(Class, usize), String> {
    let negated = u.get(i) == Some(&CARET);
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        if u.get(i) == Some(&CLOSE) && !ranges.is_empty() {
            return Ok((Class { negated, ranges }, i + 1));
        }
        let (lo, next) = class_char(u, i)?;
        i = next;
        let mut hi = lo;
        if u.get(i) == Some(&DASH) {
            let (end, next) = class_char(u, i + 1)?;
            hi = end;
            i = next;
        }
        if lo > hi && dialect == Dialect::Ignore {
            return Err(format!(
                "character range {}-{} is out of order",
                show_unit(lo),
                show_unit(hi)
            ));
        }
        ranges.push((lo, hi));
    }
}

fn class_char(u: &[Unit], i: usize) -> Result<(Unit, usize), String> {
    const UNTERMINATED: &str = "unterminated character class '['";
    match u.get(i) {
        None => Err(UNTERMINATED.into()),
        Some(&DASH) | Some(&CLOSE) => {
            Err("a '-' or ']' in a character class must be escaped with '\\'".into())
        }
        Some(&BACKSLASH) => match u.get(i + 1) {
            None => Err(UNTERMINATED.into()),
            Some(&c) => Ok((c, i + 2)),
        },
        Some(&c) => Ok((c, i + 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(lines: &[&str]) -> IgnoreRules {
        IgnoreRules::parse(lines.join("\n").as_bytes()).unwrap_or_else(|e| panic!("{lines:?}: {e}"))
    }

    /// One pattern, one path: moby/patternmatcher's matching table (parent directories
    /// included), Go's `filepath.Match` table, and the Docker documentation's examples.
    #[test]
    fn single_pattern_table() {
        let cases: &[(&str, &str, bool)] = &[
            // `**`
            ("**", "file", true),
            ("**/", "file", true),
            ("**", "dir/file", true),
            ("**/", "dir/file", true),
            ("**/**", "dir/file", true),
            ("dir/**", "dir/file", true),
            ("dir/**", "dir/dir2/file", true),
            ("dir/**", "dir", false),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def/ghi", true),
            ("**/dir", "dir", true),
            ("**/dir", "dir/file", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**/dir2/**", "dir/dir2/dir3/file", true),
            ("**file", "file", true),
            ("**file", "dir/file", true),
            ("**file", "dir/dir/file", true),
            ("**/file", "dir/dir/file", true),
            ("**/file*", "dir/dir/file.txt", true),
            ("**/file*txt", "dir/dir/file.txt", true),
            ("**/file*.txt*", "dir/dir/file.txt", true),
            ("**/**/*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("**/**/*.txt", "file.txt", true),
            ("a**/*.txt", "a/file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt**", "a/file.txt", true),
            ("**/foo/bar", "foo/bar", true),
            ("**/foo/bar", "dir/dir2/foo/bar", true),
            ("**/.foo", ".foo", true),
            ("**/.foo", "bar.foo", false),
            // Docker's suffix fast path: `**` + plain text means "ends with".
            ("**.go", "a/b/main.go", true),
            ("**foo", "xfoo", true),
            ("a**foo", "axfoo", false),
            ("a**foo", "ax/foo", true),
            ("**/*.go", "main.go", true),
            ("**/*.go", "cmd/x/main.go", true),
            // `*` and `?` stay within one component; parents count.
            ("*", "fileutils.go", true),
            ("*.go", "fileutils.go", true),
            ("*", "a/b/c", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a/*.txt", "a/file.txt", true),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("abc?def", "abcZdef", true),
            ("abc?def", "abcdef", false),
            ("a?b", "a/b", false),
            ("a*b", "a/b", false),
            ("a?b", "a☺b", true),
            ("a???b", "a☺b", false),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("*x", "xxx", true),
            // Classes: ranges, `^` negation, escapes; `!` is an ordinary character.
            ("a[b-d]e", "ace", true),
            ("a[b-d]e", "ae", false),
            ("a[b-d]e", "aae", false),
            ("a[^b-d]e", "aze", true),
            ("ab[^c]", "abc", false),
            ("ab[^e-g]", "abc", true),
            ("a[^a]b", "a☺b", true),
            ("[a-ζ]*", "α", true),
            ("*[a-ζ]", "A", false),
            ("[\\]a]", "]", true),
            ("[\\-]", "-", true),
            ("[x\\-]", "-", true),
            ("[x\\-]", "z", false),
            ("[!a]", "!", true),
            ("[!a]", "b", false),
            ("[*]", "*", true),
            ("[*]", "x", false),
            // Escapes and characters a regexp would treat specially.
            ("a\\*b", "a*b", true),
            ("a\\*b", "ab", false),
            ("a\\\\", "a\\", true),
            ("abc.def", "abcdef", false),
            ("abc.def", "abc.def", true),
            ("a(b)c/def", "a(b)c/def", true),
            ("a(b)c/def", "a(b)c/xyz", false),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
            (
                "dist/*.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            // `^` is literal (Docker would read an anchor here; see the module doc).
            ("^foo*", "^foobar", true),
            // Cleaning, leading `/` and `./`, parent directories (documentation).
            ("/foo/bar", "foo/bar", true),
            ("./foo/bar", "foo/bar", true),
            ("foo/bar", "foo/bar/baz", true),
            ("foo/bar", "bar", false),
            ("foo/bar", "x/foo/bar", false),
            ("foo/", "foo/x", true),
            ("a//b/./c/..", "a/b", true),
            ("/ foo", "foo", true),
            ("docs", "docs/README.md", true),
            ("*/temp*", "somedir/temporary.txt", true),
            ("*/temp*", "somedir/temp", true),
            ("*/temp*", "temp", false),
            ("*/*/temp*", "somedir/subdir/temporary.txt", true),
            ("*/*/temp*", "somedir/temporary.txt", false),
            ("temp?", "tempa", true),
            ("temp?", "somedir/tempa", false),
            // Patterns that can never match.
            (".", "a", false),
            ("..", "a", false),
            ("../a", "a", false),
            ("/", "a", false),
            // Names are bytes.
            ("a\u{fffd}", "a\u{fffd}", true),
            // Case matters.
            ("Readme", "README", false),
        ];
        for &(pattern, path, want) in cases {
            let r = rules(&[pattern]);
            assert_eq!(
                r.matches(path.as_bytes()),
                want,
                "pattern {pattern:?} path {path:?}"
            );
        }
    }

    #[test]
    fn non_utf8_names_match_byte_for_byte() {
        let r = IgnoreRules::parse(b"x\xff*\n?\xfe").unwrap();
        assert!(r.matches(b"x\xffyz"));
        assert!(!r.matches(b"x\xfeyz"));
        assert!(r.matches(b"a\xfe"));
        assert!(!r.matches(b"ab\xfe"));
        assert!(IgnoreRules::parse(b"[^a]").unwrap().matches(b"\xff"));
    }

    /// Several lines, one path: the last matching line decides.
    #[test]
    fn multi_pattern_table() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["**", "!util/docker/web"], "util/docker/web/foo", false),
            (
                &["**", "!util/docker/web", "util/docker/web/foo"],
                "util/docker/web/foo",
                true,
            ),
            (&["**", "!dist/*.whl"], "dist/proxy-1.0+g0-py3.whl", false),
            (&["!fileutils.go", "*.go"], "fileutils.go", true),
            (&["*.go", "!fileutils.go"], "fileutils.go", false),
            (&["docs", "!docs/README.md"], "docs/README.md", false),
            (&["docs/", "!docs/README.md"], "docs/README.md", false),
            (&["docs/*", "!docs/README.md"], "docs/README.md", false),
            (&["docs", "!docs/README.md"], "docs/other.md", true),
            // Documentation: the placement of `!` lines matters.
            (&["*.md", "!README.md"], "README.md", false),
            (&["*.md", "!README.md"], "CHANGES.md", true),
            (
                &["*.md", "!README*.md", "README-secret.md"],
                "README-secret.md",
                true,
            ),
            (
                &["*.md", "!README*.md", "README-secret.md"],
                "README-public.md",
                false,
            ),
            (
                &["*.md", "README-secret.md", "!README*.md"],
                "README-secret.md",
                false,
            ),
            // Include-list style: exclude everything, then name what to send.
            (&["*", "!src", "!package.json"], "src/a/b.js", false),
            (&["*", "!src", "!package.json"], "package.json", false),
            (&["*", "!src", "!package.json"], "README", true),
            // An exception below an excluded directory, then the directory again.
            (&["a", "!a/c", "a"], "a/c", true),
            (&["a", "!a/c"], "a/c/d", false),
            (&["a", "!a/c", "a/c/secret"], "a/c/secret", true),
            // A re-included directory keeps what is below it.
            (&["*", "!keep"], "keep/x/y", false),
        ];
        for &(patterns, path, want) in cases {
            let r = rules(patterns);
            assert_eq!(
                r.matches(path.as_bytes()),
                want,
                "patterns {patterns:?} path {path:?}"
            );
        }
    }

    /// What a walk computes directory by directory agrees with matching each path whole.
    #[test]
    fn matches_carried_down_a_walk_agree() {
        let rule_sets: &[&[&str]] = &[
            &["a", "!a/c", "a"],
            &["**", "!util/docker/web", "util/docker/web/foo"],
            &["*", "!src", "src/**/*.tmp", "!src/keep.tmp"],
            &[
                "**/node_modules",
                "!**/node_modules/keep",
                "docs/",
                "!docs/*.md",
            ],
            &["**.go", "!cmd/*/main.go", "[a-c]*/x?"],
        ];
        let paths = [
            "a/c/d",
            "a/b",
            "util/docker/web/foo/bar",
            "util/x",
            "src/a/b.tmp",
            "src/keep.tmp",
            "src/x/y",
            "web/node_modules/keep/z",
            "web/node_modules/q",
            "docs/a.md",
            "docs/img/b.png",
            "cmd/tool/main.go",
            "cmd/tool/util.go",
            "b/x1/y",
        ];
        for rules_text in rule_sets {
            let r = rules(rules_text);
            for path in paths {
                let mut matched = r.matched(b"");
                let mut at = Vec::new();
                for comp in path.split('/') {
                    if !at.is_empty() {
                        at.push(b'/');
                    }
                    at.extend_from_slice(comp.as_bytes());
                    matched = r.matched_child(&matched, &at);
                    assert_eq!(
                        r.excluded(&matched),
                        r.matches(&at),
                        "{rules_text:?} {path}"
                    );
                    assert_eq!(matched, r.matched(&at));
                    assert_eq!(
                        r.may_include_below_matched(&matched, &at),
                        r.may_include_below(&at)
                    );
                }
            }
        }
    }

    #[test]
    fn the_root_is_never_excluded() {
        let r = rules(&["*", "**", "."]);
        assert!(!r.matches(b""));
        assert!(!r.matches(b"."));
        assert!(r.may_include_below(b""));
    }

    #[test]
    fn file_syntax() {
        let text = "\u{feff}test1\r\n/test2\n/a/file/here\n\nlastfile\n# a comment\n  # not a comment\n\
                    ! /inverted/abs/path\n\t spaced \t\n!!bang\n/!neg\n\\!literal\n\u{a0}nbsp\u{a0}";
        let r = IgnoreRules::parse(text.as_bytes()).unwrap();
        let got: Vec<(usize, bool, String)> = r
            .patterns()
            .map(|(l, e, p)| (l, e, String::from_utf8_lossy(p).into_owned()))
            .collect();
        let want: Vec<(usize, bool, String)> = [
            (1, false, "test1"),
            (2, false, "test2"),
            (3, false, "a/file/here"),
            (5, false, "lastfile"),
            (7, false, "# not a comment"),
            (8, true, "inverted/abs/path"),
            (9, false, "spaced"),
            (10, true, "!bang"),
            (11, true, "neg"),
            (12, false, "\\!literal"),
            (13, false, "nbsp"),
        ]
        .iter()
        .map(|&(l, e, p)| (l, e, p.to_string()))
        .collect();
        assert_eq!(got, want);
        // `!!bang` re-includes the name `!bang`; `\!literal` excludes the name `!literal`.
        assert!(!r.matches(b"!bang") && r.matches(b"!literal"));
        assert!(r.has_exceptions());
        assert!(IgnoreRules::parse(b"").unwrap().is_empty());
        assert!(IgnoreRules::parse(b"# only\n\n   \n").unwrap().is_empty());
    }

    #[test]
    fn bad_patterns_name_their_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("ok\n[", 2, "unterminated"),
            ("a[", 1, "unterminated"),
            ("[^", 1, "unterminated"),
            ("[^bc", 1, "unterminated"),
            ("[]a]", 1, "must be escaped"),
            ("[-]", 1, "must be escaped"),
            ("[x-]", 1, "must be escaped"),
            ("[-x]", 1, "must be escaped"),
            ("[a-b-c]", 1, "must be escaped"),
            ("x\\", 1, "trailing"),
            ("a\n\n[z-a]", 3, "out of order"),
            ("[Local-Only]/", 1, "out of order"),
            ("a\n!", 2, "'!'"),
            ("!   ", 1, "'!'"),
            ("!/", 1, "'!'"),
        ];
        for &(text, line, reason) in cases {
            let err = IgnoreRules::parse(text.as_bytes()).unwrap_err();
            assert_eq!(err.line, line, "{text:?}");
            assert!(err.to_string().contains(reason), "{text:?}: {err}");
            assert!(err.to_string().starts_with(&format!("line {line}: \"")));
        }
    }

    #[test]
    fn descend_into_excluded_dirs_only_when_an_exception_may_apply() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["foo"], "foo", false),
            (&["foo", "!foo/keep"], "foo", true),
            (&["foo", "!foo/keep"], "foo/other", false),
            (&["foo", "!foo/keep"], "bar", true),
            (&["foo", "!bar/keep"], "foo", false),
            // An exception before the excluding line cannot win below it.
            (&["!foo/keep", "foo"], "foo", false),
            (&["foo", "!**/*.md"], "foo", true),
            (&["foo", "!*.md"], "foo", false),
            (&["foo", "!*/*.md"], "foo", true),
            (&["foo", "!*/*.md"], "foo/sub", false),
            (&["*", "!src"], "docs", false),
            (&["*", "!src"], "src", true),
            (&["**", "!**/go.mod"], "a/b", true),
            (&["a", "!a/c", "a"], "a", false),
            (&["foo", "!**keep"], "foo", true),
            (&["foo", "![f]oo/k*"], "foo", true),
            (&["foo", "![g]oo/k*"], "foo", false),
        ];
        for &(patterns, dir, want) in cases {
            let r = rules(patterns);
            assert_eq!(
                r.may_include_below(dir.as_bytes()),
                want,
                "patterns {patterns:?} dir {dir:?}"
            );
        }
    }

    #[test]
    fn deciding_line_points_at_the_last_match() {
        let r = rules(&["*.md", "!README*.md", "README-secret.md"]);
        assert_eq!(r.deciding_line(b"README-secret.md"), Some((3, false)));
        assert_eq!(r.deciding_line(b"README.md"), Some((2, true)));
        assert_eq!(r.deciding_line(b"main.rs"), None);
    }

    #[test]
    fn clean_like_go() {
        for (raw, want) in [
            ("", "."),
            (".", "."),
            ("/", "/"),
            ("//", "/"),
            ("a/", "a"),
            ("./a", "a"),
            ("a//b", "a/b"),
            ("a/./b", "a/b"),
            ("a/../b", "b"),
            ("a/..", "."),
            ("../a", "../a"),
            ("../../a/../b", "../../b"),
            ("/../a", "/a"),
            ("/a/b/../../..", "/"),
            ("a/b/c/../../..", "."),
            ("abc/def/../../../ghi", "../ghi"),
        ] {
            assert_eq!(clean_path(raw.as_bytes()), want.as_bytes(), "{raw:?}");
        }
    }

    #[test]
    fn path_match_is_gos_filepath_match() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "abc", true),
            ("*", ".hidden", true),
            ("*.txt", "a.txt", true),
            ("**", "abc", true),
            ("a*", "a/b", false),
            ("[z-a]", "m", false),
            ("[^z-a]", "m", true),
            ("f?le", "file", true),
            ("\\*", "*", true),
            ("\\*", "x", false),
        ];
        for &(pattern, name, want) in cases {
            let g = Glob::path_match(pattern.as_bytes()).unwrap();
            assert_eq!(g.matches(name.as_bytes()), want, "{pattern:?} {name:?}");
        }
        assert!(Glob::path_match(b"[").is_err());
        assert!(Glob::path_match(b"a\\").is_err());
        assert!(has_wildcards(b"a*"));
        assert!(has_wildcards(b"[ab]"));
        assert!(has_wildcards(b"a?"));
        assert!(!has_wildcards(b"a\\*b"));
        assert!(!has_wildcards(b"plain.txt"));
    }

    #[test]
    fn hostile_patterns_stay_linear() {
        let pattern = "*a".repeat(200) + "b";
        let r = rules(&[&pattern]);
        let path = "a".repeat(5000);
        assert!(!r.matches(path.as_bytes()));
    }

    #[test]
    fn ignore_file_choice() {
        let beside = |n: &str| IgnoreFileLocation::BesideBuildFile(n.as_bytes().to_vec());
        assert_eq!(
            ignore_file_candidates(Some(b"app.Containerfile")),
            vec![
                beside("app.Containerfile.dockerignore"),
                beside("app.Containerfile.containerignore"),
                IgnoreFileLocation::ContextRoot(b".containerignore"),
                IgnoreFileLocation::ContextRoot(b".dockerignore"),
            ]
        );
        let present = |names: &'static [&'static str]| {
            move |c: &IgnoreFileLocation| {
                names.iter().any(|n| match c {
                    IgnoreFileLocation::BesideBuildFile(b) => *b == n.as_bytes(),
                    IgnoreFileLocation::ContextRoot(r) => format!("/{}", ShowPath(r)) == *n,
                })
            }
        };
        let cases: &[(&[&str], Option<&str>)] = &[
            (&[], None),
            (&["/.dockerignore"], Some(".dockerignore")),
            (
                &["/.dockerignore", "/.containerignore"],
                Some(".containerignore"),
            ),
            (
                &["/.containerignore", "Containerfile.dockerignore"],
                Some("Containerfile.dockerignore"),
            ),
            (
                &[
                    "Containerfile.containerignore",
                    "Containerfile.dockerignore",
                ],
                Some("Containerfile.dockerignore"),
            ),
            (
                &["Containerfile.containerignore", "/.dockerignore"],
                Some("Containerfile.containerignore"),
            ),
        ];
        for &(names, want) in cases {
            let got = choose_ignore_file(Some(b"Containerfile"), present(names));
            assert_eq!(got.map(|c| c.to_string()).as_deref(), want, "{names:?}");
        }
        assert_eq!(
            choose_ignore_file(None, |_| true),
            Some(IgnoreFileLocation::ContextRoot(b".containerignore"))
        );
    }
}
