//! `diff`, `commit`, mounts of stored images, interop with skopeo and umoci, and gc.
//!
//! The oracle is the kernel: an upper made by kernel overlayfs over a stored image, seen
//! through a kernel overlay mount, must look exactly like the committed image seen through
//! `layerfs mount --image`, through a kernel overlay of the stored layer directories, and
//! through `umoci unpack` of the image copied out by skopeo.

mod store_common;

use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;

use store_common::*;

fn diff_id_hex(out: &str) -> String {
    out.lines()
        .next()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_string()
}

/// Make an upper with kernel overlayfs over `lowers`, applying `script` in the merged view.
/// Returns the merged view's snapshot.
fn make_upper(env: &Env, lowers: &[PathBuf], script: &str) -> Vec<String> {
    let (u, w) = (env.path("upper"), env.path("work"));
    fs::create_dir_all(&u).unwrap();
    fs::create_dir_all(&w).unwrap();
    let m = Overlay::mount(lowers, Some((&u, &w)), &env.path("merged"));
    sh(&format!("cd {}\n{script}", m.0.display()));
    snapshot(&m.0)
}

const CHANGES: &str = r#"
printf 'changed\n' > etc/motd
rm etc/passwd
rm -r gone-dir
rm -r opaque-later && mkdir opaque-later && printf 'new\n' > opaque-later/new
mkdir -p newdir/sub && printf 'n' > newdir/sub/file
ln etc/motd etc/motd-hardlink
chmod 0700 usr/bin/tool
chown 99:98 var/lib/data/file
setfattr -n user.added -v 1 var/lib/data/file
setfattr -x user.note etc/motd || true
rm var/null
mknod var/zero c 1 5
ln -s newdir/sub link-to-sub
touch -d '2010-01-01 00:00:00' newdir/sub/file
rm deep/a/b/c/leaf
"#;

#[test]
fn diff_is_reproducible_and_round_trips() {
    if !root() {
        return;
    }
    let env = Env::new();
    let base = env.path("base");
    fs::create_dir_all(&base).unwrap();
    base_tree(&base);
    // Kernel whiteouts (shared inode, nlink 2) and opaque dirs in the upper too.
    make_upper(&env, std::slice::from_ref(&base), CHANGES);
    let upper = env.path("upper");
    let t1 = env.path("t1.tar");
    let id1 = env.ok(&["diff", upper.to_str().unwrap(), "-o", t1.to_str().unwrap()]);
    assert_eq!(id1.trim(), format!("sha256:{}", hash_file(&t1)));
    let t2 = env.path("t2.tar");
    env.ok(&["diff", upper.to_str().unwrap(), "-o", t2.to_str().unwrap()]);
    assert_eq!(fs::read(&t1).unwrap(), fs::read(&t2).unwrap(), "diff twice");
    let copy = env.path("copy");
    sh(&format!("cp -a {} {}", upper.display(), copy.display()));
    let t3 = env.path("t3.tar");
    env.ok(&["diff", copy.to_str().unwrap(), "-o", t3.to_str().unwrap()]);
    assert_eq!(
        fs::read(&t1).unwrap(),
        fs::read(&t3).unwrap(),
        "diff of a cp -a copy"
    );
    // Without -o only the digest; compressed outputs are reproducible too.
    assert_eq!(env.ok(&["diff", upper.to_str().unwrap()]), id1);
    for c in ["gzip", "zstd"] {
        let a = env.ok(&["diff", upper.to_str().unwrap(), "--compression", c]);
        let b = env.ok(&["diff", copy.to_str().unwrap(), "--compression", c]);
        assert_eq!(a, b);
        assert_eq!(a.lines().next().unwrap(), id1.trim());
        assert_eq!(a.lines().count(), 2);
    }
    // The canonical tar round-trips: import it, diff the layer directory, same bytes.
    let imported = env.ok(&["import", t1.to_str().unwrap()]);
    assert_eq!(imported, id1);
    let layer = env.store().join("layers").join(diff_id_hex(&id1));
    let t4 = env.path("t4.tar");
    env.ok(&["diff", layer.to_str().unwrap(), "-o", t4.to_str().unwrap()]);
    assert_eq!(fs::read(&t1).unwrap(), fs::read(&t4).unwrap(), "round trip");
    // The same for the base tree (devices, fifos, long and non-UTF-8 names, setuid).
    let b1 = env.path("b1.tar");
    let bid = env.ok(&["diff", base.to_str().unwrap(), "-o", b1.to_str().unwrap()]);
    env.ok(&["import", b1.to_str().unwrap()]);
    let blayer = env.store().join("layers").join(diff_id_hex(&bid));
    assert_eq!(env.ok(&["diff", blayer.to_str().unwrap()]), bid);
    assert_same(&snapshot(&base), &snapshot(&blayer), "base vs its layer");
    // The tar lists what GNU tar expects, in canonical order.
    let listing = sh(&format!("tar -tf {}", t1.display()));
    let names: Vec<&str> = listing.lines().collect();
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert!(pos("etc/") < pos("etc/.wh.passwd"));
    assert!(pos("etc/.wh.passwd") < pos("etc/motd"));
    assert!(pos("opaque-later/") + 1 == pos("opaque-later/.wh..wh..opq"));
    assert!(names.contains(&".wh.gone-dir"));
    // --source-date-epoch clamps every mtime.
    let out = env.path("sde.tar");
    env.ok(&[
        "diff",
        upper.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--source-date-epoch",
        "1000000000",
    ]);
    let verbose = sh(&format!(
        "TZ=UTC tar -tvf {} | grep -v ' 1970-01-01 '",
        out.display()
    ));
    assert!(
        verbose.lines().all(|l| l.contains("2001-09-09")),
        "{verbose}"
    );
}

#[test]
fn commit_then_mount_shows_the_same_tree() {
    if !root() || !have("skopeo") || !have("umoci") {
        return;
    }
    let env = Env::new();
    let base = env.path("base");
    fs::create_dir_all(&base).unwrap();
    base_tree(&base);
    let btar = env.path("base.tar");
    let bid = env.ok(&["diff", base.to_str().unwrap(), "-o", btar.to_str().unwrap()]);
    env.ok(&["import", btar.to_str().unwrap(), "--name", "base"]);
    let blayer = env.store().join("layers").join(diff_id_hex(&bid));
    let merged = make_upper(&env, std::slice::from_ref(&blayer), CHANGES);

    let upper = env.path("upper");
    let id = env.ok(&[
        "commit",
        upper.to_str().unwrap(),
        "--from",
        "base",
        "--name",
        "new:1",
        "--message",
        "my change",
    ]);
    assert_eq!(id, env.ok(&["diff", upper.to_str().unwrap()]));
    let history = env.ok(&["history", "new:1"]);
    assert!(history.contains("my change"), "{history}");
    assert_eq!(history.lines().count(), 3, "{history}");
    let hjson = env.ok(&["history", "new:1", "--json"]);
    assert!(hjson.contains(id.trim()), "{hjson}");

    // layerfs mount of the committed image.
    let m = LayerfsMount::mount(&env, &["--image", "new:1"], &env.path("m1"));
    assert_same(&merged, &snapshot(&m.0), "layerfs mount --image");
    drop(m);
    // The same with a fresh container on top (created on first use).
    let m = LayerfsMount::mount(
        &env,
        &["--image", "new:1", "--container", "c2"],
        &env.path("m2"),
    );
    assert_same(
        &merged,
        &snapshot(&m.0),
        "layerfs mount --image --container",
    );
    drop(m);
    assert!(env.store().join("containers/c2/upper").is_dir());
    assert!(env.store().join("containers/c2/work").is_dir());
    // Reusing it with another image is refused.
    let mnt3 = env.path("m3");
    fs::create_dir_all(&mnt3).unwrap();
    env.fails(
        &[
            "mount",
            "--image",
            "base",
            "--container",
            "c2",
            mnt3.to_str().unwrap(),
        ],
        "created from",
    );
    // The kernel reads the stored layer directories the same way.
    let nlayer = env.store().join("layers").join(diff_id_hex(&id));
    let k = Overlay::mount(&[nlayer, blayer], None, &env.path("k"));
    assert_same(
        &merged,
        &snapshot(&k.0),
        "kernel overlay of the stored layers",
    );
    drop(k);

    // skopeo reads the store as an OCI layout; umoci unpacks the copy to the same tree.
    let store = env.store().display().to_string();
    let other = env.path("other").display().to_string();
    sh(&format!(
        "skopeo copy --quiet oci:{store}:new:1 oci:{other}:new"
    ));
    sh(&format!(
        "cd {} && umoci unpack --image {other}:new bundle",
        env.dir.path().display()
    ));
    assert_same(
        &merged,
        &snapshot(&env.path("bundle/rootfs")),
        "umoci unpack",
    );
    // umoci unpack reads the store directly too.
    sh(&format!(
        "cd {} && umoci unpack --image {store}:new:1 bundle2",
        env.dir.path().display()
    ));
    assert_same(
        &merged,
        &snapshot(&env.path("bundle2/rootfs")),
        "umoci unpack of the store",
    );

    // A layer from `layerfs diff`, added by umoci onto the parent, gives the same tree.
    let ltar = env.path("layer.tar");
    env.ok(&[
        "diff",
        upper.to_str().unwrap(),
        "-o",
        ltar.to_str().unwrap(),
    ]);
    sh(&format!(
        "cd {d} && skopeo copy --quiet oci:{store}:base oci:{d}/raw:base && \
         umoci raw add-layer --image {d}/raw:base --tag added {l} && \
         umoci unpack --image {d}/raw:added bundle3",
        d = env.dir.path().display(),
        l = ltar.display()
    ));
    assert_same(
        &merged,
        &snapshot(&env.path("bundle3/rootfs")),
        "umoci raw add-layer",
    );

    // And the skopeo copy imports back, with the same layers.
    let env2 = Env::new();
    env2.ok(&["import", "--oci", &format!("{other}:new"), "--name", "back"]);
    let a = env.ok(&["images", "--json"]);
    let b = env2.ok(&["images", "--json"]);
    let layers_of = |j: &str, name: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(j).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()["layers"]
            .clone()
    };
    assert_eq!(layers_of(&a, "new:1"), layers_of(&b, "back"));
    let m = LayerfsMount::mount(&env2, &["--image", "back"], &env2.path("m"));
    assert_same(&merged, &snapshot(&m.0), "mount of the re-imported image");
    drop(m);
    // Importing the same layout again stores nothing new.
    let before = env2.store_state();
    env2.ok(&["import", "--oci", &format!("{other}:new"), "--name", "back"]);
    assert_eq!(
        env2.store_state()
            .iter()
            .filter(|l| !l.starts_with("index.json") && !l.starts_with("mounts/"))
            .collect::<Vec<_>>(),
        before
            .iter()
            .filter(|l| !l.starts_with("index.json") && !l.starts_with("mounts/"))
            .collect::<Vec<_>>()
    );
}

/// Layers written by another tool (umoci, Go's archive/tar) import and mount to the tree that
/// tool unpacks. (The second layer's `etc` is touched so umoci lists it: a layer that brings
/// `etc/g` without an `etc/` entry gets an `etc` of mode 0755, mtime 0 in its layer
/// directory, which then shows over the lower `etc`, as with Docker's and containers-storage's
/// overlay drivers, where it gets the time of extraction.)
#[test]
fn layers_made_by_umoci_import_and_mount() {
    if !root() || !have("umoci") {
        return;
    }
    let env = Env::new();
    let d = env.dir.path().display().to_string();
    sh(&format!(
        "cd {d} && umoci init --layout lay && umoci new --image lay:t && \
         umoci unpack --image lay:t b && \
         mkdir -p b/rootfs/etc b/rootfs/opt && printf 'umoci\\n' > b/rootfs/etc/f && \
         ln -s etc/f b/rootfs/l && mkfifo b/rootfs/opt/p && \
         umoci repack --image lay:t b && rm -rf b && \
         umoci unpack --image lay:t b2 && rm -r b2/rootfs/opt && printf 'x' > b2/rootfs/etc/g && \
         touch -d '2000-01-01' b2/rootfs/etc && \
         umoci repack --image lay:t b2 && rm -rf b2 && umoci unpack --image lay:t b3"
    ));
    let ids = env.ok(&["import", "--oci", &format!("{d}/lay:t")]);
    assert_eq!(ids.lines().count(), 2, "{ids}");
    let m = LayerfsMount::mount(&env, &["--image", "t"], &env.path("m"));
    assert_same(
        &snapshot(&env.path("b3/rootfs")),
        &snapshot(&m.0),
        "umoci layers",
    );
}

#[test]
fn containers_commit_rm_and_gc() {
    if !root() {
        return;
    }
    let env = Env::new();
    let base = env.path("base");
    fs::create_dir_all(&base).unwrap();
    base_tree(&base);
    let btar = env.path("base.tar");
    let bid = env.ok(&["diff", base.to_str().unwrap(), "-o", btar.to_str().unwrap()]);
    env.ok(&["import", btar.to_str().unwrap(), "--name", "base"]);
    // A container's upper, written directly (in overlay format) while unmounted.
    let m = LayerfsMount::mount(
        &env,
        &["--image", "base", "--container", "c1"],
        &env.path("m"),
    );
    drop(m);
    let upper = env.store().join("containers/c1/upper");
    fs::write(upper.join("added"), b"from c1").unwrap();
    layerfs::sys::mknod_at(
        std::os::fd::AsFd::as_fd(&layerfs::sys::open_dir_path(&upper).unwrap()),
        b"dangling",
        layerfs::sys::S_IFCHR,
        0,
    )
    .unwrap();
    let id = env.ok(&[
        "commit",
        "--container",
        "c1",
        "--from",
        "base",
        "--name",
        "c1img",
    ]);
    let m = LayerfsMount::mount(&env, &["--image", "c1img"], &env.path("m2"));
    assert_eq!(fs::read(m.0.join("added")).unwrap(), b"from c1");
    assert!(!m.0.join("dangling").exists());
    drop(m);
    // From scratch: a one-layer image.
    let solo = env.path("solo");
    fs::create_dir_all(&solo).unwrap();
    fs::write(solo.join("only"), b"1").unwrap();
    env.ok(&[
        "commit",
        solo.to_str().unwrap(),
        "--from",
        "scratch",
        "--name",
        "solo",
    ]);
    let h = env.ok(&["history", "solo", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&h)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let layers = |env: &Env| fs::read_dir(env.store().join("layers")).unwrap().count();
    assert_eq!(layers(&env), 3);
    // Nothing unused: gc removes nothing.
    let gc = env.ok(&["gc"]);
    assert!(gc.starts_with("removed 0 blobs, 0 layers"), "{gc}");
    // rm + gc frees the solo image.
    assert_eq!(env.ok(&["rm", "solo"]), "untagged: solo\n");
    env.fails(&["history", "solo"], "no image");
    let gc = env.ok(&["gc"]);
    assert!(gc.contains("1 layers"), "{gc}");
    assert_eq!(layers(&env), 2);
    // The base image's layer stays while container c1 (made from it) exists, even with no
    // image naming it.
    env.ok(&["rm", "base"]);
    env.ok(&["rm", "c1img"]);
    env.ok(&["gc"]);
    assert!(env.store().join("layers").join(diff_id_hex(&bid)).is_dir());
    assert_eq!(layers(&env), 1);
    // A live mount keeps its layers even when its image is removed.
    env.ok(&["import", btar.to_str().unwrap(), "--name", "again"]);
    let ctar = env.path("c.tar");
    let upper2 = env.path("u2");
    fs::create_dir_all(&upper2).unwrap();
    fs::write(upper2.join("x"), b"x").unwrap();
    env.ok(&[
        "diff",
        upper2.to_str().unwrap(),
        "-o",
        ctar.to_str().unwrap(),
    ]);
    let cid = env.ok(&[
        "import",
        ctar.to_str().unwrap(),
        "--name",
        "top",
        "--parent",
        "again",
    ]);
    let m = LayerfsMount::mount(&env, &["--image", "top"], &env.path("m3"));
    env.ok(&["rm", "top"]);
    env.ok(&["gc"]);
    let clayer = env.store().join("layers").join(diff_id_hex(&cid));
    assert!(clayer.is_dir(), "gc removed a mounted layer");
    assert_eq!(fs::read(m.0.join("x")).unwrap(), b"x");
    unmount_and_wait(&env, m);
    let gc = env.ok(&["gc"]);
    assert!(!clayer.exists(), "{gc}");
    assert!(gc.contains("1 stale mount leases"), "{gc}");
    // Listings.
    let images = env.ok(&["images"]);
    assert!(images.starts_with("NAME"), "{images}");
    assert!(images.contains("again"), "{images}");
    let ls = env.ok(&["layers"]);
    assert!(ls.contains(&diff_id_hex(&bid)[..12]), "{ls}");
    let _ = id;
}

/// Unmount with `layerfs umount`, which returns only once the mount daemon has let go of its
/// store lease, so the next command must find the mount gone. Retried while busy: another
/// test thread's forked child may hold a copy of a descriptor into the mount until it execs.
fn unmount_and_wait(env: &Env, m: LayerfsMount) {
    let mnt = m.0.clone();
    // Unmounted here, not by the drop.
    std::mem::forget(m);
    for _ in 0..100 {
        let out = env.layerfs(&[OsStr::new("umount"), mnt.as_os_str()], None);
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("busy"), "layerfs umount failed: {err}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} stayed busy", mnt.display());
}

#[test]
fn failed_commands_leave_no_trace() {
    if !root() {
        return;
    }
    let env = Env::new();
    let tar = RawTar::default().file("f", b"x").finish();
    let out = env.import_bytes(&tar, &["--name", "base"]);
    assert!(out.status.success(), "{out:?}");
    let before = env.store_state();
    let upper = env.path("upper");
    fs::create_dir_all(upper.join("d")).unwrap();
    fs::write(upper.join("d/ok"), b"fine").unwrap();
    // A real file named like a whiteout cannot be stored: the commit fails as a whole,
    // whether the walk or the extraction notices first.
    fs::write(upper.join("d/.wh.trap"), b"").unwrap();
    let u = upper.to_str().unwrap();
    env.fails(
        &["commit", u, "--from", "base", "--name", "n"],
        "cannot be stored in a layer",
    );
    env.fails(&["diff", u], "cannot be stored in a layer");
    fs::remove_file(upper.join("d/.wh.trap")).unwrap();
    env.fails(&["commit", u, "--from", "nope", "--name", "n"], "no image");
    env.fails(
        &["commit", u, "--from", "base", "--name", "a b"],
        "bad image name",
    );
    env.fails(
        &[
            "commit",
            "--container",
            "none",
            "--from",
            "base",
            "--name",
            "n",
        ],
        "no container",
    );
    env.fails(&["diff", env.path("missing").to_str().unwrap()], "missing");
    let o = env.import_bytes(&tar, &["--name", "x", "--parent", "nope"]);
    expect_failure(o, "no image");
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    env.fails(
        &[
            "mount",
            "--image",
            "base",
            "--container",
            "../x",
            mnt.to_str().unwrap(),
        ],
        "bad container name",
    );
    env.fails(
        &["mount", "--image", "nope", mnt.to_str().unwrap()],
        "no image",
    );
    env.fails(&["rm", "nope"], "no image");
    assert_eq!(env.store_state(), before);
    // And the good commit still works afterwards.
    env.ok(&[
        "commit",
        u,
        "--from",
        "base",
        "--name",
        "n",
        "--compression",
        "zstd",
    ]);
    let m = LayerfsMount::mount(&env, &["--image", "n"], &env.path("m"));
    assert_eq!(fs::read(m.0.join("d/ok")).unwrap(), b"fine");
    assert_eq!(fs::read(m.0.join("f")).unwrap(), b"x");
}

#[test]
fn rm_container_refuses_while_mounted_then_frees_its_layers() {
    if !root() {
        return;
    }
    let env = Env::new();
    let base = env.path("base");
    fs::create_dir_all(&base).unwrap();
    base_tree(&base);
    let btar = env.path("base.tar");
    let bid = env.ok(&["diff", base.to_str().unwrap(), "-o", btar.to_str().unwrap()]);
    env.ok(&["import", btar.to_str().unwrap(), "--name", "base"]);
    let m = LayerfsMount::mount(
        &env,
        &["--image", "base", "--container", "c1"],
        &env.path("m"),
    );
    fs::write(m.0.join("made-in-c1"), b"x").unwrap();
    env.fails(&["rm", "--container", "c1"], "is mounted");
    assert!(env.store().join("containers/c1/upper/made-in-c1").exists());
    unmount_and_wait(&env, m);
    env.fails(&["rm", "--container", "nope"], "no container");
    env.fails(&["rm", "--container", "../x"], "bad container name");
    let out = env.ok(&["rm", "--container", "c1"]);
    assert!(out.starts_with("removed container c1"), "{out}");
    assert!(!env.store().join("containers/c1").exists());
    // With the image gone too, nothing keeps the layer.
    env.ok(&["rm", "base"]);
    env.ok(&["gc"]);
    assert!(!env.store().join("layers").join(diff_id_hex(&bid)).exists());
}

#[test]
fn rm_container_right_after_a_plain_umount() {
    if !root() {
        return;
    }
    let env = Env::new();
    let base = env.path("base");
    fs::create_dir_all(&base).unwrap();
    fs::write(base.join("f"), b"base").unwrap();
    let btar = env.path("base.tar");
    env.ok(&["diff", base.to_str().unwrap(), "-o", btar.to_str().unwrap()]);
    env.ok(&["import", btar.to_str().unwrap(), "--name", "base"]);
    for round in 0..5 {
        let container = format!("c{round}");
        let m = LayerfsMount::mount(
            &env,
            &["--image", "base", "--container", &container],
            &env.path("m"),
        );
        fs::write(m.0.join("f"), b"changed").unwrap();
        let mnt = m.0.clone();
        // Unmounted here with umount(2), as `umount` and podman do, not by the drop.
        std::mem::forget(m);
        unmount_retrying(&mnt);
        // The daemon may still be exiting, its lease held: rm waits for it.
        let out = env.ok(&["rm", "--container", &container]);
        assert!(out.starts_with("removed container"), "{out}");
    }
}

/// `layerfs fsck --store` with the exit code and stdout.
fn fsck_store(env: &Env, repair: bool) -> (i32, String) {
    let mut args = vec![
        std::ffi::OsStr::new("fsck"),
        std::ffi::OsStr::new("--store"),
    ];
    if repair {
        args.push(std::ffi::OsStr::new("--repair"));
    }
    let out = env.layerfs(&args, None);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn fsck_store_finds_and_repairs_damage() {
    if !root() {
        return;
    }
    let env = Env::new();
    let mk = |name: &str, file: &str| {
        let dir = env.path(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(file), name.as_bytes()).unwrap();
        let tar = env.path(&format!("{name}.tar"));
        let id = env.ok(&["diff", dir.to_str().unwrap(), "-o", tar.to_str().unwrap()]);
        env.ok(&["import", tar.to_str().unwrap(), "--name", name]);
        diff_id_hex(&id)
    };
    let a = mk("imga", "a");
    let b = mk("imgb", "b");
    assert_eq!(fsck_store(&env, false).0, 0, "a fresh store is clean");
    // Planted: imga's layer blob vanishes; imgb's layer directory vanishes; leftovers of a
    // killed command and a dead mount.
    let blob = env.store().join("blobs/sha256").join(&a);
    assert!(
        blob.exists(),
        "uncompressed import stores the tar under its diffID"
    );
    fs::remove_file(&blob).unwrap();
    fs::remove_dir_all(env.store().join("layers").join(&b)).unwrap();
    fs::create_dir_all(env.store().join("tmp/killed-import")).unwrap();
    fs::write(env.store().join("mounts/dead.json"), b"{}").unwrap();
    let (code, out) = fsck_store(&env, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("imga: image cannot be used"), "{out}");
    assert!(
        out.contains(&format!("layers/{b}: layer is not extracted")),
        "{out}"
    );
    assert!(out.contains("tmp/killed-import: left by"), "{out}");
    assert!(out.contains("mounts/dead.json: left by"), "{out}");
    // Repair drops the unusable image and the leftovers; the missing layer dir stays reported.
    let (code, out) = fsck_store(&env, true);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("imga: image cannot be used") && out.contains("[repaired]"),
        "{out}"
    );
    env.fails(&["history", "imga"], "no image");
    assert!(!env.store().join("tmp/killed-import").exists());
    assert!(!env.store().join("mounts/dead.json").exists());
    let (_, out) = fsck_store(&env, false);
    assert!(!out.contains("imga"), "{out}");
    assert!(out.contains(&format!("layers/{b}")), "{out}");
    // Re-importing restores the layer directory: clean again.
    env.ok(&[
        "import",
        env.path("imgb.tar").to_str().unwrap(),
        "--name",
        "imgb",
    ]);
    let (code, out) = fsck_store(&env, false);
    assert_eq!(code, 0, "re-import restores the layer: {out}");
}

#[test]
fn killed_commits_and_imports_leave_a_store_fsck_can_clean() {
    if !root() {
        return;
    }
    let env = Env::new();
    let base = env.path("base");
    fs::create_dir_all(&base).unwrap();
    fs::write(base.join("b"), b"b").unwrap();
    let btar = env.path("base.tar");
    env.ok(&["diff", base.to_str().unwrap(), "-o", btar.to_str().unwrap()]);
    env.ok(&["import", btar.to_str().unwrap(), "--name", "base"]);
    // An upper big enough that a commit takes a while: 96 MiB in 96 files.
    let upper = env.path("upper");
    fs::create_dir_all(&upper).unwrap();
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for i in 0..96 {
        fs::write(upper.join(format!("f{i:02}")), &block).unwrap();
    }
    let utar = env.path("upper.tar");
    env.ok(&[
        "diff",
        upper.to_str().unwrap(),
        "-o",
        utar.to_str().unwrap(),
    ]);
    for (round, delay_ms) in [5u64, 40, 120, 300].into_iter().enumerate() {
        for what in ["commit", "import"] {
            let name = format!("{what}{round}");
            let mut cmd = std::process::Command::new(bin());
            cmd.arg("--root").arg(env.store()).arg("-q");
            if what == "commit" {
                cmd.args([
                    "commit",
                    upper.to_str().unwrap(),
                    "--from",
                    "base",
                    "--name",
                    &name,
                ]);
            } else {
                cmd.args([
                    "import",
                    utar.to_str().unwrap(),
                    "--parent",
                    "base",
                    "--name",
                    &name,
                ]);
            }
            let mut child = cmd
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            let _ = child.kill();
            let _ = child.wait();
            // Whatever the moment: every image the index names is complete.
            let (code, out) = fsck_store(&env, true);
            assert!(
                !out.contains("image cannot be used"),
                "{what} killed at {delay_ms} ms: {out}"
            );
            assert!(
                !out.contains("not extracted"),
                "{what} killed at {delay_ms} ms: {out}"
            );
            let _ = code;
            assert_eq!(
                fsck_store(&env, false).0,
                0,
                "clean after repair ({what}, {delay_ms} ms)"
            );
        }
    }
}
