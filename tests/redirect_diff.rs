//! `diff` and `commit` of uppers with directory redirects (`-o redirect_dir=on`): the same
//! operations on two layerfs mounts of the same lowers, one per mode, give byte-identical
//! layer tars, the redirect one resolved against its lowers (`diff --lower`,
//! `commit --container`), and so does kernel overlayfs' upper (`redirect_dir=on`); without
//! the lowers such an upper is refused with the directory named.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Every lower time, so times that copy-up keeps differ from the clamped times of changes.
const OLD: &str = "@1000000";
/// `--source-date-epoch` of the diffs: the two mounts' changes, made seconds apart, get the
/// same clamped times.
const EPOCH: &str = "1500000000";

/// Two lowers (top first): directories to move, one merged across both, a hard link pair.
fn lowers(d: &Path) -> (PathBuf, PathBuf) {
    let (l1, l2) = (d.join("l1"), d.join("l2"));
    wfile(l1.join("a/x/y/f"), "f\n");
    wfile(l1.join("a/g"), "g\n");
    wfile(l1.join("a/link1"), "linked\n");
    wfile(l1.join("a/lk/keep"), "k\n");
    fs::hard_link(l1.join("a/link1"), l1.join("a/lk/link2")).unwrap();
    chmod(l1.join("a/x"), 0o750);
    setxattr(l1.join("a/g"), "user.note", b"kept");
    symlink("g", l1.join("a/sym"));
    mkdirp(l1.join("b"));
    wfile(l1.join("c/d/h"), "h\n");
    wfile(l1.join("c/d/e/i"), "i\n");
    wfile(l1.join("m/top"), "top\n");
    wfile(l2.join("m/bottom"), "bottom\n");
    wfile(l2.join("m/sub/deep"), "deep\n");
    wfile(l2.join("m/sub/gone"), "gone\n");
    wfile(l2.join("only2/z"), "z\n");
    for l in [&l1, &l2] {
        run(Command::new("find")
            .arg(l)
            .args(["-exec", "touch", "-h", "-d", OLD, "{}", "+"]));
    }
    (l1, l2)
}

/// Renames of lower, merged and nested directories, with changes inside before and after.
const OPS: &str = "set -e
echo early > a/early
mv a/x b/x2
mv a a2
mv m m2
mv c/d c/d2
mv c c2
echo new > a2/new
echo more >> a2/g
rm m2/sub/gone
mkdir a2/fresh && echo f > a2/fresh/ff
mv only2 only2b
mkdir newd
mv only2b newd/o
chmod 700 m2/sub
rm c2/d2/e/i
mv c2/d2/e c2/d2/e2
";

fn layerfs_cmd(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().expect("layerfs")
}

fn diff(upper: &Path, lowers: &[&Path], out: &Path) -> std::process::Output {
    let mut args = vec![
        "diff".to_string(),
        upper.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--source-date-epoch".into(),
        EPOCH.into(),
    ];
    for l in lowers {
        args.push("--lower".into());
        args.push(l.display().to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    layerfs_cmd(&refs)
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

/// Entry names of a tar, for readable failures.
fn names(tar: &[u8]) -> Vec<String> {
    let mut r = layerfs::oci::tarfmt::TarReader::new(tar);
    let mut out = Vec::new();
    while let Some(e) = r.next_entry().unwrap() {
        out.push(format!(
            "{} {:o} {} {:?}",
            String::from_utf8_lossy(&e.path),
            e.mode,
            e.mtime.sec,
            e.kind
        ));
    }
    out
}

#[test]
fn redirect_and_copy_tree_uppers_give_the_same_tar() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l1, l2) = lowers(d.path());
    let mnt = d.path().join("m");
    let mut uppers = Vec::new();
    let mut trees = Vec::new();
    for (mode, opts) in [("redirect", &["redirect_dir=on"][..]), ("copy", &[][..])] {
        let (u, w) = (
            d.path().join(format!("u-{mode}")),
            d.path().join(format!("w-{mode}")),
        );
        let mut m = layerfs_stack(&[&l1, &l2], Some((&u, &w)), &mnt, opts);
        run(Command::new("sh").args(["-c", OPS]).current_dir(&m.path));
        trees.push(snapshot(&m.path));
        m.unmount();
        uppers.push(u);
    }
    assert_same(&trees[0], &trees[1], "the two modes show the same tree");
    // The copy-tree rename keeps the copied directories' times, as copy-up does.
    for p in ["m2", "b/x2/y", "a2/lk"] {
        use std::os::unix::fs::MetadataExt;
        let mtime = fs::metadata(uppers[1].join(p)).unwrap().mtime();
        assert_eq!(mtime, 1_000_000, "{p}: mtime of the copy-tree copy");
    }
    let (ru, cu) = (&uppers[0], &uppers[1]);
    for (p, want) in [
        ("a2", &b"a"[..]),
        ("b/x2", b"/a/x"),
        ("m2", b"m"),
        ("c2", b"c"),
    ] {
        assert_eq!(
            getxattr(ru.join(p), "trusted.overlay.redirect").as_deref(),
            Some(want),
            "{p} carries a redirect"
        );
    }
    assert!(
        !ru.join("m2/top").exists() && !ru.join("b/x2/y").exists(),
        "no tree copied"
    );

    // Without the lowers: refused, naming the directory and the way out.
    let o = diff(ru, &[], &d.path().join("no.tar"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("a2") && err.contains("--lower") && err.trim().lines().count() == 1,
        "{err}"
    );

    let rtar = diff_ok(ru, &[&l1, &l2], &d.path().join("r.tar"));
    let ctar = diff_ok(cu, &[], &d.path().join("c.tar"));
    assert_eq!(names(&rtar), names(&ctar), "entries: redirect vs copy-tree");
    assert!(rtar == ctar, "redirect and copy-tree tars differ in bytes");
    // The copy-tree upper gives the same with its lowers given.
    let ctar2 = diff_ok(cu, &[&l1, &l2], &d.path().join("c2.tar"));
    assert!(ctar2 == ctar, "copy-tree tar with --lower");
    // So does the kernel's upper for the same operations (`redirect_dir=on`).
    let (ku, kw) = (d.path().join("u-kernel"), d.path().join("w-kernel"));
    {
        let k = kernel(&[&l1, &l2], Some((&ku, &kw)), &mnt, "redirect_dir=on");
        run(Command::new("sh").args(["-c", OPS]).current_dir(&k.path));
    }
    let ktar = diff_ok(&ku, &[&l1, &l2], &d.path().join("k.tar"));
    assert_eq!(names(&ktar), names(&ctar), "entries: kernel vs copy-tree");
    assert!(ktar == ctar, "kernel and copy-tree tars differ in bytes");
    let n = names(&rtar);
    for want in [
        "a2/.wh..wh..opq",
        "a2/g ",
        "b/x2/.wh..wh..opq",
        "b/x2/y/f ",
        "m2/bottom ",
        "c2/d2/h ",
        "a2/lk/link2 644 1000000 Some(HardLink)",
    ] {
        assert!(n.iter().any(|e| e.starts_with(want)), "{want} in {n:#?}");
    }
}

#[test]
fn commit_of_a_container_with_redirects_uses_its_image() {
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
        let o = layerfs_cmd(&all);
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
    for (c, opts) in [("cr", "redirect_dir=on"), ("cc", "redirect_dir=off")] {
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
            .args([
                "-c",
                "set -e; mv a a2; echo n > a2/new; mv c/d c/d2; mv c c2",
            ])
            .current_dir(&m.path));
        m.unmount();
        let name = format!("{c}img");
        ids.push(ok(&[
            "commit",
            "--container",
            c,
            "--from",
            "base",
            "--name",
            &name,
            "--source-date-epoch",
            EPOCH,
        ]));
    }
    assert!(
        getxattr(
            store.join("containers/cr/upper/a2"),
            "trusted.overlay.redirect"
        )
        .is_some()
    );
    assert_eq!(ids[0], ids[1], "the same layer from both containers");
    // `commit UPPER --lower` does the same with the layers given by hand.
    let base_id = ok(&["diff", l1.to_str().unwrap()]);
    let base_layer = store
        .join("layers")
        .join(base_id.trim().strip_prefix("sha256:").unwrap());
    let cr_upper = store.join("containers/cr/upper");
    let by_hand = ok(&[
        "commit",
        cr_upper.to_str().unwrap(),
        "--lower",
        base_layer.to_str().unwrap(),
        "--from",
        "base",
        "--name",
        "byhand",
        "--source-date-epoch",
        EPOCH,
    ]);
    assert_eq!(by_hand, ids[0], "commit UPPER --lower");
    let mnt = d.path().join("m-img");
    let mut m = layerfs(
        &[
            "--root".as_ref(),
            store.as_os_str(),
            "--image".as_ref(),
            "crimg".as_ref(),
        ],
        &mnt,
    );
    assert_eq!(fs::read_to_string(m.p("a2/x/y/f")).unwrap(), "f\n");
    assert_eq!(fs::read_to_string(m.p("c2/d2/h")).unwrap(), "h\n");
    assert!(!m.p("a").exists() && !m.p("c/d").exists());
    m.unmount();
}
