//! Operations the fuzzer runs: generated from a seed, applied with real system calls to a
//! mount, and printed as Rust source. Every operation reports an [`Outcome`] (the errno, or
//! what it observed) so the two filesystems can be compared call by call.
//!
//! Opens use `O_NONBLOCK` so a fifo never blocks the fuzzer. Operations on a path follow
//! symlinks where the system call does (open, truncate, chmod) and not where it does not
//! (lstat, lchown, utimensat with `AT_SYMLINK_NOFOLLOW`, `l*xattr`); generated symlink targets
//! never leave the mount (see `spec`).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use layerfs::sys::{self, XTarget};
use sha2::{Digest, Sha256};

use super::rng::Rng;
use super::spec::{self, OWNERS, P, Stack, content, join, lit};

/// What an operation returned: what it saw on success, the errno on failure.
pub type Outcome = Result<String, i32>;

/// One operation; paths are relative to the mount root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `open(O_CREAT|O_EXCL|O_WRONLY, mode)`.
    Create(P, u32),
    /// `open(O_WRONLY)` then `pwrite(content(len, fill), off)`.
    Write(P, u64, u32, u8),
    /// `open(O_WRONLY|O_APPEND)` then `write(content(len, fill))`.
    Append(P, u32, u8),
    /// `open(O_WRONLY|O_TRUNC)`.
    OpenTrunc(P),
    /// `truncate(2)`.
    Truncate(P, u64),
    /// Read the whole file: size and hash.
    Read(P),
    /// `lstat`: type, mode, owner, size (files), link count (non-directories).
    Stat(P),
    /// `readdir`: names and types.
    List(P),
    Readlink(P),
    Mkdir(P, u32),
    Rmdir(P),
    Unlink(P),
    /// `renameat2(from, to, flags)`.
    Rename(P, P, u32),
    Link(P, P),
    /// `symlink(target, path)`.
    Symlink(P, P),
    /// `chmod(2)` (follows symlinks).
    Chmod(P, u32),
    /// `lchown(path, owner, owner)`.
    Chown(P, u32),
    /// `utimensat(AT_SYMLINK_NOFOLLOW)` to this second.
    Utimens(P, i64),
    /// `lsetxattr(user.x{k}, v{val}, flags)`.
    SetXattr(P, u8, u8, i32),
    /// `lremovexattr(user.x{k})`.
    RemoveXattr(P, u8),
    Mkfifo(P),
    /// open `O_RDWR`, unlink, `pwrite`, read everything back through the descriptor, close.
    UnlinkedWrite(P, u64, u32, u8),
    /// `mmap(MAP_SHARED)` the whole file and write into it (through python3).
    Mmap(P, u64, u32, u8),
    /// Open and keep a descriptor in slot `s` (closing what was there): mode 0 `O_RDONLY`,
    /// 1 `O_WRONLY`, 2 `O_RDWR`, 3 `O_RDWR|O_APPEND`.
    Open(u8, P, u8),
    /// `pwrite` through the descriptor in a slot.
    FdWrite(u8, u64, u32, u8),
    /// Read the whole file through the descriptor in a slot (`pread` from 0).
    FdRead(u8),
    /// `fstat` of the descriptor in a slot.
    FdStat(u8),
    /// `ftruncate` of the descriptor in a slot.
    FdTruncate(u8, u64),
    Close(u8),
}

/// Where operations run: a mount root and the descriptors kept open between operations.
pub struct Ctx {
    pub root: PathBuf,
    pub slots: [Option<fs::File>; SLOTS],
}

/// Number of descriptor slots.
pub const SLOTS: usize = 4;

impl Ctx {
    pub fn new(root: &Path) -> Ctx {
        Ctx {
            root: root.to_path_buf(),
            slots: Default::default(),
        }
    }

    fn slot(&self, s: u8) -> Result<&fs::File, String> {
        self.slots[s as usize % SLOTS]
            .as_ref()
            .ok_or_else(|| "no descriptor".to_string())
    }
}

fn read_all_fd(f: &fs::File) -> Result<Vec<u8>, i32> {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let got = sys::pread(f.as_fd(), &mut buf, data.len() as u64).map_err(errno)?;
        if got == 0 {
            break;
        }
        data.extend_from_slice(&buf[..got]);
    }
    Ok(data)
}

fn abs(root: &Path, p: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(p))
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Parent directory (opened through the mount, following symlinks) and final name.
fn at(root: &Path, p: &[u8]) -> Result<(std::os::fd::OwnedFd, Vec<u8>), i32> {
    let (dir, name) = match p.iter().rposition(|&b| b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&b""[..], p),
    };
    let fd = sys::open_dir_path(&abs(root, dir)).map_err(errno)?;
    Ok((fd, name.to_vec()))
}

fn hash(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    format!("{:x}", h)[..16].to_string()
}

fn open(root: &Path, p: &[u8], opts: &mut fs::OpenOptions) -> Result<fs::File, i32> {
    opts.custom_flags(libc::O_NONBLOCK)
        .open(abs(root, p))
        .map_err(errno)
}

fn pwrite_all(f: &fs::File, data: &[u8], off: u64) -> Result<(), i32> {
    let mut done = 0;
    while done < data.len() {
        done += sys::pwrite(f.as_fd(), &data[done..], off + done as u64).map_err(errno)?;
    }
    Ok(())
}

/// Describe a stat result the way both filesystems must agree on.
pub fn describe(md: &fs::Metadata) -> String {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        's'
    };
    let mut s = format!("{kind} {:o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid());
    if ft.is_file() || ft.is_symlink() {
        let _ = write!(s, " size={}", md.len());
    }
    if !ft.is_dir() {
        let _ = write!(s, " nlink={}", md.nlink());
    }
    if ft.is_char_device() || ft.is_block_device() {
        let _ = write!(s, " rdev={:x}", md.rdev());
    }
    s
}

const PY_MMAP: &str = r#"
import mmap, os, sys
try:
    fd = os.open(os.fsencode(sys.argv[1]), os.O_RDWR | os.O_NONBLOCK)
    size = os.fstat(fd).st_size
    if size == 0:
        print("empty")
        sys.exit(0)
    off = int(sys.argv[2]) % size
    data = bytes.fromhex(sys.argv[3])[: size - off]
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    m[off : off + len(data)] = data
    m.flush()
    m.close()
    os.close(fd)
    print("ok", size, len(data))
except OSError as e:
    print("errno", e.errno)
"#;

impl Op {
    /// Run the operation in `ctx`.
    pub fn apply(&self, ctx: &mut Ctx) -> Outcome {
        let root = ctx.root.clone();
        let root = root.as_path();
        match self {
            Op::Open(s, p, mode) => {
                ctx.slots[*s as usize % SLOTS] = None;
                let mut o = fs::OpenOptions::new();
                match mode % 4 {
                    0 => o.read(true),
                    1 => o.write(true),
                    2 => o.read(true).write(true),
                    _ => o.read(true).append(true),
                };
                let f = open(root, p, &mut o)?;
                ctx.slots[*s as usize % SLOTS] = Some(f);
                Ok(String::new())
            }
            Op::FdWrite(s, off, len, fill) => match ctx.slot(*s) {
                Err(e) => Ok(e),
                Ok(f) => {
                    pwrite_all(f, &content(*len, *fill), *off)?;
                    Ok(String::new())
                }
            },
            Op::FdRead(s) => match ctx.slot(*s) {
                Err(e) => Ok(e),
                Ok(f) => {
                    let data = read_all_fd(f)?;
                    Ok(format!("{} {}", data.len(), hash(&data)))
                }
            },
            // Without the link count: for a lower file whose name was removed while it was
            // open, layerfs answers 0 (POSIX) and the kernel the lower file's own count.
            Op::FdStat(s) => match ctx.slot(*s) {
                Err(e) => Ok(e),
                Ok(f) => f
                    .metadata()
                    .map(|md| {
                        let d = describe(&md);
                        match d.find(" nlink=") {
                            Some(i) => d[..i].to_string(),
                            None => d,
                        }
                    })
                    .map_err(errno),
            },
            Op::FdTruncate(s, len) => match ctx.slot(*s) {
                Err(e) => Ok(e),
                Ok(f) => f.set_len(*len).map(|_| String::new()).map_err(errno),
            },
            Op::Close(s) => {
                ctx.slots[*s as usize % SLOTS] = None;
                Ok(String::new())
            }
            Op::Create(p, mode) => open(
                root,
                p,
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(*mode),
            )
            .map(|_| String::new()),
            Op::Write(p, off, len, fill) => {
                let f = open(root, p, fs::OpenOptions::new().write(true))?;
                pwrite_all(&f, &content(*len, *fill), *off)?;
                Ok(String::new())
            }
            Op::Append(p, len, fill) => {
                let f = open(root, p, fs::OpenOptions::new().append(true))?;
                let data = content(*len, *fill);
                let mut done = 0;
                while done < data.len() {
                    done += sys::write(f.as_fd(), &data[done..]).map_err(errno)?;
                }
                Ok(String::new())
            }
            Op::OpenTrunc(p) => {
                open(root, p, fs::OpenOptions::new().write(true).truncate(true))?;
                Ok(String::new())
            }
            Op::Truncate(p, len) => {
                let f = open(root, p, fs::OpenOptions::new().write(true))?;
                f.set_len(*len).map_err(errno)?;
                Ok(String::new())
            }
            Op::Read(p) => {
                let mut f = open(root, p, fs::OpenOptions::new().read(true))?;
                let mut data = Vec::new();
                f.read_to_end(&mut data).map_err(errno)?;
                Ok(format!("{} {}", data.len(), hash(&data)))
            }
            Op::Stat(p) => fs::symlink_metadata(abs(root, p))
                .map(|md| describe(&md))
                .map_err(errno),
            Op::List(p) => {
                let mut names = Vec::new();
                for e in fs::read_dir(abs(root, p)).map_err(errno)? {
                    let e = e.map_err(errno)?;
                    let ft = e.file_type().map_err(errno)?;
                    let t = if ft.is_dir() { "/" } else { "" };
                    names.push(format!("{}{t}", e.file_name().as_bytes().escape_ascii()));
                }
                names.sort();
                Ok(names.join(" "))
            }
            Op::Readlink(p) => fs::read_link(abs(root, p))
                .map(|t| t.as_os_str().as_bytes().escape_ascii().to_string())
                .map_err(errno),
            Op::Mkdir(p, mode) => {
                let (d, n) = at(root, p)?;
                sys::mkdir_at(d.as_fd(), &n, *mode).map_err(errno)?;
                Ok(String::new())
            }
            Op::Rmdir(p) => {
                let (d, n) = at(root, p)?;
                sys::unlink_at(d.as_fd(), &n, true).map_err(errno)?;
                Ok(String::new())
            }
            Op::Unlink(p) => {
                let (d, n) = at(root, p)?;
                sys::unlink_at(d.as_fd(), &n, false).map_err(errno)?;
                Ok(String::new())
            }
            Op::Rename(a, b, flags) => {
                let (da, na) = at(root, a)?;
                let (db, nb) = at(root, b)?;
                sys::rename_at(da.as_fd(), &na, db.as_fd(), &nb, *flags).map_err(errno)?;
                Ok(String::new())
            }
            Op::Link(a, b) => {
                let (da, na) = at(root, a)?;
                let (db, nb) = at(root, b)?;
                sys::link_at(da.as_fd(), &na, db.as_fd(), &nb).map_err(errno)?;
                Ok(String::new())
            }
            Op::Symlink(t, p) => {
                let (d, n) = at(root, p)?;
                sys::symlink_at(t, d.as_fd(), &n).map_err(errno)?;
                Ok(String::new())
            }
            Op::Chmod(p, mode) => {
                fs::set_permissions(abs(root, p), fs::Permissions::from_mode(*mode))
                    .map(|_| String::new())
                    .map_err(errno)
            }
            Op::Chown(p, owner) => {
                let (d, n) = at(root, p)?;
                sys::chown_at(d.as_fd(), &n, Some(*owner), Some(*owner)).map_err(errno)?;
                Ok(String::new())
            }
            Op::Utimens(p, sec) => {
                let (d, n) = at(root, p)?;
                let t = sys::SetTime::At(sys::Timespec { sec: *sec, nsec: 0 });
                sys::utimens_at(d.as_fd(), &n, t, t).map_err(errno)?;
                Ok(String::new())
            }
            Op::SetXattr(p, k, v, flags) => {
                let (d, n) = at(root, p)?;
                sys::xattr_set(
                    XTarget::At(d.as_fd(), &n),
                    format!("user.x{k}").as_bytes(),
                    format!("v{v}").as_bytes(),
                    *flags,
                )
                .map_err(errno)?;
                Ok(String::new())
            }
            Op::RemoveXattr(p, k) => {
                let (d, n) = at(root, p)?;
                sys::xattr_remove(XTarget::At(d.as_fd(), &n), format!("user.x{k}").as_bytes())
                    .map_err(errno)?;
                Ok(String::new())
            }
            Op::Mkfifo(p) => {
                let (d, n) = at(root, p)?;
                sys::mknod_at(d.as_fd(), &n, sys::S_IFIFO | 0o640, 0).map_err(errno)?;
                Ok(String::new())
            }
            Op::UnlinkedWrite(p, off, len, fill) => {
                let f = open(root, p, fs::OpenOptions::new().read(true).write(true))?;
                let (d, n) = at(root, p)?;
                sys::unlink_at(d.as_fd(), &n, false).map_err(errno)?;
                pwrite_all(&f, &content(*len, *fill), *off)?;
                let md = f.metadata().map_err(errno)?;
                let data = read_all_fd(&f)?;
                Ok(format!(
                    "{} {} nlink={}",
                    data.len(),
                    hash(&data),
                    md.nlink()
                ))
            }
            Op::Mmap(p, off, len, fill) => {
                let hex: String = content(*len, *fill)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let out = Command::new("python3")
                    .arg("-c")
                    .arg(PY_MMAP)
                    .arg(abs(root, p))
                    .arg(off.to_string())
                    .arg(hex)
                    .output()
                    .expect("python3 runs (the fuzzer needs it for mmap writes)");
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            }
        }
    }

    /// Rust source for this operation.
    pub fn to_rust(&self) -> String {
        match self {
            Op::Create(p, m) => format!("Create({}, 0o{m:o})", lit(p)),
            Op::Write(p, o, l, f) => format!("Write({}, {o}, {l}, {f})", lit(p)),
            Op::Append(p, l, f) => format!("Append({}, {l}, {f})", lit(p)),
            Op::OpenTrunc(p) => format!("OpenTrunc({})", lit(p)),
            Op::Truncate(p, l) => format!("Truncate({}, {l})", lit(p)),
            Op::Read(p) => format!("Read({})", lit(p)),
            Op::Stat(p) => format!("Stat({})", lit(p)),
            Op::List(p) => format!("List({})", lit(p)),
            Op::Readlink(p) => format!("Readlink({})", lit(p)),
            Op::Mkdir(p, m) => format!("Mkdir({}, 0o{m:o})", lit(p)),
            Op::Rmdir(p) => format!("Rmdir({})", lit(p)),
            Op::Unlink(p) => format!("Unlink({})", lit(p)),
            Op::Rename(a, b, f) => format!("Rename({}, {}, {f})", lit(a), lit(b)),
            Op::Link(a, b) => format!("Link({}, {})", lit(a), lit(b)),
            Op::Symlink(t, p) => format!("Symlink({}, {})", lit(t), lit(p)),
            Op::Chmod(p, m) => format!("Chmod({}, 0o{m:o})", lit(p)),
            Op::Chown(p, o) => format!("Chown({}, {o})", lit(p)),
            Op::Utimens(p, s) => format!("Utimens({}, {s})", lit(p)),
            Op::SetXattr(p, k, v, f) => format!("SetXattr({}, {k}, {v}, {f})", lit(p)),
            Op::RemoveXattr(p, k) => format!("RemoveXattr({}, {k})", lit(p)),
            Op::Mkfifo(p) => format!("Mkfifo({})", lit(p)),
            Op::UnlinkedWrite(p, o, l, f) => format!("UnlinkedWrite({}, {o}, {l}, {f})", lit(p)),
            Op::Mmap(p, o, l, f) => format!("Mmap({}, {o}, {l}, {f})", lit(p)),
            Op::Open(s, p, m) => format!("Open({s}, {}, {m})", lit(p)),
            Op::FdWrite(s, o, l, f) => format!("FdWrite({s}, {o}, {l}, {f})"),
            Op::FdRead(s) => format!("FdRead({s})"),
            Op::FdStat(s) => format!("FdStat({s})"),
            Op::FdTruncate(s, l) => format!("FdTruncate({s}, {l})"),
            Op::Close(s) => format!("Close({s})"),
        }
    }

    /// The variant name (failure signatures group by it).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create(..) => "Create",
            Op::Write(..) => "Write",
            Op::Append(..) => "Append",
            Op::OpenTrunc(..) => "OpenTrunc",
            Op::Truncate(..) => "Truncate",
            Op::Read(..) => "Read",
            Op::Stat(..) => "Stat",
            Op::List(..) => "List",
            Op::Readlink(..) => "Readlink",
            Op::Mkdir(..) => "Mkdir",
            Op::Rmdir(..) => "Rmdir",
            Op::Unlink(..) => "Unlink",
            Op::Rename(..) => "Rename",
            Op::Link(..) => "Link",
            Op::Symlink(..) => "Symlink",
            Op::Chmod(..) => "Chmod",
            Op::Chown(..) => "Chown",
            Op::Utimens(..) => "Utimens",
            Op::SetXattr(..) => "SetXattr",
            Op::RemoveXattr(..) => "RemoveXattr",
            Op::Mkfifo(..) => "Mkfifo",
            Op::UnlinkedWrite(..) => "UnlinkedWrite",
            Op::Mmap(..) => "Mmap",
            Op::Open(..) => "Open",
            Op::FdWrite(..) => "FdWrite",
            Op::FdRead(..) => "FdRead",
            Op::FdStat(..) => "FdStat",
            Op::FdTruncate(..) => "FdTruncate",
            Op::Close(..) => "Close",
        }
    }
}

/// The generator's rough idea of the merged tree, kept up to date by the operations it
/// generates, so that most operations meet something of the right type. It needs not be
/// exact: the filesystems under test decide what really happens.
struct Model {
    vis: BTreeMap<P, char>,
}

fn parent_of(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => &[],
    }
}

fn is_below(p: &[u8], dir: &[u8]) -> bool {
    p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/'
}

impl Model {
    fn existing(&self, rng: &mut Rng, want: impl Fn(char) -> bool) -> Option<P> {
        let v: Vec<&P> = self
            .vis
            .iter()
            .filter(|(_, k)| want(**k))
            .map(|(p, _)| p)
            .collect();
        (!v.is_empty()).then(|| (*rng.pick(&v)).clone())
    }

    /// A name in an existing directory (the root included).
    fn fresh(&self, rng: &mut Rng) -> P {
        let dir = if rng.chance(25) {
            Vec::new()
        } else {
            self.existing(rng, |k| k == 'd').unwrap_or_default()
        };
        join(&dir, spec::name(rng))
    }

    fn any(rng: &mut Rng) -> P {
        let mut p = spec::name(rng).to_vec();
        for _ in 0..rng.below(3) {
            p = join(&p, spec::name(rng));
        }
        p
    }

    /// A target: mostly an existing entry of an accepted type, else a fresh or random path.
    fn pick(&self, rng: &mut Rng, want: impl Fn(char) -> bool) -> P {
        match rng.weighted(&[80, 10, 10]) {
            0 => self.existing(rng, want).unwrap_or_else(|| self.fresh(rng)),
            1 => self.fresh(rng),
            _ => Model::any(rng),
        }
    }

    fn new_name(&self, rng: &mut Rng) -> P {
        match rng.weighted(&[75, 15, 10]) {
            0 => self.fresh(rng),
            1 => self
                .existing(rng, |_| true)
                .unwrap_or_else(|| self.fresh(rng)),
            _ => Model::any(rng),
        }
    }

    fn add(&mut self, p: &[u8], kind: char) {
        let parent = parent_of(p);
        if (parent.is_empty() || self.vis.get(parent) == Some(&'d')) && !self.vis.contains_key(p) {
            self.vis.insert(p.to_vec(), kind);
        }
    }

    fn take_subtree(&mut self, p: &[u8]) -> Vec<(P, char)> {
        let keys: Vec<P> = self
            .vis
            .keys()
            .filter(|k| k.as_slice() == p || is_below(k, p))
            .cloned()
            .collect();
        keys.into_iter()
            .map(|k| {
                let v = self.vis.remove(&k).unwrap_or('f');
                (k, v)
            })
            .collect()
    }

    fn put_subtree(&mut self, from: &[u8], to: &[u8], entries: Vec<(P, char)>) {
        for (k, v) in entries {
            let mut n = to.to_vec();
            n.extend_from_slice(&k[from.len()..]);
            self.vis.insert(n, v);
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Create(p, _) => self.add(p, 'f'),
            Op::Mkdir(p, _) => self.add(p, 'd'),
            Op::Mkfifo(p) => self.add(p, 'p'),
            Op::Symlink(_, p) => self.add(p, 'l'),
            Op::Link(a, b) => {
                if matches!(self.vis.get(a), Some(k) if *k != 'd') {
                    self.add(b, 'f');
                }
            }
            Op::Unlink(p) | Op::UnlinkedWrite(p, ..) => {
                if matches!(self.vis.get(p), Some(k) if *k != 'd') {
                    self.vis.remove(p);
                }
            }
            Op::Rmdir(p)
                if self.vis.get(p) == Some(&'d') && !self.vis.keys().any(|k| is_below(k, p)) =>
            {
                self.vis.remove(p);
            }
            Op::Rename(a, b, flags) => {
                if !self.vis.contains_key(a) || is_below(b, a) || a == b {
                    return;
                }
                let pb = parent_of(b);
                if !(pb.is_empty() || self.vis.get(pb) == Some(&'d')) {
                    return;
                }
                if *flags == sys::RENAME_EXCHANGE {
                    if !self.vis.contains_key(b) || is_below(a, b) {
                        return;
                    }
                    let sa = self.take_subtree(a);
                    let sb = self.take_subtree(b);
                    self.put_subtree(a, b, sa);
                    self.put_subtree(b, a, sb);
                } else {
                    if *flags == sys::RENAME_NOREPLACE && self.vis.contains_key(b) {
                        return;
                    }
                    let sa = self.take_subtree(a);
                    self.take_subtree(b);
                    self.put_subtree(a, b, sa);
                }
            }
            _ => {}
        }
    }
}

fn small_len(rng: &mut Rng) -> u32 {
    match rng.weighted(&[60, 30, 10]) {
        0 => rng.below(32) as u32 + 1,
        1 => rng.below(4096) as u32 + 1,
        _ => rng.below(100_000) as u32 + 1,
    }
}

fn offset(rng: &mut Rng) -> u64 {
    match rng.weighted(&[50, 35, 15]) {
        0 => rng.below(64),
        1 => rng.below(16384),
        _ => rng.below(1 << 20),
    }
}

/// Modes with and without the special bits.
const MODES: &[u32] = &[
    0o644, 0o600, 0o755, 0o700, 0o444, 0o1777, 0o4755, 0o2755, 0o2775,
];

/// `n` random operations over `stack`.
pub fn generate(rng: &mut Rng, stack: &Stack, n: usize) -> Vec<Op> {
    let mut m = Model {
        vis: stack.visible(),
    };
    let mut ops = Vec::with_capacity(n);
    // Weights, in the order of the match below.
    let weights = [
        6, 8, 4, 2, 4, 6, 5, 5, 1, 6, 5, 7, 14, 4, 3, 4, 3, 2, 4, 3, 2, 2, 1, 6, 6, 5, 3, 2, 2,
    ];
    let file = |k: char| k == 'f';
    let nondir = |k: char| k != 'd';
    let dir = |k: char| k == 'd';
    let any = |_: char| true;
    for _ in 0..n {
        let op = match rng.weighted(&weights) {
            0 => Op::Create(m.new_name(rng), *rng.pick(MODES)),
            1 => Op::Write(
                m.pick(rng, file),
                offset(rng),
                small_len(rng),
                rng.below(256) as u8,
            ),
            2 => Op::Append(m.pick(rng, file), small_len(rng), rng.below(256) as u8),
            3 => Op::OpenTrunc(m.pick(rng, file)),
            4 => Op::Truncate(m.pick(rng, file), offset(rng)),
            5 => Op::Read(m.pick(rng, file)),
            6 => Op::Stat(m.pick(rng, any)),
            7 => Op::List(if rng.chance(10) {
                Vec::new()
            } else {
                m.pick(rng, dir)
            }),
            8 => Op::Readlink(m.pick(rng, |k| k == 'l')),
            9 => Op::Mkdir(m.new_name(rng), *rng.pick(MODES)),
            10 => Op::Rmdir(m.pick(rng, dir)),
            11 => Op::Unlink(m.pick(rng, nondir)),
            12 => {
                let flags = match rng.weighted(&[70, 15, 15]) {
                    0 => 0,
                    1 => sys::RENAME_NOREPLACE,
                    _ => sys::RENAME_EXCHANGE,
                };
                let from = m.pick(rng, any);
                let to = if rng.chance(50) {
                    m.new_name(rng)
                } else {
                    m.pick(rng, any)
                };
                Op::Rename(from, to, flags)
            }
            13 => Op::Link(m.pick(rng, nondir), m.new_name(rng)),
            14 => Op::Symlink(spec::gen_target(rng), m.new_name(rng)),
            15 => Op::Chmod(m.pick(rng, any), *rng.pick(MODES)),
            16 => Op::Chown(m.pick(rng, any), *rng.pick(OWNERS)),
            17 => Op::Utimens(m.pick(rng, any), 1_000_000_000 + rng.below(1 << 20) as i64),
            18 => Op::SetXattr(
                m.pick(rng, any),
                rng.below(4) as u8,
                rng.below(4) as u8,
                *rng.pick(&[0, 0, sys::XATTR_CREATE, sys::XATTR_REPLACE]),
            ),
            19 => Op::RemoveXattr(m.pick(rng, any), rng.below(4) as u8),
            20 => Op::Mkfifo(m.new_name(rng)),
            21 => Op::UnlinkedWrite(
                m.pick(rng, file),
                offset(rng),
                small_len(rng),
                rng.below(256) as u8,
            ),
            22 => Op::Mmap(
                m.pick(rng, file),
                offset(rng),
                rng.below(4096) as u32 + 1,
                rng.below(256) as u8,
            ),
            23 => Op::Open(
                rng.below(SLOTS as u64) as u8,
                m.pick(rng, file),
                rng.below(4) as u8,
            ),
            24 => Op::FdWrite(
                rng.below(SLOTS as u64) as u8,
                offset(rng),
                small_len(rng),
                rng.below(256) as u8,
            ),
            25 => Op::FdRead(rng.below(SLOTS as u64) as u8),
            26 => Op::FdStat(rng.below(SLOTS as u64) as u8),
            27 => Op::FdTruncate(rng.below(SLOTS as u64) as u8, offset(rng)),
            _ => Op::Close(rng.below(SLOTS as u64) as u8),
        };
        m.apply(&op);
        ops.push(op);
    }
    ops
}
