//! The container runner that `layerfs build` (one `RUN` step) and `layerfs run` share: run a
//! command in a root filesystem that is already mounted through an OCI runtime (runc or crun).
//!
//! So far: resolving a `USER` string through the image's own /etc/passwd and /etc/group
//! (`user`).

mod user;

use std::io;

pub use user::{
    GroupEntry, PasswdEntry, User, parse_group, parse_passwd, resolve_in, resolve_user,
    resolve_user_at,
};

/// Why a run could not happen.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A `USER` that cannot be resolved in the image.
    #[error("user \"{spec}\": {reason}")]
    User { spec: String, reason: String },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A spec layerfs refuses to run.
    #[error("{0}")]
    Invalid(String),
}

impl RunError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        RunError::Io {
            context: context.into(),
            source,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        RunError::Invalid(message.into())
    }
}

impl From<RunError> for crate::error::Error {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Io { context, source } => crate::error::Error::io(context, source),
            other => crate::error::Error::invalid(other.to_string()),
        }
    }
}
