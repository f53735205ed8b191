//! The union view, without FUSE: a stack of read-only lower directories under an optional
//! writable upper, seen as one tree.
//!
//! Layers are numbered top first: the upper (when present) is layer 0, then the lowers in the
//! order given. A directory's copies are where its parent's copies are plus its name, unless a
//! redirect on some copy sends the layers below elsewhere ([`redirect`]); such a directory's
//! node records its lower paths and `Union::lpath` finds any node's path in a lower layer
//! through its nearest such ancestor. A metacopy file ([`metacopy`]: metadata in the upper,
//! data below) records in its node where its data is; reads open that file, and the first
//! write copies the data up. Every access to a layer goes through that layer's root directory fd with
//! `openat2(RESOLVE_IN_ROOT|RESOLVE_NO_SYMLINKS)` or a `*_at` call on a single name, so nothing a
//! layer contains can lead layerfs outside it.
//!
//! Concurrency: `ns` is the namespace lock. Readers (lookup, getattr, open, readdir) hold it
//! shared while they turn a node into a path and use that path; every operation that changes
//! names in the upper (create, unlink, rename, the final step of a copy-up) holds it exclusively.
//! Slow work (copying file data up) runs without it. The inode table and each node have their
//! own short mutexes; the lock order is `ns`, then a node, then the table.

#![warn(clippy::significant_drop_in_scrutinee)]

mod copyup;
pub mod dirindex;
pub mod idmap;
pub mod inode;
pub mod metacopy;
pub mod origin;
pub mod redirect;
mod rename;
pub mod whiteout;
mod write;

pub use copyup::copy_data;
pub use write::{Caller, OpenFile, RENAME_EXCHANGE, RENAME_NOREPLACE, SetAttr};

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crate::error::{Error, Result, ShowPath};
use crate::sys::{self, FileStat, XTarget};
use dirindex::{DirIndex, Found, IndexBuilder, LayerListing, Top};
use inode::{Node, NodeState, ROOT_INO, Table};
use whiteout::{AufsName, DirMarks, WhiteoutFormat, XattrNs};

pub use inode::ROOT_INO as ROOT;

/// What to stack.
#[derive(Clone, Debug, Default)]
pub struct UnionConfig {
    /// Read-only layers, top first.
    pub lowers: Vec<PathBuf>,
    /// Writable layer and its work directory (same filesystem).
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Sync copied-up data and metadata before making it visible (off with `volatile`/`fsync=0`).
    pub fsync: bool,
    /// Rename lower and merged directories by recording a redirect (`-o redirect_dir=on`)
    /// instead of copying their trees up. Redirects found on disk are followed either way.
    pub redirect_dir: bool,
    /// Copy only the metadata of lower regular files where the data is not changed
    /// (`-o metacopy=on`, see [`metacopy`]); needs the trusted xattr namespace, as the
    /// kernel's does. Metacopy files found in the upper are read either way.
    pub metacopy: bool,
    /// The kernel's data-only lower layers (`lowerdir=a::d1::d2`), top first, below all
    /// `lowers`: never part of the merged tree, only where metacopy files' absolute data
    /// redirects may lead (see [`metacopy`]).
    pub data_lowers: Vec<PathBuf>,
}

/// One layer of the stack.
#[derive(Debug)]
pub struct Layer {
    pub root: OwnedFd,
    pub dev: u64,
    pub path: PathBuf,
    /// The uuid of the layer's filesystem, as recorded in origins (`None`: it has none, or
    /// the kernel does not say).
    pub uuid: Option<[u8; 16]>,
}

/// Attributes of a node as the mount shows them.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub st: FileStat,
}

pub use dirindex::{FIRST_NAME_OFFSET, Listed};

/// The xattr the kernel reads before writes, to drop file capabilities (killpriv).
const CAPS_XATTR: &[u8] = b"security.capability";

/// Entries of a listing checked against the directory index at a time by
/// [`Union::lookup_listed`].
const LOOKUP_CHUNK: usize = 256;

/// One entry of a readdirplus batch ([`Union::lookup_listed`]).
pub enum Listing<'a> {
    /// Looked up: the kernel gets a reference on it.
    Found(&'a Attr),
    /// Listed by name and inode number only, no reference taken.
    NameOnly(u64),
}

/// The union filesystem.
pub struct Union {
    layers: Vec<Layer>,
    upper: Option<u16>,
    /// `<workdir>/work`: staging area for atomic creation in the upper.
    work: Option<OwnedFd>,
    xattr_ns: XattrNs,
    wh_format: WhiteoutFormat,
    table: Mutex<Table>,
    ns: RwLock<()>,
    fsync: bool,
    tmp_seq: AtomicU64,
    /// Owner of what the daemon creates before any chown.
    own_uid: u32,
    own_gid: u32,
    /// Directory indexes in the order they were built, for dropping the least used.
    index_lru: Mutex<IndexLru>,
    index_clock: AtomicU64,
    /// Directories opened for name operations and lookups, kept between requests.
    dir_fds: DirFds,
    /// Origins may be looked up by file handle (`open_by_handle_at`); cleared at the first
    /// `EPERM` (the daemon lacks `CAP_DAC_READ_SEARCH`).
    handle_decode: AtomicBool,
    /// Write redirects when renaming lower and merged directories.
    redirect_dir: bool,
    /// Some node's lower copies are not at its path (a redirect was followed, or a directory
    /// renamed with a redirect): paths in lower layers must be found through the table
    /// ([`Union::lpath`]) instead of being the union path.
    redirects: AtomicBool,
    /// Copy metadata only where data is not changed (`-o metacopy=on`).
    metacopy: bool,
    /// Index of the first data-only layer (the number of layers when there is none): the
    /// merged tree is made of the layers before it.
    data_from: u16,
}

/// Open directory fds by (layer, path), so a request on a name (a lookup, a stat, a setattr)
/// spares the walk from the layer root (untar sends about eight requests per file to the same
/// parent).
///
/// Invariant: an entry is used only while `epoch` equals the value read before it was opened.
/// Every exclusive hold of the namespace lock (all creating, removing and renaming happens
/// under it) bumps the epoch when taken and when released, so an fd opened before or during
/// a change of which directory a path names is never used after it. Lower layers never change,
/// but share the rule for simplicity.
struct DirFds {
    epoch: AtomicU64,
    map: Mutex<DirFdMap>,
}

/// (layer, directory path) -> (epoch it was opened in, fd).
type DirFdMap = HashMap<(u16, Vec<u8>), (u64, Arc<OwnedFd>)>;

/// Directory fds `DirFds` keeps at most (then it starts over).
pub const DIR_FDS_MAX: usize = 256;

impl DirFds {
    fn new() -> Self {
        DirFds {
            epoch: AtomicU64::new(0),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn map(&self) -> MutexGuard<'_, DirFdMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(
        &self,
        layer: u16,
        path: &[u8],
        open: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> std::io::Result<Arc<OwnedFd>> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let key = (layer, path.to_vec());
        if let Some((at, fd)) = self.map().get(&key) {
            if *at == epoch {
                return Ok(fd.clone());
            }
        }
        let fd = Arc::new(open()?);
        let mut map = self.map();
        if map.len() >= DIR_FDS_MAX {
            map.clear();
        }
        map.insert(key, (epoch, fd.clone()));
        Ok(fd)
    }
}

/// The exclusive namespace lock; see [`DirFds`] for why taking and releasing it invalidates.
struct NsWrite<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    dir_fds: &'a DirFds,
}

impl Drop for NsWrite<'_> {
    fn drop(&mut self) {
        self.dir_fds.invalidate();
    }
}

/// Names all directory indexes may hold together before old ones are dropped (about 60 bytes
/// each): enough for every directory a build or a walk has in hand, bounded for huge trees.
const INDEX_BUDGET: usize = 32 * 1024;

/// A directory merged from at least this many layers has its copies listed in parallel.
const PARALLEL_LISTING_MIN_LAYERS: usize = 8;
/// Threads listing one directory's copies (I/O bound: more than the CPUs is fine).
const PARALLEL_LISTING_THREADS: usize = 8;

/// One layer's copy of a directory: its listing, whether it is opaque and its redirect xattr,
/// or `None` when the layer has no such directory.
type ListedLayer = std::io::Result<Option<(LayerListing, bool, Option<Vec<u8>>)>>;

/// What a layer holds under a name, for following a redirect.
enum Probe {
    Missing,
    Dir,
    /// A whiteout or a non-directory: the layers below are hidden.
    End,
}

/// The copies of a directory: (layer, its path in that layer), top first.
pub(crate) type Stack = Vec<(u16, Vec<u8>)>;

/// The copies of one directory in its layers, each opened on first use: a batch of names
/// (a readdirplus reply, a prefetch) opens every layer's copy once instead of once per name.
struct LayerDirs<'a> {
    union: &'a Union,
    /// The directory and its union path.
    ino: u64,
    path: &'a [u8],
    /// Layer, and its copy (`None`: it could not be opened; not tried again).
    open: Vec<(u16, Option<Arc<OwnedFd>>)>,
}

impl<'a> LayerDirs<'a> {
    fn new(union: &'a Union, ino: u64, path: &'a [u8]) -> Self {
        LayerDirs {
            union,
            ino,
            path,
            open: Vec::new(),
        }
    }

    fn get(&mut self, layer: u16) -> Option<BorrowedFd<'_>> {
        let at = match self.open.iter().position(|(l, _)| *l == layer) {
            Some(at) => at,
            None => {
                let lpath = self.union.lpath(self.ino, layer, self.path);
                let fd = self.union.dir_fd(layer, &lpath).ok();
                self.open.push((layer, fd));
                self.open.len() - 1
            }
        };
        self.open[at].1.as_ref().map(|fd| fd.as_fd())
    }
}

#[derive(Default)]
struct IndexLru {
    /// (directory, stamp when queued, names it held)
    queue: std::collections::VecDeque<(u64, u64, usize)>,
    total: usize,
}

/// Open flags passed through to the backing file. Not O_DIRECT: the daemon reads and writes
/// with buffers of its own, which O_DIRECT would require to be block-aligned (every read
/// failed with EINVAL), and the kernel already keeps such opens out of the FUSE page cache.
/// Passthrough I/O takes O_DIRECT from the caller's own file, not from this one.
const PASSED_OPEN_FLAGS: i32 =
    libc::O_APPEND | libc::O_NONBLOCK | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME;

fn enoent() -> Error {
    Error::os(libc::ENOENT)
}

/// Split `a/b/c` into (`a/b`, `c`); a single component has an empty parent.
pub fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// `parent/name` as one relative path.
pub fn join_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + name.len() + 1);
    p.extend_from_slice(parent);
    if !parent.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// `d_type` of a mode.
pub fn dtype_of(mode: u32) -> u8 {
    match mode & sys::S_IFMT {
        sys::S_IFDIR => sys::DT_DIR,
        sys::S_IFREG => sys::DT_REG,
        sys::S_IFLNK => sys::DT_LNK,
        sys::S_IFCHR => sys::DT_CHR,
        sys::S_IFBLK => sys::DT_BLK,
        sys::S_IFIFO => sys::DT_FIFO,
        sys::S_IFSOCK => sys::DT_SOCK,
        _ => sys::DT_UNKNOWN,
    }
}

fn is_missing(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

impl Union {
    /// Open every layer, check the stack is usable, clean the work directory.
    pub fn new(config: &UnionConfig) -> Result<Union> {
        let mut layers = Vec::new();
        let mut upper = None;
        let mut work = None;
        let open_layer = |path: &Path, what: &str| -> Result<Layer> {
            let root = sys::open_dir_path(path)
                .map_err(|e| Error::io(format!("{what} directory {}", path.display()), e))?;
            let st = sys::fstat(root.as_fd())
                .map_err(|e| Error::io(format!("{what} directory {}", path.display()), e))?;
            let uuid = sys::fs_uuid(root.as_fd());
            Ok(Layer {
                root,
                dev: st.dev,
                path: path.to_path_buf(),
                uuid,
            })
        };
        if let Some((up, wk)) = &config.upper {
            let layer = open_layer(up, "upper")?;
            let workdir = sys::open_dir_path(wk)
                .map_err(|e| Error::io(format!("work directory {}", wk.display()), e))?;
            let wst = sys::fstat(workdir.as_fd())
                .map_err(|e| Error::io(format!("work directory {}", wk.display()), e))?;
            if wst.dev != layer.dev {
                return Err(Error::invalid(format!(
                    "work directory {} is not on the same filesystem as upper directory {}",
                    wk.display(),
                    up.display()
                )));
            }
            let ust = sys::fstat(layer.root.as_fd())?;
            if ust.ino == wst.ino {
                return Err(Error::invalid(format!(
                    "work directory {} and upper directory {} are the same directory",
                    wk.display(),
                    up.display()
                )));
            }
            work = Some(
                prepare_workdir(workdir.as_fd())
                    .map_err(|e| Error::io(format!("work directory {}", wk.display()), e))?,
            );
            upper = Some(0u16);
            layers.push(layer);
        }
        for lower in &config.lowers {
            layers.push(open_layer(lower, "lower")?);
        }
        let data_from = layers.len();
        if !config.data_lowers.is_empty() && config.lowers.is_empty() {
            return Err(Error::invalid(
                "data-only lower layers need at least one lower layer above them",
            ));
        }
        for lower in &config.data_lowers {
            layers.push(open_layer(lower, "data-only lower")?);
        }
        if layers.is_empty() {
            return Err(Error::invalid(
                "no layers: give at least one lower directory",
            ));
        }
        if layers.len() > u16::MAX as usize {
            return Err(Error::invalid("too many layers"));
        }
        let (xattr_ns, wh_format) = match &work {
            Some(w) => probe_formats(w.as_fd()),
            None => (
                if sys::geteuid() == 0 {
                    XattrNs::Trusted
                } else {
                    XattrNs::User
                },
                WhiteoutFormat::CharDev,
            ),
        };
        if config.metacopy && xattr_ns == XattrNs::User {
            // The kernel refuses `userxattr,metacopy=on` too: an unprivileged upper with
            // metacopy files would be one no kernel mounts.
            return Err(Error::invalid(
                "metacopy=on needs trusted xattrs (the kernel refuses metacopy=on with \
                 userxattr), which this mount cannot write: mount without metacopy=on",
            ));
        }
        if let (Some(up), Some(_)) = (upper, &work) {
            init_upper_uuid(layers[up as usize].root.as_fd(), xattr_ns);
        }
        let top = &layers[0];
        let root_st = sys::fstat(top.root.as_fd())?;
        let root = Node::new(
            ROOT_INO,
            NodeState {
                kind: sys::S_IFDIR,
                layer: 0,
                merge: (0..data_from as u16).collect(),
                merge_cut: true,
                backing: (root_st.dev, root_st.ino),
                index: None,
                unlinked: false,
                orphan: None,
                no_xattrs: false,
                no_caps: false,
                xattr_epoch: 0,
                index_stamp: 0,
                lpaths: None,
                data: None,
            },
        );
        let mut table = Table::new(root, (root_st.dev, root_st.ino));
        for l in &layers {
            table.inos.register(l.dev);
        }
        log::info!(
            "union of {} layers (upper: {}), xattrs {:?}, whiteouts {:?}",
            layers.len(),
            upper.is_some(),
            xattr_ns,
            wh_format
        );
        Ok(Union {
            layers,
            upper,
            work,
            xattr_ns,
            wh_format,
            table: Mutex::new(table),
            ns: RwLock::new(()),
            fsync: config.fsync,
            tmp_seq: AtomicU64::new(0),
            own_uid: sys::geteuid(),
            own_gid: sys::getegid(),
            index_lru: Mutex::new(IndexLru::default()),
            index_clock: AtomicU64::new(1),
            dir_fds: DirFds::new(),
            handle_decode: AtomicBool::new(true),
            redirect_dir: config.redirect_dir,
            redirects: AtomicBool::new(false),
            metacopy: config.metacopy,
            data_from: data_from as u16,
        })
    }

    /// A read-only union of `upper` over `lowers` (top first), for tools that need an upper's
    /// merged view without mounting it (`diff` of an upper with redirects). The upper is read
    /// as a mount reads it (its whiteouts, markers and redirects, a `.wh.` name a plain file)
    /// but never written: no work directory is needed or touched, and every write fails with
    /// EROFS.
    pub fn read_only_upper(upper: &Path, lowers: &[PathBuf]) -> Result<Union> {
        let mut stack = vec![upper.to_path_buf()];
        stack.extend(lowers.iter().cloned());
        let mut union = Union::new(&UnionConfig {
            lowers: stack,
            ..UnionConfig::default()
        })?;
        union.upper = Some(0);
        // Read metacopy files in every layer, as a metacopy=on mount does (it never writes).
        union.metacopy = true;
        Ok(union)
    }

    /// Layer roots, top first (for checks such as "is the mountpoint inside a layer").
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Whether the union has a writable upper.
    pub fn is_writable(&self) -> bool {
        self.upper.is_some() && self.work.is_some()
    }

    fn read_ns(&self) -> RwLockReadGuard<'_, ()> {
        self.ns.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_ns(&self) -> NsWrite<'_> {
        let guard = self.ns.write().unwrap_or_else(|p| p.into_inner());
        self.dir_fds.invalidate();
        NsWrite {
            _guard: guard,
            dir_fds: &self.dir_fds,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn root_fd(&self, layer: u16) -> BorrowedFd<'_> {
        self.layers[layer as usize].root.as_fd()
    }

    fn node(&self, ino: u64) -> Result<Arc<Node>> {
        self.table()
            .get(ino)
            .cloned()
            .ok_or_else(|| Error::os(libc::ESTALE))
    }

    /// Node and its current path (`ENOENT` once it has no name left).
    fn node_path(&self, ino: u64) -> Result<(Arc<Node>, Vec<u8>)> {
        let t = self.table();
        let node = t.get(ino).cloned().ok_or_else(|| Error::os(libc::ESTALE))?;
        let path = t.path(ino).ok_or_else(enoent)?;
        Ok((node, path))
    }

    /// Open the directory `path` of `layer`.
    fn open_dir_in(&self, layer: u16, path: &[u8]) -> std::io::Result<OwnedFd> {
        sys::open_dir_beneath(self.root_fd(layer), path)
    }

    /// Run `f` on the parent directory fd and final name of `path` in `layer`. For the layer
    /// root the name is empty and the fd is the root itself.
    fn at<T>(
        &self,
        layer: u16,
        path: &[u8],
        f: impl FnOnce(BorrowedFd<'_>, &[u8]) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        if path.is_empty() {
            return f(self.root_fd(layer), b"");
        }
        let (dir, name) = split_path(path);
        if dir.is_empty() {
            return f(self.root_fd(layer), name);
        }
        let dfd = self.dir_fd(layer, dir)?;
        f(dfd.as_fd(), name)
    }

    /// The directory `path` of `layer`, from the kept descriptors when it is there. It names
    /// `path` for as long as the namespace lock is held (see [`DirFds`]); used later, it may only
    /// fill caches (as `warm_dir` does).
    fn dir_fd(&self, layer: u16, path: &[u8]) -> std::io::Result<Arc<OwnedFd>> {
        self.dir_fds
            .get(layer, path, || self.open_dir_in(layer, path))
    }

    /// xattr target for `name` in `dir`, or the directory itself when `name` is empty.
    fn xtarget<'a>(dir: BorrowedFd<'a>, name: &'a [u8]) -> XTarget<'a> {
        if name.is_empty() {
            XTarget::Fd(dir)
        } else {
            XTarget::At(dir, name)
        }
    }

    /// Opaque/xwhiteout markers of an open directory, in every dialect, and its redirect xattr
    /// as it is (trusted first, then user: the kernel reads the one of its mode; a layer
    /// carries one or the other).
    fn dir_marks_redirect(dir: BorrowedFd<'_>) -> std::io::Result<(DirMarks, Option<Vec<u8>>)> {
        let mut marks = DirMarks::default();
        let names = sys::xattr_list(XTarget::Fd(dir))?;
        let mut redirect = None;
        for attr in [redirect::TRUSTED_REDIRECT, redirect::USER_REDIRECT] {
            if redirect.is_none() && names.iter().any(|n| n == attr) {
                redirect = sys::xattr_get(XTarget::Fd(dir), attr)?;
            }
        }
        for attr in [
            whiteout::TRUSTED_OPAQUE,
            whiteout::USER_OPAQUE,
            whiteout::FUSEOVERLAYFS_OPAQUE,
        ] {
            if names.iter().any(|n| n == attr) {
                if let Some(v) = sys::xattr_get(XTarget::Fd(dir), attr)? {
                    let m = whiteout::opaque_value(&v);
                    marks.opaque |= m.opaque;
                    marks.xwhiteouts |= m.xwhiteouts;
                }
            }
        }
        Ok((marks, redirect))
    }

    /// A zero-size regular file carrying an overlay whiteout xattr.
    fn is_xattr_whiteout(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<bool> {
        let st = sys::stat_at(dir, name)?;
        if !st.is_reg() || st.size != 0 {
            return Ok(false);
        }
        for attr in [whiteout::TRUSTED_WHITEOUT, whiteout::USER_WHITEOUT] {
            if sys::xattr_get(XTarget::At(dir, name), attr)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Read one layer's copy of a directory and classify its entries. Returns the listing and
    /// whether this copy is opaque.
    fn list_layer(&self, layer: u16, path: &[u8]) -> ListedLayer {
        let fd = match self.open_dir_in(layer, path) {
            Ok(fd) => fd,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let is_upper = Some(layer) == self.upper;
        let (marks, redirect) = Self::dir_marks_redirect(fd.as_fd())?;
        let mut opaque = marks.opaque;
        let mut reader = sys::DirReader::new(fd)?;
        let mut real: Vec<(Box<[u8]>, Found)> = Vec::new();
        let mut whiteouts: Vec<Box<[u8]>> = Vec::new();
        while let Some(e) = reader.next_entry()? {
            if !is_upper {
                match whiteout::classify_aufs(&e.name) {
                    AufsName::Opaque => {
                        opaque = true;
                        continue;
                    }
                    AufsName::Whiteout(target) => {
                        whiteouts.push(target.into());
                        continue;
                    }
                    AufsName::Internal => continue,
                    AufsName::Plain => {}
                }
            }
            let mut dtype = e.dtype;
            if dtype == sys::DT_UNKNOWN {
                dtype = dtype_of(sys::stat_at(reader.fd(), &e.name)?.mode);
            }
            if dtype == sys::DT_CHR {
                let st = sys::stat_at(reader.fd(), &e.name)?;
                if st.rdev == 0 {
                    whiteouts.push(e.name.into_boxed_slice());
                    continue;
                }
            }
            if dtype == sys::DT_REG
                && marks.xwhiteouts
                && Self::is_xattr_whiteout(reader.fd(), &e.name)?
            {
                whiteouts.push(e.name.into_boxed_slice());
                continue;
            }
            real.push((e.name.into_boxed_slice(), Found::Real(dtype, e.ino)));
        }
        if !whiteouts.is_empty() {
            let names: HashSet<&[u8]> = real.iter().map(|(n, _)| &**n).collect();
            let hidden: Vec<_> = whiteouts
                .into_iter()
                .filter(|n| !names.contains(&**n))
                .map(|n| (n, Found::Whiteout))
                .collect();
            real.extend(hidden);
        }
        Ok(Some((
            LayerListing {
                layer,
                entries: real,
            },
            opaque,
            redirect,
        )))
    }

    /// Build the merged index of a directory from its copies in `stack` (top first), as the
    /// kernel's lookup finds them: the first opaque copy ends the stack, and a copy carrying a
    /// redirect replaces the copies below it by those the redirect names ([`Self::resolve`];
    /// `parent` gives the parent directory's copies, for a relative one). Returns the index and
    /// the copies it merged, and whether a redirect was followed.
    fn build_index_stack(
        &self,
        stack: Stack,
        parent: &dyn Fn() -> Result<Stack>,
    ) -> Result<(DirIndex, Stack, bool)> {
        let mut builder = IndexBuilder::new(self.upper);
        let mut used: Stack = Vec::with_capacity(stack.len());
        let mut listings = self.list_layers(&stack).into_iter();
        let mut pending: std::collections::VecDeque<(u16, Vec<u8>)> = stack.into();
        let mut followed = false;
        let last_layer = self.data_from.saturating_sub(1);
        while let Some((layer, path)) = pending.pop_front() {
            let listed = match listings.next() {
                Some(l) => l,
                None => self.list_layer(layer, &path),
            };
            let Some((listing, opaque, redirect)) = listed
                .map_err(|e| Error::io(format!("reading directory {}", ShowPath(&path)), e))?
            else {
                continue;
            };
            builder.add_layer(listing);
            used.push((layer, path));
            if opaque {
                break;
            }
            let Some(value) = redirect.filter(|_| layer < last_layer) else {
                continue;
            };
            let (_, path) = &used[used.len() - 1];
            let target = redirect::parse(&value).map_err(|bad| {
                log::warn!(
                    "layer {}: directory {}: bad overlay.redirect \"{}\": {bad}",
                    self.layers[layer as usize].path.display(),
                    ShowPath(path),
                    ShowPath(&value)
                );
                Error::os(libc::EIO)
            })?;
            pending = self.resolve(layer, &target, parent)?.into();
            // Listings made ahead were of the copies the redirect replaces.
            listings = Vec::new().into_iter();
            followed = true;
            self.redirects.store(true, Ordering::Release);
        }
        Ok((builder.finish(), used, followed))
    }

    /// The copies of a directory below `layer` that redirect `target` (found on its copy in
    /// `layer`) names: for a relative one, the name in each of the parent's copies below
    /// `layer`; for an absolute one, the path walked from the root of every layer below, one
    /// component at a time (a whiteout or non-directory on the way ends the stack, an opaque
    /// directory ends it after this layer, a redirect on the way changes the path for the
    /// layers below). A non-directory or whiteout at the end ends the stack too; a layer
    /// without the path is skipped.
    fn resolve(
        &self,
        layer: u16,
        target: &redirect::Redirect,
        parent: &dyn Fn() -> Result<Stack>,
    ) -> Result<Stack> {
        let mut out = Stack::new();
        match target {
            redirect::Redirect::Relative(name) => {
                for (l, ppath) in parent()?.into_iter().filter(|(l, _)| *l > layer) {
                    let Ok(dfd) = self.dir_fd(l, &ppath) else {
                        continue;
                    };
                    match self.probe(l, dfd.as_fd(), name)? {
                        Probe::Missing => {}
                        Probe::Dir => out.push((l, join_path(&ppath, name))),
                        Probe::End => break,
                    }
                }
            }
            redirect::Redirect::Absolute(parts) => {
                let mut parts = parts.clone();
                'layers: for l in layer + 1..self.data_from {
                    let walk = parts.clone();
                    let mut dir = self.layers[l as usize].root.try_clone()?;
                    let mut stop_after = false;
                    for (k, comp) in walk.iter().enumerate() {
                        match self.probe(l, dir.as_fd(), comp)? {
                            Probe::Missing => continue 'layers,
                            Probe::End => break 'layers,
                            Probe::Dir => {}
                        }
                        if k + 1 == walk.len() {
                            out.push((l, redirect::absolute_path(&walk)));
                            break;
                        }
                        dir = sys::open_dir_beneath(dir.as_fd(), comp)?;
                        let (marks, inner) = Self::dir_marks_redirect(dir.as_fd())?;
                        if marks.opaque
                            || (l != self.upper.unwrap_or(u16::MAX)
                                && sys::stat_at_opt(dir.as_fd(), whiteout::WH_OPAQUE)?.is_some())
                        {
                            stop_after = true;
                        }
                        if let Some(value) = inner {
                            let rest = walk[k + 1..].to_vec();
                            parts = match redirect::parse(&value) {
                                Ok(redirect::Redirect::Absolute(p)) => p,
                                Ok(redirect::Redirect::Relative(n)) => {
                                    let mut p = walk[..k].to_vec();
                                    p.push(n);
                                    p
                                }
                                Err(bad) => {
                                    log::warn!(
                                        "layer {}: bad overlay.redirect \"{}\": {bad}",
                                        self.layers[l as usize].path.display(),
                                        ShowPath(&value)
                                    );
                                    return Err(Error::os(libc::EIO));
                                }
                            };
                            parts.extend(rest);
                            if parts.iter().map(|p| p.len() + 1).sum::<usize>() > redirect::MAX_LEN
                            {
                                return Err(Error::os(libc::EIO));
                            }
                        }
                    }
                    if stop_after {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// What layer `layer`'s directory `dir` holds under `name`, for following a redirect.
    fn probe(&self, layer: u16, dir: BorrowedFd<'_>, name: &[u8]) -> Result<Probe> {
        if Some(layer) != self.upper {
            let mut wh = whiteout::WH_PREFIX.to_vec();
            wh.extend_from_slice(name);
            if name.len() + whiteout::WH_PREFIX.len() <= sys::NAME_MAX
                && sys::stat_at_opt(dir, &wh)?.is_some()
            {
                return Ok(Probe::End);
            }
        }
        let Some(st) = sys::stat_at_opt(dir, name)? else {
            return Ok(Probe::Missing);
        };
        if st.is_dir() {
            return Ok(Probe::Dir);
        }
        Ok(Probe::End)
    }

    /// The copies of directory `ino` (union path `path`) in the layers of `merge`.
    fn node_stack(&self, ino: u64, merge: &[u16], path: &[u8]) -> Stack {
        merge
            .iter()
            .map(|&l| (l, self.lpath(ino, l, path)))
            .collect()
    }

    /// The copies of the parent of `ino` (for a relative redirect on `ino`).
    fn parent_stack(&self, ino: u64) -> Result<Stack> {
        let (parent, pnode, ppath) = {
            let t = self.table();
            let parent = t.parent(ino).ok_or_else(enoent)?;
            let pnode = t.get(parent).cloned().ok_or_else(enoent)?;
            (parent, pnode, t.path(parent).ok_or_else(enoent)?)
        };
        let merge = pnode.lock().merge.clone();
        Ok(self.node_stack(parent, &merge, &ppath))
    }

    /// The path of node `ino` (union path `path`) in `layer`: the union path itself in the
    /// upper and while no redirect is in play; otherwise the path recorded on the nearest
    /// ancestor (or the node) whose copies were redirected, followed by the names below it.
    fn lpath(&self, ino: u64, layer: u16, path: &[u8]) -> Vec<u8> {
        if Some(layer) == self.upper || !self.redirects.load(Ordering::Acquire) {
            return path.to_vec();
        }
        let nodes: Vec<(Arc<Node>, Vec<u8>)> = {
            let t = self.table();
            let mut nodes = Vec::new();
            let mut cur = ino;
            while cur != ROOT_INO {
                let (Some(node), Some((parent, name))) = (t.get(cur), t.first_link(cur)) else {
                    return path.to_vec();
                };
                nodes.push((node.clone(), name.to_vec()));
                cur = parent;
                if nodes.len() > 4096 {
                    return path.to_vec();
                }
            }
            nodes
        };
        let mut names: Vec<&[u8]> = Vec::new();
        let mut base: Vec<u8> = Vec::new();
        for (node, name) in &nodes {
            let s = node.lock();
            if let Some(p) = s
                .lpaths
                .as_ref()
                .and_then(|p| p.iter().find(|(l, _)| *l == layer))
            {
                base = p.1.to_vec();
                break;
            }
            drop(s);
            names.push(name);
        }
        for n in names.iter().rev() {
            base = join_path(&base, n);
        }
        base
    }

    /// For a deep stack, list the copies of a directory in every layer of `merge` at once, on
    /// several threads: on a cold cache each listing is a few dependent disk reads, and a
    /// hundred of them one after the other is what makes the first lookup in a directory of a
    /// deep image slow. Returns the listings in `merge` order, or nothing for a shallow stack
    /// (the caller lists those itself: threads would cost more than they save). Listings below
    /// an opaque copy are read for nothing and dropped by the caller.
    fn list_layers(&self, merge: &[(u16, Vec<u8>)]) -> Vec<ListedLayer> {
        if merge.len() < PARALLEL_LISTING_MIN_LAYERS {
            return Vec::new();
        }
        let workers = (merge.len() / 4).clamp(2, PARALLEL_LISTING_THREADS);
        let next = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<ListedLayer>>> =
            merge.iter().map(|_| Mutex::new(None)).collect();
        let spawned = std::thread::scope(|scope| {
            let work = || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((layer, path)) = merge.get(i) else {
                        break;
                    };
                    let listed = self.list_layer(*layer, path);
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(listed);
                }
            };
            let mut started = 0;
            for _ in 1..workers {
                let ok = std::thread::Builder::new()
                    .name("layerfs-list".into())
                    .spawn_scoped(scope, work)
                    .is_ok();
                started += usize::from(ok);
            }
            // This thread takes its share too (and all of it if no thread could start).
            work();
            started
        });
        log::trace!(
            "listed {} layers of {} on {} threads",
            merge.len(),
            ShowPath(&merge[0].1),
            spawned + 1
        );
        slots
            .into_iter()
            .map_while(|slot| slot.into_inner().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Run `f` on the node's directory index, building it first if needed.
    fn with_index<T>(
        &self,
        node: &Node,
        path: &[u8],
        f: impl FnOnce(&mut DirIndex) -> T,
    ) -> Result<T> {
        let stamp = self.index_clock.fetch_add(1, Ordering::Relaxed);
        let mut built = None;
        // Built without the node's lock: finding the copies' paths locks the node's ancestors
        // and the node itself. Changes of `merge` run under the exclusive namespace lock, which
        // every caller excludes.
        let merge = {
            let st = node.lock();
            if st.kind != sys::S_IFDIR {
                return Err(Error::os(libc::ENOTDIR));
            }
            st.index.is_none().then(|| st.merge.clone())
        };
        let fresh = match merge {
            Some(merge) => {
                let stack = self.node_stack(node.ino, &merge, path);
                Some(self.build_index_stack(stack, &|| self.parent_stack(node.ino))?)
            }
            None => None,
        };
        let out = {
            let mut st = node.lock();
            if let (Some((idx, used, followed)), true) = (fresh, st.index.is_none()) {
                built = Some(idx.entry_count());
                st.index = Some(Box::new(idx));
                st.merge = used.iter().map(|(l, _)| *l).collect();
                if followed {
                    st.lpaths = Some(
                        used.into_iter()
                            .filter(|(l, _)| Some(*l) != self.upper)
                            .map(|(l, p)| (l, p.into_boxed_slice()))
                            .collect(),
                    );
                }
                st.merge_cut = true;
            }
            st.index_stamp = stamp;
            match st.index.as_mut() {
                Some(idx) => f(idx),
                None => return Err(Error::os(libc::EIO)),
            }
        };
        if let Some(size) = built {
            self.track_index(node.ino, stamp, size);
        }
        Ok(out)
    }

    /// Account for a new directory index and drop the least recently used ones while the
    /// indexes together hold more than [`INDEX_BUDGET`] names. A dropped index is rebuilt from
    /// the layers when next needed (the layers are the truth; the index only caches them).
    fn track_index(&self, ino: u64, stamp: u64, size: usize) {
        let mut lru = self.index_lru.lock().unwrap_or_else(|p| p.into_inner());
        lru.total += size;
        lru.queue.push_back((ino, stamp, size));
        // Second chance: an index used since it was queued goes to the back again, once.
        let mut budget = 2 * lru.queue.len();
        while lru.total > INDEX_BUDGET && budget > 1 {
            budget -= 1;
            let Some((victim, queued_at, n)) = lru.queue.pop_front() else {
                break;
            };
            let node = self.table().get(victim).cloned();
            let Some(node) = node else {
                lru.total -= n;
                continue;
            };
            let Ok(mut st) = node.state.try_lock() else {
                lru.queue.push_back((victim, queued_at, n));
                continue;
            };
            if st.index.is_none() {
                lru.total -= n;
            } else if st.index_stamp > queued_at && victim != ino {
                let at = st.index_stamp;
                drop(st);
                lru.queue.push_back((victim, at, n));
            } else if victim != ino {
                st.index = None;
                lru.total -= n;
            } else {
                drop(st);
                lru.queue.push_back((victim, queued_at, n));
            }
        }
    }

    /// Turn a visible name into a node: stat it in its layer, find or make its node and count
    /// one kernel lookup.
    fn materialize(
        &self,
        parent: u64,
        parent_path: &[u8],
        name: &[u8],
        top: Top,
        dir_layers: &[u16],
    ) -> Result<Attr> {
        let dfd = self
            .dir_fd(top.layer, &self.lpath(parent, top.layer, parent_path))
            .map_err(|e| Error::io(format!("lookup {}", ShowPath(parent_path)), e))?;
        self.materialize_in(dfd.as_fd(), parent, parent_path, name, top, dir_layers)
    }

    /// [`Self::materialize`] with the parent's copy in `top.layer` already open as `dfd`.
    fn materialize_in(
        &self,
        dfd: BorrowedFd<'_>,
        parent: u64,
        parent_path: &[u8],
        name: &[u8],
        top: Top,
        dir_layers: &[u16],
    ) -> Result<Attr> {
        let st = sys::stat_at(dfd, name)?;
        let in_upper = Some(top.layer) == self.upper;
        // An upper object's xattr names, listed once: its origin and metacopy marker are read
        // only when there (a file made through the mount has none: one system call instead of
        // a read per name).
        let present = if in_upper {
            sys::xattr_list(XTarget::At(dfd, name)).ok()
        } else {
            None
        };
        // Metacopy files: the upper's always (only a metacopy=on mount writes them), a lower
        // layer's with metacopy=on or data-only layers, as the kernel follows them only then
        // (and a lookup of a lower file costs no xattr read otherwise).
        let data = if st.is_reg() && (in_upper || self.metacopy || self.has_data_layers()) {
            self.metacopy_data(
                dfd,
                top.layer,
                parent,
                parent_path,
                name,
                present.as_deref(),
            )?
        } else {
            None
        };
        // A metacopy file of the upper shows the number of the lower file it was copied from
        // (found looking for its data, as the kernel finds it), unless that has other links.
        let origin = match &data {
            _ if !in_upper => None,
            Some(d) if d.first_nlink <= 1 => self.table().inos.map(d.first.0, d.first.1),
            Some(_) => None,
            None => self.origin_ino(dfd, parent, parent_path, name, &st, present.as_deref()),
        };
        // Opaque markers of the directory's lower copies are applied when its index is built,
        // so a lookup reads only the one layer the object comes from.
        let merge = if st.is_dir() {
            dir_layers.to_vec()
        } else {
            Vec::new()
        };
        let merge_cut = merge.len() <= 1;
        let node = {
            let mut t = self.table();
            let preferred = origin.or_else(|| t.inos.map(st.dev, st.ino));
            t.lookup(parent, name, (st.dev, st.ino), preferred, |ino| {
                Node::new(
                    ino,
                    NodeState {
                        kind: st.file_type(),
                        layer: top.layer,
                        merge: merge.into_boxed_slice(),
                        merge_cut,
                        backing: (st.dev, st.ino),
                        index: None,
                        unlinked: false,
                        orphan: None,
                        no_xattrs: false,
                        no_caps: false,
                        xattr_epoch: 0,
                        index_stamp: 0,
                        lpaths: None,
                        data: data.map(Box::new),
                    },
                )
            })
        };
        Ok(self.attr_of(&node, st))
    }

    /// Apply the union's view to raw attributes: merged directories report one link (as
    /// kernel overlayfs does; also while it is not yet known whether an opaque copy ends the
    /// stack: one link is what tells `find` not to count subdirectories), unlinked nodes none,
    /// metacopy files the blocks of their data (as the kernel does: the upper file has none).
    fn attr_of(&self, node: &Node, mut st: FileStat) -> Attr {
        let s = node.lock();
        if s.kind == sys::S_IFDIR && s.merge.len() > 1 {
            st.nlink = 1;
        }
        if let Some(d) = &s.data {
            st.blocks = d.blocks;
        }
        if s.unlinked {
            st.nlink = 0;
        }
        Attr { ino: node.ino, st }
    }

    // -----------------------------------------------------------------------------------------
    // Read operations

    /// Look `name` up in directory `parent`; counts one kernel reference on success.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > sys::NAME_MAX {
            return Err(Error::os(libc::ENAMETOOLONG));
        }
        if name.is_empty() || name.contains(&b'/') {
            return Err(Error::os(libc::EINVAL));
        }
        if name == b"." || name == b".." {
            return Err(enoent());
        }
        let _ns = self.read_ns();
        let (pnode, ppath) = self.node_path(parent)?;
        let found = self.with_index(&pnode, &ppath, |idx| {
            idx.visible(name).map(|(t, d)| (t, d.to_vec()))
        })?;
        let (top, dir_layers) = found.ok_or_else(enoent)?;
        self.materialize(parent, &ppath, name, top, &dir_layers)
    }

    /// Look up every entry of a listing slice of directory `parent` (readdirplus), handing
    /// each found one to `take`; stops when `take` returns `false` (the entry it was given is
    /// then not counted as a kernel reference). Each layer's copy of the directory is opened
    /// once for the whole batch instead of once per name. Entries gone since the listing was
    /// taken are skipped, as a concurrent unlink would make them.
    ///
    /// Once `deadline` (if any) has passed, the remaining entries are handed over as
    /// [`Listing::NameOnly`], without a lookup: on a cold directory each lookup may wait for
    /// the disk, and a caller that only wants names should not wait for thousands of them.
    pub fn lookup_listed(
        &self,
        parent: u64,
        entries: &[Listed],
        deadline: Option<Instant>,
        mut take: impl FnMut(&Listed, Listing<'_>) -> bool,
    ) -> Result<()> {
        let _ns = self.read_ns();
        let (pnode, ppath) = self.node_path(parent)?;
        let mut dirs = LayerDirs::new(self, parent, &ppath);
        let mut in_time = true;
        // A reply holds a few hundred entries while `entries` runs to the end of the listing:
        // checked against the index a chunk at a time, so a listing read in many batches
        // does not cost the square of its size.
        for chunk in entries.chunks(LOOKUP_CHUNK) {
            let found: Vec<_> = self.with_index(&pnode, &ppath, |idx| {
                chunk
                    .iter()
                    .filter_map(|e| idx.visible(&e.name).map(|(t, d)| (e, t, d.to_vec())))
                    .collect()
            })?;
            for (entry, top, dir_layers) in found {
                if in_time && deadline.is_some_and(|d| Instant::now() >= d) {
                    in_time = false;
                }
                if !in_time {
                    let Ok(ino) = self.entry_ino_in(parent, &ppath, entry) else {
                        continue;
                    };
                    if !take(entry, Listing::NameOnly(ino)) {
                        return Ok(());
                    }
                    continue;
                }
                let Some(dfd) = dirs.get(top.layer) else {
                    continue;
                };
                let attr =
                    match self.materialize_in(dfd, parent, &ppath, &entry.name, top, &dir_layers) {
                        Ok(attr) => attr,
                        Err(e) if e.is(libc::ENOENT) => continue,
                        // Listed by name, as the kernel lists it: its lookup gives the error (a
                        // metacopy file without its data, one the mount may not follow).
                        Err(_) => match self.entry_ino_in(parent, &ppath, entry) {
                            Ok(ino) if !take(entry, Listing::NameOnly(ino)) => return Ok(()),
                            _ => continue,
                        },
                    };
                if !take(entry, Listing::Found(&attr)) {
                    self.forget(attr.ino, 1);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Get directory `ino` ready before it is read: build its index and bring the inodes of up
    /// to `max_entries` of its entries into the kernel's caches, so the readdirplus that comes
    /// next finds them in memory. For a prefetch thread: work done here is what a request would
    /// otherwise do on the event loop. Returns `false` when there was nothing to do (the index
    /// was there already, or the node is gone).
    pub fn warm_dir(&self, ino: u64, max_entries: usize) -> bool {
        let (path, listed) = {
            let _ns = self.read_ns();
            let Ok((node, path)) = self.node_path(ino) else {
                return false;
            };
            {
                let st = node.lock();
                if st.kind != sys::S_IFDIR || st.index.is_some() {
                    return false;
                }
            }
            match self.with_index(&node, &path, |idx| idx.sorted()) {
                Ok(listed) => (path, listed),
                Err(_) => return false,
            }
        };
        // Outside the namespace lock: only caches are touched, and a rename in between only
        // makes a stat miss.
        let mut dirs = LayerDirs::new(self, ino, &path);
        for entry in listed.iter().take(max_entries) {
            if let Some(dfd) = dirs.get(entry.top.layer) {
                let _ = sys::stat_at(dfd, &entry.name);
            }
        }
        true
    }

    /// The kernel dropped `n` references to `ino`; returns how many nodes were freed.
    pub fn forget(&self, ino: u64, n: u64) -> usize {
        self.table().forget(ino, n)
    }

    /// Attributes of a node, from its current backing object.
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let _ns = self.read_ns();
        let (node, path) = match self.node_path(ino) {
            Ok(found) => found,
            Err(e) => {
                // No name left: the object is reached through the descriptor kept at unlink.
                let node = self.node(ino)?;
                let orphan = node.lock().orphan.clone();
                let Some(fd) = orphan else {
                    return Err(e);
                };
                let st = sys::fstat(fd.as_fd())?;
                return Ok(self.attr_of(&node, st));
            }
        };
        let layer = node.lock().layer;
        let st = self.at(layer, &self.lpath(ino, layer, &path), sys::stat_at)?;
        Ok(self.attr_of(&node, st))
    }

    /// Attributes through an open descriptor (fstat of an unlinked file).
    pub fn getattr_fd(&self, ino: u64, fd: BorrowedFd<'_>) -> Result<Attr> {
        let node = self.node(ino)?;
        if node.lock().data.is_some() {
            // The descriptor is the lower data's; the metadata is the upper file's.
            return self.getattr(ino);
        }
        let st = sys::fstat(fd)?;
        Ok(self.attr_of(&node, st))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let _ns = self.read_ns();
        let (node, path) = self.node_path(ino)?;
        let layer = node.lock().layer;
        Ok(self.at(layer, &self.lpath(ino, layer, &path), sys::readlink_at)?)
    }

    /// The directory's entries in readdir order and the position of the first one after
    /// `offset` (offsets are name hashes: no per-open state). When the position is the end,
    /// the cached order is dropped: the kernel has read the whole listing.
    pub fn read_dir(&self, ino: u64, offset: u64) -> Result<(Arc<Vec<Listed>>, usize)> {
        let _ns = self.read_ns();
        let (node, path) = self.node_path(ino)?;
        self.with_index(&node, &path, |idx| {
            let sorted = idx.sorted();
            let start = sorted.partition_point(|e| e.offset <= offset);
            if start >= sorted.len() {
                idx.drop_sorted();
            }
            (sorted, start)
        })
    }

    /// Inode number of a directory entry without counting a lookup (plain readdir).
    pub fn entry_ino(&self, parent: u64, entry: &Listed) -> Result<u64> {
        if let Some(ino) = self.entry_ino_known(parent, entry) {
            return Ok(ino);
        }
        let _ns = self.read_ns();
        let ppath = self.table().path(parent).ok_or_else(enoent)?;
        self.entry_ino_upper(parent, &ppath, entry)
    }

    /// [`Union::entry_ino`] with the namespace lock held by the caller; `ppath` is the path
    /// of `parent`.
    fn entry_ino_in(&self, parent: u64, ppath: &[u8], entry: &Listed) -> Result<u64> {
        match self.entry_ino_known(parent, entry) {
            Some(ino) => Ok(ino),
            None => self.entry_ino_upper(parent, ppath, entry),
        }
    }

    /// The number of an entry when it needs no stat: a node the table holds, or a lower
    /// object (those never carry an origin: their number comes straight from the listing,
    /// so cold directories read fast).
    fn entry_ino_known(&self, parent: u64, entry: &Listed) -> Option<u64> {
        let known = self.table().child(parent, &entry.name);
        if known.is_some() {
            return known;
        }
        if Some(entry.top.layer) != self.upper {
            let dev = self.layers[entry.top.layer as usize].dev;
            let mapped = self.table().inos.map(dev, entry.top.dino);
            return Some(mapped.unwrap_or(entry.top.dino));
        }
        None
    }

    /// The number of an upper entry: its recorded origin, else its own.
    fn entry_ino_upper(&self, parent: u64, ppath: &[u8], entry: &Listed) -> Result<u64> {
        let dfd = self.dir_fd(entry.top.layer, ppath)?;
        let st = sys::stat_at(dfd.as_fd(), &entry.name)?;
        let origin = self.origin_ino(dfd.as_fd(), parent, ppath, &entry.name, &st, None);
        Ok(origin
            .or_else(|| self.table().inos.map(st.dev, st.ino))
            .unwrap_or(st.ino))
    }

    /// Inode number of a node's parent (for `..`).
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.table().parent(ino).unwrap_or(ROOT_INO)
    }

    /// Filesystem statistics of the top layer.
    pub fn statfs(&self) -> Result<sys::FsStat> {
        Ok(sys::fstatvfs(self.root_fd(0))?)
    }

    /// Read an xattr visible to users (private overlay xattrs are never shown). Absences the
    /// node has seen before are answered without a system call.
    pub fn getxattr(&self, ino: u64, attr: &[u8]) -> Result<Vec<u8>> {
        if whiteout::is_private_xattr(attr) {
            return Err(Error::os(libc::ENODATA));
        }
        let caps = attr == CAPS_XATTR;
        let epoch = {
            let node = self.node(ino)?;
            let s = node.lock();
            if s.no_xattrs || (caps && s.no_caps) {
                return Err(Error::os(libc::ENODATA));
            }
            s.xattr_epoch
        };
        let _ns = self.read_ns();
        let (node, path) = self.node_path(ino)?;
        let layer = node.lock().layer;
        let (value, none) = self.at(layer, &self.lpath(ino, layer, &path), |d, n| {
            let target = Self::xtarget(d, n);
            Ok(match sys::xattr_get(target, attr)? {
                Some(v) => (Some(v), false),
                // Missing: remember when nothing at all is there, for the next questions.
                None => (
                    None,
                    sys::xattr_list(target)?
                        .iter()
                        .all(|n| whiteout::is_private_xattr(n)),
                ),
            })
        })?;
        if value.is_none() {
            let mut s = node.lock();
            if s.xattr_epoch == epoch {
                s.no_xattrs |= none;
                s.no_caps |= caps;
            }
        }
        value.ok_or_else(|| Error::os(libc::ENODATA))
    }

    /// List the xattr names visible to users.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        let _ns = self.read_ns();
        let (node, path) = self.node_path(ino)?;
        let layer = node.lock().layer;
        let lpath = self.lpath(ino, layer, &path);
        let names = self.at(layer, &lpath, |d, n| sys::xattr_list(Self::xtarget(d, n)))?;
        Ok(names
            .into_iter()
            .filter(|n| !whiteout::is_private_xattr(n))
            .collect())
    }

    /// Open the copy of directory `dir` in `layer`: where its entries whose top is that layer
    /// are, for tools that read objects by name through directory fds (`diff`).
    pub fn layer_dir(&self, dir: u64, layer: u16) -> Result<OwnedFd> {
        if layer as usize >= self.layers.len() {
            return Err(Error::os(libc::EINVAL));
        }
        let _ns = self.read_ns();
        let (_, path) = self.node_path(dir)?;
        let lpath = self.lpath(dir, layer, &path);
        self.open_dir_in(layer, &lpath)
            .map_err(|e| Error::io(format!("opening {}", ShowPath(&lpath)), e))
    }

    /// Whether the lower layers show something under `name` in directory `dir`: what a
    /// whiteout or an opaque directory of that name in the upper hides.
    pub fn lower_visible(&self, dir: u64, name: &[u8]) -> Result<bool> {
        let _ns = self.read_ns();
        let (node, path) = self.node_path(dir)?;
        self.with_index(&node, &path, |idx| {
            idx.get(name).is_some_and(|e| e.lower_visible)
        })
    }

    /// Names held by all directory indexes together (memory checks).
    pub fn index_names(&self) -> usize {
        self.index_lru
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
    }

    /// Number of nodes the union holds (memory checks).
    pub fn node_count(&self) -> usize {
        self.table().len()
    }

    /// A unique temporary name for the work directory.
    fn tmp_name(&self) -> Vec<u8> {
        format!(
            "#lfs.{}.{}",
            sys::getpid(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes()
    }
}

/// Create `<workdir>/work` empty: leftovers of an interrupted operation (a crash mid copy-up)
/// are removed, as kernel overlayfs does at mount.
fn prepare_workdir(workdir: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    match sys::stat_at_opt(workdir, b"work")? {
        Some(st) if st.is_dir() => {
            let fd = sys::open_dir_beneath(workdir, b"work")?;
            remove_contents(fd.as_fd())?;
            Ok(fd)
        }
        Some(_) => {
            sys::unlink_at(workdir, b"work", false)?;
            sys::mkdir_at(workdir, b"work", 0o700)?;
            sys::open_dir_beneath(workdir, b"work")
        }
        None => {
            sys::mkdir_at(workdir, b"work", 0o700)?;
            sys::open_dir_beneath(workdir, b"work")
        }
    }
}

/// Remove everything inside a directory (never following symlinks).
pub(crate) fn remove_contents(dir: BorrowedFd<'_>) -> std::io::Result<()> {
    let fd = sys::open_dir_beneath(dir, b"")?;
    let entries = sys::read_dir_all(fd)?;
    for e in entries {
        let is_dir = if e.dtype == sys::DT_UNKNOWN {
            sys::stat_at(dir, &e.name)?.is_dir()
        } else {
            e.dtype == sys::DT_DIR
        };
        if is_dir {
            let sub = sys::open_dir_beneath(dir, &e.name)?;
            remove_contents(sub.as_fd())?;
        }
        match sys::unlink_at(dir, &e.name, is_dir) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Give a new upper the persistent uuid kernel overlayfs gives it at its first mount
/// (`uuid=auto`, the kernel's default): an upper whose root is not marked impure has never had
/// anything copied up into it, so it is new; an older one without a uuid keeps none, as the
/// kernel leaves it (a uuid now would change the identity its fsid had). Best effort, as in the
/// kernel: a failure is logged and the mount goes on.
fn init_upper_uuid(root: BorrowedFd<'_>, ns: XattrNs) {
    let has = |name| sys::xattr_get(XTarget::Fd(root), name).map(|v| v.is_some());
    match (has(ns.uuid()), has(ns.impure())) {
        (Ok(false), Ok(false)) => {}
        (Ok(_), Ok(_)) => return,
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("upper directory: cannot read its overlay uuid: {e}");
            return;
        }
    }
    let mut uuid = [0u8; 16];
    let res = sys::fill_random(&mut uuid).and_then(|()| {
        // A version 4 (random) UUID, as the kernel's uuid_gen makes.
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        sys::xattr_set(XTarget::Fd(root), ns.uuid(), &uuid, libc::XATTR_CREATE)
    });
    if let Err(e) = res {
        log::warn!("upper directory: cannot record an overlay uuid: {e}");
    }
}

/// Decide how markers are written: trusted xattrs and char-device whiteouts when privileged,
/// the kernel's userxattr format otherwise.
fn probe_formats(work: BorrowedFd<'_>) -> (XattrNs, WhiteoutFormat) {
    let probe = b"#lfs.probe";
    let _ = sys::unlink_at(work, probe, false);
    let wh = match sys::mknod_at(work, probe, sys::S_IFCHR, 0) {
        Ok(()) => {
            let _ = sys::unlink_at(work, probe, false);
            WhiteoutFormat::CharDev
        }
        Err(_) => WhiteoutFormat::UserXattr,
    };
    let ns = match sys::open_at(work, probe, libc::O_CREAT | libc::O_WRONLY, 0o600) {
        Ok(fd) => {
            let ok =
                sys::xattr_set(XTarget::Fd(fd.as_fd()), b"trusted.layerfs.probe", b"1", 0).is_ok();
            let _ = sys::unlink_at(work, probe, false);
            if ok { XattrNs::Trusted } else { XattrNs::User }
        }
        Err(_) => XattrNs::User,
    };
    (ns, wh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join() {
        assert_eq!(split_path(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_path(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(join_path(b"", b"x"), b"x");
        assert_eq!(join_path(b"a", b"x"), b"a/x");
    }
}
