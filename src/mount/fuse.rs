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

use std::any::Any;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::path::Path;

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::error::Error;
use crate::mount::heap::Trimmer;
use crate::mount::prefetch::Prefetcher;
use crate::mount::workers::Workers;
use crate::sys::{self, Timespec};
use crate::union::idmap::{IdMap, IdView, MappedXattr};
use crate::union::inode::{Node, PassthroughSlot};
use crate::union::metacopy::Change;
use crate::union::{Attr, Caller, FIRST_NAME_OFFSET, Listing, OpenFile, SetAttr, Union};

/// How long a copy-up worker waits for the next job before it exits.
const WORKER_LINGER: Duration = Duration::from_secs(2);

/// Knobs of the adapter.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// How long the kernel may cache entries and attributes. Lowers never change and the upper
    /// changes only through us, so this can be long.
    pub ttl: Duration,
    pub ids: IdView,
    /// The kernel checks permissions (`default_permissions`); otherwise `access` does.
    pub default_permissions: bool,
    /// Let the kernel read and write open files directly (FUSE passthrough) when it can.
    pub passthrough: bool,
    /// Let the kernel cache directory listings and negative lookups.
    pub cache_dirs: bool,
    /// When listings carry attributes.
    pub readdirplus: ReaddirPlus,
    /// How long the reply to a listing's first readdirplus batch may spend looking entries up
    /// before it lists the rest of the batch by name only. Warm, a full batch (about 200
    /// entries) takes well under the default; cold, each lookup may read inodes from disk, and
    /// the kernel asks for the first batch of every listing with lookups (`readdirplus=auto`)
    /// even when the caller only wants names. Entries listed by name get a LOOKUP later if the
    /// caller stats them; later batches come with lookups only when the caller stats entries,
    /// and are looked up in full (with `readdirplus=always`, every batch has the budget).
    pub readdirplus_budget: Duration,
    /// Read subdirectories ahead of a tree walk on a second thread.
    pub prefetch: bool,
    /// Ask for FUSE-over-io_uring when the kernel offers it (see `uring`).
    pub io_uring: bool,
    /// Read-only opens of lower files up to this size go through the FUSE page cache instead
    /// of passthrough (0: never; default [`DEFAULT_CACHE_SMALL_FILES`]). Cached pages make a
    /// warm re-open and read cost one request fewer (a passthrough read invalidates the
    /// inode's atime, and the next `fstat` refetches it), but each mount then keeps its own
    /// copy of those files' pages besides the lower filesystem's, where passthrough shares one.
    pub cache_small_files: u64,
}

/// The default of `-o cache_small_files`. Most files of a tree are this small (the bench tree:
/// 89% of the files), so warm re-reads of them save the most requests (grep -r warm, traced:
/// 50,275 GETATTRs -> 6,646). The price is a second page-cache copy per mount of each small
/// file read, a page at least (a cold grep of the bench tree: +203 MiB), which the kernel
/// reclaims like any page cache; a larger limit adds more bytes for few more files.
pub const DEFAULT_CACHE_SMALL_FILES: u64 = 16 * 1024;

/// `-o readdirplus=`: when directory listings carry attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaddirPlus {
    Always,
    /// The kernel decides per directory (the default).
    Auto,
    Off,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            ttl: Duration::from_secs(86400),
            ids: IdView::default(),
            default_permissions: true,
            passthrough: true,
            io_uring: true,
            cache_dirs: true,
            readdirplus: ReaddirPlus::Auto,
            readdirplus_budget: Duration::from_millis(1),
            prefetch: true,
            cache_small_files: DEFAULT_CACHE_SMALL_FILES,
        }
    }
}

/// An open file.
struct Handle {
    file: OpenFile,
    /// Held while the kernel reads/writes this file directly.
    backing: Option<Arc<BackingId>>,
    /// Held while the file is served through the page cache.
    _cached: Option<CachedOpen>,
}

/// A page-cache open, counted on its node (`Node::cached_opens`) while it lives.
struct CachedOpen(Arc<Node>);

impl CachedOpen {
    /// Count a new page-cache open of `node`; the caller holds the node's passthrough slot
    /// lock, or passthrough is off.
    fn new(node: Arc<Node>) -> CachedOpen {
        node.cached_opens.fetch_add(1, Ordering::Relaxed);
        CachedOpen(node)
    }
}

impl Drop for CachedOpen {
    fn drop(&mut self) {
        // The kernel has left page-cache mode for this file before it sent the RELEASE that
        // brought us here, so the count never falls below the kernel's.
        let _slot = self.0.passthrough_slot();
        self.0.cached_opens.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The filesystem the FUSE session runs: a cheap handle on the shared core, so slow requests
/// can finish on their own thread while the session keeps answering others.
pub struct LayerFs(Arc<Core>);

impl std::ops::Deref for LayerFs {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

/// State shared by every request.
pub struct Core {
    union: Arc<Union>,
    opts: FuseOptions,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Passthrough is on (asked for, granted by the kernel, and not refused since).
    passthrough: AtomicBool,
    /// The kernel granted FUSE_OVER_IO_URING at init.
    io_uring: Arc<AtomicBool>,
    /// Sends the kernel notifications; set once the session exists.
    notifier: Arc<OnceLock<Notifier>>,
    prefetch: Option<Prefetcher>,
    /// Gives freed heap memory back after the kernel forgets many inodes.
    trimmer: Option<Trimmer>,
    /// Threads for requests that may copy data up.
    workers: Workers,
    /// `opts.ids.gid_map` for callers' group checks (`None` when it is the identity).
    group_map: Option<Arc<IdMap>>,
}

/// How an open file is served.
enum OpenMode {
    /// Registered with a backing file. Normally the kernel then does the I/O on it; with
    /// `direct`, reads and writes still come to the daemon: the inode has passthrough handles
    /// on the file it had before a copy-up, and the kernel wants every open of an inode in
    /// passthrough mode to name that same backing file (only mmap uses it then).
    Passthrough {
        backing: Arc<BackingId>,
        direct: bool,
    },
    /// Through the page cache. `keep_cache`: pages the kernel holds for the inode are
    /// current (else they are dropped at open).
    Cached { open: CachedOpen, keep_cache: bool },
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

/// Run a handler body on the session's thread; a panic inside drops the reply, which answers
/// EIO.
/// Reads of at least this many bytes are spliced (`sys::splice_read_reply`): below it, the
/// splice's extra system calls cost more than the copy they save.
const SPLICE_MIN: usize = 64 * 1024;

fn guarded(what: &str, f: impl FnOnce()) {
    let _serving = crate::mount::busypoll::note_request();
    unwind_to_eio(what, f);
}

fn unwind_to_eio(what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        log::error!("internal error in {what}: answered EIO");
    }
}

impl LayerFs {
    pub fn new(union: Arc<Union>, opts: FuseOptions) -> Self {
        let prefetch = if opts.prefetch {
            Prefetcher::start(&union)
                .map_err(|e| log::warn!("no directory prefetch: cannot start its thread: {e}"))
                .ok()
        } else {
            None
        };
        let trimmer = Trimmer::start()
            .map_err(|e| log::warn!("no heap trimming: cannot start its thread: {e}"))
            .ok();
        let group_map =
            (!opts.ids.gid_map.is_identity()).then(|| Arc::new(opts.ids.gid_map.clone()));
        LayerFs(Arc::new(Core {
            group_map,
            prefetch,
            trimmer,
            workers: Workers::new("layerfs-slow", WORKER_LINGER),
            union,
            opts,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            io_uring: Arc::new(AtomicBool::new(false)),
            notifier: Arc::new(OnceLock::new()),
        }))
    }

    /// Where the daemon puts the session's notifier once the session exists.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// What the ring threads read files with (READ answered straight into their buffers).
    pub fn reader(&self) -> Arc<dyn crate::mount::uring::ReadInto> {
        self.0.clone()
    }

    /// Set once FUSE_INIT granted FUSE-over-io_uring: the daemon then starts the rings.
    pub fn io_uring_granted(&self) -> Arc<AtomicBool> {
        self.io_uring.clone()
    }

    /// Run `f` here, or (`slow`: the request may copy file data up) on a worker thread so
    /// one large copy never holds up unrelated requests.
    fn run(&self, what: &'static str, slow: bool, f: impl FnOnce(&Core) + Send + 'static) {
        if slow {
            self.offload(what, f);
        } else {
            guarded(what, || f(self));
        }
    }

    /// Run `f` on a worker that has no other job.
    fn offload(&self, what: &'static str, f: impl FnOnce(&Core) + Send + 'static) {
        let core = self.0.clone();
        crate::mount::busypoll::pause();
        let submitted = self
            .0
            .workers
            .submit(move || unwind_to_eio(what, || f(&core)));
        if let Err(e) = submitted {
            // The closure (and its reply, which answers EIO when dropped) is gone with it.
            log::error!("{what}: cannot start a worker thread: {e}");
        }
    }
}

impl Core {
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
        let uid = self.opts.ids.shown_uid(st.uid);
        let gid = self.opts.ids.shown_gid(st.gid);
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

    /// A lookup answer; a missing name is cached by the kernel as a negative entry (node id 0)
    /// since names appear only through this mount, which the kernel sees.
    fn reply_lookup(&self, reply: ReplyEntry, res: Result<Attr, Error>) {
        match res {
            Err(e) if e.is(libc::ENOENT) && self.opts.cache_dirs => {
                let mut none = self.file_attr(&Attr {
                    ino: 0,
                    st: sys::FileStat::default(),
                });
                none.ino = INodeNo(0);
                reply.entry(&self.opts.ttl, &none, Generation(0))
            }
            other => self.reply_entry(reply, other),
        }
    }

    fn reply_attr(&self, reply: ReplyAttr, res: Result<Attr, Error>) {
        match res {
            Ok(a) => reply.attr(&self.opts.ttl, &self.file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// The caller in ids on disk. A caller whose ids the mapping does not cover cannot own
    /// anything here: EOVERFLOW, as an idmapped mount answers.
    fn caller(&self, req: &Request) -> Result<Caller, Error> {
        let ids = &self.opts.ids;
        let (Some(uid), Some(gid)) = (ids.disk_uid(req.uid()), ids.disk_gid(req.gid())) else {
            return Err(Error::os(libc::EOVERFLOW));
        };
        Ok(Caller {
            uid,
            gid,
            pid: req.pid(),
            group_map: self.group_map.clone(),
        })
    }

    /// Decide how to serve a new open of `file`; `register` turns a descriptor into a
    /// backing id with the kernel. A deferred open gets its descriptor here when it needs one.
    fn open_mode(
        &self,
        file: &OpenFile,
        register: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Result<OpenMode, Error> {
        if !self.passthrough.load(Ordering::Relaxed) {
            self.union.file_fd(file)?;
            return Ok(OpenMode::Cached {
                open: CachedOpen::new(file.node()),
                keep_cache: true,
            });
        }
        // The kernel takes one backing file per inode at a time: every open of the node
        // shares the registration in its slot while it lives.
        let mut slot = file.passthrough_slot();
        // Passthrough handles hold the registration besides the slot's own `kept`.
        let passthrough_open = slot
            .as_ref()
            .is_some_and(|s| s.live.strong_count() > usize::from(s.kept.is_some()));
        if !passthrough_open {
            let node = file.node();
            // The kernel fails (EIO) an open that would mix page-cache and passthrough opens
            // of one inode: while page-cache handles are open (a small lower file being read,
            // or a file whose registration failed), every open of the node is one too, writers
            // included. They write through the page cache, which keeps its pages current;
            // lower files never change, so their pages stay current between opens.
            let others_cached = node.cached_opens.load(Ordering::Relaxed) > 0;
            if others_cached
                || (self.opts.cache_small_files > 0
                    && self
                        .union
                        .is_small_lower_read(file, self.opts.cache_small_files))
            {
                if !others_cached {
                    self.store_small_file(file);
                }
                // The descriptor stays deferred: a warm re-open reads only cached pages.
                return Ok(OpenMode::Cached {
                    open: CachedOpen::new(node),
                    keep_cache: true,
                });
            }
        }
        let generation = file.generation();
        if let Some(s) = slot.as_mut() {
            if s.generation != generation {
                s.kept = None;
            }
            if let Some(b) = s
                .live
                .upgrade()
                .and_then(|b| b.downcast::<BackingId>().ok())
            {
                return Ok(OpenMode::Passthrough {
                    backing: b,
                    direct: s.generation != generation,
                });
            }
        }
        let fd = self.union.file_fd(file)?;
        let generation = file.generation();
        match register(fd.as_fd()) {
            Ok(b) => {
                let b = Arc::new(b);
                let shared: Arc<dyn Any + Send + Sync> = b.clone();
                *slot = Some(Box::new(PassthroughSlot {
                    generation,
                    live: Arc::downgrade(&shared),
                    kept: Some(shared),
                }));
                Ok(OpenMode::Passthrough {
                    backing: b,
                    direct: false,
                })
            }
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM) | Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP)
                ) {
                    log::warn!("FUSE passthrough refused ({e}); serving file I/O from the daemon");
                    self.passthrough.store(false, Ordering::Relaxed);
                } else {
                    log::debug!("passthrough for inode {}: {e}", file.ino());
                }
                // No backing is attached to this inode (none was live above), so the page
                // cache is free to use. Its pages may predate writes made through passthrough:
                // the kernel drops them at this open.
                Ok(OpenMode::Cached {
                    open: CachedOpen::new(file.node()),
                    keep_cache: false,
                })
            }
        }
    }

    /// Hand a small lower file's content to the kernel's page cache (FUSE_NOTIFY_STORE) at
    /// its first page-cache open, before the reply. A READ would do the same, but the kernel
    /// invalidates the inode's atime after every READ, so the next `fstat` would ask us again;
    /// stored pages cost no request. Called with the node's passthrough slot locked and no
    /// handle open on it: no READ of the inode can be waiting on its pages (that would
    /// deadlock the store). Failing is harmless: the pages are read on demand.
    fn store_small_file(&self, file: &OpenFile) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        match self
            .union
            .small_lower_content(file, self.opts.cache_small_files)
        {
            Ok(Some(data)) => {
                if let Err(e) = notifier.store(INodeNo(file.ino()), 0, &data) {
                    log::debug!("storing inode {}: {e}", file.ino());
                }
            }
            Ok(None) => {}
            Err(e) => log::debug!("reading inode {} to store it: {e}", file.ino()),
        }
    }

    fn drop_handle(&self, fh: FileHandle) {
        let h = self.handles().remove(&fh.0);
        if let Some(h) = h {
            if h.backing.is_some() {
                let node = h.file.node();
                drop(h);
                // The last handle of a registration that is not kept: free the slot.
                let mut slot = node.passthrough_slot();
                if slot.as_ref().is_some_and(|s| s.live.strong_count() == 0) {
                    *slot = None;
                }
            }
        }
    }

    fn do_open(&self, ino: u64, flags: i32, reply: ReplyOpen) {
        let file = match self.union.open_deferred(ino, flags) {
            Ok(file) => file,
            Err(e) => return reply.error(errno(&e)),
        };
        match self.open_mode(&file, |fd| reply.open_backing(fd)) {
            Ok(mode) => match self.add_open(file, mode) {
                (fh, flags, None) => reply.opened(fh, flags),
                (fh, flags, Some(b)) => reply.opened_passthrough(fh, flags, &b),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Keep an open file as a handle. Returns the handle, the open flags for the reply, and
    /// the registration to name when the kernel does the file's I/O itself.
    fn add_open(
        &self,
        file: OpenFile,
        mode: OpenMode,
    ) -> (FileHandle, FopenFlags, Option<Arc<BackingId>>) {
        match mode {
            OpenMode::Cached { open, keep_cache } => {
                let fh = self.add_handle(Handle {
                    file,
                    backing: None,
                    _cached: Some(open),
                });
                (FileHandle(fh), cached_flags(keep_cache), None)
            }
            OpenMode::Passthrough { backing, direct } => {
                let fh = self.add_handle(Handle {
                    file,
                    backing: Some(backing.clone()),
                    _cached: None,
                });
                (FileHandle(fh), passthrough_flags(direct), Some(backing))
            }
        }
    }

    /// The current descriptor of an open file handle.
    fn file_fd(&self, fh: FileHandle) -> Result<Arc<OwnedFd>, Error> {
        let h = self.handle(fh)?;
        self.union.file_fd(&h.file)
    }

    /// The uid a chown stores; an id the mapping does not cover is refused with EOVERFLOW, as
    /// an idmapped mount refuses it (the id is valid, it just has no place on this disk).
    fn disk_uid(&self, uid: Option<u32>) -> Result<Option<u32>, Error> {
        uid.map(|u| {
            self.opts
                .ids
                .disk_uid(u)
                .ok_or_else(|| Error::os(libc::EOVERFLOW))
        })
        .transpose()
    }

    fn disk_gid(&self, gid: Option<u32>) -> Result<Option<u32>, Error> {
        gid.map(|g| {
            self.opts
                .ids
                .disk_gid(g)
                .ok_or_else(|| Error::os(libc::EOVERFLOW))
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

    /// Read into this thread's buffer and hand the bytes read to `reply` (reused: a READ
    /// costs no allocation or zeroing of up to a MiB).
    fn read_with(
        fd: BorrowedFd<'_>,
        offset: u64,
        size: u32,
        reply: impl FnOnce(Result<&[u8], Error>),
    ) {
        thread_local! {
            static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        READ_BUF.with(|cell| {
            let Ok(mut buf) = cell.try_borrow_mut() else {
                return reply(Err(Error::os(libc::EIO)));
            };
            let want = size as usize;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match Self::read_file(fd, offset, &mut buf[..want]) {
                Ok(done) => reply(Ok(&buf[..done])),
                Err(e) => reply(Err(e)),
            }
        })
    }

    /// Fill `buf` from the open file `fd` at `offset`; short only at the end of the file.
    fn read_file(fd: BorrowedFd<'_>, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        let mut done = 0;
        while done < buf.len() {
            match sys::pread(fd, &mut buf[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
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

impl crate::mount::uring::ReadInto for Core {
    fn read_into(&self, fh: u64, offset: u64, buf: &mut [u8]) -> Result<usize, i32> {
        // Busy polling is off while the rings serve: nothing to note.
        let mut result = Err(libc::EIO);
        unwind_to_eio("read", || {
            result = self
                .file_fd(FileHandle(fh))
                .and_then(|fd| Self::read_file(fd.as_fd(), offset, buf))
                .map_err(|e| e.errno());
        });
        result
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // With AUTO the kernel asks for attributes with the listing only while the reader also
        // stats what it lists; `find` and scandir get plain (stat-free) listings.
        let wanted = match self.opts.readdirplus {
            ReaddirPlus::Always => InitFlags::FUSE_DO_READDIRPLUS,
            ReaddirPlus::Auto => InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            ReaddirPlus::Off => InitFlags::empty(),
        }
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_EXPORT_SUPPORT
            // The kernel keeps POSIX ACLs (and their absence) cached per inode instead of
            // asking on every `ls -l`; with default_permissions it also enforces them.
            | if self.opts.default_permissions {
                InitFlags::FUSE_POSIX_ACL
            } else {
                InitFlags::empty()
            };
        let supported = config.capabilities() & wanted;
        if let Err(missing) = config.add_capabilities(supported) {
            log::debug!("kernel lacks {missing:?}");
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        if self.opts.passthrough
            && sys::geteuid() == 0
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        if self.opts.io_uring
            && config
                .capabilities()
                .contains(InitFlags::FUSE_OVER_IO_URING)
        {
            match crate::mount::uring::usable() {
                Ok(()) => {
                    if config
                        .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                        .is_ok()
                    {
                        self.io_uring.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => log::warn!("io_uring offered by the kernel but unusable here: {e}"),
            }
        }
        log::info!(
            "passthrough {}",
            if self.passthrough.load(Ordering::Relaxed) {
                "on"
            } else {
                "off"
            }
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || {
            let res = self.union.lookup(parent.0, name.as_bytes());
            self.reply_lookup(reply, res)
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        guarded("forget", || {
            let freed = self.union.forget(ino.0, nlookup);
            if let Some(t) = &self.trimmer {
                t.freed(freed);
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || {
            let by_handle = |fh: FileHandle| {
                self.file_fd(fh)
                    .and_then(|fd| self.union.getattr_fd(ino.0, fd.as_fd()))
            };
            let res = match fh {
                Some(fh) => by_handle(fh).or_else(|_| self.union.getattr(ino.0)),
                None => self.union.getattr(ino.0),
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
        let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let change = Change::Open {
            write: true,
            trunc: flags.0 & libc::O_TRUNC != 0,
        };
        let slow = writes && self.union.copy_is_slow(ino.0, change);
        self.run("open", slow, move |core| {
            core.do_open(ino.0, flags.0, reply)
        });
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
        // Served on the request loop: handing large (readahead) reads to worker threads made
        // a cold 1 GiB read slower, not faster (rootless, A/B of 7 interleaved runs: median
        // 0.74 s inline, 1.13 s on workers).
        guarded("read", || {
            let fd = match self.file_fd(fh) {
                Ok(fd) => fd,
                Err(e) => return reply.error(errno(&e)),
            };
            // Large reads (readahead) are spliced from the file into the reply when replies go
            // to /dev/fuse; over the rings they already go straight into the ring's buffer.
            let reply = if size as usize >= SPLICE_MIN {
                let spliced = reply.write_direct(|dev, unique| {
                    sys::splice_read_reply(fd.as_fd(), offset, size as usize, dev, unique)
                        .unwrap_or(false)
                });
                match spliced {
                    Some(reply) => reply,
                    None => return,
                }
            } else {
                reply
            };
            Core::read_with(fd.as_fd(), offset, size, |res| match res {
                Ok(data) => reply.data(data),
                Err(e) => reply.error(errno(&e)),
            })
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
            self.drop_handle(fh);
            reply.ok()
        })
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Listings need no per-open state (offsets are name hashes). Answering ENOSYS makes
        // the kernel stop sending OPENDIR/RELEASEDIR altogether and keep every listing in its
        // cache: it changes only through this mount, and each change bumps its version.
        if self.opts.cache_dirs {
            reply.error(Errno::ENOSYS)
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty())
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guarded("readdir", || {
            let ino = ino.0;
            let (entries, start) = match self.union.read_dir(ino, offset) {
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
            for e in &entries[start..] {
                let child = self.union.entry_ino(ino, e).unwrap_or(u64::MAX);
                let kind = dtype_file_type(e.top.dtype);
                if reply.add(INodeNo(child), e.offset, kind, OsStr::from_bytes(&e.name)) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guarded("readdirplus", || {
            let started = Instant::now();
            let ino = ino.0;
            let (entries, start) = match self.union.read_dir(ino, offset) {
                Ok(s) => s,
                Err(e) => return reply.error(errno(&e)),
            };
            let ttl = self.opts.ttl;
            if offset < FIRST_NAME_OFFSET - 1 {
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
            // Full lookups: the kernel takes a reference on every entry it receives.
            let mut subdirs = Vec::new();
            // The kernel asks for a listing's first batch with attributes whatever the caller
            // wants (and for every batch with `readdirplus=always`); a later batch comes with
            // attributes only after the caller looked entries up, so it gets them all.
            let speculative = offset == 0 || self.opts.readdirplus == ReaddirPlus::Always;
            let deadline = speculative.then(|| started + self.opts.readdirplus_budget);
            let walked = self
                .union
                .lookup_listed(ino, &entries[start..], deadline, |e, found| {
                    let name = OsStr::from_bytes(&e.name);
                    match found {
                        Listing::Found(attr) => {
                            let fa = self.file_attr(attr);
                            let sent = !reply.add(fa.ino, e.offset, name, &ttl, &fa, Generation(0));
                            if sent && fa.kind == FileType::Directory {
                                subdirs.push(attr.ino);
                            }
                            sent
                        }
                        Listing::NameOnly(child) => {
                            let kind = dtype_file_type(e.top.dtype);
                            !reply.add_name_only(INodeNo(child), e.offset, kind, name)
                        }
                    }
                });
            if let Err(e) = walked {
                return reply.error(errno(&e));
            }
            if let Some(p) = &self.prefetch {
                p.push(&subdirs);
            }
            reply.ok()
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok()
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
                Ok(v) => match self.opts.ids.xattr_to_shown(name.as_bytes(), &v) {
                    MappedXattr::Unchanged => reply_xattr(reply, size, &v),
                    MappedXattr::Value(shown) => reply_xattr(reply, size, &shown),
                    // A capability for a namespace root this mount does not show grants
                    // nothing here: as if it were not there.
                    MappedXattr::Unmapped => reply.error(Errno::from_i32(libc::ENODATA)),
                },
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
        let run = move |core: &Core| {
            let res = (|| {
                let changes = SetAttr {
                    mode,
                    uid: core.disk_uid(uid)?,
                    gid: core.disk_gid(gid)?,
                    size,
                    atime: set_time(atime),
                    mtime: set_time(mtime),
                };
                let fd = fh.and_then(|fh| core.file_fd(fh).ok());
                core.union
                    .setattr(ino.0, &changes, fd.as_ref().map(|f| f.as_fd()))
            })();
            core.reply_attr(reply, res)
        };
        // chown, chmod and utimes copy only metadata with metacopy=on: no worker needed.
        let slow = self.union.copy_is_slow(ino.0, Change::Attr { size });
        self.run("setattr", slow, run);
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
            let res = self.caller(req).and_then(|caller| {
                self.union
                    .mknod(parent.0, name.as_bytes(), mode, rdev as u64, &caller)
            });
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
                .caller(req)
                .and_then(|caller| self.union.mkdir(parent.0, name.as_bytes(), mode, &caller));
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
            let res = self.caller(req).and_then(|caller| {
                self.union.symlink(
                    parent.0,
                    link_name.as_bytes(),
                    target.as_os_str().as_bytes(),
                    &caller,
                )
            });
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
        let (name, newname) = (name.to_owned(), newname.to_owned());
        let slow = self.union.child_needs_copy_up(parent.0, name.as_bytes())
            || self
                .union
                .child_needs_copy_up(newparent.0, newname.as_bytes());
        let run = move |core: &Core| match core.union.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        };
        self.run("rename", slow, run);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newname = newname.to_owned();
        let run = move |core: &Core| {
            let res = core.union.link(ino.0, newparent.0, newname.as_bytes());
            core.reply_entry(reply, res)
        };
        self.run("link", self.union.copy_is_slow(ino.0, Change::Link), run);
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
            let res = self.caller(req).and_then(|caller| {
                self.union
                    .create(parent.0, name.as_bytes(), mode, flags, &caller)
            });
            match res {
                Ok((attr, file)) => {
                    let fa = self.file_attr(&attr);
                    match self.open_mode(&file, |fd| reply.open_backing(fd)) {
                        Ok(mode) => match self.add_open(file, mode) {
                            (fh, flags, None) => {
                                reply.created(&self.opts.ttl, &fa, Generation(0), fh, flags)
                            }
                            (fh, flags, Some(b)) => reply.created_passthrough(
                                &self.opts.ttl,
                                &fa,
                                Generation(0),
                                fh,
                                flags,
                                &b,
                            ),
                        },
                        Err(e) => reply.error(errno(&e)),
                    }
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
        let value = match self.opts.ids.xattr_to_disk(name.as_bytes(), value) {
            MappedXattr::Unchanged => value.to_vec(),
            MappedXattr::Value(v) => v,
            MappedXattr::Unmapped => return reply.error(Errno::from_i32(libc::EINVAL)),
        };
        let name = name.to_owned();
        let run =
            move |core: &Core| match core.union.setxattr(ino.0, name.as_bytes(), &value, flags) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            };
        self.run(
            "setxattr",
            self.union.copy_is_slow(ino.0, Change::Xattr),
            run,
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        let run = move |core: &Core| match core.union.removexattr(ino.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        };
        self.run(
            "removexattr",
            self.union.copy_is_slow(ino.0, Change::Xattr),
            run,
        );
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

/// Open flags for a file served through the page cache (`keep_cache`: its cached pages are
/// current). No FLUSH on close: writes reach the backing file synchronously, so there is
/// nothing to report at close.
fn cached_flags(keep_cache: bool) -> FopenFlags {
    if keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
    } else {
        FopenFlags::FOPEN_NOFLUSH
    }
}

/// Open flags of a passthrough open (`direct`: reads and writes still come to the daemon).
fn passthrough_flags(direct: bool) -> FopenFlags {
    if direct {
        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH
    } else {
        FopenFlags::FOPEN_NOFLUSH
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
