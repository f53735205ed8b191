//! `layerfs import`: compression sniffing, deduplication, and every hostile-tar case of the
//! issue. Each hostile case checks the one-line error (or the documented outcome), that nothing
//! outside the layer was touched, and that a failed import left the store as it was.

mod store_common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use store_common::*;

/// A small valid layer.
fn simple_layer() -> Vec<u8> {
    RawTar::default()
        .dir("etc/")
        .file("etc/hello", b"hello\n")
        .symlink("etc/link", "hello")
        .hardlink("etc/hard", "etc/hello")
        .finish()
}

fn layer_dir(env: &Env, diff_id: &str) -> std::path::PathBuf {
    env.store()
        .join("layers")
        .join(diff_id.trim().strip_prefix("sha256:").unwrap())
}

#[test]
fn sniffs_plain_gzip_zstd_and_stores_once() {
    if !root() {
        return;
    }
    let env = Env::new();
    let tar = simple_layer();
    let mut ids = Vec::new();
    for data in [tar.clone(), gzip(&tar), zstd(&tar)] {
        let out = env.import_bytes(&data, &[]);
        assert!(out.status.success(), "{out:?}");
        ids.push(String::from_utf8(out.stdout).unwrap());
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
    let want = format!("sha256:{}\n", hash_bytes(&tar));
    assert_eq!(
        ids[0], want,
        "the diffID is the sha256 of the uncompressed tar"
    );
    assert_eq!(fs::read_dir(env.store().join("layers")).unwrap().count(), 1);
    let dir = layer_dir(&env, &ids[0]);
    assert_eq!(fs::read(dir.join("etc/hello")).unwrap(), b"hello\n");
    assert_eq!(
        fs::metadata(dir.join("etc/hard")).unwrap().ino(),
        fs::metadata(dir.join("etc/hello")).unwrap().ino()
    );
    // Three blobs (one per compression), one layer, nothing staged.
    assert_eq!(
        fs::read_dir(env.store().join("blobs/sha256"))
            .unwrap()
            .count(),
        3
    );
    assert_eq!(fs::read_dir(env.store().join("tmp")).unwrap().count(), 0);
    // From a file too, with a name.
    let f = env.path("l.tar.gz");
    fs::write(&f, gzip(&tar)).unwrap();
    let id = env.ok(&["import", f.to_str().unwrap(), "--name", "one"]);
    assert_eq!(id, ids[0]);
    let images = env.ok(&["images", "--json"]);
    assert!(images.contains("\"one\""), "{images}");
    // bzip2 is recognised and refused.
    let out = env.import_bytes(b"BZh91AY&SY", &[]);
    expect_failure(out, "bzip2");
}

fn hash_bytes(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Import `tar`, expect a one-line error containing `want`, and an unchanged store and
/// untouched `outside` directory.
fn refused(tar: &[u8], want: &str) {
    refused_with(|_| tar.to_vec(), want)
}

/// Like [`refused`], the tar built knowing the path of the outside directory.
fn refused_with(build: impl Fn(&str) -> Vec<u8>, want: &str) {
    let env = Env::new();
    env.ok(&["images"]);
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("sentinel"), b"keep").unwrap();
    let before = env.store_state();
    let tar = build(outside.to_str().unwrap());
    expect_failure(env.import_bytes(&tar, &["--name", "x"]), want);
    assert_eq!(env.store_state(), before, "a failed import left a trace");
    let after: Vec<_> = fs::read_dir(&outside).unwrap().collect();
    assert_eq!(after.len(), 1, "something was created outside the layer");
    assert_eq!(fs::read(outside.join("sentinel")).unwrap(), b"keep");
}

#[test]
fn refuses_absolute_paths_and_dotdot() {
    if !root() {
        return;
    }
    refused(
        &RawTar::default().file("/tmp/abs-escape", b"x").finish(),
        "absolute path",
    );
    refused(
        &RawTar::default()
            .file("ok", b"x")
            .file("a/../../escape", b"x")
            .finish(),
        "'..' component",
    );
    // The same through a PAX path record and a GNU long name.
    refused(
        &RawTar::default()
            .pax(&[(b"path", b"../../pax-escape")])
            .file("harmless", b"x")
            .finish(),
        "'..' component",
    );
    let mut gnu = RawTar::default();
    gnu.entry(b"././@LongLink", b'L', b"../gnu-escape\0", b"")
        .file("harmless", b"x");
    refused(&gnu.finish(), "'..' component");
}

#[test]
fn refuses_writing_through_a_symlink() {
    if !root() {
        return;
    }
    refused_with(
        |out| {
            RawTar::default()
                .symlink("l", out)
                .file("l/evil", b"x")
                .finish()
        },
        "refusing to write through it",
    );
    refused_with(
        |out| {
            RawTar::default()
                .symlink("l", &format!("../../../../../..{out}"))
                .dir("l/sub/")
                .finish()
        },
        "refusing to write through it",
    );
}

#[test]
fn refuses_bad_hard_links() {
    if !root() {
        return;
    }
    refused(
        &RawTar::default().hardlink("h", "/etc/passwd").finish(),
        "absolute path",
    );
    refused(
        &RawTar::default().hardlink("h", "../../etc/passwd").finish(),
        "'..' component",
    );
    refused(
        &RawTar::default()
            .hardlink("h", "later")
            .file("later", b"x")
            .finish(),
        "not extracted from this layer",
    );
    refused_with(
        |out| {
            RawTar::default()
                .symlink("l", out)
                .hardlink("h", "l/sentinel")
                .finish()
        },
        "not extracted from this layer",
    );
    refused(
        &RawTar::default().dir("d/").hardlink("h", "d").finish(),
        "a directory",
    );
}

#[test]
fn a_directory_replaces_a_symlink() {
    if !root() {
        return;
    }
    let env = Env::new();
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let tar = RawTar::default()
        .symlink("d", outside.to_str().unwrap())
        .dir("d/")
        .file("d/f", b"inside")
        .finish();
    let out = env.import_bytes(&tar, &[]);
    assert!(out.status.success(), "{out:?}");
    let dir = layer_dir(&env, &String::from_utf8(out.stdout).unwrap());
    assert!(fs::symlink_metadata(dir.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(dir.join("d/f")).unwrap(), b"inside");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn overlay_xattrs_in_a_tar_are_dropped() {
    if !root() {
        return;
    }
    let env = Env::new();
    let tar = RawTar::default()
        .pax(&[
            (b"SCHILY.xattr.trusted.overlay.opaque", b"y"),
            (b"SCHILY.xattr.user.overlay.opaque", b"x"),
            (b"SCHILY.xattr.user.keep", b"1"),
        ])
        .dir("d/")
        .pax(&[
            (b"SCHILY.xattr.trusted.overlay.whiteout", b""),
            (b"SCHILY.xattr.user.overlay.whiteout", b""),
            (b"SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
            (
                b"SCHILY.xattr.security.selinux",
                b"system_u:object_r:etc_t:s0",
            ),
        ])
        .file("d/fake-whiteout", b"")
        .finish();
    let out = env.import_bytes(&tar, &[]);
    assert!(out.status.success(), "{out:?}");
    let dir = layer_dir(&env, &String::from_utf8(out.stdout).unwrap());
    let listed = sh(&format!(
        "getfattr -d -m - --absolute-names {0}/d {0}/d/fake-whiteout",
        dir.display()
    ));
    assert!(listed.contains("user.keep"), "{listed}");
    assert!(!listed.contains("overlay"), "{listed}");
    assert!(!listed.contains("selinux"), "{listed}");
    // Not a whiteout, not opaque: the kernel's view agrees.
    let lower = env.path("lower");
    fs::create_dir_all(lower.join("d")).unwrap();
    fs::write(lower.join("d/from-lower"), b"x").unwrap();
    let m = Overlay::mount(&[dir.clone(), lower], None, &env.path("mnt"));
    let mut names: Vec<_> = fs::read_dir(m.0.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["fake-whiteout", "from-lower"]);
}

#[test]
fn oversized_pax_headers_are_refused() {
    if !root() {
        return;
    }
    let big = vec![b'a'; 2 << 20];
    refused(
        &RawTar::default()
            .pax(&[(b"SCHILY.xattr.user.big", &big)])
            .file("f", b"x")
            .finish(),
        "exceeds the limit",
    );
    let mut gnu = RawTar::default();
    gnu.entry(b"././@LongLink", b'L', &big, b"").file("f", b"x");
    refused(&gnu.finish(), "exceeds the limit");
}

#[test]
fn gzip_bombs_and_size_limits() {
    if !root() {
        return;
    }
    // 64 MiB of zeros compress about 1000:1.
    let zeros = vec![0u8; 64 << 20];
    let bomb = gzip(&RawTar::default().file("zeros", &zeros).finish());
    assert!(bomb.len() < 200 << 10);
    let env = Env::new();
    env.ok(&["images"]);
    let before = env.store_state();
    expect_failure(env.import_bytes(&bomb, &[]), "decompression bomb");
    expect_failure(
        env.import_bytes(
            &zstd(&RawTar::default().file("zeros", &zeros).finish()),
            &[],
        ),
        "decompression bomb",
    );
    let small = RawTar::default().file("f", &[7u8; 100_000]).finish();
    expect_failure(
        env.import_bytes(&small, &["--max-size", "64K"]),
        "size limit",
    );
    assert_eq!(env.store_state(), before);
    // Lifting the limit imports it.
    let out = env.import_bytes(&bomb, &["--max-ratio", "0"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn truncated_tars_are_refused() {
    if !root() {
        return;
    }
    let tar = RawTar::default()
        .file("a", &[1u8; 5000])
        .file("b", b"x")
        .finish();
    // Inside file data, inside a header, and with no end-of-archive block.
    refused(&tar[..3000], "truncated tar");
    refused(&tar[..512 * 11 + 100], "truncated tar");
    refused(&tar[..tar.len() - 1024], "truncated tar");
    let gz = gzip(&tar);
    refused(&gz[..gz.len() / 2], "");
    // Random bytes are not a tar.
    refused(&[0x41u8; 4096], "checksum");
}

#[test]
fn devices_and_setuid() {
    if !root() {
        return;
    }
    let tar = RawTar::default()
        .entry_full(b"suid", b'0', b"#!/bin/sh\n", b"", 0o4755, 0)
        .entry_full(b"sgid-dir/", b'5', b"", b"", 0o2775, 0)
        .entry_full(b"tty", b'3', b"", b"", 0o620, 0)
        .entry_full(b"owned", b'0', b"x", b"", 0o644, 1234)
        .finish();
    let mut tar = tar;
    // Give the device node 4/1 (tty1): patch devmajor/devminor of the third header.
    let h = 512 * 3;
    tar[h + 329..h + 336].copy_from_slice(b"0000004");
    tar[h + 337..h + 344].copy_from_slice(b"0000001");
    tar[h + 148..h + 156].fill(b' ');
    let sum: u64 = tar[h..h + 512].iter().map(|&b| b as u64).sum();
    tar[h + 148..h + 155].copy_from_slice(format!("{sum:06o}\0").as_bytes());

    // As root: kept as the image has them (the store's layers/ is 0700).
    let env = Env::new();
    let out = env.import_bytes(&tar, &[]);
    assert!(out.status.success(), "{out:?}");
    let dir = layer_dir(&env, &String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        fs::metadata(dir.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(dir.join("sgid-dir")).unwrap().mode() & 0o7777,
        0o2775
    );
    let tty = fs::symlink_metadata(dir.join("tty")).unwrap();
    assert!(tty.file_type().is_char_device());
    assert_eq!(tty.rdev(), layerfs::sys::makedev(4, 1));
    assert_eq!(fs::metadata(dir.join("owned")).unwrap().uid(), 1234);
    let layers_mode = fs::metadata(env.store().join("layers")).unwrap().mode();
    assert_eq!(layers_mode & 0o077, 0, "layers/ must be private");

    // Unprivileged: devices skipped, owners not applied, setuid/setgid bits dropped.
    let env = Env::new();
    fs::create_dir_all(env.store()).unwrap();
    sh(&format!(
        "chown 65534:65534 {0} {1}",
        env.dir.path().display(),
        env.store().display()
    ));
    let tarfile = env.path("l.tar");
    fs::write(&tarfile, &tar).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .arg("--root")
        .arg(env.store())
        .arg("import")
        .arg(&tarfile)
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device"), "{err}");
    let dir = layer_dir(&env, &String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        fs::metadata(dir.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(fs::metadata(dir.join("suid")).unwrap().uid(), 65534);
    assert_eq!(
        fs::metadata(dir.join("sgid-dir")).unwrap().mode() & 0o7777,
        0o775
    );
    assert!(!dir.join("tty").exists());
}

#[test]
fn whiteouts_become_overlay_format() {
    if !root() {
        return;
    }
    let env = Env::new();
    let tar = RawTar::default()
        .dir("a/")
        .file("a/.wh.gone", b"")
        .file("a/new", b"n")
        .file("b/f", b"f")
        .file("b/.wh..wh..opq", b"")
        .finish();
    let out = env.import_bytes(&tar, &[]);
    assert!(out.status.success(), "{out:?}");
    let dir = layer_dir(&env, &String::from_utf8(out.stdout).unwrap());
    let wh = fs::symlink_metadata(dir.join("a/gone")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let opq = sh(&format!(
        "getfattr -n trusted.overlay.opaque --only-values --absolute-names {}/b",
        dir.display()
    ));
    assert_eq!(opq, "y");
    // The kernel agrees with what the OCI tar meant.
    let lower = env.path("lower");
    for f in ["a/gone", "a/kept", "b/hidden"] {
        fs::create_dir_all(lower.join(f).parent().unwrap()).unwrap();
        fs::write(lower.join(f), b"lower").unwrap();
    }
    let m = Overlay::mount(&[dir, lower], None, &env.path("mnt"));
    let ls = sh(&format!("cd {} && find . | sort", m.0.display()));
    assert_eq!(ls, ".\n./a\n./a/kept\n./a/new\n./b\n./b/f\n");
}

#[test]
fn killed_import_leaves_no_trace_and_gc_cleans_up() {
    if !root() {
        return;
    }
    let env = Env::new();
    env.ok(&["images"]);
    let before = env.store_state();
    // A tar that never ends: the importer blocks reading stdin, then is killed.
    let mut child = Command::new(bin())
        .arg("--root")
        .arg(env.store())
        .args(["import", "-", "--name", "never"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        let tar = RawTar::default().file("big", &[1u8; 1 << 20]).finish();
        stdin.write_all(&tar[..tar.len() / 2]).unwrap();
        stdin.flush().unwrap();
    }
    // Wait until it has staged something (generously: the machine may be busy).
    for _ in 0..600 {
        if fs::read_dir(env.store().join("tmp")).unwrap().count() > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        fs::read_dir(env.store().join("tmp")).unwrap().count(),
        1,
        "the import never started staging"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let after = env.store_state();
    let visible = |s: &[String]| -> Vec<String> {
        s.iter()
            .filter(|l| !l.starts_with("tmp/"))
            .cloned()
            .collect()
    };
    assert_eq!(visible(&after), visible(&before));
    assert_eq!(fs::read_dir(env.store().join("tmp")).unwrap().count(), 1);
    let gc = env.ok(&["gc"]);
    assert!(gc.contains("1 staging dirs"), "{gc}");
    assert_eq!(env.store_state(), before);
}

#[test]
fn concurrent_imports_all_land() {
    if !root() {
        return;
    }
    let env = Env::new();
    env.ok(&["images"]);
    let children: Vec<_> = (0..4)
        .map(|i| {
            let f = env.path(&format!("l{i}.tar"));
            fs::write(
                &f,
                RawTar::default()
                    .file(&format!("f{i}"), &vec![i as u8; 300_000])
                    .finish(),
            )
            .unwrap();
            Command::new(bin())
                .arg("--root")
                .arg(env.store())
                .arg("import")
                .arg(&f)
                .args(["--name", &format!("img{i}")])
                .output()
        })
        .collect();
    for c in children {
        assert!(c.unwrap().status.success());
    }
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let store = env.store();
            let f = env.path(&format!("l{i}.tar"));
            std::thread::spawn(move || {
                Command::new(bin())
                    .arg("--root")
                    .arg(store)
                    .arg("import")
                    .arg(f)
                    .args(["--name", &format!("again{i}")])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let images = env.ok(&["images", "--json"]);
    for i in 0..4 {
        assert!(images.contains(&format!("\"img{i}\"")), "{images}");
        assert!(images.contains(&format!("\"again{i}\"")), "{images}");
    }
    assert_eq!(fs::read_dir(env.store().join("layers")).unwrap().count(), 4);
    assert!(
        Path::new(&env.store().join("tmp"))
            .read_dir()
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn a_top_level_opaque_marker_hides_every_lower_layer() {
    // Kernel overlayfs ignores opaque markers on layer roots, so the stack is cut when built.
    if !root() {
        return;
    }
    let env = Env::new();
    let lower = RawTar::default().file("old", b"o").finish();
    assert!(
        env.import_bytes(&lower, &["--name", "low"])
            .status
            .success()
    );
    let top = RawTar::default()
        .file(".wh..wh..opq", b"")
        .file("new", b"n")
        .finish();
    let out = env.import_bytes(&top, &["--name", "top", "--parent", "low"]);
    assert!(out.status.success(), "{out:?}");
    let m = LayerfsMount::mount(&env, &["--image", "top"], &env.path("m"));
    let mut names: Vec<_> = fs::read_dir(&m.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["new"]);
    // The hidden layer is not even part of the stack (the mount's lease lists one layer).
    let lease = fs::read_dir(env.store().join("mounts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let v: serde_json::Value = serde_json::from_slice(&fs::read(lease).unwrap()).unwrap();
    assert_eq!(v["diff_ids"].as_array().unwrap().len(), 1, "{v}");
}
