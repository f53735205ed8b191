//! The line layer of the Dockerfile parser: bytes in, logical lines out, plus the word-level
//! helpers the instruction layer uses (flags, JSON arrays, whitespace and quoted words).
//!
//! Rules, as BuildKit's `frontend/dockerfile/parser` applies them:
//!
//! - A UTF-8 byte-order mark at the start is dropped; lines end at `\n` and any `\r`/`\n` run at
//!   a line's end is trimmed, so CRLF files parse like LF files.
//! - Parser directives (`# escape=`, `# syntax=`, `# check=`; keys case-insensitive) are read
//!   only from the leading lines: the first line that is not a directive (an instruction, a
//!   blank line, any other comment, an unknown directive) ends them. A repeated directive and
//!   an escape other than `\` or `` ` `` are errors.
//! - A line whose first non-blank character is `#` is a comment. Leading whitespace of an
//!   instruction's first line is dropped; that of continuation lines is kept.
//! - A line ending with the escape character (blanks after it allowed) continues on the next
//!   line, unless that escape character is itself escaped. Comment lines and blank lines
//!   inside a continuation are skipped; the continuation ends at the first line that does not
//!   end with the escape character, or at the end of the file.
//!
//! Every logical line keeps the number of its first physical line (1-based). Invariants: no
//! logical line exceeds [`MAX_LINE`] bytes, and the text of every logical line is valid UTF-8
//! (comments are skipped before they are decoded, so they may hold any bytes).

use super::ParseError;

/// The largest logical line (after joining continuations), in bytes.
pub const MAX_LINE: usize = 1 << 20;

/// What the parser directives at the top of the file said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    /// The escape character: `\` unless `# escape=`` ` ``.
    pub escape: char,
    /// `# syntax=` as written (the frontend image a BuildKit build would use).
    pub syntax: Option<String>,
    /// `# check=` as written (BuildKit's lint configuration).
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            syntax: None,
            check: None,
        }
    }
}

/// One instruction's text after joining continuations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalLine {
    /// 1-based number of the first physical line.
    pub line: usize,
    /// The joined text, trimmed of surrounding whitespace.
    pub text: String,
}

/// The result of the line layer.
#[derive(Debug)]
pub struct Lines {
    pub directives: Directives,
    pub lines: Vec<LogicalLine>,
}

/// Split a Dockerfile into directives and logical lines.
pub fn logical_lines(input: &[u8]) -> Result<Lines, ParseError> {
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let mut phys = input.split_inclusive(|&b| b == b'\n').map(trim_newline);
    let mut directives = Directives::default();
    let mut in_directives = true;
    let mut seen: Vec<String> = Vec::new();
    let mut lines = Vec::new();
    let mut n = 0;
    while let Some(raw) = phys.next() {
        n += 1;
        let first = trim_leading_space(raw);
        if in_directives {
            in_directives = directive(first, &mut directives, &mut seen)
                .map_err(|message| ParseError { line: n, message })?;
        }
        if first.is_empty() || first[0] == b'#' {
            continue;
        }
        let start = n;
        let too_long = || ParseError {
            line: start,
            message: format!("instruction longer than {} KiB", MAX_LINE >> 10),
        };
        let (piece, mut more) = trim_continuation(first, directives.escape);
        if piece.len() > MAX_LINE {
            return Err(too_long());
        }
        let mut buf = piece.to_vec();
        while more {
            let Some(raw) = phys.next() else { break };
            n += 1;
            let stripped = trim_leading_space(raw);
            // Docker drops comment lines and blank lines inside a continuation (the latter
            // with a deprecation warning).
            if stripped.is_empty() || stripped[0] == b'#' {
                continue;
            }
            let (piece, m) = trim_continuation(raw, directives.escape);
            more = m;
            if buf.len() + piece.len() > MAX_LINE {
                return Err(too_long());
            }
            buf.extend_from_slice(piece);
        }
        let text = String::from_utf8(buf).map_err(|e| ParseError {
            line: start,
            message: format!(
                "instruction is not valid UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            ),
        })?;
        let text = text.trim();
        if text.is_empty() {
            // Only escape characters and blank lines up to the end of the file. Docker makes
            // an empty instruction of it and fails on it as unknown; nothing is lost by
            // skipping it.
            continue;
        }
        lines.push(LogicalLine {
            line: start,
            text: text.to_string(),
        });
    }
    Ok(Lines { directives, lines })
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|&b| b != b'\r' && b != b'\n')
        .map_or(0, |i| i + 1);
    &line[..end]
}

/// Drop leading Unicode whitespace; an invalid UTF-8 byte stops the trimming.
fn trim_leading_space(line: &[u8]) -> &[u8] {
    let valid = match std::str::from_utf8(line) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&line[..e.valid_up_to()]).unwrap_or(""),
    };
    let trimmed = valid.trim_start();
    &line[valid.len() - trimmed.len()..]
}

/// Strip a trailing continuation (the escape character, then blanks) unless the escape
/// character is itself escaped. Returns the rest and whether the line continues.
fn trim_continuation(line: &[u8], escape: char) -> (&[u8], bool) {
    let e = escape as u8;
    let end = line
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    if end == 0 || line[end - 1] != e {
        return (line, false);
    }
    let at = end - 1;
    if at > 0 && line[at - 1] == e {
        return (line, false);
    }
    (&line[..at], true)
}

/// Look at one leading line for a parser directive. Returns whether directives may still
/// follow.
fn directive(line: &[u8], d: &mut Directives, seen: &mut Vec<String>) -> Result<bool, String> {
    let Some(rest) = line.strip_prefix(b"#") else {
        return Ok(false);
    };
    let Ok(rest) = std::str::from_utf8(trim_leading_space(rest)) else {
        return Ok(false);
    };
    let Some((key, value)) = split_directive(rest) else {
        return Ok(false);
    };
    let key = key.to_ascii_lowercase();
    if !matches!(key.as_str(), "syntax" | "escape" | "check") {
        return Ok(false);
    }
    if seen.contains(&key) {
        return Err(format!("only one {key} parser directive can be used"));
    }
    match key.as_str() {
        "escape" => match value {
            "\\" => d.escape = '\\',
            "`" => d.escape = '`',
            v => return Err(format!("invalid escape token '{v}' does not match ` or \\")),
        },
        "syntax" => d.syntax = Some(value.to_string()),
        _ => d.check = Some(value.to_string()),
    }
    seen.push(key);
    Ok(true)
}

/// `key = value`, key `[a-zA-Z][a-zA-Z0-9]*`, blanks around `=` and after the value ignored.
fn split_directive(s: &str) -> Option<(&str, &str)> {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r');
    let key_end = s
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
        .map_or(s.len(), |(i, _)| i);
    if key_end == 0 {
        return None;
    }
    let (key, rest) = s.split_at(key_end);
    let rest = rest.trim_start_matches(is_space).strip_prefix('=')?;
    if rest.is_empty() {
        return None;
    }
    let value = rest.trim_matches(is_space);
    if !value.is_empty() {
        return Some((key, value));
    }
    // The regexp's lazy value takes one blank when there is nothing else.
    let first = rest.chars().next().map_or(0, char::len_utf8);
    Some((key, &rest[..first]))
}

fn is_split_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0b' | '\x0c' | '\r')
}

/// Split an instruction into its keyword, its leading `--flags` and the rest.
pub fn split_command(line: &str, escape: char) -> (&str, Vec<String>, String) {
    let line = line.trim();
    match line.split_once(is_split_space) {
        None => (line, Vec::new(), String::new()),
        Some((cmd, rest)) => {
            let (rest, flags) = extract_flags(rest, escape);
            (cmd, flags, rest.trim().to_string())
        }
    }
}

/// Leading words that start with `--`, unquoted and unescaped; a lone `--` ends them.
fn extract_flags(line: &str, escape: char) -> (&str, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut buf = String::new();
    let mut blank_ok = false;
    let mut i = 0;
    loop {
        let Some(&(off, ch)) = chars.get(i) else {
            if phase != Phase::Spaces && buf != "--" && (blank_ok || !buf.is_empty()) {
                words.push(buf);
            }
            return ("", words);
        };
        if phase == Phase::Spaces {
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            if ch != '-' || chars.get(i + 1).map(|c| c.1) != Some('-') {
                return (&line[off..], words);
            }
            phase = Phase::Word;
        }
        match phase {
            Phase::Word if ch.is_whitespace() => {
                if buf == "--" {
                    return (&line[off..], words);
                }
                if blank_ok || !buf.is_empty() {
                    words.push(std::mem::take(&mut buf));
                }
                buf.clear();
                blank_ok = false;
                phase = Phase::Spaces;
            }
            Phase::Word if ch == '\'' || ch == '"' => {
                phase = Phase::Quote(ch);
                blank_ok = true;
            }
            Phase::Quote(q) if ch == q => phase = Phase::Word,
            _ => {
                if ch == escape {
                    match chars.get(i + 1) {
                        Some(&(_, c)) => {
                            buf.push(c);
                            i += 1;
                        }
                        // An escape at the very end is dropped.
                        None => {
                            if matches!(phase, Phase::Quote(_)) {
                                phase = Phase::Word;
                            }
                        }
                    }
                } else {
                    buf.push(ch);
                }
            }
        }
        i += 1;
    }
}

/// Whether an argument string is a JSON array, and of what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    /// Not a parseable JSON array: the shell form applies.
    NotJson,
    /// A JSON array of strings: the exec form.
    Strings(Vec<String>),
    /// A JSON array holding something else: an error in Docker, not a fallback.
    NotStrings,
}

pub fn parse_json(rest: &str) -> Json {
    let t = rest.trim_start();
    if !t.starts_with('[') {
        return Json::NotJson;
    }
    match serde_json::from_str::<serde_json::Value>(t) {
        Ok(serde_json::Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    serde_json::Value::String(s) => out.push(s),
                    _ => return Json::NotStrings,
                }
            }
            Json::Strings(out)
        }
        // Go decodes arbitrarily deep arrays and then finds they hold arrays, not strings;
        // serde_json stops at depth 128. Past that depth we refuse without looking further,
        // even where Go would have found a syntax error and fallen back to the shell form.
        Err(e) if e.to_string().contains("recursion limit") => Json::NotStrings,
        _ => Json::NotJson,
    }
}

/// Split on runs of ASCII blanks, quotes meaning nothing (FROM, EXPOSE, and the shell form of
/// COPY, ADD and VOLUME).
pub fn split_blanks(rest: &str) -> Vec<String> {
    rest.split(is_split_space)
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Split into words on whitespace outside quotes, keeping quotes and escapes in the words for
/// environment replacement to interpret later (ENV, LABEL, ARG).
pub fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut buf = String::new();
    let mut blank_ok = false;
    let mut i = 0;
    while i <= chars.len() {
        let Some(&ch) = chars.get(i) else {
            if phase != Phase::Spaces && (blank_ok || !buf.is_empty()) {
                words.push(std::mem::take(&mut buf));
            }
            break;
        };
        i += 1;
        if phase == Phase::Spaces {
            if ch.is_whitespace() {
                continue;
            }
            phase = Phase::Word;
        }
        match phase {
            Phase::Word => {
                if ch.is_whitespace() {
                    phase = Phase::Spaces;
                    if blank_ok || !buf.is_empty() {
                        words.push(std::mem::take(&mut buf));
                    }
                    blank_ok = false;
                    continue;
                }
                if ch == '\'' || ch == '"' {
                    phase = Phase::Quote(ch);
                    blank_ok = true;
                }
                if ch == escape {
                    let Some(&next) = chars.get(i) else { continue };
                    buf.push(ch);
                    buf.push(next);
                    i += 1;
                    continue;
                }
                buf.push(ch);
            }
            Phase::Quote(q) => {
                if ch == q {
                    phase = Phase::Word;
                } else if ch == escape && q != '\'' {
                    let Some(&next) = chars.get(i) else {
                        phase = Phase::Word;
                        continue;
                    };
                    buf.push(ch);
                    buf.push(next);
                    i += 1;
                    continue;
                }
                buf.push(ch);
            }
            Phase::Spaces => {}
        }
    }
    words
}

/// Whether a shell-form argument string uses a heredoc (`<<EOF`, `<<-EOF`, `2<<"EOF"`), by
/// BuildKit's rule: a word made of optional digits, `<<`, an optional `-`, optional blanks and
/// a name without `<`.
pub fn has_heredoc(rest: &str) -> bool {
    if !rest.contains("<<") {
        return false;
    }
    // Tokenize like BuildKit's raw lexer: quotes and `\` keep their characters, blanks after
    // `<<` stay in the word.
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut it = rest.chars().peekable();
    while let Some(c) = it.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == q {
                    quote = None;
                } else if c == '\\' && q == '"' {
                    cur.extend(it.next());
                }
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    cur.push(c);
                }
                '\\' => {
                    cur.push(c);
                    cur.extend(it.next());
                }
                '<' if it.peek() == Some(&'<') => {
                    it.next();
                    cur.push_str("<<");
                    while let Some(&b @ (' ' | '\t' | '\r')) = it.peek() {
                        cur.push(b);
                        it.next();
                    }
                }
                c if c.is_whitespace() => {
                    if !cur.is_empty() {
                        words.push(std::mem::take(&mut cur));
                    }
                }
                c => cur.push(c),
            },
        }
    }
    words.push(cur);
    words.iter().any(|w| {
        let w = w.trim_start_matches(|c: char| c.is_ascii_digit());
        let Some(w) = w.strip_prefix("<<") else {
            return false;
        };
        let w = w.strip_prefix('-').unwrap_or(w);
        let name = w.trim_start();
        !name.is_empty() && !name.contains('<')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &str) -> Vec<(usize, String)> {
        logical_lines(input.as_bytes())
            .unwrap()
            .lines
            .into_iter()
            .map(|l| (l.line, l.text))
            .collect()
    }

    /// Input next to the logical lines it gives, continuation cases from BuildKit's
    /// `continueIndent`, `trailing-backslash`, `continue-at-eof` and `escapes` test files.
    #[test]
    fn continuation_table() {
        let cases: &[(&str, &[(usize, &str)])] = &[
            ("RUN a", &[(1, "RUN a")]),
            ("  RUN a  \n", &[(1, "RUN a")]),
            ("RUN a\r\nRUN b\r\n", &[(1, "RUN a"), (2, "RUN b")]),
            ("\u{feff}RUN a", &[(1, "RUN a")]),
            (
                "RUN echo hello\\\n  world\\\n  goodnight  \\\n  moon\\\n  light\\\nning",
                &[(1, "RUN echo hello  world  goodnight    moon  lightning")],
            ),
            (
                "RUN echo hello  \\\n  world",
                &[(1, "RUN echo hello    world")],
            ),
            (
                "RUN echo hello  \\  \nworld",
                &[(1, "RUN echo hello  world")],
            ),
            (
                "RUN echo hi \\\n \\\n world \\\n\\\n good\\\n\\\nnight",
                &[(1, "RUN echo hi   world  goodnight")],
            ),
            (
                "RUN echo hello \\\n# this is a comment\n\n# comment after blank\n\nthis is more\nRUN x",
                &[(1, "RUN echo hello this is more"), (7, "RUN x")],
            ),
            ("RUN something \\", &[(1, "RUN something")]),
            (
                "ENV C trailing\\\\backslash\\\\\nENV D x",
                &[(1, "ENV C trailing\\\\backslash\\\\"), (2, "ENV D x")],
            ),
            ("ENV E hello\\\n\\\nworld", &[(1, "ENV E helloworld")]),
            ("ENV F hello\\\n \\\nworld", &[(1, "ENV F hello world")]),
            ("RUN foo \\\n\nbar \\\n\nbaz\n", &[(1, "RUN foo bar baz")]),
            ("RUN a \\\r\n  b\r\n", &[(1, "RUN a   b")]),
            (
                "# c\n\n   # indented comment\nRUN a # not a comment",
                &[(4, "RUN a # not a comment")],
            ),
            ("\\\nRUN a", &[(1, "RUN a")]),
            ("RUN a\\\n# comment \\\nb", &[(1, "RUN ab")]),
        ];
        for (input, want) in cases {
            let want: Vec<(usize, String)> =
                want.iter().map(|(n, s)| (*n, s.to_string())).collect();
            assert_eq!(lines(input), want, "{input:?}");
        }
    }

    #[test]
    fn directives_table() {
        let d = |input: &str| logical_lines(input.as_bytes()).map(|l| l.directives);
        let dir = |escape, syntax: Option<&str>, check: Option<&str>| Directives {
            escape,
            syntax: syntax.map(str::to_string),
            check: check.map(str::to_string),
        };
        let cases: &[(&str, Directives)] = &[
            ("FROM a", dir('\\', None, None)),
            ("# escape=`\nFROM a", dir('`', None, None)),
            ("#escape = `\n\nFROM a", dir('`', None, None)),
            ("# ESCAPE=`  \nFROM a", dir('`', None, None)),
            ("\t#\tdIrEcTiVe=x\n# escape=`\n", dir('\\', None, None)),
            (
                "# syntax = docker/dockerfile:1\n# escape = `\n# check=skip=all\n",
                dir('`', Some("docker/dockerfile:1"), Some("skip=all")),
            ),
            ("# comment\n# escape=`\nFROM a", dir('\\', None, None)),
            ("\n# escape=`\nFROM a", dir('\\', None, None)),
            ("FROM a\n# escape=`\n", dir('\\', None, None)),
            ("# unknown=1\n# escape=`\n", dir('\\', None, None)),
            ("# escape=\\\n", dir('\\', None, None)),
            ("\u{feff}# escape=`\n", dir('`', None, None)),
        ];
        for (input, want) in cases {
            assert_eq!(d(input).as_ref(), Ok(want), "{input:?}");
        }
        for (input, line, msg) in [
            (
                "# escape=`\n# escape=\\\n",
                2,
                "only one escape parser directive can be used",
            ),
            (
                "# syntax=a\n# SYNTAX=b\n",
                2,
                "only one syntax parser directive can be used",
            ),
            (
                "# escape=x\n",
                1,
                "invalid escape token 'x' does not match ` or \\",
            ),
            (
                "# escape=  \n",
                1,
                "invalid escape token ' ' does not match ` or \\",
            ),
        ] {
            let e = d(input).unwrap_err();
            assert_eq!((e.line, e.message.as_str()), (line, msg), "{input:?}");
        }
    }

    #[test]
    fn backtick_escape_continues_lines() {
        let input = "# escape=`\n\nFROM mcr.microsoft.com/windows\nCOPY testfile.txt c:\\\nRUN dir c:\\ `\n  && echo ok\nENV GOPATH `\n\\go";
        assert_eq!(
            lines(input),
            vec![
                (3, "FROM mcr.microsoft.com/windows".to_string()),
                (4, "COPY testfile.txt c:\\".to_string()),
                (5, "RUN dir c:\\   && echo ok".to_string()),
                (7, "ENV GOPATH \\go".to_string()),
            ]
        );
    }

    #[test]
    fn bad_utf8_and_long_lines() {
        let ok = logical_lines(b"#\xff comment with a bad byte\n  #\xfe\nRUN a").unwrap();
        assert_eq!(ok.lines[0].line, 3);
        let e = logical_lines(b"FROM a\nRUN \xff\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("UTF-8"), "{e}");

        let long = format!("RUN {}", "x".repeat(MAX_LINE));
        let e = logical_lines(long.as_bytes())
            .map(|l| l.lines.len())
            .unwrap_err();
        assert_eq!(e.line, 1);
        let joined = format!("RUN a \\\n{}", "yyyy \\\n".repeat(MAX_LINE / 4));
        let e = logical_lines(joined.as_bytes())
            .map(|l| l.lines.len())
            .unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("longer than 1024 KiB"), "{e}");
    }

    #[test]
    fn split_command_table() {
        let cases: &[(&str, &str, &[&str], &str)] = &[
            ("RUN a b", "RUN", &[], "a b"),
            ("RUN", "RUN", &[], ""),
            (
                "COPY --user=me --doit=true foo /tmp/",
                "COPY",
                &["--user=me", "--doit=true"],
                "foo /tmp/",
            ),
            (
                "COPY --doit=true -- foo /tmp/",
                "COPY",
                &["--doit=true"],
                "foo /tmp/",
            ),
            ("COPY -- foo /tmp/", "COPY", &[], "foo /tmp/"),
            (
                "CMD --doit [ \"a\", \"b\" ]",
                "CMD",
                &["--doit"],
                "[ \"a\", \"b\" ]",
            ),
            ("CMD --doit -- [ ]", "CMD", &["--doit"], "[ ]"),
            (
                "RUN --mount=\"type=bind,src=a b\" x",
                "RUN",
                &["--mount=type=bind,src=a b"],
                "x",
            ),
            ("RUN --a=\\\" x", "RUN", &["--a=\""], "x"),
            ("RUN --a=''", "RUN", &["--a="], ""),
            ("RUN\t-x y", "RUN", &[], "-x y"),
            ("COPY\t\t.\t/", "COPY", &[], ".\t/"),
        ];
        for (line, cmd, flags, rest) in cases {
            let (c, f, r) = split_command(line, '\\');
            let f: Vec<&str> = f.iter().map(String::as_str).collect();
            assert_eq!(
                (c, f.as_slice(), r.as_str()),
                (*cmd, *flags, *rest),
                "{line}"
            );
        }
    }

    /// JSON arrays of strings give the exec form; anything unparseable falls back to the shell
    /// form; a parseable array of anything else is an error (BuildKit's `json` and
    /// `jeztah-invalid-json-*` test files).
    #[test]
    fn json_table() {
        let s = |v: &[&str]| Json::Strings(v.iter().map(|s| s.to_string()).collect());
        let cases: &[(&str, Json)] = &[
            ("[]", s(&[])),
            ("[\"\"]", s(&[""])),
            ("[\"a\",\"b\"]", s(&["a", "b"])),
            ("[\t\"a\",\t\"b\"\t]\t", s(&["a", "b"])),
            (
                "[\"abc 123\", \"♥\", \"\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0000\"]",
                s(&["abc 123", "♥", "\" \\ / \u{8} \u{c} \n \r \t \0"]),
            ),
            ("'[\"echo\", \"JSON in a string\"]'", Json::NotJson),
            ("[\"echo\", \"unterminated\"", Json::NotJson),
            ("['echo','single quotes']", Json::NotJson),
            ("[\"echo\", \"no quote!]", Json::NotJson),
            ("[\"a\"] trailing", Json::NotJson),
            ("echo [\"a\"]", Json::NotJson),
            ("[\"a\", 1]", Json::NotStrings),
            ("[ \"echo\", [ \"nested json\" ] ]", Json::NotStrings),
            ("[null]", Json::NotStrings),
        ];
        for (input, want) in cases {
            assert_eq!(&parse_json(input), want, "{input}");
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse_json(&deep), Json::NotStrings);
    }

    /// ENV/LABEL/ARG words keep quotes and escapes (BuildKit's `env` test file).
    #[test]
    fn parse_words_table() {
        let cases: &[(&str, &[&str])] = &[
            ("name=value", &["name=value"]),
            ("name=\"value value1\"", &["name=\"value value1\""]),
            ("name=value\\ value2", &["name=value\\ value2"]),
            (
                "name=\"value'quote space'value2\"",
                &["name=\"value'quote space'value2\""],
            ),
            ("name='a\\'b''", &["name='a\\'b''"]),
            ("name=\"a\\\"b\"", &["name=\"a\\\"b\""]),
            ("a=1  b=2\tc=", &["a=1", "b=2", "c="]),
            ("abc=\"123 456\" def", &["abc=\"123 456\"", "def"]),
            ("\"\"", &["\"\""]),
            ("x\\", &["x"]),
            ("", &[]),
        ];
        for (input, want) in cases {
            assert_eq!(parse_words(input, '\\'), *want, "{input}");
        }
    }

    #[test]
    fn heredoc_detection() {
        for yes in [
            "cat <<EOF",
            "<<EOF /dst",
            "cat <<-EOF",
            "cat << EOF",
            "python3 3<<\"EOF\"",
            "cat <<'E O F'",
        ] {
            assert!(has_heredoc(yes), "{yes}");
        }
        for no in [
            "echo $((1<<2))",
            "cat <<<\"here string\"",
            "echo '<<EOF'",
            "echo a\\<<b",
            "echo <<",
            "x=1<<2",
        ] {
            assert!(!has_heredoc(no), "{no}");
        }
    }
}
