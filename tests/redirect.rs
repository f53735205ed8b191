//! Directory redirects (`-o redirect_dir=on`), with kernel overlayfs (`redirect_dir=on`) as
//! the oracle: the same renames on both give the same results, the same tree and the same
//! upper markers (redirect values, whiteouts, opaque and impure marks); each mounts the other's
//! upper to the same tree; hostile redirect values never lead outside the layers.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Two lowers (top first) with directories to move around, one of them merged across both.
fn lowers(d: &Path) -> (PathBuf, PathBuf) {
    let (l1, l2) = (d.join("l1"), d.join("l2"));
    wfile(l1.join("a/x/y/f"), "f\n");
    wfile(l1.join("a/g"), "g\n");
    mkdirp(l1.join("b"));
    wfile(l1.join("c/d/h"), "h\n");
    wfile(l1.join("m/top"), "top\n");
    wfile(l2.join("m/bottom"), "bottom\n");
    wfile(l2.join("m/sub/deep"), "deep\n");
    wfile(l2.join("only2/z"), "z\n");
    wfile(l1.join("gone/k"), "k\n");
    (l1, l2)
}

/// The operations, run by `sh` in the mount; one line per operation with its exit status.
const OPS: &[&str] = &[
    "mv a a2",
    "mv c/d c/d2",
    "mv a2 a3",
    "mv a3/x b/x2",
    "mkdir newd",
    "mv c newd/c",
    "echo new > m/new",
    "mv m m2",
    "mv m2/sub b/sub2",
    "mv b/x2 newd/x3",
    "mv only2 only2b",
    "mv only2b only2",
    "rm gone/k",
    "mv gone b/gone2",
    "rmdir b/gone2",
    "mkdir newd/c/fresh",
    "mv a3 a",
    "cat newd/x3/y/f b/sub2/deep m2/bottom m2/top newd/c/d2/h",
];

#[test]
fn renames_write_what_the_kernel_writes_and_show_the_same_tree() {
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
    let (k_results, k_tree) = {
        let k = kernel(&[&l1, &l2], Some((&ku, &kw)), &mnt, "redirect_dir=on");
        (run_shell_ops(&k.path, OPS), snapshot(&k.path))
    };
    let (l_results, l_tree, renamed_ino, renamed_ino_after) = {
        let m = layerfs_stack(&[&l1, &l2], Some((&lu, &lw)), &mnt, &["redirect_dir=on"]);
        let before = fs::metadata(m.p("a")).unwrap().ino();
        let results = run_shell_ops(&m.path, OPS);
        (
            results,
            snapshot(&m.path),
            before,
            fs::metadata(m.p("a")).unwrap().ino(),
        )
    };
    assert_eq!(l_results, k_results, "results: layerfs vs kernel");
    assert_same(&l_tree, &k_tree, "layerfs vs kernel, redirect_dir=on");
    assert_eq!(
        renamed_ino_after, renamed_ino,
        "a renamed directory keeps its number"
    );
    // No copied tree: the moved directories' lower files stay in the lowers.
    assert!(
        !lu.join("newd/x3/y").exists(),
        "x3's subtree was not copied"
    );
    assert_eq!(
        upper_markers(&lu),
        upper_markers(&ku),
        "upper markers: layerfs vs kernel"
    );
    assert_eq!(
        getxattr(lu.join("newd/x3"), "trusted.overlay.redirect").as_deref(),
        Some(&b"/a/x"[..]),
        "absolute, kept by a second move"
    );
    assert_eq!(
        getxattr(lu.join("newd/c/d2"), "trusted.overlay.redirect").as_deref(),
        Some(&b"d"[..]),
        "relative"
    );

    // Each mounts the other's upper to the same tree.
    let k_on_l = {
        let k = kernel(&[&l1, &l2], Some((&lu, &lw)), &mnt, "redirect_dir=on");
        snapshot(&k.path)
    };
    assert_same(&k_on_l, &k_tree, "kernel over layerfs' upper");
    for opts in [&[][..], &["redirect_dir=on"][..]] {
        let m = layerfs_stack(&[&l1, &l2], Some((&ku, &kw)), &mnt, opts);
        assert_same(
            &snapshot(&m.path),
            &k_tree,
            &format!("layerfs {opts:?} over the kernel's upper"),
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
    }
}

#[test]
fn copy_tree_mode_moves_a_kernel_redirected_directory_again() {
    // The default mode reads the kernel's redirects, and a further move of such a directory
    // copies the right tree (from the redirect's target) up.
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l1, l2) = lowers(d.path());
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let mnt = d.path().join("m");
    {
        let k = kernel(&[&l1, &l2], Some((&u, &w)), &mnt, "redirect_dir=on");
        run(Command::new("sh")
            .args(["-c", "mv a a2 && mkdir n && mv a2 n/a3 && mv m m2"])
            .current_dir(&k.path));
    }
    let want = {
        let k = kernel(&[&l1, &l2], Some((&u, &w)), &mnt, "redirect_dir=on");
        run(Command::new("sh")
            .args(["-c", "mv n/a3 b/a4 && mv m2/sub m2/sub2 && mv m2 b/m5"])
            .current_dir(&k.path));
        snapshot(&k.path)
    };
    let d2 = tempfile::tempdir().unwrap();
    let (l1b, l2b) = lowers(d2.path());
    let (ub, wb) = (d2.path().join("u"), d2.path().join("w"));
    {
        let k = kernel(&[&l1b, &l2b], Some((&ub, &wb)), &mnt, "redirect_dir=on");
        run(Command::new("sh")
            .args(["-c", "mv a a2 && mkdir n && mv a2 n/a3 && mv m m2"])
            .current_dir(&k.path));
    }
    {
        let m = layerfs_stack(&[&l1b, &l2b], Some((&ub, &wb)), &mnt, &[]);
        run(Command::new("sh")
            .args(["-c", "mv n/a3 b/a4 && mv m2/sub m2/sub2 && mv m2 b/m5"])
            .current_dir(&m.path));
        assert_same(
            &snapshot(&m.path),
            &want,
            "layerfs copy-tree after kernel redirects",
        );
    }
    for p in ["b/a4/x/y/f", "b/m5/bottom", "b/m5/sub2/deep"] {
        assert!(ub.join(p).exists(), "copy-tree mode copied {p} up");
    }
    let k = kernel(&[&l1b, &l2b], Some((&ub, &wb)), &mnt, "redirect_dir=on");
    assert_same(&snapshot(&k.path), &want, "kernel over it");
}

#[test]
fn hostile_redirects_stay_inside_the_layers() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let l = d.path().join("l");
    let outside = d.path().join("outside");
    wfile(outside.join("secret"), "s\n");
    wfile(l.join("real/file"), "r\n");
    symlink(&outside, l.join("link"));
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let cases: &[(&str, &[u8], bool)] = &[
        ("dotdot", b"/../outside", false),
        ("rel_dotdot", b"..", false),
        ("slash", b"a/b", false),
        ("empty_comp", b"//real", false),
        ("empty", b"", false),
        ("through_link", b"/link", true),
        ("through_link2", b"/link/secret", true),
        ("good", b"/real", true),
    ];
    for (name, value, _) in cases {
        mkdirp(u.join(name));
        setxattr(u.join(name), "trusted.overlay.redirect", value);
    }
    let long = [b"/real/".as_slice(), &[b'a'; 300]].concat();
    mkdirp(u.join("long"));
    setxattr(u.join("long"), "trusted.overlay.redirect", &long);
    let mnt = d.path().join("m");
    let m = layerfs_stack(&[&l], Some((&u, &w)), &mnt, &[]);
    for (name, _, ok) in cases {
        let r = fs::read_dir(m.p(name)).and_then(|it| it.collect::<Result<Vec<_>, _>>());
        match (ok, r) {
            (true, Ok(entries)) => {
                let names: Vec<_> = entries.iter().map(|e| e.file_name()).collect();
                if *name == "good" {
                    assert_eq!(names, ["file"], "{name}");
                } else {
                    assert!(
                        names.is_empty(),
                        "{name}: a symlink is never followed: {names:?}"
                    );
                }
            }
            (false, Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}"),
            (ok, r) => panic!("{name}: expected ok={ok}, got {r:?}"),
        }
    }
    let r = fs::read_dir(m.p("long")).and_then(|it| it.collect::<Result<Vec<_>, _>>());
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO), "long");
    // The mount still serves everything else.
    assert_eq!(fs::read_to_string(m.p("real/file")).unwrap(), "r\n");
    assert_eq!(fs::read_to_string(m.p("good/file")).unwrap(), "r\n");
}

#[test]
fn redirects_in_lower_layers_are_followed_as_the_kernel_follows_them() {
    // A kernel upper with redirects used as a lower layer (as a container's upper committed
    // as-is would be), under another upper that renames again.
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l1, l2) = lowers(d.path());
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let mnt = d.path().join("m");
    {
        let k = kernel(&[&l1, &l2], Some((&u, &w)), &mnt, "redirect_dir=on");
        run(Command::new("sh")
            .args(["-c", "mv a a2 && mkdir n && mv a2 n/a3 && mv m n/m3"])
            .current_dir(&k.path));
    }
    let script = "mv n/a3/x n/x4 && mv n n2 && echo z > n2/m3/sub/new";
    let (ku, kw, lu, lw) = (
        d.path().join("ku"),
        d.path().join("kw"),
        d.path().join("lu"),
        d.path().join("lw"),
    );
    let want = {
        let k = kernel(&[&u, &l1, &l2], Some((&ku, &kw)), &mnt, "redirect_dir=on");
        run(Command::new("sh").args(["-c", script]).current_dir(&k.path));
        snapshot(&k.path)
    };
    assert!(
        want.entries.contains_key(b"n2/x4/y/f".as_slice()),
        "{:?}",
        want.entries.keys()
    );
    {
        let m = layerfs_stack(
            &[&u, &l1, &l2],
            Some((&lu, &lw)),
            &mnt,
            &["redirect_dir=on"],
        );
        run(Command::new("sh").args(["-c", script]).current_dir(&m.path));
        assert_same(&snapshot(&m.path), &want, "layerfs over a redirected lower");
    }
    assert_eq!(upper_markers(&lu), upper_markers(&ku), "upper markers");
    let m = layerfs_stack(&[&u, &l1, &l2], Some((&ku, &kw)), &mnt, &[]);
    assert_same(&snapshot(&m.path), &want, "layerfs over the kernel's upper");
}
