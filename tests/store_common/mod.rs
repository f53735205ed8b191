//! Helpers for the store integration tests: run the built binary, build hostile tars byte by
//! byte, snapshot whole trees for comparison, mount kernel overlayfs as the oracle.
//!
//! The tests need root (chown, mknod, trusted xattrs, mounts). Without root a test is skipped
//! with a message, except when `CI=true`, where it fails: CI must run them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

#[path = "../common/unmount.rs"]
mod unmount;
pub use unmount::unmount_retrying;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_layerfs")
}

/// True when running as root; panics under CI otherwise.
pub fn root() -> bool {
    let ok = layerfs::sys::geteuid() == 0;
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("store tests need root, and CI=true: refusing to skip");
        }
        eprintln!("skipping: needs root");
    }
    ok
}

/// True when `tool` is installed; panics under CI otherwise (scripts/test.sh installs it).
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is missing and CI=true (scripts/test.sh installs it)");
        }
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

/// A scratch directory with a store in it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("lfs-store-test")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// `layerfs --root STORE ARGS...` with optional stdin.
    pub fn layerfs(&self, args: &[&OsStr], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(bin());
        cmd.arg("--root").arg(self.store()).args(args);
        cmd.env_remove("SOURCE_DATE_EPOCH");
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn layerfs");
        if let Some(data) = stdin {
            let mut s = child.stdin.take().unwrap();
            // The command may refuse early and close its end.
            let _ = s.write_all(data);
        }
        child.wait_with_output().expect("wait layerfs")
    }

    /// Run and expect success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let out = self.layerfs(&a, None);
        assert!(
            out.status.success(),
            "layerfs {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and expect failure with a one-line message containing `want`.
    pub fn fails(&self, args: &[&str], want: &str) -> String {
        let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        expect_failure(self.layerfs(&a, None), want)
    }

    /// Import a tar given as bytes on stdin.
    pub fn import_bytes(&self, tar: &[u8], extra: &[&str]) -> Output {
        let mut a: Vec<&OsStr> = vec![OsStr::new("import"), OsStr::new("-")];
        a.extend(extra.iter().map(OsStr::new));
        self.layerfs(&a, Some(tar))
    }

    /// Names of everything in the store except the lock file, with file contents' hashes:
    /// what a failed command must leave unchanged.
    pub fn store_state(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.store(), &self.store(), &mut out);
        out.retain(|l| !l.starts_with("lock "));
        out
    }
}

fn walk(root: &Path, p: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for e in entries {
        let rel = e.strip_prefix(root).unwrap().display().to_string();
        let m = fs::symlink_metadata(&e).unwrap();
        if m.is_dir() {
            out.push(format!("{rel}/"));
            walk(root, &e, out);
        } else if m.is_file() {
            out.push(format!("{rel} {}", hash_file(&e)));
        } else {
            out.push(rel);
        }
    }
}

pub fn expect_failure(out: Output, want: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected failure, got {out:?}");
    assert!(err.contains(want), "stderr {err:?} lacks {want:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    err
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-ec").arg(script))
}

pub fn hash_file(p: &Path) -> String {
    let mut f = fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

// ---- raw tar building -----------------------------------------------------------------------

/// A tar built header by header, with no validation: hostile inputs are the point.
#[derive(Default)]
pub struct RawTar(pub Vec<u8>);

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    field[..w].copy_from_slice(s.as_bytes());
}

pub fn header(name: &[u8], flag: u8, size: u64, link: &[u8], mode: u32, uid: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], uid as u64);
    octal(&mut h[116..124], uid as u64);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_600_000_000);
    h[156] = flag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0);
    octal(&mut h[337..345], 0);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    octal(&mut h[148..155], sum);
    h
}

impl RawTar {
    pub fn entry(&mut self, name: &[u8], flag: u8, data: &[u8], link: &[u8]) -> &mut Self {
        let mode = if flag == b'5' { 0o755 } else { 0o644 };
        self.entry_full(name, flag, data, link, mode, 0)
    }

    pub fn entry_full(
        &mut self,
        name: &[u8],
        flag: u8,
        data: &[u8],
        link: &[u8],
        mode: u32,
        uid: u32,
    ) -> &mut Self {
        self.0
            .extend_from_slice(&header(name, flag, data.len() as u64, link, mode, uid));
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name.as_bytes(), b'0', data, b"")
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name.as_bytes(), b'5', b"", b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name.as_bytes(), b'2', b"", target.as_bytes())
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name.as_bytes(), b'1', b"", target.as_bytes())
    }

    /// A PAX header with the given records, applying to the next entry.
    pub fn pax(&mut self, records: &[(&[u8], &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} ").as_bytes());
            data.extend_from_slice(k);
            data.push(b'=');
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.entry(b"PaxHeader", b'x', &data, b"")
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let mut v = self.0.clone();
        v.extend_from_slice(&[0u8; 1024]);
        v
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

// ---- tree snapshots -------------------------------------------------------------------------

/// Xattrs a layer carries (the same policy as the code under test, written out again).
fn visible_xattr(name: &[u8]) -> bool {
    let private = [
        &b"trusted.overlay."[..],
        b"user.overlay.",
        b"trusted.layerfs.",
        b"user.layerfs.",
        b"user.fuseoverlayfs.",
    ];
    if private.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name.starts_with(b"system.posix_acl_")
}

fn xattrs(p: &Path) -> String {
    let dir = layerfs::sys::open_dir_path(p.parent().unwrap()).unwrap();
    let name = p.file_name().unwrap().as_bytes();
    let t = layerfs::sys::XTarget::At(std::os::fd::AsFd::as_fd(&dir), name);
    let mut names = layerfs::sys::xattr_list(t).unwrap_or_default();
    names.retain(|n| visible_xattr(n));
    names.sort();
    names
        .iter()
        .map(|n| {
            let v = layerfs::sys::xattr_get(t, n).unwrap().unwrap_or_default();
            format!("{}={}", n.escape_ascii(), v.escape_ascii())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One line for the root and per object below it: type, mode, ids, size, content
/// hash or target or device, mtime seconds, xattrs, and its hard-link group. Comparing two
/// snapshots compares everything a layer carries.
pub fn snapshot(root: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    // The root's own attributes (a layer's `./` entry carries them).
    let m = fs::metadata(root).unwrap();
    lines.push(format!(
        ". dir mode={:o} {}:{} mtime={} [{}]",
        m.mode() & 0o7777,
        m.uid(),
        m.gid(),
        m.mtime(),
        xattrs(root)
    ));
    snap(root, root, &mut lines, &mut inodes);
    // Hard-link groups, named by their members (inode numbers differ between trees).
    for group in inodes.values().filter(|g| g.len() > 1) {
        lines.push(format!("links {}", group.join(" ")));
    }
    lines
}

fn snap(root: &Path, p: &Path, out: &mut Vec<String>, inodes: &mut BTreeMap<u64, Vec<String>>) {
    let mut entries: Vec<_> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {p:?}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for e in entries {
        let rel = e.strip_prefix(root).unwrap().display().to_string();
        let m = fs::symlink_metadata(&e).unwrap();
        let ft = m.file_type();
        let what = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_file() {
            format!("file {} {}", m.len(), hash_file(&e))
        } else if ft.is_symlink() {
            format!("symlink {}", fs::read_link(&e).unwrap().display())
        } else if ft.is_char_device() {
            format!("chr {:x}", m.rdev())
        } else if ft.is_block_device() {
            format!("blk {:x}", m.rdev())
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            "other".to_string()
        };
        // Symlink times are not carried by every tool; everything else's are.
        let mtime = if ft.is_symlink() { 0 } else { m.mtime() };
        let x = if ft.is_symlink() {
            String::new()
        } else {
            xattrs(&e)
        };
        out.push(format!(
            "{rel} {what} mode={:o} {}:{} mtime={mtime} [{x}]",
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        ));
        if !ft.is_dir() && m.nlink() > 1 {
            inodes.entry(m.ino()).or_default().push(rel.clone());
        }
        if ft.is_dir() {
            snap(root, &e, out, inodes);
        }
    }
}

/// Show the first difference between two snapshots.
pub fn assert_same(a: &[String], b: &[String], what: &str) {
    if a == b {
        return;
    }
    let diff: Vec<String> = a
        .iter()
        .filter(|l| !b.contains(l))
        .map(|l| format!("- {l}"))
        .chain(
            b.iter()
                .filter(|l| !a.contains(l))
                .map(|l| format!("+ {l}")),
        )
        .collect();
    panic!("{what}: trees differ:\n{}", diff.join("\n"));
}

// ---- mounts ---------------------------------------------------------------------------------

/// A kernel overlayfs mount, unmounted on drop.
pub struct Overlay(pub PathBuf);

impl Overlay {
    /// `lowers` top first; `upper`/`work` optional.
    pub fn mount(lowers: &[PathBuf], upper: Option<(&Path, &Path)>, mnt: &Path) -> Overlay {
        fs::create_dir_all(mnt).unwrap();
        let lower: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let mut opts = format!("lowerdir={}", lower.join(":"));
        if let Some((u, w)) = upper {
            opts.push_str(&format!(
                ",upperdir={},workdir={}",
                u.display(),
                w.display()
            ));
        }
        // Our uppers never hold redirects or metacopy files: keep the kernel from making them.
        opts.push_str(",redirect_dir=off,index=off,metacopy=off");
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(mnt));
        Overlay(mnt.to_path_buf())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        unmount_retrying(&self.0);
    }
}

/// A layerfs mount (the daemon), unmounted on drop.
pub struct LayerfsMount(pub PathBuf);

impl LayerfsMount {
    pub fn mount(env: &Env, args: &[&str], mnt: &Path) -> LayerfsMount {
        fs::create_dir_all(mnt).unwrap();
        let mut a = vec!["mount"];
        a.extend_from_slice(args);
        let m = mnt.display().to_string();
        a.push(&m);
        env.ok(&a);
        LayerfsMount(mnt.to_path_buf())
    }
}

impl Drop for LayerfsMount {
    fn drop(&mut self) {
        let st = Command::new(bin()).arg("umount").arg(&self.0).status();
        if !matches!(st, Ok(s) if s.success()) {
            unmount_retrying(&self.0);
        }
    }
}

/// Build a base tree with every kind of object a layer carries.
pub fn base_tree(p: &Path) {
    sh(&format!(
        r#"
        cd {dir}
        mkdir -p etc usr/bin var/lib/data 'sp ace' deep/a/b/c opaque-later gone-dir
        printf 'root:x:0:0\n' > etc/passwd
        printf 'base\n' > etc/motd
        printf 'lower only\n' > opaque-later/lower
        printf 'x\n' > gone-dir/x
        head -c 200000 /dev/urandom > usr/bin/tool
        chmod 4755 usr/bin/tool
        ln usr/bin/tool usr/bin/tool-link
        ln -s ../etc/passwd usr/passwd-link
        ln -s /absolute/target dangling
        ln -s "/$(printf 'long/%.0s' $(seq 1 40))target" long-link
        mkfifo var/fifo
        mknod var/null c 1 3
        mknod var/blk b 7 0
        printf 'data' > var/lib/data/file
        chown 1234:5678 var/lib/data/file
        chown -h 42:43 dangling
        setfattr -n user.note -v hello etc/motd
        setfattr -n user.dirnote -v d etc
        printf '%s' 'deep' > deep/a/b/c/leaf
        printf 'long\n' > "deep/a/b/c/$(printf 'n%.0s' $(seq 1 200))"
        printf '\377' > "$(printf 'bin\377ary')"
        touch -d '2001-02-03 04:05:06' etc/passwd etc
        chmod 0750 var/lib
        chown 7:8 var/lib
        "#,
        dir = p.display()
    ));
}
