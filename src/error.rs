//! The one error type of the library half of layerfs.
//!
//! Every fallible operation below the CLI returns [`Error`]. It keeps the underlying OS error
//! (or a protocol-level errno chosen by the union logic) plus a short description of what was
//! being done and to which path. [`Error::errno`] is the single place where an error becomes
//! the errno a FUSE request answers with; the CLI prints [`Error`] with `Display` as a one-line
//! reason. `anyhow` is used only in `main.rs`/`cli.rs`.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with enough context to print a one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The operation is refused by filesystem semantics (ENOENT, ENOTEMPTY, EXDEV, ...).
    #[error("{context}: {}", io::Error::from_raw_os_error(*.errno))]
    Errno { errno: i32, context: String },
    /// Input that layerfs refuses to act on (a hostile tar, a bad option, a bad reference).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A bare errno without context: used on hot FUSE paths where building a message would
    /// cost more than the request itself.
    pub fn os(errno: i32) -> Self {
        Error::Errno {
            errno,
            context: String::new(),
        }
    }

    /// An errno with a description of what was attempted.
    pub fn os_ctx(errno: i32, context: impl Into<String>) -> Self {
        Error::Errno {
            errno,
            context: context.into(),
        }
    }

    /// Wrap an `io::Error` with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Input rejected by validation.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }

    /// The errno a FUSE request answers with. Unknown OS errors become EIO; validation
    /// failures become EINVAL.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Errno { errno, .. } => *errno,
            Error::Invalid(_) => libc::EINVAL,
        }
    }

    /// Add context to an error that has none (bare errnos from hot paths).
    pub fn context(self, context: impl Into<String>) -> Self {
        match self {
            Error::Errno { errno, context: c } if c.is_empty() => Error::Errno {
                errno,
                context: context.into(),
            },
            Error::Io { source, context: c } if c.is_empty() => Error::Io {
                context: context.into(),
                source,
            },
            other => other,
        }
    }

    /// True when the underlying errno is `code`.
    pub fn is(&self, code: i32) -> bool {
        self.errno() == code
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Self {
        Error::Io {
            context: String::new(),
            source,
        }
    }
}

impl From<nix::errno::Errno> for Error {
    fn from(errno: nix::errno::Errno) -> Self {
        Error::os(errno as i32)
    }
}

/// Attach context lazily to a `Result`.
pub trait ResultExt<T> {
    /// Describe the failed operation; the closure runs only on error.
    fn with_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn with_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

/// Printable form of a byte path for messages: non-UTF-8 bytes are escaped, never dropped.
pub struct ShowPath<'a>(pub &'a [u8]);

impl fmt::Display for ShowPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

/// Shorthand for [`ShowPath`] of an `OsStr`/`Path`.
pub fn show(p: &(impl AsRef<OsStr> + ?Sized)) -> ShowPath<'_> {
    ShowPath(p.as_ref().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_through() {
        assert_eq!(Error::os(libc::ENOTEMPTY).errno(), libc::ENOTEMPTY);
        let e = Error::io("open x", io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(e.errno(), libc::EACCES);
        assert_eq!(Error::invalid("bad").errno(), libc::EINVAL);
        let e: Error = io::Error::other("weird").into();
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn context_only_fills_empty() {
        let e = Error::os(libc::ENOENT).context("lookup a");
        assert_eq!(
            e.to_string(),
            format!("lookup a: {}", io::Error::from_raw_os_error(libc::ENOENT))
        );
        let e = e.context("other");
        assert!(e.to_string().starts_with("lookup a"));
    }

    #[test]
    fn show_escapes_non_utf8() {
        assert_eq!(ShowPath(b"a\xffb").to_string(), "a\\xffb");
    }
}
