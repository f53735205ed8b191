//! `rename(2)` through the union, and how a directory that is not purely upper moves.
//!
//! Invariants kept for the upper (so kernel overlayfs mounts it the same way):
//! * Renaming a directory that is not purely upper first copies its whole tree up and marks it
//!   opaque, so the upper never depends on lower paths (no redirects) and stays a valid
//!   kernel-overlayfs upper; nodes keep their inode numbers through the copy (origin xattr).
//!   With `redirect_dir=on` it copies the directory alone and records the kernel's redirect
//!   (see [`super::redirect`]; `Union::plan_redirect`, `Union::redirect_value`), falling back
//!   to the tree copy when the value would be longer than the kernel writes; the node keeps
//!   its lower copies' paths (`lpaths`) so nothing below it has to be looked up again.
//! * A moved object with an origin or a redirect marks its new upper parent impure, as the
//!   kernel does; a metacopy file that moves records a data redirect.
//! * The source name leaves a whiteout exactly when a lower layer would otherwise show
//!   something under it; an exchange swaps both names in one `renameat2`.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::inode::{LowerPath, Node};
use super::metacopy::Change;
use super::redirect;
use super::whiteout::WhiteoutFormat;
use super::write::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use super::{Union, split_path};
use crate::error::{Error, Result};
use crate::sys::{self, XTarget};

/// How a directory about to be renamed is moved.
pub(super) enum Planned {
    /// Not a directory, or its tree was copied up (copy-tree mode).
    Nothing,
    /// A pure upper directory, under `redirect_dir=on`.
    PureUpper,
    /// A lower or merged directory under `redirect_dir=on`: the redirect to write (`None`:
    /// keep the one it has).
    Redirect(Option<Vec<u8>>),
}

impl Union {
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
    pub(super) fn plan_file(&self, node: &Arc<Node>, samedir: bool) -> Result<Planned> {
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
}
