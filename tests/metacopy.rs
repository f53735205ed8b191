//! Metadata-only copy-up (`-o metacopy=on`), with kernel overlayfs (`metacopy=on`) as the
//! oracle: the same operations on both give the same results, the same tree, the same upper
//! markers (metacopy files, their data redirects, whiteouts, redirects, opaque and impure
//! marks), the same `st_ino` and `st_blocks`; each mounts the other's upper to the same tree;
//! the data is copied at the first open for write into the same upper file; `diff` writes a
//! metacopy file whole; hostile markers and redirects answer EIO and never lead outside the
//! layers; the mount options conflict where the kernel's do.

mod common;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Every lower time, so times a copy-up keeps differ from the times of changes.
const OLD: &str = "@1000000";
/// `--source-date-epoch` of the diffs: changes made seconds apart get the same clamped times.
const EPOCH: &str = "1500000000";
/// `security.capability` granting cap_net_raw (version 2), as `setcap cap_net_raw+ep` writes.
const CAPS: &[u8] =
    b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

/// Two lowers (top first): small and large files, a sparse one, a lower hard-link pair,
/// xattrs and capabilities, a fifo and a symlink, directories to move.
fn lowers(d: &Path) -> (PathBuf, PathBuf) {
    let (l1, l2) = (d.join("l1"), d.join("l2"));
    wfile(l1.join("f"), "f\n");
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    wfile(l1.join("big"), &big);
    wfile(l1.join("sparse"), "head");
    fs::OpenOptions::new()
        .write(true)
        .open(l1.join("sparse"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    wfile(l1.join("d/x"), "x\n");
    wfile(l1.join("d/y"), "y\n");
    wfile(l1.join("d/sub/z"), "z\n");
    wfile(l1.join("h1"), "linked\n");
    fs::hard_link(l1.join("h1"), l1.join("h2")).unwrap();
    wfile(l1.join("xa"), "xa\n");
    setxattr(l1.join("xa"), "user.k", b"old");
    wfile(l1.join("exe"), "exe\n");
    chmod(l1.join("exe"), 0o4755);
    setxattr(l1.join("exe"), "security.capability", CAPS);
    wfile(l1.join("w"), "write me\n");
    wfile(l1.join("o/p"), "p\n");
    mkfifo(l1.join("fifo"));
    symlink("f", l1.join("sym"));
    wfile(l1.join("m/top"), "top\n");
    wfile(l2.join("m/bottom"), "bottom\n");
    wfile(l2.join("only2/w2"), "w2\n");
    for l in [&l1, &l2] {
        run(Command::new("find")
            .arg(l)
            .args(["-exec", "touch", "-h", "-d", OLD, "{}", "+"]));
    }
    (l1, l2)
}

/// Metadata changes (which copy metadata only), renames and links of metacopy and lower files,
/// a directory rename, then the first writes; one line per operation, run by `sh` in the
/// mount.
const OPS: &[&str] = &[
    "chown 1000:1000 f",
    "chmod 600 big",
    "touch -h -d @2000000 sparse",
    "setfattr -n user.new -v v xa",
    "setfattr -x user.k xa",
    "chown 1000 h1",
    "chmod 640 d/sub/z",
    "chmod 4711 exe",
    "chmod 600 fifo",
    "chown -h 1000 sym",
    "mv d/x d/x2",
    "mv d/y o/y2",
    "chmod 640 o/p && mv o/p p3",
    "mv d dd",
    "chmod 600 dd/sub/z",
    "ln f o/f.ln",
    "ln m/bottom m/b.ln",
    "mv only2/w2 w3",
    "cat f o/f.ln dd/x2 o/y2 p3 dd/sub/z m/b.ln w3",
    "head -c 4 sparse; head -c 16 big | od -An -tx1",
    "echo more >> w",
    "echo again >> o/f.ln",
    "cat f w",
    "truncate -s 2 xa",
    "cat xa",
];

/// Paths whose `st_ino` must be the same on both mounts (copied-up objects keep the number
/// of the lower file they came from).
const SAME_INO: &[&str] = &[
    "f", "big", "sparse", "xa", "dd/x2", "o/y2", "p3", "dd/sub/z", "exe", "o/f.ln", "m/bottom",
    "m/b.ln", "w3", "w", "dd", "fifo",
];

/// Metacopy files after [`OPS`], whose `st_blocks` through a mount are their data's.
const METACOPY: &[&str] = &[
    "big", "sparse", "h1", "dd/sub/z", "exe", "dd/x2", "o/y2", "p3", "m/bottom", "w3",
];

/// (`st_ino`, `st_blocks`) of paths through a mount.
fn inos(m: &Path, paths: &[&str]) -> Vec<(String, u64, u64)> {
    paths
        .iter()
        .map(|p| {
            let md = fs::symlink_metadata(m.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
            (p.to_string(), md.ino(), md.blocks())
        })
        .collect()
}

#[test]
fn metadata_changes_write_what_the_kernel_writes_and_show_the_same_tree() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l1, l2) = lowers(d.path());
    let (ku, kw, lu, lw) = (
        d.path().join("ku"),
        d.path().join("kw"),
        d.path().join("lu"),
        d.path().join("lw"),
    );
    let mnt = d.path().join("m");
    let (k_results, k_tree, k_inos) = {
        let k = kernel(&[&l1, &l2], Some((&ku, &kw)), &mnt, "metacopy=on");
        let r = run_shell_ops(&k.path, OPS);
        (r, snapshot(&k.path), inos(&k.path, SAME_INO))
    };
    let (l_results, l_tree, l_inos, l_blocks) = {
        let m = layerfs_stack(&[&l1, &l2], Some((&lu, &lw)), &mnt, &["metacopy=on"]);
        let r = run_shell_ops(&m.path, OPS);
        let blocks = inos(&m.path, METACOPY);
        (r, snapshot(&m.path), inos(&m.path, SAME_INO), blocks)
    };
    assert_eq!(l_results, k_results, "results: layerfs vs kernel");
    assert_same(&l_tree, &k_tree, "layerfs vs kernel, metacopy=on");
    assert_eq!(l_inos, k_inos, "st_ino and st_blocks: layerfs vs kernel");
    assert_eq!(
        upper_markers(&lu),
        upper_markers(&ku),
        "upper markers: layerfs vs kernel"
    );
    // What the markers above hold, spelled out.
    let mc = |p: &str| getxattr(lu.join(p), "trusted.overlay.metacopy");
    for p in METACOPY {
        assert_eq!(mc(p).as_deref(), Some(&b""[..]), "{p} is a metacopy file");
    }
    for p in ["f", "w", "xa", "fifo", "sym"] {
        assert_eq!(mc(p), None, "{p} holds its data (or is no regular file)");
    }
    for (p, want) in [
        ("dd/x2", &b"x"[..]),
        ("o/y2", b"/d/y"),
        ("p3", b"/o/p"),
        ("f", b"/f"),
        ("m/bottom", b"/m/bottom"),
        ("w3", b"/only2/w2"),
        ("dd", b"d"),
    ] {
        assert_eq!(
            getxattr(lu.join(p), "trusted.overlay.redirect").as_deref(),
            Some(want),
            "{p}: redirect"
        );
    }
    // Through the mount a metacopy file has its data's blocks; in the upper it has none.
    for (p, lower) in [
        ("big", "big"),
        ("sparse", "sparse"),
        ("exe", "exe"),
        ("p3", "o/p"),
    ] {
        let blocks = l_blocks.iter().find(|(q, ..)| q == p).unwrap().2;
        assert_eq!(
            blocks,
            fs::metadata(l1.join(lower)).unwrap().blocks(),
            "{p}: st_blocks of the data"
        );
    }
    let sparse = fs::metadata(lu.join("big")).unwrap();
    assert_eq!(sparse.len(), 1 << 20);
    assert!(sparse.blocks() * 512 < 64 << 10, "no data copied for big");
    assert_eq!(
        fs::metadata(lu.join("o/f.ln")).unwrap().ino(),
        fs::metadata(lu.join("f")).unwrap().ino(),
        "a link of a copied-up file is a link in the upper"
    );

    // Each mounts the other's upper to the same tree, with the same numbers; layerfs without
    // metacopy=on reads metacopy files too (the kernel refuses them then: EPERM).
    let k_on_l = {
        let k = kernel(&[&l1, &l2], Some((&lu, &lw)), &mnt, "metacopy=on");
        (snapshot(&k.path), inos(&k.path, SAME_INO))
    };
    assert_same(&k_on_l.0, &k_tree, "kernel over layerfs' upper");
    assert_eq!(k_on_l.1, k_inos, "kernel over layerfs' upper: numbers");
    for opts in [&["metacopy=on"][..], &[][..]] {
        let m = layerfs_stack(&[&l1, &l2], Some((&ku, &kw)), &mnt, opts);
        assert_same(
            &snapshot(&m.path),
            &k_tree,
            &format!("layerfs {opts:?} over the kernel's upper"),
        );
        assert_eq!(
            inos(&m.path, SAME_INO),
            k_inos,
            "layerfs {opts:?} over the kernel's upper: numbers"
        );
        let m2 = layerfs_stack(
            &[&l1, &l2],
            Some((&lu, &lw)),
            &mnt.with_extension("2"),
            opts,
        );
        assert_same(
            &snapshot(&m2.path),
            &k_tree,
            &format!("layerfs {opts:?} remounted"),
        );
        // A lower file with other links: the copy shows its own number, as in the kernel.
        for (m, u) in [(&m, &ku), (&m2, &lu)] {
            assert_eq!(
                fs::symlink_metadata(m.p("h1")).unwrap().ino(),
                fs::symlink_metadata(u.join("h1")).unwrap().ino(),
                "h1 (lower nlink 2) over {u:?}"
            );
        }
    }
}

#[test]
fn data_is_copied_at_the_first_open_for_write_into_the_same_file() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let l = d.path().join("l");
    wfile(l.join("f"), "0123456789");
    chmod(l.join("f"), 0o4755);
    setxattr(l.join("f"), "security.capability", CAPS);
    setxattr(l.join("f"), "user.k", b"v");
    wfile(l.join("t"), "truncate me");
    wfile(l.join("r"), "read me");
    for (who, opts) in [("layerfs", &["metacopy=on"][..]), ("kernel", &[][..])] {
        let (u, w) = (
            d.path().join(format!("u-{who}")),
            d.path().join(format!("w-{who}")),
        );
        let mnt = d.path().join(format!("m-{who}"));
        let m = if who == "kernel" {
            kernel(&[&l], Some((&u, &w)), &mnt, "metacopy=on")
        } else {
            layerfs_stack(&[&l], Some((&u, &w)), &mnt, opts)
        };
        run(Command::new("sh")
            .args([
                "-c",
                "touch -h -d @3000000 f && ln f g && chmod 600 t && chown 1000 r",
            ])
            .current_dir(&m.path));
        let before = fs::metadata(u.join("f")).unwrap();
        assert!(
            getxattr(u.join("f"), "trusted.overlay.metacopy").is_some(),
            "{who}"
        );
        assert_eq!(before.nlink(), 2, "{who}");
        // A read-only descriptor of a metacopy file reads the data and shows the upper's
        // metadata.
        let mut ro = fs::File::open(m.p("r")).unwrap();
        let mut s = String::new();
        ro.read_to_string(&mut s).unwrap();
        assert_eq!(s, "read me", "{who}");
        assert_eq!(
            ro.metadata().unwrap().uid(),
            1000,
            "{who}: fstat of a reader"
        );
        assert_eq!(
            ro.metadata().unwrap().blocks(),
            fs::metadata(l.join("r")).unwrap().blocks(),
            "{who}: blocks of the data"
        );
        // The first open for write copies the data, into the same upper file.
        drop(fs::OpenOptions::new().write(true).open(m.p("g")).unwrap());
        let after = fs::metadata(u.join("f")).unwrap();
        assert_eq!(after.ino(), before.ino(), "{who}: the same upper file");
        assert_eq!(after.nlink(), 2, "{who}: still linked");
        assert_eq!(after.mode() & 0o7777, 0o4755, "{who}: mode kept");
        assert_eq!(after.len(), 10, "{who}");
        assert!(
            getxattr(u.join("f"), "trusted.overlay.metacopy").is_none(),
            "{who}: no metacopy marker once the data is there"
        );
        assert!(
            getxattr(u.join("f"), "trusted.overlay.origin").is_some(),
            "{who}"
        );
        assert_eq!(
            getxattr(u.join("f"), "security.capability").as_deref(),
            Some(CAPS),
            "{who}: capabilities kept"
        );
        assert_eq!(
            getxattr(u.join("f"), "user.k").as_deref(),
            Some(&b"v"[..]),
            "{who}"
        );
        assert_eq!(fs::read(u.join("f")).unwrap(), b"0123456789", "{who}: data");
        if who == "layerfs" {
            // The kernel sets the mtime to the time of the data copy; layerfs keeps it, as
            // every copy-up keeps times.
            assert_eq!(after.mtime(), 3_000_000, "layerfs keeps the mtime");
        }
        fs::OpenOptions::new()
            .write(true)
            .open(m.p("f"))
            .unwrap()
            .write_all(b"AB")
            .unwrap();
        assert_eq!(fs::read(m.p("g")).unwrap(), b"AB23456789", "{who}");
        // A truncation to 0 copies nothing and ends the metacopy file.
        fs::OpenOptions::new()
            .write(true)
            .open(m.p("t"))
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(
            getxattr(u.join("t"), "trusted.overlay.metacopy").is_none(),
            "{who}"
        );
        assert_eq!(fs::metadata(u.join("t")).unwrap().len(), 0, "{who}");
        assert_eq!(
            fs::metadata(m.p("t")).unwrap().mode() & 0o777,
            0o600,
            "{who}"
        );
        // The reader opened before keeps reading the same content.
        let mut s = String::new();
        ro.read_to_string(&mut s).unwrap();
        assert_eq!(s, "", "{who}: at its end");
    }
    // The two uppers hold the same markers and data.
    for p in ["f", "g", "t", "r"] {
        for x in ["trusted.overlay.metacopy", "trusted.overlay.redirect"] {
            assert_eq!(
                getxattr(d.path().join("u-layerfs").join(p), x),
                getxattr(d.path().join("u-kernel").join(p), x),
                "{p} {x}"
            );
        }
        assert_eq!(
            fs::read(d.path().join("u-layerfs").join(p)).unwrap(),
            fs::read(d.path().join("u-kernel").join(p)).unwrap(),
            "{p}"
        );
    }
}

fn diff(upper: &Path, lowers: &[&Path], out: &Path) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.arg("diff")
        .arg(upper)
        .arg("-o")
        .arg(out)
        .args(["--source-date-epoch", EPOCH]);
    for l in lowers {
        cmd.arg("--lower").arg(l);
    }
    cmd.output().expect("layerfs diff")
}

fn diff_ok(upper: &Path, lowers: &[&Path], out: &Path) -> Vec<u8> {
    let o = diff(upper, lowers, out);
    assert!(
        o.status.success(),
        "diff {}: {}",
        upper.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    fs::read(out).unwrap()
}

/// Entry names, modes, times and kinds of a tar, for readable failures.
fn names(tar: &[u8]) -> Vec<String> {
    let mut r = layerfs::oci::tarfmt::TarReader::new(tar);
    let mut out = Vec::new();
    while let Some(e) = r.next_entry().unwrap() {
        out.push(format!(
            "{} {:o} {} {} {:?}",
            String::from_utf8_lossy(&e.path),
            e.mode,
            e.mtime.sec,
            e.size,
            e.kind
        ));
    }
    out
}

/// Metadata changes, renames and links, and writes after them: no open for write without a
/// write (the kernel would give that file the time of its data copy).
const DIFF_OPS: &str = "set -e
chown 1000:1000 f
chmod 600 big
setfattr -n user.new -v v xa
chown 1000 h1
mv d/x d/x2
mv d/y o/y2
chmod 640 o/p
mv o/p p3
ln f o/f.ln
mv only2/w2 w3
echo more >> w3
chmod 700 d/sub/z
mv d dd
";

#[test]
fn diff_writes_metacopy_files_whole() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l1, l2) = lowers(d.path());
    let mut uppers = Vec::new();
    for (mode, opts) in [("copy", &[][..]), ("meta", &["metacopy=on"][..])] {
        let (u, w) = (
            d.path().join(format!("u-{mode}")),
            d.path().join(format!("w-{mode}")),
        );
        let mut m = layerfs_stack(&[&l1, &l2], Some((&u, &w)), &d.path().join("m"), opts);
        run(Command::new("sh")
            .args(["-c", DIFF_OPS])
            .current_dir(&m.path));
        m.unmount();
        uppers.push(u);
    }
    let (ku, kw) = (d.path().join("u-kernel"), d.path().join("w-kernel"));
    {
        let k = kernel(
            &[&l1, &l2],
            Some((&ku, &kw)),
            &d.path().join("m"),
            "metacopy=on",
        );
        run(Command::new("sh")
            .args(["-c", DIFF_OPS])
            .current_dir(&k.path));
    }
    let (cu, mu) = (&uppers[0], &uppers[1]);
    assert!(getxattr(mu.join("big"), "trusted.overlay.metacopy").is_some());

    // Without the lowers: refused in one line naming a metacopy file and the way out.
    for u in [mu, &ku] {
        let o = diff(u, &[], &d.path().join("no.tar"));
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("metacopy") && err.contains("--lower") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    let ctar = diff_ok(cu, &[], &d.path().join("c.tar"));
    let mtar = diff_ok(mu, &[&l1, &l2], &d.path().join("m.tar"));
    let ktar = diff_ok(&ku, &[&l1, &l2], &d.path().join("k.tar"));
    assert_eq!(names(&mtar), names(&ctar), "entries: metacopy vs default");
    assert!(mtar == ctar, "metacopy and default tars differ in bytes");
    assert_eq!(names(&ktar), names(&ctar), "entries: kernel vs default");
    assert!(ktar == ctar, "kernel and default tars differ in bytes");
    let n = names(&mtar);
    for want in [
        "big 600 1000000 1048576 Some(File)",
        "o/f.ln 644 1000000 0 Some(HardLink)",
        "p3 640 1000000 2 Some(File)",
        "w3 644 1500000000 8 Some(File)",
        "only2/.wh.w2 644 0 0 Some(File)",
        "dd/sub/z 700 1000000 2 Some(File)",
    ] {
        assert!(n.iter().any(|e| e.starts_with(want)), "{want} in {n:#?}");
    }
    // The data is the lower file's.
    let layer = d.path().join("layer");
    mkdirp(&layer);
    run(Command::new("tar")
        .arg("-xf")
        .arg(d.path().join("m.tar"))
        .arg("-C")
        .arg(&layer));
    assert_eq!(
        fs::read(layer.join("big")).unwrap(),
        fs::read(l1.join("big")).unwrap()
    );
    assert_eq!(fs::read_to_string(layer.join("dd/sub/z")).unwrap(), "z\n");
    assert_eq!(fs::read_to_string(layer.join("p3")).unwrap(), "p\n");
}

#[test]
fn hostile_metacopy_files_answer_eio_and_stay_inside_the_layers() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let l = d.path().join("l");
    let outside = d.path().join("outside");
    wfile(outside.join("secret"), "s\n");
    wfile(l.join("real"), "r\n");
    wfile(l.join("dir/file"), "f\n");
    symlink(&outside, l.join("link"));
    symlink("real", l.join("sym"));
    // A whiteout in the xattr format over data in the layer below, and a zero-size file with a
    // whiteout xattr in a directory not marked to hold such whiteouts: kernel 6.18's lookup
    // takes both for whiteouts.
    let l2 = d.path().join("l2");
    wfile(l.join("xwh/gone"), "");
    setxattr(l.join("xwh/gone"), "trusted.overlay.whiteout", b"");
    setxattr(l.join("xwh"), "trusted.overlay.opaque", b"x");
    wfile(l2.join("xwh/gone"), "hidden\n");
    wfile(l.join("plain/empty"), "");
    setxattr(l.join("plain/empty"), "trusted.overlay.whiteout", b"");
    wfile(l.join("same_path"), "h\n");
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let meta = |name: &str, redirect: Option<&[u8]>| {
        wfile(u.join(name), "");
        fs::OpenOptions::new()
            .write(true)
            .open(u.join(name))
            .unwrap()
            .set_len(2)
            .unwrap();
        setxattr(u.join(name), "trusted.overlay.metacopy", b"");
        if let Some(r) = redirect {
            setxattr(u.join(name), "trusted.overlay.redirect", r);
        }
    };
    // (name, redirect, what it reads: `None` for EIO)
    type Case<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);
    let cases: &[Case] = &[
        ("dotdot", Some(b"/../outside/secret"), None),
        ("rel_dotdot", Some(b".."), None),
        ("slash", Some(b"a/b"), None),
        ("empty", Some(b""), None),
        ("through_link", Some(b"/link/secret"), None),
        ("to_symlink", Some(b"/sym"), None),
        ("to_dir", Some(b"/dir"), None),
        ("nul", Some(b"/re\0al"), None),
        ("missing", None, None),
        ("good", Some(b"/real"), Some("r\n")),
        ("good_rel", Some(b"real"), Some("r\n")),
        ("deep", Some(b"/dir/file"), Some("f\n")),
        ("to_xwhiteout", Some(b"/xwh/gone"), None),
        ("to_plain_empty", Some(b"/plain/empty"), None),
    ];
    for (name, redirect, _) in cases {
        meta(name, *redirect);
    }
    meta("same_path", None);
    // A metacopy marker the kernel never writes, one on a directory (means nothing), and a
    // user.overlay one in a privileged mount (not read: the upper's own, empty data shows).
    meta("badvalue", Some(b"/real"));
    setxattr(u.join("badvalue"), "trusted.overlay.metacopy", b"yes");
    mkdirp(u.join("adir"));
    setxattr(u.join("adir"), "trusted.overlay.metacopy", b"");
    wfile(u.join("usermeta"), "");
    setxattr(u.join("usermeta"), "user.overlay.metacopy", b"");
    setxattr(u.join("usermeta"), "user.overlay.redirect", b"/real");
    let mnt = d.path().join("m");
    let m = layerfs_stack(&[&l, &l2], Some((&u, &w)), &mnt, &["metacopy=on"]);
    for (name, _, want) in cases {
        match (fs::read_to_string(m.p(name)), want) {
            (Ok(got), Some(want)) => assert_eq!(&got, want, "{name}"),
            (Err(e), None) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}"),
            (r, want) => panic!("{name}: expected {want:?}, got {r:?}"),
        }
    }
    assert_eq!(
        fs::read_to_string(m.p("same_path")).unwrap(),
        "h\n",
        "data at the same path"
    );
    let e = fs::read(m.p("badvalue")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "bad marker value");
    assert!(fs::metadata(m.p("adir")).unwrap().is_dir());
    assert_eq!(fs::read(m.p("usermeta")).unwrap(), b"");
    // Writing to a metacopy file without its data fails; nothing is written anywhere.
    let e = fs::OpenOptions::new()
        .write(true)
        .open(m.p("missing"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert_eq!(fs::read_to_string(outside.join("secret")).unwrap(), "s\n");
    // The mount still serves everything else.
    assert_eq!(fs::read_to_string(m.p("real")).unwrap(), "r\n");
    assert_eq!(fs::read_to_string(m.p("dir/file")).unwrap(), "f\n");
}

#[test]
fn metacopy_on_turns_redirect_dir_on_and_conflicts_where_the_kernels_does() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let l = d.path().join("l");
    wfile(l.join("dir/f"), "f\n");
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    mkdirp(&u);
    mkdirp(&w);
    let mnt = d.path().join("m");
    mkdirp(&mnt);
    for opts in [
        "metacopy=on,redirect_dir=off",
        "redirect_dir=follow,metacopy=on",
        "metacopy=on,redirect_dir=nofollow",
    ] {
        let o = Command::new(bin())
            .args(["mount", "--lower"])
            .arg(&l)
            .arg("--upper")
            .arg(&u)
            .arg("--work")
            .arg(&w)
            .args(["-o", opts])
            .arg(&mnt)
            .output()
            .unwrap();
        // A mount that should not have happened is not left behind.
        let mounted = is_mounted(&mnt);
        if mounted {
            unmount_retrying(&mnt);
        }
        assert!(!mounted, "{opts}");
        assert_eq!(o.status.code(), Some(1), "{opts}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("conflicting options: metacopy=on,redirect_dir="),
            "{opts}: {err}"
        );
        let k = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={},{opts}",
                l.display(),
                u.display(),
                w.display()
            ))
            .arg(&mnt)
            .output()
            .unwrap();
        let mounted = is_mounted(&mnt);
        if mounted {
            unmount_retrying(&mnt);
        }
        assert!(
            !k.status.success() && !mounted,
            "the kernel refuses {opts} too"
        );
    }
    let m = layerfs_stack(&[&l], Some((&u, &w)), &mnt, &["metacopy=on"]);
    run(Command::new("mv")
        .args(["dir", "dir2"])
        .current_dir(&m.path));
    assert_eq!(
        getxattr(u.join("dir2"), "trusted.overlay.redirect").as_deref(),
        Some(&b"dir"[..]),
        "metacopy=on renames directories with a redirect"
    );
    assert!(!u.join("dir2/f").exists());
}

#[test]
fn unprivileged_mounts_refuse_metacopy_as_the_kernel_does() {
    if !can_mount() {
        return;
    }
    // Without privilege layerfs writes the kernel's userxattr format, with which the kernel
    // refuses metacopy=on: the mount is refused before anything is mounted.
    let d = tempfile::Builder::new()
        .prefix("lfs-meta-unpriv.")
        .tempdir_in("/tmp")
        .unwrap();
    let (l, u, w, mnt) = (
        d.path().join("l"),
        d.path().join("u"),
        d.path().join("w"),
        d.path().join("m"),
    );
    wfile(l.join("f"), "f\n");
    for p in [&l, &u, &w, &mnt] {
        mkdirp(p);
    }
    chmod(d.path(), 0o755);
    run(Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(d.path()));
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .args(["mount", "--lower"])
        .arg(&l)
        .arg("--upper")
        .arg(&u)
        .arg("--work")
        .arg(&w)
        .args(["-o", "metacopy=on"])
        .arg(&mnt)
        .env("XDG_DATA_HOME", d.path())
        .output()
        .unwrap();
    let mounted = is_mounted(&mnt);
    if mounted {
        unmount_retrying(&mnt);
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!mounted, "{err}");
    assert!(err.contains("metacopy=on needs trusted xattrs"), "{err}");
}

#[test]
fn metacopy_files_of_a_lower_layer_are_followed_with_metacopy_on() {
    // A kernel upper with metacopy files used as a lower layer (as a container's upper
    // stacked as-is would be), under another upper that changes them again.
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l1, l2) = lowers(d.path());
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let mnt = d.path().join("m");
    {
        let k = kernel(&[&l1, &l2], Some((&u, &w)), &mnt, "metacopy=on");
        run(Command::new("sh")
            .args([
                "-c",
                "chmod 600 big f && mv d/x d/x2 && mkdir n && mv o/p n/p2 && chown 1000 m/bottom",
            ])
            .current_dir(&k.path));
    }
    assert!(getxattr(u.join("n/p2"), "trusted.overlay.metacopy").is_some());
    let script = "chown 1000 big && mv d/x2 d/x3 && chmod 640 n/p2 && echo more >> f && \
                  mv m/bottom m/b2 && cat d/x3 n/p2 f m/b2";
    let (ku, kw, lu, lw) = (
        d.path().join("ku"),
        d.path().join("kw"),
        d.path().join("lu"),
        d.path().join("lw"),
    );
    let (want, k_out) = {
        let k = kernel(&[&u, &l1, &l2], Some((&ku, &kw)), &mnt, "metacopy=on");
        let out = run(Command::new("sh").args(["-c", script]).current_dir(&k.path));
        (snapshot(&k.path), out)
    };
    assert_eq!(k_out, "x\np\nf\nmore\nbottom\n");
    {
        let m = layerfs_stack(&[&u, &l1, &l2], Some((&lu, &lw)), &mnt, &["metacopy=on"]);
        let out = run(Command::new("sh").args(["-c", script]).current_dir(&m.path));
        assert_eq!(out, k_out, "layerfs over a lower with metacopy files");
        assert_same(
            &snapshot(&m.path),
            &want,
            "layerfs over a lower with metacopy files",
        );
    }
    assert_eq!(upper_markers(&lu), upper_markers(&ku), "upper markers");
    for (name, up) in [("layerfs", &lu), ("kernel", &ku)] {
        assert!(
            getxattr(up.join("big"), "trusted.overlay.metacopy").is_some(),
            "{name}: a metacopy copy of a lower metacopy file"
        );
    }
    let m = layerfs_stack(&[&u, &l1, &l2], Some((&ku, &kw)), &mnt, &["metacopy=on"]);
    assert_same(&snapshot(&m.path), &want, "layerfs over the kernel's upper");
}

#[test]
fn commit_of_a_container_with_metacopy_files_uses_its_image() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let (l1, _) = lowers(d.path());
    let root = store.display().to_string();
    let ok = |args: &[&str]| -> String {
        let mut all = vec!["--root", root.as_str()];
        all.extend_from_slice(args);
        let o = Command::new(bin()).args(&all).output().expect("layerfs");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let base = d.path().join("base.tar");
    ok(&["diff", l1.to_str().unwrap(), "-o", base.to_str().unwrap()]);
    ok(&["import", base.to_str().unwrap(), "--name", "base"]);
    let mut ids = Vec::new();
    for (c, opts) in [("cm", "metacopy=on"), ("cc", "metacopy=off")] {
        let mnt = d.path().join(format!("m-{c}"));
        mkdirp(&mnt);
        let mut m = layerfs(
            &[
                "--root".as_ref(),
                store.as_os_str(),
                "--image".as_ref(),
                "base".as_ref(),
                "--container".as_ref(),
                c.as_ref(),
                "-o".as_ref(),
                opts.as_ref(),
            ],
            &mnt,
        );
        run(Command::new("sh")
            .args(["-c", "set -e; chown -R 1000:1000 d o big; mv f f2"])
            .current_dir(&m.path));
        m.unmount();
        ids.push(ok(&[
            "commit",
            "--container",
            c,
            "--from",
            "base",
            "--name",
            &format!("{c}img"),
            "--source-date-epoch",
            EPOCH,
        ]));
    }
    assert!(
        getxattr(
            store.join("containers/cm/upper/big"),
            "trusted.overlay.metacopy"
        )
        .is_some(),
        "the container's upper holds metacopy files"
    );
    assert_eq!(ids[0], ids[1], "the same layer from both containers");
    let mnt = d.path().join("m-img");
    let mut m = layerfs(
        &[
            "--root".as_ref(),
            store.as_os_str(),
            "--image".as_ref(),
            "cmimg".as_ref(),
        ],
        &mnt,
    );
    assert_eq!(
        fs::read(m.p("big")).unwrap(),
        fs::read(l1.join("big")).unwrap()
    );
    assert_eq!(fs::read_to_string(m.p("f2")).unwrap(), "f\n");
    assert_eq!(fs::metadata(m.p("d/sub/z")).unwrap().uid(), 1000);
    m.unmount();
}

/// A lower path longer than the kernel's 256-byte redirect limit (`redirect_max`).
fn long_dir() -> String {
    ["a", "b", "c", "d", "e"]
        .iter()
        .map(|c| c.repeat(60))
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn renames_whose_redirect_would_pass_the_kernels_limit_do_what_the_kernel_does() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let l = d.path().join("l");
    let deep = long_dir();
    let big: Vec<u8> = (0..1u32 << 16).map(|i| (i * 13 % 251) as u8).collect();
    for f in ["meta", "plain", "sub/inner"] {
        wfile(l.join(&deep).join(f), &big);
    }
    wfile(l.join("short/f"), "short\n");
    run(Command::new("find")
        .arg(&l)
        .args(["-exec", "touch", "-h", "-d", OLD, "{}", "+"]));
    let ops: Vec<String> = [
        "chmod 600 DEEP/meta && mv DEEP/meta meta2",
        "mv DEEP/plain plain2",
        "mv DEEP/sub sub2",
        "mv short DEEP/short2",
        "cat meta2 plain2 sub2/inner DEEP/short2/f | md5sum",
        "echo w >> meta2 && tail -c 2 meta2",
    ]
    .iter()
    .map(|op| op.replace("DEEP", &deep))
    .collect();
    let mnt = d.path().join("m");
    let (ku, kw, lu, lw) = (
        d.path().join("ku"),
        d.path().join("kw"),
        d.path().join("lu"),
        d.path().join("lw"),
    );
    let (k_results, k_tree) = {
        let k = kernel(&[&l], Some((&ku, &kw)), &mnt, "metacopy=on");
        (run_shell_ops(&k.path, &ops), snapshot(&k.path))
    };
    let (l_results, l_tree) = {
        let m = layerfs_stack(&[&l], Some((&lu, &lw)), &mnt, &["metacopy=on"]);
        (run_shell_ops(&m.path, &ops), snapshot(&m.path))
    };
    assert_eq!(l_results, k_results, "results: layerfs vs kernel");
    assert_same(&l_tree, &k_tree, "layerfs vs kernel");
    // One difference by design: where the kernel answers EXDEV to the directory rename (and
    // mv copies the files as new ones), layerfs copies the directory up itself, so its
    // children keep their origins and numbers and the copy is marked impure.
    let mut l_markers = upper_markers(&lu);
    assert_eq!(
        l_markers.insert("sub2".into(), "dir trusted.overlay.opaque=y".into()),
        Some("dir trusted.overlay.impure=y trusted.overlay.opaque=y".into())
    );
    assert!(getxattr(lu.join("sub2/inner"), "trusted.overlay.origin").is_some());
    assert!(getxattr(ku.join("sub2/inner"), "trusted.overlay.origin").is_none());
    assert_eq!(
        l_markers,
        upper_markers(&ku),
        "upper markers: layerfs vs kernel"
    );
    let k_on_l = {
        let k = kernel(&[&l], Some((&lu, &lw)), &mnt, "metacopy=on");
        snapshot(&k.path)
    };
    assert_same(&k_on_l, &k_tree, "kernel over layerfs' upper");
}

/// Two lowers and two data-only layers. The bottom lower holds metacopy files whose data
/// redirects lead into the data-only layers (and some the kernel refuses to follow); the top
/// one a metacopy file above another lower, which the kernel follows only with metacopy=on.
fn data_only_stack(d: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let (l1, l2, d1, d2) = (d.join("l1"), d.join("l2"), d.join("d1"), d.join("d2"));
    let meta = |p: PathBuf, size: u64, redirect: Option<&str>| {
        wfile(&p, "");
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(size)
            .unwrap();
        setxattr(&p, "trusted.overlay.metacopy", b"");
        if let Some(r) = redirect {
            setxattr(&p, "trusted.overlay.redirect", r.as_bytes());
        }
    };
    meta(l2.join("f"), 10, Some("/blobs/x"));
    meta(l2.join("dd/g"), 10, Some("/blobs/x"));
    meta(l2.join("y"), 7, Some("/blobs/y"));
    meta(l2.join("norel"), 10, None);
    meta(l2.join("rel"), 10, Some("t"));
    meta(l2.join("missing"), 10, Some("/blobs/none"));
    meta(l1.join("above"), 10, Some("/blobs/x"));
    wfile(l1.join("t"), "top\n");
    wfile(d1.join("blobs/x"), "data-of-x\n");
    wfile(d1.join("sub/h"), "hidden\n");
    wfile(d2.join("blobs/x"), "shadowed\n");
    wfile(d2.join("blobs/y"), "data-y\n");
    for l in [&l1, &l2, &d1, &d2] {
        run(Command::new("find")
            .arg(l)
            .args(["-exec", "touch", "-h", "-d", OLD, "{}", "+"]));
    }
    (l1, l2, d1, d2)
}

const DATA_ONLY_READS: &[&str] = &[
    "ls -a",
    "ls dd",
    "cat f dd/g y",
    "cat norel",
    "cat rel",
    "cat tolower",
    "cat missing",
    "cat above",
    "ls blobs sub",
    "stat -c '%s %b' f dd/g y",
];

#[test]
fn data_only_lower_layers_hold_data_as_the_kernels_do() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l1, l2, d1, d2) = data_only_stack(d.path());
    let mnt = d.path().join("m");
    let lowerdir = format!(
        "lowerdir={}:{}::{}::{}",
        l1.display(),
        l2.display(),
        d1.display(),
        d2.display()
    );
    let shown = |m: &Path| {
        (
            run_shell_ops(m, DATA_ONLY_READS),
            inos(m, &["f", "dd/g", "y", "t"]),
        )
    };
    let kernel_ro = shown(&kernel_with(&lowerdir, &mnt).path);
    assert!(
        kernel_ro
            .0
            .iter()
            .any(|r| r.starts_with("cat f dd/g y: 0 data-of-x")),
        "the kernel reads the data-only layers: {:?}",
        kernel_ro.0
    );
    // Both spellings: the kernel's and --data-lower.
    let layerfs_ro = shown(&layerfs(&[OsStr::new("-o"), OsStr::new(&lowerdir)], &mnt).path);
    assert_eq!(
        layerfs_ro, kernel_ro,
        "read-only: layerfs -o lowerdir= vs kernel"
    );
    let args: Vec<OsString> = [
        ("--lower", &l1),
        ("--lower", &l2),
        ("--data-lower", &d1),
        ("--data-lower", &d2),
    ]
    .iter()
    .flat_map(|(flag, dir)| [OsString::from(flag), dir.as_os_str().to_owned()])
    .collect();
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    assert_eq!(
        shown(&layerfs(&refs, &mnt).path),
        kernel_ro,
        "read-only: layerfs --data-lower vs kernel"
    );

    // With an upper and metacopy=on: metadata changes copy metadata only (the data stays in
    // the data-only layer), a write copies it up from there. (The files the kernel cannot
    // open stay unread: a tree snapshot would open them.)
    const WRITES: &[&str] = &[
        "chown 1000 f && cat f",
        "cat above",
        "chmod 600 above && cat above",
        "echo more >> dd/g && cat dd/g",
        "mv y y2 && cat y2",
    ];
    const CHECKS: &[&str] = &[
        "ls -a",
        "cat f dd/g y2 above | md5sum",
        "stat -c '%n %s %u %a %b' f dd/g y2 above",
    ];
    let mut sides = Vec::new();
    for who in ["kernel", "layerfs"] {
        let (u, w) = (
            d.path().join(format!("{who}-u")),
            d.path().join(format!("{who}-w")),
        );
        mkdirp(&u);
        mkdirp(&w);
        let opts = format!(
            "{lowerdir},upperdir={},workdir={},metacopy=on",
            u.display(),
            w.display()
        );
        let m = if who == "kernel" {
            kernel_with(&opts, &mnt)
        } else {
            layerfs(&[OsStr::new("-o"), OsStr::new(&opts)], &mnt)
        };
        let results = run_shell_ops(&m.path, WRITES);
        let checks = run_shell_ops(&m.path, CHECKS);
        drop(m);
        sides.push((results, checks, upper_markers(&u), u, w));
    }
    let (k, l) = (&sides[0], &sides[1]);
    assert!(
        k.0.iter().all(|r| r.contains(": 0 ")),
        "the kernel's writes: {:?}",
        k.0
    );
    assert_eq!(l.0, k.0, "results: layerfs vs kernel");
    assert_eq!(l.1, k.1, "what the mounts show: layerfs vs kernel");
    assert_eq!(l.2, k.2, "upper markers: layerfs vs kernel");
    // chown copied f's metadata only: its data is still found through the lower metacopy
    // file's redirect in the data-only layer.
    assert_eq!(
        l.2.get("f").map(String::as_str),
        Some("metacopy size=10 no-data=true trusted.overlay.metacopy=")
    );
    // Each mounts the other's upper to what the writer showed.
    for (side, other) in [(k, "layerfs"), (l, "kernel")] {
        let opts = format!(
            "{lowerdir},upperdir={},workdir={},metacopy=on",
            side.3.display(),
            side.4.display()
        );
        let m = if other == "kernel" {
            kernel_with(&opts, &mnt)
        } else {
            layerfs(&[OsStr::new("-o"), OsStr::new(&opts)], &mnt)
        };
        assert_eq!(
            run_shell_ops(&m.path, CHECKS),
            k.1,
            "{other} over the other's upper"
        );
    }
}
