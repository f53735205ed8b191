//! Id mapping (`uidmapping=`/`gidmapping=`) with the kernel as the oracle: the same operations,
//! by the same callers, on a layerfs mount with a mapping and on kernel overlayfs over idmapped
//! layers (its lower and upper bind-mounted with the same mapping) must show the same owners,
//! store the same owners, xattrs and modes in the upper, and fail with the same errors.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Ids 0.. on disk are shown as 100000..; the id shown as 0 (root, who mounts and runs the
/// fixtures) is stored as 200000, so that kernel overlayfs can make its work directory.
const MAP: &str = "0:100000:65536:200000:0:1";

/// A v2 file capability (cap_net_raw permitted and effective): "the root of the filesystem".
const CAP_V2: &str = "0x0100000200200000000000000000000000000000";
/// The same as v3 for root uid 1000 as shown (not covered by the mapping).
const CAP_V3_UNMAPPED_ROOT: &str = "0x0100000300200000000000000000000000000000e8030000";

/// A POSIX ACL xattr: user::rw-, user:ID:r--, group::r--, group:GID:r--, mask::r--, other::---.
fn acl_hex(uid: u32, gid: u32) -> String {
    let mut v: Vec<u8> = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, uid),
        (0x04, 4, u32::MAX),
        (0x08, 4, gid),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
    format!("0x{hex}")
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("chown fixture");
}

fn setfattr(p: &Path, name: &str, hex: &str) {
    run(Command::new("setfattr")
        .args(["-n", name, "-v", hex])
        .arg(p));
}

/// The lower layer, made by root on the raw disk.
fn make_lower(l: &Path) {
    mkdirp(l.join("pub"));
    chmod(l.join("pub"), 0o1777);
    mkdirp(l.join("sgid"));
    chown(&l.join("sgid"), 1000, 1000);
    chmod(l.join("sgid"), 0o2777);
    wfile(l.join("f0"), "root's\n");
    wfile(l.join("f1000"), "user's\n");
    chown(&l.join("f1000"), 1000, 1000);
    chmod(l.join("f1000"), 0o640);
    wfile(l.join("f70000"), "nobody's\n");
    chown(&l.join("f70000"), 70000, 70000);
    wfile(l.join("cap"), "");
    setfattr(&l.join("cap"), "security.capability", CAP_V2);
    wfile(l.join("acl"), "");
    setfattr(
        &l.join("acl"),
        "system.posix_acl_access",
        &acl_hex(1000, 1001),
    );
    symlink("f0", l.join("link"));
}

/// `idmapped_mount.py`: a kernel idmapped bind mount of `src` at `dst`.
fn idmapped(src: &Path, dst: &Path) -> Mount {
    mkdirp(dst);
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/idmapped_mount.py");
    run(Command::new("python3")
        .arg(helper)
        .arg(src)
        .arg(dst)
        .arg(MAP));
    Mount {
        path: dst.to_path_buf(),
        daemon: None,
    }
}

/// One step: who runs it, and the shell command, run in the mount's root.
const STEPS: &[(u32, u32, &str)] = &[
    (
        0,
        0,
        "stat -c '%n %u:%g %a' f0 f1000 f70000 pub sgid cap acl link",
    ),
    (0, 0, "ls -ln --time-style=+ . | sed 1d"),
    (100000, 100000, "touch pub/a && mkdir pub/d && mkfifo pub/p"),
    (
        100000,
        100000,
        "ln -s target pub/s && stat -c '%n %u:%g' pub/a pub/d pub/p pub/s",
    ),
    (101000, 101000, "touch pub/b && stat -c '%u:%g' pub/b"),
    // A caller the mapping does not cover cannot own anything: EOVERFLOW.
    (5, 5, "touch pub/c"),
    (5, 5, "mkdir pub/c"),
    (0, 0, "touch rootfile && stat -c '%u:%g' rootfile"),
    // chown stores the mapped id (and copies up); an unmapped id is refused.
    (0, 0, "chown 101000:101001 f0 && stat -c '%u:%g' f0"),
    (0, 0, "chown 5 f1000"),
    (0, 0, "chown :5 f1000"),
    // Copy-up keeps the owner on disk.
    (0, 0, "echo more >>f1000 && stat -c '%u:%g' f1000"),
    // setgid directories hand their group down, and their setgid bit to directories.
    (
        100000,
        100000,
        "touch sgid/n && mkdir sgid/m && stat -c '%n %u:%g %a' sgid/n sgid/m",
    ),
    (0, 0, "ln f1000 pub/hl && stat -c '%u:%g %h' pub/hl"),
    // ACL entries are mapped both ways; an entry for an unmapped id is refused.
    (
        0,
        0,
        "getfattr -e hex -n system.posix_acl_access acl | sed 1d",
    ),
    (
        0,
        0,
        "setfattr -n system.posix_acl_access -v ACL_MAPPED f0 && getfattr -e hex -n system.posix_acl_access f0 | sed 1d",
    ),
    (
        0,
        0,
        "setfattr -n system.posix_acl_access -v ACL_UNMAPPED rootfile",
    ),
    // Capabilities: v2 on disk is shown for the mapped root; a capability set through the
    // mount is stored for the root on disk; a root the mapping does not cover is refused.
    (0, 0, "getfattr -e hex -n security.capability cap | sed 1d"),
    (
        0,
        0,
        "setfattr -n security.capability -v CAP_V2 pub/a && getfattr -e hex -n security.capability pub/a | sed 1d",
    ),
    (
        0,
        0,
        "setfattr -n security.capability -v CAP_V3_UNMAPPED_ROOT pub/b",
    ),
    (
        100000,
        100000,
        "ls -ln --time-style=+ . pub sgid | sed '/^total/d'",
    ),
];

/// Run every step in `root`; one line of outcome per step (its output, or its error).
fn run_steps(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for &(uid, gid, cmd) in STEPS {
        let cmd = cmd
            .replace("ACL_MAPPED", &acl_hex(101000, 101001))
            .replace("ACL_UNMAPPED", &acl_hex(5, 100001))
            .replace("CAP_V3_UNMAPPED_ROOT", CAP_V3_UNMAPPED_ROOT)
            .replace("CAP_V2", CAP_V2);
        let o = Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
            ])
            .args(["sh", "-c", &cmd])
            .current_dir(root)
            .output()
            .expect("setpriv");
        let result = if o.status.success() {
            String::from_utf8_lossy(&o.stdout).into_owned()
        } else {
            // The reason only: "touch: cannot touch 'pub/c': Value too large ..." -> the text
            // after the last ": ".
            let err = String::from_utf8_lossy(&o.stderr);
            let reason = err.trim_end().rsplit(": ").next().unwrap_or("").to_string();
            format!("FAILED: {reason}")
        };
        out.push(format!("[{uid}:{gid}] {cmd}\n{result}"));
    }
    out
}

/// What the upper holds: per path, owner, mode, and the xattrs ids live in.
fn upper_state(upper: &Path) -> BTreeMap<PathBuf, String> {
    let mut state = BTreeMap::new();
    let mut todo = vec![upper.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).expect("read upper") {
            let p = e.expect("entry").path();
            let st = fs::symlink_metadata(&p).expect("lstat");
            let mut line = format!("{}:{} {:o}", st.uid(), st.gid(), st.mode());
            for name in ["security.capability", "system.posix_acl_access"] {
                if !st.file_type().is_symlink()
                    && let Some(v) = getxattr(&p, name)
                {
                    let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
                    line.push_str(&format!(" {name}={hex}"));
                }
            }
            if st.is_dir() {
                todo.push(p.clone());
            }
            state.insert(
                p.strip_prefix(upper).expect("under upper").to_path_buf(),
                line,
            );
        }
    }
    state
}

#[test]
fn id_mapping_matches_kernel_overlayfs_over_idmapped_layers() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path();
    // Other users must reach the mounts.
    chmod(base, 0o755);

    // The kernel: lower and upper+work each bind-mounted with the mapping.
    let k = base.join("k");
    make_lower(&k.join("lower"));
    mkdirp(k.join("uw/upper"));
    mkdirp(k.join("uw/work"));
    let _kl = idmapped(&k.join("lower"), &k.join("ilower"));
    let _ku = idmapped(&k.join("uw"), &k.join("iuw"));
    let kmnt = kernel(
        &[&k.join("ilower")],
        Some((&k.join("iuw/upper"), &k.join("iuw/work"))),
        &k.join("mnt"),
        "",
    );
    assert!(
        !mount_options(&kmnt.path).split(',').any(|o| o == "ro"),
        "kernel overlayfs over idmapped layers mounted read-only (see dmesg)"
    );

    let l = base.join("l");
    make_lower(&l.join("lower"));
    let opts = format!("uidmapping={MAP},gidmapping={MAP}");
    let lmnt = layerfs_stack(
        &[&l.join("lower")],
        Some((&l.join("upper"), &l.join("work"))),
        &l.join("mnt"),
        &[&opts],
    );

    let want = run_steps(&kmnt.path);
    let got = run_steps(&lmnt.path);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "layerfs (left) and the kernel (right) differ");
    }
    // Not a test that cannot fail: the steps did reach the mapping.
    assert!(want[0].contains("f0 100000:100000"), "{}", want[0]);
    assert!(want[5].contains("FAILED: Value too large"), "{}", want[5]);

    assert_eq!(
        upper_state(&l.join("upper")),
        upper_state(&k.join("uw/upper")),
        "the uppers differ (left: layerfs)"
    );

    // One deliberate difference: kernel overlayfs cannot copy up an object whose owner the
    // upper's idmap does not cover (EOVERFLOW, whoever asks). layerfs's upper is not an
    // idmapped mount, so root may still give such a file a mapped owner, as with
    // fuse-overlayfs.
    let o = Command::new("chown")
        .arg("100007:100008")
        .arg(lmnt.p("f70000"))
        .output()
        .expect("chown");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = fs::metadata(l.join("upper/f70000")).expect("copied up");
    assert_eq!((st.uid(), st.gid()), (7, 8));
}

#[test]
fn a_capability_for_an_unmapped_root_is_hidden() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let lower = d.path().join("lower");
    mkdirp(&lower);
    wfile(lower.join("tool"), "#!/bin/sh\necho ran\n");
    chmod(lower.join("tool"), 0o755);
    // v3 capability for the root of a namespace whose root is uid 70000 on disk.
    setfattr(
        &lower.join("tool"),
        "security.capability",
        "0x010000030020000000000000000000000000000070110100",
    );
    let mnt = layerfs_stack(
        &[&lower],
        None,
        &d.path().join("mnt"),
        &[&format!("uidmapping={MAP},gidmapping={MAP}")],
    );
    // The kernel's getxattr over an idmapped layer says EOVERFLOW, but its exec path treats
    // the capability as absent; over FUSE exec asks us, so absent is the answer for both.
    assert_eq!(getxattr(mnt.p("tool"), "security.capability"), None);
    let out = Command::new(mnt.p("tool")).output().expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n");
}
