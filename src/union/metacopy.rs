//! Metadata-only copy-up (`-o metacopy=on`), in kernel overlayfs' on-disk format, so the kernel
//! with `metacopy=on` and layerfs mount each other's uppers to the same tree.
//!
//! On disk (`Documentation/filesystems/overlayfs.rst`, "Metadata only copy up"): a regular file
//! of the upper carrying `<ns>.overlay.metacopy` has its owner, mode, times and xattrs in the
//! upper but its data in a lower layer. The upper file is sparse, as long as the data (no block
//! of data is written); the value is empty (the kernel writes a digest only with fs-verity,
//! `verity=on`, which layerfs neither writes nor checks). Its data is the regular file found
//! below it as the kernel finds it:
//!
//! * without a redirect, at the file's own name in the parent directory's lower copies (those
//!   follow the directory redirects, see [`super::redirect`]);
//! * with `<ns>.overlay.redirect` on the file (the kernel's data redirect, written when a
//!   metacopy file is renamed or hard-linked: the same values as a directory's, relative
//!   `name` within the parent, absolute `/a/b/name` from each lower root), at that place;
//! * the first layer with the name decides: a regular file is the data (a metacopy file there
//!   sends the search further down, by its own redirect if it has one), a whiteout, a
//!   directory or anything else ends the search; a layer without it is skipped.
//!
//! A metacopy file whose data is not found, or whose marker or redirect is malformed, answers
//! EIO, as the kernel's lookup does ("metacopy with no lower data found"; the kernel answers
//! EACCES for some malformed redirects). Values are hostile input: they are parsed by
//! [`super::redirect::parse`] and every component is looked up through directory fds, so no
//! value leads outside the layers. Only the marker of the union's own namespace counts
//! (`trusted.` when privileged, `user.` in the unprivileged format), as in the kernel: a
//! privileged mount never takes a user-writable xattr for where data comes from.
//!
//! What a mount shows for a metacopy file: the upper's attributes, except `st_blocks`, which
//! are the data file's (as the kernel reports them), and the inode number of the first lower
//! file found (unless that one has more than one link, as for origins). Reads go to the data
//! file (FUSE passthrough registers it as the backing file).
//!
//! Which changes copy what ([`action`]): with `metacopy=on`, `chown`, `chmod`, `utimes`,
//! `setxattr`, `removexattr`, `rename` and `link` of a lower regular file copy its metadata
//! only (a rename or link then records a data redirect, as the kernel does); an open for
//! write and a truncation copy the data: into the existing upper file (`Union::fill_data`),
//! so hard links of it stay one file, keeping its owner, mode, times, file capabilities and
//! origin, then the marker is removed (a crash before that leaves the metacopy file as it was:
//! the partial data is never read). A truncation to 0 or `O_TRUNC` copies no data. The kernel
//! also sets the file's mtime to the time of that data copy; layerfs keeps it, as every other
//! copy-up keeps times. Meta copy-ups are not synced (the kernel does not sync them either: the
//! point is `chown -R` at metadata speed); the data copy is, unless `volatile`.
//!
//! Metacopy files of lower layers (an upper stacked as a lower) are followed with
//! `metacopy=on`. Data-only lower layers (the kernel's `lowerdir=a::d1::d2`,
//! [`super::UnionConfig::data_lowers`]) are not part of the merged tree: an absolute data
//! redirect is looked up in the lower layers below the file first, then by its path in each
//! data-only layer. Without `metacopy=on` the kernel follows a lower metacopy file only from
//! the bottom lower layer and only by an absolute redirect into a data-only layer; anything
//! else is EPERM ("refusing to follow metacopy origin"), and so it is here.

use super::redirect::{self, Redirect};

pub const TRUSTED_METACOPY: &[u8] = b"trusted.overlay.metacopy";
pub const USER_METACOPY: &[u8] = b"user.overlay.metacopy";

/// Whether an xattr name is the metacopy marker, in either namespace.
pub fn is_marker(name: &[u8]) -> bool {
    name == TRUSTED_METACOPY || name == USER_METACOPY
}

/// Bytes of the kernel's `struct ovl_metacopy` before the digest (version, len, flags,
/// digest algorithm).
const HEADER: usize = 4;
/// Longest digest the kernel records (`FS_VERITY_MAX_DIGEST_SIZE`).
const MAX_DIGEST: usize = 64;

/// What a metacopy xattr value says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// A metacopy file (empty value, or the kernel's digest form: the digest is not checked,
    /// as the kernel does not without `verity=on`).
    Metacopy,
    /// Not a value the kernel writes (it refuses to look such a file up).
    Invalid,
}

/// Read a metacopy value with the kernel's checks (`ovl_check_metacopy_xattr`): empty, or a
/// header of version 0 whose length is the value's, with a digest of at most 64 bytes.
pub fn parse(value: &[u8]) -> Marker {
    if value.is_empty() {
        return Marker::Metacopy;
    }
    if value.len() < HEADER || value.len() > HEADER + MAX_DIGEST {
        return Marker::Invalid;
    }
    if value[0] != 0 || value[1] as usize != value.len() {
        return Marker::Invalid;
    }
    Marker::Metacopy
}

/// What happens to a file, as far as copy-up is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// `open(2)`: for writing, with `O_TRUNC`.
    Open { write: bool, trunc: bool },
    /// `setattr`: a truncation to this size, or only owner, mode and times.
    Attr { size: Option<u64> },
    /// `setxattr`, `removexattr`.
    Xattr,
    /// The file is renamed.
    Rename,
    /// The file gets another name.
    Link,
}

/// Where a file's content is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Only in a lower layer.
    Lower,
    /// A metacopy file in the upper: metadata there, data below.
    Metacopy,
    /// In the upper, data included.
    Upper,
}

/// What a change needs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Copy the file up as a metacopy file.
    CopyUpMeta,
    /// Copy the file up whole; `data` false makes it empty (it is truncated to 0 anyway).
    CopyUp {
        data: bool,
    },
    /// Give a metacopy file its data (`data` false: truncate it instead).
    FillData {
        data: bool,
    },
}

/// What `change` of a file in `state` needs first; `metacopy` is the mount option, `regular`
/// whether the file is a regular file (only those are ever metacopy files).
pub fn action(state: State, change: Change, metacopy: bool, regular: bool) -> Action {
    // The data is needed (`Some(true)`), truncated away (`Some(false)`), or not touched.
    let data = match change {
        Change::Open { trunc: true, .. } | Change::Attr { size: Some(0) } => Some(false),
        Change::Open { write: true, .. } | Change::Attr { size: Some(_) } => Some(true),
        Change::Open { .. } => return Action::Nothing,
        Change::Attr { size: None } | Change::Xattr | Change::Rename | Change::Link => None,
    };
    match (state, data) {
        (State::Upper, _) => Action::Nothing,
        (State::Metacopy, Some(data)) => Action::FillData { data },
        (State::Metacopy, None) => Action::Nothing,
        (State::Lower, Some(data)) => Action::CopyUp { data },
        (State::Lower, None) if metacopy && regular => Action::CopyUpMeta,
        (State::Lower, None) => Action::CopyUp { data: true },
    }
}

/// Where a metacopy file's data is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSource {
    /// The lower layer holding the data file, and its path there.
    pub layer: u16,
    pub path: Box<[u8]>,
    /// The data file's `st_blocks`, which the kernel reports for the metacopy file.
    pub blocks: u64,
    /// The first lower file found (the data file, unless a lower metacopy file stood above
    /// it): its identity and link count give the file's inode number.
    pub first: (u64, u64),
    pub first_nlink: u64,
}

// ---------------------------------------------------------------------------------------------
// The union's side: finding the data, copying it up.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::inode::Node;
use super::{Stack, Union, join_path, whiteout};
use crate::error::{Error, Result, ShowPath};
use crate::sys::{self, FileStat, SetTime, XTarget};

/// Directories (layer, path) where a file is looked for, in order.
type Candidates = VecDeque<(u16, Vec<u8>)>;

impl Union {
    /// Whether the union copies metadata only where it can (`-o metacopy=on`).
    pub fn metacopy(&self) -> bool {
        self.metacopy
    }

    /// Whether the stack has data-only lower layers (`lowerdir=a::d`).
    pub fn has_data_layers(&self) -> bool {
        usize::from(self.data_from) < self.layers.len()
    }

    /// The directory `parts` (an absolute data redirect without its last component) in each
    /// data-only layer that has it, in order: the kernel looks a data redirect up in them
    /// after the lower layers, by its path alone.
    fn data_layer_dirs(&self, parts: &[Vec<u8>]) -> Candidates {
        let path = redirect::absolute_path(parts);
        (self.data_from..self.layers.len() as u16)
            .filter(|&l| self.dir_fd(l, &path).is_ok())
            .map(|l| (l, path.clone()))
            .collect()
    }

    /// If the regular file `dir`/`name` of `layer` (in directory `parent`, union path
    /// `parent_path`) is a metacopy file: where its data is. EIO when it is one but its
    /// marker or redirect is malformed or no data is found. `present`: its xattr names, when
    /// the caller listed them.
    pub(super) fn metacopy_data(
        &self,
        dir: BorrowedFd<'_>,
        layer: u16,
        parent: u64,
        parent_path: &[u8],
        name: &[u8],
        present: Option<&[Vec<u8>]>,
    ) -> Result<Option<DataSource>> {
        let target = XTarget::At(dir, name);
        let marker = self.xattr_ns.metacopy();
        if present.is_some_and(|names| !names.iter().any(|n| n == marker)) {
            return Ok(None);
        }
        let Some(value) = sys::xattr_get(target, marker)? else {
            return Ok(None);
        };
        let show = || join_path(parent_path, name);
        if parse(&value) == Marker::Invalid {
            log::warn!(
                "{}: bad {}: {}",
                ShowPath(&show()),
                ShowPath(self.xattr_ns.metacopy()),
                value.escape_ascii()
            );
            return Err(Error::os(libc::EIO));
        }
        let redirect = self.data_redirect(target, &show())?;
        // Without metacopy=on the kernel follows a lower layer's metacopy file only to data in
        // a data-only layer: only from the bottom lower layer (it refuses to go on to another
        // lower layer), and only by an absolute redirect.
        let data_only = !self.metacopy && Some(layer) != self.upper;
        let refuse = || {
            log::warn!(
                "{}: refusing to follow a lower metacopy file without metacopy=on, except to a \
                 data-only layer",
                ShowPath(&show())
            );
            Err(Error::os(libc::EPERM))
        };
        if data_only
            && (layer + 1 < self.data_from || !matches!(redirect, Some(Redirect::Absolute(_))))
        {
            return refuse();
        }
        let parent_stack = || -> Result<Stack> {
            let pnode = self.node(parent)?;
            let merge = pnode.lock().merge.clone();
            Ok(self.node_stack(parent, &merge, parent_path))
        };
        match self.find_data(layer, name, redirect, &parent_stack)? {
            Some(found) if data_only && found.layer < self.data_from => refuse(),
            Some(found) => Ok(Some(found)),
            None => {
                log::warn!(
                    "{}: metacopy file without its data in the lower layers",
                    ShowPath(&show())
                );
                Err(Error::os(libc::EIO))
            }
        }
    }

    /// A file's data redirect, checked (EIO for a malformed one).
    fn data_redirect(&self, target: XTarget<'_>, show: &[u8]) -> Result<Option<Redirect>> {
        let Some(value) = sys::xattr_get(target, self.xattr_ns.redirect())? else {
            return Ok(None);
        };
        match redirect::parse(&value) {
            Ok(r) => Ok(Some(r)),
            Err(bad) => {
                log::warn!(
                    "{}: bad data redirect \"{}\": {bad}",
                    ShowPath(show),
                    ShowPath(&value)
                );
                Err(Error::os(libc::EIO))
            }
        }
    }

    /// The directories (layer, path) below `layer` where a file named by `redirect` (or, for
    /// none, `name` in the parent's copies `parent`) is looked for, and the name to look for.
    fn data_candidates(
        &self,
        layer: u16,
        name: &[u8],
        redirect: Option<Redirect>,
        parent: &dyn Fn() -> Result<Stack>,
    ) -> Result<(Candidates, Vec<u8>)> {
        let below = |stack: Stack| -> Candidates {
            stack.into_iter().filter(|(l, _)| *l > layer).collect()
        };
        Ok(match redirect {
            None => (below(parent()?), name.to_vec()),
            Some(Redirect::Relative(n)) => (below(parent()?), n),
            Some(Redirect::Absolute(mut parts)) => {
                let Some(last) = parts.pop() else {
                    return Err(Error::os(libc::EIO));
                };
                let dirs = if parts.is_empty() {
                    (layer + 1..self.layers.len() as u16)
                        .map(|l| (l, Vec::new()))
                        .collect()
                } else {
                    let mut dirs =
                        self.resolve(layer, &Redirect::Absolute(parts.clone()), parent)?;
                    dirs.extend(self.data_layer_dirs(&parts));
                    dirs
                };
                (below(dirs), last)
            }
        })
    }

    /// Look for the data of a metacopy file of layer `layer` (see the module doc). `None`
    /// when the layers below have none.
    pub(super) fn find_data(
        &self,
        layer: u16,
        name: &[u8],
        redirect: Option<Redirect>,
        parent: &dyn Fn() -> Result<Stack>,
    ) -> Result<Option<DataSource>> {
        let (mut dirs, mut name) = self.data_candidates(layer, name, redirect, parent)?;
        let mut first: Option<FileStat> = None;
        while let Some((l, dir)) = dirs.pop_front() {
            let Ok(dfd) = self.dir_fd(l, &dir) else {
                continue;
            };
            if Some(l) != self.upper {
                let mut wh = whiteout::WH_PREFIX.to_vec();
                wh.extend_from_slice(&name);
                if wh.len() <= sys::NAME_MAX && sys::stat_at_opt(dfd.as_fd(), &wh)?.is_some() {
                    return Ok(None);
                }
            }
            let Some(st) = sys::stat_at_opt(dfd.as_fd(), &name)? else {
                continue;
            };
            if !st.is_reg() {
                return Ok(None);
            }
            let target = XTarget::At(dfd.as_fd(), &name);
            // A whiteout in the xattr format: the kernel's lookup takes a zero-size file with
            // the xattr for one whether or not its directory is marked to hold such whiteouts.
            if st.size == 0
                && (sys::xattr_get(target, whiteout::TRUSTED_WHITEOUT)?.is_some()
                    || sys::xattr_get(target, whiteout::USER_WHITEOUT)?.is_some())
            {
                return Ok(None);
            }
            let first = *first.get_or_insert(st);
            match sys::xattr_get(target, self.xattr_ns.metacopy())? {
                Some(v) if parse(&v) == Marker::Metacopy => {
                    // A metacopy file of a lower layer (an upper used as a lower): its data is
                    // further down, where its own redirect says.
                    let path = join_path(&dir, &name);
                    match self.data_redirect(target, &path)? {
                        None => {}
                        Some(Redirect::Relative(n)) => name = n,
                        Some(r @ Redirect::Absolute(_)) => {
                            let (d, n) = self.data_candidates(l, &name, Some(r), parent)?;
                            (dirs, name) = (d, n);
                        }
                    }
                }
                Some(_) => return Err(Error::os(libc::EIO)),
                None => {
                    return Ok(Some(DataSource {
                        layer: l,
                        path: join_path(&dir, &name).into_boxed_slice(),
                        blocks: st.blocks,
                        first: (first.dev, first.ino),
                        first_nlink: first.nlink,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The data of node `ino` when it is a metacopy file (for `diff`), opened for reading.
    pub fn metacopy_fd(&self, ino: u64) -> Result<Option<OwnedFd>> {
        let data = self.node(ino)?.lock().data.clone();
        data.map(|d| self.open_data_file(&d, 0)).transpose()
    }

    /// During a tree copy: the data of the regular file `dir`/`name` of `layer` (its
    /// directory at `dir_path` there, the directory's copies `stack`), opened, when it is a
    /// metacopy file of that layer; `None` when it holds its data.
    pub(super) fn data_fd_in_tree(
        &self,
        dir: BorrowedFd<'_>,
        layer: u16,
        dir_path: &[u8],
        name: &[u8],
        stack: &Stack,
    ) -> Result<Option<OwnedFd>> {
        let target = XTarget::At(dir, name);
        let Some(value) = sys::xattr_get(target, self.xattr_ns.metacopy())? else {
            return Ok(None);
        };
        let show = join_path(dir_path, name);
        if parse(&value) == Marker::Invalid {
            return Err(Error::os(libc::EIO));
        }
        let redirect = self.data_redirect(target, &show)?;
        let found = self
            .find_data(layer, name, redirect, &|| Ok(stack.clone()))?
            .ok_or_else(|| Error::os(libc::EIO))?;
        Ok(Some(self.open_data_file(&found, 0)?))
    }

    /// Open a metacopy file's data for reading (`flags`: extra open flags passed through).
    pub(super) fn open_data_file(&self, data: &DataSource, flags: i32) -> Result<OwnedFd> {
        Ok(sys::open_beneath(
            self.root_fd(data.layer),
            &data.path,
            libc::O_RDONLY | flags,
            0,
        )?)
    }

    /// The data source of the lower regular file `node` is about to be copied from
    /// (`src_dir`/`name` in `layer`, stat `st`) as a metacopy file.
    pub(super) fn data_of_lower(
        &self,
        layer: u16,
        src_dir_path: &[u8],
        name: &[u8],
        st: &FileStat,
    ) -> DataSource {
        DataSource {
            layer,
            path: join_path(src_dir_path, name).into_boxed_slice(),
            blocks: st.blocks,
            first: (st.dev, st.ino),
            first_nlink: st.nlink,
        }
    }

    /// Give the metacopy file `node` its data (`data` false: truncate it to nothing instead),
    /// in place: hard links of it stay one file. Its owner, mode, times and file capabilities
    /// are kept (writing may drop capabilities and set-id bits), then the marker goes, and
    /// readers opened from now on read the upper file. Nothing for a node that is not a
    /// metacopy file (any more).
    pub(super) fn fill_data(&self, node: &Arc<Node>, data: bool) -> Result<()> {
        let _one = node.copy_up.lock().unwrap_or_else(|p| p.into_inner());
        let Some(source) = node.lock().data.clone() else {
            return Ok(());
        };
        let upper = self.upper_layer()?;
        let (src, dst) = {
            let _r = self.read_ns();
            let path = self.table().path(node.ino);
            let dst = match path {
                Some(path) => sys::open_beneath(self.root_fd(upper), &path, libc::O_RDWR, 0)?,
                None => {
                    // Unlinked, still open: reached through the descriptor kept at unlink.
                    let orphan = node.lock().orphan.clone();
                    let orphan = orphan.ok_or_else(|| Error::os(libc::ENOENT))?;
                    sys::reopen(orphan.as_fd(), libc::O_RDWR)?
                }
            };
            let src = if data {
                Some(self.open_data_file(&source, 0)?)
            } else {
                None
            };
            (src, dst)
        };
        self.fill_fd(src.as_ref().map(|s| s.as_fd()), dst.as_fd())?;
        node.lock().data = None;
        node.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Copy the data `src` into the metacopy file `dst` (`None`: truncate it), keep what
    /// writing may drop, and remove the marker last.
    fn fill_fd(&self, src: Option<BorrowedFd<'_>>, dst: BorrowedFd<'_>) -> Result<()> {
        let before = sys::fstat(dst)?;
        if !before.is_reg() {
            return Err(Error::os(libc::EIO));
        }
        let caps = sys::xattr_get(XTarget::Fd(dst), super::CAPS_XATTR)?;
        match src {
            Some(src) => super::copy_data(src, dst, before.size, self.fsync)?,
            None => sys::ftruncate(dst, 0)?,
        }
        if let Some(caps) = caps {
            if sys::xattr_get(XTarget::Fd(dst), super::CAPS_XATTR)?.as_ref() != Some(&caps) {
                sys::xattr_set(XTarget::Fd(dst), super::CAPS_XATTR, &caps, 0)?;
            }
        }
        if sys::fstat(dst)?.mode != before.mode {
            sys::fchmod(dst, before.perm())?;
        }
        sys::futimens(dst, SetTime::At(before.atime), SetTime::At(before.mtime))?;
        if self.fsync {
            sys::fsync(dst, false)?;
        }
        // Only now: until the marker goes, reads still come from the lower data.
        match sys::xattr_remove(XTarget::Fd(dst), self.xattr_ns.metacopy()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// During a tree copy (the directory's copies are `stack`), give the upper file
    /// `dir`/`name` its data if it is a metacopy file: once its directory is opaque and moved,
    /// its lower data is no longer found where it was. Runs under the exclusive lock.
    pub(super) fn fill_in_tree(
        &self,
        dir: BorrowedFd<'_>,
        path: &[u8],
        name: &[u8],
        stack: &Stack,
    ) -> Result<()> {
        let upper = self.upper_layer()?;
        if let Some(src) = self.data_fd_in_tree(dir, upper, path, name, stack)? {
            let dst = sys::open_at(dir, name, libc::O_RDWR, 0)?;
            self.fill_fd(Some(src.as_fd()), dst.as_fd())?;
        }
        Ok(())
    }

    /// Mark the unnamed copy `tmp` of the lower file (stat `st`) a metacopy file: as long as
    /// the data, without any of it (sparse).
    pub(super) fn make_metacopy(&self, tmp: BorrowedFd<'_>, st: &FileStat) -> Result<()> {
        sys::ftruncate(tmp, st.size)?;
        sys::xattr_set(XTarget::Fd(tmp), self.xattr_ns.metacopy(), b"", 0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_values() {
        let digest = |len: usize| {
            let mut v = vec![0u8, (HEADER + len) as u8, 0, 1];
            v.extend(std::iter::repeat_n(0xab, len));
            v
        };
        let cases: Vec<(&str, Vec<u8>, Marker)> = vec![
            ("empty: what the kernel writes", vec![], Marker::Metacopy),
            ("a sha256 digest", digest(32), Marker::Metacopy),
            ("the longest digest", digest(MAX_DIGEST), Marker::Metacopy),
            ("header only", digest(0), Marker::Metacopy),
            ("too long", digest(MAX_DIGEST + 1), Marker::Invalid),
            ("shorter than the header", vec![0, 3, 0], Marker::Invalid),
            ("one byte", vec![b'y'], Marker::Invalid),
            (
                "version 1",
                [&[1u8][..], &digest(32)[1..]].concat(),
                Marker::Invalid,
            ),
            (
                "len not the size",
                [&[0u8, 9][..], &digest(32)[2..]].concat(),
                Marker::Invalid,
            ),
            ("text", b"yes".to_vec(), Marker::Invalid),
        ];
        for (what, v, want) in cases {
            assert_eq!(parse(&v), want, "{what}");
        }
        for n in 0..80 {
            let _ = parse(&vec![0xff; n]);
        }
    }

    #[test]
    fn what_each_change_copies() {
        use Action::*;
        use Change::*;
        use State::*;
        let read = Open {
            write: false,
            trunc: false,
        };
        let write = Open {
            write: true,
            trunc: false,
        };
        let trunc = Open {
            write: true,
            trunc: true,
        };
        let chmod = Attr { size: None };
        // (state, change, metacopy=on, regular, action)
        let cases = [
            (Lower, read, true, true, Nothing),
            (Lower, write, true, true, CopyUp { data: true }),
            (Lower, trunc, true, true, CopyUp { data: false }),
            (
                Lower,
                Attr { size: Some(0) },
                true,
                true,
                CopyUp { data: false },
            ),
            (
                Lower,
                Attr { size: Some(5) },
                true,
                true,
                CopyUp { data: true },
            ),
            (Lower, chmod, true, true, CopyUpMeta),
            (Lower, Xattr, true, true, CopyUpMeta),
            (Lower, Rename, true, true, CopyUpMeta),
            (Lower, Link, true, true, CopyUpMeta),
            // Only regular files are ever metacopy files.
            (Lower, chmod, true, false, CopyUp { data: true }),
            (Lower, Rename, true, false, CopyUp { data: true }),
            // metacopy=off: whole copies, as before.
            (Lower, chmod, false, true, CopyUp { data: true }),
            (Lower, Xattr, false, true, CopyUp { data: true }),
            (Lower, Link, false, true, CopyUp { data: true }),
            (Lower, trunc, false, true, CopyUp { data: false }),
            // A metacopy file gets its data at the first open for write or truncation, on
            // either setting (the upper may come from a metacopy=on mount).
            (Metacopy, read, true, true, Nothing),
            (Metacopy, write, true, true, FillData { data: true }),
            (Metacopy, write, false, true, FillData { data: true }),
            (Metacopy, trunc, true, true, FillData { data: false }),
            (
                Metacopy,
                Attr { size: Some(0) },
                true,
                true,
                FillData { data: false },
            ),
            (
                Metacopy,
                Attr { size: Some(7) },
                true,
                true,
                FillData { data: true },
            ),
            (Metacopy, chmod, true, true, Nothing),
            (Metacopy, Xattr, true, true, Nothing),
            (Metacopy, Rename, true, true, Nothing),
            (Metacopy, Link, true, true, Nothing),
            (Upper, write, true, true, Nothing),
            (Upper, chmod, true, true, Nothing),
            (Upper, Attr { size: Some(1) }, false, true, Nothing),
        ];
        for (state, change, on, reg, want) in cases {
            assert_eq!(
                action(state, change, on, reg),
                want,
                "{state:?} {change:?} metacopy={on} regular={reg}"
            );
        }
    }
}
