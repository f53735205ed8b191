//! Making a build step's upper its own layer directory, instead of extracting the step's tar
//! into a new one.
//!
//! A layer directory must hold exactly what extracting its tar gives (a layer depends only on
//! its tar: it is keyed by diffID and shared). A RUN step's upper, its mount gone, already holds
//! the tar's content; it differs from the extraction only in what a tar cannot carry, and
//! [`normalize`] rewrites exactly that, in place:
//! * times: the tar keeps whole-second mtimes and no atime; extraction sets both times of every
//!   object to that mtime, so each object's atime and mtime become its mtime's whole seconds
//!   (a directory's after its children changed);
//! * xattrs: those the tar does not carry ([`keep_xattr`]: the copy-up origins and impure marks,
//!   the opaque `x` mark of xattr whiteouts, `trusted.*` names) are removed, but
//!   `security.selinux` (the host labels new files itself, extracted ones too). A directory
//!   the tar marks opaque (`.wh..wh..opq`: an opaque directory other than the root, below no
//!   opaque directory) gets the store's `overlay.opaque=y`;
//! * whiteouts: the tar has none in or below an opaque directory, so those are removed; the
//!   others are made again as extraction makes them (a fresh char 0/0: an upper's whiteout may
//!   share its inode with others, or be a zero-size file with a whiteout xattr);
//! * sockets are removed (a tar cannot hold one).
//!
//! An upper it cannot vouch for is refused (`Ok(false)`), before anything changed: a store that
//! writes markers in the unprivileged format or a caller that is not root (extraction would
//! then change owners and modes), a directory renamed with a redirect, a file with a metacopy
//! mark. Every change leaves the tar as it was (only what a tar does not carry changes), which
//! the caller checks by diffing the directory again; on any refusal, error or mismatch it
//! extracts the tar as before.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::error::{Error, Result, ShowPath};
use crate::oci::import::Formats;
use crate::oci::keep_xattr;
use crate::sys::{self, FileStat, SetTime, Timespec, XTarget};
use crate::union::whiteout::{self, WhiteoutFormat, XattrNs};
use crate::union::{metacopy, redirect};

const SELINUX: &[u8] = b"security.selinux";

/// What one directory's xattrs say.
#[derive(Default)]
struct DirXattrs {
    opaque: bool,
    xwhiteouts: bool,
    /// Names the tar does not carry (the store's opaque mark among them).
    private: Vec<Vec<u8>>,
    /// It has the store's `overlay.opaque=y`.
    store_opaque: bool,
}

/// Normalize the upper `root` in place (see the module doc). `Ok(false)`: refused, nothing
/// changed.
pub fn normalize(root: BorrowedFd<'_>, formats: Formats) -> Result<bool> {
    if sys::geteuid() != 0
        || formats.xattr_ns != XattrNs::Trusted
        || formats.whiteouts != WhiteoutFormat::CharDev
    {
        return Ok(false);
    }
    if !check(root, b"")? {
        return Ok(false);
    }
    let fd = sys::open_dir_beneath(root, b"").map_err(io_ctx("opening", b"."))?;
    Walk { formats }.dir(fd, Vec::new(), true, false)?;
    Ok(true)
}

/// Whether the tree holds nothing [`normalize`] refuses: redirects and metacopy marks.
fn check(dir: BorrowedFd<'_>, path: &[u8]) -> Result<bool> {
    let names = sys::xattr_list(XTarget::Fd(dir)).map_err(io_ctx("listing xattrs of", path))?;
    if names.iter().any(|n| is_redirect(n)) {
        return Ok(false);
    }
    let entries =
        sys::read_dir_all(sys::open_dir_beneath(dir, b"").map_err(io_ctx("reading", path))?)
            .map_err(io_ctx("reading", path))?;
    for e in entries {
        let child = join(path, &e.name);
        let st = sys::stat_at(dir, &e.name).map_err(io_ctx("stat", &child))?;
        if st.is_dir() {
            let fd =
                sys::open_at(dir, &e.name, dir_flags(), 0).map_err(io_ctx("opening", &child))?;
            if !check(fd.as_fd(), &child)? {
                return Ok(false);
            }
        } else if st.is_reg() {
            let names = sys::xattr_list(XTarget::At(dir, &e.name))
                .map_err(io_ctx("listing xattrs of", &child))?;
            if names.iter().any(|n| metacopy::is_marker(n)) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

struct Walk {
    formats: Formats,
}

impl Walk {
    /// Normalize one directory and everything below it. `hidden`: an ancestor other than the
    /// root is opaque (the tar has no markers below it).
    fn dir(&self, fd: OwnedFd, path: Vec<u8>, is_root: bool, hidden: bool) -> Result<()> {
        let st = sys::fstat(fd.as_fd()).map_err(io_ctx("stat", &path))?;
        let x = self.dir_xattrs(fd.as_fd(), &path)?;
        let tar_opaque = x.opaque && !is_root && !hidden;
        let store_opaque = self.formats.xattr_ns.opaque();
        for name in &x.private {
            if !(tar_opaque && x.store_opaque && name == store_opaque) {
                remove_xattr(XTarget::Fd(fd.as_fd()), name, &path)?;
            }
        }
        if tar_opaque && !x.store_opaque {
            sys::xattr_set(
                XTarget::Fd(fd.as_fd()),
                self.formats.xattr_ns.opaque(),
                b"y",
                0,
            )
            .map_err(io_ctx("marking opaque", &path))?;
        }
        let no_whiteouts = x.opaque || hidden;
        let below_hidden = hidden || (x.opaque && !is_root);
        let entries = sys::read_dir_all(
            sys::open_dir_beneath(fd.as_fd(), b"").map_err(io_ctx("reading", &path))?,
        )
        .map_err(io_ctx("reading", &path))?;
        for e in entries {
            let child = join(&path, &e.name);
            let cst = sys::stat_at(fd.as_fd(), &e.name).map_err(io_ctx("stat", &child))?;
            if self.is_whiteout(fd.as_fd(), &e.name, &cst, x.xwhiteouts, &child)? {
                sys::unlink_at(fd.as_fd(), &e.name, false).map_err(io_ctx("removing", &child))?;
                if !no_whiteouts {
                    sys::mknod_at(fd.as_fd(), &e.name, sys::S_IFCHR, 0)
                        .map_err(io_ctx("making whiteout", &child))?;
                }
            } else if cst.file_type() == sys::S_IFSOCK {
                sys::unlink_at(fd.as_fd(), &e.name, false).map_err(io_ctx("removing", &child))?;
            } else if cst.is_dir() {
                let cfd = sys::open_at(fd.as_fd(), &e.name, dir_flags(), 0)
                    .map_err(io_ctx("opening", &child))?;
                self.dir(cfd, child, false, below_hidden)?;
            } else {
                let t = XTarget::At(fd.as_fd(), &e.name);
                let names = sys::xattr_list(t).map_err(io_ctx("listing xattrs of", &child))?;
                for name in names.iter().filter(|n| drops(n)) {
                    remove_xattr(t, name, &child)?;
                }
                let m = whole_seconds(&cst);
                sys::utimens_at(fd.as_fd(), &e.name, m, m)
                    .map_err(io_ctx("setting times of", &child))?;
            }
        }
        let m = whole_seconds(&st);
        sys::futimens(fd.as_fd(), m, m).map_err(io_ctx("setting times of", &path))
    }

    fn dir_xattrs(&self, fd: BorrowedFd<'_>, path: &[u8]) -> Result<DirXattrs> {
        let mut x = DirXattrs::default();
        let names = sys::xattr_list(XTarget::Fd(fd)).map_err(io_ctx("listing xattrs of", path))?;
        for name in names {
            if matches!(
                name.as_slice(),
                whiteout::TRUSTED_OPAQUE | whiteout::USER_OPAQUE | whiteout::FUSEOVERLAYFS_OPAQUE
            ) {
                let v = sys::xattr_get(XTarget::Fd(fd), &name)
                    .map_err(io_ctx("reading xattrs of", path))?
                    .unwrap_or_default();
                let marks = whiteout::opaque_value(&v);
                x.opaque |= marks.opaque;
                x.xwhiteouts |= marks.xwhiteouts;
                x.store_opaque |= name == self.formats.xattr_ns.opaque() && marks.opaque;
            }
            if drops(&name) {
                x.private.push(name);
            }
        }
        Ok(x)
    }

    /// Export's rule: a char 0/0, or in a directory marked `opaque=x` a zero-size file with a
    /// whiteout xattr.
    fn is_whiteout(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        st: &FileStat,
        xwhiteouts: bool,
        path: &[u8],
    ) -> Result<bool> {
        if st.file_type() == sys::S_IFCHR {
            return Ok(st.rdev == 0);
        }
        if !(st.is_reg() && st.size == 0 && xwhiteouts) {
            return Ok(false);
        }
        let t = XTarget::At(dir, name);
        for attr in [whiteout::TRUSTED_WHITEOUT, whiteout::USER_WHITEOUT] {
            if sys::xattr_get(t, attr)
                .map_err(io_ctx("reading xattrs of", path))?
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Whether an xattr goes (the tar does not carry it and extraction would not write it).
fn drops(name: &[u8]) -> bool {
    !keep_xattr(name) && name != SELINUX
}

fn is_redirect(name: &[u8]) -> bool {
    name == redirect::TRUSTED_REDIRECT || name == redirect::USER_REDIRECT
}

fn remove_xattr(t: XTarget<'_>, name: &[u8], path: &[u8]) -> Result<()> {
    match sys::xattr_remove(t, name) {
        Err(e) if e.raw_os_error() != Some(libc::ENODATA) => Err(Error::io(
            format!("removing xattr {} of {}", ShowPath(name), ShowPath(path)),
            e,
        )),
        _ => Ok(()),
    }
}

fn whole_seconds(st: &FileStat) -> SetTime {
    SetTime::At(Timespec {
        sec: st.mtime.sec,
        nsec: 0,
    })
}

fn dir_flags() -> i32 {
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + name.len() + 1);
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn io_ctx<'p>(what: &'static str, path: &'p [u8]) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |e| {
        let shown = if path.is_empty() { &b"."[..] } else { path };
        Error::io(format!("{what} {}", ShowPath(shown)), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::HashWriter;
    use crate::oci::{export, import, tarfmt::TarReader};
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::path::Path;

    fn set(p: &Path, name: &str, v: &[u8]) {
        let dir = sys::open_dir_path(p.parent().unwrap()).unwrap();
        let n = p.file_name().unwrap().as_encoded_bytes();
        sys::xattr_set(XTarget::At(dir.as_fd(), n), name.as_bytes(), v, 0).unwrap();
    }

    /// Everything of a tree but inode numbers, ctimes, atimes and whiteouts' times.
    fn dump(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            let dfd = sys::open_dir_path(&d).unwrap();
            let mut x = sys::xattr_list(XTarget::Fd(dfd.as_fd())).unwrap();
            x.sort();
            let xs: Vec<_> = x
                .iter()
                .map(|n| {
                    let v = sys::xattr_get(XTarget::Fd(dfd.as_fd()), n).unwrap();
                    format!("{}={:?}", n.escape_ascii(), v)
                })
                .collect();
            let md = std::fs::symlink_metadata(&d).unwrap();
            let rel = d.strip_prefix(root).unwrap().display().to_string();
            out.insert(
                format!("{rel}/"),
                format!("{:o} {} {} {xs:?}", md.mode(), md.mtime(), md.mtime_nsec()),
            );
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                let md = std::fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    todo.push(p);
                    continue;
                }
                let n = e.file_name();
                let mut x =
                    sys::xattr_list(XTarget::At(dfd.as_fd(), n.as_encoded_bytes())).unwrap();
                x.sort();
                let wh = md.file_type().is_char_device() && md.rdev() == 0;
                let time = if wh {
                    String::new()
                } else {
                    format!("{} {}", md.mtime(), md.mtime_nsec())
                };
                let data = if md.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    format!("{:o} {} {time} {x:?} {data:?}", md.mode(), md.rdev()),
                );
            }
        }
        out
    }

    use std::os::unix::fs::FileTypeExt;

    fn diff_id(dir: &Path) -> (crate::digest::Digest, Vec<u8>) {
        let fd = sys::open_dir_path(dir).unwrap();
        let (_, w) = export::export(
            fd.as_fd(),
            None,
            HashWriter::new(Vec::new()),
            export::Options::default(),
            &|_| {},
        )
        .unwrap();
        (w.hasher.finish(), w.inner)
    }

    /// An upper with every kind of thing a tar cannot carry, normalized, is what its own tar
    /// extracts to, and its tar is unchanged.
    #[test]
    fn a_normalized_upper_is_what_its_tar_extracts_to() {
        if sys::geteuid() != 0 {
            eprintln!("skipping: needs root (trusted xattrs, whiteout devices)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let up = d.path().join("upper");
        let w = |rel: &str, data: &str| {
            let p = up.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        };
        let mknod = |rel: &str| {
            let p = up.join(rel);
            let dir = sys::open_dir_path(p.parent().unwrap()).unwrap();
            sys::mknod_at(
                dir.as_fd(),
                p.file_name().unwrap().as_encoded_bytes(),
                sys::S_IFCHR,
                0,
            )
            .unwrap();
        };
        w("keep/f", "f");
        set(
            &up.join("keep/f"),
            "trusted.overlay.origin",
            b"\x00\xfb\x1d\x00\x01",
        );
        set(&up.join("keep/f"), "user.kept", b"v");
        set(&up.join("keep"), "trusted.overlay.impure", b"y");
        mknod("keep/gone");
        // A whiteout linked to another (the kernel shares whiteout inodes).
        std::fs::hard_link(up.join("keep/gone"), up.join("keep/gone2")).unwrap();
        // Opaque, with whiteouts in it and below it, and an opaque directory below it.
        w("opq/a", "a");
        set(&up.join("opq"), "trusted.overlay.opaque", b"y");
        mknod("opq/wh");
        w("opq/sub/b", "b");
        mknod("opq/sub/wh");
        set(&up.join("opq/sub"), "trusted.overlay.opaque", b"y");
        // Opaque in another dialect.
        w("fo/c", "c");
        set(&up.join("fo"), "user.fuseoverlayfs.opaque", b"y");
        // Xattr-format whiteouts.
        w("xw/file", "x");
        w("xw/gone", "");
        set(&up.join("xw/gone"), "trusted.overlay.whiteout", b"");
        set(&up.join("xw"), "trusted.overlay.opaque", b"x");
        // The root: marks a tar cannot carry.
        set(&up, "trusted.overlay.opaque", b"y");
        mknod("rootwh");
        let _sock = std::os::unix::net::UnixListener::bind(up.join("sock")).unwrap();
        symlink("keep/f", up.join("link")).unwrap();
        set(&up.join("keep/f"), "trusted.other", b"1");
        let (before, tar) = diff_id(&up);
        // The reference: the tar extracted.
        let ex = d.path().join("extracted");
        std::fs::create_dir(&ex).unwrap();
        let exfd = sys::open_dir_path(&ex).unwrap();
        let formats = import::probe_formats(exfd.as_fd());
        let mut r = TarReader::new(&tar[..]);
        import::extract(&mut r, exfd.as_fd(), formats, &|_| {}).unwrap();
        let upfd = sys::open_dir_path(&up).unwrap();
        assert!(normalize(upfd.as_fd(), formats).unwrap());
        assert_eq!(diff_id(&up).0, before, "the tar changed");
        let (a, b) = (dump(&up), dump(&ex));
        for k in a.keys().chain(b.keys()) {
            assert_eq!(a.get(k), b.get(k), "{k}");
        }
    }

    #[test]
    fn refuses_redirects_and_metacopy() {
        if sys::geteuid() != 0 {
            return;
        }
        for (rel, attr) in [
            ("d", "trusted.overlay.redirect"),
            ("d/f", "trusted.overlay.metacopy"),
        ] {
            let d = tempfile::tempdir().unwrap();
            std::fs::create_dir(d.path().join("d")).unwrap();
            std::fs::write(d.path().join("d/f"), "f").unwrap();
            set(&d.path().join(rel), attr, b"");
            let fd = sys::open_dir_path(d.path()).unwrap();
            let formats = import::probe_formats(fd.as_fd());
            let mtime = std::fs::metadata(d.path().join("d/f"))
                .unwrap()
                .mtime_nsec();
            assert!(!normalize(fd.as_fd(), formats).unwrap(), "{attr}");
            assert_eq!(
                std::fs::metadata(d.path().join("d/f"))
                    .unwrap()
                    .mtime_nsec(),
                mtime,
                "{attr}: nothing changed"
            );
        }
    }

    #[test]
    fn which_xattrs_go() {
        for (name, goes) in [
            (&b"trusted.overlay.origin"[..], true),
            (b"trusted.overlay.impure", true),
            (b"trusted.overlay.opaque", true),
            (b"user.overlay.opaque", true),
            (b"trusted.layerfs.origin", true),
            (b"trusted.other", true),
            (b"security.ima", true),
            (b"user.mime_type", false),
            (b"security.capability", false),
            (b"system.posix_acl_access", false),
            (b"system.posix_acl_default", false),
            (b"security.selinux", false),
        ] {
            assert_eq!(drops(name), goes, "{}", name.escape_ascii());
        }
    }

    #[test]
    fn times_keep_whole_seconds() {
        let mut st = sys::fstat(std::fs::File::open("/").unwrap().as_fd()).unwrap();
        st.mtime = Timespec {
            sec: -5,
            nsec: 999_999_999,
        };
        match whole_seconds(&st) {
            SetTime::At(t) => assert_eq!((t.sec, t.nsec), (-5, 0)),
            _ => panic!("not a time"),
        }
    }
}
