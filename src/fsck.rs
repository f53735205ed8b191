//! `layerfs fsck`: check an upper directory (and its work directory) against the on-disk format
//! layerfs and kernel overlayfs share, and repair what can be repaired without guessing.
//!
//! What is checked, per entry of the upper (never following a symlink):
//! * whiteouts that hide nothing: in or below an opaque directory, or (when the lowers are
//!   given) where no lower layer shows the name — repaired by removing the whiteout;
//! * character-device 0/0 whiteouts with permission bits — repaired by `chmod 0`;
//! * overlay markers on objects they do not belong to: an opaque marker on a non-directory,
//!   an xattr-whiteout marker on something its directory does not read as a whiteout (the mount
//!   shows an ordinary file there), `overlay.impure` on a non-directory — repaired by removing
//!   the xattr (what users see does not change);
//! * a directory's `overlay.redirect` that is not a valid redirect (see `union::redirect`; a
//!   mount answers EIO for that directory), and unknown `*.overlay.*` names on
//!   non-directories — reported, never repaired (removing them could lose data). A valid
//!   redirect on a directory is fine: its lower counterpart is elsewhere, so whiteouts in and
//!   below it are never judged redundant;
//! * metacopy files (`overlay.metacopy`, see `union::metacopy`): the marker must be a value
//!   the kernel writes, and a metacopy file's data redirect a valid redirect (else a mount
//!   answers EIO for the file); with the lowers given, the file's data must be found in them
//!   — reported, never repaired (the data is what is missing). `overlay.metacopy` or
//!   `overlay.redirect` on a symlink, device or fifo means nothing to either mount —
//!   repaired by removing it. A regular file that is no metacopy file may keep the
//!   `overlay.redirect` of its metacopy days (the kernel leaves it after copying the data up;
//!   nothing reads it): fine;
//! * `.wh.*` names (the AUFS/OCI whiteout dialect): an upper never holds them, and a layer made
//!   from this upper would turn them into deletions — reported, not repaired (they may be user
//!   files: rename or remove them by hand);
//! * entries that cannot be read (lstat, readdir or listxattr fails) — reported.
//!
//! And in the work directory: leftovers in `WORK/work` of an interrupted operation (a crash
//! mid copy-up) — repaired by removing them, as a mount does.
//!
//! * copy-up origins that are not one: an `overlay.origin` that is not empty and not a file
//!   handle in the kernel's format (the kernel refuses to look such an object up), a
//!   `*.layerfs.origin` (what layerfs wrote before it wrote the kernel's format) that is not
//!   an inode number of 8 bytes — repaired by removing the xattr (both mounts ignore it:
//!   what users see does not change);
//!
//! Kernel bookkeeping xattrs (valid `overlay.origin`, `overlay.nlink`, `overlay.protattr`,
//! `overlay.uuid`, `overlay.upper`, `overlay.impure` on directories, `overlay.whiteouts`) and
//! layerfs's own (`*.layerfs.*`) are fine anywhere the kernel puts them.
//!
//! `--repair` refuses to run while the upper or work directory is open in some process (a live
//! mount): it would race with it. [`Report::clean`] is true when every problem found was
//! repaired; the CLI exits 0 then, 1 otherwise.
//!
//! [`check_store`] (`layerfs fsck --store`) checks a layer store through the same [`Report`]:
//! every `index.json` entry resolves to a manifest, config and layer blobs that exist and match
//! their digests (an entry that does not is repaired by dropping it from the index: the image
//! is unusable anyway, and nothing else is lost); every blob's content matches its name (a
//! corrupt blob is reported, never deleted); every layer an image names is extracted under
//! `layers/` (a missing one is reported: re-import the layer); staging directories and mount
//! leases nobody holds any more are leftovers of killed commands and daemons (repaired by
//! removing them, as `gc` does).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, ShowPath};
use crate::sys::{self, FileStat, XTarget};
use crate::union::{self, ROOT, Union, UnionConfig, whiteout};

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct FsckConfig {
    pub upper: PathBuf,
    /// The lowers the upper is mounted over, top first (optional: enables the check for
    /// whiteouts that hide nothing outside opaque directories).
    pub lowers: Vec<PathBuf>,
    pub work: Option<PathBuf>,
    pub repair: bool,
}

/// One kind of damage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// An entry left in `WORK/work` by an interrupted operation.
    WorkLeftover,
    /// A whiteout that hides nothing (`in_opaque`: its directory is opaque).
    RedundantWhiteout { in_opaque: bool },
    /// A 0/0 character device whiteout with permission bits set.
    WhiteoutMode(u32),
    /// An opaque marker xattr on a non-directory.
    OpaqueOnNonDir(Vec<u8>),
    /// An overlay xattr that does not belong on this object; `repairable` when removing it
    /// cannot change what users see.
    StrayXattr { name: Vec<u8>, repairable: bool },
    /// A metacopy marker whose value is not one the kernel writes.
    BadMetacopy(Vec<u8>),
    /// A metacopy file whose data the lowers do not hold (a mount answers EIO).
    MetacopyNoData(String),
    /// A directory's redirect xattr whose value is not a redirect.
    BadRedirect(Vec<u8>, String),
    /// An origin xattr whose value is not an origin (kernel or older layerfs form).
    BadOrigin(Vec<u8>),
    /// A `.wh.`-prefixed name; `shadows` when the name it would delete exists beside it.
    AufsName { shadows: bool },
    /// lstat, readdir or listxattr failed.
    Unreadable(String),
    /// A store index entry whose manifest, config or layers are missing or corrupt.
    DanglingImage(String),
    /// A blob whose content does not match its digest.
    CorruptBlob,
    /// An image layer that is not extracted under `layers/`.
    MissingLayerDir,
    /// A staging directory or mount lease left by a killed command or daemon.
    StaleStoreEntry,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::WorkLeftover => write!(f, "leftover of an interrupted operation"),
            Problem::RedundantWhiteout { in_opaque: true } => {
                write!(f, "whiteout in an opaque directory (hides nothing)")
            }
            Problem::RedundantWhiteout { in_opaque: false } => {
                write!(f, "whiteout of a name no lower layer has (hides nothing)")
            }
            Problem::WhiteoutMode(m) => write!(f, "whiteout with permission bits {m:04o}"),
            Problem::OpaqueOnNonDir(x) => {
                write!(f, "opaque marker {} on a non-directory", x.escape_ascii())
            }
            Problem::StrayXattr { name, .. } => {
                write!(
                    f,
                    "overlay xattr {} does not belong here",
                    name.escape_ascii()
                )
            }
            Problem::BadRedirect(x, why) => {
                write!(f, "{} is not a valid redirect ({why})", x.escape_ascii())
            }
            Problem::BadMetacopy(x) => write!(
                f,
                "{} is not a metacopy marker (mounts answer EIO for the file)",
                x.escape_ascii()
            ),
            Problem::MetacopyNoData(e) => write!(
                f,
                "metacopy file whose data the lower layers do not hold ({e})"
            ),
            Problem::AufsName { shadows: true } => write!(
                f,
                "AUFS-style whiteout name beside the name it deletes (a layer made from this \
                 upper would delete it)"
            ),
            Problem::AufsName { shadows: false } => write!(
                f,
                "AUFS-style whiteout name in an upper (a layer made from it would read it as a \
                 deletion)"
            ),
            Problem::BadOrigin(x) => write!(
                f,
                "{} does not hold an origin (ignored by layerfs, refused by the kernel)",
                x.escape_ascii()
            ),
            Problem::Unreadable(e) => write!(f, "unreadable: {e}"),
            Problem::DanglingImage(why) => write!(f, "image cannot be used: {why}"),
            Problem::CorruptBlob => write!(f, "content does not match its digest"),
            Problem::MissingLayerDir => write!(f, "layer is not extracted (import its tar again)"),
            Problem::StaleStoreEntry => write!(f, "left by a killed command or daemon"),
        }
    }
}

/// One problem at one place.
#[derive(Clone, Debug)]
pub struct Finding {
    /// `upper/...` or `work/...` relative path, bytes.
    pub path: Vec<u8>,
    pub problem: Problem,
    pub repaired: bool,
    /// Why a repair was not done or failed.
    pub note: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", ShowPath(&self.path), self.problem)?;
        if self.repaired {
            write!(f, " [repaired]")?;
        } else if let Some(n) = &self.note {
            write!(f, " [{n}]")?;
        }
        Ok(())
    }
}

/// What a check found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Entries looked at.
    pub entries: u64,
}

impl Report {
    /// No problem is left (none found, or all repaired).
    pub fn clean(&self) -> bool {
        self.findings.iter().all(|f| f.repaired)
    }

    /// Problems found (repaired or not).
    pub fn problems(&self) -> usize {
        self.findings.len()
    }

    pub fn repaired(&self) -> usize {
        self.findings.iter().filter(|f| f.repaired).count()
    }
}

/// The part after `overlay.` of a `trusted.overlay.*`/`user.overlay.*` name; fuse-overlayfs's
/// opaque marker counts as `opaque` (its other `user.fuseoverlayfs.*` names are its own
/// bookkeeping, such as `override_stat`, and are left alone).
fn overlay_suffix(name: &[u8]) -> Option<&[u8]> {
    if name == whiteout::FUSEOVERLAYFS_OPAQUE {
        return Some(b"opaque");
    }
    let rest = name
        .strip_prefix(b"trusted.")
        .or_else(|| name.strip_prefix(b"user."))?;
    rest.strip_prefix(b"overlay.")
}

/// Kernel bookkeeping that may sit on any object (`origin` is checked by [`origin_xattr`]).
const BOOKKEEPING: &[&[u8]] = &[b"nlink", b"protattr", b"uuid", b"upper"];

/// For an origin xattr name (the kernel's or older layerfs's), the check its value must pass.
fn origin_xattr(name: &[u8]) -> Option<fn(&[u8]) -> bool> {
    use crate::union::origin::{Origin, parse, parse_legacy};
    if name == whiteout::TRUSTED_ORIGIN || name == whiteout::USER_ORIGIN {
        return Some(|v| parse(v) != Origin::Invalid);
    }
    if name == b"trusted.layerfs.origin" || name == b"user.layerfs.origin" {
        return Some(|v| parse_legacy(v).is_some());
    }
    None
}

/// The merged view of the lowers, to tell whether a whiteout hides anything.
struct LowerView {
    union: Union,
    names: HashMap<u64, HashMap<Box<[u8]>, bool>>,
}

impl LowerView {
    fn open(lowers: &[PathBuf]) -> Result<Option<LowerView>> {
        if lowers.is_empty() {
            return Ok(None);
        }
        let union = Union::new(&UnionConfig {
            lowers: lowers.to_vec(),
            upper: None,
            fsync: false,
            redirect_dir: false,
            metacopy: false,
            data_lowers: Vec::new(),
        })?;
        Ok(Some(LowerView {
            union,
            names: HashMap::new(),
        }))
    }

    /// Names (and whether each is a directory) the lowers show in directory `ino`.
    fn names(&mut self, ino: u64) -> Result<&HashMap<Box<[u8]>, bool>> {
        if !self.names.contains_key(&ino) {
            let (list, _) = self.union.read_dir(ino, 0)?;
            let map = list
                .iter()
                .map(|e| (e.name.clone(), e.top.is_dir()))
                .collect();
            self.names.insert(ino, map);
        }
        Ok(&self.names[&ino])
    }

    /// The lower directory `name` in directory `ino`, if the lowers show one.
    fn child_dir(&mut self, ino: u64, name: &[u8]) -> Result<Option<u64>> {
        if self.names(ino)?.get(name) != Some(&true) {
            return Ok(None);
        }
        Ok(Some(self.union.lookup(ino, name)?.ino))
    }
}

/// What the lowers hold at the path of an upper directory.
#[derive(Clone, Copy, Debug)]
enum LowerAt {
    /// No lowers given: whether a whiteout hides something cannot be told.
    NotGiven,
    /// Nothing the upper directory merges with (or it is opaque).
    Nothing,
    /// The lowers' merged directory, as a node of the lower view.
    Dir(u64),
    /// Reading the lowers failed: never conclude that a whiteout is unneeded.
    Unknown,
}

struct Checker {
    repair: bool,
    report: Report,
    lower: Option<LowerView>,
    /// The upper and its lowers, for finding metacopy files' data: a read-only union of
    /// them, opened at the first metacopy file (`Err`: it could not be).
    upper_path: PathBuf,
    lowers: Vec<PathBuf>,
    view: Option<std::result::Result<Union, String>>,
}

fn show_err(e: &std::io::Error) -> String {
    e.to_string()
}

impl Checker {
    fn found(&mut self, path: Vec<u8>, problem: Problem, repair: Option<std::io::Result<()>>) {
        let (repaired, note) = match repair {
            Some(Ok(())) => (true, None),
            Some(Err(e)) => (false, Some(format!("repair failed: {e}"))),
            None if self.repair => (false, Some("not repaired".into())),
            None => (false, None),
        };
        self.report.findings.push(Finding {
            path,
            problem,
            repaired,
            note,
        });
    }

    /// Run `f` as a repair when repairing.
    fn fix(&self, f: impl FnOnce() -> std::io::Result<()>) -> Option<std::io::Result<()>> {
        self.repair.then(f)
    }

    fn dir_marks(&self, dir: BorrowedFd<'_>, xattrs: &[Vec<u8>]) -> whiteout::DirMarks {
        let mut marks = whiteout::DirMarks::default();
        for attr in [
            whiteout::TRUSTED_OPAQUE,
            whiteout::USER_OPAQUE,
            whiteout::FUSEOVERLAYFS_OPAQUE,
        ] {
            if xattrs.iter().any(|n| n == attr) {
                if let Ok(Some(v)) = sys::xattr_get(XTarget::Fd(dir), attr) {
                    let m = whiteout::opaque_value(&v);
                    marks.opaque |= m.opaque;
                    marks.xwhiteouts |= m.xwhiteouts;
                }
            }
        }
        marks
    }

    /// Check directory `dir` (upper path `path`), whose lower counterpart is `lower`.
    fn check_dir(&mut self, dir: OwnedFd, path: &[u8], lower: LowerAt) {
        let xattrs = match sys::xattr_list(XTarget::Fd(dir.as_fd())) {
            Ok(x) => x,
            Err(e) => {
                self.found(shown(path), Problem::Unreadable(show_err(&e)), None);
                Vec::new()
            }
        };
        let marks = self.dir_marks(dir.as_fd(), &xattrs);
        // Below an opaque directory nothing of the lowers shows.
        let lower = if marks.opaque {
            LowerAt::Nothing
        } else {
            lower
        };
        let entries = match sys::open_dir_beneath(dir.as_fd(), b"").and_then(sys::read_dir_all) {
            Ok(e) => e,
            Err(e) => {
                self.found(shown(path), Problem::Unreadable(show_err(&e)), None);
                return;
            }
        };
        let names: HashSet<&[u8]> = entries.iter().map(|e| e.name.as_slice()).collect();
        for e in &entries {
            self.report.entries += 1;
            let child = union::join_path(path, &e.name);
            let st = match sys::stat_at(dir.as_fd(), &e.name) {
                Ok(st) => st,
                Err(err) => {
                    self.found(shown(&child), Problem::Unreadable(show_err(&err)), None);
                    continue;
                }
            };
            let cx = match sys::xattr_list(XTarget::At(dir.as_fd(), &e.name)) {
                Ok(x) => x,
                Err(err) => {
                    self.found(shown(&child), Problem::Unreadable(show_err(&err)), None);
                    Vec::new()
                }
            };
            self.check_entry(dir.as_fd(), &e.name, &child, &st, &cx, marks, lower, &names);
            let redirected = cx
                .iter()
                .any(|x| overlay_suffix(x) == Some(&b"redirect"[..]));
            if st.is_dir() {
                let sub_lower = match (&mut self.lower, lower) {
                    // Its lower copies are elsewhere: no whiteout below it is judged.
                    (Some(_), _) if redirected => LowerAt::Unknown,
                    (Some(lv), LowerAt::Dir(ino)) => match lv.child_dir(ino, &e.name) {
                        Ok(Some(sub)) => LowerAt::Dir(sub),
                        Ok(None) => LowerAt::Nothing,
                        Err(_) => LowerAt::Unknown,
                    },
                    (_, other @ (LowerAt::NotGiven | LowerAt::Unknown)) => other,
                    _ => LowerAt::Nothing,
                };
                match sys::open_dir_beneath(dir.as_fd(), &e.name) {
                    Ok(sub) => self.check_dir(sub, &child, sub_lower),
                    Err(err) => {
                        self.found(shown(&child), Problem::Unreadable(show_err(&err)), None)
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        st: &FileStat,
        xattrs: &[Vec<u8>],
        marks: whiteout::DirMarks,
        lower: LowerAt,
        siblings: &HashSet<&[u8]>,
    ) {
        let target = XTarget::At(dir, name);
        let wh_attr: Vec<&Vec<u8>> = xattrs
            .iter()
            .filter(|n| *n == whiteout::TRUSTED_WHITEOUT || *n == whiteout::USER_WHITEOUT)
            .collect();
        let chr_whiteout = st.is_chr() && st.rdev == 0;
        let x_whiteout = st.is_reg() && st.size == 0 && !wh_attr.is_empty() && marks.xwhiteouts;
        if chr_whiteout && st.perm() != 0 {
            let r = self.fix(|| sys::chmod_at(dir, name, 0));
            self.found(shown(path), Problem::WhiteoutMode(st.perm()), r);
        }
        if !x_whiteout {
            for attr in wh_attr {
                let r = self.fix(|| sys::xattr_remove(target, attr));
                let p = Problem::StrayXattr {
                    name: attr.clone(),
                    repairable: true,
                };
                self.found(shown(path), p, r);
            }
        }
        if chr_whiteout || x_whiteout {
            let hides = if marks.opaque {
                Some(false)
            } else {
                match (&mut self.lower, lower) {
                    (Some(lv), LowerAt::Dir(ino)) => {
                        lv.names(ino).ok().map(|n| n.contains_key(name))
                    }
                    (_, LowerAt::Nothing) => Some(false),
                    _ => None,
                }
            };
            if hides == Some(false) {
                let r = self.fix(|| sys::unlink_at(dir, name, false));
                let p = Problem::RedundantWhiteout {
                    in_opaque: marks.opaque,
                };
                self.found(shown(path), p, r);
                return;
            }
        }
        match whiteout::classify_aufs(name) {
            whiteout::AufsName::Whiteout(t) => {
                let shadows = siblings.contains(t);
                self.found(shown(path), Problem::AufsName { shadows }, None);
            }
            whiteout::AufsName::Opaque | whiteout::AufsName::Internal => {
                self.found(shown(path), Problem::AufsName { shadows: false }, None);
            }
            whiteout::AufsName::Plain => {}
        }
        for attr in xattrs {
            if let Some(valid) = origin_xattr(attr) {
                let value = sys::xattr_get(target, attr)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                if !valid(&value) {
                    let r = self.fix(|| sys::xattr_remove(target, attr));
                    self.found(shown(path), Problem::BadOrigin(attr.clone()), r);
                }
                continue;
            }
            let Some(suffix) = overlay_suffix(attr) else {
                continue;
            };
            if suffix == b"whiteout" || BOOKKEEPING.contains(&suffix) {
                continue;
            }
            match suffix {
                b"redirect" if st.is_dir() => {
                    let value = sys::xattr_get(target, attr)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    if let Err(bad) = crate::union::redirect::parse(&value) {
                        let p = Problem::BadRedirect(attr.clone(), bad.to_string());
                        self.found(shown(path), p, None);
                    }
                }
                // A metacopy file's data redirect; on a file that has its data, a leftover
                // nothing reads.
                b"redirect" if st.is_reg() => {
                    let value = sys::xattr_get(target, attr)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    let metacopy = xattrs
                        .iter()
                        .any(|x| overlay_suffix(x) == Some(&b"metacopy"[..]));
                    if let (true, Err(bad)) = (metacopy, crate::union::redirect::parse(&value)) {
                        let p = Problem::BadRedirect(attr.clone(), bad.to_string());
                        self.found(shown(path), p, None);
                    }
                }
                b"metacopy" if st.is_reg() => {
                    let value = sys::xattr_get(target, attr)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    if crate::union::metacopy::parse(&value)
                        == crate::union::metacopy::Marker::Invalid
                    {
                        self.found(shown(path), Problem::BadMetacopy(attr.clone()), None);
                    } else if let Some(why) = self.metacopy_without_data(path) {
                        self.found(shown(path), Problem::MetacopyNoData(why), None);
                    }
                }
                // Read for directories and regular files only: a stray.
                b"redirect" | b"metacopy" => {
                    let r = self.fix(|| sys::xattr_remove(target, attr));
                    let p = Problem::StrayXattr {
                        name: attr.clone(),
                        repairable: true,
                    };
                    self.found(shown(path), p, r);
                }
                b"opaque" | b"impure" | b"whiteouts" if st.is_dir() => {}
                b"opaque" => {
                    let r = self.fix(|| sys::xattr_remove(target, attr));
                    self.found(shown(path), Problem::OpaqueOnNonDir(attr.clone()), r);
                }
                b"impure" | b"whiteouts" => {
                    let r = self.fix(|| sys::xattr_remove(target, attr));
                    let p = Problem::StrayXattr {
                        name: attr.clone(),
                        repairable: true,
                    };
                    self.found(shown(path), p, r);
                }
                _ if st.is_dir() => {}
                _ => {
                    let p = Problem::StrayXattr {
                        name: attr.clone(),
                        repairable: false,
                    };
                    self.found(shown(path), p, None);
                }
            }
        }
    }

    /// With the lowers given: why the metacopy file at upper path `path` finds no data, if
    /// it does not (looked up as a mount of the upper over the lowers looks it up).
    fn metacopy_without_data(&mut self, path: &[u8]) -> Option<String> {
        if self.lowers.is_empty() {
            return None;
        }
        let view = self.view.get_or_insert_with(|| {
            Union::read_only_upper(&self.upper_path, &self.lowers).map_err(|e| e.to_string())
        });
        let view = match view {
            Ok(v) => v,
            Err(e) => return Some(format!("the upper over its lowers: {e}")),
        };
        let mut ino = ROOT;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            match view.lookup(ino, comp) {
                Ok(attr) => ino = attr.ino,
                Err(e) => return Some(e.to_string()),
            }
        }
        match view.metacopy_fd(ino) {
            Ok(Some(_)) => None,
            Ok(None) => Some("not read as a metacopy file".into()),
            Err(e) => Some(e.to_string()),
        }
    }

    fn check_work(&mut self, work: &Path) -> Result<()> {
        let wfd = sys::open_dir_path(work)
            .map_err(|e| Error::io(format!("work directory {}", work.display()), e))?;
        let Some(st) = sys::stat_at_opt(wfd.as_fd(), b"work")
            .map_err(|e| Error::io(format!("work directory {}", work.display()), e))?
        else {
            return Ok(());
        };
        if !st.is_dir() {
            let r = self.fix(|| sys::unlink_at(wfd.as_fd(), b"work", false));
            self.found(b"work/work".to_vec(), Problem::WorkLeftover, r);
            return Ok(());
        }
        let inner = sys::open_dir_beneath(wfd.as_fd(), b"work")
            .map_err(|e| Error::io(format!("{}/work", work.display()), e))?;
        let entries = sys::open_dir_beneath(inner.as_fd(), b"")
            .and_then(sys::read_dir_all)
            .map_err(|e| Error::io(format!("reading {}/work", work.display()), e))?;
        for e in entries {
            self.report.entries += 1;
            let r = self.fix(|| remove_entry(inner.as_fd(), &e.name));
            let mut p = b"work/work/".to_vec();
            p.extend_from_slice(&e.name);
            self.found(p, Problem::WorkLeftover, r);
        }
        Ok(())
    }
}

fn shown(path: &[u8]) -> Vec<u8> {
    let mut p = b"upper".to_vec();
    if !path.is_empty() {
        p.push(b'/');
        p.extend_from_slice(path);
    }
    p
}

/// Remove `dir`/`name`, recursively for a directory, never following symlinks.
fn remove_entry(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<()> {
    let st = sys::stat_at(dir, name)?;
    if st.is_dir() {
        let sub = sys::open_dir_beneath(dir, name)?;
        union::remove_contents(sub.as_fd())?;
    }
    sys::unlink_at(dir, name, st.is_dir())
}

/// Processes (other than this one) holding `dir` open or as their working directory.
fn users_of(dirs: &[&Path]) -> Vec<(u32, PathBuf)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let mut links: Vec<PathBuf> = Vec::new();
        if let Ok(fds) = std::fs::read_dir(p.path().join("fd")) {
            links.extend(
                fds.flatten()
                    .filter_map(|f| std::fs::read_link(f.path()).ok()),
            );
        }
        if let Ok(cwd) = std::fs::read_link(p.path().join("cwd")) {
            links.push(cwd);
        }
        if let Some(l) = links.iter().find(|l| dirs.iter().any(|d| l.starts_with(d))) {
            out.push((pid, l.clone()));
        }
    }
    out
}

/// Kernel overlay mounts using `upper` (from `/proc/self/mountinfo` super options).
fn kernel_mounts_of(upper: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut want = b"upperdir=".to_vec();
    want.extend_from_slice(upper.as_os_str().as_bytes());
    info.split(|&b| b == b'\n')
        .filter(|line| {
            line.split(|&b| b == b',' || b == b' ')
                .any(|opt| opt == want.as_slice())
        })
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect()
}

/// Check (and with `repair`, repair) an upper directory.
pub fn check_upper(cfg: &FsckConfig) -> Result<Report> {
    let upper = std::fs::canonicalize(&cfg.upper)
        .map_err(|e| Error::io(format!("upper directory {}", cfg.upper.display()), e))?;
    let work = match &cfg.work {
        Some(w) => Some(
            std::fs::canonicalize(w)
                .map_err(|e| Error::io(format!("work directory {}", w.display()), e))?,
        ),
        None => None,
    };
    if cfg.repair {
        let mut dirs = vec![upper.as_path()];
        if let Some(w) = &work {
            dirs.push(w.as_path());
        }
        if let Some((pid, p)) = users_of(&dirs).into_iter().next() {
            return Err(Error::invalid(format!(
                "refusing to repair: process {pid} has {} open (unmount first)",
                p.display()
            )));
        }
        if let Some(m) = kernel_mounts_of(&upper).into_iter().next() {
            return Err(Error::invalid(format!(
                "refusing to repair: {} is the upper of a mounted overlay ({m})",
                upper.display()
            )));
        }
    }
    let root = sys::open_dir_path(&upper)
        .map_err(|e| Error::io(format!("upper directory {}", upper.display()), e))?;
    let mut checker = Checker {
        repair: cfg.repair,
        report: Report::default(),
        lower: LowerView::open(&cfg.lowers)?,
        upper_path: upper.clone(),
        lowers: cfg.lowers.clone(),
        view: None,
    };
    let lower_root = match checker.lower {
        Some(_) => LowerAt::Dir(ROOT),
        None => LowerAt::NotGiven,
    };
    checker.check_dir(root, b"", lower_root);
    if let Some(w) = &work {
        checker.check_work(w)?;
    }
    Ok(checker.report)
}

/// What an index entry needs, checked blob by blob; the first problem found.
fn check_image(
    store: &crate::store::Store,
    desc: &crate::store::model::Descriptor,
    blobs: &mut HashMap<crate::digest::Digest, bool>,
    layer_dirs: &mut HashSet<crate::digest::Digest>,
) -> Result<Option<String>> {
    use crate::store::{images, model};
    let mut blob_ok = |d: crate::digest::Digest| -> Result<bool> {
        if let Some(&ok) = blobs.get(&d) {
            return Ok(ok);
        }
        let ok = blob_matches(store, &d)?;
        blobs.insert(d, ok);
        Ok(ok)
    };
    let manifest = desc.digest()?;
    if !blob_ok(manifest)? {
        return Ok(Some(format!("manifest {manifest} is missing or corrupt")));
    }
    let m: model::Manifest = model::parse(&images::read_blob(store, &manifest)?, "manifest")?;
    let config = m.config.digest()?;
    if !blob_ok(config)? {
        return Ok(Some(format!("config {config} is missing or corrupt")));
    }
    for l in &m.layers {
        let d = l.digest()?;
        if !blob_ok(d)? {
            return Ok(Some(format!("layer blob {d} is missing or corrupt")));
        }
    }
    let cfg: serde_json::Value = model::parse(&images::read_blob(store, &config)?, "config")?;
    layer_dirs.extend(model::config_diff_ids(&cfg)?);
    Ok(None)
}

/// Whether `blobs/sha256/<hex>` exists and hashes to its name (streamed: layers are large).
fn blob_matches(store: &crate::store::Store, d: &crate::digest::Digest) -> Result<bool> {
    use std::io::Read;
    let dir = store.dir(b"blobs/sha256")?;
    let fd = match sys::open_at(dir.as_fd(), d.hex().as_bytes(), libc::O_RDONLY, 0) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(store.err(&format!("opening blob {d}"), e)),
    };
    let mut r = crate::digest::HashReader::new(std::fs::File::from(fd));
    let mut buf = vec![0u8; 1 << 20];
    while r
        .read(&mut buf)
        .map_err(|e| store.err(&format!("reading blob {d}"), e))?
        > 0
    {}
    Ok(r.hasher.finish() == *d)
}

/// Check (and with `repair`, mend) the layer store at `root`.
pub fn check_store(root: &Path, repair: bool) -> Result<Report> {
    use crate::digest::Digest;
    use crate::store::{Store, images};
    let store = Store::open(root)?;
    let _lock = store.lock(if repair {
        sys::LockKind::Exclusive
    } else {
        sys::LockKind::Shared
    })?;
    let mut report = Report::default();
    let mut blobs: HashMap<Digest, bool> = HashMap::new();
    let mut layer_dirs: HashSet<Digest> = HashSet::new();
    let mut index = images::read_index(&store)?;
    let mut keep = Vec::new();
    for desc in std::mem::take(&mut index.manifests) {
        report.entries += 1;
        let name = desc.ref_name().unwrap_or(&desc.digest).to_owned();
        match check_image(&store, &desc, &mut blobs, &mut layer_dirs)? {
            None => keep.push(desc),
            Some(why) => {
                report.findings.push(Finding {
                    path: format!("index.json {name}").into_bytes(),
                    problem: Problem::DanglingImage(why),
                    repaired: repair,
                    note: (!repair).then(|| "--repair drops the entry".into()),
                });
                if !repair {
                    keep.push(desc);
                }
            }
        }
    }
    let dropped = report.findings.iter().any(|f| f.repaired);
    index.manifests = keep;
    if dropped {
        images::write_index(&store, &index)?;
    }
    // Every blob, named or not, must match its name.
    let blobdir = store.dir(b"blobs/sha256")?;
    for e in
        sys::read_dir_all(store.dir(b"blobs/sha256")?).map_err(|e| store.err("reading blobs", e))?
    {
        report.entries += 1;
        let Some(d) = std::str::from_utf8(&e.name).ok().and_then(Digest::from_hex) else {
            continue;
        };
        let ok = match blobs.get(&d) {
            Some(&ok) => ok,
            None => blob_matches(&store, &d)?,
        };
        if !ok {
            report.findings.push(Finding {
                path: [&b"blobs/sha256/"[..], &e.name].concat(),
                problem: Problem::CorruptBlob,
                repaired: false,
                note: Some("not removed: remove it by hand or re-import".into()),
            });
        }
    }
    drop(blobdir);
    let layers = store.dir(b"layers")?;
    for d in &layer_dirs {
        if sys::stat_at_opt(layers.as_fd(), d.hex().as_bytes())
            .map_err(|e| store.err("layers", e))?
            .is_none_or(|st| !st.is_dir())
        {
            report.findings.push(Finding {
                path: format!("layers/{}", d.hex()).into_bytes(),
                problem: Problem::MissingLayerDir,
                repaired: false,
                note: None,
            });
        }
    }
    // Leftovers: staging dirs and leases whose lock nobody holds.
    for dir in [&b"tmp"[..], b"mounts"] {
        let fd = store.dir(dir)?;
        for e in sys::read_dir_all(store.dir(dir)?).map_err(|e| store.err("reading", e))? {
            report.entries += 1;
            let held = match sys::open_at(fd.as_fd(), &e.name, libc::O_RDONLY, 0) {
                Ok(h) => !sys::flock(h.as_fd(), sys::LockKind::Exclusive, true)
                    .map_err(|e| store.err("lock", e))?,
                Err(_) => false,
            };
            if held {
                continue;
            }
            let repaired = repair && crate::fsutil::remove_tree(fd.as_fd(), &e.name).is_ok();
            report.findings.push(Finding {
                path: [dir, b"/", &e.name].concat(),
                problem: Problem::StaleStoreEntry,
                repaired,
                note: None,
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_suffixes() {
        assert_eq!(
            overlay_suffix(b"trusted.overlay.opaque"),
            Some(&b"opaque"[..])
        );
        assert_eq!(
            overlay_suffix(b"user.fuseoverlayfs.opaque"),
            Some(&b"opaque"[..])
        );
        assert_eq!(overlay_suffix(b"user.overlayx"), None);
        assert_eq!(overlay_suffix(b"security.overlay.opaque"), None);
        assert_eq!(overlay_suffix(b"trusted.layerfs.origin"), None);
    }
}
