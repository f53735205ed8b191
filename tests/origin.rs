//! Copy-up origins in kernel overlayfs' format, with kernel overlayfs as the oracle: the
//! kernel mounts what layerfs copied up with the same inode numbers and sees no layerfs
//! xattr; layerfs mounts what the kernel copied up with the kernel's inode numbers and writes
//! the same origin bytes; uppers written by older layerfs keep their numbers. A new upper gets
//! the persistent overlay uuid the kernel gives it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

/// A lower with one of each kind of object, and empty upper and work dirs (one filesystem,
/// as in most container set-ups: the kernel then shows the lower objects' own numbers).
fn stack(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (l, u, w) = (d.join("l"), d.join("u"), d.join("w"));
    wfile(l.join("file"), "f\n");
    wfile(l.join("dir/inner"), "i\n");
    wfile(l.join("dir/sub/deep"), "d\n");
    wfile(l.join("linked"), "h\n");
    fs::hard_link(l.join("linked"), l.join("linked2")).unwrap();
    symlink("file", l.join("sym"));
    mkfifo(l.join("fifo"));
    wfile(l.join("renamed"), "r\n");
    mkdirp(&u);
    mkdirp(&w);
    (l, u, w)
}

/// Names copied up by [`copy_up`], checked for inode numbers.
const COPIED: &[&str] = &[
    "file",
    "dir",
    "dir/inner",
    "dir/sub",
    "dir/sub/deep",
    "sym",
    "fifo",
    "linked",
];

/// Copy every object of [`stack`] up through the mount at `m` without changing what it shows
/// (permission bits are set to what they are).
fn copy_up(m: &Path) {
    for name in ["file", "dir/inner", "dir/sub/deep", "fifo", "linked"] {
        let p = m.join(name);
        let mode = fs::symlink_metadata(&p).unwrap().mode() & 0o7777;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    let md = fs::symlink_metadata(m.join("sym")).unwrap();
    std::os::unix::fs::lchown(m.join("sym"), Some(md.uid()), Some(md.gid())).unwrap();
}

fn inos(m: &Path, names: &[&str]) -> BTreeMap<String, u64> {
    names
        .iter()
        .map(|n| {
            let md = fs::symlink_metadata(m.join(n)).unwrap_or_else(|e| panic!("lstat {n}: {e}"));
            (n.to_string(), md.ino())
        })
        .collect()
}

/// Every xattr name on every object of a tree (the root included), as `path: name`.
fn all_xattrs(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for n in listxattr(&p) {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.push(format!("{rel}: {}", String::from_utf8_lossy(&n)));
        }
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn origin_of(p: &Path) -> Option<Vec<u8>> {
    getxattr(p, "trusted.overlay.origin")
}

#[test]
fn the_kernel_mounts_a_layerfs_upper_with_the_same_inode_numbers() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u, w) = stack(d.path());
    let mnt = d.path().join("m");
    let mut m = layerfs_stack(&[&l], Some((&u, &w)), &mnt, &[]);
    let before = inos(&m.path, COPIED);
    copy_up(&m.path);
    let live = inos(&m.path, COPIED);
    m.unmount();
    // The kernel gives hard-linked lower files their own upper number at copy-up (it breaks
    // the link and records no origin), and so does layerfs once it looks them up again.
    for n in COPIED.iter().filter(|n| **n != "linked") {
        assert_eq!(live[*n], before[*n], "{n} keeps its number through copy-up");
    }
    for n in COPIED {
        assert!(
            fs::symlink_metadata(u.join(n)).is_ok(),
            "{n} is in the upper"
        );
    }
    let layerfs_xattrs: Vec<String> = all_xattrs(&u)
        .into_iter()
        .filter(|x| x.contains("layerfs"))
        .collect();
    assert!(layerfs_xattrs.is_empty(), "{layerfs_xattrs:?}");
    for n in ["file", "dir", "dir/inner", "dir/sub", "sym", "fifo"] {
        assert!(origin_of(&u.join(n)).is_some(), "{n} has an origin");
    }
    assert_eq!(
        origin_of(&u.join("linked")),
        None,
        "as the kernel: no origin"
    );

    let layerfs_again = {
        let m = layerfs_stack(&[&l], Some((&u, &w)), &mnt, &[]);
        inos(&m.path, COPIED)
    };
    let k = kernel(&[&l], Some((&u, &w)), &mnt, "");
    let kernel_inos = inos(&k.path, COPIED);
    let shown = all_xattrs(&k.path);
    drop(k);
    assert_eq!(
        kernel_inos, layerfs_again,
        "kernel vs layerfs after remount"
    );
    for n in COPIED.iter().filter(|n| **n != "linked") {
        assert_eq!(kernel_inos[*n], live[*n], "{n}: kernel vs live layerfs");
    }
    assert!(
        !shown.iter().any(|x| x.contains("layerfs")),
        "the kernel mount shows {shown:?}"
    );
}

#[test]
fn layerfs_writes_the_origin_bytes_the_kernel_writes() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u, w) = stack(d.path());
    let (ku, kw) = (d.path().join("ku"), d.path().join("kw"));
    mkdirp(&ku);
    mkdirp(&kw);
    let mnt = d.path().join("m");
    {
        let k = kernel(&[&l], Some((&ku, &kw)), &mnt, "");
        copy_up(&k.path);
    }
    {
        let m = layerfs_stack(&[&l], Some((&u, &w)), &mnt, &[]);
        copy_up(&m.path);
    }
    for n in COPIED {
        assert_eq!(
            origin_of(&u.join(n)),
            origin_of(&ku.join(n)),
            "origin of {n}: layerfs vs kernel"
        );
    }
    let file = origin_of(&ku.join("file")).expect("the kernel records an origin");
    assert_eq!(&file[..2], &[0x00, 0xfb], "version 0, magic 0xfb");
    assert_eq!(file[2] as usize, file.len(), "length");
}

#[test]
fn layerfs_mounts_a_kernel_upper_with_the_kernel_inode_numbers() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u, w) = stack(d.path());
    let mnt = d.path().join("m");
    let kernel_inos = {
        let k = kernel(&[&l], Some((&u, &w)), &mnt, "");
        copy_up(&k.path);
        fs::rename(k.p("renamed"), k.p("dir/moved")).unwrap();
        let mut names = COPIED.to_vec();
        names.push("dir/moved");
        inos(&k.path, &names)
    };
    // A lower file renamed by the kernel is found by its handle, not by its path.
    assert_eq!(
        kernel_inos["dir/moved"],
        fs::metadata(l.join("renamed")).unwrap().ino()
    );
    // Garbage where an origin belongs gives the object its own number, never an error (the
    // kernel refuses to look it up, so it is planted after the kernel is gone).
    wfile(u.join("garbage"), "g\n");
    setxattr(
        u.join("garbage"),
        "trusted.overlay.origin",
        b"\x00\xfb\xff\x00",
    );
    wfile(u.join("short"), "s\n");
    setxattr(u.join("short"), "trusted.overlay.origin", b"\x00\xfb\x16");
    let m = layerfs_stack(&[&l], Some((&u, &w)), &mnt, &["readdirplus=off"]);
    // Plain listings first: d_ino comes from the origin too.
    assert_dino_matches(&m.path);
    assert_dino_matches(&m.p("dir"));
    let mut names = COPIED.to_vec();
    names.push("dir/moved");
    assert_eq!(inos(&m.path, &names), kernel_inos);
    for n in ["garbage", "short"] {
        let md = fs::symlink_metadata(m.p(n)).unwrap();
        assert_eq!(md.ino(), fs::metadata(u.join(n)).unwrap().ino(), "{n}");
        assert_eq!(fs::read(m.p(n)).unwrap()[0], n.as_bytes()[0]);
    }
}

#[test]
fn uppers_of_older_layerfs_keep_their_numbers_and_get_no_more_layerfs_xattrs() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u, w) = stack(d.path());
    // What layerfs before the kernel format left: copies with their number, 8 LE bytes.
    let old_file = 0x1234_5678u64;
    let old_dir = fs::metadata(l.join("dir")).unwrap().ino();
    wfile(u.join("file"), "f\n");
    setxattr(
        u.join("file"),
        "trusted.layerfs.origin",
        &old_file.to_le_bytes(),
    );
    mkdirp(u.join("dir"));
    setxattr(
        u.join("dir"),
        "trusted.layerfs.origin",
        &old_dir.to_le_bytes(),
    );
    // Numbers the union never gives are not origins.
    wfile(u.join("zero"), "z\n");
    setxattr(u.join("zero"), "trusted.layerfs.origin", &[0u8; 8]);
    let mnt = d.path().join("m");
    for round in 0..2 {
        let m = layerfs_stack(&[&l], Some((&u, &w)), &mnt, &[]);
        assert_eq!(
            fs::metadata(m.p("file")).unwrap().ino(),
            old_file,
            "{round}"
        );
        assert_eq!(fs::metadata(m.p("dir")).unwrap().ino(), old_dir, "{round}");
        let zero = fs::metadata(m.p("zero")).unwrap().ino();
        assert_eq!(zero, fs::metadata(u.join("zero")).unwrap().ino());
        if round == 0 {
            let inner = fs::metadata(m.p("dir/inner")).unwrap().ino();
            fs::set_permissions(m.p("dir/inner"), fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(fs::metadata(m.p("dir/inner")).unwrap().ino(), inner);
        }
    }
    assert!(origin_of(&u.join("dir/inner")).is_some());
    assert_eq!(
        getxattr(u.join("dir/inner"), "trusted.layerfs.origin"),
        None
    );
    let k = kernel(&[&l], Some((&u, &w)), &mnt, "");
    assert_eq!(
        fs::metadata(k.p("dir/inner")).unwrap().ino(),
        fs::metadata(l.join("dir/inner")).unwrap().ino()
    );
    drop(k);
}

fn uuid_of(upper: &Path) -> Option<Vec<u8>> {
    getxattr(upper, "trusted.overlay.uuid")
}

#[test]
fn a_new_upper_gets_a_persistent_uuid_as_the_kernel_gives_one_and_an_older_upper_none() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, _, _) = stack(d.path());
    let mnt = d.path().join("m");
    let mount = |who: &str, u: &Path, w: &Path| match who {
        "kernel" => kernel(&[&l], Some((u, w)), &mnt, ""),
        _ => layerfs_stack(&[&l], Some((u, w)), &mnt, &[]),
    };
    for who in ["kernel", "layerfs"] {
        let (u, w) = (
            d.path().join(format!("{who}-u")),
            d.path().join(format!("{who}-w")),
        );
        drop(mount(who, &u, &w));
        let uuid = uuid_of(&u).unwrap_or_else(|| panic!("{who}: a new upper gets a uuid"));
        assert_eq!(uuid.len(), 16, "{who}");
        assert_eq!(uuid[6] >> 4, 4, "{who}: a random (version 4) uuid");
        assert_eq!(uuid[8] >> 6, 0b10, "{who}: the RFC 4122 variant");
        {
            let m = mount(who, &u, &w);
            copy_up(&m.path);
        }
        assert_eq!(uuid_of(&u), Some(uuid.clone()), "{who}: kept by a remount");
        let other = if who == "kernel" { "layerfs" } else { "kernel" };
        drop(mount(other, &u, &w));
        assert_eq!(uuid_of(&u), Some(uuid), "{who}'s uuid kept by {other}");

        // An upper that had things copied up before uuids existed (its root is impure)
        // keeps having none.
        let (u, w) = (
            d.path().join(format!("{who}-old-u")),
            d.path().join(format!("{who}-old-w")),
        );
        mkdirp(&u);
        setxattr(&u, "trusted.overlay.impure", b"y");
        drop(mount(who, &u, &w));
        assert_eq!(uuid_of(&u), None, "{who}: an older upper gets none");
    }
}
