//! What the build cache keys a COPY/ADD selection by: one [`EntryDigest`] per walked entry
//! (a [`Manifest`]), their combined digest, and a one-line account of how two manifests
//! differ for "this step ran because ...". Pure functions over manifests.

use std::collections::BTreeMap;

use super::{EntryKind, shown, split_parent};
use crate::digest::{Digest, Hasher};
use crate::error::ShowPath;

/// What the build cache knows of one entry of a selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryDigest {
    pub kind: EntryKind,
    /// Permission bits (after `--chmod`).
    pub mode: u32,
    /// Owner in the image (after `--chown`, else 0:0).
    pub uid: u32,
    pub gid: u32,
    /// Device number of a device node, else 0.
    pub rdev: u64,
    pub link_target: Option<Vec<u8>>,
    /// sha256 of a regular file's content.
    pub content: Option<Digest>,
}

/// Per-path digests of a selection, in walk order; paths are relative to the context root.
pub type Manifest = Vec<(Vec<u8>, EntryDigest)>;

/// One digest for a whole manifest: every field of every entry, length-prefixed, in order.
pub fn digest_manifest(manifest: &[(Vec<u8>, EntryDigest)]) -> Digest {
    fn bytes(h: &mut Hasher, b: &[u8]) {
        h.update(&(b.len() as u64).to_be_bytes());
        h.update(b);
    }
    let mut h = Hasher::default();
    h.update(b"layerfs build context v1\0");
    for (path, e) in manifest {
        bytes(&mut h, path);
        h.update(&[e.kind.tag()]);
        h.update(&e.mode.to_be_bytes());
        h.update(&e.uid.to_be_bytes());
        h.update(&e.gid.to_be_bytes());
        h.update(&e.rdev.to_be_bytes());
        match &e.link_target {
            Some(target) => {
                h.update(&[1]);
                bytes(&mut h, target);
            }
            None => h.update(&[0]),
        }
        match &e.content {
            Some(d) => {
                h.update(&[1]);
                h.update(&d.0);
            }
            None => h.update(&[0]),
        }
    }
    h.finish()
}

/// How one path differs between two manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Added,
    Removed,
    /// Content, type, symlink target or device number.
    Modified,
    ModeChanged,
    OwnerChanged,
}

impl Change {
    fn verb(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Modified => "modified",
            Change::ModeChanged => "mode changed",
            Change::OwnerChanged => "owner changed",
        }
    }

    fn between(old: &EntryDigest, new: &EntryDigest) -> Option<Change> {
        if (old.kind, &old.content, &old.link_target, old.rdev)
            != (new.kind, &new.content, &new.link_target, new.rdev)
        {
            Some(Change::Modified)
        } else if old.mode != new.mode {
            Some(Change::ModeChanged)
        } else if (old.uid, old.gid) != (new.uid, new.gid) {
            Some(Change::OwnerChanged)
        } else {
            None
        }
    }
}

/// A short reason why two manifests differ, for "step N ran because ...": `src/server.js
/// modified`, `3 files added under src/`, `2 files changed under app/`, `lib/a.js removed`.
/// Files are counted rather than the directories that change with them; when only
/// directories changed, they are. `None` when the manifests hold the same entries.
pub fn explain_changes(
    old: &[(Vec<u8>, EntryDigest)],
    new: &[(Vec<u8>, EntryDigest)],
) -> Option<String> {
    let old_map: BTreeMap<&[u8], &EntryDigest> =
        old.iter().map(|(p, e)| (p.as_slice(), e)).collect();
    let new_map: BTreeMap<&[u8], &EntryDigest> =
        new.iter().map(|(p, e)| (p.as_slice(), e)).collect();
    // (path, change, is a directory)
    let mut changes: Vec<(&[u8], Change, bool)> = Vec::new();
    for (&path, &entry) in &new_map {
        let change = match old_map.get(path) {
            None => Some(Change::Added),
            Some(before) => Change::between(before, entry),
        };
        if let Some(change) = change {
            changes.push((path, change, entry.kind == EntryKind::Dir));
        }
    }
    for (&path, &entry) in &old_map {
        if !new_map.contains_key(path) {
            changes.push((path, Change::Removed, entry.kind == EntryKind::Dir));
        }
    }
    let files: Vec<_> = changes.iter().filter(|c| !c.2).collect();
    let (counted, noun) = if files.is_empty() {
        (changes.iter().collect::<Vec<_>>(), "directories")
    } else {
        (files, "files")
    };
    let (first, rest) = counted.split_first()?;
    let (first_path, first_change) = (first.0, first.1);
    if rest.is_empty() {
        return Some(format!("{} {}", shown(first_path), first_change.verb()));
    }
    let verb = if rest.iter().all(|c| c.1 == first_change) {
        first_change.verb()
    } else {
        "changed"
    };
    let mut common = split_parent(first_path).0;
    for &&(path, _, _) in rest {
        common = common_dir(common, split_parent(path).0);
    }
    let count = counted.len();
    Some(if common.is_empty() {
        format!("{count} {noun} {verb}")
    } else {
        format!("{count} {noun} {verb} under {}/", ShowPath(common))
    })
}

/// The longest leading run of whole components two directory paths share.
fn common_dir<'a>(a: &'a [u8], b: &[u8]) -> &'a [u8] {
    let mut end = 0;
    let mut i = 0;
    while i < a.len() && i < b.len() && a[i] == b[i] {
        i += 1;
        if a[i - 1] == b'/' {
            end = i - 1;
        }
    }
    let a_done = i == a.len() && (i == b.len() || b[i] == b'/');
    let b_done = i == b.len() && (i == a.len() || a[i] == b'/');
    if a_done || b_done { &a[..i] } else { &a[..end] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_changes_table() {
        fn file(content: &str) -> EntryDigest {
            EntryDigest {
                kind: EntryKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                link_target: None,
                content: Some(Digest::of(content.as_bytes())),
            }
        }
        fn dir() -> EntryDigest {
            EntryDigest {
                kind: EntryKind::Dir,
                mode: 0o755,
                content: None,
                ..file("")
            }
        }
        fn m(entries: &[(&str, EntryDigest)]) -> Manifest {
            entries
                .iter()
                .map(|(p, e)| (p.as_bytes().to_vec(), e.clone()))
                .collect()
        }
        let base = m(&[
            ("", dir()),
            ("app", dir()),
            ("app/main.js", file("1")),
            ("app/util.js", file("2")),
            ("lib", dir()),
            ("lib/a.js", file("3")),
            ("src", dir()),
            ("src/server.js", file("4")),
        ]);
        let with = |changes: &[(&str, Option<EntryDigest>)]| {
            let mut out = base.clone();
            for (path, entry) in changes {
                out.retain(|(p, _)| p != path.as_bytes());
                if let Some(e) = entry {
                    out.push((path.as_bytes().to_vec(), e.clone()));
                }
            }
            out
        };
        let executable = EntryDigest {
            mode: 0o755,
            ..file("4")
        };
        let link = EntryDigest {
            kind: EntryKind::Symlink,
            link_target: Some(b"x".to_vec()),
            content: None,
            ..file("")
        };
        let cases: Vec<(Manifest, Option<&str>)> = vec![
            (base.clone(), None),
            (
                with(&[("src/server.js", Some(file("5")))]),
                Some("src/server.js modified"),
            ),
            (with(&[("lib/a.js", None)]), Some("lib/a.js removed")),
            (
                with(&[
                    ("src/a.js", Some(file("a"))),
                    ("src/b/c.js", Some(file("b"))),
                    ("src/b", Some(dir())),
                    ("src/d.js", Some(file("d"))),
                ]),
                Some("3 files added under src/"),
            ),
            (
                with(&[
                    ("app/main.js", Some(file("9"))),
                    ("app/new.js", Some(file("n"))),
                ]),
                Some("2 files changed under app/"),
            ),
            (
                with(&[
                    ("app/main.js", Some(file("9"))),
                    ("lib/a.js", Some(file("9"))),
                ]),
                Some("2 files modified"),
            ),
            (
                with(&[("src/server.js", Some(executable))]),
                Some("src/server.js mode changed"),
            ),
            (with(&[("lib/a.js", Some(link))]), Some("lib/a.js modified")),
            (
                with(&[("src/new", Some(dir())), ("src/new/a.js", Some(file("a")))]),
                Some("src/new/a.js added"),
            ),
            (with(&[("cache", Some(dir()))]), Some("cache added")),
            (
                with(&[("lib/x", Some(dir())), ("lib/y", Some(dir()))]),
                Some("2 directories added under lib/"),
            ),
            (
                with(&[(
                    "",
                    Some(EntryDigest {
                        mode: 0o700,
                        ..dir()
                    }),
                )]),
                Some(". mode changed"),
            ),
            (
                with(&[("app", None), ("app/main.js", None), ("app/util.js", None)]),
                Some("2 files removed under app/"),
            ),
        ];
        for (new, want) in cases {
            assert_eq!(explain_changes(&base, &new).as_deref(), want, "{new:?}");
        }
        assert_eq!(
            explain_changes(&[], &base).as_deref(),
            Some("4 files added")
        );
    }
}
