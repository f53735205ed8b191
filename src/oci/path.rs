//! Validation of names found in layer tars, and what each name means under the OCI whiteout
//! rules.
//!
//! A tar name becomes a relative path of single components: `./` prefixes, `.` components and
//! repeated or trailing slashes are dropped; an absolute name, a `..` component, a NUL byte or a
//! component longer than `NAME_MAX` is refused. The empty result is the layer root. Names are
//! bytes throughout; nothing here assumes UTF-8.

use crate::error::{Error, Result, ShowPath};
use crate::sys::NAME_MAX;
use crate::union::whiteout::{AufsName, classify_aufs};

/// A validated relative path: components joined by `/`, no `.`/`..`/empty components.
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.first() == Some(&b'/') {
        return Err(Error::invalid(format!(
            "tar entry {}: absolute path",
            ShowPath(raw)
        )));
    }
    if raw.contains(&0) {
        return Err(Error::invalid(format!(
            "tar entry {}: NUL byte in name",
            ShowPath(raw)
        )));
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => {
                return Err(Error::invalid(format!(
                    "tar entry {}: '..' component",
                    ShowPath(raw)
                )));
            }
            c if c.len() > NAME_MAX => {
                return Err(Error::invalid(format!(
                    "tar entry {}: component longer than {NAME_MAX} bytes",
                    ShowPath(raw)
                )));
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Components of a normalized path (none for the root).
pub fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

/// What a normalized tar name stands for.
#[derive(Debug, PartialEq, Eq)]
pub enum Meaning<'a> {
    /// An ordinary entry at this path.
    Plain,
    /// `DIR/.wh..wh..opq`: DIR hides every lower entry.
    Opaque { dir: &'a [u8] },
    /// `DIR/.wh.NAME`: DIR/NAME is deleted from the layers below.
    Whiteout { dir: &'a [u8], name: &'a [u8] },
    /// AUFS bookkeeping (`.wh..wh.plnk/...` and the like): ignored, as Docker does.
    AufsInternal,
}

/// Classify a normalized path. A `.wh.`-prefixed component anywhere but last is refused: it
/// would make a whiteout a directory.
pub fn meaning(path: &[u8]) -> Result<Meaning<'_>> {
    let (dir, base) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    };
    for c in components(dir) {
        match classify_aufs(c) {
            AufsName::Plain => {}
            AufsName::Internal | AufsName::Opaque => return Ok(Meaning::AufsInternal),
            AufsName::Whiteout(_) => {
                return Err(Error::invalid(format!(
                    "tar entry {}: a whiteout name used as a directory",
                    ShowPath(path)
                )));
            }
        }
    }
    Ok(match classify_aufs(base) {
        AufsName::Plain => Meaning::Plain,
        AufsName::Opaque => Meaning::Opaque { dir },
        AufsName::Whiteout(name) if name == b"." || name == b".." => {
            return Err(Error::invalid(format!(
                "tar entry {}: whiteout of '.' or '..'",
                ShowPath(path)
            )));
        }
        AufsName::Whiteout(name) => Meaning::Whiteout { dir, name },
        AufsName::Internal => Meaning::AufsInternal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_harmless_forms() {
        for (raw, want) in [
            (&b"a/b"[..], &b"a/b"[..]),
            (b"./a/b/", b"a/b"),
            (b"a//./b", b"a/b"),
            (b"./", b""),
            (b".", b""),
            (b"\xff/\xfe", b"\xff/\xfe"),
            (b"a/...", b"a/..."),
            (b"..a/b..", b"..a/b.."),
        ] {
            assert_eq!(normalize(raw).unwrap(), want, "{}", ShowPath(raw));
        }
    }

    #[test]
    fn refuses_escapes() {
        for raw in [
            &b"/etc/passwd"[..],
            b"..",
            b"../x",
            b"a/../../x",
            b"a/..",
            b"./../x",
            b"a\0b",
        ] {
            assert!(normalize(raw).is_err(), "{}", ShowPath(raw));
        }
        let long = [vec![b'x'; 256], b"/y".to_vec()].concat();
        assert!(normalize(&long).is_err());
        assert!(normalize(&vec![b'x'; 255]).is_ok());
    }

    #[test]
    fn oci_whiteout_rules() {
        assert_eq!(meaning(b"a/b").unwrap(), Meaning::Plain);
        assert_eq!(
            meaning(b"a/b/.wh..wh..opq").unwrap(),
            Meaning::Opaque { dir: b"a/b" }
        );
        assert_eq!(
            meaning(b".wh..wh..opq").unwrap(),
            Meaning::Opaque { dir: b"" }
        );
        assert_eq!(
            meaning(b"a/.wh.x").unwrap(),
            Meaning::Whiteout {
                dir: b"a",
                name: b"x"
            }
        );
        assert_eq!(
            meaning(b".wh.\xff").unwrap(),
            Meaning::Whiteout {
                dir: b"",
                name: b"\xff"
            }
        );
        assert_eq!(
            meaning(b".wh..wh.plnk/123.4").unwrap(),
            Meaning::AufsInternal
        );
        assert_eq!(meaning(b"a/.wh..wh.aufs").unwrap(), Meaning::AufsInternal);
        assert!(meaning(b"a/.wh.x/y").is_err());
        assert!(meaning(b"a/.wh..").is_err());
        assert!(meaning(b"a/.wh...").is_err());
        assert_eq!(meaning(b"a/x.wh.y").unwrap(), Meaning::Plain);
    }
}
