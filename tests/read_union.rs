//! The read path under real FUSE: the merged view of lowers in every whiteout dialect,
//! compared with kernel overlayfs over the same layers.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use common::*;
use layerfs::sys;

/// Three lowers with every kernel-format feature: whiteouts, opaque dirs, xattr whiteouts,
/// symlinks, hard links, fifos, odd names, owners, modes, xattrs.
fn kernel_format_stack(root: &Path) {
    let (top, mid, bot) = (root.join("top"), root.join("mid"), root.join("bot"));
    // bottom
    wfile(bot.join("etc/passwd"), "root:x:0:0\n");
    wfile(bot.join("etc/hosts"), "127.0.0.1 localhost\n");
    wfile(bot.join("etc/gone"), "deleted above\n");
    wfile(bot.join("opq/old1"), "hidden by opaque\n");
    wfile(bot.join("opq/sub/old2"), "hidden by opaque\n");
    wfile(bot.join("xw/keep"), "kept\n");
    wfile(bot.join("xw/drop"), "xattr-whited\n");
    wfile(bot.join("dir2file"), "");
    fs::remove_file(bot.join("dir2file")).ok();
    mkdirp(bot.join("dir2file"));
    wfile(bot.join("dir2file/inner"), "hidden under a file\n");
    wfile(bot.join("usr/bin/tool"), "#!/bin/sh\necho tool\n");
    chmod(bot.join("usr/bin/tool"), 0o755);
    wfile(bot.join("links/a"), "hard linked\n");
    fs::hard_link(bot.join("links/a"), bot.join("links/b")).unwrap();
    mkfifo(bot.join("fifo"));
    wfile(
        bot.join(OsStr::from_bytes(b"names/caf\xe9-latin1")),
        "non-utf8 name\n",
    );
    wfile(bot.join("names/with space"), "space\n");
    wfile(bot.join("own/file"), "owned\n");
    std::os::unix::fs::lchown(bot.join("own/file"), Some(1234), Some(5678)).unwrap();
    chmod(bot.join("own/file"), 0o4750);
    setxattr(bot.join("own/file"), "user.color", b"blue");
    // middle
    wfile(mid.join("etc/hosts"), "10.0.0.1 mid\n");
    whiteout(mid.join("etc/gone"));
    mkdirp(mid.join("opq"));
    opaque(mid.join("opq"));
    wfile(mid.join("opq/new"), "in opaque\n");
    mkdirp(mid.join("xw"));
    setxattr(mid.join("xw"), "trusted.overlay.opaque", b"x");
    wfile(mid.join("xw/drop"), "");
    setxattr(mid.join("xw/drop"), "trusted.overlay.whiteout", b"");
    wfile(mid.join("dir2file"), "now a file\n");
    symlink("../etc/hosts", mid.join("usr/hosts-link").as_path());
    // top
    wfile(top.join("etc/motd"), "hello\n");
    mkdirp(top.join("usr/bin"));
    symlink("/absolute/elsewhere", top.join("usr/bin/abs"));
    wfile(top.join("etc/passwd"), "root:x:0:0:top\n");
}

#[test]
fn merged_view_matches_kernel_overlayfs() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    kernel_format_stack(d.path());
    let lowers = [
        &*d.path().join("top"),
        &*d.path().join("mid"),
        &*d.path().join("bot"),
    ];
    let ours = layerfs_stack(&lowers, None, &d.path().join("m1"), &[]);
    let theirs = kernel(&lowers, None, &d.path().join("m2"), "");
    let a = snapshot(&ours.path);
    let b = snapshot(&theirs.path);
    assert_same(&a, &b, "layerfs vs kernel overlayfs");
    // Spot checks that the stack really exercises what it should.
    assert!(!a.entries.contains_key(b"etc/gone".as_slice()));
    assert!(!a.entries.contains_key(b"opq/old1".as_slice()));
    assert!(a.entries.contains_key(b"opq/new".as_slice()));
    assert!(!a.entries.contains_key(b"xw/drop".as_slice()));
    assert!(a.entries.contains_key(b"xw/keep".as_slice()));
    assert_eq!(a.entries[&b"dir2file".to_vec()].kind, 'f');
    assert_eq!(a.entries[&b"fifo".to_vec()].kind, 'p');
    assert!(a.entries.contains_key(b"names/caf\xe9-latin1".as_slice()));
    assert_eq!(a.links.len(), 1, "one hard-link group: {:?}", a.links);
    assert_eq!(
        fs::read_to_string(ours.p("etc/hosts")).unwrap(),
        "10.0.0.1 mid\n"
    );
    assert_eq!(
        fs::read_to_string(ours.p("usr/hosts-link")).unwrap(),
        "10.0.0.1 mid\n"
    );
}

#[test]
fn userxattr_dialect_matches_kernel() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot) = (d.path().join("top"), d.path().join("bot"));
    wfile(bot.join("a/x"), "x\n");
    wfile(bot.join("a/y"), "y\n");
    wfile(bot.join("o/hidden"), "h\n");
    mkdirp(top.join("a"));
    setxattr(top.join("a"), "user.overlay.opaque", b"x");
    wfile(top.join("a/y"), "");
    setxattr(top.join("a/y"), "user.overlay.whiteout", b"");
    mkdirp(top.join("o"));
    setxattr(top.join("o"), "user.overlay.opaque", b"y");
    wfile(top.join("o/shown"), "s\n");
    let lowers = [&*top, &*bot];
    let ours = layerfs_stack(&lowers, None, &d.path().join("m1"), &[]);
    let theirs = kernel(&lowers, None, &d.path().join("m2"), "userxattr");
    let a = snapshot(&ours.path);
    assert_same(&a, &snapshot(&theirs.path), "userxattr dialect");
    assert!(a.entries.contains_key(b"a/x".as_slice()));
    assert!(!a.entries.contains_key(b"a/y".as_slice()));
    assert!(!a.entries.contains_key(b"o/hidden".as_slice()));
}

#[test]
fn aufs_and_fuse_overlayfs_dialects() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot) = (d.path().join("top"), d.path().join("bot"));
    wfile(bot.join("gone"), "g\n");
    wfile(bot.join("kept"), "k\n");
    wfile(bot.join("opq/old"), "o\n");
    wfile(bot.join("fo/old"), "o\n");
    wfile(bot.join("again"), "old\n");
    wfile(top.join(".wh.gone"), "");
    wfile(top.join("opq/.wh..wh..opq"), "");
    wfile(top.join("opq/new"), "n\n");
    mkdirp(top.join("fo"));
    setxattr(top.join("fo"), "user.fuseoverlayfs.opaque", b"y");
    wfile(top.join("fo/new"), "n\n");
    // Deleted and recreated in the same layer: the layer's own file wins.
    wfile(top.join(".wh.again"), "");
    wfile(top.join("again"), "new\n");
    let m = layerfs_stack(&[&top, &bot], None, &d.path().join("m"), &[]);
    let t = snapshot(&m.path);
    let names: Vec<String> = t
        .entries
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(names, ["again", "fo", "fo/new", "kept", "opq", "opq/new"]);
    assert_eq!(fs::read_to_string(m.p("again")).unwrap(), "new\n");
    assert_eq!(
        fs::metadata(m.p(".wh.gone")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
}

#[test]
fn private_xattrs_never_visible() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot) = (d.path().join("top"), d.path().join("bot"));
    wfile(bot.join("o/f"), "f\n");
    mkdirp(top.join("o"));
    opaque(top.join("o"));
    setxattr(top.join("o"), "user.overlay.opaque", b"y");
    setxattr(top.join("o"), "user.visible", b"1");
    let m = layerfs_stack(&[&top, &bot], None, &d.path().join("m"), &[]);
    let names = listxattr(m.p("o"));
    assert!(names.contains(&b"user.visible".to_vec()), "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| !n.windows(8).any(|w| w == b"overlay.")),
        "{names:?}"
    );
    assert_eq!(getxattr(m.p("o"), "trusted.overlay.opaque"), None);
    assert_eq!(getxattr(m.p("o"), "user.overlay.opaque"), None);
}

#[test]
fn inode_numbers_devices_and_links() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    kernel_format_stack(d.path());
    let lowers = [
        &*d.path().join("top"),
        &*d.path().join("mid"),
        &*d.path().join("bot"),
    ];
    let m = layerfs_stack(&lowers, None, &d.path().join("m"), &[]);
    let a = fs::symlink_metadata(m.p("links/a")).unwrap();
    let b = fs::symlink_metadata(m.p("links/b")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    let root_dev = fs::metadata(&m.path).unwrap().dev();
    let mut seen = std::collections::HashMap::new();
    for e in walk(&m.path) {
        let md = fs::symlink_metadata(&e).unwrap();
        assert_eq!(md.dev(), root_dev, "{e:?}");
        if let Some(other) = seen.insert(md.ino(), e.clone()) {
            assert!(
                other.ends_with("links/a") || other.ends_with("links/b"),
                "inode {} shared by {other:?} and {e:?}",
                md.ino()
            );
        }
    }
    // Plain listings report the same numbers as stat (without stat-ing).
    let plain = layerfs_stack(
        &lowers,
        None,
        &d.path().join("m-plain"),
        &["readdirplus=off"],
    );
    for dir in ["", "etc", "links", "usr/bin", "names"] {
        assert_dino_matches(&plain.p(dir));
    }
    // Stable for the life of the mount, also after the kernel forgets the inodes.
    let before = fs::metadata(m.p("etc/hosts")).unwrap().ino();
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    assert_eq!(fs::metadata(m.p("etc/hosts")).unwrap().ino(), before);
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn long_names_and_missing_names() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    wfile(d.path().join("l/f"), "f");
    let m = layerfs_stack(&[&d.path().join("l")], None, &d.path().join("m"), &[]);
    // `layerfs mount` defaults: no setuid, no devices unless asked.
    let opts = mount_options(&m.path);
    assert!(opts.contains("nosuid") && opts.contains("nodev"), "{opts}");
    let long = "x".repeat(256);
    assert_eq!(
        fs::metadata(m.p(&long)).unwrap_err().raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(
        fs::metadata(m.p("nope")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        fs::metadata(m.p("f/x")).unwrap_err().raw_os_error(),
        Some(libc::ENOTDIR)
    );
}

#[test]
fn lowers_only_stack_refuses_writes() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    wfile(d.path().join("l/f"), "f");
    mkdirp(d.path().join("l/dir"));
    let m = layerfs_stack(&[&d.path().join("l")], None, &d.path().join("m"), &[]);
    // The kernel knows the mount is read-only (it then keeps atimes and answers stat after a
    // read from its cache), as with kernel overlayfs without an upperdir.
    let vfs = nix::sys::statvfs::statvfs(&m.p("")).unwrap();
    assert!(vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    let erofs = Some(libc::EROFS);
    assert_eq!(
        fs::write(m.p("new"), "x").unwrap_err().raw_os_error(),
        erofs
    );
    assert_eq!(fs::create_dir(m.p("nd")).unwrap_err().raw_os_error(), erofs);
    assert_eq!(fs::remove_file(m.p("f")).unwrap_err().raw_os_error(), erofs);
    assert_eq!(
        fs::remove_dir(m.p("dir")).unwrap_err().raw_os_error(),
        erofs
    );
    assert_eq!(
        fs::rename(m.p("f"), m.p("g")).unwrap_err().raw_os_error(),
        erofs
    );
    assert_eq!(
        fs::OpenOptions::new()
            .write(true)
            .open(m.p("f"))
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(
        fs::set_permissions(
            m.p("f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600)
        )
        .unwrap_err()
        .raw_os_error(),
        erofs
    );
    assert_eq!(fs::read_to_string(m.p("f")).unwrap(), "f");
}

#[test]
fn sparse_gigabyte_file_reads() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let l = d.path().join("l");
    mkdirp(&l);
    {
        let f = fs::File::create(l.join("big")).unwrap();
        f.set_len(1 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 512 << 20).unwrap();
        f.write_all_at(b"end!", (1 << 30) - 4).unwrap();
    }
    let m = layerfs_stack(&[&l], None, &d.path().join("m"), &[]);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(0)
        .open(m.p("big"))
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 30);
    let mut buf = [0u8; 6];
    f.seek(SeekFrom::Start(512 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"middle");
    f.seek(SeekFrom::Start((1 << 30) - 4)).unwrap();
    let mut end = Vec::new();
    f.read_to_end(&mut end).unwrap();
    assert_eq!(end, b"end!");
    f.seek(SeekFrom::Start(1000)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0; 6]);
}

#[test]
fn hundred_thousand_entries_list_once_in_small_chunks() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot) = (d.path().join("top/big"), d.path().join("bot/big"));
    mkdirp(&top);
    mkdirp(&bot);
    for i in 0..100_000u32 {
        let dir = if i % 2 == 0 { &top } else { &bot };
        fs::File::create(dir.join(format!("e{i:06}"))).unwrap();
    }
    // Same name in both layers counts once; a whiteout removes one.
    fs::File::create(bot.join("e000000")).unwrap();
    whiteout(top.join("e000001"));
    let m = layerfs_stack(
        &[&d.path().join("top"), &d.path().join("bot")],
        None,
        &d.path().join("m"),
        &[],
    );
    let dirfd = sys::open_dir_path(&m.p("big")).unwrap();
    let fd = sys::open_dir_beneath(dirfd.as_fd(), b"").unwrap();
    let mut reader = sys::DirReader::with_buffer(fd, 1024).unwrap();
    let mut names = Vec::new();
    let mut offsets = Vec::new();
    while let Some(e) = reader.next_entry().unwrap() {
        offsets.push(e.off);
        names.push(e.name);
    }
    let expected = 100_000 - 1;
    assert_eq!(names.len(), expected);
    let unique: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), expected, "every entry exactly once");
    assert!(!unique.contains(&b"e000001".to_vec()));
    // seekdir to an entry's offset continues right after it.
    let k = 54_321;
    reader.seek(offsets[k]).unwrap();
    let next = reader.next_entry().unwrap().unwrap();
    assert_eq!(next.name, names[k + 1]);
}

/// Count the FUSE requests of one kind in a daemon debug log.
fn requests(log: &Path, op: &str) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("fuser::request") && l.contains(&format!(" {op} ")))
        .count()
}

#[test]
fn passthrough_reads_never_reach_the_daemon() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    wfile(d.path().join("l/f"), &data);
    for (pt, expect_reads) in [("on", false), ("off", true)] {
        let log = d.path().join(format!("log-{pt}"));
        let mnt = d.path().join(format!("m-{pt}"));
        mkdirp(&mnt);
        let mut cmd = std::process::Command::new(bin());
        cmd.env("RUST_LOG", "debug")
            .arg("mount")
            .arg("--lower")
            .arg(d.path().join("l"))
            .arg(&mnt)
            .arg("-o")
            .arg(format!("passthrough={pt},log={}", log.display()));
        run(&mut cmd);
        let mnt = fs::canonicalize(&mnt).unwrap();
        let m = Mount {
            daemon: daemon_pid(&mnt),
            path: mnt,
        };
        assert_eq!(fs::read(m.p("f")).unwrap(), data);
        drop(m);
        assert_eq!(requests(&log, "OPEN"), 1, "passthrough={pt}");
        assert_eq!(requests(&log, "READ") > 0, expect_reads, "passthrough={pt}");
    }
}

/// Readdirplus replies that run out of lookup time list the rest of their batch by name only
/// (`readdirplus_budget_ms=0`: every entry). Such entries must carry the same inode numbers and
/// types as a stat of them, upper, copied-up and lower entries alike, and the names and
/// attributes seen through the mount must not change.
#[test]
fn readdirplus_names_only_entries_match_stat() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bottom) = (d.path().join("top"), d.path().join("bottom"));
    for i in 0..600 {
        let layer = if i % 3 == 0 { &top } else { &bottom };
        wfile(layer.join(format!("wide/f{i:04}")), format!("{i}"));
    }
    mkdirp(bottom.join("wide/sub"));
    symlink("f0001", bottom.join("wide/link"));
    whiteout(top.join("wide/f0002"));
    let (upper, work) = (d.path().join("upper"), d.path().join("work"));
    let lowers = [&*top, &*bottom];
    let expected = {
        let mut m = layerfs_stack(&lowers, Some((&upper, &work)), &d.path().join("m"), &[]);
        fs::OpenOptions::new()
            .append(true)
            .open(m.p("wide/f0004"))
            .unwrap();
        wfile(m.p("wide/new"), "new");
        fs::remove_file(m.p("wide/f0005")).unwrap();
        let snap = snapshot(&m.p("wide"));
        m.unmount();
        snap
    };
    let m = layerfs_stack(
        &lowers,
        Some((&upper, &work)),
        &d.path().join("m-names"),
        &["readdirplus=always", "readdirplus_budget_ms=0"],
    );
    let wide = m.p("wide");
    let fd = sys::open_dir_path(&wide).unwrap();
    let mut reader = sys::DirReader::with_buffer(fd, 32768).unwrap();
    let mut names = 0;
    while let Some(e) = reader.next_entry().unwrap() {
        if &*e.name == b"." || &*e.name == b".." {
            continue;
        }
        // d_ino is checked against stat by assert_dino_matches below.
        let st = fs::symlink_metadata(wide.join(OsStr::from_bytes(&e.name))).unwrap();
        let want = match st.mode() & libc::S_IFMT {
            libc::S_IFDIR => libc::DT_DIR,
            libc::S_IFLNK => libc::DT_LNK,
            _ => libc::DT_REG,
        };
        assert_eq!(e.dtype, want, "d_type of {}", e.name.escape_ascii());
        names += 1;
    }
    // 600 files, less one whiteout and one unlink, plus sub, link and new.
    assert_eq!(names, 601);
    assert_same(&expected, &snapshot(&wide), "names-only listing");
    assert_dino_matches(&wide);
}

/// A lower file read through the mount stays registered for passthrough after it is closed,
/// but only until the kernel forgets its inode: then the registration goes, and with it the
/// last hold on the file (here: its space, once something outside deleted it).
#[test]
fn a_read_lower_file_is_let_go_when_the_kernel_forgets_it() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let fs_dir = d.path().join("lowerfs");
    let lower_fs = tmpfs(&fs_dir);
    let lower = fs_dir.join("l");
    let big = vec![b'z'; 8 << 20];
    wfile(lower.join("big"), &big);
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    mkdirp(&u);
    mkdirp(&w);
    let free = || free_bytes(&fs_dir);
    {
        let m = layerfs_stack(&[&lower], Some((&u, &w)), &d.path().join("m"), &[]);
        for _ in 0..2 {
            assert_eq!(fs::read(m.p("big")).unwrap(), big);
        }
        let before = free();
        // Deleted behind the mount's back: only open files now hold the data.
        fs::remove_file(lower.join("big")).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut freed = free().saturating_sub(before);
        while freed < 8 << 20 && std::time::Instant::now() < until {
            let _ = fs::write("/proc/sys/vm/drop_caches", "2");
            std::thread::sleep(std::time::Duration::from_millis(50));
            freed = free().saturating_sub(before);
        }
        assert!(
            freed >= 8 << 20,
            "the daemon still holds the deleted lower file: {freed} bytes freed"
        );
    }
    drop(lower_fs);
}

/// Reads the daemon serves itself (no passthrough, as for every rootless mount): large ones are
/// spliced from the file into /dev/fuse replies, or written straight into ring buffers over
/// io_uring; any size, offset and end of file must give the lower file's bytes.
#[test]
fn daemon_served_reads_give_the_files_bytes() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let len = (3 << 20) + 4321;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    wfile(d.path().join("l/f"), &data);
    for transport in ["io_uring=off", "io_uring=on"] {
        let m = layerfs_stack(
            &[&d.path().join("l")],
            None,
            &d.path().join(format!("m-{transport}")),
            &["passthrough=off", transport],
        );
        assert!(
            fs::read(m.p("f")).unwrap() == data,
            "{transport}: whole file"
        );
        let f = fs::File::open(m.p("f")).unwrap();
        for i in 0..200u64 {
            use std::os::unix::fs::FileExt;
            let size = [4096, 65536, 131072, 200_000, 1 << 20][i as usize % 5];
            let offset = (i * 7919 * 4099) % (len as u64 + 50_000);
            let mut buf = vec![0u8; size];
            let mut got = 0;
            while got < size {
                match f.read_at(&mut buf[got..], offset + got as u64).unwrap() {
                    0 => break,
                    n => got += n,
                }
            }
            let start = (offset as usize).min(len);
            let want = &data[start..(start + size).min(len)];
            assert!(&buf[..got] == want, "{transport}: {size} bytes at {offset}");
        }
    }
}
