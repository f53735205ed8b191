//! The FUSE adapter: `impl fuser::Filesystem` over a [`Union`].
//!
//! Each request makes one call into the union and replies with its result; errors become
//! errnos in one place (`Error::errno`). Handlers never panic on purpose, and each runs under
//! `catch_unwind` so that a bug answers one request with EIO instead of killing the
//! session thread and with it the user's mount.
//!
//! Open files and directories are kept in a handle table keyed by the `fh` the kernel sends
//! back; a directory handle holds the readdir snapshot taken at `opendir`, so offsets stay
//! valid (telldir/seekdir) however the listing is read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::path::Path;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::error::Error;
use crate::sys::{self, Timespec};
use crate::union::{Attr, Caller, DirEntry, OpenFile, SetAttr, Union};

/// How ids on disk are shown through the mount.
#[derive(Clone, Debug, Default)]
pub struct IdView {
    /// Report every file as owned by this uid (`squash_to_uid`, `squash_to_root`).
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    /// `uidmapping=`/`gidmapping=`: container id ranges mapped onto host ids.
    pub uid_map: IdMap,
    pub gid_map: IdMap,
}

/// A list of `(container, host, length)` ranges, as fuse-overlayfs' `uidmapping=` takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap(pub Vec<(u32, u32, u32)>);

/// The id shown for an id that no range maps (the kernel's overflow id).
pub const OVERFLOW_ID: u32 = 65534;

impl IdMap {
    /// Parse `C:H:L[:C:H:L...]` (fuse-overlayfs also accepts `,` between triples).
    pub fn parse(spec: &str) -> Result<IdMap, String> {
        let nums: Result<Vec<u32>, _> = spec
            .split([':', ','])
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect();
        let nums = nums.map_err(|_| format!("bad id mapping {spec:?}"))?;
        if nums.is_empty() || nums.len() % 3 != 0 {
            return Err(format!(
                "bad id mapping {spec:?}: want container:host:length triples"
            ));
        }
        Ok(IdMap(nums.chunks(3).map(|c| (c[0], c[1], c[2])).collect()))
    }

    /// Host id -> id shown in the mount.
    pub fn to_container(&self, host: u32) -> u32 {
        if self.0.is_empty() {
            return host;
        }
        for &(c, h, l) in &self.0 {
            if host >= h && host - h < l {
                return c + (host - h);
            }
        }
        OVERFLOW_ID
    }

    /// Id given by a user of the mount -> host id stored on disk.
    pub fn to_host(&self, container: u32) -> Option<u32> {
        if self.0.is_empty() {
            return Some(container);
        }
        self.0
            .iter()
            .find(|&&(c, _, l)| container >= c && container - c < l)
            .map(|&(c, h, _)| h + (container - c))
    }
}

/// Knobs of the adapter.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// How long the kernel may cache entries and attributes. Lowers never change and the upper
    /// changes only through us, so this can be long.
    pub ttl: Duration,
    pub ids: IdView,
    /// The kernel checks permissions (`default_permissions`); otherwise `access` does.
    pub default_permissions: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            ttl: Duration::from_secs(86400),
            ids: IdView::default(),
            default_permissions: true,
        }
    }
}

enum Handle {
    File(OpenFile),
    Dir {
        ino: u64,
        entries: Mutex<DirSnapshot>,
    },
}

struct DirSnapshot {
    entries: Arc<Vec<DirEntry>>,
    /// A read has happened, so offset 0 means rewinddir and takes a fresh snapshot.
    read_once: bool,
}

/// The filesystem the FUSE session runs.
pub struct LayerFs {
    union: Arc<Union>,
    opts: FuseOptions,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn set_time(t: Option<TimeOrNow>) -> Option<sys::SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => sys::SetTime::Now,
        TimeOrNow::SpecificTime(st) => sys::SetTime::At(match st.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos() as i64,
            },
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if nsec < 0 {
                    sec -= 1;
                    nsec += 1_000_000_000;
                }
                Timespec { sec, nsec }
            }
        }),
    })
}

fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(t.nsec.clamp(0, 999_999_999) as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & sys::S_IFMT {
        sys::S_IFDIR => FileType::Directory,
        sys::S_IFLNK => FileType::Symlink,
        sys::S_IFCHR => FileType::CharDevice,
        sys::S_IFBLK => FileType::BlockDevice,
        sys::S_IFIFO => FileType::NamedPipe,
        sys::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn dtype_file_type(dtype: u8) -> FileType {
    match dtype {
        sys::DT_DIR => FileType::Directory,
        sys::DT_LNK => FileType::Symlink,
        sys::DT_CHR => FileType::CharDevice,
        sys::DT_BLK => FileType::BlockDevice,
        sys::DT_FIFO => FileType::NamedPipe,
        sys::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// Run a handler body; a panic inside drops the reply, which answers EIO.
fn guarded(what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        log::error!("internal error in {what}: answered EIO");
    }
}

impl LayerFs {
    pub fn new(union: Arc<Union>, opts: FuseOptions) -> Self {
        LayerFs {
            union,
            opts,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Error> {
        self.handles()
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| Error::os(libc::EBADF))
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        let st = &a.st;
        let ids = &self.opts.ids;
        let uid = ids
            .squash_uid
            .unwrap_or_else(|| ids.uid_map.to_container(st.uid));
        let gid = ids
            .squash_gid
            .unwrap_or_else(|| ids.gid_map.to_container(st.gid));
        FileAttr {
            ino: INodeNo(a.ino),
            size: st.size,
            blocks: st.blocks,
            atime: to_system_time(st.atime),
            mtime: to_system_time(st.mtime),
            ctime: to_system_time(st.ctime),
            crtime: UNIX_EPOCH,
            kind: file_type(st.mode),
            perm: (st.mode & 0o7777) as u16,
            nlink: st.nlink.min(u32::MAX as u64) as u32,
            uid,
            gid,
            rdev: st.rdev as u32,
            blksize: st.blksize as u32,
            flags: 0,
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, res: Result<Attr, Error>) {
        match res {
            Ok(a) => reply.entry(&self.opts.ttl, &self.file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn reply_attr(&self, reply: ReplyAttr, res: Result<Attr, Error>) {
        match res {
            Ok(a) => reply.attr(&self.opts.ttl, &self.file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn caller(req: &Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    /// Some open handle of inode `ino`.
    fn open_handle_of(&self, ino: u64) -> Option<FileHandle> {
        self.handles().iter().find_map(|(fh, h)| match &**h {
            Handle::File(f) if f.ino() == ino => Some(FileHandle(*fh)),
            _ => None,
        })
    }

    /// The current descriptor of an open file handle.
    fn file_fd(&self, fh: FileHandle) -> Result<Arc<OwnedFd>, Error> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File(f) => self.union.file_fd(f),
            Handle::Dir { .. } => Err(Error::os(libc::EISDIR)),
        }
    }

    fn host_uid(&self, uid: Option<u32>) -> Result<Option<u32>, Error> {
        uid.map(|u| {
            self.opts
                .ids
                .uid_map
                .to_host(u)
                .ok_or_else(|| Error::os(libc::EINVAL))
        })
        .transpose()
    }

    fn host_gid(&self, gid: Option<u32>) -> Result<Option<u32>, Error> {
        gid.map(|g| {
            self.opts
                .ids
                .gid_map
                .to_host(g)
                .ok_or_else(|| Error::os(libc::EINVAL))
        })
        .transpose()
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Error> {
        let fd = self.file_fd(fh)?;
        let mut done = 0;
        while done < data.len() {
            let n = sys::pwrite(fd.as_fd(), &data[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done as u32)
    }

    fn with_fd<T>(
        &self,
        fh: FileHandle,
        f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> std::io::Result<T>,
    ) -> Result<T, Error> {
        let fd = self.file_fd(fh)?;
        Ok(f(fd.as_fd())?)
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Error> {
        let fd = self.file_fd(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = sys::pread(fd.as_fd(), &mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// The directory's snapshot and the index of the first entry to send after `offset`.
    fn snapshot(
        &self,
        fh: FileHandle,
        offset: u64,
    ) -> Result<(u64, Arc<Vec<DirEntry>>, usize), Error> {
        let h = self.handle(fh)?;
        let Handle::Dir { ino, entries } = &*h else {
            return Err(Error::os(libc::ENOTDIR));
        };
        let mut snap = entries.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 && snap.read_once {
            snap.entries = Arc::new(self.union.list_dir(*ino)?);
        }
        snap.read_once = true;
        // Offsets: 1 = ".", 2 = "..", 3 + i = entry i (each offset names the next position).
        let skip = offset.saturating_sub(2) as usize;
        Ok((*ino, snap.entries.clone(), skip))
    }

    fn check_access(&self, req: &Request, ino: u64, mask: AccessFlags) -> Result<(), Error> {
        let a = self.union.getattr(ino)?;
        if mask == AccessFlags::F_OK {
            return Ok(());
        }
        if mask.contains(AccessFlags::W_OK) && !self.union.is_writable() {
            return Err(Error::os(libc::EROFS));
        }
        let uid = req.uid();
        let st = &a.st;
        if uid == 0 {
            // Root may do anything except execute a file nobody may execute.
            if mask.contains(AccessFlags::X_OK) && !st.is_dir() && st.mode & 0o111 == 0 {
                return Err(Error::os(libc::EACCES));
            }
            return Ok(());
        }
        let fa = self.file_attr(&a);
        let bits = if fa.uid == uid {
            (st.mode >> 6) & 7
        } else if fa.gid == req.gid() || sys::process_groups(req.pid()).contains(&fa.gid) {
            (st.mode >> 3) & 7
        } else {
            st.mode & 7
        };
        let want = (mask.bits() as u32) & 7;
        if bits & want == want {
            Ok(())
        } else {
            Err(Error::os(libc::EACCES))
        }
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_EXPORT_SUPPORT;
        let supported = config.capabilities() & wanted;
        if let Err(missing) = config.add_capabilities(supported) {
            log::debug!("kernel lacks {missing:?}");
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || {
            let res = self.union.lookup(parent.0, name.as_bytes());
            self.reply_entry(reply, res)
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        guarded("forget", || self.union.forget(ino.0, nlookup))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || {
            let by_handle = |fh: FileHandle| {
                self.file_fd(fh)
                    .and_then(|fd| self.union.getattr_fd(ino.0, fd.as_fd()))
            };
            let res = match fh {
                Some(fh) => by_handle(fh).or_else(|_| self.union.getattr(ino.0)),
                None => match self.union.getattr(ino.0) {
                    // fstat of a file whose names are all gone: the kernel sends no handle, so
                    // find one of the node's open handles.
                    Err(e) if e.is(libc::ENOENT) => match self.open_handle_of(ino.0) {
                        Some(fh) => by_handle(fh),
                        None => Err(e),
                    },
                    other => other,
                },
            };
            self.reply_attr(reply, res)
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || match self.union.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", || match self.union.open(ino.0, flags.0) {
            Ok(fd) => {
                let fh = self.add_handle(Handle::File(fd));
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guarded("read", || match self.do_read(fh, offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded("release", || {
            self.handles().remove(&fh.0);
            reply.ok()
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", || match self.union.list_dir(ino.0) {
            Ok(entries) => {
                let fh = self.add_handle(Handle::Dir {
                    ino: ino.0,
                    entries: Mutex::new(DirSnapshot {
                        entries: Arc::new(entries),
                        read_once: false,
                    }),
                });
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guarded("readdir", || {
            let (ino, entries, skip) = match self.snapshot(fh, offset) {
                Ok(s) => s,
                Err(e) => return reply.error(errno(&e)),
            };
            if offset < 1 && reply.add(INodeNo(ino), 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset < 2 {
                let parent = self.union.parent_of(ino);
                if reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
                    return reply.ok();
                }
            }
            let first = 3;
            for (i, e) in entries.iter().enumerate().skip(skip) {
                let child = self.union.entry_ino(ino, e).unwrap_or(u64::MAX);
                let kind = dtype_file_type(e.top.dtype);
                if reply.add(
                    INodeNo(child),
                    first + i as u64,
                    kind,
                    OsStr::from_bytes(&e.name),
                ) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guarded("readdirplus", || {
            let (ino, entries, skip) = match self.snapshot(fh, offset) {
                Ok(s) => s,
                Err(e) => return reply.error(errno(&e)),
            };
            let ttl = self.opts.ttl;
            if offset < 2 {
                let dir = match self.union.getattr(ino) {
                    Ok(a) => self.file_attr(&a),
                    Err(e) => return reply.error(errno(&e)),
                };
                if offset < 1 && reply.add(INodeNo(ino), 1, ".", &ttl, &dir, Generation(0)) {
                    return reply.ok();
                }
                let mut up = dir;
                up.ino = INodeNo(self.union.parent_of(ino));
                if reply.add(up.ino, 2, "..", &ttl, &up, Generation(0)) {
                    return reply.ok();
                }
            }
            let first = 3;
            for (i, e) in entries.iter().enumerate().skip(skip) {
                // A full lookup: the kernel takes a reference on every entry it receives.
                let attr = match self.union.lookup(ino, &e.name) {
                    Ok(a) => a,
                    // Gone since the snapshot: skip it, as a concurrent unlink would.
                    Err(_) => continue,
                };
                let fa = self.file_attr(&attr);
                if reply.add(
                    fa.ino,
                    first + i as u64,
                    OsStr::from_bytes(&e.name),
                    &ttl,
                    &fa,
                    Generation(0),
                ) {
                    // Not sent: give the reference back.
                    self.union.forget(attr.ino, 1);
                    break;
                }
            }
            reply.ok()
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        guarded("releasedir", || {
            self.handles().remove(&fh.0);
            reply.ok()
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", || match self.union.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, 255, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded("getxattr", || {
            match self.union.getxattr(ino.0, name.as_bytes()) {
                Ok(v) => reply_xattr(reply, size, &v),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded("listxattr", || match self.union.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                reply_xattr(reply, size, &buf)
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded("setattr", || {
            let res = (|| {
                let changes = SetAttr {
                    mode,
                    uid: self.host_uid(uid)?,
                    gid: self.host_gid(gid)?,
                    size,
                    atime: set_time(atime),
                    mtime: set_time(mtime),
                };
                let fd = fh.and_then(|fh| self.file_fd(fh).ok());
                self.union
                    .setattr(ino.0, &changes, fd.as_ref().map(|f| f.as_fd()))
            })();
            self.reply_attr(reply, res)
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guarded("mknod", || {
            let res = self.union.mknod(
                parent.0,
                name.as_bytes(),
                mode,
                rdev as u64,
                &Self::caller(req),
            );
            self.reply_entry(reply, res)
        })
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        guarded("mkdir", || {
            let res = self
                .union
                .mkdir(parent.0, name.as_bytes(), mode, &Self::caller(req));
            self.reply_entry(reply, res)
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || {
            match self.union.remove(parent.0, name.as_bytes(), false) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || {
            match self.union.remove(parent.0, name.as_bytes(), true) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        guarded("symlink", || {
            let res = self.union.symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                &Self::caller(req),
            );
            self.reply_entry(reply, res)
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded("rename", || {
            match self.union.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            ) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded("link", || {
            let res = self.union.link(ino.0, newparent.0, newname.as_bytes());
            self.reply_entry(reply, res)
        })
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        guarded("create", || {
            match self
                .union
                .create(parent.0, name.as_bytes(), mode, flags, &Self::caller(req))
            {
                Ok((attr, fd)) => {
                    let fh = self.add_handle(Handle::File(fd));
                    reply.created(
                        &self.opts.ttl,
                        &self.file_attr(&attr),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guarded("write", || match self.do_write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsync", || {
            match self.with_fd(fh, |fd| sys::fsync(fd, datasync)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsyncdir", || match self.union.fsync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guarded("setxattr", || {
            match self.union.setxattr(ino.0, name.as_bytes(), value, flags) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("removexattr", || {
            match self.union.removexattr(ino.0, name.as_bytes()) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guarded("fallocate", || {
            match self.with_fd(fh, |fd| sys::fallocate(fd, mode, offset, length)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        guarded("lseek", || {
            match self.with_fd(fh, |fd| sys::lseek(fd, offset, whence)) {
                Ok(off) => reply.offset(off),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        guarded("copy_file_range", || {
            let res = (|| {
                let src = self.file_fd(fh_in)?;
                self.with_fd(fh_out, |dst| {
                    sys::copy_file_range(src.as_fd(), offset_in, dst, offset_out, len)
                })
            })();
            match res {
                Ok(n) => reply.written(n.min(u32::MAX as usize) as u32),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        guarded("access", || match self.check_access(req, ino.0, mask) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        })
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_map_parse_and_translate() {
        let m = IdMap::parse("0:1000:1:1:100000:65536").unwrap_or_default();
        assert_eq!(m.to_container(1000), 0);
        assert_eq!(m.to_container(100000), 1);
        assert_eq!(m.to_container(100005), 6);
        assert_eq!(m.to_container(5), OVERFLOW_ID);
        assert_eq!(m.to_host(0), Some(1000));
        assert_eq!(m.to_host(6), Some(100005));
        assert_eq!(m.to_host(70000), None);
        assert!(IdMap::parse("0:1").is_err());
        assert!(IdMap::parse("a:b:c").is_err());
        assert_eq!(IdMap::default().to_container(42), 42);
    }

    #[test]
    fn negative_times_convert() {
        let t = to_system_time(Timespec { sec: -2, nsec: 500 });
        assert_eq!(
            UNIX_EPOCH
                .duration_since(t)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            2_000_000_000 - 500
        );
    }
}
