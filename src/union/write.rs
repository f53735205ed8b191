//! The write path: copy-up, whiteouts, creation, removal, rename, attribute changes.
//!
//! Invariants kept for the upper (so kernel overlayfs mounts it the same way):
//! * Nothing half-made is ever visible in the upper. Regular files are copied into an
//!   `O_TMPFILE` in their upper parent and linked into place once complete (and synced unless the
//!   mount is `volatile`); directories, symlinks and special files are built in the work
//!   directory and renamed into place; whiteouts replace names with one rename.
//! * A name removed from the view leaves a whiteout exactly when a lower layer would otherwise
//!   show something under it; creating over a whiteout replaces it in one rename.
//! * Renaming a directory that is not purely upper first copies its whole tree up and marks it
//!   opaque, so the upper never depends on lower paths (no redirects) and stays a valid
//!   kernel-overlayfs upper; nodes keep their inode numbers through the copy (origin xattr).
//!   With `redirect_dir=on` it copies the directory alone and records the kernel's redirect
//!   (see [`super::redirect`]; `Union::plan_redirect`, `Union::redirect_value`), falling back
//!   to the tree copy when the value would be longer than the kernel writes; the node keeps
//!   its lower copies' paths (`lpaths`) so nothing below it has to be looked up again. New
//!   directories in merged parents are then made opaque, as the kernel does in that mode.
//! * A copy of a lower object records its origin as the kernel does (`<ns>.overlay.origin`,
//!   see [`super::origin`]), so the kernel and layerfs show it with the lower object's number.
//! * With `metacopy=on`, changes that leave a regular file's data alone copy its metadata only
//!   ([`super::metacopy::action`] decides, per change); such a file never gets written data
//!   while it is a metacopy file (opens for write and truncations give it its data first,
//!   into the same inode), and one that moves or gets another name records a data redirect.
//!   A tree copy gives the metacopy files in the tree their data.
//! * Copying file data happens without the namespace lock; every other step holds it
//!   exclusively for a few system calls.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use super::dirindex::Top;
use super::idmap::IdMap;
use super::inode::{LowerPath, Node, PassthroughSlot, ROOT_INO};
use super::metacopy::{self, Action, Change, DataSource, State};
use super::redirect;
use super::whiteout::{self, WhiteoutFormat, XattrNs};
use super::{Attr, Stack, Union, dtype_of, join_path, split_path};
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

/// How a directory about to be renamed is moved.
enum Planned {
    /// Not a directory, or its tree was copied up (copy-tree mode).
    Nothing,
    /// A pure upper directory, under `redirect_dir=on`.
    PureUpper,
    /// A lower or merged directory under `redirect_dir=on`: the redirect to write (`None`:
    /// keep the one it has).
    Redirect(Option<Vec<u8>>),
}

/// What a copy-up of a regular file puts in the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// The data.
    Data,
    /// Nothing (it is truncated to 0 anyway).
    Empty,
    /// Nothing, as a metacopy file: as long as the data, which stays in the lower layer.
    Meta,
}

impl Fill {
    fn of(action: Action) -> Option<Fill> {
        match action {
            Action::CopyUpMeta => Some(Fill::Meta),
            Action::CopyUp { data: true } => Some(Fill::Data),
            Action::CopyUp { data: false } => Some(Fill::Empty),
            Action::Nothing | Action::FillData { .. } => None,
        }
    }
}

/// Copies made during a tree copy wait unnamed in batches of this size for one `syncfs`.
const TREE_COPY_BATCH: usize = 128;

/// A regular file copied during a tree copy, complete but not yet given its name.
struct PendingCopy {
    file: OwnedFd,
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
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

    fn work_fd(&self) -> Result<BorrowedFd<'_>> {
        self.work.as_ref().map(|w| w.as_fd()).ok_or_else(erofs)
    }

    fn is_upper_node(&self, node: &Node) -> bool {
        Some(node.lock().layer) == self.upper
    }

    /// Open an upper directory by its union path.
    fn upper_dir(&self, path: &[u8]) -> Result<OwnedFd> {
        let upper = self.upper_layer()?;
        Ok(self.open_dir_in(upper, path)?)
    }

    // -----------------------------------------------------------------------------------------
    // Metadata and data copying

    /// Copy the user-visible xattrs of `src` onto `dst`, then record the origin (an xattr name
    /// and value).
    fn copy_xattrs(
        &self,
        src: XTarget<'_>,
        dst: XTarget<'_>,
        origin: Option<(&[u8], &[u8])>,
        symlink: bool,
    ) -> Result<()> {
        let names = match sys::xattr_list(src) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        for name in names {
            if whiteout::is_private_xattr(&name) {
                continue;
            }
            let Some(value) = sys::xattr_get(src, &name)? else {
                continue;
            };
            match sys::xattr_set(dst, &name, &value, 0) {
                Ok(()) => {}
                // Not every filesystem takes every namespace (e.g. user.* on symlinks).
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EPERM)) =>
                {
                    log::debug!("copy-up: xattr {} not copied: {e}", name.escape_ascii())
                }
                Err(e) => return Err(e.into()),
            }
        }
        // user.* xattrs cannot be set on symlinks; an origin that cannot be written costs a
        // copied-up object its lower inode number, not its copy (the kernel does the same).
        if let Some((name, value)) = origin.filter(|_| !(symlink && self.xattr_ns == XattrNs::User))
        {
            let _ = sys::xattr_set(dst, name, value, 0);
        }
        Ok(())
    }

    /// Give a freshly made object in `dir`/`name` the owner, mode, xattrs and times of `st`.
    /// Order matters: chown clears setuid bits and file capabilities, so it goes first.
    fn apply_meta_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        st: &FileStat,
        src: XTarget<'_>,
        origin: Option<(&[u8], &[u8])>,
    ) -> Result<()> {
        sys::chown_at(dir, name, Some(st.uid), Some(st.gid))?;
        if !st.is_symlink() {
            sys::chmod_at(dir, name, st.perm())?;
        }
        self.copy_xattrs(src, XTarget::At(dir, name), origin, st.is_symlink())?;
        sys::utimens_at(dir, name, SetTime::At(st.atime), SetTime::At(st.mtime))?;
        Ok(())
    }

    fn apply_meta_fd(
        &self,
        fd: BorrowedFd<'_>,
        st: &FileStat,
        src: XTarget<'_>,
        origin: Option<(&[u8], &[u8])>,
    ) -> Result<()> {
        sys::fchown(fd, Some(st.uid), Some(st.gid))?;
        sys::fchmod(fd, st.perm())?;
        self.copy_xattrs(src, XTarget::Fd(fd), origin, false)?;
        sys::futimens(fd, SetTime::At(st.atime), SetTime::At(st.mtime))?;
        Ok(())
    }

    /// Fill an unnamed copy `tmp` of the regular file `src` with its metadata and, as `fill`
    /// says, its data: `src`'s own, or `data`'s when `src` is a metacopy file of a lower layer.
    fn fill_copy(
        &self,
        src: BorrowedFd<'_>,
        data: Option<BorrowedFd<'_>>,
        tmp: BorrowedFd<'_>,
        fill: Fill,
    ) -> Result<FileStat> {
        let st = sys::fstat(src)?;
        match fill {
            Fill::Data => copy_data(data.unwrap_or(src), tmp, st.size, self.fsync)?,
            Fill::Meta => self.make_metacopy(tmp, &st)?,
            Fill::Empty => {}
        }
        let origin = self.origin_value(XTarget::Fd(src), &st);
        let origin = origin.as_deref().map(|v| (self.xattr_ns.origin(), v));
        self.apply_meta_fd(tmp, &st, XTarget::Fd(src), origin)?;
        Ok(st)
    }

    /// Copy a regular file from `src_dir`/`name` (in a lower) into a new unnamed file in
    /// `dst_dir` (the upper parent); the caller syncs and names it. `data`: where the data is
    /// when the file is a metacopy file of its layer.
    fn copy_file_data(
        &self,
        src_dir: BorrowedFd<'_>,
        name: &[u8],
        dst_dir: BorrowedFd<'_>,
        data: Option<BorrowedFd<'_>>,
    ) -> Result<OwnedFd> {
        let src = sys::open_at(src_dir, name, libc::O_RDONLY, 0)?;
        let tmp = sys::open_tmpfile(dst_dir, libc::O_RDWR, 0o600)?;
        self.fill_copy(src.as_fd(), data, tmp.as_fd(), Fill::Data)?;
        Ok(tmp)
    }

    /// Give the pending copies of a tree copy their names, after one `syncfs` has made all
    /// their data durable (one sync per batch instead of one per file).
    fn link_pending(&self, pending: &mut Vec<PendingCopy>) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        if self.fsync {
            let upper = self.upper_layer()?;
            sys::syncfs(self.root_fd(upper))?;
        }
        for p in pending.drain(..) {
            sys::link_fd_at(p.file.as_fd(), p.dir.as_fd(), &p.name)?;
        }
        Ok(())
    }

    /// Copy a non-regular, non-directory object (symlink, fifo, device, socket) into
    /// `dst_dir`/`name` through the work directory.
    fn copy_special(
        &self,
        src_dir: BorrowedFd<'_>,
        name: &[u8],
        dst_dir: BorrowedFd<'_>,
    ) -> Result<FileStat> {
        let work = self.work_fd()?;
        let st = sys::stat_at(src_dir, name)?;
        let tmp = self.tmp_name();
        if st.is_symlink() {
            let target = sys::readlink_at(src_dir, name)?;
            sys::symlink_at(&target, work, &tmp)?;
        } else {
            sys::mknod_at(work, &tmp, st.file_type() | 0o600, st.rdev)?;
        }
        let origin = self.origin_value(XTarget::At(src_dir, name), &st);
        let origin = origin.as_deref().map(|v| (self.xattr_ns.origin(), v));
        let res = self
            .apply_meta_at(work, &tmp, &st, XTarget::At(src_dir, name), origin)
            .and_then(|()| {
                Ok(sys::rename_at(
                    work,
                    &tmp,
                    dst_dir,
                    name,
                    sys::RENAME_NOREPLACE,
                )?)
            });
        if res.is_err() {
            let _ = sys::unlink_at(work, &tmp, false);
        }
        res.map(|()| st)
    }

    /// Make the upper copy of directory `name` (not its contents) in `dst_dir`.
    fn copy_dir_shell(
        &self,
        src_dir: BorrowedFd<'_>,
        name: &[u8],
        dst_dir: BorrowedFd<'_>,
        opaque: bool,
    ) -> Result<FileStat> {
        let work = self.work_fd()?;
        let st = sys::stat_at(src_dir, name)?;
        let tmp = self.tmp_name();
        sys::mkdir_at(work, &tmp, 0o700)?;
        let origin = self.origin_value(XTarget::At(src_dir, name), &st);
        let origin = origin.as_deref().map(|v| (self.xattr_ns.origin(), v));
        let res = (|| -> Result<()> {
            self.apply_meta_at(work, &tmp, &st, XTarget::At(src_dir, name), origin)?;
            if opaque {
                self.set_opaque(work, &tmp)?;
            }
            sys::rename_at(work, &tmp, dst_dir, name, sys::RENAME_NOREPLACE)?;
            Ok(())
        })();
        if res.is_err() {
            let _ = sys::unlink_at(work, &tmp, true);
        }
        res.map(|()| st)
    }

    /// Mark an upper directory that now holds a copied-up object `impure`, as the kernel does
    /// (its plain listings then give such entries their origin numbers). Best effort: without
    /// the mark only the kernel's `d_ino` in a directory that merges nothing differs.
    fn mark_impure(&self, dir: BorrowedFd<'_>) {
        let attr = self.xattr_ns.impure();
        if let Ok(None) = sys::xattr_get(XTarget::Fd(dir), attr) {
            let _ = sys::xattr_set(XTarget::Fd(dir), attr, b"y", 0);
        }
    }

    fn set_opaque(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
        let target = if name.is_empty() {
            XTarget::Fd(dir)
        } else {
            XTarget::At(dir, name)
        };
        Ok(sys::xattr_set(target, self.xattr_ns.opaque(), b"y", 0)?)
    }

    /// Restore a directory's times after we changed its entries on behalf of a copy-up (which
    /// must not look like a change to users).
    fn keep_times<T>(&self, dir: BorrowedFd<'_>, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = sys::fstat(dir)?;
        let out = f()?;
        let _ = sys::futimens(dir, SetTime::At(before.atime), SetTime::At(before.mtime));
        Ok(out)
    }

    // -----------------------------------------------------------------------------------------
    // Copy-up of nodes

    /// Make sure directory `ino` and all its ancestors exist in the upper.
    fn ensure_upper_dir(&self, ino: u64) -> Result<()> {
        self.upper_layer()?;
        loop {
            // The chain from `ino` up to the root, collected under the table lock; node locks
            // are taken only after it is released.
            let chain: Vec<Arc<Node>> = {
                let t = self.table();
                let mut chain = Vec::new();
                let mut cur = ino;
                while cur != ROOT_INO {
                    chain.push(t.get(cur).cloned().ok_or_else(|| Error::os(libc::ESTALE))?);
                    cur = t.parent(cur).ok_or_else(|| Error::os(libc::ENOENT))?;
                    if chain.len() > 4096 {
                        return Err(Error::os(libc::ELOOP));
                    }
                }
                chain
            };
            // The topmost ancestor not yet in the upper goes first.
            match chain.into_iter().rev().find(|n| !self.is_upper_node(n)) {
                None => return Ok(()),
                Some(node) => self.copy_up_node(&node, Fill::Data)?,
            }
        }
    }

    /// Copy one node up (its parent must already be in the upper, except when called through
    /// [`Union::copy_up`]). `fill` says what a regular file's copy holds.
    fn copy_up_node(&self, node: &Arc<Node>, fill: Fill) -> Result<()> {
        let _one = node.copy_up.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_upper_node(node) {
            return Ok(());
        }
        let kind = node.lock().kind;
        if kind == sys::S_IFREG {
            return self.copy_up_file(node, fill);
        }
        let _w = self.write_ns();
        if self.is_upper_node(node) {
            return Ok(());
        }
        let (path, parent) = {
            let t = self.table();
            (
                t.path(node.ino).ok_or_else(|| Error::os(libc::ENOENT))?,
                t.parent(node.ino).unwrap_or(ROOT_INO),
            )
        };
        let (ppath, name) = split_path(&path);
        let layer = node.lock().layer;
        let src_dir = self.open_dir_in(layer, &self.lpath(parent, layer, ppath))?;
        let dst_dir = self.upper_dir(ppath)?;
        self.mark_impure(dst_dir.as_fd());
        self.keep_times(dst_dir.as_fd(), || {
            if kind == sys::S_IFDIR {
                self.copy_dir_shell(src_dir.as_fd(), name, dst_dir.as_fd(), false)
                    .map(drop)
            } else {
                self.copy_special(src_dir.as_fd(), name, dst_dir.as_fd())
                    .map(drop)
            }
        })?;
        let new = sys::stat_at(dst_dir.as_fd(), name)?;
        self.finish_copy_up(node, parent, name, &new, None);
        Ok(())
    }

    /// Bookkeeping after a node's object appeared in the upper (`data`: as a metacopy file
    /// whose data is there).
    fn finish_copy_up(
        &self,
        node: &Node,
        parent: u64,
        name: &[u8],
        new: &FileStat,
        data: Option<DataSource>,
    ) {
        let upper = self.upper.unwrap_or(0);
        {
            let mut s = node.lock();
            s.layer = upper;
            s.data = data.map(Box::new);
            if s.kind == sys::S_IFDIR && s.merge.first() != Some(&upper) {
                s.merge = std::iter::once(upper)
                    .chain(s.merge.iter().copied())
                    .collect();
            }
            s.backing = (new.dev, new.ino);
        }
        node.generation.fetch_add(1, Ordering::Release);
        let pnode = self.table().get(parent).cloned();
        if let Some(pnode) = pnode {
            if let Some(idx) = pnode.lock().index.as_mut() {
                idx.copied_up(name);
            }
        }
        self.table().rebind(node.ino, (new.dev, new.ino));
    }

    /// Copy a regular file up. The data is copied without the namespace lock; a metacopy
    /// copy (`Fill::Meta`) is not synced, as the kernel does not sync it: it holds no data.
    fn copy_up_file(&self, node: &Arc<Node>, fill: Fill) -> Result<()> {
        let parent = self
            .table()
            .parent(node.ino)
            .ok_or_else(|| Error::os(libc::ENOENT))?;
        self.ensure_upper_dir(parent)?;
        let (tmp, layer, src_path) = {
            let _r = self.read_ns();
            let path = self
                .table()
                .path(node.ino)
                .ok_or_else(|| Error::os(libc::ENOENT))?;
            let (ppath, name) = split_path(&path);
            let layer = node.lock().layer;
            let src_dir_path = self.lpath(parent, layer, ppath);
            let src_dir = self.open_dir_in(layer, &src_dir_path)?;
            let dst_dir = self.upper_dir(ppath)?;
            let src = sys::open_at(src_dir.as_fd(), name, libc::O_RDONLY, 0)?;
            let tmp = sys::open_tmpfile(dst_dir.as_fd(), libc::O_RDWR, 0o600)?;
            ((src, tmp), layer, join_path(&src_dir_path, name))
        };
        let (src, tmp) = tmp;
        // A metacopy file of a lower layer (followed with metacopy=on): its data is further
        // down, and stays the copy's.
        let lower_data = node.lock().data.clone();
        let data_fd = match (&lower_data, fill) {
            (Some(d), Fill::Data) => Some(self.open_data_file(d, 0)?),
            _ => None,
        };
        let st = self.fill_copy(
            src.as_fd(),
            data_fd.as_ref().map(|d| d.as_fd()),
            tmp.as_fd(),
            fill,
        )?;
        let data = (fill == Fill::Meta).then(|| match lower_data {
            Some(d) => *d,
            None => {
                let (dir, name) = split_path(&src_path);
                self.data_of_lower(layer, dir, name, &st)
            }
        });
        if self.fsync && fill != Fill::Meta {
            sys::fsync(tmp.as_fd(), false)?;
        }
        let _w = self.write_ns();
        if self.is_upper_node(node) || node.lock().layer != layer {
            // Copied by a directory rename meanwhile; our copy is dropped with `tmp`.
            return Ok(());
        }
        let path = self
            .table()
            .path(node.ino)
            .ok_or_else(|| Error::os(libc::ENOENT))?;
        let (ppath, name) = split_path(&path);
        let parent = self.table().parent(node.ino).unwrap_or(ROOT_INO);
        let dst_dir = self.upper_dir(ppath)?;
        // The data was synced before the link: that is what keeps a crash from showing a
        // partial copy. The link needs no sync of its own (kernel overlayfs does none either):
        // lost in a crash, the file shows its lower content again, as the unsynced change that
        // caused the copy-up is lost too; an fsync of the file commits the journal holding the
        // link. (Syncing the directory here cost a third of each small copy-up.)
        self.mark_impure(dst_dir.as_fd());
        self.keep_times(dst_dir.as_fd(), || {
            Ok(sys::link_fd_at(tmp.as_fd(), dst_dir.as_fd(), name)?)
        })?;
        let new = sys::fstat(tmp.as_fd())?;
        self.finish_copy_up(node, parent, name, &new, data);
        Ok(())
    }

    /// Whether changing `ino` would first copy it up (possibly a lot of data).
    pub fn needs_copy_up(&self, ino: u64) -> bool {
        self.upper.is_some() && self.node(ino).is_ok_and(|n| !self.is_upper_node(&n))
    }

    /// Whether `change` of `ino` would first copy data (a copy-up, or a metacopy file's
    /// data), so its request should not hold up others.
    pub fn copy_is_slow(&self, ino: u64, change: Change) -> bool {
        if self.upper.is_none() {
            return false;
        }
        let Ok(node) = self.node(ino) else {
            return false;
        };
        let regular = node.lock().kind == sys::S_IFREG;
        match metacopy::action(self.state_of(&node), change, self.metacopy, regular) {
            Action::Nothing | Action::CopyUpMeta | Action::CopyUp { data: false } => false,
            Action::CopyUp { data: true } => true,
            Action::FillData { data } => data,
        }
    }

    /// Where a node's content is.
    fn state_of(&self, node: &Node) -> State {
        let s = node.lock();
        if Some(s.layer) != self.upper {
            State::Lower
        } else if s.data.is_some() {
            State::Metacopy
        } else {
            State::Upper
        }
    }

    /// Get `node` ready for `change`: copy it up (its metadata only where `metacopy=on`
    /// allows), or give a metacopy file its data, as [`metacopy::action`] says.
    fn prepare(&self, node: &Arc<Node>, change: Change) -> Result<()> {
        let regular = node.lock().kind == sys::S_IFREG;
        let action = metacopy::action(self.state_of(node), change, self.metacopy, regular);
        if let Action::FillData { data } = action {
            return self.fill_data(node, data);
        }
        let Some(fill) = Fill::of(action) else {
            return Ok(());
        };
        self.upper_layer()?;
        let parent = self.table().parent(node.ino);
        if let Some(parent) = parent {
            self.ensure_upper_dir(parent)?;
        }
        self.copy_up_node(node, fill)
    }

    /// [`Union::needs_copy_up`] for the node known as `parent`/`name`; a directory counts
    /// when it merges lower layers (renaming it copies its tree).
    pub fn child_needs_copy_up(&self, parent: u64, name: &[u8]) -> bool {
        let Some(ino) = self.table().child(parent, name) else {
            return false;
        };
        let Ok(node) = self.node(ino) else {
            return false;
        };
        let s = node.lock();
        self.upper.is_some() && (Some(s.layer) != self.upper || s.merge.len() > 1)
    }

    /// Copy node `ino` up (with its ancestors).
    pub fn copy_up(&self, ino: u64) -> Result<()> {
        self.upper_layer()?;
        let node = self.node(ino)?;
        if self.is_upper_node(&node) {
            return Ok(());
        }
        let parent = self.table().parent(ino);
        if let Some(parent) = parent {
            self.ensure_upper_dir(parent)?;
        }
        self.copy_up_node(&node, Fill::Data)
    }

    /// Copy a whole directory tree up and mark its root opaque, so it no longer depends on
    /// what the lowers hold at its path (before renaming it). Runs under the exclusive lock.
    fn copy_up_tree(&self, ino: u64) -> Result<()> {
        let node = self.node(ino)?;
        {
            // Its stack as its index finds it: a redirect it carries adds lower copies.
            let _r = self.read_ns();
            let (node, path) = self.node_path(ino)?;
            self.with_index(&node, &path, |_| ())?;
        }
        let merged = {
            let s = node.lock();
            s.merge.len() > 1 || Some(s.layer) != self.upper
        };
        if !merged {
            return Ok(());
        }
        self.ensure_upper_dir(ino)?;
        let _w = self.write_ns();
        let path = self
            .table()
            .path(ino)
            .ok_or_else(|| Error::os(libc::ENOENT))?;
        let merge = node.lock().merge.to_vec();
        let stack = self.node_stack(ino, &merge, &path);
        let mut links = HashMap::new();
        let mut pending = Vec::new();
        let mut stale_whiteouts = Vec::new();
        let mut times = Vec::new();
        self.copy_tree_locked(
            &path,
            stack,
            &|| self.parent_stack(ino),
            Some(ino),
            &mut links,
            &mut pending,
            &mut stale_whiteouts,
            &mut times,
        )?;
        self.link_pending(&mut pending)?;
        let dir = self.upper_dir(&path)?;
        self.set_opaque(dir.as_fd(), b"")?;
        // An opaque directory's redirect is never followed (kernel and layerfs): drop it.
        match sys::xattr_remove(XTarget::Fd(dir.as_fd()), self.xattr_ns.redirect()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e.into()),
        }
        for (wdir, name) in stale_whiteouts {
            let _ = sys::unlink_at(wdir.as_fd(), &name, false);
        }
        for (dir, st) in times {
            let _ = sys::futimens(dir.as_fd(), SetTime::At(st.atime), SetTime::At(st.mtime));
        }
        {
            let mut s = node.lock();
            s.merge = Box::new([self.upper.unwrap_or(0)]);
            s.index = None;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_tree_locked(
        &self,
        path: &[u8],
        stack: Stack,
        parent_stack: &dyn Fn() -> Result<Stack>,
        dir_ino: Option<u64>,
        links: &mut HashMap<(u64, u64), Vec<u8>>,
        pending: &mut Vec<PendingCopy>,
        stale_whiteouts: &mut Vec<(Arc<OwnedFd>, Vec<u8>)>,
        times: &mut Vec<(Arc<OwnedFd>, FileStat)>,
    ) -> Result<()> {
        let upper = self.upper_layer()?;
        let (index, used, _) = self.build_index_stack(stack, parent_stack)?;
        let lpath_of = |layer: u16| -> Vec<u8> {
            used.iter()
                .find(|(l, _)| *l == layer)
                .map_or_else(|| path.to_vec(), |(_, p)| p.clone())
        };
        let dst_dir = Arc::new(self.upper_dir(path)?);
        // Filling the copy must not look like a change (a copy-up keeps times, as `cp -a`
        // after the kernel's EXDEV does): its times are put back once the whole tree is
        // linked in.
        times.push((dst_dir.clone(), sys::fstat(dst_dir.as_fd())?));
        // Once the tree's root is opaque its whiteouts hide nothing; they are removed only
        // then, so a crash in between never uncovers a deleted lower file.
        for name in index.upper_whiteouts() {
            stale_whiteouts.push((dst_dir.clone(), name.to_vec()));
        }
        let listing = index.listing();
        if listing.iter().any(|(_, top)| top.layer != upper) {
            self.mark_impure(dst_dir.as_fd());
        }
        for (name, top) in listing {
            let child_path = join_path(path, &name);
            let child_ino = dir_ino.and_then(|d| self.table().child(d, &name));
            let dir_layers: Vec<u16> = index
                .visible(&name)
                .map(|(_, d)| d.to_vec())
                .unwrap_or_default();
            if top.layer != upper {
                let src_dir = self.open_dir_in(top.layer, &lpath_of(top.layer))?;
                let st = sys::stat_at(src_dir.as_fd(), &name)?;
                if top.is_dir() {
                    self.copy_dir_shell(src_dir.as_fd(), &name, dst_dir.as_fd(), false)?;
                } else if st.is_reg() {
                    match links.get(&(st.dev, st.ino)) {
                        Some(first) if st.nlink > 1 => {
                            // The first name must exist before another can link to it.
                            self.link_pending(pending)?;
                            let (fdir, fname) = split_path(first);
                            let fdir = self.upper_dir(fdir)?;
                            sys::link_at(fdir.as_fd(), fname, dst_dir.as_fd(), &name)?;
                        }
                        _ => {
                            // With metacopy=on a lower file may be a metacopy file itself.
                            let data = match self.metacopy {
                                true => self.data_fd_in_tree(
                                    src_dir.as_fd(),
                                    top.layer,
                                    &lpath_of(top.layer),
                                    &name,
                                    &used,
                                )?,
                                false => None,
                            };
                            let tmp = self.copy_file_data(
                                src_dir.as_fd(),
                                &name,
                                dst_dir.as_fd(),
                                data.as_ref().map(|d| d.as_fd()),
                            )?;
                            pending.push(PendingCopy {
                                file: tmp,
                                dir: dst_dir.clone(),
                                name: name.to_vec(),
                            });
                            if pending.len() >= TREE_COPY_BATCH {
                                self.link_pending(pending)?;
                            }
                            if st.nlink > 1 {
                                links.insert((st.dev, st.ino), child_path.clone());
                            }
                        }
                    }
                } else {
                    self.copy_special(src_dir.as_fd(), &name, dst_dir.as_fd())?;
                }
            } else if !top.is_dir() && top.dtype != sys::DT_LNK {
                // A metacopy file of the upper takes its data along.
                self.fill_in_tree(dst_dir.as_fd(), path, &name, &used)?;
            }
            if top.is_dir() {
                // Opaque copies and redirects below are applied when the child's index is
                // built.
                let mut sub = vec![(upper, child_path.clone())];
                sub.extend(
                    dir_layers
                        .iter()
                        .filter(|&&l| l != upper)
                        .map(|&l| (l, join_path(&lpath_of(l), &name))),
                );
                if sub.len() > 1 {
                    self.copy_tree_locked(
                        &child_path,
                        sub,
                        &|| Ok(used.clone()),
                        child_ino,
                        links,
                        pending,
                        stale_whiteouts,
                        times,
                    )?;
                }
            }
            if let Some(ci) = child_ino {
                let child = self.table().get(ci).cloned();
                if let Some(child) = child {
                    self.link_pending(pending)?;
                    let new = sys::stat_at(dst_dir.as_fd(), &name)?;
                    {
                        let mut s = child.lock();
                        s.layer = upper;
                        s.data = None;
                        s.backing = (new.dev, new.ino);
                        if s.kind == sys::S_IFDIR {
                            s.merge = Box::new([upper]);
                            s.index = None;
                        }
                    }
                    child.generation.fetch_add(1, Ordering::Release);
                    self.table().rebind(ci, (new.dev, new.ino));
                }
            }
        }
        Ok(())
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
    fn whiteout_at(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
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
    fn clear_empty_dir(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
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
    fn lookup_known(&self, parent: u64, name: &[u8]) -> Result<Arc<Node>> {
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
    // Rename

    /// `rename(2)` with flags 0, `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.upper_layer()?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(Error::os(libc::EINVAL));
        }
        if newname.len() > sys::NAME_MAX {
            return Err(Error::os(libc::ENAMETOOLONG));
        }
        let exchange = flags & RENAME_EXCHANGE != 0;
        let src = self.lookup_known(parent, name)?;
        let dst = match self.lookup_known(newparent, newname) {
            Ok(n) => Some(n),
            Err(e) if e.is(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if exchange && dst.is_none() {
            return Err(Error::os(libc::ENOENT));
        }
        if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(Error::os(libc::EEXIST));
        }
        if dst.as_ref().is_some_and(|d| d.ino == src.ino) {
            // Two names of one file: POSIX says do nothing.
            return Ok(());
        }
        let src_dir = src.lock().kind == sys::S_IFDIR;
        let dst_dir = dst.as_ref().map(|d| d.lock().kind == sys::S_IFDIR);
        if !exchange {
            match (src_dir, dst_dir) {
                (true, Some(false)) => return Err(Error::os(libc::ENOTDIR)),
                (false, Some(true)) => return Err(Error::os(libc::EISDIR)),
                _ => {}
            }
        }
        if let (Some(d), Some(true), false) = (&dst, dst_dir, exchange) {
            let _r = self.read_ns();
            let dpath = self
                .table()
                .path(d.ino)
                .ok_or_else(|| Error::os(libc::ENOENT))?;
            if !self.with_index(d, &dpath, |idx| idx.is_empty())? {
                return Err(Error::os(libc::ENOTEMPTY));
            }
        }
        // Everything that moves must live in the upper first.
        self.ensure_upper_dir(parent)?;
        self.ensure_upper_dir(newparent)?;
        let samedir = parent == newparent;
        // With redirect_dir=on a lower or merged directory moves as its upper copy with a
        // redirect to its lower copies; otherwise (or when the redirect would be too long, as
        // the kernel then answers EXDEV and `mv` copies) its tree is copied up first.
        // A file is copied up (its metadata only with metacopy=on: it then records where
        // its data is, as the kernel does).
        let src_redirect = if src_dir {
            self.plan_redirect(&src, samedir)?
        } else {
            self.prepare(&src, Change::Rename)?;
            self.plan_file(&src, samedir)?
        };
        let mut dst_redirect = Planned::Nothing;
        if exchange {
            if let Some(d) = &dst {
                if dst_dir == Some(true) {
                    dst_redirect = self.plan_redirect(d, samedir)?;
                } else {
                    self.prepare(d, Change::Rename)?;
                    dst_redirect = self.plan_file(d, samedir)?;
                }
            }
        }
        // Where the moving directories' lower copies are, before their paths change.
        let src_lower = self.lower_stack(&src, &src_redirect)?;
        let dst_lower = match &dst {
            Some(d) => self.lower_stack(d, &dst_redirect)?,
            None => None,
        };
        let _w = self.write_ns();
        let (pnode, ppath) = self.node_path(parent)?;
        let (npnode, nppath) = self.node_path(newparent)?;
        let sdir = self.upper_dir(&ppath)?;
        let ddir = self.upper_dir(&nppath)?;
        let src_entry = self
            .with_index(&pnode, &ppath, |idx| idx.get(name).cloned())?
            .ok_or_else(|| Error::os(libc::ENOENT))?;
        let dst_entry = self.with_index(&npnode, &nppath, |idx| idx.get(newname).cloned())?;
        let src_top = src_entry.top.ok_or_else(|| Error::os(libc::ENOENT))?;
        let upper = self.upper_layer()?;
        if exchange {
            let dst_top = dst_entry
                .as_ref()
                .and_then(|e| e.top)
                .ok_or_else(|| Error::os(libc::ENOENT))?;
            // A pure-upper directory moving where lower entries exist must hide them.
            self.mark_moved_dir(
                &src_redirect,
                sdir.as_fd(),
                name,
                src_top.is_dir() && dst_entry.as_ref().is_some_and(|e| e.lower_visible),
                &npnode,
            )?;
            self.mark_moved_dir(
                &dst_redirect,
                ddir.as_fd(),
                newname,
                dst_top.is_dir() && src_entry.lower_visible,
                &pnode,
            )?;
            if !samedir {
                self.mark_impure_for_move(sdir.as_fd(), name, &src_redirect, ddir.as_fd());
                self.mark_impure_for_move(ddir.as_fd(), newname, &dst_redirect, sdir.as_fd());
            }
            sys::rename_at(
                sdir.as_fd(),
                name,
                ddir.as_fd(),
                newname,
                sys::RENAME_EXCHANGE,
            )?;
            if let Some(idx) = pnode.lock().index.as_mut() {
                idx.created(name, dst_top.dtype);
            }
            if let Some(idx) = npnode.lock().index.as_mut() {
                idx.created(newname, src_top.dtype);
            }
            self.table().exchange((parent, name), (newparent, newname));
            self.set_lower_stack(&src, src_lower);
            if let Some(d) = &dst {
                self.set_lower_stack(d, dst_lower);
            }
            return Ok(());
        }
        let src_needs_wh = src_entry.lower_visible;
        let dst_visible = dst_entry.as_ref().and_then(|e| e.top);
        let dst_whiteout = dst_entry.as_ref().is_some_and(|e| e.upper_whiteout);
        let dst_lower = dst_entry.as_ref().is_some_and(|e| e.lower_visible);
        self.mark_moved_dir(
            &src_redirect,
            sdir.as_fd(),
            name,
            src_top.is_dir() && dst_lower,
            &npnode,
        )?;
        if !samedir {
            self.mark_impure_for_move(sdir.as_fd(), name, &src_redirect, ddir.as_fd());
        }
        let mut replaced_last_link = false;
        let replaced_orphan = dst.as_ref().and_then(|_| {
            let layer = dst_visible?.layer;
            let dir = if layer == upper {
                None
            } else {
                self.open_dir_in(layer, &self.lpath(newparent, layer, &nppath))
                    .ok()
            };
            let dir = dir.as_ref().map_or(ddir.as_fd(), |d| d.as_fd());
            sys::open_at(dir, newname, libc::O_PATH, 0)
                .ok()
                .map(Arc::new)
        });
        if let Some(dt) = dst_visible {
            if dt.layer == upper {
                let st = sys::stat_at(ddir.as_fd(), newname)?;
                replaced_last_link = st.nlink <= 1 || dt.is_dir();
                if dt.is_dir() {
                    // Empty in the union, but its upper copy may still hold whiteouts.
                    self.clear_empty_dir(ddir.as_fd(), newname)?;
                }
            } else {
                replaced_last_link = true;
            }
        }
        let target_in_upper = dst_visible.is_some_and(|t| t.layer == upper) || dst_whiteout;
        if src_top.is_dir() && target_in_upper && !dst_visible.is_some_and(|t| t.is_dir()) {
            // A directory cannot replace the whiteout by rename: swap, then drop or keep the
            // whiteout at the old name.
            sys::rename_at(
                sdir.as_fd(),
                name,
                ddir.as_fd(),
                newname,
                sys::RENAME_EXCHANGE,
            )?;
            if !src_needs_wh {
                sys::unlink_at(sdir.as_fd(), name, false)?;
            }
        } else if src_needs_wh && self.wh_format == WhiteoutFormat::CharDev {
            sys::rename_at(
                sdir.as_fd(),
                name,
                ddir.as_fd(),
                newname,
                sys::RENAME_WHITEOUT,
            )?;
        } else {
            sys::rename_at(sdir.as_fd(), name, ddir.as_fd(), newname, 0)?;
            if src_needs_wh {
                self.whiteout_at(sdir.as_fd(), name)?;
            }
        }
        let src_dtype = src_top.dtype;
        if let Some(idx) = pnode.lock().index.as_mut() {
            idx.removed(name);
        }
        if let Some(idx) = npnode.lock().index.as_mut() {
            idx.created(newname, src_dtype);
        }
        let mut t = self.table();
        if let (Some(d), true) = (&dst, replaced_last_link) {
            if let Some(dn) = t.get(d.ino).cloned() {
                t.remove_link(newparent, newname);
                if !t.has_links(d.ino) {
                    let mut s = dn.lock();
                    s.unlinked = true;
                    s.orphan = replaced_orphan;
                    drop(s);
                    t.unbind(d.ino);
                }
            }
        }
        t.rename(src.ino, parent, name, newparent, newname);
        drop(t);
        self.set_lower_stack(&src, src_lower);
        Ok(())
    }

    /// Get directory `node` ready to move: with `redirect_dir=on`, when it is lower or merged,
    /// copy it (alone) up and work out its redirect; otherwise copy its tree up.
    fn plan_redirect(&self, node: &Arc<Node>, samedir: bool) -> Result<Planned> {
        if self.redirect_dir {
            {
                // Its stack with opaque copies applied: a directory whose lower copies an
                // opaque upper copy hides is pure upper.
                let _r = self.read_ns();
                let (node, path) = self.node_path(node.ino)?;
                self.with_index(&node, &path, |_| ())?;
            }
            let merged = {
                let s = node.lock();
                Some(s.layer) != self.upper || s.merge.iter().any(|&l| Some(l) != self.upper)
            };
            if !merged {
                return Ok(Planned::PureUpper);
            }
            self.copy_up(node.ino)?;
            let _r = self.read_ns();
            if let Some(value) = self.redirect_value(node.ino, samedir)? {
                return Ok(Planned::Redirect(value));
            }
            log::debug!("redirect too long: copying the directory's tree instead");
        }
        self.copy_up_tree(node.ino)?;
        Ok(Planned::Nothing)
    }

    /// The data redirect to record on file `node` before it moves or gets another name
    /// (`samedir`: within its directory), as the kernel records it: for a metacopy file only
    /// (the others hold their data), the same values as a directory's
    /// ([`Self::redirect_value`]). When the value would be too long, the file gets its data
    /// instead (the kernel answers EXDEV there).
    fn plan_file(&self, node: &Arc<Node>, samedir: bool) -> Result<Planned> {
        if node.lock().data.is_none() {
            return Ok(Planned::Nothing);
        }
        let value = {
            let _r = self.read_ns();
            self.redirect_value(node.ino, samedir)?
        };
        match value {
            Some(v) => Ok(Planned::Redirect(v)),
            None => {
                log::debug!("data redirect too long: copying the file's data up instead");
                self.fill_data(node, true)?;
                Ok(Planned::Nothing)
            }
        }
    }

    /// The redirect to record on directory `ino` (in the upper) before it moves, as the
    /// kernel's `ovl_set_redirect`: `Some(None)` keeps the one it has (any, within its parent;
    /// an absolute one, anywhere), else its name within its parent, else the absolute path of
    /// its lower copy; `None` when that is longer than [`redirect::MAX_WRITE`].
    fn redirect_value(&self, ino: u64, samedir: bool) -> Result<Option<Option<Vec<u8>>>> {
        let upper = self.upper_layer()?;
        let attr = self.xattr_ns.redirect();
        let redirect_of = |path: &[u8]| -> Result<Option<Vec<u8>>> {
            Ok(self.at(upper, path, |d, n| {
                sys::xattr_get(Self::xtarget(d, n), attr)
            })?)
        };
        let path = self
            .table()
            .path(ino)
            .ok_or_else(|| Error::os(libc::ENOENT))?;
        let own = redirect_of(&path)?;
        if own.as_ref().is_some_and(|v| samedir || v.starts_with(b"/")) {
            return Ok(Some(None));
        }
        let (_, name) = split_path(&path);
        if samedir {
            return Ok(Some(Some(name.to_vec())));
        }
        // Innermost first: each directory's own redirect stands for its name.
        let mut chain: Vec<Vec<u8>> = Vec::new();
        let mut cur = path.as_slice();
        while !cur.is_empty() {
            let (up, name) = split_path(cur);
            let component = if cur.len() == path.len() {
                own.clone()
            } else {
                redirect_of(cur)?
            };
            let absolute = component.as_ref().is_some_and(|c| c.starts_with(b"/"));
            chain.push(component.unwrap_or_else(|| name.to_vec()));
            if absolute {
                break;
            }
            cur = up;
        }
        Ok(redirect::absolute_value(chain.iter().map(Vec::as_slice)).map(Some))
    }

    /// The lower copies of directory `node` that will move with it (redirect planned): where
    /// they are now, for [`Self::set_lower_stack`] once the move is done.
    fn lower_stack(&self, node: &Arc<Node>, planned: &Planned) -> Result<Option<Box<[LowerPath]>>> {
        // A file's data source is kept in its node whatever its path.
        if !matches!(planned, Planned::Redirect(_)) || node.lock().kind != sys::S_IFDIR {
            return Ok(None);
        }
        let _r = self.read_ns();
        let (node, path) = self.node_path(node.ino)?;
        let merge = node.lock().merge.clone();
        Ok(Some(
            self.node_stack(node.ino, &merge, &path)
                .into_iter()
                .filter(|(l, _)| Some(*l) != self.upper)
                .map(|(l, p)| (l, p.into_boxed_slice()))
                .collect(),
        ))
    }

    /// After a move with a redirect: the node's lower copies stay where they were.
    fn set_lower_stack(&self, node: &Arc<Node>, stack: Option<Box<[LowerPath]>>) {
        if let Some(stack) = stack {
            self.redirects.store(true, Ordering::Release);
            node.lock().lpaths = Some(stack);
        }
    }

    /// Mark a directory about to move to its new place (`dir`/`name` is where it is now): its
    /// redirect when one was planned; a pure upper directory is made opaque where it would
    /// show lower entries (`hides`; with `redirect_dir=on`, as the kernel: whenever its new
    /// parent `newparent` merges lower layers and it is not opaque yet).
    fn mark_moved_dir(
        &self,
        planned: &Planned,
        dir: BorrowedFd<'_>,
        name: &[u8],
        hides: bool,
        newparent: &Node,
    ) -> Result<()> {
        match planned {
            Planned::Redirect(Some(value)) => {
                sys::xattr_set(XTarget::At(dir, name), self.xattr_ns.redirect(), value, 0)?;
            }
            Planned::Redirect(None) => {}
            Planned::PureUpper => {
                let merged_parent = newparent
                    .lock()
                    .merge
                    .iter()
                    .any(|&l| Some(l) != self.upper);
                let opaque = sys::xattr_get(XTarget::At(dir, name), self.xattr_ns.opaque())?
                    .is_some_and(|v| v == b"y");
                if (hides || merged_parent) && !opaque {
                    self.set_opaque(dir, name)?;
                }
            }
            Planned::Nothing => {
                if hides {
                    self.set_opaque(dir, name)?;
                }
            }
        }
        Ok(())
    }

    /// As the kernel: a directory that receives a moved object with a lower origin (a lower
    /// or merged directory, or a copied-up object) is marked impure.
    fn mark_impure_for_move(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        planned: &Planned,
        newdir: BorrowedFd<'_>,
    ) {
        let has_origin =
            matches!(planned, Planned::Redirect(_)) || self.recorded_origin(dir, name).is_some();
        if has_origin {
            self.mark_impure(newdir);
        }
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

/// Copy `size` bytes of file data into the empty file `dst`, keeping holes: reflink when the
/// filesystem can, else `copy_file_range` over each data extent, else read/write.
/// `will_sync`: the caller syncs the copy next, so each chunk's writeback starts as soon as it
/// is copied: the disk writes then overlap the copy instead of all waiting for the sync.
pub fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    will_sync: bool,
) -> std::io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    if sys::reflink(dst, src).is_ok() {
        return Ok(());
    }
    let mut off = 0u64;
    let mut copied_to = 0u64;
    while off < size {
        let data = match sys::lseek(src, off as i64, sys::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => off,
            Err(e) => return Err(e),
        };
        let hole = match sys::lseek(src, data as i64, sys::SEEK_HOLE) {
            Ok(h) => (h as u64).min(size),
            Err(_) => size,
        };
        copied_to = copied_to.max(copy_range(src, dst, data, hole - data, will_sync)?);
        off = hole.max(data + 1);
    }
    // A trailing hole (or a source that shrank) leaves the copy short; only then is a truncate
    // (one more inode update) needed.
    if copied_to != size {
        sys::ftruncate(dst, size)?;
    }
    Ok(())
}

/// Bytes copied between starts of writeback when the copy is synced next: big enough that a
/// small file's copy never asks, small enough that the disk starts early in a big one.
const WRITEBACK_CHUNK: u64 = 8 << 20;

fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    start: u64,
    len: u64,
    will_sync: bool,
) -> std::io::Result<u64> {
    let step = if will_sync { WRITEBACK_CHUNK } else { len };
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(step);
        match sys::copy_file_range(src, start + done, dst, start + done, want) {
            Ok(0) => break,
            Ok(n) => {
                if will_sync && n as u64 == WRITEBACK_CHUNK {
                    // Only a head start for the sync that follows: a failure here shows there.
                    let _ = sys::start_writeback(dst, start + done, n as u64);
                }
                done += n as u64
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV)
                        | Some(libc::EINVAL)
                        | Some(libc::ENOSYS)
                        | Some(libc::EOPNOTSUPP)
                ) =>
            {
                return copy_range_rw(src, dst, start + done, len - done);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(start + done)
}

/// Last resort: copy through a userspace buffer. Returns the offset reached.
fn copy_range_rw(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    start: u64,
    len: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(buf.len());
        let n = sys::pread(src, &mut buf[..want], start + done)?;
        if n == 0 {
            break;
        }
        let mut w = 0;
        while w < n {
            w += sys::pwrite(dst, &buf[w..n], start + done + w as u64)?;
        }
        done += n as u64;
    }
    Ok(start + done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_data_sizes_the_copy_with_a_trailing_hole_or_none() -> std::io::Result<()> {
        let d = tempfile::tempdir()?;
        let dir = sys::open_dir_path(d.path())?;
        // Dense files past WRITEBACK_CHUNK take the chunked path when the copy is synced next.
        for (name, data_len, size, will_sync) in [
            (&b"dense"[..], 5000usize, 5000u64, false),
            (b"trailing-hole", 4, 32 << 20, false),
            (b"chunked", (20 << 20) + 5, (20 << 20) + 5, true),
            (b"chunked-hole", (16 << 20) + 3, 32 << 20, true),
        ] {
            let src = sys::open_at(dir.as_fd(), name, libc::O_CREAT | libc::O_RDWR, 0o644)?;
            sys::pwrite(src.as_fd(), &vec![b'x'; data_len], 0)?;
            sys::ftruncate(src.as_fd(), size)?;
            let dst = sys::open_tmpfile(dir.as_fd(), libc::O_RDWR, 0o600)?;
            copy_data(src.as_fd(), dst.as_fd(), size, will_sync)?;
            assert_eq!(sys::fstat(dst.as_fd())?.size, size);
            let mut copy = vec![0u8; data_len];
            assert_eq!(sys::pread(dst.as_fd(), &mut copy, 0)?, data_len);
            assert!(copy.iter().all(|&b| b == b'x'), "{name:?}: data differs");
            let mut tail = [1u8; 4];
            assert_eq!(sys::pread(dst.as_fd(), &mut tail, size - 4)?, 4);
            let want = if data_len as u64 == size {
                *b"xxxx"
            } else {
                [0; 4]
            };
            assert_eq!(tail, want);
        }
        Ok(())
    }

    #[test]
    fn copy_data_keeps_holes_and_content() -> std::io::Result<()> {
        let d = tempfile::tempdir()?;
        let dir = sys::open_dir_path(d.path())?;
        let src = sys::open_at(dir.as_fd(), b"src", libc::O_CREAT | libc::O_RDWR, 0o644)?;
        sys::pwrite(src.as_fd(), b"head", 0)?;
        sys::pwrite(src.as_fd(), b"tail", 64 << 20)?;
        let size = sys::fstat(src.as_fd())?.size;
        let dst = sys::open_at(dir.as_fd(), b"dst", libc::O_CREAT | libc::O_RDWR, 0o644)?;
        copy_data(src.as_fd(), dst.as_fd(), size, false)?;
        let st = sys::fstat(dst.as_fd())?;
        assert_eq!(st.size, size);
        assert!(
            st.blocks * 512 < 1 << 20,
            "copy must stay sparse: {} blocks",
            st.blocks
        );
        let mut buf = [0u8; 4];
        sys::pread(dst.as_fd(), &mut buf, 64 << 20)?;
        assert_eq!(&buf, b"tail");
        sys::pread(dst.as_fd(), &mut buf, 0)?;
        assert_eq!(&buf, b"head");
        Ok(())
    }
}
