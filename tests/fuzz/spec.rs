//! Random lower stacks: what each layer holds, generated from a seed, written to disk, and
//! printed back as Rust source for reproducers.
//!
//! Names come from a small pool (`a`..`d` and one non-UTF-8 name) so that layers collide on the
//! same paths often: merged directories, names hidden by whiteouts and opaque directories,
//! files over directories and the reverse. Lowers never contain hard links (layerfs breaks a
//! lower hard-link group on copy-up, kernel overlayfs with `index=on` keeps it; a documented
//! divergence) nor AUFS `.wh.` files (the kernel does not read that dialect). Symlink targets
//! are relative and never contain `..`, so following one can never leave the mount.

use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use layerfs::sys::{self, XTarget};

use super::rng::Rng;

/// A path relative to a layer or mount root, as bytes.
pub type P = Vec<u8>;

/// `P` from a byte string (reproducers use it).
pub fn p(s: &[u8]) -> P {
    s.to_vec()
}

/// The name pool.
pub const NAMES: &[&[u8]] = &[b"a", b"b", b"c", b"d", b"\xffe"];

/// Pick a name (the non-UTF-8 one rarely).
pub fn name(rng: &mut Rng) -> &'static [u8] {
    NAMES[rng.weighted(&[10, 10, 10, 10, 2])]
}

pub fn join(parent: &[u8], name: &[u8]) -> P {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Contents of a generated file: `len` bytes of a pattern chosen by `fill`.
pub fn content(len: u32, fill: u8) -> Vec<u8> {
    (0..len)
        .map(|i| fill.wrapping_add((i % 251) as u8))
        .collect()
}

/// One object of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file; `xattrs` bit i set means `user.x{i}` = `v{i}`. Owner is uid = gid.
    File {
        len: u32,
        fill: u8,
        mode: u32,
        owner: u32,
        xattrs: u8,
    },
    /// Directory; `opaque` is 0, `b'y'` (opaque) or `b'x'` (holds xattr whiteouts).
    Dir {
        mode: u32,
        owner: u32,
        opaque: u8,
        xattrs: u8,
    },
    Symlink(P),
    Fifo(u32),
    /// Character device 0/0.
    Whiteout,
    /// Zero-size file with `trusted.overlay.whiteout` (its directory has `opaque=x`).
    XWhiteout,
}

/// A lower stack, top layer first; each layer lists paths parents first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stack {
    pub layers: Vec<Vec<(P, Kind)>>,
}

const FILE_MODES: &[u32] = &[0o644, 0o644, 0o600, 0o755, 0o444, 0o4755, 0o2755, 0o640];
const DIR_MODES: &[u32] = &[0o755, 0o755, 0o700, 0o1777, 0o2775, 0o555];
pub const OWNERS: &[u32] = &[0, 0, 1000, 2000];

fn gen_file(rng: &mut Rng) -> Kind {
    let len = match rng.weighted(&[10, 50, 30, 10]) {
        0 => 0,
        1 => rng.below(64) as u32 + 1,
        2 => rng.below(8192) as u32 + 1,
        _ => rng.below(300_000) as u32 + 65536,
    };
    Kind::File {
        len,
        fill: rng.below(256) as u8,
        mode: *rng.pick(FILE_MODES),
        owner: *rng.pick(OWNERS),
        xattrs: if rng.chance(25) {
            rng.below(16) as u8
        } else {
            0
        },
    }
}

/// A relative symlink target without `..`.
pub fn gen_target(rng: &mut Rng) -> P {
    let mut t = name(rng).to_vec();
    for _ in 0..rng.below(3) {
        t = join(&t, name(rng));
    }
    if rng.chance(10) {
        t = b"dangling".to_vec();
    }
    t
}

fn gen_dir(
    rng: &mut Rng,
    out: &mut Vec<(P, Kind)>,
    parent: &[u8],
    depth: u32,
    fill: u64,
    opaque_ok: bool,
) {
    for &n in NAMES {
        if !rng.chance(if n.is_ascii() { fill } else { fill / 4 }) {
            continue;
        }
        let path = join(parent, n);
        // Xattr whiteouts (the last weight) are off: kernel overlayfs (6.18) lists a directory
        // whose lower copy holds one as empty but refuses rmdir(2) of it with ENOTEMPTY,
        // where layerfs removes it; every such rmdir would be a kernel-side difference.
        let weights: &[u32] = if depth >= 3 {
            &[0, 40, 8, 4, 12, 0]
        } else {
            &[38, 32, 8, 4, 12, 0]
        };
        let kind = match rng.weighted(weights) {
            0 => Kind::Dir {
                mode: *rng.pick(DIR_MODES),
                owner: *rng.pick(OWNERS),
                opaque: if opaque_ok && rng.chance(15) { b'y' } else { 0 },
                xattrs: if rng.chance(15) {
                    rng.below(16) as u8
                } else {
                    0
                },
            },
            1 => gen_file(rng),
            2 => Kind::Symlink(gen_target(rng)),
            3 => Kind::Fifo(*rng.pick(&[0o644, 0o600])),
            4 => Kind::Whiteout,
            // Xattr whiteouts only below the layer root.
            _ if parent.is_empty() => Kind::Whiteout,
            _ => Kind::XWhiteout,
        };
        let is_dir = matches!(kind, Kind::Dir { .. });
        out.push((path.clone(), kind));
        if is_dir {
            gen_dir(rng, out, &path, depth + 1, fill * 7 / 10, opaque_ok);
        }
    }
}

impl Stack {
    /// A random stack of 2-4 layers.
    pub fn generate(rng: &mut Rng) -> Stack {
        let n = 2 + rng.below(3) as usize;
        let mut layers = Vec::new();
        for i in 0..n {
            let bottom = i + 1 == n;
            let fill = if bottom { 80 } else { 45 };
            let mut entries = Vec::new();
            gen_dir(rng, &mut entries, b"", 1, fill, !bottom);
            layers.push(entries);
        }
        let mut s = Stack { layers };
        fix_all(&mut s);
        s
    }

    /// What layer `layer` holds at `path`.
    fn at(&self, layer: usize, path: &[u8]) -> Option<&Kind> {
        self.layers[layer]
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, k)| k)
    }

    /// The layers (top first, from `from` down) whose directory at `path` the kernel merges
    /// into one: each step down follows directories, and stops below an opaque one or at a
    /// non-directory or whiteout.
    fn merged_at(&self, from: usize, path: &[u8]) -> Vec<usize> {
        let mut layers: Vec<usize> = (from..self.layers.len()).collect();
        let mut prefix: Vec<u8> = Vec::new();
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            prefix = join(&prefix, comp);
            let mut next = Vec::new();
            for &l in &layers {
                match self.at(l, &prefix) {
                    None => continue,
                    Some(Kind::Dir { opaque, .. }) => {
                        next.push(l);
                        if *opaque == b'y' {
                            break;
                        }
                    }
                    Some(_) => break,
                }
            }
            layers = next;
        }
        layers
    }

    /// Write the stack under `root` (`root/l0` is the top layer); returns the layer dirs.
    pub fn build(&self, root: &Path) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let dir = root.join(format!("l{i}"));
            std::fs::create_dir_all(&dir).expect("mkdir layer");
            let mut deferred_dirs = Vec::new();
            for (path, kind) in layer {
                make(&dir, path, kind, &mut deferred_dirs);
            }
            // Modes and owners of directories last (a 0555 directory still takes children
            // as root, but keep the order obvious), deepest first.
            for (path, mode, owner) in deferred_dirs.into_iter().rev() {
                let (d, n) = parent_fd(&dir, &path);
                sys::chown_at(d.as_fd(), &n, Some(owner), Some(owner)).expect("chown dir");
                sys::chmod_at(d.as_fd(), &n, mode).expect("chmod dir");
            }
            dirs.push(dir);
        }
        dirs
    }

    /// Rust source that rebuilds this stack.
    pub fn to_rust(&self) -> String {
        let mut s = String::from("Stack {\n    layers: vec![\n");
        for layer in &self.layers {
            s.push_str("        vec![\n");
            for (path, kind) in layer {
                let _ = writeln!(s, "            ({}, {}),", lit(path), kind_rust(kind));
            }
            s.push_str("        ],\n");
        }
        s.push_str("    ],\n}");
        s
    }

    /// Number of entries over all layers.
    pub fn len(&self) -> usize {
        self.layers.iter().map(Vec::len).sum()
    }

    /// The stack without entry `k` (counting over all layers) and everything below it.
    pub fn without(&self, k: usize) -> Stack {
        let mut out = self.clone();
        let mut k = k;
        for layer in &mut out.layers {
            if k < layer.len() {
                let (victim, _) = layer[k].clone();
                layer.retain(|(p, _)| !(p == &victim || is_below(p, &victim)));
                break;
            }
            k -= layer.len();
        }
        fix_all(&mut out);
        out
    }

    /// The merged view the stack shows, as path -> type (`d`, `f`, `l`, `p`), computed from
    /// the spec (the generator's model for picking targets; the filesystems are the oracle).
    pub fn visible(&self) -> std::collections::BTreeMap<P, char> {
        let mut out = std::collections::BTreeMap::new();
        for path in self.paths() {
            let (parent, _) = match path.iter().rposition(|&b| b == b'/') {
                Some(j) => (&path[..j], &path[j + 1..]),
                None => (&[][..], &path[..]),
            };
            if !parent.is_empty() && out.get(parent) != Some(&'d') {
                continue;
            }
            let layers = self.merged_at(0, parent);
            let top = layers.iter().find_map(|&l| self.at(l, &path));
            let kind = match top {
                Some(Kind::File { .. }) => 'f',
                Some(Kind::Dir { .. }) => 'd',
                Some(Kind::Symlink(_)) => 'l',
                Some(Kind::Fifo(_)) => 'p',
                _ => continue,
            };
            out.insert(path, kind);
        }
        out
    }

    /// Every path some layer holds (for picking operation targets).
    pub fn paths(&self) -> Vec<P> {
        let mut v: Vec<P> = self
            .layers
            .iter()
            .flat_map(|l| l.iter().map(|(p, _)| p.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn is_below(p: &[u8], dir: &[u8]) -> bool {
    p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/'
}

/// Directories holding xattr whiteouts are marked `opaque=x`; in an opaque (`y`) directory an
/// xattr whiteout would be an ordinary empty file to one reader and not another, so it becomes
/// a plain whiteout there.
fn fix_xwhiteouts(entries: &mut [(P, Kind)]) {
    let xparents: Vec<P> = entries
        .iter()
        .filter(|(_, k)| *k == Kind::XWhiteout)
        .map(|(p, _)| match p.iter().rposition(|&b| b == b'/') {
            Some(i) => p[..i].to_vec(),
            None => Vec::new(),
        })
        .collect();
    let mut to_plain = Vec::new();
    for (p, k) in entries.iter_mut() {
        if let Kind::Dir { opaque, .. } = k {
            if xparents.contains(p) {
                if *opaque == b'y' {
                    to_plain.push(p.clone());
                } else {
                    *opaque = b'x';
                }
            } else if *opaque == b'x' {
                *opaque = 0;
            }
        }
    }
    for (p, k) in entries.iter_mut() {
        if *k == Kind::XWhiteout {
            let parent = match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p[..i].to_vec(),
                None => Vec::new(),
            };
            if parent.is_empty() || to_plain.contains(&parent) {
                *k = Kind::Whiteout;
            }
        }
    }
}

/// Kernel overlayfs lists a whiteout as an unreadable entry when its directory merges nothing
/// from below (it reads such a directory as it is); layerfs hides it. Lowers written by an
/// overlay never look like that, so the generator drops such whiteouts.
fn fix_all(s: &mut Stack) {
    for i in 0..s.layers.len() {
        let drop: Vec<P> = s.layers[i]
            .iter()
            .filter(|(_, k)| matches!(k, Kind::Whiteout | Kind::XWhiteout))
            .map(|(p, _)| p.clone())
            .filter(|p| {
                let parent = match p.iter().rposition(|&b| b == b'/') {
                    Some(j) => &p[..j],
                    None => &[][..],
                };
                let m = s.merged_at(i, parent);
                !(m.first() == Some(&i) && m.len() > 1)
            })
            .collect();
        s.layers[i].retain(|(p, _)| !drop.contains(p));
        fix_xwhiteouts(&mut s.layers[i]);
    }
}

fn parent_fd(root: &Path, path: &[u8]) -> (std::os::fd::OwnedFd, Vec<u8>) {
    let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    let fd = sys::open_dir_beneath(sys::open_dir_path(root).expect("open layer").as_fd(), dir)
        .unwrap_or_else(|e| panic!("open {}: {e}", dir.escape_ascii()));
    (fd, name.to_vec())
}

fn set_xattrs(d: std::os::fd::BorrowedFd<'_>, n: &[u8], bits: u8) {
    for i in 0..4 {
        if bits & (1 << i) != 0 {
            sys::xattr_set(
                XTarget::At(d, n),
                format!("user.x{i}").as_bytes(),
                format!("v{i}").as_bytes(),
                0,
            )
            .expect("set xattr");
        }
    }
}

fn make(root: &Path, path: &[u8], kind: &Kind, dirs: &mut Vec<(P, u32, u32)>) {
    let (d, n) = parent_fd(root, path);
    let d = d.as_fd();
    match kind {
        Kind::File {
            len,
            fill,
            mode,
            owner,
            xattrs,
        } => {
            let f = sys::open_at(d, &n, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)
                .expect("create file");
            let data = content(*len, *fill);
            let mut off = 0;
            while off < data.len() {
                off += sys::pwrite(f.as_fd(), &data[off..], off as u64).expect("write");
            }
            sys::fchown(f.as_fd(), Some(*owner), Some(*owner)).expect("chown");
            sys::fchmod(f.as_fd(), *mode).expect("chmod");
            set_xattrs(d, &n, *xattrs);
        }
        Kind::Dir {
            mode,
            owner,
            opaque,
            xattrs,
        } => {
            sys::mkdir_at(d, &n, 0o755).expect("mkdir");
            set_xattrs(d, &n, *xattrs);
            if *opaque != 0 {
                sys::xattr_set(XTarget::At(d, &n), b"trusted.overlay.opaque", &[*opaque], 0)
                    .expect("opaque");
            }
            dirs.push((path.to_vec(), *mode, *owner));
        }
        Kind::Symlink(t) => sys::symlink_at(t, d, &n).expect("symlink"),
        Kind::Fifo(mode) => sys::mknod_at(d, &n, sys::S_IFIFO | mode, 0).expect("mkfifo"),
        Kind::Whiteout => sys::mknod_at(d, &n, sys::S_IFCHR, 0).expect("whiteout"),
        Kind::XWhiteout => {
            let f = sys::open_at(d, &n, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o644)
                .expect("create xwhiteout");
            sys::xattr_set(XTarget::Fd(f.as_fd()), b"trusted.overlay.whiteout", b"", 0)
                .expect("xwhiteout xattr");
        }
    }
}

/// A byte-string literal for Rust source: `p(b"a/b")`.
pub fn lit(p: &[u8]) -> String {
    format!("p(b\"{}\")", p.escape_ascii())
}

fn kind_rust(k: &Kind) -> String {
    match k {
        Kind::File {
            len,
            fill,
            mode,
            owner,
            xattrs,
        } => format!(
            "File {{ len: {len}, fill: {fill}, mode: 0o{mode:o}, owner: {owner}, xattrs: {xattrs} }}"
        ),
        Kind::Dir {
            mode,
            owner,
            opaque,
            xattrs,
        } => format!(
            "Dir {{ mode: 0o{mode:o}, owner: {owner}, opaque: {opaque}, xattrs: {xattrs} }}"
        ),
        Kind::Symlink(t) => format!("Symlink({})", lit(t)),
        Kind::Fifo(m) => format!("Fifo(0o{m:o})"),
        Kind::Whiteout => "Whiteout".into(),
        Kind::XWhiteout => "XWhiteout".into(),
    }
}
