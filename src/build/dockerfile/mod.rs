//! Containerfile/Dockerfile parsing, following Docker's Dockerfile reference and BuildKit's
//! frontend where the reference is silent.
//!
//! - [`parser`]: lines, parser directives, comments, continuations, CRLF and BOM, and the
//!   word-level helpers (flags, JSON arrays, word splitting);
//! - [`instructions`]: one logical line into a typed [`Instruction`] with its flags checked;
//! - [`expand`]: environment replacement (`$VAR`, `${VAR:-word}`, quotes, escapes).

pub mod expand;
pub mod instructions;
pub mod parser;

pub use expand::{ExpandError, Lookup, expand_word, expand_words};
pub use instructions::{
    Add, Arg, ArgDef, CommandLine, Copy, FromInstruction, HealthConfig, Healthcheck, Instruction,
    KeyValue, Mount, MountField, Onbuild, Run,
};
pub use parser::MAX_LINE;

/// A Dockerfile that failed to parse. `line` is 1-based; 0 means the error concerns the file
/// as a whole. Display gives `line N: message`; the caller adds the file name.
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
