//! Directory redirects: where a renamed directory's lower copies are.
//!
//! On disk (kernel overlayfs, `Documentation/filesystems/overlayfs.rst`, "Renaming
//! directories"): `<ns>.overlay.redirect` on a directory of some layer says that the copies of
//! this directory in the layers *below* that one are not at its own name but
//!
//! * relative (`d`): at name `d` in the same parent (the directory was renamed in place);
//! * absolute (`/a/x`): at path `a/x` from each lower layer's root (it moved to another parent).
//!
//! The redirect only changes where the layers below are looked for; the copy that carries it is
//! at its own name. Lookups follow redirects in every layer, upper and lower, whoever wrote
//! them (the kernel follows them by default, `redirect_always_follow`). layerfs writes them only
//! with `-o redirect_dir=on`, with the kernel's values (see `Union::rename`):
//!
//! * a directory renamed within its parent records its old name, once: a later rename in the
//!   same parent keeps the first value (it already names the lower copy);
//! * a directory moved to another parent records the absolute path of its lower copy, built
//!   from its own name and its ancestors' names, each ancestor's own redirect standing for its
//!   name, up to the first absolute one;
//! * an absolute redirect is kept by any later rename.
//!
//! Values come from disk and may be anything: [`parse`] checks them (not empty, at most
//! [`MAX_LEN`] bytes, components of 1 to 255 bytes, none `.` or `..`, no NUL, a relative one a
//! single component) and a bad one is an error (EIO) for its directory, never a path outside
//! the layer: components are looked up one by one from the layer root through directory fds.

/// Longest redirect value read or written (the kernel's `PATH_MAX`; the kernel writes at most
/// its `redirect_max`, 256 by default, and falls back to copying beyond that).
pub const MAX_LEN: usize = 4096;

/// Longest absolute redirect layerfs writes, as the kernel's default `redirect_max`: a longer
/// one makes the rename copy the tree instead (as the kernel answers EXDEV and `mv` copies).
pub const MAX_WRITE: usize = 256;

pub const TRUSTED_REDIRECT: &[u8] = b"trusted.overlay.redirect";
pub const USER_REDIRECT: &[u8] = b"user.overlay.redirect";

/// A parsed redirect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The lower copies are at this name in the parent's lower copies.
    Relative(Vec<u8>),
    /// The lower copies are at this path (components) from each lower layer's root.
    Absolute(Vec<Vec<u8>>),
}

/// Why a value is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    Empty,
    TooLong,
    EmptyComponent,
    DotComponent,
    Nul,
    LongComponent,
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bad::Empty => "empty",
            Bad::TooLong => "longer than 4096 bytes",
            Bad::EmptyComponent => "an empty path component",
            Bad::DotComponent => "a `.` or `..` component",
            Bad::Nul => "a NUL byte",
            Bad::LongComponent => "a component longer than 255 bytes",
        })
    }
}

fn check_component(c: &[u8]) -> Result<(), Bad> {
    if c.is_empty() {
        return Err(Bad::EmptyComponent);
    }
    if c == b"." || c == b".." {
        return Err(Bad::DotComponent);
    }
    if c.len() > 255 {
        return Err(Bad::LongComponent);
    }
    Ok(())
}

/// Check and split a redirect value read from disk.
pub fn parse(value: &[u8]) -> Result<Redirect, Bad> {
    if value.is_empty() {
        return Err(Bad::Empty);
    }
    if value.len() > MAX_LEN {
        return Err(Bad::TooLong);
    }
    if value.contains(&0) {
        return Err(Bad::Nul);
    }
    match value.strip_prefix(b"/") {
        Some(rest) => {
            let parts: Vec<Vec<u8>> = rest.split(|&b| b == b'/').map(<[u8]>::to_vec).collect();
            for p in &parts {
                check_component(p)?;
            }
            Ok(Redirect::Absolute(parts))
        }
        None => {
            if value.contains(&b'/') {
                return Err(Bad::EmptyComponent);
            }
            check_component(value)?;
            Ok(Redirect::Relative(value.to_vec()))
        }
    }
}

/// The path (relative to a layer root, `a/b`) an absolute redirect names.
pub fn absolute_path(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

/// The absolute value for a directory whose chain of names, innermost first, is `chain`: each
/// element is an ancestor's (or the directory's own) recorded redirect, else its name. The
/// chain stops at the first absolute element, as the kernel's `ovl_get_redirect` does.
/// `None` when the value would exceed [`MAX_WRITE`].
pub fn absolute_value<'a>(chain: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut len = 0;
    for c in chain {
        len += c.len() + usize::from(!c.starts_with(b"/"));
        if len > MAX_WRITE {
            return None;
        }
        parts.push(c);
        if c.starts_with(b"/") {
            break;
        }
    }
    let mut out = Vec::with_capacity(len);
    for p in parts.iter().rev() {
        if !p.starts_with(b"/") {
            out.push(b'/');
        }
        out.extend_from_slice(p);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abs(parts: &[&str]) -> Redirect {
        Redirect::Absolute(parts.iter().map(|p| p.as_bytes().to_vec()).collect())
    }

    #[test]
    fn parse_table() {
        let long = vec![b'a'; 256];
        let mut long_abs = b"/".to_vec();
        long_abs.extend_from_slice(&long);
        let huge = [b"/a".repeat(2049)].concat();
        let cases: Vec<(&[u8], Result<Redirect, Bad>)> = vec![
            (b"a", Ok(Redirect::Relative(b"a".to_vec()))),
            (b"a b\xff", Ok(Redirect::Relative(b"a b\xff".to_vec()))),
            (b"/a", Ok(abs(&["a"]))),
            (b"/a/x", Ok(abs(&["a", "x"]))),
            (b"", Err(Bad::Empty)),
            (b"/", Err(Bad::EmptyComponent)),
            (b"//a", Err(Bad::EmptyComponent)),
            (b"/a/", Err(Bad::EmptyComponent)),
            (b"/a//b", Err(Bad::EmptyComponent)),
            (b"a/b", Err(Bad::EmptyComponent)),
            (b".", Err(Bad::DotComponent)),
            (b"..", Err(Bad::DotComponent)),
            (b"/../etc", Err(Bad::DotComponent)),
            (b"/a/../../b", Err(Bad::DotComponent)),
            (b"/a/.", Err(Bad::DotComponent)),
            (b"a\0", Err(Bad::Nul)),
            (&long, Err(Bad::LongComponent)),
            (&long_abs, Err(Bad::LongComponent)),
            (&huge, Err(Bad::TooLong)),
        ];
        for (value, want) in cases {
            assert_eq!(parse(value), want, "{:?}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn absolute_values_as_the_kernel_builds_them() {
        // (chain innermost first, value): names, ancestors' relative redirects standing for
        // their names, the walk ending at an absolute one.
        type Case<'a> = (Vec<&'a [u8]>, Option<&'a [u8]>);
        let cases: Vec<Case> = vec![
            (vec![b"c"], Some(b"/c")),
            (vec![b"x", b"a"], Some(b"/a/x")),
            (vec![b"x", b"/q/r", b"top"], Some(b"/q/r/x")),
            (vec![b"/already"], Some(b"/already")),
            (vec![b"d", b"c", b"b"], Some(b"/b/c/d")),
        ];
        for (chain, want) in cases {
            assert_eq!(
                absolute_value(chain.iter().copied()).as_deref(),
                want,
                "{chain:?}"
            );
        }
        let name = [b'n'; 200];
        assert!(absolute_value([&name[..], &name[..]]).is_none());
        assert!(absolute_value([&name[..]]).is_some());
        assert_eq!(absolute_path(&[b"a".to_vec(), b"x".to_vec()]), b"a/x");
    }
}
