//! The only module that talks to the kernel directly (libc and nix calls).
//!
//! Everything else in layerfs is `#![deny(unsafe_code)]` and goes through the safe wrappers here.
//! The wrappers follow three rules that the rest of the code relies on:
//!
//! * Paths inside layers, uppers and the store are resolved with `openat2` and
//!   `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS` (plus `RESOLVE_NO_SYMLINKS` for [`open_beneath`]),
//!   so a symlink planted in a layer can never make layerfs touch anything outside it.
//! * The `*_at` functions take a directory fd and a single path component (no `/`); they never
//!   follow a symlink in the final component (`AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`).
//! * File names are bytes (`&[u8]`), never strings.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::ffi::{CStr, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

pub use libc::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK, mode_t};

/// Longest file name component Linux accepts.
pub const NAME_MAX: usize = 255;

// Syscall numbers of the *xattrat family (Linux 6.13, same number on every architecture).
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Run `f` with a NUL-terminated copy of `bytes`, on the stack when short.
fn with_cstr<T>(bytes: &[u8], f: impl FnOnce(&CStr) -> io::Result<T>) -> io::Result<T> {
    const STACK: usize = 512;
    if bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if bytes.len() < STACK {
        let mut buf = [0u8; STACK];
        buf[..bytes.len()].copy_from_slice(bytes);
        // The slice holds `bytes` followed by at least one NUL and has no interior NUL.
        let c = CStr::from_bytes_until_nul(&buf[..=bytes.len()])
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        f(c)
    } else {
        let mut v = Vec::with_capacity(bytes.len() + 1);
        v.extend_from_slice(bytes);
        v.push(0);
        let c = CStr::from_bytes_with_nul(&v)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        f(c)
    }
}

/// A single path component must not be empty (except where noted), contain `/`, or be `.`/`..`.
fn check_component(name: &[u8]) -> io::Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if name.len() > NAME_MAX {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    Ok(())
}

/// Timestamps as the kernel keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

/// The subset of `struct stat` layerfs uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub blksize: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

impl FileStat {
    fn from_raw(st: &libc::stat) -> Self {
        FileStat {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            blksize: st.st_blksize as u64,
            atime: Timespec {
                sec: st.st_atime,
                nsec: st.st_atime_nsec,
            },
            mtime: Timespec {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec,
            },
            ctime: Timespec {
                sec: st.st_ctime,
                nsec: st.st_ctime_nsec,
            },
        }
    }

    /// File type bits (`S_IFMT` part of the mode).
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == S_IFLNK
    }
    pub fn is_chr(&self) -> bool {
        self.file_type() == S_IFCHR
    }
    /// Permission bits including setuid/setgid/sticky.
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Major/minor of a device number.
pub fn dev_major(dev: u64) -> u32 {
    libc::major(dev)
}
pub fn dev_minor(dev: u64) -> u32 {
    libc::minor(dev)
}
pub fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

/// How a path inside a root directory is resolved by [`openat2_in`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS`: no symlink anywhere in
    /// the path is followed (a trailing symlink can still be opened with `O_PATH|O_NOFOLLOW`).
    /// What the union uses: every intermediate component it walks is a real directory.
    NoSymlinks,
    /// `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: symlinks are followed as if the root were `/`.
    InRoot,
}

/// `openat2(root, path, flags, mode)` confined to `root`. `path` is relative; empty or `.` opens
/// the root itself.
pub fn openat2_in(
    root: BorrowedFd<'_>,
    path: &[u8],
    flags: i32,
    mode: u32,
    resolve: Resolve,
) -> io::Result<OwnedFd> {
    let path: &[u8] = if path.is_empty() { b"." } else { path };
    let mut how: libc::open_how = unsafe_zeroed_open_how();
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_IN_ROOT
        | libc::RESOLVE_NO_MAGICLINKS
        | match resolve {
            Resolve::NoSymlinks => libc::RESOLVE_NO_SYMLINKS,
            Resolve::InRoot => 0,
        };
    with_cstr(path, |c| {
        loop {
            // SAFETY: `c` is a valid NUL-terminated string, `how` a properly initialised open_how
            // whose size we pass; the returned fd is fresh and owned by nobody else.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    root.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            match cvt_long(ret) {
                // SAFETY: a successful openat2 returns a new descriptor we now own.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(e),
            }
        }
    })
}

fn unsafe_zeroed_open_how() -> libc::open_how {
    // SAFETY: open_how is a plain C struct of integers; all-zero is a valid value.
    unsafe { MaybeUninit::<libc::open_how>::zeroed().assume_init() }
}

/// Open `path` under `root` without following any symlink (see [`Resolve::NoSymlinks`]).
pub fn open_beneath(
    root: BorrowedFd<'_>,
    path: &[u8],
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    openat2_in(
        root,
        path,
        flags | libc::O_NOFOLLOW,
        mode,
        Resolve::NoSymlinks,
    )
}

/// Open a directory under `root` for reading entries and as an anchor for `*_at` calls.
pub fn open_dir_beneath(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    open_beneath(root, path, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Open a plain directory path on the host (CLI arguments, the store root).
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    with_cstr(path.as_os_str().as_bytes(), |c| {
        // SAFETY: valid C string; the fd returned on success is fresh and owned by us.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// `openat(dir, name, flags, mode)` for a single component, never following a final symlink.
pub fn open_at(dir: BorrowedFd<'_>, name: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
    check_component(name)?;
    with_cstr(name, |c| {
        // SAFETY: valid dirfd and C string; the returned fd is fresh and owned by us.
        let fd = cvt(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// Open the object behind a descriptor again (`/proc/self/fd/N`) with new flags: how an
/// `O_PATH` descriptor of an unlinked file becomes readable or writable.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    with_cstr(&proc_fd_path(fd), |c| {
        // SAFETY: valid C string; the fd returned on success is fresh and owned by us.
        let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0) })?;
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// Open an unnamed temporary file in `dir` (`O_TMPFILE`), to be linked in with [`link_fd_at`].
pub fn open_tmpfile(dir: BorrowedFd<'_>, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    with_cstr(b".", |c| {
        // SAFETY: valid dirfd and C string; the returned fd is fresh and owned by us.
        let fd = cvt(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_TMPFILE | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; an empty name stats `dir` itself.
pub fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<FileStat> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        check_component(name)?;
        libc::AT_SYMLINK_NOFOLLOW
    };
    with_cstr(name, |c| {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid dirfd, C string and out-pointer to a stat buffer.
        cvt(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), flags) })?;
        // SAFETY: fstatat succeeded, so it filled the buffer.
        Ok(FileStat::from_raw(unsafe { st.assume_init_ref() }))
    })
}

/// `fstat(fd)`; works on `O_PATH` descriptors too.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<FileStat> {
    stat_at(fd, b"")
}

/// Like [`stat_at`] but `Ok(None)` when the name does not exist.
pub fn stat_at_opt(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<FileStat>> {
    match stat_at(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    check_component(name)?;
    with_cstr(name, |c| {
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as mode_t) }).map(drop)
    })
}

/// `mknodat`; `mode` includes the file type bits.
pub fn mknod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32, rdev: u64) -> io::Result<()> {
    check_component(name)?;
    with_cstr(name, |c| {
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode as mode_t, rdev) }).map(drop)
    })
}

pub fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    check_component(name)?;
    with_cstr(target, |t| {
        with_cstr(name, |c| {
            // SAFETY: valid C strings and dirfd.
            cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
        })
    })
}

/// Hard link `olddir/oldname` to `newdir/newname` (the old name is not dereferenced).
pub fn link_at(
    olddir: BorrowedFd<'_>,
    oldname: &[u8],
    newdir: BorrowedFd<'_>,
    newname: &[u8],
) -> io::Result<()> {
    check_component(oldname)?;
    check_component(newname)?;
    with_cstr(oldname, |o| {
        with_cstr(newname, |n| {
            // SAFETY: valid dirfds and C strings.
            cvt(unsafe {
                libc::linkat(
                    olddir.as_raw_fd(),
                    o.as_ptr(),
                    newdir.as_raw_fd(),
                    n.as_ptr(),
                    0,
                )
            })
            .map(drop)
        })
    })
}

/// Give an `O_TMPFILE` (or any) descriptor a name: `linkat(fd, "", dir, name, AT_EMPTY_PATH)`.
pub fn link_fd_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    check_component(name)?;
    with_cstr(name, |n| {
        // SAFETY: valid descriptors and C strings; AT_EMPTY_PATH links the open file itself.
        cvt(unsafe {
            libc::linkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                dir.as_raw_fd(),
                n.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        })
        .map(drop)
    })
}

/// `unlinkat`; `dir_entry` selects `AT_REMOVEDIR`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &[u8], dir_entry: bool) -> io::Result<()> {
    check_component(name)?;
    let flags = if dir_entry { libc::AT_REMOVEDIR } else { 0 };
    with_cstr(name, |c| {
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
    })
}

pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;
pub const RENAME_WHITEOUT: u32 = libc::RENAME_WHITEOUT;

/// `renameat2` with single components on both sides.
pub fn rename_at(
    olddir: BorrowedFd<'_>,
    oldname: &[u8],
    newdir: BorrowedFd<'_>,
    newname: &[u8],
    flags: u32,
) -> io::Result<()> {
    check_component(oldname)?;
    check_component(newname)?;
    with_cstr(oldname, |o| {
        with_cstr(newname, |n| {
            // SAFETY: valid dirfds and C strings.
            cvt(unsafe {
                libc::renameat2(
                    olddir.as_raw_fd(),
                    o.as_ptr(),
                    newdir.as_raw_fd(),
                    n.as_ptr(),
                    flags,
                )
            })
            .map(drop)
        })
    })
}

/// Read a symlink's target as bytes.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    if !name.is_empty() {
        check_component(name)?;
    }
    with_cstr(name, |c| {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: valid dirfd, C string and a writable buffer of the length we pass.
            let n = cvt_size(unsafe {
                libc::readlinkat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            })?;
            if n < buf.len() {
                buf.truncate(n);
                return Ok(buf);
            }
            buf.resize(buf.len() * 2, 0);
        }
    })
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`; `None` leaves an id unchanged.
pub fn chown_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        check_component(name)?;
        libc::AT_SYMLINK_NOFOLLOW
    };
    with_cstr(name, |c| {
        // SAFETY: valid dirfd and C string; u32::MAX (-1) means "unchanged".
        cvt(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                c.as_ptr(),
                uid.unwrap_or(u32::MAX),
                gid.unwrap_or(u32::MAX),
                flags,
            )
        })
        .map(drop)
    })
}

/// Change permission bits of `dir/name` without following a symlink there (`fchmodat2`),
/// falling back to a plain `fchmodat` (the caller has checked the entry is not a symlink).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    if !name.is_empty() {
        check_component(name)?;
    }
    with_cstr(name, |c| {
        let flags = if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            libc::AT_SYMLINK_NOFOLLOW
        };
        // SAFETY: valid dirfd and C string for the fchmodat2 syscall.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                mode as libc::c_uint,
                flags,
            )
        };
        match cvt_long(ret) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) && !name.is_empty() => {
                // SAFETY: valid dirfd and C string.
                cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), mode as mode_t, 0) })
                    .map(drop)
            }
            Err(e) => Err(e),
        }
    })
}

/// A timestamp to set: keep it, set it to now, or set it to a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Omit,
    Now,
    At(Timespec),
}

impl SetTime {
    fn raw(self) -> libc::timespec {
        match self {
            SetTime::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            SetTime::Now => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            SetTime::At(t) => libc::timespec {
                tv_sec: t.sec,
                tv_nsec: t.nsec,
            },
        }
    }
}

/// `utimensat(dir, name, [atime, mtime], AT_SYMLINK_NOFOLLOW)`; empty name means `dir` itself.
pub fn utimens_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    atime: SetTime,
    mtime: SetTime,
) -> io::Result<()> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        check_component(name)?;
        libc::AT_SYMLINK_NOFOLLOW
    };
    let times = [atime.raw(), mtime.raw()];
    with_cstr(name, |c| {
        // SAFETY: valid dirfd, C string and a two-element timespec array.
        cvt(unsafe { libc::utimensat(dir.as_raw_fd(), c.as_ptr(), times.as_ptr(), flags) })
            .map(drop)
    })
}

/// `futimens` on an open descriptor.
pub fn futimens(fd: BorrowedFd<'_>, atime: SetTime, mtime: SetTime) -> io::Result<()> {
    let times = [atime.raw(), mtime.raw()];
    // SAFETY: valid fd and a two-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as mode_t) }).map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    // SAFETY: valid fd; u32::MAX (-1) means unchanged.
    cvt(unsafe {
        libc::fchown(
            fd.as_raw_fd(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
        )
    })
    .map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe {
        if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// Start writing `len` bytes at `off` of `fd` to disk, without waiting for them: an fsync
/// later then finds less to write.
pub fn start_writeback(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid fd; the call takes no pointers.
    cvt(unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    })
    .map(drop)
}

/// Fill `buf` from the kernel's random number generator (blocks only until it is seeded).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a writable buffer of `rest.len()` bytes.
        match cvt_size(unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) }) {
            Ok(n) => done += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

pub const SEEK_DATA: i32 = libc::SEEK_DATA;
pub const SEEK_HOLE: i32 = libc::SEEK_HOLE;

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: valid fd.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    loop {
        // SAFETY: valid fd and a writable buffer of the given length.
        let ret = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        match cvt_size(ret) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    loop {
        // SAFETY: valid fd and a readable buffer of the given length.
        let ret = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        match cvt_size(ret) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
}

/// Append-mode write (`O_APPEND` descriptor): offset is ignored by the kernel.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: valid fd and a readable buffer of the given length.
        let ret = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        match cvt_size(ret) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
}

/// In-kernel copy of `len` bytes; returns bytes copied (0 at EOF of the source).
pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: u64,
) -> io::Result<usize> {
    let mut off_in = src_off as libc::loff_t;
    let mut off_out = dst_off as libc::loff_t;
    // SAFETY: valid fds and pointers to local offsets.
    let ret = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len.min(1 << 30) as usize,
            0,
        )
    };
    cvt_size(ret)
}

/// Share the data extents of `src` with `dst` (btrfs, xfs reflink). `EOPNOTSUPP`/`EXDEV`/
/// `EINVAL` when the filesystem cannot.
pub fn reflink(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are valid.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(drop)
}

/// `statvfs` of the filesystem holding `fd`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsStat {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub fsid: u64,
}

/// A pipe through which file data is spliced into FUSE replies.
struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl SplicePipe {
    /// Non-blocking both ways, so a pipe left full by a failure can never block the thread;
    /// as large as an unprivileged process may make it (`fs.pipe-max-size`, 1 MiB by default).
    fn new() -> io::Result<SplicePipe> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(1 << 20))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))?;
        Ok(SplicePipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(0),
        })
    }

    /// Throw away whatever a failed reply left in the pipe.
    fn drain(&self) {
        let mut scratch = [0u8; 16 * 1024];
        while matches!(nix::unistd::read(&self.read, &mut scratch), Ok(n) if n > 0) {}
    }
}

/// Answer the FUSE READ request `unique` on the FUSE device `dev` with up to `want` bytes of
/// `file` at `offset`, moved by splice (the file's page-cache pages into a pipe, the pipe into
/// the device) rather than copied into a buffer and out again. `Ok(false)`: nothing was sent
/// (at end of file, a reply too large for the pipe, the file shrinking meanwhile, or the device
/// refusing a splice); answer the request another way.
pub fn splice_read_reply(
    file: BorrowedFd<'_>,
    offset: u64,
    want: usize,
    dev: BorrowedFd<'_>,
    unique: u64,
) -> io::Result<bool> {
    use nix::fcntl::{SpliceFFlags, splice};
    thread_local! {
        static PIPE: std::cell::OnceCell<Option<SplicePipe>> = const { std::cell::OnceCell::new() };
    }
    const PAGE: u64 = 4096;
    const OUT_HEADER: usize = 16;
    let size = fstat(file)?.size;
    let len = size.saturating_sub(offset).min(want as u64);
    if len == 0 {
        return Ok(false);
    }
    // Pipe slots hold at most a page each: the header takes one, the data its pages.
    let pages = (offset % PAGE + len).div_ceil(PAGE) + 1;
    PIPE.with(|cell| {
        let Some(pipe) = cell.get_or_init(|| {
            SplicePipe::new()
                .map_err(|e| log::warn!("no splice pipe, file data is copied: {e}"))
                .ok()
        }) else {
            return Ok(false);
        };
        if pages * PAGE > pipe.capacity as u64 {
            return Ok(false);
        }
        let len = len as usize;
        let mut header = [0u8; OUT_HEADER];
        header[0..4].copy_from_slice(&((OUT_HEADER + len) as u32).to_ne_bytes());
        header[8..16].copy_from_slice(&unique.to_ne_bytes());
        if nix::unistd::write(&pipe.write, &header) != Ok(OUT_HEADER) {
            pipe.drain();
            return Ok(false);
        }
        let mut at =
            i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut moved = 0;
        while moved < len {
            match splice(
                file,
                Some(&mut at),
                &pipe.write,
                None,
                len - moved,
                SpliceFFlags::empty(),
            ) {
                Ok(0) => break,
                Ok(n) => moved += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        if moved < len {
            pipe.drain();
            return Ok(false);
        }
        let total = OUT_HEADER + len;
        match splice(&pipe.read, None, dev, None, total, SpliceFFlags::empty()) {
            Ok(n) if n == total => Ok(true),
            // The request is gone (interrupted, or the connection aborted): nothing to answer.
            Err(nix::errno::Errno::ENOENT) => {
                pipe.drain();
                Ok(true)
            }
            _ => {
                pipe.drain();
                Ok(false)
            }
        }
    })
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<FsStat> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid fd and out-pointer.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded.
    let st = unsafe { st.assume_init() };
    Ok(FsStat {
        blocks: st.f_blocks,
        bfree: st.f_bfree,
        bavail: st.f_bavail,
        files: st.f_files,
        ffree: st.f_ffree,
        bsize: st.f_bsize as u32,
        namelen: st.f_namemax as u32,
        frsize: st.f_frsize as u32,
        fsid: st.f_fsid,
    })
}

// ---------------------------------------------------------------------------------------------
// Directory reading

/// One entry as `getdents64` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// `DT_*` value; `DT_UNKNOWN` (0) when the filesystem does not say.
    pub dtype: u8,
    /// The directory offset after this entry (what `telldir` returns after reading it).
    pub off: i64,
}

pub const DT_UNKNOWN: u8 = libc::DT_UNKNOWN;
pub const DT_FIFO: u8 = libc::DT_FIFO;
pub const DT_CHR: u8 = libc::DT_CHR;
pub const DT_DIR: u8 = libc::DT_DIR;
pub const DT_BLK: u8 = libc::DT_BLK;
pub const DT_REG: u8 = libc::DT_REG;
pub const DT_LNK: u8 = libc::DT_LNK;
pub const DT_SOCK: u8 = libc::DT_SOCK;

/// Streaming reader of a directory fd's entries, skipping `.` and `..`.
pub struct DirReader {
    fd: OwnedFd,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    done: bool,
}

impl DirReader {
    /// Take a directory fd opened for reading (`O_RDONLY|O_DIRECTORY`) and read from offset 0.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Self::with_buffer(fd, 32 * 1024)
    }

    /// Like [`DirReader::new`] with a `getdents64` buffer of `size` bytes (small buffers read a
    /// directory in many chunks).
    pub fn with_buffer(fd: OwnedFd, size: usize) -> io::Result<Self> {
        lseek(fd.as_fd(), 0, libc::SEEK_SET)?;
        Ok(DirReader {
            fd,
            buf: vec![0u8; size.max(512)],
            pos: 0,
            len: 0,
            done: false,
        })
    }

    /// Continue reading at a position returned in [`RawDirEntry::off`] (`seekdir`).
    pub fn seek(&mut self, off: i64) -> io::Result<()> {
        lseek(self.fd.as_fd(), off, libc::SEEK_SET)?;
        self.pos = 0;
        self.len = 0;
        self.done = false;
        Ok(())
    }

    /// The next entry, `Ok(None)` at the end.
    pub fn next_entry(&mut self) -> io::Result<Option<RawDirEntry>> {
        loop {
            if self.pos >= self.len {
                if self.done {
                    return Ok(None);
                }
                // SAFETY: valid fd and a writable buffer of the given length.
                let n = unsafe {
                    libc::syscall(
                        libc::SYS_getdents64,
                        self.fd.as_raw_fd(),
                        self.buf.as_mut_ptr(),
                        self.buf.len(),
                    )
                };
                let n = cvt_long(n)? as usize;
                if n == 0 {
                    self.done = true;
                    return Ok(None);
                }
                self.pos = 0;
                self.len = n;
            }
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let rec = &self.buf[self.pos..self.len];
            if rec.len() < 19 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
            let off = i64::from_ne_bytes(rec[8..16].try_into().unwrap_or([0; 8]));
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            let dtype = rec[18];
            if reclen < 19 || reclen > rec.len() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let name_field = &rec[19..reclen];
            let name_len = name_field
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_field.len());
            let name = &name_field[..name_len];
            self.pos += reclen;
            if name == b"." || name == b".." {
                continue;
            }
            return Ok(Some(RawDirEntry {
                name: name.to_vec(),
                ino,
                dtype,
                off,
            }));
        }
    }

    /// The descriptor, for `*_at` calls on the entries.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Read all entries of a directory fd (except `.` and `..`).
pub fn read_dir_all(fd: OwnedFd) -> io::Result<Vec<RawDirEntry>> {
    let mut reader = DirReader::new(fd)?;
    let mut out = Vec::new();
    while let Some(e) = reader.next_entry()? {
        out.push(e);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Extended attributes

fn proc_fd_path(fd: BorrowedFd<'_>) -> Vec<u8> {
    format!("/proc/self/fd/{}", fd.as_raw_fd()).into_bytes()
}

fn is_enosys(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSYS)
}

/// Which object an xattr call addresses.
#[derive(Clone, Copy)]
pub enum XTarget<'a> {
    /// An open (non-`O_PATH`) descriptor: the `f*xattr` calls.
    Fd(BorrowedFd<'a>),
    /// `dir/name` without following a final symlink: the `*xattrat` calls (Linux 6.13),
    /// falling back to an `O_PATH` descriptor and its `/proc/self/fd` link.
    At(BorrowedFd<'a>, &'a [u8]),
}

fn xattr_size_loop(mut call: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                let size = call(&mut [])?;
                buf.resize(size.max(buf.len() * 2).min(1 << 20), 0);
                if buf.len() >= 1 << 20 && size > buf.len() {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn with_opath<T>(
    dir: BorrowedFd<'_>,
    name: &[u8],
    f: impl FnOnce(&CStr) -> io::Result<T>,
) -> io::Result<T> {
    let fd = open_at(dir, name, libc::O_PATH, 0)?;
    with_cstr(&proc_fd_path(fd.as_fd()), f)
}

/// Get an xattr value; `Ok(None)` when absent (`ENODATA`).
pub fn xattr_get(target: XTarget<'_>, attr: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let res = with_cstr(attr, |a| match target {
        XTarget::Fd(fd) => xattr_size_loop(|buf| {
            // SAFETY: valid fd, C string and a writable buffer of the given length.
            cvt_size(unsafe {
                libc::fgetxattr(
                    fd.as_raw_fd(),
                    a.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            })
        }),
        XTarget::At(dir, name) => {
            check_component(name)?;
            let at = with_cstr(name, |n| {
                xattr_size_loop(|buf| {
                    let mut args = XattrArgs {
                        value: buf.as_mut_ptr() as u64,
                        size: buf.len() as u32,
                        flags: 0,
                    };
                    // SAFETY: valid dirfd, C strings, and an xattr_args pointing at `buf`.
                    cvt_long(unsafe {
                        libc::syscall(
                            SYS_GETXATTRAT,
                            dir.as_raw_fd(),
                            n.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                            a.as_ptr(),
                            &mut args as *mut XattrArgs,
                            std::mem::size_of::<XattrArgs>(),
                        )
                    })
                    .map(|n| n as usize)
                })
            });
            match at {
                Err(e) if is_enosys(&e) => with_opath(dir, name, |p| {
                    xattr_size_loop(|buf| {
                        // SAFETY: valid C strings and a writable buffer of the given length.
                        cvt_size(unsafe {
                            libc::getxattr(
                                p.as_ptr(),
                                a.as_ptr(),
                                buf.as_mut_ptr().cast(),
                                buf.len(),
                            )
                        })
                    })
                }),
                other => other,
            }
        }
    });
    match res {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// List xattr names.
pub fn xattr_list(target: XTarget<'_>) -> io::Result<Vec<Vec<u8>>> {
    let raw = match target {
        XTarget::Fd(fd) => xattr_size_loop(|buf| {
            // SAFETY: valid fd and a writable buffer of the given length.
            cvt_size(unsafe {
                libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
            })
        })?,
        XTarget::At(dir, name) => {
            check_component(name)?;
            let at = with_cstr(name, |n| {
                xattr_size_loop(|buf| {
                    // SAFETY: valid dirfd, C string and a writable buffer of the given length.
                    cvt_long(unsafe {
                        libc::syscall(
                            SYS_LISTXATTRAT,
                            dir.as_raw_fd(),
                            n.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                            buf.as_mut_ptr(),
                            buf.len(),
                        )
                    })
                    .map(|n| n as usize)
                })
            });
            match at {
                Err(e) if is_enosys(&e) => with_opath(dir, name, |p| {
                    xattr_size_loop(|buf| {
                        // SAFETY: valid C string and a writable buffer of the given length.
                        cvt_size(unsafe {
                            libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                        })
                    })
                })?,
                other => other?,
            }
        }
    };
    Ok(raw
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

pub const XATTR_CREATE: i32 = libc::XATTR_CREATE;
pub const XATTR_REPLACE: i32 = libc::XATTR_REPLACE;

/// Set an xattr (`flags`: 0, [`XATTR_CREATE`] or [`XATTR_REPLACE`]).
pub fn xattr_set(target: XTarget<'_>, attr: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    with_cstr(attr, |a| match target {
        XTarget::Fd(fd) => {
            // SAFETY: valid fd, C string and a readable buffer of the given length.
            cvt(unsafe {
                libc::fsetxattr(
                    fd.as_raw_fd(),
                    a.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            })
            .map(drop)
        }
        XTarget::At(dir, name) => {
            check_component(name)?;
            let at = with_cstr(name, |n| {
                let args = XattrArgs {
                    value: value.as_ptr() as u64,
                    size: value.len() as u32,
                    flags: flags as u32,
                };
                // SAFETY: valid dirfd, C strings, and an xattr_args pointing at `value`.
                cvt_long(unsafe {
                    libc::syscall(
                        SYS_SETXATTRAT,
                        dir.as_raw_fd(),
                        n.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        a.as_ptr(),
                        &args as *const XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                })
                .map(drop)
            });
            match at {
                Err(e) if is_enosys(&e) => with_opath(dir, name, |p| {
                    // SAFETY: valid C strings and a readable buffer of the given length.
                    cvt(unsafe {
                        libc::setxattr(
                            p.as_ptr(),
                            a.as_ptr(),
                            value.as_ptr().cast(),
                            value.len(),
                            flags,
                        )
                    })
                    .map(drop)
                }),
                other => other,
            }
        }
    })
}

/// Remove an xattr.
pub fn xattr_remove(target: XTarget<'_>, attr: &[u8]) -> io::Result<()> {
    with_cstr(attr, |a| match target {
        XTarget::Fd(fd) => {
            // SAFETY: valid fd and C string.
            cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), a.as_ptr()) }).map(drop)
        }
        XTarget::At(dir, name) => {
            check_component(name)?;
            let at = with_cstr(name, |n| {
                // SAFETY: valid dirfd and C strings.
                cvt_long(unsafe {
                    libc::syscall(
                        SYS_REMOVEXATTRAT,
                        dir.as_raw_fd(),
                        n.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                        a.as_ptr(),
                    )
                })
                .map(drop)
            });
            match at {
                Err(e) if is_enosys(&e) => with_opath(dir, name, |p| {
                    // SAFETY: valid C strings.
                    cvt(unsafe { libc::removexattr(p.as_ptr(), a.as_ptr()) }).map(drop)
                }),
                other => other,
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// File handles and filesystem uuids

/// Longest file handle the kernel hands out (`MAX_HANDLE_SZ`).
pub const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the longest handle.
#[repr(C)]
struct HandleBuf {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// `name_to_handle_at`: the file handle (type and bytes) of an object, never following a
/// final symlink. `EOPNOTSUPP` when its filesystem gives no handles.
pub fn name_to_handle(target: XTarget<'_>) -> io::Result<(i32, Vec<u8>)> {
    let (dir, name, flags) = match target {
        XTarget::Fd(fd) => (fd, &b""[..], libc::AT_EMPTY_PATH),
        XTarget::At(dir, name) => {
            check_component(name)?;
            (dir, name, 0)
        }
    };
    with_cstr(name, |c| {
        let mut buf = HandleBuf {
            handle_bytes: MAX_HANDLE_SZ as libc::c_uint,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: valid dirfd and C string; `buf` is a `struct file_handle` whose
        // `handle_bytes` says how much room follows it, and `mount_id` is a valid out-pointer.
        cvt(unsafe {
            libc::name_to_handle_at(
                dir.as_raw_fd(),
                c.as_ptr(),
                (&mut buf as *mut HandleBuf).cast::<libc::file_handle>(),
                &mut mount_id,
                flags,
            )
        })?;
        let n = (buf.handle_bytes as usize).min(MAX_HANDLE_SZ);
        Ok((buf.handle_type, buf.f_handle[..n].to_vec()))
    })
}

/// `open_by_handle_at(mount_fd, handle, O_PATH)`: the object a file handle names on the
/// filesystem of `mount_fd`. Needs `CAP_DAC_READ_SEARCH` (`EPERM` otherwise).
pub fn open_by_handle(mount_fd: BorrowedFd<'_>, kind: i32, bytes: &[u8]) -> io::Result<OwnedFd> {
    if bytes.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = HandleBuf {
        handle_bytes: bytes.len() as libc::c_uint,
        handle_type: kind,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    buf.f_handle[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: valid fd; `buf` is a `struct file_handle` whose `handle_bytes` bytes follow it.
    let fd = cvt(unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            (&mut buf as *mut HandleBuf).cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by open_by_handle_at and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct fsuuid2` of `FS_IOC_GETFSUUID`.
#[repr(C)]
struct FsUuid2 {
    len: u8,
    uuid: [u8; 16],
}

/// `FS_IOC_GETFSUUID` = `_IOR(0x15, 0, struct fsuuid2)`.
const FS_IOC_GETFSUUID: libc::c_ulong = (2 << 30) | (17 << 16) | (0x15 << 8);

/// The uuid of the filesystem holding `fd` as the kernel keeps it (`FS_IOC_GETFSUUID`, Linux
/// 6.8); `None` when the filesystem has none or the kernel does not say.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> Option<[u8; 16]> {
    let mut out = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: valid fd; FS_IOC_GETFSUUID writes one `struct fsuuid2` (17 bytes) to `out`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_GETFSUUID as _, &mut out) };
    (r == 0 && out.len == 16).then_some(out.uuid)
}

// ---------------------------------------------------------------------------------------------
// Processes, signals, mounts

/// Real and effective ids of this process.
pub fn getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}
/// Give the calling thread the lowest scheduling weight (`nice` 19): for speculative work that
/// should only use CPU time nothing else wants.
pub fn lower_thread_priority() -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain integer arguments; on Linux PRIO_PROCESS with a thread id acts on that
    // thread only.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serve allocations of at least `bytes` with their own mappings, returned to the system
/// when freed, and stop glibc from raising that threshold by itself (it does after the first
/// large free, and large blocks then come from the heaps and fragment them). True if set.
pub fn set_mmap_threshold(bytes: usize) -> bool {
    let Ok(bytes) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: mallopt takes two plain integers and only changes allocator tunables.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
}

/// Return the free memory of every malloc heap to the system (`malloc_trim(0)`); true if
/// any was released.
pub fn release_free_heap() -> bool {
    // SAFETY: malloc_trim takes a plain integer, locks each heap itself and only returns free
    // pages; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Put the calling thread in the SCHED_IDLE class (`idle`) or back in the normal one.
pub fn set_idle_class(idle: bool) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for both policies
    // (priority 0).
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}
pub fn getgid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}
pub fn getegid() -> u32 {
    // SAFETY: getegid cannot fail.
    unsafe { libc::getegid() }
}
pub fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Set the process umask, returning the old one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as mode_t) as u32 }
}

/// Result of [`fork`].
pub enum Forked {
    Parent { child: i32 },
    Child,
}

/// `fork()`. Must be called while the process has a single thread (before any session or
/// logging thread starts): the child then owns a consistent copy of the address space.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: callers only fork while single-threaded (documented above), so no lock held by
    // another thread can be left poisoned in the child.
    let pid = cvt(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent { child: pid }
    })
}

pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid has no memory-safety preconditions.
    cvt(unsafe { libc::setsid() }).map(drop)
}

/// Point stdin, stdout and stderr at `/dev/null` (what a daemon does once it is up).
pub fn stdio_to_devnull() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; `null` is a valid open fd.
        cvt(unsafe { libc::dup2(null.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// Point stderr at an open file (a daemon's log file).
pub fn stderr_to(file: &std::fs::File) -> io::Result<()> {
    // SAFETY: dup2 onto fd 2; `file` is a valid open fd.
    cvt(unsafe { libc::dup2(file.as_raw_fd(), 2) }).map(drop)
}

/// A pipe whose ends are close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Wait for a child; returns its exit code (128+signal when killed).
pub fn waitpid(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        break;
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    })
}

/// Send a signal.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    cvt(unsafe { libc::kill(pid, signal) }).map(drop)
}

pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGINT: i32 = libc::SIGINT;
pub const SIGHUP: i32 = libc::SIGHUP;
pub const SIGKILL: i32 = libc::SIGKILL;

/// A set of signals blocked in this thread (and every thread started after) and waited for
/// with [`SignalSet::wait`].
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    /// Block `signals` in the calling thread; threads spawned afterwards inherit the mask.
    pub fn block(signals: &[i32]) -> io::Result<Self> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set; sigaddset/pthread_sigmask take valid pointers.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            for &s in signals {
                libc::sigaddset(set.as_mut_ptr(), s);
            }
            let set = set.assume_init();
            let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if ret != 0 {
                return Err(io::Error::from_raw_os_error(ret));
            }
            Ok(SignalSet(set))
        }
    }

    /// Wait until one of the signals arrives; returns its number.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig = 0;
        // SAFETY: valid set and out-pointer.
        let ret = unsafe { libc::sigwait(&self.0, &mut sig) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        Ok(sig)
    }
}

// SAFETY: a sigset_t is plain data; sharing it between threads is harmless.
unsafe impl Send for SignalSet {}
// SAFETY: see above; `wait` only reads the set.
unsafe impl Sync for SignalSet {}

/// `umount2(path, flags)`; `detach` adds `MNT_DETACH`.
pub fn umount(path: &Path, detach: bool) -> io::Result<()> {
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    with_cstr(path.as_os_str().as_bytes(), |c| {
        // SAFETY: valid C string.
        cvt(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
    })
}

/// Mount flags for [`mount_fuse`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MountFlags {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
}

/// `mount(source, target, fstype, flags, data)` for a FUSE filesystem whose `/dev/fuse`
/// descriptor is named in `data` (`fd=N,...`).
pub fn mount_fuse(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let mut f: libc::c_ulong = 0;
    if flags.read_only {
        f |= libc::MS_RDONLY;
    }
    if flags.nosuid {
        f |= libc::MS_NOSUID;
    }
    if flags.nodev {
        f |= libc::MS_NODEV;
    }
    if flags.noexec {
        f |= libc::MS_NOEXEC;
    }
    if flags.noatime {
        f |= libc::MS_NOATIME;
    }
    with_cstr(source.as_bytes(), |src| {
        with_cstr(target.as_os_str().as_bytes(), |tgt| {
            with_cstr(fstype.as_bytes(), |ty| {
                with_cstr(data.as_bytes(), |d| {
                    // SAFETY: valid C strings for every argument.
                    cvt(unsafe {
                        libc::mount(
                            src.as_ptr(),
                            tgt.as_ptr(),
                            ty.as_ptr(),
                            f,
                            d.as_ptr().cast(),
                        )
                    })
                    .map(drop)
                })
            })
        })
    })
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (the daemon may hold many open files).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer / in-pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Resource limits the run module passes on to containers (`RLIMIT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rlimit {
    Nofile,
    Nproc,
}

/// `getrlimit`: the (soft, hard) limits of this process; `u64::MAX` stands for unlimited.
pub fn getrlimit(which: Rlimit) -> io::Result<(u64, u64)> {
    let resource = match which {
        Rlimit::Nofile => libc::RLIMIT_NOFILE,
        Rlimit::Nproc => libc::RLIMIT_NPROC,
    };
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer to an rlimit.
    cvt(unsafe { libc::getrlimit(resource, &mut lim) })?;
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Supplementary groups of another process, read from `/proc/PID/status`.
pub fn process_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"Groups:"))
        .map(|rest| {
            rest.split(|b| b.is_ascii_whitespace())
                .filter_map(|w| std::str::from_utf8(w).ok()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Convert between `OsStr` and bytes without loss (helpers for callers that hold paths).
pub fn os_bytes(s: &OsStr) -> &[u8] {
    s.as_bytes()
}
pub fn bytes_os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}
pub fn vec_os(b: Vec<u8>) -> OsString {
    OsString::from_vec(b)
}

// ---------------------------------------------------------------------------------------------
// Layer store (issue 4): advisory locks

/// `flock` operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// `flock(fd, LOCK_SH|LOCK_EX)`, waiting for the lock (`nonblocking` adds `LOCK_NB` and
/// returns `Ok(false)` when another open file description holds a conflicting lock).
/// The lock belongs to the open file description: it is shared with forked children and
/// released when the last descriptor for it closes.
pub fn flock(fd: BorrowedFd<'_>, kind: LockKind, nonblocking: bool) -> io::Result<bool> {
    let mut op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    if nonblocking {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock has no memory-safety preconditions; `fd` is a valid descriptor.
        let ret = unsafe { libc::flock(fd.as_raw_fd(), op) };
        if ret == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblocking => return Ok(false),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn tmp() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().unwrap();
        let fd = open_dir_path(d.path()).unwrap();
        (d, fd)
    }

    #[test]
    fn beneath_refuses_symlink_escape() {
        let (d, root) = tmp();
        std::os::unix::fs::symlink("/etc", d.path().join("esc")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/passwd", d.path().join("rel")).unwrap();
        assert!(open_beneath(root.as_fd(), b"esc/passwd", libc::O_RDONLY, 0).is_err());
        assert!(open_beneath(root.as_fd(), b"rel", libc::O_RDONLY, 0).is_err());
        // In-root resolution keeps a followed symlink inside the root.
        let e = openat2_in(
            root.as_fd(),
            b"esc/passwd",
            libc::O_RDONLY,
            0,
            Resolve::InRoot,
        );
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ENOENT));
        // A trailing symlink can still be opened as itself.
        let fd = open_beneath(root.as_fd(), b"esc", libc::O_PATH, 0).unwrap();
        assert!(fstat(fd.as_fd()).unwrap().is_symlink());
    }

    #[test]
    fn component_checks() {
        let (_d, root) = tmp();
        assert_eq!(
            mkdir_at(root.as_fd(), b"a/b", 0o755)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(
            mkdir_at(root.as_fd(), b"..", 0o755)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        let long = vec![b'x'; 256];
        assert_eq!(
            stat_at(root.as_fd(), &long).unwrap_err().raw_os_error(),
            Some(libc::ENAMETOOLONG)
        );
    }

    #[test]
    fn dir_reader_lists_non_utf8_names() {
        let (_d, root) = tmp();
        for i in 0..2000u32 {
            let name = format!("f{i}");
            drop(
                open_at(
                    root.as_fd(),
                    name.as_bytes(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o644,
                )
                .unwrap(),
            );
        }
        drop(
            open_at(
                root.as_fd(),
                b"\xff\xfe",
                libc::O_CREAT | libc::O_WRONLY,
                0o644,
            )
            .unwrap(),
        );
        let all = read_dir_all(open_dir_beneath(root.as_fd(), b"").unwrap()).unwrap();
        assert_eq!(all.len(), 2001);
        assert!(
            all.iter()
                .any(|e| e.name == b"\xff\xfe" && e.dtype == DT_REG)
        );
    }

    #[test]
    fn xattrs_at_and_fd() {
        let (_d, root) = tmp();
        drop(open_at(root.as_fd(), b"f", libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap());
        let t = XTarget::At(root.as_fd(), b"f");
        assert_eq!(xattr_get(t, b"user.x").unwrap(), None);
        xattr_set(t, b"user.x", b"1", 0).unwrap();
        assert_eq!(xattr_get(t, b"user.x").unwrap().as_deref(), Some(&b"1"[..]));
        assert!(xattr_list(t).unwrap().contains(&b"user.x".to_vec()));
        let big = vec![7u8; 3000];
        xattr_set(t, b"user.big", &big, 0).unwrap();
        let fd = open_at(root.as_fd(), b"f", libc::O_RDONLY, 0).unwrap();
        assert_eq!(
            xattr_get(XTarget::Fd(fd.as_fd()), b"user.big")
                .unwrap()
                .unwrap(),
            big
        );
        xattr_remove(t, b"user.x").unwrap();
        assert_eq!(xattr_get(t, b"user.x").unwrap(), None);
    }
}

// ------------------------------------------------------------------ FUSE over io_uring

/// Size of `struct fuse_uring_req_header`: the request's fuse_in_header (or the reply's
/// fuse_out_header) in the first 128 bytes, the per-operation header in the next 128, then
/// `struct fuse_uring_ent_in_out`.
const RING_HEADER_LEN: usize = 288;
const RING_OP_IN: usize = 128;
const RING_OP_IN_MAX: usize = 128;
const RING_ENT_IN_OUT: usize = 256;
const FUSE_IN_HEADER_LEN: usize = 40;
const FUSE_OUT_HEADER_LEN: usize = 16;
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// One entry's memory: the header block and the payload buffer the kernel copies requests into
/// and replies out of, and the two iovecs that describe them to the kernel.
struct RingSlot {
    header: *mut u8,
    payload: *mut u8,
    payload_len: usize,
    iov: Box<[libc::iovec; 2]>,
}

impl RingSlot {
    fn new(payload_len: usize) -> RingSlot {
        let header = Box::into_raw(vec![0u8; RING_HEADER_LEN].into_boxed_slice()).cast::<u8>();
        let payload = Box::into_raw(vec![0u8; payload_len].into_boxed_slice()).cast::<u8>();
        let iov = Box::new([
            libc::iovec {
                iov_base: header.cast(),
                iov_len: RING_HEADER_LEN,
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_len,
            },
        ]);
        RingSlot {
            header,
            payload,
            payload_len,
            iov,
        }
    }
}

impl Drop for RingSlot {
    fn drop(&mut self) {
        // SAFETY: both pointers came from Box::into_raw of boxed slices of exactly these lengths
        // in RingSlot::new, and are freed only here. The ring (and with it every command that
        // could still write to them) is dropped before the slots: FuseRing declares `ring` first.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.header,
                RING_HEADER_LEN,
            )));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.payload,
                self.payload_len,
            )));
        }
    }
}

/// A request taken from a ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingRequest {
    pub commit_id: u64,
    pub unique: u64,
    pub opcode: u32,
}

/// One FUSE-over-io_uring queue: an io_uring whose entries are registered with the FUSE device
/// for queue `qid`. Each entry is owned by the kernel from its REGISTER or COMMIT_AND_FETCH
/// submission until its completion (a request arrived), then by the daemon until the reply is
/// committed; the daemon touches an entry's memory only in that window, and only one thread
/// does (the ring thread reads the request, then whoever holds the reply writes it).
pub struct FuseRing {
    ring: io_uring::IoUring<io_uring::squeue::Entry128, io_uring::cqueue::Entry>,
    slots: Vec<RingSlot>,
    submit_lock: std::sync::Mutex<()>,
    dev: OwnedFd,
    qid: u16,
}

// SAFETY: the raw pointers in `slots` point to heap memory owned by the FuseRing. Access to an
// entry's memory follows the ownership protocol above (one thread at a time, handed over
// through the ring's completion and the reply object); the submission queue is only touched
// under `submit_lock` and the completion queue only by the ring thread (`wait`).
unsafe impl Send for FuseRing {}
// SAFETY: see Send.
unsafe impl Sync for FuseRing {}

impl FuseRing {
    /// A ring of `depth` entries for queue `qid` of the FUSE connection behind `dev`, each with
    /// a payload buffer of `payload_len` bytes. Nothing is registered yet.
    pub fn new(
        dev: BorrowedFd<'_>,
        qid: u16,
        depth: usize,
        payload_len: usize,
    ) -> io::Result<FuseRing> {
        let entries = u32::try_from(depth + 1)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?
            .next_power_of_two();
        let ring =
            io_uring::IoUring::<io_uring::squeue::Entry128, io_uring::cqueue::Entry>::builder()
                .setup_cqsize(entries * 2)
                .build(entries)?;
        Ok(FuseRing {
            ring,
            slots: (0..depth).map(|_| RingSlot::new(payload_len)).collect(),
            submit_lock: std::sync::Mutex::new(()),
            dev: dev.try_clone_to_owned()?,
            qid,
        })
    }

    /// Whether io_uring with 128-byte entries can be set up here (it may be disabled by
    /// sysctl, seccomp or an old kernel).
    pub fn probe() -> io::Result<()> {
        io_uring::IoUring::<io_uring::squeue::Entry128, io_uring::cqueue::Entry>::builder()
            .build(2)
            .map(drop)
    }

    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of an entry's payload buffer: the largest reply it can carry.
    pub fn payload_len(&self) -> usize {
        self.slots.first().map_or(0, |s| s.payload_len)
    }

    fn command(&self, slot: usize, cmd_op: u32, commit_id: u64) -> io_uring::squeue::Entry128 {
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut op =
            io_uring::opcode::UringCmd80::new(io_uring::types::Fd(self.dev.as_raw_fd()), cmd_op)
                .cmd(cmd);
        if cmd_op == FUSE_IO_URING_CMD_REGISTER {
            op = op.addr(Some(self.slots[slot].iov.as_ptr() as u64));
        }
        let entry = op.build().user_data(slot as u64);
        if cmd_op != FUSE_IO_URING_CMD_REGISTER {
            return entry;
        }
        // The kernel wants sqe->len = 2 (header and payload iovecs); the builder has no setter.
        // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe followed by 64 bytes of command
        // data, 128 bytes with no padding, and every bit pattern is a valid value of it.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // SAFETY: as above; only the u32 `len` field at offset 24 was changed.
        unsafe { std::mem::transmute::<[u8; 128], io_uring::squeue::Entry128>(raw) }
    }

    fn push(&self, entry: &io_uring::squeue::Entry128, submit: bool) -> io::Result<()> {
        let _guard = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the submission queue is only ever accessed under submit_lock. The entry's
        // iovecs and buffers (for REGISTER) live as long as the ring (see RingSlot's Drop).
        unsafe {
            let mut sq = self.ring.submission_shared();
            sq.push(entry)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        if submit {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Hand every entry to the kernel (FUSE_IO_URING_CMD_REGISTER).
    pub fn register_all(&self) -> io::Result<()> {
        for slot in 0..self.slots.len() {
            self.push(&self.command(slot, FUSE_IO_URING_CMD_REGISTER, 0), false)?;
        }
        self.ring.submit()?;
        Ok(())
    }

    /// Re-issue an entry's last command after a transient error.
    pub fn reregister(&self, slot: usize) -> io::Result<()> {
        self.push(&self.command(slot, FUSE_IO_URING_CMD_REGISTER, 0), true)
    }

    /// Submit what is queued, wait for at least one completion, and append (entry, result) of
    /// every completion to `out`. Only the ring thread calls this.
    pub fn wait(&self, out: &mut Vec<(usize, i32)>) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => return Err(e),
            }
        }
        // SAFETY: only the ring thread reads the completion queue.
        let cq = unsafe { self.ring.completion_shared() };
        for cqe in cq {
            out.push((cqe.user_data() as usize, cqe.result()));
        }
        Ok(())
    }

    /// Copy the request in entry `slot` into `buf` as `read()` on the device would return it:
    /// fuse_in_header, per-operation header, payload. `op_header_len` maps (opcode, in.len,
    /// payload size) to the size of the per-operation header.
    pub fn take_request(
        &self,
        slot: usize,
        buf: &mut Vec<u8>,
        op_header_len: impl Fn(u32, usize, usize) -> Option<usize>,
    ) -> (RingRequest, io::Result<()>) {
        let s = &self.slots[slot];
        // SAFETY: the entry's completion arrived, so the kernel is done writing it and this
        // thread owns it (see FuseRing); the header block is RING_HEADER_LEN bytes.
        let header = unsafe { std::slice::from_raw_parts(s.header, RING_HEADER_LEN) };
        let word32 = |o: usize| u32::from_ne_bytes(header[o..o + 4].try_into().unwrap_or_default());
        let word64 = |o: usize| u64::from_ne_bytes(header[o..o + 8].try_into().unwrap_or_default());
        let in_len = word32(0) as usize;
        let opcode = word32(4);
        let unique = word64(8);
        let commit_id = word64(RING_ENT_IN_OUT + 8);
        let payload_sz = word32(RING_ENT_IN_OUT + 16) as usize;
        let id = RingRequest {
            commit_id,
            unique,
            opcode,
        };
        let bad = |what: &str| {
            let e = io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ring request {unique} (opcode {opcode}): {what}"),
            );
            (id, Err(e))
        };
        if payload_sz > s.payload_len {
            return bad("payload larger than the buffer");
        }
        let Some(op_len) =
            op_header_len(opcode, in_len, payload_sz).filter(|&n| n <= RING_OP_IN_MAX)
        else {
            return bad("unknown header size");
        };
        // SAFETY: as above; payload_sz was checked against the buffer's length.
        let payload = unsafe { std::slice::from_raw_parts(s.payload, payload_sz) };
        let total = FUSE_IN_HEADER_LEN + op_len + payload_sz;
        buf.clear();
        buf.extend_from_slice(&header[..FUSE_IN_HEADER_LEN]);
        buf[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
        buf.extend_from_slice(&header[RING_OP_IN..RING_OP_IN + op_len]);
        buf.extend_from_slice(payload);
        (id, Ok(()))
    }

    /// Answer the request in entry `slot` with data written straight into the entry's payload
    /// buffer by `fill` (at most `want` bytes; it returns how many it wrote, or an errno), and
    /// give the entry back to the kernel. Saves the copy `commit` makes of a reply built
    /// elsewhere: for a large READ, that copy is most of what the daemon spends.
    pub fn commit_filled(
        &self,
        slot: usize,
        commit_id: u64,
        unique: u64,
        want: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, i32>,
        submit: bool,
    ) -> io::Result<()> {
        let s = &self.slots[slot];
        let want = want.min(s.payload_len);
        // SAFETY: the daemon owns the entry between its completion and this commit, and the
        // ring thread that calls this holds no reply object for it (see FuseRing).
        let payload = unsafe { std::slice::from_raw_parts_mut(s.payload, want) };
        let (len, errno) = match fill(payload) {
            Ok(n) if n <= want => (n, 0),
            Ok(_) => (0, libc::EIO),
            Err(e) => (0, e),
        };
        // SAFETY: as above; the header block is RING_HEADER_LEN bytes.
        let header = unsafe { std::slice::from_raw_parts_mut(s.header, RING_HEADER_LEN) };
        header[0..4].copy_from_slice(&((FUSE_OUT_HEADER_LEN + len) as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        header[8..16].copy_from_slice(&unique.to_ne_bytes());
        header[RING_ENT_IN_OUT + 16..RING_ENT_IN_OUT + 20]
            .copy_from_slice(&(len as u32).to_ne_bytes());
        self.push(
            &self.command(slot, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id),
            submit,
        )
    }

    /// Write a reply (fuse_out_header then the reply's arguments, as for `write()` on the
    /// device) into entry `slot` and give the entry back to the kernel (COMMIT_AND_FETCH).
    /// `submit`: enter the kernel now; the ring thread passes false while it is between
    /// completions, as its next `wait` submits anyway.
    pub fn commit(
        &self,
        slot: usize,
        commit_id: u64,
        reply: &[std::io::IoSlice<'_>],
        submit: bool,
    ) -> io::Result<()> {
        let s = &self.slots[slot];
        // SAFETY: the daemon owns the entry between its completion and this commit, and the
        // reply object that calls this is the only holder (see FuseRing).
        let header = unsafe { std::slice::from_raw_parts_mut(s.header, RING_HEADER_LEN) };
        // SAFETY: as above.
        let payload = unsafe { std::slice::from_raw_parts_mut(s.payload, s.payload_len) };
        let mut out_header = [0u8; FUSE_OUT_HEADER_LEN];
        let mut header_filled = 0;
        let mut payload_len = 0;
        let mut overflow = false;
        for part in reply {
            let mut part: &[u8] = part;
            if header_filled < FUSE_OUT_HEADER_LEN {
                let n = part.len().min(FUSE_OUT_HEADER_LEN - header_filled);
                out_header[header_filled..header_filled + n].copy_from_slice(&part[..n]);
                header_filled += n;
                part = &part[n..];
            }
            if payload_len + part.len() > payload.len() {
                overflow = true;
                break;
            }
            payload[payload_len..payload_len + part.len()].copy_from_slice(part);
            payload_len += part.len();
        }
        if overflow || header_filled < FUSE_OUT_HEADER_LEN {
            // Tell the kernel the request failed rather than leave it waiting.
            out_header[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            payload_len = 0;
        }
        out_header[0..4]
            .copy_from_slice(&((FUSE_OUT_HEADER_LEN + payload_len) as u32).to_ne_bytes());
        header[..FUSE_OUT_HEADER_LEN].copy_from_slice(&out_header);
        header[RING_ENT_IN_OUT + 16..RING_ENT_IN_OUT + 20]
            .copy_from_slice(&(payload_len as u32).to_ne_bytes());
        self.push(
            &self.command(slot, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, commit_id),
            submit,
        )?;
        if overflow {
            return Err(io::Error::other(
                "reply larger than the ring payload buffer",
            ));
        }
        Ok(())
    }
}

/// Pin the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}
