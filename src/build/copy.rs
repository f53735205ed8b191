//! COPY and ADD: selected sources (of the build context, or of another stage's root) copied
//! into a step's mounted root, with Docker's destination rules.
//!
//! Destination rules: a relative destination is under WORKDIR; a destination ending in `/`, or
//! several sources, is a directory; a source directory's *contents* go into the destination;
//! a single file goes to the destination path, or into it when it is an existing directory.
//! Missing parent directories are created (mode 755, owned by `--chown` or root). Files keep
//! their mode (or take `--chmod`) and their modification time; owners are `--chown` or 0:0,
//! never the context's. Symlinks are copied as symlinks, never followed.
//!
//! Security: the destination is resolved inside the container root only (`openat2` with
//! `RESOLVE_IN_ROOT`, so the image's own symlinks work as they would in the container and
//! can never lead out); files are created with `O_NOFOLLOW|O_EXCL` after removing what was
//! there; sources are read through the [`Context`], which never leaves its root.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::context::{Context, EntryKind, Selected};
use crate::error::{Error, Result, ShowPath};
use crate::sys::{self, Resolve, SetTime};

/// How a COPY/ADD writes what it copies.
#[derive(Clone, Copy, Debug, Default)]
pub struct CopyOptions {
    pub chown: Option<(u32, u32)>,
    /// Permission bits for everything but symlinks.
    pub chmod: Option<u32>,
    /// Keep each entry's own owner (an archive ADD extracts) unless `chown` is given.
    pub keep_owner: bool,
}

/// What a copy wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}

/// A path inside the container: `dest` made absolute against `workdir`, `.` and `..`
/// resolved lexically (never above `/`), as bytes without the leading `/`.
pub fn container_path(workdir: &str, dest: &str) -> Vec<u8> {
    let joined = if dest.starts_with('/') {
        dest.to_string()
    } else {
        format!("{}/{dest}", if workdir.is_empty() { "/" } else { workdir })
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/").into_bytes()
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    }
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_vec(),
        (_, true) => a.to_vec(),
        _ => [a, b"/", b].concat(),
    }
}

fn io_err(what: &str, path: &[u8], e: std::io::Error) -> Error {
    Error::io(format!("{what} /{}", ShowPath(path)), e)
}

/// Open directory `path` in the container root, creating it and its missing parents.
fn ensure_dir(root: BorrowedFd<'_>, path: &[u8], owner: (u32, u32)) -> Result<OwnedFd> {
    match sys::openat2_in(
        root,
        path,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        Resolve::InRoot,
    ) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(Error::invalid(format!(
                "/{}: not a directory in the image",
                ShowPath(path)
            )));
        }
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
            return Err(io_err("opening", path, e));
        }
        Err(_) => {}
    }
    let (parent, name) = split(path);
    let pfd = ensure_dir(root, parent, owner)?;
    match sys::mkdir_at(pfd.as_fd(), name, 0o755) {
        Ok(()) => {
            sys::chown_at(pfd.as_fd(), name, Some(owner.0), Some(owner.1))
                .map_err(|e| io_err("chown", path, e))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(io_err("creating", path, e)),
    }
    sys::openat2_in(
        root,
        path,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        Resolve::InRoot,
    )
    .map_err(|e| io_err("opening", path, e))
}

/// `mkdir -p` of `path` in the container root; new directories get `owner`.
pub fn make_dir(root: BorrowedFd<'_>, path: &[u8], owner: (u32, u32)) -> Result<()> {
    ensure_dir(root, path, owner).map(drop)
}

/// Whether `path` is a directory in the container (following the image's symlinks).
fn is_dir(root: BorrowedFd<'_>, path: &[u8]) -> bool {
    sys::openat2_in(
        root,
        path,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
        Resolve::InRoot,
    )
    .is_ok()
}

/// Remove whatever `dir/name` is (not a directory), so a new object can take its place.
fn clear_slot(dir: BorrowedFd<'_>, name: &[u8], shown: &[u8]) -> Result<()> {
    match sys::stat_at_opt(dir, name).map_err(|e| io_err("stat", shown, e))? {
        None => Ok(()),
        Some(st) if st.is_dir() => Err(Error::invalid(format!(
            "/{}: a directory is in the way of a file",
            ShowPath(shown)
        ))),
        Some(_) => sys::unlink_at(dir, name, false).map_err(|e| io_err("replacing", shown, e)),
    }
}

/// Where an entry of a source lands: a directory's contents under `dest`, a file in `dest`
/// when it is a directory (`into_dir`), else at `dest` itself.
fn target_of(source: &Selected, rel: &[u8], dest: &[u8], into_dir: bool) -> Vec<u8> {
    if source.kind == EntryKind::Dir {
        join(dest, rel)
    } else if into_dir {
        join(dest, source.name())
    } else {
        dest.to_vec()
    }
}

/// Every path a copy would write, with whether it is a directory, in walk order; `dest_is_dir_in_image`
/// says whether `dest` is an existing directory (as [`copy_into`] finds it in its root).
pub fn planned_targets(
    src: &Context,
    selected: &[Selected],
    dest: &[u8],
    dest_is_dir: bool,
    dest_is_dir_in_image: bool,
) -> Result<Vec<(Vec<u8>, bool)>> {
    let mut out = Vec::new();
    for source in selected {
        let into_dir = dest_is_dir || source.kind == EntryKind::Dir || dest_is_dir_in_image;
        for entry in src.walk(source)? {
            out.push((
                target_of(source, &entry.rel, dest, into_dir),
                entry.kind == EntryKind::Dir,
            ));
        }
    }
    Ok(out)
}

/// A copied directory's path, mode, mtime and owner, applied after its contents.
type DirToFinish = (Vec<u8>, u32, sys::Timespec, (u32, u32));

/// Copy `selected` (sources of `src`) to `dest` (resolved with [`container_path`]) in `root`.
/// `dest_is_dir`: the destination ended in `/` or there were several sources.
pub fn copy_into(
    src: &Context,
    selected: &[Selected],
    root: BorrowedFd<'_>,
    dest: &[u8],
    dest_is_dir: bool,
    opts: CopyOptions,
) -> Result<CopyStats> {
    let default_owner = opts.chown.unwrap_or((0, 0));
    let mut stats = CopyStats::default();
    // Directories get their times once their contents are written.
    let mut dirs: Vec<DirToFinish> = Vec::new();
    for source in selected {
        let into_dir = dest_is_dir || source.kind == EntryKind::Dir || is_dir(root, dest);
        for entry in src.walk(source)? {
            let owner = match (opts.chown, opts.keep_owner) {
                (None, true) => (entry.stat.uid, entry.stat.gid),
                _ => default_owner,
            };
            if entry.kind == EntryKind::CharDevice && entry.stat.rdev == 0 {
                // In a layer a character device 0/0 is a whiteout: it would delete, not copy.
                return Err(Error::invalid(format!(
                    "{}: a character device 0/0 (a whiteout) cannot be copied into an image",
                    ShowPath(&entry.path)
                )));
            }
            let target = target_of(source, &entry.rel, dest, into_dir);
            let mode = match (entry.kind, opts.chmod) {
                (EntryKind::Symlink, _) | (_, None) => entry.perm(),
                (_, Some(m)) => m & 0o7777,
            };
            if entry.kind == EntryKind::Dir {
                ensure_dir(root, &target, default_owner)?;
                dirs.push((target, mode, entry.stat.mtime, owner));
                stats.dirs += 1;
                continue;
            }
            let (parent, name) = split(&target);
            if name.is_empty() {
                return Err(Error::invalid(
                    "cannot copy a file over the container's root",
                ));
            }
            let pfd = ensure_dir(root, parent, default_owner)?;
            clear_slot(pfd.as_fd(), name, &target)?;
            match entry.kind {
                EntryKind::File => {
                    let mut from = src.open_entry(&entry)?;
                    let fd = sys::open_at(
                        pfd.as_fd(),
                        name,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                        0o600,
                    )
                    .map_err(|e| io_err("creating", &target, e))?;
                    let mut to = File::from(fd);
                    stats.bytes += std::io::copy(&mut from, &mut to)
                        .map_err(|e| io_err("writing", &target, e))?;
                    sys::fchown(to.as_fd(), Some(owner.0), Some(owner.1))
                        .map_err(|e| io_err("chown", &target, e))?;
                    sys::fchmod(to.as_fd(), mode).map_err(|e| io_err("chmod", &target, e))?;
                    sys::futimens(
                        to.as_fd(),
                        SetTime::At(entry.stat.mtime),
                        SetTime::At(entry.stat.mtime),
                    )
                    .map_err(|e| io_err("setting times of", &target, e))?;
                    stats.files += 1;
                    continue;
                }
                EntryKind::Symlink => {
                    let link = entry.link_target.as_deref().unwrap_or_default();
                    sys::symlink_at(link, pfd.as_fd(), name)
                        .map_err(|e| io_err("creating", &target, e))?;
                }
                EntryKind::Fifo | EntryKind::CharDevice | EntryKind::BlockDevice => {
                    let kind = match entry.kind {
                        EntryKind::Fifo => libc::S_IFIFO,
                        EntryKind::CharDevice => libc::S_IFCHR,
                        _ => libc::S_IFBLK,
                    };
                    sys::mknod_at(pfd.as_fd(), name, kind | (mode & 0o777), entry.stat.rdev)
                        .map_err(|e| io_err("creating", &target, e))?;
                    sys::chmod_at(pfd.as_fd(), name, mode)
                        .map_err(|e| io_err("chmod", &target, e))?;
                }
                // Handled before the match.
                EntryKind::Dir => {}
            }
            sys::chown_at(pfd.as_fd(), name, Some(owner.0), Some(owner.1))
                .map_err(|e| io_err("chown", &target, e))?;
            sys::utimens_at(
                pfd.as_fd(),
                name,
                SetTime::At(entry.stat.mtime),
                SetTime::At(entry.stat.mtime),
            )
            .map_err(|e| io_err("setting times of", &target, e))?;
            stats.files += 1;
        }
    }
    for (path, mode, mtime, owner) in dirs.iter().rev() {
        let fd = sys::openat2_in(
            root,
            path,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
            Resolve::InRoot,
        )
        .map_err(|e| io_err("opening", path, e))?;
        sys::fchown(fd.as_fd(), Some(owner.0), Some(owner.1))
            .map_err(|e| io_err("chown", path, e))?;
        sys::fchmod(fd.as_fd(), *mode).map_err(|e| io_err("chmod", path, e))?;
        sys::futimens(fd.as_fd(), SetTime::At(*mtime), SetTime::At(*mtime))
            .map_err(|e| io_err("setting times of", path, e))?;
    }
    Ok(stats)
}

/// Give everything under `dir` (and `dir` itself) what extracting its layer tar gives: the
/// modification time in whole seconds (the canonical tar keeps no fractions) and the access
/// time equal to it. Directories are done after their contents. Symlinks are not followed.
pub fn whole_second_times(dir: BorrowedFd<'_>) -> Result<()> {
    let whole = |st: &sys::FileStat| {
        let t = sys::Timespec {
            sec: st.mtime.sec,
            nsec: 0,
        };
        (SetTime::At(t), SetTime::At(t))
    };
    for e in sys::read_dir_all(
        sys::open_dir_beneath(dir, b"").map_err(|e| Error::io("reading a layer", e))?,
    )
    .map_err(|e| Error::io("reading a layer", e))?
    {
        let st = sys::stat_at(dir, &e.name).map_err(|err| io_err("stat", &e.name, err))?;
        if st.is_dir() {
            let sub = sys::open_at(
                dir,
                &e.name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|err| io_err("opening", &e.name, err))?;
            whole_second_times(sub.as_fd())?;
        } else {
            let (a, m) = whole(&st);
            sys::utimens_at(dir, &e.name, a, m)
                .map_err(|err| io_err("setting times of", &e.name, err))?;
        }
    }
    let st = sys::fstat(dir).map_err(|e| Error::io("stat of a layer directory", e))?;
    let (a, m) = whole(&st);
    sys::futimens(dir, a, m).map_err(|e| Error::io("setting times of a layer directory", e))
}

/// `--chmod=0755` (octal only, as BuildKit before symbolic modes).
pub fn parse_chmod(s: &str) -> Result<u32> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| Error::invalid(format!("--chmod={s}: want an octal mode such as 0755")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_resolve_against_workdir() {
        let cases = [
            ("/", "app", "app"),
            ("", "app/", "app"),
            ("/srv", "app", "srv/app"),
            ("/srv", ".", "srv"),
            ("/srv", "/abs/x/", "abs/x"),
            ("/srv", "../../../etc", "etc"),
            ("/a/b", "./c/../d", "a/b/d"),
            ("/", "/", ""),
        ];
        for (wd, dest, want) in cases {
            assert_eq!(
                String::from_utf8(container_path(wd, dest)).unwrap(),
                want,
                "{wd} {dest}"
            );
        }
    }

    #[test]
    fn chmod_values() {
        assert_eq!(parse_chmod("755").unwrap(), 0o755);
        assert_eq!(parse_chmod("04755").unwrap(), 0o4755);
        assert!(parse_chmod("u+x").is_err());
        assert!(parse_chmod("77777").is_err());
    }
}
