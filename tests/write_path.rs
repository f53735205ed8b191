//! The write path under real FUSE: each operation and copy-up case, a scripted differential
//! run against kernel overlayfs, remount persistence, and a crash in the middle of a copy-up.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use common::*;
use layerfs::sys;

/// One scripted operation on a path relative to a mount root.
#[derive(Clone, Debug)]
enum Op {
    Write(&'static str, &'static str),
    Append(&'static str, &'static str),
    WriteAt(&'static str, u64, &'static str),
    Truncate(&'static str, u64),
    Mkdir(&'static str),
    Rmdir(&'static str),
    Unlink(&'static str),
    Rename(&'static str, &'static str, u32),
    Link(&'static str, &'static str),
    Symlink(&'static str, &'static str),
    Chmod(&'static str, u32),
    Chown(&'static str, u32, u32),
    Utime(&'static str, i64),
    SetXattr(&'static str, &'static str, &'static str),
    RemoveXattr(&'static str, &'static str),
    Mkfifo(&'static str),
    CreateExcl(&'static str),
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn parent_and_name(p: &Path) -> (std::os::fd::OwnedFd, Vec<u8>) {
    let dir = sys::open_dir_path(p.parent().unwrap()).unwrap();
    (dir, p.file_name().unwrap().as_bytes().to_vec())
}

fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let p = |s: &str| root.join(s);
    match *op {
        Op::Write(f, data) => fs::write(p(f), data).map_err(errno),
        Op::Append(f, data) => fs::OpenOptions::new()
            .append(true)
            .open(p(f))
            .and_then(|mut h| h.write_all(data.as_bytes()))
            .map_err(errno),
        Op::WriteAt(f, off, data) => fs::OpenOptions::new()
            .write(true)
            .open(p(f))
            .and_then(|mut h| {
                h.seek(SeekFrom::Start(off))?;
                h.write_all(data.as_bytes())
            })
            .map_err(errno),
        Op::Truncate(f, len) => fs::OpenOptions::new()
            .write(true)
            .open(p(f))
            .and_then(|h| h.set_len(len))
            .map_err(errno),
        Op::Mkdir(d) => fs::create_dir(p(d)).map_err(errno),
        Op::Rmdir(d) => fs::remove_dir(p(d)).map_err(errno),
        Op::Unlink(f) => fs::remove_file(p(f)).map_err(errno),
        Op::Rename(a, b, flags) => {
            let (da, na) = parent_and_name(&p(a));
            let (db, nb) = parent_and_name(&p(b));
            sys::rename_at(da.as_fd(), &na, db.as_fd(), &nb, flags).map_err(errno)
        }
        Op::Link(a, b) => fs::hard_link(p(a), p(b)).map_err(errno),
        Op::Symlink(t, l) => std::os::unix::fs::symlink(t, p(l)).map_err(errno),
        Op::Chmod(f, m) => fs::set_permissions(p(f), fs::Permissions::from_mode(m)).map_err(errno),
        Op::Chown(f, u, g) => std::os::unix::fs::lchown(p(f), Some(u), Some(g)).map_err(errno),
        Op::Utime(f, t) => {
            let (d, n) = parent_and_name(&p(f));
            let ts = sys::SetTime::At(sys::Timespec { sec: t, nsec: 0 });
            sys::utimens_at(d.as_fd(), &n, ts, ts).map_err(errno)
        }
        Op::SetXattr(f, k, v) => {
            let (d, n) = parent_and_name(&p(f));
            sys::xattr_set(
                sys::XTarget::At(d.as_fd(), &n),
                k.as_bytes(),
                v.as_bytes(),
                0,
            )
            .map_err(errno)
        }
        Op::RemoveXattr(f, k) => {
            let (d, n) = parent_and_name(&p(f));
            sys::xattr_remove(sys::XTarget::At(d.as_fd(), &n), k.as_bytes()).map_err(errno)
        }
        Op::Mkfifo(f) => {
            let (d, n) = parent_and_name(&p(f));
            sys::mknod_at(d.as_fd(), &n, sys::S_IFIFO | 0o640, 0).map_err(errno)
        }
        Op::CreateExcl(f) => fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p(f))
            .map(drop)
            .map_err(errno),
    }
}

/// The lowers the differential script runs over (no hard links: the kernel's index=on
/// semantics for those are tested separately).
fn diff_stack(root: &Path) {
    let (top, bot) = (root.join("top"), root.join("bot"));
    wfile(bot.join("etc/conf"), "bottom conf\n");
    wfile(bot.join("etc/other"), "other\n");
    wfile(bot.join("data/a/1"), "a1\n");
    wfile(bot.join("data/a/2"), "a2\n");
    wfile(bot.join("data/a/deep/x"), "deep x\n");
    wfile(bot.join("data/b/1"), "b1\n");
    wfile(bot.join("merged/low"), "low\n");
    wfile(bot.join("merged/both"), "both-low\n");
    wfile(bot.join("gone"), "gone\n");
    wfile(bot.join("opq/hidden"), "hidden\n");
    wfile(bot.join("empty-merged/.keep-low"), "k\n");
    wfile(bot.join("bin/tool"), "tool\n");
    chmod(bot.join("bin/tool"), 0o755);
    setxattr(bot.join("bin/tool"), "user.origin", b"bottom");
    wfile(top.join("merged/high"), "high\n");
    wfile(top.join("merged/both"), "both-high\n");
    whiteout(top.join("gone"));
    mkdirp(top.join("opq"));
    opaque(top.join("opq"));
    wfile(top.join("opq/shown"), "shown\n");
    wfile(top.join("topfile"), "top\n");
    mkdirp(top.join("empty-merged"));
}

fn script() -> Vec<Op> {
    use Op::*;
    vec![
        // copy-up by data change
        Append("etc/conf", "appended\n"),
        WriteAt("etc/other", 2, "XY"),
        Truncate("bin/tool", 2),
        // metadata-only copy-up
        Chmod("etc/other", 0o600),
        Chown("data/b/1", 1000, 1000),
        Utime("topfile", 1_000_000_000),
        SetXattr("merged/low", "user.k", "v"),
        SetXattr("bin/tool", "user.extra", "1"),
        RemoveXattr("bin/tool", "user.origin"),
        RemoveXattr("bin/tool", "user.absent"),
        // whiteouts and recreation
        Unlink("merged/both"),
        Write("merged/both", "recreated\n"),
        Unlink("merged/low"),
        Unlink("gone"),
        Write("gone", "back\n"),
        Rmdir("data/b"),
        Unlink("data/b/1"),
        Rmdir("data/b"),
        Mkdir("data/b"),
        Write("data/b/fresh", "fresh\n"),
        Rmdir("empty-merged"),
        Unlink("empty-merged/.keep-low"),
        Rmdir("empty-merged"),
        // renames: files, over files, lower dirs with children across dirs, over dirs
        Rename("etc/conf", "etc/conf.bak", 0),
        Rename("topfile", "etc/other", 0),
        Rename("data/a", "moved-a", 0),
        Rename("moved-a/deep", "opq/deep", 0),
        Mkdir("target-dir"),
        Rename("merged", "target-dir", 0),
        Mkdir("nonempty"),
        Write("nonempty/f", "f\n"),
        Rename("opq", "nonempty", 0),
        Rename("etc/conf.bak", "etc/other", sys::RENAME_NOREPLACE),
        Write("upper-only", "u\n"),
        Rename("upper-only", "bin/tool", sys::RENAME_EXCHANGE),
        Rename("bin", "etc", sys::RENAME_EXCHANGE),
        // links, symlinks, fifos, errors
        Link("etc/conf.bak", "hard"),
        Link("moved-a/1", "moved-a/1-link"),
        Symlink("../etc/conf.bak", "target-dir/sym"),
        Mkfifo("fifo"),
        CreateExcl("bin/other"),
        CreateExcl("nope/x"),
        Rmdir("moved-a"),
        Unlink("moved-a"),
        Mkdir("etc"),
        Rename("target-dir", "target-dir/sub", 0),
    ]
}

#[test]
fn scripted_operations_match_kernel_overlayfs() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let b = d.path().join("b");
    diff_stack(&a);
    diff_stack(&b);
    let la = [&*a.join("top"), &*a.join("bot")];
    let lb = [&*b.join("top"), &*b.join("bot")];
    let (ua, wa) = (a.join("u"), a.join("w"));
    let mut ours = layerfs_stack(&la, Some((&ua, &wa)), &a.join("m"), &[]);
    let theirs = kernel(
        &lb,
        Some((&b.join("u"), &b.join("w"))),
        &b.join("m"),
        "redirect_dir=on,index=on",
    );
    let mut mismatches = Vec::new();
    for op in script() {
        let x = apply(&ours.path, &op);
        let y = apply(&theirs.path, &op);
        if x != y {
            mismatches.push(format!("{op:?}: layerfs {x:?}, kernel {y:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "return codes differ:\n{}",
        mismatches.join("\n")
    );
    let view = snapshot(&ours.path);
    assert_same(&view, &snapshot(&theirs.path), "after the script");
    // Persisted: remount layerfs on the same upper, then mount that upper with the kernel.
    ours.unmount();
    let again = layerfs_stack(&la, Some((&ua, &wa)), &a.join("m"), &[]);
    assert_same(&view, &snapshot(&again.path), "layerfs remounted");
    drop(again);
    let w2 = d.path().join("w2");
    let k = kernel(&la, Some((&ua, &w2)), &d.path().join("km"), "");
    assert_same(
        &view,
        &snapshot(&k.path),
        "our upper under kernel overlayfs",
    );
}

fn rw_stack(d: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let (top, bot, u, w) = (d.join("top"), d.join("bot"), d.join("u"), d.join("w"));
    mkdirp(&top);
    mkdirp(&bot);
    mkdirp(&u);
    mkdirp(&w);
    (top, bot, u, w)
}

#[test]
fn sparse_gigabyte_copy_up_stays_sparse() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    {
        let f = fs::File::create(bot.join("big")).unwrap();
        f.set_len(1 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"data", 300 << 20).unwrap();
    }
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("big"))
        .unwrap();
    f.write_all(b"X").unwrap();
    drop(f);
    let md = fs::metadata(u.join("big")).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(
        md.blocks() * 512 < 16 << 20,
        "upper copy is sparse: {} blocks",
        md.blocks()
    );
    let mut buf = [0u8; 4];
    let mut f = fs::File::open(m.p("big")).unwrap();
    f.seek(SeekFrom::Start(300 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"data");
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut buf[..1]).unwrap();
    assert_eq!(buf[0], b'X');
}

#[test]
fn inode_numbers_survive_copy_up_and_remount() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("dir/file"), "f\n");
    wfile(top.join("dir/other"), "o\n");
    let mnt = d.path().join("m");
    let mut m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &mnt, &[]);
    let file0 = fs::metadata(m.p("dir/file")).unwrap().ino();
    let dir0 = fs::metadata(m.p("dir")).unwrap().ino();
    fs::set_permissions(m.p("dir/file"), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(u.join("dir/file").exists(), "copied up");
    assert_eq!(fs::metadata(m.p("dir/file")).unwrap().ino(), file0);
    assert_eq!(fs::metadata(m.p("dir")).unwrap().ino(), dir0);
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    assert_eq!(fs::metadata(m.p("dir/file")).unwrap().ino(), file0);
    m.unmount();
    // Plain listings (no attributes) before any lookup: d_ino of the copied-up file is its
    // origin number too.
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &mnt, &["readdirplus=off"]);
    assert_dino_matches(&m.p("dir"));
    drop(m);
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &mnt, &[]);
    assert_eq!(fs::metadata(m.p("dir/file")).unwrap().ino(), file0);
    assert_eq!(fs::metadata(m.p("dir")).unwrap().ino(), dir0);
    // A renamed (tree-copied) directory keeps its children's numbers too.
    let other0 = fs::metadata(m.p("dir/other")).unwrap().ino();
    fs::rename(m.p("dir"), m.p("dir2")).unwrap();
    assert_eq!(fs::metadata(m.p("dir2/file")).unwrap().ino(), file0);
    assert_eq!(fs::metadata(m.p("dir2/other")).unwrap().ino(), other0);
}

#[test]
fn hard_links_and_unlinked_open_files() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("lower"), "lower\n");
    wfile(bot.join("ro"), "ro\n");
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    fs::write(m.p("new"), "new\n").unwrap();
    fs::hard_link(m.p("new"), m.p("new2")).unwrap();
    let (a, b) = (
        fs::metadata(m.p("new")).unwrap(),
        fs::metadata(m.p("new2")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    fs::remove_file(m.p("new")).unwrap();
    assert_eq!(fs::metadata(m.p("new2")).unwrap().nlink(), 1);
    // Hard link of a lower file: copied up, then linked.
    fs::hard_link(m.p("lower"), m.p("lower2")).unwrap();
    assert_eq!(fs::metadata(m.p("lower")).unwrap().nlink(), 2);
    assert_eq!(fs::read_to_string(m.p("lower2")).unwrap(), "lower\n");
    // fstat of an open file after unlink reports no links, upper and lower alike.
    for name in ["new2", "lower2"] {
        let f = fs::File::open(m.p(name)).unwrap();
        fs::remove_file(m.p(name)).unwrap();
        if name == "lower2" {
            fs::remove_file(m.p("lower")).unwrap();
        }
        assert_eq!(f.metadata().unwrap().nlink(), 0, "{name}");
    }
    let f = fs::File::open(m.p("ro")).unwrap();
    fs::remove_file(m.p("ro")).unwrap();
    assert_eq!(
        f.metadata().unwrap().nlink(),
        0,
        "lower file whited out while open"
    );
    let mut s = String::new();
    (&f).read_to_string(&mut s).unwrap();
    assert_eq!(s, "ro\n");
}

#[test]
fn open_files_keep_working_across_copy_up() {
    if !can_mount() {
        return;
    }
    // With passthrough the kernel reads an open lower file itself, so a descriptor opened
    // before the copy-up keeps its old data (kernel overlayfs 6.18 moves it to the copy);
    // through the page cache (no passthrough, or a small file under `cache_small_files`, on by
    // default; scripts/test.sh turns it off for its second run), layerfs moves the
    // descriptor to the upper copy too.
    let small_files_cached = !std::env::var("LAYERFS_TEST_MOUNT_OPTS")
        .is_ok_and(|o| o.split(',').any(|opt| opt == "cache_small_files=0"));
    for (opts, old_fd_sees_new) in [
        (&[][..], small_files_cached),
        (&["cache_small_files=0"][..], false),
        (&["passthrough=off"][..], true),
    ] {
        let d = tempfile::tempdir().unwrap();
        let (top, bot, u, w) = rw_stack(d.path());
        wfile(bot.join("f"), "0123456789");
        let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), opts);
        let mut reader = fs::File::open(m.p("f")).unwrap();
        let mut buf = [0u8; 4];
        reader.read_exact(&mut buf).unwrap();
        let mut writer = fs::OpenOptions::new().write(true).open(m.p("f")).unwrap();
        writer.write_all(b"AB").unwrap();
        // Opened while the old descriptor is still open: sees the new data.
        assert_eq!(
            fs::read_to_string(m.p("f")).unwrap(),
            "AB23456789",
            "{opts:?}"
        );
        drop(writer);
        reader.seek(SeekFrom::Start(0)).unwrap();
        let mut all = String::new();
        reader.read_to_string(&mut all).unwrap();
        let want = if old_fd_sees_new {
            "AB23456789"
        } else {
            "0123456789"
        };
        assert_eq!(all, want, "{opts:?}");
        drop(reader);
        assert_eq!(
            fs::read_to_string(m.p("f")).unwrap(),
            "AB23456789",
            "{opts:?}"
        );
    }
}

/// Readers and writers of one file, opened in either order, with passthrough and through the
/// page cache: every open sees the latest data, also after writes through a shared mapping
/// and reads that skip the stat (which would refetch attributes and drop stale pages).
#[test]
fn readers_and_writers_of_one_file_see_the_latest_data() {
    if !can_mount() {
        return;
    }
    for opts in [&[][..], &["passthrough=off"][..]] {
        readers_and_writers(opts);
    }
}

fn readers_and_writers(opts: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("small"), "lower data");
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), opts);
    let f = m.p("small");
    // Read, rewritten, read again: the second read must not see the first one's pages.
    assert_eq!(fs::read_to_string(&f).unwrap(), "lower data");
    fs::write(&f, "rewritten!").unwrap();
    assert_eq!(fs::read_to_string(&f).unwrap(), "rewritten!");
    // A writer while a reader is open: both work and the reader sees the writes.
    let mut reader = fs::File::open(&f).unwrap();
    let mut writer = fs::OpenOptions::new().write(true).open(&f).unwrap();
    writer.write_all(b"0123").unwrap();
    let mut seen = String::new();
    reader.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "0123itten!");
    drop((reader, writer));
    // A reader while a writer is open.
    let mut writer = fs::OpenOptions::new().write(true).open(&f).unwrap();
    let mut reader = fs::File::open(&f).unwrap();
    writer.write_all(b"abcd").unwrap();
    let mut seen = String::new();
    reader.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "abcditten!");
    drop((reader, writer));
    // Growth through a writer, then a fresh read of the whole file.
    let mut writer = fs::OpenOptions::new().append(true).open(&f).unwrap();
    writer.write_all(&[b'x'; 100_000]).unwrap();
    drop(writer);
    let all = fs::read(&f).unwrap();
    assert_eq!(all.len(), 100_010);
    assert_eq!(&all[..10], b"abcditten!");
    fs::write(&f, "short again").unwrap();
    assert_eq!(fs::read_to_string(&f).unwrap(), "short again");
    // Written through a shared mapping, and read without a stat (a stat would refetch the
    // attributes and the new mtime would drop cached pages): the new data must show.
    let read_no_stat = format!(
        "import os\nfd=os.open('{p}',os.O_RDONLY)\nprint(os.read(fd,100).decode())\nos.close(fd)",
        p = f.display()
    );
    let read = || run(Command::new("python3").arg("-c").arg(&read_no_stat));
    assert_eq!(read().trim(), "short again");
    let code = format!(
        "import mmap,os\nfd=os.open('{p}',os.O_RDWR)\nmm=mmap.mmap(fd,11,mmap.MAP_SHARED)\nmm[0:5]=b'SHORT'\nmm.flush()\nmm.close()\nos.close(fd)",
        p = f.display()
    );
    run(Command::new("python3").arg("-c").arg(code));
    assert_eq!(read().trim(), "SHORT again");
}

/// A lower file read and closed stays registered for passthrough; a copy-up that opens
/// nothing (a truncate by path) must still send later reads to the upper copy.
#[test]
fn reads_after_a_copy_up_by_path_see_the_upper_copy() {
    if !can_mount() {
        return;
    }
    for opts in [&[][..], &["passthrough=off"][..]] {
        let d = tempfile::tempdir().unwrap();
        let (top, bot, u, w) = rw_stack(d.path());
        wfile(bot.join("f"), "lower data");
        let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), opts);
        let f = m.p("f");
        for _ in 0..2 {
            assert_eq!(fs::read_to_string(&f).unwrap(), "lower data", "{opts:?}");
        }
        let truncate = format!("import os\nos.truncate('{}', 3)", f.display());
        run(Command::new("python3").arg("-c").arg(truncate));
        assert_eq!(fs::read_to_string(&f).unwrap(), "low", "{opts:?}");
        assert_eq!(fs::read_to_string(u.join("f")).unwrap(), "low");
        assert_eq!(fs::read_to_string(bot.join("f")).unwrap(), "lower data");
    }
}

#[test]
fn mmap_shared_writes_are_visible_to_read() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("f"), vec![b'.'; 8192]);
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    let code = format!(
        "import mmap,os\nfd=os.open('{p}',os.O_RDWR)\nmm=mmap.mmap(fd,8192,mmap.MAP_SHARED)\nmm[100:105]=b'hello'\nmm.flush()\nprint(os.pread(os.open('{p}',os.O_RDONLY),5,100).decode())",
        p = m.p("f").display()
    );
    let out = run(Command::new("python3").arg("-c").arg(code));
    assert_eq!(out.trim(), "hello");
    let data = fs::read(m.p("f")).unwrap();
    assert_eq!(&data[100..105], b"hello");
}

#[test]
fn posix_errors_and_open_flags() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("dir/f"), "f\n");
    wfile(bot.join("file"), "0123456789");
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    let e = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(e(fs::remove_dir(m.p("dir"))), Some(libc::ENOTEMPTY));
    assert_eq!(e(fs::remove_file(m.p("dir"))), Some(libc::EISDIR));
    assert_eq!(e(fs::remove_dir(m.p("file"))), Some(libc::ENOTDIR));
    assert_eq!(e(fs::create_dir(m.p("file/x"))), Some(libc::ENOTDIR));
    assert_eq!(e(fs::create_dir(m.p("dir"))), Some(libc::EEXIST));
    assert_eq!(
        e(fs::write(m.p(&"x".repeat(256)), "")),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        e(fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.p("file"))
            .map(drop)),
        Some(libc::EEXIST)
    );
    assert_eq!(e(fs::rename(m.p("dir"), m.p("file"))), Some(libc::ENOTDIR));
    // O_TRUNC of a lower file copies it up empty; O_APPEND appends.
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("file"))
        .unwrap();
    assert_eq!(fs::metadata(m.p("file")).unwrap().len(), 0);
    for _ in 0..3 {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.p("file"))
            .unwrap();
        f.write_all(b"ab").unwrap();
    }
    assert_eq!(fs::read_to_string(m.p("file")).unwrap(), "ababab");
    // SEEK_DATA/SEEK_HOLE and fallocate reach the upper file.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("file"))
        .unwrap();
    f.set_len(8 << 20).unwrap();
    assert_eq!(sys::lseek(f.as_fd(), 0, sys::SEEK_HOLE).unwrap(), 4096);
    sys::fallocate(f.as_fd(), 0, 0, 16 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 16 << 20);
    // Whiteout-looking device nodes cannot be made by users.
    let (dir, _) = parent_and_name(&m.p("x"));
    assert_eq!(
        sys::mknod_at(dir.as_fd(), b"wh", sys::S_IFCHR, 0)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    // utimens with UTIME_NOW / UTIME_OMIT.
    let before = fs::metadata(m.p("dir/f")).unwrap().mtime();
    let (dir, _) = parent_and_name(&m.p("dir/f"));
    sys::utimens_at(
        dir.as_fd(),
        b"f",
        sys::SetTime::At(sys::Timespec { sec: 5, nsec: 0 }),
        sys::SetTime::Omit,
    )
    .unwrap();
    let md = fs::metadata(m.p("dir/f")).unwrap();
    assert_eq!(md.atime(), 5);
    assert_eq!(md.mtime(), before);
    sys::utimens_at(dir.as_fd(), b"f", sys::SetTime::Omit, sys::SetTime::Now).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((fs::metadata(m.p("dir/f")).unwrap().mtime() - now).abs() < 60);
}

#[test]
fn permissions_sticky_and_setgid_dirs() {
    if !can_mount() {
        return;
    }
    if Command::new("setpriv").arg("--help").output().is_err() {
        eprintln!("skipping: no setpriv");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    chmod(d.path(), 0o755);
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("rootfile"), "r\n");
    mkdirp(bot.join("tmp"));
    chmod(bot.join("tmp"), 0o1777);
    wfile(bot.join("tmp/owned-by-2000"), "x\n");
    std::os::unix::fs::chown(bot.join("tmp/owned-by-2000"), Some(2000), Some(2000)).unwrap();
    mkdirp(bot.join("shared"));
    std::os::unix::fs::chown(bot.join("shared"), Some(0), Some(3000)).unwrap();
    chmod(bot.join("shared"), 0o2777);
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    let as_user = |script: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .status()
            .unwrap()
            .success()
    };
    let p = |s: &str| m.p(s).display().to_string();
    assert!(
        !as_user(&format!("echo x >> {}", p("rootfile"))),
        "0644 root file is not writable"
    );
    assert!(
        !as_user(&format!("rm -f {}", p("tmp/owned-by-2000"))),
        "sticky dir protects others' files"
    );
    assert!(as_user(&format!("echo mine > {}", p("tmp/mine"))));
    assert_eq!(fs::metadata(m.p("tmp/mine")).unwrap().uid(), 1000);
    assert!(as_user(&format!("rm {}", p("tmp/mine"))));
    assert!(as_user(&format!(
        "echo s > {} && mkdir {}",
        p("shared/f"),
        p("shared/d")
    )));
    let f = fs::metadata(m.p("shared/f")).unwrap();
    assert_eq!(
        (f.uid(), f.gid()),
        (1000, 3000),
        "setgid dir gives its group"
    );
    let dm = fs::metadata(m.p("shared/d")).unwrap();
    assert_eq!(dm.gid(), 3000);
    assert!(dm.mode() & 0o2000 != 0, "new dirs inherit setgid");
}

#[test]
fn killed_during_copy_up_leaves_old_content_and_clean_work_dir() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    {
        let mut f = fs::File::create(bot.join("big")).unwrap();
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..768 {
            f.write_all(&block).unwrap();
        }
    }
    let lower_len = fs::metadata(bot.join("big")).unwrap().len();
    let mnt = d.path().join("m");
    let mut m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &mnt, &[]);
    let pid = m.daemon.expect("daemon pid");
    let target = m.p("big");
    let writer = std::thread::spawn(move || {
        // Triggers a copy-up of 768 MiB; fails once the daemon dies.
        let _ = fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .and_then(|mut f| f.write_all(b"NEW"));
    });
    std::thread::sleep(Duration::from_millis(150));
    run(Command::new("kill").args(["-KILL", &pid.to_string()]));
    assert!(wait_gone(pid, Duration::from_secs(10)));
    let _ = Command::new("umount").arg("-l").arg(&m.path).status();
    writer.join().unwrap();
    m.daemon = None;
    drop(m);
    // Either no upper copy or a complete one; never a partial file.
    if let Ok(md) = fs::metadata(u.join("big")) {
        assert_eq!(md.len(), lower_len, "a visible upper copy must be complete");
    }
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &mnt, &[]);
    assert_eq!(fs::metadata(m.p("big")).unwrap().len(), lower_len);
    let mut head = [0u8; 3];
    fs::File::open(m.p("big"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(
        head == [0, 1, 2] || &head == b"NEW",
        "old or new content: {head:?}"
    );
    let leftovers: Vec<_> = fs::read_dir(w.join("work")).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "work dir cleaned on mount: {leftovers:?}"
    );
}

#[test]
fn copy_up_keeps_metadata_capabilities_and_xattrs() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("bin/ping"), "elf\n");
    std::os::unix::fs::chown(bot.join("bin/ping"), Some(12), Some(34)).unwrap();
    chmod(bot.join("bin/ping"), 0o4755);
    // VFS_CAP_REVISION_2 with CAP_NET_RAW (13) permitted and effective.
    let mut cap = vec![0x01, 0, 0, 0x02];
    cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
    cap.extend_from_slice(&[0; 12]);
    setxattr(bot.join("bin/ping"), "security.capability", &cap);
    setxattr(bot.join("bin/ping"), "user.note", b"kept");
    let (dir, name) = parent_and_name(&bot.join("bin/ping"));
    let t = sys::SetTime::At(sys::Timespec {
        sec: 1_234_567_890,
        nsec: 5,
    });
    sys::utimens_at(dir.as_fd(), &name, t, t).unwrap();
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    // A metadata-only change copies the file up.
    setxattr(m.p("bin/ping"), "user.added", b"1");
    let up = u.join("bin/ping");
    let md = fs::metadata(&up).unwrap();
    assert_eq!((md.uid(), md.gid()), (12, 34));
    assert_eq!(
        md.mode() & 0o7777,
        0o4755,
        "setuid survives the chown of copy-up"
    );
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_234_567_890, 5));
    assert_eq!(getxattr(&up, "security.capability"), Some(cap));
    assert_eq!(getxattr(&up, "user.note").as_deref(), Some(&b"kept"[..]));
    assert_eq!(
        getxattr(m.p("bin/ping"), "user.added").as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(fs::read_to_string(m.p("bin/ping")).unwrap(), "elf\n");
    // The copied-up parent directory has its lower metadata too.
    let (lo, hi) = (
        fs::metadata(bot.join("bin")).unwrap(),
        fs::metadata(u.join("bin")).unwrap(),
    );
    assert_eq!(lo.mode(), hi.mode());
}

#[test]
fn unlinked_objects_stay_reachable_through_open_descriptors() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("grow"), "0123456789");
    wfile(bot.join("trunc"), "0123456789");
    let m = layerfs_stack(
        &[&top, &bot],
        Some((&u, &w)),
        &d.path().join("m"),
        &["passthrough=off"],
    );
    // A fifo in use after its name is gone (fuzzer seed 10114).
    let (dir, _) = parent_and_name(&m.p("fifo"));
    sys::mknod_at(dir.as_fd(), b"fifo", sys::S_IFIFO | 0o600, 0).unwrap();
    let fifo = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("fifo"))
        .unwrap();
    fs::remove_file(m.p("fifo")).unwrap();
    assert_eq!(fifo.metadata().unwrap().nlink(), 0);
    // Stale read-only handles of a lower file, then copy-up, unlink and growth through the
    // writer: fstat and reads follow the upper copy (fuzzer seed 1149).
    let stale: Vec<_> = (0..3)
        .map(|_| fs::File::open(m.p("grow")).unwrap())
        .collect();
    let mut writer = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("grow"))
        .unwrap();
    fs::remove_file(m.p("grow")).unwrap();
    writer.seek(SeekFrom::Start(40)).unwrap();
    writer.write_all(b"tail").unwrap();
    assert_eq!(writer.metadata().unwrap().len(), 44);
    for mut f in stale {
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 44, "a stale handle reads the upper copy");
    }
    // A reader opened before an O_TRUNC copy-up and the unlink sees the truncated copy
    // (fuzzer seed 1150; kernel overlayfs moves the descriptor too).
    let mut reader = fs::File::open(m.p("trunc")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("trunc"))
        .unwrap();
    fs::remove_file(m.p("trunc")).unwrap();
    let mut all = Vec::new();
    reader.read_to_end(&mut all).unwrap();
    assert!(all.is_empty(), "read {} stale bytes", all.len());
}

#[test]
fn crash_safe_clearing_of_a_merged_directory_renamed_over() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("target/a"), "a");
    wfile(bot.join("target/b"), "b");
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    fs::remove_file(m.p("target/a")).unwrap();
    fs::remove_file(m.p("target/b")).unwrap();
    fs::create_dir(m.p("src")).unwrap();
    fs::write(m.p("src/new"), "n").unwrap();
    fs::rename(m.p("src"), m.p("target")).unwrap();
    let names: Vec<_> = fs::read_dir(m.p("target"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["new"]);
    // The replaced directory went away as a whole: nothing of it is left in the work dir.
    assert_eq!(fs::read_dir(w.join("work")).unwrap().count(), 0);
    assert_eq!(
        getxattr(u.join("target"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
}

#[test]
fn xattrs_appear_after_misses_were_answered_from_memory() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot, u, w) = rw_stack(d.path());
    wfile(bot.join("plain"), "p");
    let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), &[]);
    for _ in 0..2 {
        assert_eq!(getxattr(m.p("plain"), "user.k"), None);
        assert_eq!(getxattr(m.p("plain"), "security.selinux"), None);
    }
    setxattr(m.p("plain"), "user.k", b"v");
    assert_eq!(getxattr(m.p("plain"), "user.k").as_deref(), Some(&b"v"[..]));
    assert_eq!(getxattr(m.p("plain"), "user.other"), None);
}

/// New files are known to have no file capabilities (the kernel asks before every first
/// write): a capability set later shows, and a write drops it again, as on any filesystem.
#[test]
fn capabilities_of_new_files_show_once_set_and_go_with_a_write() {
    if !can_mount() {
        return;
    }
    for opts in [&[][..], &["passthrough=off"][..]] {
        let d = tempfile::tempdir().unwrap();
        let (top, bot, u, w) = rw_stack(d.path());
        let m = layerfs_stack(&[&top, &bot], Some((&u, &w)), &d.path().join("m"), opts);
        let f = m.p("tool");
        fs::write(&f, "elf\n").unwrap();
        assert_eq!(getxattr(&f, "security.capability"), None, "{opts:?}");
        // VFS_CAP_REVISION_2 with CAP_NET_RAW (13) permitted and effective.
        let mut cap = vec![0x01, 0, 0, 0x02];
        cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
        cap.extend_from_slice(&[0; 12]);
        setxattr(&f, "security.capability", &cap);
        assert_eq!(
            getxattr(&f, "security.capability"),
            Some(cap.clone()),
            "{opts:?}"
        );
        assert_eq!(getxattr(u.join("tool"), "security.capability"), Some(cap));
        let mut append = fs::OpenOptions::new().append(true).open(&f).unwrap();
        append.write_all(b"more\n").unwrap();
        drop(append);
        assert_eq!(getxattr(&f, "security.capability"), None, "{opts:?}");
        assert_eq!(getxattr(u.join("tool"), "security.capability"), None);
        assert_eq!(fs::read_to_string(&f).unwrap(), "elf\nmore\n");
    }
}

/// Reads `f` from its start to the end.
fn reread(f: &mut fs::File) -> String {
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    s
}

/// With `cache_small_files`, read-only opens of small lower files go through the FUSE page
/// cache. The kernel fails (EIO) an open that would mix page-cache and passthrough opens of one
/// inode, so while a page-cache reader is open, every other open of the file (a writer, a
/// reader after a copy-up) must be one too. Writes reach the upper copy, and open readers see
/// them.
#[test]
fn small_lower_files_read_through_the_page_cache_take_writers() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    for name in ["a", "b", "c"] {
        wfile(low.join(name), format!("lower {name}\n"));
    }
    wfile(low.join("big"), vec![b'b'; 256 << 10]);
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(
        &[&low],
        Some((&u, &w)),
        &d.path().join("m"),
        &["cache_small_files=64k"],
    );
    // A writer while a page-cache reader is open.
    let mut reader = fs::File::open(m.p("a")).unwrap();
    assert_eq!(reread(&mut reader), "lower a\n");
    let mut writer = fs::OpenOptions::new()
        .append(true)
        .open(m.p("a"))
        .expect("a writer beside a page-cache reader");
    writer.write_all(b"appended\n").unwrap();
    assert_eq!(reread(&mut reader), "lower a\nappended\n");
    drop(writer);
    drop(reader);
    assert_eq!(
        fs::read_to_string(u.join("a")).unwrap(),
        "lower a\nappended\n"
    );
    // Now an upper file: readers and writers together, through passthrough.
    let mut reader = fs::File::open(m.p("a")).unwrap();
    let mut writer = fs::OpenOptions::new().append(true).open(m.p("a")).unwrap();
    writer.write_all(b"again\n").unwrap();
    assert_eq!(reread(&mut reader), "lower a\nappended\nagain\n");
    drop((reader, writer));
    // A reader opened after a copy-up by path (chmod), while a page-cache reader is open.
    let mut first = fs::File::open(m.p("b")).unwrap();
    assert_eq!(reread(&mut first), "lower b\n");
    fs::set_permissions(m.p("b"), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(u.join("b").exists(), "chmod copied b up");
    let mut second = fs::File::open(m.p("b")).expect("a reader of the copy beside the first");
    assert_eq!(reread(&mut second), "lower b\n");
    drop((first, second));
    // A writer first (a copy-up, passthrough), then a reader.
    let mut writer = fs::OpenOptions::new().append(true).open(m.p("c")).unwrap();
    let mut reader = fs::File::open(m.p("c")).unwrap();
    writer.write_all(b"more\n").unwrap();
    assert_eq!(reread(&mut reader), "lower c\nmore\n");
    drop((reader, writer));
    // A file over the limit stays on passthrough, and a writer beside a reader works there
    // (the reader goes on reading the lower file, as with kernel overlayfs).
    let reader = fs::File::open(m.p("big")).unwrap();
    let mut writer = fs::OpenOptions::new().write(true).open(m.p("big")).unwrap();
    writer.write_all(b"B").unwrap();
    drop((reader, writer));
    let mut head = [0u8; 2];
    fs::File::open(m.p("big"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"Bb");
}

/// Under `cache_small_files`, a small lower file's content is handed to the kernel's page
/// cache at its first open. Files at page boundaries and at the limit read back whole, an
/// empty one reads empty, one just over the limit goes through passthrough; threads opening
/// and reading the same files at once all see the content.
#[test]
fn small_lower_files_stored_in_the_page_cache_read_back_whole() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    let sizes = [0usize, 1, 4095, 4096, 4097, 65535, 65536, 65537];
    let content = |size: usize| -> Vec<u8> { (0..size).map(|i| (i % 251) as u8).collect() };
    for size in sizes {
        wfile(low.join(format!("f{size}")), content(size));
    }
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(
        &[&low],
        Some((&u, &w)),
        &d.path().join("m"),
        &["cache_small_files=64K"],
    );
    let mnt = m.path.clone();
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                for round in 0..20 {
                    for size in sizes {
                        let got = fs::read(mnt.join(format!("f{size}"))).unwrap();
                        assert_eq!(got, content(size), "thread {t} round {round} size {size}");
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    for size in sizes {
        assert_eq!(fs::read(m.p(&format!("f{size}"))).unwrap(), content(size));
    }
}

/// O_DIRECT opens served by the daemon (no passthrough): block-aligned reads and writes work
/// (`dd` aligns its buffers). Reads failed with EINVAL while the daemon opened its own
/// descriptor with O_DIRECT and read into unaligned buffers.
#[test]
fn o_direct_io_through_the_daemon() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let low = d.path().join("low");
    wfile(low.join("lower"), vec![b'l'; 1 << 20]);
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(
        &[&low],
        Some((&u, &w)),
        &d.path().join("m"),
        &["passthrough=off"],
    );
    let copy = d.path().join("copy");
    run(Command::new("dd")
        .arg(format!("if={}", m.p("lower").display()))
        .arg(format!("of={}", copy.display()))
        .args(["bs=64k", "iflag=direct", "status=none"]));
    assert_eq!(fs::read(&copy).unwrap(), vec![b'l'; 1 << 20]);
    run(Command::new("dd")
        .arg(format!("if={}", copy.display()))
        .arg(format!("of={}", m.p("new").display()))
        .args(["bs=64k", "oflag=direct", "status=none"]));
    run(Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", m.p("lower").display()))
        .args([
            "bs=4k",
            "count=1",
            "seek=1",
            "conv=notrunc",
            "oflag=direct",
            "status=none",
        ]));
    let mut want = vec![b'l'; 1 << 20];
    want[4096..8192].fill(0);
    assert_eq!(fs::read(m.p("lower")).unwrap(), want);
    assert_eq!(fs::read(u.join("new")).unwrap(), vec![b'l'; 1 << 20]);
}

/// Files stay registered for passthrough after their last close, but a file removed through
/// the mount gives its space back at once: the kernel forgets an unlinked inode right away.
#[test]
fn removing_a_file_that_was_read_frees_its_space() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let upper_fs = d.path().join("upperfs");
    let upper_mount = tmpfs(&upper_fs);
    let (u, w, lower) = (upper_fs.join("u"), upper_fs.join("w"), d.path().join("l"));
    for p in [&u, &w, &lower] {
        mkdirp(p);
    }
    let free = || free_bytes(&upper_fs);
    {
        let m = layerfs_stack(&[&lower], Some((&u, &w)), &d.path().join("m"), &[]);
        let big = vec![b'u'; 8 << 20];
        fs::write(m.p("big"), &big).unwrap();
        for _ in 0..2 {
            assert_eq!(fs::read(m.p("big")).unwrap(), big);
        }
        let before = free();
        fs::remove_file(m.p("big")).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        let mut freed = free().saturating_sub(before);
        while freed < 8 << 20 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
            freed = free().saturating_sub(before);
        }
        assert!(freed >= 8 << 20, "removed, but only {freed} bytes freed");
    }
    drop(upper_mount);
}
