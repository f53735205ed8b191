//! Containerfile/Dockerfile parsing, following Docker's Dockerfile reference and BuildKit's
//! frontend where the reference is silent.
//!
//! [`expand`] is environment replacement (`$VAR`, `${VAR:-word}`, quotes, escapes), used by
//! the instruction layer and by the builder.

pub mod expand;

pub use expand::{ExpandError, Lookup, expand_word, expand_words};
