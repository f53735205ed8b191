//! Helpers for integration tests: build layer trees, mount layerfs (the built binary) and
//! kernel overlayfs over them, and compare whole trees.
//!
//! Tests need root and /dev/fuse. Without them a test is skipped with a message, except when
//! `CI=true`, where it fails: CI must run them.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use layerfs::sys::{self, XTarget};

mod unmount;
use sha2::{Digest, Sha256};
pub use unmount::unmount_retrying;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_layerfs")
}

/// True when the test can run (root and /dev/fuse). Panics under CI when it cannot.
pub fn can_mount() -> bool {
    let ok = sys::geteuid() == 0 && Path::new("/dev/fuse").exists();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("FUSE tests need root and /dev/fuse, and CI=true: refusing to skip");
        }
        eprintln!("skipping: needs root and /dev/fuse");
    }
    ok
}

/// Run a command, panic with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---- building trees -------------------------------------------------------------------------

pub fn mkdirp(p: impl AsRef<Path>) {
    fs::create_dir_all(p.as_ref()).unwrap_or_else(|e| panic!("mkdir {:?}: {e}", p.as_ref()));
}

pub fn wfile(p: impl AsRef<Path>, data: impl AsRef<[u8]>) {
    let p = p.as_ref();
    if let Some(d) = p.parent() {
        mkdirp(d);
    }
    fs::write(p, data).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
}

pub fn symlink(target: impl AsRef<Path>, p: impl AsRef<Path>) {
    if let Some(d) = p.as_ref().parent() {
        mkdirp(d);
    }
    std::os::unix::fs::symlink(target.as_ref(), p.as_ref())
        .unwrap_or_else(|e| panic!("symlink {:?}: {e}", p.as_ref()));
}

pub fn chmod(p: impl AsRef<Path>, mode: u32) {
    fs::set_permissions(p.as_ref(), fs::Permissions::from_mode(mode)).expect("chmod");
}

fn split(p: &Path) -> (Dir, OsString) {
    let parent = p.parent().expect("path has a parent");
    let dir = sys::open_dir_path(parent).unwrap_or_else(|e| panic!("open {parent:?}: {e}"));
    (Dir(dir), p.file_name().expect("file name").to_owned())
}

struct Dir(std::os::fd::OwnedFd);

/// A kernel-format whiteout (char device 0/0).
pub fn whiteout(p: impl AsRef<Path>) {
    let (dir, name) = split(p.as_ref());
    sys::mknod_at(dir.0.as_fd(), name.as_bytes(), sys::S_IFCHR, 0).expect("mknod whiteout");
}

pub fn mkfifo(p: impl AsRef<Path>) {
    let (dir, name) = split(p.as_ref());
    sys::mknod_at(dir.0.as_fd(), name.as_bytes(), sys::S_IFIFO | 0o644, 0).expect("mkfifo");
}

pub fn setxattr(p: impl AsRef<Path>, name: &str, value: &[u8]) {
    let (dir, file) = split(p.as_ref());
    sys::xattr_set(
        XTarget::At(dir.0.as_fd(), file.as_bytes()),
        name.as_bytes(),
        value,
        0,
    )
    .unwrap_or_else(|e| panic!("setxattr {name} on {:?}: {e}", p.as_ref()));
}

pub fn getxattr(p: impl AsRef<Path>, name: &str) -> Option<Vec<u8>> {
    let (dir, file) = split(p.as_ref());
    sys::xattr_get(XTarget::At(dir.0.as_fd(), file.as_bytes()), name.as_bytes())
        .unwrap_or_else(|e| panic!("getxattr {name} on {:?}: {e}", p.as_ref()))
}

pub fn listxattr(p: impl AsRef<Path>) -> Vec<Vec<u8>> {
    let (dir, file) = split(p.as_ref());
    sys::xattr_list(XTarget::At(dir.0.as_fd(), file.as_bytes())).unwrap_or_default()
}

pub fn opaque(p: impl AsRef<Path>) {
    setxattr(p, "trusted.overlay.opaque", b"y");
}

// ---- mounts -----------------------------------------------------------------------------------

/// A mounted filesystem, unmounted (and its daemon waited for) on drop.
pub struct Mount {
    pub path: PathBuf,
    pub daemon: Option<u32>,
}

impl Mount {
    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Unmount now and wait for a layerfs daemon to exit.
    pub fn unmount(&mut self) {
        if !is_mounted(&self.path) {
            return;
        }
        unmount_retrying(&self.path);
        if let Some(pid) = self.daemon.take() {
            wait_gone(pid, Duration::from_secs(20));
        }
    }
}

/// A fresh 64 MiB tmpfs at `dir` (created), unmounted on drop: a filesystem of its own, so
/// a test can watch its free space.
pub fn tmpfs(dir: &Path) -> Mount {
    mkdirp(dir);
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "layerfs-test"])
        .arg(dir));
    Mount {
        path: dir.to_path_buf(),
        daemon: None,
    }
}

/// Free bytes of the filesystem holding `p`.
pub fn free_bytes(p: &Path) -> u64 {
    let dir = fs::File::open(p).unwrap();
    let st = sys::fstatvfs(dir.as_fd()).unwrap();
    st.bfree * st.frsize as u64
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let want = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|f| f.replace("\\040", " ") == want.to_string_lossy())
    })
}

/// The per-mount options (field 6 of mountinfo) of the mount at `p`.
pub fn mount_options(p: &Path) -> String {
    let want = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(&*want.to_string_lossy()))
        .filter_map(|l| l.split(' ').nth(5).map(str::to_owned))
        .next_back()
        .unwrap_or_default()
}

/// Pid of the layerfs daemon serving `mnt`, found by its command line.
pub fn daemon_pid(mnt: &Path) -> Option<u32> {
    let want = mnt.as_os_str().as_bytes();
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if !zombie && args.first().is_some_and(|a| a.ends_with(b"layerfs")) && args.contains(&want)
        {
            return Some(pid);
        }
    }
    None
}

/// Wait until a process is gone, or a zombie with no thread left: a leader thread that
/// exited first shows as a zombie while the others still run and hold its files open.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        let threads = fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
        if state.is_empty() || (zombie && threads <= 1) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Mount layerfs with `args` (e.g. `--lower A --upper U ...`) at `mnt`; `mnt` is created.
/// `LAYERFS_TEST_MOUNT_OPTS` adds mount options to every mount (scripts/test.sh runs the FUSE
/// tests a second time with `io_uring=off,cache_small_files=0`).
pub fn layerfs(args: &[&OsStr], mnt: &Path) -> Mount {
    mkdirp(mnt);
    let mut cmd = Command::new(bin());
    cmd.arg("mount");
    if let Some(extra) = std::env::var_os("LAYERFS_TEST_MOUNT_OPTS").filter(|o| !o.is_empty()) {
        cmd.arg("-o").arg(extra);
    }
    cmd.args(args).arg(mnt);
    run(&mut cmd);
    let mnt = fs::canonicalize(mnt).expect("canonical mountpoint");
    assert!(
        is_mounted(&mnt),
        "layerfs mount returned but {mnt:?} is not mounted"
    );
    let daemon = daemon_pid(&mnt);
    Mount { path: mnt, daemon }
}

/// `--lower` arguments for a list of directories, top first.
pub fn lower_args(lowers: &[&Path]) -> Vec<OsString> {
    let mut v = Vec::new();
    for l in lowers {
        v.push(OsString::from("--lower"));
        v.push(l.as_os_str().to_owned());
    }
    v
}

/// Mount layerfs over lowers (top first) and an optional upper/work.
pub fn layerfs_stack(
    lowers: &[&Path],
    upper: Option<(&Path, &Path)>,
    mnt: &Path,
    opts: &[&str],
) -> Mount {
    let mut args = lower_args(lowers);
    if let Some((u, w)) = upper {
        mkdirp(u);
        mkdirp(w);
        args.extend([
            "--upper".into(),
            u.as_os_str().to_owned(),
            "--work".into(),
            w.as_os_str().to_owned(),
        ]);
    }
    for o in opts {
        args.push("-o".into());
        args.push(OsString::from(o));
    }
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    layerfs(&refs, mnt)
}

/// Mount kernel overlayfs: lowers top first, optional upper/work, extra options.
pub fn kernel(lowers: &[&Path], upper: Option<(&Path, &Path)>, mnt: &Path, extra: &str) -> Mount {
    mkdirp(mnt);
    let lower = lowers
        .iter()
        .map(|l| l.to_string_lossy().replace(':', "\\:"))
        .collect::<Vec<_>>()
        .join(":");
    let mut opts = format!("lowerdir={lower}");
    if let Some((u, w)) = upper {
        mkdirp(u);
        mkdirp(w);
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            u.display(),
            w.display()
        ));
    }
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(mnt));
    Mount {
        path: fs::canonicalize(mnt).expect("canonical mountpoint"),
        daemon: None,
    }
}

/// Mount kernel overlayfs with exactly these options (for forms [`kernel`] does not build,
/// such as data-only layers: `lowerdir=a::d`).
pub fn kernel_with(opts: &str, mnt: &Path) -> Mount {
    mkdirp(mnt);
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", opts])
        .arg(mnt));
    Mount {
        path: fs::canonicalize(mnt).expect("canonical mountpoint"),
        daemon: None,
    }
}

/// Assert that every entry's `d_ino` in a plain listing equals its `st_ino`.
pub fn assert_dino_matches(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let fd = sys::open_dir_path(dir).expect("open dir");
    let mut reader = sys::DirReader::with_buffer(fd, 4096).expect("reader");
    let mut n = 0;
    while let Some(e) = reader.next_entry().expect("getdents") {
        let st = fs::symlink_metadata(dir.join(OsStr::from_bytes(&e.name))).expect("lstat");
        assert_eq!(e.ino, st.ino(), "d_ino of {}", e.name.escape_ascii());
        n += 1;
    }
    assert!(n > 0, "{dir:?} is empty");
}

// ---- tree snapshots ------------------------------------------------------------------------------

/// What a tree comparison looks at for one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub kind: char,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size and content hash for regular files, target for symlinks, rdev for devices.
    pub data: String,
    /// user.* and security.capability xattrs.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A whole tree: entries by relative path, plus hard-link groups (sets of paths sharing an
/// inode, only groups with more than one path).
#[derive(Debug, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<Vec<u8>, Info>,
    pub links: BTreeSet<Vec<Vec<u8>>>,
}

fn hash_file(p: &Path) -> String {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {p:?}: {e}"));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {p:?}: {e}"));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

pub fn snapshot(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut inos: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<OsString> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"))
            .map(|e| e.expect("dir entry").file_name())
            .collect();
        names.sort();
        for name in names {
            let r = rel.join(&name);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {p:?}: {e}"));
            let ft = md.file_type();
            use std::os::unix::fs::FileTypeExt;
            let (kind, data) = if ft.is_dir() {
                stack.push(r.clone());
                ('d', String::new())
            } else if ft.is_symlink() {
                let t = fs::read_link(&p).expect("readlink");
                ('l', t.to_string_lossy().into_owned())
            } else if ft.is_file() {
                ('f', format!("{} {}", md.len(), hash_file(&p)))
            } else if ft.is_fifo() {
                ('p', String::new())
            } else if ft.is_char_device() {
                ('c', format!("{:x}", md.rdev()))
            } else if ft.is_block_device() {
                ('b', format!("{:x}", md.rdev()))
            } else {
                ('s', String::new())
            };
            let mut xattrs = BTreeMap::new();
            for n in listxattr(&p) {
                let s = String::from_utf8_lossy(&n).into_owned();
                if s.starts_with("user.") || s == "security.capability" {
                    if let Some(v) = getxattr(&p, &s) {
                        xattrs.insert(s, v);
                    }
                }
            }
            let key = r.as_os_str().as_bytes().to_vec();
            if !ft.is_dir() && md.nlink() > 1 {
                inos.entry(md.ino()).or_default().push(key.clone());
            }
            entries.insert(
                key,
                Info {
                    kind,
                    perm: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    data,
                    xattrs,
                },
            );
        }
    }
    let links = inos
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Tree { entries, links }
}

/// Assert two trees are the same, printing the first differences.
pub fn assert_same(a: &Tree, b: &Tree, what: &str) {
    if a == b {
        return;
    }
    let mut msg = String::new();
    let keys: BTreeSet<&Vec<u8>> = a.entries.keys().chain(b.entries.keys()).collect();
    let mut n = 0;
    for k in keys {
        let (x, y) = (a.entries.get(k), b.entries.get(k));
        if x != y {
            msg.push_str(&format!("  {}: {:?}\n   vs {:?}\n", k.escape_ascii(), x, y));
            n += 1;
            if n > 20 {
                break;
            }
        }
    }
    if a.links != b.links {
        msg.push_str(&format!(
            "  hard links: {:?}\n   vs {:?}\n",
            a.links, b.links
        ));
    }
    panic!("{what}: trees differ\n{msg}");
}

// ---- comparing with kernel overlayfs --------------------------------------------------------

/// Run each shell command in `dir` (one `sh -c` each); per command a line with the command, its
/// exit code and its trimmed stdout, to compare two mounts' results.
pub fn run_shell_ops<S: AsRef<str>>(dir: &Path, ops: &[S]) -> Vec<String> {
    ops.iter()
        .map(|op| {
            let op = op.as_ref();
            let out = Command::new("sh")
                .args(["-c", op])
                .current_dir(dir)
                .output()
                .expect("sh");
            format!(
                "{op}: {} {}",
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).trim()
            )
        })
        .collect()
}

/// What an upper holds, as overlay sees it: per path its type (`whiteout`, `dir`, `metacopy`
/// with its size and whether it holds no data, `other`) and its overlay xattrs with their
/// values, except origins (file handles of each side's objects) and the kernel's
/// `overlay.uuid` of the upper root (random per upper).
pub fn upper_markers(u: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![u.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_char_device() && md.rdev() == 0 {
            "whiteout".to_string()
        } else if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_file() && getxattr(&p, "trusted.overlay.metacopy").is_some() {
            // Sparse: neither the kernel's nor layerfs' metacopy copy has a data block.
            format!(
                "metacopy size={} no-data={}",
                md.len(),
                md.blocks() * 512 < 64 << 10
            )
        } else {
            "other".to_string()
        };
        let mut xattrs: Vec<String> = listxattr(&p)
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .filter(|n| n.contains(".overlay.") && !n.ends_with(".origin") && !n.ends_with(".uuid"))
            .map(|n| {
                let v = getxattr(&p, &n).unwrap_or_default();
                format!("{n}={}", String::from_utf8_lossy(&v))
            })
            .collect();
        xattrs.sort();
        let rel = p.strip_prefix(u).unwrap().display().to_string();
        out.insert(rel, format!("{kind} {}", xattrs.join(" ")));
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

// ---- a busybox base image ---------------------------------------------------------------------

/// Where the static busybox is (`busybox-static`).
pub fn busybox() -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg("command -v busybox")
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A busybox root filesystem made in `dir/base` (root and `app` 1000:1000 in /etc/passwd,
/// a sticky /tmp), as the layer tar `dir/base.tar` with fixed times: every test that makes it
/// gets the same bytes, so the same diffID. Returns the tar's path.
pub fn busybox_base_tar(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    for d in ["bin", "etc", "tmp", "root", "home/app"] {
        mkdirp(base.join(d));
    }
    fs::copy(busybox(), base.join("bin/busybox")).expect("copy busybox");
    for tool in [
        "sh", "ls", "cat", "echo", "mkdir", "touch", "id", "sleep", "wc", "sed", "ip", "stat",
        "true", "false", "test", "hostname", "head", "sort",
    ] {
        symlink("busybox", base.join("bin").join(tool));
    }
    wfile(
        base.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    );
    wfile(base.join("etc/group"), "root:x:0:\napp:x:1000:\n");
    chmod(base.join("tmp"), 0o1777);
    let tar = dir.join("base.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--mtime=@1700000000", "-C"])
        .arg(&base)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}
