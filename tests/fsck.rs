//! `layerfs fsck`: each kind of damage is planted in an upper, found, and repaired (or, where
//! a repair could lose data, reported and left); healthy uppers written by layerfs and by
//! kernel overlayfs are clean; `--repair` is refused on a live mount.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// Run `layerfs fsck ARGS`; returns the exit code and stdout.
fn fsck(args: &[&Path], extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .arg("fsck")
        .args(args)
        .args(extra)
        .output()
        .expect("run layerfs fsck");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), stdout)
}

/// Plant, check (found, exit 1), repair, check again (clean, exit 0).
fn found_then_repaired(upper: &Path, extra: &[&str], needle: &str) -> String {
    let (code, out) = fsck(&[upper], extra);
    assert_eq!(code, 1, "damage is found");
    assert!(out.contains(needle), "report names {needle:?}:\n{out}");
    let mut rep = extra.to_vec();
    rep.push("--repair");
    let (code, out2) = fsck(&[upper], &rep);
    assert!(out2.contains("[repaired]"), "{out2}");
    assert_eq!(code, 0, "everything found was repaired");
    let (code, out3) = fsck(&[upper], extra);
    assert_eq!(code, 0, "clean after repair:\n{out3}");
    out
}

fn mknod_whiteout_mode(p: &Path, mode: u32) {
    whiteout(p);
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn work_dir_leftovers_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    mkdirp(&u);
    wfile(w.join("work/#lfs.1.2"), "half a copy");
    wfile(w.join("work/#lfs.1.3/deep/x"), "x");
    mkdirp(w.join("index"));
    let work = w.to_str().unwrap();
    let out = found_then_repaired(&u, &["--work", work], "work/work/#lfs.1.3");
    assert!(out.contains("work/work/#lfs.1.2: leftover"), "{out}");
    assert_eq!(fs::read_dir(w.join("work")).unwrap().count(), 0);
    assert!(
        w.join("index").is_dir(),
        "the kernel's index dir is not a leftover"
    );
}

#[test]
fn whiteouts_that_hide_nothing() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u) = (d.path().join("l"), d.path().join("u"));
    wfile(l.join("kept"), "k");
    wfile(l.join("dir/inner"), "i");
    mkdirp(u.join("dir"));
    mkdirp(u.join("opq"));
    opaque(u.join("opq"));
    whiteout(u.join("kept")); // hides the lower file: fine
    whiteout(u.join("dir/inner")); // fine
    whiteout(u.join("opq/stale")); // in an opaque dir: hides nothing
    whiteout(u.join("nothing")); // no lower has it
    mkdirp(u.join("pure"));
    whiteout(u.join("pure/x")); // no lower dir "pure"
    let lower = ["--lower", l.to_str().unwrap()];
    // Without the lowers only the opaque case can be told.
    let (code, out) = fsck(&[&u], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("upper/opq/stale: whiteout in an opaque directory"),
        "{out}"
    );
    assert!(!out.contains("upper/nothing"), "{out}");
    let out = found_then_repaired(&u, &lower, "upper/nothing: whiteout of a name no lower");
    assert!(out.contains("upper/pure/x"), "{out}");
    assert!(
        !out.contains("upper/kept") && !out.contains("upper/dir/inner"),
        "{out}"
    );
    for gone in ["opq/stale", "nothing", "pure/x"] {
        assert!(
            fs::symlink_metadata(u.join(gone)).is_err(),
            "{gone} removed"
        );
    }
    for kept in ["kept", "dir/inner"] {
        assert_eq!(fs::symlink_metadata(u.join(kept)).unwrap().rdev(), 0);
    }
}

#[test]
fn whiteout_with_permission_bits_is_reset() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let u = d.path().join("u");
    mkdirp(&u);
    mknod_whiteout_mode(&u.join("w"), 0o644);
    found_then_repaired(&u, &[], "upper/w: whiteout with permission bits 0644");
    let md = fs::symlink_metadata(u.join("w")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.rdev()), (0, 0), "still a whiteout");
}

#[test]
fn overlay_markers_on_the_wrong_objects() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let u = d.path().join("u");
    wfile(u.join("file-opaque"), "f");
    setxattr(u.join("file-opaque"), "trusted.overlay.opaque", b"y");
    wfile(u.join("user-opaque"), "f");
    setxattr(u.join("user-opaque"), "user.overlay.opaque", b"y");
    wfile(u.join("empty-marked"), "");
    setxattr(u.join("empty-marked"), "trusted.overlay.whiteout", b"y");
    wfile(u.join("impure-file"), "f");
    setxattr(u.join("impure-file"), "trusted.overlay.impure", b"y");
    mkdirp(u.join("dir"));
    setxattr(u.join("dir"), "trusted.overlay.whiteout", b"y");
    // Kernel bookkeeping is fine.
    wfile(u.join("copied"), "c");
    setxattr(u.join("copied"), "trusted.overlay.origin", KERNEL_ORIGIN);
    setxattr(u.join("dir"), "trusted.overlay.impure", b"y");
    let out = found_then_repaired(&u, &[], "upper/file-opaque: opaque marker");
    for needle in [
        "upper/user-opaque: opaque marker user.overlay.opaque",
        "upper/empty-marked: overlay xattr trusted.overlay.whiteout",
        "upper/impure-file: overlay xattr trusted.overlay.impure",
        "upper/dir: overlay xattr trusted.overlay.whiteout",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    assert!(!out.contains("upper/copied"), "{out}");
    assert_eq!(
        getxattr(u.join("file-opaque"), "trusted.overlay.opaque"),
        None
    );
    assert_eq!(
        getxattr(u.join("empty-marked"), "trusted.overlay.whiteout"),
        None
    );
    assert!(u.join("empty-marked").is_file(), "the file itself stays");
    assert!(getxattr(u.join("copied"), "trusted.overlay.origin").is_some());
    assert!(getxattr(u.join("dir"), "trusted.overlay.impure").is_some());
}

/// An origin as kernel overlayfs writes it (a lower file on an ext4 with a null uuid).
const KERNEL_ORIGIN: &[u8] = b"\x00\xfb\x1d\x00\x01\
    \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
    \xf3\x1f\x9e\x00\xd6\x38\xaa\xb9";

#[test]
fn origins_that_are_not_one_are_removed() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let u = d.path().join("u");
    let fine: &[(&str, &str, &[u8])] = &[
        ("kernel", "trusted.overlay.origin", KERNEL_ORIGIN),
        ("unknown", "trusted.overlay.origin", b""),
        ("user", "user.overlay.origin", KERNEL_ORIGIN),
        ("older", "trusted.layerfs.origin", &12345u64.to_le_bytes()),
    ];
    let bad: &[(&str, &str, &[u8])] = &[
        ("short", "trusted.overlay.origin", b"\x00\xfb"),
        ("magic", "trusted.overlay.origin", &[0x00, 0xfa, 0x1d, 0, 1]),
        ("legacy-size", "trusted.layerfs.origin", b"123"),
        ("legacy-zero", "user.layerfs.origin", &[0; 8]),
    ];
    for (name, attr, value) in fine.iter().chain(bad) {
        wfile(u.join(name), "x");
        setxattr(u.join(name), attr, value);
    }
    mkdirp(u.join("dir"));
    setxattr(
        u.join("dir"),
        "trusted.overlay.origin",
        &KERNEL_ORIGIN[..20],
    );
    let out = found_then_repaired(
        &u,
        &[],
        "upper/short: trusted.overlay.origin does not hold an origin",
    );
    for (name, attr, _) in bad {
        assert!(
            out.contains(&format!("upper/{name}: {attr}")),
            "{name}:\n{out}"
        );
        assert_eq!(getxattr(u.join(name), attr), None, "{name}");
    }
    assert!(out.contains("upper/dir: trusted.overlay.origin"), "{out}");
    for (name, attr, value) in fine {
        assert!(!out.contains(&format!("upper/{name}:")), "{name}:\n{out}");
        assert_eq!(getxattr(u.join(name), attr).as_deref(), Some(*value));
    }
}

#[test]
fn bad_redirects_and_unknown_xattrs_are_reported_not_removed() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let u = d.path().join("u");
    mkdirp(u.join("moved"));
    setxattr(u.join("moved"), "trusted.overlay.redirect", b"/orig");
    mkdirp(u.join("badmove"));
    setxattr(u.join("badmove"), "trusted.overlay.redirect", b"/../etc");
    // A file that got its data keeps the redirect of its metacopy days (the kernel leaves
    // it): nothing reads it.
    wfile(u.join("dataredirect"), "");
    setxattr(u.join("dataredirect"), "trusted.overlay.redirect", b"/x");
    wfile(u.join("odd"), "o");
    setxattr(u.join("odd"), "trusted.overlay.frobnicate", b"1");
    let (code, out) = fsck(&[&u], &["--repair"]);
    assert_eq!(code, 1, "problems are left");
    for fine in ["upper/moved:", "upper/dataredirect:"] {
        assert!(!out.contains(fine), "{fine} is fine:\n{out}");
    }
    for needle in [
        "upper/badmove: trusted.overlay.redirect is not a valid redirect (a `.` or `..` component)",
        "upper/odd: overlay xattr trusted.overlay.frobnicate does not belong here [not repaired]",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    assert!(getxattr(u.join("moved"), "trusted.overlay.redirect").is_some());
    assert!(getxattr(u.join("badmove"), "trusted.overlay.redirect").is_some());
    assert!(getxattr(u.join("odd"), "trusted.overlay.frobnicate").is_some());
}

#[test]
fn metacopy_files_are_checked_as_the_mounts_read_them() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u) = (d.path().join("l"), d.path().join("u"));
    wfile(l.join("a"), "a\n");
    wfile(l.join("sub/b"), "b\n");
    let meta = |p: &Path, len: u64| {
        wfile(p, "");
        fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len)
            .unwrap();
        setxattr(p, "trusted.overlay.metacopy", b"");
    };
    // Good ones: data at the same path, through a data redirect, with a digest value.
    meta(&u.join("a"), 2);
    meta(&u.join("moved"), 2);
    setxattr(u.join("moved"), "trusted.overlay.redirect", b"/sub/b");
    meta(&u.join("digest"), 2);
    setxattr(
        u.join("digest"),
        "trusted.overlay.metacopy",
        &[0, 6, 0, 1, 0xab, 0xcd],
    );
    setxattr(u.join("digest"), "trusted.overlay.redirect", b"a");
    // Bad ones.
    meta(&u.join("nodata"), 2);
    meta(&u.join("badvalue"), 2);
    setxattr(u.join("badvalue"), "trusted.overlay.metacopy", b"yes");
    meta(&u.join("badredirect"), 2);
    setxattr(
        u.join("badredirect"),
        "trusted.overlay.redirect",
        b"/../../etc/passwd",
    );
    meta(&u.join("todir"), 2);
    setxattr(u.join("todir"), "trusted.overlay.redirect", b"/sub");
    // Markers on what is never a metacopy file: strays, removed.
    symlink("a", u.join("link"));
    setxattr(u.join("link"), "trusted.overlay.metacopy", b"");
    mkfifo(u.join("fifo"));
    setxattr(u.join("fifo"), "trusted.overlay.redirect", b"/a");

    let (code, out) = fsck(&[&u], &[]);
    assert_eq!(code, 1);
    for needle in [
        "upper/badvalue: trusted.overlay.metacopy is not a metacopy marker",
        "upper/badredirect: trusted.overlay.redirect is not a valid redirect",
        "upper/link: overlay xattr trusted.overlay.metacopy does not belong here",
        "upper/fifo: overlay xattr trusted.overlay.redirect does not belong here",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    for fine in ["upper/a:", "upper/moved:", "upper/digest:", "upper/nodata:"] {
        assert!(
            !out.contains(fine),
            "without lowers, {fine} is fine:\n{out}"
        );
    }
    let l_arg = l.to_str().unwrap();
    let (code, out) = fsck(&[&u], &["--lower", l_arg]);
    assert_eq!(code, 1);
    for needle in [
        "upper/nodata: metacopy file whose data the lower layers do not hold",
        "upper/todir: metacopy file whose data the lower layers do not hold",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    for fine in ["upper/a:", "upper/moved:", "upper/digest:"] {
        assert!(!out.contains(fine), "{fine} finds its data:\n{out}");
    }
    let (_, out) = fsck(&[&u], &["--lower", l_arg, "--repair"]);
    assert!(
        out.contains(
            "upper/link: overlay xattr trusted.overlay.metacopy does not belong here [repaired]"
        ),
        "{out}"
    );
    assert!(getxattr(u.join("fifo"), "trusted.overlay.redirect").is_none());
    for kept in ["nodata", "badvalue", "todir"] {
        assert!(
            getxattr(u.join(kept), "trusted.overlay.metacopy").is_some(),
            "{kept}: a metacopy file is never changed"
        );
    }
}

#[test]
fn aufs_names_in_an_upper_are_reported() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let u = d.path().join("u");
    wfile(u.join("foo"), "f");
    wfile(u.join(".wh.foo"), "");
    wfile(u.join(".wh.bar"), "");
    wfile(u.join("d/.wh..wh..opq"), "");
    let (code, out) = fsck(&[&u], &["--repair"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("upper/.wh.foo: AUFS-style whiteout name beside the name it deletes"),
        "{out}"
    );
    assert!(out.contains("upper/.wh.bar: AUFS-style whiteout name in an upper"));
    assert!(out.contains("upper/d/.wh..wh..opq: AUFS-style"));
    assert!(u.join(".wh.foo").exists(), "user data is never removed");
}

#[test]
fn unreadable_entries_are_reported() {
    if !can_mount() {
        return;
    }
    if Command::new("setpriv").arg("--help").output().is_err() {
        eprintln!("skipping: no setpriv");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    chmod(d.path(), 0o755);
    let u = d.path().join("u");
    wfile(u.join("open/f"), "f");
    wfile(u.join("closed/secret"), "s");
    chmod(u.join("closed"), 0o700);
    let out = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
        .arg(bin())
        .arg("fsck")
        .arg(&u)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("upper/closed: unreadable: Permission denied"),
        "{stdout}"
    );
}

#[test]
fn healthy_uppers_are_clean() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (top, bot) = (d.path().join("top"), d.path().join("bot"));
    wfile(bot.join("etc/conf"), "c");
    wfile(bot.join("etc/gone"), "g");
    wfile(bot.join("dir/a"), "a");
    wfile(bot.join("dir/sub/b"), "b");
    wfile(top.join("etc/top"), "t");
    whiteout(top.join("old"));
    wfile(bot.join("old"), "o");
    let lowers = [top.as_path(), bot.as_path()];
    let script = |m: &Path, rename_dir: bool| {
        fs::write(m.join("etc/conf"), "changed").unwrap();
        fs::remove_file(m.join("etc/gone")).unwrap();
        let dir = if rename_dir {
            fs::rename(m.join("dir"), m.join("dir2")).unwrap();
            m.join("dir2")
        } else {
            m.join("dir")
        };
        fs::remove_file(dir.join("a")).unwrap();
        fs::create_dir(m.join("etc/new")).unwrap();
        fs::remove_dir_all(dir.join("sub")).unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        fs::write(m.join("old"), "back").unwrap();
    };
    let lower_args = [
        "--lower",
        top.to_str().unwrap(),
        "--lower",
        bot.to_str().unwrap(),
    ];
    // Written by layerfs.
    let (u, w) = (d.path().join("u"), d.path().join("w"));
    let m = layerfs_stack(&lowers, Some((&u, &w)), &d.path().join("m"), &[]);
    script(&m.path, true);
    drop(m);
    let mut args = lower_args.to_vec();
    args.extend(["--work", w.to_str().unwrap()]);
    let (code, out) = fsck(&[&u], &args);
    assert_eq!(code, 0, "layerfs upper:\n{out}");
    // Written by kernel overlayfs (origin xattrs on copied-up files, its index dir).
    let (ku, kw) = (d.path().join("ku"), d.path().join("kw"));
    let k = kernel(&lowers, Some((&ku, &kw)), &d.path().join("km"), "index=on");
    script(&k.path, false);
    drop(k);
    let mut args = lower_args.to_vec();
    args.extend(["--work", kw.to_str().unwrap()]);
    let (code, out) = fsck(&[&ku], &args);
    assert_eq!(code, 0, "kernel upper:\n{out}");
    // A kernel upper with a renamed lower directory holds a redirect, which layerfs follows:
    // clean, and the whiteout at the old name is needed.
    let k = kernel(
        &lowers,
        Some((&ku, &kw)),
        &d.path().join("km"),
        "index=on,redirect_dir=on",
    );
    fs::rename(k.p("etc"), k.p("etc2")).unwrap();
    drop(k);
    assert!(getxattr(ku.join("etc2"), "trusted.overlay.redirect").is_some());
    let (code, out) = fsck(&[&ku], &args);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn repair_is_refused_on_a_live_mount() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u, w) = (d.path().join("l"), d.path().join("u"), d.path().join("w"));
    wfile(l.join("f"), "f");
    let m = layerfs_stack(&[&l], Some((&u, &w)), &d.path().join("m"), &[]);
    fs::write(m.p("g"), "g").unwrap();
    let out = Command::new(bin())
        .arg("fsck")
        .arg(&u)
        .arg("--repair")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to repair"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // Checking without repairing is allowed.
    let (code, _) = fsck(&[&u], &[]);
    assert_eq!(code, 0);
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(bin()).arg("fsck").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin())
        .args(["fsck", "/nonexistent/upper"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a missing upper is a failure");
}

#[test]
fn repairs_do_not_change_what_the_mount_shows() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u, w) = (d.path().join("l"), d.path().join("u"), d.path().join("w"));
    wfile(l.join("hidden"), "h");
    wfile(l.join("dir/x"), "x");
    mkdirp(&u);
    mknod_whiteout_mode(&u.join("hidden"), 0o600);
    mkdirp(u.join("dir"));
    opaque(u.join("dir"));
    whiteout(u.join("dir/x"));
    whiteout(u.join("never-was"));
    wfile(u.join("f"), "f");
    setxattr(u.join("f"), "trusted.overlay.opaque", b"y");
    wfile(u.join("e"), "");
    setxattr(u.join("e"), "trusted.overlay.whiteout", b"y");
    wfile(w.join("work/#lfs.9.9"), "junk");
    let mnt = d.path().join("m");
    let before = snapshot(&layerfs_stack(&[&l], Some((&u, &w)), &mnt, &[]).path);
    // The mount cleaned the work dir itself; plant the leftover again.
    wfile(w.join("work/#lfs.9.9"), "junk");
    let args = [
        "--lower",
        l.to_str().unwrap(),
        "--work",
        w.to_str().unwrap(),
    ];
    let (code, out) = fsck(&[&u], &args);
    assert_eq!(code, 1);
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("upper/") || l.starts_with("work/"))
            .count(),
        6,
        "{out}"
    );
    let mut rep = args.to_vec();
    rep.push("--repair");
    assert_eq!(fsck(&[&u], &rep).0, 0);
    let after = snapshot(&layerfs_stack(&[&l], Some((&u, &w)), &mnt, &[]).path);
    assert_same(&before, &after, "view after repair");
    let w2 = d.path().join("w2");
    let k = kernel(&[&l], Some((&u, &w2)), &d.path().join("km"), "");
    assert_same(&before, &snapshot(&k.path), "kernel view after repair");
}

#[test]
fn userxattr_whiteouts_are_understood() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (l, u) = (d.path().join("l"), d.path().join("u"));
    wfile(l.join("d/gone"), "g");
    mkdirp(u.join("d"));
    setxattr(u.join("d"), "user.overlay.opaque", b"x");
    for name in ["gone", "nothing"] {
        wfile(u.join("d").join(name), "");
        setxattr(u.join("d").join(name), "user.overlay.whiteout", b"y");
    }
    let out = found_then_repaired(
        &u,
        &["--lower", l.to_str().unwrap()],
        "upper/d/nothing: whiteout of a name no lower layer has",
    );
    assert!(
        !out.contains("upper/d/gone"),
        "a needed whiteout is fine:\n{out}"
    );
    assert!(u.join("d/gone").exists() && !u.join("d/nothing").exists());
}

#[test]
fn whiteouts_below_an_opaque_dir_hide_nothing_even_without_lowers() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let u = d.path().join("u");
    mkdirp(u.join("opq/sub"));
    opaque(u.join("opq"));
    whiteout(u.join("opq/sub/w"));
    mkdirp(u.join("plain"));
    whiteout(u.join("plain/w"));
    let out = found_then_repaired(&u, &[], "upper/opq/sub/w: whiteout of a name no lower");
    assert!(
        !out.contains("upper/plain/w"),
        "unknown without the lowers:\n{out}"
    );
}
