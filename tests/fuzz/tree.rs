//! Whole-tree snapshots that report errors instead of panicking (a broken mount is a finding,
//! not a crash of the fuzzer), and readable differences between two snapshots.
//!
//! Compared per entry: type, permission bits (with setuid/setgid/sticky), owner, size and
//! content hash of regular files, symlink targets, device numbers, `user.*` and
//! `security.capability` xattrs; across entries: hard-link groups. Not compared: timestamps,
//! directory sizes and link counts, inode numbers themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use layerfs::sys::{self, XTarget};
use sha2::{Digest, Sha256};

use super::ops::describe;

/// A snapshot: one line of facts per path, and the hard-link groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<Vec<u8>, String>,
    pub links: BTreeSet<Vec<Vec<u8>>>,
}

fn err(what: &str, p: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", p.display())
}

fn file_hash(p: &Path) -> Result<String, String> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open(p)
        .map_err(|e| err("open", p, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| err("read", p, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
    }
}

/// User-visible xattrs of `p` (not following a symlink), as `name=value` pairs.
fn xattrs(p: &Path) -> Result<String, String> {
    let parent = p.parent().unwrap_or(Path::new("/"));
    let name = p.file_name().map(|n| n.as_bytes()).unwrap_or(b".");
    let dir = sys::open_dir_path(parent).map_err(|e| err("open", parent, e))?;
    let t = XTarget::At(dir.as_fd(), name);
    let mut names = sys::xattr_list(t).map_err(|e| err("listxattr", p, e))?;
    names.sort();
    let mut out = String::new();
    for n in names {
        if !(n.starts_with(b"user.") || n == b"security.capability") {
            continue;
        }
        let v = sys::xattr_get(t, &n)
            .map_err(|e| err("getxattr", p, e))?
            .unwrap_or_default();
        out.push_str(&format!(" {}={}", n.escape_ascii(), v.escape_ascii()));
    }
    Ok(out)
}

/// Walk the tree under `root`.
pub fn snapshot(root: &Path) -> Result<Tree, String> {
    let mut tree = Tree::default();
    let mut inos: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| err("readdir", &dir, e))? {
            names.push(e.map_err(|e| err("readdir", &dir, e))?.file_name());
        }
        names.sort();
        for name in names {
            let r = rel.join(&name);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).map_err(|e| err("lstat", &p, e))?;
            let mut line = describe(&md);
            if md.is_dir() {
                stack.push(r.clone());
            } else if md.is_file() {
                line.push(' ');
                line.push_str(&file_hash(&p)?);
            } else if md.file_type().is_symlink() {
                let t = fs::read_link(&p).map_err(|e| err("readlink", &p, e))?;
                line.push_str(&format!(" -> {}", t.as_os_str().as_bytes().escape_ascii()));
            }
            line.push_str(&xattrs(&p)?);
            let key = r.as_os_str().as_bytes().to_vec();
            if !md.is_dir() && md.nlink() > 1 {
                inos.entry(md.ino()).or_default().push(key.clone());
            }
            tree.entries.insert(key, line);
        }
    }
    tree.links = inos
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Ok(tree)
}

/// The differences between two snapshots (at most `max` entries), or `None` when equal.
pub fn diff(a: &Tree, b: &Tree, labels: (&str, &str), max: usize) -> Option<String> {
    if a == b {
        return None;
    }
    let mut out = String::new();
    let keys: BTreeSet<&Vec<u8>> = a.entries.keys().chain(b.entries.keys()).collect();
    let mut n = 0;
    for k in keys {
        let (x, y) = (a.entries.get(k), b.entries.get(k));
        if x != y {
            n += 1;
            if n <= max {
                out.push_str(&format!(
                    "    {}:\n      {:8} {}\n      {:8} {}\n",
                    k.escape_ascii(),
                    labels.0,
                    x.map(String::as_str).unwrap_or("(absent)"),
                    labels.1,
                    y.map(String::as_str).unwrap_or("(absent)")
                ));
            }
        }
    }
    if n > max {
        out.push_str(&format!("    ... {} more\n", n - max));
    }
    if a.links != b.links {
        let show = |l: &BTreeSet<Vec<Vec<u8>>>| {
            l.iter()
                .map(|g| {
                    g.iter()
                        .map(|p| p.escape_ascii().to_string())
                        .collect::<Vec<_>>()
                        .join("=")
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push_str(&format!(
            "    hard links:\n      {:8} {}\n      {:8} {}\n",
            labels.0,
            show(&a.links),
            labels.1,
            show(&b.links)
        ));
    }
    Some(out)
}
