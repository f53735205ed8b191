//! Whiteout and opaque-directory rules: every dialect layerfs reads, the one format it writes.
//!
//! Read from any layer (kernel overlayfs rules, plus the AUFS/OCI dialect in lowers):
//! * a character device 0/0 is a whiteout;
//! * a zero-size regular file with `{trusted,user}.overlay.whiteout` is a whiteout when its
//!   directory is marked `{trusted,user}.overlay.opaque=x` (kernel "xwhiteouts");
//! * `.wh.NAME` (lowers only) hides NAME in the layers below; `.wh..wh..opq` makes its directory
//!   opaque; both markers themselves are never shown;
//! * a directory is opaque when `{trusted,user}.overlay.opaque=y` or
//!   `user.fuseoverlayfs.opaque=y`.
//!
//! Written to the upper: char 0/0 whiteouts, `<ns>.overlay.opaque=y`, and on copied-up
//! objects `<ns>.overlay.origin` (see [`super::origin`]), where `<ns>` is
//! `trusted` when we may write trusted xattrs, `user` otherwise (the kernel's `userxattr` mode,
//! where whiteouts are zero-size files with `user.overlay.whiteout`).
//!
//! Private xattrs (`*.overlay.*`, `*.layerfs.*`, `user.fuseoverlayfs.*`) are never shown through
//! the mount and never accepted from users.

/// Prefix of AUFS/OCI whiteout names.
pub const WH_PREFIX: &[u8] = b".wh.";
/// The AUFS/OCI opaque marker name.
pub const WH_OPAQUE: &[u8] = b".wh..wh..opq";

pub const TRUSTED_OPAQUE: &[u8] = b"trusted.overlay.opaque";
pub const USER_OPAQUE: &[u8] = b"user.overlay.opaque";
pub const FUSEOVERLAYFS_OPAQUE: &[u8] = b"user.fuseoverlayfs.opaque";
pub const TRUSTED_WHITEOUT: &[u8] = b"trusted.overlay.whiteout";
pub const USER_WHITEOUT: &[u8] = b"user.overlay.whiteout";
pub const TRUSTED_ORIGIN: &[u8] = b"trusted.overlay.origin";
pub const USER_ORIGIN: &[u8] = b"user.overlay.origin";

/// Which xattr namespace layerfs writes its markers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrNs {
    Trusted,
    User,
}

impl XattrNs {
    pub fn opaque(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => TRUSTED_OPAQUE,
            XattrNs::User => USER_OPAQUE,
        }
    }
    pub fn whiteout(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => TRUSTED_WHITEOUT,
            XattrNs::User => USER_WHITEOUT,
        }
    }
    /// Where a copied-up object records the lower object it came from (kernel format, see
    /// [`super::origin`]).
    pub fn origin(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => TRUSTED_ORIGIN,
            XattrNs::User => USER_ORIGIN,
        }
    }
    /// Where layerfs before the kernel format recorded a copied-up object's inode number
    /// (read, never written).
    pub fn legacy_origin(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => b"trusted.layerfs.origin",
            XattrNs::User => b"user.layerfs.origin",
        }
    }
    /// Where a renamed directory records where its lower copies are (see
    /// [`super::redirect`]).
    pub fn redirect(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => super::redirect::TRUSTED_REDIRECT,
            XattrNs::User => super::redirect::USER_REDIRECT,
        }
    }
    /// The kernel's mark on a metadata-only copy: the data is in a lower layer (see
    /// [`super::metacopy`]).
    pub fn metacopy(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => super::metacopy::TRUSTED_METACOPY,
            XattrNs::User => super::metacopy::USER_METACOPY,
        }
    }
    /// The kernel's mark on a directory that may hold copied-up objects (so its plain
    /// listings show their origin numbers).
    pub fn impure(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => b"trusted.overlay.impure",
            XattrNs::User => b"user.overlay.impure",
        }
    }
    /// The persistent identity the kernel gives a new overlay, on the upper root.
    pub fn uuid(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => b"trusted.overlay.uuid",
            XattrNs::User => b"user.overlay.uuid",
        }
    }
}

/// How whiteouts are written into the upper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutFormat {
    /// Character device 0/0 (needs CAP_MKNOD).
    CharDev,
    /// Zero-size file with `user.overlay.whiteout`, parent marked `user.overlay.opaque=x`.
    UserXattr,
}

/// What the opaque xattrs of a directory say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirMarks {
    /// Lower layers' entries are hidden below this directory.
    pub opaque: bool,
    /// Zero-size files in this directory may be xattr whiteouts (`opaque=x`).
    pub xwhiteouts: bool,
}

/// Interpret one opaque-xattr value.
pub fn opaque_value(value: &[u8]) -> DirMarks {
    match value {
        b"y" => DirMarks {
            opaque: true,
            xwhiteouts: false,
        },
        b"x" => DirMarks {
            opaque: false,
            xwhiteouts: true,
        },
        _ => DirMarks::default(),
    }
}

/// True for xattr names that belong to overlay implementations or to layerfs itself and must
/// never be shown to, or set by, users of the mount.
pub fn is_private_xattr(name: &[u8]) -> bool {
    let rest = if let Some(r) = name.strip_prefix(b"trusted.") {
        r
    } else if let Some(r) = name.strip_prefix(b"user.") {
        r
    } else {
        return false;
    };
    rest.starts_with(b"overlay.")
        || rest.starts_with(b"layerfs.")
        || rest.starts_with(b"fuseoverlayfs.")
}

/// Classify a name found in a lower layer's directory listing by the AUFS dialect.
#[derive(Debug, PartialEq, Eq)]
pub enum AufsName<'a> {
    /// `.wh..wh..opq`: the directory is opaque.
    Opaque,
    /// `.wh.NAME`: NAME is deleted.
    Whiteout(&'a [u8]),
    /// Any other `.wh..wh.*` name: an AUFS internal (hard-link dirs and the like); hidden.
    Internal,
    /// An ordinary name.
    Plain,
}

pub fn classify_aufs(name: &[u8]) -> AufsName<'_> {
    if name == WH_OPAQUE {
        return AufsName::Opaque;
    }
    match name.strip_prefix(WH_PREFIX) {
        Some(rest) if rest.starts_with(WH_PREFIX) => AufsName::Internal,
        Some(rest) if !rest.is_empty() => AufsName::Whiteout(rest),
        _ => AufsName::Plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aufs_names() {
        assert_eq!(classify_aufs(b".wh..wh..opq"), AufsName::Opaque);
        assert_eq!(classify_aufs(b".wh.foo"), AufsName::Whiteout(b"foo"));
        assert_eq!(classify_aufs(b".wh..wh.plnk"), AufsName::Internal);
        assert_eq!(classify_aufs(b".wh."), AufsName::Plain);
        assert_eq!(classify_aufs(b"foo.wh.bar"), AufsName::Plain);
        assert_eq!(classify_aufs(b".wh.\xff"), AufsName::Whiteout(b"\xff"));
    }

    #[test]
    fn opaque_values() {
        assert!(opaque_value(b"y").opaque);
        assert!(!opaque_value(b"x").opaque);
        assert!(opaque_value(b"x").xwhiteouts);
        assert_eq!(opaque_value(b"n"), DirMarks::default());
        assert_eq!(opaque_value(b""), DirMarks::default());
    }

    #[test]
    fn private_xattrs() {
        for n in [
            &b"trusted.overlay.opaque"[..],
            b"user.overlay.whiteout",
            b"trusted.overlay.origin",
            b"user.layerfs.origin",
            b"user.fuseoverlayfs.opaque",
        ] {
            assert!(is_private_xattr(n), "{}", n.escape_ascii());
        }
        for n in [
            &b"user.foo"[..],
            b"security.capability",
            b"system.posix_acl_access",
            b"user.overlayfoo",
            b"trusted.other",
        ] {
            assert!(!is_private_xattr(n), "{}", n.escape_ascii());
        }
    }
}
