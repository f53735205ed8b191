//! `layerfs diff`: the canonical OCI layer tar of an upper directory.
//!
//! The upper is read through directory fds and `*_at` calls that never follow a symlink. Its
//! lowers are needed only for directories renamed with `-o redirect_dir=on` (layerfs or the
//! kernel), whose content is partly in the lower layers, and for metacopy files
//! (`-o metacopy=on`: metadata in the upper, data in a lower layer): without them such an
//! upper is refused with the directory or file named. A metacopy file is written with its
//! upper metadata and its whole data, read from the lower file the mount reads
//! ([`Union::metacopy_fd`]), as the default mode's full copy-up would have left it. Given them (a [`Union::read_only_upper`]), such a directory is
//! written as the default mode (copy-tree) renames it, so both modes give byte-identical tars
//! for the same changes: an opaque directory holding its whole merged tree as the mount shows
//! it (lower objects with their own metadata, as copy-up keeps it; hard links between lower
//! objects only within one redirected directory, as each copy-tree rename copies its tree on
//! its own). The default mode's tar depends on the order of renames where a redirect upper
//! does not: a directory moved out of one renamed before it is written opaque here, where the
//! default mode, having copied it with that parent, moves it unmarked (the two apply the
//! same). The output depends only on the upper's content (and the lowers, when given),
//! never on readdir order, inode numbers or the time of the run, so the same upper (or a
//! `cp -a` copy of it) always gives byte-identical output and the same diffID.
//!
//! The canonical form:
//! * Order: `./` (the root: its mode, owner, mtime and xattrs, so a mount of the committed
//!   image shows the same `/` as the container did), then depth-first, a directory's entry
//!   right before its contents. Within a directory: first `.wh..wh..opq` if the directory is
//!   opaque (never for the root), then its whiteouts (`.wh.NAME`) sorted bytewise by NAME,
//!   then its other entries sorted bytewise by name.
//! * Names: relative, no `./` prefix (except the root entry itself), directories end in `/`.
//! * Headers: ustar, numeric uid/gid, empty uname/gname, mode = permission bits (with
//!   setuid/setgid/sticky), whole-second mtimes (sub-second parts are dropped: most layer
//!   writers do the same, and a PAX record per file would double the size of small-file layers),
//!   no atime/ctime. `--source-date-epoch N` clamps mtimes above N to N. PAX only for what ustar
//!   cannot hold (see [`super::tarfmt::write_header`]).
//! * Whiteouts (`char 0/0`, or zero-size files with `*.overlay.whiteout` in a directory marked
//!   `opaque=x`) and opaque markers (`{trusted,user}.overlay.opaque=y`,
//!   `user.fuseoverlayfs.opaque=y`) become `.wh.` entries with fixed metadata: regular file,
//!   size 0, mode 0644, uid/gid 0, mtime 0, no xattrs. Below a directory written opaque there
//!   are no markers (they hide nothing more; the default mode's rename leaves the markers of
//!   the tree it copies as they happened to be). Given the lowers, an opaque directory that
//!   hides nothing in them and was never a lower directory (no origin xattr) is written
//!   without its marker: `redirect_dir=on` marks every new directory in a merged parent
//!   opaque, the default mode only one that hides something.
//! * Hard links: the first name in this order carries the data, later names are link entries
//!   to it. Whiteouts are never links (the kernel shares one whiteout inode among many names).
//! * Xattrs per [`super::keep_xattr`], as `SCHILY.xattr.*` records sorted by name.
//! * Sockets cannot be stored in tar and are skipped with a warning; a real file whose name
//!   starts with `.wh.` cannot be told from a whiteout and is refused.
//! * The end: two zero blocks, no further padding.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::keep_xattr;
use super::tarfmt::{self, HeaderSpec, Kind};
use crate::error::{Error, Result, ShowPath};
use crate::sys::{self, FileStat, XTarget};
use crate::union::whiteout::{self, DirMarks};
use crate::union::{self, Union, metacopy, redirect};

/// Options of `diff`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Clamp mtimes to at most this value.
    pub source_date_epoch: Option<i64>,
}

/// What was written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub whiteouts: u64,
    pub file_bytes: u64,
    /// Bytes of tar written.
    pub tar_bytes: u64,
    pub skipped_sockets: u64,
}

/// The union layer number of the upper in [`Union::read_only_upper`].
const UPPER: u16 = 0;

struct Child {
    name: Vec<u8>,
    st: FileStat,
    /// The layer the object is in ([`UPPER`] for entries of the upper walk).
    layer: u16,
}

/// Where a directory's entries come from.
enum Source {
    /// The upper's own directory, read as it is.
    Upper(OwnedFd),
    /// A directory with a redirect, or below one: its merged view, through the union (`ino`),
    /// with its copies in the layers opened as entries need them.
    View { ino: u64, dirs: Vec<(u16, OwnedFd)> },
}

struct Frame {
    src: Source,
    /// Tar path of the directory with a trailing `/` (empty for the root).
    prefix: Vec<u8>,
    /// An ancestor (or the directory) is written opaque: markers below it hide nothing
    /// more and are left out.
    hidden: bool,
    /// Hard links between lower objects are shared within one redirected directory only
    /// (see [`Writer::links`]).
    scope: u64,
    /// Remaining children, in reverse order (popped from the end).
    rest: Vec<Child>,
}

struct Writer<'a, W: Write> {
    out: W,
    opts: Options,
    stats: Stats,
    /// First tar path of each object with more than one link, by (scope, dev, ino): scope 0
    /// for the upper's objects, a scope per redirected directory for lower objects (the
    /// copy-tree rename copies each such tree on its own, linking only names within it).
    links: HashMap<(u64, u64, u64), Vec<u8>>,
    scopes: u64,
    buf: Vec<u8>,
    progress: &'a dyn Fn(u64),
    view: Option<&'a Union>,
}

fn io_ctx(what: &str, path: &[u8]) -> impl FnOnce(std::io::Error) -> Error {
    let ctx = format!("{what} {}", ShowPath(path));
    move |e| Error::io(ctx, e)
}

/// A directory's markers: opaque/xwhiteout in every dialect the union reads, whether it
/// carries a redirect and whether it records an origin (it is a copy of a lower directory).
#[derive(Default)]
struct Marks {
    dir: DirMarks,
    redirect: bool,
    origin: bool,
}

fn dir_marks(fd: BorrowedFd<'_>, path: &[u8]) -> Result<Marks> {
    let mut marks = Marks::default();
    let names = sys::xattr_list(XTarget::Fd(fd)).map_err(io_ctx("listing xattrs of", path))?;
    for name in &names {
        match name.as_slice() {
            redirect::TRUSTED_REDIRECT | redirect::USER_REDIRECT => marks.redirect = true,
            whiteout::TRUSTED_ORIGIN
            | whiteout::USER_ORIGIN
            | b"trusted.layerfs.origin"
            | b"user.layerfs.origin" => marks.origin = true,
            _ => {}
        }
    }
    for attr in [
        whiteout::TRUSTED_OPAQUE,
        whiteout::USER_OPAQUE,
        whiteout::FUSEOVERLAYFS_OPAQUE,
    ] {
        if !names.iter().any(|n| n == attr) {
            continue;
        }
        if let Some(v) =
            sys::xattr_get(XTarget::Fd(fd), attr).map_err(io_ctx("reading xattrs of", path))?
        {
            let m = whiteout::opaque_value(&v);
            marks.dir.opaque |= m.opaque;
            marks.dir.xwhiteouts |= m.xwhiteouts;
        }
    }
    Ok(marks)
}

/// `a/b/` -> `a/b`.
fn dir_path(prefix: &[u8]) -> &[u8] {
    prefix.strip_suffix(b"/").unwrap_or(prefix)
}

/// The union's node of the directory at `path` (`a/b`), looked up from the root.
fn view_ino(view: &Union, path: &[u8]) -> Result<u64> {
    let mut ino = union::ROOT;
    for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        ino = view.lookup(ino, comp)?.ino;
    }
    Ok(ino)
}

fn view_ctx(path: &[u8]) -> impl FnOnce(Error) -> Error {
    let ctx = format!("{} (in the lower layers)", ShowPath(path));
    move |e| e.context(ctx)
}

/// Write the canonical layer tar of the upper directory `upper` to `out`. `view`, a
/// [`Union::read_only_upper`] of the same upper over its lowers, is needed when the upper
/// holds redirects; given, it also decides which opaque markers hide something (see the
/// module doc).
pub fn export<W: Write>(
    upper: BorrowedFd<'_>,
    view: Option<&Union>,
    out: W,
    opts: Options,
    progress: &dyn Fn(u64),
) -> Result<(Stats, W)> {
    let mut w = Writer {
        out,
        opts,
        stats: Stats::default(),
        links: HashMap::new(),
        scopes: 0,
        buf: vec![0u8; 1 << 20],
        progress,
        view,
    };
    let root = sys::open_dir_beneath(upper, b"").map_err(io_ctx("opening", b"the upper"))?;
    w.root_entry(root.as_fd())?;
    let mut stack = vec![w.enter(root, Vec::new(), true, false)?];
    while let Some(frame) = stack.last_mut() {
        let Some(Child { name, st, layer }) = frame.rest.pop() else {
            stack.pop();
            continue;
        };
        let mut path = frame.prefix.clone();
        path.extend_from_slice(&name);
        let hidden = frame.hidden;
        let next = match &mut frame.src {
            Source::Upper(fd) => match w.entry(fd.as_fd(), &name, &path, &st, 0)? {
                Some(fd) => {
                    path.push(b'/');
                    Some(w.enter(fd, path, false, hidden)?)
                }
                None => None,
            },
            Source::View { ino, dirs } => {
                let (ino, view) = (*ino, w.view.ok_or_else(|| Error::os(libc::EINVAL))?);
                let at = match dirs.iter().position(|(l, _)| *l == layer) {
                    Some(at) => at,
                    None => {
                        let fd = view
                            .layer_dir(ino, layer)
                            .map_err(view_ctx(dir_path(&frame.prefix)))?;
                        dirs.push((layer, fd));
                        dirs.len() - 1
                    }
                };
                let scope = if layer == UPPER { 0 } else { frame.scope };
                match w.entry(dirs[at].1.as_fd(), &name, &path, &st, scope)? {
                    Some(_) => {
                        let child = view.lookup(ino, &name).map_err(view_ctx(&path))?.ino;
                        path.push(b'/');
                        Some(w.enter_view(view, child, path, frame.scope)?)
                    }
                    None => None,
                }
            }
        };
        if let Some(next) = next {
            stack.push(next);
        }
    }
    w.stats.tar_bytes += tarfmt::write_trailer(&mut w.out).map_err(io_ctx("writing", b"tar"))?;
    Ok((w.stats, w.out))
}

impl<W: Write> Writer<'_, W> {
    fn mtime(&self, st: &FileStat) -> i64 {
        match self.opts.source_date_epoch {
            Some(max) if st.mtime.sec > max => max,
            _ => st.mtime.sec,
        }
    }

    fn marker(&mut self, path: &[u8]) -> Result<()> {
        let spec = HeaderSpec {
            path,
            kind: Kind::File,
            link: b"",
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        };
        self.stats.tar_bytes +=
            tarfmt::write_header(&mut self.out, &spec).map_err(io_ctx("writing", b"tar"))?;
        self.stats.entries += 1;
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn opaque_marker(&mut self, prefix: &[u8]) -> Result<()> {
        let mut p = prefix.to_vec();
        p.extend_from_slice(whiteout::WH_OPAQUE);
        self.marker(&p)
    }

    /// The `./` entry: the root's mode, owner, mtime and xattrs (what a mount of the layer
    /// shows for `/`).
    fn root_entry(&mut self, root: BorrowedFd<'_>) -> Result<()> {
        let st = sys::fstat(root).map_err(io_ctx("stat", b"the upper"))?;
        let x = self.xattrs(XTarget::Fd(root), b"./")?;
        let spec = HeaderSpec {
            path: b"./",
            kind: Kind::Dir,
            link: b"",
            mode: st.perm(),
            uid: st.uid as u64,
            gid: st.gid as u64,
            size: 0,
            mtime: self.mtime(&st),
            dev_major: 0,
            dev_minor: 0,
            xattrs: &x,
        };
        self.header(&spec)
    }

    /// Whether the opaque directory `prefix` (not the root, not below another opaque one)
    /// gets its marker. Without the lowers, always. With them, not when it hides nothing in
    /// them and was never a lower directory (no origin): `redirect_dir=on` (kernel and
    /// layerfs) marks every new directory in a merged parent opaque, the default mode only one
    /// that hides something, and the two must give the same tar.
    fn opaque_hides(&self, prefix: &[u8], marks: &Marks) -> Result<bool> {
        let Some(view) = self.view.filter(|_| !marks.origin) else {
            return Ok(true);
        };
        let (parent, name) = union::split_path(dir_path(prefix));
        let parent_ino = view_ino(view, parent).map_err(view_ctx(parent))?;
        view.lower_visible(parent_ino, name)
            .map_err(view_ctx(dir_path(prefix)))
    }

    /// Read a directory of the upper, write its opaque marker and whiteouts, and return its
    /// frame; a directory with a redirect is written as its merged view instead. The root has
    /// no entry, so no opaque marker either. `hidden`: an ancestor was written opaque.
    fn enter(
        &mut self,
        fd: OwnedFd,
        prefix: Vec<u8>,
        is_root: bool,
        hidden: bool,
    ) -> Result<Frame> {
        let marks = dir_marks(fd.as_fd(), &prefix)?;
        if marks.redirect && !marks.dir.opaque && !is_root {
            return self.enter_redirected(prefix, hidden);
        }
        let opaque =
            marks.dir.opaque && !is_root && !hidden && self.opaque_hides(&prefix, &marks)?;
        let entries = sys::read_dir_all(
            sys::open_dir_beneath(fd.as_fd(), b"").map_err(io_ctx("reading", &prefix))?,
        )
        .map_err(io_ctx("reading", &prefix))?;
        let mut whiteouts: Vec<Vec<u8>> = Vec::new();
        let mut real: Vec<Child> = Vec::with_capacity(entries.len());
        for e in entries {
            let st = sys::stat_at(fd.as_fd(), &e.name).map_err(io_ctx("stat", &e.name))?;
            let is_wh = if st.is_chr() {
                st.rdev == 0
            } else if st.is_reg() && st.size == 0 && marks.dir.xwhiteouts {
                let t = XTarget::At(fd.as_fd(), &e.name);
                sys::xattr_get(t, whiteout::TRUSTED_WHITEOUT)
                    .map_err(io_ctx("reading xattrs of", &e.name))?
                    .is_some()
                    || sys::xattr_get(t, whiteout::USER_WHITEOUT)
                        .map_err(io_ctx("reading xattrs of", &e.name))?
                        .is_some()
            } else {
                false
            };
            if is_wh {
                whiteouts.push(e.name);
            } else {
                real.push(Child {
                    name: e.name,
                    st,
                    layer: UPPER,
                });
            }
        }
        if opaque {
            self.opaque_marker(&prefix)?;
        }
        // An opaque directory hides everything below; its whiteouts add nothing, and neither
        // do those of a directory below one.
        if !(marks.dir.opaque || hidden) {
            whiteouts.sort_unstable();
            for name in whiteouts {
                if name.len() + whiteout::WH_PREFIX.len() > sys::NAME_MAX {
                    return Err(Error::invalid(format!(
                        "{}{}: a whiteout of a name longer than {} bytes cannot be stored in \
                         a layer",
                        ShowPath(&prefix),
                        ShowPath(&name),
                        sys::NAME_MAX - whiteout::WH_PREFIX.len()
                    )));
                }
                let mut p = prefix.clone();
                p.extend_from_slice(whiteout::WH_PREFIX);
                p.extend_from_slice(&name);
                self.marker(&p)?;
            }
        }
        // Reverse order: the frame pops from the end.
        real.sort_unstable_by(|a, b| b.name.cmp(&a.name));
        Ok(Frame {
            src: Source::Upper(fd),
            prefix,
            hidden: hidden || opaque,
            scope: 0,
            rest: real,
        })
    }

    /// A directory of the upper with a redirect (renamed with `redirect_dir=on`): written as
    /// the default mode's rename leaves it, an opaque directory holding its whole merged tree.
    fn enter_redirected(&mut self, prefix: Vec<u8>, hidden: bool) -> Result<Frame> {
        let path = dir_path(&prefix);
        let Some(view) = self.view else {
            return Err(Error::invalid(format!(
                "{}: renamed with redirect_dir=on (it carries overlay.redirect), so its content \
                 is in the lower layers: pass them with --lower DIR (top first)",
                ShowPath(path)
            )));
        };
        let ino = view_ino(view, path).map_err(view_ctx(path))?;
        if !hidden {
            self.opaque_marker(&prefix)?;
        }
        self.scopes += 1;
        let scope = self.scopes;
        self.enter_view(view, ino, prefix, scope)
    }

    /// The merged view of directory `ino` of the union, as a frame: every entry the mount
    /// shows, no markers (an ancestor is written opaque).
    fn enter_view(&mut self, view: &Union, ino: u64, prefix: Vec<u8>, scope: u64) -> Result<Frame> {
        let path = dir_path(&prefix).to_vec();
        let (listed, _) = view.read_dir(ino, 0).map_err(view_ctx(&path))?;
        let mut dirs: Vec<(u16, OwnedFd)> = Vec::new();
        let mut rest = Vec::with_capacity(listed.len());
        for e in listed.iter() {
            let layer = e.top.layer;
            let at = match dirs.iter().position(|(l, _)| *l == layer) {
                Some(at) => at,
                None => {
                    dirs.push((layer, view.layer_dir(ino, layer).map_err(view_ctx(&path))?));
                    dirs.len() - 1
                }
            };
            let st = sys::stat_at(dirs[at].1.as_fd(), &e.name).map_err(io_ctx("stat", &e.name))?;
            rest.push(Child {
                name: e.name.to_vec(),
                st,
                layer,
            });
        }
        rest.sort_unstable_by(|a, b| b.name.cmp(&a.name));
        Ok(Frame {
            src: Source::View { ino, dirs },
            prefix,
            hidden: true,
            scope,
            rest,
        })
    }

    fn xattrs(&self, t: XTarget<'_>, path: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self.xattrs_marked(t, path)?.0)
    }

    /// The xattrs a layer carries for an object, and the metacopy marker it has, if any (only
    /// regular files are ever metacopy files: on anything else the marker means nothing).
    #[allow(clippy::type_complexity)]
    fn xattrs_marked(
        &self,
        t: XTarget<'_>,
        path: &[u8],
    ) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut marker = None;
        for name in sys::xattr_list(t).map_err(io_ctx("listing xattrs of", path))? {
            if metacopy::is_marker(&name) {
                marker = Some(name);
                continue;
            }
            if !keep_xattr(&name) {
                continue;
            }
            if let Some(v) = sys::xattr_get(t, &name).map_err(io_ctx("reading xattrs of", path))? {
                out.push((name, v));
            }
        }
        out.sort();
        Ok((out, marker))
    }

    /// The data of the metacopy file at `path` (marked with `marker`): the lower file the
    /// view's mount reads for it.
    fn metacopy_data(&self, path: &[u8], marker: &[u8]) -> Result<OwnedFd> {
        let Some(view) = self.view else {
            return Err(Error::invalid(format!(
                "{}: a metadata-only copy-up (it carries {}), so its data is in the lower \
                 layers: pass them with --lower DIR (top first)",
                ShowPath(path),
                ShowPath(marker)
            )));
        };
        let (parent, name) = union::split_path(path);
        let dir = view_ino(view, parent).map_err(view_ctx(parent))?;
        let ino = view.lookup(dir, name).map_err(view_ctx(path))?.ino;
        view.metacopy_fd(ino)
            .map_err(view_ctx(path))?
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{}: carries {}, which this user's mounts do not read",
                    ShowPath(path),
                    ShowPath(marker)
                ))
            })
    }

    fn header(&mut self, spec: &HeaderSpec<'_>) -> Result<()> {
        self.stats.tar_bytes +=
            tarfmt::write_header(&mut self.out, spec).map_err(io_ctx("writing", b"tar"))?;
        self.stats.entries += 1;
        Ok(())
    }

    /// Write one entry; for a directory return its fd.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        st: &FileStat,
        scope: u64,
    ) -> Result<Option<OwnedFd>> {
        if name.starts_with(whiteout::WH_PREFIX) {
            return Err(Error::invalid(format!(
                "{}: a file whose name starts with .wh. cannot be stored in a layer \
                 (it would read as a whiteout)",
                ShowPath(path)
            )));
        }
        let mut spec = HeaderSpec {
            path,
            kind: Kind::File,
            link: b"",
            mode: st.perm(),
            uid: st.uid as u64,
            gid: st.gid as u64,
            size: 0,
            mtime: self.mtime(st),
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        };
        if !st.is_dir() && st.nlink > 1 {
            if let Some(first) = self.links.get(&(scope, st.dev, st.ino)) {
                let first = first.clone();
                spec.kind = Kind::HardLink;
                spec.link = &first;
                self.header(&spec)?;
                return Ok(None);
            }
            self.links.insert((scope, st.dev, st.ino), path.to_vec());
        }
        match st.file_type() {
            sys::S_IFREG => {
                // O_NONBLOCK: if a FIFO was swapped in since the stat, opening must not hang;
                // the identity check below then refuses it.
                let fd = sys::open_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
                    .map_err(io_ctx("opening", path))?;
                let fst = sys::fstat(fd.as_fd()).map_err(io_ctx("stat", path))?;
                if !fst.is_reg() || (fst.dev, fst.ino) != (st.dev, st.ino) {
                    return Err(Error::invalid(format!(
                        "{}: replaced while it was read; diff a stopped container",
                        ShowPath(path)
                    )));
                }
                let st = fst;
                let (x, marker) = self.xattrs_marked(XTarget::Fd(fd.as_fd()), path)?;
                // A metacopy file: its metadata here, its data from the lower layers.
                let fd = match marker {
                    Some(m) => self.metacopy_data(path, &m)?,
                    None => fd,
                };
                spec.xattrs = &x;
                spec.size = st.size;
                spec.mode = st.perm();
                spec.uid = st.uid as u64;
                spec.gid = st.gid as u64;
                spec.mtime = self.mtime(&st);
                self.header(&spec)?;
                self.copy_data(fd, st.size, path)?;
                Ok(None)
            }
            sys::S_IFDIR => {
                let fd = sys::open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                    .map_err(io_ctx("opening", path))?;
                let x = self.xattrs(XTarget::Fd(fd.as_fd()), path)?;
                let mut p = path.to_vec();
                p.push(b'/');
                spec.path = &p;
                spec.kind = Kind::Dir;
                spec.xattrs = &x;
                self.header(&spec)?;
                Ok(Some(fd))
            }
            sys::S_IFLNK => {
                let target = sys::readlink_at(dir, name).map_err(io_ctx("readlink", path))?;
                let x = self.xattrs(XTarget::At(dir, name), path)?;
                spec.kind = Kind::Symlink;
                spec.link = &target;
                spec.xattrs = &x;
                self.header(&spec)?;
                Ok(None)
            }
            t @ (sys::S_IFCHR | sys::S_IFBLK | sys::S_IFIFO) => {
                let x = self.xattrs(XTarget::At(dir, name), path)?;
                spec.kind = match t {
                    sys::S_IFCHR => Kind::Char,
                    sys::S_IFBLK => Kind::Block,
                    _ => Kind::Fifo,
                };
                if t != sys::S_IFIFO {
                    spec.dev_major = sys::dev_major(st.rdev);
                    spec.dev_minor = sys::dev_minor(st.rdev);
                }
                spec.xattrs = &x;
                self.header(&spec)?;
                Ok(None)
            }
            _ => {
                log::warn!(
                    "{}: sockets cannot be stored in a layer; skipped",
                    ShowPath(path)
                );
                self.stats.skipped_sockets += 1;
                Ok(None)
            }
        }
    }

    /// Exactly `size` bytes of the file, then padding. A file that shrinks while it is read
    /// is an error (the header already promised `size` bytes); growth past `size` is ignored.
    fn copy_data(&mut self, fd: OwnedFd, size: u64, path: &[u8]) -> Result<()> {
        let mut f = File::from(fd);
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = match f.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(Error::invalid(format!(
                        "{}: file shrank while it was read; diff a stopped container",
                        ShowPath(path)
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("reading {}", ShowPath(path)), e)),
            };
            self.out
                .write_all(&self.buf[..n])
                .map_err(io_ctx("writing", b"tar"))?;
            left -= n as u64;
            (self.progress)(n as u64);
        }
        self.stats.file_bytes += size;
        self.stats.tar_bytes +=
            size + tarfmt::write_padding(&mut self.out, size).map_err(io_ctx("writing", b"tar"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tarfmt::TarReader;
    use super::*;
    use std::path::Path;

    fn names(tar: &[u8]) -> Vec<String> {
        let mut r = TarReader::new(tar);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            out.push(String::from_utf8_lossy(&e.path).into_owned());
        }
        out
    }

    fn diff(p: &Path) -> Vec<u8> {
        let fd = sys::open_dir_path(p).unwrap();
        export(fd.as_fd(), None, Vec::new(), Options::default(), &|_| {})
            .unwrap()
            .1
    }

    #[test]
    fn canonical_order_and_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("b/sub")).unwrap();
        std::fs::create_dir_all(p.join("a")).unwrap();
        std::fs::write(p.join("b/z"), b"z").unwrap();
        std::fs::write(p.join("b/A"), b"A").unwrap();
        std::fs::write(p.join("b/sub/f"), b"f").unwrap();
        std::fs::write(p.join("a/f"), b"1").unwrap();
        std::fs::hard_link(p.join("a/f"), p.join("b/sub/link")).unwrap();
        let b = sys::open_dir_path(&p.join("b")).unwrap();
        // A whiteout as a zero-size file in a directory marked opaque=x, and a char 0/0 one.
        sys::xattr_set(XTarget::Fd(b.as_fd()), b"user.overlay.opaque", b"x", 0).unwrap();
        let wh = sys::open_at(b.as_fd(), b"gone", libc::O_CREAT | libc::O_WRONLY, 0).unwrap();
        sys::xattr_set(XTarget::Fd(wh.as_fd()), b"user.overlay.whiteout", b"", 0).unwrap();
        let a = sys::open_dir_path(&p.join("a")).unwrap();
        sys::xattr_set(XTarget::Fd(a.as_fd()), b"user.overlay.opaque", b"y", 0).unwrap();
        sys::xattr_set(
            XTarget::Fd(a.as_fd()),
            b"user.layerfs.origin",
            b"12345678",
            0,
        )
        .unwrap();
        sys::xattr_set(XTarget::Fd(a.as_fd()), b"user.keep", b"v", 0).unwrap();
        let have_mknod = sys::mknod_at(b.as_fd(), b"also-gone", sys::S_IFCHR, 0).is_ok();

        let tar = diff(p);
        let mut want = vec!["./", "a/", "a/.wh..wh..opq", "a/f", "b/"];
        if have_mknod {
            want.push("b/.wh.also-gone");
        }
        want.extend([
            "b/.wh.gone",
            "b/A",
            "b/sub/",
            "b/sub/f",
            "b/sub/link",
            "b/z",
        ]);
        assert_eq!(names(&tar), want);
        let mut r = TarReader::new(&tar[..]);
        r.next_entry().unwrap().unwrap();
        let first = r.next_entry().unwrap().unwrap();
        assert_eq!(first.xattrs, vec![(b"user.keep".to_vec(), b"v".to_vec())]);
        while let Some(e) = r.next_entry().unwrap() {
            if e.path == b"b/sub/link" {
                assert_eq!(e.kind, Some(Kind::HardLink));
                assert_eq!(e.link, b"a/f");
            }
        }
        // Same upper, same bytes.
        assert_eq!(diff(p), tar);
    }

    #[test]
    fn refuses_metacopy_files_and_redirects_without_lowers() {
        // (xattr, on a directory?, value): a directory's redirect, a regular file's metacopy
        // marker (either namespace) need the lowers; a marker on a directory means nothing.
        for (attr, dir, value, refused) in [
            (&b"user.overlay.redirect"[..], true, &b"/orig"[..], true),
            (b"user.overlay.metacopy", false, b"", true),
            (b"user.overlay.metacopy", true, b"", false),
        ] {
            let d = tempfile::tempdir().unwrap();
            if dir {
                std::fs::create_dir(d.path().join("moved")).unwrap();
            } else {
                std::fs::write(d.path().join("moved"), b"").unwrap();
            }
            let fd = sys::open_dir_path(d.path()).unwrap();
            sys::xattr_set(XTarget::At(fd.as_fd(), b"moved"), attr, value, 0).unwrap();
            let r = export(fd.as_fd(), None, Vec::new(), Options::default(), &|_| {});
            match r {
                Err(e) if refused => {
                    let e = e.to_string();
                    assert!(e.contains("--lower") && e.contains("moved"), "{e}");
                    assert!(!e.contains('\n'), "one line: {e}");
                }
                Ok(_) if !refused => {}
                Err(e) => panic!("{}: {e}", attr.escape_ascii()),
                Ok(_) => panic!("{}: not refused", attr.escape_ascii()),
            }
        }
    }

    fn set_x(p: &Path, name: &str, value: &[u8]) {
        let (dir, base) = (p.parent().unwrap(), p.file_name().unwrap());
        let fd = sys::open_dir_path(dir).unwrap();
        use std::os::unix::ffi::OsStrExt;
        sys::xattr_set(
            XTarget::At(fd.as_fd(), base.as_bytes()),
            name.as_bytes(),
            value,
            0,
        )
        .unwrap();
    }

    /// A whiteout in the unprivileged format (its parent must be marked `opaque=x`).
    fn xwhiteout(p: &Path) {
        std::fs::write(p, b"").unwrap();
        set_x(p, "user.overlay.whiteout", b"y");
    }

    fn diff_with(upper: &Path, lowers: &[std::path::PathBuf]) -> Vec<u8> {
        let view = Union::read_only_upper(upper, lowers).unwrap();
        let fd = sys::open_dir_path(upper).unwrap();
        export(
            fd.as_fd(),
            Some(&view),
            Vec::new(),
            Options::default(),
            &|_| {},
        )
        .unwrap()
        .1
    }

    #[test]
    fn redirected_directories_are_written_as_copied_trees() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (l, u) = (d.path().join("l"), d.path().join("u"));
        std::fs::create_dir_all(l.join("a/sub/deep")).unwrap();
        std::fs::create_dir_all(l.join("a/gone")).unwrap();
        std::fs::create_dir_all(l.join("n2")).unwrap();
        std::fs::write(l.join("a/f"), b"lower f").unwrap();
        std::fs::set_permissions(l.join("a/f"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::hard_link(l.join("a/f"), l.join("a/h")).unwrap();
        std::fs::write(l.join("a/sub/deep/g"), b"g").unwrap();
        set_x(&l.join("a/f"), "user.keep", b"v");
        // The upper: `a` renamed to `b` (whiteout at a, b redirected), a file added and a
        // directory deleted inside; `n` new and opaque (redirect_dir=on makes new directories
        // in merged parents opaque), `n2` made over a lower directory.
        std::fs::create_dir_all(u.join("b/sub")).unwrap();
        std::fs::create_dir_all(u.join("n")).unwrap();
        std::fs::create_dir_all(u.join("n2")).unwrap();
        set_x(&u, "user.overlay.opaque", b"x");
        xwhiteout(&u.join("a"));
        set_x(&u.join("b"), "user.overlay.redirect", b"a");
        set_x(&u.join("b"), "user.overlay.opaque", b"x");
        xwhiteout(&u.join("b/gone"));
        std::fs::write(u.join("b/new"), b"new").unwrap();
        set_x(&u.join("b/sub"), "user.overlay.opaque", b"y");
        std::fs::write(u.join("b/sub/only"), b"o").unwrap();
        set_x(&u.join("n"), "user.overlay.opaque", b"y");
        set_x(&u.join("n2"), "user.overlay.opaque", b"y");

        let fd = sys::open_dir_path(&u).unwrap();
        let e = export(fd.as_fd(), None, Vec::new(), Options::default(), &|_| {}).unwrap_err();
        assert!(e.to_string().starts_with("b: "), "{e}");

        let tar = diff_with(&u, std::slice::from_ref(&l));
        assert_eq!(
            names(&tar),
            [
                "./",
                ".wh.a",
                "b/",
                "b/.wh..wh..opq",
                "b/f",
                "b/h",
                "b/new",
                "b/sub/",
                "b/sub/only",
                "n/",
                "n2/",
                "n2/.wh..wh..opq",
            ]
        );
        let mut r = TarReader::new(&tar[..]);
        while let Some(e) = r.next_entry().unwrap() {
            if e.path == b"b/f" {
                assert_eq!(e.mode & 0o7777, 0o640);
                assert_eq!(e.xattrs, vec![(b"user.keep".to_vec(), b"v".to_vec())]);
            }
            if e.path == b"b/h" {
                assert_eq!(e.kind, Some(Kind::HardLink));
                assert_eq!(e.link, b"b/f");
            }
        }
        // Without the opaque upper `b/sub`, the lower tree shows through.
        std::fs::remove_dir_all(u.join("b/sub")).unwrap();
        let tar = diff_with(&u, std::slice::from_ref(&l));
        let n = names(&tar);
        assert!(n.contains(&"b/sub/deep/g".to_string()), "{n:?}");
        assert_eq!(diff_with(&u, &[l]), tar, "same upper, same bytes");
    }

    #[test]
    fn no_markers_below_an_opaque_directory() {
        let d = tempfile::tempdir().unwrap();
        let u = d.path();
        std::fs::create_dir_all(u.join("o/s")).unwrap();
        std::fs::create_dir_all(u.join("o/t")).unwrap();
        std::fs::create_dir_all(u.join("p")).unwrap();
        set_x(&u.join("o"), "user.overlay.opaque", b"y");
        set_x(&u.join("o/s"), "user.overlay.opaque", b"x");
        xwhiteout(&u.join("o/s/w"));
        set_x(&u.join("o/t"), "user.overlay.opaque", b"y");
        set_x(&u.join("p"), "user.overlay.opaque", b"x");
        xwhiteout(&u.join("p/w"));
        assert_eq!(
            names(&diff(u)),
            [
                "./",
                "o/",
                "o/.wh..wh..opq",
                "o/s/",
                "o/t/",
                "p/",
                "p/.wh.w"
            ]
        );
    }

    #[test]
    fn sockets_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let _l = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let fd = sys::open_dir_path(d.path()).unwrap();
        let (stats, tar) =
            export(fd.as_fd(), None, Vec::new(), Options::default(), &|_| {}).unwrap();
        assert_eq!(stats.skipped_sockets, 1);
        assert_eq!(names(&tar), ["./", "f"]);
    }

    #[test]
    fn refuses_wh_names_and_clamps_times() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".wh.x"), b"").unwrap();
        let fd = sys::open_dir_path(d.path()).unwrap();
        let e = export(fd.as_fd(), None, Vec::new(), Options::default(), &|_| {}).unwrap_err();
        assert!(e.to_string().contains(".wh."), "{e}");

        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let fd = sys::open_dir_path(d.path()).unwrap();
        let opts = Options {
            source_date_epoch: Some(1000),
        };
        let (_, tar) = export(fd.as_fd(), None, Vec::new(), opts, &|_| {}).unwrap();
        let mut r = TarReader::new(&tar[..]);
        for _ in 0..2 {
            assert_eq!(r.next_entry().unwrap().unwrap().mtime.sec, 1000);
        }
    }
}
