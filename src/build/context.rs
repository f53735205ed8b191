//! The build context: a directory on the host, read as hostile input.
//!
//! Everything here goes through the context's directory fd with the [`crate::sys`] wrappers:
//! directories are opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)`, single names
//! with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, so no symlink in the context, and no rename racing
//! the build, can make layerfs read outside it. Paths are bytes relative to the context root
//! (`""` is the root), never strings.
//!
//! What it offers the builder:
//!
//! - [`Context::select`]: the sources a COPY/ADD names. The source is cleaned like Go's
//!   `filepath.Clean`; a leading `/` or `.` means the context root; a `..` that leaves the
//!   context is refused. Components from the first one with a wildcard on are matched with
//!   Go's `filepath.Match` rules against the real directories (symlinks are not descended
//!   there, as in BuildKit). Symlinks in the literal part of the path are followed when they
//!   stay inside the context (an absolute target, or a `..` above the root, is refused); a
//!   source that is itself a symlink is selected as the symlink, unless the source ends in `/`
//!   (then it must lead to a directory inside the context). Ignored paths do not exist for
//!   selection; an excluded directory is still found when an exception re-includes something
//!   below it, and then only that is walked. Nothing matched is an error naming the source.
//! - [`Context::walk`]: the entries of a selected source, depth-first, siblings sorted by name
//!   bytes, ignored paths left out (excluded directories are entered only when
//!   [`IgnoreRules::may_include_below`] says an exception might apply, and listed only when
//!   something below them is). Symlinks are entries, never followed; sockets are skipped (a
//!   layer cannot hold them). [`Context::open_entry`] opens a file's content again by its path
//!   with no symlink allowed and checks it is the same inode that was walked.
//! - [`Context::manifest`] / [`Context::digest_selection`]: the build cache's view of a
//!   selection. Per entry: path, type, permission bits (after `--chmod`), owner (after
//!   `--chown`, else 0:0, which is what COPY gives: the context's owners never count), device
//!   number, symlink target and content sha256. Never timestamps, so a `touch` keeps the key.
//!   [`explain_changes`] compares two manifests for a one-line reason a cache key changed.
//! - [`StatCache`]: content digests keyed by (dev, ino, size, mtime, ctime, mode), as git's
//!   index does, so a rebuild reads only files whose stat changed. A file changed within
//!   [`RACY_WINDOW_NS`] of hashing is not remembered (its timestamps may not move on the next
//!   change, the "racy git" problem).
//! - [`load_ignore_rules`]: finds and reads the ignore file that applies (see
//!   [`crate::build::ignore`] for the choice). The ignore file and the Containerfile are read
//!   regardless of the rules; the rules only hide them from COPY/ADD, as in Docker.
//!
//! Differences from Docker worth knowing: BuildKit follows a source that is itself a symlink
//! (inside the context) and copies the target; layerfs copies the symlink. BuildKit maps
//! `COPY ../x` to `x`; layerfs refuses it, like Docker's older builder. BuildKit resolves an
//! absolute symlink target against the context root; layerfs refuses it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::build::ignore::{self, Glob, IgnoreFileLocation, IgnoreRules, Matched};
use crate::digest::{Digest, HashReader};
use crate::error::{Error, Result, ShowPath};
use crate::oci::path::components;
use crate::sys::{self, FileStat};

/// Symlinks followed while resolving one source, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINK_HOPS: usize = 40;
/// Largest ignore file read.
const MAX_IGNORE_FILE: u64 = 16 << 20;
/// Read size while hashing file content.
const HASH_BUFFER: usize = 256 << 10;

mod manifest;
mod stat_cache;

pub use manifest::{EntryDigest, Manifest, digest_manifest, explain_changes};
use stat_cache::StatKey;
pub use stat_cache::{RACY_WINDOW_NS, StatCache};

/// The build context, opened.
pub struct Context {
    root: OwnedFd,
    rules: IgnoreRules,
}

/// What an entry is. Sockets have no kind: they are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
}

impl EntryKind {
    /// The kind of a stat result; `None` for sockets.
    pub fn of(stat: &FileStat) -> Option<EntryKind> {
        Some(match stat.file_type() {
            sys::S_IFREG => EntryKind::File,
            sys::S_IFDIR => EntryKind::Dir,
            sys::S_IFLNK => EntryKind::Symlink,
            sys::S_IFIFO => EntryKind::Fifo,
            sys::S_IFCHR => EntryKind::CharDevice,
            sys::S_IFBLK => EntryKind::BlockDevice,
            _ => return None,
        })
    }

    /// Stable number for digests (never reorder).
    fn tag(self) -> u8 {
        match self {
            EntryKind::File => 1,
            EntryKind::Dir => 2,
            EntryKind::Symlink => 3,
            EntryKind::Fifo => 4,
            EntryKind::CharDevice => 5,
            EntryKind::BlockDevice => 6,
        }
    }
}

/// One source a COPY/ADD named, after wildcards and symlinks in its path.
#[derive(Clone, Debug)]
pub struct Selected {
    /// Real path relative to the context root, no symlink in it (`""` is the root).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub stat: FileStat,
}

impl Selected {
    /// The last component (what the source is called at its destination); empty for the root.
    pub fn name(&self) -> &[u8] {
        base_name(&self.path)
    }
}

/// One entry of a walk.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Path relative to the context root.
    pub path: Vec<u8>,
    /// Path relative to the selected source; empty for the source itself.
    pub rel: Vec<u8>,
    pub kind: EntryKind,
    /// Mode, owner, size, device number, inode as the context has them.
    pub stat: FileStat,
    /// A symlink's target, as stored (never followed).
    pub link_target: Option<Vec<u8>>,
}

impl Entry {
    /// Permission bits including setuid/setgid/sticky.
    pub fn perm(&self) -> u32 {
        self.stat.perm()
    }
}

/// An entry of a directory being read: its name, stat and symlink target.
struct Child {
    name: Vec<u8>,
    stat: FileStat,
    link_target: Option<Vec<u8>>,
}

/// `dir/name`, or `name` at the root.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut out = Vec::with_capacity(dir.len() + 1 + name.len());
    out.extend_from_slice(dir);
    out.push(b'/');
    out.extend_from_slice(name);
    out
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    }
}

fn base_name(path: &[u8]) -> &[u8] {
    split_parent(path).1
}

/// A context path for messages: the root shows as `.`.
fn shown(path: &[u8]) -> ShowPath<'_> {
    ShowPath(if path.is_empty() { b"." } else { path })
}

fn is_errno(e: &std::io::Error, code: i32) -> bool {
    e.raw_os_error() == Some(code)
}

impl Context {
    /// Open the context directory `dir` (a path the user gave; the only host path used).
    pub fn open(dir: &Path, rules: IgnoreRules) -> Result<Context> {
        let root = sys::open_dir_path(dir)
            .map_err(|e| Error::io(format!("open build context {}", crate::error::show(dir)), e))?;
        Ok(Context::from_fd(root, rules))
    }

    /// A context from an already open directory fd.
    pub fn from_fd(root: OwnedFd, rules: IgnoreRules) -> Context {
        Context { root, rules }
    }

    /// The context directory.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    pub fn rules(&self) -> &IgnoreRules {
        &self.rules
    }

    /// The sources `src` (as written in a COPY/ADD) names; see the module doc for the rules.
    pub fn select(&self, src: &[u8]) -> Result<Vec<Selected>> {
        if src.is_empty() {
            return Err(Error::invalid("no source files were specified"));
        }
        if src.contains(&0) {
            return Err(Error::invalid(format!(
                "\"{}\": NUL byte in source path",
                ShowPath(src)
            )));
        }
        let wants_dir = src.len() > 1 && src.ends_with(b"/");
        let cleaned = ignore::clean_path(src);
        let relative = cleaned.strip_prefix(b"/").unwrap_or(&cleaned);
        if relative == b".." || relative.starts_with(b"../") {
            return Err(Error::invalid(format!(
                "{}: outside the build context",
                ShowPath(src)
            )));
        }
        let comps: Vec<&[u8]> = match relative {
            b"" | b"." => Vec::new(),
            rel => rel.split(|&b| b == b'/').collect(),
        };
        let Some(first_wild) = comps.iter().position(|c| ignore::has_wildcards(c)) else {
            let found = self.resolve(b"", &comps, wants_dir, src)?;
            if !self.visible(&found)? {
                return Err(self.not_found(src, &found.path));
            }
            return Ok(vec![found]);
        };
        let base = self.resolve(b"", &comps[..first_wild], true, src)?;
        if base.kind != EntryKind::Dir || !self.visible(&base)? {
            return Err(no_match(src));
        }
        let globs = comps[first_wild..]
            .iter()
            .map(|c| Glob::path_match(c))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|reason| {
                Error::invalid(format!("\"{}\": bad pattern: {reason}", ShowPath(src)))
            })?;
        let mut found = Vec::new();
        self.glob_in(&base.path, &base.stat, &globs, wants_dir, src, &mut found)?;
        if found.is_empty() {
            return Err(no_match(src));
        }
        Ok(found)
    }

    /// `"src": not found`, saying which ignore line hides it when one does.
    fn not_found(&self, src: &[u8], path: &[u8]) -> Error {
        match self.rules.deciding_line(path) {
            Some((line, false)) => Error::invalid(format!(
                "\"{}\": not found (excluded by the ignore file, line {line})",
                ShowPath(src)
            )),
            _ => Error::invalid(format!("\"{}\": not found", ShowPath(src))),
        }
    }

    /// Follow `comps` from the directory `start`, resolving symlinks inside the context.
    /// The last component is followed only when `follow_last`.
    fn resolve(
        &self,
        start: &[u8],
        comps: &[&[u8]],
        follow_last: bool,
        src: &[u8],
    ) -> Result<Selected> {
        let mut dirs: Vec<Vec<u8>> = components(start).map(<[u8]>::to_vec).collect();
        let mut queue: VecDeque<Vec<u8>> = comps.iter().map(|c| c.to_vec()).collect();
        let mut hops = 0;
        let mut last_link: Option<Vec<u8>> = None;
        while let Some(comp) = queue.pop_front() {
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if dirs.pop().is_none() {
                        return Err(escape(src, last_link.as_deref().unwrap_or(b"")));
                    }
                    continue;
                }
                _ => {}
            }
            let dir_path = dirs.join(&b'/');
            let path = join(&dir_path, &comp);
            let dir = self.open_dir(&dir_path)?;
            let stat = match sys::stat_at(dir.as_fd(), &comp) {
                Ok(st) => st,
                Err(e) if is_errno(&e, libc::ENOENT) || is_errno(&e, libc::ENAMETOOLONG) => {
                    return Err(self.not_found(src, &path));
                }
                Err(e) => return Err(Error::io(format!("stat {}", shown(&path)), e)),
            };
            let last = queue.is_empty();
            if stat.is_symlink() && (!last || follow_last) {
                // A symlink that was not sent to the build cannot be followed either.
                if self.rules.matches(&path) {
                    return Err(self.not_found(src, &path));
                }
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(Error::invalid(format!(
                        "\"{}\": too many levels of symbolic links",
                        ShowPath(src)
                    )));
                }
                let target = sys::readlink_at(dir.as_fd(), &comp)
                    .map_err(|e| Error::io(format!("readlink {}", shown(&path)), e))?;
                if target.first() == Some(&b'/') {
                    return Err(escape(src, &path));
                }
                for part in target.split(|&b| b == b'/').rev() {
                    queue.push_front(part.to_vec());
                }
                last_link = Some(path);
                continue;
            }
            if last {
                let kind = EntryKind::of(&stat).ok_or_else(|| self.not_found(src, &path))?;
                return Ok(Selected { path, kind, stat });
            }
            if !stat.is_dir() {
                return Err(self.not_found(src, &path));
            }
            dirs.push(comp);
        }
        // Nothing named, or the path ended in `.`/`..`: the directory reached is the source.
        let path = dirs.join(&b'/');
        let stat = sys::fstat(self.open_dir(&path)?.as_fd())
            .map_err(|e| Error::io(format!("stat {}", shown(&path)), e))?;
        Ok(Selected {
            path,
            kind: EntryKind::Dir,
            stat,
        })
    }

    /// Match the component patterns `globs` below the directory `dir_path`, in name order.
    fn glob_in(
        &self,
        dir_path: &[u8],
        dir_stat: &FileStat,
        globs: &[Glob],
        wants_dir: bool,
        src: &[u8],
        found: &mut Vec<Selected>,
    ) -> Result<()> {
        let Some((glob, rest)) = globs.split_first() else {
            return Ok(());
        };
        for child in self.read_dir(dir_path, dir_stat)? {
            if !glob.matches(&child.name) {
                continue;
            }
            let path = join(dir_path, &child.name);
            if !rest.is_empty() {
                if child.stat.is_dir()
                    && (!self.rules.matches(&path) || self.rules.may_include_below(&path))
                {
                    self.glob_in(&path, &child.stat, rest, wants_dir, src, found)?;
                }
                continue;
            }
            let candidate = if child.stat.is_symlink() && wants_dir {
                if self.rules.matches(&path) {
                    continue;
                }
                self.resolve(dir_path, &[&child.name], true, src)?
            } else {
                let Some(kind) = EntryKind::of(&child.stat) else {
                    continue;
                };
                Selected {
                    path,
                    kind,
                    stat: child.stat,
                }
            };
            if self.visible(&candidate)? {
                found.push(candidate);
            }
        }
        Ok(())
    }

    /// Whether a selected path is in the context as sent: not excluded, or an excluded
    /// directory with something re-included below it.
    fn visible(&self, selected: &Selected) -> Result<bool> {
        if !self.rules.matches(&selected.path) {
            return Ok(true);
        }
        if selected.kind != EntryKind::Dir || !self.rules.may_include_below(&selected.path) {
            return Ok(false);
        }
        let mut out = Vec::new();
        self.walk_into(selected, &mut out, true)?;
        Ok(!out.is_empty())
    }

    /// Every entry of a selected source: the source itself first (relative path `""`), then
    /// what is below it, depth-first, siblings in name-byte order, ignored paths left out.
    pub fn walk(&self, selected: &Selected) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.walk_into(selected, &mut out, false)?;
        Ok(out)
    }

    /// The walk behind [`Context::walk`]; with `first_only`, stops at the first entry found.
    fn walk_into(&self, selected: &Selected, out: &mut Vec<Entry>, first_only: bool) -> Result<()> {
        /// A directory being walked: `matched` is which ignore rules match it or its parents;
        /// `pending` holds its own entry while it is excluded and nothing below it has been
        /// listed yet.
        struct Frame {
            path: Vec<u8>,
            rel: Vec<u8>,
            matched: Matched,
            children: std::vec::IntoIter<Child>,
            pending: Option<Entry>,
        }
        fn flush_pending(stack: &mut [Frame], out: &mut Vec<Entry>) {
            out.extend(stack.iter_mut().filter_map(|f| f.pending.take()));
        }

        let link_target = match selected.kind {
            EntryKind::Symlink => Some(self.read_link(&selected.path)?),
            _ => None,
        };
        let top = Entry {
            path: selected.path.clone(),
            rel: Vec::new(),
            kind: selected.kind,
            stat: selected.stat,
            link_target,
        };
        let matched = self.rules.matched(&selected.path);
        let excluded = self.rules.excluded(&matched);
        if selected.kind != EntryKind::Dir {
            if !excluded {
                out.push(top);
            }
            return Ok(());
        }
        if excluded
            && !self
                .rules
                .may_include_below_matched(&matched, &selected.path)
        {
            return Ok(());
        }
        let children = self.read_dir(&selected.path, &selected.stat)?;
        let pending = if excluded {
            Some(top)
        } else {
            out.push(top);
            if first_only {
                return Ok(());
            }
            None
        };
        let mut stack = vec![Frame {
            path: selected.path.clone(),
            rel: Vec::new(),
            matched,
            children: children.into_iter(),
            pending,
        }];
        while let Some(frame) = stack.last_mut() {
            let Some(child) = frame.children.next() else {
                stack.pop();
                continue;
            };
            let Some(kind) = EntryKind::of(&child.stat) else {
                continue;
            };
            let entry = Entry {
                path: join(&frame.path, &child.name),
                rel: join(&frame.rel, &child.name),
                kind,
                stat: child.stat,
                link_target: child.link_target,
            };
            let matched = self.rules.matched_child(&frame.matched, &entry.path);
            let excluded = self.rules.excluded(&matched);
            if kind == EntryKind::Dir {
                if excluded && !self.rules.may_include_below_matched(&matched, &entry.path) {
                    continue;
                }
                let children = match self.read_dir(&entry.path, &entry.stat) {
                    Ok(children) => children,
                    // Docker does not mind an unreadable directory it would not send.
                    Err(e) if excluded && e.is(libc::EACCES) => continue,
                    Err(e) => return Err(e),
                };
                let (path, rel) = (entry.path.clone(), entry.rel.clone());
                let pending = if excluded {
                    Some(entry)
                } else {
                    flush_pending(&mut stack, out);
                    out.push(entry);
                    None
                };
                stack.push(Frame {
                    path,
                    rel,
                    matched,
                    children: children.into_iter(),
                    pending,
                });
            } else if !excluded {
                flush_pending(&mut stack, out);
                out.push(entry);
            }
            if first_only && !out.is_empty() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Open a directory of the context by its real path (no symlink may appear in it).
    fn open_dir(&self, path: &[u8]) -> Result<OwnedFd> {
        sys::open_dir_beneath(self.root.as_fd(), path)
            .map_err(|e| Error::io(format!("open {} in the build context", shown(path)), e))
    }

    /// A directory's entries with their stats and symlink targets, sorted by name. Fails if
    /// the directory is no longer the inode `expect` describes.
    fn read_dir(&self, path: &[u8], expect: &FileStat) -> Result<Vec<Child>> {
        let fd = self.open_dir(path)?;
        check_same(path, &fd, expect)?;
        let mut reader =
            sys::DirReader::new(fd).map_err(|e| Error::io(format!("read {}", shown(path)), e))?;
        let mut children = Vec::new();
        loop {
            let next = reader
                .next_entry()
                .map_err(|e| Error::io(format!("read {}", shown(path)), e))?;
            let Some(raw) = next else { break };
            let stat = match sys::stat_at(reader.fd(), &raw.name) {
                Ok(stat) => stat,
                // Removed since the directory was listed: it is simply not there.
                Err(e) if is_errno(&e, libc::ENOENT) => continue,
                Err(e) => {
                    let at = join(path, &raw.name);
                    return Err(Error::io(format!("stat {}", shown(&at)), e));
                }
            };
            let link_target = if stat.is_symlink() {
                let target = sys::readlink_at(reader.fd(), &raw.name).map_err(|e| {
                    Error::io(format!("readlink {}", shown(&join(path, &raw.name))), e)
                })?;
                Some(target)
            } else {
                None
            };
            children.push(Child {
                name: raw.name,
                stat,
                link_target,
            });
        }
        children.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(children)
    }

    fn read_link(&self, path: &[u8]) -> Result<Vec<u8>> {
        let (parent, name) = split_parent(path);
        let dir = self.open_dir(parent)?;
        sys::readlink_at(dir.as_fd(), name)
            .map_err(|e| Error::io(format!("readlink {}", shown(path)), e))
    }

    /// Open a walked regular file for reading its content. The path is opened again with no
    /// symlink allowed anywhere in it, and must still be the inode the walk saw.
    pub fn open_entry(&self, entry: &Entry) -> Result<File> {
        if entry.kind != EntryKind::File {
            return Err(Error::invalid(format!(
                "{}: not a regular file",
                shown(&entry.path)
            )));
        }
        // O_NONBLOCK: should a FIFO have replaced the file, the open must not hang.
        let fd = sys::open_beneath(
            self.root.as_fd(),
            &entry.path,
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )
        .map_err(|e| Error::io(format!("open {}", shown(&entry.path)), e))?;
        check_same(&entry.path, &fd, &entry.stat)?;
        Ok(File::from(fd))
    }

    /// Per-entry digests of the selected sources, in walk order (see the module doc for what
    /// enters them). `chmod` replaces the permission bits of everything but symlinks; `chown`
    /// the owner of everything (0:0 when absent).
    pub fn manifest(
        &self,
        selected: &[Selected],
        chmod: Option<u32>,
        chown: Option<(u32, u32)>,
        cache: &mut StatCache,
    ) -> Result<Manifest> {
        let (uid, gid) = chown.unwrap_or((0, 0));
        let mut out = Vec::new();
        for source in selected {
            for entry in self.walk(source)? {
                let content = match entry.kind {
                    EntryKind::File => Some(self.content_digest(&entry, cache)?),
                    _ => None,
                };
                let mode = match (entry.kind, chmod) {
                    (EntryKind::Symlink, _) | (_, None) => entry.perm(),
                    (_, Some(mode)) => mode & 0o7777,
                };
                let rdev = match entry.kind {
                    EntryKind::CharDevice | EntryKind::BlockDevice => entry.stat.rdev,
                    _ => 0,
                };
                out.push((
                    entry.path,
                    EntryDigest {
                        kind: entry.kind,
                        mode,
                        uid,
                        gid,
                        rdev,
                        link_target: entry.link_target,
                        content,
                    },
                ));
            }
        }
        Ok(out)
    }

    /// The build cache digest of the selected sources: [`digest_manifest`] of their
    /// [`Context::manifest`].
    pub fn digest_selection(
        &self,
        selected: &[Selected],
        chmod: Option<u32>,
        chown: Option<(u32, u32)>,
        cache: &mut StatCache,
    ) -> Result<Digest> {
        Ok(digest_manifest(
            &self.manifest(selected, chmod, chown, cache)?,
        ))
    }

    /// The sha256 of a walked file's content, from the stat cache when its stat is unchanged.
    fn content_digest(&self, entry: &Entry, cache: &mut StatCache) -> Result<Digest> {
        if let Some(digest) = cache.lookup(&StatKey::of(&entry.stat)) {
            return Ok(digest);
        }
        let file = self.open_entry(entry)?;
        let stat_key = |file: &File| {
            sys::fstat(file.as_fd())
                .map(|st| StatKey::of(&st))
                .map_err(|e| Error::io(format!("stat {}", shown(&entry.path)), e))
        };
        let before = stat_key(&file)?;
        let mut reader = HashReader::new(BufReader::with_capacity(HASH_BUFFER, file));
        std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| Error::io(format!("read {}", shown(&entry.path)), e))?;
        let after = stat_key(reader.inner.get_ref())?;
        let digest = reader.hasher.finish();
        cache.record(before, after, digest);
        Ok(digest)
    }
}

fn no_match(src: &[u8]) -> Error {
    Error::invalid(format!(
        "\"{}\": no source files were specified (nothing in the build context matches)",
        ShowPath(src)
    ))
}

fn escape(src: &[u8], link: &[u8]) -> Error {
    Error::invalid(format!(
        "{}: outside the build context (symlink {} points out of it)",
        ShowPath(src),
        shown(link)
    ))
}

/// Fail unless `fd` is still the inode `expect` describes (a rename raced the build).
fn check_same(path: &[u8], fd: &OwnedFd, expect: &FileStat) -> Result<()> {
    let now = sys::fstat(fd.as_fd()).map_err(|e| Error::io(format!("stat {}", shown(path)), e))?;
    if (now.dev, now.ino, now.file_type()) != (expect.dev, expect.ino, expect.file_type()) {
        return Err(Error::invalid(format!(
            "{}: changed in the build context while it was read",
            shown(path)
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ignore file

/// Find and parse the ignore file that applies: `build_file` is the directory holding the
/// Containerfile and its base name, when there is one. Files are opened with
/// `RESOLVE_IN_ROOT` relative to their directory (a symlink may point elsewhere in it, never
/// out). Returns the rules and where they came from (`None`: no ignore file, no rules).
pub fn load_ignore_rules(
    context_dir: BorrowedFd<'_>,
    build_file: Option<(BorrowedFd<'_>, &[u8])>,
) -> Result<(IgnoreRules, Option<IgnoreFileLocation>)> {
    for candidate in ignore::ignore_file_candidates(build_file.map(|(_, name)| name)) {
        let (dir, name) = match (&candidate, build_file) {
            (IgnoreFileLocation::BesideBuildFile(name), Some((dir, _))) => (dir, name.as_slice()),
            (IgnoreFileLocation::BesideBuildFile(_), None) => continue,
            (IgnoreFileLocation::ContextRoot(name), _) => (context_dir, *name),
        };
        let Some(text) = read_ignore_file(dir, name)? else {
            continue;
        };
        let rules =
            IgnoreRules::parse(&text).map_err(|e| Error::invalid(format!("{candidate}: {e}")))?;
        return Ok((rules, Some(candidate)));
    }
    Ok((IgnoreRules::default(), None))
}

/// The content of `dir/name`, `None` when it does not exist.
fn read_ignore_file(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<Vec<u8>>> {
    let fd = match sys::openat2_in(
        dir,
        name,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
        sys::Resolve::InRoot,
    ) {
        Ok(fd) => fd,
        Err(e) if is_errno(&e, libc::ENOENT) => return Ok(None),
        Err(e) => return Err(Error::io(format!("open {}", ShowPath(name)), e)),
    };
    let stat =
        sys::fstat(fd.as_fd()).map_err(|e| Error::io(format!("stat {}", ShowPath(name)), e))?;
    if !stat.is_reg() {
        return Err(Error::invalid(format!(
            "{}: not a regular file",
            ShowPath(name)
        )));
    }
    let mut text = Vec::new();
    File::from(fd)
        .take(MAX_IGNORE_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| Error::io(format!("read {}", ShowPath(name)), e))?;
    if text.len() as u64 > MAX_IGNORE_FILE {
        return Err(Error::invalid(format!(
            "{}: larger than {MAX_IGNORE_FILE} bytes",
            ShowPath(name)
        )));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// A context directory under construction.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            Tree {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn path(&self, rel: &str) -> std::path::PathBuf {
            self.dir.path().join(rel)
        }
        fn file(&self, rel: &str, content: &str) -> &Tree {
            let p = self.path(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
            self
        }
        fn dir(&self, rel: &str) -> &Tree {
            std::fs::create_dir_all(self.path(rel)).unwrap();
            self
        }
        fn link(&self, rel: &str, target: &str) -> &Tree {
            symlink(target, self.path(rel)).unwrap();
            self
        }
        fn context(&self, ignore: &str) -> Context {
            Context::open(
                self.dir.path(),
                IgnoreRules::parse(ignore.as_bytes()).unwrap(),
            )
            .unwrap()
        }
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    fn selected(ctx: &Context, src: &str) -> Vec<String> {
        ctx.select(src.as_bytes())
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .iter()
            .map(|s| text(&s.path))
            .collect()
    }

    fn select_err(ctx: &Context, src: &str) -> String {
        match ctx.select(src.as_bytes()) {
            Ok(found) => panic!("{src}: selected {:?}", found.len()),
            Err(e) => e.to_string(),
        }
    }

    /// Every path a full walk of `src` lists.
    fn walked(ctx: &Context, src: &str) -> Vec<String> {
        let mut out = Vec::new();
        for s in ctx.select(src.as_bytes()).unwrap() {
            out.extend(ctx.walk(&s).unwrap().iter().map(|e| text(&e.path)));
        }
        out
    }

    fn sample() -> Tree {
        let t = Tree::new();
        t.file("a.txt", "a")
            .file("b.txt", "b")
            .file("c.md", "c")
            .file("sub/d.txt", "d")
            .file("sub/deep/e.txt", "e")
            .dir("empty");
        t
    }

    #[test]
    fn wildcards_follow_filepath_match() {
        let t = sample();
        let ctx = t.context("");
        assert_eq!(selected(&ctx, "*.txt"), ["a.txt", "b.txt"]);
        assert_eq!(selected(&ctx, "sub/*.txt"), ["sub/d.txt"]);
        assert_eq!(selected(&ctx, "*/d.txt"), ["sub/d.txt"]);
        assert_eq!(selected(&ctx, "s?b"), ["sub"]);
        assert_eq!(selected(&ctx, "[ab].txt"), ["a.txt", "b.txt"]);
        assert_eq!(selected(&ctx, "[^a].*"), ["b.txt", "c.md"]);
        assert_eq!(selected(&ctx, "*/*/*.txt"), ["sub/deep/e.txt"]);
        assert_eq!(selected(&ctx, "./sub/*"), ["sub/d.txt", "sub/deep"]);
        let e = select_err(&ctx, "*.none");
        assert!(
            e.contains("\"*.none\": no source files were specified"),
            "{e}"
        );
        assert!(select_err(&ctx, "sub/[").contains("bad pattern"));
    }

    #[test]
    fn literal_sources_root_and_not_found() {
        let t = sample();
        let ctx = t.context("");
        assert_eq!(selected(&ctx, "a.txt"), ["a.txt"]);
        assert_eq!(selected(&ctx, "/a.txt"), ["a.txt"]);
        assert_eq!(selected(&ctx, "sub/../a.txt"), ["a.txt"]);
        assert_eq!(selected(&ctx, "."), [""]);
        assert_eq!(selected(&ctx, "/"), [""]);
        assert_eq!(selected(&ctx, "./"), [""]);
        assert_eq!(select_err(&ctx, "missing"), "\"missing\": not found");
        assert_eq!(select_err(&ctx, "a.txt/x"), "\"a.txt/x\": not found");
        assert!(select_err(&ctx, "").contains("no source files were specified"));
        let s = ctx.select(b"sub/deep").unwrap();
        assert_eq!((s[0].kind, s[0].name()), (EntryKind::Dir, &b"deep"[..]));
    }

    #[test]
    fn trailing_slash() {
        let t = sample();
        t.link("ldir", "sub").link("lfile", "a.txt");
        let ctx = t.context("");
        assert_eq!(selected(&ctx, "sub/"), ["sub"]);
        // Docker cleans the slash away: a file named with one is still the file.
        assert_eq!(selected(&ctx, "a.txt/"), ["a.txt"]);
        // A symlink named with a slash is the directory it leads to.
        assert_eq!(selected(&ctx, "ldir/"), ["sub"]);
        assert_eq!(selected(&ctx, "ldir"), ["ldir"]);
        assert_eq!(selected(&ctx, "l*/"), ["sub", "a.txt"]);
        assert_eq!(selected(&ctx, "l*"), ["ldir", "lfile"]);
    }

    #[test]
    fn dot_dot_out_of_the_context_is_refused() {
        let t = sample();
        let ctx = t.context("");
        for src in ["..", "../x", "sub/../../x", "./../a.txt", "a/../../b/c"] {
            let e = select_err(&ctx, src);
            assert!(e.ends_with("outside the build context"), "{src}: {e}");
        }
        assert_eq!(select_err(&ctx, "../x"), "../x: outside the build context");
        // Rooted, `..` stops at the root (Go's `filepath.Clean`, as Docker reads it).
        assert_eq!(selected(&ctx, "/../a.txt"), ["a.txt"]);
    }

    #[test]
    fn symlinks_out_of_the_context_are_refused_on_the_path() {
        let t = sample();
        t.link("etc", "/etc")
            .link("up", "../..")
            .link("sub/back", "../sub/deep")
            .link("loop", "loop");
        let ctx = t.context("");
        for src in ["etc/passwd", "etc/", "up/x", "etc/*"] {
            let e = select_err(&ctx, src);
            assert!(e.contains("outside the build context"), "{src}: {e}");
        }
        // As sources themselves they are symlinks to copy, not paths to follow.
        let s = ctx.select(b"etc").unwrap();
        assert_eq!(s[0].kind, EntryKind::Symlink);
        let entries = ctx.walk(&s[0]).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].link_target.as_deref(), Some(&b"/etc"[..]));
        // Symlinks that stay inside are followed on the way.
        assert_eq!(selected(&ctx, "sub/back/e.txt"), ["sub/deep/e.txt"]);
        assert!(select_err(&ctx, "loop/x").contains("too many levels"));
    }

    #[test]
    fn walks_list_symlinks_as_symlinks_in_name_order() {
        let t = sample();
        t.link("sub/to-a", "../a.txt")
            .link("sub/to-etc", "/etc")
            .file("sub/a-b", "x")
            .file("sub/deep/z", "z");
        let ctx = t.context("");
        let s = ctx.select(b"sub").unwrap();
        let entries = ctx.walk(&s[0]).unwrap();
        let got: Vec<(String, EntryKind)> =
            entries.iter().map(|e| (text(&e.rel), e.kind)).collect();
        assert_eq!(
            got,
            [
                ("".into(), EntryKind::Dir),
                ("a-b".into(), EntryKind::File),
                ("d.txt".into(), EntryKind::File),
                ("deep".into(), EntryKind::Dir),
                ("deep/e.txt".into(), EntryKind::File),
                ("deep/z".into(), EntryKind::File),
                ("to-a".into(), EntryKind::Symlink),
                ("to-etc".into(), EntryKind::Symlink),
            ]
        );
        let to_etc = entries.iter().find(|e| e.rel == b"to-etc").unwrap();
        assert_eq!(to_etc.link_target.as_deref(), Some(&b"/etc"[..]));
        assert_eq!(to_etc.path, b"sub/to-etc");
        let mut content = String::new();
        let d = entries.iter().find(|e| e.rel == b"d.txt").unwrap();
        ctx.open_entry(d)
            .unwrap()
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "d");
        assert!(ctx.open_entry(to_etc).is_err());
    }

    #[test]
    fn ignored_paths_are_invisible() {
        let t = sample();
        let ctx = t.context("*.md\nsub/deep\n");
        let e = select_err(&ctx, "c.md");
        assert_eq!(
            e,
            "\"c.md\": not found (excluded by the ignore file, line 1)"
        );
        assert!(select_err(&ctx, "*.md").contains("no source files were specified"));
        assert!(select_err(&ctx, "sub/deep/e.txt").contains("line 2"));
        assert_eq!(
            walked(&ctx, "."),
            ["", "a.txt", "b.txt", "empty", "sub", "sub/d.txt"]
        );
        assert_eq!(selected(&ctx, "*"), ["a.txt", "b.txt", "empty", "sub"]);
        // An ignored symlink is not there to be followed either.
        t.link("ldir", "sub");
        let ctx = t.context("ldir\n");
        assert!(select_err(&ctx, "ldir/d.txt").contains("not found"));
    }

    #[test]
    fn exceptions_re_include_below_excluded_dirs() {
        let t = sample();
        t.file("sub/keep.txt", "k");
        let ctx = t.context("sub\n!sub/keep.txt\n");
        assert_eq!(
            walked(&ctx, "."),
            ["", "a.txt", "b.txt", "c.md", "empty", "sub", "sub/keep.txt"]
        );
        assert_eq!(selected(&ctx, "sub/keep.txt"), ["sub/keep.txt"]);
        assert!(select_err(&ctx, "sub/d.txt").contains("not found"));
        assert_eq!(walked(&ctx, "sub"), ["sub", "sub/keep.txt"]);
        assert_eq!(selected(&ctx, "sub/*"), ["sub/keep.txt"]);
        // Without the exception the directory is gone.
        let ctx = t.context("sub\n");
        assert!(select_err(&ctx, "sub").contains("not found"));
        assert_eq!(walked(&ctx, "."), ["", "a.txt", "b.txt", "c.md", "empty"]);
        // An exception that could apply but matches nothing keeps the directory out.
        let ctx = t.context("sub\n!sub/*.none\n");
        assert!(select_err(&ctx, "sub").contains("not found"));
        // Include-list style.
        let ctx = t.context("*\n!sub/deep\n");
        assert_eq!(walked(&ctx, "."), ["", "sub", "sub/deep", "sub/deep/e.txt"]);
    }

    #[test]
    fn sockets_are_skipped_and_names_are_bytes() {
        let t = sample();
        let _listener = std::os::unix::net::UnixListener::bind(t.path("sock")).unwrap();
        let odd = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"odd\xff");
        std::fs::write(t.dir.path().join(odd), "o").unwrap();
        let ctx = t.context("");
        let paths: Vec<Vec<u8>> = ctx
            .walk(&ctx.select(b".").unwrap()[0])
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert!(paths.contains(&b"odd\xff".to_vec()));
        assert!(!paths.contains(&b"sock".to_vec()));
        assert_eq!(ctx.select(b"odd\xff").unwrap()[0].path, b"odd\xff");
    }

    fn cache() -> StatCache {
        StatCache::new().trusting_fresh_files()
    }

    fn digest(ctx: &Context, src: &str) -> Digest {
        let sel = ctx.select(src.as_bytes()).unwrap();
        ctx.digest_selection(&sel, None, None, &mut cache())
            .unwrap()
    }

    #[test]
    fn digest_follows_content_mode_and_names_not_times() {
        let t = sample();
        let ctx = t.context("");
        let first = digest(&ctx, ".");
        // Timestamps never count.
        let f = File::options().write(true).open(t.path("a.txt")).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        drop(f);
        assert_eq!(digest(&ctx, "."), first);
        // Content, mode and names do.
        t.file("a.txt", "A");
        let content = digest(&ctx, ".");
        assert_ne!(content, first);
        std::fs::set_permissions(t.path("b.txt"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mode = digest(&ctx, ".");
        assert_ne!(mode, content);
        std::fs::rename(t.path("c.md"), t.path("c2.md")).unwrap();
        let renamed = digest(&ctx, ".");
        assert_ne!(renamed, mode);
        t.link("sub/l", "x");
        let linked = digest(&ctx, ".");
        assert_ne!(linked, renamed);
        std::fs::remove_file(t.path("sub/l")).unwrap();
        t.link("sub/l", "y");
        assert_ne!(digest(&ctx, "."), linked);
        // Ignored files do not count.
        let ctx = t.context("*.log\n");
        let before = digest(&ctx, ".");
        t.file("noise.log", "1");
        assert_eq!(digest(&ctx, "."), before);
    }

    #[test]
    fn chmod_and_chown_replace_what_the_context_says() {
        let t = sample();
        let ctx = t.context("");
        let sel = ctx.select(b"sub").unwrap();
        let m = ctx.manifest(&sel, None, None, &mut cache()).unwrap();
        assert!(m.iter().all(|(_, e)| (e.uid, e.gid) == (0, 0)));
        let m = ctx
            .manifest(&sel, Some(0o640), Some((1000, 1001)), &mut cache())
            .unwrap();
        assert!(
            m.iter()
                .all(|(_, e)| (e.uid, e.gid, e.mode) == (1000, 1001, 0o640))
        );
        let chmodded = ctx
            .digest_selection(&sel, Some(0o640), None, &mut cache())
            .unwrap();
        std::fs::set_permissions(t.path("sub/d.txt"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        assert_eq!(
            ctx.digest_selection(&sel, Some(0o640), None, &mut cache())
                .unwrap(),
            chmodded
        );
        // The context's own owner never enters the key (checked where we may chown).
        let chowned = ctx
            .digest_selection(&sel, None, Some((7, 7)), &mut cache())
            .unwrap();
        let plain = ctx
            .digest_selection(&sel, None, None, &mut cache())
            .unwrap();
        if sys::geteuid() == 0 {
            std::os::unix::fs::lchown(t.path("sub/d.txt"), Some(4321), Some(4321)).unwrap();
            assert_eq!(
                ctx.digest_selection(&sel, None, Some((7, 7)), &mut cache())
                    .unwrap(),
                chowned
            );
            assert_eq!(
                ctx.digest_selection(&sel, None, None, &mut cache())
                    .unwrap(),
                plain
            );
        }
        assert_ne!(chowned, plain);
    }

    #[test]
    fn stat_cache_avoids_rereading_unchanged_files() {
        let t = sample();
        let ctx = t.context("");
        let sel = ctx.select(b".").unwrap();
        let mut c = cache();
        let first = ctx.manifest(&sel, None, None, &mut c).unwrap();
        assert_eq!((c.files_hashed(), c.hits()), (5, 0));
        let second = ctx.manifest(&sel, None, None, &mut c).unwrap();
        assert_eq!(second, first);
        assert_eq!((c.files_hashed(), c.hits()), (5, 5));
        // Through a save and a load, as across builds.
        let store = tempfile::tempdir().unwrap();
        let path = store.path().join("stat-cache");
        c.save_file(&path).unwrap();
        let mut loaded = StatCache::load_file(&path).trusting_fresh_files();
        assert_eq!(loaded.len(), 5);
        t.file("sub/d.txt", "changed");
        let third = ctx.manifest(&sel, None, None, &mut loaded).unwrap();
        assert_eq!((loaded.files_hashed(), loaded.hits()), (1, 4));
        assert_eq!(
            explain_changes(&first, &third).as_deref(),
            Some("sub/d.txt modified")
        );
    }

    #[test]
    fn fresh_files_are_not_remembered() {
        let t = sample();
        let ctx = t.context("");
        let sel = ctx.select(b".").unwrap();
        let mut c = StatCache::new();
        ctx.manifest(&sel, None, None, &mut c).unwrap();
        ctx.manifest(&sel, None, None, &mut c).unwrap();
        assert_eq!((c.files_hashed(), c.hits(), c.len()), (10, 0, 0));
    }

    #[test]
    fn a_swapped_file_is_noticed() {
        let t = sample();
        let ctx = t.context("");
        let s = &ctx.select(b"a.txt").unwrap()[0];
        let entry = ctx.walk(s).unwrap().remove(0);
        // Held open so its inode number cannot be reused by the replacement.
        let _old = File::open(t.path("a.txt")).unwrap();
        std::fs::remove_file(t.path("a.txt")).unwrap();
        t.link("a.txt", "/etc/passwd");
        assert!(ctx.open_entry(&entry).is_err());
        std::fs::remove_file(t.path("a.txt")).unwrap();
        t.file("a.txt", "other inode");
        let e = ctx.open_entry(&entry).unwrap_err().to_string();
        assert!(e.contains("changed"), "{e}");
    }

    #[test]
    fn the_ignore_file_that_applies_is_read() {
        let t = sample();
        let root = sys::open_dir_path(t.dir.path()).unwrap();
        let (rules, from) = load_ignore_rules(root.as_fd(), None).unwrap();
        assert!(rules.is_empty() && from.is_none());
        t.file(".dockerignore", "*.md\n");
        let (rules, from) = load_ignore_rules(root.as_fd(), None).unwrap();
        assert!(rules.matches(b"c.md"));
        assert_eq!(
            from,
            Some(IgnoreFileLocation::ContextRoot(b".dockerignore"))
        );
        t.file(".containerignore", "*.txt\n");
        let (rules, _) = load_ignore_rules(root.as_fd(), None).unwrap();
        assert!(rules.matches(b"a.txt") && !rules.matches(b"c.md"));
        t.file("build/app.Containerfile", "FROM scratch\n")
            .file("build/app.Containerfile.dockerignore", "sub\n");
        let build = sys::open_dir_path(&t.path("build")).unwrap();
        let (rules, from) =
            load_ignore_rules(root.as_fd(), Some((build.as_fd(), b"app.Containerfile"))).unwrap();
        assert!(rules.matches(b"sub/x") && !rules.matches(b"a.txt"));
        assert_eq!(
            from.map(|f| f.to_string()).as_deref(),
            Some("app.Containerfile.dockerignore")
        );
        // A bad line names the file and the line.
        t.file(".containerignore", "ok\n[oops\n");
        let e = load_ignore_rules(root.as_fd(), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(".containerignore: line 2: \"[oops\""), "{e}");
        // A symlinked ignore file cannot reach out of its directory.
        std::fs::remove_file(t.path(".containerignore")).unwrap();
        std::fs::remove_file(t.path(".dockerignore")).unwrap();
        t.link(".dockerignore", "/etc/passwd");
        let (rules, _) = load_ignore_rules(root.as_fd(), None).unwrap();
        assert!(rules.is_empty());
        // The rules may hide the Containerfile from COPY; the builder still reads it.
        let ctx = t.context("build\n");
        assert!(ctx.select(b"build/app.Containerfile").is_err());
    }
}
