//! OCI layer tars: reading them into the on-disk overlay format (`import`) and writing an
//! upper directory out as a canonical layer tar (`export`).
//!
//! * [`tarfmt`]: the tar byte format, bounded on input, canonical on output.
//! * [`path`]: name validation and the OCI whiteout rules for names.
//! * [`compress`]: compression sniffing, codecs and the decompression-bomb limits.
//! * [`import`]: safe extraction into a directory, whiteouts converted to overlay format.
//! * [`export`]: the canonical tar of an upper directory (`layerfs diff`).
//!
//! One xattr policy serves both directions ([`keep_xattr`]), so a layer round-trips.

pub mod compress;
pub mod export;
pub mod import;
pub mod path;
pub mod tarfmt;

use crate::union::whiteout::is_private_xattr;

/// Whether an xattr is carried in layers (written by `diff`, applied by `import`).
///
/// Kept (an allow-list): `user.*`, `security.capability`, `system.posix_acl_access` and
/// `system.posix_acl_default`. Dropped: overlay, layerfs and fuse-overlayfs internals
/// (`{trusted,user}.overlay.*`, `*.layerfs.*`, `user.fuseoverlayfs.*`: they would change what
/// the union shows, so a tar can never set them), `security.selinux` (host labels, relabelled
/// by the runtime), every other `trusted.*` and `security.*` name, and anything else.
pub fn keep_xattr(name: &[u8]) -> bool {
    if is_private_xattr(name) {
        return false;
    }
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_policy() {
        for keep in [
            &b"user.mime_type"[..],
            b"security.capability",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
        ] {
            assert!(keep_xattr(keep));
        }
        for drop in [
            &b"trusted.overlay.opaque"[..],
            b"user.overlay.whiteout",
            b"user.layerfs.origin",
            b"trusted.layerfs.origin",
            b"trusted.overlay.origin",
            b"user.overlay.origin",
            b"trusted.overlay.impure",
            b"user.fuseoverlayfs.opaque",
            b"security.selinux",
            b"security.ima",
            b"trusted.md5",
            b"system.nfs4_acl",
        ] {
            assert!(!keep_xattr(drop), "{}", drop.escape_ascii());
        }
    }
}
