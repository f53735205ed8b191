//! Copy-up: a lower object (or a lower directory's whole tree) becomes an upper one, with its
//! metadata and origin and, as the change needs, its data.
//!
//! Invariants kept for the upper (so kernel overlayfs mounts it the same way):
//! * Nothing half-made is ever visible in the upper. Regular files are copied into an
//!   `O_TMPFILE` in their upper parent and linked into place once complete (and synced unless the
//!   mount is `volatile`); directories, symlinks and special files are built in the work
//!   directory and renamed into place. A tree copy names its files in batches, after one
//!   `syncfs` per batch.
//! * A copy of a lower object records its origin as the kernel does (`<ns>.overlay.origin`,
//!   see [`super::origin`]), so the kernel and layerfs show it with the lower object's number,
//!   and its upper parent is marked impure.
//! * With `metacopy=on`, changes that leave a regular file's data alone copy its metadata only
//!   ([`super::metacopy::action`] decides, per change); a tree copy gives the metacopy files in
//!   the tree their data.
//! * Copying file data happens without the namespace lock; every other step holds it
//!   exclusively for a few system calls. A copy that will be synced starts each chunk's
//!   writeback as soon as it is copied.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::inode::{Node, ROOT_INO};
use super::metacopy::{self, Action, Change, DataSource, State};
use super::whiteout::{self, XattrNs};
use super::{Stack, Union, join_path, split_path};
use crate::error::{Error, Result};
use crate::sys::{self, FileStat, SetTime, XTarget};

/// What a copy-up of a regular file puts in the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fill {
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
pub(super) struct PendingCopy {
    file: OwnedFd,
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
}

impl Union {
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
    pub(super) fn apply_meta_at(
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
    pub(super) fn mark_impure(&self, dir: BorrowedFd<'_>) {
        let attr = self.xattr_ns.impure();
        if let Ok(None) = sys::xattr_get(XTarget::Fd(dir), attr) {
            let _ = sys::xattr_set(XTarget::Fd(dir), attr, b"y", 0);
        }
    }

    pub(super) fn set_opaque(&self, dir: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
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
    pub(super) fn ensure_upper_dir(&self, ino: u64) -> Result<()> {
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
    pub(super) fn state_of(&self, node: &Node) -> State {
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
    pub(super) fn prepare(&self, node: &Arc<Node>, change: Change) -> Result<()> {
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
    pub(super) fn copy_up_tree(&self, ino: u64) -> Result<()> {
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
