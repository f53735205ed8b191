//! The write path around copy-up ([`super::copyup`]) and rename ([`super::rename`]):
//! whiteouts, creation, removal, opens for write, attribute and xattr changes.
//!
//! Invariants kept for the upper (so kernel overlayfs mounts it the same way):
//! * Every change first copies up what it changes (a metacopy copy when `metacopy=on` and
//!   the change leaves the data alone); a metacopy file never gets written data while it is
//!   one (opens for write and truncations give it its data first, into the same inode).
//! * Nothing half-made is ever visible in the upper: new objects are built in the work
//!   directory (or as an unnamed file in their parent) and renamed or linked into place.
//! * A name removed from the view leaves a whiteout exactly when a lower layer would otherwise
//!   show something under it; creating over a whiteout replaces it in one rename. New
//!   directories in merged parents are made opaque under `redirect_dir=on`, as the kernel
//!   does in that mode.
//! * Every step holds the namespace lock exclusively for a few system calls only.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use super::dirindex::Top;
use super::idmap::IdMap;
use super::inode::{Node, PassthroughSlot};
use super::metacopy::{Change, State};
use super::rename::Planned;
use super::whiteout::{self, WhiteoutFormat};
use super::{Attr, Union, dtype_of, split_path};
use crate::error::{Error, Result};
use crate::sys::{self, FileStat, SetTime, XTarget};

/// Who asks for a change, in ids as stored on disk (the mount maps the ids the kernel gives
/// through its [`IdMap`]s first).
#[derive(Clone, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// How the caller's supplementary groups, which `/proc` lists in the ids the mount shows,
    /// become ids on disk (`None`: the identity).
    pub group_map: Option<Arc<IdMap>>,
}

impl Caller {
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: 0,
            group_map: None,
        }
    }

    /// Whether the caller is a member of group `gid` (an id on disk).
    pub fn in_group(&self, gid: u32) -> bool {
        if gid == self.gid {
            return true;
        }
        let groups = sys::process_groups(self.pid);
        match &self.group_map {
            None => groups.contains(&gid),
            Some(map) => groups.iter().any(|&g| map.to_disk(g) == Some(gid)),
        }
    }
}

/// Attribute changes of a `setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// An open regular file.
pub struct OpenFile {
    ino: u64,
    node: Arc<Node>,
    flags: i32,
    fd: RwLock<Opened>,
}

/// The object an [`OpenFile`] is on now.
struct Opened {
    /// The node generation the object belongs to.
    generation: u64,
    /// Its descriptor; `None` until first needed for a deferred open.
    fd: Option<Arc<OwnedFd>>,
}

impl OpenFile {
    pub fn ino(&self) -> u64 {
        self.ino
    }

    fn opened(&self) -> std::sync::RwLockReadGuard<'_, Opened> {
        self.fd.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The node generation the file is on (changes with copy-up).
    pub fn generation(&self) -> u64 {
        self.opened().generation
    }

    /// The node's passthrough registration, locked.
    pub fn passthrough_slot(&self) -> std::sync::MutexGuard<'_, Option<Box<PassthroughSlot>>> {
        self.node.passthrough_slot()
    }

    /// The node the file is open on.
    pub fn node(&self) -> Arc<Node> {
        self.node.clone()
    }
}

/// `RENAME_*` flags the union accepts.
pub const RENAME_NOREPLACE: u32 = sys::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = sys::RENAME_EXCHANGE;

fn erofs() -> Error {
    Error::os(libc::EROFS)
}

/// What to create in [`Union::create_object`].
enum NewObject<'a> {
    File { flags: i32 },
    Dir,
    Special { rdev: u64 },
    Symlink { target: &'a [u8] },
}

impl Union {
    /// The upper, when it may be written (a read-only union of an upper has no work
    /// directory: [`Union::read_only_upper`]).
    pub(super) fn upper_layer(&self) -> Result<u16> {
        match self.work {
            Some(_) => self.upper.ok_or_else(erofs),
            None => Err(erofs()),
        }
    }

    pub(super) fn work_fd(&self) -> Result<BorrowedFd<'_>> {
        self.work.as_ref().map(|w| w.as_fd()).ok_or_else(erofs)
    }

    pub(super) fn is_upper_node(&self, node: &Node) -> bool {
        Some(node.lock().layer) == self.upper
    }

    /// Open an upper directory by its union path.
    pub(super) fn upper_dir(&self, path: &[u8]) -> Result<OwnedFd> {
        let upper = self.upper_layer()?;
        Ok(self.open_dir_in(upper, path)?)
    }

    // -----------------------------------------------------------------------------------------
    // Whiteouts

    /// Build a whiteout in the work directory; returns its name there.
    fn make_whiteout_in_work(&self) -> Result<Vec<u8>> {
        let work = self.work_fd()?;
        let tmp = self.tmp_name();
        match self.wh_format {
            WhiteoutFormat::CharDev => sys::mknod_at(work, &tmp, sys::S_IFCHR, 0)?,
            WhiteoutFormat::UserXattr => {
                let fd =
                    sys::open_at(work, &tmp, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0)?;
                sys::xattr_set(XTarget::Fd(fd.as_fd()), whiteout::USER_WHITEOUT, b"y", 0)?;
            }
        }
        Ok(tmp)
    }

    /// In the userxattr format a directory holding xattr whiteouts must say so.
    fn mark_xwhiteouts(&self, dir: BorrowedFd<'_>) -> Result<()> {
        if self.wh_format == WhiteoutFormat::UserXattr {
            let cur = sys::xattr_get(XTarget::Fd(dir), whiteout::USER_OPAQUE)?;
            if cur.as_deref() != Some(b"y") {
                sys::xattr_set(XTarget::Fd(dir), whiteout::USER_OPAQUE, b"x", 0)?;
            }
        }
        Ok(())
    }

    /// Put a whiteout at `dir`/`name`, replacing a non-directory there.
    pub(super) fn whiteout_at(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
        self.mark_xwhiteouts(dir)?;
        let work = self.work_fd()?;
        let wh = self.make_whiteout_in_work()?;
        if let Err(e) = sys::rename_at(work, &wh, dir, name, 0) {
            let _ = sys::unlink_at(work, &wh, false);
            return Err(e.into());
        }
        Ok(())
    }

    /// Remove the upper directory `dir`/`name` (whose union view is empty) and, when `whiteout`,
    /// leave a whiteout in its place, in one step.
    fn remove_upper_dir(&self, dir: BorrowedFd<'_>, name: &[u8], whiteout: bool) -> Result<()> {
        let work = self.work_fd()?;
        let tmp = if whiteout {
            self.mark_xwhiteouts(dir)?;
            let wh = self.make_whiteout_in_work()?;
            if let Err(e) = sys::rename_at(work, &wh, dir, name, sys::RENAME_EXCHANGE) {
                let _ = sys::unlink_at(work, &wh, false);
                return Err(e.into());
            }
            wh
        } else {
            match sys::unlink_at(dir, name, true) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                Err(e) => return Err(e.into()),
            }
            let tmp = self.tmp_name();
            sys::rename_at(dir, name, work, &tmp, 0)?;
            tmp
        };
        let old = sys::open_dir_beneath(work, &tmp)?;
        super::remove_contents(old.as_fd())?;
        sys::unlink_at(work, &tmp, true)?;
        Ok(())
    }

    /// Make the upper directory `dir`/`name`, empty in the union but possibly holding
    /// whiteouts, really empty: an empty opaque copy of it is built in the work directory and
    /// swapped in with one exchange, then the old one is removed. A crash at any point leaves
    /// either the old directory or the empty opaque one, never a half-emptied directory whose
    /// lower files show again.
    pub(super) fn clear_empty_dir(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
        let sub = sys::open_dir_beneath(dir, name)?;
        if sys::read_dir_all(sys::open_dir_beneath(sub.as_fd(), b"")?)?.is_empty() {
            return Ok(());
        }
        let work = self.work_fd()?;
        let st = sys::stat_at(dir, name)?;
        let tmp = self.tmp_name();
        sys::mkdir_at(work, &tmp, 0o700)?;
        // The new copy stands for the same object: it keeps the recorded origin as it is.
        let origin = self.recorded_origin(dir, name);
        let origin = origin.as_ref().map(|o| (o.name, &o.value[..]));
        let swap = (|| -> Result<()> {
            self.apply_meta_at(work, &tmp, &st, XTarget::At(dir, name), origin)?;
            self.set_opaque(work, &tmp)?;
            sys::rename_at(work, &tmp, dir, name, sys::RENAME_EXCHANGE)?;
            Ok(())
        })();
        if let Err(e) = swap {
            let _ = sys::unlink_at(work, &tmp, true);
            return Err(e);
        }
        let old = sys::open_dir_beneath(work, &tmp)?;
        super::remove_contents(old.as_fd())?;
        sys::unlink_at(work, &tmp, true)?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Creation

    /// Owner and group a new object gets: the caller, or the directory's group when the
    /// directory is setgid (which new directories inherit).
    fn new_owner(&self, caller: &Caller, parent_st: &FileStat) -> (u32, u32, bool) {
        if parent_st.mode & libc::S_ISGID != 0 {
            (caller.uid, parent_st.gid, true)
        } else {
            (caller.uid, caller.gid, false)
        }
    }

    /// Create a new object in the upper under `parent`/`name`: directly when the name is free
    /// in the upper, through the work directory when a whiteout must be replaced. Returns its
    /// attributes (one lookup counted) and, for files, the open descriptor.
    fn create_object(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        what: NewObject<'_>,
        caller: &Caller,
    ) -> Result<(Attr, Option<OwnedFd>)> {
        if name.len() > sys::NAME_MAX {
            return Err(Error::os(libc::ENAMETOOLONG));
        }
        self.upper_layer()?;
        self.ensure_upper_dir(parent)?;
        let _w = self.write_ns();
        let (pnode, ppath) = self.node_path(parent)?;
        let entry = self.with_index(&pnode, &ppath, |idx| idx.get(name).cloned())?;
        if entry.as_ref().is_some_and(|e| e.top.is_some()) {
            return Err(Error::os(libc::EEXIST));
        }
        let over_whiteout = entry.as_ref().is_some_and(|e| e.upper_whiteout);
        // With redirect_dir=on the kernel marks every new directory in a merged parent opaque
        // (`ovl_create_upper`: lower layers may then not change offline), and so does layerfs,
        // so both write the same upper.
        let lower_below = entry.as_ref().is_some_and(|e| e.lower_visible)
            || (self.redirect_dir && pnode.lock().merge.iter().any(|&l| Some(l) != self.upper));
        let dir = self.upper_dir(&ppath)?;
        let pst = sys::fstat(dir.as_fd())?;
        let (uid, gid, sgid_dir) = self.new_owner(caller, &pst);
        let work = self.work_fd()?;
        // The final permission bits, known before creation so the object is made with them
        // (the daemon runs with umask 0) and most creations need no chmod afterwards.
        let kind_bits = match &what {
            NewObject::File { .. } => sys::S_IFREG,
            NewObject::Dir => sys::S_IFDIR,
            NewObject::Special { .. } => mode & sys::S_IFMT,
            NewObject::Symlink { .. } => sys::S_IFLNK,
        };
        let mut perm = mode & 0o7777;
        if kind_bits == sys::S_IFDIR && sgid_dir {
            perm |= libc::S_ISGID;
        }
        if kind_bits != sys::S_IFDIR
            && perm & libc::S_ISGID != 0
            && caller.uid != 0
            && !caller.in_group(gid)
        {
            perm &= !libc::S_ISGID;
        }
        // Where the object is made: in place, or in the work dir to be renamed over a whiteout.
        let (mk_dir, mk_name): (BorrowedFd<'_>, Vec<u8>) = if over_whiteout {
            (work, self.tmp_name())
        } else {
            (dir.as_fd(), name.to_vec())
        };
        let mut fd = None;
        let kind = kind_bits;
        match &what {
            NewObject::File { flags } => {
                let f = sys::open_at(
                    mk_dir,
                    &mk_name,
                    (flags & (libc::O_ACCMODE | super::PASSED_OPEN_FLAGS))
                        | libc::O_CREAT
                        | libc::O_EXCL,
                    perm & 0o777,
                )?;
                fd = Some(f);
            }
            NewObject::Dir => sys::mkdir_at(mk_dir, &mk_name, perm & 0o1777)?,
            NewObject::Special { rdev } => {
                if kind == sys::S_IFCHR && *rdev == 0 {
                    // A 0/0 character device is how whiteouts are stored; users may not make one.
                    return Err(Error::os(libc::EPERM));
                }
                sys::mknod_at(mk_dir, &mk_name, kind | (perm & 0o777), *rdev)?;
            }
            NewObject::Symlink { target } => sys::symlink_at(target, mk_dir, &mk_name)?,
        }
        let finish = || -> Result<()> {
            if uid != self.own_uid || gid != self.own_gid {
                sys::chown_at(mk_dir, &mk_name, Some(uid), Some(gid))?;
            }
            // Special bits: chown clears setuid/setgid, mkdir ignores setgid.
            if kind != sys::S_IFLNK && perm & 0o7000 != 0 {
                sys::chmod_at(mk_dir, &mk_name, perm)?;
            }
            if kind == sys::S_IFDIR && lower_below {
                self.set_opaque(mk_dir, &mk_name)?;
            }
            if over_whiteout {
                if kind == sys::S_IFDIR {
                    sys::rename_at(work, &mk_name, dir.as_fd(), name, sys::RENAME_EXCHANGE)?;
                    sys::unlink_at(work, &mk_name, false)?;
                } else {
                    sys::rename_at(work, &mk_name, dir.as_fd(), name, 0)?;
                }
            }
            Ok(())
        };
        if let Err(e) = finish() {
            let _ = sys::unlink_at(mk_dir, &mk_name, kind == sys::S_IFDIR);
            return Err(e);
        }
        if self.fsync && over_whiteout {
            let _ = sys::fsync(dir.as_fd(), false);
        }
        let st = match &fd {
            Some(f) => sys::fstat(f.as_fd())?,
            None => sys::stat_at(dir.as_fd(), name)?,
        };
        let upper = self.upper_layer()?;
        if let Some(idx) = pnode.lock().index.as_mut() {
            idx.created(name, dtype_of(st.mode));
        }
        let node = {
            let mut t = self.table();
            let preferred = t.inos.map(st.dev, st.ino);
            t.lookup(parent, name, (st.dev, st.ino), preferred, |ino| {
                Node::new(
                    ino,
                    super::inode::NodeState {
                        kind,
                        layer: upper,
                        merge: if kind == sys::S_IFDIR {
                            Box::new([upper])
                        } else {
                            Box::new([])
                        },
                        merge_cut: true,
                        backing: (st.dev, st.ino),
                        index: None,
                        unlinked: false,
                        orphan: None,
                        no_xattrs: false,
                        no_caps: kind == sys::S_IFREG,
                        xattr_epoch: 0,
                        index_stamp: 0,
                        lpaths: None,
                        data: None,
                    },
                )
            })
        };
        Ok((self.attr_of(&node, st), fd))
    }

    /// `create`: make and open a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: &Caller,
    ) -> Result<(Attr, OpenFile)> {
        let (attr, fd) =
            self.create_object(parent, name, mode, NewObject::File { flags }, caller)?;
        let fd = fd.ok_or_else(|| Error::os(libc::EIO))?;
        let node = self.node(attr.ino)?;
        let generation = node.generation.load(Ordering::Acquire);
        Ok((
            attr,
            OpenFile {
                ino: attr.ino,
                node,
                flags: flags & (libc::O_ACCMODE | super::PASSED_OPEN_FLAGS),
                fd: RwLock::new(Opened {
                    generation,
                    fd: Some(Arc::new(fd)),
                }),
            },
        ))
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        caller: &Caller,
    ) -> Result<Attr> {
        let what = if mode & sys::S_IFMT == sys::S_IFREG || mode & sys::S_IFMT == 0 {
            NewObject::File {
                flags: libc::O_WRONLY,
            }
        } else {
            NewObject::Special { rdev }
        };
        Ok(self.create_object(parent, name, mode, what, caller)?.0)
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, caller: &Caller) -> Result<Attr> {
        Ok(self
            .create_object(parent, name, mode, NewObject::Dir, caller)?
            .0)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: &Caller,
    ) -> Result<Attr> {
        Ok(self
            .create_object(parent, name, 0o777, NewObject::Symlink { target }, caller)?
            .0)
    }

    /// Hard link `ino` as `newparent`/`newname`. The source is copied up first (its metadata
    /// only with `metacopy=on`: then, as the kernel does, it records where its data is with
    /// an absolute redirect, which every name of it can follow).
    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        if newname.len() > sys::NAME_MAX {
            return Err(Error::os(libc::ENAMETOOLONG));
        }
        self.upper_layer()?;
        let src = self.node(ino)?;
        if src.lock().kind == sys::S_IFDIR {
            return Err(Error::os(libc::EPERM));
        }
        self.prepare(&src, Change::Link)?;
        if let Planned::Redirect(Some(value)) = self.plan_file(&src, false)? {
            let _w = self.write_ns();
            let (_, path) = self.node_path(ino)?;
            let upper = self.upper_layer()?;
            self.at(upper, &path, |d, n| {
                sys::xattr_set(XTarget::At(d, n), self.xattr_ns.redirect(), &value, 0)
            })?;
        }
        self.ensure_upper_dir(newparent)?;
        let _w = self.write_ns();
        let (node, src_path) = self.node_path(ino)?;
        if node.lock().kind == sys::S_IFDIR {
            return Err(Error::os(libc::EPERM));
        }
        let (pnode, ppath) = self.node_path(newparent)?;
        let entry = self.with_index(&pnode, &ppath, |idx| idx.get(newname).cloned())?;
        if entry.as_ref().is_some_and(|e| e.top.is_some()) {
            return Err(Error::os(libc::EEXIST));
        }
        let (sdir, sname) = split_path(&src_path);
        let sdir = self.upper_dir(sdir)?;
        let ddir = self.upper_dir(&ppath)?;
        if entry.as_ref().is_some_and(|e| e.upper_whiteout) {
            let work = self.work_fd()?;
            let tmp = self.tmp_name();
            sys::link_at(sdir.as_fd(), sname, work, &tmp)?;
            if let Err(e) = sys::rename_at(work, &tmp, ddir.as_fd(), newname, 0) {
                let _ = sys::unlink_at(work, &tmp, false);
                return Err(e.into());
            }
        } else {
            sys::link_at(sdir.as_fd(), sname, ddir.as_fd(), newname)?;
        }
        let st = sys::stat_at(ddir.as_fd(), newname)?;
        if let Some(idx) = pnode.lock().index.as_mut() {
            idx.created(newname, dtype_of(st.mode));
        }
        {
            let mut t = self.table();
            t.add_link(ino, newparent, newname);
            t.add_lookup(ino);
        }
        node.lock().unlinked = false;
        Ok(self.attr_of(&node, st))
    }

    // -----------------------------------------------------------------------------------------
    // Removal

    /// `unlink` (`dir` false) or `rmdir` (`dir` true).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        self.upper_layer()?;
        let (pnode, top) = {
            let _r = self.read_ns();
            let (pnode, ppath) = self.node_path(parent)?;
            let top = self.with_index(&pnode, &ppath, |idx| idx.visible(name).map(|(t, _)| t))?;
            (pnode, top.ok_or_else(|| Error::os(libc::ENOENT))?)
        };
        if dir && !top.is_dir() {
            return Err(Error::os(libc::ENOTDIR));
        }
        if !dir && top.is_dir() {
            return Err(Error::os(libc::EISDIR));
        }
        self.ensure_upper_dir(parent)?;
        if dir {
            // The kernel looked the directory up before rmdir (and holds its lock), so the node
            // is known; its index tells whether it is empty in the union.
            let child = self.lookup_known(parent, name)?;
            let _r = self.read_ns();
            let cpath = self
                .table()
                .path(child.ino)
                .ok_or_else(|| Error::os(libc::ENOENT))?;
            if !self.with_index(&child, &cpath, |idx| idx.is_empty())? {
                return Err(Error::os(libc::ENOTEMPTY));
            }
        }
        let _w = self.write_ns();
        let ppath = self
            .table()
            .path(parent)
            .ok_or_else(|| Error::os(libc::ENOENT))?;
        let (top, needs_wh) = self
            .with_index(&pnode, &ppath, |idx| {
                idx.visible(name)
                    .map(|(t, _)| (t, idx.needs_whiteout(name)))
            })?
            .ok_or_else(|| Error::os(libc::ENOENT))?;
        let upper = self.upper_layer()?;
        let udir = self.upper_dir(&ppath)?;
        let known = self.table().child(parent, name);
        // The object may outlive its name (open files, fifos in use): keep a way to it.
        let orphan = known.and_then(|_| {
            let dir = if top.layer == upper {
                None
            } else {
                self.open_dir_in(top.layer, &self.lpath(parent, top.layer, &ppath))
                    .ok()
            };
            let dir = dir.as_ref().map_or(udir.as_fd(), |d| d.as_fd());
            sys::open_at(dir, name, libc::O_PATH, 0).ok().map(Arc::new)
        });
        let mut last_link = true;
        if top.layer == upper {
            let st = sys::stat_at(udir.as_fd(), name)?;
            last_link = st.nlink <= 1 || dir;
            if dir {
                self.remove_upper_dir(udir.as_fd(), name, needs_wh)?;
            } else if needs_wh {
                self.whiteout_at(udir.as_fd(), name)?;
            } else {
                sys::unlink_at(udir.as_fd(), name, false)?;
            }
        } else {
            if !dir {
                let src = self.open_dir_in(top.layer, &self.lpath(parent, top.layer, &ppath))?;
                last_link = sys::stat_at(src.as_fd(), name)?.nlink <= 1;
            }
            self.whiteout_at(udir.as_fd(), name)?;
        }
        if let Some(idx) = pnode.lock().index.as_mut() {
            idx.removed(name);
        }
        let mut t = self.table();
        if let Some(ino) = t.remove_link(parent, name) {
            if let Some(node) = t.get(ino).cloned() {
                if !t.has_links(ino) && last_link {
                    let mut s = node.lock();
                    s.unlinked = true;
                    s.orphan = orphan;
                    drop(s);
                    t.unbind(ino);
                }
            }
        }
        Ok(())
    }

    /// The node known as `parent`/`name`, looked up if the table lacks it (the lookup is
    /// given back at once).
    pub(super) fn lookup_known(&self, parent: u64, name: &[u8]) -> Result<Arc<Node>> {
        let known = self.table().child(parent, name);
        if let Some(ino) = known {
            return self.node(ino);
        }
        let attr = self.lookup(parent, name)?;
        let node = self.node(attr.ino);
        self.forget(attr.ino, 1);
        node
    }

    // -----------------------------------------------------------------------------------------
    // Opening for write, attributes, xattrs

    /// Open a file; a write open (or O_TRUNC) copies it up first (without data when the
    /// open truncates).
    pub fn open(&self, ino: u64, flags: i32) -> Result<OpenFile> {
        let acc = flags & libc::O_ACCMODE;
        let writes = acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.upper_layer()?;
            let node = self.node(ino)?;
            if node.lock().kind == sys::S_IFDIR {
                return Err(Error::os(libc::EISDIR));
            }
            let change = Change::Open {
                write: true,
                trunc: flags & libc::O_TRUNC != 0,
            };
            self.prepare(&node, change)?;
        }
        self.open_current(ino, flags)
    }

    /// Whether `file` is a read-only open of a lower file of at most `limit` bytes. The size
    /// is asked once per node (lower files never change).
    pub fn is_small_lower_read(&self, file: &OpenFile, limit: u64) -> bool {
        use super::inode::{SMALL_NO, SMALL_STORED, SMALL_UNKNOWN, SMALL_YES};
        // A metacopy file reads its lower data, which does not change either until its first
        // open for write.
        if file.flags & libc::O_ACCMODE != libc::O_RDONLY
            || self.state_of(&file.node) == State::Upper
        {
            return false;
        }
        match file.node.small_lower.load(Ordering::Relaxed) {
            SMALL_UNKNOWN => {}
            known => return known == SMALL_YES || known == SMALL_STORED,
        }
        let Some(st) = self
            .file_fd(file)
            .ok()
            .and_then(|fd| sys::fstat(fd.as_fd()).ok())
        else {
            return false;
        };
        let small = st.size <= limit;
        let known = if small { SMALL_YES } else { SMALL_NO };
        file.node.small_lower.store(known, Ordering::Relaxed);
        small
    }

    /// The whole content of a small lower file open as `file`, once per node: `None` when it
    /// was taken before (or the file is not known to be small). Reading past `limit` is an
    /// error, so a file that grew behind our back is never taken whole.
    pub fn small_lower_content(&self, file: &OpenFile, limit: u64) -> Result<Option<Vec<u8>>> {
        use super::inode::{SMALL_STORED, SMALL_YES};
        if file.node.small_lower.load(Ordering::Relaxed) != SMALL_YES {
            return Ok(None);
        }
        let fd = self.file_fd(file)?;
        let mut data = vec![0u8; limit as usize + 1];
        let mut len = 0;
        loop {
            let n = sys::pread(fd.as_fd(), &mut data[len..], len as u64)?;
            if n == 0 {
                break;
            }
            len += n;
            if len == data.len() {
                return Err(Error::os(libc::EFBIG));
            }
        }
        data.truncate(len);
        file.node.small_lower.store(SMALL_STORED, Ordering::Relaxed);
        Ok(Some(data))
    }

    /// Like [`Union::open`], but a read-only open gets no descriptor until
    /// [`Union::file_fd`] needs one: the caller may serve it through a file it registered
    /// with the kernel before. Opens that write go through [`Union::open`].
    pub fn open_deferred(&self, ino: u64, flags: i32) -> Result<OpenFile> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return self.open(ino, flags);
        }
        let node = self.node(ino)?;
        let generation = node.generation.load(Ordering::Acquire);
        if node.lock().kind == sys::S_IFDIR {
            return Err(Error::os(libc::EISDIR));
        }
        Ok(OpenFile {
            ino,
            node,
            flags: libc::O_RDONLY | (flags & super::PASSED_OPEN_FLAGS),
            fd: RwLock::new(Opened {
                generation,
                fd: None,
            }),
        })
    }

    fn open_current(&self, ino: u64, flags: i32) -> Result<OpenFile> {
        let _r = self.read_ns();
        let node = self.node(ino)?;
        let generation = node.generation.load(Ordering::Acquire);
        let (layer, kind, data) = {
            let s = node.lock();
            (s.layer, s.kind, s.data.clone())
        };
        if kind == sys::S_IFDIR {
            return Err(Error::os(libc::EISDIR));
        }
        let acc = flags & libc::O_ACCMODE;
        let pass = acc | (flags & (super::PASSED_OPEN_FLAGS | libc::O_TRUNC));
        let fd = match data {
            // A metacopy file is read from its lower data (by name or not: it needs no path).
            Some(d) if pass & (libc::O_ACCMODE | libc::O_TRUNC) == libc::O_RDONLY => {
                self.open_data_file(&d, pass)?
            }
            // Opens that write gave the file its data first: this is a bug, never a write
            // into the sparse upper file.
            Some(_) => return Err(Error::os(libc::EIO)),
            None => {
                let (_, path) = self.node_path(ino)?;
                let lpath = self.lpath(ino, layer, &path);
                sys::open_beneath(self.root_fd(layer), &lpath, pass, 0)?
            }
        };
        Ok(OpenFile {
            ino,
            node,
            flags: pass & !libc::O_TRUNC,
            fd: RwLock::new(Opened {
                generation,
                fd: Some(Arc::new(fd)),
            }),
        })
    }

    /// The descriptor to use for `file` now, opened here if the open was deferred. A
    /// read-only descriptor opened on a lower file that has since been copied up is reopened
    /// on the upper copy, so every open file sees the same data (and the shared page cache
    /// is never refilled from the stale lower file).
    pub fn file_fd(&self, file: &OpenFile) -> Result<Arc<OwnedFd>> {
        let now = file.node.generation.load(Ordering::Acquire);
        {
            let cur = file.opened();
            if cur.generation == now {
                if let Some(fd) = &cur.fd {
                    return Ok(fd.clone());
                }
            }
        }
        match self.open_current(file.ino, file.flags) {
            Ok(fresh) => {
                let fresh = fresh.fd.into_inner().unwrap_or_else(|p| p.into_inner());
                let fd = fresh.fd.clone().ok_or_else(|| Error::os(libc::EIO))?;
                *file.fd.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                Ok(fd)
            }
            // Unlinked meanwhile: reopen the object through the descriptor kept at unlink,
            // or keep the old descriptor when there is none.
            Err(e) => {
                let orphan = file.node.lock().orphan.clone();
                let reopened = orphan.and_then(|o| sys::reopen(o.as_fd(), file.flags).ok());
                let mut cur = file.fd.write().unwrap_or_else(|p| p.into_inner());
                cur.generation = now;
                if let Some(fd) = reopened {
                    cur.fd = Some(Arc::new(fd));
                }
                cur.fd.clone().ok_or(e)
            }
        }
    }

    /// `setattr`: copy up, then change what was asked, in the order that keeps setuid bits
    /// and capabilities right (owner, then mode, then size, then times).
    pub fn setattr(&self, ino: u64, changes: &SetAttr, fd: Option<BorrowedFd<'_>>) -> Result<Attr> {
        self.upper_layer()?;
        let node = self.node(ino)?;
        self.prepare(&node, Change::Attr { size: changes.size })?;
        // A metacopy file's descriptors are open on its lower data, never to be changed: its
        // upper file is reached by name, or once unlinked through the descriptor kept then.
        let orphan = {
            let s = node.lock();
            s.data.as_ref().map(|_| s.orphan.clone())
        };
        let fd = match &orphan {
            Some(o) => o.as_ref().map(|o| o.as_fd()),
            None => fd,
        };
        let _r = self.read_ns();
        let (node, path) = self.node_path(ino).or_else(|e| {
            // An unlinked file can still be changed through its descriptor.
            if fd.is_some() {
                self.node(ino).map(|n| (n, Vec::new()))
            } else {
                Err(e)
            }
        })?;
        let upper = self.upper_layer()?;
        let symlink = node.lock().kind == sys::S_IFLNK;
        let with = |f: &dyn Fn(BorrowedFd<'_>, &[u8]) -> std::io::Result<()>| -> Result<()> {
            match fd {
                Some(fd) if path.is_empty() || changes.size.is_some() => Ok(f(fd, b"")?),
                _ => Ok(self.at(upper, &path, |d, n| f(d, n))?),
            }
        };
        if changes.uid.is_some() || changes.gid.is_some() {
            with(&|d, n| sys::chown_at(d, n, changes.uid, changes.gid))?;
        }
        if let Some(mode) = changes.mode {
            if !symlink {
                with(&|d, n| sys::chmod_at(d, n, mode & 0o7777))?;
            }
        }
        if let Some(size) = changes.size {
            match fd {
                Some(fd) => sys::ftruncate(fd, size)?,
                None => {
                    let f = sys::open_beneath(self.root_fd(upper), &path, libc::O_WRONLY, 0)?;
                    sys::ftruncate(f.as_fd(), size)?;
                }
            }
        }
        if changes.atime.is_some() || changes.mtime.is_some() {
            let a = changes.atime.unwrap_or(SetTime::Omit);
            let m = changes.mtime.unwrap_or(SetTime::Omit);
            with(&|d, n| sys::utimens_at(d, n, a, m))?;
        }
        let st = match fd {
            Some(fd) => sys::fstat(fd)?,
            None => self.at(upper, &path, sys::stat_at)?,
        };
        Ok(self.attr_of(&node, st))
    }

    /// Set an xattr (private overlay names are refused).
    pub fn setxattr(&self, ino: u64, attr: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if whiteout::is_private_xattr(attr) {
            return Err(Error::os(libc::EOPNOTSUPP));
        }
        self.upper_layer()?;
        self.prepare(&self.node(ino)?, Change::Xattr)?;
        let _r = self.read_ns();
        let (node, path) = self.node_path(ino)?;
        let upper = self.upper_layer()?;
        let forget_misses = || {
            let mut s = node.lock();
            s.xattr_epoch = s.xattr_epoch.wrapping_add(1);
            s.no_xattrs = false;
            s.no_caps = false;
        };
        // Before, so no miss is answered while the value is being set; after, so a miss
        // looked up meanwhile is not remembered.
        forget_misses();
        let set = self.at(upper, &path, |d, n| {
            sys::xattr_set(Self::xtarget(d, n), attr, value, flags)
        });
        forget_misses();
        Ok(set?)
    }

    pub fn removexattr(&self, ino: u64, attr: &[u8]) -> Result<()> {
        if whiteout::is_private_xattr(attr) {
            return Err(Error::os(libc::EOPNOTSUPP));
        }
        // Nothing to copy up for an attribute that is not there.
        self.getxattr(ino, attr)?;
        self.upper_layer()?;
        self.prepare(&self.node(ino)?, Change::Xattr)?;
        let _r = self.read_ns();
        let (_, path) = self.node_path(ino)?;
        let upper = self.upper_layer()?;
        Ok(self.at(upper, &path, |d, n| {
            sys::xattr_remove(Self::xtarget(d, n), attr)
        })?)
    }

    /// `fsync` of a directory: sync its upper copy if it has one.
    pub fn fsync_dir(&self, ino: u64) -> Result<()> {
        let Some(upper) = self.upper else {
            return Ok(());
        };
        let _r = self.read_ns();
        let (node, path) = self.node_path(ino)?;
        if node.lock().layer != upper {
            return Ok(());
        }
        let fd = self.open_dir_in(upper, &path)?;
        Ok(sys::fsync(fd.as_fd(), false)?)
    }

    /// Where a name of a directory lives, for tests and tools.
    pub fn top_of(&self, parent: u64, name: &[u8]) -> Result<Option<Top>> {
        let _r = self.read_ns();
        let (pnode, ppath) = self.node_path(parent)?;
        self.with_index(&pnode, &ppath, |idx| idx.visible(name).map(|(t, _)| t))
    }
}
