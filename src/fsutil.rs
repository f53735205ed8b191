//! Small filesystem helpers over [`crate::sys`] used by the store and the layer code: removing
//! trees and writing files atomically, always through directory fds and never following a
//! symlink (a symlink inside a tree is removed, not followed); and whether a path is a mount
//! point of this mount namespace.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};

use crate::sys;

/// Remove `dir/name` whatever it is (a directory with all its contents). Returns the bytes of
/// disk space released: allocated blocks of every removed object whose last link went.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<u64> {
    let st = sys::stat_at(dir, name)?;
    let mut freed = 0;
    if st.is_dir() {
        let fd = sys::open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        freed += remove_contents(fd.as_fd())?;
    }
    sys::unlink_at(dir, name, st.is_dir())?;
    if st.is_dir() || st.nlink <= 1 {
        freed += st.blocks * 512;
    }
    Ok(freed)
}

/// Remove everything inside the directory `dir`; returns the bytes released.
pub fn remove_contents(dir: BorrowedFd<'_>) -> io::Result<u64> {
    // Read the names first so no directory stream stays open while descending.
    let entries = sys::read_dir_all(sys::open_dir_beneath(dir, b"")?)?;
    let mut freed = 0;
    for e in entries {
        match remove_tree(dir, &e.name) {
            Ok(n) => freed += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(freed)
}

/// Allocated bytes of a tree (each inode counted once per call).
pub fn tree_size(dir: BorrowedFd<'_>) -> io::Result<u64> {
    let mut seen = std::collections::HashSet::new();
    tree_size_in(dir, &mut seen)
}

fn tree_size_in(dir: BorrowedFd<'_>, seen: &mut std::collections::HashSet<u64>) -> io::Result<u64> {
    let mut total = sys::fstat(dir)?.blocks * 512;
    for e in sys::read_dir_all(sys::open_dir_beneath(dir, b"")?)? {
        let st = sys::stat_at(dir, &e.name)?;
        if st.is_dir() {
            let fd = sys::open_at(dir, &e.name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            total += tree_size_in(fd.as_fd(), seen)?;
        } else if st.nlink <= 1 || seen.insert(st.ino) {
            total += st.blocks * 512;
        }
    }
    Ok(total)
}

/// Write `data` to `dir/name` atomically: a temporary name in the same directory, fsync,
/// rename over `name`, fsync the directory.
pub fn write_atomic(dir: BorrowedFd<'_>, name: &[u8], data: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = b".tmp.".to_vec();
    tmp.extend_from_slice(format!("{}.", sys::getpid()).as_bytes());
    tmp.extend_from_slice(name);
    tmp.truncate(sys::NAME_MAX);
    let _ = sys::unlink_at(dir, &tmp, false);
    let fd = sys::open_at(
        dir,
        &tmp,
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        mode,
    )?;
    let res = (|| {
        let mut f = std::fs::File::from(fd);
        f.write_all(data)?;
        sys::fsync(f.as_fd(), false)?;
        drop(f);
        sys::rename_at(dir, &tmp, dir, name, 0)?;
        sys::fsync(dir, false)
    })();
    if res.is_err() {
        let _ = sys::unlink_at(dir, &tmp, false);
    }
    res
}

/// Read a small file `dir/name` (at most `limit` bytes; larger is an error).
pub fn read_small(dir: BorrowedFd<'_>, name: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let fd = sys::open_beneath(dir, name, libc::O_RDONLY, 0)?;
    let mut f = std::fs::File::from(fd);
    let mut out = Vec::new();
    (&mut f).take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

/// Undo the octal escapes of `/proc/self/mountinfo` (`\040` for a space, ...).
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Whether a mount at exactly `mountpoint` shows in `/proc/self/mountinfo`.
pub fn is_mounted(mountpoint: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let want = mountpoint.as_os_str().as_bytes();
    info.split(|&b| b == b'\n').any(|line| {
        line.split(|&b| b == b' ')
            .nth(4)
            .is_some_and(|f| unescape_mountinfo(f) == want)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_never_follows_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::write(t.join("a/b/f"), vec![1u8; 10000]).unwrap();
        std::fs::hard_link(t.join("a/b/f"), t.join("a/f2")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("a/out")).unwrap();
        let root = sys::open_dir_path(d.path()).unwrap();
        let size = tree_size(sys::open_dir_path(&t).unwrap().as_fd()).unwrap();
        let freed = remove_tree(root.as_fd(), b"t").unwrap();
        assert!(!t.exists());
        assert!(outside.path().join("keep").exists());
        assert!(freed >= 10000, "{freed}");
        assert_eq!(freed, size);
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let root = sys::open_dir_path(d.path()).unwrap();
        write_atomic(root.as_fd(), b"f", b"one", 0o644).unwrap();
        write_atomic(root.as_fd(), b"f", b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert_eq!(read_small(root.as_fd(), b"f", 3).unwrap(), b"two");
        assert!(read_small(root.as_fd(), b"f", 2).is_err());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(br"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(br"/tab\011x\134"), b"/tab\tx\\");
        assert_eq!(unescape_mountinfo(br"/end\04"), br"/end\04");
    }

    #[test]
    fn root_is_mounted() {
        assert!(is_mounted(std::path::Path::new("/proc")));
        assert!(!is_mounted(std::path::Path::new("/definitely/not/mounted")));
    }
}
