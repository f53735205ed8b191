//! Mount targets on the rootfs: created before the runtime starts, removed after it if they are
//! still the empty stubs we made.
//!
//! The runtime mounts /proc, /dev, /sys and the generated /etc files over paths of the rootfs,
//! and creates whatever is missing (an empty directory or file, and the parents). In a build
//! those stubs would land in the step's layer. So before the run we create every missing
//! target ourselves, through a directory fd on the rootfs, and record exactly what we created;
//! the runtime then finds them all and creates nothing. After the run we remove each recorded
//! path that is still an empty regular file or an empty directory, deepest first; anything the
//! command put there (a file in a stub /etc, say) keeps it.
//!
//! Symlinks on the way are followed as the runtime follows them (as if the rootfs were `/`,
//! never out of it, at most 40 of them), so the stub is made where the runtime would mount;
//! every recorded path is symlink-free and is reopened with `RESOLVE_NO_SYMLINKS` for removal.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// Symlinks followed while resolving one target before giving up (`ELOOP`), as the kernel.
const MAX_LINKS: u32 = 40;

/// What a target must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Paths created on the rootfs, each relative to it and symlink-free, in creation order
/// (parents first).
#[derive(Debug, Default)]
pub struct Created {
    paths: Vec<Vec<u8>>,
    /// Directories that existed before and got a stub: their times, to put back once the
    /// stubs are gone, so that the rootfs tree is the same as before the run.
    parents: Vec<ParentTimes>,
}

#[derive(Debug)]
struct ParentTimes {
    path: Vec<u8>,
    atime: sys::Timespec,
    mtime: sys::Timespec,
    /// The mtime right after our last stub went in: a different one after the run means the
    /// command changed the directory too, and its new mtime stays.
    mtime_after: sys::Timespec,
}

impl Created {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The created paths, parents first.
    #[cfg(test)]
    pub fn paths(&self) -> &[Vec<u8>] {
        &self.paths
    }

    /// Remove every recorded path that is still an empty stub, deepest first. Paths that are
    /// gone already or hold something are left alone. Returns the paths that remain.
    pub fn remove_stubs(&mut self, root: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
        let mut kept = Vec::new();
        let mut first_err = None;
        // Which parents the command left alone, judged before our removals change them.
        let untouched: Vec<bool> = self
            .parents
            .iter()
            .map(|p| {
                sys::open_beneath(root, &p.path, libc::O_PATH | libc::O_DIRECTORY, 0)
                    .and_then(|fd| sys::fstat(fd.as_fd()))
                    .is_ok_and(|st| st.mtime == p.mtime_after)
            })
            .collect();
        for path in self.paths.drain(..).rev() {
            match remove_if_stub(root, &path) {
                Ok(true) => {}
                Ok(false) => kept.push(path),
                Err(e) => {
                    kept.push(path);
                    first_err.get_or_insert(e);
                }
            }
        }
        kept.reverse();
        for (p, untouched) in self.parents.drain(..).zip(untouched) {
            let holds_kept = kept.iter().any(|k| split_parent(k).0 == p.path.as_slice());
            if !untouched || holds_kept {
                continue;
            }
            let restored = sys::open_dir_beneath(root, &p.path).and_then(|fd| {
                sys::futimens(
                    fd.as_fd(),
                    sys::SetTime::At(p.atime),
                    sys::SetTime::At(p.mtime),
                )
            });
            if let Err(e) = restored {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(kept),
        }
    }
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

/// Remove `path` if it is an empty regular file or an empty directory; `Ok(false)` if it
/// holds something or is something else, `Ok(true)` if removed or already gone.
fn remove_if_stub(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<bool> {
    let (parent, name) = split_parent(path);
    let dir = match sys::open_dir_beneath(root, parent) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(true),
        Err(e) => return Err(e),
    };
    let Some(st) = sys::stat_at_opt(dir.as_fd(), name)? else {
        return Ok(true);
    };
    let stub = if st.is_reg() {
        st.size == 0
    } else if st.is_dir() {
        let fd = sys::open_at(dir.as_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        sys::read_dir_all(fd)?.is_empty()
    } else {
        false
    };
    if !stub {
        return Ok(false);
    }
    match sys::unlink_at(dir.as_fd(), name, st.is_dir()) {
        Ok(()) => Ok(true),
        // Filled between the check and the unlink: it is no stub any more.
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) => Err(e),
    }
}

fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

fn open_resolved(root: BorrowedFd<'_>, parts: &[Vec<u8>]) -> io::Result<OwnedFd> {
    sys::open_beneath(root, &join(parts), libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Make sure `path` (absolute inside the rootfs) exists as `kind`, creating it and its missing
/// parents (directories 0755, files 0644, owned by the caller) and recording what was created
/// in `created`. An existing target of another type is left to the runtime to judge, except a
/// non-directory where a directory is needed on the way, which is `ENOTDIR`.
pub fn ensure(
    root: BorrowedFd<'_>,
    path: &str,
    kind: Kind,
    created: &mut Created,
) -> io::Result<()> {
    let mut todo: VecDeque<Vec<u8>> = components(path.as_bytes()).map(<[u8]>::to_vec).collect();
    // The symlink-free path resolved so far.
    let mut resolved: Vec<Vec<u8>> = Vec::new();
    let mut links = 0;
    while let Some(comp) = todo.pop_front() {
        if comp == b"." {
            continue;
        }
        if comp == b".." {
            // At the root, `..` stays at the root (in-root semantics).
            resolved.pop();
            continue;
        }
        let last = todo.is_empty();
        let dir = open_resolved(root, &resolved)?;
        match sys::stat_at_opt(dir.as_fd(), &comp)? {
            None => {
                let parent = join(&resolved);
                let pre_existing = !created.paths.contains(&parent);
                let before = if pre_existing {
                    Some(sys::fstat(dir.as_fd())?)
                } else {
                    None
                };
                if last && kind == Kind::File {
                    sys::open_at(
                        dir.as_fd(),
                        &comp,
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                        0o644,
                    )?;
                } else {
                    sys::mkdir_at(dir.as_fd(), &comp, 0o755)?;
                }
                if let Some(before) = before {
                    let after = sys::fstat(dir.as_fd())?.mtime;
                    match created.parents.iter_mut().find(|p| p.path == parent) {
                        Some(p) => p.mtime_after = after,
                        None => created.parents.push(ParentTimes {
                            path: parent,
                            atime: before.atime,
                            mtime: before.mtime,
                            mtime_after: after,
                        }),
                    }
                }
                resolved.push(comp);
                created.paths.push(join(&resolved));
            }
            Some(st) if st.is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = sys::readlink_at(dir.as_fd(), &comp)?;
                if target.first() == Some(&b'/') {
                    resolved.clear();
                }
                for c in components(&target).rev() {
                    todo.push_front(c.to_vec());
                }
            }
            Some(st) if st.is_dir() || last => resolved.push(comp),
            Some(_) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    fn setup() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().unwrap();
        let fd = sys::open_dir_path(d.path()).unwrap();
        (d, fd)
    }

    fn s(paths: &[Vec<u8>]) -> Vec<String> {
        paths
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    #[test]
    fn creates_missing_parents_and_removes_them() {
        let (d, root) = setup();
        let mut c = Created::default();
        ensure(root.as_fd(), "/etc/hosts", Kind::File, &mut c).unwrap();
        ensure(root.as_fd(), "/etc/resolv.conf", Kind::File, &mut c).unwrap();
        ensure(root.as_fd(), "/proc", Kind::Dir, &mut c).unwrap();
        ensure(root.as_fd(), "/proc", Kind::Dir, &mut c).unwrap();
        assert_eq!(
            s(c.paths()),
            ["etc", "etc/hosts", "etc/resolv.conf", "proc"]
        );
        assert!(d.path().join("etc/hosts").is_file());
        assert!(d.path().join("proc").is_dir());
        assert!(c.remove_stubs(root.as_fd()).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn keeps_what_the_command_filled() {
        let (d, root) = setup();
        let mut c = Created::default();
        for p in ["/etc/hosts", "/etc/hostname"] {
            ensure(root.as_fd(), p, Kind::File, &mut c).unwrap();
        }
        std::fs::write(d.path().join("etc/hostname"), "written").unwrap();
        std::fs::write(d.path().join("etc/new"), "").unwrap();
        let kept = c.remove_stubs(root.as_fd()).unwrap();
        assert_eq!(s(&kept), ["etc", "etc/hostname"]);
        assert!(!d.path().join("etc/hosts").exists());
        assert!(d.path().join("etc/new").exists());
    }

    #[test]
    fn parent_times_come_back_unless_the_command_changed_them() {
        let (d, root) = setup();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::create_dir(d.path().join("var")).unwrap();
        for dir in [d.path(), &d.path().join("etc"), &d.path().join("var")] {
            let f = std::fs::File::open(dir).unwrap();
            f.set_times(
                std::fs::FileTimes::new()
                    .set_modified(old)
                    .set_accessed(old),
            )
            .unwrap();
        }
        let mut c = Created::default();
        for p in ["/etc/hosts", "/etc/hostname", "/var/x", "/proc"] {
            ensure(root.as_fd(), p, Kind::File, &mut c).unwrap();
        }
        // The command writes into /var: its mtime is the command's.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(d.path().join("var/new"), "").unwrap();
        c.remove_stubs(root.as_fd()).unwrap();
        let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(mtime(d.path()), old);
        assert_eq!(mtime(&d.path().join("etc")), old);
        assert_ne!(mtime(&d.path().join("var")), old);
    }

    #[test]
    fn existing_targets_are_not_recorded() {
        let (d, root) = setup();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/hosts"), "").unwrap();
        let mut c = Created::default();
        ensure(root.as_fd(), "/etc/hosts", Kind::File, &mut c).unwrap();
        assert!(c.is_empty());
        assert!(c.remove_stubs(root.as_fd()).unwrap().is_empty());
        assert!(d.path().join("etc/hosts").exists());
    }

    #[test]
    fn symlinks_are_followed_inside_the_root() {
        let (d, root) = setup();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        // A dangling absolute link, as /etc/resolv.conf in systemd images.
        symlink(
            "/run/systemd/resolve/stub.conf",
            d.path().join("etc/resolv.conf"),
        )
        .unwrap();
        // A relative link climbing above the root stays at the root.
        symlink("../../../../../elsewhere", d.path().join("etc/hosts")).unwrap();
        let mut c = Created::default();
        ensure(root.as_fd(), "/etc/resolv.conf", Kind::File, &mut c).unwrap();
        ensure(root.as_fd(), "/etc/hosts", Kind::File, &mut c).unwrap();
        assert_eq!(
            s(c.paths()),
            [
                "run",
                "run/systemd",
                "run/systemd/resolve",
                "run/systemd/resolve/stub.conf",
                "elsewhere"
            ]
        );
        assert!(d.path().join("elsewhere").is_file());
        assert!(c.remove_stubs(root.as_fd()).unwrap().is_empty());
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["etc"]);
    }

    #[test]
    fn loops_and_files_in_the_way_fail() {
        let (d, root) = setup();
        symlink("/a", d.path().join("a")).unwrap();
        std::fs::write(d.path().join("f"), "x").unwrap();
        let mut c = Created::default();
        let e = ensure(root.as_fd(), "/a/x", Kind::File, &mut c).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = ensure(root.as_fd(), "/f/x", Kind::Dir, &mut c).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
        // A file where a directory is wanted, as the last component, is the runtime's call.
        ensure(root.as_fd(), "/f", Kind::Dir, &mut c).unwrap();
        assert!(c.is_empty());
    }
}
