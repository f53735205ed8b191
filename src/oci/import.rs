//! Safe extraction of an OCI layer tar into a directory in the overlay upper-dir format.
//!
//! Guarantees (each has a test, here or in `tests/store_import.rs`):
//! * Nothing outside the target directory is created, changed or read. Every call goes through
//!   a directory fd with a single name (`*_at`, `O_NOFOLLOW`) or `openat2` with
//!   `RESOLVE_IN_ROOT|RESOLVE_NO_SYMLINKS`; names are validated by [`super::path::normalize`]
//!   (no absolute paths, no `..`).
//! * A symlink is never followed: an entry whose parent path goes through a symlink (or a
//!   non-directory) is refused; an entry at the name of an existing symlink replaces the
//!   symlink (a directory entry over a symlink makes a real directory).
//! * A hard link must point at an entry this tar already extracted (not a directory, not
//!   through a symlink); anything else is refused.
//! * Whiteouts follow the OCI rules, applied once the whole tar is read: `.wh..wh..opq` marks
//!   its directory opaque wherever it sits; `.wh.NAME` becomes an overlay whiteout unless this
//!   tar itself has NAME (a directory NAME then becomes opaque: the lower one was deleted, the
//!   new one replaces it; a non-directory NAME hides the lower one by itself). Whiteouts inside
//!   an opaque directory are redundant and not written. AUFS bookkeeping names are ignored.
//! * A character device 0/0 in a tar is refused: in the overlay format it would be a whiteout.
//! * Overlay/layerfs xattrs in the tar are dropped (see [`super::keep_xattr`]).
//! * Ownership is applied when permitted. Without the right to chown (an unprivileged store),
//!   files keep the importer's ids and lose setuid/setgid bits and `security.capability`
//!   (those would grant something to the wrong owner). As root, setuid/setgid files are kept
//!   as the image has them: the store's `layers/` directory is 0700, so no other user can
//!   reach them, and mounts are `nosuid` unless asked otherwise.
//! * Device nodes that cannot be created (no CAP_MKNOD) are skipped with a warning, as Docker
//!   and containers-storage do in user namespaces.
//! * Directory modes and times are set after all their children, so a read-only directory can
//!   still be filled and every mtime ends as the tar says. Directories the tar implies but
//!   does not list get mode 0755, the extractor's ids and mtime 0 (the epoch): a layer
//!   directory depends on nothing but its tar.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::keep_xattr;
use super::path::{Meaning, components, meaning, normalize};
use super::tarfmt::{Entry, Kind, TarReader, Time};
use crate::error::{Error, Result, ShowPath};
use crate::fsutil;
use crate::sys::{self, SetTime, Timespec, XTarget};
use crate::union::split_path;
use crate::union::whiteout::{WhiteoutFormat, XattrNs};

/// Longest normalized path accepted (bytes): PATH_MAX. Deeper trees cannot be used by
/// ordinary tools and would cost one descriptor per level to walk.
pub const MAX_PATH: usize = 4095;

/// How markers are written.
#[derive(Clone, Copy, Debug)]
pub struct Formats {
    pub xattr_ns: XattrNs,
    pub whiteouts: WhiteoutFormat,
}

/// Decide how markers can be written in `dir`: char 0/0 whiteouts and trusted xattrs when
/// privileged, the kernel's userxattr format otherwise.
pub fn probe_formats(dir: BorrowedFd<'_>) -> Formats {
    let probe = b".layerfs-probe";
    let _ = sys::unlink_at(dir, probe, false);
    let whiteouts = match sys::mknod_at(dir, probe, sys::S_IFCHR, 0) {
        Ok(()) => {
            let _ = sys::unlink_at(dir, probe, false);
            WhiteoutFormat::CharDev
        }
        Err(_) => WhiteoutFormat::UserXattr,
    };
    let xattr_ns = match sys::open_at(dir, probe, libc::O_CREAT | libc::O_WRONLY, 0o600) {
        Ok(fd) => {
            let ok =
                sys::xattr_set(XTarget::Fd(fd.as_fd()), b"trusted.layerfs.probe", b"1", 0).is_ok();
            let _ = sys::unlink_at(dir, probe, false);
            if ok { XattrNs::Trusted } else { XattrNs::User }
        }
        Err(_) => XattrNs::User,
    };
    Formats {
        xattr_ns,
        whiteouts,
    }
}

/// Counters reported after an import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub file_bytes: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub skipped_devices: u64,
    pub dropped_xattrs: u64,
    /// Entries whose ownership could not be applied.
    pub unowned: u64,
}

#[derive(Clone, Copy, Debug)]
struct DirMeta {
    mode: u32,
    mtime: Time,
    atime: Time,
}

struct Extractor<'a> {
    root: BorrowedFd<'a>,
    formats: Formats,
    euid: u32,
    egid: u32,
    /// The parent directory of the previous entry (tar entries come grouped by directory).
    cache: Option<(Vec<u8>, OwnedFd)>,
    dirs: HashMap<Vec<u8>, DirMeta>,
    whiteouts: Vec<Vec<u8>>,
    opaques: Vec<Vec<u8>>,
    stats: Stats,
    buf: Vec<u8>,
    progress: &'a dyn Fn(u64),
}

fn ts(t: Time) -> SetTime {
    SetTime::At(Timespec {
        sec: t.sec,
        nsec: t.nsec as i64,
    })
}

fn is_under(path: &[u8], top: &[u8]) -> bool {
    path.len() > top.len() && path.starts_with(top) && path[top.len()] == b'/'
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Extract every entry of `tar` into the directory `root` (which should be empty).
pub fn extract<R: Read>(
    tar: &mut TarReader<R>,
    root: BorrowedFd<'_>,
    formats: Formats,
    progress: &dyn Fn(u64),
) -> Result<Stats> {
    let mut x = Extractor {
        root,
        formats,
        euid: sys::geteuid(),
        egid: sys::getgid(),
        cache: None,
        dirs: HashMap::new(),
        whiteouts: Vec::new(),
        opaques: Vec::new(),
        stats: Stats::default(),
        buf: vec![0u8; 256 << 10],
        progress,
    };
    x.dirs.insert(
        Vec::new(),
        DirMeta {
            mode: 0o755,
            mtime: Time::default(),
            atime: Time::default(),
        },
    );
    while let Some(e) = tar.next_entry()? {
        x.stats.entries += 1;
        x.entry(&e, tar)?;
    }
    x.finish()
}

impl Extractor<'_> {
    fn root_dup(&self) -> Result<OwnedFd> {
        sys::open_dir_beneath(self.root, b"").map_err(|e| Error::io("opening the layer", e))
    }

    /// The directory `dir` (normalized, relative), created with its missing ancestors.
    fn take_parent(&mut self, dir: &[u8], entry: &[u8]) -> Result<OwnedFd> {
        if let Some((p, fd)) = self.cache.take() {
            if p == dir {
                return Ok(fd);
            }
        }
        let mut cur = self.root_dup()?;
        let mut sofar: Vec<u8> = Vec::with_capacity(dir.len());
        for comp in components(dir) {
            if !sofar.is_empty() {
                sofar.push(b'/');
            }
            sofar.extend_from_slice(comp);
            let flags = libc::O_RDONLY | libc::O_DIRECTORY;
            cur = match sys::open_at(cur.as_fd(), comp, flags, 0) {
                Ok(fd) => fd,
                Err(e) if errno_of(&e) == libc::ENOENT => {
                    sys::mkdir_at(cur.as_fd(), comp, 0o700).map_err(|e| {
                        Error::io(format!("creating directory {}", ShowPath(&sofar)), e)
                    })?;
                    self.dirs.entry(sofar.clone()).or_insert(DirMeta {
                        mode: 0o755,
                        mtime: Time::default(),
                        atime: Time::default(),
                    });
                    sys::open_at(cur.as_fd(), comp, flags, 0)
                        .map_err(|e| Error::io(format!("opening {}", ShowPath(&sofar)), e))?
                }
                Err(e) if matches!(errno_of(&e), libc::ELOOP | libc::ENOTDIR) => {
                    return Err(Error::invalid(format!(
                        "tar entry {}: {} is not a directory (a symlink or a file); \
                         refusing to write through it",
                        ShowPath(entry),
                        ShowPath(&sofar)
                    )));
                }
                Err(e) => return Err(Error::io(format!("opening {}", ShowPath(&sofar)), e)),
            };
        }
        Ok(cur)
    }

    /// Make room for a new entry at `parent/name`. Returns true when an existing directory is
    /// kept (a directory entry over a directory merges).
    fn clear(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        dir: bool,
    ) -> Result<bool> {
        let st = match sys::stat_at_opt(parent, name) {
            Ok(st) => st,
            Err(e) => return Err(Error::io(format!("stat {}", ShowPath(path)), e)),
        };
        match st {
            None => Ok(false),
            Some(st) if st.is_dir() && dir => Ok(true),
            Some(st) => {
                if st.is_dir() {
                    self.dirs.retain(|p, _| !is_under(p, path) && p != path);
                }
                fsutil::remove_tree(parent, name)
                    .map_err(|e| Error::io(format!("replacing {}", ShowPath(path)), e))?;
                Ok(false)
            }
        }
    }

    fn entry<R: Read>(&mut self, e: &Entry, tar: &mut TarReader<R>) -> Result<()> {
        let path = normalize(&e.path)?;
        if path.len() > MAX_PATH {
            return Err(Error::invalid(format!(
                "tar entry {}...: path longer than {MAX_PATH} bytes",
                ShowPath(&path[..64])
            )));
        }
        match meaning(&path)? {
            Meaning::AufsInternal => return Ok(()),
            Meaning::Opaque { dir } => {
                let fd = self.take_parent(dir, &path)?;
                self.cache = Some((dir.to_vec(), fd));
                self.opaques.push(dir.to_vec());
                return Ok(());
            }
            Meaning::Whiteout { dir, name } => {
                let fd = self.take_parent(dir, &path)?;
                self.cache = Some((dir.to_vec(), fd));
                let mut wh = dir.to_vec();
                if !wh.is_empty() {
                    wh.push(b'/');
                }
                wh.extend_from_slice(name);
                self.whiteouts.push(wh);
                return Ok(());
            }
            Meaning::Plain => {}
        }
        if path.is_empty() {
            return self.root_entry(e);
        }
        let (dir, name) = split_path(&path);
        let dir = dir.to_vec();
        let name = name.to_vec();
        let pfd = self.take_parent(&dir, &path)?;
        let res = self.create(pfd.as_fd(), &path, &name, e, tar);
        self.cache = Some((dir, pfd));
        res
    }

    fn root_entry(&mut self, e: &Entry) -> Result<()> {
        if e.kind() != Kind::Dir {
            return Err(Error::invalid(
                "tar entry for the layer root is not a directory",
            ));
        }
        let fd = self.root_dup()?;
        let owned = self.chown(Owner::Fd(fd.as_fd()), e, b".")?;
        self.xattrs(XTarget::Fd(fd.as_fd()), e, owned, false, b".")?;
        self.dirs.insert(Vec::new(), self.dir_meta(e, owned));
        Ok(())
    }

    fn dir_meta(&self, e: &Entry, owned: bool) -> DirMeta {
        DirMeta {
            mode: strip_ids(e.mode, owned),
            mtime: e.mtime,
            atime: e.atime.unwrap_or(e.mtime),
        }
    }

    fn create<R: Read>(
        &mut self,
        pfd: BorrowedFd<'_>,
        path: &[u8],
        name: &[u8],
        e: &Entry,
        tar: &mut TarReader<R>,
    ) -> Result<()> {
        let ctx = |what: &str| format!("{what} {}", ShowPath(path));
        match e.kind() {
            Kind::File => {
                self.clear(pfd, name, path, false)?;
                let fd = sys::open_at(
                    pfd,
                    name,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o600,
                )
                .map_err(|err| Error::io(ctx("creating"), err))?;
                let mut f = File::from(fd);
                loop {
                    let n = tar.read_data(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&self.buf[..n])
                        .map_err(|err| Error::io(ctx("writing"), err))?;
                    self.stats.file_bytes += n as u64;
                    (self.progress)(n as u64);
                }
                let owned = self.chown(Owner::Fd(f.as_fd()), e, path)?;
                self.xattrs(XTarget::Fd(f.as_fd()), e, owned, false, path)?;
                sys::fchmod(f.as_fd(), strip_ids(e.mode, owned))
                    .map_err(|err| Error::io(ctx("chmod"), err))?;
                sys::futimens(f.as_fd(), ts(e.atime.unwrap_or(e.mtime)), ts(e.mtime))
                    .map_err(|err| Error::io(ctx("setting times of"), err))?;
            }
            Kind::Dir => {
                let kept = self.clear(pfd, name, path, true)?;
                if !kept {
                    sys::mkdir_at(pfd, name, 0o700).map_err(|err| Error::io(ctx("mkdir"), err))?;
                }
                let fd = sys::open_at(pfd, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                    .map_err(|err| Error::io(ctx("opening"), err))?;
                let owned = self.chown(Owner::Fd(fd.as_fd()), e, path)?;
                self.xattrs(XTarget::Fd(fd.as_fd()), e, owned, false, path)?;
                let meta = self.dir_meta(e, owned);
                self.dirs.insert(path.to_vec(), meta);
            }
            Kind::Symlink => {
                self.clear(pfd, name, path, false)?;
                sys::symlink_at(&e.link, pfd, name)
                    .map_err(|err| Error::io(ctx("symlink"), err))?;
                self.finish_special(pfd, name, path, e, true)?;
            }
            Kind::HardLink => self.hard_link(pfd, name, path, e)?,
            kind @ (Kind::Char | Kind::Block | Kind::Fifo) => {
                let (ftype, rdev) = match kind {
                    Kind::Char => (sys::S_IFCHR, sys::makedev(e.dev_major, e.dev_minor)),
                    Kind::Block => (sys::S_IFBLK, sys::makedev(e.dev_major, e.dev_minor)),
                    _ => (sys::S_IFIFO, 0),
                };
                if kind == Kind::Char && rdev == 0 {
                    return Err(Error::invalid(format!(
                        "tar entry {}: character device 0/0 (an overlay whiteout; layers \
                         delete files with .wh. entries)",
                        ShowPath(path)
                    )));
                }
                self.clear(pfd, name, path, false)?;
                match sys::mknod_at(pfd, name, ftype | 0o600, rdev) {
                    Ok(()) => {}
                    Err(err) if errno_of(&err) == libc::EPERM && kind != Kind::Fifo => {
                        if self.stats.skipped_devices == 0 {
                            log::warn!(
                                "no permission to create device nodes: skipping {} and any \
                                 other device in this layer",
                                ShowPath(path)
                            );
                        }
                        self.stats.skipped_devices += 1;
                        return Ok(());
                    }
                    Err(err) => return Err(Error::io(ctx("mknod"), err)),
                }
                self.finish_special(pfd, name, path, e, false)?;
            }
        }
        Ok(())
    }

    /// Owner, xattrs, mode and times of an entry that cannot be opened (symlinks, devices).
    fn finish_special(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        e: &Entry,
        symlink: bool,
    ) -> Result<()> {
        let owned = self.chown(Owner::At(pfd, name), e, path)?;
        self.xattrs(XTarget::At(pfd, name), e, owned, symlink, path)?;
        if !symlink {
            sys::chmod_at(pfd, name, strip_ids(e.mode, owned))
                .map_err(|err| Error::io(format!("chmod {}", ShowPath(path)), err))?;
        }
        sys::utimens_at(pfd, name, ts(e.atime.unwrap_or(e.mtime)), ts(e.mtime))
            .map_err(|err| Error::io(format!("setting times of {}", ShowPath(path)), err))
    }

    fn hard_link(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        e: &Entry,
    ) -> Result<()> {
        let refuse = |why: &str| {
            Error::invalid(format!(
                "tar entry {}: hard link to {}: {why}",
                ShowPath(path),
                ShowPath(&e.link)
            ))
        };
        let target = normalize(&e.link)?;
        if target.is_empty() || meaning(&target)? != Meaning::Plain {
            return Err(refuse("not a file of this layer"));
        }
        if target == path {
            return Ok(());
        }
        let (tdir, tname) = split_path(&target);
        let tfd = match sys::open_dir_beneath(self.root, tdir) {
            Ok(fd) => fd,
            Err(err) if matches!(errno_of(&err), libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                return Err(refuse("not extracted from this layer before the link"));
            }
            Err(err) => return Err(Error::io(format!("opening {}", ShowPath(tdir)), err)),
        };
        match sys::stat_at_opt(tfd.as_fd(), tname) {
            Ok(Some(st)) if st.is_dir() => return Err(refuse("a directory")),
            Ok(Some(_)) => {}
            Ok(None) => return Err(refuse("not extracted from this layer before the link")),
            Err(err) => return Err(Error::io(format!("stat {}", ShowPath(&target)), err)),
        }
        self.clear(pfd, name, path, false)?;
        sys::link_at(tfd.as_fd(), tname, pfd, name)
            .map_err(|err| Error::io(format!("hard link {}", ShowPath(path)), err))
    }

    /// Apply the entry's ids; false when not permitted (unprivileged store).
    fn chown(&mut self, target: Owner<'_>, e: &Entry, path: &[u8]) -> Result<bool> {
        let (Ok(uid), Ok(gid)) = (u32::try_from(e.uid), u32::try_from(e.gid)) else {
            return Err(Error::invalid(format!(
                "tar entry {}: uid/gid out of range",
                ShowPath(path)
            )));
        };
        if uid == u32::MAX || gid == u32::MAX {
            return Err(Error::invalid(format!(
                "tar entry {}: uid/gid out of range",
                ShowPath(path)
            )));
        }
        if uid == self.euid && gid == self.egid {
            return Ok(true);
        }
        let res = match target {
            Owner::Fd(fd) => sys::fchown(fd, Some(uid), Some(gid)),
            Owner::At(dir, name) => sys::chown_at(dir, name, Some(uid), Some(gid)),
        };
        match res {
            Ok(()) => Ok(true),
            Err(err) if self.euid != 0 && matches!(errno_of(&err), libc::EPERM | libc::EINVAL) => {
                if self.stats.unowned == 0 {
                    log::warn!(
                        "cannot give files their owners (not root): {} and others keep uid {} \
                         and lose setuid/setgid bits and file capabilities",
                        ShowPath(path),
                        self.euid
                    );
                }
                self.stats.unowned += 1;
                Ok(false)
            }
            Err(err) => Err(Error::io(format!("chown {}", ShowPath(path)), err)),
        }
    }

    fn xattrs(
        &mut self,
        target: XTarget<'_>,
        e: &Entry,
        owned: bool,
        symlink: bool,
        path: &[u8],
    ) -> Result<()> {
        for (name, value) in &e.xattrs {
            let keep = keep_xattr(name)
                && (owned || name != b"security.capability")
                // The kernel allows user.* xattrs only on files and directories.
                && !(symlink && name.starts_with(b"user."));
            if !keep {
                log::debug!("{}: dropping xattr {}", ShowPath(path), ShowPath(name));
                self.stats.dropped_xattrs += 1;
                continue;
            }
            match sys::xattr_set(target, name, value, 0) {
                Ok(()) => {}
                Err(err)
                    if self.euid != 0
                        && matches!(errno_of(&err), libc::EPERM | libc::EOPNOTSUPP) =>
                {
                    log::warn!(
                        "{}: cannot set xattr {} ({err}); dropped",
                        ShowPath(path),
                        ShowPath(name)
                    );
                    self.stats.dropped_xattrs += 1;
                }
                Err(err) => {
                    return Err(Error::io(
                        format!("setting xattr {} on {}", ShowPath(name), ShowPath(path)),
                        err,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whiteouts, opaque markers, then directory modes and times.
    fn finish(mut self) -> Result<Stats> {
        self.cache = None;
        let ns = self.formats.xattr_ns;
        let mut opaque: HashSet<Vec<u8>> = HashSet::new();
        let opaques = std::mem::take(&mut self.opaques);
        for dir in opaques {
            if opaque.contains(&dir) {
                continue;
            }
            if let Some(fd) = self.open_dir_opt(&dir)? {
                sys::xattr_set(XTarget::Fd(fd.as_fd()), ns.opaque(), b"y", 0)
                    .map_err(|e| Error::io(format!("marking {} opaque", ShowPath(&dir)), e))?;
                self.stats.opaque_dirs += 1;
                opaque.insert(dir);
            }
        }
        let whiteouts = std::mem::take(&mut self.whiteouts);
        for path in whiteouts {
            let (dir, name) = split_path(&path);
            if opaque.contains(dir) || opaque.contains(&path) {
                continue;
            }
            let Some(dfd) = self.open_dir_opt(dir)? else {
                continue;
            };
            let st = sys::stat_at_opt(dfd.as_fd(), name)
                .map_err(|e| Error::io(format!("stat {}", ShowPath(&path)), e))?;
            match st {
                Some(st) if st.is_dir() => {
                    // The tar deletes the lower NAME and brings its own directory NAME.
                    let fd = sys::open_at(dfd.as_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                        .map_err(|e| Error::io(format!("opening {}", ShowPath(&path)), e))?;
                    sys::xattr_set(XTarget::Fd(fd.as_fd()), ns.opaque(), b"y", 0)
                        .map_err(|e| Error::io(format!("marking {} opaque", ShowPath(&path)), e))?;
                    self.stats.opaque_dirs += 1;
                    opaque.insert(path.clone());
                }
                Some(_) => {}
                None => {
                    self.whiteout(dfd.as_fd(), name, &path)?;
                    self.stats.whiteouts += 1;
                }
            }
        }
        let mut dirs: Vec<(Vec<u8>, DirMeta)> = self.dirs.drain().collect();
        dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (path, meta) in dirs {
            let Some(fd) = self.open_dir_opt(&path)? else {
                continue;
            };
            sys::fchmod(fd.as_fd(), meta.mode)
                .map_err(|e| Error::io(format!("chmod {}", ShowPath(&path)), e))?;
            sys::futimens(fd.as_fd(), ts(meta.atime), ts(meta.mtime))
                .map_err(|e| Error::io(format!("setting times of {}", ShowPath(&path)), e))?;
        }
        Ok(self.stats)
    }

    fn whiteout(&mut self, dfd: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<()> {
        if self.formats.whiteouts == WhiteoutFormat::CharDev {
            match sys::mknod_at(dfd, name, sys::S_IFCHR, 0) {
                Ok(()) => return Ok(()),
                Err(e) if errno_of(&e) == libc::EPERM => {
                    self.formats.whiteouts = WhiteoutFormat::UserXattr;
                }
                Err(e) => return Err(Error::io(format!("whiteout {}", ShowPath(path)), e)),
            }
        }
        let ns = self.formats.xattr_ns;
        let fd = sys::open_at(dfd, name, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0)
            .map_err(|e| Error::io(format!("whiteout {}", ShowPath(path)), e))?;
        sys::xattr_set(XTarget::Fd(fd.as_fd()), ns.whiteout(), b"", 0)
            .map_err(|e| Error::io(format!("whiteout {}", ShowPath(path)), e))?;
        sys::xattr_set(XTarget::Fd(dfd), ns.opaque(), b"x", 0)
            .map_err(|e| Error::io(format!("whiteout {}", ShowPath(path)), e))
    }

    /// Open a directory of the layer if it (still) is one; never through a symlink.
    fn open_dir_opt(&self, path: &[u8]) -> Result<Option<OwnedFd>> {
        match sys::open_dir_beneath(self.root, path) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if matches!(errno_of(&e), libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                Ok(None)
            }
            Err(e) => Err(Error::io(format!("opening {}", ShowPath(path)), e)),
        }
    }
}

#[derive(Clone, Copy)]
enum Owner<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a [u8]),
}

/// Mode bits to apply: setuid/setgid only when the owner is the one the tar says.
fn strip_ids(mode: u32, owned: bool) -> u32 {
    if owned { mode & 0o7777 } else { mode & 0o1777 }
}

#[cfg(test)]
mod tests {
    use super::super::tarfmt::{HeaderSpec, write_header, write_padding, write_trailer};
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::Path;

    struct T(Vec<u8>);
    impl T {
        fn new() -> T {
            T(Vec::new())
        }
        fn add(&mut self, path: &str, kind: Kind, link: &str, data: &[u8]) -> &mut T {
            self.add_x(path, kind, link, data, &[])
        }
        fn add_x(
            &mut self,
            path: &str,
            kind: Kind,
            link: &str,
            data: &[u8],
            xattrs: &[(Vec<u8>, Vec<u8>)],
        ) -> &mut T {
            let spec = HeaderSpec {
                path: path.as_bytes(),
                kind,
                link: link.as_bytes(),
                mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
                uid: sys::geteuid() as u64,
                gid: sys::getgid() as u64,
                size: data.len() as u64,
                mtime: 1_000_000,
                dev_major: 0,
                dev_minor: 0,
                xattrs,
            };
            write_header(&mut self.0, &spec).unwrap();
            self.0.extend_from_slice(data);
            write_padding(&mut self.0, data.len() as u64).unwrap();
            self
        }
        fn extract(&mut self, dir: &Path) -> Result<Stats> {
            write_trailer(&mut self.0).unwrap();
            let fd = sys::open_dir_path(dir).unwrap();
            let formats = probe_formats(fd.as_fd());
            let mut r = TarReader::new(&self.0[..]);
            extract(&mut r, fd.as_fd(), formats, &|_| {})
        }
    }

    fn is_whiteout(p: &Path) -> bool {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_char_device() => m.rdev() == 0,
            Ok(m) if m.is_file() && m.len() == 0 => sys::xattr_get(
                XTarget::At(
                    sys::open_dir_path(p.parent().unwrap()).unwrap().as_fd(),
                    p.file_name().unwrap().as_encoded_bytes(),
                ),
                b"user.overlay.whiteout",
            )
            .unwrap()
            .is_some(),
            _ => false,
        }
    }

    fn opaque(p: &Path) -> Option<Vec<u8>> {
        let fd = sys::open_dir_path(p).unwrap();
        for n in [&b"trusted.overlay.opaque"[..], b"user.overlay.opaque"] {
            if let Some(v) = sys::xattr_get(XTarget::Fd(fd.as_fd()), n).unwrap() {
                return Some(v);
            }
        }
        None
    }

    #[test]
    fn whiteouts_follow_oci_rules() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        T::new()
            .add("a/", Kind::Dir, "", b"")
            .add("a/keep", Kind::File, "", b"x")
            .add("a/.wh.gone", Kind::File, "", b"")
            // A whiteout never removes this tar's own files ...
            .add("a/.wh.keep", Kind::File, "", b"")
            // ... and a whited-out name that the tar brings as a directory becomes opaque.
            .add("b/.wh.d", Kind::File, "", b"")
            .add("b/d/", Kind::Dir, "", b"")
            // The opaque marker applies wherever it sits.
            .add("c/f", Kind::File, "", b"1")
            .add("c/.wh..wh..opq", Kind::File, "", b"")
            .add("c/.wh.redundant", Kind::File, "", b"")
            .add(".wh..wh.plnk/1", Kind::File, "", b"")
            .extract(p)
            .unwrap();
        assert!(is_whiteout(&p.join("a/gone")));
        assert_eq!(std::fs::read(p.join("a/keep")).unwrap(), b"x");
        assert!(opaque(&p.join("b/d")).is_some_and(|v| v == b"y"));
        assert!(opaque(&p.join("c")).is_some_and(|v| v == b"y"));
        assert!(!p.join("c/redundant").exists());
        assert!(!p.join(".wh..wh.plnk").exists());
        assert_eq!(std::fs::read(p.join("c/f")).unwrap(), b"1");
        // Directory mtimes are set after their children (whiteouts included).
        let m = std::fs::metadata(p.join("a")).unwrap();
        assert_eq!(m.mtime(), 1_000_000);
    }

    #[test]
    fn refuses_writes_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let target = out.path().to_str().unwrap().to_string();
        let e = T::new()
            .add("l", Kind::Symlink, &target, b"")
            .add("l/evil", Kind::File, "", b"x")
            .extract(d.path())
            .unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);

        // A directory entry replaces the symlink; later entries land in the real directory.
        let d = tempfile::tempdir().unwrap();
        T::new()
            .add("l", Kind::Symlink, &target, b"")
            .add("l/", Kind::Dir, "", b"")
            .add("l/f", Kind::File, "", b"x")
            .extract(d.path())
            .unwrap();
        assert!(d.path().join("l").symlink_metadata().unwrap().is_dir());
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn hard_links_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        T::new()
            .add("f", Kind::File, "", b"data")
            .add("g", Kind::HardLink, "./f", b"")
            .extract(d.path())
            .unwrap();
        let (a, b) = (
            std::fs::metadata(d.path().join("f")).unwrap(),
            std::fs::metadata(d.path().join("g")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        for (link, why) in [
            ("/etc/passwd", "absolute"),
            ("../x", ".."),
            ("later", "not extracted"),
            ("l/passwd", "not extracted"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let e = T::new()
                .add("l", Kind::Symlink, "/etc", b"")
                .add("g", Kind::HardLink, link, b"")
                .add("later", Kind::File, "", b"")
                .extract(d.path())
                .unwrap_err();
            assert!(e.to_string().contains(why), "{link}: {e}");
        }
    }

    #[test]
    fn drops_private_xattrs() {
        let d = tempfile::tempdir().unwrap();
        let x = vec![
            (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
            (b"user.overlay.opaque".to_vec(), b"y".to_vec()),
            (b"user.layerfs.origin".to_vec(), b"1".to_vec()),
            (b"user.kept".to_vec(), b"v".to_vec()),
        ];
        let st = T::new()
            .add_x("dir/", Kind::Dir, "", b"", &x)
            .extract(d.path())
            .unwrap();
        assert_eq!(st.dropped_xattrs, 3);
        assert_eq!(opaque(&d.path().join("dir")), None);
        let fd = sys::open_dir_path(&d.path().join("dir")).unwrap();
        assert_eq!(
            sys::xattr_get(XTarget::Fd(fd.as_fd()), b"user.kept").unwrap(),
            Some(b"v".to_vec())
        );
    }

    #[test]
    fn later_entries_replace_earlier() {
        let d = tempfile::tempdir().unwrap();
        T::new()
            .add("x/", Kind::Dir, "", b"")
            .add("x/y", Kind::File, "", b"")
            .add("x", Kind::File, "", b"file now")
            .add("z", Kind::File, "", b"1")
            .add("z", Kind::File, "", b"2")
            .extract(d.path())
            .unwrap();
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"file now");
        assert_eq!(std::fs::read(d.path().join("z")).unwrap(), b"2");
        let e = T::new()
            .add("c", Kind::Char, "", b"")
            .extract(tempfile::tempdir().unwrap().path())
            .unwrap_err();
        assert!(e.to_string().contains("0/0"), "{e}");
    }
}
