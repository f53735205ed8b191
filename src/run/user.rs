//! Resolving a `USER` string (`name`, `uid`, `name:group`, `uid:gid`, empty) to the numeric
//! ids a container process runs with, through the rootfs's own `/etc/passwd` and `/etc/group`.
//!
//! The rules are Docker's (runc's `libcontainer/user`):
//!
//! - empty means root (uid 0), looked up like `"0"`;
//! - a name must be in passwd, a number need not be (then gid 0 and home `/`);
//! - a name or number matches a passwd entry by name first, then by uid;
//! - `:group` names a group that must exist in /etc/group, or a number that need not; with an
//!   explicit group there are no supplementary groups, without one the supplementary groups
//!   are every group that lists the user's name as a member;
//! - ids must be below 2^31 (what the kernel and runc accept as a container id).
//!
//! The two files are read through a directory fd on the rootfs with in-root resolution: a
//! symlinked `/etc/passwd` is followed as if the rootfs were `/`, never out of it, and only a
//! regular file is read (a FIFO planted there cannot block the build). Parsing is pure and
//! lenient like libc's: malformed lines are skipped.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use super::RunError;
use crate::sys;

/// Ids a container process runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, in /etc/group order, without duplicates.
    pub additional_gids: Vec<u32>,
    /// The home directory from passwd (`/` when the user has no entry): the default `HOME`.
    pub home: String,
}

impl User {
    /// root with no supplementary groups and home `/root`.
    pub fn root() -> User {
        User {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/root".into(),
        }
    }
}

/// Largest id accepted (`2^31 - 1`, as runc's user lookup).
const MAX_ID: u64 = i32::MAX as u64;
/// /etc/passwd and /etc/group larger than this are refused rather than read into memory.
const MAX_FILE: u64 = 16 << 20;

/// One passwd line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// One group line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: u64 = s.parse().ok()?;
    if v > MAX_ID {
        return None;
    }
    u32::try_from(v).ok()
}

/// Lines of a colon-separated database: comments and blank lines dropped, non-UTF-8 lines
/// skipped (names in them could not be matched against a UTF-8 `USER` anyway).
fn records(text: &[u8]) -> impl Iterator<Item = Vec<&str>> {
    text.split(|&b| b == b'\n').filter_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            return None;
        }
        Some(line.split(':').collect())
    })
}

/// Parse /etc/passwd text; lines without a valid name, uid and gid are skipped.
pub fn parse_passwd(text: &[u8]) -> Vec<PasswdEntry> {
    records(text)
        .filter_map(|f| {
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: parse_id(f[2])?,
                gid: parse_id(f[3])?,
                home: f.get(5).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Parse /etc/group text; lines without a valid name and gid are skipped.
pub fn parse_group(text: &[u8]) -> Vec<GroupEntry> {
    records(text)
        .filter_map(|f| {
            if f.len() < 3 || f[0].is_empty() {
                return None;
            }
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: parse_id(f[2])?,
                members,
            })
        })
        .collect()
}

/// Resolve `spec` against parsed passwd and group entries (the pure half of [`resolve_user`]).
pub fn resolve_in(
    spec: &str,
    passwd: &[PasswdEntry],
    group: &[GroupEntry],
) -> Result<User, RunError> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_arg = if user_arg.is_empty() { "0" } else { user_arg };
    let bad = |why: &str| RunError::User {
        spec: spec.to_string(),
        reason: why.to_string(),
    };
    let numeric_uid = if user_arg.bytes().all(|b| b.is_ascii_digit()) {
        Some(parse_id(user_arg).ok_or_else(|| bad("uid out of range (0 to 2147483647)"))?)
    } else {
        None
    };
    // By name first, then by uid: a user literally named "1000" wins over uid 1000.
    let entry = passwd
        .iter()
        .find(|e| e.name == user_arg)
        .or_else(|| numeric_uid.and_then(|uid| passwd.iter().find(|e| e.uid == uid)));
    let (uid, mut gid, home, name) = match (entry, numeric_uid) {
        (Some(e), _) => {
            let home = if e.home.is_empty() { "/" } else { &e.home };
            (e.uid, e.gid, home.to_string(), Some(e.name.as_str()))
        }
        (None, Some(uid)) => (uid, 0, "/".to_string(), None),
        (None, None) => {
            return Err(bad(&format!(
                "no user named \"{user_arg}\" in the image's /etc/passwd"
            )));
        }
    };
    let mut additional_gids = Vec::new();
    match group_arg {
        Some("") => return Err(bad("empty group after ':'")),
        Some(g) => {
            let numeric_gid = if g.bytes().all(|b| b.is_ascii_digit()) {
                Some(parse_id(g).ok_or_else(|| bad("gid out of range (0 to 2147483647)"))?)
            } else {
                None
            };
            gid = match group.iter().find(|e| e.name == g) {
                Some(e) => e.gid,
                None => match numeric_gid {
                    Some(n) => n,
                    None => {
                        return Err(bad(&format!(
                            "no group named \"{g}\" in the image's /etc/group"
                        )));
                    }
                },
            };
        }
        None => {
            if let Some(name) = name {
                for e in group.iter().filter(|e| e.members.iter().any(|m| m == name)) {
                    if e.gid != gid && !additional_gids.contains(&e.gid) {
                        additional_gids.push(e.gid);
                    }
                }
            }
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// Read `etc/<name>` of the rootfs, confined to it; a missing file reads as empty.
fn read_db(root: BorrowedFd<'_>, name: &str) -> Result<Vec<u8>, RunError> {
    let path = format!("etc/{name}");
    let io_err = |e| RunError::io(format!("read /{path} of the rootfs"), e);
    let fd = match sys::openat2_in(
        root,
        path.as_bytes(),
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
        sys::Resolve::InRoot,
    ) {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(io_err(e)),
    };
    let st = sys::fstat(fd.as_fd()).map_err(io_err)?;
    if !st.is_reg() {
        return Err(RunError::invalid(format!(
            "/{path} of the rootfs is not a regular file"
        )));
    }
    if st.size > MAX_FILE {
        return Err(RunError::invalid(format!(
            "/{path} of the rootfs is larger than {MAX_FILE} bytes"
        )));
    }
    let mut data = Vec::with_capacity(st.size as usize);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::from(fd), MAX_FILE),
        &mut data,
    )
    .map_err(io_err)?;
    Ok(data)
}

/// Resolve a `USER` string through the rootfs's /etc/passwd and /etc/group (see the module
/// doc for the rules).
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<User, RunError> {
    let root = sys::open_dir_path(rootfs)
        .map_err(|e| RunError::io(format!("open rootfs {}", crate::error::show(rootfs)), e))?;
    resolve_user_at(root.as_fd(), spec)
}

/// [`resolve_user`] on an open rootfs.
pub fn resolve_user_at(root: BorrowedFd<'_>, spec: &str) -> Result<User, RunError> {
    let passwd = parse_passwd(&read_db(root, "passwd")?);
    // The group file matters only for a named group or a named user's memberships.
    let group = parse_group(&read_db(root, "group")?);
    resolve_in(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        \n\
        app:x:1000:1000::/home/app:/bin/sh\n\
        nohome:x:1001:1001:::/bin/sh\n\
        1234:x:5000:5000::/named-1234:/bin/sh\n\
        broken:x:notanumber:1\n\
        short:x\n";
    const GROUP: &[u8] = b"root:x:0:\n\
        app:x:1000:\n\
        extra:x:2000:app\n\
        more:x:2001:root, app ,other\n\
        dup:x:2000:app\n\
        bad:x:zz:app\n";

    fn res(spec: &str) -> Result<User, RunError> {
        resolve_in(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    fn ids(spec: &str) -> (u32, u32, Vec<u32>, String) {
        let u = res(spec).unwrap();
        (u.uid, u.gid, u.additional_gids, u.home)
    }

    #[test]
    fn parsing_skips_malformed_lines() {
        let p = parse_passwd(PASSWD);
        let names: Vec<_> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["root", "app", "nohome", "1234"]);
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 5);
        assert_eq!(g[3].members, ["root", "app", "other"]);
        assert!(parse_passwd(b"x:x:4294967296:0::/:\n").is_empty());
        assert!(parse_passwd(b"x:x:-1:0::/:\n").is_empty());
        assert_eq!(parse_passwd(b"crlf:x:7:8::/h:/bin/sh\r\n")[0].home, "/h");
    }

    #[test]
    fn table() {
        let s = String::from;
        // (spec, uid, gid, supplementary, home)
        let cases: &[(&str, u32, u32, &[u32], &str)] = &[
            ("", 0, 0, &[2001], "/root"),
            ("root", 0, 0, &[2001], "/root"),
            ("0", 0, 0, &[2001], "/root"),
            ("app", 1000, 1000, &[2000, 2001], "/home/app"),
            ("1000", 1000, 1000, &[2000, 2001], "/home/app"),
            ("app:extra", 1000, 2000, &[], "/home/app"),
            ("app:2001", 1000, 2001, &[], "/home/app"),
            ("app:777", 1000, 777, &[], "/home/app"),
            ("4242", 4242, 0, &[], "/"),
            ("4242:4343", 4242, 4343, &[], "/"),
            ("4242:extra", 4242, 2000, &[], "/"),
            (":extra", 0, 2000, &[], "/root"),
            ("nohome", 1001, 1001, &[], "/"),
            // A user named "1234" wins over uid 1234 (runc matches the name first).
            ("1234", 5000, 5000, &[], "/named-1234"),
        ];
        for &(spec, uid, gid, sup, home) in cases {
            assert_eq!(
                ids(spec),
                (uid, gid, sup.to_vec(), s(home)),
                "spec {spec:?}"
            );
        }
    }

    #[test]
    fn errors() {
        for (spec, needle) in [
            ("nobody", "no user named \"nobody\""),
            ("app:nogroup", "no group named \"nogroup\""),
            ("app:", "empty group"),
            ("2147483648", "out of range"),
            ("app:99999999999", "out of range"),
        ] {
            let e = res(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec:?}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn no_files_means_numeric_only() {
        assert_eq!(
            resolve_in("", &[], &[]).unwrap(),
            User {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
                home: "/".into()
            }
        );
        assert!(resolve_in("app", &[], &[]).is_err());
        assert_eq!(resolve_in("7:8", &[], &[]).unwrap().gid, 8);
    }

    #[test]
    fn reads_through_the_rootfs_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/group"), GROUP).unwrap();
        // An absolute symlink to a passwd outside the rootfs must resolve inside it.
        let outside = d.path().join("outside-passwd");
        std::fs::write(&outside, PASSWD).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/passwd")).unwrap();
        assert!(resolve_user(&root, "app").is_err());
        assert_eq!(resolve_user(&root, "1000").unwrap().gid, 0);
        // The same link target inside the rootfs is followed.
        let inside = root.join(outside.strip_prefix("/").unwrap());
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::write(&inside, PASSWD).unwrap();
        assert_eq!(
            resolve_user(&root, "app").unwrap().additional_gids,
            [2000, 2001]
        );
        // A FIFO is refused, not read (it would block).
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        nix::unistd::mkfifo(
            &root.join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let e = resolve_user(&root, "app").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
